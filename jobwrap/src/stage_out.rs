//! Stage-out: which files of the working directory go where, and verified uploads.
//!
//! Declared outputs are matched against the regular files of the working directory
//! (symlinks and `.jobwrap/` are never staged out). A pattern that matches nothing is
//! reported by name. Slurm's stdout and stderr files go to the log destination. An
//! upload counts as verified when a HEAD of the new object returns the local size and,
//! for single-part uploads to S3, the returned ETag equals the MD5 of the bytes sent.

use std::collections::BTreeSet;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use datanet::Space;
use md5::{Digest, Md5};
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::Sha256;
use tokio::io::AsyncReadExt;

use crate::location::SpaceLocation;
use crate::spec::{is_glob, JobSpec};
use crate::local_space;
use crate::stage_in::{md5_from_e_tag, FIRST_BACKOFF, TRANSFER_ATTEMPTS};
use crate::workdir::CONTROL_DIR;

/// Files up to this size are sent in one PUT; larger ones as a multipart upload.
const SINGLE_PUT_MAX_BYTES: u64 = 16 << 20;
/// Part size of multipart uploads.
const PART_SIZE_BYTES: usize = 8 << 20;
/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Memory, in MiB, that uploads to object stores may hold at once across all transfers.
/// A single PUT holds its whole file and a multipart upload its parts in flight plus
/// the one being filled, so `transfer_concurrency` alone does not bound memory.
const UPLOAD_MEMORY_MIB: u32 = 256;
static UPLOAD_MEMORY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(UPLOAD_MEMORY_MIB as usize);

/// MiB of [`UPLOAD_MEMORY`] that uploading a file of `size` bytes holds.
fn upload_memory_mib(size: u64) -> u32 {
    let bytes = if size <= SINGLE_PUT_MAX_BYTES { size } else { ((PARTS_IN_FLIGHT + 1) * PART_SIZE_BYTES) as u64 };
    (bytes.div_ceil(1 << 20) as u32).clamp(1, UPLOAD_MEMORY_MIB)
}

/// One file to copy out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedOutput {
    /// Name shown to users and stored in the ledger.
    pub local_name: String,
    pub path: PathBuf,
    pub destination: SpaceLocation,
}

/// Matches the declared outputs and the Slurm log files. Returns the files to copy and
/// the patterns that matched nothing.
pub fn plan(spec: &JobSpec, workdir: &Path, log_files: &[PathBuf]) -> (Vec<PlannedOutput>, Vec<String>) {
    let files = regular_files(workdir);
    let mut planned = Vec::new();
    let mut missing = Vec::new();
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };

    for output in &spec.stage_out {
        let Some(destination) = output.destination.as_ref().or(spec.output.as_ref()) else { continue };
        let matches: Vec<&String> = if is_glob(&output.pattern) {
            let Ok(pattern) = glob::Pattern::new(&output.pattern) else { continue };
            files.iter().filter(|file| pattern.matches_with(file, options)).collect()
        } else {
            files.iter().filter(|file| **file == output.pattern).collect()
        };
        if matches.is_empty() {
            missing.push(output.pattern.clone());
            continue;
        }
        for file in matches {
            let target = if destination.is_prefix() { destination.join(file) } else { destination.clone() };
            planned.push(PlannedOutput {
                local_name: file.clone(),
                path: workdir.join(file),
                destination: target,
            });
        }
    }

    if let Some(log_destination) = spec.log_destination() {
        for log in log_files {
            let Some(name) = log.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
            let is_file = std::fs::symlink_metadata(log).map(|m| m.is_file()).unwrap_or(false);
            if !is_file {
                continue;
            }
            let local_name = match log.strip_prefix(workdir) {
                Ok(relative) => relative.to_string_lossy().into_owned(),
                Err(_) => log.to_string_lossy().into_owned(),
            };
            planned.push(PlannedOutput {
                local_name,
                path: log.clone(),
                destination: log_destination.join(&name),
            });
        }
    }

    let mut seen = BTreeSet::new();
    planned.retain(|output| seen.insert((output.path.clone(), output.destination.to_string())));
    (planned, missing)
}

/// Lists regular files below `workdir` as `/`-separated relative paths, skipping the
/// control directory, symlinks and partial downloads.
fn regular_files(workdir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(workdir.join(&relative)) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if relative.as_os_str().is_empty() && name == CONTROL_DIR {
                continue;
            }
            let child = relative.join(&name);
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(child),
                Ok(kind) if kind.is_file() && !name.ends_with(".jobwrap-part") => {
                    files.push(child.to_string_lossy().into_owned())
                }
                _ => {}
            }
        }
    }
    files.sort();
    files
}

/// Uploads one file with retries. Returns size, SHA-256 and what was verified.
pub async fn upload_with_retries(space: &Space, output: &PlannedOutput) -> Result<(u64, String, String), String> {
    let mut backoff: std::time::Duration = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match upload_once(space, output).await {
            Ok(done) => return Ok(done),
            Err(err) => {
                if attempt >= TRANSFER_ATTEMPTS {
                    return Err(format!(
                        "stage-out of {} to {} failed after {attempt} attempts: {err}",
                        output.local_name, output.destination
                    ));
                }
                tracing::warn!(file = %output.local_name, attempt, error = %err, "stage-out transfer failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
        }
    }
}

/// Opens a file for reading without following a final symlink, so a job cannot make
/// jobwrap (possibly running as root) upload a file outside the working directory.
async fn open_no_follow(path: &Path) -> Result<tokio::fs::File, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    Ok(tokio::fs::File::from_std(file))
}

async fn upload_once(space: &Space, output: &PlannedOutput) -> Result<(u64, String, String), String> {
    let path = output.destination.object_path()?;
    let mut file = open_no_follow(&output.path).await?;
    if let Some(root) = local_space::root(space) {
        return upload_local(root, output, file).await;
    }
    let size = file
        .metadata()
        .await
        .map_err(|err| format!("cannot read {}: {err}", output.path.display()))?
        .len();
    let _memory = UPLOAD_MEMORY
        .acquire_many(upload_memory_mib(size))
        .await
        .map_err(|err| format!("cannot schedule the upload of {}: {err}", output.path.display()))?;

    let mut sha256 = Sha256::new();
    let mut verified = String::from("size");
    if size <= SINGLE_PUT_MAX_BYTES {
        let mut bytes = Vec::with_capacity(size as usize);
        file.read_to_end(&mut bytes)
            .await
            .map_err(|err| format!("cannot read {}: {err}", output.path.display()))?;
        sha256.update(&bytes);
        let md5_hex = hex::encode(Md5::digest(&bytes));
        let sent = bytes.len() as u64;
        let result = space
            .store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|err| format!("cannot write {}: {err}", output.destination))?;
        if sent != size {
            return Err(format!("{} changed size while it was read", output.path.display()));
        }
        if let Some(e_tag_md5) = md5_from_e_tag(space, result.e_tag.as_deref()) {
            if e_tag_md5 != md5_hex {
                return Err(format!("checksum mismatch: sent MD5 {md5_hex}, store returned ETag {e_tag_md5}"));
            }
            verified = "size+md5".into();
        }
    } else {
        upload_multipart(space, output, file, &path, &mut sha256).await?;
    }

    let meta = space
        .store
        .head(&path)
        .await
        .map_err(|err| format!("cannot check {} after upload: {err}", output.destination))?;
    if meta.size != size {
        return Err(format!(
            "size mismatch after upload of {}: local {size} bytes, stored {}",
            output.local_name, meta.size
        ));
    }
    Ok((size, hex::encode(sha256.finalize()), verified))
}

/// Copies a file into a `file://` space and checks the size of what was stored.
async fn upload_local(root: &Path, output: &PlannedOutput, file: tokio::fs::File) -> Result<(u64, String, String), String> {
    let size = file
        .metadata()
        .await
        .map_err(|err| format!("cannot read {}: {err}", output.path.display()))?
        .len();
    let key = output.destination.path.as_str();
    let (written, sha256) = local_space::write(root, key, file, &output.path).await?;
    if written != size {
        return Err(format!("{} changed size while it was read", output.path.display()));
    }
    match local_space::head(root, key) {
        Ok(Some(stored)) if stored == size => Ok((size, sha256, "size".into())),
        Ok(stored) => Err(format!(
            "size mismatch after copying {} to {}: local {size} bytes, stored {stored:?}",
            output.local_name, output.destination
        )),
        Err(err) => Err(format!("cannot check {} after copying: {err}", output.destination)),
    }
}

async fn upload_multipart(
    space: &Space,
    output: &PlannedOutput,
    mut file: tokio::fs::File,
    path: &object_store::path::Path,
    sha256: &mut Sha256,
) -> Result<(), String> {
    let upload = space
        .store
        .put_multipart(path)
        .await
        .map_err(|err| format!("cannot start upload to {}: {err}", output.destination))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE_BYTES);
    let mut buffer = vec![0u8; 1 << 20];

    loop {
        let read = match file.read(&mut buffer).await {
            Ok(read) => read,
            Err(err) => {
                let _ = writer.abort().await;
                return Err(format!("cannot read {}: {err}", output.path.display()));
            }
        };
        if read == 0 {
            break;
        }
        sha256.update(&buffer[..read]);
        if let Err(err) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
            return Err(format!("upload to {} failed: {err}", output.destination));
        }
        writer.write(&buffer[..read]);
    }
    writer
        .finish()
        .await
        .map_err(|err| format!("cannot finish upload to {}: {err}", output.destination))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_memory_bounded_per_file() {
        assert_eq!(upload_memory_mib(0), 1);
        assert_eq!(upload_memory_mib(3 << 20), 3);
        assert_eq!(upload_memory_mib(SINGLE_PUT_MAX_BYTES), 16);
        assert_eq!(upload_memory_mib(10 << 30), 40);
    }
    use crate::spec::StageOut;

    #[test]
    fn plan_matches_globs_and_reports_missing() {
        let workdir = tempfile::tempdir().unwrap();
        for name in ["a.dat", "b.dat", "sub/c.dat", "out file.txt", ".jobwrap/exit-status", "slurm-5.out"] {
            let path = workdir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, name).unwrap();
        }
        let results = SpaceLocation::parse("results:runs/x/", "t").unwrap();
        let spec = JobSpec {
            cluster: None,
            script_name: "job.sh".into(),
            script_text: "#!/bin/bash\n".into(),
            script_args: vec![],
            sbatch_options: vec![],
            stage_in: vec![],
            stage_out: vec![
                StageOut::new("*.dat".into(), None).unwrap(),
                StageOut::new("out file.txt".into(), Some(SpaceLocation::parse("results:res dir/o.txt", "t").unwrap()))
                    .unwrap(),
                StageOut::new("*.frd".into(), None).unwrap(),
            ],
            output: Some(results),
            keep_workdir: false,
            stage_first: false,
        };
        let (planned, missing) = plan(&spec, workdir.path(), &[workdir.path().join("slurm-5.out")]);
        let targets: Vec<String> = planned.iter().map(|p| p.destination.to_string()).collect();
        assert_eq!(
            targets,
            vec!["results:runs/x/a.dat", "results:runs/x/b.dat", "results:res dir/o.txt", "results:runs/x/slurm-5.out"]
        );
        assert_eq!(missing, vec!["*.frd"]);
    }
}
