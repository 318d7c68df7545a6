//! Images with extended L2 entries (subclusters) against QEMU, both ways,
//! at cluster sizes 16 KiB, 64 KiB and 2 MiB, fresh and over a backing
//! file:
//!
//! - QEMU-made images (scattered small writes, zero writes with and
//!   without unmap, discards): `map` (JSON and human) prints what qemu-img
//!   prints, oxqcow reads them as qemu-img does (`compare` against
//!   qemu-img's raw conversion), and `check` reports what qemu-img reports;
//! - the same random workload (unaligned writes, `write -z`, `write -z -u`,
//!   discards) run by `oxqcow io` and by `qemu-io` on twin images: the
//!   images read the same, `qemu-img check` finds oxqcow's clean, and
//!   their allocation maps agree (host offsets aside: oxqcow reuses freed
//!   clusters only after a flush, QEMU at once);
//! - creation, info, measure, convert and amend refusals as qemu-img;
//! - invalid subcluster bitmaps: `check` reports them as qemu-img does,
//!   and reading through one marks the image corrupt, as QEMU does.

mod common;

use common::{Rng, Scratch};

const CLUSTER_SIZES: [u64; 3] = [16 << 10, 64 << 10, 2 << 20];

fn qemu_io_cmds(s: &Scratch, image: &str, cmds: &[String]) {
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    s.qemu_io("qcow2", image, &refs);
}

fn ours_io_cmds(s: &Scratch, image: &str, cmds: &[String]) {
    let mut args = vec!["io", "-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    let o = s.ours_ok(&args);
    assert!(!o.stdout.contains("failed"), "oxqcow io {cmds:?}: {}", o.stdout);
}

/// A backing file of `size` bytes with data in most of its clusters.
fn make_backing(s: &Scratch, size: u64) {
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "base.qcow2", &size.to_string()]);
    let mut cmds = Vec::new();
    let mut at = 0;
    let mut byte = 1;
    while at < size {
        let len = (size - at).min(300 << 10);
        cmds.push(format!("write -P {byte} {at} {len}"));
        at += len + (100 << 10);
        byte += 1;
    }
    qemu_io_cmds(s, "base.qcow2", &cmds);
}

fn create_ext(s: &Scratch, name: &str, cs: u64, size: u64, overlay: bool) {
    let mut opts = format!("extended_l2=on,cluster_size={cs}");
    if overlay {
        opts.push_str(",backing_file=base.qcow2,backing_fmt=qcow2");
    }
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", &opts, name, &size.to_string()]);
}

/// Scattered small writes and zero writes inside clusters, partial
/// subclusters, discards of whole clusters, a write at the last byte.
fn scattered(cs: u64, size: u64) -> Vec<String> {
    let sc = cs / 32;
    vec![
        format!("write -P 1 {} 512", sc * 3),
        format!("write -P 2 {} 100", cs + sc * 5 + 7),
        format!("write -P 3 {} {}", 2 * cs + sc * 31, sc + 1000),
        format!("write -z {} {}", 3 * cs + sc * 2, 2 * sc),
        format!("write -P 4 {} {}", 4 * cs, 3 * sc),
        format!("write -z {} {}", 4 * cs + sc + 100, 300),
        format!("write -z -u {} {}", 4 * cs + 2 * sc, sc),
        format!("write -P 5 {} {}", 5 * cs, 2 * cs),
        format!("discard {} {}", 5 * cs, cs),
        format!("write -z -u {} {}", 6 * cs, cs),
        format!("write -z {} {}", 7 * cs, cs),
        format!("write -P 6 {} 4096", 8 * cs + 3 * sc),
        format!("discard {} {}", 8 * cs, cs),
        format!("write -P 7 {} 1", size - 1),
    ]
}

fn size_for(cs: u64) -> u64 {
    10 * cs + 3 * 512
}

fn check_qemu_made(s: &Scratch, name: &str) {
    for output in ["--output=json", "--output=human"] {
        s.assert_same(&["map", output, name]);
    }
    s.assert_same(&["map", "--output=json", "--start-offset", "1000", "--max-length", "100000", name]);
    s.assert_same(&["info", name]);
    s.assert_same(&["check", name]);
    s.qemu_ok(&["convert", "-O", "raw", name, "qemu.raw"]);
    s.assert_same(&["compare", name, "qemu.raw"]);
    s.ours_ok(&["convert", "-O", "raw", name, "ours.raw"]);
    assert!(std::fs::read(s.path("ours.raw")).unwrap() == std::fs::read(s.path("qemu.raw")).unwrap());
}

#[test]
fn qemu_made_images_read_map_and_check_as_qemu() {
    for cs in CLUSTER_SIZES {
        for overlay in [false, true] {
            let s = Scratch::new();
            let size = size_for(cs);
            if overlay {
                make_backing(&s, size - 3 * cs);
            }
            create_ext(&s, "q.qcow2", cs, size, overlay);
            qemu_io_cmds(&s, "q.qcow2", &scattered(cs, size));
            check_qemu_made(&s, "q.qcow2");
        }
    }
}

/// The allocation map without host offsets, with runs that only host
/// offsets kept apart merged, and data over host holes counted as data
/// (how the host file's holes look is up to the file system).
fn shape(map_json: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(map_json).expect("map json");
    let mut out: Vec<serde_json::Value> = Vec::new();
    for mut e in v.as_array().unwrap().iter().cloned() {
        let o = e.as_object_mut().unwrap();
        o.remove("offset");
        if o["data"] == true {
            o.insert("zero".into(), false.into());
        }
        if let Some(last) = out.last_mut() {
            let same = ["depth", "present", "zero", "data", "compressed"].iter().all(|k| last[*k] == e[*k]);
            let (ls, ll) = (last["start"].as_u64().unwrap(), last["length"].as_u64().unwrap());
            if same && ls + ll == e["start"].as_u64().unwrap() {
                last["length"] = (ll + e["length"].as_u64().unwrap()).into();
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// Runs `cmds` with qemu-io on `q.qcow2` and with oxqcow io on `o.qcow2`
/// (made alike) and compares the results.
fn run_twins(s: &Scratch, cmds: &[String], what: &str) {
    qemu_io_cmds(s, "q.qcow2", cmds);
    ours_io_cmds(s, "o.qcow2", cmds);
    let o = s.qemu(&["compare", "q.qcow2", "o.qcow2"]);
    assert_eq!(o.code, 0, "{what}: images differ: {o:?}\ncommands: {cmds:#?}");
    s.assert_clean("o.qcow2");
    let mq = s.qemu_ok(&["map", "--output=json", "q.qcow2"]).stdout;
    let mo = s.qemu_ok(&["map", "--output=json", "o.qcow2"]).stdout;
    assert_eq!(shape(&mq), shape(&mo), "{what}: allocation differs\ncommands: {cmds:#?}");
    // And oxqcow's map of its own image is qemu-img's.
    s.assert_same(&["map", "--output=json", "o.qcow2"]);
}

#[test]
fn scattered_writes_match_qemu() {
    for cs in CLUSTER_SIZES {
        for overlay in [false, true] {
            let s = Scratch::new();
            let size = size_for(cs);
            if overlay {
                make_backing(&s, size - 3 * cs);
            }
            create_ext(&s, "q.qcow2", cs, size, overlay);
            create_ext(&s, "o.qcow2", cs, size, overlay);
            run_twins(&s, &scattered(cs, size), &format!("cluster size {cs}, overlay {overlay}"));
        }
    }
}

/// Random requests, a third of them no longer than a subcluster.
fn random_workload(rng: &mut Rng, cs: u64, size: u64, n: usize) -> Vec<String> {
    let sc = cs / 32;
    (0..n)
        .map(|_| {
            let offset = if rng.below(2) == 0 { rng.below(size / 512) * 512 } else { rng.below(size - 1) };
            let mut len = 1 + rng.below((3 * cs).min(size - offset));
            if rng.below(3) == 0 {
                len = len.min([sc, sc / 2, 2 * sc, 100][rng.below(4) as usize]);
            }
            let len = len.clamp(1, size - offset);
            match rng.below(20) {
                0..=10 => format!("write -P {} {offset} {len}", 1 + rng.below(254)),
                11..=13 => format!("write -z {offset} {len}"),
                14..=15 => format!("write -z -u {offset} {len}"),
                _ => format!("discard {offset} {len}"),
            }
        })
        .collect()
}

#[test]
fn random_workloads_match_qemu() {
    for (i, cs) in CLUSTER_SIZES.into_iter().enumerate() {
        for overlay in [false, true] {
            let mut rng = Rng::new(0x5eed + i as u64 * 2 + u64::from(overlay));
            let s = Scratch::new();
            let size = 24 * cs + rng.below(8) * 512;
            if overlay {
                make_backing(&s, size - 5 * cs);
            }
            create_ext(&s, "q.qcow2", cs, size, overlay);
            create_ext(&s, "o.qcow2", cs, size, overlay);
            // Two sessions: the second one sees what the first one left.
            for round in 0..2 {
                let cmds = random_workload(&mut rng, cs, size, 30);
                run_twins(&s, &cmds, &format!("cluster size {cs}, overlay {overlay}, round {round}"));
            }
        }
    }
}

#[test]
fn create_info_measure_convert_and_amend_as_qemu() {
    let s = Scratch::new();
    for cs in ["16k", "64k", "2M"] {
        let opts = format!("extended_l2=on,cluster_size={cs}");
        s.assert_same(&["create", "-f", "qcow2", "-o", &opts, &format!("c{cs}.qcow2"), "3G"]);
        let q = std::fs::read(s.path(&format!("c{cs}.qcow2"))).unwrap();
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", &opts, "ref.qcow2", "3G"]);
        assert!(q == std::fs::read(s.path("ref.qcow2")).unwrap(), "created {cs} image differs from qemu-img's");
        s.assert_same(&["info", &format!("c{cs}.qcow2")]);
        s.assert_same(&["info", "--output=json", &format!("c{cs}.qcow2")]);
        s.assert_same(&["measure", "-O", "qcow2", "-o", &opts, "--size", "100G"]);
    }
    s.assert_same(&["create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=8k", "bad.qcow2", "1G"]);
    s.assert_same(&["create", "-f", "qcow2", "-o", "extended_l2=on,compat=0.10", "bad.qcow2", "1G"]);
    // A source with data, zeros and holes, converted to extended L2.
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "src.qcow2", "8M"]);
    s.qemu_io("qcow2", "src.qcow2", &["write -P 5 100k 300k", "write -z 1M 1M", "write -P 7 5M 3k"]);
    s.assert_same(&["measure", "-O", "qcow2", "-o", "extended_l2=on", "src.qcow2"]);
    let convert = ["convert", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=16k", "src.qcow2"];
    s.ours_ok(&[&convert[..], &["ours.qcow2"]].concat());
    s.qemu_ok(&[&convert[..], &["qemu.qcow2"]].concat());
    assert!(std::fs::read(s.path("ours.qcow2")).unwrap() == std::fs::read(s.path("qemu.qcow2")).unwrap());
    s.assert_identical("ours.qcow2", "src.qcow2");
    s.assert_same(&["measure", "-O", "qcow2", "qemu.qcow2"]);
    // Amend: no downgrade, and extended_l2 is a creation option.
    for opts in ["compat=0.10", "extended_l2=off", "extended_l2=on"] {
        std::fs::copy(s.path("qemu.qcow2"), s.path("amend.qcow2")).unwrap();
        s.assert_same(&["amend", "-o", opts, "amend.qcow2"]);
    }
    // Amends QEMU allows keep the subclusters readable.
    std::fs::copy(s.path("qemu.qcow2"), s.path("amend.qcow2")).unwrap();
    s.ours_ok(&["amend", "-o", "refcount_bits=64,lazy_refcounts=on", "amend.qcow2"]);
    s.assert_clean("amend.qcow2");
    s.assert_identical("amend.qcow2", "src.qcow2");
    s.assert_same(&["map", "--output=json", "amend.qcow2"]);
}

/// Writes the subcluster bitmap of L2 entry `index` of the first L2 table.
fn set_bitmap(s: &Scratch, name: &str, index: u64, bitmap: u64) {
    let bytes = std::fs::read(s.path(name)).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap());
    let l2 = u64::from_be_bytes(bytes[l1 as usize..l1 as usize + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    common::patch(&s.path(name), l2 + index * 16 + 8, &bitmap.to_be_bytes());
}

#[test]
fn invalid_subcluster_bitmaps_are_reported_as_qemu() {
    let s = Scratch::new();
    create_ext(&s, "bad.qcow2", 64 << 10, 10 << 20, false);
    s.qemu_io("qcow2", "bad.qcow2", &["write 0 4k", "write 64k 4k", "write -c 128k 64k", "write -z 256k 64k"]);
    // Entry 0: a subcluster both allocated and zero; entry 2 (compressed):
    // a bitmap; entry 4 (no host offset): an allocated subcluster.
    set_bitmap(&s, "bad.qcow2", 0, 0x1_0000_0001);
    set_bitmap(&s, "bad.qcow2", 2, 0x5);
    set_bitmap(&s, "bad.qcow2", 4, 0xffff_ffff_0000_0001);
    let out = s.assert_same(&["check", "bad.qcow2"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("Allocated cluster has corrupted subcluster allocation bitmap"), "{out:?}");
    // Reading through an invalid entry fails and marks the image corrupt.
    for (tool, image) in [("qemu", "q.qcow2"), ("ours", "o.qcow2")] {
        std::fs::copy(s.path("bad.qcow2"), s.path(image)).unwrap();
        let args = ["-c", "read 0 4k", image];
        let o = if tool == "qemu" {
            let st = std::process::Command::new("qemu-io")
                .args(["-f", "qcow2"])
                .args(args)
                .current_dir(s.dir.path())
                .output()
                .unwrap();
            String::from_utf8_lossy(&st.stdout).into_owned()
        } else {
            s.ours(&[&["io", "-f", "qcow2"][..], &args[..]].concat()).stdout
        };
        assert!(o.contains("read failed: Input/output error"), "{tool}: {o}");
        let info = s.qemu_ok(&["info", image]).stdout;
        assert!(info.contains("corrupt: true"), "{tool} did not mark the image corrupt: {info}");
    }
}

// Guards against a zero write that reaches an end of the disk inside a
// subcluster zeroing the whole last cluster: QEMU's block layer splits the
// unaligned end off as a request of its own, so only the subclusters up to
// the end of the disk get their zero bits (QEMU's iotest 271 checks the
// bitmap). Both tools run the same writes on twin images, which must come
// out byte for byte the same.
#[test]
fn zero_writes_up_to_an_unaligned_end_of_disk_set_qemus_bits() {
    let s = Scratch::new();
    let cmds: Vec<String> =
        ["write -q -z 2048k 35k", "write -q -P 7 1984k 64k", "write -q -z 1990k 93k", "write -q -z -u 0 2083k"]
            .iter()
            .map(|c| c.to_string())
            .collect();
    for backing in [false, true] {
        for (image, ours) in [("q.qcow2", false), ("o.qcow2", true)] {
            let mut create = vec!["create", "-q", "-f", "qcow2", "-o", "extended_l2=on"];
            if backing {
                s.qemu_ok(&["create", "-q", "-f", "raw", "base.raw", "2083k"]);
                s.qemu_io("raw", "base.raw", &["write -q -P 3 0 2083k"]);
                create.extend_from_slice(&["-b", "base.raw", "-F", "raw"]);
            }
            create.extend_from_slice(&[image, "2083k"]);
            s.qemu_ok(&create);
            for n in 1..=cmds.len() {
                let step = &cmds[n - 1..n];
                if ours {
                    ours_io_cmds(&s, image, step);
                } else {
                    qemu_io_cmds(&s, image, step);
                }
            }
        }
        let (q, o) = (std::fs::read(s.path("q.qcow2")).unwrap(), std::fs::read(s.path("o.qcow2")).unwrap());
        assert!(q == o, "the images differ (backing file: {backing})");
        s.assert_clean("o.qcow2");
    }
}

// Guards against a run of new clusters placed past a cluster freed in
// the same request: a zero write that starts inside a compressed cluster
// copies it first (freeing its old cluster, which QEMU reuses at once)
// and then writes zeros as data over the next two compressed clusters, a
// run of two. QEMU finds that run where the freed cluster joins a free
// one; oxqcow, whose frees wait for a flush, flushed only when a freed
// cluster lay below the first single free cluster, and so put the run
// past both (found by QEMU's iotest 271). Twin images, byte-identical.
#[test]
fn runs_of_new_clusters_reuse_clusters_freed_in_the_same_request() {
    let s = Scratch::new();
    let mut cmds: Vec<String> = (0..8).map(|g| format!("write -q -c -P {} {}k 64k", g + 1, g * 64)).collect();
    cmds.push("discard -q 0 64k".into());
    cmds.push("discard -q 128k 64k".into());
    cmds.push("discard -q 256k 64k".into());
    cmds.push("write -q -z -u 321k 129k".into());
    for (image, ours) in [("q.qcow2", false), ("o.qcow2", true)] {
        s.qemu_ok(&["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", image, "64M"]);
        // One session per command, as each frees at its end.
        for n in 0..cmds.len() {
            let step = &cmds[n..n + 1];
            if ours {
                ours_io_cmds(&s, image, step);
            } else {
                qemu_io_cmds(&s, image, step);
            }
        }
    }
    let (q, o) = (std::fs::read(s.path("q.qcow2")).unwrap(), std::fs::read(s.path("o.qcow2")).unwrap());
    assert!(
        q == o,
        "the images differ:\n{}\n{}",
        s.qemu_ok(&["map", "q.qcow2"]).stdout,
        s.qemu_ok(&["map", "o.qcow2"]).stdout
    );
    s.assert_clean("o.qcow2");
}
