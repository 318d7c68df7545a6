//! An external data file as the metadata sees it: where guest data
//! clusters live (at host offset == guest offset, not refcounted), and what
//! happens to one that is freed. Which file it is, and through which gate it
//! is opened, is the image layer's business (`image/data_file.rs`).

use std::sync::Arc;

use super::{DiscardModes, FreeReason};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// The data file of an open image, as the metadata layer sees it.
pub(crate) struct DataFile {
    pub(crate) storage: Arc<dyn Storage>,
    /// `data_file_raw`: the data file is a valid raw image at all times.
    pub(crate) raw: bool,
    /// Which freed clusters get their space back.
    pub(crate) discard: DiscardModes,
}

impl DataFile {
    /// Gives back the space of a data cluster that is no longer referenced
    /// (there is no refcount to drop). Done at once, under the metadata
    /// lock: the cluster's offset is its guest offset, so a deferred punch
    /// could hit data a later write put there.
    pub(crate) fn release(&self, host: u64, len: u64, reason: FreeReason) -> Result<()> {
        if self.raw || self.discard.punches(reason) {
            self.storage.punch_hole(host, len).map_err(Error::io("discarding in the data file", host))?;
        }
        Ok(())
    }
}
