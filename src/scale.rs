//! [`SseScale`]: the whole toolkit wired in one value — the broadcaster,
//! the control bus, the flag source and (with Redis) the shared client —
//! built from the environment ([`SseScale::from_env`]) or a [`Builder`].
//!
//! It owns everything it starts: its tasks run on a stop signal of its own
//! (the application's shutdown never reaches in), the process's node id is
//! generated here (unique per process, so two processes never take each
//! other's Redis messages for their own), and [`SseScale::shutdown`] stops
//! it all in the order that loses nothing: pending events out first, then
//! the brokers, then the Redis client.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // REDIS_URL set → Redis broker (flag from FF_REDIS_SSE_BROADCAST);
//! // unset → in-process only.
//! let scale = sse_scale::SseScale::from_env()?;
//! let session = sse_scale::SessionId::parse("abc")?;
//! let event = sse_scale::OutgoingEvent::new(
//!     sse_scale::EventType::from_static("stage_start"),
//!     r#"{"stage":"draft"}"#,
//! );
//! scale.broadcaster().publish(&session, event).await?;
//! scale.shutdown().await;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broadcaster::Broadcaster;
use crate::control::{ControlBus, LoopbackBus};
use crate::event::SessionId;
use crate::fanout::{Fanout, FanoutSettings};
use crate::flags::{EnvFlags, FlagSource, REDIS_SSE_BROADCAST};
use crate::history::HistoryLimits;
use crate::resume::StreamOptions;
use crate::stream::CloseSignal;

/// Why the toolkit could not be built. Names the setting at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("{var}: {message}")]
    Invalid { var: &'static str, message: String },
    #[error("SseScale must be built inside a tokio runtime")]
    NoRuntime,
    #[error("{0}")]
    Flags(String),
}

fn invalid(var: &'static str, message: impl Into<String>) -> BuildError {
    BuildError::Invalid {
        var,
        message: message.into(),
    }
}

/// Settings of an [`SseScale`]; every one has a default for one instance.
#[derive(Clone)]
#[must_use]
pub struct Builder {
    fanout: FanoutSettings,
    instance_id: Option<String>,
    flag: Option<bool>,
    flags: Option<Arc<dyn FlagSource>>,
    heartbeat: Duration,
    retry: Duration,
    drain_window: Duration,
    #[cfg(feature = "redis")]
    redis: Option<RedisOptions>,
    #[cfg(feature = "unleash")]
    unleash: Option<crate::unleash::UnleashSettings>,
}

#[cfg(feature = "redis")]
#[derive(Clone)]
struct RedisOptions {
    url: String,
    prefix: String,
    outbox_max: usize,
    /// Events cross instances through Redis (false: the client is only
    /// for the application, broadcasting stays in process).
    broker: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            fanout: FanoutSettings::default(),
            instance_id: None,
            flag: None,
            flags: None,
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            drain_window: Duration::from_secs(10),
            #[cfg(feature = "redis")]
            redis: None,
            #[cfg(feature = "unleash")]
            unleash: None,
        }
    }
}

impl Builder {
    /// Events a stream may fall behind before it is cut (it then
    /// reconnects and resumes).
    pub fn queue(mut self, events: usize) -> Self {
        self.fanout.queue = events;
        self
    }

    /// Per-session history for `Last-Event-ID` resume.
    pub fn history(mut self, limits: HistoryLimits) -> Self {
        self.fanout.history = limits;
        self
    }

    /// Encoded bytes one resume may replay (beyond: `reset`).
    pub fn replay_max_bytes(mut self, bytes: usize) -> Self {
        self.fanout.replay_max_bytes = bytes;
        self
    }

    /// This instance's name: in the `connected` event and, with a random
    /// suffix, in the node id on the Redis wire.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// The value of `FF_REDIS_SSE_BROADCAST` (default off; with Unleash,
    /// the value until Unleash first answers).
    pub fn flag(mut self, on: bool) -> Self {
        self.flag = Some(on);
        self
    }

    /// A flag source of the application's own (replaces the flag value and
    /// Unleash).
    pub fn flag_source(mut self, flags: Arc<dyn FlagSource>) -> Self {
        self.flags = Some(flags);
        self
    }

    /// Comment heartbeats on open streams (keeps proxies from timing out).
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// The `retry:` hint sent when a stream opens.
    pub fn retry(mut self, delay: Duration) -> Self {
        self.retry = delay;
        self
    }

    /// On [`SseScale::start_drain`], open streams close at random moments
    /// over this window, so their reconnects spread out.
    pub fn drain_window(mut self, window: Duration) -> Self {
        self.drain_window = window;
        self
    }

    /// Fan out across instances through Redis at `url`
    /// (`redis://[:password@]host:port[/db]`, or `rediss://`).
    #[cfg(feature = "redis")]
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        let options = self.redis.get_or_insert_with(|| RedisOptions {
            url: String::new(),
            prefix: "sse:".into(),
            outbox_max: 10_000,
            broker: true,
        });
        options.url = url.into();
        self
    }

    /// Prefix of every Redis key and channel (default `sse:`).
    #[cfg(feature = "redis")]
    pub fn redis_prefix(mut self, prefix: impl Into<String>) -> Self {
        if let Some(options) = &mut self.redis {
            options.prefix = prefix.into();
        }
        self
    }

    /// Keep the Redis client (for the application's own use, such as rate
    /// limits) but broadcast in process only: phase 1 with Redis around.
    #[cfg(feature = "redis")]
    pub fn local_broadcast(mut self) -> Self {
        if let Some(options) = &mut self.redis {
            options.broker = false;
        }
        self
    }

    /// Events held while Redis is unreachable (default 10,000).
    #[cfg(feature = "redis")]
    pub fn outbox_max(mut self, events: usize) -> Self {
        if let Some(options) = &mut self.redis {
            options.outbox_max = events;
        }
        self
    }

    /// Take `FF_REDIS_SSE_BROADCAST` from an Unleash server.
    #[cfg(feature = "unleash")]
    pub fn unleash(mut self, settings: crate::unleash::UnleashSettings) -> Self {
        self.unleash = Some(settings);
        self
    }

    /// Starts the toolkit. Must run inside a tokio runtime.
    pub fn build(self) -> Result<SseScale, BuildError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BuildError::NoRuntime);
        }
        let instance_id = self
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", std::process::id(), rand::random::<u16>()));
        let node_id = format!("{instance_id}#{:08x}", rand::random::<u32>());
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let flags = self.start_flags(&instance_id, &tasks, &stop)?;
        let drain = CancellationToken::new();
        let close = CloseSignal {
            token: drain.clone(),
            window: self.drain_window,
            retry: self.retry,
        };
        #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
        let mut scale = SseScale {
            broadcaster: Arc::new(Fanout::memory(self.fanout.clone())),
            control: Arc::new(LoopbackBus::default()),
            flags,
            instance_id,
            node_id,
            heartbeat: self.heartbeat,
            close,
            drain,
            stop,
            tasks,
            #[cfg(feature = "redis")]
            redis: None,
        };
        #[cfg(feature = "redis")]
        if let Some(options) = &self.redis {
            scale.start_redis(options, self.fanout.clone())?;
        }
        Ok(scale)
    }

    fn start_flags(
        &self,
        _instance_id: &str,
        _tasks: &TaskTracker,
        _stop: &CancellationToken,
    ) -> Result<Arc<dyn FlagSource>, BuildError> {
        if let Some(flags) = &self.flags {
            return Ok(flags.clone());
        }
        #[cfg(feature = "unleash")]
        if let Some(settings) = &self.unleash {
            let mut settings = settings.clone();
            settings.env_value = settings.env_value.or(self.flag);
            if settings.instance_id.is_empty() {
                settings.instance_id = _instance_id.to_owned();
            }
            let flags = crate::unleash::UnleashFlags::start(settings, _tasks, _stop.clone())
                .map_err(|e| BuildError::Flags(format!("{e:#}")))?;
            return Ok(Arc::new(flags));
        }
        Ok(Arc::new(EnvFlags::new(self.flag)))
    }
}

/// The toolkit, built. See the module docs.
pub struct SseScale {
    broadcaster: Arc<dyn Broadcaster>,
    control: Arc<dyn ControlBus>,
    flags: Arc<dyn FlagSource>,
    instance_id: String,
    node_id: String,
    heartbeat: Duration,
    close: CloseSignal,
    drain: CancellationToken,
    /// Stops the tasks this value started (flag polling, Redis connect and
    /// probes) — never the application's.
    stop: CancellationToken,
    tasks: TaskTracker,
    #[cfg(feature = "redis")]
    redis: Option<crate::redis_client::SharedRedis>,
}

impl SseScale {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Builds from the environment: `REDIS_URL` (Redis mode when set, unless
    /// `SSE_ADAPTER=memory`), `REDIS_PREFIX`, `FF_REDIS_SSE_BROADCAST`,
    /// `INSTANCE_ID`, `HISTORY_MAXLEN`, `HISTORY_TTL_SECS`,
    /// `HISTORY_MEMORY_MB`, `SSE_CLIENT_QUEUE`, `REPLAY_MAX_BYTES`,
    /// `OUTBOX_MAX`, `SSE_HEARTBEAT_SECS`, `SSE_RETRY_MS`,
    /// `SHUTDOWN_DRAIN_SECS`, and `UNLEASH_URL` with `UNLEASH_API_TOKEN`,
    /// `UNLEASH_APP_NAME`, `UNLEASH_INSTANCE_ID`, `UNLEASH_REFRESH_SECS`.
    /// A bad value is an error naming the variable.
    pub fn from_env() -> Result<SseScale, BuildError> {
        Builder::from_env()?.build()
    }

    /// The one interface every route publishes and subscribes through.
    pub fn broadcaster(&self) -> Arc<dyn Broadcaster> {
        self.broadcaster.clone()
    }

    /// Messages to the instance that owns something.
    pub fn control(&self) -> Arc<dyn ControlBus> {
        self.control.clone()
    }

    /// The flag source deciding which publishes cross instances.
    pub fn flags(&self) -> Arc<dyn FlagSource> {
        self.flags.clone()
    }

    /// The process's shared Redis client, for the application's own use
    /// (rate limits, caches): one connection for everything.
    #[cfg(feature = "redis")]
    pub fn redis(&self) -> Option<&crate::redis_client::SharedRedis> {
        self.redis.as_ref()
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// This process's unique name on the Redis wire.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// How streams opened through this value behave: heartbeats, `retry:`,
    /// the drain, and `instance_id` in `connected`.
    pub fn stream_options(&self) -> StreamOptions {
        let mut options = StreamOptions::new(self.close.clone());
        options.heartbeat = self.heartbeat;
        options.retry = self.close.retry;
        options
            .connected
            .insert("instance_id".into(), self.instance_id.clone().into());
        options
    }

    /// Opens the SSE body of `session`, resuming after `last_event_id`
    /// (see [`open_stream`](crate::open_stream)).
    pub async fn open_stream(
        &self,
        session: &SessionId,
        last_event_id: Option<crate::EventId>,
    ) -> Result<(crate::SseStream, crate::ResumeOutcome), crate::BroadcastError> {
        crate::resume::open_stream(
            self.broadcaster.as_ref(),
            session,
            last_event_id,
            self.stream_options(),
        )
        .await
    }

    /// Starts draining: open streams close spread over the drain window,
    /// each after a jittered `retry:` hint. Publishing keeps working.
    pub fn start_drain(&self) {
        self.drain.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// The drain window streams close over.
    pub fn drain_window(&self) -> Duration {
        self.close.window
    }

    /// Stops everything this value started, in order: pending events are
    /// published, the brokers and the control bus close, then flag polling
    /// and the Redis client stop. Call it after the application's own work
    /// (such as background jobs that publish their last events) is done.
    pub async fn shutdown(&self) {
        self.broadcaster.shutdown().await;
        self.control.shutdown().await;
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    #[cfg(feature = "redis")]
    fn start_redis(
        &mut self,
        options: &RedisOptions,
        fanout: FanoutSettings,
    ) -> Result<(), BuildError> {
        use crate::broker::redis::{RedisBroker, RedisSettings};
        use crate::control::RedisControlBus;
        use crate::redis_client::SharedRedis;

        let redis =
            SharedRedis::open(&options.url).map_err(|e| invalid("REDIS_URL", e.to_string()))?;
        redis.connect(&self.tasks, self.stop.clone());
        self.redis = Some(redis.clone());
        if !options.broker {
            return Ok(());
        }
        let mut settings = RedisSettings::new(&options.prefix, &self.node_id);
        settings.outbox_max = options.outbox_max;
        settings.history = fanout.history;
        let broker_redis = redis.clone();
        self.broadcaster = Arc::new(Fanout::with_remote(
            fanout,
            self.flags.clone(),
            |local, handler| RedisBroker::start(broker_redis, settings, local, handler),
        ));
        self.control = Arc::new(RedisControlBus::start(redis.clone(), &options.prefix));
        let state = self.flags.state();
        if !state.enabled {
            tracing::info!(
                backend = "redis",
                flag = REDIS_SSE_BROADCAST,
                source = %state.source,
                "Redis is configured and subscribed, but the flag is off: publishes stay on this instance until it is turned on"
            );
        }
        Ok(())
    }
}

impl Builder {
    /// Reads the settings [`SseScale::from_env`] documents.
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
        if let Some(n) = num("SSE_HEARTBEAT_SECS")? {
            b = b.heartbeat(Duration::from_secs(n.max(1)));
        }
        if let Some(n) = num("SSE_RETRY_MS")? {
            b = b.retry(Duration::from_millis(n));
        }
        if let Some(n) = num("SHUTDOWN_DRAIN_SECS")? {
            b = b.drain_window(Duration::from_secs(n));
        }
        let adapter = var("SSE_ADAPTER");
        match (adapter.as_deref(), var("REDIS_URL")) {
            (Some("memory") | None, None) => {}
            #[cfg(feature = "redis")]
            (Some("redis" | "memory") | None, Some(url)) => {
                b = b.redis(url);
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
            (Some("redis") | None, Some(_)) => {
                return Err(invalid(
                    "REDIS_URL",
                    "this build has no Redis support (feature `redis`)",
                ))
            }
            (Some("redis"), None) => return Err(invalid("SSE_ADAPTER", "redis needs REDIS_URL")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builds_in_memory_with_a_unique_node_id() {
        let a = SseScale::builder().instance_id("web-1").build().unwrap();
        let b = SseScale::builder().instance_id("web-1").build().unwrap();
        assert_ne!(a.node_id(), b.node_id());
        assert!(a.node_id().starts_with("web-1#"));
        assert_eq!(a.broadcaster().stats().mode, "local");
        assert!(!a.control().reaches_others());
        a.shutdown().await;
        b.shutdown().await;
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_environment_is_checked_and_named() {
        let err = |pairs| match Builder::from_lookup(env(pairs)) {
            Err(BuildError::Invalid { var, .. }) => var,
            other => panic!("expected an error, got {:?}", other.map(|_| ())),
        };
        assert_eq!(err(&[("HISTORY_MAXLEN", "many")]), "HISTORY_MAXLEN");
        assert_eq!(
            err(&[("FF_REDIS_SSE_BROADCAST", "maybe")]),
            "FF_REDIS_SSE_BROADCAST"
        );
        assert_eq!(err(&[("SSE_ADAPTER", "kafka")]), "SSE_ADAPTER");
        assert_eq!(err(&[("SSE_ADAPTER", "redis")]), "SSE_ADAPTER");
        let b = Builder::from_lookup(env(&[
            ("REPLAY_MAX_BYTES", "1024"),
            ("FF_REDIS_SSE_BROADCAST", "on"),
        ]))
        .unwrap();
        assert_eq!(b.fanout.replay_max_bytes, 1024);
        assert_eq!(b.flag, Some(true));
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn a_redis_url_gives_redis_mode_and_a_shared_client() {
        // Nothing needs to listen there: the client connects in the
        // background and the build does not wait for it.
        let scale = Builder::from_lookup(env(&[("REDIS_URL", "redis://127.0.0.1:1")]))
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(scale.broadcaster().stats().mode, "redis");
        assert!(scale.redis().is_some());
        assert!(scale.control().reaches_others());
        let memory = Builder::from_lookup(env(&[
            ("REDIS_URL", "redis://127.0.0.1:1"),
            ("SSE_ADAPTER", "memory"),
        ]))
        .unwrap()
        .build()
        .unwrap();
        assert_eq!(memory.broadcaster().stats().mode, "local");
        assert!(memory.redis().is_some(), "kept for the application");
        assert!(matches!(
            Builder::from_lookup(env(&[("REDIS_URL", "http://x")]))
                .unwrap()
                .build(),
            Err(BuildError::Invalid {
                var: "REDIS_URL",
                ..
            })
        ));
    }

    #[test]
    fn refuses_to_build_outside_a_runtime() {
        assert!(matches!(
            SseScale::builder().build(),
            Err(BuildError::NoRuntime)
        ));
    }
}
