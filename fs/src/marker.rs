//! Zero-byte `dir/` directory markers in S3 spaces.
//!
//! `object_store` paths cannot end with `/`, so the key `dir/` of a marker object cannot
//! be written or deleted through it. This module sends those two requests itself, signed
//! with AWS Signature Version 4, using the same endpoint, bucket, prefix and credentials
//! as the space's `object_store` client. Reading markers needs nothing special: a listing
//! returns `dir/` as an object whose location equals the directory's own path.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::config::{S3Credentials, SpaceConfig};
use crate::error::{FsError, FsResult};
use crate::sigv4::{query_encode, BucketAddress, SigningKey, EMPTY_SHA256};

const MAX_ATTEMPTS: u32 = 6;

/// Header prefix of S3 user metadata.
const USER_META_PREFIX: &str = "x-amz-meta-";

/// Sends marker requests for one S3 space.
#[derive(Debug)]
pub struct MarkerClient {
    space: String,
    http: reqwest::Client,
    address: BucketAddress,
    region: String,
    credentials: Option<S3Credentials>,
}

impl MarkerClient {
    /// Returns a client for S3 spaces and `None` for other kinds of space.
    pub fn for_space(config: &SpaceConfig) -> FsResult<Option<Self>> {
        let address = BucketAddress::for_space(config)
            .map_err(|reason| FsError::io(format!("space {}: {reason}", config.name)))?;
        let Some(address) = address else {
            return Ok(None);
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|err| FsError::io(format!("cannot build HTTP client for space {}: {err}", config.name)))?;

        Ok(Some(MarkerClient {
            space: config.name.clone(),
            http,
            address,
            region: config.region.clone(),
            credentials: config.credentials.clone(),
        }))
    }

    /// Writes the zero-byte marker `dir_key/`.
    pub async fn put_marker(&self, dir_key: &str) -> FsResult<()> {
        self.send(reqwest::Method::PUT, dir_key, &BTreeMap::new()).await.map(|_| ())
    }

    /// Writes the marker `dir_key/` carrying user metadata (`x-amz-meta-KEY: VALUE` for
    /// each entry), replacing an existing marker. This is where a directory's mode,
    /// owner and mtime live, as s3fs keeps them.
    pub async fn put_marker_with_meta(&self, dir_key: &str, meta: &BTreeMap<String, String>) -> FsResult<()> {
        self.send(reqwest::Method::PUT, dir_key, meta).await.map(|_| ())
    }

    /// Returns the user metadata of the marker `dir_key/`, or `None` when there is no
    /// marker.
    pub async fn head_marker(&self, dir_key: &str) -> FsResult<Option<BTreeMap<String, String>>> {
        let Some(headers) = self.send(reqwest::Method::HEAD, dir_key, &BTreeMap::new()).await? else {
            return Ok(None);
        };
        let meta = headers
            .iter()
            .filter_map(|(name, value)| {
                let key = name.as_str().strip_prefix(USER_META_PREFIX)?;
                Some((key.to_string(), value.to_str().ok()?.to_string()))
            })
            .collect();
        Ok(Some(meta))
    }

    /// Deletes the marker `dir_key/`; a missing marker is not an error.
    pub async fn delete_marker(&self, dir_key: &str) -> FsResult<()> {
        self.send(reqwest::Method::DELETE, dir_key, &BTreeMap::new()).await.map(|_| ())
    }

    fn object_key(&self, dir_key: &str) -> String {
        self.address.full_key(&format!("{dir_key}/"))
    }

    /// Sends one request and returns the response headers, or `None` for a 404 answer
    /// to DELETE or HEAD.
    async fn send(
        &self,
        method: reqwest::Method,
        dir_key: &str,
        meta: &BTreeMap<String, String>,
    ) -> FsResult<Option<reqwest::header::HeaderMap>> {
        let key = self.object_key(dir_key);
        let path = self.address.uri_path(Some(&key));
        let what = format!("{}/{key}", self.space);

        let mut attempt = 0;
        loop {
            attempt += 1;
            let signing_key = self.signing_key()?;
            let now = SystemTime::now();
            let meta_headers: Vec<(String, String)> =
                meta.iter().map(|(key, value)| (format!("{USER_META_PREFIX}{key}"), value.clone())).collect();
            let headers =
                signing_key.sign(&method, &self.address.host, &path, "", &meta_headers, EMPTY_SHA256, &self.region, now);
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}", self.address.origin))
                .header("content-length", "0")
                .body(Vec::new());
            for (name, value) in headers {
                request = request.header(name, value);
            }

            let retry_reason = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    if status.is_success() {
                        return Ok(Some(response.headers().clone()));
                    }
                    let missing_is_fine = method == reqwest::Method::DELETE || method == reqwest::Method::HEAD;
                    if missing_is_fine && status.as_u16() == 404 {
                        return Ok(None);
                    }
                    let body = response.text().await.unwrap_or_default();
                    if status.as_u16() == 403 || status.as_u16() == 401 {
                        tracing::error!(object = %what, status = status.as_u16(), "the store rejected the credentials for a directory marker");
                        return Err(FsError::new(libc::EACCES, format!("{what}: access denied ({status})")));
                    }
                    if !(status.is_server_error() || status.as_u16() == 429) {
                        return Err(FsError::io(format!("{what}: {method} failed with {status}: {}", first_line(&body))));
                    }
                    format!("status {status}")
                }
                Err(err) => format!("request error: {err}"),
            };

            if attempt >= MAX_ATTEMPTS {
                return Err(FsError::io(format!("{what}: {method} failed after {attempt} attempts: {retry_reason}")));
            }
            let backoff = Duration::from_millis(100 << attempt.min(6));
            tracing::warn!(object = %what, attempt, reason = %retry_reason, "retrying directory marker request");
            tokio::time::sleep(backoff).await;
        }
    }

    /// Lists one directory with raw keys: every page of a delimiter listing of
    /// `dir_key/` (the space root when empty), with keys relative to the space prefix.
    /// `object_store` rejects a whole page when one key has an empty segment, so this
    /// is the fallback that lets such directories be listed at all.
    pub async fn list_dir_raw(&self, dir_key: &str) -> FsResult<RawListing> {
        let full_prefix = self.full_prefix(dir_key);
        let space_prefix_len = if self.address.prefix.is_empty() { 0 } else { self.address.prefix.len() + 1 };

        let mut listing = RawListing::default();
        let mut token: Option<String> = None;
        loop {
            let page = self.list_page(dir_key, &full_prefix, true, None, token.as_deref()).await?;
            for common in page.common_prefixes {
                if let Some(relative) = common.prefix.get(space_prefix_len..) {
                    listing.prefixes.push(relative.to_string());
                }
            }
            for object in page.contents {
                if let Some(relative) = object.key.get(space_prefix_len..) {
                    listing.objects.push(RawObject {
                        key: relative.to_string(),
                        size: object.size,
                        e_tag: object.e_tag,
                        last_modified: object.last_modified.into(),
                    });
                }
            }
            match page.next_continuation_token {
                Some(next) if page.is_truncated => token = Some(next),
                _ => return Ok(listing),
            }
        }
    }

    /// True when some key other than the marker `dir_key/` starts with `dir_key/`. One
    /// request for at most two keys, however large the directory is.
    pub async fn has_entries(&self, dir_key: &str) -> FsResult<bool> {
        let full_prefix = self.full_prefix(dir_key);
        let page = self.list_page(dir_key, &full_prefix, false, Some(2), None).await?;
        Ok(page.contents.iter().any(|object| object.key != full_prefix))
    }

    /// `prefix/dir_key/` as a key prefix in the bucket (`prefix/` for the space root).
    fn full_prefix(&self, dir_key: &str) -> String {
        let mut full_prefix = self.address.prefix.clone();
        if !full_prefix.is_empty() {
            full_prefix.push('/');
        }
        if !dir_key.is_empty() {
            full_prefix.push_str(dir_key);
            full_prefix.push('/');
        }
        full_prefix
    }

    /// Sends one ListObjectsV2 request, retrying throttling and server errors.
    async fn list_page(
        &self,
        dir_key: &str,
        full_prefix: &str,
        delimiter: bool,
        max_keys: Option<u32>,
        token: Option<&str>,
    ) -> FsResult<ListPage> {
        let path = self.address.uri_path(None);
        let what = format!("{}/{dir_key}", self.space);
        let mut params = vec![("list-type", "2".to_string()), ("prefix", full_prefix.to_string())];
        if delimiter {
            params.push(("delimiter", "/".to_string()));
        }
        if let Some(max_keys) = max_keys {
            params.push(("max-keys", max_keys.to_string()));
        }
        if let Some(token) = token {
            params.push(("continuation-token", token.to_string()));
        }
        params.sort();
        let query: Vec<String> = params
            .iter()
            .map(|(name, value)| format!("{name}={}", query_encode(value)))
            .collect();
        let query = query.join("&");

        let mut attempt = 0;
        loop {
            attempt += 1;
            let signing_key = self.signing_key()?;
            let headers = signing_key.sign(
                &reqwest::Method::GET,
                &self.address.host,
                &path,
                &query,
                &[],
                EMPTY_SHA256,
                &self.region,
                SystemTime::now(),
            );
            let mut request = self.http.get(format!("{}{path}?{query}", self.address.origin));
            for (name, value) in headers {
                request = request.header(name, value);
            }

            let retry_reason = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let body = response
                        .text()
                        .await
                        .map_err(|err| FsError::io(format!("{what}: listing failed: {err}")))?;
                    if status.is_success() {
                        return quick_xml::de::from_str(&body)
                            .map_err(|err| FsError::io(format!("{what}: invalid listing response: {err}")));
                    }
                    if status.as_u16() == 403 || status.as_u16() == 401 {
                        tracing::error!(object = %what, status = status.as_u16(), "the store rejected the credentials for a listing");
                        return Err(FsError::new(libc::EACCES, format!("{what}: listing denied ({status})")));
                    }
                    if !(status.is_server_error() || status.as_u16() == 429) {
                        return Err(FsError::io(format!("{what}: listing failed with {status}: {}", first_line(&body))));
                    }
                    format!("status {status}")
                }
                Err(err) => format!("request error: {err}"),
            };
            if attempt >= MAX_ATTEMPTS {
                return Err(FsError::io(format!("{what}: listing failed after {attempt} attempts: {retry_reason}")));
            }
            tracing::warn!(object = %what, attempt, reason = %retry_reason, "retrying a listing");
            tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
        }
    }

    fn signing_key(&self) -> FsResult<SigningKey> {
        SigningKey::read(&self.space, self.credentials.as_ref()).map_err(|reason| FsError::new(libc::EACCES, reason))
    }
}

/// One directory listed with raw keys (relative to the space prefix).
#[derive(Debug, Default)]
pub struct RawListing {
    /// Common prefixes, each ending with `/`.
    pub prefixes: Vec<String>,
    pub objects: Vec<RawObject>,
}

#[derive(Debug)]
pub struct RawObject {
    pub key: String,
    pub size: u64,
    pub e_tag: Option<String>,
    pub last_modified: SystemTime,
}

/// A page of a ListObjectsV2 response.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListPage {
    #[serde(default)]
    contents: Vec<ListContents>,
    #[serde(default)]
    common_prefixes: Vec<ListPrefix>,
    #[serde(default)]
    is_truncated: bool,
    next_continuation_token: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListContents {
    key: String,
    size: u64,
    last_modified: chrono::DateTime<chrono::Utc>,
    #[serde(rename = "ETag")]
    e_tag: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListPrefix {
    prefix: String,
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_page_parses() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>w/</Prefix>
<KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter><IsTruncated>true</IsTruncated>
<Contents><Key>w/a &amp; b.txt</Key><LastModified>2026-12-04T22:40:49.000Z</LastModified><ETag>"e1"</ETag><Size>3</Size></Contents>
<CommonPrefixes><Prefix>w//</Prefix></CommonPrefixes><NextContinuationToken>tok</NextContinuationToken></ListBucketResult>"#;
        let page: ListPage = quick_xml::de::from_str(xml).unwrap();
        assert_eq!(page.contents[0].key, "w/a & b.txt");
        assert_eq!(page.contents[0].size, 3);
        assert_eq!(page.common_prefixes[0].prefix, "w//");
        assert!(page.is_truncated);
        assert_eq!(page.next_continuation_token.as_deref(), Some("tok"));
    }
}
