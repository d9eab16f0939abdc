//! POSIX metadata of directories in S3 spaces, stored on the `dir/` marker object.
//!
//! s3fs keeps a directory's mode, owner and mtime as `x-amz-meta-*` keys of its marker,
//! and so does this module ([`crate::marker::MarkerClient`] writes and reads them).
//! Setting metadata on a directory that exists only as a common prefix creates its
//! marker. Values are cached for the metadata TTL; a failed HEAD is logged and shows
//! the space defaults without being cached. Local spaces keep metadata on the real
//! directory and in-memory spaces keep none, so both read as defaults here.
//!
//! At most one marker HEAD per directory is in flight, and later callers share it. A
//! HEAD or listing that started before this mount changed the directory's metadata is
//! not remembered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;

use crate::error::FsResult;
use crate::inflight::InFlight;
use crate::namespace::SpaceHandle;
use crate::posix_meta::{PosixMeta, S_IFDIR};

/// Upper bound of cached directories.
const MAX_ENTRIES: u64 = 200_000;

/// How long a change made through this mount is remembered, so that the results of
/// requests that started before it are not cached. Longer than a request with its retries.
const CHANGE_MEMORY: Duration = Duration::from_secs(600);

type DirKey = (usize, String);

/// The directory metadata cache; clones share it.
#[derive(Clone)]
pub struct DirMeta {
    cache: Option<Cache<DirKey, Arc<PosixMeta>>>,
    /// When this mount last set or dropped the metadata of each directory.
    changed: Cache<DirKey, Instant>,
    /// Marker HEADs in flight; `None` means the HEAD failed.
    heads: InFlight<DirKey, Option<PosixMeta>>,
}

impl DirMeta {
    pub fn new(ttl: Duration) -> DirMeta {
        let cache = (!ttl.is_zero()).then(|| Cache::builder().max_capacity(MAX_ENTRIES).time_to_live(ttl).build());
        let changed = Cache::builder().max_capacity(MAX_ENTRIES).time_to_live(CHANGE_MEMORY).build();
        DirMeta { cache, changed, heads: InFlight::default() }
    }

    /// Returns the stored metadata of directory `key` (empty when none is stored).
    pub async fn get(&self, handle: &Arc<SpaceHandle>, space: usize, key: &str) -> PosixMeta {
        if handle.markers.is_none() || key.is_empty() {
            return PosixMeta::default();
        }
        if let Some(cached) = self.cached(space, key) {
            return cached;
        }

        let requested_at = Instant::now();
        let request_handle = Arc::clone(handle);
        let owned = key.to_string();
        let head = async move {
            let markers = request_handle.markers.as_ref().expect("checked above");
            match markers.head_marker(&owned).await {
                Ok(Some(map)) => Some(PosixMeta::from_map(map.iter().map(|(k, v)| (k.as_str(), v.as_str())))),
                Ok(None) => Some(PosixMeta::default()),
                Err(err) => {
                    tracing::warn!(directory = %request_handle.describe(&owned), error = %err, "cannot read directory metadata; showing defaults");
                    None
                }
            }
        };
        let Some(meta) = self.heads.run((space, key.to_string()), head).await else {
            return PosixMeta::default();
        };
        if !self.changed_since(space, key, requested_at) {
            self.remember(space, key, &meta);
        }
        meta
    }

    /// Returns the cached metadata of directory `key` without any request.
    pub fn cached(&self, space: usize, key: &str) -> Option<PosixMeta> {
        let cached = self.cache.as_ref()?.get(&(space, key.to_string()))?;
        Some((*cached).clone())
    }

    /// Records that a listing of directory `key`, requested at `requested_at`, showed
    /// no marker, so the directory has no stored metadata and needs no marker HEAD.
    /// A cached value is kept, and nothing is recorded when this mount changed the
    /// directory since the listing started.
    pub fn note_no_marker(&self, space: usize, key: &str, requested_at: Instant) {
        let Some(cache) = &self.cache else { return };
        if key.is_empty() || self.changed_since(space, key, requested_at) {
            return;
        }
        cache.entry((space, key.to_string())).or_insert_with(|| Arc::new(PosixMeta::default()));
    }

    /// Stores `meta` on the marker of directory `key`, creating the marker if needed.
    /// A no-op for spaces without markers.
    pub async fn set(&self, handle: &SpaceHandle, space: usize, key: &str, meta: &PosixMeta) -> FsResult<()> {
        let Some(markers) = handle.markers.as_ref().filter(|_| !key.is_empty()) else {
            return Ok(());
        };
        let mut meta = meta.clone();
        meta.mode = meta.mode.map(|mode| S_IFDIR | (mode & 0o7777));
        self.mark_changed(space, key);
        markers.put_marker_with_meta(key, &meta.to_map()).await?;
        self.mark_changed(space, key);
        self.remember(space, key, &meta);
        Ok(())
    }

    /// Forgets cached values of `key` (after rmdir or rename).
    pub fn invalidate(&self, space: usize, key: &str) {
        self.mark_changed(space, key);
        if let Some(cache) = &self.cache {
            cache.invalidate(&(space, key.to_string()));
        }
    }

    fn mark_changed(&self, space: usize, key: &str) {
        let dir_key = (space, key.to_string());
        self.changed.insert(dir_key.clone(), Instant::now());
        self.heads.cancel(&dir_key);
    }

    fn changed_since(&self, space: usize, key: &str, requested_at: Instant) -> bool {
        self.changed.get(&(space, key.to_string())).is_some_and(|at| at >= requested_at)
    }

    fn remember(&self, space: usize, key: &str, meta: &PosixMeta) {
        if let Some(cache) = &self.cache {
            cache.insert((space, key.to_string()), Arc::new(meta.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_marker_note_keeps_cached_value() {
        let dirs = DirMeta::new(Duration::from_secs(60));
        let stored = PosixMeta { mode: Some(S_IFDIR | 0o700), ..PosixMeta::default() };
        dirs.remember(0, "d", &stored);
        dirs.note_no_marker(0, "d", Instant::now());
        assert_eq!(dirs.cached(0, "d").unwrap().mode, Some(S_IFDIR | 0o700));

        dirs.note_no_marker(0, "e", Instant::now());
        assert!(dirs.cached(0, "e").unwrap().is_empty(), "a directory without marker has no stored metadata");
    }

    #[test]
    fn listing_before_change_not_noted() {
        let dirs = DirMeta::new(Duration::from_secs(60));
        let requested_at = Instant::now();
        dirs.invalidate(0, "d");
        dirs.note_no_marker(0, "d", requested_at);
        assert!(dirs.cached(0, "d").is_none(), "the listing started before the change");
    }
}
