//! samba-provisioner: temporary Samba users confined to one directory, handed out as
//! expiring, encrypted tokens.
//!
//! A lease is a random Unix account with a Samba passdb entry that expires in Samba
//! itself, plus a registry share that exposes exactly one directory to that account.
//! The [`ledger`] records each lease before anything is created, so [`reconcile`]
//! can finish or undo any operation that a crash cut short. Tokens ([`token`]) carry
//! everything a node needs to mount the share, sealed with XChaCha20-Poly1305.

pub mod api;
pub mod confine;
pub mod error;
pub mod failpoint;
pub mod instructions;
pub mod lease;
pub mod ledger;
pub mod provisioner;
pub mod reconcile;
pub mod samba;
pub mod secret;
pub mod share;
pub mod token;
pub mod tool;
pub mod unix_account;

pub use error::ProvisionError;
pub use lease::{Lease, LeaseState};
pub use provisioner::{Grant, GrantRequest, Provisioner};
pub use reconcile::GcReport;
pub use token::{TokenClaims, TokenError, TokenKey};
