//! Creating a qcow2 image: the options checked as QEMU's `qcow2_co_create`
//! checks them, then QEMU's layout (header, refcount table, refcount
//! block, L1 table), the size, preallocation, backing file name and
//! encryption, set up through the metadata like any later change.

use std::sync::Arc;

use oxqcow_format::header::{compat, incompat, Header};
use oxqcow_format::table::encode_entries;
use oxqcow_format::Geometry;

use super::Qcow2;
use crate::error::{Error, Result};
use crate::options::{Compat, CompressionType, CreateOptions, OpenOptions, Preallocation};
use crate::storage::{empty, Storage};

impl crate::options::CreateOptions {
    /// Checks the options as creating a qcow2 image would, with QEMU's
    /// messages, without touching any file (other formats are checked as
    /// they are created).
    pub fn validate(&self) -> Result<()> {
        match self.format {
            crate::options::ImageFormat::Qcow2 => validate_create(self).map(|_| ()),
            _ => Ok(()),
        }
    }
}

/// Checks creation options as QEMU's `qcow2_co_create` does, in its order
/// and with its messages; then refuses, naming them, the valid options this
/// engine does not implement yet.
pub(crate) fn validate_create(opts: &CreateOptions) -> Result<Geometry> {
    let invalid = |msg: &str| Err(Error::InvalidArgument(msg.to_string()));
    let v2 = opts.compat == Compat::V2;
    if opts.extended_l2 && v2 {
        return invalid(
            "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        );
    }
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return invalid("Cluster size must be a power of two between 512 and 2048k");
    }
    if opts.extended_l2 && cs < 512 * u64::from(oxqcow_format::limits::SUBCLUSTERS_PER_CLUSTER) {
        return invalid("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
    }
    // With extended L2 entries preallocated clusters have no allocated
    // subclusters, so they still read from the backing file.
    if opts.backing_file.is_some() && opts.preallocation != Preallocation::Off && !opts.extended_l2 {
        return invalid("Backing file and preallocation can only be used at the same time if extended_l2 is on");
    }
    if opts.backing_format.is_some() && opts.backing_file.is_none() {
        return invalid("Backing format cannot be used without backing file");
    }
    if opts.lazy_refcounts && v2 {
        return invalid(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        );
    }
    if opts.refcount_bits > 64 || !opts.refcount_bits.is_power_of_two() {
        return invalid("Refcount width must be a power of two and may not exceed 64 bits");
    }
    if v2 && opts.refcount_bits != 16 {
        return invalid(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
        );
    }
    if opts.data_file_raw && opts.data_file.is_none() {
        return invalid("data-file-raw requires data-file");
    }
    if opts.data_file_raw && opts.backing_file.is_some() {
        return invalid("Backing file and data-file-raw cannot be used at the same time");
    }
    if opts.data_file.is_some() && v2 {
        return invalid(
            "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        );
    }
    if v2 && opts.compression_type != CompressionType::Zlib {
        return invalid(
            "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        );
    }
    if opts.backing_file.is_some() {
        if opts.backing_format.is_none() {
            return Err(Error::InvalidArgument("Backing file specified without backing format".into()));
        }
        if opts.preallocation != Preallocation::Off && !opts.extended_l2 {
            return Err(Error::InvalidArgument(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on".into(),
            ));
        }
        if opts.backing_file.as_deref().is_some_and(|n| n.len() > oxqcow_format::limits::MAX_BACKING_NAME as usize) {
            return Err(Error::InvalidArgument("Backing file name too long".into()));
        }
    } else if opts.backing_format.is_some() {
        return Err(Error::InvalidArgument("backing_fmt requires backing_file".into()));
    }
    let order = opts.refcount_bits.trailing_zeros();
    Ok(Geometry::new(cs.trailing_zeros(), order, opts.extended_l2)?)
}

/// Creates the image; a backing file name is recorded but not opened.
pub(crate) fn create_unattached(
    storage: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    opts: &CreateOptions,
) -> Result<Qcow2> {
    let g = validate_create(opts)?;
    if opts.data_file.is_some() != data.is_some() {
        return Err(Error::InvalidArgument(
            "an image with an external data file needs both its name (data_file) and its storage".into(),
        ));
    }
    let size = opts.size.div_ceil(512) * 512;
    let cs = g.cluster_size();
    let st = &*storage;
    empty(st).map_err(Error::io("truncating the new image", 0))?;
    let mut header = Header::new(opts.compat.version(), g, 0);
    header.refcount_table_offset = cs;
    header.refcount_table_clusters = 1;
    if opts.lazy_refcounts {
        header.compatible_features |= compat::LAZY_REFCOUNTS;
    }
    if opts.compression_type == CompressionType::Zstd {
        header.compression_type = 1;
        header.incompatible_features |= incompat::COMPRESSION;
    }
    if let (Some(name), Some(data)) = (&opts.data_file, &data) {
        if name.len() > oxqcow_format::limits::MAX_BACKING_NAME as usize {
            return Err(Error::InvalidArgument(format!("Data file name too long ({} bytes)", name.len())));
        }
        header.incompatible_features |= incompat::DATA_FILE;
        header.extensions.data_file = Some(name.clone());
        if opts.data_file_raw {
            header.autoclear_features |= oxqcow_format::header::autoclear::DATA_FILE_RAW;
        }
        // As QEMU's file driver creates it: the disk's size, the first
        // block allocated (so that later alignment probes find data).
        empty(&**data).map_err(Error::io("truncating the data file", 0))?;
        data.set_len(size).map_err(Error::io("sizing the data file", size))?;
        let first = vec![0u8; size.min(4096) as usize];
        data.write_at(&first, 0).map_err(Error::io("allocating the first block of the data file", 0))?;
    }
    st.write_at(&header.serialize()?, 0).map_err(Error::io("writing the header", 0))?;
    let mut table = vec![0u8; 2 * cs as usize];
    table[..8].copy_from_slice(&encode_entries(&[2 * cs]));
    st.write_at(&table, cs).map_err(Error::io("writing the refcount table", cs))?;

    let image = Qcow2::open_with(storage.clone(), &OpenOptions::new(), None, data.clone())?;
    image.exclusive(|m, st| m.finish_creation(st, opts, size))?;
    // That handle was opened while the disk had size 0, so its L2 cache
    // holds two tables: every write reaching a third table would evict
    // a dirty one, with a sync. Reopen so the caches are sized for the
    // disk, as any later open sizes them.
    image.close()?;
    let mut reopen = if opts.backing_file.is_some() {
        OpenOptions::new().backing(crate::options::BackingPolicy::Ignore)
    } else {
        OpenOptions::new()
    };
    reopen.passphrase = opts.encryption.as_ref().map(|e| e.passphrase.clone());
    Qcow2::open_with(storage, &reopen, None, data)
}
