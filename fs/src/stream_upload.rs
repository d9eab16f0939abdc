//! Streamed multipart uploads: the parts of a file written from offset 0 onwards go to
//! the store while the application is still writing, so that `flush` only has to send
//! the tail part and CompleteMultipartUpload.
//!
//! The writer *seals* each part once all its bytes are final in the staging file (see
//! [`crate::staging::Staging::final_prefix_len`]), and a background task sends sealed
//! parts, at most [`crate::upload::UploadSettings::max_concurrency`] at a time. A part
//! is sent from the buffers of the `write` requests that filled it when they continue
//! one another, which saves reading it back from the staging file, and is read from
//! the staging file otherwise. All streams together hold at most
//! [`MAX_PARTS_IN_FLIGHT`] parts in flight, [`MAX_QUEUED_BUFFERED_PARTS`] buffered parts
//! waiting for a slot and [`MAX_KEPT_BYTES`] of kept `write` buffers, so memory stays
//! bounded however many files are written at once. Recording a `write` and sealing
//! parts are synchronous calls that only queue work for the background task, so a
//! `write` never waits for the network.
//!
//! Invariants: the owner of a [`StreamedUpload`] accepts no change below
//! [`StreamedUpload::sealed_end`] without dropping the stream first, so a completed
//! upload always has the staging content. Every stream ends completed or aborted, and a
//! failed abort is retried in the background until the store accepts it. A killed
//! process leaves an incomplete multipart upload, which is never visible as an object;
//! only the store's lifecycle rules remove it.

use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use object_store::path::Path as ObjectPath;
use bytes::Bytes;
use object_store::{MultipartUpload, ObjectStore, PutMultipartOptions, PutPayload, PutResult};
use tokio::sync::{mpsc, oneshot, Semaphore, SemaphorePermit};

use crate::posix_meta::PosixMeta;
use crate::upload::{FileSource, UploadError};

/// Attempts to abort one multipart upload, each after the store client's own retries.
const ABORT_ATTEMPTS: u32 = 12;

/// First and largest pause between abort attempts.
const ABORT_RETRY_MIN: Duration = Duration::from_secs(1);
const ABORT_RETRY_MAX: Duration = Duration::from_secs(60);

/// Parts of all streams in flight at once (256 MiB with the default 16 MiB parts).
pub const MAX_PARTS_IN_FLIGHT: usize = 16;

/// Buffered parts of all streams kept in memory while they wait for a slot. When more
/// are waiting, further parts are read from the staging file when their turn comes.
pub const MAX_QUEUED_BUFFERED_PARTS: usize = 4;

/// Bytes of `write` buffers that all streams keep before a part is sealed. Beyond it,
/// a stream keeps none and reads its parts from the staging file.
pub const MAX_KEPT_BYTES: u64 = 128 << 20;

static PART_SLOTS: Semaphore = Semaphore::const_new(MAX_PARTS_IN_FLIGHT);
static QUEUED_BUFFERED_PARTS: AtomicUsize = AtomicUsize::new(0);
static KEPT_BYTES: AtomicU64 = AtomicU64::new(0);

/// Adds `amount` to `counter` unless the sum would exceed `max`, and returns whether it did.
fn reserve(counter: &AtomicU64, amount: u64, max: u64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |current| {
            current.checked_add(amount).filter(|sum| *sum <= max)
        })
        .is_ok()
}

/// A buffered part, counted in [`QUEUED_BUFFERED_PARTS`] until it is sent or dropped.
struct QueuedPart(PutPayload);

impl QueuedPart {
    /// Counts `payload` as queued, or returns `None` when the queue is full.
    fn new(payload: PutPayload) -> Option<QueuedPart> {
        let counted = QUEUED_BUFFERED_PARTS
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |queued| {
                (queued < MAX_QUEUED_BUFFERED_PARTS).then_some(queued + 1)
            })
            .is_ok();
        counted.then(|| QueuedPart(payload))
    }

    fn into_payload(mut self) -> PutPayload {
        std::mem::take(&mut self.0)
    }
}

impl Drop for QueuedPart {
    fn drop(&mut self) {
        QUEUED_BUFFERED_PARTS.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Command {
    /// Sends this range of the staging file as the next part.
    Part(Range<u64>),
    /// Sends these bytes, buffered from `write` requests, as the next part.
    BufferedPart(QueuedPart),
    /// Sends `tail` (when not empty) as the last part and completes the upload.
    Finish {
        tail: Range<u64>,
        reply: oneshot::Sender<Result<PutResult, UploadError>>,
    },
}

/// One multipart upload fed from a staging file while it is written.
///
/// Dropping it without [`StreamedUpload::finish`] aborts the upload in the background.
pub struct StreamedUpload {
    path: ObjectPath,
    /// The metadata sent with CreateMultipartUpload, which cannot change afterwards.
    meta: PosixMeta,
    part_size_bytes: u64,
    /// Bytes below this offset are handed to the background task as parts.
    sealed_end: u64,
    commands: mpsc::UnboundedSender<Command>,
    /// Set by the background task when a request failed. The task aborts the upload then.
    failed: Arc<AtomicBool>,
    /// Set when this handle is dropped unfinished, so that the task skips the parts
    /// still queued and aborts at once.
    cancelled: Arc<AtomicBool>,
    finished: bool,
    /// Buffers of the `write` requests since the stream started that continue one
    /// another: they contain the bytes from `buffered_start`, equal to the staging file.
    /// Counted in [`KEPT_BYTES`].
    buffered: VecDeque<Bytes>,
    buffered_start: u64,
    buffered_len: u64,
}

impl Drop for StreamedUpload {
    fn drop(&mut self) {
        if !self.finished {
            self.cancelled.store(true, Ordering::SeqCst);
        }
        self.forget_buffers();
    }
}

impl std::fmt::Debug for StreamedUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedUpload")
            .field("path", &self.path)
            .field("sealed_end", &self.sealed_end)
            .finish_non_exhaustive()
    }
}

/// The object that a streamed upload creates, and the size of its parts.
pub struct StreamTarget {
    pub store: Arc<dyn ObjectStore>,
    pub path: ObjectPath,
    pub meta: PosixMeta,
    pub attributes: object_store::Attributes,
    pub part_size_bytes: u64,
    pub max_concurrency: usize,
}

impl StreamedUpload {
    /// Starts the background task, which creates the multipart upload. Must run inside
    /// a tokio runtime. `file` is the staging file, and `file_name` names it in errors.
    pub fn start(target: StreamTarget, file: Arc<File>, file_name: String) -> StreamedUpload {
        let (commands, receiver) = mpsc::unbounded_channel();
        let failed = Arc::new(AtomicBool::new(false));
        let cancelled = Arc::new(AtomicBool::new(false));
        let task = StreamTask {
            cancelled: Arc::clone(&cancelled),
            store: target.store,
            path: target.path.clone(),
            source: FileSource::new(file, file_name),
            max_in_flight: target.max_concurrency.max(1),
            failed: Arc::clone(&failed),
        };
        tokio::spawn(task.run(target.attributes, receiver));
        tracing::debug!(path = %target.path, part_size = target.part_size_bytes, "streamed upload started");

        StreamedUpload {
            path: target.path,
            meta: target.meta,
            part_size_bytes: target.part_size_bytes.max(1),
            sealed_end: 0,
            commands,
            failed,
            cancelled,
            finished: false,
            buffered: VecDeque::new(),
            buffered_start: 0,
            buffered_len: 0,
        }
    }

    pub fn path(&self) -> &ObjectPath {
        &self.path
    }

    pub fn meta(&self) -> &PosixMeta {
        &self.meta
    }

    /// Returns the offset below which the content was handed over as parts and must not
    /// change while this upload lives.
    pub fn sealed_end(&self) -> u64 {
        self.sealed_end
    }

    /// Returns whether a request of this upload failed. It is aborted then, and the
    /// caller should drop it and upload the file another way.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Records that `data` was written to the staging file at `offset`, above
    /// [`StreamedUpload::sealed_end`]. A buffer that continues the ones kept is kept too.
    /// Any other write drops them, so the kept bytes always equal the staging file's.
    pub fn record_write(&mut self, offset: u64, data: &Bytes) {
        if self.buffered_len > 0 && offset != self.buffered_start + self.buffered_len {
            self.forget_buffers();
        }
        if !reserve(&KEPT_BYTES, data.len() as u64, MAX_KEPT_BYTES) {
            self.forget_buffers();
            return;
        }
        if self.buffered_len == 0 {
            self.buffered_start = offset;
        }
        self.buffered.push_back(data.clone());
        self.buffered_len += data.len() as u64;
    }

    /// Drops the kept buffers, for a change to the staging file other than a write.
    pub fn forget_buffers(&mut self) {
        KEPT_BYTES.fetch_sub(self.buffered_len, Ordering::SeqCst);
        self.buffered.clear();
        self.buffered_len = 0;
    }

    /// Seals every whole part below `final_len`, the length of the prefix whose bytes no
    /// longer change.
    pub fn seal_up_to(&mut self, final_len: u64) {
        while self.sealed_end + self.part_size_bytes <= final_len {
            let part = self.sealed_end..self.sealed_end + self.part_size_bytes;
            let command = match self.take_buffered(part.clone()) {
                Some(payload) => Command::BufferedPart(payload),
                None => Command::Part(part.clone()),
            };
            if self.commands.send(command).is_err() {
                // The task is gone only after a failure, which `finish` reports.
                return;
            }
            self.sealed_end = part.end;
        }
    }

    /// Returns the kept bytes of `part` when they cover it and few buffered parts wait
    /// already. Drops every kept byte below `part.end` in any case.
    fn take_buffered(&mut self, part: Range<u64>) -> Option<QueuedPart> {
        let covered = self.buffered_start == part.start && self.buffered_len >= part.end - part.start;
        let before = self.buffered_len;
        let mut chunks = Vec::new();
        while self.buffered_len > 0 && self.buffered_start < part.end {
            let mut front = self.buffered.pop_front().expect("buffered_len counts the buffers");
            let needed = part.end - self.buffered_start;
            if front.len() as u64 > needed {
                let rest = front.split_off(needed as usize);
                self.buffered.push_front(rest);
            }
            self.buffered_start += front.len() as u64;
            self.buffered_len -= front.len() as u64;
            chunks.push(front);
        }
        KEPT_BYTES.fetch_sub(before - self.buffered_len, Ordering::SeqCst);

        if !covered {
            return None;
        }
        QueuedPart::new(chunks.into_iter().collect())
    }

    /// Sends the bytes from [`StreamedUpload::sealed_end`] to `len` as the last part and
    /// completes the upload once every part is stored. On error the upload is aborted.
    pub async fn finish(mut self, len: u64) -> Result<PutResult, UploadError> {
        self.finished = true;
        let (reply, result) = oneshot::channel();
        let tail = self.sealed_end..len.max(self.sealed_end);
        // The tail goes as a range: reading it back is cheap next to the rest, and the
        // kept buffers may end before `len` after a truncate that extended the file.
        self.forget_buffers();
        let stopped = || UploadError::StreamStopped { path: self.path.to_string() };
        self.commands.send(Command::Finish { tail, reply }).map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }
}

/// The background side of a [`StreamedUpload`].
struct StreamTask {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    source: FileSource,
    max_in_flight: usize,
    failed: Arc<AtomicBool>,
    cancelled: Arc<AtomicBool>,
}

/// A part request, spawned so that it progresses while the task waits for commands.
type PartTask = tokio::task::JoinHandle<object_store::Result<()>>;

impl StreamTask {
    async fn run(self, attributes: object_store::Attributes, mut commands: mpsc::UnboundedReceiver<Command>) {
        let options = PutMultipartOptions { attributes, ..PutMultipartOptions::default() };
        let upload = match self.store.put_multipart_opts(&self.path, options).await {
            Ok(upload) => upload,
            Err(err) => {
                tracing::warn!(path = %self.path, error = %err, "cannot start streamed upload");
                self.failed.store(true, Ordering::SeqCst);
                reply_failed(&mut commands, err.into()).await;
                return;
            }
        };

        let mut sender = PartSender { upload, in_flight: FuturesUnordered::new(), path: self.path.clone() };
        let error = loop {
            let command = match commands.recv().await {
                Some(Command::Part(_) | Command::BufferedPart(_)) if self.cancelled.load(Ordering::SeqCst) => None,
                command => command,
            };
            let Some(command) = command else {
                tracing::debug!(path = %self.path, "streamed upload dropped; aborting it");
                sender.abort_in_background(self.path.clone());
                return;
            };
            match command {
                Command::Part(range) => {
                    if let Err(err) = self.send_part(&mut sender, range).await {
                        break err;
                    }
                }
                Command::BufferedPart(payload) => {
                    let sent = self.send_buffered_part(&mut sender, payload).await;
                    if let Err(err) = sent {
                        break err;
                    }
                }
                Command::Finish { tail, reply } => {
                    match self.complete(&mut sender, tail).await {
                        Ok(result) => {
                            let _ = reply.send(Ok(result));
                        }
                        Err(err) => {
                            self.failed.store(true, Ordering::SeqCst);
                            sender.abort_in_background(self.path.clone());
                            let _ = reply.send(Err(err));
                        }
                    }
                    return;
                }
            }
        };

        tracing::warn!(path = %self.path, error = %error, "streamed upload failed; aborting it");
        self.failed.store(true, Ordering::SeqCst);
        sender.abort_in_background(self.path.clone());
        reply_failed(&mut commands, error).await;
    }

    async fn send_buffered_part(&self, sender: &mut PartSender, part: QueuedPart) -> Result<(), UploadError> {
        let slot = sender.wait_for_slot(self.max_in_flight).await?;
        sender.spawn_part(part.into_payload(), slot);
        Ok(())
    }

    async fn send_part(&self, sender: &mut PartSender, range: Range<u64>) -> Result<(), UploadError> {
        let slot = sender.wait_for_slot(self.max_in_flight).await?;
        let bytes = self.source.read(range.start, range.end - range.start).await?;
        sender.spawn_part(bytes.into(), slot);
        Ok(())
    }

    async fn complete(&self, sender: &mut PartSender, tail: Range<u64>) -> Result<PutResult, UploadError> {
        if !tail.is_empty() {
            self.send_part(sender, tail).await?;
        }
        while !sender.in_flight.is_empty() {
            sender.wait_one().await?;
        }
        let result = sender.upload.complete().await?;
        tracing::debug!(path = %self.path, "streamed upload completed");
        Ok(result)
    }
}

/// The multipart upload and its parts in flight.
struct PartSender {
    upload: Box<dyn MultipartUpload>,
    in_flight: FuturesUnordered<PartTask>,
    path: ObjectPath,
}

impl PartSender {
    /// Waits until this upload has fewer than `max_in_flight` parts in flight and a slot
    /// among the parts of all streams is free, and returns that slot.
    async fn wait_for_slot(&mut self, max_in_flight: usize) -> Result<SemaphorePermit<'static>, UploadError> {
        while self.in_flight.len() >= max_in_flight {
            self.wait_one().await?;
        }
        Ok(PART_SLOTS.acquire().await.expect("the part slots are never closed"))
    }

    /// Sends `payload` as the next part in a task that frees `slot` when it ends.
    fn spawn_part(&mut self, payload: PutPayload, slot: SemaphorePermit<'static>) {
        let part = self.upload.put_part(payload);
        self.in_flight.push(tokio::spawn(async move {
            let _slot = slot;
            part.await
        }));
    }

    async fn wait_one(&mut self) -> Result<(), UploadError> {
        match self.in_flight.next().await {
            Some(Ok(result)) => Ok(result?),
            Some(Err(_)) => Err(UploadError::StreamStopped { path: self.path.to_string() }),
            None => Ok(()),
        }
    }

    /// Lets the parts in flight end, then aborts the upload, retrying while the store
    /// fails. Waiting first matters because a part stored after the abort could leave
    /// an upload behind.
    fn abort_in_background(self, path: ObjectPath) {
        tokio::spawn(async move {
            let PartSender { mut upload, mut in_flight, .. } = self;
            while in_flight.next().await.is_some() {}
            abort_with_retry(upload.as_mut(), &path).await;
        });
    }
}

async fn abort_with_retry(upload: &mut dyn MultipartUpload, path: &ObjectPath) {
    let mut pause = ABORT_RETRY_MIN;
    for attempt in 1..=ABORT_ATTEMPTS {
        match upload.abort().await {
            Ok(()) => {
                tracing::info!(%path, "aborted streamed multipart upload");
                return;
            }
            Err(err) if attempt < ABORT_ATTEMPTS => {
                tracing::warn!(%path, attempt, error = %err, "cannot abort streamed multipart upload; will retry");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(ABORT_RETRY_MAX);
            }
            Err(err) => {
                tracing::error!(%path, attempts = attempt, error = %err, "cannot abort streamed multipart upload; its parts stay until the store's lifecycle rules remove them");
            }
        }
    }
}

/// Replies to the `Finish` of a stream that already failed with `error`, and skips
/// the parts queued before it.
async fn reply_failed(commands: &mut mpsc::UnboundedReceiver<Command>, error: UploadError) {
    while let Some(command) = commands.recv().await {
        if let Command::Finish { reply, .. } = command {
            let _ = reply.send(Err(error));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;
    use std::io::Write;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 13 % 251) as u8).collect()
    }

    fn start(store: &Arc<dyn ObjectStore>, file: &Arc<File>) -> StreamedUpload {
        let target = StreamTarget {
            store: Arc::clone(store),
            path: ObjectPath::from("object"),
            meta: PosixMeta::default(),
            attributes: object_store::Attributes::new(),
            part_size_bytes: 1000,
            max_concurrency: 2,
        };
        StreamedUpload::start(target, Arc::clone(file), "staging".into())
    }

    #[tokio::test]
    async fn buffered_and_file_parts_complete() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let data = pattern(3700);
        let mut staging = tempfile::tempfile().unwrap();
        staging.write_all(&data).unwrap();
        let file = Arc::new(staging);
        let mut upload = start(&store, &file);

        // The first 1100 bytes were written before the stream started: read from the file.
        upload.seal_up_to(1100);
        assert_eq!(upload.sealed_end(), 1000);
        for offset in (1100..3700).step_by(300) {
            let end = (offset + 300).min(3700);
            upload.record_write(offset as u64, &Bytes::copy_from_slice(&data[offset..end]));
            upload.seal_up_to(end as u64);
        }
        assert_eq!(upload.sealed_end(), 3000);
        assert_eq!(upload.buffered_start, 3000, "buffers below the sealed boundary are dropped");
        assert_eq!(upload.buffered_len, 700);

        upload.finish(3700).await.unwrap();
        let stored = store.get(&ObjectPath::from("object")).await.unwrap().bytes().await.unwrap();
        assert!(stored.as_ref() == data.as_slice(), "content differs");
    }

    #[tokio::test]
    async fn write_over_budget_not_kept() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut upload = start(&store, &file);

        upload.record_write(0, &Bytes::from_static(&[1; 100]));
        assert_eq!(upload.buffered_len, 100);
        // Zeroed pages are mapped lazily, so this buffer costs no memory until read.
        let huge = Bytes::from(vec![0u8; MAX_KEPT_BYTES as usize + 1]);
        upload.record_write(100, &huge);
        assert_eq!(upload.buffered_len, 0, "a buffer beyond the budget must not be kept");
    }

    #[tokio::test]
    async fn overlapping_write_drops_buffers() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut upload = start(&store, &file);

        upload.record_write(0, &Bytes::from_static(&[1; 600]));
        upload.record_write(600, &Bytes::from_static(&[2; 300]));
        assert_eq!(upload.buffered_len, 900);
        upload.record_write(100, &Bytes::from_static(&[3; 50]));
        assert_eq!(upload.buffered_start, 100, "kept buffers must restart at the rewrite");
        assert_eq!(upload.buffered_len, 50);
        assert!(upload.take_buffered(0..1000).is_none(), "a part not covered by the buffers needs the file");
        assert_eq!(upload.buffered_len, 0);
    }
}
