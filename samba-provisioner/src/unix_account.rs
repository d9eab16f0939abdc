//! Unix accounts behind lease users: Samba maps every user to one.
//!
//! Accounts are system accounts without a home directory or login shell. Their GECOS
//! field starts with [`ACCOUNT_COMMENT`], and reconcile removes only accounts that carry
//! it, so an operator's account that happens to match the name pattern is never touched.

use std::sync::Mutex;
use std::thread::sleep;
use std::time::Duration;

use crate::tool::{run, ToolOutput};
use crate::ProvisionError;

/// GECOS prefix of every account this tool creates; the lease id follows it.
pub const ACCOUNT_COMMENT: &str = "datanet samba lease";

const PASSWD_PATH: &str = "/etc/passwd";

/// Buffer for the strings of one `getpwnam_r`/`getgrnam_r` entry; a group with many
/// members may need more, and the lookups grow it on ERANGE.
const NSS_BUFFER_BYTES: usize = 4096;

/// `useradd` exit status for "cannot update the password file", which covers a lock
/// held by another process (shadow-utils 4.13, Debian 12).
const USERADD_CANNOT_UPDATE: i32 = 1;
/// `userdel` exit status for "the user does not exist".
const USERDEL_NO_SUCH_USER: i32 = 6;
/// `userdel` exit status for "the user is logged in" (a process runs with its uid).
const USERDEL_USER_BUSY: i32 = 8;

/// Retries while another process has the password file locked or a session process
/// still runs as the account: 100 tries 100 ms apart, about 10 s in all.
const RETRIES: u32 = 100;
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// Serializes this process's account changes, so parallel requests of one server do
/// not contend for the password file lock among themselves.
static ACCOUNT_CHANGES: Mutex<()> = Mutex::new(());

/// Tells whether the Unix user `name` exists, through NSS as smbd resolves `force user`.
pub fn user_exists(name: &str) -> std::io::Result<bool> {
    let name = nss_name(name)?;
    nss_lookup(|buffer| {
        // SAFETY: every pointer refers to a live local or to `buffer` with its length.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let status = unsafe {
            libc::getpwnam_r(name.as_ptr(), &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found)
        };
        (status, !found.is_null())
    })
}

/// Tells whether the Unix group `name` exists, through NSS as smbd resolves `force group`.
pub fn group_exists(name: &str) -> std::io::Result<bool> {
    let name = nss_name(name)?;
    nss_lookup(|buffer| {
        // SAFETY: every pointer refers to a live local or to `buffer` with its length.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        let status = unsafe {
            libc::getgrnam_r(name.as_ptr(), &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found)
        };
        (status, !found.is_null())
    })
}

fn nss_name(name: &str) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(name).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

/// Runs one reentrant NSS lookup, growing the buffer while it returns ERANGE.
fn nss_lookup(mut lookup: impl FnMut(&mut Vec<libc::c_char>) -> (libc::c_int, bool)) -> std::io::Result<bool> {
    let mut buffer: Vec<libc::c_char> = vec![0; NSS_BUFFER_BYTES];
    loop {
        match lookup(&mut buffer) {
            (0, found) => return Ok(found),
            (libc::ERANGE, _) if buffer.len() < (1 << 24) => buffer.resize(buffer.len() * 2, 0),
            // glibc returns these for "no such entry" from some NSS modules.
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(false),
            (code, _) => return Err(std::io::Error::from_raw_os_error(code)),
        }
    }
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixAccount {
    pub name: String,
    pub uid: u32,
    pub comment: String,
}

impl UnixAccount {
    pub fn is_lease_account(&self) -> bool {
        self.comment.starts_with(ACCOUNT_COMMENT)
    }
}

/// Creates a system account without home directory and with no login shell.
pub fn create(name: &str, lease_id: &str) -> Result<(), ProvisionError> {
    let comment = format!("{ACCOUNT_COMMENT} {lease_id}");
    let args = [
        "--system",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        "--no-user-group",
        "--comment",
        &comment,
        "--",
        name,
    ];
    let _guard = ACCOUNT_CHANGES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    retry_while("useradd", &args, "creating the lease account", |output| {
        output.code == Some(USERADD_CANNOT_UPDATE) && is_lock_message(&output.stderr)
    })?
    .check()?;
    Ok(())
}

/// Removes an account; an account that does not exist is not an error.
pub fn remove(name: &str) -> Result<(), ProvisionError> {
    let _guard = ACCOUNT_CHANGES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let output = retry_while(
        "userdel",
        &["--", name],
        "removing the lease account",
        |output| output.code == Some(USERDEL_USER_BUSY) || is_lock_message(&output.stderr),
    )?;
    if output.success || output.code == Some(USERDEL_NO_SUCH_USER) {
        return Ok(());
    }
    Err(output.into_error())
}

/// Lists the accounts in `/etc/passwd` whose name starts with `prefix`.
pub fn list(prefix: &str) -> Result<Vec<UnixAccount>, ProvisionError> {
    let text = std::fs::read_to_string(PASSWD_PATH)
        .map_err(|err| ProvisionError::io("read", PASSWD_PATH, err))?;
    Ok(parse_passwd(&text)
        .into_iter()
        .filter(|account| account.name.starts_with(prefix))
        .collect())
}

fn parse_passwd(text: &str) -> Vec<UnixAccount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 7 {
                return None;
            }
            Some(UnixAccount {
                name: fields[0].to_string(),
                uid: fields[2].parse().ok()?,
                comment: fields[4].to_string(),
            })
        })
        .collect()
}

fn retry_while(
    program: &str,
    args: &[&str],
    action: &str,
    transient: impl Fn(&ToolOutput) -> bool,
) -> Result<ToolOutput, ProvisionError> {
    let mut attempt = 0;
    loop {
        let output = run(program, args, None, action)?;
        if output.success || !transient(&output) || attempt >= RETRIES {
            return Ok(output);
        }
        attempt += 1;
        tracing::debug!(program, attempt, stderr = %output.stderr.trim(), "retrying a busy account change");
        sleep(RETRY_DELAY);
    }
}

fn is_lock_message(stderr: &str) -> bool {
    stderr.contains("cannot lock") || stderr.contains("try again later")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nss_lookups_find_root_only() {
        assert!(user_exists("root").unwrap());
        assert!(group_exists("root").unwrap());
        assert!(!user_exists("datanet-no-such-user").unwrap());
        assert!(!group_exists("datanet-no-such-group").unwrap());
    }

    #[test]
    fn passwd_lines_parse() {
        let text = "root:x:0:0:root:/root:/bin/bash\n\
                    dnlabcdef012345:x:998:100:datanet samba lease abcd:/nonexistent:/usr/sbin/nologin\n\
                    broken line\n";
        let accounts = parse_passwd(text);
        assert_eq!(accounts.len(), 2);
        assert_eq!(accounts[1].uid, 998);
        assert!(accounts[1].is_lease_account());
        assert!(!accounts[0].is_lease_account());
    }
}
