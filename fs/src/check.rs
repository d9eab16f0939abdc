//! `datanet check`: validates the configuration and probes every space.
//!
//! A space is reachable when a listing of its root succeeds, and writable when a small
//! probe object can be written and deleted again. Read-only spaces are not written to.

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};

use crate::config::{Config, SpaceConfig};
use crate::store::open_space;

/// The outcome of probing one space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceReport {
    pub name: String,
    pub url: String,
    /// `Err` contains the reason, in one line.
    pub reachable: Result<(), String>,
    /// `None` for read-only spaces, which are not probed for writing.
    pub writable: Option<Result<(), String>>,
}

impl SpaceReport {
    pub fn is_ok(&self) -> bool {
        self.reachable.is_ok() && !matches!(self.writable, Some(Err(_)))
    }
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
        report.reachable = Err(one_line(&err.to_string()));
        return report;
    }
    drop(listing);

    if config.read_only {
        return report;
    }
    let probe = ObjectPath::from(format!(".datanet-check-{}", std::process::id()));
    let written = match space.store.put(&probe, PutPayload::from_static(b"datanet check\n")).await {
        Ok(_) => space.store.delete(&probe).await.map_err(|err| format!("probe written but not deleted: {}", one_line(&err.to_string()))),
        Err(err) => Err(one_line(&err.to_string())),
    };
    report.writable = Some(written);
    report
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
