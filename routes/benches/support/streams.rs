//! Bench support: the load generator's SSE readers. Each stream is a task
//! that reads its connection until it ends and reports to one [`Collector`]
//! shared with the controller: connected streams, deliveries, exact loss
//! and duplicates (a bitset of sequence numbers per stream, so reordering
//! does not hide either) and publish-to-receive latency. Raw TCP rather
//! than an HTTP client, so the load generator takes less of the machine it
//! shares with the servers. Shared by the bench targets, each of which uses
//! part of it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::output::slots_100ms;
use super::sse_client::{now_micros, parse_data, parse_id, Session, OPEN_CONCURRENCY};

/// Microseconds, 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram")
}

/// The `q` quantile of a histogram of microseconds, in ms.
pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// What every stream reports; shared with the controller.
pub struct Collector {
    pub connected: AtomicUsize,
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    /// Events whose `id:` was not greater than the stream's previous one
    /// (counted only by a [`Collector::strict`] one).
    pub id_not_increasing: AtomicU64,
    pub errors: AtomicU64,
    /// Sharded so thousands of stream tasks rarely contend on one lock.
    latency: Vec<Mutex<Histogram<u64>>>,
    /// Whether the streams parse every `id:`: a cost on the load generator
    /// that only a bench reporting the order pays.
    check_ids: bool,
    /// Deliveries slower than this (µs) are counted by the 100 ms slot of
    /// their publish time (`u64::MAX`: not counted).
    slow_us: u64,
    /// When publishing started (µs since the epoch); see
    /// [`Collector::slow_slots`].
    pub start_micros: AtomicU64,
    slow: Vec<AtomicU64>,
}

impl Collector {
    /// Counts deliveries, duplicates and latency.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::with(false, u64::MAX, 0))
    }

    /// As [`Collector::new`], and also checks that every stream's ids
    /// increase and counts the deliveries slower than `slow_us` by when
    /// they were published, in `slots` slots of 100 ms (the last takes the
    /// rest): shows whether a latency tail is one stall or spread over the
    /// window.
    pub fn strict(slow_us: u64, slots: usize) -> Arc<Self> {
        Arc::new(Self::with(true, slow_us, slots))
    }

    fn with(check_ids: bool, slow_us: u64, slots: usize) -> Self {
        Self {
            connected: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            id_not_increasing: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: (0..64).map(|_| Mutex::new(histogram())).collect(),
            check_ids,
            slow_us,
            start_micros: AtomicU64::new(u64::MAX),
            slow: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn note_slow(&self, published_micros: u64) {
        let since = published_micros.saturating_sub(self.start_micros.load(Ordering::Relaxed));
        let slot = ((since / 100_000) as usize).min(self.slow.len() - 1);
        self.slow[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Deliveries slower than the bound, in all.
    pub fn slow_count(&self) -> u64 {
        self.slow.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// `[[ms after the start, slow deliveries], ...]`, non-empty slots only.
    pub fn slow_slots(&self) -> Value {
        slots_100ms(self.slow.iter().map(|n| n.load(Ordering::Relaxed)))
    }

    pub fn merged_latency(&self) -> Histogram<u64> {
        let mut all = histogram();
        for h in &self.latency {
            all.add(&*h.lock().expect("histogram lock"))
                .expect("merge histograms");
        }
        all
    }

    /// Waits until `expected` deliveries arrived, looking every `every`,
    /// for at most `within`.
    pub async fn wait_delivered(&self, expected: u64, within: Duration, every: Duration) {
        let deadline = Instant::now() + within;
        while self.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(every).await;
        }
    }
}

/// Which sequence numbers one stream received (a bitset).
pub type Seen = Arc<Mutex<Vec<u64>>>;

/// Distinct events the streams received, in all.
pub fn unique<'a>(logs: impl IntoIterator<Item = &'a Seen>) -> u64 {
    logs.into_iter()
        .map(|l| {
            l.lock()
                .expect("stream log lock")
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>()
        })
        .sum()
}

/// How a stream's request reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// As the first request of a new connection.
    Fresh,
    /// As the second request of a kept-alive connection (after a
    /// `GET /healthz`), as from a balancer that reuses upstream connections.
    KeepAlive,
    /// As one of many HTTP/2 streams on a prior-knowledge (h2c) connection.
    H2c,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Fresh => "fresh",
            Via::KeepAlive => "keep-alive",
            Via::H2c => "h2c",
        }
    }
}

/// Opens `per_session` streams for each session at `addr`; returns once
/// every stream has seen `connected` (or failed), with the index in
/// `sessions` of each stream's session. At most [`OPEN_CONCURRENCY`]
/// streams are in their handshake at once.
pub async fn open_streams(
    addr: SocketAddr,
    via: Via,
    sessions: &[Arc<Session>],
    per_session: usize,
    col: &Arc<Collector>,
) -> Vec<(usize, Seen)> {
    let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let mut logs = Vec::new();
    // The collector may already count the streams of another server.
    let target = col.connected.load(Ordering::Relaxed)
        + col.errors.load(Ordering::Relaxed) as usize
        + sessions.len() * per_session;
    for (si, session) in sessions.iter().enumerate() {
        for _ in 0..per_session {
            let seen = Seen::default();
            let permit = gate.clone().acquire_owned().await.expect("semaphore");
            let shard = logs.len();
            logs.push((si, seen.clone()));
            tokio::spawn(run_stream(
                addr,
                via,
                session.clone(),
                shard,
                col.clone(),
                seen,
                permit,
            ));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while col.connected.load(Ordering::Relaxed) + (col.errors.load(Ordering::Relaxed) as usize)
        < target
    {
        assert!(Instant::now() < deadline, "streams did not connect in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    logs
}

/// Opens one SSE stream and reads it until the connection ends. Events
/// carry `{"t": <publish µs>, "s": <sequence in session>}`.
async fn run_stream(
    addr: SocketAddr,
    via: Via,
    session: Arc<Session>,
    shard: usize,
    col: Arc<Collector>,
    seen: Seen,
    permit: OwnedSemaphorePermit,
) {
    if via == Via::H2c {
        return run_h2_stream(addr, session, col, permit).await;
    }
    // Held until this stream is connected (or has failed).
    let mut permit = Some(permit);
    let mut sock = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect failed: {e}");
            col.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = sock.set_nodelay(true);
    if via == Via::KeepAlive && !health_request(&mut sock).await {
        col.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if sock
        .write_all(session.stream_request().as_bytes())
        .await
        .is_err()
    {
        col.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut buf = vec![0u8; 4096];
    // Bytes of an incomplete line carried over to the next read.
    let mut carry: Vec<u8> = Vec::new();
    let mut connected = false;
    // The last `id:` seen; `connected` carries the stream's position.
    let mut last_id = (0, 0);
    let mut lat: Vec<u64> = Vec::new();
    loop {
        let n = match sock.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        carry.extend_from_slice(&buf[..n]);
        let mut start = 0;
        let now = now_micros();
        let (mut delivered, mut dups, mut unordered) = (0u64, 0u64, 0u64);
        while let Some(pos) = carry[start..].iter().position(|&b| b == b'\n') {
            let line = &carry[start..start + pos];
            start += pos + 1;
            if col.check_ids {
                if let Some(id) = line.strip_prefix(b"id: ").and_then(parse_id) {
                    if connected && id <= last_id {
                        unordered += 1;
                    }
                    last_id = id;
                    continue;
                }
            }
            if !connected {
                if line.starts_with(b"HTTP/1.1 ") && !line.starts_with(b"HTTP/1.1 200") {
                    eprintln!("stream refused: {}", String::from_utf8_lossy(line));
                    col.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if line == b"event: connected" {
                    connected = true;
                    col.connected.fetch_add(1, Ordering::Relaxed);
                    permit.take();
                }
                continue;
            }
            if let Some((t, s)) = parse_data(line) {
                delivered += 1;
                let l = now.saturating_sub(t).max(1);
                if l > col.slow_us {
                    col.note_slow(t);
                }
                lat.push(l);
                let mut seen = seen.lock().expect("stream log lock");
                let (word, bit) = ((s / 64) as usize, s % 64);
                if seen.len() <= word {
                    seen.resize(word + 1, 0);
                }
                if seen[word] & (1 << bit) != 0 {
                    dups += 1;
                }
                seen[word] |= 1 << bit;
            }
        }
        carry.drain(..start);
        if delivered > 0 || unordered > 0 {
            col.delivered.fetch_add(delivered, Ordering::Relaxed);
            col.duplicates.fetch_add(dups, Ordering::Relaxed);
            col.id_not_increasing
                .fetch_add(unordered, Ordering::Relaxed);
            let mut h = col.latency[shard % col.latency.len()]
                .lock()
                .expect("histogram lock");
            for v in lat.drain(..) {
                let _ = h.record(v);
            }
        }
    }
    if !connected {
        col.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends `GET /healthz` and reads the whole response, leaving the
/// connection ready for its next request.
async fn health_request(sock: &mut TcpStream) -> bool {
    if sock
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut res = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = res.parse(&buf) {
            let len: usize = res
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0);
            if res.code != Some(200) {
                return false;
            }
            if buf.len() >= head + len {
                return true;
            }
        }
    }
}

/// HTTP/2 streams share connections: this many per connection.
const H2_STREAMS_PER_CONN: usize = 100;

thread_local! {
    /// The current h2c connection of this load-generator thread and how
    /// many streams it carries.
    static H2_CONN: std::cell::RefCell<Option<(SocketAddr, usize, H2Sender)>> =
        const { std::cell::RefCell::new(None) };
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// A sender on an h2c connection with room for one more stream.
async fn h2_sender(addr: SocketAddr) -> Option<H2Sender> {
    let reuse = H2_CONN.with(|c| {
        let mut c = c.borrow_mut();
        match c.as_mut() {
            Some((a, n, tx)) if *a == addr && *n < H2_STREAMS_PER_CONN && tx.is_ready() => {
                *n += 1;
                Some(tx.clone())
            }
            _ => None,
        }
    });
    if reuse.is_some() {
        return reuse;
    }
    let tcp = TcpStream::connect(addr).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let (tx, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    H2_CONN.with(|c| *c.borrow_mut() = Some((addr, 1, tx.clone())));
    Some(tx)
}

/// One SSE stream as an HTTP/2 stream; read until it ends. Only used for
/// idle memory, so it just waits for `connected`.
async fn run_h2_stream(
    addr: SocketAddr,
    session: Arc<Session>,
    col: Arc<Collector>,
    permit: OwnedSemaphorePermit,
) {
    use http_body_util::BodyExt;
    let mut permit = Some(permit);
    let fail = |col: &Collector| {
        col.errors.fetch_add(1, Ordering::Relaxed);
    };
    let Some(mut tx) = h2_sender(addr).await else {
        return fail(&col);
    };
    let req = hyper::Request::get(format!(
        "http://{addr}/sessions/{}/events?token={}",
        session.id, session.token
    ))
    .header("accept", "text/event-stream")
    .body(http_body_util::Empty::new())
    .expect("request");
    let res = match tx.send_request(req).await {
        Ok(r) if r.status() == 200 => r,
        _ => return fail(&col),
    };
    let mut body = res.into_body();
    let mut seen = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            if permit.is_some() {
                seen.extend_from_slice(&data);
                if seen.windows(16).any(|w| w == b"event: connected") {
                    col.connected.fetch_add(1, Ordering::Relaxed);
                    permit.take();
                    seen = Vec::new();
                }
            }
        }
    }
}
