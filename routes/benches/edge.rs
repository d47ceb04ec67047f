//! Memory of idle streams by the way they reach the instance: what a
//! stream costs when it opens its connection (the stream writer serves it)
//! and when it comes as a later request of a kept-alive connection (hyper
//! serves it, with its per-connection buffers), and through each shipped
//! balancer, whose files send streams on upstream connections of their own
//! (`lb-config/README.md`).
//!
//! Per path, fresh processes: one release `sse-scale` instance (local
//! broadcaster) and, for the balancer paths, the balancer running its
//! shipped file unchanged with all three `APP_n` naming that instance.
//! `EDGE_STREAMS` (2,000) streams are opened over raw TCP, each after a
//! publish over the same client connection (except "direct, first
//! request"), and left idle; the instance's RSS before and after, per
//! stream, is the figure. `/stats` `stream_opens_first_request` says how
//! many reached the instance as their connection's first request.
//!
//! Run: `cargo bench -p sse-scale-server --bench edge`. Prints a Markdown
//! table; results go to `docs/benchmarks.md` by hand.

#[path = "support/mod.rs"]
mod bench;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use bench::balancer::{self, Balancer};
use bench::{knobs, procs};
use serde_json::json;
use support::{raw, Server};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How a stream's connection reaches the instance.
#[derive(Clone, Copy)]
enum Path {
    /// Straight to the instance, the stream its connection's first request.
    First,
    /// Straight to the instance, after a publish on the same connection.
    KeptAlive,
    /// Through a balancer running `lb-config/<file>`, after a publish on
    /// the same client connection.
    Balancer(balancer::Kind, &'static str),
}

impl Path {
    fn name(self) -> String {
        match self {
            Path::First => "direct, first request".into(),
            Path::KeptAlive => "direct, after a publish".into(),
            Path::Balancer(_, file) => format!("`{file}`, after a publish"),
        }
    }
}

struct Measured {
    path: String,
    opened: usize,
    first_request: u64,
    bytes_per_stream: f64,
}

/// Publishes one event over `conn` (kept alive); the status and body.
async fn publish(conn: &mut TcpStream, host: &str, session: &str, token: &str) -> (u16, String) {
    let body = json!({ "type": "noise", "data": 1 }).to_string();
    let req = format!(
        "POST /sessions/{session}/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.expect("write");
    raw::read_response(conn).await
}

/// Opens one stream on `addr`, after a publish over the same connection
/// when `publish_first`; returns the connection once `connected` arrived.
async fn open(addr: &str, session: &str, token: &str, publish_first: bool) -> TcpStream {
    // The balancer's own address as `Host`: Caddy serves a site by it.
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    if publish_first {
        let (status, body) = publish(&mut conn, addr, session, token).await;
        assert_eq!(status, 202, "publish through {addr}: {body}");
    }
    let req = format!(
        "GET /sessions/{session}/events?token={token} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.expect("write");
    raw::read_until(&mut conn, "event: connected").await;
    conn
}

async fn measure(path: Path, streams: usize) -> Measured {
    let server = Server::start(&[
        ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
        ("RATE_LIMIT_STREAMS_PER_MIN", "0"),
        ("RATE_LIMIT_SESSIONS_PER_MIN", "0"),
        ("MAX_STREAMS", "100000"),
        ("MAX_STREAMS_PER_ADDRESS", "100000"),
        ("MAX_CONNECTIONS_PER_ADDRESS", "100000"),
    ]);
    let apps = [server.addr.as_str(); 3];
    let lb = match path {
        Path::Balancer(balancer::Kind::Haproxy, file) => {
            Some(Balancer::haproxy(file, &apps, &[]).await)
        }
        Path::Balancer(balancer::Kind::Nginx, file) => Some(Balancer::nginx(file, &apps).await),
        Path::Balancer(balancer::Kind::Caddy, file) => {
            Some(Balancer::caddy(file, &apps, &[("LB_COOKIE_SECRET", "bench-secret")]).await)
        }
        _ => None,
    };
    let addr = lb
        .as_ref()
        .map_or(server.addr.clone(), |lb| lb.addr.clone());
    let publish_first = !matches!(path, Path::First);
    let (session, token) = support::new_session(&server).await;
    // A running server's allocator and runtime, not a freshly started one.
    let mut warm = Vec::new();
    for _ in 0..20 {
        warm.push(open(&addr, &session, &token, publish_first).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.child.id();
    let before = procs::proc_rss_kib(pid);
    let first_before = server.stats().await["stream_opens_first_request"]
        .as_u64()
        .unwrap();
    let mut held = Vec::with_capacity(streams);
    for _ in 0..streams {
        held.push(open(&addr, &session, &token, publish_first).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = procs::proc_rss_kib(pid);
    let first_request = server.stats().await["stream_opens_first_request"]
        .as_u64()
        .unwrap()
        - first_before;
    Measured {
        path: path.name(),
        opened: held.len(),
        first_request,
        bytes_per_stream: after.saturating_sub(before) as f64 * 1024.0 / held.len() as f64,
    }
}

#[tokio::main]
async fn main() {
    let streams = knobs::num("EDGE_STREAMS", 2_000.0) as usize;
    use balancer::Kind::{Caddy, Haproxy, Nginx};
    let paths = [
        Path::First,
        Path::KeptAlive,
        Path::Balancer(Haproxy, "haproxy/haproxy.cfg"),
        Path::Balancer(Nginx, "nginx/cookie-map.conf.template"),
        Path::Balancer(Caddy, "caddy/Caddyfile"),
    ];
    println!("| path | streams | of them first requests | RSS per idle stream (B) |");
    println!("|---|---:|---:|---:|");
    for path in paths {
        let m = measure(path, streams).await;
        println!(
            "| {} | {} | {} | {:.0} |",
            m.path, m.opened, m.first_request, m.bytes_per_stream
        );
    }
    println!("\n{} on {}", procs::today(), procs::machine());
}
