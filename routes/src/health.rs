//! `/healthz` (the process is alive) and `/readyz` (it takes new streams):
//! open to anyone, for balancers and orchestrators. The operator endpoints
//! are in [`crate::admin`].
//!
//! `/readyz` stays ready while Redis is away: local delivery still works
//! and the outbox keeps what must cross instances, whereas taking every
//! instance out of the balancer at once would turn a Redis outage into a
//! full one. `/healthz?verbose` says `degraded` and why instead.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::state::AppState;

/// 200 while the process runs. With `?verbose`: whether it is degraded
/// (Redis unreachable, subscriber connection down, events waiting in the
/// outbox, draining) and why; still 200, since the process is alive.
pub async fn healthz(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Json<serde_json::Value> {
    if !query.contains_key("verbose") {
        return Json(json!({ "status": "ok" }));
    }
    let stats = state.broadcaster.stats();
    let mut reasons = Vec::new();
    if state.scale.redis().is_some_and(|r| !r.is_healthy()) {
        reasons.push(
            "redis_unreachable: publishes are delivered on this instance and wait in the outbox"
                .to_owned(),
        );
    }
    if let Some(redis) = &stats.redis {
        if redis["subscriber_connected"] != json!(true) {
            reasons.push("subscriber_disconnected: events from other instances do not arrive until it reconnects".to_owned());
        }
        let waiting = redis["outbox_len"].as_u64().unwrap_or(0);
        if waiting > 0 {
            reasons.push(format!("outbox_pending: {waiting} events wait for Redis"));
        }
    }
    if state.is_draining() {
        reasons.push("draining: the instance is shutting down".to_owned());
    }
    Json(json!({
        "status": if reasons.is_empty() { "ok" } else { "degraded" },
        "instance_id": state.settings.instance_id,
        "mode": stats.mode,
        "ready": !state.is_draining(),
        "reasons": reasons,
    }))
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
