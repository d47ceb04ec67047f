//! Load-balancer configs from `lb-config/`, run against the real balancers
//! (HAProxy, nginx, Caddy) in front of three real `sse-scale` instances.
//!
//! Phase 1 of the migration only works if the balancer keeps every client
//! on the instance that holds its stream, passes events through at once,
//! keeps idle streams open, never compresses them, moves clients off a dead
//! instance and lets an instance drain. Each test checks that for one
//! shipped file, unchanged.

mod support;

#[path = "support/balancer.rs"]
mod balancer;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use balancer::Balancer;
use reqwest::header::{HeaderMap, ACCEPT_ENCODING, CONTENT_ENCODING, COOKIE, SET_COOKIE};
use serde_json::{json, Value};
use support::{Server, SseClient};

const IDS: [&str; 3] = ["app1", "app2", "app3"];
/// How many follow-up requests must all land on the pinned instance.
const FOLLOW_UPS: usize = 20;
/// An event must cross the balancer well within this.
const FAST: Duration = Duration::from_secs(1);

/// Three instances named app1..app3 (the INSTANCE_IDs the configs expect),
/// heartbeating every second so idle-stream tests stay short.
struct Apps {
    servers: Vec<Option<Server>>,
}

impl Apps {
    fn start() -> Apps {
        Self::start_with(&[])
    }

    fn start_with(extra: &[(&str, &str)]) -> Apps {
        let servers = IDS
            .iter()
            .map(|id| {
                let mut env = vec![("INSTANCE_ID", *id), ("SSE_HEARTBEAT_SECS", "1")];
                env.extend_from_slice(extra);
                Some(Server::start(&env))
            })
            .collect();
        Apps { servers }
    }

    fn addrs(&self) -> [&str; 3] {
        let addr = |i: usize| self.servers[i].as_ref().unwrap().addr.as_str();
        [addr(0), addr(1), addr(2)]
    }

    /// The address of the instance named `id`.
    fn addr_of(&self, id: &str) -> String {
        let i = IDS.iter().position(|x| *x == id).expect("known id");
        self.servers[i].as_ref().unwrap().addr.clone()
    }

    /// Kills the instance named `id` (SIGKILL: no graceful shutdown).
    fn kill(&mut self, id: &str) {
        let i = IDS.iter().position(|x| *x == id).expect("known id");
        drop(self.servers[i].take().expect("instance still running"));
    }
}

/// The cookies a browser would hold, filled from Set-Cookie by hand (the
/// reqwest cookie store is not enabled in this workspace).
#[derive(Debug, Default, Clone)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    fn store(&mut self, headers: &HeaderMap) {
        self.0.extend(set_cookies(headers));
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// name -> value of every Set-Cookie header.
fn set_cookies(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn instance_of(headers: &HeaderMap) -> String {
    headers
        .get("x-instance-id")
        .expect("every response names its instance")
        .to_str()
        .unwrap()
        .to_owned()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Streams must not have a whole-response timeout; SseClient times each
/// block instead.
fn stream_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

struct Session {
    id: String,
    token: String,
}

/// `POST /sessions` through the balancer; stores the cookies it sets.
async fn create_session(lb: &Balancer, jar: &mut Jar) -> (Session, String) {
    let mut req = client().post(lb.url("/sessions"));
    if !jar.0.is_empty() {
        req = req.header(COOKIE, jar.header());
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 201, "{}", lb.log());
    jar.store(res.headers());
    let instance = instance_of(res.headers());
    let body: Value = res.json().await.unwrap();
    let session = Session {
        id: body["id"].as_str().unwrap().to_owned(),
        token: body["token"].as_str().unwrap().to_owned(),
    };
    (session, instance)
}

/// One request carrying the jar's cookies (and `extra` headers); returns
/// the instance that answered. Alternates between routes so both GETs and
/// POSTs with bodies are covered.
async fn follow_up(
    lb: &Balancer,
    s: &Session,
    jar: &Jar,
    extra: &[(&str, &str)],
    n: usize,
) -> String {
    let c = client();
    let mut req = match n % 3 {
        0 => c.get(lb.url("/healthz")),
        1 => c.get(lb.url("/readyz")),
        _ => c
            .post(lb.url(&format!("/sessions/{}/events", s.id)))
            .bearer_auth(&s.token)
            .json(&json!({ "type": "noise", "data": n })),
    };
    if !jar.0.is_empty() {
        req = req.header(COOKIE, jar.header());
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    assert!(
        res.status().is_success(),
        "follow-up {n}: {} {:?}",
        res.status(),
        res.text().await
    );
    instance_of(res.headers())
}

/// Sends `FOLLOW_UPS` requests; asserts every one reached `expected`.
async fn assert_follow_ups_land_on(
    lb: &Balancer,
    s: &Session,
    jar: &Jar,
    extra: &[(&str, &str)],
    expected: &str,
) {
    for n in 0..FOLLOW_UPS {
        let got = follow_up(lb, s, jar, extra, n).await;
        assert_eq!(
            got,
            expected,
            "follow-up {n} with cookies [{}] {extra:?} left the pinned instance",
            jar.header()
        );
    }
}

/// Instances reached by `n` requests without any affinity cookie or header.
async fn instances_without_affinity(lb: &Balancer, n: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let res = client().get(lb.url("/healthz")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        seen.insert(instance_of(res.headers()));
    }
    seen
}

/// Opens the session's stream through the balancer, asking for gzip like a
/// browser does. Asserts the stream is plain text/event-stream and returns
/// it with the instance named by its `connected` event (which must match
/// X-Instance-Id). Stores the cookies the response sets.
async fn open_stream(
    lb: &Balancer,
    s: &Session,
    jar: &mut Jar,
    extra: &[(&str, &str)],
) -> (SseClient, String) {
    let mut req = stream_client()
        .get(lb.url(&format!("/sessions/{}/events?token={}", s.id, s.token)))
        .header(ACCEPT_ENCODING, "gzip, deflate, br");
    if !jar.0.is_empty() {
        req = req.header(COOKIE, jar.header());
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200, "stream open: {}", lb.log());
    let headers = res.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert!(
        headers.get(CONTENT_ENCODING).is_none(),
        "{:?} compressed the stream: {:?}",
        lb.kind,
        headers.get(CONTENT_ENCODING)
    );
    jar.store(&headers);
    let mut sse = SseClient::from_response(res);
    // Parsing `retry:` and `connected` as text also proves the body is not
    // compressed, whatever the headers say.
    let connected = sse.expect_connected().await.json();
    let instance = connected["instance_id"].as_str().unwrap().to_owned();
    assert_eq!(connected["session_id"], s.id.as_str());
    assert_eq!(
        instance,
        instance_of(&headers),
        "X-Instance-Id and connected disagree"
    );
    (sse, instance)
}

/// Publishes a message through the balancer and waits for it on `sse`;
/// asserts it crossed in under `FAST`. Returns the publishing instance.
async fn publish_and_receive(
    lb: &Balancer,
    s: &Session,
    jar: &Jar,
    extra: &[(&str, &str)],
    sse: &mut SseClient,
    text: &str,
) -> String {
    let started = Instant::now();
    let mut req = client()
        .post(lb.url(&format!("/sessions/{}/messages", s.id)))
        .bearer_auth(&s.token)
        .json(&json!({ "text": text }));
    if !jar.0.is_empty() {
        req = req.header(COOKIE, jar.header());
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 202);
    let publisher = instance_of(res.headers());
    // Skip the "noise" events earlier follow-ups published, and heartbeats.
    loop {
        let ev = sse
            .next_event(Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("stream ended before {text:?}; {}", lb.log()));
        if ev.event.as_deref() == Some("chat_message") {
            assert_eq!(ev.json()["text"], text);
            break;
        }
        assert_eq!(ev.event.as_deref(), Some("noise"), "{ev:?}");
    }
    let took = started.elapsed();
    assert!(
        took < FAST,
        "{:?}: event took {took:?} to cross the balancer",
        lb.kind
    );
    publisher
}

/// Reads an idle stream for `hold`: only heartbeats may arrive, at least one
/// per `2 * heartbeat`, and the stream must stay open throughout.
async fn hold_idle_stream(lb: &Balancer, sse: &mut SseClient, hold: Duration) {
    let started = Instant::now();
    let mut heartbeats = 0;
    while started.elapsed() < hold {
        let block = sse
            .next_block(Duration::from_millis(2500))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{:?} closed an idle stream after {:?}; log:\n{}",
                    lb.kind,
                    started.elapsed(),
                    lb.log()
                )
            });
        if block.comment {
            heartbeats += 1;
        } else {
            assert_eq!(block.event.as_deref(), Some("noise"), "{block:?}");
        }
    }
    assert!(
        heartbeats >= 3,
        "only {heartbeats} heartbeats in {hold:?}: the balancer buffers the stream"
    );
}

/// Waits for a stream to end (its instance died).
async fn expect_stream_end(lb: &Balancer, sse: &mut SseClient) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if sse.next_block(Duration::from_secs(5)).await.is_none() {
            return;
        }
    }
    panic!("{:?} kept a stream open after its instance died", lb.kind);
}

/// How a balancer's affinity cookie relates to instances.
struct CookieSpec {
    /// Name of the cookie that carries affinity.
    name: &'static str,
    /// Its value is the INSTANCE_ID (HAProxy server cookie, app cookie) or an
    /// opaque hash (Caddy).
    value_is_instance: bool,
}

/// Requirements 1-5 for a cookie-affinity config: pinning, fast delivery,
/// idle streams kept open, no compression, failover with re-pinning.
async fn cookie_affinity_suite(lb: &Balancer, apps: &mut Apps, spec: CookieSpec) {
    // Without a cookie, requests spread: the pinning below is the cookie's doing.
    let spread = instances_without_affinity(lb, 12).await;
    assert!(
        spread.len() > 1,
        "{:?} sent every cookieless request to {spread:?}",
        lb.kind
    );

    // 1. The first request gets the affinity cookie.
    let mut jar = Jar::default();
    let (s, first) = create_session(lb, &mut jar).await;
    let pinned_cookie = jar
        .get(spec.name)
        .unwrap_or_else(|| panic!("no {} cookie in {jar:?}", spec.name))
        .to_owned();
    if spec.value_is_instance {
        assert_eq!(pinned_cookie, first, "cookie names the instance");
    }

    // Follow-ups carrying it all land on the same instance, and so does the
    // stream (which also must not be compressed: requirement 4).
    assert_follow_ups_land_on(lb, &s, &jar, &[], &first).await;
    let (mut sse, streamed_on) = open_stream(lb, &s, &mut jar, &[]).await;
    assert_eq!(streamed_on, first, "stream left the pinned instance");
    assert_eq!(jar.get(spec.name), Some(pinned_cookie.as_str()));

    // 2. An event published after the stream opened arrives at once.
    let publisher = publish_and_receive(lb, &s, &jar, &[], &mut sse, "one").await;
    assert_eq!(publisher, first);

    // 3. The idle stream stays open with heartbeats flowing, then still
    // delivers.
    hold_idle_stream(lb, &mut sse, Duration::from_millis(4500)).await;
    publish_and_receive(lb, &s, &jar, &[], &mut sse, "after idle").await;

    // 5. The pinned instance dies: its stream ends, ...
    apps.kill(&first);
    expect_stream_end(lb, &mut sse).await;
    // ... a request still carrying the old cookie (say a publish racing
    // the reconnect) is answered by a survivor, ...
    let stale = jar.clone();
    let res = client()
        .post(lb.url(&format!("/sessions/{}/messages", s.id)))
        .bearer_auth(&s.token)
        .header(COOKIE, stale.header())
        .json(&json!({ "text": "into the void" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202, "{:?}: {}", lb.kind, lb.log());
    assert_ne!(instance_of(res.headers()), first);
    // ... and the reconnect (EventSource does it by itself, with the old
    // cookie) reaches a survivor, which re-pins the client.
    let (mut sse, survivor) = open_stream(lb, &s, &mut jar, &[]).await;
    assert_ne!(survivor, first, "reconnect reached the dead instance?");
    let new_cookie = jar.get(spec.name).expect("cookie").to_owned();
    assert_ne!(new_cookie, pinned_cookie, "{:?} did not re-pin", lb.kind);
    if spec.value_is_instance {
        assert_eq!(new_cookie, survivor, "new cookie names the survivor");
    }
    assert_follow_ups_land_on(lb, &s, &jar, &[], &survivor).await;
    let publisher = publish_and_receive(lb, &s, &jar, &[], &mut sse, "after failover").await;
    assert_eq!(publisher, survivor);
}

/// Requirement 7: the same X-Session-ID always reaches the same instance
/// (requests and stream), different values spread.
async fn header_affinity_suite(lb: &Balancer) {
    let mut jar = Jar::default();
    let (s, _) = create_session(lb, &mut jar).await;
    // The header routes; cookies must not matter here.
    let jar = Jar::default();
    let header = [("X-Session-ID", s.id.as_str())];
    let pinned = follow_up(lb, &s, &jar, &header, 0).await;
    assert_follow_ups_land_on(lb, &s, &jar, &header, &pinned).await;
    let (mut sse, streamed_on) = open_stream(lb, &s, &mut Jar::default(), &header).await;
    assert_eq!(streamed_on, pinned);
    let publisher = publish_and_receive(lb, &s, &jar, &header, &mut sse, "by header").await;
    assert_eq!(publisher, pinned);

    let mut spread = BTreeSet::new();
    for n in 0..30 {
        let value = format!("session-{n}");
        spread.insert(follow_up(lb, &s, &jar, &[("X-Session-ID", &value)], 0).await);
    }
    assert!(
        spread.len() > 1,
        "{:?} sent 30 different X-Session-ID values all to {spread:?}",
        lb.kind
    );
}

#[tokio::test]
async fn haproxy_cookie_pins_streams_and_fails_over() {
    let mut apps = Apps::start();
    // A 2 s inactivity timeout (shipped default: 1 h) proves heartbeats keep
    // a stream open past `timeout client` / `timeout server`.
    let lb = Balancer::haproxy(
        "haproxy/haproxy.cfg",
        &apps.addrs(),
        &[("LB_STREAM_TIMEOUT", "2s")],
    )
    .await;
    let spec = CookieSpec {
        name: "SRV",
        value_is_instance: true,
    };
    cookie_affinity_suite(&lb, &mut apps, spec).await;
}

#[tokio::test]
async fn haproxy_drain_keeps_pinned_streams_and_sends_new_clients_elsewhere() {
    let apps = Apps::start();
    let lb = Balancer::haproxy("haproxy/haproxy.cfg", &apps.addrs(), &[]).await;
    let mut jar = Jar::default();
    let (s, drained) = create_session(&lb, &mut jar).await;
    let (mut sse, streamed_on) = open_stream(&lb, &s, &mut jar, &[]).await;
    assert_eq!(streamed_on, drained);

    // The deploy step: drain the instance over the runtime API.
    let answer = lb.haproxy_command(&format!("set server app/{drained} state drain"));
    assert!(answer.trim().is_empty(), "drain refused: {answer:?}");
    // Its twin in the streams backend follows it.
    let state = lb.haproxy_command("show stat");
    for backend in ["app", "streams"] {
        let row = state
            .lines()
            .find(|l| l.starts_with(&format!("{backend},{drained},")))
            .unwrap_or_else(|| panic!("no stats row for {backend}/{drained}: {state}"));
        assert!(row.contains(",DRAIN"), "{row}");
    }

    // The pinned stream stays open and keeps receiving; its cookie still
    // routes to the drained instance.
    publish_and_receive(&lb, &s, &jar, &[], &mut sse, "while draining").await;
    assert_follow_ups_land_on(&lb, &s, &jar, &[], &drained).await;

    // New clients (no cookie) go elsewhere, their requests and their
    // streams.
    for n in 0..FOLLOW_UPS {
        let mut fresh = Jar::default();
        let (s, landed) = create_session(&lb, &mut fresh).await;
        assert_ne!(
            landed, drained,
            "new client {n} reached the drained instance"
        );
        let (_, streamed_on) = open_stream(&lb, &s, &mut Jar::default(), &[]).await;
        assert_ne!(
            streamed_on, drained,
            "new client {n}'s stream reached the drained instance"
        );
    }
    // Health checks keep running while draining and do not undo it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    publish_and_receive(&lb, &s, &jar, &[], &mut sse, "still draining").await;
    let spread = instances_without_affinity(&lb, 12).await;
    assert!(!spread.contains(&drained), "{spread:?}");

    // Rolling back the drain returns the instance to the rotation.
    let answer = lb.haproxy_command(&format!("set server app/{drained} state ready"));
    assert!(answer.trim().is_empty(), "ready refused: {answer:?}");
    let spread = instances_without_affinity(&lb, 12).await;
    assert!(spread.contains(&drained), "{spread:?}");
}

#[tokio::test]
async fn haproxy_header_hash_pins_by_session_id() {
    let apps = Apps::start();
    let lb = Balancer::haproxy("haproxy/haproxy-header.cfg", &apps.addrs(), &[]).await;
    header_affinity_suite(&lb).await;
}

#[tokio::test]
async fn nginx_cookie_map_pins_streams_and_fails_over() {
    let mut apps = Apps::start();
    let lb = Balancer::nginx("nginx/cookie-map.conf.template", &apps.addrs()).await;
    let spec = CookieSpec {
        name: "sse_affinity",
        value_is_instance: true,
    };
    cookie_affinity_suite(&lb, &mut apps, spec).await;
}

#[tokio::test]
async fn nginx_cookie_map_drain_by_reload_keeps_pinned_streams() {
    let apps = Apps::start();
    let lb = Balancer::nginx("nginx/cookie-map.conf.template", &apps.addrs()).await;
    let mut jar = Jar::default();
    let (s, drained) = create_session(&lb, &mut jar).await;
    let (mut sse, streamed_on) = open_stream(&lb, &s, &mut jar, &[]).await;
    assert_eq!(streamed_on, drained);

    // The documented drain: mark the instance `down` in the round-robin pool
    // only (its own upstream, which pinned clients use, stays), then reload.
    let addr = apps.addr_of(&drained);
    lb.nginx_reload(|conf| {
        // The pool and its twin for streams.
        let pool_line = format!("server {addr} max_fails");
        assert_eq!(conf.matches(&pool_line).count(), 2, "{conf}");
        conf.replace(&pool_line, &format!("server {addr} down max_fails"))
    });
    // The reload takes effect once the new workers run.
    let reloaded = support::eventually(Duration::from_secs(5), || async {
        !instances_without_affinity(&lb, 6).await.contains(&drained)
    })
    .await;
    assert!(reloaded, "new clients still reach {drained}; {}", lb.log());
    for n in 0..FOLLOW_UPS {
        let (s, landed) = create_session(&lb, &mut Jar::default()).await;
        assert_ne!(
            landed, drained,
            "new client {n} reached the drained instance"
        );
        let (_, streamed_on) = open_stream(&lb, &s, &mut Jar::default(), &[]).await;
        assert_ne!(
            streamed_on, drained,
            "new client {n}'s stream reached the drained instance"
        );
    }
    // The stream opened before the reload is still served (by an old
    // worker) and still receives; the client's cookie still reaches it.
    publish_and_receive(&lb, &s, &jar, &[], &mut sse, "after reload").await;
    assert_follow_ups_land_on(&lb, &s, &jar, &[], &drained).await;
}

#[tokio::test]
async fn nginx_cookie_hash_pins_by_cookie_value() {
    let mut apps = Apps::start();
    let lb = Balancer::nginx("nginx/cookie-hash.conf.template", &apps.addrs()).await;
    // No cookie: empty hash key, nginx falls back to round robin.
    let spread = instances_without_affinity(&lb, 12).await;
    assert!(spread.len() > 1, "{spread:?}");

    let mut jar = Jar::default();
    let (s, _) = create_session(&lb, &mut jar).await;
    assert!(jar.get("sse_affinity").is_some(), "{jar:?}");
    // Requests with the same cookie value reach one instance: hash(value),
    // which need not be the instance the value names.
    let pinned = follow_up(&lb, &s, &jar, &[], 0).await;
    assert_follow_ups_land_on(&lb, &s, &jar, &[], &pinned).await;
    let mut stream_jar = jar.clone();
    let (mut sse, streamed_on) = open_stream(&lb, &s, &mut stream_jar, &[]).await;
    assert_eq!(streamed_on, pinned);
    publish_and_receive(&lb, &s, &jar, &[], &mut sse, "hashed").await;

    // The hashed instance dies: the key moves to one survivor and stays.
    apps.kill(&pinned);
    expect_stream_end(&lb, &mut sse).await;
    let moved = follow_up(&lb, &s, &jar, &[], 0).await;
    assert_ne!(moved, pinned);
    assert_follow_ups_land_on(&lb, &s, &jar, &[], &moved).await;
}

#[tokio::test]
async fn nginx_header_hash_pins_by_session_id() {
    let apps = Apps::start();
    let lb = Balancer::nginx("nginx/header-hash.conf.template", &apps.addrs()).await;
    header_affinity_suite(&lb).await;
}

#[tokio::test]
async fn caddy_cookie_pins_streams_and_fails_over() {
    let mut apps = Apps::start();
    // A 2 s upstream read timeout (shipped default: 1 h) proves heartbeats
    // keep a stream open past it.
    let lb = Balancer::caddy(
        "caddy/Caddyfile",
        &apps.addrs(),
        &[
            ("LB_COOKIE_SECRET", "lb-test-secret"),
            ("LB_STREAM_TIMEOUT", "2s"),
        ],
    )
    .await;
    let spec = CookieSpec {
        name: "sse_lb",
        value_is_instance: false,
    };
    cookie_affinity_suite(&lb, &mut apps, spec).await;
}

#[tokio::test]
async fn caddy_header_hash_pins_by_session_id() {
    let apps = Apps::start();
    let lb = Balancer::caddy("caddy/Caddyfile.header", &apps.addrs(), &[]).await;
    header_affinity_suite(&lb).await;
}

#[test]
fn a_missing_balancer_fails_with_a_clear_message() {
    let err = std::panic::catch_unwind(|| balancer::require_binary("no-such-balancer-xyz"))
        .expect_err("must panic");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("not installed") && msg.contains("run-all.sh"),
        "{msg}"
    );
}

/// Opens (and drops) a stream through `lb` from the local address `from`,
/// with a forged `X-Forwarded-For`; returns the status.
async fn open_from_address(lb: &Balancer, s: &Session, from: &str, forged: &str) -> u16 {
    let c = reqwest::Client::builder()
        .local_address(Some(from.parse().unwrap()))
        .build()
        .unwrap();
    let res = c
        .get(lb.url(&format!("/sessions/{}/events?token={}", s.id, s.token)))
        .header("X-Session-ID", &s.id)
        .header("X-Forwarded-For", forged)
        .send()
        .await
        .unwrap();
    res.status().as_u16()
}

/// Behind `lb` with `TRUSTED_PROXIES` set to it: the per-client limit counts
/// the address the balancer saw, whatever the client writes into
/// `X-Forwarded-For`, and two clients have two budgets.
async fn forged_forwarded_for_changes_nothing(lb: &Balancer) {
    let mut jar = Jar::default();
    let (s, _) = create_session(lb, &mut jar).await;
    for n in 0..3 {
        let forged = format!("198.51.100.{n}");
        assert_eq!(
            open_from_address(lb, &s, "127.0.0.2", &forged).await,
            200,
            "{:?}",
            lb.kind
        );
    }
    assert_eq!(
        open_from_address(lb, &s, "127.0.0.2", "198.51.100.99").await,
        429,
        "{:?}: a new forged address escaped the limit",
        lb.kind
    );
    assert_eq!(
        open_from_address(lb, &s, "127.0.0.3", "198.51.100.0").await,
        200,
        "{:?}: another client shares no budget with the first",
        lb.kind
    );
}

// Fails before the fix: the leftmost X-Forwarded-For address (the client's
// own) was used, so every forged value was a fresh budget.
#[tokio::test]
async fn a_forged_forwarded_for_changes_nothing_behind_haproxy_and_nginx() {
    let trust = [
        ("TRUSTED_PROXIES", "127.0.0.1"),
        ("RATE_LIMIT_STREAMS_PER_MIN", "3"),
    ];
    let apps = Apps::start_with(&trust);
    let lb = Balancer::haproxy("haproxy/haproxy-header.cfg", &apps.addrs(), &[]).await;
    forged_forwarded_for_changes_nothing(&lb).await;
    drop(lb);
    let apps = Apps::start_with(&trust);
    let lb = Balancer::nginx("nginx/header-hash.conf.template", &apps.addrs()).await;
    forged_forwarded_for_changes_nothing(&lb).await;
}

/// Opens a stream through `lb` with its token in the query string (as
/// `EventSource` does) over a plain socket, reads its start, closes the
/// socket, and checks the balancer's access log names the path but not the
/// token.
async fn token_stays_out_of_the_log(lb: &Balancer, log_file: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut jar = Jar::default();
    let (s, _) = create_session(lb, &mut jar).await;
    let path = format!("/sessions/{}/events", s.id);
    let mut conn = tokio::net::TcpStream::connect(&lb.addr).await.unwrap();
    let head = format!("GET {path}?token={} HTTP/1.1\r\nHost: x\r\n\r\n", s.token);
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("the stream starts")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(conn);
    let logged = balancer::eventually_sync(Duration::from_secs(10), || {
        std::fs::read_to_string(lb.dir.join(log_file))
            .unwrap_or_default()
            .contains(&path)
    });
    let log = std::fs::read_to_string(lb.dir.join(log_file)).unwrap_or_default();
    assert!(logged, "{:?} logged no stream request:\n{log}", lb.kind);
    assert!(
        !log.contains(&s.token),
        "{:?} logged the token:\n{log}",
        lb.kind
    );
}

// Fails before the fix: HAProxy's `option httplog` and nginx's default
// access log wrote the whole request line, `?token=` included.
#[tokio::test]
async fn stream_tokens_stay_out_of_balancer_logs() {
    let apps = Apps::start();
    let lb = Balancer::haproxy("haproxy/haproxy.cfg", &apps.addrs(), &[]).await;
    token_stays_out_of_the_log(&lb, "balancer.log").await;
    drop(lb);
    let lb = Balancer::nginx("nginx/cookie-map.conf.template", &apps.addrs()).await;
    token_stays_out_of_the_log(&lb, "access.log").await;
}

/// Phase 3 behind `lb` (no affinity, three instances with the Redis broker
/// and the flag on): requests spread over the instances, every stream gets
/// every event whichever instance took the publish, and a reconnect that
/// lands elsewhere resumes with `Last-Event-ID`.
async fn round_robin_suite(lb: &Balancer) {
    let mut jar = Jar::default();
    let (s, _) = create_session(lb, &mut jar).await;
    let spread = instances_without_affinity(lb, 12).await;
    assert!(
        spread.len() >= 2,
        "{:?} pinned every request to {spread:?}",
        lb.kind
    );
    let mut streams = Vec::new();
    for _ in 0..3 {
        let (sse, _) = open_stream(lb, &s, &mut Jar::default(), &[]).await;
        streams.push(sse);
    }
    let mut publishers = BTreeSet::new();
    let mut ids = Vec::new();
    for n in 0..6 {
        let c = client();
        let res = c
            .post(lb.url(&format!("/sessions/{}/events", s.id)))
            .bearer_auth(&s.token)
            .json(&json!({ "type": "rr", "data": n }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
        publishers.insert(instance_of(res.headers()));
        ids.push(
            res.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert!(
        publishers.len() >= 2,
        "{:?}: every publish reached {publishers:?}",
        lb.kind
    );
    for sse in &mut streams {
        for n in 0..6 {
            let ev = sse
                .next_event(FAST * 5)
                .await
                .expect("every event, on every stream");
            assert_eq!(ev.json(), json!(n), "{:?}", lb.kind);
        }
    }
    // A client that had the first two comes back through the balancer.
    drop(streams);
    let res = client()
        .get(lb.url(&format!("/sessions/{}/events?token={}", s.id, s.token)))
        .header("last-event-id", &ids[1])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut sse = SseClient::from_response(res);
    sse.expect_connected().await;
    for n in 2..6 {
        assert_eq!(sse.next_event(FAST * 5).await.unwrap().json(), json!(n));
    }
}

fn phase3_apps(redis: &redis_server::RedisServer) -> Apps {
    let url = redis.url();
    Apps::start_with(&[
        ("SSE_ADAPTER", "redis"),
        ("REDIS_URL", &url),
        ("FF_REDIS_SSE_BROADCAST", "true"),
    ])
}

#[tokio::test]
async fn haproxy_round_robin_serves_phase_3() {
    let redis = redis_server::RedisServer::start();
    let apps = phase3_apps(&redis);
    let lb = Balancer::haproxy("haproxy/haproxy-roundrobin.cfg", &apps.addrs(), &[]).await;
    round_robin_suite(&lb).await;
}

#[tokio::test]
async fn nginx_round_robin_serves_phase_3() {
    let redis = redis_server::RedisServer::start();
    let apps = phase3_apps(&redis);
    let lb = Balancer::nginx("nginx/roundrobin.conf.template", &apps.addrs()).await;
    round_robin_suite(&lb).await;
}

#[tokio::test]
async fn caddy_round_robin_serves_phase_3() {
    let redis = redis_server::RedisServer::start();
    let apps = phase3_apps(&redis);
    let lb = Balancer::caddy("caddy/Caddyfile.roundrobin", &apps.addrs(), &[]).await;
    round_robin_suite(&lb).await;
}

/// Streams opened so far on `apps`: (all, as their connection's first
/// request).
async fn stream_opens(apps: &Apps) -> (u64, u64) {
    let mut all = (0, 0);
    for server in apps.servers.iter().flatten() {
        let stats = server.stats().await;
        all.0 += stats["stream_opens"].as_u64().unwrap();
        all.1 += stats["stream_opens_first_request"].as_u64().unwrap();
    }
    all
}

/// Publishes, then opens a stream, `STREAMS` times over one client
/// connection kept alive (a browser does the same: its page's requests,
/// then the `EventSource`, on the connections it keeps), with the
/// affinity the file routes on. Every stream must reach its instance as
/// its connection's first request: the balancer opens streams on
/// upstream connections of their own, never on one a publish left idle,
/// so each is served by the stream writer without hyper's buffers.
async fn streams_take_upstream_connections_of_their_own(
    file: &str,
    lb: &Balancer,
    apps: &Apps,
) -> Option<String> {
    const STREAMS: u64 = 4;
    let (opened, first) = stream_opens(apps).await;
    let mut jar = Jar::default();
    let (s, _) = create_session(lb, &mut jar).await;
    // One connection at a time: each stream takes over the connection its
    // publish just used.
    let browser = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let affinity = |req: reqwest::RequestBuilder| {
        let req = req.header("X-Session-ID", &s.id);
        if jar.0.is_empty() {
            req
        } else {
            req.header(COOKIE, jar.header())
        }
    };
    let mut streams = Vec::new();
    for n in 0..STREAMS {
        let res = affinity(
            browser
                .post(lb.url(&format!("/sessions/{}/events", s.id)))
                .bearer_auth(&s.token)
                .timeout(Duration::from_secs(10))
                .json(&json!({ "type": "noise", "data": n })),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(res.status(), 202, "{:?}: {}", lb.kind, lb.log());
        let res =
            affinity(browser.get(lb.url(&format!("/sessions/{}/events?token={}", s.id, s.token))))
                .send()
                .await
                .unwrap();
        assert_eq!(res.status(), 200, "{:?}: {}", lb.kind, lb.log());
        let mut sse = SseClient::from_response(res);
        sse.expect_connected().await;
        streams.push(sse);
    }
    let (now_opened, now_first) = stream_opens(apps).await;
    assert_eq!(now_opened - opened, STREAMS, "{file}");
    let shared = STREAMS - (now_first - first);
    (shared > 0).then(|| {
        format!(
            "{file}: {shared} of {STREAMS} streams on an upstream connection that had \
             already carried a request"
        )
    })
}

#[tokio::test]
async fn every_shipped_balancer_opens_streams_on_upstream_connections_of_their_own() {
    let apps = Apps::start();
    let mut failures = Vec::new();
    for file in [
        "haproxy/haproxy.cfg",
        "haproxy/haproxy-header.cfg",
        "haproxy/haproxy-roundrobin.cfg",
    ] {
        let lb = Balancer::haproxy(file, &apps.addrs(), &[]).await;
        failures.extend(streams_take_upstream_connections_of_their_own(file, &lb, &apps).await);
    }
    for file in [
        "nginx/cookie-map.conf.template",
        "nginx/cookie-hash.conf.template",
        "nginx/header-hash.conf.template",
        "nginx/roundrobin.conf.template",
    ] {
        let lb = Balancer::nginx(file, &apps.addrs()).await;
        failures.extend(streams_take_upstream_connections_of_their_own(file, &lb, &apps).await);
    }
    for file in [
        "caddy/Caddyfile",
        "caddy/Caddyfile.header",
        "caddy/Caddyfile.roundrobin",
    ] {
        let lb = Balancer::caddy(
            file,
            &apps.addrs(),
            &[("LB_COOKIE_SECRET", "lb-test-secret")],
        )
        .await;
        failures.extend(streams_take_upstream_connections_of_their_own(file, &lb, &apps).await);
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
