//! What `--version` prints: the QEMU release whose interface the tools
//! follow, and oxqcow's own version, in each QEMU tool's layout (scripts
//! parse the first line: `qemu-img version X.Y.Z ...`).

/// The QEMU release whose command-line interface, messages and output
/// oxqcow follows (and whose iotests it runs).
pub const QEMU_INTERFACE: &str = "10.0.2";

/// oxqcow's own version.
pub const OXQCOW: &str = env!("CARGO_PKG_VERSION");

const COPYRIGHT: &str = "Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers";

/// The `--version` text of `prog` (qemu-img, qemu-io, qemu-storage-daemon
/// or any other name: that layout).
pub fn text(prog: &str) -> String {
    format!("{prog} version {QEMU_INTERFACE} (oxqcow {OXQCOW})\n{COPYRIGHT}\n")
}

/// qemu-nbd's `--version` text, which has its own layout.
pub fn nbd_text(prog: &str) -> String {
    format!(
        "{prog} {QEMU_INTERFACE} (oxqcow {OXQCOW})\nWritten by Anthony Liguori.\n\n{COPYRIGHT}\n\
         This is free software; see the source for copying conditions.  There is NO\n\
         warranty; not even for MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_lines_as_scripts_parse_them() {
        assert!(text("qemu-img").starts_with("qemu-img version 10.0.2 (oxqcow "));
        assert!(text("qemu-io").starts_with("qemu-io version 10.0.2 (oxqcow "));
        assert!(nbd_text("qemu-nbd").starts_with("qemu-nbd 10.0.2 (oxqcow "));
        assert_eq!(text("qemu-img").lines().count(), 2);
    }
}
