//! Crash points for tests of `resume`.
//!
//! When the environment variable `JOBWRAP_FAULT_KILL_AT` names a point, jobwrap sends
//! itself SIGKILL when it reaches that point, so a test can stop it at an exact moment
//! (for example between sbatch returning and the job id being recorded). Points:
//! `stage-in` (after the first verified download), `after-sbatch`, `running` (when the
//! job is first seen running) and `stage-out` (after the first verified upload).

/// The environment variable that selects a crash point.
pub const FAULT_ENV: &str = "JOBWRAP_FAULT_KILL_AT";

/// Kills the process with SIGKILL when `point` is the selected crash point.
pub fn kill_point(point: &str) {
    if std::env::var(FAULT_ENV).is_ok_and(|selected| selected == point) {
        tracing::warn!(point, "fault injection: killing jobwrap");
        // SAFETY: sending a signal to our own process has no memory-safety effect.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
