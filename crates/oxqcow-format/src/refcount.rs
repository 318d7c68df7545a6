//! Refcount table entries and refcount blocks of every width (1 to 64 bits).
//!
//! Widths of 8 bits and more are big-endian integers; 1-, 2- and 4-bit
//! refcounts are packed several to a byte, lowest bits first, as QEMU's
//! accessors do.

use crate::error::FormatError;
use crate::types::{Geometry, HostOffset};

/// Refcount table entries hold a refcount block offset in bits 9..=63.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// An entry of the refcount table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefcountTableEntry(pub u64);

impl RefcountTableEntry {
    /// The refcount block offset, or `None` when not allocated yet.
    pub fn block_offset(self) -> Option<HostOffset> {
        match self.0 & REFTABLE_OFFSET_MASK {
            0 => None,
            o => Some(HostOffset(o)),
        }
    }
    /// Bits that must be zero.
    pub fn reserved_bits(self) -> u64 {
        self.0 & !REFTABLE_OFFSET_MASK
    }
    /// Checks reserved bits and alignment.
    pub fn validate(self, geometry: &Geometry) -> Result<(), FormatError> {
        if self.reserved_bits() != 0 {
            return Err(FormatError::InvalidEntry {
                table: "Refcount table",
                entry: self.0,
                reason: "reserved bits set",
            });
        }
        if let Some(o) = self.block_offset() {
            if !geometry.is_cluster_aligned(o.0) {
                return Err(FormatError::InvalidEntry {
                    table: "Refcount table",
                    entry: self.0,
                    reason: "refcount block offset not cluster aligned",
                });
            }
        }
        Ok(())
    }
}

/// Typed access to the refcounts stored in one refcount block's bytes.
pub struct RefcountBlock;

impl RefcountBlock {
    /// Reads entry `index` of a block of refcounts `1 << order` bits wide.
    pub fn get(block: &[u8], index: usize, order: u32) -> u64 {
        match order {
            0..=2 => {
                let bits = 1usize << order;
                let per_byte = 8 / bits;
                let byte = block[index / per_byte];
                let shift = (index % per_byte) * bits;
                u64::from((byte >> shift) & ((1u16 << bits) - 1) as u8)
            }
            3 => u64::from(block[index]),
            4 => u64::from(u16::from_be_bytes([block[index * 2], block[index * 2 + 1]])),
            5 => u64::from(u32::from_be_bytes(block[index * 4..index * 4 + 4].try_into().expect("4 bytes"))),
            _ => u64::from_be_bytes(block[index * 8..index * 8 + 8].try_into().expect("8 bytes")),
        }
    }

    /// Writes entry `index`. `value` must fit the width (callers check
    /// against [`Geometry::max_refcount`] first).
    pub fn set(block: &mut [u8], index: usize, order: u32, value: u64) {
        match order {
            0..=2 => {
                let bits = 1usize << order;
                let per_byte = 8 / bits;
                let shift = (index % per_byte) * bits;
                let mask = (((1u16 << bits) - 1) as u8) << shift;
                let b = &mut block[index / per_byte];
                *b = (*b & !mask) | (((value as u8) << shift) & mask);
            }
            3 => block[index] = value as u8,
            4 => block[index * 2..index * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
            5 => block[index * 4..index * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
            _ => block[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_roundtrips_without_disturbing_neighbours() {
        for order in 0..=6u32 {
            let g = Geometry::new(9, order, false).unwrap();
            let n = g.refcounts_per_block() as usize;
            let mut block = vec![0u8; 512];
            let max = g.max_refcount();
            for i in 0..n {
                RefcountBlock::set(&mut block, i, order, (i as u64 * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(RefcountBlock::get(&block, i, order), (i as u64 * 7 + 3) & max, "order {order} index {i}");
            }
        }
    }

    #[test]
    fn one_bit_layout_is_lowest_bit_first() {
        let mut block = vec![0u8; 512];
        RefcountBlock::set(&mut block, 0, 0, 1);
        RefcountBlock::set(&mut block, 9, 0, 1);
        assert_eq!(&block[..2], &[0x01, 0x02]);
        let mut block = vec![0u8; 512];
        RefcountBlock::set(&mut block, 1, 2, 0xf);
        assert_eq!(block[0], 0xf0);
    }

    #[test]
    fn table_entry_validation() {
        let g = Geometry::new(16, 4, false).unwrap();
        assert_eq!(RefcountTableEntry(0x20000).block_offset(), Some(HostOffset(0x20000)));
        assert!(RefcountTableEntry(0x20000).validate(&g).is_ok());
        assert!(RefcountTableEntry(0x20001).validate(&g).is_err());
        assert!(RefcountTableEntry(0x20200).validate(&g).is_err());
    }
}
