//! Phase 2 end to end: several real `sse-scale` processes sharing a real
//! `redis-server` that each test starts on its own port (and may kill and
//! restart).

#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::time::Duration;

use redis_server::RedisServer;
use serde_json::{json, Value};
use support::*;

const T: Duration = Duration::from_secs(5);

fn instance(redis: &RedisServer, name: &str, flag: bool) -> Server {
    let flag = if flag { "true" } else { "false" };
    Server::start(&[
        ("REDIS_URL", &redis.url()),
        ("INSTANCE_ID", name),
        ("FF_REDIS_SSE_BROADCAST", flag),
        ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
    ])
}

/// Reads events until `n` arrived; returns (type, id, text-or-data).
async fn take(sse: &mut SseClient, n: usize) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        let ev = sse
            .next_event(T)
            .await
            .unwrap_or_else(|| panic!("stream ended after {out:?}"));
        out.push((
            ev.event.clone().unwrap(),
            ev.id.clone().unwrap_or_default(),
            ev.json(),
        ));
    }
    out
}

#[tokio::test]
async fn every_route_crosses_instances_once_and_in_order_when_the_flag_is_on() {
    let redis = RedisServer::start();
    let a = instance(&redis, "a", true);
    let b = instance(&redis, "b", true);
    let (id, token) = new_session(&a).await;
    let mut on_a = SseClient::open(&a, &id, &token).await;
    let mut on_b = SseClient::open(&b, &id, &token).await;
    on_a.expect_connected().await;
    on_b.expect_connected().await;

    let base = format!("/sessions/{id}");
    assert_eq!(message(&b, &id, &token, "one").await.status(), 202);
    let r = post(
        &b,
        &token,
        &format!("{base}/events"),
        json!({ "type": "worker_done", "data": { "n": 2 } }),
    )
    .await;
    assert_eq!(r.status(), 202);
    assert_eq!(
        post(
            &b,
            &token,
            &format!("{base}/workflow/replan"),
            json!({ "reason": "r" })
        )
        .await
        .status(),
        202
    );
    let r = client()
        .put(b.url(&format!("{base}/workflow/preferences")))
        .bearer_auth(&token)
        .json(&json!({ "tone": "warm" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // One published on A itself: served locally, its Redis echo dropped.
    assert_eq!(message(&a, &id, &token, "from a").await.status(), 202);
    let r = post(
        &b,
        &token,
        &format!("{base}/pipeline"),
        json!({ "stages": ["s1"], "sections_per_stage": 2, "step_ms": 10 }),
    )
    .await;
    assert_eq!(r.status(), 202);

    let expected = [
        "chat_message",
        "worker_done",
        "replan",
        "preferences_updated",
        "chat_message",
        "stage_start",
        "section_draft",
        "section_draft",
        "stage_complete",
        "pipeline_complete",
    ];
    let got_a = take(&mut on_a, expected.len()).await;
    let got_b = take(&mut on_b, expected.len()).await;
    let types: Vec<_> = got_a.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(types, expected);
    assert_eq!(
        got_a, got_b,
        "both instances deliver the same events with the same ids"
    );
    assert_eq!(got_a[1].2, json!({ "n": 2 }));
    // Ids are Redis stream ids: ordered per session across instances.
    let ids: Vec<(u64, u64)> = got_a
        .iter()
        .map(|e| {
            let (ms, seq) = e.1.split_once('-').unwrap();
            (ms.parse().unwrap(), seq.parse().unwrap())
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    on_a.expect_silence(Duration::from_millis(300)).await;
    on_b.expect_silence(Duration::from_millis(300)).await;

    let stats = a.stats().await;
    assert_eq!(stats["mode"], "redis");
    // The instance's own events reach its streams from the subscriber
    // connection too (that is what keeps ids in order); each arrived once,
    // as the silence above shows.
    assert!(
        stats["redis"]["own_received"].as_u64() >= Some(1),
        "{stats}"
    );
    assert!(stats["redis"]["received"].as_u64() >= Some(9), "{stats}");
}

#[tokio::test]
async fn flag_off_keeps_events_on_the_publishing_instance() {
    let redis = RedisServer::start();
    let a = instance(&redis, "a", false);
    let b = instance(&redis, "b", false);
    let (id, token) = new_session(&a).await;
    let mut on_a = SseClient::open(&a, &id, &token).await;
    let mut on_b = SseClient::open(&b, &id, &token).await;
    on_a.expect_connected().await;
    on_b.expect_connected().await;
    assert_eq!(message(&b, &id, &token, "local only").await.status(), 202);
    let ev = on_b.next_event(T).await.unwrap();
    assert_eq!(ev.json(), json!({ "text": "local only" }));
    on_a.expect_silence(Duration::from_millis(500)).await;
    // Subscribed anyway (so a fleet mid-toggle never loses flagged events),
    // but nothing was published to Redis.
    assert_eq!(b.stats().await["redis"]["published_redis"], 0);
    assert_eq!(a.stats().await["redis"]["subscribed_channels"], 1);
    assert_eq!(
        a.stats().await["flag"]["state"],
        json!({ "enabled": false, "source": "env" })
    );
}

#[tokio::test]
async fn a_mixed_fleet_delivers_flagged_events_everywhere_and_nothing_twice() {
    let redis = RedisServer::start();
    let on = instance(&redis, "on", true);
    let off = instance(&redis, "off", false);
    let (id, token) = new_session(&on).await;
    let mut at_on = SseClient::open(&on, &id, &token).await;
    let mut at_off = SseClient::open(&off, &id, &token).await;
    at_on.expect_connected().await;
    at_off.expect_connected().await;

    assert_eq!(message(&on, &id, &token, "flagged").await.status(), 202);
    assert_eq!(at_on.next_event(T).await.unwrap().json()["text"], "flagged");
    assert_eq!(
        at_off.next_event(T).await.unwrap().json()["text"],
        "flagged"
    );
    assert_eq!(message(&off, &id, &token, "unflagged").await.status(), 202);
    assert_eq!(
        at_off.next_event(T).await.unwrap().json()["text"],
        "unflagged"
    );
    at_on.expect_silence(Duration::from_millis(500)).await;
    at_off.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn redis_outage_keeps_local_delivery_and_cross_instance_resumes() {
    let mut redis = RedisServer::start();
    let a = instance(&redis, "a", true);
    let b = instance(&redis, "b", true);
    let (id, token) = new_session(&a).await;
    let mut on_a = SseClient::open(&a, &id, &token).await;
    let mut on_b = SseClient::open(&b, &id, &token).await;
    on_a.expect_connected().await;
    on_b.expect_connected().await;
    assert_eq!(message(&a, &id, &token, "before").await.status(), 202);
    assert_eq!(on_b.next_event(T).await.unwrap().json()["text"], "before");
    on_a.next_event(T).await.unwrap();

    redis.stop();
    let r = message(&a, &id, &token, "during").await;
    assert_eq!(r.status(), 202, "no 5xx while Redis is down");
    assert_eq!(on_a.next_event(T).await.unwrap().json()["text"], "during");
    assert!(a.stats().await["redis"]["fallback_local"].as_u64() >= Some(1));

    redis.restart();
    // Cross-instance delivery comes back without restarting the servers.
    wait_subscribed(&b, 1).await;
    let mut n = 0;
    let resumed = loop {
        n += 1;
        assert!(n < 40, "cross-instance delivery did not resume");
        let r = message(&a, &id, &token, &format!("after-{n}")).await;
        assert!(r.status().is_success(), "{}", r.status());
        let ev = on_a.next_event(T).await.unwrap();
        assert_eq!(ev.json()["text"], format!("after-{n}"));
        if a.stats().await["redis"]["published_redis"].as_u64() >= Some(2) {
            break format!("after-{n}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // B sees the first event that went through Redis after recovery.
    loop {
        let ev = on_b.next_event(Duration::from_secs(10)).await.unwrap();
        if ev.json()["text"] == resumed.as_str() {
            break;
        }
    }
}

#[tokio::test]
async fn malformed_and_foreign_messages_are_counted_and_dropped() {
    let redis = RedisServer::start();
    let a = instance(&redis, "a", true);
    let (id, token) = new_session(&a).await;
    let mut sse = SseClient::open(&a, &id, &token).await;
    sse.expect_connected().await;
    let mut conn = redis.conn();
    let channel = format!("sse:session:{id}");
    let publish = |conn: &mut redis::Connection, payload: &str| {
        redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query::<i64>(conn)
            .unwrap()
    };
    assert_eq!(publish(&mut conn, "not json at all"), 1);
    publish(&mut conn, "\u{0}\u{1}");
    publish(
        &mut conn,
        r#"{"v":1,"node":"x","id":"1-1","type":"bad\ntype","data":"1"}"#,
    );
    publish(
        &mut conn,
        r#"{"v":2,"node":"x","id":"1-1","type":"t","data":"1"}"#,
    );
    publish(
        &mut conn,
        r#"{"v":1,"node":"elsewhere","id":"5-0","type":"ok","data":"{\"fine\":true}"}"#,
    );
    let ev = sse.next_event(T).await.unwrap();
    assert_eq!(ev.event.as_deref(), Some("ok"));
    assert_eq!(ev.id.as_deref(), Some("5-0"));
    assert_eq!(ev.json(), json!({ "fine": true }));
    let stats = a.stats().await;
    assert_eq!(stats["redis"]["malformed_dropped"], 3, "{stats}");
    assert_eq!(stats["redis"]["foreign_version_dropped"], 1, "{stats}");
    // The subscriber task survived: real events still flow.
    assert_eq!(message(&a, &id, &token, "still up").await.status(), 202);
    assert_eq!(sse.next_event(T).await.unwrap().json()["text"], "still up");
}

#[tokio::test]
async fn channels_are_per_session_and_released_after_the_last_subscriber() {
    let redis = RedisServer::start();
    let a = instance(&redis, "a", true);
    let (id, token) = new_session(&a).await;
    let channel = format!("sse:session:{id}");
    let mut conn = redis.conn();
    let numsub = |conn: &mut redis::Connection| -> i64 {
        let v: (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query(conn)
            .unwrap();
        v.1
    };
    assert_eq!(numsub(&mut conn), 0);
    let mut first = SseClient::open(&a, &id, &token).await;
    first.expect_connected().await;
    let mut second = SseClient::open(&a, &id, &token).await;
    second.expect_connected().await;
    assert_eq!(
        numsub(&mut conn),
        1,
        "one subscription per session, however many streams"
    );
    let numpat: i64 = redis::cmd("PUBSUB").arg("NUMPAT").query(&mut conn).unwrap();
    assert_eq!(numpat, 0, "no pattern subscriptions");
    drop(first);
    drop(second);
    let released = eventually(T, || {
        let (a, id, token) = (&a, &id, &token);
        async move {
            message(a, id, token, "poke").await;
            a.stats().await["sessions_with_subscribers"] == 0
        }
    })
    .await;
    assert!(released);
    let mut conn2 = redis.conn();
    assert!(
        eventually(T, || {
            let n = numsub(&mut conn2);
            async move { n == 0 }
        })
        .await,
        "channel still subscribed"
    );
}

#[tokio::test]
async fn rate_limits_hold_across_instances_and_fall_back_when_redis_is_down() {
    let mut redis = RedisServer::start();
    let env = |name| {
        vec![
            ("REDIS_URL", redis.url()),
            ("INSTANCE_ID", name),
            ("RATE_LIMIT_PUBLISH_PER_SEC", "5".into()),
        ]
    };
    let start = |env: Vec<(&str, String)>| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Server::start(&env)
    };
    let a = start(env("a".into()));
    let b = start(env("b".into()));
    let (id, token) = new_session(&a).await;
    let mut codes = Vec::new();
    let mut retry_after = None;
    for i in 0..8 {
        let server = if i % 2 == 0 { &a } else { &b };
        let r = message(server, &id, &token, "x").await;
        if r.status() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(
                r.json::<Value>().await.unwrap()["error"]["code"],
                "rate_limited"
            );
            codes.push(429);
        } else {
            codes.push(r.status().as_u16());
        }
    }
    assert_eq!(
        codes.iter().filter(|c| **c == 202).count(),
        5,
        "shared window: {codes:?}"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));

    redis.stop();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut codes = Vec::new();
    for _ in 0..7 {
        codes.push(message(&a, &id, &token, "y").await.status().as_u16());
    }
    assert!(
        codes.iter().all(|c| *c == 202 || *c == 429),
        "never 5xx: {codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| **c == 202).count(),
        5,
        "in-process fallback: {codes:?}"
    );
    assert!(a.stats().await["rate_limit_fallback_checks"].as_u64() >= Some(1));
}

#[tokio::test]
async fn a_gate_answered_on_another_instance_resumes_the_pipeline() {
    let redis = RedisServer::start();
    let a = instance(&redis, "a", true);
    let b = instance(&redis, "b", true);
    let (id, token) = new_session(&a).await;
    let mut sse = SseClient::open(&a, &id, &token).await;
    sse.expect_connected().await;
    let r = post(
        &a,
        &token,
        &format!("/sessions/{id}/pipeline"),
        json!({ "stages": ["draft"], "sections_per_stage": 1, "step_ms": 10, "gate": true }),
    )
    .await;
    let run_id = r.json::<Value>().await.unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    while sse.next_event(T).await.unwrap().event.as_deref() != Some("gate_waiting") {}
    let gate = format!("/sessions/{id}/pipeline/{run_id}/gate");
    let r = post(
        &b,
        &token,
        &gate,
        json!({ "approve": true, "feedback": "via b" }),
    )
    .await;
    assert_eq!(r.status(), 202);
    let resolved = sse.next_event(T).await.unwrap();
    assert_eq!(resolved.event.as_deref(), Some("gate_resolved"));
    assert_eq!(resolved.json()["feedback"], "via b");
    assert_eq!(
        sse.next_event(T).await.unwrap().event.as_deref(),
        Some("pipeline_complete")
    );

    let r = post(
        &b,
        &token,
        &format!("/sessions/{id}/pipeline/nope/gate"),
        json!({ "approve": true }),
    )
    .await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn with_the_flag_off_a_gate_on_the_wrong_instance_is_a_conflict() {
    let redis = RedisServer::start();
    let a = instance(&redis, "a", false);
    let b = instance(&redis, "b", false);
    let (id, token) = new_session(&a).await;
    let r = post(
        &a,
        &token,
        &format!("/sessions/{id}/pipeline"),
        json!({ "stages": ["draft"], "sections_per_stage": 1, "step_ms": 10, "gate": true }),
    )
    .await;
    let run_id = r.json::<Value>().await.unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = post(
        &b,
        &token,
        &format!("/sessions/{id}/pipeline/{run_id}/gate"),
        json!({ "approve": true }),
    )
    .await;
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "run_on_other_instance");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("sticky"));
}
