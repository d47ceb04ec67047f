//! Traffic for the loss tests: a client that reconnects like a browser's
//! `EventSource` (after the `retry:` hint, with `Last-Event-ID`, giving up
//! on any non-200 answer), a publisher of numbered events at a steady pace,
//! and the check that every number arrived exactly once, in order.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::json;

use crate::support::{client, eventually, parse_block, Server};

/// Pause between two published events (50 events/s).
pub const PACE: Duration = Duration::from_millis(20);
const T: Duration = Duration::from_secs(10);

/// What one reconnecting client saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Event numbers in arrival order.
    pub numbers: Vec<u64>,
    /// Their event ids, in the same order.
    pub ids: Vec<String>,
    /// The instance of each connection, from its `connected` event.
    pub instances: Vec<String>,
    pub resets: usize,
    /// A non-200 answer to a (re)connect: a browser would stop here.
    pub fatal: Option<String>,
}

/// A client that behaves like `EventSource`, running until stopped.
pub struct Resumer {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Resumer {
    pub fn start(base: String, session: &str, token: &str) -> Resumer {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("{base}/sessions/{session}/events?token={token}");
        let task = tokio::spawn(run_resumer(url, seen.clone(), stop.clone()));
        Resumer { seen, stop, task }
    }

    pub fn instances(&self) -> Vec<String> {
        self.seen.lock().unwrap().instances.clone()
    }

    /// Waits for the first connection's `connected` event; returns its
    /// instance.
    pub async fn connected(&self) -> String {
        let ok = eventually(T, || async { !self.instances().is_empty() }).await;
        assert!(ok, "never connected: {:?}", self.seen.lock().unwrap());
        self.instances()[0].clone()
    }

    /// Waits until `n` events arrived (or it is clear they will not), then
    /// stops and returns what was seen.
    pub async fn finish(self, n: usize) -> Seen {
        eventually(Duration::from_secs(20), || async {
            let s = self.seen.lock().unwrap();
            s.numbers.len() >= n || s.fatal.is_some()
        })
        .await;
        // Anything extra (a duplicate) would arrive right behind.
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
        let _ = self.task.await;
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

async fn run_resumer(url: String, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut last_id: Option<String> = None;
    let mut retry = Duration::from_millis(200);
    let mut cookies: BTreeMap<String, String> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let mut req = http.get(&url).header("accept", "text/event-stream");
        if let Some(id) = &last_id {
            req = req.header("last-event-id", id);
        }
        if !cookies.is_empty() {
            let jar: Vec<String> = cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req = req.header(COOKIE, jar.join("; "));
        }
        let res = match req.send().await {
            Ok(res) => res,
            // A network error: EventSource reconnects.
            Err(_) => {
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        if res.status() != 200 {
            let status = res.status();
            let body = res.text().await.unwrap_or_default();
            seen.lock().unwrap().fatal = Some(format!("{status}: {body}"));
            return;
        }
        for v in res.headers().get_all(SET_COOKIE) {
            if let Some((k, v)) = v
                .to_str()
                .ok()
                .and_then(|c| c.split(';').next())
                .and_then(|kv| kv.split_once('='))
            {
                cookies.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
        let mut body = res.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(pos) = buf.find("\n\n") {
                let raw: String = buf.drain(..pos + 2).collect();
                let block = parse_block(raw.trim_end_matches('\n'));
                if let Some(ms) = block.retry {
                    retry = Duration::from_millis(ms);
                }
                if let Some(id) = &block.id {
                    last_id = Some(id.clone());
                }
                let mut s = seen.lock().unwrap();
                match block.event.as_deref() {
                    Some("connected") => {
                        let instance = block.json()["instance_id"].as_str().unwrap().to_owned();
                        s.instances.push(instance);
                    }
                    Some("n") => {
                        s.numbers.push(block.json().as_u64().unwrap());
                        s.ids.push(block.id.clone().unwrap_or_default());
                    }
                    Some("reset") => s.resets += 1,
                    _ => {}
                }
            }
        }
        tokio::time::sleep(retry).await;
    }
}

/// Publishes 1, 2, ... every `PACE` to whichever instance `target` names,
/// until stopped; every publish must be accepted. Returns how many.
pub struct Publisher {
    target: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub fn start(target: &Server, session: &str, token: &str) -> Publisher {
        let target = Arc::new(Mutex::new(target.addr.clone()));
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (t, s, c) = (target.clone(), stop.clone(), count.clone());
        let (session, token) = (session.to_owned(), token.to_owned());
        let task = tokio::spawn(async move {
            let http = client();
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let addr = t.lock().unwrap().clone();
                let res = http
                    .post(format!("http://{addr}/sessions/{session}/events"))
                    .bearer_auth(&token)
                    .json(&json!({ "type": "n", "data": n }))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("publish {n} to {addr}: {e}"));
                assert_eq!(res.status(), 202, "publish {n}: {:?}", res.text().await);
                c.store(n, Ordering::Relaxed);
                tokio::time::sleep(PACE).await;
            }
        });
        Publisher {
            target,
            stop,
            count,
            task,
        }
    }

    pub fn retarget(&self, to: &Server) {
        *self.target.lock().unwrap() = to.addr.clone();
    }

    pub fn published(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub async fn wait_for(&self, n: u64) {
        let ok = eventually(Duration::from_secs(20), || async { self.published() >= n }).await;
        assert!(ok, "publisher stuck at {}", self.published());
    }

    /// Stops and returns how many events were published.
    pub async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("publisher panicked");
        self.count.load(Ordering::Relaxed)
    }
}

/// Every event 1..=n exactly once, in order.
pub fn assert_exactly_once(who: &str, seen: &Seen, n: u64) {
    assert!(seen.fatal.is_none(), "{who}: gave up: {:?}", seen.fatal);
    let expected: Vec<u64> = (1..=n).collect();
    if seen.numbers != expected {
        let mut counts = BTreeMap::new();
        for x in &seen.numbers {
            *counts.entry(*x).or_insert(0) += 1;
        }
        let missing: Vec<u64> = expected
            .iter()
            .filter(|x| !counts.contains_key(x))
            .copied()
            .collect();
        let doubled: Vec<u64> = counts
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(x, _)| *x)
            .collect();
        panic!(
            "{who}: {} events for {n} published; missing {missing:?}, doubled {doubled:?}, \
             in order: {}; resets: {}; connections: {:?}",
            seen.numbers.len(),
            seen.numbers.windows(2).all(|w| w[0] < w[1]),
            seen.resets,
            seen.instances
        );
    }
}
