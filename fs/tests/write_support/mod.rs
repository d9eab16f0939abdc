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

    /// Counts the unfinished multipart uploads of `bucket` with a ListMultipartUploads
    /// request sent from this process. Unlike [`Garage::unfinished_uploads`] it starts no
    /// child process, so it can run while the test keeps a file of the mount open: a
    /// child closes its inherited copy of the descriptor, and every close is a FUSE flush.
    pub fn multipart_uploads(&self, bucket: &str) -> usize {
        use datanet::sigv4::{BucketAddress, SigningKey, EMPTY_SHA256};

        let space = self.space_config(bucket);
        let address = BucketAddress::for_space(&space).unwrap().expect("an S3 space");
        let key = SigningKey::read(&space.name, space.credentials.as_ref()).unwrap();
        let path = address.uri_path(None);
        let query = "uploads=";
        let method = reqwest::Method::GET;
        let headers = key.sign(&method, &address.host, &path, query, &[], EMPTY_SHA256, &space.region, std::time::SystemTime::now());

        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let body = runtime.block_on(async {
            let mut request = reqwest::Client::new().get(format!("{}{path}?{query}", address.origin));
            for (name, value) in headers {
                request = request.header(name, value);
            }
            let response = request.send().await.expect("ListMultipartUploads request");
            let status = response.status();
            let body = response.text().await.unwrap();
            assert!(status.is_success(), "ListMultipartUploads of {bucket}: {status}: {body}");
            body
        });
        body.matches("<UploadId>").count()
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
    /// S3, RPC and admin ports.
    ports: [u16; 3],
}

impl PrivateGarage {
    /// Starts a Garage of this test process: run directory `$DATANET_RUN_DIR-NAME-PID`
    /// and three free loopback ports, so that concurrent test runs never share one.
    pub fn start(name: &str) -> PrivateGarage {
        let stack = stack_garage();
        let run_dir = PathBuf::from(format!("{}-{name}-{}", stack.run_dir.display(), std::process::id()));
        let ports = free_ports();
        let private = PrivateGarage {
            garage: Garage {
                endpoint: format!("http://127.0.0.1:{}", ports[0]),
                region: "garage".into(),
                access_key_id: String::new(),
                secret_file: run_dir.join("garage/secret_access_key"),
                config: run_dir.join("garage/garage.toml"),
                binary: stack.binary,
                run_dir,
            },
            ports,
        };
        private.run("start");
        let key = std::fs::read_to_string(private.garage.run_dir.join("garage/access_key_id")).expect("key id");
        let mut private = private;
        private.garage.access_key_id = key.trim().to_string();
        private
    }

    /// Returns `bash` with this Garage's run directory and ports in its environment.
    fn script_command(&self) -> Command {
        let mut bash = Command::new("bash");
        bash.env("DATANET_RUN_DIR", &self.garage.run_dir)
            .env("DATANET_S3_PORT", self.ports[0].to_string())
            .env("DATANET_GARAGE_RPC_PORT", self.ports[1].to_string())
            .env("DATANET_GARAGE_ADMIN_PORT", self.ports[2].to_string());
        bash
    }

    fn run(&self, command: &str) {
        let output = self
            .script_command()
            .arg(scripts_dir().join("garage.sh"))
            .arg(command)
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
        self.ports[0]
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
        self.run("start");
    }

    /// Starts a child now that restarts Garage when [`PendingRestart::run`] is called.
    /// A test that keeps a file of a mount open uses it because every child forked
    /// while the file is open closes its inherited descriptor, and each close is a
    /// FUSE flush, which would upload the file.
    pub fn prepare_restart(&self) -> PendingRestart {
        let child = self
            .script_command()
            .arg("-c")
            .arg("read -r _ && exec bash \"$0\" start")
            .arg(scripts_dir().join("garage.sh"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cannot start bash");
        PendingRestart { child }
    }
}

impl Drop for PrivateGarage {
    fn drop(&mut self) {
        let stopped = Command::new("bash")
            .arg(scripts_dir().join("garage.sh"))
            .arg("stop")
            .env("DATANET_RUN_DIR", &self.garage.run_dir)
            .output()
            .is_ok_and(|output| output.status.success());
        if stopped {
            let _ = std::fs::remove_dir_all(&self.garage.run_dir);
        }
    }
}

/// A Garage restart waiting in a child process; see [`PrivateGarage::prepare_restart`].
pub struct PendingRestart {
    child: std::process::Child,
}

impl PendingRestart {
    /// Restarts Garage and waits until it is ready.
    pub fn run(mut self) {
        use std::io::Write;

        let mut stdin = self.child.stdin.take().expect("piped stdin");
        stdin.write_all(b"start\n").expect("cannot signal the restart");
        drop(stdin);
        let output = self.child.wait_with_output().expect("restart child");
        assert!(
            output.status.success(),
            "scripts/garage.sh start failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Three loopback ports that are free now (the kernel picks them).
fn free_ports() -> [u16; 3] {
    let listeners: Vec<std::net::TcpListener> =
        (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
    let port = |i: usize| listeners[i].local_addr().unwrap().port();
    [port(0), port(1), port(2)]
}

/// Deterministic test content.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (((i as u64 * 2_654_435_761) >> 7) as u8) ^ seed).collect()
}
