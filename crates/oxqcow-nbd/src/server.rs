//! Listening sockets, admission of clients, and the server's lifetime.
//!
//! One accept thread per listening socket admits clients while fewer than
//! the `shared` limit are connected (like qemu-nbd, further clients wait in
//! the socket's backlog), and each client gets a connection thread (see
//! [`crate::conn`]). All connections share one worker pool, one export and
//! one memory budget ([`crate::memory`]).
//!
//! The server stops when [`ShutdownHandle::shutdown`] is called (signals),
//! or, unless persistent, when the last client has gone after at least one
//! came. Stopping closes the listeners, lets every connection finish the
//! requests it has received (shutting their sockets for reading), forces
//! the rest closed after a grace period, and flushes the image.
//!
//! Locks: the server state (client count and the sockets of live clients),
//! held only to count and register.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use oxqcow::BlockDevice;

use crate::conn::{self, Stream};
use crate::export::Export;
use crate::memory::Memory;
use crate::pool::Pool;
use crate::tls::TlsServer;

/// Hard limit on simultaneous clients when `shared` is 0 (unlimited): each
/// client costs two threads; the memory its requests hold comes from the
/// budget all clients share ([`crate::memory`]).
pub const MAX_CLIENTS: usize = 256;
/// How long a stopping server waits for clients to take their last replies
/// before it closes their sockets.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A listening socket.
pub enum Listener {
    /// A Unix domain socket; `path` is removed when the server stops.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Its path, removed on exit (None for inherited sockets).
        path: Option<PathBuf>,
        /// The socket file's device and inode when bound: the path is
        /// removed on exit only while it is still this file, not one a
        /// successor server bound there meanwhile.
        file_id: Option<(u64, u64)>,
    },
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a Unix socket at `path`, replacing a stale socket file there
    /// (as QEMU does; any other kind of file is left alone and the bind
    /// fails).
    pub fn bind_unix(path: &Path) -> io::Result<Listener> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        let listener = UnixListener::bind(path)?;
        let file_id = std::fs::symlink_metadata(path).ok().map(|m| file_id(&m));
        Ok(Listener::Unix { listener, path: Some(path.to_path_buf()), file_id })
    }

    /// Binds TCP on every address `host:port` resolves to.
    pub fn bind_tcp(host: &str, port: u16) -> io::Result<Vec<Listener>> {
        let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
        let mut out = Vec::new();
        let mut last_err = None;
        for a in addrs {
            match TcpListener::bind(a) {
                Ok(l) => out.push(Listener::Tcp(l)),
                Err(e) => last_err = Some(e),
            }
        }
        if out.is_empty() {
            return Err(last_err.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")));
        }
        Ok(out)
    }

    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix { listener, .. } => Stream::Unix(listener.accept()?.0),
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
        })
    }

    /// Wakes a thread blocked in accept (Linux returns EINVAL from accept
    /// on a listening socket that was shut down).
    fn wake(&self) {
        let fd = match self {
            Listener::Unix { listener, .. } => listener.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        };
        crate::sys::shutdown_listener(fd);
    }
}

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Clients served at once; 0 means no limit but [`MAX_CLIENTS`].
    pub shared: usize,
    /// Keep running after the last client leaves (`-t`).
    pub persistent: bool,
    /// Time a client has to finish the handshake (None: no limit).
    pub handshake_limit: Option<Duration>,
    /// Worker threads.
    pub workers: usize,
    /// TLS credentials: clients must start TLS (`--tls-creds`).
    pub tls: Option<TlsServer>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            shared: 1,
            persistent: false,
            handshake_limit: Some(Duration::from_secs(10)),
            workers: 8,
            tls: None,
        }
    }
}

struct State {
    active: usize,
    served: u64,
    stopping: bool,
    next_id: u64,
    clients: HashMap<u64, Stream>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Stops a running server from another thread.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    /// Asks the server to stop.
    pub fn shutdown(&self) {
        self.0.lock().stopping = true;
        self.0.changed.notify_all();
    }
}

/// An NBD server: listeners, one export, a worker pool.
pub struct Server {
    export: Arc<Export>,
    listeners: Vec<Listener>,
    opts: ServerOptions,
    shared: Arc<Shared>,
}

impl Server {
    /// A server for `export` on `listeners`.
    pub fn new(export: Export, listeners: Vec<Listener>, opts: ServerOptions) -> Server {
        let state = State { active: 0, served: 0, stopping: false, next_id: 0, clients: HashMap::new() };
        Server {
            export: Arc::new(export),
            listeners,
            opts,
            shared: Arc::new(Shared { state: Mutex::new(state), changed: Condvar::new() }),
        }
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.shared))
    }

    /// Serves until stopped, then flushes the image. Returns the flush's
    /// result, once no connection holds the export any more (so that the
    /// caller can close the image as its last holder).
    pub fn run(self) -> Result<(), oxqcow::Error> {
        let pool = Pool::new(self.opts.workers).map_err(|e| oxqcow::Error::Io {
            op: "starting worker threads",
            offset: 0,
            source: e,
        })?;
        let serving = Arc::new(Serving {
            export: Arc::clone(&self.export),
            pool,
            memory: Arc::new(Memory::new()),
            handshake_limit: self.opts.handshake_limit,
            tls: self.opts.tls.clone(),
        });
        let limit = if self.opts.shared == 0 { MAX_CLIENTS } else { self.opts.shared.min(MAX_CLIENTS) };
        let listeners: Vec<Arc<Listener>> = self.listeners.into_iter().map(Arc::new).collect();
        let mut acceptors: Vec<JoinHandle<()>> = Vec::new();
        for l in &listeners {
            let (l, shared, serving) = (Arc::clone(l), Arc::clone(&self.shared), Arc::clone(&serving));
            let t = std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&l, &shared, &serving, limit));
            match t {
                Ok(t) => acceptors.push(t),
                Err(e) => {
                    self.shared.lock().stopping = true;
                    return Err(oxqcow::Error::Io { op: "starting the accept thread", offset: 0, source: e });
                }
            }
        }
        // Wait for a reason to stop.
        {
            let mut st = self.shared.lock();
            while !st.stopping && (self.opts.persistent || st.served == 0 || st.active > 0) {
                st = self.shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.stopping = true;
            // Let clients finish what they sent: no more requests are read.
            for c in st.clients.values() {
                let _ = c.shutdown(Shutdown::Read);
            }
        }
        self.shared.changed.notify_all();
        for l in &listeners {
            l.wake();
        }
        for t in acceptors {
            let _ = t.join();
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut st = self.shared.lock();
        while st.active > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                for c in st.clients.values() {
                    let _ = c.shutdown(Shutdown::Both);
                }
                st = self.shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st = self.shared.changed.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        drop(st);
        drop(serving);
        for l in &listeners {
            if let Listener::Unix { path: Some(p), file_id: Some(id), .. } = &**l {
                remove_if_same(p, *id);
            }
        }
        self.export.image().flush()
    }
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// Removes the socket file at `path` if it is still the file `id` names:
/// a server that stops after another one replaced its socket (a restart on
/// the same path) leaves the new one alone.
fn remove_if_same(path: &Path, id: (u64, u64)) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| file_id(&m) == id) {
        let _ = std::fs::remove_file(path);
    }
}

/// What every connection is served with.
struct Serving {
    export: Arc<Export>,
    pool: Pool,
    memory: Arc<Memory>,
    handshake_limit: Option<Duration>,
    tls: Option<TlsServer>,
}

fn accept_loop(l: &Listener, shared: &Arc<Shared>, serving: &Arc<Serving>, limit: usize) {
    loop {
        {
            let mut st = shared.lock();
            while !st.stopping && st.active >= limit {
                st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stopping {
                return;
            }
        }
        let stream = match l.accept() {
            Ok(s) => s,
            Err(e) => {
                if shared.lock().stopping {
                    return;
                }
                // Out of descriptors or an aborted connection: try again
                // shortly rather than spin.
                if e.kind() != io::ErrorKind::ConnectionAborted {
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        let Ok(handle) = stream.try_clone() else { continue };
        let id = {
            let mut st = shared.lock();
            if st.stopping {
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            st.active += 1;
            st.served += 1;
            st.next_id += 1;
            let id = st.next_id;
            st.clients.insert(id, handle);
            id
        };
        let (shared2, sv) = (Arc::clone(shared), Arc::clone(serving));
        let spawned = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || {
            conn::serve(stream, Arc::clone(&sv.export), &sv.pool, &sv.memory, sv.handshake_limit, sv.tls.as_ref());
            // Let go of the export before counting this connection as gone:
            // once none is active, `run` returns and its caller closes the
            // image, which it can only do as its last holder (a clone still
            // held here made the close, and the bitmaps it stores, a race).
            drop(sv);
            let mut st = shared2.lock();
            st.active -= 1;
            st.clients.remove(&id);
            drop(st);
            shared2.changed.notify_all();
        });
        if spawned.is_err() {
            let mut st = shared.lock();
            st.active -= 1;
            if let Some(c) = st.clients.remove(&id) {
                let _ = c.shutdown(Shutdown::Both);
            }
            drop(st);
            shared.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server stopping after a successor bound the same path removed the
    /// successor's socket (iotest 058 restarts qemu-nbd on one path and
    /// sometimes found no socket).
    #[test]
    fn a_stopping_server_leaves_a_successors_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let first = Listener::bind_unix(&path).unwrap();
        let second = Listener::bind_unix(&path).unwrap();
        let id = |l: &Listener| match l {
            Listener::Unix { file_id: Some(id), .. } => *id,
            _ => panic!("a bound unix listener has a file id"),
        };
        remove_if_same(&path, id(&first));
        assert!(path.exists(), "the successor's socket was removed");
        remove_if_same(&path, id(&second));
        assert!(!path.exists(), "a server removes its own socket");
    }
}
