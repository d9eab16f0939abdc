//! The deployment configuration shared by `datanet`, `jobwrap` and `samba-provisioner`.
//!
//! One TOML file (default `/etc/datanet/datanet.toml`, overridden by `--config` or
//! `DATANET_CONFIG`) lists the storage spaces, the cache, the Slurm clusters and the
//! Samba settings. Loading validates everything up front, and every error names the
//! key, the bad value and what to write instead. Secrets are never stored here: the
//! file only names where to read them from (an environment variable or a 0600 file).

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// The path used when neither `--config` nor `DATANET_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/datanet/datanet.toml";

/// The environment variable that overrides [`DEFAULT_CONFIG_PATH`].
pub const CONFIG_ENV: &str = "DATANET_CONFIG";

/// Maximum length of a space name, which becomes one directory name under the mount root.
const MAX_SPACE_NAME_BYTES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The I/O error is part of the message and deliberately not a `#[source]`, so that
    // `{:#}` chains in the binaries do not print it twice.
    #[error("cannot read configuration file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },

    #[error("invalid configuration file {path}: {message}")]
    Syntax { path: PathBuf, message: String },

    /// A key has a value that parses but is not acceptable.
    #[error("invalid value {value:?} for `{key}`: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },

    #[error("missing `{key}`: {reason}")]
    Missing { key: String, reason: String },

    #[error("secret for `{key}` unavailable: {reason}")]
    Secret { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from, for messages.
    pub source: PathBuf,
    pub spaces: BTreeMap<String, SpaceConfig>,
    pub cache: CacheConfig,
    pub clusters: BTreeMap<String, ClusterConfig>,
    pub jobwrap: JobwrapConfig,
    pub samba: Option<SambaConfig>,
}

/// Location of a space's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpaceLocation {
    /// `s3://bucket/prefix`: an S3-compatible bucket, optionally below a key prefix.
    S3 { bucket: String, prefix: String },
    /// `file:///path`: a local or NFS directory.
    Local { root: PathBuf },
    /// `memory://`: an in-process store, for tests only.
    Memory,
}

/// Source of one secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// The value of an environment variable.
    Env(String),
    /// The trimmed content of a file that only its owner may read (mode 0600 or stricter).
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct S3Credentials {
    pub access_key_id: SecretSource,
    pub secret_access_key: SecretSource,
    pub session_token: Option<SecretSource>,
}

#[derive(Debug, Clone)]
pub struct SpaceConfig {
    pub name: String,
    pub url: String,
    pub location: SpaceLocation,
    /// S3 endpoint such as `http://127.0.0.1:3900`; `None` means AWS.
    pub endpoint: Option<String>,
    pub region: String,
    /// `None` for S3 means the default AWS credential chain (environment, profile, instance).
    pub credentials: Option<S3Credentials>,
    pub read_only: bool,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits of files without stored metadata; directories add `x` where `r` is set.
    pub file_mode: u32,
    pub dir_mode: u32,
    /// Path-style requests (`endpoint/bucket/key`), needed by most non-AWS servers.
    pub path_style: bool,
    /// Accept plain `http://` endpoints.
    pub allow_http: bool,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Upper bound of the on-disk data cache.
    pub max_size_bytes: u64,
    /// How long cached metadata (attributes, listings, negative lookups) is trusted.
    pub metadata_ttl: Duration,
    /// Upper bound of memory used for read-ahead buffers across all open files.
    pub read_ahead_memory_bytes: u64,
    /// Delay before a closed dirty file is uploaded; zero uploads on close.
    pub write_back_delay: Duration,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    /// `slurm.conf` for this cluster, passed to Slurm commands as `SLURM_CONF`.
    pub slurm_conf: Option<PathBuf>,
    /// `-M NAME` for sites with slurmdbd federation.
    pub slurm_cluster_name: Option<String>,
    pub scratch_root: PathBuf,
    pub partitions: Vec<String>,
    /// Spaces at the same site, preferred when placing jobs that read them.
    pub near_spaces: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct JobwrapConfig {
    pub state_dir: PathBuf,
    pub transfer_concurrency: usize,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct SambaConfig {
    /// Address that graphical nodes connect to, written into tokens.
    pub server: String,
    pub port: u16,
    /// `smb.conf` of the smbd that serves leases; passed to `net`, `pdbedit` and `smbcontrol`.
    pub smb_conf: PathBuf,
    /// Lease directories must be below one of these (after canonicalization).
    pub allowed_roots: Vec<PathBuf>,
    pub state_dir: PathBuf,
    /// Symmetric key that encrypts tokens: 64 hex characters (32 bytes) in a 0600 file.
    pub token_key: SecretSource,
    /// Unix user that file I/O on shares runs as (`force user`).
    pub force_user: Option<String>,
    pub force_group: Option<String>,
    /// `required`, `desired` or `off`.
    pub encrypt: String,
    pub max_ttl: Duration,
    /// Prefix of generated account and share names, so reconcile finds its own.
    pub account_prefix: String,
    /// Bearer token for the HTTP API of `samba-provisioner serve`.
    pub api_token: Option<SecretSource>,
}

// ---------------------------------------------------------------------------
// Raw, unvalidated form as written in TOML.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    spaces: BTreeMap<String, RawSpace>,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    clusters: BTreeMap<String, RawCluster>,
    #[serde(default)]
    jobwrap: RawJobwrap,
    samba: Option<RawSamba>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpace {
    url: String,
    endpoint: Option<String>,
    region: Option<String>,
    access_key_id: Option<String>,
    access_key_id_env: Option<String>,
    access_key_id_file: Option<PathBuf>,
    secret_access_key_env: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    session_token_env: Option<String>,
    session_token_file: Option<PathBuf>,
    #[serde(default)]
    read_only: bool,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<String>,
    path_style: Option<bool>,
    allow_http: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    dir: Option<PathBuf>,
    max_size: Option<String>,
    metadata_ttl: Option<String>,
    read_ahead_memory: Option<String>,
    write_back_delay: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    slurm_conf: Option<PathBuf>,
    slurm_cluster_name: Option<String>,
    scratch_root: PathBuf,
    #[serde(default)]
    partitions: Vec<String>,
    #[serde(default)]
    near_spaces: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobwrap {
    state_dir: Option<PathBuf>,
    transfer_concurrency: Option<usize>,
    poll_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSamba {
    server: Option<String>,
    port: Option<u16>,
    smb_conf: PathBuf,
    allowed_roots: Vec<PathBuf>,
    state_dir: Option<PathBuf>,
    token_key_file: Option<PathBuf>,
    token_key_env: Option<String>,
    force_user: Option<String>,
    force_group: Option<String>,
    encrypt: Option<String>,
    max_ttl: Option<String>,
    account_prefix: Option<String>,
    api_token_file: Option<PathBuf>,
    api_token_env: Option<String>,
}

// ---------------------------------------------------------------------------

impl Config {
    /// Resolves the configuration path: an explicit path, then `DATANET_CONFIG`, then
    /// [`DEFAULT_CONFIG_PATH`].
    pub fn resolve_path(explicit: Option<&Path>) -> PathBuf {
        if let Some(path) = explicit {
            return path.to_path_buf();
        }
        match std::env::var_os(CONFIG_ENV) {
            Some(value) if !value.is_empty() => PathBuf::from(value),
            _ => PathBuf::from(DEFAULT_CONFIG_PATH),
        }
    }

    /// Reads and validates the configuration at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text, path)
    }

    /// Validates configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: err.to_string().trim_end().replace('\n', " "),
        })?;

        let mut spaces = BTreeMap::new();
        for (name, raw_space) in raw.spaces {
            let space = validate_space(&name, raw_space)?;
            spaces.insert(name, space);
        }

        let cache = validate_cache(raw.cache)?;

        let mut clusters = BTreeMap::new();
        for (name, raw_cluster) in raw.clusters {
            let cluster = validate_cluster(&name, raw_cluster, &spaces)?;
            clusters.insert(name, cluster);
        }

        let jobwrap = validate_jobwrap(raw.jobwrap)?;
        let samba = raw.samba.map(validate_samba).transpose()?;

        Ok(Config {
            source: path.to_path_buf(),
            spaces,
            cache,
            clusters,
            jobwrap,
            samba,
        })
    }

    /// Looks up a space by name, with an error that lists the configured names.
    pub fn space(&self, name: &str) -> Result<&SpaceConfig, ConfigError> {
        self.spaces.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.spaces.keys().map(String::as_str).collect();
            ConfigError::invalid(
                "space",
                name,
                format!(
                    "no such space in {}; configured spaces: {}",
                    self.source.display(),
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ),
            )
        })
    }

    /// Returns the `[samba]` section or an error telling the operator to add it.
    pub fn samba(&self) -> Result<&SambaConfig, ConfigError> {
        self.samba.as_ref().ok_or_else(|| ConfigError::Missing {
            key: "samba".into(),
            reason: format!("add a [samba] section to {}", self.source.display()),
        })
    }
}

/// Checks a space name: it becomes a directory name under the mount root and part of
/// `space:path` references, so it is restricted to a portable set of characters.
pub fn validate_space_name(name: &str) -> Result<(), ConfigError> {
    let key = format!("spaces.{name}");
    if name.is_empty() || name.len() > MAX_SPACE_NAME_BYTES {
        return Err(ConfigError::invalid(
            key,
            name,
            format!("a space name has 1 to {MAX_SPACE_NAME_BYTES} bytes"),
        ));
    }
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !valid_chars || name.starts_with('.') || name.starts_with('-') {
        return Err(ConfigError::invalid(
            key,
            name,
            "use ASCII letters, digits, '-', '_' and '.', not starting with '.' or '-'",
        ));
    }
    Ok(())
}

fn validate_space(name: &str, raw: RawSpace) -> Result<SpaceConfig, ConfigError> {
    validate_space_name(name)?;
    let key = |field: &str| format!("spaces.{name}.{field}");

    let location = parse_space_url(&key("url"), &raw.url)?;
    let is_s3 = matches!(location, SpaceLocation::S3 { .. });

    if let Some(endpoint) = &raw.endpoint {
        let parsed = Url::parse(endpoint).map_err(|err| {
            ConfigError::invalid(key("endpoint"), endpoint, format!("{err}; write e.g. http://127.0.0.1:3900"))
        })?;
        if parsed.scheme() != "http" && parsed.scheme() != "https" {
            return Err(ConfigError::invalid(key("endpoint"), endpoint, "use an http:// or https:// URL"));
        }
        if !is_s3 {
            return Err(ConfigError::invalid(key("endpoint"), endpoint, "only s3:// spaces take an endpoint"));
        }
    }

    let credentials = if is_s3 { s3_credentials(name, &raw)? } else { None };
    if !is_s3 && (raw.access_key_id.is_some() || raw.secret_access_key_env.is_some() || raw.secret_access_key_file.is_some()) {
        return Err(ConfigError::invalid(key("url"), &raw.url, "credentials are set but the space is not s3://"));
    }

    let file_mode = match &raw.mode {
        Some(text) => parse_mode(&key("mode"), text)?,
        None => 0o644,
    };
    let dir_mode = directory_mode(file_mode);
    let allow_http = raw
        .allow_http
        .unwrap_or_else(|| raw.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));

    Ok(SpaceConfig {
        name: name.to_string(),
        url: raw.url,
        location,
        endpoint: raw.endpoint,
        region: raw.region.unwrap_or_else(|| "us-east-1".to_string()),
        credentials,
        read_only: raw.read_only,
        uid: raw.uid.unwrap_or(0),
        gid: raw.gid.unwrap_or(0),
        file_mode,
        dir_mode,
        path_style: raw.path_style.unwrap_or(true),
        allow_http,
    })
}

fn s3_credentials(name: &str, raw: &RawSpace) -> Result<Option<S3Credentials>, ConfigError> {
    let key = |field: &str| format!("spaces.{name}.{field}");

    let access = one_source(
        &key("access_key_id"),
        raw.access_key_id.as_ref().map(|v| SecretSource::Env(format!("={v}"))),
        raw.access_key_id_env.clone().map(SecretSource::Env),
        raw.access_key_id_file.clone().map(SecretSource::File),
    )?;
    let secret = one_source(
        &key("secret_access_key"),
        None,
        raw.secret_access_key_env.clone().map(SecretSource::Env),
        raw.secret_access_key_file.clone().map(SecretSource::File),
    )?;
    let session_token = one_source(
        &key("session_token"),
        None,
        raw.session_token_env.clone().map(SecretSource::Env),
        raw.session_token_file.clone().map(SecretSource::File),
    )?;

    match (access, secret) {
        (None, None) => Ok(None),
        (Some(access_key_id), Some(secret_access_key)) => Ok(Some(S3Credentials {
            access_key_id,
            secret_access_key,
            session_token,
        })),
        (Some(_), None) => Err(ConfigError::Missing {
            key: key("secret_access_key_file"),
            reason: "an access key id is set; also set secret_access_key_file (0600) or secret_access_key_env".into(),
        }),
        (None, Some(_)) => Err(ConfigError::Missing {
            key: key("access_key_id"),
            reason: "a secret key is set; also set access_key_id, access_key_id_env or access_key_id_file".into(),
        }),
    }
}

/// Picks the single source given for one credential. An inline value is carried as
/// `Env("=VALUE")` so that [`SecretSource::read`] can return it; only the access key id,
/// which is not secret, may be inline.
fn one_source(
    key: &str,
    inline: Option<SecretSource>,
    env: Option<SecretSource>,
    file: Option<SecretSource>,
) -> Result<Option<SecretSource>, ConfigError> {
    let given: Vec<SecretSource> = [inline, env, file].into_iter().flatten().collect();
    if given.len() > 1 {
        return Err(ConfigError::invalid(
            key,
            "several sources",
            "give exactly one of the inline value, `_env` or `_file` forms",
        ));
    }
    Ok(given.into_iter().next())
}

impl SecretSource {
    /// Reads the secret. A file must not be readable by group or others.
    pub fn read(&self, key: &str) -> Result<String, ConfigError> {
        match self {
            SecretSource::Env(var) if var.starts_with('=') => Ok(var[1..].to_string()),
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(value) if !value.is_empty() => Ok(value),
                _ => Err(ConfigError::Secret {
                    key: key.to_string(),
                    reason: format!("environment variable {var} is not set or empty"),
                }),
            },
            SecretSource::File(path) => read_secret_file(key, path),
        }
    }
}

fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    let metadata = std::fs::metadata(path).map_err(|err| ConfigError::Secret {
        key: key.to_string(),
        reason: format!("cannot read {}: {err}", path.display()),
    })?;
    if !metadata.is_file() {
        return Err(ConfigError::Secret {
            key: key.to_string(),
            reason: format!("{} is not a regular file; point the key at the file that holds the secret", path.display()),
        });
    }
    if metadata.mode() & 0o077 != 0 {
        return Err(ConfigError::Secret {
            key: key.to_string(),
            reason: format!(
                "{} has mode {:04o}; other users could read it: run `chmod 600 {}`",
                path.display(),
                metadata.mode() & 0o7777,
                path.display()
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Secret {
        key: key.to_string(),
        reason: format!("cannot read {}: {err}", path.display()),
    })?;
    let value = text.trim().to_string();
    if value.is_empty() {
        return Err(ConfigError::Secret {
            key: key.to_string(),
            reason: format!("{} is empty", path.display()),
        });
    }
    Ok(value)
}

/// Parses a space URL: `s3://bucket[/prefix]`, `file:///absolute/path` or `memory://`.
///
/// The prefix of an `s3://` URL is taken as raw key text, as the AWS CLI does: it is not
/// percent-decoded, and `#`, `?` or `%` in it are part of the key, never a URL fragment or
/// query. A `file://` URL is a real URL: percent escapes are decoded, and a query or
/// fragment is rejected.
pub fn parse_space_url(key: &str, text: &str) -> Result<SpaceLocation, ConfigError> {
    let hint = "write s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH";
    if text.chars().any(|c| c.is_control()) {
        return Err(ConfigError::invalid(key, text.escape_debug(), "the URL contains a control character"));
    }

    if let Some(rest) = text.strip_prefix("s3://") {
        return parse_s3_url(key, text, rest);
    }

    let url = Url::parse(text).map_err(|err| ConfigError::invalid(key, text, format!("{err}; {hint}")))?;
    match url.scheme() {
        "file" => {
            if url.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(ConfigError::invalid(key, text, "file URLs have three slashes: file:///path"));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(ConfigError::invalid(
                    key,
                    text,
                    "a file URL cannot have '?' or '#'; write them percent-encoded as %3F and %23",
                ));
            }
            let root = url
                .to_file_path()
                .map_err(|_| ConfigError::invalid(key, text, hint))?;
            Ok(SpaceLocation::Local { root })
        }
        "memory" => Ok(SpaceLocation::Memory),
        other => Err(ConfigError::invalid(key, text, format!("unsupported scheme {other:?}; {hint}"))),
    }
}

fn parse_s3_url(key: &str, text: &str, rest: &str) -> Result<SpaceLocation, ConfigError> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.contains('@') {
        return Err(ConfigError::invalid(
            key,
            "s3://<credentials hidden>@...",
            "credentials do not belong in the URL; use access_key_id and secret_access_key_file",
        ));
    }
    if !valid_bucket_name(bucket) {
        return Err(ConfigError::invalid(
            key,
            text,
            "bucket names have 3 to 63 characters: lowercase letters, digits, '.' and '-'",
        ));
    }

    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    if !prefix.is_empty() {
        let bad_segment = prefix
            .split('/')
            .find(|segment| segment.is_empty() || *segment == "." || *segment == "..");
        if let Some(segment) = bad_segment {
            return Err(ConfigError::invalid(
                key,
                text,
                format!("the prefix has the segment {segment:?}; remove empty, '.' and '..' segments"),
            ));
        }
    }

    Ok(SpaceLocation::S3 {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
    })
}

fn valid_bucket_name(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && !name.starts_with(['.', '-'])
        && !name.ends_with(['.', '-'])
}

/// Parses an octal permission mode such as `"0640"` or `"750"`.
pub fn parse_mode(key: &str, text: &str) -> Result<u32, ConfigError> {
    let digits = text.trim_start_matches("0o");
    let mode = u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| ConfigError::invalid(key, text, "write an octal mode such as \"0644\""))?;
    Ok(mode)
}

/// Adds search permission wherever read permission is granted.
fn directory_mode(file_mode: u32) -> u32 {
    let mut mode = file_mode & 0o777;
    for (read, exec) in [(0o400, 0o100), (0o040, 0o010), (0o004, 0o001)] {
        if mode & read != 0 {
            mode |= exec;
        }
    }
    mode
}

fn validate_cache(raw: RawCache) -> Result<CacheConfig, ConfigError> {
    let max_size_bytes = match &raw.max_size {
        Some(text) => parse_size("cache.max_size", text)?,
        None => 10 << 30,
    };
    let read_ahead_memory_bytes = match &raw.read_ahead_memory {
        Some(text) => parse_size("cache.read_ahead_memory", text)?,
        None => 64 << 20,
    };
    if read_ahead_memory_bytes < (1 << 20) {
        return Err(ConfigError::invalid(
            "cache.read_ahead_memory",
            raw.read_ahead_memory.unwrap_or_default(),
            "use at least 1MiB",
        ));
    }
    let metadata_ttl = match &raw.metadata_ttl {
        Some(text) => parse_duration("cache.metadata_ttl", text)?,
        None => Duration::from_secs(5),
    };
    let write_back_delay = match &raw.write_back_delay {
        Some(text) => parse_duration("cache.write_back_delay", text)?,
        None => Duration::ZERO,
    };
    let dir = raw.dir.unwrap_or_else(|| PathBuf::from("/var/cache/datanet"));
    if !dir.is_absolute() {
        return Err(ConfigError::invalid("cache.dir", dir.display(), "use an absolute path"));
    }

    Ok(CacheConfig {
        dir,
        max_size_bytes,
        metadata_ttl,
        read_ahead_memory_bytes,
        write_back_delay,
    })
}

fn validate_cluster(
    name: &str,
    raw: RawCluster,
    spaces: &BTreeMap<String, SpaceConfig>,
) -> Result<ClusterConfig, ConfigError> {
    let key = |field: &str| format!("clusters.{name}.{field}");
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ConfigError::invalid(
            format!("clusters.{name}"),
            name,
            "use ASCII letters, digits, '-' and '_'",
        ));
    }
    if !raw.scratch_root.is_absolute() {
        return Err(ConfigError::invalid(key("scratch_root"), raw.scratch_root.display(), "use an absolute path"));
    }
    if let Some(conf) = &raw.slurm_conf {
        if !conf.is_absolute() {
            return Err(ConfigError::invalid(key("slurm_conf"), conf.display(), "use an absolute path"));
        }
    }
    for space in &raw.near_spaces {
        if !spaces.contains_key(space) {
            return Err(ConfigError::invalid(key("near_spaces"), space, "no space of that name is configured"));
        }
    }

    Ok(ClusterConfig {
        name: name.to_string(),
        slurm_conf: raw.slurm_conf,
        slurm_cluster_name: raw.slurm_cluster_name,
        scratch_root: raw.scratch_root,
        partitions: raw.partitions,
        near_spaces: raw.near_spaces,
    })
}

fn validate_jobwrap(raw: RawJobwrap) -> Result<JobwrapConfig, ConfigError> {
    let state_dir = raw.state_dir.unwrap_or_else(|| PathBuf::from("/var/lib/jobwrap"));
    if !state_dir.is_absolute() {
        return Err(ConfigError::invalid("jobwrap.state_dir", state_dir.display(), "use an absolute path"));
    }
    // Many small objects are the common case of stage-in, and each transfer waits mostly
    // on the network, so the default is well above the core count.
    let transfer_concurrency = raw.transfer_concurrency.unwrap_or(64);
    if !(1..=256).contains(&transfer_concurrency) {
        return Err(ConfigError::invalid(
            "jobwrap.transfer_concurrency",
            transfer_concurrency,
            "use a number from 1 to 256",
        ));
    }
    let poll_interval = match &raw.poll_interval {
        Some(text) => parse_duration("jobwrap.poll_interval", text)?,
        None => Duration::from_secs(2),
    };
    if poll_interval < Duration::from_millis(100) {
        return Err(ConfigError::invalid(
            "jobwrap.poll_interval",
            raw.poll_interval.unwrap_or_default(),
            "use at least \"100ms\"; shorter intervals load slurmctld with back-to-back queries",
        ));
    }

    Ok(JobwrapConfig {
        state_dir,
        transfer_concurrency,
        poll_interval,
    })
}

fn validate_samba(raw: RawSamba) -> Result<SambaConfig, ConfigError> {
    if !raw.smb_conf.is_absolute() {
        return Err(ConfigError::invalid("samba.smb_conf", raw.smb_conf.display(), "use an absolute path"));
    }
    if raw.allowed_roots.is_empty() {
        return Err(ConfigError::Missing {
            key: "samba.allowed_roots".into(),
            reason: "list the directories under which shares may be granted, e.g. [\"/datanet\"]".into(),
        });
    }
    for root in &raw.allowed_roots {
        if !root.is_absolute() {
            return Err(ConfigError::invalid("samba.allowed_roots", root.display(), "use absolute paths"));
        }
    }

    let token_key = one_source(
        "samba.token_key",
        None,
        raw.token_key_env.map(SecretSource::Env),
        raw.token_key_file.map(SecretSource::File),
    )?
    .ok_or_else(|| ConfigError::Missing {
        key: "samba.token_key_file".into(),
        reason: "set token_key_file to a 0600 file holding 64 hex characters (e.g. `openssl rand -hex 32`)".into(),
    })?;
    let api_token = one_source(
        "samba.api_token",
        None,
        raw.api_token_env.map(SecretSource::Env),
        raw.api_token_file.map(SecretSource::File),
    )?;

    let encrypt = raw.encrypt.unwrap_or_else(|| "required".to_string());
    if !["required", "desired", "off"].contains(&encrypt.as_str()) {
        return Err(ConfigError::invalid("samba.encrypt", &encrypt, "use \"required\", \"desired\" or \"off\""));
    }
    let max_ttl = match &raw.max_ttl {
        Some(text) => parse_duration("samba.max_ttl", text)?,
        None => Duration::from_secs(7 * 24 * 3600),
    };
    if max_ttl < Duration::from_secs(60) {
        return Err(ConfigError::invalid(
            "samba.max_ttl",
            raw.max_ttl.unwrap_or_default(),
            "use at least \"1m\"; every grant's TTL must fit below it",
        ));
    }
    let account_prefix = raw.account_prefix.unwrap_or_else(|| "dnl".to_string());
    let prefix_ok = (1..=8).contains(&account_prefix.len())
        && account_prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && account_prefix.starts_with(|c: char| c.is_ascii_lowercase());
    if !prefix_ok {
        return Err(ConfigError::invalid(
            "samba.account_prefix",
            &account_prefix,
            "use 1 to 8 lowercase letters and digits, starting with a letter",
        ));
    }

    Ok(SambaConfig {
        server: raw.server.unwrap_or_else(|| "127.0.0.1".to_string()),
        port: raw.port.unwrap_or(445),
        smb_conf: raw.smb_conf,
        allowed_roots: raw.allowed_roots,
        state_dir: raw.state_dir.unwrap_or_else(|| PathBuf::from("/var/lib/samba-provisioner")),
        token_key,
        force_user: raw.force_user,
        force_group: raw.force_group,
        encrypt,
        max_ttl,
        account_prefix,
        api_token,
    })
}

/// Parses a duration such as `"5s"`, `"250ms"`, `"2h 30m"` or `"0"`.
pub fn parse_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim())
        .map_err(|err| ConfigError::invalid(key, text, format!("{err}; write e.g. \"5s\", \"10m\" or \"2h\"")))
}

/// Parses a byte size such as `"64MiB"`, `"10GiB"`, `"500MB"` or `"4096"`.
pub fn parse_size(key: &str, text: &str) -> Result<u64, ConfigError> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => {
            return Err(ConfigError::invalid(key, text, "write a size such as \"64MiB\", \"10GiB\" or \"500MB\""));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| ConfigError::invalid(key, text, "write a size such as \"64MiB\", \"10GiB\" or \"500MB\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn minimal_config_has_defaults() {
        let config = parse("[spaces.home]\nurl = \"file:///srv/home\"\n").unwrap();
        let space = &config.spaces["home"];
        assert_eq!(space.location, SpaceLocation::Local { root: "/srv/home".into() });
        assert_eq!(space.file_mode, 0o644);
        assert_eq!(space.dir_mode, 0o755);
        assert_eq!(config.cache.metadata_ttl, Duration::from_secs(5));
        assert!(config.samba.is_none());
    }

    #[test]
    fn s3_url_splits_bucket_and_prefix() {
        let loc = parse_space_url("k", "s3://models/site-a/cae").unwrap();
        assert_eq!(
            loc,
            SpaceLocation::S3 { bucket: "models".into(), prefix: "site-a/cae".into() }
        );
    }

    #[test]
    fn bad_url_names_key_and_value() {
        let err = parse("[spaces.x]\nurl = \"ftp://host/p\"\n").unwrap_err().to_string();
        assert!(err.contains("spaces.x.url"), "{err}");
        assert!(err.contains("ftp://host/p"), "{err}");
        assert!(err.contains("s3://"), "{err}");
    }

    #[test]
    fn s3_prefix_is_raw_key_text() {
        for (url, prefix) in [
            ("s3://bucket/my dir", "my dir"),
            ("s3://bucket/a#b", "a#b"),
            ("s3://bucket/p%20q/", "p%20q"),
            ("s3://bucket/x?y=1", "x?y=1"),
        ] {
            let loc = parse_space_url("k", url).unwrap();
            assert_eq!(loc, SpaceLocation::S3 { bucket: "bucket".into(), prefix: prefix.into() }, "{url}");
        }
    }

    #[test]
    fn s3_prefix_dot_segments_rejected() {
        for url in ["s3://bucket/a/../x", "s3://bucket/a/./x", "s3://bucket/a//x", "s3://bucket//x"] {
            let err = parse_space_url("k", url).unwrap_err().to_string();
            assert!(err.contains("segment"), "{url}: {err}");
        }
    }

    #[test]
    fn s3_url_with_credentials_rejected_without_echo() {
        let err = parse_space_url("k", "s3://user:pw@bucket/x").unwrap_err().to_string();
        assert!(err.contains("secret_access_key_file"), "{err}");
        assert!(!err.contains("pw"), "{err}");
    }

    #[test]
    fn s3_bucket_with_query_rejected() {
        let err = parse_space_url("k", "s3://bucket?x=1").unwrap_err().to_string();
        assert!(err.contains("bucket names"), "{err}");
    }

    #[test]
    fn file_url_fragment_rejected() {
        let err = parse_space_url("k", "file:///srv/a#b").unwrap_err().to_string();
        assert!(err.contains("%23"), "{err}");
        let loc = parse_space_url("k", "file:///srv/a%23b").unwrap();
        assert_eq!(loc, SpaceLocation::Local { root: "/srv/a#b".into() });
    }

    #[test]
    fn short_intervals_rejected() {
        let err = parse("[jobwrap]\npoll_interval = \"0\"\n").unwrap_err().to_string();
        assert!(err.contains("jobwrap.poll_interval"), "{err}");
        let text = "[samba]\nsmb_conf = \"/etc/smb.conf\"\nallowed_roots = [\"/d\"]\n\
                    token_key_env = \"K\"\nmax_ttl = \"0\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("samba.max_ttl"), "{err}");
    }

    #[test]
    fn missing_config_names_os_error_once() {
        let err = Config::load(Path::new("/nonexistent/datanet.toml")).unwrap_err();
        let chained = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(chained.matches("No such file").count(), 1, "{chained}");
    }

    #[test]
    fn secret_path_directory_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let err = SecretSource::File(dir.path().to_path_buf()).read("k").unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn bad_bucket_name_rejected() {
        let err = parse("[spaces.x]\nurl = \"s3://Bad_Bucket\"\n").unwrap_err().to_string();
        assert!(err.contains("bucket names"), "{err}");
    }

    #[test]
    fn unknown_key_rejected() {
        let err = parse("[spaces.x]\nurl = \"file:///a\"\nreadonly = true\n").unwrap_err().to_string();
        assert!(err.contains("readonly"), "{err}");
    }

    #[test]
    fn bad_space_name_rejected() {
        let err = parse("[spaces.\"a/b\"]\nurl = \"file:///a\"\n").unwrap_err().to_string();
        assert!(err.contains("spaces.a/b"), "{err}");
    }

    #[test]
    fn secret_without_access_key_rejected() {
        let text = "[spaces.x]\nurl = \"s3://bucket\"\nsecret_access_key_env = \"S\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("access_key_id"), "{err}");
    }

    #[test]
    fn secret_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&path).unwrap().permissions(), 0o644);
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let err = SecretSource::File(path.clone()).read("k").unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");

        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert_eq!(SecretSource::File(path).read("k").unwrap(), "s3cr3t");
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("k", "64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("k", "500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("k", "4096").unwrap(), 4096);
        assert!(parse_size("k", "12 parsecs").is_err());
        assert!(parse_size("k", "99999999999TiB").is_err());
        assert_eq!(parse_duration("k", "250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("k", "0").unwrap(), Duration::ZERO);
        assert!(parse_duration("k", "soon").is_err());
    }

    #[test]
    fn cluster_near_space_must_exist() {
        let text = "[clusters.a]\nscratch_root = \"/scratch\"\nnear_spaces = [\"nope\"]\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("clusters.a.near_spaces"), "{err}");
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn samba_needs_token_key() {
        let text = "[samba]\nsmb_conf = \"/etc/smb.conf\"\nallowed_roots = [\"/datanet\"]\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("samba.token_key_file"), "{err}");
    }
}
