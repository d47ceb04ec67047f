//! Raw HTTP/1 over TCP, for the tests that must send exactly the bytes
//! they mean (partial heads, pipelining, smuggling attempts) and read
//! exactly what comes back.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::Server;

/// How long a read waits for what a test expects.
const T: Duration = Duration::from_secs(5);

pub async fn connect(server: &Server) -> TcpStream {
    TcpStream::connect(&server.addr).await.unwrap()
}

/// Reads until the server closes the connection; returns how long that
/// took, or `None` if it stayed open for `within`.
pub async fn closed_within(conn: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + within).into(), conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads one HTTP/1.1 response with a `content-length`; returns the
/// status and the body.
pub async fn read_response(conn: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(T, conn.read(&mut chunk))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed before a whole response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head[9..12].parse().unwrap();
                return (status, text[end + 4..end + 4 + len].to_owned());
            }
        }
    }
}

/// Reads until `needle` arrives; returns everything read.
pub async fn read_until(conn: &mut TcpStream, needle: &str) -> String {
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + T;
    while !got.contains(needle) {
        let n = tokio::time::timeout_at(deadline, conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{needle:?} in time, got {got:?}"))
            .unwrap();
        assert!(n > 0, "closed before {needle:?}: {got:?}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}
