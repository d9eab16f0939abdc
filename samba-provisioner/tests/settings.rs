//! Settings and request values checked before anything is created: `force_user` and
//! `force_group` that do not exist, `allowed_roots` entries that are missing, and a
//! label over the maximum length, through the binary.

mod common;

use common::{all_output, TestEnv};

#[test]
fn missing_force_identity_rejected() {
    let cases = [
        ("force_user", "samba.force_user", "no such Unix user"),
        ("force_group", "samba.force_group", "no such Unix group"),
    ];
    for (key, full_key, expected) in cases {
        let env = TestEnv::with_settings("forceid", &[(key, "\"datanet-no-such-name\"")]);
        let output = env.run(&["list"], None);
        let text = all_output(&output);
        assert!(!output.status.success(), "{key}: list accepted a missing name: {text}");
        assert!(text.contains(full_key), "{key}: {text}");
        assert!(text.contains("\"datanet-no-such-name\""), "{key}: {text}");
        assert!(text.contains(expected), "{key}: {text}");
    }
}

#[test]
fn missing_allowed_root_rejected_by_grant() {
    let missing = "/var/tmp/datanet-no-such-root/models";
    let roots = format!("[\"{missing}\"]");
    let env = TestEnv::with_settings("roots", &[("allowed_roots", roots.as_str())]);
    let dir = env.share_dir("d");

    let output = env.run(&["grant", "--path", dir.to_str().unwrap(), "--ttl", "10m"], None);
    let text = all_output(&output);
    assert!(!output.status.success(), "grant accepted a missing root: {text}");
    assert!(text.contains("samba.allowed_roots entry"), "{text}");
    assert!(text.contains(missing), "{text}");
    assert!(env.samba_objects().is_empty(), "{:?}", env.samba_objects());

    // Revoke, list and gc keep working while a root is missing, with a warning.
    let output = env.run(&["list"], None);
    let text = all_output(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains(missing), "no warning about the missing root: {text}");
}

#[test]
fn long_label_rejected_without_echo() {
    let env = TestEnv::new("label");
    let dir = env.share_dir("d");
    let label = "L".repeat(100_000);

    let at_limit = "m".repeat(256);
    let token = env.grant(&dir, "10m", &["--label", &at_limit]);
    assert!(!token.is_empty());
    env.run_ok(&["revoke"], Some(&token));

    let output = env.run(&["grant", "--path", dir.to_str().unwrap(), "--ttl", "10m", "--label", &label], None);
    let text = all_output(&output);
    assert!(!output.status.success(), "a 100 KB label was accepted");
    assert!(text.contains("more than the maximum of 256"), "{}", &text[..text.len().min(500)]);
    assert!(text.len() < 1000, "the error repeats the label: {} bytes of output", text.len());
    assert!(env.lease_ids().is_empty());
}
