//! Uploads of whole objects: a local file as one object, metadata rewrites and renames.
//!
//! A file below [`UploadSettings::multipart_threshold_bytes`] goes up in one PUT; a larger
//! one as a multipart upload whose parts are sent in parallel, at most
//! [`UploadSettings::max_concurrency`] at a time. Invariant: an upload either completes or
//! is aborted, so no error path leaves an incomplete multipart upload in the store. A
//! killed process can leave one, and only the store's lifecycle rules clean it up.
//!
//! Renames use the store's server-side copy then delete. S3 `CopyObject` is limited to
//! 5 GiB, so a larger S3 object is copied server-side with `UploadPartCopy`
//! ([`crate::part_copy`]). Other stores, and S3 servers that reject `UploadPartCopy`,
//! get a copy through this process: ranged GETs (pinned to the source ETag) feed a
//! multipart PUT. The source is deleted after the copy.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, GetOptions, GetRange, MultipartUpload, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions,
    PutPayload, PutResult,
};

use crate::config::SpaceLocation;
use crate::part_copy::{CopyRequest, PartCopyClient, PartCopyError};
use crate::posix_meta::{MetaTarget, PosixMeta};
use crate::store::Space;

/// The largest object S3 `CopyObject` accepts.
pub const S3_COPY_LIMIT_BYTES: u64 = 5 << 30;

/// Sizes and parallelism of uploads.
#[derive(Debug, Clone)]
pub struct UploadSettings {
    /// Files of at least this size use a multipart upload.
    pub multipart_threshold_bytes: u64,
    /// Size of each part but the last; S3 requires at least 5 MiB.
    pub part_size_bytes: u64,
    /// Parts in flight at once for one upload.
    pub max_concurrency: usize,
    /// Objects above this size are renamed by a streamed multipart copy instead of one
    /// server-side copy.
    pub copy_limit_bytes: u64,
}

impl Default for UploadSettings {
    fn default() -> Self {
        UploadSettings {
            multipart_threshold_bytes: 16 << 20,
            part_size_bytes: 16 << 20,
            max_concurrency: 8,
            copy_limit_bytes: S3_COPY_LIMIT_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Store(#[from] object_store::Error),

    #[error("cannot read staging file for {path}: {source}")]
    Read { path: String, source: std::io::Error },

    #[error("cannot store metadata of {path}: {source}")]
    LocalMeta { path: String, source: std::io::Error },

    #[error("{path} changed size while being copied (expected {expected} bytes)")]
    SourceChanged { path: String, expected: u64 },

    #[error("streamed upload of {path} stopped unexpectedly")]
    StreamStopped { path: String },
}

impl UploadError {
    /// Maps the error to the errno of a FUSE reply (ENOENT for a missing source, EACCES
    /// when denied, the I/O error's own errno, else EIO).
    pub fn errno(&self) -> i32 {
        match self {
            UploadError::Store(object_store::Error::NotFound { .. }) => libc::ENOENT,
            UploadError::Store(object_store::Error::PermissionDenied { .. }) => libc::EACCES,
            UploadError::Read { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

/// Uploads the first `len` bytes of `file` as `path` with `meta`.
pub async fn upload_file(
    space: &Space,
    target: &MetaTarget,
    path: &ObjectPath,
    file: Arc<File>,
    len: u64,
    meta: &PosixMeta,
    settings: &UploadSettings,
) -> Result<PutResult, UploadError> {
    let attributes = target.put_attributes(meta);
    let source = FileSource { file, path: path.to_string() };

    let result = if len < settings.multipart_threshold_bytes {
        let bytes = source.read(0, len).await?;
        let options = PutOptions { attributes, ..PutOptions::default() };
        space.store.put_opts(path, PutPayload::from_bytes(bytes), options).await?
    } else {
        upload_parts(space.store.as_ref(), path, attributes, len, settings, |range| {
            let source = source.clone();
            async move { source.read(range.start, range.end - range.start).await }
        })
        .await?
    };

    target
        .apply_after_put(path, meta)
        .map_err(|source| UploadError::LocalMeta { path: path.to_string(), source })?;
    tracing::debug!(%path, len, "uploaded");
    Ok(result)
}

/// Rewrites an existing object with `meta` merged into its attributes, keeping content
/// and foreign attributes.
pub async fn rewrite_with_meta(
    space: &Space,
    path: &ObjectPath,
    meta: &PosixMeta,
    settings: &UploadSettings,
) -> Result<PutResult, UploadError> {
    let head = space.store.get_opts(path, GetOptions::new().with_head(true)).await?;
    let mut attributes = head.attributes;
    meta.merge_into(&mut attributes);
    copy_through_client(space.store.as_ref(), path, path, &head.meta, attributes, settings).await
}

/// Renames one object: server-side copy and delete up to
/// [`UploadSettings::copy_limit_bytes`], a streamed multipart copy above it. Attributes
/// (the POSIX metadata) travel with the object in both cases.
pub async fn rename_object(
    space: &Space,
    from: &ObjectPath,
    to: &ObjectPath,
    settings: &UploadSettings,
) -> Result<(), UploadError> {
    let head = space.store.get_opts(from, GetOptions::new().with_head(true)).await?;
    if head.meta.size <= settings.copy_limit_bytes {
        space.store.rename(from, to).await?;
        return Ok(());
    }

    if matches!(space.config.location, SpaceLocation::S3 { .. }) {
        match copy_parts_on_server(space, from, to, &head.meta, &head.attributes, settings).await {
            Ok(()) => {
                space.store.delete(from).await?;
                return Ok(());
            }
            Err(err) => tracing::warn!(%from, %to, error = %err, "server-side multipart copy failed; copying through this host"),
        }
    }

    tracing::info!(%from, %to, size = head.meta.size, "renaming by streamed multipart copy");
    copy_through_client(space.store.as_ref(), from, to, &head.meta, head.attributes, settings).await?;
    space.store.delete(from).await?;
    Ok(())
}

/// Copies a large S3 object with `UploadPartCopy`, keeping its user metadata and
/// content type.
async fn copy_parts_on_server(
    space: &Space,
    from: &ObjectPath,
    to: &ObjectPath,
    source: &object_store::ObjectMeta,
    attributes: &Attributes,
    settings: &UploadSettings,
) -> Result<(), PartCopyError> {
    let client = PartCopyClient::for_space(&space.config)?;
    let mut user_meta = std::collections::BTreeMap::new();
    let mut content_type = None;
    for (key, value) in attributes.iter() {
        match key {
            Attribute::Metadata(name) => {
                user_meta.insert(name.to_string(), value.to_string());
            }
            Attribute::ContentType => content_type = Some(value.to_string()),
            _ => {}
        }
    }
    tracing::info!(%from, %to, size = source.size, "renaming by server-side multipart copy");
    let request = CopyRequest {
        from: from.as_ref(),
        to: to.as_ref(),
        size_bytes: source.size,
        e_tag: source.e_tag.as_deref(),
        user_meta,
        content_type,
    };
    client.copy(&request, settings.part_size_bytes, settings.max_concurrency).await
}

/// Copies `from` to `to` with `attributes` by reading it through this process, pinned to
/// the ETag of `source_meta` so that a concurrent overwrite fails the copy instead of
/// mixing two versions.
async fn copy_through_client(
    store: &dyn ObjectStore,
    from: &ObjectPath,
    to: &ObjectPath,
    source_meta: &object_store::ObjectMeta,
    attributes: Attributes,
    settings: &UploadSettings,
) -> Result<PutResult, UploadError> {
    let size = source_meta.size;
    let e_tag = source_meta.e_tag.clone();
    let fetch = |range: std::ops::Range<u64>| {
        let e_tag = e_tag.clone();
        async move { fetch_range(store, from, range, e_tag, size).await }
    };

    if size < settings.multipart_threshold_bytes {
        let bytes = if size == 0 { Bytes::new() } else { fetch(0..size).await? };
        let options = PutOptions { attributes, ..PutOptions::default() };
        return Ok(store.put_opts(to, PutPayload::from_bytes(bytes), options).await?);
    }
    upload_parts(store, to, attributes, size, settings, fetch).await
}

async fn fetch_range(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    range: std::ops::Range<u64>,
    e_tag: Option<String>,
    expected_size: u64,
) -> Result<Bytes, UploadError> {
    let wanted = range.end - range.start;
    let options = GetOptions {
        if_match: e_tag,
        range: Some(GetRange::Bounded(range)),
        ..GetOptions::default()
    };
    let bytes = store.get_opts(path, options).await?.bytes().await?;
    if bytes.len() as u64 != wanted {
        return Err(UploadError::SourceChanged { path: path.to_string(), expected: expected_size });
    }
    Ok(bytes)
}

/// Runs one multipart upload of `len` bytes whose parts come from `read_part`, with at
/// most `max_concurrency` parts in flight. Aborts the upload on any error.
async fn upload_parts<F, Fut>(
    store: &dyn ObjectStore,
    path: &ObjectPath,
    attributes: Attributes,
    len: u64,
    settings: &UploadSettings,
    read_part: F,
) -> Result<PutResult, UploadError>
where
    F: Fn(std::ops::Range<u64>) -> Fut,
    Fut: std::future::Future<Output = Result<Bytes, UploadError>>,
{
    let options = PutMultipartOptions { attributes, ..PutMultipartOptions::default() };
    let mut upload = store.put_multipart_opts(path, options).await?;

    match send_parts(upload.as_mut(), len, settings, read_part).await {
        Ok(()) => match upload.complete().await {
            Ok(result) => Ok(result),
            Err(err) => {
                abort(upload.as_mut(), path).await;
                Err(err.into())
            }
        },
        Err(err) => {
            abort(upload.as_mut(), path).await;
            Err(err)
        }
    }
}

async fn send_parts<F, Fut>(
    upload: &mut dyn MultipartUpload,
    len: u64,
    settings: &UploadSettings,
    read_part: F,
) -> Result<(), UploadError>
where
    F: Fn(std::ops::Range<u64>) -> Fut,
    Fut: std::future::Future<Output = Result<Bytes, UploadError>>,
{
    let part_size = settings.part_size_bytes.max(1);
    let max_in_flight = settings.max_concurrency.max(1);
    let mut in_flight = FuturesUnordered::new();
    let mut offset = 0;

    while offset < len {
        while in_flight.len() >= max_in_flight {
            in_flight.next().await.expect("set is not empty")?;
        }

        let end = (offset + part_size).min(len);
        let bytes = read_part(offset..end).await?;
        in_flight.push(upload.put_part(PutPayload::from_bytes(bytes)));
        offset = end;
    }

    while let Some(result) = in_flight.next().await {
        result?;
    }
    Ok(())
}

async fn abort(upload: &mut dyn MultipartUpload, path: &ObjectPath) {
    match upload.abort().await {
        Ok(()) => tracing::info!(%path, "aborted multipart upload"),
        Err(err) => tracing::error!(%path, error = %err, "cannot abort multipart upload; its parts stay until the store's lifecycle rules remove them"),
    }
}

/// A staging file read in blocking tasks, so that disk reads never stall the runtime.
#[derive(Clone)]
pub(crate) struct FileSource {
    file: Arc<File>,
    path: String,
}

impl FileSource {
    /// Reads from `file`, which `path` names in errors.
    pub(crate) fn new(file: Arc<File>, path: String) -> FileSource {
        FileSource { file, path }
    }

    pub(crate) async fn read(&self, offset: u64, len: u64) -> Result<Bytes, UploadError> {
        let file = Arc::clone(&self.file);
        let read = tokio::task::spawn_blocking(move || {
            let mut buffer = vec![0u8; len as usize];
            file.read_exact_at(&mut buffer, offset).map(|()| Bytes::from(buffer))
        })
        .await
        .map_err(|err| std::io::Error::other(err.to_string()))
        .and_then(|result| result);
        read.map_err(|source| UploadError::Read { path: self.path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use object_store::memory::InMemory;
    use std::io::Write;

    fn memory_space() -> Space {
        let config = Config::parse("[spaces.m]\nurl = \"memory://\"\n", std::path::Path::new("t.toml")).unwrap();
        Space { config: config.spaces["m"].clone(), store: Arc::new(InMemory::new()) }
    }

    fn small_settings() -> UploadSettings {
        UploadSettings {
            multipart_threshold_bytes: 1000,
            part_size_bytes: 300,
            max_concurrency: 3,
            copy_limit_bytes: 2000,
        }
    }

    fn staging_file(content: &[u8]) -> Arc<File> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(content).unwrap();
        Arc::new(file)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    async fn content(space: &Space, path: &str) -> Vec<u8> {
        space.store.get(&ObjectPath::from(path)).await.unwrap().bytes().await.unwrap().to_vec()
    }

    #[tokio::test]
    async fn small_and_multipart_uploads_round_trip() {
        let space = memory_space();
        let meta = PosixMeta { mode: Some(0o100600), ..PosixMeta::default() };
        for len in [0usize, 999, 1000, 2501] {
            let data = pattern(len);
            let path = ObjectPath::from(format!("f{len}"));
            let file = staging_file(&data);
            upload_file(&space, &MetaTarget::ObjectAttributes, &path, file, len as u64, &meta, &small_settings())
                .await
                .unwrap();
            assert_eq!(content(&space, path.as_ref()).await, data, "len {len}");
            let head = space.store.get_opts(&path, GetOptions::new().with_head(true)).await.unwrap();
            assert_eq!(PosixMeta::from_attributes(&head.attributes), meta);
        }
    }

    #[tokio::test]
    async fn upload_uses_only_len_bytes() {
        let space = memory_space();
        let path = ObjectPath::from("short");
        let file = staging_file(&pattern(5000));
        upload_file(&space, &MetaTarget::ObjectAttributes, &path, file, 1500, &PosixMeta::default(), &small_settings())
            .await
            .unwrap();
        assert_eq!(content(&space, "short").await, pattern(1500));
    }

    #[tokio::test]
    async fn failed_read_leaves_no_object() {
        let space = memory_space();
        let path = ObjectPath::from("broken");
        // The file is shorter than the requested length, so a part read fails midway.
        let file = staging_file(&pattern(1200));
        let err = upload_file(&space, &MetaTarget::ObjectAttributes, &path, file, 4000, &PosixMeta::default(), &small_settings())
            .await
            .unwrap_err();
        assert!(matches!(err, UploadError::Read { .. }), "{err}");
        assert!(space.store.head(&path).await.is_err());
    }

    #[tokio::test]
    async fn rename_small_and_large_keeps_metadata() {
        let space = memory_space();
        let meta = PosixMeta { uid: Some(42), ..PosixMeta::default() };
        for len in [10usize, 1500, 4500] {
            let data = pattern(len);
            let from = ObjectPath::from(format!("a/{len}"));
            let to = ObjectPath::from(format!("b/{len}"));
            upload_file(&space, &MetaTarget::ObjectAttributes, &from, staging_file(&data), len as u64, &meta, &small_settings())
                .await
                .unwrap();
            rename_object(&space, &from, &to, &small_settings()).await.unwrap();
            assert_eq!(content(&space, to.as_ref()).await, data, "len {len}");
            assert!(space.store.head(&from).await.is_err(), "source of {len} still exists");
            let head = space.store.get_opts(&to, GetOptions::new().with_head(true)).await.unwrap();
            assert_eq!(PosixMeta::from_attributes(&head.attributes), meta);
        }
    }

    #[tokio::test]
    async fn rewrite_changes_only_metadata() {
        let space = memory_space();
        let path = ObjectPath::from("r");
        let data = pattern(3000);
        upload_file(&space, &MetaTarget::ObjectAttributes, &path, staging_file(&data), 3000, &PosixMeta::default(), &small_settings())
            .await
            .unwrap();
        let meta = PosixMeta { mode: Some(0o100700), ..PosixMeta::default() };
        rewrite_with_meta(&space, &path, &meta, &small_settings()).await.unwrap();
        assert_eq!(content(&space, "r").await, data);
        let head = space.store.get_opts(&path, GetOptions::new().with_head(true)).await.unwrap();
        assert_eq!(PosixMeta::from_attributes(&head.attributes), meta);
    }

    #[tokio::test]
    async fn local_space_gets_metadata_in_xattr() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("[spaces.l]\nurl = \"file://{}\"\n", dir.path().display());
        let config = Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        let space = crate::store::open_space(&config.spaces["l"]).unwrap();
        let target = MetaTarget::for_space(&space.config).unwrap();
        let meta = PosixMeta { mode: Some(0o100751), ..PosixMeta::default() };
        let path = ObjectPath::from("d/x y");
        upload_file(&space, &target, &path, staging_file(b"hello"), 5, &meta, &small_settings()).await.unwrap();
        let (object, read) = crate::posix_meta::read_meta(&space, &target, &path).await.unwrap();
        assert_eq!(object.size, 5);
        assert_eq!(read, meta);
    }
}
