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
//!   outage, counted) and the event waits in a bounded outbox; once Redis is
//!   back the outbox is published in order (keeping the event's id when the
//!   session's stream allows it), so other instances and the history get
//!   it late rather than never. The subscriber connection is re-established
//!   with capped exponential backoff, re-subscribes every channel that still
//!   has local subscribers and catches up from each session's history what
//!   was published while it was away; a per-session cursor drops what it
//!   then receives twice. Malformed and foreign-version messages are counted
//!   and dropped.
//! - **Resume.** [`Broadcaster::replay`] reads the session's history stream
//!   after the client's `Last-Event-ID` (and this instance's in-process
//!   history of events that never reached Redis).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use futures::StreamExt;
use redis::aio::PubSubSink;
use redis::streams::{StreamId, StreamRangeReply};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broadcaster::{BroadcastError, Broadcaster, BroadcasterStats, Subscription};
use crate::envelope::{self, DecodeError};
use crate::event::{EventId, EventType, Frame, OutgoingEvent, SessionId};
use crate::flags::FlagSource;
use crate::history::{HistoryLimits, Replay};
use crate::local::{LocalBroadcaster, SessionHook};
use crate::redis_client::{SharedRedis, CONNECT_TIMEOUT, RESPONSE_TIMEOUT};
use crate::sse::encode_event;

/// Appends to history, publishes the envelope, returns the entry id.
/// KEYS[1] history stream, KEYS[2] the id of the session's first event
/// (history that still holds it was never trimmed);
/// ARGV: channel, node, type, data, maxlen, ttl secs,
/// wanted id (`*` for a new one). A wanted id (an outbox event that local
/// subscribers already saw under it) is kept if the stream accepts it, that
/// is, if it is greater than the stream's last id; otherwise Redis assigns one.
const PUBLISH_SCRIPT: &str = r#"
local id = false
if ARGV[7] ~= '*' then
  local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], ARGV[7],
    't', ARGV[3], 'd', ARGV[4], 'n', ARGV[2])
  if type(r) ~= 'table' then id = r end
end
if not id then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
    't', ARGV[3], 'd', ARGV[4], 'n', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('SET', KEYS[2], id, 'NX')
redis.call('EXPIRE', KEYS[2], ARGV[6])
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
    /// History per session: `maxlen` (approximate cap of the Redis stream)
    /// and `ttl` apply to the Redis stream and the in-process history alike;
    /// `max_bytes` bounds the in-process history (events that did not reach
    /// Redis).
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
            queue: crate::local::DEFAULT_QUEUE,
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
    /// Events published here while Redis was unreachable, oldest first.
    outbox: Mutex<VecDeque<Pending>>,
    outbox_notify: Notify,
    /// Per subscribed session: how far this instance has read the session's
    /// channel, to catch up after a reconnect and drop repeats.
    cursors: Mutex<HashMap<SessionId, Cursor>>,
    /// Set while publishing to Redis fails, so an outage is logged once.
    publish_outage: AtomicBool,
    counters: Counters,
    cancel: CancellationToken,
}

/// An event delivered locally while Redis was unreachable.
#[derive(Clone)]
struct Pending {
    session: SessionId,
    id: EventId,
    event: OutgoingEvent,
}

#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    /// The last id received on the channel (own echoes included).
    received: Option<EventId>,
    /// The session's last history id when the channel was subscribed.
    floor: Option<EventId>,
}

impl Cursor {
    /// Where a catch-up starts: everything after it was missed.
    fn from(&self) -> Option<EventId> {
        self.received.max(self.floor)
    }
}

/// How long shutdown waits for the outbox to reach Redis.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// Outbox events published per flush before other work gets a turn.
const FLUSH_BATCH: usize = 256;

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
    outbox_flushed: AtomicU64,
    outbox_reassigned: AtomicU64,
    outbox_dropped: AtomicU64,
    caught_up: AtomicU64,
    duplicates: AtomicU64,
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
        let local = LocalBroadcaster::with_hook(settings.queue, dirty.clone(), settings.history);
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
            outbox: Mutex::new(VecDeque::new()),
            outbox_notify: Notify::new(),
            cursors: Mutex::new(HashMap::new()),
            publish_outage: AtomicBool::new(false),
            counters: Counters::default(),
            cancel,
        });
        let task = inner.clone();
        tasks.spawn(async move { task.run_subscriber().await });
        let task = inner.clone();
        tasks.spawn(async move { task.run_flusher().await });
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
            outbox_len: self.inner.outbox().len(),
            outbox_flushed: c.outbox_flushed.load(Ordering::Relaxed),
            outbox_reassigned: c.outbox_reassigned.load(Ordering::Relaxed),
            outbox_dropped: c.outbox_dropped.load(Ordering::Relaxed),
            caught_up: c.caught_up.load(Ordering::Relaxed),
            duplicates_dropped: c.duplicates.load(Ordering::Relaxed),
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

    /// Most history entries one read asks for: `MAXLEN ~` may keep somewhat
    /// more than `maxlen`.
    fn replay_limit(&self) -> usize {
        self.settings.history.maxlen.saturating_mul(2) + 100
    }

    fn first_key(&self, session: &SessionId) -> String {
        format!("{}{}:first", self.session_prefix, session)
    }

    /// The newest id in the session's history stream (`0-0` if it has
    /// none), or `None` if Redis does not answer.
    async fn stream_top(&self, session: &SessionId) -> Option<EventId> {
        let mut conn = self.redis.conn()?;
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.history_key(session))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        match tokio::time::timeout(
            RESPONSE_TIMEOUT,
            cmd.query_async::<StreamRangeReply>(&mut conn),
        )
        .await
        {
            Ok(Ok(reply)) => Some(
                reply
                    .ids
                    .first()
                    .and_then(|e| e.id.parse::<EventId>().ok())
                    .unwrap_or_default(),
            ),
            _ => {
                self.redis.report_failure();
                None
            }
        }
    }

    /// The newest id in the session's history stream and in-process
    /// history. Without Redis, an id past everything this instance has
    /// seen, so a later resume repeats nothing the client got live.
    async fn position(&self, session: &SessionId) -> EventId {
        match self.stream_top(session).await {
            Some(top) => top.max(self.local.position_now(session)),
            None => self.local.next_id(),
        }
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
        // Behind an outbox that is still draining, a new event waits its
        // turn: events of a session reach Redis in the order they were
        // published.
        if !self.outbox().is_empty() || !self.redis.is_healthy() {
            self.note_outage("Redis unreachable");
            return self.hold(session, event);
        }
        match self.publish_redis(session, &event, None).await {
            Ok(id) => {
                self.publish_recovered();
                self.local.observe(id);
                let bytes = encode_event(Some(id), &event.event_type, &event.data);
                self.local.deliver(session, Frame { id, bytes });
                self.counters
                    .published_redis
                    .fetch_add(1, Ordering::Relaxed);
                Ok(id)
            }
            Err(e) => {
                self.note_outage(&e);
                self.hold(session, event)
            }
        }
    }

    /// Delivers locally now (and keeps the event in the in-process history),
    /// and queues it for Redis.
    fn hold(&self, session: &SessionId, event: OutgoingEvent) -> Result<EventId, BroadcastError> {
        let id = self.local.publish_now(session, &event)?;
        self.counters.fallback_local.fetch_add(1, Ordering::Relaxed);
        let mut outbox = self.outbox();
        if outbox.len() < self.settings.outbox_max {
            outbox.push_back(Pending {
                session: session.clone(),
                id,
                event,
            });
            drop(outbox);
            self.outbox_notify.notify_one();
        } else {
            drop(outbox);
            let dropped = self.counters.outbox_dropped.fetch_add(1, Ordering::Relaxed);
            if dropped % 1000 == 0 {
                tracing::warn!(
                    backend = "redis",
                    session = %session,
                    dropped = dropped + 1,
                    "outbox full (OUTBOX_MAX): event delivered on this instance only"
                );
            }
        }
        Ok(id)
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cursors(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Cursor>> {
        self.cursors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the publish script; `wanted` is the id an outbox event already
    /// has locally.
    async fn publish_redis(
        &self,
        session: &SessionId,
        event: &OutgoingEvent,
        wanted: Option<EventId>,
    ) -> Result<EventId, String> {
        let mut conn = self.redis.conn().ok_or("not connected")?;
        let mut call = self.script.key(self.history_key(session));
        call.key(self.first_key(session));
        call.arg(self.channel(session))
            .arg(&self.settings.node_id)
            .arg(event.event_type.as_str())
            .arg(&event.data)
            .arg(self.settings.history.maxlen)
            .arg(self.settings.history.ttl.as_secs())
            .arg(wanted.map_or_else(|| "*".to_owned(), |id| id.to_string()));
        let id: String = tokio::time::timeout(RESPONSE_TIMEOUT, call.invoke_async(&mut conn))
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .inspect_err(|_| self.redis.report_failure())?;
        id.parse()
            .map_err(|_| format!("unexpected stream id {id:?}"))
    }

    /// Publishes the outbox, oldest first, while Redis answers. Returns
    /// whether it is empty.
    async fn flush(&self) -> bool {
        for _ in 0..FLUSH_BATCH {
            if !self.redis.is_healthy() {
                return false;
            }
            let Some(next) = self.outbox().front().cloned() else {
                return true;
            };
            match self
                .publish_redis(&next.session, &next.event, Some(next.id))
                .await
            {
                Ok(id) => {
                    // Only this task removes from the front.
                    let left = {
                        let mut outbox = self.outbox();
                        outbox.pop_front();
                        outbox.len()
                    };
                    self.local.observe(id);
                    self.counters.outbox_flushed.fetch_add(1, Ordering::Relaxed);
                    if id != next.id {
                        self.counters
                            .outbox_reassigned
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    if left == 0 {
                        self.publish_recovered();
                        tracing::info!(
                            backend = "redis",
                            flushed = self.counters.outbox_flushed.load(Ordering::Relaxed),
                            "outbox published to Redis"
                        );
                        return true;
                    }
                }
                Err(e) => {
                    self.note_outage(&e);
                    return false;
                }
            }
        }
        false
    }

    /// The outbox task: flushes whenever events are queued, and retries
    /// every 250 ms while Redis is away.
    async fn run_flusher(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = self.outbox_notify.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            while !self.flush().await {
                if !self.redis.is_healthy() {
                    break;
                }
                // A full batch went out; let other tasks run, then go on.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Events of `session` after `after` in the Redis history stream, or
    /// `None` if Redis cannot be read.
    async fn read_history(&self, session: &SessionId, after: EventId) -> Option<Replay> {
        let mut conn = self.redis.conn()?;
        let key = self.history_key(session);
        let limit = self.replay_limit();
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XRANGE")
            .arg(&key)
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .cmd("GET")
            .arg(self.first_key(session));
        let result: Result<(StreamRangeReply, StreamRangeReply, Option<String>), _> =
            match tokio::time::timeout(RESPONSE_TIMEOUT, pipe.query_async(&mut conn)).await {
                Ok(r) => r,
                Err(_) => {
                    self.redis.report_failure();
                    return None;
                }
            };
        let (head, later, first) = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(backend = "redis", session = %session, error = %e, "history read failed");
                self.redis.report_failure();
                return None;
            }
        };
        let oldest: Option<EventId> = head.ids.first().and_then(|e| e.id.parse().ok());
        let first: Option<EventId> = first.and_then(|f| f.parse().ok());
        let frames: Vec<Frame> = later
            .ids
            .iter()
            .filter_map(|e| self.entry_frame(e).map(|(_, f)| f))
            .collect();
        // Complete if history holds the client's last event (or one before
        // it), or still holds the session's first event; with no history
        // at all, only for a client that has seen nothing.
        let complete = match oldest {
            Some(o) => o <= after || Some(o) == first,
            None => after == EventId::default(),
        };
        Some(Replay {
            complete,
            oldest,
            newest: frames.last().map(|f| f.id),
            frames,
        })
    }

    /// A history entry as a frame, with the node that published it.
    /// Malformed entries are counted and skipped.
    fn entry_frame(&self, entry: &StreamId) -> Option<(String, Frame)> {
        let parsed = (|| {
            let id: EventId = entry.id.parse().ok()?;
            let event_type = EventType::parse(&entry.get::<String>("t")?).ok()?;
            let data: String = entry.get("d")?;
            let node: String = entry.get("n").unwrap_or_default();
            let bytes = encode_event(Some(id), &event_type, &data);
            Some((node, Frame { id, bytes }))
        })();
        if parsed.is_none() {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(backend = "redis", entry = %entry.id, "malformed history entry skipped");
        }
        parsed
    }

    /// After the subscriber reconnected: delivers what each session's
    /// history holds past its cursor (published while the connection was
    /// down), skipping this instance's own events, which were delivered
    /// when published.
    async fn catch_up(&self, sessions: &[SessionId]) {
        let Some(mut conn) = self.redis.conn() else {
            return;
        };
        for session in sessions {
            let Some(from) = self.cursors().get(session).and_then(Cursor::from) else {
                continue;
            };
            let mut cmd = redis::cmd("XRANGE");
            cmd.arg(self.history_key(session))
                .arg(format!("({from}"))
                .arg("+")
                .arg("COUNT")
                .arg(self.replay_limit());
            let reply: StreamRangeReply = match tokio::time::timeout(
                RESPONSE_TIMEOUT,
                cmd.query_async(&mut conn),
            )
            .await
            {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => {
                    tracing::warn!(backend = "redis", session = %session, error = %e, "catch-up read failed");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(backend = "redis", session = %session, "catch-up read timed out");
                    continue;
                }
            };
            for entry in &reply.ids {
                let Some((node, frame)) = self.entry_frame(entry) else {
                    continue;
                };
                if !self.advance(session, frame.id) {
                    continue;
                }
                self.local.observe(frame.id);
                self.counters.caught_up.fetch_add(1, Ordering::Relaxed);
                if node != self.settings.node_id {
                    self.local.deliver(session, frame);
                }
            }
        }
    }

    /// Moves the session's cursor to `id`; false if it was already there
    /// or past it (a message received twice). Sessions without a cursor
    /// (not subscribed here) pass.
    fn advance(&self, session: &SessionId, id: EventId) -> bool {
        match self.cursors().get_mut(session) {
            Some(c) if c.received.is_some_and(|r| id <= r) => false,
            Some(c) => {
                c.received = Some(id);
                true
            }
            None => true,
        }
    }

    /// Records where the session's history stood when its channel was
    /// subscribed, so a later catch-up knows where to start.
    async fn init_cursor(&self, session: &SessionId) {
        let top = self.stream_top(session).await;
        // Without an answer, the local clock is the best guess of "now".
        let floor = top.unwrap_or_else(|| self.local.next_id());
        let mut cursors = self.cursors();
        let cursor = cursors.entry(session.clone()).or_default();
        cursor.floor = cursor.floor.max(Some(floor));
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
        self.note_outage(error);
    }

    /// Logs the start of an outage once.
    fn note_outage(&self, error: &str) {
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
            // still wanted when it reconnects, and catches up from here.
            if want {
                let now = self.local.next_id();
                self.cursors().entry(session.clone()).or_default().floor = Some(now);
            }
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
                    self.init_cursor(session).await;
                } else {
                    st.subscribed.remove(session);
                    self.cursors().remove(session);
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
        // Messages that arrive from here on wait in `stream` while the
        // catch-up reads what was missed; the cursors drop the overlap.
        self.cursors().retain(|s, _| sessions.contains(s));
        self.catch_up(&sessions).await;
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
        self.local.observe(env.id);
        if let Some(session) = &target {
            if !self.advance(session, env.id) {
                // Already delivered by a catch-up.
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
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

    fn replay<'a>(&'a self, session: &'a SessionId, after: EventId) -> BoxFuture<'a, Replay> {
        async move {
            let local = self.inner.local.replay_now(session, after);
            match self.inner.read_history(session, after).await {
                Some(remote) => remote.merge(local),
                None => local,
            }
        }
        .boxed()
    }

    fn position<'a>(&'a self, session: &'a SessionId) -> BoxFuture<'a, EventId> {
        self.inner.position(session).boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async move {
            // Events still waiting for Redis get one last chance.
            let flushed = tokio::time::timeout(SHUTDOWN_FLUSH, self.inner.flush()).await;
            let left = self.inner.outbox().len();
            if left > 0 || flushed.is_err() {
                tracing::warn!(
                    backend = "redis",
                    left,
                    "shutting down with events that never reached Redis"
                );
            }
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
            history_sessions: local.history_sessions,
            history_bytes: local.history_bytes,
            redis: Some(self.counters()),
        }
    }
}
