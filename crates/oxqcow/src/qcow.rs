//! The qcow (version 1) format, read as QEMU's `block/qcow.c` reads it:
//! the header and tables parsed by the format crate
//! (`oxqcow_format::qcow`), unallocated clusters read from the backing
//! file (or as zeros), compressed clusters inflated, AES-encrypted ones
//! decrypted with the passphrase (legacy qcow AES, sectors numbered by
//! guest offset, as qcow2's `crypt_method` 1).
//!
//! oxqcow reads qcow images and converts them; it does not write them.
//! QEMU still writes and creates qcow images (without encryption in its
//! system emulators), but the format has no refcounts, so a crash in the
//! middle of an allocation leaves nothing a checker could find: writes,
//! zero writes, discards and resizes are refused.
//!
//! Memory is bounded whatever the header says: the L1 table is held only
//! as far as it lies inside the file (entries past the end of the file
//! read as zeros, as QEMU's file layer reads them), at most
//! [`MAX_L1_BYTES`], and at most [`L2_CACHE_TABLES`] L2 tables are cached.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use oxqcow_format::limits::{MAX_L1_BYTES, MAX_OFFSET};
use oxqcow_format::qcow::{QcowCluster, QcowHeader, CRYPT_AES, HEADER_SIZE};

use crate::compress::Codec;
use crate::crypt::{Crypt, SECTOR};
use crate::error::{Error, Result};
use crate::extent::{push_extent, Extent};
use crate::image::{BlockDevice, Image};
use crate::options::{BackingPolicy, OpenOptions};
use crate::storage::Storage;

/// L2 tables kept in memory (QEMU's `L2_CACHE_SIZE`).
const L2_CACHE_TABLES: usize = 16;

/// An open qcow image.
pub struct Qcow {
    storage: Arc<dyn Storage>,
    header: QcowHeader,
    backing_file: Option<String>,
    /// The L1 entries that lie inside the file; the others are 0.
    l1: Vec<u64>,
    /// Recently used L2 tables by host offset, most recent last.
    l2_cache: Mutex<VecDeque<(u64, Arc<Vec<u64>>)>>,
    crypt: Option<Crypt>,
    backing: Option<Arc<Image>>,
    read_only: bool,
}

impl std::fmt::Debug for Qcow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow").field("header", &self.header).finish_non_exhaustive()
    }
}

fn unsupported_write() -> Error {
    Error::Unsupported("writing qcow (version 1) images; convert them to qcow2".into())
}

impl Qcow {
    /// Reads and validates the header and the backing file name it
    /// records (`None` when it records none, or an empty one, as QEMU
    /// treats it). No secret is needed.
    pub fn read_header(storage: &dyn Storage) -> Result<(QcowHeader, Option<String>)> {
        let mut buf = [0u8; HEADER_SIZE];
        storage.read_at(&mut buf, 0).map_err(Error::io("reading the qcow header", 0))?;
        let header = QcowHeader::parse(&buf)?;
        if !header.has_backing_file() {
            return Ok((header, None));
        }
        let at = header.backing_file_offset;
        let len = u64::from(header.backing_file_size);
        if at.checked_add(len).is_none_or(|end| end > MAX_OFFSET) {
            return Err(Error::Corrupt(format!(
                "qcow backing file name at offset 0x{at:x} with length {len} lies past the largest file offset"
            )));
        }
        let mut name = vec![0u8; len as usize];
        storage.read_at(&mut name, at).map_err(Error::io("reading the backing file name", at))?;
        // QEMU keeps the name as a C string: it ends at the first NUL.
        if let Some(nul) = name.iter().position(|&b| b == 0) {
            name.truncate(nul);
        }
        if name.is_empty() {
            return Ok((header, None));
        }
        let name = String::from_utf8(name)
            .map_err(|_| Error::Corrupt(format!("qcow backing file name at offset 0x{at:x} is not valid UTF-8")))?;
        Ok((header, Some(name)))
    }

    /// Opens a qcow image whose backing file is `backing`. An image that
    /// names a backing file needs it, unless `opts.backing` is
    /// `BackingPolicy::Ignore` (then its unallocated clusters read as
    /// zeros). An encrypted image needs `opts.passphrase` (QEMU's
    /// `encrypt.key-secret`).
    pub fn open(storage: Arc<dyn Storage>, opts: &OpenOptions, backing: Option<Arc<Image>>) -> Result<Qcow> {
        let (header, backing_file) = Qcow::read_header(&*storage)?;
        if let (Some(name), None) = (&backing_file, &backing) {
            if !matches!(opts.backing, BackingPolicy::Ignore) {
                return Err(Error::InvalidArgument(format!(
                    "the image has a backing file ('{name}'): open it with Image::open or BackingPolicy::Ignore"
                )));
            }
        }
        let crypt = match (header.crypt_method == CRYPT_AES, opts.passphrase.as_deref()) {
            (false, _) => None,
            (true, Some(p)) => Some(Crypt::legacy_aes(p)),
            (true, None) if opts.no_io => Some(Crypt::locked(false)),
            (true, None) => {
                return Err(Error::InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher".into()))
            }
        };
        let l1 = read_l1(&*storage, &header)?;
        Ok(Qcow {
            storage,
            header,
            backing_file,
            l1,
            l2_cache: Mutex::new(VecDeque::new()),
            crypt,
            backing,
            read_only: opts.read_only,
        })
    }

    /// The header.
    pub fn header(&self) -> &QcowHeader {
        &self.header
    }

    /// The backing file name the header records.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_file.as_deref()
    }

    /// The backing image, when the header names one and it was opened.
    pub fn backing(&self) -> Option<&Arc<Image>> {
        self.backing.as_ref()
    }

    /// The host storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Disk size in bytes (whole sectors, as QEMU counts the header's size).
    pub fn len(&self) -> u64 {
        self.header.disk_size()
    }

    /// Whether the disk is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.len();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfBounds { offset, len, size });
        }
        Ok(())
    }

    /// The L2 table at `offset`, through the cache.
    fn l2_table(&self, l1_index: u64, offset: u64) -> Result<Arc<Vec<u64>>> {
        let mut cache = self.l2_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = cache.iter().position(|(o, _)| *o == offset) {
            let entry = cache.remove(i).expect("found");
            let table = entry.1.clone();
            cache.push_back(entry);
            return Ok(table);
        }
        let bytes = self.header.l2_entries() * 8;
        if offset.checked_add(bytes).is_none_or(|end| end > MAX_OFFSET) {
            return Err(Error::Corrupt(format!(
                "qcow L1 entry {l1_index} names an L2 table at offset 0x{offset:x} past the largest file offset"
            )));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.storage.read_at(&mut raw, offset).map_err(Error::io("reading an L2 table", offset))?;
        let table: Arc<Vec<u64>> =
            Arc::new(raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect());
        if cache.len() == L2_CACHE_TABLES {
            cache.pop_front();
        }
        cache.push_back((offset, table.clone()));
        Ok(table)
    }

    /// The L2 table L1 entry `l1_index` names; `None` when it names none
    /// (or lies past the end of the file).
    fn l2_of(&self, l1_index: u64) -> Result<Option<Arc<Vec<u64>>>> {
        match self.l1.get(l1_index as usize).copied().unwrap_or(0) {
            0 => Ok(None),
            offset => self.l2_table(l1_index, offset).map(Some),
        }
    }

    /// What guest offset `guest`'s entry in `table`, its L2 table, maps.
    fn l2_entry(&self, table: &[u64], guest: u64) -> QcowCluster {
        let l2_index = (guest >> self.header.cluster_bits) & (self.header.l2_entries() - 1);
        self.header.cluster(table[l2_index as usize])
    }

    /// What the cluster holding guest offset `guest` is.
    fn cluster(&self, guest: u64) -> Result<QcowCluster> {
        Ok(match self.l2_of(guest / self.header.l1_span())? {
            None => QcowCluster::Unallocated,
            Some(table) => self.l2_entry(&table, guest),
        })
    }

    /// Reads at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let cs = self.header.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = pos % cs;
            let n = (cs - in_cluster).min((buf.len() - done) as u64) as usize;
            let out = &mut buf[done..done + n];
            match self.cluster(pos)? {
                QcowCluster::Unallocated => self.read_unallocated(out, pos)?,
                QcowCluster::Compressed { offset: at, length } => {
                    let cluster = self.inflate(pos, at, length)?;
                    out.copy_from_slice(&cluster[in_cluster as usize..in_cluster as usize + n]);
                }
                QcowCluster::Normal(host) => self.read_normal(out, pos, host, in_cluster)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Unallocated clusters read from the backing file, zeros past its end,
    /// or zeros without one.
    fn read_unallocated(&self, out: &mut [u8], pos: u64) -> Result<()> {
        let Some(backing) = &self.backing else {
            out.fill(0);
            return Ok(());
        };
        let n = backing.len().saturating_sub(pos).min(out.len() as u64) as usize;
        if n > 0 {
            backing.read_at(&mut out[..n], pos)?;
        }
        out[n..].fill(0);
        Ok(())
    }

    fn read_normal(&self, out: &mut [u8], pos: u64, host: u64, in_cluster: u64) -> Result<()> {
        let cs = self.header.cluster_size();
        // QEMU refuses data clusters that are not sector aligned (EIO).
        if host % SECTOR != 0 || host.checked_add(cs).is_none_or(|end| end > MAX_OFFSET) {
            return Err(Error::Corrupt(format!(
                "qcow L2 entry for guest offset 0x{:x} names an invalid data cluster offset 0x{host:x}",
                pos - in_cluster
            )));
        }
        let Some(crypt) = &self.crypt else {
            let at = host + in_cluster;
            return self.storage.read_at(out, at).map_err(Error::io("reading", at));
        };
        // Whole sectors are decrypted; clusters are whole sectors.
        let first = pos / SECTOR * SECTOR;
        let end = (pos + out.len() as u64).div_ceil(SECTOR) * SECTOR;
        let mut sectors = vec![0u8; (end - first) as usize];
        let at = host + (first - (pos - in_cluster));
        self.storage.read_at(&mut sectors, at).map_err(Error::io("reading", at))?;
        crypt.decrypt(&mut sectors, first)?;
        let skip = (pos - first) as usize;
        out.copy_from_slice(&sectors[skip..skip + out.len()]);
        Ok(())
    }

    /// The guest cluster at `pos`, inflated from `length` bytes at `at`.
    fn inflate(&self, pos: u64, at: u64, length: u64) -> Result<Vec<u8>> {
        let cs = self.header.cluster_size();
        let guest = pos - pos % cs;
        if at.checked_add(length).is_none_or(|end| end > MAX_OFFSET) {
            return Err(Error::Corrupt(format!(
                "qcow compressed cluster for guest offset 0x{guest:x} at offset 0x{at:x} lies past the largest \
                 file offset"
            )));
        }
        let mut packed = vec![0u8; length as usize];
        self.storage.read_at(&mut packed, at).map_err(Error::io("reading a compressed cluster", at))?;
        let mut cluster = vec![0u8; cs as usize];
        Codec::Deflate.decompress(&packed, &mut cluster, || {
            format!("qcow compressed cluster for guest offset 0x{guest:x} at offset 0x{at:x}")
        })?;
        Ok(cluster)
    }

    /// Refused: oxqcow does not write qcow images.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.refuse_write(offset, buf.len() as u64)
    }

    /// Refused: oxqcow does not write qcow images.
    pub fn write_zeroes_at(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let _ = may_unmap;
        self.refuse_write(offset, len)
    }

    /// Refused: oxqcow does not write qcow images.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.refuse_write(offset, len)
    }

    fn refuse_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, len)?;
        Err(unsupported_write())
    }

    /// Nothing is ever written.
    pub fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Refused, with QEMU's message: its qcow driver cannot resize images
    /// either.
    pub fn resize(&self) -> Result<()> {
        Err(Error::InvalidArgument("Image format driver does not support resize".into()))
    }

    /// Block status as QEMU's `qcow_co_block_status` reports it: data
    /// clusters with their host offset (none when encrypted or
    /// compressed), unallocated ones from the backing file or as zeros.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check(offset, len)?;
        let cs = self.header.cluster_size();
        let span = self.header.l1_span();
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        // One L1 entry at a time: an unallocated one is a single run (a
        // sparse image of terabytes would otherwise be walked cluster by
        // cluster), an allocated one's L2 table is looked up once.
        while pos < end {
            let l1_index = pos / span;
            let span_end = (l1_index + 1).saturating_mul(span).min(end);
            let Some(table) = self.l2_of(l1_index)? else {
                self.push_status(&mut out, pos, span_end - pos, QcowCluster::Unallocated)?;
                pos = span_end;
                continue;
            };
            while pos < span_end {
                let n = (cs - pos % cs).min(span_end - pos);
                self.push_status(&mut out, pos, n, self.l2_entry(&table, pos))?;
                pos += n;
            }
        }
        Ok(out)
    }

    /// Adds the status of `[pos, pos + n)`, which `cluster` maps (one
    /// cluster or less, or any run of unallocated ones).
    fn push_status(&self, out: &mut Vec<Extent>, pos: u64, n: u64, cluster: QcowCluster) -> Result<()> {
        let in_cluster = pos % self.header.cluster_size();
        let (present, data, compressed, host) = match cluster {
            QcowCluster::Unallocated => (false, false, false, None),
            QcowCluster::Compressed { .. } => (true, true, true, None),
            QcowCluster::Normal(h) => (true, true, false, self.crypt.is_none().then_some(h + in_cluster)),
        };
        if !present && self.backing.is_some() {
            return self.backing_status(out, pos, n);
        }
        let extent =
            Extent { offset: pos, length: n, present, zero: !data, data, compressed, host_offset: host, depth: 0 };
        push_extent(out, extent);
        Ok(())
    }

    /// The backing file's status of an unallocated run (one layer deeper),
    /// zeros past its end.
    fn backing_status(&self, out: &mut Vec<Extent>, pos: u64, n: u64) -> Result<()> {
        let backing = self.backing.as_ref().expect("called with a backing file");
        let inside = backing.len().saturating_sub(pos).min(n);
        if inside > 0 {
            for mut e in backing.block_status(pos, inside)? {
                e.depth += 1;
                push_extent(out, e);
            }
        }
        if inside < n {
            let rest = Extent {
                offset: pos + inside,
                length: n - inside,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                host_offset: None,
                depth: 0,
            };
            push_extent(out, rest);
        }
        Ok(())
    }
}

/// The part of the L1 table that lies inside the file.
fn read_l1(storage: &dyn Storage, header: &QcowHeader) -> Result<Vec<u64>> {
    let at = header.l1_table_offset;
    let bytes = header.l1_entries * 8;
    if at.checked_add(bytes).is_none_or(|end| end > MAX_OFFSET) {
        return Err(Error::Corrupt(format!("qcow L1 table offset invalid (offset 0x{at:x}, {bytes} bytes)")));
    }
    let file_len = storage.len().map_err(Error::io("reading the file length", 0))?;
    let inside = file_len.saturating_sub(at).min(bytes).div_ceil(8) * 8;
    if inside > MAX_L1_BYTES {
        return Err(Error::Unsupported(format!(
            "qcow L1 table of {inside} bytes at offset 0x{at:x} (oxqcow's limit is {MAX_L1_BYTES} bytes)"
        )));
    }
    let mut raw = vec![0u8; inside as usize];
    storage.read_at(&mut raw, at).map_err(Error::io("reading the L1 table", at))?;
    Ok(raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect())
}
