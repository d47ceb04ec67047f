//! The demo page and the client module (`src/js/sse-scale.js`) in a real
//! browser: Debian's Chromium, headless, driven by playwright-core scripts
//! (`tests/browser/*.mjs`, one per scenario), against real `sse-scale`
//! processes, a real `redis-server` and the shipped balancer configs.
//!
//! Each test starts the servers, then the scenario's script with the page's
//! origin in `BASE_URL`. The script drives the page, talks with the test
//! over a line protocol (`tests/browser/harness.mjs`: it announces steps on
//! stdout, the test answers with commands on stdin after killing,
//! restarting, publishing...), checks what the page shows and exits
//! non-zero if any check failed. Every scenario leaves a screenshot and its
//! JSON result in `target/browser-artifacts/`. With
//! `SSE_SCALE_DOCS_SCREENSHOT=1` the SIGKILL scenario's screenshot also
//! replaces `docs/browser.png`.
//!
//! Needs `chromium`, `node` and `npm` (tests/run-all.sh installs them);
//! playwright-core is installed once by `tests/browser/setup.sh`. The
//! scenarios run one at a time: each one's timing assertions (a retry not
//! before `Retry-After`) should not depend on how busy two cores are with
//! another browser.

#[path = "support/balancer.rs"]
mod balancer;
#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use balancer::{require_binary, Balancer};
use redis_server::RedisServer;
use serde_json::{json, Value};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// One scenario at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const NAMES: [&str; 3] = ["app1", "app2", "app3"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `target/browser-artifacts`: screenshots and results of the last run.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(
            || PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
            Path::to_path_buf,
        )
        .join("browser-artifacts");
    std::fs::create_dir_all(&dir).expect("create the artifacts directory");
    dir
}

/// Runs `tests/browser/setup.sh` once per test binary; the directory that
/// holds `node_modules/playwright-core`.
fn playwright() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        require_binary("chromium");
        require_binary("node");
        let out = Command::new("bash")
            .arg(repo().join("tests/browser/setup.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/browser/setup.sh");
        assert!(out.status.success(), "tests/browser/setup.sh failed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("setup.sh prints the directory")
                .trim(),
        )
    })
}

/// A running scenario script.
struct Script {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<Value>,
    /// Everything it printed that is not a protocol line, and its stderr.
    output: Arc<Mutex<String>>,
}

impl Script {
    /// `node tests/browser/<script>.mjs` against the page at `base`; its
    /// artifacts are named `name`.
    fn start(script: &str, name: &str, base: &str, env: &[(&str, &str)]) -> Script {
        let artifact = artifacts().join(format!("{name}.png"));
        let mut cmd = Command::new("node");
        cmd.arg(repo().join(format!("tests/browser/{script}.mjs")))
            .current_dir(repo())
            .env("PLAYWRIGHT_DIR", playwright())
            .env("BASE_URL", base)
            .env("ARTIFACT", &artifact)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn node");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout");
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => {
                        let _ = tx.send(v);
                    }
                    _ => {
                        let mut s = sink.lock().unwrap();
                        s.push_str(&line);
                        s.push('\n');
                    }
                }
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let stdin = child.stdin.take();
        Script {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            output,
        }
    }

    fn fail(&self, what: &str, line: Option<&Value>) -> ! {
        panic!(
            "{}: {what}\n{}\noutput:\n{}",
            self.name,
            line.map(|l| serde_json::to_string_pretty(l).unwrap_or_default())
                .unwrap_or_default(),
            self.output.lock().unwrap()
        )
    }

    /// Waits for `{"step": name}`; returns it.
    async fn step(&mut self, name: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Err(_) => self.fail(&format!("no step {name} within {within:?}"), None),
                Ok(None) => self.fail(&format!("exited before step {name}"), None),
                Ok(Some(line)) if line["step"] == name => return line,
                Ok(Some(line)) if line.get("result").is_some() => {
                    self.fail(&format!("finished before step {name}"), Some(&line))
                }
                Ok(Some(_)) => {}
            }
        }
    }

    /// Sends `{"cmd": cmd, ...data}`.
    fn send(&mut self, cmd: &str, data: Value) {
        let mut msg = data;
        msg["cmd"] = cmd.into();
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{msg}").expect("write to the script");
        stdin.flush().expect("flush");
    }

    /// Waits for the result and the exit; panics unless every check held.
    async fn finish(mut self, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        let line = loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Err(_) => self.fail(&format!("no result within {within:?}"), None),
                Ok(None) => self.fail("exited without a result", None),
                Ok(Some(line)) if line.get("result").is_some() => break line,
                Ok(Some(_)) => {}
            }
        };
        let until = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > until {
                self.fail("did not exit after its result", Some(&line));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let path = artifacts().join(format!("{}.json", self.name));
        let _ = std::fs::write(
            &path,
            serde_json::to_string_pretty(&line).unwrap_or_default(),
        );
        if line["ok"] != true || !status.success() {
            self.fail(&format!("failed ({status})"), Some(&line));
        }
        println!("{}: {}", self.name, line["result"]);
        line["result"].clone()
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        // TERM first: playwright closes the browser it started on SIGTERM,
        // where a killed node would leave Chromium behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The settings every instance of these tests shares: no rate limits in
/// the way, quick retry hints and heartbeats, a short drain.
fn instance(name: &str, port: u16, extra: &[(&str, &str)]) -> Server {
    let port = port.to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("INSTANCE_ID", name),
        ("RATE_LIMIT_PUBLISH_PER_SEC", "0"),
        ("RATE_LIMIT_STREAMS_PER_MIN", "0"),
        ("RATE_LIMIT_SESSIONS_PER_MIN", "0"),
        ("SSE_RETRY_MS", "200"),
        ("SSE_HEARTBEAT_SECS", "1"),
        ("SHUTDOWN_DRAIN_SECS", "1"),
        ("SHUTDOWN_GRACE_SECS", "5"),
        ("PORT", &port),
    ];
    // Later entries win: a test's own settings override the defaults.
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k, v));
    }
    Server::start(&env)
}

/// An instance of a Redis fleet with cross-instance delivery on.
fn redis_instance(redis: &RedisServer, name: &str, port: u16) -> Server {
    let url = redis.url();
    instance(
        name,
        port,
        &[("REDIS_URL", &url), ("FF_REDIS_SSE_BROADCAST", "true")],
    )
}

fn port_of(server: &Server) -> u16 {
    server.addr.rsplit(':').next().unwrap().parse().unwrap()
}

fn index_of(name: &str) -> usize {
    NAMES
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("unknown instance {name}"))
}

/// Starts a pipeline run directly on `server` with the session's token.
async fn start_run(server: &Server, session: &str, token: &str, body: Value) -> String {
    let res = post(
        server,
        token,
        &format!("/sessions/{session}/pipeline"),
        body,
    )
    .await;
    let status = res.status();
    let body: Value = res.json().await.unwrap_or_default();
    assert_eq!(status, 202, "start the run on {}: {body}", server.addr);
    body["run_id"].as_str().unwrap().to_owned()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Numbered chat messages (`<prefix> 1`, `<prefix> 2`, ...) published at a
/// steady pace to whichever instance `target` names; every one must be
/// accepted.
struct Chatter {
    target: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Chatter {
    fn start(to: &Server, session: &str, token: &str, prefix: &str, pace: Duration) -> Chatter {
        let target = Arc::new(Mutex::new(to.addr.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (t, s, c) = (target.clone(), stop.clone(), count.clone());
        let (session, token, prefix) = (session.to_owned(), token.to_owned(), prefix.to_owned());
        let task = tokio::spawn(async move {
            let http = client();
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let addr = t.lock().unwrap().clone();
                let res = http
                    .post(format!("http://{addr}/sessions/{session}/messages"))
                    .bearer_auth(&token)
                    .json(&json!({ "text": format!("{prefix} {n}") }))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("publish {n} to {addr}: {e}"));
                assert_eq!(res.status(), 202, "publish {n}: {:?}", res.text().await);
                c.store(n, Ordering::Relaxed);
                tokio::time::sleep(pace).await;
            }
        });
        Chatter {
            target,
            stop,
            count,
            task,
        }
    }

    fn retarget(&self, to: &Server) {
        *self.target.lock().unwrap() = to.addr.clone();
    }

    fn published(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Stops; returns how many were published.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the publisher failed");
        self.count.load(Ordering::Relaxed)
    }
}

/// A network cable between the browser and a server: a TCP forwarder that
/// can be cut (open connections dropped, new ones closed at once) and
/// plugged back in. What a page sees when its network goes away, which
/// emulated offline mode does not do to a stream already open.
struct Cable {
    addr: String,
    online: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Cable {
    async fn start(upstream: &str) -> Cable {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let online = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (on, held, up) = (online.clone(), conns.clone(), upstream.to_owned());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !on.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let up = up.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&up).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut held = held.lock().unwrap();
                held.retain(|h| !h.is_finished());
                held.push(task.abort_handle());
            }
        });
        Cable {
            addr,
            online,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.online.store(false, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    fn plug(&self) {
        self.online.store(true, Ordering::SeqCst);
    }
}

impl Drop for Cable {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

// ------------------------------------------------------------------ tests

/// Phase 3 behind HAProxy (`haproxy.cfg`, three instances, Redis, flag
/// on): a visitor runs a gated pipeline from the page and approves it.
#[tokio::test]
async fn haproxy_page_runs_a_gated_pipeline_with_every_section_once_in_order() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let servers: Vec<Server> = NAMES.iter().map(|n| redis_instance(&redis, n, 0)).collect();
    let lb = Balancer::haproxy(
        "haproxy/haproxy.cfg",
        &[&servers[0].addr, &servers[1].addr, &servers[2].addr],
        &[],
    )
    .await;
    let mut script = Script::start(
        "pipeline",
        "haproxy-pipeline",
        &lb.url(""),
        &[("SECTIONS", "3"), ("STEP_MS", "100")],
    );
    let connected = script.step("connected", Duration::from_secs(30)).await;
    assert!(
        NAMES.contains(&str_of(&connected, "instance")),
        "{connected}"
    );
    script.finish(Duration::from_secs(30)).await;
}

/// The instance holding the page's stream is SIGKILLed mid-pipeline; the
/// run executes on another instance (the test starts it there with the
/// session's token, since a run dies with its instance).
#[tokio::test]
async fn a_killed_stream_instance_s_page_resumes_elsewhere_with_every_section_once() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let mut servers: Vec<Option<Server>> = NAMES
        .iter()
        .map(|n| Some(redis_instance(&redis, n, 0)))
        .collect();
    let addrs: Vec<String> = servers
        .iter()
        .map(|s| s.as_ref().unwrap().addr.clone())
        .collect();
    let lb = Balancer::haproxy(
        "haproxy/haproxy.cfg",
        &[&addrs[0], &addrs[1], &addrs[2]],
        &[],
    )
    .await;
    let sections = 5;
    let mut script = Script::start(
        "kill",
        "sigkill",
        &lb.url(""),
        &[("SECTIONS", &sections.to_string())],
    );
    let connected = script.step("connected", Duration::from_secs(30)).await;
    let victim = index_of(str_of(&connected, "instance"));
    let runner = servers[(victim + 1) % 3].as_ref().unwrap();
    let run_id = start_run(
        runner,
        str_of(&connected, "sessionId"),
        str_of(&connected, "token"),
        json!({ "gate": false, "sections_per_stage": sections, "step_ms": 150 }),
    )
    .await;
    script.send("started", json!({ "run_id": run_id }));
    script.step("mid", Duration::from_secs(20)).await;
    // SIGKILL: no drain, no goodbye; the stream just breaks.
    drop(servers[victim].take());
    script.send("killed", json!({}));
    script.finish(Duration::from_secs(45)).await;
    if std::env::var_os("SSE_SCALE_DOCS_SCREENSHOT").is_some() {
        std::fs::copy(
            artifacts().join("sigkill.png"),
            repo().join("docs/browser.png"),
        )
        .expect("copy the screenshot into docs/");
    }
}

/// Every instance restarted in turn (SIGTERM drain, restart, next) behind
/// HAProxy while a run executes on the last one and numbered chat
/// messages are published throughout.
#[tokio::test]
async fn a_rolling_restart_under_the_page_loses_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let mut servers: Vec<Server> = NAMES.iter().map(|n| redis_instance(&redis, n, 0)).collect();
    let ports: Vec<u16> = servers.iter().map(port_of).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let lb = Balancer::haproxy(
        "haproxy/haproxy.cfg",
        &[&addrs[0], &addrs[1], &addrs[2]],
        &[],
    )
    .await;
    let sections = 50;
    let mut script = Script::start(
        "rolling",
        "rolling-restart",
        &lb.url(""),
        &[("SECTIONS", &sections.to_string())],
    );
    let connected = script.step("connected", Duration::from_secs(30)).await;
    let (session, token) = (str_of(&connected, "sessionId"), str_of(&connected, "token"));
    // The run lives on app3, restarted last: it streams through the first
    // two restarts and is cancelled (`shutdown`) by the third.
    let run_id = start_run(
        &servers[2],
        session,
        token,
        json!({ "gate": false, "sections_per_stage": sections, "step_ms": 100 }),
    )
    .await;
    let chatter = Chatter::start(
        &servers[1],
        session,
        token,
        "rolling",
        Duration::from_millis(100),
    );
    for i in 0..3 {
        // Publish through an instance that stays up during this step.
        chatter.retarget(&servers[(i + 1) % 3]);
        let before = chatter.published();
        servers[i].signal("TERM");
        let code = servers[i].wait_exit(Duration::from_secs(8));
        assert_eq!(code, Some(0), "{} did not exit cleanly", NAMES[i]);
        servers[i] = redis_instance(&redis, NAMES[i], ports[i]);
        // Let HAProxy's health check (rise 2 x 1 s) take it back in.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(chatter.published() > before + 10, "publishing stalled");
    }
    let messages = chatter.finish().await;
    script.send("done", json!({ "run_id": run_id, "messages": messages }));
    let result = script.finish(Duration::from_secs(45)).await;
    assert_eq!(result["messages"], messages, "{result}");
}

/// Opens a stream for the session as soon as the server takes it (the
/// slot a cut connection held is freed once the server notices).
async fn open_when_free(server: &Server, session: &str, token: &str) -> SseClient {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = reqwest::Client::new()
            .get(server.url(&format!("/sessions/{session}/events?token={token}")))
            .send()
            .await
            .expect("open a stream");
        if res.status() == 200 {
            return SseClient::from_response(res);
        }
        assert!(
            Instant::now() < deadline,
            "no free stream slot: {}",
            res.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `<prefix> 1..=n` as chat messages.
async fn chat(server: &Server, session: &str, token: &str, prefix: &str, n: u32) {
    for i in 1..=n {
        let res = message(server, session, token, &format!("{prefix} {i}")).await;
        assert_eq!(res.status(), 202, "publish {prefix} {i}");
    }
}

/// The page's connection is cut; while it is away, another client takes
/// the only stream slot (`MAX_STREAMS=1`) and messages are published. The
/// page's reconnect is answered 503 with `Retry-After: 2` until the slot
/// is freed.
#[tokio::test]
async fn a_full_instance_s_503_is_retried_after_retry_after_and_resumes() {
    let _serial = SERIAL.lock().await;
    let server = instance("solo", 0, &[("MAX_STREAMS", "1")]);
    let cable = Cable::start(&server.addr).await;
    let mut script = Script::start(
        "refused",
        "refused-503",
        &format!("http://{}", cable.addr),
        &[("MODE", "503")],
    );
    let connected = script.step("connected", Duration::from_secs(30)).await;
    let (session, token) = (str_of(&connected, "sessionId"), str_of(&connected, "token"));
    chat(&server, session, token, "before", 3).await;
    script.send("before", json!({ "count": 3 }));
    script.step("seen", Duration::from_secs(20)).await;

    cable.cut();
    let (other, other_token) = new_session(&server).await;
    let occupant = open_when_free(&server, &other, &other_token).await;
    chat(&server, session, token, "during", 5).await;
    cable.plug();
    script.send("refusing", json!({ "during": 5 }));
    script.step("refused", Duration::from_secs(30)).await;
    // Let it be refused once more after waiting (its retry and that
    // retry's probe), then free the slot. Counted, not timed: a slot freed
    // between a refused retry and its probe would make the probe's answer
    // a 200 with no Retry-After to wait for.
    let refused = server.stats().await["streams_refused"]
        .as_u64()
        .unwrap_or(0);
    let twice = eventually(Duration::from_secs(15), || async {
        server.stats().await["streams_refused"]
            .as_u64()
            .unwrap_or(0)
            >= refused + 2
    })
    .await;
    assert!(twice, "no second refusal: {}", server.stats().await);
    drop(occupant);
    let freed = eventually(Duration::from_secs(10), || async {
        server.stats().await["open_streams"] == 0
    })
    .await;
    assert!(freed, "the slot was not freed: {}", server.stats().await);
    script.send("released", json!({}));
    script.finish(Duration::from_secs(45)).await;
    let stats = server.stats().await;
    assert!(stats["streams_refused"].as_u64() >= Some(2), "{stats}");
}

/// The page's connection is cut; its address has used up
/// `RATE_LIMIT_STREAMS_PER_MIN=1` (with its first stream), so its
/// reconnect is answered 429 with the rest of the window as
/// `Retry-After`. The window is Redis's: the test shortens its expiry to
/// a few seconds, so the scenario does not wait out a minute.
#[tokio::test]
async fn a_rate_limited_429_is_retried_after_retry_after_and_resumes() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let url = redis.url();
    let server = instance(
        "solo",
        0,
        &[("REDIS_URL", &url), ("RATE_LIMIT_STREAMS_PER_MIN", "1")],
    );
    let cable = Cable::start(&server.addr).await;
    let mut script = Script::start(
        "refused",
        "refused-429",
        &format!("http://{}", cable.addr),
        &[("MODE", "429")],
    );
    let connected = script.step("connected", Duration::from_secs(30)).await;
    let (session, token) = (str_of(&connected, "sessionId"), str_of(&connected, "token"));
    chat(&server, session, token, "before", 3).await;
    script.send("before", json!({ "count": 3 }));
    script.step("seen", Duration::from_secs(20)).await;

    cable.cut();
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*rl:streams:*")
        .query(&mut conn)
        .expect("KEYS");
    assert_eq!(keys.len(), 1, "one stream-limit window: {keys:?}");
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(&keys[0])
        .arg(4000)
        .query(&mut conn)
        .expect("PEXPIRE");
    chat(&server, session, token, "during", 5).await;
    cable.plug();
    script.send("refusing", json!({ "during": 5 }));
    script.step("refused", Duration::from_secs(30)).await;
    script.send("released", json!({}));
    let result = script.finish(Duration::from_secs(45)).await;
    let asked: Vec<u64> = result["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["retryAfter"].as_str()?.parse().ok())
        .collect();
    assert!(
        asked.iter().all(|s| (1..=4).contains(s)),
        "Retry-After within the shortened window: {asked:?}"
    );
}

/// Resume beyond history (`HISTORY_MAXLEN=10`): the page's connection is
/// cut while 40 messages are published; when it is back the page gets
/// `reset` and refetches the history window, slowly, while live messages
/// are published (the module holds them until the refetch is done).
#[tokio::test]
async fn resuming_beyond_history_resets_the_page_which_refetches_its_state() {
    let _serial = SERIAL.lock().await;
    let maxlen = 10;
    let server = instance("solo", 0, &[("HISTORY_MAXLEN", &maxlen.to_string())]);
    let cable = Cable::start(&server.addr).await;
    let mut script = Script::start(
        "reset",
        "reset",
        &format!("http://{}", cable.addr),
        &[("HISTORY_MAXLEN", &maxlen.to_string())],
    );
    let connected = script.step("connected", Duration::from_secs(30)).await;
    let (session, token) = (str_of(&connected, "sessionId"), str_of(&connected, "token"));
    chat(&server, session, token, "before", 3).await;
    script.send("before", json!({ "count": 3 }));
    script.step("seen", Duration::from_secs(20)).await;

    cable.cut();
    let offline = 40;
    chat(&server, session, token, "offline", offline).await;
    // Offline for a few of the browser's reconnect attempts.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cable.plug();
    script.send("restored", json!({ "offline": offline }));
    script.step("reset", Duration::from_secs(30)).await;
    chat(&server, session, token, "after", 3).await;
    script.send("after", json!({ "count": 3 }));
    script.finish(Duration::from_secs(30)).await;
    let stats = server.stats().await;
    assert!(stats["resets"].as_u64() >= Some(1), "{stats}");
}

/// The page goes into the back/forward cache and comes back (its
/// `pagehide`/`pageshow` handlers close and reopen the stream) while it
/// refetches its state after a `reset` and the module holds live messages
/// back: behind HAProxy (`haproxy.cfg`, three instances, phase 1: cookie
/// affinity, in-process history, `HISTORY_MAXLEN=10`, which trims exactly;
/// Redis trims its streams approximately). Every live message shows once,
/// in order, after the refetched ones; the reopen resumes from the reset's
/// id.
#[tokio::test]
async fn a_page_closed_and_reopened_during_a_resync_still_gets_every_held_event() {
    let _serial = SERIAL.lock().await;
    let maxlen = "10";
    let servers: Vec<Server> = NAMES
        .iter()
        .map(|n| instance(n, 0, &[("HISTORY_MAXLEN", maxlen)]))
        .collect();
    let lb = Balancer::haproxy(
        "haproxy/haproxy.cfg",
        &[&servers[0].addr, &servers[1].addr, &servers[2].addr],
        &[],
    )
    .await;
    let mut script = Script::start(
        "bfcache",
        "bfcache-resync",
        &lb.url(""),
        &[("HISTORY_MAXLEN", maxlen)],
    );
    let connected = script.step("connected", Duration::from_secs(30)).await;
    let (session, token) = (str_of(&connected, "sessionId"), str_of(&connected, "token"));
    // Phase 1: the session's events live on the instance the cookie names.
    let home = &servers[index_of(str_of(&connected, "instance"))];
    script.step("away", Duration::from_secs(20)).await;
    let offline = 15;
    chat(home, session, token, "offline", offline).await;
    script.send("published", json!({ "offline": offline }));
    script.step("reset", Duration::from_secs(30)).await;
    chat(home, session, token, "live", 3).await;
    script.send("live", json!({ "count": 3 }));
    script.step("reopened", Duration::from_secs(20)).await;
    let res = message(home, session, token, "live 4").await;
    assert_eq!(res.status(), 202, "publish live 4");
    script.send("after", json!({ "count": 4 }));
    script.finish(Duration::from_secs(60)).await;
    let stats = home.stats().await;
    assert!(stats["resets"].as_u64() >= Some(1), "{stats}");
}

/// The server becomes unreachable (the cable cut for ten seconds) under a
/// page on the EventSource transport whose stream had been up: the browser
/// retries once on its own, then the module closes the EventSource and
/// backs off with jitter (reported and seen on the wire), instead of
/// EventSource's endless fixed loop; once the network is back every message
/// published meanwhile shows once.
#[tokio::test]
async fn an_unreachable_server_is_retried_on_the_module_s_backoff_not_the_browser_s_loop() {
    let _serial = SERIAL.lock().await;
    let server = instance("solo", 0, &[]);
    let cable = Cable::start(&server.addr).await;
    let mut script = Script::start(
        "backoff",
        "backoff-unreachable",
        &format!("http://{}", cable.addr),
        &[],
    );
    let connected = script.step("connected", Duration::from_secs(30)).await;
    let (session, token) = (str_of(&connected, "sessionId"), str_of(&connected, "token"));
    chat(&server, session, token, "before", 3).await;
    script.send("before", json!({ "count": 3 }));
    script.step("stable", Duration::from_secs(30)).await;
    cable.cut();
    script.send("cut", json!({}));
    script.step("observed", Duration::from_secs(40)).await;
    chat(&server, session, token, "during", 3).await;
    cable.plug();
    script.send("plugged", json!({ "during": 3 }));
    script.finish(Duration::from_secs(60)).await;
}

/// Phase 1 (cookie affinity, no Redis) behind nginx's `cookie-map` file:
/// stream, pipeline and gate all reach the instance the cookie names.
#[tokio::test]
async fn phase1_nginx_cookie_map_page_runs_a_pipeline() {
    let _serial = SERIAL.lock().await;
    let servers: Vec<Server> = NAMES.iter().map(|n| instance(n, 0, &[])).collect();
    let lb = Balancer::nginx(
        "nginx/cookie-map.conf.template",
        &[&servers[0].addr, &servers[1].addr, &servers[2].addr],
    )
    .await;
    let mut script = Script::start(
        "pipeline",
        "nginx-pipeline",
        &lb.url(""),
        &[("SECTIONS", "3"), ("STEP_MS", "100")],
    );
    script.step("connected", Duration::from_secs(30)).await;
    script.finish(Duration::from_secs(30)).await;
}

/// Phase 1 behind Caddy's `Caddyfile` (its own `sse_lb` cookie).
#[tokio::test]
async fn phase1_caddy_page_runs_a_pipeline() {
    let _serial = SERIAL.lock().await;
    let servers: Vec<Server> = NAMES.iter().map(|n| instance(n, 0, &[])).collect();
    let lb = Balancer::caddy(
        "caddy/Caddyfile",
        &[&servers[0].addr, &servers[1].addr, &servers[2].addr],
        &[(
            "LB_COOKIE_SECRET",
            "browser-test-cookie-secret-0123456789abcdef",
        )],
    )
    .await;
    let mut script = Script::start(
        "pipeline",
        "caddy-pipeline",
        &lb.url(""),
        &[("SECTIONS", "3"), ("STEP_MS", "100")],
    );
    script.step("connected", Duration::from_secs(30)).await;
    script.finish(Duration::from_secs(30)).await;
}

/// The fetch() transport behind `haproxy-header.cfg` (routing on
/// `X-Session-ID`, Redis, flag on): the stream's instance is killed while
/// numbered messages are published elsewhere.
#[tokio::test]
async fn the_fetch_transport_routes_by_header_and_resumes_after_a_kill() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let mut servers: Vec<Option<Server>> = NAMES
        .iter()
        .map(|n| Some(redis_instance(&redis, n, 0)))
        .collect();
    let addrs: Vec<String> = servers
        .iter()
        .map(|s| s.as_ref().unwrap().addr.clone())
        .collect();
    let lb = Balancer::haproxy(
        "haproxy/haproxy-header.cfg",
        &[&addrs[0], &addrs[1], &addrs[2]],
        &[],
    )
    .await;
    let mut script = Script::start("fetch", "fetch-header", &lb.url(""), &[]);
    let connected = script.step("connected", Duration::from_secs(30)).await;
    let killed = str_of(&connected, "instance").to_owned();
    let victim = index_of(&killed);
    let chatter = Chatter::start(
        servers[(victim + 1) % 3].as_ref().unwrap(),
        str_of(&connected, "sessionId"),
        str_of(&connected, "token"),
        "n",
        Duration::from_millis(50),
    );
    let ok = eventually(Duration::from_secs(20), || async {
        chatter.published() >= 20
    })
    .await;
    assert!(ok, "publisher stuck at {}", chatter.published());
    drop(servers[victim].take());
    let at = chatter.published();
    let ok = eventually(Duration::from_secs(20), || async {
        chatter.published() >= at + 30
    })
    .await;
    assert!(ok, "publisher stuck at {}", chatter.published());
    let messages = chatter.finish().await;
    script.send("done", json!({ "messages": messages, "killed": killed }));
    script.finish(Duration::from_secs(45)).await;
}

/// What Chromium's own EventSource makes of a stream, against the module,
/// on both transports, from a scripted origin of the script's own
/// (`tests/browser/native.mjs`): server events named `error`, `open` and
/// `*` are neither connection news nor reach `'*'`; a `decode` that throws
/// loses no event and loops no connection; a `retry:` hint longer than the
/// liveness deadline is waited out.
#[tokio::test]
async fn eventsource_s_own_names_decode_errors_and_long_retry_hints() {
    let _serial = SERIAL.lock().await;
    Script::start("native", "native", "", &[])
        .finish(Duration::from_secs(60))
        .await;
}

/// The module's parser, `Retry-After` parsing and backoff under Node (no
/// browser): `tests/browser/parser.mjs`.
#[tokio::test]
async fn the_client_module_parses_event_streams_by_the_whatwg_rules() {
    Script::start("parser", "parser", "", &[])
        .finish(Duration::from_secs(30))
        .await;
}
