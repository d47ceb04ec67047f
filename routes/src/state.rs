//! [`AppState`]: what every handler shares — the broadcaster and the
//! control bus (as traits), the flag source, the rate limiter, the token
//! signer, the pipeline runs, and the shutdown machinery that owns every
//! spawned task.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::admission::Admission;
use sse_scale::flags::FlagSource;
use sse_scale::ratelimit::{Decision, Limit, RateLimiter};
use sse_scale::StreamEnd;
use sse_scale::{
    Broadcaster, ControlBus, EventId, OutgoingEvent, SessionId, SseScale, TokenSigner,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::affinity::Affinity;
use crate::config::Config;
use crate::error::AppError;
use crate::runs::Runs;

/// What `main` builds before the state: the toolkit (built through its
/// public builder, as any application would) and the services around it.
pub struct Services {
    pub scale: Arc<SseScale>,
    /// Built on the toolkit's shared Redis client when there is one.
    pub limiter: RateLimiter,
    pub signer: TokenSigner,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

pub struct AppState {
    /// The toolkit: streams open through it (resume, drain, heartbeats).
    pub scale: Arc<SseScale>,
    /// The one path every route publishes and subscribes through.
    pub broadcaster: Arc<dyn Broadcaster>,
    pub control: Arc<dyn ControlBus>,
    /// Decides per publish whether an event also goes through Redis.
    pub flags: Arc<dyn FlagSource>,
    pub limiter: RateLimiter,
    pub signer: TokenSigner,
    /// Pipeline runs executing on this instance, and the gate relay.
    pub runs: Arc<Runs>,
    /// Owns every task spawned on behalf of a request, so shutdown can wait
    /// for them.
    pub tasks: TaskTracker,
    /// Open streams per client address (IPv6 per /64), for
    /// `MAX_STREAMS_PER_ADDRESS`.
    /// Their replays share the address's budget (`REPLAY_BUDGET_PER_ADDRESS_MB`).
    pub streams_by_address:
        std::sync::Mutex<std::collections::HashMap<IpAddr, (usize, sse_scale::ReplayBudget)>>,
    /// Connections per address and in all (`MAX_CONNECTIONS_PER_ADDRESS`,
    /// `MAX_CONNECTIONS`).
    pub admission: Arc<Admission>,
    /// What the configuration fixed at start-up.
    pub settings: Settings,
    /// What `/stats` and `/metrics` count.
    pub counters: Counters,
    /// Where shutdown stands.
    pub drain: Drain,
}

/// The instance's settings, fixed at start-up.
pub struct Settings {
    pub publish_limit: Limit,
    pub stream_limit: Limit,
    pub session_limit: Limit,
    /// Runs one session and one client address may have executing at once.
    pub run_shares: crate::runs::Shares,
    /// The longest a run may last (`MAX_RUN_SECS`).
    pub max_run: Duration,
    /// `TRUSTED_PROXIES`: peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_streams_per_address: usize,
    /// Cap on open streams (`MAX_STREAMS`).
    pub max_streams: usize,
    /// How long issued session tokens are valid.
    pub token_ttl: Duration,
    /// `ADMIN_TOKEN`: the bearer token of the operator endpoints.
    pub admin_token: Option<String>,
    /// `CORS_ALLOWED_ORIGINS` (validated at start-up).
    pub cors_allowed_origins: Vec<String>,
    /// Sent in `X-Instance-Id` and the `connected` event, so a client (and a
    /// load-balancer test) can tell which instance served it.
    pub instance_id: String,
    pub node_id: String,
    pub affinity: Affinity,
    pub max_event_bytes: usize,
    /// Bytes of unsent replay one client address's streams may hold.
    pub replay_budget_per_address: usize,
}

/// Shutdown, in its steps: unready (new streams and stray publishes
/// refused), streams closing over the drain window, then the stop.
pub struct Drain {
    /// Set when shutdown begins: `/readyz` turns unready and new streams
    /// are refused.
    unready: AtomicBool,
    /// Fired on SIGTERM/SIGINT: streams start closing, spread over
    /// `window`.
    pub closing: CancellationToken,
    pub window: Duration,
    /// Fired after the drain window: the server stops, runs are cancelled.
    pub shutdown: CancellationToken,
}

/// What `/stats` and `/metrics` count.
#[derive(Default)]
pub struct Counters {
    pub open_streams: AtomicUsize,
    /// Stream opens refused because of the cap.
    pub streams_refused: AtomicU64,
    /// Streams cut because the client fell behind its queue.
    pub slow_consumers_cut: AtomicU64,
    /// Connections closed because a write to the client stalled
    /// (`SSE_WRITE_TIMEOUT_SECS`).
    pub stalled_writes_cut: Arc<AtomicU64>,
    /// Connections closed at once because `MAX_PENDING_HEADS` connections
    /// were still sending their first request head.
    pub heads_refused: Arc<AtomicU64>,
    /// Streams resumed from history with `Last-Event-ID`.
    pub resumes: AtomicU64,
    /// Resumes whose id was older than the history (answered with `reset`).
    pub resets: AtomicU64,
    /// Of those, resumes whose replay did not fit a replay budget.
    pub replays_over_budget: AtomicU64,
    /// Streams opened (answered 200).
    pub stream_opens: AtomicU64,
    /// Of those, streams opened as their connection's first request: the
    /// stream writer's, without hyper's per-connection buffers. The rest
    /// came as a later request of a kept-alive connection (a balancer that
    /// reuses its upstream connections for streams).
    pub stream_opens_first_request: Arc<AtomicU64>,
    /// Streams that ended, by why.
    pub stream_ends: StreamEnds,
    /// 429 answers, by limit.
    pub rate_limited: RateLimited,
}

/// Streams that ended, by why (see `sse_scale::stream::StreamEnd`).
#[derive(Debug, Default)]
pub struct StreamEnds {
    /// Closed by the drain (SIGTERM).
    pub drain: AtomicU64,
    /// Cut for falling behind the queue.
    pub lag_cut: AtomicU64,
    /// The connection went away (the client, or a cut for a stalled write).
    pub dropped: AtomicU64,
    /// The broadcaster closed.
    pub closed: AtomicU64,
}

impl StreamEnds {
    pub fn count(&self, why: StreamEnd) {
        let counter = match why {
            StreamEnd::Shutdown => &self.drain,
            StreamEnd::Lagged => &self.lag_cut,
            StreamEnd::Closed => &self.closed,
            _ => &self.dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// 429 answers, by limit.
#[derive(Debug, Default)]
pub struct RateLimited {
    pub publish: AtomicU64,
    pub sessions: AtomicU64,
    pub streams: AtomicU64,
}

impl AppState {
    pub fn new(config: &Config, services: Services) -> Self {
        let Services {
            scale,
            limiter,
            signer,
            shutdown,
            tasks,
        } = services;
        let control = scale.control();
        let node_id = scale.node_id().to_owned();
        let instance_id = scale.instance_id().to_owned();
        Self {
            broadcaster: scale.broadcaster(),
            flags: scale.flags(),
            scale,
            runs: Arc::new(Runs::new(control.clone(), node_id.clone())),
            control,
            limiter,
            signer,
            tasks,
            streams_by_address: Default::default(),
            admission: Admission::new(
                config.max_connections(
                    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft),
                ),
                u32::try_from(config.max_connections_per_address).unwrap_or(u32::MAX),
                config.trusted_proxies.clone(),
            ),
            settings: Settings {
                publish_limit: Limit::per_second(config.rate_limit_publish_per_sec),
                stream_limit: Limit::per_minute(config.rate_limit_streams_per_min),
                session_limit: Limit::per_minute(config.rate_limit_sessions_per_min),
                run_shares: crate::runs::Shares {
                    per_session: config.max_runs_per_session as usize,
                    per_address: config.max_runs_per_address as usize,
                },
                max_run: Duration::from_secs(config.max_run_secs),
                trusted_proxies: config.trusted_proxies.clone(),
                max_streams_per_address: config.max_streams_per_address as usize,
                max_streams: config.max_streams as usize,
                token_ttl: Duration::from_secs(config.session_token_ttl_secs),
                // Empty is unset: the endpoints stay closed.
                admin_token: config.admin_token.clone().filter(|t| !t.is_empty()),
                cors_allowed_origins: config.cors_allowed_origins.clone(),
                affinity: Affinity::new(
                    &config.affinity_cookie,
                    config.affinity_cookie_secure,
                    &instance_id,
                ),
                instance_id,
                node_id,
                max_event_bytes: config.max_event_bytes as usize,
                replay_budget_per_address: (config.replay_budget_per_address_mb as usize) << 20,
            },
            counters: Counters::default(),
            drain: Drain {
                unready: AtomicBool::new(false),
                closing: CancellationToken::new(),
                window: config.shutdown_drain(),
                shutdown,
            },
        }
    }

    pub fn is_draining(&self) -> bool {
        self.drain.unready.load(Ordering::Acquire)
    }

    /// Tasks alive in the runtime that runs this state (`/stats` `tasks`,
    /// `sse_runtime_tasks`): a stream waiting for its next event holds none.
    pub fn runtime_tasks(&self) -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    /// Starts draining: `/readyz` turns unready and new streams are refused;
    /// publishes for sessions whose stream is not here are refused too (see
    /// [`AppState::accept_publish`]).
    pub fn start_unready(&self) {
        self.drain.unready.store(true, Ordering::Release);
        self.broadcaster.stop_holding();
    }

    /// Open streams close, spread over the drain window.
    pub fn close_streams(&self) {
        self.drain.closing.cancel();
        self.scale.start_drain();
    }

    /// Both at once (tests and embedding).
    pub fn start_drain(&self) {
        self.start_unready();
        self.close_streams();
    }

    /// A draining instance refuses (503, retried elsewhere by the shipped
    /// balancers) a publish that would stay on it — flag off — for a session
    /// whose stream is not here: nobody here would ever receive it, and the
    /// client's stream has already moved on.
    pub fn accept_publish(&self, session: &SessionId) -> Result<(), AppError> {
        if self.is_draining()
            && !self.broadcaster.crosses_instances(session)
            && !self.broadcaster.holds(session)
        {
            return Err(AppError::unavailable(
                "this instance is draining and does not hold this session's stream; retry",
                1,
            ));
        }
        Ok(())
    }

    /// Checks the event's size on the wire (a payload of many short lines
    /// grows by a `data: ` prefix per line), then publishes. Returns the
    /// event id.
    pub async fn publish(
        &self,
        session: &SessionId,
        event: OutgoingEvent,
    ) -> Result<EventId, AppError> {
        if sse_scale::event::data_len(&event.data) > self.settings.max_event_bytes {
            return Err(AppError::too_large(self.settings.max_event_bytes));
        }
        Ok(self.broadcaster.publish(session, event).await?)
    }

    /// The per-session limit of the publishing routes.
    pub async fn limit_publish(&self, session: &SessionId) -> Result<(), AppError> {
        let key = format!("publish:{session}");
        limited(
            self.limiter.check(&key, self.settings.publish_limit).await,
            &self.counters.rate_limited.publish,
        )
    }

    /// The per-client-IP limit on creating sessions: without it, creating
    /// sessions would turn every per-session limit into none.
    pub async fn limit_session_create(&self, ip: IpAddr) -> Result<(), AppError> {
        let key = format!("sessions:{ip}");
        limited(
            self.limiter.check(&key, self.settings.session_limit).await,
            &self.counters.rate_limited.sessions,
        )
    }

    /// Waits until the session's publish budget has room: background work
    /// (pipeline runs) spends the same budget as the publishing routes, but
    /// slows down instead of failing. A wait lasts at most one window.
    pub async fn pace_publish(&self, session: &SessionId) {
        let key = format!("publish:{session}");
        while let Decision::Limited { retry_after } =
            self.limiter.check(&key, self.settings.publish_limit).await
        {
            tokio::time::sleep(retry_after.max(Duration::from_millis(10))).await;
        }
    }

    /// The per-client-IP limit on opening streams.
    pub async fn limit_stream_open(&self, ip: IpAddr) -> Result<(), AppError> {
        let key = format!("streams:{ip}");
        limited(
            self.limiter.check(&key, self.settings.stream_limit).await,
            &self.counters.rate_limited.streams,
        )
    }
}

fn limited(decision: Decision, refused: &AtomicU64) -> Result<(), AppError> {
    match decision {
        Decision::Allowed => Ok(()),
        Decision::Limited { retry_after } => {
            refused.fetch_add(1, Ordering::Relaxed);
            Err(AppError::too_many_requests(
                retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0),
            ))
        }
    }
}
