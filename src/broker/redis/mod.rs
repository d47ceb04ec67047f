//! [`RedisBroker`]: ids, history and cross-instance fan-out in Redis.
//!
//! - **Ids and history** (`publish.rs`): one Lua script per publish appends
//!   the event to the session's stream (`<prefix>session:<id>:history`,
//!   trimmed to `HISTORY_MAXLEN` entries and `HISTORY_SESSION_MAX_BYTES`,
//!   with a TTL), takes the entry id as the event id, and
//!   publishes the envelope on `<prefix>session:<id>` — one round trip, and
//!   ids per session are in the order the channel carries them.
//! - **Delivery** (`subscriber.rs`): one dedicated Pub/Sub connection holds
//!   a channel for each session with subscribers here. Every event reaches
//!   this instance's subscribers from that connection — its own events too —
//!   so a subscriber sees a session's ids in increasing order whichever
//!   instance published them. After a reconnect, what was missed is read
//!   from each session's stream before live messages resume.
//! - **Resume** (`history.rs`): the stream vouches for an id it holds, or
//!   for `0-0` while it still holds the session's first event.
//! - **Redis away** (`outbox.rs`): an event that cannot reach Redis is
//!   delivered here at once through the [`MemoryBroker`] (its id from this
//!   process, kept in the in-process ring) and waits in a bounded outbox;
//!   once Redis answers, the outbox is published in order, keeping each
//!   event's id when the stream allows it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::memory::MemoryBroker;
use super::{Broker, BrokerError, Handler, Replay};
use crate::event::{EventId, OutgoingEvent, SessionId};
use crate::history::HistoryLimits;
use crate::redis_client::{SharedRedis, TopologyKind};

mod catch_up;
pub mod envelope;
mod history;
mod interest;
mod outbox;
mod publish;
mod pubsub;
mod replays;
mod subscriber;

/// Settings of a [`RedisBroker`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisSettings {
    /// Prefix of every key and channel (default `sse:`).
    pub prefix: String,
    /// This process's name on the wire; must differ between processes.
    pub node_id: String,
    /// `maxlen` (approximate cap of each session's stream) and `ttl` apply
    /// to the Redis stream.
    pub history: HistoryLimits,
    /// Events held while Redis is unreachable (published in order once it
    /// is back); more are dropped and counted.
    pub outbox_max: usize,
}

impl RedisSettings {
    pub fn new(prefix: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            node_id: node_id.into(),
            history: HistoryLimits::default(),
            outbox_max: 10_000,
        }
    }
}

/// Counters for `/stats` and tests.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct RedisCounters {
    /// Whether the dedicated subscriber connection is up.
    pub subscriber_connected: bool,
    /// Session channels currently subscribed.
    pub subscribed_channels: usize,
    /// Events published through Redis.
    pub published_redis: u64,
    /// Events that fell back to local delivery because Redis was unreachable.
    pub fallback_local: u64,
    /// Events of other instances delivered here.
    pub received: u64,
    /// This instance's own events delivered here from the subscriber
    /// connection (the order-keeping path).
    pub own_received: u64,
    /// Every message that arrived on the subscriber connection: the Redis
    /// traffic this instance pays for.
    pub messages_in: u64,
    /// Channel name plus payload bytes of those messages.
    pub bytes_in: u64,
    pub malformed_dropped: u64,
    pub foreign_version_dropped: u64,
    /// Times the subscriber connection was (re-)established.
    pub subscriber_connects: u64,
    /// Times the subscriber fell so far behind its connection (while it
    /// subscribed channels or caught sessions up) that the buffer between
    /// them filled: the connection was ended, rather than messages dropped,
    /// and the reconnect (counted in `subscriber_connects`) caught every
    /// session up from its stream. A rising count means catch-ups are too
    /// slow for the traffic.
    pub subscriber_overflows: u64,
    /// Events waiting in the outbox for Redis to come back.
    pub outbox_len: usize,
    /// Outbox events published once Redis was back.
    pub outbox_flushed: u64,
    /// Outbox events published under a new id (the session's stream had
    /// moved past theirs).
    pub outbox_reassigned: u64,
    /// Events dropped because the outbox was full (OUTBOX_MAX).
    pub outbox_dropped: u64,
    /// Events read from history after a reconnect of the subscriber.
    pub caught_up: u64,
    /// Messages received a second time (after a catch-up) and dropped.
    pub duplicates_dropped: u64,
    /// Session channels Redis unsubscribed by itself (a cluster moved their
    /// slot or failed their node over) and that were subscribed again.
    pub resubscribes: u64,
    /// Catch-ups that found the session's stream no longer reaching back to
    /// what this instance had delivered (trimmed or lost meanwhile): its
    /// streams here got a `reset` instead of a catch-up with a hole.
    pub catch_up_gaps: u64,
    /// Sessions whose stream was found without events already delivered
    /// (lost with a primary that died before its replica had them); resumes
    /// from before the loss get `reset`.
    pub history_lost: u64,
    /// `single`, `cluster` or `sentinel`.
    pub topology: Option<TopologyKind>,
}

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    redis: SharedRedis,
    settings: RedisSettings,
    keys: Keys,
    /// Ids and delivery for events that cannot reach Redis.
    local: Arc<MemoryBroker>,
    handler: Handler,
    script: redis::Script,
    reserve: redis::Script,
    note_kept: redis::Script,
    mark_lost: redis::Script,
    /// Flag-off publishes of one session are serialised on one of these
    /// across their reservation, so they are delivered in id order.
    local_order: Vec<tokio::sync::Mutex<()>>,
    outbox: outbox::Outbox,
    interest: Arc<interest::Interest>,
    /// Resume reads in flight, shared and bounded.
    replays: replays::Replays,
    /// Set while publishing to Redis fails, so an outage is logged once.
    publish_outage: AtomicBool,
    /// See [`Broker::stop_holding`]: the outbox takes no new event.
    stop_holding: AtomicBool,
    counters: Counters,
    closed: AtomicBool,
    /// The broker's own tasks and their stop signal: the application's
    /// shutdown does not reach in here; [`Broker::shutdown`] does.
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Key and channel names. In a cluster the session id is a hash tag
/// (`sse:session:{<id>}`, `...:history`, `...:first`), so one session's
/// channel and keys share a slot and the publish script stays one atomic
/// round trip on one node; a single server keeps the plain names.
struct Keys {
    session_prefix: String,
    broadcast: String,
    tagged: bool,
}

impl Keys {
    fn channel(&self, session: &SessionId) -> String {
        if self.tagged {
            format!("{}{{{}}}", self.session_prefix, session)
        } else {
            format!("{}{}", self.session_prefix, session)
        }
    }

    fn history(&self, session: &SessionId) -> String {
        format!("{}:history", self.channel(session))
    }

    /// The bytes the session's stream holds (see the publish script).
    fn history_bytes(&self, session: &SessionId) -> String {
        format!("{}:bytes", self.channel(session))
    }

    /// The id of the first event the session's stream ever held.
    fn first(&self, session: &SessionId) -> String {
        format!("{}:first", self.channel(session))
    }

    /// Set when a session's stream was found to have lost events a
    /// subscriber had delivered (a failover promoted a replica that had not
    /// received them): resumes from before that id get `reset`.
    fn lost(&self, session: &SessionId) -> String {
        format!("{}:lost", self.channel(session))
    }

    /// The last id reserved from the session's sequence for an event that
    /// stayed on its instance.
    fn reserved(&self, session: &SessionId) -> String {
        format!("{}:seq", self.channel(session))
    }

    /// Per instance, the newest event of the session it kept to itself
    /// (flag off): a hash, node → id.
    fn kept_local(&self, session: &SessionId) -> String {
        format!("{}:local", self.channel(session))
    }

    /// The session a channel belongs to, if it is a session channel.
    fn session_of(&self, channel: &str) -> Option<SessionId> {
        let id = channel.strip_prefix(&self.session_prefix)?;
        let id = if self.tagged {
            id.strip_prefix('{')?.strip_suffix('}')?
        } else {
            id
        };
        SessionId::parse(id).ok()
    }
}

#[derive(Default)]
struct Counters {
    published_redis: AtomicU64,
    fallback_local: AtomicU64,
    received: AtomicU64,
    own_received: AtomicU64,
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    malformed: AtomicU64,
    foreign: AtomicU64,
    connected: AtomicBool,
    connects: AtomicU64,
    subscribed: AtomicU64,
    outbox_flushed: AtomicU64,
    outbox_reassigned: AtomicU64,
    outbox_dropped: AtomicU64,
    caught_up: AtomicU64,
    duplicates: AtomicU64,
    resubscribes: AtomicU64,
    history_lost: AtomicU64,
    catch_up_gaps: AtomicU64,
}

/// Stripes of [`Inner::local_order`].
const LOCAL_ORDER_STRIPES: usize = 64;

/// How long shutdown waits for the outbox to reach Redis.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

impl RedisBroker {
    /// Starts the subscriber and outbox tasks. `redis` is the process's
    /// shared client; `local` delivers what cannot reach Redis; `handler`
    /// receives every frame for this instance's subscribers.
    pub fn start(
        redis: SharedRedis,
        settings: RedisSettings,
        local: Arc<MemoryBroker>,
        handler: Handler,
    ) -> Self {
        let keys = Keys {
            session_prefix: format!("{}session:", settings.prefix),
            broadcast: format!("{}broadcast", settings.prefix),
            tagged: redis.topology() == TopologyKind::Cluster,
        };
        let inner = Arc::new(Inner {
            redis,
            outbox: outbox::Outbox::new(settings.outbox_max),
            settings,
            keys,
            local,
            handler,
            script: redis::Script::new(&publish::publish_script()),
            reserve: redis::Script::new(&publish::reserve_script()),
            note_kept: redis::Script::new(&publish::note_kept_script()),
            mark_lost: redis::Script::new(history::MARK_LOST_SCRIPT),
            local_order: (0..LOCAL_ORDER_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            interest: Arc::default(),
            replays: replays::Replays::default(),
            publish_outage: AtomicBool::new(false),
            stop_holding: AtomicBool::new(false),
            counters: Counters::default(),
            closed: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        inner.tasks.spawn(inner.clone().run_subscriber());
        inner.tasks.spawn(inner.clone().run_flusher());
        Self { inner }
    }

    pub fn counters(&self) -> RedisCounters {
        let c = &self.inner.counters;
        RedisCounters {
            subscriber_connected: c.connected.load(Ordering::Relaxed),
            subscribed_channels: c.subscribed.load(Ordering::Relaxed) as usize,
            published_redis: c.published_redis.load(Ordering::Relaxed),
            fallback_local: c.fallback_local.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            own_received: c.own_received.load(Ordering::Relaxed),
            messages_in: c.messages_in.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            malformed_dropped: c.malformed.load(Ordering::Relaxed),
            foreign_version_dropped: c.foreign.load(Ordering::Relaxed),
            subscriber_connects: c.connects.load(Ordering::Relaxed),
            subscriber_overflows: pubsub::overflows(),
            outbox_len: self.inner.outbox.len(),
            outbox_flushed: c.outbox_flushed.load(Ordering::Relaxed),
            outbox_reassigned: c.outbox_reassigned.load(Ordering::Relaxed),
            outbox_dropped: c.outbox_dropped.load(Ordering::Relaxed),
            caught_up: c.caught_up.load(Ordering::Relaxed),
            duplicates_dropped: c.duplicates.load(Ordering::Relaxed),
            resubscribes: c.resubscribes.load(Ordering::Relaxed),
            history_lost: c.history_lost.load(Ordering::Relaxed),
            catch_up_gaps: c.catch_up_gaps.load(Ordering::Relaxed),
            topology: Some(self.inner.redis.topology()),
        }
    }

    /// The channel a session's events travel on.
    pub fn channel(&self, session: &SessionId) -> String {
        self.inner.keys.channel(session)
    }
}

impl Inner {
    fn check_open(&self) -> Result<(), BrokerError> {
        if self.closed.load(Ordering::Acquire) {
            Err(BrokerError::Closed)
        } else {
            Ok(())
        }
    }

    /// Logs the start of an outage once.
    fn note_outage(&self, error: &dyn std::fmt::Display) {
        if !self.publish_outage.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                backend = "redis",
                %error,
                "publishing to Redis failed; delivering locally only until it recovers"
            );
        }
    }

    fn local_order(&self, session: &SessionId) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        session.hash(&mut h);
        &self.local_order[(h.finish() as usize) % self.local_order.len()]
    }

    fn publish_recovered(&self) {
        if self.publish_outage.swap(false, Ordering::Relaxed) {
            tracing::info!(backend = "redis", "publishing to Redis recovered");
        }
    }
}

impl Broker for RedisBroker {
    fn publish<'a>(
        &'a self,
        session: &'a SessionId,
        event: &'a OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>> {
        self.inner.publish(session, event).boxed()
    }

    fn publish_local<'a>(
        &'a self,
        session: &'a SessionId,
        event: &'a OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>> {
        self.inner.publish_local(session, event).boxed()
    }

    fn publish_all<'a>(
        &'a self,
        event: &'a OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>> {
        self.inner.publish_all(event).boxed()
    }

    fn subscribe(
        &self,
        session: &SessionId,
        generation: u64,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.inner.want(session, generation)
    }

    fn unsubscribe(&self, session: &SessionId, generation: u64) {
        self.inner.unwant(session, generation);
    }

    fn history<'a>(
        &'a self,
        session: &'a SessionId,
        after: EventId,
        max_bytes: usize,
    ) -> BoxFuture<'a, Result<Replay, BrokerError>> {
        async move {
            self.inner
                .replay(session, after, max_bytes)
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))
        }
        .boxed()
    }

    fn position<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>> {
        async move {
            self.inner
                .stream_top(session)
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))
        }
        .boxed()
    }

    fn stop_holding(&self) {
        self.inner.stop_holding.store(true, Ordering::Release);
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async move {
            let inner = &self.inner;
            // Publishes that already started finish; new ones are refused.
            inner.closed.store(true, Ordering::Release);
            // Events still waiting for Redis get a last chance of up to
            // SHUTDOWN_FLUSH. The flush holds the outbox's flush lock, so
            // it never races the flusher.
            let flushed = tokio::time::timeout(SHUTDOWN_FLUSH, inner.flush_retrying()).await;
            let left = inner.outbox.len();
            if left > 0 || flushed.is_err() {
                tracing::warn!(
                    backend = "redis",
                    left,
                    "shutting down with events that never reached Redis"
                );
            }
            inner.cancel.cancel();
            inner.tasks.close();
            inner.tasks.wait().await;
        }
        .boxed()
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::to_value(self.counters()).unwrap_or_default()
    }
}
