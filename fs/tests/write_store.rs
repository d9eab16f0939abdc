//! Uploads, metadata, staging files and the write-back journal against a real Garage,
//! one bucket per test. Needs the service stack (`scripts/stack.sh up`).

mod write_support;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use datanet::journal::{Journal, JournalSettings, JournalSpace};
use datanet::posix_meta::{read_meta, MetaTarget, PosixMeta, XattrSetMode, S_IFREG};
use datanet::staging::{BaseObject, Staging, StagingSettings};
use datanet::upload::{rename_object, rewrite_with_meta, upload_file, UploadSettings};
use datanet::{open_space, Space};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use write_support::{pattern, stack_garage, unique_bucket, Garage, PrivateGarage};

const MIB: usize = 1 << 20;

/// S3 needs parts of at least 5 MiB; these keep files small but multipart.
fn settings() -> UploadSettings {
    UploadSettings {
        multipart_threshold_bytes: 6 << 20,
        part_size_bytes: 5 << 20,
        max_concurrency: 3,
        copy_limit_bytes: 6 << 20,
    }
}

fn space_on(garage: &Garage, test: &str) -> (Space, String) {
    let bucket = unique_bucket(test);
    garage.create_bucket(&bucket);
    (open_space(&garage.space_config(&bucket)).unwrap(), bucket)
}

fn file_with(content: &[u8]) -> Arc<std::fs::File> {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(content).unwrap();
    Arc::new(file)
}

async fn stored(space: &Space, path: &str) -> Option<Vec<u8>> {
    let result = space.store.get(&ObjectPath::parse(path).unwrap()).await.ok()?;
    Some(result.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn garage_multipart_upload_keeps_metadata() {
    let garage = stack_garage();
    let (space, bucket) = space_on(&garage, "multipart");
    let mut meta = PosixMeta {
        mode: Some(S_IFREG | 0o640),
        uid: Some(1234),
        gid: Some(56),
        mtime: Some(UNIX_EPOCH + Duration::new(981_173_106, 250)),
        ..PosixMeta::default()
    };
    meta.set_xattr("user.DOSATTRIB", b"0x20\0\x04\0\x04\0\0", XattrSetMode::Any).unwrap();

    for (name, len) in [("small", 1000), ("large", 13 * MIB)] {
        let data = pattern(len, 3);
        let path = ObjectPath::parse(format!("dir/{name} file+%.bin")).unwrap();
        upload_file(&space, &MetaTarget::ObjectAttributes, &path, file_with(&data), len as u64, &meta, &settings())
            .await
            .unwrap();
        assert_eq!(stored(&space, path.as_ref()).await.unwrap(), data, "{name}");
        let (object, read) = read_meta(&space, &MetaTarget::ObjectAttributes, &path).await.unwrap();
        assert_eq!(object.size, len as u64);
        assert_eq!(read, meta, "{name}");
    }
    assert_eq!(garage.unfinished_uploads(&bucket), 0);
}

#[tokio::test]
async fn garage_failed_upload_is_aborted() {
    let garage = stack_garage();
    let (space, bucket) = space_on(&garage, "aborted");
    let path = ObjectPath::from("broken");
    // The file has 7 MiB but 12 MiB are requested: the second part's read fails after
    // the first part went up.
    let err = upload_file(
        &space,
        &MetaTarget::ObjectAttributes,
        &path,
        file_with(&pattern(7 * MIB, 1)),
        12 * MIB as u64,
        &PosixMeta::default(),
        &settings(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("staging file"), "{err}");
    assert!(stored(&space, "broken").await.is_none());
    assert_eq!(garage.unfinished_uploads(&bucket), 0);
}

#[tokio::test]
async fn garage_rename_over_copy_limit() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let garage = stack_garage();
    let (space, bucket) = space_on(&garage, "rename");
    let meta = PosixMeta { mode: Some(S_IFREG | 0o600), ..PosixMeta::default() };
    let data = pattern(11 * MIB, 9);
    let from = ObjectPath::from("big");
    let to = ObjectPath::from("moved/big");
    upload_file(&space, &MetaTarget::ObjectAttributes, &from, file_with(&data), data.len() as u64, &meta, &settings())
        .await
        .unwrap();

    rename_object(&space, &from, &to, &settings()).await.unwrap();
    assert_eq!(stored(&space, "moved/big").await.unwrap(), data);
    assert!(stored(&space, "big").await.is_none());
    let (_, read) = read_meta(&space, &MetaTarget::ObjectAttributes, &to).await.unwrap();
    assert_eq!(read, meta);
    assert_eq!(garage.unfinished_uploads(&bucket), 0);

    // Below the limit the server-side copy keeps the metadata as well.
    let small = ObjectPath::from("small");
    upload_file(&space, &MetaTarget::ObjectAttributes, &small, file_with(b"s"), 1, &meta, &settings()).await.unwrap();
    rename_object(&space, &small, &ObjectPath::from("small2"), &settings()).await.unwrap();
    let (_, read) = read_meta(&space, &MetaTarget::ObjectAttributes, &ObjectPath::from("small2")).await.unwrap();
    assert_eq!(read, meta);
}

#[tokio::test]
async fn garage_metadata_rewrite_keeps_content() {
    let garage = stack_garage();
    let (space, _) = space_on(&garage, "rewrite");
    let path = ObjectPath::from("r");
    let data = pattern(8 * MIB, 4);
    upload_file(&space, &MetaTarget::ObjectAttributes, &path, file_with(&data), data.len() as u64, &PosixMeta::default(), &settings())
        .await
        .unwrap();
    let meta = PosixMeta { mtime: Some(UNIX_EPOCH + Duration::from_secs(1_000_000_000)), ..PosixMeta::default() };
    rewrite_with_meta(&space, &path, &meta, &settings()).await.unwrap();
    assert_eq!(stored(&space, "r").await.unwrap(), data);
    assert_eq!(read_meta(&space, &MetaTarget::ObjectAttributes, &path).await.unwrap().1, meta);
}

#[tokio::test]
async fn garage_partial_overwrite_keeps_tail() {
    let garage = stack_garage();
    let (space, _) = space_on(&garage, "partial");
    let original = pattern(3 * MIB, 7);
    let path = ObjectPath::from("r");
    let put = space.store.put(&path, original.clone().into()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let base = BaseObject { store: Arc::clone(&space.store), path: path.clone(), size: original.len() as u64, e_tag: put.e_tag };
    let staging = Staging::create(&StagingSettings { dir: dir.path().into(), min_free_bytes: 0 }, Some(base)).unwrap();
    staging.write(MIB as u64, b"XYZ").await.unwrap();
    let frozen = staging.freeze().await.unwrap();
    upload_file(&space, &MetaTarget::ObjectAttributes, &path, Arc::clone(&frozen.file), frozen.len, &PosixMeta::default(), &settings())
        .await
        .unwrap();

    let mut expected = original;
    expected[MIB..MIB + 3].copy_from_slice(b"XYZ");
    assert_eq!(stored(&space, "r").await.unwrap(), expected);
}

/// The journal keeps retrying while Garage is down and uploads once it is back.
#[tokio::test]
async fn garage_journal_retries_until_store_returns() {
    let private = PrivateGarage::start("journal-retry");
    let (space, _) = space_on(&private.garage, "journal");
    let dir = tempfile::tempdir().unwrap();

    let mut spaces = BTreeMap::new();
    spaces.insert("t".to_string(), JournalSpace { space: space.clone(), target: MetaTarget::ObjectAttributes });
    let mut journal_settings = JournalSettings::new(dir.path().join("journal"), Duration::ZERO);
    journal_settings.retry_min = Duration::from_millis(200);
    journal_settings.retry_max = Duration::from_secs(1);
    let mut upload = settings();
    upload.multipart_threshold_bytes = 64 << 20;
    let journal = Journal::open(journal_settings, spaces, upload).unwrap();

    private.stop();
    let staging = Staging::create(&StagingSettings { dir: dir.path().join("staging"), min_free_bytes: 0 }, None).unwrap();
    staging.write(0, b"written while the store was down").await.unwrap();
    let frozen = staging.freeze().await.unwrap();
    let meta = PosixMeta { mtime: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(7)), ..PosixMeta::default() };
    journal.record("t", &ObjectPath::from("down.txt"), &frozen, staging.path(), false, &meta).await.unwrap();
    drop(frozen);

    journal.spawn_uploader();
    assert_eq!(journal.flush(Duration::from_secs(3)).await, 1, "the upload cannot succeed while Garage is stopped");

    private.restart();
    assert_eq!(journal.flush(Duration::from_secs(60)).await, 0);
    assert_eq!(stored(&space, "down.txt").await.unwrap(), b"written while the store was down");
}

/// A closed file whose content waits in the write-back journal stays visible after the
/// kernel forgets its inode (memory space, no kernel mount needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_file_survives_forget() {
    use datanet::filesystem::{Caller, DatanetFs};
    use std::ffi::OsStr;

    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[spaces.m]\nurl = \"memory://\"\n[cache]\ndir = \"{}\"\nwrite_back_delay = \"1h\"\n",
        dir.path().display()
    );
    let config = datanet::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
    let fs = Arc::new(DatanetFs::new(&config).unwrap());
    fs.start_write_back();

    let space_root = fs.lookup(1, OsStr::new("m")).await.unwrap().ino;
    let caller = Caller { uid: 0, gid: 0 };
    let (attr, opened) = fs
        .create(space_root, OsStr::new("f"), 0o644, libc::O_WRONLY | libc::O_CREAT, caller)
        .await
        .unwrap();
    fs.write(opened.fh, 0, b"pending").await.unwrap();
    fs.flush(opened.fh).await.unwrap();
    fs.release(opened.fh).await.unwrap();
    fs.forget(attr.ino, 1);

    let found = fs.lookup(space_root, OsStr::new("f")).await.unwrap();
    assert_eq!(found.size, 7);
    assert_eq!(found.ino, attr.ino);
}

/// Objects above the copy limit are copied on the server with UploadPartCopy.
#[tokio::test]
async fn garage_part_copy_on_server() {
    use datanet::part_copy::{CopyRequest, PartCopyClient};

    let garage = stack_garage();
    let (space, bucket) = space_on(&garage, "partcopy");
    let data = pattern(12 * MIB, 5);
    let from = ObjectPath::parse("src dir/big+1%.bin").unwrap();
    let put = space.store.put(&from, data.clone().into()).await.unwrap();

    let mut user_meta = BTreeMap::new();
    user_meta.insert("mode".to_string(), "33152".to_string());
    let request = CopyRequest {
        from: from.as_ref(),
        to: "dst/copy.bin",
        size_bytes: data.len() as u64,
        e_tag: put.e_tag.as_deref(),
        user_meta,
        content_type: None,
    };
    PartCopyClient::for_space(&space.config).unwrap().copy(&request, 5 << 20, 2).await.unwrap();
    assert!(stored(&space, "dst/copy.bin").await.unwrap() == data, "copy differs");
    let (_, meta) = read_meta(&space, &MetaTarget::ObjectAttributes, &ObjectPath::parse("dst/copy.bin").unwrap()).await.unwrap();
    assert_eq!(meta.mode, Some(0o100600));
    assert_eq!(garage.unfinished_uploads(&bucket), 0);

    // A source that changed since its ETag was read fails the copy and leaves nothing.
    space.store.put(&from, pattern(12 * MIB, 6).into()).await.unwrap();
    let stale = CopyRequest { to: "dst/stale.bin", user_meta: BTreeMap::new(), ..request };
    assert!(PartCopyClient::for_space(&space.config).unwrap().copy(&stale, 5 << 20, 2).await.is_err());
    assert!(stored(&space, "dst/stale.bin").await.is_none());
    assert_eq!(garage.unfinished_uploads(&bucket), 0);
}
