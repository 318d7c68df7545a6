//! The few librados and librbd functions the crate calls, declared by hand
//! from `rados/librados.h` and `rbd/librbd.h` (Ceph 16, stable C API): the
//! crates that bind them generate their bindings with bindgen, which needs
//! libclang at build time. This module and `storage.rs` hold the crate's only
//! unsafe code; every function here returns 0 (or a byte count) on success
//! and a negative errno on failure.

use std::ffi::{c_char, c_int, c_void};

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

#[link(name = "rados")]
extern "C" {
    pub fn rados_create(cluster: *mut Rados, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: Rados, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: Rados, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_conf_get(cluster: Rados, option: *const c_char, buf: *mut c_char, len: usize) -> c_int;
    pub fn rados_connect(cluster: Rados) -> c_int;
    pub fn rados_shutdown(cluster: Rados);
    pub fn rados_ioctx_create(cluster: Rados, pool_name: *const c_char, ioctx: *mut IoCtx) -> c_int;
    pub fn rados_ioctx_destroy(io: IoCtx);
    pub fn rados_ioctx_set_namespace(io: IoCtx, nspace: *const c_char);
}

#[link(name = "rbd")]
extern "C" {
    pub fn rbd_create(io: IoCtx, name: *const c_char, size: u64, order: *mut c_int) -> c_int;
    pub fn rbd_open(io: IoCtx, name: *const c_char, image: *mut Image, snap_name: *const c_char) -> c_int;
    pub fn rbd_open_read_only(io: IoCtx, name: *const c_char, image: *mut Image, snap_name: *const c_char) -> c_int;
    pub fn rbd_close(image: Image) -> c_int;
    pub fn rbd_get_size(image: Image, size: *mut u64) -> c_int;
    pub fn rbd_stat(image: Image, info: *mut ImageInfo, infosize: usize) -> c_int;
    pub fn rbd_get_features(image: Image, features: *mut u64) -> c_int;
    pub fn rbd_get_flags(image: Image, flags: *mut u64) -> c_int;
    pub fn rbd_resize(image: Image, size: u64) -> c_int;
    pub fn rbd_snap_list(image: Image, snaps: *mut SnapInfo, max_snaps: *mut c_int) -> c_int;
    pub fn rbd_snap_list_end(snaps: *mut SnapInfo);
    pub fn rbd_read(image: Image, ofs: u64, len: usize, buf: *mut c_char) -> isize;
    pub fn rbd_write(image: Image, ofs: u64, len: usize, buf: *const c_char) -> isize;
    pub fn rbd_discard(image: Image, ofs: u64, len: u64) -> c_int;
    pub fn rbd_write_zeroes(image: Image, ofs: u64, len: usize, zero_flags: c_int, op_flags: c_int) -> c_int;
    pub fn rbd_flush(image: Image) -> c_int;
    pub fn rbd_diff_iterate2(
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
