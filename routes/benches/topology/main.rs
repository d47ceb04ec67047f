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

#[path = "../support/mod.rs"]
mod support;

mod backend;
mod report;
mod run;
mod sessions;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

use run::{run_topology, RunResult};
use support::procs::today;
use support::{knobs, output, procs};

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
        use knobs::num;
        let quick = knobs::quick();
        Self {
            streams: num("BENCH_STREAMS", if quick { 200.0 } else { 2_000.0 }) as usize,
            sessions: num("BENCH_SESSIONS", if quick { 20.0 } else { 200.0 }) as usize,
            rate: num("BENCH_RATE", if quick { 100.0 } else { 1_000.0 }),
            secs: num("BENCH_SECS", if quick { 3.0 } else { 10.0 }),
            reps: num("BENCH_REPS", if quick { 1.0 } else { 3.0 }) as usize,
            out: output::bench_out(),
        }
    }
}

/// The machine, and the Redis that ran on it.
fn machine() -> Value {
    let mut m = procs::machine();
    m["redis"] = json!(procs::version_of("redis-server", "--version"));
    m
}

fn main() {
    let nofile = procs::raise_nofile();
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

    let ratios = report::ratios(&runs);
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
    let json_path = output::write_json(&opts.out, "topology.json", &results);

    let mut out = report::summary(&runs, &ratios);
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
