//! `decode` and token-based revoke through the binary: good tokens give mount
//! instructions, altered, cut, expired or foreign tokens are rejected with a message
//! that names the problem and never repeats the token.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{all_output, TestEnv};

fn assert_rejected(env: &TestEnv, token: &str, expected: &str) {
    assert_rejected_with_any(env, token, &[expected]);
}

/// Checks that decode rejects `token` with a message containing one of `expected`.
fn assert_rejected_with_any(env: &TestEnv, token: &str, expected: &[&str]) {
    let output = env.run(&["decode"], Some(token));
    let text = all_output(&output);
    assert!(
        !output.status.success(),
        "decode accepted a bad token: {text}"
    );
    assert!(
        expected.iter().any(|e| text.contains(e)),
        "expected one of {expected:?} in: {text}"
    );
    if !token.trim().is_empty() {
        assert!(
            !text.contains(token.trim()),
            "the error repeats the token: {text}"
        );
    }
    assert!(!text.contains("password"), "{text}");
}

/// Replaces the character at `index` with a different base64url character.
fn alter(token: &str, index: usize) -> String {
    let mut bytes = token.as_bytes().to_vec();
    bytes[index] = if bytes[index] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

#[test]
fn decode_prints_instructions() {
    let env = TestEnv::new("decode");
    let dir = env.share_dir("d");
    let token = env.grant(&dir, "10m", &[]);

    let text = env.run_ok(&["decode"], Some(&token));
    assert!(text.contains("net use Z: \\\\127.0.0.1\\"), "{text}");
    assert!(text.contains("New-SmbMapping"), "{text}");
    assert!(text.contains("mount -t cifs //127.0.0.1/"), "{text}");
    assert!(text.contains("umask 077"), "{text}");

    let token_file = env.work_file("token.txt", &format!("{token}\n"));
    let from_file = env.run_ok(&["decode", token_file.to_str().unwrap()], None);
    assert_eq!(from_file, text);

    let config: toml::Table = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .parse()
        .unwrap();
    let stack_key = config["samba"]["token_key_file"]
        .as_str()
        .unwrap()
        .to_string();
    let key_file = env.work_file("node.key", &std::fs::read_to_string(stack_key).unwrap());
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_samba-provisioner"));
    command
        .args([
            "decode",
            "--format",
            "json",
            "--key-file",
            key_file.to_str().unwrap(),
        ])
        .env("DATANET_CONFIG", "/nonexistent/datanet.toml");
    let output = common::run_with_stdin(command, Some(&token));
    assert!(output.status.success(), "{}", all_output(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["port"], env.stack.port);
    assert_eq!(json["password"].as_str().unwrap().len(), 32);
}

#[test]
fn altered_tokens_rejected() {
    let env = TestEnv::new("tampered");
    let dir = env.share_dir("d");
    let token = env.grant(&dir, "10m", &[]);

    for index in [2, token.len() / 2, token.len() - 3] {
        assert_rejected(&env, &alter(&token, index), "failed authentication");
    }
    // One more character either breaks the base64 length or adds a byte to the tag.
    assert_rejected_with_any(
        &env,
        &format!("{token}x"),
        &["truncated", "failed authentication"],
    );
    let middle = token.len() / 2;
    assert_rejected(
        &env,
        &format!("{}*{}", &token[..middle], &token[middle + 1..]),
        "not base64url",
    );
    assert_rejected(&env, "", "empty");

    let output = env.run(&["revoke"], Some(&alter(&token, token.len() / 2)));
    assert!(!output.status.success(), "revoke accepted an altered token");
    assert_eq!(env.lease_ids().len(), 1);
}

#[test]
fn truncated_tokens_rejected() {
    let env = TestEnv::new("truncated");
    let dir = env.share_dir("d");
    let token = env.grant(&dir, "10m", &[]);

    for keep in [10, 40, token.len() / 2, token.len() - 1, token.len() - 2] {
        let cut = &token[..keep];
        let output = env.run(&["decode"], Some(cut));
        let text = all_output(&output);
        assert!(
            !output.status.success(),
            "decode accepted {keep} characters"
        );
        assert!(
            text.contains("truncated") || text.contains("failed authentication"),
            "{keep} characters: {text}"
        );
    }
}

#[test]
fn expired_token_rejected_but_revocable() {
    let env = TestEnv::new("expired");
    let dir = env.share_dir("d");
    let token = env.grant(&dir, "1s", &[]);
    std::thread::sleep(Duration::from_millis(2100));

    assert_rejected(&env, &token, "expired at");

    let revoked = env.run_ok(&["revoke"], Some(&token));
    assert!(revoked.contains("revoked lease"), "{revoked}");
    assert!(env.samba_objects().is_empty(), "{:?}", env.samba_objects());
}

#[test]
fn token_from_other_key_rejected() {
    let env = TestEnv::new("otherkey");
    let dir = env.share_dir("d");
    let token = env.grant(&dir, "10m", &[]);

    let key_file = env.work_file("other.key", &format!("{}\n", "ab".repeat(32)));
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let output = env.run(
        &["decode", "--key-file", key_file.to_str().unwrap()],
        Some(&token),
    );
    let text = all_output(&output);
    assert!(!output.status.success());
    assert!(text.contains("different key"), "{text}");

    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = env.run(
        &["decode", "--key-file", key_file.to_str().unwrap()],
        Some(&token),
    );
    assert!(
        all_output(&output).contains("chmod 600"),
        "{}",
        all_output(&output)
    );
}

#[test]
fn token_as_file_argument_not_echoed() {
    let env = TestEnv::new("argv");
    let dir = env.share_dir("d");
    let token = env.grant(&dir, "10m", &[]);

    let output = env.run(&["decode", &token], None);
    let text = all_output(&output);
    assert!(!output.status.success());
    assert!(text.contains("standard input"), "{text}");
    assert!(
        !text.contains(&token),
        "the error repeats the token: {text}"
    );
}

#[test]
fn padded_or_spaced_token_accepted() {
    let env = TestEnv::new("tolerant");
    let dir = env.share_dir("d");
    // The label changes the token's length: pick one that needs padding.
    let token = (1..=3)
        .map(|length| env.grant(&dir, "10m", &["--label", &"p".repeat(length)]))
        .find(|token| token.len() % 4 != 0)
        .expect("three consecutive label lengths all gave whole base64 quads");
    let plain = env.run_ok(&["decode"], Some(&token));

    let padding = "=".repeat(4 - token.len() % 4);
    let variants = [
        format!("{token}{padding}\n"),
        format!("  {token}\r\n\n\n"),
        format!("\n{token}{padding}\n  \n"),
    ];
    for variant in &variants {
        let decoded = env.run_ok(&["decode"], Some(variant));
        assert_eq!(decoded, plain, "{:?} decoded differently", variant.replace(&token, "TOKEN"));
    }

    // Padding where none belongs, and text inside or after the token, stay rejected.
    assert_rejected(&env, &format!("{token}{padding}===="), "not base64url");
    let middle = token.len() / 2;
    assert_rejected(&env, &format!("{} {}", &token[..middle], &token[middle..]), "not base64url");
    assert_rejected(&env, &format!("{token}\nextra"), "not base64url");
}

