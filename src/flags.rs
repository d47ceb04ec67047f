//! Feature flags, and the one this toolkit depends on:
//! `FF_REDIS_SSE_BROADCAST`, which decides per publish whether an event also
//! goes to Redis (cross-instance) or stays on the local path.
//!
//! A [`FlagSource`] answers for a session, so a source that rolls out per
//! session (Unleash with stickiness on `sessionId`) plugs in without changing
//! the broadcaster. The environment source, [`EnvFlags`], is an atomic load.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::event::SessionId;

/// Name of the flag that sends events through Redis.
pub const REDIS_SSE_BROADCAST: &str = "FF_REDIS_SSE_BROADCAST";

/// Where a flag's current value came from, for `/stats`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlagState {
    /// The flag's value when not decided per session.
    pub enabled: bool,
    /// `default`, `env`, `unleash`, `unleash-last-known`, ...
    pub source: String,
}

/// Answers `FF_REDIS_SSE_BROADCAST` for a session. Called on every publish, so
/// it must be cheap (an atomic load, or a hash of the session id).
pub trait FlagSource: Send + Sync + 'static {
    fn redis_broadcast(&self, session: &SessionId) -> bool;

    /// The flag's value and source, for operators.
    fn state(&self) -> FlagState;
}

/// The flag from the environment, read at start-up; default off. Can be
/// changed at run time through [`EnvFlags::set`].
#[derive(Debug, Default)]
pub struct EnvFlags {
    enabled: AtomicBool,
    from_env: bool,
}

impl EnvFlags {
    /// The value of `FF_REDIS_SSE_BROADCAST` if it was set (see
    /// server configuration); unset means default off.
    pub fn new(value: Option<bool>) -> Self {
        Self {
            enabled: AtomicBool::new(value.unwrap_or(false)),
            from_env: value.is_some(),
        }
    }

    pub fn fixed(enabled: bool) -> Self {
        Self {
            enabled: AtomicBool::new(enabled),
            from_env: true,
        }
    }

    pub fn set(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }
}

impl FlagSource for EnvFlags {
    fn redis_broadcast(&self, _session: &SessionId) -> bool {
        self.get()
    }

    fn state(&self) -> FlagState {
        FlagState {
            enabled: self.get(),
            source: if self.from_env { "env" } else { "default" }.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_off_and_follows_set() {
        assert_eq!(
            EnvFlags::new(Some(true)).state(),
            FlagState {
                enabled: true,
                source: "env".into()
            }
        );
        let f = EnvFlags::new(None);
        let s = SessionId::parse("s").unwrap();
        assert!(!f.redis_broadcast(&s));
        assert_eq!(f.state().source, "default");
        f.set(true);
        assert!(f.redis_broadcast(&s));
    }
}
