//! Space estimates for new images (`qemu-img measure`).
