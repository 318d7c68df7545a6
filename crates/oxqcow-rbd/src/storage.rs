//! An RBD image as [`Storage`]: connecting as QEMU's `qemu_rbd_connect`
//! does (configuration file, Ceph options, key, connect, pool, namespace),
//! opening and creating images, and the I/O on an open image through
//! librbd's synchronous calls, which are safe to make from many threads on
//! one image handle. Errors opening or creating are QEMU's texts ("error
//! connecting: Permission denied").

use std::ffi::{c_int, c_void, CString};
use std::io;
use std::ptr;
use std::sync::Mutex;

use oxqcow::Storage;

use crate::options::RbdOptions;
use crate::sys;

/// How long connecting to the monitors may take before it fails (librados's
/// `client_mount_timeout`, 300 s by default, during which a refused
/// connection just waits), and how long a request may wait for an OSD or a
/// monitor (`rados_osd_op_timeout`/`rados_mon_op_timeout`, by default
/// forever): a cluster that is gone fails the command instead of hanging
/// it. Each applies only when the configuration leaves it at its default.
const TIMEOUTS: &[(&str, &str, &str)] =
    &[("client_mount_timeout", "300", "15"), ("rados_osd_op_timeout", "0", "30"), ("rados_mon_op_timeout", "0", "30")];

/// The text of an errno, as QEMU's `error_setg_errno` appends it.
fn errno_text(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// A negative errno return as an `io::Error`.
fn check(r: c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(-r))
    } else {
        Ok(())
    }
}

/// A string for C; names with a NUL cannot exist in Ceph.
fn cstr(s: &str, what: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} '{}' contains a NUL byte", s.replace('\0', "\\0")))
}

/// A cluster connection and an I/O context on the image's pool and
/// namespace; both are released in this order on drop.
struct Connection {
    cluster: sys::Rados,
    io: sys::IoCtx,
}

impl Connection {
    fn open(o: &RbdOptions) -> Result<Connection, String> {
        sys::load()?;
        let user = o.user.as_deref().map(|u| cstr(u, "user")).transpose()?;
        let mut cluster: sys::Rados = ptr::null_mut();
        // SAFETY: `cluster` is a valid out pointer; `user` is NULL or a
        // NUL-terminated string that outlives the call (librados copies it).
        let r = unsafe { sys::rados_create(&mut cluster, user.as_ref().map_or(ptr::null(), |u| u.as_ptr())) };
        if r < 0 {
            return Err(format!("error initializing: {}", errno_text(-r)));
        }
        // From here on, dropping `conn` shuts the handle down.
        let mut conn = Connection { cluster, io: ptr::null_mut() };
        let conf = o.conf.as_deref().map(|c| cstr(c, "conf")).transpose()?;
        // SAFETY: the handle is live and not connected; the path is NULL
        // (librados's default places) or a NUL-terminated string.
        let r = unsafe { sys::rados_conf_read_file(conn.cluster, conf.as_ref().map_or(ptr::null(), |c| c.as_ptr())) };
        // Without a file named, a missing default one is no error (as QEMU).
        if r < 0 && o.conf.is_some() {
            return Err(format!("error reading conf file {}: {}", o.conf.as_deref().unwrap_or(""), errno_text(-r)));
        }
        for (key, value) in &o.conf_pairs {
            conn.set(key, value).map_err(|e| format!("invalid conf option {key}: {}", errno_text(e)))?;
        }
        if let Some(mon_host) = &o.mon_host {
            conn.set("mon_host", mon_host).map_err(|e| format!("invalid conf option mon_host: {}", errno_text(e)))?;
        }
        if let Some(key) = &o.key {
            conn.set("key", key).map_err(|e| format!("invalid conf option key: {}", errno_text(e)))?;
        }
        if let Some(auth) = &o.auth_client_required {
            conn.set("auth_client_required", auth)
                .map_err(|e| format!("invalid conf option auth_client_required: {}", errno_text(e)))?;
        }
        for (option, default, ours) in TIMEOUTS {
            if conn.get(option).is_some_and(|v| v.parse::<f64>().ok() == default.parse::<f64>().ok()) {
                conn.set(option, ours).map_err(|e| format!("invalid conf option {option}: {}", errno_text(e)))?;
            }
        }
        // SAFETY: the handle is live, configured and not yet connected.
        let r = unsafe { sys::rados_connect(conn.cluster) };
        if r < 0 {
            return Err(format!("error connecting: {}", errno_text(-r)));
        }
        let pool = cstr(&o.pool, "pool")?;
        let mut io: sys::IoCtx = ptr::null_mut();
        // SAFETY: the handle is connected; `io` is a valid out pointer.
        let r = unsafe { sys::rados_ioctx_create(conn.cluster, pool.as_ptr(), &mut io) };
        if r < 0 {
            return Err(format!("error opening pool {}: {}", o.pool, errno_text(-r)));
        }
        conn.io = io;
        let namespace = cstr(&o.namespace, "namespace")?;
        // SAFETY: `io` is the live context just created; librados copies the name.
        unsafe { sys::rados_ioctx_set_namespace(conn.io, namespace.as_ptr()) };
        Ok(conn)
    }

    /// Sets a Ceph option; the errno on failure.
    fn set(&mut self, key: &str, value: &str) -> Result<(), i32> {
        let (Ok(k), Ok(v)) = (CString::new(key), CString::new(value)) else { return Err(libc::EINVAL) };
        // SAFETY: the handle is live and owned by `self`; both strings are
        // NUL-terminated and outlive the call.
        let r = unsafe { sys::rados_conf_set(self.cluster, k.as_ptr(), v.as_ptr()) };
        if r < 0 {
            Err(-r)
        } else {
            Ok(())
        }
    }

    /// A Ceph option's value as text.
    fn get(&self, key: &str) -> Option<String> {
        let k = CString::new(key).ok()?;
        let mut buf = [0u8; 64];
        // SAFETY: the handle is live; `buf` is writable for its whole length,
        // which is passed, and librados NUL-terminates what it writes.
        let r = unsafe { sys::rados_conf_get(self.cluster, k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            return None;
        }
        let end = buf.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&buf[..end]).into_owned())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.io.is_null() {
            // SAFETY: the context is live and every image opened on it was
            // closed before (`RbdStorage` drops its image first).
            unsafe { sys::rados_ioctx_destroy(self.io) };
        }
        // SAFETY: the handle is live and nothing uses it any more.
        unsafe { sys::rados_shutdown(self.cluster) };
    }
}

/// Creates the image `o` names with `size` bytes (QEMU's `rbd create`,
/// librbd's default format and features).
pub fn create(o: &RbdOptions, size: u64) -> Result<(), String> {
    let conn = Connection::open(o)?;
    let name = cstr(&o.image, "image")?;
    let mut order: c_int = 0;
    // SAFETY: the context is live; `name` is NUL-terminated; `order` is a
    // valid in/out pointer (0: librbd's default object size).
    let r = unsafe { sys::rbd_create(conn.io, name.as_ptr(), size, &mut order) };
    if r < 0 {
        return Err(format!("error rbd create: {}", errno_text(-r)));
    }
    Ok(())
}

/// An open RBD image.
pub struct RbdStorage {
    image: sys::Image,
    /// The image's size as last set or read; writes past it grow the image
    /// first (as QEMU's rbd driver does), under this lock.
    size: Mutex<u64>,
    read_only: bool,
    // Dropped after `image` is closed (see `Drop`).
    _conn: Connection,
}

// SAFETY: librbd's image handles may be used from several threads at once
// (its C API serialises internally, QEMU issues requests on one handle from
// many threads); the connection is only touched at open and drop.
unsafe impl Send for RbdStorage {}
// SAFETY: as for `Send`: every `&self` method is one librbd call on the handle.
unsafe impl Sync for RbdStorage {}

impl RbdStorage {
    /// Connects and opens the image `o` names (read only with a snapshot or
    /// `read_only`), with QEMU's messages on failure.
    pub fn open(o: &RbdOptions, read_only: bool) -> Result<RbdStorage, String> {
        if o.snapshot.is_some() && !read_only {
            return Err("rbd snapshots are read-only".into());
        }
        let conn = Connection::open(o)?;
        let name = cstr(&o.image, "image")?;
        let snap = o.snapshot.as_deref().map(|s| cstr(s, "snapshot")).transpose()?;
        let snap_ptr = snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut image: sys::Image = ptr::null_mut();
        // SAFETY: the context is live; the names are NUL-terminated (the
        // snapshot's may be NULL); `image` is a valid out pointer.
        let r = unsafe {
            if read_only {
                sys::rbd_open_read_only(conn.io, name.as_ptr(), &mut image, snap_ptr)
            } else {
                sys::rbd_open(conn.io, name.as_ptr(), &mut image, snap_ptr)
            }
        };
        if r < 0 {
            return Err(format!("error reading header from {}: {}", o.image, errno_text(-r)));
        }
        let storage = RbdStorage { image, size: Mutex::new(0), read_only, _conn: conn };
        let size = storage.image_size().map_err(|e| format!("error getting image size: {}", e))?;
        *storage.size() = size;
        Ok(storage)
    }

    fn image_size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: the image is open; `size` is a valid out pointer.
        check(unsafe { sys::rbd_get_size(self.image, &mut size) })?;
        Ok(size)
    }

    fn size(&self) -> std::sync::MutexGuard<'_, u64> {
        self.size.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Grows the image to hold `[offset, offset + len)` when it ends past
    /// it, as QEMU's rbd driver does before a write or zero write.
    fn grow_to(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut size = self.size();
        if end > *size {
            // SAFETY: the image is open and writable.
            check(unsafe { sys::rbd_resize(self.image, end) })?;
            *size = end;
        }
        Ok(())
    }

    /// Zeroes the part of `[offset, offset + len)` inside the image.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = *self.size();
        let len = len.min(size.saturating_sub(offset));
        // librbd takes a size_t and splits the range itself; keep each call
        // well inside an int's range of return values.
        let mut done = 0;
        while done < len {
            let n = (len - done).min(1 << 30);
            // SAFETY: the image is open and writable.
            check(unsafe { sys::rbd_write_zeroes(self.image, offset + done, n as usize, 0, 0) })?;
            done += n;
        }
        Ok(())
    }

    fn refuse_writes(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }

    /// Whether librbd's diff iteration tells holes from data exactly here
    /// (QEMU's block status asks the same): fast-diff on and valid.
    fn diff_is_exact(&self) -> bool {
        let (mut features, mut flags) = (0u64, 0u64);
        // SAFETY: the image is open; the out pointers are valid.
        let ok = unsafe {
            sys::rbd_get_features(self.image, &mut features) >= 0 && sys::rbd_get_flags(self.image, &mut flags) >= 0
        };
        ok && features & sys::FEATURE_FAST_DIFF != 0 && flags & sys::FLAG_FAST_DIFF_INVALID == 0
    }

    /// The extents that exist in `[offset, offset + len)`, whole objects
    /// (rbd_diff_iterate2 against the beginning of time, the parent included).
    fn existing(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        unsafe extern "C" fn collect(offs: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the `&mut Vec` passed below, alive and not
            // otherwise borrowed for the whole (synchronous) iteration.
            let runs = unsafe { &mut *arg.cast::<Vec<(u64, u64)>>() };
            if exists != 0 {
                runs.push((offs, len as u64));
            }
            0
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        // SAFETY: the image is open; the callback matches librbd's type and
        // only touches `runs`, which outlives the call.
        check(unsafe {
            sys::rbd_diff_iterate2(
                self.image,
                ptr::null(),
                offset,
                len,
                1,
                1,
                collect,
                (&mut runs as *mut Vec<(u64, u64)>).cast(),
            )
        })?;
        runs.sort_unstable();
        Ok(runs)
    }
}

impl Drop for RbdStorage {
    fn drop(&mut self) {
        // SAFETY: the image is open and no call on it is in flight (we hold
        // it exclusively); the connection is dropped after this.
        unsafe { sys::rbd_close(self.image) };
    }
}

impl Storage for RbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = *self.size();
        let end = offset.saturating_add(buf.len() as u64);
        let inside = if offset >= size { 0 } else { (end.min(size) - offset) as usize };
        buf[inside..].fill(0);
        let mut done = 0;
        while done < inside {
            let part = &mut buf[done..inside];
            // SAFETY: the image is open; `part` is writable for the length passed.
            let n = unsafe { sys::rbd_read(self.image, offset + done as u64, part.len(), part.as_mut_ptr().cast()) };
            if n < 0 {
                return Err(io::Error::from_raw_os_error(-n as i32));
            }
            if n == 0 {
                // The image shrank under us: the rest reads as zeros.
                part.fill(0);
                break;
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.refuse_writes()?;
        self.grow_to(offset, buf.len() as u64)?;
        let mut done = 0;
        while done < buf.len() {
            let part = &buf[done..];
            // SAFETY: the image is open; `part` is readable for the length passed.
            let n = unsafe { sys::rbd_write(self.image, offset + done as u64, part.len(), part.as_ptr().cast()) };
            if n < 0 {
                return Err(io::Error::from_raw_os_error(-n as i32));
            }
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            done += n as usize;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(*self.size())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.refuse_writes()?;
        let mut size = self.size();
        // SAFETY: the image is open and writable.
        check(unsafe { sys::rbd_resize(self.image, len) })?;
        *size = len;
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        // SAFETY: the image is open.
        check(unsafe { sys::rbd_flush(self.image) })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.refuse_writes()?;
        self.zero_range(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.refuse_writes()?;
        self.grow_to(offset, len)?;
        self.zero_range(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.refuse_writes()?;
        let size = *self.size();
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the image is open and writable.
        check(unsafe { sys::rbd_discard(self.image, offset, len) })
    }

    fn data_runs(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        let size = *self.size();
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(Vec::new());
        }
        if !self.diff_is_exact() {
            return Ok(vec![(offset, len, true)]);
        }
        let end = offset + len;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let push = |out: &mut Vec<(u64, u64, bool)>, start: u64, stop: u64, data: bool| {
            if stop <= start {
                return;
            }
            match out.last_mut() {
                Some(last) if last.2 == data && last.0 + last.1 == start => last.1 += stop - start,
                _ => out.push((start, stop - start, data)),
            }
        };
        let mut pos = offset;
        for (start, n) in self.existing(offset, len)? {
            let (start, stop) = (start.max(pos), (start + n).min(end));
            if stop <= start {
                continue;
            }
            push(&mut out, pos, start, false);
            push(&mut out, start, stop, true);
            pos = stop;
        }
        push(&mut out, pos, end, false);
        Ok(out)
    }

    fn driver_name(&self) -> &str {
        "rbd"
    }

    fn cluster_size(&self) -> Option<u64> {
        let mut info = std::mem::MaybeUninit::<sys::ImageInfo>::zeroed();
        // SAFETY: the image is open; `info` is writable for the size passed,
        // which is the C struct's (same layout, `repr(C)`).
        let r = unsafe { sys::rbd_stat(self.image, info.as_mut_ptr(), std::mem::size_of::<sys::ImageInfo>()) };
        // SAFETY: zeroed is a valid value of the struct, and a successful
        // `rbd_stat` filled it.
        (r >= 0).then(|| unsafe { info.assume_init() }.obj_size)
    }

    fn protocol_snapshots(&self) -> io::Result<Vec<(String, u64)>> {
        // librbd wants room for one entry more than there are snapshots (an
        // end marker) and says how many when there is not.
        let mut room: c_int = 16;
        loop {
            let mut snaps: Vec<sys::SnapInfo> =
                (0..room).map(|_| sys::SnapInfo { id: 0, size: 0, name: ptr::null() }).collect();
            let mut max = room;
            // SAFETY: the image is open; `snaps` holds `max` entries.
            let n = unsafe { sys::rbd_snap_list(self.image, snaps.as_mut_ptr(), &mut max) };
            if n == -libc::ERANGE && max > room {
                room = max;
                continue;
            }
            check(n)?;
            let list = snaps[..n as usize]
                .iter()
                .map(|s| {
                    // SAFETY: librbd set the first `n` names to NUL-terminated
                    // strings, alive until `rbd_snap_list_end`.
                    let name = unsafe { std::ffi::CStr::from_ptr(s.name) };
                    (name.to_string_lossy().into_owned(), s.size)
                })
                .collect();
            // SAFETY: the entries were filled by `rbd_snap_list` above and are
            // released once, here.
            unsafe { sys::rbd_snap_list_end(snaps.as_mut_ptr()) };
            return Ok(list);
        }
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        // QEMU's rbd driver does not report it ("disk size: unavailable").
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }
}
