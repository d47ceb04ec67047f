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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::redis_client::{SharedRedis, RESPONSE_TIMEOUT};

/// Returns `{count, pttl}` after counting one hit in the window.
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
    redis: Option<SharedRedis>,
    prefix: String,
    script: redis::Script,
    local: Mutex<HashMap<String, (Instant, u64)>>,
    /// Set while Redis is failing, so the fallback is logged once per outage.
    fallback: AtomicBool,
    /// Checks answered in process because Redis was unreachable.
    pub fallback_checks: AtomicU64,
}

impl RateLimiter {
    /// `redis` is the process's shared client, if any; keys are
    /// `<prefix>rl:<key>`.
    pub fn new(redis: Option<SharedRedis>, prefix: &str) -> Self {
        Self {
            redis,
            prefix: format!("{prefix}rl:"),
            script: redis::Script::new(WINDOW_SCRIPT),
            local: Mutex::new(HashMap::new()),
            fallback: AtomicBool::new(false),
            fallback_checks: AtomicU64::new(0),
        }
    }

    /// Counts one hit for `key` against `limit`.
    pub async fn check(&self, key: &str, limit: Limit) -> Decision {
        if limit.max == 0 {
            return Decision::Allowed;
        }
        if let Some(redis) = &self.redis {
            match self.check_redis(redis, key, limit).await {
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
                            error,
                            "rate limiting falls back to in-process counting"
                        );
                    }
                }
            }
        }
        self.check_local(key, limit)
    }

    async fn check_redis(
        &self,
        redis: &SharedRedis,
        key: &str,
        limit: Limit,
    ) -> Result<Decision, String> {
        let mut conn = redis.conn().ok_or("not connected")?;
        let mut call = self.script.key(format!("{}{key}", self.prefix));
        call.arg(limit.window.as_millis() as u64);
        let (count, ttl_ms): (u64, i64) =
            tokio::time::timeout(RESPONSE_TIMEOUT, call.invoke_async(&mut conn))
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .inspect_err(|_| redis.report_failure())?;
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
        let mut windows = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if windows.len() >= LOCAL_SWEEP_AT {
            windows.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        }
        let entry = windows.entry(key.to_owned()).or_insert((now, 0));
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
        let rl = RateLimiter::new(None, "t:");
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
