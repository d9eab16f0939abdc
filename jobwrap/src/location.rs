//! `space:path` locations in storage spaces and relative paths in a job's working
//! directory.
//!
//! Both kinds of path are checked once, when a job is declared: a location never has a
//! leading `/`, an empty component (apart from a trailing `/`), `.` or `..`, so joining
//! it to a space prefix or a working directory can never leave that prefix or directory.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// An object or prefix in a storage space, written `space:path`.
///
/// A path that ends with `/` names a prefix (a "directory" of objects); an empty path
/// names the root of the space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceLocation {
    pub space: String,
    pub path: String,
}

impl SpaceLocation {
    /// Parses `space:path`, naming `what` (for example "stage-in source") in errors.
    pub fn parse(text: &str, what: &str) -> Result<SpaceLocation, SpecError> {
        let Some((space, path)) = text.split_once(':') else {
            return Err(SpecError::invalid(
                what,
                text,
                "write SPACE:PATH, for example models:cases/achtel2.inp",
            ));
        };
        datanet::config::validate_space_name(space)
            .map_err(|err| SpecError::invalid(what, text, err.to_string()))?;
        check_relative(path, true).map_err(|reason| SpecError::invalid(what, text, reason))?;
        let location = SpaceLocation {
            space: space.to_string(),
            path: path.to_string(),
        };
        if location.path.chars().any(|c| c.is_ascii_control()) {
            return Err(SpecError::invalid(what, text, "a path may not contain control characters"));
        }
        location.object_path().map_err(|reason| SpecError::invalid(what, text, reason))?;
        Ok(location)
    }

    /// True when the location names a prefix rather than one object.
    pub fn is_prefix(&self) -> bool {
        self.path.is_empty() || self.path.ends_with('/')
    }

    /// Returns the object path with any trailing `/` removed, as `object_store` expects. The
    /// key is kept byte for byte (no percent-encoding), as the datanet mount stores it.
    pub fn object_path(&self) -> Result<object_store::path::Path, String> {
        datanet::namespace::object_path(self.path.trim_end_matches('/'))
            .map_err(|err| format!("{self}: {err}"))
    }

    /// The location of `relative` below this prefix.
    pub fn join(&self, relative: &str) -> SpaceLocation {
        let mut path = self.path.clone();
        if !path.is_empty() && !path.ends_with('/') {
            path.push('/');
        }
        path.push_str(relative);
        SpaceLocation {
            space: self.space.clone(),
            path,
        }
    }
}

impl fmt::Display for SpaceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.space, self.path)
    }
}

/// Checks a path relative to a space or to the working directory. `allow_empty` accepts
/// the empty path (the root of a space).
pub fn check_relative(path: &str, allow_empty: bool) -> Result<(), String> {
    if path.is_empty() {
        return if allow_empty { Ok(()) } else { Err("the path is empty".into()) };
    }
    if path.starts_with('/') {
        return Err("use a relative path without a leading '/'".into());
    }
    if path.contains('\0') || path.contains('\n') {
        return Err("a path may not contain NUL or newline characters".into());
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    for component in trimmed.split('/') {
        match component {
            "" => return Err("the path has an empty component ('//')".into()),
            "." | ".." => return Err("'.' and '..' are not allowed in paths".into()),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a destination inside the job's working directory; the name `.jobwrap` is
/// reserved for jobwrap's own files.
pub fn check_workdir_path(path: &str) -> Result<(), String> {
    check_relative(path, false)?;
    if path.split('/').next() == Some(crate::workdir::CONTROL_DIR) {
        return Err(format!("{} is reserved for jobwrap's own files", crate::workdir::CONTROL_DIR));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_parses_space_and_path() {
        let location = SpaceLocation::parse("models:cases/a b.inp", "input").unwrap();
        assert_eq!(location.space, "models");
        assert_eq!(location.path, "cases/a b.inp");
        assert!(!location.is_prefix());
        assert!(SpaceLocation::parse("models:meshes/", "input").unwrap().is_prefix());
        assert!(SpaceLocation::parse("models:", "input").unwrap().is_prefix());
    }

    #[test]
    fn location_rejects_escapes() {
        for bad in ["models", "models:/abs", "models:a/../b", "models:a//b", "bad space:x"] {
            let err = SpaceLocation::parse(bad, "stage-in source").unwrap_err().to_string();
            assert!(err.contains("stage-in source"), "{err}");
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn object_path_keeps_keys_byte_for_byte() {
        for key in ["u/hash#1.txt", "pct%20.txt", "p%41.txt", "a b+c.txt", "q\"'*?\\<>|.txt", "é/ü ß.txt"] {
            let location = SpaceLocation::parse(&format!("models:{key}"), "input").unwrap();
            assert_eq!(location.object_path().unwrap().as_ref(), key);
        }
        let prefix = SpaceLocation::parse("models:dir #1/", "input").unwrap();
        assert_eq!(prefix.object_path().unwrap().as_ref(), "dir #1");
        assert!(SpaceLocation::parse("models:tab\there", "input").is_err());
    }

    #[test]
    fn join_adds_one_separator() {
        let prefix = SpaceLocation::parse("results:runs/a", "output").unwrap();
        assert_eq!(prefix.join("x.dat").path, "runs/a/x.dat");
        let root = SpaceLocation::parse("results:", "output").unwrap();
        assert_eq!(root.join("x.dat").path, "x.dat");
    }

    #[test]
    fn workdir_paths_exclude_control_dir() {
        assert!(check_workdir_path("mesh/a.inp").is_ok());
        assert!(check_workdir_path(".jobwrap/script").is_err());
        assert!(check_workdir_path("../etc").is_err());
    }
}
