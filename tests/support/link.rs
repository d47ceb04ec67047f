//! A TCP link between a process and a server that a test can cut and
//! restore, as a network partition between the two does: while cut, no
//! byte crosses in either direction, on open connections or new ones, and
//! nothing is reset — the peers see silence and their own timeouts decide.
//! Restored, what was held flows again (TCP would retransmit it). It can
//! also add latency: every byte arrives that much later, in order, at the
//! rate it was sent. The process connects to [`Link::port`] instead of the
//! server.

#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub struct Link {
    /// Where the process connects.
    pub port: u16,
    open: watch::Sender<bool>,
    delay: watch::Sender<Duration>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// A link to `127.0.0.1:<target>`, open.
    pub async fn start(target: u16) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a link");
        let port = listener.local_addr().unwrap().port();
        let (open, _) = watch::channel(true);
        let (delay, _) = watch::channel(Duration::ZERO);
        let (gate, lag) = (open.clone(), delay.clone());
        let task = tokio::spawn(async move {
            while let Ok((from, _)) = listener.accept().await {
                let gate = gate.subscribe();
                let lag = lag.subscribe();
                tokio::spawn(async move {
                    // The connection to the server is made once the link
                    // is open, as a SYN would get through only then.
                    let mut until_open = gate.clone();
                    if until_open.wait_for(|o| *o).await.is_err() {
                        return;
                    }
                    let Ok(to) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let (from_r, from_w) = from.into_split();
                    let (to_r, to_w) = to.into_split();
                    tokio::join!(
                        pump(from_r, to_w, gate.clone(), lag.clone()),
                        pump(to_r, from_w, gate, lag)
                    );
                });
            }
        });
        Link {
            port,
            open,
            delay,
            task,
        }
    }

    /// Stops every byte, both ways, until [`Link::restore`].
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn restore(&self) {
        self.open.send_replace(true);
    }

    /// Every byte read from now on is passed on `delay` later (zero: at
    /// once).
    pub fn set_delay(&self, delay: Duration) {
        self.delay.send_replace(delay);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `r` to `w` while the link is open; holds what it read while it
/// is cut, and passes each chunk on its delay after it was read. Ends when
/// either side closes.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    open: watch::Receiver<bool>,
    delay: watch::Receiver<Duration>,
) {
    // Bounded: a reader far ahead of a slow link waits, as TCP's window
    // would make the sender wait.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let mut read_gate = open.clone();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if read_gate.wait_for(|o| *o).await.is_err() {
                return;
            }
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = Instant::now() + *delay.borrow();
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let mut write_gate = open;
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if write_gate.wait_for(|o| *o).await.is_err() {
                return;
            }
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[tokio::test]
async fn a_cut_link_holds_bytes_both_ways_until_restored() {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = server.local_addr().unwrap().port();
    let link = Link::start(target).await;
    let mut client = TcpStream::connect(("127.0.0.1", link.port)).await.unwrap();
    let (mut far, _) = server.accept().await.unwrap();
    client.write_all(b"a").await.unwrap();
    let mut one = [0u8; 1];
    far.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"a");

    link.cut();
    client.write_all(b"b").await.unwrap();
    far.write_all(b"c").await.unwrap();
    let quiet = Duration::from_millis(300);
    assert!(tokio::time::timeout(quiet, far.read_exact(&mut one))
        .await
        .is_err());
    assert!(tokio::time::timeout(quiet, client.read_exact(&mut one))
        .await
        .is_err());
    // A new connection made while cut reaches nothing either.
    let mut late = TcpStream::connect(("127.0.0.1", link.port)).await.unwrap();
    assert!(tokio::time::timeout(quiet, server.accept()).await.is_err());

    link.restore();
    let held = Duration::from_secs(5);
    tokio::time::timeout(held, far.read_exact(&mut one))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&one, b"b");
    tokio::time::timeout(held, client.read_exact(&mut one))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&one, b"c");
    let (mut late_far, _) = tokio::time::timeout(held, server.accept())
        .await
        .unwrap()
        .unwrap();
    late.write_all(b"d").await.unwrap();
    late_far.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"d");

    // Latency: in order, each chunk its delay after it was sent.
    link.set_delay(Duration::from_millis(300));
    let sent = Instant::now();
    client.write_all(b"e").await.unwrap();
    client.write_all(b"f").await.unwrap();
    let mut two = [0u8; 2];
    far.read_exact(&mut two).await.unwrap();
    assert_eq!(&two, b"ef");
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "{:?}",
        sent.elapsed()
    );
    link.set_delay(Duration::ZERO);
    let sent = Instant::now();
    far.write_all(b"g").await.unwrap();
    client.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"g");
    assert!(
        sent.elapsed() < Duration::from_millis(300),
        "{:?}",
        sent.elapsed()
    );
}
