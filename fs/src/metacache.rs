//! The metadata cache: attributes of keys, negative entries and directory listings.
//!
//! Every entry expires after `cache.metadata_ttl`; a TTL of zero disables the cache.
//! Invariant: only a definite response of the store is cached. A "missing" entry is
//! inserted only after the store said "not found" (never after a throttled or failed
//! request), and changes made through this mount update or drop the entries they touch.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::sync::Cache;

use crate::inode::Kind;
use crate::posix_meta::PosixMeta;

/// Upper bound of cached keys; about 200 bytes each.
const MAX_ENTRIES: u64 = 1_000_000;

/// Upper bound of directory entries held by cached listings.
const MAX_LISTED_ENTRIES: u64 = 2_000_000;

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

/// POSIX metadata of one object version, identified by ETag and last-modified time.
#[derive(Debug, Clone)]
struct KnownMeta {
    etag: Option<String>,
    last_modified: SystemTime,
    meta: Arc<PosixMeta>,
}

#[derive(Clone)]
pub struct MetaCache {
    entries: Option<Cache<CacheKey, Entry>>,
    /// Listings with the time they were read from the store; patches made by this mount
    /// keep that time, so a listing still expires one TTL after it was read.
    listings: Option<Cache<CacheKey, (Instant, Listing)>>,
    ttl: Duration,
    /// Metadata decoded by HEAD requests, kept longer than the TTL: it is only used for
    /// an object whose listing shows the same ETag and last-modified time, because
    /// any rewrite of the object (content or metadata) changes the last-modified time.
    posix: Cache<CacheKey, KnownMeta>,
    /// Entry counts of directories listed in the last [`RECENT_LISTING_TTL`].
    recent_listings: Cache<CacheKey, usize>,
}

impl MetaCache {
    pub fn new(ttl: Duration) -> Self {
        let posix = Cache::builder().max_capacity(MAX_ENTRIES).time_to_live(POSIX_META_TTL).build();
        let recent_listings = Cache::builder().max_capacity(MAX_ENTRIES).time_to_live(RECENT_LISTING_TTL).build();
        if ttl.is_zero() {
            return MetaCache {
                entries: None,
                listings: None,
                ttl,
                posix,
                recent_listings,
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
        }
    }

    /// Remembers the decoded metadata of a HEAD result (`stat.mtime` is the object's
    /// last-modified time there).
    pub fn remember_meta(&self, space: usize, key: &str, stat: &FileStat) {
        if let Some(meta) = &stat.meta {
            let known = KnownMeta {
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
        self.posix.invalidate(&(space, key.to_string()));
    }

    /// The metadata of the object version that a listing entry shows, if a HEAD of that
    /// same version decoded it before.
    pub fn known_meta(&self, space: usize, key: &str, stat: &FileStat) -> Option<Arc<PosixMeta>> {
        let known = self.posix.get(&(space, key.to_string()))?;
        (known.etag == stat.etag && known.last_modified == stat.mtime).then_some(known.meta)
    }

    pub fn entry(&self, space: usize, key: &str) -> Option<Entry> {
        self.entries.as_ref()?.get(&(space, key.to_string()))
    }

    pub fn insert_entry(&self, space: usize, key: &str, entry: Entry) {
        if let Some(cache) = &self.entries {
            cache.insert((space, key.to_string()), entry);
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
        if let Some(entries) = &self.entries {
            for item in listing.iter() {
                let key = crate::name::child_key(dir, &item.name);
                let entry = match (&item.kind, &item.stat) {
                    (Kind::File, Some(stat)) => Entry::File(stat.clone()),
                    (Kind::Dir, _) => Entry::Dir,
                    _ => continue,
                };
                entries.insert((space, key), entry);
            }
        }
        if let Some(listings) = &self.listings {
            self.recent_listings.insert((space, dir.to_string()), listing.len());
            listings.insert((space, dir.to_string()), (Instant::now(), listing));
        }
    }

    /// Adds, replaces (`Some`) or removes (`None`) the entry `name` of a cached listing
    /// after this mount changed it, so the next lookup in that directory needs no
    /// request. Nothing happens when the listing is not cached.
    pub fn patch_listing(&self, space: usize, dir: &str, name: &str, entry: Option<DirEntry>) {
        let Some(listings) = &self.listings else { return };
        let key = (space, dir.to_string());
        let Some((listed_at, listing)) = listings.get(&key) else { return };
        if listed_at.elapsed() >= self.ttl {
            return;
        }
        let mut entries: Vec<DirEntry> = listing.as_ref().clone();
        match (entries.binary_search_by(|e| e.name.as_str().cmp(name)), entry) {
            (Ok(index), Some(entry)) => entries[index] = entry,
            (Ok(index), None) => {
                entries.remove(index);
            }
            (Err(index), Some(entry)) => entries.insert(index, entry),
            (Err(_), None) => {}
        }
        listings.insert(key, (listed_at, Arc::new(entries)));
    }

    /// The entry count of `dir` when it was listed within the last minute (even if that
    /// listing has expired since).
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
