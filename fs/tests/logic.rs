//! The filesystem logic without a kernel mount: [`DatanetFs`] driven directly, over an
//! in-memory space and a local directory space. No service is needed.

use std::ffi::OsStr;

use datanet::config::Config;
use datanet::filesystem::{Caller, DatanetFs, SetAttr};
use datanet::inode::{space_root_ino, Kind, ROOT_INO};

const ROOT_CALLER: Caller = Caller { uid: 0, gid: 0 };

/// Spaces sort by name: `local` is space 0, `mem` space 1, `ro` space 2.
fn filesystem(dir: &std::path::Path) -> DatanetFs {
    std::fs::create_dir_all(dir.join("local")).unwrap();
    let text = format!(
        "[spaces.local]\nurl = \"file://{0}/local\"\n[spaces.mem]\nurl = \"memory://\"\n\
         [spaces.ro]\nurl = \"memory://\"\nread_only = true\n[cache]\ndir = \"{0}/cache\"\nmetadata_ttl = \"1s\"\n",
        dir.display()
    );
    let config = Config::parse(&text, std::path::Path::new("logic.toml")).unwrap();
    DatanetFs::new(&config).unwrap()
}

fn name(text: &str) -> &OsStr {
    OsStr::new(text)
}

#[tokio::test]
async fn root_lists_spaces() {
    let dir = tempfile::tempdir().unwrap();
    let fs = filesystem(dir.path());
    let fh = fs.opendir(ROOT_INO).await.unwrap();
    let names: Vec<String> = fs.readdir(fh, 0).unwrap().into_iter().map(|(_, item)| item.name).collect();
    assert_eq!(names, vec![".", "..", "local", "mem", "ro"]);
    let attr = fs.lookup(ROOT_INO, name("mem")).await.unwrap();
    assert_eq!(attr.ino, space_root_ino(1));
    assert_eq!(fs.lookup(ROOT_INO, name("nope")).await.unwrap_err().errno, libc::ENOENT);
}

#[tokio::test]
async fn create_write_read_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let fs = filesystem(dir.path());
    for space in [0, 1] {
        let parent = space_root_ino(space);
        let (attr, opened) = fs
            .create(parent, name("a b+c.txt"), 0o640, libc::O_WRONLY | libc::O_CREAT, ROOT_CALLER)
            .await
            .unwrap();
        assert_eq!(attr.kind, Kind::File);
        assert_eq!(fs.write(opened.fh, 0, b"hello ").await.unwrap(), 6);
        assert_eq!(fs.write(opened.fh, 6, b"world").await.unwrap(), 5);

        let listed = fs.opendir(parent).await.unwrap();
        let names: Vec<String> = fs.readdir(listed, 2).unwrap().into_iter().map(|(_, item)| item.name).collect();
        assert_eq!(names, vec!["a b+c.txt"], "a file not yet uploaded is listed");

        fs.flush(opened.fh).await.unwrap();
        fs.release(opened.fh).await.unwrap();

        let found = fs.lookup(parent, name("a b+c.txt")).await.unwrap();
        assert_eq!(found.ino, attr.ino, "the inode stays while the kernel holds it");
        assert_eq!(found.size, 11);
        assert_eq!(found.perm, 0o640);
        let reading = fs.open(found.ino, libc::O_RDONLY).await.unwrap();
        assert_eq!(&fs.read(reading.fh, 0, 100).await.unwrap()[..], b"hello world");
        assert_eq!(&fs.read(reading.fh, 6, 3).await.unwrap()[..], b"wor");
        fs.release(reading.fh).await.unwrap();
    }
}

#[tokio::test]
async fn truncate_and_append() {
    let dir = tempfile::tempdir().unwrap();
    let fs = filesystem(dir.path());
    let parent = space_root_ino(0);
    let (attr, opened) = fs.create(parent, name("log"), 0o644, libc::O_WRONLY, ROOT_CALLER).await.unwrap();
    fs.write(opened.fh, 0, b"line1\n").await.unwrap();
    fs.release(opened.fh).await.unwrap();

    let appending = fs.open(attr.ino, libc::O_WRONLY | libc::O_APPEND).await.unwrap();
    fs.write(appending.fh, 0, b"line2\n").await.unwrap();
    fs.release(appending.fh).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("local/log")).unwrap(), b"line1\nline2\n");

    let change = SetAttr { size: Some(3), ..SetAttr::default() };
    assert_eq!(fs.setattr(attr.ino, None, change).await.unwrap().size, 3);
    assert_eq!(std::fs::read(dir.path().join("local/log")).unwrap(), b"lin");
}

#[tokio::test]
async fn directories_rename_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let fs = filesystem(dir.path());
    let parent = space_root_ino(0);
    let sub = fs.mkdir(parent, name("d"), 0o755).await.unwrap();
    assert_eq!(fs.mkdir(parent, name("d"), 0o755).await.unwrap_err().errno, libc::EEXIST);
    let (file, opened) = fs.create(sub.ino, name("f"), 0o644, libc::O_WRONLY, ROOT_CALLER).await.unwrap();
    fs.release(opened.fh).await.unwrap();
    assert_eq!(fs.rmdir(parent, name("d")).await.unwrap_err().errno, libc::ENOTEMPTY);

    fs.rename(parent, name("d"), parent, name("e"), 0).await.unwrap();
    assert_eq!(fs.lookup(parent, name("d")).await.unwrap_err().errno, libc::ENOENT);
    let moved = fs.lookup(parent, name("e")).await.unwrap();
    assert_eq!(moved.ino, sub.ino, "a renamed directory keeps its inode");
    assert_eq!(fs.lookup(moved.ino, name("f")).await.unwrap().ino, file.ino);

    fs.unlink(moved.ino, name("f")).await.unwrap();
    assert_eq!(fs.lookup(moved.ino, name("f")).await.unwrap_err().errno, libc::ENOENT);
    fs.rmdir(parent, name("e")).await.unwrap();
    assert!(!dir.path().join("local/e").exists());
}

#[tokio::test]
async fn invalid_names_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let fs = filesystem(dir.path());
    let long = "x".repeat(256);
    let err = fs.create(space_root_ino(1), name(&long), 0o644, libc::O_WRONLY, ROOT_CALLER).await.unwrap_err();
    assert_eq!(err.errno, libc::ENAMETOOLONG);
    let err = fs.create(space_root_ino(2), name("f"), 0o644, libc::O_WRONLY, ROOT_CALLER).await.unwrap_err();
    assert_eq!(err.errno, libc::EROFS);
    assert_eq!(fs.mkdir(space_root_ino(2), name("d"), 0o755).await.unwrap_err().errno, libc::EROFS);
    assert_eq!(fs.mkdir(ROOT_INO, name("space"), 0o755).await.unwrap_err().errno, libc::EACCES);
    let err = fs.rename(space_root_ino(0), name("a"), space_root_ino(1), name("a"), 0).await.unwrap_err();
    assert_eq!(err.errno, libc::EXDEV);
}

#[tokio::test]
async fn statfs_reports_name_max() {
    let dir = tempfile::tempdir().unwrap();
    let stat = filesystem(dir.path()).statfs();
    assert_eq!(stat.name_max, 255);
    assert!(stat.blocks > 0);
    assert!(stat.blocks_free > 0);
    assert!(stat.files_free > 0);
}

#[tokio::test]
async fn reader_outlives_concurrent_writer() {
    let dir = tempfile::tempdir().unwrap();
    let fs = filesystem(dir.path());
    let parent = space_root_ino(1);
    let (attr, writing) = fs.create(parent, name("shared"), 0o644, libc::O_RDWR, ROOT_CALLER).await.unwrap();
    fs.write(writing.fh, 0, b"written").await.unwrap();
    let reading = fs.open(attr.ino, libc::O_RDONLY).await.unwrap();
    assert_eq!(&fs.read(reading.fh, 0, 100).await.unwrap()[..], b"written", "reads see the unflushed write");

    fs.flush(writing.fh).await.unwrap();
    fs.release(writing.fh).await.unwrap();
    assert_eq!(&fs.read(reading.fh, 0, 100).await.unwrap()[..], b"written", "reads go on after the writer closed");
    fs.release(reading.fh).await.unwrap();
}
