//! `oxqcow bench` against qemu-img bench: the same lines (the run time
//! aside), the same exit codes and messages, and in write mode the same
//! image content, which `qemu-img check` finds clean. `--random` (ours
//! only) is checked for its lines, determinism and consistency.

mod qemu_oracle;

use qemu_oracle::{assert_check_clean, assert_same_content, normalize, ox, qemu, with_image, Output, Pair};

fn bench_both(pair: &Pair, args: &[&str]) -> Output {
    let mut theirs_args = vec!["bench"];
    theirs_args.extend_from_slice(args);
    theirs_args.push("IMG");
    let theirs = qemu("qemu-img", &refs(&with_image(&theirs_args, &pair.qemu)));
    let ours = ox(&refs(&with_image(&theirs_args, &pair.ours)));
    let t = normalize(&theirs, Some(&pair.qemu), "qemu-img");
    let o = normalize(&ours, Some(&pair.ours), "qemu-img");
    assert_eq!(o.stdout, t.stdout, "stdout differs for bench {args:?}");
    assert_eq!(o.stderr, t.stderr, "stderr differs for bench {args:?}");
    assert_eq!(o.code, t.code, "exit code differs for bench {args:?}: {}", theirs.stderr);
    ours
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The run time line is there and well formed.
fn assert_completed(out: &Output) {
    let last = out.stdout.lines().last().unwrap_or_default();
    let secs = last
        .strip_prefix("Run completed in ")
        .and_then(|r| r.strip_suffix(" seconds."))
        .unwrap_or_else(|| panic!("no run time line in {:?}", out.stdout));
    let (whole, frac) = secs.split_once('.').expect("three decimals");
    assert!(whole.parse::<u64>().is_ok() && frac.len() == 3 && frac.parse::<u32>().is_ok(), "{last}");
}

#[test]
fn read_and_write_runs_match_qemu_img() {
    let pair = Pair::new("qcow2", None, "64M");
    for args in [
        vec!["-c", "1000"],
        vec!["-c", "500", "-d", "4", "-s", "8k", "-S", "16k", "-o", "1M"],
        vec![
            "-w",
            "-c",
            "1000",
            "-d",
            "4",
            "-s",
            "8k",
            "-S",
            "16k",
            "-o",
            "1M",
            "--pattern",
            "7",
            "--flush-interval",
            "100",
        ],
        vec!["-w", "--no-drain", "--flush-interval", "64", "-c", "200", "--pattern", "0x21"],
        vec!["-w", "-c", "10", "-d", "2", "-o", "60M", "-S", "1M", "-s", "64k", "--pattern", "1"],
        vec!["-w", "-c", "2000", "-d", "16", "-S", "12k", "-s", "4k", "--pattern", "3"],
        vec!["-w", "-c", "300", "-d", "8", "-S", "3M", "-s", "64k", "--pattern", "0x44", "-t", "writethrough"],
        vec!["-w", "-c", "2", "-d", "1", "-o", "63M", "-S", "1536k", "-s", "64k", "--pattern", "9"],
        vec!["-q", "-c", "10", "-S", "0", "-t", "none", "-i", "threads", "-f", "qcow2"],
        vec!["-c", "0x10", "-d", "010"],
        vec!["-U", "-c", "5", "-s", "1.5k"],
    ] {
        let out = bench_both(&pair, &args);
        assert_eq!(out.code, 0, "bench {args:?}: {}", out.stderr);
        assert_completed(&out);
        assert_same_content(&pair.qemu, &pair.ours, &format!("after bench {args:?}"));
    }
    assert_check_clean(&pair.ours, "after write benches");
}

#[test]
fn refusals_match_qemu_img() {
    let pair = Pair::new("qcow2", None, "64M");
    for args in [
        vec!["-c", "x"],
        vec!["-c", "-1"],
        vec!["-c", "0"],
        vec!["-c", "1k"],
        vec!["-c", "3000000000"],
        vec!["-d", "0"],
        vec!["-d", "1.0"],
        vec!["-o", "x"],
        vec!["-o", "-1"],
        vec!["-o", "8E"],
        vec!["-s", "0"],
        vec!["-s", "3G"],
        vec!["-S", "x"],
        vec!["-S", "-1"],
        vec!["-t", "bogus"],
        vec!["-i", "bogus"],
        vec!["-i", "native", "-c", "1"],
        vec!["-n", "-c", "1"],
        vec!["--pattern", "256"],
        vec!["--pattern", "x"],
        vec!["--flush-interval", "10"],
        vec!["-w", "--flush-interval", "10", "-d", "64"],
        vec!["-w", "--flush-interval", "x"],
        vec!["-U", "-w", "-c", "1"],
        vec!["-f", "bogus", "-c", "1"],
        vec!["--image-opts", "-f", "raw", "-c", "1"],
        vec!["-x"],
        vec!["--object", "secret,id=a,data=b"],
        vec!["-c", "1", "-o", "64M"],
        vec!["-w", "-c", "2", "-d", "1", "-o", "63M", "-S", "961k", "-s", "64k"],
    ] {
        let out = bench_both(&pair, &args);
        assert_eq!(out.code, 1, "bench {args:?} should fail");
    }
    // No image, or two.
    let theirs = qemu("qemu-img", &["bench", "-c", "1"]);
    let ours = ox(&["bench", "-c", "1"]);
    assert_eq!(normalize(&ours, None, "qemu-img"), normalize(&theirs, None, "qemu-img"));
    let missing = pair.path("missing.qcow2");
    let m = missing.to_str().unwrap();
    let theirs = qemu("qemu-img", &["bench", "-c", "1", m]);
    let ours = ox(&["bench", "-c", "1", m]);
    assert_eq!(normalize(&ours, None, "qemu-img"), normalize(&theirs, None, "qemu-img"));
    assert_same_content(&pair.qemu, &pair.ours, "after refused benches");
}

#[test]
fn random_offsets_are_seeded_inside_and_consistent() {
    let a = Pair::new("qcow2", None, "16M");
    let b = Pair::new("qcow2", None, "16M");
    let run = |image: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["bench", "-w", "-c", "400", "-d", "16", "--random", "--pattern", "0x5a"];
        args.extend_from_slice(extra);
        args.push(image.to_str().unwrap());
        ox(&args)
    };
    let out = run(&a.ours, &["--seed", "42"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{:?}", out.stdout);
    assert_eq!(
        lines[0],
        "Sending 400 write requests, 4096 bytes each, 16 in parallel (starting at offset 0, step size 4096)"
    );
    assert_eq!(lines[1], "Using random offsets (seed 42, aligned to 4096 bytes)");
    assert_completed(&out);
    assert_check_clean(&a.ours, "random writes");

    // The same seed writes the same places; another seed other places.
    assert_eq!(run(&b.ours, &["--seed", "42"]).code, 0);
    assert_same_content(&a.ours, &b.ours, "same seed");
    assert_eq!(run(&a.qemu, &["--seed", "43"]).code, 0);
    let differ = qemu("qemu-img", &["compare", a.ours.to_str().unwrap(), a.qemu.to_str().unwrap()]);
    assert_eq!(differ.code, 1, "different seeds should write different places: {}", differ.stdout);
    assert_check_clean(&a.qemu, "random writes, other seed");

    // Random offsets are not the linear pattern.
    assert_eq!(ox(&["bench", "-w", "-c", "400", "-d", "16", "--pattern", "0x5a", b.qemu.to_str().unwrap()]).code, 0);
    let linear = qemu("qemu-img", &["compare", b.ours.to_str().unwrap(), b.qemu.to_str().unwrap()]);
    assert_eq!(linear.code, 1, "random and linear runs should differ");

    // Reads with random offsets, step-aligned from the start offset, stay inside the image.
    let read = ox(&[
        "bench",
        "-c",
        "2000",
        "-d",
        "8",
        "-s",
        "64k",
        "-S",
        "192k",
        "-o",
        "4k",
        "--random",
        a.ours.to_str().unwrap(),
    ]);
    assert_eq!(read.code, 0, "{}", read.stderr);
    assert_eq!(read.stdout.lines().nth(1), Some("Using random offsets (seed 0, aligned to 196608 bytes)"));
    assert_completed(&read);
    // A request that cannot fit anywhere fails as qemu-img's would.
    let too_big = ox(&["bench", "-c", "4", "-s", "32M", "--random", a.ours.to_str().unwrap()]);
    assert_eq!(too_big.code, 1);
    assert!(too_big.stderr.ends_with(": Failed request: Input/output error\n"), "{}", too_big.stderr);
}
