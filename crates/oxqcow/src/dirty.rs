//! An in-memory dirty bitmap: one bit per `granularity` guest bytes, kept in
//! chunks of one cluster of serialized bitmap data each.
//!
//! The chunking follows the bitmap table: chunk `i` is what table entry `i`
//! stores, so loading and storing move whole chunks, and a chunk that is all
//! zeros or all ones (as the table can say without a data cluster) costs no
//! memory. Memory therefore grows with the parts of the disk written, not
//! with the disk size, and what an image on disk makes us allocate is
//! bounded by the data clusters it actually holds.

#[derive(Clone, Debug, PartialEq, Eq)]
enum Chunk {
    Zeros,
    Ones,
    Bits(Box<[u64]>),
}

/// A dirty bitmap over a guest disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    len: u64,
    granularity_bits: u8,
    /// Bits per chunk: the bits of one cluster of serialized data.
    chunk_bits: u64,
    chunks: Vec<Chunk>,
}

impl DirtyBitmap {
    /// An empty bitmap over `len` guest bytes, one bit per
    /// `1 << granularity_bits` bytes, chunked for clusters of `cluster_size`.
    pub fn new(len: u64, granularity_bits: u8, cluster_size: u64) -> Self {
        let chunk_bits = cluster_size * 8;
        let bits = len.div_ceil(1u64 << granularity_bits);
        let n = bits.div_ceil(chunk_bits) as usize;
        DirtyBitmap { len, granularity_bits, chunk_bits, chunks: vec![Chunk::Zeros; n] }
    }

    /// Guest bytes covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes one bit covers.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// log2 of [`granularity`](Self::granularity).
    pub fn granularity_bits(&self) -> u8 {
        self.granularity_bits
    }

    fn total_bits(&self) -> u64 {
        self.len.div_ceil(self.granularity())
    }

    /// Bits chunk `i` holds (the last one may be short).
    fn bits_in(&self, i: usize) -> u64 {
        (self.total_bits() - i as u64 * self.chunk_bits).min(self.chunk_bits)
    }

    /// Number of chunks (= bitmap table entries).
    pub(crate) fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Marks every bit covering a byte of `[offset, offset + len)` dirty.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        let end = (offset.saturating_add(len)).min(self.len);
        if offset >= end {
            return;
        }
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        let mut bit = first;
        while bit <= last {
            let ci = (bit / self.chunk_bits) as usize;
            let chunk_start = ci as u64 * self.chunk_bits;
            let stop = last.min(chunk_start + self.chunk_bits - 1);
            let n = self.bits_in(ci);
            let chunk = &mut self.chunks[ci];
            if *chunk == Chunk::Zeros {
                *chunk = Chunk::Bits(vec![0u64; n.div_ceil(64) as usize].into_boxed_slice());
            }
            if let Chunk::Bits(words) = chunk {
                for b in (bit - chunk_start)..=(stop - chunk_start) {
                    words[(b / 64) as usize] |= 1 << (b % 64);
                }
            }
            bit = stop + 1;
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.chunks.iter_mut().for_each(|c| *c = Chunk::Zeros);
    }

    /// Whether the bit covering guest byte `offset` is set.
    pub fn get(&self, offset: u64) -> bool {
        if offset >= self.len {
            return false;
        }
        let bit = offset >> self.granularity_bits;
        let ci = (bit / self.chunk_bits) as usize;
        let b = bit % self.chunk_bits;
        match &self.chunks[ci] {
            Chunk::Zeros => false,
            Chunk::Ones => true,
            Chunk::Bits(w) => w[(b / 64) as usize] >> (b % 64) & 1 != 0,
        }
    }

    /// Dirty guest byte ranges `(offset, length)`, in order and merged,
    /// clipped to the disk.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let g = self.granularity();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |first_bit: u64, count: u64| {
            let start = first_bit * g;
            let end = ((first_bit + count) * g).min(self.len);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 = end - last.0,
                _ => out.push((start, end - start)),
            }
        };
        for (ci, chunk) in self.chunks.iter().enumerate() {
            let base = ci as u64 * self.chunk_bits;
            match chunk {
                Chunk::Zeros => {}
                Chunk::Ones => push(base, self.bits_in(ci)),
                Chunk::Bits(words) => {
                    for (wi, &w) in words.iter().enumerate() {
                        let mut w = w;
                        while w != 0 {
                            let start = w.trailing_zeros() as u64;
                            let run = (w >> start).trailing_ones() as u64;
                            push(base + wi as u64 * 64 + start, run);
                            w = if start + run >= 64 { 0 } else { w & !(((1u64 << run) - 1) << start) };
                        }
                    }
                }
            }
        }
        out
    }

    /// `[offset, offset + len)` (clipped to the disk) as runs of
    /// `(length, dirty)`, merged, covering the range exactly.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.len);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let dirty = self.get(pos);
            let ci = ((pos >> self.granularity_bits) / self.chunk_bits) as usize;
            // A whole chunk without bits (or all ones) is one run.
            let step_end = match &self.chunks[ci] {
                Chunk::Zeros | Chunk::Ones => ((ci as u64 + 1) * self.chunk_bits) << self.granularity_bits,
                Chunk::Bits(_) => ((pos >> self.granularity_bits) + 1) << self.granularity_bits,
            };
            let next = step_end.min(end);
            match out.last_mut() {
                Some(last) if last.1 == dirty => last.0 += next - pos,
                _ => out.push((next - pos, dirty)),
            }
            pos = next;
        }
        out
    }

    /// Number of dirty guest bytes (QEMU's `count`: dirty bits times the
    /// granularity, the last bit clipped to the disk).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_ranges().iter().map(|r| r.1).sum()
    }

    /// Sets every bit that is set in `other` (any granularity, same size).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (o, l) in other.dirty_ranges() {
            self.set_range(o, l);
        }
    }

    /// Changes the covered size: bits of the kept part stay, new bits are clear.
    pub fn resize(&mut self, new_len: u64, cluster_size: u64) {
        let mut fresh = DirtyBitmap::new(new_len, self.granularity_bits, cluster_size);
        for (o, l) in self.dirty_ranges() {
            fresh.set_range(o, l);
        }
        *self = fresh;
    }

    /// Chunk `i` as stored: `None` when it is all zeros (no data cluster),
    /// else the cluster of serialized bits (little-endian bit order, zero
    /// padded), as QEMU's serialization writes it.
    pub(crate) fn chunk_bytes(&self, i: usize, cluster_size: usize) -> Option<Vec<u8>> {
        let words: std::borrow::Cow<'_, [u64]> = match &self.chunks[i] {
            Chunk::Zeros => return None,
            Chunk::Bits(w) if w.iter().all(|&x| x == 0) => return None,
            Chunk::Bits(w) => std::borrow::Cow::Borrowed(w),
            Chunk::Ones => {
                let n = self.bits_in(i);
                let mut w = vec![u64::MAX; n.div_ceil(64) as usize];
                if n % 64 != 0 {
                    *w.last_mut().expect("at least one word") = (1u64 << (n % 64)) - 1;
                }
                std::borrow::Cow::Owned(w)
            }
        };
        let mut out = vec![0u8; cluster_size];
        for (wi, w) in words.iter().enumerate() {
            out[wi * 8..wi * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        Some(out)
    }

    /// Loads chunk `i` from its table entry's meaning.
    pub(crate) fn set_chunk_ones(&mut self, i: usize) {
        self.chunks[i] = Chunk::Ones;
    }

    /// Loads chunk `i` from a cluster of serialized bits; bits past the end
    /// of the disk are ignored.
    pub(crate) fn set_chunk_bytes(&mut self, i: usize, data: &[u8]) {
        let n = self.bits_in(i);
        let mut words: Vec<u64> = (0..n.div_ceil(64) as usize)
            .map(|wi| u64::from_le_bytes(data[wi * 8..wi * 8 + 8].try_into().expect("8 bytes")))
            .collect();
        if n % 64 != 0 {
            *words.last_mut().expect("at least one word") &= (1u64 << (n % 64)) - 1;
        }
        self.chunks[i] =
            if words.iter().all(|&w| w == 0) { Chunk::Zeros } else { Chunk::Bits(words.into_boxed_slice()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_trip_through_chunks() {
        let cs = 512u64;
        // 4096 bits per chunk at 512 B clusters; 64 KiB granularity.
        let mut b = DirtyBitmap::new(1 << 30, 16, cs);
        assert_eq!(b.chunk_count(), 4);
        b.set_range(0, 1);
        b.set_range(100 << 16, 3 << 16);
        b.set_range((4096 << 16) - 1, 2);
        assert_eq!(b.dirty_ranges(), vec![(0, 1 << 16), (100 << 16, 3 << 16), (4095 << 16, 2 << 16)]);
        let mut c = DirtyBitmap::new(1 << 30, 16, cs);
        for i in 0..b.chunk_count() {
            if let Some(bytes) = b.chunk_bytes(i, cs as usize) {
                assert_eq!(bytes.len(), cs as usize);
                c.set_chunk_bytes(i, &bytes);
            }
        }
        assert_eq!(c.dirty_ranges(), b.dirty_ranges());
        assert_eq!(b.chunk_bytes(0, cs as usize).unwrap()[0], 1);
        assert!(b.chunk_bytes(2, cs as usize).is_none());
    }

    #[test]
    fn ones_chunks_serialize_only_bits_inside_the_disk() {
        let mut b = DirtyBitmap::new(100 << 16, 16, 512);
        b.set_chunk_ones(0);
        let bytes = b.chunk_bytes(0, 512).unwrap();
        assert_eq!(&bytes[..12], &[0xff; 12]);
        assert_eq!(bytes[12], 0x0f);
        assert!(bytes[13..].iter().all(|&x| x == 0));
        assert_eq!(b.dirty_bytes(), 100 << 16);
    }

    #[test]
    fn extents_cover_the_range() {
        let mut b = DirtyBitmap::new(1 << 20, 16, 512);
        b.set_range(3 << 16, 1);
        assert_eq!(b.extents(0, 1 << 20), vec![(3 << 16, false), (1 << 16, true), (12 << 16, false)]);
        assert_eq!(b.extents(100, 200), vec![(200, false)]);
        assert_eq!(b.extents((3 << 16) + 5, 1 << 30), vec![((1 << 16) - 5, true), (12 << 16, false)]);
    }

    #[test]
    fn merge_and_resize() {
        let mut a = DirtyBitmap::new(1 << 20, 16, 65536);
        let mut b = DirtyBitmap::new(1 << 20, 17, 65536);
        b.set_range(3 << 16, 1);
        a.merge(&b);
        assert_eq!(a.dirty_ranges(), vec![(2 << 16, 2 << 16)]);
        a.resize(3 << 16, 65536);
        assert_eq!(a.dirty_ranges(), vec![(2 << 16, 1 << 16)]);
        a.set_range(0, 10 << 20);
        assert_eq!(a.dirty_bytes(), 3 << 16);
    }
}
