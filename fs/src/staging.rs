//! Local staging files: the content of a file open for writing, kept in the cache
//! directory until it is uploaded.
//!
//! A staging file starts either empty (new file, `O_TRUNC`) or as a lazy copy of an
//! existing object, its *base*. Nothing is downloaded up front. A byte range of the base
//! is fetched the first time it is read, or before upload ([`Staging::freeze`]).
//! Invariant: every byte below the logical size is either written by the application,
//! a byte of the base object at the same offset (fetched with `If-Match` on the base's
//! ETag, so two versions never mix), or zero (past the base's end or after a truncate),
//! so a partial overwrite never uploads a NUL tail.
//!
//! Space on the cache disk is checked before each write: when the write would leave
//! less than [`StagingSettings::min_free_bytes`] free, it fails with ENOSPC and changes
//! nothing, so the file never holds a write that the application saw fail.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

/// Base ranges are fetched in aligned blocks of this size, so that small reads of a
/// cold file do not turn into one request each.
const FILL_BLOCK_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("cache directory {dir} has too little free space ({available} bytes free, {needed} needed)")]
    NoSpace { dir: PathBuf, available: u64, needed: u64 },

    #[error("staging file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("cannot fetch {object} bytes {start}..{end} for a partial overwrite: {source}")]
    Fetch { object: String, start: u64, end: u64, source: object_store::Error },

    #[error("{object} changed in the store while open for writing (short read at {offset})")]
    BaseChanged { object: String, offset: u64 },
}

impl StagingError {
    pub fn errno(&self) -> i32 {
        match self {
            StagingError::NoSpace { .. } => libc::ENOSPC,
            StagingError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            StagingError::Fetch { .. } | StagingError::BaseChanged { .. } => libc::EIO,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StagingSettings {
    /// Directory of the staging files. The write-back journal must be on the same
    /// filesystem, so that a staging file can be linked into it.
    pub dir: PathBuf,
    /// Free space a write must leave on the cache filesystem.
    pub min_free_bytes: u64,
}

/// The existing object that a staging file overlays.
#[derive(Debug, Clone)]
pub struct BaseObject {
    pub store: Arc<dyn ObjectStore>,
    pub path: ObjectPath,
    pub size: u64,
    pub e_tag: Option<String>,
}

/// Sorted, non-overlapping, non-adjacent byte ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet(Vec<Range<u64>>);

impl RangeSet {
    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let mut merged = range;
        let mut kept = Vec::with_capacity(self.0.len() + 1);
        for existing in self.0.drain(..) {
            if existing.end < merged.start || existing.start > merged.end {
                kept.push(existing);
            } else {
                merged = merged.start.min(existing.start)..merged.end.max(existing.end);
            }
        }
        kept.push(merged);
        kept.sort_by_key(|r| r.start);
        self.0 = kept;
    }

    /// Drops everything at or beyond `len`.
    pub fn truncate(&mut self, len: u64) {
        self.0.retain(|r| r.start < len);
        if let Some(last) = self.0.last_mut() {
            last.end = last.end.min(len);
        }
    }

    /// Returns the end of the range that starts at offset 0, or 0 when there is none.
    pub fn prefix_end(&self) -> u64 {
        match self.0.first() {
            Some(first) if first.start == 0 => first.end,
            _ => 0,
        }
    }

    /// Sub-ranges of `range` that are not in the set.
    pub fn gaps(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let mut gaps = Vec::new();
        let mut cursor = range.start;
        for present in &self.0 {
            if present.end <= cursor {
                continue;
            }
            if present.start >= range.end {
                break;
            }
            if present.start > cursor {
                gaps.push(cursor..present.start);
            }
            cursor = present.end;
        }
        if cursor < range.end {
            gaps.push(cursor..range.end);
        }
        gaps
    }
}

struct State {
    file: Arc<File>,
    /// Logical file size; the file on disk has the same length (sparse where unwritten).
    size: u64,
    base: Option<BaseObject>,
    /// Bytes below this offset that are not in `present` still have to come from the base.
    base_len: u64,
    /// Ranges whose bytes in the file are final (written or fetched).
    present: RangeSet,
}

/// The staging file of one inode open for writing.
pub struct Staging {
    path: PathBuf,
    settings: StagingSettings,
    /// The same file as `State::file`, which never changes, readable without the lock.
    file: Arc<File>,
    state: Arc<RwLock<State>>,
    /// See [`Staging::final_prefix_len`].
    final_prefix_len: AtomicU64,
    /// Incremented by every change; compared with `uploaded` to know whether the content
    /// differs from the store.
    generation: AtomicU64,
    uploaded: AtomicU64,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Staging {
    /// Creates a staging file that overlays `base` (or starts empty when `None`). A new
    /// file with no base counts as changed, so that closing it uploads an empty object.
    pub fn create(settings: &StagingSettings, base: Option<BaseObject>) -> Result<Staging, StagingError> {
        let io_error = |path: &Path, source| StagingError::Io { path: path.to_path_buf(), source };
        crate::private_dir::create_dir(&settings.dir).map_err(|e| io_error(&settings.dir, e))?;

        let (file, path) = create_unique(&settings.dir).map_err(|e| io_error(&settings.dir, e))?;
        let size = base.as_ref().map_or(0, |b| b.size);
        file.set_len(size).map_err(|e| io_error(&path, e))?;

        let is_new = base.is_none();
        let file = Arc::new(file);
        let state = State {
            file: Arc::clone(&file),
            size,
            base_len: size,
            base,
            present: RangeSet::default(),
        };
        Ok(Staging {
            path,
            settings: settings.clone(),
            file,
            state: Arc::new(RwLock::new(state)),
            final_prefix_len: AtomicU64::new(0),
            generation: AtomicU64::new(u64::from(is_new)),
            uploaded: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the staging file. Reading it without the lock is safe only for ranges that
    /// no writer changes, such as those below [`Staging::final_prefix_len`] that the
    /// caller has stopped accepting writes for.
    pub fn file(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    /// Returns the length of the prefix whose bytes are all final: written by the
    /// application or fetched from the base, from offset 0 with no gap. A streamed upload
    /// sends parts only from this prefix.
    pub fn final_prefix_len(&self) -> u64 {
        self.final_prefix_len.load(Ordering::SeqCst)
    }

    fn update_final_prefix(&self, state: &State) {
        // Below `base_len`, bytes missing from `present` still come from the base, so a
        // prefix counts only once it covers all of them.
        let prefix = state.present.prefix_end();
        let prefix = if prefix >= state.base_len { prefix } else { 0 };
        self.final_prefix_len.store(prefix, Ordering::SeqCst);
    }

    pub async fn size(&self) -> u64 {
        self.state.read().await.size
    }

    /// True when the content differs from what was last uploaded (or from the base).
    pub fn is_dirty(&self) -> bool {
        self.generation.load(Ordering::SeqCst) != self.uploaded.load(Ordering::SeqCst)
    }

    /// Writes `data` at `offset`, extending the file (with zeros in between) if needed.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<usize, StagingError> {
        let mut state = self.state.write().await;
        self.write_locked(&mut state, offset, data)
    }

    /// Writes `data` at the end of the file. The end is read under the same lock, so a
    /// concurrent truncate comes wholly before or after the write.
    /// Returns the offset of the written bytes and their count.
    pub async fn append(&self, data: &[u8]) -> Result<(u64, usize), StagingError> {
        let mut state = self.state.write().await;
        let offset = state.size;
        let written = self.write_locked(&mut state, offset, data)?;
        Ok((offset, written))
    }

    fn write_locked(&self, state: &mut State, offset: u64, data: &[u8]) -> Result<usize, StagingError> {
        let end = offset + data.len() as u64;
        let new_bytes: u64 = state.present.gaps(offset..end).iter().map(|r| r.end - r.start).sum();
        self.check_space(new_bytes)?;

        if let Err(source) = state.file.write_all_at(data, offset) {
            // Undo a partial extension so the file keeps its logical size.
            let _ = state.file.set_len(state.size);
            return Err(StagingError::Io { path: self.path.clone(), source });
        }

        state.present.insert(offset..end);
        state.size = state.size.max(end);
        self.update_final_prefix(state);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(data.len())
    }

    /// Sets the size: bytes past `len` are dropped, and growing adds zeros.
    pub async fn truncate(&self, len: u64) -> Result<(), StagingError> {
        let mut state = self.state.write().await;
        state.file.set_len(len).map_err(|source| StagingError::Io { path: self.path.clone(), source })?;
        state.present.truncate(len);
        state.base_len = state.base_len.min(len);
        state.size = len;
        self.update_final_prefix(&state);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Reads up to `len` bytes at `offset`, fetching base ranges that were not read yet.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, StagingError> {
        let needs_fill = {
            let state = self.state.read().await;
            let end = (offset + len).min(state.base_len);
            offset < end && !state.present.gaps(offset..end).is_empty()
        };
        if needs_fill {
            let mut state = self.state.write().await;
            let end = (offset + len).min(state.base_len);
            if offset < end {
                self.fill(&mut state, offset..end).await?;
            }
        }

        let state = self.state.read().await;
        let end = (offset + len).min(state.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let mut buffer = vec![0u8; (end - offset) as usize];
        let mut done = 0;
        while done < buffer.len() {
            let n = state
                .file
                .read_at(&mut buffer[done..], offset + done as u64)
                .map_err(|source| StagingError::Io { path: self.path.clone(), source })?;
            if n == 0 {
                break; // A hole at the end of a sparse file reads as the zeros already there.
            }
            done += n;
        }
        Ok(Bytes::from(buffer))
    }

    /// Fetches every missing base range and blocks writers until the returned view is
    /// dropped, so an upload reads one consistent content. The file is not synced to disk:
    /// an upload reads it from the page cache, and the write-back journal syncs its own
    /// copy before it acknowledges anything.
    pub async fn freeze(&self) -> Result<FrozenStaging, StagingError> {
        let mut state = Arc::clone(&self.state).write_owned().await;
        let base_len = state.base_len;
        self.fill(&mut state, 0..base_len).await?;

        let guard = state.downgrade();
        Ok(FrozenStaging {
            file: Arc::clone(&guard.file),
            len: guard.size,
            generation: self.generation.load(Ordering::SeqCst),
            _guard: guard,
        })
    }

    /// Records that the content frozen in `frozen` is now in the store.
    pub fn mark_uploaded(&self, frozen: &FrozenStaging) {
        self.uploaded.store(frozen.generation, Ordering::SeqCst);
    }

    async fn fill(&self, state: &mut State, range: Range<u64>) -> Result<(), StagingError> {
        let Some(base) = state.base.clone() else {
            return Ok(());
        };
        let aligned = align_down(range.start, FILL_BLOCK_BYTES)..align_up(range.end, FILL_BLOCK_BYTES).min(state.base_len);
        for gap in state.present.gaps(aligned) {
            self.check_space(gap.end - gap.start)?;
            let bytes = fetch(&base, gap.clone()).await?;
            state
                .file
                .write_all_at(&bytes, gap.start)
                .map_err(|source| StagingError::Io { path: self.path.clone(), source })?;
            state.present.insert(gap);
        }
        self.update_final_prefix(state);
        Ok(())
    }

    fn check_space(&self, needed: u64) -> Result<(), StagingError> {
        if needed == 0 {
            return Ok(());
        }
        let available = free_bytes(&self.settings.dir)
            .map_err(|source| StagingError::Io { path: self.settings.dir.clone(), source })?;
        if available < needed.saturating_add(self.settings.min_free_bytes) {
            tracing::warn!(dir = %self.settings.dir.display(), available, needed, "cache disk full; write rejected");
            return Err(StagingError::NoSpace { dir: self.settings.dir.clone(), available, needed });
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.path) {
            if err.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %err, "cannot remove staging file");
            }
        }
    }
}

/// A staging file's content held still for an upload.
pub struct FrozenStaging {
    pub file: Arc<File>,
    pub len: u64,
    generation: u64,
    _guard: OwnedRwLockReadGuard<State>,
}

async fn fetch(base: &BaseObject, range: Range<u64>) -> Result<Bytes, StagingError> {
    let options = GetOptions {
        if_match: base.e_tag.clone(),
        range: Some(GetRange::Bounded(range.clone())),
        ..GetOptions::default()
    };
    let fetch_error = |source| StagingError::Fetch {
        object: base.path.to_string(),
        start: range.start,
        end: range.end,
        source,
    };
    let result = base.store.get_opts(&base.path, options).await.map_err(fetch_error)?;
    let bytes = result.bytes().await.map_err(fetch_error)?;
    if (bytes.len() as u64) < range.end - range.start {
        return Err(StagingError::BaseChanged { object: base.path.to_string(), offset: range.start + bytes.len() as u64 });
    }
    Ok(bytes)
}

fn create_unique(dir: &Path) -> std::io::Result<(File, PathBuf)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let name = format!("{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(name);
        match crate::private_dir::file_options().read(true).write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((file, path)),
            // A file left by an earlier process with the same pid: pick the next name.
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        }
    }
}

/// Removes staging files left in `dir` by processes that no longer run (after a crash)
/// and returns how many were removed. Files of running processes, such as another mount
/// that shares the cache directory, stay. Acknowledged content is never among them:
/// it is in the store or in the write-back journal.
pub fn remove_stale(dir: &Path) -> usize {
    let Ok(items) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for item in items.flatten() {
        let name = item.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.split_once('-')).and_then(|(pid, _)| pid.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_file(item.path()) {
            Ok(()) => removed += 1,
            Err(err) => tracing::warn!(path = %item.path().display(), error = %err, "cannot remove stale staging file"),
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "removed staging files of earlier processes");
    }
    removed
}

/// Bytes available to unprivileged writers on the filesystem that contains `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `stat` is a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

fn align_down(value: u64, block: u64) -> u64 {
    value / block * block
}

fn align_up(value: u64, block: u64) -> u64 {
    value.div_ceil(block) * block
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutPayload};

    fn settings(dir: &Path) -> StagingSettings {
        StagingSettings { dir: dir.to_path_buf(), min_free_bytes: 0 }
    }

    async fn base_object(content: Vec<u8>) -> BaseObject {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let path = ObjectPath::from("base");
        let size = content.len() as u64;
        let put = store.put(&path, PutPayload::from(content)).await.unwrap();
        BaseObject { store, path, size, e_tag: put.e_tag }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 253) as u8 + 1).collect()
    }

    async fn frozen_content(staging: &Staging) -> Vec<u8> {
        let frozen = staging.freeze().await.unwrap();
        let mut buffer = vec![0u8; frozen.len as usize];
        frozen.file.read_exact_at(&mut buffer, 0).unwrap();
        buffer
    }

    #[test]
    fn range_set_merges_and_finds_gaps() {
        let mut set = RangeSet::default();
        set.insert(10..20);
        set.insert(30..40);
        set.insert(20..25);
        assert_eq!(set.0, vec![10..25, 30..40]);
        assert_eq!(set.gaps(0..50), vec![0..10, 25..30, 40..50]);
        assert_eq!(set.gaps(12..22), Vec::<Range<u64>>::new());
        set.insert(5..35);
        assert_eq!(set.0, vec![5..40]);
        set.truncate(8);
        assert_eq!(set.0, vec![5..8]);
    }

    #[tokio::test]
    async fn partial_overwrite_keeps_base_tail() {
        let dir = tempfile::tempdir().unwrap();
        let original = pattern(9 << 20);
        let staging = Staging::create(&settings(dir.path()), Some(base_object(original.clone()).await)).unwrap();
        assert!(!staging.is_dirty());

        staging.write(5 << 20, b"XYZ").await.unwrap();
        assert!(staging.is_dirty());
        let mut expected = original;
        expected[5 << 20..(5 << 20) + 3].copy_from_slice(b"XYZ");
        assert_eq!(frozen_content(&staging).await, expected);
    }

    #[tokio::test]
    async fn reads_see_writes_and_base() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::create(&settings(dir.path()), Some(base_object(b"hello world".to_vec()).await)).unwrap();
        staging.write(6, b"there").await.unwrap();
        assert_eq!(&staging.read(0, 100).await.unwrap()[..], b"hello there");
        assert_eq!(&staging.read(3, 4).await.unwrap()[..], b"lo t");
        assert_eq!(staging.read(11, 4).await.unwrap().len(), 0);
    }

    #[tokio::test]
    async fn sparse_write_reads_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::create(&settings(dir.path()), Some(base_object(b"abc".to_vec()).await)).unwrap();
        staging.write(10, b"z").await.unwrap();
        assert_eq!(&staging.read(0, 20).await.unwrap()[..], b"abc\0\0\0\0\0\0\0z");
        assert_eq!(staging.size().await, 11);
    }

    #[tokio::test]
    async fn append_writes_at_end_after_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::create(&settings(dir.path()), Some(base_object(b"hello1\n".to_vec()).await)).unwrap();
        staging.append(b"hello2\n").await.unwrap();
        assert_eq!(&staging.read(0, 100).await.unwrap()[..], b"hello1\nhello2\n");
        staging.truncate(0).await.unwrap();
        staging.append(b"short\n").await.unwrap();
        assert_eq!(frozen_content(&staging).await, b"short\n");
    }

    #[tokio::test]
    async fn truncate_then_extend_reads_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::create(&settings(dir.path()), Some(base_object(b"abcdefgh".to_vec()).await)).unwrap();
        staging.truncate(2).await.unwrap();
        staging.truncate(5).await.unwrap();
        assert_eq!(frozen_content(&staging).await, b"ab\0\0\0");
    }

    #[tokio::test]
    async fn new_file_is_dirty_until_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::create(&settings(dir.path()), None).unwrap();
        assert!(staging.is_dirty());
        let frozen = staging.freeze().await.unwrap();
        assert_eq!(frozen.len, 0);
        staging.mark_uploaded(&frozen);
        drop(frozen);
        assert!(!staging.is_dirty());
        staging.write(0, b"a").await.unwrap();
        assert!(staging.is_dirty());
    }

    #[tokio::test]
    async fn changed_base_fails_fill() {
        let dir = tempfile::tempdir().unwrap();
        let base = base_object(b"version one".to_vec()).await;
        base.store.put(&base.path, PutPayload::from_static(b"version two")).await.unwrap();
        let staging = Staging::create(&settings(dir.path()), Some(base)).unwrap();
        staging.write(0, b"V").await.unwrap();
        let err = staging.freeze().await.err().unwrap();
        assert_eq!(err.errno(), libc::EIO, "{err}");
    }

    #[tokio::test]
    async fn full_disk_rejects_write_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        let settings = StagingSettings { dir: dir.path().to_path_buf(), min_free_bytes: free };
        let staging = Staging::create(&settings, None).unwrap();
        let err = staging.write(0, b"data").await.unwrap_err();
        assert_eq!(err.errno(), libc::ENOSPC);
        assert_eq!(staging.size().await, 0);
    }

    #[test]
    fn stale_files_of_dead_processes_removed() {
        let dir = tempfile::tempdir().unwrap();
        // pid_max on Linux is at most 4194304, so this pid never runs.
        std::fs::write(dir.path().join("4194305-0"), b"old").unwrap();
        let own = dir.path().join(format!("{}-7", std::process::id()));
        std::fs::write(&own, b"mine").unwrap();
        std::fs::write(dir.path().join("unrelated"), b"x").unwrap();
        assert_eq!(remove_stale(dir.path()), 1);
        assert!(own.exists());
        assert!(dir.path().join("unrelated").exists());
    }

    #[tokio::test]
    async fn drop_removes_file() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::create(&settings(dir.path()), None).unwrap();
        let path = staging.path().to_path_buf();
        assert!(path.exists());
        drop(staging);
        assert!(!path.exists());
    }
}
