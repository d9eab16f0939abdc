//! Streamed multipart uploads on a real kernel mount over Garage: whole parts of a file
//! written from offset 0 onwards go to the store while it is open, and `close` sends the
//! tail. Needs the service stack (`scripts/stack.sh up`).

mod write_support;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use write_support::mount::{Mounted, MountSettings};
use write_support::{pattern, stack_garage, PrivateGarage};

const MIB: usize = 1 << 20;

/// Larger than two parts of the default 16 MiB, so two parts stream before `close`.
const STREAMED_BYTES: usize = 40 * MIB;

/// Runs the tests of this file one at a time. A child process that another test starts
/// (a mount, the garage CLI) inherits and closes the descriptors of this process, and
/// every close of a file on the mount is a FUSE flush, which would upload an open file.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls until `check` returns true or `timeout` has passed.
fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// Writes `data` in 1 MiB `write` calls, as `cp` and the benchmark do.
fn write_in_mib_chunks(file: &mut File, data: &[u8]) {
    for chunk in data.chunks(MIB) {
        file.write_all(chunk).unwrap();
    }
}

/// Waits until the mount has started a multipart upload for the open file.
fn assert_streaming(m: &Mounted) {
    let started = wait_until(Duration::from_secs(20), || m.garage.multipart_uploads(&m.bucket) == 1);
    assert!(started, "no multipart upload while the file is open; log:\n{}", m.log());
}

/// Waits until no multipart upload is left; aborts run in the background.
fn assert_no_unfinished_uploads(m: &Mounted, timeout: Duration) {
    let cleaned = wait_until(timeout, || m.garage.multipart_uploads(&m.bucket) == 0);
    let left = m.garage.multipart_uploads(&m.bucket);
    assert!(cleaned, "{left} unfinished multipart uploads left; log:\n{}", m.log());
}

#[test]
fn sequential_write_streams_parts() {
    let _serial = serial();
    let m = Mounted::start(&stack_garage(), "stream-seq", MountSettings::default());
    let data = pattern(STREAMED_BYTES, 21);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(m.path("seq.bin")).unwrap();
    file.set_permissions(std::fs::Permissions::from_mode(0o640)).unwrap();

    write_in_mib_chunks(&mut file, &data);
    assert_streaming(&m);
    assert!(m.object("seq.bin").is_none(), "object visible before close");

    drop(file);
    assert!(m.object("seq.bin").unwrap() == data, "streamed object differs from the written bytes");
    let meta = m.store_meta("seq.bin");
    assert_eq!(meta.mode, Some(libc::S_IFREG | 0o640));
    assert_eq!(meta.uid, Some(unsafe { libc::getuid() }));
    assert_eq!(meta.gid, Some(unsafe { libc::getgid() }));
    assert_no_unfinished_uploads(&m, Duration::from_secs(20));
    assert!(std::fs::read(m.path("seq.bin")).unwrap() == data);
}

#[test]
fn metadata_changed_mid_stream_kept() {
    let _serial = serial();
    let m = Mounted::start(&stack_garage(), "stream-meta", MountSettings::default());
    let data = pattern(STREAMED_BYTES, 22);
    let mut file = File::create(m.path("meta.bin")).unwrap();
    write_in_mib_chunks(&mut file, &data);
    assert_streaming(&m);

    // CreateMultipartUpload already fixed the old metadata, so close must not use it.
    let mtime = UNIX_EPOCH + Duration::from_secs(1_234_567_890);
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).unwrap();
    file.set_modified(mtime).unwrap();
    drop(file);

    assert!(m.object("meta.bin").unwrap() == data, "object differs from the written bytes");
    let meta = m.store_meta("meta.bin");
    assert_eq!(meta.mode, Some(libc::S_IFREG | 0o600), "chmod during the stream lost");
    assert_eq!(meta.mtime, Some(mtime), "utimens during the stream lost");
    assert_no_unfinished_uploads(&m, Duration::from_secs(20));
}

#[test]
fn backwards_write_after_streamed_parts() {
    let _serial = serial();
    let m = Mounted::start(&stack_garage(), "stream-back", MountSettings::default());
    let mut expected = pattern(STREAMED_BYTES + 5 * MIB, 23);
    let mut file = File::create(m.path("back.bin")).unwrap();
    write_in_mib_chunks(&mut file, &expected[..STREAMED_BYTES]);
    assert_streaming(&m);

    // A header fixed up after the data, as many solvers and archivers do.
    file.write_all_at(b"HEADER", 100).unwrap();
    expected[100..106].copy_from_slice(b"HEADER");
    write_in_mib_chunks(&mut file, &expected[STREAMED_BYTES..]);
    drop(file);

    assert!(m.object("back.bin").unwrap() == expected, "object misses the backwards write");
    assert_no_unfinished_uploads(&m, Duration::from_secs(20));
}

#[test]
fn unlink_during_streamed_write() {
    let _serial = serial();
    let m = Mounted::start(&stack_garage(), "stream-unlink", MountSettings::default());
    let data = pattern(STREAMED_BYTES, 24);
    let mut file = File::create(m.path("gone.bin")).unwrap();
    write_in_mib_chunks(&mut file, &data);
    assert_streaming(&m);

    std::fs::remove_file(m.path("gone.bin")).unwrap();
    write_in_mib_chunks(&mut file, &data[..2 * MIB]);
    drop(file);

    assert!(m.object("gone.bin").is_none(), "unlinked file resurrected");
    assert_eq!(m.keys(""), Vec::<String>::new());
    assert_no_unfinished_uploads(&m, Duration::from_secs(20));
}

/// Garage stops while parts stream: `fsync` reports the failure, the multipart upload is
/// aborted once Garage is back, and the next `close` stores the whole file.
#[test]
fn garage_stopped_fails_streamed_fsync() {
    let _serial = serial();
    let garage = PrivateGarage::start("stream-outage");
    let m = Mounted::start(&garage.garage, "stream-outage", MountSettings::default());
    let restart = garage.prepare_restart();
    let data = pattern(STREAMED_BYTES + 8 * MIB, 25);
    let mut file = File::create(m.path("outage.bin")).unwrap();
    write_in_mib_chunks(&mut file, &data[..STREAMED_BYTES]);
    assert_streaming(&m);

    garage.stop();
    write_in_mib_chunks(&mut file, &data[STREAMED_BYTES..]);
    let err = file.sync_all().expect_err("fsync reported success while the store was down");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // The abort waits for the parts still retrying, so it may need a few attempts.
    restart.run();
    assert_no_unfinished_uploads(&m, Duration::from_secs(60));
    drop(file);
    assert!(m.object("outage.bin").unwrap() == data, "dirty data lost after a failed fsync");
    assert_no_unfinished_uploads(&m, Duration::from_secs(20));
}
