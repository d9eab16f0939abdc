//! The rule that maps object keys to POSIX names and back.
//!
//! A name is one path segment of a key, kept byte for byte: no Unicode normalization
//! (NFC and NFD spellings are distinct files), no escaping of space, `+`, `%` or `#`.
//! A file name has at most [`NAME_MAX_BYTES`] bytes and the full object key (space
//! prefix included, plus the `/` of a directory marker) at most [`KEY_MAX_BYTES`];
//! longer names fail with ENAMETOOLONG before anything is written.
//!
//! Keys that cannot become a POSIX name are not listed and never turn into EIO or
//! unreadable entries: segments longer than [`NAME_MAX_BYTES`], segments with ASCII
//! control characters, and `.` or `..` segments. Such objects stay untouched in the store.

use std::ffi::OsStr;

use crate::error::{FsError, FsResult};

/// Maximum file name length in bytes; `statfs` reports it as `namelen`.
pub const NAME_MAX_BYTES: usize = 255;

/// Maximum object key length that S3 accepts, in UTF-8 bytes.
pub const KEY_MAX_BYTES: usize = 1024;

/// Checks a name that the kernel passed in (create, mkdir, rename, lookup).
pub fn validate_name(name: &OsStr) -> FsResult<&str> {
    use std::os::unix::ffi::OsStrExt;

    if name.as_bytes().len() > NAME_MAX_BYTES {
        return Err(FsError::new(
            libc::ENAMETOOLONG,
            format!("name of {} bytes is longer than {NAME_MAX_BYTES}", name.as_bytes().len()),
        ));
    }
    let text = name.to_str().ok_or_else(|| {
        FsError::new(libc::EILSEQ, format!("name {name:?} is not UTF-8; object keys are UTF-8"))
    })?;
    if text.chars().any(|c| c.is_ascii_control()) {
        return Err(FsError::new(
            libc::EINVAL,
            format!("name {text:?} contains a control character, which object keys here cannot hold"),
        ));
    }
    if text.is_empty() || text == "." || text == ".." || text.contains('/') {
        return Err(FsError::new(libc::EINVAL, format!("invalid name {text:?}")));
    }
    Ok(text)
}

/// True when a name from a listing can be shown as a directory entry.
pub fn is_listable(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX_BYTES
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c.is_ascii_control())
}

/// Returns the key of `name` inside the directory whose key is `parent` ("" is the space root).
pub fn child_key(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// Splits a key into its directory part and its last segment.
pub fn split_key(key: &str) -> (&str, &str) {
    match key.rsplit_once('/') {
        Some((parent, name)) => (parent, name),
        None => ("", key),
    }
}

/// Rejects keys that the store cannot hold: `space_prefix` is the space's key prefix and
/// `is_dir` adds the trailing `/` of a directory marker.
pub fn check_key_length(space_prefix: &str, key: &str, is_dir: bool) -> FsResult<()> {
    let prefix_bytes = if space_prefix.is_empty() { 0 } else { space_prefix.len() + 1 };
    let total = prefix_bytes + key.len() + usize::from(is_dir);
    if total > KEY_MAX_BYTES {
        return Err(FsError::new(
            libc::ENAMETOOLONG,
            format!("object key of {total} bytes would exceed the store's limit of {KEY_MAX_BYTES}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_up_to_255_bytes_accepted() {
        let name = "a".repeat(255);
        assert_eq!(validate_name(OsStr::new(&name)).unwrap(), name);
        let err = validate_name(OsStr::new(&"a".repeat(256))).unwrap_err();
        assert_eq!(err.errno, libc::ENAMETOOLONG);
    }

    #[test]
    fn special_characters_kept_as_given() {
        for name in ["a b.txt", "a+b.txt", "50%.txt", "#1", "caf\u{e9}", "cafe\u{301}"] {
            assert_eq!(validate_name(OsStr::new(name)).unwrap(), name);
        }
    }

    #[test]
    fn control_characters_rejected() {
        assert_eq!(validate_name(OsStr::new("a\nb")).unwrap_err().errno, libc::EINVAL);
        assert!(!is_listable("a\tb"));
    }

    #[test]
    fn key_length_counts_prefix_and_marker() {
        let key = "k".repeat(1020);
        assert!(check_key_length("", &key, false).is_ok());
        assert!(check_key_length("abc", &key, false).is_ok());
        assert_eq!(check_key_length("abcd", &key, false).unwrap_err().errno, libc::ENAMETOOLONG);
        assert!(check_key_length("", &"k".repeat(1024), false).is_ok());
        assert!(check_key_length("", &"k".repeat(1024), true).is_err());
    }

    #[test]
    fn keys_split_and_join() {
        assert_eq!(child_key("", "a"), "a");
        assert_eq!(child_key("a/b", "c"), "a/b/c");
        assert_eq!(split_key("a/b/c"), ("a/b", "c"));
        assert_eq!(split_key("c"), ("", "c"));
    }
}
