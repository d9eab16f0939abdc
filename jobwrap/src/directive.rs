//! jobwrap's data flags and the `#DATANET` lines that carry them inside a batch script.
//!
//! The same flags are accepted on the command line and in `#DATANET` lines, which are
//! split into words like a shell would (single quotes, double quotes, backslash) but never
//! expanded: no variables, no globbing. Flags:
//!
//! - `--stage-in SPACE:PATH[=DEST]` or `--stage-in SPACE:PATH --to DEST`
//! - `--stage-out PATTERN[=SPACE:PATH]` or `--stage-out PATTERN --to SPACE:PATH`
//! - `--output SPACE:PREFIX/`, `--keep`, `--stage-first`, `--cluster NAME|auto`
//!
//! Without `--to`, the value is split at its first `=`; names that contain `=` use `--to`.

use crate::error::SpecError;
use crate::location::SpaceLocation;
use crate::spec::{StageIn, StageOut};

/// The prefix of directive lines in a batch script.
pub const DIRECTIVE_PREFIX: &str = "#DATANET";

/// Data flags collected from directives and the command line, in order of appearance.
#[derive(Debug, Default, Clone)]
pub struct DataFlags {
    pub stage_in: Vec<StageIn>,
    pub stage_out: Vec<StageOut>,
    pub output: Option<SpaceLocation>,
    pub keep_workdir: bool,
    pub stage_first: bool,
    pub cluster: Option<String>,
}

/// The place a flag was written, for error messages.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    CommandLine,
    ScriptLine { script: &'a str, line: usize },
}

impl Origin<'_> {
    fn describe(&self) -> String {
        match self {
            Origin::CommandLine => "command line".into(),
            Origin::ScriptLine { script, line } => format!("{script} line {line}"),
        }
    }
}

impl DataFlags {
    /// Tries to consume a data flag at `args[index]`. Returns how many words it used, or
    /// `None` when the word is not a data flag.
    pub fn accept(&mut self, args: &[String], index: usize, origin: Origin) -> Result<Option<usize>, SpecError> {
        let arg = args[index].as_str();
        let (flag, inline_value) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (arg, None),
        };
        let at = || origin.describe();

        match flag {
            "--stage-in" | "--stage-out" => {
                let (value, mut used) = flag_value(args, index, inline_value, flag, &at())?;
                let mut to = None;
                if let Some((target, to_used)) = to_value(args, index + used, &at())? {
                    to = Some(target);
                    used += to_used;
                }
                let (left, right) = match to {
                    Some(target) => (value, Some(target)),
                    None => match value.split_once('=') {
                        Some((left, right)) => (left.to_string(), Some(right.to_string())),
                        None => (value, None),
                    },
                };
                if flag == "--stage-in" {
                    let source = SpaceLocation::parse(&left, &format!("stage-in source ({})", at()))?;
                    self.stage_in.push(StageIn::new(source, right)?);
                } else {
                    let destination = right
                        .map(|text| SpaceLocation::parse(&text, &format!("stage-out destination ({})", at())))
                        .transpose()?;
                    self.stage_out.push(StageOut::new(left, destination)?);
                }
                Ok(Some(used))
            }
            "--output" => {
                let (value, used) = flag_value(args, index, inline_value, flag, &at())?;
                let mut location = SpaceLocation::parse(&value, &format!("output location ({})", at()))?;
                if !location.is_prefix() {
                    location.path.push('/');
                }
                self.output = Some(location);
                Ok(Some(used))
            }
            "--cluster" => {
                let (value, used) = flag_value(args, index, inline_value, flag, &at())?;
                self.cluster = Some(value);
                Ok(Some(used))
            }
            "--keep" if inline_value.is_none() => {
                self.keep_workdir = true;
                Ok(Some(1))
            }
            "--stage-first" if inline_value.is_none() => {
                self.stage_first = true;
                Ok(Some(1))
            }
            "--to" => Err(SpecError::Usage(format!(
                "--to ({}) must follow --stage-in or --stage-out",
                at()
            ))),
            _ => Ok(None),
        }
    }

    /// Reads every `#DATANET` line of a batch script.
    pub fn read_directives(&mut self, script_name: &str, script_text: &str) -> Result<(), SpecError> {
        for (number, line) in script_text.lines().enumerate() {
            let Some(rest) = line.trim_start().strip_prefix(DIRECTIVE_PREFIX) else {
                continue;
            };
            if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
                continue;
            }
            let origin = Origin::ScriptLine {
                script: script_name,
                line: number + 1,
            };
            let words = split_words(rest)
                .map_err(|reason| SpecError::invalid(format!("directive ({})", origin.describe()), line, reason))?;
            let mut index = 0;
            while index < words.len() {
                match self.accept(&words, index, origin)? {
                    Some(used) => index += used,
                    None => {
                        return Err(SpecError::invalid(
                            format!("directive ({})", origin.describe()),
                            &words[index],
                            "known directives are --stage-in, --stage-out, --to, --output, --keep, --stage-first and --cluster",
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

fn flag_value(
    args: &[String],
    index: usize,
    inline_value: Option<String>,
    flag: &str,
    at: &str,
) -> Result<(String, usize), SpecError> {
    if let Some(value) = inline_value {
        return Ok((value, 1));
    }
    match args.get(index + 1) {
        Some(value) => Ok((value.clone(), 2)),
        None => Err(SpecError::Usage(format!("{flag} ({at}) needs a value"))),
    }
}

fn to_value(args: &[String], index: usize, at: &str) -> Result<Option<(String, usize)>, SpecError> {
    let Some(arg) = args.get(index) else {
        return Ok(None);
    };
    if let Some(value) = arg.strip_prefix("--to=") {
        return Ok(Some((value.to_string(), 1)));
    }
    if arg == "--to" {
        let (value, used) = flag_value(args, index, None, "--to", at)?;
        return Ok(Some((value, used)));
    }
    Ok(None)
}

/// Splits a directive into words with shell quoting rules, without any expansion.
pub fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut chars = text.chars();

    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            '#' if !in_word => break,
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => current.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => current.push(c),
                            Some(c) => {
                                current.push('\\');
                                current.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c) => current.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => current.push(c),
                    None => return Err("a backslash at the end of the line escapes nothing".into()),
                }
            }
            c => {
                in_word = true;
                current.push(c);
            }
        }
    }
    if in_word {
        words.push(current);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_shell_quoting_without_expansion() {
        let words = split_words(r#" --stage-out '*.dat'=results:runs/a/ "a \"b\" $HOME" c\ d # note"#).unwrap();
        assert_eq!(words, vec!["--stage-out", "*.dat=results:runs/a/", "a \"b\" $HOME", "c d"]);
        assert!(split_words("'open").is_err());
    }

    #[test]
    fn directives_cover_objects_prefixes_and_globs() {
        let script = "#!/bin/bash\n#SBATCH -n 1\n\
            #DATANET --stage-in models:cases/achtel2.inp=achtel2.inp\n\
            #DATANET --stage-in models:meshes/ --to mesh/\n\
            #DATANET --stage-in 'models:test space/barcode.txt'\n\
            #DATANET --stage-out '*.dat'=results:runs/achtel2/\n\
            #DATANET --stage-out 'out file.txt' --to 'results:res dir/out file.txt'\n\
            #DATANET --output results:runs/achtel2 --keep\n\
            ccx -i achtel2\n";
        let mut flags = DataFlags::default();
        flags.read_directives("job.sh", script).unwrap();

        assert_eq!(flags.stage_in.len(), 3);
        assert_eq!(flags.stage_in[0].destination, "achtel2.inp");
        assert_eq!(flags.stage_in[1].source.path, "meshes/");
        assert_eq!(flags.stage_in[1].destination, "mesh");
        assert_eq!(flags.stage_in[2].destination, "barcode.txt");
        assert_eq!(flags.stage_out[0].pattern, "*.dat");
        assert_eq!(flags.stage_out[1].destination.as_ref().unwrap().path, "res dir/out file.txt");
        assert_eq!(flags.output.as_ref().unwrap().path, "runs/achtel2/");
        assert!(flags.keep_workdir);
    }

    #[test]
    fn unknown_directive_names_line() {
        let mut flags = DataFlags::default();
        let err = flags
            .read_directives("job.sh", "#!/bin/sh\n#DATANET --stage-inn models:x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("job.sh line 2"), "{err}");
        assert!(err.contains("--stage-inn"), "{err}");
    }

    #[test]
    fn bad_source_names_origin() {
        let mut flags = DataFlags::default();
        let args = vec!["--stage-in".to_string(), "nospace".to_string()];
        let err = flags.accept(&args, 0, Origin::CommandLine).unwrap_err().to_string();
        assert!(err.contains("command line"), "{err}");
        assert!(err.contains("nospace"), "{err}");
    }
}
