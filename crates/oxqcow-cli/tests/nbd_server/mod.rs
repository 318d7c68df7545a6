//! An NBD server for tests: qemu-nbd or `oxqcow serve` exporting one
//! image on a unix socket, persistent so that many clients can come and
//! go, killed when dropped. Shared by `nbd_client.rs` and
//! `protocol_backing.rs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A server exporting one image, killed when dropped.
pub struct Server {
    pub child: Child,
    _sockdir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Server {
    /// `qemu-nbd` (or `oxqcow serve` when `ours`) on a unix socket, with
    /// `extra` flags, persistent so that many clients can come and go.
    pub fn unix(image: &Path, ours: bool, extra: &[&str]) -> Server {
        let sockdir = tempfile::tempdir().unwrap();
        let socket = sockdir.path().join("nbd.sock");
        let mut cmd = if ours {
            let mut c = Command::new(env!("CARGO_BIN_EXE_oxqcow"));
            c.arg("serve");
            c
        } else {
            Command::new("qemu-nbd")
        };
        let child = cmd
            .args(["-t", "-k"])
            .arg(&socket)
            .args(extra)
            .arg(image)
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd is required by this test (install qemu-utils)");
        // Made first, so that a server that never listens is killed too.
        let server = Server { child, _sockdir: sockdir, socket };
        wait_for(&server.socket);
        server
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(socket: &Path) {
    for _ in 0..500 {
        if socket.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("the NBD server did not create {}", socket.display());
}
