//! Session capability tokens.
//!
//! A token is the hex HMAC-SHA256 of the session id under the deployment's
//! `SESSION_SECRET`. It grants access to that one session, and every instance
//! sharing the secret can verify it without shared state.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::event::SessionId;

type HmacSha256 = Hmac<Sha256>;

/// Signs and verifies session tokens. `Debug` hides the key.
#[derive(Clone)]
pub struct TokenSigner {
    key: Vec<u8>,
}

impl TokenSigner {
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Self {
            key: secret.as_ref().to_vec(),
        }
    }

    /// A signer with a random 256-bit key: fine for one instance, useless
    /// across several (each would reject the others' tokens).
    pub fn random() -> Self {
        Self::new(rand::random::<[u8; 32]>())
    }

    fn mac(&self, session: &SessionId) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(session.as_str().as_bytes());
        mac
    }

    pub fn sign(&self, session: &SessionId) -> String {
        hex::encode(self.mac(session).finalize().into_bytes())
    }

    /// Constant-time check that `token` belongs to `session`.
    pub fn verify(&self, session: &SessionId, token: &str) -> bool {
        match hex::decode(token) {
            Ok(raw) => self.mac(session).verify_slice(&raw).is_ok(),
            Err(_) => false,
        }
    }
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_bound_to_session_and_secret() {
        let s1 = SessionId::parse("one").unwrap();
        let s2 = SessionId::parse("two").unwrap();
        let a = TokenSigner::new("secret");
        let t = a.sign(&s1);
        assert!(a.verify(&s1, &t));
        assert!(!a.verify(&s2, &t));
        assert!(!TokenSigner::new("other").verify(&s1, &t));
        assert!(!a.verify(&s1, "not-hex"));
        assert!(
            TokenSigner::new("secret").verify(&s1, &t),
            "instances sharing a secret agree"
        );
        assert!(!format!("{a:?}").contains("secret"));
    }
}
