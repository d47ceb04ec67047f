//! The accept loop: every connection is served by hyper, except one whose
//! first request opens an event stream (`GET /sessions/{id}/events`) and is
//! all the client sent (`head.rs` says exactly when).
//!
//! Why a second path: an idle SSE stream served by hyper keeps hyper's
//! per-connection buffers (an 8 KiB read buffer that grows to 16 KiB when
//! the request's bytes are still referenced, and an 8 KiB header buffer) for
//! as long as the stream lives, which is most of an idle stream's memory
//! (see docs/benchmarks.md). A stream needs none of them: after the request
//! head nothing but a close comes from the client, and every frame is
//! already encoded. So the first request head of each connection is read
//! and parsed here (`head.rs`); if it opens a stream, the
//! request still goes through the same axum router (routing, auth, rate
//! limits, the `X-Instance-Id` layer, tracing), and only the response is
//! written by the stream writer (`writer.rs`): the head, then each frame
//! straight from its shared bytes, until the stream ends or the client goes
//! away, with no task while the stream waits. The response is
//! close-delimited (`Connection: close`), which every HTTP/1 client and
//! proxy reads. Everything else is hyper's, from the connection's first
//! byte to its last: later requests of a kept-alive connection (a stream
//! among them is served by hyper, with its buffers), HTTP/2 (an h2c
//! preface in any number of pieces), upgrades. Exactly one HTTP/1 framer
//! owns a connection: this loop only ever reads a first head that carries
//! no body, never where a body ends. The shipped balancer configs send
//! streams on connections of their own (lb-config/README.md), so streams
//! take the lean path.
//!
//! **Slow or idle clients.** The first head is read (not peeked) against
//! one deadline for the whole head, waiting on socket readiness; the bytes
//! read are handed to hyper in front of the socket when the request is not
//! a stream. At most `MAX_PENDING_HEADS` connections may be waiting for a
//! complete first head; more are closed at once. hyper runs with a timer:
//! every later request head must also arrive within the deadline.
//! `deadline.rs` bounds the rest of a request and closes a connection,
//! HTTP/1 or HTTP/2, that has had no request open for the deadline.
//!
//! **Who gets in** (`admission.rs`): before each accept a place in the
//! reserve is taken, so that a refused connection can be answered; then
//! the connection is served, refused (429 per address, 503 when the
//! instance is full; health checks answered as usual) or, for an address
//! over its limit that holds its share of the reserve, closed.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use sse_scale::axum::PeerAddr;
use sse_scale::StallGuard;

use crate::admission::{Admission, Admit, Refusal, Ticket};
use crate::deadline::{self, Activity, Watched};
use crate::head::{classify, First, MAX_HEAD};
use crate::socket::{Guarded, Socket};

/// A refused connection's request head must arrive within this.
const REFUSAL_HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// How connections are bounded.
#[derive(Clone)]
pub struct Limits {
    /// A write blocked this long closes the connection (the client stopped
    /// reading).
    pub write_timeout: Duration,
    /// A whole request head must arrive within this; an idle keep-alive
    /// connection is closed after it.
    pub head_timeout: Duration,
    /// A request body must end within this after its head (408).
    pub request_timeout: Duration,
    /// Connections waiting for a complete first head at once.
    pub max_pending_heads: usize,
    /// Counts connections closed because a write stalled.
    pub stalled: Arc<AtomicU64>,
    /// Counts connections refused because too many heads were pending.
    pub heads_refused: Arc<AtomicU64>,
    /// Counts streams opened as their connection's first request (served
    /// by the stream writer, without hyper's buffers).
    pub first_request_streams: Arc<AtomicU64>,
    /// Connections per address and in all.
    pub admission: Arc<Admission>,
    /// What refused connections get: health checks as usual, everything
    /// else the refusal (`crate::refusal_app`).
    pub over_address: Router,
    pub over_instance: Router,
}

/// Serves `app` on `listener` until `shutdown` fires, then waits for open
/// connections to finish (streams end on the drain signal; idle keep-alive
/// connections are closed).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let conns = TaskTracker::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.head_timeout))
        .keep_alive_timeout(limits.head_timeout);
    let builder = Arc::new(builder);
    let pending = Arc::new(Semaphore::new(limits.max_pending_heads));
    // Refused connections are answered by hyper too, with a short head
    // deadline: a client refused at once sends its request at once.
    let mut refusing = (*builder).clone();
    refusing.http1().header_read_timeout(REFUSAL_HEAD_TIMEOUT);
    let refusing = Arc::new(refusing);
    loop {
        let spare = tokio::select! {
            () = shutdown.cancelled() => break,
            spare = limits.admission.spare() => spare,
        };
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors and the like: back off, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ticket = match limits.admission.admit(peer.ip(), spare) {
            Admit::Served(ticket) => ticket,
            Admit::Refused(ticket, why) => {
                let app = match why {
                    Refusal::PerAddress => limits.over_address.clone(),
                    Refusal::Full => limits.over_instance.clone(),
                };
                let mut conn = Conn::new(app, &conns, peer, &limits, &shutdown);
                // HTTP/2 too: an idle refused connection goes as soon.
                conn.head_timeout = REFUSAL_HEAD_TIMEOUT;
                let builder = refusing.clone();
                conns.spawn(async move {
                    Box::pin(conn.serve_hyper(tcp, ticket, bytes::Bytes::new(), &builder)).await;
                });
                continue;
            }
            Admit::Closed => continue,
        };
        let Ok(waiting) = pending.clone().try_acquire_owned() else {
            // Too many connections are still sending their first head: a
            // slow-head flood must not hold every descriptor.
            let refused = limits
                .heads_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if refused % 1000 == 0 {
                tracing::warn!(refused = refused + 1, "connection refused: MAX_PENDING_HEADS connections are still sending their request head");
            }
            drop(tcp);
            continue;
        };
        // Events are small writes that must leave at once.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let conn = Conn::new(app.clone(), &conns, peer, &limits, &shutdown);
        let builder = builder.clone();
        conns.spawn(async move {
            // Boxed: a task is as large as its largest state, and a stream
            // lives far longer than the sniff or a hyper connection's setup.
            let mut tcp = tcp;
            let sniffed = Box::pin(conn.sniff(&mut tcp)).await;
            drop(waiting);
            match sniffed {
                Sniff::Stream(req) => conn.serve_stream(conn.guard(tcp, ticket), *req).await,
                Sniff::Other(read) => Box::pin(conn.serve_hyper(tcp, ticket, read, &builder)).await,
                Sniff::Gone => {}
            }
        });
    }
    drop(listener);
    conns.close();
    conns.wait().await;
    Ok(())
}

/// What the first request head of a connection is.
enum Sniff {
    /// An event stream: the request built from its head (read).
    Stream(Box<Request<Body>>),
    /// Anything else, for hyper, with the bytes read so far.
    Other(bytes::Bytes),
    /// The client went away, or did not send a whole head in time.
    Gone,
}

struct Conn {
    app: Router,
    /// The server's connections, for a stream that waits without a task.
    tracker: TaskTracker,
    peer: SocketAddr,
    write_timeout: Duration,
    head_timeout: Duration,
    stalled: Arc<AtomicU64>,
    first_request_streams: Arc<AtomicU64>,
    /// A request body must end within this.
    request_timeout: Duration,
    /// The server stops.
    stop: CancellationToken,
}

impl Conn {
    fn new(
        app: Router,
        conns: &TaskTracker,
        peer: SocketAddr,
        limits: &Limits,
        stop: &CancellationToken,
    ) -> Self {
        Self {
            app,
            tracker: conns.clone(),
            peer,
            write_timeout: limits.write_timeout,
            head_timeout: limits.head_timeout,
            stalled: limits.stalled.clone(),
            first_request_streams: limits.first_request_streams.clone(),
            request_timeout: limits.request_timeout,
            stop: stop.clone(),
        }
    }

    fn guard(&self, tcp: TcpStream, ticket: Ticket) -> Guarded {
        StallGuard::new(
            Socket::new(tcp, Some(ticket)),
            self.write_timeout,
            self.stalled.clone(),
        )
    }

    /// Reads the first request head, all of it within the head timeout.
    async fn sniff(&self, tcp: &mut TcpStream) -> Sniff {
        // Read into spare capacity: nothing is zeroed first.
        let mut buf = Vec::with_capacity(MAX_HEAD);
        let deadline = tokio::time::Instant::now() + self.head_timeout;
        loop {
            let room = MAX_HEAD - buf.len();
            let mut spare = bytes::BufMut::limit(&mut buf, room);
            tokio::select! {
                () = self.stop.cancelled() => return Sniff::Gone,
                // Waits on readiness: a head arriving in pieces costs one
                // wake-up per piece, and the deadline is the whole head's.
                r = tokio::time::timeout_at(deadline, tcp.read_buf(&mut spare)) => match r {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Sniff::Gone,
                    Ok(Ok(_)) => {}
                },
            }
            match classify(&buf, self.peer) {
                First::Stream(req) => return Sniff::Stream(req),
                First::Partial => {}
                // Hyper's, every byte read so far first. Copied: the head
                // buffer is not kept for the connection's life.
                First::Hyper => return Sniff::Other(bytes::Bytes::copy_from_slice(&buf)),
            }
        }
    }

    /// Hands the connection to hyper.
    async fn serve_hyper(
        &self,
        tcp: TcpStream,
        ticket: Ticket,
        read: bytes::Bytes,
        builder: &auto::Builder<TokioExecutor>,
    ) {
        let peer = self.peer;
        let io = TokioIo::new(Rewind {
            read,
            io: self.guard(tcp, ticket),
        });
        let activity = Activity::new();
        let request_timeout = self.request_timeout;
        let app = self.app.clone();
        let requests = activity.clone();
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let open = requests.enter();
            let mut req = deadline::bounded(req, request_timeout);
            req.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
            let res = app.clone().oneshot(req);
            async move {
                let Ok(res) = res.await;
                Ok::<_, std::convert::Infallible>(deadline::hold_open(res, open))
            }
        });
        let served = builder.serve_connection_with_upgrades(io, svc);
        let served = Watched::new(served, self.stop.clone(), &activity, self.head_timeout);
        // Folded: hyper's request body wakes this task from inside its own
        // poll (`self_wake.rs`).
        let served = crate::self_wake::Folded::new(Box::pin(served));
        if let Err(e) = served.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }

    /// Runs a stream request through the router and writes the response.
    async fn serve_stream(&self, io: Guarded, req: Request<Body>) {
        let Ok(res) = Box::pin(self.app.clone().oneshot(req)).await;
        if res.status() == axum::http::StatusCode::OK {
            self.first_request_streams
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        crate::writer::respond(io, res, self.tracker.token()).await;
    }
}

/// A connection whose first bytes were already read: hyper reads them
/// first, then the socket.
struct Rewind {
    read: bytes::Bytes,
    io: Guarded,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            let head = self.read.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

crate::write_through::write_through!(Rewind);
