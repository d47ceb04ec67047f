//! The storm's clients: each behaves like a browser `EventSource` — when
//! its connection ends it waits the last `retry:` hint, then reconnects
//! through its balancer with `Last-Event-ID` and its cookie — and records
//! when each step of its resume happened and what it received.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dechunk::Dechunk;
use crate::support::sse_client::{parse_data, Session};

/// Browser `EventSource`'s reconnect delay before any `retry:` arrived.
const DEFAULT_RETRY_MS: u64 = 3000;

/// What one client reports, read by the controller. Times are µs since
/// `Ctx::base` plus one (0: not yet).
#[derive(Default)]
pub struct Client {
    /// Next sequence number expected from its session.
    pub next_seq: AtomicU64,
    pub duplicates: AtomicU64,
    /// Events skipped (a later one arrived first); the rest of the loss is
    /// counted at the end against what was published.
    pub gaps: AtomicU64,
    pub resets: AtomicU64,
    /// Reconnects answered with another status than 200.
    pub refused: AtomicU64,
    /// Reconnects that failed before `connected` (connect error, closed).
    pub failed: AtomicU64,
    /// Connections that ended other than by the kill.
    pub unexpected_ends: AtomicU64,
    /// The first connection's `X-Instance-Id` was app1.
    pub pinned: AtomicBool,
    pub ended_at: AtomicU64,
    pub hint_ms: AtomicU64,
    /// The first reconnect attempt started (after the hint's sleep).
    pub first_attempt_at: AtomicU64,
    /// The successful reconnect: its TCP connect started / finished, its
    /// request was sent, its response head and `connected` frame arrived,
    /// its first event arrived.
    pub attempt_at: AtomicU64,
    pub connect_done: AtomicU64,
    pub head_at: AtomicU64,
    pub resumed_at: AtomicU64,
    pub first_event_at: AtomicU64,
    /// 2 or 3: the instance that took the resume.
    pub resumed_on: AtomicU64,
}

/// What the clients share with the controller, which reads it throughout.
pub struct Ctx {
    pub base: Instant,
    pub lbs: Vec<SocketAddr>,
    pub sessions: Vec<Arc<Session>>,
    /// Session of each client.
    pub session_of: Vec<usize>,
    pub clients: Vec<Client>,
    pub killed: AtomicBool,
    pub opened: AtomicUsize,
    pub open_failed: AtomicUsize,
    pub resumed: AtomicUsize,
}

impl Ctx {
    pub fn now(&self) -> u64 {
        self.base.elapsed().as_micros() as u64 + 1
    }
}

/// The client's own state between connections, as a browser keeps it.
struct Browser {
    last_id: Vec<u8>,
    retry_ms: u64,
    /// The `SRV` cookie it sends (HAProxy's latest `Set-Cookie`).
    cookie: String,
}

/// How one connection ended.
enum End {
    /// Answered with this status (not 200).
    Refused,
    /// Failed before its `connected` frame.
    Failed,
    /// Was a stream, and ended.
    Ended,
}

/// One client: the first stream, then reconnects as `EventSource` does.
pub async fn run_client(ctx: Arc<Ctx>, i: usize, permit: tokio::sync::OwnedSemaphorePermit) {
    let mut browser = Browser {
        last_id: Vec::new(),
        retry_ms: DEFAULT_RETRY_MS,
        cookie: "app1".to_owned(),
    };
    let me = &ctx.clients[i];
    let mut permit = Some(permit);
    match connect(&ctx, i, &mut browser, false, &mut permit).await {
        End::Ended => {}
        End::Refused | End::Failed => {
            ctx.open_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    loop {
        // The connection ended: wait the hint, reconnect until a stream
        // resumes; then it reads until that one ends too.
        if !ctx.killed.load(Ordering::Relaxed) {
            me.unexpected_ends.fetch_add(1, Ordering::Relaxed);
        }
        if me.ended_at.load(Ordering::Relaxed) == 0 {
            me.ended_at.store(ctx.now(), Ordering::Relaxed);
            me.hint_ms.store(browser.retry_ms, Ordering::Relaxed);
        }
        loop {
            tokio::time::sleep(Duration::from_millis(browser.retry_ms)).await;
            match connect(&ctx, i, &mut browser, true, &mut None).await {
                End::Ended => break,
                End::Refused => me.refused.fetch_add(1, Ordering::Relaxed),
                End::Failed => me.failed.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

/// One connection through the client's balancer, read until it ends.
async fn connect(
    ctx: &Ctx,
    i: usize,
    browser: &mut Browser,
    resume: bool,
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> End {
    let me = &ctx.clients[i];
    let session = &ctx.sessions[ctx.session_of[i]];
    let first_resume = resume && me.resumed_at.load(Ordering::Relaxed) == 0;
    let attempt_at = ctx.now();
    if resume && me.first_attempt_at.load(Ordering::Relaxed) == 0 {
        me.first_attempt_at.store(attempt_at, Ordering::Relaxed);
    }
    let Ok(mut sock) = TcpStream::connect(ctx.lbs[i % ctx.lbs.len()]).await else {
        return End::Failed;
    };
    let connect_done = ctx.now();
    let _ = sock.set_nodelay(true);
    let mut req = format!(
        "GET /sessions/{}/events?token={} HTTP/1.1\r\nHost: storm\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nCookie: SRV={}\r\n",
        session.id, session.token, browser.cookie
    );
    if resume && !browser.last_id.is_empty() {
        req.push_str("Last-Event-ID: ");
        req.push_str(std::str::from_utf8(&browser.last_id).unwrap_or(""));
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    if sock.write_all(req.as_bytes()).await.is_err() {
        return End::Failed;
    }
    let mut buf = vec![0u8; 4096];
    let mut head: Vec<u8> = Vec::new();
    let mut chunked: Option<Dechunk> = None;
    // Read the response head.
    let mut body: Vec<u8> = loop {
        let n = match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return End::Failed,
            Ok(n) => n,
        };
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut res = httparse::Response::new(&mut headers);
        match res.parse(&head) {
            Ok(httparse::Status::Complete(len)) => {
                if res.code != Some(200) {
                    return End::Refused;
                }
                let mut instance_ok = false;
                for h in res.headers.iter() {
                    if h.name.eq_ignore_ascii_case("x-instance-id") {
                        instance_ok = h.value == b"app1";
                        if resume {
                            let n = match h.value {
                                b"app2" => 2,
                                b"app3" => 3,
                                _ => 1,
                            };
                            me.resumed_on.store(n, Ordering::Relaxed);
                        }
                    } else if h.name.eq_ignore_ascii_case("set-cookie") {
                        if let Some(v) = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.strip_prefix("SRV="))
                        {
                            browser.cookie = v.split(';').next().unwrap_or("").to_owned();
                        }
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                        && h.value.eq_ignore_ascii_case(b"chunked")
                    {
                        chunked = Some(Dechunk::default());
                    }
                }
                if !resume && instance_ok {
                    me.pinned.store(true, Ordering::Relaxed);
                }
                break head.split_off(len);
            }
            Ok(httparse::Status::Partial) => continue,
            Err(_) => return End::Failed,
        }
    };
    let head_at = ctx.now();
    if let Some(d) = chunked.as_mut() {
        let raw = std::mem::take(&mut body);
        d.feed(&raw, &mut body);
    }
    let mut connected = false;
    let mut carry = body;
    let mut decoded = Vec::new();
    loop {
        let mut start = 0;
        let mut got_event = false;
        let mut now_connected = false;
        while let Some(pos) = carry[start..].iter().position(|&b| b == b'\n') {
            let mut line = &carry[start..start + pos];
            start += pos + 1;
            if let Some(l) = line.strip_suffix(b"\r") {
                line = l;
            }
            if let Some(id) = line.strip_prefix(b"id: ") {
                browser.last_id.clear();
                browser.last_id.extend_from_slice(id);
            } else if let Some(ms) = line.strip_prefix(b"retry: ") {
                if let Some(ms) = std::str::from_utf8(ms).ok().and_then(|s| s.parse().ok()) {
                    browser.retry_ms = ms;
                }
            } else if line == b"event: connected" {
                connected = true;
                now_connected = true;
            } else if line == b"event: reset" {
                me.resets.fetch_add(1, Ordering::Relaxed);
            } else if let Some((_, s)) = parse_data(line) {
                got_event = true;
                let next = me.next_seq.load(Ordering::Relaxed);
                if s == next {
                    me.next_seq.store(s + 1, Ordering::Relaxed);
                } else if s < next {
                    // Seen already (or late: either breaks exactly once
                    // in order).
                    me.duplicates.fetch_add(1, Ordering::Relaxed);
                } else {
                    me.gaps.fetch_add(s - next, Ordering::Relaxed);
                    me.next_seq.store(s + 1, Ordering::Relaxed);
                }
            }
        }
        carry.drain(..start);
        if now_connected {
            if resume {
                if first_resume {
                    me.attempt_at.store(attempt_at, Ordering::Relaxed);
                    me.connect_done.store(connect_done, Ordering::Relaxed);
                    me.head_at.store(head_at, Ordering::Relaxed);
                    me.resumed_at.store(ctx.now(), Ordering::Relaxed);
                    ctx.resumed.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                permit.take();
                ctx.opened.fetch_add(1, Ordering::Relaxed);
            }
        }
        if got_event && first_resume && me.first_event_at.load(Ordering::Relaxed) == 0 {
            me.first_event_at.store(ctx.now(), Ordering::Relaxed);
        }
        let n = match sock.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match chunked.as_mut() {
            Some(d) => {
                decoded.clear();
                d.feed(&buf[..n], &mut decoded);
                carry.extend_from_slice(&decoded);
            }
            None => carry.extend_from_slice(&buf[..n]),
        }
    }
    if connected {
        End::Ended
    } else {
        End::Failed
    }
}
