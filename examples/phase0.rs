//! Phase 0: a single-instance axum SSE app as teams have it before sse-scale.
//! An in-process map of channels per session; no ids, no resume, nothing
//! crosses instances. `examples/phase1.rs` and `examples/phase2.rs` are the
//! same app after adopting sse-scale (diff them against this file).
//!
//! ```sh
//! cargo run --example phase0            # PORT=3000 by default
//! curl -N localhost:3000/sessions/demo/events
//! curl -d '{"type":"stage_start","data":{"stage":"draft"}}' localhost:3000/sessions/demo/events
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

type Sessions = Arc<Mutex<HashMap<String, broadcast::Sender<Event>>>>;

#[derive(Deserialize)]
struct Publish {
    #[serde(rename = "type")]
    event_type: String,
    data: serde_json::Value,
}

async fn events(
    State(sessions): State<Sessions>,
    Path(id): Path<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = sessions
        .lock()
        .unwrap()
        .entry(id)
        .or_insert_with(|| broadcast::channel(256).0)
        .subscribe();
    let stream = BroadcastStream::new(rx).filter_map(|e| async move { e.ok().map(Ok) });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn publish(
    State(sessions): State<Sessions>,
    Path(id): Path<String>,
    Json(body): Json<Publish>,
) -> &'static str {
    let event = Event::default()
        .event(body.event_type)
        .data(body.data.to_string());
    if let Some(tx) = sessions.lock().unwrap().get(&id) {
        let _ = tx.send(event);
    }
    "ok"
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let sessions = Sessions::default();
    let app = Router::new()
        .route("/sessions/{id}/events", get(events).post(publish))
        .with_state(sessions);
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    axum::serve(listener, app).await
}
