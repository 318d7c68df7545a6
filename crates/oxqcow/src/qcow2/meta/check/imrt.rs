//! The in-memory refcount table (QEMU's "IMRT") of a check.

use std::collections::HashMap;

/// The in-memory refcount table (QEMU's "IMRT"): 16 bits per host cluster,
/// larger counts on the side, and a length that grows as QEMU's does.
pub(super) struct Imrt {
    counts: Vec<u16>,
    big: HashMap<u64, u64>,
}

impl Imrt {
    pub(super) fn new(len: u64) -> Self {
        Imrt { counts: vec![0; len as usize], big: HashMap::new() }
    }
    pub(super) fn len(&self) -> u64 {
        self.counts.len() as u64
    }
    pub(super) fn grow(&mut self, len: u64) {
        if len > self.len() {
            self.counts.resize(len as usize, 0);
        }
    }
    pub(super) fn get(&self, c: u64) -> u64 {
        match self.counts.get(c as usize) {
            Some(&u16::MAX) => self.big[&c],
            Some(&v) => u64::from(v),
            None => 0,
        }
    }
    pub(super) fn set(&mut self, c: u64, v: u64) {
        self.grow(c + 1);
        if v >= u64::from(u16::MAX) {
            self.counts[c as usize] = u16::MAX;
            self.big.insert(c, v);
        } else {
            self.counts[c as usize] = v as u16;
            self.big.remove(&c);
        }
    }
    pub(super) fn clear(&mut self) {
        self.counts.fill(0);
        self.big.clear();
    }
}
