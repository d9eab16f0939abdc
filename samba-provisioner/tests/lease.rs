//! Leases against the stack's real smbd: access through smbclient, confinement,
//! revocation of open connections and expiry enforced by Samba.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{all_output, stdout, Session, TestEnv, FORCE_USER};

fn uid_of(user: &str) -> u32 {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields[0] == user).then(|| fields[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no user {user}"))
}

#[test]
fn grant_reads_writes_with_force_user() {
    let env = TestEnv::new("readwrite");
    let dir = env.share_dir("project");
    std::fs::write(dir.join("input.inp"), "*NODE\n1, 0, 0, 0\n").unwrap();
    let token = env.grant(&dir, "10m", &["--label", "mesh session 1"]);
    let mount = env.mount(&token);

    let upload = env.work_file("upload.txt", "written from the node\n");
    let download = env.work_path("download.inp");
    let output = env.smbclient(
        &mount.share,
        &mount,
        &format!(
            "put {} result.txt; get input.inp {}; ls",
            upload.display(),
            download.display()
        ),
    );
    assert!(output.status.success(), "{}", all_output(&output));
    assert!(
        stdout(&output).contains("result.txt"),
        "{}",
        all_output(&output)
    );

    let written = dir.join("result.txt");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        "written from the node\n"
    );
    assert_eq!(
        std::fs::metadata(&written).unwrap().uid(),
        uid_of(FORCE_USER)
    );
    assert_eq!(
        std::fs::read_to_string(&download).unwrap(),
        "*NODE\n1, 0, 0, 0\n"
    );

    let listing = env.run_ok(&["list"], None);
    assert!(listing.contains(&mount.lease_id), "{listing}");
    assert!(listing.contains("mesh session 1"), "{listing}");
    assert!(
        !listing.contains(&mount.password),
        "list shows the password: {listing}"
    );
}

#[test]
fn read_only_lease_rejects_writes() {
    let env = TestEnv::new("readonly");
    let dir = env.share_dir("results");
    std::fs::write(dir.join("result.frd"), "frd").unwrap();
    let token = env.grant(&dir, "10m", &["--read-only"]);
    let mount = env.mount(&token);

    let download = env.work_path("result.frd");
    let output = env.smbclient(
        &mount.share,
        &mount,
        &format!("get result.frd {}", download.display()),
    );
    assert!(output.status.success(), "{}", all_output(&output));
    assert_eq!(std::fs::read_to_string(&download).unwrap(), "frd");

    let upload = env.work_file("upload.txt", "x");
    let output = env.smbclient(
        &mount.share,
        &mount,
        &format!("put {} new.txt", upload.display()),
    );
    assert!(
        all_output(&output).contains("NT_STATUS_ACCESS_DENIED"),
        "{}",
        all_output(&output)
    );
    assert!(!dir.join("new.txt").exists());
}

#[test]
fn share_is_confined_to_its_directory() {
    let env = TestEnv::new("confined");
    let outside = env.share_dir("outside");
    std::fs::write(outside.join("secret.txt"), "outside").unwrap();
    let dir = env.share_dir("inside");
    std::os::unix::fs::symlink("/etc", dir.join("etc")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), dir.join("secret-link.txt")).unwrap();
    let other_dir = env.share_dir("other");
    std::fs::write(other_dir.join("other.txt"), "other lease").unwrap();

    let mount = env.mount(&env.grant(&dir, "10m", &[]));
    let other = env.mount(&env.grant(&other_dir, "10m", &[]));
    let target = env.work_path("fetched");

    let output = env.smbclient(&mount.share, &mount, "cd ..; ls");
    let text = all_output(&output);
    assert!(!text.contains("outside"), "`cd ..` left the share: {text}");

    let output = env.smbclient(
        &mount.share,
        &mount,
        &format!("get ../outside/secret.txt {}", target.display()),
    );
    assert!(
        !target.exists(),
        "`..` path read a file outside: {}",
        all_output(&output)
    );

    let output = env.smbclient(
        &mount.share,
        &mount,
        &format!("get etc/passwd {}", target.display()),
    );
    assert!(
        !target.exists(),
        "symlink to /etc was followed: {}",
        all_output(&output)
    );
    let output = env.smbclient(&mount.share, &mount, "ls etc/*");
    assert!(
        !stdout(&output).contains("passwd"),
        "{}",
        all_output(&output)
    );

    let output = env.smbclient(
        &mount.share,
        &mount,
        &format!("get secret-link.txt {}", target.display()),
    );
    assert!(
        !target.exists(),
        "symlink leaving the share was followed: {}",
        all_output(&output)
    );

    let output = env.smbclient(&other.share, &mount, "ls");
    assert!(
        !output.status.success(),
        "another lease's share accepted this account: {}",
        all_output(&output)
    );
    assert!(
        all_output(&output).contains("NT_STATUS_ACCESS_DENIED"),
        "{}",
        all_output(&output)
    );

    let guest = env.work_file("guest.auth", "username=nobody-at-all\npassword=wrong\n");
    let output = env
        .smbclient_command(&mount.share, &guest)
        .arg("-c")
        .arg("ls")
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "a guest reached the share: {}",
        all_output(&output)
    );
}

#[test]
fn revoke_cuts_open_connection() {
    let env = TestEnv::new("revoke");
    let dir = env.share_dir("live");
    std::fs::write(dir.join("marker.txt"), "m").unwrap();
    let token = env.grant(&dir, "10m", &[]);
    let mount = env.mount(&token);

    let mut session = Session::open(env.smbclient_command(&mount.share, &mount.auth_file));
    session.send("ls");
    session
        .wait_for(&["marker.txt"], Duration::from_secs(15))
        .expect("the open session lists the share");

    env.run_ok(&["revoke"], Some(&token));

    session.send("ls");
    match session.wait_for(&["NT_STATUS", "marker.txt"], Duration::from_secs(15)) {
        Ok(output) => assert!(
            output.contains("NT_STATUS") && !output.contains("marker.txt"),
            "the open session still works after revoke: {output}"
        ),
        Err(output) => assert!(output.contains("smbclient exited"), "{output}"),
    }

    let output = env.smbclient(&mount.share, &mount, "ls");
    assert!(
        !output.status.success(),
        "a new login worked after revoke: {}",
        all_output(&output)
    );
    assert!(env.samba_objects().is_empty(), "{:?}", env.samba_objects());
    assert!(env.lease_ids().is_empty());
}

#[test]
fn revoke_by_id_removes_everything() {
    let env = TestEnv::new("revokeid");
    let dir = env.share_dir("d");
    let mount = env.mount(&env.grant(&dir, "10m", &[]));
    assert_eq!(env.samba_objects().len(), 3, "{:?}", env.samba_objects());

    let printed = env.run_ok(&["revoke", &mount.lease_id], None);
    assert!(printed.contains(&mount.lease_id), "{printed}");
    assert!(env.samba_objects().is_empty(), "{:?}", env.samba_objects());

    let output = env.run(&["revoke", &mount.lease_id], None);
    assert!(!output.status.success());
    assert!(
        all_output(&output).contains("no lease"),
        "{}",
        all_output(&output)
    );
}

#[test]
fn short_ttl_expires_in_samba() {
    let env = TestEnv::new("expiry");
    let dir = env.share_dir("brief");
    let token = env.grant(&dir, "8s", &[]);
    let mount = env.mount(&token);

    let output = env.smbclient(&mount.share, &mount, "ls");
    assert!(
        output.status.success(),
        "login before expiry failed: {}",
        all_output(&output)
    );

    let listed: serde_json::Value =
        serde_json::from_str(&env.run_ok(&["list", "--json"], None)).unwrap();
    let expires_at = UNIX_EPOCH + Duration::from_secs(listed[0]["expires_at"].as_u64().unwrap());
    let wait = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    std::thread::sleep(wait + Duration::from_secs(1));
    let output = env.smbclient(&mount.share, &mount, "ls");
    assert!(
        !output.status.success(),
        "login after expiry worked: {}",
        all_output(&output)
    );
    assert!(
        all_output(&output).contains("NT_STATUS_ACCOUNT_EXPIRED"),
        "{}",
        all_output(&output)
    );

    // No gc ran: the lease and its account are still there, and Samba alone refused.
    assert_eq!(env.lease_ids(), std::slice::from_ref(&mount.lease_id));
    let report = env.run_ok(&["gc", "--json"], None);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["expired"], serde_json::json!([mount.lease_id]));
    assert!(env.samba_objects().is_empty(), "{:?}", env.samba_objects());
}

#[test]
fn rename_of_new_files_with_special_names() {
    let env = TestEnv::new("rename");
    let dir = env.share_dir("plain");
    let mount = env.mount(&env.grant(&dir, "10m", &[]));
    let source = env.work_file("n.txt", "hi\n");
    let source = source.display();

    let output = env.smbclient(
        &mount.share,
        &mount,
        &format!("put {source} \"New Text Document (7).txt\"; rename \"New Text Document (7).txt\" \"test.txt\"; ls"),
    );
    assert!(
        !all_output(&output).contains("NT_STATUS"),
        "{}",
        all_output(&output)
    );
    assert_eq!(names_in(&dir), ["test.txt"]);

    let output = env.smbclient(
        &mount.share,
        &mount,
        &format!("put {source} \"a b#c%d.txt\"; rename \"a b#c%d.txt\" \"e f.txt\"; ls"),
    );
    assert!(
        !all_output(&output).contains("NT_STATUS"),
        "{}",
        all_output(&output)
    );
    assert_eq!(names_in(&dir), ["e f.txt", "test.txt"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("e f.txt")).unwrap(),
        "hi\n"
    );
}

#[test]
fn invalid_grants_create_nothing() {
    let env = TestEnv::with_settings("invalid", &[("max_ttl", "\"1h\"")]);
    let dir = env.share_dir("ok");
    std::os::unix::fs::symlink(&dir, env.root.join("link")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let dir_text = dir.to_str().unwrap();
    let link_text = env.root.join("link");
    let link_text = link_text.to_str().unwrap();
    let dotdot = format!("{dir_text}/../ok");

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--path", outside.path().to_str().unwrap(), "--ttl", "10m"],
            "not inside an allowed root",
        ),
        (vec!["--path", link_text, "--ttl", "10m"], "symbolic link"),
        (vec!["--path", &dotdot, "--ttl", "10m"], "'..' segment"),
        (vec!["--path", dir_text, "--ttl", "2h"], "samba.max_ttl"),
        (
            vec!["--path", dir_text, "--ttl", "10m", "--label", "a\nb"],
            "control character",
        ),
        (
            vec!["--path", dir_text, "--ttl", "10m", "--label", "100%U"],
            "'%'",
        ),
        (
            vec![
                "--path",
                dir_text,
                "--ttl",
                "10m",
                "--client-ip",
                "10.0.0.0/8",
            ],
            "IPv4 or IPv6",
        ),
        (vec!["--path", dir_text, "--ttl", "soon"], "--ttl"),
    ];
    for (args, expected) in cases {
        let mut full = vec!["grant"];
        full.extend(args.iter());
        let output = env.run(&full, None);
        let text = all_output(&output);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(
            text.contains(expected),
            "{args:?}: expected {expected:?} in {text}"
        );
    }
    assert!(env.samba_objects().is_empty(), "{:?}", env.samba_objects());
    assert!(env.lease_ids().is_empty());
}

#[test]
fn client_ip_restricts_hosts() {
    let env = TestEnv::new("hostsallow");
    let dir = env.share_dir("node");
    let mount = env.mount(&env.grant(&dir, "10m", &["--client-ip", "127.0.0.1"]));
    let output = env.smbclient(&mount.share, &mount, "ls");
    assert!(output.status.success(), "{}", all_output(&output));

    // The test client connects from 127.0.0.1, which Samba admits by default.
    let elsewhere = env.mount(&env.grant(&dir, "10m", &["--client-ip", "192.0.2.10"]));
    let output = env.smbclient(&elsewhere.share, &elsewhere, "ls");
    assert!(
        !output.status.success(),
        "a lease for 192.0.2.10 admitted 127.0.0.1: {}",
        all_output(&output)
    );

    let conf = env.stack.smb_conf.to_str().unwrap();
    let show = std::process::Command::new("net")
        .args(["conf", "showshare", "-s", conf, &mount.share])
        .output()
        .unwrap();
    let section = stdout(&show);
    assert!(section.contains("hosts allow = 127.0.0.1"), "{section}");
    assert!(section.contains("hosts deny = ALL"), "{section}");
    assert!(
        section.contains("server smb encrypt = required"),
        "{section}"
    );
}

/// A ramfs mounted for one test; ramfs stores no `user.*` extended attributes.
struct Ramfs(std::path::PathBuf);

impl Ramfs {
    fn mount(dir: &std::path::Path) -> Ramfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t ramfs {}", dir.display());
        Ramfs(dir.to_path_buf())
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn rename_without_user_xattrs() {
    let env = TestEnv::new("noxattr");
    let ramfs = Ramfs::mount(&env.root.join("ramfs"));
    let dir = env.share_dir("ramfs/session");
    assert!(
        !samba_provisioner::share::supports_user_xattrs(&dir),
        "ramfs took a user xattr"
    );
    let mount = env.mount(&env.grant(&dir, "10m", &[]));

    let conf = env.stack.smb_conf.to_str().unwrap();
    let show = std::process::Command::new("net")
        .args(["conf", "showshare", "-s", conf, &mount.share])
        .output()
        .unwrap();
    assert!(
        stdout(&show).contains("store dos attributes = no"),
        "{}",
        stdout(&show)
    );
    assert!(
        stdout(&show).contains("ea support = no"),
        "{}",
        stdout(&show)
    );

    let source = env.work_file("n.txt", "hi\n");
    let source = source.display();
    let output = env.smbclient(
        &mount.share,
        &mount,
        &format!(
            "put {source} \"New Text Document (7).txt\"; rename \"New Text Document (7).txt\" \"test.txt\"; \
             put {source} \"a b#c%d.txt\"; rename \"a b#c%d.txt\" \"e f.txt\"; put {source} test.txt; ls"
        ),
    );
    assert!(
        !all_output(&output).contains("NT_STATUS"),
        "{}",
        all_output(&output)
    );
    assert_eq!(names_in(&dir), ["e f.txt", "test.txt"]);

    // Revoke before the ramfs goes away, so smbd holds nothing open below it.
    env.run_ok(&["revoke", &mount.lease_id], None);
    drop(ramfs);
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
