//! The outbox: events published while Redis was unreachable. They were
//! delivered on this instance at once; here they wait, in order and
//! bounded, until Redis answers again, so other instances and the history
//! get them late rather than never.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::Inner;
use crate::broker::BrokerError;
use crate::event::{EventId, OutgoingEvent, SessionId};

/// Outbox events published per flush before other work gets a turn.
const FLUSH_BATCH: usize = 256;

/// How often a flush is retried while Redis is away.
const RETRY_EVERY: Duration = Duration::from_millis(250);

/// Refusals (server error replies) of one outbox event before it is given
/// up.
const MAX_REFUSALS: u32 = 5;

pub(super) struct Outbox {
    queue: Mutex<VecDeque<Pending>>,
    max: usize,
    notify: Notify,
    /// One flush at a time (the flusher task, or shutdown): two flushers
    /// would publish the same front event twice.
    flushing: tokio::sync::Mutex<()>,
    /// Server error replies to the front event so far.
    refusals: AtomicU32,
}

/// An event delivered locally while Redis was unreachable.
#[derive(Clone)]
struct Pending {
    session: SessionId,
    id: EventId,
    event: OutgoingEvent,
}

impl Outbox {
    pub(super) fn new(max: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            max,
            notify: Notify::new(),
            flushing: tokio::sync::Mutex::new(()),
            refusals: AtomicU32::new(0),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Whether an event of `session` is still waiting.
    pub(super) fn holds_session(&self, session: &SessionId) -> bool {
        self.lock().iter().any(|p| p.session == *session)
    }

    /// Whether an event of `session` at or before `id` is still waiting.
    pub(super) fn holds_through(&self, session: &SessionId, id: EventId) -> bool {
        self.lock()
            .iter()
            .any(|p| p.id <= id && p.session == *session)
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        // Single push/pop critical sections: a poisoned queue is intact.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Delivers locally now (the in-process history keeps it for resumes
    /// here) and queues it for Redis.
    pub(super) fn hold(
        &self,
        session: &SessionId,
        event: &OutgoingEvent,
        unconfirmed: bool,
    ) -> Result<EventId, BrokerError> {
        // The instance is stopping: the outbox would go with it before
        // Redis is back, and the publisher's 202 would name a lost event.
        // `unconfirmed`: the publish was sent and not answered; Redis may
        // still run it, as with any publish whose reply timed out, so a
        // retry may arrive as a second event.
        if self.stop_holding.load(Ordering::Acquire) {
            let why = if unconfirmed {
                "this instance is stopping and Redis did not confirm the event (it may still arrive)"
            } else {
                "this instance is stopping and cannot reach Redis"
            };
            return Err(BrokerError::Unavailable(why.into()));
        }
        // Its local id is past this instance's own events still waiting for
        // their echo: those reach the subscribers here first.
        self.release_unechoed(session);
        let id = self.local.publish_now(session, event)?;
        self.counters.fallback_local.fetch_add(1, Ordering::Relaxed);
        let mut queue = self.outbox.lock();
        if queue.len() < self.outbox.max {
            queue.push_back(Pending {
                session: session.clone(),
                id,
                event: event.clone(),
            });
            drop(queue);
            self.outbox.notify.notify_one();
        } else {
            drop(queue);
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

    /// Publishes up to a batch of the outbox, oldest first, while Redis
    /// answers and the broker is not stopping. A publish cut short by the
    /// stop leaves its event at the front.
    pub(super) async fn flush(&self) -> Flush {
        let Some(_one) = self
            .cancel
            .run_until_cancelled(self.outbox.flushing.lock())
            .await
        else {
            return Flush::Cancelled;
        };
        for _ in 0..FLUSH_BATCH {
            if self.cancel.is_cancelled() {
                return Flush::Cancelled;
            }
            if !self.redis.is_healthy() {
                return Flush::Failed;
            }
            let Some(next) = self.outbox.lock().front().cloned() else {
                return Flush::Empty;
            };
            // Whether Redis ran it is unknown; nothing flushes after the
            // stop, so the event is not published twice.
            let Some(published) = self
                .cancel
                .run_until_cancelled(self.run_script(&next.session, &next.event, next.id, true))
                .await
            else {
                return Flush::Cancelled;
            };
            match published {
                Ok(id) => {
                    // Removed only once published, so a publish that sees
                    // the outbox empty comes after every held event.
                    let left = self.pop_front();
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
                        return Flush::Empty;
                    }
                }
                Err(e) if e.is_outage() => {
                    self.note_outage(&e);
                    return Flush::Failed;
                }
                Err(e) => {
                    // Refused by Redis itself (a script error, a key of the
                    // wrong type, OOM): retried a few times, then given up,
                    // so one event can never hold every later one back.
                    let tries = self.outbox.refusals.fetch_add(1, Ordering::Relaxed) + 1;
                    if tries >= MAX_REFUSALS {
                        self.pop_front();
                        self.counters.outbox_dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            backend = "redis",
                            session = %next.session,
                            id = %next.id,
                            error = %e,
                            "Redis refused an outbox event {MAX_REFUSALS} times; it stays on this instance only"
                        );
                    }
                    return Flush::Failed;
                }
            }
        }
        Flush::More
    }

    fn pop_front(&self) -> usize {
        let mut queue = self.outbox.lock();
        queue.pop_front();
        self.outbox.refusals.store(0, Ordering::Relaxed);
        queue.len()
    }

    /// Flushes until the outbox is empty, Redis stops answering or the
    /// broker stops. Shutdown's last attempt runs before the stop, so it
    /// is not cut short by it.
    pub(super) async fn flush_all(&self) -> bool {
        loop {
            match self.flush().await {
                Flush::Empty => return true,
                Flush::Failed | Flush::Cancelled => return false,
                Flush::More => tokio::task::yield_now().await,
            }
        }
    }

    /// Flushes until nothing is left, trying again every [`RETRY_EVERY`]
    /// while Redis is away or refuses: shutdown's last chance, bounded by
    /// its caller. A Redis that is away at the moment of the stop (a
    /// restart, a failover, a shard coming back) often answers within it.
    pub(super) async fn flush_retrying(&self) {
        while !self.flush_all().await {
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// The outbox task: flushes whenever events are queued, and retries
    /// every [`RETRY_EVERY`] while Redis is away or refuses.
    pub(super) async fn run_flusher(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = self.outbox.notify.notified() => {}
                () = tokio::time::sleep(RETRY_EVERY) => {}
            }
            // A failed flush waits for the next round (no busy retry).
            let _ = self.flush_all().await;
        }
    }
}

/// How a flush ended.
pub(super) enum Flush {
    /// Nothing left.
    Empty,
    /// A batch went out; more is waiting.
    More,
    /// Redis is away or refused the front event.
    Failed,
    /// The broker is stopping.
    Cancelled,
}
