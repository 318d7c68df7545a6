//! The few librados and librbd functions the crate calls, declared by hand
//! from `rados/librados.h` and `rbd/librbd.h` (Ceph 16, stable C API): the
//! crates that bind them generate their bindings with bindgen, which needs
//! libclang at build time. This module and `storage.rs` hold the crate's only
//! unsafe code; every function here returns 0 (or a byte count) on success
//! and a negative errno on failure.
//!
//! The libraries are loaded when the first RBD image is opened, not linked:
//! as QEMU's rbd driver is a module loaded on demand, the `oxqcow` binary
//! then runs where Ceph is not installed, and every other command does not
//! map Ceph's libraries (libceph-common alone reserves more address space
//! than a `ulimit -v` of 128 MiB allows, and costs 18 MiB of RSS at start).

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

/// `rados_t`: a cluster handle.
pub type Rados = *mut c_void;
/// `rados_ioctx_t`: an I/O context on one pool (and namespace).
pub type IoCtx = *mut c_void;
/// `rbd_image_t`: an open image.
pub type Image = *mut c_void;

/// `RBD_FEATURE_FAST_DIFF` (`rbd/features.h`): the object map tells which
/// objects exist, so diff iteration over the whole image is cheap and exact.
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FLAG_FAST_DIFF_INVALID`: the fast-diff map cannot be trusted.
pub const FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

/// `rbd_image_info_t`, filled by `rbd_stat`.
#[repr(C)]
pub struct ImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

/// `rbd_snap_info_t`, filled by `rbd_snap_list` (names freed by
/// `rbd_snap_list_end`).
#[repr(C)]
pub struct SnapInfo {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

/// `int (*librbd_diff_cb)(uint64_t offs, size_t len, int exists, void *arg)`.
pub type DiffCallback = unsafe extern "C" fn(offs: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int;

/// Declares the functions: one table of pointers filled at load time, and a
/// function of the C name calling through it.
macro_rules! ceph_api {
    ($(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*) => {
        #[allow(non_snake_case)]
        struct Api {
            $($name: unsafe extern "C" fn($($ty),*) $(-> $ret)?,)*
            // The library stays mapped for the process's life: the
            // pointers above point into it.
            _lib: Library,
        }

        impl Api {
            fn load() -> Result<Api, String> {
                // librbd links librados: a lookup in librbd's handle
                // searches its dependencies too.
                let lib = open("librbd.so.1")?;
                $(
                    // SAFETY: the symbol is the C function of this name in
                    // Ceph's stable API, declared above with the signature of
                    // its header; the library stays loaded in `_lib`.
                    let $name = unsafe {
                        *lib
                            .get::<unsafe extern "C" fn($($ty),*) $(-> $ret)?>(concat!(stringify!($name), "\0").as_bytes())
                            .map_err(|e| format!("{}: {e}", stringify!($name)))?
                    };
                )*
                Ok(Api { $($name,)* _lib: lib })
            }
        }

        $(
            /// Calls the C function of this name.
            ///
            /// # Safety
            /// As the C function's (see its header); [`load`] must have
            /// succeeded, which every handle's existence implies.
            #[allow(clippy::too_many_arguments)] // the C signature's
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the caller keeps the C function's contract.
                unsafe { (api().$name)($($arg),*) }
            }
        )*
    };
}

ceph_api! {
    fn rados_create(cluster: *mut Rados, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: Rados, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: Rados, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_conf_get(cluster: Rados, option: *const c_char, buf: *mut c_char, len: usize) -> c_int;
    fn rados_connect(cluster: Rados) -> c_int;
    fn rados_shutdown(cluster: Rados);
    fn rados_ioctx_create(cluster: Rados, pool_name: *const c_char, ioctx: *mut IoCtx) -> c_int;
    fn rados_ioctx_destroy(io: IoCtx);
    fn rados_ioctx_set_namespace(io: IoCtx, nspace: *const c_char);
    fn rbd_create(io: IoCtx, name: *const c_char, size: u64, order: *mut c_int) -> c_int;
    fn rbd_open(io: IoCtx, name: *const c_char, image: *mut Image, snap_name: *const c_char) -> c_int;
    fn rbd_open_read_only(io: IoCtx, name: *const c_char, image: *mut Image, snap_name: *const c_char) -> c_int;
    fn rbd_close(image: Image) -> c_int;
    fn rbd_get_size(image: Image, size: *mut u64) -> c_int;
    fn rbd_stat(image: Image, info: *mut ImageInfo, infosize: usize) -> c_int;
    fn rbd_get_features(image: Image, features: *mut u64) -> c_int;
    fn rbd_get_flags(image: Image, flags: *mut u64) -> c_int;
    fn rbd_resize(image: Image, size: u64) -> c_int;
    fn rbd_snap_list(image: Image, snaps: *mut SnapInfo, max_snaps: *mut c_int) -> c_int;
    fn rbd_snap_list_end(snaps: *mut SnapInfo);
    fn rbd_read(image: Image, ofs: u64, len: usize, buf: *mut c_char) -> isize;
    fn rbd_write(image: Image, ofs: u64, len: usize, buf: *const c_char) -> isize;
    fn rbd_discard(image: Image, ofs: u64, len: u64) -> c_int;
    fn rbd_write_zeroes(image: Image, ofs: u64, len: usize, zero_flags: c_int, op_flags: c_int) -> c_int;
    fn rbd_flush(image: Image) -> c_int;
    fn rbd_diff_iterate2(
        image: Image,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: DiffCallback,
        arg: *mut c_void,
    ) -> c_int;
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

fn open(name: &str) -> Result<Library, String> {
    // SAFETY: loading runs the library's initialisers; Ceph's libraries
    // are made to be loaded this way (QEMU's rbd module links them and is
    // itself loaded with dlopen).
    unsafe { Library::new(name) }.map_err(|e| e.to_string())
}

/// Loads librados and librbd once; the message says what is missing.
pub fn load() -> Result<(), String> {
    match API.get_or_init(Api::load) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("cannot load Ceph's client libraries (install librbd1): {e}")),
    }
}

fn api() -> &'static Api {
    match API.get() {
        Some(Ok(api)) => api,
        // Every handle comes from `rados_create`, which callers reach only
        // after `load` succeeded.
        _ => unreachable!("librbd used before it was loaded"),
    }
}
