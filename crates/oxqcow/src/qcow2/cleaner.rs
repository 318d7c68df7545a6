//! `cache-clean-interval`: cached metadata tables that no request used for
//! an interval are dropped, so that an idle image gives its cache memory
//! back (QEMU's cache clean timer, `qcow2_cache_clean_unused`).
//!
//! One thread serves every open image of the process: it sleeps until the
//! next image is due, takes that image's metadata lock for the cleaning
//! (dropping clean tables only, never writing) and ends when no image is
//! registered any more. Images are held weakly, so a closed or dropped
//! image leaves the list at the next wake-up.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use super::meta::Meta;

struct Entry {
    meta: Weak<Mutex<Meta>>,
    interval: Duration,
    due: Instant,
}

#[derive(Default)]
struct Registry {
    entries: Vec<Entry>,
    running: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { entries: Vec::new(), running: false });
static WAKE: Condvar = Condvar::new();

/// Cleans `meta`'s caches every `seconds` (0: never) while it lives.
pub(crate) fn register(meta: &Arc<Mutex<Meta>>, seconds: u64) {
    if seconds == 0 {
        return;
    }
    let interval = Duration::from_secs(seconds);
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    reg.entries.push(Entry { meta: Arc::downgrade(meta), interval, due: Instant::now() + interval });
    if !reg.running {
        // Without a thread (none can be made), nothing is cleaned: the
        // caches stay as bounded as their sizes say.
        reg.running = std::thread::Builder::new().name("qcow2-cache-clean".into()).spawn(run).is_ok();
    }
    WAKE.notify_one();
}

fn run() {
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        reg.entries.retain(|e| e.meta.strong_count() > 0);
        let Some(next) = reg.entries.iter().map(|e| e.due).min() else {
            reg.running = false;
            return;
        };
        let now = Instant::now();
        if next > now {
            reg = WAKE.wait_timeout(reg, next - now).unwrap_or_else(|p| p.into_inner()).0;
            continue;
        }
        let due: Vec<Arc<Mutex<Meta>>> = reg
            .entries
            .iter_mut()
            .filter(|e| e.due <= now)
            .filter_map(|e| {
                e.due = now + e.interval;
                e.meta.upgrade()
            })
            .collect();
        // The images' locks are taken without the registry's, so that an
        // image registering meanwhile never waits for a cleaning.
        drop(reg);
        for meta in due {
            meta.lock().unwrap_or_else(|p| p.into_inner()).clean_unused_caches();
        }
        reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    }
}
