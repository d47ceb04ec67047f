//! The [`Broadcaster`] trait: the one interface every route publishes and
//! subscribes through, and [`Subscription`], the owned stream of one
//! subscriber.
//!
//! The trait is object-safe (methods return boxed futures, as redis-rs's
//! `ConnectionLike` does) so a server holds `Arc<dyn Broadcaster>` and picks
//! the implementation at start-up.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::Stream;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use crate::event::{EventId, Frame, OutgoingEvent, SessionId};
use crate::history::Replay;

/// Why a broadcaster refused an operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BroadcastError {
    /// The broadcaster has been shut down.
    #[error("the broadcaster is shut down")]
    Closed,
}

/// Counters a broadcaster reports for `/stats`.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct BroadcasterStats {
    /// `local`, `redis`, ...
    pub mode: &'static str,
    /// Sessions with at least one live subscriber on this instance.
    pub sessions: usize,
    /// Live subscriptions on this instance.
    pub subscribers: usize,
    /// Events published through this instance.
    pub published: u64,
    /// Sessions with in-process history (for resume) and its size.
    pub history_sessions: usize,
    pub history_bytes: usize,
    /// Redis counters, when the broadcaster uses Redis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<crate::redis_broadcaster::RedisCounters>,
}

/// Publishes events to sessions and hands out subscriptions.
pub trait Broadcaster: Send + Sync + 'static {
    /// Publishes `event` to every subscriber of `session` and returns the id
    /// it was given.
    fn publish<'a>(
        &'a self,
        session: &'a SessionId,
        event: OutgoingEvent,
    ) -> BoxFuture<'a, Result<EventId, BroadcastError>>;

    /// Publishes `event` to every session (a system announcement).
    fn publish_all(&self, event: OutgoingEvent) -> BoxFuture<'_, Result<EventId, BroadcastError>>;

    /// Subscribes to `session`. Events published after this returns are
    /// delivered to the subscription, in publish order; dropping it
    /// unsubscribes.
    fn subscribe<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<Subscription, BroadcastError>>;

    /// The session's events after `after`, for a client resuming with
    /// `Last-Event-ID`. Call it after [`Broadcaster::subscribe`], so that
    /// every event is in the replay, in the subscription, or in both (the
    /// stream drops the second copy by id).
    fn replay<'a>(&'a self, session: &'a SessionId, after: EventId) -> BoxFuture<'a, Replay>;

    /// Where a new subscriber of `session` starts: the newest event in its
    /// history (`0-0` if there is none). Sent as the id of `connected`, so a
    /// client that loses its first connection before any event still
    /// resumes without a gap.
    fn position<'a>(&'a self, session: &'a SessionId) -> BoxFuture<'a, EventId>;

    /// Closes every subscription and refuses further work.
    fn shutdown(&self) -> BoxFuture<'_, ()>;

    fn stats(&self) -> BroadcasterStats;
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

/// The stream of events for one subscriber of one session.
///
/// Each subscription has a bounded queue: a subscriber that falls more than
/// the queue's length behind gets [`SubscriptionError::Lagged`] instead of
/// growing memory. Dropping the subscription unsubscribes; the broadcaster's
/// guard runs after the receiver is gone, so it can see whether this was the
/// session's last subscriber.
pub struct Subscription {
    // Field order matters: `stream` (the receiver) is dropped before `_guard`.
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
