//! Directory listings and walk-ahead: listings shared while in flight, the POSIX
//! metadata of listed entries read in the background, and subdirectories listed before
//! the kernel opens them, so a tree walk such as `find` or `ls -lR` finds warm caches.
//!
//! Everything read ahead goes into the same caches as a request the kernel waits for,
//! with the same TTL, so nothing is served longer than without walk-ahead.
//!
//! Background requests are bounded. At most [`META_HEAD_CONCURRENCY`] background HEADs
//! and [`WALK_AHEAD_LISTINGS`] background LISTs are in flight over the whole mount.
//! tokio's semaphore grants permits in request order, so the directory the kernel
//! reads is served before the ones listed ahead of it, and requests the kernel waits
//! for take no permit at all. Below one directory that the kernel opened, at most
//! [`WALK_AHEAD_DIRS`] subdirectories past the last one it opened are listed ahead,
//! at most [`WALK_AHEAD_LISTINGS`] of them at a time, and none once
//! [`WALK_AHEAD_MAX_ENTRIES`] entries listed ahead wait unopened. Walk-ahead never
//! recurses on its own: only a directory the kernel opens starts it.
//!
//! Listing ahead costs one LIST per directory, but reading metadata costs one HEAD per
//! entry. So directories listed ahead get the metadata of their entries read ahead
//! only once the kernel descended into one of their siblings. A tree walk does that,
//! and a plain `ls` of the parent does not. Directories with more than
//! [`WALK_AHEAD_MAX_ENTRIES`] files get it only when the kernel opens them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use moka::sync::Cache;
use tokio::sync::Semaphore;

use crate::dirmeta::DirMeta;
use crate::error::FsResult;
use crate::inflight::InFlight;
use crate::inode::Kind;
use crate::metacache::{Entry, Listing, MetaCache};
use crate::name::child_key;
use crate::namespace::{self, SpaceHandle};

/// Background HEAD requests in flight at once over the whole mount. On a 2-core VM
/// shared with builds, Garage 2.5 served 5,000 HEADs from a tokio client at 2,000 to
/// 5,400 per second, with no consistent gain from 8 to 128 in flight. There the
/// server's CPU sets the rate, not this limit.
pub const META_HEAD_CONCURRENCY: usize = 32;

/// Minimum time between two background HEADs of the same key after listings.
pub const META_HEAD_REPEAT: Duration = Duration::from_secs(30);

/// Listings with more files than this get no metadata read-ahead.
const META_HEAD_MAX_FILES: usize = 20_000;

/// Background LISTs of subdirectories in flight at once over the whole mount, and
/// below one parent.
pub const WALK_AHEAD_LISTINGS: usize = 4;

/// Subdirectories listed ahead of the last one the kernel opened in the same parent.
pub const WALK_AHEAD_DIRS: usize = 16;

/// Entries of directories listed ahead but not opened yet, per parent, above which no
/// further subdirectory is listed ahead. Also the largest file count of a directory
/// listed ahead whose metadata is read before the kernel opens it.
pub const WALK_AHEAD_MAX_ENTRIES: usize = 4_096;

/// Parents whose walk-ahead state is kept.
const MAX_WALKS: u64 = 10_000;

/// How long the walk-ahead state of a parent lives after its last use.
const WALK_IDLE: Duration = Duration::from_secs(60);

type DirKey = (usize, String);

/// Walk-ahead progress below one directory that the kernel opened.
#[derive(Debug)]
struct Walk {
    /// Subdirectory names in listing order.
    subdirs: Vec<String>,
    /// Index past the last subdirectory the kernel opened.
    opened: usize,
    /// Index of the next subdirectory to list ahead.
    next: usize,
    /// Listings ahead in flight.
    listings_in_flight: usize,
    /// True once the kernel opened a subdirectory, so the walk reads metadata ahead.
    descended: bool,
}

/// Listings and walk-ahead of every space; clones share all state.
#[derive(Clone)]
pub struct WalkAhead {
    spaces: Arc<Vec<Arc<SpaceHandle>>>,
    meta: MetaCache,
    dir_meta: DirMeta,
    enabled: bool,
    head_permits: Arc<Semaphore>,
    list_permits: Arc<Semaphore>,
    listings: InFlight<DirKey, FsResult<Listing>>,
    walks: Cache<DirKey, Arc<Mutex<Walk>>>,
    /// Directories listed ahead whose entries' metadata was not read yet.
    meta_deferred: Cache<DirKey, ()>,
}

impl WalkAhead {
    /// Creates the walk-ahead of `spaces`. With a metadata TTL of zero nothing is
    /// cached, so nothing is read ahead either.
    pub fn new(spaces: Vec<Arc<SpaceHandle>>, meta: MetaCache, dir_meta: DirMeta, ttl: Duration) -> Self {
        WalkAhead {
            spaces: Arc::new(spaces),
            meta,
            dir_meta,
            enabled: !ttl.is_zero(),
            head_permits: Arc::new(Semaphore::new(META_HEAD_CONCURRENCY)),
            list_permits: Arc::new(Semaphore::new(WALK_AHEAD_LISTINGS)),
            listings: InFlight::default(),
            walks: Cache::builder().max_capacity(MAX_WALKS).time_to_idle(WALK_IDLE).build(),
            meta_deferred: Cache::builder().max_capacity(MAX_WALKS).time_to_live(ttl.max(Duration::from_secs(1))).build(),
        }
    }

    /// Lists a directory, from the cache when fresh, or joins its listing in flight.
    pub async fn listing(&self, space: usize, dir: &str) -> FsResult<Listing> {
        self.listing_with_limit(space, dir, META_HEAD_MAX_FILES).await
    }

    /// Lists a directory like [`WalkAhead::listing`]. A listing from the store with at
    /// most `max_files` files and `max_files` subdirectories gets the metadata of its
    /// entries read ahead. Otherwise the directory is marked as deferred.
    async fn listing_with_limit(&self, space: usize, dir: &str, max_files: usize) -> FsResult<Listing> {
        if let Some(listing) = self.meta.listing(space, dir) {
            return Ok(listing);
        }
        let this = self.clone();
        let owned = dir.to_string();
        self.listings
            .run((space, dir.to_string()), async move { this.list_from_store(space, &owned, max_files).await })
            .await
    }

    /// Lists `dir` from the store, caches the listing and starts reading the metadata
    /// of its entries in the background.
    async fn list_from_store(&self, space: usize, dir: &str, max_files: usize) -> FsResult<Listing> {
        let handle = &self.spaces[space];
        let requested_at = Instant::now();
        let listed = namespace::list_dir_with_marker(handle, dir).await?;
        if !listed.has_marker {
            self.dir_meta.note_no_marker(space, dir, requested_at);
        }

        let mut entries = listed.entries;
        let mut unknown_files = Vec::new();
        let mut subdirs = Vec::new();
        for entry in entries.iter_mut() {
            let key = child_key(dir, &entry.name);
            let Some(stat) = entry.stat.as_mut() else {
                if entry.kind == Kind::Dir && handle.markers.is_some() && self.dir_meta.cached(space, &key).is_none() {
                    subdirs.push(key);
                }
                continue;
            };
            match self.meta.known_meta(space, &key, stat) {
                Some(meta) => stat.meta = Some(meta),
                None if !self.meta.recently_headed(space, &key, META_HEAD_REPEAT) => unknown_files.push(key),
                None => {}
            }
        }
        let listing = self.meta.insert_listing_at(space, dir, Arc::new(entries), requested_at);

        if unknown_files.len() > max_files || subdirs.len() > max_files {
            if unknown_files.len() <= META_HEAD_MAX_FILES && subdirs.len() <= META_HEAD_MAX_FILES {
                self.meta_deferred.insert((space, dir.to_string()), ());
            }
            unknown_files.clear();
            subdirs.clear();
        }
        if !unknown_files.is_empty() || !subdirs.is_empty() {
            tokio::spawn(self.clone().read_listed_meta(space, unknown_files, subdirs));
        }
        Ok(listing)
    }

    /// Reads the POSIX metadata of listed files and subdirectories in the background
    /// (HEAD requests under the shared permits), so that the `stat` calls that follow
    /// a readdir find it in the cache. A key whose HEAD is in flight (for a lookup) is
    /// joined, one headed meanwhile is skipped, and a cached entry of the same version
    /// is refreshed so that it lives one TTL from its HEAD.
    async fn read_listed_meta(self, space: usize, files: Vec<String>, subdirs: Vec<String>) {
        let started = Instant::now();
        let handle = Arc::clone(&self.spaces[space]);
        let (file_count, dir_count) = (files.len(), subdirs.len());
        let keys = subdirs.into_iter().map(|key| (key, Kind::Dir)).chain(files.into_iter().map(|key| (key, Kind::File)));
        futures::stream::iter(keys)
            .for_each_concurrent(META_HEAD_CONCURRENCY, |(key, kind)| {
                let handle = Arc::clone(&handle);
                let this = self.clone();
                async move {
                    let Ok(_permit) = this.head_permits.acquire().await else { return };
                    if kind == Kind::Dir {
                        this.dir_meta.get(&handle, space, &key).await;
                    } else {
                        this.read_file_meta(handle, space, key).await;
                    }
                }
            })
            .await;
        tracing::debug!(
            space = handle.name(),
            files = file_count,
            directories = dir_count,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "read metadata of a listing"
        );
    }

    async fn read_file_meta(&self, handle: Arc<SpaceHandle>, space: usize, key: String) {
        if self.meta.recently_headed(space, &key, META_HEAD_REPEAT) {
            return;
        }
        let requested_at = Instant::now();
        let owned = key.clone();
        let head = async move { namespace::head_file(&handle, &owned).await };
        match self.meta.head_once(space, &key, head).await {
            Ok(Entry::File(stat)) => self.meta.refresh_entry(space, &key, &stat, requested_at),
            Ok(_) => {}
            Err(err) => tracing::debug!(key = %key, error = %err, "metadata read-ahead failed"),
        }
    }

    /// Starts walk-ahead after the kernel opened directory `dir` whose listing is
    /// `listing`: lists its first subdirectories, and moves the walk of its parent past it.
    pub fn opened(&self, space: usize, dir: &str, listing: &Listing) {
        if !self.enabled {
            return;
        }
        if self.meta_deferred.remove(&(space, dir.to_string())).is_some() {
            self.read_deferred_meta(space, dir, listing);
        }

        let walk = self.walks.get_with((space, dir.to_string()), || {
            let subdirs = listing.iter().filter(|e| e.kind == Kind::Dir).map(|e| e.name.clone()).collect();
            Arc::new(Mutex::new(Walk { subdirs, opened: 0, next: 0, listings_in_flight: 0, descended: false }))
        });
        self.advance(space, dir, &walk, None);

        if dir.is_empty() {
            return;
        }
        let (parent, name) = crate::name::split_key(dir);
        if let Some(parent_walk) = self.walks.get(&(space, parent.to_string())) {
            self.advance(space, parent, &parent_walk, Some(name));
        }
    }

    /// Reads the metadata of the entries of `dir` that was listed ahead without it.
    fn read_deferred_meta(&self, space: usize, dir: &str, listing: &Listing) {
        let has_markers = self.spaces[space].markers.is_some();
        let mut files = Vec::new();
        let mut subdirs = Vec::new();
        for entry in listing.iter() {
            let key = child_key(dir, &entry.name);
            match &entry.stat {
                Some(stat) if stat.meta.is_none() => files.push(key),
                None if entry.kind == Kind::Dir && has_markers && self.dir_meta.cached(space, &key).is_none() => {
                    subdirs.push(key)
                }
                _ => {}
            }
        }
        if !files.is_empty() || !subdirs.is_empty() {
            tokio::spawn(self.clone().read_listed_meta(space, files, subdirs));
        }
    }

    /// Reads the metadata of the entries of `dir` ahead if it is still deferred and has
    /// at most [`WALK_AHEAD_MAX_ENTRIES`] entries.
    fn read_ahead_if_deferred(&self, space: usize, dir: &str) {
        let Some(listing) = self.meta.listing(space, dir) else { return };
        if listing.len() > WALK_AHEAD_MAX_ENTRIES {
            return;
        }
        if self.meta_deferred.remove(&(space, dir.to_string())).is_some() {
            self.read_deferred_meta(space, dir, &listing);
        }
    }

    /// Lists subdirectories of `parent` ahead, after the kernel opened `opened_name`
    /// or a listing ahead completed.
    fn advance(&self, space: usize, parent: &str, walk_state: &Arc<Mutex<Walk>>, opened_name: Option<&str>) {
        let mut walk = walk_state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(name) = opened_name {
            // Names are sorted by bytes, as in the listing.
            if let Ok(index) = walk.subdirs.binary_search_by(|s| s.as_str().cmp(name)) {
                walk.opened = walk.opened.max(index + 1);
            }
            if !walk.descended {
                walk.descended = true;
                for ahead in &walk.subdirs[walk.opened..walk.next] {
                    self.read_ahead_if_deferred(space, &child_key(parent, ahead));
                }
            }
        }
        walk.next = walk.next.max(walk.opened);

        let mut entries_ahead: usize = walk.subdirs[walk.opened..walk.next]
            .iter()
            .filter_map(|name| self.meta.listing(space, &child_key(parent, name)).map(|l| l.len()))
            .sum();
        while walk.next < walk.subdirs.len()
            && walk.next - walk.opened < WALK_AHEAD_DIRS
            && entries_ahead < WALK_AHEAD_MAX_ENTRIES
            && walk.listings_in_flight < WALK_AHEAD_LISTINGS
        {
            let child = child_key(parent, &walk.subdirs[walk.next]);
            walk.next += 1;
            if let Some(cached) = self.meta.listing(space, &child) {
                entries_ahead += cached.len();
                continue;
            }
            walk.listings_in_flight += 1;
            let task = self.clone().list_ahead(space, parent.to_string(), child, Arc::clone(walk_state));
            tokio::spawn(task);
        }
    }

    /// Lists `dir` ahead, then lets the walk of `parent` go on.
    async fn list_ahead(self, space: usize, parent: String, dir: String, walk: Arc<Mutex<Walk>>) {
        if let Ok(_permit) = self.list_permits.acquire().await {
            let descended = walk.lock().unwrap_or_else(|e| e.into_inner()).descended;
            let max_files = if descended { WALK_AHEAD_MAX_ENTRIES } else { 0 };
            if let Err(err) = self.listing_with_limit(space, &dir, max_files).await {
                tracing::debug!(space = self.spaces[space].name(), dir = %dir, error = %err, "walk-ahead listing failed");
            }
        }

        let descended = {
            let mut state = walk.lock().unwrap_or_else(|e| e.into_inner());
            state.listings_in_flight -= 1;
            state.descended
        };
        if descended {
            // The kernel may have descended while this listing was in flight.
            self.read_ahead_if_deferred(space, &dir);
        }
        self.advance(space, &parent, &walk, None);
    }
}
