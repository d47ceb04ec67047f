//! `sse-scale doctor <BASE_URL>`: checks a running deployment through its
//! balancer, as a browser would reach it, and says what to fix.
//!
//! The failures that hurt most in a migration are in the deployment, not in
//! the server: a balancer that buffers the stream, an idle timeout shorter
//! than the heartbeat, compression on `text/event-stream`, affinity that
//! does not hold, instances that disagree on the flag. Each check prints one
//! line — pass, fail or skip — and a failure names the setting and the
//! shipped `lb-config/` file that gets it right.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::cookie::Jar;
use serde::Serialize;
use serde_json::{json, Value};

mod client;

use client::{
    browser, client_with, create_session, expect_event, instance_of, open, publish, HEADERS_LATE,
};

/// Arguments of `sse-scale doctor`.
#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// The deployment's public URL (its balancer), e.g. https://app.example.com
    pub base_url: String,

    /// Seconds to hold an idle stream open: longer than the balancer idle
    /// timeout to test, shorter only if heartbeats are frequent.
    #[arg(long, default_value_t = 20)]
    pub hold: u64,

    /// The servers' ADMIN_TOKEN, to check that every instance has the same
    /// flag value (skipped without it).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Print the results as one JSON object.
    #[arg(long)]
    pub json: bool,

    /// Send `X-Session-ID` with every request of the session, as a
    /// fetch()-based client does behind the header-hash configs
    /// (`haproxy-header.cfg`, `nginx/header-hash`, `Caddyfile.header`).
    #[arg(long)]
    pub session_header: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// The outcome of one check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was seen.
    pub detail: String,
    /// What fixes a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<&'static str>,
}

impl Check {
    fn pass(name: &'static str, detail: String) -> Self {
        Check {
            name,
            status: Status::Pass,
            detail,
            advice: None,
        }
    }

    fn fail(name: &'static str, detail: String, advice: &'static str) -> Self {
        Check {
            name,
            status: Status::Fail,
            detail,
            advice: Some(advice),
        }
    }

    fn skip(name: &'static str, detail: String) -> Self {
        Check {
            name,
            status: Status::Skip,
            detail,
            advice: None,
        }
    }
}

const UNBUFFERED: &str = "the balancer holds the stream back: turn response buffering off for \
    text/event-stream (nginx `proxy_buffering off;` and do not ignore X-Accel-Buffering, Caddy \
    `flush_interval -1`), as lb-config/nginx/cookie-map.conf.template and lb-config/caddy/Caddyfile do";
const COMPRESSION: &str = "the balancer compresses the stream, which buffers it: no compression \
    for text/event-stream (nginx `gzip off;`, Caddy without `encode`, HAProxy without \
    `compression`), see lb-config/README.md, \"SSE-safe settings\"";
const IDLE: &str = "the balancer closed an idle stream: its idle timeouts must be longer than \
    SSE_HEARTBEAT_SECS (HAProxy `timeout client`/`server`/`tunnel`, nginx `proxy_read_timeout`, \
    Caddy `read_timeout`), as in lb-config/haproxy/haproxy.cfg; or lower SSE_HEARTBEAT_SECS";
const AFFINITY: &str = "requests of one browser reach several instances and events do not cross \
    them: use a sticky config (lb-config/haproxy/haproxy.cfg, \
    lb-config/nginx/cookie-map.conf.template, lb-config/caddy/Caddyfile), or turn on \
    FF_REDIS_SSE_BROADCAST on every instance (phase 2)";
const RESUME: &str = "a reconnect with Last-Event-ID did not get exactly what it missed: the \
    balancer must pass the Last-Event-ID header and, without Redis, keep the client on its \
    instance (a sticky config from lb-config/); with Redis, FF_REDIS_SSE_BROADCAST on for every \
    session";
const FLAGS: &str = "instances disagree on FF_REDIS_SSE_BROADCAST: set the same value in every \
    instance's environment, or check that all of them reach Unleash (docs/flags.md)";
const SESSION: &str = "the deployment does not answer POST /sessions through this URL: check \
    the balancer's address and that it routes to the instances";

/// Runs the checks and prints them; the process's exit code.
pub fn main(args: DoctorArgs) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let checks = runtime.block_on(run(&args));
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    if args.json {
        println!(
            "{}",
            json!({ "base_url": args.base_url, "ok": ok, "checks": checks })
        );
    } else {
        for c in &checks {
            let status = match c.status {
                Status::Pass => "PASS",
                Status::Fail => "FAIL",
                Status::Skip => "SKIP",
            };
            println!("{status}  {:<16} {}", c.name, c.detail);
            if let Some(advice) = c.advice {
                println!("      fix: {advice}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub async fn run(args: &DoctorArgs) -> Vec<Check> {
    let base = args.base_url.trim_end_matches('/');
    let jar = Arc::new(Jar::default());
    let client = client_with(jar.clone(), None);
    let mut checks = Vec::new();
    let session = match create_session(&client, base).await {
        Ok(s) => s,
        Err(e) => return vec![Check::fail("session", e, SESSION)],
    };
    // From here on the browser's requests belong to the session.
    let client = client_with(jar, args.session_header.then_some(session.id.as_str()));
    let (encoding, mut stream) = match open(&client, base, &session, None).await {
        Ok(opened) => opened,
        Err(e) if e == HEADERS_LATE => {
            // Buffered so thoroughly that nothing of the stream arrives:
            // what needs the stream cannot be checked, the rest can.
            checks.push(Check::fail("unbuffered", e, UNBUFFERED));
            checks.push(Check::skip(
                "no_compression",
                "no stream headers to look at".into(),
            ));
            checks.push(followups_pinned(&client, base).await);
            checks.push(Check::skip("idle_timeout", "no stream to hold".into()));
            checks.push(Check::skip("resume", "no stream to resume".into()));
            checks.push(flag_agreement(base, args.admin_token.as_deref()).await);
            return checks;
        }
        Err(e) => return vec![Check::fail("stream", e, SESSION)],
    };

    // Buffering: the prelude and a published event must arrive at once.
    let started = Instant::now();
    let connected = match stream.event(Duration::from_secs(3)).await {
        Ok(Some(b)) if b.event.as_deref() == Some("connected") => Some(b),
        _ => None,
    };
    let connected_after = started.elapsed();
    let holder = connected
        .as_ref()
        .and_then(|b| serde_json::from_str::<Value>(&b.data).ok())
        .and_then(|v| v["instance_id"].as_str().map(str::to_owned));
    let first = match &connected {
        None => Err("the connected event did not arrive within 3 s".to_owned()),
        Some(_) => match publish(&client, base, &session, 1).await {
            Ok(_) => expect_event(&mut stream, 1, Duration::from_secs(3)).await,
            Err(e) => Err(e),
        },
    };
    let mut last_id = None;
    checks.push(match &first {
        Ok((id, took))
            if connected_after < Duration::from_secs(1) && *took < Duration::from_secs(1) =>
        {
            last_id = Some(id.clone());
            Check::pass(
                "unbuffered",
                format!(
                    "connected after {} ms, an event {} ms after its publish",
                    connected_after.as_millis(),
                    took.as_millis()
                ),
            )
        }
        Ok((id, took)) => {
            last_id = Some(id.clone());
            Check::fail(
                "unbuffered",
                format!(
                    "connected after {} ms, an event {} ms after its publish (want < 1 s)",
                    connected_after.as_millis(),
                    took.as_millis()
                ),
                UNBUFFERED,
            )
        }
        // The prelude came through at once, so nothing buffers; the event
        // went somewhere else (judged by the affinity check).
        Err(e) if connected.is_some() && connected_after < Duration::from_secs(1) => Check::skip(
            "unbuffered",
            format!(
                "connected after {} ms; {e} (see affinity)",
                connected_after.as_millis()
            ),
        ),
        Err(e) => Check::fail("unbuffered", e.clone(), UNBUFFERED),
    });
    checks.push(match &encoding {
        None => Check::pass(
            "no_compression",
            "no Content-Encoding with Accept-Encoding: gzip, deflate, br".into(),
        ),
        Some(enc) => Check::fail(
            "no_compression",
            format!("Content-Encoding: {enc}"),
            COMPRESSION,
        ),
    });

    // Affinity: follow-up requests reach the stream's instance, or events
    // cross instances anyway.
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(
            instance_of(&client, base)
                .await
                .unwrap_or_else(|| "?".into()),
        );
    }
    let pinned = holder.is_some() && seen.iter().all(|i| Some(i) == holder.as_ref());
    let affinity = if pinned {
        Check::pass(
            "affinity",
            format!(
                "10 follow-up requests reached {}",
                holder.clone().unwrap_or_default()
            ),
        )
    } else {
        // Not pinned: with Redis on, a publish that lands anywhere arrives.
        let stranger = browser();
        let mut crossed = true;
        for n in 2..=4 {
            let arrived = match publish(&stranger, base, &session, n).await {
                Ok(_) => expect_event(&mut stream, n, Duration::from_secs(2)).await,
                Err(e) => Err(e),
            };
            match arrived {
                Ok((id, _)) => last_id = Some(id),
                Err(_) => crossed = false,
            }
        }
        let mut distinct = seen.clone();
        distinct.sort();
        distinct.dedup();
        if crossed {
            Check::pass(
                "affinity",
                format!(
                    "not pinned (requests reached {}), but events cross instances",
                    distinct.join(", ")
                ),
            )
        } else {
            Check::fail(
                "affinity",
                format!("the stream is on {}, follow-up requests reached {}, and publishes from elsewhere did not arrive", holder.clone().unwrap_or("?".into()), distinct.join(", ")),
                AFFINITY,
            )
        }
    };
    checks.push(affinity);

    // Idle timeout: the stream stays open on heartbeats alone.
    let hold = Duration::from_secs(args.hold);
    let held_from = Instant::now();
    let mut heartbeats = 0;
    let mut closed_after = None;
    while held_from.elapsed() < hold {
        match stream.next(hold.saturating_sub(held_from.elapsed())).await {
            Err(()) => break,
            Ok(None) => {
                closed_after = Some(held_from.elapsed());
                break;
            }
            Ok(Some(b)) if b.comment => heartbeats += 1,
            Ok(Some(_)) => {}
        }
    }
    checks.push(match closed_after {
        None => Check::pass(
            "idle_timeout",
            format!(
                "an idle stream stayed open {} s ({heartbeats} heartbeats)",
                args.hold
            ),
        ),
        Some(after) => Check::fail(
            "idle_timeout",
            format!(
                "the stream closed after {:.1} s of {} s idle ({heartbeats} heartbeats)",
                after.as_secs_f64(),
                args.hold
            ),
            IDLE,
        ),
    });
    drop(stream);

    // Resume: an event published while away arrives on the reconnect.
    let resume = match &last_id {
        None => Check::skip("resume", "no event id to resume from (see above)".into()),
        Some(last) => {
            let result = async {
                publish(&client, base, &session, 100).await?;
                let (_, mut again) = open(&client, base, &session, Some(last)).await?;
                expect_event(&mut again, 100, Duration::from_secs(3)).await
            }
            .await;
            match result {
                Ok(_) => Check::pass(
                    "resume",
                    format!("a reconnect with Last-Event-ID {last} got the event it missed"),
                ),
                Err(e) => Check::fail("resume", e, RESUME),
            }
        }
    };
    checks.push(resume);

    checks.push(flag_agreement(base, args.admin_token.as_deref()).await);
    checks
}

/// Without a stream: whether one browser's requests stay on one instance.
async fn followups_pinned(client: &reqwest::Client, base: &str) -> Check {
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        seen.insert(
            instance_of(client, base)
                .await
                .unwrap_or_else(|| "?".into()),
        );
    }
    let list: Vec<String> = seen.into_iter().collect();
    if list.len() == 1 {
        Check::pass(
            "affinity",
            format!(
                "10 follow-up requests reached {} (the stream itself could not be checked)",
                list[0]
            ),
        )
    } else {
        Check::fail(
            "affinity",
            format!(
                "follow-up requests of one browser reached {}",
                list.join(", ")
            ),
            AFFINITY,
        )
    }
}

/// Asks `/stats` through the balancer until several instances answered.
async fn flag_agreement(base: &str, token: Option<&str>) -> Check {
    let Some(token) = token else {
        return Check::skip(
            "flag_agreement",
            "no ADMIN_TOKEN (--admin-token) to read /stats with".into(),
        );
    };
    let mut by_instance = BTreeMap::new();
    for _ in 0..12 {
        let res = browser()
            .get(format!("{base}/stats"))
            .bearer_auth(token)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let res = match res {
            Ok(r) if r.status() == 200 => r,
            Ok(r) => {
                return Check::fail(
                    "flag_agreement",
                    format!("/stats answered {}", r.status()),
                    FLAGS,
                )
            }
            Err(e) => return Check::fail("flag_agreement", format!("/stats: {e}"), FLAGS),
        };
        let Ok(stats) = res.json::<Value>().await else {
            continue;
        };
        let instance = stats["instance_id"].as_str().unwrap_or("?").to_owned();
        let flag = &stats["flag"]["state"];
        by_instance.insert(
            instance,
            (
                flag["enabled"].as_bool().unwrap_or(false),
                flag["source"].as_str().unwrap_or("?").to_owned(),
            ),
        );
    }
    let values: BTreeSet<bool> = by_instance.values().map(|(on, _)| *on).collect();
    let shown: Vec<String> = by_instance
        .iter()
        .map(|(i, (on, source))| format!("{i}={} ({source})", if *on { "on" } else { "off" }))
        .collect();
    if by_instance.len() < 2 {
        Check::skip(
            "flag_agreement",
            format!(
                "only {} instance answered through the balancer: nothing to compare",
                by_instance.len()
            ),
        )
    } else if values.len() <= 1 {
        Check::pass(
            "flag_agreement",
            format!(
                "{} instance(s) agree: {}",
                by_instance.len(),
                shown.join(", ")
            ),
        )
    } else {
        Check::fail("flag_agreement", shown.join(", "), FLAGS)
    }
}
