//! Direct file access to `file://` spaces for stage-in and stage-out.
//!
//! The datanet mount keeps a `file://` space as plain files below its root, so a key is
//! a relative file path, byte for byte. `object_store`'s local store cannot be used for
//! every such key, because it hides and rejects names that end with `#` and digits
//! (`run#12`), which it reserves for its own temporary files. jobwrap therefore lists,
//! reads and writes these spaces itself.
//!
//! Invariant: keys are checked relative paths (no leading `/`, `.` or `..`), so every
//! path stays below the space root. A new file appears under its final name only after
//! all its bytes were written and synced.

use std::path::{Path, PathBuf};

use datanet::config::SpaceLocation as SpaceUrl;
use datanet::Space;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes read or written per call.
const CHUNK_BYTES: usize = 1 << 20;

/// One entry found below a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEntry {
    /// Path relative to the listed prefix, `/`-separated; empty for the prefix itself.
    pub relative: String,
    pub size: u64,
    /// True for a directory (it is staged in as an empty directory).
    pub directory: bool,
}

/// The root directory of a `file://` space, or `None` for other spaces.
pub fn root(space: &Space) -> Option<&Path> {
    match &space.config.location {
        SpaceUrl::Local { root } => Some(root),
        _ => None,
    }
}

/// The file path of `key` below `root`.
pub fn file_path(root: &Path, key: &str) -> PathBuf {
    let key = key.trim_end_matches('/');
    if key.is_empty() {
        root.to_path_buf()
    } else {
        root.join(key)
    }
}

/// The size of the regular file at `key`, or `None` when there is none (a directory is
/// not a file).
pub fn head(root: &Path, key: &str) -> std::io::Result<Option<u64>> {
    match std::fs::metadata(file_path(root, key)) {
        Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
        Ok(_) => Ok(None),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Lists the directory `key` recursively: regular files (symlinks to files included)
/// and directories, the directory itself first. Symlinked directories are not entered.
/// A missing directory lists nothing.
pub fn list(root: &Path, key: &str) -> std::io::Result<Vec<LocalEntry>> {
    let top = file_path(root, key);
    match std::fs::symlink_metadata(&top) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Ok(Vec::new()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    }

    let mut entries = vec![LocalEntry {
        relative: String::new(),
        size: 0,
        directory: true,
    }];
    let mut pending = vec![String::new()];
    while let Some(relative) = pending.pop() {
        for entry in std::fs::read_dir(top.join(&relative))? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                tracing::warn!(dir = %top.join(&relative).display(), "skipping a file name that is not UTF-8");
                continue;
            };
            let child = if relative.is_empty() { name } else { format!("{relative}/{name}") };
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(child.clone());
                entries.push(LocalEntry {
                    relative: child,
                    size: 0,
                    directory: true,
                });
                continue;
            }
            match std::fs::metadata(entry.path()) {
                Ok(meta) if meta.is_file() => entries.push(LocalEntry {
                    relative: child,
                    size: meta.len(),
                    directory: false,
                }),
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok(entries)
}

/// Reads the file at `key` in chunks, passing each to `consume`. Returns the bytes read.
pub async fn read(root: &Path, key: &str, mut consume: impl FnMut(&[u8]) -> Result<(), String>) -> Result<u64, String> {
    let path = file_path(root, key);
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    let mut buffer = vec![0u8; CHUNK_BYTES];
    let mut total = 0u64;
    loop {
        let read = file
            .read(&mut buffer)
            .await
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        if read == 0 {
            return Ok(total);
        }
        consume(&buffer[..read])?;
        total += read as u64;
    }
}

/// Copies `source` to the file `key` below `root`, creating its parent directories:
/// the bytes go to a temporary file next to it, which is synced and renamed over the
/// final name. Returns the bytes written and their SHA-256 as hex.
pub async fn write(root: &Path, key: &str, mut source: tokio::fs::File, source_name: &Path) -> Result<(u64, String), String> {
    let target = file_path(root, key);
    let parent = target.parent().unwrap_or(root).to_path_buf();
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    tokio::fs::create_dir_all(&parent)
        .await
        .map_err(|err| format!("cannot create directory {}: {err}", parent.display()))?;
    let temporary = parent.join(format!(".{name}.jobwrap-part-{}", std::process::id()));

    let result = copy_synced(&mut source, source_name, &temporary).await;
    let (size, sha256) = match result {
        Ok(done) => done,
        Err(err) => {
            let _ = tokio::fs::remove_file(&temporary).await;
            return Err(err);
        }
    };
    if let Err(err) = tokio::fs::rename(&temporary, &target).await {
        let _ = tokio::fs::remove_file(&temporary).await;
        return Err(format!("cannot rename {} into place: {err}", temporary.display()));
    }
    std::fs::File::open(&parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| format!("cannot sync directory {}: {err}", parent.display()))?;
    Ok((size, sha256))
}

async fn copy_synced(source: &mut tokio::fs::File, source_name: &Path, temporary: &Path) -> Result<(u64, String), String> {
    let mut output = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temporary)
        .await
        .map_err(|err| format!("cannot create {}: {err}", temporary.display()))?;
    let mut sha256 = Sha256::new();
    let mut buffer = vec![0u8; CHUNK_BYTES];
    let mut total = 0u64;
    loop {
        let read = source
            .read(&mut buffer)
            .await
            .map_err(|err| format!("cannot read {}: {err}", source_name.display()))?;
        if read == 0 {
            break;
        }
        sha256.update(&buffer[..read]);
        output
            .write_all(&buffer[..read])
            .await
            .map_err(|err| format!("cannot write {}: {err}", temporary.display()))?;
        total += read as u64;
    }
    output
        .sync_all()
        .await
        .map_err(|err| format!("cannot sync {}: {err}", temporary.display()))?;
    Ok((total, hex::encode(sha256.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_keeps_names_and_reports_directories() {
        let root = tempfile::tempdir().unwrap();
        for name in ["in/run#12", "in/p%41.txt", "in/sub/a b.txt"] {
            let path = root.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, name).unwrap();
        }
        std::fs::create_dir_all(root.path().join("in/empty")).unwrap();

        let mut entries = list(root.path(), "in").unwrap();
        entries.sort_by(|a, b| a.relative.cmp(&b.relative));
        let names: Vec<(&str, bool)> = entries.iter().map(|e| (e.relative.as_str(), e.directory)).collect();
        assert_eq!(
            names,
            vec![("", true), ("empty", true), ("p%41.txt", false), ("run#12", false), ("sub", true), ("sub/a b.txt", false)]
        );
        assert_eq!(head(root.path(), "in/run#12").unwrap(), Some(9));
        assert_eq!(head(root.path(), "in/sub").unwrap(), None);
        assert!(list(root.path(), "absent").unwrap().is_empty());
    }

    #[tokio::test]
    async fn write_replaces_atomically() {
        let root = tempfile::tempdir().unwrap();
        let source_path = root.path().join("source");
        std::fs::write(&source_path, b"payload").unwrap();
        let source = tokio::fs::File::open(&source_path).await.unwrap();
        let (size, _) = write(root.path(), "out/x#1", source, &source_path).await.unwrap();
        assert_eq!(size, 7);
        assert_eq!(std::fs::read(root.path().join("out/x#1")).unwrap(), b"payload");
        assert_eq!(std::fs::read_dir(root.path().join("out")).unwrap().count(), 1);
    }
}
