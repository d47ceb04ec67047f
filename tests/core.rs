//! Phase 1 end to end: a real `sse-scale` process, real HTTP, real streams.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn stream_opens_with_headers_retry_and_connected() {
    let server = Server::start(&[("INSTANCE_ID", "node-a"), ("SSE_RETRY_MS", "1500")]);
    let (id, token) = new_session(&server).await;
    let mut sse = SseClient::open(&server, &id, &token).await;
    let h = &sse.response_headers;
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    assert_eq!(h["x-instance-id"], "node-a");
    let retry = sse.next_block(T).await.unwrap();
    // SSE_RETRY_MS plus up to half of it again, per stream.
    let hint = retry.retry.expect("retry hint");
    assert!((1500..2250).contains(&hint), "retry hint {hint}");
    let connected = sse.next_event(T).await.unwrap();
    assert_eq!(connected.event.as_deref(), Some("connected"));
    assert_eq!(
        connected.json(),
        json!({ "instance_id": "node-a", "session_id": id, "heartbeat_ms": 15000 })
    );
    // A new session has no events yet: the stream starts from its
    // beginning, and `connected` says so as its id.
    assert_eq!(
        connected.id.as_deref(),
        Some("0-0"),
        "connected carries the position"
    );
}

#[tokio::test]
async fn every_route_delivers_in_publish_order_with_correct_framing() {
    let server = Server::start(&[]);
    let (id, token) = new_session(&server).await;
    let mut sse = SseClient::open(&server, &id, &token).await;
    sse.expect_connected().await;

    let base = format!("/sessions/{id}");
    let r = post(
        &server,
        &token,
        &format!("{base}/messages"),
        json!({ "text": "hello\nworld" }),
    )
    .await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["content-type"], "application/json");
    let published_id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Pretty-printed data spans lines: it must arrive as several data: lines
    // that reassemble to exactly what was sent.
    let raw = "{\n  \"n\": 1,\n  \"s\": \"a:b\"\n}";
    let r = client()
        .post(server.url(&format!("{base}/events")))
        .bearer_auth(&token)
        .body(format!("{{\"type\": \"worker_done\", \"data\": {raw}}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        post(
            &server,
            &token,
            &format!("{base}/workflow/replan"),
            json!({ "reason": "new job ad" })
        )
        .await
        .status(),
        202
    );
    let r = client()
        .put(server.url(&format!("{base}/workflow/preferences")))
        .bearer_auth(&token)
        .json(&json!({ "tone": "formal" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = post(
        &server,
        &token,
        &format!("{base}/pipeline"),
        json!({ "stages": ["research", "draft"], "sections_per_stage": 2, "step_ms": 10 }),
    )
    .await;
    assert_eq!(r.status(), 202);
    let run_id = r.json::<Value>().await.unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut events = Vec::new();
    loop {
        let ev = sse.next_event(T).await.expect("stream ended early");
        let done = ev.event.as_deref() == Some("pipeline_complete");
        events.push(ev);
        if done {
            break;
        }
    }
    let types: Vec<_> = events.iter().map(|e| e.event.clone().unwrap()).collect();
    assert_eq!(
        types,
        [
            "chat_message",
            "worker_done",
            "replan",
            "preferences_updated",
            "stage_start",
            "section_draft",
            "section_draft",
            "stage_complete",
            "stage_start",
            "section_draft",
            "section_draft",
            "stage_complete",
            "pipeline_complete",
        ]
    );
    assert_eq!(events[0].id.as_deref(), Some(published_id.as_str()));
    assert_eq!(
        events[0]
            .raw
            .lines()
            .filter(|l| l.starts_with("data:"))
            .count(),
        1,
        "JSON escapes the newline: {:?}",
        events[0].raw
    );
    assert_eq!(events[0].json(), json!({ "text": "hello\nworld" }));
    assert_eq!(
        events[1].data.as_deref(),
        Some(raw),
        "generic data arrives as given"
    );
    assert_eq!(
        events[1]
            .raw
            .lines()
            .filter(|l| l.starts_with("data:"))
            .count(),
        4
    );
    assert_eq!(events[2].json(), json!({ "reason": "new job ad" }));
    assert_eq!(
        events[3].json(),
        json!({ "preferences": { "tone": "formal" } })
    );
    assert_eq!(events[5].json()["run_id"], run_id.as_str());
    assert!(events[5].json()["text"]
        .as_str()
        .unwrap()
        .contains("research"));

    // Every event has an id; ids increase in publish order.
    let ids: Vec<(u64, u64)> = events
        .iter()
        .map(|e| {
            let (ms, seq) = e.id.as_deref().unwrap().split_once('-').unwrap();
            (ms.parse().unwrap(), seq.parse().unwrap())
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

#[tokio::test]
async fn sessions_do_not_see_each_other() {
    let server = Server::start(&[]);
    let (a, ta) = new_session(&server).await;
    let (b, tb) = new_session(&server).await;
    let mut sa = SseClient::open(&server, &a, &ta).await;
    let mut sb = SseClient::open(&server, &b, &tb).await;
    sa.expect_connected().await;
    sb.expect_connected().await;
    post(
        &server,
        &ta,
        &format!("/sessions/{a}/messages"),
        json!({ "text": "for a" }),
    )
    .await;
    post(
        &server,
        &tb,
        &format!("/sessions/{b}/messages"),
        json!({ "text": "for b" }),
    )
    .await;
    assert_eq!(sa.next_event(T).await.unwrap().json()["text"], "for a");
    assert_eq!(sb.next_event(T).await.unwrap().json()["text"], "for b");
    sa.expect_silence(Duration::from_millis(300)).await;
    sb.expect_silence(Duration::from_millis(300)).await;
}

async fn error_of(res: reqwest::Response) -> (u16, String) {
    let status = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(ct.as_deref(), Some("application/json"), "errors are JSON");
    let body: Value = res.json().await.unwrap();
    (
        status,
        body["error"]["code"]
            .as_str()
            .expect("error.code")
            .to_owned(),
    )
}

#[tokio::test]
async fn auth_is_required_and_bound_to_the_session() {
    let server = Server::start(&[]);
    let (a, ta) = new_session(&server).await;
    let (b, _) = new_session(&server).await;
    let c = client();
    let url = server.url(&format!("/sessions/{a}/messages"));
    let body = json!({ "text": "x" });
    assert_eq!(
        error_of(c.post(&url).json(&body).send().await.unwrap()).await,
        (401, "unauthorized".into())
    );
    let other = server.url(&format!("/sessions/{b}/messages"));
    assert_eq!(
        error_of(
            c.post(&other)
                .bearer_auth(&ta)
                .json(&body)
                .send()
                .await
                .unwrap()
        )
        .await,
        (403, "forbidden".into())
    );
    assert_eq!(
        error_of(
            c.post(&url)
                .bearer_auth("abc")
                .json(&body)
                .send()
                .await
                .unwrap()
        )
        .await,
        (403, "forbidden".into())
    );
    // A token from a server with another secret is refused too.
    let stream = server.url(&format!("/sessions/{b}/events"));
    assert_eq!(
        error_of(c.get(&stream).send().await.unwrap()).await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        error_of(c.get(format!("{stream}?token={ta}")).send().await.unwrap()).await,
        (403, "forbidden".into())
    );
    let bad = server.url("/sessions/not%20valid/events?token=x");
    assert_eq!(
        error_of(c.get(&bad).send().await.unwrap()).await,
        (400, "invalid_session_id".into())
    );
    assert_eq!(
        c.post(&url)
            .bearer_auth(&ta)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
}

#[tokio::test]
async fn bad_bodies_get_clear_json_errors() {
    let server = Server::start(&[("MAX_EVENT_BYTES", "1024")]);
    let (id, token) = new_session(&server).await;
    let mut sse = SseClient::open(&server, &id, &token).await;
    sse.expect_connected().await;
    let c = client();
    let events = server.url(&format!("/sessions/{id}/events"));
    let send = |body: String| c.post(&events).bearer_auth(&token).body(body).send();

    let big = json!({ "type": "t", "data": "x".repeat(2000) }).to_string();
    assert_eq!(
        error_of(send(big).await.unwrap()).await,
        (413, "payload_too_large".into())
    );
    // Larger than the body limit itself: refused on Content-Length alone.
    let huge = json!({ "type": "t", "data": "x".repeat(6000) }).to_string();
    assert_eq!(
        error_of(send(huge).await.unwrap()).await,
        (413, "payload_too_large".into())
    );
    assert_eq!(
        error_of(send("{not json".into()).await.unwrap()).await,
        (400, "invalid_json".into())
    );
    assert_eq!(
        error_of(send(json!({ "data": 1 }).to_string()).await.unwrap()).await,
        (400, "invalid_json".into())
    );
    for ty in ["a\nb", "a\rb", "id:1", ""] {
        let body = json!({ "type": ty, "data": 1 }).to_string();
        assert_eq!(
            error_of(send(body).await.unwrap()).await,
            (400, "invalid_event_type".into()),
            "{ty:?}"
        );
    }
    // The stream's own events: a client would take a forged one for the
    // protocol's (move its position, reload its state); EventSource's own
    // `open` and `error` (an `error` passed for a broken connection and
    // wedged the browser client); the client's wildcard `*`. Announcements
    // refuse them too.
    let announce = server.url("/announcements");
    for ty in ["connected", "reset", "heartbeat", "open", "error", "*"] {
        let body = json!({ "type": ty, "data": { "last_event_id": "9-9" } }).to_string();
        let refused = send(body.clone()).await.unwrap();
        assert_eq!(refused.status(), 400, "{ty:?}");
        let error: Value = refused.json().await.unwrap();
        assert_eq!(error["error"]["code"], "reserved_event_type", "{ty:?}");
        let text = error["error"]["message"].as_str().unwrap_or_default();
        assert!(text.contains(ty), "the message names {ty:?}: {text}");
        let by_admin = c
            .post(&announce)
            .bearer_auth(ADMIN)
            .body(body)
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_of(by_admin).await,
            (400, "reserved_event_type".into()),
            "announcement {ty:?}"
        );
    }
    // `message` is what an event without `event:` is: allowed.
    assert_eq!(
        send(json!({ "type": "message", "data": 1 }).to_string())
            .await
            .unwrap()
            .status(),
        202
    );
    let message = sse.next_event(T).await.unwrap();
    assert_eq!(message.event.as_deref(), Some("message"), "{message:?}");
    publish(&server, &id, &token, "after", json!(1)).await;
    let next = sse.next_event(T).await.unwrap();
    assert_eq!(next.event.as_deref(), Some("after"), "{next:?}");
    let pipe = server.url(&format!("/sessions/{id}/pipeline"));
    let r = c
        .post(&pipe)
        .bearer_auth(&token)
        .json(&json!({ "stages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await, (400, "invalid_pipeline".into()));
    assert_eq!(
        error_of(c.get(server.url("/nope")).send().await.unwrap()).await,
        (404, "not_found".into())
    );
    // Nothing bad reached the stream, and it is still up.
    sse.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(
        send(json!({ "type": "ok", "data": 1 }).to_string())
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        sse.next_event(T).await.unwrap().event.as_deref(),
        Some("ok")
    );
}

#[tokio::test]
async fn a_dropped_client_frees_its_entry() {
    let server = Server::start(&[]);
    let (id, token) = new_session(&server).await;
    let mut sse = SseClient::open(&server, &id, &token).await;
    sse.expect_connected().await;
    let stats = server.stats().await;
    assert_eq!(
        (
            stats["open_streams"].as_u64(),
            stats["sessions_with_subscribers"].as_u64()
        ),
        (Some(1), Some(1))
    );
    drop(sse);
    // The server notices the closed socket on its next write (a heartbeat or
    // an event); publish to make that happen now.
    let freed = eventually(T, || async {
        post(
            &server,
            &token,
            &format!("/sessions/{id}/messages"),
            json!({ "text": "x" }),
        )
        .await;
        let s = server.stats().await;
        s["open_streams"] == 0 && s["sessions_with_subscribers"] == 0 && s["subscribers"] == 0
    })
    .await;
    assert!(freed, "entry not freed: {}", server.stats().await);
}

#[tokio::test]
async fn heartbeats_arrive_on_idle_streams() {
    let server = Server::start(&[("SSE_HEARTBEAT_SECS", "1")]);
    let (id, token) = new_session(&server).await;
    let mut sse = SseClient::open(&server, &id, &token).await;
    sse.expect_connected().await;
    for _ in 0..2 {
        let block = sse.next_block(Duration::from_millis(2500)).await.unwrap();
        assert!(block.comment && block.event.is_none(), "{block:?}");
    }
}

/// `EventSource` sees no comment: a stream opened with
/// `?heartbeat=event` gets `heartbeat` events (no id, so a client's last
/// id stays) on the same interval, which `connected` announces.
#[tokio::test]
async fn heartbeat_events_on_request_with_the_interval_in_connected() {
    let server = Server::start(&[("SSE_HEARTBEAT_SECS", "1")]);
    let (id, token) = new_session(&server).await;
    let url = server.url(&format!(
        "/sessions/{id}/events?token={token}&heartbeat=event"
    ));
    let res = client().get(url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut sse = SseClient::from_response(res);
    let connected = sse.expect_connected().await;
    assert_eq!(connected.json()["heartbeat_ms"], 1000, "{connected:?}");
    for _ in 0..2 {
        let block = sse.next_block(Duration::from_millis(2500)).await.unwrap();
        assert_eq!(block.raw, "event: heartbeat\ndata:", "{block:?}");
        assert_eq!(block.id, None);
    }
    // Without the parameter: comments, as before.
    let mut plain = SseClient::open(&server, &id, &token).await;
    plain.expect_connected().await;
    let block = plain.next_block(Duration::from_millis(2500)).await.unwrap();
    assert!(block.comment && block.event.is_none(), "{block:?}");
}

/// A large herd is told to come back spread out: with `SSE_RESUME_RATE`
/// 1/s, a stream held with four others is told up to 5 s of extra, and the
/// stream that opened alone (told up to 1 s) gets the wider hint on its next
/// heartbeat instead of a comment; after that, comments again.
#[tokio::test]
async fn the_retry_hint_grows_with_the_herd_and_is_refreshed_on_a_heartbeat() {
    let server = Server::start(&[
        ("SSE_HEARTBEAT_SECS", "1"),
        ("SSE_RETRY_MS", "1000"),
        ("SSE_RESUME_RATE", "1"),
    ]);
    let (id, token) = new_session(&server).await;
    let mut first = SseClient::open(&server, &id, &token).await;
    let hint = first
        .next_block(T)
        .await
        .unwrap()
        .retry
        .expect("retry hint");
    assert!((1000..=2000).contains(&hint), "alone: hint {hint}");
    assert_eq!(
        first.next_event(T).await.unwrap().event.as_deref(),
        Some("connected")
    );
    let mut herd = Vec::new();
    for _ in 0..4 {
        let mut sse = SseClient::open(&server, &id, &token).await;
        let hint = sse.next_block(T).await.unwrap().retry.expect("retry hint");
        assert!((1000..=6000).contains(&hint), "in a herd: hint {hint}");
        assert_eq!(
            sse.next_event(T).await.unwrap().event.as_deref(),
            Some("connected")
        );
        herd.push(sse);
    }
    // The first stream's heartbeats: a fresh hint for the larger herd (two
    // if a heartbeat fell between the opens), then comments.
    let mut hints = Vec::new();
    let mut comments = 0;
    while comments < 2 {
        let block = first.next_block(Duration::from_millis(2500)).await.unwrap();
        match block.retry {
            Some(ms) => hints.push(ms),
            None => {
                assert!(block.comment && block.event.is_none(), "{block:?}");
                comments += 1;
            }
        }
    }
    assert!(!hints.is_empty(), "no fresh hint on a heartbeat");
    assert!(
        hints.iter().all(|ms| (1000..=6000).contains(ms)),
        "refreshed hints {hints:?}"
    );
}

// Fails before the change: every open stream kept its connection's task
// while it waited (docs/benchmarks.md: most of an idle stream's memory
// after its socket). A waiting stream now holds none, and still gets its
// heartbeats, its events and its end.
#[tokio::test]
async fn waiting_streams_hold_no_task() {
    const STREAMS: u64 = 40;
    let server = Server::start(&[("SSE_HEARTBEAT_SECS", "1")]);
    let (id, token) = new_session(&server).await;
    let tasks = || async { server.stats().await["tasks"].as_u64().unwrap() };
    let before = tasks().await;
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut sse = SseClient::open(&server, &id, &token).await;
        sse.expect_connected().await;
        streams.push(sse);
    }
    let parked = eventually(T, || async { tasks().await < before + STREAMS / 4 }).await;
    assert!(
        parked,
        "tasks {} with {STREAMS} streams, {before} before",
        tasks().await
    );
    // Heartbeats, then an event, reach every stream while it waits.
    for sse in &mut streams {
        let block = sse.next_block(Duration::from_millis(2500)).await.unwrap();
        assert!(block.comment && block.event.is_none(), "{block:?}");
    }
    let event = publish(&server, &id, &token, "note", json!({ "n": 1 })).await;
    for sse in &mut streams {
        let got = sse.next_event(T).await.unwrap();
        assert_eq!(got.id.as_deref(), Some(event.as_str()));
    }
    assert!(
        tasks().await < before + STREAMS / 4,
        "tasks {}",
        tasks().await
    );
    assert_eq!(server.stats().await["open_streams"], STREAMS);
    // A client closing ends its stream.
    drop(streams);
    let ended = eventually(T, || async { server.stats().await["open_streams"] == 0 }).await;
    assert!(ended, "{}", server.stats().await);
}

#[tokio::test]
async fn pipeline_gate_pauses_and_resumes() {
    let server = Server::start(&[]);
    let (id, token) = new_session(&server).await;
    let mut sse = SseClient::open(&server, &id, &token).await;
    sse.expect_connected().await;
    let pipeline = format!("/sessions/{id}/pipeline");
    let start = |gate: bool| {
        post(
            &server,
            &token,
            &pipeline,
            json!({ "stages": ["draft"], "sections_per_stage": 1, "step_ms": 10, "gate": gate }),
        )
    };
    let run: Value = start(true).await.json().await.unwrap();
    let run_id = run["run_id"].as_str().unwrap();
    let gate_url = format!("/sessions/{id}/pipeline/{run_id}/gate");
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("gate_waiting") {
        seen.push(sse.next_event(T).await.unwrap().event.unwrap());
    }
    assert_eq!(
        seen,
        [
            "stage_start",
            "section_draft",
            "stage_complete",
            "gate_waiting"
        ]
    );
    sse.expect_silence(Duration::from_millis(400)).await;

    let unknown = post(
        &server,
        &token,
        &format!("/sessions/{id}/pipeline/nope/gate"),
        json!({ "approve": true }),
    )
    .await;
    assert_eq!(error_of(unknown).await, (404, "not_found".into()));
    let r = post(
        &server,
        &token,
        &gate_url,
        json!({ "approve": true, "feedback": "ship it" }),
    )
    .await;
    assert_eq!(r.status(), 202);
    let resolved = sse.next_event(T).await.unwrap();
    assert_eq!(resolved.event.as_deref(), Some("gate_resolved"));
    assert_eq!(resolved.json()["feedback"], "ship it");
    assert_eq!(
        sse.next_event(T).await.unwrap().event.as_deref(),
        Some("pipeline_complete")
    );
    // The run is over: its gate is gone.
    let again = post(&server, &token, &gate_url, json!({ "approve": true })).await;
    assert_eq!(error_of(again).await, (404, "not_found".into()));

    // Rejection cancels the run.
    let run: Value = start(true).await.json().await.unwrap();
    let run_id = run["run_id"].as_str().unwrap();
    while sse.next_event(T).await.unwrap().event.as_deref() != Some("gate_waiting") {}
    let r = post(
        &server,
        &token,
        &format!("/sessions/{id}/pipeline/{run_id}/gate"),
        json!({ "approve": false }),
    )
    .await;
    assert_eq!(r.status(), 202);
    assert_eq!(
        sse.next_event(T).await.unwrap().event.as_deref(),
        Some("gate_resolved")
    );
    let cancelled = sse.next_event(T).await.unwrap();
    assert_eq!(cancelled.event.as_deref(), Some("pipeline_cancelled"));
    assert_eq!(cancelled.json()["reason"], "rejected_at_gate");
}

#[tokio::test]
async fn gate_before_the_run_reaches_it_is_a_conflict() {
    let server = Server::start(&[]);
    let (id, token) = new_session(&server).await;
    let run: Value = post(
        &server,
        &token,
        &format!("/sessions/{id}/pipeline"),
        json!({ "stages": ["a"], "sections_per_stage": 50, "step_ms": 100, "gate": true }),
    )
    .await
    .json()
    .await
    .unwrap();
    let run_id = run["run_id"].as_str().unwrap();
    let r = post(
        &server,
        &token,
        &format!("/sessions/{id}/pipeline/{run_id}/gate"),
        json!({ "approve": true }),
    )
    .await;
    assert_eq!(error_of(r).await, (409, "not_at_gate".into()));
    let r = client()
        .delete(server.url(&format!("/sessions/{id}/pipeline/{run_id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(eventually(T, || async { server.stats().await["pipeline_runs"] == 0 }).await);
}

// A log line that meets a closed stderr (the process supervisor's reader
// went away) is lost; it must not take the task that wrote it down, and
// the signal task logs first thing on SIGTERM.
#[tokio::test]
async fn sigterm_still_stops_the_server_after_its_stderr_closed() {
    let mut server = Server::start_then_close_stderr(&[
        ("SHUTDOWN_UNREADY_SECS", "0"),
        ("SHUTDOWN_DRAIN_SECS", "0"),
        ("RUST_LOG", "debug"),
    ]);
    // Requests log too (at debug): the pipe is found closed before the
    // signal comes.
    let (id, token) = new_session(&server).await;
    let mut sse = SseClient::open(&server, &id, &token).await;
    sse.expect_connected().await;
    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn sigterm_drains_then_closes_streams_with_retry_hints_and_exits() {
    let mut server = Server::start(&[
        ("SHUTDOWN_GRACE_SECS", "5"),
        // Streams start closing at once (no balancer to leave first).
        ("SHUTDOWN_UNREADY_SECS", "0"),
        ("SHUTDOWN_DRAIN_SECS", "1"),
        ("SSE_RETRY_MS", "1000"),
    ]);
    let (id, token) = new_session(&server).await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut sse = SseClient::open(&server, &id, &token).await;
        sse.expect_connected().await;
        streams.push(sse);
    }
    let started = std::time::Instant::now();
    server.signal("TERM");
    // Unready at once; new streams refused; publishing still works.
    let c = client();
    assert!(
        eventually(T, || async {
            c.get(server.url("/readyz"))
                .send()
                .await
                .map(|r| r.status() == 503)
                .unwrap_or(false)
        })
        .await
    );
    let refused = c
        .get(server.url(&format!("/sessions/{id}/events?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        post(
            &server,
            &token,
            &format!("/sessions/{id}/messages"),
            json!({ "text": "late" })
        )
        .await
        .status(),
        202
    );
    for sse in &mut streams {
        assert_eq!(sse.next_event(T).await.unwrap().json()["text"], "late");
        // A jittered retry hint (between 1x and 2x SSE_RETRY_MS), then the end.
        let hint = sse.next_block(T).await.expect("retry hint before close");
        let retry = hint.retry.expect("retry field");
        assert!((1000..=2000).contains(&retry), "{retry}");
        assert!(
            sse.next_block(T).await.is_none(),
            "stream must end after the hint"
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "closed within the window: {:?}",
        started.elapsed()
    );
    assert_eq!(server.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn streams_beyond_max_streams_get_503() {
    let server = Server::start(&[("MAX_STREAMS", "2")]);
    let (id, token) = new_session(&server).await;
    let mut a = SseClient::open(&server, &id, &token).await;
    let mut b = SseClient::open(&server, &id, &token).await;
    a.expect_connected().await;
    b.expect_connected().await;
    let res = client()
        .get(server.url(&format!("/sessions/{id}/events?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned())
            .as_deref(),
        Some("2")
    );
    assert_eq!(error_of(res).await, (503, "unavailable".into()));
    assert_eq!(server.stats().await["streams_refused"], 1);
}

// The browser client's probe: HEAD tells what a stream open would get now
// without opening one.
#[tokio::test]
async fn head_on_a_stream_answers_its_status_without_opening_it() {
    let server = Server::start(&[("MAX_STREAMS", "1")]);
    let (id, token) = new_session(&server).await;
    let url = server.url(&format!("/sessions/{id}/events?token={token}"));
    let res = client()
        .head(&url)
        .header("last-event-id", "1-0")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let stats = server.stats().await;
    assert_eq!(stats["open_streams"], 0, "{stats}");
    assert_eq!(stats["resumes"], 0, "a probe is not a resume: {stats}");
    assert_eq!(stats["resets"], 0, "{stats}");
    let mut only = SseClient::open(&server, &id, &token).await;
    only.expect_connected().await;
    let full = client().head(&url).send().await.unwrap();
    assert_eq!(full.status(), 503);
    assert_eq!(full.headers()["retry-after"], "2");
    let wrong = client()
        .head(server.url(&format!("/sessions/{id}/events?token=nope")))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403, "a token that is not this session's");
}

#[tokio::test]
async fn health_ready_and_stats() {
    let server = Server::start(&[("INSTANCE_ID", "node-s")]);
    let c = client();
    assert_eq!(
        c.get(server.url("/healthz")).send().await.unwrap().status(),
        200
    );
    let ready = c.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.headers()["x-instance-id"], "node-s");
    let stats = server.stats().await;
    assert_eq!(stats["instance_id"], "node-s");
    assert_eq!(stats["mode"], "local");
    assert_eq!(stats["open_streams"], 0);
}

#[test]
fn bad_configuration_exits_with_code_2_and_names_the_variable() {
    let run = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sse-scale"))
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[("PORT", "eighty")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("PORT") || err.contains("--port"), "{err}");
    let (code, err) = run(&[("SSE_HEARTBEAT_SECS", "0")]);
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = run(&[("SSE_ADAPTER", "redis")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("REDIS_URL"), "{err}");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_sse-scale"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for var in [
        "PORT",
        "INSTANCE_ID",
        "SESSION_SECRET",
        "SSE_HEARTBEAT_SECS",
        "MAX_EVENT_BYTES",
        "SSE_ADAPTER",
        "REDIS_URL",
    ] {
        assert!(help.contains(var), "--help lists {var}");
    }
}

#[tokio::test]
async fn affinity_cookie_names_the_instance() {
    // The test client stands for the balancer: `X-Forwarded-Proto` is
    // believed from it only.
    let server = Server::start(&[("INSTANCE_ID", "node-c"), ("TRUSTED_PROXIES", "127.0.0.1")]);
    let c = client();
    let res = c.post(server.url("/sessions")).send().await.unwrap();
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("sse_affinity=node-c"), "{cookie}");
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attr), "{attr} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "{cookie}");
    let body: Value = res.json().await.unwrap();
    let (id, token) = (
        body["id"].as_str().unwrap(),
        body["token"].as_str().unwrap(),
    );

    // Behind TLS, and on stream open (re-pinning a client that was on another instance).
    let res = c
        .get(server.url(&format!("/sessions/{id}/events?token={token}")))
        .header("x-forwarded-proto", "https")
        .header("cookie", "sse_affinity=node-dead")
        .send()
        .await
        .unwrap();
    let cookie = res.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.starts_with("sse_affinity=node-c") && cookie.contains("Secure"),
        "{cookie}"
    );

    // From anyone else the header is anyone's to write: ignored.
    let untrusted = Server::start(&[("INSTANCE_ID", "node-d")]);
    let res = c
        .post(untrusted.url("/sessions"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    let cookie = res.headers()["set-cookie"].to_str().unwrap();
    assert!(!cookie.contains("Secure"), "{cookie}");

    let off = Server::start(&[("AFFINITY_COOKIE", "")]);
    let res = c.post(off.url("/sessions")).send().await.unwrap();
    assert!(res.headers().get("set-cookie").is_none());
}

/// Streams are served two ways (see routes/src/serve.rs): by a dedicated
/// writer when the stream is a connection's first request, by hyper when it
/// comes later on a keep-alive connection. Both must behave the same, and a
/// request head that arrives in pieces must still be understood.
#[tokio::test]
async fn streams_work_on_new_and_reused_connections_and_with_split_heads() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = Server::start(&[("INSTANCE_ID", "node-a")]);
    let (id, token) = new_session(&server).await;

    // A client that first asks for /healthz, then opens the stream on the
    // same connection (reqwest keeps one idle connection per host).
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    assert_eq!(
        http.get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let res = http
        .get(server.url(&format!("/sessions/{id}/events?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert_eq!(res.headers()["x-instance-id"], "node-a");
    let mut reused = SseClient::from_response(res);
    reused.expect_connected().await;

    // A raw client whose head arrives in three pieces.
    let mut raw = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let head = format!(
        "GET /sessions/{id}/events?token={token} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    );
    let (a, rest) = head.split_at(10);
    let (b, c) = rest.split_at(rest.len() / 2);
    for part in [a, b, c] {
        raw.write_all(part.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // A fresh stream through reqwest (new connection) as well.
    let mut fresh = SseClient::open(&server, &id, &token).await;
    fresh.expect_connected().await;
    let ok = eventually(T, || async { server.stats().await["open_streams"] == 3 }).await;
    assert!(ok, "{}", server.stats().await);

    let res = post(
        &server,
        &token,
        &format!("/sessions/{id}/messages"),
        json!({ "text": "to all three" }),
    )
    .await;
    assert_eq!(res.status(), 202);
    for sse in [&mut reused, &mut fresh] {
        let ev = sse.next_event(T).await.unwrap();
        assert_eq!(ev.json()["text"], "to all three");
    }
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + T;
    while !got.contains("to all three") {
        let n = tokio::time::timeout_at(deadline, raw.read(&mut buf))
            .await
            .expect("raw client got the event in time")
            .unwrap();
        assert!(n > 0, "stream closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("content-type: text/event-stream\r\n"), "{got}");
    assert!(got.contains("event: connected"), "{got}");

    // Errors on the dedicated path are the same JSON errors.
    let mut bad = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    bad.write_all(format!("GET /sessions/{id}/events HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    bad.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\"code\":\"unauthorized\""), "{answer}");
}

// Fails before the fix: a draining instance accepted publishes for
// sessions whose stream it no longer held (flag off: nobody would ever
// receive them), and it closed streams the moment SIGTERM arrived, while
// the balancer still sent it requests.
#[tokio::test]
async fn a_draining_instance_leaves_the_pool_before_streams_close_and_refuses_orphan_publishes() {
    let mut server = Server::start(&[
        ("SHUTDOWN_UNREADY_SECS", "2"),
        ("SHUTDOWN_DRAIN_SECS", "1"),
        ("SHUTDOWN_GRACE_SECS", "10"),
    ]);
    let (held, held_token) = new_session(&server).await;
    let (orphan, orphan_token) = new_session(&server).await;
    let mut sse = SseClient::open(&server, &held, &held_token).await;
    sse.expect_connected().await;
    let started = std::time::Instant::now();
    server.signal("TERM");
    let c = client();
    assert!(
        eventually(T, || async {
            c.get(server.url("/readyz"))
                .send()
                .await
                .map(|r| r.status() == 503)
                .unwrap_or(false)
        })
        .await
    );
    // Unready, but the stream stays open: the balancer takes the instance
    // out first.
    assert_eq!(
        message(&server, &held, &held_token, "still here")
            .await
            .status(),
        202
    );
    assert_eq!(
        sse.next_event(T).await.unwrap().json()["text"],
        "still here"
    );
    let orphaned = message(&server, &orphan, &orphan_token, "for nobody").await;
    assert_eq!(
        orphaned.status(),
        503,
        "a publish nobody here could receive"
    );
    assert!(orphaned.headers().contains_key("retry-after"));
    // The stream closes only after the unready period.
    let hint = sse.next_block(T).await.expect("the retry hint");
    assert!(hint.retry.is_some());
    assert!(sse.next_block(T).await.is_none());
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "closed after {:?}",
        started.elapsed()
    );
    // With no stream left, it exits without waiting out the window.
    assert_eq!(server.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

// Fails before the fix: every health check a draining instance answered
// with 503 was logged as an ERROR.
#[tokio::test]
async fn a_drain_logs_no_errors() {
    let mut server = Server::start(&[
        ("SHUTDOWN_UNREADY_SECS", "1"),
        ("SHUTDOWN_DRAIN_SECS", "1"),
        ("SHUTDOWN_GRACE_SECS", "5"),
    ]);
    server.signal("TERM");
    let c = client();
    for _ in 0..5 {
        let _ = c.get(server.url("/readyz")).send().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.wait_exit(Duration::from_secs(5)), Some(0));
    let log = server.log.lock().unwrap().clone();
    assert!(log.contains("unready"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

/// The demo page and its files come with a policy that lets the page load
/// only its own files and be framed by nobody; the page has no inline
/// script or style the policy would block.
#[tokio::test]
async fn the_page_is_served_with_a_content_security_policy_it_obeys() {
    let server = Server::start(&[]);
    for path in ["/", "/app.js", "/style.css", "/sse-scale.js"] {
        let res = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let h = res.headers().clone();
        let policy = h["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'self'",
            "script-src 'self'",
            "object-src 'none'",
            "frame-ancestors 'none'",
        ] {
            assert!(policy.contains(directive), "{path}: {policy}");
        }
        assert!(!policy.contains("unsafe"), "{path}: {policy}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        if path == "/" {
            let html = res.text().await.unwrap();
            for tag in html.split("<script").skip(1) {
                let (attributes, rest) = tag.split_once('>').unwrap();
                assert!(attributes.contains("src="), "inline script: <script{tag}");
                assert!(rest.starts_with("</script>"), "inline script: <script{tag}");
            }
            assert!(
                !html.contains("<style") && !html.contains(" style="),
                "inline style"
            );
            assert!(
                !html.contains(" onclick=") && !html.contains(" onload="),
                "inline handler"
            );
        }
    }
}
