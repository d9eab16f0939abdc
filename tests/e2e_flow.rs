//! The CAE flow of `scripts/demo/flow.sh` as a test, on the running service stack:
//! CalculiX decks copied into a Garage bucket through the datanet mount, a gmsh job
//! and ccx jobs through `jobwrap sbatch`, every `.dat` compared with its reference,
//! a failing job whose logs reach the results, and an SMB lease from
//! samba-provisioner used with smbclient and revoked.
//!
//! Invariant: each run has its own flow name (so its own buckets and `$RUN/flows/NAME`)
//! and its own mountpoint in a temporary directory, never `/datanet`, and leaves
//! neither a mount nor a bucket behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use datanet_e2e::{binary, require_env, run, scripts_dir, unique_name, Stack};

/// Runs the flow with NAME at MOUNTPOINT, writing its command log to LOG.
fn run_flow(name: &str, mountpoint: &Path, log: &Path) -> Output {
    let bin_dir = binary("datanet")
        .parent()
        .expect("a binary lives in a directory")
        .to_path_buf();
    run(Command::new("bash")
        .arg(scripts_dir().join("demo/flow.sh"))
        .arg("--mountpoint")
        .arg(mountpoint)
        .args(["--name", name])
        .arg("--log")
        .arg(log)
        .env("DATANET_BIN_DIR", bin_dir))
}

fn report(output: &Output, log: &Path) -> String {
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    let log_tail: Vec<&str> = log_text.lines().rev().take(60).collect();
    format!(
        "exit status {}\n--- flow output ---\n{}\n--- last 60 lines of {} ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        log.display(),
        log_tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts is readable");
    let path = path.to_string_lossy();
    mounts.lines().any(|line| line.split(' ').nth(1) == Some(path.as_ref()))
}

fn bucket_exists(stack: &Stack, bucket: &str) -> bool {
    let output = run(Command::new(&stack.garage)
        .arg("-c")
        .arg(&stack.garage_config)
        .args(["bucket", "info", bucket]));
    output.status.success()
}

/// Returns the value column of summary row LABEL (`LABEL   value`).
fn summary_value<'a>(stderr: &'a str, label: &str) -> Option<&'a str> {
    stderr
        .lines()
        .find_map(|line| line.strip_prefix(label).map(str::trim))
}

#[test]
fn cae_flow_end_to_end() {
    let stack = Stack::from_env();
    require_env("DATANET_SAMBA_TOKEN_KEY_FILE");
    let temp = tempfile::tempdir().expect("create a temporary directory");
    let mountpoint = temp.path().join("datanet");
    let log = temp.path().join("flow.log");
    let name = unique_name("e2e");

    let output = run_flow(&name, &mountpoint, &log);
    let details = report(&output, &log);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert!(output.status.success(), "the flow failed: {details}");
    assert!(!stderr.contains("FAIL"), "a step failed: {details}");
    assert_eq!(
        summary_value(&stderr, "jobs run"),
        Some("6 (5 completed, 1 failed as intended)"),
        "{details}"
    );
    assert_eq!(
        summary_value(&stderr, "results verified"),
        Some("4/4 .dat files match their .dat.ref"),
        "{details}"
    );
    assert_eq!(
        summary_value(&stderr, "SMB share"),
        Some("1 downloaded, 1 uploaded, 1 rejected after revoke"),
        "{details}"
    );
    assert_eq!(summary_value(&stderr, "failed steps"), Some("0"), "{details}");
    let staged_in = summary_value(&stderr, "bytes staged in").unwrap_or_default();
    assert!(!staged_in.starts_with("0 "), "nothing was staged in: {details}");

    let log_text = std::fs::read_to_string(&log).expect("the flow wrote its log");
    assert!(
        !log_text.lines().any(|line| line.trim_start().starts_with("password")),
        "the log shows an SMB password line"
    );

    assert!(!is_mounted(&mountpoint), "{} is still mounted", mountpoint.display());
    assert!(!mountpoint.exists(), "the flow did not remove the mountpoint it created");
    let work: PathBuf = stack.run_dir.join("flows").join(&name);
    assert!(!work.exists(), "{} is left after the teardown", work.display());
    for bucket in [format!("datanet-{name}-models"), format!("datanet-{name}-results")] {
        assert!(!bucket_exists(&stack, &bucket), "bucket {bucket} is left after the teardown");
    }
}

#[test]
fn flow_rejects_taken_mountpoint() {
    let stack = Stack::from_env();
    let temp = tempfile::tempdir().expect("create a temporary directory");
    let mountpoint = temp.path().join("taken");
    std::fs::create_dir(&mountpoint).expect("create the mountpoint");
    std::fs::write(mountpoint.join("someone-elses-file"), b"keep me").expect("write a file");
    let log = temp.path().join("flow.log");
    let name = unique_name("e2e-taken");

    let output = run_flow(&name, &mountpoint, &log);
    let details = report(&output, &log);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(2), "{details}");
    assert!(stderr.contains("is taken"), "{details}");
    assert!(stderr.contains("--mountpoint PATH"), "{details}");
    assert_eq!(
        std::fs::read(mountpoint.join("someone-elses-file")).expect("the file is still there"),
        b"keep me"
    );
    assert!(!stack.run_dir.join("flows").join(&name).exists(), "the rejected flow left its directory");
}

#[test]
fn flow_rejects_invalid_name() {
    Stack::from_env();
    let temp = tempfile::tempdir().expect("create a temporary directory");
    let log = temp.path().join("flow.log");

    let output = run_flow("Bad_Name", &temp.path().join("mnt"), &log);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid --name \"Bad_Name\""), "{stderr}");
}
