//! The process's one Redis client, shared by the rate limiter, the Redis
//! broker, the control bus and the flag store.
//!
//! Built once at start-up from `REDIS_URL`, `REDIS_CLUSTER_NODES` or
//! `REDIS_SENTINEL_NODES` (password, db index and `rediss://` as the
//! `redis` crate supports them; see [`Topology`]). Commands go over one
//! multiplexed, auto-reconnecting [`Conn`]; clones of it share the same
//! sockets. If Redis is unreachable at start-up the server still starts: a
//! background task keeps trying, and until it succeeds
//! [`SharedRedis::conn`] answers `None`, which callers treat as "Redis down"
//! (the rate limiter falls back to memory, the broadcaster to local
//! delivery). Under Sentinel, a failing client asks the sentinels again and
//! moves to the primary they name.

mod topology;

pub use topology::{Conn, Topology, TopologyError, TopologyKind};

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long one Redis command may take before the caller treats Redis as
/// down. Publishing waits for Redis, so this bounds a publish's latency
/// during an outage.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How often a failing Redis is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Commands of the shared client in flight at once. The connection is
/// multiplexed: a command's response waits behind every command sent before
/// it, so without a bound a burst (ten thousand streams resuming at once)
/// would make commands wait out [`RESPONSE_TIMEOUT`] behind each other and
/// be taken for an outage. A command waits for its turn before its timeout
/// starts.
pub const MAX_IN_FLIGHT: usize = 256;

/// Cheap to clone; every clone is the same client and connection.
#[derive(Clone)]
pub struct SharedRedis {
    inner: Arc<Inner>,
}

struct Inner {
    backend: topology::Backend,
    kind: TopologyKind,
    /// Set once the first connection succeeded; it reconnects by itself
    /// after that. Replaced when Sentinel names another primary (with the
    /// address it was opened to).
    conn: std::sync::RwLock<Option<(Conn, Option<String>)>>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    /// The configuration with passwords masked, for logs.
    display_url: String,
    /// Cleared when a command fails; while clear, [`SharedRedis::conn`]
    /// answers `None` so callers fall back at once instead of each waiting
    /// out a timeout. A probe task sets it again when Redis answers.
    healthy: AtomicBool,
    /// Where the probe task is spawned; set by `connect`.
    runtime: std::sync::OnceLock<(TaskTracker, CancellationToken)>,
    /// See [`MAX_IN_FLIGHT`].
    in_flight: tokio::sync::Semaphore,
    /// Counts the probe's successes (see [`SharedRedis::recoveries`]).
    recoveries: tokio::sync::watch::Sender<u64>,
}

/// Why one Redis command failed.
///
/// Only a lost connection or a timeout says anything about Redis as a
/// whole; a server error reply (a bad argument, a script error) is that
/// request's own failure and leaves the client healthy, so one bad request
/// cannot push an instance off Redis for everyone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    #[error("Redis is not connected")]
    NotConnected,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the Redis connection failed: {0}")]
    Connection(String),
    #[error("Redis refused the command: {0}")]
    Server(String),
}

impl CallError {
    /// Whether this says Redis is unreachable (rather than that one
    /// command was refused).
    pub fn is_outage(&self) -> bool {
        !matches!(self, CallError::Server(_))
    }

    fn classify(e: &RedisError) -> Self {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            // A replica answering: this is no longer the primary (a
            // failover demoted it), which is an outage of the client.
            || e.kind() == redis::ErrorKind::ReadOnly
            || e.is_cluster_error()
        {
            CallError::Connection(e.to_string())
        } else {
            CallError::Server(e.to_string())
        }
    }
}

/// `REDIS_URL` could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("not a valid Redis URL: {0}")]
pub struct InvalidRedisUrl(String);

impl SharedRedis {
    /// Parses the URL of one server; does not connect (see
    /// [`SharedRedis::connect`]).
    pub fn open(url: &str) -> Result<Self, InvalidRedisUrl> {
        Self::with_topology(Topology::Single(url.to_owned()))
    }

    /// Parses the configuration of any topology; does not connect.
    pub fn with_topology(topology: Topology) -> Result<Self, InvalidRedisUrl> {
        let backend = topology::Backend::open(&topology)?;
        Ok(Self {
            inner: Arc::new(Inner {
                backend,
                kind: topology.kind(),
                conn: std::sync::RwLock::new(None),
                connecting: tokio::sync::Mutex::new(()),
                display_url: topology.display(),
                healthy: AtomicBool::new(true),
                runtime: std::sync::OnceLock::new(),
                in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
                recoveries: tokio::sync::watch::Sender::new(0),
            }),
        })
    }

    /// Which topology this client is on.
    pub fn topology(&self) -> TopologyKind {
        self.inner.kind
    }

    /// Connects in the background, retrying with capped backoff until it
    /// succeeds or `cancel` fires. Returns at once.
    pub fn connect(&self, tasks: &TaskTracker, cancel: CancellationToken) {
        let _ = self.inner.runtime.set((tasks.clone(), cancel.clone()));
        let this = self.clone();
        tasks.spawn(async move {
            let mut delay = Duration::from_millis(100);
            let mut logged = false;
            loop {
                match this.try_connect().await {
                    Ok(()) => {
                        tracing::info!(backend = "redis", url = %this.inner.display_url, "connected");
                        return;
                    }
                    Err(e) if !logged => {
                        logged = true;
                        tracing::warn!(backend = "redis", url = %this.inner.display_url, error = %e,
                            "cannot connect; retrying in the background");
                    }
                    Err(_) => {}
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// One connection attempt (no-op once connected).
    pub async fn try_connect(&self) -> redis::RedisResult<()> {
        let _one = self.inner.connecting.lock().await;
        if self.current().is_some() {
            return Ok(());
        }
        let opened = self.inner.backend.connect().await?;
        *self.write_conn() = Some(opened);
        Ok(())
    }

    fn current(&self) -> Option<Conn> {
        let conn = self.inner.conn.read().unwrap_or_else(|e| e.into_inner());
        conn.as_ref().map(|(c, _)| c.clone())
    }

    fn write_conn(&self) -> std::sync::RwLockWriteGuard<'_, Option<(Conn, Option<String>)>> {
        self.inner.conn.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared multiplexed connection, or `None` before the first
    /// successful connect and while Redis is known to be failing.
    pub fn conn(&self) -> Option<Conn> {
        if !self.inner.healthy.load(Ordering::Relaxed) {
            return None;
        }
        self.current()
    }

    /// Runs one command (or pipeline, or script) on the shared connection
    /// with the response timeout, once one of the [`MAX_IN_FLIGHT`] turns is
    /// free. An outage (see [`CallError::is_outage`])
    /// marks the client unhealthy until a probe succeeds; a server error
    /// reply does not.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, CallError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        // Never closed, so the permit always comes.
        let _turn = self.inner.in_flight.acquire().await;
        let conn = self.conn().ok_or(CallError::NotConnected)?;
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(RESPONSE_TIMEOUT, f(conn)).await;
        crate::metrics::redis_call(started.elapsed());
        let error = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => CallError::classify(&e),
            Err(_) => CallError::Timeout(RESPONSE_TIMEOUT),
        };
        if error.is_outage() {
            self.report_failure();
        }
        Err(error)
    }

    /// Changes each time Redis answers again after an outage: what waits
    /// for Redis with a backoff of its own (the subscriber) retries then,
    /// not at its next tick.
    pub fn recoveries(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.recoveries.subscribe()
    }

    /// Whether commands currently go to Redis.
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed) && self.current().is_some()
    }

    /// Tells the client a command failed: callers fall back until a probe
    /// (PING every [`PROBE_INTERVAL`]) succeeds. Under Sentinel the probe
    /// first asks the sentinels for the primary and, when they name another
    /// one, moves the client there.
    pub fn report_failure(&self) {
        if !self.inner.healthy.swap(false, Ordering::Relaxed) {
            return; // A probe is already running.
        }
        let Some((tasks, cancel)) = self.inner.runtime.get() else {
            self.inner.healthy.store(true, Ordering::Relaxed);
            return;
        };
        let this = self.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(PROBE_INTERVAL) => {}
                }
                this.follow_primary().await;
                let Some(mut conn) = this.current() else {
                    continue;
                };
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<String>(&mut conn);
                if let Ok(Ok(_)) = tokio::time::timeout(RESPONSE_TIMEOUT, ping).await {
                    this.inner.healthy.store(true, Ordering::Relaxed);
                    this.inner.recoveries.send_modify(|n| *n += 1);
                    tracing::info!(backend = "redis", "Redis answers again");
                    return;
                }
            }
        });
    }

    /// Under Sentinel: when the sentinels name another primary than the
    /// one the client is on, reconnects there.
    async fn follow_primary(&self) {
        let Some(named) = self.inner.backend.primary_addr().await else {
            return;
        };
        let Ok(named) = named else { return };
        let on = self
            .inner
            .conn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|(_, addr)| addr.clone());
        if on.as_deref() == Some(named.as_str()) {
            return;
        }
        let _one = self.inner.connecting.lock().await;
        match self.inner.backend.connect().await {
            Ok(opened) => {
                tracing::warn!(backend = "redis", from = ?on, to = ?opened.1, "Sentinel names another primary; moved there");
                *self.write_conn() = Some(opened);
            }
            Err(e) => {
                tracing::debug!(backend = "redis", error = %e, "cannot reach the primary Sentinel names yet");
            }
        }
    }

    /// A dedicated connection for classic Pub/Sub (Redis needs one
    /// connection in subscriber mode, apart from commands): to the server,
    /// to the primary Sentinel names now, or to any cluster node.
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        self.inner.backend.pubsub().await
    }

    /// In a cluster: a RESP3 connection for sharded Pub/Sub, whose pushes
    /// go to `pushes`. `None` on the other topologies.
    pub async fn sharded_pubsub(
        &self,
        pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Option<redis::RedisResult<redis::cluster_async::ClusterConnection>> {
        self.inner.backend.sharded_pubsub(pushes).await
    }

    pub fn display_url(&self) -> &str {
        &self.inner.display_url
    }
}

/// `redis://user:secret@host/0` → `redis://user:***@host/0`, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let auth = &url[scheme + 3..at];
            let user = auth.split_once(':').map_or("", |(u, _)| u);
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl std::fmt::Debug for SharedRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRedis")
            .field("url", &self.inner.display_url)
            .finish()
    }
}
