//! [`Socket`]: a connection's TCP socket, shared between the connection's
//! reader and writer (hyper, or the stream writer) and, for an event
//! stream, the connection map's deliveries ([`DirectWrite`]), which write
//! frames into it from their own task. Reads and writes go through the
//! socket's readiness, which works on a shared socket.
//!
//! Two departures from tokio's own `TcpStream` I/O, each measured
//! (docs/benchmarks.md):
//! - a read shorter than its room clears the readiness (see
//!   [`Socket::poll_read_buf`]);
//! - a direct write is the socket's own `send`, not tokio's `try_write`,
//!   which first reads the readiness tokio keeps for the socket: a cache
//!   line of its own per stream and the largest part of a direct write's
//!   user-space time. A full socket is seen by the writer's next awaited
//!   write, which tokio then waits for as usual.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sse_scale::sink::DirectWrite;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::admission::Ticket;

/// See the module docs.
#[derive(Clone)]
pub struct Socket(Arc<Held>);

/// The socket, and the connection's place among the instance's
/// connections (`admission.rs`), given back when the socket closes: a
/// stream parked without a task still counts.
struct Held {
    tcp: TcpStream,
    _admitted: Option<Ticket>,
}

/// A connection as it is served: its socket, with the write-stall cut-off.
pub(crate) type Guarded = sse_scale::StallGuard<Socket>;

impl Socket {
    pub fn new(tcp: TcpStream, admitted: Option<Ticket>) -> Self {
        Self(Arc::new(Held {
            tcp,
            _admitted: admitted,
        }))
    }

    /// The socket, to wait for the client's side to close.
    pub fn tcp(&self) -> &TcpStream {
        &self.0.tcp
    }

    /// Reads into `buf`'s spare capacity (a `Vec<u8>` grows into it without
    /// zeroing it first); `Ok(0)` at the end of the stream.
    pub fn poll_read_buf(
        &self,
        cx: &mut Context<'_>,
        buf: &mut impl bytes::BufMut,
    ) -> Poll<io::Result<usize>> {
        let io = &self.0.tcp;
        loop {
            std::task::ready!(io.poll_read_ready(cx))?;
            // A read shorter than the room it had drained the socket: the
            // readiness is cleared then as well, as tokio's own `poll_read`
            // does on epoll, not only on WouldBlock. Without that, every
            // request cost one more `recvfrom` that only said EAGAIN. The
            // read runs inside `try_io`, so what is cleared is the readiness
            // seen before it: data arriving after the read is not missed.
            let room = buf.chunk_mut().len();
            let mut read = None;
            let res = io.try_io(Interest::READABLE, || {
                let n = io.try_read_buf(buf)?;
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

impl DirectWrite for Socket {
    fn write_now(&self, bytes: &[u8]) -> io::Result<usize> {
        socket2::SockRef::from(&self.0.tcp).send(bytes)
    }
}

impl AsyncRead for Socket {
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

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_write_with(&self.0.tcp, cx, |io| io.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        poll_write_with(&self.0.tcp, cx, |io| io.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP writes are not buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&self.0.tcp).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (Socket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Socket::new(server, None), client)
    }

    /// A read that leaves room in the buffer drained the socket, so the
    /// next read waits for the socket instead of asking it again (one
    /// `recvfrom` per request saved); data that comes later still wakes it.
    #[tokio::test]
    async fn a_short_read_clears_the_readiness_and_later_data_still_wakes() {
        let (socket, mut client) = pair().await;
        let mut buf = Vec::with_capacity(64);

        client.write_all(b"hello").await.unwrap();
        let n = std::future::poll_fn(|cx| socket.poll_read_buf(cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(n, 5);
        let ready_again =
            std::future::poll_fn(|cx| Poll::Ready(socket.tcp().poll_read_ready(cx).is_ready()))
                .await;
        assert!(!ready_again, "a short read left the socket marked readable");

        client.write_all(b" world").await.unwrap();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| socket.poll_read_buf(cx, &mut buf)),
        )
        .await
        .expect("data sent after the short read woke the reader")
        .unwrap();
        assert_eq!(read, 6);
        assert_eq!(buf, b"hello world");
    }

    /// A direct write takes what the socket has room for and says
    /// `WouldBlock` when it has none; awaited writes on the same socket
    /// still wait for room and keep their order behind it.
    #[tokio::test]
    async fn a_direct_write_never_waits_and_awaited_writes_follow_it() {
        let (socket, mut client) = pair().await;
        socket2::SockRef::from(socket.tcp())
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(16 * 1024)
            .unwrap();
        let big = vec![b'a'; 4 * 1024 * 1024];
        let mut direct = 0;
        loop {
            match socket.write_now(&big[direct..]) {
                Ok(n) => direct += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    break;
                }
            }
        }
        assert!(0 < direct && direct < big.len(), "{direct}");
        let mut writer = socket.clone();
        let tail = tokio::spawn(async move { writer.write_all(b"bz").await });
        let mut got = Vec::new();
        while !got.ends_with(b"bz") {
            let mut buf = [0u8; 64 * 1024];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        tail.await.unwrap().unwrap();
        assert_eq!(got.len(), direct + 2);
        assert!(got[..direct].iter().all(|&b| b == b'a'));
    }
}
