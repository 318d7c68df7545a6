//! Which files an image may open besides itself (backing files, external
//! data files): the caller's policy. Names in a header come from whoever
//! made the image, so following them is the caller's decision.

use std::path::Path;
use std::sync::Arc;

use super::ImageFormat;
use crate::error::Result;
use crate::storage::Storage;

/// Opens backing files named by protocol (`http://...`, `nbd://...`,
/// `rbd:...`, ...): the engine knows only host files, the caller knows the
/// protocols. Consulted before a recorded name is resolved as a file, for
/// every layer of a chain (backing options inherit it).
pub trait ProtocolOpener: Send + Sync + std::fmt::Debug {
    /// `None` when `name` names no protocol the opener takes (it is then
    /// resolved as a host file); else the storage, opened read-only, or
    /// why it could not be opened. `name` comes from an image header:
    /// whoever made the image chose it.
    fn open_backing(&self, name: &str) -> Option<Result<Arc<dyn Storage>>>;

    /// Whether `name` is one the opener takes (no connection made).
    fn takes(&self, name: &str) -> bool;
}

/// Decides whether a backing file may be opened.
pub trait BackingGate: Send + Sync {
    /// `path` is the resolved file, `format` the format the image records
    /// for it (`None`: it would be probed). Return an error to refuse.
    fn check(&self, path: &Path, format: Option<ImageFormat>) -> Result<()>;
}

/// What to do with backing files named by an image.
#[derive(Clone, Default)]
pub enum BackingPolicy {
    /// Open them (probing the format when the image records none).
    #[default]
    Follow,
    /// Open them only when the image records their format.
    FollowWithoutProbing,
    /// Refuse to open images that have a backing file.
    Forbid,
    /// Open the image alone: clusters it does not allocate read as zeros
    /// (for header-only work such as `info` or `rebase -u`).
    Ignore,
    /// Ask the gate for every backing file.
    Gate(Arc<dyn BackingGate>),
}

impl std::fmt::Debug for BackingPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackingPolicy::Follow => "Follow",
            BackingPolicy::FollowWithoutProbing => "FollowWithoutProbing",
            BackingPolicy::Forbid => "Forbid",
            BackingPolicy::Ignore => "Ignore",
            BackingPolicy::Gate(_) => "Gate",
        })
    }
}
