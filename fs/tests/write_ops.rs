//! Write operations on a real kernel mount over Garage: create, overwrite, append,
//! truncate, sparse and random writes, fsync, rename, symlinks, metadata and links.
//! Needs the service stack (`scripts/stack.sh up`).

mod write_support;

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::time::{Duration, UNIX_EPOCH};

use write_support::mount::{sh, Mounted, MountSettings};
use write_support::{pattern, stack_garage};

fn mount(test: &str) -> Mounted {
    Mounted::start(&stack_garage(), test, MountSettings::default())
}

#[test]
fn create_overwrite_and_store() {
    let mut m = mount("create");
    std::fs::write(m.path("a.txt"), b"first version\n").unwrap();
    assert_eq!(m.object("a.txt").unwrap(), b"first version\n");

    std::fs::write(m.path("a.txt"), b"second\n").unwrap();
    assert_eq!(std::fs::read(m.path("a.txt")).unwrap(), b"second\n");
    assert_eq!(m.object("a.txt").unwrap(), b"second\n");

    // An empty file is an empty object.
    std::fs::File::create(m.path("empty")).unwrap();
    assert_eq!(m.object("empty").unwrap(), b"");

    m.remount();
    assert_eq!(std::fs::read(m.path("a.txt")).unwrap(), b"second\n");
    std::fs::remove_file(m.path("a.txt")).unwrap();
    assert!(m.object("a.txt").is_none());
    assert!(!m.path("a.txt").exists());
}

#[test]
fn append_not_dropped() {
    let mut m = mount("append");
    let log = m.path("log.txt");
    let dir = m.path("");
    sh(&dir, "echo hello1 > log.txt; echo hello2 >> log.txt");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello1\nhello2\n");
    sh(&dir, "for i in 1 2 3; do echo n$i >> log.txt; done");
    m.remount();
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello1\nhello2\nn1\nn2\nn3\n");
    assert_eq!(m.object("log.txt").unwrap(), b"hello1\nhello2\nn1\nn2\nn3\n");
}

#[test]
fn partial_overwrite_keeps_tail() {
    let mut m = mount("partial");
    let mut expected = pattern(3 << 20, 5);
    std::fs::write(m.path("r"), &expected).unwrap();
    m.remount();

    let file = OpenOptions::new().write(true).open(m.path("r")).unwrap();
    file.write_all_at(b"XYZ", 1 << 20).unwrap();
    drop(file);
    expected[1 << 20..(1 << 20) + 3].copy_from_slice(b"XYZ");

    assert!(std::fs::read(m.path("r")).unwrap() == expected, "content differs before remount");
    assert!(m.object("r").unwrap() == expected, "stored object differs");
    m.remount();
    assert!(std::fs::read(m.path("r")).unwrap() == expected, "content differs after remount");
}

#[test]
fn fsync_makes_each_write_durable() {
    let m = mount("fsync");
    let dir = m.path("");
    sh(&dir, "dd if=/dev/zero of=t.img bs=4096 count=50 oflag=dsync status=none");
    assert_eq!(std::fs::metadata(m.path("t.img")).unwrap().len(), 204_800);
    assert_eq!(m.object("t.img").unwrap().len(), 204_800);

    let mut file = OpenOptions::new().create(true).write(true).truncate(true).open(m.path("f.bin")).unwrap();
    let mut expected = Vec::new();
    for i in 0..20 {
        let line = format!("{i:05}\n");
        file.write_all(line.as_bytes()).unwrap();
        file.sync_all().unwrap();
        expected.extend_from_slice(line.as_bytes());
        assert_eq!(m.object("f.bin").unwrap(), expected, "after fsync {i}");
    }
    drop(file);
    assert_eq!(std::fs::read_to_string(m.path("f.bin")).unwrap().lines().count(), 20);
}

#[test]
fn truncate_sparse_and_random_writes() {
    let mut m = mount("sparse");
    let path = m.path("s.bin");

    let mut file = OpenOptions::new().create(true).read(true).write(true).truncate(true).open(&path).unwrap();
    file.write_all(b"head").unwrap();
    file.write_all_at(b"tail", 10_000).unwrap();
    file.write_all_at(b"mid", 5_000).unwrap();

    // A read while the file is open for writing returns every acknowledged write.
    let mut reader = std::fs::File::open(&path).unwrap();
    let mut seen = Vec::new();
    reader.read_to_end(&mut seen).unwrap();
    assert_eq!(seen.len(), 10_004);
    assert_eq!(&seen[..4], b"head");
    assert!(seen[4..5_000].iter().all(|b| *b == 0), "hole before mid is not zero");
    assert_eq!(&seen[5_000..5_003], b"mid");
    assert_eq!(&seen[10_000..], b"tail");
    drop(reader);

    file.set_len(6_000).unwrap(); // ftruncate
    file.set_len(7_000).unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    drop(file);

    let mut expected = vec![0u8; 7_000];
    expected[..4].copy_from_slice(b"head");
    expected[5_000..5_003].copy_from_slice(b"mid");
    m.remount();
    assert_eq!(std::fs::read(&path).unwrap(), expected);

    // truncate(2) without an open handle, then O_TRUNC.
    sh(&m.path(""), "truncate -s 4 s.bin");
    assert_eq!(std::fs::read(&path).unwrap(), b"head");
    assert_eq!(m.object("s.bin").unwrap(), b"head");
    OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    assert_eq!(m.object("s.bin").unwrap(), b"");
}

#[test]
fn symlink_after_remount() {
    let mut m = mount("symlink");
    let dir = m.path("");
    sh(&dir, "mkdir data; echo inside > data/f; ln -s data link; ln -s '../x y/%z' link2");
    assert_eq!(sh(&dir, "readlink link link2"), "data\n../x y/%z\n");
    m.remount();
    assert_eq!(sh(&dir, "readlink link link2"), "data\n../x y/%z\n");
    assert_eq!(sh(&dir, "stat -c '%F %s' link"), "symbolic link 4\n");
    assert_eq!(sh(&dir, "ls link/"), "f\n");
    assert_eq!(m.object("link2").unwrap(), b"../x y/%z");
}

#[test]
fn mkdir_rmdir_and_markers() {
    let m = mount("mkdir");
    let dir = m.path("");
    sh(&dir, "mkdir empty full; echo x > full/f");
    // object_store lists the marker `empty/` as `empty`.
    assert_eq!(m.keys("empty"), vec!["empty".to_string()]);
    assert_eq!(sh(&dir, "ls -1"), "empty\nfull\n");

    let err = std::fs::remove_dir(m.path("full")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    sh(&dir, "rmdir empty; rm full/f; rmdir full");
    assert_eq!(sh(&dir, "ls -1"), "");
    assert!(m.keys("").is_empty(), "{:?}", m.keys(""));
}

#[test]
fn rename_files_dirs_and_open_files() {
    let mut m = mount("rename");
    let dir = m.path("");
    sh(&dir, "mkdir -p d/sub; echo a > d/a; echo b > d/sub/b; echo old > target; echo src > src");

    sh(&dir, "mv src target");
    assert_eq!(m.object("target").unwrap(), b"src\n");
    assert!(m.object("src").is_none());

    sh(&dir, "mv d e");
    assert_eq!(sh(&dir, "cat e/a e/sub/b"), "a\nb\n");
    assert!(m.keys("d/").is_empty(), "{:?}", m.keys(""));
    assert_eq!(m.object("e/sub/b").unwrap(), b"b\n");

    // A file renamed while open keeps its handle; later writes land under the new name.
    let mut file = std::fs::File::create(m.path("open.txt")).unwrap();
    file.write_all(b"before ").unwrap();
    std::fs::rename(m.path("open.txt"), m.path("renamed.txt")).unwrap();
    file.write_all(b"after").unwrap();
    drop(file);
    assert_eq!(std::fs::read(m.path("renamed.txt")).unwrap(), b"before after");
    assert_eq!(m.object("renamed.txt").unwrap(), b"before after");
    assert!(m.object("open.txt").is_none());
    m.remount();
    assert_eq!(sh(&dir, "ls -1"), "e\nrenamed.txt\ntarget\n");
}

#[test]
fn hard_link_rejected() {
    let m = mount("link");
    std::fs::write(m.path("a"), b"a").unwrap();
    let err = std::fs::hard_link(m.path("a"), m.path("b")).unwrap_err();
    let errno = err.raw_os_error().unwrap();
    assert!(errno == libc::EPERM || errno == libc::EOPNOTSUPP, "unexpected errno {errno}");
    assert!(!m.path("b").exists());
}

#[test]
fn metadata_persisted_and_defaulted() {
    let mut m = mount("meta");
    let path = m.path("f");
    std::fs::write(&path, b"x").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o751)).unwrap();
    std::os::unix::fs::chown(&path, Some(1234), Some(567)).unwrap();
    sh(&m.path(""), "touch -m -d @1000000000 f");

    m.remount();
    let stat = std::fs::metadata(&path).unwrap();
    assert_eq!(stat.mode() & 0o7777, 0o751);
    assert_eq!((stat.uid(), stat.gid()), (1234, 567));
    assert_eq!(stat.mtime(), 1_000_000_000);
    let stored = m.store_meta("f");
    assert_eq!(stored.mode, Some(0o100751));
    assert_eq!(stored.mtime, Some(UNIX_EPOCH + Duration::from_secs(1_000_000_000)));
    assert_eq!(std::fs::read(&path).unwrap(), b"x");

    // Appending sets the mtime again.
    sh(&m.path(""), "echo more >> f");
    let now = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let mtime = std::fs::metadata(&path).unwrap().mtime();
    assert!((now - 60..=now + 1).contains(&mtime), "mtime {mtime} not updated by a write (now {now})");
    m.remount();
    assert_eq!(std::fs::metadata(&path).unwrap().mtime(), mtime);
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o751);

    // An object written by another tool shows the space's defaults.
    m.put_object("foreign.txt", b"from s3");
    let stat = std::fs::metadata(m.path("foreign.txt")).unwrap();
    assert_eq!(stat.mode() & 0o7777, 0o644);
    assert_eq!((stat.uid(), stat.gid()), (0, 0));
}

#[test]
fn cp_p_preserves_mtime() {
    let mut m = mount("cpp");
    let source = m.root.path().join("old");
    std::fs::write(&source, b"x\n").unwrap();
    sh(m.root.path(), "touch -d '2001-02-03 04:05:06 UTC' old");
    sh(m.root.path(), &format!("cp -p old '{}'", m.path("old").display()));
    assert_eq!(std::fs::metadata(m.path("old")).unwrap().mtime(), 981_173_106);
    m.remount();
    assert_eq!(std::fs::metadata(m.path("old")).unwrap().mtime(), 981_173_106);
    sh(&m.path(""), "touch -m -d @1000000000 old");
    m.remount();
    assert_eq!(std::fs::metadata(m.path("old")).unwrap().mtime(), 1_000_000_000);
}

#[test]
fn user_xattrs_persisted() {
    write_support::mount::require_tool("setfattr");
    let mut m = mount("xattr");
    let dir = m.path("");
    sh(&dir, "echo x > f; mkdir d");
    // Samba stores DOS attributes as a binary user.DOSATTRIB value.
    sh(&dir, "setfattr -n user.DOSATTRIB -v 0x00000400040000000000000000 f; \
              setfattr -n user.note -v 'hello world' f; setfattr -n user.DOSATTRIB -v 0x0010 d");
    let file = std::fs::File::options().write(true).open(m.path("f")).unwrap();
    drop(file);

    m.remount();
    assert_eq!(sh(&dir, "getfattr --only-values -n user.note f"), "hello world");
    assert_eq!(sh(&dir, "getfattr -e hex -n user.DOSATTRIB f | grep ^user"), "user.DOSATTRIB=0x00000400040000000000000000\n");
    assert_eq!(sh(&dir, "getfattr -e hex -n user.DOSATTRIB d | grep ^user"), "user.DOSATTRIB=0x0010\n");
    assert_eq!(sh(&dir, "getfattr --absolute-names -d -m - f | grep -c '^user\\.'"), "2\n");
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"x\n");

    sh(&dir, "setfattr -x user.note f");
    let (code, _, stderr) = write_support::mount::sh_status(&dir, "getfattr -n user.note f");
    assert_ne!(code, 0);
    assert!(stderr.contains("No such attribute"), "{stderr}");
    let (code, _, stderr) = write_support::mount::sh_status(&dir, "setfattr -n trusted.x -v 1 f");
    assert_ne!(code, 0);
    assert!(stderr.contains("not supported"), "{stderr}");

    // Attributes set while the file is open go out with its upload.
    let mut open = std::fs::File::create(m.path("g")).unwrap();
    sh(&dir, "setfattr -n user.open -v yes g");
    open.write_all(b"content").unwrap();
    drop(open);
    m.remount();
    assert_eq!(sh(&dir, "getfattr --only-values -n user.open g"), "yes");
    assert_eq!(std::fs::read(m.path("g")).unwrap(), b"content");
}
