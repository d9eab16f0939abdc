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

impl ProvisionError {
    pub(crate) fn invalid(
        what: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ProvisionError::InvalidInput {
            what,
            value: value.into(),
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
