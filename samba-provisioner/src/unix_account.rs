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
