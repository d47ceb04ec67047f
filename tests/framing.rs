//! One HTTP/1 framer per connection, seen from outside: only a connection's
//! first head, when it is a bodiless stream open and all the client sent,
//! is served by the stream writer; every other byte is hyper's. Each test
//! sends raw bytes over real TCP to a real `sse-scale` process: smuggling
//! shapes (a body length hyper and a second parser could read differently,
//! a stream head inside a body), HTTP/1.0, an h2c preface in pieces, an
//! upgrade, and `Date` on every response. The classifier's own
//! differential test against hyper is in `routes/src/head.rs`.

mod support;

use std::time::Duration;

use support::raw::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

/// Everything the server sends until it closes the connection or has been
/// quiet for `quiet`.
async fn read_all(conn: &mut tokio::net::TcpStream, quiet: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(quiet, conn.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn stream_head(id: &str, token: &str) -> String {
    format!("GET /sessions/{id}/events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n")
}

// A first-request stream, written by the stream writer, carries `Date` as
// hyper's responses do. Fails before: it had none.
#[tokio::test]
async fn every_response_carries_a_date() {
    let server = Server::start(&[]);
    let (id, token) = new_session(&server).await;
    let mut conn = connect(&server).await;
    conn.write_all(stream_head(&id, &token).as_bytes())
        .await
        .unwrap();
    let got = read_until(&mut conn, "event: connected").await;
    assert!(
        got.contains("connection: close\r\n"),
        "not the stream writer's: {got}"
    );
    assert!(got.to_ascii_lowercase().contains("\r\ndate: "), "{got}");
    let mut other = connect(&server).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until(&mut other, "\r\n\r\n").await;
    assert!(got.to_ascii_lowercase().contains("\r\ndate: "), "{got}");
}

// Smuggling shapes as a connection's first request: a body length given
// twice, signed, or with Transfer-Encoding beside it, in front of a stream
// head. Whatever hyper makes of the length, the stream head behind it is
// never served as a request of its own unless hyper framed it so: at most
// one response opens a stream, and only where hyper's framing puts a
// request there.
#[tokio::test]
async fn ambiguous_body_lengths_are_hyper_s_alone() {
    let server = Server::start(&[]);
    let (id, token) = new_session(&server).await;
    let hidden = stream_head(&id, &token);
    let cases = [
        format!("POST /sessions/{id}/messages HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello{hidden}"),
        format!("POST /sessions/{id}/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 60\r\n\r\nhello{hidden}"),
        format!("POST /sessions/{id}/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"),
        format!("GET /sessions/{id}/events HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{hidden}", hidden.len()),
    ];
    for case in cases {
        let mut conn = connect(&server).await;
        conn.write_all(case.as_bytes()).await.unwrap();
        let got = read_all(&mut conn, Duration::from_millis(800)).await;
        let first = got.lines().next().unwrap_or_default().to_owned();
        let opens = got.matches("event: connected").count();
        // hyper refuses the ambiguous lengths, or reads the body it
        // declares: the head inside it is body, never a stream open.
        assert!(first.starts_with("HTTP/1.1 4"), "{case:?} -> {got}");
        assert_eq!(opens, 0, "{case:?} -> {got}");
    }
    // Chunked, well formed: hyper reads the body, then serves the stream
    // head after it as the next request (its own framing), chunked.
    let mut conn = connect(&server).await;
    let chunks: String = [r#"{"text""#, r#":"hi"}"#]
        .iter()
        .map(|part| format!("{:x}\r\n{part}\r\n", part.len()))
        .collect();
    let chunked = format!(
        "POST /sessions/{id}/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}0\r\n\r\n{hidden}"
    );
    conn.write_all(chunked.as_bytes()).await.unwrap();
    let got = read_until(&mut conn, "event: connected").await;
    assert!(got.starts_with("HTTP/1.1 202"), "{got}");
    assert!(got.contains("transfer-encoding: chunked"), "{got}");
}

// HTTP/1.0 is not the lean path's: hyper serves the stream.
#[tokio::test]
async fn an_http_1_0_stream_open_is_served_by_hyper() {
    let server = Server::start(&[]);
    let (id, token) = new_session(&server).await;
    let mut conn = connect(&server).await;
    conn.write_all(format!("GET /sessions/{id}/events?token={token} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let got = read_until(&mut conn, "event: connected").await;
    assert!(
        got.starts_with("HTTP/1.0 200") || got.starts_with("HTTP/1.1 200"),
        "{got}"
    );
}

// An h2c prior-knowledge preface sent one byte at a time is HTTP/2. Fails
// before: the first read was taken for HTTP/1 and answered 400.
#[tokio::test]
async fn an_h2c_preface_in_single_bytes_is_answered_with_http2() {
    let server = Server::start(&[]);
    let mut conn = connect(&server).await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for byte in preface {
        conn.write_all(&[*byte]).await.unwrap();
        conn.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(T, conn.read_exact(&mut frame))
        .await
        .expect("an answer in time")
        .expect("an HTTP/2 frame");
    assert_ne!(&frame[..4], b"HTTP", "answered as HTTP/1: {frame:?}");
    assert_eq!(frame[3], 4, "the server's SETTINGS frame: {frame:?}");
}

// An upgrade request is hyper's to answer (the stream writer serves none),
// on a connection hyper serves with upgrade support.
#[tokio::test]
async fn an_upgrade_request_gets_hyper_s_answer() {
    let server = Server::start(&[]);
    let (id, token) = new_session(&server).await;
    let mut conn = connect(&server).await;
    conn.write_all(
        format!("GET /sessions/{id}/events?token={token} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let got = read_until(&mut conn, "\r\n\r\n").await;
    assert!(
        !got.contains("connection: close"),
        "the stream writer answered: {got}"
    );
    assert!(got.starts_with("HTTP/1.1 "), "{got}");
}

// Pipelined requests after a publish on one connection: each is answered
// once, in order, and a stream head among them is a stream.
#[tokio::test]
async fn pipelined_requests_after_a_publish_are_each_answered_once() {
    let server = Server::start(&[]);
    let (id, token) = new_session(&server).await;
    let body = r#"{"text":"one"}"#;
    let publish = format!(
        "POST /sessions/{id}/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let health = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut conn = connect(&server).await;
    conn.write_all(format!("{publish}{health}{publish}{}", stream_head(&id, &token)).as_bytes())
        .await
        .unwrap();
    let got = read_until(&mut conn, "event: connected").await;
    let statuses: Vec<&str> = got
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &got[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["202", "200", "202", "200"], "{got}");
}
