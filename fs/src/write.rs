//! The write path of one file: its staging file, pending metadata and upload.
//!
//! A [`Writer`] exists per inode while at least one handle has the file open for writing
//! (or a truncate without a handle runs). Every handle of that inode reads and writes
//! through it, so a reader never sees zeros or stale bytes for an acknowledged write.
//! Content lives in a [`crate::staging::Staging`] file and goes to the store on `flush`
//! (every `close`), `fsync` and the last `release`. Invariant: after `flush` or `fsync`
//! returned success, the bytes written so far are in the store. A failed upload keeps
//! the data dirty and reports the error.
//!
//! A file written from offset 0 onwards streams its whole parts to the store while it is
//! written ([`crate::stream_upload`]), so that `flush` sends only the tail. The stream is
//! dropped (and its multipart upload aborted) when the pattern breaks: a write or
//! truncate below the streamed boundary, unlink, or an upload attempt. CreateMultipartUpload
//! fixes the object key and the metadata, so `flush` uses the stream only when both still
//! match. Otherwise it uploads the whole file with [`crate::upload::upload_file`].

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
use crate::stream_upload::{StreamTarget, StreamedUpload};
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
    /// The streamed upload. Lock order: `upload_lock`, then this, then the staging lock.
    stream: tokio::sync::Mutex<StreamSlot>,
}

/// The streamed upload of a file, if one runs.
#[derive(Debug, Default)]
struct StreamSlot {
    upload: Option<StreamedUpload>,
    /// Set when a change went below the streamed boundary. No new stream starts before
    /// the next upload attempt, because the write pattern is not sequential.
    broken: bool,
}

impl StreamSlot {
    /// Drops the streamed upload, which aborts it in the background.
    fn discard(&mut self, reason: &str) {
        if let Some(upload) = self.upload.take() {
            tracing::debug!(path = %upload.path(), reason, "dropping streamed upload");
        }
    }

    /// Drops the streamed upload because a change went below its boundary.
    fn break_pattern(&mut self, reason: &str) {
        self.discard(reason);
        self.broken = true;
    }

    /// Hands the stream a write above its boundary, then seals the parts that became
    /// final.
    fn record_write(&mut self, offset: u64, data: &Bytes, final_len: u64) {
        if let Some(upload) = &mut self.upload {
            upload.record_write(offset, data);
            upload.seal_up_to(final_len);
        }
    }

    /// Takes the streamed upload when it can complete the object `path` with `meta`, and
    /// drops it otherwise.
    fn take_usable(&mut self, path: &object_store::path::Path, meta: &PosixMeta) -> Option<StreamedUpload> {
        let upload = self.upload.take()?;
        let unusable = if upload.has_failed() {
            Some("a request of the streamed upload failed")
        } else if upload.path() != path {
            Some("the file was renamed")
        } else if upload.meta() != meta {
            Some("the metadata changed")
        } else {
            None
        };
        match unusable {
            Some(reason) => {
                tracing::debug!(path = %upload.path(), reason, "streamed upload not usable; uploading the whole file");
                None
            }
            None => Some(upload),
        }
    }
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
            stream: tokio::sync::Mutex::new(StreamSlot::default()),
        }))
    }

    pub async fn size(&self) -> u64 {
        self.staging.size().await
    }

    pub fn is_dirty(&self) -> bool {
        self.staging.is_dirty() || self.meta_dirty.load(Ordering::SeqCst)
    }

    pub async fn write(&self, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_bytes(offset, Bytes::copy_from_slice(data)).await
    }

    /// Writes `data` at `offset`. A streamed upload may keep the buffer to send it
    /// without reading it back from the staging file.
    pub async fn write_bytes(&self, offset: u64, data: Bytes) -> FsResult<u32> {
        let mut stream = self.stream.lock().await;
        if stream.upload.as_ref().is_some_and(|upload| offset < upload.sealed_end()) {
            stream.break_pattern("a write below the streamed boundary");
        }

        let written = self.staging.write(offset, &data).await.map_err(staging_error)?;
        stream.record_write(offset, &data, self.staging.final_prefix_len());
        drop(stream);

        self.touch_mtime();
        Ok(written as u32)
    }

    /// Writes `data` at the end of the file (`O_APPEND`).
    pub async fn append_bytes(&self, data: Bytes) -> FsResult<u32> {
        let mut stream = self.stream.lock().await;
        let (offset, written) = self.staging.append(&data).await.map_err(staging_error)?;
        stream.record_write(offset, &data, self.staging.final_prefix_len());
        drop(stream);

        self.touch_mtime();
        Ok(written as u32)
    }

    /// Returns whether [`Writer::start_stream`] would start a streamed upload: the file
    /// is dirty, has at least one whole part written from offset 0, and no stream runs.
    /// Cheap enough to call after every write.
    pub fn should_start_stream(&self, settings: &UploadSettings) -> bool {
        let min_len = settings.multipart_threshold_bytes.max(settings.part_size_bytes);
        if self.staging.final_prefix_len() < min_len || !self.staging.is_dirty() || self.is_unlinked() {
            return false;
        }
        // A stored mtime follows every write (see `touch_mtime`), so the metadata at
        // flush would never match the metadata the stream was created with.
        if self.meta.lock().unwrap_or_else(|e| e.into_inner()).mtime.is_some() {
            return false;
        }
        // A locked slot means that another request is changing it and checks again.
        match self.stream.try_lock() {
            Ok(slot) => slot.upload.is_none() && !slot.broken,
            Err(_) => false,
        }
    }

    /// Starts a streamed upload to `path` in `store` and hands it the parts written so
    /// far. Only for stores that keep metadata as object attributes, so that the
    /// attributes sent now are the object's metadata.
    pub async fn start_stream(
        &self,
        store: Arc<dyn object_store::ObjectStore>,
        path: object_store::path::Path,
        target: &MetaTarget,
        settings: &UploadSettings,
    ) {
        if !matches!(target, MetaTarget::ObjectAttributes) {
            return;
        }
        let mut slot = self.stream.lock().await;
        if slot.upload.is_some() || slot.broken || !self.staging.is_dirty() || self.is_unlinked() {
            return;
        }

        let meta = self.meta();
        let stream_target = StreamTarget {
            store,
            path,
            attributes: target.put_attributes(&meta),
            meta,
            part_size_bytes: settings.part_size_bytes,
            max_concurrency: settings.max_concurrency,
        };
        let file_name = self.staging.path().display().to_string();
        let mut upload = StreamedUpload::start(stream_target, self.staging.file(), file_name);
        upload.seal_up_to(self.staging.final_prefix_len());
        slot.upload = Some(upload);
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
        let mut stream = self.stream.lock().await;
        if stream.upload.as_ref().is_some_and(|upload| len < upload.sealed_end()) {
            stream.break_pattern("a truncate below the streamed boundary");
        }
        if let Some(upload) = &mut stream.upload {
            upload.forget_buffers();
        }
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
        let mut stream = self.stream.lock().await;
        self.unlinked.store(true, Ordering::SeqCst);
        stream.break_pattern("the file was unlinked");
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
        self.upload_then(handle, target, key, settings, |_| {}).await
    }

    /// Uploads like [`Writer::upload`] and calls `publish` with the new attributes
    /// before the next upload of this file may start. Caches updated in `publish` thus
    /// see the uploads in order: an older upload that finishes late can never replace
    /// the attributes of a newer one.
    pub async fn upload_then(
        &self,
        handle: &SpaceHandle,
        target: &MetaTarget,
        key: &str,
        settings: &UploadSettings,
        publish: impl FnOnce(&FileStat),
    ) -> FsResult<Option<FileStat>> {
        let _serialized = self.upload_lock.lock().await;
        let mut stream = self.stream.lock().await;
        if !self.is_dirty() || self.is_unlinked() {
            stream.discard("nothing to upload");
            return Ok(None);
        }

        let frozen = self.staging.freeze().await.map_err(staging_error)?;
        let meta_was_dirty = self.meta_dirty.swap(false, Ordering::SeqCst);
        let meta = self.meta();
        let path = object_path(key)?;
        let streamed = stream.take_usable(&path, &meta);
        let is_streamed = streamed.is_some();
        // Whatever this upload's outcome, the next stream starts again from offset 0.
        stream.broken = false;
        drop(stream);

        let what = handle.describe(key);
        let started = std::time::Instant::now();
        let result = match streamed {
            Some(upload) => upload.finish(frozen.len).await,
            None => upload_file(&handle.space, target, &path, Arc::clone(&frozen.file), frozen.len, &meta, settings).await,
        };
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
        tracing::debug!(object = %what, bytes = frozen.len, streamed = is_streamed, elapsed_ms = started.elapsed().as_millis() as u64, "uploaded");

        let stat = FileStat {
            size: frozen.len,
            mtime: meta.mtime.unwrap_or_else(SystemTime::now),
            etag: put.e_tag,
            meta: Some(Arc::new(meta)),
        };
        publish(&stat);
        Ok(Some(stat))
    }

    /// Records the file in the write-back journal when it has changes, and returns once
    /// the content is durable on local disk. The journal uploads it after its delay.
    /// Returns whether anything was recorded.
    pub async fn record(&self, journal: &Journal, space: &str, key: &str) -> FsResult<bool> {
        let _serialized = self.upload_lock.lock().await;
        self.stream.lock().await.discard("the file goes to the write-back journal");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::Space;
    use object_store::memory::InMemory;
    use object_store::{GetOptions, ObjectStoreExt};

    const PART: u64 = 1000;

    fn settings() -> UploadSettings {
        UploadSettings {
            multipart_threshold_bytes: PART,
            part_size_bytes: PART,
            max_concurrency: 2,
            copy_limit_bytes: 1 << 30,
        }
    }

    fn memory_handle() -> SpaceHandle {
        let config = Config::parse("[spaces.m]\nurl = \"memory://\"\n", std::path::Path::new("t.toml")).unwrap();
        let space = Space { config: config.spaces["m"].clone(), store: Arc::new(InMemory::new()) };
        SpaceHandle::new(space).unwrap()
    }

    fn new_writer(dir: &std::path::Path) -> Arc<Writer> {
        let staging = StagingSettings { dir: dir.to_path_buf(), min_free_bytes: 0 };
        let meta = PosixMeta { mode: Some(0o100644), uid: Some(7), gid: Some(8), ..PosixMeta::default() };
        Writer::new(&staging, None, meta).unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Writes `data` in chunks of `chunk` bytes and starts the stream as the filesystem
    /// does after each write.
    async fn write_streaming(writer: &Writer, handle: &SpaceHandle, key: &str, data: &[u8], chunk: usize) {
        for (index, piece) in data.chunks(chunk).enumerate() {
            writer.write((index * chunk) as u64, piece).await.unwrap();
            if writer.should_start_stream(&settings()) {
                let path = object_path(key).unwrap();
                writer.start_stream(Arc::clone(&handle.space.store), path, &handle.meta_target, &settings()).await;
            }
        }
    }

    async fn sealed_end(writer: &Writer) -> Option<u64> {
        writer.stream.lock().await.upload.as_ref().map(|upload| upload.sealed_end())
    }

    async fn stored(handle: &SpaceHandle, key: &str) -> (Vec<u8>, PosixMeta) {
        let path = object_path(key).unwrap();
        let result = handle.space.store.get_opts(&path, GetOptions::default()).await.unwrap();
        let meta = PosixMeta::from_attributes(&result.attributes);
        (result.bytes().await.unwrap().to_vec(), meta)
    }

    #[tokio::test]
    async fn sequential_write_streams_parts() {
        let dir = tempfile::tempdir().unwrap();
        let handle = memory_handle();
        let writer = new_writer(dir.path());
        let data = pattern(5500, 1);

        write_streaming(&writer, &handle, "seq", &data, 300).await;
        assert_eq!(sealed_end(&writer).await, Some(5000), "whole parts are streamed while writing");
        assert!(handle.space.store.head(&object_path("seq").unwrap()).await.is_err(), "visible before flush");

        writer.upload(&handle, &handle.meta_target, "seq", &settings()).await.unwrap().unwrap();
        let (content, meta) = stored(&handle, "seq").await;
        assert!(content == data, "streamed content differs");
        assert_eq!(meta, writer.meta());
        assert!(!writer.is_dirty());
        assert_eq!(sealed_end(&writer).await, None);
    }

    #[tokio::test]
    async fn backwards_write_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let handle = memory_handle();
        let writer = new_writer(dir.path());
        let mut data = pattern(4200, 2);
        write_streaming(&writer, &handle, "back", &data, 700).await;
        assert_eq!(sealed_end(&writer).await, Some(4000));

        writer.write(10, b"header").await.unwrap();
        data[10..16].copy_from_slice(b"header");
        assert_eq!(sealed_end(&writer).await, None, "a write below the boundary drops the stream");
        assert!(!writer.should_start_stream(&settings()), "no new stream after a broken pattern");

        writer.upload(&handle, &handle.meta_target, "back", &settings()).await.unwrap().unwrap();
        assert!(stored(&handle, "back").await.0 == data, "content after a backwards write differs");
    }

    #[tokio::test]
    async fn rewrite_above_boundary_keeps_stream() {
        let dir = tempfile::tempdir().unwrap();
        let handle = memory_handle();
        let writer = new_writer(dir.path());
        let mut data = pattern(2500, 3);
        write_streaming(&writer, &handle, "tail", &data, 500).await;
        assert_eq!(sealed_end(&writer).await, Some(2000));

        writer.write(2100, b"tail").await.unwrap();
        data[2100..2104].copy_from_slice(b"tail");
        assert_eq!(sealed_end(&writer).await, Some(2000), "a write above the boundary keeps the stream");

        writer.upload(&handle, &handle.meta_target, "tail", &settings()).await.unwrap().unwrap();
        assert!(stored(&handle, "tail").await.0 == data);
    }

    #[tokio::test]
    async fn truncate_below_boundary_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let handle = memory_handle();
        let writer = new_writer(dir.path());
        let data = pattern(3000, 4);
        write_streaming(&writer, &handle, "trunc", &data, 1000).await;
        assert_eq!(sealed_end(&writer).await, Some(3000));

        writer.truncate(2500).await.unwrap();
        assert_eq!(sealed_end(&writer).await, None);
        writer.upload(&handle, &handle.meta_target, "trunc", &settings()).await.unwrap().unwrap();
        assert!(stored(&handle, "trunc").await.0 == data[..2500]);
    }

    #[tokio::test]
    async fn chmod_during_stream_keeps_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let handle = memory_handle();
        let writer = new_writer(dir.path());
        let data = pattern(2300, 5);
        write_streaming(&writer, &handle, "mode", &data, 1000).await;
        assert_eq!(sealed_end(&writer).await, Some(2000));

        writer.update_meta(|meta| meta.mode = Some(0o100600));
        writer.upload(&handle, &handle.meta_target, "mode", &settings()).await.unwrap().unwrap();
        let (content, meta) = stored(&handle, "mode").await;
        assert!(content == data);
        assert_eq!(meta.mode, Some(0o100600), "metadata changed during the stream is lost");
    }

    #[tokio::test]
    async fn stored_mtime_prevents_stream() {
        let dir = tempfile::tempdir().unwrap();
        let handle = memory_handle();
        let writer = new_writer(dir.path());
        writer.update_meta(|meta| meta.mtime = Some(SystemTime::UNIX_EPOCH));
        let data = pattern(2500, 9);
        write_streaming(&writer, &handle, "mtime", &data, 500).await;
        assert_eq!(sealed_end(&writer).await, None, "a stream started although every write changes the mtime");

        writer.upload(&handle, &handle.meta_target, "mtime", &settings()).await.unwrap().unwrap();
        let (content, meta) = stored(&handle, "mtime").await;
        assert!(content == data);
        assert_eq!(meta.mtime, writer.meta().mtime);
    }

    #[tokio::test]
    async fn renamed_key_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let handle = memory_handle();
        let writer = new_writer(dir.path());
        let data = pattern(2000, 6);
        write_streaming(&writer, &handle, "old", &data, 1000).await;
        assert_eq!(sealed_end(&writer).await, Some(2000));

        writer.upload(&handle, &handle.meta_target, "new", &settings()).await.unwrap().unwrap();
        assert!(stored(&handle, "new").await.0 == data);
        assert!(handle.space.store.head(&object_path("old").unwrap()).await.is_err(), "old key resurrected");
    }

    #[tokio::test]
    async fn unlink_drops_stream() {
        let dir = tempfile::tempdir().unwrap();
        let handle = memory_handle();
        let writer = new_writer(dir.path());
        write_streaming(&writer, &handle, "gone", &pattern(2500, 7), 500).await;
        assert_eq!(sealed_end(&writer).await, Some(2000));

        writer.mark_unlinked().await;
        assert_eq!(sealed_end(&writer).await, None);
        writer.write(2500, b"more").await.unwrap();
        assert!(!writer.should_start_stream(&settings()));
        assert!(writer.upload(&handle, &handle.meta_target, "gone", &settings()).await.unwrap().is_none());
        assert!(handle.space.store.head(&object_path("gone").unwrap()).await.is_err(), "unlinked file uploaded");
    }

    #[tokio::test]
    async fn writes_after_flush_stream_again() {
        let dir = tempfile::tempdir().unwrap();
        let handle = memory_handle();
        let writer = new_writer(dir.path());
        let data = pattern(4000, 8);
        write_streaming(&writer, &handle, "again", &data[..1500], 500).await;
        writer.upload(&handle, &handle.meta_target, "again", &settings()).await.unwrap().unwrap();
        assert_eq!(sealed_end(&writer).await, None);

        for offset in (1500..4000).step_by(500) {
            writer.write(offset as u64, &data[offset..offset + 500]).await.unwrap();
            if writer.should_start_stream(&settings()) {
                let path = object_path("again").unwrap();
                writer.start_stream(Arc::clone(&handle.space.store), path, &handle.meta_target, &settings()).await;
            }
        }
        assert_eq!(sealed_end(&writer).await, Some(4000), "the new stream starts again from offset 0");
        writer.upload(&handle, &handle.meta_target, "again", &settings()).await.unwrap().unwrap();
        assert!(stored(&handle, "again").await.0 == data);
    }
}
