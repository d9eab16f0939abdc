//! The on-disk data cache: blocks of objects, keyed by space, key and ETag.
//!
//! Each object version has one sparse file, and its blocks sit at their own offsets in
//! it, so caching a streamed object costs one file creation instead of one per block.
//! An evicted block's range is released with a hole punch, and the file goes with its
//! last block.
//!
//! Invariants: the disk space of the cached blocks never exceeds `cache.max_size`,
//! because space is reserved, and least recently used blocks are evicted, before a
//! block is written. A block is only found for the ETag it was read with, so an object
//! changed in the store is never served from the cache once its new ETag is known.
//!
//! The index lives in memory, and blocks left by an earlier process are removed when
//! the cache opens.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ring::digest;

use crate::block_pool::BlockPool;
use crate::prefetch::BLOCK_BYTES;

/// The unit in which the file system allocates disk space for the cache files.
const DISK_BLOCK_BYTES: u64 = 4096;

/// Disk space counted for each cached object beyond its blocks: the file's extent tree,
/// which the file system keeps outside the inode once a sparse file has more than a few
/// ranges. On ext4 one 4 KiB tree block maps about 340 ranges, so four cover about 1,360
/// separate ranges (adjacent cached blocks merge into one range).
/// NOTE: an object cached in more separate ranges than that can take a few more 4 KiB
/// tree blocks than counted here.
const FILE_OVERHEAD_BYTES: u64 = 4 * DISK_BLOCK_BYTES;

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

    fn offset(&self) -> u64 {
        self.index * BLOCK_BYTES
    }
}

/// State of one block in the index.
#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    /// Number unique to this insertion. A read that overlapped the block's eviction (and
    /// maybe its caching again) finds another generation, or none, and discards its bytes.
    generation: u64,
    /// Last use tick once the block is written; `None` while the write is in progress.
    /// A block being written can be neither read nor evicted, so its range can never be
    /// written after its eviction and stay behind uncounted.
    tick: Option<u64>,
}

#[derive(Debug, Default)]
struct Lru {
    blocks: HashMap<BlockKey, Entry>,
    /// Written blocks by last use; blocks being written are not listed.
    by_tick: BTreeMap<u64, BlockKey>,
    /// Indexed blocks (written or being written) per object file.
    files: HashMap<String, u64>,
    /// Disk space counted for the indexed blocks and their files (see [`charge`]).
    used_bytes: u64,
    tick: u64,
}

impl Lru {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

/// Disk space counted for a block of `size` bytes: whole disk blocks, so the count is
/// never below what the file system allocates for it.
fn charge(size: u64) -> u64 {
    size.div_ceil(DISK_BLOCK_BYTES) * DISK_BLOCK_BYTES
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
    /// Fails when the file system of `dir` cannot punch holes into files.
    pub fn open(dir: &Path, max_size_bytes: u64) -> std::io::Result<Self> {
        remove_dead_siblings(dir);
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        crate::private_dir::create_dir(dir)?;
        check_hole_punching(dir)?;
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

    fn file_path(&self, object: &str) -> PathBuf {
        self.dir.join(object)
    }

    /// Reads a cached block into a buffer of `buffers` and marks it as recently used.
    /// Reading into pooled buffers keeps a re-read from the cache within the memory that
    /// streaming reads already use.
    pub fn get(&self, key: &BlockKey, buffers: &Arc<BlockPool>) -> Option<Bytes> {
        let (size, generation) = {
            let mut lru = self.lock();
            let tick = lru.next_tick();
            let (old_tick, size, generation) = match lru.blocks.get_mut(key) {
                Some(Entry {
                    tick: Some(old),
                    size,
                    generation,
                }) => (std::mem::replace(old, tick), *size, *generation),
                _ => return None,
            };
            lru.by_tick.remove(&old_tick);
            lru.by_tick.insert(tick, key.clone());
            (size, generation)
        };

        let mut data = buffers.take();
        let read = File::open(self.file_path(&key.object))
            .and_then(|file| data.fill_with(size as usize, |slice| file.read_exact_at(slice, key.offset())));
        // `fill_with` reads at most one buffer, so a larger entry cannot be served from it.
        let read = read.and_then(|()| {
            if data.len() as u64 == size {
                Ok(())
            } else {
                Err(std::io::Error::other(format!("cached block of {size} bytes is larger than a read buffer")))
            }
        });
        match read {
            Ok(()) => {
                // The read ran without the lock: an eviction in the meantime may have
                // punched the range, and then the bytes read are not the block.
                let lru = self.lock();
                let unchanged = lru.blocks.get(key).is_some_and(|entry| entry.generation == generation && entry.tick.is_some());
                unchanged.then(|| data.freeze())
            }
            Err(err) => {
                tracing::warn!(error = %err, object = %key.object, block = key.index, "cached block unreadable; dropping it");
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
        {
            let mut lru = self.lock();
            if lru.blocks.contains_key(key) {
                return;
            }
            let new_file = !lru.files.contains_key(&key.object);
            let needed = charge(size) + if new_file { FILE_OVERHEAD_BYTES } else { 0 };
            if needed > self.max_size_bytes {
                return;
            }
            while lru.used_bytes + needed > self.max_size_bytes {
                let Some((_, victim)) = lru.by_tick.pop_first() else { break };
                self.release(&mut lru, &victim);
            }
            // Evicting the object's last other block removes its file, and then this
            // block brings the file overhead back.
            let needed = charge(size) + if lru.files.contains_key(&key.object) { 0 } else { FILE_OVERHEAD_BYTES };
            if lru.used_bytes + needed > self.max_size_bytes {
                return;
            }
            let generation = lru.next_tick();
            lru.blocks.insert(
                key.clone(),
                Entry {
                    size,
                    generation,
                    tick: None,
                },
            );
            *lru.files.entry(key.object.clone()).or_insert(0) += 1;
            lru.used_bytes += needed;
        }

        let written = write_block(&self.file_path(&key.object), data, key.offset());

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
                self.release(&mut lru, key);
            }
        }
    }

    fn remove(&self, key: &BlockKey) {
        let mut lru = self.lock();
        // A block being written belongs to its writer, which finishes or undoes it.
        if let Some(Entry { tick: Some(tick), .. }) = lru.blocks.get(key).copied() {
            lru.by_tick.remove(&tick);
            self.release(&mut lru, key);
        }
    }

    /// Drops a block from the index and frees its disk space: the file goes with its
    /// last block, otherwise the block's range becomes a hole. Runs under the index
    /// lock, so the space counts as free only once the disk space is released, and no
    /// put of the same block can write its range in between.
    fn release(&self, lru: &mut Lru, key: &BlockKey) {
        let Some(entry) = lru.blocks.remove(key) else { return };
        lru.used_bytes -= charge(entry.size);

        let path = self.file_path(&key.object);
        let remaining = lru.files.get_mut(&key.object).map(|count| {
            *count -= 1;
            *count
        });
        if remaining == Some(0) {
            lru.files.remove(&key.object);
            lru.used_bytes -= FILE_OVERHEAD_BYTES;
            let _ = std::fs::remove_file(&path);
            return;
        }
        let punched = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|file| punch_hole(&file, key.offset(), entry.size));
        if let Err(err) = punched {
            tracing::warn!(error = %err, file = %path.display(), "cannot free an evicted cached block");
        }
    }

    /// Returns the number of blocks written to the cache (not those being written).
    pub fn block_count(&self) -> usize {
        self.lock().by_tick.len()
    }

    /// Disk space counted for the cached blocks and their files (never above the
    /// configured maximum).
    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes
    }
}

/// Writes `data` at `offset` of the file at `path`, creating it.
///
/// A block in whole disk blocks at an aligned address (as [`crate::block_pool`] buffers
/// are) is written with `O_DIRECT`: copying it into the page cache first would cost the
/// daemon about as much CPU as receiving it from the network did. Other blocks, and file
/// systems without `O_DIRECT`, use a buffered write.
fn write_block(path: &Path, data: &[u8], offset: u64) -> std::io::Result<()> {
    let aligned = data.len() % DISK_BLOCK_BYTES as usize == 0
        && data.as_ptr() as usize % crate::block_pool::BUFFER_ALIGN == 0
        && offset % DISK_BLOCK_BYTES == 0;
    if aligned {
        let direct = crate::private_dir::file_options()
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        match direct {
            Ok(file) => return file.write_all_at(data, offset),
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {}
            Err(err) => return Err(err),
        }
    }
    let file = crate::private_dir::file_options().write(true).create(true).open(path)?;
    file.write_all_at(data, offset)
}

/// Releases the disk space of `len` bytes at `offset` of `file`, keeping its size.
fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its integer arguments and acts on the open descriptor.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Fails with a message naming `dir` and the fix when its file system cannot punch
/// holes, since evicting a block would then free no disk space.
fn check_hole_punching(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(".punch-probe");
    let result = crate::private_dir::file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .and_then(|file| {
            file.write_all_at(&[1u8; DISK_BLOCK_BYTES as usize], 0)?;
            punch_hole(&file, 0, DISK_BLOCK_BYTES)
        });
    let _ = std::fs::remove_file(&probe);
    result.map_err(|err| {
        std::io::Error::new(
            err.kind(),
            format!(
                "the file system of {} cannot punch holes into files ({err}); put cache.dir on a local file system such as ext4, xfs or tmpfs, or set cache.max_size = \"0\" to run without a data cache",
                dir.display()
            ),
        )
    })
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
    use std::os::unix::fs::MetadataExt;

    const UNIT: usize = DISK_BLOCK_BYTES as usize;

    fn buffers() -> Arc<BlockPool> {
        BlockPool::new(BLOCK_BYTES as usize, 2)
    }

    /// Disk space allocated to the files in `dir`, tolerating files removed meanwhile.
    fn allocated_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    #[test]
    fn limit_never_exceeded_and_lru_evicted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let limit = FILE_OVERHEAD_BYTES + 3 * DISK_BLOCK_BYTES;
        let cache = DataCache::open(&dir, limit).unwrap();
        let keys: Vec<BlockKey> = (0..5).map(|i| BlockKey::new("s", "k", "e1", i)).collect();
        cache.put(&keys[0], &[0u8; UNIT]);
        cache.put(&keys[1], &[1u8; UNIT]);
        cache.put(&keys[2], &[2u8; UNIT]);
        assert!(cache.get(&keys[0], &buffers()).is_some(), "touch block 0 so block 1 is the oldest");

        cache.put(&keys[3], &[3u8; UNIT]);
        assert!(cache.get(&keys[1], &buffers()).is_none());
        assert_eq!(&cache.get(&keys[0], &buffers()).unwrap()[..], &[0u8; UNIT][..]);
        assert_eq!(&cache.get(&keys[3], &buffers()).unwrap()[..], &[3u8; UNIT][..]);
        assert!(cache.used_bytes() <= limit);
        assert!(allocated_bytes(&dir) <= limit);

        cache.put(&keys[4], &vec![4u8; limit as usize]);
        assert!(cache.get(&keys[4], &buffers()).is_none(), "a block larger than the cache is not stored");
    }

    #[test]
    fn blocks_of_one_object_share_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let cache = DataCache::open(&dir, 1 << 20).unwrap();
        for index in 0..3 {
            cache.put(&BlockKey::new("s", "big", "e", index), &[index as u8; 5000]);
        }
        cache.put(&BlockKey::new("s", "small", "e", 0), b"tail");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        assert_eq!(&cache.get(&BlockKey::new("s", "big", "e", 2), &buffers()).unwrap()[..], &[2u8; 5000][..]);
        assert_eq!(&cache.get(&BlockKey::new("s", "small", "e", 0), &buffers()).unwrap()[..], b"tail");
    }

    #[test]
    fn eviction_frees_disk_space() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let limit = 2 * FILE_OVERHEAD_BYTES + 4 * DISK_BLOCK_BYTES;
        let cache = DataCache::open(&dir, limit).unwrap();
        let old: Vec<BlockKey> = (0..4).map(|i| BlockKey::new("s", "old", "e", i * 3)).collect();
        for key in &old {
            cache.put(key, &[7u8; UNIT]);
        }

        // Two blocks of a new object evict the two oldest blocks of the first one: their
        // ranges become holes.
        cache.put(&BlockKey::new("s", "new", "e", 0), &[8u8; UNIT]);
        cache.put(&BlockKey::new("s", "new", "e", 1), &[9u8; UNIT]);
        assert!(cache.get(&old[0], &buffers()).is_none());
        assert!(cache.get(&old[1], &buffers()).is_none());
        assert_eq!(&cache.get(&old[2], &buffers()).unwrap()[..], &[7u8; UNIT][..]);
        let old_file = dir.join(&old[0].object);
        assert!(old_file.metadata().unwrap().blocks() * 512 <= 2 * DISK_BLOCK_BYTES);
        assert!(allocated_bytes(&dir) <= limit);

        // Once its last block goes, the file goes too: four more blocks of the new object
        // evict the rest of the cache.
        for index in 2..6 {
            cache.put(&BlockKey::new("s", "new", "e", index), &[index as u8; UNIT]);
        }
        assert!(!old_file.exists(), "an object without cached blocks keeps no file");
        assert!(cache.used_bytes() <= limit);
    }

    #[test]
    fn concurrent_puts_never_exceed_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let limit = 2 * FILE_OVERHEAD_BYTES + 4 * DISK_BLOCK_BYTES;
        let cache = std::sync::Arc::new(DataCache::open(&dir, limit).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let cache = std::sync::Arc::clone(&cache);
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let object = if (i + t) % 2 == 0 { "even" } else { "odd" };
                        cache.put(&BlockKey::new("s", object, "e", i * 8 + t), &[t as u8; UNIT]);
                        let read = BlockKey::new("s", object, "e", (i * 7 + t) % 1600);
                        if let Some(data) = cache.get(&read, &buffers()) {
                            assert_eq!(&data[..], &[(read.index % 8) as u8; UNIT][..], "a cached block has its own bytes");
                        }
                    }
                })
            })
            .collect();
        let mut peak = 0;
        while !threads.iter().all(|t| t.is_finished()) {
            peak = peak.max(allocated_bytes(&dir));
        }
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak <= limit, "cache directory peaked at {peak} bytes, above its {limit}-byte limit");
        assert!(cache.used_bytes() <= limit);
        assert!(allocated_bytes(&dir) <= cache.used_bytes(), "every allocated byte on disk is counted");
    }

    #[test]
    fn etag_is_part_of_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DataCache::open(tmp.path(), 1 << 20).unwrap();
        cache.put(&BlockKey::new("s", "conf.txt", "etag-old", 0), b"value=38\n");
        assert!(cache.get(&BlockKey::new("s", "conf.txt", "etag-new", 0), &buffers()).is_none());
        assert_eq!(&cache.get(&BlockKey::new("s", "conf.txt", "etag-old", 0), &buffers()).unwrap()[..], b"value=38\n");
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
