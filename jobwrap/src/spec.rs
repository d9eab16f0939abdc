//! The job specification: what to stage in, what to run and what to stage out.
//!
//! A [`JobSpec`] is built from `#DATANET` directives, command-line flags or a job file,
//! and is stored unchanged in the job's ledger record, so a resumed jobwrap runs exactly
//! the job that was declared.

use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::location::{check_relative, check_workdir_path, SpaceLocation};

/// One stage-in: an object or a prefix copied to a path in the working directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageIn {
    pub source: SpaceLocation,
    /// Relative to the working directory; for a prefix source this is a directory.
    pub destination: String,
}

/// One stage-out: files in the working directory matching a glob, copied to a space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOut {
    /// A glob relative to the working directory (`*` does not cross `/`; `**` does).
    pub pattern: String,
    /// `None` means the job's output location.
    pub destination: Option<SpaceLocation>,
}

/// Everything jobwrap needs to run one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Cluster name from the configuration; `None` picks the only configured cluster.
    pub cluster: Option<String>,
    /// File name of the batch script, used as the default Slurm job name.
    pub script_name: String,
    /// Content of the batch script, copied when the job was declared.
    pub script_text: String,
    pub script_args: Vec<String>,
    /// sbatch options passed through unchanged, in order.
    pub sbatch_options: Vec<String>,
    pub stage_in: Vec<StageIn>,
    pub stage_out: Vec<StageOut>,
    /// Where Slurm's stdout/stderr and outputs without their own destination go.
    pub output: Option<SpaceLocation>,
    /// Keep the working directory after stage-out.
    pub keep_workdir: bool,
    /// Stage in before submitting instead of submitting first and staging in while the
    /// job waits in the queue.
    #[serde(default)]
    pub stage_first: bool,
}

impl StageIn {
    /// Builds a stage-in; without a destination the source's last path component is used.
    pub fn new(source: SpaceLocation, destination: Option<String>) -> Result<StageIn, SpecError> {
        let destination = match destination {
            Some(destination) => destination,
            None => default_destination(&source)?,
        };
        let mut checked = destination.clone();
        if source.is_prefix() && !checked.ends_with('/') {
            checked.push('/');
        }
        check_workdir_path(&checked).map_err(|reason| SpecError::invalid("stage-in destination", &destination, reason))?;
        Ok(StageIn {
            source,
            destination: checked.trim_end_matches('/').to_string(),
        })
    }
}

fn default_destination(source: &SpaceLocation) -> Result<String, SpecError> {
    let trimmed = source.path.trim_end_matches('/');
    match trimmed.rsplit('/').next() {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => Err(SpecError::invalid(
            "stage-in",
            source.to_string(),
            "the root of a space has no name to copy it to; add --to DIRECTORY",
        )),
    }
}

impl StageOut {
    pub fn new(pattern: String, destination: Option<SpaceLocation>) -> Result<StageOut, SpecError> {
        check_relative(&pattern, false).map_err(|reason| SpecError::invalid("stage-out pattern", &pattern, reason))?;
        glob::Pattern::new(&pattern)
            .map_err(|err| SpecError::invalid("stage-out pattern", &pattern, err.to_string()))?;
        if let Some(destination) = &destination {
            if is_glob(&pattern) && !destination.is_prefix() {
                return Err(SpecError::invalid(
                    "stage-out destination",
                    destination.to_string(),
                    format!("the pattern {pattern:?} can match several files; end the destination with '/'"),
                ));
            }
        }
        Ok(StageOut { pattern, destination })
    }
}

/// True when `pattern` contains glob syntax rather than naming one file.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Rejects a batch script with Windows (CRLF) line endings: sbatch rejects DOS line
/// breaks, and the interpreter line `#!/bin/bash\r` fails on the node with 127.
/// `script` names the script in the error (its path when known).
pub fn check_line_endings(script: &str, text: &str) -> Result<(), SpecError> {
    let Some(line) = text.split('\n').position(|line| line.ends_with('\r')) else { return Ok(()) };
    Err(SpecError::invalid(
        "batch script",
        script,
        format!(
            "line {} ends with a Windows (CRLF) line break, which sbatch rejects; convert the script with `dos2unix {script}`",
            line + 1
        ),
    ))
}

impl JobSpec {
    /// Checks the parts that do not need the configuration or the stores.
    pub fn check(&self) -> Result<(), SpecError> {
        let needs_output = self.stage_out.iter().any(|out| out.destination.is_none());
        if needs_output && self.output.is_none() {
            return Err(SpecError::Usage(
                "a stage-out without a destination needs an output location: add --output SPACE:PREFIX/".into(),
            ));
        }
        if let Some(output) = &self.output {
            if !output.is_prefix() {
                return Err(SpecError::invalid(
                    "output location",
                    output.to_string(),
                    "the output location is a prefix; end it with '/'",
                ));
            }
        }
        check_line_endings(&self.script_name, &self.script_text)?;
        if !self.script_text.starts_with("#!") {
            return Err(SpecError::invalid(
                "batch script",
                &self.script_name,
                "sbatch needs an interpreter line such as #!/bin/bash as the first line",
            ));
        }
        Ok(())
    }

    /// Where Slurm's stdout and stderr files go: the output location, or the prefix of
    /// the first stage-out destination.
    pub fn log_destination(&self) -> Option<SpaceLocation> {
        if let Some(output) = &self.output {
            return Some(output.clone());
        }
        let first = self.stage_out.iter().find_map(|out| out.destination.as_ref())?;
        if first.is_prefix() {
            return Some(first.clone());
        }
        let parent = match first.path.rsplit_once('/') {
            Some((parent, _)) => format!("{parent}/"),
            None => String::new(),
        };
        Some(SpaceLocation {
            space: first.space.clone(),
            path: parent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(text: &str) -> SpaceLocation {
        SpaceLocation::parse(text, "test").unwrap()
    }

    #[test]
    fn stage_in_defaults_to_last_component() {
        let input = StageIn::new(location("models:cases/achtel2.inp"), None).unwrap();
        assert_eq!(input.destination, "achtel2.inp");
        let prefix = StageIn::new(location("models:meshes/"), None).unwrap();
        assert_eq!(prefix.destination, "meshes");
        assert!(StageIn::new(location("models:"), None).is_err());
    }

    #[test]
    fn crlf_scripts_are_rejected() {
        assert!(check_line_endings("run.sh", "#!/bin/bash\necho ok\n").is_ok());
        let err = check_line_endings("dir/run.sh", "#!/bin/bash\necho ok\r\n").unwrap_err().to_string();
        assert!(err.contains("dir/run.sh") && err.contains("line 2") && err.contains("dos2unix dir/run.sh"), "{err}");
    }

    #[test]
    fn glob_needs_prefix_destination() {
        let err = StageOut::new("*.dat".into(), Some(location("results:a.dat"))).unwrap_err();
        assert!(err.to_string().contains("end the destination with '/'"), "{err}");
        assert!(StageOut::new("out file.txt".into(), Some(location("results:res dir/out file.txt"))).is_ok());
    }

    #[test]
    fn log_destination_uses_parent_of_first_output() {
        let spec = JobSpec {
            cluster: None,
            script_name: "job.sh".into(),
            script_text: "#!/bin/bash\n".into(),
            script_args: vec![],
            sbatch_options: vec![],
            stage_in: vec![],
            stage_out: vec![StageOut::new("a.txt".into(), Some(location("results:run 1/a.txt"))).unwrap()],
            output: None,
            keep_workdir: false,
            stage_first: false,
        };
        assert_eq!(spec.log_destination().unwrap().path, "run 1/");
        assert!(spec.check().is_ok());
    }
}
