//! Grant and revoke: the steps that create and remove a lease's Unix account, passdb
//! entry and share.
//!
//! Invariant: the lease record is written (state `provisioning` or `revoking`) before
//! the first step and removed or marked `active` only after the last. A crash at any
//! point therefore leaves a record from which reconcile finishes or undoes the
//! operation. Every removal step accepts an object that is already gone, so undoing a
//! half-made lease is the same as revoking it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use datanet::config::SambaConfig;
use serde::Serialize;

use crate::confine::{check_config_text, check_label, confine_directory};
use crate::failpoint;
use crate::lease::{
    check_lease_id, unix_seconds, Lease, LeaseState, ACCOUNT_SUFFIX_LEN, LEASE_ID_LEN,
};
use crate::ledger::{LeaseRecord, Ledger, SealedToken};
use crate::samba::Samba;
use crate::secret::{random_name, Password};
use crate::share::{supports_user_xattrs, ShareDefinition};
use crate::token::{self, TokenClaims, TokenKey};
use crate::unix_account;
use crate::ProvisionError;

/// The parameters of a grant.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub path: PathBuf,
    pub ttl: Duration,
    pub read_only: bool,
    pub client_ip: Option<IpAddr>,
    pub label: Option<String>,
}

/// A new lease and the token for its node.
#[derive(Debug, Serialize)]
pub struct Grant {
    pub lease: Lease,
    #[serde(serialize_with = "serialize_token")]
    pub token: SealedToken,
}

fn serialize_token<S: serde::Serializer>(
    token: &SealedToken,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(token.expose())
}

#[derive(Debug)]
pub struct Provisioner {
    pub(crate) config: SambaConfig,
    pub(crate) key: TokenKey,
    pub(crate) ledger: Ledger,
    pub(crate) samba: Samba,
    /// Directory of the 0600 files that `net conf import` reads.
    pub(crate) temp_dir: PathBuf,
}

impl Provisioner {
    /// Checks the `[samba]` settings, loads the token key and opens the ledger.
    pub fn new(config: &SambaConfig) -> Result<Provisioner, ProvisionError> {
        for (key, name) in [
            ("samba.force_user", &config.force_user),
            ("samba.force_group", &config.force_group),
        ] {
            if let Some(name) = name {
                check_unix_name(key, name)?;
            }
        }
        check_force_identity(config)?;
        if let Err(err) = check_allowed_roots(&config.allowed_roots) {
            // Revoke, list, gc and serve must keep working while a root is gone (a mount
            // that is down), so only the `grant` command fails on it.
            tracing::warn!(error = %err, "samba.allowed_roots has a missing directory; grants below it fail");
        }
        std::fs::metadata(&config.smb_conf)
            .map_err(|err| ProvisionError::io("read", &config.smb_conf, err))?;

        let key = TokenKey::load(&config.token_key)?;
        let ledger = Ledger::open(&config.state_dir)?;
        let temp_dir = config.state_dir.join("tmp");
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&temp_dir)
            .map_err(|err| ProvisionError::io("create", &temp_dir, err))?;
        let samba = Samba::new(&config.smb_conf, &temp_dir);

        Ok(Provisioner {
            config: config.clone(),
            key,
            ledger,
            samba,
            temp_dir,
        })
    }

    /// Fails when an entry of `samba.allowed_roots` is missing; see [`check_allowed_roots`].
    pub fn check_allowed_roots(&self) -> Result<(), ProvisionError> {
        check_allowed_roots(&self.config.allowed_roots)
    }

    pub fn config(&self) -> &SambaConfig {
        &self.config
    }

    /// Checks that the smbd configuration supports lease shares; see
    /// [`Samba::check_server_settings`].
    pub fn check_server(&self) -> Result<(), ProvisionError> {
        self.samba.check_server_settings()
    }

    pub fn state_dir(&self) -> &Path {
        self.ledger.state_dir()
    }

    /// Creates a lease: account, passdb entry with expiry, and share.
    pub fn grant(&self, request: &GrantRequest) -> Result<Grant, ProvisionError> {
        let path = confine_directory(&request.path, &self.config.allowed_roots)?;
        if let Some(label) = &request.label {
            check_label(label)?;
        }
        let ttl_seconds = self.check_ttl(request.ttl)?;

        let created_at = unix_seconds(SystemTime::now());
        let account = format!(
            "{}{}",
            self.config.account_prefix,
            random_name(ACCOUNT_SUFFIX_LEN)?
        );
        let mut lease = Lease {
            id: random_name(LEASE_ID_LEN)?,
            share: account.clone(),
            account,
            path,
            read_only: request.read_only,
            client_ip: request.client_ip,
            label: request.label.clone(),
            created_at,
            expires_at: created_at + ttl_seconds,
            state: LeaseState::Provisioning,
        };
        let password = Password::generate()?;
        let token = self.seal_token(&lease, &password)?;
        let share = self.share_definition(&lease);

        let _lock = self.ledger.lock_shared()?;
        self.ledger.write(&LeaseRecord {
            lease: lease.clone(),
            token: token.clone(),
        })?;
        failpoint::hit("grant:intent");

        if let Err(err) = self.create_objects(&lease, &password, &share) {
            tracing::error!(lease = %lease.id, account = %lease.account, error = %err, "grant failed, rolling back");
            match self.remove_objects(&lease) {
                Ok(()) => self.ledger.remove(&lease.id)?,
                Err(undo) => tracing::error!(
                    lease = %lease.id,
                    error = %undo,
                    "rollback failed; the record stays for `samba-provisioner gc`"
                ),
            }
            return Err(err);
        }

        lease.state = LeaseState::Active;
        self.ledger.write(&LeaseRecord {
            lease: lease.clone(),
            token: token.clone(),
        })?;
        tracing::info!(
            lease = %lease.id,
            account = %lease.account,
            path = %lease.path.display(),
            expires = %lease.expires_at_rfc3339(),
            read_only = lease.read_only,
            "granted lease"
        );
        Ok(Grant { lease, token })
    }

    /// Revokes a lease: the share goes first and its sessions are cut, then the passdb
    /// entry and the Unix account.
    pub fn revoke(&self, id: &str) -> Result<Lease, ProvisionError> {
        check_lease_id(id)?;
        let _lock = self.ledger.lock_shared()?;
        let mut record = self.ledger.read(id)?;

        record.lease.state = LeaseState::Revoking;
        self.ledger.write(&record)?;
        failpoint::hit("revoke:intent");

        self.remove_objects(&record.lease)?;
        self.ledger.remove(id)?;
        tracing::info!(lease = %id, account = %record.lease.account, "revoked lease");
        Ok(record.lease)
    }

    /// Revokes the lease a token belongs to. An expired token may still be revoked.
    pub fn revoke_token(&self, text: &str) -> Result<Lease, ProvisionError> {
        let claims = token::open(&self.key, text)?;
        self.revoke(&claims.lease_id)
    }

    pub fn show(&self, id: &str) -> Result<Lease, ProvisionError> {
        Ok(self.ledger.read(id)?.lease)
    }

    pub fn list(&self) -> Result<Vec<Lease>, ProvisionError> {
        Ok(self
            .ledger
            .list()?
            .into_iter()
            .map(|record| record.lease)
            .collect())
    }

    fn check_ttl(&self, ttl: Duration) -> Result<u64, ProvisionError> {
        let shown = humantime::format_duration(ttl).to_string();
        if ttl.is_zero() {
            return Err(ProvisionError::invalid(
                "TTL",
                shown,
                "use a positive duration such as \"8h\"",
            ));
        }
        if ttl > self.config.max_ttl {
            return Err(ProvisionError::invalid(
                "TTL",
                shown,
                format!(
                    "it exceeds samba.max_ttl ({}); ask for less or raise the limit",
                    humantime::format_duration(self.config.max_ttl)
                ),
            ));
        }
        // Samba stores the expiry in whole seconds; round up so no lease is shorter.
        Ok(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
    }

    pub(crate) fn seal_token(
        &self,
        lease: &Lease,
        password: &Password,
    ) -> Result<SealedToken, ProvisionError> {
        let claims = TokenClaims {
            lease_id: lease.id.clone(),
            server: self.config.server.clone(),
            port: self.config.port,
            share: lease.share.clone(),
            account: lease.account.clone(),
            password: password.clone(),
            expires_at: lease.expires_at,
            read_only: lease.read_only,
            encrypt: self.config.encrypt.clone(),
        };
        Ok(SealedToken::new(token::seal(&self.key, &claims)?))
    }

    pub(crate) fn share_definition(&self, lease: &Lease) -> ShareDefinition {
        ShareDefinition {
            name: lease.share.clone(),
            path: lease.path.clone(),
            account: lease.account.clone(),
            lease_id: lease.id.clone(),
            read_only: lease.read_only,
            force_user: self.config.force_user.clone(),
            force_group: self.config.force_group.clone(),
            encrypt: self.config.encrypt.clone(),
            client_ip: lease.client_ip,
            user_xattrs: supports_user_xattrs(&lease.path),
        }
    }

    /// Creates the account chain (Unix account, passdb entry, expiry) and the share.
    /// The share does not depend on the account, so a second thread imports it while
    /// the account chain runs. The lease record already covers any subset of objects.
    fn create_objects(
        &self,
        lease: &Lease,
        password: &Password,
        share: &ShareDefinition,
    ) -> Result<(), ProvisionError> {
        std::thread::scope(|scope| {
            let share_import = scope.spawn(|| {
                self.samba.import_share(share)?;
                failpoint::hit("grant:share");
                Ok::<(), ProvisionError>(())
            });

            let account = (|| {
                unix_account::create(&lease.account, &lease.id)?;
                failpoint::hit("grant:unix-account");

                self.samba.add_user(&lease.account, password)?;
                failpoint::hit("grant:passdb");

                self.samba.set_expiry(&lease.account, lease.expires_at)?;
                failpoint::hit("grant:expiry");
                Ok(())
            })();

            let share_result = share_import
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            account.and(share_result)
        })
    }

    /// Removes whatever exists of a lease's objects.
    ///
    /// The share goes first and its sessions are cut at once. The passdb entry is
    /// removed meanwhile, and the Unix account last, because `userdel` refuses an
    /// account while a session process still runs as its uid.
    pub(crate) fn remove_objects(&self, lease: &Lease) -> Result<(), ProvisionError> {
        std::thread::scope(|scope| {
            let share_removal = scope.spawn(|| {
                self.samba.remove_share(&lease.share)?;
                failpoint::hit("revoke:share");
                self.close_share(&lease.share)
            });

            let passdb = self.samba.remove_user(&lease.account);
            failpoint::hit("revoke:passdb");

            let share_result = share_removal
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            passdb.and(share_result)
        })?;

        unix_account::remove(&lease.account)?;
        failpoint::hit("revoke:unix-account");
        Ok(())
    }

    /// Disconnects a share's sessions. When smbd is not running there is nothing to cut.
    pub(crate) fn close_share(&self, share: &str) -> Result<(), ProvisionError> {
        match self.samba.close_share(share) {
            Err(ProvisionError::Tool { stderr, .. }) if stderr.contains("Can't find pid") => {
                tracing::warn!(share, "smbd is not running; no session to disconnect");
                Ok(())
            }
            other => other,
        }
    }
}

/// Checks a configured Unix user or group name before it enters a share definition.
/// Rejects a `force_user` or `force_group` that does not exist, because smbd would
/// then reject every tree connect with NT_STATUS_NO_SUCH_USER.
fn check_force_identity(config: &SambaConfig) -> Result<(), ProvisionError> {
    let checks: [(&'static str, &Option<String>, fn(&str) -> std::io::Result<bool>, &str); 2] = [
        ("samba.force_user", &config.force_user, crate::unix_account::user_exists, "user (useradd, or pick one in /etc/passwd)"),
        ("samba.force_group", &config.force_group, crate::unix_account::group_exists, "group (groupadd, or pick one in /etc/group)"),
    ];
    for (key, name, exists, kind) in checks {
        let Some(name) = name else { continue };
        match exists(name) {
            Ok(true) => {}
            Ok(false) => {
                return Err(ProvisionError::invalid(key, name.as_str(), format!("no such Unix {kind}")));
            }
            Err(err) => {
                return Err(ProvisionError::invalid(key, name.as_str(), format!("cannot look it up: {err}")));
            }
        }
    }
    Ok(())
}

/// Fails when an entry of `samba.allowed_roots` is not an existing directory, for
/// example because the `datanet` mount that holds it is not up yet.
pub fn check_allowed_roots(roots: &[PathBuf]) -> Result<(), ProvisionError> {
    for root in roots {
        match std::fs::metadata(root) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(ProvisionError::invalid(
                    "samba.allowed_roots entry",
                    root.display().to_string(),
                    "it is not a directory; list directories only",
                ));
            }
            Err(err) => {
                return Err(ProvisionError::invalid(
                    "samba.allowed_roots entry",
                    root.display().to_string(),
                    format!("{err}; create it, mount the datanet filesystem that holds it, or remove it from the list"),
                ));
            }
        }
    }
    Ok(())
}

fn check_unix_name(key: &'static str, name: &str) -> Result<(), ProvisionError> {
    check_config_text(key, name)?;
    let valid = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        && !name.starts_with('-');
    if !valid {
        return Err(ProvisionError::invalid(
            key,
            name,
            "use a Unix user or group name: letters, digits, '_', '-' and '.'",
        ));
    }
    Ok(())
}
