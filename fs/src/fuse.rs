//! The thin adapter between fuser 0.18 and [`DatanetFs`].
//!
//! fuser's API changed in each of its releases 0.16, 0.17 and 0.18, so it is pinned in
//! `Cargo.toml` and used only here. Each request that may wait on the network is moved
//! into a tokio task together with its reply object, so one slow request never blocks
//! the FUSE read loops. Every request runs in a `tracing` span with its request id and
//! inode; no request logs file contents or credentials.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::Instrument;

use crate::error::FsError;
use crate::filesystem::{Attr, Caller, DatanetFs, SetAttr};
use crate::inode::Kind;

/// Largest write request the kernel sends; bounds the memory of each read loop.
const MAX_WRITE_BYTES: u32 = 1 << 20;

/// Entries prepared for one readdirplus reply. Each 4 KiB of the kernel's reply buffer
/// fits about 25 entries with short names, and entries that do not fit are given back.
const READDIRPLUS_BATCH: usize = 256;

pub struct FuseAdapter {
    fs: Arc<DatanetFs>,
    runtime: tokio::runtime::Handle,
}

impl FuseAdapter {
    pub fn new(fs: Arc<DatanetFs>, runtime: tokio::runtime::Handle) -> Self {
        FuseAdapter { fs, runtime }
    }

    /// Runs `work` on the runtime inside a span for this request.
    fn spawn<F>(&self, op: &'static str, req: &Request, ino: u64, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let span = tracing::debug_span!("fuse", op, req = req.unique().0, ino);
        self.runtime.spawn(work.instrument(span));
    }
}

fn errno(err: &FsError) -> Errno {
    if err.errno == libc::ENOENT {
        tracing::trace!(error = %err, "reply");
    } else {
        tracing::debug!(error = %err, "reply");
    }
    Errno::from_i32(err.errno)
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.mtime,
        crtime: attr.mtime,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

fn time_of(value: TimeOrNow) -> SystemTime {
    match value {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE_BYTES);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Lookups and readdir in one directory may run in parallel; without this the
        // kernel serializes them per directory.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS) {
            tracing::debug!(?missing, "kernel does not offer parallel directory operations");
        }
        // Attributes come with the directory entries, so `find` and `ls -l` need no
        // lookup per entry whose metadata is cached already.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS) {
            tracing::debug!(?missing, "kernel does not offer readdirplus");
        }
        tracing::info!(spaces = ?self.fs.space_names(), "filesystem initialized");
        Ok(())
    }

    fn destroy(&mut self) {
        tracing::info!("filesystem unmounted");
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_os_string();
        self.spawn("lookup", req, parent.0, async move {
            match fs.lookup(parent.0, &name).await {
                Ok(attr) => reply.entry(&fs.ttl(), &file_attr(&attr), Generation(0)),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let fs = Arc::clone(&self.fs);
        self.spawn("getattr", req, ino.0, async move {
            match fs.getattr(ino.0).await {
                Ok(attr) => reply.attr(&fs.ttl(), &file_attr(&attr)),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let fs = Arc::clone(&self.fs);
        let change = SetAttr {
            size,
            mode,
            uid,
            gid,
            mtime: mtime.map(time_of),
        };
        self.spawn("setattr", req, ino.0, async move {
            match fs.setattr(ino.0, fh.map(|fh| fh.0), change).await {
                Ok(attr) => reply.attr(&fs.ttl(), &file_attr(&attr)),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = Arc::clone(&self.fs);
        self.spawn("readlink", req, ino.0, async move {
            match fs.readlink(ino.0).await {
                Ok(target) => reply.data(&target),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_os_string();
        self.spawn("mkdir", req, parent.0, async move {
            match fs.mkdir(parent.0, &name, mode & !umask).await {
                Ok(attr) => reply.entry(&fs.ttl(), &file_attr(&attr), Generation(0)),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_os_string();
        self.spawn("unlink", req, parent.0, async move {
            match fs.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_os_string();
        self.spawn("rmdir", req, parent.0, async move {
            match fs.rmdir(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let fs = Arc::clone(&self.fs);
        let name = link_name.to_os_string();
        let target = target.to_path_buf();
        let caller = caller(req);
        self.spawn("symlink", req, parent.0, async move {
            match fs.symlink(parent.0, &name, &target, caller).await {
                Ok(attr) => reply.entry(&fs.ttl(), &file_attr(&attr), Generation(0)),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_os_string();
        let newname = newname.to_os_string();
        self.spawn("rename", req, parent.0, async move {
            match fs.rename(parent.0, &name, newparent.0, &newname, flags.bits()).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        // One file is one object: there is no second name for the same object.
        reply.error(Errno::EPERM);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fs = Arc::clone(&self.fs);
        self.spawn("open", req, ino.0, async move {
            match fs.open(ino.0, flags.0).await {
                Ok(opened) => {
                    let fopen = if opened.keep_cache { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
                    reply.opened(FileHandle(opened.fh), fopen);
                }
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = Arc::clone(&self.fs);
        self.spawn("read", req, ino.0, async move {
            match fs.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let fs = Arc::clone(&self.fs);
        let data = data.to_vec();
        self.spawn("write", req, ino.0, async move {
            match fs.write_bytes(fh.0, offset, data.into()).await {
                Ok(written) => reply.written(written),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        self.spawn("flush", req, ino.0, async move {
            match fs.flush(fh.0).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let fs = Arc::clone(&self.fs);
        self.spawn("release", req, ino.0, async move {
            match fs.release(fh.0).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn fsync(&self, req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        self.spawn("fsync", req, ino.0, async move {
            match fs.flush(fh.0).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = Arc::clone(&self.fs);
        self.spawn("opendir", req, ino.0, async move {
            match fs.opendir(ino.0).await {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.fs.readdir(fh.0, offset) {
            Ok(items) => {
                for (next_offset, item) in items {
                    if reply.add(INodeNo(item.ino), next_offset, file_type(item.kind), &item.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(err) => reply.error(errno(&err)),
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        match self.fs.readdirplus(ino.0, fh.0, offset, READDIRPLUS_BATCH) {
            Ok(items) => {
                let mut full = false;
                for entry in items {
                    let attr = file_attr(&entry.attr);
                    full = full || reply.add(INodeNo(entry.attr.ino), entry.offset, &entry.item.name, &entry.ttl, &attr, Generation(0));
                    if full && entry.counted {
                        // The entry did not fit, so the kernel never receives it.
                        self.fs.forget(entry.attr.ino, 1);
                    }
                }
                reply.ok();
            }
            Err(err) => reply.error(errno(&err)),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let stat = self.fs.statfs();
        reply.statfs(
            stat.blocks,
            stat.blocks_free,
            stat.blocks_free,
            stat.files,
            stat.files_free,
            stat.block_size,
            stat.name_max,
            stat.block_size,
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_os_string();
        self.spawn("getxattr", req, ino.0, async move {
            match fs.getxattr(ino.0, &name).await {
                Ok(value) => reply_xattr(reply, size, &value),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let fs = Arc::clone(&self.fs);
        self.spawn("listxattr", req, ino.0, async move {
            match fs.listxattr(ino.0).await {
                Ok(names) => reply_xattr(reply, size, &names),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_os_string();
        let value = value.to_vec();
        self.spawn("setxattr", req, ino.0, async move {
            match fs.setxattr(ino.0, &name, &value, flags).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_os_string();
        self.spawn("removexattr", req, ino.0, async move {
            match fs.removexattr(ino.0, &name).await {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let fs = Arc::clone(&self.fs);
        let name = name.to_os_string();
        let caller = caller(req);
        self.spawn("create", req, parent.0, async move {
            match fs.create(parent.0, &name, mode & !umask, flags, caller).await {
                Ok((attr, opened)) => reply.created(
                    &fs.ttl(),
                    &file_attr(&attr),
                    Generation(0),
                    FileHandle(opened.fh),
                    FopenFlags::empty(),
                ),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }
}

/// Answers a getxattr or listxattr request: the size when `size` is 0, ERANGE when the
/// value does not fit in `size` bytes, the value otherwise.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(value);
    }
}
