//! Storage in memory, for tests and scratch images.

use std::io;
use std::sync::RwLock;

use super::Storage;

/// A growable byte vector behind a lock.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }
    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemoryStorage { bytes: RwLock::new(bytes) }
    }
    /// A copy of the content.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().expect("poisoned").clone()
    }
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read().expect("poisoned");
        let start = offset.min(bytes.len() as u64) as usize;
        let end = (offset.saturating_add(buf.len() as u64)).min(bytes.len() as u64) as usize;
        let n = end - start;
        buf[..n].copy_from_slice(&bytes[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().expect("poisoned");
        let end = offset as usize + buf.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().expect("poisoned").len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.bytes.write().expect("poisoned").resize(len as usize, 0);
        Ok(())
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        // Under one hold of the lock: a concurrent write extending the
        // buffer must not be cut off.
        let mut bytes = self.bytes.write().expect("poisoned");
        let end = (offset + len) as usize;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}
