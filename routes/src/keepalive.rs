//! Taking a stream away from hyper on a kept-alive HTTP/1 connection.
//!
//! A balancer that reuses its upstream connections sends a stream open as
//! a later request of a connection hyper is already serving. The bytes
//! hyper reads pass through [`Boundaries`], which finds each request head
//! before hyper sees it. A stream head is held back, hyper is told to
//! finish (it is between requests, so it just stops, with no
//! `Connection: close` on the responses it already sent), and the
//! connection, taken back from hyper with its buffers freed, goes to the
//! same stream writer as a first-request stream (`serve.rs`). [`Handoff`]
//! is what hyper's service, this I/O and the connection task share to know
//! when that is: a stream is held and no response is still in flight.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use sse_scale::stall::{PeerAddr, StallGuard};

use crate::head::{boundary, Boundary};
use crate::self_wake::Folded;

/// Serves an HTTP/1 connection with hyper until it ends, or until a later
/// request on it opens a stream: then the connection and that request are
/// returned, for the stream writer. `read` is what was read of the
/// connection before hyper (its first request head).
pub(crate) async fn serve(
    app: Router,
    peer: SocketAddr,
    io: StallGuard,
    read: bytes::Bytes,
    builder: &hyper::server::conn::http1::Builder,
    stop: &CancellationToken,
) -> Option<(StallGuard, Box<Request<Body>>)> {
    let handoff = Arc::new(Handoff::default());
    let io = Boundaries {
        pending: read.to_vec(),
        framing: Framing::Head,
        held: false,
        peer,
        io,
        handoff: handoff.clone(),
    };
    let svc = Service {
        app,
        peer,
        handoff: handoff.clone(),
    };
    let mut conn = builder.serve_connection(TokioIo::new(io), svc);
    let mut stopping = std::pin::pin!(stop.cancelled());
    let mut finishing = false;
    // Folded: hyper's request body wakes this task from inside its own
    // poll (`self_wake.rs`).
    let served = Folded::new(std::future::poll_fn(|cx| {
        handoff.waker.register(cx.waker());
        if !finishing && (stopping.as_mut().poll(cx).is_ready() || handoff.ready()) {
            // Between requests (a stream head is held, nothing is in
            // flight) hyper closes at once; in a response, after it.
            Pin::new(&mut conn).graceful_shutdown();
            finishing = true;
        }
        conn.poll_without_shutdown(cx)
    }))
    .await;
    if let Err(e) = &served {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    let mut io = conn.into_parts().io.into_inner().io;
    let held = handoff.stream.lock().expect("handoff lock").take();
    match held {
        Some(req) if served.is_ok() && !stop.is_cancelled() => Some((io, req)),
        _ => {
            let _ = io.shutdown().await;
            None
        }
    }
}

/// What a kept-alive HTTP/1 connection's service, its I/O and its task
/// share, to take a stream request away from hyper.
#[derive(Default)]
struct Handoff {
    /// Requests given to the router whose response body hyper still holds.
    in_flight: AtomicUsize,
    /// A stream request held back from hyper.
    stream: Mutex<Option<Box<Request<Body>>>>,
    /// The connection task, woken when the stream can be taken.
    waker: futures::task::AtomicWaker,
}

impl Handoff {
    /// A stream is held and hyper has no request left to finish.
    fn ready(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self
                .stream
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }
}

/// Decrements the in-flight count when hyper drops a response body.
struct InFlight(Arc<Handoff>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        // Wakes the connection task only when a stream is waiting for this
        // response: hyper drops the body inside the task's own poll, where
        // a wake-up costs a second worker's (`self_wake.rs`).
        if self.0.ready() {
            self.0.waker.wake();
        }
    }
}

/// A response body that counts as in flight until hyper drops it.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The router as a hyper service for [`serve`] (its future is
/// boxed, so the connection can be polled without being consumed).
struct Service {
    app: Router,
    peer: SocketAddr,
    handoff: Arc<Handoff>,
}

type Responding = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<hyper::body::Incoming>> for Service {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Responding;

    fn call(&self, mut req: Request<hyper::body::Incoming>) -> Self::Future {
        req.extensions_mut()
            .insert(ConnectInfo(PeerAddr(self.peer)));
        self.handoff.in_flight.fetch_add(1, Ordering::AcqRel);
        let in_flight = InFlight(self.handoff.clone());
        let app = self.app.clone();
        Box::pin(async move {
            let Ok(res) = app.oneshot(req.map(Body::new)).await;
            Ok(res.map(|body| {
                Body::new(Tracked {
                    body,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

/// Where the bytes hyper reads stand, in HTTP/1 request terms.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// The next request head: collected here before hyper gets any of it.
    Head,
    /// This many more bytes (a head and its `Content-Length` body) go to
    /// hyper as they are.
    Through(usize),
    /// Past what is tracked (a chunked body, an upgrade, a head too big or
    /// not HTTP/1): everything goes straight to hyper from here on, and no
    /// stream is taken from this connection.
    Opaque,
}

/// The I/O hyper serves a kept-alive HTTP/1 connection over: it reads each
/// request head whole before handing it on, and holds back one that opens
/// a stream (see the module docs).
struct Boundaries {
    /// Bytes read from the socket that hyper has not been given yet.
    pending: Vec<u8>,
    framing: Framing,
    /// A stream head was held: hyper reads nothing more.
    held: bool,
    peer: SocketAddr,
    io: StallGuard,
    handoff: Arc<Handoff>,
}

impl Boundaries {
    /// Reads more of the socket into `pending`; `Ok(0)` at its end.
    fn fill(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<usize>> {
        self.pending.reserve(4096);
        self.io.poll_read_buf(cx, &mut self.pending)
    }

    /// Hands up to `limit` pending bytes to hyper.
    fn give(&mut self, buf: &mut ReadBuf<'_>, limit: usize) -> usize {
        let n = self.pending.len().min(buf.remaining()).min(limit);
        buf.put_slice(&self.pending[..n]);
        self.pending.drain(..n);
        n
    }
}

impl AsyncRead for Boundaries {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.held {
                // The connection task takes the connection from here.
                return Poll::Pending;
            }
            match this.framing {
                Framing::Opaque if this.pending.is_empty() => {
                    return Pin::new(&mut this.io).poll_read(cx, buf);
                }
                Framing::Opaque => {
                    this.give(buf, usize::MAX);
                    return Poll::Ready(Ok(()));
                }
                Framing::Through(left) if !this.pending.is_empty() => {
                    let n = this.give(buf, left);
                    this.framing = if n == left {
                        Framing::Head
                    } else {
                        Framing::Through(left - n)
                    };
                    return Poll::Ready(Ok(()));
                }
                Framing::Through(_) => {
                    if std::task::ready!(this.fill(cx))? == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Framing::Head => {
                    if !this.pending.is_empty() {
                        match boundary(&this.pending, this.peer) {
                            Boundary::Stream(req) => {
                                // Anything after a stream head is ignored,
                                // as on a first-request stream.
                                this.pending = Vec::new();
                                this.held = true;
                                *this.handoff.stream.lock().expect("handoff lock") = Some(req);
                                this.handoff.waker.wake();
                                continue;
                            }
                            Boundary::Request(len) => {
                                this.framing = Framing::Through(len);
                                continue;
                            }
                            Boundary::Opaque => {
                                this.framing = Framing::Opaque;
                                continue;
                            }
                            Boundary::Partial => {}
                        }
                    }
                    if std::task::ready!(this.fill(cx))? == 0 {
                        // The client's end: what is left (a partial head)
                        // is hyper's to answer or drop.
                        this.framing = Framing::Opaque;
                        if this.pending.is_empty() {
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
            }
        }
    }
}

crate::write_through::write_through!(Boundaries);
