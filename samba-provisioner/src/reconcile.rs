//! Garbage collection and reconcile: bring Samba, the Unix accounts and the ledger
//! back into agreement.
//!
//! Runs under the exclusive ledger lock, so no grant or revoke is half-way. Samba's
//! objects are listed before the ledger, because every object that exists at that
//! moment had its lease record written first. So an object that no record owns is an
//! orphan of a crash (or of a deleted record), and gc removes it. Only objects whose
//! name has the lease shape with this provisioner's prefix and that carry the lease
//! marker are touched.

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde::Serialize;

use crate::lease::{is_lease_account_name, Lease, LeaseState};
use crate::ledger::LeaseRecord;
use crate::provisioner::Provisioner;
use crate::share::SHARE_COMMENT;
use crate::token;
use crate::unix_account::{self, ACCOUNT_COMMENT};
use crate::ProvisionError;

/// The changes of one gc run, by lease id or object name.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// Active leases past their expiry, revoked.
    pub expired: Vec<String>,
    /// Grants cut short by a crash, undone.
    pub rolled_back: Vec<String>,
    /// Revokes cut short by a crash, finished.
    pub revokes_finished: Vec<String>,
    /// Active leases with a missing account, passdb entry or share, rebuilt.
    pub repaired: Vec<String>,
    /// Active leases that could not be rebuilt, revoked.
    pub dropped: Vec<String>,
    pub orphan_shares: Vec<String>,
    pub orphan_passdb_entries: Vec<String>,
    pub orphan_accounts: Vec<String>,
    /// Temporary files of killed processes, removed.
    pub stale_temp_files: usize,
    /// Leases or objects whose handling failed; the next gc tries again.
    pub failures: Vec<String>,
}

/// The lease objects that exist, by account name.
struct Inventory {
    accounts: BTreeSet<String>,
    passdb_entries: BTreeSet<String>,
    shares: BTreeSet<String>,
}

impl Provisioner {
    /// Revokes expired leases, finishes or undoes operations cut short, repairs active
    /// leases and removes orphans.
    pub fn gc(&self) -> Result<GcReport, ProvisionError> {
        let _lock = self.ledger.lock_exclusive()?;
        let mut report = GcReport::default();

        let inventory = self.inventory()?;
        let records = self.ledger.list()?;
        let now = SystemTime::now();

        let mut owned = BTreeSet::new();
        for record in records {
            owned.insert(record.lease.account.clone());
            owned.insert(record.lease.share.clone());
            let id = record.lease.id.clone();
            if let Err(err) = self.settle(record, &inventory, now, &mut report) {
                tracing::error!(lease = %id, error = %err, "gc could not settle lease");
                report.failures.push(format!("lease {id}: {err}"));
            }
        }

        self.remove_orphans(&inventory, &owned, &mut report);
        report.stale_temp_files = self.ledger.remove_stale_temp_files(&self.temp_dir);
        tracing::info!(
            expired = report.expired.len(),
            rolled_back = report.rolled_back.len(),
            revokes_finished = report.revokes_finished.len(),
            repaired = report.repaired.len(),
            dropped = report.dropped.len(),
            orphans = report.orphan_shares.len()
                + report.orphan_passdb_entries.len()
                + report.orphan_accounts.len(),
            failures = report.failures.len(),
            "gc finished"
        );
        Ok(report)
    }

    fn inventory(&self) -> Result<Inventory, ProvisionError> {
        let prefix = &self.config.account_prefix;
        let accounts = unix_account::list(prefix)?
            .into_iter()
            .filter(|account| {
                is_lease_account_name(&account.name, prefix) && account.is_lease_account()
            })
            .map(|account| account.name)
            .collect();
        let passdb_entries = self
            .samba
            .list_users()?
            .into_iter()
            .filter(|entry| is_lease_account_name(&entry.name, prefix))
            .map(|entry| (entry.name, entry.full_name))
            .filter(|(_, full_name)| full_name.starts_with(ACCOUNT_COMMENT))
            .map(|(name, _)| name)
            .collect();
        let shares = self
            .samba
            .list_shares()?
            .into_iter()
            .filter(|name| is_lease_account_name(name, prefix))
            .collect();
        Ok(Inventory {
            accounts,
            passdb_entries,
            shares,
        })
    }

    /// Brings one lease to a final state: active and complete, or gone.
    fn settle(
        &self,
        mut record: LeaseRecord,
        inventory: &Inventory,
        now: SystemTime,
        report: &mut GcReport,
    ) -> Result<(), ProvisionError> {
        let id = record.lease.id.clone();
        match record.lease.state {
            LeaseState::Provisioning => {
                self.discard(&record.lease)?;
                tracing::warn!(lease = %id, "undid a grant that was cut short");
                report.rolled_back.push(id);
            }
            LeaseState::Revoking => {
                self.discard(&record.lease)?;
                tracing::warn!(lease = %id, "finished a revoke that was cut short");
                report.revokes_finished.push(id);
            }
            LeaseState::Active if record.lease.is_expired(now) => {
                record.lease.state = LeaseState::Revoking;
                self.ledger.write(&record)?;
                self.discard(&record.lease)?;
                tracing::info!(lease = %id, account = %record.lease.account, "revoked expired lease");
                report.expired.push(id);
            }
            LeaseState::Active => {
                let account = &record.lease.account;
                let complete = inventory.accounts.contains(account)
                    && inventory.passdb_entries.contains(account)
                    && inventory.shares.contains(&record.lease.share);
                if complete {
                    return Ok(());
                }
                if self.repair(&record, inventory)? {
                    tracing::warn!(lease = %id, "rebuilt missing parts of an active lease");
                    report.repaired.push(id);
                } else {
                    record.lease.state = LeaseState::Revoking;
                    self.ledger.write(&record)?;
                    self.discard(&record.lease)?;
                    tracing::warn!(lease = %id, "dropped an active lease that could not be rebuilt");
                    report.dropped.push(id);
                }
            }
        }
        Ok(())
    }

    /// Rebuilds the missing objects of an active lease with the password from its
    /// sealed token. Returns `false` when the token no longer opens (the key changed).
    fn repair(&self, record: &LeaseRecord, inventory: &Inventory) -> Result<bool, ProvisionError> {
        let lease = &record.lease;
        let claims = match token::open(&self.key, record.token.expose()) {
            Ok(claims) => claims,
            Err(err) => {
                tracing::warn!(lease = %lease.id, error = %err, "cannot open the lease's stored token");
                return Ok(false);
            }
        };

        let account_missing = !inventory.accounts.contains(&lease.account);
        if account_missing {
            unix_account::create(&lease.account, &lease.id)?;
        }
        if account_missing || !inventory.passdb_entries.contains(&lease.account) {
            self.samba.remove_user(&lease.account)?;
            self.samba.add_user(&lease.account, &claims.password)?;
            self.samba.set_expiry(&lease.account, lease.expires_at)?;
        }
        if !inventory.shares.contains(&lease.share) {
            self.samba.import_share(&self.share_definition(lease))?;
        }
        Ok(true)
    }

    fn discard(&self, lease: &Lease) -> Result<(), ProvisionError> {
        self.remove_objects(lease)?;
        self.ledger.remove(&lease.id)
    }

    fn remove_orphans(
        &self,
        inventory: &Inventory,
        owned: &BTreeSet<String>,
        report: &mut GcReport,
    ) {
        for share in inventory.shares.difference(owned) {
            let result = self.samba.share_comment(share).and_then(|comment| {
                if !comment.is_some_and(|c| c.starts_with(SHARE_COMMENT)) {
                    tracing::warn!(
                        share,
                        "leaving a share with the lease name shape but no lease comment"
                    );
                    return Ok(false);
                }
                self.samba.remove_share(share)?;
                self.close_share(share)?;
                Ok(true)
            });
            record_orphan(
                result,
                "share",
                share,
                &mut report.orphan_shares,
                &mut report.failures,
            );
        }
        for name in inventory.passdb_entries.difference(owned) {
            let result = self.samba.remove_user(name).map(|()| true);
            record_orphan(
                result,
                "passdb entry",
                name,
                &mut report.orphan_passdb_entries,
                &mut report.failures,
            );
        }
        for name in inventory.accounts.difference(owned) {
            let result = unix_account::remove(name).map(|()| true);
            record_orphan(
                result,
                "Unix account",
                name,
                &mut report.orphan_accounts,
                &mut report.failures,
            );
        }
    }
}

fn record_orphan(
    result: Result<bool, ProvisionError>,
    kind: &str,
    name: &str,
    removed: &mut Vec<String>,
    failures: &mut Vec<String>,
) {
    match result {
        Ok(true) => {
            tracing::warn!(kind, name, "removed orphan");
            removed.push(name.to_string());
        }
        Ok(false) => {}
        Err(err) => {
            tracing::error!(kind, name, error = %err, "cannot remove orphan");
            failures.push(format!("{kind} {name}: {err}"));
        }
    }
}
