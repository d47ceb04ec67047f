//! The stream writer: writes the response of a request the accept loop
//! ([`crate::serve`]) kept away from hyper — a whole error response, or an
//! event stream's head and then each frame its body yields — and, while a
//! stream has nothing to write, holds no task.
//!
//! **Why no task.** An idle stream is what an instance holds most of, and a
//! tokio task per stream (its cell, and the connection's future inside it)
//! was the largest part of an idle stream's memory after its socket
//! (docs/benchmarks.md). A waiting writer only needs to be told when to go
//! on: when its body has something (a frame queued behind a full socket, a
//! heartbeat, the drain signal, its end) or the client closes. Both register
//! a waker; here that waker is the parked stream itself ([`Park`]). Waking
//! it spawns a task that takes the stream back, writes what is due and
//! parks it again. Live frames do not wake it at all: deliveries write them
//! straight into the socket (see [`sse_scale::sink`]).
//!
//! A parked stream is not a task, so it holds a token of the server's
//! connection tracker: a graceful shutdown still waits for every stream to
//! send its closing hint and end.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use axum::body::Body;
use axum::http::{header, Response};
use http_body::Body as _;
use tokio::io::AsyncWriteExt;
use tokio::runtime::Handle;
use tokio_util::task::task_tracker::TaskTrackerToken;

use sse_scale::sink::DirectWriter;

use crate::socket::Guarded;

/// Largest non-stream response written here (the stream route's error
/// bodies); it is buffered to send its length.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Most bytes a client's unexpected sending on a stream is read (and
/// dropped) per wake-up.
const DISCARD: usize = 16 * 1024;

/// Writes `res` on `io`, a connection that closes after it, then closes
/// it. `tracker` keeps a graceful shutdown waiting while the stream lives.
pub(crate) async fn respond(mut io: Guarded, res: Response<Body>, tracker: TaskTrackerToken) {
    let direct = res.extensions().get::<DirectWriter>().cloned();
    let (head, streaming, body) = response_head(res);
    if !streaming {
        let written = Box::pin(write_whole(&mut io, head, body)).await;
        return close(io, written).await;
    }
    if let Err(e) = write_head(&mut io, head).await {
        return close(io, Err(e)).await;
    }
    if let Some(direct) = direct {
        direct.attach(Arc::new(io.get_ref().clone()));
    }
    let pump = Pump {
        io,
        body,
        _tracker: tracker,
    };
    let park = Arc::new(Park {
        slot: Mutex::new(Slot::default()),
        runtime: Handle::current(),
    });
    pump.run(park).await;
}

/// The end of a response: its connection is closed.
async fn close(mut io: Guarded, written: io::Result<()>) {
    if let Err(e) = written {
        tracing::debug!(error = %e, "stream connection ended");
    }
    let _ = io.shutdown().await;
}

/// The response head for a connection that closes after the response,
/// whether the body is an event stream, and the body. The response's own
/// head is freed here: it would otherwise live as long as the stream.
fn response_head(res: Response<Body>) -> (Vec<u8>, bool, Body) {
    let (parts, body) = res.into_parts();
    let streaming = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            parts.status.as_str(),
            parts.status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // As hyper does on every response (RFC 9110 §6.6.1: an origin server
    // with a clock sends one).
    if !parts.headers.contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"connection: close\r\n");
    (head, streaming, body)
}

/// A whole (error) response: buffered, with its length.
async fn write_whole(io: &mut Guarded, mut head: Vec<u8>, body: Body) -> io::Result<()> {
    let bytes = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .map_err(io::Error::other)?;
    head.extend_from_slice(format!("content-length: {}\r\n\r\n", bytes.len()).as_bytes());
    head.extend_from_slice(&bytes);
    io.write_all(&head).await
}

async fn write_head(io: &mut Guarded, mut head: Vec<u8>) -> io::Result<()> {
    head.extend_from_slice(b"\r\n");
    io.write_all(&head).await
}

/// An event stream being written: the body's bytes go to the socket as they
/// are, each write finished before the body is polled again. That is what
/// lets the socket be handed to the connection map ([`DirectWriter`]): live
/// frames are written by the deliveries themselves, and the body yields only
/// what had to wait for a full socket, heartbeats and its end.
struct Pump {
    io: Guarded,
    body: Body,
    _tracker: TaskTrackerToken,
}

/// What a waiting stream was woken for.
enum Next {
    Frame(Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>),
    Readable(io::Result<()>),
}

impl Pump {
    /// Writes until the stream ends, or until it has nothing to write: then
    /// it parks in `park`, and the task ends.
    async fn run(mut self, park: Arc<Park>) {
        let ended = loop {
            let next = match park.wait(self) {
                Waited::Parked => return,
                Waited::Ready(pump, next) => {
                    self = pump;
                    next
                }
            };
            match self.step(next).await {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        // The tracker's token goes last: a shutdown waits for the close.
        let Pump { io, _tracker, .. } = self;
        close(io, ended).await;
    }

    /// One poll for both sources: the body first (frames), then the socket
    /// (the client closing).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(Next::Frame(frame));
        }
        self.io
            .get_ref()
            .tcp()
            .poll_read_ready(cx)
            .map(Next::Readable)
    }

    /// Acts on what woke the stream; `Ok(false)` once it is over.
    async fn step(&mut self, next: Next) -> io::Result<bool> {
        match next {
            Next::Frame(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    self.io.write_all(&data).await?;
                }
                Ok(true)
            }
            Next::Frame(Some(Err(e))) => Err(io::Error::other(e)),
            Next::Frame(None) => Ok(false),
            // The client closed (or reset) its side: nothing to send to.
            // Anything else it sends on a stream is read and ignored, a
            // bounded amount per wake-up: a client that keeps sending costs
            // one wake-up per `DISCARD` bytes, and cannot hold the task.
            Next::Readable(ready) => {
                ready?;
                let mut scratch = [0u8; 512];
                let mut discarded = 0;
                while discarded < DISCARD {
                    match self.io.get_ref().tcp().try_read(&mut scratch) {
                        Ok(0) => return Ok(false),
                        Ok(n) => discarded += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                Ok(true)
            }
        }
    }
}

/// A stream waiting with no task: the waker its body and socket hold. See
/// the module docs.
struct Park {
    slot: Mutex<Slot>,
    runtime: Handle,
}

#[derive(Default)]
struct Slot {
    /// The parked stream; `None` while a task runs it.
    pump: Option<Pump>,
    /// Woken while a task ran it, before it parked: it must not park on a
    /// wake-up already spent.
    woken: bool,
}

enum Waited {
    /// The stream is parked; the task has nothing left to do.
    Parked,
    Ready(Pump, Next),
}

impl Park {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        // Each critical section leaves the slot whole.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Polls `pump` with this park as the waker; parks it if nothing is due.
    fn wait(self: &Arc<Self>, mut pump: Pump) -> Waited {
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        loop {
            self.lock().woken = false;
            if let Poll::Ready(next) = pump.poll_next(&mut cx) {
                return Waited::Ready(pump, next);
            }
            let mut slot = self.lock();
            if !slot.woken {
                slot.pump = Some(pump);
                return Waited::Parked;
            }
        }
    }
}

impl Wake for Park {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut slot = self.lock();
        match slot.pump.take() {
            Some(pump) => {
                drop(slot);
                self.runtime.spawn(pump.run(self.clone()));
            }
            None => slot.woken = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use axum::http::StatusCode;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::socket::Socket;

    fn stream_response(frames: mpsc::Receiver<bytes::Bytes>) -> Response<Body> {
        let body = futures::stream::unfold(frames, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::TRANSFER_ENCODING, "chunked")
            .body(Body::from_stream(body))
            .unwrap()
    }

    /// Reads from `client` until `needle` arrived; everything read.
    async fn read_until(client: &mut TcpStream, got: &mut String, needle: &str) {
        let mut buf = [0u8; 1024];
        while !got.contains(needle) {
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
                .await
                .expect("in time")
                .unwrap();
            assert!(n > 0, "closed before {needle:?}: {got:?}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }

    #[test]
    fn a_stream_s_head_closes_the_connection_and_carries_a_date() {
        let (_tx, rx) = mpsc::channel(1);
        let (head, streaming, _) = response_head(stream_response(rx));
        let head = String::from_utf8(head).unwrap();
        assert!(streaming);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert!(head.contains("date: "), "{head}");
        // Close-delimited: no framing of its own.
        assert!(!head.contains("transfer-encoding"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
    }

    /// The writer parks (no task) when its body has nothing; a frame sent
    /// then wakes it, is written, and it parks again; the body's end closes
    /// the connection; the tracker waits for the parked stream meanwhile.
    #[tokio::test]
    async fn a_parked_stream_wakes_for_each_frame_and_its_end() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let io = sse_scale::StallGuard::new(
            Socket::new(server, None),
            Duration::from_secs(5),
            Arc::new(AtomicU64::new(0)),
        );
        let (tx, rx) = mpsc::channel(4);
        let tracker = TaskTracker::new();
        let tasks = || Handle::current().metrics().num_alive_tasks();
        let before = tasks();
        tokio::spawn(respond(io, stream_response(rx), tracker.token()));
        let mut got = String::new();
        read_until(&mut client, &mut got, "\r\n\r\n").await;
        tracker.close();
        for n in 0..3 {
            // Parked: no task of its own while it waits.
            let parked = tokio::time::timeout(Duration::from_secs(5), async {
                while tasks() > before {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            assert!(parked.is_ok(), "the stream kept a task while waiting");
            assert!(!tracker.is_empty(), "a parked stream holds its token");
            let frame = format!("data: {n}\n\n");
            tx.send(bytes::Bytes::from(frame.clone())).await.unwrap();
            read_until(&mut client, &mut got, &frame).await;
        }
        drop(tx);
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the body's end closes the connection");
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .expect("the token goes with the stream");
    }
}
