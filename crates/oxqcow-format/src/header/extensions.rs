//! Header extensions: the structures QEMU puts after the fixed header
//! (backing format, feature name table, bitmaps, full disk encryption,
//! external data file, unknown ones kept byte for byte), parsed with
//! QEMU's checks and messages and written back in QEMU's order.

use super::{autoclear, be32, be64, ext};
use crate::error::FormatError;
use crate::limits::*;

/// Which feature bit field a feature-name entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureType {
    /// `incompatible_features`.
    Incompatible,
    /// `compatible_features`.
    Compatible,
    /// `autoclear_features`.
    Autoclear,
    /// Any other type byte.
    Other(u8),
}

/// An entry of the feature name table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// The bit field.
    pub kind: FeatureType,
    /// The bit number.
    pub bit: u8,
    /// The name (at most 46 bytes).
    pub name: String,
}

/// The bitmaps extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub directory_size: u64,
    /// Directory offset.
    pub directory_offset: u64,
}

/// The full disk encryption header pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CryptoExtension {
    /// Offset of the LUKS header.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
}

/// An extension this implementation does not know, kept byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownExtension {
    /// Its type.
    pub magic: u32,
    /// Its data.
    pub data: Vec<u8>,
}

/// The header extensions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format name.
    pub backing_format: Option<String>,
    /// Feature name table as read (rewritten as QEMU writes it).
    pub feature_table: Vec<FeatureName>,
    /// Persistent bitmaps.
    pub bitmaps: Option<BitmapsExtension>,
    /// A bitmaps extension was present but its autoclear bit was clear, so
    /// it is stale and dropped on the next header write (as QEMU does).
    pub stale_bitmaps: bool,
    /// LUKS header location.
    pub crypto: Option<CryptoExtension>,
    /// External data file name.
    pub data_file: Option<String>,
    /// Unknown extensions, in file order.
    pub unknown: Vec<UnknownExtension>,
}

pub(super) fn push_extension(buf: &mut Vec<u8>, magic: u32, data: &[u8]) {
    buf.extend_from_slice(&magic.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    let padded = data.len().div_ceil(8) * 8;
    buf.resize(buf.len() + padded - data.len(), 0);
}

/// The feature name table QEMU 10 writes, 8 entries of 48 bytes.
pub(super) fn qemu_feature_table() -> Vec<u8> {
    const FEATURES: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut out = Vec::with_capacity(FEATURES.len() * 48);
    for (kind, bit, name) in FEATURES {
        let mut entry = [0u8; 48];
        entry[0] = kind;
        entry[1] = bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&entry);
    }
    out
}

pub(super) fn describe_unknown_incompatible(table: &[FeatureName], mut mask: u64) -> String {
    let mut parts = Vec::new();
    for f in table {
        if f.kind == FeatureType::Incompatible && f.bit < 64 && mask & (1 << f.bit) != 0 {
            parts.push(f.name.clone());
            mask &= !(1 << f.bit);
        }
    }
    if mask != 0 {
        parts.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    parts.join(", ")
}

pub(super) fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

pub(super) fn parse_extensions(
    cluster0: &[u8],
    start: u64,
    end: u64,
    autoclear: u64,
    cluster_size: u64,
) -> Result<Extensions, FormatError> {
    let mut exts = Extensions::default();
    let mut seen: Vec<u32> = Vec::new();
    let mut offset = start;
    while offset < end {
        if offset + 8 > end {
            let magic = if offset + 4 <= cluster0.len() as u64 { be32(cluster0, offset as usize) } else { 0 };
            return Err(FormatError::ExtensionTooLarge { magic, offset, length: 0 });
        }
        let magic = be32(cluster0, offset as usize);
        let length = be32(cluster0, offset as usize + 4);
        offset += 8;
        if u64::from(length) > end - offset {
            return Err(FormatError::ExtensionTooLarge { magic, offset, length });
        }
        if magic == ext::END {
            return Ok(exts);
        }
        let data = &cluster0[offset as usize..(offset + u64::from(length)) as usize];
        let known =
            matches!(magic, ext::BACKING_FORMAT | ext::FEATURE_TABLE | ext::BITMAPS | ext::CRYPTO | ext::DATA_FILE);
        if known {
            if seen.contains(&magic) {
                return Err(FormatError::DuplicateExtension(magic));
            }
            seen.push(magic);
        }
        match magic {
            ext::BACKING_FORMAT => {
                if length > MAX_BACKING_FORMAT_NAME {
                    return Err(FormatError::InvalidExtension {
                        magic,
                        reason: format!("ext_backing_format: len={length} too large (>=16)"),
                    });
                }
                exts.backing_format = Some(c_string(data));
            }
            ext::FEATURE_TABLE => {
                for entry in data.chunks_exact(48) {
                    if entry[2] == 0 {
                        break;
                    }
                    let kind = match entry[0] {
                        0 => FeatureType::Incompatible,
                        1 => FeatureType::Compatible,
                        2 => FeatureType::Autoclear,
                        o => FeatureType::Other(o),
                    };
                    exts.feature_table.push(FeatureName { kind, bit: entry[1], name: c_string(&entry[2..]) });
                }
            }
            ext::BITMAPS => {
                if length != 24 {
                    return Err(FormatError::InvalidExtension {
                        magic,
                        reason: format!("bitmaps_ext: Invalid extension length {length}"),
                    });
                }
                if autoclear & autoclear::BITMAPS == 0 {
                    exts.stale_bitmaps = true;
                } else {
                    let nb_bitmaps = be32(data, 0);
                    let reserved = be32(data, 4);
                    let directory_size = be64(data, 8);
                    let directory_offset = be64(data, 16);
                    let bad = |reason: String| FormatError::InvalidExtension { magic, reason };
                    if reserved != 0 {
                        return Err(bad("bitmaps_ext: Reserved field is not zero".into()));
                    }
                    if nb_bitmaps > MAX_BITMAPS {
                        return Err(bad(format!(
                            "bitmaps_ext: Image has {nb_bitmaps} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
                        )));
                    }
                    if nb_bitmaps == 0 {
                        return Err(bad("found bitmaps extension with zero bitmaps".into()));
                    }
                    if directory_offset % cluster_size != 0 {
                        return Err(bad(format!(
                            "bitmaps_ext: invalid bitmap directory offset 0x{directory_offset:x}"
                        )));
                    }
                    if directory_size > MAX_BITMAP_DIRECTORY_BYTES {
                        return Err(bad(format!(
                            "bitmaps_ext: bitmap directory size ({directory_size}) exceeds the maximum supported size ({MAX_BITMAP_DIRECTORY_BYTES})"
                        )));
                    }
                    exts.bitmaps = Some(BitmapsExtension { nb_bitmaps, directory_size, directory_offset });
                }
            }
            ext::CRYPTO => {
                if length != 16 {
                    return Err(FormatError::InvalidExtension {
                        magic,
                        reason: format!("CRYPTO header extension size {length}, but expected size 16"),
                    });
                }
                let c = CryptoExtension { offset: be64(data, 0), length: be64(data, 8) };
                if c.offset % cluster_size != 0 {
                    return Err(FormatError::InvalidExtension {
                        magic,
                        reason: format!(
                            "Encryption header offset '{}' is not a multiple of cluster size '{}'",
                            c.offset, cluster_size
                        ),
                    });
                }
                if c.length < crate::luks::HEADER_SIZE as u64 || c.length > crate::luks::MAX_HEADER_AREA {
                    return Err(FormatError::InvalidExtension {
                        magic,
                        reason: format!(
                            "Encryption header length {} is outside {}..={} bytes",
                            c.length,
                            crate::luks::HEADER_SIZE,
                            crate::luks::MAX_HEADER_AREA
                        ),
                    });
                }
                exts.crypto = Some(c);
            }
            ext::DATA_FILE => exts.data_file = Some(c_string(data)),
            _ => exts.unknown.push(UnknownExtension { magic, data: data.to_vec() }),
        }
        offset += u64::from(length).div_ceil(8) * 8;
    }
    Ok(exts)
}
