//! Object keys with special characters and directory markers, against the real Garage
//! and Slurm of scripts/stack.sh.
//!
//! Keys must reach the working directory and come back byte for byte, exactly as the
//! datanet mount stores them (no percent-encoding), and zero-byte `dir/` markers must
//! become directories, never files.

mod support;

use support::{stderr, text, Harness};

/// Names that `object_store` would percent-encode or reject if a key were built with
/// `Path::from`.
const S3_NAMES: &[&str] = &["hash#1.txt", "pct%20.txt", "p%41.txt", "a b+c.txt", "q\"uo'te*.txt", "ünï cödé.txt", "r#1.txt", "run#12"];

/// The same on a file:// space, plus characters that are special to URLs and shells.
const LOCAL_NAMES: &[&str] = &[
    "hash#1.txt",
    "pct%20.txt",
    "p%41.txt",
    "a b+c.txt",
    "q\"uo'te*.txt",
    "ünï cödé.txt",
    "what?.txt",
    "back\\slash.txt",
    "lt<pipe|.txt",
    "run#12",
];

/// Writes and reads keys of one space the way the datanet mount stores them.
trait KeyAccess {
    fn put(&self, key: &str, bytes: &[u8]);
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    /// Every key below `dir`, recursively.
    fn list(&self, dir: &str) -> Vec<String>;
}

/// Objects of the S3 space `models`.
struct S3Keys<'a>(&'a Harness);

impl KeyAccess for S3Keys<'_> {
    fn put(&self, key: &str, bytes: &[u8]) {
        self.0.put("models", key, bytes)
    }
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.0.get("models", key)
    }
    fn list(&self, dir: &str) -> Vec<String> {
        self.0.list("models", dir)
    }
}

/// Plain files below the root of a file:// space.
struct FileKeys(std::path::PathBuf);

impl KeyAccess for FileKeys {
    fn put(&self, key: &str, bytes: &[u8]) {
        let path = self.0.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.0.join(key)).ok()
    }
    fn list(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.0.join(dir))
            .unwrap()
            .map(|entry| format!("{dir}/{}", entry.unwrap().file_name().to_string_lossy()))
            .collect();
        names.sort();
        names
    }
}

/// Stages `names` in from `space:in/` (one object on its own, the rest as a prefix),
/// copies every staged file to `out/` in the job and stages `out/*` out to
/// `space:outh/`; returns the harness after checking every key.
fn round_trip(h: &Harness, space: &str, names: &[&str], store: &dyn KeyAccess) {
    for name in names {
        store.put(&format!("in/{name}"), format!("content of {name}\n").as_bytes());
    }
    let single = format!("{space}:in/{}", names[0]);
    let prefix = format!("{space}:in/");
    let outputs = format!("{space}:outh/");
    let script = h.write_script(
        "run.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-in '{single}' --to f.txt\n\
             mkdir out\ncp f.txt out/single.txt\ncp dir/* out/\n",
            h.name
        ),
    );
    let output = h.run(&[
        "sbatch",
        "--stage-in",
        &prefix,
        "--to",
        "dir/",
        "--stage-out",
        "out/*",
        "--to",
        &outputs,
        script.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));

    assert_eq!(text(store.get("outh/out/single.txt")), format!("content of {}\n", names[0]));
    for name in names {
        let key = format!("outh/out/{name}");
        assert_eq!(text(store.get(&key)), format!("content of {name}\n"), "key {key:?}");
    }
    let stored = store.list("outh/out");
    assert_eq!(stored.len(), names.len() + 1, "unexpected keys: {stored:?}");
}

#[test]
fn special_names_kept_on_s3_space() {
    let h = Harness::new("names-s3");
    round_trip(&h, "models", S3_NAMES, &S3Keys(&h));
}

#[test]
fn special_names_kept_on_file_space() {
    let h = Harness::new("names-file");
    let root = h.dir.path().join("local space");
    round_trip(&h, "scratchspace", LOCAL_NAMES, &FileKeys(root.clone()));
    for name in LOCAL_NAMES {
        assert!(root.join("outh/out").join(name).is_file(), "{name:?} is not stored under its own name");
    }
}

/// Directories of a file:// space, empty ones included, are staged in as directories.
#[test]
fn directories_kept_on_file_space() {
    let h = Harness::new("dirs-file");
    let root = h.dir.path().join("local space");
    std::fs::create_dir_all(root.join("tree/empty")).unwrap();
    std::fs::create_dir_all(root.join("tree/sub")).unwrap();
    std::fs::write(root.join("tree/sub/b#7"), "b\n").unwrap();
    let script = h.write_script(
        "run.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-in scratchspace:tree/ --to t/\n\
             #DATANET --stage-out report.txt --to scratchspace:dirs/\n\
             set -e\ntest -d t/empty\ncat 't/sub/b#7' > report.txt\n",
            h.name
        ),
    );
    let output = h.run(&["sbatch", script.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(root.join("dirs/report.txt")).unwrap(), "b\n");
}

#[test]
fn directory_markers_become_directories() {
    let h = Harness::new("markers");
    h.put_marker("models", "big");
    h.put_marker("models", "big/sub");
    h.put_marker("models", "big/empty");
    h.put_marker("models", "big/sub/deeper");
    h.put("models", "big/a.txt", b"a\n");
    h.put("models", "big/sub/b.txt", b"b\n");
    h.put("models", "big/zero.txt", b"");
    h.put_marker("models", "lonely");

    let script = h.write_script(
        "run.sh",
        &format!(
            "#!/bin/bash\n#SBATCH -J {}\n#DATANET --stage-in models:big/ --to big/\n\
             #DATANET --stage-in models:big --to again\n#DATANET --stage-in models:lonely/\n\
             #DATANET --stage-out report.txt --to results:markers/\n\
             set -e\nfor d in big big/sub big/empty big/sub/deeper again/sub lonely; do test -d \"$d\"; done\n\
             test -f big/zero.txt\ncat big/a.txt big/sub/b.txt again/a.txt > report.txt\n\
             find big again lonely | sort >> report.txt\n",
            h.name
        ),
    );
    let output = h.run(&["sbatch", script.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));

    let report = text(h.get("results", "markers/report.txt"));
    assert!(report.starts_with("a\nb\na\n"), "{report}");
    for path in ["big/empty\n", "big/sub/deeper\n", "again/sub/b.txt\n", "lonely\n"] {
        assert!(report.contains(path), "{path:?} missing from {report}");
    }
    let record = h.only_record();
    let directories = record["inputs"].as_array().unwrap().iter().filter(|f| f["directory"] == true).count();
    assert_eq!(directories, 9, "{record:#}");
}
