//! The subscriber's connection, over either kind of Pub/Sub: classic
//! channels on one server (or the primary Sentinel names), or sharded
//! channels in a cluster (`SSUBSCRIBE`, each session's channel on the node
//! that owns its slot; the broadcast channel stays classic, on a connection
//! of its own to any node, which a cluster
//! forwards to every node). The subscriber sees the same three operations
//! on both and never asks which it has.

use futures::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, RedisResult, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

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

pub(super) enum PubSubConn {
    Classic {
        sink: PubSubSink,
        stream: PubSubStream,
    },
    Sharded {
        conn: ClusterConnection,
        pushes: UnboundedReceiver<PushInfo>,
        broadcast: String,
        /// The broadcast channel on a classic connection of its own: on the
        /// cluster connection the client would subscribe it again after
        /// every slot-map change, possibly on a second node, and each
        /// announcement would then arrive twice.
        classic_sink: PubSubSink,
        classic: PubSubStream,
    },
}

/// How many `SSUBSCRIBE`s are in flight at once when a cluster connection
/// subscribes many sessions (one per channel: a command may not span slots).
const PARALLEL_SUBSCRIBES: usize = 64;

impl PubSubConn {
    /// Opens the connection the topology calls for.
    pub(super) async fn open(redis: &SharedRedis, broadcast: &str) -> Result<Self, String> {
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
            return Ok(PubSubConn::Sharded {
                conn,
                pushes,
                broadcast: broadcast.to_owned(),
                classic_sink,
                classic,
            });
        }
        let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, redis.pubsub())
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let (sink, stream) = pubsub.split();
        Ok(PubSubConn::Classic { sink, stream })
    }

    /// Subscribes the channels; returns once Redis confirmed them all.
    pub(super) async fn subscribe(&mut self, channels: &[String]) -> RedisResult<()> {
        match self {
            PubSubConn::Classic { sink, .. } => sink.subscribe(channels).await,
            PubSubConn::Sharded {
                conn,
                broadcast,
                classic_sink,
                ..
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
        match self {
            PubSubConn::Classic { sink, .. } => sink.unsubscribe(channel).await,
            PubSubConn::Sharded { conn, .. } => conn.sunsubscribe(channel).await,
        }
    }

    /// The next message or dropped subscription; `None` when the
    /// connection (in a cluster: any of its node connections) was lost, so
    /// the subscriber opens a new one and catches up every session.
    pub(super) async fn next(&mut self) -> Option<Incoming> {
        match self {
            PubSubConn::Classic { stream, .. } => stream.next().await.map(Incoming::Message),
            PubSubConn::Sharded {
                pushes, classic, ..
            } => loop {
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
                    // Confirmations (also of the client's own resubscribes
                    // after it reconnected a node) carry nothing to deliver.
                    _ => {}
                }
            },
        }
    }
}
