//! `datanet check`: validates the configuration and probes every space.
//!
//! A space is reachable when a listing of its root succeeds, and writable when a small
//! probe object can be written and deleted again. Read-only spaces are not written to.

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};

use crate::config::{Config, S3Credentials, SecretSource, SpaceConfig, SpaceLocation};
use crate::store::open_space;

/// Error texts of S3 answers that reject the credentials: 403 Forbidden or AccessDenied, a wrong
/// secret (`SignatureDoesNotMatch`, Garage's "invalid signature") or an unknown key id.
const CREDENTIAL_ERRORS: &[&str] =
    &["forbidden", "accessdenied", "access denied", "signaturedoesnotmatch", "invalid signature", "invalidaccesskeyid"];

/// The outcome of probing one space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceReport {
    pub name: String,
    pub url: String,
    pub read_only: bool,
    /// `Err` contains the reason, in one line.
    pub reachable: Result<(), String>,
    /// `None` for read-only spaces, which are not probed for writing.
    pub writable: Option<Result<(), String>>,
}

impl SpaceReport {
    pub fn is_ok(&self) -> bool {
        self.reachable.is_ok() && !matches!(self.writable, Some(Err(_)))
    }

    /// Describes the outcome in one line, such as `reachable, writable`.
    pub fn summary(&self) -> String {
        match (&self.reachable, &self.writable) {
            (Err(reason), _) if self.read_only => format!("UNREACHABLE ({reason}); read-only space"),
            (Err(reason), _) => format!("UNREACHABLE ({reason}); writing not tested"),
            (Ok(()), Some(Ok(()))) => "reachable, writable".to_string(),
            (Ok(()), Some(Err(reason))) => format!("reachable, NOT WRITABLE ({reason})"),
            (Ok(()), None) => "reachable, read-only space (not written to)".to_string(),
        }
    }
}

/// Fails when `config` has no space, because a mount of it would be empty.
pub fn require_spaces(config: &Config) -> Result<(), String> {
    if config.spaces.is_empty() {
        return Err(format!(
            "{} configures no space: add a [spaces.NAME] section with a url, for example [spaces.models] url = \"s3://BUCKET\"",
            config.source.display()
        ));
    }
    Ok(())
}

/// Warnings about valid settings that are probably not meant: an S3 space without
/// credentials uses the instance metadata endpoint of a cloud VM.
pub fn config_warnings(config: &Config) -> Vec<String> {
    config
        .spaces
        .values()
        .filter(|space| matches!(space.location, SpaceLocation::S3 { .. }) && space.credentials.is_none())
        .map(|space| {
            format!(
                "space {0:?} has no credentials, so requests are signed with credentials from the instance \
                 metadata endpoint (169.254.169.254), which exists only on cloud VMs; set spaces.{0}.access_key_id \
                 and spaces.{0}.secret_access_key_file",
                space.name
            )
        })
        .collect()
}

/// Probes every space of `config`, one after the other.
pub async fn check_spaces(config: &Config) -> Vec<SpaceReport> {
    let mut reports = Vec::new();
    for space in config.spaces.values() {
        reports.push(check_space(space).await);
    }
    reports
}

async fn check_space(config: &SpaceConfig) -> SpaceReport {
    let mut report = SpaceReport {
        name: config.name.clone(),
        url: config.url.clone(),
        read_only: config.read_only,
        reachable: Ok(()),
        writable: None,
    };
    let space = match open_space(config) {
        Ok(space) => space,
        Err(err) => {
            report.reachable = Err(one_line(&err.to_string()));
            return report;
        }
    };

    let mut listing = space.store.list(None);
    if let Some(Err(err)) = listing.next().await {
        report.reachable = Err(store_reason(config, &err.to_string()));
        return report;
    }
    drop(listing);

    if config.read_only {
        return report;
    }
    let probe = ObjectPath::from(format!(".datanet-check-{}", std::process::id()));
    let written = match space.store.put(&probe, PutPayload::from_static(b"datanet check\n")).await {
        Ok(_) => space
            .store
            .delete(&probe)
            .await
            .map_err(|err| format!("probe written but not deleted: {}", store_reason(config, &err.to_string()))),
        Err(err) => Err(store_reason(config, &err.to_string())),
    };
    report.writable = Some(written);
    report
}

/// Puts a store error on one line, with a hint naming the space's credential keys when
/// the server rejected the credentials.
fn store_reason(config: &SpaceConfig, error: &str) -> String {
    let reason = one_line(error);
    let lower = reason.to_lowercase();
    if !CREDENTIAL_ERRORS.iter().any(|pattern| lower.contains(pattern)) {
        return reason;
    }
    let keys = match &config.credentials {
        Some(credentials) => credential_keys(&config.name, credentials),
        None => format!("none are set: add spaces.{0}.access_key_id and spaces.{0}.secret_access_key_file", config.name),
    };
    format!("{reason}; the server rejected the credentials of space {:?}: check {keys}", config.name)
}

/// Names the configuration keys that hold the credentials, with the variable or file.
fn credential_keys(space: &str, credentials: &S3Credentials) -> String {
    let access_key_id = match &credentials.access_key_id {
        // An inline value is stored as `=VALUE`; the key id is not secret, but say only where it is.
        SecretSource::Env(variable) if variable.starts_with('=') => format!("spaces.{space}.access_key_id"),
        SecretSource::Env(variable) => format!("spaces.{space}.access_key_id_env ({variable})"),
        SecretSource::File(path) => format!("spaces.{space}.access_key_id_file ({})", path.display()),
    };
    let secret = match &credentials.secret_access_key {
        SecretSource::Env(variable) => format!("spaces.{space}.secret_access_key_env ({variable})"),
        SecretSource::File(path) => format!("spaces.{space}.secret_access_key_file ({})", path.display()),
    };
    format!("{access_key_id} and {secret}")
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_space_reachable_and_writable() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[spaces.rw]\nurl = \"file://{0}\"\n[spaces.ro]\nurl = \"file://{0}\"\nread_only = true\n\
             [spaces.gone]\nurl = \"file://{0}/missing\"\n",
            dir.path().display()
        );
        let config = Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        let reports = check_spaces(&config).await;
        let by_name = |name: &str| reports.iter().find(|r| r.name == name).unwrap().clone();
        assert_eq!(by_name("rw").writable, Some(Ok(())));
        assert!(by_name("rw").is_ok());
        assert_eq!(by_name("ro").writable, None);
        assert!(!by_name("gone").is_ok(), "{:?}", by_name("gone"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "probe removed");
    }
}
