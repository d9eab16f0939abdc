//! Input checks that confine a lease: which directory it may expose and which text may
//! enter a share definition.
//!
//! Invariant: a path returned by [`confine_directory`] is absolute, canonical, an
//! existing directory strictly inside a configured allowed root, and no component of
//! the path as given is a symbolic link. Text accepted by [`check_config_text`] has
//! no character that `smb.conf` syntax interprets (`%` substitutions, `\` line
//! continuation, `"` quoting, control characters, edge whitespace).

use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use crate::ProvisionError;

/// Maximum label length in bytes of UTF-8. Labels appear in listings and logs, never in Samba.
pub const MAX_LABEL_BYTES: usize = 256;

/// Characters that `smb.conf` parsing would interpret inside a parameter value.
const CONFIG_METACHARACTERS: &[char] = &['%', '\\', '"'];

/// Rejects text that `smb.conf` syntax would interpret or that could break a line.
pub fn check_config_text(what: &'static str, value: &str) -> Result<(), ProvisionError> {
    if value.is_empty() {
        return Err(ProvisionError::invalid(what, value, "it is empty"));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(ProvisionError::invalid(
            what,
            value,
            format!(
                "it contains the control character U+{:04X}; remove it",
                c as u32
            ),
        ));
    }
    if let Some(c) = value.chars().find(|c| CONFIG_METACHARACTERS.contains(c)) {
        return Err(ProvisionError::invalid(
            what,
            value,
            format!("it contains {c:?}, which Samba's configuration syntax interprets; rename it without % \\ or \""),
        ));
    }
    if value.trim() != value {
        return Err(ProvisionError::invalid(
            what,
            value,
            "it starts or ends with whitespace, which Samba strips",
        ));
    }
    Ok(())
}

/// Checks a lease label: shown in listings and logs, so it obeys the same rules.
pub fn check_label(label: &str) -> Result<(), ProvisionError> {
    // Length first, so that a huge label is never scanned or copied further.
    if label.len() > MAX_LABEL_BYTES {
        return Err(ProvisionError::invalid(
            "label",
            label,
            format!("it has {} bytes, more than the maximum of {MAX_LABEL_BYTES}; shorten it", label.len()),
        ));
    }
    check_config_text("label", label)?;
    Ok(())
}

/// Parses the graphical node's address for `hosts allow`.
pub fn parse_client_ip(text: &str) -> Result<IpAddr, ProvisionError> {
    text.trim().parse::<IpAddr>().map_err(|_| {
        ProvisionError::invalid(
            "client IP",
            text,
            "write one IPv4 or IPv6 address such as 10.0.0.5",
        )
    })
}

/// Checks `dir` and returns the canonical directory a share may expose.
pub fn confine_directory(dir: &Path, allowed_roots: &[PathBuf]) -> Result<PathBuf, ProvisionError> {
    let text = dir.to_str().ok_or_else(|| {
        ProvisionError::invalid("path", dir.to_string_lossy(), "it is not valid UTF-8")
    })?;
    check_config_text("path", text)?;
    if !dir.is_absolute() {
        return Err(ProvisionError::invalid(
            "path",
            text,
            "use an absolute path",
        ));
    }
    // `Path::components` drops `.` segments, so check the text itself.
    if text
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(ProvisionError::invalid(
            "path",
            text,
            "it has a '.' or '..' segment; give the direct path",
        ));
    }

    reject_symlink_components(dir, text)?;

    let canonical = dir.canonicalize().map_err(|err| {
        ProvisionError::invalid("path", text, format!("cannot resolve it: {err}"))
    })?;
    if !canonical.is_dir() {
        return Err(ProvisionError::invalid(
            "path",
            text,
            "it is not a directory",
        ));
    }
    let canonical_text = canonical.to_str().unwrap_or_default();
    check_config_text("path", canonical_text)?;

    let roots: Vec<PathBuf> = allowed_roots
        .iter()
        .filter_map(|root| root.canonicalize().ok())
        .collect();
    let inside = roots
        .iter()
        .any(|root| canonical.starts_with(root) && canonical != *root);
    if !inside {
        let listed: Vec<String> = allowed_roots
            .iter()
            .map(|root| root.display().to_string())
            .collect();
        return Err(ProvisionError::invalid(
            "path",
            text,
            format!(
                "it is not inside an allowed root ({}); pick a directory below one of them or extend samba.allowed_roots",
                listed.join(", ")
            ),
        ));
    }
    Ok(canonical)
}

/// Walks every prefix of `dir` and rejects the first one that is a symbolic link.
fn reject_symlink_components(dir: &Path, text: &str) -> Result<(), ProvisionError> {
    let mut prefix = PathBuf::new();
    for component in dir.components() {
        prefix.push(component);
        if !matches!(component, Component::Normal(_)) {
            continue;
        }
        let metadata = std::fs::symlink_metadata(&prefix).map_err(|err| {
            ProvisionError::invalid(
                "path",
                text,
                format!("cannot inspect {}: {err}", prefix.display()),
            )
        })?;
        if metadata.file_type().is_symlink() {
            let target = std::fs::read_link(&prefix)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "an unreadable target".into());
            return Err(ProvisionError::invalid(
                "path",
                text,
                format!(
                    "{} is a symbolic link to {target}; give the path without symbolic links",
                    prefix.display()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_text_rejects_metacharacters() {
        for bad in [
            "a%U", "a\\b", "a\"b", "a\nb", "a\tb", " a", "a ", "", "x\u{7f}",
        ] {
            assert!(check_config_text("label", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["run 12 (mesh)", "CAE #4", "Strömung", "a;b"] {
            assert!(
                check_config_text("label", good).is_ok(),
                "{good:?} rejected"
            );
        }
    }

    #[test]
    fn long_label_rejected() {
        assert!(check_label(&"x".repeat(MAX_LABEL_BYTES)).is_ok());
        let err = check_label(&"x".repeat(100_000)).unwrap_err().to_string();
        assert!(err.contains("more than the maximum of 256"), "{err}");
        assert!(err.len() < 300, "the label was echoed: {} bytes of message", err.len());
    }

    #[test]
    fn client_ip_must_be_an_address() {
        assert!(parse_client_ip("10.0.0.5").is_ok());
        assert!(parse_client_ip("::1").is_ok());
        let err = parse_client_ip("10.0.0.0/8").unwrap_err().to_string();
        assert!(err.contains("10.0.0.0/8"), "{err}");
        assert!(parse_client_ip("host, 10.0.0.1").is_err());
    }

    #[test]
    fn directory_inside_root_is_canonical() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("project");
        std::fs::create_dir(&dir).unwrap();
        let confined = confine_directory(&dir, &[root.path().to_path_buf()]).unwrap();
        assert_eq!(confined, dir.canonicalize().unwrap());
    }

    #[test]
    fn root_itself_and_outside_rejected() {
        let root = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let roots = [root.path().to_path_buf()];
        let err = confine_directory(root.path(), &roots)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not inside an allowed root"), "{err}");
        let err = confine_directory(other.path(), &roots)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not inside an allowed root"), "{err}");
    }

    #[test]
    fn dot_segments_rejected() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        let roots = [root.path().to_path_buf()];
        for text in ["a/../a", "a/.", "./a"] {
            let dir = PathBuf::from(format!("{}/{text}", root.path().display()));
            let err = confine_directory(&dir, &roots).unwrap_err().to_string();
            assert!(err.contains("'..' segment"), "{text}: {err}");
        }
    }

    #[test]
    fn symlink_component_rejected() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        std::fs::create_dir_all(real.join("inner")).unwrap();
        std::os::unix::fs::symlink(&real, root.path().join("link")).unwrap();
        let roots = [root.path().to_path_buf()];
        let err = confine_directory(&root.path().join("link/inner"), &roots)
            .unwrap_err()
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::os::unix::fs::symlink("/etc", root.path().join("etc")).unwrap();
        let err = confine_directory(&root.path().join("etc"), &roots)
            .unwrap_err()
            .to_string();
        assert!(err.contains("symbolic link to /etc"), "{err}");
    }

    #[test]
    fn relative_missing_and_file_paths_rejected() {
        let root = tempfile::tempdir().unwrap();
        let roots = [root.path().to_path_buf()];
        assert!(confine_directory(Path::new("relative/dir"), &roots).is_err());
        assert!(confine_directory(&root.path().join("missing"), &roots).is_err());
        let file = root.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = confine_directory(&file, &roots).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn metacharacter_in_directory_rejected() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a%Ub");
        std::fs::create_dir(&dir).unwrap();
        let err = confine_directory(&dir, &[root.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("'%'"), "{err}");
    }
}
