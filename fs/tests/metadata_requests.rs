//! Store requests of a cold tree walk with `lstat` on every entry, as `find` does.
//!
//! The walk goes through a counting proxy in front of Garage (from the service stack:
//! `scripts/stack.sh up`, then `source $RUN/env.sh`). Listings carry no user metadata,
//! so each file needs one HEAD; the background read-ahead after a listing and the
//! lookups of the walk must share it, not send it twice.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use common::proxy::FaultProxy;
use common::{runtime, Garage, Mounted};
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
}
