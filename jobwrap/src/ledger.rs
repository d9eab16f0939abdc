//! The ledger: one JSON record per job under `[jobwrap].state_dir/jobs/`.
//!
//! A record is replaced atomically (write a temporary file, fsync it, rename it over the
//! record, fsync the directory), so after a crash the record is either the previous or
//! the next version, never a torn one. One jobwrap process at a time drives a job: it
//! takes an exclusive `flock` on `<id>.lock`. `jobwrap cancel` only creates
//! `<id>.cancel`, which the driving process polls.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::JobError;
use crate::location::SpaceLocation;
use crate::spec::JobSpec;
use crate::state::{JobState, Phase};

/// One planned stage-in transfer and its result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputFile {
    pub source: SpaceLocation,
    /// Relative to the working directory.
    pub destination: String,
    pub size_bytes: u64,
    pub e_tag: Option<String>,
    pub done: bool,
    /// Checksum of the bytes written, computed while downloading.
    pub sha256: Option<String>,
    /// Checks that passed: `size`, or `size+md5` when the ETag is an MD5.
    pub verified: Option<String>,
    /// True for a directory marker (a zero-byte `dir/` object): stage-in creates an
    /// empty directory at `destination` instead of downloading anything.
    #[serde(default)]
    pub directory: bool,
}

/// One file copied out of the working directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputFile {
    /// Relative to the working directory, or the absolute path of a Slurm log file.
    pub local: String,
    pub destination: SpaceLocation,
    pub size_bytes: u64,
    pub sha256: String,
    pub verified: String,
    /// True when the job did not complete successfully, so the file may be partial.
    pub from_failed_job: bool,
}

/// Slurm's view of the job, as far as jobwrap observed it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SlurmRecord {
    pub job_id: Option<String>,
    /// Raw Slurm state name last seen.
    pub state_name: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub time_limit_seconds: Option<u64>,
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
    /// Source of the final state: `scontrol`, `sacct` or `exit-status file`.
    pub verdict_source: Option<String>,
}

/// The ledger record of one job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub spec: JobSpec,
    pub cluster: String,
    pub uid: u32,
    pub gid: u32,
    pub workdir: PathBuf,
    /// Slurm comment that identifies the job if jobwrap dies right after sbatch.
    pub submit_comment: String,
    pub phase: Phase,
    pub state: JobState,
    pub slurm: SlurmRecord,
    pub inputs: Vec<InputFile>,
    pub outputs: Vec<OutputFile>,
    /// Declared outputs that matched no file.
    pub missing_outputs: Vec<String>,
    /// Set once stage-out was verified and removal of the working directory began.
    pub workdir_removed: bool,
    /// The last error that stopped jobwrap's flow for this job.
    pub error: Option<String>,
    /// The jobwrap process currently driving the job, for `status`.
    pub driver_pid: Option<u32>,
    /// Reason for the cluster choice, when jobwrap chose among several clusters.
    #[serde(default)]
    pub placement: Option<crate::placement::Placement>,
    /// True when the job is submitted with a deferred begin time and staged in while it
    /// waits in the queue.
    #[serde(default)]
    pub overlap: bool,
}

impl JobRecord {
    /// Returns the exit code for foreground mode: the job's own exit code, `128 + signal`
    /// when it was killed by a signal, and 1 when jobwrap itself failed.
    pub fn exit_code(&self) -> i32 {
        match self.state {
            JobState::Completed => 0,
            _ => match (self.slurm.exit_code, self.slurm.signal) {
                (Some(code), _) if code != 0 => code,
                (_, Some(signal)) if signal != 0 => 128 + signal,
                _ => 1,
            },
        }
    }
}

/// The ledger directory.
#[derive(Debug, Clone)]
pub struct Ledger {
    dir: PathBuf,
}

/// An exclusive claim on one job; released when dropped.
#[derive(Debug)]
pub struct JobLock {
    _file: File,
}

pub fn now_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Ledger {
    /// Opens (and creates, mode 0700) the ledger below `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Ledger, JobError> {
        let dir = state_dir.join("jobs");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|err| JobError::io("cannot create ledger directory (check jobwrap.state_dir)", &dir, err))?;
        Ok(Ledger { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Replaces the job's record atomically and durably.
    pub fn save(&self, record: &mut JobRecord) -> Result<(), JobError> {
        record.updated_at = now_seconds();
        let path = self.record_path(&record.id);
        let temporary = self.dir.join(format!(".{}.json.tmp-{}", record.id, std::process::id()));
        let text = serde_json::to_vec_pretty(record).map_err(|err| JobError::Record {
            path: path.clone(),
            message: err.to_string(),
        })?;

        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|err| JobError::io("cannot write job record", &temporary, err))?;
        file.write_all(&text)
            .and_then(|_| file.sync_all())
            .map_err(|err| JobError::io("cannot write job record", &temporary, err))?;
        fs::rename(&temporary, &path).map_err(|err| JobError::io("cannot replace job record", &path, err))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|err| JobError::io("cannot sync ledger directory", &self.dir, err))?;
        Ok(())
    }

    pub fn load(&self, id: &str) -> Result<JobRecord, JobError> {
        let path = self.record_path(id);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Err(JobError::UnknownJob(id.to_string())),
            Err(err) => return Err(JobError::io("cannot read job record", &path, err)),
        };
        serde_json::from_slice(&text).map_err(|err| JobError::Record {
            path,
            message: err.to_string(),
        })
    }

    /// Finds a job by jobwrap id or by Slurm job id.
    pub fn find(&self, id: &str) -> Result<JobRecord, JobError> {
        if valid_id(id) {
            match self.load(id) {
                Err(JobError::UnknownJob(_)) => {}
                other => return other,
            }
        }
        self.list()?
            .into_iter()
            .find(|record| record.slurm.job_id.as_deref() == Some(id))
            .ok_or_else(|| JobError::UnknownJob(id.to_string()))
    }

    /// Returns all records, oldest first.
    pub fn list(&self) -> Result<Vec<JobRecord>, JobError> {
        let entries = fs::read_dir(&self.dir).map_err(|err| JobError::io("cannot list ledger", &self.dir, err))?;
        let mut records = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|err| JobError::io("cannot list ledger", &self.dir, err))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else { continue };
            if name.starts_with('.') {
                continue;
            }
            match self.load(id) {
                Ok(record) => records.push(record),
                Err(err) => tracing::warn!(job = id, error = %err, "skipping unreadable job record"),
            }
        }
        records.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(records)
    }

    /// True when the job has a record.
    pub fn contains(&self, id: &str) -> bool {
        self.record_path(id).exists()
    }

    /// Removes the record of a job that was never submitted, with its lock and cancel
    /// files; missing files are not an error.
    pub fn remove(&self, id: &str) -> Result<(), JobError> {
        for path in [self.record_path(id), self.dir.join(format!("{id}.cancel")), self.dir.join(format!("{id}.lock"))] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(JobError::io("cannot remove job record", &path, err)),
            }
        }
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|err| JobError::io("cannot sync ledger directory", &self.dir, err))
    }

    /// Takes the exclusive lock of a job without waiting.
    pub fn lock(&self, id: &str) -> Result<JobLock, JobError> {
        let path = self.dir.join(format!("{id}.lock"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|err| JobError::io("cannot open job lock", &path, err))?;
        // SAFETY: flock on a file descriptor that `file` owns for the duration of the call.
        let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if result != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(JobError::Locked { id: id.to_string(), path });
            }
            return Err(JobError::io("cannot lock job", &path, err));
        }
        Ok(JobLock { _file: file })
    }

    /// Asks the process driving the job (now or on the next resume) to cancel it.
    pub fn request_cancel(&self, id: &str) -> Result<(), JobError> {
        let path = self.dir.join(format!("{id}.cancel"));
        File::create(&path)
            .and_then(|file| file.sync_all())
            .map_err(|err| JobError::io("cannot record cancel request", &path, err))
    }

    pub fn cancel_requested(&self, id: &str) -> bool {
        self.dir.join(format!("{id}.cancel")).exists()
    }
}

/// Creates a new job id: UTC date and time plus random hex, e.g. `20261204-223015-7f3a9c`.
pub fn new_job_id() -> String {
    let mut random = [0u8; 3];
    if let Ok(mut file) = File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut file, &mut random);
    }
    format_job_id(SystemTime::now(), random)
}

fn format_job_id(time: SystemTime, random: [u8; 3]) -> String {
    let time = chrono::DateTime::<chrono::Utc>::from(time).format("%Y%m%d-%H%M%S");
    format!("{time}-{}", hex::encode(random))
}

/// True for strings shaped like the ids that [`new_job_id`] creates.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_with_utc_time() {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_423_415);
        assert_eq!(format_job_id(time, [0x7f, 0x3a, 0x9c]), "20261204-223015-7f3a9c");
    }

    #[test]
    fn ids_are_unique_and_valid() {
        let a = new_job_id();
        let b = new_job_id();
        assert_ne!(a, b);
        assert!(valid_id(&a), "{a}");
        assert!(!valid_id("../x"));
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let held = ledger.lock("j1").unwrap();
        assert!(matches!(ledger.lock("j1"), Err(JobError::Locked { .. })));
        drop(held);
        assert!(ledger.lock("j1").is_ok());
        assert!(!ledger.cancel_requested("j1"));
        ledger.request_cancel("j1").unwrap();
        assert!(ledger.cancel_requested("j1"));
    }
}
