//! A lease: one temporary account and one share that exposes one directory until an
//! expiry time.
//!
//! Names follow a fixed shape so that reconcile can recognise its own objects: a lease
//! id is [`LEASE_ID_LEN`] lowercase letters and digits, and the account and its share
//! share one name, the configured prefix followed by [`ACCOUNT_SUFFIX_LEN`] of them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ProvisionError;

pub const LEASE_ID_LEN: usize = 16;
pub const ACCOUNT_SUFFIX_LEN: usize = 12;

/// The stage of a lease's life. Records in any state but `Active` belong to an
/// operation that may have been cut short, and reconcile finishes or undoes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// The intent is recorded; the account and share may be partly created.
    Provisioning,
    /// Account, passdb entry and share exist; the token was handed out.
    Active,
    /// Revocation started; the objects may be partly removed.
    Revoking,
}

/// A lease as stored and as shown to operators. It contains no secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub id: String,
    /// Unix account and Samba user name; also the share name.
    pub account: String,
    pub share: String,
    /// Canonical directory the share exposes.
    pub path: PathBuf,
    pub read_only: bool,
    pub client_ip: Option<IpAddr>,
    pub label: Option<String>,
    /// Unix time in seconds.
    pub created_at: u64,
    /// Unix time in seconds; Samba rejects logins from this second on.
    pub expires_at: u64,
    pub state: LeaseState,
}

impl Lease {
    pub fn is_expired(&self, now: SystemTime) -> bool {
        unix_seconds(now) >= self.expires_at
    }

    pub fn expires_at_rfc3339(&self) -> String {
        rfc3339(self.expires_at)
    }
}

/// Seconds since the Unix epoch; times before it count as zero.
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Formats Unix seconds as an RFC 3339 UTC timestamp.
pub fn rfc3339(seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(seconds)).to_string()
}

/// Checks the shape of a lease id given on the command line or in a URL.
pub fn check_lease_id(id: &str) -> Result<(), ProvisionError> {
    let well_formed = id.len() == LEASE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !well_formed {
        return Err(ProvisionError::invalid(
            "lease id",
            id,
            format!("a lease id has {LEASE_ID_LEN} lowercase letters and digits, as `samba-provisioner list` shows"),
        ));
    }
    Ok(())
}

/// Tells whether `name` has the shape of an account this provisioner creates.
pub fn is_lease_account_name(name: &str, prefix: &str) -> bool {
    match name.strip_prefix(prefix) {
        Some(suffix) => {
            suffix.len() == ACCOUNT_SUFFIX_LEN
                && suffix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_name_shape() {
        assert!(is_lease_account_name("dnlabcdef012345", "dnl"));
        assert!(!is_lease_account_name("dnlabc", "dnl"));
        assert!(!is_lease_account_name("dnlABCDEF012345", "dnl"));
        assert!(!is_lease_account_name("xyzabcdef012345", "dnl"));
        assert!(!is_lease_account_name("dnlabcdef0123456", "dnl"));
    }

    #[test]
    fn lease_id_shape() {
        assert!(check_lease_id("abcdefgh01234567").is_ok());
        let err = check_lease_id("../etc/passwd").unwrap_err().to_string();
        assert!(err.contains("lease id"), "{err}");
        assert!(check_lease_id("ABCDEFGH01234567").is_err());
    }

    #[test]
    fn expiry_is_inclusive() {
        let lease = Lease {
            id: "abcdefgh01234567".into(),
            account: "dnlabcdef012345".into(),
            share: "dnlabcdef012345".into(),
            path: "/datanet/x".into(),
            read_only: false,
            client_ip: None,
            label: None,
            created_at: 100,
            expires_at: 200,
            state: LeaseState::Active,
        };
        assert!(!lease.is_expired(UNIX_EPOCH + Duration::from_secs(199)));
        assert!(lease.is_expired(UNIX_EPOCH + Duration::from_secs(200)));
        assert_eq!(lease.expires_at_rfc3339(), "1970-01-01T00:03:20Z");
    }
}
