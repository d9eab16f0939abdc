//! Open files: open, read, create, write, flush and release. Every open revalidates
//! the object (close-to-open), and a handle reads only the object version it opened.

use super::*;

impl DatanetFs {
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
    pub(super) fn writer_for_existing(&self, ino: u64, space: usize, key: &str, stat: &FileStat, truncate: bool) -> FsResult<Arc<Writer>> {
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
    pub(super) fn detach_writer(&self, ino: u64, expected: Option<&Arc<Writer>>) -> bool {
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

    pub(super) async fn upload(&self, ino: u64, space: usize, writer: &Writer) -> FsResult<()> {
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
    pub(super) fn unpin(&self, ino: u64) {
        if lock(&self.journal_pins).remove(&ino) {
            self.inodes.close(ino);
        }
    }
}
