//! [`MemoryBroker`]: the broker of one process. Ids come from this
//! process's [`IdGenerator`], history is the in-process history ring per
//! session, and "other instances" do not exist: every publish goes straight
//! to the handler.
//!
//! It is the whole broker of phase 1 and, in Redis mode, the path of events
//! that stay on this instance (flag off for the session, or Redis away).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use futures::future::{self, BoxFuture, FutureExt};

use super::{Broker, BrokerError, Handler, Replay, Target};
use crate::event::{EventId, IdGenerator, OutgoingEvent, SessionId};
use crate::history::{History, HistoryLimits};
use crate::sse;

/// Publishes of one session are serialised on one of these stripes, so ids
/// are assigned, recorded and delivered in the same order.
const STRIPES: usize = 64;

/// See the module docs.
pub struct MemoryBroker {
    ids: IdGenerator,
    history: History,
    handler: Handler,
    stripes: Vec<Mutex<()>>,
    closed: AtomicBool,
}

impl MemoryBroker {
    pub fn new(limits: HistoryLimits, handler: Handler) -> Self {
        Self {
            ids: IdGenerator::new(),
            history: History::new(limits),
            handler,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            closed: AtomicBool::new(false),
        }
    }

    /// Publishes without a future: this path never waits.
    pub fn publish_now(
        &self,
        session: &SessionId,
        event: &OutgoingEvent,
    ) -> Result<EventId, BrokerError> {
        self.publish_as(session, event, None)
    }

    /// Publishes on this instance only, under `id` when one was reserved
    /// from the session's sequence elsewhere (the caller keeps a session's
    /// reservations and these calls in one order), else under a local id.
    pub fn publish_as(
        &self,
        session: &SessionId,
        event: &OutgoingEvent,
        id: Option<EventId>,
    ) -> Result<EventId, BrokerError> {
        self.check_open()?;
        let _order = self.stripe(session);
        let id = id.unwrap_or_else(|| self.ids.next_id());
        let frame = sse::frame(id, &event.event_type, &event.data);
        // Recorded before it is delivered: a stream that reads history after
        // subscribing finds every event it may have missed live.
        self.history.record(session, &frame);
        (self.handler)(Target::Session(session), frame);
        Ok(id)
    }

    /// An announcement to every session here. It carries no `id:` line, so
    /// it never moves a client's `Last-Event-ID`, and is not kept in
    /// history.
    pub fn publish_all_now(&self, event: &OutgoingEvent) -> Result<EventId, BrokerError> {
        self.check_open()?;
        (self.handler)(
            Target::All,
            sse::announcement(&event.event_type, &event.data),
        );
        Ok(EventId::ZERO)
    }

    /// Makes later ids greater than `id`, an id seen from elsewhere (Redis),
    /// so a client that gets events from both never sees ids go backwards.
    pub fn observe(&self, id: EventId) {
        self.ids.observe(id);
    }

    /// A sequence id past everything this process has issued or seen: the
    /// floor a publish asks a session's sequence for.
    pub fn floor(&self) -> EventId {
        self.ids.floor()
    }

    /// Whether `id` is a local id this process issued.
    pub fn issued(&self, id: EventId) -> bool {
        self.ids.issued(id)
    }

    /// The newest event of `session` held here.
    pub fn newest(&self, session: &SessionId) -> Option<EventId> {
        self.history.newest(session)
    }

    /// The newest event with a sequence number of this process (see the
    /// in-process history ring).
    pub fn newest_sequenced(&self, session: &SessionId) -> Option<EventId> {
        self.history.newest_sequenced(session)
    }

    /// Where a new subscriber of `session` starts here (see
    /// the in-process history ring).
    pub fn anchor(&self, session: &SessionId) -> EventId {
        self.history.anchor(session)
    }

    /// The session's events after `after` held here.
    pub fn history_now(&self, session: &SessionId, after: EventId, max_bytes: usize) -> Replay {
        self.history.after(session, after, max_bytes)
    }

    /// Sessions with history here, and the bytes it holds.
    pub fn usage(&self) -> (usize, usize) {
        self.history.usage()
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn check_open(&self) -> Result<(), BrokerError> {
        if self.closed.load(Ordering::Acquire) {
            Err(BrokerError::Closed)
        } else {
            Ok(())
        }
    }

    fn stripe(&self, session: &SessionId) -> std::sync::MutexGuard<'_, ()> {
        let mut h = DefaultHasher::new();
        session.hash(&mut h);
        let lock = &self.stripes[(h.finish() as usize) % self.stripes.len()];
        // The guarded value is `()`: a poisoned stripe is still a lock.
        lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        session: &'a SessionId,
        event: &'a OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>> {
        future::ready(self.publish_now(session, event)).boxed()
    }

    fn publish_local<'a>(
        &'a self,
        session: &'a SessionId,
        event: &'a OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>> {
        future::ready(self.publish_now(session, event)).boxed()
    }

    fn publish_all<'a>(
        &'a self,
        event: &'a OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>> {
        future::ready(self.publish_all_now(event)).boxed()
    }

    fn subscribe(&self, _: &SessionId, _: u64) -> BoxFuture<'static, Result<(), BrokerError>> {
        // Every publish reaches the handler; there is no channel to join.
        future::ready(self.check_open()).boxed()
    }

    fn unsubscribe(&self, _: &SessionId, _: u64) {}

    fn history<'a>(
        &'a self,
        session: &'a SessionId,
        after: EventId,
        max_bytes: usize,
    ) -> BoxFuture<'a, Result<Replay, BrokerError>> {
        future::ready(Ok(self.history_now(session, after, max_bytes))).boxed()
    }

    fn position<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>> {
        future::ready(Ok(self.anchor(session))).boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.close();
        future::ready(()).boxed()
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, Frame};
    use std::sync::Arc;

    fn recorder() -> (Handler, Arc<Mutex<Vec<Frame>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let handler: Handler = Arc::new(move |_, f| sink.lock().unwrap().push(f));
        (handler, seen)
    }

    fn ev(n: u32) -> OutgoingEvent {
        OutgoingEvent::new(EventType::from_static("n"), n.to_string())
    }

    #[tokio::test]
    async fn ids_first_then_history_then_delivery_in_order() {
        let (handler, seen) = recorder();
        let b = MemoryBroker::new(HistoryLimits::default(), handler);
        let s = SessionId::parse("s").unwrap();
        assert_eq!(b.position(&s).await.unwrap(), EventId::ZERO);
        let ids: Vec<EventId> = (0..5).map(|n| b.publish_now(&s, &ev(n)).unwrap()).collect();
        let delivered: Vec<EventId> = seen.lock().unwrap().iter().map(|f| f.id).collect();
        assert_eq!(delivered, ids);
        let replay = b.history(&s, ids[1], usize::MAX).await.unwrap();
        assert!(replay.complete());
        assert_eq!(replay.frames.len(), 3);
        // Opened before its first event: the start is vouched for.
        assert!(b
            .history(&s, EventId::ZERO, usize::MAX)
            .await
            .unwrap()
            .complete());
        assert_eq!(b.position(&s).await.unwrap(), ids[4]);
        b.close();
        assert_eq!(b.publish_now(&s, &ev(9)), Err(BrokerError::Closed));
    }
}
