//! The definition of one lease share, rendered as an `smb.conf` section for
//! `net conf import`.
//!
//! Invariant: the share exposes exactly its directory to exactly its account. Symbolic
//! links are neither followed nor shown (`wide links = no`, `follow symlinks = no`),
//! guests are refused, the share is not listed, and file I/O runs as the configured
//! owner (`force user`, `force group`), so files appear in the space with that owner.

use std::ffi::CString;
use std::fmt::Write;
use std::net::IpAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::confine::check_config_text;
use crate::ProvisionError;

/// Comment written on every lease share; reconcile removes only shares that carry it.
pub const SHARE_COMMENT: &str = "datanet samba lease";

#[derive(Debug, Clone)]
pub struct ShareDefinition {
    pub name: String,
    pub path: PathBuf,
    pub account: String,
    pub lease_id: String,
    pub read_only: bool,
    pub force_user: Option<String>,
    pub force_group: Option<String>,
    /// `required`, `desired` or `off`.
    pub encrypt: String,
    pub client_ip: Option<IpAddr>,
    /// Whether the directory's filesystem stores `user.*` extended attributes. Samba
    /// keeps DOS attributes and streams there; without them it must not try.
    pub user_xattrs: bool,
}

impl ShareDefinition {
    /// Renders the section, checking every value against `smb.conf` syntax once more.
    pub fn to_section(&self) -> Result<String, ProvisionError> {
        let path = self.path.to_str().unwrap_or_default();
        let mut parameters: Vec<(&str, String)> = vec![
            ("path", path.to_string()),
            ("comment", format!("{SHARE_COMMENT} {}", self.lease_id)),
            ("valid users", self.account.clone()),
            ("read only", yes_no(self.read_only)),
            ("browseable", "no".into()),
            ("guest ok", "no".into()),
            ("wide links", "no".into()),
            ("follow symlinks", "no".into()),
            ("server smb encrypt", self.encrypt.clone()),
        ];
        if let Some(user) = &self.force_user {
            parameters.push(("force user", user.clone()));
        }
        if let Some(group) = &self.force_group {
            parameters.push(("force group", group.clone()));
        }
        if let Some(ip) = self.client_ip {
            // Samba admits 127.0.0.1 and ::1 unless `hosts deny` matches them and
            // `hosts allow` does not, so `ALL` also closes the loopback path.
            parameters.push(("hosts allow", ip.to_string()));
            parameters.push(("hosts deny", "ALL".into()));
        }
        if !self.user_xattrs {
            parameters.push(("ea support", "no".into()));
            parameters.push(("store dos attributes", "no".into()));
        }

        check_config_text("share name", &self.name)?;
        let mut section = format!("[{}]\n", self.name);
        for (key, value) in parameters {
            check_config_text("share parameter", &value)?;
            let _ = writeln!(section, "\t{key} = {value}");
        }
        Ok(section)
    }
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_string()
}

/// Tells whether the filesystem under `dir` stores `user.*` extended attributes.
///
/// The probe writes and removes one attribute, because reading is not enough. A FUSE
/// filesystem that implements `getxattr` but not `setxattr` returns "no such
/// attribute" to reads and rejects every write. The probe changes only the ctime.
pub fn supports_user_xattrs(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let name = c"user.datanet.probe";
    let value = b"1";
    // SAFETY: both strings are NUL-terminated and outlive the calls; `value` is valid
    // for `value.len()` bytes.
    let set = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if set != 0 {
        return false;
    }
    // SAFETY: as above.
    let removed = unsafe { libc::lremovexattr(path.as_ptr(), name.as_ptr()) };
    if removed != 0 {
        tracing::warn!(dir = %dir.display(), error = %std::io::Error::last_os_error(), "cannot remove the xattr probe");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition() -> ShareDefinition {
        ShareDefinition {
            name: "dnlabcdef012345".into(),
            path: "/datanet/models/run 1".into(),
            account: "dnlabcdef012345".into(),
            lease_id: "abcdefgh01234567".into(),
            read_only: false,
            force_user: Some("cae".into()),
            force_group: Some("cae".into()),
            encrypt: "required".into(),
            client_ip: Some("10.0.0.5".parse().unwrap()),
            user_xattrs: true,
        }
    }

    #[test]
    fn section_confines_share() {
        let section = definition().to_section().unwrap();
        for line in [
            "[dnlabcdef012345]",
            "\tpath = /datanet/models/run 1",
            "\tvalid users = dnlabcdef012345",
            "\twide links = no",
            "\tfollow symlinks = no",
            "\tbrowseable = no",
            "\tguest ok = no",
            "\tforce user = cae",
            "\thosts allow = 10.0.0.5",
            "\thosts deny = ALL",
            "\tserver smb encrypt = required",
            "\tread only = no",
        ] {
            assert!(
                section.lines().any(|l| l == line),
                "missing {line:?} in\n{section}"
            );
        }
        assert!(!section.contains("store dos attributes"), "{section}");
    }

    #[test]
    fn section_without_xattrs_disables_dos_attributes() {
        let mut share = definition();
        share.user_xattrs = false;
        share.client_ip = None;
        let section = share.to_section().unwrap();
        assert!(
            section.contains("\tstore dos attributes = no\n"),
            "{section}"
        );
        assert!(section.contains("\tea support = no\n"), "{section}");
        assert!(!section.contains("hosts allow"), "{section}");
    }

    #[test]
    fn injected_newline_rejected() {
        let mut share = definition();
        share.path = "/datanet/x\n[global]".into();
        assert!(share.to_section().is_err());
    }

    #[test]
    fn xattr_probe_on_missing_directory_is_false() {
        assert!(!supports_user_xattrs(Path::new("/nonexistent/dir")));
    }

    #[test]
    fn xattr_probe_leaves_no_attribute() {
        let dir = tempfile::tempdir().unwrap();
        if supports_user_xattrs(dir.path()) {
            let path = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
            // SAFETY: a null buffer of size 0 only requests the value's size.
            let size = unsafe {
                libc::lgetxattr(
                    path.as_ptr(),
                    c"user.datanet.probe".as_ptr(),
                    std::ptr::null_mut(),
                    0,
                )
            };
            assert_eq!(size, -1, "the probe attribute was left behind");
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::ENODATA)
            );
        }
    }
}
