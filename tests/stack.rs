//! The service scripts themselves: every service comes up and goes down twice in a row
//! without error, and a port already taken is reported with its number and service.
//!
//! These tests never touch the stack that `scripts/test.sh` started: each one uses its
//! own run directory under /var/tmp and its own free loopback ports, and stops what it
//! started even when an assertion fails.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use datanet::Config;
use datanet_e2e::{assert_success, run, scripts_dir, unique_name};

const PORT_VARS: [&str; 8] = [
    "DATANET_S3_PORT",
    "DATANET_GARAGE_RPC_PORT",
    "DATANET_GARAGE_ADMIN_PORT",
    "DATANET_SLURMCTLD_PORT_A",
    "DATANET_SLURMD_PORT_A",
    "DATANET_SLURMCTLD_PORT_B",
    "DATANET_SLURMD_PORT_B",
    "DATANET_SMB_PORT",
];

/// A private stack: run directory and ports, stopped and removed on drop.
struct PrivateStack {
    run_dir: PathBuf,
    ports: Vec<(&'static str, u16)>,
}

impl PrivateStack {
    fn new(prefix: &str) -> PrivateStack {
        let run_dir = PathBuf::from("/var/tmp").join(unique_name(prefix));
        PrivateStack {
            run_dir,
            ports: PORT_VARS.iter().copied().zip(free_ports(PORT_VARS.len())).collect(),
        }
    }

    fn port(&self, var: &str) -> u16 {
        self.ports.iter().find(|(name, _)| *name == var).unwrap().1
    }

    /// Runs `scripts/SCRIPT ARGS` against this stack's run directory and ports only.
    fn script(&self, script: &str, args: &[&str]) -> Output {
        self.script_with(script, args, &[])
    }

    /// Like [`PrivateStack::script`], with extra environment variables set last.
    fn script_with(&self, script: &str, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
        let mut command = Command::new("bash");
        command.arg(scripts_dir().join(script)).args(args);
        command.env("DATANET_RUN_DIR", &self.run_dir);
        for (var, port) in &self.ports {
            command.env(var, port.to_string());
        }
        command.envs(extra_env.iter().copied());
        run(&mut command)
    }

    fn pid(&self, name: &str) -> u32 {
        let path = self.run_dir.join("pids").join(format!("{name}.pid"));
        let text = fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        text.trim().parse().unwrap()
    }
}

impl Drop for PrivateStack {
    fn drop(&mut self) {
        let output = self.script("stack.sh", &["down"]);
        if output.status.success() && processes_mentioning(&self.run_dir).is_empty() {
            let _ = fs::remove_dir_all(&self.run_dir);
        } else {
            eprintln!(
                "could not stop the stack in {}; left in place:\n{}",
                self.run_dir.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// Distinct loopback ports that were free a moment ago.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// PIDs of live processes whose command line contains `dir`.
fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Local addresses of the TCP listeners on `port`, as `ss` prints them.
fn listen_addresses(port: u16) -> Vec<String> {
    let output = run(Command::new("ss").args(["-Hltn", &format!("sport = :{port}")]));
    assert_success(&output, "ss -Hltn");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const DAEMONS: [&str; 7] = [
    "garage",
    "munged",
    "slurmctld-a",
    "slurmd-a",
    "slurmctld-b",
    "slurmd-b",
    "smbd",
];

#[test]
fn stack_comes_up_and_goes_down_twice() {
    let stack = PrivateStack::new("datanet-stacktest");

    let first = stack.script("stack.sh", &["up", "--two-clusters"]);
    assert_success(&first, "first stack.sh up --two-clusters");
    let pids: Vec<u32> = DAEMONS.iter().map(|name| stack.pid(name)).collect();

    let second = stack.script("stack.sh", &["up", "--two-clusters"]);
    assert_success(&second, "second stack.sh up --two-clusters");
    let pids_again: Vec<u32> = DAEMONS.iter().map(|name| stack.pid(name)).collect();
    assert_eq!(pids, pids_again, "a second up must keep the running services");

    let status = stack.script("stack.sh", &["status"]);
    assert_success(&status, "stack.sh status after up");

    for (var, port) in &stack.ports {
        let addresses = listen_addresses(*port);
        assert!(!addresses.is_empty(), "nothing listens on {var}={port}");
        for address in addresses {
            assert_eq!(address, format!("127.0.0.1:{port}"), "{var} must listen on loopback only");
        }
    }

    // The written configuration is valid and points at this stack's ports.
    let config = Config::load(&stack.run_dir.join("datanet.toml")).unwrap();
    let s3_port = stack.port("DATANET_S3_PORT");
    assert_eq!(
        config.spaces["models"].endpoint.as_deref(),
        Some(format!("http://127.0.0.1:{s3_port}").as_str())
    );
    assert_eq!(config.samba().unwrap().port, stack.port("DATANET_SMB_PORT"));
    assert!(config.clusters.contains_key("b"));
    let env = fs::read_to_string(stack.run_dir.join("env.sh")).unwrap();
    assert!(env.contains("DATANET_SLURM_CONF_B="), "{env}");
    let secret = fs::read_to_string(stack.run_dir.join("garage/secret_access_key")).unwrap();
    assert!(!env.contains(secret.trim()), "env.sh must not contain the secret key");
    for output in [&first, &second] {
        let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), stderr(output));
        assert!(!printed.contains(secret.trim()), "stack.sh up printed the secret key");
    }
    let mode = fs::metadata(stack.run_dir.join("garage/secret_access_key")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);

    assert_success(&stack.script("stack.sh", &["down"]), "first stack.sh down");
    assert_success(&stack.script("stack.sh", &["down"]), "second stack.sh down");
    let status = stack.script("stack.sh", &["status"]);
    assert!(!status.status.success(), "status must fail once the stack is down");
    let left = processes_mentioning(&stack.run_dir);
    assert!(left.is_empty(), "processes of the stopped stack remain: {left:?}");

    // Up again after down: the same run directory starts from its saved state.
    assert_success(&stack.script("stack.sh", &["up"]), "stack.sh up after down");
    assert_success(&stack.script("stack.sh", &["up"]), "second stack.sh up after down");
    assert_success(&stack.script("stack.sh", &["down"]), "final stack.sh down");
    assert_success(&stack.script("stack.sh", &["down"]), "second final stack.sh down");
}

#[test]
fn taken_port_is_named_with_its_service() {
    let stack = PrivateStack::new("datanet-porttest");

    let s3_port = stack.port("DATANET_S3_PORT");
    let squatter = TcpListener::bind(("127.0.0.1", s3_port)).unwrap();
    let output = stack.script("stack.sh", &["up"]);
    assert!(!output.status.success(), "up must fail while port {s3_port} is taken");
    let message = stderr(&output);
    assert!(message.contains(&format!("port {s3_port}")), "{message}");
    assert!(message.contains("Garage S3 API"), "{message}");
    assert!(message.contains("DATANET_S3_PORT"), "{message}");
    drop(squatter);

    let smb_port = stack.port("DATANET_SMB_PORT");
    let _squatter = TcpListener::bind(("127.0.0.1", smb_port)).unwrap();
    let output = stack.script("samba.sh", &["start"]);
    assert!(!output.status.success(), "smbd must not start while port {smb_port} is taken");
    let message = stderr(&output);
    assert!(message.contains(&format!("port {smb_port}")), "{message}");
    assert!(message.contains("Samba smbd"), "{message}");

    // Nothing was started, so nothing of this run directory is left running.
    assert!(processes_mentioning(&stack.run_dir).is_empty());
}

#[test]
fn scripts_reject_bad_arguments() {
    let stack = PrivateStack::new("datanet-argtest");
    let cases: [(&str, &[&str], &str); 6] = [
        ("stack.sh", &["up", "--three-clusters"], "usage:"),
        ("stack.sh", &["restart"], "usage:"),
        ("slurm.sh", &["start", "--cluster", "c"], "unknown cluster \"c\""),
        ("slurm.sh", &["start", "--cluster"], "--cluster needs a value"),
        ("garage.sh", &["bucket", "Bad_Bucket"], "invalid bucket name \"Bad_Bucket\""),
        ("samba.sh", &["reload"], "usage:"),
    ];
    for (script, args, expected) in cases {
        let output = stack.script(script, args);
        assert!(!output.status.success(), "{script} {args:?} must fail");
        let message = stderr(&output);
        assert!(message.contains(expected), "{script} {args:?}: {message}");
    }

    let output = run(Command::new("bash")
        .arg(scripts_dir().join("stack.sh"))
        .arg("status")
        .env("DATANET_RUN_DIR", "relative/run"));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("DATANET_RUN_DIR=relative/run is not an absolute path"), "{}", stderr(&output));

    let output = stack.script_with("stack.sh", &["up"], &[("DATANET_SMB_PORT", "70000")]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("DATANET_SMB_PORT=70000 is not a TCP port number"), "{}", stderr(&output));
    assert!(processes_mentioning(&stack.run_dir).is_empty());
}

#[test]
fn setup_second_run_installs_nothing() {
    let output = run(Command::new("bash").arg(scripts_dir().join("setup.sh")));
    assert_success(&output, "scripts/setup.sh");
    let message = stderr(&output);
    assert!(message.contains("Debian packages are installed"), "{message}");
    assert!(message.contains("Garage binary cached"), "{message}");
    assert!(!message.contains("installing"), "{message}");
    assert!(!message.contains("building Garage"), "{message}");
}
