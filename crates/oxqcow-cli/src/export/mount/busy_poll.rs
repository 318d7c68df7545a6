//! Adaptive busy polling of the FUSE device while requests keep coming.
//!
//! A program reading or writing the mounted file one request at a time
//! (psync I/O, a database, a guest's disk) waits for each answer, so every
//! request costs a full round trip: its thread sleeps, the kernel wakes
//! ours, ours answers and the kernel wakes it again. Ours runs on another
//! CPU than the caller's (the scheduler prefers an idle CPU for each
//! wakeup), and a cross-CPU wakeup is the bulk of the round trip: on the
//! 2-CPU virtual machines this project is measured on, 4 KiB requests ran
//! at ~14k per second whoever served them (about 70 us each), and at
//! ~38k when the serving thread never sleeps.
//!
//! So while requests arrive, the device is read without blocking: the
//! first request after a quiet spell switches the device's open file to
//! O_NONBLOCK, and fuser's reader, which retries a read that finds nothing
//! (EAGAIN), keeps asking instead of sleeping. A watcher thread switches
//! it back once no request came for [`QUIET`], so an idle mount sleeps as
//! any other. The cost is one CPU kept busy while the file is in use and
//! for at most twice [`QUIET`] after, which is why it is only on by default
//! where another CPU is left for the caller (`mount.rs` decides).
//!
//! Only the mount's first channel is switched: with `--threads`, the other
//! channels (their own open files of the device) keep sleeping readers for
//! requests that really arrive at once.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

/// How long without a request before the device is read blocking again.
pub const QUIET: Duration = Duration::from_millis(5);

/// The busy-polling state of one mount.
#[derive(Debug, Default)]
pub struct BusyPoll {
    /// The device's open file (a duplicate of the session's descriptor:
    /// the O_NONBLOCK flag belongs to the open file, so both see it). Unset
    /// until the session exists, and for a mount that does not poll.
    device: OnceLock<OwnedFd>,
    /// Requests seen, for the watcher to tell a quiet spell.
    requests: AtomicU64,
    /// Whether the device is read without blocking now.
    polling: AtomicBool,
    /// Serialises the flag changes; true once stopped.
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl BusyPoll {
    /// Polls `device` from now on (called once the session exists).
    pub fn attach(&self, device: OwnedFd) {
        let _ = self.device.set(device);
    }

    /// Called by every request: starts polling if it had stopped.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if self.polling.load(Ordering::SeqCst) {
            return;
        }
        let Some(device) = self.device.get() else { return };
        let stopped = self.lock();
        if *stopped || self.polling.load(Ordering::SeqCst) {
            return;
        }
        // Were the flag not to change, requests are served as without
        // polling: nothing is lost but speed.
        if set_nonblocking(device, true).is_ok() {
            self.polling.store(true, Ordering::SeqCst);
            self.changed.notify_all();
        }
    }

    /// Whether the device is being read without blocking now.
    #[cfg(test)]
    pub fn is_polling(&self) -> bool {
        self.polling.load(Ordering::SeqCst)
    }

    /// The watcher: runs until [`BusyPoll::stop`], turning polling off
    /// after each quiet spell of [`QUIET`].
    pub fn watch(&self) {
        let mut stopped = self.lock();
        loop {
            while !*stopped && !self.polling.load(Ordering::SeqCst) {
                stopped = self.changed.wait(stopped).unwrap_or_else(|p| p.into_inner());
            }
            if *stopped {
                return;
            }
            let seen = self.requests.load(Ordering::SeqCst);
            let (s, _) = self.changed.wait_timeout(stopped, QUIET).unwrap_or_else(|p| p.into_inner());
            stopped = s;
            if *stopped {
                return;
            }
            if self.requests.load(Ordering::SeqCst) != seen {
                continue;
            }
            let Some(device) = self.device.get() else { continue };
            // A request racing with this only finds the device blocking
            // again and switches it back: one slower round trip.
            if set_nonblocking(device, false).is_ok() {
                self.polling.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Ends [`BusyPoll::watch`]; requests no longer start polling.
    pub fn stop(&self) {
        *self.lock() = true;
        self.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn set_nonblocking(fd: &OwnedFd, on: bool) -> rustix::io::Result<()> {
    let flags = fcntl_getfl(fd)?;
    let wanted = if on { flags | OFlags::NONBLOCK } else { flags - OFlags::NONBLOCK };
    if wanted != flags {
        fcntl_setfl(fd, wanted)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    fn nonblocking(fd: &OwnedFd) -> bool {
        fcntl_getfl(fd).unwrap().contains(OFlags::NONBLOCK)
    }

    /// Waits (bounded) for the watcher to switch the device back.
    fn wait_until_blocking(poll: &BusyPoll, fd: &OwnedFd) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while poll.is_polling() || nonblocking(fd) {
            assert!(Instant::now() < deadline, "polling never stopped after the requests did");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn requests_switch_the_device_to_polling_and_a_quiet_spell_back() {
        // A socket stands in for the device: the flag lives on its open file.
        let (device, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let device = OwnedFd::from(device);
        let probe = device.try_clone().unwrap();
        let poll = Arc::new(BusyPoll::default());
        poll.attach(device);
        let watcher = std::thread::spawn({
            let poll = Arc::clone(&poll);
            move || poll.watch()
        });
        assert!(!nonblocking(&probe));
        for _ in 0..2 {
            poll.request();
            assert!(poll.is_polling());
            assert!(nonblocking(&probe), "a request must make the device's reads non-blocking");
            wait_until_blocking(&poll, &probe);
        }
        poll.stop();
        watcher.join().unwrap();
        poll.request();
        assert!(!nonblocking(&probe), "a stopped poller must not switch the device again");
    }

    #[test]
    fn without_a_device_requests_change_nothing() {
        let poll = BusyPoll::default();
        poll.request();
        assert!(!poll.is_polling());
    }
}
