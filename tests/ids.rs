//! Event ids across instances, and the delivery promise built on them:
//!
//! - two accepted events (publish answered 202 with an id) never share an
//!   id, whichever instances published them and whatever their flags;
//! - every stream of a session receives every accepted event it is owed
//!   exactly once, in strictly increasing id order, unless a `reset` told
//!   it otherwise: an event whose id is at or below the id a `reset` carried
//!   may be absent (the client reloads its state there), anything after the
//!   stream's last reset must arrive;
//! - a resume (`Last-Event-ID`) is complete (`connected`, then the replay,
//!   no reset) only when it really delivers every accepted event after the
//!   id, and never repeats what the client already saw; otherwise it starts
//!   with a `reset`.
//!
//! Black box: two `sse-scale` processes sharing one real `redis-server`,
//! HTTP and SSE only, plus direct Redis commands where a scenario needs a
//! fault (a killed Pub/Sub connection, deleted keys, a stopped server, a
//! Redis user that disappears with a restart).

#[path = "support/link.rs"]
mod link;
#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis_server::RedisServer;
use serde_json::json;
use support::judge::{
    examples, fail_if_any, got_of, judge, parse_id, shared_ids, show, Accepted, Got, Id,
};
use support::*;

/// Settings every instance here gets: no rate limits, and room for a
/// burst, so being limited or cut for lagging is not what is measured.
const QUIET: [(&str, &str); 4] = [
    ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
    ("RATE_LIMIT_STREAMS_PER_MIN", "0"),
    ("RATE_LIMIT_SESSIONS_PER_MIN", "0"),
    ("SSE_CLIENT_QUEUE", "4096"),
];

/// An instance in Redis mode on `url`; `flag` is `FF_REDIS_SSE_BROADCAST`.
fn instance(url: &str, name: &str, flag: bool) -> Server {
    instance_with(url, name, flag, &[])
}

/// As [`instance`], with `extra` settings on top.
fn instance_with(url: &str, name: &str, flag: bool, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("SSE_ADAPTER", "redis"),
        ("REDIS_URL", url),
        ("INSTANCE_ID", name),
        (
            "FF_REDIS_SSE_BROADCAST",
            if flag { "true" } else { "false" },
        ),
    ];
    env.extend_from_slice(&QUIET);
    env.extend_from_slice(extra);
    Server::start(&env)
}

/// Publishes event `m` with data `label`; asserts 202.
async fn accept(server: &Server, session: &str, token: &str, label: &str) -> Accepted {
    let id = publish(server, session, token, "m", json!(label)).await;
    Accepted {
        label: label.to_owned(),
        id: parse_id(&id),
    }
}

/// Reads a stream (past its `connected`) in the background and records
/// what arrives.
struct Recorder {
    got: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    fn start(mut sse: SseClient) -> Recorder {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let task = tokio::spawn(async move {
            loop {
                match sse.next_block(Duration::from_secs(600)).await {
                    None => {
                        sink.lock().unwrap().push(Got::End);
                        return;
                    }
                    Some(block) => {
                        if let Some(item) = got_of(&block) {
                            sink.lock().unwrap().push(item);
                        }
                    }
                }
            }
        });
        Recorder { got, task }
    }

    fn snapshot(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn labels(&self) -> HashSet<String> {
        self.snapshot()
            .into_iter()
            .filter_map(|g| match g {
                Got::Event { label, .. } => Some(label),
                _ => None,
            })
            .collect()
    }

    /// Waits until every one of `labels` arrived; false at the deadline.
    async fn wait_labels(&self, labels: &[&str], within: Duration) -> bool {
        eventually(within, || {
            let have = self.labels();
            let ok = labels.iter().all(|l| have.contains(*l));
            async move { ok }
        })
        .await
    }

    /// Waits until `marker` (published after everything else the stream is
    /// owed) arrived, or a reset at or past its id did, or the stream
    /// ended; returns what arrived by then. Whatever was published before
    /// the marker and has not arrived by then is not coming in order.
    async fn settle(&self, marker: &Accepted, within: Duration) -> Vec<Got> {
        eventually(within, || {
            let done = self.snapshot().iter().any(|g| match g {
                Got::Event { label, .. } => *label == marker.label,
                Got::Reset { id, .. } => *id >= marker.id,
                Got::End => true,
            });
            async move { done }
        })
        .await;
        self.snapshot()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens a stream on `server`, reads its prelude and starts recording.
async fn record(server: &Server, session: &str, token: &str) -> Recorder {
    let mut sse = SseClient::open(server, session, token).await;
    sse.expect_connected().await;
    Recorder::start(sse)
}

/// Opens a stream resuming from `last`, reads its prelude and starts
/// recording.
async fn record_from(server: &Server, session: &str, token: &str, last: Id) -> Recorder {
    let mut sse = SseClient::open_from(server, session, token, &show(last)).await;
    sse.expect_connected().await;
    Recorder::start(sse)
}

/// One barrier run: a stream on A and one on B; `pairs` times, one publish
/// to A and one to B at the same moment; then a marker on B, which reaches
/// both streams after everything else. Checks the ids of all accepted
/// events and both streams. B's stream is owed only B's events (with the
/// flag off on A, A's events stay on A).
async fn barrier_run(
    test: &str,
    a: &Server,
    b: &Server,
    session: &str,
    token: &str,
    pairs: usize,
    context: &str,
) {
    let on_a = record(a, session, token).await;
    let on_b = record(b, session, token).await;
    wait_subscribed(a, 1).await;
    wait_subscribed(b, 1).await;

    let mut from_a = Vec::with_capacity(pairs);
    let mut from_b = Vec::with_capacity(pairs);
    for k in 0..pairs {
        let (la, lb) = (format!("a-{k}"), format!("b-{k}"));
        let (x, y) = tokio::join!(
            accept(a, session, token, &la),
            accept(b, session, token, &lb),
        );
        from_a.push(x);
        from_b.push(y);
    }
    let marker = accept(b, session, token, "marker").await;

    let mut failures = Vec::new();
    let same_pair: Vec<String> = from_a
        .iter()
        .zip(&from_b)
        .filter(|(x, y)| x.id == y.id)
        .map(|(x, y)| format!("{}/{} both {}", x.label, y.label, show(x.id)))
        .collect();
    let all: Vec<&Accepted> = from_a
        .iter()
        .chain(&from_b)
        .chain(std::iter::once(&marker))
        .collect();
    let shared = shared_ids(&all);
    if !shared.is_empty() {
        failures.push(format!(
            "{} of {pairs} pairs shared an id (e.g. {}); {} ids were given to more than one of \
             the {} accepted events (e.g. {})",
            same_pair.len(),
            examples(&same_pair),
            shared.len(),
            all.len(),
            examples(&shared)
        ));
    }

    let within = Duration::from_secs(15);
    let got_a = on_a.settle(&marker, within).await;
    let got_b = on_b.settle(&marker, within).await;
    let owed_a: Vec<Accepted> = from_a
        .iter()
        .chain(&from_b)
        .chain(std::iter::once(&marker))
        .cloned()
        .collect();
    let owed_b: Vec<Accepted> = from_b
        .iter()
        .chain(std::iter::once(&marker))
        .cloned()
        .collect();
    let none = HashSet::new();
    let mut summaries = Vec::new();
    for (who, got, owed) in [
        ("stream on A (flag off)", &got_a, &owed_a),
        ("stream on B (flag on)", &got_b, &owed_b),
    ] {
        match judge(who, got, owed, &none, false) {
            Ok(s) => summaries.push(s),
            Err(e) => failures.push(e),
        }
    }
    let stats_a = a.stats().await;
    let stats_b = b.stats().await;
    fail_if_any(
        test,
        &failures,
        &format!(
            "{context}; order_resets A={} B={}; {}",
            stats_a["order_resets"],
            stats_b["order_resets"],
            summaries.join("; ")
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_flag_barrier_pairs_never_share_an_id_and_lose_nothing_silently() {
    let redis = RedisServer::start();
    let a = instance(&redis.url(), "a", false);
    let b = instance(&redis.url(), "b", true);
    let (session, token) = new_session(&a).await;
    barrier_run(
        "split_flag_barrier",
        &a,
        &b,
        &session,
        &token,
        300,
        "A flag off, B flag on, 300 pairs",
    )
    .await;
}

/// The milliseconds of now, by this machine's clock (the servers' too).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Writes event `label` into the session's stream as instance `node`
/// published it through Redis two minutes ago (as the publish script
/// writes entries): a flag-off instance then no longer takes the session
/// for shared, and keeps its events to itself.
fn published_long_ago(redis: &RedisServer, session: &str, label: &str, node: &str) -> Accepted {
    let id = (now_ms() - 120_000, 0);
    let mut conn = redis.conn();
    let added: String = redis::cmd("XADD")
        .arg(format!("sse:session:{session}:history"))
        .arg(show(id))
        .arg("t")
        .arg("m")
        .arg("d")
        .arg(json!(label).to_string())
        .arg("n")
        .arg(node)
        .arg("h")
        .arg("0")
        .query(&mut conn)
        .unwrap();
    assert_eq!(added, show(id));
    let _: Option<String> = redis::cmd("SET")
        .arg(format!("sse:session:{session}:first"))
        .arg(show(id))
        .arg("NX")
        .query(&mut conn)
        .unwrap();
    Accepted {
        label: label.to_owned(),
        id,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_pinned_an_hour_ahead_stay_distinct_and_lose_nothing_silently() {
    let redis = RedisServer::start();
    let a = instance(&redis.url(), "a", false);
    let b = instance(&redis.url(), "b", true);
    let (session, token) = new_session(&a).await;
    // An entry an hour ahead, as the publish script writes them: every id
    // Redis assigns from now on counts up from it, and so does every
    // generator that sees one of them.
    let ahead = (now_ms() + 3_600_000, 0);
    let key = format!("sse:session:{session}:history");
    let mut conn = redis.conn();
    let added: String = redis::cmd("XADD")
        .arg(&key)
        .arg(show(ahead))
        .arg("t")
        .arg("pin")
        .arg("d")
        .arg("\"pin\"")
        .arg("n")
        .arg("elsewhere")
        .arg("h")
        .arg("0")
        .query(&mut conn)
        .unwrap();
    assert_eq!(added, show(ahead));
    let _: () = redis::cmd("SET")
        .arg(format!("sse:session:{session}:first"))
        .arg(show(ahead))
        .query(&mut conn)
        .unwrap();
    barrier_run(
        "pinned_ids",
        &a,
        &b,
        &session,
        &token,
        100,
        &format!(
            "A flag off, B flag on, 100 pairs, stream pinned at {}",
            show(ahead)
        ),
    )
    .await;
}

fn kill_pubsub(conn: &mut redis::Connection) -> i64 {
    kill_pubsub_of(conn, None)
}

/// Ends the Pub/Sub connections Redis holds (of `user` only, if given).
fn kill_pubsub_of(conn: &mut redis::Connection, user: Option<&str>) -> i64 {
    let mut cmd = redis::cmd("CLIENT");
    cmd.arg("KILL").arg("TYPE").arg("pubsub");
    if let Some(user) = user {
        cmd.arg("USER").arg(user);
    }
    cmd.query(conn).unwrap()
}

/// Deletes every key of the session (its stream and bookkeeping): the
/// session's data is lost, as in a restart of an empty Redis.
fn lose_session_keys(conn: &mut redis::Connection, session: &str) -> Vec<String> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("sse:session:{session}*"))
        .query(conn)
        .unwrap();
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL").arg(&keys).query(conn).unwrap();
    }
    keys
}

// A's subscriber must stay down from the kill until `p` is accepted. A
// logs in to Redis as its own user; switched off, the user keeps the
// connections it has (A's command connection: the publishes go on) and
// gets no new one (the Pub/Sub connection cannot come back) until it is
// switched on again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_own_event_redis_lost_while_the_subscriber_was_down_arrives_or_is_covered_by_a_reset() {
    const USER: &str = "instance-a";
    const PASSWORD: &str = "instance-a-password";
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    acl_user(&mut conn, USER, PASSWORD, true);
    let url_a = user_url(&redis, USER, PASSWORD);
    let a = instance(&url_a, "a", true);
    let (session, token) = new_session(&a).await;
    let stream = record(&a, &session, &token).await;
    wait_subscribed(&a, 1).await;
    let e0 = accept(&a, &session, &token, "e0").await;
    assert!(
        stream.wait_labels(&["e0"], Duration::from_secs(5)).await,
        "e0 never arrived: {:?}",
        stream.snapshot()
    );
    let connects = a.stats().await["redis"]["subscriber_connects"]
        .as_u64()
        .unwrap();

    acl_user(&mut conn, USER, PASSWORD, false);
    let killed = kill_pubsub(&mut conn);
    let u = accept(&a, &session, &token, "u").await;
    let deleted = lose_session_keys(&mut conn, &session);
    let p = accept(&a, &session, &token, "p").await;
    let stats = a.stats().await;
    assert_eq!(
        stats["redis"]["subscriber_connects"].as_u64(),
        Some(connects),
        "precondition: A's subscriber still down when p was accepted: {}",
        stats["redis"]
    );
    assert_eq!(
        stats["redis"]["fallback_local"], 0,
        "precondition: u and p went through Redis: {}",
        stats["redis"]
    );
    acl_user(&mut conn, USER, PASSWORD, true);
    let back = eventually(Duration::from_secs(10), || async {
        let s = a.stats().await;
        s["redis"]["subscriber_connects"].as_u64() > Some(connects)
            && s["redis"]["subscribed_channels"].as_u64() >= Some(1)
    })
    .await;
    assert!(back, "A's subscriber never came back: {}", a.stats().await);
    let marker = accept(&a, &session, &token, "marker").await;
    let got = stream.settle(&marker, Duration::from_secs(10)).await;

    let owed = [e0, u.clone(), p.clone(), marker.clone()];
    let mut failures = Vec::new();
    if let Err(e) = judge("stream on A", &got, &owed, &HashSet::new(), false) {
        failures.push(e);
    }
    let stats = a.stats().await;
    fail_if_any(
        "own_event_after_redis_data_loss",
        &failures,
        &format!(
            "killed {killed} Pub/Sub connection(s), u={} p={} marker={}, deleted {deleted:?}; \
             A's redis stats: {}",
            show(u.id),
            show(p.id),
            show(marker.id),
            stats["redis"]
        ),
    );
}

// A's own event e2 goes through Redis (202) while A's subscriber is down,
// so its echo has not come when Redis dies; e3 and e4 are then held in A's
// outbox and delivered on A at once under local ids, past e2's. e2 must
// reach A's stream before them, not only once Redis is back (or never, had
// Redis lost it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_own_event_waiting_for_its_echo_reaches_the_stream_before_later_outbox_events() {
    const USER: &str = "instance-a";
    const PASSWORD: &str = "instance-a-password";
    let mut redis = RedisServer::start();
    let mut conn = redis.conn();
    acl_user(&mut conn, USER, PASSWORD, true);
    let url_a = user_url(&redis, USER, PASSWORD);
    let a = instance(&url_a, "a", true);
    let (session, token) = new_session(&a).await;
    let stream = record(&a, &session, &token).await;
    wait_subscribed(&a, 1).await;
    let e1 = accept(&a, &session, &token, "e1").await;
    assert!(
        stream.wait_labels(&["e1"], Duration::from_secs(5)).await,
        "e1 never arrived: {:?}",
        stream.snapshot()
    );
    acl_user(&mut conn, USER, PASSWORD, false);
    kill_pubsub(&mut conn);
    let e2 = accept(&a, &session, &token, "e2").await;
    let stats = a.stats().await;
    assert_eq!(
        (
            stats["redis"]["fallback_local"].as_u64(),
            stats["redis"]["subscriber_connected"].as_bool()
        ),
        (Some(0), Some(false)),
        "precondition: e2 went through Redis while A's subscriber was down: {}",
        stats["redis"]
    );
    drop(conn);
    redis.stop();
    let e3 = accept(&a, &session, &token, "e3").await;
    let e4 = accept(&a, &session, &token, "e4").await;
    let arrived = stream
        .wait_labels(&["e1", "e2", "e3", "e4"], Duration::from_secs(5))
        .await;
    let got = stream.snapshot();
    let failures: Vec<String> = if arrived {
        judge(
            "stream on A while Redis is down",
            &got,
            &[e1, e2.clone(), e3.clone(), e4.clone()],
            &HashSet::new(),
            false,
        )
        .err()
        .into_iter()
        .collect()
    } else {
        vec![format!(
            "e1..e4 did not all arrive while Redis was down: {got:?}"
        )]
    };
    fail_if_any(
        "own_event_before_outbox_events",
        &failures,
        &format!(
            "e2 {} (through Redis), e3 {} and e4 {} (outbox); A's redis stats: {}",
            show(e2.id),
            show(e3.id),
            show(e4.id),
            a.stats().await["redis"]
        ),
    );
}

// B's subscriber is down (its user switched off, its command connection
// kept) when the session's data is lost and a new event starts its stream
// again. Nothing has marked the loss: a resume on B from `0-0` would find
// the stream's first event and replay it as the whole session. Until its
// subscriber has caught up again, B answers resumes with a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resume_on_an_instance_whose_subscriber_is_down_resets_instead_of_trusting_the_stream() {
    const USER: &str = "instance-b";
    const PASSWORD: &str = "instance-b-password";
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    acl_user(&mut conn, USER, PASSWORD, true);
    let url_b = user_url(&redis, USER, PASSWORD);
    let a = instance(&redis.url(), "a", true);
    let b = instance(&url_b, "b", true);
    let (session, token) = new_session(&a).await;
    let stream = record(&a, &session, &token).await;
    wait_subscribed(&a, 1).await;
    for n in 1..=5 {
        accept(&b, &session, &token, &format!("e{n}")).await;
    }
    assert!(
        stream
            .wait_labels(&["e1", "e2", "e3", "e4", "e5"], Duration::from_secs(5))
            .await,
        "{:?}",
        stream.snapshot()
    );
    acl_user(&mut conn, USER, PASSWORD, false);
    kill_pubsub(&mut conn);
    lose_session_keys(&mut conn, &session);
    let e6 = accept(&a, &session, &token, "e6").await;
    let stats = b.stats().await;
    assert_eq!(
        stats["redis"]["subscriber_connected"].as_bool(),
        Some(false),
        "precondition: B's subscriber is down: {}",
        stats["redis"]
    );
    let mut resumed = SseClient::open_from(&b, &session, &token, "0-0").await;
    resumed.expect_connected().await;
    let first = resumed.next_event(Duration::from_secs(5)).await;
    assert_eq!(
        first.as_ref().and_then(|e| e.event.as_deref()),
        Some("reset"),
        "a resume from 0-0 on B while its subscriber is down (e6 {} is all the stream holds): {first:?}",
        show(e6.id)
    );
}

// A's flag is off: e1..e3 stay on A, noted in Redis (`:local`) so that a
// resume on B from before them resets. Redis then loses the note (as a
// restart from an older snapshot does) while streams of the session are
// open on both. Once the subscribers are back, the resume on B must still
// reset, not replay B's history as if it were the whole session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flag_off_events_still_reset_a_resume_elsewhere_after_redis_lost_their_note() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let a = instance(&redis.url(), "a", false);
    let b = instance(&redis.url(), "b", true);
    let (session, token) = new_session(&b).await;
    let _on_b = record(&b, &session, &token).await;
    wait_subscribed(&b, 1).await;
    // Long enough ago that A keeps its events to itself.
    let e0 = published_long_ago(&redis, &session, "e0", "b");
    let on_a = record(&a, &session, &token).await;
    wait_subscribed(&a, 1).await;
    for n in 1..=3 {
        accept(&a, &session, &token, &format!("e{n}")).await;
    }
    assert!(
        on_a.wait_labels(&["e1", "e2", "e3"], Duration::from_secs(5))
            .await
    );
    let connects = |s: serde_json::Value| s["redis"]["subscriber_connects"].as_u64().unwrap();
    let (before_a, before_b) = (connects(a.stats().await), connects(b.stats().await));
    let _: i64 = redis::cmd("DEL")
        .arg(format!("sse:session:{session}:local"))
        .query(&mut conn)
        .unwrap();
    kill_pubsub(&mut conn);
    assert!(wait_resubscribed(&a, before_a).await, "{}", a.stats().await);
    assert!(wait_resubscribed(&b, before_b).await, "{}", b.stats().await);
    let mut resumed = SseClient::open_from(&b, &session, &token, &show(e0.id)).await;
    resumed.expect_connected().await;
    let first = resumed.next_event(Duration::from_secs(3)).await;
    assert_eq!(
        first.as_ref().and_then(|e| e.event.as_deref()),
        Some("reset"),
        "a resume on B from e0 {} (A kept e1..e3 to itself): {first:?}",
        show(e0.id)
    );
}

/// Resumes on `server` from `from` (a client that has seen `seen_before`),
/// publishes a marker on `marker_on`, and judges the stream: it must start
/// with a reset, or deliver all of `owed` (plus the marker) without
/// repeating anything the client had.
#[allow(clippy::too_many_arguments)]
async fn judge_resume(
    who: &str,
    server: &Server,
    marker_on: &Server,
    session: &str,
    token: &str,
    from: Id,
    owed: &[Accepted],
    seen_before: &HashSet<String>,
    marker_label: &str,
) -> Result<String, String> {
    let resumed = record_from(server, session, token, from).await;
    let marker = accept(marker_on, session, token, marker_label).await;
    let got = resumed.settle(&marker, Duration::from_secs(10)).await;
    let mut owed: Vec<Accepted> = owed.iter().filter(|a| a.id > from).cloned().collect();
    owed.push(marker);
    judge(
        &format!("{who} (resume from {})", show(from)),
        &got,
        &owed,
        seen_before,
        true,
    )
}

fn labels(events: &[&Accepted]) -> HashSet<String> {
    events.iter().map(|a| a.label.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_down_a_resume_from_a_flag_off_id_resets_instead_of_skipping_other_events() {
    let mut redis = RedisServer::start();
    let a = instance(&redis.url(), "a", false);
    let b = instance(&redis.url(), "b", true);
    let (session, token) = new_session(&a).await;
    let mut local = Vec::new();
    for n in 1..=3 {
        local.push(accept(&a, &session, &token, &format!("L{n}")).await);
    }
    // So that R's id is past L3's on any clock tick (ordering, not an
    // assertion).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = accept(&b, &session, &token, "R").await;
    assert!(
        r.id > local[2].id,
        "precondition: R {} after L3 {}",
        show(r.id),
        show(local[2].id)
    );
    let all: Vec<Accepted> = local.iter().cloned().chain([r.clone()]).collect();
    redis.stop();

    let mut failures = Vec::new();
    let mut summaries = Vec::new();
    let cases = [
        ("on A (flag off), from L1", &a, 0usize, "mark-a1"),
        ("on A (flag off), from L3", &a, 2, "mark-a3"),
        ("on B (flag on), from L1", &b, 0, "mark-b1"),
    ];
    for (who, server, upto, marker) in cases {
        let seen = labels(&local[..=upto].iter().collect::<Vec<_>>());
        match judge_resume(
            who,
            server,
            server,
            &session,
            &token,
            local[upto].id,
            &all,
            &seen,
            marker,
        )
        .await
        {
            Ok(s) => summaries.push(s),
            Err(e) => failures.push(e),
        }
    }
    fail_if_any(
        "flag_off_redis_down_resume",
        &failures,
        &format!(
            "L1..L3 = {}, R = {}, Redis stopped before the resumes; {}",
            local
                .iter()
                .map(|l| show(l.id))
                .collect::<Vec<_>>()
                .join(", "),
            show(r.id),
            summaries.join("; ")
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resume_on_a_flag_on_instance_from_before_flag_off_events_resets() {
    let redis = RedisServer::start();
    let a = instance(&redis.url(), "a", false);
    let b = instance(&redis.url(), "b", true);
    let (session, token) = new_session(&a).await;
    let b0 = accept(&b, &session, &token, "b0").await;
    let mut all = vec![b0.clone()];
    for n in 1..=6 {
        if n <= 5 {
            all.push(accept(&a, &session, &token, &format!("a{n}")).await);
        }
        all.push(accept(&b, &session, &token, &format!("b{n}")).await);
    }
    let mut failures = Vec::new();
    let mut summaries = Vec::new();
    let cases = [
        ("on B, from b0", b0.id, labels(&[&b0]), "mark-1"),
        ("on B, from 0-0", (0, 0), HashSet::new(), "mark-2"),
    ];
    for (who, from, seen, marker) in cases {
        match judge_resume(who, &b, &b, &session, &token, from, &all, &seen, marker).await {
            Ok(s) => summaries.push(s),
            Err(e) => failures.push(e),
        }
    }
    fail_if_any(
        "resume_elsewhere_skipping_flag_off_events",
        &failures,
        &format!(
            "accepted: {}; {}",
            all.iter()
                .map(|x| format!("{}={}", x.label, show(x.id)))
                .collect::<Vec<_>>()
                .join(" "),
            summaries.join("; ")
        ),
    );
}

/// The URL an instance logs in with as `user` (see [`acl_user`]).
fn user_url(redis: &RedisServer, user: &str, password: &str) -> String {
    format!("redis://{user}:{password}@127.0.0.1:{}/", redis.port)
}

/// Creates (or updates) a Redis user allowed everything; `on: false`
/// refuses new logins as it and keeps the connections already logged in.
fn acl_user(conn: &mut redis::Connection, user: &str, password: &str, on: bool) {
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg(if on { "on" } else { "off" })
        .arg(format!(">{password}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query(conn)
        .unwrap();
}

fn history_len(redis: &RedisServer, session: &str) -> i64 {
    redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .and_then(|mut c| {
            redis::cmd("XLEN")
                .arg(format!("sse:session:{session}:history"))
                .query(&mut c)
        })
        .unwrap_or(-1)
}

// A's outbox events keep their ids only if the stream has not moved past
// them. To make sure it has, A talks to Redis as a user that exists only
// until Redis restarts: after the restart B reaches Redis and publishes,
// while A cannot log in; once the user exists again A flushes its outbox
// behind B's events, under new ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reassigned_outbox_event_is_not_replayed_to_a_client_that_saw_it() {
    const USER: &str = "instance-a";
    const PASSWORD: &str = "instance-a-password";
    let mut redis = RedisServer::start();
    acl_user(&mut redis.conn(), USER, PASSWORD, true);
    let url_a = user_url(&redis, USER, PASSWORD);
    let a = instance(&url_a, "a", true);
    let b = instance(&redis.url(), "b", true);
    let (session, token) = new_session(&a).await;
    // Stays open throughout.
    let kept = record(&a, &session, &token).await;
    // Sees the outbox events, then goes away and resumes later.
    let leaving = record(&a, &session, &token).await;
    wait_subscribed(&a, 1).await;
    let e0 = accept(&a, &session, &token, "e0").await;
    for s in [&kept, &leaving] {
        assert!(
            s.wait_labels(&["e0"], Duration::from_secs(5)).await,
            "e0 never arrived: {:?}",
            s.snapshot()
        );
    }

    redis.stop();
    let mut outbox = Vec::new();
    for n in 1..=3 {
        outbox.push(accept(&a, &session, &token, &format!("o{n}")).await);
    }
    for s in [&kept, &leaving] {
        assert!(
            s.wait_labels(&["o1", "o2", "o3"], Duration::from_secs(5))
                .await,
            "the outbox events were not delivered on A at once: {:?}",
            s.snapshot()
        );
    }
    let seen_by_leaving = leaving.labels();
    drop(leaving);
    let stats = a.stats().await;
    assert_eq!(stats["redis"]["outbox_len"], 3, "{}", stats["redis"]);

    // Back, empty and without A's user: only B gets in.
    redis.restart();
    let mut from_b = Vec::new();
    for n in 1..=4 {
        from_b.push(accept(&b, &session, &token, &format!("b{n}")).await);
    }
    let in_redis = eventually(Duration::from_secs(10), || {
        let n = history_len(&redis, &session);
        async move { n >= 4 }
    })
    .await;
    assert!(
        in_redis,
        "B's events never reached Redis: XLEN {}; B: {}",
        history_len(&redis, &session),
        b.stats().await["redis"]
    );
    let stats = a.stats().await;
    assert_eq!(
        stats["redis"]["outbox_len"], 3,
        "A flushed before B's events were in the stream: {}",
        stats["redis"]
    );
    acl_user(&mut redis.conn(), USER, PASSWORD, true);
    let flushed = eventually(Duration::from_secs(15), || async {
        a.stats().await["redis"]["outbox_len"] == 0
    })
    .await;
    let stats = a.stats().await;
    assert!(flushed, "A never flushed its outbox: {}", stats["redis"]);
    assert!(
        stats["redis"]["outbox_reassigned"].as_u64() >= Some(1),
        "the scenario was not reached: no outbox event was given a new id: {}",
        stats["redis"]
    );

    let mut failures = Vec::new();
    let mut summaries = Vec::new();
    // The stream that stayed: B's events once each, the outbox events not
    // again under their new ids.
    let marker = accept(&b, &session, &token, "mark-kept").await;
    let got = kept.settle(&marker, Duration::from_secs(15)).await;
    let owed: Vec<Accepted> = [e0.clone()]
        .iter()
        .chain(&outbox)
        .chain(&from_b)
        .chain([&marker])
        .cloned()
        .collect();
    match judge("stream kept open on A", &got, &owed, &HashSet::new(), false) {
        Ok(s) => summaries.push(s),
        Err(e) => failures.push(e),
    }
    // The client that saw e0, o1..o3 resumes on A from o3's id.
    let everything: Vec<Accepted> = outbox.iter().chain(&from_b).cloned().collect();
    match judge_resume(
        "client that saw o1..o3, on A",
        &a,
        &b,
        &session,
        &token,
        outbox[2].id,
        &everything,
        &seen_by_leaving,
        "mark-resume",
    )
    .await
    {
        Ok(s) => summaries.push(s),
        Err(e) => failures.push(e),
    }
    let stats = a.stats().await;
    fail_if_any(
        "outbox_renumbering",
        &failures,
        &format!(
            "o1..o3 = {}, b1..b4 = {}; A's redis stats: {}; {}",
            outbox
                .iter()
                .map(|o| show(o.id))
                .collect::<Vec<_>>()
                .join(", "),
            from_b
                .iter()
                .map(|o| show(o.id))
                .collect::<Vec<_>>()
                .join(", "),
            stats["redis"],
            summaries.join("; ")
        ),
    );
}

/// Ends every connection Redis holds for `user` (its Pub/Sub connection
/// and its command connection alike).
fn kill_user(conn: &mut redis::Connection, user: &str) -> i64 {
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("USER")
        .arg(user)
        .query(conn)
        .unwrap()
}

/// The session's stream in Redis, oldest first: each entry's id and its
/// fields as (name, value) pairs.
fn history_entries(redis: &RedisServer, session: &str) -> Vec<(Id, Vec<(String, String)>)> {
    redis
        .history(session)
        .into_iter()
        .map(|(id, fields)| {
            let pairs = fields
                .chunks(2)
                .map(|kv| (kv[0].clone(), kv.get(1).cloned().unwrap_or_default()))
                .collect();
            (parse_id(&id), pairs)
        })
        .collect()
}

/// Waits until `server`'s subscriber has connected again since it had
/// connected `connects` times, and holds a channel.
async fn wait_resubscribed(server: &Server, connects: u64) -> bool {
    eventually(Duration::from_secs(15), || async {
        let s = server.stats().await;
        s["redis"]["subscriber_connects"].as_u64() > Some(connects)
            && s["redis"]["subscriber_connected"] == true
            && s["redis"]["subscribed_channels"].as_u64() >= Some(1)
    })
    .await
}

// B's subscriber must stay down while A publishes past HISTORY_MAXLEN: B
// logs in as its own user, switched off (it keeps its command connection)
// before its Pub/Sub connection is killed, and on again afterwards. The
// stream in Redis then no longer reaches back to what B's stream has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_stream_whose_catch_up_finds_the_history_trimmed_gets_a_history_gap_reset() {
    const USER: &str = "instance-b";
    const PASSWORD: &str = "instance-b-password";
    const SHORT: [(&str, &str); 1] = [("HISTORY_MAXLEN", "10")];
    // MAXLEN is approximate (`~`): Redis trims whole nodes of a stream, 100
    // entries each by default, so the outage spans several of them.
    const DURING: usize = 250;
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    acl_user(&mut conn, USER, PASSWORD, true);
    let url_b = user_url(&redis, USER, PASSWORD);
    let a = instance_with(&redis.url(), "a", true, &SHORT);
    let b = instance_with(&url_b, "b", true, &SHORT);
    let (session, token) = new_session(&a).await;
    let stream = record(&b, &session, &token).await;
    wait_subscribed(&b, 1).await;
    let mut owed = Vec::new();
    for n in 1..=3 {
        owed.push(accept(&a, &session, &token, &format!("e{n}")).await);
    }
    assert!(
        stream
            .wait_labels(&["e1", "e2", "e3"], Duration::from_secs(5))
            .await,
        "e1..e3 never arrived on B: {:?}",
        stream.snapshot()
    );
    let delivered = owed[2].id;
    let connects = b.stats().await["redis"]["subscriber_connects"]
        .as_u64()
        .unwrap();

    acl_user(&mut conn, USER, PASSWORD, false);
    let killed = kill_pubsub(&mut conn);
    let mut during = Vec::with_capacity(DURING);
    for n in 0..DURING {
        during.push(accept(&a, &session, &token, &format!("d{n}")).await);
    }
    let stats = b.stats().await;
    assert_eq!(
        stats["redis"]["subscriber_connects"].as_u64(),
        Some(connects),
        "precondition: B's subscriber stayed down while A published: {}",
        stats["redis"]
    );
    let oldest = history_entries(&redis, &session)
        .first()
        .map(|(id, _)| *id)
        .expect("the session's stream in Redis");
    assert!(
        oldest > during[0].id,
        "precondition: MAXLEN trimmed the stream past what B delivered ({}); oldest entry {}",
        show(delivered),
        show(oldest)
    );
    // The newest event no history holds any more: the reset must reach it.
    let newest_trimmed = during
        .iter()
        .filter(|d| d.id < oldest)
        .map(|d| d.id)
        .max()
        .unwrap();

    acl_user(&mut conn, USER, PASSWORD, true);
    assert!(
        wait_resubscribed(&b, connects).await,
        "B's subscriber never came back: {}",
        b.stats().await["redis"]
    );
    let marker = accept(&a, &session, &token, "marker").await;
    let got = stream.settle(&marker, Duration::from_secs(15)).await;

    owed.extend(during.iter().cloned());
    owed.push(marker.clone());
    let mut failures = Vec::new();
    let summary = match judge("stream on B", &got, &owed, &HashSet::new(), false) {
        Ok(s) => s,
        Err(e) => {
            failures.push(e);
            String::new()
        }
    };
    let gap_reset = got.iter().any(|g| {
        matches!(g, Got::Reset { id, raw }
            if raw.contains("\"reason\":\"history_gap\"") && *id >= newest_trimmed)
    });
    if !gap_reset {
        failures.push(format!(
            "no history_gap reset at or past {} (the newest trimmed event) arrived on B",
            show(newest_trimmed)
        ));
    }
    fail_if_any(
        "trimmed_catch_up",
        &failures,
        &format!(
            "killed {killed} Pub/Sub connection(s); B had delivered {}, {DURING} published \
             meanwhile ({}..{}), oldest left {}, marker {}; B's redis stats: {}; {summary}",
            show(delivered),
            show(during[0].id),
            show(during[DURING - 1].id),
            show(oldest),
            show(marker.id),
            b.stats().await["redis"]
        ),
    );
}

// B's subscriber connection is cut while Redis keeps running (B's user is
// switched off first, so it cannot come back), A publishes d1..d5 into
// Redis, then Redis loses the session's data (its keys deleted, as in a
// restart of an empty Redis) and A publishes again before B is back. B's
// catch-up finds its last id gone; nothing it can read says whether Redis
// lost only what B had delivered or also d1..d5, which B never saw: its
// stream must get them or a `reset` at or past them, never silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_cut_while_redis_ran_that_returns_after_redis_lost_data_resets_its_streams() {
    const USER: &str = "instance-b";
    const PASSWORD: &str = "instance-b-password";
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    acl_user(&mut conn, USER, PASSWORD, true);
    let url_b = user_url(&redis, USER, PASSWORD);
    let a = instance_with(&redis.url(), "a", true, &[]);
    let b = instance_with(&url_b, "b", true, &[]);
    let (session, token) = new_session(&a).await;
    let stream = record(&b, &session, &token).await;
    wait_subscribed(&b, 1).await;
    let mut owed = Vec::new();
    for n in 1..=3 {
        owed.push(accept(&a, &session, &token, &format!("e{n}")).await);
    }
    assert!(
        stream
            .wait_labels(&["e1", "e2", "e3"], Duration::from_secs(5))
            .await,
        "e1..e3 never arrived on B: {:?}",
        stream.snapshot()
    );
    let connects = b.stats().await["redis"]["subscriber_connects"]
        .as_u64()
        .unwrap();

    acl_user(&mut conn, USER, PASSWORD, false);
    let killed = kill_pubsub(&mut conn);
    for n in 1..=5 {
        owed.push(accept(&a, &session, &token, &format!("d{n}")).await);
    }
    let lost = lose_session_keys(&mut conn, &session);
    owed.push(accept(&a, &session, &token, "after").await);
    let stats = b.stats().await;
    assert_eq!(
        stats["redis"]["subscriber_connects"].as_u64(),
        Some(connects),
        "precondition: B's subscriber stayed down until Redis lost the data: {}",
        stats["redis"]
    );

    acl_user(&mut conn, USER, PASSWORD, true);
    assert!(
        wait_resubscribed(&b, connects).await,
        "B's subscriber never came back: {}",
        b.stats().await["redis"]
    );
    let marker = accept(&a, &session, &token, "marker").await;
    owed.push(marker.clone());
    let got = stream.settle(&marker, Duration::from_secs(15)).await;
    let failures: Vec<String> = judge("stream on B", &got, &owed, &HashSet::new(), false)
        .err()
        .into_iter()
        .collect();
    fail_if_any(
        "cut_then_lost",
        &failures,
        &format!(
            "killed {killed} Pub/Sub connection(s), deleted {lost:?}; owed {}; B's redis stats: {}",
            owed.iter()
                .map(|o| format!("{}={}", o.label, show(o.id)))
                .collect::<Vec<_>>()
                .join(" "),
            b.stats().await["redis"]
        ),
    );
}

// A alone loses Redis (its user switched off, its connections cut) while
// B keeps publishing: A's outbox event a1, seen by A's client under its
// local id, reaches the stream after B's events under a new id. The
// client saw b0..b2 after a1 and resumes from b2's id, between a1's two
// ids: a replay of a1 under the new id would repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resume_from_between_an_outbox_events_two_ids_resets_instead_of_repeating_it() {
    const USER: &str = "instance-a";
    const PASSWORD: &str = "instance-a-password";
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    acl_user(&mut conn, USER, PASSWORD, true);
    let url_a = user_url(&redis, USER, PASSWORD);
    let a = instance(&url_a, "a", true);
    let b = instance(&redis.url(), "b", true);
    let (session, token) = new_session(&a).await;
    let client = record(&a, &session, &token).await;
    wait_subscribed(&a, 1).await;
    let pre = accept(&b, &session, &token, "pre").await;
    assert!(
        client.wait_labels(&["pre"], Duration::from_secs(5)).await,
        "pre never arrived on A: {:?}",
        client.snapshot()
    );

    acl_user(&mut conn, USER, PASSWORD, false);
    let killed = kill_user(&mut conn, USER);
    let a1 = accept(&a, &session, &token, "a1").await;
    assert!(
        client.wait_labels(&["a1"], Duration::from_secs(5)).await,
        "a1 was not delivered on A at once: {:?}",
        client.snapshot()
    );
    let stats = a.stats().await;
    assert_eq!(
        stats["redis"]["outbox_len"], 1,
        "precondition: a1 waits in A's outbox: {}",
        stats["redis"]
    );
    // So that B's ids are past a1's on any clock tick (ordering, not an
    // assertion).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut from_b = Vec::new();
    for n in 0..3 {
        from_b.push(accept(&b, &session, &token, &format!("b{n}")).await);
    }
    assert!(
        from_b[0].id > a1.id,
        "precondition: b0 {} after a1 {}",
        show(from_b[0].id),
        show(a1.id)
    );

    acl_user(&mut conn, USER, PASSWORD, true);
    let flushed = eventually(Duration::from_secs(15), || async {
        a.stats().await["redis"]["outbox_len"] == 0
    })
    .await;
    let stats = a.stats().await;
    assert!(flushed, "A never flushed its outbox: {}", stats["redis"]);
    assert!(
        stats["redis"]["outbox_reassigned"].as_u64() >= Some(1),
        "precondition: a1 was given a new id: {}",
        stats["redis"]
    );
    assert!(
        client
            .wait_labels(&["b0", "b1", "b2"], Duration::from_secs(10))
            .await,
        "B's events never arrived on A: {:?}",
        client.snapshot()
    );
    let seen = client.labels();
    drop(client);
    let first = show(a1.id);
    let renumbered = history_entries(&redis, &session)
        .into_iter()
        .find(|(_, fields)| fields.iter().any(|(k, v)| k == "a" && *v == first))
        .map(|(id, _)| id)
        .expect("a1's entry in the stream, with its first id");
    let from = from_b[2].id;
    assert!(
        a1.id < from && from < renumbered,
        "precondition: b2 {} between a1's ids {first} and {}",
        show(from),
        show(renumbered)
    );

    let all: Vec<Accepted> = [pre, a1.clone()]
        .into_iter()
        .chain(from_b.iter().cloned())
        .collect();
    let mut failures = Vec::new();
    let mut summaries = Vec::new();
    for (who, server, marker) in [("on A", &a, "mark-a"), ("on B", &b, "mark-b")] {
        match judge_resume(who, server, &b, &session, &token, from, &all, &seen, marker).await {
            Ok(s) => summaries.push(s),
            Err(e) => failures.push(e),
        }
    }
    fail_if_any(
        "resume_between_renumbered_ids",
        &failures,
        &format!(
            "killed {killed} connection(s) of A; a1 = {first} on A, {} in Redis; b0..b2 = {}; \
             A's redis stats: {}; {}",
            show(renumbered),
            from_b
                .iter()
                .map(|x| show(x.id))
                .collect::<Vec<_>>()
                .join(", "),
            a.stats().await["redis"],
            summaries.join("; ")
        ),
    );
}

// E0 went through Redis two minutes ago; L1, L2 and three large events stay
// on C (flag off, and no other instance published the session through
// Redis in the last 60 s, so C does not follow it as shared). Other
// sessions' history then pushes the session's ring, the largest, out of
// HISTORY_MEMORY_MB, and L3
// starts a new one: a resume on C from E0 must not be answered with L3
// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flag_off_resume_after_the_sessions_history_was_evicted_resets_instead_of_skipping() {
    let redis = RedisServer::start();
    let a = instance(&redis.url(), "a", true);
    let c = instance_with(&redis.url(), "c", false, &[("HISTORY_MEMORY_MB", "1")]);
    let (session, token) = new_session(&a).await;
    // Long enough ago that C does not take the session for shared.
    let e0 = published_long_ago(&redis, &session, "E0", "a");
    let l1 = accept(&c, &session, &token, "L1").await;
    let l2 = accept(&c, &session, &token, "L2").await;
    // Large events of the session's own: past HISTORY_MEMORY_MB the largest
    // ring goes first, and this one is the largest.
    let mut large = Vec::new();
    for n in 1..=3 {
        large.push(accept(&c, &session, &token, &format!("P{n}{}", "z".repeat(60_000))).await);
    }
    // About 1.2 MB of other sessions' flag-off events, one each.
    let pad = json!("z".repeat(60_000));
    for _ in 0..20 {
        let (other, other_token) = new_session(&c).await;
        publish(&c, &other, &other_token, "pad", pad.clone()).await;
    }
    let dropped = eventually(Duration::from_secs(5), || {
        let hit = c
            .log
            .lock()
            .unwrap()
            .lines()
            .any(|l| l.contains("history dropped") && l.contains(&session));
        async move { hit }
    })
    .await;
    assert!(
        dropped,
        "precondition: C dropped the session's history for HISTORY_MEMORY_MB; stats: {}",
        c.stats().await["history"]
    );
    let l3 = accept(&c, &session, &token, "L3").await;

    let mut all = vec![e0.clone(), l1, l2];
    all.extend(large);
    all.push(l3);
    let result = judge_resume(
        "on C",
        &c,
        &c,
        &session,
        &token,
        e0.id,
        &all,
        &labels(&[&e0]),
        "marker",
    )
    .await;
    let failures: Vec<String> = result.as_ref().err().cloned().into_iter().collect();
    fail_if_any(
        "flag_off_resume_after_eviction",
        &failures,
        &format!(
            "accepted: {}; {}",
            all.iter()
                .map(|x| format!("{}={}", x.label, show(x.id)))
                .collect::<Vec<_>>()
                .join(" "),
            result.unwrap_or_default()
        ),
    );
}

// As above, but C's ring of the session expires (HISTORY_TTL_SECS) while
// A's publishes keep the session's stream and bookkeeping in Redis alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flag_off_resume_after_the_sessions_history_expired_resets_instead_of_skipping() {
    const TTL_SECS: u64 = 3;
    let ttl = TTL_SECS.to_string();
    let short = [("HISTORY_TTL_SECS", ttl.as_str())];
    let redis = RedisServer::start();
    let a = instance_with(&redis.url(), "a", true, &short);
    let c = instance_with(&redis.url(), "c", false, &short);
    let (session, token) = new_session(&a).await;
    let e0 = accept(&a, &session, &token, "E0").await;
    let mut all = vec![e0.clone()];
    all.push(accept(&c, &session, &token, "L1").await);
    all.push(accept(&c, &session, &token, "L2").await);
    let expired_at = tokio::time::Instant::now() + Duration::from_secs(TTL_SECS + 1);
    let mut n = 0;
    while tokio::time::Instant::now() < expired_at {
        tokio::time::sleep(Duration::from_millis(500)).await;
        all.push(accept(&a, &session, &token, &format!("keep{n}")).await);
        n += 1;
    }
    all.push(accept(&c, &session, &token, "L3").await);

    let result = judge_resume(
        "on C",
        &c,
        &c,
        &session,
        &token,
        e0.id,
        &all,
        &labels(&[&e0]),
        "marker",
    )
    .await;
    let failures: Vec<String> = result.as_ref().err().cloned().into_iter().collect();
    fail_if_any(
        "flag_off_resume_after_expiry",
        &failures,
        &format!(
            "HISTORY_TTL_SECS={TTL_SECS}; accepted: {}; {}",
            all.iter()
                .map(|x| format!("{}={}", x.label, show(x.id)))
                .collect::<Vec<_>>()
                .join(" "),
            result.unwrap_or_default()
        ),
    );
}

// C (flag off) follows the session as shared once A's event arrived there
// through Redis. Its last stream of the session closing must not turn
// that off: C's next event still reaches the stream on A.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flag_off_instance_keeps_publishing_a_shared_session_through_redis_after_its_last_stream_closes(
) {
    let redis = RedisServer::start();
    let a = instance(&redis.url(), "a", true);
    let c = instance(&redis.url(), "c", false);
    let (session, token) = new_session(&a).await;
    let on_c = record(&c, &session, &token).await;
    let on_a = record(&a, &session, &token).await;
    wait_subscribed(&a, 1).await;
    wait_subscribed(&c, 1).await;
    let e1 = accept(&a, &session, &token, "E1").await;
    assert!(
        on_c.wait_labels(&["E1"], Duration::from_secs(5)).await,
        "E1 never arrived on C: {:?}",
        on_c.snapshot()
    );
    let c0 = accept(&c, &session, &token, "C0").await;
    assert!(
        on_a.wait_labels(&["C0"], Duration::from_secs(5)).await,
        "precondition: C0 went through Redis while C had a stream: {:?}",
        on_a.snapshot()
    );

    drop(on_c);
    let closed = eventually(Duration::from_secs(10), || async {
        let s = c.stats().await;
        s["subscribers"] == 0 && s["redis"]["subscribed_channels"] == 0
    })
    .await;
    assert!(closed, "C never saw its stream close: {}", c.stats().await);
    let c1 = accept(&c, &session, &token, "C1").await;
    let marker = accept(&a, &session, &token, "marker").await;
    let got = on_a.settle(&marker, Duration::from_secs(10)).await;

    let owed = [e1, c0, c1.clone(), marker];
    let failures: Vec<String> = judge("stream on A", &got, &owed, &HashSet::new(), false)
        .err()
        .into_iter()
        .collect();
    fail_if_any(
        "follow_shared_after_last_stream",
        &failures,
        &format!(
            "C1 = {}; C's redis stats: {}",
            show(c1.id),
            c.stats().await["redis"]
        ),
    );
}

/// Allows `user` (see [`acl_user`]) to run scripts, or forbids it: it can
/// still log in, subscribe and read, but not publish.
fn acl_scripts(conn: &mut redis::Connection, user: &str, allowed: bool) {
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg(if allowed {
            "+@scripting"
        } else {
            "-@scripting"
        })
        .query(conn)
        .unwrap();
}

// A holds events in its outbox (its link to Redis was cut) while B goes on
// publishing through Redis; a client that saw B's event resumes on A once
// A's subscriber is back but before its outbox is published. The held
// events' local ids sort before the client's id, yet it never saw them
// (they were nowhere but on A). Redis's ACL holds the outbox back: A may
// log in, subscribe and read again, but not run the publish script yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resume_on_an_instance_still_holding_its_outbox_resets_a_client_from_elsewhere() {
    const USER: &str = "instance-a";
    const PASSWORD: &str = "instance-a-password";
    let redis = RedisServer::start();
    let mut admin = redis.conn();
    acl_user(&mut admin, USER, PASSWORD, true);
    let url_a = user_url(&redis, USER, PASSWORD);
    let a = instance(&url_a, "a", true);
    let b = instance(&redis.url(), "b", true);
    let (session, token) = new_session(&a).await;
    let on_b = record(&b, &session, &token).await;
    // Keeps A subscribed to the session.
    let _on_a = record(&a, &session, &token).await;
    wait_subscribed(&a, 1).await;
    wait_subscribed(&b, 1).await;
    let connects = a.stats().await["redis"]["subscriber_connects"]
        .as_u64()
        .unwrap();

    acl_user(&mut admin, USER, PASSWORD, false);
    kill_user(&mut admin, USER);
    let mut held = Vec::new();
    for n in 1..=5 {
        held.push(accept(&a, &session, &token, &format!("held-{n}")).await);
    }
    for h in &held {
        assert!(
            h.id.1 >= 1 << 46,
            "{} was not held: {}",
            h.label,
            show(h.id)
        );
    }
    let e2 = accept(&b, &session, &token, "e2").await;
    assert!(
        on_b.wait_labels(&["e2"], Duration::from_secs(5)).await,
        "{:?}",
        on_b.snapshot()
    );
    assert!(held.iter().all(|h| h.id < e2.id));
    let seen: HashSet<String> = on_b.labels();

    acl_scripts(&mut admin, USER, false);
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(USER)
        .arg("on")
        .query(&mut admin)
        .unwrap();
    assert!(
        wait_resubscribed(&a, connects).await,
        "A's subscriber did not come back: {}",
        a.stats().await["redis"]
    );
    let stats = a.stats().await;
    assert_eq!(stats["redis"]["outbox_len"], 5, "{}", stats["redis"]);
    let resumed = record_from(&a, &session, &token, e2.id).await;
    acl_scripts(&mut admin, USER, true);
    let flushed = eventually(Duration::from_secs(15), || async {
        a.stats().await["redis"]["outbox_len"] == 0
    })
    .await;
    assert!(flushed, "A never flushed: {}", a.stats().await["redis"]);
    let marker = accept(&b, &session, &token, "marker").await;
    let got = resumed.settle(&marker, Duration::from_secs(10)).await;
    let owed: Vec<Accepted> = held.iter().cloned().chain([marker]).collect();
    let verdict = judge(
        "client from B resumed on A from e2",
        &got,
        &owed,
        &seen,
        true,
    );
    fail_if_any(
        "resume_beside_an_outbox",
        &verdict.err().into_iter().collect::<Vec<_>>(),
        &format!(
            "held {}, e2 {}; A's redis stats: {}",
            held.iter()
                .map(|h| show(h.id))
                .collect::<Vec<_>>()
                .join(", "),
            show(e2.id),
            a.stats().await["redis"]
        ),
    );
}

// During a full outage each instance gives its events local ids by its
// own clock: b1 on B, then a1 on A. A client on A sees a1 and leaves
// before Redis is back; B's outbox reaches the stream first (A logs in as
// a user that exists only until Redis restarts), so both keep their ids,
// b1's below a1's. A resume from a1's id cannot tell that the client never
// saw b1: it resets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resume_from_an_id_given_during_an_outage_resets() {
    const USER: &str = "instance-a";
    const PASSWORD: &str = "instance-a-password";
    let mut redis = RedisServer::start();
    acl_user(&mut redis.conn(), USER, PASSWORD, true);
    let url_a = user_url(&redis, USER, PASSWORD);
    let a = instance(&url_a, "a", true);
    let b = instance(&redis.url(), "b", true);
    let (session, token) = new_session(&a).await;
    let on_a = record(&a, &session, &token).await;
    wait_subscribed(&a, 1).await;

    redis.stop();
    let b1 = accept(&b, &session, &token, "b1").await;
    let a1 = accept(&a, &session, &token, "a1").await;
    assert!(b1.id.1 >= 1 << 46 && a1.id.1 >= 1 << 46 && b1.id < a1.id);
    assert!(on_a.wait_labels(&["a1"], Duration::from_secs(5)).await);
    let seen = on_a.labels();
    drop(on_a);

    redis.restart();
    let b_flushed = eventually(Duration::from_secs(15), || async {
        b.stats().await["redis"]["outbox_len"] == 0
    })
    .await;
    assert!(b_flushed, "B never flushed: {}", b.stats().await["redis"]);
    acl_user(&mut redis.conn(), USER, PASSWORD, true);
    let a_flushed = eventually(Duration::from_secs(15), || async {
        a.stats().await["redis"]["outbox_len"] == 0
    })
    .await;
    assert!(a_flushed, "A never flushed: {}", a.stats().await["redis"]);
    let kept: Vec<Id> = history_entries(&redis, &session)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        kept,
        vec![b1.id, a1.id],
        "precondition: both outbox events kept their ids"
    );

    // b1's id is below a1's, so a replay "after a1" leaves it out: the
    // client must get b1 or start with a reset.
    let resumed = record_from(&b, &session, &token, a1.id).await;
    let marker = accept(&b, &session, &token, "mark").await;
    let got = resumed.settle(&marker, Duration::from_secs(10)).await;
    let reset_first = matches!(got.first(), Some(Got::Reset { .. }));
    let b1_came = got
        .iter()
        .any(|g| matches!(g, Got::Event { label, .. } if *label == b1.label));
    assert!(
        reset_first || b1_came,
        "the resume from a1 {} on B skipped b1 {} without a reset (the client saw {seen:?}): {got:?}",
        show(a1.id),
        show(b1.id)
    );
}

// A resume on an instance that cannot read the session's history while
// other streams of the session there already receive its events: what the
// instance delivered before the new stream joined never reaches it, so its
// `reset` must carry an id at or past that. Fails before the fix: the
// reset kept the client at its own id (with history unreadable, the id
// may be a real event not here yet), below e2-e4, which the instance had
// already delivered, and they were missing without a word. B's Redis user
// may do everything but read streams.
#[tokio::test]
async fn a_resume_that_cannot_read_history_starts_past_what_its_instance_already_delivered() {
    const USER: &str = "instance-b";
    const PASSWORD: &str = "instance-b-password";
    let redis = RedisServer::start();
    let mut admin = redis.conn();
    acl_user(&mut admin, USER, PASSWORD, true);
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(USER)
        .arg("-xrange")
        .arg("-xrevrange")
        .query(&mut admin)
        .unwrap();
    let a = instance(&redis.url(), "a", true);
    let b = instance(&user_url(&redis, USER, PASSWORD), "b", true);
    let (session, token) = new_session(&a).await;
    let watching = record(&b, &session, &token).await;
    wait_subscribed(&b, 1).await;
    let mut events = Vec::new();
    for n in 1..=4 {
        events.push(accept(&a, &session, &token, &format!("e{n}")).await);
    }
    assert!(
        watching.wait_labels(&["e4"], Duration::from_secs(5)).await,
        "{:?}",
        watching.snapshot()
    );

    let resumed = record_from(&b, &session, &token, events[0].id).await;
    let owed = events[1..].to_vec();
    assert_owed(
        "a resume from e1 on b",
        &resumed,
        &a,
        &session,
        &token,
        owed,
        &events[..1],
    )
    .await;
}

/// Creates user `user` allowed everything but reading streams: its
/// instance publishes, subscribes and follows, and every history read it
/// makes is refused (`NOPERM`).
fn user_without_stream_reads(redis: &RedisServer, user: &str, password: &str) -> String {
    let mut admin = redis.conn();
    acl_user(&mut admin, user, password, true);
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg("-xrange")
        .arg("-xrevrange")
        .query(&mut admin)
        .unwrap();
    user_url(redis, user, password)
}

/// Publishes a marker on `on`, waits for it on `stream`, and asserts that
/// every event of `owed`, then the marker, arrived once in order or is
/// covered by a reset at or past it (strictly by ids: a reset first
/// excuses nothing). `seen`: the events the client already had.
async fn assert_owed(
    who: &str,
    stream: &Recorder,
    on: &Server,
    session: &str,
    token: &str,
    mut owed: Vec<Accepted>,
    seen: &[Accepted],
) {
    let marker = accept(on, session, token, "marker").await;
    let got = stream.settle(&marker, Duration::from_secs(15)).await;
    owed.push(marker);
    let seen: HashSet<String> = seen.iter().map(|a| a.label.clone()).collect();
    let verdict = judge(who, &got, &owed, &seen, false);
    assert!(verdict.is_ok(), "{}", verdict.unwrap_err());
}

/// A new session with a stream on `b` (its channel subscribed) that got
/// `label`, published on `a`.
async fn watched_on(a: &Server, b: &Server, label: &str) -> (String, String, Recorder, Accepted) {
    let (session, token) = new_session(a).await;
    let stream = record(b, &session, &token).await;
    wait_subscribed(b, 1).await;
    let first = accept(a, &session, &token, label).await;
    assert!(stream.wait_labels(&[label], Duration::from_secs(5)).await);
    (session, token, stream, first)
}

/// Publishes `n` events labelled `<prefix><i>` to `server`.
async fn accept_many(
    server: &Server,
    session: &str,
    token: &str,
    prefix: &str,
    n: usize,
) -> Vec<Accepted> {
    let mut events = Vec::new();
    for i in 1..=n {
        events.push(accept(server, session, token, &format!("{prefix}{i}")).await);
    }
    events
}

// The session's first stream on an instance whose history reads Redis
// refuses: what was published before its channel was subscribed reaches
// it neither by replay nor live. Fails before: the subscriber went on with
// live messages only and no reset, and the resume's reset kept the client
// at its own id below e2-e8.
#[tokio::test]
async fn a_first_stream_whose_history_redis_refuses_is_reset_past_what_it_missed() {
    let redis = RedisServer::start();
    let b_url = user_without_stream_reads(&redis, "instance-b", "instance-b-password");
    let a = instance(&redis.url(), "a", true);
    let b = instance(&b_url, "b", true);
    let (session, token) = new_session(&a).await;
    let events = accept_many(&a, &session, &token, "e", 8).await;

    let resumed = record_from(&b, &session, &token, events[0].id).await;
    let owed = events[1..].to_vec();
    assert_owed(
        "a resume from e1 on b",
        &resumed,
        &a,
        &session,
        &token,
        owed,
        &events[..1],
    )
    .await;
}

// An instance's subscriber reconnects (its connection was killed) and its
// catch-up read is refused: what was published while it was away reaches
// none of its streams. Fails before: they went on with live messages only,
// the hole silent; now the first event after it comes behind a reset.
#[tokio::test]
async fn a_catch_up_redis_refuses_resets_the_streams_past_the_hole() {
    let redis = RedisServer::start();
    let b_url = user_without_stream_reads(&redis, "instance-b", "instance-b-password");
    let a = instance(&redis.url(), "a", true);
    let b = instance(&b_url, "b", true);
    let (session, token, on_b, before) = watched_on(&a, &b, "before").await;

    let connects = b.stats().await["redis"]["subscriber_connects"]
        .as_u64()
        .unwrap_or(0);
    assert!(kill_pubsub(&mut redis.conn()) >= 1);
    let mut owed = vec![before];
    owed.extend(accept_many(&a, &session, &token, "away", 20).await);
    assert!(wait_resubscribed(&b, connects).await, "{}", b.stats().await);
    assert_owed("the stream on b", &on_b, &a, &session, &token, owed, &[]).await;
}

// A resume on an instance cut from Redis, from an id older than the
// subscriber's late catch-up reaches back (when the session was wanted,
// less 2 s): the events in between reach the stream neither by replay
// (unreadable) nor by the catch-up. Fails before: the reset kept the
// client at its id and they were missing; now the catch-up's start comes
// as a reset.
#[tokio::test]
async fn a_resume_older_than_a_late_catch_up_reaches_is_reset_past_the_hole() {
    let redis = RedisServer::start();
    let link = link::Link::start(redis.port).await;
    let a = instance(&redis.url(), "a", true);
    let b = instance(&format!("redis://127.0.0.1:{}/", link.port), "b", true);
    let (session, token) = new_session(&a).await;
    let events = accept_many(&a, &session, &token, "e", 6).await;
    // Older than the catch-up's margin by the time b wants the session.
    tokio::time::sleep(Duration::from_secs(3)).await;

    link.cut();
    let from = events[0].id;
    let opening = tokio::spawn({
        let url = b.url(&format!("/sessions/{session}/events?token={token}"));
        async move {
            let res = reqwest::Client::new()
                .get(url)
                .header("last-event-id", show(from))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            let mut sse = SseClient::from_response(res);
            sse.expect_connected().await;
            Recorder::start(sse)
        }
    });
    // Long enough for the subscription to be given up as late and the
    // history read to fail.
    tokio::time::sleep(Duration::from_secs(4)).await;
    link.restore();
    let resumed = opening.await.unwrap();
    wait_subscribed(&b, 1).await;
    let owed = events[1..].to_vec();
    assert_owed(
        "a resume from e1 on b",
        &resumed,
        &a,
        &session,
        &token,
        owed,
        &events[..1],
    )
    .await;
}

// The last stream of a session on b closes while b's link to Redis stalls,
// so its channel is not released yet when a client resumes there from an
// older id (history unreadable: the reset keeps it at that id). The
// subscriber's cursor from the closed stream's time goes on, and the new
// streams' hub slot starts empty: nothing at or before that cursor reaches
// them. Fails before: e3-e5 were missing behind a reset at e2.
#[tokio::test]
async fn a_resume_while_the_previous_streams_channel_is_still_held_is_reset_past_its_cursor() {
    let redis = RedisServer::start();
    let link = link::Link::start(redis.port).await;
    let a = instance(&redis.url(), "a", true);
    let b = instance(&format!("redis://127.0.0.1:{}/", link.port), "b", true);
    let (session, token) = new_session(&a).await;
    let old = record(&b, &session, &token).await;
    wait_subscribed(&b, 1).await;
    let events = accept_many(&a, &session, &token, "e", 5).await;
    assert!(old.wait_labels(&["e5"], Duration::from_secs(5)).await);

    link.cut();
    drop(old);
    // b notices the close and asks Redis to release the channel, which
    // waits on the cut link.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resumed = record_from(&b, &session, &token, events[1].id).await;
    link.restore();
    wait_subscribed(&b, 1).await;
    let owed = events[2..].to_vec();
    assert_owed(
        "a resume from e2 on b",
        &resumed,
        &a,
        &session,
        &token,
        owed,
        &events[..2],
    )
    .await;
}

// The instance's catch-up read was refused, so its next event of the
// session must come behind a reset; before one arrives, the session's last
// stream there closes and a client resumes at once, while the subscriber
// is busy with another session's subscription (a slow link): the channel
// is never released, and the new generation's streams get the events
// after the hole. Fails before: the hole's events were missing behind a
// reset that stopped at the cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hole_the_catch_up_could_not_read_is_reset_for_streams_that_resume_before_the_next_event()
{
    const USER: &str = "instance-b";
    const PASSWORD: &str = "instance-b-password";
    let redis = RedisServer::start();
    let link = link::Link::start(redis.port).await;
    user_without_stream_reads(&redis, USER, PASSWORD);
    let b_url = format!("redis://{USER}:{PASSWORD}@127.0.0.1:{}/", link.port);
    let a = instance(&redis.url(), "a", true);
    let b = instance(&b_url, "b", true);
    let (session, token, old, e1) = watched_on(&a, &b, "e1").await;

    // b's subscriber away while a publishes: b's user refuses new logins.
    let mut admin = redis.conn();
    let connects = b.stats().await["redis"]["subscriber_connects"]
        .as_u64()
        .unwrap_or(0);
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(USER)
        .arg("off")
        .query(&mut admin)
        .unwrap();
    assert!(kill_pubsub_of(&mut admin, Some(USER)) >= 1);
    let mut owed = accept_many(&a, &session, &token, "away", 3).await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(USER)
        .arg("on")
        .query(&mut admin)
        .unwrap();
    assert!(wait_resubscribed(&b, connects).await, "{}", b.stats().await);

    // The subscriber busy with another session over a slow link.
    link.set_delay(Duration::from_millis(300));
    let (other, other_token) = new_session(&a).await;
    let busy = tokio::spawn({
        let url = b.url(&format!("/sessions/{other}/events?token={other_token}"));
        async move {
            reqwest::Client::new()
                .get(url)
                .send()
                .await
                .map(|r| r.status())
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(old);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resumed = record_from(&b, &session, &token, e1.id).await;
    let _ = busy.await;
    link.set_delay(Duration::ZERO);
    owed.push(accept(&a, &session, &token, "after").await);
    assert_owed(
        "a resume from e1 on b",
        &resumed,
        &a,
        &session,
        &token,
        owed,
        &[e1],
    )
    .await;
}
