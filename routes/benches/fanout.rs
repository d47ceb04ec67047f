//! Fan-out benchmark (see docs/benchmarks.md).
//!
//! Starts the release `sse-scale` binary itself (one instance in local mode;
//! two instances plus a private `redis-server` with `FF_REDIS_SSE_BROADCAST`
//! on), opens SSE streams over raw TCP from an in-process load generator,
//! publishes timestamped events through `POST /sessions/{id}/events`, and
//! reports server CPU per delivery (utime+stime from `/proc/<pid>/stat`),
//! deliveries/s, publish-to-receive latency, RSS per idle stream, Redis
//! messages/bytes per instance, and loss/duplicates.
//!
//! Writes `docs/bench/results.json` and `docs/bench/fanout.png`.
//!
//! `BENCH_QUICK=1` runs a reduced sweep (for a smoke test).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const SECRET: &str = "bench-secret-of-at-least-32-bytes-0123456789";
const ADMIN: &str = "bench-admin-token-0123456789";
/// Streams per session in every fan-out scenario.
const FANOUT: usize = 100;
/// Publish rate of the latency/CPU sweep: 10,000 deliveries/s at fan-out 100.
const DELIVERIES_PER_SEC: u64 = 10_000;
/// Streams opened at once while setting up a scenario.
const OPEN_CONCURRENCY: usize = 256;

// ---------------------------------------------------------------- processes

/// A running `sse-scale` process; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(name: &str, extra: &[(&str, String)]) -> Server {
        let bin = env!("CARGO_BIN_EXE_sse-scale");
        // `BENCH_SERVER_WRAP="perf record -g -o /tmp/p.data --"` runs the
        // servers under a profiler (the CPU figures are then the wrapper's).
        let wrap = std::env::var("BENCH_SERVER_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(prog) => {
                let mut c = Command::new(prog);
                c.args(words).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.env_clear()
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("INSTANCE_ID", name)
            .env("SESSION_SECRET", SECRET)
            .env("ADMIN_TOKEN", ADMIN)
            // The load generator shares one address; per-IP and per-session
            // limits would throttle the benchmark, not a real deployment.
            .env("RATE_LIMIT_PUBLISH_PER_SEC", "0")
            .env("RATE_LIMIT_STREAMS_PER_MIN", "0")
            .env("RATE_LIMIT_SESSIONS_PER_MIN", "0")
            .env("MAX_STREAMS", "19000")
            .env("SSE_CLIENT_QUEUE", "1024")
            // End quickly when the benchmark is done with a server.
            .env("SHUTDOWN_UNREADY_SECS", "0")
            .env("SHUTDOWN_DRAIN_SECS", "0")
            .env("SHUTDOWN_GRACE_SECS", "2")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the sse-scale binary");
        let stderr = child.stderr.take().expect("server stderr");
        let (tx, rx) = mpsc::channel();
        // Drains the log for the whole run so the server never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("addr=").nth(1) {
                    if let Some(tx) = tx.take() {
                        let addr = addr.split_whitespace().next().unwrap_or("").to_owned();
                        let _ = tx.send(addr);
                    }
                }
                if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("[server] {line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("server did not log its address")
            .parse()
            .expect("server address");
        Server { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cpu_split(&self) -> (Duration, Duration) {
        proc_cpu_split(self.pid())
    }

    fn rss_kib(&self) -> u64 {
        proc_rss_kib(self.pid())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first, so a profiler wrapping the server writes its data.
        // SAFETY: kill has no memory preconditions; the pid is our child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private `redis-server` on a free port, without persistence.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        #[allow(clippy::zombie_processes)] // waited for in Drop
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (tests/run-all.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Redis { child, port };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {port} did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// User and system CPU time of a process (all threads), from `/proc/<pid>/stat`.
fn proc_cpu_split(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
    // The command name may contain spaces; fields are counted after its ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line (11, 12 here).
    let user: u64 = fields[11].parse().expect("utime");
    let sys: u64 = fields[12].parse().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let time = |ticks: u64| Duration::from_nanos(ticks * 1_000_000_000 / hz);
    (time(user), time(sys))
}

/// Resident set size in KiB, from `/proc/<pid>/status`.
fn proc_rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/pid/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/pid/status")
}

// ---------------------------------------------------------------- HTTP client

struct Session {
    id: String,
    token: String,
}

async fn create_session(http: &reqwest::Client, server: &Server) -> Session {
    let v: Value = http
        .post(format!("http://{}/sessions", server.addr))
        .send()
        .await
        .expect("POST /sessions")
        .json()
        .await
        .expect("session JSON");
    Session {
        id: v["id"].as_str().expect("id").to_owned(),
        token: v["token"].as_str().expect("token").to_owned(),
    }
}

async fn stats(http: &reqwest::Client, server: &Server) -> Value {
    http.get(format!("http://{}/stats", server.addr))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("GET /stats")
        .json()
        .await
        .expect("stats JSON")
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
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
    session: Arc<Session>,
    shard: usize,
    col: Arc<Collector>,
    log: Arc<StreamLog>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
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

/// `data: {"t":123,"s":4}` → `(123, 4)`.
fn parse_data(line: &[u8]) -> Option<(u64, u64)> {
    let rest = line.strip_prefix(b"data: {\"t\":")?;
    let comma = rest.iter().position(|&b| b == b',')?;
    let t = std::str::from_utf8(&rest[..comma]).ok()?.parse().ok()?;
    let rest = rest[comma..].strip_prefix(b",\"s\":")?;
    let end = rest.iter().position(|&b| b == b'}')?;
    let s = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
    Some((t, s))
}

/// Opens `per_session` streams for each session at `addr`; returns once
/// every stream has seen `connected` (or failed). At most
/// `OPEN_CONCURRENCY` streams are in their handshake at once, so the
/// listen backlog never overflows.
async fn open_streams(
    addr: SocketAddr,
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
    mode: &'static str,
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
            "mode": self.mode, "streams": self.streams, "sessions": self.sessions,
            "fanout": FANOUT, "published": self.published, "expected_deliveries": self.expected,
            "delivered": self.delivered, "lost": self.lost, "duplicates": self.duplicates,
            "stream_errors": self.stream_errors, "publish_window_secs": self.secs,
            "deliveries_per_sec": self.deliveries_per_sec, "server_cpu_secs": self.server_cpu_secs,
            "server_sys_secs": self.server_sys_secs,
            "cpu_us_per_delivery": self.cpu_us_per_delivery,
            "latency_ms": { "p50": self.p50_ms, "p99": self.p99_ms, "p99_9": self.p999_ms, "max": self.max_ms },
            "redis_per_instance": self.redis,
        })
    }
}

/// Publishes `per_session` events to each session at `rate` publishes/s in
/// total. `route(i)` is the server session `i` is published through. Each
/// session's events go out one after another (its own task), so they are
/// published in sequence order.
async fn publish_all(
    http: &reqwest::Client,
    sessions: &[Arc<Session>],
    route: &[SocketAddr],
    rate: f64,
    per_session: u64,
) -> u64 {
    let per_session_rate = rate / sessions.len() as f64;
    let period = Duration::from_secs_f64(1.0 / per_session_rate);
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        let (http, session, addr, failures) =
            (http.clone(), session.clone(), route[i], failures.clone());
        // Spread the sessions' ticks over one period so publishes are even.
        let offset = period.mul_f64(i as f64 / sessions.len() as f64);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let url = format!("http://{addr}/sessions/{}/events", session.id);
            let auth = format!("Bearer {}", session.token);
            for s in 0..per_session {
                tick.tick().await;
                let body = format!(
                    r#"{{"type":"bench","data":{{"t":{},"s":{s}}}}}"#,
                    now_micros()
                );
                let ok = http
                    .post(&url)
                    .header("authorization", &auth)
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == reqwest::StatusCode::ACCEPTED);
                if !ok {
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
    sessions.len() as u64 * per_session
}

/// Runs one fan-out scenario on `servers` (sessions split evenly between
/// them; in Redis mode each session is published through the *other*
/// instance, so every delivery crosses Redis).
async fn fanout(
    mode: &'static str,
    servers: &[&Server],
    streams: usize,
    rate: f64,
    secs: f64,
) -> FanoutResult {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("http client");
    let n_sessions = streams.div_ceil(FANOUT);
    let mut sessions = Vec::new();
    let mut home = Vec::new();
    for i in 0..n_sessions {
        let server = servers[i % servers.len()];
        sessions.push(Arc::new(create_session(&http, server).await));
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
        for (local_i, log) in open_streams(server.addr, &mine, FANOUT, &col).await {
            logs.push((idx[local_i], log));
        }
    }
    let errors = col.errors.load(Ordering::Relaxed);
    // Let the servers finish the stream set-up work before measuring.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let route: Vec<SocketAddr> = home
        .iter()
        .map(|h| servers[(h + 1) % servers.len()].addr)
        .collect();
    let before_stats = futures_join(&http, servers).await;
    let cpu0: Vec<(Duration, Duration)> = servers.iter().map(|s| s.cpu_split()).collect();
    let t0 = Instant::now();
    let per_session = ((rate * secs) / n_sessions as f64).ceil().max(1.0) as u64;
    let published = publish_all(&http, &sessions, &route, rate, per_session).await;
    let expected = published * FANOUT as u64;
    let deadline = Instant::now() + Duration::from_secs(15);
    while col.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let window = t0.elapsed().as_secs_f64();
    let (mut user, mut sys) = (Duration::ZERO, Duration::ZERO);
    for (s, (u0, s0)) in servers.iter().zip(&cpu0) {
        let (u1, s1) = s.cpu_split();
        user += u1 - *u0;
        sys += s1 - *s0;
    }
    let cpu = user + sys;
    let after_stats = futures_join(&http, servers).await;
    // A little more time for stragglers, so duplicates would show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered = col.delivered.load(Ordering::Relaxed);
    let mut unique = 0u64;
    for (_, log) in &logs {
        unique += log
            .seen
            .lock()
            .expect("log")
            .iter()
            .map(|w| w.count_ones() as u64)
            .sum::<u64>();
    }
    let lost = expected.saturating_sub(unique);
    let h = col.merged_latency();
    let mut redis = Vec::new();
    if mode == "redis" {
        for (k, server) in servers.iter().enumerate() {
            let r0 = &before_stats[k]["redis"];
            let r1 = &after_stats[k]["redis"];
            let d = |f: &str| r1[f].as_u64().unwrap_or(0) - r0[f].as_u64().unwrap_or(0);
            let own_sessions = home.iter().filter(|h| **h == k).count() as u64;
            redis.push(json!({
                "instance": server.addr.to_string(),
                "sessions_served": own_sessions,
                "events_needed_by_own_clients": own_sessions * per_session,
                "events_published_total": published,
                "redis_messages_in": d("messages_in"),
                "redis_bytes_in": d("bytes_in"),
                "delivered_from_redis": d("received"),
            }));
        }
    }
    let result = FanoutResult {
        mode,
        streams: logs.len(),
        sessions: n_sessions,
        published,
        expected,
        delivered,
        lost,
        duplicates: col.duplicates.load(Ordering::Relaxed),
        stream_errors: errors,
        secs: window,
        deliveries_per_sec: delivered as f64 / window,
        server_cpu_secs: cpu.as_secs_f64(),
        server_sys_secs: sys.as_secs_f64(),
        cpu_us_per_delivery: cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64,
        p50_ms: h.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        p999_ms: h.value_at_quantile(0.999) as f64 / 1000.0,
        max_ms: h.max() as f64 / 1000.0,
        redis,
    };
    eprintln!(
        "  {mode:5} {:>6} streams: {:>8.0} deliveries/s, {:.2} µs CPU/delivery, p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms, lost {} dup {}",
        result.streams, result.deliveries_per_sec, result.cpu_us_per_delivery, result.p50_ms, result.p99_ms,
        result.p999_ms, result.lost, result.duplicates
    );
    result
}

async fn futures_join(http: &reqwest::Client, servers: &[&Server]) -> Vec<Value> {
    let mut out = Vec::new();
    for s in servers {
        out.push(stats(http, s).await);
    }
    out
}

/// RSS per idle stream: RSS with `streams` idle streams minus RSS before.
async fn idle_memory(streams: usize, env: &[(&str, String)]) -> Value {
    let server = Server::start("bench-mem", env);
    let http = reqwest::Client::new();
    let sessions: Vec<Arc<Session>> = {
        let mut v = Vec::new();
        for _ in 0..streams.div_ceil(FANOUT) {
            v.push(Arc::new(create_session(&http, &server).await));
        }
        v
    };
    // Warm the server's allocator and runtime with one short round first,
    // so the baseline is a running server, not a freshly exec'd one.
    let warm = Collector::new();
    let _ = open_streams(server.addr, &sessions[..1], 10, &warm).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_kib();
    let col = Collector::new();
    let t0 = Instant::now();
    let per = streams / sessions.len();
    let _logs = open_streams(server.addr, &sessions, per, &col).await;
    let open_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss_kib();
    let opened = col.connected.load(Ordering::Relaxed);
    let st = stats(&http, &server).await;
    let per_stream = (after.saturating_sub(before)) as f64 * 1024.0 / opened.max(1) as f64;
    eprintln!(
        "  idle: {opened} streams open ({} failed) in {open_secs:.1} s; RSS {before} KiB → {after} KiB = {:.0} B/stream",
        col.errors.load(Ordering::Relaxed),
        per_stream
    );
    json!({
        "streams_requested": streams, "streams_open": opened,
        "open_failures": col.errors.load(Ordering::Relaxed),
        "server_open_streams": st["open_streams"],
        "rss_before_kib": before, "rss_after_kib": after,
        "bytes_per_stream": per_stream, "open_secs": open_secs,
    })
}

// ---------------------------------------------------------------- output

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "mem_gib": mem_kib as f64 / 1024.0 / 1024.0,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

/// What to run. The defaults are the documented benchmark; the variables
/// exist for profiling one scenario at a time.
struct Options {
    /// `BENCH_ONLY=local,redis,idle` (default: all).
    only: Option<Vec<String>>,
    /// `BENCH_STREAMS=1000,2000` — stream counts of the fan-out sweep.
    streams: Vec<usize>,
    /// `BENCH_SECS` — publish window of each fan-out run.
    secs: f64,
    /// `BENCH_RATE` — deliveries per second (publishes/s × fan-out).
    deliveries_per_sec: u64,
    /// `BENCH_IDLE_STREAMS` — streams of the idle-memory run.
    idle_streams: usize,
    /// `BENCH_SERVER_ENV=K=V,K=V` — extra environment for the servers.
    server_env: Vec<(String, String)>,
    /// `BENCH_OUT` — where results go (default `docs/bench`).
    out: PathBuf,
}

impl Options {
    fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let quick = var("BENCH_QUICK").is_some();
        Self {
            only: var("BENCH_ONLY").map(|v| v.split(',').map(str::to_owned).collect()),
            streams: var("BENCH_STREAMS")
                .map(|v| {
                    v.split(',')
                        .map(|n| n.trim().parse().expect("BENCH_STREAMS: numbers"))
                        .collect()
                })
                .unwrap_or_else(|| {
                    if quick {
                        vec![1_000, 2_000]
                    } else {
                        vec![1_000, 2_000, 5_000, 10_000]
                    }
                }),
            secs: var("BENCH_SECS")
                .map(|v| v.parse().expect("BENCH_SECS: seconds"))
                .unwrap_or(if quick { 3.0 } else { 10.0 }),
            deliveries_per_sec: var("BENCH_RATE")
                .map(|v| v.parse().expect("BENCH_RATE: deliveries/s"))
                .unwrap_or(DELIVERIES_PER_SEC),
            idle_streams: var("BENCH_IDLE_STREAMS")
                .map(|v| v.parse().expect("BENCH_IDLE_STREAMS: number"))
                .unwrap_or(if quick { 2_000 } else { 15_000 }),
            server_env: var("BENCH_SERVER_ENV")
                .map(|v| {
                    v.split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            out: var("BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench")),
        }
    }

    fn run(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == scenario))
    }

    fn to_json(&self) -> Value {
        json!({
            "only": self.only, "streams": self.streams, "secs": self.secs,
            "deliveries_per_sec": self.deliveries_per_sec, "idle_streams": self.idle_streams,
            "server_env": self.server_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        })
    }
}

/// Latency (p50, p99) and CPU/delivery against stream count, local vs Redis.
fn plot(
    local: &[FanoutResult],
    redis: &[FanoutResult],
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
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
    let (left, right) = root.split_horizontally(600);
    let max_streams = local
        .iter()
        .chain(redis)
        .map(|r| r.streams)
        .max()
        .unwrap_or(1) as f64
        * 1.05;

    let series = |rs: &[FanoutResult], f: fn(&FanoutResult) -> f64| -> Vec<(f64, f64)> {
        rs.iter().map(|r| (r.streams as f64, f(r))).collect()
    };
    let max_lat = local
        .iter()
        .chain(redis)
        .map(|r| r.p99_ms)
        .fold(5.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&left);
    chart.margin(15).x_label_area_size(40).y_label_area_size(55);
    if text {
        chart.caption(
            "publish→receive latency (ms) @ 10k deliveries/s",
            ("sans-serif", 18),
        );
    }
    let mut c = chart.build_cartesian_2d(0f64..max_streams, 0f64..max_lat)?;
    if text {
        c.configure_mesh()
            .x_desc("open streams (fan-out 100)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("ms")
            .draw()?;
    } else {
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(0)
            .draw()?;
    }
    type Line<'a> = (
        &'a [FanoutResult],
        fn(&FanoutResult) -> f64,
        RGBColor,
        &'a str,
    );
    let lines: [Line; 4] = [
        (local, |r| r.p50_ms, BLUE, "local p50"),
        (local, |r| r.p99_ms, CYAN, "local p99"),
        (redis, |r| r.p50_ms, RED, "redis p50"),
        (redis, |r| r.p99_ms, MAGENTA, "redis p99"),
    ];
    for (rs, f, color, label) in lines {
        let s = c.draw_series(LineSeries::new(series(rs, f), color.stroke_width(2)))?;
        if text {
            s.label(label).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        c.draw_series(
            series(rs, f)
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    let target = c.draw_series(LineSeries::new(
        [(0.0, 5.0), (max_streams, 5.0)],
        BLACK.mix(0.4),
    ))?;
    if text {
        target
            .label("target p99")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.4)));
    }
    if text {
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }

    let max_cpu = local
        .iter()
        .chain(redis)
        .map(|r| r.cpu_us_per_delivery)
        .fold(4.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&right);
    chart.margin(15).x_label_area_size(40).y_label_area_size(55);
    if text {
        chart.caption("server CPU per delivery (µs)", ("sans-serif", 18));
    }
    let mut c = chart.build_cartesian_2d(0f64..max_streams, 0f64..max_cpu)?;
    if text {
        c.configure_mesh()
            .x_desc("open streams (fan-out 100)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("µs")
            .draw()?;
    } else {
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(0)
            .draw()?;
    }
    let lines: [(&[FanoutResult], RGBColor, &str); 2] =
        [(local, BLUE, "local"), (redis, RED, "redis (2 instances)")];
    for (rs, color, label) in lines {
        let pts = series(rs, |r| r.cpu_us_per_delivery);
        let s = c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?;
        if text {
            s.label(label).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
            });
        }
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    let target = c.draw_series(LineSeries::new(
        [(0.0, 4.0), (max_streams, 4.0)],
        BLACK.mix(0.4),
    ))?;
    if text {
        target
            .label("target")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.4)));
    }
    if text {
        c.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Today's UTC date, `YYYY-MM-DD` (days-to-civil, proleptic Gregorian).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn main() {
    // Both ends of every stream live on this machine: the load generator
    // needs one socket per stream too.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-file limit");
    let opts = Options::from_env();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let started = Instant::now();
    let rate = opts.deliveries_per_sec as f64 / FANOUT as f64;
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
    let with_env = |mut v: Vec<(&'static str, String)>| {
        v.extend(server_env.iter().cloned());
        v
    };

    let (local, redis, idle) = runtime.block_on(async {
        let mut local = Vec::new();
        if opts.run("local") {
            eprintln!(
                "local mode, one instance, fan-out {FANOUT}, {} deliveries/s:",
                opts.deliveries_per_sec
            );
            for &n in &opts.streams {
                let server = Server::start("bench-local", &with_env(vec![]));
                local.push(fanout("local", &[&server], n, rate, opts.secs).await);
            }
        }
        let mut redis = Vec::new();
        if opts.run("redis") {
            eprintln!(
                "redis mode, two instances, fan-out {FANOUT}, {} deliveries/s:",
                opts.deliveries_per_sec
            );
            for &n in &opts.streams {
                let r = Redis::start();
                let env = with_env(vec![
                    ("SSE_ADAPTER", "redis".to_owned()),
                    ("REDIS_URL", r.url()),
                    ("FF_REDIS_SSE_BROADCAST", "true".to_owned()),
                ]);
                let a = Server::start("bench-a", &env);
                let b = Server::start("bench-b", &env);
                redis.push(fanout("redis", &[&a, &b], n, rate, opts.secs).await);
            }
        }
        let mut idle = json!({});
        if opts.run("idle") {
            eprintln!("idle streams, one instance:");
            idle = idle_memory(opts.idle_streams, &with_env(vec![])).await;
        }
        (local, redis, idle)
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
        "target_deliveries_per_sec": DELIVERIES_PER_SEC,
        "local": local.iter().map(FanoutResult::to_json).collect::<Vec<_>>(),
        "redis": redis.iter().map(FanoutResult::to_json).collect::<Vec<_>>(),
        "idle_memory": idle,
        "elapsed_secs": started.elapsed().as_secs_f64(),
    });
    let json_path = dir.join("results.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&results).expect("json") + "\n",
    )
    .expect("write results.json");
    let png = dir.join("fanout.png");
    if let Err(e) = plot(&local, &redis, &png) {
        eprintln!("plot failed: {e}");
    }

    // Summary (Markdown, pasted into docs/benchmarks.md).
    let mut out = String::new();
    let _ = writeln!(out, "\n| mode | streams | deliveries/s | CPU µs/delivery | p50 ms | p99 ms | p99.9 ms | lost | dup |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in local.iter().chain(&redis) {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
            r.mode,
            r.streams,
            r.deliveries_per_sec,
            r.cpu_us_per_delivery,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.lost,
            r.duplicates
        );
    }
    let _ = writeln!(out, "\nRedis traffic per instance:\n\n| streams | instance | sessions | events needed | published (all) | Redis messages in | Redis bytes in |");
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|");
    for r in &redis {
        for i in &r.redis {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.streams,
                i["instance"].as_str().unwrap_or(""),
                i["sessions_served"],
                i["events_needed_by_own_clients"],
                i["events_published_total"],
                i["redis_messages_in"],
                i["redis_bytes_in"]
            );
        }
    }
    let _ = writeln!(
        out,
        "\nIdle: {} streams open, {} failed, RSS {} → {} KiB: {:.0} bytes/stream",
        idle["streams_open"],
        idle["open_failures"],
        idle["rss_before_kib"],
        idle["rss_after_kib"],
        idle["bytes_per_stream"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(
        out,
        "\nwrote {} and {} in {:.0} s",
        json_path.display(),
        png.display(),
        started.elapsed().as_secs_f64()
    );
    println!("{out}");
    let bad: u64 = local
        .iter()
        .chain(&redis)
        .map(|r| r.lost + r.duplicates + r.stream_errors)
        .sum();
    if bad > 0 || idle["open_failures"].as_u64().unwrap_or(0) > 0 {
        eprintln!("FAILED: loss, duplicates or stream errors (see above)");
        std::process::exit(1);
    }
}
