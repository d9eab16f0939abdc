//! POSIX metadata (mode, owner, mtime, symlink targets, `user.*` extended attributes)
//! stored with each object, in the format s3fs uses.
//!
//! S3 keeps the values as user metadata on the object itself. `x-amz-meta-mode` is the
//! decimal `st_mode` including the file type bits, `x-amz-meta-uid` and `-gid` the
//! owner, and `x-amz-meta-mtime` the seconds (with `.nnnnnnnnn` when not whole).
//! `x-amz-meta-xattr` is a percent-encoded JSON object that maps each attribute name to
//! its base64 value. A symlink is a small object whose content is the target and whose mode
//! has `S_IFLNK`. Objects written by other tools carry none of these keys; they get the
//! space's configured owner and mode and the object's last-modified time.
//!
//! Local (`file://`) spaces cannot carry object attributes through `object_store`, so the
//! same key/value map is kept in one extended attribute, [`LOCAL_XATTR`], of the file that
//! holds the object, and the mtime is also set on that file so that listings show it.
//!
//! Listings carry no user metadata. Callers show listing entries with the defaults of
//! [`PosixMeta::resolve`] and replace them with stored values once a HEAD (see
//! [`read_meta`]) has been done for that entry; the invariant is that a value written
//! through this module is what the next HEAD returns.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{Attribute, AttributeValue, Attributes, GetOptions, ObjectMeta, ObjectStoreExt};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};

use crate::config::{SpaceConfig, SpaceLocation};
use crate::store::Space;

/// `st_mode` file type bits (from `<sys/stat.h>`; identical on every Linux architecture).
pub const S_IFMT: u32 = 0o170000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;

/// Extended attribute of a local space's file that contains the metadata map as JSON.
pub const LOCAL_XATTR: &str = "user.datanet.meta";

/// Upper bound of the encoded metadata of one object. S3 limits user metadata to 2 KiB
/// in total (keys and values); the numeric keys take well under 100 bytes.
pub const MAX_XATTR_ENCODED_BYTES: usize = 1900;

/// Extended attribute namespace accepted by [`PosixMeta::set_xattr`].
const USER_NAMESPACE: &str = "user.";

const KEY_MODE: &str = "mode";
const KEY_UID: &str = "uid";
const KEY_GID: &str = "gid";
const KEY_MTIME: &str = "mtime";
const KEY_XATTR: &str = "xattr";

/// Errors of extended attribute operations; each maps to one errno.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XattrError {
    #[error("extended attribute {0:?} is not in the user. namespace")]
    NotSupported(String),

    #[error("extended attribute {0:?} not found")]
    NotFound(String),

    #[error("extended attribute {0:?} already exists")]
    Exists(String),

    #[error("extended attributes of this object would exceed {MAX_XATTR_ENCODED_BYTES} encoded bytes")]
    NoSpace,

    #[error("invalid extended attribute name {0:?}")]
    InvalidName(String),
}

impl XattrError {
    /// The errno that `setxattr(2)` and friends return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            XattrError::NotSupported(_) => libc::EOPNOTSUPP,
            XattrError::NotFound(_) => libc::ENODATA,
            XattrError::Exists(_) => libc::EEXIST,
            XattrError::NoSpace => libc::ENOSPC,
            XattrError::InvalidName(_) => libc::EINVAL,
        }
    }
}

/// Treatment of an existing attribute by `setxattr` (`XATTR_CREATE`, `XATTR_REPLACE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrSetMode {
    Any,
    CreateOnly,
    ReplaceOnly,
}

impl XattrSetMode {
    /// Decodes the `flags` argument of `setxattr(2)`.
    pub fn from_flags(flags: i32) -> XattrSetMode {
        if flags & libc::XATTR_CREATE != 0 {
            XattrSetMode::CreateOnly
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrSetMode::ReplaceOnly
        } else {
            XattrSetMode::Any
        }
    }
}

/// Metadata stored with one object. `None` means "not stored": the space default applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PosixMeta {
    /// Full `st_mode`, file type bits included.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
    /// `user.*` extended attributes, name to raw value.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Attributes to show for an object once defaults are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedAttr {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
}

impl PosixMeta {
    /// Metadata of a new symlink; its object content is `target`.
    pub fn symlink(uid: u32, gid: u32, mtime: SystemTime) -> PosixMeta {
        PosixMeta {
            mode: Some(S_IFLNK | 0o777),
            uid: Some(uid),
            gid: Some(gid),
            mtime: Some(mtime),
            xattrs: BTreeMap::new(),
        }
    }

    pub fn is_symlink(&self) -> bool {
        self.mode.is_some_and(|mode| mode & S_IFMT == S_IFLNK)
    }

    /// True when nothing is stored, so an upload needs no metadata.
    pub fn is_empty(&self) -> bool {
        self.mode.is_none() && self.uid.is_none() && self.gid.is_none() && self.mtime.is_none() && self.xattrs.is_empty()
    }

    /// Sets the permission bits (and setuid/setgid/sticky), keeping the stored file type or
    /// `default_type` when none is stored.
    pub fn set_permissions(&mut self, mode: u32, default_type: u32) {
        let file_type = self.mode.map(|m| m & S_IFMT).filter(|t| *t != 0).unwrap_or(default_type);
        self.mode = Some(file_type | (mode & 0o7777));
    }

    /// Applies defaults for values that are not stored. `file_type` is the type that the
    /// object's place in the namespace implies (`S_IFREG` or `S_IFDIR`); a stored
    /// `S_IFLNK` wins over it.
    pub fn resolve(&self, space: &SpaceConfig, file_type: u32, last_modified: SystemTime) -> ResolvedAttr {
        let default_perm = if file_type == S_IFDIR { space.dir_mode } else { space.file_mode };
        let mode = match self.mode {
            Some(stored) if stored & S_IFMT == S_IFLNK && file_type != S_IFDIR => stored,
            Some(stored) => file_type | (stored & 0o7777),
            None => file_type | (default_perm & 0o7777),
        };
        ResolvedAttr {
            mode,
            uid: self.uid.unwrap_or(space.uid),
            gid: self.gid.unwrap_or(space.gid),
            mtime: self.mtime.unwrap_or(last_modified),
        }
    }

    // -- extended attributes ------------------------------------------------------------

    /// Sets `user.*` attribute `name`, checking the namespace, the flags and the size
    /// limit before anything changes.
    pub fn set_xattr(&mut self, name: &str, value: &[u8], mode: XattrSetMode) -> Result<(), XattrError> {
        check_xattr_name(name)?;
        let exists = self.xattrs.contains_key(name);
        match mode {
            XattrSetMode::CreateOnly if exists => return Err(XattrError::Exists(name.to_string())),
            XattrSetMode::ReplaceOnly if !exists => return Err(XattrError::NotFound(name.to_string())),
            _ => {}
        }

        let previous = self.xattrs.insert(name.to_string(), value.to_vec());
        if encode_xattrs(&self.xattrs).is_some_and(|encoded| encoded.len() > MAX_XATTR_ENCODED_BYTES) {
            match previous {
                Some(old) => self.xattrs.insert(name.to_string(), old),
                None => self.xattrs.remove(name),
            };
            return Err(XattrError::NoSpace);
        }
        Ok(())
    }

    pub fn get_xattr(&self, name: &str) -> Result<&[u8], XattrError> {
        if !name.starts_with(USER_NAMESPACE) {
            // Other namespaces are never stored, so reading them finds nothing.
            return Err(XattrError::NotFound(name.to_string()));
        }
        self.xattrs
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| XattrError::NotFound(name.to_string()))
    }

    pub fn remove_xattr(&mut self, name: &str) -> Result<(), XattrError> {
        if !name.starts_with(USER_NAMESPACE) {
            return Err(XattrError::NotSupported(name.to_string()));
        }
        self.xattrs
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| XattrError::NotFound(name.to_string()))
    }

    /// Attribute names in the `listxattr(2)` format: each name followed by a NUL byte.
    pub fn list_xattrs(&self) -> Vec<u8> {
        let mut names = Vec::new();
        for name in self.xattrs.keys() {
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        names
    }

    // -- encoding -----------------------------------------------------------------------

    /// Encodes the stored values as user metadata keys (without the `x-amz-meta-` prefix).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        if let Some(mode) = self.mode {
            map.insert(KEY_MODE.to_string(), mode.to_string());
        }
        if let Some(uid) = self.uid {
            map.insert(KEY_UID.to_string(), uid.to_string());
        }
        if let Some(gid) = self.gid {
            map.insert(KEY_GID.to_string(), gid.to_string());
        }
        if let Some(mtime) = self.mtime {
            map.insert(KEY_MTIME.to_string(), format_time(mtime));
        }
        if let Some(encoded) = encode_xattrs(&self.xattrs) {
            map.insert(KEY_XATTR.to_string(), encoded);
        }
        map
    }

    /// Decodes user metadata keys. Malformed values are logged and treated as absent, so
    /// that an object written by a foreign tool never becomes unreadable.
    pub fn from_map<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> PosixMeta {
        let mut meta = PosixMeta::default();
        for (key, value) in entries {
            let value = value.trim();
            let parsed = match key.to_ascii_lowercase().as_str() {
                KEY_MODE => value.parse().map(|v| meta.mode = Some(v)).is_ok(),
                KEY_UID => value.parse().map(|v| meta.uid = Some(v)).is_ok(),
                KEY_GID => value.parse().map(|v| meta.gid = Some(v)).is_ok(),
                KEY_MTIME => parse_time(value).map(|v| meta.mtime = Some(v)).is_some(),
                KEY_XATTR => decode_xattrs(value).map(|v| meta.xattrs = v).is_some(),
                _ => true,
            };
            if !parsed {
                tracing::warn!(key, value, "ignoring malformed object metadata value");
            }
        }
        meta
    }

    pub fn from_attributes(attributes: &Attributes) -> PosixMeta {
        PosixMeta::from_map(attributes.iter().filter_map(|(key, value)| match key {
            Attribute::Metadata(name) => Some((name.as_ref(), value.as_ref())),
            _ => None,
        }))
    }

    /// Writes the stored values into `attributes`, replacing the keys this module owns and
    /// keeping every other attribute (content type, foreign user metadata).
    pub fn merge_into(&self, attributes: &mut Attributes) {
        for key in [KEY_MODE, KEY_UID, KEY_GID, KEY_MTIME, KEY_XATTR] {
            attributes.remove(&Attribute::Metadata(key.into()));
        }
        for (key, value) in self.to_map() {
            attributes.insert(Attribute::Metadata(key.into()), AttributeValue::from(value));
        }
    }

    pub fn to_attributes(&self) -> Attributes {
        let mut attributes = Attributes::new();
        self.merge_into(&mut attributes);
        attributes
    }
}

fn check_xattr_name(name: &str) -> Result<(), XattrError> {
    if !name.starts_with(USER_NAMESPACE) {
        return Err(XattrError::NotSupported(name.to_string()));
    }
    if name.len() == USER_NAMESPACE.len() || name.len() > 255 || name.contains('\0') {
        return Err(XattrError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// s3fs's `x-amz-meta-xattr` value; `None` when there are no attributes.
fn encode_xattrs(xattrs: &BTreeMap<String, Vec<u8>>) -> Option<String> {
    if xattrs.is_empty() {
        return None;
    }
    let json: BTreeMap<&str, String> = xattrs
        .iter()
        .map(|(name, value)| (name.as_str(), base64::engine::general_purpose::STANDARD.encode(value)))
        .collect();
    let text = serde_json::to_string(&json).expect("a map of strings always serializes");
    Some(utf8_percent_encode(&text, NON_ALPHANUMERIC).to_string())
}

fn decode_xattrs(value: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    let text = percent_decode_str(value).decode_utf8().ok()?;
    let json: BTreeMap<String, String> = serde_json::from_str(&text).ok()?;
    json.into_iter()
        .map(|(name, encoded)| {
            let raw = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
            Some((name, raw))
        })
        .collect()
}

fn format_time(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    match since_epoch.subsec_nanos() {
        0 => since_epoch.as_secs().to_string(),
        nanos => format!("{}.{nanos:09}", since_epoch.as_secs()),
    }
}

fn parse_time(text: &str) -> Option<SystemTime> {
    let (seconds, fraction) = text.split_once('.').unwrap_or((text, ""));
    let seconds: u64 = seconds.parse().ok()?;
    let nanos = if fraction.is_empty() {
        0
    } else {
        if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        format!("{fraction:0<9}").parse::<u32>().ok()?
    };
    UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

// ---------------------------------------------------------------------------------------
// Reading and writing metadata of stored objects.

/// Storage place of a space's object metadata.
#[derive(Debug, Clone)]
pub enum MetaTarget {
    /// As object attributes sent with each PUT (S3, memory).
    ObjectAttributes,
    /// As the [`LOCAL_XATTR`] extended attribute of the file under a local root.
    LocalXattr(LocalFileSystem),
}

impl MetaTarget {
    pub fn for_space(space: &SpaceConfig) -> std::io::Result<MetaTarget> {
        match &space.location {
            SpaceLocation::Local { root } => LocalFileSystem::new_with_prefix(root)
                .map(MetaTarget::LocalXattr)
                .map_err(std::io::Error::other),
            _ => Ok(MetaTarget::ObjectAttributes),
        }
    }

    /// Attributes to send with a PUT of `meta`: empty for local spaces, which store them
    /// with [`MetaTarget::apply_after_put`] instead.
    pub fn put_attributes(&self, meta: &PosixMeta) -> Attributes {
        match self {
            MetaTarget::ObjectAttributes => meta.to_attributes(),
            MetaTarget::LocalXattr(_) => Attributes::new(),
        }
    }

    /// Stores `meta` of a local object that was just written; a no-op for object stores.
    pub fn apply_after_put(&self, path: &ObjectPath, meta: &PosixMeta) -> std::io::Result<()> {
        let MetaTarget::LocalXattr(local) = self else {
            return Ok(());
        };
        let file = local.path_to_filesystem(path).map_err(std::io::Error::other)?;
        write_local_meta(&file, meta)
    }

    fn local_file(&self, path: &ObjectPath) -> Option<PathBuf> {
        match self {
            MetaTarget::LocalXattr(local) => local.path_to_filesystem(path).ok(),
            MetaTarget::ObjectAttributes => None,
        }
    }
}

/// Errors of [`read_meta`] and [`write_meta`].
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(transparent)]
    Store(#[from] object_store::Error),

    #[error("cannot access metadata of local file {path}: {source}")]
    Local { path: PathBuf, source: std::io::Error },

    #[error(transparent)]
    Rewrite(#[from] crate::upload::UploadError),
}

impl MetaError {
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            MetaError::Store(object_store::Error::NotFound { .. })
                | MetaError::Rewrite(crate::upload::UploadError::Store(object_store::Error::NotFound { .. }))
        )
    }
}

/// HEADs `path` and decodes its metadata. Returns `NotFound` like any HEAD.
pub async fn read_meta(space: &Space, target: &MetaTarget, path: &ObjectPath) -> Result<(ObjectMeta, PosixMeta), MetaError> {
    let result = space.store.get_opts(path, GetOptions::new().with_head(true)).await?;
    let meta = match target.local_file(path) {
        Some(file) => read_local_meta(&file).map_err(|source| MetaError::Local { path: file, source })?,
        None => PosixMeta::from_attributes(&result.attributes),
    };
    Ok((result.meta, meta))
}

/// Replaces the stored metadata of an existing object without changing its content.
/// `object_store` offers no in-place metadata update, so an object is rewritten through
/// [`crate::upload`]. A local file gets its extended attribute and mtime updated in place.
pub async fn write_meta(
    space: &Space,
    target: &MetaTarget,
    path: &ObjectPath,
    meta: &PosixMeta,
    settings: &crate::upload::UploadSettings,
) -> Result<(), MetaError> {
    if let Some(file) = target.local_file(path) {
        space.store.head(path).await?;
        return write_local_meta(&file, meta).map_err(|source| MetaError::Local { path: file, source });
    }
    crate::upload::rewrite_with_meta(space, path, meta, settings).await?;
    Ok(())
}

/// Reads the metadata kept in [`LOCAL_XATTR`] of a directory of a local space.
pub fn read_local_dir_meta(dir: &std::path::Path) -> std::io::Result<PosixMeta> {
    read_local_meta(dir)
}

/// Stores the extended attributes of `meta` in [`LOCAL_XATTR`] of a directory of a local
/// space; mode and mtime live on the directory itself.
pub fn write_local_dir_meta(dir: &std::path::Path, meta: &PosixMeta) -> std::io::Result<()> {
    let only_xattrs = PosixMeta { xattrs: meta.xattrs.clone(), ..PosixMeta::default() };
    let map = only_xattrs.to_map();
    if map.is_empty() {
        return local_xattr::remove(dir, LOCAL_XATTR);
    }
    let json = serde_json::to_vec(&map).expect("a map of strings always serializes");
    local_xattr::set(dir, LOCAL_XATTR, &json)
}

fn read_local_meta(file: &std::path::Path) -> std::io::Result<PosixMeta> {
    let Some(raw) = local_xattr::get(file, LOCAL_XATTR)? else {
        return Ok(PosixMeta::default());
    };
    let map: BTreeMap<String, String> = match serde_json::from_slice(&raw) {
        Ok(map) => map,
        Err(err) => {
            tracing::warn!(file = %file.display(), error = %err, "ignoring malformed {LOCAL_XATTR}");
            return Ok(PosixMeta::default());
        }
    };
    Ok(PosixMeta::from_map(map.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
}

fn write_local_meta(file: &std::path::Path, meta: &PosixMeta) -> std::io::Result<()> {
    let map = meta.to_map();
    if map.is_empty() {
        local_xattr::remove(file, LOCAL_XATTR)?;
    } else {
        let json = serde_json::to_vec(&map).expect("a map of strings always serializes");
        local_xattr::set(file, LOCAL_XATTR, &json)?;
    }

    // The listing of a local space reports the file's own mtime, so keep it equal.
    if let Some(mtime) = meta.mtime {
        let handle = std::fs::OpenOptions::new().write(true).open(file)?;
        handle.set_modified(mtime)?;
    }
    Ok(())
}

/// Thin wrappers over the Linux xattr system calls for files of local spaces.
mod local_xattr {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    fn c_path(path: &Path) -> std::io::Result<CString> {
        CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)
    }

    pub fn get(path: &Path, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        let path = c_path(path)?;
        let name = CString::new(name).map_err(std::io::Error::other)?;
        let mut buffer = vec![0u8; 4096];
        // SAFETY: both strings are NUL-terminated and the buffer length is passed.
        let len = unsafe {
            libc::getxattr(path.as_ptr(), name.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len())
        };
        if len < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => Ok(None),
                _ => Err(err),
            };
        }
        buffer.truncate(len as usize);
        Ok(Some(buffer))
    }

    pub fn set(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
        let path = c_path(path)?;
        let name = CString::new(name).map_err(std::io::Error::other)?;
        // SAFETY: both strings are NUL-terminated and the value length is passed.
        let rc = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn remove(path: &Path, name: &str) -> std::io::Result<()> {
        let path = c_path(path)?;
        let name = CString::new(name).map_err(std::io::Error::other)?;
        // SAFETY: both strings are NUL-terminated.
        let rc = unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if matches!(err.raw_os_error(), Some(libc::ENODATA) | Some(libc::EOPNOTSUPP)) {
                return Ok(());
            }
            return Err(err);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn space_config() -> SpaceConfig {
        let text = "[spaces.m]\nurl = \"memory://\"\nuid = 1000\ngid = 100\nmode = \"640\"\n";
        Config::parse(text, std::path::Path::new("t.toml")).unwrap().spaces["m"].clone()
    }

    #[test]
    fn map_round_trip() {
        let mut meta = PosixMeta {
            mode: Some(S_IFREG | 0o640),
            uid: Some(1000),
            gid: Some(100),
            mtime: Some(UNIX_EPOCH + Duration::new(1_577_934_245, 500)),
            xattrs: BTreeMap::new(),
        };
        meta.set_xattr("user.DOSATTRIB", b"0x20\0\x01\x02", XattrSetMode::Any).unwrap();
        let map = meta.to_map();
        assert_eq!(map["mode"], "33184");
        assert_eq!(map["mtime"], "1577934245.000000500");
        let decoded = PosixMeta::from_map(map.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(decoded, meta);
    }

    #[test]
    fn s3fs_values_decode() {
        // An s3fs-written xattr value: {"user.test":"dmFs"} percent-encoded.
        let meta = PosixMeta::from_map([
            ("mode", "33261"),
            ("mtime", "981173106"),
            ("xattr", "%7B%22user.test%22%3A%22dmFs%22%7D"),
        ]);
        assert_eq!(meta.mode, Some(0o100755));
        assert_eq!(meta.mtime, Some(UNIX_EPOCH + Duration::from_secs(981_173_106)));
        assert_eq!(meta.get_xattr("user.test").unwrap(), b"val");
    }

    #[test]
    fn malformed_values_ignored() {
        let meta = PosixMeta::from_map([("mode", "rwx"), ("mtime", "1.2.3"), ("uid", "-1"), ("gid", "7")]);
        assert_eq!(meta, PosixMeta { gid: Some(7), ..PosixMeta::default() });
    }

    #[test]
    fn defaults_from_space() {
        let space = space_config();
        let modified = UNIX_EPOCH + Duration::from_secs(5);
        let file = PosixMeta::default().resolve(&space, S_IFREG, modified);
        assert_eq!(file, ResolvedAttr { mode: S_IFREG | 0o640, uid: 1000, gid: 100, mtime: modified });
        let dir = PosixMeta::default().resolve(&space, S_IFDIR, modified);
        assert_eq!(dir.mode, S_IFDIR | 0o750);

        let link = PosixMeta::symlink(1, 2, modified).resolve(&space, S_IFREG, modified);
        assert_eq!(link.mode, S_IFLNK | 0o777);
    }

    #[test]
    fn set_permissions_keeps_type() {
        let mut meta = PosixMeta::default();
        meta.set_permissions(0o4750, S_IFDIR);
        assert_eq!(meta.mode, Some(S_IFDIR | 0o4750));
        meta.set_permissions(0o600, S_IFREG);
        assert_eq!(meta.mode, Some(S_IFDIR | 0o600));
    }

    #[test]
    fn xattr_flags_and_namespace() {
        let mut meta = PosixMeta::default();
        assert_eq!(meta.set_xattr("security.selinux", b"x", XattrSetMode::Any).unwrap_err().errno(), libc::EOPNOTSUPP);
        assert_eq!(meta.set_xattr("user.a", b"1", XattrSetMode::ReplaceOnly).unwrap_err().errno(), libc::ENODATA);
        meta.set_xattr("user.a", b"1", XattrSetMode::CreateOnly).unwrap();
        assert_eq!(meta.set_xattr("user.a", b"2", XattrSetMode::CreateOnly).unwrap_err().errno(), libc::EEXIST);
        meta.set_xattr("user.b", b"", XattrSetMode::Any).unwrap();
        assert_eq!(meta.list_xattrs(), b"user.a\0user.b\0");
        meta.remove_xattr("user.a").unwrap();
        assert_eq!(meta.remove_xattr("user.a").unwrap_err().errno(), libc::ENODATA);
        assert_eq!(meta.get_xattr("user.b").unwrap(), b"");
    }

    #[test]
    fn xattr_size_limit_keeps_old_value() {
        let mut meta = PosixMeta::default();
        meta.set_xattr("user.a", b"small", XattrSetMode::Any).unwrap();
        let err = meta.set_xattr("user.a", &[7u8; 2000], XattrSetMode::Any).unwrap_err();
        assert_eq!(err.errno(), libc::ENOSPC);
        assert_eq!(meta.get_xattr("user.a").unwrap(), b"small");
    }

    #[test]
    fn merge_keeps_foreign_attributes() {
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, "text/plain".into());
        attributes.insert(Attribute::Metadata("owner-team".into()), "cfd".into());
        attributes.insert(Attribute::Metadata("mode".into()), "33188".into());
        let meta = PosixMeta { uid: Some(5), ..PosixMeta::default() };
        meta.merge_into(&mut attributes);
        assert_eq!(attributes.get(&Attribute::ContentType).unwrap().as_ref(), "text/plain");
        assert_eq!(attributes.get(&Attribute::Metadata("owner-team".into())).unwrap().as_ref(), "cfd");
        assert!(attributes.get(&Attribute::Metadata("mode".into())).is_none());
        assert_eq!(PosixMeta::from_attributes(&attributes), meta);
    }

    #[test]
    fn local_xattr_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let meta = PosixMeta {
            mode: Some(S_IFREG | 0o600),
            mtime: Some(UNIX_EPOCH + Duration::from_secs(1_000_000_000)),
            ..PosixMeta::default()
        };
        write_local_meta(&file, &meta).unwrap();
        assert_eq!(read_local_meta(&file).unwrap(), meta);
        let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
        assert_eq!(modified, UNIX_EPOCH + Duration::from_secs(1_000_000_000));
    }
}
