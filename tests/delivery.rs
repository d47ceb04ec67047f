//! Nothing lost: numbered events published at a steady pace must reach
//! every client exactly once and in order while instances are killed,
//! restarted one after another, or lose Redis; clients reconnect the way a
//! browser's `EventSource` does (after the `retry:` hint, with
//! `Last-Event-ID`, giving up on any non-200 answer). Real `sse-scale`
//! processes, a real `redis-server` and the shipped HAProxy config.

#[path = "support/balancer.rs"]
mod balancer;
#[path = "support/redis_server.rs"]
mod redis_server;
mod support;
#[path = "support/traffic.rs"]
mod traffic;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer::Balancer;
use redis_server::RedisServer;
use serde_json::{json, Value};
use support::*;
use traffic::{assert_exactly_once, Publisher, Resumer};

const T: Duration = Duration::from_secs(10);

/// An instance of a Redis fleet with the flag on, quick retry hints and a
/// short drain, listening on `port` (0: any) so it can be restarted in place.
fn instance(redis: &RedisServer, name: &str, port: u16) -> Server {
    Server::start(&[
        ("REDIS_URL", &redis.url()),
        ("INSTANCE_ID", name),
        ("FF_REDIS_SSE_BROADCAST", "true"),
        ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
        ("RATE_LIMIT_STREAMS_PER_MIN", "0"),
        ("SSE_RETRY_MS", "200"),
        ("SSE_HEARTBEAT_SECS", "1"),
        ("SHUTDOWN_DRAIN_SECS", "1"),
        ("SHUTDOWN_GRACE_SECS", "5"),
        ("PORT", &port.to_string()),
    ])
}

fn port_of(server: &Server) -> u16 {
    server.addr.rsplit(':').next().unwrap().parse().unwrap()
}

async fn haproxy(apps: [&str; 3]) -> Balancer {
    Balancer::haproxy("haproxy/haproxy.cfg", &apps, &[]).await
}

#[tokio::test]
async fn a_killed_instance_s_client_resumes_elsewhere_exactly_once() {
    let redis = RedisServer::start();
    let mut servers: Vec<Option<Server>> = ["app1", "app2", "app3"]
        .iter()
        .map(|id| Some(instance(&redis, id, 0)))
        .collect();
    let addrs: Vec<String> = servers
        .iter()
        .map(|s| s.as_ref().unwrap().addr.clone())
        .collect();
    let lb = haproxy([&addrs[0], &addrs[1], &addrs[2]]).await;
    let (session, token) = new_session(servers[0].as_ref().unwrap()).await;

    let client = Resumer::start(format!("http://{}", lb.addr), &session, &token);
    let pinned = client.connected().await;
    let victim = ["app1", "app2", "app3"]
        .iter()
        .position(|x| *x == pinned)
        .unwrap();
    let survivor = servers[(victim + 1) % 3].as_ref().unwrap();
    let publisher = Publisher::start(survivor, &session, &token);

    publisher.wait_for(50).await;
    // SIGKILL: no drain, no goodbye; the stream just breaks.
    drop(servers[victim].take());
    publisher.wait_for(150).await;
    let n = publisher.finish().await;
    let seen = client.finish(n as usize).await;
    assert_exactly_once("client", &seen, n);
    assert!(
        seen.instances.len() >= 2,
        "no reconnect: {:?}",
        seen.instances
    );
    assert!(
        seen.instances[1..].iter().all(|i| *i != pinned),
        "reconnected to the dead instance? {:?}",
        seen.instances
    );
}

#[tokio::test]
async fn a_rolling_restart_loses_nothing() {
    let redis = RedisServer::start();
    let names = ["app1", "app2", "app3"];
    let mut servers: Vec<Server> = names.iter().map(|id| instance(&redis, id, 0)).collect();
    let ports: Vec<u16> = servers.iter().map(port_of).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let lb = haproxy([&addrs[0], &addrs[1], &addrs[2]]).await;

    // Two sessions, two browser tabs each, all through the balancer.
    let mut sessions = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (session, token) = new_session(&servers[0]).await;
        for _ in 0..2 {
            let c = Resumer::start(format!("http://{}", lb.addr), &session, &token);
            c.connected().await;
            clients.push((session.clone(), c));
        }
        sessions.push((session, token));
    }
    let publishers: Vec<Publisher> = sessions
        .iter()
        .map(|(s, t)| Publisher::start(&servers[2], s, t))
        .collect();

    for i in 0..3 {
        // Publish through an instance that stays up during this step.
        for p in &publishers {
            p.retarget(&servers[(i + 1) % 3]);
        }
        let before = publishers[0].published();
        servers[i].signal("TERM");
        let code = servers[i].wait_exit(Duration::from_secs(8));
        assert_eq!(code, Some(0), "{} did not exit cleanly", names[i]);
        servers[i] = instance(&redis, names[i], ports[i]);
        // Let HAProxy's health check (rise 2 x 1 s) take it back in.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        for p in &publishers {
            p.wait_for(before + 20).await;
        }
    }
    let mut totals = BTreeMap::new();
    for ((session, _), p) in sessions.iter().zip(publishers) {
        totals.insert(session.clone(), p.finish().await);
    }
    for (i, (session, c)) in clients.into_iter().enumerate() {
        let n = totals[&session];
        let seen = c.finish(n as usize).await;
        assert_exactly_once(&format!("client {i}"), &seen, n);
        assert!(
            seen.instances.len() >= 2,
            "client {i} never moved: {:?}",
            seen.instances
        );
    }
}

#[tokio::test]
async fn a_redis_outage_delays_cross_instance_events_but_loses_none() {
    // Killed and restarted with its data (append-only file): restarted
    // empty, what it lost may reset the other instance's streams instead
    // (docs/delivery.md, "What is guaranteed").
    let mut redis = RedisServer::start_persistent();
    let a = instance(&redis, "a", 0);
    let b = instance(&redis, "b", 0);
    let (session, token) = new_session(&a).await;
    let on_a = Resumer::start(format!("http://{}", a.addr), &session, &token);
    let on_b = Resumer::start(format!("http://{}", b.addr), &session, &token);
    on_a.connected().await;
    on_b.connected().await;
    let ok = eventually(T, || async {
        b.stats().await["redis"]["subscribed_channels"].as_u64() >= Some(1)
    })
    .await;
    assert!(ok, "b never subscribed");

    let publisher = Publisher::start(&a, &session, &token);
    publisher.wait_for(40).await;
    redis.stop();
    let during = publisher.published();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        publisher.published() > during + 50,
        "publishing stalled while Redis was down"
    );
    // Local delivery went on; the other instance waits for Redis.
    let stats = a.stats().await;
    assert!(stats["redis"]["outbox_len"].as_u64() > Some(0), "{stats}");
    redis.restart();
    publisher.wait_for(publisher.published() + 100).await;
    let n = publisher.finish().await;

    let seen_a = on_a.finish(n as usize).await;
    let seen_b = on_b.finish(n as usize).await;
    assert_exactly_once("client on the publishing instance", &seen_a, n);
    assert_exactly_once("client on the other instance", &seen_b, n);
    let stats = a.stats().await;
    assert_eq!(stats["redis"]["outbox_len"], 0, "{stats}");
    assert!(
        stats["redis"]["outbox_flushed"].as_u64() > Some(50),
        "{stats}"
    );
    assert_eq!(stats["redis"]["outbox_dropped"], 0, "{stats}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_and_memory_stays_bounded() {
    let server = Server::start(&[
        ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
        ("SSE_CLIENT_QUEUE", "64"),
        ("SSE_WRITE_TIMEOUT_SECS", "2"),
        ("HISTORY_MAXLEN", "16"),
    ]);
    let (session, token) = new_session(&server).await;
    // A reader that never reads: the request goes out, the response sits
    // in the socket until the buffers are full.
    use tokio::io::AsyncWriteExt;
    let mut stalled = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    stalled
        .write_all(
            format!("GET /sessions/{session}/events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut healthy = SseClient::open(&server, &session, &token).await;
    healthy.expect_connected().await;
    let ok = eventually(T, || async { server.stats().await["open_streams"] == 2 }).await;
    assert!(ok);

    let before = server.rss();
    let payload = "x".repeat(32 * 1024);
    let events = 1500; // ~48 MiB in all
    let mut peak = before;
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < events {
            let ev = healthy.next_event(T).await.expect("healthy stream ended");
            assert_eq!(ev.event.as_deref(), Some("blob"));
            got += 1;
        }
        (got, healthy)
    });
    for n in 0..events {
        let res = post(
            &server,
            &token,
            &format!("/sessions/{session}/events"),
            json!({ "type": "blob", "data": payload }),
        )
        .await;
        assert_eq!(res.status(), 202, "publish {n}");
        if n % 100 == 0 {
            peak = peak.max(server.rss());
        }
    }
    // The reading client got everything, unaffected by the stalled one.
    let (got, _healthy) = reader.await.unwrap();
    assert_eq!(got, events);
    peak = peak.max(server.rss());
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 24 << 20,
        "server RSS grew by {} MiB while a client stalled with 48 MiB published",
        growth >> 20
    );
    // The stalled connection is closed and counted; only the reader is left.
    let cut = eventually(T, || async {
        let s = server.stats().await;
        s["open_streams"] == 1
            && (s["stalled_writes_cut"].as_u64() >= Some(1)
                || s["slow_consumers_cut"].as_u64() >= Some(1))
    })
    .await;
    assert!(cut, "stalled client still open: {}", server.stats().await);
    drop(stalled);
}

async fn open_from(server: &Server, session: &str, token: &str, last: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(server.url(&format!("/sessions/{session}/events?token={token}")))
        .header("last-event-id", last)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn resume_replays_what_history_holds_and_resets_beyond_it() {
    let server = Server::start(&[("HISTORY_MAXLEN", "5"), ("RATE_LIMIT_PUBLISH_PER_SEC", "0")]);
    let (session, token) = new_session(&server).await;
    let mut ids = vec![String::new()];
    for n in 1..=10 {
        ids.push(publish(&server, &session, &token, "n", json!(n)).await);
    }

    // Within history: 8, 9, 10, then live.
    let mut sse = SseClient::from_response(open_from(&server, &session, &token, &ids[7]).await);
    sse.expect_connected().await;
    for n in 8..=10 {
        let ev = sse.next_event(T).await.unwrap();
        assert_eq!(
            (ev.json(), ev.id.as_deref()),
            (json!(n), Some(ids[n as usize].as_str()))
        );
    }
    let live = publish(&server, &session, &token, "n", json!(11)).await;
    let ev = sse.next_event(T).await.unwrap();
    assert_eq!((ev.json(), ev.id), (json!(11), Some(live.clone())));

    // Too old (history holds 7..=11): reset with the oldest id, then live
    // only; the reset's id lets the next reconnect continue from now.
    let mut sse = SseClient::from_response(open_from(&server, &session, &token, &ids[1]).await);
    sse.expect_connected().await;
    let reset = sse.next_event(T).await.unwrap();
    assert_eq!(reset.event.as_deref(), Some("reset"));
    assert_eq!(reset.json()["oldest_id"], ids[7].as_str());
    assert_eq!(reset.json()["last_event_id"], ids[1].as_str());
    assert_eq!(reset.id, Some(live));
    let next = publish(&server, &session, &token, "n", json!(12)).await;
    let ev = sse.next_event(T).await.unwrap();
    assert_eq!((ev.json(), ev.id), (json!(12), Some(next)));

    // The query parameter works for clients that cannot set the header.
    let res = reqwest::Client::new()
        .get(server.url(&format!(
            "/sessions/{session}/events?token={token}&last_event_id={}",
            ids[9]
        )))
        .send()
        .await
        .unwrap();
    let mut sse = SseClient::from_response(res);
    sse.expect_connected().await;
    for n in 10..=12 {
        assert_eq!(sse.next_event(T).await.unwrap().json(), json!(n));
    }

    // A malformed id is a clear 400, not a silent fresh start.
    let res = open_from(&server, &session, &token, "yesterday").await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_last_event_id");
    // So are two ids: either guess could skip what the client missed.
    let base = format!("/sessions/{session}/events?token={token}");
    let c = reqwest::Client::new();
    let twice = format!("{base}&last_event_id={}&last_event_id={}", ids[9], ids[1]);
    let res = c.get(server.url(&twice)).send().await.unwrap();
    assert_eq!(res.status(), 400);
    let res = c
        .get(server.url(&base))
        .header("last-event-id", ids[9].as_str())
        .header("last-event-id", ids[1].as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    // An empty header is no id: the query's id counts.
    let res = c
        .get(server.url(&format!("{base}&last_event_id={}", ids[10])))
        .header("last-event-id", "")
        .send()
        .await
        .unwrap();
    let mut sse = SseClient::from_response(res);
    sse.expect_connected().await;
    assert_eq!(sse.next_event(T).await.unwrap().json(), json!(11));
    assert!(server.stats().await["resets"].as_u64() >= Some(1));
}

/// What a phase-1 drain test saw: accepted publishes (number, when the 202
/// came back) and the client's side (numbers received, when resets came).
#[derive(Default, Debug)]
struct DrainLog {
    /// Publish number, when its 202 arrived, and the instance and event id
    /// it names.
    accepted: Vec<(u64, std::time::Instant, String, String)>,
    received: Vec<u64>,
    /// When each `reset` arrived, the instance that sent it and the id it
    /// carries (where the client stands after it).
    resets: Vec<(std::time::Instant, String, String)>,
    instances: Vec<String>,
}

/// `<ms>-<seq>` as a comparable pair.
fn event_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// A browser-like client through `lb`, pinned by `X-Session-ID`: reads the
/// stream, reconnects with `Last-Event-ID` whenever it ends, records what
/// arrives.
async fn drain_reader(
    lb: String,
    session: String,
    token: String,
    log: Arc<Mutex<DrainLog>>,
    stop: Arc<AtomicBool>,
) {
    let c = reqwest::Client::new();
    let mut last: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut req = c
            .get(format!("{lb}/sessions/{session}/events?token={token}"))
            .header("x-session-id", &session);
        if let Some(id) = &last {
            req = req.header("last-event-id", id);
        }
        let Ok(res) = req.send().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if res.status() != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut sse = SseClient::from_response(res);
        // Heartbeats come every second: three without a block is a dead
        // stream.
        while let Some(block) = tokio::time::timeout(
            Duration::from_secs(3),
            sse.next_block(Duration::from_secs(30)),
        )
        .await
        .ok()
        .flatten()
        {
            if let Some(id) = &block.id {
                last = Some(id.clone());
            }
            let mut l = log.lock().unwrap();
            match block.event.as_deref() {
                Some("connected") => l.instances.push(
                    block.json()["instance_id"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                ),
                Some("reset") => {
                    let from = l.instances.last().cloned().unwrap_or_default();
                    let id = block.id.clone().unwrap_or_default();
                    l.resets.push((std::time::Instant::now(), from, id));
                }
                Some("n") => l.received.push(block.json().as_u64().unwrap()),
                _ => {}
            }
            drop(l);
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Phase 1 behind a header-affinity balancer, flag off everywhere: the
/// instance holding a client's stream is drained while the client keeps
/// publishing through the balancer every 100 ms. Every publish the server
/// accepted reaches the client after it reconnects, unless the client was
/// told `reset` after the publish was accepted — never a silent gap.
async fn phase1_drain_loses_no_accepted_publish(lb: &Balancer, servers: &mut [Server]) {
    let (session, token) = new_session(&servers[0]).await;
    let log = Arc::new(Mutex::new(DrainLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let base = format!("http://{}", lb.addr);
    let reader = tokio::spawn(drain_reader(
        base.clone(),
        session.clone(),
        token.clone(),
        log.clone(),
        stop.clone(),
    ));
    assert!(
        eventually(T, || async { !log.lock().unwrap().instances.is_empty() }).await,
        "the client never connected"
    );
    let holder = log.lock().unwrap().instances[0].clone();
    let c = reqwest::Client::new();
    let publish = |n: u64| {
        c.post(format!("{base}/sessions/{session}/events"))
            .bearer_auth(&token)
            .header("x-session-id", &session)
            .json(&json!({ "type": "n", "data": n }))
            .send()
    };
    let started = std::time::Instant::now();
    let mut n = 0;
    let mut signalled = false;
    while started.elapsed() < Duration::from_secs(8) {
        if !signalled && started.elapsed() > Duration::from_secs(1) {
            let i = servers
                .iter()
                .position(|s| {
                    s.log
                        .lock()
                        .unwrap()
                        .contains(&format!("instance_id={holder}"))
                })
                .expect("the holder is one of the servers");
            servers[i].signal("TERM");
            signalled = true;
        }
        n += 1;
        if let Ok(res) = publish(n).await {
            if res.status() == 202 {
                let instance = res
                    .headers()
                    .get("x-instance-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let body: serde_json::Value = res.json().await.unwrap_or_default();
                let id = body["id"].as_str().unwrap_or("").to_owned();
                log.lock()
                    .unwrap()
                    .accepted
                    .push((n, std::time::Instant::now(), instance, id));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    let log = log.lock().unwrap();
    let received: std::collections::BTreeSet<u64> = log.received.iter().copied().collect();
    let accepted_after_drain = log
        .accepted
        .iter()
        .filter(|(_, at, _, _)| at.duration_since(started) > Duration::from_secs(5))
        .count();
    assert!(
        accepted_after_drain > 10,
        "publishing stopped after the drain: {log:?}"
    );
    assert!(log.instances.len() >= 2, "the client never moved: {log:?}");
    for (n, at, instance, id) in &log.accepted {
        if received.contains(n) {
            continue;
        }
        // Told: a reset arrived after the publish was accepted, or a reset
        // from the instance that accepted it already stood at or past its
        // id (the stream opened just after the publish was recorded, and
        // its 202 was still on its way).
        let told = log.resets.iter().any(|(reset_at, from, reset_id)| {
            reset_at > at
                || (from == instance
                    && matches!((event_id(reset_id), event_id(id)), (Some(r), Some(e)) if r >= e))
        });
        assert!(
            told,
            "{:?}: publish {n} was accepted, never delivered, and no reset followed: {log:?}",
            lb.kind
        );
    }
}

// The runbook's phase-1 drain, walked with the shipped header-affinity
// files: whatever the timing of the balancer's checks and the client's
// reconnect, an accepted event is delivered or followed by a `reset`.
#[tokio::test]
async fn a_phase1_drain_loses_no_accepted_publish_behind_haproxy_and_nginx() {
    let env = [
        ("SHUTDOWN_UNREADY_SECS", "3"),
        ("SHUTDOWN_DRAIN_SECS", "1"),
        ("SHUTDOWN_GRACE_SECS", "10"),
        ("SSE_HEARTBEAT_SECS", "1"),
    ];
    for kind in ["haproxy", "nginx"] {
        let mut servers: Vec<Server> = ["app1", "app2", "app3"]
            .iter()
            .map(|id| {
                let mut e = env.to_vec();
                e.push(("INSTANCE_ID", id));
                Server::start(&e)
            })
            .collect();
        let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        let apps = [addrs[0].as_str(), addrs[1].as_str(), addrs[2].as_str()];
        let lb = match kind {
            "haproxy" => Balancer::haproxy("haproxy/haproxy-header.cfg", &apps, &[]).await,
            _ => Balancer::nginx("nginx/header-hash.conf.template", &apps).await,
        };
        phase1_drain_loses_no_accepted_publish(&lb, &mut servers).await;
    }
}
