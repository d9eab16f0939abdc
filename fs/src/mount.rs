//! Mounting: the FUSE session, its options, and a clean unmount on SIGTERM and SIGINT.
//!
//! [`run`] blocks until the filesystem is unmounted (by a signal, `fusermount3 -u` or
//! `umount`), then uploads files that still have changes before it returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{MountOption, SessionACL};

use crate::config::Config;
use crate::filesystem::DatanetFs;
use crate::fuse::FuseAdapter;

/// FUSE read loops; requests are answered in tokio tasks, so a few loops suffice.
const FUSE_THREADS: usize = 4;

/// Tokio worker threads for store requests.
const WORKER_THREADS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("invalid mount option {option:?}: {reason}")]
    Option { option: String, reason: String },

    #[error("mount point {path} is not an existing directory: create it first (mkdir -p {path})")]
    MountPoint { path: PathBuf },

    #[error("mount point {path} is a stale FUSE mount whose daemon is gone: run `fusermount3 -u {path}` first")]
    StaleMount { path: PathBuf },

    #[error("cannot make the cache directory {path} private (mode 0700): {source}; check its owner")]
    CacheDir { path: PathBuf, source: std::io::Error },

    #[error("cannot start the filesystem: {0}")]
    Filesystem(String),

    #[error("cannot mount at {path}: {source}")]
    Mount { path: PathBuf, source: std::io::Error },

    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Options given with `-o` (by hand or by `mount -t fuse.datanet`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// Let other users access the mount (`allow_other`); the kernel still checks
    /// permissions with `default_permissions`.
    pub allow_other: bool,
    /// Mount every space read-only (`ro`).
    pub read_only: bool,
    /// Configuration file given as `config=FILE`.
    pub config: Option<PathBuf>,
}

/// Options that mount(8) and fstab pass along and that need no action here.
const IGNORED_OPTIONS: &[&str] = &[
    "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "dev", "nodev", "suid",
    "nosuid", "exec", "noexec", "atime", "noatime", "relatime", "strictatime", "async", "default_permissions",
];

impl MountOptions {
    /// Parses a comma-separated `-o` list.
    pub fn parse(text: &str) -> Result<Self, MountError> {
        let mut options = MountOptions::default();
        for option in text.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match option {
                "allow_other" => options.allow_other = true,
                "ro" => options.read_only = true,
                _ if option.starts_with("config=") => options.config = Some(PathBuf::from(&option["config=".len()..])),
                _ if option.starts_with("x-") || option.starts_with("comment=") => {}
                _ if IGNORED_OPTIONS.contains(&option) => {}
                _ => {
                    return Err(MountError::Option {
                        option: option.to_string(),
                        reason: "supported: allow_other, ro, rw, config=FILE and the generic mount(8) options".into(),
                    })
                }
            }
        }
        Ok(options)
    }
}

/// The fuser configuration for `options`.
pub fn fuser_config(options: &MountOptions) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("datanet".into()),
        // fuser passes `Subtype` only to fusermount3, and its direct mount(2) as root uses
        // type `fuse`. The kernel option gives type `fuse.datanet` on both paths, so
        // `findmnt -t fuse.datanet` and `umount -t fuse.datanet` match.
        MountOption::CUSTOM("subtype=datanet".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
    ];
    if options.read_only {
        config.mount_options.push(MountOption::RO);
    }
    config.acl = if options.allow_other { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(FUSE_THREADS);
    config
}

/// Mounts `config` at `mountpoint` and serves requests until unmounted. `ready` is
/// called once the mount is in place (or failed).
pub fn run(
    mut config: Config,
    mountpoint: &Path,
    options: &MountOptions,
    ready: impl FnOnce(Result<(), String>),
) -> Result<(), MountError> {
    let checked = match std::fs::metadata(mountpoint) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => Err(MountError::StaleMount { path: mountpoint.to_path_buf() }),
        _ => Err(MountError::MountPoint { path: mountpoint.to_path_buf() }),
    };
    if let Err(err) = checked {
        ready(Err(err.to_string()));
        return Err(err);
    }
    // Resolved before mounting: once mounted, resolving the path would stat the mount
    // point, which waits for this process to serve it.
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    if options.read_only {
        for space in config.spaces.values_mut() {
            space.read_only = true;
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .thread_name("datanet-worker")
        .enable_all()
        .build()
        .map_err(MountError::Runtime)?;

    // Content cached by an older version may be readable by other users: make it private
    // before anything is served.
    if let Err(source) = crate::private_dir::restrict_cache_dir(&config.cache.dir) {
        let err = MountError::CacheDir { path: config.cache.dir.clone(), source };
        ready(Err(err.to_string()));
        return Err(err);
    }

    let fs = {
        let _guard = runtime.enter();
        match DatanetFs::new(&config) {
            Ok(fs) => {
                let fs = Arc::new(fs);
                fs.start_write_back();
                fs
            }
            Err(err) => {
                // The errno is for the kernel; a startup message needs only the text.
                let err = MountError::Filesystem(err.message);
                ready(Err(err.to_string()));
                return Err(err);
            }
        }
    };

    let adapter = FuseAdapter::new(Arc::clone(&fs), runtime.handle().clone());
    let mut session = match fuser::Session::new(adapter, mountpoint, &fuser_config(options)) {
        Ok(session) => session,
        Err(source) => {
            let err = MountError::Mount { path: mountpoint.to_path_buf(), source };
            ready(Err(err.to_string()));
            return Err(err);
        }
    };

    raise_kernel_read_ahead(&canonical);
    let unmounter = session.unmount_callable();
    let shown = mountpoint.display().to_string();
    runtime.spawn(unmount_on_signal(unmounter, shown.clone()));
    tracing::info!(mountpoint = %shown, spaces = ?fs.space_names(), "mounted");
    ready(Ok(()));

    let served = session.run();
    tracing::info!(mountpoint = %shown, "unmounted; uploading files that still have changes");
    if let Err(err) = runtime.block_on(fs.flush_all()) {
        tracing::error!(error = %err, "some changes could not be uploaded at unmount");
    }
    served.map_err(|source| MountError::Mount { path: mountpoint.to_path_buf(), source })
}

async fn unmount_on_signal(unmounter: fuser::SessionUnmounter, mountpoint: String) {
    use tokio::signal::unix::{signal, SignalKind};

    let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install SIGTERM/SIGINT handlers; unmount with fusermount3 -u");
        return;
    };
    let unmounter = Arc::new(std::sync::Mutex::new(unmounter));
    loop {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, mountpoint = %mountpoint, "unmounting");
        let unmounter = Arc::clone(&unmounter);
        let result = tokio::task::spawn_blocking(move || unmounter.lock().unwrap_or_else(|e| e.into_inner()).unmount()).await;
        match result {
            Ok(Ok(())) => return,
            Ok(Err(err)) => {
                tracing::error!(error = %err, mountpoint = %mountpoint, "unmount failed (busy?); close the files using the mount and send the signal again");
            }
            Err(err) => {
                tracing::error!(error = %err, "unmount task failed");
                return;
            }
        }
    }
}

/// Kernel read-ahead of the mount, in KiB. With the kernel's default of 128 KiB for a
/// FUSE mount, a reader waits for each request in turn. With 4 MiB, the kernel keeps a
/// few requests in flight while the reader copies the previous ones.
const KERNEL_READ_AHEAD_KB: u32 = 4096;

/// Sets the read-ahead of the mount's backing device (`/sys/class/bdi/MAJOR:MINOR`).
/// `mountpoint` must be canonical already. The device number comes from
/// `/proc/self/mountinfo`, because a `stat` of the mount point would wait for this
/// process to serve it. Only root may write there, and others keep the kernel default.
fn raise_kernel_read_ahead(mountpoint: &Path) {
    let Some(device) = mount_device(mountpoint) else {
        tracing::debug!(mountpoint = %mountpoint.display(), "mount not found in /proc/self/mountinfo; kernel read-ahead unchanged");
        return;
    };
    let path = format!("/sys/class/bdi/{device}/read_ahead_kb");
    match std::fs::write(&path, KERNEL_READ_AHEAD_KB.to_string()) {
        Ok(()) => tracing::debug!(%path, kib = KERNEL_READ_AHEAD_KB, "kernel read-ahead set"),
        Err(err) => tracing::debug!(%path, error = %err, "cannot set the kernel read-ahead; keeping the default"),
    }
}

/// Returns the `MAJOR:MINOR` device of the newest mount at `mountpoint`.
fn mount_device(mountpoint: &Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    table.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let device = fields.nth(2)?;
        let point = fields.nth(1)?;
        (Path::new(&unescape_mountinfo(point)) == mountpoint).then(|| device.to_string())
    })
}

/// Decodes the octal escapes (`\040` for a space) of a mountinfo path.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 4).filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match escape {
            Some(digits) => {
                out.push(digits.iter().fold(0u8, |value, d| value.wrapping_mul(8).wrapping_add(d - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes_decoded() {
        assert_eq!(super::unescape_mountinfo("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(super::unescape_mountinfo("/tmp/tab\\011x\\134y"), "/tmp/tab\tx\\y");
        assert_eq!(super::unescape_mountinfo("/plain\\09"), "/plain\\09", "not an octal escape");
    }

    use super::*;

    #[test]
    fn options_parse() {
        let options = MountOptions::parse("rw,allow_other,_netdev,config=/etc/d.toml,x-systemd.automount").unwrap();
        assert!(options.allow_other);
        assert!(!options.read_only);
        assert_eq!(options.config, Some(PathBuf::from("/etc/d.toml")));
        assert!(MountOptions::parse("ro").unwrap().read_only);
    }

    #[test]
    fn unknown_option_rejected() {
        let err = MountOptions::parse("rw,cache=huge").unwrap_err().to_string();
        assert!(err.contains("cache=huge"), "{err}");
    }

    #[test]
    fn fuser_config_sets_permissions_and_acl() {
        let config = fuser_config(&MountOptions { allow_other: true, ..MountOptions::default() });
        assert!(config.mount_options.contains(&MountOption::DefaultPermissions));
        assert_eq!(config.acl, SessionACL::All);
    }
}

