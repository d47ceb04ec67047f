//! The subscriber: one dedicated Pub/Sub connection that holds a channel
//! for each session with subscribers on this instance, plus the broadcast
//! channel, and hands every event it receives to the broker's handler.
//!
//! Interest is state, not a queue of commands: [`Interest`](super::interest::Interest) records which
//! sessions are wanted (with the hub's generation, so a stale unsubscribe
//! is ignored) and which are dirty; the task brings Redis in line with it.
//! No lock is held across a Redis round trip. Each subscribed session has a
//! cursor — the newest id delivered here — which drops a message received
//! twice and tells a reconnect where to catch up from.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use tokio::sync::oneshot;

use super::envelope::{self, DecodeError};
use super::interest::State;
use super::publish::FOLLOW_SHARED;
use super::pubsub::{Incoming, PubSubConn};
use super::Inner;
use crate::broker::{BrokerError, Target};
use crate::event::{EventId, Frame, SessionId};
use crate::redis_client::RESPONSE_TIMEOUT;
use crate::sse;

/// Own events kept per session until their echo arrives.
const MAX_SENT: usize = 1024;

/// How far before "now" the catch-up of a session wanted while the
/// connection was down starts.
const FLOOR_MARGIN_MS: u64 = 2_000;

/// Channels subscribed with one command.
const SUBSCRIBE_BATCH: usize = 512;

/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Inner {
    /// Registers interest in `session` now; the future resolves once its
    /// channel is subscribed.
    pub(super) fn want(
        &self,
        session: &SessionId,
        generation: u64,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        if let Err(e) = self.check_open() {
            return futures::future::ready(Err(e)).boxed();
        }
        let (rx, stale) = {
            let mut st = self.interest.lock();
            // Wanted anew while the channel of an earlier generation is not
            // released yet: its cursor goes on, so nothing at or before it
            // reaches the new streams, whose hub slot starts empty.
            let stale = if st.wanted.contains_key(session) {
                None
            } else {
                st.cursors.get(session).copied()
            };
            let current = st.wanted.entry(session.clone()).or_insert(generation);
            *current = (*current).max(generation);
            let rx = if st.live.contains(session) {
                None
            } else {
                if !st.cursors.contains_key(session) {
                    // Shortly before now: instance clocks differ a little.
                    let now = self.local.floor();
                    let floor = EventId {
                        ms: now.ms.saturating_sub(FLOOR_MARGIN_MS),
                        seq: 0,
                    };
                    let down = !self.counters.connected.load(Ordering::Relaxed);
                    let entry = st.floors.entry(session.clone()).or_insert((floor, down));
                    entry.1 |= down;
                }
                let (tx, rx) = oneshot::channel();
                st.waiters.entry(session.clone()).or_default().push(tx);
                st.dirty.insert(session.clone());
                Some(rx)
            };
            (rx, stale)
        };
        // A stream whose replay does not reach the cursor gets a `reset` to
        // it (the hub decides per stream, once its position is known).
        if let Some(cursor) = stale {
            self.gap(session, cursor);
        }
        self.interest.changed.notify_one();
        let interest = self.interest.clone();
        let session = session.clone();
        async move {
            let Some(rx) = rx else { return Ok(()) };
            match tokio::time::timeout(RESPONSE_TIMEOUT * 2, rx).await {
                // A dropped waiter means the session was given up meanwhile.
                Ok(_) => Ok(()),
                Err(_) => {
                    // The stream goes on without the confirmation: once the
                    // channel is subscribed, catch up from when it was
                    // wanted, not from the stream's top then.
                    let mut st = interest.lock();
                    if let Some(floor) = st.floors.get_mut(&session) {
                        floor.1 = true;
                    }
                    // Its waiter went with it: an outage must not pile one
                    // up per stream opened meanwhile.
                    if let Some(waiters) = st.waiters.get_mut(&session) {
                        waiters.retain(|tx| !tx.is_closed());
                    }
                    Err(BrokerError::Unavailable(
                        "the session's channel was not confirmed in time".into(),
                    ))
                }
            }
        }
        .boxed()
    }

    /// Remembers an event this instance published through Redis until its
    /// echo arrives (only for sessions with subscribers here).
    pub(super) fn note_sent(
        &self,
        session: &SessionId,
        id: EventId,
        frame: impl FnOnce() -> Frame,
    ) {
        let mut st = self.interest.lock();
        // Not wanted here, or its echo already came (the cursor is updated
        // under this same lock): nothing to keep.
        if !st.wanted.contains_key(session) || st.cursors.get(session).is_some_and(|c| *c >= id) {
            return;
        }
        let sent = st.sent.entry(session.clone()).or_default();
        // Publishes of a session run side by side: kept in id order, which
        // is the order their echoes arrive in.
        let at = sent.partition_point(|f| f.id < id);
        sent.insert(at, frame());
        if sent.len() > MAX_SENT {
            sent.pop_front();
        }
    }

    /// Whether this instance publishes `session` through Redis although its
    /// flag is off here: events of the session published by other instances
    /// arrived through Redis within [`FOLLOW_SHARED`]. While instances
    /// disagree on the flag (each reads it at its own moment), the session
    /// then keeps one order — the sequence's — on this instance, instead of
    /// two that cross at every publish and reset its clients each time.
    pub(super) fn follows_shared(&self, session: &SessionId) -> bool {
        self.interest
            .lock()
            .shared_at
            .get(session)
            .is_some_and(|t| t.elapsed() < FOLLOW_SHARED)
    }

    /// Redis's history says another instance published `session` through
    /// Redis lately (a flag-off publish asked): followed as if its events
    /// had arrived here, so that a publish while Redis is away goes to the
    /// outbox, not only to this instance.
    pub(super) fn note_shared(&self, session: &SessionId) {
        self.interest.lock().note_shared(session);
    }

    /// Delivers own events whose echo never came and that the stream no
    /// longer had: those up to `reach`, how far the catch-up that just ran
    /// read the stream, past the cursor and in order. A later one was
    /// published after that read, on the channel already subscribed: its
    /// echo is still coming, maybe behind other instances' events, and is
    /// left to [`Self::deliver`].
    pub(super) fn deliver_unechoed(&self, session: &SessionId, reach: EventId) {
        let left: Vec<Frame> = {
            let mut st = self.interest.lock();
            let Some(sent) = st.sent.get_mut(session) else {
                return;
            };
            let upto = sent.partition_point(|f| f.id <= reach);
            let left = sent.drain(..upto).collect();
            if sent.is_empty() {
                st.sent.remove(session);
            }
            left
        };
        for frame in left {
            let id = frame.id;
            if self.deliver(session, true, false, frame) {
                tracing::warn!(backend = "redis", session = %session, id = %id,
                    "an own event missing from Redis delivered here directly");
            }
        }
    }

    /// Hands this instance's own events of `session` whose echo has not
    /// come to its subscribers now: an event of the session is about to be
    /// delivered here directly (held in the outbox while Redis is away),
    /// under a local id past theirs, and their echo may be long in coming,
    /// or never come if Redis lost them. Their echo, if it comes, is
    /// dropped. The cursor stays: other instances' events before them may
    /// still arrive (the hub answers those as late).
    pub(super) fn release_unechoed(&self, session: &SessionId) {
        let frames: Vec<Frame> = {
            let mut st = self.interest.lock();
            let Some(sent) = st.sent.remove(session) else {
                return;
            };
            let frames: Vec<Frame> = sent.into_iter().collect();
            let direct = st.direct.entry(session.clone()).or_default();
            direct.extend(frames.iter().map(|f| f.id));
            if direct.len() > MAX_SENT {
                // Oldest first out, as `sent` does: an echo that old is not
                // coming.
                let mut ids: Vec<EventId> = direct.iter().copied().collect();
                ids.sort_unstable();
                for id in &ids[..ids.len() - MAX_SENT] {
                    direct.remove(id);
                }
            }
            frames
        };
        for frame in frames {
            tracing::warn!(backend = "redis", session = %session, id = %frame.id,
                "an own event whose echo has not come delivered here directly");
            self.counters.own_received.fetch_add(1, Ordering::Relaxed);
            (self.handler)(Target::Session(session), frame);
        }
    }

    /// Withdraws interest in `session`, unless a newer generation wants it.
    pub(super) fn unwant(&self, session: &SessionId, generation: u64) {
        {
            let mut st = self.interest.lock();
            if st.wanted.get(session) != Some(&generation) {
                return;
            }
            st.wanted.remove(session);
            st.waiters.remove(session);
            st.floors.remove(session);
            // The cursor stays until the channel is released, and with it
            // what it owes: wanted again before that, the channel goes on
            // and its next event must still come behind the reset.
            st.sent.remove(session);
            st.direct.remove(session);
            st.dirty.insert(session.clone());
        }
        self.interest.changed.notify_one();
    }

    /// The subscriber task: one dedicated Pub/Sub connection, re-established
    /// with capped exponential backoff until the broker shuts down.
    pub(super) async fn run_subscriber(self: Arc<Self>) {
        let mut delay = Duration::from_millis(100);
        let mut down_logged = false;
        // Redis back: reconnect at once. Until this subscriber has caught
        // its sessions up, a loss Redis had is unmarked (resumes here are
        // refused meanwhile, see `Inner::history`).
        let mut recovered = self.redis.recoveries();
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            // A reconnect and its catch-up can take many round trips: the
            // broker's shutdown does not wait for them.
            let opened = tokio::select! {
                () = self.cancel.cancelled() => return,
                opened = self.open_subscriber() => opened,
            };
            match opened {
                Ok(mut conn) => {
                    delay = Duration::from_millis(100);
                    if down_logged {
                        tracing::info!(backend = "redis", "subscriber reconnected");
                    }
                    self.counters.connected.store(true, Ordering::Relaxed);
                    self.counters.connects.fetch_add(1, Ordering::Relaxed);
                    let stop = self.pump(&mut conn).await;
                    self.counters.connected.store(false, Ordering::Relaxed);
                    self.interest.lock().live.clear();
                    self.counters.subscribed.store(0, Ordering::Relaxed);
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
                    // Whatever it confirmed before failing is gone with it.
                    self.interest.lock().live.clear();
                    self.counters.subscribed.store(0, Ordering::Relaxed);
                    if !down_logged {
                        tracing::warn!(backend = "redis", error = %e, "cannot open the subscriber connection; retrying");
                        down_logged = true;
                    }
                }
            }
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
                _ = recovered.changed() => {}
            }
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }

    /// Connects, subscribes the broadcast channel and every wanted session,
    /// and catches up what each missed while the connection was down.
    async fn open_subscriber(&self) -> Result<PubSubConn, String> {
        let mut conn = PubSubConn::open(&self.redis, &self.keys.broadcast).await?;
        let sessions: Vec<SessionId> = {
            let mut st = self.interest.lock();
            let State {
                wanted,
                cursors,
                estimated,
                blind,
                floors,
                ..
            } = &mut *st;
            cursors.retain(|s, _| wanted.contains_key(s));
            estimated.retain(|s| cursors.contains_key(s));
            blind.retain(|s| cursors.contains_key(s));
            floors.retain(|s, _| wanted.contains_key(s));
            for (s, floor) in floors.iter_mut() {
                // Wanted before this connection: catch up from then.
                floor.1 |= !cursors.contains_key(s);
            }
            wanted.keys().cloned().collect()
        };
        let mut channels: Vec<String> = sessions.iter().map(|s| self.keys.channel(s)).collect();
        channels.push(self.keys.broadcast.clone());
        tokio::time::timeout(RESPONSE_TIMEOUT * 5, conn.subscribe(&channels))
            .await
            .map_err(|_| "subscribe timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        // Messages from here on wait on the connection while the catch-up reads
        // what was missed; the cursors drop the overlap. A catch-up that
        // cannot read gives this connection up: the next one catches up
        // from the same cursors, so nothing is skipped.
        if let Err((_, e)) = self.confirm_all(sessions).await {
            return Err(format!("catch-up failed: {e}"));
        }
        Ok(conn)
    }

    /// Reads messages until the connection ends (false) or shutdown (true),
    /// applying interest changes as they come.
    async fn pump(&self, conn: &mut PubSubConn) -> bool {
        // Changes registered before the connection came up are applied
        // first; after that only when told (every change notifies), so a
        // message costs no look at the interest state beyond its cursor.
        if !self.reconcile(conn).await {
            return false;
        }
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return true,
                () = self.interest.changed.notified() => {
                    if !self.reconcile(conn).await {
                        return false;
                    }
                }
                msg = conn.next() => match msg {
                    Some(Incoming::Message(msg)) => self.handle(&msg),
                    Some(Incoming::Dropped(channel)) => self.dropped(&channel),
                    None => return false,
                },
            }
        }
    }

    /// Redis ended a channel's subscription by itself (a cluster moved its
    /// slot, or demoted its node): subscribe it again on the next round,
    /// which also catches up from its cursor.
    fn dropped(&self, channel: &str) {
        let Some(session) = self.keys.session_of(channel) else {
            return;
        };
        {
            let mut st = self.interest.lock();
            // Not wanted: the client's own unsubscribe, confirmed.
            if !st.wanted.contains_key(&session) || !st.live.remove(&session) {
                return;
            }
            st.dirty.insert(session.clone());
            self.counters
                .subscribed
                .store(st.live.len() as u64, Ordering::Relaxed);
        }
        tracing::info!(
            backend = "redis",
            channel,
            "Redis moved the channel; subscribing it again"
        );
        self.counters.resubscribes.fetch_add(1, Ordering::Relaxed);
        self.interest.changed.notify_one();
    }

    /// Brings the connection's channels in line with what is wanted. False
    /// if the connection failed.
    async fn reconcile(&self, conn: &mut PubSubConn) -> bool {
        let changes: Vec<(SessionId, bool)> = {
            let mut st = self.interest.lock();
            let dirty: Vec<SessionId> = st.dirty.drain().collect();
            dirty
                .into_iter()
                .filter_map(|s| {
                    let want = st.wanted.contains_key(&s);
                    (want != st.live.contains(&s)).then_some((s, want))
                })
                .collect()
        };
        let (subscribe, unsubscribe): (Vec<_>, Vec<_>) =
            changes.into_iter().partition(|(_, want)| *want);
        for (session, _) in unsubscribe {
            let channel = self.keys.channel(&session);
            let result = tokio::time::timeout(RESPONSE_TIMEOUT, conn.unsubscribe(&channel)).await;
            if !matches!(result, Ok(Ok(()))) {
                tracing::warn!(
                    backend = "redis",
                    channel,
                    "subscription change failed; reconnecting"
                );
                // Still dirty: the next connection subscribes what is wanted.
                self.interest.lock().dirty.insert(session);
                return false;
            }
            let mut st = self.interest.lock();
            st.live.remove(&session);
            if !st.wanted.contains_key(&session) {
                st.cursors.remove(&session);
                st.estimated.remove(&session);
                st.blind.remove(&session);
            } else {
                // Wanted again meanwhile: subscribe it on the next round.
                st.dirty.insert(session);
                self.interest.changed.notify_one();
            }
            self.counters
                .subscribed
                .store(st.live.len() as u64, Ordering::Relaxed);
        }
        // New sessions in batches: one SUBSCRIBE for many channels, then
        // their confirmations side by side.
        let mut subscribe: Vec<SessionId> = subscribe.into_iter().map(|(s, _)| s).collect();
        while !subscribe.is_empty() {
            let rest = subscribe.split_off(subscribe.len().min(SUBSCRIBE_BATCH));
            let batch = std::mem::replace(&mut subscribe, rest);
            let channels: Vec<String> = batch.iter().map(|s| self.keys.channel(s)).collect();
            let result =
                tokio::time::timeout(RESPONSE_TIMEOUT * 5, conn.subscribe(&channels)).await;
            if !matches!(result, Ok(Ok(()))) {
                tracing::warn!(
                    backend = "redis",
                    channels = channels.len(),
                    "subscription change failed; reconnecting"
                );
                // Still dirty: the next connection subscribes what is wanted.
                self.interest
                    .lock()
                    .dirty
                    .extend(batch.into_iter().chain(subscribe));
                return false;
            }
            if let Err((failed, _)) = self.confirm_all(batch).await {
                self.interest
                    .lock()
                    .dirty
                    .extend(failed.into_iter().chain(subscribe));
                return false;
            }
        }
        true
    }

    fn handle(&self, msg: &redis::Msg) {
        let channel = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        self.counters.messages_in.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_in
            .fetch_add((channel.len() + payload.len()) as u64, Ordering::Relaxed);
        let target = if channel == self.keys.broadcast {
            None
        } else {
            match self.keys.session_of(channel) {
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
        let env = match envelope::decode(payload) {
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
        let own = env.node == self.settings.node_id;
        match target {
            Some(session) => {
                let frame = sse::frame(env.id, &env.event_type, &env.data);
                self.deliver(&session, own, env.held, frame);
            }
            None => {
                if env.held && own {
                    return;
                }
                (self.handler)(Target::All, sse::announcement(&env.event_type, &env.data));
            }
        }
    }

    /// Hands a session's event to the handler unless it is a repeat (at or
    /// before the cursor) or an outbox event of this instance (delivered
    /// when it was held). Returns whether it was new.
    ///
    /// Own events sent before this one whose echo never came are handed
    /// over first: the channel and the stream carry a session's events in
    /// id order, so an event past them means theirs is not coming (Redis
    /// lost it before the echo went out, or while this connection was
    /// down). A subscriber here never misses an event its own instance
    /// published, whatever arrives first.
    pub(super) fn deliver(&self, session: &SessionId, own: bool, held: bool, frame: Frame) -> bool {
        let mut unechoed = Vec::new();
        let mut blind_until = None;
        let delivered_already;
        {
            let mut st = self.interest.lock();
            match st.cursors.get_mut(session) {
                // Not subscribed (any more): nobody here wants it.
                None => return false,
                Some(cursor) if frame.id <= *cursor => {
                    drop(st);
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                Some(cursor) => *cursor = frame.id,
            }
            st.estimated.remove(session);
            // Empty but for a misconfigured Redis: no hash per message.
            if !st.blind.is_empty() && st.blind.remove(session) {
                blind_until = frame.id.predecessor();
            }
            delivered_already = match st.direct.get_mut(session) {
                Some(direct) => {
                    let had = direct.remove(&frame.id);
                    direct.retain(|id| *id > frame.id);
                    if direct.is_empty() {
                        st.direct.remove(session);
                    }
                    had
                }
                None => false,
            };
            if let Some(sent) = st.sent.get_mut(session) {
                while let Some(first) = sent.front() {
                    if first.id > frame.id {
                        break;
                    }
                    let first = sent.pop_front();
                    if let Some(first) = first.filter(|f| f.id < frame.id) {
                        unechoed.push(first);
                    }
                }
            }
            if !own {
                st.note_shared(session);
            }
        }
        // The session's ids grow in publish order: everything published
        // while its history could not be read came before this event.
        if let Some(at) = blind_until {
            self.gap(session, at);
        }
        for missing in unechoed {
            tracing::warn!(backend = "redis", session = %session, id = %missing.id,
                "an own event missing from Redis delivered here directly");
            self.counters.own_received.fetch_add(1, Ordering::Relaxed);
            (self.handler)(Target::Session(session), missing);
        }
        self.local.observe(frame.id);
        if (own && held) || delivered_already {
            return true;
        }
        let counter = if own {
            &self.counters.own_received
        } else {
            &self.counters.received
        };
        counter.fetch_add(1, Ordering::Relaxed);
        (self.handler)(Target::Session(session), frame);
        true
    }
}
