//! Request extractors: the session-token check every `/sessions/{id}/...`
//! route goes through, the client's address, and a JSON body reader whose
//! errors are JSON too. (`Last-Event-ID` comes from the library:
//! `sse_scale::axum::LastEventId`.)

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sse_scale::SessionId;

use crate::error::AppError;
use crate::state::AppState;
use sse_scale::stall::PeerAddr;

/// A session whose token the request proved it holds.
///
/// The token comes from `Authorization: Bearer <token>` or, for browsers'
/// `EventSource` (which cannot set headers), `?token=<token>`.
#[derive(Debug, Clone)]
pub struct AuthedSession(pub SessionId);

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

impl FromRequestParts<Arc<AppState>> for AuthedSession {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Path(params) =
            Path::<HashMap<String, String>>::from_request_parts(parts, state).await?;
        let raw = params
            .get("id")
            .ok_or_else(|| AppError::not_found("no session in path"))?;
        let session = SessionId::parse(raw)?;

        let bearer = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned());
        let token = match bearer {
            Some(t) => Some(t),
            None => Query::<TokenQuery>::try_from_uri(&parts.uri)
                .ok()
                .and_then(|q| q.0.token),
        };
        let Some(token) = token else {
            return Err(AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing session token: send `Authorization: Bearer <token>` or `?token=<token>`",
            ));
        };
        if !state.signer.verify(&session, &token) {
            return Err(AppError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the token does not grant access to this session",
            ));
        }
        Ok(Self(session))
    }
}

/// A request that carries `ADMIN_TOKEN` as its bearer token: the operator
/// endpoints (`/stats`, `/flags`, `POST /announcements`). Without the
/// setting they are closed (403 naming it); without the header, 401.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = &state.admin_token else {
            return Err(AppError::new(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "operator endpoints are closed: set ADMIN_TOKEN and send it as `Authorization: Bearer <token>`",
            ));
        };
        let given = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            None => Err(AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing admin token: send `Authorization: Bearer <ADMIN_TOKEN>`",
            )),
            Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(Admin),
            Some(_) => Err(AppError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "wrong admin token",
            )),
        }
    }
}

/// Compares without an early exit, so the time taken says nothing about
/// how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The client's IP: the peer address, or the first `X-Forwarded-For`
/// address when `TRUST_FORWARDED_FOR` is on.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<Arc<AppState>> for ClientIp {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if state.trust_forwarded_for {
            let forwarded = parts
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.trim().parse().ok());
            if let Some(ip) = forwarded {
                return Ok(Self(ip));
            }
        }
        let peer = parts
            .extensions
            .get::<ConnectInfo<PeerAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0 .0.ip());
        Ok(Self(peer))
    }
}

/// A JSON request body. Unlike `axum::Json` it does not insist on a
/// `Content-Type` (so `curl -d` works) and every rejection is a JSON error.
/// The size limit is the router's `DefaultBodyLimit` (413 beyond it).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Like [`JsonBody`], but an empty body means `T::default()`.
#[derive(Debug)]
pub struct JsonOrDefault<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for JsonOrDefault<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonOrDefault(T::default()));
        }
        parse_json(&bytes).map(JsonOrDefault)
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    serde_json::from_slice(bytes)
        .map_err(|e| AppError::bad_request("invalid_json", format!("invalid JSON body: {e}")))
}
