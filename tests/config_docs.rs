//! The configuration reference (docs/CONFIGURATION.md and its Chinese version) against
//! the parser in fs/src/config.rs: every key of the TOML format has a row, the
//! documented defaults are the parser's defaults, and the examples are valid.

use std::path::Path;
use std::time::Duration;

use datanet::config::Config;
use datanet_e2e::repo_root;

const DOCS: [&str; 2] = ["docs/CONFIGURATION.md", "docs/zh-CN/configuration.md"];

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Finds the table row that documents `key`, such as "| `region` | `\"us-east-1\"` | ...".
fn row<'a>(doc: &'a str, key: &str) -> Option<&'a str> {
    let start = format!("| `{key}` |");
    doc.lines().find(|line| line.starts_with(&start))
}

/// Lists the field names of `struct NAME { ... }` in the parser's source.
fn raw_fields(source: &str, name: &str) -> Vec<String> {
    let start = source
        .find(&format!("struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name} not found in fs/src/config.rs"));
    let body = &source[start..];
    let body = &body[..body.find("\n}").unwrap()];
    body.lines()
        .skip(1)
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.starts_with("//") && line.contains(':'))
        .map(|line| line.split(':').next().unwrap().trim().to_string())
        .collect()
}

#[test]
fn every_config_key_has_a_row() {
    let source = read("fs/src/config.rs");
    let structs = ["RawSpace", "RawCache", "RawCluster", "RawJobwrap", "RawSamba"];
    for doc_path in DOCS {
        let doc = read(doc_path);
        for name in structs {
            let fields = raw_fields(&source, name);
            assert!(!fields.is_empty(), "no fields read from {name}");
            for field in fields {
                assert!(row(&doc, &field).is_some(), "{doc_path} has no row for `{field}` of {name}");
            }
        }
    }
}

#[test]
fn documented_defaults_match_parser() {
    let text = r#"
[spaces.s]
url = "s3://bucket-name"

[spaces.http]
url = "s3://bucket-name"
endpoint = "http://127.0.0.1:3900"

[clusters.c]
scratch_root = "/scratch"

[samba]
smb_conf = "/etc/smb.conf"
allowed_roots = ["/datanet"]
token_key_env = "TOKEN_KEY"
"#;
    let config = Config::parse(text, Path::new("defaults.toml")).unwrap();
    let space = &config.spaces["s"];
    let samba = config.samba().unwrap();

    assert_eq!(space.region, "us-east-1");
    assert!(!space.read_only);
    assert_eq!((space.uid, space.gid), (0, 0));
    assert_eq!(space.file_mode, 0o644);
    assert_eq!(space.dir_mode, 0o755);
    assert!(space.path_style);
    assert!(!space.allow_http);
    assert!(config.spaces["http"].allow_http);
    assert_eq!(config.cache.dir, Path::new("/var/cache/datanet"));
    assert_eq!(config.cache.max_size_bytes, 10 << 30);
    assert_eq!(config.cache.metadata_ttl, Duration::from_secs(5));
    assert_eq!(config.cache.read_ahead_memory_bytes, 64 << 20);
    assert_eq!(config.cache.write_back_delay, Duration::ZERO);
    assert_eq!(config.jobwrap.state_dir, Path::new("/var/lib/jobwrap"));
    assert_eq!(config.jobwrap.transfer_concurrency, 64);
    assert_eq!(config.jobwrap.poll_interval, Duration::from_secs(2));
    assert_eq!(samba.server, "127.0.0.1");
    assert_eq!(samba.port, 445);
    assert_eq!(samba.state_dir, Path::new("/var/lib/samba-provisioner"));
    assert_eq!(samba.encrypt, "required");
    assert_eq!(samba.max_ttl, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(samba.account_prefix, "dnl");

    // The same defaults, as each document writes them in the key's row.
    let documented = [
        ("region", "`\"us-east-1\"`"),
        ("read_only", "`false`"),
        ("uid", "`0`"),
        ("gid", "`0`"),
        ("mode", "`\"0644\"`"),
        ("path_style", "`true`"),
        ("dir", "`\"/var/cache/datanet\"`"),
        ("max_size", "`\"10GiB\"`"),
        ("metadata_ttl", "`\"5s\"`"),
        ("read_ahead_memory", "`\"64MiB\"`"),
        ("write_back_delay", "`\"0\"`"),
        ("state_dir", "`\"/var/lib/jobwrap\"`"),
        ("transfer_concurrency", "`64`"),
        ("poll_interval", "`\"2s\"`"),
        ("server", "`\"127.0.0.1\"`"),
        ("port", "`445`"),
        ("encrypt", "`\"required\"`"),
        ("max_ttl", "`\"7d\"`"),
        ("account_prefix", "`\"dnl\"`"),
    ];
    for doc_path in DOCS {
        let doc = read(doc_path);
        for (key, default) in documented {
            let line = row(&doc, key).unwrap_or_else(|| panic!("{doc_path} has no row for `{key}`"));
            assert!(line.contains(default), "{doc_path}: row of `{key}` lacks default {default}: {line}");
        }
        let samba_state = doc
            .lines()
            .filter(|line| line.starts_with("| `state_dir` |"))
            .any(|line| line.contains("`\"/var/lib/samba-provisioner\"`"));
        assert!(samba_state, "{doc_path}: [samba] state_dir default missing");
    }
    assert_eq!(
        Config::parse("[samba]\nsmb_conf = \"/s\"\nallowed_roots = [\"/d\"]\ntoken_key_env = \"K\"\nmax_ttl = \"7d\"\n", Path::new("t"))
            .unwrap()
            .samba()
            .unwrap()
            .max_ttl,
        samba.max_ttl,
        "the documented spelling \"7d\" parses to the default"
    );
}

#[test]
fn documented_examples_are_valid() {
    for doc_path in DOCS {
        let doc = read(doc_path);
        let start = doc.find("```toml\n").unwrap_or_else(|| panic!("{doc_path} has no TOML example")) + 8;
        let end = start + doc[start..].find("```").unwrap();
        let config = Config::parse(&doc[start..end], Path::new(doc_path))
            .unwrap_or_else(|err| panic!("the example in {doc_path} is invalid: {err}"));
        assert_eq!(config.spaces.len(), 3, "{doc_path}");
        assert!(config.samba.is_some(), "{doc_path}");
        assert_eq!(config.clusters["a"].near_spaces, ["models", "results"], "{doc_path}");
    }
}
