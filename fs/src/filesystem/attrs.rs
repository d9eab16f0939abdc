//! Attribute changes, statfs and extended attributes. A change to an open, written file
//! goes out with its next upload; otherwise it is stored at once.

use super::*;

impl DatanetFs {
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

fn xattr_error(err: crate::posix_meta::XattrError) -> FsError {
    FsError::new(err.errno(), err.to_string())
}
