//! The subscriber's connection, over either kind of Pub/Sub: classic
//! channels on one server (or the primary Sentinel names), or sharded
//! channels in a cluster (`SSUBSCRIBE`, each session's channel on the node
//! that owns its slot; the broadcast channel stays classic, on a connection
//! of its own to any node, which a cluster
//! forwards to every node). The subscriber sees the same three operations
//! on both and never asks which it has.
//!
//! What arrives waits in a bounded buffer until the subscriber reads it: it
//! stops reading while it subscribes channels and catches sessions up from
//! their streams. A buffer that fills ends the connection rather than
//! dropping messages and going on: the subscriber then reconnects and
//! catches every session up from its cursor, so a slow catch-up costs a
//! reconnect, never an event, and never unbounded memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, RedisResult, Value};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{self, unbounded_channel, UnboundedReceiver};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::AbortOnDropHandle;

use crate::redis_client::{SharedRedis, CONNECT_TIMEOUT};

/// What arrives on the connection.
pub(super) enum Incoming {
    /// A message on a subscribed channel.
    Message(redis::Msg),
    /// Redis ended this channel's subscription by itself: in a cluster, its
    /// slot moved to another node or its node was demoted in a failover.
    /// Subscribing it again reaches the new owner; what was published
    /// meanwhile is in the session's history.
    Dropped(String),
}

impl Incoming {
    /// What it holds in the buffer, as counted against [`BUFFER_BYTES`].
    fn size(&self) -> usize {
        match self {
            Incoming::Message(msg) => msg.get_channel_name().len() + msg.get_payload_bytes().len(),
            Incoming::Dropped(channel) => channel.len(),
        }
    }
}

pub(super) struct PubSubConn {
    commands: Commands,
    inbox: Inbox,
}

/// The half that subscribes and unsubscribes; what arrives goes to the
/// [`Inbox`].
enum Commands {
    Classic {
        sink: PubSubSink,
    },
    Sharded {
        conn: ClusterConnection,
        broadcast: String,
        /// The broadcast channel on a classic connection of its own: on the
        /// cluster connection the client would subscribe it again after
        /// every slot-map change, possibly on a second node, and each
        /// announcement would then arrive twice.
        classic_sink: PubSubSink,
    },
}

/// How many `SSUBSCRIBE`s are in flight at once when a cluster connection
/// subscribes many sessions (one per channel: a command may not span slots).
const PARALLEL_SUBSCRIBES: usize = 64;

/// Messages held for the subscriber while it is not reading (subscribing
/// channels, catching sessions up). Past this, or [`BUFFER_BYTES`], the
/// connection ends and every session is caught up from its stream instead.
/// Several seconds of a busy instance's traffic: more than one catch-up
/// round takes (its reads are bounded by the response timeout), since an
/// overflow forces a full catch-up of every session, and a bound that
/// ordinary catch-ups reach would make them follow each other.
const BUFFER_MESSAGES: usize = 16_384;

/// Channel and payload bytes held for the subscriber. An event may carry up
/// to 64 KiB (`MAX_EVENT_BYTES`), so the message count alone would let the
/// buffer reach a gigabyte.
const BUFFER_BYTES: usize = 32 << 20;

/// Connections ended because their buffer filled, since the process
/// started.
static OVERFLOWS: AtomicU64 = AtomicU64::new(0);

/// Subscriber connections ended because their buffer filled, since the
/// process started (its every broker together: one in practice).
pub(super) fn overflows() -> u64 {
    OVERFLOWS.load(Ordering::Relaxed)
}

impl PubSubConn {
    /// Opens the connection the topology calls for.
    pub(super) async fn open(redis: &SharedRedis, broadcast: &str) -> Result<Self, String> {
        // The client takes an unbounded sender for its pushes; the inbox's
        // task empties it as they come, into the bounded buffer.
        let (tx, pushes) = unbounded_channel();
        let sharded = tokio::time::timeout(CONNECT_TIMEOUT * 3, redis.sharded_pubsub(tx))
            .await
            .map_err(|_| "connect timed out".to_owned())?;
        if let Some(conn) = sharded {
            let conn = conn.map_err(|e| e.to_string())?;
            let classic = tokio::time::timeout(CONNECT_TIMEOUT * 3, redis.pubsub())
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            let (classic_sink, classic) = classic.split();
            return Ok(PubSubConn {
                commands: Commands::Sharded {
                    conn,
                    broadcast: broadcast.to_owned(),
                    classic_sink,
                },
                inbox: Inbox::spawn(sharded_incoming(pushes, classic)),
            });
        }
        let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, redis.pubsub())
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let (sink, stream) = pubsub.split();
        Ok(PubSubConn {
            commands: Commands::Classic { sink },
            inbox: Inbox::spawn(stream.map(Incoming::Message)),
        })
    }

    /// Subscribes the channels; returns once Redis confirmed them all.
    pub(super) async fn subscribe(&mut self, channels: &[String]) -> RedisResult<()> {
        self.inbox.check_open()?;
        match &mut self.commands {
            Commands::Classic { sink } => sink.subscribe(channels).await,
            Commands::Sharded {
                conn,
                broadcast,
                classic_sink,
            } => {
                if channels.contains(broadcast) {
                    classic_sink.subscribe(broadcast.as_str()).await?;
                }
                let jobs: Vec<_> = channels
                    .iter()
                    .filter(|channel| *channel != broadcast)
                    .map(|channel| (conn.clone(), channel.clone()))
                    .collect();
                let results: Vec<RedisResult<()>> = futures::stream::iter(jobs)
                    .map(|(mut conn, channel)| async move { conn.ssubscribe(channel).await })
                    .buffer_unordered(PARALLEL_SUBSCRIBES)
                    .collect()
                    .await;
                results.into_iter().collect()
            }
        }
    }

    pub(super) async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        self.inbox.check_open()?;
        match &mut self.commands {
            Commands::Classic { sink } => sink.unsubscribe(channel).await,
            Commands::Sharded { conn, .. } => conn.sunsubscribe(channel).await,
        }
    }

    /// The next message or dropped subscription; `None` when the
    /// connection (in a cluster: any of its node connections) was lost or
    /// its buffer filled, so the subscriber opens a new one and catches up
    /// every session. Cancel safe.
    pub(super) async fn next(&mut self) -> Option<Incoming> {
        self.inbox.next().await
    }
}

/// What arrives on a cluster connection: shard messages and subscription
/// changes from its pushes, broadcasts from the classic connection beside
/// it. Ends when either connection is lost.
fn sharded_incoming(
    pushes: UnboundedReceiver<PushInfo>,
    classic: PubSubStream,
) -> impl Stream<Item = Incoming> + Send + Unpin + 'static {
    Box::pin(futures::stream::unfold(
        (pushes, classic),
        |(mut pushes, mut classic)| async move {
            let incoming = next_sharded(&mut pushes, &mut classic).await?;
            Some((incoming, (pushes, classic)))
        },
    ))
}

async fn next_sharded(
    pushes: &mut UnboundedReceiver<PushInfo>,
    classic: &mut PubSubStream,
) -> Option<Incoming> {
    loop {
        let push = tokio::select! {
            msg = classic.next() => return msg.map(Incoming::Message),
            push = pushes.recv() => push?,
        };
        match push.kind {
            PushKind::SMessage => {
                if let Some(msg) = redis::Msg::from_push_info(push) {
                    return Some(Incoming::Message(msg));
                }
            }
            PushKind::SUnsubscribe => {
                if let Some(Value::BulkString(name)) = push.data.first() {
                    return Some(Incoming::Dropped(
                        String::from_utf8_lossy(name).into_owned(),
                    ));
                }
            }
            PushKind::Disconnection => return None,
            // Confirmations (also of the client's own resubscribes after
            // it reconnected a node) carry nothing to deliver.
            _ => {}
        }
    }
}

/// The bounded buffer between a connection and the subscriber. A task
/// moves what arrives into it as it comes, so nothing piles up in the
/// client's own (unbounded) channels while the subscriber is not reading;
/// it stops, and with it the connection, at the end of what arrives or
/// when the buffer is full.
struct Inbox {
    buffered: mpsc::Receiver<Buffered>,
    /// Holds the connection's stream: dropping it closes the connection.
    _forward: AbortOnDropHandle<Forwarded>,
}

struct Buffered {
    incoming: Incoming,
    /// Its share of [`BUFFER_BYTES`], returned when it is read.
    _bytes: OwnedSemaphorePermit,
}

/// Why the task that fills an [`Inbox`] stopped.
#[derive(Debug, PartialEq, Eq)]
enum Forwarded {
    /// The connection ended (or the subscriber dropped it).
    Ended,
    /// The buffer was full.
    Overflow,
}

impl Inbox {
    fn spawn(incoming: impl Stream<Item = Incoming> + Send + Unpin + 'static) -> Self {
        let (tx, buffered) = mpsc::channel(BUFFER_MESSAGES);
        Self {
            buffered,
            _forward: AbortOnDropHandle::new(tokio::spawn(forward(incoming, tx, BUFFER_BYTES))),
        }
    }

    /// What was buffered before the connection ended is still delivered:
    /// it comes before anything the next connection's catch-up reads.
    async fn next(&mut self) -> Option<Incoming> {
        self.buffered.recv().await.map(|b| b.incoming)
    }

    /// Fails once nothing more can arrive: subscribing on such a connection
    /// would confirm channels whose messages never come.
    fn check_open(&self) -> RedisResult<()> {
        if self.buffered.is_closed() {
            Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "the subscriber connection ended",
            )))
        } else {
            Ok(())
        }
    }
}

/// Moves `incoming` into the buffer (`tx`, at most `budget` bytes) without
/// waiting for room: waiting would leave messages in the client's unbounded
/// channels instead. A full buffer is counted and logged, and ends the
/// forwarding.
async fn forward(
    mut incoming: impl Stream<Item = Incoming> + Unpin,
    tx: mpsc::Sender<Buffered>,
    budget: usize,
) -> Forwarded {
    let bytes = Arc::new(Semaphore::new(budget));
    while let Some(next) = incoming.next().await {
        let slot = match tx.try_reserve() {
            Ok(slot) => slot,
            Err(TrySendError::Closed(())) => return Forwarded::Ended,
            Err(TrySendError::Full(())) => return overflow(&tx, budget, &bytes),
        };
        // A single message larger than the budget takes all of it, so it
        // passes once the buffer is empty rather than never.
        let size = u32::try_from(next.size().min(budget)).unwrap_or(u32::MAX);
        let Ok(permit) = bytes.clone().try_acquire_many_owned(size) else {
            return overflow(&tx, budget, &bytes);
        };
        slot.send(Buffered {
            incoming: next,
            _bytes: permit,
        });
    }
    Forwarded::Ended
}

fn overflow(tx: &mpsc::Sender<Buffered>, budget: usize, bytes: &Semaphore) -> Forwarded {
    let total = OVERFLOWS.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::warn!(
        backend = "redis",
        buffered = tx.max_capacity() - tx.capacity(),
        buffered_bytes = budget.saturating_sub(bytes.available_permits()),
        overflows = total,
        "subscriber fell too far behind its connection; reconnecting to catch up from the streams"
    );
    Forwarded::Overflow
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn message(channel: &str, payload: &[u8]) -> Incoming {
        let msg = redis::Msg::from_push_info(PushInfo {
            kind: PushKind::Message,
            data: vec![
                Value::BulkString(channel.as_bytes().to_vec()),
                Value::BulkString(payload.to_vec()),
            ],
        })
        .expect("a message push");
        Incoming::Message(msg)
    }

    fn payload(incoming: Incoming) -> Vec<u8> {
        match incoming {
            Incoming::Message(msg) => msg.get_payload_bytes().to_vec(),
            Incoming::Dropped(channel) => panic!("unexpected drop of {channel}"),
        }
    }

    #[tokio::test]
    async fn a_full_buffer_ends_the_stream_after_what_it_holds() {
        let before = OVERFLOWS.load(Ordering::Relaxed);
        let incoming = futures::stream::iter((0..10u8).map(|n| message("c", &[n])));
        let (tx, mut rx) = mpsc::channel(4);
        // Nobody reads while the messages arrive.
        assert_eq!(forward(incoming, tx, 1 << 20).await, Forwarded::Overflow);
        let held: Vec<Vec<u8>> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|b| payload(b.incoming))
            .collect();
        // The oldest, in order, and then the end: no gap before the end,
        // so the reconnect's catch-up starts right after the last one.
        assert_eq!(held, vec![vec![0], vec![1], vec![2], vec![3]]);
        assert!(rx.recv().await.is_none());
        assert!(OVERFLOWS.load(Ordering::Relaxed) > before);
    }

    #[tokio::test]
    async fn the_byte_budget_bounds_the_buffer_too() {
        let incoming = futures::stream::iter((0..10u8).map(|n| message("c", &[n; 39])));
        let (tx, mut rx) = mpsc::channel(100);
        // 40 bytes a message (channel and payload): two fit in 100.
        assert_eq!(forward(incoming, tx, 100).await, Forwarded::Overflow);
        let held = std::iter::from_fn(|| rx.try_recv().ok()).count();
        assert_eq!(held, 2);
    }

    #[tokio::test]
    async fn a_message_larger_than_the_budget_passes_an_empty_buffer() {
        let incoming = futures::stream::iter([message("c", &[1; 500])]);
        let (tx, mut rx) = mpsc::channel(4);
        assert_eq!(forward(incoming, tx, 100).await, Forwarded::Ended);
        assert_eq!(payload(rx.recv().await.unwrap().incoming).len(), 500);
    }

    #[tokio::test]
    async fn a_reader_that_keeps_up_never_overflows() {
        let (source, feed) = mpsc::unbounded_channel();
        let incoming = tokio_stream::wrappers::UnboundedReceiverStream::new(feed);
        let (tx, mut rx) = mpsc::channel(2);
        // Two messages' worth of bytes and slots: reading returns both.
        let task = tokio::spawn(forward(incoming, tx, 80));
        for n in 0..100u8 {
            source.send(message("c", &[n; 39])).unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("forwarded")
                .expect("not ended");
            assert_eq!(payload(got.incoming)[0], n);
        }
        drop(source);
        assert_eq!(task.await.unwrap(), Forwarded::Ended);
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn an_ended_connection_refuses_commands_once_drained() {
        let mut inbox = Inbox::spawn(futures::stream::iter([
            message("c", b"a"),
            Incoming::Dropped("d".into()),
        ]));
        assert_eq!(payload(inbox.next().await.unwrap()), b"a");
        assert!(matches!(inbox.next().await, Some(Incoming::Dropped(c)) if c == "d"));
        assert!(inbox.next().await.is_none());
        assert!(inbox.check_open().is_err());
    }

    #[tokio::test]
    async fn an_open_connection_accepts_commands() {
        let inbox = Inbox::spawn(futures::stream::pending());
        tokio::task::yield_now().await;
        assert!(inbox.check_open().is_ok());
    }
}
