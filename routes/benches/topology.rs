//! Cross-instance delivery over one Redis and over a Redis Cluster (see
//! docs/benchmarks.md and docs/redis.md).
//!
//! Each run starts one Redis topology — a single `redis-server`
//! (tests/support/redis_server.rs), or a cluster of 3 primaries + 3 replicas
//! (tests/support/redis_cluster.rs) — and two release `sse-scale`
//! instances, A and B, on it. The in-process load generator opens
//! `BENCH_STREAMS` SSE streams on A over raw TCP, spread over
//! `BENCH_SESSIONS` sessions (in the cluster, an equal share of sessions on
//! each primary), and publishes through B only, so every delivery crosses
//! Redis: B's publish script (XADD + PUBLISH, or XADD + SPUBLISH on the
//! primary owning the session's slot) → A's subscription → A's streams. Both
//! topologies get the same offered load, `BENCH_RATE` publishes/s for
//! `BENCH_SECS`.
//!
//! Per run it reports deliveries/s, loss and duplicates (each event carries
//! its per-session sequence number, tracked per stream in a bitset, and its
//! `id:` must be greater than the stream's previous one), p50/p99
//! publish-to-receive latency, CPU per delivery (utime+stime from
//! `/proc/<pid>/stat`) of A, of B and of the Redis processes (each node),
//! the publishes each Redis node ran (`INFO commandstats` deltas) and the
//! messages A received from Redis (`/stats`).
//!
//! The topologies alternate (single, cluster, single, …) `BENCH_REPS`
//! times and the summary gives the cluster/single ratio of CPU per delivery
//! for each pair: the machine is shared and noisy, so ratios within one run
//! are what we report rather than absolute figures.
//!
//! Writes `$BENCH_OUT/topology.json` (default `docs/bench/`). Knobs:
//! `BENCH_STREAMS` (2,000), `BENCH_SESSIONS` (200), `BENCH_RATE`
//! (publishes/s, 1,000), `BENCH_SECS` (10), `BENCH_REPS` (3); `BENCH_QUICK=1`
//! is a small smoke run.

#[path = "support/procs.rs"]
mod procs;
#[path = "../../tests/support/redis_cluster.rs"]
mod redis_cluster;
#[path = "../../tests/support/redis_server.rs"]
mod redis_server;
#[path = "support/server.rs"]
mod server;
#[path = "support/sse_client.rs"]
mod sse_client;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use redis_cluster::RedisCluster;
use redis_server::RedisServer;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use server::BenchServer as Server;

use procs::{machine_ticks, proc_cpu, today, ADMIN};
use sse_client::{create_session, now_micros, parse_data, parse_id, stats, Session};

/// Streams opened at once while setting up a run.
const OPEN_CONCURRENCY: usize = 256;
/// Commands counted per Redis node: the publish script (`EVALSHA`, or
/// `EVAL` when the node did not have it cached yet) and the send on the
/// channel it runs (`PUBLISH` on one server, `SPUBLISH` in a cluster).
const COUNTED: [&str; 4] = ["evalsha", "eval", "spublish", "publish"];
/// Deliveries slower than this are counted by when they were published.
const SLOW_US: u64 = 5_000;
/// 100 ms slots of publish time for those counts (the last takes the rest).
const SLOW_SLOTS: usize = 1_200;
/// How long the idle CPU of every process is measured before publishing.
const IDLE_WINDOW: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------- processes

/// Starts the release binary as instance `name` on the Redis that
/// `redis` (a variable and its value) names, flag on.
fn start_server(name: &str, redis: &(&str, String)) -> Server {
    Server::product(
        name,
        &[
            (redis.0, redis.1.clone()),
            ("FF_REDIS_SSE_BROADCAST", "true".to_owned()),
            // Room for a reader that falls behind while the machine is
            // saturated, so a slow load generator shows as latency, not as
            // streams cut for lagging.
            ("SSE_CLIENT_QUEUE", "1024".to_owned()),
        ],
    )
}

// ---------------------------------------------------------------- Redis

/// The Redis processes of one run.
enum Backend {
    Single(RedisServer),
    Cluster(RedisCluster),
}

/// One Redis process, with a connection of its own for `INFO`.
struct Node {
    port: u16,
    /// The primary's port, for a replica.
    replica_of: Option<u16>,
    pid: u32,
    conn: redis::Connection,
}

/// A node's CPU and command counters at one moment.
struct NodeSample {
    cpu: Duration,
    /// Command name → (successful calls, µs inside Redis).
    calls: BTreeMap<&'static str, (u64, u64)>,
}

impl Backend {
    fn start(topology: &str) -> Backend {
        match topology {
            "single" => Backend::Single(RedisServer::start()),
            "cluster" => Backend::Cluster(RedisCluster::start()),
            other => panic!("unknown topology {other}"),
        }
    }

    /// The variable that points an instance at this topology.
    fn env(&self) -> (&'static str, String) {
        match self {
            Backend::Single(r) => ("REDIS_URL", r.url()),
            Backend::Cluster(c) => ("REDIS_CLUSTER_NODES", c.seed_urls()),
        }
    }

    fn nodes(&self) -> Vec<Node> {
        let ports = match self {
            Backend::Single(r) => vec![r.port],
            Backend::Cluster(c) => c.ports(),
        };
        ports
            .into_iter()
            .map(|port| {
                let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
                    .unwrap_or_else(|e| panic!("connect to Redis {port}: {e}"));
                let pid = info_field(&info(&mut conn, "server"), "process_id")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("INFO server of {port} has no process_id"));
                let replication = info(&mut conn, "replication");
                let replica_of = match info_field(&replication, "role") {
                    Some("slave") => {
                        info_field(&replication, "master_port").and_then(|p| p.parse().ok())
                    }
                    _ => None,
                };
                Node {
                    port,
                    replica_of,
                    pid,
                    conn,
                }
            })
            .collect()
    }
}

fn info(conn: &mut redis::Connection, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query(conn)
        .unwrap_or_else(|e| panic!("INFO {section}: {e}"))
}

fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

impl Node {
    fn sample(&mut self) -> NodeSample {
        let cpu = proc_cpu(self.pid);
        let stats = info(&mut self.conn, "commandstats");
        let mut calls = BTreeMap::new();
        for name in COUNTED {
            // cmdstat_evalsha:calls=12,usec=345,usec_per_call=28.75,...
            let line = info_field(&stats, &format!("cmdstat_{name}")).unwrap_or("");
            let num = |key: &str| {
                line.split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            // A failed call is counted too: the client's first `EVALSHA` on
            // a node that has not cached the script yet gets NOSCRIPT, and
            // the `EVAL` that follows is the publish.
            calls.insert(name, (num("calls") - num("failed_calls"), num("usec")));
        }
        NodeSample { cpu, calls }
    }
}

/// `sse:session:{id}`: the session's channel (and keys), the id its hash tag.
fn channel(session: &str) -> String {
    format!("sse:session:{{{session}}}")
}

/// Which primary serves each hash slot, from `CLUSTER SLOTS` (one node's
/// view; the cluster has settled when `RedisCluster::start` returns).
fn slot_map(conn: &mut redis::Connection) -> Vec<(u16, u16, u16)> {
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query(conn)
        .expect("CLUSTER SLOTS");
    ranges
        .iter()
        .map(|r| {
            let primary: Vec<redis::Value> = redis::from_redis_value(&r[2]).expect("slot owner");
            (
                redis::from_redis_value(&r[0]).expect("first slot"),
                redis::from_redis_value(&r[1]).expect("last slot"),
                redis::from_redis_value(&primary[1]).expect("owner port"),
            )
        })
        .collect()
}

// ---------------------------------------------------------------- streams

/// What every stream reports; shared with the controller.
struct Collector {
    connected: AtomicUsize,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    /// Events whose `id:` was not greater than the stream's previous one.
    id_not_increasing: AtomicU64,
    errors: AtomicU64,
    /// Sharded so thousands of stream tasks rarely contend on one lock.
    latency: Vec<Mutex<Histogram<u64>>>,
    /// When publishing started (µs since the epoch), and deliveries slower
    /// than `SLOW_US` by 100 ms slot of their publish time: shows whether a
    /// latency tail is one stall or spread over the window.
    start_micros: AtomicU64,
    slow: Vec<AtomicU64>,
}

impl Collector {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            connected: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            id_not_increasing: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: (0..64).map(|_| Mutex::new(histogram())).collect(),
            start_micros: AtomicU64::new(u64::MAX),
            slow: (0..SLOW_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn note_slow(&self, published_micros: u64) {
        let since = published_micros.saturating_sub(self.start_micros.load(Ordering::Relaxed));
        let slot = ((since / 100_000) as usize).min(SLOW_SLOTS - 1);
        self.slow[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// `[[ms after the start, slow deliveries], ...]`, non-empty slots only.
    fn slow_slots(&self) -> Value {
        let slots: Vec<Value> = self
            .slow
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then(|| json!([i * 100, n]))
            })
            .collect();
        json!(slots)
    }

    fn merged_latency(&self) -> Histogram<u64> {
        let mut all = histogram();
        for h in &self.latency {
            all.add(&*h.lock().expect("histogram lock"))
                .expect("merge histograms");
        }
        all
    }
}

/// Microseconds, 1 µs to 60 s, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")
}

/// Which sequence numbers a stream received (a bitset), so loss and
/// duplicates are exact even if events were reordered.
type Seen = Arc<Mutex<Vec<u64>>>;

/// Opens one SSE stream over raw TCP (cheaper per stream than an HTTP
/// client, so the load generator takes less of the machine) and reads it
/// until the connection ends. Events carry `{"t": <publish µs>, "s":
/// <sequence in session>}`.
async fn run_stream(
    addr: SocketAddr,
    session: Arc<Session>,
    shard: usize,
    col: Arc<Collector>,
    seen: Seen,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    // Held until this stream is connected (or has failed).
    let mut permit = Some(permit);
    let Ok(mut sock) = TcpStream::connect(addr).await else {
        col.errors.fetch_add(1, Ordering::Relaxed);
        return;
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
    // The last `id:` seen; `connected` carries the stream's position.
    let mut last_id = (0, 0);
    let mut lat: Vec<u64> = Vec::new();
    loop {
        let n = match sock.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        carry.extend_from_slice(&buf[..n]);
        let mut start = 0;
        let now = now_micros();
        let (mut delivered, mut dups, mut unordered) = (0u64, 0u64, 0u64);
        while let Some(pos) = carry[start..].iter().position(|&b| b == b'\n') {
            let line = &carry[start..start + pos];
            start += pos + 1;
            if let Some(id) = line.strip_prefix(b"id: ").and_then(parse_id) {
                if connected && id <= last_id {
                    unordered += 1;
                }
                last_id = id;
                continue;
            }
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
                let l = now.saturating_sub(t).max(1);
                if l > SLOW_US {
                    col.note_slow(t);
                }
                lat.push(l);
                let mut seen = seen.lock().expect("stream log lock");
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
        if delivered > 0 || unordered > 0 {
            col.delivered.fetch_add(delivered, Ordering::Relaxed);
            col.duplicates.fetch_add(dups, Ordering::Relaxed);
            col.id_not_increasing
                .fetch_add(unordered, Ordering::Relaxed);
            let mut h = col.latency[shard % col.latency.len()]
                .lock()
                .expect("histogram lock");
            for v in lat.drain(..) {
                let _ = h.record(v);
            }
        }
    }
    if !connected {
        col.errors.fetch_add(1, Ordering::Relaxed);
    }
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
) -> Vec<Seen> {
    let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let mut logs = Vec::new();
    for session in sessions {
        for _ in 0..per_session {
            let seen = Seen::default();
            let permit = gate.clone().acquire_owned().await.expect("semaphore");
            let shard = logs.len();
            logs.push(seen.clone());
            tokio::spawn(run_stream(
                addr,
                session.clone(),
                shard,
                col.clone(),
                seen,
                permit,
            ));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while col.connected.load(Ordering::Relaxed) + (col.errors.load(Ordering::Relaxed) as usize)
        < logs.len()
    {
        assert!(Instant::now() < deadline, "streams did not connect in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    logs
}

/// Publishes `per_session` events to each session through `addr`, at `rate`
/// publishes/s in total. Each session's events go out one after another
/// (its own task), so they are published in sequence order. Returns the
/// number of failed publishes.
async fn publish_all(
    http: &reqwest::Client,
    sessions: &[Arc<Session>],
    addr: SocketAddr,
    rate: f64,
    per_session: u64,
) -> u64 {
    let period = Duration::from_secs_f64(sessions.len() as f64 / rate);
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        let (http, session, failures) = (http.clone(), session.clone(), failures.clone());
        // Spread the sessions' ticks over one period so publishes are even.
        let offset = period.mul_f64(i as f64 / sessions.len() as f64);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            // A publisher that fell behind catches up: the offered load stays
            // the same, and the shortfall shows in the achieved rate.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let url = format!("http://{addr}/sessions/{}/events", session.id);
            let auth = format!("Bearer {}", session.token);
            for s in 0..per_session {
                tick.tick().await;
                if sse_client::publish_numbered(&http, &url, &auth, s)
                    .await
                    .is_err()
                {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher task");
    }
    failures.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------- one run

/// CPU per delivery of everything involved, in µs.
struct CpuPerDelivery {
    a: f64,
    b: f64,
    /// Every Redis process: primaries and replicas.
    redis: f64,
    redis_primaries: f64,
    load_generator: f64,
}

impl CpuPerDelivery {
    fn servers_and_redis(&self) -> f64 {
        self.a + self.b + self.redis
    }
}

struct RunResult {
    topology: &'static str,
    rep: usize,
    deliveries_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu: CpuPerDelivery,
    lost: u64,
    duplicates: u64,
    id_not_increasing: u64,
    /// Failed publishes.
    failures: u64,
    /// Everything, as written to topology.json.
    json: Value,
}

impl RunResult {
    fn bad(&self) -> bool {
        self.lost + self.duplicates + self.id_not_increasing + self.failures > 0
    }
}

/// Sessions created on `server`. In a cluster, each primary gets an equal
/// share (sessions landing on a primary that has its share are left
/// unused), so the shards carry equal load; returns each session's primary.
async fn sessions_for(
    http: &reqwest::Client,
    server: &Server,
    n: usize,
    nodes: &mut [Node],
    cluster: bool,
) -> (Vec<Arc<Session>>, Vec<u16>) {
    let mut sessions = Vec::new();
    let mut owners = Vec::new();
    if !cluster {
        for _ in 0..n {
            sessions.push(Arc::new(create_session(http, server.addr).await));
            owners.push(nodes[0].port);
        }
        return (sessions, owners);
    }
    let conn = &mut nodes[0].conn;
    let slots = slot_map(conn);
    let mut primaries: Vec<u16> = slots.iter().map(|r| r.2).collect();
    primaries.sort_unstable();
    primaries.dedup();
    let quota = |p: u16| {
        let i = primaries.iter().position(|&q| q == p).expect("a primary");
        n / primaries.len() + usize::from(i < n % primaries.len())
    };
    let mut tries = 0;
    while sessions.len() < n {
        tries += 1;
        assert!(
            tries < 20 * n + 100,
            "sessions did not spread over the primaries"
        );
        let s = create_session(http, server.addr).await;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(channel(&s.id))
            .query(conn)
            .expect("CLUSTER KEYSLOT");
        let owner = slots
            .iter()
            .find(|r| r.0 <= slot && slot <= r.1)
            .map(|r| r.2)
            .expect("every slot is served");
        if owners.iter().filter(|&&o| o == owner).count() < quota(owner) {
            sessions.push(Arc::new(s));
            owners.push(owner);
        }
    }
    (sessions, owners)
}

fn run_topology(
    runtime: &tokio::runtime::Runtime,
    topology: &'static str,
    rep: usize,
    opts: &Options,
) -> RunResult {
    let backend = Backend::start(topology);
    let redis_env = backend.env();
    let mut nodes = backend.nodes();
    let a = start_server("bench-a", &redis_env);
    let b = start_server("bench-b", &redis_env);
    // Blocking Redis calls below run on this thread (block_on's), never on
    // the runtime's workers, so they do not stall the streams.
    runtime.block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(opts.sessions + 16)
            .build()
            .expect("http client");
        let (sessions, owners) =
            sessions_for(&http, &b, opts.sessions, &mut nodes, topology == "cluster").await;
        let per_session_streams = (opts.streams / opts.sessions).max(1);
        let col = Collector::new();
        let logs = open_streams(a.addr, &sessions, per_session_streams, &col).await;
        assert_eq!(col.errors.load(Ordering::Relaxed), 0, "streams failed to open on A");
        // A stream is `connected` once A's subscription is confirmed; wait
        // for all of them anyway, and let A finish the set-up work.
        let deadline = Instant::now() + Duration::from_secs(30);
        while stats(&http, a.addr, ADMIN).await["redis"]["subscribed_channels"].as_u64()
            < Some(sessions.len() as u64)
        {
            assert!(
                Instant::now() < deadline,
                "A did not subscribe every session"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        // What every process burns with the streams open and no events
        // (heartbeats, Redis's cron and cluster bus): the fixed part of the
        // CPU below, which six Redis processes pay six times.
        let idle = |a: &Server, b: &Server, nodes: &[Node]| {
            let mut v = vec![a.cpu(), b.cpu()];
            v.extend(nodes.iter().map(|n| proc_cpu(n.pid)));
            v
        };
        let idle0 = idle(&a, &b, &nodes);
        tokio::time::sleep(IDLE_WINDOW).await;
        let idle_pct: Vec<f64> = idle(&a, &b, &nodes)
            .iter()
            .zip(&idle0)
            .map(|(t1, t0)| (*t1 - *t0).as_secs_f64() * 100.0 / IDLE_WINDOW.as_secs_f64())
            .collect();

        let per_session = ((opts.rate * opts.secs) / sessions.len() as f64)
            .ceil()
            .max(1.0) as u64;
        let published = per_session * sessions.len() as u64;
        let expected = published * per_session_streams as u64;
        let (stats_a0, stats_b0) = (stats(&http, a.addr, ADMIN).await, stats(&http, b.addr, ADMIN).await);
        let nodes0: Vec<NodeSample> = nodes.iter_mut().map(Node::sample).collect();
        let (cpu_a0, cpu_b0, cpu_self0) = (a.cpu(), b.cpu(), proc_cpu(std::process::id()));
        let machine0 = machine_ticks();
        let t0 = Instant::now();
        col.start_micros.store(now_micros(), Ordering::Relaxed);

        let failures = publish_all(&http, &sessions, b.addr, opts.rate, per_session).await;
        let publish_secs = t0.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(15);
        while col.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let window = t0.elapsed().as_secs_f64();
        let (cpu_a, cpu_b) = (a.cpu() - cpu_a0, b.cpu() - cpu_b0);
        let cpu_self = proc_cpu(std::process::id()) - cpu_self0;
        let machine1 = machine_ticks();
        let nodes1: Vec<NodeSample> = nodes.iter_mut().map(Node::sample).collect();
        let (stats_a1, stats_b1) = (stats(&http, a.addr, ADMIN).await, stats(&http, b.addr, ADMIN).await);
        // A little more time for stragglers, so duplicates would show.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let delivered = col.delivered.load(Ordering::Relaxed);
        let unique: u64 = logs
            .iter()
            .map(|l| {
                l.lock()
                    .expect("log")
                    .iter()
                    .map(|w| u64::from(w.count_ones()))
                    .sum::<u64>()
            })
            .sum();
        let lost = expected.saturating_sub(unique);
        let h = col.merged_latency();
        let per_delivery = |d: Duration| d.as_secs_f64() * 1e6 / delivered.max(1) as f64;

        let mut redis_cpu = Duration::ZERO;
        let mut node_json = Vec::new();
        let (mut primaries_cpu, mut redis_idle_pct) = (Duration::ZERO, 0.0);
        // EVALSHA + EVAL calls on a node during the window: the publishes it ran.
        let scripts = |s0: &NodeSample, s1: &NodeSample| {
            ["evalsha", "eval"]
                .iter()
                .map(|c| s1.calls[c].0 - s0.calls[c].0)
                .sum::<u64>()
        };
        let node_publishes = |port: u16| {
            nodes
                .iter()
                .zip(nodes0.iter().zip(&nodes1))
                .find(|(n, _)| n.port == port)
                .map_or(0, |(_, (s0, s1))| scripts(s0, s1))
        };
        for (((node, s0), s1), node_idle) in
            nodes.iter().zip(&nodes0).zip(&nodes1).zip(&idle_pct[2..])
        {
            let cpu = s1.cpu - s0.cpu;
            redis_cpu += cpu;
            redis_idle_pct += node_idle;
            if node.replica_of.is_none() {
                primaries_cpu += cpu;
            }
            let delta = |name: &str| s1.calls[name].0 - s0.calls[name].0;
            let usec = |name: &str| s1.calls[name].1 - s0.calls[name].1;
            node_json.push(json!({
                "port": node.port,
                "role": if node.replica_of.is_none() { "primary" } else { "replica" },
                "replica_of": node.replica_of,
                "sessions": owners.iter().filter(|&&o| o == node.port).count(),
                "publishes": scripts(s0, s1),
                "evalsha": delta("evalsha"), "eval": delta("eval"),
                "spublish": delta("spublish"), "publish": delta("publish"),
                "script_usec": usec("evalsha") + usec("eval"),
                "cpu_secs": cpu.as_secs_f64(),
                "idle_cpu_percent": node_idle,
                "cpu_us_per_delivery": per_delivery(cpu),
                // A primary's CPU per publish it ran; a replica's per
                // publish its primary ran.
                "cpu_us_per_publish": cpu.as_secs_f64() * 1e6
                    / node_publishes(node.replica_of.unwrap_or(node.port)).max(1) as f64,
            }));
        }
        let cpu = CpuPerDelivery {
            a: per_delivery(cpu_a),
            b: per_delivery(cpu_b),
            redis: per_delivery(redis_cpu),
            redis_primaries: per_delivery(primaries_cpu),
            load_generator: per_delivery(cpu_self),
        };
        let redis_delta = |s0: &Value, s1: &Value, f: &str| {
            s1["redis"][f].as_u64().unwrap_or(0) - s0["redis"][f].as_u64().unwrap_or(0)
        };
        let instance = |s0: &Value, s1: &Value| {
            json!({
                "topology": s1["redis"]["topology"],
                "subscribed_channels": s1["redis"]["subscribed_channels"],
                "messages_in": redis_delta(s0, s1, "messages_in"),
                "bytes_in": redis_delta(s0, s1, "bytes_in"),
                "received": redis_delta(s0, s1, "received"),
                "published_redis": redis_delta(s0, s1, "published_redis"),
                "fallback_local": redis_delta(s0, s1, "fallback_local"),
            })
        };
        let busy = (machine1.0 - machine0.0) as f64 / (machine1.1 - machine0.1).max(1) as f64;
        let (p50_ms, p99_ms) = (
            h.value_at_quantile(0.50) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
        );
        let duplicates = col.duplicates.load(Ordering::Relaxed);
        let id_not_increasing = col.id_not_increasing.load(Ordering::Relaxed);
        let deliveries_per_sec = delivered as f64 / window;
        let json = json!({
            "topology": topology, "rep": rep,
            "streams": logs.len(), "sessions": sessions.len(),
            "streams_per_session": per_session_streams,
            "published": published, "publish_failures": failures, "stream_errors": col.errors.load(Ordering::Relaxed),
            "publish_secs": publish_secs, "publishes_per_sec": published as f64 / publish_secs,
            "window_secs": window,
            "offered_deliveries_per_sec": opts.rate * per_session_streams as f64,
            "expected_deliveries": expected, "delivered": delivered,
            "deliveries_per_sec": deliveries_per_sec,
            "lost": lost, "duplicates": duplicates, "id_not_increasing": id_not_increasing,
            "latency_ms": {
                "p50": p50_ms, "p99": p99_ms,
                "p99_9": h.value_at_quantile(0.999) as f64 / 1000.0,
                "max": h.max() as f64 / 1000.0,
            },
            "slow_deliveries": {
                "over_ms": SLOW_US as f64 / 1000.0,
                "count": col.slow.iter().map(|n| n.load(Ordering::Relaxed)).sum::<u64>(),
                "by_publish_time_100ms": col.slow_slots(),
            },
            "cpu_secs": {
                "a": cpu_a.as_secs_f64(), "b": cpu_b.as_secs_f64(),
                "redis": redis_cpu.as_secs_f64(), "load_generator": cpu_self.as_secs_f64(),
            },
            "idle_cpu_percent": { "a": idle_pct[0], "b": idle_pct[1], "redis": redis_idle_pct },
            "cpu_us_per_delivery": {
                "a": cpu.a, "b": cpu.b, "redis": cpu.redis,
                "redis_primaries": cpu.redis_primaries,
                "redis_replicas": cpu.redis - cpu.redis_primaries,
                "servers_and_redis": cpu.servers_and_redis(),
                "load_generator": cpu.load_generator,
            },
            "machine_busy_fraction": busy,
            "redis_cpu_us_per_publish": redis_cpu.as_secs_f64() * 1e6 / published.max(1) as f64,
            "redis_nodes": node_json,
            "instance_a": instance(&stats_a0, &stats_a1),
            "instance_b": instance(&stats_b0, &stats_b1),
        });
        eprintln!(
            "  {topology:7} rep {rep}: {:>6.0} deliveries/s ({:.0} publishes/s), \
             µs/delivery A {:.2} B {:.2} Redis {:.2} (load gen {:.2}), machine {:.0} % busy, \
             p50 {:.2} ms p99 {:.2} ms, lost {} dup {} unordered {} failed {}",
            deliveries_per_sec,
            published as f64 / publish_secs,
            cpu.a,
            cpu.b,
            cpu.redis,
            cpu.load_generator,
            busy * 100.0,
            p50_ms,
            p99_ms,
            lost,
            duplicates,
            id_not_increasing,
            failures
        );
        RunResult {
            topology,
            rep,
            deliveries_per_sec,
            p50_ms,
            p99_ms,
            cpu,
            lost,
            duplicates,
            id_not_increasing,
            failures,
            json,
        }
    })
    // A, B and then the Redis processes stop here (drop order: reverse of
    // declaration), before the next run starts.
}

// ---------------------------------------------------------------- output

fn machine() -> Value {
    let redis = Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut m = procs::machine();
    m["redis"] = json!(redis);
    m
}

struct Options {
    streams: usize,
    sessions: usize,
    /// Publishes per second, over all sessions.
    rate: f64,
    secs: f64,
    reps: usize,
    out: PathBuf,
}

impl Options {
    fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let num = |k: &str, default: f64| {
            var(k).map_or(default, |v| {
                v.parse().unwrap_or_else(|_| panic!("{k}: a number"))
            })
        };
        let quick = var("BENCH_QUICK").is_some();
        Self {
            streams: num("BENCH_STREAMS", if quick { 200.0 } else { 2_000.0 }) as usize,
            sessions: num("BENCH_SESSIONS", if quick { 20.0 } else { 200.0 }) as usize,
            rate: num("BENCH_RATE", if quick { 100.0 } else { 1_000.0 }),
            secs: num("BENCH_SECS", if quick { 3.0 } else { 10.0 }),
            reps: num("BENCH_REPS", if quick { 1.0 } else { 3.0 }) as usize,
            out: procs::bench_out(),
        }
    }
}

fn main() {
    // Both ends of every stream live on this machine: the load generator
    // needs one socket per stream too.
    let nofile = rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-file limit");
    let opts = Options::from_env();
    assert!(
        opts.sessions > 0 && opts.rate > 0.0,
        "BENCH_SESSIONS and BENCH_RATE must be > 0"
    );
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let started = Instant::now();
    let fanout = (opts.streams / opts.sessions).max(1);
    eprintln!(
        "topology benchmark: {} streams on A over {} sessions, {} publishes/s through B \
         ({} deliveries/s) for {} s, {} repetitions (open-file limit {nofile})",
        fanout * opts.sessions,
        opts.sessions,
        opts.rate,
        opts.rate * fanout as f64,
        opts.secs,
        opts.reps
    );
    let mut runs = Vec::new();
    for rep in 1..=opts.reps {
        // Alternating, so drift in what else the machine runs hits both.
        for topology in ["single", "cluster"] {
            runs.push(run_topology(&runtime, topology, rep, &opts));
        }
    }

    let pairs: Vec<(&RunResult, &RunResult)> = runs
        .chunks(2)
        .filter(|p| p.len() == 2)
        .map(|p| (&p[0], &p[1]))
        .collect();
    let ratio = |c: f64, s: f64| if s > 0.0 { c / s } else { 0.0 };
    let ratios: Vec<Value> = pairs
        .iter()
        .map(|(s, c)| {
            json!({
                "rep": s.rep,
                "a": ratio(c.cpu.a, s.cpu.a),
                "b": ratio(c.cpu.b, s.cpu.b),
                "redis": ratio(c.cpu.redis, s.cpu.redis),
                "redis_primaries": ratio(c.cpu.redis_primaries, s.cpu.redis_primaries),
                "servers_and_redis": ratio(c.cpu.servers_and_redis(), s.cpu.servers_and_redis()),
                "p99": ratio(c.p99_ms, s.p99_ms),
            })
        })
        .collect();

    let dir = opts.out.clone();
    std::fs::create_dir_all(&dir).expect("create the output directory");
    let results = json!({
        "date": today(),
        "command": "cargo bench -p sse-scale-server --bench topology",
        "options": {
            "streams": fanout * opts.sessions, "sessions": opts.sessions,
            "streams_per_session": fanout, "publishes_per_sec": opts.rate,
            "offered_deliveries_per_sec": opts.rate * fanout as f64,
            "secs": opts.secs, "reps": opts.reps,
        },
        "machine": machine(),
        "load_generator": "in-process tokio, raw TCP streams on A, HTTP publishes to B, on the same machine as the servers and Redis",
        "topologies": {
            "single": "one redis-server",
            "cluster": "Redis Cluster, 3 primaries + 3 replicas (one process each), sharded Pub/Sub",
        },
        "runs": runs.iter().map(|r| &r.json).collect::<Vec<_>>(),
        "ratios_cluster_over_single": ratios,
        "elapsed_secs": started.elapsed().as_secs_f64(),
    });
    let json_path = dir.join("topology.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&results).expect("json") + "\n",
    )
    .expect("write topology.json");

    // Summary (Markdown, for docs/benchmarks.md).
    let mut out = String::new();
    let _ = writeln!(out, "\n| rep | topology | deliveries/s | A µs/del | B µs/del | Redis µs/del (primaries + replicas) | A+B+Redis | p50 ms | p99 ms | > 5 ms (most in one 100 ms) | A messages from Redis | lost | dup | ids not increasing |");
    let _ = writeln!(
        out,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &runs {
        let slow = &r.json["slow_deliveries"];
        let worst = slow["by_publish_time_100ms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s[1].as_u64())
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} ({:.2} + {:.2}) | {:.2} | {:.2} | {:.2} | {} ({worst}) | {} | {} | {} | {} |",
            r.rep, r.topology, r.deliveries_per_sec, r.cpu.a, r.cpu.b, r.cpu.redis,
            r.cpu.redis_primaries, r.cpu.redis - r.cpu.redis_primaries, r.cpu.servers_and_redis(),
            r.p50_ms, r.p99_ms, slow["count"], r.json["instance_a"]["messages_in"],
            r.lost, r.duplicates, r.id_not_increasing
        );
    }
    let _ = writeln!(out, "\nPer Redis node (publishes = EVALSHA + EVAL calls):\n\n| rep | topology | node | role | sessions | publishes | SPUBLISH | PUBLISH | CPU µs/delivery | CPU µs/publish of its shard | idle CPU % |");
    let _ = writeln!(
        out,
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &runs {
        for n in r.json["redis_nodes"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} |",
                r.rep,
                r.topology,
                n["port"],
                match n["replica_of"].as_u64() {
                    Some(p) => format!("replica of {p}"),
                    None => "primary".to_owned(),
                },
                n["sessions"],
                n["publishes"],
                n["spublish"],
                n["publish"],
                n["cpu_us_per_delivery"].as_f64().unwrap_or(0.0),
                n["cpu_us_per_publish"].as_f64().unwrap_or(0.0),
                n["idle_cpu_percent"].as_f64().unwrap_or(0.0)
            );
        }
    }
    let _ = writeln!(out, "\nCluster / single, CPU per delivery:\n\n| rep | A | B | Redis (all) | Redis primaries | A+B+Redis | p99 |");
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|");
    for r in &ratios {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r["rep"],
            f("a"),
            f("b"),
            f("redis"),
            f("redis_primaries"),
            f("servers_and_redis"),
            f("p99")
        );
    }
    let _ = writeln!(
        out,
        "\nwrote {} in {:.0} s",
        json_path.display(),
        started.elapsed().as_secs_f64()
    );
    println!("{out}");
    if runs.iter().any(RunResult::bad) {
        eprintln!("FAILED: loss, duplicates, ids out of order or failed requests (see above)");
        std::process::exit(1);
    }
}
