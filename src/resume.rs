//! [`open_stream`]: the resume protocol as one call, so an application gets
//! `Last-Event-ID` resume without copying a server's stream handler.
//!
//! 1. Subscribe first: every event published from here on reaches the
//!    subscription.
//! 2. Then read history after the client's id (or, for a fresh client, the
//!    session's position): every event after the id is in the replay, the
//!    subscription, or both.
//! 3. Send `retry:`, then `connected` carrying the stream's position as its
//!    `id:`, then the replay, then live events; live events at or before the
//!    last replayed id are dropped (no gap, no duplicate at the seam).
//! 4. If history cannot prove it holds everything after the id, send
//!    `reset` instead of the replay, carrying the newest id held (`0-0` when
//!    nothing is), and go live from there.

use bytes::BytesMut;
use serde_json::{json, Map, Value};

use crate::broadcaster::{BroadcastError, Broadcaster};
use crate::budget::ReplayBudget;
use crate::event::{EventId, EventType, OutgoingEvent, SessionId};
use crate::retry::RetryPolicy;
use crate::sse::{encode_event, encode_retry};
use crate::stream::{CloseSignal, SseStream};

/// How a stream opened by [`open_stream`] behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StreamOptions {
    /// Interval of comment heartbeats.
    pub heartbeat: std::time::Duration,
    /// Base of the `retry:` hint sent first. Each stream gets it plus a
    /// random part of up to half of it again, or of up to `open streams /
    /// resume_rate` seconds when that is more: the clients of an instance
    /// that dies then do not all come back in the same instant
    /// (`docs/delivery.md`, the drain).
    pub retry: std::time::Duration,
    /// Resumes per second a herd is spread to (`None`: half the base).
    pub resume_rate: Option<std::num::NonZeroU32>,
    /// When and how the stream ends on shutdown.
    pub close: CloseSignal,
    /// Extra fields of the `connected` event (besides `session_id`).
    pub connected: Map<String, Value>,
    /// What the replay may hold until the client has read it; a replay
    /// that does not fit is answered `reset` (`None`: no bound).
    pub replay_budget: Option<ReplayBudget>,
}

impl StreamOptions {
    pub fn new(close: CloseSignal) -> Self {
        Self {
            heartbeat: std::time::Duration::from_secs(15),
            retry: RetryPolicy::DEFAULT.base,
            resume_rate: RetryPolicy::DEFAULT.resume_rate,
            close,
            connected: Map::new(),
            replay_budget: None,
        }
    }
}

/// What [`open_stream`] did with the client's `Last-Event-ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResumeOutcome {
    /// No id: the stream starts at the session's position.
    Fresh { position: EventId },
    /// History held everything after the id; `replayed` events precede the
    /// live ones.
    Resumed { replayed: usize },
    /// History could not vouch for the id: the stream starts with `reset`.
    Reset {
        last_event_id: EventId,
        oldest: Option<EventId>,
        /// The id the `reset` carries: where the client stands now.
        position: EventId,
        /// History held everything, but the replay did not fit the
        /// stream's [`ReplayBudget`].
        over_budget: bool,
    },
}

/// Opens the SSE body for `session`. See the module docs.
pub async fn open_stream(
    broadcaster: &dyn Broadcaster,
    session: &SessionId,
    last_event_id: Option<EventId>,
    options: StreamOptions,
) -> Result<(SseStream, ResumeOutcome), BroadcastError> {
    // A late event that comes before the stream's position is known (while
    // it subscribes and reads its replay) is answered once it is.
    let subscription = broadcaster.subscribe(session).await?;
    // What this instance delivered before the subscription joined never
    // reaches it: a stream starts at or past it unless its replay covers
    // it (a fresh stream whose position could not be read, a resume
    // answered with `reset`).
    let joined_after = subscription.joined_after();
    let (position, replay) = match last_event_id {
        Some(after) => (after, Some(broadcaster.replay(session, after).await)),
        None => (broadcaster.position(session).await.max(joined_after), None),
    };

    let mut fields = options.connected;
    fields.insert("session_id".into(), Value::from(session.as_str()));
    let connected = OutgoingEvent::json(EventType::from_static("connected"), &fields);
    let mut prelude = BytesMut::new();
    let policy = RetryPolicy {
        base: options.retry,
        resume_rate: options.resume_rate,
    };
    let spread = policy.spread(subscription.herd());
    prelude.extend_from_slice(&encode_retry(policy.draw(spread)));
    prelude.extend_from_slice(&encode_event(
        Some(position),
        &connected.event_type,
        &connected.data,
    ));
    let body = SseStream::new(
        prelude.freeze(),
        subscription,
        options.heartbeat,
        options.close,
    )
    .hinted(policy, spread)
    .positioned(position);

    let Some(replay) = replay else {
        return Ok((body.opened(true), ResumeOutcome::Fresh { position }));
    };
    let mut replay = replay;
    let mut over_budget = false;
    if replay.complete() {
        let bytes = replay.frames.iter().map(|f| f.bytes.len()).sum();
        match options.replay_budget.map(|budget| budget.take(bytes)) {
            // Over budget: as if larger than one resume may replay.
            Some(None) => {
                replay.too_large = true;
                over_budget = true;
            }
            hold => {
                let replayed = replay.frames.len();
                return Ok((
                    body.resume(replay.frames, hold.flatten()).opened(false),
                    ResumeOutcome::Resumed { replayed },
                ));
            }
        }
    }
    // The reset moves the client to the newest id held, so its next
    // reconnect resumes from a point history can vouch for. Not back,
    // though, when the client's id is most likely a real event this
    // instance cannot see: the shared history could not be read, or the
    // id was given during a Redis outage (a local id, by a clock of its
    // own, maybe ahead) and that event is not here yet. Moving the client
    // back would have it receive again what it has; an event at or before
    // its id arriving later is covered by the reset. (A reconnect from such
    // an id resets again until a newer event moves the client on.) A
    // made-up id from the future is never kept: a stream positioned there
    // would let no real event through.
    let held = match replay.newest {
        Some(newest) => newest,
        None => broadcaster.position(session).await,
    };
    let unseen = replay.unreadable || position.is_local();
    let now = if unseen && position > held && position.is_plausible() {
        position
    } else {
        held
    }
    .max(joined_after);
    let reset = OutgoingEvent::json(
        EventType::from_static("reset"),
        &json!({
            "last_event_id": position.to_string(),
            "oldest_id": replay.oldest.map(|id| id.to_string()),
        }),
    );
    let body = body
        .reset(encode_event(Some(now), &reset.event_type, &reset.data))
        .positioned(now)
        .opened(true);
    Ok((
        body,
        ResumeOutcome::Reset {
            last_event_id: position,
            oldest: replay.oldest,
            position: now,
            over_budget,
        },
    ))
}
