//! Streaming reads of one open object with read-ahead.
//!
//! An object is read in blocks of [`BLOCK_BYTES`] with range GETs that carry the ETag
//! seen at open as `If-Match`, so one open file never mixes two versions (a changed
//! object fails with ESTALE instead). While reads are sequential, the read-ahead window
//! doubles up to [`MAX_WINDOW_BLOCKS`] and the blocks ahead are fetched in parallel. A
//! random read resets the window and fetches only the blocks it needs. Read-ahead blocks
//! hold permits of one global [`ReadBudget`] (`cache.read_ahead_memory`): invariant,
//! the memory of read-ahead blocks across all open files stays within that budget, and
//! read-ahead is skipped while no permit is free.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use object_store::{GetOptions, GetRange, ObjectStore};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::datacache::{BlockKey, DataCache};
use crate::error::{FsError, FsResult};
use crate::namespace::object_path;

/// Size of one range request and one data cache block.
pub const BLOCK_BYTES: u64 = 1 << 20;

/// Largest read-ahead window, in blocks.
pub const MAX_WINDOW_BLOCKS: u64 = 32;

/// Maximum number of consecutive read-ahead blocks fetched by one range GET: fewer,
/// larger requests cost the server and this process less CPU per byte.
pub const MAX_RUN_BLOCKS: u64 = 4;

/// The global memory budget of read-ahead, in blocks.
#[derive(Debug, Clone)]
pub struct ReadBudget {
    permits: Arc<Semaphore>,
}

impl ReadBudget {
    pub fn new(memory_bytes: u64) -> Self {
        let blocks = (memory_bytes / BLOCK_BYTES).max(1) as usize;
        ReadBudget {
            permits: Arc::new(Semaphore::new(blocks)),
        }
    }

    pub fn available_blocks(&self) -> usize {
        self.permits.available_permits()
    }

    fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits).try_acquire_owned().ok()
    }
}

type BlockFuture = Shared<BoxFuture<'static, FsResult<Bytes>>>;

struct PendingBlock {
    data: BlockFuture,
    /// Held while the block sits in memory as read-ahead; `None` for demand reads.
    _permit: Option<OwnedSemaphorePermit>,
}

struct ReadState {
    key: String,
    etag: Option<String>,
    next_offset: u64,
    window_blocks: u64,
    blocks: BTreeMap<u64, PendingBlock>,
}

/// Reads of one object version through one open file handle.
pub struct ObjectReader {
    store: Arc<dyn ObjectStore>,
    space: String,
    size: u64,
    cache: Option<Arc<DataCache>>,
    budget: ReadBudget,
    state: Mutex<ReadState>,
}

impl ObjectReader {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        space: &str,
        key: &str,
        etag: Option<String>,
        size: u64,
        cache: Option<Arc<DataCache>>,
        budget: ReadBudget,
    ) -> Self {
        ObjectReader {
            store,
            space: space.to_string(),
            size,
            cache,
            budget,
            state: Mutex::new(ReadState {
                key: key.to_string(),
                etag,
                next_offset: 0,
                window_blocks: 1,
                blocks: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Follows a rename made through this mount: the same content now lives at `key`
    /// (with `etag`, which a server-side copy may have changed).
    pub fn relocate(&self, key: &str, etag: Option<String>) {
        let mut state = self.lock();
        state.key = key.to_string();
        if etag.is_some() {
            state.etag = etag;
        }
    }

    /// Reads up to `size` bytes at `offset`; fewer only at the end of the object.
    pub async fn read(&self, offset: u64, size: u32) -> FsResult<Bytes> {
        if offset >= self.size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + u64::from(size)).min(self.size);
        let first = offset / BLOCK_BYTES;
        let last = (end - 1) / BLOCK_BYTES;
        let block_count = self.size.div_ceil(BLOCK_BYTES);

        let wanted: Vec<BlockFuture> = {
            let mut state = self.lock();
            let sequential = offset == state.next_offset || state.blocks.contains_key(&first);
            if sequential {
                if offset == state.next_offset && offset != 0 {
                    state.window_blocks = (state.window_blocks * 2).min(MAX_WINDOW_BLOCKS);
                }
            } else {
                state.window_blocks = 1;
                state.blocks.retain(|&index, _| index >= first && index <= last + 1);
            }
            state.blocks.retain(|&index, _| index >= first);

            let wanted = (first..=last)
                .map(|index| {
                    if !state.blocks.contains_key(&index) {
                        let block = self.spawn_fetch(&state, index, None);
                        state.blocks.insert(index, block);
                    }
                    state.blocks[&index].data.clone()
                })
                .collect();

            if sequential {
                let ahead_end = (last + 1 + state.window_blocks).min(block_count);
                let mut run_start = last + 1;
                let mut permits = Vec::new();
                for index in last + 1..=ahead_end {
                    let run_ends = index == ahead_end
                        || state.blocks.contains_key(&index)
                        || permits.len() as u64 == MAX_RUN_BLOCKS;
                    if run_ends && !permits.is_empty() {
                        for (block_index, block) in self.spawn_fetch_run(&state, run_start, std::mem::take(&mut permits)) {
                            state.blocks.insert(block_index, block);
                        }
                    }
                    if index == ahead_end {
                        break;
                    }
                    if state.blocks.contains_key(&index) {
                        continue;
                    }
                    if permits.is_empty() {
                        run_start = index;
                    }
                    let Some(permit) = self.budget.try_acquire() else { break };
                    permits.push(Some(permit));
                }
                if !permits.is_empty() {
                    for (block_index, block) in self.spawn_fetch_run(&state, run_start, permits) {
                        state.blocks.insert(block_index, block);
                    }
                }
            }
            state.next_offset = end;
            wanted
        };

        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (position, block) in wanted.into_iter().enumerate() {
            let index = first + position as u64;
            let data = match block.await {
                Ok(data) => data,
                Err(err) => {
                    // Forget the failed block so that the next read retries it.
                    self.lock().blocks.remove(&index);
                    return Err(err);
                }
            };
            let block_start = index * BLOCK_BYTES;
            let from = offset.saturating_sub(block_start) as usize;
            let to = ((end - block_start) as usize).min(data.len());
            if from > to {
                return Err(FsError::io(format!("short block {index} of {}", self.space)));
            }
            out.extend_from_slice(&data[from..to]);
        }

        {
            // Blocks fully consumed by this read are no longer needed in memory.
            let mut state = self.lock();
            let keep_from = end / BLOCK_BYTES;
            state.blocks.retain(|&index, _| index >= keep_from);
        }
        Ok(out.freeze())
    }

    fn spawn_fetch(&self, state: &ReadState, index: u64, permit: Option<OwnedSemaphorePermit>) -> PendingBlock {
        let (_, block) = self.spawn_fetch_run(state, index, vec![permit]).pop().expect("one block requested");
        block
    }

    /// Fetches the consecutive blocks from `first` on (one per permit) with one request.
    fn spawn_fetch_run(&self, state: &ReadState, first: u64, permits: Vec<Option<OwnedSemaphorePermit>>) -> Vec<(u64, PendingBlock)> {
        let request = BlockRequest {
            store: Arc::clone(&self.store),
            space: self.space.clone(),
            key: state.key.clone(),
            etag: state.etag.clone(),
            first,
            count: permits.len() as u64,
            object_size: self.size,
            cache: self.cache.clone(),
        };
        let task = tokio::spawn(request.fetch());
        let run = async move {
            match task.await {
                Ok(result) => result.map(Arc::new),
                Err(err) => Err(FsError::io(format!("read task failed: {err}"))),
            }
        }
        .boxed()
        .shared();

        permits
            .into_iter()
            .enumerate()
            .map(|(position, permit)| {
                let run = run.clone();
                let data = async move { run.await.map(|blocks| blocks[position].clone()) }.boxed().shared();
                (first + position as u64, PendingBlock { data, _permit: permit })
            })
            .collect()
    }
}

struct BlockRequest {
    store: Arc<dyn ObjectStore>,
    space: String,
    key: String,
    etag: Option<String>,
    /// Index of the first block and number of consecutive blocks.
    first: u64,
    count: u64,
    object_size: u64,
    cache: Option<Arc<DataCache>>,
}

impl BlockRequest {
    fn block_range(&self, index: u64) -> std::ops::Range<u64> {
        index * BLOCK_BYTES..((index + 1) * BLOCK_BYTES).min(self.object_size)
    }

    fn cache_key(&self, index: u64) -> Option<BlockKey> {
        let etag = self.etag.as_deref()?;
        Some(BlockKey::new(&self.space, &self.key, etag, index))
    }

    /// Returns the blocks, from the data cache when it has all of them.
    async fn fetch(self) -> FsResult<Vec<Bytes>> {
        let indexes: Vec<u64> = (self.first..self.first + self.count).collect();
        if let Some(cache) = &self.cache {
            let keys: Option<Vec<(BlockKey, u64)>> = indexes
                .iter()
                .map(|&index| Some((self.cache_key(index)?, self.block_range(index).end - self.block_range(index).start)))
                .collect();
            if let Some(keys) = keys {
                let cache = Arc::clone(cache);
                let cached = tokio::task::spawn_blocking(move || {
                    keys.iter()
                        .map(|(key, len)| cache.get(key).filter(|data| data.len() as u64 == *len))
                        .collect::<Option<Vec<Bytes>>>()
                })
                .await
                .ok()
                .flatten();
                if let Some(blocks) = cached {
                    return Ok(blocks);
                }
            }
        }

        let start = self.block_range(self.first).start;
        let end = self.block_range(self.first + self.count - 1).end;
        let what = format!("{}/{}", self.space, self.key);
        let options = GetOptions {
            range: Some(GetRange::Bounded(start..end)),
            if_match: self.etag.clone(),
            ..GetOptions::default()
        };
        let path = object_path(&self.key)?;
        let result = self
            .store
            .get_opts(&path, options)
            .await
            .map_err(|err| FsError::from_store(err, &what))?;
        let data = result.bytes().await.map_err(|err| FsError::from_store(err, &what))?;
        if data.len() as u64 != end - start {
            return Err(FsError::io(format!("{what}: expected {} bytes at offset {start}, got {}", end - start, data.len())));
        }

        let mut blocks = Vec::with_capacity(indexes.len());
        for &index in &indexes {
            let range = self.block_range(index);
            let block = data.slice((range.start - start) as usize..(range.end - start) as usize);
            if let (Some(cache), Some(cache_key)) = (&self.cache, self.cache_key(index)) {
                if let Some(permit) = cache.try_reserve_write() {
                    let cache = Arc::clone(cache);
                    let stored = block.clone();
                    tokio::task::spawn_blocking(move || {
                        cache.put(&cache_key, &stored);
                        drop(permit);
                    });
                }
            }
            blocks.push(block);
        }
        Ok(blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutPayload};

    async fn object(size: usize) -> (Arc<dyn ObjectStore>, Vec<u8>, Option<String>) {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let put = store.put(&"obj".into(), PutPayload::from(data.clone())).await.unwrap();
        (store, data, put.e_tag)
    }

    #[tokio::test]
    async fn sequential_reads_return_exact_bytes() {
        let (store, data, etag) = object(3 * BLOCK_BYTES as usize + 123).await;
        let reader = ObjectReader::new(store, "s", "obj", etag, data.len() as u64, None, ReadBudget::new(8 << 20));
        let mut offset = 0u64;
        let mut out = Vec::new();
        loop {
            let chunk = reader.read(offset, 128 * 1024).await.unwrap();
            if chunk.is_empty() {
                break;
            }
            offset += chunk.len() as u64;
            out.extend_from_slice(&chunk);
        }
        assert_eq!(out, data);
    }

    #[tokio::test]
    async fn random_read_crosses_block_boundary() {
        let (store, data, etag) = object(2 * BLOCK_BYTES as usize + 10).await;
        let reader = ObjectReader::new(store, "s", "obj", etag, data.len() as u64, None, ReadBudget::new(1 << 20));
        let offset = BLOCK_BYTES - 5;
        let chunk = reader.read(offset, 10).await.unwrap();
        assert_eq!(&chunk[..], &data[offset as usize..offset as usize + 10]);
        let tail = reader.read(data.len() as u64 - 4, 100).await.unwrap();
        assert_eq!(&tail[..], &data[data.len() - 4..]);
    }

    #[tokio::test]
    async fn budget_bounds_read_ahead() {
        let (store, data, etag) = object(40 * BLOCK_BYTES as usize).await;
        let budget = ReadBudget::new(4 * BLOCK_BYTES);
        let reader = ObjectReader::new(store, "s", "obj", etag, data.len() as u64, None, budget.clone());
        let mut offset = 0;
        for _ in 0..40 {
            let chunk = reader.read(offset, 256 * 1024).await.unwrap();
            assert_eq!(&chunk[..], &data[offset as usize..offset as usize + chunk.len()]);
            offset += chunk.len() as u64;
            assert!(budget.available_blocks() <= 4);
        }
        drop(reader);
        assert_eq!(budget.available_blocks(), 4, "permits return when the reader closes");
    }

    #[tokio::test]
    async fn failed_block_retried_on_next_read() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let reader = ObjectReader::new(Arc::clone(&store), "s", "late", None, 5, None, ReadBudget::new(1 << 20));
        assert_eq!(reader.read(0, 5).await.unwrap_err().errno, libc::ENOENT);
        store.put(&"late".into(), PutPayload::from_static(b"hello")).await.unwrap();
        assert_eq!(&reader.read(0, 5).await.unwrap()[..], b"hello");
    }

    #[tokio::test]
    async fn changed_object_fails_with_estale() {
        let (store, data, etag) = object(1000).await;
        store.put(&"obj".into(), PutPayload::from_static(b"new content")).await.unwrap();
        let reader = ObjectReader::new(store, "s", "obj", etag, data.len() as u64, None, ReadBudget::new(1 << 20));
        let err = reader.read(0, 100).await.unwrap_err();
        assert_eq!(err.errno, libc::ESTALE);
    }

    #[tokio::test]
    async fn blocks_served_from_data_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Arc::new(DataCache::open(tmp.path(), 8 << 20).unwrap());
        let (store, data, etag) = object(5000).await;
        let reader = ObjectReader::new(Arc::clone(&store), "s", "obj", etag.clone(), 5000, Some(Arc::clone(&cache)), ReadBudget::new(1 << 20));
        assert_eq!(&reader.read(0, 5000).await.unwrap()[..], &data[..]);
        for _ in 0..50 {
            if cache.used_bytes() == 5000 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(cache.used_bytes(), 5000);
        store.delete(&"obj".into()).await.unwrap();
        let again = ObjectReader::new(store, "s", "obj", etag, 5000, Some(cache), ReadBudget::new(1 << 20));
        assert_eq!(&again.read(0, 5000).await.unwrap()[..], &data[..], "served from the data cache");
    }
}
