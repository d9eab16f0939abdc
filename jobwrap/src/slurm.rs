//! Slurm commands for one cluster: sbatch, scontrol, squeue, sacct and scancel.
//!
//! Every command gets the cluster's `slurm.conf` through `SLURM_CONF` and its arguments
//! as argv, never through a shell. `scontrol` forgets finished jobs after `MinJobAge`
//! and `sacct` fails without slurmdbd, so callers treat both as optional sources.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::error::JobError;

/// The Slurm cluster a job runs on.
#[derive(Debug, Clone)]
pub struct Slurm {
    pub slurm_conf: Option<PathBuf>,
}

/// Fields of `scontrol show job` output.
#[derive(Debug, Clone, Default)]
pub struct JobInfo {
    pub state: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub time_limit_seconds: Option<u64>,
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
    /// True while the job waits for its begin time (`Reason=BeginTime`).
    pub deferred: bool,
}

/// Fields of `sacct` output for the job allocation.
#[derive(Debug, Clone)]
pub struct AccountingInfo {
    pub state: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

/// Checks that a cluster's `slurm_conf` is a readable file. Without this check a
/// missing file makes every Slurm command retry for about a minute before it fails.
pub fn check_conf(cluster: &datanet::config::ClusterConfig, config_source: &std::path::Path) -> Result<(), String> {
    let Some(conf) = &cluster.slurm_conf else { return Ok(()) };
    let problem = match std::fs::File::open(conf).and_then(|file| file.metadata()) {
        Ok(meta) if meta.is_file() => return Ok(()),
        Ok(_) => "it is not a regular file".to_string(),
        Err(err) => format!("cannot read it: {err}"),
    };
    Err(format!(
        "clusters.{}.slurm_conf {}: {problem}; fix the path in {} or make the file readable",
        cluster.name,
        conf.display(),
        config_source.display()
    ))
}

impl Slurm {
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        if let Some(conf) = &self.slurm_conf {
            command.env("SLURM_CONF", conf);
        }
        command
    }

    fn run(&self, program: &str, args: &[OsString]) -> Result<Output, JobError> {
        let output = self.command(program).args(args).output().map_err(|err| JobError::Slurm {
            command: program.to_string(),
            message: format!("cannot run {program}: {err}; is Slurm installed and in PATH?"),
        })?;
        tracing::debug!(program, status = %output.status, "ran Slurm command");
        Ok(output)
    }

    /// Submits with `sbatch --parsable` and returns the job id.
    pub fn sbatch(&self, args: &[OsString]) -> Result<String, JobError> {
        let mut full = vec![OsString::from("--parsable")];
        full.extend_from_slice(args);
        let output = self.run("sbatch", &full)?;
        if !output.status.success() {
            return Err(JobError::Slurm {
                command: "sbatch".into(),
                message: one_line(&output.stderr),
            });
        }
        parse_parsable(&String::from_utf8_lossy(&output.stdout)).ok_or_else(|| JobError::Slurm {
            command: "sbatch".into(),
            message: format!("unexpected output {:?}", String::from_utf8_lossy(&output.stdout)),
        })
    }

    /// Checks options and script with `sbatch --test-only`; nothing is submitted.
    pub fn test_only(&self, args: &[OsString]) -> Result<(), JobError> {
        let mut full = vec![OsString::from("--test-only")];
        full.extend_from_slice(args);
        let output = self.run("sbatch", &full)?;
        if !output.status.success() {
            return Err(JobError::Slurm {
                command: "sbatch --test-only".into(),
                message: one_line(&output.stderr),
            });
        }
        Ok(())
    }

    /// Reads `scontrol show job`; `None` when Slurm no longer knows the job.
    pub fn show_job(&self, job_id: &str) -> Result<Option<JobInfo>, JobError> {
        let args = ["show".into(), "job".into(), "-o".into(), OsString::from(job_id)];
        let output = self.run("scontrol", &args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            if stderr.contains("Invalid job id") {
                return Ok(None);
            }
            return Err(JobError::Slurm {
                command: "scontrol show job".into(),
                message: one_line(&output.stderr),
            });
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let Some(line) = text.lines().find(|line| line.starts_with("JobId=")) else {
            return Ok(None);
        };
        Ok(Some(parse_show_job(line)))
    }

    /// Finds jobs that Slurm still knows, in any state, whose comment is `comment`.
    pub fn find_by_comment(&self, comment: &str) -> Result<Vec<String>, JobError> {
        let args: Vec<OsString> = ["-h", "-t", "all", "-o", "%i|%k"].iter().map(OsString::from).collect();
        let output = self.run("squeue", &args)?;
        if !output.status.success() {
            return Err(JobError::Slurm {
                command: "squeue".into(),
                message: one_line(&output.stderr),
            });
        }
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(text
            .lines()
            .filter_map(|line| line.split_once('|'))
            .filter(|(_, found)| found.trim() == comment)
            .map(|(id, _)| id.trim().to_string())
            .collect())
    }

    /// True while the job's processes are still being ended (`COMPLETING`).
    pub fn is_completing(&self, job_id: &str) -> Result<bool, JobError> {
        let args: Vec<OsString> = ["-h", "-t", "CG", "-o", "%i", "-j", job_id].iter().map(OsString::from).collect();
        let output = self.run("squeue", &args)?;
        Ok(output.status.success() && !String::from_utf8_lossy(&output.stdout).trim().is_empty())
    }

    /// Reads the job's state from accounting; `None` when accounting is not available.
    pub fn accounting(&self, job_id: &str) -> Option<AccountingInfo> {
        let args: Vec<OsString> = ["-n", "-X", "-P", "-o", "State,ExitCode", "-j", job_id]
            .iter()
            .map(OsString::from)
            .collect();
        let output = self.run("sacct", &args).ok()?;
        if !output.status.success() {
            tracing::debug!(job_id, stderr = %one_line(&output.stderr), "sacct unavailable");
            return None;
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text.lines().next()?;
        let (state, exit) = line.split_once('|')?;
        let (exit_code, signal) = parse_exit_code(exit);
        Some(AccountingInfo {
            state: state.to_string(),
            exit_code,
            signal,
        })
    }

    /// Lets a job submitted with a deferred begin time start now
    /// (`scontrol update JobId=ID StartTime=now`).
    pub fn release(&self, job_id: &str) -> Result<(), JobError> {
        let args = [
            OsString::from("update"),
            OsString::from(format!("JobId={job_id}")),
            OsString::from("StartTime=now"),
        ];
        let output = self.run("scontrol", &args)?;
        if !output.status.success() {
            return Err(JobError::Slurm {
                command: "scontrol update StartTime=now".into(),
                message: one_line(&output.stderr),
            });
        }
        Ok(())
    }

    pub fn scancel(&self, job_id: &str) -> Result<(), JobError> {
        let output = self.run("scancel", &[OsString::from(job_id)])?;
        if !output.status.success() {
            return Err(JobError::Slurm {
                command: "scancel".into(),
                message: one_line(&output.stderr),
            });
        }
        Ok(())
    }
}

fn one_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let joined: Vec<&str> = text.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
    if joined.is_empty() {
        "no error output".into()
    } else {
        joined.join("; ")
    }
}

/// Parses `sbatch --parsable` output: `ID` or `ID;CLUSTER`.
pub fn parse_parsable(stdout: &str) -> Option<String> {
    let line = stdout.lines().map(str::trim).find(|line| !line.is_empty())?;
    let id = line.split(';').next()?.trim();
    if !id.is_empty() && id.chars().all(|c| c.is_ascii_digit() || c == '_') {
        Some(id.to_string())
    } else {
        None
    }
}

/// Parses `CODE:SIGNAL`.
fn parse_exit_code(text: &str) -> (Option<i32>, Option<i32>) {
    match text.trim().split_once(':') {
        Some((code, signal)) => (code.parse().ok(), signal.parse().ok()),
        None => (text.trim().parse().ok(), None),
    }
}

/// Parses Slurm's time limit format (`MM`, `HH:MM:SS`, `D-HH:MM:SS`, `UNLIMITED`).
pub fn parse_time_limit(text: &str) -> Option<u64> {
    let (days, clock) = match text.split_once('-') {
        Some((days, clock)) => (days.parse::<u64>().ok()?, clock),
        None => (0, text),
    };
    let parts: Vec<u64> = clock.split(':').map(|part| part.parse().ok()).collect::<Option<_>>()?;
    let seconds = match parts.as_slice() {
        [minutes] if days == 0 => minutes * 60,
        [hours] => hours * 3600,
        [hours, minutes] if days > 0 => hours * 3600 + minutes * 60,
        [minutes, seconds] => minutes * 60 + seconds,
        [hours, minutes, seconds] => hours * 3600 + minutes * 60 + seconds,
        _ => return None,
    };
    Some(days * 86_400 + seconds)
}

/// Parses one line of `scontrol show job -o`. Values may contain spaces (paths), so a
/// word belongs to the previous value unless it looks like `Key=`.
fn parse_show_job(line: &str) -> JobInfo {
    let mut fields: Vec<(String, String)> = Vec::new();
    for word in line.split(' ') {
        let is_key = word
            .split_once('=')
            .is_some_and(|(key, _)| !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == ':' || c == '/'));
        match (is_key, fields.last_mut()) {
            (false, Some((_, value))) => {
                value.push(' ');
                value.push_str(word);
            }
            _ => {
                let (key, value) = word.split_once('=').unwrap_or((word, ""));
                fields.push((key.to_string(), value.to_string()));
            }
        }
    }
    let get = |key: &str| fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.trim_end().to_string());

    let (exit_code, signal) = get("ExitCode").map(|text| parse_exit_code(&text)).unwrap_or((None, None));
    JobInfo {
        state: get("JobState").unwrap_or_default(),
        exit_code,
        signal,
        time_limit_seconds: get("TimeLimit").and_then(|text| parse_time_limit(&text)),
        stdout: get("StdOut").filter(|path| !path.is_empty()).map(PathBuf::from),
        stderr: get("StdErr").filter(|path| !path.is_empty()).map(PathBuf::from),
        deferred: get("Reason").is_some_and(|reason| reason.starts_with("BeginTime")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsable_output_with_cluster() {
        assert_eq!(parse_parsable("42\n").as_deref(), Some("42"));
        assert_eq!(parse_parsable("42;a\n").as_deref(), Some("42"));
        assert_eq!(parse_parsable("Submitted batch job 42"), None);
    }

    #[test]
    fn show_job_line_with_spaces_in_paths() {
        let line = "JobId=7 JobName=a b JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15 TimeLimit=00:01:00 \
                    WorkDir=/tmp/work with space/jobwrap-1 StdErr=/tmp/work with space/jobwrap-1/slurm-7.out \
                    StdIn=/dev/null StdOut=/tmp/work with space/jobwrap-1/slurm-7.out Power=";
        let info = parse_show_job(line);
        assert_eq!(info.state, "TIMEOUT");
        assert_eq!(info.exit_code, Some(0));
        assert_eq!(info.signal, Some(15));
        assert_eq!(info.time_limit_seconds, Some(60));
        assert_eq!(info.stdout.unwrap(), PathBuf::from("/tmp/work with space/jobwrap-1/slurm-7.out"));
    }

    #[test]
    fn time_limits_parse() {
        assert_eq!(parse_time_limit("5"), Some(300));
        assert_eq!(parse_time_limit("01:30"), Some(90));
        assert_eq!(parse_time_limit("1-02:00:00"), Some(93_600));
        assert_eq!(parse_time_limit("UNLIMITED"), None);
    }
}
