//! Lease tokens: what a graphical node needs to mount one share, sealed with an AEAD.
//!
//! Text form: base64url without padding of `version (1 byte) || nonce (24 bytes) ||
//! ciphertext || tag (16 bytes)`. Version 1 seals the JSON claims with
//! XChaCha20-Poly1305 under the 32-byte `samba.token_key`, authenticating the version
//! byte as associated data. Invariant: [`open`] returns claims only when the whole
//! token authenticated under the key, so an altered or cut token never yields claims.
//! A token is a bearer secret: nothing here logs it or puts it in an error message.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use datanet::config::SecretSource;

use crate::secret::{fill_random, Password};

/// The token format this build writes and reads.
pub const TOKEN_VERSION: u8 = 1;

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;
const ASSOCIATED_DATA_PREFIX: &[u8] = b"datanet samba lease token v";

/// The configuration key named in key errors.
pub const TOKEN_KEY_NAME: &str = "samba.token_key";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is empty; pass a token file or pipe the token on standard input")]
    Empty,

    #[error("the token is not base64url text ({detail}); copy the whole token without changes")]
    Malformed { detail: String },

    #[error("the token is truncated ({detail}); copy the whole token")]
    Truncated { detail: String },

    #[error("token format version {found} is not supported (this build reads version {TOKEN_VERSION}); use a matching samba-provisioner")]
    UnsupportedVersion { found: u8 },

    #[error("the token failed authentication: it was altered or truncated, or it was sealed with a different key; check that {TOKEN_KEY_NAME} matches the provisioner's")]
    Forged,

    #[error("the token expired at {expired_at} ({ago} ago); request a new lease")]
    Expired { expired_at: String, ago: String },

    #[error("the token's claims are invalid: {0}")]
    Claims(String),

    #[error("invalid {TOKEN_KEY_NAME}: {0}; write 64 hex characters (e.g. from `openssl rand -hex 32`) into a 0600 file")]
    InvalidKey(String),

    #[error("cannot seal the token: {0}")]
    Seal(String),
}

/// The 32-byte key that seals and opens tokens. Zeroed on drop.
pub struct TokenKey(Zeroizing<[u8; KEY_LEN]>);

impl TokenKey {
    /// Parses 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<TokenKey, TokenError> {
        let text = text.trim();
        if text.len() != KEY_LEN * 2 {
            return Err(TokenError::InvalidKey(format!(
                "expected 64 hex characters, found {}",
                text.len()
            )));
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(text, bytes.as_mut()).map_err(|_| {
            TokenError::InvalidKey("the key contains characters other than 0-9 and a-f".into())
        })?;
        Ok(TokenKey(bytes))
    }

    /// Reads the key from its configured source (a 0600 file or an environment variable).
    pub fn load(source: &SecretSource) -> Result<TokenKey, crate::ProvisionError> {
        let text = Zeroizing::new(source.read(TOKEN_KEY_NAME)?);
        Ok(TokenKey::from_hex(&text)?)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(self.0.as_ref()))
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

/// Everything a node needs to reach its share.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenClaims {
    pub lease_id: String,
    pub server: String,
    pub port: u16,
    pub share: String,
    pub account: String,
    pub password: Password,
    /// Unix time in seconds after which Samba rejects the account.
    pub expires_at: u64,
    pub read_only: bool,
    /// The share's `server smb encrypt` value: `required`, `desired` or `off`.
    pub encrypt: String,
}

impl TokenClaims {
    pub fn expires_at_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires_at)
    }
}

fn associated_data(version: u8) -> Vec<u8> {
    let mut data = ASSOCIATED_DATA_PREFIX.to_vec();
    data.push(version);
    data
}

/// Seals claims into token text.
pub fn seal(key: &TokenKey, claims: &TokenClaims) -> Result<String, crate::ProvisionError> {
    let plaintext = Zeroizing::new(
        serde_json::to_vec(claims).map_err(|err| TokenError::Seal(err.to_string()))?,
    );
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce)?;

    let aad = associated_data(TOKEN_VERSION);
    let ciphertext = key
        .cipher()
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| TokenError::Seal("encryption failed".into()))?;

    let mut bytes = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    bytes.push(TOKEN_VERSION);
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(&ciphertext);
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Decoder of token text: tokens are written without padding, but a token that a tool
/// padded with `=` (correctly) is accepted too. Anything else outside the base64url
/// alphabet is rejected.
const TOKEN_DECODER: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Authenticates and decrypts token text, without looking at its expiry. Whitespace
/// around the token (a trailing newline, blank lines, CRLF) is ignored.
pub fn open(key: &TokenKey, text: &str) -> Result<TokenClaims, TokenError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(TokenError::Empty);
    }
    // Cutting base64 text mid-byte shows up as a bad length or a last character with
    // stray bits, so both count as truncation.
    let bytes = TOKEN_DECODER.decode(text).map_err(|err| match err {
        base64::DecodeError::InvalidLength(_) => TokenError::Truncated {
            detail: format!("{} characters do not form whole bytes", text.len()),
        },
        base64::DecodeError::InvalidLastSymbol(..) => TokenError::Truncated {
            detail: "its last character is incomplete".into(),
        },
        other => TokenError::Malformed {
            detail: other.to_string(),
        },
    })?;

    let minimum = 1 + NONCE_LEN + TAG_LEN;
    if bytes.len() < minimum {
        return Err(TokenError::Truncated {
            detail: format!("{} bytes, at least {minimum} expected", bytes.len()),
        });
    }
    let version = bytes[0];
    if version != TOKEN_VERSION {
        return Err(TokenError::UnsupportedVersion { found: version });
    }

    let (nonce, ciphertext) = bytes[1..].split_at(NONCE_LEN);
    let aad = associated_data(version);
    let plaintext = Zeroizing::new(
        key.cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| TokenError::Forged)?,
    );

    let claims: TokenClaims =
        serde_json::from_slice(&plaintext).map_err(|err| TokenError::Claims(err.to_string()))?;
    if !claims.password.is_well_formed() {
        return Err(TokenError::Claims(
            "the password is not 24 or more letters and digits".into(),
        ));
    }
    Ok(claims)
}

/// Opens a token and rejects it when it expired at or before `now`.
pub fn open_unexpired(
    key: &TokenKey,
    text: &str,
    now: SystemTime,
) -> Result<TokenClaims, TokenError> {
    let claims = open(key, text)?;
    let expires = claims.expires_at_time();
    if expires <= now {
        let ago = now.duration_since(expires).unwrap_or_default();
        return Err(TokenError::Expired {
            expired_at: humantime::format_rfc3339_seconds(expires).to_string(),
            ago: humantime::format_duration(Duration::from_secs(ago.as_secs())).to_string(),
        });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn claims(expires_at: u64) -> TokenClaims {
        TokenClaims {
            lease_id: "abcdefghijklmnop".into(),
            server: "127.0.0.1".into(),
            port: 4455,
            share: "dnlabcdefghijkl".into(),
            account: "dnlabcdefghijkl".into(),
            password: Password::generate().unwrap(),
            expires_at,
            read_only: false,
            encrypt: "required".into(),
        }
    }

    fn far_future() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600
    }

    #[test]
    fn round_trip_keeps_claims() {
        let key = TokenKey::from_hex(KEY_HEX).unwrap();
        let original = claims(far_future());
        let text = seal(&key, &original).unwrap();
        let opened = open_unexpired(&key, &text, SystemTime::now()).unwrap();
        assert_eq!(opened.password, original.password);
        assert_eq!(opened.share, original.share);
        assert_eq!(opened.port, 4455);
    }

    #[test]
    fn token_text_hides_password() {
        let key = TokenKey::from_hex(KEY_HEX).unwrap();
        let original = claims(far_future());
        let text = seal(&key, &original).unwrap();
        assert!(!text.contains(original.password.expose()));
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{text}"
        );
    }

    #[test]
    fn flipped_byte_is_forged() {
        let key = TokenKey::from_hex(KEY_HEX).unwrap();
        let text = seal(&key, &claims(far_future())).unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(&text).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        let altered = URL_SAFE_NO_PAD.encode(bytes);
        assert!(matches!(open(&key, &altered), Err(TokenError::Forged)));
    }

    #[test]
    fn cut_token_is_rejected() {
        let key = TokenKey::from_hex(KEY_HEX).unwrap();
        let text = seal(&key, &claims(far_future())).unwrap();
        for keep in [0, 5, 30, text.len() / 2, text.len() - 1] {
            let err = open(&key, &text[..keep]).unwrap_err();
            assert!(
                matches!(
                    err,
                    TokenError::Empty | TokenError::Truncated { .. } | TokenError::Forged
                ),
                "kept {keep}: {err}"
            );
        }
    }

    #[test]
    fn other_key_is_forged() {
        let key = TokenKey::from_hex(KEY_HEX).unwrap();
        let other = TokenKey::from_hex(&KEY_HEX.replace('0', "1")).unwrap();
        let text = seal(&key, &claims(far_future())).unwrap();
        assert!(matches!(open(&other, &text), Err(TokenError::Forged)));
    }

    #[test]
    fn expired_token_is_rejected() {
        let key = TokenKey::from_hex(KEY_HEX).unwrap();
        let past = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 10;
        let text = seal(&key, &claims(past)).unwrap();
        let err = open_unexpired(&key, &text, SystemTime::now()).unwrap_err();
        assert!(matches!(err, TokenError::Expired { .. }), "{err}");
        assert!(open(&key, &text).is_ok());
    }

    #[test]
    fn unknown_version_is_rejected() {
        let key = TokenKey::from_hex(KEY_HEX).unwrap();
        let text = seal(&key, &claims(far_future())).unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(&text).unwrap();
        bytes[0] = 9;
        let err = open(&key, &URL_SAFE_NO_PAD.encode(bytes)).unwrap_err();
        assert!(
            matches!(err, TokenError::UnsupportedVersion { found: 9 }),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let key = TokenKey::from_hex(KEY_HEX).unwrap();
        let err = open(&key, "not a token!").unwrap_err();
        assert!(matches!(err, TokenError::Malformed { .. }), "{err}");
    }

    #[test]
    fn bad_key_text_is_rejected() {
        assert!(TokenKey::from_hex("abc").is_err());
        assert!(TokenKey::from_hex(&"zz".repeat(32)).is_err());
        assert!(TokenKey::from_hex(&format!("{KEY_HEX}\n")).is_ok());
    }
}
