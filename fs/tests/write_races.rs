//! Kernel-mount tests of opens, truncations and closes that interleave on one inode.
//!
//! The kernel sends RELEASE after `close` returned. Without `FUSE_ATOMIC_O_TRUNC` it
//! sends the truncation of `open(O_TRUNC)` as a SETATTR without a file handle. So both
//! can arrive while another handle of the same file is opened or truncated.
//! Needs the service stack (`scripts/stack.sh up`, then `source $RUN/env.sh`).

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{Garage, Mounted};

const ROUNDS: usize = 200;

fn s3_and_local(garage: &Garage, bucket: &str) -> String {
    format!("{}\n[spaces.local]\nurl = \"file://{{dir}}/local\"\n", garage.space_toml("s3", bucket, None))
}

/// Writes, appends, reads, overwrites with `O_TRUNC` and reads again, `ROUNDS` times.
fn write_append_truncate(mount: &Mounted, space: &str) {
    let path = mount.path(&format!("{space}/w.txt"));
    for round in 0..ROUNDS {
        fs::write(&path, "hello1\n").unwrap();
        OpenOptions::new().append(true).open(&path).unwrap().write_all(b"hello2\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello1\nhello2\n", "{space} append, round {round}");
        fs::write(&path, "short\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"short\n", "{space} O_TRUNC, round {round}");
    }
}

/// Opens the file with `O_TRUNC` and checks that it is empty, while another thread
/// opens and closes other handles of the same file without writing to them.
fn truncate_while_others_close(mount: &Mounted, space: &str) {
    let path = mount.path(&format!("{space}/t.txt"));
    fs::write(&path, "0123456789abcdef\n").unwrap();
    let done = Arc::new(AtomicBool::new(false));

    let closer = {
        let path = path.clone();
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut opened = 0u64;
            while !done.load(Ordering::SeqCst) {
                drop(OpenOptions::new().write(true).open(&path).unwrap());
                let mut reader = OpenOptions::new().read(true).open(&path).unwrap();
                let mut sink = Vec::new();
                reader.read_to_end(&mut sink).unwrap();
                drop(reader);
                opened += 2;
            }
            opened
        })
    };

    for round in 0..ROUNDS {
        let mut file = OpenOptions::new().read(true).write(true).truncate(true).open(&path).unwrap();
        let mut seen = Vec::new();
        file.read_to_end(&mut seen).unwrap();
        assert_eq!(seen, b"", "{space}: content right after open(O_TRUNC), round {round}");
        file.write_all(b"short\n").unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        seen.clear();
        file.read_to_end(&mut seen).unwrap();
        assert_eq!(seen, b"short\n", "{space}: content written after open(O_TRUNC), round {round}");
        drop(file);
        assert_eq!(fs::read(&path).unwrap(), b"short\n", "{space}: content after close, round {round}");

        // Longer content again, so that a missed truncation leaves a tail.
        fs::write(&path, "0123456789abcdef\n").unwrap();
    }

    done.store(true, Ordering::SeqCst);
    let opened = closer.join().unwrap();
    assert!(opened > 0, "the other thread opened no handle");
}

#[test]
fn append_then_truncate_round_trips() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("trunc-rounds");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    write_append_truncate(&mount, "local");
    write_append_truncate(&mount, "s3");
    assert_eq!(garage.bucket(&bucket).get("w.txt").as_deref(), Some(&b"short\n"[..]));
}

#[test]
fn truncating_open_races_other_closes() {
    let garage = Garage::from_env();
    let bucket = garage.fresh_bucket("trunc-race");
    let mount = Mounted::start(&s3_and_local(&garage, &bucket), "");

    truncate_while_others_close(&mount, "local");
    truncate_while_others_close(&mount, "s3");
}
