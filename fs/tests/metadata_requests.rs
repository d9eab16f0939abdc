//! Store requests of a cold tree walk with `lstat` on every entry, as `find` does, and
//! the bounds and freshness of walk-ahead.
//!
//! The walks go through a counting proxy in front of Garage (from the service stack:
//! `scripts/stack.sh up`, then `source $RUN/env.sh`). Listings carry no user metadata,
//! so each file needs one HEAD; the background read-ahead after a listing and the
//! lookups of the walk must share it, not send it twice. Walk-ahead lists the
//! subdirectories of a directory the kernel opened before the kernel opens them.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::{runtime, Garage, Mounted};
use datanet::walkahead::{WALK_AHEAD_DIRS, WALK_AHEAD_LISTINGS, WALK_AHEAD_MAX_ENTRIES};
use object_store::{Attribute, Attributes, ObjectStore, PutOptions, PutPayload};

/// Walks `dir` depth first, reading every directory and calling `lstat` on each entry.
fn walk(dir: &std::path::Path, seen: &mut HashMap<String, std::fs::Metadata>, root: &std::path::Path) {
    for item in std::fs::read_dir(dir).unwrap_or_else(|err| panic!("read_dir {}: {err}", dir.display())) {
        let path = item.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap_or_else(|err| panic!("lstat {}: {err}", path.display()));
        let relative = path.strip_prefix(root).unwrap().to_string_lossy().to_string();
        if meta.is_dir() {
            walk(&path, seen, root);
        }
        seen.insert(relative, meta);
    }
}

/// Returns the `prefix` parameter of every LIST request of `bucket`, decoded.
fn listed_prefixes(requests: &[String], bucket: &str) -> Vec<String> {
    let start = format!("GET /{bucket}?");
    requests
        .iter()
        .filter(|r| r.starts_with(&start))
        .map(|r| {
            let query = r.split_whitespace().nth(1).unwrap_or_default();
            let prefix = query.split(['?', '&']).find_map(|p| p.strip_prefix("prefix=")).unwrap_or_default();
            prefix.replace("%2F", "/")
        })
        .collect()
}

/// Returns how many HEAD requests `requests` has for `key` of `bucket`.
fn heads_of(requests: &[String], bucket: &str, key: &str) -> usize {
    let line = format!("HEAD /{bucket}/{key} HTTP");
    requests.iter().filter(|r| r.starts_with(&line)).count()
}

/// Waits until `done` holds for the proxy's requests, for at most 20 s.
fn wait_for_requests(proxy: &FaultProxy, what: &str, done: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&proxy.requests()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; requests: {:#?}", proxy.requests());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Mounts `bucket_name` through a counting proxy with a 30 s TTL and reads the space
/// root, which starts walk-ahead below it. The proxy has recorded only the requests
/// sent after the mount. Fails unless the root contains `dirs` entries.
fn mount_and_read_root(garage: &Garage, bucket_name: &str, dirs: usize) -> (FaultProxy, Mounted, std::path::PathBuf) {
    let proxy = FaultProxy::start(&garage.endpoint);
    let spaces = garage.space_toml("s3", bucket_name, Some(&proxy.endpoint()));
    let mount = Mounted::start(&spaces, "metadata_ttl = \"30s\"\n");
    proxy.clear_requests();

    let root = mount.path("s3");
    let names: Vec<_> = std::fs::read_dir(&root).expect("read the space root").map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), dirs, "entries of the space root");
    (proxy, mount, root)
}

/// Stores `data` at `key` with s3fs-style `mode` and `uid` metadata.
fn put_with_meta(bucket: &common::Bucket, key: &str, data: &'static [u8], mode: u32, uid: u32) {
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::Metadata("mode".into()), mode.to_string().into());
    attributes.insert(Attribute::Metadata("uid".into()), uid.to_string().into());
    let options = PutOptions { attributes, ..PutOptions::default() };
    let path = object_store::path::Path::from(key);
    runtime()
        .block_on(bucket.space.store.put_opts(&path, PutPayload::from_static(data), options))
        .unwrap_or_else(|err| panic!("put {key} with metadata: {err}"));
}

#[test]
fn cold_walk_heads_each_file_once() {
    let garage = Garage::from_env();
    let bucket_name = garage.fresh_bucket("walkheads");
    let bucket = garage.bucket(&bucket_name);
    let mut keys = Vec::new();
    for dir in 0..4 {
        for file in 0..60 {
            keys.push(format!("d{dir}/f{file:03}"));
        }
    }
    bucket.put_many(keys.clone());

    let mut attributes = Attributes::new();
    attributes.insert(Attribute::Metadata("mode".into()), "33184".into()); // S_IFREG | 0o640
    attributes.insert(Attribute::Metadata("uid".into()), "1234".into());
    attributes.insert(Attribute::Metadata("mtime".into()), "981173106".into());
    let options = PutOptions { attributes, ..PutOptions::default() };
    let path = object_store::path::Path::from("d1/with-meta");
    runtime()
        .block_on(bucket.space.store.put_opts(&path, PutPayload::from_static(b"meta\n"), options))
        .expect("put object with metadata");
    keys.push("d1/with-meta".into());

    let proxy = FaultProxy::start(&garage.endpoint);
    let spaces = garage.space_toml("s3", &bucket_name, Some(&proxy.endpoint()));
    let mount = Mounted::start(&spaces, "metadata_ttl = \"5s\"\n");
    proxy.clear_requests();

    let root = mount.path("s3");
    let mut seen = HashMap::new();
    walk(&root, &mut seen, &root);
    assert_eq!(seen.len(), keys.len() + 4, "every file and directory was walked");

    let with_meta = &seen["d1/with-meta"];
    assert_eq!(with_meta.mode(), 0o100640, "the stored mode is reported");
    assert_eq!(with_meta.uid(), 1234, "the stored owner is reported");
    assert_eq!(with_meta.mtime(), 981173106, "the stored mtime is reported");

    let requests = proxy.requests();
    let mut heads: HashMap<&str, usize> = HashMap::new();
    for key in &keys {
        let suffix = format!("/{bucket_name}/{key} HTTP");
        let count = requests.iter().filter(|r| r.starts_with("HEAD ") && r.contains(&suffix)).count();
        heads.insert(key, count);
    }
    let repeated: Vec<_> = heads.iter().filter(|(_, count)| **count > 1).collect();
    assert!(repeated.is_empty(), "files HEADed more than once: {repeated:?}");
    let total: usize = heads.values().sum();
    assert_eq!(total, keys.len(), "one HEAD per file");

    let mut lists: HashMap<String, usize> = HashMap::new();
    for prefix in listed_prefixes(&requests, &bucket_name) {
        *lists.entry(prefix).or_default() += 1;
    }
    for dir in ["", "d0/", "d1/", "d2/", "d3/"] {
        assert_eq!(lists.get(dir).copied().unwrap_or(0), 1, "one LIST of {dir:?}; all LISTs: {lists:?}");
    }
    assert_eq!(lists.len(), 5, "no LIST besides one per directory: {lists:?}");
    for dir in ["d0/", "d1/", "d2/", "d3/"] {
        assert!(heads_of(&requests, &bucket_name, dir) <= 1, "at most one marker HEAD of {dir}");
    }
}

#[test]
fn walk_ahead_stops_at_limit() {
    let garage = Garage::from_env();
    let bucket_name = garage.fresh_bucket("walkbound");
    let bucket = garage.bucket(&bucket_name);
    let dirs = WALK_AHEAD_DIRS + 8;
    let mut keys = Vec::new();
    for dir in 0..dirs {
        keys.push(format!("d{dir:02}/f"));
        keys.push(format!("d{dir:02}/sub/g"));
    }
    bucket.put_many(keys);

    let (proxy, _mount, root) = mount_and_read_root(&garage, &bucket_name, dirs);

    let listed_ahead = |requests: &[String]| {
        listed_prefixes(requests, &bucket_name).into_iter().filter(|p| p.len() == 4 && p.starts_with('d')).count()
    };
    wait_for_requests(&proxy, "the first listings ahead", |r| listed_ahead(r) >= WALK_AHEAD_DIRS);
    std::thread::sleep(Duration::from_millis(500));
    let requests = proxy.requests();
    assert_eq!(listed_ahead(&requests), WALK_AHEAD_DIRS, "only the first subdirectories are listed ahead");
    let nested = listed_prefixes(&requests, &bucket_name).into_iter().filter(|p| p.ends_with("/sub/")).count();
    assert_eq!(nested, 0, "walk-ahead does not descend on its own");
    assert_eq!(heads_of(&requests, &bucket_name, "d01/f"), 0, "listing the parent alone reads no file metadata ahead");

    std::fs::read_dir(root.join("d00")).expect("read d00").for_each(drop);
    wait_for_requests(&proxy, "the HEAD of a file in a sibling listed ahead", |r| heads_of(r, &bucket_name, "d01/f") == 1);
    wait_for_requests(&proxy, "one more listing ahead", |r| listed_ahead(r) > WALK_AHEAD_DIRS);
    let next = format!("d{WALK_AHEAD_DIRS:02}/");
    assert!(listed_prefixes(&proxy.requests(), &bucket_name).contains(&next), "opening d00 lists {next} ahead");
    wait_for_requests(&proxy, "the listing of d00/sub", |r| listed_prefixes(r, &bucket_name).iter().any(|p| p == "d00/sub/"));
    std::thread::sleep(Duration::from_millis(300));
    let requests = proxy.requests();
    assert_eq!(listed_ahead(&requests), WALK_AHEAD_DIRS + 1, "the window moves by one directory");
    let last = format!("d{:02}/f", dirs - 1);
    assert_eq!(heads_of(&requests, &bucket_name, &last), 0, "files of directories not listed ahead are not read");
}

#[test]
fn walk_ahead_stops_at_entry_limit() {
    // Two listed subdirectories together exceed the entry limit. The first
    // WALK_AHEAD_LISTINGS listings start before any count is known, so the first one to
    // complete may start one more. After that, the entries waiting unopened stop it.
    let per_dir = WALK_AHEAD_MAX_ENTRIES / 2 + 1;
    let dirs = WALK_AHEAD_LISTINGS + 2;
    assert!(dirs <= WALK_AHEAD_DIRS, "without the entry limit every subdirectory would be listed ahead");
    let garage = Garage::from_env();
    let bucket_name = garage.fresh_bucket("walkentries");
    let bucket = garage.bucket(&bucket_name);
    let keys = (0..dirs).flat_map(|dir| (0..per_dir).map(move |file| format!("d{dir:02}/f{file:04}"))).collect();
    bucket.put_many(keys);

    let (proxy, _mount, _root) = mount_and_read_root(&garage, &bucket_name, dirs);

    // A listing of more than 1,000 keys takes several LIST pages, so count directories.
    let listed_ahead = |requests: &[String]| {
        let mut prefixes: Vec<String> =
            listed_prefixes(requests, &bucket_name).into_iter().filter(|p| p.len() == 4 && p.starts_with('d')).collect();
        prefixes.sort();
        prefixes.dedup();
        prefixes
    };
    wait_for_requests(&proxy, "the first listings ahead", |r| listed_ahead(r).len() >= WALK_AHEAD_LISTINGS);
    std::thread::sleep(Duration::from_millis(1500));
    let listed = listed_ahead(&proxy.requests());
    assert!(
        listed.len() <= WALK_AHEAD_LISTINGS + 1,
        "listing ahead stops once {WALK_AHEAD_MAX_ENTRIES} entries wait unopened; listed ahead: {listed:?}"
    );
    let last = format!("d{:02}/", dirs - 1);
    assert!(!listed.contains(&last), "{last} is not listed ahead: {listed:?}");
    // File keys are /BUCKET/dNN/fNNNN. Marker HEADs of the subdirectories end with `/`.
    let is_file_head = |request: &String| {
        let path = request.split_whitespace().nth(1).unwrap_or_default();
        request.starts_with("HEAD ") && path.split('/').count() == 4 && !path.ends_with('/')
    };
    let file_heads: Vec<String> = proxy.requests().into_iter().filter(is_file_head).collect();
    assert!(file_heads.is_empty(), "listing the parent alone reads no file metadata ahead: {file_heads:?}");
}

#[test]
fn walk_ahead_metadata_is_correct() {
    let garage = Garage::from_env();
    let bucket_name = garage.fresh_bucket("walkmeta");
    let bucket = garage.bucket(&bucket_name);
    put_with_meta(&bucket, "a/one", b"one\n", 0o100640, 1234);
    put_with_meta(&bucket, "b/two", b"two\n", 0o100600, 4321);
    bucket.put("b/plain", b"plain\n");

    let proxy = FaultProxy::start(&garage.endpoint);
    let spaces = garage.space_toml("s3", &bucket_name, Some(&proxy.endpoint())) + "uid = 777\n";
    let mount = Mounted::start(&spaces, "metadata_ttl = \"30s\"\n");
    proxy.clear_requests();

    let root = mount.path("s3");
    std::fs::read_dir(&root).expect("read the space root").for_each(drop);
    std::fs::read_dir(root.join("a")).expect("read a").for_each(drop);
    wait_for_requests(&proxy, "HEADs of the files below a and b", |r| {
        ["a/one", "b/two", "b/plain"].iter().all(|key| heads_of(r, &bucket_name, key) == 1)
    });
    std::thread::sleep(Duration::from_millis(200));
    proxy.clear_requests();

    let one = std::fs::symlink_metadata(root.join("a/one")).expect("lstat a/one");
    assert_eq!(one.mode(), 0o100640, "the stored mode of a/one");
    assert_eq!(one.uid(), 1234, "the stored owner of a/one");
    let two = std::fs::symlink_metadata(root.join("b/two")).expect("lstat b/two");
    assert_eq!(two.mode(), 0o100600, "the stored mode of b/two");
    assert_eq!(two.uid(), 4321, "the stored owner of b/two");
    let plain = std::fs::symlink_metadata(root.join("b/plain")).expect("lstat b/plain");
    assert_eq!(plain.mode() & 0o170000, 0o100000, "b/plain is a regular file");
    assert_eq!(plain.uid(), 777, "an object without metadata shows the space's owner");
    let requests = proxy.requests();
    assert!(requests.is_empty(), "the walk-ahead served every lstat: {requests:#?}");

    let listed: HashMap<String, std::fs::Metadata> = std::fs::read_dir(root.join("b"))
        .expect("read b")
        .map(|item| {
            let item = item.unwrap();
            (item.file_name().to_string_lossy().to_string(), item.metadata().expect("lstat an entry of b"))
        })
        .collect();
    assert_eq!(listed["two"].mode(), 0o100600, "the mode of b/two next to its directory entry");
    assert_eq!(listed["two"].uid(), 4321, "the owner of b/two next to its directory entry");
    assert_eq!(listed["plain"].uid(), 777, "the owner of b/plain next to its directory entry");
    assert_eq!(listed["two"].ino(), two.ino(), "readdir and lookup give the same inode");
}

#[test]
fn change_after_walk_ahead_seen_after_ttl() {
    let garage = Garage::from_env();
    let bucket_name = garage.fresh_bucket("walkfresh");
    let bucket = garage.bucket(&bucket_name);
    put_with_meta(&bucket, "d/f", b"first\n", 0o100640, 1234);
    bucket.put("a/f", b"walked first\n");

    let proxy = FaultProxy::start(&garage.endpoint);
    let spaces = garage.space_toml("s3", &bucket_name, Some(&proxy.endpoint()));
    let mount = Mounted::start(&spaces, "metadata_ttl = \"1s\"\n");
    proxy.clear_requests();

    let root = mount.path("s3");
    std::fs::read_dir(&root).expect("read the space root").for_each(drop);
    std::fs::read_dir(root.join("a")).expect("read a").for_each(drop);
    wait_for_requests(&proxy, "the HEAD of d/f", |r| heads_of(r, &bucket_name, "d/f") == 1);
    let before = std::fs::symlink_metadata(root.join("d/f")).expect("lstat d/f");
    assert_eq!(before.mode(), 0o100640, "the mode read ahead");

    put_with_meta(&bucket, "d/f", b"second version\n", 0o100600, 4321);
    std::thread::sleep(Duration::from_millis(1_500));
    let after = std::fs::symlink_metadata(root.join("d/f")).expect("lstat d/f after the TTL");
    assert_eq!(after.mode(), 0o100600, "the new mode after the TTL");
    assert_eq!(after.uid(), 4321, "the new owner after the TTL");
    assert_eq!(after.len(), 15, "the new size after the TTL");

    put_with_meta(&bucket, "d/f", b"third\n", 0o100604, 99);
    std::thread::sleep(Duration::from_millis(1_500));
    let entries: Vec<_> = std::fs::read_dir(root.join("d")).expect("read d").map(|e| e.unwrap()).collect();
    assert_eq!(entries.len(), 1);
    let listed = entries[0].metadata().expect("lstat d/f after readdir");
    assert_eq!(listed.mode(), 0o100604, "the newest mode after readdir");
    assert_eq!(listed.uid(), 99, "the newest owner after readdir");
    assert_eq!(listed.len(), 6, "the newest size after readdir");
}
