//! The internal snapshot table.
//!
//! Entries are variable length (extra data, id and name follow the fixed
//! part); every length is bounded before it is used.

use crate::error::FormatError;
use crate::limits::{MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES, SNAPSHOT_HEADER_SIZE};

/// One snapshot table entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique id string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (32-bit field).
    pub vm_state_size: u32,
    /// VM state size from the extra data, when present.
    pub vm_state_size_large: Option<u64>,
    /// Guest disk size at creation, when present.
    pub disk_size: Option<u64>,
    /// Instruction count, when present (-1 when not recorded).
    pub icount: Option<u64>,
    /// Extra data beyond the known fields, kept.
    pub unknown_extra: Vec<u8>,
}

/// The parsed table and its size in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotTable {
    /// The entries in table order.
    pub entries: Vec<SnapshotEntry>,
    /// Bytes the table occupies.
    pub byte_size: u64,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl SnapshotEntry {
    /// The VM state size (from the 64-bit field when present).
    pub fn vm_state_bytes(&self) -> u64 {
        self.vm_state_size_large.unwrap_or(u64::from(self.vm_state_size))
    }

    /// Appends the entry as QEMU writes it: fixed part, 24 bytes of known
    /// extra data (VM state size, disk size, instruction count), the extra
    /// data this implementation does not know, id and name, padded to 8.
    /// `default_disk_size` fills in a disk size the entry did not record.
    pub fn write_to(&self, out: &mut Vec<u8>, default_disk_size: u64) -> Result<(), FormatError> {
        let too_long = |what: &str, len: usize| FormatError::InvalidSnapshot {
            index: 0,
            reason: format!("snapshot {what} of {len} bytes is too long"),
        };
        let id_len = u16::try_from(self.id.len()).map_err(|_| too_long("id", self.id.len()))?;
        let name_len = u16::try_from(self.name.len()).map_err(|_| too_long("name", self.name.len()))?;
        let extra_len = 24 + self.unknown_extra.len();
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA as usize {
            return Err(too_long("extra data", extra_len));
        }
        let vm_state = self.vm_state_bytes();
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&u32::try_from(vm_state).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&vm_state.to_be_bytes());
        out.extend_from_slice(&self.disk_size.unwrap_or(default_disk_size).to_be_bytes());
        out.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&self.unknown_extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        Ok(())
    }
}

impl SnapshotTable {
    /// Serialises a table (entries 8-byte aligned, as QEMU lays them out).
    pub fn serialize(entries: &[SnapshotEntry], default_disk_size: u64) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::new();
        for e in entries {
            out.resize(out.len().div_ceil(8) * 8, 0);
            e.write_to(&mut out, default_disk_size)?;
        }
        if out.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(FormatError::InvalidSnapshot {
                index: entries.len() as u32,
                reason: "snapshot table would exceed 64 MiB".into(),
            });
        }
        Ok(out)
    }

    /// Parses `count` entries from `bytes` (the table's bytes, at most
    /// [`MAX_SNAPSHOT_TABLE_BYTES`]).
    pub fn parse(bytes: &[u8], count: u32) -> Result<SnapshotTable, FormatError> {
        let mut entries = Vec::with_capacity(count.min(1024) as usize);
        let mut pos = 0usize;
        for index in 0..count {
            let bad = |reason: String| FormatError::InvalidSnapshot { index, reason };
            let fixed = SNAPSHOT_HEADER_SIZE as usize;
            if pos + fixed > bytes.len() {
                return Err(bad(format!("entry at table offset {pos} runs past the end of the table")));
            }
            let e = &bytes[pos..];
            let l1_table_offset = be64(e, 0);
            let l1_size = be32(e, 8);
            let id_size = be16(e, 12) as usize;
            let name_size = be16(e, 14) as usize;
            let date_sec = be32(e, 16);
            let date_nsec = be32(e, 20);
            let vm_clock_nsec = be64(e, 24);
            let vm_state_size = be32(e, 32);
            let extra_size = be32(e, 36);
            if extra_size > MAX_SNAPSHOT_EXTRA_DATA {
                return Err(bad(format!("extra_data_size {extra_size} exceeds {MAX_SNAPSHOT_EXTRA_DATA}")));
            }
            let extra_size = extra_size as usize;
            let total = fixed + extra_size + id_size + name_size;
            if pos + total > bytes.len() {
                return Err(bad(format!("entry of {total} bytes runs past the end of the table")));
            }
            let extra = &e[fixed..fixed + extra_size];
            let id = String::from_utf8_lossy(&e[fixed + extra_size..fixed + extra_size + id_size]).into_owned();
            let name = String::from_utf8_lossy(&e[fixed + extra_size + id_size..total]).into_owned();
            let field = |at: usize| (extra.len() >= at + 8).then(|| be64(extra, at));
            let unknown_extra = if extra.len() > 24 { extra[24..].to_vec() } else { Vec::new() };
            entries.push(SnapshotEntry {
                l1_table_offset,
                l1_size,
                id,
                name,
                date_sec,
                date_nsec,
                vm_clock_nsec,
                vm_state_size,
                vm_state_size_large: field(0),
                disk_size: field(8),
                icount: field(16),
                unknown_extra,
            });
            pos += total.div_ceil(8) * 8;
            if pos as u64 > MAX_SNAPSHOT_TABLE_BYTES {
                return Err(bad("snapshot table exceeds 64 MiB".into()));
            }
        }
        Ok(SnapshotTable { entries, byte_size: pos as u64 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, name: &str, extra: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&0x50000u64.to_be_bytes());
        e.extend_from_slice(&2u32.to_be_bytes());
        e.extend_from_slice(&(id.len() as u16).to_be_bytes());
        e.extend_from_slice(&(name.len() as u16).to_be_bytes());
        e.extend_from_slice(&[0; 20]);
        e.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        e.extend_from_slice(extra);
        e.extend_from_slice(id.as_bytes());
        e.extend_from_slice(name.as_bytes());
        e.resize(e.len().div_ceil(8) * 8, 0);
        e
    }

    #[test]
    fn parses_entries() {
        let mut extra = Vec::new();
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&(1u64 << 30).to_be_bytes());
        let mut t = entry("1", "snap", &extra);
        t.extend(entry("2", "other", &[]));
        let table = SnapshotTable::parse(&t, 2).unwrap();
        assert_eq!(table.entries[0].disk_size, Some(1 << 30));
        assert_eq!(table.entries[0].icount, None);
        assert_eq!(table.entries[1].name, "other");
        assert_eq!(table.byte_size, t.len() as u64);
    }

    #[test]
    fn serialize_roundtrip() {
        let mut extra = Vec::new();
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&(1u64 << 30).to_be_bytes());
        extra.extend_from_slice(&7u64.to_be_bytes());
        extra.extend_from_slice(b"futurefield!");
        let mut t = entry("1", "snap", &extra);
        t.extend(entry("22", "other name", &[]));
        let table = SnapshotTable::parse(&t, 2).unwrap();
        assert_eq!(table.entries[0].unknown_extra, b"futurefield!");
        let bytes = SnapshotTable::serialize(&table.entries, 5 << 20).unwrap();
        let again = SnapshotTable::parse(&bytes, 2).unwrap();
        assert_eq!(again.entries[0], table.entries[0]);
        // The entry without extra data gets QEMU's defaults written.
        assert_eq!(again.entries[1].disk_size, Some(5 << 20));
        assert_eq!(again.entries[1].icount, Some(u64::MAX));
        assert_eq!(again.entries[1].name, "other name");
    }

    #[test]
    fn rejects_overruns() {
        let t = entry("1", "snap", &[]);
        assert!(SnapshotTable::parse(&t, 2).is_err());
        assert!(SnapshotTable::parse(&t[..20], 1).is_err());
        let mut big = entry("1", "x", &[]);
        big[36..40].copy_from_slice(&2000u32.to_be_bytes());
        assert!(SnapshotTable::parse(&big, 1).is_err());
    }
}
