//! Reconnect storm (issue 18).
//!
//! Per run, fresh processes: a private `redis-server`, three release
//! `sse-scale` instances `app1`..`app3` on it (Redis broadcaster, flag
//! `FF_REDIS_SSE_BROADCAST=true`), and **two** HAProxy processes, each
//! running the shipped `lb-config/haproxy/haproxy.cfg` unchanged (own
//! `LB_LISTEN`, same three servers). Two because a proxied stream costs
//! HAProxy two file descriptors and one process may hold at most 20,000 on
//! this machine; the clients are split evenly over them.
//!
//! The in-process client opens `STORM_STREAMS` (10,000) raw-TCP SSE
//! streams, `STORM_STREAMS / STORM_SESSIONS` per session, through the
//! balancers with `Cookie: SRV=app1`, so all of them are held by app1
//! (checked by `X-Instance-Id` and app1's `/stats`). It then publishes
//! `STORM_RATE` (1,000) events/s round robin over the sessions, straight to
//! the survivors app2 and app3, each event carrying its per-session
//! sequence number. After `STORM_WARMUP_SECS` app1 gets SIGKILL.
//!
//! Every client then behaves like a browser `EventSource`: when its
//! connection ends it waits the last `retry:` its stream received, then
//! reconnects through its balancer with `Last-Event-ID` and the cookie it
//! has (still `SRV=app1`: HAProxy redispatches it and sets a new one). A
//! refused (non-200) or failed reconnect is counted and tried again after
//! the hint.
//!
//! Measured per client: time-to-resume from the moment it saw its
//! connection end to the resumed stream's `connected` frame, and to its
//! first event (replayed or live), absolute and beyond the hint it waited;
//! the reconnect's parts (TCP connect to the balancer, request → response
//! head, head → `connected`); and exactly-once, in-order delivery of every
//! event of its session across the reconnect (gaps, duplicates and
//! `reset` events counted separately). CPU (utime+stime, `/proc`) of the
//! survivors, Redis, the balancers and the client over the storm window
//! (kill → last resume + 1 s), minus each one's rate over the same length
//! of steady publishing just before the kill, per resume; the rate right
//! after the storm (publishing *and* delivering to every stream again) is
//! reported too, a bound from the other side.
//!
//! Writes `$BENCH_OUT/storm.json` (default `docs/bench/`) and prints a
//! Markdown table. Knobs: `STORM_STREAMS` (10,000), `STORM_SESSIONS`
//! (1,000), `STORM_RATE` (events/s, 1,000), `STORM_RUNS` (3),
//! `STORM_WARMUP_SECS` (18), `STORM_TAIL_SECS` (3), `STORM_RETRY_MS` (unset:
//! the server's default `SSE_RETRY_MS`). Exits non-zero if a stream did not
//! resume or lost or duplicated an event.

#[path = "../../tests/support/balancer.rs"]
mod balancer;
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
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use balancer::Balancer;
use procs::{machine, today, try_proc_cpu, ADMIN};
use redis_server::RedisServer;
use server::BenchServer;
use sse_client::{create_session, parse_data, stats, Session};

/// Streams in their first handshake at once while setting up.
const OPEN_CONCURRENCY: usize = 256;
/// How often the CPU of every process is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Browser `EventSource`'s reconnect delay before any `retry:` arrived.
const DEFAULT_RETRY_MS: u64 = 3000;
/// 100 ms buckets of the resume timeline (after the kill).
const TIMELINE_BUCKETS: usize = 200;

// ---------------------------------------------------------------- processes

/// An instance, and the warnings it logged that the storm reports.
struct App {
    server: BenchServer,
    /// `subscribing the session's channel is late` warnings logged: a
    /// stream that waited the whole bound (2 × the Redis response timeout)
    /// for its session's channel to be confirmed.
    late_subscribes: Arc<AtomicU64>,
    /// `history unreadable: the resume gets a reset` warnings: a resume
    /// that found Redis unreachable.
    history_unreadable: Arc<AtomicU64>,
    /// Other WARN/ERROR lines.
    warnings: Arc<AtomicU64>,
}

impl App {
    fn start(name: &'static str, redis: &RedisServer, retry_ms: Option<u64>) -> App {
        let mut env = vec![
            ("REDIS_URL", redis.url()),
            ("FF_REDIS_SSE_BROADCAST", "true".to_owned()),
        ];
        if let Some(ms) = retry_ms {
            env.push(("SSE_RETRY_MS", ms.to_string()));
        }
        let late_subscribes = Arc::new(AtomicU64::new(0));
        let warnings = Arc::new(AtomicU64::new(0));
        let history_unreadable = Arc::new(AtomicU64::new(0));
        let (late, unreadable, warned) = (
            late_subscribes.clone(),
            history_unreadable.clone(),
            warnings.clone(),
        );
        // Counts the warnings, prints the first few of each kind.
        let server = BenchServer::start(
            Command::new(env!("CARGO_BIN_EXE_sse-scale")),
            name,
            &env,
            Box::new(move |line: &str| {
                if line.contains("subscribing the session's channel is late") {
                    if late.fetch_add(1, Ordering::Relaxed) < 2 {
                        eprintln!("[{name}] {line}");
                    }
                } else if line.contains("history unreadable") {
                    if unreadable.fetch_add(1, Ordering::Relaxed) < 2 {
                        eprintln!("[{name}] {line}");
                    }
                } else if (line.contains("WARN") || line.contains("ERROR"))
                    && warned.fetch_add(1, Ordering::Relaxed) < 5
                {
                    eprintln!("[{name}] {line}");
                }
            }),
        );
        App {
            server,
            late_subscribes,
            history_unreadable,
            warnings,
        }
    }

    /// SIGKILL, as a crashed or evicted instance.
    fn kill(&mut self) {
        self.server.kill();
    }
}

/// `haproxy -db -f lb-config/haproxy/haproxy.cfg`, the shipped file
/// unchanged, configured through its environment variables as
/// lb-config/README.md documents (`tests/support/balancer.rs`).
struct Haproxy {
    lb: Balancer,
}

impl Haproxy {
    async fn start(apps: &[SocketAddr; 3]) -> Haproxy {
        let apps = apps.map(|a| a.to_string());
        let lb = Balancer::haproxy(
            "haproxy/haproxy.cfg",
            &[apps[0].as_str(), apps[1].as_str(), apps[2].as_str()],
            &[],
        )
        .await;
        Haproxy { lb }
    }

    fn addr(&self) -> SocketAddr {
        self.lb.addr.parse().expect("balancer address")
    }

    fn log(&self) -> String {
        self.lb.log()
    }

    /// HAProxy's own timers of the streams it sent to app2/app3 (the
    /// resumes), from its log (`%Tc`: connect to the instance, `%Tr`: the
    /// instance's response head), in ms, and how many it retried.
    fn resume_timers(&self) -> (Vec<u64>, Vec<u64>, u64) {
        let (mut tc, mut tr, mut retried) = (Vec::new(), Vec::new(), 0);
        for line in self.log().lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // `%ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST ... %ac/%fc/%bc/%sc/%rc`
            // Streams go to the `streams` backend (lb-config/README.md).
            if f.len() < 11
                || !matches!(
                    f[3],
                    "streams/app2" | "streams/app3" | "app/app2" | "app/app3"
                )
                || !line.contains("/events ")
            {
                continue;
            }
            let t: Vec<&str> = f[4].split('/').collect();
            if let (Some(c), Some(r)) = (t.get(2), t.get(3)) {
                if let (Ok(c), Ok(r)) = (c.parse::<i64>(), r.parse::<i64>()) {
                    tc.push(c.max(0) as u64 * 1000);
                    tr.push(r.max(0) as u64 * 1000);
                }
            }
            if f[10].rsplit('/').next().is_some_and(|rc| rc != "0") {
                retried += 1;
            }
        }
        (tc, tr, retried)
    }

    /// Lines of the log mentioning `needle` (state changes, errors).
    fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

/// When a sample was taken, and the CPU of each watched process then.
type Samples = Arc<Mutex<Vec<(Instant, Vec<Duration>)>>>;

/// CPU time of each watched process, every `SAMPLE_EVERY`, on a thread of
/// its own. A process that is gone reads as its last value.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Samples,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pids: Vec<u32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples: Samples = Arc::default();
        let (s, out) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let mut last = vec![Duration::ZERO; pids.len() + 2];
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                for (i, pid) in pids.iter().enumerate() {
                    if let Some(cpu) = try_proc_cpu(*pid) {
                        last[i] = cpu;
                    }
                }
                // The machine's busy and total jiffies, as the last two.
                let (busy, total) = procs::machine_ticks();
                last.truncate(pids.len());
                last.push(Duration::from_micros(busy));
                last.push(Duration::from_micros(total));
                out.lock().expect("samples").push((at, last.clone()));
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// CPU of each process between the samples nearest `from` and `to`,
    /// and the exact length of that window.
    fn between(&self, from: Instant, to: Instant) -> (Vec<Duration>, Duration) {
        let samples = self.samples.lock().expect("samples");
        let nearest = |t: Instant| {
            samples
                .iter()
                .min_by_key(|(at, _)| if *at > t { *at - t } else { t - *at })
                .expect("at least one sample")
        };
        let (a, b) = (nearest(from), nearest(to));
        let d =
            a.1.iter()
                .zip(&b.1)
                .map(|(x, y)| y.saturating_sub(*x))
                .collect();
        (d, b.0.saturating_duration_since(a.0))
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Raises this process's open-file soft limit to the hard limit: it holds
/// every client socket.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// The deepest accept queue each listener reached (`ss -Hltn` every
/// 100 ms until `stop`), and its backlog: shows whose queue overflowed.
fn watch_listeners(
    ports: Vec<(String, u16)>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Value> {
    std::thread::spawn(move || {
        let mut max = vec![(0u64, 0u64); ports.len()];
        while !stop.load(Ordering::Relaxed) {
            if let Ok(out) = Command::new("ss").arg("-Hltn").output() {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    let (Some(q), Some(backlog), Some(local)) = (f.get(1), f.get(2), f.get(3))
                    else {
                        continue;
                    };
                    for (i, (_, port)) in ports.iter().enumerate() {
                        if local.ends_with(&format!(":{port}")) {
                            let q: u64 = q.parse().unwrap_or(0);
                            max[i].0 = max[i].0.max(q);
                            max[i].1 = backlog.parse().unwrap_or(0);
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut m = serde_json::Map::new();
        for ((name, _), (q, backlog)) in ports.iter().zip(max) {
            m.insert(
                name.clone(),
                json!({ "max_accept_queue": q, "backlog": backlog }),
            );
        }
        Value::Object(m)
    })
}

/// `sse_redis_round_trip` of an instance (`/metrics`): cumulative count per
/// bucket bound, and the total.
async fn redis_round_trips(http: &reqwest::Client, addr: SocketAddr) -> Vec<(String, u64)> {
    let text = match http
        .get(format!("http://{addr}/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
    {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("sse_redis_round_trip_seconds_bucket{le=\"")?;
            let (le, n) = rest.split_once("\"} ")?;
            Some((le.to_owned(), n.trim().parse().ok()?))
        })
        .collect()
}

/// Calls per bucket (not cumulative) between two readings of both survivors.
fn round_trip_delta(before: &[Vec<(String, u64)>], after: &[Vec<(String, u64)>]) -> Value {
    let mut out = serde_json::Map::new();
    let mut prev = 0u64;
    if let Some(first) = after.first() {
        for (i, (le, _)) in first.iter().enumerate() {
            let cum: u64 = after
                .iter()
                .zip(before)
                .map(|(a, b)| {
                    a.get(i).map_or(0, |x| x.1)
                        - b.get(i).map_or(0, |x| x.1).min(a.get(i).map_or(0, |x| x.1))
                })
                .sum();
            out.insert(format!("le {le} s"), json!(cum - prev.min(cum)));
            prev = cum;
        }
    }
    Value::Object(out)
}

/// TCP counters of the machine (`/proc/net/netstat` TcpExt), for the
/// ones that show a handshake the kernel dropped or retried.
fn tcp_counters() -> Vec<(&'static str, u64)> {
    const WANTED: [&str; 5] = [
        "ListenOverflows",
        "ListenDrops",
        "TCPSynRetrans",
        "TCPReqQFullDrop",
        "TCPTimeouts",
    ];
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (Some(names), Some(values)) = (lines.first(), lines.get(1)) else {
        return Vec::new();
    };
    let pairs: Vec<(&str, u64)> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter_map(|(n, v)| Some((n, v.parse().ok()?)))
        .collect();
    WANTED
        .iter()
        .map(|w| (*w, pairs.iter().find(|(n, _)| n == w).map_or(0, |p| p.1)))
        .collect()
}

fn tcp_delta(before: &[(&'static str, u64)], after: &[(&'static str, u64)]) -> Value {
    let mut m = serde_json::Map::new();
    for ((name, a), (_, b)) in before.iter().zip(after) {
        m.insert((*name).to_owned(), json!(b.saturating_sub(*a)));
    }
    Value::Object(m)
}

// ---------------------------------------------------------------- clients

/// What one client reports, read by the controller. Times are µs since
/// `Ctx::base` plus one (0: not yet).
#[derive(Default)]
struct Client {
    /// Next sequence number expected from its session.
    next_seq: AtomicU64,
    duplicates: AtomicU64,
    /// Events skipped (a later one arrived first); the rest of the loss is
    /// counted at the end against what was published.
    gaps: AtomicU64,
    resets: AtomicU64,
    /// Reconnects answered with another status than 200.
    refused: AtomicU64,
    /// Reconnects that failed before `connected` (connect error, closed).
    failed: AtomicU64,
    /// Connections that ended other than by the kill.
    unexpected_ends: AtomicU64,
    /// The first connection's `X-Instance-Id` was app1.
    pinned: AtomicBool,
    ended_at: AtomicU64,
    hint_ms: AtomicU64,
    /// The first reconnect attempt started (after the hint's sleep).
    first_attempt_at: AtomicU64,
    /// The successful reconnect: its TCP connect started / finished, its
    /// request was sent, its response head and `connected` frame arrived,
    /// its first event arrived.
    attempt_at: AtomicU64,
    connect_done: AtomicU64,
    head_at: AtomicU64,
    resumed_at: AtomicU64,
    first_event_at: AtomicU64,
    /// 2 or 3: the instance that took the resume.
    resumed_on: AtomicU64,
}

struct Ctx {
    base: Instant,
    lbs: Vec<SocketAddr>,
    sessions: Vec<Arc<Session>>,
    /// Session of each client.
    session_of: Vec<usize>,
    clients: Vec<Client>,
    killed: AtomicBool,
    opened: AtomicUsize,
    open_failed: AtomicUsize,
    resumed: AtomicUsize,
}

impl Ctx {
    fn now(&self) -> u64 {
        self.base.elapsed().as_micros() as u64 + 1
    }
}

/// The client's own state between connections, as a browser keeps it.
struct Browser {
    last_id: Vec<u8>,
    retry_ms: u64,
    /// The `SRV` cookie it sends (HAProxy's latest `Set-Cookie`).
    cookie: String,
}

/// How one connection ended.
enum End {
    /// Answered with this status (not 200).
    Refused,
    /// Failed before its `connected` frame.
    Failed,
    /// Was a stream, and ended.
    Ended,
}

/// Strips HTTP/1.1 chunked framing, for a balancer that re-frames the
/// stream.
#[derive(Default)]
struct Dechunk {
    /// Bytes left in the current chunk; 0 while reading a size line.
    left: usize,
    size_line: Vec<u8>,
    /// After a chunk's data: skipping its CRLF.
    in_crlf: bool,
}

impl Dechunk {
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if self.left > 0 {
                let n = self.left.min(input.len());
                out.extend_from_slice(&input[..n]);
                self.left -= n;
                input = &input[n..];
                if self.left == 0 {
                    self.in_crlf = true;
                }
                continue;
            }
            let Some(nl) = input.iter().position(|&b| b == b'\n') else {
                self.size_line.extend_from_slice(input);
                return;
            };
            self.size_line.extend_from_slice(&input[..nl]);
            input = &input[nl + 1..];
            if self.in_crlf {
                self.in_crlf = false;
                self.size_line.clear();
                continue;
            }
            let text = String::from_utf8_lossy(&self.size_line);
            let hex = text.split(';').next().unwrap_or("").trim();
            self.left = usize::from_str_radix(hex, 16).unwrap_or(0);
            self.size_line.clear();
        }
    }
}

/// One client: the first stream, then reconnects as `EventSource` does.
async fn run_client(ctx: Arc<Ctx>, i: usize, permit: tokio::sync::OwnedSemaphorePermit) {
    let mut browser = Browser {
        last_id: Vec::new(),
        retry_ms: DEFAULT_RETRY_MS,
        cookie: "app1".to_owned(),
    };
    let me = &ctx.clients[i];
    let mut permit = Some(permit);
    match connect(&ctx, i, &mut browser, false, &mut permit).await {
        End::Ended => {}
        End::Refused | End::Failed => {
            ctx.open_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    loop {
        // The connection ended: wait the hint, reconnect until a stream
        // resumes; then it reads until that one ends too.
        if !ctx.killed.load(Ordering::Relaxed) {
            me.unexpected_ends.fetch_add(1, Ordering::Relaxed);
        }
        if me.ended_at.load(Ordering::Relaxed) == 0 {
            me.ended_at.store(ctx.now(), Ordering::Relaxed);
            me.hint_ms.store(browser.retry_ms, Ordering::Relaxed);
        }
        loop {
            tokio::time::sleep(Duration::from_millis(browser.retry_ms)).await;
            match connect(&ctx, i, &mut browser, true, &mut None).await {
                End::Ended => break,
                End::Refused => me.refused.fetch_add(1, Ordering::Relaxed),
                End::Failed => me.failed.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

/// One connection through the client's balancer, read until it ends.
async fn connect(
    ctx: &Ctx,
    i: usize,
    browser: &mut Browser,
    resume: bool,
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> End {
    let me = &ctx.clients[i];
    let session = &ctx.sessions[ctx.session_of[i]];
    let first_resume = resume && me.resumed_at.load(Ordering::Relaxed) == 0;
    let attempt_at = ctx.now();
    if resume && me.first_attempt_at.load(Ordering::Relaxed) == 0 {
        me.first_attempt_at.store(attempt_at, Ordering::Relaxed);
    }
    let Ok(mut sock) = TcpStream::connect(ctx.lbs[i % ctx.lbs.len()]).await else {
        return End::Failed;
    };
    let connect_done = ctx.now();
    let _ = sock.set_nodelay(true);
    let mut req = format!(
        "GET /sessions/{}/events?token={} HTTP/1.1\r\nHost: storm\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nCookie: SRV={}\r\n",
        session.id, session.token, browser.cookie
    );
    if resume && !browser.last_id.is_empty() {
        req.push_str("Last-Event-ID: ");
        req.push_str(std::str::from_utf8(&browser.last_id).unwrap_or(""));
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    if sock.write_all(req.as_bytes()).await.is_err() {
        return End::Failed;
    }
    let mut buf = vec![0u8; 4096];
    let mut head: Vec<u8> = Vec::new();
    let mut chunked: Option<Dechunk> = None;
    // Read the response head.
    let mut body: Vec<u8> = loop {
        let n = match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return End::Failed,
            Ok(n) => n,
        };
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut res = httparse::Response::new(&mut headers);
        match res.parse(&head) {
            Ok(httparse::Status::Complete(len)) => {
                if res.code != Some(200) {
                    return End::Refused;
                }
                let mut instance_ok = false;
                for h in res.headers.iter() {
                    if h.name.eq_ignore_ascii_case("x-instance-id") {
                        instance_ok = h.value == b"app1";
                        if resume {
                            let n = match h.value {
                                b"app2" => 2,
                                b"app3" => 3,
                                _ => 1,
                            };
                            me.resumed_on.store(n, Ordering::Relaxed);
                        }
                    } else if h.name.eq_ignore_ascii_case("set-cookie") {
                        if let Some(v) = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.strip_prefix("SRV="))
                        {
                            browser.cookie = v.split(';').next().unwrap_or("").to_owned();
                        }
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                        && h.value.eq_ignore_ascii_case(b"chunked")
                    {
                        chunked = Some(Dechunk::default());
                    }
                }
                if !resume && instance_ok {
                    me.pinned.store(true, Ordering::Relaxed);
                }
                break head.split_off(len);
            }
            Ok(httparse::Status::Partial) => continue,
            Err(_) => return End::Failed,
        }
    };
    let head_at = ctx.now();
    if let Some(d) = chunked.as_mut() {
        let raw = std::mem::take(&mut body);
        d.feed(&raw, &mut body);
    }
    let mut connected = false;
    let mut carry = body;
    let mut decoded = Vec::new();
    loop {
        let mut start = 0;
        let mut got_event = false;
        let mut now_connected = false;
        while let Some(pos) = carry[start..].iter().position(|&b| b == b'\n') {
            let mut line = &carry[start..start + pos];
            start += pos + 1;
            if let Some(l) = line.strip_suffix(b"\r") {
                line = l;
            }
            if let Some(id) = line.strip_prefix(b"id: ") {
                browser.last_id.clear();
                browser.last_id.extend_from_slice(id);
            } else if let Some(ms) = line.strip_prefix(b"retry: ") {
                if let Some(ms) = std::str::from_utf8(ms).ok().and_then(|s| s.parse().ok()) {
                    browser.retry_ms = ms;
                }
            } else if line == b"event: connected" {
                connected = true;
                now_connected = true;
            } else if line == b"event: reset" {
                me.resets.fetch_add(1, Ordering::Relaxed);
            } else if let Some((_, s)) = parse_data(line) {
                got_event = true;
                let next = me.next_seq.load(Ordering::Relaxed);
                if s == next {
                    me.next_seq.store(s + 1, Ordering::Relaxed);
                } else if s < next {
                    // Seen already (or late: either breaks exactly once
                    // in order).
                    me.duplicates.fetch_add(1, Ordering::Relaxed);
                } else {
                    me.gaps.fetch_add(s - next, Ordering::Relaxed);
                    me.next_seq.store(s + 1, Ordering::Relaxed);
                }
            }
        }
        carry.drain(..start);
        if now_connected {
            if resume {
                if first_resume {
                    me.attempt_at.store(attempt_at, Ordering::Relaxed);
                    me.connect_done.store(connect_done, Ordering::Relaxed);
                    me.head_at.store(head_at, Ordering::Relaxed);
                    me.resumed_at.store(ctx.now(), Ordering::Relaxed);
                    ctx.resumed.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                permit.take();
                ctx.opened.fetch_add(1, Ordering::Relaxed);
            }
        }
        if got_event && first_resume && me.first_event_at.load(Ordering::Relaxed) == 0 {
            me.first_event_at.store(ctx.now(), Ordering::Relaxed);
        }
        let n = match sock.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match chunked.as_mut() {
            Some(d) => {
                decoded.clear();
                d.feed(&buf[..n], &mut decoded);
                carry.extend_from_slice(&decoded);
            }
            None => carry.extend_from_slice(&buf[..n]),
        }
    }
    if connected {
        End::Ended
    } else {
        End::Failed
    }
}

// ---------------------------------------------------------------- publishing

/// Publishes `rate` events/s over all sessions (each session its own task,
/// its ticks spread over the period) to the survivors (session `i` through
/// `targets[i % 2]`), until `stop`. Returns the events each session got
/// accepted and the failed publishes.
async fn publish(
    http: reqwest::Client,
    sessions: Vec<Arc<Session>>,
    targets: [SocketAddr; 2],
    rate: f64,
    stop: Arc<AtomicBool>,
) -> (Vec<u64>, u64) {
    let period = Duration::from_secs_f64(sessions.len() as f64 / rate);
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        let (http, session, stop, failures) = (
            http.clone(),
            session.clone(),
            stop.clone(),
            failures.clone(),
        );
        let addr = targets[i % targets.len()];
        let offset = period.mul_f64(i as f64 / sessions.len() as f64);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let url = format!("http://{addr}/sessions/{}/events", session.id);
            let auth = format!("Bearer {}", session.token);
            let mut s = 0u64;
            loop {
                tick.tick().await;
                if stop.load(Ordering::Relaxed) {
                    return s;
                }
                match sse_client::publish_numbered(&http, &url, &auth, s).await {
                    Ok(()) => s += 1,
                    Err(e) => {
                        eprintln!("{e}");
                        // The sequence must stay gap-free: try this one again.
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.expect("publisher task"));
    }
    (counts, failures.load(Ordering::Relaxed))
}

// ---------------------------------------------------------------- one run

struct Options {
    streams: usize,
    sessions: usize,
    rate: f64,
    runs: usize,
    warmup: Duration,
    tail: Duration,
    retry_ms: Option<u64>,
    out_dir: PathBuf,
}

impl Options {
    fn from_env() -> Options {
        let num = |k: &str, d: f64| -> f64 {
            std::env::var(k)
                .ok()
                .map(|v| v.parse().unwrap_or_else(|_| panic!("{k}: not a number")))
                .unwrap_or(d)
        };
        let out_dir = procs::bench_out();
        let o = Options {
            streams: num("STORM_STREAMS", 10_000.0) as usize,
            sessions: num("STORM_SESSIONS", 1_000.0) as usize,
            rate: num("STORM_RATE", 1_000.0),
            runs: num("STORM_RUNS", 3.0) as usize,
            // Longer than one heartbeat (15 s): a stream opened early in
            // the ramp, told a hint for the herd of that moment, gets the
            // whole herd's on its first heartbeat, as every stream of a
            // production herd older than one heartbeat has.
            warmup: Duration::from_secs_f64(num("STORM_WARMUP_SECS", 18.0)),
            tail: Duration::from_secs_f64(num("STORM_TAIL_SECS", 3.0)),
            retry_ms: std::env::var("STORM_RETRY_MS")
                .ok()
                .map(|v| v.parse().expect("STORM_RETRY_MS")),
            out_dir,
        };
        assert!(
            o.sessions > 0 && o.streams >= o.sessions,
            "need streams >= sessions > 0"
        );
        o
    }
}

/// Percentiles of µs values, as ms.
fn pcts(mut v: Vec<u64>) -> Value {
    if v.is_empty() {
        return json!(null);
    }
    v.sort_unstable();
    let at = |q: f64| {
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1000.0
    };
    json!({
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "max_ms": v[v.len() - 1] as f64 / 1000.0,
        "n": v.len(),
    })
}

fn run(opts: &Options, run_no: usize) -> Value {
    let wall = Instant::now();
    let redis = RedisServer::start();
    let mut apps = [
        App::start("app1", &redis, opts.retry_ms),
        App::start("app2", &redis, opts.retry_ms),
        App::start("app3", &redis, opts.retry_ms),
    ];
    let addrs = [
        apps[0].server.addr,
        apps[1].server.addr,
        apps[2].server.addr,
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let lbs = rt.block_on(async { [Haproxy::start(&addrs).await, Haproxy::start(&addrs).await] });
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let survivors = [addrs[1], addrs[2]];

    // Sessions, created on the survivors (tokens are valid everywhere).
    let sessions: Vec<Arc<Session>> = rt.block_on(async {
        futures::stream::iter(0..opts.sessions)
            .map(|i| {
                let http = http.clone();
                let addr = survivors[i % 2];
                async move { Arc::new(create_session(&http, addr).await) }
            })
            .buffered(32)
            .collect()
            .await
    });
    let per_session = opts.streams / opts.sessions;
    let streams = per_session * opts.sessions;
    let ctx = Arc::new(Ctx {
        base: Instant::now(),
        lbs: lbs.iter().map(Haproxy::addr).collect(),
        session_of: (0..streams).map(|i| i / per_session).collect(),
        sessions: sessions.clone(),
        clients: (0..streams).map(|_| Client::default()).collect(),
        killed: AtomicBool::new(false),
        opened: AtomicUsize::new(0),
        open_failed: AtomicUsize::new(0),
        resumed: AtomicUsize::new(0),
    });

    // Every stream through the balancers, pinned to app1.
    let open_start = Instant::now();
    let tasks: Vec<tokio::task::JoinHandle<()>> = rt.block_on(async {
        let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
        let mut tasks = Vec::with_capacity(streams);
        for i in 0..streams {
            let permit = gate.clone().acquire_owned().await.expect("semaphore");
            tasks.push(tokio::spawn(run_client(ctx.clone(), i, permit)));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while ctx.opened.load(Ordering::Relaxed) + ctx.open_failed.load(Ordering::Relaxed) < streams
        {
            assert!(Instant::now() < deadline, "streams did not open in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tasks
    });
    let open_secs = open_start.elapsed().as_secs_f64();
    let open_failed = ctx.open_failed.load(Ordering::Relaxed);
    assert_eq!(open_failed, 0, "streams failed to open");
    let pinned = ctx
        .clients
        .iter()
        .filter(|c| c.pinned.load(Ordering::Relaxed))
        .count();
    let held: Vec<u64> = rt.block_on(async {
        let mut v = Vec::new();
        for a in &addrs {
            v.push(
                stats(&http, *a, ADMIN).await["open_streams"]
                    .as_u64()
                    .unwrap_or(0),
            );
        }
        v
    });
    println!(
        "run {run_no}: {streams} streams open in {open_secs:.1} s through 2 HAProxy processes; \
         X-Instance-Id app1 on {pinned}; open_streams app1/app2/app3 = {}/{}/{}",
        held[0], held[1], held[2]
    );
    assert_eq!(pinned, streams, "not every stream is held by app1");
    assert_eq!(
        held[0] as usize, streams,
        "app1's /stats does not hold every stream"
    );

    // Index: 0 app2, 1 app3, 2 redis, 3 lb0, 4 lb1, 5 this process, 6
    // app1 (until killed); then the machine's busy and total jiffies.
    let mut sampler = Sampler::start(vec![
        apps[1].server.pid(),
        apps[2].server.pid(),
        redis.pid(),
        lbs[0].lb.pid(),
        lbs[1].lb.pid(),
        std::process::id(),
        apps[0].server.pid(),
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = rt.spawn(publish(
        http.clone(),
        sessions.clone(),
        survivors,
        opts.rate,
        stop.clone(),
    ));
    std::thread::sleep(opts.warmup);

    // The kill.
    ctx.killed.store(true, Ordering::Relaxed);
    let trips_before: Vec<Vec<(String, u64)>> = rt.block_on(async {
        vec![
            redis_round_trips(&http, survivors[0]).await,
            redis_round_trips(&http, survivors[1]).await,
        ]
    });
    let tcp_before = tcp_counters();
    let watch_stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_listeners(
        vec![
            ("lb0".to_owned(), lbs[0].addr().port()),
            ("lb1".to_owned(), lbs[1].addr().port()),
            ("app2".to_owned(), addrs[1].port()),
            ("app3".to_owned(), addrs[2].port()),
            ("redis".to_owned(), redis.port),
        ],
        watch_stop.clone(),
    );
    let kill_at = Instant::now();
    let kill_us = ctx.now();
    apps[0].kill();
    let deadline = kill_at + Duration::from_secs(60);
    while ctx.resumed.load(Ordering::Relaxed) < streams && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let resumed = ctx.resumed.load(Ordering::Relaxed);
    let last_resume_us = ctx
        .clients
        .iter()
        .map(|c| c.resumed_at.load(Ordering::Relaxed))
        .max()
        .unwrap_or(kill_us);
    let storm_end = ctx.base + Duration::from_micros(last_resume_us) + Duration::from_secs(1);
    let storm_len = storm_end.saturating_duration_since(kill_at);
    while Instant::now() < storm_end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let tcp_storm = tcp_delta(&tcp_before, &tcp_counters());
    let trips_after: Vec<Vec<(String, u64)>> = rt.block_on(async {
        vec![
            redis_round_trips(&http, survivors[0]).await,
            redis_round_trips(&http, survivors[1]).await,
        ]
    });
    let round_trips = round_trip_delta(&trips_before, &trips_after);
    watch_stop.store(true, Ordering::Relaxed);
    let listen_queues = watcher.join().expect("listener watcher");
    std::thread::sleep(opts.tail);
    let after_end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let (published, publish_failures) = rt.block_on(publisher).expect("publisher");

    // Let every stream catch up with what was published.
    let caught_up = |c: &Client, s: usize| c.next_seq.load(Ordering::Relaxed) >= published[s];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && !ctx
            .clients
            .iter()
            .enumerate()
            .all(|(i, c)| caught_up(c, ctx.session_of[i]))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    sampler.finish();
    let survivor_stats: Vec<Value> = rt.block_on(async {
        let mut v = Vec::new();
        for a in &survivors {
            v.push(stats(&http, *a, ADMIN).await);
        }
        v
    });
    for t in &tasks {
        t.abort();
    }

    // CPU: storm window, the same length of steady publishing before the
    // kill (shorter if the warm-up is: then scaled), and after the storm.
    let (storm_cpu, storm_d) = sampler.between(kill_at, storm_end);
    let before_len = storm_len.min(opts.warmup.saturating_sub(Duration::from_secs(1)));
    let (before_cpu, before_d) = sampler.between(kill_at - before_len, kill_at);
    let (after_cpu, after_d) = sampler.between(storm_end, after_end);
    let per_resume = |idx: &[usize], base: &[Duration], base_d: Duration| -> f64 {
        let storm: f64 = idx.iter().map(|&i| storm_cpu[i].as_secs_f64()).sum();
        let rate: f64 = idx.iter().map(|&i| base[i].as_secs_f64()).sum::<f64>()
            / base_d.as_secs_f64().max(1e-9);
        (storm - rate * storm_d.as_secs_f64()) * 1e6 / resumed.max(1) as f64
    };
    // Busy share of the machine, and the cores busy outside this
    // scenario's processes (anything else running on the machine).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let busy = |v: &[Duration], d: Duration| {
        let share = v[7].as_secs_f64() / v[8].as_secs_f64().max(1e-9);
        let ours: f64 =
            v[..7].iter().map(Duration::as_secs_f64).sum::<f64>() / d.as_secs_f64().max(1e-9);
        json!({ "share": share, "other_cores": (share * cpus - ours).max(0.0) })
    };
    let machine_busy = json!({
        "before": busy(&before_cpu, before_d),
        "storm": busy(&storm_cpu, storm_d),
        "after": busy(&after_cpu, after_d),
    });
    let cpu_of = |idx: &[usize]| -> Value {
        let sum = |v: &[Duration]| idx.iter().map(|&i| v[i].as_secs_f64()).sum::<f64>();
        json!({
            "us_per_resume": per_resume(idx, &before_cpu, before_d),
            "us_per_resume_vs_after": per_resume(idx, &after_cpu, after_d),
            "storm_cpu_ms": sum(&storm_cpu) * 1e3,
            "storm_cpu_per_s_ms": sum(&storm_cpu) * 1e3 / storm_d.as_secs_f64().max(1e-9),
            "before_cpu_per_s_ms": sum(&before_cpu) * 1e3 / before_d.as_secs_f64().max(1e-9),
            "after_cpu_per_s_ms": sum(&after_cpu) * 1e3 / after_d.as_secs_f64().max(1e-9),
        })
    };

    // Per client.
    let get = |f: fn(&Client) -> &AtomicU64| -> Vec<u64> {
        ctx.clients
            .iter()
            .map(|c| f(c).load(Ordering::Relaxed))
            .collect()
    };
    let sum = |f: fn(&Client) -> &AtomicU64| -> u64 { get(f).iter().sum() };
    let mut lost = sum(|c| &c.gaps);
    let mut behind = 0u64;
    for (i, c) in ctx.clients.iter().enumerate() {
        let want = published[ctx.session_of[i]];
        let have = c.next_seq.load(Ordering::Relaxed);
        if have < want {
            lost += want - have;
            behind += 1;
        }
    }
    let duplicated = sum(|c| &c.duplicates);
    let resets = sum(|c| &c.resets);
    let refused = sum(|c| &c.refused);
    let failed = sum(|c| &c.failed);
    let retried_clients = ctx
        .clients
        .iter()
        .filter(|c| c.refused.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed) > 0)
        .count();
    let unexpected = sum(|c| &c.unexpected_ends);
    let on = get(|c| &c.resumed_on);
    let (on2, on3) = (
        on.iter().filter(|&&n| n == 2).count(),
        on.iter().filter(|&&n| n == 3).count(),
    );

    let mut to_connected = Vec::new();
    let mut to_first = Vec::new();
    let mut beyond = Vec::new();
    let mut beyond_first = Vec::new();
    let mut end_after_kill = Vec::new();
    let mut attempt_after_kill = Vec::new();
    let mut tcp_connect = Vec::new();
    let mut head = Vec::new();
    let mut head_to_connected = Vec::new();
    let mut hints = Vec::new();
    let mut wake_late = Vec::new();
    let mut timeline = vec![0u64; TIMELINE_BUCKETS];
    let mut attempts_timeline = vec![0u64; TIMELINE_BUCKETS];
    for c in &ctx.clients {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (ended, resumed_at) = (l(&c.ended_at), l(&c.resumed_at));
        if ended == 0 || resumed_at == 0 {
            continue;
        }
        let hint_us = l(&c.hint_ms) * 1000;
        hints.push(hint_us);
        to_connected.push(resumed_at - ended);
        beyond.push((resumed_at - ended).saturating_sub(hint_us));
        if l(&c.first_event_at) > 0 {
            to_first.push(l(&c.first_event_at) - ended);
            beyond_first.push((l(&c.first_event_at) - ended).saturating_sub(hint_us));
        }
        end_after_kill.push(ended.saturating_sub(kill_us));
        wake_late.push(l(&c.first_attempt_at).saturating_sub(ended + hint_us));
        attempt_after_kill.push(l(&c.attempt_at).saturating_sub(kill_us));
        tcp_connect.push(l(&c.connect_done).saturating_sub(l(&c.attempt_at)));
        head.push(l(&c.head_at).saturating_sub(l(&c.connect_done)));
        head_to_connected.push(resumed_at.saturating_sub(l(&c.head_at)));
        let b = ((resumed_at.saturating_sub(kill_us)) / 100_000) as usize;
        timeline[b.min(TIMELINE_BUCKETS - 1)] += 1;
        let b = ((l(&c.attempt_at).saturating_sub(kill_us)) / 100_000) as usize;
        attempts_timeline[b.min(TIMELINE_BUCKETS - 1)] += 1;
    }
    let bucketed = |v: &[u64]| -> Value {
        json!(v
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| json!([i * 100, n]))
            .collect::<Vec<_>>())
    };
    let hint_ms = hints.iter().max().copied().unwrap_or(0) as f64 / 1000.0;
    // When each balancer's health check took app1 out (first line each).
    let lb_log: Vec<String> = lbs
        .iter()
        .filter_map(|l| l.log_lines("app1 is DOWN").into_iter().next())
        .collect();
    let (mut lb_tc, mut lb_tr, mut lb_retried) = (Vec::new(), Vec::new(), 0);
    for l in &lbs {
        let (c, r, n) = l.resume_timers();
        lb_tc.extend(c);
        lb_tr.extend(r);
        lb_retried += n;
    }
    let slow_connects = lb_tc.iter().filter(|&&c| c >= 1_000_000).count();
    let held_heads = lb_tr.iter().filter(|&&r| r >= 1_900_000).count();
    let total_published: u64 = published.iter().sum();
    let result = json!({
        "run": run_no,
        "streams": streams,
        "sessions": opts.sessions,
        "streams_per_session": per_session,
        "balancers": 2,
        "publish_rate": opts.rate,
        "published": total_published,
        "publish_failures": publish_failures,
        "open_secs": open_secs,
        "resumed": resumed,
        "resumed_on": { "app2": on2, "app3": on3 },
        "lost": lost,
        "streams_behind": behind,
        "duplicated": duplicated,
        "resets": resets,
        "refused_reconnects": refused,
        "failed_reconnects": failed,
        "clients_that_retried": retried_clients,
        "unexpected_ends": unexpected,
        "hint_ms": hint_ms,
        "time_to_resume": {
            "connected": pcts(to_connected),
            "connected_beyond_hint": pcts(beyond),
            "first_event": pcts(to_first),
            "first_event_beyond_hint": pcts(beyond_first),
        },
        "parts": {
            "disconnect_seen_after_kill": pcts(end_after_kill),
            "client_wake_late": pcts(wake_late),
            "resumed_attempt_after_kill": pcts(attempt_after_kill),
            "tcp_connect": pcts(tcp_connect),
            "request_to_head": pcts(head),
            "head_to_connected": pcts(head_to_connected),
        },
        "haproxy_timers_of_resumes": {
            "connect_to_instance_Tc": pcts(lb_tc),
            "instance_response_head_Tr": pcts(lb_tr),
            "connects_of_1s_or_more": slow_connects,
            "heads_held_1_9s_or_more": held_heads,
            "retried": lb_retried,
        },
        "resumes_per_100ms_after_kill": bucketed(&timeline),
        "resumed_attempts_per_100ms_after_kill": bucketed(&attempts_timeline),
        "storm_window_ms": storm_d.as_secs_f64() * 1e3,
        "baseline_window_ms": before_d.as_secs_f64() * 1e3,
        "after_window_ms": after_d.as_secs_f64() * 1e3,
        "cpu": {
            "survivors": cpu_of(&[0, 1]),
            "redis": cpu_of(&[2]),
            "haproxy": cpu_of(&[3, 4]),
            "client": cpu_of(&[5]),
        },
        "survivor_stats": survivor_stats.iter().map(|s| json!({
            "instance": s["instance_id"],
            "open_streams": s["open_streams"],
            "resumes": s["resumes"],
            "resets": s["resets"],
            "streams_refused": s["streams_refused"],
            "slow_consumers_cut": s["slow_consumers_cut"],
            "redis": s["redis"],
        })).collect::<Vec<_>>(),
        "late_subscribe_warnings": { "app2": apps[1].late_subscribes.load(Ordering::Relaxed), "app3": apps[2].late_subscribes.load(Ordering::Relaxed) },
        "history_unreadable_warnings": apps.iter().map(|a| a.history_unreadable.load(Ordering::Relaxed)).sum::<u64>(),
        "other_warnings": apps.iter().map(|a| a.warnings.load(Ordering::Relaxed)).sum::<u64>(),
        "tcp_during_storm": tcp_storm,
        "survivors_redis_round_trips_during_storm": round_trips,
        "listen_queues_during_storm": listen_queues,
        "machine_busy": machine_busy,
        "haproxy_down_log": lb_log,
        "wall_secs": wall.elapsed().as_secs_f64(),
    });
    drop(rt);
    drop(lbs);
    drop(apps);
    drop(redis);
    result
}

// ---------------------------------------------------------------- output

fn summary(runs: &[Value]) -> String {
    let mut out = String::new();
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.0}"));
    let f2 = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}"));
    let _ = writeln!(
        out,
        "| run | streams | resumed | lost | duplicated | resets | refused / failed reconnects | \
         time-to-resume (`connected`) p50 / p99 / max ms | beyond the hint p50 / p99 / max ms | \
         to first event p50 / p99 ms | survivors µs CPU per resume (vs after-storm rate) | \
         redis / haproxy / client CPU ms/s: storm (before) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let t = &r["time_to_resume"];
        let c = &r["cpu"];
        let rate = |k: &str| {
            format!(
                "{} ({})",
                f(&c[k]["storm_cpu_per_s_ms"]),
                f(&c[k]["before_cpu_per_s_ms"])
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} / {} / {} | {} / {} / {} | {} / {} | {} ({}) | {} / {} / {} |",
            r["run"],
            r["streams"],
            r["resumed"],
            r["lost"],
            r["duplicated"],
            r["resets"],
            r["refused_reconnects"],
            r["failed_reconnects"],
            f(&t["connected"]["p50_ms"]),
            f(&t["connected"]["p99_ms"]),
            f(&t["connected"]["max_ms"]),
            f(&t["connected_beyond_hint"]["p50_ms"]),
            f(&t["connected_beyond_hint"]["p99_ms"]),
            f(&t["connected_beyond_hint"]["max_ms"]),
            f(&t["first_event"]["p50_ms"]),
            f(&t["first_event"]["p99_ms"]),
            f(&c["survivors"]["us_per_resume"]),
            f(&c["survivors"]["us_per_resume_vs_after"]),
            rate("redis"),
            rate("haproxy"),
            rate("client"),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| run | disconnect seen after kill p50 / max ms | client woke late after the hint p50 / p99 ms | \
         TCP connect p50 / p99 ms | request → response head p50 / p99 / max ms | head → `connected` p99 ms | \
         late-subscribe warnings app2 + app3 | listen overflows / SYN retransmits | machine busy before / storm (cores busy outside the scenario) | \
         storm window ms | resumed on app2 / app3 |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let p = &r["parts"];
        let late = &r["late_subscribe_warnings"];
        let tcp = &r["tcp_during_storm"];
        let _ = writeln!(
            out,
            "| {} | {} / {} | {} / {} | {} / {} | {} / {} / {} | {} | {} | {} / {} | {} / {} ({} / {}) | {} | {} / {} |",
            r["run"],
            f(&p["disconnect_seen_after_kill"]["p50_ms"]),
            f(&p["disconnect_seen_after_kill"]["max_ms"]),
            f(&p["client_wake_late"]["p50_ms"]),
            f(&p["client_wake_late"]["p99_ms"]),
            f(&p["tcp_connect"]["p50_ms"]),
            f(&p["tcp_connect"]["p99_ms"]),
            f(&p["request_to_head"]["p50_ms"]),
            f(&p["request_to_head"]["p99_ms"]),
            f(&p["request_to_head"]["max_ms"]),
            f(&p["head_to_connected"]["p99_ms"]),
            late["app2"].as_u64().unwrap_or(0) + late["app3"].as_u64().unwrap_or(0),
            tcp["ListenOverflows"],
            tcp["TCPSynRetrans"],
            f2(&r["machine_busy"]["before"]["share"]),
            f2(&r["machine_busy"]["storm"]["share"]),
            f2(&r["machine_busy"]["before"]["other_cores"]),
            f2(&r["machine_busy"]["storm"]["other_cores"]),
            f(&r["storm_window_ms"]),
            r["resumed_on"]["app2"],
            r["resumed_on"]["app3"],
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| run | deepest accept queue during the storm (backlog): HAProxy 1 / HAProxy 2 / app2 / app3 | publish failures | \
         resumes that found Redis unreachable (reset) | other server warnings | \
         survivors' Redis calls during the storm ≤ 25 ms / 25–250 ms / 0.25–1 s / > 1 s (timed out) | \
         HAProxy → instance connect (`%Tc`) p50 / p99 ms, ≥ 1 s | instance response head (`%Tr`) p50 / p99 ms, ≥ 1.9 s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in runs {
        let q = &r["listen_queues_during_storm"];
        let h = &r["haproxy_timers_of_resumes"];
        let one = |k: &str| format!("{} ({})", q[k]["max_accept_queue"], q[k]["backlog"]);
        let trips = |t: &Value| {
            let Some(m) = t.as_object() else {
                return "-".to_owned();
            };
            let mut sums = [0u64; 4];
            for (k, v) in m {
                let le: f64 = k
                    .trim_start_matches("le ")
                    .trim_end_matches(" s")
                    .parse()
                    .unwrap_or(f64::INFINITY);
                let slot = if le <= 0.025 {
                    0
                } else if le <= 0.25 {
                    1
                } else if le <= 1.0 {
                    2
                } else {
                    3
                };
                sums[slot] += v.as_u64().unwrap_or(0);
            }
            format!("{} / {} / {} / {}", sums[0], sums[1], sums[2], sums[3])
        };
        let _ = writeln!(
            out,
            "| {} | {} / {} / {} / {} | {} | {} | {} | {} | {} / {}, {} | {} / {}, {} |",
            r["run"],
            one("lb0"),
            one("lb1"),
            one("app2"),
            one("app3"),
            r["publish_failures"],
            r["history_unreadable_warnings"],
            r["other_warnings"],
            trips(&r["survivors_redis_round_trips_during_storm"]),
            f(&h["connect_to_instance_Tc"]["p50_ms"]),
            f(&h["connect_to_instance_Tc"]["p99_ms"]),
            h["connects_of_1s_or_more"],
            f(&h["instance_response_head_Tr"]["p50_ms"]),
            f(&h["instance_response_head_Tr"]["p99_ms"]),
            h["heads_held_1_9s_or_more"],
        );
    }
    out
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not used here.
    let opts = Options::from_env();
    let nofile = raise_nofile();
    assert!(
        nofile as usize > opts.streams + 1000,
        "open-file limit {nofile} is too low for {} client sockets",
        opts.streams
    );
    let haproxy_version = Command::new(balancer::require_binary("haproxy"))
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    println!(
        "reconnect storm: {} streams over {} sessions, {} events/s, {} run(s); \
         two HAProxy processes (shipped haproxy.cfg), clients split evenly; open-file limit {nofile}",
        opts.streams, opts.sessions, opts.rate, opts.runs
    );
    let mut runs = Vec::new();
    for run_no in 1..=opts.runs {
        let r = run(&opts, run_no);
        println!("{}", serde_json::to_string(&r).expect("json"));
        runs.push(r);
    }
    let table = summary(&runs);
    println!("\n{table}");
    let mut m = machine();
    m["haproxy"] = json!(haproxy_version);
    let out = json!({
        "date": today(),
        "machine": m,
        "setup": {
            "instances": 3,
            "balancers": "2 HAProxy processes, each running lb-config/haproxy/haproxy.cfg unchanged; clients split evenly",
            "streams": opts.streams,
            "sessions": opts.sessions,
            "publish_rate": opts.rate,
            "warmup_secs": opts.warmup.as_secs_f64(),
            "tail_secs": opts.tail.as_secs_f64(),
            "retry_ms": opts.retry_ms,
            "server_env": {
                "MAX_STREAMS_PER_ADDRESS": "10000000",
                "RATE_LIMIT_STREAMS_PER_MIN": "0",
                "RATE_LIMIT_SESSIONS_PER_MIN": "0",
                "RATE_LIMIT_PUBLISH_PER_SEC": "0",
                "FF_REDIS_SSE_BROADCAST": "true",
            },
        },
        "runs": runs,
        "summary_markdown": table,
    });
    std::fs::create_dir_all(&opts.out_dir).expect("create output dir");
    let path = opts.out_dir.join("storm.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&out).expect("json") + "\n",
    )
    .expect("write results");
    println!("wrote {}", path.display());
    let bad: Vec<String> = runs
        .iter()
        .filter(|r| {
            r["resumed"] != r["streams"]
                || r["lost"] != 0
                || r["duplicated"] != 0
                || r["publish_failures"] != 0
        })
        .map(|r| r["run"].to_string())
        .collect();
    if !bad.is_empty() {
        eprintln!(
            "runs {} did not resume every stream exactly once",
            bad.join(", ")
        );
        std::process::exit(1);
    }
}
