//! The environment variables [`SseScale::from_env`](crate::SseScale::from_env)(super::SseScale::from_env)
//! reads, turned into a [`Builder`].

use std::time::Duration;

use super::{invalid, BuildError, Builder};
use crate::flags::REDIS_SSE_BROADCAST;
use crate::history::HistoryLimits;

impl Builder {
    /// Reads the settings [`SseScale::from_env`](crate::SseScale::from_env) documents.
    pub fn from_env() -> Result<Builder, BuildError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`Builder::from_env`], reading each variable through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Builder, BuildError> {
        let mut b = Builder::default();
        let var = |name: &'static str| lookup(name).filter(|v| !v.is_empty());
        fn number(name: &'static str, raw: &str) -> Result<u64, BuildError> {
            raw.trim()
                .parse()
                .map_err(|_| invalid(name, format!("not a number: {raw:?}")))
        }
        let num = |name: &'static str| var(name).map(|v| number(name, &v)).transpose();
        if let Some(id) = var("INSTANCE_ID") {
            b = b.instance_id(id);
        }
        if let Some(raw) = var(REDIS_SSE_BROADCAST) {
            let on = match raw.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" => false,
                _ => {
                    return Err(invalid(
                        REDIS_SSE_BROADCAST,
                        format!("not a boolean: {raw:?}"),
                    ))
                }
            };
            b = b.flag(on);
        }
        let mut history = HistoryLimits::default();
        if let Some(n) = num("HISTORY_MAXLEN")? {
            history.maxlen = n.max(1) as usize;
        }
        if let Some(n) = num("HISTORY_TTL_SECS")? {
            history.ttl = Duration::from_secs(n.max(1));
        }
        if let Some(n) = num("HISTORY_MEMORY_MB")? {
            history.max_bytes = (n as usize).saturating_mul(1 << 20);
        }
        b = b.history(history);
        if let Some(n) = num("SSE_CLIENT_QUEUE")? {
            b = b.queue(n.max(1) as usize);
        }
        if let Some(n) = num("REPLAY_MAX_BYTES")? {
            b = b.replay_max_bytes(n as usize);
        }
        if let Some(n) = num("REPLAY_BUDGET_MB")? {
            b = b.replay_budget((n as usize).saturating_mul(1 << 20));
        }
        if let Some(n) = num("SSE_HEARTBEAT_SECS")? {
            b = b.heartbeat(Duration::from_secs(n.max(1)));
        }
        if let Some(n) = num("SSE_RETRY_MS")? {
            b = b.retry(Duration::from_millis(n));
        }
        if let Some(n) = num("SSE_RESUME_RATE")? {
            // 0 turns the herd-wide spread off.
            b = b.resume_rate(std::num::NonZeroU32::new(n.min(u64::from(u32::MAX)) as u32));
        }
        if let Some(n) = num("SHUTDOWN_DRAIN_SECS")? {
            b = b.drain_window(Duration::from_secs(n));
        }
        let adapter = var("SSE_ADAPTER");
        let topology = redis_topology(&var)?;
        match (adapter.as_deref(), topology) {
            (Some("memory") | None, None) => {}
            #[cfg(feature = "redis")]
            (Some("redis" | "memory") | None, Some(topology)) => {
                b = b.redis_topology(topology);
                if let Some(prefix) = var("REDIS_PREFIX") {
                    b = b.redis_prefix(prefix);
                }
                if let Some(n) = num("OUTBOX_MAX")? {
                    b = b.outbox_max(n as usize);
                }
                if adapter.as_deref() == Some("memory") {
                    b = b.local_broadcast();
                }
            }
            #[cfg(not(feature = "redis"))]
            (Some("memory"), Some(_)) => {}
            #[cfg(not(feature = "redis"))]
            (Some("redis") | None, Some(variable)) => {
                return Err(invalid(
                    variable,
                    "this build has no Redis support (feature `redis`)",
                ))
            }
            (Some("redis"), None) => {
                return Err(invalid(
                    "SSE_ADAPTER",
                    "redis needs REDIS_URL, REDIS_CLUSTER_NODES or REDIS_SENTINEL_NODES",
                ))
            }
            (Some(other), _) => {
                return Err(invalid(
                    "SSE_ADAPTER",
                    format!("{other:?} is not memory or redis"),
                ))
            }
        }
        #[cfg(feature = "unleash")]
        if let Some(url) = var("UNLEASH_URL") {
            let app = var("UNLEASH_APP_NAME").unwrap_or_else(|| "sse-scale".into());
            let mut settings = crate::unleash::UnleashSettings::new(url, app);
            settings.api_token = var("UNLEASH_API_TOKEN");
            if settings.api_token.is_none() {
                return Err(invalid("UNLEASH_API_TOKEN", "needed with UNLEASH_URL"));
            }
            settings.instance_id = var("UNLEASH_INSTANCE_ID").unwrap_or_default();
            if let Some(n) = num("UNLEASH_REFRESH_SECS")? {
                settings.refresh = Duration::from_secs(n.max(1));
            }
            b = b.unleash(settings);
        }
        Ok(b)
    }
}

/// The Redis topology the variables name (at most one of `REDIS_URL`,
/// `REDIS_CLUSTER_NODES`, `REDIS_SENTINEL_NODES`).
#[cfg(feature = "redis")]
fn redis_topology(
    var: &impl Fn(&'static str) -> Option<String>,
) -> Result<Option<crate::redis_client::Topology>, BuildError> {
    crate::redis_client::Topology::from_settings(
        var("REDIS_URL").as_deref(),
        var("REDIS_CLUSTER_NODES").as_deref(),
        var("REDIS_SENTINEL_NODES").as_deref(),
        var("REDIS_SENTINEL_MASTER").as_deref(),
    )
    .map_err(|e| invalid(e.variable, e.message))
}

/// Without Redis support: the first Redis variable that is set, to refuse.
#[cfg(not(feature = "redis"))]
fn redis_topology(
    var: &impl Fn(&'static str) -> Option<String>,
) -> Result<Option<&'static str>, BuildError> {
    Ok(["REDIS_URL", "REDIS_CLUSTER_NODES", "REDIS_SENTINEL_NODES"]
        .into_iter()
        .find(|name| var(name).is_some()))
}
