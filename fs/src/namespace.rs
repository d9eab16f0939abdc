//! Directories over object keys: listings, lookups and directory markers.
//!
//! A directory is a common prefix (`dir/` followed by any key) or a zero-byte `dir/`
//! marker. When a key is both an object and a prefix (`foobar` and `foobar/foo`, or
//! `foo` and the marker `foo/`), the directory wins, whatever the upload order: the
//! name is listed once, as a directory, and the plain object is logged as shadowed. It
//! is never deleted or overwritten by the mount and stays readable through the store's
//! own API. Names that [`crate::name::is_listable`] rejects are skipped.

use std::collections::BTreeMap;
use std::path::PathBuf;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;

use crate::config::SpaceLocation;
use crate::error::{FsError, FsResult};
use crate::inode::Kind;
use crate::marker::MarkerClient;
use crate::metacache::{DirEntry, Entry, FileStat};
use crate::name::{child_key, is_listable};
use crate::posix_meta::{read_meta, MetaTarget};
use crate::store::Space;

/// An opened space and what the filesystem needs beside its `object_store` client.
#[derive(Debug)]
pub struct SpaceHandle {
    pub space: Space,
    /// `dir/` marker requests; `None` for spaces that are not S3.
    pub markers: Option<MarkerClient>,
    /// The directory of a `file://` space, whose directories are real directories.
    pub local_root: Option<PathBuf>,
    /// The key prefix inside the bucket, counted in the key length limit.
    pub key_prefix: String,
    /// The place where POSIX metadata of objects is kept.
    pub meta_target: MetaTarget,
}

impl SpaceHandle {
    pub fn new(space: Space) -> FsResult<Self> {
        let markers = MarkerClient::for_space(&space.config)?;
        let (local_root, key_prefix) = match &space.config.location {
            SpaceLocation::Local { root } => (Some(root.clone()), String::new()),
            SpaceLocation::S3 { prefix, .. } => (None, prefix.clone()),
            SpaceLocation::Memory => (None, String::new()),
        };
        let meta_target = MetaTarget::for_space(&space.config)
            .map_err(|err| FsError::io(format!("cannot open space {}: {err}", space.config.name)))?;
        Ok(SpaceHandle {
            space,
            markers,
            local_root,
            key_prefix,
            meta_target,
        })
    }

    pub fn name(&self) -> &str {
        &self.space.config.name
    }

    /// "space/key", for messages and logs.
    pub fn describe(&self, key: &str) -> String {
        format!("{}/{key}", self.name())
    }

    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.local_root.as_ref().map(|root| if key.is_empty() { root.clone() } else { root.join(key) })
    }
}

/// Returns the `object_store` path of a key, kept byte for byte (no percent-encoding).
pub fn object_path(key: &str) -> FsResult<ObjectPath> {
    ObjectPath::parse(key).map_err(|err| FsError::new(libc::EINVAL, format!("invalid object key {key:?}: {err}")))
}

fn dir_path(dir: &str) -> FsResult<Option<ObjectPath>> {
    if dir.is_empty() {
        Ok(None)
    } else {
        object_path(dir).map(Some)
    }
}

/// Lists one directory: every page of the store's listing, merged and sorted by name.
pub async fn list_dir(handle: &SpaceHandle, dir: &str) -> FsResult<Vec<DirEntry>> {
    Ok(list_dir_with_marker(handle, dir).await?.entries)
}

/// One directory's entries, and whether the listing showed the directory's own
/// `dir/` marker object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirListing {
    pub entries: Vec<DirEntry>,
    pub has_marker: bool,
}

/// Lists one directory like [`list_dir`] and also reports its marker, so that a
/// directory without one needs no marker HEAD for its metadata.
pub async fn list_dir_with_marker(handle: &SpaceHandle, dir: &str) -> FsResult<DirListing> {
    let prefix = dir_path(dir)?;
    let result = match handle.space.store.list_with_delimiter(prefix.as_ref()).await {
        Ok(result) => result,
        Err(object_store::Error::InvalidPath { source }) if handle.markers.is_some() => {
            tracing::debug!(space = handle.name(), dir, error = %source, "listing has keys object_store rejects; listing raw keys");
            let markers = handle.markers.as_ref().expect("checked above");
            return Ok(entries_from_raw(handle, dir, markers.list_dir_raw(dir).await?));
        }
        Err(err) => return Err(FsError::from_store(err, &handle.describe(dir))),
    };
    let mut has_marker = false;

    let mut entries: BTreeMap<String, DirEntry> = BTreeMap::new();
    for common in &result.common_prefixes {
        let Some(name) = common.filename() else { continue };
        if !is_listable(name) {
            tracing::debug!(prefix = %common, "skipping a prefix that is not a valid file name");
            continue;
        }
        entries.insert(
            name.to_string(),
            DirEntry {
                name: name.to_string(),
                kind: Kind::Dir,
                stat: None,
            },
        );
    }

    for meta in &result.objects {
        if prefix.as_ref() == Some(&meta.location) {
            has_marker = true; // the directory's own `dir/` marker
            continue;
        }
        let Some(name) = meta.location.filename() else { continue };
        if !is_listable(name) {
            tracing::debug!(key = %meta.location, "skipping an object whose name is not a valid file name");
            continue;
        }
        if entries.contains_key(name) {
            tracing::warn!(
                space = handle.name(),
                key = %meta.location,
                "object is shadowed by a directory of the same name; it stays in the store untouched"
            );
            continue;
        }
        entries.insert(
            name.to_string(),
            DirEntry {
                name: name.to_string(),
                kind: Kind::File,
                stat: Some(FileStat::from_meta(meta)),
            },
        );
    }
    Ok(DirListing { entries: entries.into_values().collect(), has_marker })
}

/// Builds a listing from raw keys with the same rules as [`list_dir`]: the directory
/// wins over an object of the same name, and names that cannot be POSIX names (such as
/// the empty segment of `a//b`) are skipped.
fn entries_from_raw(handle: &SpaceHandle, dir: &str, raw: crate::marker::RawListing) -> DirListing {
    let dir_prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
    let mut entries: BTreeMap<String, DirEntry> = BTreeMap::new();
    let mut has_marker = false;
    for prefix in &raw.prefixes {
        let name = prefix.strip_prefix(&dir_prefix).unwrap_or("").trim_end_matches('/');
        if !is_listable(name) || name.contains('/') {
            tracing::debug!(space = handle.name(), prefix = %prefix, "skipping a prefix that is not a valid file name");
            continue;
        }
        let entry = DirEntry { name: name.to_string(), kind: Kind::Dir, stat: None };
        entries.insert(name.to_string(), entry);
    }
    for object in raw.objects {
        let name = object.key.strip_prefix(&dir_prefix).unwrap_or("");
        if name.is_empty() {
            has_marker = true; // the directory's own `dir/` marker
            continue;
        }
        if !is_listable(name) || name.contains('/') || object_path(&object.key).is_err() {
            tracing::debug!(space = handle.name(), key = %object.key, "skipping an object whose key is not a valid path");
            continue;
        }
        if entries.contains_key(name) {
            tracing::warn!(space = handle.name(), key = %object.key, "object is shadowed by a directory of the same name; it stays in the store untouched");
            continue;
        }
        let stat = FileStat { size: object.size, mtime: object.last_modified, etag: object.e_tag, meta: None };
        entries.insert(name.to_string(), DirEntry { name: name.to_string(), kind: Kind::File, stat: Some(stat) });
    }
    DirListing { entries: entries.into_values().collect(), has_marker }
}

/// Finds out what `key` is with requests to the store (no cache).
pub async fn resolve(handle: &SpaceHandle, key: &str) -> FsResult<Entry> {
    if key.is_empty() {
        return Ok(Entry::Dir);
    }
    if let Some(path) = handle.local_path(key) {
        return resolve_local(handle, key, path).await;
    }

    let path = object_path(key)?;
    let store = &handle.space.store;
    let (head, first_child) = tokio::join!(head_file(handle, key), async {
        let mut children = store.list(Some(&path));
        children.next().await
    });

    match first_child {
        Some(Ok(_)) => return Ok(Entry::Dir),
        // A key below `key` exists even if `object_store` cannot represent it.
        Some(Err(object_store::Error::InvalidPath { .. })) => return Ok(Entry::Dir),
        Some(Err(err)) => return Err(FsError::from_store(err, &handle.describe(key))),
        None => {}
    }
    head
}

/// HEADs one object and decodes its POSIX metadata.
pub async fn head_file(handle: &SpaceHandle, key: &str) -> FsResult<Entry> {
    let path = object_path(key)?;
    match read_meta(&handle.space, &handle.meta_target, &path).await {
        Ok((object, meta)) => {
            let mut stat = FileStat::from_meta(&object);
            stat.meta = Some(std::sync::Arc::new(meta));
            Ok(Entry::File(stat))
        }
        Err(err) if err.is_not_found() => Ok(Entry::Missing),
        Err(crate::posix_meta::MetaError::Store(err)) => Err(FsError::from_store(err, &handle.describe(key))),
        Err(err) => Err(FsError::io(format!("{}: {err}", handle.describe(key)))),
    }
}

async fn resolve_local(handle: &SpaceHandle, key: &str, path: PathBuf) -> FsResult<Entry> {
    match tokio::fs::metadata(&path).await {
        Ok(meta) if meta.is_dir() => Ok(Entry::Dir),
        Ok(_) => head_file(handle, key).await,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Entry::Missing),
        Err(err) if err.raw_os_error() == Some(libc::ENOTDIR) => Ok(Entry::Missing),
        Err(err) => Err(FsError::from_io(err, &handle.describe(key))),
    }
}

/// True when the directory `dir` has no entry besides its own marker.
pub async fn is_dir_empty(handle: &SpaceHandle, dir: &str) -> FsResult<bool> {
    if let Some(path) = handle.local_path(dir) {
        let mut entries = tokio::fs::read_dir(&path)
            .await
            .map_err(|err| FsError::from_io(err, &handle.describe(dir)))?;
        let first = entries
            .next_entry()
            .await
            .map_err(|err| FsError::from_io(err, &handle.describe(dir)))?;
        return Ok(first.is_none());
    }

    if let Some(markers) = &handle.markers {
        return Ok(!markers.has_entries(dir).await?);
    }

    let path = object_path(dir)?;
    let mut children = handle.space.store.list(Some(&path));
    while let Some(item) = children.next().await {
        let meta = match item {
            Ok(meta) => meta,
            Err(object_store::Error::InvalidPath { .. }) => return Ok(false),
            Err(err) => return Err(FsError::from_store(err, &handle.describe(dir))),
        };
        if meta.location != path {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Creates an empty directory: a real directory in a local space, a `dir/` marker in S3.
pub async fn make_dir(handle: &SpaceHandle, dir: &str) -> FsResult<()> {
    if let Some(path) = handle.local_path(dir) {
        return match tokio::fs::create_dir(&path).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(err) => Err(FsError::from_io(err, &handle.describe(dir))),
        };
    }
    match &handle.markers {
        Some(markers) => markers.put_marker(dir).await,
        None => Ok(()), // in-memory spaces have implicit directories only
    }
}

/// Removes an empty directory (its marker, or the local directory).
pub async fn remove_dir(handle: &SpaceHandle, dir: &str) -> FsResult<()> {
    if let Some(path) = handle.local_path(dir) {
        return tokio::fs::remove_dir(&path)
            .await
            .map_err(|err| FsError::from_io(err, &handle.describe(dir)));
    }
    match &handle.markers {
        Some(markers) => markers.delete_marker(dir).await,
        None => Ok(()),
    }
}

/// Keeps `dir` as a directory after its last entry went away, by writing a marker.
/// Local directories persist by themselves.
pub async fn keep_dir(handle: &SpaceHandle, dir: &str) -> FsResult<()> {
    if dir.is_empty() || handle.local_root.is_some() || handle.markers.is_none() {
        return Ok(());
    }
    if is_dir_empty(handle, dir).await? {
        make_dir(handle, dir).await?;
    }
    Ok(())
}

/// Lists every object below `dir` recursively (for directory renames).
pub async fn list_tree(handle: &SpaceHandle, dir: &str) -> FsResult<Vec<object_store::ObjectMeta>> {
    let path = object_path(dir)?;
    let mut items = handle.space.store.list(Some(&path));
    let mut out = Vec::new();
    while let Some(item) = items.next().await {
        out.push(item.map_err(|err| FsError::from_store(err, &handle.describe(dir)))?);
    }
    Ok(out)
}

/// Returns the key of `name` below `dir`, for callers that build keys.
pub fn key_of(dir: &str, name: &str) -> String {
    child_key(dir, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use object_store::{ObjectStoreExt, PutPayload};

    fn memory_space() -> SpaceHandle {
        let config = Config::parse("[spaces.m]\nurl = \"memory://\"\n", std::path::Path::new("t.toml")).unwrap();
        SpaceHandle::new(crate::store::open_space(&config.spaces["m"]).unwrap()).unwrap()
    }

    async fn put(handle: &SpaceHandle, key: &str, data: &'static [u8]) {
        let path = object_path(key).unwrap();
        handle.space.store.put(&path, PutPayload::from_static(data)).await.unwrap();
    }

    #[tokio::test]
    async fn directory_wins_over_object() {
        let handle = memory_space();
        put(&handle, "foobar", b"file").await;
        put(&handle, "foobar/foo", b"child").await;
        let entries = list_dir(&handle, "").await.unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].name, "foobar");
        assert_eq!(entries[0].kind, Kind::Dir);
        assert_eq!(resolve(&handle, "foobar").await.unwrap(), Entry::Dir);
    }

    #[tokio::test]
    async fn names_kept_byte_for_byte() {
        let handle = memory_space();
        for key in ["a b.txt", "a+b.txt", "caf\u{e9}.txt", "cafe\u{301}.txt", "100%", "#x"] {
            put(&handle, key, b"x").await;
        }
        let names: Vec<String> = list_dir(&handle, "").await.unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names.len(), 6);
        assert!(names.contains(&"a b.txt".to_string()));
        assert!(names.contains(&"a+b.txt".to_string()));
        assert!(names.contains(&"caf\u{e9}.txt".to_string()));
        assert!(names.contains(&"cafe\u{301}.txt".to_string()));
        assert!(names.contains(&"100%".to_string()));
    }

    #[tokio::test]
    async fn missing_key_resolves_missing() {
        let handle = memory_space();
        assert_eq!(resolve(&handle, "nope").await.unwrap(), Entry::Missing);
        put(&handle, "d/f", b"x").await;
        assert!(!is_dir_empty(&handle, "d").await.unwrap());
        assert!(matches!(resolve(&handle, "d/f").await.unwrap(), Entry::File(_)));
    }

    #[tokio::test]
    async fn local_empty_directory_listed() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("[spaces.l]\nurl = \"file://{}\"\n", dir.path().display());
        let config = Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        let handle = SpaceHandle::new(crate::store::open_space(&config.spaces["l"]).unwrap()).unwrap();
        make_dir(&handle, "empty").await.unwrap();
        let entries = list_dir(&handle, "").await.unwrap();
        assert_eq!(entries, vec![DirEntry { name: "empty".into(), kind: Kind::Dir, stat: None }]);
        assert_eq!(resolve(&handle, "empty").await.unwrap(), Entry::Dir);
        assert!(is_dir_empty(&handle, "empty").await.unwrap());
        remove_dir(&handle, "empty").await.unwrap();
        assert_eq!(resolve(&handle, "empty").await.unwrap(), Entry::Missing);
    }
}
