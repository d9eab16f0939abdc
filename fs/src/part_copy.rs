//! Server-side copy of large S3 objects with `UploadPartCopy`.
//!
//! S3 `CopyObject` accepts at most 5 GiB, and `object_store` 0.14 offers no
//! `UploadPartCopy`. So this module sends the requests of a multipart copy itself:
//! create, copy the parts in parallel, then complete, or abort on any failure. They are
//! signed with AWS Signature Version 4 like the space's own client, and the data never
//! leaves the server.
//! Every part is pinned to the source's ETag (`x-amz-copy-source-if-match`), so a
//! concurrent overwrite fails the copy instead of mixing two versions.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::{self, StreamExt, TryStreamExt};
use ring::{digest, hmac};

use crate::config::{SpaceConfig, SpaceLocation};

/// S3 allows at most this many parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;

/// Smallest part S3 accepts, except for the last one.
const MIN_PART_BYTES: u64 = 5 << 20;

/// Largest part `UploadPartCopy` accepts.
const MAX_PART_BYTES: u64 = 5 << 30;

const ATTEMPTS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum PartCopyError {
    #[error("space {0} is not an S3 space")]
    NotS3(String),

    #[error("invalid endpoint {endpoint:?} of space {space}: {reason}")]
    Endpoint { space: String, endpoint: String, reason: String },

    #[error("credentials of space {space}: {reason}")]
    Credentials { space: String, reason: String },

    #[error("{operation} of {key} failed: {reason}")]
    Request { operation: &'static str, key: String, reason: String },
}

/// One large object to copy.
pub struct CopyRequest<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub size_bytes: u64,
    pub e_tag: Option<&'a str>,
    /// User metadata (without the `x-amz-meta-` prefix) for the destination.
    pub user_meta: BTreeMap<String, String>,
    pub content_type: Option<String>,
}

/// Signs and sends the requests of a multipart copy for one S3 space.
pub struct PartCopyClient {
    space: SpaceConfig,
    http: reqwest::Client,
    origin: String,
    host: String,
    bucket: String,
    prefix: String,
}

struct Signer {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

impl PartCopyClient {
    pub fn for_space(space: &SpaceConfig) -> Result<PartCopyClient, PartCopyError> {
        let SpaceLocation::S3 { bucket, prefix } = &space.location else {
            return Err(PartCopyError::NotS3(space.name.clone()));
        };
        let endpoint = space
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", space.region));
        let endpoint_error = |reason: String| PartCopyError::Endpoint {
            space: space.name.clone(),
            endpoint: endpoint.clone(),
            reason,
        };
        let url = url::Url::parse(&endpoint).map_err(|err| endpoint_error(err.to_string()))?;
        let host_name = url.host_str().ok_or_else(|| endpoint_error("no host".into()))?;
        let host_name = if space.path_style { host_name.to_string() } else { format!("{bucket}.{host_name}") };
        let host = match url.port() {
            Some(port) => format!("{host_name}:{port}"),
            None => host_name,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|err| endpoint_error(err.to_string()))?;
        Ok(PartCopyClient {
            space: space.clone(),
            http,
            origin: format!("{}://{host}", url.scheme()),
            host,
            bucket: bucket.clone(),
            prefix: prefix.clone(),
        })
    }

    /// Copies `request.from` to `request.to` in parts of at least `part_size_bytes`, at
    /// most `max_concurrency` at a time. On failure the upload is aborted.
    pub async fn copy(&self, request: &CopyRequest<'_>, part_size_bytes: u64, max_concurrency: usize) -> Result<(), PartCopyError> {
        // S3 parts are 5 MiB to 5 GiB, at most 10,000 of them.
        let part_size = part_size_bytes.max(request.size_bytes.div_ceil(MAX_PARTS)).clamp(MIN_PART_BYTES, MAX_PART_BYTES);
        let upload_id = self.create(request).await?;

        match self.copy_parts(request, &upload_id, part_size, max_concurrency).await {
            Ok(parts) => match self.complete(request.to, &upload_id, &parts).await {
                Ok(()) => Ok(()),
                Err(err) => {
                    self.abort(request.to, &upload_id).await;
                    Err(err)
                }
            },
            Err(err) => {
                self.abort(request.to, &upload_id).await;
                Err(err)
            }
        }
    }

    async fn create(&self, request: &CopyRequest<'_>) -> Result<String, PartCopyError> {
        let mut headers: Vec<(String, String)> = request
            .user_meta
            .iter()
            .map(|(key, value)| (format!("x-amz-meta-{}", key.to_ascii_lowercase()), value.clone()))
            .collect();
        if let Some(content_type) = &request.content_type {
            headers.push(("content-type".into(), content_type.clone()));
        }
        let body = self
            .send("CreateMultipartUpload", reqwest::Method::POST, request.to, &[("uploads", "")], headers, Vec::new())
            .await?;
        xml_value(&body, "UploadId").ok_or_else(|| PartCopyError::Request {
            operation: "CreateMultipartUpload",
            key: request.to.to_string(),
            reason: "no UploadId in the response".into(),
        })
    }

    async fn copy_parts(
        &self,
        request: &CopyRequest<'_>,
        upload_id: &str,
        part_size: u64,
        max_concurrency: usize,
    ) -> Result<Vec<(u64, String)>, PartCopyError> {
        let source = format!("/{}", uri_encode(&format!("{}/{}", self.bucket, self.full_key(request.from))));
        let count = request.size_bytes.div_ceil(part_size).max(1);
        let mut parts: Vec<(u64, String)> = stream::iter(1..=count)
            .map(|number| {
                let first = (number - 1) * part_size;
                let last = (first + part_size).min(request.size_bytes) - 1;
                let mut headers = vec![
                    ("x-amz-copy-source".to_string(), source.clone()),
                    ("x-amz-copy-source-range".to_string(), format!("bytes={first}-{last}")),
                ];
                if let Some(e_tag) = request.e_tag {
                    headers.push(("x-amz-copy-source-if-match".to_string(), e_tag.to_string()));
                }
                async move {
                    let number_text = number.to_string();
                    let query = [("partNumber", number_text.as_str()), ("uploadId", upload_id)];
                    let body = self
                        .send("UploadPartCopy", reqwest::Method::PUT, request.to, &query, headers, Vec::new())
                        .await?;
                    let e_tag = xml_value(&body, "ETag").ok_or_else(|| PartCopyError::Request {
                        operation: "UploadPartCopy",
                        key: request.to.to_string(),
                        reason: format!("no ETag in the response for part {number}"),
                    })?;
                    Ok::<_, PartCopyError>((number, e_tag.replace("&quot;", "\"")))
                }
            })
            .buffer_unordered(max_concurrency.max(1))
            .try_collect()
            .await?;
        parts.sort_by_key(|(number, _)| *number);
        Ok(parts)
    }

    async fn complete(&self, key: &str, upload_id: &str, parts: &[(u64, String)]) -> Result<(), PartCopyError> {
        let mut body = String::from("<CompleteMultipartUpload>");
        for (number, e_tag) in parts {
            body.push_str(&format!("<Part><PartNumber>{number}</PartNumber><ETag>{}</ETag></Part>", xml_escape(e_tag)));
        }
        body.push_str("</CompleteMultipartUpload>");
        let answer = self
            .send("CompleteMultipartUpload", reqwest::Method::POST, key, &[("uploadId", upload_id)], Vec::new(), body.into_bytes())
            .await?;
        // S3 may return 200 with an error document when completing fails late.
        if answer.contains("<Error>") {
            return Err(PartCopyError::Request {
                operation: "CompleteMultipartUpload",
                key: key.to_string(),
                reason: xml_value(&answer, "Message").unwrap_or(answer),
            });
        }
        Ok(())
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        let result = self
            .send("AbortMultipartUpload", reqwest::Method::DELETE, key, &[("uploadId", upload_id)], Vec::new(), Vec::new())
            .await;
        match result {
            Ok(_) => tracing::info!(space = %self.space.name, key, "aborted multipart copy"),
            Err(err) => tracing::error!(space = %self.space.name, key, error = %err,
                "cannot abort multipart copy; its parts stay until the store's lifecycle rules remove them"),
        }
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// Sends one signed request, retrying connection errors and 5xx responses, and
    /// returns the body of a successful response.
    async fn send(
        &self,
        operation: &'static str,
        method: reqwest::Method,
        key: &str,
        query: &[(&str, &str)],
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Result<String, PartCopyError> {
        let full_key = self.full_key(key);
        let path = if self.space.path_style {
            format!("/{}/{}", uri_encode(&self.bucket), uri_encode(&full_key))
        } else {
            format!("/{}", uri_encode(&full_key))
        };
        let mut sorted_query: Vec<(String, String)> =
            query.iter().map(|(k, v)| (query_encode(k), query_encode(v))).collect();
        sorted_query.sort();
        let query_text: String = sorted_query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
        let request_error = |reason: String| PartCopyError::Request { operation, key: key.to_string(), reason };

        let mut attempt = 0;
        loop {
            attempt += 1;
            let signer = self.signer()?;
            let signed = signer.sign(&method, &self.host, &path, &query_text, &headers, &body, &self.space.region, SystemTime::now());
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}?{query_text}", self.origin))
                .body(body.clone());
            for (name, value) in signed {
                request = request.header(name, value);
            }

            let retry_reason = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    if status.is_success() {
                        return Ok(text);
                    }
                    if !(status.is_server_error() || status.as_u16() == 429) {
                        let message = xml_value(&text, "Message").unwrap_or_else(|| status.to_string());
                        return Err(request_error(format!("{status}: {message}")));
                    }
                    format!("status {status}")
                }
                Err(err) => format!("request error: {err}"),
            };
            if attempt >= ATTEMPTS {
                return Err(request_error(format!("{retry_reason} after {attempt} attempts")));
            }
            tracing::warn!(operation, key, attempt, reason = %retry_reason, "retrying multipart copy request");
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
    }

    fn signer(&self) -> Result<Signer, PartCopyError> {
        let error = |reason: String| PartCopyError::Credentials { space: self.space.name.clone(), reason };
        let Some(sources) = &self.space.credentials else {
            let access_key_id = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default();
            let secret_access_key = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
            if access_key_id.is_empty() || secret_access_key.is_empty() {
                return Err(error("set access_key_id and secret_access_key_file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into()));
            }
            let session_token = std::env::var("AWS_SESSION_TOKEN").ok().filter(|t| !t.is_empty());
            return Ok(Signer { access_key_id, secret_access_key, session_token });
        };
        let key = |field: &str| format!("spaces.{}.{field}", self.space.name);
        Ok(Signer {
            access_key_id: sources.access_key_id.read(&key("access_key_id")).map_err(|e| error(e.to_string()))?,
            secret_access_key: sources.secret_access_key.read(&key("secret_access_key")).map_err(|e| error(e.to_string()))?,
            session_token: match &sources.session_token {
                Some(source) => Some(source.read(&key("session_token")).map_err(|e| error(e.to_string()))?),
                None => None,
            },
        })
    }
}

impl Signer {
    /// Returns the headers (given ones included) that authenticate the request.
    #[allow(clippy::too_many_arguments)]
    fn sign(
        &self,
        method: &reqwest::Method,
        host: &str,
        path: &str,
        query: &str,
        extra: &[(String, String)],
        body: &[u8],
        region: &str,
        now: SystemTime,
    ) -> Vec<(String, String)> {
        let timestamp = amz_date(now);
        let date = &timestamp[..8];
        let payload_hash = hex(digest::digest(&digest::SHA256, body).as_ref());

        let mut headers = vec![
            ("host".to_string(), host.to_string()),
            ("x-amz-content-sha256".to_string(), payload_hash.clone()),
            ("x-amz-date".to_string(), timestamp.clone()),
        ];
        if let Some(token) = &self.session_token {
            headers.push(("x-amz-security-token".to_string(), token.clone()));
        }
        headers.extend(extra.iter().map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_string())));
        headers.sort();

        let signed_headers = headers.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(";");
        let canonical_headers: String = headers.iter().map(|(name, value)| format!("{name}:{value}\n")).collect();
        let canonical_request = format!("{method}\n{path}\n{query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}");

        let scope = format!("{date}/{region}/s3/aws4_request");
        let request_hash = hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref());
        let string_to_sign = format!("AWS4-HMAC-SHA256\n{timestamp}\n{scope}\n{request_hash}");
        let date_key = hmac_sha256(format!("AWS4{}", self.secret_access_key).as_bytes(), date);
        let region_key = hmac_sha256(&date_key, region);
        let service_key = hmac_sha256(&region_key, "s3");
        let signing_key = hmac_sha256(&service_key, "aws4_request");
        let signature = hex(&hmac_sha256(&signing_key, &string_to_sign));

        headers.retain(|(name, _)| name != "host");
        headers.push((
            "authorization".to_string(),
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
                self.access_key_id
            ),
        ));
        headers
    }
}

/// Returns the text of the first `<tag>` element of an XML response.
fn xml_value(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..end].to_string())
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Percent-encodes a key for a SigV4 canonical URI: everything but unreserved
/// characters and `/`.
fn uri_encode(text: &str) -> String {
    encode(text, true)
}

/// Percent-encodes a query name or value: everything but unreserved characters.
fn query_encode(text: &str) -> String {
    encode(text, false)
}

fn encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(byte as char),
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac_sha256(key: &[u8], data: &str) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, data.as_bytes()).as_ref().to_vec()
}

/// Formats `time` as the SigV4 timestamp `YYYYMMDDTHHMMSSZ`.
fn amz_date(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_values_extracted() {
        let xml = "<?xml version=\"1.0\"?><InitiateMultipartUploadResult><UploadId>abc</UploadId></InitiateMultipartUploadResult>";
        assert_eq!(xml_value(xml, "UploadId").as_deref(), Some("abc"));
        assert_eq!(xml_value("<CopyPartResult><ETag>&quot;e1&quot;</ETag></CopyPartResult>", "ETag").as_deref(), Some("&quot;e1&quot;"));
        assert_eq!(xml_value("<a></a>", "UploadId"), None);
    }

    #[test]
    fn encodings_follow_sigv4() {
        assert_eq!(uri_encode("b/a b+c%.txt"), "b/a%20b%2Bc%25.txt");
        assert_eq!(query_encode("a/b c"), "a%2Fb%20c");
        assert_eq!(amz_date(UNIX_EPOCH + Duration::from_secs(1_440_938_160)), "20150830T123600Z");
    }
}
