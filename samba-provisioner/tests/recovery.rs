//! Durability and concurrency: a process killed between any two steps leaves nothing
//! behind once gc has run, orphans and half-missing leases are reconciled, and many
//! grants and revokes in parallel do not interfere.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use common::{all_output, TestEnv};

/// Failpoints in grant and revoke, in step order.
const GRANT_STEPS: &[&str] = &[
    "grant:intent",
    "grant:unix-account",
    "grant:passdb",
    "grant:expiry",
    "grant:share",
];
const REVOKE_STEPS: &[&str] = &[
    "revoke:intent",
    "revoke:share",
    "revoke:passdb",
    "revoke:unix-account",
];

/// The signal a failpoint kills the process with.
const SIGKILL: i32 = 9;

fn gc_report(env: &TestEnv) -> serde_json::Value {
    serde_json::from_str(&env.run_ok(&["gc", "--json"], None)).unwrap()
}

#[test]
fn kill_during_grant_leaves_no_orphan() {
    let env = TestEnv::new("crashgrant");
    let dir = env.share_dir("d");

    for step in GRANT_STEPS {
        let mut command = env.command();
        command
            .args(["grant", "--path", dir.to_str().unwrap(), "--ttl", "10m"])
            .env("DATANET_SAMBA_FAILPOINT", step);
        let output = command.output().unwrap();
        assert_eq!(
            output.status.signal(),
            Some(SIGKILL),
            "{step}: {}",
            all_output(&output)
        );
        assert!(
            output.stdout.is_empty(),
            "{step}: a token was printed before the grant finished"
        );
        assert_eq!(
            env.lease_ids().len(),
            1,
            "{step}: the intent record is missing"
        );

        let report = gc_report(&env);
        assert_eq!(
            report["rolled_back"].as_array().unwrap().len(),
            1,
            "{step}: {report}"
        );
        assert!(
            env.samba_objects().is_empty(),
            "{step}: left {:?}",
            env.samba_objects()
        );
        assert!(env.lease_ids().is_empty(), "{step}");
    }
}

#[test]
fn kill_during_revoke_is_finished_by_gc() {
    let env = TestEnv::new("crashrevoke");
    let dir = env.share_dir("d");

    for step in REVOKE_STEPS {
        let mount = env.mount(&env.grant(&dir, "10m", &[]));
        let mut command = env.command();
        command
            .args(["revoke", &mount.lease_id])
            .env("DATANET_SAMBA_FAILPOINT", step);
        let output = command.output().unwrap();
        assert_eq!(
            output.status.signal(),
            Some(SIGKILL),
            "{step}: {}",
            all_output(&output)
        );

        // Past the intent record, the share is already gone.
        if *step != "revoke:intent" {
            let output = env.smbclient(&mount.share, &mount, "ls");
            assert!(
                !output.status.success(),
                "{step}: the share still works: {}",
                all_output(&output)
            );
        }

        let report = gc_report(&env);
        assert_eq!(
            report["revokes_finished"],
            serde_json::json!([mount.lease_id]),
            "{step}: {report}"
        );
        assert!(
            env.samba_objects().is_empty(),
            "{step}: left {:?}",
            env.samba_objects()
        );
        assert!(env.lease_ids().is_empty(), "{step}");
    }
}

#[test]
fn gc_removes_objects_without_lease() {
    let env = TestEnv::new("orphans");
    let dir = env.share_dir("d");
    let mount = env.mount(&env.grant(&dir, "10m", &[]));
    let record = env
        .state_dir
        .join("leases")
        .join(format!("{}.json", mount.lease_id));
    std::fs::remove_file(&record).unwrap();

    let report = gc_report(&env);
    assert_eq!(
        report["orphan_shares"],
        serde_json::json!([mount.share]),
        "{report}"
    );
    assert_eq!(
        report["orphan_passdb_entries"],
        serde_json::json!([mount.account]),
        "{report}"
    );
    assert_eq!(
        report["orphan_accounts"],
        serde_json::json!([mount.account]),
        "{report}"
    );
    assert!(env.samba_objects().is_empty(), "{:?}", env.samba_objects());
}

#[test]
fn gc_leaves_foreign_objects_alone() {
    let env = TestEnv::new("foreign");
    // Right name shape, but not made by the provisioner: no lease marker.
    let name = format!("{}abcdefghijkl", env.prefix);
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "operator account",
            &name,
        ])
        .status()
        .unwrap();
    assert!(status.success());

    let report = gc_report(&env);
    let still_there = std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .any(|l| l.starts_with(&format!("{name}:")));
    let _ = Command::new("userdel").arg(&name).status();
    assert!(
        still_there,
        "gc removed an account without the lease marker: {report}"
    );
    assert!(
        report["orphan_accounts"].as_array().unwrap().is_empty(),
        "{report}"
    );
}

#[test]
fn gc_repairs_active_lease() {
    let env = TestEnv::new("repair");
    let dir = env.share_dir("d");
    std::fs::write(dir.join("kept.txt"), "k").unwrap();
    let mount = env.mount(&env.grant(&dir, "10m", &[]));
    let conf = env.stack.smb_conf.to_str().unwrap();

    let deleted_share = Command::new("net")
        .args(["conf", "delshare", "-s", conf, &mount.share])
        .output()
        .unwrap();
    assert!(
        deleted_share.status.success(),
        "{}",
        all_output(&deleted_share)
    );
    let deleted_user = Command::new("pdbedit")
        .args(["-s", conf, "-x", "-u", &mount.account])
        .output()
        .unwrap();
    assert!(
        deleted_user.status.success(),
        "{}",
        all_output(&deleted_user)
    );
    let output = env.smbclient(&mount.share, &mount, "ls");
    assert!(
        !output.status.success(),
        "the broken lease still works: {}",
        all_output(&output)
    );

    let report = gc_report(&env);
    assert_eq!(
        report["repaired"],
        serde_json::json!([mount.lease_id]),
        "{report}"
    );

    let output = env.smbclient(&mount.share, &mount, "ls");
    assert!(
        output.status.success(),
        "the repaired lease does not work: {}",
        all_output(&output)
    );
    assert!(
        common::stdout(&output).contains("kept.txt"),
        "{}",
        all_output(&output)
    );
}

#[test]
fn parallel_grants_and_revokes_do_not_interfere() {
    const LEASES: usize = 50;
    let env = TestEnv::new("parallel");
    let dirs: Vec<_> = (0..LEASES)
        .map(|i| env.share_dir(&format!("d{i:02}")))
        .collect();

    let tokens: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = dirs
            .iter()
            .map(|dir| scope.spawn(|| env.grant(dir, "10m", &["--label", "parallel"])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mounts: Vec<_> = tokens.iter().map(|token| env.mount(token)).collect();
    let mut accounts: Vec<&str> = mounts.iter().map(|m| m.account.as_str()).collect();
    accounts.sort();
    accounts.dedup();
    assert_eq!(accounts.len(), LEASES, "accounts repeat");
    assert_eq!(env.lease_ids().len(), LEASES);
    assert_eq!(
        env.samba_objects().len(),
        3 * LEASES,
        "{:?}",
        env.samba_objects()
    );

    // Each lease sees its own directory: write a file through every fifth share.
    for (i, mount) in mounts.iter().enumerate().step_by(5) {
        let upload = env.work_file(&format!("u{i}.txt"), &format!("lease {i}"));
        let output = env.smbclient(
            &mount.share,
            mount,
            &format!("put {} mine.txt", upload.display()),
        );
        assert!(
            output.status.success(),
            "lease {i}: {}",
            all_output(&output)
        );
        assert_eq!(
            std::fs::read_to_string(dirs[i].join("mine.txt")).unwrap(),
            format!("lease {i}")
        );
    }

    std::thread::scope(|scope| {
        let handles: Vec<_> = mounts
            .iter()
            .map(|mount| scope.spawn(|| env.run(&["revoke", &mount.lease_id], None)))
            .collect();
        for handle in handles {
            let output = handle.join().unwrap();
            assert!(output.status.success(), "{}", all_output(&output));
        }
    });
    assert!(env.lease_ids().is_empty());
    assert!(env.samba_objects().is_empty(), "{:?}", env.samba_objects());
}
