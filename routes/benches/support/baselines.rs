//! The two baseline servers the fan-out benchmark measures `sse-scale`
//! against (see docs/benchmarks.md). Neither is part of the product.
//!
//! Both speak the subset of the API the load generator uses:
//! `POST /sessions` → 201 `{"id","token","stream_token"}`;
//! `GET /sessions/{id}/events?token=…` (an SSE stream that starts with
//! `retry:` and an `event: connected`); `POST /sessions/{id}/events`
//! `{"type","data"}` with `Authorization: Bearer <token>` → 202 `{"id"}`;
//! `GET /healthz` → 200 (the keep-alive idle-memory run sends it first).
//!
//! - **floor** — the least a server can do per delivery: each session keeps
//!   its streams' sockets, the publishing request encodes the frame once and
//!   writes it to every socket with one non-blocking `write` from its own
//!   task. No per-stream task wakes for an event, nothing is queued; a write
//!   that would block drops the event for that stream (the benchmark's exact
//!   loss count would show it, so a floor figure with loss 0 is honest).
//!   Each stream keeps one small task that waits for the client to close.
//! - **axum** — what a Rust user writes by hand: axum's `Sse` over a
//!   `tokio::sync::broadcast` channel per session, `KeepAlive::default()`,
//!   served by `axum::serve`. Every subscriber task wakes per event and
//!   formats its own copy of it (that is how `Sse` works).
//!
//! Each runs as its own process (the bench binary re-executes itself with
//! `--baseline floor|axum`), so its CPU comes from `/proc/<pid>/stat` like
//! the real server's. It logs `listening addr=<ip:port>` on stderr, as the
//! real server does, and ends on SIGTERM.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Runs the baseline `kind` ("floor" or "axum") until killed.
pub fn run(kind: &str) -> ! {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // The same runtime shape as `sse-scale`: one worker per core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        eprintln!("baseline {kind} listening addr={addr}");
        match kind {
            "floor" => floor(listener).await,
            "axum" => axum_sse(listener).await,
            other => panic!("unknown baseline {other:?}"),
        }
    });
    std::process::exit(0)
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Ids and tokens: random enough for a benchmark, as long as the product's.
fn random_hex(n: usize) -> String {
    let mut s = String::with_capacity(n);
    while s.len() < n {
        s.push_str(&format!("{:032x}", rand::random::<u128>()));
    }
    s.truncate(n);
    s
}

// ---------------------------------------------------------------- floor

/// A publish body. `data` stays the client's JSON text, as the real
/// server keeps it (no re-serialisation, key order preserved).
#[derive(serde::Deserialize)]
struct Publish<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

#[derive(serde::Deserialize)]
struct OwnedPublish {
    #[serde(rename = "type")]
    ty: String,
    data: Box<serde_json::value::RawValue>,
}

struct FloorSession {
    token: String,
    seq: AtomicU64,
    /// Open streams: a key per stream, so the stream's own task can remove it.
    streams: Mutex<HashMap<u64, Arc<TcpStream>>>,
}

#[derive(Default)]
struct Floor {
    sessions: RwLock<HashMap<String, Arc<FloorSession>>>,
    next_stream: AtomicU64,
}

async fn floor(listener: TcpListener) {
    let state = Arc::new(Floor::default());
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(floor_conn(tcp, state.clone()));
    }
}

/// One parsed request head plus its body.
struct Req {
    method: String,
    path: String,
    query: String,
    auth: Option<String>,
    body: Vec<u8>,
}

/// Reads one request (head and `Content-Length` body) into `buf`, keeping
/// any bytes after it for the next request of a kept-alive connection.
async fn read_request(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Req> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head_len)) = parsed.parse(buf) {
            let mut len = 0usize;
            let mut auth = None;
            for h in parsed.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    len = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
                } else if h.name.eq_ignore_ascii_case("authorization") {
                    auth = std::str::from_utf8(h.value).ok().map(str::to_owned);
                }
            }
            let target = parsed.path?.to_owned();
            let method = parsed.method?.to_owned();
            while buf.len() < head_len + len {
                let mut chunk = [0u8; 4096];
                let n = tcp.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[head_len..head_len + len].to_vec();
            buf.drain(..head_len + len);
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_owned(), q.to_owned()),
                None => (target, String::new()),
            };
            return Some(Req {
                method,
                path,
                query,
                auth,
                body,
            });
        }
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn respond(tcp: &mut TcpStream, status: &str, body: &str) -> bool {
    let res = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(res.as_bytes()).await.is_ok()
}

fn query_token(query: &str) -> Option<&str> {
    query.split('&').find_map(|kv| kv.strip_prefix("token="))
}

async fn floor_conn(mut tcp: TcpStream, state: Arc<Floor>) {
    let mut buf = Vec::new();
    // Boxed: the reader's buffers would otherwise stay in the task for as
    // long as a stream lives.
    while let Some(req) = Box::pin(read_request(&mut tcp, &mut buf)).await {
        let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
        let ok = match (req.method.as_str(), parts.as_slice()) {
            ("GET", ["healthz"]) => respond(&mut tcp, "200 OK", "{\"status\":\"ok\"}").await,
            ("POST", ["sessions"]) => {
                let (id, token) = (random_hex(32), random_hex(43));
                state.sessions.write().expect("lock").insert(
                    id.clone(),
                    Arc::new(FloorSession {
                        token: token.clone(),
                        seq: AtomicU64::new(0),
                        streams: Mutex::new(HashMap::new()),
                    }),
                );
                let body = json!({"id": id, "token": token, "stream_token": token}).to_string();
                respond(&mut tcp, "201 Created", &body).await
            }
            ("GET", ["sessions", id, "events"]) => {
                let session = state.sessions.read().expect("lock").get(*id).cloned();
                match session {
                    Some(s) if query_token(&req.query) == Some(s.token.as_str()) => {
                        drop(buf);
                        floor_stream(tcp, s, &state).await;
                        return;
                    }
                    _ => respond(&mut tcp, "401 Unauthorized", "{}").await,
                }
            }
            ("POST", ["sessions", id, "events"]) => {
                let session = state.sessions.read().expect("lock").get(*id).cloned();
                match session {
                    Some(s)
                        if req.auth.as_deref().and_then(|a| a.strip_prefix("Bearer "))
                            == Some(s.token.as_str()) =>
                    {
                        match floor_publish(&s, &req.body) {
                            Some(id) => {
                                respond(&mut tcp, "202 Accepted", &json!({"id": id}).to_string())
                                    .await
                            }
                            None => respond(&mut tcp, "400 Bad Request", "{}").await,
                        }
                    }
                    _ => respond(&mut tcp, "401 Unauthorized", "{}").await,
                }
            }
            _ => respond(&mut tcp, "404 Not Found", "{}").await,
        };
        if !ok {
            return;
        }
    }
}

/// Encodes the event once and writes it to every stream of the session,
/// one non-blocking write each, from the publishing request's task.
fn floor_publish(s: &FloorSession, body: &[u8]) -> Option<String> {
    let p: Publish<'_> = serde_json::from_slice(body).ok()?;
    let (ty, data) = (p.ty, p.data.get());
    let id = format!("{}-{}", now_ms(), s.seq.fetch_add(1, Ordering::Relaxed));
    let frame = format!("id: {id}\nevent: {ty}\ndata: {data}\n\n");
    let streams = s.streams.lock().expect("lock");
    for tcp in streams.values() {
        // A full socket or a partial write loses the event for that stream:
        // the floor does not buffer.
        let _ = tcp.try_write(frame.as_bytes());
    }
    Some(id)
}

/// Registers the socket with its session, then waits for the client to go.
async fn floor_stream(mut tcp: TcpStream, s: Arc<FloorSession>, state: &Floor) {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\nretry: 2000\n\nevent: connected\ndata: {}\n\n";
    if tcp.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let key = state.next_stream.fetch_add(1, Ordering::Relaxed);
    let tcp = Arc::new(tcp);
    s.streams.lock().expect("lock").insert(key, tcp.clone());
    let mut scratch = [0u8; 16];
    loop {
        if tcp.readable().await.is_err() {
            break;
        }
        match tcp.try_read(&mut scratch) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    s.streams.lock().expect("lock").remove(&key);
}

// ---------------------------------------------------------------- axum Sse

struct AxSession {
    token: String,
    seq: AtomicU64,
    tx: tokio::sync::broadcast::Sender<Arc<AxEvent>>,
}

struct AxEvent {
    id: String,
    ty: String,
    data: String,
}

type AxState = Arc<RwLock<HashMap<String, Arc<AxSession>>>>;

async fn axum_sse(listener: TcpListener) {
    use axum::routing::{get, post};
    let state: AxState = Arc::default();
    let app = axum::Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/sessions", post(ax_create))
        .route("/sessions/{id}/events", get(ax_stream).post(ax_publish))
        .with_state(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
    .expect("serve");
}

async fn ax_create(
    axum::extract::State(state): axum::extract::State<AxState>,
) -> impl axum::response::IntoResponse {
    let (id, token) = (random_hex(32), random_hex(43));
    // The same per-subscriber queue as the server's SSE_CLIENT_QUEUE here.
    let (tx, _) = tokio::sync::broadcast::channel(1024);
    state.write().expect("lock").insert(
        id.clone(),
        Arc::new(AxSession {
            token: token.clone(),
            seq: AtomicU64::new(0),
            tx,
        }),
    );
    (
        axum::http::StatusCode::CREATED,
        axum::Json(json!({"id": id, "token": token, "stream_token": token})),
    )
}

async fn ax_stream(
    axum::extract::State(state): axum::extract::State<AxState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> axum::response::Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use axum::response::IntoResponse;
    use futures::StreamExt;
    let session = state.read().expect("lock").get(&id).cloned();
    let Some(s) = session.filter(|s| q.get("token") == Some(&s.token)) else {
        return axum::http::StatusCode::UNAUTHORIZED.into_response();
    };
    let rx = s.tx.subscribe();
    let hello = futures::stream::iter([
        Ok::<_, Infallible>(Event::default().retry(std::time::Duration::from_secs(2))),
        Ok(Event::default().event("connected").data("{}")),
    ]);
    let live = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let e = Event::default().id(&ev.id).event(&ev.ty).data(&ev.data);
                    return Some((Ok(e), rx));
                }
                // A hand-written server typically skips what it missed.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(hello.chain(live))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn ax_publish(
    axum::extract::State(state): axum::extract::State<AxState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
    axum::Json(body): axum::Json<OwnedPublish>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let session = state.read().expect("lock").get(&id).cloned();
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(s) = session.filter(|s| bearer == Some(s.token.as_str())) else {
        return axum::http::StatusCode::UNAUTHORIZED.into_response();
    };
    let id = format!("{}-{}", now_ms(), s.seq.fetch_add(1, Ordering::Relaxed));
    let _ = s.tx.send(Arc::new(AxEvent {
        id: id.clone(),
        ty: body.ty,
        data: body.data.get().to_owned(),
    }));
    (
        axum::http::StatusCode::ACCEPTED,
        axum::Json(json!({ "id": id })),
    )
        .into_response()
}
