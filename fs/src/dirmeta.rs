//! POSIX metadata of directories in S3 spaces, stored on the `dir/` marker object.
//!
//! s3fs keeps a directory's mode, owner and mtime as `x-amz-meta-*` keys of its marker,
//! and so does this module ([`crate::marker::MarkerClient`] writes and reads them).
//! Setting metadata on a directory that exists only as a common prefix creates its
//! marker. Values are cached for the metadata TTL; a failed HEAD is logged and shows
//! the space defaults without being cached. Local spaces keep metadata on the real
//! directory and in-memory spaces keep none, so both read as defaults here.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::error::FsResult;
use crate::namespace::SpaceHandle;
use crate::posix_meta::{PosixMeta, S_IFDIR};

/// Upper bound of cached directories.
const MAX_ENTRIES: u64 = 200_000;

pub struct DirMeta {
    cache: Option<Cache<(usize, String), Arc<PosixMeta>>>,
}

impl DirMeta {
    pub fn new(ttl: Duration) -> DirMeta {
        let cache = (!ttl.is_zero()).then(|| Cache::builder().max_capacity(MAX_ENTRIES).time_to_live(ttl).build());
        DirMeta { cache }
    }

    /// Returns the stored metadata of directory `key` (empty when none is stored).
    pub async fn get(&self, handle: &SpaceHandle, space: usize, key: &str) -> PosixMeta {
        let Some(markers) = handle.markers.as_ref().filter(|_| !key.is_empty()) else {
            return PosixMeta::default();
        };
        if let Some(cached) = self.cache.as_ref().and_then(|c| c.get(&(space, key.to_string()))) {
            return (*cached).clone();
        }

        let meta = match markers.head_marker(key).await {
            Ok(Some(map)) => PosixMeta::from_map(map.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
            Ok(None) => PosixMeta::default(),
            Err(err) => {
                tracing::warn!(directory = %handle.describe(key), error = %err, "cannot read directory metadata; showing defaults");
                return PosixMeta::default();
            }
        };
        self.remember(space, key, &meta);
        meta
    }

    /// Stores `meta` on the marker of directory `key`, creating the marker if needed.
    /// A no-op for spaces without markers.
    pub async fn set(&self, handle: &SpaceHandle, space: usize, key: &str, meta: &PosixMeta) -> FsResult<()> {
        let Some(markers) = handle.markers.as_ref().filter(|_| !key.is_empty()) else {
            return Ok(());
        };
        let mut meta = meta.clone();
        meta.mode = meta.mode.map(|mode| S_IFDIR | (mode & 0o7777));
        markers.put_marker_with_meta(key, &meta.to_map()).await?;
        self.remember(space, key, &meta);
        Ok(())
    }

    /// Forgets cached values of `key` (after rmdir or rename).
    pub fn invalidate(&self, space: usize, key: &str) {
        if let Some(cache) = &self.cache {
            cache.invalidate(&(space, key.to_string()));
        }
    }

    fn remember(&self, space: usize, key: &str, meta: &PosixMeta) {
        if let Some(cache) = &self.cache {
            cache.insert((space, key.to_string()), Arc::new(meta.clone()));
        }
    }
}
