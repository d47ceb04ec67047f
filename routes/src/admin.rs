//! The operator endpoints, behind `ADMIN_TOKEN` ([`Admin`]): `/stats`
//! (what this instance holds), `/flags` (which sessions are on the Redis
//! path) and `POST /announcements` (an event to every session).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use sse_scale::event::InvalidInput;
use sse_scale::{EventType, OutgoingEvent, SessionId};

use crate::error::AppError;
use crate::extract::{Admin, JsonBody};
use crate::state::AppState;

pub async fn stats(_: Admin, State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let b = state.broadcaster.stats();
    Json(json!({
        "instance_id": state.settings.instance_id,
        "mode": b.mode,
        "open_streams": state.counters.open_streams.load(Ordering::Relaxed),
        "tasks": state.runtime_tasks(),
        "max_streams": state.settings.max_streams,
        "streams_refused": state.counters.streams_refused.load(Ordering::Relaxed),
        "sessions_with_subscribers": b.sessions,
        "subscribers": b.subscribers,
        "published": b.published,
        "slow_consumers_cut": state.counters.slow_consumers_cut.load(Ordering::Relaxed),
        "stalled_writes_cut": state.counters.stalled_writes_cut.load(Ordering::Relaxed),
        "heads_refused": state.counters.heads_refused.load(Ordering::Relaxed),
        "connections_refused": {
            "per_address": state.admission.refused_per_address.load(Ordering::Relaxed),
            "instance_full": state.admission.refused_full.load(Ordering::Relaxed),
        },
        "stream_opens": state.counters.stream_opens.load(Ordering::Relaxed),
        "stream_opens_first_request": state.counters.stream_opens_first_request.load(Ordering::Relaxed),
        "resumes": state.counters.resumes.load(Ordering::Relaxed),
        "resets": state.counters.resets.load(Ordering::Relaxed),
        "replays_over_budget": state.counters.replays_over_budget.load(Ordering::Relaxed),
        "replay_bytes_held": state.scale.replay_budget().held(),
        "order_resets": b.order_resets,
        "covered_by_reset": b.covered_by_reset,
        "history": { "sessions": b.history_sessions, "bytes": b.history_bytes },
        "pipeline_runs": state.runs.len(),
        "draining": state.is_draining(),
        "flag": { "name": sse_scale::flags::REDIS_SSE_BROADCAST, "state": state.flags.state() },
        "redis": b.redis,
        "rate_limit_fallback_checks": state.limiter.fallback_checks.load(Ordering::Relaxed),
    }))
}

/// Most session ids `/flags?sessions=` evaluates in one request.
const MAX_CHECKED_SESSIONS: usize = 1000;

#[derive(Deserialize)]
pub struct FlagsQuery {
    /// Comma-separated session ids to evaluate, subscribed here or not.
    sessions: Option<String>,
}

/// `FF_REDIS_SSE_BROADCAST` per session on this instance: every session with
/// a subscriber here, and any listed in `?sessions=a,b`, with whether its
/// publishes from this instance go through Redis (`redis: true`) or stay
/// local. Without the Redis broadcaster nothing goes through Redis.
pub async fn flags(
    _: Admin,
    State(state): State<Arc<AppState>>,
    Query(query): Query<FlagsQuery>,
) -> Result<Json<serde_json::Value>, AppError> {
    let checked = match &query.sessions {
        Some(list) => list
            .split(',')
            .filter(|s| !s.is_empty())
            .map(SessionId::parse)
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    if checked.len() > MAX_CHECKED_SESSIONS {
        return Err(AppError::bad_request(
            "too_many_sessions",
            format!("at most {MAX_CHECKED_SESSIONS} sessions per request"),
        ));
    }
    let subscribed = state.broadcaster.sessions();
    let answer = |s: &SessionId| json!({ "session": s.as_str(), "redis": state.broadcaster.crosses_instances(s) });
    let mut listed: Vec<_> = subscribed.iter().map(answer).collect();
    listed.sort_by(|a, b| a["session"].as_str().cmp(&b["session"].as_str()));
    let on_redis = listed.iter().filter(|s| s["redis"] == true).count();
    Ok(Json(json!({
        "instance_id": state.settings.instance_id,
        "mode": state.broadcaster.stats().mode,
        "flag": sse_scale::flags::REDIS_SSE_BROADCAST,
        "state": state.flags.state(),
        "sessions": listed,
        "on_redis": on_redis,
        "local_only": listed.len() - on_redis,
        "checked": checked.iter().map(answer).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
pub struct AnnouncementBody {
    #[serde(rename = "type")]
    event_type: String,
    data: Option<Box<RawValue>>,
}

/// `POST /announcements` `{"type", "data"}` → 202: one event to every
/// session, on this instance and (flag on) on every other. Announcements
/// are live only: they carry no `id:` and are kept in no history, so a
/// client that was away when one was sent does not get it on resume. The
/// reserved types are refused here as on `POST /sessions/{id}/events`: an
/// announced `reset` would make every page reload its state, an `error`
/// would pass for a broken connection in every `EventSource`.
pub async fn announce(
    _: Admin,
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody<AnnouncementBody>,
) -> Result<Response, AppError> {
    let event_type = EventType::parse(&body.event_type)?;
    if event_type.is_reserved() {
        return Err(InvalidInput::ReservedEventType.into());
    }
    let data = body.data.map_or_else(
        || "null".to_owned(),
        |raw| String::from(Box::<str>::from(raw)),
    );
    if sse_scale::event::data_len(&data) > state.settings.max_event_bytes {
        return Err(AppError::too_large(state.settings.max_event_bytes));
    }
    state
        .broadcaster
        .publish_all(OutgoingEvent::new(event_type, data))
        .await?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(json!({ "announced": true })),
    )
        .into_response())
}
