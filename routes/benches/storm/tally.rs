//! What the clients saw, counted once they all caught up: exactly-once
//! delivery across the reconnect, the reconnects that failed, and how long
//! each resume took, whole and in parts.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use crate::client::{Client, Ctx};
use crate::support::output::slots_100ms;

/// 100 ms buckets of the resume timeline (after the kill).
const TIMELINE_BUCKETS: usize = 200;

/// Percentiles of µs values, as ms.
pub fn pcts(mut v: Vec<u64>) -> Value {
    if v.is_empty() {
        return json!(null);
    }
    v.sort_unstable();
    let at = |q: f64| {
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1000.0
    };
    json!({
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "max_ms": v[v.len() - 1] as f64 / 1000.0,
        "n": v.len(),
    })
}

/// The clients' figures of one run, as the fields of its result: `published`
/// is what each session got accepted, `kill_us` when app1 was killed (µs
/// on the clients' clock).
pub fn tally(ctx: &Ctx, published: &[u64], kill_us: u64) -> serde_json::Map<String, Value> {
    let get = |f: fn(&Client) -> &AtomicU64| -> Vec<u64> {
        ctx.clients
            .iter()
            .map(|c| f(c).load(Ordering::Relaxed))
            .collect()
    };
    let sum = |f: fn(&Client) -> &AtomicU64| -> u64 { get(f).iter().sum() };
    let mut lost = sum(|c| &c.gaps);
    let mut behind = 0u64;
    for (i, c) in ctx.clients.iter().enumerate() {
        let want = published[ctx.session_of[i]];
        let have = c.next_seq.load(Ordering::Relaxed);
        if have < want {
            lost += want - have;
            behind += 1;
        }
    }
    let duplicated = sum(|c| &c.duplicates);
    let resets = sum(|c| &c.resets);
    let refused = sum(|c| &c.refused);
    let failed = sum(|c| &c.failed);
    let retried_clients = ctx
        .clients
        .iter()
        .filter(|c| c.refused.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed) > 0)
        .count();
    let unexpected = sum(|c| &c.unexpected_ends);
    let on = get(|c| &c.resumed_on);
    let (on2, on3) = (
        on.iter().filter(|&&n| n == 2).count(),
        on.iter().filter(|&&n| n == 3).count(),
    );

    let mut to_connected = Vec::new();
    let mut to_first = Vec::new();
    let mut beyond = Vec::new();
    let mut beyond_first = Vec::new();
    let mut end_after_kill = Vec::new();
    let mut attempt_after_kill = Vec::new();
    let mut tcp_connect = Vec::new();
    let mut head = Vec::new();
    let mut head_to_connected = Vec::new();
    let mut hints = Vec::new();
    let mut wake_late = Vec::new();
    let mut timeline = vec![0u64; TIMELINE_BUCKETS];
    let mut attempts_timeline = vec![0u64; TIMELINE_BUCKETS];
    for c in &ctx.clients {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (ended, resumed_at) = (l(&c.ended_at), l(&c.resumed_at));
        if ended == 0 || resumed_at == 0 {
            continue;
        }
        let hint_us = l(&c.hint_ms) * 1000;
        hints.push(hint_us);
        to_connected.push(resumed_at - ended);
        beyond.push((resumed_at - ended).saturating_sub(hint_us));
        if l(&c.first_event_at) > 0 {
            to_first.push(l(&c.first_event_at) - ended);
            beyond_first.push((l(&c.first_event_at) - ended).saturating_sub(hint_us));
        }
        end_after_kill.push(ended.saturating_sub(kill_us));
        wake_late.push(l(&c.first_attempt_at).saturating_sub(ended + hint_us));
        attempt_after_kill.push(l(&c.attempt_at).saturating_sub(kill_us));
        tcp_connect.push(l(&c.connect_done).saturating_sub(l(&c.attempt_at)));
        head.push(l(&c.head_at).saturating_sub(l(&c.connect_done)));
        head_to_connected.push(resumed_at.saturating_sub(l(&c.head_at)));
        let b = ((resumed_at.saturating_sub(kill_us)) / 100_000) as usize;
        timeline[b.min(TIMELINE_BUCKETS - 1)] += 1;
        let b = ((l(&c.attempt_at).saturating_sub(kill_us)) / 100_000) as usize;
        attempts_timeline[b.min(TIMELINE_BUCKETS - 1)] += 1;
    }
    let hint_ms = hints.iter().max().copied().unwrap_or(0) as f64 / 1000.0;
    let fields = json!({
        "resumed_on": { "app2": on2, "app3": on3 },
        "lost": lost,
        "streams_behind": behind,
        "duplicated": duplicated,
        "resets": resets,
        "refused_reconnects": refused,
        "failed_reconnects": failed,
        "clients_that_retried": retried_clients,
        "unexpected_ends": unexpected,
        "hint_ms": hint_ms,
        "time_to_resume": {
            "connected": pcts(to_connected),
            "connected_beyond_hint": pcts(beyond),
            "first_event": pcts(to_first),
            "first_event_beyond_hint": pcts(beyond_first),
        },
        "parts": {
            "disconnect_seen_after_kill": pcts(end_after_kill),
            "client_wake_late": pcts(wake_late),
            "resumed_attempt_after_kill": pcts(attempt_after_kill),
            "tcp_connect": pcts(tcp_connect),
            "request_to_head": pcts(head),
            "head_to_connected": pcts(head_to_connected),
        },
        "resumes_per_100ms_after_kill": slots_100ms(timeline),
        "resumed_attempts_per_100ms_after_kill": slots_100ms(attempts_timeline),
    });
    match fields {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object"),
    }
}
