//! The process's one Redis client, shared by the rate limiter and the Redis
//! broadcaster.
//!
//! Built once at start-up from `REDIS_URL` (password, db index and
//! `rediss://` as the `redis` crate supports them). Commands go over one
//! multiplexed, auto-reconnecting [`ConnectionManager`]; clones of it share
//! the same socket. If Redis is unreachable at start-up the server still
//! starts: a background task keeps trying, and until it succeeds
//! [`SharedRedis::conn`] answers `None`, which callers treat as "Redis down"
//! (the rate limiter falls back to memory, the broadcaster to local
//! delivery).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisError;
use tokio::sync::OnceCell;
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

/// Cheap to clone; every clone is the same client and connection.
#[derive(Clone)]
pub struct SharedRedis {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    /// Set once the first connection succeeded; the manager reconnects by
    /// itself after that.
    conn: OnceCell<ConnectionManager>,
    /// `REDIS_URL` with the password masked, for logs.
    display_url: String,
    /// Cleared when a command fails; while clear, [`SharedRedis::conn`]
    /// answers `None` so callers fall back at once instead of each waiting
    /// out a timeout. A probe task sets it again when Redis answers.
    healthy: AtomicBool,
    /// Where the probe task is spawned; set by `connect`.
    runtime: std::sync::OnceLock<(TaskTracker, CancellationToken)>,
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
        {
            CallError::Connection(e.to_string())
        } else {
            CallError::Server(e.to_string())
        }
    }
}

/// `REDIS_URL` could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("REDIS_URL is not a valid Redis URL: {0}")]
pub struct InvalidRedisUrl(String);

impl SharedRedis {
    /// Parses the URL; does not connect (see [`SharedRedis::connect`]).
    pub fn open(url: &str) -> Result<Self, InvalidRedisUrl> {
        let client = redis::Client::open(url).map_err(|e| InvalidRedisUrl(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                conn: OnceCell::new(),
                display_url: redact_url(url),
                healthy: AtomicBool::new(true),
                runtime: std::sync::OnceLock::new(),
            }),
        })
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
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT)
            // Reconnect quickly after an outage: 50 ms doubling, at most 2 s.
            .set_exponent_base(2)
            .set_factor(50)
            .set_max_delay(2000)
            .set_number_of_retries(3);
        let client = self.inner.client.clone();
        self.inner
            .conn
            .get_or_try_init(|| ConnectionManager::new_with_config(client, config))
            .await
            .map(drop)
    }

    /// The shared multiplexed connection, or `None` before the first
    /// successful connect and while Redis is known to be failing.
    pub fn conn(&self) -> Option<ConnectionManager> {
        if !self.inner.healthy.load(Ordering::Relaxed) {
            return None;
        }
        self.inner.conn.get().cloned()
    }

    /// Runs one command (or pipeline, or script) on the shared connection
    /// with the response timeout. An outage (see [`CallError::is_outage`])
    /// marks the client unhealthy until a probe succeeds; a server error
    /// reply does not.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, CallError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().ok_or(CallError::NotConnected)?;
        let error = match tokio::time::timeout(RESPONSE_TIMEOUT, f(conn)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => CallError::classify(&e),
            Err(_) => CallError::Timeout(RESPONSE_TIMEOUT),
        };
        if error.is_outage() {
            self.report_failure();
        }
        Err(error)
    }

    /// Whether commands currently go to Redis.
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed) && self.inner.conn.get().is_some()
    }

    /// Tells the client a command failed: callers fall back until a probe
    /// (PING every [`PROBE_INTERVAL`]) succeeds.
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
                let Some(mut conn) = this.inner.conn.get().cloned() else {
                    continue;
                };
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<String>(&mut conn);
                if let Ok(Ok(_)) = tokio::time::timeout(RESPONSE_TIMEOUT, ping).await {
                    this.inner.healthy.store(true, Ordering::Relaxed);
                    tracing::info!(backend = "redis", "Redis answers again");
                    return;
                }
            }
        });
    }

    /// The client, for the dedicated Pub/Sub connection (Redis needs one
    /// connection in subscriber mode, apart from commands).
    pub fn client(&self) -> &redis::Client {
        &self.inner.client
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
