//! [`Hub`]: the in-process connection map, session id → the subscribers
//! connected to this instance. It knows nothing of brokers or Redis: it
//! hands out [`Subscription`]s and delivers frames it is given.
//!
//! Each session with subscribers has one `tokio::sync::broadcast` channel.
//! A delivery sends the shared [`Frame`] into it; each subscriber's receiver
//! holds only a cursor into the channel's ring, so an idle subscriber costs a
//! few dozen bytes and a stalled one cannot grow memory past the ring (it
//! lags and is cut instead).
//!
//! A session's presence here has a **generation**: a number that grows each
//! time the session gains its first subscriber. [`Hub::subscribe`] returns it
//! (and whether the subscriber is the first); when the last one leaves, the hub's
//! vacancy callback is told the same number. A broker that subscribes and
//! unsubscribes channels on these signals can then apply them in any order
//! (an unsubscribe for an older generation is stale), so the hub never calls
//! out while holding its lock.
//!
//! **Order.** The hub remembers the newest id it delivered per session. A
//! repeat of it is dropped; an older id arriving late (events of one session
//! published through two paths that do not share an order: a flag flip on
//! one instance, or two instances publishing through a full Redis outage)
//! is not delivered out of order: the session's streams get a `reset`
//! instead, carrying the newest id, so their clients reload their state
//! rather than silently keep a gap. Counted as `order_resets`.
//!
//! The map is behind a `std::sync::Mutex`: it is never held across an
//! `.await`, and the critical sections are a hash lookup and a channel send.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use crate::event::{EventId, Frame, SessionId};
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
    /// Frames handed to subscriptions (one per subscriber per event).
    deliveries: AtomicU64,
    on_vacated: OnceLock<OnVacated>,
}

#[derive(Default)]
struct Map {
    slots: HashMap<SessionId, Slot>,
    next_generation: u64,
}

struct Slot {
    tx: broadcast::Sender<Frame>,
    generation: u64,
    /// The newest id delivered to this session here.
    last: EventId,
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
        let mut map = self.inner.lock();
        let (rx, generation, first) = match map.slots.get(session) {
            Some(slot) => (slot.tx.subscribe(), slot.generation, false),
            None => {
                map.next_generation += 1;
                let generation = map.next_generation;
                let (tx, rx) = broadcast::channel(self.inner.queue);
                map.slots.insert(
                    session.clone(),
                    Slot {
                        tx,
                        generation,
                        last: EventId::ZERO,
                    },
                );
                (rx, generation, true)
            }
        };
        drop(map);
        self.inner.subscribers.fetch_add(1, Ordering::Relaxed);
        let guard = Leave {
            inner: self.inner.clone(),
            session: session.clone(),
        };
        Ok(Joined {
            subscription: Subscription::new(rx, guard),
            generation,
            first,
        })
    }

    /// Delivers `frame` to this instance's subscribers of `session`, in id
    /// order (see the module docs). Returns whether the session had any.
    pub fn deliver(&self, session: &SessionId, frame: Frame) -> bool {
        let mut map = self.inner.lock();
        let Some(slot) = map.slots.get_mut(session) else {
            return false;
        };
        let frame = if frame.id == EventId::ZERO || frame.id > slot.last {
            if frame.id != EventId::ZERO {
                slot.last = frame.id;
            }
            frame
        } else if frame.id == slot.last {
            return true;
        } else {
            self.inner.order_resets.fetch_add(1, Ordering::Relaxed);
            sse::order_reset(slot.last, frame.id)
        };
        // An error only means every receiver left since the lookup.
        match slot.tx.send(frame) {
            Ok(n) => {
                self.inner.deliveries.fetch_add(n as u64, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
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
        for slot in self.inner.lock().slots.values() {
            if let Ok(n) = slot.tx.send(frame.clone()) {
                self.inner.deliveries.fetch_add(n as u64, Ordering::Relaxed);
            }
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
        // Dropping every sender ends every subscription stream.
        self.inner.lock().slots.clear();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Map> {
        // Every critical section is a single insert, remove or send, so a
        // poisoned lock still guards a consistent map.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes the session's slot when its last subscriber leaves.
struct Leave {
    inner: Arc<Inner>,
    session: SessionId,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.inner.subscribers.fetch_sub(1, Ordering::Relaxed);
        let vacated = {
            let mut map = self.inner.lock();
            // The receiver was dropped just before this guard (field order
            // in `Subscription`), and receivers are only made under this lock.
            match map.slots.get(&self.session) {
                Some(slot) if slot.tx.receiver_count() == 0 => {
                    let generation = slot.generation;
                    map.slots.remove(&self.session);
                    Some(generation)
                }
                _ => None,
            }
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
}

/// The stream of frames for one subscriber of one session.
///
/// Each subscription has a bounded queue: a subscriber that falls more than
/// the queue's length behind gets [`SubscriptionError::Lagged`] instead of
/// growing memory. Dropping the subscription unsubscribes.
pub struct Subscription {
    // Field order matters: `stream` (the receiver) is dropped before
    // `_guard`, so the guard sees whether this was the last receiver.
    stream: BroadcastStream<Frame>,
    _guard: Box<dyn Send + Sync>,
}

impl Subscription {
    /// Wraps a receiver and a guard whose `Drop` releases the subscription.
    pub fn new(rx: broadcast::Receiver<Frame>, guard: impl Send + Sync + 'static) -> Self {
        Self {
            stream: BroadcastStream::new(rx),
            _guard: Box::new(guard),
        }
    }
}

impl Stream for Subscription {
    type Item = Result<Frame, SubscriptionError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.stream).poll_next(cx).map(|item| {
            item.map(|r| {
                r.map_err(|BroadcastStreamRecvError::Lagged(n)| SubscriptionError::Lagged(n))
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
    async fn a_stalled_subscriber_lags_instead_of_growing() {
        let hub = Hub::new(4);
        let mut slow = hub.subscribe(&s("x")).unwrap().subscription;
        for n in 0..10 {
            hub.deliver(&s("x"), f(n));
        }
        assert!(matches!(
            slow.next().await,
            Some(Err(SubscriptionError::Lagged(6)))
        ));
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
