//! Idle memory: what an open stream that carries no events costs the
//! server, by the way its request arrives (a fresh connection, a kept-alive
//! one as from a balancer, or an h2c stream).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::servers::{start_server, Kind};
use crate::support::sse_client::create_sessions;
use crate::support::streams::{open_streams, Collector, Via};
use crate::FANOUT;

/// RSS per idle stream: RSS with `streams` idle streams minus RSS before,
/// every stream's request arriving `via` a fresh connection, a kept-alive
/// one, or h2c.
pub async fn idle_memory(kind: Kind, via: Via, streams: usize, env: &[(&str, String)]) -> Value {
    let server = start_server(kind, "bench-mem", env);
    let http = reqwest::Client::new();
    let sessions = create_sessions(&http, server.addr, streams.div_ceil(FANOUT)).await;
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
