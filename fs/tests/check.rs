//! `datanet check` through the binary: an empty configuration, the wording for a space
//! that cannot be reached, credentials that Garage rejects, and an S3 space without
//! credentials. Needs the service stack (`scripts/stack.sh up`).

mod write_support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use write_support::{stack_garage, unique_bucket};

fn check(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_datanet")).arg("check").arg("--config").arg(config).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_string()
}

#[test]
fn empty_config_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("datanet.toml");
    std::fs::write(&config, "[cache]\nmax_size = \"1GiB\"\n").unwrap();

    let output = check(&config);
    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "an empty configuration passed: {stdout}");
    assert!(!stdout.contains("valid"), "{stdout}");
    assert!(stderr.contains("add a [spaces.NAME] section"), "{stderr}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
}

#[test]
fn unreachable_space_not_called_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("datanet.toml");
    std::fs::write(&config, format!("[spaces.gone]\nurl = \"file://{}/missing\"\n", dir.path().display())).unwrap();

    let output = check(&config);
    let stdout = text(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("gone")).unwrap_or_else(|| panic!("no line for the space: {stdout}"));
    assert!(line.contains("UNREACHABLE"), "{line}");
    assert!(line.contains("writing not tested"), "{line}");
    assert!(!line.contains("read-only"), "a writable space called read-only: {line}");
}

#[test]
fn rejected_credentials_named() {
    let garage = stack_garage();
    let bucket = unique_bucket("check-creds");
    garage.create_bucket(&bucket);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("wrong-secret");
    let wrong = "0000000000000000000000000000000000000000000000000000000000000000";
    std::fs::write(&secret, wrong).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.path().join("datanet.toml");
    let text_config = format!(
        "[spaces.bad]\nurl = \"s3://{bucket}\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\n",
        garage.endpoint,
        garage.region,
        garage.access_key_id,
        secret.display()
    );
    std::fs::write(&config, text_config).unwrap();

    let output = check(&config);
    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("the server rejected the credentials of space \"bad\""), "{stdout}");
    assert!(stdout.contains("spaces.bad.access_key_id"), "{stdout}");
    assert!(stdout.contains(&format!("spaces.bad.secret_access_key_file ({})", secret.display())), "{stdout}");
    assert!(!stdout.contains(wrong) && !stderr.contains(wrong), "the secret was printed");
}

#[test]
fn missing_credentials_warned() {
    let garage = stack_garage();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("datanet.toml");
    let text_config = format!(
        "[spaces.anon]\nurl = \"s3://{}\"\nendpoint = \"{}\"\nregion = \"{}\"\n",
        unique_bucket("check-anon"),
        garage.endpoint,
        garage.region
    );
    std::fs::write(&config, text_config).unwrap();

    // Without credentials object_store asks the instance metadata endpoint, which is no
    // loopback address: run in a new network namespace, where nothing leaves the host.
    let mut child = Command::new("unshare")
        .args(["--net", "--"])
        .arg(env!("CARGO_BIN_EXE_datanet"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.starts_with("warning:");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();

    let warning = lines.last().cloned().unwrap_or_default();
    assert!(warning.starts_with("warning:"), "no warning before the probes: {lines:?}");
    assert!(warning.contains("space \"anon\" has no credentials"), "{warning}");
    assert!(warning.contains("instance metadata endpoint"), "{warning}");
    assert!(warning.contains("spaces.anon.access_key_id"), "{warning}");
    assert!(warning.contains("spaces.anon.secret_access_key_file"), "{warning}");
}
