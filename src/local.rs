//! [`LocalBroadcaster`]: the in-process connection map, session id → live
//! subscribers. The default broadcaster; needs nothing external.
//!
//! Each session with subscribers has one `tokio::sync::broadcast` channel.
//! A publish encodes the event once and sends the shared [`Frame`] into it;
//! each subscriber's receiver holds only a cursor into the channel's ring,
//! so an idle subscriber costs a few dozen bytes and a stalled one cannot
//! grow memory past the ring (it lags and is cut instead).
//!
//! The map is behind a `std::sync::Mutex`, not a tokio one: it is never held
//! across an `.await`, and the critical sections are a hash lookup and a
//! channel send.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::{self, BoxFuture, FutureExt};
use tokio::sync::broadcast;

use crate::broadcaster::{BroadcastError, Broadcaster, BroadcasterStats, Subscription};
use crate::event::{EventId, Frame, IdGenerator, OutgoingEvent, SessionId};
use crate::history::{History, HistoryLimits, Replay};
use crate::sse::encode_event;

/// Default length of each session's queue (events a subscriber may fall
/// behind before it is cut).
pub const DEFAULT_QUEUE: usize = 256;

/// The in-process broadcaster. Cheap to clone; clones share the same map.
#[derive(Clone)]
pub struct LocalBroadcaster {
    inner: Arc<Inner>,
}

struct Inner {
    /// Live sessions. An entry exists exactly while its channel has a receiver.
    sessions: Mutex<HashMap<SessionId, broadcast::Sender<Frame>>>,
    /// Ids are handed out under the map lock, so within a session they reach
    /// subscribers in increasing order.
    ids: IdGenerator,
    /// Length of each session's channel.
    queue: usize,
    /// Set by `shutdown`; new subscriptions are refused afterwards.
    closed: AtomicBool,
    subscribers: AtomicUsize,
    published: AtomicU64,
    /// Told when a session gains its first subscriber or loses its last
    /// (the Redis broadcaster subscribes and unsubscribes channels on it).
    hook: Option<Arc<dyn SessionHook>>,
    /// Every event published here (`publish_now`), kept for resume whether
    /// or not the session has subscribers at the moment.
    history: History,
}

/// Observes sessions appearing in and leaving the map. Called with the map
/// lock held, so it must not block or call back into the broadcaster.
pub trait SessionHook: Send + Sync + 'static {
    fn session_changed(&self, session: &SessionId);
}

impl Default for LocalBroadcaster {
    fn default() -> Self {
        Self::new(DEFAULT_QUEUE)
    }
}

impl LocalBroadcaster {
    /// `queue` is how many events a subscriber may fall behind before it is
    /// cut (at least 1).
    pub fn new(queue: usize) -> Self {
        Self::build(queue, None, HistoryLimits::default())
    }

    /// A broadcaster whose history keeps `limits`.
    pub fn with_history(queue: usize, limits: HistoryLimits) -> Self {
        Self::build(queue, None, limits)
    }

    /// A broadcaster that tells `hook` about first and last subscribers.
    pub fn with_hook(queue: usize, hook: Arc<dyn SessionHook>, limits: HistoryLimits) -> Self {
        Self::build(queue, Some(hook), limits)
    }

    fn build(queue: usize, hook: Option<Arc<dyn SessionHook>>, limits: HistoryLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                sessions: Mutex::new(HashMap::new()),
                ids: IdGenerator::new(),
                queue: queue.max(1),
                closed: AtomicBool::new(false),
                subscribers: AtomicUsize::new(0),
                published: AtomicU64::new(0),
                hook,
                history: History::new(limits),
            }),
        }
    }

    /// Publishes without a future: the local path never waits.
    pub fn publish_now(
        &self,
        session: &SessionId,
        event: &OutgoingEvent,
    ) -> Result<EventId, BroadcastError> {
        self.check_open()?;
        let sessions = self.inner.lock();
        let id = self.inner.ids.next_id();
        let frame = Frame {
            id,
            bytes: encode_event(Some(id), &event.event_type, &event.data),
        };
        // Recorded under the map lock, so history holds events in id order.
        self.inner.history.record(session, &frame);
        if let Some(tx) = sessions.get(session) {
            // An error only means every receiver left since the lookup.
            let _ = tx.send(frame);
        }
        drop(sessions);
        self.inner.published.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Publishes to every live session; the event is encoded once.
    pub fn publish_all_now(&self, event: &OutgoingEvent) -> Result<EventId, BroadcastError> {
        self.check_open()?;
        let sessions = self.inner.lock();
        let id = self.inner.ids.next_id();
        let frame = Frame {
            id,
            bytes: encode_event(Some(id), &event.event_type, &event.data),
        };
        for (session, tx) in sessions.iter() {
            self.inner.history.record(session, &frame);
            let _ = tx.send(frame.clone());
        }
        drop(sessions);
        self.inner.published.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Subscribes without a future.
    pub fn subscribe_now(&self, session: &SessionId) -> Result<Subscription, BroadcastError> {
        self.check_open()?;
        let mut sessions = self.inner.lock();
        let rx = match sessions.get(session) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.inner.queue);
                sessions.insert(session.clone(), tx);
                if let Some(hook) = &self.inner.hook {
                    hook.session_changed(session);
                }
                rx
            }
        };
        drop(sessions);
        self.inner.subscribers.fetch_add(1, Ordering::Relaxed);
        Ok(Subscription::new(
            rx,
            Unsubscribe {
                inner: self.inner.clone(),
                session: session.clone(),
            },
        ))
    }

    /// Delivers a frame that already has its id (an event published on
    /// another instance) to this instance's subscribers of `session`.
    pub fn deliver(&self, session: &SessionId, frame: Frame) {
        if let Some(tx) = self.inner.lock().get(session) {
            let _ = tx.send(frame);
        }
    }

    /// Delivers a frame that already has its id to every local session.
    pub fn deliver_all(&self, frame: &Frame) {
        for tx in self.inner.lock().values() {
            let _ = tx.send(frame.clone());
        }
    }

    /// A fresh local id (for events that get no id from elsewhere).
    pub fn next_id(&self) -> EventId {
        self.inner.ids.next_id()
    }

    /// Makes later local ids greater than `id` (seen from Redis).
    pub fn observe(&self, id: EventId) {
        self.inner.ids.observe(id);
    }

    /// The events of `session` after `after` that were published here.
    pub fn replay_now(&self, session: &SessionId, after: EventId) -> Replay {
        self.inner.history.after(session, after)
    }

    /// The newest id of `session` published here, or `0-0`.
    pub fn position_now(&self, session: &SessionId) -> EventId {
        self.inner.history.newest(session).unwrap_or_default()
    }

    /// Sessions with history here, and the bytes it holds.
    pub fn history_usage(&self) -> (usize, usize) {
        self.inner.history.usage()
    }

    /// Whether `session` has a live subscriber here.
    pub fn has_session(&self, session: &SessionId) -> bool {
        self.inner.lock().contains_key(session)
    }

    /// Sessions with live subscribers here.
    pub fn sessions(&self) -> Vec<SessionId> {
        self.inner.lock().keys().cloned().collect()
    }

    pub(crate) fn subscriber_count(&self) -> usize {
        self.inner.subscribers.load(Ordering::Relaxed)
    }

    pub(crate) fn published_count(&self) -> u64 {
        self.inner.published.load(Ordering::Relaxed)
    }

    /// Marks closed and ends every subscription.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        // Dropping every sender ends every subscription stream.
        self.inner.lock().clear();
    }

    /// Number of sessions with live subscribers.
    pub fn session_count(&self) -> usize {
        self.inner.lock().len()
    }

    fn check_open(&self) -> Result<(), BroadcastError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(BroadcastError::Closed)
        } else {
            Ok(())
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<SessionId, broadcast::Sender<Frame>>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every critical section is a single insert, remove or send), so a
        // poisoned lock is still safe to use.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes the session's entry when its last subscriber leaves.
struct Unsubscribe {
    inner: Arc<Inner>,
    session: SessionId,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        self.inner.subscribers.fetch_sub(1, Ordering::Relaxed);
        let mut sessions = self.inner.lock();
        // The receiver was dropped just before this guard (field order in
        // `Subscription`), and new receivers are only made under this lock.
        if sessions
            .get(&self.session)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            sessions.remove(&self.session);
            if let Some(hook) = &self.inner.hook {
                hook.session_changed(&self.session);
            }
        }
    }
}

impl Broadcaster for LocalBroadcaster {
    fn publish<'a>(
        &'a self,
        session: &'a SessionId,
        event: OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BroadcastError>> {
        future::ready(self.publish_now(session, &event)).boxed()
    }

    fn publish_all(&self, event: OutgoingEvent) -> BoxFuture<'_, Result<EventId, BroadcastError>> {
        future::ready(self.publish_all_now(&event)).boxed()
    }

    fn subscribe<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<Subscription, BroadcastError>> {
        future::ready(self.subscribe_now(session)).boxed()
    }

    fn replay<'a>(&'a self, session: &'a SessionId, after: EventId) -> BoxFuture<'a, Replay> {
        future::ready(self.replay_now(session, after)).boxed()
    }

    fn position<'a>(&'a self, session: &'a SessionId) -> BoxFuture<'a, EventId> {
        future::ready(self.position_now(session)).boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.close();
        future::ready(()).boxed()
    }

    fn stats(&self) -> BroadcasterStats {
        BroadcasterStats {
            mode: "local",
            sessions: self.session_count(),
            subscribers: self.subscriber_count(),
            published: self.published_count(),
            history_sessions: self.history_usage().0,
            history_bytes: self.history_usage().1,
            redis: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broadcaster::SubscriptionError;
    use crate::event::EventType;
    use futures::StreamExt;

    fn ev(n: u32) -> OutgoingEvent {
        OutgoingEvent::new(EventType::from_static("n"), n.to_string())
    }

    #[tokio::test]
    async fn delivers_in_order_and_shares_bytes() {
        let b = LocalBroadcaster::default();
        let s = SessionId::parse("s1").unwrap();
        let mut a = b.subscribe_now(&s).unwrap();
        let mut c = b.subscribe_now(&s).unwrap();
        let ids: Vec<_> = (0..5).map(|n| b.publish_now(&s, &ev(n)).unwrap()).collect();
        for id in ids {
            let fa = a.next().await.unwrap().unwrap();
            let fc = c.next().await.unwrap().unwrap();
            assert_eq!(fa.id, id);
            // Same allocation: encoded once, shared.
            assert_eq!(fa.bytes.as_ptr(), fc.bytes.as_ptr());
        }
    }

    #[tokio::test]
    async fn last_subscriber_leaving_removes_the_entry() {
        let b = LocalBroadcaster::default();
        let s = SessionId::parse("s1").unwrap();
        let a = b.subscribe_now(&s).unwrap();
        let c = b.subscribe_now(&s).unwrap();
        assert_eq!(b.session_count(), 1);
        drop(a);
        assert_eq!(b.session_count(), 1);
        drop(c);
        assert_eq!(b.session_count(), 0);
        assert_eq!(b.stats().subscribers, 0);
    }

    #[tokio::test]
    async fn sessions_are_isolated_and_publish_all_reaches_all() {
        let b = LocalBroadcaster::default();
        let (s1, s2) = (
            SessionId::parse("s1").unwrap(),
            SessionId::parse("s2").unwrap(),
        );
        let mut a = b.subscribe_now(&s1).unwrap();
        let mut c = b.subscribe_now(&s2).unwrap();
        b.publish_now(&s1, &ev(1)).unwrap();
        let all = b.publish_all_now(&ev(2)).unwrap();
        assert!(a
            .next()
            .await
            .unwrap()
            .unwrap()
            .bytes
            .ends_with(b"data: 1\n\n"));
        assert_eq!(a.next().await.unwrap().unwrap().id, all);
        assert_eq!(c.next().await.unwrap().unwrap().id, all);
    }

    #[tokio::test]
    async fn a_stalled_subscriber_lags_instead_of_growing() {
        let b = LocalBroadcaster::new(4);
        let s = SessionId::parse("s1").unwrap();
        let mut slow = b.subscribe_now(&s).unwrap();
        for n in 0..10 {
            b.publish_now(&s, &ev(n)).unwrap();
        }
        assert!(matches!(
            slow.next().await,
            Some(Err(SubscriptionError::Lagged(6)))
        ));
    }

    #[tokio::test]
    async fn shutdown_ends_subscriptions() {
        let b = LocalBroadcaster::default();
        let s = SessionId::parse("s1").unwrap();
        let mut a = b.subscribe_now(&s).unwrap();
        Broadcaster::shutdown(&b).await;
        assert!(a.next().await.is_none());
        assert!(b.subscribe_now(&s).is_err());
    }
}
