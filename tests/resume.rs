//! Resume and ordering guarantees, end to end: what a client that comes back
//! with `Last-Event-ID` gets (a replay that provably continues from its id,
//! or a `reset`), whatever instance it lands on and whatever id it sends;
//! the size limits on events and replays; the order of ids per session
//! across instances; the last events of runs on a draining instance; and
//! the Redis channels an instance holds while its subscriber reconnects.
//!
//! Real `sse-scale` processes (local mode and Redis mode), a real
//! `redis-server` per test, real HTTP.

#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis_server::RedisServer;
use serde_json::{json, Value};
use support::*;

const T: Duration = Duration::from_secs(5);

/// An instance in Redis mode; `flag` is `FF_REDIS_SSE_BROADCAST`.
fn redis_instance(redis: &RedisServer, name: &str, flag: bool, extra: &[(&str, &str)]) -> Server {
    let url = redis.url();
    let mut env = vec![
        ("SSE_ADAPTER", "redis"),
        ("REDIS_URL", url.as_str()),
        ("INSTANCE_ID", name),
        (
            "FF_REDIS_SSE_BROADCAST",
            if flag { "true" } else { "false" },
        ),
    ];
    env.extend_from_slice(extra);
    Server::start(&env)
}

/// An instance in local mode (no Redis).
fn local_instance(name: &str, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![("INSTANCE_ID", name)];
    env.extend_from_slice(extra);
    Server::start(&env)
}

/// Opens a stream that resumes from `last` (the `Last-Event-ID` header);
/// the answer must be 200.
async fn open_from(server: &Server, session: &str, token: &str, last: &str) -> SseClient {
    let res = reqwest::Client::new()
        .get(server.url(&format!("/sessions/{session}/events?token={token}")))
        .header("last-event-id", last)
        .send()
        .await
        .unwrap_or_else(|e| panic!("open with Last-Event-ID {last}: {e}"));
    let status = res.status();
    if status != 200 {
        panic!(
            "open with Last-Event-ID {last}: {status} {:?}",
            res.text().await
        );
    }
    SseClient::from_response(res)
}

/// The next event (comments skipped); the stream must not end.
async fn next(sse: &mut SseClient, within: Duration) -> SseEvent {
    sse.next_event(within).await.expect("stream ended")
}

/// Reads the prelude, then the next event, which must be a `reset` for
/// `last`. Returns it.
async fn expect_reset(sse: &mut SseClient, last: &str) -> SseEvent {
    sse.expect_connected().await;
    let ev = next(sse, T).await;
    let shown = brief(&ev);
    assert_eq!(
        ev.event.as_deref(),
        Some("reset"),
        "resume from {last}: expected a reset, got {shown}"
    );
    assert_eq!(ev.json()["last_event_id"], last, "{shown}");
    ev
}

/// An event as it arrived, shortened for messages (some carry 8 KB).
fn brief(ev: &SseEvent) -> String {
    let mut out: String = ev.raw.chars().take(160).collect();
    if out.len() < ev.raw.len() {
        out.push_str("...");
    }
    out
}

/// An event id as the pair of numbers it stands for.
fn id_pair(id: &str) -> (u64, u64) {
    let (ms, seq) = id
        .split_once('-')
        .unwrap_or_else(|| panic!("bad id {id:?}"));
    (ms.parse().unwrap(), seq.parse().unwrap())
}

fn assert_increasing(who: &str, ids: &[String]) {
    let pairs: Vec<(u64, u64)> = ids.iter().map(|i| id_pair(i)).collect();
    if let Some(i) = pairs.windows(2).position(|w| w[0] >= w[1]) {
        panic!(
            "{who}: id {} arrived after {} (position {})",
            ids[i + 1],
            ids[i],
            i + 1
        );
    }
}

fn history_key(session: &str) -> String {
    format!("sse:session:{session}:history")
}

// Fails before the fix: the history read `XRANGE (<u64::MAX>-<u64::MAX> +`
// is a Redis error ("invalid start ID for the interval") that marks Redis
// unhealthy, so A's next publishes fall back to local delivery
// (`fallback_local` == 5) and its rate-limit checks fall back in process.
#[tokio::test]
async fn crafted_ids_get_a_reset_and_never_push_an_instance_off_redis() {
    const CRAFTED: [&str; 4] = [
        "18446744073709551615-18446744073709551615",
        "0-18446744073709551615",
        "18446744073709551615-0",
        "99999999999999-0",
    ];
    let redis = RedisServer::start();
    let a = redis_instance(&redis, "a", true, &[]);
    let b = redis_instance(&redis, "b", true, &[]);
    let (id, token) = new_session(&a).await;
    let mut on_b = SseClient::open(&b, &id, &token).await;
    on_b.expect_connected().await;
    wait_subscribed(&b, 1).await;

    for i in 0..32 {
        let last = CRAFTED[i % CRAFTED.len()];
        let mut sse = open_from(&a, &id, &token, last).await;
        expect_reset(&mut sse, last).await;
    }

    let start = tokio::time::Instant::now();
    for n in 1..=5 {
        assert_eq!(
            message(&a, &id, &token, &format!("m{n}")).await.status(),
            202
        );
    }
    let deadline = start + Duration::from_secs(3);
    for n in 1..=5 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ev = next(&mut on_b, left.max(Duration::from_millis(1))).await;
        let shown = brief(&ev);
        assert_eq!(ev.event.as_deref(), Some("chat_message"), "{shown}");
        assert_eq!(ev.json()["text"], format!("m{n}"), "{shown}");
    }
    let stats = a.stats().await;
    assert_eq!(stats["redis"]["fallback_local"], 0, "{stats}");
    assert_eq!(stats["rate_limit_fallback_checks"], 0, "{stats}");

    // Local mode: the same ids are answered the same way, and the server
    // goes on serving.
    let local = local_instance("local", &[]);
    let (id, token) = new_session(&local).await;
    for last in CRAFTED {
        let mut sse = open_from(&local, &id, &token, last).await;
        expect_reset(&mut sse, last).await;
    }
    let health = client().get(local.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let mut live = SseClient::open(&local, &id, &token).await;
    live.expect_connected().await;
    let sent = publish(&local, &id, &token, "n", json!(1)).await;
    assert_eq!(next(&mut live, T).await.id, Some(sent));
}

// Fails before the fix: B's in-process history for the session was never
// trimmed, so it counts as complete for any id and B replays its own event
// as if it continued from E5 (E6 and E7 are silently lost).
#[tokio::test]
async fn a_local_instance_resets_a_resume_from_an_id_it_never_issued() {
    let quiet = [("RATE_LIMIT_PUBLISH_PER_SEC", "0")];
    let a = local_instance("a", &quiet);
    let b = local_instance("b", &quiet);
    let (id, token) = new_session(&a).await;
    let mut sse = SseClient::open(&a, &id, &token).await;
    sse.expect_connected().await;
    let mut ids = Vec::new();
    for n in 1..=5 {
        ids.push(publish(&a, &id, &token, "n", json!(n)).await);
    }
    for n in 1..=5 {
        let ev = next(&mut sse, T).await;
        assert_eq!((ev.json(), ev.id), (json!(n), Some(ids[n - 1].clone())));
    }
    let e5 = ids[4].clone();
    drop(sse);
    // Lost to the client while it moves to B.
    publish(&a, &id, &token, "n", json!(6)).await;
    publish(&a, &id, &token, "n", json!(7)).await;
    // B now holds history for the session, but only its own event.
    let on_b = publish(&b, &id, &token, "n", json!(100)).await;

    let mut resumed = open_from(&b, &id, &token, &e5).await;
    resumed.expect_connected().await;
    let ev = next(&mut resumed, T).await;
    let shown = brief(&ev);
    assert_eq!(
        ev.event.as_deref(),
        Some("reset"),
        "B cannot prove continuity from {e5} (E6, E7 were published on A), \
         yet it answered {shown} (B's own event is {on_b})"
    );
    assert_eq!(ev.json()["last_event_id"], e5.as_str());
    assert!(ev.id.is_some(), "the reset carries an id: {shown}");
}

// Fails before the fix: C's Redis history still holds the session's first
// Redis event (E3), which counts as "never trimmed", so the resume from E1
// replays E3, E4 although E2 never reached Redis.
#[tokio::test]
async fn a_resume_from_a_local_only_id_on_another_instance_resets() {
    let redis = RedisServer::start();
    let quiet = [("RATE_LIMIT_PUBLISH_PER_SEC", "0")];
    let a = redis_instance(&redis, "a", false, &quiet);
    let b = redis_instance(&redis, "b", true, &quiet);
    let c = redis_instance(&redis, "c", true, &quiet);
    let (id, token) = new_session(&a).await;
    let mut on_a = SseClient::open(&a, &id, &token).await;
    on_a.expect_connected().await;
    // Subscribed despite the flag: it gets what B publishes through Redis.
    wait_subscribed(&a, 1).await;

    let e1 = publish(&a, &id, &token, "n", json!(1)).await;
    let e2 = publish(&a, &id, &token, "n", json!(2)).await;
    let e3 = publish(&b, &id, &token, "n", json!(3)).await;
    let e4 = publish(&b, &id, &token, "n", json!(4)).await;
    let expected = [&e1, &e2, &e3, &e4];
    for (n, want) in expected.iter().enumerate() {
        let ev = next(&mut on_a, T).await;
        assert_eq!(
            (ev.json(), ev.id.as_deref()),
            (json!(n + 1), Some(want.as_str()))
        );
    }

    // From E1: E2 exists only on A, so C cannot replay a complete history.
    let mut from_e1 = open_from(&c, &id, &token, &e1).await;
    expect_reset(&mut from_e1, &e1).await;

    // From E3: everything after it is in Redis; exactly E4, then live.
    let mut from_e3 = open_from(&c, &id, &token, &e3).await;
    from_e3.expect_connected().await;
    let ev = next(&mut from_e3, T).await;
    let shown = brief(&ev);
    assert_eq!(
        (ev.event.as_deref(), ev.id.as_deref(), ev.json()),
        (Some("n"), Some(e4.as_str()), json!(4)),
        "{shown}"
    );
    let marker = publish(&c, &id, &token, "n", json!(5)).await;
    let ev = next(&mut from_e3, T).await;
    let shown = brief(&ev);
    assert_eq!(ev.id, Some(marker), "only E4 was replayed: {shown}");
}

// Fails before the fix: A's in-process history (one untrimmed event) counts
// as complete, and merging it with the trimmed Redis history makes the
// whole answer complete, so the resume from F replays with a gap.
#[tokio::test]
async fn a_fallback_event_does_not_make_a_trimmed_history_complete() {
    let redis = RedisServer::start();
    let env = [
        ("HISTORY_MAXLEN", "10"),
        ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
    ];
    let a = redis_instance(&redis, "a", false, &env);
    let b = redis_instance(&redis, "b", true, &env);
    let (id, token) = new_session(&a).await;
    let f = publish(&b, &id, &token, "n", json!(1)).await;
    // `XADD MAXLEN ~` trims whole macro nodes (100 entries): 400 events
    // are sure to trim the first ones.
    let workers = (0..4).map(|w| {
        let (b, id, token) = (&b, &id, &token);
        async move {
            for n in (2..=400).filter(|n| n % 4 == w) {
                publish(b, id, token, "n", json!(n)).await;
            }
        }
    });
    futures::future::join_all(workers).await;
    let mut conn = redis.conn();
    let key = history_key(&id);
    let len: i64 = redis::cmd("XLEN").arg(&key).query(&mut conn).unwrap();
    assert!(
        len > 0 && len < 400,
        "history of 400 events not trimmed: {len}"
    );
    let head: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query(&mut conn)
        .unwrap();
    assert_ne!(head[0].0, f, "the first event is still held");

    // One event on the local path: A's in-process history now holds exactly
    // this one.
    publish(&a, &id, &token, "n", json!(1000)).await;
    let mut sse = open_from(&a, &id, &token, &f).await;
    expect_reset(&mut sse, &f).await;
}

async fn reset_with_nothing_held(server: &Server) {
    let (id, token) = new_session(server).await;
    let mut first = open_from(server, &id, &token, "1-0").await;
    let reset = expect_reset(&mut first, "1-0").await;
    let rid = reset
        .id
        .clone()
        .unwrap_or_else(|| panic!("the reset carries no id: {}", brief(&reset)));
    // Reconnecting from the reset's id continues without another reset.
    let mut again = open_from(server, &id, &token, &rid).await;
    again.expect_connected().await;
    let sent = publish(server, &id, &token, "n", json!(1)).await;
    let ev = next(&mut again, T).await;
    let shown = brief(&ev);
    assert_eq!(
        (ev.event.as_deref(), ev.id.as_deref()),
        (Some("n"), Some(sent.as_str())),
        "resume from the reset's id {rid}: {shown}"
    );
    // The stream that got the reset goes on live too.
    let ev = next(&mut first, T).await;
    let shown = brief(&ev);
    assert_eq!(ev.id.as_deref(), Some(sent.as_str()), "{shown}");
}

// Fails before the fix: with no history held, the reset is encoded without
// an `id:` line (its id is the newest held, which is none).
#[tokio::test]
async fn a_reset_with_nothing_held_still_carries_an_id() {
    let local = local_instance("local", &[]);
    reset_with_nothing_held(&local).await;
    let redis = RedisServer::start();
    let on = redis_instance(&redis, "a", true, &[]);
    reset_with_nothing_held(&on).await;
}

// Fails before the fix: with Redis unreadable and nothing of the session
// held on B, the reset carries `0-0` and moves the client back to the
// session's start, so its next reconnect replays everything it has.
#[tokio::test(flavor = "multi_thread")]
async fn a_resume_reset_while_redis_is_unreadable_keeps_the_client_where_it_was() {
    let mut redis = RedisServer::start();
    let a = redis_instance(&redis, "a", true, &[]);
    let b = redis_instance(&redis, "b", true, &[]);
    let (id, token) = new_session(&a).await;
    let last = publish(&a, &id, &token, "n", json!(1)).await;
    redis.stop();
    let mut sse = open_from(&b, &id, &token, &last).await;
    let reset = expect_reset(&mut sse, &last).await;
    assert_eq!(
        reset.id.as_deref(),
        Some(last.as_str()),
        "{}",
        brief(&reset)
    );
    // An id from the future is no point of any history: not kept.
    let future = "99999999999999-0";
    let mut sse = open_from(&b, &id, &token, future).await;
    let reset = expect_reset(&mut sse, future).await;
    assert_ne!(reset.id.as_deref(), Some(future), "{}", brief(&reset));
}

// Fails before the fix: MAX_EVENT_BYTES is checked against the data as
// posted (~40 KB), not against its SSE encoding (one `data: ` line per line,
// over 64 KiB), so the event is accepted with 202.
#[tokio::test]
async fn an_event_whose_frame_exceeds_the_limit_is_refused() {
    let server = local_instance(
        "local",
        &[
            ("MAX_EVENT_BYTES", "65536"),
            ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
        ],
    );
    let (id, token) = new_session(&server).await;
    let mut sse = SseClient::open(&server, &id, &token).await;
    sse.expect_connected().await;

    // Pretty JSON with real newlines: `[0,\n0,\n...0]`.
    let lines = 13_000;
    let data = format!("[{}0]", "0,\n".repeat(lines));
    let frame_len = data.len() + (lines + 1) * "data: \n".len();
    assert!(data.len() < 45_000 && frame_len > 65_536, "{frame_len}");
    let body = format!(r#"{{"type":"t","data":{data}}}"#);
    let res = client()
        .post(server.url(&format!("/sessions/{id}/events")))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    assert_eq!(
        status,
        413,
        "{} bytes of data, {frame_len} encoded",
        data.len()
    );
    let err: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert!(
        err["error"]["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{err}"
    );

    // 30 KB without newlines encodes to about as much: accepted.
    let ok = publish(&server, &id, &token, "t", json!("x".repeat(30_000))).await;
    let ev = next(&mut sse, T).await;
    let shown = brief(&ev);
    assert_eq!(
        ev.id.as_deref(),
        Some(ok.as_str()),
        "the refused event must not reach subscribers: {shown}"
    );
}

async fn replay_cap(server: &Server) {
    let (id, token) = new_session(server).await;
    let payload = "x".repeat(8000);
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(publish(server, &id, &token, "blob", json!(payload)).await);
    }
    // After the 1st: 19 x 8 KB, more than REPLAY_MAX_BYTES.
    let mut sse = open_from(server, &id, &token, &ids[0]).await;
    expect_reset(&mut sse, &ids[0]).await;

    // After the 17th: 3 x 8 KB, replayed.
    let mut sse = open_from(server, &id, &token, &ids[16]).await;
    sse.expect_connected().await;
    for want in &ids[17..] {
        let ev = next(&mut sse, T).await;
        let shown = brief(&ev);
        assert_eq!(
            (ev.event.as_deref(), ev.id.as_deref()),
            (Some("blob"), Some(want.as_str())),
            "{shown}"
        );
    }
    let marker = publish(server, &id, &token, "n", json!(21)).await;
    let ev = next(&mut sse, T).await;
    let shown = brief(&ev);
    assert_eq!(
        ev.id,
        Some(marker),
        "exactly the 18th..20th were replayed: {shown}"
    );
}

// Fails before the fix: REPLAY_MAX_BYTES does not exist, every resume within
// history is replayed in full (~150 KB here) instead of answered with reset.
#[tokio::test]
async fn a_resume_larger_than_the_replay_cap_resets() {
    let env = [
        ("REPLAY_MAX_BYTES", "65536"),
        ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
    ];
    let local = local_instance("local", &env);
    replay_cap(&local).await;
    let redis = RedisServer::start();
    let on = redis_instance(&redis, "a", true, &env);
    replay_cap(&on).await;
}

/// Reads `n` events; returns (id, data) in arrival order.
async fn read_n(sse: &mut SseClient, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let ev = sse
            .next_event(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("stream ended after {} events", out.len()));
        let data = ev.json().as_str().unwrap_or_default().to_owned();
        out.push((ev.id.unwrap_or_default(), data));
    }
    out
}

// Fails before the fix (every run here): an instance delivers its own
// publish to its streams only once the publish script has answered, so an
// event the other instance published just after it (a higher id) can
// arrive over Pub/Sub and reach the stream first.
#[tokio::test]
async fn ids_reach_every_stream_in_increasing_order() {
    let redis = RedisServer::start();
    let env = [
        ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
        // Room for the burst: being cut for lagging is not what is tested.
        ("SSE_CLIENT_QUEUE", "4096"),
    ];
    let a = redis_instance(&redis, "a", true, &env);
    let b = redis_instance(&redis, "b", true, &env);
    let (id, token) = new_session(&a).await;
    let mut on_a = SseClient::open(&a, &id, &token).await;
    let mut on_b = SseClient::open(&b, &id, &token).await;
    on_a.expect_connected().await;
    on_b.expect_connected().await;
    wait_subscribed(&a, 1).await;
    wait_subscribed(&b, 1).await;

    const PER_SIDE: usize = 150;
    const TASKS: usize = 4;
    let mut publishers = Vec::new();
    for (name, server) in [("a", &a), ("b", &b)] {
        for t in 0..TASKS {
            let (id, token) = (&id, &token);
            publishers.push(async move {
                for k in (t..PER_SIDE).step_by(TASKS) {
                    publish(server, id, token, "m", json!(format!("{name}-{k}"))).await;
                }
            });
        }
    }
    let total = 2 * PER_SIDE;
    let (_, got_a, got_b) = tokio::join!(
        futures::future::join_all(publishers),
        read_n(&mut on_a, total),
        read_n(&mut on_b, total),
    );
    let expected: BTreeSet<String> = ["a", "b"]
        .iter()
        .flat_map(|s| (0..PER_SIDE).map(move |k| format!("{s}-{k}")))
        .collect();
    for (who, got) in [("stream on a", &got_a), ("stream on b", &got_b)] {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for e in got.iter() {
            *counts.entry(e.1.as_str()).or_default() += 1;
        }
        let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(doubled.is_empty(), "{who}: received twice: {doubled:?}");
        let labels: BTreeSet<String> = got.iter().map(|e| e.1.clone()).collect();
        let missing: Vec<_> = expected.difference(&labels).collect();
        assert!(missing.is_empty(), "{who}: missing {missing:?}");
        let ids: Vec<String> = got.iter().map(|e| e.0.clone()).collect();
        assert_increasing(who, &ids);
    }
    assert_eq!(got_a, got_b, "both streams carry the same ids");
    // Nothing more arrives before the next event: each came exactly once.
    let marker = publish(&a, &id, &token, "m", json!("marker")).await;
    assert_eq!(
        next(&mut on_a, T).await.id.as_deref(),
        Some(marker.as_str())
    );
    assert_eq!(
        next(&mut on_b, T).await.id.as_deref(),
        Some(marker.as_str())
    );
}

// Fails before the fix: the shutdown token that cancels the runs also
// closes the broadcaster, so the run's `pipeline_cancelled` is refused
// (BroadcastError::Closed) and never leaves A.
#[tokio::test]
async fn a_draining_redis_instance_publishes_pipeline_cancelled() {
    let redis = RedisServer::start();
    let env = [("SHUTDOWN_DRAIN_SECS", "1"), ("SHUTDOWN_GRACE_SECS", "10")];
    let mut a = redis_instance(&redis, "a", true, &env);
    let b = redis_instance(&redis, "b", true, &env);
    let (id, token) = new_session(&a).await;
    let mut on_b = SseClient::open(&b, &id, &token).await;
    on_b.expect_connected().await;
    wait_subscribed(&b, 1).await;

    let res = post(
        &a,
        &token,
        &format!("/sessions/{id}/pipeline"),
        json!({ "gate": true, "step_ms": 10, "sections_per_stage": 1 }),
    )
    .await;
    assert_eq!(res.status(), 202);
    let run_id = res.json::<Value>().await.unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // 4 stages x 3 events, then the gate.
    let mut seen = Vec::new();
    loop {
        let ev = next(&mut on_b, T).await;
        let ty = ev.event.clone().unwrap_or_default();
        seen.push(ty.clone());
        if ty == "gate_waiting" {
            assert_eq!(ev.json()["run_id"], run_id.as_str());
            break;
        }
        assert!(seen.len() < 20, "no gate_waiting: {seen:?}");
    }

    a.signal("TERM");
    let ev = next(&mut on_b, Duration::from_secs(8)).await;
    let shown = brief(&ev);
    assert_eq!(ev.event.as_deref(), Some("pipeline_cancelled"), "{shown}");
    assert_eq!(
        ev.json(),
        json!({ "run_id": run_id, "reason": "shutdown" }),
        "{shown}"
    );
    assert_eq!(a.wait_exit(Duration::from_secs(10)), Some(0));
}

/// `PUBSUB NUMSUB` of each channel.
fn numsub(conn: &mut redis::Connection, channels: &[String]) -> HashMap<String, i64> {
    redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channels)
        .query(conn)
        .unwrap()
}

// Fails before the fix (a race: in 20 of 24 runs here): a reconnecting
// subscriber SUBSCRIBEs the sessions that had streams when it started, then
// clears the pending subscription changes; a session whose last stream
// closed in between keeps its channel with nobody listening.
#[tokio::test]
async fn channels_are_released_even_when_the_subscriber_reconnects_meanwhile() {
    let redis = RedisServer::start();
    let a = redis_instance(&redis, "a", true, &[("RATE_LIMIT_STREAMS_PER_MIN", "0")]);
    wait_subscribed(&a, 0).await;
    let mut sessions = Vec::new();
    for _ in 0..30 {
        sessions.push(new_session(&a).await);
    }
    let channels: Vec<String> = sessions
        .iter()
        .map(|(id, _)| format!("sse:session:{id}"))
        .collect();

    // The subscriber connection is killed at varying intervals for 1.3 s
    // (so the kills land in every phase of a reconnect: backoff, SUBSCRIBE,
    // catch-up, steady state), then once more 300 ms later. Meanwhile every
    // session's streams are opened and dropped over and over, up to
    // CONCURRENT at once; each session's last stream stays open across the
    // last kill and closes at the session's own moment, the moments spread
    // over 50-170 ms after that kill, while the subscriber comes back, so
    // the last close of some sessions falls in its reconnect. (A channel left behind by an earlier close would be
    // released by the session's next close or by the next reconnect: only
    // the last closes count.)
    const CONCURRENT: usize = 30;
    let pauses = [15, 40, 70, 110, 160];
    let mut schedule = Vec::new();
    let mut at = 50;
    while at < 1300 {
        schedule.push(at);
        at += pauses[schedule.len() % pauses.len()];
    }
    let last_kill = at + 300;
    schedule.push(last_kill);
    let start = std::time::Instant::now();
    let ms = |ms: u64| start + Duration::from_millis(ms);
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let kills = kills.clone();
        let mut conn = redis.conn();
        let schedule: Vec<std::time::Instant> = schedule.iter().map(|t| ms(*t)).collect();
        std::thread::spawn(move || {
            for at in schedule {
                std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
                let _: i64 = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("pubsub")
                    .query(&mut conn)
                    .unwrap();
                kills.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    futures::stream::iter(sessions.iter().enumerate())
        .for_each_concurrent(CONCURRENT, |(i, (id, token))| {
            let a = &a;
            async move {
                let mut rounds = 0;
                while rounds < 3 || std::time::Instant::now() < ms(last_kill - 50) {
                    let mut sse = SseClient::open(a, id, token).await;
                    sse.expect_connected().await;
                    drop(sse);
                    rounds += 1;
                }
                let mut sse = SseClient::open(a, id, token).await;
                sse.expect_connected().await;
                let close_at = ms(last_kill + 50 + 4 * i as u64);
                tokio::time::sleep_until(close_at.into()).await;
                drop(sse);
            }
        })
        .await;
    killer.join().unwrap();
    assert_eq!(kills.load(Ordering::Relaxed), schedule.len());

    let mut conn = redis.conn();
    let released = eventually(T, || {
        let held: Vec<(String, i64)> = numsub(&mut conn, &channels)
            .into_iter()
            .filter(|(_, n)| *n != 0)
            .collect();
        let a = &a;
        async move {
            let stats = a.stats().await;
            // Connected: a subscriber that is down holds nothing trivially.
            held.is_empty()
                && stats["redis"]["subscriber_connected"] == true
                && stats["redis"]["subscribed_channels"] == 0
        }
    })
    .await;
    let stats = a.stats().await;
    let held: Vec<(String, i64)> = numsub(&mut conn, &channels)
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .collect();
    assert!(
        released,
        "channels still subscribed after every stream closed: {held:?}; stats: {}",
        stats["redis"]
    );
    assert_eq!(stats["sessions_with_subscribers"], 0, "{stats}");
    assert!(
        stats["redis"]["subscriber_connects"].as_u64() >= Some(5),
        "the subscriber was hardly ever cut: {stats}"
    );
    // And the instance still manages channels: one more stream takes its
    // channel, closing it releases the channel again.
    let (id, token) = &sessions[0];
    let one = std::slice::from_ref(&channels[0]);
    let sse = SseClient::open(&a, id, token).await;
    let taken = eventually(T, || {
        let n = numsub(&mut conn, one)[&channels[0]];
        async move { n == 1 }
    })
    .await;
    assert!(taken, "a new stream did not subscribe its channel");
    drop(sse);
    let released = eventually(T, || {
        let n = numsub(&mut conn, one)[&channels[0]];
        async move { n == 0 }
    })
    .await;
    assert!(
        released,
        "the channel was not released after the last close"
    );
}

// A session whose stream key Redis refuses (here: a key of the wrong type,
// as a stray writer or a key collision would leave it) must cost that
// session its cross-instance delivery and nothing more: its publishes are
// retried a few times and given up (counted), other sessions keep flowing
// through Redis, and the instance's subscriber keeps serving every other
// session. Before the fix, the refused event blocked the outbox for good
// (every later publish of the instance queued behind it) and the flusher
// retried it in a busy loop.
#[tokio::test]
async fn a_session_key_redis_refuses_holds_back_nothing_else() {
    let redis = RedisServer::start();
    let a = redis_instance(&redis, "a", true, &[]);
    let b = redis_instance(&redis, "b", true, &[]);
    let (bad, bad_token) = new_session(&a).await;
    let (good, good_token) = new_session(&a).await;
    let mut conn = redis.conn();
    let _: () = redis::cmd("SET")
        .arg(history_key(&bad))
        .arg("not a stream")
        .query(&mut conn)
        .unwrap();

    // Streams of both sessions on B: the refused key must not stop B's
    // subscriber from serving the good one.
    let mut bad_on_b = SseClient::open(&b, &bad, &bad_token).await;
    bad_on_b.expect_connected().await;
    let mut good_on_b = SseClient::open(&b, &good, &good_token).await;
    good_on_b.expect_connected().await;
    wait_subscribed(&b, 2).await;

    // The refused publish still answers 202 (delivered where it was made).
    publish(&a, &bad, &bad_token, "refused", json!(1)).await;
    for n in 0..3 {
        publish(&a, &good, &good_token, "good", json!(n)).await;
    }
    for n in 0..3 {
        let ev = next(&mut good_on_b, T).await;
        assert_eq!(ev.event.as_deref(), Some("good"), "{}", brief(&ev));
        assert_eq!(ev.json(), json!(n));
    }
    let given_up = eventually(T, || async {
        let stats = a.stats().await;
        stats["redis"]["outbox_len"] == 0 && stats["redis"]["outbox_dropped"] == 1
    })
    .await;
    assert!(given_up, "{}", a.stats().await["redis"]);
    // A is still on Redis: a server error reply is that request's own.
    let stats = a.stats().await;
    assert_eq!(stats["rate_limit_fallback_checks"], 0, "{stats}");
    publish(&a, &good, &good_token, "after", json!("x")).await;
    let ev = next(&mut good_on_b, T).await;
    assert_eq!(ev.event.as_deref(), Some("after"), "{}", brief(&ev));
    // The refused event never reached Redis, so B has nothing of it.
    bad_on_b.expect_silence(Duration::from_millis(300)).await;
}

// A failover that promotes a replica which had not yet received the last
// events leaves a stream that still holds older ids but not the newest: a
// replay from an older id would skip the lost ones without a word. Here
// the loss is made by hand (XDEL of the tail while the subscriber is
// disconnected); the subscriber that delivered them notices on its
// catch-up. Its own stream gets a `history_gap` reset (what else was lost
// it cannot know: its connection was cut while Redis went on), and a
// resume from before the loss gets a reset.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_lost_delivered_events_resets_resumes_from_before_them() {
    let redis = RedisServer::start();
    let a = redis_instance(&redis, "a", true, &[]);
    let b = redis_instance(&redis, "b", true, &[]);
    let (session, token) = new_session(&a).await;
    let mut sse = SseClient::open(&a, &session, &token).await;
    sse.expect_connected().await;
    wait_subscribed(&a, 1).await;
    let mut ids = Vec::new();
    for i in 1..=10 {
        ids.push(publish(&b, &session, &token, "n", json!(i)).await);
    }
    for i in 1..=10 {
        assert_eq!(next(&mut sse, T).await.json(), json!(i));
    }
    let mut conn = redis.conn();
    let deleted: i64 = redis::cmd("XDEL")
        .arg(history_key(&session))
        .arg(&ids[7..])
        .query(&mut conn)
        .unwrap();
    assert_eq!(deleted, 3);
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut conn)
        .unwrap();
    let ok = eventually(T, || async {
        a.stats().await["redis"]["history_lost"].as_u64() == Some(1)
    })
    .await;
    assert!(ok, "the loss was not noticed: {}", a.stats().await);
    let gap = next(&mut sse, T).await;
    assert_eq!(gap.event.as_deref(), Some("reset"), "{}", brief(&gap));
    assert_eq!(gap.json()["reason"], "history_gap", "{}", brief(&gap));
    assert_eq!(gap.json()["last_event_id"], ids[9], "{}", brief(&gap));
    // From before the loss: reset, not events 6 and 7 with 8..10 missing.
    let mut from_five = open_from(&b, &session, &token, &ids[4]).await;
    expect_reset(&mut from_five, &ids[4]).await;
    // From the last delivered id on, the stream is whole again.
    publish(&b, &session, &token, "n", json!(11)).await;
    assert_eq!(next(&mut sse, T).await.json(), json!(11));
    let mut from_ten = open_from(&b, &session, &token, &ids[9]).await;
    from_ten.expect_connected().await;
    assert_eq!(next(&mut from_ten, T).await.json(), json!(11));
}

// A stream opened while the subscriber cannot confirm its channel starts
// its cursor at an estimate ("shortly before now"), which no stream holds.
// A later reconnect must not take that estimate's absence from the stream
// for lost events: a client resuming from the session's real last event
// gets an exact resume, not a reset.
#[tokio::test(flavor = "multi_thread")]
async fn an_estimated_cursor_is_never_taken_for_lost_events() {
    let redis = RedisServer::start();
    let a = redis_instance(&redis, "a", true, &[]);
    let (session, token) = new_session(&a).await;
    let first = publish(&a, &session, &token, "n", json!(1)).await;
    // Older than the estimate's margin.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Redis holds every client's commands for 3 s: the subscribe is not
    // confirmed within the stream's 2 s wait.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query(&mut redis.conn())
        .unwrap();
    let res = reqwest::Client::new()
        .get(a.url(&format!("/sessions/{session}/events?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let _held = SseClient::from_response(res);
    wait_subscribed(&a, 1).await;
    let connects = a.stats().await["redis"]["subscriber_connects"]
        .as_u64()
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut redis.conn())
        .unwrap();
    let ok = eventually(T, || async {
        let s = a.stats().await;
        s["redis"]["subscriber_connects"].as_u64() > Some(connects)
            && s["redis"]["subscribed_channels"].as_u64() == Some(1)
    })
    .await;
    assert!(ok, "{}", a.stats().await);
    assert_eq!(
        a.stats().await["redis"]["history_lost"],
        0,
        "{}",
        a.stats().await
    );
    let mut resumed = open_from(&a, &session, &token, &first).await;
    resumed.expect_connected().await;
    publish(&a, &session, &token, "n", json!(2)).await;
    let ev = next(&mut resumed, T).await;
    assert_eq!(
        ev.event.as_deref(),
        Some("n"),
        "an exact resume, not {}",
        brief(&ev)
    );
    assert_eq!(ev.json(), json!(2));
}
