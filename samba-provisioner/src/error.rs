//! The error type of the provisioner library.
//!
//! Every variant renders as one line that names the value at fault and the fix. No
//! variant carries a password or a token: tool output is captured from commands that
//! never echo their standard input, and token errors describe the token's shape only.

use std::path::PathBuf;

use datanet::ConfigError;

use crate::secret::RandomError;
use crate::token::TokenError;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A request value (path, label, client address, TTL, lease id) is not acceptable.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidInput {
        what: &'static str,
        value: String,
        reason: String,
    },

    #[error(transparent)]
    Token(#[from] TokenError),

    #[error(transparent)]
    Random(#[from] RandomError),

    #[error("no lease {id} in {dir}; `samba-provisioner list` shows the current leases")]
    LeaseNotFound { id: String, dir: PathBuf },

    #[error(
        "corrupt lease record {path}: {reason}; move the file away and run `samba-provisioner gc`"
    )]
    CorruptLease { path: PathBuf, reason: String },

    /// An external tool (`useradd`, `pdbedit`, `net`, `smbcontrol`) exited with an error.
    #[error("{program} failed while {action} ({status}): {stderr}")]
    Tool {
        program: String,
        action: String,
        status: String,
        stderr: String,
    },

    #[error("cannot run {program} while {action}: {source}; install it or fix PATH")]
    Spawn {
        program: String,
        action: String,
        source: std::io::Error,
    },

    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Characters of a rejected value that an error repeats; a longer value is cut there,
/// so that a huge request value never floods a log or a terminal.
const MAX_ECHOED_CHARS: usize = 100;

impl ProvisionError {
    pub(crate) fn invalid(
        what: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ProvisionError::InvalidInput {
            what,
            value: shorten(value.into()),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ProvisionError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// Tells whether the caller sent something wrong, as opposed to a server-side failure.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            ProvisionError::InvalidInput { .. }
                | ProvisionError::Token(_)
                | ProvisionError::LeaseNotFound { .. }
        )
    }
}

/// Cuts `value` to its first [`MAX_ECHOED_CHARS`] characters, marked with `...`.
fn shorten(value: String) -> String {
    match value.char_indices().nth(MAX_ECHOED_CHARS) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_value_echo_is_cut() {
        let err = ProvisionError::invalid("label", "é".repeat(10_000), "too long").to_string();
        assert!(err.starts_with(&format!("invalid label \"{}...\"", "é".repeat(MAX_ECHOED_CHARS))), "{err}");
        assert_eq!(ProvisionError::invalid("label", "short", "x").to_string(), "invalid label \"short\": x");
    }
}
