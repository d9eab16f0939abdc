//! Tracking a submitted job until it reaches a final state.
//!
//! Sources, in order of trust: `scontrol show job` while Slurm still knows the job,
//! then `sacct` when accounting works, then the wrapper's `.jobwrap/exit-status` file.
//! Without Slurm's record, a script ended by SIGTERM counts as a timeout when it ran at
//! least its time limit (minus [`TIMEOUT_SLACK`]) and as cancelled otherwise.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::ledger::JobRecord;
use crate::slurm::{JobInfo, Slurm};
use crate::state::JobState;
use crate::wrapper::{read_status, WrapperStatus};

/// Tolerance when deciding from run time alone whether SIGTERM came from the time limit.
const TIMEOUT_SLACK: Duration = Duration::from_secs(5);
/// Maximum wait for a finished job's processes to end (Slurm's `KillWait` defaults to 30 s).
const COMPLETING_WAIT: Duration = Duration::from_secs(120);

/// Copies what `scontrol` reported into the record. Returns the mapped state.
pub fn apply_job_info(record: &mut JobRecord, info: &JobInfo) -> Option<JobState> {
    record.slurm.state_name = Some(info.state.clone());
    record.slurm.exit_code = info.exit_code.or(record.slurm.exit_code);
    record.slurm.signal = info.signal.or(record.slurm.signal);
    if info.time_limit_seconds.is_some() {
        record.slurm.time_limit_seconds = info.time_limit_seconds;
    }
    if info.stdout.is_some() {
        record.slurm.stdout = info.stdout.clone();
    }
    if info.stderr.is_some() {
        record.slurm.stderr = info.stderr.clone();
    }
    JobState::from_slurm(&info.state)
}

/// Decides the final state once Slurm has forgotten the job: `sacct`, then the wrapper's
/// status file.
pub fn verdict_without_scontrol(record: &mut JobRecord, slurm: &Slurm) -> JobState {
    let job_id = record.slurm.job_id.clone().unwrap_or_default();
    if let Some(accounting) = slurm.accounting(&job_id) {
        if let Some(state) = JobState::from_slurm(&accounting.state).filter(|state| state.is_final()) {
            record.slurm.state_name = Some(accounting.state);
            record.slurm.exit_code = accounting.exit_code;
            record.slurm.signal = accounting.signal;
            record.slurm.verdict_source = Some("sacct".into());
            return state;
        }
    }

    let status = read_status(&record.workdir);
    record.slurm.verdict_source = Some("exit-status file".into());
    verdict_from_wrapper(record, &status)
}

fn verdict_from_wrapper(record: &mut JobRecord, status: &WrapperStatus) -> JobState {
    match (status.exit_code, status.signal.as_deref()) {
        (Some(code), None) => {
            record.slurm.exit_code = Some(code);
            if code == 0 {
                JobState::Completed
            } else {
                JobState::Failed
            }
        }
        (Some(code), Some(_)) => {
            record.slurm.exit_code = Some(code);
            record.slurm.signal = Some(libc::SIGTERM);
            let ran = status.ended_at.zip(status.started_at).map(|(end, start)| end.saturating_sub(start));
            let limit = record.slurm.time_limit_seconds;
            match (ran, limit) {
                (Some(ran), Some(limit)) if ran + TIMEOUT_SLACK.as_secs() >= limit => JobState::Timeout,
                _ => JobState::Cancelled,
            }
        }
        (None, _) if status.started_at.is_some() => {
            record.error = Some("the job ended without recording its exit status (killed, or its node failed)".into());
            JobState::Failed
        }
        (None, _) => {
            record.error = Some("Slurm no longer knows the job and it never started".into());
            JobState::Cancelled
        }
    }
}

/// Waits until Slurm has ended the job's processes, so stage-out reads final files.
pub fn wait_for_completion(slurm: &Slurm, job_id: &str, workdir: &Path) {
    let started = Instant::now();
    while started.elapsed() < COMPLETING_WAIT {
        match slurm.is_completing(job_id) {
            Ok(false) => return,
            Ok(true) => {}
            Err(err) => {
                tracing::warn!(job_id, error = %err, "cannot check whether the job is still completing");
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    tracing::warn!(job_id, workdir = %workdir.display(), "job still completing; staging out what exists");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> JobRecord {
        serde_json::from_value(serde_json::json!({
            "id": "t", "created_at": 0, "updated_at": 0,
            "spec": {"cluster": null, "script_name": "j", "script_text": "#!/bin/sh\n", "script_args": [],
                     "sbatch_options": [], "stage_in": [], "stage_out": [], "output": null, "keep_workdir": false},
            "cluster": "a", "uid": 0, "gid": 0, "workdir": "/nonexistent", "submit_comment": "jobwrap:t",
            "phase": "submitted", "state": "running",
            "slurm": {"job_id": "5", "time_limit_seconds": 60},
            "inputs": [], "outputs": [], "missing_outputs": [], "workdir_removed": false,
            "error": null, "driver_pid": null
        }))
        .unwrap()
    }

    #[test]
    fn wrapper_status_decides_after_purge() {
        let mut job = record();
        let ok = WrapperStatus { exit_code: Some(0), started_at: Some(0), ended_at: Some(3), ..Default::default() };
        assert_eq!(verdict_from_wrapper(&mut job, &ok), JobState::Completed);

        let failed = WrapperStatus { exit_code: Some(3), ..ok.clone() };
        assert_eq!(verdict_from_wrapper(&mut job, &failed), JobState::Failed);
        assert_eq!(job.slurm.exit_code, Some(3));

        let timed_out = WrapperStatus {
            exit_code: Some(143),
            signal: Some("TERM".into()),
            started_at: Some(100),
            ended_at: Some(158),
            ..Default::default()
        };
        assert_eq!(verdict_from_wrapper(&mut job, &timed_out), JobState::Timeout);

        let cancelled = WrapperStatus { ended_at: Some(110), ..timed_out };
        assert_eq!(verdict_from_wrapper(&mut job, &cancelled), JobState::Cancelled);

        let never = WrapperStatus::default();
        assert_eq!(verdict_from_wrapper(&mut job, &never), JobState::Cancelled);
    }
}
