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

mod builder;
mod env;

pub use builder::Builder;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broadcaster::{BroadcastError, Broadcaster};
use crate::control::ControlBus;
use crate::event::{EventId, SessionId};
#[cfg(feature = "redis")]
use crate::fanout::{Fanout, FanoutSettings};
use crate::flags::FlagSource;
#[cfg(feature = "redis")]
use crate::flags::REDIS_SSE_BROADCAST;
use crate::resume::{ResumeOutcome, StreamOptions};
use crate::stream::{CloseSignal, SseStream};

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

pub(crate) fn invalid(var: &'static str, message: impl Into<String>) -> BuildError {
    BuildError::Invalid {
        var,
        message: message.into(),
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
    retry: crate::retry::RetryPolicy,
    close: CloseSignal,
    /// What every stream's unsent replay shares.
    replay_budget: crate::ReplayBudget,
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

    /// Builds from the environment: `REDIS_URL`, or `REDIS_CLUSTER_NODES`,
    /// or `REDIS_SENTINEL_NODES` with `REDIS_SENTINEL_MASTER` (Redis mode
    /// when one is set, unless `SSE_ADAPTER=memory`), `REDIS_PREFIX`, `FF_REDIS_SSE_BROADCAST`,
    /// `INSTANCE_ID`, `HISTORY_MAXLEN`, `HISTORY_TTL_SECS`,
    /// `HISTORY_MEMORY_MB`, `SSE_CLIENT_QUEUE`, `REPLAY_MAX_BYTES`, `REPLAY_BUDGET_MB`,
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
        options.retry = self.retry.base;
        options.resume_rate = self.retry.resume_rate;
        options
            .connected
            .insert("instance_id".into(), self.instance_id.clone().into());
        // The client's liveness check: a stream silent for much longer is
        // taken for dead.
        let heartbeat_ms = u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX);
        options
            .connected
            .insert("heartbeat_ms".into(), heartbeat_ms.into());
        options.replay_budget = Some(self.replay_budget.clone());
        options
    }

    /// What every stream's unsent replay shares (`REPLAY_BUDGET_MB`): a
    /// budget [`within`](crate::ReplayBudget::within) it bounds one client's
    /// share ([`SseScale::open_stream_within`]).
    pub fn replay_budget(&self) -> &crate::ReplayBudget {
        &self.replay_budget
    }

    /// Opens the SSE body of `session`, resuming after `last_event_id`
    /// (see [`open_stream`](crate::open_stream)).
    pub async fn open_stream(
        &self,
        session: &SessionId,
        last_event_id: Option<EventId>,
    ) -> Result<(SseStream, ResumeOutcome), BroadcastError> {
        crate::resume::open_stream(
            self.broadcaster.as_ref(),
            session,
            last_event_id,
            self.stream_options(),
        )
        .await
    }

    /// As [`SseScale::open_stream`], the replay charged to `budget` (one
    /// made within [`SseScale::replay_budget`], say one per client address)
    /// instead of the instance's alone.
    pub async fn open_stream_within(
        &self,
        session: &SessionId,
        last_event_id: Option<EventId>,
        budget: crate::ReplayBudget,
    ) -> Result<(SseStream, ResumeOutcome), BroadcastError> {
        let mut options = self.stream_options();
        options.replay_budget = Some(budget);
        crate::resume::open_stream(self.broadcaster.as_ref(), session, last_event_id, options).await
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
        redis: crate::redis_client::SharedRedis,
        options: &builder::RedisOptions,
        fanout: FanoutSettings,
    ) {
        use crate::broker::redis::{RedisBroker, RedisSettings};
        use crate::control::RedisControlBus;

        self.redis = Some(redis.clone());
        if !options.broker {
            return;
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
        // A bad URL is refused when the variables are read.
        assert!(matches!(
            Builder::from_lookup(env(&[("REDIS_URL", "http://x")])),
            Err(BuildError::Invalid {
                var: "REDIS_URL",
                ..
            })
        ));
        assert!(matches!(
            Builder::from_lookup(env(&[
                ("REDIS_URL", "redis://127.0.0.1:1"),
                ("REDIS_SENTINEL_NODES", "redis://127.0.0.1:2"),
                ("REDIS_SENTINEL_MASTER", "m"),
            ])),
            Err(BuildError::Invalid {
                var: "REDIS_SENTINEL_NODES",
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
