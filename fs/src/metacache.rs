//! The metadata cache: attributes of keys, negative entries, directory listings, and the
//! HEAD requests in flight.
//!
//! Every entry expires after `cache.metadata_ttl`; a TTL of zero disables the cache.
//! Invariant: only a definite response of the store is cached. A "missing" entry is
//! inserted only after the store returned "not found" (never after a throttled or failed
//! request), and changes made through this mount update or drop the entries they touch.
//! At most one HEAD per key is in flight, and later callers share its result. The result
//! of a HEAD that started before this mount changed the key is not remembered.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::ops::compute::Op;
use moka::sync::Cache;

use crate::error::FsResult;

use crate::inflight::InFlight;
use crate::inode::Kind;
use crate::posix_meta::PosixMeta;

/// Upper bound of cached keys; about 200 bytes each.
const MAX_ENTRIES: u64 = 1_000_000;

/// Upper bound of directory entries held by cached listings.
const MAX_LISTED_ENTRIES: u64 = 2_000_000;

/// Minimum time a change made through this mount is replayed onto listings that the
/// store returns; twice the TTL when that is longer.
const LOCAL_CHANGE_MEMORY: Duration = Duration::from_secs(10);

/// How long a directory counts as recently listed after its last listing.
const RECENT_LISTING_TTL: Duration = Duration::from_secs(60);

/// How long decoded POSIX metadata is remembered for an unchanged object version.
const POSIX_META_TTL: Duration = Duration::from_secs(3600);

/// Attributes of a file object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStat {
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: Option<String>,
    /// Stored POSIX metadata; `None` when unknown because the stat came from a listing,
    /// which carries no user metadata.
    pub meta: Option<Arc<PosixMeta>>,
}

impl FileStat {
    /// Attributes from a listing or a HEAD without decoded metadata.
    pub fn from_meta(meta: &object_store::ObjectMeta) -> Self {
        FileStat {
            size: meta.size,
            mtime: meta.last_modified.into(),
            etag: meta.e_tag.clone(),
            meta: None,
        }
    }
}

/// The kind of a key, as the store last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File(FileStat),
    Dir,
    Missing,
}

impl Entry {
    pub fn kind(&self) -> Option<Kind> {
        match self {
            Entry::File(stat) if stat.meta.as_ref().is_some_and(|m| m.is_symlink()) => Some(Kind::Symlink),
            Entry::File(_) => Some(Kind::File),
            Entry::Dir => Some(Kind::Dir),
            Entry::Missing => None,
        }
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub kind: Kind,
    pub stat: Option<FileStat>,
}

/// A directory listing sorted by name bytes, each name once.
pub type Listing = Arc<Vec<DirEntry>>;

type CacheKey = (usize, String);

/// One HEAD in flight, shared by every caller that asks for the same key meanwhile.

/// How long a change made through this mount is remembered, so that the results of
/// HEADs that started before it are rejected. Longer than a request with its retries.
const FORGET_MEMORY: Duration = Duration::from_secs(600);

/// True when two last-modified times fall in the same second: listings carry
/// milliseconds, while a HEAD's `Last-Modified` header has whole seconds.
fn same_second(a: SystemTime, b: SystemTime) -> bool {
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).ok();
    secs(a) == secs(b)
}

/// POSIX metadata of one object version, identified by ETag and last-modified time.
#[derive(Debug, Clone)]
struct KnownMeta {
    remembered_at: Instant,
    etag: Option<String>,
    last_modified: SystemTime,
    meta: Arc<PosixMeta>,
}

#[derive(Clone)]
pub struct MetaCache {
    entries: Option<Cache<CacheKey, Entry>>,
    /// Listings with the time they were read from the store. Patches made by this mount
    /// keep that time, so a listing still expires one TTL after it was read.
    listings: Option<Cache<CacheKey, (Instant, Listing)>>,
    ttl: Duration,
    /// Metadata decoded by HEAD requests, kept longer than the TTL: it is only used for
    /// an object whose listing shows the same ETag and last-modified time, because
    /// any rewrite of the object (content or metadata) changes the last-modified time.
    posix: Cache<CacheKey, KnownMeta>,
    /// Entry counts of directories listed in the last [`RECENT_LISTING_TTL`].
    recent_listings: Cache<CacheKey, usize>,
    /// Directory entries changed through this mount, per directory, so that a listing
    /// whose request started before a change completed still shows it. The lock also
    /// makes each listing patch atomic.
    local_changes: Arc<std::sync::Mutex<HashMap<CacheKey, Vec<LocalChange>>>>,
    /// When this mount last changed each key, so that the result of a HEAD that started
    /// earlier is not remembered.
    forgotten: Cache<CacheKey, Instant>,
    /// HEADs in flight, joined by every caller of the same key meanwhile.
    heads: InFlight<CacheKey, FsResult<Entry>>,
}

/// One directory entry added, replaced or removed through this mount.
#[derive(Debug, Clone)]
struct LocalChange {
    at: Instant,
    name: String,
    entry: Option<DirEntry>,
}

/// Adds, replaces (`Some`) or removes (`None`) `name` in a sorted listing.
fn apply_change(entries: &mut Vec<DirEntry>, name: &str, entry: Option<DirEntry>) {
    match (entries.binary_search_by(|e| e.name.as_str().cmp(name)), entry) {
        (Ok(index), Some(entry)) => entries[index] = entry,
        (Ok(index), None) => {
            entries.remove(index);
        }
        (Err(index), Some(entry)) => entries.insert(index, entry),
        (Err(_), None) => {}
    }
}

impl MetaCache {
    pub fn new(ttl: Duration) -> Self {
        let posix = Cache::builder().max_capacity(MAX_ENTRIES).time_to_live(POSIX_META_TTL).build();
        let recent_listings = Cache::builder().max_capacity(MAX_ENTRIES).time_to_live(RECENT_LISTING_TTL).build();
        let forgotten = Cache::builder().max_capacity(MAX_ENTRIES).time_to_live(FORGET_MEMORY).build();
        if ttl.is_zero() {
            return MetaCache {
                entries: None,
                listings: None,
                ttl,
                posix,
                recent_listings,
                local_changes: Arc::default(),
                forgotten,
                heads: InFlight::default(),
            };
        }
        let entries = Cache::builder().max_capacity(MAX_ENTRIES).time_to_live(ttl).build();
        let listings = Cache::builder()
            .max_capacity(MAX_LISTED_ENTRIES)
            .weigher(|_key: &CacheKey, listing: &(Instant, Listing)| listing.1.len().clamp(1, u32::MAX as usize) as u32)
            .time_to_live(ttl)
            .build();
        MetaCache {
            entries: Some(entries),
            listings: Some(listings),
            ttl,
            posix,
            recent_listings,
            local_changes: Arc::default(),
            forgotten,
            heads: InFlight::default(),
        }
    }

    /// HEADs `key` with `head`, or joins the HEAD of `key` already in flight. The
    /// request runs in its own task, so it completes even if every caller goes away.
    /// Its decoded metadata is remembered before any caller sees the result.
    pub async fn head_once<F>(&self, space: usize, key: &str, head: F) -> FsResult<Entry>
    where
        F: Future<Output = FsResult<Entry>> + Send + 'static,
    {
        let cache = self.clone();
        let task_key = (space, key.to_string());
        let requested_at = Instant::now();
        let request = async move {
            let result = head.await;
            if let Ok(Entry::File(stat)) = &result {
                cache.remember_meta_from(task_key.0, &task_key.1, stat, requested_at);
            }
            result
        };
        self.heads.run((space, key.to_string()), request).await
    }

    /// True when this mount changed `key` at or after `requested_at`.
    fn changed_since(&self, space: usize, key: &str, requested_at: Instant) -> bool {
        self.forgotten
            .get(&(space, key.to_string()))
            .is_some_and(|changed_at| changed_at >= requested_at)
    }

    /// Remembers the metadata of a HEAD that started at `requested_at`, unless this
    /// mount changed the key since.
    pub fn remember_meta_from(&self, space: usize, key: &str, stat: &FileStat, requested_at: Instant) {
        if !self.changed_since(space, key, requested_at) {
            self.remember_meta(space, key, stat);
        }
    }

    /// Replaces the cached entry of `key` with the attributes of a HEAD that started at
    /// `requested_at`, when the cached entry shows the same object version. The entry
    /// then lives one TTL from now. Nothing happens when the entry is gone, shows
    /// another version, or this mount changed the key since the request started.
    pub fn refresh_entry(&self, space: usize, key: &str, stat: &FileStat, requested_at: Instant) {
        let Some(cache) = &self.entries else { return };
        if self.changed_since(space, key, requested_at) {
            return;
        }
        cache.entry((space, key.to_string())).and_compute_with(|current| {
            let same = match current.as_ref().map(|c| c.value()) {
                Some(Entry::File(cached)) => {
                    cached.etag == stat.etag && cached.size == stat.size && same_second(cached.mtime, stat.mtime)
                }
                _ => false,
            };
            if same {
                Op::Put(Entry::File(stat.clone()))
            } else {
                Op::Nop
            }
        });
    }

    /// Remembers the decoded metadata of a HEAD result (`stat.mtime` is the object's
    /// last-modified time there).
    pub fn remember_meta(&self, space: usize, key: &str, stat: &FileStat) {
        if let Some(meta) = &stat.meta {
            let known = KnownMeta {
                remembered_at: Instant::now(),
                etag: stat.etag.clone(),
                last_modified: stat.mtime,
                meta: Arc::clone(meta),
            };
            self.posix.insert((space, key.to_string()), known);
        }
    }

    /// Drops remembered metadata of `key` after this mount changed the object: a
    /// rewrite within the same second keeps both the ETag and the last-modified time.
    pub fn forget_meta(&self, space: usize, key: &str) {
        let cache_key = (space, key.to_string());
        self.forgotten.insert(cache_key.clone(), Instant::now());
        self.posix.invalidate(&cache_key);
        self.heads.cancel(&cache_key);
    }

    /// The metadata of the object version that a listing entry shows, if a HEAD of that
    /// same version decoded it before.
    pub fn known_meta(&self, space: usize, key: &str, stat: &FileStat) -> Option<Arc<PosixMeta>> {
        let known = self.posix.get(&(space, key.to_string()))?;
        let same_version = known.etag == stat.etag && same_second(known.last_modified, stat.mtime);
        same_version.then_some(known.meta)
    }

    /// Returns true when a HEAD of `key` was remembered within the last `within`,
    /// whatever version it saw. Read-ahead uses it to skip HEADs after a re-listing.
    pub fn recently_headed(&self, space: usize, key: &str, within: Duration) -> bool {
        self.posix
            .get(&(space, key.to_string()))
            .is_some_and(|known| known.remembered_at.elapsed() < within)
    }

    pub fn entry(&self, space: usize, key: &str) -> Option<Entry> {
        self.entries.as_ref()?.get(&(space, key.to_string()))
    }

    pub fn insert_entry(&self, space: usize, key: &str, entry: Entry) {
        if let Some(cache) = &self.entries {
            cache.insert((space, key.to_string()), entry);
        }
    }

    /// Caches the result of a request for `key` that started at `requested_at`, unless
    /// this mount changed the key since: a HEAD that overlapped an upload may show the
    /// object before it, and must not replace what the upload cached.
    pub fn insert_entry_from(&self, space: usize, key: &str, entry: Entry, requested_at: Instant) {
        if !self.changed_since(space, key, requested_at) {
            self.insert_entry(space, key, entry);
        }
    }

    pub fn remove_entry(&self, space: usize, key: &str) {
        if let Some(cache) = &self.entries {
            cache.invalidate(&(space, key.to_string()));
        }
    }

    pub fn listing(&self, space: usize, dir: &str) -> Option<Listing> {
        let (listed_at, listing) = self.listings.as_ref()?.get(&(space, dir.to_string()))?;
        (listed_at.elapsed() < self.ttl).then_some(listing)
    }

    /// Stores a listing and the attributes of its entries, so that the lookups and
    /// `stat` calls that usually follow a readdir need no request.
    pub fn insert_listing(&self, space: usize, dir: &str, listing: Listing) {
        self.insert_listing_at(space, dir, listing, Instant::now());
    }

    /// Stores a listing whose request started at `requested_at`, after replaying the
    /// changes this mount made since then; returns the listing as stored.
    pub fn insert_listing_at(&self, space: usize, dir: &str, listing: Listing, requested_at: Instant) -> Listing {
        let mut changes = self.local_changes.lock().unwrap_or_else(|e| e.into_inner());
        let listing = match changes.get(&(space, dir.to_string())) {
            Some(recent) if recent.iter().any(|change| change.at >= requested_at) => {
                let mut entries = listing.as_ref().clone();
                for change in recent.iter().filter(|change| change.at >= requested_at) {
                    apply_change(&mut entries, &change.name, change.entry.clone());
                }
                Arc::new(entries)
            }
            _ => listing,
        };
        let memory = LOCAL_CHANGE_MEMORY.max(self.ttl * 2);
        changes.retain(|_, recent| {
            recent.retain(|change| change.at.elapsed() < memory);
            !recent.is_empty()
        });

        if let Some(entries) = &self.entries {
            for item in listing.iter() {
                let key = crate::name::child_key(dir, &item.name);
                let entry = match (&item.kind, &item.stat) {
                    (Kind::File, Some(stat)) => Entry::File(stat.clone()),
                    (Kind::Dir, _) => Entry::Dir,
                    _ => continue,
                };
                // A listing carries no metadata, so keep a cached entry of the same
                // version that has it (it may mark the object as a symlink).
                if let (Entry::File(listed), Some(Entry::File(cached))) = (&entry, entries.get(&(space, key.clone()))) {
                    if listed.meta.is_none()
                        && cached.meta.is_some()
                        && cached.etag == listed.etag
                        && same_second(cached.mtime, listed.mtime)
                    {
                        continue;
                    }
                }
                entries.insert((space, key), entry);
            }
        }
        if let Some(listings) = &self.listings {
            self.recent_listings.insert((space, dir.to_string()), listing.len());
            listings.insert((space, dir.to_string()), (Instant::now(), Arc::clone(&listing)));
        }
        listing
    }

    /// Adds, replaces (`Some`) or removes (`None`) the entry `name` of a cached listing
    /// after this mount changed it, so the next lookup in that directory needs no
    /// request. Nothing happens when the listing is not cached.
    pub fn patch_listing(&self, space: usize, dir: &str, name: &str, entry: Option<DirEntry>) {
        let Some(listings) = &self.listings else { return };
        let key = (space, dir.to_string());
        let mut changes = self.local_changes.lock().unwrap_or_else(|e| e.into_inner());
        changes.entry(key.clone()).or_default().push(LocalChange {
            at: Instant::now(),
            name: name.to_string(),
            entry: entry.clone(),
        });

        let Some((listed_at, listing)) = listings.get(&key) else { return };
        if listed_at.elapsed() >= self.ttl {
            return;
        }
        let mut entries: Vec<DirEntry> = listing.as_ref().clone();
        apply_change(&mut entries, name, entry);
        listings.insert(key, (listed_at, Arc::new(entries)));
    }

    /// Returns the entry count of `dir` when it was listed within the last minute, even
    /// if that listing has expired since.
    pub fn recently_listed(&self, space: usize, dir: &str) -> Option<usize> {
        self.recent_listings.get(&(space, dir.to_string()))
    }

    pub fn remove_listing(&self, space: usize, dir: &str) {
        if let Some(cache) = &self.listings {
            cache.invalidate(&(space, dir.to_string()));
        }
    }

    /// Drops everything cached about `key` and below it, after a rename or rmdir.
    pub fn remove_tree(&self, space: usize, key: &str) {
        let below = format!("{key}/");
        let matches = move |k: &CacheKey| k.0 == space && (k.1 == key || k.1.starts_with(&below));
        for (k, _) in self.posix.iter() {
            if matches(&k) {
                self.posix.invalidate(&*k);
            }
        }
        if let Some(cache) = &self.entries {
            for (k, _) in cache.iter() {
                if matches(&k) {
                    cache.invalidate(&*k);
                }
            }
        }
        if let Some(cache) = &self.listings {
            for (k, _) in cache.iter() {
                if matches(&k) {
                    cache.invalidate(&*k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn stat(size: u64) -> FileStat {
        FileStat {
            size,
            mtime: SystemTime::UNIX_EPOCH,
            etag: Some("e".into()),
            meta: None,
        }
    }

    #[test]
    fn entries_expire_after_ttl() {
        let cache = MetaCache::new(Duration::from_millis(50));
        cache.insert_entry(0, "a", Entry::Missing);
        assert_eq!(cache.entry(0, "a"), Some(Entry::Missing));
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(cache.entry(0, "a"), None);
    }

    #[test]
    fn known_meta_needs_same_version() {
        let cache = MetaCache::new(Duration::from_secs(60));
        let mut headed = stat(3);
        headed.meta = Some(Arc::new(PosixMeta { mode: Some(0o100600), ..PosixMeta::default() }));
        cache.remember_meta(0, "f", &headed);
        assert_eq!(cache.known_meta(0, "f", &stat(3)).unwrap().mode, Some(0o100600));
        let mut rewritten = stat(3);
        rewritten.mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        assert!(cache.known_meta(0, "f", &rewritten).is_none());
    }

    #[test]
    fn known_meta_ignores_listing_milliseconds() {
        let cache = MetaCache::new(Duration::from_secs(60));
        let mut headed = stat(3);
        headed.mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(7);
        headed.meta = Some(Arc::new(PosixMeta { mode: Some(0o100600), ..PosixMeta::default() }));
        cache.remember_meta(0, "f", &headed);
        let mut listed = stat(3);
        listed.mtime = SystemTime::UNIX_EPOCH + Duration::from_millis(7_015);
        assert!(cache.known_meta(0, "f", &listed).is_some(), "a HEAD has whole seconds, a listing milliseconds");
    }

    #[tokio::test]
    async fn concurrent_heads_share_one_request() {
        let cache = MetaCache::new(Duration::from_secs(60));
        let sent = Arc::new(AtomicU64::new(0));
        let head = |sent: Arc<AtomicU64>| async move {
            sent.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut headed = stat(3);
            headed.meta = Some(Arc::new(PosixMeta::default()));
            Ok(Entry::File(headed))
        };
        let (a, b) = tokio::join!(
            cache.head_once(0, "k", head(Arc::clone(&sent))),
            cache.head_once(0, "k", head(Arc::clone(&sent)))
        );
        assert_eq!(a.unwrap(), b.unwrap());
        assert_eq!(sent.load(Ordering::SeqCst), 1, "the second caller joined the first request");
        assert!(cache.recently_headed(0, "k", Duration::from_secs(1)));
        cache.head_once(0, "k", head(Arc::clone(&sent))).await.unwrap();
        assert_eq!(sent.load(Ordering::SeqCst), 2, "a finished request is not reused");
    }

    #[tokio::test]
    async fn head_started_before_a_change_is_not_remembered() {
        let cache = MetaCache::new(Duration::from_secs(60));
        cache.insert_entry(0, "k", Entry::File(stat(3)));
        let requested_at = Instant::now();
        cache.forget_meta(0, "k");
        let mut headed = stat(3);
        headed.meta = Some(Arc::new(PosixMeta { mode: Some(0o100600), ..PosixMeta::default() }));
        cache.remember_meta_from(0, "k", &headed, requested_at);
        cache.refresh_entry(0, "k", &headed, requested_at);
        assert!(cache.known_meta(0, "k", &stat(3)).is_none());
        assert_eq!(cache.entry(0, "k"), Some(Entry::File(stat(3))));
        cache.refresh_entry(0, "k", &headed, Instant::now());
        assert_eq!(cache.entry(0, "k"), Some(Entry::File(headed)), "a later HEAD refreshes the same version");
    }

    #[test]
    fn patched_listing_keeps_order_and_expiry() {
        let cache = MetaCache::new(Duration::from_millis(300));
        let dir_entry = |name: &str| DirEntry { name: name.into(), kind: Kind::Dir, stat: None };
        cache.insert_listing(0, "d", Arc::new(vec![dir_entry("a"), dir_entry("c")]));
        cache.patch_listing(0, "d", "b", Some(dir_entry("b")));
        cache.patch_listing(0, "d", "a", None);
        let names: Vec<String> = cache.listing(0, "d").unwrap().iter().map(|e| e.name.clone()).collect();
        assert_eq!(names, vec!["b", "c"]);
        std::thread::sleep(Duration::from_millis(200));
        cache.patch_listing(0, "d", "e", Some(dir_entry("e")));
        std::thread::sleep(Duration::from_millis(150));
        assert!(cache.listing(0, "d").is_none(), "a patch does not extend the listing's life");
    }

    #[test]
    fn store_listing_gets_later_local_changes() {
        let cache = MetaCache::new(Duration::from_secs(60));
        let dir_entry = |name: &str| DirEntry { name: name.into(), kind: Kind::Dir, stat: None };
        let requested_at = Instant::now();
        cache.patch_listing(0, "d", "new", Some(dir_entry("new")));
        cache.patch_listing(0, "d", "gone", None);
        let from_store = Arc::new(vec![dir_entry("gone"), dir_entry("old")]);
        let stored = cache.insert_listing_at(0, "d", from_store, requested_at);
        let names: Vec<&str> = stored.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec!["new", "old"]);
        let later = cache.insert_listing_at(0, "d", Arc::new(vec![dir_entry("x")]), Instant::now());
        assert_eq!(later.len(), 1, "changes older than the request are not replayed");
    }

    #[test]
    fn zero_ttl_caches_nothing() {
        let cache = MetaCache::new(Duration::ZERO);
        cache.insert_entry(0, "a", Entry::Dir);
        assert_eq!(cache.entry(0, "a"), None);
    }

    #[test]
    fn listing_fills_entries() {
        let cache = MetaCache::new(Duration::from_secs(60));
        let listing = Arc::new(vec![
            DirEntry { name: "f".into(), kind: Kind::File, stat: Some(stat(3)) },
            DirEntry { name: "d".into(), kind: Kind::Dir, stat: None },
        ]);
        cache.insert_listing(0, "top", listing);
        assert_eq!(cache.entry(0, "top/f"), Some(Entry::File(stat(3))));
        assert_eq!(cache.entry(0, "top/d"), Some(Entry::Dir));
        cache.remove_tree(0, "top");
        assert_eq!(cache.entry(0, "top/f"), None);
        assert!(cache.listing(0, "top").is_none());
    }
}
