//! Workflow routes: the user asks the agent to replan, or changes their
//! preferences; both are announced on the session's stream.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sse_scale::{EventType, OutgoingEvent};

use crate::error::AppError;
use crate::extract::{JsonBody, PublishingSession};
use crate::sessions::accepted;
use crate::state::AppState;

#[derive(Deserialize)]
pub struct ReplanBody {
    reason: String,
}

/// `POST /sessions/{id}/workflow/replan` `{"reason"}` → 202, event `replan`.
pub async fn replan(
    State(state): State<Arc<AppState>>,
    PublishingSession(session): PublishingSession,
    JsonBody(body): JsonBody<ReplanBody>,
) -> Result<Response, AppError> {
    state.accept_publish(&session)?;
    let event = OutgoingEvent::json(
        EventType::from_static("replan"),
        &json!({ "reason": body.reason }),
    );
    state.publish(&session, event).await.map(accepted)
}

/// `PUT /sessions/{id}/workflow/preferences` `{...}` → 202, event
/// `preferences_updated` carrying the object.
pub async fn preferences(
    State(state): State<Arc<AppState>>,
    PublishingSession(session): PublishingSession,
    JsonBody(prefs): JsonBody<Map<String, Value>>,
) -> Result<Response, AppError> {
    state.accept_publish(&session)?;
    let event = OutgoingEvent::json(
        EventType::from_static("preferences_updated"),
        &json!({ "preferences": prefs }),
    );
    state.publish(&session, event).await.map(accepted)
}
