//! Ceph RBD images, named as QEMU's rbd driver names them: `rbd:pool/image...`
//! file names and `driver=rbd` nodes (`--image-opts`, `json:{...}`, as the
//! image itself or as its `file`), with `key-secret` (and the older
//! `password-secret`) looked up among `--object secret`s. The storage is the
//! `oxqcow-rbd` crate's, present with the cargo feature `rbd`; a build
//! without it refuses these names.

use std::sync::Arc;

use oxqcow::Storage;

/// Whether `name` is an `rbd:` file name.
pub fn is_rbd_name(name: &str) -> bool {
    matches!(oxqcow::names::parse_image_name(name), Ok(oxqcow::names::ImageName::Protocol { driver: "rbd", .. }))
}

/// Whether flattened image options open an RBD image anywhere (the node
/// itself or its file): `--image-opts` then passes them on whole as a
/// `json:` name.
pub fn names_rbd(options: &[(String, String)]) -> bool {
    options.iter().any(|(k, v)| (k == "driver" || k == "file.driver") && v == "rbd")
}

#[cfg(feature = "rbd")]
mod imp {
    use super::*;
    use crate::app::node_options::take_node;
    use oxqcow_rbd::{RbdOptions, RbdStorage};

    fn open(o: &RbdOptions, read_only: bool) -> Result<Arc<dyn Storage>, String> {
        Ok(Arc::new(RbdStorage::open(o, read_only)?))
    }

    /// Opens the image an `rbd:` file name names.
    pub fn open_rbd_name(name: &str, read_only: bool) -> Result<Arc<dyn Storage>, String> {
        open(&RbdOptions::from_filename(name)?, read_only)
    }

    /// Takes the options under `prefix` (`""` for the node itself, `file.`
    /// for an image's file) out of `options` when `{prefix}driver` is
    /// `rbd`, and opens the image they name; `secrets` looks up the key
    /// `key-secret` names (qemu-img's `--object`s, or qemu-io's).
    pub fn take_rbd(
        options: &mut Vec<(String, String)>,
        prefix: &str,
        read_only: bool,
        secrets: &dyn Fn(&str) -> Result<Vec<u8>, String>,
    ) -> Result<Option<Arc<dyn Storage>>, String> {
        let Some((_, mine)) = take_node(options, prefix, |d| d == "rbd") else { return Ok(None) };
        let mut secret = None;
        let mut driver_options = Vec::new();
        for (k, v) in mine {
            match k.as_str() {
                "key-secret" | "password-secret" => {
                    let bytes = secrets(&v)?;
                    secret =
                        Some(String::from_utf8(bytes).map_err(|_| format!("Data from secret {v} is not valid UTF-8"))?);
                }
                k => driver_options.push((k.to_string(), v)),
            }
        }
        open(&RbdOptions::from_options(&driver_options, secret)?, read_only).map(Some)
    }

    /// The driver's options that name what an rbd node reads (QEMU's
    /// `qemu_rbd_strong_runtime_opts`), which its `json:` name keeps.
    const STRONG: &[&str] = &["pool", "namespace", "image", "conf", "snapshot", "user"];

    /// The name QEMU gives the rbd node that an `rbd:` file name, or a
    /// `json:` name with an rbd node (as the image or its `file`), opens:
    /// its options as a JSON object (QDict order), and the format node's
    /// driver above it in a `json:` name, if any; `None` for other names.
    pub fn rbd_node(name: &str) -> Option<(String, Option<String>)> {
        let s = |v: &str| serde_json::json!(v).to_string();
        if is_rbd_name(name) {
            let o = RbdOptions::from_filename(name).ok()?;
            let mut members = vec![("pool", s(&o.pool)), ("image", s(&o.image))];
            if let Some(conf) = &o.conf {
                members.push(("conf", s(conf)));
            }
            if let Some(snap) = &o.snapshot {
                members.push(("snapshot", s(snap)));
            }
            members.push(("driver", s("rbd")));
            members.push(("namespace", s(&o.namespace)));
            if let Some(user) = &o.user {
                members.push(("user", s(user)));
            }
            return Some((crate::app::qjson::qdict_compact(members), None));
        }
        let options = oxqcow::names::parse_json_name(name.strip_prefix("json:")?).ok()?;
        let driver = |key: &str| options.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let (prefix, format) = match (driver("driver"), driver("file.driver")) {
            (Some("rbd"), _) => ("", None),
            (Some(format), Some("rbd")) => ("file.", Some(format.to_string())),
            _ => return None,
        };
        let mut members: Vec<(&str, String)> = options
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).filter(|k| STRONG.contains(k)).map(|k| (k, s(v))))
            .collect();
        members.push(("driver", s("rbd")));
        Some((crate::app::qjson::qdict_compact(members), format))
    }

    /// The `json:` name QEMU gives the rbd node `name` opens (see [`rbd_node`]).
    pub fn rbd_node_json(name: &str) -> Option<String> {
        rbd_node(name).map(|(node, _)| node)
    }

    /// The `json:` name QEMU gives the image `name` opens in `format` when
    /// an rbd node is its file (an `rbd:` name, a `json:` name with an rbd
    /// `file`), or the rbd node's when that is the image; `None` for other
    /// names.
    pub fn rbd_image_json(name: &str, format: &str) -> Option<String> {
        let s = |v: &str| serde_json::json!(v).to_string();
        let (node, named_format) = rbd_node(name)?;
        if name.starts_with("json:") && named_format.is_none() {
            return Some(format!("json:{node}"));
        }
        let format = named_format.unwrap_or_else(|| format.to_string());
        Some(format!("json:{}", crate::app::qjson::qdict_compact(vec![("driver", s(&format)), ("file", node)])))
    }

    /// Creates the empty image an `rbd:` file name names and opens it for
    /// writing: the image format written onto it grows it (as QEMU's rbd
    /// driver grows an image written past its end).
    pub fn create_rbd_name(name: &str) -> Result<Arc<dyn Storage>, String> {
        let o = RbdOptions::from_filename(name)?;
        oxqcow_rbd::create(&o, 0)?;
        open(&o, false)
    }
}

#[cfg(not(feature = "rbd"))]
mod imp {
    use super::*;

    const NOT_BUILT: &str = "the 'rbd' protocol is not supported by this build of oxqcow (cargo feature 'rbd')";

    pub fn open_rbd_name(_name: &str, _read_only: bool) -> Result<Arc<dyn Storage>, String> {
        Err(NOT_BUILT.into())
    }

    pub fn take_rbd(
        options: &mut Vec<(String, String)>,
        prefix: &str,
        _read_only: bool,
        _secrets: &dyn Fn(&str) -> Result<Vec<u8>, String>,
    ) -> Result<Option<Arc<dyn Storage>>, String> {
        let key = format!("{prefix}driver");
        match options.iter().rev().find(|(k, _)| *k == key) {
            Some((_, v)) if v == "rbd" => Err(NOT_BUILT.into()),
            _ => Ok(None),
        }
    }

    pub fn create_rbd_name(_name: &str) -> Result<Arc<dyn Storage>, String> {
        Err(NOT_BUILT.into())
    }

    pub fn rbd_node(_name: &str) -> Option<(String, Option<String>)> {
        None
    }

    pub fn rbd_node_json(_name: &str) -> Option<String> {
        None
    }

    pub fn rbd_image_json(_name: &str, _format: &str) -> Option<String> {
        None
    }
}

pub use imp::{create_rbd_name, open_rbd_name, rbd_image_json, rbd_node, rbd_node_json, take_rbd};
