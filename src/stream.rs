//! [`SseStream`]: the response body of one open SSE stream.
//!
//! It yields the connect prelude (a `retry:` hint and the `connected` event),
//! then every frame of its [`Subscription`], with a comment heartbeat after
//! each interval in which nothing went out (a fresh `retry:` hint instead
//! when the instance's herd has grown or shrunk enough to change it, see
//! [`crate::retry`]), and ends
//! itself when its [`CloseSignal`] fires — an SSE
//! body never finishes on its own, so a graceful shutdown would otherwise wait
//! forever (axum issue #2673). On that signal each stream waits a random
//! moment within the drain window, sends a jittered `retry:` hint and ends:
//! the clients of a draining instance reconnect spread out over time instead
//! of all at once.
//!
//! A subscriber that lags behind its queue is cut: the stream ends and the
//! client reconnects (resuming by `Last-Event-ID`), rather than the server
//! buffering without bound.
//!
//! Every stream has a position: the id the client is known to be past
//! (its `Last-Event-ID`, or the newest event when it connected fresh). A
//! resumed stream first sends the replayed history ([`SseStream::resume`]);
//! live frames at or before the position (the replay already carried them,
//! or they predate the connection) are dropped, so the seam between history
//! and live has neither a gap nor a duplicate.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::budget::ReplayHold;
use crate::event::{EventId, Frame};
use crate::hub::{Subscription, SubscriptionError};
use crate::retry::RetryPolicy;
use crate::sink::DirectWriter;
use crate::sse::{encode_retry, HEARTBEAT, HEARTBEAT_EVENT};

/// Why a stream ended, reported to the `on_end` callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEnd {
    /// The subscription closed (broadcaster shut down).
    Closed,
    /// The close signal fired (the instance drains).
    Shutdown,
    /// The client fell behind its queue and was cut.
    Lagged,
    /// The response was dropped before it ended: the client went away (or
    /// the server cut its connection, e.g. for a stalled write).
    ClientGone,
}

/// The body of one SSE response. See the module docs.
///
/// Its writer may hand the stream's socket to the connection map
/// ([`SseStream::direct_writer`]); live frames are then written by the
/// deliveries themselves whenever this body has nothing queued, and it
/// yields only what had to wait (a full socket), heartbeats and its end.
pub struct SseStream {
    /// What goes before any live frame, in order: the prelude, a `reset`
    /// event, the replayed history. Freed once sent.
    ahead: VecDeque<Bytes>,
    subscription: Subscription,
    heartbeat: Interval,
    /// How the hint is drawn, and the spread the last one was drawn under.
    hint: Option<(RetryPolicy, Duration)>,
    /// Heartbeats as events ([`HEARTBEAT_EVENT`]) rather than comments.
    beat_events: bool,
    close: Closing,
    on_end: Option<Box<dyn FnOnce(StreamEnd) + Send + Sync>>,
    /// The replay's share of a budget, given back once `ahead` is sent.
    replay_hold: Option<ReplayHold>,
}

/// When and how streams end on shutdown.
#[derive(Debug, Clone)]
pub struct CloseSignal {
    /// Fires when the instance starts draining.
    pub token: CancellationToken,
    /// Streams close at a uniformly random moment within this window.
    pub window: Duration,
    /// Base of the `retry:` hint sent before closing; a random extra of up
    /// to the same amount is added.
    pub retry: Duration,
}

enum Closing {
    Waiting(Pin<Box<WaitForCancellationFutureOwned>>, CloseSignal),
    Delaying(Pin<Box<tokio::time::Sleep>>, Duration),
    /// The final `retry:` hint was sent; the stream ends next.
    Done,
}

impl SseStream {
    /// `prelude` is sent first (retry hint, `connected` event); heartbeats
    /// follow every `heartbeat` after that.
    pub fn new(
        prelude: Bytes,
        subscription: Subscription,
        heartbeat: Duration,
        close: CloseSignal,
    ) -> Self {
        let mut interval = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        // After a stall, one heartbeat is enough; no burst of missed ticks.
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            ahead: VecDeque::from([prelude]),
            subscription,
            heartbeat: interval,
            hint: None,
            beat_events: false,
            close: Closing::Waiting(Box::pin(close.token.clone().cancelled_owned()), close),
            on_end: None,
            replay_hold: None,
        }
    }

    /// The prelude's `retry:` hint was drawn by `policy` under `spread`: a
    /// heartbeat sends a fresh one instead of its comment when the herd's
    /// spread has moved on (`RetryPolicy::stale`).
    pub fn hinted(mut self, policy: RetryPolicy, spread: Duration) -> Self {
        self.hint = Some((policy, spread));
        self
    }

    /// Heartbeats go out as `heartbeat` events instead of comments: an
    /// `EventSource` sees no comment, so a page that checks its stream is
    /// alive needs something it can see at least once per interval.
    pub fn heartbeat_events(mut self) -> Self {
        self.beat_events = true;
        self
    }

    fn beat(&self) -> Bytes {
        if self.beat_events {
            HEARTBEAT_EVENT
        } else {
            HEARTBEAT
        }
    }

    /// The bytes of one heartbeat: a fresh hint when the herd's spread has
    /// moved on, else a comment — or nothing when an event went out less
    /// than a heartbeat ago: a stream that carries events is not idle, and
    /// its next heartbeat moves to one interval after that event, so no
    /// stream is silent for longer than the interval either way.
    fn heartbeat_bytes(&mut self) -> Option<Bytes> {
        if let Some((policy, sent)) = &mut self.hint {
            let now = policy.spread(self.subscription.herd());
            if RetryPolicy::stale(*sent, now) {
                *sent = now;
                let hint = encode_retry(policy.draw(now));
                if !self.beat_events {
                    return Some(hint);
                }
                // The hint alone is invisible to an `EventSource`.
                let mut both = bytes::BytesMut::from(&hint[..]);
                both.extend_from_slice(&HEARTBEAT_EVENT);
                return Some(both.freeze());
            }
        }
        if let Some(last) = self.subscription.last_out() {
            let due = last + self.heartbeat.period();
            if due > Instant::now() {
                self.heartbeat.reset_at(due);
                return None;
            }
        }
        Some(self.beat())
    }

    /// Live frames up to `position` are not sent: the client is past them.
    /// History holds every event up to its newest id (an event is recorded
    /// before it is delivered), so a position read from history after
    /// subscribing never hides an event the client has not seen.
    pub fn positioned(self, position: EventId) -> Self {
        self.subscription.set_position(position);
        self
    }

    /// The stream is opened at its position (after [`Self::positioned`] and
    /// any replay); `loaded`: its client loads its state there (a fresh
    /// stream, or one that starts with a resume's `reset`), so an event at
    /// or before it that arrives late is not answered with another `reset`.
    pub(crate) fn opened(self, loaded: bool) -> Self {
        self.subscription.opened(loaded);
        self
    }

    /// Sends `frames` (history after the client's `Last-Event-ID`, in id
    /// order) after the prelude and before live frames, and drops live
    /// frames that repeat them. `hold`, the frames' share of a
    /// [`ReplayBudget`](crate::ReplayBudget), is given back once they are
    /// sent.
    pub fn resume(mut self, frames: Vec<Frame>, hold: Option<ReplayHold>) -> Self {
        if let Some(last) = frames.last() {
            self.subscription.raise_position(last.id);
        }
        self.ahead.extend(frames.into_iter().map(|f| f.bytes));
        self.replay_hold = hold;
        self
    }

    /// Sends `reset` (an event telling the client its history is gone and it
    /// must reload its state) after the prelude.
    pub fn reset(mut self, reset: Bytes) -> Self {
        // Right after the prelude, before any replayed history.
        let at = self.ahead.len().min(1);
        self.ahead.insert(at, reset);
        self
    }

    /// The handle through which this stream's writer may let deliveries
    /// write into its socket directly (see [`DirectWriter`]).
    pub fn direct_writer(&self) -> DirectWriter {
        self.subscription.direct_writer()
    }

    /// Called once when the stream ends: by the server ([`StreamEnd::Closed`],
    /// [`StreamEnd::Shutdown`], [`StreamEnd::Lagged`]), or with
    /// [`StreamEnd::ClientGone`] when the response is dropped first (the
    /// client went away, or its connection was cut).
    pub fn on_end(mut self, f: impl FnOnce(StreamEnd) + Send + Sync + 'static) -> Self {
        self.on_end = Some(Box::new(f));
        self
    }

    fn end(&mut self, why: StreamEnd) -> Poll<Option<Result<Bytes, Infallible>>> {
        if let Some(f) = self.on_end.take() {
            f(why);
        }
        Poll::Ready(None)
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(StreamEnd::ClientGone);
        }
    }
}

impl Stream for SseStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(bytes) = this.ahead.pop_front() {
            if this.ahead.is_empty() {
                this.ahead = VecDeque::new();
                this.replay_hold = None;
            }
            return Poll::Ready(Some(Ok(bytes)));
        }
        // The closing hint and the heartbeat go through the subscription's
        // queue, behind what is queued there: deliveries may be writing into
        // the socket directly, and the queue is what orders the two.
        loop {
            match &mut this.close {
                Closing::Waiting(fired, signal) => {
                    if fired.as_mut().poll(cx).is_pending() {
                        break;
                    }
                    let delay = signal.window.mul_f64(rand::random::<f64>());
                    let retry = signal.retry + signal.retry.mul_f64(rand::random::<f64>());
                    this.close = Closing::Delaying(Box::pin(tokio::time::sleep(delay)), retry);
                }
                Closing::Delaying(sleep, retry) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        break;
                    }
                    this.subscription.seal(encode_retry(*retry));
                    this.close = Closing::Done;
                }
                Closing::Done => break,
            }
        }
        if !matches!(this.close, Closing::Done) && this.heartbeat.poll_tick(cx).is_ready() {
            // A tick that sends nothing moved the timer: polling it again
            // registers the new deadline (one interval after the last
            // event, so it is not due yet; if it were, it gets its comment).
            let beat = match this.heartbeat_bytes() {
                Some(beat) => Some(beat),
                None => this.heartbeat.poll_tick(cx).is_ready().then(|| this.beat()),
            };
            if let Some(beat) = beat {
                this.subscription.push_own(beat);
            }
        }
        match Pin::new(&mut this.subscription).poll_next(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                crate::metrics::written(frame.id);
                Poll::Ready(Some(Ok(frame.bytes)))
            }
            Poll::Ready(Some(Err(SubscriptionError::Lagged(_)))) => this.end(StreamEnd::Lagged),
            Poll::Ready(Some(Err(_))) => this.end(StreamEnd::ClientGone),
            Poll::Ready(None) if matches!(this.close, Closing::Done) => {
                this.end(StreamEnd::Shutdown)
            }
            Poll::Ready(None) => this.end(StreamEnd::Closed),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;
    use crate::SessionId;
    use futures::StreamExt;

    fn stream(hub: &Hub, session: &SessionId, heartbeat: Duration) -> SseStream {
        let subscription = hub.subscribe(session).unwrap().subscription;
        let close = CloseSignal {
            token: CancellationToken::new(),
            window: Duration::ZERO,
            retry: Duration::from_secs(1),
        };
        SseStream::new(
            Bytes::from_static(b": hi\n\n"),
            subscription,
            heartbeat,
            close,
        )
    }

    fn frame(seq: u64) -> Frame {
        Frame {
            id: EventId { ms: 1, seq },
            bytes: Bytes::from(format!("data: {seq}\n\n")),
        }
    }

    async fn next(s: &mut SseStream) -> Bytes {
        s.next().await.unwrap().unwrap()
    }

    /// A stream that carries events gets no comments in between; once it
    /// goes quiet, the comment comes one interval after its last event,
    /// not at the next tick of a fixed clock.
    #[tokio::test]
    async fn a_heartbeat_comes_one_interval_after_the_last_event() {
        let hub = Hub::new(64);
        let session = SessionId::parse("s").unwrap();
        let beat = Duration::from_millis(1000);
        let mut s = stream(&hub, &session, beat);
        assert_eq!(next(&mut s).await, Bytes::from_static(b": hi\n\n"));
        // Events every 100 ms for 2.5 s: more than two intervals.
        let mut last = Instant::now();
        for seq in 1..=25 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            hub.deliver(&session, frame(seq));
            last = Instant::now();
            assert_eq!(
                next(&mut s).await,
                frame(seq).bytes,
                "a comment between events"
            );
        }
        assert_eq!(next(&mut s).await, HEARTBEAT);
        let quiet = last.elapsed();
        assert!(
            quiet >= beat - Duration::from_millis(20),
            "comment {quiet:?} after the last event"
        );
        assert!(quiet < beat * 3, "comment {quiet:?} after the last event");
        // Idle from here on: comments on the interval.
        let t = Instant::now();
        assert_eq!(next(&mut s).await, HEARTBEAT);
        assert!(t.elapsed() >= beat - Duration::from_millis(20));
    }

    /// Asked for, heartbeats are `heartbeat` events without an id, on the
    /// same schedule; events in between are untouched.
    #[tokio::test]
    async fn heartbeat_events_replace_the_comments() {
        let hub = Hub::new(64);
        let session = SessionId::parse("s").unwrap();
        let mut s = stream(&hub, &session, Duration::from_millis(200)).heartbeat_events();
        assert_eq!(next(&mut s).await, Bytes::from_static(b": hi\n\n"));
        assert_eq!(next(&mut s).await, HEARTBEAT_EVENT);
        assert_eq!(&HEARTBEAT_EVENT[..], b"event: heartbeat\ndata:\n\n");
        hub.deliver(&session, frame(1));
        assert_eq!(next(&mut s).await, frame(1).bytes);
        assert_eq!(next(&mut s).await, HEARTBEAT_EVENT);
    }
}
