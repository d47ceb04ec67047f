//! Fan-out benchmark (see docs/benchmarks.md).
//!
//! Measures the release `sse-scale` binary against two baselines started
//! the same way, with the same load, in the same run (support/baselines.rs):
//! the **floor** (a minimal server that writes each pre-encoded frame to
//! every socket with one non-blocking write from the publishing task) and
//! **axum** (`Sse` over `tokio::sync::broadcast`, what a Rust user writes by
//! hand). Every server is its own process, so its CPU is utime+stime from
//! `/proc/<pid>/stat`; the load generator is in-process tokio (raw-TCP SSE
//! readers, a keep-alive publishing client) on the same two cores, which is
//! why every figure is reported as a ratio to the floor of the same run.
//!
//! Per run (`BENCH_RUNS`, three by default, one after the other):
//! - **local fan-out**: 2,000 streams per server, fan-out 100, at 10,000
//!   deliveries/s and at the highest load this machine sustains; CPU per
//!   delivery, p50/p99 publish-to-receive latency, exact loss and
//!   duplicates. Every server's streams are open at once and the servers
//!   take turns in short windows (`BENCH_ROUNDS`, five of 2 s each by
//!   default, each round's order rotated by one), so the floor and the
//!   product see the same machine: a neighbour's burst during one 10 s
//!   window used to move a ratio by 0.3;
//! - **Redis mode**: two `sse-scale` instances and a private `redis-server`,
//!   every event published through the other instance, same loads;
//! - **idle memory**: RSS per idle stream at 15,000 streams, for streams
//!   opened on a fresh connection, as the second request of a kept-alive
//!   connection, and (sse-scale only) as h2c streams;
//! - **churn**: 1,000 stream opens/s, each closed once `connected` arrived;
//!   CPU per open.
//!
//! Then once, **callgrind**: user-space instructions per delivery and per
//! stream open of each server under `valgrind --tool=callgrind` (counters
//! zeroed and dumped around the measured window), a figure that does not
//! move with the machine's noise.
//!
//! Writes `docs/bench/results.json` and `docs/bench/fanout.png`, prints the
//! Markdown tables, and exits non-zero on any loss, duplicate, stream error
//! or failed open. `BENCH_QUICK=1` runs a reduced sweep (a smoke test); the
//! other knobs are on [`Options`].

#[path = "support/baselines.rs"]
mod baselines;
#[path = "support/procs.rs"]
mod procs;
#[path = "../../tests/support/redis_server.rs"]
mod redis_server;
#[path = "support/server.rs"]
mod server;
#[path = "support/sse_client.rs"]
mod sse_client;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use server::BenchServer as Server;

use procs::{machine, today, ADMIN};
use redis_server::RedisServer;
use sse_client::{create_session, now_micros, parse_data, Session};

/// Streams per session in every fan-out scenario.
const FANOUT: usize = 100;
/// Publish rate of the latency/CPU sweep: 10,000 deliveries/s at fan-out 100.
const DELIVERIES_PER_SEC: u64 = 10_000;
/// The highest load the sweep offers: what this 2-core machine sustains
/// with the load generator on the same cores (see docs/benchmarks.md).
const HIGH_DELIVERIES_PER_SEC: u64 = 160_000;
/// Pause between two measured windows of the local sweep.
const SETTLE: Duration = Duration::from_millis(500);
/// Streams opened at once while setting up a scenario.
const OPEN_CONCURRENCY: usize = 256;

// ---------------------------------------------------------------- processes

/// Which server a process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The bench's minimal server (support/baselines.rs): the floor.
    Floor,
    /// axum `Sse` over `tokio::sync::broadcast` (support/baselines.rs).
    Axum,
    /// The release `sse-scale` binary.
    Product,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Floor => "floor",
            Kind::Axum => "axum",
            Kind::Product => "sse-scale",
        }
    }
}

/// Starts `kind` as instance `name` with `extra` settings.
fn start_server(kind: Kind, name: &str, extra: &[(&str, String)]) -> Server {
    // `BENCH_SERVER_WRAP="perf record -g -o /tmp/p.data --"` runs the
    // servers under a profiler (the CPU figures are then the wrapper's).
    let wrap = std::env::var("BENCH_SERVER_WRAP").unwrap_or_default();
    start_server_wrapped(kind, name, extra, &wrap)
}

/// Starts `kind` under `wrap` (a command line the server's own command is
/// appended to; empty for none).
fn start_server_wrapped(kind: Kind, name: &str, extra: &[(&str, String)], wrap: &str) -> Server {
    let product = env!("CARGO_BIN_EXE_sse-scale");
    let me = std::env::current_exe().expect("the bench binary's path");
    // A baseline is this bench binary itself, re-executed in a mode.
    let (bin, args): (&std::ffi::OsStr, &[&str]) = match kind {
        Kind::Product => (product.as_ref(), &[]),
        Kind::Floor => (me.as_os_str(), &["--baseline", "floor"]),
        Kind::Axum => (me.as_os_str(), &["--baseline", "axum"]),
    };
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(prog) => {
            let mut c = Command::new(prog);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(args);
    let mut env = vec![
        ("MAX_STREAMS", "19000".to_owned()),
        // Room for a reader that falls behind while the machine is
        // saturated: a slow load generator shows as latency, not as
        // streams cut for lagging.
        ("SSE_CLIENT_QUEUE", "1024".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    Server::start(
        cmd,
        name,
        &env,
        Box::new(|line: &str| {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("[server] {line}");
            }
        }),
    )
}

// ---------------------------------------------------------------- streams

/// What every stream reports; shared with the controller.
struct Collector {
    connected: AtomicUsize,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    errors: AtomicU64,
    /// Sharded so thousands of stream tasks rarely contend on one lock.
    latency: Vec<Mutex<Histogram<u64>>>,
}

impl Collector {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            connected: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: (0..64)
                .map(|_| {
                    Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram"))
                })
                .collect(),
        })
    }

    fn merged_latency(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        for h in &self.latency {
            all.add(&*h.lock().expect("histogram lock"))
                .expect("merge histograms");
        }
        all
    }
}

/// Per-stream record of which sequence numbers arrived (a bitset), so loss
/// and duplicates are exact even if events were reordered.
struct StreamLog {
    seen: Mutex<Vec<u64>>,
}

/// Opens one SSE stream over raw TCP and reads it until the connection ends.
/// Events carry `{"t": <publish µs>, "s": <sequence in session>}`.
async fn run_stream(
    addr: SocketAddr,
    via: Via,
    session: Arc<Session>,
    shard: usize,
    col: Arc<Collector>,
    log: Arc<StreamLog>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    if via == Via::H2c {
        return run_h2_stream(addr, session, col, permit).await;
    }
    // Held until this stream is connected (or has failed).
    let mut permit = Some(permit);
    let mut sock = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect failed: {e}");
            col.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = sock.set_nodelay(true);
    if via == Via::KeepAlive && !health_request(&mut sock).await {
        col.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let req = format!(
        "GET /sessions/{}/events?token={} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n",
        session.id, session.token
    );
    if sock.write_all(req.as_bytes()).await.is_err() {
        col.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut buf = vec![0u8; 4096];
    // Bytes of an incomplete line carried over to the next read.
    let mut carry: Vec<u8> = Vec::new();
    let mut connected = false;
    let mut lat: Vec<u64> = Vec::new();
    loop {
        let n = match sock.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        carry.extend_from_slice(&buf[..n]);
        let mut start = 0;
        let now = now_micros();
        let mut delivered = 0u64;
        let mut dups = 0u64;
        while let Some(pos) = carry[start..].iter().position(|&b| b == b'\n') {
            let line = &carry[start..start + pos];
            start += pos + 1;
            if !connected {
                if line.starts_with(b"HTTP/1.1 ") && !line.starts_with(b"HTTP/1.1 200") {
                    eprintln!("stream refused: {}", String::from_utf8_lossy(line));
                    col.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if line == b"event: connected" {
                    connected = true;
                    col.connected.fetch_add(1, Ordering::Relaxed);
                    permit.take();
                }
                continue;
            }
            if let Some((t, s)) = parse_data(line) {
                delivered += 1;
                lat.push(now.saturating_sub(t).max(1));
                let mut seen = log.seen.lock().expect("stream log lock");
                let (word, bit) = ((s / 64) as usize, s % 64);
                if seen.len() <= word {
                    seen.resize(word + 1, 0);
                }
                if seen[word] & (1 << bit) != 0 {
                    dups += 1;
                }
                seen[word] |= 1 << bit;
            }
        }
        carry.drain(..start);
        if delivered > 0 {
            col.delivered.fetch_add(delivered, Ordering::Relaxed);
            col.duplicates.fetch_add(dups, Ordering::Relaxed);
            let mut h = col.latency[shard % col.latency.len()]
                .lock()
                .expect("histogram lock");
            for v in lat.drain(..) {
                let _ = h.record(v);
            }
        }
    }
}

/// How a stream's request reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// As the first request of a new connection.
    Fresh,
    /// As the second request of a kept-alive connection (after a
    /// `GET /healthz`), as from a balancer that reuses upstream connections.
    KeepAlive,
    /// As one of many HTTP/2 streams on a prior-knowledge (h2c) connection.
    H2c,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Fresh => "fresh",
            Via::KeepAlive => "keep-alive",
            Via::H2c => "h2c",
        }
    }
}

/// Sends `GET /healthz` and reads the whole response, leaving the
/// connection ready for its next request.
async fn health_request(sock: &mut TcpStream) -> bool {
    if sock
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut res = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = res.parse(&buf) {
            let len: usize = res
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0);
            if res.code != Some(200) {
                return false;
            }
            if buf.len() >= head + len {
                return true;
            }
        }
    }
}

/// HTTP/2 streams share connections: this many per connection.
const H2_STREAMS_PER_CONN: usize = 100;

thread_local! {
    /// The current h2c connection of this load-generator thread and how
    /// many streams it carries.
    static H2_CONN: std::cell::RefCell<Option<(SocketAddr, usize, H2Sender)>> =
        const { std::cell::RefCell::new(None) };
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// A sender on an h2c connection with room for one more stream.
async fn h2_sender(addr: SocketAddr) -> Option<H2Sender> {
    let reuse = H2_CONN.with(|c| {
        let mut c = c.borrow_mut();
        match c.as_mut() {
            Some((a, n, tx)) if *a == addr && *n < H2_STREAMS_PER_CONN && tx.is_ready() => {
                *n += 1;
                Some(tx.clone())
            }
            _ => None,
        }
    });
    if reuse.is_some() {
        return reuse;
    }
    let tcp = TcpStream::connect(addr).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let (tx, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    H2_CONN.with(|c| *c.borrow_mut() = Some((addr, 1, tx.clone())));
    Some(tx)
}

/// One SSE stream as an HTTP/2 stream; read until it ends. Only used for
/// idle memory, so it just waits for `connected`.
async fn run_h2_stream(
    addr: SocketAddr,
    session: Arc<Session>,
    col: Arc<Collector>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    use http_body_util::BodyExt;
    let mut permit = Some(permit);
    let fail = |col: &Collector| {
        col.errors.fetch_add(1, Ordering::Relaxed);
    };
    let Some(mut tx) = h2_sender(addr).await else {
        return fail(&col);
    };
    let req = hyper::Request::get(format!(
        "http://{addr}/sessions/{}/events?token={}",
        session.id, session.token
    ))
    .header("accept", "text/event-stream")
    .body(http_body_util::Empty::new())
    .expect("request");
    let res = match tx.send_request(req).await {
        Ok(r) if r.status() == 200 => r,
        _ => return fail(&col),
    };
    let mut body = res.into_body();
    let mut seen = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            if permit.is_some() {
                seen.extend_from_slice(&data);
                if seen.windows(16).any(|w| w == b"event: connected") {
                    col.connected.fetch_add(1, Ordering::Relaxed);
                    permit.take();
                    seen = Vec::new();
                }
            }
        }
    }
}

/// Opens `per_session` streams for each session at `addr`; returns once
/// every stream has seen `connected` (or failed). At most
/// `OPEN_CONCURRENCY` streams are in their handshake at once, so the
/// listen backlog never overflows.
async fn open_streams(
    addr: SocketAddr,
    via: Via,
    sessions: &[Arc<Session>],
    per_session: usize,
    col: &Arc<Collector>,
) -> Vec<(usize, Arc<StreamLog>)> {
    let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let mut logs = Vec::new();
    let target = col.connected.load(Ordering::Relaxed)
        + col.errors.load(Ordering::Relaxed) as usize
        + sessions.len() * per_session;
    for (si, session) in sessions.iter().enumerate() {
        for _ in 0..per_session {
            let log = Arc::new(StreamLog {
                seen: Mutex::new(Vec::new()),
            });
            let permit = gate.clone().acquire_owned().await.expect("semaphore");
            let shard = logs.len();
            logs.push((si, log.clone()));
            tokio::spawn(run_stream(
                addr,
                via,
                session.clone(),
                shard,
                col.clone(),
                log,
                permit,
            ));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while col.connected.load(Ordering::Relaxed) + (col.errors.load(Ordering::Relaxed) as usize)
        < target
    {
        assert!(Instant::now() < deadline, "streams did not connect in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    logs
}

// ---------------------------------------------------------------- scenarios

/// One fan-out measurement.
#[derive(Clone, Debug)]
struct FanoutResult {
    /// `floor`, `axum` or `sse-scale`.
    server: &'static str,
    mode: &'static str,
    /// Offered deliveries/s (publishes/s × fan-out).
    offered: f64,
    streams: usize,
    sessions: usize,
    published: u64,
    expected: u64,
    delivered: u64,
    lost: u64,
    duplicates: u64,
    stream_errors: u64,
    secs: f64,
    deliveries_per_sec: f64,
    server_cpu_secs: f64,
    server_sys_secs: f64,
    cpu_us_per_delivery: f64,
    /// The same, per measured window.
    window_cpu_us: Vec<f64>,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// Per instance (Redis mode): messages/bytes from Redis vs events needed.
    redis: Vec<Value>,
}

impl FanoutResult {
    fn to_json(&self) -> Value {
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

/// Publishes events number `seq` to each session at `rate` publishes/s in
/// total. `route(i)` is the server session `i` is published through. Each
/// session's events go out one after another (its own task), so they are
/// published in sequence order.
async fn publish_all(
    http: &reqwest::Client,
    sessions: &[Arc<Session>],
    route: &[SocketAddr],
    rate: f64,
    seq: std::ops::Range<u64>,
) {
    let per_session_rate = rate / sessions.len() as f64;
    let period = Duration::from_secs_f64(1.0 / per_session_rate);
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        let (http, session, addr, failures, seq) = (
            http.clone(),
            session.clone(),
            route[i],
            failures.clone(),
            seq.clone(),
        );
        // Spread the sessions' ticks over one period so publishes are even.
        let offset = period.mul_f64(i as f64 / sessions.len() as f64);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let url = format!("http://{addr}/sessions/{}/events", session.id);
            let auth = format!("Bearer {}", session.token);
            for s in seq {
                tick.tick().await;
                if let Err(e) = sse_client::publish_numbered(&http, &url, &auth, s).await {
                    eprintln!("{e}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher task");
    }
    let failed = failures.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "publishes failed");
}

/// One scenario's streams, opened once and then measured over one or more
/// publish windows. The local sweep opens every server's streams first and
/// then gives the servers short windows in turn, so a drift of the shared
/// machine lands on all of them instead of on whichever ran during it.
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
    logs: Vec<(usize, Arc<StreamLog>)>,
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
            futures_join(&self.http, &self.servers).await
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
        publish_all(
            &self.http,
            &self.sessions,
            &self.route,
            rate,
            from..from + n,
        )
        .await;
        self.per_session += n;
        let expected = self.expected();
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.col.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
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
            let after = futures_join(&self.http, &self.servers).await;
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
        let unique: u64 = self
            .logs
            .iter()
            .map(|(_, log)| {
                let seen = log.seen.lock().expect("log");
                seen.iter().map(|w| w.count_ones() as u64).sum::<u64>()
            })
            .sum();
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
            p50_ms: h.value_at_quantile(0.50) as f64 / 1000.0,
            p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            p999_ms: h.value_at_quantile(0.999) as f64 / 1000.0,
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
async fn local_sweep(
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
async fn redis_fanout(servers: &[&Server], streams: usize, rate: f64, secs: f64) -> FanoutResult {
    let mut s = Scenario::open("sse-scale", "redis", servers.to_vec(), streams).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    s.window(rate, secs).await;
    let mut r = s.finish().await;
    r.offered = rate * FANOUT as f64;
    r
}

async fn futures_join(http: &reqwest::Client, servers: &[&Server]) -> Vec<Value> {
    let mut out = Vec::new();
    for s in servers {
        out.push(sse_client::stats(http, s.addr, ADMIN).await);
    }
    out
}

/// RSS per idle stream: RSS with `streams` idle streams minus RSS before,
/// every stream's request arriving `via` a fresh connection, a kept-alive
/// one, or h2c.
async fn idle_memory(kind: Kind, via: Via, streams: usize, env: &[(&str, String)]) -> Value {
    let server = start_server(kind, "bench-mem", env);
    let http = reqwest::Client::new();
    let sessions: Vec<Arc<Session>> = {
        let mut v = Vec::new();
        for _ in 0..streams.div_ceil(FANOUT) {
            v.push(Arc::new(create_session(&http, server.addr).await));
        }
        v
    };
    // Warm the server's allocator and runtime with one short round first,
    // so the baseline is a running server, not a freshly exec'd one.
    let warm = Collector::new();
    let _ = open_streams(server.addr, via, &sessions[..1], 10, &warm).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_kib();
    let col = Collector::new();
    let t0 = Instant::now();
    let per = streams / sessions.len();
    let _logs = open_streams(server.addr, via, &sessions, per, &col).await;
    let open_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss_kib();
    let opened = col.connected.load(Ordering::Relaxed);
    let per_stream = (after.saturating_sub(before)) as f64 * 1024.0 / opened.max(1) as f64;
    eprintln!(
        "  idle {:9} {:10}: {opened} streams open ({} failed) in {open_secs:.1} s; RSS {before} KiB → {after} KiB = {:.0} B/stream",
        kind.name(),
        via.name(),
        col.errors.load(Ordering::Relaxed),
        per_stream
    );
    json!({
        "server": kind.name(), "via": via.name(),
        "streams_requested": streams, "streams_open": opened,
        "open_failures": col.errors.load(Ordering::Relaxed),
        "rss_before_kib": before, "rss_after_kib": after,
        "bytes_per_stream": per_stream, "open_secs": open_secs,
    })
}

/// Connection churn: `rate` stream opens per second for `secs`, each stream
/// closed by its client as soon as it has seen `connected`. Reports server
/// CPU per open (the open, the stream's set-up and its close) and the
/// time to `connected`.
async fn churn(kind: Kind, rate: f64, secs: f64, env: &[(&str, String)]) -> Value {
    let server = start_server(kind, "bench-churn", env);
    let http = reqwest::Client::new();
    let mut sessions = Vec::new();
    for _ in 0..10 {
        sessions.push(Arc::new(create_session(&http, server.addr).await));
    }
    let addr = server.addr;
    let opened = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
    ));
    let total = (rate * secs) as u64;
    let cpu0 = server.cpu_split();
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let session = sessions[i as usize % sessions.len()].clone();
        let (opened, failed, hist) = (opened.clone(), failed.clone(), hist.clone());
        tasks.spawn(async move {
            let start = Instant::now();
            if open_and_close(addr, &session).await {
                opened.fetch_add(1, Ordering::Relaxed);
                let _ = hist
                    .lock()
                    .expect("histogram")
                    .record(start.elapsed().as_micros().max(1) as u64);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Reap finished opens so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let achieved = total as f64 / t0.elapsed().as_secs_f64();
    // Let the server see the last closes before reading its CPU.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (u1, s1) = server.cpu_split();
    let cpu = (u1 - cpu0.0) + (s1 - cpu0.1);
    let opened = opened.load(Ordering::Relaxed);
    let h = hist.lock().expect("histogram");
    let per_open = cpu.as_secs_f64() * 1e6 / opened.max(1) as f64;
    eprintln!(
        "  churn {:9}: {opened} opens ({} failed) at {achieved:.0}/s, {per_open:.1} µs CPU/open, connect p50 {:.2} ms p99 {:.2} ms",
        kind.name(),
        failed.load(Ordering::Relaxed),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
    );
    json!({
        "server": kind.name(), "offered_opens_per_sec": rate, "opens_per_sec": achieved,
        "opened": opened, "failed": failed.load(Ordering::Relaxed),
        "server_cpu_secs": cpu.as_secs_f64(), "cpu_us_per_open": per_open,
        "connect_ms": { "p50": h.value_at_quantile(0.5) as f64 / 1000.0, "p99": h.value_at_quantile(0.99) as f64 / 1000.0 },
    })
}

/// Opens one stream, waits for `connected`, and closes the connection.
async fn open_and_close(addr: SocketAddr, session: &Session) -> bool {
    let Ok(mut sock) = TcpStream::connect(addr).await else {
        return false;
    };
    let _ = sock.set_nodelay(true);
    let req = format!(
        "GET /sessions/{}/events?token={} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n",
        session.id, session.token
    );
    if sock.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Duration::from_secs(10);
    loop {
        match tokio::time::timeout(deadline, sock.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => return false,
        }
        if seen.windows(16).any(|w| w == b"event: connected") {
            return seen.starts_with(b"HTTP/1.1 200");
        }
    }
}

/// User-space instructions per delivery (and per stream open) under
/// `valgrind --tool=callgrind`: a stable figure beside the noisy CPU times.
/// The counters are zeroed when publishing starts and dumped when the last
/// delivery has arrived (`callgrind_control`), so set-up is not counted.
async fn callgrind(
    kind: Kind,
    streams: usize,
    rate: f64,
    secs: f64,
    env: &[(&str, String)],
) -> Value {
    let dir = std::env::temp_dir().join(format!(
        "sse-bench-cg-{}-{}",
        kind.name(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("callgrind dir");
    let out = dir.join("cg.out");
    let server = start_server_wrapped(
        kind,
        "bench-cg",
        env,
        &format!(
            "valgrind --tool=callgrind --callgrind-out-file={}",
            out.display()
        ),
    );
    let http = reqwest::Client::new();
    let n_sessions = streams.div_ceil(FANOUT);
    let mut sessions = Vec::new();
    for _ in 0..n_sessions {
        sessions.push(Arc::new(create_session(&http, server.addr).await));
    }
    let col = Collector::new();
    let zero = || {
        Command::new("callgrind_control")
            .env("HOST", "127.0.0.1")
            .env_remove("USER")
            .arg("-z")
            .arg(server.pid().to_string())
            .output()
            .expect("callgrind_control")
    };
    zero();
    let _logs = open_streams(server.addr, Via::Fresh, &sessions, FANOUT, &col).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let opens_ir = dump_ir(&server, &dir, "opens");
    let route = vec![server.addr; n_sessions];
    let publishes = rate / FANOUT as f64;
    let per_session = ((publishes * secs) / n_sessions as f64).ceil().max(1.0) as u64;
    zero();
    publish_all(&http, &sessions, &route, publishes, 0..per_session).await;
    let published = per_session * n_sessions as u64;
    let expected = published * FANOUT as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while col.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ir = dump_ir(&server, &dir, "deliveries");
    let delivered = col.delivered.load(Ordering::Relaxed);
    let opened = col.connected.load(Ordering::Relaxed) as u64;
    let per_delivery = ir as f64 / delivered.max(1) as f64;
    let per_open = opens_ir as f64 / opened.max(1) as f64;
    eprintln!(
        "  callgrind {:9}: {delivered}/{expected} deliveries, {per_delivery:.0} instructions/delivery (publish included); {opened} opens, {per_open:.0} instructions/open",
        kind.name()
    );
    drop(server);
    if std::env::var_os("BENCH_CG_KEEP").is_some() {
        // For `callgrind_annotate`: the dumps `opens` and `deliveries`.
        eprintln!(
            "  callgrind {:9}: dumps kept in {}",
            kind.name(),
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    json!({
        "server": kind.name(), "streams": streams, "deliveries": delivered, "expected": expected,
        "instructions": ir, "instructions_per_delivery": per_delivery,
        "opens": opened, "open_instructions": opens_ir, "instructions_per_open": per_open,
    })
}

/// Dumps the callgrind counters of `server` and returns the instructions
/// counted since they were last zeroed.
fn dump_ir(server: &Server, dir: &Path, label: &str) -> u64 {
    let before: Vec<_> = std::fs::read_dir(dir)
        .expect("callgrind dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let ctl = Command::new("callgrind_control")
        .args(["-d", label, &server.pid().to_string()])
        // vgdb finds the server by `$USER` and `$HOST` in its pipe names,
        // and the server runs with `HOST=127.0.0.1`.
        .env("HOST", "127.0.0.1")
        .env_remove("USER")
        .output()
        .expect("callgrind_control");
    assert!(
        String::from_utf8_lossy(&ctl.stdout).contains("OK"),
        "callgrind_control -d: {} {}",
        String::from_utf8_lossy(&ctl.stdout),
        String::from_utf8_lossy(&ctl.stderr)
    );
    // The dump is a new file `cg.out.<n>`; its `summary:` line is the total.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for e in std::fs::read_dir(dir).expect("callgrind dir").flatten() {
            let p = e.path();
            if before.contains(&p) {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            if let Some(total) = text.lines().find_map(|l| {
                l.strip_prefix("summary:")
                    .or_else(|| l.strip_prefix("totals:"))
            }) {
                return total
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no callgrind dump in {}: {:?}",
            dir.display(),
            std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------- output

/// What to run. The defaults are the documented benchmark; the variables
/// exist for profiling one scenario at a time.
struct Options {
    /// `BENCH_ONLY=local,redis,idle,churn,callgrind` (default: all).
    only: Option<Vec<String>>,
    /// `BENCH_RUNS` — consecutive runs of every scenario (3).
    runs: usize,
    /// `BENCH_STREAMS=2000` — stream counts of the fan-out sweep.
    streams: Vec<usize>,
    /// `BENCH_SECS` — publishing time of each server at each load.
    secs: f64,
    /// `BENCH_ROUNDS` — how many windows the local sweep splits that time
    /// into, the servers taking turns (5).
    rounds: usize,
    /// `BENCH_RATES=10000,30000` — offered deliveries/s (publishes/s ×
    /// fan-out); the last is the highest load this machine sustains.
    rates: Vec<u64>,
    /// `BENCH_SERVERS=floor,axum,sse-scale` — which servers the local
    /// sweep, idle memory and churn run.
    servers: Vec<Kind>,
    /// `BENCH_IDLE_STREAMS` — streams of the idle-memory run.
    idle_streams: usize,
    /// `BENCH_CHURN_RATE`, `BENCH_CHURN_SECS` — stream opens/s and for how long.
    churn_rate: f64,
    churn_secs: f64,
    /// `BENCH_CG_STREAMS`, `BENCH_CG_RATE`, `BENCH_CG_SECS` — the callgrind
    /// run; `BENCH_CG_KEEP=1` keeps its dumps for `callgrind_annotate`.
    cg_streams: usize,
    cg_rate: f64,
    cg_secs: f64,
    /// `BENCH_SERVER_ENV=K=V,K=V` — extra environment for `sse-scale`.
    server_env: Vec<(String, String)>,
    /// `BENCH_OUT` — where results go (default `docs/bench`).
    out: PathBuf,
}

impl Options {
    fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let quick = var("BENCH_QUICK").is_some();
        let list = |k: &str, default: &str| -> Vec<String> {
            var(k)
                .unwrap_or_else(|| default.to_owned())
                .split(',')
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect()
        };
        let num = |k: &str, default: f64| -> f64 {
            var(k).map_or(default, |v| {
                v.parse().unwrap_or_else(|_| panic!("{k}: a number"))
            })
        };
        Self {
            only: var("BENCH_ONLY").map(|v| v.split(',').map(str::to_owned).collect()),
            runs: num("BENCH_RUNS", if quick { 1.0 } else { 3.0 }) as usize,
            streams: list("BENCH_STREAMS", if quick { "1000" } else { "2000" })
                .iter()
                .map(|n| n.parse().expect("BENCH_STREAMS: numbers"))
                .collect(),
            secs: num("BENCH_SECS", if quick { 3.0 } else { 10.0 }),
            rounds: num("BENCH_ROUNDS", if quick { 1.0 } else { 5.0 }) as usize,
            rates: list(
                "BENCH_RATES",
                &format!("{DELIVERIES_PER_SEC},{HIGH_DELIVERIES_PER_SEC}"),
            )
            .iter()
            .map(|n| n.parse().expect("BENCH_RATES: deliveries/s"))
            .collect(),
            servers: list("BENCH_SERVERS", "floor,axum,sse-scale")
                .iter()
                .map(|n| match n.as_str() {
                    "floor" => Kind::Floor,
                    "axum" => Kind::Axum,
                    "sse-scale" => Kind::Product,
                    other => panic!("BENCH_SERVERS: unknown server {other:?}"),
                })
                .collect(),
            idle_streams: num("BENCH_IDLE_STREAMS", if quick { 2_000.0 } else { 15_000.0 })
                as usize,
            churn_rate: num("BENCH_CHURN_RATE", 1_000.0),
            churn_secs: num("BENCH_CHURN_SECS", if quick { 2.0 } else { 10.0 }),
            cg_streams: num("BENCH_CG_STREAMS", 200.0) as usize,
            cg_rate: num("BENCH_CG_RATE", 2_000.0),
            cg_secs: num("BENCH_CG_SECS", if quick { 1.0 } else { 5.0 }),
            server_env: var("BENCH_SERVER_ENV")
                .map(|v| {
                    v.split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            out: procs::bench_out(),
        }
    }

    fn run(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == scenario))
    }

    fn to_json(&self) -> Value {
        json!({
            "only": self.only, "runs": self.runs, "streams": self.streams, "secs": self.secs, "rounds": self.rounds,
            "deliveries_per_sec": self.rates,
            "servers": self.servers.iter().map(|k| k.name()).collect::<Vec<_>>(),
            "idle_streams": self.idle_streams,
            "churn_opens_per_sec": self.churn_rate, "churn_secs": self.churn_secs,
            "callgrind": { "streams": self.cg_streams, "deliveries_per_sec": self.cg_rate, "secs": self.cg_secs },
            "server_env": self.server_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        })
    }
}

/// CPU per delivery and p99 latency against offered load, each as a ratio
/// to the floor of the same run (one point per run and load).
fn plot(runs: &[RunResults], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    // Text needs a TrueType font; use DejaVu Sans when the system has it
    // (fonts-dejavu-core), otherwise draw the plot without labels.
    let font = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
        .iter()
        .find_map(|p| std::fs::read(p).ok());
    let text = match font {
        Some(bytes) => {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        }
        None => false,
    };
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let halves = root.split_horizontally(600);
    // (label, colour, ratio of what, to the floor)
    type Pick = fn(&RunResults, u64) -> Option<f64>;
    let cpu: [(&str, RGBColor, Pick); 3] = [
        ("axum Sse", RED, |r, rate| {
            r.ratio(Kind::Axum, "local", rate, |f| f.cpu_us_per_delivery)
        }),
        ("sse-scale local", BLUE, |r, rate| {
            r.ratio(Kind::Product, "local", rate, |f| f.cpu_us_per_delivery)
        }),
        ("sse-scale Redis (2 instances)", MAGENTA, |r, rate| {
            r.ratio(Kind::Product, "redis", rate, |f| f.cpu_us_per_delivery)
        }),
    ];
    let p99: [(&str, RGBColor, Pick); 3] = [
        ("axum Sse", RED, |r, rate| {
            r.ratio(Kind::Axum, "local", rate, |f| f.p99_ms)
        }),
        ("sse-scale local", BLUE, |r, rate| {
            r.ratio(Kind::Product, "local", rate, |f| f.p99_ms)
        }),
        ("sse-scale Redis (2 instances)", MAGENTA, |r, rate| {
            r.ratio(Kind::Product, "redis", rate, |f| f.p99_ms)
        }),
    ];
    let rates: Vec<u64> = runs
        .first()
        .map(|r| {
            let mut v: Vec<u64> = r.local.iter().map(|f| f.offered as u64).collect();
            v.sort_unstable();
            v.dedup();
            v
        })
        .unwrap_or_default();
    let max_x = rates.iter().copied().max().unwrap_or(1) as f64 * 1.1;
    for ((area, picks), (title, target)) in [halves.0, halves.1].iter().zip([cpu, p99]).zip([
        ("server CPU per delivery ÷ floor", 1.05_f64),
        ("p99 latency ÷ floor", 1.2_f64),
    ]) {
        let mut max_y: f64 = target * 1.5;
        for r in runs {
            for &rate in &rates {
                for (_, _, f) in &picks {
                    max_y = f(r, rate).map_or(max_y, |v| max_y.max(v * 1.1));
                }
            }
        }
        let mut chart = ChartBuilder::on(area);
        chart.margin(15).x_label_area_size(40).y_label_area_size(55);
        if text {
            chart.caption(title, ("sans-serif", 18));
        }
        let mut c = chart.build_cartesian_2d(0f64..max_x, 0f64..max_y)?;
        if text {
            c.configure_mesh()
                .x_desc("offered deliveries/s (2,000 streams, fan-out 100)")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc("× floor")
                .draw()?;
        } else {
            c.configure_mesh().x_labels(0).y_labels(0).draw()?;
        }
        for (label, color, f) in picks {
            // One line through the runs' median, a dot per run.
            let median: Vec<(f64, f64)> = rates
                .iter()
                .filter_map(|&rate| {
                    let mut v: Vec<f64> = runs.iter().filter_map(|r| f(r, rate)).collect();
                    v.sort_by(f64::total_cmp);
                    v.get(v.len() / 2).map(|m| (rate as f64, *m))
                })
                .collect();
            let s = c.draw_series(LineSeries::new(median, color.stroke_width(2)))?;
            if text {
                s.label(label).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
            for r in runs {
                c.draw_series(rates.iter().filter_map(|&rate| {
                    f(r, rate).map(|v| Circle::new((rate as f64, v), 3, color.filled()))
                }))?;
            }
        }
        let floor = c.draw_series(LineSeries::new([(0.0, 1.0), (max_x, 1.0)], BLACK))?;
        if text {
            floor
                .label("floor")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK));
        }
        let goal = c.draw_series(LineSeries::new(
            [(0.0, target), (max_x, target)],
            BLACK.mix(0.4),
        ))?;
        if text {
            goal.label(format!("target {target}×"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.4)));
            c.configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

/// Everything one run measured.
#[derive(Default)]
struct RunResults {
    local: Vec<FanoutResult>,
    redis: Vec<FanoutResult>,
    idle: Vec<Value>,
    churn: Vec<Value>,
}

impl RunResults {
    fn find(&self, kind: Kind, mode: &str, rate: u64) -> Option<&FanoutResult> {
        let list = if mode == "redis" {
            &self.redis
        } else {
            &self.local
        };
        list.iter()
            .find(|f| f.server == kind.name() && f.offered as u64 == rate)
    }

    /// `what` of `kind` in `mode` at `rate`, divided by the floor's (local).
    fn ratio(
        &self,
        kind: Kind,
        mode: &str,
        rate: u64,
        what: fn(&FanoutResult) -> f64,
    ) -> Option<f64> {
        let floor = self.find(Kind::Floor, "local", rate)?;
        Some(what(self.find(kind, mode, rate)?) / what(floor))
    }

    fn idle(&self, kind: Kind, via: Via) -> Option<f64> {
        self.idle
            .iter()
            .find(|v| v["server"] == kind.name() && v["via"] == via.name())
            .and_then(|v| v["bytes_per_stream"].as_f64())
    }

    fn churn(&self, kind: Kind) -> Option<f64> {
        self.churn
            .iter()
            .find(|v| v["server"] == kind.name())
            .and_then(|v| v["cpu_us_per_open"].as_f64())
    }

    fn bad(&self) -> u64 {
        let fan: u64 = self
            .local
            .iter()
            .chain(&self.redis)
            .map(|r| r.lost + r.duplicates + r.stream_errors)
            .sum();
        let idle: u64 = self
            .idle
            .iter()
            .map(|v| v["open_failures"].as_u64().unwrap_or(0))
            .sum();
        let churn: u64 = self
            .churn
            .iter()
            .map(|v| v["failed"].as_u64().unwrap_or(0))
            .sum();
        fan + idle + churn
    }

    fn to_json(&self) -> Value {
        json!({
            "local": self.local.iter().map(FanoutResult::to_json).collect::<Vec<_>>(),
            "redis": self.redis.iter().map(FanoutResult::to_json).collect::<Vec<_>>(),
            "idle_memory": self.idle,
            "churn": self.churn,
        })
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}"))
}

/// The Markdown summary pasted into docs/benchmarks.md.
fn summary(runs: &[RunResults], opts: &Options, cg: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n| run | server | mode | streams | offered/s | delivered/s | CPU µs/delivery | ÷ floor | p50 ms | p99 ms | p99 ÷ floor | lost | dup |");
    let _ = writeln!(
        out,
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (i, r) in runs.iter().enumerate() {
        for f in r.local.iter().chain(&r.redis) {
            let kind = match f.server {
                "floor" => Kind::Floor,
                "axum" => Kind::Axum,
                _ => Kind::Product,
            };
            let rate = f.offered as u64;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} | {:.2} | {} | {:.2} | {:.2} | {} | {} | {} |",
                i + 1,
                f.server,
                f.mode,
                f.streams,
                rate,
                f.deliveries_per_sec,
                f.cpu_us_per_delivery,
                fmt_ratio(r.ratio(kind, f.mode, rate, |x| x.cpu_us_per_delivery)),
                f.p50_ms,
                f.p99_ms,
                fmt_ratio(r.ratio(kind, f.mode, rate, |x| x.p99_ms)),
                f.lost,
                f.duplicates
            );
        }
    }
    let _ = writeln!(out, "\nTargets per run (sse-scale ÷ floor unless noted):\n");
    let _ = writeln!(out, "| run | CPU/delivery ÷ floor at {} | p99 ÷ floor at {} | Redis ÷ local CPU at {} | Redis p99 ms | idle B/stream fresh / keep-alive / h2c (floor fresh, axum fresh) | churn µs/open (÷ floor) |",
        opts.rates.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" / "),
        opts.rates.last().copied().unwrap_or(0),
        opts.rates.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" / "));
    let _ = writeln!(out, "|---:|---|---|---|---|---|---|");
    for (i, r) in runs.iter().enumerate() {
        let high = opts.rates.last().copied().unwrap_or(0);
        let cpu: Vec<String> = opts
            .rates
            .iter()
            .map(|&rate| {
                fmt_ratio(r.ratio(Kind::Product, "local", rate, |f| f.cpu_us_per_delivery))
            })
            .collect();
        let redis: Vec<String> = opts
            .rates
            .iter()
            .map(|&rate| {
                fmt_ratio(
                    r.find(Kind::Product, "redis", rate)
                        .zip(r.find(Kind::Product, "local", rate))
                        .map(|(a, b)| a.cpu_us_per_delivery / b.cpu_us_per_delivery),
                )
            })
            .collect();
        let redis_p99: Vec<String> = opts
            .rates
            .iter()
            .map(|&rate| {
                r.find(Kind::Product, "redis", rate)
                    .map_or("–".to_owned(), |f| format!("{:.2}", f.p99_ms))
            })
            .collect();
        let b = |k, v| r.idle(k, v).map_or("–".to_owned(), |b| format!("{b:.0}"));
        let churn = r.churn(Kind::Product).map_or("–".to_owned(), |c| {
            format!(
                "{c:.1} ({})",
                fmt_ratio(r.churn(Kind::Floor).map(|f| c / f))
            )
        });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} / {} / {} ({}, {}) | {} |",
            i + 1,
            cpu.join(" / "),
            fmt_ratio(r.ratio(Kind::Product, "local", high, |f| f.p99_ms)),
            redis.join(" / "),
            redis_p99.join(" / "),
            b(Kind::Product, Via::Fresh),
            b(Kind::Product, Via::KeepAlive),
            b(Kind::Product, Via::H2c),
            b(Kind::Floor, Via::Fresh),
            b(Kind::Axum, Via::Fresh),
            churn
        );
    }
    if !runs.iter().all(|r| r.idle.is_empty()) {
        let _ = writeln!(
            out,
            "\n| run | server | via | streams open | failed | RSS before → after KiB | B/stream |"
        );
        let _ = writeln!(out, "|---:|---|---|---:|---:|---|---:|");
        for (i, r) in runs.iter().enumerate() {
            for v in &r.idle {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} → {} | {:.0} |",
                    i + 1,
                    v["server"].as_str().unwrap_or(""),
                    v["via"].as_str().unwrap_or(""),
                    v["streams_open"],
                    v["open_failures"],
                    v["rss_before_kib"],
                    v["rss_after_kib"],
                    v["bytes_per_stream"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    if !runs.iter().all(|r| r.churn.is_empty()) {
        let _ = writeln!(out, "\n| run | server | opens/s | opened | failed | CPU µs/open | ÷ floor | connect p50 ms | p99 ms |");
        let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for (i, r) in runs.iter().enumerate() {
            for v in &r.churn {
                let kind = match v["server"].as_str() {
                    Some("floor") => Kind::Floor,
                    Some("axum") => Kind::Axum,
                    _ => Kind::Product,
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {} | {} | {:.1} | {} | {:.2} | {:.2} |",
                    i + 1,
                    v["server"].as_str().unwrap_or(""),
                    v["opens_per_sec"].as_f64().unwrap_or(0.0),
                    v["opened"],
                    v["failed"],
                    v["cpu_us_per_open"].as_f64().unwrap_or(0.0),
                    fmt_ratio(r.churn(kind).zip(r.churn(Kind::Floor)).map(|(a, b)| a / b)),
                    v["connect_ms"]["p50"].as_f64().unwrap_or(0.0),
                    v["connect_ms"]["p99"].as_f64().unwrap_or(0.0),
                );
            }
        }
    }
    if !cg.is_empty() {
        let floor = cg
            .iter()
            .find(|v| v["server"] == "floor")
            .and_then(|v| v["instructions_per_delivery"].as_f64());
        let floor_open = cg
            .iter()
            .find(|v| v["server"] == "floor")
            .and_then(|v| v["instructions_per_open"].as_f64());
        let _ = writeln!(out, "\n| callgrind | deliveries | instructions/delivery | ÷ floor | instructions/open | ÷ floor |");
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        for v in cg {
            let d = v["instructions_per_delivery"].as_f64().unwrap_or(0.0);
            let o = v["instructions_per_open"].as_f64().unwrap_or(0.0);
            let _ = writeln!(
                out,
                "| {} | {} | {d:.0} | {} | {o:.0} | {} |",
                v["server"].as_str().unwrap_or(""),
                v["deliveries"],
                fmt_ratio(floor.map(|f| d / f)),
                fmt_ratio(floor_open.map(|f| o / f)),
            );
        }
    }
    out
}

fn main() {
    // A baseline server is this binary re-executed (see support/baselines.rs).
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--baseline") {
        baselines::run(args.get(i + 1).map_or("", String::as_str));
    }
    // Both ends of every stream live on this machine: the load generator
    // needs one socket per stream too.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-file limit");
    let opts = Options::from_env();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let started = Instant::now();
    eprintln!(
        "fan-out benchmark (open-file limit {nofile}; server {})",
        env!("CARGO_BIN_EXE_sse-scale")
    );
    // Leaked once: the names live as long as the benchmark.
    let server_env: Vec<(&'static str, String)> = opts
        .server_env
        .iter()
        .map(|(k, v)| (&*Box::leak(k.clone().into_boxed_str()), v.clone()))
        .collect();
    let env_for = |kind: Kind, mut v: Vec<(&'static str, String)>| {
        if kind == Kind::Product {
            v.extend(server_env.iter().cloned());
        }
        v
    };

    let (runs, cg) = runtime.block_on(async {
        let mut runs = Vec::new();
        for run in 0..opts.runs {
            eprintln!("run {} of {}:", run + 1, opts.runs);
            // The servers take turns going first, so a drift of the shared
            // machine within a run does not always favour the same one.
            let mut order = opts.servers.clone();
            let turn = run % order.len().max(1);
            order.rotate_left(turn);
            let mut r = RunResults::default();
            for &rate in &opts.rates {
                let publishes = rate as f64 / FANOUT as f64;
                for &n in &opts.streams {
                    if opts.run("local") {
                        let servers: Vec<(Kind, Server)> = order
                            .iter()
                            .map(|&k| (k, start_server(k, "bench-local", &env_for(k, vec![]))))
                            .collect();
                        let refs: Vec<(Kind, &Server)> =
                            servers.iter().map(|(k, s)| (*k, s)).collect();
                        r.local
                            .extend(local_sweep(&refs, n, publishes, opts.secs, opts.rounds).await);
                    }
                    if opts.run("redis") {
                        let redis = RedisServer::start();
                        let env = env_for(
                            Kind::Product,
                            vec![
                                ("SSE_ADAPTER", "redis".to_owned()),
                                ("REDIS_URL", redis.url()),
                                ("FF_REDIS_SSE_BROADCAST", "true".to_owned()),
                            ],
                        );
                        let a = start_server(Kind::Product, "bench-a", &env);
                        let b = start_server(Kind::Product, "bench-b", &env);
                        r.redis
                            .push(redis_fanout(&[&a, &b], n, publishes, opts.secs).await);
                    }
                }
            }
            if opts.run("idle") {
                for &kind in &order {
                    let vias: &[Via] = match kind {
                        Kind::Product => &[Via::Fresh, Via::KeepAlive, Via::H2c],
                        _ => &[Via::Fresh, Via::KeepAlive],
                    };
                    for &via in vias {
                        r.idle.push(
                            idle_memory(kind, via, opts.idle_streams, &env_for(kind, vec![])).await,
                        );
                    }
                }
            }
            if opts.run("churn") {
                for &kind in &order {
                    r.churn.push(
                        churn(
                            kind,
                            opts.churn_rate,
                            opts.churn_secs,
                            &env_for(kind, vec![]),
                        )
                        .await,
                    );
                }
            }
            runs.push(r);
        }
        let mut cg = Vec::new();
        if opts.run("callgrind") {
            for &kind in &opts.servers {
                cg.push(
                    callgrind(
                        kind,
                        opts.cg_streams,
                        opts.cg_rate,
                        opts.cg_secs,
                        &env_for(kind, vec![]),
                    )
                    .await,
                );
            }
        }
        (runs, cg)
    });

    let dir = opts.out.clone();
    std::fs::create_dir_all(&dir).expect("create docs/bench");
    let results = json!({
        "date": today(),
        "command": "cargo bench -p sse-scale-server --bench fanout",
        "options": opts.to_json(),
        "machine": machine(),
        "load_generator": "in-process tokio, raw TCP streams, on the same machine as the servers",
        "fanout_streams_per_session": FANOUT,
        "runs": runs.iter().map(RunResults::to_json).collect::<Vec<_>>(),
        "callgrind": cg,
        "elapsed_secs": started.elapsed().as_secs_f64(),
    });
    let json_path = dir.join("results.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&results).expect("json") + "\n",
    )
    .expect("write results.json");
    let png = dir.join("fanout.png");
    if runs.iter().any(|r| !r.local.is_empty()) {
        if let Err(e) = plot(&runs, &png) {
            eprintln!("plot failed: {e}");
        }
    }
    let mut out = summary(&runs, &opts, &cg);
    let _ = writeln!(
        out,
        "\nwrote {} and {} in {:.0} s",
        json_path.display(),
        png.display(),
        started.elapsed().as_secs_f64()
    );
    println!("{out}");
    if runs.iter().map(RunResults::bad).sum::<u64>() > 0 {
        eprintln!("FAILED: loss, duplicates, stream errors or failed opens (see above)");
        std::process::exit(1);
    }
}
