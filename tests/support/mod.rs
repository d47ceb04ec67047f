//! Test support: start real `sse-scale` server processes on free ports and
//! read their SSE streams over real HTTP.

#![allow(dead_code)]

pub mod judge;
pub mod raw;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

pub const SECRET: &str = "test-secret-of-at-least-32-bytes-0123456789";
/// The `ADMIN_TOKEN` every test server gets (unless a test sets its own).
pub const ADMIN: &str = "test-admin-token-0123456789";

/// A running server process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// Everything the process wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(env: &[(&str, &str)]) -> Server {
        Self::spawn(env, true, None)
    }

    /// As [`Server::start`], with the process's open-file limit (soft and
    /// hard) at `limit`, as a container or a systemd unit would set it.
    pub fn start_with_open_files(env: &[(&str, &str)], limit: u64) -> Server {
        Self::spawn(env, true, Some(limit))
    }

    /// As [`Server::start`], but stderr's reader goes away once the server
    /// has said where it listens: every later log line meets a closed pipe.
    pub fn start_then_close_stderr(env: &[(&str, &str)]) -> Server {
        Self::spawn(env, false, None)
    }

    fn spawn(env: &[(&str, &str)], keep_reading: bool, open_files: Option<u64>) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sse-scale"));
        cmd.env_clear()
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("SESSION_SECRET", SECRET)
            .env("ADMIN_TOKEN", ADMIN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(limit) = open_files {
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe, and nothing else runs
            // in the child between fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn sse-scale");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("addr=").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                        if !keep_reading {
                            return;
                        }
                    }
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("server did not start: {}", log.lock().unwrap()));
        Server { child, addr, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal (`TERM`, `KILL`, ...) with the system's `kill`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "server did not exit within {within:?}; log:\n{}",
            self.log.lock().unwrap()
        );
    }

    /// The process's resident memory (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    pub async fn stats(&self) -> Value {
        client()
            .get(self.url("/stats"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Creates a session; returns (id, token).
pub async fn new_session(server: &Server) -> (String, String) {
    let res = client().post(server.url("/sessions")).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    (
        body["id"].as_str().unwrap().to_owned(),
        body["token"].as_str().unwrap().to_owned(),
    )
}

/// POSTs JSON with the session's bearer token.
pub async fn post(server: &Server, token: &str, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(server.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Waits until `server` says it is healthy (`/healthz?verbose`: Redis
/// reached, subscriber connected, nothing waiting); whether it did.
pub async fn healthy(server: &Server) -> bool {
    eventually(Duration::from_secs(5), || async {
        let health: Value = client()
            .get(server.url("/healthz?verbose"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        health["status"] == "ok"
    })
    .await
}

/// Starts a pipeline run of the session (`POST /sessions/{id}/pipeline`).
pub async fn start_run(
    server: &Server,
    session: &str,
    token: &str,
    body: Value,
) -> reqwest::Response {
    post(
        server,
        token,
        &format!("/sessions/{session}/pipeline"),
        body,
    )
    .await
}

/// Publishes a chat message `{"text": text}` to the session.
/// Publishes `{"type": ty, "data": data}` to the session; asserts 202 and
/// returns the event id.
pub async fn publish(server: &Server, session: &str, token: &str, ty: &str, data: Value) -> String {
    let res = post(
        server,
        token,
        &format!("/sessions/{session}/events"),
        serde_json::json!({ "type": ty, "data": data }),
    )
    .await;
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    assert_eq!(status, 202, "publish {ty} to {}: {body}", server.addr);
    let body: Value = serde_json::from_str(&body).unwrap();
    body["id"].as_str().unwrap().to_owned()
}

pub async fn message(server: &Server, id: &str, token: &str, text: &str) -> reqwest::Response {
    post(
        server,
        token,
        &format!("/sessions/{id}/messages"),
        serde_json::json!({ "text": text }),
    )
    .await
}

/// Waits until the server's Redis subscriber is connected and holds at
/// least `channels` channels.
pub async fn wait_subscribed(server: &Server, channels: u64) {
    let ok = eventually(Duration::from_secs(5), || async {
        let s = server.stats().await;
        s["redis"]["subscriber_connected"] == true
            && s["redis"]["subscribed_channels"].as_u64() >= Some(channels)
    })
    .await;
    assert!(ok, "not subscribed: {}", server.stats().await);
}

/// One parsed SSE block.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Option<String>,
    pub retry: Option<u64>,
    pub comment: bool,
    /// The block exactly as it arrived, without the blank line.
    pub raw: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().unwrap_or("null")).unwrap()
    }
}

/// An open SSE stream read block by block.
pub struct SseClient {
    pub response_headers: reqwest::header::HeaderMap,
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl SseClient {
    pub async fn open(server: &Server, session: &str, token: &str) -> SseClient {
        Self::open_at(server, session, token, None).await
    }

    /// Opens the stream resuming from `last` (the `Last-Event-ID` header);
    /// the answer must be 200.
    pub async fn open_from(server: &Server, session: &str, token: &str, last: &str) -> SseClient {
        Self::open_at(server, session, token, Some(last)).await
    }

    async fn open_at(server: &Server, session: &str, token: &str, last: Option<&str>) -> SseClient {
        let mut req = reqwest::Client::new()
            .get(server.url(&format!("/sessions/{session}/events?token={token}")));
        if let Some(last) = last {
            req = req.header("last-event-id", last);
        }
        let res = req.send().await.unwrap();
        assert_eq!(
            res.status(),
            200,
            "stream open (Last-Event-ID {last:?}) failed: {:?}",
            res.text().await
        );
        SseClient::from_response(res)
    }

    pub fn from_response(res: reqwest::Response) -> SseClient {
        SseClient {
            response_headers: res.headers().clone(),
            stream: res.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next block (event, comment or retry), or None when the stream ends.
    pub async fn next_block(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..pos + 2).collect();
                return Some(parse_block(raw.trim_end_matches('\n')));
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => panic!("no SSE block within {within:?}; buffered: {:?}", self.buf),
                Ok(None) => return None,
                Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(chunk))) => self.buf.push_str(std::str::from_utf8(&chunk).unwrap()),
            }
        }
    }

    /// The next event, skipping comments and bare retry blocks; `within`
    /// bounds the whole wait, heartbeats included.
    pub async fn next_event(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let block = self.next_block(left).await?;
            if block.event.is_some() || block.data.is_some() {
                return Some(block);
            }
        }
    }

    /// Reads the retry hint and the `connected` event.
    pub async fn expect_connected(&mut self) -> SseEvent {
        let retry = self
            .next_block(Duration::from_secs(5))
            .await
            .expect("retry block");
        assert!(
            retry.retry.is_some(),
            "first block is a retry hint: {retry:?}"
        );
        let connected = self
            .next_event(Duration::from_secs(5))
            .await
            .expect("connected");
        assert_eq!(connected.event.as_deref(), Some("connected"));
        connected
    }

    /// Asserts nothing but comments arrives for `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..pos + 2).collect();
                let block = parse_block(raw.trim_end_matches('\n'));
                assert!(block.comment, "expected silence, got {block:?}");
                continue;
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return,
                Ok(Some(Ok(chunk))) => self.buf.push_str(std::str::from_utf8(&chunk).unwrap()),
                Ok(_) => panic!("stream ended while expecting silence"),
            }
        }
    }
}

/// Parses one block per the WHATWG event-stream rules this project uses.
pub fn parse_block(raw: &str) -> SseEvent {
    let mut ev = SseEvent {
        raw: raw.to_owned(),
        ..Default::default()
    };
    for line in raw.split('\n') {
        if line.starts_with(':') {
            ev.comment = true;
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => ev.id = Some(value.to_owned()),
            "event" => ev.event = Some(value.to_owned()),
            "retry" => ev.retry = value.parse().ok(),
            "data" => {
                ev.data = Some(match ev.data.take() {
                    Some(prev) => format!("{prev}\n{value}"),
                    None => value.to_owned(),
                })
            }
            other => panic!("unexpected field {other:?} in {raw:?}"),
        }
    }
    ev
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}
