//! The doctor's browser: an HTTP client with its own cookie jar, and the
//! few API calls and SSE reading the checks need.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::cookie::Jar;
use reqwest::header::{ACCEPT_ENCODING, CONTENT_ENCODING};
use serde_json::{json, Value};

/// One SSE block as read.
#[derive(Debug, Default)]
pub(super) struct Block {
    pub(super) id: Option<String>,
    pub(super) event: Option<String>,
    pub(super) data: String,
    pub(super) comment: bool,
}

/// An open stream, read block by block.
pub(super) struct Stream {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Stream {
    /// The next block, `Ok(None)` when the stream ended, `Err` on timeout.
    pub(super) async fn next(&mut self, within: Duration) -> Result<Option<Block>, ()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..pos + 2).collect();
                return Ok(Some(parse(&raw)));
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Err(_) => return Err(()),
                Ok(Some(Ok(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(_) => return Ok(None),
            }
        }
    }

    /// The next event (comments and bare `retry:` blocks skipped).
    pub(super) async fn event(&mut self, within: Duration) -> Result<Option<Block>, ()> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await? {
                Some(b) if b.event.is_some() || !b.data.is_empty() => return Ok(Some(b)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }
}

pub(super) fn parse(raw: &str) -> Block {
    let mut block = Block::default();
    for line in raw.trim_end_matches('\n').split('\n') {
        if line.starts_with(':') {
            block.comment = true;
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => block.id = Some(value.to_owned()),
            "event" => block.event = Some(value.to_owned()),
            "data" => {
                if !block.data.is_empty() {
                    block.data.push('\n');
                }
                block.data.push_str(value);
            }
            _ => {}
        }
    }
    block
}

/// A browser: its own cookie jar, so affinity cookies are kept.
pub(super) fn browser() -> reqwest::Client {
    client_with(Arc::new(Jar::default()), None)
}

/// A client on `jar`, sending `X-Session-ID: <session>` when given.
pub(super) fn client_with(jar: Arc<Jar>, session: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(id) = session.and_then(|s| reqwest::header::HeaderValue::from_str(s).ok()) {
        headers.insert("x-session-id", id);
    }
    reqwest::Client::builder()
        .cookie_provider(jar)
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("a reqwest client builds")
}

pub(super) struct Session {
    pub(super) id: String,
    pub(super) token: String,
    pub(super) stream_token: String,
}

pub(super) async fn create_session(
    client: &reqwest::Client,
    base: &str,
) -> Result<Session, String> {
    let res = client
        .post(format!("{base}/sessions"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("POST /sessions: {e}"))?;
    if res.status() != 201 {
        return Err(format!("POST /sessions answered {}", res.status()));
    }
    let body: Value = res
        .json()
        .await
        .map_err(|e| format!("POST /sessions: {e}"))?;
    let field = |k: &str| {
        body[k]
            .as_str()
            .map(str::to_owned)
            .ok_or(format!("POST /sessions: no {k}"))
    };
    Ok(Session {
        id: field("id")?,
        token: field("token")?,
        stream_token: field("stream_token")?,
    })
}

/// The server sends a stream's headers and prelude at once; a balancer
/// that holds them back buffers the response.
pub(super) const HEADERS_WITHIN: Duration = Duration::from_secs(3);
pub(super) const HEADERS_LATE: &str = "the stream's headers did not arrive within 3 s";

/// Opens the session's stream; returns its `Content-Encoding` and the
/// stream.
pub(super) async fn open(
    client: &reqwest::Client,
    base: &str,
    s: &Session,
    last: Option<&str>,
) -> Result<(Option<String>, Stream), String> {
    let mut req = client
        .get(format!(
            "{base}/sessions/{}/events?token={}",
            s.id, s.stream_token
        ))
        .header(ACCEPT_ENCODING, "gzip, deflate, br");
    if let Some(last) = last {
        req = req.header("last-event-id", last);
    }
    let res = tokio::time::timeout(HEADERS_WITHIN, req.send())
        .await
        .map_err(|_| HEADERS_LATE.to_owned())?
        .map_err(|e| format!("opening the stream: {e}"))?;
    if res.status() != 200 {
        return Err(format!("the stream answered {}", res.status()));
    }
    let encoding = res
        .headers()
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((
        encoding,
        Stream {
            body: res.bytes_stream().boxed(),
            buf: String::new(),
        },
    ))
}

pub(super) async fn publish(
    client: &reqwest::Client,
    base: &str,
    s: &Session,
    n: u64,
) -> Result<String, String> {
    let res = client
        .post(format!("{base}/sessions/{}/events", s.id))
        .bearer_auth(&s.token)
        .json(&json!({ "type": "doctor", "data": { "n": n } }))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("publish: {e}"))?;
    if res.status() != 202 {
        return Err(format!("publish answered {}", res.status()));
    }
    let body: Value = res.json().await.map_err(|e| format!("publish: {e}"))?;
    Ok(body["id"].as_str().unwrap_or_default().to_owned())
}

/// Reads until the `doctor` event numbered `n`; its id and how long it took.
pub(super) async fn expect_event(
    stream: &mut Stream,
    n: u64,
    within: Duration,
) -> Result<(String, Duration), String> {
    let started = Instant::now();
    loop {
        let left = within.saturating_sub(started.elapsed());
        match stream.event(left).await {
            Err(()) => return Err(format!("event {n} did not arrive within {within:?}")),
            Ok(None) => return Err(format!("the stream ended before event {n}")),
            Ok(Some(b)) if b.event.as_deref() == Some("reset") => {
                return Err(format!("got reset instead of event {n}: {}", b.data))
            }
            Ok(Some(b)) if b.event.as_deref() == Some("doctor") => {
                let got = serde_json::from_str::<Value>(&b.data)
                    .ok()
                    .and_then(|v| v["n"].as_u64());
                if got == Some(n) {
                    return Ok((b.id.unwrap_or_default(), started.elapsed()));
                }
                return Err(format!("expected event {n}, got {}", b.data));
            }
            Ok(Some(_)) => {}
        }
    }
}

pub(super) async fn instance_of(client: &reqwest::Client, base: &str) -> Option<String> {
    let res = client
        .get(format!("{base}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    res.headers()
        .get("x-instance-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}
