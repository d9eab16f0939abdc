//! Directory handles: opendir, readdir and readdirplus. `opendir` takes a snapshot of
//! the listing, so an offset names the same entry for as long as the handle is open.

use super::*;

impl DatanetFs {
    /// Lists a directory, from the cache when fresh.
    pub(super) async fn listing(&self, space: usize, dir: &str) -> FsResult<Arc<Vec<DirEntry>>> {
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
    pub(super) fn pending_children(&self, space: usize, dir: &str) -> Vec<(String, Kind)> {
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
}
