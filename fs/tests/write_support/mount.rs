//! A real kernel mount of the `datanet` binary over one Garage bucket, for tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use datanet::{open_space, Space};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;

use super::{unique_bucket, Garage};

/// Name of the Garage space inside the mount: files are at `<mountpoint>/s/...`.
pub const SPACE: &str = "s";

/// Settings of one mount.
#[derive(Debug, Clone)]
pub struct MountSettings {
    /// Extra lines for the `[cache]` section (`dir` is set by the harness unless given).
    pub cache_toml: String,
    /// A cache directory to use instead of one in the test's temporary directory.
    pub cache_dir: Option<PathBuf>,
}

impl Default for MountSettings {
    fn default() -> Self {
        MountSettings { cache_toml: "metadata_ttl = \"1s\"\n".into(), cache_dir: None }
    }
}

/// A mounted filesystem; unmounted (and its daemon stopped) on drop.
pub struct Mounted {
    pub garage: Garage,
    pub bucket: String,
    pub root: tempfile::TempDir,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    runtime: tokio::runtime::Runtime,
    space: Space,
}

impl Mounted {
    /// Creates a bucket for `test` and mounts it.
    pub fn start(garage: &Garage, test: &str, settings: MountSettings) -> Mounted {
        let bucket = unique_bucket(test);
        garage.create_bucket(&bucket);

        let root = tempfile::Builder::new().prefix("datanet-write-").tempdir().unwrap();
        let mountpoint = root.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        let cache_dir = settings.cache_dir.clone().unwrap_or_else(|| root.path().join("cache"));
        let config_path = root.path().join("datanet.toml");
        let config = format!(
            "{}\n[cache]\ndir = \"{}\"\n{}",
            garage.space_toml(SPACE, &bucket),
            cache_dir.display(),
            settings.cache_toml
        );
        std::fs::write(&config_path, config).unwrap();

        let space_config = datanet::Config::load(&config_path).unwrap().spaces[SPACE].clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let space = open_space(&space_config).unwrap();

        let mut mounted = Mounted {
            garage: garage.clone(),
            bucket,
            log_path: root.path().join("datanet.log"),
            root,
            mountpoint,
            cache_dir,
            config_path,
            child: None,
            runtime,
            space,
        };
        mounted.mount();
        mounted
    }

    /// Returns the path of `relative` inside the Garage space of the mount.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.mountpoint.join(SPACE).join(relative)
    }

    pub fn mount(&mut self) {
        assert!(self.child.is_none(), "already mounted");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_datanet"))
            .args(["mount", "--foreground", "--config"])
            .arg(&self.config_path)
            .arg(&self.mountpoint)
            .env("RUST_LOG", "info,datanet=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start the datanet binary");
        self.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.is_mounted() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("datanet exited with {status} before mounting; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "mount did not appear in 30 s; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let target = self.mountpoint.to_string_lossy().to_string();
        mounts.lines().any(|line| line.split(' ').nth(4) == Some(target.as_str()))
    }

    /// Unmounts with `fusermount3 -u` and waits for the daemon to finish its uploads.
    pub fn unmount(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.is_mounted() {
            let status = Command::new("fusermount3").arg("-u").arg(&self.mountpoint).status().unwrap();
            if status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "cannot unmount {}", self.mountpoint.display());
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "datanet exited with {status}; log:\n{}", self.log());
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("datanet did not exit after unmount; log:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Unmounts, empties the cache directory except the write-back journal, and mounts
    /// again, so that reads come from the store.
    pub fn remount(&mut self) {
        self.unmount();
        if let Ok(items) = std::fs::read_dir(&self.cache_dir) {
            for item in items.flatten() {
                if item.file_name() == "journal" {
                    continue;
                }
                let path = item.path();
                let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            }
        }
        self.mount();
    }

    /// Kills the daemon with SIGKILL and detaches the dead mount.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("mounted");
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = Command::new("fusermount3").arg("-uz").arg(&self.mountpoint).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.is_mounted() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    // -- direct store access ----------------------------------------------------------

    /// Returns the object's content, read from Garage without the mount.
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        let path = ObjectPath::parse(key).unwrap();
        self.runtime.block_on(async {
            let result = self.space.store.get(&path).await.ok()?;
            Some(result.bytes().await.unwrap().to_vec())
        })
    }

    /// Writes an object directly into Garage, as another S3 tool would.
    pub fn put_object(&self, key: &str, content: &[u8]) {
        let path = ObjectPath::parse(key).unwrap();
        self.runtime
            .block_on(self.space.store.put(&path, content.to_vec().into()))
            .unwrap();
    }

    /// Returns every key of the bucket below `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let keys: Vec<String> = self.runtime.block_on(async {
            let listed: Vec<_> = self.space.store.list(None).try_collect().await.unwrap();
            listed.into_iter().map(|meta| meta.location.to_string()).collect()
        });
        let mut keys: Vec<String> = keys.into_iter().filter(|k| k.starts_with(prefix)).collect();
        keys.sort();
        keys
    }

    pub fn store_meta(&self, key: &str) -> datanet::posix_meta::PosixMeta {
        let path = ObjectPath::parse(key).unwrap();
        let target = datanet::posix_meta::MetaTarget::ObjectAttributes;
        self.runtime
            .block_on(datanet::posix_meta::read_meta(&self.space, &target, &path))
            .unwrap()
            .1
    }

    pub fn unfinished_uploads(&self) -> u64 {
        self.garage.unfinished_uploads(&self.bucket)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.is_mounted() {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.mountpoint).status();
            if self.is_mounted() {
                let _ = Command::new("fusermount3").arg("-uz").arg(&self.mountpoint).status();
            }
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `script` with bash in `dir` and returns its standard output; panics with both
/// outputs when it fails.
pub fn sh(dir: &Path, script: &str) -> String {
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "script failed ({}):\n{script}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Runs `script` and returns (exit code, stdout, stderr) without asserting success.
pub fn sh_status(dir: &Path, script: &str) -> (i32, String, String) {
    let output = Command::new("bash").arg("-c").arg(script).current_dir(dir).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

/// Fails with an install hint when a command-line tool that a test drives is missing.
pub fn require_tool(name: &str) {
    let found = Command::new("bash").arg("-c").arg(format!("command -v {name}")).output().unwrap().status.success();
    assert!(found, "{name} is not installed: run scripts/setup.sh (it installs the test tools)");
}
