//! Fair shares under abuse: what one anonymous client can hold of what every
//! client shares — connections, descriptors, time — over real TCP against
//! real `sse-scale` processes, at a scale that shows it in seconds (limits
//! lowered by their settings).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Value};
use support::raw::*;
use support::*;

#[path = "support/redis_server.rs"]
mod redis_server;
use redis_server::RedisServer;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

const T: Duration = Duration::from_secs(5);

/// A connection to `server` from `source` (any 127.0.0.0/8 address is this
/// machine: each stands for another client).
async fn connect_from(server: &Server, source: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let addr: SocketAddr = server.addr.parse().unwrap();
    socket.connect(addr).await.unwrap()
}

/// A `POST /sessions` that announces `length` bytes of body and sends
/// `sent` of them.
async fn partial_body(conn: &mut TcpStream, length: usize, sent: usize) {
    let head = format!(
        "POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&vec![b' '; sent]).await.unwrap();
}

/// `POST /sessions` with an empty body; the answer.
async fn create_session(conn: &mut TcpStream) -> (u16, String) {
    conn.write_all(b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    read_response(conn).await
}

fn code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON: {body}"));
    v["error"]["code"].as_str().unwrap_or_default().to_owned()
}

// Fails before: only the head had a deadline; 400 connections that sent
// 65,000 of 69,000 body bytes were all open after 36 s.
#[tokio::test]
async fn a_body_that_never_completes_is_answered_408_and_its_connection_closed() {
    let server = Server::start(&[("REQUEST_TIMEOUT_SECS", "1")]);
    let (session, token) = new_session(&server).await;
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut conn = connect(&server).await;
        partial_body(&mut conn, 69_000, 65_000).await;
        stalled.push(conn);
    }
    // A publish trickling its body a byte every 100 ms: each byte is in
    // time, the whole body is not.
    let mut trickle = connect(&server).await;
    let head = format!(
        "POST /sessions/{session}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n"
    );
    trickle.write_all(head.as_bytes()).await.unwrap();
    let trickling = tokio::spawn(async move {
        for _ in 0..100 {
            if trickle.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        trickle
    });
    for conn in &mut stalled {
        let (status, body) = read_response(conn).await;
        assert_eq!(
            (status, code(&body).as_str()),
            (408, "request_timeout"),
            "{body}"
        );
        let took = closed_within(conn, T).await;
        assert!(
            took.is_some(),
            "a connection with an unread body stayed open"
        );
    }
    let mut trickle = trickling.await.unwrap();
    let (status, body) = read_response(&mut trickle).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (408, "request_timeout"),
        "{body}"
    );
    // Whole requests are served as before.
    let res = client().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

/// An h2c connection with prior knowledge, driven by hyper's client.
async fn h2c(
    server: &Server,
) -> (
    hyper::client::conn::http2::SendRequest<BoxBody>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = connect(server).await;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    // Ends when the server closes the connection (hyper answers the
    // server's pings meanwhile, as any client does).
    let driven = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driven)
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

// Fails before: hyper has no idle timeout for HTTP/2; 50 h2c connections
// that only answered pings were held 25 s, and streams that never ended
// their request 30 s.
#[tokio::test]
async fn h2c_connections_without_a_request_and_requests_that_never_end_are_closed() {
    use http_body_util::BodyExt;
    let server = Server::start(&[
        ("REQUEST_HEAD_TIMEOUT_SECS", "1"),
        ("REQUEST_TIMEOUT_SECS", "1"),
    ]);
    // Idle: the preface and SETTINGS, then nothing.
    let (_idle, idle_conn) = h2c(&server).await;
    // Busy for a while: a request whose body never ends.
    let (mut send, busy_conn) = h2c(&server).await;
    let body = http_body_util::StreamBody::new(
        futures::stream::once(async {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(b"{")))
        })
        .chain(futures::stream::pending()),
    );
    let req = hyper::Request::post(server.url("/sessions"))
        .body(BoxBody::new(body))
        .unwrap();
    let started = std::time::Instant::now();
    let res = tokio::time::timeout(T, send.send_request(req))
        .await
        .expect("an answer in time")
        .unwrap();
    assert_eq!(res.status(), 408);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(code(&String::from_utf8_lossy(&body)), "request_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Both connections are closed once no request is open for the deadline.
    tokio::time::timeout(T, idle_conn)
        .await
        .expect("the idle h2c connection was closed")
        .unwrap();
    tokio::time::timeout(T, busy_conn)
        .await
        .expect("the h2c connection was closed after its last request")
        .unwrap();
}

// Fails before: there was no limit on connections per address.
#[tokio::test]
async fn one_address_holds_at_most_its_share_of_connections() {
    let server = Server::start(&[("MAX_CONNECTIONS_PER_ADDRESS", "8")]);
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut conn = connect_from(&server, "127.0.0.1").await;
        partial_body(&mut conn, 100, 1).await;
        held.push(conn);
    }
    // The ninth is answered, clearly, and closed.
    let mut ninth = connect_from(&server, "127.0.0.1").await;
    let (status, body) = create_session(&mut ninth).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (429, "too_many_connections"),
        "{body}"
    );
    assert!(closed_within(&mut ninth, T).await.is_some());
    // Another address is served as usual.
    let mut other = connect_from(&server, "127.0.0.2").await;
    let (status, body) = create_session(&mut other).await;
    assert_eq!(status, 201, "{body}");
    // A closed connection gives its place back.
    drop(held.pop());
    assert!(
        eventually(T, || async {
            let mut conn = connect_from(&server, "127.0.0.1").await;
            conn.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            read_response(&mut conn).await.0 == 200
        })
        .await
    );
    let stats = server.stats().await;
    assert!(
        stats["connections_refused"]["per_address"].as_u64() >= Some(1),
        "{stats}"
    );
}

// Fails before: 620 connections of one byte each against an open-file
// limit of 600 made /healthz time out and filled the log with "accept
// failed ... Too many open files".
#[tokio::test]
async fn a_descriptor_flood_leaves_health_checks_answering() {
    // 300 descriptors: MAX_CONNECTIONS defaults to 172 of them.
    let server = Server::start_with_open_files(&[], 300);
    let (session, token) = new_session(&server).await;
    let mut flood = Vec::new();
    // Event streams first: a stream waiting for its next event holds its
    // socket without a task, and must still count.
    for i in 0..100u32 {
        let mut conn = connect_from(&server, &format!("127.0.4.{}", 10 + i)).await;
        let head =
            format!("GET /sessions/{session}/events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n");
        if conn.write_all(head.as_bytes()).await.is_ok() {
            flood.push(conn);
        }
    }
    // From many addresses, as a botnet would: no per-address limit helps.
    for i in 0..400u32 {
        let source = format!("127.0.{}.{}", 1 + i / 200, 10 + i % 200);
        let mut conn = connect_from(&server, &source).await;
        if partial_body_tolerant(&mut conn).await {
            flood.push(conn);
        }
    }
    for _ in 0..5 {
        let res = tokio::time::timeout(
            Duration::from_secs(2),
            client().get(server.url("/healthz")).send(),
        )
        .await
        .expect("/healthz in time during the flood")
        .unwrap();
        assert_eq!(res.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What the instance refused got a 503 it can read.
    let mut late = connect_from(&server, "127.0.3.1").await;
    let (status, body) = create_session(&mut late).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (503, "over_capacity"),
        "{body}"
    );
    let log = server.log.lock().unwrap().clone();
    assert!(!log.contains("accept failed"), "{log}");
    drop(flood);
    let stats = server.stats().await;
    assert!(
        stats["connections_refused"]["instance_full"].as_u64() >= Some(1),
        "{stats}"
    );
}

/// As [`partial_body`], but a connection the server already refused (and
/// closed) is not an error: `false`.
async fn partial_body_tolerant(conn: &mut TcpStream) -> bool {
    let head = b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n ";
    conn.write_all(head).await.is_ok()
}

/// An instance publishing through `redis`, with room to publish fast.
fn redis_mode(redis: &RedisServer, extra: &[(&str, &str)]) -> Server {
    let url = redis.url();
    let mut env = vec![
        ("SSE_ADAPTER", "redis"),
        ("REDIS_URL", url.as_str()),
        ("FF_REDIS_SSE_BROADCAST", "true"),
        ("RATE_LIMIT_PUBLISH_PER_SEC", "1000"),
    ];
    env.extend_from_slice(extra);
    Server::start(&env)
}

/// A new session with `n` events of 60 KB: its id, token and event ids.
async fn drafts(server: &Server, n: usize) -> (String, String, Vec<String>) {
    let (session, token) = new_session(server).await;
    let draft = "x".repeat(60_000);
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(
            publish(
                server,
                &session,
                &token,
                "section_draft",
                draft.clone().into(),
            )
            .await,
        );
    }
    (session, token, ids)
}

/// A stream of `session` from `source` resuming after `last`, whose client
/// reads nothing: its receive buffer is 4 KiB.
async fn unread_resume(
    server: &Server,
    source: &str,
    session: &str,
    token: &str,
    last: &str,
) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut conn = socket.connect(server.addr.parse().unwrap()).await.unwrap();
    let head = format!(
        "GET /sessions/{session}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nLast-Event-ID: {last}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn
}

// Fails before: every resume read its own copy of the replay from Redis and
// held it until its client read it: 40 unread resumes of a ~4 MB history
// took the server from 30 to 76 MiB, at 200 streams per address ~800 MB.
#[tokio::test]
async fn unread_replays_hold_no_more_than_the_replay_budget() {
    let redis = RedisServer::start();
    let server = redis_mode(&redis, &[]);
    let (session, token, ids) = drafts(&server, 62).await;
    let before = server.rss();
    let mut unread = Vec::new();
    for _ in 0..40 {
        unread.push(unread_resume(&server, "127.0.0.1", &session, &token, &ids[0]).await);
    }
    // Every one answered: with its replay, or with a reset.
    assert!(
        eventually(T, || async {
            let stats = server.stats().await;
            stats["resumes"].as_u64().unwrap_or(0) + stats["resets"].as_u64().unwrap_or(0) >= 40
        })
        .await
    );
    let stats = server.stats().await;
    let held = stats["replay_bytes_held"].as_u64().unwrap();
    assert!(
        held <= 8 << 20,
        "held {held} bytes past REPLAY_BUDGET_PER_ADDRESS_MB"
    );
    assert!(
        stats["replays_over_budget"].as_u64() >= Some(35),
        "{stats}\n{}",
        server.log.lock().unwrap()
    );
    let grown = server.rss().saturating_sub(before);
    // The budget holds at most 8 MiB; the rest is reads in flight (at most
    // four at a time and one waiting, each up to REPLAY_MAX_BYTES).
    assert!(grown < 28 << 20, "RSS grew by {} MiB", grown >> 20);
    // Another address resumes as usual, replay and all.
    let mut other = connect_from(&server, "127.0.0.2").await;
    let head = format!(
        "GET /sessions/{session}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nLast-Event-ID: {}\r\n\r\n",
        ids[59]
    );
    other.write_all(head.as_bytes()).await.unwrap();
    let got = read_until(&mut other, &format!("id: {}\n", ids[61])).await;
    assert!(got.contains(&format!("id: {}\n", ids[60])), "the replay");
    assert!(!got.contains("event: reset"), "a reset for another address");
    drop(unread);
}

// Fails before: `POST /sessions` read its body before its rate limit ran,
// so a refused client still held its connection for the whole body.
#[tokio::test]
async fn a_refused_session_creation_does_not_wait_for_its_body() {
    let server = Server::start(&[
        ("RATE_LIMIT_SESSIONS_PER_MIN", "1"),
        ("REQUEST_TIMEOUT_SECS", "30"),
    ]);
    new_session(&server).await;
    let mut conn = connect(&server).await;
    partial_body(&mut conn, 1000, 1).await;
    let started = std::time::Instant::now();
    let (status, body) = read_response(&mut conn).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (429, "rate_limited"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

// Fails before: run slots were limited per session and per instance only;
// from three addresses, 258 sessions x 4 runs took all 1,024 in 0.9 s.
#[tokio::test]
async fn one_address_cannot_take_every_run_slot() {
    let server = Server::start(&[("MAX_RUNS_PER_ADDRESS", "3")]);
    let long = json!({ "stages": ["a"], "sections_per_stage": 10, "step_ms": 1000 });
    let (s1, t1) = new_session(&server).await;
    let (s2, t2) = new_session(&server).await;
    for (s, t) in [(&s1, &t1), (&s1, &t1), (&s2, &t2)] {
        assert_eq!(start_run(&server, s, t, long.clone()).await.status(), 202);
    }
    // The address's fourth run, on a session with room to spare.
    let res = start_run(&server, &s2, &t2, long.clone()).await;
    assert_eq!(res.status(), 429);
    let body = res.text().await.unwrap();
    assert_eq!(code(&body), "too_many_runs", "{body}");
    assert!(body.contains("MAX_RUNS_PER_ADDRESS"), "{body}");
    // Another address starts its own.
    let other = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let res = other
        .post(server.url(&format!("/sessions/{s2}/pipeline")))
        .bearer_auth(&t2)
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
}

// Fails before: a run could ask for 20 stages x 100 sections x 60 s (about
// 33 h), and a gated run waited there for half an hour.
#[tokio::test]
async fn a_run_lasts_at_most_max_run_secs() {
    let server = Server::start(&[("MAX_RUN_SECS", "2")]);
    let (s, t) = new_session(&server).await;
    let slow = json!({ "stages": ["a"], "sections_per_stage": 10, "step_ms": 500 });
    let res = start_run(&server, &s, &t, slow).await;
    assert_eq!(res.status(), 400);
    let body = res.text().await.unwrap();
    assert!(body.contains("MAX_RUN_SECS"), "{body}");
    // Short enough to ask for, but it waits at its gate past the deadline.
    let mut events = SseClient::open(&server, &s, &t).await;
    events.expect_connected().await;
    let gated = json!({ "stages": ["a"], "sections_per_stage": 1, "step_ms": 10, "gate": true });
    assert_eq!(start_run(&server, &s, &t, gated).await.status(), 202);
    let started = std::time::Instant::now();
    loop {
        let event = events.next_event(T).await.expect("the run's events");
        if event.event.as_deref() == Some("pipeline_cancelled") {
            assert_eq!(event.json()["reason"], "run_timeout", "{}", event.raw);
            break;
        }
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1800) && took < T, "{took:?}");
}

// Fails before: when HISTORY_MEMORY_MB was reached, the sessions written
// least recently lost their history first: nine sessions of one client,
// 16 events of 60 KB each, made an idle victim's next resume a reset.
#[tokio::test]
async fn one_client_cannot_push_another_session_s_history_out() {
    let server = Server::start(&[("HISTORY_MEMORY_MB", "8")]);
    let (victim, victim_token) = new_session(&server).await;
    let seen = publish(&server, &victim, &victim_token, "stage_start", json!("a")).await;
    let missed = publish(
        &server,
        &victim,
        &victim_token,
        "stage_complete",
        json!("b"),
    )
    .await;
    let draft = "x".repeat(60_000);
    for _ in 0..9 {
        let (s, t) = new_session(&server).await;
        for _ in 0..16 {
            publish(&server, &s, &t, "section_draft", draft.clone().into()).await;
        }
    }
    let stats = server.stats().await;
    assert!(
        stats["history"]["bytes"].as_u64() <= Some(8 << 20),
        "{stats}"
    );
    let mut resumed = SseClient::open_from(&server, &victim, &victim_token, &seen).await;
    resumed.expect_connected().await;
    let event = resumed.next_event(T).await.expect("the missed event");
    assert_eq!(
        event.event.as_deref(),
        Some("stage_complete"),
        "{}",
        event.raw
    );
    assert_eq!(event.id.as_deref(), Some(missed.as_str()));
}

/// Publishes with `token` as given in `authorization`; the status.
async fn publish_with(server: &Server, session: &str, authorization: &str) -> u16 {
    client()
        .post(server.url(&format!("/sessions/{session}/events")))
        .header("authorization", authorization)
        .json(&json!({ "type": "note", "data": 1 }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

// Fails before: a token minted with a leaked previous secret for any
// session, expiring in 2100, published and was exchanged for a token of
// the new secret, which outlived the rotation.
#[tokio::test]
async fn a_leaked_previous_secret_mints_nothing_that_outlives_the_rotation() {
    use sse_scale::token::Scope;
    let old = "an-old-secret-of-at-least-32-bytes-rotated-out";
    let server = Server::start(&[("SESSION_SECRET_PREVIOUS", old)]);
    let (session, current) = new_session(&server).await;
    let id = sse_scale::SessionId::parse(&session).unwrap();
    let leaked = sse_scale::TokenSigner::new(old);
    let century = Duration::from_secs(100 * 365 * 86_400);
    let far = leaked.issue(&id, Scope::Full, century).token;
    assert_eq!(
        publish_with(&server, &session, &format!("Bearer {far}")).await,
        403
    );
    // An old-secret token of the usual lifetime still works during the
    // rotation, but is not exchanged for a new-secret one.
    let usual = leaked
        .issue(&id, Scope::Full, Duration::from_secs(3600))
        .token;
    assert_eq!(
        publish_with(&server, &session, &format!("Bearer {usual}")).await,
        202
    );
    let refreshed = post(
        &server,
        &usual,
        &format!("/sessions/{session}/tokens"),
        json!({}),
    )
    .await;
    assert_eq!(refreshed.status(), 403);
    let refreshed = post(
        &server,
        &current,
        &format!("/sessions/{session}/tokens"),
        json!({}),
    )
    .await;
    assert_eq!(refreshed.status(), 200);
    // The scheme is case-insensitive; the MAC is lower-case hex only.
    assert_eq!(
        publish_with(&server, &session, &format!("bearer {current}")).await,
        202
    );
    let (head, mac) = current.rsplit_once('.').unwrap();
    let upper = format!("Bearer {head}.{}", mac.to_uppercase());
    assert_eq!(publish_with(&server, &session, &upper).await, 403);
}

async fn create_from_origin(server: &Server, origin: &str) -> u16 {
    client()
        .post(server.url("/sessions"))
        .header("origin", origin)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

// Fails before: any page could create sessions with its visitors'
// browsers (a simple cross-origin POST needs no preflight), spending the
// session budget of the visitor's address, or of everyone behind its NAT.
#[tokio::test]
async fn a_page_of_another_origin_cannot_create_sessions() {
    let server = Server::start(&[("CORS_ALLOWED_ORIGINS", "https://app.example.com")]);
    assert_eq!(
        create_from_origin(&server, "https://evil.example").await,
        403
    );
    assert_eq!(create_from_origin(&server, "null").await, 403);
    // The server's own pages (any port of its host), a listed origin, and
    // clients that are not browsers.
    let port = server.addr.rsplit_once(':').unwrap().1;
    assert_eq!(
        create_from_origin(&server, &format!("http://127.0.0.1:{port}")).await,
        201
    );
    assert_eq!(
        create_from_origin(&server, "https://app.example.com").await,
        201
    );
    assert_eq!(
        client()
            .post(server.url("/sessions"))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
}

// Fails before: `/events` took data nested 30,000 deep; every other JSON
// body stops at 128.
#[tokio::test]
async fn event_data_nests_no_deeper_than_other_bodies() {
    let server = Server::start(&[]);
    let (session, token) = new_session(&server).await;
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let send = |data: String| {
        let body = format!(r#"{{"type":"deep","data":{data}}}"#);
        client()
            .post(server.url(&format!("/sessions/{session}/events")))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(send(nested(128)).await.unwrap().status(), 202);
    let res = send(nested(30_000)).await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(code(&res.text().await.unwrap()), "invalid_json");
}

// Fails before: a gate answer for a run no instance holds went to every
// instance on the control channel, feedback and all, before its 404.
#[tokio::test]
async fn a_gate_answer_for_a_run_nobody_holds_is_not_broadcast() {
    let redis = RedisServer::start();
    let url = redis.url();
    let server = Server::start(&[
        ("SSE_ADAPTER", "redis"),
        ("REDIS_URL", &url),
        ("FF_REDIS_SSE_BROADCAST", "true"),
    ]);
    let mut control = redis::Client::open(url.as_str())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    control.subscribe("sse:control").await.unwrap();
    let (session, token) = new_session(&server).await;
    let feedback = "FEEDBACK-".repeat(5_000);
    for run in ["0123456789abcdef0123456789abcdef", "not-a-run-id"] {
        let res = post(
            &server,
            &token,
            &format!("/sessions/{session}/pipeline/{run}/gate"),
            json!({ "approve": true, "feedback": feedback }),
        )
        .await;
        assert_eq!(res.status(), 404);
    }
    // What went out: the well-formed id's question, without the feedback.
    let mut messages = control.on_message();
    let mut seen = Vec::new();
    while let Ok(Some(msg)) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        seen.push(msg.get_payload::<String>().unwrap());
    }
    assert!(seen.len() <= 1, "{seen:?}");
    assert!(seen.iter().all(|m| !m.contains("FEEDBACK")), "{seen:?}");
}

// Fails before: `XADD MAXLEN` bounds entries, not bytes: 150 events of
// 65 KB gave one session's history 9.5 MiB in Redis, heading for ~64 MB.
#[tokio::test]
async fn one_session_s_redis_history_stays_under_its_byte_cap() {
    let redis = RedisServer::start();
    let server = redis_mode(&redis, &[("HISTORY_SESSION_MAX_BYTES", "1048576")]);
    let (session, token, ids) = drafts(&server, 40).await;
    let held = redis.history(&session);
    let bytes: usize = held
        .iter()
        .map(|(_, fields)| 64 + fields.iter().map(String::len).sum::<usize>())
        .sum();
    assert!(bytes <= 1 << 20, "{bytes} bytes in {} entries", held.len());
    assert!(held.len() >= 15, "trimmed too far: {} entries", held.len());
    assert_eq!(held.last().unwrap().0, *ids.last().unwrap());
    // A resume from a trimmed event is told; one from a held event is not.
    let mut old = SseClient::open_from(&server, &session, &token, &ids[0]).await;
    old.expect_connected().await;
    let first = old.next_event(T).await.unwrap();
    assert_eq!(first.event.as_deref(), Some("reset"), "{}", first.raw);
    let mut recent = SseClient::open_from(&server, &session, &token, &ids[37]).await;
    recent.expect_connected().await;
    for id in &ids[38..] {
        assert_eq!(
            recent.next_event(T).await.unwrap().id.as_deref(),
            Some(id.as_str())
        );
    }
}

// Fails before: the publishing routes read their body before their rate
// limit ran, so a client over its limit still held a connection for its
// whole body.
#[tokio::test]
async fn a_publish_over_its_rate_limit_does_not_wait_for_its_body() {
    let server = Server::start(&[
        ("RATE_LIMIT_PUBLISH_PER_SEC", "1"),
        ("REQUEST_TIMEOUT_SECS", "30"),
    ]);
    let (session, token) = new_session(&server).await;
    publish(&server, &session, &token, "note", json!(1)).await;
    let mut conn = connect(&server).await;
    let head = format!(
        "POST /sessions/{session}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n{{"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let (status, body) = read_response(&mut conn).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (429, "rate_limited"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}
