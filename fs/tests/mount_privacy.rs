//! What a real kernel mount over Garage leaves outside the mount: the modes of the
//! cache directory, and the filesystem type and source other tools see in the mount
//! table. Needs the service stack (`scripts/stack.sh up`).

mod write_support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use write_support::mount::{Mounted, MountSettings};
use write_support::stack_garage;

/// Returns every path below `dir` (not following symbolic links), `dir` included.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![dir.to_path_buf()];
    let mut index = 0;
    while index < found.len() {
        let path = found[index].clone();
        index += 1;
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                found.push(entry.unwrap().path());
            }
        }
    }
    found
}

#[test]
fn cache_dir_private_to_owner() {
    let cache_dir = tempfile::Builder::new().prefix("datanet-private-").tempdir().unwrap();
    let cache = cache_dir.path().join("cache");
    // A staging directory left open by an older version becomes private at mount.
    std::fs::create_dir_all(cache.join("staging")).unwrap();
    std::fs::set_permissions(cache.join("staging"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let settings = MountSettings {
        cache_toml: "metadata_ttl = \"1s\"\nwrite_back_delay = \"30s\"\n".into(),
        cache_dir: Some(cache.clone()),
    };
    let m = Mounted::start(&stack_garage(), "private", settings);

    // Journal: a closed file waits for its upload.
    std::fs::write(m.path("secret.txt"), b"private content\n").unwrap();
    std::fs::set_permissions(m.path("secret.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // Staging: a file still open for writing.
    let mut open = std::fs::File::create(m.path("open.txt")).unwrap();
    open.write_all(b"being written\n").unwrap();
    open.flush().unwrap();
    // Data cache: a read of an object from the store.
    m.put_object("stored.bin", &vec![7u8; 3 << 20]);
    assert_eq!(std::fs::read(m.path("stored.bin")).unwrap().len(), 3 << 20);

    let paths = walk(&cache);
    let names: Vec<String> = paths.iter().map(|p| p.strip_prefix(&cache).unwrap().display().to_string()).collect();
    assert!(names.iter().any(|n| n.starts_with("journal/") && n.ends_with(".data")), "no journal data in {names:?}");
    assert!(names.iter().any(|n| n.starts_with("staging/") && n.len() > "staging/".len()), "no staging file in {names:?}");
    assert!(names.iter().any(|n| n.starts_with("data-") && n.contains('/')), "no cached block in {names:?}");
    // cache.dir itself was created by this test; datanet keeps the mode of an existing one.
    for path in &paths[1..] {
        let meta = std::fs::symlink_metadata(path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode & 0o077, 0, "directory {} has mode {mode:o}", path.display());
        } else {
            assert_eq!(mode & 0o077, 0, "file {} has mode {mode:o}", path.display());
        }
    }
    drop(open);
}

#[test]
fn mount_table_shows_fuse_datanet() {
    let m = Mounted::start(&stack_garage(), "mounttype", MountSettings::default());

    // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let target = m.mountpoint.to_string_lossy().to_string();
    let line = mountinfo
        .lines()
        .find(|line| line.split(' ').nth(4) == Some(target.as_str()))
        .unwrap_or_else(|| panic!("{target} not in /proc/self/mountinfo"));
    let (_, tail) = line.split_once(" - ").unwrap();
    let fields: Vec<&str> = tail.split(' ').collect();
    assert_eq!(fields[0], "fuse.datanet", "filesystem type in {line:?}");
    assert_eq!(fields[1], "datanet", "source in {line:?}");

    let listed = std::process::Command::new("findmnt").args(["-n", "-t", "fuse.datanet", "-o", "TARGET"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.lines().any(|l| l.trim() == target), "findmnt -t fuse.datanet did not list {target}: {listed:?}");
}

#[test]
fn second_mount_same_cache_dir_rejected() {
    let m = Mounted::start(&stack_garage(), "samecache", MountSettings::default());
    let second = m.root.path().join("second");
    std::fs::create_dir(&second).unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_datanet"))
        .args(["mount", "--foreground", "--config"])
        .arg(&m.config_path)
        .arg(&second)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "second mount succeeded: {stderr}");
    assert!(stderr.contains("give each mount its own cache.dir"), "{stderr}");
    assert!(!stderr.contains("(EIO)"), "errno in a startup message: {stderr}");
}
