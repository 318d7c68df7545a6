//! Zero detection inside data chunks, as qemu-img's `is_allocated_sectors`
//! and `is_allocated_sectors_min` do it: runs of zero sectors, their ends
//! moved to the write alignment, and short zero runs kept inside a write.

use super::SECTOR;

/// qemu-img's write alignment for zero detection, in bytes: the sparse size
/// rounded down to a power of two, at least one sector.
pub(super) fn alignment(min_sparse: u64) -> u64 {
    let sectors = min_sparse / SECTOR;
    let pow2 = if sectors == 0 { 1 } else { 1u64 << (63 - sectors.leading_zeros()) };
    pow2.max(1) * SECTOR
}

/// qemu-img's `is_allocated_sectors`: the length of the run of sectors
/// starting `buf` that are all zero or all nonzero, and whether it is data.
/// Run ends are moved to `align` boundaries (in sectors) where that avoids a
/// read-modify-write of a partial block: a short zero run that ends
/// unaligned becomes data, and a data run is extended to the next boundary.
fn allocated_sectors(buf: &[u8], n: u64, sector_num: u64, align: u64) -> (bool, u64) {
    if n == 0 {
        return (false, 0);
    }
    let sector = |i: u64| &buf[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
    let mut zero = is_zero(sector(0));
    let mut i = 1;
    while i < n && is_zero(sector(i)) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, i);
    }
    let tail = (sector_num + i) & (align - 1);
    if tail != 0 {
        if zero && i <= tail {
            // The next sector is data and the partial block will be written
            // anyway: write these zeros with it.
            zero = false;
        }
        if !zero {
            i = (i + align - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!zero, i)
}

/// qemu-img's `is_allocated_sectors_min`: like [`allocated_sectors`], but
/// once the buffer starts with data, zero runs shorter than `min` sectors
/// are written as data rather than splitting the write.
pub(super) fn allocated_sectors_min(buf: &[u8], n: u64, min: u64, sector_num: u64, align: u64) -> (bool, u64) {
    let min = min.min(n);
    let (data, first) = allocated_sectors(buf, n, sector_num, align);
    if !data {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    while checked < n {
        let at = (checked * SECTOR) as usize;
        let (data, len) = allocated_sectors(&buf[at..], n - checked, sector_num + checked, align);
        checked += len;
        if data {
            used = checked;
        } else if len >= min {
            break;
        }
    }
    (true, used)
}

/// Whether a buffer is all zeros (64 bytes at a time, which vectorizes).
pub(super) fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(pattern: &[(u64, bool)]) -> Vec<u8> {
        let mut v = Vec::new();
        for &(sectors, data) in pattern {
            v.extend(std::iter::repeat_n(u8::from(data), (sectors * SECTOR) as usize));
        }
        v
    }

    #[test]
    fn zero_runs_are_aligned() {
        // 1 data sector, 15 zeros, 16 data: with 8-sector alignment the data
        // run grows to sector 8 and the zero run covers sectors 8..16.
        let b = buf(&[(1, true), (15, false), (16, true)]);
        assert_eq!(allocated_sectors(&b, 32, 0, 8), (true, 8));
        assert_eq!(allocated_sectors(&b[8 * 512..], 24, 8, 8), (false, 8));
        // A short leading zero run ending unaligned is written as data.
        let b = buf(&[(3, false), (5, true)]);
        assert_eq!(allocated_sectors(&b, 8, 0, 8), (true, 8));
    }

    #[test]
    fn short_zero_runs_do_not_split_writes() {
        let b = buf(&[(8, true), (8, false), (8, true), (32, false)]);
        // min 16: the 8-sector zero run is written with the data; the
        // 32-sector run ends the write.
        assert_eq!(allocated_sectors_min(&b, 56, 16, 0, 8), (true, 24));
        // min 8: the first zero run already ends the write.
        assert_eq!(allocated_sectors_min(&b, 56, 8, 0, 8), (true, 8));
        let zeros = buf(&[(16, false)]);
        assert_eq!(allocated_sectors_min(&zeros, 16, 8, 0, 8), (false, 16));
    }

    #[test]
    fn alignment_is_a_power_of_two() {
        assert_eq!(alignment(4096), 4096);
        assert_eq!(alignment(6144), 4096);
        assert_eq!(alignment(512), 512);
        assert_eq!(alignment(0), 512);
    }
}
