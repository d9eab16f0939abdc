//! Write-back: which files still have content to upload, the task that drops a writer
//! once the journal has uploaded its file, and the final uploads at unmount.

use super::*;

impl DatanetFs {
    /// True when some handle has `ino` open for writing.
    pub(super) fn has_open_writer(&self, ino: u64) -> bool {
        lock(&self.files).values().any(|f| f.ino == ino && f.writer.is_some())
    }

    /// Returns true when the write-back journal contains content for the key of `ino`.
    pub(super) async fn journal_pending(&self, ino: u64, space: usize) -> bool {
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

/// How long unmount waits for write-back uploads before leaving them in the journal.
const UNMOUNT_UPLOAD_WAIT: Duration = Duration::from_secs(300);

pub(super) fn journal_error(err: crate::journal::JournalError) -> FsError {
    FsError::new(err.errno(), err.to_string())
}

/// Opens the write-back journal below `cache.dir`. The uploader starts at once, so
/// entries left by an earlier process (a crash, or a mount with a delay) are uploaded.
pub(super) fn open_journal(config: &Config, spaces: &[Arc<SpaceHandle>]) -> FsResult<Arc<Journal>> {
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
