//! Filesystem errors and their errno.
//!
//! Every failure that reaches the kernel goes through [`FsError`], and store errors are
//! mapped to an errno only in [`FsError::from_store`]. The invariant: ENOENT means that
//! the store returned "not found"; throttling, timeouts and server errors (after the retries
//! of `object_store`) become EIO and are never cached as a negative entry.

use std::fmt;

/// An error with the errno the kernel receives and a message for the log.
#[derive(Debug, Clone, thiserror::Error)]
pub struct FsError {
    pub errno: i32,
    pub message: String,
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, errno_name(self.errno))
    }
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        FsError {
            errno,
            message: message.into(),
        }
    }

    pub fn not_found(what: impl fmt::Display) -> Self {
        Self::new(libc::ENOENT, format!("{what} not found"))
    }

    pub fn read_only(space: &str) -> Self {
        Self::new(libc::EROFS, format!("space {space:?} is read-only"))
    }

    pub fn io(message: impl Into<String>) -> Self {
        Self::new(libc::EIO, message)
    }

    /// True when the store reported that the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.errno == libc::ENOENT
    }

    /// Maps an `object_store` error for `what` (a space and key, for the message).
    ///
    /// `object_store` has already retried throttling (503 SlowDown), 5xx responses and
    /// timeouts with backoff when an error reaches this function.
    pub fn from_store(err: object_store::Error, what: &str) -> Self {
        use object_store::Error as E;

        let (errno, kind) = match &err {
            E::NotFound { .. } => (libc::ENOENT, "not found"),
            E::AlreadyExists { .. } => (libc::EEXIST, "already exists"),
            E::Precondition { .. } => (libc::ESTALE, "changed in the store since it was opened"),
            E::NotModified { .. } => (libc::ESTALE, "not modified"),
            E::PermissionDenied { .. } => (libc::EACCES, "permission denied by the store"),
            E::Unauthenticated { .. } => (libc::EACCES, "credentials rejected by the store"),
            E::NotSupported { .. } | E::NotImplemented { .. } => (libc::ENOTSUP, "not supported by the store"),
            E::InvalidPath { .. } => (libc::EINVAL, "invalid object key"),
            _ => (libc::EIO, "store request failed"),
        };

        // Listings report HTTP errors as `Generic`, so denial is recognized by the status
        // line and the S3 error codes in the message (never by words of the key, which
        // appears percent-encoded there).
        let detail = err.to_string();
        let credentials_problem = [
            "ExpiredToken",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "TokenRefreshRequired",
            "<Code>AccessDenied</Code>",
            "403 Forbidden",
            "401 Unauthorized",
        ]
        .iter()
        .any(|code| detail.contains(code));
        if credentials_problem || errno == libc::EACCES {
            if let Some(suppressed) = denial_log_allowed() {
                tracing::error!(
                    object = what,
                    error = %detail,
                    suppressed,
                    "the store rejected the credentials or denied access; check the space's access key, secret and session token"
                );
            }
            return Self::new(libc::EACCES, format!("{what}: {kind}: {detail}"));
        }
        if errno == libc::EIO {
            tracing::warn!(object = what, error = %detail, "store request failed after retries");
        }
        Self::new(errno, format!("{what}: {kind}: {detail}"))
    }

    pub fn from_io(err: std::io::Error, what: &str) -> Self {
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        Self::new(errno, format!("{what}: {err}"))
    }
}

/// Shortest time between two log lines about rejected credentials.
const DENIAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Rate-limits the credentials error: returns how many lines were suppressed since the
/// last one when a line may be logged now, or `None` to stay quiet.
fn denial_log_allowed() -> Option<u64> {
    use std::sync::Mutex;
    use std::time::Instant;

    static LAST: Mutex<Option<(Instant, u64)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    match last.as_mut() {
        Some((at, suppressed)) if at.elapsed() < DENIAL_LOG_INTERVAL => {
            *suppressed += 1;
            None
        }
        _ => {
            let suppressed = last.map_or(0, |(_, count)| count);
            *last = Some((Instant::now(), 0));
            Some(suppressed)
        }
    }
}

/// Returns the symbolic name of common errno values, for log lines.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ESTALE => "ESTALE",
        libc::ENOTSUP => "ENOTSUP",
        libc::EPERM => "EPERM",
        libc::EBADF => "EBADF",
        libc::EILSEQ => "EILSEQ",
        libc::EXDEV => "EXDEV",
        _ => "errno",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_maps_to_enoent() {
        let err = object_store::Error::NotFound {
            path: "a".into(),
            source: "missing".into(),
        };
        assert_eq!(FsError::from_store(err, "s/a").errno, libc::ENOENT);
    }

    #[test]
    fn generic_failure_maps_to_eio_not_enoent() {
        let err = object_store::Error::Generic {
            store: "S3",
            source: "Server returned 503 SlowDown after 8 retries".into(),
        };
        let mapped = FsError::from_store(err, "s/a");
        assert_eq!(mapped.errno, libc::EIO);
        assert!(!mapped.is_not_found());
    }

    #[test]
    fn expired_token_maps_to_eacces() {
        let err = object_store::Error::Generic {
            store: "S3",
            source: "ExpiredToken: The provided token has expired".into(),
        };
        assert_eq!(FsError::from_store(err, "s/a").errno, libc::EACCES);
    }

    #[test]
    fn denied_listing_maps_to_eacces() {
        let err = object_store::Error::Generic {
            store: "S3",
            source: "Error performing list request: Server returned non-2xx status code: 403 Forbidden: <Code>AccessDenied</Code>".into(),
        };
        assert_eq!(FsError::from_store(err, "s/").errno, libc::EACCES);
    }

    #[test]
    fn precondition_maps_to_estale() {
        let err = object_store::Error::Precondition {
            path: "a".into(),
            source: "etag".into(),
        };
        assert_eq!(FsError::from_store(err, "s/a").errno, libc::ESTALE);
    }
}
