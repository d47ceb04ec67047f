//! [`AppError`]: the one error type at the HTTP edge. Every failure becomes a
//! status code and a JSON body `{"error": {"code", "message"}}`; internal
//! details are logged, not returned.

use axum::extract::rejection::{BytesRejection, PathRejection, RawPathParamsRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sse_scale::event::InvalidInput;
use sse_scale::BroadcastError;

#[derive(Debug)]
pub struct AppError {
    pub status: StatusCode,
    /// Stable, machine-readable reason (`unauthorized`, `payload_too_large`, ...).
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub retry_after: Option<u64>,
}

impl AppError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("event payload exceeds MAX_EVENT_BYTES ({limit} bytes)"),
        )
    }

    pub fn too_many_requests(retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "rate limit exceeded; retry later",
            )
        }
    }

    pub fn request_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within REQUEST_TIMEOUT_SECS ({} s)",
                limit.as_secs()
            ),
        )
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut res = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

impl From<InvalidInput> for AppError {
    fn from(e: InvalidInput) -> Self {
        let code = match e {
            InvalidInput::SessionId => "invalid_session_id",
            InvalidInput::EventType => "invalid_event_type",
            InvalidInput::ReservedEventType => "reserved_event_type",
            _ => "invalid_input",
        };
        Self::bad_request(code, e.to_string())
    }
}

impl From<BytesRejection> for AppError {
    fn from(e: BytesRejection) -> Self {
        if let Some(limit) = crate::deadline::body_timeout(&e) {
            return Self::request_timeout(limit);
        }
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_body"
        };
        Self::new(e.status(), code, e.body_text())
    }
}

impl From<PathRejection> for AppError {
    fn from(e: PathRejection) -> Self {
        Self::new(e.status(), "invalid_path", e.body_text())
    }
}

impl From<RawPathParamsRejection> for AppError {
    fn from(e: RawPathParamsRejection) -> Self {
        Self::new(e.status(), "invalid_path", e.body_text())
    }
}

impl From<BroadcastError> for AppError {
    fn from(e: BroadcastError) -> Self {
        match e {
            BroadcastError::Closed => Self::unavailable("the server is shutting down", 1),
            BroadcastError::Unavailable(why) => Self::unavailable(format!("{why}; retry"), 1),
            #[allow(unreachable_patterns)]
            other => {
                tracing::error!(error = %other, "broadcast failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}
