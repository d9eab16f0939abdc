//! Reusable buffers for the blocks of streaming reads.
//!
//! A cold sequential read moves every byte of an object through one block buffer. When
//! each buffer is a fresh allocation of [`crate::prefetch::BLOCK_BYTES`], the allocator
//! maps new pages for it and unmaps them again once the block is dropped, so the daemon
//! spends more time in page faults than in copying data. The pool keeps freed buffers
//! instead and hands them out again, already mapped.
//!
//! Buffers are carved out of slabs: anonymous mappings aligned to [`HUGE_PAGE_BYTES`]
//! and advised with `MADV_HUGEPAGE`, so that where transparent huge pages are enabled
//! (`always` or `madvise`) one page table entry covers two 1 MiB blocks. Every copy of a
//! block (socket to buffer, buffer to `/dev/fuse`, `O_DIRECT` to the data cache) then
//! walks one page instead of 256, and the cache write is one disk segment. Without
//! huge pages the slabs are ordinary 4 KiB pages and only that gain is lost.
//!
//! Each buffer's data starts at a 4 KiB boundary ([`BUFFER_ALIGN`]), so a whole block can
//! be written to the data cache with `O_DIRECT`, bypassing the page cache.
//!
//! Invariant: the pool contains at most `max_idle` buffers, so its memory stays bounded
//! however many blocks are alive. A slab is unmapped once none of its buffers is alive
//! or idle in the pool.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Alignment of the data in every buffer: the logical block size of common disks.
pub const BUFFER_ALIGN: usize = 4096;

/// Size of a transparent huge page on x86_64 and the usual aarch64 kernels, and the unit
/// of slab sizes and alignment.
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// A bounded free list of block buffers of one capacity.
#[derive(Debug)]
pub struct BlockPool {
    buffer_bytes: usize,
    max_idle: usize,
    idle: Mutex<Vec<Region>>,
}

/// One anonymous mapping that buffers are carved from.
#[derive(Debug)]
struct Slab {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by the slab. Its bytes are only accessed
// through `Region`s, and each region is owned by one `BlockBuf` or the idle list.
unsafe impl Send for Slab {}
unsafe impl Sync for Slab {}

impl Slab {
    /// Maps `len` bytes (a multiple of [`HUGE_PAGE_BYTES`]) at a huge page boundary.
    /// Like a failed heap allocation, a failed mapping aborts the process.
    fn map(len: usize) -> Slab {
        Self::try_map(len).unwrap_or_else(|| {
            let layout = std::alloc::Layout::from_size_align(len, HUGE_PAGE_BYTES).expect("slab sizes are small multiples of 2 MiB");
            std::alloc::handle_alloc_error(layout)
        })
    }

    fn try_map(len: usize) -> Option<Slab> {
        // Map one huge page more than needed, then unmap the unaligned head and the tail.
        let align = HUGE_PAGE_BYTES;
        let padded = len.checked_add(align)?;

        // SAFETY: an anonymous private mapping at an address the kernel chooses touches no
        // existing memory.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                padded,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }

        let start = raw as usize;
        let aligned = start.next_multiple_of(align);
        let head = aligned - start;
        let tail = padded - head - len;
        // SAFETY: both ranges lie inside the mapping just made and outside the part kept.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }

        // Advice only: a kernel without transparent huge pages returns EINVAL, and the
        // slab then works with ordinary pages.
        // SAFETY: the range is the slab's own mapping.
        unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };

        Some(Slab {
            base: NonNull::new(aligned as *mut u8)?,
            len,
        })
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: the mapping belongs to this slab, and no region of it is alive.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// One buffer's place in a slab.
#[derive(Debug)]
struct Region {
    slab: Arc<Slab>,
    offset: usize,
}

impl Region {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: `offset` plus the buffer capacity lies within the slab (see `BlockPool::carve`).
        unsafe { self.slab.base.as_ptr().add(self.offset) }
    }
}

impl BlockPool {
    /// Creates a pool of `buffer_bytes` buffers that keeps at most `max_idle` freed ones.
    pub fn new(buffer_bytes: usize, max_idle: usize) -> Arc<Self> {
        Arc::new(BlockPool {
            buffer_bytes,
            max_idle,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Region>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns an empty buffer, reused when the pool has one.
    pub fn take(self: &Arc<Self>) -> BlockBuf {
        let reused = self.lock().pop();
        let region = reused.unwrap_or_else(|| self.carve());
        BlockBuf {
            region: Some(region),
            len: 0,
            pool: Arc::clone(self),
        }
    }

    /// Maps a new slab, returns its first buffer and keeps the others idle while the
    /// pool has room for them.
    fn carve(&self) -> Region {
        let stride = self.buffer_bytes.max(1).next_multiple_of(BUFFER_ALIGN);
        let per_slab = (HUGE_PAGE_BYTES / stride).max(1);
        let slab_bytes = (per_slab * stride).next_multiple_of(HUGE_PAGE_BYTES);
        let slab = Arc::new(Slab::map(slab_bytes));

        let mut idle = self.lock();
        for index in 1..per_slab {
            if idle.len() >= self.max_idle {
                break;
            }
            idle.push(Region {
                slab: Arc::clone(&slab),
                offset: index * stride,
            });
        }
        Region { slab, offset: 0 }
    }

    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn give_back(&self, region: Region) {
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(region);
        }
    }
}

/// A buffer being filled with one block; [`BlockBuf::freeze`] turns it into `Bytes`
/// whose drop returns the buffer to its pool.
#[derive(Debug)]
pub struct BlockBuf {
    /// Always `Some` until the buffer is dropped.
    region: Option<Region>,
    len: usize,
    pool: Arc<BlockPool>,
}

impl BlockBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends bytes of `data` until the buffer contains `limit` bytes (at most its
    /// capacity), and returns the number of bytes copied.
    pub fn fill(&mut self, data: &[u8], limit: usize) -> usize {
        let room = limit.min(self.pool.buffer_bytes).saturating_sub(self.len);
        let copied = room.min(data.len());
        let Some(region) = &self.region else { return 0 };
        // SAFETY: the region is owned by this buffer, and `len + copied` stays within
        // its capacity `buffer_bytes`; `data` is a different allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), region.ptr().add(self.len), copied) };
        self.len += copied;
        copied
    }

    /// Replaces the contents with `len` bytes (at most the capacity) that `read` writes
    /// into the slice it receives. After an error the buffer is empty.
    pub fn fill_with(&mut self, len: usize, read: impl FnOnce(&mut [u8]) -> std::io::Result<()>) -> std::io::Result<()> {
        let len = len.min(self.pool.buffer_bytes);
        self.len = 0;
        let Some(region) = &self.region else { return Ok(()) };
        // SAFETY: the region is owned by this buffer and at least `buffer_bytes` long.
        // Anonymous mappings start zeroed, so every byte of it is initialized.
        let slice = unsafe { std::slice::from_raw_parts_mut(region.ptr(), len) };
        read(slice)?;
        self.len = len;
        Ok(())
    }

    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for BlockBuf {
    fn as_ref(&self) -> &[u8] {
        match &self.region {
            // SAFETY: the first `len` bytes of the region were written by `fill`, and
            // the region is not written again while this buffer is alive.
            Some(region) => unsafe { std::slice::from_raw_parts(region.ptr(), self.len) },
            None => &[],
        }
    }
}

impl Drop for BlockBuf {
    fn drop(&mut self) {
        if let Some(region) = self.region.take() {
            self.pool.give_back(region);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_bytes_return_their_buffer() {
        let pool = BlockPool::new(64, 2);
        let mut block = pool.take();
        let idle_after_first_slab = pool.idle_count();
        assert_eq!(idle_after_first_slab, 2, "a new slab fills the idle list up to max_idle");
        assert_eq!(block.fill(&[7u8; 100], 64), 64, "fill stops at the limit");
        let bytes = block.freeze();
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle_count(), 2, "a slice still holds the buffer");
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert_eq!(pool.idle_count(), 2, "the pool stays within max_idle");

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
    fn block_sized_buffers_share_huge_page_slabs() {
        let pool = BlockPool::new(1 << 20, 4);
        let first = pool.take();
        let second = pool.take();
        let base = |buf: &BlockBuf| buf.region.as_ref().map(|region| region.slab.base.as_ptr() as usize);
        assert_eq!(base(&first), base(&second), "two 1 MiB buffers come from one slab");
        assert_eq!(base(&first).unwrap() % HUGE_PAGE_BYTES, 0, "the slab starts on a huge page boundary");
    }

    #[test]
    fn buffers_keep_their_own_bytes() {
        let pool = BlockPool::new(1 << 20, 4);
        let blocks: Vec<Bytes> = (0..5u8)
            .map(|value| {
                let mut block = pool.take();
                assert_eq!(block.fill(&vec![value; 1 << 20], 1 << 20), 1 << 20);
                block.freeze()
            })
            .collect();
        for (value, block) in blocks.iter().enumerate() {
            assert!(block.iter().all(|&byte| byte == value as u8), "block {value} was overwritten");
        }
    }

    #[test]
    fn fill_with_sets_length_only_on_success() {
        let pool = BlockPool::new(8192, 2);
        let mut block = pool.take();
        block.fill_with(100, |slice| {
            slice.fill(9);
            Ok(())
        })
        .unwrap();
        assert_eq!(block.as_ref(), &[9u8; 100][..]);

        let failed = block.fill_with(50, |_| Err(std::io::Error::other("disk gone")));
        assert!(failed.is_err());
        assert!(block.is_empty(), "a failed fill leaves the buffer empty");
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
