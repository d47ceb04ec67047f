//! [`ControlBus`]: small messages between instances — "whoever runs
//! pipeline X, apply this gate answer" — apart from session events.
//!
//! Every message reaches every instance (the sender included); the one that
//! owns the thing answers. [`LoopbackBus`] is the bus of a single instance;
//! [`RedisControlBus`] (feature `redis`) carries messages on the
//! `<prefix>control` channel over its own Pub/Sub connection, so control
//! traffic never waits behind session events.

use std::sync::Mutex;

use bytes::Bytes;
use futures::future::{self, BoxFuture, FutureExt};
use tokio::sync::mpsc;

/// Messages waiting for the application; more are dropped (counted).
pub const CONTROL_QUEUE: usize = 1024;

/// Why a control message could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("control message not sent: {0}")]
pub struct ControlError(pub String);

/// Sends small messages to every instance and receives this instance's.
pub trait ControlBus: Send + Sync + 'static {
    /// Sends `payload` to every instance, this one included.
    fn send(&self, payload: Bytes) -> BoxFuture<'_, Result<(), ControlError>>;

    /// The receiver of every message sent on the bus. Can be taken once.
    fn take_receiver(&self) -> Option<mpsc::Receiver<Bytes>>;

    /// Whether other instances can hear this bus (false for the loopback).
    fn reaches_others(&self) -> bool;

    /// Stops receiving.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        future::ready(()).boxed()
    }
}

/// The bus of one instance: what is sent comes straight back.
pub struct LoopbackBus {
    tx: mpsc::Sender<Bytes>,
    rx: Mutex<Option<mpsc::Receiver<Bytes>>>,
}

impl Default for LoopbackBus {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

impl ControlBus for LoopbackBus {
    fn send(&self, payload: Bytes) -> BoxFuture<'_, Result<(), ControlError>> {
        let sent = self
            .tx
            .try_send(payload)
            .map_err(|e| ControlError(e.to_string()));
        future::ready(sent).boxed()
    }

    fn take_receiver(&self) -> Option<mpsc::Receiver<Bytes>> {
        take(&self.rx)
    }

    fn reaches_others(&self) -> bool {
        false
    }
}

#[cfg(feature = "redis")]
pub use self::redis_bus::RedisControlBus;

#[cfg(feature = "redis")]
mod redis_bus {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use futures::future::{BoxFuture, FutureExt};
    use futures::StreamExt;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::{take, ControlBus, ControlError, CONTROL_QUEUE};
    use crate::redis_client::{SharedRedis, CONNECT_TIMEOUT, RESPONSE_TIMEOUT};

    /// Control messages on `<prefix>control`. See the module docs.
    pub struct RedisControlBus {
        redis: SharedRedis,
        channel: String,
        rx: Mutex<Option<mpsc::Receiver<Bytes>>>,
        /// Messages dropped because the application's queue was full.
        pub dropped: Arc<AtomicU64>,
        cancel: CancellationToken,
        tasks: TaskTracker,
    }

    impl RedisControlBus {
        /// Starts the listening task (stopped by [`ControlBus::shutdown`]).
        pub fn start(redis: SharedRedis, prefix: &str) -> Self {
            let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
            let bus = Self {
                redis,
                channel: format!("{prefix}control"),
                rx: Mutex::new(Some(rx)),
                dropped: Arc::new(AtomicU64::new(0)),
                cancel: CancellationToken::new(),
                tasks: TaskTracker::new(),
            };
            bus.tasks.spawn(listen(
                bus.redis.clone(),
                bus.channel.clone(),
                tx,
                bus.dropped.clone(),
                bus.cancel.clone(),
            ));
            bus
        }
    }

    async fn listen(
        redis: SharedRedis,
        channel: String,
        tx: mpsc::Sender<Bytes>,
        dropped: Arc<AtomicU64>,
        cancel: CancellationToken,
    ) {
        let mut delay = Duration::from_millis(100);
        loop {
            let connected = async {
                let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, redis.pubsub())
                    .await
                    .ok()?
                    .ok()?;
                tokio::time::timeout(RESPONSE_TIMEOUT, pubsub.subscribe(&channel))
                    .await
                    .ok()?
                    .ok()?;
                Some(pubsub)
            };
            let pubsub = tokio::select! {
                () = cancel.cancelled() => return,
                p = connected => p,
            };
            if let Some(pubsub) = pubsub {
                delay = Duration::from_millis(100);
                let mut messages = pubsub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        () = cancel.cancelled() => return,
                        m = messages.next() => m,
                    };
                    let Some(msg) = msg else { break };
                    let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
                    if tx.try_send(payload).is_err() {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(backend = "redis", "control message dropped: queue full");
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    impl ControlBus for RedisControlBus {
        fn send(&self, payload: Bytes) -> BoxFuture<'_, Result<(), ControlError>> {
            async move {
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(&self.channel).arg(payload.as_ref());
                let cmd = &cmd;
                self.redis
                    .call(|mut conn| async move { cmd.query_async::<i64>(&mut conn).await })
                    .await
                    .map(drop)
                    .map_err(|e| ControlError(e.to_string()))
            }
            .boxed()
        }

        fn take_receiver(&self) -> Option<mpsc::Receiver<Bytes>> {
            take(&self.rx)
        }

        fn reaches_others(&self) -> bool {
            true
        }

        fn shutdown(&self) -> BoxFuture<'_, ()> {
            async move {
                self.cancel.cancel();
                self.tasks.close();
                self.tasks.wait().await;
            }
            .boxed()
        }
    }
}
