//! One run of the topology bench: a Redis topology and two instances on
//! it, the streams on A, the publishes through B, and what every process
//! spent on them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::backend::{Backend, Node, NodeSample};
use crate::sessions::sessions_for;
use crate::support::procs::{machine_ticks, proc_cpu, ADMIN};
use crate::support::server::{roomy_client_queue, BenchServer as Server};
use crate::support::sse_client::{now_micros, publish_all, stats};
use crate::support::streams::{self, ms, open_streams, Collector, Via};
use crate::Options;

/// Deliveries slower than this are counted by when they were published.
const SLOW_US: u64 = 5_000;
/// 100 ms slots of publish time for those counts (the last takes the rest).
const SLOW_SLOTS: usize = 1_200;
/// How long the idle CPU of every process is measured before publishing.
const IDLE_WINDOW: Duration = Duration::from_secs(3);

/// Starts the release binary as instance `name` on the Redis that
/// `redis` (a variable and its value) names, flag on.
fn start_server(name: &str, redis: &(&str, String)) -> Server {
    Server::product(
        name,
        &[
            (redis.0, redis.1.clone()),
            ("FF_REDIS_SSE_BROADCAST", "true".to_owned()),
            roomy_client_queue(),
        ],
    )
}

/// CPU per delivery of everything involved, in µs.
pub struct CpuPerDelivery {
    pub a: f64,
    pub b: f64,
    /// Every Redis process: primaries and replicas.
    pub redis: f64,
    pub redis_primaries: f64,
    pub load_generator: f64,
}

impl CpuPerDelivery {
    pub fn servers_and_redis(&self) -> f64 {
        self.a + self.b + self.redis
    }
}

pub struct RunResult {
    pub topology: &'static str,
    pub rep: usize,
    pub deliveries_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu: CpuPerDelivery,
    pub lost: u64,
    pub duplicates: u64,
    pub id_not_increasing: u64,
    /// Failed publishes.
    pub failures: u64,
    /// Everything, as written to topology.json.
    pub json: Value,
}

impl RunResult {
    /// Loss, duplicates, ids out of order or failed publishes.
    pub fn bad(&self) -> bool {
        self.lost + self.duplicates + self.id_not_increasing + self.failures > 0
    }
}

/// One run on `topology` (`single` or `cluster`): fresh Redis processes,
/// A and B on them, the streams on A, an idle window, then the publishes
/// through B.
pub fn run_topology(
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
        let col = Collector::strict(SLOW_US, SLOW_SLOTS);
        let logs = open_streams(a.addr, Via::Fresh, &sessions, per_session_streams, &col).await;
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

        let route = vec![b.addr; sessions.len()];
        let failures = publish_all(&http, &sessions, &route, opts.rate, 0..per_session).await;
        let publish_secs = t0.elapsed().as_secs_f64();
        col.wait_delivered(expected, Duration::from_secs(15), Duration::from_millis(2))
            .await;
        let window = t0.elapsed().as_secs_f64();
        let (cpu_a, cpu_b) = (a.cpu() - cpu_a0, b.cpu() - cpu_b0);
        let cpu_self = proc_cpu(std::process::id()) - cpu_self0;
        let machine1 = machine_ticks();
        let nodes1: Vec<NodeSample> = nodes.iter_mut().map(Node::sample).collect();
        let (stats_a1, stats_b1) = (stats(&http, a.addr, ADMIN).await, stats(&http, b.addr, ADMIN).await);
        // A little more time for stragglers, so duplicates would show.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let delivered = col.delivered.load(Ordering::Relaxed);
        let unique = streams::unique(logs.iter().map(|(_, seen)| seen));
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
        let (p50_ms, p99_ms) = (ms(&h, 0.50), ms(&h, 0.99));
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
                "p99_9": ms(&h, 0.999),
                "max": h.max() as f64 / 1000.0,
            },
            "slow_deliveries": {
                "over_ms": SLOW_US as f64 / 1000.0,
                "count": col.slow_count(),
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
