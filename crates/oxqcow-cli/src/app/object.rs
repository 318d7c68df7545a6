//! Objects in object stores as images: `s3://BUCKET/KEY`, `gs://BUCKET/KEY`
//! and `az://CONTAINER/KEY` names, and `driver=s3|gs|az` nodes
//! (`--image-opts`, `json:{...}`, as the image itself or as its `file`)
//! with `url`, `readahead`, `timeout` and the store's own configuration
//! keys. QEMU has no such driver: the names and messages are oxqcow's.
//!
//! Objects are read in place and never written there: an open for
//! writing and `create` are refused. `convert` writes a new object
//! ([`StagedTarget`]): the image is built in a temporary file and
//! uploaded when the conversion succeeded, as one multipart upload that
//! is aborted when anything fails.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use oxqcow::storage::object::{ObjectOptions, ObjectStorage, ObjectUpload, NO_WRITES, SCHEMES};
use oxqcow::Storage;

/// Whether `driver` is one of the object stores oxqcow reads.
pub fn is_object_driver(driver: &str) -> bool {
    SCHEMES.contains(&driver)
}

/// The options an `s3://`, `gs://` or `az://` image name opens; `None`
/// for other names.
pub fn object_name(name: &str) -> Option<ObjectOptions> {
    match oxqcow::names::parse_image_name(name) {
        Ok(oxqcow::names::ImageName::Protocol { driver, .. }) if is_object_driver(driver) => {
            Some(ObjectOptions::from_url(name))
        }
        _ => None,
    }
}

/// Takes the options under `prefix` (`""` for the node itself, `file.` for
/// an image's file) out of `options` when `{prefix}driver` is an object
/// store's.
pub fn take_object(options: &mut Vec<(String, String)>, prefix: &str) -> Result<Option<ObjectOptions>, String> {
    let key = format!("{prefix}driver");
    let Some(driver) = options.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| v.clone()) else {
        return Ok(None);
    };
    if !is_object_driver(&driver) {
        return Ok(None);
    }
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(options).into_iter().partition(|(k, _)| k.starts_with(prefix));
    *options = rest;
    let mut object = ObjectOptions::default();
    for (k, value) in mine {
        match &k[prefix.len()..] {
            "driver" => {}
            k => object.apply(k, &value)?,
        }
    }
    match object.url.as_deref() {
        None => return Err(format!("the '{driver}' driver requires an 'url' option")),
        Some(url) if !url.starts_with(&format!("{driver}://")) => {
            return Err(format!("the '{driver}' driver cannot open '{url}' (does not start with '{driver}://')"))
        }
        Some(_) => {}
    }
    Ok(Some(object))
}

/// Opens the object `opts` name for an image opened `read_only` or not:
/// writes are refused, else the HEAD request's verdict.
pub fn open_object(opts: &ObjectOptions, read_only: bool) -> Result<Arc<dyn Storage>, String> {
    if !read_only {
        return Err(NO_WRITES.into());
    }
    Ok(Arc::new(ObjectStorage::open(opts)?))
}

/// The refusal to create an image (`create`, `dd`) named `name` when it
/// names an object: only `convert` writes objects.
pub fn no_creation(name: &str) -> Option<String> {
    let driver = name.split_once("://")?.0;
    object_name(name).map(|_| format!("Protocol driver '{driver}' does not support image creation: {NO_WRITES}"))
}

/// Whether flattened image options open an object anywhere (the node
/// itself or its file).
pub fn names_object(options: &[(String, String)]) -> bool {
    options.iter().any(|(k, v)| (k == "driver" || k == "file.driver") && is_object_driver(v))
}

/// A new object that `convert` writes: the multipart upload started at
/// the key, and the temporary file where the image is built (sparse, in
/// `$TMPDIR`, unlinked from the start so that even a killed process
/// leaves no file behind; the image is created through its
/// `/proc/self/fd` name). Dropped without [`StagedTarget::finish`], the
/// upload is aborted and the file closed: the key holds what it held
/// before.
pub struct StagedTarget {
    upload: ObjectUpload,
    file: File,
}

impl StagedTarget {
    /// Starts the upload at the key `name` names (so that a wrong
    /// endpoint, bucket or credentials fail before any work) and makes
    /// the temporary file.
    pub fn start(name: &str) -> Result<Option<StagedTarget>, String> {
        let Some(opts) = object_name(name) else { return Ok(None) };
        let upload = ObjectUpload::start(&opts).map_err(|e| format!("Could not create '{name}': {e}"))?;
        let file = tempfile::tempfile().map_err(|e| format!("Could not create a temporary file for '{name}': {e}"))?;
        Ok(Some(StagedTarget { upload, file }))
    }

    /// Where the image is built: the file's name through the descriptor
    /// this process holds.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Uploads the finished image; the object appears whole or not at all.
    pub fn finish(self) -> Result<(), String> {
        let url = self.upload.url().to_string();
        self.upload.upload_file(&self.file).map_err(|e| format!("error while uploading '{url}': {e}"))
    }
}
