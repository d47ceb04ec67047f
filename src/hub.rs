//! [`Hub`]: the in-process connection map, session id → the subscribers
//! connected to this instance. It knows nothing of brokers or Redis: it
//! hands out [`Subscription`]s and delivers frames it is given.
//!
//! Each subscriber has a [`Sink`](crate::sink): a bounded queue its stream
//! task reads, or, once the stream's writer handed over its socket, a
//! direct write from the delivering task. A delivery offers the shared
//! [`Frame`] to each sink of the session in turn, so it is encoded once and
//! each subscriber costs a pointer copy or one `write`. An idle subscriber
//! holds an empty queue; a stalled one cannot grow memory past its queue's
//! bound (it is cut instead).
//!
//! A session's presence here has a **generation**: a number that grows each
//! time the session gains its first subscriber. [`Hub::subscribe`] returns it
//! (and whether the subscriber is the first); when the last one leaves, the hub's
//! vacancy callback is told the same number. A broker that subscribes and
//! unsubscribes channels on these signals can then apply them in any order
//! (an unsubscribe for an older generation is stale), so the hub never calls
//! out while holding its lock.
//!
//! **Order.** The hub remembers the newest id it delivered per session. An
//! id names one event (see [`EventId`]), so a repeat of it is the same event
//! again and is dropped. An older id arriving late (events of one session
//! that crossed on their way here: a session's flag differing between
//! instances, two instances publishing through a Redis outage) is not
//! delivered out of order: the session's streams get a `reset` instead,
//! carrying the newest id, so their clients reload their state rather than
//! silently keep a gap. Counted as `order_resets`.
//!
//! **One reset per episode.** A reset stands for every event up to the id
//! it carries: the client reloads its state after it, and its next resume
//! starts there. Events at or before that id that arrive late afterwards
//! are dropped (`covered_by_reset`), not answered with more resets: their
//! ids were taken before the reset was sent (a session's sequence hands
//! out ids in order), so the reload that follows it already reflects them.
//! A late event past that id starts a new episode. Each subscriber keeps
//! its own episode ([`Sink::offer_reset`]): one that joined after a reset
//! never got it, and one whose client loaded its state when it connected
//! (a fresh stream, a resume answered with `reset`) needs none for events
//! from before that load. A reset never moves a client back: a stream that
//! resumed past what this instance has delivered gets its own position.
//!
//! The map is behind a `std::sync::Mutex` held only to find, add or remove a
//! session; each session's subscribers are behind a mutex of their own,
//! held while a delivery offers them a frame (which keeps its order). No
//! lock is held across an `.await`; the map's lock is taken before a
//! session's, never after.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;

use crate::event::{EventId, Frame, SessionId};
use crate::sink::{DirectWriter, Ended, Offered, Sink};
use crate::sse;

/// Default length of each session's queue (events a subscriber may fall
/// behind before it is cut).
pub const DEFAULT_QUEUE: usize = 256;

/// The hub refuses new subscribers after [`Hub::close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the hub is closed")]
pub struct Closed;

/// Called when a session loses its last subscriber, with the generation
/// [`Hub::subscribe`] returned for its first.
pub type OnVacated = Box<dyn Fn(&SessionId, u64) + Send + Sync>;

/// The connection map. Cheap to clone; clones share the same map.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    sessions: Mutex<Map>,
    queue: usize,
    closed: AtomicBool,
    subscribers: AtomicUsize,
    order_resets: AtomicU64,
    covered_by_reset: AtomicU64,
    /// Frames handed to subscriptions (one per subscriber per event).
    deliveries: AtomicU64,
    on_vacated: OnceLock<OnVacated>,
}

#[derive(Default)]
struct Map {
    slots: HashMap<SessionId, Arc<Slot>>,
    next_generation: u64,
}

/// One session's presence here.
struct Slot {
    generation: u64,
    members: Mutex<Members>,
}

struct Members {
    sinks: Vec<Arc<Sink>>,
    /// The newest id delivered to this session here.
    last: EventId,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Members> {
        // As for the map: every critical section leaves it consistent.
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`Hub::subscribe`] hands back.
#[derive(Debug)]
pub struct Joined {
    pub subscription: Subscription,
    /// The generation of the session's presence here.
    pub generation: u64,
    /// Whether this is the session's first subscriber here.
    pub first: bool,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(DEFAULT_QUEUE)
    }
}

impl Hub {
    /// `queue` is how many events a subscriber may fall behind before it is
    /// cut (at least 1).
    pub fn new(queue: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                sessions: Mutex::new(Map::default()),
                queue: queue.max(1),
                closed: AtomicBool::new(false),
                subscribers: AtomicUsize::new(0),
                order_resets: AtomicU64::new(0),
                covered_by_reset: AtomicU64::new(0),
                deliveries: AtomicU64::new(0),
                on_vacated: OnceLock::new(),
            }),
        }
    }

    /// Sets the callback told when a session loses its last subscriber. It
    /// runs on the dropping task, outside the hub's lock; it must not block.
    /// Only the first call takes effect.
    pub fn on_vacated(&self, f: OnVacated) {
        let _ = self.inner.on_vacated.set(f);
    }

    /// Adds a subscriber to `session`. Frames delivered after this returns
    /// reach it, in delivery order; dropping it unsubscribes.
    pub fn subscribe(&self, session: &SessionId) -> Result<Joined, Closed> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Closed);
        }
        let sink = Arc::new(Sink::default());
        let mut map = self.inner.lock();
        let (generation, first, joined_after) = match map.slots.get(session) {
            Some(slot) => {
                let mut members = slot.lock();
                members.sinks.push(sink.clone());
                (slot.generation, false, members.last)
            }
            None => {
                map.next_generation += 1;
                let generation = map.next_generation;
                let slot = Slot {
                    generation,
                    members: Mutex::new(Members {
                        sinks: vec![sink.clone()],
                        last: EventId::ZERO,
                    }),
                };
                map.slots.insert(session.clone(), Arc::new(slot));
                (generation, true, EventId::ZERO)
            }
        };
        drop(map);
        self.inner.subscribers.fetch_add(1, Ordering::Relaxed);
        let guard = Leave {
            inner: self.inner.clone(),
            session: session.clone(),
            sink: sink.clone(),
        };
        Ok(Joined {
            subscription: Subscription {
                sink,
                guard,
                joined_after,
            },
            generation,
            first,
        })
    }

    /// Delivers `frame` to this instance's subscribers of `session`, in id
    /// order (see the module docs). Returns whether the session had any.
    pub fn deliver(&self, session: &SessionId, frame: Frame) -> bool {
        let Some(slot) = self.inner.lock().slots.get(session).cloned() else {
            return false;
        };
        let mut members = slot.lock();
        if members.sinks.is_empty() {
            // Its last subscriber left since the lookup.
            return false;
        }
        let frame = if frame.id == EventId::ZERO || frame.id > members.last {
            if frame.id != EventId::ZERO {
                members.last = frame.id;
            }
            frame
        } else if frame.id == members.last {
            return true;
        } else {
            self.inner.late(&members, frame.id);
            return true;
        };
        self.inner.offer(&members.sinks, &frame);
        true
    }

    /// Tells the subscribers of `session` that events up to `at` are gone
    /// for them (see [`crate::broker::Target::Gap`]): each one not already
    /// past `at` gets a `reset` to the newest id delivered here or `at`,
    /// whichever is further. Returns whether the session had any.
    pub fn reset_to(&self, session: &SessionId, at: EventId) -> bool {
        let Some(slot) = self.inner.lock().slots.get(session).cloned() else {
            return false;
        };
        let mut members = slot.lock();
        if members.sinks.is_empty() {
            return false;
        }
        members.last = members.last.max(at);
        let newest = members.last;
        let shared = sse::gap_reset(newest);
        let now = tokio::time::Instant::now();
        let mut sent = 0;
        for sink in &members.sinks {
            let offered = sink.offer_gap(&shared, newest, self.inner.queue, now);
            if matches!(offered, Offered::Written | Offered::Queued) {
                sent += 1;
            }
        }
        self.inner.deliveries.fetch_add(sent, Ordering::Relaxed);
        true
    }

    /// Late events dropped because a reset already stood for them.
    pub fn covered_by_reset(&self) -> u64 {
        self.inner.covered_by_reset.load(Ordering::Relaxed)
    }

    /// Frames handed to subscriptions so far (one per subscriber per event).
    pub fn deliveries(&self) -> u64 {
        self.inner.deliveries.load(Ordering::Relaxed)
    }

    /// Late events answered with a `reset` instead of being delivered out
    /// of order.
    pub fn order_resets(&self) -> u64 {
        self.inner.order_resets.load(Ordering::Relaxed)
    }

    /// Delivers `frame` to every session with subscribers here.
    pub fn deliver_all(&self, frame: &Frame) {
        let slots: Vec<Arc<Slot>> = self.inner.lock().slots.values().cloned().collect();
        for slot in slots {
            self.inner.offer(&slot.lock().sinks, frame);
        }
    }

    /// Whether `session` has a subscriber here.
    pub fn contains(&self, session: &SessionId) -> bool {
        self.inner.lock().slots.contains_key(session)
    }

    /// Sessions with subscribers here.
    pub fn sessions(&self) -> Vec<SessionId> {
        self.inner.lock().slots.keys().cloned().collect()
    }

    /// Number of sessions with subscribers here.
    pub fn session_count(&self) -> usize {
        self.inner.lock().slots.len()
    }

    /// Number of live subscriptions.
    pub fn subscriber_count(&self) -> usize {
        self.inner.subscribers.load(Ordering::Relaxed)
    }

    /// Refuses new subscribers and ends every subscription.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let slots: Vec<Arc<Slot>> = self.inner.lock().slots.drain().map(|(_, s)| s).collect();
        for slot in slots {
            for sink in &slot.lock().sinks {
                sink.close();
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Map> {
        // Every critical section is a single insert, remove or send, so a
        // poisoned lock still guards a consistent map.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers a late event: each subscriber gets a reset unless its last
    /// one (or its client's load) already stands for the event; see
    /// [`Sink::offer_reset`].
    fn late(&self, members: &Members, late: EventId) {
        let newest = members.last;
        let shared = sse::order_reset(newest, late);
        let now = tokio::time::Instant::now();
        let mut sent = 0;
        for sink in &members.sinks {
            let offered = sink.offer_reset(&shared, newest, late, self.queue, now);
            if matches!(offered, Offered::Written | Offered::Queued) {
                sent += 1;
            }
        }
        self.deliveries.fetch_add(sent, Ordering::Relaxed);
        let counter = if sent > 0 {
            &self.order_resets
        } else {
            &self.covered_by_reset
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Offers `frame` to each of a session's sinks (its lock held by the
    /// caller, which keeps deliveries in order).
    fn offer(&self, sinks: &[Arc<Sink>], frame: &Frame) {
        let (mut delivered, mut direct) = (0, false);
        // One clock read for the session, not one per subscriber.
        let now = tokio::time::Instant::now();
        for sink in sinks {
            match sink.offer(frame, self.queue, now) {
                Offered::Written => {
                    delivered += 1;
                    direct = true;
                }
                Offered::Queued => delivered += 1,
                Offered::Dropped => {}
            }
        }
        self.deliveries.fetch_add(delivered, Ordering::Relaxed);
        if direct {
            // Written together, in this one pass: one observation stands
            // for all of them (a queued write is observed by its stream).
            crate::metrics::written(frame.id);
        }
    }
}

/// Takes the subscriber out of its session, and the session out of the map
/// when it was the last.
struct Leave {
    inner: Arc<Inner>,
    session: SessionId,
    sink: Arc<Sink>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.inner.subscribers.fetch_sub(1, Ordering::Relaxed);
        // The session's own lock first, without the map's: a delivery may
        // hold it while it writes, and other sessions must not wait for that.
        // The slot found by name is this sink's: a slot leaves the map only
        // when empty, and this sink is in it until here.
        let Some(slot) = self.inner.lock().slots.get(&self.session).cloned() else {
            return; // The hub closed.
        };
        let empty = {
            let mut members = slot.lock();
            members.sinks.retain(|s| !Arc::ptr_eq(s, &self.sink));
            members.sinks.is_empty()
        };
        if !empty {
            return;
        }
        let vacated = {
            let mut map = self.inner.lock();
            // Sinks are only added under the map's lock: still empty now
            // means empty until it is removed.
            let still = map
                .slots
                .get(&self.session)
                .is_some_and(|s| Arc::ptr_eq(s, &slot) && s.lock().sinks.is_empty());
            if still {
                map.slots.remove(&self.session);
            }
            still.then_some(slot.generation)
        };
        if let (Some(generation), Some(f)) = (vacated, self.inner.on_vacated.get()) {
            f(&self.session, generation);
        }
    }
}

/// What a [`Subscription`] yields besides frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscriptionError {
    /// The subscriber fell behind by more than its queue holds and missed
    /// `.0` events; it must reconnect (and resume by id).
    #[error("subscriber lagged behind by {0} events")]
    Lagged(u64),
    /// A write straight into the stream's socket failed: its client is
    /// gone.
    #[error("the stream's connection is gone")]
    Gone,
}

/// The stream of frames for one subscriber of one session.
///
/// Each subscription has a bounded queue: a subscriber that falls more than
/// the queue's length behind gets [`SubscriptionError::Lagged`] instead of
/// growing memory. Dropping the subscription unsubscribes.
pub struct Subscription {
    sink: Arc<Sink>,
    guard: Leave,
    /// The newest id this hub had delivered for the session when this
    /// subscriber joined: that event and those before it never reach it.
    joined_after: EventId,
}

impl Subscription {
    /// The handle through which the stream's writer may let deliveries
    /// write into its socket directly (see [`DirectWriter`]).
    pub fn direct_writer(&self) -> DirectWriter {
        DirectWriter(self.sink.clone())
    }

    /// Frames with ids up to `position` are not yielded (the client is past
    /// them).
    pub(crate) fn set_position(&self, position: EventId) {
        self.sink.set_position(position);
    }

    /// The stream has opened at its position; `loaded`: its client loads
    /// its state there.
    pub(crate) fn opened(&self, loaded: bool) {
        self.sink.opened(loaded);
    }

    pub(crate) fn raise_position(&self, position: EventId) {
        self.sink.raise_position(position);
    }

    /// The newest id delivered here for the session before this subscriber
    /// joined (`0-0` for the first): a stream whose replay does not reach
    /// it must not start below it, or the events between would be missing
    /// without a word.
    pub(crate) fn joined_after(&self) -> EventId {
        self.joined_after
    }

    /// The number of live subscriptions of this hub: the streams that would
    /// all reconnect at once if this instance died.
    pub(crate) fn herd(&self) -> usize {
        self.guard.inner.subscribers.load(Ordering::Relaxed)
    }

    /// When a delivered frame last went out to this subscriber.
    pub(crate) fn last_out(&self) -> Option<tokio::time::Instant> {
        self.sink.last_out()
    }

    /// Yields `bytes` after what is queued (the writer's heartbeat).
    pub(crate) fn push_own(&self, bytes: Bytes) {
        self.sink.push_own(bytes);
    }

    /// Yields `last` after what is queued, then ends.
    pub(crate) fn seal(&self, last: Bytes) {
        self.sink.seal(last);
    }
}

impl Stream for Subscription {
    type Item = Result<Frame, SubscriptionError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.sink.poll_next(cx).map(|item| {
            item.map(|r| {
                r.map_err(|why| match why {
                    Ended::Lagged(n) => SubscriptionError::Lagged(n),
                    Ended::Gone | Ended::Closed => SubscriptionError::Gone,
                })
            })
        })
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventId, EventType};
    use crate::sse::frame;
    use futures::StreamExt;
    use std::sync::atomic::AtomicU64;

    fn s(id: &str) -> SessionId {
        SessionId::parse(id).unwrap()
    }

    fn f(n: u64) -> Frame {
        frame(
            EventId { ms: n, seq: 0 },
            &EventType::from_static("n"),
            &n.to_string(),
        )
    }

    #[tokio::test]
    async fn first_and_last_subscriber_are_reported_with_one_generation() {
        let hub = Hub::default();
        let vacated = Arc::new(AtomicU64::new(0));
        let seen = vacated.clone();
        hub.on_vacated(Box::new(move |_, g| seen.store(g, Ordering::SeqCst)));
        let a = hub.subscribe(&s("x")).unwrap();
        let b = hub.subscribe(&s("x")).unwrap();
        assert!(a.first && !b.first);
        let g = a.generation;
        assert_eq!(b.generation, g);
        drop(a);
        assert_eq!(vacated.load(Ordering::SeqCst), 0, "one subscriber left");
        drop(b);
        assert_eq!(vacated.load(Ordering::SeqCst), g);
        assert_eq!(hub.session_count(), 0);
        // The next occupancy has a newer generation.
        let c = hub.subscribe(&s("x")).unwrap();
        assert!(c.first && c.generation > g);
    }

    #[tokio::test]
    async fn delivers_in_order_shares_bytes_and_isolates_sessions() {
        let hub = Hub::default();
        let mut a = hub.subscribe(&s("x")).unwrap().subscription;
        let mut b = hub.subscribe(&s("x")).unwrap().subscription;
        let mut other = hub.subscribe(&s("y")).unwrap().subscription;
        for n in 1..=3 {
            assert!(hub.deliver(&s("x"), f(n)));
        }
        assert!(!hub.deliver(&s("nobody"), f(9)));
        for n in 1..=3 {
            let fa = a.next().await.unwrap().unwrap();
            let fb = b.next().await.unwrap().unwrap();
            assert_eq!(fa.id.ms, n);
            assert_eq!(fa.bytes.as_ptr(), fb.bytes.as_ptr(), "encoded once");
        }
        hub.deliver_all(&f(7));
        assert_eq!(other.next().await.unwrap().unwrap().id.ms, 7);
        assert_eq!(a.next().await.unwrap().unwrap().id.ms, 7);
    }

    #[tokio::test]
    async fn a_late_older_id_becomes_a_reset_and_a_repeat_is_dropped() {
        let hub = Hub::default();
        let mut a = hub.subscribe(&s("x")).unwrap().subscription;
        hub.deliver(&s("x"), f(5));
        hub.deliver(&s("x"), f(5));
        hub.deliver(&s("x"), f(3));
        hub.deliver(&s("x"), f(6));
        assert_eq!(a.next().await.unwrap().unwrap().id.ms, 5);
        let reset = a.next().await.unwrap().unwrap();
        assert_eq!(reset.id, EventId::ZERO, "never filtered as a repeat");
        assert!(reset.bytes.starts_with(b"id: 5-0\nevent: reset\n"));
        assert_eq!(a.next().await.unwrap().unwrap().id.ms, 6);
        assert_eq!(hub.order_resets(), 1);
    }

    #[tokio::test]
    async fn one_reset_stands_for_every_late_event_up_to_its_id() {
        let hub = Hub::default();
        let mut a = hub.subscribe(&s("x")).unwrap().subscription;
        for ms in [5, 3, 4, 2, 6, 5, 8, 7, 7, 9] {
            hub.deliver(&s("x"), f(ms));
        }
        let mut seen = Vec::new();
        for _ in 0..6 {
            let frame = a.next().await.unwrap().unwrap();
            let text = String::from_utf8(frame.bytes.to_vec()).unwrap();
            seen.push(if text.contains("event: reset") {
                format!("reset@{}", text.lines().next().unwrap())
            } else {
                frame.id.ms.to_string()
            });
        }
        // 3 starts an episode at 5; 4 and 2 are in it; 6 is live; 5 is
        // covered; 8 is live; 7 is a new episode at 8, its repeat covered.
        assert_eq!(seen, ["5", "reset@id: 5-0", "6", "8", "reset@id: 8-0", "9"]);
        assert_eq!((hub.order_resets(), hub.covered_by_reset()), (2, 4));
    }

    #[tokio::test]
    async fn a_reset_never_moves_a_stream_back_nor_repeats_what_its_client_loaded() {
        let hub = Hub::default();
        let mut live = hub.subscribe(&s("x")).unwrap().subscription;
        hub.deliver(&s("x"), f(5));
        // Resumed past what this instance delivered (its replay came from
        // the shared history), and one whose client loaded its state at 9.
        let mut ahead = hub.subscribe(&s("x")).unwrap().subscription;
        ahead.set_position(f(9).id);
        let mut loaded = hub.subscribe(&s("x")).unwrap().subscription;
        loaded.set_position(f(9).id);
        loaded.opened(true);
        // Still reading its replay when the late event comes: answered
        // once its position is known, to that position.
        let mut opening = hub.subscribe(&s("x")).unwrap().subscription;
        hub.deliver(&s("x"), f(3));
        hub.deliver(&s("x"), f(10));
        opening.set_position(f(12).id);
        opening.opened(false);
        let text = |frame: Frame| String::from_utf8(frame.bytes.to_vec()).unwrap();
        assert_eq!(live.next().await.unwrap().unwrap().id.ms, 5);
        assert!(text(live.next().await.unwrap().unwrap()).starts_with("id: 5-0\nevent: reset\n"));
        assert!(text(ahead.next().await.unwrap().unwrap()).starts_with("id: 9-0\nevent: reset\n"));
        assert_eq!(loaded.next().await.unwrap().unwrap().id.ms, 10);
        for sub in [&mut live, &mut ahead] {
            assert_eq!(sub.next().await.unwrap().unwrap().id.ms, 10);
        }
        // 10 is behind its position; the reset is not.
        assert!(
            text(opening.next().await.unwrap().unwrap()).starts_with("id: 12-0\nevent: reset\n")
        );
        assert_eq!(hub.order_resets(), 1);
    }

    #[tokio::test]
    async fn a_gap_reset_while_a_stream_opens_is_decided_at_its_position() {
        let hub = Hub::default();
        // Both still reading their replay when the subscriber finds a hole
        // up to 8: one resumes past it (its own reset reached 9), one
        // before it.
        let mut past = hub.subscribe(&s("x")).unwrap().subscription;
        let mut before = hub.subscribe(&s("x")).unwrap().subscription;
        assert!(hub.reset_to(&s("x"), f(8).id));
        past.set_position(f(9).id);
        past.opened(true);
        before.set_position(f(4).id);
        before.opened(false);
        hub.deliver(&s("x"), f(10));
        let text = |frame: Frame| String::from_utf8(frame.bytes.to_vec()).unwrap();
        assert_eq!(past.next().await.unwrap().unwrap().id.ms, 10);
        assert!(text(before.next().await.unwrap().unwrap()).starts_with("id: 8-0\nevent: reset\n"));
        assert_eq!(before.next().await.unwrap().unwrap().id.ms, 10);
    }

    #[tokio::test]
    async fn a_stalled_subscriber_lags_instead_of_growing() {
        let hub = Hub::new(4);
        let mut slow = hub.subscribe(&s("x")).unwrap().subscription;
        for n in 0..10 {
            hub.deliver(&s("x"), f(n));
        }
        // Cut at the first frame past its queue; what it held is freed.
        assert!(matches!(
            slow.next().await,
            Some(Err(SubscriptionError::Lagged(5)))
        ));
        assert!(slow.next().await.is_none());
    }

    #[tokio::test]
    async fn close_ends_subscriptions_and_refuses_new_ones() {
        let hub = Hub::default();
        let mut a = hub.subscribe(&s("x")).unwrap().subscription;
        hub.close();
        assert!(a.next().await.is_none());
        assert_eq!(hub.subscribe(&s("x")).unwrap_err(), Closed);
    }
}
