//! The `samba-provisioner` command: a thin layer over the library that parses
//! arguments, loads the configuration and prints results.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use datanet::config::SecretSource;
use datanet::Config;
use tracing_subscriber::EnvFilter;
use zeroize::Zeroizing;

use samba_provisioner::confine::parse_client_ip;
use samba_provisioner::instructions::{render_text, MountInfo};
use samba_provisioner::lease::rfc3339;
use samba_provisioner::{token, GrantRequest, Lease, Provisioner, TokenKey};

/// Largest token input accepted; a token is well under 1 KiB.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

#[derive(Parser)]
#[command(
    name = "samba-provisioner",
    version,
    about = "Temporary Samba users confined to one directory, with expiring tokens"
)]
struct Cli {
    /// Configuration file [default: $DATANET_CONFIG, then /etc/datanet/datanet.toml].
    #[arg(long, global = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a lease on DIR and print its token.
    Grant {
        /// Directory to share; must lie inside one of samba.allowed_roots.
        #[arg(long)]
        path: PathBuf,
        /// Lease length, such as 8h or 90m (at most samba.max_ttl).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Duration,
        /// Share the directory read-only.
        #[arg(long)]
        read_only: bool,
        /// Only this address may connect (Samba `hosts allow`).
        #[arg(long)]
        client_ip: Option<String>,
        /// Free text shown in listings, such as a session or user name.
        #[arg(long)]
        label: Option<String>,
        /// Print the lease and the token as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a token from FILE (or standard input) and print mount instructions.
    Decode {
        /// File holding the token; `-` or nothing reads standard input.
        file: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// 0600 file with the 64-hex-character token key [default: samba.token_key of the configuration].
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Revoke lease ID, or the lease of a token given on standard input.
    Revoke {
        /// Lease id as shown by `list`; without it the token is read from standard input.
        id: Option<String>,
    },
    /// List leases.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke expired leases and reconcile accounts and shares with the ledger.
    Gc {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve the HTTP lease API and run gc on a timer.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7445")]
        listen: SocketAddr,
        /// Time between gc runs, such as 60s.
        #[arg(long, value_parser = parse_ttl, default_value = "60s")]
        gc_interval: Duration,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

fn parse_ttl(text: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("{err}; write e.g. 8h, 90m or 30s"))
}

fn main() {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();

    if let Err(err) = run(cli) {
        eprintln!("samba-provisioner: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Grant {
            path,
            ttl,
            read_only,
            client_ip,
            label,
            json,
        } => {
            let provisioner = open_provisioner(cli.config.as_deref())?;
            provisioner.check_allowed_roots()?;
            let client_ip = client_ip.as_deref().map(parse_client_ip).transpose()?;
            let request = GrantRequest {
                path,
                ttl,
                read_only,
                client_ip,
                label,
            };
            let grant = provisioner.grant(&request)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&grant)?);
            } else {
                println!("{}", grant.token.expose());
            }
        }
        Command::Decode {
            file,
            format,
            key_file,
        } => decode(cli.config.as_deref(), file.as_deref(), format, key_file)?,
        Command::Revoke { id } => {
            let provisioner = open_provisioner(cli.config.as_deref())?;
            let lease = match id {
                Some(id) => provisioner.revoke(&id)?,
                None => provisioner.revoke_token(&read_token(None)?)?,
            };
            println!("revoked lease {} (account {})", lease.id, lease.account);
        }
        Command::List { json } => {
            exit_quietly_on_closed_stdout();
            let leases = open_provisioner(cli.config.as_deref())?.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&leases)?);
            } else {
                print_table(&leases);
            }
        }
        Command::Gc { json } => {
            let provisioner = open_provisioner(cli.config.as_deref())?;
            if let Err(err) = provisioner.check_server() {
                eprintln!("samba-provisioner: warning: {err}");
            }
            let report = provisioner.gc()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "gc: {} expired, {} rolled back, {} revokes finished, {} repaired, {} dropped, {} orphans removed, {} failures",
                    report.expired.len(),
                    report.rolled_back.len(),
                    report.revokes_finished.len(),
                    report.repaired.len(),
                    report.dropped.len(),
                    report.orphan_shares.len() + report.orphan_passdb_entries.len() + report.orphan_accounts.len(),
                    report.failures.len()
                );
            }
            if !report.failures.is_empty() {
                bail!(
                    "gc could not settle everything: {}",
                    report.failures.join("; ")
                );
            }
        }
        Command::Serve {
            listen,
            gc_interval,
        } => serve(cli.config.as_deref(), listen, gc_interval)?,
    }
    Ok(())
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    let path = Config::resolve_path(path);
    Ok(Config::load(&path)?)
}

fn open_provisioner(config_path: Option<&Path>) -> Result<Provisioner> {
    let config = load_config(config_path)?;
    Ok(Provisioner::new(config.samba()?)?)
}

fn decode(
    config_path: Option<&Path>,
    file: Option<&Path>,
    format: Format,
    key_file: Option<PathBuf>,
) -> Result<()> {
    let key = match key_file {
        Some(path) => TokenKey::load(&SecretSource::File(path))?,
        None => {
            let config = load_config(config_path).context(
                "decode needs the token key: pass --key-file or a configuration with [samba]",
            )?;
            TokenKey::load(&config.samba()?.token_key)?
        }
    };
    let text = read_token(file)?;
    let claims = token::open_unexpired(&key, &text, SystemTime::now())?;

    match format {
        Format::Text => print!("{}", render_text(&claims, SystemTime::now())),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&MountInfo::new(&claims))?
        ),
    }
    Ok(())
}

/// Reads a token from a file or, for `None` and `-`, from standard input.
fn read_token(file: Option<&Path>) -> Result<Zeroizing<String>> {
    let mut text = Zeroizing::new(String::new());
    match file {
        Some(path) if path != Path::new("-") => {
            let opened = std::fs::File::open(path).map_err(|err| {
                // A token pasted in place of a file name has neither '/' nor '.': keep
                // it out of the message.
                let shown = path.to_string_lossy();
                if shown.contains('/') || shown.contains('.') {
                    anyhow::anyhow!("cannot read token file {shown}: {err}")
                } else {
                    anyhow::anyhow!(
                        "cannot read the token file: {err}; give a file path, or pipe the token on standard input (never put it on the command line)"
                    )
                }
            })?;
            opened
                .take(MAX_TOKEN_BYTES)
                .read_to_string(&mut text)
                .with_context(|| format!("cannot read token file {}", path.display()))?;
        }
        _ => {
            if std::io::stdin().is_terminal() {
                eprintln!("Paste the token and press Ctrl-D:");
            }
            std::io::stdin()
                .take(MAX_TOKEN_BYTES)
                .read_to_string(&mut text)
                .context("cannot read the token from standard input")?;
        }
    }
    Ok(text)
}

fn print_table(leases: &[Lease]) {
    println!(
        "{:<16}  {:<20}  {:<12}  {:<20}  {:<4}  PATH",
        "ID", "ACCOUNT", "STATE", "EXPIRES", "MODE"
    );
    for lease in leases {
        let state = serde_json::to_value(lease.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let label = lease
            .label
            .as_deref()
            .map(|l| format!("  ({l})"))
            .unwrap_or_default();
        println!(
            "{:<16}  {:<20}  {:<12}  {:<20}  {:<4}  {}{label}",
            lease.id,
            lease.account,
            state,
            rfc3339(lease.expires_at),
            if lease.read_only { "ro" } else { "rw" },
            lease.path.display()
        );
    }
}

fn serve(config_path: Option<&Path>, listen: SocketAddr, gc_interval: Duration) -> Result<()> {
    let config = load_config(config_path)?;
    let samba = config.samba()?;
    let source = samba.api_token.as_ref().context(
        "serve needs samba.api_token_file (a 0600 file with the bearer token) in the configuration",
    )?;
    let bearer_token = Zeroizing::new(source.read("samba.api_token")?);
    if gc_interval.is_zero() {
        bail!("--gc-interval must be positive, such as 60s");
    }
    let provisioner = Arc::new(Provisioner::new(samba)?);
    provisioner.check_server()?;

    let report = provisioner.gc().context("gc at startup failed")?;
    if !report.failures.is_empty() {
        tracing::warn!(failures = ?report.failures, "gc at startup left work for the next run");
    }

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let shutdown = async {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        };
        samba_provisioner::api::serve(provisioner, bearer_token, listener, gc_interval, shutdown)
            .await?;
        Ok(())
    })
}

/// Restores the default SIGPIPE action for `list`, so that `samba-provisioner list | head`
/// ends quietly instead of panicking in `println!`.
fn exit_quietly_on_closed_stdout() {
    // SAFETY: called before any thread writes to stdout; setting a signal disposition
    // to SIG_DFL has no other preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
