//! What the first bytes of a request are, for the accept loop
//! ([`crate::serve`]): a request head parsed with `httparse`, and whether
//! it opens an event stream (then the request is built from it), is any
//! other request (then how many bytes it spans, head and `Content-Length`
//! body), or cannot be followed (chunked, an upgrade, too big, not HTTP/1),
//! which hyper then answers on its own.
//!
//! Plain functions, not async: the parser's header array lives on the
//! stack of one call, never in a connection's future.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request};

use sse_scale::stall::PeerAddr;

/// Longest request head the stream path parses; bigger heads go to hyper.
pub(crate) const MAX_HEAD: usize = 8192;

/// What a complete request head at the front of a connection's bytes is.
pub(crate) enum Boundary {
    /// Not complete yet.
    Partial,
    /// An event stream (no body).
    Stream(Box<Request<Body>>),
    /// Anything else: its head and `Content-Length` body, in bytes.
    Request(usize),
    /// Not trackable: chunked, an upgrade, too big, not HTTP/1.
    Opaque,
}

/// What the request head at the front of `bytes` is (`bytes` holds at most
/// [`MAX_HEAD`] of them while the head is incomplete).
pub(crate) fn boundary(bytes: &[u8], peer: SocketAddr) -> Boundary {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; 64];
    let mut parsed = httparse::Request::new(&mut []);
    let head = match parsed.parse_with_uninit_headers(bytes, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD => return Boundary::Partial,
        Ok(httparse::Status::Partial) | Err(_) => return Boundary::Opaque,
    };
    if let Some(req) = stream_request(&parsed, peer) {
        return Boundary::Stream(Box::new(req));
    }
    let mut body = 0usize;
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding")
            || h.name.eq_ignore_ascii_case("upgrade")
        {
            return Boundary::Opaque;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) => body = n,
                // hyper answers a bad length; nothing after it is tracked.
                None => return Boundary::Opaque,
            }
        }
    }
    Boundary::Request(head.saturating_add(body))
}

/// The request if the head opens an event stream.
fn stream_request(parsed: &httparse::Request<'_, '_>, peer: SocketAddr) -> Option<Request<Body>> {
    if parsed.method? != "GET" || parsed.version? != 1 {
        return None;
    }
    let target = parsed.path?;
    let path = target.split('?').next()?;
    let id = path.strip_prefix("/sessions/")?.strip_suffix("/events")?;
    if id.is_empty() || id.contains('/') {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        headers.append(name, value);
    }
    // An upgrade (WebSocket) or a request with a body is not a stream open.
    if headers.contains_key(header::UPGRADE)
        || headers.contains_key(header::CONTENT_LENGTH)
        || headers.contains_key(header::TRANSFER_ENCODING)
    {
        return None;
    }
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(target)
        .body(Body::empty())
        .ok()?;
    *req.headers_mut() = headers;
    req.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
    Some(req)
}
