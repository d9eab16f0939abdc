//! The on-disk data cache: blocks of objects, keyed by space, key and ETag.
//!
//! Invariants: the bytes stored never exceed `cache.max_size` (space is reserved and
//! least recently used blocks are evicted before a block is written), and a block is
//! only found for the ETag it was read with, so an object changed in the store is never
//! served from the cache once its new ETag is known. The index lives in memory; blocks
//! left by an earlier process are removed when the cache opens.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use ring::digest;

/// Identity of one cached block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// Digest of (space, key, ETag), hex.
    pub object: String,
    pub index: u64,
}

impl BlockKey {
    pub fn new(space: &str, key: &str, etag: &str, index: u64) -> Self {
        let identity = format!("{space}\0{key}\0{etag}");
        let hash = digest::digest(&digest::SHA256, identity.as_bytes());
        let object = hash.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
        BlockKey { object, index }
    }

    fn file_name(&self) -> String {
        format!("{}-{}", self.object, self.index)
    }
}

#[derive(Debug, Default)]
struct Lru {
    /// Block → (size in bytes, last use tick).
    blocks: HashMap<BlockKey, (u64, u64)>,
    by_tick: BTreeMap<u64, BlockKey>,
    used_bytes: u64,
    tick: u64,
}

/// Maximum number of block writes queued at once. Blocks read while the queue is full
/// are not cached, so a slow cache disk never makes fetched blocks pile up in memory.
const MAX_PENDING_WRITES: usize = 4;

#[derive(Debug)]
pub struct DataCache {
    dir: PathBuf,
    max_size_bytes: u64,
    lru: Mutex<Lru>,
    write_permits: std::sync::Arc<tokio::sync::Semaphore>,
}

impl DataCache {
    /// Opens (and empties) the cache directory `dir`. When `dir` is named `data-PID`,
    /// sibling `data-PID` directories of processes that no longer run are removed too.
    pub fn open(dir: &Path, max_size_bytes: u64) -> std::io::Result<Self> {
        remove_dead_siblings(dir);
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        crate::private_dir::create_dir(dir)?;
        Ok(DataCache {
            dir: dir.to_path_buf(),
            max_size_bytes,
            lru: Mutex::new(Lru::default()),
            write_permits: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_WRITES)),
        })
    }

    /// Reserves a slot for one background block write, or `None` while the queue is full.
    pub fn try_reserve_write(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        std::sync::Arc::clone(&self.write_permits).try_acquire_owned().ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads a cached block and marks it as recently used.
    pub fn get(&self, key: &BlockKey) -> Option<Bytes> {
        {
            let mut lru = self.lock();
            let tick = lru.tick + 1;
            lru.tick = tick;
            let old_tick = match lru.blocks.get_mut(key) {
                Some(entry) => std::mem::replace(&mut entry.1, tick),
                None => return None,
            };
            lru.by_tick.remove(&old_tick);
            lru.by_tick.insert(tick, key.clone());
        }
        match std::fs::read(self.dir.join(key.file_name())) {
            Ok(data) => Some(Bytes::from(data)),
            Err(err) => {
                tracing::warn!(error = %err, block = %key.file_name(), "cached block unreadable; dropping it");
                self.remove(key);
                None
            }
        }
    }

    /// Stores a block, evicting least recently used blocks first so that the limit is
    /// never exceeded. Blocks larger than the whole cache are not stored.
    pub fn put(&self, key: &BlockKey, data: &[u8]) {
        let size = data.len() as u64;
        if size > self.max_size_bytes {
            return;
        }

        let evicted = {
            let mut lru = self.lock();
            if lru.blocks.contains_key(key) {
                return;
            }
            let mut evicted = Vec::new();
            while lru.used_bytes + size > self.max_size_bytes {
                let Some((&tick, _)) = lru.by_tick.iter().next() else { break };
                let victim = lru.by_tick.remove(&tick).expect("tick present");
                if let Some((victim_size, _)) = lru.blocks.remove(&victim) {
                    lru.used_bytes -= victim_size;
                }
                evicted.push(victim);
            }
            lru.tick += 1;
            let tick = lru.tick;
            lru.blocks.insert(key.clone(), (size, tick));
            lru.by_tick.insert(tick, key.clone());
            lru.used_bytes += size;
            evicted
        };

        for victim in evicted {
            let _ = std::fs::remove_file(self.dir.join(victim.file_name()));
        }

        let path = self.dir.join(key.file_name());
        let staging = self.dir.join(format!(".{}.tmp", key.file_name()));
        let written = crate::private_dir::write_file(&staging, data).and_then(|()| std::fs::rename(&staging, &path));
        if let Err(err) = written {
            tracing::warn!(error = %err, dir = %self.dir.display(), "cannot write a cached block; continuing without it");
            let _ = std::fs::remove_file(&staging);
            self.remove(key);
        }
    }

    fn remove(&self, key: &BlockKey) {
        let mut lru = self.lock();
        if let Some((size, tick)) = lru.blocks.remove(key) {
            lru.used_bytes -= size;
            lru.by_tick.remove(&tick);
        }
        drop(lru);
        let _ = std::fs::remove_file(self.dir.join(key.file_name()));
    }

    /// Bytes currently held (never above the configured maximum).
    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes
    }
}

/// Removes `data-PID` directories next to `dir` whose process is gone, so a daemon that
/// was killed does not leave its blocks behind forever.
fn remove_dead_siblings(dir: &Path) {
    let pid_of = |path: &Path| -> Option<u32> { path.file_name()?.to_str()?.strip_prefix("data-")?.parse().ok() };
    let (Some(own_pid), Some(parent)) = (pid_of(dir), dir.parent()) else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(pid) = pid_of(&path) else { continue };
        if pid == own_pid || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(dir = %path.display(), "removed the data cache of a process that no longer runs"),
            Err(err) => tracing::warn!(dir = %path.display(), error = %err, "cannot remove a stale data cache"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
    }

    #[test]
    fn limit_never_exceeded_and_lru_evicted() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DataCache::open(&tmp.path().join("data"), 3000).unwrap();
        let keys: Vec<BlockKey> = (0..5).map(|i| BlockKey::new("s", "k", "e1", i)).collect();
        cache.put(&keys[0], &[0u8; 1000]);
        cache.put(&keys[1], &[1u8; 1000]);
        cache.put(&keys[2], &[2u8; 1000]);
        assert!(cache.get(&keys[0]).is_some(), "touch block 0 so block 1 is the oldest");
        cache.put(&keys[3], &[3u8; 1000]);
        assert!(cache.get(&keys[1]).is_none());
        assert!(cache.get(&keys[0]).is_some());
        assert!(cache.used_bytes() <= 3000);
        assert!(dir_bytes(&tmp.path().join("data")) <= 3000);
        cache.put(&keys[4], &[4u8; 5000]);
        assert!(cache.get(&keys[4]).is_none(), "a block larger than the cache is not stored");
    }

    #[test]
    fn etag_is_part_of_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DataCache::open(tmp.path(), 1 << 20).unwrap();
        cache.put(&BlockKey::new("s", "conf.txt", "etag-old", 0), b"value=38\n");
        assert!(cache.get(&BlockKey::new("s", "conf.txt", "etag-new", 0)).is_none());
        assert_eq!(&cache.get(&BlockKey::new("s", "conf.txt", "etag-old", 0)).unwrap()[..], b"value=38\n");
    }

    #[test]
    fn open_removes_caches_of_dead_processes() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp.path().join(format!("data-{}", u32::MAX - 1));
        let alive = tmp.path().join("data-1");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::create_dir_all(&alive).unwrap();
        let _cache = DataCache::open(&tmp.path().join(format!("data-{}", std::process::id())), 100).unwrap();
        assert!(!dead.exists());
        assert!(alive.exists(), "pid 1 runs");
    }

    #[test]
    fn open_removes_old_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("stale"), b"x").unwrap();
        let _cache = DataCache::open(tmp.path(), 100).unwrap();
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
