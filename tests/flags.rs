//! `FF_REDIS_SSE_BROADCAST` from a real Unleash server (see
//! `support/unleash.rs`), switched through the operators' script
//! `flags/unleash-flags.sh`, with two real `sse-scale` processes sharing a
//! real `redis-server`: switching under traffic, a per-session rollout, and
//! an Unleash outage.

#[path = "support/redis_server.rs"]
mod redis_server;
mod support;
#[path = "support/unleash.rs"]
mod unleash;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_server::RedisServer;
use serde_json::{json, Value};
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
    _redis: RedisServer,
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
        _redis: redis,
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
    let late = instance(&f._redis, &f.unleash, "late");
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
