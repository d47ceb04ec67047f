//! The first request head of a new connection, for the accept loop
//! ([`crate::serve`]): either, strictly, an event stream open the stream
//! writer serves itself, or anything else, which hyper gets byte-exact and
//! frames from then on.
//!
//! **One framer per connection.** Nothing here works out where a request
//! ends: a head is served here only when it is the whole of what the
//! client sent so far and cannot carry a body — `GET`, `HTTP/1.1`, the
//! events path, no `Content-Length`, no `Transfer-Encoding`, no `Upgrade`,
//! no obs-fold, within [`MAX_HEAD`] and [`MAX_HEADERS`]. Every other byte
//! stream, valid or not, is hyper's from its first byte, whatever hyper
//! then makes of it. The module's tests check that against hyper itself:
//! what is served here, hyper parses as the same `GET` without a body.
//!
//! Plain functions, not async: the parser's header array lives on the
//! stack of one call, never in a connection's future.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request};

use sse_scale::axum::PeerAddr;

/// Longest first head served here; a longer one is hyper's.
pub(crate) const MAX_HEAD: usize = 8192;

/// Most header fields of a first head served here; more are hyper's.
pub(crate) const MAX_HEADERS: usize = 64;

/// What the first bytes of a connection are.
pub(crate) enum First {
    /// Not a whole head yet, and it may still become a stream open.
    Partial,
    /// A stream open, and nothing was sent after its head: the request
    /// built from it.
    Stream(Box<Request<Body>>),
    /// Anything else (another request, an h2c preface, garbage): hyper's.
    Hyper,
}

/// What the bytes read so far of a new connection (at most [`MAX_HEAD`])
/// are.
pub(crate) fn classify(bytes: &[u8], peer: SocketAddr) -> First {
    // Only a GET opens a stream: anything else (an h2c preface, a POST) is
    // decided at its first differing byte, however the bytes arrive.
    let start = &bytes[..bytes.len().min(4)];
    if !b"GET ".starts_with(start) {
        return First::Hyper;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(bytes) {
        // Bytes after the head (a pipelined request, a body) are hyper's
        // to frame, and so is the head before them.
        Ok(httparse::Status::Complete(n)) if n == bytes.len() => {
            match stream_request(&parsed, peer) {
                Some(req) => First::Stream(Box::new(req)),
                None => First::Hyper,
            }
        }
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD => First::Partial,
        _ => First::Hyper,
    }
}

/// The request, if the head opens an event stream and cannot carry a body.
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
    // A body (its length is hyper's to read) or an upgrade (hyper answers
    // it): not a stream open.
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

#[cfg(test)]
mod tests {
    //! Differential: every byte stream the classifier serves as a stream
    //! open, hyper parses as the same `GET` without a body, however the
    //! bytes arrive; everything else is left whole to hyper.

    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderMap, Uri};
    use hyper::body::Body as _;
    use hyper_util::rt::TokioIo;
    use proptest::prelude::*;
    use tokio::io::AsyncWriteExt;

    use super::*;

    const PEER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    /// What hyper made of the first request of `bytes`: method, target,
    /// headers, and whether its body is empty.
    fn hyper_first(bytes: &[u8]) -> Option<(Method, Uri, HeaderMap, bool)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let seen = Arc::new(Mutex::new(None));
            let record = seen.clone();
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let record = record.clone();
                async move {
                    let mut first = record.lock().unwrap();
                    if first.is_none() {
                        *first = Some((
                            req.method().clone(),
                            req.uri().clone(),
                            req.headers().clone(),
                            req.body().is_end_stream(),
                        ));
                    }
                    Ok::<_, Infallible>(hyper::Response::new(
                        http_body_util::Empty::<bytes::Bytes>::new(),
                    ))
                }
            });
            // Half-close: the end of the input is not a client gone before
            // its request was served.
            let conn = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(TokioIo::new(server), svc);
            client.write_all(bytes).await.unwrap();
            client.shutdown().await.unwrap();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
            let first = seen.lock().unwrap().take();
            first
        })
    }

    /// Feeds `bytes` in reads of the given sizes, as the accept loop does:
    /// the first answer that is not `Partial`, and the bytes read by then.
    fn classify_in_reads(bytes: &[u8], reads: &[usize]) -> (usize, First) {
        let mut end = 0;
        let mut sizes = reads.iter().copied().chain(std::iter::repeat(1));
        loop {
            end = (end + sizes.next().unwrap().max(1))
                .min(bytes.len())
                .min(MAX_HEAD);
            match classify(&bytes[..end], PEER) {
                First::Partial if end < bytes.len() && end < MAX_HEAD => {}
                decided => return (end, decided),
            }
        }
    }

    fn check(bytes: &[u8], reads: &[usize]) {
        let (read, first) = classify_in_reads(bytes, reads);
        if let First::Stream(req) = first {
            let seen = hyper_first(bytes);
            let Some((method, uri, headers, empty)) = seen else {
                panic!(
                    "served as a stream open, hyper took no request from {:?}",
                    String::from_utf8_lossy(bytes)
                );
            };
            let input = String::from_utf8_lossy(bytes);
            assert_eq!(method, Method::GET, "{input:?}");
            assert_eq!(&uri, req.uri(), "{input:?}");
            assert_eq!(&headers, req.headers(), "{input:?}");
            assert!(empty, "hyper expects a body: {input:?}");
            // Served here only when the head was all that was read.
            assert_eq!(read, bytes.len().min(read), "{input:?}");
        }
    }

    fn line_end() -> impl Strategy<Value = &'static str> {
        prop_oneof![4 => Just("\r\n"), 1 => Just("\n"), 1 => Just("\r")]
    }

    fn request_line() -> impl Strategy<Value = String> {
        let method = prop_oneof![
            6 => Just("GET"), 1 => Just("get"), 1 => Just("POST"), 1 => Just("HEAD"), 1 => Just("PRI"), 1 => Just("GET\t"),
        ];
        let target = prop_oneof![
            6 => Just("/sessions/abc/events"),
            3 => Just("/sessions/abc/events?token=t.k&last_event_id=1-2"),
            1 => Just("/sessions//events"),
            1 => Just("/sessions/a/b/events"),
            1 => Just("/healthz"),
            1 => Just("*"),
            1 => Just("http://x/sessions/abc/events"),
            1 => Just("/sessions/abc/events?x=%zz"),
            1 => Just("/sessions/a bc/events"),
        ];
        let version = prop_oneof![
            6 => Just("HTTP/1.1"), 1 => Just("HTTP/1.0"), 1 => Just("HTTP/2.0"), 1 => Just("HTTP/1.1 "), 1 => Just("http/1.1"),
        ];
        (method, target, version).prop_map(|(m, t, v)| format!("{m} {t} {v}"))
    }

    fn header() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => Just("Host: x".to_owned()),
            2 => Just("Accept: text/event-stream".to_owned()),
            1 => Just("Content-Length: 5".to_owned()),
            1 => Just("Content-Length: +5".to_owned()),
            1 => Just("Content-Length: 0".to_owned()),
            1 => Just("content-length:  3 ".to_owned()),
            1 => Just("Transfer-Encoding: chunked".to_owned()),
            1 => Just("Transfer-Encoding: gzip, chunked".to_owned()),
            1 => Just("Upgrade: websocket".to_owned()),
            1 => Just("Connection: Upgrade".to_owned()),
            1 => Just("Connection: keep-alive".to_owned()),
            1 => Just(" folded: continuation".to_owned()),
            1 => Just("X-A:\tb".to_owned()),
            1 => Just("Bad Name: x".to_owned()),
            1 => Just("X-Empty:".to_owned()),
            1 => Just("X-Bin: \u{7f}".to_owned()),
            1 => Just("Last-Event-ID: 17-3".to_owned()),
            1 => "[a-zA-Z-]{1,12}: [ -~]{0,20}",
        ]
    }

    fn request() -> impl Strategy<Value = Vec<u8>> {
        (
            request_line(),
            proptest::collection::vec(header(), 0..8),
            line_end(),
            prop_oneof![
                6 => Just(String::new()),
                1 => Just("hello".to_owned()),
                1 => Just("5\r\nhello\r\n0\r\n\r\n".to_owned()),
                1 => Just("GET /sessions/abc/events HTTP/1.1\r\nHost: x\r\n\r\n".to_owned()),
                1 => Just("POST /sessions/abc/events HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_owned()),
            ],
        )
            .prop_map(|(line, headers, end, rest)| {
                let mut s = line;
                s.push_str(end);
                for h in headers {
                    s.push_str(&h);
                    s.push_str(end);
                }
                s.push_str(end);
                s.push_str(&rest);
                s.into_bytes()
            })
    }

    proptest! {
        // 3,000 cases per property in the suite; `HEAD_FUZZ_CASES` for a
        // longer run by hand (docs/security.md records one).
        #![proptest_config(ProptestConfig {
            cases: std::env::var("HEAD_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(3000),
            ..ProptestConfig::default()
        })]

        #[test]
        fn a_stream_open_served_here_is_hyper_s_get_without_a_body(
            bytes in request(),
            reads in proptest::collection::vec(1usize..64, 0..6),
        ) {
            check(&bytes, &reads);
        }

        #[test]
        fn arbitrary_bytes_never_pass_for_a_stream_open_hyper_disagrees_with(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            reads in proptest::collection::vec(1usize..32, 0..4),
        ) {
            let mut prefixed = b"GET /sessions/abc/events HTTP/1.1\r\n".to_vec();
            prefixed.extend_from_slice(&bytes);
            check(&prefixed, &reads);
        }
    }

    #[test]
    fn an_h2c_preface_in_any_number_of_pieces_is_hyper_s() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        for n in 1..=preface.len() {
            assert!(
                matches!(classify(&preface[..n], PEER), First::Hyper),
                "{n} bytes"
            );
        }
    }

    #[test]
    fn only_a_whole_bodiless_stream_head_is_served_here() {
        let open = b"GET /sessions/abc/events?token=t HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(matches!(classify(open, PEER), First::Stream(_)));
        assert!(matches!(classify(&open[..20], PEER), First::Partial));
        for hyper_s in [
            &b"GET /sessions/abc/events HTTP/1.0\r\n\r\n"[..],
            b"GET /sessions/abc/events HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET /sessions/abc/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET /sessions/abc/events HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            b"GET /sessions/abc/events HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            b"GET /sessions/abc/events HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
            b"POST /sessions/abc/events HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /healthz HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(classify(hyper_s, PEER), First::Hyper),
                "{:?}",
                String::from_utf8_lossy(hyper_s)
            );
        }
        // A head longer than the limit is hyper's, not partial forever.
        let mut long = b"GET /sessions/abc/events HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD, b'a');
        assert!(matches!(classify(&long, PEER), First::Hyper));
    }
}
