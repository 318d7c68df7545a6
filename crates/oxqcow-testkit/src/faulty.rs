//! A fault-injecting storage for crash tests.
//!
//! [`FaultyStorage`] keeps the image in memory, numbers every host
//! mutation (`write_at`, `write_zeroes`, `punch_hole`, `set_len`,
//! `allocate`) and counts syncs. Armed with a stop index N, mutation N
//! "crashes the machine": it fails, and so does every later mutation and
//! sync. What survives the crash depends on the [`CrashModel`]:
//!
//! - [`CrashModel::Torn`]: every mutation before N reached the medium, in
//!   order; mutation N reached it only in part, a prefix of whole 512-byte
//!   sectors (sector writes are atomic, a multi-sector write is not);
//! - [`CrashModel::Unsynced`]: only what a `sync` made durable survives;
//!   every mutation since the last completed sync is lost (redb's "live"
//!   and "durable" copies, kept here as an undo log of the live copy);
//! - [`CrashModel::Reordered`]: what a sync made durable survives, and of
//!   the mutations since, a random subset (a disk cache may write them
//!   back in any order).

use std::io;
use std::sync::Mutex;

use oxqcow::Storage;

use crate::prng::Prng;

/// What survives a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashModel {
    /// Everything before the stopping write, and a sector prefix of it
    /// (its length drawn from the seed).
    Torn {
        /// Chooses how many sectors of the stopping write persist.
        seed: u64,
    },
    /// Only what the last completed sync made durable.
    Unsynced,
    /// What the last completed sync made durable, plus each later mutation
    /// with probability 1/2 (drawn from the seed).
    Reordered {
        /// Chooses which unsynced mutations persist.
        seed: u64,
    },
}

/// How to undo (and redo) one mutation: the length before and after, and
/// the bytes of the range it touched before (inside the old length) and
/// after (inside the new length).
struct Undo {
    old_len: usize,
    offset: usize,
    old: Vec<u8>,
    new_len: usize,
    new: Vec<u8>,
}

struct State {
    live: Vec<u8>,
    writes: u64,
    syncs: u64,
    stop_at: Option<u64>,
    crashed: bool,
    model: CrashModel,
    /// Mutations since the last completed sync, oldest first.
    undo: Vec<Undo>,
}

/// In-memory storage that counts host writes and can crash at one.
pub struct FaultyStorage {
    state: Mutex<State>,
}

fn crashed() -> io::Error {
    io::Error::other("injected crash: the host is gone")
}

impl FaultyStorage {
    /// A storage holding `bytes` that never crashes (use it to count).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self::with_crash(bytes, None, CrashModel::Unsynced)
    }

    /// A storage holding `bytes` that crashes at mutation `stop_at`
    /// (0-based), keeping what `model` says.
    pub fn with_crash(bytes: Vec<u8>, stop_at: Option<u64>, model: CrashModel) -> Self {
        FaultyStorage {
            state: Mutex::new(State {
                live: bytes,
                writes: 0,
                syncs: 0,
                stop_at,
                crashed: false,
                model,
                undo: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Host mutations so far (including the one that crashed).
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Completed syncs so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Whether the crash happened.
    pub fn has_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// What the medium holds after the crash (or now, if none happened):
    /// in the unsynced model the live bytes with every unsynced mutation
    /// undone, otherwise the live bytes.
    pub fn durable_bytes(&self) -> Vec<u8> {
        let s = self.lock();
        let mut bytes = s.live.clone();
        if matches!(s.model, CrashModel::Unsynced | CrashModel::Reordered { .. }) {
            for u in s.undo.iter().rev() {
                bytes.resize(u.old_len, 0);
                bytes[u.offset..u.offset + u.old.len()].copy_from_slice(&u.old);
            }
        }
        if let CrashModel::Reordered { seed } = s.model {
            let mut rng = Prng::new(seed);
            for u in &s.undo {
                if rng.chance(1, 2) {
                    bytes.resize(u.new_len, 0);
                    bytes[u.offset..u.offset + u.new.len()].copy_from_slice(&u.new);
                }
            }
        }
        bytes
    }

    /// The live bytes (what a reader sees now).
    pub fn live_bytes(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// Runs one mutation: `apply(live)` unless this is the crash point,
    /// where only `sectors_kept(len)` sectors' worth of it is applied.
    fn mutate(&self, offset: u64, len: u64, apply: impl Fn(&mut Vec<u8>, u64, u64), tearable: bool) -> io::Result<()> {
        let mut s = self.lock();
        if s.crashed {
            return Err(crashed());
        }
        let index = s.writes;
        s.writes += 1;
        let stop = s.stop_at == Some(index);
        let (offset, len) = if stop {
            s.crashed = true;
            match s.model {
                CrashModel::Torn { seed } if tearable => {
                    // Keep a prefix that ends on an absolute sector boundary.
                    let end = offset + len;
                    let mut boundaries: Vec<u64> = vec![offset];
                    let mut b = (offset / 512 + 1) * 512;
                    while b < end {
                        boundaries.push(b);
                        b += 512;
                    }
                    let mut rng = Prng::new(seed ^ index.wrapping_mul(0x9e37_79b9));
                    let cut = boundaries[rng.below(boundaries.len() as u64) as usize];
                    (offset, cut - offset)
                }
                _ => (offset, 0),
            }
        } else {
            (offset, len)
        };
        if len > 0 || (!stop && !tearable) {
            let logged = matches!(s.model, CrashModel::Unsynced | CrashModel::Reordered { .. });
            let before = logged.then(|| {
                let old_len = s.live.len();
                let start = (offset as usize).min(old_len);
                let end = ((offset + len) as usize).min(old_len);
                (old_len, start, s.live[start..end].to_vec())
            });
            apply(&mut s.live, offset, len);
            if let Some((old_len, start, old)) = before {
                let new_len = s.live.len();
                let end = ((offset + len) as usize).min(new_len).max(start.min(new_len));
                let new = s.live[start.min(new_len)..end].to_vec();
                s.undo.push(Undo { old_len, offset: start, old, new_len, new });
            }
        }
        if stop {
            return Err(crashed());
        }
        Ok(())
    }
}

fn write_bytes(live: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if live.len() < end {
        live.resize(end, 0);
    }
    live[offset as usize..end].copy_from_slice(data);
}

fn zero_range(live: &mut [u8], offset: u64, len: u64) {
    let start = (offset as usize).min(live.len());
    let end = ((offset + len) as usize).min(live.len());
    live[start..end].fill(0);
}

impl Storage for FaultyStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.lock();
        let start = offset.min(s.live.len() as u64) as usize;
        let end = offset.saturating_add(buf.len() as u64).min(s.live.len() as u64) as usize;
        buf[..end - start].copy_from_slice(&s.live[start..end]);
        buf[end - start..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mutate(offset, buf.len() as u64, |live, o, l| write_bytes(live, o, &buf[..l as usize]), true)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // The old length is recorded by the undo entry; the range covers
        // the bytes a shrink drops.
        let cur = self.lock().live.len() as u64;
        let (start, span) = if len < cur { (len, cur - len) } else { (cur, 0) };
        self.mutate(start, span, |live, _, _| live.resize(len as usize, 0), false)
    }

    fn sync(&self) -> io::Result<()> {
        let mut s = self.lock();
        if s.crashed {
            return Err(crashed());
        }
        s.syncs += 1;
        s.undo.clear();
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(offset, len, |live, o, l| zero_range(live, o, l), true)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(
            offset,
            len,
            |live, o, l| {
                if live.len() < (o + l) as usize {
                    live.resize((o + l) as usize, 0);
                }
                zero_range(live, o, l)
            },
            true,
        )
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let cur = self.lock().live.len() as u64;
        if end <= cur {
            return Ok(());
        }
        // The length is checked again under the lock: a concurrent write may
        // have extended the bytes since.
        self.mutate(
            cur,
            0,
            |live, _, _| {
                if live.len() < end as usize {
                    live.resize(end as usize, 0)
                }
            },
            false,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_writes_are_lost() {
        let s = FaultyStorage::with_crash(vec![1; 1024], Some(2), CrashModel::Unsynced);
        s.write_at(&[2; 10], 0).unwrap();
        s.sync().unwrap();
        s.write_at(&[3; 10], 100).unwrap();
        s.set_len(2048).unwrap_err();
        assert!(s.has_crashed());
        let d = s.durable_bytes();
        assert_eq!(d.len(), 1024);
        assert_eq!(&d[..10], &[2; 10]);
        assert_eq!(&d[100..110], &[1; 10]);
        assert!(s.write_at(&[0], 0).is_err());
        assert!(s.sync().is_err());
    }

    #[test]
    fn unsynced_growth_and_shrink_are_undone() {
        let s = FaultyStorage::with_crash(vec![1; 1024], Some(3), CrashModel::Unsynced);
        s.write_at(&[5; 600], 900).unwrap();
        s.set_len(700).unwrap();
        s.write_at(&[6; 10], 800).unwrap();
        s.write_at(&[7; 1], 0).unwrap_err();
        assert_eq!(s.durable_bytes(), vec![1; 1024]);
    }

    #[test]
    fn reordered_keeps_synced_data_and_some_unsynced_writes() {
        let mut kept = [0; 2];
        for seed in 0..32 {
            let s = FaultyStorage::with_crash(vec![1; 1024], Some(3), CrashModel::Reordered { seed });
            s.write_at(&[2; 10], 0).unwrap();
            s.sync().unwrap();
            s.write_at(&[3; 10], 100).unwrap();
            s.write_at(&[4; 10], 2000).unwrap();
            s.write_at(&[5; 10], 200).unwrap_err();
            let d = s.durable_bytes();
            assert_eq!(&d[..10], &[2; 10]);
            assert_eq!(&d[200..210], &[1; 10], "the crashing write never lands");
            kept[0] += usize::from(d[100] == 3);
            kept[1] += usize::from(d.len() == 2010 && d[2000] == 4);
            assert!(d[100] == 3 || d[100..110] == [1; 10]);
            assert!(d.len() == 1024 || d.len() == 2010);
        }
        assert!(kept.iter().all(|&k| k > 0 && k < 32), "{kept:?}");
    }

    #[test]
    fn torn_write_keeps_a_sector_prefix() {
        for seed in 0..20 {
            let s = FaultyStorage::with_crash(vec![0; 4096], Some(1), CrashModel::Torn { seed });
            s.write_at(&[1; 100], 0).unwrap();
            s.write_at(&[9; 2000], 300).unwrap_err();
            let d = s.durable_bytes();
            assert_eq!(&d[..100], &[1; 100]);
            let kept = d[300..2300].iter().take_while(|&&b| b == 9).count() as u64;
            assert!(kept == 0 || (300 + kept) % 512 == 0, "kept {kept}");
            assert!(d[300 + kept as usize..2300].iter().all(|&b| b == 0));
        }
    }
}
