//! [`SseStream`]: the response body of one open SSE stream.
//!
//! It yields the connect prelude (a `retry:` hint and the `connected` event),
//! then every frame of its [`Subscription`], with a comment heartbeat on a
//! fixed interval, and ends itself when the shutdown token fires — an SSE body
//! never finishes on its own, so a graceful shutdown would otherwise wait
//! forever (axum issue #2673).
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
use crate::sse::HEARTBEAT;

/// Why a stream ended, reported to the `on_end` callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamEnd {
    /// The subscription closed (broadcaster shut down).
    Closed,
    /// The shutdown token fired.
    Shutdown,
    /// The client fell behind its queue and was cut.
    Lagged,
}

/// The body of one SSE response. See the module docs.
pub struct SseStream {
    prelude: Option<Bytes>,
    subscription: Subscription,
    heartbeat: Interval,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    on_end: Option<Box<dyn FnOnce(StreamEnd) + Send + Sync>>,
}

impl SseStream {
    /// `prelude` is sent first (retry hint, `connected` event); heartbeats
    /// follow every `heartbeat` after that.
    pub fn new(
        prelude: Bytes,
        subscription: Subscription,
        heartbeat: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let mut interval = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        // After a stall, one heartbeat is enough; no burst of missed ticks.
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            prelude: Some(prelude),
            subscription,
            heartbeat: interval,
            shutdown: Box::pin(shutdown.cancelled_owned()),
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
        if this.shutdown.as_mut().poll(cx).is_ready() {
            return this.end(StreamEnd::Shutdown);
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
