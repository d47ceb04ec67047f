//! Bench support: the HTTP side of the load generators: sessions, `/stats`,
//! the event payload every bench publishes (`{"t": <publish µs>, "s":
//! <sequence in session>}`) and the parsing of what comes back on a raw-TCP
//! SSE stream. Shared by the bench targets, each of which uses part of it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// A session and the token its routes take.
pub struct Session {
    pub id: String,
    pub token: String,
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
