//! QEMU-compatible image locking.
//!
//! QEMU takes OFD byte-range locks on the image file: one byte at 100 + bit
//! for each permission it holds, one at 200 + bit for each permission it
//! will not share with others (`RAW_LOCK_PERM_BASE` / `RAW_LOCK_SHARED_BASE`
//! in its file-posix driver). All are shared (read) locks; conflicts are
//! found by asking whether a write lock could be placed. Taking the same
//! locks makes oxqcow and QEMU exclude each other: one writer at a time,
//! readers alongside readers, `force_share` (qemu-img's `-U`) to read an
//! image someone is writing.
//!
//! OFD locks belong to the open file description, so they are released when
//! the file is closed, and a process's own locks never conflict with a test
//! made through another descriptor of its own... except that they do, across
//! descriptors: which is what we want, two opens in one process exclude
//! each other exactly as two processes do.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::error::{Error, Result};

const PERM_BASE: u64 = 100;
const SHARED_BASE: u64 = 200;

/// QEMU's permission bits (BLK_PERM_*), in bit order, with the names its
/// messages use.
const PERMS: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const RESIZE: u32 = 1 << 3;

/// What an open image holds and refuses to share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LockSet {
    held: u32,
    unshared: u32,
}

impl LockSet {
    /// QEMU's choice for an image opened for writing, read-only, or
    /// read-only with sharing forced.
    pub(crate) fn for_open(read_only: bool, force_share: bool) -> LockSet {
        match (read_only, force_share) {
            (false, _) => LockSet { held: CONSISTENT_READ | WRITE | RESIZE, unshared: WRITE | RESIZE },
            (true, false) => LockSet { held: CONSISTENT_READ, unshared: WRITE | RESIZE },
            (true, true) => LockSet { held: CONSISTENT_READ, unshared: 0 },
        }
    }

    /// QEMU's choice for the external data file of an image opened that
    /// way: a data child (`bdrv_default_perms_for_storage`) takes what the
    /// image's user asked for plus "resize" when writing, and refuses to
    /// share only "resize" (the user shares everything else).
    pub(crate) fn for_data_file(read_only: bool, force_share: bool) -> LockSet {
        match (read_only, force_share) {
            (false, _) => LockSet { held: CONSISTENT_READ | WRITE | RESIZE, unshared: RESIZE },
            (true, false) => LockSet { held: CONSISTENT_READ, unshared: RESIZE },
            (true, true) => LockSet { held: CONSISTENT_READ, unshared: 0 },
        }
    }
}

#[allow(unsafe_code)]
fn fcntl_lock(file: &File, cmd: libc::c_int, kind: libc::c_short, byte: u64) -> io::Result<libc::c_short> {
    let mut fl = libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: the descriptor is valid for as long as `file` is borrowed, and
    // `fl` is a properly initialised flock that outlives the call. fcntl
    // with F_OFD_SETLK/F_OFD_GETLK only reads and writes that struct; no
    // safe wrapper offers byte-range OFD locks (rustix locks whole files).
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type)
}

/// Takes QEMU's locks for `set` on `file`, or explains the conflict.
/// `path` names the image in the message, as QEMU does.
pub(crate) fn lock(file: &File, set: LockSet, path: &str) -> Result<()> {
    let io_err = |e: io::Error| Error::Io { op: "locking the image", offset: 0, source: e };
    for (bit, _) in PERMS.iter().enumerate() {
        let mask = 1 << bit;
        if set.held & mask != 0 {
            fcntl_lock(file, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short, PERM_BASE + bit as u64)
                .map_err(io_err)?;
        }
        if set.unshared & mask != 0 {
            fcntl_lock(file, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short, SHARED_BASE + bit as u64)
                .map_err(io_err)?;
        }
    }
    let conflict = |byte: u64| -> Result<bool> {
        let kind = fcntl_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short, byte).map_err(io_err)?;
        Ok(kind != libc::F_UNLCK as libc::c_short)
    };
    // QEMU's raw_check_lock_bytes: every permission held first, then every
    // one not shared, so the first conflict named is the one QEMU names.
    for (bit, name) in PERMS.iter().enumerate() {
        let mask = 1 << bit;
        if set.held & mask != 0 && conflict(SHARED_BASE + bit as u64)? {
            unlock(file);
            return Err(Error::Locked(format!(
                "Failed to get \"{name}\" lock\nIs another process using the image [{path}]?"
            )));
        }
    }
    for (bit, name) in PERMS.iter().enumerate() {
        let mask = 1 << bit;
        if set.unshared & mask != 0 && conflict(PERM_BASE + bit as u64)? {
            unlock(file);
            return Err(Error::Locked(format!(
                "Failed to get shared \"{name}\" lock\nIs another process using the image [{path}]?"
            )));
        }
    }
    Ok(())
}

/// Drops every lock byte this file description holds. Called before the
/// file is closed too: a child that another thread forked and that has
/// not reached exec yet shares the description (CLOEXEC acts only at
/// exec), so closing alone could leave the locks held for a moment after
/// the image was closed.
pub(crate) fn unlock(file: &File) {
    for bit in 0..PERMS.len() as u64 {
        for base in [PERM_BASE, SHARED_BASE] {
            let _ = fcntl_lock(file, libc::F_OFD_SETLK, libc::F_UNLCK as libc::c_short, base + bit);
        }
    }
}
