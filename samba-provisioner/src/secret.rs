//! Random secrets and names: lease ids, account names and passwords.
//!
//! Every character comes from the operating system's random number generator through
//! rejection sampling, so each one is uniform over its alphabet. A [`Password`] never
//! shows its value through `Debug` or `Display`, and its memory is zeroed on drop.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// Length of generated passwords: 32 characters of 62 give about 190 bits.
pub const PASSWORD_LEN: usize = 32;

/// Shortest password accepted from a token; shorter ones were not made by this tool.
pub const MIN_PASSWORD_LEN: usize = 24;

/// Letters and digits only, so a password survives `user%pass`, mount option lists
/// and shell quoting without escaping.
const ALPHANUMERIC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Unix user names and Samba share names are matched case-insensitively in places,
/// so generated names use lowercase letters and digits only.
const LOWERCASE_ALPHANUMERIC: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// The operating system's random number generator failed.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct RandomError(getrandom::Error);

/// Fills `buf` with random bytes from the operating system.
pub fn fill_random(buf: &mut [u8]) -> Result<(), RandomError> {
    getrandom::fill(buf).map_err(RandomError)
}

/// Returns `len` characters drawn uniformly from `alphabet`.
fn random_string(alphabet: &[u8], len: usize) -> Result<String, RandomError> {
    // Bytes at or above `limit` would favour the first characters of the alphabet.
    let limit = 256 - (256 % alphabet.len());
    let mut out = String::with_capacity(len);
    let mut pool = Zeroizing::new([0u8; 64]);

    while out.len() < len {
        fill_random(pool.as_mut())?;
        for &byte in pool.iter() {
            if (byte as usize) < limit && out.len() < len {
                out.push(alphabet[byte as usize % alphabet.len()] as char);
            }
        }
    }
    Ok(out)
}

/// Returns `len` random lowercase letters and digits, for lease ids and account names.
pub fn random_name(len: usize) -> Result<String, RandomError> {
    random_string(LOWERCASE_ALPHANUMERIC, len)
}

/// A Samba account password.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Zeroizing<String>);

impl Password {
    /// Generates a password of [`PASSWORD_LEN`] random letters and digits.
    pub fn generate() -> Result<Password, RandomError> {
        Ok(Password(Zeroizing::new(random_string(
            ALPHANUMERIC,
            PASSWORD_LEN,
        )?)))
    }

    /// Wraps a password read from a token.
    pub fn new(value: String) -> Password {
        Password(Zeroizing::new(value))
    }

    /// Returns the password text, for the few places that must hand it on.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Tells whether the password has the shape this tool generates.
    pub fn is_well_formed(&self) -> bool {
        self.0.len() >= MIN_PASSWORD_LEN && self.0.bytes().all(|b| b.is_ascii_alphanumeric())
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl Serialize for Password {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Password {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Password::new(String::deserialize(deserializer)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_long_and_alphanumeric() {
        let password = Password::generate().unwrap();
        assert_eq!(password.expose().len(), PASSWORD_LEN);
        assert!(password.is_well_formed());
    }

    #[test]
    fn passwords_differ() {
        let first = Password::generate().unwrap();
        let second = Password::generate().unwrap();
        assert_ne!(first, second);
    }

    #[test]
    fn password_debug_hides_value() {
        let password = Password::generate().unwrap();
        let shown = format!("{password:?}");
        assert!(!shown.contains(password.expose()), "{shown}");
    }

    #[test]
    fn random_name_uses_lowercase_alphabet() {
        let name = random_name(200).unwrap();
        assert_eq!(name.len(), 200);
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "{name}"
        );
    }

    #[test]
    fn short_or_symbolic_password_is_malformed() {
        assert!(!Password::new("abc".into()).is_well_formed());
        assert!(!Password::new("a%b".repeat(10)).is_well_formed());
    }
}
