//! Reusable buffers for the blocks of streaming reads.
//!
//! A cold sequential read moves every byte of an object through one block buffer. When
//! each buffer is a fresh allocation of [`crate::prefetch::BLOCK_BYTES`], the allocator
//! maps new pages for it and unmaps them again once the block is dropped, so the daemon
//! spends more time in page faults than in copying data. The pool keeps a few freed
//! buffers instead and hands them out again, already mapped.
//!
//! Each buffer's data starts at a 4 KiB boundary ([`BUFFER_ALIGN`]), so a whole block can
//! be written to the data cache with `O_DIRECT`, bypassing the page cache.
//!
//! Invariant: the pool contains at most `max_idle` buffers, so its memory stays bounded
//! however many blocks are alive. A buffer freed while the pool is full goes back to the
//! allocator.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Alignment of the data in every buffer: the logical block size of common disks.
pub const BUFFER_ALIGN: usize = 4096;

/// A bounded free list of block buffers of one capacity.
#[derive(Debug)]
pub struct BlockPool {
    buffer_bytes: usize,
    max_idle: usize,
    idle: Mutex<Vec<AlignedVec>>,
}

/// A vector whose bytes from `start` on are the buffer's data, `start` being the first
/// offset aligned to [`BUFFER_ALIGN`]. The bytes before it are padding.
#[derive(Debug)]
struct AlignedVec {
    vec: Vec<u8>,
    start: usize,
}

impl AlignedVec {
    fn new(data_bytes: usize) -> Self {
        let mut vec: Vec<u8> = Vec::with_capacity(data_bytes + BUFFER_ALIGN);
        let start = vec.as_ptr().align_offset(BUFFER_ALIGN).min(BUFFER_ALIGN);
        vec.resize(start, 0);
        AlignedVec { vec, start }
    }
}

impl BlockPool {
    pub fn new(buffer_bytes: usize, max_idle: usize) -> Arc<Self> {
        Arc::new(BlockPool {
            buffer_bytes,
            max_idle,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AlignedVec>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns an empty buffer with room for one block, reusing an idle one if possible.
    pub fn take(self: &Arc<Self>) -> BlockBuf {
        let buf = self.lock().pop().unwrap_or_else(|| AlignedVec::new(self.buffer_bytes));
        BlockBuf {
            buf,
            pool: Arc::clone(self),
        }
    }

    /// Buffers waiting to be reused.
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn give_back(&self, mut buf: AlignedVec) {
        buf.vec.truncate(buf.start);
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(buf);
        }
    }
}

/// A block buffer that returns to its pool when the last reference to it is dropped.
#[derive(Debug)]
pub struct BlockBuf {
    buf: AlignedVec,
    pool: Arc<BlockPool>,
}

impl BlockBuf {
    pub fn len(&self) -> usize {
        self.buf.vec.len() - self.buf.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends as much of `data` as fits below `limit` bytes and returns how much that was.
    pub fn fill(&mut self, data: &[u8], limit: usize) -> usize {
        let room = limit.min(self.pool.buffer_bytes).saturating_sub(self.len());
        let copied = room.min(data.len());
        self.buf.vec.extend_from_slice(&data[..copied]);
        copied
    }

    /// Turns the buffer into shared bytes. The buffer returns to the pool when the last
    /// clone or slice of them is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for BlockBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf.vec[self.buf.start..]
    }
}

impl Drop for BlockBuf {
    fn drop(&mut self) {
        let buf = std::mem::replace(&mut self.buf, AlignedVec { vec: Vec::new(), start: 0 });
        self.pool.give_back(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_bytes_return_their_buffer() {
        let pool = BlockPool::new(64, 2);
        let mut block = pool.take();
        assert_eq!(block.fill(&[7u8; 100], 64), 64, "fill stops at the limit");
        let bytes = block.freeze();
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle_count(), 0, "a slice still holds the buffer");
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert_eq!(pool.idle_count(), 1);

        let reused = pool.take();
        assert!(reused.is_empty(), "a reused buffer starts empty");
    }

    #[test]
    fn data_starts_aligned() {
        let pool = BlockPool::new(8192, 2);
        for _ in 0..3 {
            let mut block = pool.take();
            block.fill(&[3u8; 8192], 8192);
            let bytes = block.freeze();
            assert_eq!(bytes.len(), 8192);
            assert_eq!(bytes.as_ptr() as usize % BUFFER_ALIGN, 0);
        }
    }

    #[test]
    fn idle_buffers_are_bounded() {
        let pool = BlockPool::new(16, 2);
        let blocks: Vec<Bytes> = (0..5)
            .map(|_| {
                let mut block = pool.take();
                block.fill(&[1u8; 16], 16);
                block.freeze()
            })
            .collect();
        drop(blocks);
        assert_eq!(pool.idle_count(), 2);
    }
}
