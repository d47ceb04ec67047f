//! The catch-up of a session whose channel was just subscribed: from its
//! cursor after a reconnect, from when it was wanted after a late
//! confirmation, or nothing but the stream's top for a first subscription;
//! and the `reset` its streams get for whatever could not be read back.

use std::sync::atomic::Ordering;

use futures::StreamExt;

use super::history::{first_id, reaches_back, Continuity, PAGE};
use super::Inner;
use crate::broker::Target;
use crate::event::{EventId, Frame, SessionId};
use crate::redis_client::CallError;

/// Sessions whose catch-up or first read runs at the same time.
const PARALLEL_CONFIRMS: usize = 64;

impl Inner {
    /// [`Self::confirmed`] for each of `sessions`, [`PARALLEL_CONFIRMS`] at a
    /// time: each is a read or two on the shared client, and a thousand
    /// sessions subscribed at once (the streams of a dead instance coming
    /// back) must not wait on each other's round trips. On failure, the
    /// sessions not confirmed and the error.
    pub(super) async fn confirm_all(
        &self,
        sessions: Vec<SessionId>,
    ) -> Result<(), (Vec<SessionId>, CallError)> {
        let results: Vec<(SessionId, Result<(), CallError>)> = futures::stream::iter(sessions)
            .map(|session| async move {
                let confirmed = self.confirmed(&session).await;
                (session, confirmed)
            })
            .buffer_unordered(PARALLEL_CONFIRMS)
            .collect()
            .await;
        let mut failed = Vec::new();
        let mut error = None;
        for (session, confirmed) in results {
            if let Err(e) = confirmed {
                failed.push(session);
                error.get_or_insert(e);
            }
        }
        match error {
            None => Ok(()),
            Some(e) => Err((failed, e)),
        }
    }

    /// A session's channel is subscribed: catch up from its cursor (a
    /// reconnect), or start the cursor at the stream's newest id.
    async fn confirmed(&self, session: &SessionId) -> Result<(), CallError> {
        let (cursor, floor) = {
            let mut st = self.interest.lock();
            let floor = st
                .floors
                .remove(session)
                .and_then(|(f, late)| late.then_some(f));
            (st.cursors.get(session).copied(), floor)
        };
        let read = match (cursor, floor) {
            (Some(from), _) => {
                let estimated = self.interest.lock().estimated.contains(session);
                let read = self.catch_up_checked(session, from, estimated).await;
                match read {
                    Ok(reach) => {
                        // Read from the cursor on: a hole an earlier read
                        // could not see is filled.
                        self.interest.lock().blind.remove(session);
                        self.deliver_unechoed(session, reach);
                        self.renote_kept(session).await
                    }
                    Err(e) => Err(e),
                }
            }
            (None, Some(floor)) => {
                {
                    let mut st = self.interest.lock();
                    st.cursors.insert(session.clone(), floor);
                    st.estimated.insert(session.clone());
                }
                // Nothing at or before the floor is delivered from here on:
                // a stream that opened meanwhile below the newest event
                // there, its replay not reaching it (its history read
                // failed), gets a `reset` to that event rather than a hole
                // (the hub decides per stream). The floor itself when that
                // read fails: no event is left out unannounced.
                let left_out = self
                    .newest_up_to(session, Some(floor))
                    .await
                    .unwrap_or(floor);
                self.gap(session, left_out);
                self.catch_up_checked(session, floor, true).await.map(drop)
            }
            (None, None) => {
                // Everything after the stream's top arrives on the channel,
                // which was confirmed before this read; what is at or before
                // it (an event published between the two is on the channel
                // too, and dropped there as a repeat) reaches a stream only
                // through its replay. A stream that has none reaching the
                // top — its history read failed, or it opened before this
                // read because the confirmation was late — gets a `reset`
                // to the top instead of a silent hole. The hub decides per
                // stream: one already there gets nothing.
                self.stream_top(session).await.map(|top| {
                    self.interest.lock().cursors.insert(session.clone(), top);
                    self.gap(session, top);
                })
            }
        };
        match read {
            Ok(()) => {}
            // Redis away: the next connection catches up from the same place.
            Err(e) if e.is_outage() => return Err(e),
            // Redis refused this session's key (say, of the wrong type): it
            // must not stop delivery for every other session. Its live
            // messages still pass.
            Err(e) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(backend = "redis", session = %session, error = %e, "session history unreadable; delivering live messages only, after a reset");
                let mut st = self.interest.lock();
                st.cursors.entry(session.clone()).or_default();
                // What was published while the channel was not subscribed
                // is unknown here; the next event tells where it ends.
                st.blind.insert(session.clone());
            }
        }
        let mut st = self.interest.lock();
        // Subscribed on the connection whatever happened meanwhile; given up
        // since, it is unsubscribed on the next round.
        st.live.insert(session.clone());
        let given_up = !st.wanted.contains_key(session);
        if given_up {
            st.dirty.insert(session.clone());
        }
        for waiter in st.waiters.remove(session).unwrap_or_default() {
            let _ = waiter.send(());
        }
        self.counters
            .subscribed
            .store(st.live.len() as u64, Ordering::Relaxed);
        drop(st);
        if given_up {
            self.interest.changed.notify_one();
        }
        Ok(())
    }

    /// Tells the session's streams here that events up to `at` will not be
    /// delivered to them from here on (the hub gives a `reset` to those not
    /// already past it).
    pub(super) fn gap(&self, session: &SessionId, at: EventId) {
        if at == EventId::ZERO {
            return;
        }
        let gap = Frame {
            id: at,
            bytes: bytes::Bytes::new(),
        };
        (self.handler)(Target::Gap(session), gap);
    }

    /// Catches the session up from `from` if the stream still reaches back
    /// to it; otherwise the session's streams here get a `reset` to the
    /// stream's newest entry and the cursor moves there (see
    /// [`Inner::check_lost`]). Returns how far the stream was read: every
    /// event of the session up to there was in it or is gone.
    async fn catch_up_checked(
        &self,
        session: &SessionId,
        from: EventId,
        estimated: bool,
    ) -> Result<EventId, CallError> {
        match self.check_lost(session, from, estimated).await? {
            Continuity::Whole { oldest } => match self.catch_up(session, from, oldest).await? {
                Some(reach) => Ok(reach),
                None => {
                    let top = self.stream_top(session).await?;
                    Ok(self.reset_to(session, top))
                }
            },
            Continuity::Gap { top } => Ok(self.reset_to(session, top)),
        }
    }

    /// The session's streams here get a `reset` to `top` and the cursor
    /// moves there: what the stream still holds up to `top` would come
    /// after a hole, and the reset stands for all of it.
    fn reset_to(&self, session: &SessionId, top: EventId) -> EventId {
        self.counters.catch_up_gaps.fetch_add(1, Ordering::Relaxed);
        let at = {
            let mut st = self.interest.lock();
            let cursor = st.cursors.entry(session.clone()).or_default();
            *cursor = (*cursor).max(top);
            *cursor
        };
        let gap = Frame {
            id: at,
            bytes: bytes::Bytes::new(),
        };
        (self.handler)(Target::Gap(session), gap);
        top
    }

    /// Delivers what the session's stream holds after `from`, in order;
    /// returns the newest id read (`from` if none), or `None` when the
    /// stream was trimmed past what was read between two pages (then
    /// nothing after it may be delivered without a `reset`).
    async fn catch_up(
        &self,
        session: &SessionId,
        from: EventId,
        oldest: Option<EventId>,
    ) -> Result<Option<EventId>, CallError> {
        let mut reach = from;
        let mut next = from.successor();
        while let Some(start) = next.take() {
            let (reply, oldest_now) = self
                .range_reaching_back(session, start, PAGE)
                .await
                .inspect_err(|e| {
                    tracing::warn!(backend = "redis", session = %session, error = %e, "catch-up read failed");
                })?;
            if !reaches_back(first_id(&oldest_now), oldest, reach) {
                tracing::warn!(backend = "redis", session = %session, through = %reach,
                    "the session's stream was trimmed past the catch-up while it read; its streams here get reset");
                return Ok(None);
            }
            for entry in &reply.ids {
                // On past every entry, even one that does not decode.
                if let Ok(id) = entry.id.parse::<EventId>() {
                    next = id.successor();
                    reach = id;
                }
                if let Some(e) = self.entry(entry) {
                    if self.deliver(session, e.node == self.settings.node_id, e.held, e.frame) {
                        self.counters.caught_up.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if reply.ids.len() < PAGE {
                break;
            }
        }
        Ok(Some(reach))
    }
}
