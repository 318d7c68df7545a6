//! oxqcow-nbd: an NBD server for oxqcow images, compatible with the
//! clients that talk to qemu-nbd (QEMU's own, libnbd's `nbdinfo`,
//! `nbdcopy`, fio's nbd engine).
//!
//! Layers, from the wire up:
//! - [`proto`]: the codec. Constants, parsers for client options and
//!   request headers, encoders for replies. No I/O.
//! - [`handshake`]: fixed newstyle negotiation over any `Read + Write`.
//! - [`session`]: request validation and execution against the image,
//!   producing whole encoded replies. No sockets.
//! - [`conn`]: one client's threads (reader, writer) around a session.
//! - [`memory`]: the budget all connections' requests draw their buffers
//!   from: back-pressure, ENOMEM instead of aborting, buffer reuse.
//! - [`server`]: listeners, admission (`shared`), lifetime and shutdown.
//! - [`tls`]: STARTTLS: x509 credentials, the TLS handshake, the relay
//!   that runs a connection over TLS.
//! - [`sys`]: the few system calls std lacks (signals, fork, socket
//!   activation); the crate's only unsafe code.
//!
//! [`fuzzing`] drives the codec, the handshake and the session from a byte
//! string with an in-memory image, for cargo-fuzz and the seed tests.
#![warn(missing_docs)]

pub mod client;
pub mod conn;
pub mod export;
pub mod fuzzing;
pub mod handshake;
pub mod memory;
mod pool;
pub mod proto;
pub mod server;
pub mod session;
pub mod sys;
pub mod tls;

pub use export::{DetectZeroes, Export, ExportOptions};
pub use server::{Listener, Server, ServerOptions, ShutdownHandle};
pub use tls::TlsServer;
