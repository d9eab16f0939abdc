//! The `datanet` command: mounts the data network and checks its configuration.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use datanet::check::check_spaces;
use datanet::config::Config;
use datanet::mount::{run, MountOptions};

#[derive(Parser)]
#[command(name = "datanet", version, about = "One POSIX namespace over every storage space")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount every configured space below MOUNTPOINT (as MOUNTPOINT/<space>/...).
    Mount {
        /// Configuration file [default: $DATANET_CONFIG or /etc/datanet/datanet.toml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Stay in the foreground instead of detaching once mounted.
        #[arg(long, short = 'f')]
        foreground: bool,
        /// Mount options, comma-separated: allow_other, ro, config=FILE.
        #[arg(short = 'o')]
        options: Option<String>,
        /// Write the log to this file [default: standard error with --foreground,
        /// CACHE_DIR/datanet.log otherwise].
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// An existing empty directory.
        mountpoint: PathBuf,
    },
    /// Validate the configuration and report, per space, whether it is reachable and writable.
    Check {
        /// Configuration file [default: $DATANET_CONFIG or /etc/datanet/datanet.toml].
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// glibc malloc arenas kept by the daemon's threads. Each thread otherwise gets its own
/// arena, and freed read-ahead blocks then stay resident in many of them.
const MALLOC_ARENAS: i32 = 2;

/// Allocations from this size on get their own mapping, returned to the system when
/// freed. Setting it also stops glibc from raising the threshold after the first free
/// of a read-ahead block, which would move all later blocks into the arenas. It sits
/// above hyper's read buffers (at most 408 KiB, its `DEFAULT_MAX_BUFFER_SIZE`). Mapped
/// afresh, each such buffer costs a page fault per 4 KiB received: about 10% of the
/// daemon's CPU on a cold read, measured with `perf`.
const MALLOC_MMAP_THRESHOLD_BYTES: i32 = 512 << 10;

/// Free memory at the top of an arena that glibc keeps rather than returning it at once,
/// so that the HTTP client's buffers reuse pages already mapped.
const MALLOC_TRIM_THRESHOLD_BYTES: i32 = 16 << 20;

fn main() {
    // SAFETY: called before any thread exists; mallopt only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mount { config, foreground, options, log_file, mountpoint } => {
            mount_command(config, foreground, options.as_deref(), log_file, &mountpoint)
        }
        Command::Check { config } => check_command(config),
    };
    if let Err(err) = result {
        eprintln!("datanet: {err:#}");
        std::process::exit(1);
    }
}

fn init_logging(log_file: Option<&Path>) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            // The log names paths and errors of every user of the mount: owner only.
            let file = datanet::private_dir::file_options()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            builder.with_ansi(false).with_writer(std::sync::Mutex::new(file)).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn load_config(explicit: Option<&Path>) -> anyhow::Result<Config> {
    let path = Config::resolve_path(explicit);
    Ok(Config::load(&path)?)
}

fn mount_command(
    config: Option<PathBuf>,
    foreground: bool,
    options: Option<&str>,
    log_file: Option<PathBuf>,
    mountpoint: &Path,
) -> anyhow::Result<()> {
    let options = MountOptions::parse(options.unwrap_or(""))?;
    let config = load_config(config.as_deref().or(options.config.as_deref()))?;
    if config.spaces.is_empty() {
        bail!("{} configures no space: add a [spaces.NAME] section with a url", config.source.display());
    }
    let mountpoint = match std::fs::canonicalize(mountpoint) {
        Ok(path) => path,
        Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "mount point {0} is a stale FUSE mount (its daemon is gone): run `fusermount3 -u {0}` first",
            mountpoint.display()
        ),
        Err(err) => {
            return Err(err).with_context(|| format!("mount point {} does not exist: create it first", mountpoint.display()))
        }
    };

    if foreground {
        init_logging(log_file.as_deref())?;
        return run(config, &mountpoint, &options, |_| {}).map_err(Into::into);
    }

    // Fork before any thread exists; the parent exits once the child reports the mount.
    let (read_end, write_end) = pipe()?;
    // SAFETY: no other thread runs yet, so the child may continue normally after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("cannot fork the daemon: {}", std::io::Error::last_os_error());
    }
    if pid > 0 {
        drop(write_end);
        let mut status = String::new();
        std::fs::File::from(read_end).read_to_string(&mut status).ok();
        return match status.strip_prefix("ok") {
            Some(_) => Ok(()),
            None if status.is_empty() => bail!("the daemon exited before mounting; run with --foreground to see why"),
            None => bail!("{}", status.trim()),
        };
    }

    drop(read_end);
    // SAFETY: setsid has no preconditions; it detaches the daemon from the terminal.
    unsafe { libc::setsid() };
    redirect_stdio_to_null()?;
    // A daemon has no terminal: without --log-file, log next to the cache.
    let log_file = log_file.unwrap_or_else(|| config.cache.dir.join("datanet.log"));
    if let Some(dir) = log_file.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(datanet::private_dir::DIR_MODE)
            .create(dir)
            .with_context(|| format!("cannot create log directory {}", dir.display()))?;
    }
    init_logging(Some(&log_file))?;
    let mut status_pipe = Some(std::fs::File::from(write_end));
    let result = run(config, &mountpoint, &options, |outcome| {
        if let Some(mut pipe) = status_pipe.take() {
            let message = match outcome {
                Ok(()) => "ok".to_string(),
                Err(err) => err,
            };
            let _ = pipe.write_all(message.as_bytes());
        }
    });
    if let Err(err) = &result {
        tracing::error!(error = %err, "datanet daemon stopped");
    }
    result.map_err(Into::into)
}

fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("cannot create a pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and not owned elsewhere.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn redirect_stdio_to_null() -> anyhow::Result<()> {
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    use std::os::fd::AsRawFd;
    for target in 0..3 {
        // SAFETY: dup2 onto the standard descriptors of this process.
        if unsafe { libc::dup2(null.as_raw_fd(), target) } < 0 {
            bail!("cannot redirect standard streams: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn check_command(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load_config(config.as_deref())?;
    datanet::check::require_spaces(&config).map_err(anyhow::Error::msg)?;
    println!("configuration {} is valid: {} space(s)", config.source.display(), config.spaces.len());
    for warning in datanet::check::config_warnings(&config) {
        println!("warning: {warning}");
    }

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reports = runtime.block_on(check_spaces(&config));
    let mut failed = 0;
    for report in &reports {
        println!("{:<20} {:<40} {}", report.name, report.url, report.summary());
        if !report.is_ok() {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {} space(s) failed the check", reports.len());
    }
    Ok(())
}
