//! The application layer every command stands on: the invocation context
//! and messages, option parsing (getopt, the shared options, `--object`,
//! QEMU's numbers), opening images as qemu-img does, and output formats.
//!
//! Modules here import only each other (without cycles) and the
//! libraries; `cmd`, `io` and `export` import them, never the other way
//! round (`tests/layers.rs` checks it).

pub mod backing_protocols;
pub mod block_status;
pub mod common_opts;
pub mod ctx;
pub mod forbid_backing;
pub mod getopt;
pub mod http;
pub mod image;
pub mod imgopts;
pub mod io_open;
pub mod messages;
pub mod node_options;
pub mod numbers;
pub mod object;
pub mod objects;
pub mod output;
pub mod progress;
pub mod qemu_opts;
pub mod qjson;
pub mod rbd;
pub mod secrets;
pub mod snapshot_param;
pub mod snapshot_table;
pub mod stdout;
pub mod tlscreds;
pub mod version;

pub use common_opts::CommonOpts;
pub use ctx::Ctx;
