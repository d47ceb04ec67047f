//! Request extractors: the session-token check every `/sessions/{id}/...`
//! route goes through, the client's address, and a JSON body reader whose
//! errors are JSON too. (`Last-Event-ID` comes from the library:
//! `sse_scale::axum::LastEventId`.)

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::header::{AUTHORIZATION, HOST, ORIGIN};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use sse_scale::token::{Scope, TokenError};
use sse_scale::SessionId;

use crate::error::AppError;
use crate::state::AppState;
use sse_scale::axum::PeerAddr;

/// A session whose full token the request proved it holds: it may publish,
/// run pipelines and ask for new tokens.
///
/// The token comes from `Authorization: Bearer <token>` or `?token=<token>`.
#[derive(Debug, Clone)]
pub struct AuthedSession(pub SessionId);

/// An [`AuthedSession`] within its publish rate limit
/// (`RATE_LIMIT_PUBLISH_PER_SEC`), checked before the request's body is
/// read: a client over its limit gets its 429 without sending the body,
/// and holds nothing while it would.
#[derive(Debug, Clone)]
pub struct PublishingSession(pub SessionId);

impl FromRequestParts<Arc<AppState>> for PublishingSession {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let session = authorize(parts, state, Needs::Full).await?;
        state.limit_publish(&session).await?;
        Ok(Self(session))
    }
}

/// A session whose full token, signed with the current secret, the request
/// proved it holds: what a refresh needs (a token of a secret being rotated
/// out is not turned into one of the new secret).
#[derive(Debug, Clone)]
pub struct CurrentSession(pub SessionId);

impl FromRequestParts<Arc<AppState>> for CurrentSession {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        authorize(parts, state, Needs::Current).await.map(Self)
    }
}

/// What a request's token must be.
#[derive(Clone, Copy)]
enum Needs {
    Stream,
    Full,
    /// Full, signed with the current secret.
    Current,
}

/// A session whose stream the request may open: a full token, or the
/// stream-only token meant for `EventSource`'s query string (which cannot
/// set headers).
#[derive(Debug, Clone)]
pub struct StreamSession(pub SessionId);

impl FromRequestParts<Arc<AppState>> for StreamSession {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        authorize(parts, state, Needs::Stream).await.map(Self)
    }
}

impl FromRequestParts<Arc<AppState>> for AuthedSession {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        authorize(parts, state, Needs::Full).await.map(Self)
    }
}

/// The session in the path, if the request's token grants `needed` on it.
async fn authorize(
    parts: &mut Parts,
    state: &Arc<AppState>,
    needs: Needs,
) -> Result<SessionId, AppError> {
    {
        // The raw parameters, not a map of owned strings: nothing to
        // allocate for an id that is parsed (and copied) once anyway.
        let params = RawPathParams::from_request_parts(parts, state).await?;
        let raw = params
            .iter()
            .find_map(|(name, value)| (name == "id").then_some(value))
            .ok_or_else(|| AppError::not_found("no session in path"))?;
        let session = SessionId::parse(raw)?;

        let token = match bearer(parts).map(str::to_owned) {
            Some(t) => Some(t),
            None => sse_scale::axum::query_value(&parts.uri, "token").map(Cow::into_owned),
        };
        let Some(token) = token else {
            return Err(AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing session token: send `Authorization: Bearer <token>` or `?token=<token>`",
            ));
        };
        let (checked, needed) = match needs {
            Needs::Stream => (state.signer.check(&session, &token), Scope::Stream),
            Needs::Full => (state.signer.check(&session, &token), Scope::Full),
            Needs::Current => (state.signer.check_current(&session, &token), Scope::Full),
        };
        match checked {
            Ok(scope) if scope.allows(needed) => Ok(session),
            Ok(_) => Err(AppError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a stream token only opens the stream; publishing needs the session's full token",
            )),
            Err(TokenError::Expired) => Err(AppError::new(
                StatusCode::UNAUTHORIZED,
                "token_expired",
                "the session token has expired: refresh it before it expires (POST /sessions/{id}/tokens) or create a new session",
            )),
            Err(_) => Err(AppError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the token does not grant access to this session",
            )),
        }
    }
}

/// Whether the request reached the balancer over TLS: `X-Forwarded-Proto:
/// https`, believed only from a peer in `TRUSTED_PROXIES` (anyone else can
/// write the header).
#[derive(Debug, Clone, Copy)]
pub struct BehindTls(pub bool);

impl FromRequestParts<Arc<AppState>> for BehindTls {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let https = parts
            .headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
        let trusted = || {
            parts
                .extensions
                .get::<ConnectInfo<PeerAddr>>()
                .is_some_and(|c| {
                    crate::address::is_trusted(c.0 .0.ip(), &state.settings.trusted_proxies)
                })
        };
        Ok(Self(https && trusted()))
    }
}

/// A request that no page of another origin made, unless that origin is in
/// `CORS_ALLOWED_ORIGINS`: a browser names the page's origin in `Origin`
/// on every cross-origin `POST`, and a page elsewhere must not spend its
/// visitors' (or their network's) session budget. Requests without
/// `Origin` (servers, workers, `curl`) and from the server's own origin
/// pass.
#[derive(Debug, Clone, Copy)]
pub struct AllowedOrigin;

impl FromRequestParts<Arc<AppState>> for AllowedOrigin {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(origin) = parts.headers.get(ORIGIN) else {
            return Ok(Self);
        };
        let origin = origin.to_str().unwrap_or_default();
        // The host names only: a balancer may pass `Host` without the
        // port (nginx's `$host`), and another port of the same host is the
        // same site anyway.
        let own = parts
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|host| {
                origin.split_once("://").is_some_and(|(_, authority)| {
                    host_name(authority).eq_ignore_ascii_case(host_name(host))
                })
            });
        if own
            || state
                .settings
                .cors_allowed_origins
                .iter()
                .any(|o| o == origin)
        {
            return Ok(Self);
        }
        Err(AppError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin may not create sessions: add it to CORS_ALLOWED_ORIGINS",
        ))
    }
}

/// `authority` without its port (`[::1]:80` → `[::1]`).
fn host_name(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port))
            if port.bytes().all(|b| b.is_ascii_digit())
                && (!host.starts_with('[') || host.ends_with(']')) =>
        {
            host
        }
        _ => authority,
    }
}

/// `?heartbeat=event` on a stream: its heartbeats as `heartbeat` events,
/// which an `EventSource` can see (it sees no comment), for a page that
/// checks its stream is alive.
#[derive(Debug, Clone, Copy)]
pub struct HeartbeatEvents(pub bool);

impl<S: Send + Sync> FromRequestParts<S> for HeartbeatEvents {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let asked = sse_scale::axum::query_value(&parts.uri, "heartbeat");
        Ok(Self(asked.as_deref() == Some("event")))
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
        let Some(expected) = &state.settings.admin_token else {
            return Err(AppError::new(
                StatusCode::FORBIDDEN,
                "admin_disabled",
                "operator endpoints are closed: set ADMIN_TOKEN and send it as `Authorization: Bearer <token>`",
            ));
        };
        match bearer(parts) {
            None => Err(AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing admin token: send `Authorization: Bearer <ADMIN_TOKEN>`",
            )),
            Some(t) if same_secret(t, expected) => Ok(Admin),
            Some(_) => Err(AppError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "wrong admin token",
            )),
        }
    }
}

/// The `Authorization: Bearer <token>` value, if any. The scheme is
/// case-insensitive (RFC 9110, 11.1).
fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether `given` is `expected`, in a time that says nothing about either:
/// both are hashed first, so not even the length shows.
fn same_secret(given: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    constant_time_eq(&Sha256::digest(given), &Sha256::digest(expected))
}

/// Compares without an early exit, so the time taken says nothing about
/// how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The client's address, as limits count it: the peer address, or — when
/// the peer is one of `TRUSTED_PROXIES` — the rightmost `X-Forwarded-For`
/// address that is not a trusted proxy (the shipped balancer configs append
/// the address they accepted the connection from, so whatever a client
/// writes into the header itself sits to the left and is never reached).
/// IPv6 addresses are grouped by /64, the block one subscriber holds.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<Arc<AppState>> for ClientIp {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<PeerAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0 .0.ip());
        let forwarded = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok());
        Ok(Self(crate::address::client_address(
            peer,
            forwarded,
            &state.settings.trusted_proxies,
        )))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole_and_hosts_without_ports() {
        assert!(same_secret("an-admin-token-0123", "an-admin-token-0123"));
        assert!(!same_secret("an-admin-token-0123", "an-admin-token-012"));
        assert!(!same_secret("", "an-admin-token-0123"));
        assert_eq!(host_name("app.example:8080"), "app.example");
        assert_eq!(host_name("app.example"), "app.example");
        assert_eq!(host_name("[::1]:3000"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
    }
}
