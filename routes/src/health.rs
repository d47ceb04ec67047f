//! `/healthz` (the process is alive), `/readyz` (it takes new streams) and
//! `/stats` (what this instance holds).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::state::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 while the instance takes new streams; 503 once it drains, so the load
/// balancer sends new clients elsewhere.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "draining" })),
        )
            .into_response()
    } else {
        Json(json!({ "status": "ready" })).into_response()
    }
}

pub async fn stats(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let b = state.broadcaster.stats();
    Json(json!({
        "instance_id": state.instance_id,
        "mode": b.mode,
        "open_streams": state.open_streams.load(Ordering::Relaxed),
        "max_streams": state.max_streams,
        "streams_refused": state.streams_refused.load(Ordering::Relaxed),
        "sessions_with_subscribers": b.sessions,
        "subscribers": b.subscribers,
        "published": b.published,
        "slow_consumers_cut": state.slow_consumers_cut.load(Ordering::Relaxed),
        "stalled_writes_cut": state.stalled_writes_cut.load(Ordering::Relaxed),
        "resumes": state.resumes.load(Ordering::Relaxed),
        "resets": state.resets.load(Ordering::Relaxed),
        "history": { "sessions": b.history_sessions, "bytes": b.history_bytes },
        "pipeline_runs": state.pipelines.len(),
        "draining": state.is_draining(),
        "flag": { "name": sse_scale::flags::REDIS_SSE_BROADCAST, "state": state.flags.state() },
        "redis": b.redis,
        "rate_limit_fallback_checks": state.limiter.fallback_checks.load(Ordering::Relaxed),
    }))
}
