//! Helpers shared by the end-to-end tests: the settings of the service stack that
//! `scripts/stack.sh up` started, the built binaries, unique names and buckets.
//!
//! Invariant: a test that needs a service reads its settings from the environment
//! that `stack.sh up` writes (`source $RUN/env.sh`). When a setting is missing, the
//! test fails with a message that explains how to start the stack, so it never skips or
//! passes silently.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use datanet::config::{Config, SpaceConfig, SpaceLocation};

/// The fix printed by every failure caused by a missing stack setting.
pub const STACK_HINT: &str =
    "run scripts/stack.sh up --two-clusters and source $RUN/env.sh (scripts/test.sh does both)";

/// Reads a variable exported by `$RUN/env.sh`, panicking with [`STACK_HINT`] if it is
/// unset or empty.
pub fn require_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: {STACK_HINT}"),
    }
}

/// The settings of the running service stack, from the environment of `$RUN/env.sh`.
#[derive(Debug, Clone)]
pub struct Stack {
    pub run_dir: PathBuf,
    /// `datanet.toml` with spaces `models`, `results`, `scratchspace`, cluster `a`
    /// (and `b`) and `[samba]`.
    pub config_path: PathBuf,
    pub s3_endpoint: String,
    pub s3_region: String,
    pub s3_access_key_id: String,
    /// 0600 file holding the secret key; read it only to hand it to a client.
    pub s3_secret_file: PathBuf,
    pub slurm_conf: PathBuf,
    /// Only set when the stack runs with `--two-clusters`.
    pub slurm_conf_b: Option<PathBuf>,
    pub scratch_root: PathBuf,
    pub smb_conf: PathBuf,
    pub smb_port: u16,
    /// Guest share for smoke tests, backed by `$RUN/shares/smoke`.
    pub smb_smoke_share: String,
    pub shares_dir: PathBuf,
    pub garage: PathBuf,
    pub garage_config: PathBuf,
}

impl Stack {
    /// Loads the stack's settings; panics naming the first missing variable.
    pub fn from_env() -> Stack {
        let path = |name: &str| PathBuf::from(require_env(name));
        let smb_port = require_env("DATANET_SMB_PORT");
        Stack {
            run_dir: path("DATANET_RUN_DIR"),
            config_path: path("DATANET_CONFIG"),
            s3_endpoint: require_env("DATANET_S3_ENDPOINT"),
            s3_region: require_env("DATANET_S3_REGION"),
            s3_access_key_id: require_env("DATANET_S3_ACCESS_KEY_ID"),
            s3_secret_file: path("DATANET_S3_SECRET_FILE"),
            slurm_conf: path("DATANET_SLURM_CONF"),
            slurm_conf_b: std::env::var_os("DATANET_SLURM_CONF_B")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            scratch_root: path("DATANET_SCRATCH_ROOT"),
            smb_conf: path("DATANET_SMB_CONF"),
            smb_port: smb_port
                .parse()
                .unwrap_or_else(|_| panic!("DATANET_SMB_PORT={smb_port:?} is not a port number: {STACK_HINT}")),
            smb_smoke_share: require_env("DATANET_SMB_SMOKE_SHARE"),
            shares_dir: path("DATANET_SHARES_DIR"),
            garage: path("DATANET_GARAGE"),
            garage_config: path("DATANET_GARAGE_CONFIG"),
        }
    }

    /// Returns the second cluster's `slurm.conf`. Panics if the stack runs one cluster
    /// only.
    pub fn require_slurm_conf_b(&self) -> &Path {
        self.slurm_conf_b
            .as_deref()
            .unwrap_or_else(|| panic!("DATANET_SLURM_CONF_B is not set: {STACK_HINT}"))
    }

    /// Loads and validates the stack's `datanet.toml`.
    pub fn config(&self) -> Config {
        Config::load(&self.config_path)
            .unwrap_or_else(|err| panic!("the stack's configuration is invalid: {err}"))
    }

    /// Returns a space configuration for `bucket` on the stack's Garage with the stack's
    /// key. It is the `models` space of the configuration, moved to another bucket.
    pub fn bucket_space(&self, name: &str, bucket: &str) -> SpaceConfig {
        let config = self.config();
        let mut space = config
            .space("models")
            .unwrap_or_else(|err| panic!("{err}"))
            .clone();
        space.name = name.to_string();
        space.url = format!("s3://{bucket}");
        space.location = SpaceLocation::S3 {
            bucket: bucket.to_string(),
            prefix: String::new(),
        };
        space
    }

    /// Creates a new bucket (named after `prefix`, unique per call) on the stack's
    /// Garage and grants it to the stack's key. Returns the bucket name.
    pub fn unique_bucket(&self, prefix: &str) -> String {
        let bucket = unique_name(prefix);
        let output = run(Command::new("bash")
            .arg(scripts_dir().join("garage.sh"))
            .args(["bucket", &bucket])
            .env("DATANET_RUN_DIR", &self.run_dir)
            .env("DATANET_GARAGE", &self.garage));
        assert_success(&output, &format!("scripts/garage.sh bucket {bucket}"));
        bucket
    }

    /// Returns a `Command` for a Slurm client (`sbatch`, `squeue`...) of cluster `a`.
    pub fn slurm(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", &self.slurm_conf);
        command
    }
}

/// Returns the repository root (the root package's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn scripts_dir() -> PathBuf {
    repo_root().join("scripts")
}

/// Returns the path of a binary built by this workspace (`datanet`, `jobwrap`,
/// `samba-provisioner`), next to the running test in the same target directory and
/// profile. Panics if it was not built: `cargo test --workspace` builds it, and so does
/// `cargo build --workspace`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "binary {} is missing: build it with `cargo build --workspace` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Returns a name no other test run uses: `prefix`, the process id, a counter and the
/// time. It is lowercase and at most 63 bytes, so it is also a valid bucket or directory
/// name.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut name = format!(
        "{}-{}-{count}-{nanos:x}",
        prefix.to_ascii_lowercase(),
        std::process::id()
    );
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// Runs a command to completion, capturing its output; panics if it cannot start.
pub fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"))
}

/// Panics with the command's output unless it exited with status 0.
pub fn assert_success(output: &Output, description: &str) {
    assert!(
        output.status.success(),
        "{description} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
