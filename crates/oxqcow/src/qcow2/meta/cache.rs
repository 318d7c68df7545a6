//! The metadata table cache: L2 tables and refcount blocks, LRU by count.
//!
//! Tables are kept as the bytes they have on disk, so loading and writing
//! back need no conversion; the format crate's accessors read entries out of
//! them. The cache never writes anything itself: when it is full, the owner
//! asks for the least recently used table ([`TableCache::victim`]), writes it
//! back if dirty (after whatever that table depends on, see `qcow2.rs`), and
//! removes it. All access happens under the image's metadata lock.

use std::collections::{BTreeSet, HashSet};

use lru::LruCache;

/// One cached table.
struct CachedTable {
    data: Box<[u8]>,
}

/// An LRU cache of cluster-sized metadata tables keyed by host offset.
pub(crate) struct TableCache {
    tables: LruCache<u64, CachedTable>,
    dirty: BTreeSet<u64>,
    /// Tables used since the last [`TableCache::clean_unused`].
    used: HashSet<u64>,
    capacity: usize,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 1).
    pub(crate) fn new(capacity: usize) -> Self {
        TableCache {
            tables: LruCache::unbounded(),
            dirty: BTreeSet::new(),
            used: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    /// The table at `offset`, marked most recently used.
    pub(crate) fn get(&mut self, offset: u64) -> Option<&[u8]> {
        self.used.insert(offset);
        self.tables.get(&offset).map(|t| &*t.data)
    }

    /// The table at `offset` for modification; it becomes dirty.
    pub(crate) fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        let t = self.tables.get_mut(&offset)?;
        self.dirty.insert(offset);
        self.used.insert(offset);
        Some(&mut t.data)
    }

    /// The table at `offset` without changing its LRU position.
    pub(crate) fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.tables.peek(&offset).map(|t| &*t.data)
    }

    /// Whether the table is cached.
    pub(crate) fn contains(&self, offset: u64) -> bool {
        self.tables.contains(&offset)
    }

    /// Adds a table. The caller made room first (see [`Self::victim`]).
    pub(crate) fn insert(&mut self, offset: u64, data: Box<[u8]>, dirty: bool) {
        self.tables.put(offset, CachedTable { data });
        self.used.insert(offset);
        if dirty {
            self.dirty.insert(offset);
        } else {
            self.dirty.remove(&offset);
        }
    }

    /// When the cache is full: the least recently used table and whether it
    /// is dirty. The caller writes it back if needed and calls [`Self::remove`].
    pub(crate) fn victim(&self) -> Option<(u64, bool)> {
        if self.tables.len() < self.capacity {
            return None;
        }
        self.tables.peek_lru().map(|(o, _)| (*o, self.dirty.contains(o)))
    }

    /// Drops a table (dirty or not) from the cache.
    pub(crate) fn remove(&mut self, offset: u64) {
        self.tables.pop(&offset);
        self.dirty.remove(&offset);
        self.used.remove(&offset);
    }

    /// Drops every clean table that was not used since the last call (QEMU's
    /// `qcow2_cache_clean_unused`, run by the cache clean timer). Returns
    /// how many were dropped.
    pub(crate) fn clean_unused(&mut self) -> usize {
        let idle: Vec<u64> =
            self.tables.iter().map(|(o, _)| *o).filter(|o| !self.dirty.contains(o) && !self.used.contains(o)).collect();
        for o in &idle {
            self.tables.pop(o);
        }
        self.used.clear();
        idle.len()
    }

    /// Drops every clean table.
    pub(crate) fn drop_clean(&mut self) {
        let clean: Vec<u64> = self.tables.iter().map(|(o, _)| *o).filter(|o| !self.dirty.contains(o)).collect();
        for o in clean {
            self.tables.pop(&o);
            self.used.remove(&o);
        }
    }

    /// Offsets of dirty tables, ascending.
    pub(crate) fn dirty_offsets(&self) -> Vec<u64> {
        self.dirty.iter().copied().collect()
    }

    /// Marks a table clean after it was written back.
    pub(crate) fn mark_clean(&mut self, offset: u64) {
        self.dirty.remove(&offset);
    }

    /// The capacity in tables.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_order_and_dirty_tracking() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![1].into(), false);
        c.insert(2, vec![2].into(), true);
        assert_eq!(c.victim(), Some((1, false)));
        c.get(1);
        assert_eq!(c.victim(), Some((2, true)));
        c.get_mut(1).unwrap()[0] = 9;
        assert_eq!(c.dirty_offsets(), vec![1, 2]);
        c.mark_clean(2);
        c.remove(2);
        assert_eq!(c.victim(), None);
        assert_eq!(c.peek(1), Some(&[9u8][..]));
    }

    #[test]
    fn cleaning_drops_clean_tables_unused_since_the_last_cleaning() {
        let mut c = TableCache::new(8);
        c.insert(1, vec![1].into(), false);
        c.insert(2, vec![2].into(), true);
        c.insert(3, vec![3].into(), false);
        // Everything was used since the cache was made.
        assert_eq!(c.clean_unused(), 0);
        c.get(3);
        // 1 is clean and idle; 2 is dirty; 3 was used.
        assert_eq!(c.clean_unused(), 1);
        assert!(!c.contains(1) && c.contains(2) && c.contains(3));
        assert_eq!(c.clean_unused(), 1);
        assert!(!c.contains(3) && c.contains(2));
    }
}
