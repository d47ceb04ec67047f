//! [`RedisBroadcaster`]: fans events out across instances through Redis
//! Pub/Sub, one channel per session (`<prefix>session:<id>`, default prefix
//! `sse:`), plus `<prefix>broadcast` for announcements to every session.
//!
//! - **Local first.** This instance's own subscribers are served from the
//!   in-process map ([`LocalBroadcaster`]); the copy that comes back from
//!   Redis carries this process's node id and is dropped.
//! - **Per-session subscriptions.** A channel is subscribed when the session
//!   gets its first local subscriber and unsubscribed when the last leaves,
//!   so an instance receives only events for sessions it serves (never
//!   `PSUBSCRIBE sse:*`). `subscribe` returns once Redis has confirmed the
//!   channel, so nothing published elsewhere after it returns is missed.
//! - **Always subscribed, flag-gated publishing.** Subscriptions do not
//!   depend on `FF_REDIS_SSE_BROADCAST`; only publishing does. A fleet in the
//!   middle of a flag flip therefore delivers every event published with the
//!   flag on, once, and nothing twice.
//! - **One round trip per publish.** A Lua script appends the event to the
//!   session's history stream (`<prefix>session:<id>:history`, bounded by
//!   `MAXLEN ~` and a TTL), takes the stream entry id as the event id (ids
//!   are then ordered per session across all instances), and publishes the
//!   envelope.
//! - **Redis down.** Publishing falls back to local delivery (logged once per
//!   outage, counted); the subscriber connection is re-established with
//!   capped exponential backoff and re-subscribes every channel that still
//!   has local subscribers. Malformed and foreign-version messages are
//!   counted and dropped.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use futures::StreamExt;
use redis::aio::PubSubSink;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broadcaster::{BroadcastError, Broadcaster, BroadcasterStats, Subscription};
use crate::envelope::{self, DecodeError};
use crate::event::{EventId, Frame, OutgoingEvent, SessionId};
use crate::flags::FlagSource;
use crate::local::{LocalBroadcaster, SessionHook};
use crate::redis_client::{SharedRedis, CONNECT_TIMEOUT, RESPONSE_TIMEOUT};
use crate::sse::encode_event;

/// Appends to history, publishes the envelope, returns the entry id.
/// KEYS[1] history stream; ARGV: channel, node, type, data, maxlen, ttl secs.
const PUBLISH_SCRIPT: &str = r#"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
  't', ARGV[3], 'd', ARGV[4], 'n', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[6])
local env = '{"v":1,"node":' .. cjson.encode(ARGV[2]) .. ',"id":"' .. id ..
  '","type":' .. cjson.encode(ARGV[3]) .. ',"data":' .. cjson.encode(ARGV[4]) .. '}'
redis.call('PUBLISH', ARGV[1], env)
return id
"#;

/// Publishes to one session are serialised per stripe on this instance, so
/// local subscribers see them in the order of their ids.
const ORDER_STRIPES: usize = 64;

/// Control messages waiting for the application; more are dropped (counted).
const CONTROL_QUEUE: usize = 1024;

/// Settings of a [`RedisBroadcaster`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisSettings {
    /// Prefix of every key and channel (default `sse:`).
    pub prefix: String,
    /// This process's name on the wire; must differ between processes.
    pub node_id: String,
    /// Per-subscriber queue length (as for the local broadcaster).
    pub queue: usize,
    /// Approximate cap on each session's history stream.
    pub history_maxlen: u64,
    /// Seconds a session's history lives after its last event.
    pub history_ttl_secs: u64,
    /// Events held while Redis is unreachable (published in order once it
    /// is back); more are dropped and counted.
    pub outbox_max: usize,
}

impl RedisSettings {
    pub fn new(prefix: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            node_id: node_id.into(),
            queue: crate::local::DEFAULT_QUEUE,
            history_maxlen: 1000,
            history_ttl_secs: 3600,
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
    /// Events received from other instances and delivered here.
    pub received: u64,
    /// Every message that arrived on the subscriber connection (own echoes,
    /// control and dropped ones included): the Redis traffic this instance
    /// pays for.
    pub messages_in: u64,
    /// Channel name plus payload bytes of those messages.
    pub bytes_in: u64,
    /// This instance's own events coming back from Redis (dropped).
    pub own_echo_dropped: u64,
    pub malformed_dropped: u64,
    pub foreign_version_dropped: u64,
    /// Times the subscriber connection was (re-)established.
    pub subscriber_connects: u64,
}

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct RedisBroadcaster {
    inner: Arc<Inner>,
}

struct Inner {
    local: LocalBroadcaster,
    redis: SharedRedis,
    flags: Arc<dyn FlagSource>,
    settings: RedisSettings,
    /// `<prefix>session:`
    session_prefix: String,
    broadcast_channel: String,
    /// `<prefix>control`: small messages between instances (pipeline gate
    /// answers), handed to the application through `control_tx`.
    control_channel: String,
    control_tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    control_rx: Mutex<Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>>,
    script: redis::Script,
    /// The sink of the live subscriber connection, and the channels it holds.
    /// A tokio mutex: held across the SUBSCRIBE round trip, which keeps
    /// subscribe/unsubscribe of one session in order.
    subs: tokio::sync::Mutex<SubState>,
    /// Sessions whose subscription may need to change (from the local map's
    /// hook, which cannot await).
    dirty: Arc<Dirty>,
    /// Asks the subscriber task to drop its connection and start over.
    reconnect: Notify,
    order: Vec<tokio::sync::Mutex<()>>,
    /// Set while publishing to Redis fails, so an outage is logged once.
    publish_outage: AtomicBool,
    counters: Counters,
    cancel: CancellationToken,
}

#[derive(Default)]
struct SubState {
    sink: Option<PubSubSink>,
    subscribed: HashSet<SessionId>,
}

#[derive(Default)]
struct Counters {
    connected: AtomicBool,
    published_redis: AtomicU64,
    fallback_local: AtomicU64,
    received: AtomicU64,
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    own_echo: AtomicU64,
    malformed: AtomicU64,
    foreign: AtomicU64,
    connects: AtomicU64,
    subscribed: AtomicU64,
}

#[derive(Default)]
struct Dirty {
    sessions: Mutex<HashSet<SessionId>>,
    notify: Notify,
}

impl SessionHook for Dirty {
    fn session_changed(&self, session: &SessionId) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session.clone());
        self.notify.notify_one();
    }
}

impl RedisBroadcaster {
    /// Starts the subscriber task (owned by `tasks`, stopped by `cancel` or
    /// [`Broadcaster::shutdown`]). `redis` is the process's shared client.
    pub fn start(
        redis: SharedRedis,
        flags: Arc<dyn FlagSource>,
        settings: RedisSettings,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let dirty = Arc::new(Dirty::default());
        let (control_tx, control_rx) = tokio::sync::mpsc::channel(CONTROL_QUEUE);
        let local = LocalBroadcaster::with_hook(settings.queue, dirty.clone());
        let inner = Arc::new(Inner {
            local,
            redis,
            flags,
            session_prefix: format!("{}session:", settings.prefix),
            broadcast_channel: format!("{}broadcast", settings.prefix),
            control_channel: format!("{}control", settings.prefix),
            control_tx,
            control_rx: Mutex::new(Some(control_rx)),
            settings,
            script: redis::Script::new(PUBLISH_SCRIPT),
            subs: tokio::sync::Mutex::new(SubState::default()),
            dirty,
            reconnect: Notify::new(),
            order: (0..ORDER_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            publish_outage: AtomicBool::new(false),
            counters: Counters::default(),
            cancel,
        });
        let task = inner.clone();
        tasks.spawn(async move { task.run_subscriber().await });
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
            messages_in: c.messages_in.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            own_echo_dropped: c.own_echo.load(Ordering::Relaxed),
            malformed_dropped: c.malformed.load(Ordering::Relaxed),
            foreign_version_dropped: c.foreign.load(Ordering::Relaxed),
            subscriber_connects: c.connects.load(Ordering::Relaxed),
        }
    }

    /// The channel a session's events travel on.
    pub fn channel(&self, session: &SessionId) -> String {
        self.inner.channel(session)
    }

    /// The receiver of messages sent with [`RedisBroadcaster::send_control`]
    /// by any instance (this one included). Can be taken once.
    pub fn take_control_receiver(&self) -> Option<tokio::sync::mpsc::Receiver<bytes::Bytes>> {
        self.inner
            .control_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Publishes a control message to every instance.
    pub async fn send_control(&self, payload: String) -> Result<(), String> {
        let mut conn = self.inner.redis.conn().ok_or("not connected")?;
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.inner.control_channel).arg(payload);
        tokio::time::timeout(RESPONSE_TIMEOUT, cmd.query_async::<i64>(&mut conn))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Sessions whose channel this instance holds in Redis right now.
    pub async fn subscribed_sessions(&self) -> Vec<SessionId> {
        self.inner
            .subs
            .lock()
            .await
            .subscribed
            .iter()
            .cloned()
            .collect()
    }

    /// The flag source deciding which publishes go through Redis.
    pub fn flags(&self) -> &Arc<dyn FlagSource> {
        &self.inner.flags
    }
}

impl Inner {
    fn channel(&self, session: &SessionId) -> String {
        format!("{}{}", self.session_prefix, session)
    }

    fn history_key(&self, session: &SessionId) -> String {
        format!("{}{}:history", self.session_prefix, session)
    }

    async fn publish(
        &self,
        session: &SessionId,
        event: OutgoingEvent,
    ) -> Result<EventId, BroadcastError> {
        if self.cancel.is_cancelled() {
            return Err(BroadcastError::Closed);
        }
        if !self.flags.redis_broadcast(session) {
            // Flag off: exactly the phase 1 path.
            return self.local.publish_now(session, &event);
        }
        let stripe = {
            let mut h = DefaultHasher::new();
            session.hash(&mut h);
            (h.finish() as usize) % self.order.len()
        };
        let _order = self.order[stripe].lock().await;
        match self.publish_redis(session, &event).await {
            Ok(id) => {
                self.publish_recovered();
                let bytes = encode_event(Some(id), &event.event_type, &event.data);
                self.local.deliver(session, Frame { id, bytes });
                self.counters
                    .published_redis
                    .fetch_add(1, Ordering::Relaxed);
                Ok(id)
            }
            Err(e) => {
                self.publish_failed(&e);
                self.local.publish_now(session, &event)
            }
        }
    }

    async fn publish_redis(
        &self,
        session: &SessionId,
        event: &OutgoingEvent,
    ) -> Result<EventId, String> {
        let mut conn = self.redis.conn().ok_or("not connected")?;
        let mut call = self.script.key(self.history_key(session));
        call.arg(self.channel(session))
            .arg(&self.settings.node_id)
            .arg(event.event_type.as_str())
            .arg(&event.data)
            .arg(self.settings.history_maxlen)
            .arg(self.settings.history_ttl_secs);
        let id: String = tokio::time::timeout(RESPONSE_TIMEOUT, call.invoke_async(&mut conn))
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .inspect_err(|_| self.redis.report_failure())?;
        id.parse()
            .map_err(|_| format!("unexpected stream id {id:?}"))
    }

    async fn publish_all(&self, event: OutgoingEvent) -> Result<EventId, BroadcastError> {
        if self.cancel.is_cancelled() {
            return Err(BroadcastError::Closed);
        }
        if !self.flags.state().enabled {
            return self.local.publish_all_now(&event);
        }
        let id = self.local.next_id();
        let env = envelope::encode(&self.settings.node_id, id, &event.event_type, &event.data);
        let result = match self.redis.conn() {
            None => Err("not connected".to_owned()),
            Some(mut conn) => {
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(&self.broadcast_channel).arg(env);
                let publish = cmd.query_async::<i64>(&mut conn);
                match tokio::time::timeout(RESPONSE_TIMEOUT, publish).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                }
                .inspect_err(|_| self.redis.report_failure())
            }
        };
        match result {
            Ok(()) => self.publish_recovered(),
            Err(e) => self.publish_failed(&e),
        }
        // Local subscribers are served directly either way.
        let bytes = encode_event(Some(id), &event.event_type, &event.data);
        self.local.deliver_all(&Frame { id, bytes });
        Ok(id)
    }

    fn publish_failed(&self, error: &str) {
        self.counters.fallback_local.fetch_add(1, Ordering::Relaxed);
        if !self.publish_outage.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                backend = "redis",
                error,
                "publishing to Redis failed; delivering locally only until it recovers"
            );
        }
    }

    fn publish_recovered(&self) {
        if self.publish_outage.swap(false, Ordering::Relaxed) {
            tracing::info!(backend = "redis", "publishing to Redis recovered");
        }
    }

    /// Brings the Redis subscription of `session` in line with whether it
    /// has local subscribers. Idempotent.
    async fn reconcile(&self, session: &SessionId) {
        let mut st = self.subs.lock().await;
        let want = self.local.has_session(session);
        if want == st.subscribed.contains(session) {
            return;
        }
        let Some(sink) = st.sink.as_mut() else {
            // Disconnected: the subscriber task subscribes everything that is
            // still wanted when it reconnects.
            return;
        };
        let channel = self.channel(session);
        let result = if want {
            tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(&channel)).await
        } else {
            tokio::time::timeout(RESPONSE_TIMEOUT, sink.unsubscribe(&channel)).await
        };
        match result {
            Ok(Ok(())) => {
                if want {
                    st.subscribed.insert(session.clone());
                } else {
                    st.subscribed.remove(session);
                }
                self.counters
                    .subscribed
                    .store(st.subscribed.len() as u64, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                tracing::warn!(backend = "redis", channel, error = %e, "subscription change failed; reconnecting");
                self.reconnect.notify_one();
            }
            Err(_) => {
                tracing::warn!(
                    backend = "redis",
                    channel,
                    "subscription change timed out; reconnecting"
                );
                self.reconnect.notify_one();
            }
        }
    }

    /// The subscriber task: one dedicated Pub/Sub connection, re-established
    /// with capped exponential backoff until shutdown.
    async fn run_subscriber(self: Arc<Self>) {
        let mut delay = Duration::from_millis(100);
        let mut down_logged = false;
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            match self.open_subscriber().await {
                Ok(mut stream) => {
                    delay = Duration::from_millis(100);
                    if down_logged {
                        tracing::info!(backend = "redis", "subscriber reconnected");
                    }
                    self.counters.connected.store(true, Ordering::Relaxed);
                    self.counters.connects.fetch_add(1, Ordering::Relaxed);
                    let stop = self.pump(&mut stream).await;
                    self.counters.connected.store(false, Ordering::Relaxed);
                    {
                        let mut st = self.subs.lock().await;
                        st.sink = None;
                        st.subscribed.clear();
                        self.counters.subscribed.store(0, Ordering::Relaxed);
                    }
                    if stop {
                        return;
                    }
                    tracing::warn!(
                        backend = "redis",
                        "subscriber connection lost; reconnecting"
                    );
                    down_logged = true;
                }
                Err(e) => {
                    if !down_logged {
                        tracing::warn!(backend = "redis", error = %e, "cannot open the subscriber connection; retrying");
                        down_logged = true;
                    }
                }
            }
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Connects and subscribes the broadcast channel and every session that
    /// has local subscribers.
    async fn open_subscriber(&self) -> Result<redis::aio::PubSubStream, String> {
        let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, self.redis.client().get_async_pubsub())
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let (mut sink, stream) = pubsub.split();
        let mut st = self.subs.lock().await;
        let sessions = self.local.sessions();
        let mut channels: Vec<String> = sessions.iter().map(|s| self.channel(s)).collect();
        channels.push(self.broadcast_channel.clone());
        channels.push(self.control_channel.clone());
        tokio::time::timeout(RESPONSE_TIMEOUT * 5, sink.subscribe(&channels))
            .await
            .map_err(|_| "subscribe timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        st.subscribed = sessions.into_iter().collect();
        st.sink = Some(sink);
        self.counters
            .subscribed
            .store(st.subscribed.len() as u64, Ordering::Relaxed);
        // Sessions that changed while we were disconnected are covered by
        // the full subscribe above; forget their notifications.
        self.dirty
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(stream)
    }

    /// Reads messages until the connection ends (false) or shutdown (true).
    async fn pump(&self, stream: &mut redis::aio::PubSubStream) -> bool {
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return true,
                () = self.reconnect.notified() => return false,
                () = self.dirty.notify.notified() => {
                    let changed: Vec<SessionId> = self
                        .dirty
                        .sessions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .drain()
                        .collect();
                    for session in changed {
                        self.reconcile(&session).await;
                    }
                }
                msg = stream.next() => match msg {
                    Some(msg) => self.handle(&msg),
                    None => return false,
                },
            }
        }
    }

    fn handle(&self, msg: &redis::Msg) {
        let channel = msg.get_channel_name();
        self.counters.messages_in.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_in.fetch_add(
            (channel.len() + msg.get_payload_bytes().len()) as u64,
            Ordering::Relaxed,
        );
        if channel == self.control_channel {
            let payload = bytes::Bytes::copy_from_slice(msg.get_payload_bytes());
            if self.control_tx.try_send(payload).is_err() {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(backend = "redis", "control message dropped: queue full");
            }
            return;
        }
        let target = if channel == self.broadcast_channel {
            None
        } else {
            match channel
                .strip_prefix(&self.session_prefix)
                .and_then(|id| SessionId::parse(id).ok())
            {
                Some(session) => Some(session),
                None => {
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        backend = "redis",
                        channel,
                        "message on an unexpected channel dropped"
                    );
                    return;
                }
            }
        };
        let env = match envelope::decode(msg.get_payload_bytes()) {
            Ok(env) => env,
            Err(DecodeError::ForeignVersion(v)) => {
                self.counters.foreign.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(backend = "redis", channel, version = ?v, "message of another protocol version dropped");
                return;
            }
            Err(e) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(backend = "redis", channel, error = %e, "malformed message dropped");
                return;
            }
        };
        if env.node == self.settings.node_id {
            // Already delivered locally when it was published.
            self.counters.own_echo.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let frame = Frame {
            id: env.id,
            bytes: encode_event(Some(env.id), &env.event_type, &env.data),
        };
        match target {
            Some(session) => self.local.deliver(&session, frame),
            None => self.local.deliver_all(&frame),
        }
        self.counters.received.fetch_add(1, Ordering::Relaxed);
    }
}

impl Broadcaster for RedisBroadcaster {
    fn publish<'a>(
        &'a self,
        session: &'a SessionId,
        event: OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BroadcastError>> {
        self.inner.publish(session, event).boxed()
    }

    fn publish_all(&self, event: OutgoingEvent) -> BoxFuture<'_, Result<EventId, BroadcastError>> {
        self.inner.publish_all(event).boxed()
    }

    fn subscribe<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<Subscription, BroadcastError>> {
        async move {
            if self.inner.cancel.is_cancelled() {
                return Err(BroadcastError::Closed);
            }
            let subscription = self.inner.local.subscribe_now(session)?;
            // Wait for Redis to confirm the channel (bounded; returns at once
            // while disconnected), so events published elsewhere from now on
            // reach this subscriber.
            self.inner.reconcile(session).await;
            Ok(subscription)
        }
        .boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async move {
            self.inner.cancel.cancel();
            self.inner.local.close();
        }
        .boxed()
    }

    fn stats(&self) -> BroadcasterStats {
        let local = self.inner.local.stats();
        BroadcasterStats {
            mode: "redis",
            sessions: local.sessions,
            subscribers: local.subscribers,
            published: local.published
                + self.inner.counters.published_redis.load(Ordering::Relaxed),
            redis: Some(self.counters()),
        }
    }
}
