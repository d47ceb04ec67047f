//! The sse-scale reference server: session, pipeline and workflow routes
//! modelled on an AI résumé-writing agent whose pipeline streams progress to
//! the browser.
//!
//! - [`sessions`] — create a session, open its event stream, publish chat
//!   messages and generic events.
//! - [`pipeline`] — background pipeline runs with an optional approval gate.
//! - [`runs`] — the runs executing here, and the gate relay over the
//!   control bus.
//! - [`workflow`] — replanning and preference updates.
//! - [`health`] — `/healthz`, `/readyz` (open).
//! - [`admin`] — `/stats`, `/flags`, `POST /announcements` (behind
//!   `ADMIN_TOKEN`).
//! - [`extract`] — the session-token check and JSON body extractors.
//! - [`error`] — [`error::AppError`], JSON errors at the HTTP edge.
//! - [`affinity`] — the cookie naming the instance that served the client.
//! - [`state`] — [`state::AppState`], shared by every handler.
//! - [`config`] — the server's environment variables.
//!
//! [`app`] builds the router, so tests and embedding applications reuse it.

mod address;
pub mod admin;
pub mod admission;
pub mod affinity;
pub mod config;
pub(crate) mod deadline;
pub mod doctor;
pub mod error;
pub mod extract;
mod head;
pub mod health;
pub mod metrics;
pub mod page;
pub mod pipeline;
pub mod runs;
mod self_wake;
pub mod serve;
pub mod sessions;
mod socket;
pub mod state;
pub mod workflow;
mod write_through;
mod writer;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::routing::{delete, get, post, put};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::error::AppError;
use crate::state::AppState;

/// Room for the JSON envelope around an event payload of `MAX_EVENT_BYTES`.
const BODY_OVERHEAD: usize = 4096;

pub const INSTANCE_HEADER: HeaderName = HeaderName::from_static("x-instance-id");

/// Builds the router. Fails only if the instance id cannot be a header value.
pub fn app(state: Arc<AppState>) -> Result<Router, axum::http::header::InvalidHeaderValue> {
    let instance = HeaderValue::from_str(&state.settings.instance_id)?;
    let body_limit = state.settings.max_event_bytes + BODY_OVERHEAD;
    // Full paths, not a router nested under `/sessions`: a nested router is
    // a route of its own, and each request through it paid for stripping
    // the prefix and cloning the nested services (callgrind, see
    // docs/benchmarks.md).
    let routes = Router::new()
        .route("/sessions", post(sessions::create))
        .route(
            "/sessions/{id}/events",
            get(sessions::stream).post(sessions::publish),
        )
        .route("/sessions/{id}/messages", post(sessions::message))
        .route("/sessions/{id}/tokens", post(sessions::refresh))
        .route("/sessions/{id}/pipeline", post(pipeline::start))
        .route("/sessions/{id}/pipeline/{run_id}", delete(pipeline::cancel))
        .route(
            "/sessions/{id}/pipeline/{run_id}/gate",
            post(pipeline::gate),
        )
        .route("/sessions/{id}/workflow/replan", post(workflow::replan))
        .route(
            "/sessions/{id}/workflow/preferences",
            put(workflow::preferences),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/stats", get(admin::stats))
        .route("/metrics", get(metrics::metrics))
        .route("/flags", get(admin::flags))
        .route("/announcements", post(admin::announce))
        .merge(page::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    // The layers every answer gets wrap the router once. Added with
    // `Router::layer` they would wrap each route, and a request would clone
    // every layer's boxed service on its way in (15 boxed clones per
    // publish, callgrind).
    let cors = cors(&state.settings.cors_allowed_origins);
    // Spans name the path, never the query: `?token=` must not reach the
    // logs. 5xx answers are logged at debug, not as errors: a draining
    // instance answers its balancer's health checks with 503 on purpose,
    // and the handlers log what needs an operator's eye. Everything the
    // layer writes is at debug, so without debug logging (the filter is
    // set once, at start) the layer is left out: it cost every publish
    // ~1,300 instructions of timing, classifying and body wrapping for
    // nothing (callgrind, docs/benchmarks.md).
    let trace = request_logs_enabled().then(|| {
        TraceLayer::new_for_http()
            .make_span_with(|req: &axum::http::Request<axum::body::Body>| {
                tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
            })
            .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG))
    });
    let stack = tower::ServiceBuilder::new()
        .layer(SetResponseHeaderLayer::overriding(
            INSTANCE_HEADER,
            instance,
        ))
        .option_layer(cors)
        .layer(DefaultBodyLimit::max(body_limit))
        .service(routes);
    let app = Router::new().fallback_service(stack);
    // Outermost, and around the one fallback: still a single wrap.
    Ok(match trace {
        Some(trace) => app.layer(trace),
        None => app,
    })
}

/// What a connection refused by [`admission`] gets: health checks answered
/// as usual (a full instance still tells its balancer it is alive), every
/// other request the refusal, and the connection closed after it.
pub fn refusal_app(state: Arc<AppState>, why: admission::Refusal) -> Router {
    let refusal = move || async move {
        let mut res = axum::response::IntoResponse::into_response(match why {
            admission::Refusal::PerAddress => AppError {
                retry_after: Some(1),
                ..AppError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections",
                    "this address holds MAX_CONNECTIONS_PER_ADDRESS connections already",
                )
            },
            admission::Refusal::Full => AppError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "over_capacity",
                "this instance holds MAX_CONNECTIONS connections already",
            ),
        });
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        res
    };
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(refusal)
        .with_state(state)
}

/// Whether the request spans or tower-http's request and response events
/// would be logged (all at debug).
fn request_logs_enabled() -> bool {
    tracing::enabled!(tracing::Level::DEBUG)
        || tracing::enabled!(target: "tower_http::trace::on_request", tracing::Level::DEBUG)
        || tracing::enabled!(target: "tower_http::trace::on_response", tracing::Level::DEBUG)
        || tracing::enabled!(target: "tower_http::trace::on_failure", tracing::Level::DEBUG)
}

/// Browsers on the listed origins may call the API (and read its
/// `X-Instance-Id`); with none listed, no CORS headers at all.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
                // The fetch()-based client sends it for header-hash balancers.
                HeaderName::from_static("x-session-id"),
            ])
            .expose_headers([INSTANCE_HEADER])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

async fn not_found() -> AppError {
    AppError::not_found("no such route")
}

async fn method_not_allowed() -> AppError {
    AppError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

#[cfg(test)]
mod tests {
    use super::request_logs_enabled;
    use tracing_subscriber::EnvFilter;

    fn with_filter(filter: &str) -> bool {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(filter))
            .finish();
        tracing::subscriber::with_default(subscriber, request_logs_enabled)
    }

    /// The request-logging layer is built only when what it writes would
    /// be logged: by this crate's debug level or tower-http's own.
    #[test]
    fn request_logs_follow_the_filter() {
        assert!(!with_filter("info"));
        assert!(with_filter("debug"));
        assert!(with_filter("info,sse_scale_server=debug"));
        assert!(with_filter("info,tower_http=debug"));
        assert!(!with_filter("info,redis=debug"));
    }
}
