//! Connections with a write-stall timeout, and the peer address routes
//! read.
//!
//! A client that stops reading a stream (a frozen tab, a dead network path
//! without a reset) fills its socket buffers; the server's writes then never
//! complete, hyper stops polling the stream body, and the stream could sit
//! there for good. Lagging behind the queue (`SSE_CLIENT_QUEUE`) would cut
//! it, but that is only noticed when the body is polled again. So the
//! connection itself fails a write that has been pending for longer than
//! the limit (`SSE_WRITE_TIMEOUT_SECS` in the reference server): hyper closes it, the stream and its
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

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// The peer address of a connection, in the request's extensions as
/// `ConnectInfo<PeerAddr>` (set by the accept loop).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// A TCP stream whose writes fail with `TimedOut` once one has been pending
/// for longer than the limit.
///
/// The socket is shared (`Arc`): a stream's writer may hand it to the
/// connection map, whose deliveries then write frames into it directly
/// (see [`crate::sink`]). Reads and writes here go through the socket's
/// readiness, which works on a shared socket.
pub struct StallGuard {
    io: Arc<TcpStream>,
    limit: Duration,
    /// Armed while a write is pending; dropped as soon as one succeeds, so
    /// an idle or healthy connection carries no timer.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: Arc<AtomicU64>,
}

impl StallGuard {
    /// `stalled` counts connections closed because a write stalled.
    pub fn new(io: TcpStream, limit: Duration, stalled: Arc<AtomicU64>) -> Self {
        Self {
            io: Arc::new(io),
            limit,
            stall: None,
            stalled,
        }
    }

    /// The socket, to wait for the client's side to close.
    pub fn tcp(&self) -> &TcpStream {
        &self.io
    }

    /// The socket, shared: for a writer that also lets others write into it
    /// (they must keep to its order; see [`crate::sink`]).
    pub fn shared(&self) -> Arc<TcpStream> {
        self.io.clone()
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

impl StallGuard {
    /// Reads into `buf`'s spare capacity (a `Vec<u8>` grows into it without
    /// zeroing it first); `Ok(0)` at the end of the stream.
    pub fn poll_read_buf(
        &self,
        cx: &mut Context<'_>,
        buf: &mut impl bytes::BufMut,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.io.poll_read_ready(cx))?;
            // A read shorter than the room it had drained the socket: the
            // readiness is cleared then as well, as tokio's own `poll_read`
            // does on epoll, not only on WouldBlock. Without that, every
            // request cost one more `recvfrom` that only said EAGAIN. The
            // read runs inside `try_io`, so what is cleared is the readiness
            // seen before it: data arriving after the read is not missed.
            let room = buf.chunk_mut().len();
            let mut read = None;
            let res = self.io.try_io(Interest::READABLE, || {
                let n = self.io.try_read_buf(buf)?;
                read = Some(n);
                if 0 < n && n < room {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
            match (read, res) {
                (Some(n), _) => return Poll::Ready(Ok(n)),
                (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                (None, res) => return Poll::Ready(res),
            }
        }
    }
}

impl AsyncRead for StallGuard {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_read_buf(cx, buf).map_ok(|_| ())
    }
}

/// One write attempt on readiness, as tokio's own `poll_write` does.
fn poll_write_with(
    io: &TcpStream,
    cx: &mut Context<'_>,
    mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(io.poll_write_ready(cx))?;
        match write(io) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            res => return Poll::Ready(res),
        }
    }
}

impl AsyncWrite for StallGuard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = poll_write_with(&self.io, cx, |io| io.try_write(buf));
        self.check(cx, res)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = poll_write_with(&self.io, cx, |io| io.try_write_vectored(bufs));
        self.check(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP writes are not buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.io).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A read that leaves room in the buffer drained the socket, so the
    /// next read waits for the socket instead of asking it again (one
    /// `recvfrom` per request saved); data that comes later still wakes it.
    #[tokio::test]
    async fn a_short_read_clears_the_readiness_and_later_data_still_wakes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let guard = StallGuard::new(server, Duration::from_secs(5), Arc::default());
        let mut buf = Vec::with_capacity(64);

        client.write_all(b"hello").await.unwrap();
        let n = std::future::poll_fn(|cx| guard.poll_read_buf(cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(n, 5);
        let ready_again =
            std::future::poll_fn(|cx| Poll::Ready(guard.tcp().poll_read_ready(cx).is_ready()))
                .await;
        assert!(!ready_again, "a short read left the socket marked readable");

        client.write_all(b" world").await.unwrap();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| guard.poll_read_buf(cx, &mut buf)),
        )
        .await
        .expect("data sent after the short read woke the reader")
        .unwrap();
        assert_eq!(read, 6);
        assert_eq!(buf, b"hello world");
    }
}
