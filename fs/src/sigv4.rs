//! AWS Signature Version 4 for the few S3 requests that `object_store` cannot send:
//! directory markers (keys ending in `/`), raw listings and `UploadPartCopy`.
//!
//! Only header-based signing of S3 requests is implemented. Secrets are read per
//! request from the space's configured sources, so rotated keys take effect at once,
//! and they never leave this module except inside the `authorization` header.

use std::time::SystemTime;

use ring::{digest, hmac};

use crate::config::{S3Credentials, SpaceConfig, SpaceLocation};

/// SHA-256 of an empty body, the payload hash of requests without one.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The address of a space's bucket: where requests go and the `Host` header they sign.
#[derive(Debug, Clone)]
pub struct BucketAddress {
    /// `scheme://host[:port]`.
    pub origin: String,
    /// The signed `Host` header value.
    pub host: String,
    /// `true` for path-style requests (`/bucket/key`), `false` for virtual-hosted ones.
    pub path_style: bool,
    pub bucket: String,
    /// The space's key prefix, without a trailing `/`.
    pub prefix: String,
}

impl BucketAddress {
    /// Resolves the bucket address of an S3 space; `None` for other kinds of space.
    pub fn for_space(config: &SpaceConfig) -> Result<Option<BucketAddress>, String> {
        let SpaceLocation::S3 { bucket, prefix } = &config.location else {
            return Ok(None);
        };
        let endpoint = config
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", config.region));
        let url = url::Url::parse(&endpoint).map_err(|err| format!("invalid endpoint {endpoint:?}: {err}"))?;
        let host_name = url
            .host_str()
            .ok_or_else(|| format!("endpoint {endpoint:?} has no host"))?;
        let host_name = if config.path_style { host_name.to_string() } else { format!("{bucket}.{host_name}") };
        let host = match url.port() {
            Some(port) => format!("{host_name}:{port}"),
            None => host_name,
        };

        Ok(Some(BucketAddress {
            origin: format!("{}://{host}", url.scheme()),
            host,
            path_style: config.path_style,
            bucket: bucket.clone(),
            prefix: prefix.clone(),
        }))
    }

    /// Returns the full object key of `key` (relative to the space prefix).
    pub fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// Returns the canonical URI of a full object key, or of the bucket when `None`.
    pub fn uri_path(&self, full_key: Option<&str>) -> String {
        match (self.path_style, full_key) {
            (true, Some(key)) => format!("/{}/{}", uri_encode(&self.bucket), uri_encode(key)),
            (true, None) => format!("/{}", uri_encode(&self.bucket)),
            (false, Some(key)) => format!("/{}", uri_encode(key)),
            (false, None) => "/".to_string(),
        }
    }
}

/// The access key, secret and optional session token that sign one request.
pub struct SigningKey {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads the space's credentials from their configured sources or, for a space
    /// without configured credentials, from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`. The error names the keys to set, never a value.
    pub fn read(space: &str, sources: Option<&S3Credentials>) -> Result<SigningKey, String> {
        let Some(sources) = sources else {
            let access_key_id = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default();
            let secret_access_key = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
            if access_key_id.is_empty() || secret_access_key.is_empty() {
                return Err(format!(
                    "space {space} has no credentials: set access_key_id and secret_access_key_file, \
                     or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ));
            }
            return Ok(SigningKey {
                access_key_id,
                secret_access_key,
                session_token: std::env::var("AWS_SESSION_TOKEN").ok().filter(|t| !t.is_empty()),
            });
        };

        let key = |field: &str| format!("spaces.{space}.{field}");
        let read = |source: &crate::config::SecretSource, field: &str| source.read(&key(field)).map_err(|e| e.to_string());
        Ok(SigningKey {
            access_key_id: read(&sources.access_key_id, "access_key_id")?,
            secret_access_key: read(&sources.secret_access_key, "secret_access_key")?,
            session_token: match &sources.session_token {
                Some(source) => Some(read(source, "session_token")?),
                None => None,
            },
        })
    }

    /// Returns the headers to send, the given `extra` headers included, with an
    /// `authorization` header that signs them. `path` and `query` must already be in
    /// canonical form (see [`uri_encode`] and [`query_encode`]); `payload_sha256` is the
    /// hex SHA-256 of the body ([`EMPTY_SHA256`] without one).
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        &self,
        method: &reqwest::Method,
        host: &str,
        path: &str,
        query: &str,
        extra: &[(String, String)],
        payload_sha256: &str,
        region: &str,
        now: SystemTime,
    ) -> Vec<(String, String)> {
        let timestamp = amz_date(now);
        let date = &timestamp[..8];

        let mut headers = vec![
            ("host".to_string(), host.to_string()),
            ("x-amz-content-sha256".to_string(), payload_sha256.to_string()),
            ("x-amz-date".to_string(), timestamp.clone()),
        ];
        if let Some(token) = &self.session_token {
            headers.push(("x-amz-security-token".to_string(), token.clone()));
        }
        headers.extend(extra.iter().map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_string())));
        // Canonical headers are sorted by name.
        headers.sort();

        let signed_headers = headers.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(";");
        let canonical_headers: String = headers.iter().map(|(name, value)| format!("{name}:{value}\n")).collect();
        let canonical_request =
            format!("{method}\n{path}\n{query}\n{canonical_headers}\n{signed_headers}\n{payload_sha256}");

        let scope = format!("{date}/{region}/s3/aws4_request");
        let request_hash = hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref());
        let string_to_sign = format!("AWS4-HMAC-SHA256\n{timestamp}\n{scope}\n{request_hash}");
        let signature = hex(&hmac_sha256(&self.derive_key(date, region), &string_to_sign));

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

    fn derive_key(&self, date: &str, region: &str) -> Vec<u8> {
        let date_key = hmac_sha256(format!("AWS4{}", self.secret_access_key).as_bytes(), date);
        let region_key = hmac_sha256(&date_key, region);
        let service_key = hmac_sha256(&region_key, "s3");
        hmac_sha256(&service_key, "aws4_request")
    }
}

/// Returns the hex SHA-256 of a request body.
pub fn payload_sha256(body: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, body).as_ref())
}

/// Percent-encodes a key for a canonical URI: everything but unreserved characters and `/`.
pub fn uri_encode(text: &str) -> String {
    encode(text, true)
}

/// Percent-encodes a query parameter name or value: everything but unreserved characters.
pub fn query_encode(text: &str) -> String {
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

/// Formats `time` as the SigV4 timestamp `YYYYMMDDTHHMMSSZ` (UTC).
fn amz_date(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).format("%Y%m%dT%H%M%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn dates_format_as_sigv4() {
        assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
        let time = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        assert_eq!(amz_date(time), "20150830T123600Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(amz_date(leap), "20000229T000000Z");
    }

    #[test]
    fn keys_and_queries_encode() {
        assert_eq!(uri_encode("a b/c+d%#/"), "a%20b/c%2Bd%25%23/");
        assert_eq!(uri_encode("caf\u{e9}"), "caf%C3%A9");
        assert_eq!(query_encode("a/b c"), "a%2Fb%20c");
        assert_eq!(payload_sha256(b""), EMPTY_SHA256);
    }

    /// The example signing key of the AWS SigV4 documentation ("Examples of how to derive
    /// a signing key", secret `wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY`, 20120215,
    /// us-east-1, iam).
    #[test]
    fn signing_key_matches_aws_example() {
        let date_key = hmac_sha256(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215");
        let region_key = hmac_sha256(&date_key, "us-east-1");
        let service_key = hmac_sha256(&region_key, "iam");
        let signing_key = hmac_sha256(&service_key, "aws4_request");
        assert_eq!(hex(&signing_key), "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d");
    }

    /// The GET Object example of the S3 SigV4 documentation ("Signature Calculations
    /// for the Authorization Header: Transferring Payload in a Single Chunk").
    #[test]
    fn signature_matches_aws_get_object_example() {
        let key = SigningKey {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_369_353_600); // 2013-05-24T00:00:00Z
        let headers = key.sign(
            &reqwest::Method::GET,
            "examplebucket.s3.amazonaws.com",
            "/test.txt",
            "",
            &[("Range".into(), "bytes=0-9".into())],
            EMPTY_SHA256,
            "us-east-1",
            now,
        );
        let authorization = &headers.iter().find(|(name, _)| name == "authorization").unwrap().1;
        assert!(
            authorization.ends_with("Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"),
            "{authorization}"
        );
    }

    #[test]
    fn debug_hides_secret() {
        let key = SigningKey {
            access_key_id: "GK1".into(),
            secret_access_key: "very-secret".into(),
            session_token: Some("token-secret".into()),
        };
        let text = format!("{key:?}");
        assert!(!text.contains("very-secret"), "{text}");
        assert!(!text.contains("token-secret"), "{text}");
    }
}
