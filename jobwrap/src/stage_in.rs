//! Stage-in: planning (which objects exist and where they go) and verified, parallel
//! downloads straight from the object stores into the working directory.
//!
//! A file appears under its final name only after all its bytes were written, synced
//! and verified: the byte count must equal the size from HEAD or the listing, and when
//! an S3 ETag is a plain MD5 (single-part upload) the MD5 of the bytes must equal it. A
//! download is pinned to the planned ETag with `If-Match`, so an object replaced during
//! staging fails instead of mixing versions. A SHA-256 of every file goes to the ledger.
//! Objects of 64 MiB or more are fetched as concurrent ranged GETs of 8 MiB, written
//! and hashed in order.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use datanet::config::SpaceLocation as SpaceUrl;
use datanet::{Config, Space};
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use object_store::{GetOptions, ObjectStoreExt};
use sha2::Sha256;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::JobError;
use crate::ledger::InputFile;
use crate::local_space;
use crate::location::SpaceLocation;
use crate::progress::Progress;
use crate::spec::StageIn;
use crate::workdir::{self, Owner};

/// Attempts per file, for failures the object store client does not retry itself
/// (a broken body stream, a size or checksum mismatch).
pub const TRANSFER_ATTEMPTS: u32 = 4;
/// Wait before the second attempt; doubled for each further attempt.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Objects of at least this size are downloaded as concurrent ranged GETs.
const RANGED_MIN_BYTES: u64 = 64 << 20;
/// Size of one ranged GET.
const RANGE_PART_BYTES: u64 = 8 << 20;
/// Ranged GETs of one object in flight at once.
/// Parts of one large object fetched at once; each holds RANGE_PART_BYTES in memory.
const RANGE_CONCURRENCY: usize = 8;
/// Large objects downloaded with ranged GETs at once, whatever `transfer_concurrency`
/// is, so that their buffers stay within MAX_RANGED_OBJECTS * RANGE_CONCURRENCY *
/// RANGE_PART_BYTES (128 MiB). Small objects stream and hold little memory each.
const MAX_RANGED_OBJECTS: usize = 2;
static RANGED_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_RANGED_OBJECTS);

/// The spaces a job uses, opened once.
#[derive(Debug, Clone, Default)]
pub struct Spaces {
    opened: HashMap<String, Space>,
}

impl Spaces {
    /// Opens every space named by `names`.
    pub fn open<'a>(config: &Config, names: impl IntoIterator<Item = &'a str>) -> Result<Spaces, JobError> {
        let mut opened = HashMap::new();
        for name in names {
            if opened.contains_key(name) {
                continue;
            }
            let space = datanet::open_space(config.space(name)?)?;
            opened.insert(name.to_string(), space);
        }
        Ok(Spaces { opened })
    }

    pub fn get(&self, name: &str) -> &Space {
        &self.opened[name]
    }
}

/// Strips quotes from an S3 ETag and returns it when it is a plain MD5 (single-part
/// upload). Multipart ETags (`<md5>-<parts>`) and other stores' ETags return `None`.
pub fn md5_from_e_tag(space: &Space, e_tag: Option<&str>) -> Option<String> {
    if !matches!(space.config.location, SpaceUrl::S3 { .. }) {
        return None;
    }
    let tag = e_tag?.trim_matches('"');
    (tag.len() == 32 && tag.chars().all(|c| c.is_ascii_hexdigit())).then(|| tag.to_ascii_lowercase())
}

/// Resolves every stage-in to the objects it copies. Returns one problem line per input
/// that is missing or unreadable.
pub async fn plan(spaces: &Spaces, inputs: &[StageIn]) -> Result<Vec<InputFile>, Vec<String>> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for input in inputs {
        match plan_one(spaces.get(&input.source.space), input).await {
            Ok(planned) => files.extend(planned),
            Err(problem) => problems.push(problem),
        }
    }

    let mut seen = BTreeSet::new();
    for file in files.iter().filter(|file| !file.directory) {
        if !seen.insert(file.destination.as_str()) {
            problems.push(format!(
                "two inputs are staged to the same path {:?}; give one of them another --to",
                file.destination
            ));
        }
    }
    if problems.is_empty() {
        Ok(files)
    } else {
        Err(problems)
    }
}

async fn plan_one(space: &Space, input: &StageIn) -> Result<Vec<InputFile>, String> {
    let source = &input.source;
    if let Some(root) = local_space::root(space) {
        return plan_local(root, input);
    }
    if !source.is_prefix() {
        match space.store.head(&source.object_path()?).await {
            Ok(meta) => {
                return Ok(vec![InputFile {
                    source: source.clone(),
                    destination: input.destination.clone(),
                    size_bytes: meta.size,
                    e_tag: meta.e_tag,
                    done: false,
                    sha256: None,
                    verified: None,
                    directory: false,
                }])
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(err) => return Err(format!("input {source}: cannot read it: {err}")),
        }
    }

    let prefix = source.object_path()?;
    let list_prefix = (!source.path.is_empty()).then_some(&prefix);
    let objects: Vec<_> = space
        .store
        .list(list_prefix)
        .try_collect()
        .await
        .map_err(|err| format!("input {source}: cannot list it: {err}"))?;

    let mut files = Vec::new();
    for meta in objects {
        let key = meta.location.as_ref();
        let relative = if source.path.is_empty() {
            Some(key)
        } else if key == prefix.as_ref() {
            Some("")
        } else {
            key.strip_prefix(prefix.as_ref()).and_then(|rest| rest.strip_prefix('/'))
        };
        let Some(relative) = relative else {
            // A listing by prefix also returns keys that merely start with the same
            // characters (`big2` for the prefix `big`); they are not below it.
            continue;
        };
        let directory = meta.size == 0 && is_marker(space, &meta.location, relative.is_empty() && !source.is_prefix()).await?;
        if relative.is_empty() && !directory {
            continue;
        }
        let destination = match (relative.is_empty(), input.destination.as_str()) {
            (true, destination) => destination.trim_end_matches('/').to_string(),
            (false, destination) => format!("{}/{relative}", destination.trim_end_matches('/')),
        };
        files.push(InputFile {
            source: SpaceLocation {
                space: source.space.clone(),
                path: key.to_string(),
            },
            destination,
            size_bytes: meta.size,
            e_tag: meta.e_tag,
            done: false,
            sha256: None,
            verified: None,
            directory,
        });
    }
    if files.is_empty() {
        return Err(format!(
            "input {source} not found: no object or prefix of that name in space {:?}",
            source.space
        ));
    }
    Ok(files)
}

/// Plans a stage-in from a `file://` space, whose keys are file paths below `root`.
fn plan_local(root: &Path, input: &StageIn) -> Result<Vec<InputFile>, String> {
    let source = &input.source;
    let key = source.path.trim_end_matches('/');
    let planned = |path: String, destination: String, size_bytes: u64, directory: bool| InputFile {
        source: SpaceLocation {
            space: source.space.clone(),
            path,
        },
        destination,
        size_bytes,
        e_tag: None,
        done: false,
        sha256: None,
        verified: None,
        directory,
    };
    if !source.is_prefix() {
        match local_space::head(root, key) {
            Ok(Some(size)) => return Ok(vec![planned(key.to_string(), input.destination.clone(), size, false)]),
            Ok(None) => {}
            Err(err) => return Err(format!("input {source}: cannot read it: {err}")),
        }
    }

    let entries = local_space::list(root, key).map_err(|err| format!("input {source}: cannot list it: {err}"))?;
    if entries.is_empty() {
        return Err(format!(
            "input {source} not found: no file or directory of that name in space {:?}",
            source.space
        ));
    }
    Ok(entries
        .into_iter()
        .map(|entry| {
            let path = match (key.is_empty(), entry.relative.is_empty()) {
                (_, true) => key.to_string(),
                (true, false) => entry.relative.clone(),
                (false, false) => format!("{key}/{}", entry.relative),
            };
            let destination = if entry.relative.is_empty() {
                input.destination.clone()
            } else {
                format!("{}/{}", input.destination, entry.relative)
            };
            planned(path, destination, entry.size, entry.directory)
        })
        .collect())
}

/// True when the zero-byte object listed at `location` is a directory marker: its key is
/// `location/`, so a HEAD of `location` itself finds nothing (`object_store` lists the
/// marker `dir/` under the path `dir`). `known_absent` skips the HEAD when one already
/// found nothing there.
async fn is_marker(space: &Space, location: &object_store::path::Path, known_absent: bool) -> Result<bool, String> {
    if known_absent {
        return Ok(true);
    }
    match space.store.head(location).await {
        Ok(_) => Ok(false),
        Err(object_store::Error::NotFound { .. }) => Ok(true),
        Err(err) => Err(format!("cannot read {location}: {err}")),
    }
}

/// Result of one verified download.
pub struct Downloaded {
    pub index: usize,
    pub result: Result<(String, String), String>,
}

/// Downloads the files at `indexes` with up to `concurrency` transfers at a time. Yields
/// each file's result as it finishes so the caller can record progress.
pub fn download_all<'a>(
    spaces: &'a Spaces,
    files: &'a [InputFile],
    indexes: Vec<usize>,
    workdir: &'a Path,
    owner: Owner,
    concurrency: usize,
    progress: Arc<Progress>,
) -> impl futures::Stream<Item = Downloaded> + 'a {
    futures::stream::iter(indexes)
        .map(move |index| {
            let progress = Arc::clone(&progress);
            async move {
                let file = &files[index];
                let space = spaces.get(&file.source.space);
                let result = download_with_retries(space, file, workdir, owner, &progress).await;
                progress.file_done();
                Downloaded { index, result }
            }
        })
        .buffer_unordered(concurrency)
}

async fn download_with_retries(
    space: &Space,
    file: &InputFile,
    workdir: &Path,
    owner: Owner,
    progress: &Progress,
) -> Result<(String, String), String> {
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        let mut counted = 0u64;
        match download_once(space, file, workdir, owner, progress, &mut counted).await {
            Ok(done) => return Ok(done),
            Err(err) => {
                progress.remove_bytes(counted);
                if attempt >= TRANSFER_ATTEMPTS {
                    return Err(format!("stage-in of {} failed after {attempt} attempts: {err}", file.source));
                }
                tracing::warn!(source = %file.source, attempt, error = %err, "stage-in transfer failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
        }
    }
}

/// Downloads one object to a temporary name, verifies it and renames it into place.
/// Returns the SHA-256 and what was verified.
async fn download_once(
    space: &Space,
    file: &InputFile,
    workdir: &Path,
    owner: Owner,
    progress: &Progress,
    counted: &mut u64,
) -> Result<(String, String), String> {
    let relative = Path::new(&file.destination);
    if file.directory {
        workdir::create_dirs(workdir, relative, owner).map_err(|err| err.to_string())?;
        return Ok((String::new(), "directory".into()));
    }
    workdir::create_parents(workdir, relative, owner).map_err(|err| err.to_string())?;
    let target = workdir.join(relative);
    let file_name = relative.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = target.with_file_name(format!(".{file_name}.jobwrap-part"));

    // A leftover (or planted) partial file is removed, and the new one is created with
    // O_EXCL, which never follows a symlink, so jobwrap running as root cannot be made
    // to write outside the working directory.
    match std::fs::remove_file(&partial) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(format!("cannot remove {}: {err}", partial.display())),
    }
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|err| format!("cannot create {}: {err}", partial.display()))?;

    let counter = AtomicU64::new(0);
    let outcome = if let Some(root) = local_space::root(space) {
        download_local(root, file, &output, &partial, progress, &counter).await
    } else if file.size_bytes >= RANGED_MIN_BYTES {
        let _slot = RANGED_SLOTS
            .acquire()
            .await
            .map_err(|err| format!("cannot schedule the download of {}: {err}", partial.display()))?;
        download_ranged(space, file, &output, &partial, progress, &counter).await
    } else {
        download_stream(space, file, &output, &partial, progress, &counter).await
    };
    *counted = counter.load(Ordering::Relaxed);
    let (written, (md5_hex, sha256_hex)) = outcome?;
    output
        .sync_all()
        .map_err(|err| format!("cannot sync {}: {err}", partial.display()))?;
    drop(output);

    let verified = verify(space, file, written, &md5_hex)?;
    owner.chown(&partial).map_err(|err| err.to_string())?;
    tokio::fs::rename(&partial, &target)
        .await
        .map_err(|err| format!("cannot rename {} into place: {err}", partial.display()))?;
    Ok((sha256_hex, verified))
}

/// MD5 and SHA-256 as hex strings.
type Digests = (String, String);

/// The partial file of one input, written in order while its MD5 and SHA-256 are
/// computed and the bytes are counted for progress.
struct HashingSink<'a> {
    output: &'a std::fs::File,
    partial: &'a Path,
    progress: &'a Progress,
    counter: &'a AtomicU64,
    /// False when no MD5 can be compared (multipart ETags), which saves computing it.
    with_md5: bool,
    md5: Md5,
    sha256: Sha256,
    written: u64,
}

impl<'a> HashingSink<'a> {
    fn new(output: &'a std::fs::File, partial: &'a Path, progress: &'a Progress, counter: &'a AtomicU64, with_md5: bool) -> Self {
        HashingSink {
            output,
            partial,
            progress,
            counter,
            with_md5,
            md5: Md5::new(),
            sha256: Sha256::new(),
            written: 0,
        }
    }

    /// Writes `chunk` after the bytes written so far and hashes it.
    fn append(&mut self, chunk: &[u8]) -> Result<(), String> {
        if self.with_md5 {
            self.md5.update(chunk);
        }
        self.sha256.update(chunk);
        self.output
            .write_all_at(chunk, self.written)
            .map_err(|err| format!("cannot write {}: {err}", self.partial.display()))?;

        let len = chunk.len() as u64;
        self.written += len;
        self.counter.fetch_add(len, Ordering::Relaxed);
        self.progress.add_bytes(len);
        Ok(())
    }

    /// Returns the bytes written and their digests.
    fn finish(self) -> (u64, Digests) {
        (self.written, (hex::encode(self.md5.finalize()), hex::encode(self.sha256.finalize())))
    }
}

/// Downloads in one GET, hashing on the fly. Returns the bytes written and the digests.
async fn download_stream(
    space: &Space,
    file: &InputFile,
    output: &std::fs::File,
    partial: &Path,
    progress: &Progress,
    counter: &AtomicU64,
) -> Result<(u64, Digests), String> {
    let options = GetOptions::new().with_if_match(file.e_tag.clone());
    let result = space
        .store
        .get_opts(&file.source.object_path()?, options)
        .await
        .map_err(|err| format!("cannot read {}: {err}", file.source))?;
    let mut stream = result.into_stream();

    let with_md5 = md5_from_e_tag(space, file.e_tag.as_deref()).is_some();
    let mut sink = HashingSink::new(output, partial, progress, counter, with_md5);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| format!("reading {} failed: {err}", file.source))?;
        sink.append(&chunk)?;
    }
    Ok(sink.finish())
}

/// Copies a file of a `file://` space, hashing on the fly.
async fn download_local(
    root: &Path,
    file: &InputFile,
    output: &std::fs::File,
    partial: &Path,
    progress: &Progress,
    counter: &AtomicU64,
) -> Result<(u64, Digests), String> {
    let mut sink = HashingSink::new(output, partial, progress, counter, true);
    local_space::read(root, &file.source.path, |chunk| sink.append(chunk)).await?;
    Ok(sink.finish())
}

/// Downloads a large object as concurrent ranged GETs. Parts are written and hashed in
/// order, so at most [`RANGE_CONCURRENCY`] parts are held in memory per object.
async fn download_ranged(
    space: &Space,
    file: &InputFile,
    output: &std::fs::File,
    partial: &Path,
    progress: &Progress,
    counter: &AtomicU64,
) -> Result<(u64, Digests), String> {
    let path = file.source.object_path()?;
    let ranges: Vec<std::ops::Range<u64>> = (0..file.size_bytes)
        .step_by(RANGE_PART_BYTES as usize)
        .map(|start| start..(start + RANGE_PART_BYTES).min(file.size_bytes))
        .collect();

    let mut parts = futures::stream::iter(ranges)
        .map(|range| {
            let path = &path;
            async move {
                let options = GetOptions::new().with_if_match(file.e_tag.clone()).with_range(Some(range.clone()));
                let bytes = space
                    .store
                    .get_opts(path, options)
                    .await
                    .map_err(|err| format!("cannot read {} bytes {range:?}: {err}", file.source))?
                    .bytes()
                    .await
                    .map_err(|err| format!("reading {} bytes {range:?} failed: {err}", file.source))?;
                if bytes.len() as u64 != range.end - range.start {
                    return Err(format!(
                        "{} returned {} bytes for the range {range:?}",
                        file.source,
                        bytes.len()
                    ));
                }
                Ok((range.start, bytes))
            }
        })
        .buffered(RANGE_CONCURRENCY);

    let with_md5 = md5_from_e_tag(space, file.e_tag.as_deref()).is_some();
    let mut sink = HashingSink::new(output, partial, progress, counter, with_md5);
    while let Some(part) = parts.next().await {
        // `buffered` yields the parts in order, so each starts where the last one ended.
        let (offset, bytes) = part?;
        debug_assert_eq!(offset, sink.written, "ranged parts arrive in order");
        sink.append(&bytes)?;
    }
    Ok(sink.finish())
}

fn verify(space: &Space, file: &InputFile, written: u64, md5_hex: &str) -> Result<String, String> {
    if written != file.size_bytes {
        return Err(format!(
            "size mismatch for {}: expected {} bytes, received {written}",
            file.source, file.size_bytes
        ));
    }
    match md5_from_e_tag(space, file.e_tag.as_deref()) {
        Some(expected) if expected != md5_hex => Err(format!(
            "checksum mismatch for {}: ETag MD5 {expected}, received data MD5 {md5_hex}",
            file.source
        )),
        Some(_) => Ok("size+md5".into()),
        None => Ok("size".into()),
    }
}
