//! Engine behaviour that qemu-img's output makes visible, run by both tools
//! on copies of the same images: what `map` shows after `convert -n` and
//! `rebase`, where the allocator puts clusters, what `check` finds after
//! failed operations, and the file's end after operations that shrink.

mod common;

use common::Scratch;

/// Makes `name` (compat `compat`, an overlay of `base` when given) and
/// fills some of it with data, so that zeroing has something to replace.
fn target(s: &Scratch, name: &str, compat: &str, base: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o"];
    let opts = format!("compat={compat}");
    args.push(&opts);
    if let Some(b) = base {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.extend([name, "4M"]);
    s.qemu_ok(&args);
    s.qemu_io("qcow2", name, &["write -P 7 0 64k", "write -P 8 1M 128k"]);
}

/// `convert -n` into an image that does not start zeroed zeroed only the
/// ranges that did not read as zeros yet; qemu-img zeroes every zero range
/// of the source, so a version 3 target shows zero clusters where it was
/// unallocated, and a version 2 overlay gets zeros written as data. The
/// maps are compared with their host offsets: the clusters the zeroing
/// frees are reused by the writes that follow, as in QEMU.
#[test]
fn convert_into_an_existing_image_zeroes_every_zero_range() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "src.qcow2", "4M"]);
    s.qemu_io("qcow2", "src.qcow2", &["write -P 3 2M 64k"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    s.qemu_io("qcow2", "base.qcow2", &["write -P 5 0 4M"]);
    for compat in ["1.1", "0.10"] {
        for base in [None, Some("base.qcow2")] {
            for who in ["q", "o"] {
                target(&s, &format!("{who}.qcow2"), compat, base);
            }
            s.qemu_ok(&["convert", "-n", "-O", "qcow2", "src.qcow2", "q.qcow2"]);
            s.ours_ok(&["convert", "-n", "-O", "qcow2", "src.qcow2", "o.qcow2"]);
            let q = s.qemu_ok(&["map", "--output=json", "q.qcow2"]).stdout;
            let o = s.qemu_ok(&["map", "--output=json", "o.qcow2"]).stdout;
            assert_eq!(o, q, "compat={compat}, backing {base:?}");
            s.assert_clean("o.qcow2");
        }
    }
}

/// `convert -n -B` asked for the backing file's format, which only the
/// creation of a target needs: with -n qemu-img converts without it.
#[test]
fn convert_n_with_a_backing_file_needs_no_format() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "src.qcow2", "4M"]);
    s.qemu_io("qcow2", "src.qcow2", &["write -P 3 64k 64k"]);
    for who in ["q", "o"] {
        s.qemu_ok(&["create", "-q", "-f", "qcow2", &format!("{who}.qcow2"), "4M"]);
    }
    let q = s.qemu(&["convert", "-O", "qcow2", "-B", "base.qcow2", "-n", "src.qcow2", "q.qcow2"]);
    let o = s.ours(&["convert", "-O", "qcow2", "-B", "base.qcow2", "-n", "src.qcow2", "o.qcow2"]);
    assert_eq!((o.code, o.stdout, o.stderr), (q.code, q.stdout, q.stderr));
    s.assert_identical("q.qcow2", "o.qcow2");
}

/// Safe `rebase` wrote what lies past the old backing file's end (all of
/// the disk, without one) as data; qemu-img writes zeros there as zero
/// writes, which become zero clusters on a version 3 image.
#[test]
fn rebase_writes_zeros_past_the_old_backing_end_as_zero_clusters() {
    let s = Scratch::new();
    let cs = 65536;
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "new.qcow2", "768k"]);
    s.qemu_io("qcow2", "new.qcow2", &["write -P 0x11 0 64k", "write -P 0x11 128k 64k", "write -P 0x11 256k 448k"]);
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "old.qcow2", "384k"]);
    s.qemu_io("qcow2", "old.qcow2", &["write -P 0x33 320k 64k"]);
    // Without a backing file, and over one shorter than the new one.
    for old in [None, Some("old.qcow2")] {
        for who in ["q", "o"] {
            let name = format!("{who}.qcow2");
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if let Some(b) = old {
                args.extend(["-b", b, "-F", "qcow2"]);
            }
            args.extend([name.as_str(), "768k"]);
            s.qemu_ok(&args);
            s.qemu_io(
                "qcow2",
                &name,
                &[&format!("write -P 0x22 0 {}", 2 * cs), &format!("write -P 0x11 {} 32k", 2 * cs)],
            );
        }
        s.qemu_ok(&["rebase", "-b", "new.qcow2", "-F", "qcow2", "q.qcow2"]);
        s.ours_ok(&["rebase", "-b", "new.qcow2", "-F", "qcow2", "o.qcow2"]);
        let q = s.qemu_ok(&["map", "--output=json", "q.qcow2"]).stdout;
        let o = s.qemu_ok(&["map", "--output=json", "o.qcow2"]).stdout;
        assert_eq!(o, q, "old backing {old:?}");
        s.assert_identical("q.qcow2", "o.qcow2");
        s.assert_clean("o.qcow2");
    }
}

/// An image whose file ends inside (here: at the start of) its active L1
/// table was refused at open; QEMU reads the missing entries as zeros, so
/// the image opens, reads as zeros there, checks and takes writes.
#[test]
fn an_image_truncated_inside_its_l1_table_reads_the_missing_entries_as_zeros() {
    let s = Scratch::new();
    for who in ["q", "o"] {
        let name = format!("{who}.qcow2");
        s.qemu_ok(&["create", "-q", "-f", "qcow2", &name, "64M"]);
        s.qemu_io("qcow2", &name, &["write -P 1 0 64k", "write -P 2 32M 64k"]);
        let header = std::fs::read(s.path(&name)).unwrap();
        let l1 = u64::from_be_bytes(header[40..48].try_into().unwrap());
        std::fs::OpenOptions::new().write(true).open(s.path(&name)).unwrap().set_len(l1).unwrap();
    }
    let read = ["read -P 0 0 64k", "read -P 0 32M 64k"];
    s.qemu_io("qcow2", "q.qcow2", &read);
    let o = s.ours_ok(&["io", "-f", "qcow2", "-c", read[0], "-c", read[1], "o.qcow2"]);
    assert!(!o.stdout.contains("failed"), "{}", o.stdout);
    let (q, o) = (s.qemu(&["check", "q.qcow2"]), s.ours(&["check", "o.qcow2"]));
    assert_eq!((o.code, o.stdout), (q.code, q.stdout));
    s.qemu_io("qcow2", "q.qcow2", &["write -P 5 0 64k"]);
    s.ours_ok(&["io", "-f", "qcow2", "-c", "write -P 5 0 64k", "o.qcow2"]);
    s.assert_identical("q.qcow2", "o.qcow2");
    let (q, o) = (std::fs::read(s.path("q.qcow2")).unwrap(), std::fs::read(s.path("o.qcow2")).unwrap());
    assert!(q == o, "the files differ (lengths {} and {})", q.len(), o.len());
}

/// A refcount table entry that is not cluster aligned made the open fail;
/// QEMU opens the image, serves reads, and fails (marking the image
/// corrupt) only the request that needs that refcount block.
#[test]
fn an_unaligned_refcount_block_fails_the_write_that_needs_it_not_the_open() {
    let s = Scratch::new();
    for who in ["q", "o"] {
        let name = format!("{who}.qcow2");
        s.qemu_ok(&["create", "-q", "-f", "qcow2", &name, "64M"]);
        s.qemu_io("qcow2", &name, &["write -P 7 0 64k"]);
        let header = std::fs::read(s.path(&name)).unwrap();
        let table = u64::from_be_bytes(header[48..56].try_into().unwrap());
        let block = u64::from_be_bytes(header[table as usize..table as usize + 8].try_into().unwrap());
        common::patch(&s.path(&name), table, &(block + 0x200).to_be_bytes());
    }
    let read = "read -P 7 0 64k";
    let q = common::run_in(s.dir.path(), std::path::Path::new("qemu-io"), &["-f", "qcow2", "-c", read, "q.qcow2"]);
    let o = s.ours(&["io", "-f", "qcow2", "-c", read, "o.qcow2"]);
    assert_eq!((o.code, o.stdout.lines().next()), (q.code, q.stdout.lines().next()), "{o:?}");
    let write = "write -P 8 1M 64k";
    let q = common::run_in(s.dir.path(), std::path::Path::new("qemu-io"), &["-f", "qcow2", "-c", write, "q.qcow2"]);
    let o = s.ours(&["io", "-f", "qcow2", "-c", write, "o.qcow2"]);
    assert_eq!((o.code, o.stdout.lines().next()), (q.code, q.stdout.lines().next()), "{o:?}");
    for name in ["q.qcow2", "o.qcow2"] {
        let info = s.qemu_ok(&["info", name]).stdout;
        assert!(info.contains("corrupt: true"), "{name} is not marked corrupt:\n{info}");
    }
    s.assert_identical("q.qcow2", "o.qcow2");
}

/// An L1 entry naming the refcount table's cluster as an L2 table: the
/// repair rebuilt the refcount structure elsewhere, then its COPIED repair
/// refused to write that L2 table because the overlap check still knew the
/// old table's place ("Check failed"). QEMU's repair completes.
#[test]
fn repair_writes_an_l2_table_placed_over_the_old_refcount_table() {
    let s = Scratch::new();
    for who in ["q", "o"] {
        let name = format!("{who}.qcow2");
        s.qemu_ok(&["create", "-q", "-f", "qcow2", &name, "64M"]);
        s.qemu_io("qcow2", &name, &["write -P 1 0 64k"]);
        let header = std::fs::read(s.path(&name)).unwrap();
        let l1 = u64::from_be_bytes(header[40..48].try_into().unwrap());
        let reftable = u64::from_be_bytes(header[48..56].try_into().unwrap());
        common::patch(&s.path(&name), l1, &(reftable | 1 << 63).to_be_bytes());
    }
    let q = s.qemu(&["check", "-r", "all", "q.qcow2"]);
    let o = s.ours(&["check", "-r", "all", "o.qcow2"]);
    assert_eq!((o.code, o.stdout, o.stderr), (q.code, q.stdout, q.stderr));
    s.assert_clean("o.qcow2");
    let (q, o) = (std::fs::read(s.path("q.qcow2")).unwrap(), std::fs::read(s.path("o.qcow2")).unwrap());
    assert!(q == o, "the repaired files differ");
}

// Guards against the allocator going back to free clusters that a longer
// run passed over: QEMU's free cluster index moves past holes too small for
// the run, so a later single cluster lands after the run, not in the hole
// (a file with no room left past its end, such as a raw window, shows the
// difference as a failed write).
#[test]
fn clusters_passed_over_by_a_longer_run_stay_free_as_in_qemu() {
    use common::{must, oxqcow, qemu_img, qemu_io, Pair};
    let pair = Pair::new();
    for dir in [&pair.qemu, &pair.ox] {
        must(dir, qemu_img(), &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"]);
        // Each store of the bitmaps frees the clusters of the one before:
        // holes of two clusters.
        for b in ["b1", "b2", "b3"] {
            must(dir, qemu_img(), &["bitmap", "--add", "a.qcow2", b]);
        }
    }
    let cmds = ["-c", "write -P 1 0 1M", "-c", "write -P 2 4M 64k", "a.qcow2"];
    must(&pair.qemu, qemu_io(), &cmds);
    let mut ours = vec!["io"];
    ours.extend(cmds);
    must(&pair.ox, oxqcow(), &ours);
    let map = |dir| must(dir, qemu_img(), &["map", "--output=json", "a.qcow2"]).stdout;
    assert_eq!(map(&pair.ox), map(&pair.qemu));
    for dir in [&pair.qemu, &pair.ox] {
        must(dir, qemu_img(), &["check", "a.qcow2"]);
    }
}

/// Clusters a discard freed were reused only after the next flush (for
/// crash safety), so in one writeback session the writes after a discard
/// went to the end of the file where QEMU, which frees at once, reuses the
/// freed clusters: `map` showed other host offsets. The engine now makes
/// the discard durable before the allocation that would reuse them, and
/// places data and new L2 tables (for writes and zero writes) as QEMU does.
#[test]
fn writes_after_a_discard_reuse_the_freed_clusters_as_qemu_does() {
    let s = Scratch::new();
    // 4 KiB clusters: an L2 table maps 2 MiB, so the write at 6M needs a
    // new table, which goes into a freed cluster too.
    for cluster_size in ["65536", "4096"] {
        let cmds = [
            "write -P 1 0 1M",
            "discard 128k 256k",
            "write -P 2 2M 192k",
            "write -P 3 6M 64k",
            "discard 0 64k",
            // With 4 KiB clusters a zero write needs a new L2 table too.
            "write -z 4M 64k",
            "write -P 4 3M 16k",
        ];
        for who in ["q", "o"] {
            let name = format!("{who}.qcow2");
            s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", &format!("cluster_size={cluster_size}"), &name, "8M"]);
            let mut args = vec!["-t", "writeback", "-f", "qcow2"];
            for c in cmds {
                args.extend(["-c", c]);
            }
            args.push(&name);
            if who == "q" {
                let o = common::run_in(s.dir.path(), common::qemu_io(), &args);
                assert!(o.code == 0 && !o.stdout.contains("failed"), "qemu-io: {o:?}");
            } else {
                args.insert(0, "io");
                let o = s.ours_ok(&args);
                assert!(!o.stdout.contains("failed"), "oxqcow io: {o:?}");
            }
        }
        let q = s.qemu_ok(&["map", "--output=json", "q.qcow2"]).stdout;
        let o = s.qemu_ok(&["map", "--output=json", "o.qcow2"]).stdout;
        assert_eq!(o, q, "cluster_size={cluster_size}");
        s.assert_identical("q.qcow2", "o.qcow2");
        s.assert_clean("o.qcow2");
    }
}

/// A write whose new clusters reach past the last refcount block's range
/// put the new block at the first free cluster, before the data, so every
/// later cluster (and the file's end) sat one cluster further up per block
/// than in QEMU's image. QEMU picks the data run first and puts each new
/// block right after it; the files must be byte for byte the same.
#[test]
fn new_refcount_blocks_go_past_the_clusters_being_allocated() {
    let s = Scratch::new();
    // 512 refcounts per 4 KiB block: 8 MiB of data needs five blocks.
    let size = 8 << 20;
    for who in ["q", "o"] {
        let name = format!("{who}.qcow2");
        s.qemu_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096,refcount_bits=64",
            &name,
            &size.to_string(),
        ]);
    }
    let write = format!("write -P 1 0 {size}");
    s.qemu_io("qcow2", "q.qcow2", &[&write]);
    s.ours_ok(&["io", "-f", "qcow2", "-c", &write, "o.qcow2"]);
    s.assert_clean("o.qcow2");
    let (q, o) = (std::fs::read(s.path("q.qcow2")).unwrap(), std::fs::read(s.path("o.qcow2")).unwrap());
    assert!(q == o, "the files differ (lengths {} and {})", q.len(), o.len());
}
