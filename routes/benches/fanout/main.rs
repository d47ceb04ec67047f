//! Fan-out benchmark (see docs/benchmarks.md).
//!
//! Measures the release `sse-scale` binary against two baselines started
//! the same way, with the same load, in the same run
//! (`routes/benches/support/baselines.rs`):
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

#[path = "../support/mod.rs"]
mod support;

mod callgrind;
mod churn;
mod idle;
mod report;
mod servers;
mod sweep;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

use report::RunResults;
use servers::{start_server, Kind};
use support::procs::{machine, today};
use support::redis_server::RedisServer;
use support::server::BenchServer as Server;
use support::streams::Via;
use support::{baselines, knobs, output, procs};

/// Streams per session in every fan-out scenario.
const FANOUT: usize = 100;
/// Publish rate of the latency/CPU sweep: 10,000 deliveries/s at fan-out 100.
const DELIVERIES_PER_SEC: u64 = 10_000;
/// The highest load the sweep offers: what this 2-core machine sustains
/// with the load generator on the same cores (see docs/benchmarks.md).
const HIGH_DELIVERIES_PER_SEC: u64 = 160_000;

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
    /// `BENCH_SERVER_ENV=K=V,K=V` — extra environment for `sse-scale`
    /// (leaked once: the names live as long as the benchmark).
    server_env: Vec<(&'static str, String)>,
    /// `BENCH_OUT` — where results go (default `docs/bench`).
    out: PathBuf,
}

impl Options {
    fn from_env() -> Self {
        use knobs::{list, num, var};
        let quick = knobs::quick();
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
                .map(|n| {
                    Kind::named(n).unwrap_or_else(|| panic!("BENCH_SERVERS: unknown server {n:?}"))
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
                        .map(|(k, v)| (&*Box::leak(k.to_owned().into_boxed_str()), v.to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            out: output::bench_out(),
        }
    }

    fn run(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == scenario))
    }

    /// `extra`, then (for `sse-scale` only) `BENCH_SERVER_ENV`.
    fn env_for(
        &self,
        kind: Kind,
        mut extra: Vec<(&'static str, String)>,
    ) -> Vec<(&'static str, String)> {
        if kind == Kind::Product {
            extra.extend(self.server_env.iter().cloned());
        }
        extra
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

fn main() {
    // A baseline server is this binary re-executed (../support/baselines.rs).
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--baseline") {
        baselines::run(args.get(i + 1).map_or("", String::as_str));
    }
    let nofile = procs::raise_nofile();
    let opts = Options::from_env();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let started = Instant::now();
    eprintln!(
        "fan-out benchmark (open-file limit {nofile}; server {})",
        env!("CARGO_BIN_EXE_sse-scale")
    );

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
                            .map(|&k| (k, start_server(k, "bench-local", &opts.env_for(k, vec![]))))
                            .collect();
                        let refs: Vec<(Kind, &Server)> =
                            servers.iter().map(|(k, s)| (*k, s)).collect();
                        r.local.extend(
                            sweep::local_sweep(&refs, n, publishes, opts.secs, opts.rounds).await,
                        );
                    }
                    if opts.run("redis") {
                        let redis = RedisServer::start();
                        let env = opts.env_for(
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
                            .push(sweep::redis_fanout(&[&a, &b], n, publishes, opts.secs).await);
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
                        let env = opts.env_for(kind, vec![]);
                        r.idle
                            .push(idle::idle_memory(kind, via, opts.idle_streams, &env).await);
                    }
                }
            }
            if opts.run("churn") {
                for &kind in &order {
                    let env = opts.env_for(kind, vec![]);
                    r.churn
                        .push(churn::churn(kind, opts.churn_rate, opts.churn_secs, &env).await);
                }
            }
            runs.push(r);
        }
        let mut cg = Vec::new();
        if opts.run("callgrind") {
            for &kind in &opts.servers {
                let env = opts.env_for(kind, vec![]);
                cg.push(
                    callgrind::callgrind(kind, opts.cg_streams, opts.cg_rate, opts.cg_secs, &env)
                        .await,
                );
            }
        }
        (runs, cg)
    });

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
    let json_path = output::write_json(&opts.out, "results.json", &results);
    let png = opts.out.join("fanout.png");
    if runs.iter().any(|r| !r.local.is_empty()) {
        if let Err(e) = report::plot(&runs, &png) {
            eprintln!("plot failed: {e}");
        }
    }
    let mut out = report::summary(&runs, &opts, &cg);
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
