//! Rate limits: per session on publishing routes, per client IP on opening
//! streams.
//!
//! With Redis, a limit is a fixed-window counter updated by one Lua script
//! (INCR + PEXPIRE + PTTL in a single round trip), so it holds across every
//! instance sharing the Redis. It runs on the process's shared client
//! ([`SharedRedis`]) — the same connection the broadcaster publishes on.
//! Without Redis, or while Redis is unreachable, the same windows are counted
//! in process (logged once per outage); a limiter error never fails a request.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
#[cfg(feature = "redis")]
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[cfg(feature = "redis")]
use crate::redis_client::SharedRedis;

/// Returns `{count, pttl}` after counting one hit in the window.
#[cfg(feature = "redis")]
const WINDOW_SCRIPT: &str = r#"
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"#;

/// Local windows kept before expired ones are swept.
const LOCAL_SWEEP_AT: usize = 10_000;
/// Sweeps happen at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The in-process windows, by key, and when they were last swept.
struct Local {
    windows: HashMap<String, (Instant, u64)>,
    swept: Instant,
}

/// At most `max` hits per `window`; `max == 0` disables the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max: u64,
    pub window: Duration,
}

impl Limit {
    pub fn per_second(max: u64) -> Self {
        Self {
            max,
            window: Duration::from_secs(1),
        }
    }

    pub fn per_minute(max: u64) -> Self {
        Self {
            max,
            window: Duration::from_secs(60),
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Over the limit; the window resets after `retry_after`.
    Limited {
        retry_after: Duration,
    },
}

/// See the module docs.
pub struct RateLimiter {
    #[cfg(feature = "redis")]
    redis: Option<(SharedRedis, redis::Script)>,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    prefix: String,
    local: Mutex<Local>,
    /// Set while Redis is failing, so the fallback is logged once per outage.
    #[cfg(feature = "redis")]
    fallback: AtomicBool,
    /// Checks answered in process because Redis was unreachable.
    pub fallback_checks: AtomicU64,
}

impl RateLimiter {
    /// `redis` is the process's shared client, if any; keys are
    /// `<prefix>rl:<key>`.
    #[cfg(feature = "redis")]
    pub fn new(redis: Option<SharedRedis>, prefix: &str) -> Self {
        Self {
            redis: redis.map(|r| (r, redis::Script::new(WINDOW_SCRIPT))),
            ..Self::local(prefix)
        }
    }

    /// A limiter that counts in process only (one instance).
    pub fn local(prefix: &str) -> Self {
        Self {
            #[cfg(feature = "redis")]
            redis: None,
            prefix: format!("{prefix}rl:"),
            local: Mutex::new(Local {
                windows: HashMap::new(),
                swept: Instant::now(),
            }),
            #[cfg(feature = "redis")]
            fallback: AtomicBool::new(false),
            fallback_checks: AtomicU64::new(0),
        }
    }

    /// Counts one hit for `key` against `limit`.
    pub async fn check(&self, key: &str, limit: Limit) -> Decision {
        if limit.max == 0 {
            return Decision::Allowed;
        }
        #[cfg(feature = "redis")]
        if let Some((redis, script)) = &self.redis {
            match self.check_redis(redis, script, key, limit).await {
                Ok(decision) => {
                    if self.fallback.swap(false, Ordering::Relaxed) {
                        tracing::info!(backend = "redis", "rate limiting is back on Redis");
                    }
                    return decision;
                }
                Err(error) => {
                    self.fallback_checks.fetch_add(1, Ordering::Relaxed);
                    if !self.fallback.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            backend = "redis",
                            %error,
                            "rate limiting falls back to in-process counting"
                        );
                    }
                }
            }
        }
        self.check_local(key, limit)
    }

    #[cfg(feature = "redis")]
    async fn check_redis(
        &self,
        redis: &SharedRedis,
        script: &redis::Script,
        key: &str,
        limit: Limit,
    ) -> Result<Decision, crate::redis_client::CallError> {
        let mut call = script.key(format!("{}{key}", self.prefix));
        call.arg(limit.window.as_millis() as u64);
        let call = &call;
        let (count, ttl_ms): (u64, i64) = redis
            .call(|mut conn| async move { call.invoke_async(&mut conn).await })
            .await?;
        Ok(if count <= limit.max {
            Decision::Allowed
        } else {
            Decision::Limited {
                retry_after: Duration::from_millis(ttl_ms.max(1) as u64),
            }
        })
    }

    fn check_local(&self, key: &str, limit: Limit) -> Decision {
        let now = Instant::now();
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let Local { windows, swept } = &mut *local;
        // Expired windows are dropped at most once a second, not on every
        // check: a full sweep under the lock on each request would let a
        // flood of distinct keys slow every check down.
        if windows.len() >= LOCAL_SWEEP_AT && now.duration_since(*swept) >= SWEEP_EVERY {
            *swept = now;
            windows.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        }
        // A key seen before (every hit after a session's first) is counted
        // without copying it.
        let entry = match windows.get_mut(key) {
            Some(entry) => entry,
            None => windows.entry(key.to_owned()).or_insert((now, 0)),
        };
        if now.duration_since(entry.0) >= limit.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if entry.1 <= limit.max {
            Decision::Allowed
        } else {
            Decision::Limited {
                retry_after: limit.window.saturating_sub(now.duration_since(entry.0)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_window_limits_and_resets() {
        let rl = RateLimiter::local("t:");
        let limit = Limit {
            max: 2,
            window: Duration::from_millis(200),
        };
        assert_eq!(rl.check("a", limit).await, Decision::Allowed);
        assert_eq!(rl.check("a", limit).await, Decision::Allowed);
        assert!(matches!(
            rl.check("a", limit).await,
            Decision::Limited { .. }
        ));
        assert_eq!(
            rl.check("b", limit).await,
            Decision::Allowed,
            "keys are independent"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(rl.check("a", limit).await, Decision::Allowed);
        assert_eq!(
            rl.check("a", Limit::per_second(0)).await,
            Decision::Allowed,
            "0 disables"
        );
    }
}
