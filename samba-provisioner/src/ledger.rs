//! The lease ledger: one JSON record per lease in `<state_dir>/leases/ID.json`.
//!
//! Records are written atomically (temporary file, fsync, rename, fsync of the
//! directory), so a crash leaves the old record or the new one, never a mix.
//! Invariant: a lease's record exists, in state `provisioning`, before any Unix account,
//! passdb entry or share of that lease is created. It is removed only after all of them
//! are gone. Reconcile relies on this to tell its own objects from orphans.
//!
//! Grant and revoke hold the ledger lock shared, reconcile holds it exclusively, so
//! reconcile never sees an operation half-way. The lock is an `flock` on
//! `<state_dir>/lock`, which the kernel releases when a process dies.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::lease::{check_lease_id, Lease};
use crate::ProvisionError;

/// A sealed token kept with its lease, so reconcile can rebuild a lost passdb entry
/// with the password the node already holds. Never shown through `Debug`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SealedToken(Zeroizing<String>);

impl SealedToken {
    pub fn new(text: String) -> SealedToken {
        SealedToken(Zeroizing::new(text))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SealedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealedToken(<redacted>)")
    }
}

/// One file of the ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRecord {
    pub lease: Lease,
    pub token: SealedToken,
}

#[derive(Debug)]
pub struct Ledger {
    state_dir: PathBuf,
    leases_dir: PathBuf,
}

/// Holds the ledger lock until dropped.
#[derive(Debug)]
pub struct LedgerLock {
    _file: File,
}

impl Ledger {
    /// Opens the ledger, creating `state_dir` and its `leases` directory with mode 0700.
    pub fn open(state_dir: &Path) -> Result<Ledger, ProvisionError> {
        let leases_dir = state_dir.join("leases");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&leases_dir)
            .map_err(|err| ProvisionError::io("create the state directory", &leases_dir, err))?;
        Ok(Ledger {
            state_dir: state_dir.to_path_buf(),
            leases_dir,
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.leases_dir.join(format!("{id}.json"))
    }

    /// Takes the lock that grant and revoke share.
    pub fn lock_shared(&self) -> Result<LedgerLock, ProvisionError> {
        self.lock(libc::LOCK_SH)
    }

    /// Takes the lock that excludes every grant and revoke, for reconcile.
    pub fn lock_exclusive(&self) -> Result<LedgerLock, ProvisionError> {
        self.lock(libc::LOCK_EX)
    }

    fn lock(&self, operation: libc::c_int) -> Result<LedgerLock, ProvisionError> {
        let path = self.state_dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|err| ProvisionError::io("open the ledger lock", &path, err))?;
        loop {
            // SAFETY: flock only reads the descriptor, which `file` keeps open.
            let result = unsafe { libc::flock(file.as_raw_fd(), operation) };
            if result == 0 {
                return Ok(LedgerLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(ProvisionError::io("lock", &path, err));
            }
        }
    }

    /// Writes a record atomically and durably.
    pub fn write(&self, record: &LeaseRecord) -> Result<(), ProvisionError> {
        let path = self.record_path(&record.lease.id);
        let text = Zeroizing::new(serde_json::to_vec_pretty(record).map_err(|err| {
            ProvisionError::CorruptLease {
                path: path.clone(),
                reason: err.to_string(),
            }
        })?);

        // NamedTempFile creates the file with mode 0600.
        let mut file = tempfile::NamedTempFile::new_in(&self.leases_dir).map_err(|err| {
            ProvisionError::io("create a temporary file in", &self.leases_dir, err)
        })?;
        file.write_all(&text)
            .and_then(|()| file.as_file().sync_all())
            .map_err(|err| ProvisionError::io("write", file.path().to_path_buf(), err))?;
        file.persist(&path)
            .map_err(|err| ProvisionError::io("replace", &path, err.error))?;
        self.sync_directory()
    }

    /// Reads one record.
    pub fn read(&self, id: &str) -> Result<LeaseRecord, ProvisionError> {
        check_lease_id(id)?;
        let path = self.record_path(id);
        let text = match std::fs::read(&path) {
            Ok(text) => Zeroizing::new(text),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(ProvisionError::LeaseNotFound {
                    id: id.to_string(),
                    dir: self.leases_dir.clone(),
                })
            }
            Err(err) => return Err(ProvisionError::io("read", &path, err)),
        };
        parse_record(&path, &text)
    }

    /// Removes a record; a record that is already gone is not an error.
    pub fn remove(&self, id: &str) -> Result<(), ProvisionError> {
        let path = self.record_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_directory(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(ProvisionError::io("remove", &path, err)),
        }
    }

    /// Reads every record. Files that do not parse are logged and skipped, so one bad
    /// file cannot stop gc; their account then counts as an orphan.
    pub fn list(&self) -> Result<Vec<LeaseRecord>, ProvisionError> {
        let entries = std::fs::read_dir(&self.leases_dir)
            .map_err(|err| ProvisionError::io("list", &self.leases_dir, err))?;
        let mut records = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|err| ProvisionError::io("list", &self.leases_dir, err))?;
            let path = entry.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if check_lease_id(id).is_err() {
                continue;
            }
            let text = match std::fs::read(&path) {
                Ok(text) => Zeroizing::new(text),
                // Removed by a concurrent revoke between read_dir and read.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(ProvisionError::io("read", &path, err)),
            };
            match parse_record(&path, &text) {
                Ok(record) => records.push(record),
                Err(err) => {
                    tracing::error!(path = %path.display(), error = %err, "skipping unreadable lease record")
                }
            }
        }
        records.sort_by(|a, b| {
            (a.lease.created_at, &a.lease.id).cmp(&(b.lease.created_at, &b.lease.id))
        });
        Ok(records)
    }

    /// Removes temporary files that a killed process left in the ledger directory and
    /// in `extra_dir`. Call only under the exclusive lock, when no write is running.
    pub fn remove_stale_temp_files(&self, extra_dir: &Path) -> usize {
        let mut removed = 0;
        for dir in [self.leases_dir.as_path(), extra_dir] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let is_record = name
                    .strip_suffix(".json")
                    .is_some_and(|id| check_lease_id(id).is_ok());
                if is_record || !entry.file_type().is_ok_and(|t| t.is_file()) {
                    continue;
                }
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(err) => {
                        tracing::warn!(path = %entry.path().display(), error = %err, "cannot remove a stale temporary file")
                    }
                }
            }
        }
        removed
    }

    fn sync_directory(&self) -> Result<(), ProvisionError> {
        File::open(&self.leases_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|err| ProvisionError::io("sync", &self.leases_dir, err))
    }
}

fn parse_record(path: &Path, text: &[u8]) -> Result<LeaseRecord, ProvisionError> {
    let record: LeaseRecord =
        serde_json::from_slice(text).map_err(|err| ProvisionError::CorruptLease {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
    let expected = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if record.lease.id != expected {
        return Err(ProvisionError::CorruptLease {
            path: path.to_path_buf(),
            reason: format!("it holds lease {}", record.lease.id),
        });
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::lease::LeaseState;

    fn record(id: &str, created_at: u64) -> LeaseRecord {
        LeaseRecord {
            lease: Lease {
                id: id.into(),
                account: "dnlabcdef012345".into(),
                share: "dnlabcdef012345".into(),
                path: "/datanet/x".into(),
                read_only: true,
                client_ip: None,
                label: Some("mesh".into()),
                created_at,
                expires_at: created_at + 60,
                state: LeaseState::Provisioning,
            },
            token: SealedToken::new("sealed".into()),
        }
    }

    #[test]
    fn write_read_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.write(&record("bbbbbbbbbbbbbbbb", 2)).unwrap();
        ledger.write(&record("aaaaaaaaaaaaaaaa", 1)).unwrap();

        let mut updated = record("bbbbbbbbbbbbbbbb", 2);
        updated.lease.state = LeaseState::Active;
        ledger.write(&updated).unwrap();
        assert_eq!(
            ledger.read("bbbbbbbbbbbbbbbb").unwrap().lease.state,
            LeaseState::Active
        );

        let ids: Vec<String> = ledger
            .list()
            .unwrap()
            .into_iter()
            .map(|r| r.lease.id)
            .collect();
        assert_eq!(ids, ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]);

        ledger.remove("aaaaaaaaaaaaaaaa").unwrap();
        ledger.remove("aaaaaaaaaaaaaaaa").unwrap();
        assert!(matches!(
            ledger.read("aaaaaaaaaaaaaaaa"),
            Err(ProvisionError::LeaseNotFound { .. })
        ));
    }

    #[test]
    fn records_and_directory_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("state")).unwrap();
        ledger.write(&record("aaaaaaaaaaaaaaaa", 1)).unwrap();
        let file_mode = std::fs::metadata(ledger.record_path("aaaaaaaaaaaaaaaa"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(file_mode & 0o077, 0, "{file_mode:o}");
        let dir_mode = std::fs::metadata(&ledger.leases_dir)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o077, 0, "{dir_mode:o}");
    }

    #[test]
    fn corrupt_record_is_skipped_in_list() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.write(&record("aaaaaaaaaaaaaaaa", 1)).unwrap();
        std::fs::write(ledger.record_path("cccccccccccccccc"), "{not json").unwrap();
        assert_eq!(ledger.list().unwrap().len(), 1);
        assert!(matches!(
            ledger.read("cccccccccccccccc"),
            Err(ProvisionError::CorruptLease { .. })
        ));
    }

    #[test]
    fn stale_temp_files_removed_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.write(&record("aaaaaaaaaaaaaaaa", 1)).unwrap();
        std::fs::write(ledger.leases_dir.join(".tmpAbC123"), "partial").unwrap();
        let extra = dir.path().join("tmp");
        std::fs::create_dir(&extra).unwrap();
        std::fs::write(extra.join("share-x.conf"), "[x]").unwrap();

        assert_eq!(ledger.remove_stale_temp_files(&extra), 2);
        assert_eq!(ledger.list().unwrap().len(), 1);
        assert!(std::fs::read_dir(&extra).unwrap().next().is_none());
    }

    #[test]
    fn debug_output_hides_token() {
        let shown = format!("{:?}", record("aaaaaaaaaaaaaaaa", 1));
        assert!(!shown.contains("sealed\""), "{shown}");
    }
}
