//! axum integration (feature `axum`): what a stream route needs, so an
//! application gets the delivery guarantee without copying a server.
//!
//! - [`LastEventId`] — the extractor for where a client resumes: the
//!   `Last-Event-ID` header, then `?last_event_id=`; a malformed id is a
//!   `400` with a JSON body.
//! - [`SseResponse`] — the stream as a response (`text/event-stream`, no
//!   caching, no proxy buffering), from [`SseScale::respond`].
//! - [`drain_on_signal`] — for `axum::serve(...).with_graceful_shutdown`:
//!   on SIGTERM/SIGINT, streams close spread over the drain window, then
//!   the server stops.
//! - [`StallListener`] — a listener for `axum::serve` whose connections
//!   fail a write blocked for longer than a limit, so a client that stops
//!   reading is cut instead of held for ever.
//!
//! ```no_run
//! use axum::{extract::{Path, State}, routing::get, Router};
//! use sse_scale::axum::{LastEventId, SseResponse};
//! use sse_scale::{SessionId, SseScale};
//! use std::sync::Arc;
//!
//! async fn events(
//!     State(scale): State<Arc<SseScale>>,
//!     Path(id): Path<String>,
//!     LastEventId(last): LastEventId,
//! ) -> Result<SseResponse, sse_scale::axum::Error> {
//!     let session = SessionId::parse(&id)?;
//!     Ok(scale.respond(&session, last).await?)
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let scale = Arc::new(SseScale::from_env()?);
//! let app = Router::new()
//!     .route("/sessions/{id}/events", get(events))
//!     .with_state(scale.clone());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(sse_scale::axum::drain_on_signal(scale.clone()))
//!     .await?;
//! scale.shutdown().await;
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use ::axum::body::Body;
use ::axum::extract::connect_info::Connected;
use ::axum::extract::FromRequestParts;
use ::axum::http::request::Parts;
use ::axum::http::{header, HeaderName, HeaderValue, StatusCode};
use ::axum::response::{IntoResponse, Response};
use ::axum::serve::{IncomingStream, Listener};
use bytes::Bytes;
use futures::Stream;
use serde_json::json;
use tokio::net::TcpListener;

use crate::broadcaster::BroadcastError;
use crate::event::{EventId, InvalidInput, SessionId};
use crate::resume::ResumeOutcome;
use crate::scale::SseScale;
use crate::stall::StallGuard;
use crate::stream::{SseStream, StreamEnd};

/// An error as a JSON response: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct Error {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut res = (self.status, ::axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}

impl From<InvalidInput> for Error {
    fn from(e: InvalidInput) -> Self {
        let code = match e {
            InvalidInput::SessionId => "invalid_session_id",
            InvalidInput::EventType => "invalid_event_type",
            _ => "invalid_input",
        };
        Error {
            status: StatusCode::BAD_REQUEST,
            code,
            message: e.to_string(),
        }
    }
}

impl From<BroadcastError> for Error {
    fn from(e: BroadcastError) -> Self {
        Error {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: e.to_string(),
        }
    }
}

/// Where a resuming client left off: the `Last-Event-ID` header (sent by
/// `EventSource` on every reconnect) or, for clients that cannot set it,
/// `?last_event_id=`. The header wins: after a reconnect it is newer than
/// the query string of the original URL. Empty means "no id".
#[derive(Debug, Clone, Copy)]
pub struct LastEventId(pub Option<EventId>);

/// The value of `key` in `uri`'s query string, decoded; `None` when the key
/// is absent or given more than once (ambiguous). A stream open reads one
/// or two keys, and `Query`'s deserializer cost it more than the rest of
/// its extractors; here a pair without `%` or `+` is taken as it stands,
/// and only the others go through `form_urlencoded`'s decoding.
pub fn query_value<'a>(uri: &'a ::axum::http::Uri, key: &str) -> Option<Cow<'a, str>> {
    query_lookup(uri, key).ok().flatten()
}

/// The value of `key` in `uri`'s query string, decoded (`None`: absent), or
/// `Err` when it is given more than once.
fn query_lookup<'a>(uri: &'a ::axum::http::Uri, key: &str) -> Result<Option<Cow<'a, str>>, ()> {
    let mut found = None;
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    for pair in query.split('&') {
        let plain = !pair.contains(['%', '+']);
        let (k, v) = match pair.split_once('=') {
            Some(kv) if plain => (Cow::Borrowed(kv.0), Cow::Borrowed(kv.1)),
            None if plain => (Cow::Borrowed(pair), Cow::Borrowed("")),
            _ => match form_urlencoded::parse(pair.as_bytes()).next() {
                Some(kv) => kv,
                None => continue,
            },
        };
        if k == key {
            if found.is_some() {
                return Err(());
            }
            found = Some(v);
        }
    }
    Ok(found)
}

fn invalid_last_event_id() -> Error {
    Error {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_last_event_id",
        message: "Last-Event-ID must be an event id this server sent (`<ms>-<seq>`)".into(),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for LastEventId {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Two ids, or one that is not text, would each have to be guessed
        // at: a guess that starts the stream fresh skips what the client
        // missed without a word. An empty header is no id (the query's
        // counts then), as `EventSource` sends none before its first id.
        let mut headers = parts.headers.get_all("last-event-id").iter();
        let header = match (headers.next(), headers.next()) {
            (Some(_), Some(_)) => return Err(invalid_last_event_id()),
            (Some(v), None) => v.to_str().map_err(|_| invalid_last_event_id())?.trim(),
            (None, _) => "",
        };
        let raw = if header.is_empty() {
            query_lookup(&parts.uri, "last_event_id")
                .map_err(|()| invalid_last_event_id())?
                .map(Cow::into_owned)
        } else {
            Some(header.to_owned())
        };
        match raw.as_deref().map(str::trim) {
            None | Some("") => Ok(LastEventId(None)),
            Some(raw) => raw
                .parse()
                .map(|id| LastEventId(Some(id)))
                .map_err(|_| invalid_last_event_id()),
        }
    }
}

/// One open stream as an axum response. Dropping the response (the client
/// went away) unsubscribes.
pub struct SseResponse {
    body: SseStream,
    guards: Guards,
}

/// What a stream keeps alive: one allocation per [`SseResponse::hold`],
/// each holding the ones before (a stream lives long; its memory counts).
type Guards = Option<Box<dyn Send + Sync>>;

impl SseResponse {
    pub fn new(body: SseStream) -> Self {
        Self { body, guards: None }
    }

    /// Keeps `guard` alive as long as the stream (a slot in a stream cap,
    /// a metric gauge). Hold several as one tuple: one allocation.
    pub fn hold(mut self, guard: impl Send + Sync + 'static) -> Self {
        self.guards = Some(match self.guards.take() {
            None => Box::new(guard),
            Some(before) => Box::new((before, guard)),
        });
        self
    }

    /// Heartbeats as `heartbeat` events (see
    /// [`SseStream::heartbeat_events`]).
    pub fn heartbeat_events(mut self) -> Self {
        self.body = self.body.heartbeat_events();
        self
    }

    /// Called once when the server ends the stream (see
    /// [`SseStream::on_end`]).
    pub fn on_end(mut self, f: impl FnOnce(StreamEnd) + Send + Sync + 'static) -> Self {
        self.body = self.body.on_end(f);
        self
    }
}

/// The stream body with what it keeps alive.
struct Held {
    body: SseStream,
    _guards: Guards,
}

impl Stream for Held {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.body).poll_next(cx)
    }
}

impl IntoResponse for SseResponse {
    fn into_response(self) -> Response {
        let headers = [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            // nginx: do not buffer the stream.
            (
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ];
        // A writer that sends the body's bytes to the socket as they are
        // (the reference server's stream writer) may take this and let
        // deliveries write into the socket directly; any other ignores it.
        let direct = self.body.direct_writer();
        let body = Held {
            body: self.body,
            _guards: self.guards,
        };
        let mut res = (headers, Body::from_stream(body)).into_response();
        res.extensions_mut().insert(direct);
        res
    }
}

impl SseScale {
    /// Opens `session`'s stream as a response, resuming after
    /// `last_event_id` (subscribe first, then replay or `reset`; see
    /// [`open_stream`](crate::open_stream)).
    pub async fn respond(
        &self,
        session: &SessionId,
        last_event_id: Option<EventId>,
    ) -> Result<SseResponse, BroadcastError> {
        self.respond_with_outcome(session, last_event_id)
            .await
            .map(|(res, _)| res)
    }

    /// As [`SseScale::respond`], also saying what became of the id.
    pub async fn respond_with_outcome(
        &self,
        session: &SessionId,
        last_event_id: Option<EventId>,
    ) -> Result<(SseResponse, ResumeOutcome), BroadcastError> {
        let (body, outcome) = self.open_stream(session, last_event_id).await?;
        Ok((SseResponse::new(body), outcome))
    }

    /// As [`SseScale::respond_with_outcome`], the replay charged to
    /// `budget` (see [`SseScale::open_stream_within`]).
    pub async fn respond_within(
        &self,
        session: &SessionId,
        last_event_id: Option<EventId>,
        budget: crate::ReplayBudget,
    ) -> Result<(SseResponse, ResumeOutcome), BroadcastError> {
        let (body, outcome) = self
            .open_stream_within(session, last_event_id, budget)
            .await?;
        Ok((SseResponse::new(body), outcome))
    }
}

/// Resolves when the process should stop serving: on SIGTERM or SIGINT it
/// starts the drain (open streams close spread over the drain window, each
/// after a jittered `retry:` hint), waits out the window, and returns. Pass
/// it to `axum::serve(...).with_graceful_shutdown`, then call
/// [`SseScale::shutdown`] once `serve` has returned. The signals are
/// caught from the moment this is called.
pub fn drain_on_signal(scale: Arc<SseScale>) -> impl std::future::Future<Output = ()> + Send {
    let signal = terminate();
    async move {
        signal.await;
        scale.start_drain();
        tracing::info!(window_secs = scale.drain_window().as_secs_f64(), "draining");
        tokio::time::sleep(scale.drain_window()).await;
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled, so a signal sent right
/// after start-up is caught instead of killing the process. Must be called
/// inside a tokio runtime.
pub fn terminate() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        if let Err(e) = term.as_ref().and(int.as_ref()) {
            tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
        }
        async move {
            tokio::select! {
                () = wait_for(int) => tracing::info!("SIGINT received; shutting down"),
                () = wait_for(term) => tracing::info!("SIGTERM received; shutting down"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("interrupt received; shutting down");
        }
    }
}

#[cfg(unix)]
async fn wait_for(signal: std::io::Result<tokio::signal::unix::Signal>) {
    match signal {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

/// The peer address of a connection, in the request's extensions as
/// `ConnectInfo<PeerAddr>`: with [`StallListener`], through
/// `into_make_service_with_connect_info::<PeerAddr>()`.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// A listener for `axum::serve` (a `TcpListener` unless said otherwise)
/// whose connections fail a write that stays blocked longer than `limit`
/// (see [`StallGuard`]). The request's peer address is
/// `ConnectInfo<PeerAddr>` with
/// `into_make_service_with_connect_info::<PeerAddr>()`.
pub struct StallListener<L = TcpListener> {
    inner: L,
    limit: Duration,
    stalled: Arc<AtomicU64>,
}

impl<L: Listener> StallListener<L> {
    pub fn new(inner: L, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Connections closed so far because a write stalled.
    pub fn stalled(&self) -> Arc<AtomicU64> {
        self.stalled.clone()
    }
}

impl<L: Listener> Listener for StallListener<L> {
    type Io = StallGuard<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        (StallGuard::new(io, self.limit, self.stalled.clone()), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl<L: Listener<Addr = SocketAddr>> Connected<IncomingStream<'_, StallListener<L>>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, StallListener<L>>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::axum::http::Uri;
    use ::axum::routing::get;
    use ::axum::Router;
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn query_values_are_decoded_and_an_ambiguous_key_counts_as_absent() {
        let uri: Uri = "/s/a/events?token=f.1.ab%2Bc&x=1&last_event_id=7-0"
            .parse()
            .unwrap();
        assert_eq!(query_value(&uri, "token").as_deref(), Some("f.1.ab+c"));
        assert_eq!(query_value(&uri, "last_event_id").as_deref(), Some("7-0"));
        assert_eq!(query_value(&uri, "missing"), None);
        let encoded_key: Uri = "/e?tok%65n=a+b".parse().unwrap();
        assert_eq!(query_value(&encoded_key, "token").as_deref(), Some("a b"));
        let twice: Uri = "/e?token=a&token=b".parse().unwrap();
        assert_eq!(query_value(&twice, "token"), None);
        let bare: Uri = "/e".parse().unwrap();
        assert_eq!(query_value(&bare, "token"), None);
        let empty: Uri = "/e?token=".parse().unwrap();
        assert_eq!(query_value(&empty, "token").as_deref(), Some(""));
    }

    /// A client that stops reading an endless response is cut once a write
    /// has been blocked for the limit; one that reads is not.
    #[tokio::test]
    async fn the_stall_listener_cuts_a_client_that_stopped_reading() {
        let endless = || async {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let body = futures::stream::repeat_with(move || Ok::<_, Infallible>(chunk.clone()));
            Body::from_stream(body)
        };
        let app = Router::new().route("/", get(endless));
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = StallListener::new(tcp, Duration::from_millis(200));
        let stalled = listener.stalled();
        tokio::spawn(async move { ::axum::serve(listener, app).await });

        let mut reader = tokio::net::TcpStream::connect(addr).await.unwrap();
        reader
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut stalled_client = tokio::net::TcpStream::connect(addr).await.unwrap();
        stalled_client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // Read from one for a while; never read from the other.
        let mut buf = vec![0; 64 * 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stalled.load(Ordering::Relaxed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stalled client was never cut"
            );
            let n = tokio::time::timeout(Duration::from_millis(50), reader.read(&mut buf)).await;
            assert!(
                !matches!(n, Ok(Ok(0)) | Ok(Err(_))),
                "the reading client was cut"
            );
        }
        assert_eq!(stalled.load(Ordering::Relaxed), 1, "only the stalled one");
        // The reading client is still served.
        let n = reader.read(&mut buf).await.unwrap();
        assert!(n > 0);
    }
}
