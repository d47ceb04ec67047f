//! The edge, as a hostile or careless client meets it: slow and partial
//! request heads, idle keep-alive connections, floods of half-open
//! connections, bodies that arrive late, the operator endpoints, CORS and
//! weak secrets. Real `sse-scale` processes over real TCP.

#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::time::{Duration, Instant};

use redis_server::RedisServer;
use serde_json::{json, Value};
use support::raw::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

// Fails before the fix: the head deadline bounded only each peek, which
// returns at once while bytes wait, so a partial head was held for ever.
#[tokio::test]
async fn a_request_head_must_arrive_whole_within_the_deadline() {
    let server = Server::start(&[("REQUEST_HEAD_TIMEOUT_SECS", "1")]);
    // Stops half-way through the head.
    let mut partial = connect(&server).await;
    partial
        .write_all(b"GET /sessions/abc/events HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Sends its head one byte every 200 ms: each byte is quick, the whole
    // head is not.
    let mut trickle = connect(&server).await;
    let trickling = tokio::spawn(async move {
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
            if trickle.write_all(&[*b]).await.is_err() {
                return trickle;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        trickle
    });
    let took = closed_within(&mut partial, T).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(3)),
        "partial head held: {took:?}"
    );
    let mut trickle = trickling.await.unwrap();
    let took = closed_within(&mut trickle, T).await;
    assert!(took.is_some(), "a trickled head was held past the deadline");
    // The server still answers a whole request at once.
    let res = client().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

// Fails before the fix: hyper ran without a timer, so an idle keep-alive
// connection was held for ever.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let server = Server::start(&[("REQUEST_HEAD_TIMEOUT_SECS", "1")]);
    let mut conn = connect(&server).await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut conn).await.0, 200);
    // The connection is reusable at once...
    conn.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut conn).await.0, 200);
    // ...and closed once idle for the deadline.
    let took = closed_within(&mut conn, T).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(3)),
        "idle keep-alive held: {took:?}"
    );
}

// Fails before the fix: nothing bounded connections that never send a
// head (each held a task and a descriptor for the head timeout).
#[tokio::test]
async fn a_flood_of_silent_connections_is_bounded_and_the_server_recovers() {
    let server = Server::start(&[
        ("MAX_PENDING_HEADS", "4"),
        ("REQUEST_HEAD_TIMEOUT_SECS", "2"),
    ]);
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect(&server).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = connect(&server).await;
    let took = closed_within(&mut extra, Duration::from_secs(1)).await;
    assert!(took.is_some(), "a fifth silent connection was accepted");
    // Once the silent ones time out, everyone is served again.
    for conn in &mut silent {
        assert!(closed_within(conn, T).await.is_some());
    }
    let res = client().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(server.stats().await["heads_refused"].as_u64() >= Some(1));
}

// Fails before the fix: `POST /sessions` answered without reading its
// body, and hyper then closed the keep-alive connection.
#[tokio::test]
async fn a_session_created_with_a_late_body_keeps_its_connection() {
    let server = Server::start(&[]);
    let mut conn = connect(&server).await;
    conn.write_all(b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.write_all(b"{}").await.unwrap();
    let (status, body) = read_response(&mut conn).await;
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    assert!(created["token"].is_string());
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut conn).await.0,
        200,
        "the connection was reused"
    );
}

async fn error_code(res: reqwest::Response) -> (u16, String) {
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

// Fails before the fix: `/stats` and `/flags` answered anyone, and
// `/flags` listed live session ids.
#[tokio::test]
async fn operator_endpoints_need_the_admin_token() {
    let server = Server::start(&[]);
    let (session, _) = new_session(&server).await;
    let c = client();
    for path in ["/stats", &format!("/flags?sessions={session}")] {
        let url = server.url(path);
        assert_eq!(
            error_code(c.get(&url).send().await.unwrap()).await,
            (401, "unauthorized".into()),
            "{path}"
        );
        assert_eq!(
            error_code(
                c.get(&url)
                    .bearer_auth("not-the-admin-token")
                    .send()
                    .await
                    .unwrap()
            )
            .await,
            (403, "forbidden".into()),
            "{path}"
        );
        let res = c.get(&url).bearer_auth(ADMIN).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }
    // A session token is not an admin token.
    let (_, token) = new_session(&server).await;
    let res = c
        .get(server.url("/stats"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    // Health stays open for balancers.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(c.get(server.url(path)).send().await.unwrap().status(), 200);
    }
    // Without ADMIN_TOKEN the endpoints are closed, and say what to set.
    let closed = Server::start(&[("ADMIN_TOKEN", "")]);
    let res = c
        .get(closed.url("/stats"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "admin_disabled");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("ADMIN_TOKEN"));
}

#[tokio::test]
async fn announcements_reach_every_session_on_every_instance() {
    let redis = RedisServer::start();
    let env = |name| {
        vec![
            ("SSE_ADAPTER", "redis".to_owned()),
            ("REDIS_URL", redis.url()),
            ("FF_REDIS_SSE_BROADCAST", "true".to_owned()),
            ("INSTANCE_ID", name),
        ]
    };
    let start = |name: &str| {
        let e = env(name.to_owned());
        let pairs: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Server::start(&pairs)
    };
    let a = start("a");
    let b = start("b");
    let (s1, t1) = new_session(&a).await;
    let (s2, t2) = new_session(&b).await;
    let mut on_a = SseClient::open(&a, &s1, &t1).await;
    on_a.expect_connected().await;
    let mut on_b = SseClient::open(&b, &s2, &t2).await;
    on_b.expect_connected().await;
    wait_subscribed(&b, 1).await;

    let c = client();
    let url = a.url("/announcements");
    let body = json!({ "type": "maintenance", "data": { "in_minutes": 5 } });
    assert_eq!(c.post(&url).json(&body).send().await.unwrap().status(), 401);
    let res = c
        .post(&url)
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    for sse in [&mut on_a, &mut on_b] {
        let ev = sse.next_event(T).await.expect("the announcement");
        assert_eq!(ev.event.as_deref(), Some("maintenance"));
        assert_eq!(ev.json(), json!({ "in_minutes": 5 }));
        assert_eq!(ev.id, None, "announcements never move Last-Event-ID");
    }
    let bad = json!({ "type": "a\nb", "data": 1 });
    let res = c
        .post(&url)
        .bearer_auth(ADMIN)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

#[tokio::test]
async fn cors_answers_only_listed_origins() {
    let server = Server::start(&[("CORS_ALLOWED_ORIGINS", "https://app.example")]);
    let c = client();
    let preflight = |origin: &'static str| {
        c.request(reqwest::Method::OPTIONS, server.url("/sessions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let evil = preflight("https://evil.example").await.unwrap();
    assert!(evil.headers().get("access-control-allow-origin").is_none());
    let res = c
        .post(server.url("/sessions"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(res.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .contains("x-instance-id"));
    // Nothing is allowed by default.
    let plain = Server::start(&[]);
    let res = c
        .post(plain.url("/sessions"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

// Fails before the fix: any secret was accepted, an empty one included,
// which makes every session token forgeable.
#[test]
fn weak_secrets_stop_the_server_with_exit_code_2() {
    for (env, needle) in [
        (("SESSION_SECRET", ""), "SESSION_SECRET"),
        (("SESSION_SECRET", "hunter2"), "SESSION_SECRET"),
        (("ADMIN_TOKEN", "admin"), "ADMIN_TOKEN"),
        (("CORS_ALLOWED_ORIGINS", "*"), "CORS_ALLOWED_ORIGINS"),
        (("TRUST_FORWARDED_FOR", "true"), "TRUSTED_PROXIES"),
        (("TRUSTED_PROXIES", "the-balancer"), "TRUSTED_PROXIES"),
    ] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sse-scale"))
            .env_clear()
            .env("PORT", "0")
            .env(env.0, env.1)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + T;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{env:?}: the server started instead of refusing the setting");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains(needle), "{env:?}: {stderr}");
    }
}

// Fails before the fix: creating sessions was free and unlimited, so every
// per-session limit was, per client, no limit at all.
#[tokio::test]
async fn one_address_cannot_create_sessions_without_limit() {
    let server = Server::start(&[("RATE_LIMIT_SESSIONS_PER_MIN", "3")]);
    for _ in 0..3 {
        new_session(&server).await;
    }
    let res = client().post(server.url("/sessions")).send().await.unwrap();
    assert_eq!(error_code(res).await, (429, "rate_limited".into()));
}

// Fails before the fix: one client could hold every run slot of an
// instance with gated runs, and `step_ms: 0` was accepted.
#[tokio::test]
async fn runs_are_capped_per_session_and_paced() {
    let server = Server::start(&[("MAX_RUNS_PER_SESSION", "2")]);
    let (s, t) = new_session(&server).await;
    let gated = json!({ "stages": ["a"], "sections_per_stage": 1, "step_ms": 10, "gate": true });
    for _ in 0..2 {
        assert_eq!(
            start_run(&server, &s, &t, gated.clone()).await.status(),
            202
        );
    }
    assert_eq!(
        error_code(start_run(&server, &s, &t, gated.clone()).await).await,
        (429, "too_many_runs".into())
    );
    let (other, other_token) = new_session(&server).await;
    assert_eq!(
        start_run(&server, &other, &other_token, gated)
            .await
            .status(),
        202,
        "another session is not held back"
    );
    let flood = json!({ "stages": ["a"], "sections_per_stage": 100, "step_ms": 0 });
    assert_eq!(
        error_code(start_run(&server, &other, &other_token, flood).await).await,
        (400, "invalid_pipeline".into())
    );
}

// Fails before the fix: a run's events bypassed the session's publish
// limit.
#[tokio::test]
async fn a_run_spends_its_session_s_publish_budget_and_loses_nothing() {
    let server = Server::start(&[("RATE_LIMIT_PUBLISH_PER_SEC", "5")]);
    let (s, t) = new_session(&server).await;
    let mut sse = SseClient::open(&server, &s, &t).await;
    sse.expect_connected().await;
    let run = json!({ "stages": ["a"], "sections_per_stage": 8, "step_ms": 10 });
    assert_eq!(start_run(&server, &s, &t, run).await.status(), 202);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let res = message(&server, &s, &t, "hello").await;
    assert_eq!(
        error_code(res).await,
        (429, "rate_limited".into()),
        "the run used the budget"
    );
    // The run slowed down instead of dropping anything.
    let mut sections = 0;
    loop {
        let ev = sse
            .next_event(Duration::from_secs(10))
            .await
            .expect("the run's events");
        match ev.event.as_deref() {
            Some("section_draft") => sections += 1,
            Some("pipeline_complete") => break,
            Some("pipeline_failed") => panic!("{ev:?}"),
            _ => {}
        }
    }
    assert_eq!(sections, 8);
}

// Fails before the fix: one session could fill HISTORY_MEMORY_MB and
// evict every other session's history (their resumes then got `reset`).
#[tokio::test]
async fn one_session_cannot_push_the_others_history_out() {
    let server = Server::start(&[
        ("HISTORY_MEMORY_MB", "1"),
        ("HISTORY_SESSION_MAX_BYTES", "65536"),
        ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
    ]);
    let (quiet, qt) = new_session(&server).await;
    let first = publish(&server, &quiet, &qt, "t", json!("q1")).await;
    publish(&server, &quiet, &qt, "t", json!("q2")).await;
    let (busy, bt) = new_session(&server).await;
    let big = json!("x".repeat(8000));
    for _ in 0..200 {
        publish(&server, &busy, &bt, "t", big.clone()).await;
    }
    let stats = server.stats().await;
    assert!(
        stats["history"]["bytes"].as_u64() < Some(1 << 20),
        "{stats}"
    );
    let res = client()
        .get(server.url(&format!("/sessions/{quiet}/events?token={qt}")))
        .header("last-event-id", &first)
        .send()
        .await
        .unwrap();
    let mut sse = SseClient::from_response(res);
    sse.expect_connected().await;
    let ev = sse.next_event(T).await.unwrap();
    assert_eq!(
        ev.event.as_deref(),
        Some("t"),
        "the quiet session still resumes: {ev:?}"
    );
    assert_eq!(ev.json(), json!("q2"));
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_streams() {
    let server = Server::start(&[("MAX_STREAMS_PER_ADDRESS", "2")]);
    let (s, t) = new_session(&server).await;
    let mut a = SseClient::open(&server, &s, &t).await;
    a.expect_connected().await;
    let b = SseClient::open(&server, &s, &t).await;
    let url = server.url(&format!("/sessions/{s}/events?token={t}"));
    let third = client().get(&url).send().await.unwrap();
    assert_eq!(error_code(third).await, (429, "too_many_streams".into()));
    drop(b);
    let ok = eventually(T, || async {
        client().get(&url).send().await.unwrap().status() == 200
    })
    .await;
    assert!(ok, "a closed stream gives its slot back");
}

async fn create(server: &Server) -> Value {
    let res = client().post(server.url("/sessions")).send().await.unwrap();
    assert_eq!(res.status(), 201);
    res.json().await.unwrap()
}

// Fails before the fix: one token never expired and both read and wrote.
#[tokio::test]
async fn stream_tokens_only_stream_and_tokens_expire_unless_refreshed() {
    let server = Server::start(&[("SESSION_TOKEN_TTL_SECS", "5")]);
    let started = Instant::now();
    let created = create(&server).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let full = created["token"].as_str().unwrap().to_owned();
    let stream = created["stream_token"].as_str().unwrap().to_owned();
    assert!(created["expires_at"].as_u64().is_some());
    // The stream token opens the stream (query string, as EventSource)...
    let mut sse = SseClient::open(&server, &id, &stream).await;
    sse.expect_connected().await;
    // ...and nothing else.
    assert_eq!(
        error_code(message(&server, &id, &stream, "hi").await).await,
        (403, "forbidden".into())
    );
    assert_eq!(message(&server, &id, &full, "hi").await.status(), 202);

    tokio::time::sleep_until((started + Duration::from_millis(2100)).into()).await;
    let res = client()
        .post(server.url(&format!("/sessions/{id}/tokens")))
        .bearer_auth(&full)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let fresh: Value = res.json().await.unwrap();
    let renewed = fresh["token"].as_str().unwrap().to_owned();
    assert!(fresh["expires_at"].as_u64() > created["expires_at"].as_u64());

    tokio::time::sleep_until((started + Duration::from_millis(5200)).into()).await;
    assert_eq!(
        error_code(message(&server, &id, &full, "late").await).await,
        (401, "token_expired".into())
    );
    assert_eq!(
        message(&server, &id, &renewed, "renewed").await.status(),
        202
    );
}

// Fails before the fix: there was no way to rotate SESSION_SECRET without
// invalidating every token at once.
#[tokio::test]
async fn a_rotated_secret_keeps_tokens_working() {
    let old = "old-secret-of-at-least-32-bytes-0123456789";
    let new = "new-secret-of-at-least-32-bytes-0123456789";
    let before = Server::start(&[("SESSION_SECRET", old)]);
    let created = create(&before).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap().to_owned();
    let rotating = Server::start(&[("SESSION_SECRET", new), ("SESSION_SECRET_PREVIOUS", old)]);
    assert_eq!(
        message(&rotating, &id, &token, "still valid")
            .await
            .status(),
        202
    );
    let after = Server::start(&[("SESSION_SECRET", new)]);
    assert_eq!(message(&after, &id, &token, "retired").await.status(), 403);
}

// Fails before the fix: debug request spans carried the whole URI,
// `?token=` included.
#[tokio::test]
async fn tokens_stay_out_of_the_server_log() {
    let server = Server::start(&[("RUST_LOG", "debug")]);
    let created = create(&server).await;
    let id = created["id"].as_str().unwrap();
    let token = created["stream_token"].as_str().unwrap();
    let mut sse = SseClient::open(&server, id, token).await;
    sse.expect_connected().await;
    drop(sse);
    let seen = eventually(T, || async {
        server
            .log
            .lock()
            .unwrap()
            .contains(&format!("/sessions/{id}/events"))
    })
    .await;
    let log = server.log.lock().unwrap().clone();
    assert!(seen, "no request span logged:\n{log}");
    assert!(!log.contains(token), "the token reached the log");
}

// The session-creation limit is one budget for the whole fleet in Redis
// mode: an address cannot multiply it by the number of instances.
#[tokio::test]
async fn the_session_creation_limit_holds_across_instances() {
    let redis = RedisServer::start();
    let url = redis.url();
    let env = [
        ("SSE_ADAPTER", "redis"),
        ("REDIS_URL", url.as_str()),
        ("RATE_LIMIT_SESSIONS_PER_MIN", "3"),
    ];
    let a = Server::start(&env);
    let b = Server::start(&env);
    // Until an instance reaches Redis it counts in process (documented);
    // the shared budget is what this checks.
    for server in [&a, &b] {
        assert!(healthy(server).await, "{} never reached Redis", server.addr);
    }
    new_session(&a).await;
    new_session(&a).await;
    new_session(&b).await;
    let res = client().post(b.url("/sessions")).send().await.unwrap();
    assert_eq!(
        error_code(res).await,
        (429, "rate_limited".into()),
        "fallback checks: a {}, b {}",
        a.stats().await["rate_limit_fallback_checks"],
        b.stats().await["rate_limit_fallback_checks"]
    );
    assert_eq!(
        b.stats().await["rate_limit_fallback_checks"],
        0,
        "counted in Redis"
    );
}

/// Reads from `conn` until `needle` has arrived; returns all that was read.

// One HTTP/1 framer per connection: a stream opened as a later request of
// a kept-alive connection is hyper's (chunked, with hyper's `Date`), like
// every request after the first; only a connection's first head, with
// nothing after it, is served by the stream writer. Pipelined behind a
// publish with a body, the stream still opens once the publish is
// answered, and both streams get what is published next.
#[tokio::test]
async fn a_stream_on_a_kept_alive_connection_is_served_by_hyper() {
    let server = Server::start(&[]);
    let (id, token) = new_session(&server).await;
    let stream_head = format!(
        "GET /sessions/{id}/events?token={token} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    );

    // One request, its whole response, then the stream.
    let mut conn = connect(&server).await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut conn).await.0, 200);
    conn.write_all(stream_head.as_bytes()).await.unwrap();
    let got = read_until(&mut conn, "event: connected").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
    assert!(got.contains("date: "), "{got}");

    // Pipelined: a publish with a body and the stream in one write.
    let mut piped = connect(&server).await;
    let body = r#"{"text":"before the stream"}"#;
    let publish = format!(
        "POST /sessions/{id}/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    piped
        .write_all(format!("{publish}{stream_head}").as_bytes())
        .await
        .unwrap();
    let got = read_until(&mut piped, "event: connected").await;
    let (first, rest) = got.split_once("\r\n\r\n").unwrap();
    assert!(first.starts_with("HTTP/1.1 202"), "{got}");
    let stream = &rest[rest.find("HTTP/1.1 ").expect("the stream's response")..];
    assert!(stream.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");

    // Both streams get what is published next, and count as open.
    let ok = eventually(T, || async { server.stats().await["open_streams"] == 2 }).await;
    assert!(ok, "{}", server.stats().await);
    let res = post(
        &server,
        &token,
        &format!("/sessions/{id}/messages"),
        json!({ "text": "to both" }),
    )
    .await;
    assert_eq!(res.status(), 202);
    read_until(&mut conn, "to both").await;
    read_until(&mut piped, "to both").await;

    // A client that closes its end ends the stream.
    drop(conn);
    drop(piped);
    let ok = eventually(T, || async { server.stats().await["open_streams"] == 0 }).await;
    assert!(ok, "{}", server.stats().await);
}

// Fails before the fix: the listener kept the default backlog of 128, and
// the clients of a dead instance coming back at once overflowed it (each
// dropped SYN is retried only after a second).
#[tokio::test]
async fn the_listener_queues_a_burst_of_connects() {
    let server = Server::start(&[]);
    let port = server.addr.rsplit(':').next().unwrap().to_owned();
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    // LISTEN  Recv-Q  Send-Q(backlog)  local  peer
    let backlog: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no listener on :{port} in {text:?}"));
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(backlog, somaxconn.min(4096));
}

// A client that keeps sending on an open stream (nothing it sends after the
// request head means anything) has it read and dropped, a bounded amount
// per wake-up; its stream goes on, and the instance's tasks stay as few as
// when nobody sends.
#[tokio::test]
async fn bytes_sent_on_an_open_stream_are_dropped() {
    let server = Server::start(&[]);
    let (id, token) = new_session(&server).await;
    let mut conn = connect(&server).await;
    conn.write_all(
        format!("GET /sessions/{id}/events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    read_until(&mut conn, "event: connected").await;
    let (mut rd, mut wr) = conn.into_split();
    let junk = vec![b'x'; 64 * 1024];
    let sender = tokio::spawn(async move {
        // 16 MiB, far more than the socket's buffers: the server must keep
        // reading it.
        for _ in 0..256 {
            if wr.write_all(&junk).await.is_err() {
                return None;
            }
        }
        // Handed back, not dropped: dropping a write half shuts it down,
        // and a client that closed its side has left the stream.
        Some(wr)
    });
    let sent = tokio::time::timeout(T * 2, sender).await;
    let Ok(Ok(Some(_wr))) = sent else {
        panic!("the server stopped reading: {sent:?}");
    };
    let event = publish(&server, &id, &token, "note", json!({ "after": "junk" })).await;
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains(&event) {
        let n = tokio::time::timeout(T, rd.read(&mut buf))
            .await
            .expect("the event in time")
            .unwrap();
        assert!(n > 0, "stream closed: {got:?}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let stats = server.stats().await;
    assert_eq!(stats["open_streams"], 1, "{stats}");
    assert!(stats["tasks"].as_u64().unwrap() < 20, "{stats}");
}
