//! `FF_REDIS_SSE_BROADCAST` from a real Unleash server (see
//! `support/unleash.rs`), switched through the operators' script
//! `flags/unleash-flags.sh`, with two real `sse-scale` processes sharing a
//! real `redis-server`: switching under traffic (also with both instances
//! publishing, behind the shipped HAProxy file), a per-session rollout, and
//! an Unleash outage.

#[path = "support/balancer.rs"]
mod balancer;
#[path = "support/redis_server.rs"]
mod redis_server;
mod support;
#[path = "support/unleash.rs"]
mod unleash;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use balancer::Balancer;
use redis_server::RedisServer;
use serde_json::{json, Value};
use support::judge::{
    examples, fail_if_any, got_of, judge, parse_id, shared_ids, show, Accepted, Got,
};
use support::*;
use tokio_util::sync::CancellationToken;
use unleash::Unleash;

const T: Duration = Duration::from_secs(5);
/// How long after a switch in Unleash every instance must follow: the
/// 1 s refresh, plus Unleash's own propagation, with room for a slow machine.
const FOLLOW: Duration = Duration::from_secs(6);

fn instance(redis: &RedisServer, unleash: &Unleash, name: &str) -> Server {
    Server::start(&[
        ("REDIS_URL", &redis.url()),
        ("INSTANCE_ID", name),
        ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
        ("UNLEASH_URL", &unleash.api_url()),
        ("UNLEASH_API_TOKEN", unleash::CLIENT_TOKEN),
        ("UNLEASH_REFRESH_SECS", "1"),
    ])
}

/// Waits until the server reports the flag as `state`.
async fn wait_flag(server: &Server, state: Value) {
    let ok = eventually(FOLLOW, || async {
        server.stats().await["flag"]["state"] == state
    })
    .await;
    assert!(
        ok,
        "flag is not {state}: {}",
        server.stats().await["flag"]["state"]
    );
}

async fn flags(server: &Server, sessions: &[String]) -> Value {
    let res = client()
        .get(server.url(&format!("/flags?sessions={}", sessions.join(","))))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// Session id → whether this instance sends its events through Redis.
fn answers(list: &Value) -> Vec<(String, bool)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["session"].as_str().unwrap().to_owned(),
                s["redis"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Reads numbered chat messages from a stream in the background until
/// stopped; the numbers so far are in `got`.
struct Collector {
    got: Arc<Mutex<Vec<u64>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    fn start(mut sse: SseClient) -> Collector {
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (sink, token) = (got.clone(), stop.clone());
        let task = tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = sse.next_event(Duration::from_secs(600)) => ev,
                    () = token.cancelled() => return,
                };
                let ev = ev.expect("stream ended while events flow");
                assert_eq!(ev.event.as_deref(), Some("chat_message"), "{ev:?}");
                let n = ev.json()["text"].as_str().unwrap().parse().unwrap();
                sink.lock().unwrap().push(n);
            }
        });
        Collector { got, stop, task }
    }

    fn len(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    async fn finish(self) -> Vec<u64> {
        self.stop.cancel();
        self.task.await.expect("collector failed");
        Arc::try_unwrap(self.got).unwrap().into_inner().unwrap()
    }
}

/// Publishes messages "0", "1", ... on one instance every 20 ms until
/// stopped; `sent` counts those accepted (every one must be).
struct Publisher {
    sent: Arc<AtomicU64>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn start(url: String, token: String) -> Publisher {
        let sent = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (count, halt) = (sent.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let http = client();
            let mut n = 0u64;
            while !halt.is_cancelled() {
                let res = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({ "text": n.to_string() }))
                    .send()
                    .await
                    .expect("publish");
                assert_eq!(res.status(), 202, "publish {n}: {:?}", res.text().await);
                n += 1;
                count.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Publisher { sent, stop, task }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Stops publishing; how many were published.
    async fn finish(self) -> u64 {
        self.stop.cancel();
        self.task.await.expect("publisher failed");
        self.sent.load(Ordering::SeqCst)
    }
}

/// Waits until `c` holds `n` events, or no new one arrived for `quiet`.
async fn settle(c: &Collector, n: usize, quiet: Duration) {
    let mut last = (c.len(), tokio::time::Instant::now());
    while c.len() < n && last.1.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if c.len() != last.0 {
            last = (c.len(), tokio::time::Instant::now());
        }
    }
}

/// Redis, Unleash with the flag at `rollout` % and switched `switch`
/// (`on`/`off`) through the operators' script, and two instances that have
/// polled it.
struct Fleet {
    a: Server,
    b: Server,
    unleash: Unleash,
    redis: RedisServer,
}

async fn fleet(rollout: &str, switch: &str) -> Fleet {
    let redis = RedisServer::start();
    let unleash = Unleash::start().await;
    // Out of order, the operators' script says what to do (not a raw 404).
    let early = unleash.flags_output(&["rollout", "10"]).await;
    let said = String::from_utf8_lossy(&early.stderr);
    assert_eq!(early.status.code(), Some(1), "{said}");
    assert!(
        said.contains("run") && said.contains("create' first"),
        "{said}"
    );
    unleash.flags(&["create"]).await;
    unleash.flags(&["rollout", rollout]).await;
    unleash.flags(&[switch]).await;
    let a = instance(&redis, &unleash, "a");
    let b = instance(&redis, &unleash, "b");
    let state = json!({ "enabled": switch == "on", "source": "unleash" });
    wait_flag(&a, state.clone()).await;
    wait_flag(&b, state).await;
    Fleet {
        a,
        b,
        unleash,
        redis,
    }
}

/// A session created on A with a stream on A (`same`) and one on B
/// (`cross`), B subscribed to it in Redis: (id, token, same, cross).
async fn watched_session(f: &Fleet) -> (String, String, SseClient, SseClient) {
    let (id, token) = new_session(&f.a).await;
    let mut same = SseClient::open(&f.a, &id, &token).await;
    let mut cross = SseClient::open(&f.b, &id, &token).await;
    same.expect_connected().await;
    cross.expect_connected().await;
    // Subscribed whatever the flag says, so a switch loses nothing.
    wait_subscribed(&f.b, 1).await;
    (id, token, same, cross)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_in_unleash_under_traffic_gives_a_clean_suffix_then_prefix_and_no_duplicates() {
    let f = fleet("100", "off").await;
    let (a, unleash) = (&f.a, &f.unleash);
    let off = json!({ "enabled": false, "source": "unleash" });
    let on = json!({ "enabled": true, "source": "unleash" });
    let (id, token, same, cross) = watched_session(&f).await;
    let (same, cross) = (Collector::start(same), Collector::start(cross));
    let publisher = Publisher::start(a.url(&format!("/sessions/{id}/messages")), token);

    // Off: nothing crosses.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(same.len() > 20, "events flow on the publishing instance");
    assert_eq!(cross.len(), 0, "flag off: no cross-instance delivery");

    // On: cross-instance delivery starts within the refresh interval.
    let before_on = publisher.sent();
    unleash.flags(&["on"]).await;
    let switched = tokio::time::Instant::now();
    assert!(
        eventually(FOLLOW, || async { cross.len() > 0 }).await,
        "cross-instance delivery did not start"
    );
    let delay = switched.elapsed();
    wait_flag(a, on).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Off again: delivery stops once the publisher has polled the switch.
    unleash.flags(&["off"]).await;
    wait_flag(a, off).await;
    let after_off = publisher.sent();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let total = publisher.finish().await;

    settle(&same, total as usize, T).await;
    settle(&cross, usize::MAX, Duration::from_millis(1000)).await;
    let same = same.finish().await;
    let cross = cross.finish().await;
    assert_eq!(
        same,
        (0..total).collect::<Vec<_>>(),
        "same-instance subscriber: every event once, in order"
    );
    let (first, last) = (cross[0], cross[cross.len() - 1]);
    assert_eq!(
        cross,
        (first..=last).collect::<Vec<_>>(),
        "cross-instance subscriber: one unbroken run, no duplicates"
    );
    assert!(
        first >= before_on,
        "nothing published before the switch crossed: first {first}, switched at {before_on}"
    );
    // Event `after_off` may have been in flight when the switch was seen;
    // every later one started after it.
    assert!(
        last <= after_off,
        "nothing published after the publisher saw the switch-off crossed: last {last}, off at {after_off}"
    );
    assert!(
        last + 1 < total,
        "a clean prefix ended before the last event"
    );
    eprintln!("published {total}; crossed {first}..={last}; switch-on followed in {delay:?}");
}

// After a switch-off, A (no stream of the session) keeps an event to
// itself only if no other instance published the session through Redis in
// the last 60 s. B did, but A's own events, published while the flag was
// on, are the newest many in the session's history: B's must still count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_switch_off_an_instance_follows_a_session_shared_before_its_own_events() {
    let f = fleet("100", "on").await;
    let (a, b) = (&f.a, &f.b);
    let (id, token) = new_session(b).await;
    let mut on_b = SseClient::open(b, &id, &token).await;
    on_b.expect_connected().await;
    let mut texts = vec!["b1".to_owned()];
    assert_eq!(message(b, &id, &token, "b1").await.status(), 202);
    for n in 0..20 {
        let text = format!("a{n}");
        assert_eq!(message(a, &id, &token, &text).await.status(), 202);
        texts.push(text);
    }
    for text in &texts {
        assert_eq!(on_b.next_event(T).await.unwrap().json()["text"], *text);
    }
    f.unleash.flags(&["off"]).await;
    wait_flag(a, json!({ "enabled": false, "source": "unleash" })).await;
    assert_eq!(message(a, &id, &token, "x").await.status(), 202);
    let ev = on_b.next_event(T).await;
    assert_eq!(
        ev.as_ref().map(|e| e.json()["text"].clone()),
        Some(json!("x")),
        "{ev:?}; A: {}",
        a.stats().await["redis"]
    );
}

// A switch-off while Redis is away: A (no stream of the session) holds an
// event of it in its outbox, published with the flag on. Its next event,
// with the flag off, goes behind it into the outbox rather than staying on
// A: once Redis is back, B's stream gets both, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_off_during_an_outage_keeps_a_session_with_held_events_on_redis() {
    let mut f = fleet("100", "on").await;
    let (id, token) = new_session(&f.b).await;
    let mut on_b = SseClient::open(&f.b, &id, &token).await;
    on_b.expect_connected().await;
    wait_subscribed(&f.b, 1).await;
    f.redis.stop();
    assert_eq!(message(&f.a, &id, &token, "held").await.status(), 202);
    assert_eq!(f.a.stats().await["redis"]["outbox_len"], 1);
    f.unleash.flags(&["off"]).await;
    wait_flag(&f.a, json!({ "enabled": false, "source": "unleash" })).await;
    assert_eq!(message(&f.a, &id, &token, "after").await.status(), 202);
    f.redis.restart();
    for text in ["held", "after"] {
        let ev = on_b.next_event(Duration::from_secs(15)).await;
        assert_eq!(
            ev.as_ref().map(|e| e.json()["text"].clone()),
            Some(json!(text)),
            "{ev:?}; A: {}",
            f.a.stats().await["redis"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifty_percent_rollout_splits_sessions_the_same_way_on_every_instance() {
    let f = fleet("50", "on").await;
    let (a, b) = (&f.a, &f.b);
    let status: Value = serde_json::from_str(&f.unleash.flags(&["status"]).await).unwrap();
    assert_eq!(status["enabled"], true);
    assert_eq!(status["strategies"][0]["parameters"]["rollout"], "50");
    assert_eq!(
        status["strategies"][0]["parameters"]["stickiness"],
        "sessionId"
    );

    // Both instances give every session the same answer; about half use Redis.
    let ids: Vec<String> = (0..400).map(|i| format!("rollout-{i}")).collect();
    let on_a = answers(&flags(a, &ids).await["checked"]);
    let on_b = answers(&flags(b, &ids).await["checked"]);
    assert_eq!(on_a.len(), ids.len());
    assert_eq!(on_a, on_b, "instances disagree on some session");
    let redis_count = on_a.iter().filter(|(_, r)| *r).count();
    assert!(
        (140..=260).contains(&redis_count),
        "{redis_count} of 400 sessions on Redis at 50 %"
    );

    // Real sessions: one on each path, subscribed on both instances.
    let mut real = Vec::new();
    for _ in 0..16 {
        real.push(new_session(a).await);
    }
    let real_ids: Vec<String> = real.iter().map(|(id, _)| id.clone()).collect();
    let checked = answers(&flags(a, &real_ids).await["checked"]);
    let pick = |want: bool| {
        let i = checked.iter().position(|(_, r)| *r == want).unwrap();
        real[i].clone()
    };
    let (redis_session, local_session) = (pick(true), pick(false));
    let mut streams = Vec::new();
    for (id, token) in [&redis_session, &local_session] {
        for server in [&a, &b] {
            let mut sse = SseClient::open(server, id, token).await;
            sse.expect_connected().await;
            streams.push(sse);
        }
    }
    wait_subscribed(b, 2).await;

    // The operator view lists the subscribed sessions with the same answers
    // on both instances.
    let listed_a = answers(&flags(a, &[]).await["sessions"]);
    let listed_b = answers(&flags(b, &[]).await["sessions"]);
    let mut expected = vec![
        (redis_session.0.clone(), true),
        (local_session.0.clone(), false),
    ];
    expected.sort();
    assert_eq!(listed_a, expected);
    assert_eq!(listed_b, expected);
    assert_eq!(flags(a, &[]).await["on_redis"], 1);

    // And publishing follows it: the Redis session's event reaches B, the
    // local session's does not.
    for (id, token) in [&redis_session, &local_session] {
        assert_eq!(message(a, id, token, id).await.status(), 202);
    }
    let [redis_on_a, redis_on_b, local_on_a, local_on_b] = &mut streams[..] else {
        unreachable!()
    };
    for sse in [redis_on_a, redis_on_b] {
        let ev = sse.next_event(T).await.unwrap();
        assert_eq!(ev.json()["text"], redis_session.0.as_str());
    }
    let ev = local_on_a.next_event(T).await.unwrap();
    assert_eq!(ev.json()["text"], local_session.0.as_str());
    local_on_b.expect_silence(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_unleash_goes_away_the_last_known_value_stays_in_force() {
    let mut f = fleet("100", "on").await;
    let (id, token, mut same, mut cross) = watched_session(&f).await;
    let (a, b) = (&f.a, &f.b);
    assert_eq!(message(a, &id, &token, "before").await.status(), 202);
    assert_eq!(cross.next_event(T).await.unwrap().json()["text"], "before");
    same.next_event(T).await.unwrap();

    // A server whose token Unleash refuses stays on the environment value
    // and says why.
    let refused = Server::start(&[
        ("UNLEASH_URL", &f.unleash.api_url()),
        ("UNLEASH_API_TOKEN", "default:development.wrong"),
        ("UNLEASH_REFRESH_SECS", "1"),
    ]);
    let ok = eventually(T, || async {
        refused.log.lock().unwrap().contains("HTTP 401")
    })
    .await;
    assert!(ok, "{}", refused.log.lock().unwrap());
    assert_eq!(
        refused.stats().await["flag"]["state"],
        json!({ "enabled": false, "source": "default" })
    );

    f.unleash.stop();
    let last_known = json!({ "enabled": true, "source": "unleash-last-known" });
    wait_flag(a, last_known.clone()).await;
    wait_flag(b, last_known).await;
    // Several failed polls later (1 s, then backing off), still in force.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for n in 0..10 {
        let text = format!("during-{n}");
        assert_eq!(message(a, &id, &token, &text).await.status(), 202);
        assert_eq!(same.next_event(T).await.unwrap().json()["text"], text);
        assert_eq!(cross.next_event(T).await.unwrap().json()["text"], text);
    }
    let view = flags(a, std::slice::from_ref(&id)).await;
    assert_eq!(view["checked"][0]["redis"], true, "{view}");
    assert_eq!(view["state"]["source"], "unleash-last-known");
    // The outage is logged once, not on every failed poll.
    for server in [&a, &b] {
        let log = server.log.lock().unwrap().clone();
        assert_eq!(
            log.matches("Unleash is unreachable").count(),
            1,
            "outage logged once:\n{log}"
        );
        assert!(!log.contains("panicked"), "{log}");
    }
}

#[tokio::test]
async fn before_unleash_answers_the_environment_value_applies() {
    let redis = RedisServer::start();
    // Nothing listens on this port: Unleash never answers.
    let nowhere = format!("http://127.0.0.1:{}/api", redis_server::free_port());
    let server = Server::start(&[
        ("REDIS_URL", &redis.url()),
        ("UNLEASH_URL", &nowhere),
        ("UNLEASH_API_TOKEN", "default:development.x"),
        ("UNLEASH_REFRESH_SECS", "1"),
        ("FF_REDIS_SSE_BROADCAST", "true"),
    ]);
    let flag = &server.stats().await["flag"]["state"];
    assert_eq!(flag, &json!({ "enabled": true, "source": "env" }));
    let view = flags(&server, &["s1".to_owned()]).await;
    assert_eq!(view["checked"][0]["redis"], true, "{view}");
    let r = client()
        .get(server.url("/flags?sessions=bad$id"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[test]
fn bad_unleash_settings_stop_the_server_with_exit_code_2() {
    for (env, needle) in [
        (
            vec![("UNLEASH_URL", "http://u:4242/api")],
            "UNLEASH_API_TOKEN",
        ),
        (
            vec![("UNLEASH_URL", "unleash:4242"), ("UNLEASH_API_TOKEN", "t")],
            "UNLEASH_URL",
        ),
        (vec![("UNLEASH_REFRESH_SECS", "0")], "UNLEASH_REFRESH_SECS"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sse-scale"))
            .env_clear()
            .env("PORT", "0")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains(needle), "{env:?}: {stderr}");
    }
}

// Fails before the fix: an instance (re)started while Unleash was down came
// up on the default (flag off) while its peers ran on the last known value
// (on), and in phase 3 every publish it took stayed on it.
#[tokio::test]
async fn an_instance_started_while_unleash_is_down_follows_the_fleet_s_last_known_flag() {
    let mut f = fleet("100", "on").await;
    let (id, token) = new_session(&f.a).await;
    let mut on_a = SseClient::open(&f.a, &id, &token).await;
    on_a.expect_connected().await;
    wait_subscribed(&f.a, 1).await;
    f.unleash.stop();
    let late = instance(&f.redis, &f.unleash, "late");
    wait_flag(
        &late,
        json!({ "enabled": true, "source": "unleash-last-known" }),
    )
    .await;
    assert_eq!(
        message(&late, &id, &token, "from the late one")
            .await
            .status(),
        202
    );
    assert_eq!(
        on_a.next_event(T).await.unwrap().json()["text"],
        "from the late one",
        "its publishes cross instances like its peers'"
    );
}

/// Seconds between Unleash polls in the flip test below (default 15): short
/// enough for the test, long enough that each instance picks a switch up on
/// its own schedule, at its own moment.
const REAL_REFRESH_SECS: u64 = 3;
/// Pause between two publishes of one publisher in the flip test.
const FLIP_PACE: Duration = Duration::from_millis(40);

/// A stream read in the background: what arrived after `connected`, and
/// when.
struct TimedStream {
    got: Arc<Mutex<Vec<(Instant, Got)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TimedStream {
    /// Opens the session's stream through the balancer with HAProxy's
    /// affinity cookie for `instance` (`SRV=app1`, as a browser pinned there
    /// sends it), and checks that it landed there.
    async fn pinned(lb: &Balancer, instance: &str, session: &str, token: &str) -> TimedStream {
        let res = reqwest::Client::new()
            .get(lb.url(&format!("/sessions/{session}/events?token={token}")))
            .header(reqwest::header::COOKIE, format!("SRV={instance}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            200,
            "stream through the balancer: {:?}",
            res.text().await
        );
        let mut sse = SseClient::from_response(res);
        let connected = sse.expect_connected().await;
        assert_eq!(
            connected.json()["instance_id"],
            instance,
            "the SRV cookie did not pin the stream"
        );
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let item = match sse.next_block(Duration::from_secs(600)).await {
                    None => Got::End,
                    Some(block) => match got_of(&block) {
                        Some(item) => item,
                        None => continue,
                    },
                };
                let end = matches!(item, Got::End);
                sink.lock().unwrap().push((Instant::now(), item));
                if end {
                    return;
                }
            }
        });
        TimedStream { got, task }
    }

    fn snapshot(&self) -> Vec<(Instant, Got)> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `marker` arrived, or a reset at or past its id did, or
    /// the stream ended.
    async fn settle(&self, marker: &Accepted, within: Duration) -> bool {
        eventually(within, || {
            let done = self.got.lock().unwrap().iter().any(|(_, g)| match g {
                Got::Event { label, .. } => *label == marker.label,
                Got::Reset { id, .. } => *id >= marker.id,
                Got::End => true,
            });
            async move { done }
        })
        .await
    }
}

impl Drop for TimedStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An accepted publish of the flip test: the instance that took it (0: A,
/// 1: B), when its request left and when its 202 came back.
#[derive(Clone)]
struct Sent {
    event: Accepted,
    on: usize,
    started: Instant,
    done: Instant,
}

/// Publishes event `m` with data `label` on the instance at `base`; the
/// publish must be accepted.
async fn publish_timed(
    http: &reqwest::Client,
    base: &str,
    on: usize,
    session: &str,
    token: &str,
    label: String,
) -> Sent {
    let started = Instant::now();
    let res = http
        .post(format!("{base}/sessions/{session}/events"))
        .bearer_auth(token)
        .json(&json!({ "type": "m", "data": label }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("publish {label}: {e}"));
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    let done = Instant::now();
    assert_eq!(status, 202, "publish {label}: {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let id = parse_id(
        body["id"]
            .as_str()
            .unwrap_or_else(|| panic!("publish {label}: no id in {body}")),
    );
    Sent {
        event: Accepted { label, id },
        on,
        started,
        done,
    }
}

/// Publishes `<tag>-0`, `<tag>-1`, ... on one instance every
/// [`FLIP_PACE`] until stopped.
struct PacedPublisher {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Vec<Sent>>,
}

impl PacedPublisher {
    fn start(server: &Server, on: usize, session: &str, token: &str, tag: String) -> Self {
        let stop = CancellationToken::new();
        let halt = stop.clone();
        let base = server.url("");
        let (session, token) = (session.to_owned(), token.to_owned());
        let task = tokio::spawn(async move {
            let http = client();
            let mut sent = Vec::new();
            while !halt.is_cancelled() {
                let label = format!("{tag}-{}", sent.len());
                sent.push(publish_timed(&http, &base, on, &session, &token, label).await);
                tokio::time::sleep(FLIP_PACE).await;
            }
            sent
        });
        PacedPublisher { stop, task }
    }

    async fn finish(self) -> Vec<Sent> {
        self.stop.cancel();
        self.task.await.expect("publisher failed")
    }
}

/// Polls every instance's `/stats` until each reports the flag as `enabled`
/// from Unleash; when each was first seen so.
async fn seen_switched(servers: [&Server; 2], enabled: bool, within: Duration) -> [Instant; 2] {
    let want = json!({ "enabled": enabled, "source": "unleash" });
    let deadline = Instant::now() + within;
    let mut seen: [Option<Instant>; 2] = [None, None];
    loop {
        let mut states = Vec::new();
        for (i, server) in servers.iter().enumerate() {
            let state = server.stats().await["flag"]["state"].clone();
            if seen[i].is_none() && state == want {
                seen[i] = Some(Instant::now());
            }
            states.push(state);
        }
        if let [Some(a), Some(b)] = seen {
            return [a, b];
        }
        assert!(
            Instant::now() < deadline,
            "not every instance reports {want} within {within:?}: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Each instance reads the flag from Unleash at its own poll, so after a
// switch they disagree for up to a refresh interval while both publish the
// same sessions. An instance whose flag is off follows a session whose
// events reach it through Redis, so a session's events move to one path
// (Redis) at the first instance's switch instead of taking two paths that
// cross at every publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flag_flip_under_publishing_on_both_instances_behind_haproxy_loses_nothing_and_resets_a_stream_at_most_once_per_flip(
) {
    let began = Instant::now();
    let redis = RedisServer::start();
    let unleash = Unleash::start().await;
    unleash.flags(&["create"]).await;
    unleash.flags(&["rollout", "100"]).await;
    unleash.flags(&["off"]).await;
    let refresh = REAL_REFRESH_SECS.to_string();
    let start = |name: &str| {
        Server::start(&[
            ("REDIS_URL", &redis.url()),
            ("INSTANCE_ID", name),
            ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
            ("RATE_LIMIT_STREAMS_PER_MIN", "0"),
            ("SSE_CLIENT_QUEUE", "4096"),
            ("UNLEASH_URL", &unleash.api_url()),
            ("UNLEASH_API_TOKEN", unleash::CLIENT_TOKEN),
            ("UNLEASH_REFRESH_SECS", &refresh),
        ])
    };
    // The names the shipped HAProxy file gives its servers' cookies.
    let names = ["app1", "app2"];
    let a = start(names[0]);
    // Half an interval apart, so the two poll schedules stay apart.
    tokio::time::sleep(Duration::from_millis(REAL_REFRESH_SECS * 500)).await;
    let b = start(names[1]);
    let servers = [&a, &b];
    let switch_within = Duration::from_secs(REAL_REFRESH_SECS + 6);
    seen_switched(servers, false, switch_within).await;
    // The shipped file names three backends: the third is a port nothing
    // listens on, which its health check takes out; no stream is pinned to it.
    let nowhere = format!("127.0.0.1:{}", redis_server::free_port());
    let lb = Balancer::haproxy("haproxy/haproxy.cfg", &[&a.addr, &b.addr, &nowhere], &[]).await;

    // Two sessions, one created on each instance, each with a stream pinned
    // to A and one pinned to B.
    let mut sessions = Vec::new();
    for (tag, home) in [("s1", &a), ("s2", &b)] {
        let (id, token) = new_session(home).await;
        sessions.push((tag, id, token));
    }
    let mut streams = Vec::new();
    for (k, (_, id, token)) in sessions.iter().enumerate() {
        for (i, name) in names.iter().enumerate() {
            streams.push((k, i, TimedStream::pinned(&lb, name, id, token).await));
        }
    }
    // Subscribed whatever the flag says, so a switch loses nothing.
    wait_subscribed(&a, 2).await;
    wait_subscribed(&b, 2).await;

    let mut publishers = Vec::new();
    for (k, (tag, id, token)) in sessions.iter().enumerate() {
        for (i, server) in servers.iter().enumerate() {
            let tag = format!("{tag}-{}", names[i]);
            publishers.push((k, PacedPublisher::start(server, i, id, token, tag)));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let on_issued = Instant::now();
    unleash.flags(&["on"]).await;
    let on_seen = seen_switched(servers, true, switch_within).await;
    let both_on = on_seen[0].max(on_seen[1]);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let off_issued = Instant::now();
    unleash.flags(&["off"]).await;
    let off_seen = seen_switched(servers, false, switch_within).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut sent: Vec<Vec<Sent>> = vec![Vec::new(); sessions.len()];
    for (k, p) in publishers {
        sent[k].extend(p.finish().await);
    }
    // A last event per session on each instance, after all it published.
    let http = client();
    let mut markers = BTreeMap::new();
    for (k, (tag, id, token)) in sessions.iter().enumerate() {
        for (i, server) in servers.iter().enumerate() {
            let label = format!("{tag}-{}-end", names[i]);
            let m = publish_timed(&http, &server.url(""), i, id, token, label).await;
            sent[k].push(m.clone());
            markers.insert((k, i), m.event);
        }
    }
    // The own instance's marker is owed; the other's only if it went
    // through Redis, so it gets a short wait.
    futures::future::join_all(streams.iter().map(|(k, i, s)| {
        let (own, other) = (&markers[&(*k, *i)], &markers[&(*k, 1 - *i)]);
        async move {
            s.settle(own, Duration::from_secs(10)).await;
            s.settle(other, Duration::from_secs(2)).await;
        }
    }))
    .await;

    let at = |t: Instant| match t.checked_duration_since(on_issued) {
        Some(d) => format!("+{}ms", d.as_millis()),
        None => format!("-{}ms", on_issued.duration_since(t).as_millis()),
    };
    let period = |t: Instant| {
        if t < on_issued {
            0
        } else if t < off_issued {
            1
        } else {
            2
        }
    };
    let mut failures = Vec::new();
    let mut summaries = Vec::new();
    for (k, (tag, ..)) in sessions.iter().enumerate() {
        // Ids are per session: each session has its own sequence.
        let all: Vec<&Accepted> = sent[k].iter().map(|s| &s.event).collect();
        let shared = shared_ids(&all);
        if !shared.is_empty() {
            failures.push(format!(
                "session {tag}: {} ids were given to more than one of its {} accepted events: {}",
                shared.len(),
                all.len(),
                examples(&shared)
            ));
        }
        let count = |on: usize| sent[k].iter().filter(|s| s.on == on).count();
        summaries.push(format!(
            "session {tag}: {} accepted on {}, {} on {}",
            count(0),
            names[0],
            count(1),
            names[1]
        ));
    }
    for (k, i, stream) in &streams {
        let (tag, ..) = &sessions[*k];
        let (own, other) = (names[*i], names[1 - *i]);
        let who = format!("session {tag}, stream on {own}");
        let timed = stream.snapshot();
        let got: Vec<Got> = timed.iter().map(|(_, g)| g.clone()).collect();
        // Every event of its own instance; every event of the other one
        // published while both had the flag on; whatever else of the other
        // instance arrives is judged for order and repeats.
        let window: Vec<&Sent> = sent[*k]
            .iter()
            .filter(|s| s.on != *i && s.started >= both_on && s.done < off_issued)
            .collect();
        let owed: Vec<Accepted> = sent[*k]
            .iter()
            .filter(|s| s.on == *i)
            .chain(window.iter().copied())
            .map(|s| s.event.clone())
            .collect();
        if window.len() < 20 {
            failures.push(format!(
                "{who}: only {} events of {other} fell in the window with the flag on on both",
                window.len()
            ));
        }
        match judge(&who, &got, &owed, &HashSet::new(), false) {
            Ok(s) => summaries.push(s),
            Err(e) => failures.push(e),
        }
        let mut resets: [Vec<String>; 3] = Default::default();
        for (t, g) in &timed {
            if let Got::Reset { id, raw } = g {
                resets[period(*t)].push(format!(
                    "{} at {} [{}]",
                    show(*id),
                    at(*t),
                    raw.replace('\n', " | ")
                ));
            }
        }
        if !resets[0].is_empty() || resets[1].len() > 1 || resets[2].len() > 1 {
            failures.push(format!(
                "{who}: resets before any switch: {:?}; after the switch on: {:?}; after the \
                 switch off: {:?}",
                resets[0], resets[1], resets[2]
            ));
        }
        let from = |name: &str| {
            let prefix = format!("{tag}-{name}-");
            got.iter()
                .filter(|g| matches!(g, Got::Event { label, .. } if label.starts_with(&prefix)))
                .count()
        };
        let prefix = format!("{tag}-{other}-");
        let first_other = timed
            .iter()
            .find(|(_, g)| matches!(g, Got::Event { label, .. } if label.starts_with(&prefix)))
            .map_or("never".to_owned(), |(t, _)| at(*t));
        summaries.push(format!(
            "{who}: resets before/on/off {}/{}/{} {:?}; received {} of {own}, {} of {other} \
             (the first at {first_other})",
            resets[0].len(),
            resets[1].len(),
            resets[2].len(),
            resets.iter().flatten().collect::<Vec<_>>(),
            from(own),
            from(other)
        ));
    }
    let mut stats = Vec::new();
    for (name, server) in names.iter().zip(servers) {
        let s = server.stats().await;
        stats.push(format!(
            "{name}: resets {} order_resets {}",
            s["resets"], s["order_resets"]
        ));
    }
    fail_if_any(
        "flag_flip_behind_haproxy",
        &failures,
        &format!(
            "switched on at +0ms, seen on {} {}, {} {}; switched off at {}, seen off {} {}, {} {}; \
             {}; refresh {REAL_REFRESH_SECS} s, pace {FLIP_PACE:?}; {:?} in all\n  {}",
            names[0],
            at(on_seen[0]),
            names[1],
            at(on_seen[1]),
            at(off_issued),
            names[0],
            at(off_seen[0]),
            names[1],
            at(off_seen[1]),
            stats.join(", "),
            began.elapsed(),
            summaries.join("\n  ")
        ),
    );
}
