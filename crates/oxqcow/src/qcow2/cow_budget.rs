//! A bound on the memory that copy-on-write holds at once.
//!
//! A write into part of a new cluster reads the rest of the cluster (from
//! the backing file, a compressed cluster, ...) and writes it with the new
//! bytes. With large clusters that is up to a cluster per request, and with
//! many requests in flight (an NBD client or `bench -d 64`) the buffers add
//! up to far more than the image's caches. Requests therefore take their
//! copy-on-write bytes from a fixed budget before allocating them and wait
//! while it is spent.
//!
//! A request never asks for more than the whole budget, so the largest one
//! runs once the others are done, and a holder only reads, writes and gives
//! back: it never waits for another request, so waiting cannot deadlock.

use std::sync::{Condvar, Mutex};

/// The budget's size: a few large clusters' worth (2 MiB clusters with
/// their head, tail and data fit four times over).
pub(crate) const COW_BUDGET_BYTES: u64 = 16 << 20;

/// The copy-on-write bytes not lent out.
#[derive(Debug)]
pub(crate) struct CowBudget {
    free: Mutex<u64>,
    returned: Condvar,
    total: u64,
}

/// Bytes lent by a [`CowBudget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct CowLease<'a> {
    budget: &'a CowBudget,
    bytes: u64,
}

impl CowBudget {
    pub(crate) fn new(total: u64) -> CowBudget {
        CowBudget { free: Mutex::new(total), returned: Condvar::new(), total }
    }

    /// Waits until `bytes` (at most the whole budget) are free and lends them.
    pub(crate) fn take(&self, bytes: u64) -> CowLease<'_> {
        let bytes = bytes.min(self.total);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free < bytes {
            free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= bytes;
        CowLease { budget: self, bytes }
    }
}

impl Default for CowBudget {
    fn default() -> CowBudget {
        CowBudget::new(COW_BUDGET_BYTES)
    }
}

impl Drop for CowLease<'_> {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut free = self.budget.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += self.bytes;
        self.budget.returned.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Guards the bound itself: however many threads ask at once, the bytes
    /// lent never exceed the budget, and a request larger than the budget
    /// still runs (alone) instead of waiting forever.
    #[test]
    fn lends_no_more_than_the_budget() {
        let budget = Arc::new(CowBudget::new(10));
        let lent = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let (budget, lent, most) = (budget.clone(), lent.clone(), most.clone());
                std::thread::spawn(move || {
                    for round in 0..200u64 {
                        let want = if (i + round) % 17 == 0 { 25 } else { 1 + (i + round) % 6 };
                        let lease = budget.take(want);
                        let now = lent.fetch_add(lease.bytes, Ordering::SeqCst) + lease.bytes;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        lent.fetch_sub(lease.bytes, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 10, "lent {} of 10", most.load(Ordering::SeqCst));
        assert_eq!(*budget.free.lock().unwrap(), 10);
    }
}
