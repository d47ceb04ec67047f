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

#[path = "../support/mod.rs"]
mod support;

mod apps;
mod client;
mod dechunk;
mod haproxy;
mod publish;
mod report;
mod run;
mod sampler;
mod tally;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use support::procs::{machine, today};
use support::{balancer, knobs, output, procs};

/// The `STORM_*` knobs above, and `BENCH_OUT`.
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
        use knobs::num;
        let out_dir = output::bench_out();
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
            retry_ms: knobs::var("STORM_RETRY_MS").map(|v| v.parse().expect("STORM_RETRY_MS")),
            out_dir,
        };
        assert!(
            o.sessions > 0 && o.streams >= o.sessions,
            "need streams >= sessions > 0"
        );
        o
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not used here.
    let opts = Options::from_env();
    let nofile = procs::raise_nofile();
    assert!(
        nofile as usize > opts.streams + 1000,
        "open-file limit {nofile} is too low for {} client sockets",
        opts.streams
    );
    let haproxy_version = procs::version_of(balancer::require_binary("haproxy"), "-v");
    println!(
        "reconnect storm: {} streams over {} sessions, {} events/s, {} run(s); \
         two HAProxy processes (shipped haproxy.cfg), clients split evenly; open-file limit {nofile}",
        opts.streams, opts.sessions, opts.rate, opts.runs
    );
    let mut runs = Vec::new();
    for run_no in 1..=opts.runs {
        let r = run::run(&opts, run_no);
        println!("{}", serde_json::to_string(&r).expect("json"));
        runs.push(r);
    }
    let table = report::summary(&runs);
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
                "MAX_CONNECTIONS_PER_ADDRESS": "10000000",
                "REPLAY_BUDGET_PER_ADDRESS_MB": "64",
                "RATE_LIMIT_STREAMS_PER_MIN": "0",
                "RATE_LIMIT_SESSIONS_PER_MIN": "0",
                "RATE_LIMIT_PUBLISH_PER_SEC": "0",
                "FF_REDIS_SSE_BROADCAST": "true",
            },
        },
        "runs": runs,
        "summary_markdown": table,
    });
    let path = output::write_json(&opts.out_dir, "storm.json", &out);
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
