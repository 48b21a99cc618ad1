//! Bearer secrets (the admin token, the reward token) and their constant-time check.
//!
//! A [`Secret`] keeps only the SHA-256 digest of the token. A presented token is hashed and the
//! two 32-byte digests are compared without an early exit, so neither the position of the first
//! wrong byte nor the token's length shows in the time of the check.

use sha2::{Digest, Sha256};

use super::ServeError;

/// A configured bearer secret, stored as its SHA-256 digest.
#[derive(Clone)]
pub struct Secret {
    digest: [u8; 32],
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret from its token. `what` names it in errors (e.g. `"admin token"`). An empty
    /// or all-whitespace token is refused: it would turn the check into no check.
    pub fn new(what: &str, token: &str) -> Result<Self, ServeError> {
        if token.trim().is_empty() {
            return Err(ServeError::Config(format!(
                "the {what} is empty; set a non-empty token or leave it unset"
            )));
        }
        Ok(Secret {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Whether `given` is the token, in time independent of where or whether they differ.
    pub fn matches(&self, given: &str) -> bool {
        let other: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        let diff = self
            .digest
            .iter()
            .zip(other.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        // black_box keeps the optimiser from turning the fold into an early-exit compare.
        std::hint::black_box(diff) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_tokens_are_refused() {
        for t in ["", " ", "\n\t"] {
            let e = Secret::new("admin token", t).unwrap_err();
            assert!(e.to_string().contains("admin token is empty"), "{e}");
        }
    }

    #[test]
    fn only_the_exact_token_matches() {
        let s = Secret::new("admin token", "sesame").unwrap();
        assert!(s.matches("sesame"));
        for wrong in ["", "sesam", "sesame ", "Sesame", "sesamesesame"] {
            assert!(!s.matches(wrong), "{wrong:?}");
        }
        assert_eq!(format!("{s:?}"), "Secret(..)");
    }
}
