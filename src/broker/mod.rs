//! The [`Broker`] trait: where events get their ids, where history lives,
//! and how events published on other instances come up to this one.
//!
//! A broker assigns the id of every event it publishes and stores the event
//! in its history before anything is delivered. Delivery to this instance's
//! subscribers goes through one [`Handler`] the broker is given when it is
//! built, for its own events and for those of other instances alike, in id
//! order per session; the [`Fanout`](crate::Fanout) hands those
//! frames to the hub, the in-process connection map.
//!
//! - [`memory`] — ids from this process, an in-process ring per session
//!   (phase 1, and the flag-off path of phase 2).
//! - [`redis`] (feature `redis`) — ids and history from a Redis stream per
//!   session, fan-out on `<prefix>session:<id>` channels.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::event::{EventId, Frame, OutgoingEvent, SessionId};

pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;

pub use crate::history::Replay;

/// Who a frame from a broker is for.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// The subscribers of one session.
    Session(&'a SessionId),
    /// Every session with subscribers here (an announcement).
    All,
    /// The subscribers of one session missed events that no history holds
    /// any more (trimmed or lost while this instance could not receive
    /// them): each one behind the frame's id gets a `reset` to it.
    Gap(&'a SessionId),
}

/// Receives every frame a broker delivers to this instance.
pub type Handler = Arc<dyn Fn(Target<'_>, Frame) + Send + Sync>;

/// Why a broker could not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The broker was shut down.
    #[error("the broker is shut down")]
    Closed,
    /// The backend could not be reached in time.
    #[error("the broker's backend is unavailable: {0}")]
    Unavailable(String),
}

/// Where events get ids, live in history, and travel between instances.
/// Object-safe: a fan-out holds `Arc<dyn Broker>`.
pub trait Broker: Send + Sync + 'static {
    /// Assigns the event its id, stores it in history and sends it to every
    /// instance subscribed to the session (this one included, through the
    /// handler). Returns the id.
    fn publish<'a>(
        &'a self,
        session: &'a SessionId,
        event: &'a OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>>;

    /// Publishes an event that stays on this instance (the flag is off for
    /// the session): delivered and kept in history here only. Its id still
    /// comes from the session's sequence when the broker has one and can
    /// reach it, so it never names another instance's event, and the
    /// broker remembers that the session has events it does not hold, so a
    /// resume elsewhere is told (`reset`) rather than skipping them.
    fn publish_local<'a>(
        &'a self,
        session: &'a SessionId,
        event: &'a OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>>;

    /// Sends `event` to every session on every instance (not kept in
    /// history).
    fn publish_all<'a>(
        &'a self,
        event: &'a OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>>;

    /// Starts receiving the session's events. Interest is registered when
    /// this is called; the future resolves once events published from then
    /// on are sure to arrive (or with an error if the backend does not
    /// confirm in time — the broker keeps trying and catches up).
    /// `generation` orders this against [`Broker::unsubscribe`] calls made
    /// from other tasks (the hub's `on_vacated` and a later subscribe race).
    fn subscribe(
        &self,
        session: &SessionId,
        generation: u64,
    ) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Stops receiving the session's events, unless a newer generation has
    /// subscribed since. Never blocks.
    fn unsubscribe(&self, session: &SessionId, generation: u64);

    /// The session's events after `after`, at most `max_bytes` of them.
    fn history<'a>(
        &'a self,
        session: &'a SessionId,
        after: EventId,
        max_bytes: usize,
    ) -> BoxFuture<'a, Result<Replay, BrokerError>>;

    /// Where a new subscriber of the session starts: the newest event in
    /// history, `0-0` if there is none.
    fn position<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<EventId, BrokerError>>;

    /// The instance is about to stop: from now on a publish that could
    /// only wait in this instance's memory for the backend (an outbox while
    /// Redis is away) fails with [`BrokerError::Unavailable`] instead, so
    /// its publisher retries where the event survives. Publishes that
    /// reach the backend go on as before.
    fn stop_holding(&self) {}

    /// Flushes what is pending and stops; later calls fail with
    /// [`BrokerError::Closed`].
    fn shutdown(&self) -> BoxFuture<'_, ()>;

    /// Counters for `/stats`, as a JSON object.
    fn stats(&self) -> serde_json::Value;
}
