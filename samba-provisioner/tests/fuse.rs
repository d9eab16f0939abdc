//! A lease on a directory inside a real datanet mount backed by Garage: files that a
//! node creates, renames and overwrites through Samba end up as exactly the expected
//! objects in the bucket.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;

use common::{all_output, require_env, TestEnv, FORCE_GROUP, FORCE_USER};

/// A `datanet mount --foreground` with `allow_other`, so smbd's session processes may
/// enter it; dropping it unmounts.
struct Mounted {
    mountpoint: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Mounted {
    fn start(config: &Path, mountpoint: &Path, log: &Path) -> Mounted {
        std::fs::create_dir_all(mountpoint).unwrap();
        let child = Command::new(datanet_binary())
            .args(["mount", "--foreground", "-o", "allow_other", "--config"])
            .arg(config)
            .arg("--log-file")
            .arg(log)
            .arg(mountpoint)
            .stdin(Stdio::null())
            .spawn()
            .expect("datanet mount starts");
        let mut mounted = Mounted {
            mountpoint: mountpoint.to_path_buf(),
            log: log.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(mountpoint) {
            if let Ok(Some(status)) = mounted.child.try_wait() {
                panic!(
                    "datanet mount exited with {status}; log:\n{}",
                    mounted.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "not mounted within 20 s; log:\n{}",
                mounted.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        mounted
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let unmounted = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mountpoint)
                .status();
            if !matches!(unmounted, Ok(status) if status.success()) {
                let _ = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(&self.mountpoint)
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Removes the test's work directory when dropped, after the mount is gone.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let wanted = path.display().to_string();
    mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(wanted.as_str()))
}

/// Returns the `datanet` binary of the same build, next to this test's `deps` directory.
fn datanet_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().and_then(Path::parent).unwrap().join("datanet");
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo build -p datanet`",
        binary.display()
    );
    binary
}

fn id_of(flag: &str, name: &str) -> String {
    let output = Command::new("id").args([flag, name]).output().unwrap();
    assert!(output.status.success(), "id {flag} {name}");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn create_bucket(name: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/garage.sh");
    let output = Command::new("bash")
        .arg(&script)
        .args(["bucket", name])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "scripts/garage.sh bucket {name}: {}",
        all_output(&output)
    );
}

fn space_toml(bucket: &str, cache_dir: &Path) -> String {
    format!(
        "[spaces.cae]\nurl = \"s3://{bucket}\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\n\
         secret_access_key_file = \"{}\"\nuid = {}\ngid = {}\n\n[cache]\ndir = \"{}\"\n",
        require_env("DATANET_S3_ENDPOINT"),
        require_env("DATANET_S3_REGION"),
        require_env("DATANET_S3_ACCESS_KEY_ID"),
        require_env("DATANET_S3_SECRET_FILE"),
        id_of("-u", FORCE_USER),
        id_of("-g", FORCE_GROUP),
        cache_dir.display()
    )
}

/// Lists the bucket's keys below `prefix`, directory markers excluded.
fn object_keys(config_text: &str, prefix: &str) -> Vec<String> {
    let config = datanet::Config::parse(config_text, Path::new("fuse-test.toml")).unwrap();
    let space = datanet::open_space(&config.spaces["cae"]).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut keys: Vec<String> = runtime.block_on(async {
        let mut listing = space.store.list(None);
        let mut keys = Vec::new();
        while let Some(meta) = listing.next().await {
            keys.push(meta.unwrap().location.to_string());
        }
        keys
    });
    keys.retain(|key| {
        key.starts_with(prefix) && !key.ends_with('/') && key != prefix.trim_end_matches('/')
    });
    keys.sort();
    keys
}

/// Polls until the bucket contains exactly `expected` below `prefix`.
fn wait_for_keys(config_text: &str, prefix: &str, expected: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let keys = object_keys(config_text, prefix);
        if keys == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "bucket keys {keys:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn rename_inside_garage_mount() {
    let stack_dir = PathBuf::from(require_env("DATANET_RUN_DIR")).join("samba-provisioner-tests");
    let bucket = format!(
        "sp-fuse-{}",
        samba_provisioner::secret::random_name(8).unwrap()
    );
    create_bucket(&bucket);
    let work = stack_dir.join(&bucket);
    let config_text = space_toml(&bucket, &work.join("cache"));
    std::fs::create_dir_all(&work).unwrap();
    // Dropped last: after the leases are revoked and the mount is gone.
    let _work_cleanup = RemoveOnDrop(work.clone());
    std::fs::write(work.join("datanet.toml"), &config_text).unwrap();

    // Declared before the environment, so leases are revoked before the unmount.
    let mounted = Mounted::start(
        &work.join("datanet.toml"),
        &work.join("mnt"),
        &work.join("datanet.log"),
    );
    let mountpoint = mounted.mountpoint.to_str().unwrap().to_string();
    let env = TestEnv::with_settings("fuse", &[("allowed_roots", &format!("[\"{mountpoint}\"]"))]);

    let dir = mounted.mountpoint.join("cae/session");
    std::fs::create_dir(&dir).unwrap();
    let mount = env.mount(&env.grant(&dir, "10m", &[]));
    let share = env.run_ok(&["list", "--json"], None);
    assert!(share.contains("cae/session"), "{share}");
    let conf = env.stack.smb_conf.to_str().unwrap();
    let section = Command::new("net")
        .args(["conf", "showshare", "-s", conf, &mount.share])
        .output()
        .unwrap();
    // Samba stores DOS attributes in user xattrs: the mount must take them, or the
    // share must not ask for them.
    let dos_attributes_off = common::stdout(&section).contains("store dos attributes = no");
    let xattrs = samba_provisioner::share::supports_user_xattrs(&dir);
    assert!(
        xattrs || dos_attributes_off,
        "no user xattrs and DOS attributes on: {}",
        common::stdout(&section)
    );
    assert_eq!(dos_attributes_off, !xattrs, "{}", common::stdout(&section));

    let source = env.work_file("n.txt", "hi\n");
    let source = source.display();
    let output = env.smbclient(
        &mount.share,
        &mount,
        &format!("put {source} \"New Text Document (7).txt\"; rename \"New Text Document (7).txt\" \"test.txt\"; ls"),
    );
    assert!(
        !all_output(&output).contains("NT_STATUS"),
        "{}\nmount log:\n{}",
        all_output(&output),
        mounted.log_text()
    );
    wait_for_keys(&config_text, "session/", &["session/test.txt"]);

    let output = env.smbclient(
        &mount.share,
        &mount,
        &format!("put {source} \"a b#c%d.txt\"; rename \"a b#c%d.txt\" \"e f.txt\"; put {source} test.txt; ls"),
    );
    assert!(
        !all_output(&output).contains("NT_STATUS"),
        "{}\nmount log:\n{}",
        all_output(&output),
        mounted.log_text()
    );
    wait_for_keys(
        &config_text,
        "session/",
        &["session/e f.txt", "session/test.txt"],
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("e f.txt")).unwrap(),
        "hi\n"
    );
}
