//! Compression of whole clusters: raw deflate with a 4 KiB window (what QEMU
//! reads and writes for compression type "zlib") and zstd.
//!
//! A compressed cluster's stored length is only known to 512-byte
//! precision, so decompression stops as soon as the cluster is full and
//! ignores whatever follows in the last sector.
//!
//! zstd contexts are costly to set up (their tables are larger than a
//! cluster), so each thread keeps its own and reuses it for every cluster.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use crate::error::{Error, Result};

/// The compression algorithm of an image (header field `compression_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Raw deflate, window bits 12 (QEMU's "zlib").
    Deflate,
    /// zstd.
    Zstd,
}

/// QEMU compresses with zlib's default level.
const DEFLATE_LEVEL: u32 = 6;
/// QEMU deflates with a 4 KiB window and no zlib header.
const DEFLATE_WINDOW_BITS: u8 = 12;
/// zstd's default level, which QEMU uses.
const ZSTD_LEVEL: i32 = 3;
/// Byte entropy (bits per byte) from which data is probed with zstd before
/// deflate runs: text and machine code stay far below (4 to 6.5 bits),
/// compressed or encrypted data is within a hair of 8.
pub const RANDOM_ENTROPY_BITS: f64 = 7.9;
/// zstd level of the incompressibility probe: its fastest regular level.
const PROBE_ZSTD_LEVEL: i32 = 1;

/// Shannon entropy of the byte values of `data`, in bits per byte.
fn byte_entropy(data: &[u8]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let n = data.len() as f64;
    counts.iter().filter(|&&c| c > 0).map(|&c| c as f64 / n).map(|p| -p * p.log2()).sum()
}

impl Codec {
    /// The codec for a header's `compression_type`.
    pub fn from_type(compression_type: u8) -> Codec {
        if compression_type == 1 {
            Codec::Zstd
        } else {
            Codec::Deflate
        }
    }

    /// Compresses `src`; `None` when the result would not fit in `max_len`
    /// bytes (the caller then stores the cluster uncompressed, as QEMU does).
    ///
    /// Deflate spends as long failing on incompressible data as it spends
    /// compressing text, so data that looks random (byte entropy of at
    /// least [`RANDOM_ENTROPY_BITS`]) is first tried with fast zstd: when
    /// zstd, with its larger window and the same kind of entropy coding,
    /// cannot make it fit either, deflate is not run and the cluster is
    /// stored uncompressed. Only clusters that deflate would shrink by a
    /// hair could be stored differently from QEMU; the content is the same.
    pub fn compress(self, src: &[u8], max_len: usize) -> Result<Option<Vec<u8>>> {
        let mut out = vec![0u8; max_len];
        if self == Codec::Deflate && byte_entropy(src) >= RANDOM_ENTROPY_BITS {
            match zstd_compress(PROBE_ZSTD_LEVEL, src, &mut out) {
                Ok(n) if n < max_len => {}
                _ => return Ok(None),
            }
        }
        let n = match self {
            Codec::Deflate => {
                let mut c = Compress::new_with_window_bits(Compression::new(DEFLATE_LEVEL), false, DEFLATE_WINDOW_BITS);
                match c.compress(src, &mut out, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => c.total_out() as usize,
                    Ok(_) => return Ok(None),
                    Err(e) => return Err(Error::InvalidArgument(format!("deflate failed: {e}"))),
                }
            }
            Codec::Zstd => match zstd_compress(ZSTD_LEVEL, src, &mut out) {
                Ok(n) => n,
                // The only failure for valid input is a too small buffer.
                Err(_) => return Ok(None),
            },
        };
        out.truncate(n);
        Ok(Some(out))
    }

    /// Decompresses `src` into exactly `out.len()` bytes. `where_` names the
    /// cluster for the error message.
    pub fn decompress(self, src: &[u8], out: &mut [u8], where_: impl Fn() -> String) -> Result<()> {
        let bad = |why: String| Error::Corrupt(format!("{}: compressed data is invalid: {why}", where_()));
        match self {
            Codec::Deflate => {
                let mut d = Decompress::new_with_window_bits(false, DEFLATE_WINDOW_BITS);
                match d.decompress(src, out, FlushDecompress::Finish) {
                    Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                    Ok(_) => Err(bad(format!("inflates to {} bytes instead of {}", d.total_out(), out.len()))),
                    Err(e) => Err(bad(e.to_string())),
                }
            }
            Codec::Zstd => ZSTD_DECODER.with(|cell| {
                let mut slot = cell.borrow_mut();
                let dec = match slot.as_mut() {
                    Some(dec) => {
                        dec.reinit().map_err(|e| bad(e.to_string()))?;
                        dec
                    }
                    None => slot.insert(Decoder::new().map_err(|e| bad(e.to_string()))?),
                };
                let mut input = InBuffer::around(src);
                let mut output = OutBuffer::around(out);
                loop {
                    let before = (input.pos(), output.pos());
                    let hint = dec.run(&mut input, &mut output).map_err(|e| bad(e.to_string()))?;
                    if output.pos() == output.capacity() {
                        return Ok(());
                    }
                    if hint == 0 || (input.pos(), output.pos()) == before {
                        let got = output.pos();
                        return Err(bad(format!("decompresses to {got} bytes instead of {}", output.capacity())));
                    }
                }
            }),
        }
    }
}

thread_local! {
    /// This thread's zstd compression contexts, one per level used.
    static ZSTD_COMPRESSORS: RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(Vec::new()) };
    /// This thread's zstd decompression context.
    static ZSTD_DECODER: RefCell<Option<Decoder<'static>>> = const { RefCell::new(None) };
}

/// Compresses `src` into `out` with zstd at `level`, on this thread's
/// context for that level; the length written, or an error when `out` is
/// too small.
fn zstd_compress(level: i32, src: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    ZSTD_COMPRESSORS.with(|cell| {
        let mut contexts = cell.borrow_mut();
        let i = match contexts.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                contexts.push((level, zstd::bulk::Compressor::new(level)?));
                contexts.len() - 1
            }
        };
        contexts[i].1.compress_to_buffer(src, out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i / 7) % 251) as u8).collect()
    }

    #[test]
    fn roundtrip_with_sector_padding() {
        for codec in [Codec::Deflate, Codec::Zstd] {
            let src = sample(65536);
            let mut c = codec.compress(&src, 65535).unwrap().expect("compressible");
            // Stored length is rounded up to sectors: garbage may follow.
            c.extend_from_slice(&[0xa5; 300]);
            let mut out = vec![0u8; 65536];
            codec.decompress(&c, &mut out, || "test".into()).unwrap();
            assert_eq!(out, src);
        }
    }

    #[test]
    fn incompressible_data_does_not_fit() {
        let mut x = 1u64;
        let src: Vec<u8> = (0..4096)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect();
        for codec in [Codec::Deflate, Codec::Zstd] {
            assert!(codec.compress(&src, 4095).unwrap().is_none());
        }
    }

    #[test]
    fn random_looking_data_that_deflate_can_shrink_is_still_compressed() {
        // 3000 random bytes repeated: byte entropy near 8, yet every copy
        // after the first is a match inside deflate's 4 KiB window (whose
        // longest distance is 4096 - 262 bytes).
        let mut x = 7u64;
        let block: Vec<u8> = (0..3000)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect();
        let src: Vec<u8> = block.iter().cycle().take(65536).copied().collect();
        assert!(byte_entropy(&src) >= RANDOM_ENTROPY_BITS);
        let c = Codec::Deflate.compress(&src, 65535).unwrap().expect("repetitions compress");
        assert!(c.len() < 8192, "{}", c.len());
        let mut out = vec![0u8; 65536];
        Codec::Deflate.decompress(&c, &mut out, || "test".into()).unwrap();
        assert_eq!(out, src);
        // Runs over all byte values look random too, and still compress.
        assert!(byte_entropy(&sample(65536)) >= RANDOM_ENTROPY_BITS);
        assert!(Codec::Deflate.compress(&sample(65536), 65535).unwrap().is_some());
        let text: Vec<u8> = b"qcow2 cluster refcount table ".iter().cycle().take(65536).copied().collect();
        assert!(byte_entropy(&text) < RANDOM_ENTROPY_BITS);
    }

    #[test]
    fn garbage_and_short_streams_are_errors() {
        for codec in [Codec::Deflate, Codec::Zstd] {
            let mut out = vec![0u8; 4096];
            assert!(codec.decompress(&[0xff; 100], &mut out, || "x".into()).is_err());
            let c = codec.compress(&sample(2048), 4095).unwrap().unwrap();
            assert!(codec.decompress(&c, &mut out, || "x".into()).is_err(), "stream ends before the cluster is full");
            assert!(codec.decompress(&[], &mut out, || "x".into()).is_err());
        }
    }
}
