//! The accept loop: every connection is served by hyper, except one whose
//! first request opens an event stream (`GET /sessions/{id}/events`).
//!
//! Why a second path: an idle SSE stream served by hyper keeps hyper's
//! per-connection buffers (an 8 KiB read buffer that grows to 16 KiB when
//! the request's bytes are still referenced, and an 8 KiB header buffer) for
//! as long as the stream lives, which is most of an idle stream's memory
//! (see docs/benchmarks.md). A stream needs none of them: after the request
//! head nothing but a close comes from the client, and every frame is
//! already encoded. So the first request head of each connection is peeked
//! (not consumed) and parsed with `httparse`; if it opens a stream, the
//! request still goes through the same axum router (routing, auth, rate
//! limits, the `X-Instance-Id` layer, tracing), and only the response is
//! written here: the head, then each frame straight from its shared bytes,
//! until the stream ends or the client goes away. The response is
//! close-delimited (`Connection: close`), which every HTTP/1 client and
//! proxy reads. Everything else, including streams opened later on a
//! keep-alive connection, is hyper's.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use axum::Router;
use http_body::Body as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use sse_scale::stall::{PeerAddr, StallGuard};

/// Longest request head the stream path parses; bigger heads go to hyper.
const MAX_HEAD: usize = 8192;
/// A client must send its first request head within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest non-stream response the stream path buffers (its error bodies).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Serves `app` on `listener` until `shutdown` fires, then waits for open
/// connections to finish (streams end on the drain signal; idle keep-alive
/// connections are closed).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    write_timeout: Duration,
    stalled: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let conns = TaskTracker::new();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
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
        // Events are small writes that must leave at once.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let conn = Conn {
            app: app.clone(),
            peer,
            write_timeout,
            stalled: stalled.clone(),
        };
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let stop = shutdown.clone();
        conns.spawn(async move {
            // Boxed: a task is as large as its largest state, and a stream
            // lives far longer than the sniff or a hyper connection's setup.
            let sniffed = Box::pin(conn.sniff(&tcp, &stop)).await;
            match sniffed {
                Sniff::Stream(head_len, req) => conn.serve_stream(tcp, head_len, *req).await,
                Sniff::Other => Box::pin(conn.serve_hyper(tcp, &builder, watcher)).await,
                Sniff::Gone => {}
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    conns.close();
    conns.wait().await;
    Ok(())
}

/// What the first request head of a connection is.
enum Sniff {
    /// An event stream: the head's length and the request built from it.
    Stream(usize, Box<Request<Body>>),
    /// Anything else, for hyper (the head is still unread).
    Other,
    /// The client went away, or sent nothing in time.
    Gone,
}

struct Conn {
    app: Router,
    peer: SocketAddr,
    write_timeout: Duration,
    stalled: Arc<AtomicU64>,
}

impl Conn {
    fn guard(&self, tcp: TcpStream) -> StallGuard {
        StallGuard::new(tcp, self.write_timeout, self.stalled.clone())
    }

    /// Peeks at the first request head without consuming it.
    async fn sniff(&self, tcp: &TcpStream, stop: &CancellationToken) -> Sniff {
        let mut buf = vec![0u8; MAX_HEAD];
        let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
        loop {
            let n = tokio::select! {
                () = stop.cancelled() => return Sniff::Gone,
                r = tokio::time::timeout_at(deadline, tcp.peek(&mut buf)) => match r {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Sniff::Gone,
                    Ok(Ok(n)) => n,
                },
            };
            match classify(&buf[..n], n == buf.len(), self.peer) {
                Some(sniff) => return sniff,
                // The head arrives in pieces: peek returns at once while
                // data is waiting, so wait a moment for the rest.
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Hands the connection to hyper.
    async fn serve_hyper(
        &self,
        tcp: TcpStream,
        builder: &auto::Builder<TokioExecutor>,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let peer = self.peer;
        let io = TokioIo::new(self.guard(tcp));
        let svc = TowerToHyperService::new(self.app.clone().map_request(
            move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
                req.map(Body::new)
            },
        ));
        let served = builder.serve_connection_with_upgrades(io, svc);
        if let Err(e) = watcher.watch(served.into_owned()).await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }

    /// Runs a stream request through the router and writes the response.
    async fn serve_stream(&self, tcp: TcpStream, head_len: usize, req: Request<Body>) {
        let mut io = self.guard(tcp);
        // Consume the head we peeked.
        if Box::pin(consume(&mut io, head_len)).await.is_err() {
            return;
        }
        let Ok(res) = Box::pin(self.app.clone().oneshot(req)).await;
        let (head, streaming, body) = response_head(res);
        let written = if streaming {
            pump(&mut io, head, body).await
        } else {
            Box::pin(write_whole(&mut io, head, body)).await
        };
        if let Err(e) = written {
            tracing::debug!(error = %e, "stream connection ended");
        }
        let _ = io.shutdown().await;
    }
}

/// What a peeked head is; `None` while it is incomplete. Kept out of the
/// async code so the parser's header array never lives in a connection's
/// future.
fn classify(bytes: &[u8], full: bool, peer: SocketAddr) -> Option<Sniff> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => Some(match stream_request(&parsed, peer) {
            Some(req) => Sniff::Stream(len, Box::new(req)),
            None => Sniff::Other,
        }),
        // Too big, or not HTTP/1 (an HTTP/2 preface, garbage): hyper
        // answers it.
        Ok(httparse::Status::Partial) if full => Some(Sniff::Other),
        Err(_) => Some(Sniff::Other),
        Ok(httparse::Status::Partial) => None,
    }
}

/// The request if the head opens an event stream.
fn stream_request(parsed: &httparse::Request<'_, '_>, peer: SocketAddr) -> Option<Request<Body>> {
    if parsed.method? != "GET" || parsed.version? != 1 {
        return None;
    }
    let target = parsed.path?;
    let path = target.split('?').next()?;
    let id = path.strip_prefix("/sessions/")?.strip_suffix("/events")?;
    if id.is_empty() || id.contains('/') {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        headers.append(name, value);
    }
    // An upgrade (WebSocket) or a request with a body is not a stream open.
    if headers.contains_key(header::UPGRADE)
        || headers.contains_key(header::CONTENT_LENGTH)
        || headers.contains_key(header::TRANSFER_ENCODING)
    {
        return None;
    }
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(target)
        .body(Body::empty())
        .ok()?;
    *req.headers_mut() = headers;
    req.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
    Some(req)
}

/// Reads (and drops) the request head that was peeked.
async fn consume(io: &mut StallGuard, head_len: usize) -> io::Result<()> {
    let mut head = vec![0u8; head_len];
    tokio::io::AsyncReadExt::read_exact(io, &mut head)
        .await
        .map(drop)
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
    head.extend_from_slice(b"connection: close\r\n");
    (head, streaming, body)
}

/// A whole (error) response: buffered, with its length.
async fn write_whole(io: &mut StallGuard, mut head: Vec<u8>, body: Body) -> io::Result<()> {
    let bytes = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .map_err(io::Error::other)?;
    head.extend_from_slice(format!("content-length: {}\r\n\r\n", bytes.len()).as_bytes());
    head.extend_from_slice(&bytes);
    io.write_all(&head).await
}

enum Next {
    Frame(Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>),
    Readable(io::Result<()>),
}

/// An event stream: the head, then each frame as the body yields it, until
/// the body ends or the client goes away.
async fn pump(io: &mut StallGuard, mut head: Vec<u8>, mut body: Body) -> io::Result<()> {
    head.extend_from_slice(b"\r\n");
    io.write_all(&head).await?;
    drop(head);
    let mut scratch = [0u8; 16];
    loop {
        // One poll for both sources, without a readiness future per frame:
        // the body first (events), then the socket (the client closing).
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                return Poll::Ready(Next::Frame(frame));
            }
            match io.tcp().poll_read_ready(cx) {
                Poll::Ready(ready) => Poll::Ready(Next::Readable(ready)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match next {
            Next::Frame(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    io.write_all(&data).await?;
                }
            }
            Next::Frame(Some(Err(e))) => return Err(io::Error::other(e)),
            Next::Frame(None) => return Ok(()),
            // The client closed (or reset) its side: nothing to send to.
            // Anything else it sends on a stream is ignored.
            Next::Readable(ready) => {
                ready?;
                match io.tcp().try_read(&mut scratch) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}
