//! The server's TCP listener: every accepted connection gets a write-stall
//! timeout.
//!
//! A client that stops reading a stream (a frozen tab, a dead network path
//! without a reset) fills its socket buffers; the server's writes then never
//! complete, hyper stops polling the stream body, and the stream could sit
//! there for good. Lagging behind the queue (`SSE_CLIENT_QUEUE`) would cut
//! it, but that is only noticed when the body is polled again. So the
//! connection itself fails a write that has been pending for longer than
//! `SSE_WRITE_TIMEOUT_SECS`: hyper closes it, the stream and its
//! subscription are dropped, and memory is released. The client resumes by
//! `Last-Event-ID` when it comes back.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// A [`TcpListener`] whose connections fail stalled writes. See the module
/// docs.
pub struct GuardedListener {
    inner: TcpListener,
    write_timeout: Duration,
    stalled: Arc<AtomicU64>,
}

impl GuardedListener {
    /// `stalled` counts connections closed because a write stalled.
    pub fn new(inner: TcpListener, write_timeout: Duration, stalled: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            write_timeout,
            stalled,
        }
    }
}

impl Listener for GuardedListener {
    type Io = StallGuard;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = Listener::accept(&mut self.inner).await;
        // Events are small writes that must leave at once.
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let guard = StallGuard {
            io,
            limit: self.write_timeout,
            stall: None,
            stalled: self.stalled.clone(),
        };
        (guard, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The peer address of a connection accepted by [`GuardedListener`]
/// (axum's `ConnectInfo<SocketAddr>` only knows its own listener types).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, GuardedListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, GuardedListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// A TCP stream whose writes fail with `TimedOut` once one has been pending
/// for longer than the limit.
pub struct StallGuard {
    io: TcpStream,
    limit: Duration,
    /// Armed while a write is pending; dropped as soon as one succeeds, so
    /// an idle or healthy connection carries no timer.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: Arc<AtomicU64>,
}

impl StallGuard {
    fn check<T>(&mut self, cx: &mut Context<'_>, res: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match res {
            Poll::Pending => {
                let limit = self.limit;
                let stall = self
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if stall.as_mut().poll(cx).is_ready() {
                    self.stall = None;
                    self.stalled.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        limit_secs = limit.as_secs_f64(),
                        "connection closed: the client stopped reading"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "write stalled: the client stopped reading",
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.stall = None;
                ready
            }
        }
    }
}

impl AsyncRead for StallGuard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, res)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, res)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
