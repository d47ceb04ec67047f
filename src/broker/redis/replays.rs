//! Resume reads, shared and bounded.
//!
//! Why: a resume reads up to `REPLAY_MAX_BYTES` of history over the shared
//! Redis connection, which carries every publish and rate-limit check of
//! the instance too. Forty resumes of one 4 MB history at once put 150 MB
//! through that connection in one burst: other commands waited behind it
//! past their timeout, and a timeout counts as an outage — one client could
//! push its instance off Redis for everyone. So:
//! - resumes of one session from one id that wait for the same read share
//!   it and its frames (as the memory broker's replays share its history).
//!   Only while it waits for its turn: a resume subscribes before its
//!   history is read, and one that joined a read already sent could miss
//!   an event published in between;
//! - at most [`READS`] reads run at once; the others wait their turn;
//! - a read's pages are bounded in bytes (`history.rs`), so no single reply
//!   holds the connection for long.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;

use super::Inner;
use crate::broker::Replay;
use crate::event::{EventId, SessionId};
use crate::redis_client::CallError;

/// Resume reads running at once.
pub(super) const READS: usize = 4;

type Read = Shared<BoxFuture<'static, Result<Replay, CallError>>>;

pub(super) struct Replays {
    reading: Mutex<HashMap<(SessionId, EventId, usize), Read>>,
    turns: Semaphore,
}

impl Default for Replays {
    fn default() -> Self {
        Self {
            reading: Mutex::new(HashMap::new()),
            turns: Semaphore::new(READS),
        }
    }
}

impl Replays {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SessionId, EventId, usize), Read>> {
        self.reading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    /// [`Inner::read_history`] in one of [`READS`] turns, shared with the
    /// resumes of the same session from the same id that came while it
    /// waited for it.
    pub(super) async fn replay(
        self: &Arc<Self>,
        session: &SessionId,
        after: EventId,
        max_bytes: usize,
    ) -> Result<Replay, CallError> {
        let key = (session.clone(), after, max_bytes);
        let read = {
            let mut reading = self.replays.lock();
            match reading.get(&key) {
                Some(read) => read.clone(),
                None => {
                    let inner = self.clone();
                    let (session, forget) = (session.clone(), key.clone());
                    // A task of its own: the read finishes, gives its turn
                    // back and leaves the map even when every resume
                    // waiting for it went away.
                    let task = self.tasks.spawn(async move {
                        // Never closed, so the permit always comes.
                        let _turn = inner.replays.turns.acquire().await;
                        // Joined only until the read starts: a resume must
                        // subscribe before its history is read, or an event
                        // published in between would be in neither.
                        inner.replays.lock().remove(&forget);
                        inner.read_history(&session, after, max_bytes).await
                    });
                    let read = async move { task.await.unwrap_or(Err(CallError::NotConnected)) }
                        .boxed()
                        .shared();
                    reading.insert(key, read.clone());
                    read
                }
            }
        };
        read.await
    }
}
