//! The library as an application uses it: `examples/phase2.rs` run twice
//! against a real redis-server shows an event crossing processes and a
//! reconnect resuming with `Last-Event-ID` on the other process.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use redis_server::{free_port, RedisServer};

const T: Duration = Duration::from_secs(10);

/// The example binary next to this test: `cargo test` builds examples
/// with the tests; when this test runs alone it builds the one it needs.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("examples").join(name);
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = Command::new(cargo)
            .args([
                "build",
                "-p",
                "sse-scale",
                "--example",
                name,
                "--manifest-path",
            ])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .status()
            .expect("cargo build --example");
        assert!(built.success(), "cargo build --example {name}");
    }
    bin
}

struct App {
    child: Child,
    port: u16,
}

impl App {
    async fn start(redis: &RedisServer, name: &str) -> App {
        let port = free_port();
        let child = Command::new(example("phase2"))
            .env_clear()
            .env("PORT", port.to_string())
            .env("REDIS_URL", redis.url())
            .env("FF_REDIS_SSE_BROADCAST", "true")
            .env("INSTANCE_ID", name)
            .env("SHUTDOWN_DRAIN_SECS", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run examples/phase2 (built by cargo test)");
        let app = App { child, port };
        let deadline = tokio::time::Instant::now() + T;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} did not listen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn stop(&mut self) -> Option<i32> {
        // SIGTERM: the example drains, shuts the toolkit down and exits 0.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + T;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One SSE event: its `id:`, `event:` and `data:` lines.
#[derive(Debug, Default)]
struct Event {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

struct Sse {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Sse {
    async fn open(url: String, last_event_id: Option<&str>) -> Sse {
        let mut req = reqwest::Client::new().get(url);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let res = req.send().await.expect("open stream");
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        Sse {
            body: res.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event that has an `event:` line (comments and `retry:`
    /// skipped).
    async fn next(&mut self) -> Event {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let mut ev = Event::default();
                for line in block.lines() {
                    match line.split_once(": ") {
                        Some(("id", v)) => ev.id = Some(v.to_owned()),
                        Some(("event", v)) => ev.event = Some(v.to_owned()),
                        Some(("data", v)) => ev.data.push_str(v),
                        _ => {}
                    }
                }
                if ev.event.is_some() {
                    return ev;
                }
                continue;
            }
            let chunk = tokio::time::timeout(T, self.body.next())
                .await
                .expect("an event in time")
                .expect("stream open")
                .expect("stream read");
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

async fn publish(app: &App, n: u32) -> String {
    let res = reqwest::Client::new()
        .post(app.url("/sessions/demo/events"))
        .json(&serde_json::json!({ "type": "section_draft", "data": { "n": n } }))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    res.text().await.unwrap()
}

#[tokio::test]
async fn phase2_delivers_across_processes_and_resumes_on_the_other_one() {
    let redis = RedisServer::start();
    let mut a = App::start(&redis, "a").await;
    let mut b = App::start(&redis, "b").await;

    let mut on_a = Sse::open(a.url("/sessions/demo/events"), None).await;
    let connected = on_a.next().await;
    assert_eq!(connected.event.as_deref(), Some("connected"));
    assert_eq!(
        connected.id.as_deref(),
        Some("0-0"),
        "a new session starts at 0-0"
    );
    assert!(
        connected.data.contains("\"instance_id\":\"a\""),
        "{connected:?}"
    );

    // Published on B, received on A: across processes, in order.
    let mut published = Vec::new();
    for n in 1..=3 {
        published.push(publish(&b, n).await);
    }
    for (n, id) in (1..=3).zip(&published) {
        let ev = on_a.next().await;
        assert_eq!(ev.event.as_deref(), Some("section_draft"));
        assert_eq!(ev.data, format!("{{\"n\":{n}}}"));
        assert_eq!(ev.id.as_ref(), Some(id), "the id B answered with");
    }

    // The client's connection to A drops after the first event; it comes
    // back on B with Last-Event-ID and gets exactly what it missed.
    drop(on_a);
    let mut on_b = Sse::open(b.url("/sessions/demo/events"), Some(&published[0])).await;
    let connected = on_b.next().await;
    assert_eq!(connected.id.as_ref(), Some(&published[0]));
    for (n, id) in (2..=3).zip(&published[1..]) {
        let ev = on_b.next().await;
        assert_eq!(ev.event.as_deref(), Some("section_draft"), "{ev:?}");
        assert_eq!(ev.data, format!("{{\"n\":{n}}}"));
        assert_eq!(ev.id.as_ref(), Some(id));
    }
    // Then live events, from either process.
    let live = publish(&a, 4).await;
    let ev = on_b.next().await;
    assert_eq!(ev.id, Some(live));

    assert_eq!(a.stop(), Some(0), "a exits cleanly on SIGTERM");
    assert_eq!(b.stop(), Some(0), "b exits cleanly on SIGTERM");
}
