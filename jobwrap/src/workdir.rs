//! The job's private working directory under the cluster's scratch root.
//!
//! The directory is `<scratch_root>/jobwrap-<id>`, mode 0700, owned by the submitting
//! user (`SUDO_UID`/`SUDO_GID` when jobwrap runs as root through sudo, otherwise the real
//! uid and gid), and so is everything jobwrap creates inside it. jobwrap's own files live
//! in its `.jobwrap/` subdirectory. The scratch root must be visible at the same path on
//! the submit host and the compute nodes.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::JobError;

/// jobwrap's subdirectory of the working directory.
pub const CONTROL_DIR: &str = ".jobwrap";

/// The user the job runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The submitting user: the sudo caller when running as root through sudo.
    pub fn submitting_user() -> Owner {
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        if uid == 0 {
            let sudo = |name: &str| std::env::var(name).ok().and_then(|value| value.parse::<u32>().ok());
            if let (Some(uid), Some(gid)) = (sudo("SUDO_UID"), sudo("SUDO_GID")) {
                return Owner { uid, gid };
            }
        }
        Owner { uid, gid }
    }

    /// True when files must be handed over to the owner with chown.
    fn needs_chown(&self) -> bool {
        // SAFETY: geteuid cannot fail.
        self.uid != unsafe { libc::geteuid() }
    }

    /// Gives `path` to the owner (without following a final symlink).
    pub fn chown(&self, path: &Path) -> Result<(), JobError> {
        if !self.needs_chown() {
            return Ok(());
        }
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .map_err(|err| JobError::io("cannot change owner of", path, err))
    }
}

/// The working directory path of job `id`.
pub fn workdir_path(scratch_root: &Path, id: &str) -> PathBuf {
    scratch_root.join(format!("jobwrap-{id}"))
}

/// Creates the working directory and its control directory; existing ones are reused
/// so that a resumed job continues in place.
pub fn create(workdir: &Path, owner: Owner) -> Result<(), JobError> {
    let scratch_root = workdir.parent().unwrap_or(Path::new("/"));
    let root_meta = fs::metadata(scratch_root)
        .map_err(|err| JobError::io("scratch root is not usable; create it or fix clusters.*.scratch_root", scratch_root, err))?;
    if !root_meta.is_dir() {
        return Err(JobError::io(
            "scratch root is not a directory",
            scratch_root,
            std::io::Error::from(std::io::ErrorKind::NotADirectory),
        ));
    }

    for dir in [workdir.to_path_buf(), workdir.join(CONTROL_DIR)] {
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta = fs::symlink_metadata(&dir).map_err(|err| JobError::io("cannot inspect", &dir, err))?;
                if !meta.is_dir() {
                    return Err(JobError::io("expected a directory at", &dir, err));
                }
            }
            Err(err) => return Err(JobError::io("cannot create working directory", &dir, err)),
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|err| JobError::io("cannot set mode 0700 on", &dir, err))?;
        owner.chown(&dir)?;
    }
    Ok(())
}

/// Creates the parent directories of `relative` inside the working directory, owned by
/// the job's user. Refuses to pass through symlinks, which the job's user could plant.
pub fn create_parents(workdir: &Path, relative: &Path, owner: Owner) -> Result<(), JobError> {
    let Some(parent) = relative.parent() else { return Ok(()) };
    create_dirs(workdir, parent, owner)
}

/// Creates the directory `relative` and its parents inside the working directory, owned
/// by the job's user; existing directories are kept.
pub fn create_dirs(workdir: &Path, relative: &Path, owner: Owner) -> Result<(), JobError> {
    let mut current = workdir.to_path_buf();
    for component in relative.components() {
        current.push(component);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => {
                return Err(JobError::io(
                    "expected a directory (not a file or symlink) at",
                    &current,
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                ))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(JobError::io("cannot inspect", &current, err)),
        }
        match fs::DirBuilder::new().mode(0o755).create(&current) {
            Ok(()) => owner.chown(&current)?,
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(JobError::io("cannot create directory", &current, err)),
        }
    }
    Ok(())
}

/// Writes a file in the control directory with the given mode, owned by the job's user.
pub fn write_control_file(workdir: &Path, name: &str, content: &str, mode: u32, owner: Owner) -> Result<PathBuf, JobError> {
    let path = workdir.join(CONTROL_DIR).join(name);
    let temporary = workdir.join(CONTROL_DIR).join(format!(".{name}.tmp"));
    fs::write(&temporary, content).map_err(|err| JobError::io("cannot write", &temporary, err))?;
    fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))
        .map_err(|err| JobError::io("cannot set mode on", &temporary, err))?;
    owner.chown(&temporary)?;
    fs::rename(&temporary, &path).map_err(|err| JobError::io("cannot write", &path, err))?;
    Ok(path)
}

/// Removes the working directory and everything in it.
pub fn remove(workdir: &Path) -> Result<(), JobError> {
    match fs::remove_dir_all(workdir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(JobError::io("cannot remove working directory", workdir, err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn workdir_is_private() {
        let scratch = tempfile::tempdir().unwrap();
        let workdir = workdir_path(scratch.path(), "x 'y' $z");
        let owner = Owner::submitting_user();
        create(&workdir, owner).unwrap();
        create(&workdir, owner).unwrap();
        let meta = fs::metadata(&workdir).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert!(workdir.join(CONTROL_DIR).is_dir());

        create_parents(&workdir, Path::new("a/b/c.txt"), owner).unwrap();
        assert!(workdir.join("a/b").is_dir());

        std::os::unix::fs::symlink("/etc", workdir.join("link")).unwrap();
        assert!(create_parents(&workdir, Path::new("link/x/y"), owner).is_err());
        remove(&workdir).unwrap();
        assert!(!workdir.exists());
    }
}
