//! Durability on a real kernel mount over Garage: the write-back journal across kill -9
//! and unmount, Garage stopped during uploads, a full cache disk and an interrupted
//! copy. Needs the service stack (`scripts/stack.sh up`).

mod write_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use write_support::mount::{sh, sh_status, Mounted, MountSettings};
use write_support::{pattern, stack_garage, PrivateGarage};

fn write_back(delay: &str) -> MountSettings {
    MountSettings {
        cache_toml: format!("metadata_ttl = \"1s\"\nwrite_back_delay = \"{delay}\"\n"),
        cache_dir: None,
    }
}

/// Polls until `check` returns true or `timeout` has passed.
fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    check()
}

#[test]
fn kill9_replays_write_back_journal() {
    let mut m = Mounted::start(&stack_garage(), "kill9", write_back("1h"));
    let big = pattern(20 << 20, 11);
    std::fs::write(m.path("small.txt"), b"acknowledged\n").unwrap();
    std::fs::write(m.path("big.bin"), &big).unwrap();
    std::fs::write(m.path("renamed-before"), b"moved\n").unwrap();
    std::fs::rename(m.path("renamed-before"), m.path("renamed-after")).unwrap();
    std::fs::write(m.path("deleted"), b"gone\n").unwrap();
    std::fs::remove_file(m.path("deleted")).unwrap();

    // Nothing is uploaded during the delay, but the mount shows the new files.
    assert!(m.object("small.txt").is_none());
    assert_eq!(std::fs::read(m.path("small.txt")).unwrap(), b"acknowledged\n");
    assert_eq!(sh(&m.path(""), "ls -1"), "big.bin\nrenamed-after\nsmall.txt\n");

    m.kill9();
    m.mount();

    let uploaded = wait_until(Duration::from_secs(60), || {
        m.object("small.txt").is_some() && m.object("big.bin").is_some() && m.object("renamed-after").is_some()
    });
    assert!(uploaded, "journal not replayed; keys {:?}; log:\n{}", m.keys(""), m.log());
    assert_eq!(m.object("small.txt").unwrap(), b"acknowledged\n");
    assert!(m.object("big.bin").unwrap() == big, "big.bin differs");
    assert_eq!(m.object("renamed-after").unwrap(), b"moved\n");
    assert_eq!(m.keys(""), vec!["big.bin", "renamed-after", "small.txt"], "a renamed or deleted file was resurrected");
    assert_eq!(m.unfinished_uploads(), 0);
    assert_eq!(std::fs::read(m.path("small.txt")).unwrap(), b"acknowledged\n");
}

#[test]
fn unmount_waits_for_pending_uploads() {
    let mut m = Mounted::start(&stack_garage(), "unmount", write_back("300s"));
    let data = pattern(10 << 20, 2);
    std::fs::write(m.root.path().join("p"), &data).unwrap();
    sh(m.root.path(), &format!("cp p '{}'", m.path("p").display()));
    assert!(m.object("p").is_none(), "uploaded before the delay");

    m.unmount();
    assert!(m.object("p").unwrap() == data, "pending upload lost at unmount");
    assert!(m.log().contains("waiting for pending uploads") || m.log().contains("write-back upload done"), "{}", m.log());
    m.mount();
    assert!(std::fs::read(m.path("p")).unwrap() == data);
}

/// Garage stops while files are written: write-back uploads retry until it is back, and
/// a direct upload (no write-back) retries within the store client's retry window.
#[test]
fn garage_stopped_during_uploads() {
    let garage = PrivateGarage::start("write-outage");
    let mut m = Mounted::start(&garage.garage, "stopped", write_back("10s"));
    std::fs::write(m.path("before.txt"), b"up\n").unwrap();
    assert!(wait_until(Duration::from_secs(20), || m.object("before.txt").is_some()));

    // Closed while Garage is up (a create needs a lookup), uploaded after it stopped.
    let data = pattern(3 << 20, 8);
    std::fs::write(m.path("during.bin"), &data).unwrap();
    garage.stop();
    let retried = wait_until(Duration::from_secs(60), || m.log().contains("write-back upload failed; will retry"));
    assert!(retried, "no retry logged:\n{}", m.log());

    garage.restart();
    let uploaded = wait_until(Duration::from_secs(90), || m.object("during.bin").is_some());
    assert!(uploaded, "upload did not resume after Garage came back; log:\n{}", m.log());
    assert!(m.object("during.bin").unwrap() == data);
    m.unmount();

    // Without write-back, a close while Garage is down reports the failure, and the
    // dirty data is kept and uploaded at unmount once Garage is back.
    let mut direct = Mounted::start(&garage.garage, "direct", MountSettings::default());
    let data = pattern(1 << 20, 9);
    let mut file = std::fs::File::create(direct.path("direct.bin")).unwrap();
    std::io::Write::write_all(&mut file, &data).unwrap();
    garage.stop();
    let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
    // SAFETY: closes the descriptor this test owns, once.
    let rc = unsafe { libc::close(fd) };
    assert_eq!(rc, -1, "close reported success while the store was down");
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EIO));

    garage.restart();
    direct.unmount();
    assert!(direct.object("direct.bin").unwrap() == data, "dirty data lost after a failed close");
}

/// A cache directory on a small tmpfs that is unmounted on drop.
struct SmallTmpfs(std::path::PathBuf);

impl SmallTmpfs {
    fn mount(dir: std::path::PathBuf, size: &str) -> SmallTmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&dir).status().unwrap();
        assert!(status.success(), "cannot mount a tmpfs at {} (the test runs as root)", dir.display());
        SmallTmpfs(dir)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_cache_disk_gives_enospc() {
    let scratch = tempfile::tempdir().unwrap();
    // 64 MiB of the 80 MiB must stay free, so about 16 MiB can be staged.
    let tmpfs = SmallTmpfs::mount(scratch.path().join("cache"), "80m");
    let settings = MountSettings { cache_dir: Some(tmpfs.0.clone()), ..MountSettings::default() };
    let m = Mounted::start(&stack_garage(), "enospc", settings);

    std::fs::write(m.path("small"), pattern(1 << 20, 1)).unwrap();
    assert!(m.object("small").unwrap() == pattern(1 << 20, 1));

    let source = scratch.path().join("big");
    std::fs::write(&source, pattern(40 << 20, 4)).unwrap();
    let (code, _, stderr) = sh_status(scratch.path(), &format!("mv big '{}'", m.path("big").display()));
    if code == 0 {
        // Allowed only if the object is complete.
        assert!(m.object("big").unwrap() == pattern(40 << 20, 4), "mv succeeded but the object is incomplete");
    } else {
        assert!(stderr.contains("No space left"), "unexpected error: {stderr}");
        assert!(std::fs::read(&source).unwrap() == pattern(40 << 20, 4), "mv lost the source");
        let object = m.object("big");
        assert!(!matches!(&object, Some(o) if o.len() >= 40 << 20), "a failed mv left a complete-looking object");
    }
    assert_eq!(m.unfinished_uploads(), 0);

    // Space is back once the failed file is gone.
    let _ = std::fs::remove_file(m.path("big"));
    std::fs::write(m.path("after"), b"ok").unwrap();
    assert_eq!(m.object("after").unwrap(), b"ok");
}

/// A copy killed midway leaves exactly the bytes written before, and no multipart
/// upload behind.
#[test]
fn interrupted_copy_keeps_prefix() {
    let mut m = Mounted::start(&stack_garage(), "interrupt", MountSettings::default());
    let source = pattern(64 << 20, 6);
    std::fs::write(m.root.path().join("src"), &source).unwrap();

    // After 24 chunks the copy stalls, so the interrupt lands mid-transfer however
    // slowly this test thread reads the progress lines on a loaded machine.
    // SIGINT is restored to its default action: a test run started from a background
    // shell inherits it ignored, and the interrupt would then be lost.
    let script = "import signal, sys, time\nsignal.signal(signal.SIGINT, signal.SIG_DFL)\n\
                  src = open(sys.argv[1], 'rb'); dst = open(sys.argv[2], 'wb')\nn = 0\n\
                  while True:\n    chunk = src.read(1 << 20)\n    if not chunk: break\n    dst.write(chunk); dst.flush(); n += 1\n    print('chunk', flush=True)\n    time.sleep(0.05 if n < 24 else 60)\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(m.root.path().join("src"))
        .arg(m.path("5g"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..24 {
        lines.next().unwrap().unwrap();
    }
    // SAFETY: plain kill(2) on the child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();

    let size = std::fs::metadata(m.path("5g")).unwrap().len() as usize;
    assert!((24 << 20..64 << 20).contains(&size), "size {size}");
    assert_eq!(size % (1 << 20), 0, "a partial chunk was kept");
    let content = std::fs::read(m.path("5g")).unwrap();
    assert_eq!(content.len(), size);
    assert!(content[..] == source[..size], "content is not a prefix of the source");
    assert_eq!(m.unfinished_uploads(), 0);

    m.remount();
    assert_eq!(std::fs::metadata(m.path("5g")).unwrap().len() as usize, size);
}

/// Metadata changes made during the write-back delay reach the store with the content.
#[test]
fn write_back_keeps_metadata_changes() {
    let mut m = Mounted::start(&stack_garage(), "wbmeta", write_back("1h"));
    let work = m.root.path().to_path_buf();
    sh(&work, "echo old > src; touch -d '2001-02-03 04:05:06 UTC' src");
    sh(&work, &format!("cp -p src '{}'", m.path("copy").display()));
    sh(&m.path(""), "chmod 600 copy; setfattr -n user.tag -v v1 copy; mv copy moved; echo n > fresh; rm fresh");
    assert_eq!(sh(&m.path(""), "stat -c '%a %Y' moved"), "600 981173106\n");
    assert!(m.keys("").is_empty(), "uploaded during the delay: {:?}", m.keys(""));

    m.unmount();
    assert_eq!(m.keys(""), vec!["moved"]);
    assert_eq!(m.object("moved").unwrap(), b"old\n");
    let meta = m.store_meta("moved");
    assert_eq!(meta.mode, Some(0o100600));
    assert_eq!(meta.mtime, Some(std::time::UNIX_EPOCH + Duration::from_secs(981_173_106)));
    assert_eq!(meta.xattrs.get("user.tag").map(Vec::as_slice), Some(&b"v1"[..]));
}
