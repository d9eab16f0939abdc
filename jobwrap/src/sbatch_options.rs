//! The command line of `jobwrap sbatch`: jobwrap's own flags, sbatch options passed
//! through unchanged, the batch script and its arguments.
//!
//! To find where the script starts, jobwrap must know which sbatch options take a
//! value in the next word; the tables below follow `sbatch --help` of Slurm 22.05.
//! Options that take an optional value (`--exclusive[=user]`) need the `=` form, as in
//! sbatch itself.

use std::path::PathBuf;

use crate::directive::{DataFlags, Origin};
use crate::error::SpecError;

/// Short sbatch options that take a value.
const SHORT_WITH_VALUE: &str = "aAbcdDeiJLMmnNopqStwxCFGB";

/// Long sbatch options that take a required value (so `--opt value` is two words).
const LONG_WITH_VALUE: &[&str] = &[
    "account", "acctg-freq", "array", "batch", "bb", "bbf", "begin", "chdir", "cluster-constraint",
    "clusters", "comment", "constraint", "container", "core-spec", "cores-per-socket", "cpu-freq",
    "cpus-per-gpu", "cpus-per-task", "deadline", "delay-boot", "dependency", "distribution", "error",
    "exclude", "export-file", "extra-node-info", "gid", "gpu-bind", "gpu-freq", "gpus", "gpus-per-node",
    "gpus-per-socket", "gpus-per-task", "gres", "gres-flags", "hint", "input", "job-name", "licenses",
    "mail-type", "mail-user", "mcs-label", "mem", "mem-bind", "mem-per-cpu", "mem-per-gpu", "mincpus",
    "network", "nodefile", "nodelist", "nodes", "ntasks", "ntasks-per-core", "ntasks-per-gpu",
    "ntasks-per-node", "ntasks-per-socket", "open-mode", "output", "partition", "power", "priority",
    "profile", "qos", "reservation", "signal", "sockets-per-node", "switches", "thread-spec",
    "threads-per-core", "time", "time-min", "tmp", "tres-per-task", "uid", "wckey",
];

/// Options jobwrap sets itself or that would break its flow, with the reason.
const REJECTED: &[(&str, char, &str)] = &[
    ("chdir", 'D', "jobwrap sets the working directory to the job's scratch directory"),
    ("wait", 'W', "jobwrap waits for the job itself; run it without --detach instead"),
    ("wrap", '\0', "jobwrap needs a batch script file; put the command in a script"),
    ("comment", '\0', "jobwrap uses the comment to find its job again after a crash"),
];

/// One sbatch option as written, with its value, for inspection only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SbatchOption {
    /// Long name without dashes, or the short letter.
    pub name: String,
    pub value: Option<String>,
}

/// A parsed `jobwrap sbatch` command line.
#[derive(Debug, Clone)]
pub struct SbatchCommand {
    pub flags: DataFlags,
    pub detach: bool,
    pub sbatch_options: Vec<String>,
    pub script: PathBuf,
    pub script_args: Vec<String>,
}

/// Splits the words after `jobwrap sbatch`.
pub fn parse_command(args: &[String]) -> Result<SbatchCommand, SpecError> {
    let mut flags = DataFlags::default();
    let mut detach = false;
    let mut sbatch_options = Vec::new();
    let mut index = 0;

    while index < args.len() {
        let arg = &args[index];
        if arg == "--" {
            index += 1;
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            break;
        }
        if arg == "--detach" {
            detach = true;
            index += 1;
            continue;
        }
        if let Some(used) = flags.accept(args, index, Origin::CommandLine)? {
            index += used;
            continue;
        }
        let used = option_words(args, index)?;
        sbatch_options.extend_from_slice(&args[index..index + used]);
        index += used;
    }

    let Some(script) = args.get(index) else {
        return Err(SpecError::Usage(
            "missing batch script: write `jobwrap sbatch [options] SCRIPT [ARGS...]`".into(),
        ));
    };
    for option in inspect(&sbatch_options) {
        check_allowed(&option)?;
    }

    Ok(SbatchCommand {
        flags,
        detach,
        sbatch_options,
        script: PathBuf::from(script),
        script_args: args[index + 1..].to_vec(),
    })
}

/// Rejects options that jobwrap sets itself.
pub fn check_allowed(option: &SbatchOption) -> Result<(), SpecError> {
    for (long, short, reason) in REJECTED {
        let matches = option.name == *long || (*short != '\0' && option.name == short.to_string());
        if matches {
            return Err(SpecError::invalid("sbatch option", format!("--{long}"), format!("{reason}; remove it")));
        }
    }
    Ok(())
}

/// Counts the words used by the sbatch option at `args[index]`.
fn option_words(args: &[String], index: usize) -> Result<usize, SpecError> {
    let arg = &args[index];
    let takes_next = if let Some(long) = arg.strip_prefix("--") {
        !long.contains('=') && LONG_WITH_VALUE.contains(&long)
    } else {
        short_takes_next(&arg[1..])
    };
    if !takes_next {
        return Ok(1);
    }
    if index + 1 >= args.len() {
        return Err(SpecError::invalid("sbatch option", arg, "the option needs a value"));
    }
    Ok(2)
}

/// True when a cluster of short options ends with one that takes the next word as value.
fn short_takes_next(cluster: &str) -> bool {
    for (position, letter) in cluster.char_indices() {
        if SHORT_WITH_VALUE.contains(letter) {
            return position + letter.len_utf8() == cluster.len();
        }
    }
    false
}

/// Lists options with their values; `words` is a well-formed option list.
pub fn inspect(words: &[String]) -> Vec<SbatchOption> {
    let mut options = Vec::new();
    let mut index = 0;
    while index < words.len() {
        let arg = &words[index];
        index += 1;
        if let Some(long) = arg.strip_prefix("--") {
            match long.split_once('=') {
                Some((name, value)) => options.push(SbatchOption {
                    name: name.to_string(),
                    value: Some(value.to_string()),
                }),
                None if LONG_WITH_VALUE.contains(&long) => {
                    options.push(SbatchOption {
                        name: long.to_string(),
                        value: words.get(index).cloned(),
                    });
                    index += 1;
                }
                None => options.push(SbatchOption {
                    name: long.to_string(),
                    value: None,
                }),
            }
            continue;
        }
        let cluster = arg.strip_prefix('-').unwrap_or(arg);
        for (position, letter) in cluster.char_indices() {
            if SHORT_WITH_VALUE.contains(letter) {
                let rest = &cluster[position + letter.len_utf8()..];
                let value = if rest.is_empty() {
                    index += 1;
                    words.get(index - 1).cloned()
                } else {
                    Some(rest.trim_start_matches('=').to_string())
                };
                options.push(SbatchOption {
                    name: letter.to_string(),
                    value,
                });
                break;
            }
            options.push(SbatchOption {
                name: letter.to_string(),
                value: None,
            });
        }
    }
    options
}

/// True when `options` set the option `long` (or its short letter).
pub fn has_option(options: &[SbatchOption], long: &str, short: Option<char>) -> bool {
    options
        .iter()
        .any(|option| option.name == long || short.is_some_and(|letter| option.name == letter.to_string()))
}

/// The value of the last `long`/`short` option, as sbatch would use it.
pub fn option_value(options: &[SbatchOption], long: &str, short: Option<char>) -> Option<String> {
    options
        .iter()
        .rev()
        .find(|option| option.name == long || short.is_some_and(|letter| option.name == letter.to_string()))
        .and_then(|option| option.value.clone())
}

/// Collects the options of the `#SBATCH` lines that sbatch itself would read: those
/// before the first line that is neither a comment nor blank.
pub fn script_header_options(script_text: &str) -> Vec<String> {
    let mut words = Vec::new();
    for line in script_text.lines().skip(1) {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if !trimmed.starts_with('#') {
            break;
        }
        if let Some(rest) = trimmed.strip_prefix("#SBATCH") {
            if let Ok(split) = crate::directive::split_words(rest) {
                words.extend(split);
            }
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn script_starts_after_option_values() {
        let args = words(&[
            "-t", "00:01:00", "--stage-in", "models:a b.inp", "-n1", "--exclusive", "-J", "my job",
            "--partition=debug", "run.sh", "--stage-in", "x",
        ]);
        let command = parse_command(&args).unwrap();
        assert_eq!(command.script, PathBuf::from("run.sh"));
        assert_eq!(command.script_args, words(&["--stage-in", "x"]));
        assert_eq!(
            command.sbatch_options,
            words(&["-t", "00:01:00", "-n1", "--exclusive", "-J", "my job", "--partition=debug"])
        );
        assert_eq!(command.flags.stage_in[0].destination, "a b.inp");
    }

    #[test]
    fn chdir_and_wait_rejected() {
        for bad in [&["-D", "/tmp", "run.sh"][..], &["--chdir=/tmp", "run.sh"], &["-W", "run.sh"]] {
            let err = parse_command(&words(bad)).unwrap_err().to_string();
            assert!(err.contains("remove it"), "{err}");
        }
    }

    #[test]
    fn inspect_finds_job_name_forms() {
        for list in [&["-J", "a"][..], &["-Ja"], &["--job-name=a"], &["--job-name", "a"], &["-HJa"]] {
            let options = inspect(&words(list));
            assert_eq!(option_value(&options, "job-name", Some('J')).as_deref(), Some("a"), "{list:?}");
        }
    }

    #[test]
    fn header_stops_at_first_command() {
        let text = "#!/bin/bash\n#SBATCH -J 'a b'\n\n# note\n#SBATCH --time=5\necho hi\n#SBATCH -n 4\n";
        assert_eq!(script_header_options(text), words(&["-J", "a b", "--time=5"]));
    }

    #[test]
    fn missing_script_is_usage_error() {
        let err = parse_command(&words(&["-t", "5"])).unwrap_err().to_string();
        assert!(err.contains("missing batch script"), "{err}");
    }
}
