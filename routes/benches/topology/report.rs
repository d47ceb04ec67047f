//! What the topology bench reports: the cluster/single ratios of each pair
//! of runs (the machine is shared and noisy, so ratios within one
//! repetition are the figures, not absolute ones) and the Markdown tables
//! printed at the end, for docs/benchmarks.md.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::run::RunResult;

/// Cluster ÷ single of CPU per delivery (and p99) in each repetition: the
/// runs alternate single, cluster, single, …
pub fn ratios(runs: &[RunResult]) -> Vec<Value> {
    let pairs: Vec<(&RunResult, &RunResult)> = runs
        .chunks(2)
        .filter(|p| p.len() == 2)
        .map(|p| (&p[0], &p[1]))
        .collect();
    let ratio = |c: f64, s: f64| if s > 0.0 { c / s } else { 0.0 };
    pairs
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
        .collect()
}

/// The Markdown tables: every run, every Redis node, the ratios.
pub fn summary(runs: &[RunResult], ratios: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n| rep | topology | deliveries/s | A µs/del | B µs/del | Redis µs/del (primaries + replicas) | A+B+Redis | p50 ms | p99 ms | > 5 ms (most in one 100 ms) | A messages from Redis | lost | dup | ids not increasing |");
    let _ = writeln!(
        out,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in runs {
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
    for r in runs {
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
    for r in ratios {
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
    out
}
