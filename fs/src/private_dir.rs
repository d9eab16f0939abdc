//! Private files and directories below `cache.dir`.
//!
//! The cache holds copies of file contents (staging files, journal entries, data
//! blocks) that the mount may show only to their owner. Invariant: every directory
//! datanet creates below `cache.dir` has mode 0700 and every file 0600, whatever the
//! umask. The modes are given at creation and set again with `chmod`, because a umask
//! only removes bits and a directory left by an older version may be more open.

use std::fs::{File, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every directory datanet creates below `cache.dir`.
pub const DIR_MODE: u32 = 0o700;

/// Mode of every file datanet creates below `cache.dir`.
pub const FILE_MODE: u32 = 0o600;

/// Names below `cache.dir` that belong to datanet: [`restrict_cache_dir`] changes only
/// these, besides the `data-PID` directories of the data cache.
const OWN_ENTRIES: &[&str] = &["journal", "staging", "datanet.log"];

/// Creates `dir` and its missing parents with mode 0700, and sets 0700 on `dir` itself
/// when it already existed.
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// Open options that create a file with mode 0600.
pub fn file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Creates or truncates `path` for writing, with mode 0600 even when it already existed.
pub fn create_file(path: &Path) -> std::io::Result<File> {
    let file = file_options().write(true).create(true).truncate(true).open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Writes `data` to a new or truncated file `path` with mode 0600.
pub fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::io::Write::write_all(&mut create_file(path)?, data)
}

/// Sets mode 0700 on datanet's directories below `cache_dir` and 0600 on the files in
/// them, so that content cached by an older version becomes private at mount. Other
/// entries of `cache_dir`, and `cache_dir` itself, keep their mode, because the
/// operator may have pointed `cache.dir` at a directory that contains other things.
/// Symbolic links are not followed.
pub fn restrict_cache_dir(cache_dir: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(cache_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if OWN_ENTRIES.contains(&name.as_ref()) || name.starts_with("data-") {
            restrict_tree(&entry.path())?;
        }
    }
    Ok(())
}

fn restrict_tree(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        // Removed meanwhile, for example by another mount's cleanup.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    if meta.file_type().is_symlink() {
        return Ok(());
    }

    if meta.is_dir() {
        std::fs::set_permissions(path, Permissions::from_mode(DIR_MODE))?;
        for entry in std::fs::read_dir(path)? {
            restrict_tree(&entry?.path())?;
        }
        return Ok(());
    }
    std::fs::set_permissions(path, Permissions::from_mode(FILE_MODE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn created_and_existing_entries_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_dir(&dir).unwrap();
        write_file(&dir.join("f"), b"x").unwrap();
        assert_eq!(mode(&tmp.path().join("a")), DIR_MODE);
        assert_eq!(mode(&dir), DIR_MODE);
        assert_eq!(mode(&dir.join("f")), FILE_MODE);

        // Existing entries are tightened too, whatever mode an earlier umask gave them.
        std::fs::set_permissions(&dir, Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(dir.join("f"), Permissions::from_mode(0o666)).unwrap();
        create_dir(&dir).unwrap();
        write_file(&dir.join("f"), b"y").unwrap();
        assert_eq!(mode(&dir), DIR_MODE);
        assert_eq!(mode(&dir.join("f")), FILE_MODE);
    }

    #[test]
    fn restrict_changes_only_own_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let journal = tmp.path().join("journal");
        std::fs::create_dir(&journal).unwrap();
        std::fs::write(journal.join("1.data"), b"x").unwrap();
        std::fs::set_permissions(&journal, Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(journal.join("1.data"), Permissions::from_mode(0o644)).unwrap();
        let data = tmp.path().join("data-1/sub");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::set_permissions(&data, Permissions::from_mode(0o755)).unwrap();
        let other = tmp.path().join("other");
        std::fs::write(&other, b"x").unwrap();
        std::fs::set_permissions(&other, Permissions::from_mode(0o644)).unwrap();

        restrict_cache_dir(tmp.path()).unwrap();

        assert_eq!(mode(&journal), DIR_MODE);
        assert_eq!(mode(&journal.join("1.data")), FILE_MODE);
        assert_eq!(mode(&data), DIR_MODE);
        assert_eq!(mode(&other), 0o644);
    }
}
