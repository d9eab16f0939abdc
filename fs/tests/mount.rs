//! Kernel-mount tests of the datanet filesystem over Garage and a local directory.
//!
//! Each test mounts its own `datanet` process on its own mount point, with a fresh
//! bucket, and unmounts it on drop. The Garage settings come from the service stack
//! (`scripts/stack.sh up`, then `source $RUN/env.sh`).

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::{errno_of, names, Garage, Mounted};

/// Returns one S3 space `s3` on `bucket` and one local space `local` in the test directory.
fn s3_and_local(garage: &Garage, bucket: &str) -> String {
    format!("{}\n[spaces.local]\nurl = \"file://{{dir}}/local\"\n", garage.space_toml("s3", bucket, None))
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn read_all(path: &std::path::Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

#[test]
fn root_lists_spaces_read_only() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("root");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    assert_eq!(names(&mount.mountpoint), vec!["local", "s3"]);
    let root = fs::metadata(&mount.mountpoint).unwrap();
    assert!(root.is_dir());
    assert_eq!(root.mode() & 0o777, 0o555);
    let err = fs::create_dir(mount.path("newspace")).unwrap_err();
    assert_ne!(errno_of(&err), libc::ENOENT);
    assert!(fs::metadata(mount.path("nospace")).is_err());
}

#[test]
fn space_and_plus_names_distinct() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("space-plus");
    let direct = garage.bucket(&bucket);
    let mut mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    fs::write(mount.path("s3/a b.txt"), "one\n").unwrap();
    fs::write(mount.path("s3/a+b.txt"), "two\n").unwrap();
    let listed: Vec<String> = names(&mount.path("s3")).into_iter().filter(|n| n.starts_with('a')).collect();
    assert_eq!(listed, vec!["a b.txt", "a+b.txt"]);
    assert_eq!(read_all(&mount.path("s3/a b.txt")), b"one\n");
    assert_eq!(read_all(&mount.path("s3/a+b.txt")), b"two\n");
    assert_eq!(direct.keys("a"), vec!["a b.txt", "a+b.txt"]);

    mount.remount();
    assert_eq!(read_all(&mount.path("s3/a b.txt")), b"one\n");
    assert_eq!(read_all(&mount.path("s3/a+b.txt")), b"two\n");
}

#[test]
fn unicode_nfc_nfd_distinct() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("unicode");
    let direct = garage.bucket(&bucket);
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");
    let nfc = "caf\u{e9}.txt";
    let nfd = "cafe\u{301}.txt";

    for space in ["s3", "local"] {
        fs::write(mount.path(&format!("{space}/{nfc}")), "NFC\n").unwrap();
        fs::write(mount.path(&format!("{space}/{nfd}")), "NFD\n").unwrap();
        let listed: Vec<String> = names(&mount.path(space)).into_iter().filter(|n| n.starts_with("caf")).collect();
        assert_eq!(listed.len(), 2, "{space}: {listed:?}");
        assert_eq!(read_all(&mount.path(&format!("{space}/{nfc}"))), b"NFC\n");
        assert_eq!(read_all(&mount.path(&format!("{space}/{nfd}"))), b"NFD\n");
        fs::remove_file(mount.path(&format!("{space}/{nfd}"))).unwrap();
        assert_eq!(read_all(&mount.path(&format!("{space}/{nfc}"))), b"NFC\n");
        let left: Vec<String> = names(&mount.path(space)).into_iter().filter(|n| n.starts_with("caf")).collect();
        assert_eq!(left, vec![nfc.to_string()], "{space}");
    }
    assert_eq!(direct.keys("caf"), vec![nfc.to_string()]);
    assert_eq!(direct.keys("caf")[0].as_bytes(), b"caf\xc3\xa9.txt");
}

#[test]
fn long_names_enametoolong() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("longname");
    let direct = garage.bucket(&bucket);
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    let stat = nix_statvfs(&mount.path("s3"));
    assert_eq!(stat.f_namemax, 255);

    let n255 = "a".repeat(255);
    File::create(mount.path(&format!("s3/{n255}"))).unwrap();
    assert!(mount.path(&format!("s3/{n255}")).exists());
    let err = File::create(mount.path(&format!("s3/{n255}b"))).unwrap_err();
    assert_eq!(errno_of(&err), libc::ENAMETOOLONG);
    let err = File::create(mount.path(&format!("s3/{}", "a".repeat(1025)))).unwrap_err();
    assert_eq!(errno_of(&err), libc::ENAMETOOLONG);

    let d = "d".repeat(200);
    let deep = format!("s3/{d}/{d}/{d}/{d}/{d}");
    fs::create_dir_all(mount.path(&deep)).unwrap();
    let err = File::create(mount.path(&format!("{deep}/{n255}"))).unwrap_err();
    assert_eq!(errno_of(&err), libc::ENAMETOOLONG, "object key over 1024 bytes");
    assert!(names(&mount.path(&deep)).is_empty());
    assert!(direct.keys(&format!("{d}/{d}/{d}/{d}/{d}/a")).is_empty());
}

fn nix_statvfs(path: &std::path::Path) -> libc::statvfs {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid C string and stat a writable statvfs.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    assert_eq!(rc, 0, "statvfs {}: {}", path.display(), std::io::Error::last_os_error());
    stat
}

#[test]
fn statfs_sane() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("statfs");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");
    for path in [mount.mountpoint.clone(), mount.path("s3"), mount.path("local")] {
        let stat = nix_statvfs(&path);
        let shown = path.display();
        assert!(stat.f_blocks > 0, "{shown}");
        assert!(stat.f_bfree > 0, "{shown}");
        assert!(stat.f_bavail > 0, "{shown}");
        assert!(stat.f_files > 0, "{shown}");
        assert!(stat.f_ffree > 0, "{shown}");
        assert!(stat.f_bsize > 0, "{shown}");
        assert!(stat.f_frsize > 0, "{shown}");
        assert_eq!(stat.f_namemax, 255);
    }
}

#[test]
fn key_file_and_prefix_dir_wins() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("file-prefix");
    let direct = garage.bucket(&bucket);
    direct.put("foobar", b"file\n");
    direct.put("foobar/foo", b"child\n");
    direct.put("p2/x/y", b"child\n");
    direct.put("p2/x", b"file\n");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    assert_eq!(names(&mount.path("s3")), vec!["foobar", "p2"]);
    assert!(fs::metadata(mount.path("s3/foobar")).unwrap().is_dir());
    assert_eq!(read_all(&mount.path("s3/foobar/foo")), b"child\n");
    assert_eq!(names(&mount.path("s3/p2")), vec!["x"]);
    assert!(fs::metadata(mount.path("s3/p2/x")).unwrap().is_dir());
    assert_eq!(read_all(&mount.path("s3/p2/x/y")), b"child\n");
    assert_eq!(direct.keys(""), vec!["foobar", "foobar/foo", "p2/x", "p2/x/y"]);
    assert!(mount.log().contains("shadowed"), "the shadowed object is reported in the log");
}

#[test]
fn file_plus_dir_marker() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("marker");
    let direct = garage.bucket(&bucket);
    direct.put("foo", b"data\n");
    direct.put_marker("foo");
    direct.put_marker("empty");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    let entries: Vec<(String, bool)> = fs::read_dir(mount.path("s3"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), e.file_type().unwrap().is_dir())
        })
        .collect();
    let foo: Vec<&(String, bool)> = entries.iter().filter(|(n, _)| n == "foo").collect();
    assert_eq!(foo.len(), 1, "{entries:?}");
    assert!(foo[0].1, "readdir type of foo is a directory");
    assert!(fs::metadata(mount.path("s3/foo")).unwrap().is_dir(), "lookup agrees with readdir");
    assert!(names(&mount.path("s3/foo")).is_empty());

    assert!(fs::metadata(mount.path("s3/empty")).unwrap().is_dir());
    assert!(names(&mount.path("s3/empty")).is_empty());
    fs::remove_dir(mount.path("s3/empty")).unwrap();
    assert!(direct.keys("empty").is_empty(), "rmdir deletes the marker");
    assert!(fs::metadata(mount.path("s3/empty")).is_err());
}

#[test]
fn listing_pagination_over_10000() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("pagination");
    let direct = garage.bucket(&bucket);
    let keys: Vec<String> = (1..=10_500).map(|i| format!("many/f{i:05}")).collect();
    direct.put_many(keys);
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    for round in 0..3 {
        let count = fs::read_dir(mount.path("s3/many")).unwrap().count();
        assert_eq!(count, 10_500, "round {round}");
        std::thread::sleep(Duration::from_millis(700));
    }
    let listed = names(&mount.path("s3/many"));
    let mut unique = listed.clone();
    unique.dedup();
    assert_eq!(unique.len(), 10_500, "every entry exactly once");

    fs::create_dir(mount.path("s3/many2")).unwrap();
    let creators: Vec<_> = (0..4)
        .map(|worker| {
            let dir = mount.path("s3/many2");
            std::thread::spawn(move || {
                for i in (1..=3000).filter(|i| i % 4 == worker) {
                    File::create(dir.join(i.to_string())).unwrap();
                }
            })
        })
        .collect();
    for creator in creators {
        creator.join().unwrap();
    }
    assert_eq!(names(&mount.path("s3/many2")).len(), 3000, "files created through the mount span three pages");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(names(&mount.path("s3/many2")).len(), 3000, "and a fresh listing finds them all");
}

#[test]
fn remote_update_not_stale() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("stale");
    let direct = garage.bucket(&bucket);
    direct.put("conf.txt", b"value=38\n");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    assert_eq!(read_all(&mount.path("s3/conf.txt")), b"value=38\n");
    assert_eq!(read_all(&mount.path("s3/conf.txt")), b"value=38\n");
    direct.put("conf.txt", b"value=37\n");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(fs::metadata(mount.path("s3/conf.txt")).unwrap().len(), 9);
    assert_eq!(read_all(&mount.path("s3/conf.txt")), b"value=37\n");
}

#[test]
fn slowdown_is_not_enoent() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("slowdown");
    let direct = garage.bucket(&bucket);
    direct.put("present.txt", b"a\n");
    let proxy = FaultProxy::start(&garage.endpoint);
    let spaces = garage.space_toml("s3", &bucket, Some(&proxy.endpoint()));
    let mount = Mounted::start(&spaces, "");

    proxy.fail_next(5);
    assert!(fs::metadata(mount.path("s3/present.txt")).unwrap().is_file());
    assert_eq!(read_all(&mount.path("s3/present.txt")), b"a\n");

    std::thread::sleep(Duration::from_millis(1500));
    proxy.fail_all(true);
    let err = fs::metadata(mount.path("s3/present.txt")).unwrap_err();
    assert_ne!(errno_of(&err), libc::ENOENT, "throttling must never look like a missing file");
    assert_eq!(errno_of(&err), libc::EIO);

    proxy.fail_all(false);
    assert!(fs::metadata(mount.path("s3/present.txt")).unwrap().is_file(), "no negative entry was cached");
}

#[test]
fn rename_while_reading_keeps_content() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("rename-read");
    let direct = garage.bucket(&bucket);
    let data = random_bytes(24 << 20, 7);
    direct.put("big", &data);
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    let mut reader = File::open(mount.path("s3/big")).unwrap();
    let mut out = vec![0u8; 2 << 20];
    reader.read_exact(&mut out).unwrap();
    fs::rename(mount.path("s3/big"), mount.path("s3/big.moved")).unwrap();
    reader.read_to_end(&mut out).unwrap();
    assert_eq!(out.len(), data.len());
    assert!(out == data, "the open handle read the original content");
    assert!(read_all(&mount.path("s3/big.moved")) == data);
    assert_eq!(direct.keys("big"), vec!["big.moved"]);
}

#[test]
fn read_only_space_gives_erofs() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("readonly");
    garage.bucket(&bucket).put("kept.txt", b"kept\n");
    let spaces = format!(
        "{}read_only = true\n\n[spaces.local]\nurl = \"file://{{dir}}/local\"\nread_only = true\n",
        garage.space_toml("s3", &bucket, None)
    );
    let mount = Mounted::start(&spaces, "");
    for space in ["s3", "local"] {
        let err = File::create(mount.path(&format!("{space}/new.txt"))).unwrap_err();
        assert_eq!(errno_of(&err), libc::EROFS, "{space} create");
        let err = fs::create_dir(mount.path(&format!("{space}/d"))).unwrap_err();
        assert_eq!(errno_of(&err), libc::EROFS, "{space} mkdir");
    }
    let err = OpenOptions::new().write(true).open(mount.path("s3/kept.txt")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EROFS);
    let err = fs::remove_file(mount.path("s3/kept.txt")).unwrap_err();
    assert_eq!(errno_of(&err), libc::EROFS);
    assert_eq!(read_all(&mount.path("s3/kept.txt")), b"kept\n");
}

#[test]
fn space_owner_and_mode_applied() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("owner");
    garage.bucket(&bucket).put("d/f.txt", b"x");
    let spaces = format!("{}uid = 1234\ngid = 5678\nmode = \"0640\"\n", garage.space_toml("s3", &bucket, None));
    let mount = Mounted::start(&spaces, "");

    let file = fs::metadata(mount.path("s3/d/f.txt")).unwrap();
    assert_eq!((file.uid(), file.gid(), file.mode() & 0o7777), (1234, 5678, 0o640));
    let dir = fs::metadata(mount.path("s3/d")).unwrap();
    assert_eq!((dir.uid(), dir.gid(), dir.mode() & 0o7777), (1234, 5678, 0o750));
    let space_root = fs::metadata(mount.path("s3")).unwrap();
    assert_eq!(space_root.uid(), 1234);
}

#[test]
fn kernel_checks_permissions() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("perm");
    garage.bucket(&bucket).put("secret.txt", b"tenant data\n");
    let spaces = format!("{}uid = 1234\ngid = 1234\nmode = \"0600\"\n", garage.space_toml("s3", &bucket, None));
    let mount = Mounted::start_with_args(&spaces, "", &["-o", "allow_other"]);

    let as_nobody = |path: &std::path::Path| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(path)
            .output()
            .expect("run setpriv")
    };
    let denied = as_nobody(&mount.path("s3/secret.txt"));
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("Permission denied"), "{denied:?}");
    let listed = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
        .arg(&mount.mountpoint)
        .output()
        .unwrap();
    assert!(listed.status.success(), "other users may list the root with allow_other: {listed:?}");
}

#[test]
fn inode_numbers_stable() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("inode");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");
    fs::write(mount.path("s3/a.txt"), "a").unwrap();
    let held = File::open(mount.path("s3/a.txt")).unwrap();
    let first = fs::metadata(mount.path("s3/a.txt")).unwrap().ino();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(fs::metadata(mount.path("s3/a.txt")).unwrap().ino(), first);
    assert_eq!(held.metadata().unwrap().ino(), first);
    fs::rename(mount.path("s3/a.txt"), mount.path("s3/b.txt")).unwrap();
    assert_eq!(fs::metadata(mount.path("s3/b.txt")).unwrap().ino(), first, "a rename keeps the inode");
    assert_ne!(fs::metadata(mount.path("s3")).unwrap().ino(), first);
    drop(held);

    fs::write(mount.path("s3/c.txt"), "c").unwrap();
    for entry in fs::read_dir(mount.path("s3")).unwrap() {
        let entry = entry.unwrap();
        let stat_ino = fs::metadata(entry.path()).unwrap().ino();
        assert_eq!(std::os::unix::fs::DirEntryExt::ino(&entry), stat_ino, "readdir and stat agree for {:?}", entry.file_name());
    }
    let before = fs::metadata(mount.path("s3/c.txt")).unwrap().ino();
    let mut mount = mount;
    mount.remount();
    assert_eq!(fs::metadata(mount.path("s3/c.txt")).unwrap().ino(), before, "an unchanged file keeps its number after a remount");
}

#[test]
fn slow_request_does_not_block_others() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("concurrency");
    garage.bucket(&bucket).put("slow.txt", b"slow\n");
    let proxy = FaultProxy::start(&garage.endpoint);
    let spaces = format!(
        "{}\n[spaces.local]\nurl = \"file://{{dir}}/local\"\n",
        garage.space_toml("slow", &bucket, Some(&proxy.endpoint()))
    );
    let mount = Mounted::start(&spaces, "");
    proxy.delay(Duration::from_secs(4));

    let slow_path = mount.path("slow/slow.txt");
    let slow = std::thread::spawn(move || fs::read(slow_path));
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    fs::write(mount.path("local/fast.txt"), "fast\n").unwrap();
    assert_eq!(read_all(&mount.path("local/fast.txt")), b"fast\n");
    assert!(!slow.is_finished(), "the slow request is still running");
    assert!(started.elapsed() < Duration::from_secs(3), "local I/O waited for the slow request");
    assert_eq!(slow.join().unwrap().unwrap(), b"slow\n");
}

#[test]
fn rereads_served_from_caches() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("cache");
    let direct = garage.bucket(&bucket);
    let data = random_bytes(3 << 20, 3);
    direct.put("data.bin", &data);
    for i in 0..3 {
        direct.put(&format!("fill{i}.bin"), &random_bytes(2 << 20, 10 + i));
    }
    let proxy = FaultProxy::start(&garage.endpoint);
    let spaces = garage.space_toml("s3", &bucket, Some(&proxy.endpoint()));
    let mount = Mounted::start(&spaces, "max_size = \"5MiB\"\n");
    let gets = |proxy: &FaultProxy| {
        let requests = proxy.requests();
        requests.iter().filter(|r| r.starts_with("GET ") && r.contains("/data.bin HTTP")).count()
    };

    assert!(read_all(&mount.path("s3/data.bin")) == data);
    assert!(gets(&proxy) > 0);
    std::thread::sleep(Duration::from_millis(1500));
    proxy.clear_requests();
    assert!(read_all(&mount.path("s3/data.bin")) == data);
    assert_eq!(gets(&proxy), 0, "unchanged file re-read from the kernel page cache");

    let file = File::open(mount.path("s3/data.bin")).unwrap();
    // SAFETY: fd is open; DONTNEED only drops clean cached pages of this file.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_DONTNEED) };
    drop(file);
    proxy.clear_requests();
    assert!(read_all(&mount.path("s3/data.bin")) == data);
    assert_eq!(gets(&proxy), 0, "pages dropped by the kernel come from the on-disk data cache");

    for i in 0..3 {
        read_all(&mount.path(&format!("s3/fill{i}.bin")));
    }
    std::thread::sleep(Duration::from_millis(300));
    let cache_dir = mount.dir.path().join("cache").join(format!("data-{}", mount.pid()));
    let used: u64 = fs::read_dir(&cache_dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(used <= 5 << 20, "data cache holds {used} bytes, above its 5 MiB limit");
    assert!(used > 0);
}

#[test]
fn open_file_never_mixes_versions() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("versions");
    let direct = garage.bucket(&bucket);
    let old = vec![b'o'; 3 << 20];
    direct.put("v.bin", &old);
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    let mut file = File::open(mount.path("s3/v.bin")).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact(&mut head).unwrap();
    direct.put("v.bin", &vec![b'n'; 3 << 20]);
    file.seek(SeekFrom::Start(2 << 20)).unwrap();
    let mut tail = vec![0u8; 4096];
    match file.read_exact(&mut tail) {
        Ok(()) => assert!(tail.iter().all(|b| *b == b'o'), "an open file returned bytes of a newer version"),
        Err(err) => assert_eq!(errno_of(&err), libc::ESTALE),
    }
    drop(file);
    std::thread::sleep(Duration::from_millis(1500));
    let fresh = read_all(&mount.path("s3/v.bin"));
    assert!(fresh.iter().all(|b| *b == b'n'), "a new open after the TTL sees the new version");
}

/// Create, write, append, O_TRUNC, truncate, mkdir, rmdir, rename and unlink on one space.
fn exercise_writes(mount: &Mounted, space: &str) {
    let p = |rel: &str| mount.path(&format!("{space}/{rel}"));

    fs::write(p("w.txt"), "hello1\n").unwrap();
    OpenOptions::new().append(true).open(p("w.txt")).unwrap().write_all(b"hello2\n").unwrap();
    assert_eq!(read_all(&p("w.txt")), b"hello1\nhello2\n", "{space} append");
    fs::write(p("w.txt"), "short\n").unwrap();
    assert_eq!(read_all(&p("w.txt")), b"short\n", "{space} O_TRUNC");
    OpenOptions::new().write(true).open(p("w.txt")).unwrap().set_len(3).unwrap();
    assert_eq!(read_all(&p("w.txt")), b"sho", "{space} ftruncate");
    {
        let mut file = OpenOptions::new().read(true).write(true).open(p("w.txt")).unwrap();
        file.seek(SeekFrom::Start(1)).unwrap();
        file.write_all(b"X").unwrap();
        let mut seen = String::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_string(&mut seen).unwrap();
        assert_eq!(seen, "sXo", "{space} read while open for writing");
    }
    assert_eq!(fs::metadata(p("w.txt")).unwrap().len(), 3);

    fs::create_dir(p("d")).unwrap();
    assert!(fs::metadata(p("d")).unwrap().is_dir());
    assert_eq!(errno_of(&fs::create_dir(p("d")).unwrap_err()), libc::EEXIST);
    fs::write(p("d/inner.txt"), "inner\n").unwrap();
    assert_eq!(errno_of(&fs::remove_dir(p("d")).unwrap_err()), libc::ENOTEMPTY);

    fs::rename(p("w.txt"), p("d/moved.txt")).unwrap();
    assert!(fs::metadata(p("w.txt")).is_err());
    assert_eq!(read_all(&p("d/moved.txt")), b"sXo");
    fs::rename(p("d"), p("e")).unwrap();
    assert!(fs::metadata(p("d")).is_err());
    assert_eq!(names(&p("e")), vec!["inner.txt", "moved.txt"]);
    assert_eq!(read_all(&p("e/inner.txt")), b"inner\n");

    fs::remove_file(p("e/inner.txt")).unwrap();
    fs::remove_file(p("e/moved.txt")).unwrap();
    assert!(fs::metadata(p("e")).unwrap().is_dir(), "{space}: a directory outlives its last file");
    fs::remove_dir(p("e")).unwrap();
    assert!(fs::metadata(p("e")).is_err());
}

#[test]
fn writes_round_trip_on_s3_and_local() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("writes");
    let direct = garage.bucket(&bucket);
    let mut mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    exercise_writes(&mount, "s3");
    exercise_writes(&mount, "local");
    assert!(direct.keys("").is_empty(), "{:?}", direct.keys(""));

    fs::write(mount.path("s3/kept.txt"), "kept\n").unwrap();
    assert_eq!(direct.get("kept.txt").as_deref(), Some(&b"kept\n"[..]), "close uploads the object");
    fs::create_dir(mount.path("s3/emptydir")).unwrap();
    assert_eq!(direct.keys("emptydir"), vec!["emptydir"], "mkdir writes the dir/ marker");
    fs::write(mount.path("s3/f"), "x").unwrap();
    assert_eq!(errno_of(&fs::hard_link(mount.path("s3/f"), mount.path("s3/g")).unwrap_err()), libc::EPERM);
    mount.remount();
    assert_eq!(read_all(&mount.path("s3/kept.txt")), b"kept\n");
    assert!(fs::metadata(mount.path("s3/emptydir")).unwrap().is_dir());
}

#[test]
fn implicit_dir_persists_after_last_file() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("implicit");
    let direct = garage.bucket(&bucket);
    direct.put("imp/a.txt", b"y\n");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    fs::remove_file(mount.path("s3/imp/a.txt")).unwrap();
    assert!(fs::metadata(mount.path("s3/imp")).unwrap().is_dir());
    File::create(mount.path("s3/imp/b.txt")).unwrap();
    fs::remove_file(mount.path("s3/imp/b.txt")).unwrap();
    fs::remove_dir(mount.path("s3/imp")).unwrap();
    assert_eq!(errno_of(&fs::metadata(mount.path("s3/imp")).unwrap_err()), libc::ENOENT);
    assert!(direct.keys("").is_empty());
}

#[test]
fn sigterm_unmounts_cleanly() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("sigterm");
    let mut mount = Mounted::start(&s3_and_local(&garage, &bucket), "");
    fs::write(mount.path("local/x"), "x").unwrap();

    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: sending a signal to the child process this test started.
        assert_eq!(unsafe { libc::kill(mount.pid() as i32, signal) }, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        while common::is_mounted(&mount.mountpoint) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!common::is_mounted(&mount.mountpoint), "signal {signal} unmounted");
        mount.unmount();
        assert!(mount.log().contains("unmounting"), "{}", mount.log());
        if signal == libc::SIGTERM {
            mount.remount();
        }
    }
}

/// Unmounts a daemon mount on drop.
struct DaemonGuard(std::path::PathBuf);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        if common::is_mounted(&self.0) {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.0).status();
        }
    }
}

#[test]
fn mount_helper_starts_daemon() {
    let dir = tempfile::Builder::new().prefix("datanet-helper-").tempdir_in("/tmp").unwrap();
    let mountpoint = dir.path().join("mnt");
    let local = dir.path().join("local");
    fs::create_dir_all(&mountpoint).unwrap();
    fs::create_dir_all(&local).unwrap();
    fs::write(local.join("hello.txt"), "hello\n").unwrap();
    let config = dir.path().join("datanet.toml");
    fs::write(
        &config,
        format!(
            "[spaces.local]\nurl = \"file://{}\"\n[cache]\ndir = \"{}\"\n",
            local.display(),
            dir.path().join("cache").display()
        ),
    )
    .unwrap();
    let helper = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/mount.fuse.datanet");

    let output = Command::new(&helper)
        .arg(&config)
        .arg(&mountpoint)
        .args(["-o", "rw,_netdev"])
        .env("DATANET_BIN", common::datanet_bin())
        .output()
        .unwrap();
    let _guard = DaemonGuard(mountpoint.clone());
    assert!(output.status.success(), "{output:?}");
    assert!(common::is_mounted(&mountpoint), "mounted when the helper returns");
    assert_eq!(read_all(&mountpoint.join("local/hello.txt")), b"hello\n");
    let daemon_log = fs::read_to_string(dir.path().join("cache/datanet.log")).unwrap();
    assert!(daemon_log.contains("mounted"), "the daemon logs next to its cache: {daemon_log}");

    let status = Command::new("fusermount3").arg("-u").arg(&mountpoint).status().unwrap();
    assert!(status.success());
    assert!(!common::is_mounted(&mountpoint));

    let bad = Command::new(&helper)
        .arg(&config)
        .arg(dir.path().join("missing"))
        .env("DATANET_BIN", common::datanet_bin())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("missing"), "{bad:?}");
}

#[test]
fn check_reports_each_space() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("check");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("datanet.toml");
    fs::write(
        &config,
        format!(
            "{}\n{}read_only = true\n\n[spaces.local]\nurl = \"file://{}\"\n",
            garage.space_toml("good", &bucket, None),
            garage.space_toml("ro", &bucket, None),
            dir.path().display()
        ),
    )
    .unwrap();
    let output = Command::new(common::datanet_bin()).arg("check").arg("--config").arg(&config).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.lines().any(|l| l.starts_with("good") && l.contains("reachable, writable")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("ro") && l.contains("reachable, read-only")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("local") && l.contains("reachable, writable")), "{stdout}");
    assert!(!stdout.contains(&fs::read_to_string(&garage.secret_file).unwrap().trim().to_string()));

    fs::write(&config, garage.space_toml("gone", "fst-no-such-bucket-here", None)).unwrap();
    let output = Command::new(common::datanet_bin()).arg("check").arg("--config").arg(&config).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("UNREACHABLE"), "{output:?}");
}

#[test]
fn negative_entries_and_listings_expire() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("negative");
    let direct = garage.bucket(&bucket);
    direct.put("old.txt", b"old\n");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "metadata_ttl = \"4s\"\n");

    assert_eq!(names(&mount.path("s3")), vec!["old.txt"]);
    assert_eq!(errno_of(&fs::metadata(mount.path("s3/late.txt")).unwrap_err()), libc::ENOENT);
    direct.put("late.txt", b"late\n");
    assert_eq!(names(&mount.path("s3")), vec!["old.txt"], "the listing is served from the cache");
    assert!(fs::metadata(mount.path("s3/late.txt")).is_err(), "the negative entry is served from the cache");

    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(names(&mount.path("s3")), vec!["late.txt", "old.txt"]);
    assert_eq!(read_all(&mount.path("s3/late.txt")), b"late\n");
}

#[test]
fn denied_credentials_give_eacces() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("denied");
    garage.bucket(&bucket).put("x.txt", b"x");
    let dir = tempfile::tempdir().unwrap();
    let bad_secret = dir.path().join("secret");
    fs::write(&bad_secret, "not-the-secret\n").unwrap();
    fs::set_permissions(&bad_secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let spaces = garage
        .space_toml("s3", &bucket, None)
        .replace(&garage.secret_file.display().to_string(), &bad_secret.display().to_string());
    let mount = Mounted::start(&spaces, "");

    assert_eq!(errno_of(&fs::metadata(mount.path("s3/x.txt")).unwrap_err()), libc::EACCES);
    assert_eq!(errno_of(&fs::read_dir(mount.path("s3")).unwrap_err()), libc::EACCES);
    let log = mount.log();
    assert!(log.contains("check the space's access key"), "{log}");
    assert!(!log.contains("not-the-secret"), "the secret never appears in the log");
}

#[test]
fn random_read_fetches_needed_range() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("random");
    let data = random_bytes(32 << 20, 5);
    garage.bucket(&bucket).put("r.bin", &data);
    let proxy = FaultProxy::start(&garage.endpoint);
    let mount = Mounted::start(&garage.space_toml("s3", &bucket, Some(&proxy.endpoint())), "");

    let mut file = File::open(mount.path("s3/r.bin")).unwrap();
    proxy.clear_requests();
    let offset = 20 << 20;
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut chunk = vec![0u8; 4096];
    file.read_exact(&mut chunk).unwrap();
    assert!(chunk[..] == data[offset as usize..offset as usize + 4096]);

    let gets: Vec<String> = proxy.requests().into_iter().filter(|r| r.starts_with("GET ") && r.contains("/r.bin HTTP")).collect();
    assert!(!gets.is_empty(), "{gets:?}");
    assert!(gets.len() <= 2, "{gets:?}");
    for get in &gets {
        assert!(get.contains("bytes=20971520-22020095"), "only the 1 MiB block at the read offset: {get}");
    }
}

#[test]
fn unmappable_keys_skipped_not_eio() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("weird-keys");
    let direct = garage.bucket(&bucket);
    direct.put("w/ok.txt", b"ok\n");
    direct.put("w/a/real.txt", b"real\n");
    direct.put_marker("w/a/");
    direct.put_marker("w//x");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    assert_eq!(names(&mount.path("s3")), vec!["w"]);
    assert_eq!(names(&mount.path("s3/w")), vec!["a", "ok.txt"]);
    assert!(fs::metadata(mount.path("s3/w/a")).unwrap().is_dir());
    assert_eq!(names(&mount.path("s3/w/a")), vec!["real.txt"]);
    assert_eq!(read_all(&mount.path("s3/w/ok.txt")), b"ok\n");
    assert_eq!(read_all(&mount.path("s3/w/a/real.txt")), b"real\n");

    let raw = common::runtime().block_on(direct.markers.list_dir_raw("w")).unwrap();
    assert!(raw.prefixes.contains(&"w//".to_string()), "{raw:?}");
    let raw = common::runtime().block_on(direct.markers.list_dir_raw("w/a")).unwrap();
    assert!(raw.prefixes.contains(&"w/a//".to_string()), "the unmappable key is kept: {raw:?}");
}

#[test]
fn stale_mount_named_in_error() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("stale-mount");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");
    // SAFETY: killing the child process this test started.
    assert_eq!(unsafe { libc::kill(mount.pid() as i32, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(300));

    let output = Command::new(common::datanet_bin())
        .args(["mount", "--foreground", "--config"])
        .arg(&mount.config_path)
        .arg(&mount.mountpoint)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stale FUSE mount"), "{stderr}");
    assert!(stderr.contains("fusermount3 -u"), "{stderr}");
}
