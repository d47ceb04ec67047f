//! Session routes: create a session, open its event stream, publish chat
//! messages and generic events.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use axum_extra::extract::cookie::CookieJar;
use bytes::{BufMut, BytesMut};
use serde::Deserialize;
use serde_json::{json, value::RawValue};
use sse_scale::axum::LastEventId;
use sse_scale::event::InvalidInput;
use sse_scale::token::Scope;
use sse_scale::StreamEnd;
use sse_scale::{EventId, EventType, OutgoingEvent, ReplayBudget, ResumeOutcome, SessionId};

use crate::error::AppError;
use crate::extract::{
    AllowedOrigin, BehindTls, ClientIp, CurrentSession, HeartbeatEvents, JsonBody,
    PublishingSession, StreamSession,
};
use crate::state::AppState;

/// `POST /sessions` → `201 {"id", "token"}`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    ClientIp(ip): ClientIp,
    _from: AllowedOrigin,
    BehindTls(behind_tls): BehindTls,
    jar: CookieJar,
    body: axum::body::Body,
) -> Result<Response, AppError> {
    // The limit first: a refused client's body is never read.
    state.limit_session_create(ip).await?;
    // Then the body, read and ignored: a body left unread would make hyper
    // close the keep-alive connection, and a balancer reusing it would fail.
    axum::body::to_bytes(body, usize::MAX).await.map_err(
        |e| match crate::deadline::body_timeout(&e) {
            Some(limit) => AppError::request_timeout(limit),
            None => AppError::bad_request("invalid_body", e.to_string()),
        },
    )?;
    let raw = uuid::Uuid::new_v4().simple().to_string();
    // A simple UUID is 32 hex digits, always a valid session id.
    let Ok(id) = SessionId::parse(&raw) else {
        unreachable!("uuid is a valid session id")
    };
    let jar = state.settings.affinity.pin(jar, behind_tls);
    let mut body = tokens(&state, &id);
    body["id"] = id.as_str().into();
    Ok((StatusCode::CREATED, jar, Json(body)).into_response())
}

/// A full token and a stream-only token for `session`, and when they
/// expire (Unix seconds).
fn tokens(state: &AppState, session: &SessionId) -> serde_json::Value {
    let full = state
        .signer
        .issue(session, Scope::Full, state.settings.token_ttl);
    let stream = state
        .signer
        .issue(session, Scope::Stream, state.settings.token_ttl);
    json!({ "token": full.token, "stream_token": stream.token, "expires_at": full.expires })
}

/// `POST /sessions/{id}/tokens` (full token) → `200 {"token", "stream_token",
/// "expires_at"}`: fresh tokens before the old ones expire.
pub async fn refresh(
    State(state): State<Arc<AppState>>,
    CurrentSession(session): CurrentSession,
    _body: axum::body::Bytes,
) -> Json<serde_json::Value> {
    Json(tokens(&state, &session))
}

/// `GET /sessions/{id}/events` → `text/event-stream`.
// One extractor per thing the request says: axum's way, not a design smell.
#[allow(clippy::too_many_arguments)]
pub async fn stream(
    State(state): State<Arc<AppState>>,
    StreamSession(session): StreamSession,
    ClientIp(ip): ClientIp,
    LastEventId(resume_from): LastEventId,
    HeartbeatEvents(heartbeat_events): HeartbeatEvents,
    BehindTls(behind_tls): BehindTls,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    state.limit_stream_open(ip).await?;
    if state.is_draining() {
        return Err(AppError::unavailable(
            "this instance is draining; reconnect",
            1,
        ));
    }
    let slot = OpenStream::try_new(state.clone())?;
    let per_address = AddressSlot::try_new(state.clone(), ip)?;
    if method == Method::HEAD {
        // The browser client's probe after `EventSource` gave up: the
        // status (and `Retry-After`) a stream would get now, without
        // opening one, reading history or counting a resume.
        drop((slot, per_address));
        return Ok((
            [
                (CONTENT_TYPE, "text/event-stream"),
                (CACHE_CONTROL, "no-cache"),
            ],
            (),
        )
            .into_response());
    }
    let (mut response, outcome) = state
        .scale
        .respond_within(&session, resume_from, per_address.budget())
        .await?;
    if heartbeat_events {
        response = response.heartbeat_events();
    }
    match outcome {
        ResumeOutcome::Resumed { .. } => {
            state.counters.resumes.fetch_add(1, Ordering::Relaxed);
        }
        ResumeOutcome::Reset {
            last_event_id,
            oldest,
            over_budget,
            ..
        } => {
            state.counters.resets.fetch_add(1, Ordering::Relaxed);
            if over_budget {
                state
                    .counters
                    .replays_over_budget
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(session = %session, %last_event_id, %ip, "replay over REPLAY_BUDGET_MB or REPLAY_BUDGET_PER_ADDRESS_MB: reset");
            } else {
                tracing::info!(session = %session, %last_event_id, ?oldest, "resume beyond history: reset");
            }
        }
        _ => {}
    }
    let ended = state.clone();
    state.counters.stream_opens.fetch_add(1, Ordering::Relaxed);
    let response = response.hold((slot, per_address)).on_end(move |why| {
        ended.counters.stream_ends.count(why);
        if why == StreamEnd::Lagged {
            ended
                .counters
                .slow_consumers_cut
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(session = %session, "stream cut: client fell behind its queue");
        }
    });
    let jar = state
        .settings
        .affinity
        .pin(CookieJar::from_headers(&headers), behind_tls);
    Ok((jar, response).into_response())
}

/// Holds one of the instance's `MAX_STREAMS` slots while a stream lives.
struct OpenStream(Arc<AppState>);

impl OpenStream {
    fn try_new(state: Arc<AppState>) -> Result<Self, AppError> {
        let before = state.counters.open_streams.fetch_add(1, Ordering::Relaxed);
        let slot = Self(state);
        if before >= slot.0.settings.max_streams {
            slot.0
                .counters
                .streams_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(AppError::unavailable(
                "this instance holds its maximum number of streams (MAX_STREAMS)",
                2,
            ));
        }
        Ok(slot)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.counters.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds one of a client address's `MAX_STREAMS_PER_ADDRESS` slots, and
/// the address's replay budget while it has streams open.
struct AddressSlot(Arc<AppState>, std::net::IpAddr, ReplayBudget);

impl AddressSlot {
    fn try_new(state: Arc<AppState>, ip: std::net::IpAddr) -> Result<Self, AppError> {
        let budget = {
            let mut open = state
                .streams_by_address
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let (n, budget) = open.entry(ip).or_insert_with(|| {
                let share = state.settings.replay_budget_per_address;
                (0, state.scale.replay_budget().within(share))
            });
            if *n >= state.settings.max_streams_per_address {
                return Err(AppError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    "this address holds its maximum number of streams (MAX_STREAMS_PER_ADDRESS)",
                ));
            }
            *n += 1;
            budget.clone()
        };
        Ok(Self(state, ip, budget))
    }

    fn budget(&self) -> ReplayBudget {
        self.2.clone()
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .0
            .streams_by_address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((n, _)) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// How deep `data` may nest: what every other JSON body here may
/// (serde_json's own limit), so a client's `JSON.parse` never meets more.
const MAX_DATA_DEPTH: usize = 128;

/// Whether the JSON text `raw` (already valid) nests arrays and objects
/// deeper than `limit`. `data` is passed on as sent, never parsed into a
/// value, so its depth is counted here: brackets outside strings.
fn nested_deeper_than(raw: &str, limit: usize) -> bool {
    // Each level takes a byte: a shorter text cannot be that deep.
    if raw.len() <= limit {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in raw.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::nested_deeper_than;

    #[test]
    fn depth_counts_brackets_outside_strings() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(!nested_deeper_than(&deep(128), 128));
        assert!(nested_deeper_than(&deep(129), 128));
        let objects = format!("{}1{}", r#"{"a":"#.repeat(129), "}".repeat(129));
        assert!(nested_deeper_than(&objects, 128));
        // Brackets inside strings, escaped quotes included, do not count.
        let quoted = format!(r#"["\"{}"]"#, "[".repeat(500));
        assert!(!nested_deeper_than(&quoted, 128));
        // Wide is not deep.
        let wide = format!("[{}1]", "[1],".repeat(1000));
        assert!(!nested_deeper_than(&wide, 128));
    }
}

/// The `202 {"id": "<event id>"}` every publishing route answers with.
pub fn accepted(id: EventId) -> Response {
    // `{"id":"<ms>-<seq>"}`: an id is digits and a dash, nothing to escape,
    // so the body is written directly instead of through a JSON value.
    let mut body = BytesMut::with_capacity(56);
    body.put_slice(b"{\"id\":\"");
    id.write_to(&mut body);
    body.put_slice(b"\"}");
    (
        StatusCode::ACCEPTED,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.freeze(),
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct MessageBody {
    text: String,
}

/// `POST /sessions/{id}/messages` `{"text"}` → 202, event `chat_message`.
pub async fn message(
    State(state): State<Arc<AppState>>,
    PublishingSession(session): PublishingSession,
    JsonBody(body): JsonBody<MessageBody>,
) -> Result<Response, AppError> {
    state.accept_publish(&session)?;
    let event = OutgoingEvent::json(
        EventType::from_static("chat_message"),
        &json!({ "text": body.text }),
    );
    state.publish(&session, event).await.map(accepted)
}

#[derive(Deserialize)]
pub struct PublishBody {
    #[serde(rename = "type")]
    event_type: String,
    data: Option<Box<RawValue>>,
}

/// `POST /sessions/{id}/events` `{"type", "data"}` → 202: the generic publish
/// used by background workers. `data` is sent exactly as given.
pub async fn publish(
    State(state): State<Arc<AppState>>,
    PublishingSession(session): PublishingSession,
    JsonBody(body): JsonBody<PublishBody>,
) -> Result<Response, AppError> {
    state.accept_publish(&session)?;
    let event_type = EventType::parse(&body.event_type)?;
    // The stream's own types, EventSource's `open` and `error`, the client's
    // `*` (`RESERVED_EVENT_TYPES`): a client would misread any of them.
    if event_type.is_reserved() {
        return Err(InvalidInput::ReservedEventType.into());
    }
    let data = body.data.map_or_else(
        || "null".to_owned(),
        |raw| String::from(Box::<str>::from(raw)),
    );
    if nested_deeper_than(&data, MAX_DATA_DEPTH) {
        return Err(AppError::bad_request(
            "invalid_json",
            format!("data is nested deeper than {MAX_DATA_DEPTH} levels"),
        ));
    }
    state
        .publish(&session, OutgoingEvent::new(event_type, data))
        .await
        .map(accepted)
}
