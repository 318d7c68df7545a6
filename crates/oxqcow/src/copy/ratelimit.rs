//! `-r RATE` of commit and convert: the copy is paced to at most RATE bytes
//! per second on average since it started (qemu-img's rate limit), by
//! sleeping whoever copied the bytes that put it ahead of the rate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Paces a copy shared by any number of threads.
pub struct RateLimit {
    bytes_per_second: u64,
    started: Instant,
    done: AtomicU64,
}

impl RateLimit {
    /// A limit of `bytes_per_second`; `None` for 0 (no limit).
    pub fn new(bytes_per_second: u64) -> Option<RateLimit> {
        (bytes_per_second > 0).then(|| RateLimit { bytes_per_second, started: Instant::now(), done: AtomicU64::new(0) })
    }

    /// Counts `bytes` more copied and sleeps until the copy is back under
    /// the rate.
    pub fn pace(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes);
        self.pace_total(done);
    }

    /// Sleeps until `done` bytes in all are within the rate.
    pub fn pace_total(&self, done: u64) {
        if let Some(wait) = delay(done, self.bytes_per_second, self.started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// How long a copy that has done `done` bytes after `elapsed` must wait to
/// average at most `rate` bytes per second (`None`: it is not ahead).
fn delay(done: u64, rate: u64, elapsed: Duration) -> Option<Duration> {
    let due = Duration::try_from_secs_f64(done as f64 / rate as f64).unwrap_or(Duration::MAX);
    due.checked_sub(elapsed).filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_only_when_ahead_of_the_rate() {
        let s = Duration::from_secs;
        assert_eq!(delay(10 << 20, 1 << 20, s(4)), Some(s(6)));
        assert_eq!(delay(1 << 20, 1 << 20, s(1)), None);
        assert_eq!(delay(1 << 20, 1 << 20, s(5)), None);
        assert_eq!(delay(0, 1, Duration::ZERO), None);
        assert_eq!(delay(u64::MAX, 1, Duration::ZERO).map(|d| d > s(1 << 40)), Some(true));
        assert!(RateLimit::new(0).is_none());
    }
}
