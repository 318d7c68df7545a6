//! The operating-system calls the server needs and std does not offer:
//! waking a blocked accept, termination signals, forking into the
//! background, and the sockets systemd passes in; also `raise`, for
//! qemu-io's `sigraise`; sends that never raise SIGPIPE. Every unsafe block of the
//! crate is here, each with the reason it is sound.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

use crate::server::Listener;

/// Shuts a listening socket down so that a thread blocked in `accept` on it
/// returns (Linux answers EINVAL).
pub fn shutdown_listener(fd: BorrowedFd<'_>) {
    // SAFETY: `fd` is an open descriptor for the whole borrow; shutdown(2)
    // takes no pointers and only changes the socket's state.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// Restores the default action of SIGPIPE, which Rust's runtime ignores:
/// a command writing to a pipe whose reader went away (`oxqcow map ... |
/// head -1`) then ends quietly, killed by the signal, as QEMU's tools do,
/// instead of failing its next write. Servers keep ignoring it: a client
/// that goes away must not kill them.
pub fn default_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL installs no handler, so no Rust code
    // runs in signal context; it is called before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The signals that stop the server, as qemu-nbd handles them.
const TERMINATION: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Termination signals, blocked so that one thread can wait for them.
pub struct TerminationSignals {
    set: libc::sigset_t,
}

impl TerminationSignals {
    /// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread, and so in
    /// every thread it starts afterwards: call it before starting any.
    pub fn block() -> io::Result<TerminationSignals> {
        // SAFETY: sigset_t is plain data that sigemptyset initialises before
        // any use; the pointers passed are to this local for the call only.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in TERMINATION {
                libc::sigaddset(&mut set, sig);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            set
        };
        Ok(TerminationSignals { set })
    }

    /// Waits for one of the signals and returns its number.
    pub fn wait(&self) -> io::Result<libc::c_int> {
        let mut sig: libc::c_int = 0;
        // SAFETY: `self.set` was initialised by `block`; `sig` is a valid
        // out pointer for the call.
        let rc = unsafe { libc::sigwait(&self.set, &mut sig) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(sig)
    }
}

/// The result of [`fork`].
pub enum Forked {
    /// In the parent: the child.
    Parent(ChildProcess),
    /// In the child.
    Child,
}

/// A child process made by [`fork`].
pub struct ChildProcess(libc::pid_t);

/// Forks the process. Only sound before the process starts any thread
/// (the child would inherit locks held by threads that do not exist in it):
/// the `serve` command calls it right after parsing its arguments.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: called while the process is single-threaded (see above), so
    // the child's copy of every lock and allocator state is consistent.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(ChildProcess(pid))),
    }
}

impl ChildProcess {
    /// Waits for the child to end and returns its exit code (128 + the
    /// signal number when a signal killed it).
    pub fn wait(self) -> io::Result<i32> {
        wait_child(self.0)
    }
}

fn wait_child(pid: libc::pid_t) -> io::Result<i32> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid out pointer for the call.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) })
}

/// Sends signal `sig` to the calling thread, as C's `raise(3)` (qemu-io's
/// `sigraise`). A signal number the system does not know is refused.
pub fn raise(sig: i32) -> io::Result<()> {
    // SAFETY: raise(3) takes a plain integer and touches no memory of ours;
    // whatever the signal does (including ending the process) is its
    // documented effect.
    if unsafe { libc::raise(sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts a new session, detaching from the controlling terminal, as a
/// daemon does.
pub fn setsid() {
    // SAFETY: setsid(2) takes no arguments and touches no memory.
    unsafe {
        libc::setsid();
    }
}

/// Points the standard streams named by `fds` (0, 1, 2) at /dev/null.
pub fn stdio_to_null(fds: &[libc::c_int]) -> io::Result<()> {
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    for &fd in fds {
        // SAFETY: both descriptors are open; dup2(2) takes no pointers and
        // replaces only the standard stream `fd`, which no Rust object owns.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The listening sockets passed by socket activation (`LISTEN_PID` naming
/// this process and `LISTEN_FDS` counting descriptors from 3), or None
/// when the process was not socket-activated. The variables are removed so
/// the descriptors are taken once. Call before starting threads.
pub fn activated_listeners() -> Result<Option<Vec<Listener>>, String> {
    let Ok(pid) = std::env::var("LISTEN_PID") else { return Ok(None) };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let count = std::env::var("LISTEN_FDS").unwrap_or_default();
    let n: i32 = count.trim().parse().map_err(|_| format!("Unexpected value for LISTEN_FDS: {count}"))?;
    if !(1..=64).contains(&n) {
        return Err(format!("Unexpected value for LISTEN_FDS: {count}"));
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let mut out = Vec::new();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + n {
        // SAFETY: under the socket activation protocol, checked above by
        // LISTEN_PID, descriptors 3..3+LISTEN_FDS belong to this process and
        // nothing else in it owns them; the variables are removed so no
        // second call takes them again.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let unix = UnixListener::from(owned);
        if unix.local_addr().is_ok() {
            out.push(Listener::Unix { listener: unix, path: None, file_id: None });
        } else {
            let tcp = TcpListener::from(OwnedFd::from(unix));
            tcp.local_addr().map_err(|e| format!("socket activation: descriptor {fd} is not a socket: {e}"))?;
            out.push(Listener::Tcp(tcp));
        }
    }
    Ok(Some(out))
}

/// Sends as much of `buf` as the socket takes without blocking
/// (`MSG_DONTWAIT`; `MSG_NOSIGNAL` so a closed peer is an error, not a
/// signal). Returns the bytes sent; `WouldBlock` when none fit.
pub fn send_nonblocking(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is readable for `buf.len()` bytes and `fd` is open for
    // the borrow; send(2) only reads the buffer.
    let n =
        unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sends what of `bufs` the socket takes, blocking until some fits
/// (`MSG_NOSIGNAL`: the NBD client runs in commands that restore SIGPIPE's
/// default action, and a server gone mid-request must fail the request,
/// not kill the command). Returns the bytes sent.
pub fn send_vectored(fd: BorrowedFd<'_>, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    let mut msg: libc::msghdr = empty_msghdr();
    msg.msg_iov = bufs.as_ptr().cast_mut().cast();
    msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
    // SAFETY: `IoSlice` is ABI-compatible with `iovec` (std guarantees it
    // on Unix), every slice is readable for its length for the call, the
    // header names no address and no control data, and `fd` is open for
    // the borrow; sendmsg(2) only reads these buffers.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// An empty `msghdr`.
fn empty_msghdr() -> libc::msghdr {
    // SAFETY: `msghdr` is a plain C struct of integers and pointers, for
    // which all zeros (null pointers, zero lengths) is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Asks for a socket send buffer of `bytes` (SO_SNDBUF; the kernel may
/// give less, up to its `wmem_max`).
pub fn set_send_buffer(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` lives across the call and its size is passed; `fd`
    // is open for the borrow; setsockopt(2) only reads the value.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
