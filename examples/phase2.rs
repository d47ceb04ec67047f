//! Phase 2 (and 3): the app of `examples/phase0.rs` on sse-scale, configured
//! from the environment. Without `REDIS_URL` it is phase 1 (in process,
//! with ids and `Last-Event-ID` resume); with `REDIS_URL` and
//! `FF_REDIS_SSE_BROADCAST=true`, events cross instances through Redis and
//! a client resumes on any instance. SIGTERM drains streams, then stops.
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 FF_REDIS_SSE_BROADCAST=true PORT=3001 cargo run --example phase2
//! REDIS_URL=redis://127.0.0.1:6379 FF_REDIS_SSE_BROADCAST=true PORT=3002 cargo run --example phase2
//! curl -N localhost:3001/sessions/demo/events
//! curl -d '{"type":"stage_start","data":{"stage":"draft"}}' localhost:3002/sessions/demo/events
//! ```

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use sse_scale::axum::{drain_on_signal, Error, LastEventId, SseResponse};
use sse_scale::{EventType, OutgoingEvent, SessionId, SseScale};

type Sessions = Arc<SseScale>;

#[derive(Deserialize)]
struct Publish {
    #[serde(rename = "type")]
    event_type: String,
    data: serde_json::Value,
}

async fn events(
    State(sessions): State<Sessions>,
    Path(id): Path<String>,
    LastEventId(last): LastEventId,
) -> Result<SseResponse, Error> {
    Ok(sessions.respond(&SessionId::parse(&id)?, last).await?)
}

async fn publish(
    State(sessions): State<Sessions>,
    Path(id): Path<String>,
    Json(body): Json<Publish>,
) -> Result<String, Error> {
    let event = OutgoingEvent::json(EventType::parse(&body.event_type)?, &body.data);
    let id = sessions
        .broadcaster()
        .publish(&SessionId::parse(&id)?, event)
        .await?;
    Ok(id.to_string())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sessions: Sessions = Arc::new(SseScale::from_env()?);
    let app = Router::new()
        .route("/sessions/{id}/events", get(events).post(publish))
        .with_state(sessions.clone());
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(drain_on_signal(sessions.clone()))
        .await?;
    sessions.shutdown().await;
    Ok(())
}
