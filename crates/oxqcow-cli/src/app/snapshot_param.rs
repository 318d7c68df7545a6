//! `-l SNAPSHOT` of convert and measure: which internal snapshot of the
//! source to read, and the source reopened on that snapshot's content.

use oxqcow::{Image, OpenOptions};

use crate::app::image::open_image;
use crate::app::messages::prog_name;
use crate::app::qemu_opts::split_noisily;

/// `-l`: which internal snapshot of the source to read (qemu-img's
/// `snapshot.id=ID,snapshot.name=NAME` or a bare id-or-name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotParam {
    /// Found by id, then by name.
    IdOrName(String),
    /// Found by id and name, each when given.
    Exact { id: Option<String>, name: Option<String> },
}

impl SnapshotParam {
    /// Parses `-l` as QemuOpts parses it noisily (warning about flags
    /// written without `=`); an unknown key is returned as the error.
    pub fn parse(v: &str) -> Result<SnapshotParam, String> {
        if !v.starts_with("snapshot.") {
            return Ok(SnapshotParam::IdOrName(v.to_string()));
        }
        let (mut id, mut name) = (None, None);
        for (key, value) in split_noisily(&prog_name(), v) {
            match key.as_str() {
                "snapshot.id" => id = Some(value),
                "snapshot.name" => name = Some(value),
                other => return Err(other.to_string()),
            }
        }
        Ok(SnapshotParam::Exact { id, name })
    }

    /// Reopens `image` on the snapshot's content (QEMU's
    /// `bdrv_snapshot_load_tmp`), with qemu-img's messages.
    pub fn load(&self, image: Image, path: &str, fmt: Option<&str>) -> Result<Image, String> {
        let Image::Qcow2(q) = &image else {
            return Err(format!(
                "Failed to load snapshot: Block format '{}' used by device '' does not support temporarily loading \
                 internal snapshots",
                image.format().name()
            ));
        };
        let snapshots = q.snapshots();
        let found = match self {
            SnapshotParam::IdOrName(s) => {
                snapshots.iter().find(|sn| &sn.id == s).or_else(|| snapshots.iter().find(|sn| &sn.name == s))
            }
            SnapshotParam::Exact { id: None, name: None } => None,
            SnapshotParam::Exact { id, name } => snapshots
                .iter()
                .find(|sn| id.as_ref().is_none_or(|i| &sn.id == i) && name.as_ref().is_none_or(|n| &sn.name == n)),
        };
        let Some(sn) = found else { return Err("Failed to load snapshot: Can't find snapshot".into()) };
        let id = sn.id.clone();
        drop(image);
        let opts = OpenOptions { read_only: true, snapshot: Some(id), ..OpenOptions::new() };
        open_image(path, fmt, opts).map_err(|e| format!("Failed to load snapshot: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!(SnapshotParam::parse("s1"), Ok(SnapshotParam::IdOrName("s1".into())));
        assert_eq!(
            SnapshotParam::parse("snapshot.id=2,snapshot.name=b"),
            Ok(SnapshotParam::Exact { id: Some("2".into()), name: Some("b".into()) })
        );
        assert_eq!(SnapshotParam::parse("snapshot.foo=1"), Err("snapshot.foo".into()));
    }
}
