//! Runs the external tools that manage accounts and shares.
//!
//! Secrets travel only on standard input, never in arguments, because any local user
//! can read another process's argument list. Tools run with `LC_ALL=C`, so the error
//! texts that callers match (such as "does not exist") are the untranslated ones.
//!
//! A tool dies with the provisioner (`PR_SET_PDEATHSIG`). Otherwise a tool of a killed
//! provisioner would keep changing accounts or shares while the next gc repairs them.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::ProvisionError;

/// The output and exit status of one tool run.
#[derive(Debug)]
pub struct ToolOutput {
    pub program: String,
    pub action: String,
    pub success: bool,
    /// The exit code, or `None` when a signal ended the tool.
    pub code: Option<i32>,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

impl ToolOutput {
    /// Turns a failed run into an error carrying its standard error.
    pub fn into_error(self) -> ProvisionError {
        let stderr = one_line(if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        });
        ProvisionError::Tool {
            program: self.program,
            action: self.action,
            status: self.status,
            stderr,
        }
    }

    /// Returns the output when the tool succeeded, an error otherwise.
    pub fn check(self) -> Result<ToolOutput, ProvisionError> {
        if self.success {
            Ok(self)
        } else {
            Err(self.into_error())
        }
    }
}

/// Runs `program` with `args`, writing `stdin` to its standard input, and returns its
/// output whatever the exit status.
pub fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    action: &str,
) -> Result<ToolOutput, ProvisionError> {
    let spawn_error = |source| ProvisionError::Spawn {
        program: program.to_string(),
        action: action.to_string(),
        source,
    };

    let parent = std::process::id() as libc::pid_t;
    let mut command = Command::new(program);
    // SAFETY: the closure runs between fork and exec and calls only prctl and getppid,
    // which are async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The provisioner may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = command
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;

    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was requested as a pipe");
        // A tool that exits early closes the pipe, and its exit status reports why.
        if let Err(err) = pipe.write_all(input) {
            tracing::debug!(program, error = %err, "tool closed its standard input early");
        }
    }

    let output = child.wait_with_output().map_err(spawn_error)?;
    Ok(ToolOutput {
        program: program.to_string(),
        action: action.to_string(),
        success: output.status.success(),
        code: output.status.code(),
        status: output.status.to_string(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Joins the non-empty lines of a tool's message and bounds its length.
fn one_line(text: &str) -> String {
    const MAX_CHARS: usize = 600;
    let joined: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let joined = joined.join(" | ");
    if joined.chars().count() > MAX_CHARS {
        let cut: String = joined.chars().take(MAX_CHARS).collect();
        format!("{cut}...")
    } else if joined.is_empty() {
        "no message".to_string()
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_reaches_the_tool() {
        let output = run("cat", &[], Some(b"secret\n"), "testing").unwrap();
        assert!(output.success);
        assert_eq!(output.stdout, "secret\n");
    }

    #[test]
    fn failure_carries_stderr() {
        let output = run(
            "sh",
            &["-c", "echo first >&2; echo second >&2; exit 3"],
            None,
            "testing",
        )
        .unwrap();
        let err = output.check().unwrap_err().to_string();
        assert!(err.contains("first | second"), "{err}");
        assert!(err.contains("while testing"), "{err}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = run("/nonexistent/tool", &[], None, "testing").unwrap_err();
        assert!(matches!(err, ProvisionError::Spawn { .. }), "{err}");
    }
}
