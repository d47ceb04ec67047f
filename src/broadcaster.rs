//! The [`Broadcaster`] trait: the one interface every route publishes and
//! subscribes through. [`Fanout`](crate::fanout::Fanout) is its
//! implementation; routes hold it as `Arc<dyn Broadcaster>`.
//!
//! The trait is object-safe (methods return boxed futures, as redis-rs's
//! `ConnectionLike` does), so a server picks the brokers at start-up and
//! nothing else in it names a concrete type.

use futures::future::BoxFuture;
use serde::Serialize;

use crate::event::{EventId, OutgoingEvent, SessionId};
use crate::history::Replay;

pub use crate::hub::{Subscription, SubscriptionError};

/// Why a broadcaster refused an operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BroadcastError {
    /// The broadcaster has been shut down.
    #[error("the broadcaster is shut down")]
    Closed,
    /// The event could not be published where it would survive this
    /// instance: it is stopping and cannot reach Redis (see
    /// [`Broadcaster::stop_holding`]). Nothing was delivered, unless the
    /// message says Redis did not confirm it: a publish already sent whose
    /// reply timed out may still run, and a retry then arrives as a second
    /// event. Retry elsewhere.
    #[error("not published: {0}")]
    Unavailable(String),
}

/// Counters a broadcaster reports for `/stats`.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct BroadcasterStats {
    /// `local` or `redis`.
    pub mode: &'static str,
    /// Sessions with at least one live subscriber on this instance.
    pub sessions: usize,
    /// Live subscriptions on this instance.
    pub subscribers: usize,
    /// Events published through this instance.
    pub published: u64,
    /// Late events answered with a `reset` instead of being delivered out
    /// of order (see `docs/architecture.md`).
    pub order_resets: u64,
    /// Late events dropped because a reset already stood for them (one
    /// reset per episode, see `docs/architecture.md`).
    pub covered_by_reset: u64,
    /// Events handed to this instance's subscriptions, one per subscriber.
    pub deliveries: u64,
    /// Evaluations of `FF_REDIS_SSE_BROADCAST` by publishes here that had a
    /// Redis path to take: `[on, off]`.
    pub flag_evaluations: [u64; 2],
    /// Sessions with in-process history (for resume) and its size.
    pub history_sessions: usize,
    pub history_bytes: usize,
    /// The cross-instance broker's counters, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<serde_json::Value>,
}

/// Publishes events to sessions and hands out subscriptions.
pub trait Broadcaster: Send + Sync + 'static {
    /// Publishes `event` to every subscriber of `session`, on every
    /// instance the event's path reaches, and returns the id it was given.
    fn publish<'a>(
        &'a self,
        session: &'a SessionId,
        event: OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BroadcastError>>;

    /// Sends `event` to every session (an announcement: no `id:` line, not
    /// kept in history).
    fn publish_all(&self, event: OutgoingEvent) -> BoxFuture<'_, Result<EventId, BroadcastError>>;

    /// Subscribes to `session`. Events published after this returns are
    /// delivered to the subscription, in increasing id order; dropping it
    /// unsubscribes.
    fn subscribe<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<Subscription, BroadcastError>>;

    /// The session's events after `after`, for a client resuming with
    /// `Last-Event-ID`. Call it after [`Broadcaster::subscribe`], so that
    /// every event is in the replay, in the subscription, or in both.
    /// [`Replay::complete`] is false when the history cannot prove that it
    /// holds everything after `after`: the stream then says `reset`.
    fn replay<'a>(&'a self, session: &'a SessionId, after: EventId) -> BoxFuture<'a, Replay>;

    /// Where a new subscriber of `session` starts: the newest event in its
    /// history (`0-0` if there is none).
    fn position<'a>(&'a self, session: &'a SessionId) -> BoxFuture<'a, EventId>;

    /// Sessions with a subscriber on this instance.
    fn sessions(&self) -> Vec<SessionId>;

    /// Whether `session` has a subscriber on this instance.
    fn holds(&self, session: &SessionId) -> bool;

    /// Whether a publish to `session` from this instance goes to other
    /// instances now (the flag's answer where there is a cross-instance
    /// broker; false where there is none).
    fn crosses_instances(&self, session: &SessionId) -> bool;

    /// The instance is about to stop (it turned unready): a publish that
    /// could only wait in this instance's memory for Redis is refused from
    /// now on ([`BroadcastError::Unavailable`]) rather than accepted and
    /// lost with the process. See [`crate::broker::Broker::stop_holding`].
    fn stop_holding(&self) {}

    /// Flushes what is pending, closes every subscription and refuses
    /// further work.
    fn shutdown(&self) -> BoxFuture<'_, ()>;

    fn stats(&self) -> BroadcasterStats;
}
