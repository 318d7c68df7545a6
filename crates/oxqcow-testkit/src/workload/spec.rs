//! Generated operations: where to act as a fraction of the disk (biased
//! towards sector and cluster boundaries), resolved into concrete [`Op`]s
//! against the disk size when they run.

use proptest::prelude::*;

use oxqcow::{Compat, Preallocation};

use crate::model::{AmendOp, Op};

/// Where an operation starts, relative to the disk size.
#[derive(Clone, Copy, Debug)]
pub struct Pos {
    /// Position as a fraction of the disk size, in 1/65536.
    pub frac: u16,
    /// 0: any byte; 1: sector aligned; 2: cluster aligned; 3: just before
    /// a cluster boundary.
    pub align: u8,
}

/// How long an operation is.
#[derive(Clone, Copy, Debug)]
pub enum Len {
    /// A few bytes (0 to 1999).
    Bytes(u16),
    /// About `n + 1` clusters, give or take `delta` bytes.
    Clusters(u8, i16),
    /// Up to the end of the disk.
    ToEnd,
}

/// An operation to generate; resolved with [`OpSpec::resolve`].
#[derive(Clone, Copy, Debug)]
pub enum OpSpec {
    /// A write.
    Write(Pos, Len, u8),
    /// A compressed write of 1 to 3 whole clusters (the cluster at the
    /// position, aligned down) with a seed.
    WriteCompressed(Pos, u8, u8),
    /// A zero write.
    WriteZeroes(Pos, Len, bool),
    /// A discard.
    Discard(Pos, Len),
    /// A flush.
    Flush,
    /// A resize to a fraction of the largest size (in 1/65536), cluster
    /// aligned unless the flag says sector aligned; a grow preallocates
    /// as the last field selects (0 off, 1 metadata, 2 falloc, 3 full).
    Resize(u16, bool, u8),
    /// Close and reopen.
    Reopen,
    /// Reopen a copy taken after a flush, without closing.
    CrashReopen,
    /// Create a snapshot.
    SnapshotCreate,
    /// Revert to a snapshot.
    SnapshotApply(u8),
    /// Delete a snapshot.
    SnapshotDelete(u8),
    /// Amend one option: the first field picks which (compat 0.10 or 1.1,
    /// refcount width, lazy refcounts, size), the second its value.
    Amend(u8, u16),
}

/// Refcount widths amend may pick (16 twice: it is the only width
/// compat 0.10 has).
pub const REFCOUNT_WIDTHS: [u32; 8] = [1, 2, 4, 8, 16, 16, 32, 64];

impl OpSpec {
    /// The concrete operation on a disk of `size` bytes (at least 512)
    /// with clusters of `cs` bytes, growing to at most `max_size`.
    pub fn resolve(&self, size: u64, cs: u64, max_size: u64) -> Op {
        let place = |pos: Pos, len: Len| -> (u64, u64) {
            let base = u64::from(pos.frac) * size / 65536;
            let offset = match pos.align {
                0 => base,
                1 => base / 512 * 512,
                2 => base / cs * cs,
                _ => (base / cs * cs + cs).saturating_sub(1 + u64::from(pos.frac % 7)),
            }
            .min(size - 1);
            let room = size - offset;
            let len = match len {
                Len::Bytes(n) => u64::from(n % 2000),
                Len::Clusters(n, delta) => {
                    ((u64::from(n % 4) + 1) * cs).saturating_add_signed(i64::from(delta % 200)).max(1)
                }
                Len::ToEnd => room,
            };
            (offset, len.min(room))
        };
        match *self {
            OpSpec::Write(p, l, seed) => {
                let (offset, len) = place(p, l);
                Op::Write { offset, len, seed }
            }
            OpSpec::WriteCompressed(p, n, seed) => {
                let offset = (u64::from(p.frac) * size / 65536 / cs * cs).min((size - 1) / cs * cs);
                let len = ((u64::from(n % 3) + 1) * cs).min(size - offset);
                Op::WriteCompressed { offset, len, seed }
            }
            OpSpec::WriteZeroes(p, l, may_unmap) => {
                let (offset, len) = place(p, l);
                Op::WriteZeroes { offset, len, may_unmap }
            }
            OpSpec::Discard(p, l) => {
                let (offset, len) = place(p, l);
                Op::Discard { offset, len }
            }
            OpSpec::Flush => Op::Flush,
            OpSpec::Resize(frac, sector_aligned, mode) => {
                let raw = u64::from(frac) * max_size / 65536;
                let unit = if sector_aligned { 512 } else { cs };
                let new = (raw.div_ceil(unit) * unit).clamp(512, max_size);
                let prealloc = match mode % 4 {
                    _ if new <= size => Preallocation::Off,
                    1 => Preallocation::Metadata,
                    2 => Preallocation::Falloc,
                    3 => Preallocation::Full,
                    _ => Preallocation::Off,
                };
                Op::Resize { size: new, prealloc }
            }
            OpSpec::Reopen => Op::Reopen,
            OpSpec::CrashReopen => Op::CrashReopen,
            OpSpec::SnapshotCreate => Op::SnapshotCreate,
            OpSpec::SnapshotApply(i) => Op::SnapshotApply(i),
            OpSpec::SnapshotDelete(i) => Op::SnapshotDelete(i),
            // Downgrades are the most involved amend and succeed only
            // under conditions (16-bit refcounts, ...): 3 amends in 8.
            OpSpec::Amend(kind, v) => Op::Amend(match kind % 8 {
                0..=2 => AmendOp::Compat(Compat::V2),
                3 => AmendOp::Compat(Compat::V3),
                4 | 5 => AmendOp::RefcountBits(REFCOUNT_WIDTHS[usize::from(v) % REFCOUNT_WIDTHS.len()]),
                6 => AmendOp::LazyRefcounts(v % 2 == 0),
                _ => {
                    let raw = u64::from(v) * max_size / 65536;
                    AmendOp::Size((raw.div_ceil(512) * 512).clamp(512, max_size))
                }
            }),
        }
    }
}

fn pos() -> impl Strategy<Value = Pos> {
    (any::<u16>(), 0u8..4).prop_map(|(frac, align)| Pos { frac, align })
}

fn len() -> impl Strategy<Value = Len> {
    prop_oneof![
        3 => any::<u16>().prop_map(Len::Bytes),
        4 => (any::<u8>(), any::<i16>()).prop_map(|(n, d)| Len::Clusters(n, d)),
        1 => Just(Len::ToEnd),
    ]
}

/// One random operation; writes dominate so images fill up.
pub fn op_spec() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        10 => (pos(), len(), any::<u8>()).prop_map(|(p, l, s)| OpSpec::Write(p, l, s)),
        4 => (pos(), any::<u8>(), any::<u8>()).prop_map(|(p, n, s)| OpSpec::WriteCompressed(p, n, s)),
        3 => (pos(), len(), any::<bool>()).prop_map(|(p, l, u)| OpSpec::WriteZeroes(p, l, u)),
        3 => (pos(), len()).prop_map(|(p, l)| OpSpec::Discard(p, l)),
        2 => Just(OpSpec::Flush),
        2 => (any::<u16>(), any::<bool>(), any::<u8>()).prop_map(|(f, s, p)| OpSpec::Resize(f, s, p)),
        1 => Just(OpSpec::Reopen),
        1 => Just(OpSpec::CrashReopen),
        1 => Just(OpSpec::SnapshotCreate),
        1 => any::<u8>().prop_map(OpSpec::SnapshotApply),
        1 => any::<u8>().prop_map(OpSpec::SnapshotDelete),
        3 => (any::<u8>(), any::<u16>()).prop_map(|(k, v)| OpSpec::Amend(k, v)),
    ]
}

/// One operation that builds a backing file: writes (plain and
/// compressed), zero writes and discards.
pub fn backing_op_spec() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        4 => (pos(), len(), any::<u8>()).prop_map(|(p, l, s)| OpSpec::Write(p, l, s)),
        2 => (pos(), any::<u8>(), any::<u8>()).prop_map(|(p, n, s)| OpSpec::WriteCompressed(p, n, s)),
        1 => (pos(), len(), any::<bool>()).prop_map(|(p, l, u)| OpSpec::WriteZeroes(p, l, u)),
        1 => (pos(), len()).prop_map(|(p, l)| OpSpec::Discard(p, l)),
    ]
}

/// One operation for images with extended L2 entries (what the
/// subcluster model covers): writes (many small and unaligned ones), zero
/// writes, discards, flushes and reopens.
pub fn extended_l2_op_spec() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        10 => (pos(), len(), any::<u8>()).prop_map(|(p, l, s)| OpSpec::Write(p, l, s)),
        4 => (pos(), len(), any::<bool>()).prop_map(|(p, l, u)| OpSpec::WriteZeroes(p, l, u)),
        3 => (pos(), len()).prop_map(|(p, l)| OpSpec::Discard(p, l)),
        2 => Just(OpSpec::Flush),
        1 => Just(OpSpec::Reopen),
        1 => Just(OpSpec::CrashReopen),
    ]
}

/// A sequence of up to `max` operations.
pub fn op_specs(max: usize) -> impl Strategy<Value = Vec<OpSpec>> {
    prop::collection::vec(op_spec(), 1..=max)
}
