//! oxqcow as a drop-in for QEMU's tools: a link named `qemu-io` or
//! `qemu-nbd` is that tool, `--version` names the QEMU release whose
//! interface it follows, usage errors point at `--help` as qemu-img's do,
//! and output into a closed pipe ends the command quietly, as QEMU's tools
//! end (killed by SIGPIPE), never with a panic.

mod common;

use std::path::Path;
use std::process::Command;

use common::Scratch;

fn link(s: &Scratch, name: &str) -> std::path::PathBuf {
    let path = s.path(name);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_oxqcow"), &path).unwrap();
    path
}

fn run(program: &Path, args: &[&str], dir: &Path) -> (i32, String, String) {
    let o = Command::new(program).args(args).current_dir(dir).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn version_lines_name_the_qemu_interface() {
    let s = Scratch::new();
    let ours = s.ours_ok(&["--version"]).stdout;
    let theirs = s.qemu_ok(&["--version"]).stdout;
    let first = |t: &str| t.lines().next().unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ");
    assert_eq!(first(&ours), first(&theirs), "{ours}");
    assert!(ours.starts_with("qemu-img version 10.0.2 (oxqcow "), "{ours}");
    for (name, want) in [("qemu-io", "qemu-io version 10.0.2 (oxqcow "), ("qemu-nbd", "qemu-nbd 10.0.2 (oxqcow ")] {
        let tool = link(&s, name);
        let (code, out, _) = run(&tool, &["--version"], s.dir.path());
        assert_eq!(code, 0);
        assert!(out.starts_with(want), "{name}: {out}");
        let (_, theirs, _) = run(Path::new(name), &["--version"], s.dir.path());
        assert_eq!(out.lines().count(), theirs.lines().count(), "{name}: {out} / {theirs}");
    }
}

#[test]
fn links_named_after_qemu_tools_are_those_tools() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    let io = link(&s, "qemu-io");
    let cmds = ["-c", "write -P 5 0 512", "-c", "read -P 5 0 512", "-c", "length"];
    let mut args = cmds.to_vec();
    args.push("a.qcow2");
    let (code, out, err) = run(&io, &args, s.dir.path());
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    let (_, theirs, _) = run(Path::new("qemu-io"), &args, s.dir.path());
    let strip_rates = |t: &str| t.lines().filter(|l| !l.contains("ops/sec")).collect::<Vec<_>>().join("\n");
    assert_eq!(strip_rates(&out), strip_rates(&theirs));
    // The command word may follow the tool's name (`exec -a qemu-io oxqcow io`).
    let mut with_word = vec!["io"];
    with_word.extend_from_slice(&args);
    assert_eq!(strip_rates(&run(&io, &with_word, s.dir.path()).1), strip_rates(&theirs));
    // A link named qemu-nbd parses qemu-nbd's command line.
    let nbd = link(&s, "qemu-nbd");
    let (code, _, err) = run(&nbd, &["--bogus-option"], s.dir.path());
    let (qcode, _, qerr) = run(Path::new("qemu-nbd"), &["--bogus-option"], s.dir.path());
    assert_eq!(code, qcode);
    // Both name the program as invoked (ours by its full path here).
    let after_name = |e: &str| e.lines().next().and_then(|l| l.split_once(": ")).map(|(_, m)| m.to_string());
    assert_eq!(after_name(&err), after_name(&qerr));
    let hint = |e: &str| e.lines().nth(1).map(|l| l.replace(nbd.to_str().unwrap(), "qemu-nbd"));
    assert_eq!(hint(&err), hint(&qerr));
}

#[test]
fn usage_errors_point_at_help_as_qemu_img_does() {
    let s = Scratch::new();
    for args in [&[][..], &["no-such-command"], &["info"], &["check", "--no-such-option"]] {
        s.assert_same(args);
    }
}

#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    let s = Scratch::new();
    // A sparse raw file with a run of data every other 4 KiB: its map is
    // far more than a pipe holds.
    let f = std::fs::File::create(s.path("holes.raw")).unwrap();
    f.set_len(16 << 20).unwrap();
    for i in (0..(16 << 20) / 4096).step_by(2) {
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 4096], i * 4096).unwrap();
    }
    drop(f);
    let script = format!(
        "'{}' map --output=json -f raw holes.raw | head -c 10 >/dev/null; echo \"${{PIPESTATUS[0]}}\"",
        env!("CARGO_BIN_EXE_oxqcow")
    );
    let o = Command::new("bash").args(["-c", &script]).current_dir(s.dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr, "", "nothing is printed when the reader goes away");
    // Killed by SIGPIPE, as qemu-img is: 128 + 13.
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "141");
}

/// A link named qemu-storage-daemon runs a node graph and one export, here
/// over NBD (the FUSE export runs through `mount`'s code, tested there).
#[test]
fn a_link_named_qemu_storage_daemon_exports_a_node() {
    let s = Scratch::new();
    s.qemu_ok(&["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    s.qemu_io("qcow2", "a.qcow2", &["write -P 9 0 1M"]);
    let qsd = link(&s, "qemu-storage-daemon");
    let sock = s.path("qsd.sock");
    let mut child = Command::new(&qsd)
        .args(["--blockdev", "file,node-name=f0,filename=a.qcow2", "--blockdev", "qcow2,node-name=q0,file=f0"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .args(["--export", "nbd,id=e0,node-name=q0,name=disk,writable=on"])
        .current_dir(s.dir.path())
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 9 0 1M", "-c", "write -P 8 1M 64k", &uri])
        .output()
        .expect("qemu-io is required by this test");
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    child.wait().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    s.qemu_io("qcow2", "a.qcow2", &["read -P 8 1M 64k"]);
    s.assert_clean("a.qcow2");
}
