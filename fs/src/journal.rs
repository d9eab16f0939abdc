//! The write-back journal: closed files whose upload is delayed, kept on local disk so
//! that a crash loses nothing that `close` or `fsync` acknowledged.
//!
//! Each entry is two files in the journal directory: `<id>.data` (the content) and
//! `<id>.json` (space, path, size and metadata). [`Journal::record`] makes both durable
//! (data synced, entry written to a temporary name, synced, renamed, directory synced)
//! before it returns, so the entry file existing means the write was acknowledged. A
//! background task uploads entries once the write-back delay has passed, retrying with
//! backoff while the store fails; [`Journal::open`] loads the entries left by an earlier
//! process so their uploads resume.
//!
//! Invariants: an entry that is renamed or forgotten (unlink) never reaches the store
//! under its old path, because those operations wait for an upload in flight and then
//! rewrite or delete the entry. At most one entry exists per path, because a newer
//! record replaces the older one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::path::Path as ObjectPath;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, MutexGuard, Notify, OwnedMutexGuard};

use crate::posix_meta::{MetaTarget, PosixMeta};
use crate::staging::FrozenStaging;
use crate::store::Space;
use crate::upload::{upload_file, UploadSettings};

/// Uploads in flight at once from the journal.
const MAX_PARALLEL_UPLOADS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("write-back journal {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("space {0:?} is not configured")]
    UnknownSpace(String),

    #[error("write-back journal {dir} is in use by another datanet process; give each mount its own cache.dir")]
    InUse { dir: PathBuf },
}

impl JournalError {
    pub fn errno(&self) -> i32 {
        match self {
            JournalError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            JournalError::UnknownSpace(_) | JournalError::InUse { .. } => libc::EIO,
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Clone)]
pub struct JournalSettings {
    pub dir: PathBuf,
    /// Time between `close` and the upload.
    pub delay: Duration,
    /// First and largest pause between attempts while the store fails.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl JournalSettings {
    pub fn new(dir: PathBuf, delay: Duration) -> JournalSettings {
        JournalSettings {
            dir,
            delay,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// The entry file's content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct EntryRecord {
    id: u64,
    space: String,
    path: String,
    size_bytes: u64,
    /// The metadata map of [`PosixMeta::to_map`].
    meta: BTreeMap<String, String>,
}

/// Entries by id.
type Table = BTreeMap<u64, Entry>;

struct Entry {
    record: EntryRecord,
    /// Held while this entry is uploaded; rename and forget take it to wait for that.
    upload_lock: Arc<Mutex<()>>,
    due: Instant,
    attempts: u32,
}

/// A space the journal can upload to.
#[derive(Debug, Clone)]
pub struct JournalSpace {
    pub space: Space,
    pub target: MetaTarget,
}

/// A pending (not yet uploaded) file, as readers of the namespace see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingFile {
    pub path: ObjectPath,
    pub data_path: PathBuf,
    pub size_bytes: u64,
    pub meta: PosixMeta,
}

pub struct Journal {
    /// Holds an exclusive `flock` on the journal directory for the life of the journal.
    _lock: File,
    settings: JournalSettings,
    spaces: BTreeMap<String, JournalSpace>,
    upload: UploadSettings,
    entries: Mutex<BTreeMap<u64, Entry>>,
    next_id: AtomicU64,
    wake: Notify,
    /// Signalled whenever an entry leaves the journal.
    drained: Notify,
    /// Space and path of every finished upload, for callers that keep state until then.
    uploaded: tokio::sync::broadcast::Sender<(String, ObjectPath)>,
}

/// Entries of a rename, held so that they cannot be uploaded until the caller has
/// finished renaming the objects in the store.
pub struct RenameGuard {
    _locks: Vec<OwnedMutexGuard<()>>,
    pub renamed: usize,
}

impl Journal {
    /// Opens (creating if needed) the journal and loads the entries of an earlier process;
    /// they are due at once. Call [`Journal::spawn_uploader`] next.
    pub fn open(
        settings: JournalSettings,
        spaces: BTreeMap<String, JournalSpace>,
        upload: UploadSettings,
    ) -> Result<Arc<Journal>, JournalError> {
        crate::private_dir::create_dir(&settings.dir).map_err(io_error(&settings.dir))?;
        let lock = lock_dir(&settings.dir)?;
        let records = load_records(&settings.dir)?;

        let now = Instant::now();
        let mut entries = BTreeMap::new();
        let mut max_id = 0;
        for record in records {
            max_id = max_id.max(record.id);
            if !spaces.contains_key(&record.space) {
                tracing::error!(id = record.id, space = %record.space, path = %record.path,
                    "journal entry for a space that is not configured; kept until the space is configured again");
            }
            let entry = Entry { record, upload_lock: Arc::new(Mutex::new(())), due: now, attempts: 0 };
            entries.insert(entry.record.id, entry);
        }
        if !entries.is_empty() {
            tracing::info!(count = entries.len(), dir = %settings.dir.display(), "resuming uploads from the write-back journal");
        }

        // Ids also order entries in time, so they continue above those on disk.
        let clock_id = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        Ok(Arc::new(Journal {
            _lock: lock,
            settings,
            spaces,
            upload,
            entries: Mutex::new(entries),
            next_id: AtomicU64::new(clock_id.max(max_id + 1)),
            wake: Notify::new(),
            drained: Notify::new(),
            uploaded: tokio::sync::broadcast::channel(1024).0,
        }))
    }

    pub fn delay(&self) -> Duration {
        self.settings.delay
    }

    /// Receives the space and path of each upload that completes from now on. A slow
    /// receiver misses events (`RecvError::Lagged`) rather than blocking uploads.
    pub fn subscribe_uploaded(&self) -> tokio::sync::broadcast::Receiver<(String, ObjectPath)> {
        self.uploaded.subscribe()
    }

    /// Starts the task that uploads due entries. It runs until the runtime stops.
    pub fn spawn_uploader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let journal = Arc::clone(self);
        tokio::spawn(async move { journal.run_uploader().await })
    }

    /// Records `frozen` as the new content of `path` and returns once it is durable on
    /// local disk. `reuse_file` links the staging file into the journal instead of copying
    /// it; pass it only when the staging file is never written again (on release).
    pub async fn record(
        &self,
        space: &str,
        path: &ObjectPath,
        frozen: &FrozenStaging,
        staging_path: &Path,
        reuse_file: bool,
        meta: &PosixMeta,
    ) -> Result<(), JournalError> {
        if !self.spaces.contains_key(space) {
            return Err(JournalError::UnknownSpace(space.to_string()));
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let data_path = self.data_path(id);

        let staging = staging_path.to_path_buf();
        let data = data_path.clone();
        let source = Arc::clone(&frozen.file);
        let len = frozen.len;
        tokio::task::spawn_blocking(move || store_data(&source, &staging, &data, len, reuse_file))
            .await
            .map_err(|err| JournalError::Io { path: data_path.clone(), source: std::io::Error::other(err.to_string()) })?
            .map_err(io_error(&data_path))?;

        let record = EntryRecord {
            id,
            space: space.to_string(),
            path: path.to_string(),
            size_bytes: frozen.len,
            meta: meta.to_map(),
        };

        let entries = self.entries.lock().await;
        let (mut entries, older) = self.take_entries(entries, &|r| r.space == space && r.path == path.as_ref()).await;
        self.write_record(&record)?;
        for old in older {
            self.remove_files(old.id);
        }
        let due = Instant::now() + self.settings.delay;
        entries.insert(id, Entry { record, upload_lock: Arc::new(Mutex::new(())), due, attempts: 0 });
        drop(entries);

        self.wake.notify_one();
        tracing::debug!(space, %path, id, "recorded in write-back journal");
        Ok(())
    }

    /// Returns the pending content of `path`, if any.
    pub async fn pending(&self, space: &str, path: &ObjectPath) -> Option<PendingFile> {
        let entries = self.entries.lock().await;
        entries
            .values()
            .find(|e| e.record.space == space && e.record.path == path.as_ref())
            .map(|e| self.pending_file(&e.record))
    }

    /// Pending files directly or indirectly below `prefix` (all of the space when empty).
    pub async fn pending_under(&self, space: &str, prefix: &ObjectPath) -> Vec<PendingFile> {
        let entries = self.entries.lock().await;
        entries
            .values()
            .filter(|e| e.record.space == space && is_under(&e.record.path, prefix.as_ref()))
            .map(|e| self.pending_file(&e.record))
            .collect()
    }

    /// Number of entries not uploaded yet.
    pub async fn len(&self) -> usize {
        self.entries.lock().await.len()
    }

    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }

    /// Replaces the metadata of a pending file. Returns false when `path` has no entry,
    /// in which case the caller updates the stored object.
    pub async fn update_meta(&self, space: &str, path: &ObjectPath, meta: &PosixMeta) -> Result<bool, JournalError> {
        let entries = self.entries.lock().await;
        let (mut entries, locked) = self.lock_matching(entries, &|r| r.space == space && r.path == path.as_ref()).await;
        let Some((id, _upload)) = locked.first() else {
            return Ok(false);
        };
        let entry = entries.get_mut(id).expect("locked entries stay in the table");
        let mut record = entry.record.clone();
        record.meta = meta.to_map();
        self.write_record(&record)?;
        entry.record = record;
        Ok(true)
    }

    /// Drops the pending content of `path` (unlink). Returns whether there was any.
    pub async fn forget(&self, space: &str, path: &ObjectPath) -> bool {
        let entries = self.entries.lock().await;
        let (entries, removed) = self.take_entries(entries, &|r| r.space == space && r.path == path.as_ref()).await;
        for record in &removed {
            self.remove_files(record.id);
            tracing::debug!(space, %path, id = record.id, "pending upload dropped by unlink");
        }
        drop(entries);
        self.drained.notify_waiters();
        !removed.is_empty()
    }

    /// Moves pending entries at `from` (a file) or below `from/` (a directory) to the same
    /// place under `to`. Entries are not uploaded until the returned guard is dropped, so
    /// the caller renames the stored objects first and an older stored version can never
    /// overwrite a newer pending one.
    pub async fn rename(&self, space: &str, from: &ObjectPath, to: &ObjectPath) -> Result<RenameGuard, JournalError> {
        let entries = self.entries.lock().await;

        // Pending content at the destination is replaced, as the destination object is;
        // uploading it later would overwrite the renamed file.
        let (entries, replaced) = self.take_entries(entries, &|r| r.space == space && r.path == to.as_ref()).await;
        for record in replaced {
            self.remove_files(record.id);
        }

        let moving = |r: &EntryRecord| r.space == space && renamed_path(&r.path, from.as_ref(), to.as_ref()).is_some();
        let (mut entries, locked) = self.lock_matching(entries, &moving).await;

        let mut locks = Vec::new();
        for (id, lock) in locked {
            locks.push(lock);
            let Some(entry) = entries.get_mut(&id) else { continue };
            let mut record = entry.record.clone();
            record.path = renamed_path(&record.path, from.as_ref(), to.as_ref()).expect("filtered above");
            self.write_record(&record)?;
            tracing::debug!(space, from = %entry.record.path, to = %record.path, "pending upload renamed");
            entry.record = record;
        }
        Ok(RenameGuard { renamed: locks.len(), _locks: locks })
    }

    /// Uploads every entry now and waits until the journal is empty or `timeout` has
    /// passed, logging progress. Returns the number of entries left.
    pub async fn flush(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        {
            let mut entries = self.entries.lock().await;
            let now = Instant::now();
            for entry in entries.values_mut() {
                entry.due = now;
            }
        }
        self.wake.notify_one();

        loop {
            let (count, bytes) = {
                let entries = self.entries.lock().await;
                (entries.len(), entries.values().map(|e| e.record.size_bytes).sum::<u64>())
            };
            if count == 0 {
                tracing::info!("write-back journal is empty");
                return 0;
            }
            if Instant::now() >= deadline {
                tracing::warn!(count, bytes, dir = %self.settings.dir.display(),
                    "uploads still pending; they stay in the journal and resume on the next mount");
                return count;
            }
            tracing::info!(count, bytes, "waiting for pending uploads");
            let wait = Duration::from_secs(2).min(deadline.saturating_duration_since(Instant::now()));
            let _ = tokio::time::timeout(wait, self.drained.notified()).await;
        }
    }

    // -- uploader -----------------------------------------------------------------------

    async fn run_uploader(self: Arc<Self>) {
        let mut running = tokio::task::JoinSet::new();
        loop {
            let (due, next_due) = self.due_entries(MAX_PARALLEL_UPLOADS.saturating_sub(running.len())).await;
            for (id, lock) in due {
                let journal = Arc::clone(&self);
                running.spawn(async move { journal.upload_entry(id, lock).await });
            }

            let sleep = next_due.map_or(Duration::from_secs(3600), |at| at.saturating_duration_since(Instant::now()));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep.max(Duration::from_millis(10))) => {}
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
    }

    /// Entries due now whose upload lock is free (taken here), and the next due time of
    /// the others.
    async fn due_entries(&self, max: usize) -> (Vec<(u64, OwnedMutexGuard<()>)>, Option<Instant>) {
        let entries = self.entries.lock().await;
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next_due = None::<Instant>;
        for entry in entries.values() {
            if entry.due > now || due.len() >= max {
                next_due = Some(next_due.map_or(entry.due, |t| t.min(entry.due)));
                continue;
            }
            if !self.spaces.contains_key(&entry.record.space) {
                continue;
            }
            if let Ok(lock) = Arc::clone(&entry.upload_lock).try_lock_owned() {
                due.push((entry.record.id, lock));
            }
        }
        (due, next_due)
    }

    async fn upload_entry(&self, id: u64, lock: OwnedMutexGuard<()>) {
        let Some(record) = self.entries.lock().await.get(&id).map(|e| e.record.clone()) else {
            return;
        };
        let result = self.upload_record(&record).await;

        // Release the upload lock before taking the table lock: rename, forget and record
        // hold the table lock while they wait for the upload lock.
        drop(lock);
        let mut entries = self.entries.lock().await;
        let Some(entry) = entries.get_mut(&id) else {
            return; // Forgotten or replaced during the upload; that caller cleaned up.
        };
        if entry.record != record {
            // Renamed or given new metadata during the upload: upload the new state.
            entry.due = Instant::now();
            drop(entries);
            self.wake.notify_one();
            return;
        }

        match result {
            Ok(()) => {
                entries.remove(&id);
                self.remove_files(id);
                drop(entries);
                tracing::info!(space = %record.space, path = %record.path, size = record.size_bytes, "write-back upload done");
                self.drained.notify_waiters();
                let path = ObjectPath::parse(&record.path).unwrap_or_else(|_| ObjectPath::from(record.path.as_str()));
                let _ = self.uploaded.send((record.space.clone(), path));
            }
            Err(err) => {
                entry.attempts += 1;
                let backoff = self.backoff(entry.attempts);
                entry.due = Instant::now() + backoff;
                tracing::warn!(space = %record.space, path = %record.path, attempt = entry.attempts,
                    retry_in = ?backoff, error = %err, "write-back upload failed; will retry");
            }
        }
    }

    async fn upload_record(&self, record: &EntryRecord) -> Result<(), String> {
        let space = self.spaces.get(&record.space).ok_or_else(|| format!("space {:?} is not configured", record.space))?;
        let data_path = self.data_path(record.id);
        let file = File::open(&data_path).map_err(|err| format!("cannot open {}: {err}", data_path.display()))?;
        let meta = PosixMeta::from_map(record.meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let path = ObjectPath::parse(&record.path).map_err(|err| format!("invalid path in journal entry: {err}"))?;
        upload_file(&space.space, &space.target, &path, Arc::new(file), record.size_bytes, &meta, &self.upload)
            .await
            .map(|_| ())
            .map_err(|err| err.to_string())
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(16);
        (self.settings.retry_min * factor).min(self.settings.retry_max)
    }

    // -- files --------------------------------------------------------------------------

    /// Removes and returns the records matching `matches`, after waiting for their
    /// uploads in flight to finish (see [`Journal::lock_matching`]).
    async fn take_entries<'a>(
        &'a self,
        entries: MutexGuard<'a, Table>,
        matches: &(dyn Fn(&EntryRecord) -> bool + Sync),
    ) -> (MutexGuard<'a, Table>, Vec<EntryRecord>) {
        let (mut entries, locked) = self.lock_matching(entries, matches).await;
        let removed = locked.iter().filter_map(|(id, _)| entries.remove(id)).map(|e| e.record).collect();
        (entries, removed)
    }

    /// Takes the upload locks of the entries matching `matches` and returns them with
    /// the table lock. While an upload of one of them is in flight, this waits with the
    /// table unlocked, so other files' journal operations go on, then looks again.
    async fn lock_matching<'a>(
        &'a self,
        mut entries: MutexGuard<'a, Table>,
        matches: &(dyn Fn(&EntryRecord) -> bool + Sync),
    ) -> (MutexGuard<'a, Table>, Vec<(u64, OwnedMutexGuard<()>)>) {
        loop {
            let candidates: Vec<(u64, Arc<Mutex<()>>)> = entries
                .values()
                .filter(|e| matches(&e.record))
                .map(|e| (e.record.id, Arc::clone(&e.upload_lock)))
                .collect();

            let mut locked = Vec::new();
            let mut busy = None;
            for (id, lock) in candidates {
                match Arc::clone(&lock).try_lock_owned() {
                    Ok(guard) => locked.push((id, guard)),
                    Err(_) => {
                        busy = Some(lock);
                        break;
                    }
                }
            }
            let Some(busy) = busy else { return (entries, locked) };

            drop(locked);
            drop(entries);
            drop(busy.lock().await);
            entries = self.entries.lock().await;
        }
    }

    fn pending_file(&self, record: &EntryRecord) -> PendingFile {
        PendingFile {
            // Entry paths are written from valid `ObjectPath`s, so they parse back.
            path: ObjectPath::parse(&record.path).unwrap_or_else(|_| ObjectPath::from(record.path.as_str())),
            data_path: self.data_path(record.id),
            size_bytes: record.size_bytes,
            meta: PosixMeta::from_map(record.meta.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        }
    }

    fn data_path(&self, id: u64) -> PathBuf {
        self.settings.dir.join(format!("{id}.data"))
    }

    fn record_path(&self, id: u64) -> PathBuf {
        self.settings.dir.join(format!("{id}.json"))
    }

    /// Writes the entry file atomically and durably.
    fn write_record(&self, record: &EntryRecord) -> Result<(), JournalError> {
        let path = self.record_path(record.id);
        let temporary = self.settings.dir.join(format!("{}.json.tmp", record.id));
        let json = serde_json::to_vec(record).expect("records always serialize");

        let mut file = crate::private_dir::create_file(&temporary).map_err(io_error(&temporary))?;
        file.write_all(&json).map_err(io_error(&temporary))?;
        file.sync_all().map_err(io_error(&temporary))?;
        std::fs::rename(&temporary, &path).map_err(io_error(&path))?;
        sync_dir(&self.settings.dir).map_err(io_error(&self.settings.dir))
    }

    /// Deletes an entry: the entry file first, so a crash in between leaves only an
    /// orphan data file, which the next [`Journal::open`] removes.
    fn remove_files(&self, id: u64) {
        for path in [self.record_path(id), self.data_path(id)] {
            if let Err(err) = std::fs::remove_file(&path) {
                if err.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %err, "cannot remove journal file");
                }
            }
        }
        if let Err(err) = sync_dir(&self.settings.dir) {
            tracing::warn!(dir = %self.settings.dir.display(), error = %err, "cannot sync journal directory");
        }
    }
}

/// Takes the exclusive lock of the journal directory, so that two processes never
/// upload, or clean up, each other's entries.
fn lock_dir(dir: &Path) -> Result<File, JournalError> {
    use std::os::fd::AsRawFd;

    let path = dir.join(".lock");
    let file = crate::private_dir::file_options().create(true).truncate(false).write(true).open(&path).map_err(io_error(&path))?;
    // SAFETY: flock(2) on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(JournalError::InUse { dir: dir.to_path_buf() });
        }
        return Err(JournalError::Io { path, source: err });
    }
    Ok(file)
}

/// Puts the first `len` bytes of the staging file into `data` and syncs them.
fn store_data(source: &File, staging: &Path, data: &Path, len: u64, reuse_file: bool) -> std::io::Result<()> {
    if reuse_file {
        std::fs::hard_link(staging, data)?;
        let file = std::fs::OpenOptions::new().write(true).open(data)?;
        file.set_len(len)?;
        file.sync_all()?;
        return Ok(());
    }

    let mut target = crate::private_dir::create_file(data)?;
    let mut reader = std::io::Read::take(ReadAtCursor { file: source, offset: 0 }, len);
    std::io::copy(&mut reader, &mut target)?;
    target.sync_all()
}

struct ReadAtCursor<'a> {
    file: &'a File,
    offset: u64,
}

impl std::io::Read for ReadAtCursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads the entry files, removing temporary files and data files without an entry.
fn load_records(dir: &Path) -> Result<Vec<EntryRecord>, JournalError> {
    let mut records = Vec::new();
    let mut data_ids = Vec::new();
    for item in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let path = item.map_err(io_error(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();

        if name.ends_with(".json.tmp") {
            let _ = std::fs::remove_file(&path);
        } else if let Some(id) = name.strip_suffix(".data").and_then(|s| s.parse::<u64>().ok()) {
            data_ids.push(id);
        } else if name.ends_with(".json") {
            match std::fs::read(&path).map(|bytes| serde_json::from_slice::<EntryRecord>(&bytes)) {
                Ok(Ok(record)) => records.push(record),
                Ok(Err(err)) => tracing::error!(path = %path.display(), error = %err, "ignoring unreadable journal entry"),
                Err(err) => tracing::error!(path = %path.display(), error = %err, "ignoring unreadable journal entry"),
            }
        }
    }

    for id in data_ids {
        if !records.iter().any(|r| r.id == id) {
            let _ = std::fs::remove_file(dir.join(format!("{id}.data")));
        }
    }

    // Two entries for one path can only remain after a crash between writing the newer
    // one and deleting the older: keep the newer.
    records.sort_by_key(|r| r.id);
    let mut newest: BTreeMap<(String, String), EntryRecord> = BTreeMap::new();
    for record in records {
        if let Some(older) = newest.insert((record.space.clone(), record.path.clone()), record) {
            let _ = std::fs::remove_file(dir.join(format!("{}.json", older.id)));
            let _ = std::fs::remove_file(dir.join(format!("{}.data", older.id)));
        }
    }
    Ok(newest.into_values().collect())
}

fn is_under(path: &str, prefix: &str) -> bool {
    prefix.is_empty() || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

fn renamed_path(path: &str, from: &str, to: &str) -> Option<String> {
    if path == from {
        return Some(to.to_string());
    }
    let rest = path.strip_prefix(from)?.strip_prefix('/')?;
    Some(format!("{to}/{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::staging::{Staging, StagingSettings};
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    struct Fixture {
        _dir: tempfile::TempDir,
        journal_dir: PathBuf,
        staging: StagingSettings,
        space: Space,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse("[spaces.m]\nurl = \"memory://\"\n", Path::new("t.toml")).unwrap();
        Fixture {
            journal_dir: dir.path().join("journal"),
            staging: StagingSettings { dir: dir.path().join("staging"), min_free_bytes: 0 },
            space: Space { config: config.spaces["m"].clone(), store: Arc::new(InMemory::new()) },
            _dir: dir,
        }
    }

    /// Files in the journal directory besides its lock file.
    fn entry_files(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().filter(|e| e.as_ref().unwrap().file_name() != ".lock").count()
    }

    fn open(fixture: &Fixture, delay: Duration) -> Arc<Journal> {
        let mut spaces = BTreeMap::new();
        spaces.insert(
            "m".to_string(),
            JournalSpace { space: fixture.space.clone(), target: MetaTarget::ObjectAttributes },
        );
        let mut settings = JournalSettings::new(fixture.journal_dir.clone(), delay);
        settings.retry_min = Duration::from_millis(20);
        Journal::open(settings, spaces, UploadSettings::default()).unwrap()
    }

    async fn record(fixture: &Fixture, journal: &Journal, path: &str, content: &[u8], reuse: bool) {
        let staging = Staging::create(&fixture.staging, None).unwrap();
        staging.write(0, content).await.unwrap();
        let frozen = staging.freeze().await.unwrap();
        let meta = PosixMeta { mode: Some(0o100600), ..PosixMeta::default() };
        journal
            .record("m", &ObjectPath::parse(path).unwrap(), &frozen, staging.path(), reuse, &meta)
            .await
            .unwrap();
    }

    async fn stored(fixture: &Fixture, path: &str) -> Option<Vec<u8>> {
        let result = fixture.space.store.get(&ObjectPath::parse(path).unwrap()).await.ok()?;
        Some(result.bytes().await.unwrap().to_vec())
    }

    #[tokio::test]
    async fn entry_survives_restart_and_uploads() {
        let fixture = fixture();
        let journal = open(&fixture, Duration::from_secs(3600));
        record(&fixture, &journal, "a/b %.txt", b"pending data", true).await;
        assert_eq!(journal.len().await, 1);
        let pending = journal.pending("m", &ObjectPath::parse("a/b %.txt").unwrap()).await.unwrap();
        assert_eq!(std::fs::read(&pending.data_path).unwrap(), b"pending data");
        drop(journal);

        // A new process: the entry is due at once.
        let journal = open(&fixture, Duration::from_secs(3600));
        journal.spawn_uploader();
        assert_eq!(journal.flush(Duration::from_secs(10)).await, 0);
        assert_eq!(stored(&fixture, "a/b %.txt").await.unwrap(), b"pending data");
        let head = fixture.space.store.get_opts(&ObjectPath::parse("a/b %.txt").unwrap(), object_store::GetOptions::new().with_head(true)).await.unwrap();
        assert_eq!(PosixMeta::from_attributes(&head.attributes).mode, Some(0o100600));
        assert_eq!(entry_files(&fixture.journal_dir), 0);
    }

    #[tokio::test]
    async fn newer_record_replaces_older() {
        let fixture = fixture();
        let journal = open(&fixture, Duration::from_secs(3600));
        record(&fixture, &journal, "f", b"one", false).await;
        record(&fixture, &journal, "f", b"two", false).await;
        assert_eq!(journal.len().await, 1);
        journal.spawn_uploader();
        journal.flush(Duration::from_secs(10)).await;
        assert_eq!(stored(&fixture, "f").await.unwrap(), b"two");
    }

    #[tokio::test]
    async fn forget_and_rename_do_not_resurrect() {
        let fixture = fixture();
        let journal = open(&fixture, Duration::from_secs(3600));
        record(&fixture, &journal, "gone", b"x", false).await;
        record(&fixture, &journal, "dir/old", b"y", false).await;
        assert!(journal.forget("m", &ObjectPath::from("gone")).await);
        let guard = journal.rename("m", &ObjectPath::from("dir"), &ObjectPath::from("moved")).await.unwrap();
        assert_eq!(guard.renamed, 1);
        drop(guard);
        drop(journal);

        let journal = open(&fixture, Duration::from_secs(3600));
        journal.spawn_uploader();
        journal.flush(Duration::from_secs(10)).await;
        assert_eq!(stored(&fixture, "gone").await, None);
        assert_eq!(stored(&fixture, "dir/old").await, None);
        assert_eq!(stored(&fixture, "moved/old").await.unwrap(), b"y");
    }

    #[tokio::test]
    async fn delay_is_respected() {
        let fixture = fixture();
        let journal = open(&fixture, Duration::from_millis(300));
        journal.spawn_uploader();
        record(&fixture, &journal, "later", b"z", false).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(stored(&fixture, "later").await, None);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(stored(&fixture, "later").await.unwrap(), b"z");
    }

    #[tokio::test]
    async fn update_meta_applies_to_upload() {
        let fixture = fixture();
        let journal = open(&fixture, Duration::from_secs(3600));
        record(&fixture, &journal, "m1", b"m", false).await;
        let meta = PosixMeta { mtime: Some(UNIX_EPOCH + Duration::from_secs(981_173_106)), ..PosixMeta::default() };
        assert!(journal.update_meta("m", &ObjectPath::from("m1"), &meta).await.unwrap());
        assert!(!journal.update_meta("m", &ObjectPath::from("nope"), &meta).await.unwrap());
        journal.spawn_uploader();
        journal.flush(Duration::from_secs(10)).await;
        let head = fixture.space.store.get_opts(&ObjectPath::from("m1"), object_store::GetOptions::new().with_head(true)).await.unwrap();
        assert_eq!(PosixMeta::from_attributes(&head.attributes), meta);
    }

    /// A record that waits for an upload in flight of the same path does not hold up
    /// journal operations on other files.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_record_does_not_block_others() {
        use object_store::throttle::{ThrottleConfig, ThrottledStore};

        let mut fixture = fixture();
        let config = ThrottleConfig { wait_put_per_call: Duration::from_millis(1500), ..ThrottleConfig::default() };
        fixture.space.store = Arc::new(ThrottledStore::new(InMemory::new(), config));
        let journal = open(&fixture, Duration::ZERO);
        journal.spawn_uploader();

        record(&fixture, &journal, "a", b"first", false).await;
        tokio::time::sleep(Duration::from_millis(300)).await; // the upload of "a" is in flight

        let second = {
            let journal = Arc::clone(&journal);
            let staging = fixture.staging.clone();
            tokio::spawn(async move {
                let staging = Staging::create(&staging, None).unwrap();
                staging.write(0, b"second").await.unwrap();
                let frozen = staging.freeze().await.unwrap();
                let path = ObjectPath::parse("a").unwrap();
                journal.record("m", &path, &frozen, staging.path(), false, &PosixMeta::default()).await.unwrap();
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;

        let started = std::time::Instant::now();
        record(&fixture, &journal, "b", b"other", false).await;
        assert!(started.elapsed() < Duration::from_millis(1000), "blocked for {:?}", started.elapsed());

        second.await.unwrap();
        assert_eq!(journal.flush(Duration::from_secs(20)).await, 0);
        assert_eq!(stored(&fixture, "a").await.unwrap(), b"second");
        assert_eq!(stored(&fixture, "b").await.unwrap(), b"other");
    }

    #[tokio::test]
    async fn orphans_and_temporaries_removed_on_open() {
        let fixture = fixture();
        std::fs::create_dir_all(&fixture.journal_dir).unwrap();
        std::fs::write(fixture.journal_dir.join("7.data"), b"never acknowledged").unwrap();
        std::fs::write(fixture.journal_dir.join("8.json.tmp"), b"{").unwrap();
        let journal = open(&fixture, Duration::from_secs(1));
        assert!(journal.is_empty().await);
        assert_eq!(entry_files(&fixture.journal_dir), 0);
    }

    #[test]
    fn second_journal_on_same_dir_rejected() {
        let fixture = fixture();
        let first = open(&fixture, Duration::from_secs(1));
        let settings = JournalSettings::new(fixture.journal_dir.clone(), Duration::from_secs(1));
        let err = Journal::open(settings, BTreeMap::new(), UploadSettings::default()).err().unwrap();
        assert!(err.to_string().contains("in use by another datanet process"), "{err}");
        drop(first);
        let settings = JournalSettings::new(fixture.journal_dir.clone(), Duration::from_secs(1));
        assert!(Journal::open(settings, BTreeMap::new(), UploadSettings::default()).is_ok());
    }

    #[test]
    fn path_helpers() {
        assert_eq!(renamed_path("a/b", "a", "c").as_deref(), Some("c/b"));
        assert_eq!(renamed_path("a", "a", "c").as_deref(), Some("c"));
        assert_eq!(renamed_path("ab/x", "a", "c"), None);
        assert!(is_under("a/b", "a"));
        assert!(!is_under("ab", "a"));
        assert!(is_under("x", ""));
    }
}
