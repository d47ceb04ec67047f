//! What the machine and the survivors went through during the storm: how
//! deep each listener's accept queue got, the kernel's TCP counters of
//! dropped or retried handshakes, and how long the survivors' Redis calls
//! took. These tell a slow resume's cause apart: a full queue, a lost SYN,
//! or Redis.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::procs::ADMIN;

/// The deepest accept queue each listener reached (`ss -Hltn` every
/// 100 ms until `stop`), and its backlog: shows whose queue overflowed.
pub fn watch_listeners(
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
pub async fn redis_round_trips(http: &reqwest::Client, addr: SocketAddr) -> Vec<(String, u64)> {
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
pub fn round_trip_delta(before: &[Vec<(String, u64)>], after: &[Vec<(String, u64)>]) -> Value {
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
pub fn tcp_counters() -> Vec<(&'static str, u64)> {
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

pub fn tcp_delta(before: &[(&'static str, u64)], after: &[(&'static str, u64)]) -> Value {
    let mut m = serde_json::Map::new();
    for ((name, a), (_, b)) in before.iter().zip(after) {
        m.insert((*name).to_owned(), json!(b.saturating_sub(*a)));
    }
    Value::Object(m)
}
