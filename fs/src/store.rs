//! Object access for one storage space.
//!
//! [`open_space`] turns a [`SpaceConfig`] into an `object_store` client whose paths are
//! relative to the space's prefix, so callers never see the bucket or the prefix. All
//! three tools reach the stores through this module.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use object_store::aws::{AmazonS3Builder, AwsCredential};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{CredentialProvider, ObjectStore, RetryConfig};

use crate::config::{ConfigError, S3Credentials, SpaceConfig, SpaceLocation};

/// How long credentials read from files or the environment are reused before they are
/// read again, so that rotated keys are picked up without a restart.
const CREDENTIAL_REFRESH: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Config(#[from] ConfigError),

    // The store error is part of the message and deliberately not a `#[source]`, so that
    // `{:#}` chains in the binaries do not print it twice.
    #[error("cannot open space {space:?} ({url}): {error}")]
    Open {
        space: String,
        url: String,
        error: object_store::Error,
    },
}

/// An opened storage space.
#[derive(Debug, Clone)]
pub struct Space {
    pub config: SpaceConfig,
    /// Paths are relative to the space's prefix.
    pub store: Arc<dyn ObjectStore>,
}

/// Opens the object store behind `space`. Nothing is sent over the network yet.
pub fn open_space(space: &SpaceConfig) -> Result<Space, StoreError> {
    let open_error = |error| StoreError::Open {
        space: space.name.clone(),
        url: space.url.clone(),
        error,
    };

    let store: Arc<dyn ObjectStore> = match &space.location {
        SpaceLocation::S3 { bucket, prefix } => {
            let mut builder = AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region(&space.region)
                .with_allow_http(space.allow_http)
                .with_virtual_hosted_style_request(!space.path_style)
                .with_retry(retry_config());
            if let Some(endpoint) = &space.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let Some(credentials) = &space.credentials {
                // Read once now so that a missing secret fails at start-up, not on first I/O.
                SourceCredentialProvider::read(&space.name, credentials)?;
                builder = builder.with_credentials(Arc::new(SourceCredentialProvider::new(
                    &space.name,
                    credentials.clone(),
                )));
            }
            let s3 = builder.build().map_err(open_error)?;
            with_prefix(Arc::new(s3), prefix).map_err(open_error)?
        }
        SpaceLocation::Local { root } => {
            let local = LocalFileSystem::new_with_prefix(root)
                .map_err(open_error)?
                .with_automatic_cleanup(true);
            Arc::new(local)
        }
        SpaceLocation::Memory => Arc::new(InMemory::new()),
    };

    Ok(Space {
        config: space.clone(),
        store,
    })
}

/// Wraps `store` so that paths are relative to `prefix`. The prefix is raw key text and
/// is kept byte for byte: `Path::parse` validates it without percent-encoding `#` or `%`,
/// as the `From<&str>` conversion would.
fn with_prefix(store: Arc<dyn ObjectStore>, prefix: &str) -> object_store::Result<Arc<dyn ObjectStore>> {
    if prefix.is_empty() {
        return Ok(store);
    }
    let prefix = ObjectPath::parse(prefix).map_err(object_store::Error::from)?;
    Ok(Arc::new(PrefixStore::new(store, prefix)))
}

/// Retries for throttling (503 SlowDown), 5xx answers and timeouts. Requests that still
/// fail after this surface as errors, never as "not found".
fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: 8,
        retry_timeout: Duration::from_secs(120),
        ..RetryConfig::default()
    }
}

/// Supplies S3 credentials from the configured sources and re-reads them every
/// [`CREDENTIAL_REFRESH`], so keys rotated in their file take effect on a live mount.
#[derive(Debug)]
struct SourceCredentialProvider {
    space: String,
    sources: S3Credentials,
    cached: Mutex<Option<(Instant, Arc<AwsCredential>)>>,
}

impl SourceCredentialProvider {
    fn new(space: &str, sources: S3Credentials) -> Self {
        SourceCredentialProvider {
            space: space.to_string(),
            sources,
            cached: Mutex::new(None),
        }
    }

    fn read(space: &str, sources: &S3Credentials) -> Result<AwsCredential, ConfigError> {
        let key = |field: &str| format!("spaces.{space}.{field}");
        Ok(AwsCredential {
            key_id: sources.access_key_id.read(&key("access_key_id"))?,
            secret_key: sources.secret_access_key.read(&key("secret_access_key"))?,
            token: match &sources.session_token {
                Some(source) => Some(source.read(&key("session_token"))?),
                None => None,
            },
        })
    }
}

#[async_trait]
impl CredentialProvider for SourceCredentialProvider {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((read_at, credential)) = cached.as_ref() {
            if read_at.elapsed() < CREDENTIAL_REFRESH {
                return Ok(Arc::clone(credential));
            }
        }

        match Self::read(&self.space, &self.sources) {
            Ok(credential) => {
                let credential = Arc::new(credential);
                *cached = Some((Instant::now(), Arc::clone(&credential)));
                Ok(credential)
            }
            Err(err) => {
                // Keep using the last good credential: a file being rewritten must not
                // turn into a burst of failed requests.
                tracing::warn!(space = %self.space, error = %err, "cannot re-read credentials");
                match cached.as_ref() {
                    Some((_, credential)) => Ok(Arc::clone(credential)),
                    None => Err(object_store::Error::Generic {
                        store: "S3",
                        source: Box::new(err),
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use futures::StreamExt;
    use object_store::{ObjectStoreExt, PutPayload};

    #[tokio::test]
    async fn local_space_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("[spaces.local]\nurl = \"file://{}\"\n", dir.path().display());
        let config = Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        let space = open_space(&config.spaces["local"]).unwrap();

        let path = ObjectPath::from("a b/c+d.txt");
        space.store.put(&path, PutPayload::from_static(b"hello")).await.unwrap();
        let bytes = space.store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&bytes[..], b"hello");
        assert!(dir.path().join("a b").join("c+d.txt").exists());
    }

    #[tokio::test]
    async fn s3_prefix_kept_byte_for_byte() {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let store = with_prefix(Arc::clone(&inner), "my dir/a#b%20").unwrap();
        store.put(&ObjectPath::from("f.txt"), PutPayload::from_static(b"x")).await.unwrap();

        let keys: Vec<String> = inner
            .list(None)
            .map(|meta| meta.unwrap().location.to_string())
            .collect()
            .await;
        assert_eq!(keys, vec!["my dir/a#b%20/f.txt".to_string()]);
    }

    #[test]
    fn missing_secret_fails_at_open() {
        let text = "[spaces.s]\nurl = \"s3://bucket\"\nendpoint = \"http://127.0.0.1:1\"\n\
                    access_key_id = \"GK1\"\nsecret_access_key_env = \"DATANET_TEST_UNSET_SECRET\"\n";
        let config = Config::parse(text, std::path::Path::new("t.toml")).unwrap();
        let err = open_space(&config.spaces["s"]).unwrap_err().to_string();
        assert!(err.contains("DATANET_TEST_UNSET_SECRET"), "{err}");
    }
}
