//! Error types of the jobwrap library: [`SpecError`] for a job declaration that cannot
//! be accepted, [`JobError`] for everything that fails while a job is handled.

use std::path::PathBuf;

/// A job declaration (directive, flag, sbatch option or job file) that is invalid.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: String,
        value: String,
        reason: String,
    },

    #[error("{0}")]
    Usage(String),
}

impl SpecError {
    pub fn invalid(what: impl Into<String>, value: impl Into<String>, reason: impl Into<String>) -> Self {
        SpecError::Invalid {
            what: what.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Spec(#[from] SpecError),

    #[error(transparent)]
    Config(#[from] datanet::ConfigError),

    #[error(transparent)]
    Store(#[from] datanet::StoreError),

    /// Validation found problems; nothing was submitted. One line per problem.
    #[error("job rejected before submission, nothing was submitted:\n  {}", .0.join("\n  "))]
    Rejected(Vec<String>),

    // The OS error is part of the message and deliberately not a `#[source]` (a field
    // named `source` would make it one), so that `{:#}` chains in the binary do not
    // print it twice.
    #[error("{action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{command} failed: {message}")]
    Slurm { command: String, message: String },

    #[error("{0}")]
    Transfer(String),

    #[error("invalid job record {path}: {message}")]
    Record { path: PathBuf, message: String },

    #[error("no job {0:?} in the ledger; `jobwrap list` shows the known jobs")]
    UnknownJob(String),

    #[error("job {id} is being handled by another jobwrap process (lock {path}); wait for it or stop it first")]
    Locked { id: String, path: PathBuf },

    #[error("job {0} was cancelled before it was submitted")]
    CancelledBeforeSubmit(String),
}

impl JobError {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        JobError::Io {
            action,
            path: path.into(),
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant that shows an inner error in its message must not also expose it
    /// as `source()`, or the binary's `{:#}` prints it twice.
    #[test]
    fn messages_do_not_repeat_their_source() {
        use std::error::Error;

        let errors = [
            JobError::io("cannot create", "/tmp/x", std::io::Error::from_raw_os_error(libc::ENOTDIR)),
            JobError::Spec(SpecError::invalid("input", "x", "bad")),
            JobError::Rejected(vec!["one".into()]),
            JobError::Record { path: "/tmp/r.json".into(), message: "EOF".into() },
        ];
        for err in errors {
            let message = err.to_string();
            let mut source = err.source();
            while let Some(inner) = source {
                assert!(!message.contains(&inner.to_string()), "{message:?} repeats its source {inner}");
                source = inner.source();
            }
        }
        let io = JobError::io("cannot create", "/tmp/x", std::io::Error::from_raw_os_error(libc::ENOTDIR));
        let chained = format!("{:#}", anyhow::Error::from(io));
        assert_eq!(chained.matches("os error 20").count(), 1, "{chained}");
    }
}
