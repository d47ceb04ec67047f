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
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use axum::response::Response;
use bytes::Bytes;
use futures::future::BoxFuture;
use hyper::body::Incoming;
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;
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
    req.map(|body| {
        Body::new(DeadlineBody {
            body,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
        })
    })
}

/// The body did not end within `REQUEST_TIMEOUT_SECS`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within REQUEST_TIMEOUT_SECS ({} s)", .0.as_secs())]
pub struct BodyTimeout(pub Duration);

struct DeadlineBody {
    body: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
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
        match self.deadline.as_mut().poll(cx) {
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

/// The requests open on one connection.
#[derive(Clone)]
pub struct Activity(watch::Sender<usize>);

impl Activity {
    pub fn new() -> Self {
        Self(watch::Sender::new(0))
    }

    /// A request starts; it ends when the returned guard is dropped.
    pub fn enter(&self) -> Open {
        self.0.send_modify(|n| *n += 1);
        Open(self.0.clone())
    }

    /// Resolves once no request has been open for `limit`.
    fn idle_for(&self, limit: Duration) -> BoxFuture<'static, ()> {
        let mut open = self.0.subscribe();
        Box::pin(async move {
            loop {
                if *open.borrow_and_update() == 0 {
                    tokio::select! {
                        () = tokio::time::sleep(limit) => return,
                        _ = open.changed() => {}
                    }
                } else if open.changed().await.is_err() {
                    // Unreachable while `Watched` holds the sender.
                    std::future::pending::<()>().await;
                }
            }
        })
    }
}

/// One open request; see [`Activity::enter`].
pub struct Open(watch::Sender<usize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
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
    async fn idle_only_after_the_last_request_ended_for_the_whole_deadline() {
        let activity = Activity::new();
        let limit = Duration::from_secs(10);
        let open = activity.enter();
        let mut idle = activity.idle_for(limit);
        // Busy for longer than the deadline: never idle.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(futures::poll!(idle.as_mut()).is_pending());
        drop(open);
        // Polled after each change, as the change's wake-up would.
        assert!(futures::poll!(idle.as_mut()).is_pending());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(futures::poll!(idle.as_mut()).is_pending());
        // A request in between starts the count again.
        drop(activity.enter());
        assert!(futures::poll!(idle.as_mut()).is_pending());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(futures::poll!(idle.as_mut()).is_pending());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(futures::poll!(idle.as_mut()).is_ready());
    }

    #[tokio::test]
    async fn a_held_body_keeps_its_request_open_until_dropped() {
        let activity = Activity::new();
        let res = hold_open(Response::new(Body::from("x")), activity.enter());
        assert_eq!(*activity.0.borrow(), 1);
        drop(res);
        assert_eq!(*activity.0.borrow(), 0);
    }
}
