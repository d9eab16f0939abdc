//! The datanet filesystem, independent of the FUSE library.
//!
//! [`DatanetFs`] implements every operation as an async method on inode numbers and
//! returns [`FsError`] with the errno to report. `crate::fuse` only translates requests
//! and replies, so everything here runs in unit tests without a kernel mount. The mount
//! root (inode 1) lists the spaces and is read-only; `/<space>/<key>` is the object
//! `<key>` of that space.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use object_store::ObjectStoreExt;

use crate::config::Config;
use crate::datacache::DataCache;
use crate::dirmeta::DirMeta;
use crate::journal::{Journal, JournalSettings, JournalSpace};
use crate::error::{FsError, FsResult};
use crate::inode::{space_root_ino, InodeTable, Kind, Target, ROOT_INO};
use crate::metacache::{DirEntry, Entry, FileStat, MetaCache};
use crate::name::{check_key_length, child_key, split_key, validate_name, NAME_MAX_BYTES};
use crate::namespace::{self, object_path, SpaceHandle};
use crate::posix_meta::{PosixMeta, S_IFLNK, S_IFREG};
use crate::prefetch::{ObjectReader, ReadBudget};
use crate::staging::{BaseObject, StagingSettings};
use crate::upload::UploadSettings;
use crate::walkahead::WalkAhead;
use crate::write::Writer;

/// Directories with at most this many entries are listed again, instead of sending a
/// HEAD and a LIST, when a name is looked up in them shortly after their listing expired.
const RELIST_MAX_ENTRIES: usize = 5_000;

/// Inodes whose last-open ETag is remembered for `keep_cache`.
const MAX_OPENED_ETAGS: usize = 100_000;

/// Free space that a staging write must leave on the cache filesystem.
const STAGING_MIN_FREE_BYTES: u64 = 64 << 20;

/// Attributes of one inode, as `stat` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    /// Permission bits (and setuid, setgid, sticky).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
}

/// One entry of an open directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirItem {
    pub ino: u64,
    pub kind: Kind,
    pub name: String,
}

/// One entry of a readdirplus reply, with the attributes the kernel caches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirItemPlus {
    /// The offset of the next entry.
    pub offset: u64,
    pub item: DirItem,
    pub attr: Attr,
    /// How long the kernel may cache the entry and its attributes: zero when they were
    /// not cached here yet, so the kernel sends a lookup when it needs them.
    pub ttl: Duration,
    /// True when one kernel lookup reference was counted for the entry.
    pub counted: bool,
}

/// Changes requested by `setattr`; `None` leaves a value as it is.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub size: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
}

/// `statfs` values.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub blocks_free: u64,
    pub files: u64,
    pub files_free: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// The result of `open` and `create`.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    /// The kernel may keep cached pages: the object's ETag did not change since the
    /// previous open of this inode.
    pub keep_cache: bool,
}

/// Open-file state.
struct OpenFile {
    ino: u64,
    space: usize,
    reader: Option<Arc<ObjectReader>>,
    writer: Option<Arc<Writer>>,
    append: bool,
}

/// Caller identity of a request.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

pub struct DatanetFs {
    spaces: Vec<Arc<SpaceHandle>>,
    inodes: InodeTable,
    meta: MetaCache,
    data_cache: Option<Arc<DataCache>>,
    budget: ReadBudget,
    ttl: Duration,
    mount_time: SystemTime,
    staging: StagingSettings,
    upload: UploadSettings,
    /// The write-back journal. Always open, so that entries left by an earlier process
    /// are uploaded; files are recorded in it only when `cache.write_back_delay` > 0.
    journal: Arc<Journal>,
    /// Inodes of closed files whose content waits in the journal. Each keeps one open
    /// count in the inode table.
    journal_pins: Mutex<std::collections::HashSet<u64>>,
    files: Mutex<HashMap<u64, OpenFile>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirItem>>>>,
    writers: Mutex<HashMap<u64, Arc<Writer>>>,
    /// ETag of each inode at its last open, for `keep_cache`.
    opened_etags: Mutex<HashMap<u64, Option<String>>>,
    /// Mode, owner and mtime of S3 directories, kept on their markers.
    dir_meta: DirMeta,
    next_fh: AtomicU64,
    /// Listings, and the metadata and subdirectories read ahead of a tree walk.
    walk: WalkAhead,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl DatanetFs {
    /// Opens every space of `config` and the caches below `cache.dir`.
    pub fn new(config: &Config) -> FsResult<Self> {
        let mut spaces = Vec::new();
        for space_config in config.spaces.values() {
            let space = crate::store::open_space(space_config).map_err(|err| FsError::io(err.to_string()))?;
            spaces.push(Arc::new(SpaceHandle::new(space)?));
        }
        if spaces.len() > crate::inode::MAX_SPACES {
            return Err(FsError::new(libc::EINVAL, format!("at most {} spaces can be mounted", crate::inode::MAX_SPACES)));
        }

        let cache = &config.cache;
        let data_dir = cache.dir.join(format!("data-{}", std::process::id()));
        let data_cache = if cache.max_size_bytes > 0 {
            let opened = DataCache::open(&data_dir, cache.max_size_bytes)
                .map_err(|err| FsError::from_io(err, &format!("data cache {}", data_dir.display())))?;
            Some(Arc::new(opened))
        } else {
            None
        };

        let journal = open_journal(config, &spaces)?;
        crate::staging::remove_stale(&cache.dir.join("staging"));

        let meta = MetaCache::new(cache.metadata_ttl);
        let dir_meta = DirMeta::new(cache.metadata_ttl);
        let walk = WalkAhead::new(spaces.clone(), meta.clone(), dir_meta.clone(), cache.metadata_ttl);
        Ok(DatanetFs {
            journal,
            journal_pins: Mutex::new(std::collections::HashSet::new()),
            inodes: InodeTable::new(spaces.len()),
            spaces,
            meta,
            data_cache,
            budget: ReadBudget::new(cache.read_ahead_memory_bytes),
            ttl: cache.metadata_ttl,
            mount_time: SystemTime::now(),
            staging: StagingSettings {
                dir: cache.dir.join("staging"),
                min_free_bytes: STAGING_MIN_FREE_BYTES,
            },
            upload: UploadSettings::default(),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            writers: Mutex::new(HashMap::new()),
            opened_etags: Mutex::new(HashMap::new()),
            dir_meta,
            next_fh: AtomicU64::new(1),
            walk,
        })
    }

    /// Returns how long the kernel may cache attributes and entries.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn space_names(&self) -> Vec<String> {
        self.spaces.iter().map(|s| s.name().to_string()).collect()
    }

    // -- resolution --------------------------------------------------------------------

    fn target(&self, ino: u64) -> FsResult<Target> {
        self.inodes
            .target(ino)
            .ok_or_else(|| FsError::new(libc::ESTALE, format!("unknown inode {ino}")))
    }

    /// Returns the space and key of a directory inode.
    fn dir_target(&self, ino: u64) -> FsResult<(usize, String)> {
        match self.target(ino)? {
            Target::Root => Err(FsError::new(libc::EACCES, "the mount root lists the spaces and is read-only")),
            Target::Entry { space, key, kind: Kind::Dir } => Ok((space, key)),
            Target::Entry { .. } => Err(FsError::new(libc::ENOTDIR, format!("inode {ino} is not a directory"))),
        }
    }

    fn writer_of(&self, ino: u64) -> Option<Arc<Writer>> {
        lock(&self.writers).get(&ino).cloned()
    }

    /// Looks up what `key` is, asking in order a pending writer, the metadata cache, a
    /// cached listing of its directory, and the store.
    async fn entry(&self, space: usize, key: &str, need_meta: bool) -> FsResult<Entry> {
        if let Some(ino) = self.inodes.peek(space, key) {
            if let Some(writer) = self.writer_of(ino) {
                if !writer.is_unlinked() {
                    return Ok(Entry::File(FileStat {
                        size: writer.size().await,
                        mtime: writer.meta().mtime.unwrap_or_else(SystemTime::now),
                        etag: None,
                        meta: Some(Arc::new(writer.meta())),
                    }));
                }
            }
        }

        let (dir, name) = split_key(key);
        let mut cached = self
            .meta
            .entry(space, key)
            .or_else(|| entry_in_listing(&self.meta.listing(space, dir)?, name));
        if cached.is_none() && self.meta.recently_listed(space, dir).is_some_and(|len| len <= RELIST_MAX_ENTRIES) {
            // A directory that was listed recently (and is being worked in) is listed
            // again: one request instead of a HEAD and a LIST for every name looked up.
            cached = entry_in_listing(&self.listing(space, dir).await?, name);
        }
        if let Some(mut entry) = cached {
            if let Entry::File(stat) = &mut entry {
                if stat.meta.is_none() {
                    stat.meta = self.meta.known_meta(space, key, stat);
                }
            }
            let meta_unknown = matches!(&entry, Entry::File(stat) if stat.meta.is_none());
            if !(need_meta && meta_unknown) {
                return Ok(entry);
            }
            let requested_at = std::time::Instant::now();
            let fresh = self.head_shared(space, key).await?;
            if fresh != Entry::Missing {
                self.meta.insert_entry_from(space, key, fresh.clone(), requested_at);
                return Ok(fresh);
            }
        }

        let handle = &self.spaces[space];
        let requested_at = std::time::Instant::now();
        let entry = namespace::resolve(handle, key).await?;
        if let Entry::File(stat) = &entry {
            self.meta.remember_meta_from(space, key, stat, requested_at);
        }
        self.meta.insert_entry_from(space, key, entry.clone(), requested_at);
        Ok(entry)
    }

    /// HEADs `key`, sharing the request with any HEAD of the same key in flight.
    async fn head_shared(&self, space: usize, key: &str) -> FsResult<Entry> {
        let handle = Arc::clone(&self.spaces[space]);
        let owned = key.to_string();
        self.meta
            .head_once(space, key, async move { namespace::head_file(&handle, &owned).await })
            .await
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: ROOT_INO,
            kind: Kind::Dir,
            size: 0,
            mtime: self.mount_time,
            perm: 0o555,
            uid: 0,
            gid: 0,
            nlink: 2,
        }
    }

    fn attr_of(&self, ino: u64, space: usize, entry: &Entry) -> Attr {
        let config = &self.spaces[space].space.config;
        match entry {
            Entry::File(stat) => {
                let meta = stat.meta.as_deref().cloned().unwrap_or_default();
                let resolved = meta.resolve(config, S_IFREG, stat.mtime);
                let kind = if resolved.mode & 0o170000 == S_IFLNK { Kind::Symlink } else { Kind::File };
                Attr {
                    ino,
                    kind,
                    size: stat.size,
                    mtime: resolved.mtime,
                    perm: (resolved.mode & 0o7777) as u16,
                    uid: resolved.uid,
                    gid: resolved.gid,
                    nlink: 1,
                }
            }
            Entry::Dir | Entry::Missing => Attr {
                ino,
                kind: Kind::Dir,
                size: 0,
                mtime: self.mount_time,
                perm: (config.dir_mode & 0o7777) as u16,
                uid: config.uid,
                gid: config.gid,
                nlink: 2,
            },
        }
    }

    // -- lookup and attributes ---------------------------------------------------------

    /// Looks up `name` in directory `parent` and counts one kernel reference.
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        if parent == ROOT_INO {
            let text = name.to_str().unwrap_or_default();
            let index = self
                .spaces
                .iter()
                .position(|s| s.name() == text)
                .ok_or_else(|| FsError::not_found(format!("space {text:?}")))?;
            return Ok(self.attr_of(space_root_ino(index), index, &Entry::Dir));
        }

        let (space, dir) = self.dir_target(parent)?;
        let name = validate_name(name)?;
        let key = child_key(&dir, name);
        check_key_length(&self.spaces[space].key_prefix, &key, false)?;

        let entry = self.entry(space, &key, true).await?;
        let kind = entry
            .kind()
            .ok_or_else(|| FsError::not_found(self.spaces[space].describe(&key)))?;
        let ino = self.inodes.lookup(space, &key, kind);
        let attr = self.attr_of(ino, space, &entry);
        Ok(self.with_dir_meta(attr, space, &key).await)
    }

    /// Replaces the defaults of a directory's attributes with those stored on its marker.
    async fn with_dir_meta(&self, mut attr: Attr, space: usize, key: &str) -> Attr {
        if attr.kind != Kind::Dir {
            return attr;
        }
        let handle = &self.spaces[space];
        let meta = self.dir_meta.get(handle, space, key).await;
        if meta.is_empty() {
            return attr;
        }
        let resolved = meta.resolve(&handle.space.config, crate::posix_meta::S_IFDIR, attr.mtime);
        attr.perm = (resolved.mode & 0o7777) as u16;
        attr.uid = resolved.uid;
        attr.gid = resolved.gid;
        attr.mtime = resolved.mtime;
        attr
    }

    pub fn forget(&self, ino: u64, count: u64) {
        self.inodes.forget(ino, count);
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        match self.target(ino)? {
            Target::Root => Ok(self.root_attr()),
            Target::Entry { space, key, .. } if key.is_empty() => Ok(self.attr_of(ino, space, &Entry::Dir)),
            Target::Entry { space, key, kind } => {
                let entry = match self.entry(space, &key, true).await? {
                    Entry::Missing => self.open_entry(ino, kind).await?,
                    found => found,
                };
                let attr = self.attr_of(ino, space, &entry);
                Ok(self.with_dir_meta(attr, space, &key).await)
            }
        }
    }

    /// Attributes of an inode that is gone from the store but still open here.
    async fn open_entry(&self, ino: u64, kind: Kind) -> FsResult<Entry> {
        if kind == Kind::Dir {
            return Err(FsError::not_found(format!("directory inode {ino}")));
        }
        let reader = lock(&self.files).values().find(|f| f.ino == ino).and_then(|f| f.reader.clone());
        match reader {
            Some(reader) => Ok(Entry::File(FileStat {
                size: reader.size(),
                mtime: self.mount_time,
                etag: None,
                meta: None,
            })),
            None => Err(FsError::not_found(format!("inode {ino}"))),
        }
    }

    // -- directories -------------------------------------------------------------------

    /// Lists a directory, from the cache when fresh.
    async fn listing(&self, space: usize, dir: &str) -> FsResult<Arc<Vec<DirEntry>>> {
        self.walk.listing(space, dir).await
    }

    /// Snapshots a directory for readdir, so offsets stay valid while it is open.
    pub async fn opendir(&self, ino: u64) -> FsResult<u64> {
        let mut items = vec![
            DirItem { ino, kind: Kind::Dir, name: ".".into() },
            DirItem { ino: ROOT_INO, kind: Kind::Dir, name: "..".into() },
        ];
        match self.target(ino)? {
            Target::Root => {
                for (index, space) in self.spaces.iter().enumerate() {
                    items.push(DirItem {
                        ino: space_root_ino(index),
                        kind: Kind::Dir,
                        name: space.name().to_string(),
                    });
                }
            }
            Target::Entry { space, key, kind: Kind::Dir } => {
                let listing = self.listing(space, &key).await?;
                self.walk.opened(space, &key, &listing);
                let mut names: std::collections::BTreeMap<String, Kind> =
                    listing.iter().map(|e| (e.name.clone(), e.kind)).collect();
                for (name, kind) in self.pending_children(space, &key) {
                    names.entry(name).or_insert(kind);
                }
                for (name, listed_kind) in names {
                    let child = child_key(&key, &name);
                    let kind = match self.meta.entry(space, &child) {
                        Some(entry) => entry.kind().unwrap_or(listed_kind),
                        None => listed_kind,
                    };
                    let child_ino = self.inodes.peek(space, &child).unwrap_or_else(|| crate::inode::hashed_ino(space, &child));
                    items.push(DirItem { ino: child_ino, kind, name });
                }
            }
            Target::Entry { .. } => return Err(FsError::new(libc::ENOTDIR, format!("inode {ino} is not a directory"))),
        }

        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, Arc::new(items));
        Ok(fh)
    }

    /// Files created through this mount in `dir` whose first upload has not happened.
    fn pending_children(&self, space: usize, dir: &str) -> Vec<(String, Kind)> {
        let inos: Vec<u64> = lock(&self.writers).keys().copied().collect();
        let mut out = Vec::new();
        for ino in inos {
            if let Some(Target::Entry { space: s, key, kind }) = self.inodes.target(ino) {
                let (parent, name) = split_key(&key);
                if s == space && parent == dir && self.writer_of(ino).is_some_and(|w| !w.is_unlinked()) {
                    out.push((name.to_string(), kind));
                }
            }
        }
        out
    }

    /// Entries from `offset` on; the offset of an entry is its index plus one.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<(u64, DirItem)>> {
        let items = lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::new(libc::EBADF, format!("unknown directory handle {fh}")))?;
        Ok(items
            .iter()
            .enumerate()
            .skip(offset as usize)
            .map(|(index, item)| (index as u64 + 1, item.clone()))
            .collect())
    }

    /// Returns up to `max` entries of the open directory `fh` from `offset`, with
    /// attributes from the caches and without any request to the store. Each entry
    /// with `counted` holds one kernel lookup reference, and the caller drops it with
    /// [`DatanetFs::forget`] when the entry does not fit in the reply.
    pub fn readdirplus(&self, dir_ino: u64, fh: u64, offset: u64, max: usize) -> FsResult<Vec<DirItemPlus>> {
        let dir = match self.target(dir_ino)? {
            Target::Root => None,
            Target::Entry { space, key, .. } => Some((space, key)),
        };
        let items = lock(&self.dirs)
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::new(libc::EBADF, format!("unknown directory handle {fh}")))?;

        let mut out = Vec::with_capacity(max);
        for (index, item) in items.iter().enumerate().skip(offset as usize).take(max) {
            let (next_offset, item) = (index as u64 + 1, item.clone());
            let (attr, ttl, counted) = match &dir {
                _ if item.name == "." || item.name == ".." => (self.dot_attr(&item), Duration::ZERO, false),
                None => {
                    let space = (item.ino - space_root_ino(0)) as usize;
                    (self.attr_of(item.ino, space, &Entry::Dir), self.ttl, false)
                }
                Some((space, key)) => {
                    let (attr, ttl) = self.cached_child_attr(*space, &child_key(key, &item.name), item.kind);
                    (attr, ttl, true)
                }
            };
            out.push(DirItemPlus { offset: next_offset, item, attr, ttl, counted });
        }
        Ok(out)
    }

    /// Attributes of "." or ".."; the kernel does not cache them from a readdirplus.
    fn dot_attr(&self, item: &DirItem) -> Attr {
        let mut attr = self.root_attr();
        attr.ino = item.ino;
        attr
    }

    /// Counts one kernel lookup reference on `key` and returns its attributes and TTL
    /// from the caches. When the caches do not have them, it returns the listed kind
    /// with default attributes and a TTL of zero.
    fn cached_child_attr(&self, space: usize, key: &str, listed_kind: Kind) -> (Attr, Duration) {
        let Some(entry) = self.cached_entry(space, key) else {
            let ino = self.inodes.lookup(space, key, listed_kind);
            let entry = match listed_kind {
                Kind::Dir => Entry::Dir,
                Kind::File | Kind::Symlink => Entry::File(FileStat { size: 0, mtime: self.mount_time, etag: None, meta: None }),
            };
            return (self.attr_of(ino, space, &entry), Duration::ZERO);
        };

        let kind = entry.kind().unwrap_or(listed_kind);
        let ino = self.inodes.lookup(space, key, kind);
        let mut attr = self.attr_of(ino, space, &entry);
        if attr.kind == Kind::Dir {
            if let Some(meta) = self.dir_meta.cached(space, key).filter(|meta| !meta.is_empty()) {
                let resolved = meta.resolve(&self.spaces[space].space.config, crate::posix_meta::S_IFDIR, attr.mtime);
                attr.perm = (resolved.mode & 0o7777) as u16;
                attr.uid = resolved.uid;
                attr.gid = resolved.gid;
                attr.mtime = resolved.mtime;
            }
        }
        (attr, self.ttl)
    }

    /// Returns what `key` is from the caches alone. Returns `None` for a file open for
    /// writing, and when the caches lack part of what `stat` shows: the POSIX metadata
    /// of a file, or the marker metadata of a directory in an S3 space.
    fn cached_entry(&self, space: usize, key: &str) -> Option<Entry> {
        if self.inodes.peek(space, key).is_some_and(|ino| self.writer_of(ino).is_some()) {
            return None;
        }
        let (dir, name) = split_key(key);
        let mut entry = self
            .meta
            .entry(space, key)
            .or_else(|| entry_in_listing(&self.meta.listing(space, dir)?, name))?;
        match &mut entry {
            Entry::File(stat) if stat.meta.is_none() => {
                stat.meta = Some(self.meta.known_meta(space, key, stat)?);
            }
            Entry::Dir if self.spaces[space].markers.is_some() => {
                self.dir_meta.cached(space, key)?;
            }
            Entry::Missing => return None,
            _ => {}
        }
        Some(entry)
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    // -- reading -----------------------------------------------------------------------

    fn check_writable(&self, space: usize) -> FsResult<()> {
        let config = &self.spaces[space].space.config;
        if config.read_only {
            return Err(FsError::read_only(&config.name));
        }
        Ok(())
    }

    /// Opens a file. Content is revalidated (through the metadata cache, so at most
    /// one TTL old) at every open: close-to-open consistency.
    pub async fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        let Target::Entry { space, key, kind } = self.target(ino)? else {
            return Err(FsError::new(libc::EISDIR, "the mount root is a directory"));
        };
        if kind == Kind::Dir {
            return Err(FsError::new(libc::EISDIR, format!("{} is a directory", self.spaces[space].describe(&key))));
        }
        let access = flags & libc::O_ACCMODE;
        let writing = access == libc::O_WRONLY || access == libc::O_RDWR;
        if writing {
            self.check_writable(space)?;
        }
        let append = flags & libc::O_APPEND != 0;
        let truncate = writing && flags & libc::O_TRUNC != 0;

        loop {
            let stat = match self.writer_of(ino) {
                Some(_) => None,
                None => match self.entry(space, &key, writing).await? {
                    Entry::File(stat) => Some(stat),
                    Entry::Dir => return Err(FsError::new(libc::EISDIR, self.spaces[space].describe(&key))),
                    Entry::Missing => return Err(FsError::not_found(self.spaces[space].describe(&key))),
                },
            };
            let (reader, keep_cache) = match &stat {
                Some(stat) if !writing => self.reader_for(ino, space, &key, stat),
                _ => (None, false),
            };

            // The writer is looked up again and the handle registered under the same
            // locks, so that a concurrent release never drops the writer this handle
            // attaches to, and a later SETATTR without a handle finds it.
            let (opened, writer, existing) = {
                let mut files = lock(&self.files);
                let mut writers = lock(&self.writers);
                let (writer, existing) = match (writers.get(&ino), &stat) {
                    (Some(writer), _) => (Some(Arc::clone(writer)), true),
                    (None, Some(stat)) if writing => {
                        let writer = self.new_writer(space, &key, stat, truncate)?;
                        writers.insert(ino, Arc::clone(&writer));
                        (Some(writer), false)
                    }
                    (None, Some(_)) => (None, false),
                    // The writer went away after the first look: fetch the object's state.
                    (None, None) => continue,
                };
                let reader = if writer.is_some() { None } else { reader };
                let opened = self.register_handle(&mut files, ino, space, reader, writer.clone(), append, keep_cache && writer.is_none());
                (opened, writer, existing)
            };

            if truncate && existing {
                if let Some(writer) = &writer {
                    if let Err(err) = writer.truncate(0).await {
                        let _ = self.release(opened.fh).await;
                        return Err(err);
                    }
                }
            }
            return Ok(opened);
        }
    }

    /// A reader of the object version `stat`, and whether the kernel may keep the pages
    /// it cached at the previous open of `ino`.
    fn reader_for(&self, ino: u64, space: usize, key: &str, stat: &FileStat) -> (Option<Arc<ObjectReader>>, bool) {
        let mut etags = lock(&self.opened_etags);
        if etags.len() >= MAX_OPENED_ETAGS && !etags.contains_key(&ino) {
            // Forgetting only costs a page cache refill at the next open.
            etags.clear();
        }
        let keep_cache = stat.etag.is_some() && etags.get(&ino) == Some(&stat.etag);
        etags.insert(ino, stat.etag.clone());
        let reader = Arc::new(ObjectReader::new(
            Arc::clone(&self.spaces[space].space.store),
            self.spaces[space].name(),
            key,
            stat.etag.clone(),
            stat.size,
            self.data_cache.clone(),
            self.budget.clone(),
        ));
        (Some(reader), keep_cache)
    }

    /// Adds a handle. The caller holds the `files` lock, and also the `writers` lock when
    /// it attaches a writer, so that attaching and `detach_writer` never interleave.
    #[allow(clippy::too_many_arguments)]
    fn register_handle(
        &self,
        files: &mut HashMap<u64, OpenFile>,
        ino: u64,
        space: usize,
        reader: Option<Arc<ObjectReader>>,
        writer: Option<Arc<Writer>>,
        append: bool,
        keep_cache: bool,
    ) -> Opened {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.inodes.open(ino);
        files.insert(fh, OpenFile { ino, space, reader, writer, append });
        Opened { fh, keep_cache }
    }

    /// Creates a writer over the current object `stat` of `key`, or an empty one for
    /// `O_TRUNC`.
    fn new_writer(&self, space: usize, key: &str, stat: &FileStat, truncate: bool) -> FsResult<Arc<Writer>> {
        let base = (!truncate).then(|| BaseObject {
            store: Arc::clone(&self.spaces[space].space.store),
            path: object_path(key).expect("keys in the inode table are valid"),
            size: stat.size,
            e_tag: stat.etag.clone(),
        });
        let meta = stat.meta.as_deref().cloned().unwrap_or_default();
        Writer::new(&self.staging, base, meta)
    }

    /// Returns the writer of `ino`, created over `stat` when there is none.
    fn writer_for_existing(&self, ino: u64, space: usize, key: &str, stat: &FileStat, truncate: bool) -> FsResult<Arc<Writer>> {
        let mut writers = lock(&self.writers);
        if let Some(existing) = writers.get(&ino) {
            return Ok(Arc::clone(existing));
        }
        let writer = self.new_writer(space, key, stat, truncate)?;
        writers.insert(ino, Arc::clone(&writer));
        Ok(writer)
    }

    /// Removes the writer of `ino` from the writer table when no handle uses one, and
    /// returns whether none does. With `expected`, only that writer is removed, so a
    /// newer one stays. The check and the removal run under the `files` and `writers`
    /// locks, so `open` cannot attach a handle in between.
    fn detach_writer(&self, ino: u64, expected: Option<&Arc<Writer>>) -> bool {
        let files = lock(&self.files);
        if files.values().any(|f| f.ino == ino && f.writer.is_some()) {
            return false;
        }
        let mut writers = lock(&self.writers);
        if writers.get(&ino).is_some_and(|current| expected.is_none_or(|w| Arc::ptr_eq(w, current))) {
            writers.remove(&ino);
        }
        true
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let (ino, reader, writer) = {
            let files = lock(&self.files);
            let file = files.get(&fh).ok_or_else(|| FsError::new(libc::EBADF, format!("unknown file handle {fh}")))?;
            (file.ino, file.reader.clone(), file.writer.clone())
        };
        if let Some(writer) = writer.or_else(|| self.writer_of(ino)) {
            return writer.read(offset, size).await;
        }
        match reader {
            Some(reader) => reader.read(offset, size).await,
            None => self.late_reader(fh, ino).await?.read(offset, size).await,
        }
    }

    /// Creates the reader of a handle that was opened while another handle was writing
    /// the file, once that writer is gone: it reads the version the writer uploaded.
    async fn late_reader(&self, fh: u64, ino: u64) -> FsResult<Arc<ObjectReader>> {
        let Target::Entry { space, key, .. } = self.target(ino)? else {
            return Err(FsError::new(libc::EBADF, format!("inode {ino} is not a file")));
        };
        let stat = match self.entry(space, &key, false).await? {
            Entry::File(stat) => stat,
            _ => return Err(FsError::not_found(self.spaces[space].describe(&key))),
        };
        let reader = Arc::new(ObjectReader::new(
            Arc::clone(&self.spaces[space].space.store),
            self.spaces[space].name(),
            &key,
            stat.etag.clone(),
            stat.size,
            self.data_cache.clone(),
            self.budget.clone(),
        ));
        if let Some(file) = lock(&self.files).get_mut(&fh) {
            file.reader = Some(Arc::clone(&reader));
        }
        Ok(reader)
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<Bytes> {
        let Target::Entry { space, key, kind: Kind::Symlink } = self.target(ino)? else {
            return Err(FsError::new(libc::EINVAL, format!("inode {ino} is not a symbolic link")));
        };
        let handle = &self.spaces[space];
        let path = object_path(&key)?;
        let result = handle
            .space
            .store
            .get_opts(&path, object_store::GetOptions::default())
            .await
            .map_err(|err| FsError::from_store(err, &handle.describe(&key)))?;
        result.bytes().await.map_err(|err| FsError::from_store(err, &handle.describe(&key)))
    }

    // -- writing -----------------------------------------------------------------------

    /// Creates and opens a new file. The object appears in the store at the first flush,
    /// fsync or close. A large file written in order sends its parts earlier ([`crate::write`]).
    pub async fn create(&self, parent: u64, name: &OsStr, mode: u32, flags: i32, caller: Caller) -> FsResult<(Attr, Opened)> {
        let (space, dir) = self.dir_target(parent)?;
        let name = validate_name(name)?;
        let key = child_key(&dir, name);
        check_key_length(&self.spaces[space].key_prefix, &key, false)?;
        self.check_writable(space)?;

        match self.entry(space, &key, false).await? {
            Entry::Missing => {}
            Entry::Dir => return Err(FsError::new(libc::EISDIR, self.spaces[space].describe(&key))),
            Entry::File(stat) => {
                if flags & libc::O_EXCL != 0 {
                    return Err(FsError::new(libc::EEXIST, self.spaces[space].describe(&key)));
                }
                let ino = self.inodes.lookup(space, &key, Kind::File);
                let opened = self.open(ino, flags).await;
                let opened = match opened {
                    Ok(opened) => opened,
                    Err(err) => {
                        self.inodes.forget(ino, 1);
                        return Err(err);
                    }
                };
                return Ok((self.attr_of(ino, space, &Entry::File(stat)), opened));
            }
        }

        let meta = PosixMeta {
            mode: Some(S_IFREG | (mode & 0o7777)),
            uid: Some(caller.uid),
            gid: Some(caller.gid),
            mtime: None,
            xattrs: Default::default(),
        };
        let writer = Writer::new(&self.staging, None, meta)?;
        let ino = self.inodes.lookup(space, &key, Kind::File);
        let opened = {
            let mut files = lock(&self.files);
            lock(&self.writers).insert(ino, Arc::clone(&writer));
            self.register_handle(&mut files, ino, space, None, Some(writer), flags & libc::O_APPEND != 0, false)
        };
        self.meta.remove_entry(space, &key);
        let listed = FileStat { size: 0, mtime: SystemTime::now(), etag: None, meta: None };
        let listed = DirEntry { name: name.to_string(), kind: Kind::File, stat: Some(listed) };
        self.meta.patch_listing(space, &dir, name, Some(listed));

        let attr = self.getattr(ino).await?;
        Ok((attr, opened))
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_bytes(fh, offset, Bytes::copy_from_slice(data)).await
    }

    /// Writes `data` through the handle `fh`; a streamed upload may keep the buffer.
    pub async fn write_bytes(&self, fh: u64, offset: u64, data: Bytes) -> FsResult<u32> {
        let (ino, space, writer, append) = {
            let files = lock(&self.files);
            let file = files.get(&fh).ok_or_else(|| FsError::new(libc::EBADF, format!("unknown file handle {fh}")))?;
            (file.ino, file.space, file.writer.clone(), file.append)
        };
        let writer = writer.ok_or_else(|| FsError::new(libc::EBADF, "file handle is not open for writing"))?;
        let written = if append {
            // The end is found and written under one lock, so a truncate through
            // another handle never leaves a hole before the appended bytes.
            writer.append_bytes(data).await?
        } else {
            writer.write_bytes(offset, data).await?
        };
        self.start_stream_if_ready(ino, space, &writer).await;
        Ok(written)
    }

    /// Starts streaming the parts of a file written from offset 0 onwards, unless its
    /// uploads wait in the write-back journal.
    async fn start_stream_if_ready(&self, ino: u64, space: usize, writer: &Writer) {
        if !writer.should_start_stream(&self.upload) || !self.journal.delay().is_zero() {
            return;
        }
        let Some(Target::Entry { key, .. }) = self.inodes.target(ino) else { return };
        let Ok(path) = object_path(&key) else { return };
        let handle = &self.spaces[space];
        writer.start_stream(Arc::clone(&handle.space.store), path, &handle.meta_target, &self.upload).await;
    }

    /// Uploads the file behind `fh` if it has changes (close and fsync).
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let (ino, space, writer) = {
            let files = lock(&self.files);
            let Some(file) = files.get(&fh) else { return Ok(()) };
            (file.ino, file.space, file.writer.clone())
        };
        match writer {
            Some(writer) => self.upload(ino, space, &writer).await,
            None => Ok(()),
        }
    }

    async fn upload(&self, ino: u64, space: usize, writer: &Writer) -> FsResult<()> {
        let Some(Target::Entry { key, .. }) = self.inodes.target(ino) else {
            return Ok(()); // forgotten and detached: nothing to store
        };
        let handle = &self.spaces[space];
        if !self.journal.delay().is_zero() {
            if writer.record(&self.journal, handle.name(), &key).await? {
                self.meta.remove_listing(space, split_key(&key).0);
            }
            return Ok(());
        }
        // The caches are updated before the next upload of this file can start: two
        // closes racing would otherwise let the older upload's size win.
        let publish = |stat: &FileStat| {
            self.meta.forget_meta(space, &key);
            let (dir, name) = split_key(&key);
            let listed = DirEntry { name: name.to_string(), kind: Kind::File, stat: Some(stat.clone()) };
            self.meta.patch_listing(space, dir, name, Some(listed));
            self.meta.insert_entry(space, &key, Entry::File(stat.clone()));
        };
        writer.upload_then(handle, &handle.meta_target, &key, &self.upload, publish).await?;
        Ok(())
    }

    /// Closes a file handle; the last handle of a written file uploads it.
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let Some(file) = lock(&self.files).remove(&fh) else { return Ok(()) };
        let mut result = Ok(());
        if let Some(writer) = &file.writer {
            result = self.upload(file.ino, file.space, writer).await;
            // A writer whose content waits in the journal keeps serving reads and
            // attributes until the upload is done (see `start_write_back`).
            let pending = !writer.is_unlinked() && self.journal_pending(file.ino, file.space).await;
            if result.is_ok() {
                if pending {
                    // The inode must outlive kernel FORGETs while its content waits in
                    // the journal, so this handle's open count becomes a pin, dropped
                    // in `writer_uploaded`.
                    if !self.has_open_writer(file.ino) && lock(&self.journal_pins).insert(file.ino) {
                        return result;
                    }
                } else if self.detach_writer(file.ino, Some(writer)) {
                    // Another handle may have attached to the writer during the upload.
                    // Then `detach_writer` keeps it.
                    self.unpin(file.ino);
                }
            }
        }
        self.inodes.close(file.ino);
        result
    }

    /// Drops the pin that a writer waiting for the journal held on `ino`.
    fn unpin(&self, ino: u64) {
        if lock(&self.journal_pins).remove(&ino) {
            self.inodes.close(ino);
        }
    }

    pub async fn mkdir(&self, parent: u64, name: &OsStr, mode: u32) -> FsResult<Attr> {
        let (space, dir) = self.dir_target(parent)?;
        let name = validate_name(name)?;
        let key = child_key(&dir, name);
        check_key_length(&self.spaces[space].key_prefix, &key, true)?;
        self.check_writable(space)?;
        if self.entry(space, &key, false).await? != Entry::Missing {
            return Err(FsError::new(libc::EEXIST, self.spaces[space].describe(&key)));
        }

        let handle = &self.spaces[space];
        if handle.markers.is_some() {
            // The marker carries the mode and creation time, as s3fs writes them.
            let meta = PosixMeta {
                mode: Some(crate::posix_meta::S_IFDIR | (mode & 0o7777)),
                mtime: Some(SystemTime::now()),
                ..PosixMeta::default()
            };
            self.dir_meta.set(handle, space, &key, &meta).await?;
        } else {
            namespace::make_dir(handle, &key).await?;
        }
        self.meta.insert_entry(space, &key, Entry::Dir);
        let listed = DirEntry { name: name.to_string(), kind: Kind::Dir, stat: None };
        self.meta.patch_listing(space, &dir, name, Some(listed));
        // The new directory was missing a moment ago, so it is empty: lookups of the
        // files about to be created in it need no request.
        self.meta.insert_listing(space, &key, Arc::new(Vec::new()));
        let ino = self.inodes.lookup(space, &key, Kind::Dir);
        let attr = self.attr_of(ino, space, &Entry::Dir);
        Ok(self.with_dir_meta(attr, space, &key).await)
    }

    pub async fn symlink(&self, parent: u64, name: &OsStr, target: &std::path::Path, caller: Caller) -> FsResult<Attr> {
        use std::os::unix::ffi::OsStrExt;

        let (space, dir) = self.dir_target(parent)?;
        let name = validate_name(name)?;
        let key = child_key(&dir, name);
        check_key_length(&self.spaces[space].key_prefix, &key, false)?;
        self.check_writable(space)?;
        if self.entry(space, &key, false).await? != Entry::Missing {
            return Err(FsError::new(libc::EEXIST, self.spaces[space].describe(&key)));
        }

        let meta = PosixMeta::symlink(caller.uid, caller.gid, SystemTime::now());
        let writer = Writer::new(&self.staging, None, meta)?;
        writer.write(0, target.as_os_str().as_bytes()).await?;
        let handle = &self.spaces[space];
        let stat = writer
            .upload(handle, &handle.meta_target, &key, &self.upload)
            .await?
            .ok_or_else(|| FsError::io("symlink upload skipped"))?;
        self.meta.forget_meta(space, &key);
        let entry = Entry::File(stat);
        self.meta.insert_entry(space, &key, entry.clone());
        self.meta.remove_listing(space, &dir);
        let ino = self.inodes.lookup(space, &key, Kind::Symlink);
        Ok(self.attr_of(ino, space, &entry))
    }

    pub async fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (space, dir) = self.dir_target(parent)?;
        let name = validate_name(name)?;
        let key = child_key(&dir, name);
        self.check_writable(space)?;
        let handle = &self.spaces[space];

        let entry = self.entry(space, &key, false).await?;
        match entry {
            Entry::Missing => return Err(FsError::not_found(handle.describe(&key))),
            Entry::Dir => return Err(FsError::new(libc::EISDIR, handle.describe(&key))),
            Entry::File(_) => {}
        }

        let pending = self.inodes.peek(space, &key).and_then(|ino| self.writer_of(ino));
        if let Some(writer) = &pending {
            writer.mark_unlinked().await;
        }
        // Content waiting in the write-back journal must never reach the store now.
        self.journal.forget(handle.name(), &object_path(&key)?).await;
        if let Some(ino) = self.inodes.peek(space, &key) {
            if lock(&self.journal_pins).contains(&ino) && self.detach_writer(ino, None) {
                self.unpin(ino);
            }
        }
        if let Some(path) = handle.local_path(&key) {
            // The local store's delete also removes emptied parent directories, which
            // would make the directory vanish; remove the file alone.
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound && pending.is_some() => {}
                Err(err) => return Err(FsError::from_io(err, &handle.describe(&key))),
            }
        } else {
            match handle.space.store.delete(&object_path(&key)?).await {
                Ok(()) => {}
                Err(object_store::Error::NotFound { .. }) if pending.is_some() => {}
                Err(err) => return Err(FsError::from_store(err, &handle.describe(&key))),
            }
        }

        self.inodes.unlink(space, &key);
        self.meta.forget_meta(space, &key);
        self.meta.insert_entry(space, &key, Entry::Missing);
        self.meta.patch_listing(space, &dir, name, None);
        self.keep_parent(space, &dir).await
    }

    /// Keeps `dir` as a directory after an entry was removed from it, unless its cached
    /// listing shows that entries remain (which saves a listing request per unlink).
    async fn keep_parent(&self, space: usize, dir: &str) -> FsResult<()> {
        if self.meta.listing(space, dir).is_some_and(|listing| !listing.is_empty()) {
            return Ok(());
        }
        namespace::keep_dir(&self.spaces[space], dir).await
    }

    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (space, dir) = self.dir_target(parent)?;
        let name = validate_name(name)?;
        let key = child_key(&dir, name);
        self.check_writable(space)?;
        let handle = &self.spaces[space];

        match self.entry(space, &key, false).await? {
            Entry::Dir => {}
            Entry::Missing => return Err(FsError::not_found(handle.describe(&key))),
            Entry::File(_) => return Err(FsError::new(libc::ENOTDIR, handle.describe(&key))),
        }
        if !namespace::is_dir_empty(handle, &key).await? || !self.pending_children(space, &key).is_empty() {
            return Err(FsError::new(libc::ENOTEMPTY, handle.describe(&key)));
        }

        namespace::remove_dir(handle, &key).await?;
        self.dir_meta.invalidate(space, &key);
        self.inodes.unlink(space, &key);
        self.meta.remove_tree(space, &key);
        self.meta.insert_entry(space, &key, Entry::Missing);
        self.meta.patch_listing(space, &dir, name, None);
        self.keep_parent(space, &dir).await
    }

    /// Renames a file or directory within one space. A directory rename copies every
    /// object below it, so it is not atomic on S3.
    pub async fn rename(&self, parent: u64, name: &OsStr, new_parent: u64, new_name: &OsStr, flags: u32) -> FsResult<()> {
        let (space, dir) = self.dir_target(parent)?;
        let (new_space, new_dir) = self.dir_target(new_parent)?;
        if space != new_space {
            return Err(FsError::new(libc::EXDEV, "rename across spaces"));
        }
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(FsError::new(libc::EINVAL, "RENAME_EXCHANGE is not supported"));
        }
        let from = child_key(&dir, validate_name(name)?);
        let to = child_key(&new_dir, validate_name(new_name)?);
        self.check_writable(space)?;
        let handle = &self.spaces[space];

        let source = self.entry(space, &from, false).await?;
        let target = self.entry(space, &to, false).await?;
        if source == Entry::Missing {
            return Err(FsError::not_found(handle.describe(&from)));
        }
        if from == to {
            return Ok(());
        }
        let source_is_dir = source == Entry::Dir;
        check_key_length(&handle.key_prefix, &to, source_is_dir)?;
        if target != Entry::Missing && flags & libc::RENAME_NOREPLACE != 0 {
            return Err(FsError::new(libc::EEXIST, handle.describe(&to)));
        }
        if source_is_dir && to.starts_with(&format!("{from}/")) {
            return Err(FsError::new(libc::EINVAL, "cannot move a directory into itself"));
        }
        match (&target, source_is_dir) {
            (Entry::Dir, false) => return Err(FsError::new(libc::EISDIR, handle.describe(&to))),
            (Entry::File(_), true) => return Err(FsError::new(libc::ENOTDIR, handle.describe(&to))),
            (Entry::Dir, true) => {
                if !namespace::is_dir_empty(handle, &to).await? {
                    return Err(FsError::new(libc::ENOTEMPTY, handle.describe(&to)));
                }
                namespace::remove_dir(handle, &to).await?;
            }
            _ => {}
        }

        if source_is_dir {
            self.rename_dir(space, &from, &to).await?;
        } else {
            self.rename_file(space, &from, &to).await?;
        }

        // A replaced file whose content waited in the journal is gone with its entry.
        if let Some(replaced) = self.inodes.peek(space, &to) {
            if lock(&self.journal_pins).contains(&replaced) && self.detach_writer(replaced, None) {
                self.unpin(replaced);
            }
        }
        self.inodes.rename(space, &from, &to);
        self.meta.remove_tree(space, &from);
        self.meta.remove_tree(space, &to);
        self.meta.insert_entry(space, &from, Entry::Missing);
        self.meta.remove_listing(space, &dir);
        self.meta.remove_listing(space, &new_dir);
        if dir != new_dir {
            namespace::keep_dir(handle, &dir).await?;
        }
        Ok(())
    }

    async fn rename_file(&self, space: usize, from: &str, to: &str) -> FsResult<()> {
        let handle = &self.spaces[space];
        let ino = self.inodes.peek(space, from);

        // Content written but not uploaded yet must exist in the store before it moves.
        if let Some(ino) = ino {
            if let Some(writer) = self.writer_of(ino) {
                self.upload(ino, space, &writer).await?;
            }
        }

        let from_path = object_path(from)?;
        let to_path = object_path(to)?;
        // Pending journal entries move first and wait until the store rename is done, so
        // an older stored version never overwrites newer pending content.
        let pending = self.journal.rename(handle.name(), &from_path, &to_path).await.map_err(journal_error)?;
        match crate::upload::rename_object(&handle.space, &from_path, &to_path, &self.upload).await {
            Ok(()) => {}
            // The content exists only in the journal so far.
            Err(crate::upload::UploadError::Store(object_store::Error::NotFound { .. })) if pending.renamed > 0 => {}
            Err(err) => return Err(FsError::new(err.errno(), format!("rename {} to {to}: {err}", handle.describe(from)))),
        }
        drop(pending);

        if let Some(ino) = ino {
            let new_etag = match namespace::head_file(handle, to).await {
                Ok(Entry::File(stat)) => stat.etag,
                _ => None,
            };
            for file in lock(&self.files).values().filter(|f| f.ino == ino) {
                if let Some(reader) = &file.reader {
                    reader.relocate(to, new_etag.clone());
                }
            }
        }
        Ok(())
    }

    async fn rename_dir(&self, space: usize, from: &str, to: &str) -> FsResult<()> {
        let handle = &self.spaces[space];
        let _pending = self
            .journal
            .rename(handle.name(), &object_path(from)?, &object_path(to)?)
            .await
            .map_err(journal_error)?;
        if let (Some(from_path), Some(to_path)) = (handle.local_path(from), handle.local_path(to)) {
            return tokio::fs::rename(&from_path, &to_path)
                .await
                .map_err(|err| FsError::from_io(err, &handle.describe(from)));
        }

        let objects = namespace::list_tree(handle, from).await?;
        let marker = object_path(from)?;
        let mut had_marker = false;
        for object in objects {
            if object.location == marker {
                had_marker = true;
                continue;
            }
            let old_key = object.location.to_string();
            let new_key = format!("{to}{}", &old_key[from.len()..]);
            let new_path = object_path(&new_key)?;
            match crate::upload::rename_object(&handle.space, &object.location, &new_path, &self.upload).await {
                Ok(()) => {}
                // A listing shows a subdirectory's `sub/` marker as `sub`, which no HEAD
                // finds: move the marker instead.
                Err(crate::upload::UploadError::Store(object_store::Error::NotFound { .. })) if object.size == 0 => {
                    let meta = self.dir_meta.get(handle, space, &old_key).await;
                    if meta.is_empty() {
                        namespace::make_dir(handle, &new_key).await?;
                    } else {
                        self.dir_meta.set(handle, space, &new_key, &meta).await?;
                    }
                    namespace::remove_dir(handle, &old_key).await?;
                    self.dir_meta.invalidate(space, &old_key);
                }
                Err(err) => {
                    let message = format!("rename {} to {new_key}: {err}", handle.describe(&old_key));
                    return Err(FsError::new(err.errno(), message));
                }
            }
        }
        let meta = self.dir_meta.get(handle, space, from).await;
        if !meta.is_empty() {
            self.dir_meta.set(handle, space, to, &meta).await?;
        } else if had_marker || namespace::is_dir_empty(handle, to).await? {
            namespace::make_dir(handle, to).await?;
        }
        if had_marker {
            namespace::remove_dir(handle, from).await?;
        }
        self.dir_meta.invalidate(space, from);
        Ok(())
    }

    /// Changes size, permissions, owner or mtime. Changes to an open, written file go
    /// out with its next upload; otherwise they are stored right away.
    pub async fn setattr(&self, ino: u64, fh: Option<u64>, change: SetAttr) -> FsResult<Attr> {
        let Target::Entry { space, key, kind } = self.target(ino)? else {
            return Err(FsError::new(libc::EPERM, "the mount root cannot be changed"));
        };
        self.check_writable(space)?;
        let handle = &self.spaces[space];

        if kind == Kind::Dir {
            if change.size.is_some() {
                return Err(FsError::new(libc::EISDIR, handle.describe(&key)));
            }
            self.set_dir_attr(space, &key, &change).await?;
            return self.getattr(ino).await;
        }

        let handle_writer = fh.and_then(|fh| lock(&self.files).get(&fh).and_then(|f| f.writer.clone()));
        let mut writer = handle_writer.or_else(|| self.writer_of(ino));
        let temporary = writer.is_none() && change.size.is_some();
        if temporary {
            let stat = match self.entry(space, &key, true).await? {
                Entry::File(stat) => stat,
                _ => return Err(FsError::not_found(handle.describe(&key))),
            };
            writer = Some(self.writer_for_existing(ino, space, &key, &stat, change.size == Some(0))?);
        }

        match writer {
            Some(writer) => {
                if let Some(size) = change.size {
                    writer.truncate(size).await?;
                }
                if change.mode.is_some() || change.uid.is_some() || change.gid.is_some() || change.mtime.is_some() {
                    writer.update_meta(|meta| apply_change(meta, &change));
                } else if change.size.is_some() && writer.meta().mtime.is_some() {
                    writer.update_meta(|meta| meta.mtime = Some(SystemTime::now()));
                }
                if temporary {
                    let result = self.upload(ino, space, &writer).await;
                    // A handle opened meanwhile may hold the writer: it stays then.
                    if self.detach_writer(ino, Some(&writer)) {
                        self.unpin(ino);
                    }
                    result?;
                } else if !self.has_open_writer(ino) {
                    // A closed file whose content waits in the journal: record the change too.
                    self.upload(ino, space, &writer).await?;
                }
            }
            None => {
                let entry = self.entry(space, &key, true).await?;
                let Entry::File(stat) = entry else {
                    return Err(FsError::not_found(handle.describe(&key)));
                };
                let mut meta = stat.meta.as_deref().cloned().unwrap_or_default();
                apply_change(&mut meta, &change);
                let path = object_path(&key)?;
                crate::posix_meta::write_meta(&handle.space, &handle.meta_target, &path, &meta, &self.upload)
                    .await
                    .map_err(|err| FsError::io(format!("{}: cannot store metadata: {err}", handle.describe(&key))))?;
                self.meta.forget_meta(space, &key);
                self.meta.remove_entry(space, &key);
                self.meta.remove_listing(space, split_key(&key).0);
            }
        }
        self.getattr(ino).await
    }

    /// Applies chmod, chown and utimes to a directory: on the real directory of a local
    /// space, on the marker of an S3 directory.
    async fn set_dir_attr(&self, space: usize, key: &str, change: &SetAttr) -> FsResult<()> {
        let handle = &self.spaces[space];
        let Some(path) = handle.local_path(key) else {
            let mut meta = self.dir_meta.get(handle, space, key).await;
            apply_change(&mut meta, change);
            return self.dir_meta.set(handle, space, key, &meta).await;
        };
        if let Some(mode) = change.mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|err| FsError::from_io(err, &handle.describe(key)))?;
        }
        if let Some(mtime) = change.mtime {
            let dir = std::fs::File::open(&path).map_err(|err| FsError::from_io(err, &handle.describe(key)))?;
            dir.set_modified(mtime).map_err(|err| FsError::from_io(err, &handle.describe(key)))?;
        }
        Ok(())
    }

    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: 1 << 32,
            blocks_free: 1 << 31,
            files: 1 << 32,
            files_free: (1 << 32) - self.inodes.len() as u64,
            block_size: 4096,
            name_max: NAME_MAX_BYTES as u32,
        }
    }

    // -- extended attributes ------------------------------------------------------------

    /// Returns the space, key, kind and stored metadata of `ino`, or `None` for the
    /// mount root and the space roots, which have no extended attributes.
    async fn xattr_source(&self, ino: u64) -> FsResult<Option<(usize, String, Kind, PosixMeta)>> {
        let Target::Entry { space, key, kind } = self.target(ino)? else { return Ok(None) };
        if key.is_empty() {
            return Ok(None);
        }
        let handle = &self.spaces[space];
        let meta = if kind == Kind::Dir {
            match handle.local_path(&key) {
                Some(path) => crate::posix_meta::read_local_dir_meta(&path)
                    .map_err(|err| FsError::from_io(err, &handle.describe(&key)))?,
                None => self.dir_meta.get(handle, space, &key).await,
            }
        } else if let Some(writer) = self.writer_of(ino) {
            writer.meta()
        } else {
            match self.entry(space, &key, true).await? {
                Entry::File(stat) => stat.meta.as_deref().cloned().unwrap_or_default(),
                _ => return Err(FsError::not_found(handle.describe(&key))),
            }
        };
        Ok(Some((space, key, kind, meta)))
    }

    /// Returns the value of extended attribute `name`. Only `user.*` attributes exist.
    pub async fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        let name = name.to_str().unwrap_or_default();
        let not_found = || FsError::new(libc::ENODATA, format!("no extended attribute {name:?}"));
        if !name.starts_with("user.") {
            return Err(not_found());
        }
        let Some((_, _, _, meta)) = self.xattr_source(ino).await? else { return Err(not_found()) };
        meta.get_xattr(name).map(<[u8]>::to_vec).map_err(xattr_error)
    }

    /// Names of the extended attributes, each followed by a NUL byte.
    pub async fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        Ok(match self.xattr_source(ino).await? {
            Some((_, _, _, meta)) => meta.list_xattrs(),
            None => Vec::new(),
        })
    }

    pub async fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let name = name
            .to_str()
            .ok_or_else(|| FsError::new(libc::EINVAL, format!("extended attribute name {name:?} is not UTF-8")))?;
        let mode = crate::posix_meta::XattrSetMode::from_flags(flags);
        self.change_xattrs(ino, |meta| meta.set_xattr(name, value, mode)).await
    }

    pub async fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        let name = name.to_str().unwrap_or_default();
        self.change_xattrs(ino, |meta| meta.remove_xattr(name)).await
    }

    /// Applies `change` to the extended attributes of `ino` and stores them: with the
    /// next upload of a file being written, on the marker of an S3 directory, or by
    /// rewriting the object's metadata.
    async fn change_xattrs(
        &self,
        ino: u64,
        change: impl FnOnce(&mut PosixMeta) -> Result<(), crate::posix_meta::XattrError>,
    ) -> FsResult<()> {
        let unsupported = || FsError::new(libc::EOPNOTSUPP, format!("inode {ino} cannot store extended attributes"));
        let Some((space, key, kind, mut meta)) = self.xattr_source(ino).await? else { return Err(unsupported()) };
        self.check_writable(space)?;
        change(&mut meta).map_err(xattr_error)?;
        let handle = &self.spaces[space];

        if kind == Kind::Dir {
            return match handle.local_path(&key) {
                Some(path) => crate::posix_meta::write_local_dir_meta(&path, &meta)
                    .map_err(|err| FsError::from_io(err, &handle.describe(&key))),
                None if handle.markers.is_some() => self.dir_meta.set(handle, space, &key, &meta).await,
                None => Err(unsupported()),
            };
        }

        if let Some(writer) = self.writer_of(ino) {
            let xattrs = meta.xattrs;
            writer.update_meta(|stored| stored.xattrs = xattrs);
            if !self.has_open_writer(ino) {
                self.upload(ino, space, &writer).await?;
            }
            return Ok(());
        }

        let path = object_path(&key)?;
        crate::posix_meta::write_meta(&handle.space, &handle.meta_target, &path, &meta, &self.upload)
            .await
            .map_err(|err| FsError::io(format!("{}: cannot store extended attributes: {err}", handle.describe(&key))))?;
        self.meta.forget_meta(space, &key);
        self.meta.remove_entry(space, &key);
        self.meta.remove_listing(space, split_key(&key).0);
        Ok(())
    }

    /// True when some handle has `ino` open for writing.
    fn has_open_writer(&self, ino: u64) -> bool {
        lock(&self.files).values().any(|f| f.ino == ino && f.writer.is_some())
    }

    /// Returns true when the write-back journal contains content for the key of `ino`.
    async fn journal_pending(&self, ino: u64, space: usize) -> bool {
        let Some(Target::Entry { key, .. }) = self.inodes.target(ino) else { return false };
        let Ok(path) = object_path(&key) else { return false };
        self.journal.pending(self.spaces[space].name(), &path).await.is_some()
    }

    /// Starts the task that drops the writer of a closed file once the journal has
    /// uploaded it, so that later reads go to the store again. Call once after mounting.
    pub fn start_write_back(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let mut uploaded = self.journal.subscribe_uploaded();
        tokio::spawn(async move {
            loop {
                let (space_name, path) = match uploaded.recv().await {
                    Ok(event) => event,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "missed write-back upload events; their writers stay until unmount");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let Some(fs) = weak.upgrade() else { return };
                fs.writer_uploaded(&space_name, &path).await;
            }
        });
    }

    async fn writer_uploaded(&self, space_name: &str, path: &object_store::path::Path) {
        let Some(space) = self.spaces.iter().position(|s| s.name() == space_name) else { return };
        let key = path.as_ref();
        self.meta.forget_meta(space, key);
        self.meta.remove_entry(space, key);
        self.meta.remove_listing(space, split_key(key).0);

        let Some(ino) = self.inodes.peek(space, key) else { return };
        let Some(writer) = self.writer_of(ino) else { return };
        if writer.is_dirty() || self.journal.pending(space_name, path).await.is_some() {
            return;
        }
        if self.detach_writer(ino, Some(&writer)) {
            self.unpin(ino);
        }
    }

    /// Uploads every file that still has changes (used at unmount).
    pub async fn flush_all(&self) -> FsResult<()> {
        // Writers of closed files count too: a close whose upload failed keeps its writer.
        let pending: Vec<(u64, usize, Arc<Writer>)> = {
            let writers = lock(&self.writers);
            writers
                .iter()
                .filter_map(|(ino, writer)| match self.inodes.target(*ino)? {
                    Target::Entry { space, .. } => Some((*ino, space, Arc::clone(writer))),
                    Target::Root => None,
                })
                .collect()
        };
        let mut first_error = Ok(());
        for (index, (ino, space, writer)) in pending.iter().enumerate() {
            if !writer.is_dirty() {
                continue;
            }
            tracing::info!(file = index + 1, of = pending.len(), "uploading a dirty file before unmount");
            if let Err(err) = self.upload(*ino, *space, writer).await {
                tracing::error!(error = %err, "upload before unmount failed");
                if first_error.is_ok() {
                    first_error = Err(err);
                }
            }
        }

        let left = self.journal.flush(UNMOUNT_UPLOAD_WAIT).await;
        if left > 0 && first_error.is_ok() {
            first_error = Err(FsError::io(format!(
                "{left} write-back uploads did not finish within {UNMOUNT_UPLOAD_WAIT:?}; they stay in the journal and resume on the next mount"
            )));
        }
        first_error
    }
}

/// Returns the entry a listing gives for `name`, or `None` when it lists `name`
/// without attributes.
fn entry_in_listing(listing: &[DirEntry], name: &str) -> Option<Entry> {
    Some(match listing.binary_search_by(|e| e.name.as_str().cmp(name)) {
        Ok(index) => match &listing[index] {
            DirEntry { kind: Kind::Dir, .. } => Entry::Dir,
            DirEntry { stat: Some(stat), .. } => Entry::File(stat.clone()),
            _ => return None,
        },
        Err(_) => Entry::Missing,
    })
}

fn apply_change(meta: &mut PosixMeta, change: &SetAttr) {
    if let Some(mode) = change.mode {
        meta.set_permissions(mode, S_IFREG);
    }
    if let Some(uid) = change.uid {
        meta.uid = Some(uid);
    }
    if let Some(gid) = change.gid {
        meta.gid = Some(gid);
    }
    if let Some(mtime) = change.mtime {
        meta.mtime = Some(mtime);
    }
}


/// How long unmount waits for write-back uploads before leaving them in the journal.
const UNMOUNT_UPLOAD_WAIT: Duration = Duration::from_secs(300);

fn journal_error(err: crate::journal::JournalError) -> FsError {
    FsError::new(err.errno(), err.to_string())
}

/// Opens the write-back journal below `cache.dir`. The uploader starts at once, so
/// entries left by an earlier process (a crash, or a mount with a delay) are uploaded.
fn open_journal(config: &Config, spaces: &[Arc<SpaceHandle>]) -> FsResult<Arc<Journal>> {
    let targets = spaces
        .iter()
        .map(|handle| {
            let space = JournalSpace { space: handle.space.clone(), target: handle.meta_target.clone() };
            (handle.name().to_string(), space)
        })
        .collect();
    let settings = JournalSettings::new(config.cache.dir.join("journal"), config.cache.write_back_delay);
    let journal = Journal::open(settings, targets, UploadSettings::default()).map_err(journal_error)?;
    journal.spawn_uploader();
    Ok(journal)
}

fn xattr_error(err: crate::posix_meta::XattrError) -> FsError {
    FsError::new(err.errno(), err.to_string())
}
