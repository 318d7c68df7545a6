use super::*;

fn valid_header() -> Header {
    let g = Geometry::new(16, 4, false).unwrap();
    let mut h = Header::new(3, g, 1 << 30);
    h.refcount_table_offset = 0x10000;
    h.refcount_table_clusters = 1;
    h.l1_table_offset = 0x30000;
    h.l1_size = 2;
    h
}

fn valid_bytes() -> Vec<u8> {
    valid_header().serialize().unwrap()
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn parse_err(b: &[u8]) -> FormatError {
    Header::parse(b).expect_err("must be refused")
}

#[test]
fn roundtrip_v3_with_extensions() {
    let mut h = valid_header();
    h.backing_file = Some("base.qcow2".into());
    h.extensions.backing_format = Some("qcow2".into());
    h.extensions.unknown.push(UnknownExtension { magic: 0x1234_5678, data: vec![1, 2, 3] });
    h.extensions.unknown.push(UnknownExtension { magic: 0x1234_5679, data: vec![9; 17] });
    h.compatible_features = compat::LAZY_REFCOUNTS;
    let bytes = h.serialize().unwrap();
    let mut parsed = Header::parse(&bytes).unwrap();
    assert_eq!(parsed.backing_file.as_deref(), Some("base.qcow2"));
    assert_eq!(parsed.extensions.backing_format.as_deref(), Some("qcow2"));
    assert_eq!(parsed.extensions.unknown, h.extensions.unknown);
    assert_eq!(parsed.extensions.feature_table.len(), 8);
    assert!(parsed.lazy_refcounts());
    // A rewrite is byte-identical.
    assert_eq!(parsed.serialize().unwrap(), bytes);
}

#[test]
fn layout_matches_qemu_create() {
    // The first bytes of `qemu-img create -f qcow2 a.qcow2 1G` (QEMU 10).
    let bytes = valid_bytes();
    let expected_prefix: [u8; 0x78] = {
        let mut e = [0u8; 0x78];
        e[..4].copy_from_slice(&[0x51, 0x46, 0x49, 0xfb]);
        e[7] = 3;
        e[0x17] = 0x10;
        e[0x1c] = 0x40;
        e[0x27] = 2;
        e[0x2d] = 3;
        e[0x35] = 1;
        e[0x3b] = 1;
        e[0x63] = 4;
        e[0x67] = 0x70;
        e[0x70..0x78].copy_from_slice(&[0x68, 0x03, 0xf8, 0x57, 0, 0, 1, 0x80]);
        e
    };
    assert_eq!(&bytes[..0x78], &expected_prefix[..]);
    assert_eq!(&bytes[0x7a..0x83], b"dirty bit");
    assert_eq!(bytes.len(), 65536);
}

#[test]
fn small_clusters_have_no_feature_table() {
    let g = Geometry::new(12, 4, false).unwrap();
    let mut h = Header::new(3, g, 1 << 20);
    h.refcount_table_offset = 0x1000;
    h.refcount_table_clusters = 1;
    h.l1_table_offset = 0x3000;
    h.l1_size = 1;
    let bytes = h.serialize().unwrap();
    assert_eq!(&bytes[0x70..0x78], &[0; 8]);
}

#[test]
fn v2_roundtrip() {
    let g = Geometry::new(16, 4, false).unwrap();
    let mut h = Header::new(2, g, 1 << 30);
    h.refcount_table_offset = 0x10000;
    h.refcount_table_clusters = 1;
    h.l1_table_offset = 0x30000;
    h.l1_size = 2;
    let bytes = h.serialize().unwrap();
    assert!(bytes[72..].iter().all(|b| *b == 0), "v2: no extensions, no feature table");
    let p = Header::parse(&bytes).unwrap();
    assert_eq!(p.version, 2);
    assert_eq!(p.refcount_order, 4);
    assert_eq!(p.header_length, 72);
}

#[test]
fn bad_magic() {
    let mut b = valid_bytes();
    b[0] = 0;
    assert!(matches!(parse_err(&b), FormatError::BadMagic { .. }));
}

#[test]
fn bad_version() {
    for v in [0, 1, 4, u32::MAX] {
        let mut b = valid_bytes();
        put32(&mut b, 4, v);
        assert_eq!(parse_err(&b), FormatError::UnsupportedVersion(v));
    }
}

#[test]
fn cluster_bits_out_of_range() {
    for bits in [0, 8, 22, 63, 64, u32::MAX] {
        let mut b = valid_bytes();
        put32(&mut b, 20, bits);
        assert_eq!(parse_err(&b), FormatError::ClusterBits(bits));
    }
}

#[test]
fn cluster_smaller_than_buffer_is_truncated() {
    let b = valid_bytes();
    assert!(matches!(parse_err(&b[..4096]), FormatError::Truncated { .. }));
    assert!(matches!(parse_err(&b[..50]), FormatError::Truncated { .. }));
}

#[test]
fn header_length_checks() {
    let mut b = valid_bytes();
    put32(&mut b, 100, 96);
    assert_eq!(parse_err(&b), FormatError::HeaderTooShort(96));
    put32(&mut b, 100, 0x20000);
    assert!(matches!(parse_err(&b), FormatError::HeaderExceedsCluster { .. }));
    put32(&mut b, 100, 105);
    assert_eq!(parse_err(&b), FormatError::HeaderLengthUnaligned(105));
}

#[test]
fn header_length_104_has_no_compression_byte() {
    let mut b = valid_bytes();
    put32(&mut b, 100, 104);
    b[104] = 7; // would be an unknown compression type if it were read
                // Extensions now start at 104, where there are zeros... then garbage.
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.compression_type, 0);
}

#[test]
fn unknown_header_fields_are_kept() {
    let mut h = valid_header();
    h.unknown_header_fields = vec![0xab; 16];
    let bytes = h.serialize().unwrap();
    let p = Header::parse(&bytes).unwrap();
    assert_eq!(p.header_length, 128);
    assert_eq!(p.unknown_header_fields, vec![0xab; 16]);
}

#[test]
fn backing_offset_outside_cluster() {
    let mut b = valid_bytes();
    put64(&mut b, 8, 0x10001);
    assert!(matches!(parse_err(&b), FormatError::BackingFileOffset { .. }));
}

#[test]
fn backing_name_too_long() {
    let mut b = valid_bytes();
    put64(&mut b, 8, 0x1000);
    put32(&mut b, 16, 1024);
    assert_eq!(parse_err(&b), FormatError::BackingNameTooLong(1024));
    // Past the cluster end even though below 1023.
    put64(&mut b, 8, 0xff00);
    put32(&mut b, 16, 0x200);
    assert_eq!(parse_err(&b), FormatError::BackingNameTooLong(0x200));
}

#[test]
fn extension_overrunning_the_cluster() {
    let mut b = valid_bytes();
    // The feature table extension starts at 0x70; claim it is huge.
    put32(&mut b, 0x74, u32::MAX);
    assert!(matches!(parse_err(&b), FormatError::ExtensionTooLarge { .. }));
    put32(&mut b, 0x74, 0x10000);
    assert!(matches!(parse_err(&b), FormatError::ExtensionTooLarge { .. }));
}

#[test]
fn extension_overrunning_the_backing_name() {
    let mut h = valid_header();
    h.backing_file = Some("b".into());
    let mut b = h.serialize().unwrap();
    // Make the feature table length reach past the backing name offset.
    put32(&mut b, 0x74, 0x200);
    assert!(matches!(parse_err(&b), FormatError::ExtensionTooLarge { .. }));
}

#[test]
fn duplicate_known_extension() {
    let mut h = valid_header();
    h.extensions.unknown.push(UnknownExtension { magic: ext::BACKING_FORMAT, data: b"raw".to_vec() });
    h.extensions.backing_format = Some("qcow2".into());
    let b = h.serialize().unwrap();
    assert_eq!(parse_err(&b), FormatError::DuplicateExtension(ext::BACKING_FORMAT));
}

#[test]
fn backing_format_too_long() {
    let mut h = valid_header();
    h.extensions.backing_format = Some("x".repeat(16));
    let b = h.serialize().unwrap();
    assert!(matches!(parse_err(&b), FormatError::InvalidExtension { .. }));
}

#[test]
fn unknown_incompatible_bits_are_named() {
    let mut b = valid_bytes();
    put64(&mut b, 72, 1 << 5 | 1 << 40);
    let err = parse_err(&b);
    assert_eq!(err, FormatError::UnsupportedFeatures("Unknown incompatible feature: 10000000020".into()));
    // With a name in the feature table.
    let mut h = valid_header();
    h.incompatible_features = 1 << 5;
    let mut table = vec![0u8; 48];
    table[1] = 5;
    table[2..10].copy_from_slice(b"new-toy!");
    h.extensions.unknown.push(UnknownExtension { magic: 0x7777_7777, data: vec![0; 8] });
    let mut b = h.serialize().unwrap();
    // Replace QEMU's table (at 0x70) by one naming bit 5.
    put32(&mut b, 0x74, 48);
    b[0x78..0x78 + 48].copy_from_slice(&table);
    put32(&mut b, 0x78 + 48, 0);
    put32(&mut b, 0x78 + 52, 0);
    assert_eq!(parse_err(&b), FormatError::UnsupportedFeatures("new-toy!".into()));
}

#[test]
fn refcount_order_above_six() {
    let mut b = valid_bytes();
    put32(&mut b, 96, 7);
    assert_eq!(parse_err(&b), FormatError::RefcountOrder(7));
}

#[test]
fn crypt_method_above_two() {
    let mut b = valid_bytes();
    put32(&mut b, 32, 3);
    assert_eq!(parse_err(&b), FormatError::CryptMethod(3));
}

/// Guards the wording: QEMU's messages for a CRYPTO extension that
/// contradicts `crypt_method` name no extension number (qemu-img printed
/// "Missing CRYPTO header for crypt method 2", oxqcow prefixed it with
/// "Invalid header extension 0x0537be77: ").
#[test]
fn luks_needs_crypto_extension() {
    let mut b = valid_bytes();
    put32(&mut b, 32, 2);
    assert_eq!(parse_err(&b).to_string(), "Missing CRYPTO header for crypt method 2");
    let mut h = valid_header();
    h.extensions.crypto = Some(CryptoExtension { offset: 0x40000, length: 0x1000 });
    assert_eq!(
        parse_err(&h.serialize().unwrap()).to_string(),
        "CRYPTO header extension only expected with LUKS encryption method"
    );
}

#[test]
fn refcount_table_checks() {
    let mut b = valid_bytes();
    put32(&mut b, 56, 0);
    assert_eq!(parse_err(&b), FormatError::NoRefcountTable);
    // The open for check takes it (and rebuilds the refcounts).
    assert_eq!(Header::parse_for_check(&b).unwrap().refcount_table_clusters, 0);
    put32(&mut b, 56, 129); // 129 clusters of 64 KiB > 8 MiB
    assert!(matches!(parse_err(&b), FormatError::TableTooLarge { .. }));
    put32(&mut b, 56, 1);
    put64(&mut b, 48, 0x10200);
    assert!(matches!(parse_err(&b), FormatError::TableOffset { .. }));
    put64(&mut b, 48, !0xffff);
    assert!(matches!(parse_err(&b), FormatError::TableOffset { .. }));
}

#[test]
fn snapshot_table_checks() {
    let mut b = valid_bytes();
    put32(&mut b, 60, 65537);
    assert!(matches!(parse_err(&b), FormatError::TableTooLarge { .. }));
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 0x123);
    assert!(matches!(parse_err(&b), FormatError::TableOffset { .. }));
}

#[test]
fn l1_checks() {
    let mut b = valid_bytes();
    put32(&mut b, 36, u32::MAX);
    assert!(matches!(parse_err(&b), FormatError::TableTooLarge { .. }));
    put32(&mut b, 36, 1);
    assert!(matches!(parse_err(&b), FormatError::L1TooSmall { .. }));
    put32(&mut b, 36, 2);
    put64(&mut b, 40, 0x30008);
    assert!(matches!(parse_err(&b), FormatError::TableOffset { .. }));
}

#[test]
fn size_overflow() {
    for size in [u64::MAX, 1 << 63, (1 << 62) + 1] {
        let mut b = valid_bytes();
        put64(&mut b, 24, size);
        let err = parse_err(&b);
        assert!(matches!(err, FormatError::ImageTooBig(_) | FormatError::L1TooSmall { .. }), "size {size}: {err:?}");
    }
    // The largest size QEMU accepts with 512-byte clusters needs a huge L1.
    let mut b = valid_bytes();
    put32(&mut b, 20, 9);
    put64(&mut b, 24, u64::MAX);
    assert!(matches!(parse_err(&b[..512]), FormatError::ImageTooBig(_)));
}

#[test]
fn compression_type_consistency() {
    let mut b = valid_bytes();
    b[104] = 1;
    assert!(matches!(parse_err(&b), FormatError::CompressionType(_)));
    put64(&mut b, 72, incompat::COMPRESSION);
    assert_eq!(Header::parse(&b).unwrap().compression_type, 1);
    b[104] = 0;
    assert!(matches!(parse_err(&b), FormatError::CompressionType(_)));
    b[104] = 2;
    assert!(matches!(parse_err(&b), FormatError::CompressionType(_)));
}

#[test]
fn extended_l2_needs_16k_clusters() {
    let mut b = valid_bytes();
    put32(&mut b, 20, 13);
    put64(&mut b, 72, incompat::EXTL2);
    put64(&mut b, 48, 0x2000);
    put64(&mut b, 40, 0x6000);
    put32(&mut b, 36, 1 << 20);
    assert_eq!(parse_err(&b[..8192]), FormatError::SubclusterSize(256));
}

#[test]
fn bitmaps_extension_checks() {
    let mut h = valid_header();
    h.autoclear_features = autoclear::BITMAPS;
    h.extensions.bitmaps = Some(BitmapsExtension { nb_bitmaps: 0, directory_size: 0, directory_offset: 0 });
    assert!(matches!(parse_err(&h.serialize().unwrap()), FormatError::InvalidExtension { .. }));
    h.extensions.bitmaps = Some(BitmapsExtension { nb_bitmaps: 70000, directory_size: 0, directory_offset: 0 });
    assert!(matches!(parse_err(&h.serialize().unwrap()), FormatError::InvalidExtension { .. }));
    h.extensions.bitmaps = Some(BitmapsExtension { nb_bitmaps: 1, directory_size: 1 << 40, directory_offset: 0 });
    assert!(matches!(parse_err(&h.serialize().unwrap()), FormatError::InvalidExtension { .. }));
    h.extensions.bitmaps = Some(BitmapsExtension { nb_bitmaps: 1, directory_size: 64, directory_offset: 0x40000 });
    let p = Header::parse(&h.serialize().unwrap()).unwrap();
    assert_eq!(p.extensions.bitmaps.unwrap().nb_bitmaps, 1);
    // Without the autoclear bit the extension is stale and dropped.
    h.autoclear_features = 0;
    let mut p = Header::parse(&h.serialize().unwrap()).unwrap();
    assert!(p.extensions.stale_bitmaps);
    assert!(p.extensions.bitmaps.is_none());
    let rewritten = p.serialize().unwrap();
    assert!(!rewritten.windows(4).any(|w| w == ext::BITMAPS.to_be_bytes()));
}

#[test]
fn tables_past_eof_or_on_header() {
    let h = valid_header();
    assert!(h.validate_against_file(0x30010, false).is_ok());
    // A truncated active L1 table reads as zeros, as in QEMU.
    assert!(h.validate_against_file(0x30008, false).is_ok());
    assert!(h.validate_against_file(0x20000, false).is_ok());
    let mut h3 = valid_header();
    h3.refcount_table_clusters = 0x100;
    assert!(matches!(h3.validate_against_file(0x30010, false), Err(FormatError::TablePastEof { .. })));
    // For check, a refcount table past the end reads as zeros too.
    assert!(h3.validate_against_file(0x30010, true).is_ok());
    let mut h2 = valid_header();
    h2.l1_table_offset = 0;
    assert!(matches!(h2.validate_against_file(1 << 20, false), Err(FormatError::TableOverlapsHeader { .. })));
    assert!(matches!(h2.validate_against_file(1 << 20, true), Err(FormatError::TableOverlapsHeader { .. })));
    // A refcount table on the header is read (as QEMU reads it) by the
    // opens that allocate nothing.
    let mut h4 = valid_header();
    h4.refcount_table_offset = 0;
    assert!(matches!(h4.validate_against_file(1 << 20, false), Err(FormatError::TableOverlapsHeader { .. })));
    assert!(h4.validate_against_file(1 << 20, true).is_ok());
}

#[test]
fn header_too_large_for_cluster() {
    let g = Geometry::new(9, 4, false).unwrap();
    let mut h = Header::new(3, g, 1 << 20);
    h.extensions.unknown.push(UnknownExtension { magic: 0x55, data: vec![0; 400] });
    assert!(matches!(h.serialize(), Err(FormatError::HeaderTooLarge { .. })));
}
