//! Shared fixtures for the provisioner's tests against the stack's real smbd.
//!
//! Each [`TestEnv`] gets its own account prefix, state directory, allowed root and
//! configuration file derived from `$DATANET_CONFIG`, so tests run in parallel without
//! seeing each other's leases. Dropping it revokes what is left, runs gc, and removes
//! any account, passdb entry or share that still carries its prefix.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use samba_provisioner::secret::random_name;

/// Unix user and group that file I/O on test shares runs as. Not `nobody`: Samba maps
/// the guest account to the guest SID, and the parent directory's owner check fails.
pub const FORCE_USER: &str = "daemon";
pub const FORCE_GROUP: &str = "daemon";

const STACK_HINT: &str = "run scripts/stack.sh up and source $RUN/env.sh";

pub fn require_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: {STACK_HINT}"),
    }
}

/// The stack's Samba settings that the tests need.
#[derive(Debug, Clone)]
pub struct Stack {
    pub config: PathBuf,
    pub smb_conf: PathBuf,
    pub port: u16,
    pub run_dir: PathBuf,
}

impl Stack {
    pub fn from_env() -> Stack {
        let port = require_env("DATANET_SMB_PORT");
        Stack {
            config: require_env("DATANET_CONFIG").into(),
            smb_conf: require_env("DATANET_SMB_CONF").into(),
            port: port
                .parse()
                .unwrap_or_else(|_| panic!("DATANET_SMB_PORT={port} is not a port: {STACK_HINT}")),
            run_dir: require_env("DATANET_RUN_DIR").into(),
        }
    }
}

/// Credentials decoded from a token, as `decode --format json` prints them.
#[derive(Debug, Clone)]
pub struct Mount {
    pub lease_id: String,
    pub share: String,
    pub account: String,
    pub password: String,
    pub auth_file: PathBuf,
}

pub struct TestEnv {
    pub stack: Stack,
    pub prefix: String,
    /// Allowed root of this test; directories to share go below it.
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    pub api_token_file: PathBuf,
    work: PathBuf,
}

impl TestEnv {
    pub fn new(name: &str) -> TestEnv {
        Self::with_settings(name, &[])
    }

    /// Creates an environment; `settings` overrides `[samba]` keys (TOML values).
    pub fn with_settings(name: &str, settings: &[(&str, &str)]) -> TestEnv {
        let stack = Stack::from_env();
        let prefix = format!("t{}", random_name(5).unwrap());
        let work = stack
            .run_dir
            .join("samba-provisioner-tests")
            .join(format!("{name}-{prefix}"));
        let root = work.join("root");
        let state_dir = work.join("state");
        std::fs::create_dir_all(&root).unwrap();

        let api_token_file = work.join("api.token");
        std::fs::write(&api_token_file, format!("{}\n", random_name(40).unwrap())).unwrap();
        std::fs::set_permissions(&api_token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

        let config_path = work.join("datanet.toml");
        std::fs::write(
            &config_path,
            derived_config(
                &stack,
                &prefix,
                &root,
                &state_dir,
                &api_token_file,
                settings,
            ),
        )
        .unwrap();

        TestEnv {
            stack,
            prefix,
            root,
            state_dir,
            config_path,
            api_token_file,
            work,
        }
    }

    /// Creates a directory below the root, owned by the force user.
    pub fn share_dir(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        chown(&dir, FORCE_USER, FORCE_GROUP);
        dir
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_samba-provisioner"));
        command.arg("--config").arg(&self.config_path);
        command.env_remove("DATANET_SAMBA_FAILPOINT");
        command
    }

    /// Runs the binary with `args` and `stdin`, returning its output.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = self.command();
        command.args(args);
        run_with_stdin(command, stdin)
    }

    /// Runs the binary and panics with its stderr unless it succeeds.
    pub fn run_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let output = self.run(args, stdin);
        assert!(
            output.status.success(),
            "samba-provisioner {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Grants a lease on `dir` and returns its token.
    pub fn grant(&self, dir: &Path, ttl: &str, extra: &[&str]) -> String {
        let mut args = vec!["grant", "--path", dir.to_str().unwrap(), "--ttl", ttl];
        args.extend_from_slice(extra);
        self.run_ok(&args, None).trim().to_string()
    }

    /// Decodes a token through the binary and writes an smbclient authentication file.
    pub fn mount(&self, token: &str) -> Mount {
        let json = self.run_ok(&["decode", "--format", "json"], Some(token));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let field = |name: &str| {
            value[name]
                .as_str()
                .unwrap_or_else(|| panic!("no {name} in {json}"))
                .to_string()
        };
        let account = field("account");
        let password = field("password");
        let auth_file = self.work.join(format!("{account}.auth"));
        std::fs::write(
            &auth_file,
            format!("username={account}\npassword={password}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&auth_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        Mount {
            lease_id: field("lease_id"),
            share: field("share"),
            account,
            password,
            auth_file,
        }
    }

    /// Runs smbclient commands on `share` with the credentials of `mount`.
    pub fn smbclient(&self, share: &str, mount: &Mount, commands: &str) -> Output {
        let mut command = self.smbclient_command(share, &mount.auth_file);
        command.arg("-c").arg(commands);
        command.output().expect("smbclient runs")
    }

    pub fn smbclient_command(&self, share: &str, auth_file: &Path) -> Command {
        let mut command = Command::new("smbclient");
        command
            .arg("-s")
            .arg(&self.stack.smb_conf)
            .arg(format!("//127.0.0.1/{share}"))
            .arg("-p")
            .arg(self.stack.port.to_string())
            .args(["-m", "SMB3", "--client-protection=encrypt"])
            .arg("-A")
            .arg(auth_file)
            .env("LC_ALL", "C");
        command
    }

    /// Returns a path in this test's private work directory.
    pub fn work_path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// Writes a file in this test's private work directory and returns its path.
    pub fn work_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.work.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Lists the account, passdb entry and share names that carry this test's prefix.
    pub fn samba_objects(&self) -> Vec<String> {
        samba_objects(&self.stack.smb_conf, &self.prefix)
    }

    pub fn lease_ids(&self) -> Vec<String> {
        let json = self.run_ok(&["list", "--json"], None);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|lease| lease["id"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Ok(output) = self.command().args(["list", "--json"]).output() {
            if let Ok(serde_json::Value::Array(leases)) = serde_json::from_slice(&output.stdout) {
                for lease in leases {
                    if let Some(id) = lease["id"].as_str() {
                        let _ = self.command().args(["revoke", id]).output();
                    }
                }
            }
        }
        let _ = self.command().arg("gc").output();

        // Safety net: remove by name whatever gc left behind.
        let conf = self.stack.smb_conf.to_str().unwrap().to_string();
        let mut names: Vec<String> = samba_objects(&self.stack.smb_conf, &self.prefix)
            .iter()
            .filter_map(|object| object.split_once(' ').map(|(_, name)| name.to_string()))
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            let _ = Command::new("net")
                .args(["conf", "delshare", "-s", &conf, &name])
                .output();
            let _ = Command::new("smbcontrol")
                .args(["-s", &conf, "smbd", "close-share", &name])
                .output();
            let _ = Command::new("pdbedit")
                .args(["-s", &conf, "-x", "-u", &name])
                .output();
            let _ = Command::new("userdel").arg(&name).output();
        }
        if !std::thread::panicking() {
            let left = samba_objects(&self.stack.smb_conf, &self.prefix);
            assert!(
                left.is_empty(),
                "cleanup left Samba objects behind: {left:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn derived_config(
    stack: &Stack,
    prefix: &str,
    root: &Path,
    state_dir: &Path,
    api_token_file: &Path,
    settings: &[(&str, &str)],
) -> String {
    let text = std::fs::read_to_string(&stack.config).unwrap_or_else(|err| {
        panic!(
            "cannot read {}: {err}; {STACK_HINT}",
            stack.config.display()
        )
    });
    let config: toml::Table = text.parse().unwrap();
    let mut samba = config
        .get("samba")
        .and_then(|s| s.as_table())
        .unwrap_or_else(|| {
            panic!(
                "{} has no [samba] section; {STACK_HINT}",
                stack.config.display()
            )
        })
        .clone();

    let string = |s: &str| toml::Value::String(s.to_string());
    samba.insert("account_prefix".into(), string(prefix));
    samba.insert("state_dir".into(), string(state_dir.to_str().unwrap()));
    samba.insert(
        "allowed_roots".into(),
        toml::Value::Array(vec![string(root.to_str().unwrap())]),
    );
    samba.insert("force_user".into(), string(FORCE_USER));
    samba.insert("force_group".into(), string(FORCE_GROUP));
    samba.insert(
        "api_token_file".into(),
        string(api_token_file.to_str().unwrap()),
    );
    for (key, value) in settings {
        let parsed: toml::Table = format!("v = {value}").parse().unwrap();
        samba.insert(key.to_string(), parsed["v"].clone());
    }

    let mut out = toml::Table::new();
    out.insert("samba".into(), toml::Value::Table(samba));
    toml::to_string(&out).unwrap()
}

/// Lists account, passdb and share names starting with `prefix`.
pub fn samba_objects(smb_conf: &Path, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    for line in passwd.lines() {
        let name = line.split(':').next().unwrap_or_default();
        if name.starts_with(prefix) {
            found.push(format!("account {name}"));
        }
    }
    let conf = smb_conf.to_str().unwrap();
    let users = Command::new("pdbedit")
        .args(["-s", conf, "-L"])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&users.stdout).lines() {
        let name = line.split(':').next().unwrap_or_default();
        if name.starts_with(prefix) {
            found.push(format!("passdb {name}"));
        }
    }
    let shares = Command::new("net")
        .args(["conf", "listshares", "-s", conf])
        .output()
        .unwrap();
    for name in String::from_utf8_lossy(&shares.stdout).lines() {
        if name.trim().starts_with(prefix) {
            found.push(format!("share {}", name.trim()));
        }
    }
    found
}

pub fn run_with_stdin(mut command: Command, stdin: Option<&str>) -> Output {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("command starts");
    {
        let mut pipe = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            // A command that rejects its arguments exits before reading its input.
            match pipe.write_all(text.as_bytes()) {
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other.unwrap(),
            }
        }
    }
    child.wait_with_output().unwrap()
}

pub fn chown(path: &Path, user: &str, group: &str) {
    let status = Command::new("chown")
        .arg(format!("{user}:{group}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "chown {user}:{group} {}", path.display());
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn all_output(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// An smbclient session kept open, fed commands through a pipe.
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Session {
    pub fn open(command: Command) -> Session {
        // smbclient buffers its output when it is not a terminal; stdbuf makes it
        // line-buffered so each command's answer arrives at once.
        let mut wrapped = Command::new("stdbuf");
        wrapped
            .args(["-oL", "-eL"])
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        let mut child = wrapped
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("smbclient starts");
        let stdin = child.stdin.take().unwrap();
        let (sender, lines) = channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Session {
            child,
            stdin,
            lines,
        }
    }

    /// Sends one command line; a closed pipe (smbclient exited) is not an error here.
    pub fn send(&mut self, line: &str) {
        let _ = writeln!(self.stdin, "{line}");
        let _ = self.stdin.flush();
    }

    /// Waits until a line contains one of `needles`, returning all lines read so far.
    pub fn wait_for(&mut self, needles: &[&str], timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                    if needles.iter().any(|n| line.contains(n)) {
                        return Ok(seen);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("smbclient exited; output:\n{seen}"));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "none of {needles:?} within {timeout:?}; output:\n{seen}"
                    ));
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
