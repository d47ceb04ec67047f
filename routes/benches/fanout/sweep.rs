//! The fan-out measurements: 2,000 streams at a load, CPU per delivery,
//! latency, exact loss and duplicates. The local sweep opens every
//! server's streams first and then gives the servers short windows in
//! turn, so a drift of the shared machine lands on all of them instead of
//! on whichever ran during it; Redis mode is two `sse-scale` instances, each
//! session published through the one its streams are not on.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::servers::Kind;
use crate::support::procs::{self, ADMIN};
use crate::support::server::BenchServer as Server;
use crate::support::sse_client::{self, create_session, publish_all, Session};
use crate::support::streams::{self, ms, open_streams, Collector, Seen, Via};
use crate::FANOUT;

/// Pause between two measured windows of the local sweep.
const SETTLE: Duration = Duration::from_millis(500);

/// One fan-out measurement.
#[derive(Clone, Debug)]
pub struct FanoutResult {
    /// `floor`, `axum` or `sse-scale`.
    pub server: &'static str,
    pub mode: &'static str,
    /// Offered deliveries/s (publishes/s × fan-out).
    pub offered: f64,
    pub streams: usize,
    pub sessions: usize,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub stream_errors: u64,
    pub secs: f64,
    pub deliveries_per_sec: f64,
    pub server_cpu_secs: f64,
    pub server_sys_secs: f64,
    pub cpu_us_per_delivery: f64,
    /// The same, per measured window.
    pub window_cpu_us: Vec<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Per instance (Redis mode): messages/bytes from Redis vs events needed.
    pub redis: Vec<Value>,
}

impl FanoutResult {
    pub fn to_json(&self) -> Value {
        json!({
            "server": self.server, "mode": self.mode, "offered_deliveries_per_sec": self.offered,
            "streams": self.streams, "sessions": self.sessions,
            "fanout": FANOUT, "published": self.published, "expected_deliveries": self.expected,
            "delivered": self.delivered, "lost": self.lost, "duplicates": self.duplicates,
            "stream_errors": self.stream_errors, "publish_window_secs": self.secs,
            "deliveries_per_sec": self.deliveries_per_sec, "server_cpu_secs": self.server_cpu_secs,
            "server_sys_secs": self.server_sys_secs,
            "cpu_us_per_delivery": self.cpu_us_per_delivery,
            "window_cpu_us_per_delivery": self.window_cpu_us,
            "latency_ms": { "p50": self.p50_ms, "p99": self.p99_ms, "p99_9": self.p999_ms, "max": self.max_ms },
            "redis_per_instance": self.redis,
        })
    }
}

/// One scenario's streams, opened once and then measured over one or more
/// publish windows.
struct Scenario<'a> {
    server: &'static str,
    mode: &'static str,
    servers: Vec<&'a Server>,
    http: reqwest::Client,
    sessions: Vec<Arc<Session>>,
    home: Vec<usize>,
    /// The server each session is published through.
    route: Vec<SocketAddr>,
    col: Arc<Collector>,
    logs: Vec<(usize, Seen)>,
    /// Events published to each session so far: the next sequence number.
    per_session: u64,
    /// Server CPU over the windows (the scheduler's count), and `stat`'s
    /// system time in it (in clock ticks).
    cpu: Duration,
    sys: Duration,
    secs: f64,
    /// CPU µs per delivery of each window, for the spread.
    windows: Vec<f64>,
    /// Per instance (Redis mode): Redis messages in, bytes in, deliveries
    /// from Redis, summed over the windows.
    redis: Vec<[u64; 3]>,
}

impl<'a> Scenario<'a> {
    /// Creates the sessions (split evenly between `servers`; in Redis mode
    /// each session is published through the *other* instance, so every
    /// delivery crosses Redis) and opens `streams` streams.
    async fn open(
        server: &'static str,
        mode: &'static str,
        servers: Vec<&'a Server>,
        streams: usize,
    ) -> Self {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("http client");
        let n_sessions = streams.div_ceil(FANOUT);
        let mut sessions = Vec::new();
        let mut home = Vec::new();
        for i in 0..n_sessions {
            let server = servers[i % servers.len()];
            sessions.push(Arc::new(create_session(&http, server.addr).await));
            home.push(i % servers.len());
        }
        let col = Collector::new();
        let mut logs = Vec::new();
        for (k, server) in servers.iter().enumerate() {
            let mine: Vec<_> = sessions
                .iter()
                .zip(&home)
                .filter(|(_, h)| **h == k)
                .map(|(s, _)| s.clone())
                .collect();
            let idx: Vec<usize> = (0..n_sessions).filter(|i| home[*i] == k).collect();
            for (local_i, log) in open_streams(server.addr, Via::Fresh, &mine, FANOUT, &col).await {
                logs.push((idx[local_i], log));
            }
        }
        let route = home
            .iter()
            .map(|h| servers[(h + 1) % servers.len()].addr)
            .collect();
        let redis = vec![[0; 3]; servers.len()];
        Self {
            server,
            mode,
            servers,
            http,
            sessions,
            home,
            route,
            col,
            logs,
            per_session: 0,
            cpu: Duration::ZERO,
            sys: Duration::ZERO,
            secs: 0.0,
            windows: Vec::new(),
            redis,
        }
    }

    /// One measured window: `secs` of publishing at `rate` publishes/s,
    /// until every delivery arrived (or 15 s passed).
    async fn window(&mut self, rate: f64, secs: f64) {
        // Only the real server has `/stats` (Redis counters).
        let before = if self.mode == "redis" {
            stats_of_all(&self.http, &self.servers).await
        } else {
            Vec::new()
        };
        let cpu0: Vec<(Duration, Duration)> = self.servers.iter().map(|s| s.cpu_split()).collect();
        let ns0: Vec<_> = self
            .servers
            .iter()
            .map(|s| procs::proc_thread_ns(s.pid()))
            .collect();
        let delivered0 = self.col.delivered.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let n = ((rate * secs) / self.sessions.len() as f64).ceil().max(1.0) as u64;
        let from = self.per_session;
        let failed = publish_all(
            &self.http,
            &self.sessions,
            &self.route,
            rate,
            from..from + n,
        )
        .await;
        assert_eq!(failed, 0, "publishes failed");
        self.per_session += n;
        self.col
            .wait_delivered(
                self.expected(),
                Duration::from_secs(15),
                Duration::from_millis(2),
            )
            .await;
        self.secs += t0.elapsed().as_secs_f64();
        let mut cpu = Duration::ZERO;
        for ((s, (u0, s0)), ns0) in self.servers.iter().zip(&cpu0).zip(&ns0) {
            let (u1, s1) = s.cpu_split();
            self.sys += s1 - *s0;
            // The scheduler's nanoseconds where they are complete; the
            // clock ticks otherwise.
            let precise = ns0.as_ref().and_then(|before| {
                procs::thread_ns_between(before, &procs::proc_thread_ns(s.pid())?)
            });
            cpu += precise.unwrap_or((u1 - *u0) + (s1 - *s0));
        }
        self.cpu += cpu;
        let delivered = self.col.delivered.load(Ordering::Relaxed) - delivered0;
        self.windows
            .push(cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64);
        if self.mode == "redis" {
            let after = stats_of_all(&self.http, &self.servers).await;
            for (k, sum) in self.redis.iter_mut().enumerate() {
                let d = |f: &str| {
                    after[k]["redis"][f].as_u64().unwrap_or(0)
                        - before[k]["redis"][f].as_u64().unwrap_or(0)
                };
                sum[0] += d("messages_in");
                sum[1] += d("bytes_in");
                sum[2] += d("received");
            }
        }
    }

    fn expected(&self) -> u64 {
        self.per_session * (self.sessions.len() * FANOUT) as u64
    }

    /// Counts loss and duplicates exactly and sums the windows up.
    async fn finish(self) -> FanoutResult {
        // A little more time for stragglers, so duplicates would show.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let col = &self.col;
        let delivered = col.delivered.load(Ordering::Relaxed);
        let unique = streams::unique(self.logs.iter().map(|(_, seen)| seen));
        let expected = self.expected();
        let published = self.per_session * self.sessions.len() as u64;
        let h = col.merged_latency();
        let redis = self
            .servers
            .iter()
            .zip(&self.redis)
            .enumerate()
            .filter(|_| self.mode == "redis")
            .map(|(k, (server, sum))| {
                let own_sessions = self.home.iter().filter(|h| **h == k).count() as u64;
                json!({
                    "instance": server.addr.to_string(),
                    "sessions_served": own_sessions,
                    "events_needed_by_own_clients": own_sessions * self.per_session,
                    "events_published_total": published,
                    "redis_messages_in": sum[0],
                    "redis_bytes_in": sum[1],
                    "delivered_from_redis": sum[2],
                })
            })
            .collect();
        let cpu = self.cpu;
        let result = FanoutResult {
            server: self.server,
            mode: self.mode,
            offered: 0.0,
            streams: self.logs.len(),
            sessions: self.sessions.len(),
            published,
            expected,
            delivered,
            lost: expected.saturating_sub(unique),
            duplicates: col.duplicates.load(Ordering::Relaxed),
            stream_errors: col.errors.load(Ordering::Relaxed),
            secs: self.secs,
            deliveries_per_sec: delivered as f64 / self.secs,
            server_cpu_secs: cpu.as_secs_f64(),
            server_sys_secs: self.sys.as_secs_f64(),
            cpu_us_per_delivery: cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64,
            window_cpu_us: self.windows,
            p50_ms: ms(&h, 0.50),
            p99_ms: ms(&h, 0.99),
            p999_ms: ms(&h, 0.999),
            max_ms: h.max() as f64 / 1000.0,
            redis,
        };
        eprintln!(
            "  {:9} {:5} {:>6} streams: {:>8.0} deliveries/s, {:.2} µs CPU/delivery, p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms, lost {} dup {}",
            result.server, result.mode, result.streams, result.deliveries_per_sec, result.cpu_us_per_delivery,
            result.p50_ms, result.p99_ms, result.p999_ms, result.lost, result.duplicates
        );
        result
    }
}

/// The local sweep at one load: every server's streams open at once, then
/// `rounds` rounds in which each server gets one window of `secs / rounds`
/// (each round in an order rotated by one, so none is always measured
/// right after the same one).
pub async fn local_sweep(
    servers: &[(Kind, &Server)],
    streams: usize,
    rate: f64,
    secs: f64,
    rounds: usize,
) -> Vec<FanoutResult> {
    let mut scenarios = Vec::new();
    for &(kind, server) in servers {
        scenarios.push(Scenario::open(kind.name(), "local", vec![server], streams).await);
    }
    // Let the servers finish the stream set-up work before measuring.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rounds = rounds.max(1);
    for round in 0..rounds {
        // Each round starts one server further on, so every server takes
        // every place in the order and follows every other one.
        let mut turn: Vec<usize> = (0..scenarios.len()).collect();
        turn.rotate_left(round % scenarios.len().max(1));
        for i in turn {
            // The previous window's server finishes what it does after
            // its last delivery (freeing, parking its threads) before the
            // next one is measured beside it.
            tokio::time::sleep(SETTLE).await;
            scenarios[i].window(rate, secs / rounds as f64).await;
        }
    }
    let mut out = Vec::new();
    for s in scenarios {
        let mut r = s.finish().await;
        r.offered = rate * FANOUT as f64;
        out.push(r);
    }
    out
}

/// One Redis-mode scenario on `servers`, in one window.
pub async fn redis_fanout(
    servers: &[&Server],
    streams: usize,
    rate: f64,
    secs: f64,
) -> FanoutResult {
    let mut s = Scenario::open("sse-scale", "redis", servers.to_vec(), streams).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    s.window(rate, secs).await;
    let mut r = s.finish().await;
    r.offered = rate * FANOUT as f64;
    r
}

/// `/stats` of each server, one after another.
async fn stats_of_all(http: &reqwest::Client, servers: &[&Server]) -> Vec<Value> {
    let mut out = Vec::new();
    for s in servers {
        out.push(sse_client::stats(http, s.addr, ADMIN).await);
    }
    out
}
