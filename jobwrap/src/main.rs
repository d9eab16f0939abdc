//! The `jobwrap` command: a thin layer over the jobwrap library that parses the command
//! line, prints results and maps outcomes to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use datanet::Config;
use jobwrap::directive::DataFlags;
use jobwrap::sbatch_options::parse_command;
use jobwrap::{JobError, JobRecord, JobSpec, Jobwrap, Phase};

/// Exit code for invalid command lines, job declarations and rejected jobs.
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "jobwrap", version, about = "Stage data in from storage spaces, run a Slurm batch job, stage results out")]
struct Cli {
    /// Configuration file (default: $DATANET_CONFIG, then /etc/datanet/datanet.toml).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a batch script: `jobwrap sbatch [jobwrap flags] [sbatch options] SCRIPT [ARGS...]`.
    ///
    /// jobwrap flags: --stage-in SPACE:PATH[=DEST], --stage-out PATTERN[=SPACE:PATH],
    /// --to, --output SPACE:PREFIX/, --keep, --stage-first, --cluster NAME|auto, --detach. Everything else
    /// before SCRIPT goes to sbatch unchanged. The script's #DATANET lines take the same flags.
    #[command(disable_help_flag = true)]
    Sbatch {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// Run a job described by a job file (TOML).
    Submit {
        job_file: PathBuf,
        /// Return after submission; `jobwrap resume` finishes the job.
        #[arg(long)]
        detach: bool,
        /// Keep the working directory after stage-out.
        #[arg(long)]
        keep: bool,
        /// Cluster to run on (overrides the job file).
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
    },
    /// Show one job (by jobwrap or Slurm id), or all jobs.
    Status {
        id: Option<String>,
        /// Print the ledger record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the jobs in the ledger.
    List,
    /// Cancel a job: the Slurm job and any transfer; outputs are still staged out.
    Cancel { id: String },
    /// Continue detached or interrupted jobs (one, or every unfinished job).
    Resume { id: Option<String> },
    /// Show each configured cluster's idle and total CPUs and memory and its pending jobs.
    Clusters,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("JOBWRAP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("jobwrap: error: {err:#}");
            let usage = err.downcast_ref::<JobError>().is_some_and(|err| {
                matches!(err, JobError::Rejected(_) | JobError::Spec(_) | JobError::Config(_))
            }) || err.downcast_ref::<jobwrap::SpecError>().is_some();
            ExitCode::from(if usage { EXIT_USAGE } else { 1 })
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config_path = Config::resolve_path(cli.config.as_deref());
    let load = || -> anyhow::Result<Jobwrap> {
        let config = Config::load(&config_path).map_err(JobError::from)?;
        Ok(Jobwrap::new(config)?)
    };

    match cli.command {
        Command::Sbatch { args } => {
            if args.first().is_some_and(|arg| arg == "--help" || arg == "-h") {
                print_sbatch_help();
                return Ok(ExitCode::SUCCESS);
            }
            let command = parse_command(&args)?;
            let spec = spec_from_script(&command)?;
            run_job(&load()?, spec, command.detach).await
        }
        Command::Submit { job_file, detach, keep, cluster } => {
            let mut spec = jobwrap::jobfile::load(&job_file)?;
            spec.keep_workdir |= keep;
            if cluster.is_some() {
                spec.cluster = cluster;
            }
            run_job(&load()?, spec, detach).await
        }
        Command::Status { id, json } => {
            exit_quietly_on_closed_stdout();
            let jobwrap = load()?;
            let records = match id {
                Some(id) => vec![jobwrap.ledger.find(&id)?],
                None => jobwrap.ledger.list()?,
            };
            for record in &records {
                if json {
                    println!("{}", serde_json::to_string_pretty(record)?);
                } else {
                    print_status(record);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List => {
            exit_quietly_on_closed_stdout();
            let jobwrap = load()?;
            println!("{:<24} {:>8} {:<8} {:<10} {:<13} SCRIPT", "ID", "SLURM", "CLUSTER", "PHASE", "STATE");
            for record in jobwrap.ledger.list()? {
                println!(
                    "{:<24} {:>8} {:<8} {:<10} {:<13} {}",
                    record.id,
                    record.slurm.job_id.as_deref().unwrap_or("-"),
                    record.cluster,
                    record.phase.to_string(),
                    record.state.to_string(),
                    record.spec.script_name
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { id } => {
            let jobwrap = load()?;
            match jobwrap.cancel(&id).await? {
                Some(record) => {
                    eprintln!("jobwrap: job {} is {} ({})", record.id, record.state, record.phase);
                }
                None => eprintln!("jobwrap: cancel requested; the jobwrap process driving job {id} stages out its outputs"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { id } => resume(&load()?, id).await,
        Command::Clusters => {
            exit_quietly_on_closed_stdout();
            let config = Config::load(&config_path).map_err(JobError::from)?;
            let clusters: Vec<_> = config.clusters.values().cloned().collect();
            println!("{:<12} {:>11} {:>19} {:>8}", "CLUSTER", "IDLE/CPUS", "IDLE/MEMORY (MiB)", "PENDING");
            for (name, answer) in jobwrap::placement::survey(&clusters) {
                match answer {
                    Ok(load) => println!(
                        "{:<12} {:>11} {:>19} {:>8}",
                        name,
                        format!("{}/{}", load.idle_cpus, load.total_cpus),
                        format!("{}/{}", load.idle_memory_mb, load.total_memory_mb),
                        load.pending_jobs
                    ),
                    Err(error) => println!("{name:<12} unreachable: {error}"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Builds the job spec of `jobwrap sbatch`: directives first, then command-line flags.
fn spec_from_script(command: &jobwrap::sbatch_options::SbatchCommand) -> anyhow::Result<JobSpec> {
    let script_text = std::fs::read_to_string(&command.script)
        .with_context(|| format!("cannot read batch script {}", command.script.display()))?;
    jobwrap::spec::check_line_endings(&command.script.display().to_string(), &script_text)?;
    let script_name = command
        .script
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "job".into());

    let mut flags = DataFlags::default();
    flags.read_directives(&script_name, &script_text)?;
    let cli = &command.flags;
    flags.stage_in.extend(cli.stage_in.iter().cloned());
    flags.stage_out.extend(cli.stage_out.iter().cloned());
    flags.output = cli.output.clone().or(flags.output);
    flags.cluster = cli.cluster.clone().or(flags.cluster);
    flags.keep_workdir |= cli.keep_workdir;
    flags.stage_first |= cli.stage_first;

    let spec = JobSpec {
        cluster: flags.cluster,
        script_name,
        script_text,
        script_args: command.script_args.clone(),
        sbatch_options: command.sbatch_options.clone(),
        stage_in: flags.stage_in,
        stage_out: flags.stage_out,
        output: flags.output,
        keep_workdir: flags.keep_workdir,
        stage_first: flags.stage_first,
    };
    spec.check()?;
    Ok(spec)
}

async fn run_job(jobwrap: &Jobwrap, spec: JobSpec, detach: bool) -> anyhow::Result<ExitCode> {
    let (record, _lock) = jobwrap.create(spec).await?;
    eprintln!("jobwrap: job {} created", record.id);
    if detach {
        println!("{}", record.id);
    }
    let record = jobwrap.drive(record, detach).await?;
    Ok(finish(&record))
}

/// Prints the outcome and returns the exit code of foreground mode.
fn finish(record: &JobRecord) -> ExitCode {
    if record.phase != Phase::Finished {
        eprintln!("jobwrap: job {} detached in phase {}; `jobwrap resume {}` finishes it", record.id, record.phase, record.id);
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "jobwrap: job {} {} (exit code {}), {} outputs staged out{}",
        record.id,
        record.state,
        record.exit_code(),
        record.outputs.len(),
        if record.missing_outputs.is_empty() {
            String::new()
        } else {
            format!(", missing: {}", record.missing_outputs.join(", "))
        }
    );
    ExitCode::from(record.exit_code().clamp(0, 255) as u8)
}

async fn resume(jobwrap: &Jobwrap, id: Option<String>) -> anyhow::Result<ExitCode> {
    if let Some(id) = id {
        let record = jobwrap.ledger.find(&id)?;
        let _lock = jobwrap.ledger.lock(&record.id)?;
        let record = jobwrap.ledger.load(&record.id)?;
        let record = jobwrap.drive(record, false).await?;
        return Ok(finish(&record));
    }

    let mut failed = false;
    for record in jobwrap.ledger.list()? {
        if record.phase == Phase::Finished {
            continue;
        }
        let lock = match jobwrap.ledger.lock(&record.id) {
            Ok(lock) => lock,
            Err(JobError::Locked { .. }) => {
                eprintln!("jobwrap: job {} is driven by another jobwrap process; skipped", record.id);
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        let record = jobwrap.ledger.load(&record.id)?;
        match jobwrap.drive(record, false).await {
            Ok(record) => {
                finish(&record);
            }
            Err(err) => {
                eprintln!("jobwrap: error: {err}");
                failed = true;
            }
        }
        drop(lock);
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Restores the default SIGPIPE action for commands that only print, so that
/// `jobwrap list | head` ends quietly like other Unix tools instead of panicking in
/// `println!`. Commands that drive jobs keep Rust's default (SIGPIPE ignored), because
/// a closed terminal must not kill a job's stage-out.
fn exit_quietly_on_closed_stdout() {
    // SAFETY: called before any thread writes to stdout; setting a signal disposition
    // to SIG_DFL has no other preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn print_status(record: &JobRecord) {
    let staged: Vec<_> = record.inputs.iter().filter(|file| file.done).collect();
    let staged_bytes: u64 = staged.iter().map(|file| file.size_bytes).sum();
    println!("job:        {}", record.id);
    println!("script:     {}", record.spec.script_name);
    println!("cluster:    {}", record.cluster);
    println!("slurm job:  {}", record.slurm.job_id.as_deref().unwrap_or("-"));
    println!("phase:      {}", record.phase);
    println!(
        "state:      {}{}",
        record.state,
        if record.state.is_final() { format!(" (exit code {})", record.exit_code()) } else { String::new() }
    );
    if let Some(placement) = &record.placement {
        println!("placement:  {}: {}", placement.cluster, placement.reason);
    }
    if let Some(source) = &record.slurm.verdict_source {
        println!("verdict:    from {source}");
    }
    println!(
        "workdir:    {}{}",
        record.workdir.display(),
        if record.workdir_removed { " (removed)" } else { "" }
    );
    println!("stage-in:   {}/{} files, {staged_bytes} bytes", staged.len(), record.inputs.len());
    for output in &record.outputs {
        println!(
            "output:     {} -> {} ({} bytes, verified {}{})",
            output.local,
            output.destination,
            output.size_bytes,
            output.verified,
            if output.from_failed_job { ", from a job that did not complete" } else { "" }
        );
    }
    for missing in &record.missing_outputs {
        println!("missing:    {missing}");
    }
    if let Some(pid) = record.driver_pid {
        println!("driver pid: {pid}");
    }
    if let Some(error) = &record.error {
        println!("error:      {error}");
    }
    println!();
}

fn print_sbatch_help() {
    println!(
        "Usage: jobwrap sbatch [jobwrap flags] [sbatch options] SCRIPT [ARGS...]\n\n\
         jobwrap flags (also accepted in #DATANET lines of SCRIPT):\n  \
         --stage-in SPACE:PATH[=DEST]     copy an object (or a prefix ending in '/') into the working directory\n  \
         --stage-out PATTERN[=SPACE:PATH] copy matching files out after the job (also when it fails)\n  \
         --to DEST                        destination of the preceding --stage-in/--stage-out\n  \
         --output SPACE:PREFIX/           where Slurm's logs and outputs without a destination go\n  \
         --keep                           keep the working directory after stage-out\n  \
         --stage-first                    stage in, then submit (default: submit first, stage in while queued)\n  \
         --cluster NAME|auto              cluster from the configuration; auto picks the soonest start\n  \
         --detach                         return after submission; `jobwrap resume` finishes the job\n\n\
         Every other option before SCRIPT is passed to sbatch unchanged."
    );
}
