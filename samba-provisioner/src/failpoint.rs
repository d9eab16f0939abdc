//! Crash injection for tests of recovery.
//!
//! When the environment variable [`FAILPOINT_ENV`] names a step, the process kills
//! itself with `SIGKILL` right after that step, as a power cut or `kill -9` would, so
//! no destructor or rollback runs. Step names are the `&'static str`s passed to [`hit`].

/// Environment variable naming the step after which the process kills itself.
pub const FAILPOINT_ENV: &str = "DATANET_SAMBA_FAILPOINT";

/// Kills the process with `SIGKILL` if [`FAILPOINT_ENV`] names `step`.
pub fn hit(step: &'static str) {
    let Some(wanted) = std::env::var_os(FAILPOINT_ENV) else {
        return;
    };
    if wanted != step {
        return;
    }
    tracing::warn!(step, "failpoint reached, killing the process");
    // SAFETY: getpid and kill have no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}
