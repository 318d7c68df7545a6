//! The signatures by which image formats are recognised.
//!
//! [`probe_head`] is QEMU's format probing (`bdrv_probe_all`): every block
//! driver QEMU builds with a probe looks at the first [`PROBE_LEN`] bytes of
//! the file (zeros past its end) and at its name, and scores them; the
//! highest score wins and raw, scoring 1, is the fallback. The formats and
//! scores are those of QEMU 10's drivers. [`probe_trailer`] is oxqcow's
//! addition: two formats keep their signature only in the last sector,
//! where QEMU's probes do not look, so QEMU takes such files for raw.
//!
//! Only the signatures live here; what a format is then used for (opened,
//! or refused) is the engine's decision.

/// How many leading bytes the probes see (QEMU's `BLOCK_PROBE_BUF_SIZE`).
pub const PROBE_LEN: usize = 512;
/// How many trailing bytes [`probe_trailer`] sees: one sector, the size of
/// a VHD footer and of a UDIF (dmg) trailer.
pub const TRAILER_LEN: usize = 512;

/// A format a probe recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Probed {
    /// No signature: a flat image.
    Raw,
    /// qcow2 (QEMU's qcow magic with version 2 or later).
    Qcow2,
    /// qcow version 1.
    Qcow,
    /// VMware's VMDK: a sparse extent or a text descriptor.
    Vmdk,
    /// VirtualBox's VDI.
    Vdi,
    /// Hyper-V's VHDX.
    Vhdx,
    /// Virtual PC's VHD (QEMU's `vpc`).
    Vpc,
    /// QEMU's enhanced disk.
    Qed,
    /// A LUKS1 volume (QEMU's `luks` driver).
    Luks,
    /// Parallels.
    Parallels,
    /// Apple's disk image (UDIF).
    Dmg,
    /// Bochs' growing redolog.
    Bochs,
    /// A compressed loop image.
    Cloop,
}

impl Probed {
    /// QEMU's name for the format (its driver's `format_name`).
    pub fn name(self) -> &'static str {
        match self {
            Probed::Raw => "raw",
            Probed::Qcow2 => "qcow2",
            Probed::Qcow => "qcow",
            Probed::Vmdk => "vmdk",
            Probed::Vdi => "vdi",
            Probed::Vhdx => "vhdx",
            Probed::Vpc => "vpc",
            Probed::Qed => "qed",
            Probed::Luks => "luks",
            Probed::Parallels => "parallels",
            Probed::Dmg => "dmg",
            Probed::Bochs => "bochs",
            Probed::Cloop => "cloop",
        }
    }
}

/// A probe's verdict: QEMU's drivers answer 100 when their magic is
/// present, 2 for the weak guesses (a file name, a shell script header),
/// raw answers 1.
const CERTAIN: u32 = 100;
const GUESS: u32 = 2;
const FALLBACK: u32 = 1;

/// The qcow and qcow2 magic, "QFI\xfb".
const QCOW_MAGIC: &[u8; 4] = b"QFI\xfb";
/// A VMDK4 sparse extent header.
const VMDK4_MAGIC: &[u8; 4] = b"KDMV";
/// A VMDK3 (ESX COWD) extent header.
const VMDK3_MAGIC: &[u8; 4] = b"COWD";
/// VDI's signature, a little-endian 32-bit word after the 64-byte text.
const VDI_SIGNATURE: u32 = 0xbeda_107f;
const VDI_SIGNATURE_OFFSET: usize = 0x40;
/// VHDX's file type identifier.
const VHDX_MAGIC: &[u8; 8] = b"vhdxfile";
/// The creator cookie of a VHD footer (and of its copy at the start of a
/// dynamic VHD).
const VPC_MAGIC: &[u8; 8] = b"conectix";
/// QED's magic, "QED\0".
const QED_MAGIC: &[u8; 4] = b"QED\0";
/// LUKS's magic, followed by a big-endian 16-bit version; QEMU knows 1.
const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const LUKS_VERSION: u16 = 1;
/// Parallels' two magics (without and with format extensions), followed by
/// a little-endian 32-bit version; QEMU knows 2.
const PARALLELS_MAGIC: &[u8; 16] = b"WithoutFreeSpace";
const PARALLELS_MAGIC_EXT: &[u8; 16] = b"WithouFreSpacExt";
const PARALLELS_VERSION: u32 = 2;
/// Bochs: NUL-terminated strings in fixed fields (magic 32 bytes, type
/// and subtype 16 each), then a little-endian 32-bit version.
const BOCHS_MAGIC: &[u8] = b"Bochs Virtual HD Image";
const BOCHS_TYPE: &[u8] = b"Redolog";
const BOCHS_SUBTYPE: &[u8] = b"Growing";
const BOCHS_VERSIONS: [u32; 2] = [0x0001_0000, 0x0002_0000];
/// The shell script a cloop 2.0 image starts with.
const CLOOP_MAGIC: &[u8] = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
/// The file name suffix QEMU's dmg probe looks for (dmg has no leading magic).
const DMG_SUFFIX: &[u8] = b".dmg";
/// A UDIF trailer: "koly", version 4, header size 512 (big-endian).
const DMG_MAGIC: &[u8; 4] = b"koly";
const DMG_VERSION: u32 = 4;
const DMG_TRAILER_SIZE: u32 = 512;
/// Where the VHD footer keeps its checksum.
const VPC_CHECKSUM_OFFSET: usize = 64;

/// QEMU's probe: the format whose driver scores `head` (the file's first
/// [`PROBE_LEN`] bytes, zeros past its end) and `file_name` (the name the
/// file was opened by, if any) highest. An empty file is raw without
/// probing (QEMU's `find_image_format`); the caller knows the length.
/// Ties cannot arise between two magics at offset 0; between the 100
/// scorers the first checked wins.
pub fn probe_head(head: &[u8; PROBE_LEN], file_name: Option<&[u8]>) -> Probed {
    let scores = [
        (Probed::Qcow2, head.starts_with(QCOW_MAGIC) && be32(head, 4) >= 2),
        (Probed::Qcow, head.starts_with(QCOW_MAGIC) && be32(head, 4) == 1),
        (Probed::Vmdk, head.starts_with(VMDK4_MAGIC) || head.starts_with(VMDK3_MAGIC) || vmdk_descriptor(head)),
        (Probed::Vhdx, head.starts_with(VHDX_MAGIC)),
        (Probed::Vpc, head.starts_with(VPC_MAGIC)),
        (Probed::Qed, head.starts_with(QED_MAGIC)),
        (Probed::Luks, head.starts_with(LUKS_MAGIC) && be16(head, 6) == LUKS_VERSION),
        (
            Probed::Parallels,
            (head.starts_with(PARALLELS_MAGIC) || head.starts_with(PARALLELS_MAGIC_EXT))
                && le32(head, 16) == PARALLELS_VERSION,
        ),
        (
            Probed::Bochs,
            c_string_is(&head[..32], BOCHS_MAGIC)
                && c_string_is(&head[32..48], BOCHS_TYPE)
                && c_string_is(&head[48..64], BOCHS_SUBTYPE)
                && BOCHS_VERSIONS.contains(&le32(head, 64)),
        ),
        (Probed::Vdi, le32(head, VDI_SIGNATURE_OFFSET) == VDI_SIGNATURE),
    ]
    .into_iter()
    .filter(|&(_, hit)| hit)
    .map(|(format, _)| (format, CERTAIN));
    let guesses = [
        (Probed::Cloop, head.starts_with(CLOOP_MAGIC)),
        (Probed::Dmg, file_name.is_some_and(|n| n.len() > DMG_SUFFIX.len() && n.ends_with(DMG_SUFFIX))),
    ]
    .into_iter()
    .filter(|&(_, hit)| hit)
    .map(|(format, _)| (format, GUESS));
    let mut best = (Probed::Raw, FALLBACK);
    for (format, score) in scores.chain(guesses) {
        if score > best.1 {
            best = (format, score);
        }
    }
    best.0
}

/// oxqcow's addition to QEMU's probe, for a file QEMU's probe calls raw:
/// the format whose signature fills `tail`, the file's last
/// [`TRAILER_LEN`] bytes. A fixed VHD is raw data followed by a footer (a
/// valid checksum is required, so a sector that merely starts with the
/// cookie does not count); a dmg ends with its UDIF trailer. QEMU opens
/// both as raw, exposing the footer as data; oxqcow refuses them instead.
pub fn probe_trailer(tail: &[u8; TRAILER_LEN]) -> Option<Probed> {
    if tail.starts_with(VPC_MAGIC) && vpc_checksum(tail) == be32(tail, VPC_CHECKSUM_OFFSET) {
        return Some(Probed::Vpc);
    }
    if tail.starts_with(DMG_MAGIC) && be32(tail, 4) == DMG_VERSION && be32(tail, 8) == DMG_TRAILER_SIZE {
        return Some(Probed::Dmg);
    }
    None
}

/// The VHD footer checksum: the one's complement of the sum of its bytes,
/// the checksum field counted as zeros.
fn vpc_checksum(footer: &[u8; TRAILER_LEN]) -> u32 {
    let field = VPC_CHECKSUM_OFFSET..VPC_CHECKSUM_OFFSET + 4;
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !field.contains(i))
        .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
    !sum
}

/// QEMU's test for a VMDK text descriptor: after any comment lines (`#`)
/// and lines of spaces, a line `version=1`, `2` or `3` (LF or CRLF). An
/// empty line, or any other first line, is not a descriptor.
fn vmdk_descriptor(buf: &[u8]) -> bool {
    let mut p = 0;
    while p < buf.len() {
        match buf[p] {
            b'#' => {
                while p < buf.len() && buf[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < buf.len() && buf[p] == b' ' {
                    p += 1;
                }
                if buf.get(p) == Some(&b'\r') {
                    p += 1;
                }
                if buf.get(p) != Some(&b'\n') {
                    return false;
                }
                p += 1;
            }
            _ => {
                let line = &buf[p..];
                return [b"version=1", b"version=2", b"version=3"].iter().any(|v| {
                    line.starts_with(*v) && (line[v.len()..].starts_with(b"\n") || line[v.len()..].starts_with(b"\r\n"))
                });
            }
        }
    }
    false
}

/// Whether a fixed-size field holds the C string `s` (its bytes, then NUL).
fn c_string_is(field: &[u8], s: &[u8]) -> bool {
    field.len() > s.len() && field.starts_with(s) && field[s.len()] == 0
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(prefix: &[u8]) -> [u8; PROBE_LEN] {
        let mut h = [0u8; PROBE_LEN];
        h[..prefix.len()].copy_from_slice(prefix);
        h
    }

    fn at(mut h: [u8; PROBE_LEN], offset: usize, bytes: &[u8]) -> [u8; PROBE_LEN] {
        h[offset..offset + bytes.len()].copy_from_slice(bytes);
        h
    }

    fn probe(h: &[u8; PROBE_LEN]) -> Probed {
        probe_head(h, None)
    }

    #[test]
    fn zeros_and_text_are_raw() {
        assert_eq!(probe(&head(b"")), Probed::Raw);
        assert_eq!(probe(&head(b"hello world\n")), Probed::Raw);
    }

    #[test]
    fn qcow_versions_split_between_qcow_and_qcow2() {
        assert_eq!(probe(&head(b"QFI\xfb\0\0\0\x01")), Probed::Qcow);
        assert_eq!(probe(&head(b"QFI\xfb\0\0\0\x02")), Probed::Qcow2);
        assert_eq!(probe(&head(b"QFI\xfb\0\0\0\x03")), Probed::Qcow2);
        // QEMU's qcow2 probe claims every later version (the open then
        // reports the version); version 0 is nobody's.
        assert_eq!(probe(&head(b"QFI\xfb\0\0\0\x07")), Probed::Qcow2);
        assert_eq!(probe(&head(b"QFI\xfb\0\0\0\0")), Probed::Raw);
    }

    #[test]
    fn vmdk_extent_magics() {
        assert_eq!(probe(&head(b"KDMV\x01\0\0\0")), Probed::Vmdk);
        assert_eq!(probe(&head(b"COWD\x01\0\0\0")), Probed::Vmdk);
        assert_eq!(probe(&head(b"VMDK")), Probed::Raw);
    }

    #[test]
    fn vmdk_text_descriptor() {
        let d = |s: &[u8]| probe(&head(s));
        assert_eq!(d(b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\n"), Probed::Vmdk);
        assert_eq!(d(b"version=3\r\n"), Probed::Vmdk);
        assert_eq!(d(b"#c\n   \n  \r\n#d\nversion=2\n"), Probed::Vmdk);
        // Anything else before the version line, an unknown version, or a
        // version line without its line end is not a descriptor.
        assert_eq!(d(b"\nversion=1\n"), Probed::Raw);
        assert_eq!(d(b"  x\nversion=1\n"), Probed::Raw);
        assert_eq!(d(b"version=4\n"), Probed::Raw);
        assert_eq!(d(b"version=1"), Probed::Raw);
        assert_eq!(d(b"CID=1\nversion=1\n"), Probed::Raw);
        // A comment that runs to the end of the probed bytes.
        assert_eq!(d(&[b'#'; PROBE_LEN]), Probed::Raw);
        // The version line must lie inside the probed bytes.
        let mut long = vec![b'#'; PROBE_LEN - 6];
        long[PROBE_LEN - 7] = b'\n';
        long.extend_from_slice(b"versio");
        assert_eq!(d(&long), Probed::Raw);
    }

    #[test]
    fn vdi_signature_at_0x40() {
        assert_eq!(
            probe(&at(head(b"<<< Oracle VM VirtualBox Disk Image >>>\n"), 0x40, &[0x7f, 0x10, 0xda, 0xbe])),
            Probed::Vdi
        );
        assert_eq!(probe(&at(head(b""), 0x40, &[0xbe, 0xda, 0x10, 0x7f])), Probed::Raw);
    }

    #[test]
    fn vhdx_vpc_qed_magics() {
        assert_eq!(probe(&head(b"vhdxfile")), Probed::Vhdx);
        assert_eq!(probe(&head(b"conectix")), Probed::Vpc);
        assert_eq!(probe(&head(b"QED\0")), Probed::Qed);
        assert_eq!(probe(&head(b"QED!")), Probed::Raw);
    }

    #[test]
    fn luks_needs_version_1() {
        assert_eq!(probe(&head(b"LUKS\xba\xbe\0\x01")), Probed::Luks);
        // LUKS2 is not QEMU's.
        assert_eq!(probe(&head(b"LUKS\xba\xbe\0\x02")), Probed::Raw);
    }

    #[test]
    fn parallels_needs_version_2() {
        assert_eq!(probe(&head(b"WithoutFreeSpace\x02\0\0\0")), Probed::Parallels);
        assert_eq!(probe(&head(b"WithouFreSpacExt\x02\0\0\0")), Probed::Parallels);
        assert_eq!(probe(&head(b"WithoutFreeSpace\x03\0\0\0")), Probed::Raw);
    }

    fn bochs(magic: &[u8], kind: &[u8], sub: &[u8], version: u32) -> [u8; PROBE_LEN] {
        let h = at(head(magic), 32, kind);
        at(at(h, 48, sub), 64, &version.to_le_bytes())
    }

    #[test]
    fn bochs_growing_redolog() {
        assert_eq!(probe(&bochs(BOCHS_MAGIC, b"Redolog", b"Growing", 0x20000)), Probed::Bochs);
        assert_eq!(probe(&bochs(BOCHS_MAGIC, b"Redolog", b"Growing", 0x10000)), Probed::Bochs);
        assert_eq!(probe(&bochs(BOCHS_MAGIC, b"Redolog", b"Growing", 0x30000)), Probed::Raw);
        assert_eq!(probe(&bochs(BOCHS_MAGIC, b"Redolog", b"Undoable", 0x20000)), Probed::Raw);
        // The strings are C strings: a longer one does not match.
        assert_eq!(probe(&bochs(b"Bochs Virtual HD Images", b"Redolog", b"Growing", 0x20000)), Probed::Raw);
    }

    #[test]
    fn cloop_script_header() {
        assert_eq!(probe(&head(CLOOP_MAGIC)), Probed::Cloop);
        assert_eq!(probe(&head(&CLOOP_MAGIC[..CLOOP_MAGIC.len() - 1])), Probed::Raw);
    }

    #[test]
    fn dmg_by_file_name_only() {
        let zeros = head(b"");
        assert_eq!(probe_head(&zeros, Some(b"/tmp/disk.dmg")), Probed::Dmg);
        assert_eq!(probe_head(&zeros, Some(b"disk.DMG")), Probed::Raw);
        assert_eq!(probe_head(&zeros, Some(b".dmg")), Probed::Raw);
        assert_eq!(probe_head(&zeros, None), Probed::Raw);
        // A magic outranks the name.
        assert_eq!(probe_head(&head(b"QFI\xfb\0\0\0\x03"), Some(b"x.dmg")), Probed::Qcow2);
    }

    fn vhd_footer() -> [u8; TRAILER_LEN] {
        let mut f = [0u8; TRAILER_LEN];
        f[..8].copy_from_slice(VPC_MAGIC);
        f[60..64].copy_from_slice(&2u32.to_be_bytes());
        let sum = vpc_checksum(&f);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
        f
    }

    #[test]
    fn fixed_vhd_footer_needs_its_checksum() {
        assert_eq!(probe_trailer(&vhd_footer()), Some(Probed::Vpc));
        let mut bad = vhd_footer();
        bad[100] ^= 1;
        assert_eq!(probe_trailer(&bad), None);
    }

    #[test]
    fn udif_trailer() {
        let mut t = [0u8; TRAILER_LEN];
        t[..4].copy_from_slice(DMG_MAGIC);
        t[4..8].copy_from_slice(&4u32.to_be_bytes());
        t[8..12].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(probe_trailer(&t), Some(Probed::Dmg));
        t[4..8].copy_from_slice(&5u32.to_be_bytes());
        assert_eq!(probe_trailer(&t), None);
        assert_eq!(probe_trailer(&[0u8; TRAILER_LEN]), None);
    }
}
