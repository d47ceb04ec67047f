//! Past one Redis: a real Redis Cluster (3 primaries + 3 replicas, sharded
//! Pub/Sub) and a real Sentinel setup (primary, replica, 3 sentinels), each
//! started here on free ports, under real `sse-scale` processes. Delivery
//! across instances exactly once and in order on every shard, per-shard
//! subscriptions only for the sessions an instance holds, and nothing
//! silently lost when a primary is killed or a slot moves under traffic.

#[path = "support/redis_cluster.rs"]
mod redis_cluster;
#[path = "support/redis_sentinel.rs"]
mod redis_sentinel;
#[path = "support/redis_server.rs"]
mod redis_server;
mod support;
#[path = "support/traffic.rs"]
mod traffic;

use std::collections::BTreeSet;
use std::time::Duration;

use redis_cluster::RedisCluster;
use redis_sentinel::RedisSentinel;
use serde_json::{json, Value};
use support::*;
use traffic::{assert_exactly_once, Publisher, Resumer, Seen};

const T: Duration = Duration::from_secs(10);

fn instance(name: &str, redis: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("INSTANCE_ID", name),
        ("FF_REDIS_SSE_BROADCAST", "true"),
        ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
        ("RATE_LIMIT_STREAMS_PER_MIN", "0"),
        ("SSE_RETRY_MS", "200"),
        ("SSE_HEARTBEAT_SECS", "1"),
    ];
    env.extend_from_slice(redis);
    Server::start(&env)
}

fn on_cluster(cluster: &RedisCluster, name: &str) -> Server {
    instance(name, &[("REDIS_CLUSTER_NODES", &cluster.seed_urls())])
}

fn on_sentinel(sentinel: &RedisSentinel, name: &str) -> Server {
    instance(
        name,
        &[
            ("REDIS_SENTINEL_NODES", &sentinel.sentinel_urls()),
            ("REDIS_SENTINEL_MASTER", sentinel.master_name()),
        ],
    )
}

/// The session's channel in a cluster: the id is the hash tag.
fn channel(session: &str) -> String {
    format!("sse:session:{{{session}}}")
}

/// Sessions created on `server` until every primary owns at least one;
/// returns (id, token, owner port), one per primary.
async fn one_session_per_primary(
    cluster: &RedisCluster,
    server: &Server,
) -> Vec<(String, String, u16)> {
    let primaries: BTreeSet<u16> = cluster.primaries().into_iter().collect();
    assert_eq!(primaries.len(), 3, "three primaries");
    let mut found = Vec::new();
    let mut owners = BTreeSet::new();
    for _ in 0..200 {
        let (id, token) = new_session(server).await;
        let owner = cluster.owner_of_slot(cluster.slot_of(&channel(&id)));
        if owners.insert(owner) {
            found.push((id, token, owner));
        }
        if owners == primaries {
            return found;
        }
    }
    panic!("200 sessions did not cover every primary: {owners:?} of {primaries:?}");
}

async fn subscribed(server: &Server, channels: u64) {
    let ok = eventually(T, || async {
        server.stats().await["redis"]["subscribed_channels"].as_u64() >= Some(channels)
    })
    .await;
    assert!(
        ok,
        "{} never subscribed {channels}: {}",
        server.addr,
        server.stats().await
    );
}

/// Opens a stream with `Last-Event-ID` and reads until `n` numbered events
/// or a reset arrived.
async fn resume(
    server: &Server,
    session: &str,
    token: &str,
    last: &str,
    n: usize,
) -> (Vec<u64>, bool) {
    let res = client()
        .get(server.url(&format!("/sessions/{session}/events?token={token}")))
        .header("last-event-id", last)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut sse = SseClient::from_response(res);
    let mut numbers = Vec::new();
    while numbers.len() < n {
        let Some(ev) = sse.next_event(T).await else {
            break;
        };
        match ev.event.as_deref() {
            Some("reset") => return (numbers, true),
            Some("n") => numbers.push(ev.json().as_u64().unwrap()),
            _ => {}
        }
    }
    (numbers, false)
}

/// A client that was at event `k` (its id in `seen`) resumes on `server`:
/// it must get `k+1..=n` exactly once and in order, or a reset.
async fn assert_resume_exact_or_reset(
    server: &Server,
    session: &str,
    token: &str,
    seen: &Seen,
    k: usize,
    n: u64,
) {
    let last = &seen.ids[k - 1];
    assert_eq!(seen.numbers[k - 1], k as u64);
    let want: Vec<u64> = (k as u64 + 1..=n).collect();
    let (got, reset) = resume(server, session, token, last, want.len()).await;
    eprintln!(
        "resume from event {k} of {n}: {}",
        if reset { "reset" } else { "exact replay" }
    );
    if reset {
        assert!(
            got.is_empty(),
            "a reset must come before any replayed event: {got:?}"
        );
    } else {
        assert_eq!(
            got, want,
            "resume from event {k} ({last}) on {}",
            server.addr
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_on_every_primary_cross_instances_exactly_once_and_in_order() {
    let cluster = RedisCluster::start();
    let a = on_cluster(&cluster, "a");
    let b = on_cluster(&cluster, "b");
    let c = on_cluster(&cluster, "c");
    let sessions = one_session_per_primary(&cluster, &a).await;
    let mut streams = Vec::new();
    for (id, token, _) in &sessions {
        let mut sse = SseClient::open(&a, id, token).await;
        sse.expect_connected().await;
        streams.push(sse);
    }
    subscribed(&a, 3).await;
    for i in 1..=20u64 {
        for (id, token, _) in &sessions {
            let via = if i % 2 == 0 { &b } else { &c };
            publish(via, id, token, "n", json!(i)).await;
        }
    }
    for (sse, (id, _, owner)) in streams.iter_mut().zip(&sessions) {
        let mut got = Vec::new();
        while got.len() < 20 {
            let ev = sse.next_event(T).await.expect("the stream ended");
            assert_eq!(ev.event.as_deref(), Some("n"), "{ev:?}");
            got.push(ev.json().as_u64().unwrap());
        }
        assert_eq!(
            got,
            (1..=20).collect::<Vec<u64>>(),
            "session {id} on primary {owner}"
        );
        sse.expect_silence(Duration::from_millis(300)).await;
    }
    // Each session's channel is subscribed once, by the instance holding
    // its stream, on the node that owns its slot, and nowhere else.
    for (id, _, owner) in &sessions {
        for node in cluster.primaries() {
            let count = cluster.shard_numsub(node, &[channel(id)])[0].1;
            let expected = i64::from(node == *owner);
            assert_eq!(
                count, expected,
                "SHARDNUMSUB of {id} on node {node} (owner {owner})"
            );
        }
    }
    let (sa, sb) = (a.stats().await, b.stats().await);
    assert_eq!(sa["redis"]["topology"], "cluster", "{sa}");
    assert_eq!(sa["redis"]["subscribed_channels"], 3, "{sa}");
    assert_eq!(
        sb["redis"]["subscribed_channels"], 0,
        "b holds no stream: {sb}"
    );
    assert_eq!(sa["redis"]["received"], 60, "{sa}");
}

#[tokio::test(flavor = "multi_thread")]
async fn announcements_gates_and_rate_limits_work_on_a_cluster() {
    let cluster = RedisCluster::start();
    let a = on_cluster(&cluster, "a");
    let b = instance(
        "b",
        &[
            ("REDIS_CLUSTER_NODES", &cluster.seed_urls()),
            ("RATE_LIMIT_SESSIONS_PER_MIN", "5"),
        ],
    );
    let (id, token) = new_session(&a).await;
    let mut sse = SseClient::open(&a, &id, &token).await;
    sse.expect_connected().await;
    subscribed(&a, 1).await;
    // b's client connects to the cluster in the background; until it has,
    // its publishes are delivered locally and held (an announcement would
    // stay on b). Wait until one went through Redis.
    let mut n = 0;
    let through = eventually(T, || {
        n += 1;
        let (b, id, token) = (&b, id.clone(), token.clone());
        async move {
            publish(b, &id, &token, "warmup", json!(n)).await;
            b.stats().await["redis"]["published_redis"].as_u64() >= Some(1)
        }
    })
    .await;
    assert!(
        through,
        "b never published through Redis: {}",
        b.stats().await
    );
    // The warm-up events (some held and flushed from b's outbox).
    let ok = eventually(T, || async { b.stats().await["redis"]["outbox_len"] == 0 }).await;
    assert!(ok, "{}", b.stats().await);
    // An announcement published on b reaches the stream on a.
    let res = client()
        .post(b.url("/announcements"))
        .bearer_auth(ADMIN)
        .json(&json!({ "type": "notice", "data": "maintenance" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202, "{:?}", res.text().await);
    let ev = loop {
        let ev = sse.next_event(T).await.expect("announcement");
        if ev.event.as_deref() != Some("warmup") {
            break ev;
        }
    };
    assert_eq!(ev.event.as_deref(), Some("notice"), "{ev:?}");

    // A pipeline runs on a; its gate is answered through b (control bus).
    let res = post(
        &a,
        &token,
        &format!("/sessions/{id}/pipeline"),
        json!({ "gate": true, "step_ms": 10, "sections_per_stage": 1 }),
    )
    .await;
    assert_eq!(res.status(), 202);
    let run: Value = res.json().await.unwrap();
    let run_id = run["run_id"].as_str().unwrap().to_owned();
    let gate = format!("/sessions/{id}/pipeline/{run_id}/gate");
    let ok = eventually(T, || async {
        post(&b, &token, &gate, json!({ "approve": true }))
            .await
            .status()
            == 202
    })
    .await;
    assert!(ok, "the gate answer through b was never relayed to a");

    // The session limit counts in the cluster, across instances: b allows
    // 5 per minute per client address, and the session created on a above
    // is in the same window.
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(
            client()
                .post(b.url("/sessions"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(codes, [201, 201, 201, 201, 429, 429], "{codes:?}");
    assert_eq!(b.stats().await["rate_limit_fallback_checks"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_killed_under_traffic_loses_nothing_silently() {
    let mut cluster = RedisCluster::start();
    let a = on_cluster(&cluster, "a");
    let b = on_cluster(&cluster, "b");
    let sessions = one_session_per_primary(&cluster, &a).await;
    // The session on the primary that dies, and one on a primary that stays.
    let (doomed, other) = (&sessions[0], &sessions[1]);
    let readers: Vec<Resumer> = [doomed, other]
        .iter()
        .map(|(id, token, _)| Resumer::start(format!("http://{}", a.addr), id, token))
        .collect();
    for r in &readers {
        r.connected().await;
    }
    subscribed(&a, 2).await;
    let publishers: Vec<Publisher> = [doomed, other]
        .iter()
        .map(|(id, token, _)| Publisher::start(&b, id, token))
        .collect();
    for p in &publishers {
        p.wait_for(40).await;
    }
    cluster.kill(doomed.2);
    let promoted = cluster.wait_promoted(doomed.2, Duration::from_secs(20));
    for p in &publishers {
        p.wait_for(p.published() + 100).await;
    }
    let mut counts = Vec::new();
    for p in publishers {
        counts.push(p.finish().await);
    }
    let mut seen = Vec::new();
    for (r, n) in readers.into_iter().zip(&counts) {
        seen.push(r.finish(*n as usize).await);
    }
    assert_exactly_once(
        "the stream of the session on the killed primary",
        &seen[0],
        counts[0],
    );
    assert_exactly_once(
        "the stream of a session on another primary",
        &seen[1],
        counts[1],
    );
    assert_eq!(
        cluster.owner_of_slot(cluster.slot_of(&channel(&doomed.0))),
        promoted
    );
    // A client that was at event 30 (before the kill) resumes on b.
    for ((id, token, _), (s, n)) in [doomed, other].iter().zip(seen.iter().zip(&counts)) {
        assert_resume_exact_or_reset(&b, id, token, s, 30, *n).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_moved_under_traffic_keeps_delivering() {
    let cluster = RedisCluster::start();
    let a = on_cluster(&cluster, "a");
    let b = on_cluster(&cluster, "b");
    let (id, token) = new_session(&a).await;
    let slot = cluster.slot_of(&channel(&id));
    let from = cluster.owner_of_slot(slot);
    let to = cluster
        .primaries()
        .into_iter()
        .find(|p| *p != from)
        .expect("another primary");
    let reader = Resumer::start(format!("http://{}", a.addr), &id, &token);
    reader.connected().await;
    subscribed(&a, 1).await;
    let publisher = Publisher::start(&b, &id, &token);
    publisher.wait_for(40).await;
    cluster.move_slot(slot, to);
    publisher.wait_for(publisher.published() + 100).await;
    assert_eq!(cluster.owner_of_slot(slot), to);
    let ok = eventually(T, || async {
        cluster.shard_numsub(to, &[channel(&id)])[0].1 == 1
            && cluster.shard_numsub(from, &[channel(&id)])[0].1 == 0
    })
    .await;
    assert!(
        ok,
        "the channel did not follow its slot to node {to}: on {to} {:?}, on {from} {:?}; {}",
        cluster.shard_numsub(to, &[channel(&id)]),
        cluster.shard_numsub(from, &[channel(&id)]),
        a.stats().await
    );
    let stats = a.stats().await;
    assert!(
        stats["redis"]["resubscribes"].as_u64() >= Some(1),
        "{stats}"
    );
    let n = publisher.finish().await;
    let seen = reader.finish(n as usize).await;
    assert_exactly_once("the stream of the moved session", &seen, n);
    assert_resume_exact_or_reset(&b, &id, &token, &seen, 30, n).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sentinel_failover_under_traffic_loses_nothing_silently() {
    let mut sentinel = RedisSentinel::start("sse-primary");
    let a = on_sentinel(&sentinel, "a");
    let b = on_sentinel(&sentinel, "b");
    let (id, token) = new_session(&a).await;
    let reader = Resumer::start(format!("http://{}", a.addr), &id, &token);
    reader.connected().await;
    subscribed(&a, 1).await;
    let publisher = Publisher::start(&b, &id, &token);
    publisher.wait_for(40).await;
    let old = sentinel.kill_primary();
    let new = sentinel.wait_failover(old, Duration::from_secs(30));
    assert_ne!(old, new);
    publisher.wait_for(publisher.published() + 100).await;
    let n = publisher.finish().await;
    let seen = reader.finish(n as usize).await;
    assert_exactly_once("the stream across the failover", &seen, n);
    for server in [&a, &b] {
        let stats = server.stats().await;
        assert_eq!(stats["redis"]["topology"], "sentinel", "{stats}");
        assert_eq!(stats["redis"]["outbox_len"], 0, "{stats}");
    }
    assert_resume_exact_or_reset(&b, &id, &token, &seen, 30, n).await;
}

#[test]
fn two_redis_topologies_at_once_stop_the_server_with_exit_code_2() {
    for (env, names) in [
        (
            vec![
                ("REDIS_URL", "redis://127.0.0.1:1"),
                ("REDIS_CLUSTER_NODES", "redis://127.0.0.1:2"),
            ],
            "REDIS_CLUSTER_NODES",
        ),
        (
            vec![("REDIS_SENTINEL_NODES", "redis://127.0.0.1:3")],
            "REDIS_SENTINEL_MASTER",
        ),
        (
            vec![("REDIS_CLUSTER_NODES", "redis://127.0.0.1:2,http://x")],
            "REDIS_CLUSTER_NODES",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sse-scale"))
            .env_clear()
            .env("PORT", "0")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(
            stderr.contains(names),
            "{env:?} must name {names}: {stderr}"
        );
    }
}
