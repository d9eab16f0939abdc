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

/// State of one block in the index.
#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    /// Last use tick once the file is written; `None` while the write is in progress.
    /// A block being written can be neither read nor evicted, so its file can never be
    /// written after its eviction and stay behind uncounted.
    tick: Option<u64>,
}

#[derive(Debug, Default)]
struct Lru {
    blocks: HashMap<BlockKey, Entry>,
    /// Written blocks by last use; blocks being written are not listed.
    by_tick: BTreeMap<u64, BlockKey>,
    /// Bytes of written blocks plus the space reserved for blocks being written.
    used_bytes: u64,
    tick: u64,
}

impl Lru {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

/// Maximum number of blocks queued for writing at once. Blocks read while the queue is
/// full are not cached, so a slow cache disk never makes fetched blocks pile up in memory.
const MAX_PENDING_WRITES: usize = 16;

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

    /// The configured limit in bytes.
    pub fn max_size_bytes(&self) -> u64 {
        self.max_size_bytes
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
            let tick = lru.next_tick();
            let old_tick = match lru.blocks.get_mut(key) {
                Some(Entry { tick: Some(old), .. }) => std::mem::replace(old, tick),
                _ => return None,
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
    /// never exceeded. Blocks larger than the whole cache, and blocks that do not fit
    /// because the rest of the cache is still being written, are not stored.
    pub fn put(&self, key: &BlockKey, data: &[u8]) {
        let size = data.len() as u64;
        if size > self.max_size_bytes {
            return;
        }

        {
            let mut lru = self.lock();
            if lru.blocks.contains_key(key) {
                return;
            }
            while lru.used_bytes + size > self.max_size_bytes {
                let Some((_, victim)) = lru.by_tick.pop_first() else { break };
                // The victim's file goes while the lock is held: the space counts as
                // free only once the file is gone, and no put of the same key can
                // write its file in between.
                let _ = std::fs::remove_file(self.dir.join(victim.file_name()));
                if let Some(entry) = lru.blocks.remove(&victim) {
                    lru.used_bytes -= entry.size;
                }
            }
            if lru.used_bytes + size > self.max_size_bytes {
                return;
            }
            lru.blocks.insert(key.clone(), Entry { size, tick: None });
            lru.used_bytes += size;
        }

        let path = self.dir.join(key.file_name());
        let staging = self.dir.join(format!(".{}.tmp", key.file_name()));
        let written = crate::private_dir::write_file(&staging, data).and_then(|()| std::fs::rename(&staging, &path));

        let mut lru = self.lock();
        match written {
            Ok(()) => {
                let tick = lru.next_tick();
                if let Some(entry) = lru.blocks.get_mut(key) {
                    entry.tick = Some(tick);
                    lru.by_tick.insert(tick, key.clone());
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, dir = %self.dir.display(), "cannot write a cached block; continuing without it");
                let _ = std::fs::remove_file(&staging);
                let _ = std::fs::remove_file(&path);
                if let Some(entry) = lru.blocks.remove(key) {
                    lru.used_bytes -= entry.size;
                }
            }
        }
    }

    fn remove(&self, key: &BlockKey) {
        let mut lru = self.lock();
        // A block being written belongs to its writer, which finishes or undoes it.
        if let Some(Entry { size, tick: Some(tick) }) = lru.blocks.get(key).copied() {
            lru.blocks.remove(key);
            lru.used_bytes -= size;
            lru.by_tick.remove(&tick);
            let _ = std::fs::remove_file(self.dir.join(key.file_name()));
        }
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

    /// Sizes of the block files (not the staging files, which a rename during the
    /// listing could show twice), tolerating files removed while listing.
    fn block_file_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    #[test]
    fn concurrent_puts_never_exceed_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let cache = std::sync::Arc::new(DataCache::open(&dir, 4 * 1000).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let cache = std::sync::Arc::clone(&cache);
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let key = BlockKey::new("s", "k", "e", i * 8 + t);
                        cache.put(&key, &[t as u8; 1000]);
                        let _ = cache.get(&BlockKey::new("s", "k", "e", (i * 7 + t) % 1600));
                    }
                })
            })
            .collect();
        let mut peak = 0;
        while !threads.iter().all(|t| t.is_finished()) {
            peak = peak.max(block_file_bytes(&dir));
        }
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak <= 4000, "cache directory peaked at {peak} bytes, above its 4000-byte limit");
        assert!(cache.used_bytes() <= 4000);
        assert_eq!(dir_bytes(&dir), cache.used_bytes(), "every file on disk is counted, none left behind");
        let files = std::fs::read_dir(&dir).unwrap().count() as u64;
        assert_eq!(files * 1000, cache.used_bytes());
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
