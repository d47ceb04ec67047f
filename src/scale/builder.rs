//! [`Builder`]: the settings of an [`SseScale`] and the start-up that wires
//! the parts.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{BuildError, SseScale};
use crate::control::LoopbackBus;
use crate::fanout::{Fanout, FanoutSettings};
use crate::flags::{EnvFlags, FlagSource};
use crate::history::HistoryLimits;
use crate::stream::CloseSignal;

/// The shared Redis client and key prefix the flag source may keep its
/// last-known configuration under.
#[cfg(feature = "redis")]
type LastKnownStore = (crate::redis_client::SharedRedis, String);
#[cfg(not(feature = "redis"))]
type LastKnownStore = ();

/// [`Builder::replay_budget`]'s default: 16 replays of `REPLAY_MAX_BYTES`.
pub const DEFAULT_REPLAY_BUDGET: usize = 64 << 20;

/// Settings of an [`SseScale`]; every one has a default for one instance.
#[derive(Clone)]
#[must_use]
pub struct Builder {
    pub(super) fanout: FanoutSettings,
    instance_id: Option<String>,
    pub(super) flag: Option<bool>,
    flags: Option<Arc<dyn FlagSource>>,
    heartbeat: Duration,
    retry: crate::retry::RetryPolicy,
    drain_window: Duration,
    replay_budget: usize,
    #[cfg(feature = "redis")]
    redis: Option<RedisOptions>,
    #[cfg(feature = "unleash")]
    unleash: Option<crate::unleash::UnleashSettings>,
}

#[cfg(feature = "redis")]
#[derive(Clone)]
pub(super) struct RedisOptions {
    pub(super) topology: crate::redis_client::Topology,
    pub(super) prefix: String,
    pub(super) outbox_max: usize,
    /// Events cross instances through Redis (false: the client is only
    /// for the application, broadcasting stays in process).
    pub(super) broker: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            fanout: FanoutSettings::default(),
            instance_id: None,
            flag: None,
            flags: None,
            heartbeat: Duration::from_secs(15),
            retry: crate::retry::RetryPolicy::DEFAULT,
            drain_window: Duration::from_secs(10),
            replay_budget: DEFAULT_REPLAY_BUDGET,
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

    /// Bytes of replayed history this instance's streams may hold unsent at
    /// once (default 64 MiB); a resume whose replay does not fit is
    /// answered `reset`. See [`ReplayBudget`](crate::ReplayBudget).
    pub fn replay_budget(mut self, bytes: usize) -> Self {
        self.replay_budget = bytes;
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

    /// Comment heartbeats on open streams (keeps proxies from timing out):
    /// one after every `every` in which no event went out.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// The `retry:` hint sent when a stream opens: this plus a random
    /// extra (see [`resume_rate`](Self::resume_rate)).
    pub fn retry(mut self, delay: Duration) -> Self {
        self.retry.base = delay;
        self
    }

    /// The resumes per second this instance's clients are spread to when
    /// they all reconnect at once (default 2,000): a stream's `retry:`
    /// extra is drawn from up to `open streams / rate` seconds, and at
    /// least half the base. `None`: half the base, whatever the number of
    /// streams. `docs/delivery.md` says how streams come back after a drain.
    pub fn resume_rate(mut self, rate: Option<std::num::NonZeroU32>) -> Self {
        self.retry.resume_rate = rate;
        self
    }

    /// On [`SseScale::start_drain`], open streams close at random moments
    /// over this window, so their reconnects spread out.
    pub fn drain_window(mut self, window: Duration) -> Self {
        self.drain_window = window;
        self
    }

    /// Fan out across instances through the Redis server at `url`
    /// (`redis://[:password@]host:port[/db]`, or `rediss://`).
    #[cfg(feature = "redis")]
    pub fn redis(self, url: impl Into<String>) -> Self {
        self.redis_topology(crate::redis_client::Topology::Single(url.into()))
    }

    /// Fan out across instances through Redis in any topology: one
    /// server, a Redis Cluster (sharded Pub/Sub) or Sentinel.
    #[cfg(feature = "redis")]
    pub fn redis_topology(mut self, topology: crate::redis_client::Topology) -> Self {
        let options = self.redis.get_or_insert_with(|| RedisOptions {
            topology: topology.clone(),
            prefix: "sse:".into(),
            outbox_max: 10_000,
            broker: true,
        });
        options.topology = topology;
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
        // The Redis client first: the flag source keeps its last-known
        // configuration there.
        #[cfg(feature = "redis")]
        let redis = match &self.redis {
            Some(options) => {
                let redis =
                    crate::redis_client::SharedRedis::with_topology(options.topology.clone())
                        .map_err(|e| super::invalid(options.topology.variable(), e.to_string()))?;
                redis.connect(&tasks, stop.clone());
                Some((redis, options.clone()))
            }
            None => None,
        };
        #[cfg(feature = "redis")]
        let store = redis.as_ref().map(|(r, o)| (r.clone(), o.prefix.clone()));
        #[cfg(not(feature = "redis"))]
        let store = None::<()>;
        let flags = self.start_flags(&instance_id, &tasks, &stop, store)?;
        let drain = CancellationToken::new();
        let close = CloseSignal {
            token: drain.clone(),
            window: self.drain_window,
            retry: self.retry.base,
        };
        #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
        let mut scale = SseScale {
            broadcaster: Arc::new(Fanout::memory(self.fanout.clone())),
            control: Arc::new(LoopbackBus::default()),
            flags,
            instance_id,
            node_id,
            heartbeat: self.heartbeat,
            retry: self.retry,
            close,
            replay_budget: crate::ReplayBudget::new(self.replay_budget),
            drain,
            stop,
            tasks,
            #[cfg(feature = "redis")]
            redis: None,
        };
        #[cfg(feature = "redis")]
        if let Some((client, options)) = redis {
            scale.start_redis(client, &options, self.fanout.clone());
        }
        Ok(scale)
    }

    fn start_flags(
        &self,
        _instance_id: &str,
        _tasks: &TaskTracker,
        _stop: &CancellationToken,
        _store: Option<LastKnownStore>,
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
            #[cfg(feature = "redis")]
            if let (None, Some((redis, prefix))) = (&settings.last_known, _store) {
                settings.last_known = Some(Arc::new(crate::unleash::RedisLastKnown::new(
                    redis, &prefix,
                )));
            }
            let flags = crate::unleash::UnleashFlags::start(settings, _tasks, _stop.clone())
                .map_err(|e| BuildError::Flags(format!("{e:#}")))?;
            return Ok(Arc::new(flags));
        }
        Ok(Arc::new(EnvFlags::new(self.flag)))
    }
}
