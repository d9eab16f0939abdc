//! The datanet filesystem, independent of the FUSE library.
//!
//! [`DatanetFs`] implements every operation as an async method on inode numbers and
//! returns [`FsError`] with the errno to report. `crate::fuse` only translates requests
//! and replies, so everything here runs in unit tests without a kernel mount. The mount
//! root (inode 1) lists the spaces and is read-only; `/<space>/<key>` is the object
//! `<key>` of that space.
//!
//! This module contains the shared state, inode resolution, lookup and getattr. The
//! other operations are grouped by kind in the submodules: `readdir` (directory
//! handles), `file_io` (open files), `tree` (creating, removing and renaming names),
//! `attrs` (attribute changes and extended attributes) and `writeback` (the journal
//! and unmount).

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

mod attrs;
mod file_io;
mod readdir;
mod tree;
mod writeback;

use writeback::{journal_error, open_journal};

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


    fn check_writable(&self, space: usize) -> FsResult<()> {
        let config = &self.spaces[space].space.config;
        if config.read_only {
            return Err(FsError::read_only(&config.name));
        }
        Ok(())
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
