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
use std::time::{Duration, SystemTime};

use futures::stream::{self, StreamExt, TryStreamExt};

use crate::config::SpaceConfig;
use crate::sigv4::{payload_sha256, query_encode, uri_encode, BucketAddress, SigningKey};

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
    address: BucketAddress,
}

impl PartCopyClient {
    pub fn for_space(space: &SpaceConfig) -> Result<PartCopyClient, PartCopyError> {
        let endpoint_error = |reason: String| PartCopyError::Endpoint {
            space: space.name.clone(),
            endpoint: space.endpoint.clone().unwrap_or_default(),
            reason,
        };
        let address = BucketAddress::for_space(space)
            .map_err(endpoint_error)?
            .ok_or_else(|| PartCopyError::NotS3(space.name.clone()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|err| endpoint_error(err.to_string()))?;
        Ok(PartCopyClient {
            space: space.clone(),
            http,
            address,
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
        let source = format!("/{}", uri_encode(&format!("{}/{}", self.address.bucket, self.address.full_key(request.from))));
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
        let full_key = self.address.full_key(key);
        let path = self.address.uri_path(Some(&full_key));
        let body_sha256 = payload_sha256(&body);
        let mut sorted_query: Vec<(String, String)> =
            query.iter().map(|(k, v)| (query_encode(k), query_encode(v))).collect();
        sorted_query.sort();
        let query_text: String = sorted_query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
        let request_error = |reason: String| PartCopyError::Request { operation, key: key.to_string(), reason };

        let mut attempt = 0;
        loop {
            attempt += 1;
            let signer = self.signer()?;
            let signed = signer.sign(
                &method,
                &self.address.host,
                &path,
                &query_text,
                &headers,
                &body_sha256,
                &self.space.region,
                SystemTime::now(),
            );
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}?{query_text}", self.address.origin))
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

    fn signer(&self) -> Result<SigningKey, PartCopyError> {
        SigningKey::read(&self.space.name, self.space.credentials.as_ref()).map_err(|reason| PartCopyError::Credentials {
            space: self.space.name.clone(),
            reason,
        })
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
}
