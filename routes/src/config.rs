//! The reference server's configuration, from the environment (or the
//! equivalent flags), validated at start-up. A bad value stops the process
//! with a message naming the variable and exit code 2; `--help` lists every
//! variable. The library takes plain settings structs; this file turns the
//! server's variables into them.

use std::time::Duration;

use clap::{Parser, ValueEnum};
use sse_scale::redis_client::{redact_url, SharedRedis, Topology};
use sse_scale::FanoutSettings;
use sse_scale::HistoryLimits;

/// Which broadcaster the server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[non_exhaustive]
pub enum Adapter {
    /// In-process connection map; one instance, or several behind sticky sessions.
    Memory,
    /// Redis Pub/Sub fan-out across instances (needs `REDIS_URL`).
    Redis,
}

/// Server configuration. `Debug` redacts the session secret and any password
/// in `REDIS_URL`.
#[derive(Clone, Parser)]
#[command(
    name = "sse-scale",
    version,
    about = "Server-Sent Events server that scales from one instance to many without losing events"
)]
#[non_exhaustive]
pub struct Config {
    /// Run a tool instead of the server.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Log lines as `text` (for people) or `json` (one object per line, for
    /// log collectors). Request spans carry the path, never the query, so
    /// stream tokens stay out of the logs either way.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Address to bind.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: String,

    /// TCP port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,

    /// Name of this instance in `X-Instance-Id`, the `connected` event and
    /// logs [default: <hostname>:<port>].
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Key for session tokens. Every instance of a deployment must share it;
    /// when unset a random one is generated (single instance only).
    #[arg(long, env = "SESSION_SECRET", hide_env_values = true)]
    pub session_secret: Option<String>,

    /// A secret being rotated out: tokens it signed are still accepted
    /// (new ones are signed with `SESSION_SECRET`). At least 32 bytes.
    #[arg(long, env = "SESSION_SECRET_PREVIOUS", hide_env_values = true)]
    pub session_secret_previous: Option<String>,

    /// Seconds a session token is valid; clients refresh it with
    /// `POST /sessions/{id}/tokens` before it expires.
    #[arg(long, env = "SESSION_TOKEN_TTL_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..=30 * 86_400))]
    pub session_token_ttl_secs: u64,

    /// Bearer token for the operator endpoints (`/stats`, `/flags`,
    /// `POST /announcements`), at least 16 bytes; unset or empty, they
    /// answer 403.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Seconds a client has to send a whole request head; an idle
    /// keep-alive connection is closed after the same time.
    #[arg(long, env = "REQUEST_HEAD_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub request_head_timeout_secs: u64,

    /// Connections that have not yet sent a complete first request head;
    /// beyond it new connections are closed at once (slow-head floods).
    #[arg(long, env = "MAX_PENDING_HEADS", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_pending_heads: u64,

    /// Seconds a request has, after its head, to send its whole body (408
    /// beyond it). A connection with no request open is closed after
    /// `REQUEST_HEAD_TIMEOUT_SECS`, HTTP/1 and HTTP/2 alike.
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub request_timeout_secs: u64,

    /// Connections one client address (IPv6: one /64) may hold open on this
    /// instance, requests and streams alike; more are answered 429 and
    /// closed. Never more than half of `MAX_CONNECTIONS`. Connections from
    /// `TRUSTED_PROXIES` count only against `MAX_CONNECTIONS`.
    #[arg(long, env = "MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_connections_per_address: u64,

    /// Connections this instance holds open; more are answered 503 (health
    /// checks still answered) and closed. Default: the open-file limit
    /// less 128 descriptors for Redis, files and those answers.
    #[arg(long, env = "MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_connections: Option<u64>,

    /// Origins allowed to call the API from a browser (comma-separated,
    /// e.g. `https://app.example.com`); none by default.
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,

    /// Longest silence on an open stream: a heartbeat comment goes out
    /// after this many seconds without an event.
    #[arg(long, env = "SSE_HEARTBEAT_SECS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub sse_heartbeat_secs: u64,

    /// Reconnect delay hint (`retry:`) sent to clients, in milliseconds: each
    /// stream gets this plus a random part of up to half of it again, or of
    /// up to `open streams / SSE_RESUME_RATE` seconds when that is more.
    #[arg(long, env = "SSE_RETRY_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub sse_retry_ms: u64,

    /// Resumes per second this instance's clients are spread to when they
    /// all come back at once (the instance died): the random part of each
    /// stream's `retry:` hint grows with the streams held here. `0`: half of
    /// `SSE_RETRY_MS`, whatever the number of streams.
    #[arg(long, env = "SSE_RESUME_RATE", default_value_t = 2000,
          value_parser = clap::value_parser!(u32))]
    pub sse_resume_rate: u32,

    /// Events a stream may fall behind before it is cut (it then reconnects
    /// and resumes).
    #[arg(long, env = "SSE_CLIENT_QUEUE", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub sse_client_queue: u64,

    /// Seconds a write to a client may stay blocked (the client stopped
    /// reading) before its connection is closed; it resumes by id later.
    #[arg(long, env = "SSE_WRITE_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub sse_write_timeout_secs: u64,

    /// Largest accepted event payload in bytes (larger → 413).
    #[arg(long, env = "MAX_EVENT_BYTES", default_value_t = 65_536,
          value_parser = clap::value_parser!(u64).range(1..=16 * 1024 * 1024))]
    pub max_event_bytes: u64,

    /// Broadcaster: `memory` or `redis` [default: `redis` when REDIS_URL is
    /// set, else `memory`].
    #[arg(long, env = "SSE_ADAPTER", value_enum)]
    pub sse_adapter: Option<Adapter>,

    /// Redis URL (`redis://[:password@]host:port[/db]`, or `rediss://`). One
    /// client is built from it and shared by rate limiting and broadcasting.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Redis Cluster instead: comma-separated seed node URLs (password and
    /// TLS as in REDIS_URL). Session channels are sharded (SPUBLISH /
    /// SSUBSCRIBE). At most one of REDIS_URL, REDIS_CLUSTER_NODES and
    /// REDIS_SENTINEL_NODES.
    #[arg(long, env = "REDIS_CLUSTER_NODES", hide_env_values = true)]
    pub redis_cluster_nodes: Option<String>,

    /// Redis behind Sentinel instead: comma-separated sentinel URLs; their
    /// password, database and TLS also apply to the primary. Needs
    /// REDIS_SENTINEL_MASTER.
    #[arg(long, env = "REDIS_SENTINEL_NODES", hide_env_values = true)]
    pub redis_sentinel_nodes: Option<String>,

    /// The name the sentinels monitor the primary under.
    #[arg(long, env = "REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// Prefix of every Redis key and channel.
    #[arg(long, env = "REDIS_PREFIX", default_value = "sse:")]
    pub redis_prefix: String,

    /// Send events through Redis to other instances (needs the redis
    /// adapter): true/false, on/off, yes/no, 1/0. Read at start-up; a flag
    /// service can change it at run time.
    #[arg(long, env = "FF_REDIS_SSE_BROADCAST", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), hide_possible_values = true)]
    pub ff_redis_sse_broadcast: Option<bool>,

    /// Approximate number of events kept per session in Redis history.
    #[arg(long, env = "HISTORY_MAXLEN", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub history_maxlen: u64,

    /// Seconds a session's Redis history lives after its last event.
    #[arg(long, env = "HISTORY_TTL_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=30 * 86_400))]
    pub history_ttl_secs: u64,

    /// Megabytes of event history kept in process over all sessions (every
    /// event in local mode; in Redis mode only events that did not reach
    /// Redis). Past it, the histories idle the longest are dropped.
    #[arg(long, env = "HISTORY_MEMORY_MB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub history_memory_mb: u64,

    /// Publishes per second per session on the publishing routes (0: no limit).
    #[arg(long, env = "RATE_LIMIT_PUBLISH_PER_SEC", default_value_t = 50)]
    pub rate_limit_publish_per_sec: u64,

    /// Streams opened per minute per client IP (0: no limit).
    #[arg(long, env = "RATE_LIMIT_STREAMS_PER_MIN", default_value_t = 600)]
    pub rate_limit_streams_per_min: u64,

    /// Sessions created per minute per client IP (0: no limit).
    #[arg(long, env = "RATE_LIMIT_SESSIONS_PER_MIN", default_value_t = 120)]
    pub rate_limit_sessions_per_min: u64,

    /// Pipeline runs one session may have executing at once.
    #[arg(long, env = "MAX_RUNS_PER_SESSION", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_runs_per_session: u64,

    /// Pipeline runs one client address (IPv6: one /64) may have executing
    /// at once on this instance, whatever their sessions.
    #[arg(long, env = "MAX_RUNS_PER_ADDRESS", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_runs_per_address: u64,

    /// Seconds a pipeline run may last, its gate wait included: a run
    /// asking for more steps is refused, one still going is cancelled.
    #[arg(long, env = "MAX_RUN_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub max_run_secs: u64,

    /// Bytes of in-process history one session may hold (its events plus
    /// bookkeeping); past it its oldest events go, so no session can push
    /// the others' history out of `HISTORY_MEMORY_MB`.
    #[arg(long, env = "HISTORY_SESSION_MAX_BYTES", default_value_t = 4 << 20,
          value_parser = clap::value_parser!(u64).range(4096..=1 << 34))]
    pub history_session_max_bytes: u64,

    /// Balancers and proxies in front of this server (comma-separated
    /// CIDRs or addresses, e.g. `10.0.0.0/8,127.0.0.1`). A request from one
    /// of them has its client address taken from `X-Forwarded-For`: the
    /// rightmost address not in this list (what the nearest untrusted hop
    /// connected from). Empty: the peer address is the client.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Replaced by `TRUSTED_PROXIES` (it trusted whatever the client sent);
    /// setting it on stops the server with a message.
    #[arg(long, env = "TRUST_FORWARDED_FOR", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), hide = true)]
    pub trust_forwarded_for: bool,

    /// Streams one client address (IPv6: one /64) may hold open on this
    /// instance; more → 429.
    #[arg(long, env = "MAX_STREAMS_PER_ADDRESS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_streams_per_address: u64,

    /// Name of the affinity cookie naming the instance that served the
    /// client (for cookie→upstream maps in load balancers); empty disables it.
    #[arg(long, env = "AFFINITY_COOKIE", default_value = "sse_affinity")]
    pub affinity_cookie: String,

    /// Always mark the affinity cookie `Secure` (it is also marked when the
    /// request arrived with `X-Forwarded-Proto: https` from one of
    /// `TRUSTED_PROXIES`): true/false, on/off,
    /// yes/no, 1/0.
    #[arg(long, env = "AFFINITY_COOKIE_SECURE", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), hide_possible_values = true)]
    pub affinity_cookie_secure: bool,

    /// Seconds a graceful shutdown may take before the process exits anyway.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub shutdown_grace_secs: u64,

    /// Seconds an instance stays unready (`/readyz` 503) after SIGTERM
    /// before its first stream closes: at least the balancer's health-check
    /// interval × fall, so it is out of the pool before clients reconnect.
    #[arg(long, env = "SHUTDOWN_UNREADY_SECS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(0..=600))]
    pub shutdown_unready_secs: u64,

    /// Seconds over which open streams are closed on shutdown (each at a
    /// random moment in the window), so their reconnects do not arrive at
    /// the next instance all at once. Must be shorter than the grace period.
    #[arg(long, env = "SHUTDOWN_DRAIN_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_drain_secs: u64,

    /// Open streams this instance accepts; more → 503 with `Retry-After`.
    #[arg(long, env = "MAX_STREAMS", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_streams: u64,

    /// Events held while Redis is unreachable, published (and written to
    /// history) in order once it is back; more are dropped and counted.
    #[arg(long, env = "OUTBOX_MAX", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub outbox_max: u64,

    /// Encoded bytes one resume may replay from history; a client further
    /// behind gets a `reset` instead.
    #[arg(long, env = "REPLAY_MAX_BYTES", default_value_t = 4 << 20,
          value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    pub replay_max_bytes: u64,

    /// MiB of replayed history this instance's streams may hold before
    /// their clients have read it; a resume whose replay does not fit gets
    /// a `reset` instead.
    #[arg(long, env = "REPLAY_BUDGET_MB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub replay_budget_mb: u64,

    /// Of `REPLAY_BUDGET_MB`, what the streams of one client address (IPv6:
    /// one /64) may hold.
    #[arg(long, env = "REPLAY_BUDGET_PER_ADDRESS_MB", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub replay_budget_per_address_mb: u64,

    /// Unleash client API URL (e.g. `http://unleash:4242/api`). When set,
    /// `FF_REDIS_SSE_BROADCAST` follows Unleash (see docs/flags.md) and
    /// the environment value only applies until Unleash first answers.
    #[arg(long, env = "UNLEASH_URL")]
    pub unleash_url: Option<String>,

    /// Unleash backend (client) API token; needed with `UNLEASH_URL`.
    #[arg(long, env = "UNLEASH_API_TOKEN", hide_env_values = true)]
    pub unleash_api_token: Option<String>,

    /// Application name this server reports to Unleash.
    #[arg(long, env = "UNLEASH_APP_NAME", default_value = "sse-scale")]
    pub unleash_app_name: String,

    /// Instance name reported to Unleash [default: the instance id].
    #[arg(long, env = "UNLEASH_INSTANCE_ID")]
    pub unleash_instance_id: Option<String>,

    /// Seconds between polls of Unleash (failed polls back off up to 60 s).
    #[arg(long, env = "UNLEASH_REFRESH_SECS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub unleash_refresh_secs: u64,
}

/// A CIDR (`10.0.0.0/8`) or a single address (`127.0.0.1`, `::1`).
fn parse_net(raw: &str) -> Result<ipnet::IpNet, String> {
    let raw = raw.trim();
    raw.parse::<ipnet::IpNet>()
        .or_else(|_| raw.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{raw:?} is not an address or CIDR (like 10.0.0.0/8)"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Tools of the same binary.
#[derive(Debug, Clone, clap::Subcommand)]
#[non_exhaustive]
pub enum Command {
    /// Check a running deployment through its balancer: buffering, idle
    /// timeouts, compression, affinity, resume, flag agreement. Exit code 0
    /// when every check passes, 1 otherwise.
    Doctor(crate::doctor::DoctorArgs),
}

/// A configuration that parsed but does not make sense as a whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("SSE_ADAPTER=redis needs REDIS_URL, REDIS_CLUSTER_NODES or REDIS_SENTINEL_NODES")]
    RedisUrlMissing,
    #[error("{0}")]
    RedisUrlInvalid(String),
    #[error("TRUST_FORWARDED_FOR is replaced by TRUSTED_PROXIES: list the balancers' addresses (it took the client's own X-Forwarded-For at its word)")]
    TrustForwardedForRemoved,
    #[error("SESSION_SECRET must be at least 32 bytes (it signs every session token; generate one with `openssl rand -hex 32`)")]
    SecretTooShort,
    #[error("ADMIN_TOKEN must be at least 16 bytes")]
    AdminTokenTooShort,
    #[error("CORS_ALLOWED_ORIGINS: {0:?} is not an origin like https://app.example.com")]
    CorsOriginInvalid(String),
    #[error(
        "SHUTDOWN_UNREADY_SECS + SHUTDOWN_DRAIN_SECS must be shorter than SHUTDOWN_GRACE_SECS"
    )]
    DrainLongerThanGrace,
    #[error("UNLEASH_URL must be an http:// or https:// URL: {0}")]
    UnleashUrlInvalid(String),
    #[error("UNLEASH_URL needs UNLEASH_API_TOKEN (an Unleash backend API token)")]
    UnleashTokenMissing,
    #[error("UNLEASH_APP_NAME must not be empty")]
    UnleashAppNameEmpty,
}

impl Config {
    /// Checks rules that span several variables.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let topology = self.redis_topology_checked()?;
        if self.sse_adapter == Some(Adapter::Redis) && topology.is_none() {
            return Err(ConfigError::RedisUrlMissing);
        }
        if self.trust_forwarded_for {
            return Err(ConfigError::TrustForwardedForRemoved);
        }
        if self.session_secret.as_ref().is_some_and(|s| s.len() < 32)
            || self
                .session_secret_previous
                .as_ref()
                .is_some_and(|s| s.len() < 32)
        {
            return Err(ConfigError::SecretTooShort);
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|t| !t.is_empty() && t.len() < 16)
        {
            return Err(ConfigError::AdminTokenTooShort);
        }
        for origin in &self.cors_allowed_origins {
            let ok = url::Url::parse(origin).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https") && u.path() == "/" && !origin.ends_with('/')
            });
            if !ok || axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(ConfigError::CorsOriginInvalid(origin.clone()));
            }
        }
        if self.shutdown_unready_secs + self.shutdown_drain_secs >= self.shutdown_grace_secs {
            return Err(ConfigError::DrainLongerThanGrace);
        }
        if let Some(topology) = topology {
            SharedRedis::with_topology(topology.clone()).map_err(|e| {
                ConfigError::RedisUrlInvalid(format!("{}: {e}", topology.variable()))
            })?;
        }
        if let Some(url) = &self.unleash_url {
            let parsed = url::Url::parse(url)
                .map_err(|e| ConfigError::UnleashUrlInvalid(format!("{url:?}: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(ConfigError::UnleashUrlInvalid(url.clone()));
            }
            if self.unleash_api_token.as_deref().is_none_or(str::is_empty) {
                return Err(ConfigError::UnleashTokenMissing);
            }
            if self.unleash_app_name.trim().is_empty() {
                return Err(ConfigError::UnleashAppNameEmpty);
            }
        }
        Ok(())
    }

    fn redis_topology_checked(&self) -> Result<Option<Topology>, ConfigError> {
        Topology::from_settings(
            self.redis_url.as_deref(),
            self.redis_cluster_nodes.as_deref(),
            self.redis_sentinel_nodes.as_deref(),
            self.redis_sentinel_master.as_deref(),
        )
        .map_err(|e| ConfigError::RedisUrlInvalid(e.to_string()))
    }

    /// Where Redis is (`REDIS_URL`, `REDIS_CLUSTER_NODES` or
    /// `REDIS_SENTINEL_NODES`), once [`Config::validate`] passed.
    pub fn redis_topology(&self) -> Option<Topology> {
        self.redis_topology_checked().ok().flatten()
    }

    /// The broadcaster to use: as configured, else `redis` when a Redis
    /// topology is set.
    pub fn adapter(&self) -> Adapter {
        self.sse_adapter
            .unwrap_or(if self.redis_topology().is_some() {
                Adapter::Redis
            } else {
                Adapter::Memory
            })
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.sse_heartbeat_secs)
    }

    pub fn retry(&self) -> Duration {
        Duration::from_millis(self.sse_retry_ms)
    }

    pub fn resume_rate(&self) -> Option<std::num::NonZeroU32> {
        std::num::NonZeroU32::new(self.sse_resume_rate)
    }

    pub fn request_head_timeout(&self) -> Duration {
        Duration::from_secs(self.request_head_timeout_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// `MAX_CONNECTIONS`, or what the open-file limit `nofile` leaves.
    pub fn max_connections(&self, nofile: u64) -> usize {
        let derived = nofile
            .saturating_sub(crate::admission::SPARE_DESCRIPTORS)
            .max(16);
        self.max_connections.unwrap_or(derived) as usize
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn shutdown_unready(&self) -> Duration {
        Duration::from_secs(self.shutdown_unready_secs)
    }

    pub fn shutdown_drain(&self) -> Duration {
        Duration::from_secs(self.shutdown_drain_secs)
    }

    pub fn unleash_refresh(&self) -> Duration {
        Duration::from_secs(self.unleash_refresh_secs)
    }

    pub fn history(&self) -> HistoryLimits {
        HistoryLimits {
            maxlen: self.history_maxlen as usize,
            ttl: Duration::from_secs(self.history_ttl_secs),
            max_bytes: (self.history_memory_mb as usize).saturating_mul(1 << 20),
            session_max_bytes: self.history_session_max_bytes as usize,
        }
    }

    pub fn fanout(&self) -> FanoutSettings {
        let mut settings = FanoutSettings::default();
        settings.queue = self.sse_client_queue as usize;
        settings.history = self.history();
        settings.replay_max_bytes = self.replay_max_bytes as usize;
        settings
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("instance_id", &self.instance_id)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "session_secret_previous",
                &self.session_secret_previous.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "session_secret",
                &self.session_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("sse_heartbeat_secs", &self.sse_heartbeat_secs)
            .field("sse_resume_rate", &self.sse_resume_rate)
            .field("sse_retry_ms", &self.sse_retry_ms)
            .field("sse_client_queue", &self.sse_client_queue)
            .field("sse_write_timeout_secs", &self.sse_write_timeout_secs)
            .field("max_event_bytes", &self.max_event_bytes)
            .field("max_runs_per_address", &self.max_runs_per_address)
            .field("max_run_secs", &self.max_run_secs)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field(
                "max_connections_per_address",
                &self.max_connections_per_address,
            )
            .field("max_connections", &self.max_connections)
            .field("sse_adapter", &self.sse_adapter)
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field(
                "redis_cluster_nodes",
                &self.redis_cluster_nodes.as_deref().map(redact_url),
            )
            .field(
                "redis_sentinel_nodes",
                &self.redis_sentinel_nodes.as_deref().map(redact_url),
            )
            .field("redis_prefix", &self.redis_prefix)
            .field("ff_redis_sse_broadcast", &self.ff_redis_sse_broadcast)
            .field("history_maxlen", &self.history_maxlen)
            .field("history_ttl_secs", &self.history_ttl_secs)
            .field("history_memory_mb", &self.history_memory_mb)
            .field(
                "rate_limit_publish_per_sec",
                &self.rate_limit_publish_per_sec,
            )
            .field(
                "rate_limit_streams_per_min",
                &self.rate_limit_streams_per_min,
            )
            .field("trust_forwarded_for", &self.trust_forwarded_for)
            .field("affinity_cookie", &self.affinity_cookie)
            .field("affinity_cookie_secure", &self.affinity_cookie_secure)
            .field("shutdown_grace_secs", &self.shutdown_grace_secs)
            .field("shutdown_drain_secs", &self.shutdown_drain_secs)
            .field("max_streams", &self.max_streams)
            .field("outbox_max", &self.outbox_max)
            .field("replay_max_bytes", &self.replay_max_bytes)
            .field("replay_budget_mb", &self.replay_budget_mb)
            .field(
                "replay_budget_per_address_mb",
                &self.replay_budget_per_address_mb,
            )
            .field("unleash_url", &self.unleash_url)
            .field(
                "unleash_api_token",
                &self.unleash_api_token.as_ref().map(|_| "<redacted>"),
            )
            .field("unleash_app_name", &self.unleash_app_name)
            .field("unleash_instance_id", &self.unleash_instance_id)
            .field("unleash_refresh_secs", &self.unleash_refresh_secs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("sse-scale").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_and_validation() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 3000);
        assert_eq!(c.sse_heartbeat_secs, 15);
        assert_eq!(c.max_event_bytes, 65_536);
        assert!(c.validate().is_ok());
        assert!(parse(&["--sse-heartbeat-secs", "0"]).is_err());
        assert_eq!(c.resume_rate().map(|r| r.get()), Some(2000));
        assert!(parse(&["--sse-resume-rate", "0"])
            .unwrap()
            .resume_rate()
            .is_none());
        assert!(parse(&["--sse-resume-rate", "-1"]).is_err());
        assert!(parse(&["--port", "http"]).is_err());
        assert!(parse(&["--sse-adapter", "kafka"]).is_err());
        let redis = parse(&["--sse-adapter", "redis"]).unwrap();
        assert!(redis
            .validate()
            .unwrap_err()
            .to_string()
            .contains("REDIS_URL"));
    }

    #[test]
    fn unleash_settings_are_checked() {
        assert!(parse(&["--unleash-refresh-secs", "0"]).is_err());
        let no_token = parse(&["--unleash-url", "http://u:4242/api"]).unwrap();
        assert!(matches!(
            no_token.validate(),
            Err(ConfigError::UnleashTokenMissing)
        ));
        for bad in ["unleash:4242", "ftp://u/api", "http//u"] {
            let c = parse(&["--unleash-url", bad, "--unleash-api-token", "t"]).unwrap();
            assert!(
                matches!(c.validate(), Err(ConfigError::UnleashUrlInvalid(_))),
                "{bad}"
            );
        }
        let ok = parse(&["--unleash-url", "https://u/api", "--unleash-api-token", "t"]).unwrap();
        assert!(ok.validate().is_ok());
        assert_eq!(ok.unleash_refresh(), Duration::from_secs(15));
    }

    #[test]
    fn weak_secrets_and_bad_origins_are_refused() {
        let short = parse(&["--session-secret", "hunter2"]).unwrap();
        assert!(matches!(short.validate(), Err(ConfigError::SecretTooShort)));
        let empty = parse(&["--session-secret", ""]).unwrap();
        assert!(matches!(empty.validate(), Err(ConfigError::SecretTooShort)));
        let ok = parse(&["--session-secret", &"k".repeat(32)]).unwrap();
        assert!(ok.validate().is_ok());
        let admin = parse(&["--admin-token", "short"]).unwrap();
        assert!(matches!(
            admin.validate(),
            Err(ConfigError::AdminTokenTooShort)
        ));
        for bad in [
            "*",
            "app.example.com",
            "https://app.example.com/",
            "https://a.example/path",
        ] {
            let c = parse(&["--cors-allowed-origins", bad]).unwrap();
            assert!(
                matches!(c.validate(), Err(ConfigError::CorsOriginInvalid(_))),
                "{bad}"
            );
        }
        let c = parse(&[
            "--cors-allowed-origins",
            "https://a.example,http://localhost:5173",
        ])
        .unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(c.cors_allowed_origins.len(), 2);
    }

    #[test]
    fn trusted_proxies_parse_cidrs_and_addresses() {
        let c = parse(&["--trusted-proxies", "10.0.0.0/8, 127.0.0.1,::1"]).unwrap();
        assert_eq!(c.trusted_proxies.len(), 3);
        assert!(c.trusted_proxies[1].contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()));
        assert!(parse(&["--trusted-proxies", "balancer"]).is_err());
        let old = parse(&["--trust-forwarded-for", "true"]).unwrap();
        assert!(matches!(
            old.validate(),
            Err(ConfigError::TrustForwardedForRemoved)
        ));
    }

    #[test]
    fn debug_hides_secrets() {
        let c = parse(&[
            "--session-secret",
            "hunter2",
            "--redis-url",
            "redis://:pw@h:6379/1",
            "--unleash-url",
            "http://unleash:4242/api",
            "--unleash-api-token",
            "default:development.tok3n",
        ])
        .unwrap();
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2") && !s.contains("pw@"), "{s}");
        assert!(!s.contains("tok3n"), "{s}");
        assert!(s.contains("redis://:***@h:6379/1"), "{s}");
    }
}
