//! `/healthz` (the process is alive) and `/readyz` (it takes new streams):
//! open to anyone, for balancers and orchestrators. The operator endpoints
//! are in [`crate::admin`].

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
