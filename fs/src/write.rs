//! The write path of one file: its staging file, pending metadata and upload.
//!
//! A [`Writer`] exists per inode while at least one handle has the file open for writing
//! (or a truncate without a handle runs). Every handle of that inode reads and writes
//! through it, so a reader never sees zeros or stale bytes for an acknowledged write.
//! Content lives in a [`crate::staging::Staging`] file and goes to the store through
//! [`crate::upload::upload_file`] on `flush` (every `close`), `fsync` and the last
//! `release`. Invariant: after `flush` or `fsync` returned success, the bytes written so
//! far are in the store; a failed upload keeps the data dirty and reports the error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;

use crate::error::{FsError, FsResult};
use crate::journal::Journal;
use crate::metacache::FileStat;
use crate::namespace::{object_path, SpaceHandle};
use crate::posix_meta::{MetaTarget, PosixMeta};
use crate::staging::{BaseObject, Staging, StagingError, StagingSettings};
use crate::upload::{upload_file, UploadSettings};

fn staging_error(err: StagingError) -> FsError {
    FsError::new(err.errno(), err.to_string())
}

/// The pending content and metadata of one file open for writing.
pub struct Writer {
    staging: Staging,
    /// Metadata uploaded with the content: what the object had, plus changes made while
    /// the file is open (chmod, utimens), so they are never lost to the next upload.
    meta: Mutex<PosixMeta>,
    /// Set when metadata changed since the last upload.
    meta_dirty: AtomicBool,
    /// Set by unlink: the object must not be uploaded again (no resurrection).
    unlinked: AtomicBool,
    /// Serializes uploads of this file.
    upload_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("staging", &self.staging).finish_non_exhaustive()
    }
}

impl Writer {
    /// Creates a writer over the object `base`, or over an empty file when `base` is
    /// `None` (a create, or an existing file opened with `O_TRUNC`).
    pub fn new(settings: &StagingSettings, base: Option<BaseObject>, meta: PosixMeta) -> FsResult<Arc<Self>> {
        let staging = Staging::create(settings, base).map_err(staging_error)?;
        Ok(Arc::new(Writer {
            staging,
            meta: Mutex::new(meta),
            meta_dirty: AtomicBool::new(false),
            unlinked: AtomicBool::new(false),
            upload_lock: tokio::sync::Mutex::new(()),
        }))
    }

    pub async fn size(&self) -> u64 {
        self.staging.size().await
    }

    pub fn is_dirty(&self) -> bool {
        self.staging.is_dirty() || self.meta_dirty.load(Ordering::SeqCst)
    }

    pub async fn write(&self, offset: u64, data: &[u8]) -> FsResult<u32> {
        let written = self.staging.write(offset, data).await.map_err(staging_error)?;
        self.touch_mtime();
        Ok(written as u32)
    }

    /// Writes `data` at the end of the file (`O_APPEND`).
    pub async fn append(&self, data: &[u8]) -> FsResult<u32> {
        let written = self.staging.append(data).await.map_err(staging_error)?;
        self.touch_mtime();
        Ok(written as u32)
    }

    /// Sets the mtime after a write, as on a local disk, so an mtime stored by an earlier
    /// utimens does not survive it (without one, the upload time is the mtime).
    fn touch_mtime(&self) {
        let mut meta = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        if meta.mtime.is_some() {
            meta.mtime = Some(SystemTime::now());
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> FsResult<Bytes> {
        self.staging.read(offset, u64::from(len)).await.map_err(staging_error)
    }

    pub async fn truncate(&self, len: u64) -> FsResult<()> {
        self.staging.truncate(len).await.map_err(staging_error)
    }

    pub fn meta(&self) -> PosixMeta {
        self.meta.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the metadata that the next upload stores.
    pub fn update_meta(&self, change: impl FnOnce(&mut PosixMeta)) {
        change(&mut self.meta.lock().unwrap_or_else(|e| e.into_inner()));
        self.meta_dirty.store(true, Ordering::SeqCst);
    }

    /// Marks the file as unlinked, after waiting for an upload in flight, so that the
    /// caller's delete of the object comes after it and nothing is resurrected.
    pub async fn mark_unlinked(&self) {
        let _serialized = self.upload_lock.lock().await;
        self.unlinked.store(true, Ordering::SeqCst);
    }

    pub fn is_unlinked(&self) -> bool {
        self.unlinked.load(Ordering::SeqCst)
    }

    /// Uploads the file to `key` when it has changes; returns the new attributes, or
    /// `None` when nothing had to be uploaded.
    pub async fn upload(
        &self,
        handle: &SpaceHandle,
        target: &MetaTarget,
        key: &str,
        settings: &UploadSettings,
    ) -> FsResult<Option<FileStat>> {
        let _serialized = self.upload_lock.lock().await;
        if !self.is_dirty() || self.is_unlinked() {
            return Ok(None);
        }

        let frozen = self.staging.freeze().await.map_err(staging_error)?;
        let meta_was_dirty = self.meta_dirty.swap(false, Ordering::SeqCst);
        let meta = self.meta();
        let path = object_path(key)?;
        let what = handle.describe(key);
        let started = std::time::Instant::now();
        let result = upload_file(&handle.space, target, &path, Arc::clone(&frozen.file), frozen.len, &meta, settings).await;
        let put = match result {
            Ok(put) => put,
            Err(err) => {
                if meta_was_dirty {
                    self.meta_dirty.store(true, Ordering::SeqCst);
                }
                tracing::warn!(object = %what, error = %err, "upload failed; the file stays dirty");
                return Err(FsError::new(err.errno(), format!("{what}: upload failed: {err}")));
            }
        };
        self.staging.mark_uploaded(&frozen);
        tracing::debug!(object = %what, bytes = frozen.len, elapsed_ms = started.elapsed().as_millis() as u64, "uploaded");

        Ok(Some(FileStat {
            size: frozen.len,
            mtime: meta.mtime.unwrap_or_else(SystemTime::now),
            etag: put.e_tag,
            meta: Some(Arc::new(meta)),
        }))
    }

    /// Records the file in the write-back journal when it has changes, and returns once
    /// the content is durable on local disk. The journal uploads it after its delay.
    /// Returns whether anything was recorded.
    pub async fn record(&self, journal: &Journal, space: &str, key: &str) -> FsResult<bool> {
        let _serialized = self.upload_lock.lock().await;
        if !self.is_dirty() || self.is_unlinked() {
            return Ok(false);
        }

        // The upload happens later, so the store's time would not be the close time.
        if self.meta().mtime.is_none() {
            self.update_meta(|meta| meta.mtime = Some(SystemTime::now()));
        }
        let frozen = self.staging.freeze().await.map_err(staging_error)?;
        let meta_was_dirty = self.meta_dirty.swap(false, Ordering::SeqCst);
        let meta = self.meta();
        let path = object_path(key)?;

        if let Err(err) = journal.record(space, &path, &frozen, self.staging.path(), false, &meta).await {
            if meta_was_dirty {
                self.meta_dirty.store(true, Ordering::SeqCst);
            }
            tracing::error!(space, key, error = %err, "cannot record in the write-back journal; the file stays dirty");
            return Err(FsError::new(err.errno(), format!("{space}/{key}: cannot record in the write-back journal: {err}")));
        }
        self.staging.mark_uploaded(&frozen);
        Ok(true)
    }
}
