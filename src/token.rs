//! Session capability tokens: scoped, expiring, verifiable by any instance
//! that shares the deployment's secret, without shared state.
//!
//! A token reads `<scope>.<expires>.<mac>`: the scope (`f` full — stream,
//! publish, runs; `s` stream only, for the `EventSource` query string, where
//! URLs end up in logs), the expiry in Unix seconds, and the hex
//! HMAC-SHA256 of all of it with the session id under `SESSION_SECRET`.
//! A previous secret can be kept for verification while the new one signs
//! ([`TokenSigner::with_previous`]), so rotating the secret logs nobody out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::event::SessionId;

type HmacSha256 = Hmac<Sha256>;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Open the session's stream only.
    Stream,
    /// Everything on the session: stream, publish, runs, new tokens.
    Full,
}

impl Scope {
    fn tag(self) -> &'static str {
        match self {
            Scope::Stream => "s",
            Scope::Full => "f",
        }
    }

    /// Whether a token of this scope may do what `needed` asks.
    pub fn allows(self, needed: Scope) -> bool {
        self == Scope::Full || needed == Scope::Stream
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("the token is not a session token")]
    Malformed,
    #[error("the token does not grant access to this session")]
    Invalid,
    #[error("the token has expired; ask for a new one")]
    Expired,
}

/// A freshly issued token.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    /// Unix seconds.
    pub expires: u64,
}

/// Signs and verifies session tokens. `Debug` hides the keys.
#[derive(Clone)]
pub struct TokenSigner {
    /// HMAC keyed once: every token costs the message's hashing only.
    key: HmacSha256,
    previous: Option<HmacSha256>,
    /// The longest a token may still be valid for: a token whose expiry is
    /// further out was not issued by this signer's settings (a key that
    /// leaked minted it), and is refused.
    max_ttl: Option<Duration>,
}

/// Clock difference allowed between the instance that issued a token and
/// the one checking its expiry against [`TokenSigner::with_max_ttl`].
const SKEW: u64 = 60;

fn keyed(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TokenSigner {
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Self {
            key: keyed(secret.as_ref()),
            previous: None,
            max_ttl: None,
        }
    }

    /// Refuses tokens valid for longer than `ttl` from now (plus a minute
    /// of clock difference): the lifetime this signer's tokens are issued
    /// with. Without it, a token minted with a leaked key could be valid
    /// for ever.
    pub fn with_max_ttl(mut self, ttl: Duration) -> Self {
        self.max_ttl = Some(ttl);
        self
    }

    /// Also accepts tokens signed with `previous` (a secret being rotated
    /// out); new tokens are signed with the current one.
    pub fn with_previous(mut self, previous: impl AsRef<[u8]>) -> Self {
        self.previous = Some(keyed(previous.as_ref()));
        self
    }

    /// A signer with a random 256-bit key: fine for one instance, useless
    /// across several (each would reject the others' tokens).
    pub fn random() -> Self {
        Self::new(rand::random::<[u8; 32]>())
    }

    fn mac(key: &HmacSha256, session: &SessionId, scope: &str, expires: &str) -> HmacSha256 {
        let mut mac = key.clone();
        for part in ["sse-scale/v1", session.as_str(), scope, expires] {
            mac.update(part.as_bytes());
            mac.update(b"|");
        }
        mac
    }

    /// A token for `session` with `scope`, valid for `ttl`.
    pub fn issue(&self, session: &SessionId, scope: Scope, ttl: Duration) -> Issued {
        let expires = now_secs().saturating_add(ttl.as_secs());
        let exp = expires.to_string();
        let mac = Self::mac(&self.key, session, scope.tag(), &exp).finalize();
        Issued {
            token: format!("{}.{exp}.{}", scope.tag(), hex::encode(mac.into_bytes())),
            expires,
        }
    }

    /// Checks `token` for `session` (constant time in the MAC) and returns
    /// its scope. A token signed with the previous secret passes.
    pub fn check(&self, session: &SessionId, token: &str) -> Result<Scope, TokenError> {
        self.verify(session, token, true)
    }

    /// As [`TokenSigner::check`], but only a token signed with the current
    /// secret passes: what a refresh needs, so that a key being rotated out
    /// cannot be turned into tokens of the new one.
    pub fn check_current(&self, session: &SessionId, token: &str) -> Result<Scope, TokenError> {
        self.verify(session, token, false)
    }

    fn verify(
        &self,
        session: &SessionId,
        token: &str,
        previous_too: bool,
    ) -> Result<Scope, TokenError> {
        let mut parts = token.splitn(3, '.');
        let (Some(tag), Some(exp), Some(mac)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed);
        };
        let scope = match tag {
            "f" => Scope::Full,
            "s" => Scope::Stream,
            _ => return Err(TokenError::Malformed),
        };
        // One spelling per token, as issued: digits only, lower-case hex.
        let canonical = |s: &str, ok: fn(&u8) -> bool| !s.is_empty() && s.as_bytes().iter().all(ok);
        if !canonical(exp, u8::is_ascii_digit)
            || !canonical(mac, |b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            return Err(TokenError::Malformed);
        }
        let expires: u64 = exp.parse().map_err(|_| TokenError::Malformed)?;
        // An HMAC-SHA256 is 32 bytes: a MAC of any other length is not one of
        // ours, and decoding into a fixed array allocates nothing.
        let mut raw = [0u8; 32];
        hex::decode_to_slice(mac, &mut raw).map_err(|_| TokenError::Malformed)?;
        let previous = self.previous.as_ref().filter(|_| previous_too);
        let valid = std::iter::once(&self.key)
            .chain(previous)
            .any(|key| Self::mac(key, session, tag, exp).verify_slice(&raw).is_ok());
        if !valid {
            return Err(TokenError::Invalid);
        }
        let now = now_secs();
        if expires <= now {
            return Err(TokenError::Expired);
        }
        if let Some(max) = self.max_ttl {
            if expires > now.saturating_add(max.as_secs()).saturating_add(SKEW) {
                return Err(TokenError::Invalid);
            }
        }
        Ok(scope)
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

    const HOUR: Duration = Duration::from_secs(3600);

    fn s(id: &str) -> SessionId {
        SessionId::parse(id).unwrap()
    }

    #[test]
    fn a_token_is_bound_to_its_session_secret_and_scope() {
        let signer = TokenSigner::new("secret");
        let full = signer.issue(&s("a"), Scope::Full, HOUR);
        let stream = signer.issue(&s("a"), Scope::Stream, HOUR);
        assert_eq!(signer.check(&s("a"), &full.token), Ok(Scope::Full));
        assert_eq!(signer.check(&s("a"), &stream.token), Ok(Scope::Stream));
        assert_eq!(signer.check(&s("b"), &full.token), Err(TokenError::Invalid));
        assert_eq!(
            TokenSigner::new("other").check(&s("a"), &full.token),
            Err(TokenError::Invalid)
        );
        // Turning a stream token into a full one breaks the MAC.
        let forged = stream.token.replacen("s.", "f.", 1);
        assert_eq!(signer.check(&s("a"), &forged), Err(TokenError::Invalid));
        // So does pushing its expiry out.
        let (_, rest) = full.token.split_once('.').unwrap();
        let (_, mac) = rest.split_once('.').unwrap();
        let later = format!("f.{}.{mac}", full.expires + 1000);
        assert_eq!(signer.check(&s("a"), &later), Err(TokenError::Invalid));
        let short = format!("f.{}.{}", full.expires, &mac[..62]);
        let long = format!("f.{}.{mac}00", full.expires);
        for bad in [
            "",
            "f",
            "f.1",
            "x.1.00",
            "f.soon.00",
            "f.1.zz",
            "f.1.00",
            &short,
            &long,
        ] {
            assert_eq!(
                signer.check(&s("a"), bad),
                Err(TokenError::Malformed),
                "{bad:?}"
            );
        }
        assert!(Scope::Full.allows(Scope::Stream) && !Scope::Stream.allows(Scope::Full));
    }

    #[test]
    fn one_spelling_per_token_and_no_expiry_past_the_lifetime() {
        let signer = TokenSigner::new("secret");
        let full = signer.issue(&s("a"), Scope::Full, HOUR);
        let (tag, rest) = full.token.split_once('.').unwrap();
        let (exp, mac) = rest.split_once('.').unwrap();
        for other in [
            format!("{tag}.{exp}.{}", mac.to_uppercase()),
            format!("{tag}.+{exp}.{mac}"),
            format!("{tag}.0{exp}.{mac}"),
        ] {
            assert_ne!(signer.check(&s("a"), &other), Ok(Scope::Full), "{other}");
        }
        // A token valid for a year, from a leaked key.
        let leaked = signer.issue(&s("a"), Scope::Full, HOUR * 24 * 365).token;
        let bounded = TokenSigner::new("secret").with_max_ttl(HOUR);
        assert_eq!(bounded.check(&s("a"), &leaked), Err(TokenError::Invalid));
        assert_eq!(bounded.check(&s("a"), &full.token), Ok(Scope::Full));
    }

    #[test]
    fn a_refresh_takes_only_current_secret_tokens() {
        let old = TokenSigner::new("old-secret");
        let token = old.issue(&s("a"), Scope::Full, HOUR).token;
        let rotated = TokenSigner::new("new-secret").with_previous("old-secret");
        assert_eq!(rotated.check(&s("a"), &token), Ok(Scope::Full));
        assert_eq!(
            rotated.check_current(&s("a"), &token),
            Err(TokenError::Invalid)
        );
        let fresh = rotated.issue(&s("a"), Scope::Full, HOUR).token;
        assert_eq!(rotated.check_current(&s("a"), &fresh), Ok(Scope::Full));
    }

    #[test]
    fn tokens_expire_and_survive_a_rotation() {
        let old = TokenSigner::new("old-secret");
        let token = old.issue(&s("a"), Scope::Full, HOUR).token;
        let expired = old.issue(&s("a"), Scope::Full, Duration::ZERO).token;
        assert_eq!(old.check(&s("a"), &expired), Err(TokenError::Expired));
        let rotated = TokenSigner::new("new-secret").with_previous("old-secret");
        assert_eq!(rotated.check(&s("a"), &token), Ok(Scope::Full));
        let fresh = rotated.issue(&s("a"), Scope::Full, HOUR).token;
        assert_eq!(
            old.check(&s("a"), &fresh),
            Err(TokenError::Invalid),
            "signed with the new key"
        );
    }
}
