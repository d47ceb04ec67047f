//! What this instance wants from its subscriber connection, as state the
//! subscriber task (`subscriber.rs`) brings Redis in line with: which
//! sessions are wanted (by the hub's generation), which are subscribed, the
//! cursor of each (the newest id delivered here), and the bookkeeping of
//! own events whose echo has not come. One mutex; no critical section waits
//! on Redis.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{oneshot, Notify};

use super::publish::FOLLOW_SHARED;
use crate::event::{EventId, Frame, SessionId};

/// What this instance wants from the subscriber connection.
#[derive(Default)]
pub(super) struct Interest {
    pub(super) state: Mutex<State>,
    /// Wakes the task when `dirty` gained a session.
    pub(super) changed: Notify,
}

#[derive(Default)]
pub(super) struct State {
    /// Sessions with subscribers here, by hub generation.
    pub(super) wanted: HashMap<SessionId, u64>,
    /// Sessions subscribed on the current connection.
    pub(super) live: HashSet<SessionId>,
    /// Per wanted session: the newest id delivered here (or, before the
    /// first, where the session's stream stood when it was subscribed).
    /// Exact: a message at or before it is a repeat.
    pub(super) cursors: HashMap<SessionId, EventId>,
    /// Sessions whose cursor is still such an estimate (no event delivered
    /// since): not an id the stream ever held, so its absence from the
    /// stream says nothing about lost events.
    pub(super) estimated: HashSet<SessionId>,
    /// Sessions whose history could not be read when their channel was
    /// (re)subscribed (Redis refused the read: an ACL, a key of the wrong
    /// type): what was published before is unknown here, so the first
    /// event that arrives is preceded by a `reset` just below it.
    pub(super) blind: HashSet<SessionId>,
    /// Sessions wanted and not yet subscribed: an estimate of "when it was
    /// wanted", and whether the catch-up must start there — the connection
    /// was down, or the subscriber stopped waiting — rather than at the
    /// stream's top. Never used to drop a message.
    pub(super) floors: HashMap<SessionId, (EventId, bool)>,
    /// Sessions whose subscription may need to change.
    pub(super) dirty: HashSet<SessionId>,
    /// Subscribers waiting for their session's channel to be confirmed.
    pub(super) waiters: HashMap<SessionId, Vec<oneshot::Sender<()>>>,
    /// This instance's own events of wanted sessions whose echo has not
    /// come back yet. Normally a few; after a reconnect, those the stream
    /// no longer has (Redis restarted empty) are delivered from here, so a
    /// subscriber here never misses an event its own instance published.
    pub(super) sent: HashMap<SessionId, VecDeque<Frame>>,
    /// Own events of `sent` handed to the subscribers here before their
    /// echo came (see [`Inner::release_unechoed`]): their echo, if it comes,
    /// is not delivered again. Ids past the cursor only.
    pub(super) direct: HashMap<SessionId, HashSet<EventId>>,
    /// Per session: when an event of another instance last arrived here
    /// (see [`Inner::follows_shared`]). Kept after the session's last stream
    /// here closed, for as long as it counts; pruned as it grows.
    pub(super) shared_at: HashMap<SessionId, Instant>,
    /// `shared_at`'s length at which it is next pruned.
    pub(super) shared_prune_at: usize,
}

impl State {
    /// Another instance published `session` through Redis just now.
    pub(super) fn note_shared(&mut self, session: &SessionId) {
        let now = Instant::now();
        match self.shared_at.get_mut(session) {
            Some(at) => *at = now,
            None => {
                self.shared_at.insert(session.clone(), now);
                if self.shared_at.len() >= self.shared_prune_at {
                    self.shared_at.retain(|_, at| at.elapsed() < FOLLOW_SHARED);
                    self.shared_prune_at = (self.shared_at.len() * 2).max(1024);
                }
            }
        }
    }
}

impl Interest {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
