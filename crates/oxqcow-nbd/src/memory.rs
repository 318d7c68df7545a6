//! The server's request memory: one budget, shared by every connection, for
//! the buffers requests hold while in flight (write payloads, read and block
//! status replies) and for the idle buffers kept for reuse.
//!
//! Each connection bounds itself (see [`crate::conn`]), but clients add up:
//! forty clients pipelining 32 MiB reads would want 64 MiB each, and a
//! process under an address-space limit aborts on the first allocation
//! that fails. The budget makes the sum a bound:
//!
//! - Every buffer a request holds is granted first: all grants together
//!   stay within [`MEMORY_LIMIT`], one connection's within
//!   [`CONNECTION_LIMIT`] (a larger single request still runs, alone).
//! - A grant that does not fit waits, and the connection's reader with it:
//!   it stops reading its socket (back-pressure). Over its own share, a
//!   connection waits as long as it takes: its own replies going out end
//!   the wait, and a client that does not read them stalls only itself.
//!   For the server's budget, connections that hold nothing queue, first
//!   come first served, ahead of connections that hold memory (each client
//!   gets one request in before any gets a second), and every waiter gives
//!   up once no memory at all has come back for [`MEMORY_STALL`]: the
//!   holders are stuck, and may be waiting for this very wait, as when a
//!   client reads one connection's replies only after another connection
//!   took its request. A request larger than the whole budget is refused
//!   at once.
//! - Buffers are allocated fallibly, outside the lock: a request that gives
//!   up or whose allocation fails is answered with ENOMEM (as qemu-nbd does
//!   when its allocation fails), never by aborting the process.
//! - Buffers come back when their request is done with them. Those of at
//!   least [`RECYCLE_MIN`] bytes are kept, up to [`RECYCLE_BYTES`] in all,
//!   for the next grant of the same size: a reused buffer needs no fresh
//!   pages from the kernel and, holding initialised bytes already, no
//!   clearing. Idle buffers count against the budget and are freed when a
//!   grant needs their room, and when the last connection ends.
//!
//! Locks: one mutex, held to count, to queue and to pick an idle buffer,
//! never across an allocation or a free.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Request memory of the whole server: eight requests of the 32 MiB
/// maximum (`export::MAX_BLOCK`) at once, or four connections at their own
/// limit. Throughput needs far less (nbdcopy keeps 64 requests of 256 KiB
/// in flight per connection: 16 MiB), and a server in a small VM or
/// container can afford it next to its page cache.
pub const MEMORY_LIMIT: usize = 256 << 20;
/// Request memory of one connection: no client takes the whole budget.
pub const CONNECTION_LIMIT: usize = 64 << 20;
/// How long a grant waits for the server's budget while no memory comes
/// back at all. Any working client releases memory with every reply it
/// reads (a 32 MiB reply takes under 3 s at 100 Mbit/s), so a longer
/// silence means the holders are stuck and waiting could be for ever.
pub const MEMORY_STALL: Duration = Duration::from_secs(10);
/// Idle buffers kept for reuse, in all: a quarter of the budget, which
/// covers the swing of a few busy connections between grants.
pub const RECYCLE_BYTES: usize = 64 << 20;
/// Smaller buffers are freed rather than kept: the allocator reuses them
/// cheaply, fresh pages and clearing cost only for large ones.
pub const RECYCLE_MIN: usize = 64 << 10;

/// A request that cannot have its memory: answered with ENOMEM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoMemory;

impl fmt::Display for NoMemory {
    /// qemu-nbd's text for a failed allocation.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("No memory")
    }
}

/// The server's budget (see the module doc).
pub struct Memory {
    limit: usize,
    per_connection: usize,
    stall: Duration,
    state: Mutex<State>,
    /// Signalled when memory comes back or the queue moves.
    changed: Condvar,
}

struct State {
    /// Bytes granted to requests in flight.
    granted: usize,
    /// Idle buffers by capacity, and their total.
    idle: BTreeMap<usize, Vec<Vec<u8>>>,
    idle_bytes: usize,
    /// Tickets of the waiting connections that hold nothing, in arrival
    /// order.
    queue: VecDeque<u64>,
    next_ticket: u64,
    /// Counts the times memory came back: waiters measure their patience
    /// from the last one.
    releases: u64,
    /// Threads waiting: a release wakes only when someone waits.
    waiting: usize,
    /// Live accounts: the idle buffers go with the last one.
    accounts: usize,
}

impl State {
    /// Takes an idle buffer of capacity `n`, and the idle buffers that no
    /// longer fit beside the grants (freed by the caller, unlocked).
    fn reuse(&mut self, n: usize, limit: usize) -> (Option<Vec<u8>>, Vec<Vec<u8>>) {
        let reused = self.pop_idle(Some(n));
        let mut evicted = Vec::new();
        while self.granted + self.idle_bytes > limit {
            // The largest first: the fewest frees for the room.
            match self.pop_idle(None) {
                Some(v) => evicted.push(v),
                None => break,
            }
        }
        (reused, evicted)
    }

    /// An idle buffer of capacity `n`, or the largest one.
    fn pop_idle(&mut self, n: Option<usize>) -> Option<Vec<u8>> {
        let mut entry = match n {
            Some(n) => match self.idle.entry(n) {
                std::collections::btree_map::Entry::Occupied(e) => e,
                std::collections::btree_map::Entry::Vacant(_) => return None,
            },
            None => self.idle.last_entry()?,
        };
        let v = entry.get_mut().pop();
        if entry.get().is_empty() {
            entry.remove();
        }
        let v = v?;
        self.idle_bytes -= v.capacity();
        Some(v)
    }
}

impl Memory {
    /// A budget of [`MEMORY_LIMIT`], [`CONNECTION_LIMIT`] per connection.
    pub fn new() -> Memory {
        Memory::with_limits(MEMORY_LIMIT, CONNECTION_LIMIT, MEMORY_STALL)
    }

    /// A budget of `limit` bytes, `per_connection` for one connection,
    /// where a connection holding nothing gives up after `stall` without a
    /// release.
    pub fn with_limits(limit: usize, per_connection: usize, stall: Duration) -> Memory {
        let state = State {
            granted: 0,
            idle: BTreeMap::new(),
            idle_bytes: 0,
            queue: VecDeque::new(),
            next_ticket: 0,
            releases: 0,
            waiting: 0,
            accounts: 0,
        };
        Memory { limit, per_connection, stall, state: Mutex::new(state), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The account of a new connection.
    pub fn account(self: &Arc<Self>) -> Account {
        self.lock().accounts += 1;
        Account { memory: Arc::clone(self), held: AtomicUsize::new(0) }
    }
}

impl Default for Memory {
    fn default() -> Self {
        Memory::new()
    }
}

/// One connection's share of the budget.
pub struct Account {
    memory: Arc<Memory>,
    /// Bytes granted to this connection's requests (changed only under the
    /// budget's lock).
    held: AtomicUsize,
}

impl Account {
    /// An empty buffer of capacity `n` for a request, granted as the module
    /// doc says: this may wait. Its grant lasts until [`Account::give_back`].
    /// One thread takes for an account (the connection's reader), so its
    /// grants only shrink while it waits.
    pub fn take(&self, n: usize) -> Result<Vec<u8>, NoMemory> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let m = &*self.memory;
        if n > m.limit {
            return Err(NoMemory);
        }
        let mut st = m.lock();
        let mut ticket = None;
        let (mut seen, mut since) = (st.releases, Instant::now());
        loop {
            let held = self.held.load(Ordering::Relaxed);
            if held == 0 && ticket.is_none() {
                let t = st.next_ticket;
                st.next_ticket += 1;
                st.queue.push_back(t);
                ticket = Some(t);
                (seen, since) = (st.releases, Instant::now());
            }
            let turn = match ticket {
                Some(t) => st.queue.front() == Some(&t),
                None => st.queue.is_empty(),
            };
            let own = held == 0 || held + n <= m.per_connection;
            if turn && own && st.granted + n <= m.limit {
                let moved = ticket.is_some();
                if moved {
                    st.queue.pop_front();
                }
                st.granted += n;
                self.held.store(held + n, Ordering::Relaxed);
                let (reused, evicted) = st.reuse(n, m.limit);
                // The next in the queue may fit too.
                let wake = moved && st.waiting > 0;
                drop(st);
                if wake {
                    m.changed.notify_all();
                }
                drop(evicted);
                return match reused {
                    Some(v) => Ok(v),
                    None => self.allocate(n),
                };
            }
            st.waiting += 1;
            if !own {
                // Only this connection's own replies stand in the way: its
                // client reading them ends the wait, and nobody else's.
                st = m.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                st.waiting -= 1;
                (seen, since) = (st.releases, Instant::now());
                continue;
            }
            if st.releases != seen {
                (seen, since) = (st.releases, Instant::now());
            }
            let left = m.stall.saturating_sub(since.elapsed());
            if left.is_zero() {
                st.waiting -= 1;
                let queued = ticket.is_some();
                st.queue.retain(|&t| Some(t) != ticket);
                let wake = queued && st.waiting > 0;
                drop(st);
                if wake {
                    m.changed.notify_all();
                }
                return Err(NoMemory);
            }
            st = m.changed.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
            st.waiting -= 1;
        }
    }

    /// A fresh buffer for a grant of `n`; on failure the grant goes back.
    fn allocate(&self, n: usize) -> Result<Vec<u8>, NoMemory> {
        let mut v = Vec::new();
        if v.try_reserve_exact(n).is_ok() {
            return Ok(v);
        }
        self.give_back(v, n);
        Err(NoMemory)
    }

    /// Ends the grant of `n` bytes that came with `buf` (or with the
    /// buffer `buf` replaced), keeping `buf` for reuse if it is large and
    /// unchanged.
    pub fn give_back(&self, buf: Vec<u8>, n: usize) {
        if n == 0 {
            return;
        }
        let m = &*self.memory;
        let mut st = m.lock();
        st.granted -= n;
        self.held.fetch_sub(n, Ordering::Relaxed);
        st.releases = st.releases.wrapping_add(1);
        let spare = if buf.capacity() == n && n >= RECYCLE_MIN && st.idle_bytes + n <= RECYCLE_BYTES {
            st.idle_bytes += n;
            st.idle.entry(n).or_default().push(buf);
            None
        } else {
            Some(buf)
        };
        let wake = st.waiting > 0;
        drop(st);
        if wake {
            m.changed.notify_all();
        }
        drop(spare);
    }
}

impl Drop for Account {
    /// Grants still held end with the connection; the last connection takes
    /// the idle buffers with it.
    fn drop(&mut self) {
        let m = &*self.memory;
        let mut st = m.lock();
        let held = self.held.load(Ordering::Relaxed);
        if held > 0 {
            st.granted -= held;
            st.releases = st.releases.wrapping_add(1);
        }
        st.accounts -= 1;
        let idle = if st.accounts == 0 {
            st.idle_bytes = 0;
            std::mem::take(&mut st.idle)
        } else {
            BTreeMap::new()
        };
        let wake = st.waiting > 0;
        drop(st);
        if wake {
            m.changed.notify_all();
        }
        drop(idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    const KIB: usize = 1 << 10;

    fn budget(limit: usize, per_connection: usize, stall: Duration) -> Arc<Memory> {
        Arc::new(Memory::with_limits(limit, per_connection, stall))
    }

    fn granted(m: &Memory) -> usize {
        m.lock().granted
    }

    /// Blocks until `n` threads wait on `m` (a thread is then parked in
    /// `take`, whatever the timing).
    fn until_waiting(m: &Memory, n: usize) {
        let mut st = m.lock();
        while st.waiting < n {
            st = m.changed.wait_timeout(st, Duration::from_millis(5)).unwrap().0;
        }
    }

    /// Takes `n` for `account` on another thread, reporting the result.
    fn take_in_thread(account: &Arc<Account>, n: usize) -> mpsc::Receiver<Result<Vec<u8>, NoMemory>> {
        let (tx, rx) = mpsc::channel();
        let a = Arc::clone(account);
        thread::spawn(move || tx.send(a.take(n)).unwrap());
        rx
    }

    #[test]
    fn grants_are_counted_and_given_back() {
        let m = budget(MEMORY_LIMIT, CONNECTION_LIMIT, MEMORY_STALL);
        let a = m.account();
        let buf = a.take(100 * KIB).unwrap();
        assert_eq!(buf.capacity(), 100 * KIB);
        assert_eq!(granted(&m), 100 * KIB);
        assert_eq!(a.held.load(Ordering::Relaxed), 100 * KIB);
        a.give_back(buf, 100 * KIB);
        assert_eq!(granted(&m), 0);
        assert_eq!(a.held.load(Ordering::Relaxed), 0);
        assert!(a.take(0).unwrap().capacity() == 0 && granted(&m) == 0, "nothing to grant for 0 bytes");
    }

    #[test]
    fn large_buffers_are_reused_for_the_same_size_only() {
        let m = budget(MEMORY_LIMIT, CONNECTION_LIMIT, MEMORY_STALL);
        let a = m.account();
        let mut buf = a.take(RECYCLE_MIN).unwrap();
        buf.resize(RECYCLE_MIN, 7);
        let ptr = buf.as_ptr();
        a.give_back(buf, RECYCLE_MIN);
        assert_eq!(m.lock().idle_bytes, RECYCLE_MIN);
        let other = a.take(RECYCLE_MIN + 1).unwrap();
        assert_ne!(other.as_ptr(), ptr, "a buffer of another size was handed out");
        let again = a.take(RECYCLE_MIN).unwrap();
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), RECYCLE_MIN, "a reused buffer keeps its bytes (no clearing)");
        assert_eq!(m.lock().idle_bytes, 0);
        a.give_back(other, RECYCLE_MIN + 1);
        // Replaced (an error reply instead of the data) or small: freed.
        a.give_back(vec![0; 10], RECYCLE_MIN);
        let small = a.take(RECYCLE_MIN - 1).unwrap();
        a.give_back(small, RECYCLE_MIN - 1);
        let st = m.lock();
        assert_eq!((st.granted, st.idle_bytes), (0, RECYCLE_MIN + 1));
    }

    #[test]
    fn idle_buffers_make_room_for_grants_and_go_with_the_last_connection() {
        let m = budget(256 * KIB, 256 * KIB, MEMORY_STALL);
        let (a, b) = (m.account(), m.account());
        let buf = a.take(128 * KIB).unwrap();
        a.give_back(buf, 128 * KIB);
        assert_eq!(m.lock().idle_bytes, 128 * KIB);
        // 192 KiB of another size: the idle 128 KiB must go, not block it.
        let big = b.take(192 * KIB).unwrap();
        let st = m.lock();
        assert_eq!((st.granted, st.idle_bytes), (192 * KIB, 0));
        drop(st);
        b.give_back(big, 192 * KIB);
        assert_eq!(m.lock().idle_bytes, 192 * KIB);
        drop(a);
        assert_eq!(m.lock().idle_bytes, 192 * KIB, "a connection remains");
        drop(b);
        let st = m.lock();
        assert!(st.idle.is_empty() && st.idle_bytes == 0, "the last connection left idle buffers");
    }

    #[test]
    fn a_connection_holding_memory_waits_for_a_release() {
        let m = budget(100 * KIB, 100 * KIB, MEMORY_STALL);
        let (a, b) = (Arc::new(m.account()), Arc::new(m.account()));
        let first = a.take(60 * KIB).unwrap();
        let held = b.take(30 * KIB).unwrap();
        let rx = take_in_thread(&b, 30 * KIB);
        until_waiting(&m, 1);
        assert!(rx.try_recv().is_err(), "granted past the limit");
        a.give_back(first, 60 * KIB);
        let got = rx.recv().unwrap().unwrap();
        assert_eq!(granted(&m), 60 * KIB);
        b.give_back(got, 30 * KIB);
        b.give_back(held, 30 * KIB);
        assert_eq!(granted(&m), 0);
    }

    #[test]
    fn a_connection_waits_for_its_own_share_to_come_back() {
        // However long: its own client holds it up, nobody else.
        let m = budget(MEMORY_LIMIT, 80 * KIB, Duration::from_millis(1));
        let a = Arc::new(m.account());
        let first = a.take(60 * KIB).unwrap();
        let rx = take_in_thread(&a, 30 * KIB);
        until_waiting(&m, 1);
        thread::sleep(Duration::from_millis(20));
        assert!(rx.try_recv().is_err(), "granted past the connection's share, or gave up");
        a.give_back(first, 60 * KIB);
        let got = rx.recv().unwrap().unwrap();
        a.give_back(got, 30 * KIB);
        // A single request larger than the share runs, alone.
        let alone = a.take(90 * KIB).unwrap();
        a.give_back(alone, 90 * KIB);
    }

    #[test]
    fn a_request_larger_than_the_budget_is_refused_at_once() {
        let m = budget(100 * KIB, 100 * KIB, Duration::from_secs(3600));
        let a = m.account();
        assert_eq!(a.take(100 * KIB + 1), Err(NoMemory));
        assert_eq!(granted(&m), 0);
    }

    #[test]
    fn a_failed_allocation_is_no_memory_and_gives_the_grant_back() {
        let m = budget(usize::MAX, usize::MAX, MEMORY_STALL);
        let a = m.account();
        // More than any address space: the allocator refuses it.
        assert_eq!(a.take(1 << 62), Err(NoMemory));
        assert_eq!((granted(&m), a.held.load(Ordering::Relaxed)), (0, 0));
        assert_eq!(m.lock().releases, 1);
    }

    #[test]
    fn a_connection_holding_nothing_gives_up_when_nothing_comes_back() {
        // Guards against a deadlock: the memory is held by requests whose
        // client waits for this connection's reply before it reads theirs.
        let m = budget(100 * KIB, 100 * KIB, Duration::from_millis(50));
        let (a, b) = (m.account(), m.account());
        let all = a.take(100 * KIB).unwrap();
        assert_eq!(b.take(KIB), Err(NoMemory));
        let st = m.lock();
        assert!(st.queue.is_empty() && st.waiting == 0, "the waiter left its place behind");
        drop(st);
        a.give_back(all, 100 * KIB);
        assert!(b.take(KIB).is_ok());
    }

    #[test]
    fn a_connection_holding_memory_gives_up_when_nothing_comes_back() {
        // Guards against a deadlock across connections: a client that
        // writes one connection's payload before it reads the replies that
        // hold the budget on another.
        let m = budget(100 * KIB, 100 * KIB, Duration::from_millis(50));
        let (a, b) = (m.account(), m.account());
        let most = a.take(90 * KIB).unwrap();
        let some = b.take(10 * KIB).unwrap();
        assert_eq!(b.take(20 * KIB), Err(NoMemory));
        assert_eq!((granted(&m), m.lock().waiting), (100 * KIB, 0));
        a.give_back(most, 90 * KIB);
        let more = b.take(20 * KIB).unwrap();
        b.give_back(more, 20 * KIB);
        b.give_back(some, 10 * KIB);
    }

    #[test]
    fn connections_holding_nothing_go_first_in_arrival_order() {
        let m = budget(100 * KIB, 100 * KIB, Duration::from_secs(3600));
        let (a, b, c) = (Arc::new(m.account()), Arc::new(m.account()), Arc::new(m.account()));
        let a_buf = a.take(90 * KIB).unwrap();
        let c_buf = c.take(10 * KIB).unwrap();
        // b holds nothing and queues; c holds memory and must let b go
        // first (both fit alone once a is done, not together).
        let rb = take_in_thread(&b, 50 * KIB);
        until_waiting(&m, 1);
        let rc = take_in_thread(&c, 41 * KIB);
        until_waiting(&m, 2);
        a.give_back(a_buf, 90 * KIB);
        let b_buf = rb.recv().unwrap().unwrap();
        until_waiting(&m, 1);
        assert!(rc.try_recv().is_err(), "the connection holding memory went first");
        b.give_back(b_buf, 50 * KIB);
        let c2 = rc.recv().unwrap().unwrap();
        c.give_back(c2, 41 * KIB);
        c.give_back(c_buf, 10 * KIB);
        assert_eq!(granted(&m), 0);
    }
}
