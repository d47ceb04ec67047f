//! Connections with a write-stall timeout.
//!
//! A client that stops reading a stream (a frozen tab, a dead network path
//! without a reset) fills its socket buffers; the server's writes then never
//! complete, hyper stops polling the stream body, and the stream could sit
//! there for good. Lagging behind the queue (`SSE_CLIENT_QUEUE`) would cut
//! it, but that is only noticed when the body is polled again. So the
//! connection itself fails a write that has been pending for longer than
//! the limit (`SSE_WRITE_TIMEOUT_SECS` in the reference server): hyper
//! closes it, the stream and its subscription are dropped, and memory is
//! released. The client resumes by `Last-Event-ID` when it comes back.
//!
//! [`StallGuard`] wraps any connection (`AsyncRead + AsyncWrite`); the
//! library never touches a socket itself.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A connection whose writes fail with `TimedOut` once one has been
/// pending for longer than the limit. Reads pass through.
pub struct StallGuard<IO> {
    io: IO,
    limit: Duration,
    /// Armed while a write is pending; dropped as soon as one succeeds, so
    /// an idle or healthy connection carries no timer.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: Arc<AtomicU64>,
}

impl<IO> StallGuard<IO> {
    /// `stalled` counts connections closed because a write stalled.
    pub fn new(io: IO, limit: Duration, stalled: Arc<AtomicU64>) -> Self {
        Self {
            io,
            limit,
            stall: None,
            stalled,
        }
    }

    /// The connection it wraps.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

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

impl<IO: AsyncRead + Unpin> AsyncRead for StallGuard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for StallGuard<IO> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A write the peer never takes fails after the limit, and is counted;
    /// one that goes through disarms the timer.
    #[tokio::test]
    async fn a_write_pending_past_the_limit_fails_and_is_counted() {
        let (near, _far) = tokio::io::duplex(8);
        let stalled = Arc::new(AtomicU64::new(0));
        let mut guard = StallGuard::new(near, Duration::from_millis(200), stalled.clone());
        guard.write_all(b"12345678").await.unwrap();
        let started = tokio::time::Instant::now();
        let err = guard.write_all(b"9").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(stalled.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_write_that_completes_in_time_is_not_cut() {
        use tokio::io::AsyncReadExt;
        let (near, mut far) = tokio::io::duplex(8);
        let stalled = Arc::new(AtomicU64::new(0));
        let mut guard = StallGuard::new(near, Duration::from_millis(400), stalled.clone());
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 8];
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let n = far.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        // Each write waits about 100 ms for the reader: never 400 ms at once.
        guard.write_all(&[7u8; 32]).await.unwrap();
        assert_eq!(reader.await.unwrap(), vec![7u8; 32]);
        assert_eq!(stalled.load(Ordering::Relaxed), 0);
    }
}
