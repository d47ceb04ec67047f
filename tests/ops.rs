//! Operating the migration: `/metrics` scraped by a real Prometheus from two
//! instances, the alert rules and the dashboard checked against what the
//! server really exposes, JSON logs, `/healthz?verbose` during a Redis
//! outage, and `sse-scale doctor` against every shipped balancer config and
//! against deliberately broken ones.

#[path = "support/balancer.rs"]
mod balancer;
#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use balancer::Balancer;
use redis_server::RedisServer;
use serde_json::{json, Value};
use support::*;

const T: Duration = Duration::from_secs(10);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn redis_instance(redis: &RedisServer, name: &str) -> Server {
    Server::start(&[
        ("REDIS_URL", &redis.url()),
        ("INSTANCE_ID", name),
        ("FF_REDIS_SSE_BROADCAST", "true"),
    ])
}

async fn scrape(server: &Server) -> String {
    let res = client()
        .get(server.url("/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    res.text().await.unwrap()
}

/// The value of one sample line (`name{labels} value`) of a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_need_the_admin_token_and_follow_what_happens() {
    let redis = RedisServer::start();
    let a = redis_instance(&redis, "a");
    let unauthorized = client().get(a.url("/metrics")).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401);
    let (session, token) = new_session(&a).await;
    let mut sse = SseClient::open(&a, &session, &token).await;
    sse.expect_connected().await;
    wait_subscribed(&a, 1).await;
    for i in 0..5 {
        publish(&a, &session, &token, "n", json!(i)).await;
        sse.next_event(T).await.unwrap();
    }
    let text = scrape(&a).await;
    assert_eq!(
        sample(&text, "sse_events_published_total{path=\"redis\"}"),
        Some(5.0),
        "{text}"
    );
    assert_eq!(sample(&text, "sse_deliveries_total"), Some(5.0), "{text}");
    assert_eq!(sample(&text, "sse_open_streams"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "sse_redis_subscriber_connected"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sse_flag_enabled{source=\"env\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sse_publish_to_write_seconds_count"),
        Some(5.0),
        "{text}"
    );
    assert!(
        sample(&text, "sse_redis_round_trip_seconds_count").unwrap() >= 5.0,
        "{text}"
    );
    assert!(
        !text.contains(&session),
        "a session id reached a label: labels must stay bounded"
    );
    drop(sse);
    let closed = eventually(T, || async {
        sample(
            &scrape(&a).await,
            "sse_stream_closes_total{reason=\"client_gone\"}",
        ) == Some(1.0)
    })
    .await;
    assert!(closed, "{}", scrape(&a).await);

    // promtool's own lint of the exposition format.
    let mut check = Command::new(require("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn require(name: &str) -> String {
    balancer::require_binary(name)
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_two_instances_and_sees_counters_move() {
    let redis = RedisServer::start();
    let a = redis_instance(&redis, "a");
    let b = redis_instance(&redis, "b");
    let dir = tempdir("prometheus");
    let port = redis_server::free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sse-scale\n    \
             metrics_path: /metrics\n    authorization:\n      type: Bearer\n      credentials: {ADMIN}\n    \
             static_configs:\n      - targets: [\"{}\", \"{}\"]\n",
            a.addr, b.addr
        ),
    )
    .unwrap();
    let mut prometheus = Command::new(require("prometheus"))
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    let query = |q: &'static str| {
        let api = api.clone();
        async move {
            let res = client()
                .get(&api)
                .query(&[("query", q)])
                .send()
                .await
                .ok()?;
            let body: Value = res.json().await.ok()?;
            body["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()
        }
    };
    let up = eventually(Duration::from_secs(30), || async {
        query("sum(up{job=\"sse-scale\"})").await == Some(2.0)
    })
    .await;
    assert!(up, "Prometheus did not scrape both instances");
    let before = query("sum(sse_events_published_total)")
        .await
        .unwrap_or(0.0);
    let (session, token) = new_session(&a).await;
    for i in 0..7 {
        publish(
            if i % 2 == 0 { &a } else { &b },
            &session,
            &token,
            "n",
            json!(i),
        )
        .await;
    }
    let moved = eventually(Duration::from_secs(20), || async {
        query("sum(sse_events_published_total)").await == Some(before + 7.0)
    })
    .await;
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(
        moved,
        "sse_events_published_total did not move by 7 in Prometheus"
    );
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sse-scale-{name}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_007
}

/// Every `sse_*` metric an expression names.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("sse_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if boundary {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn the_alert_rules_and_the_dashboard_use_only_metrics_the_server_exposes() {
    let rules = repo().join("docs/ops/alerts.yml");
    let out = Command::new(require("promtool"))
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let redis = RedisServer::start();
    let a = redis_instance(&redis, "a");
    let exposed: BTreeSet<String> = scrape(&a)
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("docs/ops/grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push_str(target["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    exprs.push_str(&std::fs::read_to_string(&rules).unwrap());
    let used = metric_names(&exprs);
    assert!(used.len() > 20, "{used:?}");
    for name in &used {
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            exposed.contains(name) || exposed.contains(family),
            "{name} is used by the dashboard or the alerts but not exposed; exposed: {exposed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line_without_tokens() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sse-scale"))
        .env_clear()
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("SESSION_SECRET", SECRET)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + T;
    let addr = loop {
        let line = rx
            .recv_timeout(deadline - Instant::now())
            .expect("a listening line");
        let parsed: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        lines.push(line);
        if let Some(addr) = parsed["fields"]["addr"].as_str() {
            break addr.to_owned();
        }
    };
    let http = client();
    let created: Value = http
        .post(format!("http://{addr}/sessions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = created["stream_token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap();
    let res = http
        .get(format!("http://{addr}/sessions/{id}/events?token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    drop(res);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = child.kill();
    let _ = child.wait();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        lines.push(line);
    }
    assert!(lines.len() > 3, "{lines:?}");
    for line in &lines {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(!line.contains(&token), "a token reached the log: {line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("/sessions/") && l.contains("events")),
        "the request span is logged (with its path): {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_outage_keeps_the_instance_ready_and_says_degraded() {
    let mut redis = RedisServer::start();
    let a = redis_instance(&redis, "a");
    let (session, token) = new_session(&a).await;
    let _sse = SseClient::open(&a, &session, &token).await;
    wait_subscribed(&a, 1).await;
    let health = |path: &'static str| {
        let url = a.url(path);
        async move {
            let res = client().get(url).send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(health("/healthz?verbose").await.1["status"], "ok");
    redis.stop();
    publish(&a, &session, &token, "n", json!(1)).await;
    let degraded = eventually(T, || async {
        health("/healthz?verbose").await.1["status"] == "degraded"
    })
    .await;
    let (_, body) = health("/healthz?verbose").await;
    assert!(degraded, "{body}");
    let reasons = body["reasons"].to_string();
    assert!(
        reasons.contains("redis_unreachable") && reasons.contains("subscriber_disconnected"),
        "{body}"
    );
    assert_eq!(
        health("/readyz").await.0,
        200,
        "a Redis outage must not take the instance out of the pool"
    );
    assert_eq!(health("/healthz").await, (200, json!({ "status": "ok" })));
}

// ------------------------------------------------------------------ doctor

/// Three phase-1 instances (no Redis) with the given heartbeat.
fn fleet(heartbeat: &str) -> Vec<Server> {
    (1..=3)
        .map(|i| {
            Server::start(&[
                ("INSTANCE_ID", &format!("app{i}")),
                ("SSE_HEARTBEAT_SECS", heartbeat),
            ])
        })
        .collect()
}

fn apps(fleet: &[Server]) -> [&str; 3] {
    [
        fleet[0].addr.as_str(),
        fleet[1].addr.as_str(),
        fleet[2].addr.as_str(),
    ]
}

/// Runs `sse-scale doctor --json` against the balancer; (exit code,
/// status of each check by name).
async fn doctor(lb: &Balancer, hold: u64) -> (i32, Vec<(String, String, String)>) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sse-scale"))
        .env_clear()
        .args([
            "doctor",
            "--json",
            "--hold",
            &hold.to_string(),
            "--admin-token",
            ADMIN,
        ])
        .arg(format!("http://{}", lb.addr))
        .output()
        .await
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let checks = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["status"].as_str().unwrap().to_owned(),
                format!("{} {}", c["detail"], c["advice"]),
            )
        })
        .collect();
    (out.status.code().unwrap(), checks)
}

fn status_of<'a>(checks: &'a [(String, String, String)], name: &str) -> &'a str {
    checks
        .iter()
        .find(|c| c.0 == name)
        .map(|c| c.1.as_str())
        .unwrap_or_else(|| panic!("no check {name}: {checks:?}"))
}

fn advice_of<'a>(checks: &'a [(String, String, String)], name: &str) -> &'a str {
    &checks.iter().find(|c| c.0 == name).unwrap().2
}

const CHECKS: [&str; 6] = [
    "unbuffered",
    "no_compression",
    "affinity",
    "idle_timeout",
    "resume",
    "flag_agreement",
];

#[tokio::test(flavor = "multi_thread")]
async fn doctor_passes_every_check_behind_each_shipped_sticky_config() {
    let servers = fleet("1");
    for lb in [
        Balancer::haproxy(
            "haproxy/haproxy.cfg",
            &apps(&servers),
            &[("LB_STREAM_TIMEOUT", "2s")],
        )
        .await,
        Balancer::nginx("nginx/cookie-map.conf.template", &apps(&servers)).await,
        Balancer::caddy(
            "caddy/Caddyfile",
            &apps(&servers),
            &[("LB_COOKIE_SECRET", "0123456789abcdef0123456789abcdef")],
        )
        .await,
    ] {
        let (code, checks) = doctor(&lb, 3).await;
        for name in CHECKS {
            assert_eq!(
                status_of(&checks, name),
                "pass",
                "{:?}: {checks:?}",
                lb.kind
            );
        }
        assert_eq!(code, 0, "{:?}: {checks:?}", lb.kind);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_fails_exactly_the_broken_setting_with_advice() {
    // nginx that buffers: the shipped file with buffering on and the app's
    // X-Accel-Buffering ignored.
    let servers = fleet("1");
    let shipped =
        std::fs::read_to_string(repo().join("lb-config/nginx/cookie-map.conf.template")).unwrap();
    assert!(shipped.contains("proxy_buffering off;"));
    let broken = shipped.replace(
        "proxy_buffering off;",
        "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;",
    );
    let dir = tempdir("nginx-buffering");
    let template = dir.join("buffering.conf.template");
    std::fs::write(&template, broken).unwrap();
    let lb = Balancer::nginx(template.to_str().unwrap(), &apps(&servers)).await;
    let (code, checks) = doctor(&lb, 2).await;
    assert_eq!(code, 1, "{checks:?}");
    assert_eq!(status_of(&checks, "unbuffered"), "fail", "{checks:?}");
    assert!(
        advice_of(&checks, "unbuffered").contains("proxy_buffering off"),
        "{checks:?}"
    );
    for name in ["affinity", "flag_agreement"] {
        assert_eq!(
            status_of(&checks, name),
            "pass",
            "nginx buffering, {name}: {checks:?}"
        );
    }
    // Nothing of the stream arrives, so what needs it is skipped, not failed.
    for name in ["no_compression", "idle_timeout", "resume"] {
        assert_eq!(
            status_of(&checks, name),
            "skip",
            "nginx buffering, {name}: {checks:?}"
        );
    }
    drop(lb);
    drop(servers);

    // HAProxy cutting idle streams after 2 s, heartbeats every 15 s.
    let servers = fleet("15");
    let lb = Balancer::haproxy(
        "haproxy/haproxy.cfg",
        &apps(&servers),
        &[("LB_STREAM_TIMEOUT", "2s")],
    )
    .await;
    let (code, checks) = doctor(&lb, 5).await;
    assert_eq!(code, 1, "{checks:?}");
    assert_eq!(status_of(&checks, "idle_timeout"), "fail", "{checks:?}");
    assert!(
        advice_of(&checks, "idle_timeout").contains("SSE_HEARTBEAT_SECS"),
        "{checks:?}"
    );
    for name in [
        "unbuffered",
        "no_compression",
        "affinity",
        "resume",
        "flag_agreement",
    ] {
        assert_eq!(
            status_of(&checks, name),
            "pass",
            "HAProxy 2 s idle, {name}: {checks:?}"
        );
    }
    drop(lb);

    // Affinity removed: the round-robin file in front of phase-1 instances.
    let lb = Balancer::haproxy("haproxy/haproxy-roundrobin.cfg", &apps(&servers), &[]).await;
    let (code, checks) = doctor(&lb, 1).await;
    assert_eq!(code, 1, "{checks:?}");
    assert_eq!(status_of(&checks, "affinity"), "fail", "{checks:?}");
    assert!(
        advice_of(&checks, "affinity").contains("lb-config/haproxy/haproxy.cfg"),
        "{checks:?}"
    );
    for name in ["no_compression", "idle_timeout", "flag_agreement"] {
        assert_eq!(
            status_of(&checks, name),
            "pass",
            "round robin, {name}: {checks:?}"
        );
    }
}
