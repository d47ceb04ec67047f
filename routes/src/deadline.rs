//! Time limits past the request head: a request's body must end within
//! `REQUEST_TIMEOUT_SECS` of its head; a connection hyper serves is closed
//! once no request has been open on it for the idle deadline.
//!
//! Why both: hyper bounds the time to read an HTTP/1 request head and
//! nothing else. A client that sends a head with `Content-Length: 65000`
//! and then a trickle (or nothing) held its connection and the body read so
//! far for as long as it liked; an h2c client that answers pings held an
//! idle connection for ever, and one with many streams that never end
//! their request held them all. A body has no minimum rate here: the
//! deadline is for the whole request, so a trickle gains nothing.
//!
//! hyper has no idle timeout for HTTP/2 connections (hyper#1628), so
//! [`Watched`] counts the requests open on one connection — from the
//! service call until the response body is dropped, so an event stream
//! served over HTTP/2 keeps its connection busy — and shuts the connection
//! down gracefully (GOAWAY, or a close between HTTP/1 requests) when the
//! count stays zero for the deadline, or when the server stops.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use axum::response::Response;
use bytes::Bytes;
use futures::future::BoxFuture;
use hyper::body::Incoming;
use hyper_util::server::graceful::GracefulConnection;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A request body that must end within its deadline; past it, the next
/// read fails with [`BodyTimeout`], which a handler's body extractor turns
/// into `408 {"error":{"code":"request_timeout"}}`.
///
/// Only the body is bounded, never the handler: a handler cancelled half-way
/// through a publish could leave the client told 408 for an event that went
/// out.
pub fn bounded(req: Request<Incoming>, limit: Duration) -> Request<Body> {
    if http_body::Body::is_end_stream(req.body()) {
        // No body (every event stream): nothing to bound, no timer.
        return req.map(Body::new);
    }
    let started = tokio::time::Instant::now();
    req.map(|body| {
        Body::new(DeadlineBody {
            body,
            started,
            limit,
            deadline: None,
        })
    })
}

/// The body did not end within `REQUEST_TIMEOUT_SECS`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within REQUEST_TIMEOUT_SECS ({} s)", .0.as_secs())]
pub struct BodyTimeout(pub Duration);

struct DeadlineBody {
    body: Incoming,
    started: tokio::time::Instant,
    limit: Duration,
    /// Armed the first time the body is not there yet: a body that came
    /// with its head (most publishes) never costs a timer.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(axum::Error::new)));
        }
        let at = self.started + self.limit;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(self.limit))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The deadline, if `error` (or what caused it) is a [`BodyTimeout`].
pub fn body_timeout(error: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(timeout) = e.downcast_ref::<BodyTimeout>() {
            return Some(timeout.0);
        }
        cause = e.source();
    }
    None
}

/// The requests open on one connection. Plain counters, no channel: this
/// is paid on every request (a publish among them), the idle check once per
/// deadline and connection.
#[derive(Clone, Default)]
pub struct Activity(Arc<Counts>);

#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    /// Requests that ended so far.
    ended: AtomicU64,
}

impl Activity {
    pub fn new() -> Self {
        Self::default()
    }

    /// A request starts; it ends when the returned guard is dropped.
    pub fn enter(&self) -> Open {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        Open(self.0.clone())
    }

    /// Resolves once a whole `limit` went by with no request open and none
    /// ending: between one and two deadlines after the last request ended.
    fn idle_for(&self, limit: Duration) -> BoxFuture<'static, ()> {
        let counts = self.0.clone();
        Box::pin(async move {
            loop {
                let ended = counts.ended.load(Ordering::Acquire);
                tokio::time::sleep(limit).await;
                if counts.open.load(Ordering::Acquire) == 0
                    && counts.ended.load(Ordering::Acquire) == ended
                {
                    return;
                }
            }
        })
    }
}

/// One open request; see [`Activity::enter`].
pub struct Open(Arc<Counts>);

impl Drop for Open {
    fn drop(&mut self) {
        // Counted as ended before it stops being open: a check in between
        // sees it either open or ended, never idle.
        self.0.ended.fetch_add(1, Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::Release);
    }
}

/// A response body that keeps its request open until it is dropped.
pub fn hold_open(res: Response, open: Open) -> Response {
    res.map(|body| Body::new(Held { body, _open: open }))
}

struct Held {
    body: Body,
    _open: Open,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A hyper connection that shuts down gracefully when the server stops or
/// when it has been idle for the deadline.
pub struct Watched<C> {
    conn: Pin<Box<C>>,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    idle: BoxFuture<'static, ()>,
    shutting_down: bool,
}

impl<C: GracefulConnection> Watched<C> {
    pub fn new(conn: C, stop: CancellationToken, activity: &Activity, idle: Duration) -> Self {
        Self {
            conn: Box::pin(conn),
            stop: Box::pin(stop.cancelled_owned()),
            idle: activity.idle_for(idle),
            shutting_down: false,
        }
    }
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = Result<(), C::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if !this.shutting_down
            && (this.stop.as_mut().poll(cx).is_ready() || this.idle.as_mut().poll(cx).is_ready())
        {
            this.shutting_down = true;
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_only_after_a_whole_deadline_without_requests() {
        let activity = Activity::new();
        let limit = Duration::from_secs(10);
        let open = activity.enter();
        let mut idle = tokio::spawn(activity.idle_for(limit));
        // Busy for longer than the deadline: never idle.
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert!(!idle.is_finished());
        drop(open);
        let ended = tokio::time::Instant::now();
        // A request in between starts the count again.
        tokio::time::sleep(Duration::from_secs(8)).await;
        drop(activity.enter());
        let last = tokio::time::Instant::now();
        (&mut idle).await.unwrap();
        let quiet = last.elapsed();
        assert!(quiet >= limit && quiet <= limit * 2, "{quiet:?}");
        assert!(ended.elapsed() > limit);
    }

    #[tokio::test]
    async fn a_held_body_keeps_its_request_open_until_dropped() {
        let activity = Activity::new();
        let res = hold_open(Response::new(Body::from("x")), activity.enter());
        assert_eq!(activity.0.open.load(Ordering::Relaxed), 1);
        drop(res);
        assert_eq!(activity.0.open.load(Ordering::Relaxed), 0);
    }
}
