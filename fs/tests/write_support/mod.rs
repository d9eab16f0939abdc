//! Helpers for the write-path tests: the service stack's Garage, a bucket per test, a
//! private Garage that a test may stop, and the count of unfinished multipart uploads.

#![allow(dead_code)]

pub mod mount;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use datanet::{Config, SpaceConfig};

const STACK_HINT: &str = "run scripts/stack.sh up and source $RUN/env.sh";

/// The Garage of one run directory.
#[derive(Debug, Clone)]
pub struct Garage {
    pub run_dir: PathBuf,
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_file: PathBuf,
    pub binary: PathBuf,
    pub config: PathBuf,
}

fn env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: {STACK_HINT}"),
    }
}

pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

/// Returns the stack's Garage, from the variables of `$RUN/env.sh`.
pub fn stack_garage() -> Garage {
    Garage {
        run_dir: env("DATANET_RUN_DIR").into(),
        endpoint: env("DATANET_S3_ENDPOINT"),
        region: env("DATANET_S3_REGION"),
        access_key_id: env("DATANET_S3_ACCESS_KEY_ID"),
        secret_file: env("DATANET_S3_SECRET_FILE").into(),
        binary: env("DATANET_GARAGE").into(),
        config: env("DATANET_GARAGE_CONFIG").into(),
    }
}

/// Returns a unique bucket name for one test.
pub fn unique_bucket(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let clean: String = test
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(30)
        .collect();
    format!("fsw-{clean}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst))
}

impl Garage {
    fn script(&self, args: &[&str]) -> std::process::Output {
        let output = Command::new("bash")
            .arg(scripts_dir().join("garage.sh"))
            .args(args)
            .env("DATANET_RUN_DIR", &self.run_dir)
            .output()
            .expect("cannot run scripts/garage.sh");
        assert!(
            output.status.success(),
            "scripts/garage.sh {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Creates `name` and grants it to the stack's key.
    pub fn create_bucket(&self, name: &str) {
        self.script(&["bucket", name]);
    }

    /// Returns a space over `bucket`, written as configuration text so that it is validated
    /// like any other.
    pub fn space_config(&self, bucket: &str) -> SpaceConfig {
        let text = self.space_toml("t", bucket);
        Config::parse(&text, Path::new("test.toml")).expect("test configuration is valid").spaces["t"].clone()
    }

    pub fn space_toml(&self, name: &str, bucket: &str) -> String {
        format!(
            "[spaces.{name}]\nurl = \"s3://{bucket}\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\n",
            self.endpoint,
            self.region,
            self.access_key_id,
            self.secret_file.display()
        )
    }

    /// Unfinished multipart uploads of `bucket`, as `garage bucket info` reports them.
    pub fn unfinished_uploads(&self, bucket: &str) -> u64 {
        let output = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .args(["bucket", "info", bucket])
            .output()
            .expect("cannot run garage");
        assert!(output.status.success(), "garage bucket info: {}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines()
            .find_map(|line| line.strip_prefix("Unfinished uploads:"))
            .and_then(|rest| rest.split_whitespace().next())
            .map_or(0, |count| count.parse().expect("count of unfinished uploads"))
    }
}

/// A Garage of its own (run directory and ports), which a test may stop and start
/// without touching the stack's. Stopped on drop.
pub struct PrivateGarage {
    pub garage: Garage,
}

impl PrivateGarage {
    /// Starts (or reuses) the Garage `name`: run directory `$DATANET_RUN_DIR-NAME`, S3
    /// port `port_offset` above the stack's, so that stacks moved to other ports and run
    /// directories get their own private servers too.
    pub fn start(name: &str, port_offset: u16) -> PrivateGarage {
        let stack = stack_garage();
        let run_dir = PathBuf::from(format!("{}-{name}", stack.run_dir.display()));
        let stack_port: u16 = stack
            .endpoint
            .rsplit(':')
            .next()
            .and_then(|port| port.trim_end_matches('/').parse().ok())
            .unwrap_or_else(|| panic!("DATANET_S3_ENDPOINT {} has no port", stack.endpoint));
        let base_port = stack_port + port_offset;
        let private = PrivateGarage {
            garage: Garage {
                endpoint: format!("http://127.0.0.1:{base_port}"),
                region: "garage".into(),
                access_key_id: String::new(),
                secret_file: run_dir.join("garage/secret_access_key"),
                config: run_dir.join("garage/garage.toml"),
                binary: stack.binary,
                run_dir,
            },
        };
        private.run("start", base_port);
        let key = std::fs::read_to_string(private.garage.run_dir.join("garage/access_key_id")).expect("key id");
        let mut private = private;
        private.garage.access_key_id = key.trim().to_string();
        private
    }

    fn run(&self, command: &str, base_port: u16) {
        let output = Command::new("bash")
            .arg(scripts_dir().join("garage.sh"))
            .arg(command)
            .env("DATANET_RUN_DIR", &self.garage.run_dir)
            .env("DATANET_S3_PORT", base_port.to_string())
            .env("DATANET_GARAGE_RPC_PORT", (base_port + 1).to_string())
            .env("DATANET_GARAGE_ADMIN_PORT", (base_port + 3).to_string())
            .output()
            .expect("cannot run scripts/garage.sh");
        assert!(
            output.status.success(),
            "scripts/garage.sh {command} for {}: {}",
            self.garage.run_dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn port(&self) -> u16 {
        self.garage.endpoint.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Stops the server abruptly (SIGKILL), as a crash or a network cut would. A graceful
    /// stop keeps serving requests on open connections for a while.
    pub fn stop(&self) {
        let pid_file = self.garage.run_dir.join("pids/garage.pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", pid_file.display()))
            .trim()
            .parse()
            .expect("pid in the pid file");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let config = self.garage.config.to_string_lossy().to_string();
        assert!(
            String::from_utf8_lossy(&cmdline).contains(&config),
            "pid {pid} is not the private Garage of {config}"
        );
        // SAFETY: kill(2) on the pid of the Garage this test started, checked above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port())).is_ok() {
            assert!(std::time::Instant::now() < deadline, "Garage still answers after SIGKILL");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn restart(&self) {
        self.run("start", self.port());
    }
}

impl Drop for PrivateGarage {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(scripts_dir().join("garage.sh"))
            .arg("stop")
            .env("DATANET_RUN_DIR", &self.garage.run_dir)
            .output();
    }
}

/// Deterministic test content.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i as u64 * 2_654_435_761 >> 7) as u8) ^ seed).collect()
}
