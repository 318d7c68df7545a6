//! The qemu-img subcommands, one module each, every one with a
//! `run(ctx, args) -> exit code` entry point that `main.rs` dispatches to.
//! A subcommand parses its arguments, calls the library and prints; it
//! imports `app/` and the libraries, never another subcommand
//! (`tests/layers.rs` checks it).

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
pub mod snapshot;
