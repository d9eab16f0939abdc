//! Helpers for the kernel-mount tests: the Garage settings of the service stack, fresh
//! buckets, a mounted `datanet` process that is always unmounted on drop, and direct
//! object access that bypasses the mount.
//!
//! A test that needs Garage fails with the fix in its message when the stack's
//! variables are missing; it never skips.

#![allow(dead_code)]

pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use datanet::config::Config;
use datanet::store::Space;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};

pub const STACK_HINT: &str = "run scripts/stack.sh up and source $RUN/env.sh (scripts/test.sh does both)";

pub fn require_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: {STACK_HINT}"),
    }
}

/// The S3 settings of the running Garage.
#[derive(Debug, Clone)]
pub struct Garage {
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_file: PathBuf,
}

impl Garage {
    pub fn from_env() -> Garage {
        Garage {
            endpoint: require_env("DATANET_S3_ENDPOINT"),
            region: require_env("DATANET_S3_REGION"),
            access_key_id: require_env("DATANET_S3_ACCESS_KEY_ID"),
            secret_file: PathBuf::from(require_env("DATANET_S3_SECRET_FILE")),
        }
    }

    /// Creates a bucket named after `test` (unique per process and call).
    pub fn fresh_bucket(&self, test: &str) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let slug: String = test.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
        let name = format!("fst-{}-{}-{}", &slug[..slug.len().min(30)], std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/garage.sh");
        let output = Command::new("bash").arg(&script).args(["bucket", &name]).output().expect("run scripts/garage.sh");
        assert!(
            output.status.success(),
            "scripts/garage.sh bucket {name} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        name
    }

    /// Returns a `[spaces.NAME]` section for `bucket`, through `endpoint` (the proxy, or Garage
    /// itself when `None`).
    pub fn space_toml(&self, name: &str, bucket: &str, endpoint: Option<&str>) -> String {
        format!(
            "[spaces.{name}]\nurl = \"s3://{bucket}\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\n",
            endpoint.unwrap_or(&self.endpoint),
            self.region,
            self.access_key_id,
            self.secret_file.display()
        )
    }

    /// Direct access to `bucket`, bypassing the mount.
    pub fn bucket(&self, bucket: &str) -> Bucket {
        let text = self.space_toml("direct", bucket, None);
        let config = Config::parse(&text, Path::new("direct.toml")).expect("valid direct config");
        let space_config = config.spaces["direct"].clone();
        let space = datanet::open_space(&space_config).expect("open bucket");
        let markers = datanet::marker::MarkerClient::for_space(&space_config).expect("marker client").expect("s3 space");
        Bucket { space, markers }
    }
}

/// Object access to one bucket, for setting up and checking what the mount did.
pub struct Bucket {
    pub space: Space,
    pub markers: datanet::marker::MarkerClient,
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

impl Bucket {
    pub fn put(&self, key: &str, data: &[u8]) {
        let path = ObjectPath::parse(key).expect("valid key");
        runtime()
            .block_on(self.space.store.put(&path, PutPayload::from(data.to_vec())))
            .unwrap_or_else(|err| panic!("put {key}: {err}"));
    }

    /// Writes many small objects in parallel.
    pub fn put_many(&self, keys: Vec<String>) {
        let store = self.space.store.clone();
        runtime().block_on(async move {
            futures::stream::iter(keys)
                .map(|key| {
                    let store = store.clone();
                    async move {
                        let path = ObjectPath::parse(&key).expect("valid key");
                        store.put(&path, PutPayload::from_static(b"x")).await.unwrap_or_else(|err| panic!("put {key}: {err}"));
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<()>>()
                .await;
        });
    }

    /// Writes the zero-byte marker `dir/`.
    pub fn put_marker(&self, dir: &str) {
        runtime().block_on(self.markers.put_marker(dir)).unwrap_or_else(|err| panic!("marker {dir}/: {err}"));
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let path = ObjectPath::parse(key).expect("valid key");
        runtime().block_on(async {
            match self.space.store.get(&path).await {
                Ok(result) => Some(result.bytes().await.expect("body").to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(err) => panic!("get {key}: {err}"),
            }
        })
    }

    /// Returns every key below `prefix`, sorted. `object_store` shows a marker `d/` as `d`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let store = self.space.store.clone();
        let mut keys: Vec<String> = runtime().block_on(async move {
            let mut out = Vec::new();
            let mut items = store.list(None);
            while let Some(item) = items.next().await {
                out.push(item.expect("list").location.to_string());
            }
            out
        });
        keys.retain(|k| k.starts_with(prefix));
        keys.sort();
        keys
    }
}

/// A `datanet mount --foreground` process; dropping it unmounts and stops it.
pub struct Mounted {
    pub dir: tempfile::TempDir,
    pub mountpoint: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
}

pub fn datanet_bin() -> &'static str {
    env!("CARGO_BIN_EXE_datanet")
}

/// Returns the configuration text: `spaces` plus a `[cache]` in the test's directory,
/// with a metadata TTL of 1 s unless `cache_extra` sets one.
fn with_cache(spaces: &str, cache_dir: &Path, cache_extra: &str) -> String {
    let ttl = if cache_extra.contains("metadata_ttl") { "" } else { "metadata_ttl = \"1s\"\n" };
    format!("{spaces}\n[cache]\ndir = \"{}\"\n{ttl}{cache_extra}\n", cache_dir.display())
}

impl Mounted {
    /// Mounts `spaces` (TOML `[spaces.*]` sections; `{dir}` is replaced by the test's
    /// temporary directory) with `cache_extra` lines in `[cache]`.
    pub fn start(spaces: &str, cache_extra: &str) -> Mounted {
        Self::start_with_args(spaces, cache_extra, &[])
    }

    pub fn start_with_args(spaces: &str, cache_extra: &str, args: &[&str]) -> Mounted {
        let dir = tempfile::Builder::new().prefix("datanet-mount-").tempdir_in("/tmp").expect("temp dir");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("mkdir mountpoint");
        std::fs::create_dir(dir.path().join("local")).expect("mkdir local space");
        let spaces = spaces.replace("{dir}", &dir.path().display().to_string());
        let config_path = dir.path().join("datanet.toml");
        std::fs::write(&config_path, with_cache(&spaces, &dir.path().join("cache"), cache_extra)).expect("write config");
        let log_path = dir.path().join("datanet.log");
        let mut mounted = Mounted {
            dir,
            mountpoint,
            config_path,
            log_path,
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        mounted.mount();
        mounted
    }

    fn mount(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path).expect("log file");
        let child = Command::new(datanet_bin())
            .arg("mount")
            .arg("--foreground")
            .arg("--config")
            .arg(&self.config_path)
            .args(&self.extra_args)
            .arg(&self.mountpoint)
            .env("RUST_LOG", "datanet=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn datanet mount");
        self.child = Some(child);
        self.wait_mounted();
    }

    fn wait_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if is_mounted(&self.mountpoint) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("datanet mount exited with {status}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} was not mounted within 20 s; log:\n{}", self.mountpoint.display(), self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.mountpoint.join(relative)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Unmounts, drops the local caches and mounts again.
    pub fn remount(&mut self) {
        self.unmount();
        let _ = std::fs::remove_dir_all(self.dir.path().join("cache"));
        self.mount();
    }

    pub fn unmount(&mut self) {
        if is_mounted(&self.mountpoint) {
            let status = Command::new("fusermount3").arg("-u").arg(&self.mountpoint).status();
            if !matches!(status, Ok(s) if s.success()) {
                let _ = Command::new("fusermount3").arg("-uz").arg(&self.mountpoint).status();
            }
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.unmount();
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let wanted = path.display().to_string();
    mounts.lines().any(|line| line.split_whitespace().nth(1) == Some(wanted.as_str()))
}

/// Returns the errno of an I/O error, for assertions.
pub fn errno_of(err: &std::io::Error) -> i32 {
    err.raw_os_error().unwrap_or_else(|| panic!("not an OS error: {err}"))
}

/// Sorted names in a directory of the mount.
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("read_dir {}: {err}", dir.display()))
        .map(|entry| entry.expect("entry").file_name().into_string().expect("utf-8 name"))
        .collect();
    names.sort();
    names
}
