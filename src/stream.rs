//! [`SseStream`]: the response body of one open SSE stream.
//!
//! It yields the connect prelude (a `retry:` hint and the `connected` event),
//! then every frame of its [`Subscription`], with a comment heartbeat on a
//! fixed interval, and ends itself when its [`CloseSignal`] fires — an SSE
//! body never finishes on its own, so a graceful shutdown would otherwise wait
//! forever (axum issue #2673). On that signal each stream waits a random
//! moment within the drain window, sends a jittered `retry:` hint and ends:
//! the clients of a draining instance reconnect spread out over time instead
//! of all at once.
//!
//! A subscriber that lags behind its queue is cut: the stream ends and the
//! client reconnects (resuming by `Last-Event-ID`), rather than the server
//! buffering without bound.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::broadcaster::{Subscription, SubscriptionError};
use crate::sse::{encode_retry, HEARTBEAT};

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
}

/// The body of one SSE response. See the module docs.
pub struct SseStream {
    prelude: Option<Bytes>,
    subscription: Subscription,
    heartbeat: Interval,
    close: Closing,
    on_end: Option<Box<dyn FnOnce(StreamEnd) + Send + Sync>>,
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
            prelude: Some(prelude),
            subscription,
            heartbeat: interval,
            close: Closing::Waiting(Box::pin(close.token.clone().cancelled_owned()), close),
            on_end: None,
        }
    }

    /// Called once when the server ends the stream (not when the client
    /// goes away: then the stream is simply dropped).
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

impl Stream for SseStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(prelude) = this.prelude.take() {
            return Poll::Ready(Some(Ok(prelude)));
        }
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
                    let hint = encode_retry(*retry);
                    this.close = Closing::Done;
                    return Poll::Ready(Some(Ok(hint)));
                }
                Closing::Done => return this.end(StreamEnd::Shutdown),
            }
        }
        match Pin::new(&mut this.subscription).poll_next(cx) {
            Poll::Ready(Some(Ok(frame))) => return Poll::Ready(Some(Ok(frame.bytes))),
            Poll::Ready(Some(Err(SubscriptionError::Lagged(_)))) => {
                return this.end(StreamEnd::Lagged)
            }
            Poll::Ready(None) => return this.end(StreamEnd::Closed),
            Poll::Pending => {}
        }
        if this.heartbeat.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(HEARTBEAT)));
        }
        Poll::Pending
    }
}
