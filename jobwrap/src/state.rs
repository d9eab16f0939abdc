//! Job states and the phases of jobwrap's flow.
//!
//! [`Phase`] says how far jobwrap got and is what `resume` continues from; [`JobState`]
//! is the Slurm job's state as users know it. A state is final once the job can no
//! longer run: every final state still goes through stage-out.

use std::fmt;

use serde::{Deserialize, Serialize};

/// jobwrap's progress through one job, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The record exists; the working directory may not.
    Preparing,
    StageIn,
    /// The submission intent is recorded; sbatch may or may not have run.
    Submitting,
    /// Overlapped staging: inputs are verified, the waiting job is being released.
    Releasing,
    /// sbatch returned a job id; the job is tracked until it ends.
    Submitted,
    StageOut,
    /// Nothing is left to do.
    Finished,
}

/// The state of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Not yet submitted to Slurm.
    Unsubmitted,
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Timeout,
    OutOfMemory,
    NodeFail,
}

impl JobState {
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Unsubmitted | JobState::Pending | JobState::Running)
    }

    /// Maps a Slurm state name (`scontrol`'s `JobState`, `squeue %T`, `sacct State`).
    pub fn from_slurm(name: &str) -> Option<JobState> {
        let base = name.split_whitespace().next().unwrap_or("");
        let state = match base {
            "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD"
            | "SPECIAL_EXIT" | "RESIZING" => JobState::Pending,
            "RUNNING" | "COMPLETING" | "STAGE_OUT" | "SIGNALING" | "SUSPENDED" | "STOPPED" => JobState::Running,
            "COMPLETED" => JobState::Completed,
            "FAILED" | "BOOT_FAIL" | "DEADLINE" | "PREEMPTED" | "REVOKED" => JobState::Failed,
            "CANCELLED" => JobState::Cancelled,
            "TIMEOUT" => JobState::Timeout,
            "OUT_OF_MEMORY" => JobState::OutOfMemory,
            "NODE_FAIL" => JobState::NodeFail,
            _ => return None,
        };
        Some(state)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            JobState::Unsubmitted => "unsubmitted",
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Timeout => "timeout",
            JobState::OutOfMemory => "out-of-memory",
            JobState::NodeFail => "node-fail",
        };
        f.write_str(text)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Phase::Preparing => "preparing",
            Phase::StageIn => "stage-in",
            Phase::Submitting => "submitting",
            Phase::Releasing => "releasing",
            Phase::Submitted => "submitted",
            Phase::StageOut => "stage-out",
            Phase::Finished => "finished",
        };
        f.write_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_names_map_to_states() {
        assert_eq!(JobState::from_slurm("PENDING"), Some(JobState::Pending));
        assert_eq!(JobState::from_slurm("COMPLETING"), Some(JobState::Running));
        assert_eq!(JobState::from_slurm("CANCELLED by 0"), Some(JobState::Cancelled));
        assert_eq!(JobState::from_slurm("OUT_OF_MEMORY"), Some(JobState::OutOfMemory));
        assert_eq!(JobState::from_slurm("NODE_FAIL"), Some(JobState::NodeFail));
        assert_eq!(JobState::from_slurm("TIMEOUT"), Some(JobState::Timeout));
        assert_eq!(JobState::from_slurm("bogus"), None);
        assert!(JobState::Timeout.is_final());
        assert!(!JobState::Running.is_final());
    }
}
