//! Connection churn: streams opened at a steady rate, each closed by its
//! client as soon as it is connected; what the open, the stream's set-up
//! and its close cost the server together.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::servers::{start_server, Kind};
use crate::support::sse_client::{create_sessions, Session};
use crate::support::streams::{histogram, ms};

/// Connection churn: `rate` stream opens per second for `secs`, each stream
/// closed by its client as soon as it has seen `connected`. Reports server
/// CPU per open (the open, the stream's set-up and its close) and the
/// time to `connected`.
pub async fn churn(kind: Kind, rate: f64, secs: f64, env: &[(&str, String)]) -> Value {
    let server = start_server(kind, "bench-churn", env);
    let http = reqwest::Client::new();
    let sessions = create_sessions(&http, server.addr, 10).await;
    let addr = server.addr;
    let opened = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(histogram()));
    let total = (rate * secs) as u64;
    let cpu0 = server.cpu_split();
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let session = sessions[i as usize % sessions.len()].clone();
        let (opened, failed, hist) = (opened.clone(), failed.clone(), hist.clone());
        tasks.spawn(async move {
            let start = Instant::now();
            if open_and_close(addr, &session).await {
                opened.fetch_add(1, Ordering::Relaxed);
                let _ = hist
                    .lock()
                    .expect("histogram")
                    .record(start.elapsed().as_micros().max(1) as u64);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Reap finished opens so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let achieved = total as f64 / t0.elapsed().as_secs_f64();
    // Let the server see the last closes before reading its CPU.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (u1, s1) = server.cpu_split();
    let cpu = (u1 - cpu0.0) + (s1 - cpu0.1);
    let opened = opened.load(Ordering::Relaxed);
    let h = hist.lock().expect("histogram");
    let per_open = cpu.as_secs_f64() * 1e6 / opened.max(1) as f64;
    eprintln!(
        "  churn {:9}: {opened} opens ({} failed) at {achieved:.0}/s, {per_open:.1} µs CPU/open, connect p50 {:.2} ms p99 {:.2} ms",
        kind.name(),
        failed.load(Ordering::Relaxed),
        ms(&h, 0.5),
        ms(&h, 0.99),
    );
    json!({
        "server": kind.name(), "offered_opens_per_sec": rate, "opens_per_sec": achieved,
        "opened": opened, "failed": failed.load(Ordering::Relaxed),
        "server_cpu_secs": cpu.as_secs_f64(), "cpu_us_per_open": per_open,
        "connect_ms": { "p50": ms(&h, 0.5), "p99": ms(&h, 0.99) },
    })
}

/// Opens one stream, waits for `connected`, and closes the connection.
async fn open_and_close(addr: SocketAddr, session: &Session) -> bool {
    let Ok(mut sock) = TcpStream::connect(addr).await else {
        return false;
    };
    let _ = sock.set_nodelay(true);
    if sock
        .write_all(session.stream_request().as_bytes())
        .await
        .is_err()
    {
        return false;
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Duration::from_secs(10);
    loop {
        match tokio::time::timeout(deadline, sock.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => return false,
        }
        if seen.windows(16).any(|w| w == b"event: connected") {
            return seen.starts_with(b"HTTP/1.1 200");
        }
    }
}
