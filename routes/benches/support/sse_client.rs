//! Bench support: the HTTP side of the load generators: sessions, `/stats`,
//! the event payload every bench publishes (`{"t": <publish µs>, "s":
//! <sequence in session>}`), publishing it at a steady rate, and the
//! parsing of what comes back on a raw-TCP SSE stream. Shared by the bench
//! targets, each of which uses part of it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Streams in their handshake at once while a bench sets up, so the listen
/// backlog never overflows.
pub const OPEN_CONCURRENCY: usize = 256;

/// A session and the token its routes take.
pub struct Session {
    pub id: String,
    pub token: String,
}

impl Session {
    /// Its events on the server at `addr` (`POST` publishes, `GET` streams).
    pub fn events_url(&self, addr: SocketAddr) -> String {
        format!("http://{addr}/sessions/{}/events", self.id)
    }

    /// The `Authorization` value a publish takes.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// The request head that opens one of its streams over raw TCP.
    pub fn stream_request(&self) -> String {
        format!(
            "GET /sessions/{}/events?token={} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n",
            self.id, self.token
        )
    }
}

/// `POST /sessions` on the server at `addr`.
pub async fn create_session(http: &reqwest::Client, addr: SocketAddr) -> Session {
    let v: Value = http
        .post(format!("http://{addr}/sessions"))
        .send()
        .await
        .expect("POST /sessions")
        .json()
        .await
        .expect("session JSON");
    Session {
        id: v["id"].as_str().expect("id").to_owned(),
        token: v["token"].as_str().expect("token").to_owned(),
    }
}

/// `n` sessions on the server at `addr`, created one after another.
pub async fn create_sessions(
    http: &reqwest::Client,
    addr: SocketAddr,
    n: usize,
) -> Vec<Arc<Session>> {
    let mut sessions = Vec::with_capacity(n);
    for _ in 0..n {
        sessions.push(Arc::new(create_session(http, addr).await));
    }
    sessions
}

/// `GET /stats` (admin) of the server at `addr`.
pub async fn stats(http: &reqwest::Client, addr: SocketAddr, admin: &str) -> Value {
    http.get(format!("http://{addr}/stats"))
        .bearer_auth(admin)
        .send()
        .await
        .expect("GET /stats")
        .json()
        .await
        .expect("stats JSON")
}

/// Wall-clock microseconds since the epoch (what events carry as `t`).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

/// `1763894400123-0` → `(1763894400123, 0)`: ids compare as that pair.
pub fn parse_id(s: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(s).ok()?;
    let (ms, seq) = s.trim().split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// `data: {"t":123,"s":4}` → `(123, 4)`.
pub fn parse_data(line: &[u8]) -> Option<(u64, u64)> {
    let rest = line.strip_prefix(b"data: {\"t\":")?;
    let comma = rest.iter().position(|&b| b == b',')?;
    let t = std::str::from_utf8(&rest[..comma]).ok()?.parse().ok()?;
    let rest = rest[comma..].strip_prefix(b",\"s\":")?;
    let end = rest.iter().position(|&b| b == b'}')?;
    let s = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
    Some((t, s))
}

/// Publishes the benchmark's event number `s` (with its send time in
/// microseconds) to `url`; `Err` says why it was not accepted.
pub async fn publish_numbered(
    http: &reqwest::Client,
    url: &str,
    auth: &str,
    s: u64,
) -> Result<(), String> {
    let body = format!(
        r#"{{"type":"bench","data":{{"t":{},"s":{s}}}}}"#,
        now_micros()
    );
    let sent = http
        .post(url)
        .header("authorization", auth)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => Ok(()),
        Ok(r) => Err(format!("publish refused: {}", r.status())),
        Err(e) => Err(format!("publish failed: {e}")),
    }
}

/// The publish ticks of session `i` of `n`: one every `period`, the
/// sessions' first ticks spread evenly over one period so the publishes
/// are even. A publisher that fell behind catches up: the offered load
/// stays the same, and the shortfall shows in the achieved rate.
pub fn ticks(i: usize, n: usize, period: Duration) -> tokio::time::Interval {
    let offset = period.mul_f64(i as f64 / n as f64);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    tick
}

/// Publishes events number `seq` to each session at `rate` publishes/s in
/// total, session `i` through the server `route[i]`. Each session's events
/// go out one after another (its own task), so they are published in
/// sequence order. Prints each failure; returns how many failed.
pub async fn publish_all(
    http: &reqwest::Client,
    sessions: &[Arc<Session>],
    route: &[SocketAddr],
    rate: f64,
    seq: std::ops::Range<u64>,
) -> u64 {
    let period = Duration::from_secs_f64(sessions.len() as f64 / rate);
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        let (http, failures, seq) = (http.clone(), failures.clone(), seq.clone());
        let url = session.events_url(route[i]);
        let (auth, n) = (session.bearer(), sessions.len());
        tasks.push(tokio::spawn(async move {
            let mut tick = ticks(i, n, period);
            for s in seq {
                tick.tick().await;
                if let Err(e) = publish_numbered(&http, &url, &auth, s).await {
                    eprintln!("{e}");
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
