//! Changes to the tree: mkdir, symlink, unlink, rmdir and rename. Content that waits
//! in the write-back journal follows a rename and is dropped with an unlink.

use super::*;

impl DatanetFs {
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
}
