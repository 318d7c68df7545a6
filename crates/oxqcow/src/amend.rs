//! Changing an existing image's options (`qemu-img amend`): compatibility
//! level in both directions (expanding zero clusters, also in snapshots, on
//! the way down), lazy refcounts, refcount width, and size.
//!
//! Steps run in QEMU's order: upgrade first, then refcount width, lazy
//! refcounts and size, downgrade last, so that a downgrade sees the final
//! state and can refuse what version 2 cannot express.

use std::collections::HashSet;

use oxqcow_format::header::{autoclear, incompat};
use oxqcow_format::table::{decode_entries, write_l2_word, L1Entry, COPIED};
use oxqcow_format::{HostOffset, L2Entry, L2Mapping};

use crate::error::{Error, Result};
use crate::options::{parse_bool, parse_option_list, parse_size, Compat, Preallocation};
use crate::qcow2::{Meta, Qcow2};
use crate::storage::Storage;

/// The options `amend` may change. `None` leaves a setting as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// Compatibility level.
    pub compat: Option<Compat>,
    /// Lazy refcounts.
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits.
    pub refcount_bits: Option<u32>,
    /// New guest size.
    pub size: Option<u64>,
    /// Backing file: may only repeat the current one (use rebase to change it).
    pub backing_file: Option<String>,
    /// Backing format: may only repeat the current one.
    pub backing_format: Option<String>,
}

/// Options qemu-img accepts at creation only.
const CREATE_ONLY: &[&str] =
    &["cluster_size", "preallocation", "extended_l2", "compression_type", "encryption", "encrypt.format"];

impl AmendOptions {
    /// Parses a QEMU option string (`compat=0.10,lazy_refcounts=off`).
    pub fn parse(s: &str) -> Result<AmendOptions> {
        let mut o = AmendOptions::default();
        for (k, v) in parse_option_list(s)? {
            match k.as_str() {
                "compat" => {
                    o.compat = Some(match v.as_str() {
                        "0.10" | "v2" => Compat::V2,
                        "1.1" | "v3" => Compat::V3,
                        other => return Err(Error::InvalidArgument(format!("Unknown compatibility level {other}"))),
                    })
                }
                "lazy_refcounts" => o.lazy_refcounts = Some(parse_bool(&k, &v)?),
                "refcount_bits" => {
                    let bits: u32 = v.parse().map_err(|_| {
                        Error::InvalidArgument(format!("Parameter 'refcount_bits' expects a number, got '{v}'"))
                    })?;
                    if bits == 0 || bits > 64 || !bits.is_power_of_two() {
                        return Err(Error::InvalidArgument(
                            "Refcount width must be a power of two and may not exceed 64 bits".into(),
                        ));
                    }
                    o.refcount_bits = Some(bits);
                }
                "size" => o.size = Some(parse_size(&v)?),
                "backing_file" => o.backing_file = Some(v),
                "backing_fmt" => o.backing_format = Some(v),
                key if CREATE_ONLY.contains(&key) => {
                    return Err(Error::InvalidArgument(format!(
                        "Invalid parameter '{key}'\nThis option is only supported for image creation"
                    )))
                }
                key => return Err(Error::InvalidArgument(format!("Invalid parameter '{key}'"))),
            }
        }
        Ok(o)
    }
}

impl Qcow2 {
    /// Changes the image's options. `progress(done, total)` reports work.
    pub fn amend(&self, opts: &AmendOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        self.exclusive(|m, st| {
            let res = m.amend(st, opts, progress);
            // Also after a failure: an upgrade may have succeeded before it.
            self.refresh_header_facts(m);
            res
        })?;
        if let Some(size) = opts.size {
            if size != self.len() {
                self.resize(size, Preallocation::Off)?;
            }
        }
        Ok(())
    }
}

impl Meta {
    fn amend(&mut self, storage: &dyn Storage, opts: &AmendOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let old_version = self.header.version;
        let new_version = opts.compat.map_or(old_version, Compat::version);
        let bits = opts.refcount_bits.unwrap_or(self.geometry.refcount_bits());
        if new_version < 3 && bits != 16 {
            return Err(Error::InvalidArgument(if bits != self.geometry.refcount_bits() {
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
                    .into()
            } else {
                "compat=0.10 requires refcount_bits=16".into()
            }));
        }
        if opts.lazy_refcounts == Some(true) && new_version < 3 {
            return Err(Error::InvalidArgument(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"
                    .into(),
            ));
        }
        if opts.backing_file.is_some() || opts.backing_format.is_some() {
            let same = opts.backing_file.as_deref().is_none_or(|b| Some(b) == self.header.backing_file.as_deref())
                && opts
                    .backing_format
                    .as_deref()
                    .is_none_or(|f| Some(f) == self.header.extensions.backing_format.as_deref());
            if !same {
                return Err(Error::InvalidArgument(
                    "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
                ));
            }
        }
        progress(0, 100);
        if new_version > old_version {
            // v3 snapshot entries need the 64-bit VM state and disk size,
            // which the table writer always includes.
            self.header.version = 3;
            self.header.header_length = oxqcow_format::limits::V3_HEADER_LENGTH;
            if self.snapshots.entries.iter().any(|s| s.disk_size.is_none() || s.vm_state_size_large.is_none()) {
                let mut entries = self.snapshots.entries.clone();
                for e in &mut entries {
                    e.disk_size.get_or_insert(self.header.size);
                    e.vm_state_size_large.get_or_insert(u64::from(e.vm_state_size));
                }
                self.write_snapshot_table(storage, entries)?;
            }
            self.write_header(storage)?;
            storage.sync().map_err(Error::io("syncing the header", 0))?;
        }
        progress(25, 100);
        if bits != self.geometry.refcount_bits() {
            crate::check::rebuild_refcounts_with_order(self, storage, bits.trailing_zeros())?;
        }
        progress(50, 100);
        if let Some(lazy) = opts.lazy_refcounts {
            if lazy != self.header.lazy_refcounts() {
                if lazy {
                    self.header.compatible_features |= oxqcow_format::header::compat::LAZY_REFCOUNTS;
                } else {
                    self.make_clean(storage)?;
                    self.header.compatible_features &= !oxqcow_format::header::compat::LAZY_REFCOUNTS;
                }
                self.lazy_refcounts = lazy;
                self.write_header(storage)?;
                storage.sync().map_err(Error::io("syncing the header", 0))?;
            }
        }
        progress(75, 100);
        if new_version < old_version {
            self.downgrade(storage)?;
        }
        progress(100, 100);
        Ok(())
    }

    /// Writes all metadata and clears the dirty bit.
    fn make_clean(&mut self, storage: &dyn Storage) -> Result<()> {
        self.flush_all(storage)?;
        if self.header.is_dirty() {
            self.header.incompatible_features &= !incompat::DIRTY;
            self.write_header(storage)?;
            storage.sync().map_err(Error::io("syncing the header", 0))?;
        }
        Ok(())
    }

    fn downgrade(&mut self, storage: &dyn Storage) -> Result<()> {
        if self.geometry.refcount_bits() != 16 {
            return Err(Error::Unsupported("compat=0.10 requires refcount_bits=16".into()));
        }
        if self.header.has_data_file() {
            return Err(Error::Unsupported("Cannot downgrade an image with a data file".into()));
        }
        if self
            .snapshots
            .entries
            .iter()
            .any(|s| s.vm_state_bytes() > u64::from(u32::MAX) || s.disk_size.is_some_and(|d| d != self.header.size))
        {
            return Err(Error::Unsupported("Internal snapshots prevent downgrade of image".into()));
        }
        self.make_clean(storage)?;
        let blocking = self.header.incompatible_features & !incompat::COMPRESSION;
        if blocking != 0 {
            return Err(Error::Unsupported(format!(
                "Cannot downgrade an image with incompatible features 0x{blocking:x} set"
            )));
        }
        // The image is clean now: expand with ordered flushes (refcounts
        // before the tables that need them), not in lazy-refcount mode,
        // which would write the tables first with the dirty bit clear.
        let lazy = std::mem::replace(&mut self.lazy_refcounts, false);
        if let Err(e) = self.expand_zero_clusters(storage) {
            self.lazy_refcounts = lazy;
            return Err(e);
        }
        if self.header.incompatible_features & incompat::COMPRESSION != 0 {
            if self.has_compressed_clusters(storage)? {
                self.lazy_refcounts = lazy;
                return Err(Error::Unsupported(
                    "Cannot downgrade an image with zstd compression type and existing compressed clusters".into(),
                ));
            }
            self.header.incompatible_features &= !incompat::COMPRESSION;
            self.header.compression_type = 0;
        }
        self.header.compatible_features = 0;
        self.header.autoclear_features &= !autoclear::KNOWN;
        self.lazy_refcounts = false;
        self.header.version = 2;
        self.write_header(storage)?;
        storage.sync().map_err(Error::io("syncing the header", 0))
    }

    fn has_compressed_clusters(&mut self, storage: &dyn Storage) -> Result<bool> {
        let g = self.geometry;
        for i in 0..self.l1.len() as u64 {
            let Some(table) = self.l2_offset(i)? else { continue };
            self.load_l2(storage, table)?;
            for j in 0..g.l2_entries() as usize {
                if self.l2_entry(table, j).is_compressed() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Replaces every zero cluster (active layer and snapshots) by what
    /// version 2 can say: an allocated zero cluster gets zeros written and
    /// keeps its cluster; a plain one becomes unallocated, or, over a
    /// backing file, a new cluster of zeros.
    fn expand_zero_clusters(&mut self, storage: &dyn Storage) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut trees: Vec<Vec<u64>> = vec![self.l1.clone()];
        for s in self.snapshots.entries.clone() {
            let bytes = u64::from(s.l1_size) * 8;
            let mut buf = vec![0u8; bytes as usize];
            storage
                .read_at(&mut buf, s.l1_table_offset)
                .map_err(Error::io("reading a snapshot L1 table", s.l1_table_offset))?;
            trees.push(decode_entries(&buf));
        }
        let zeros = vec![0u8; cs as usize];
        let mut seen = HashSet::new();
        for l1 in trees {
            for &raw in &l1 {
                let Some(table) = L1Entry(raw).l2_offset() else { continue };
                if !seen.insert(table.0) {
                    continue;
                }
                let sharers = self.refcounts.get(storage, g.host_cluster(table))?;
                self.load_l2(storage, table.0)?;
                for j in 0..g.l2_entries() as usize {
                    let entry = self.l2_entry(table.0, j);
                    if entry.is_compressed() || entry.0 & oxqcow_format::table::ZERO == 0 {
                        continue;
                    }
                    let new = match self.decode(entry, table.0, j)? {
                        L2Mapping::ZeroAllocated { host, .. } => {
                            storage.write_at(&zeros, host.0).map_err(Error::io("writing zeros", host.0))?;
                            L2Entry(entry.0 & !oxqcow_format::table::ZERO)
                        }
                        L2Mapping::ZeroPlain if !self.has_backing => L2Entry::UNALLOCATED,
                        L2Mapping::ZeroPlain => {
                            let host = self.alloc_clusters(storage, 1)?;
                            // Every L1 sharing this table references the new cluster.
                            for _ in 1..sharers {
                                self.refcounts.update(storage, g.host_cluster(HostOffset(host)), 1)?;
                            }
                            storage.write_at(&zeros, host).map_err(Error::io("writing zeros", host))?;
                            L2Entry(host | if sharers == 1 { COPIED } else { 0 })
                        }
                        _ => continue,
                    };
                    self.load_l2(storage, table.0)?;
                    let data = self.l2.get_mut(table.0).expect("loaded");
                    write_l2_word(data, j, g.l2_entry_size() as usize, new.0);
                }
            }
        }
        self.flush_all(storage)
    }
}
