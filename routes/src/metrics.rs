//! `GET /metrics`: Prometheus text format, behind `ADMIN_TOKEN` like
//! `/stats`.
//!
//! Built on `prometheus-client`. The counters are read at scrape time from
//! the same places `/stats` reads them (a [`Collector`] over the state), so
//! the two never disagree and the request paths pay nothing for the
//! exporter; the latency histograms come from `sse_scale::metrics`. Labels
//! are bounded: reasons, paths, limits, the flag's value and source — never
//! a session id.

use std::fmt::{self, Write as _};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::extract::Admin;
use crate::state::AppState;

pub async fn metrics(_: Admin, State(state): State<Arc<AppState>>) -> Response {
    let mut registry = Registry::default();
    sse_scale::metrics::register(&mut registry);
    registry.register_collector(Box::new(StateCollector(state)));
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut body, &registry) {
        // Writing into a String cannot fail; a collector bug still must not
        // take the endpoint down with a panic.
        let _ = writeln!(body, "# encoding failed: {e}");
    }
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Reads the instance's counters when scraped.
struct StateCollector(Arc<AppState>);

impl fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StateCollector")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One counter per value of one label.
fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&'static str, u64)],
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, v) in values {
        ConstCounter::new(*v).encode(m.encode_family(&[(label, *value)])?)?;
    }
    Ok(())
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let b = s.broadcaster.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let redis = b.redis.clone().unwrap_or(Value::Null);

        {
            let topology = redis
                .get("topology")
                .and_then(Value::as_str)
                .unwrap_or("none");
            let mut m = e.encode_descriptor(
                "sse_instance",
                "This instance: its id, broadcaster mode and Redis topology (always 1)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1).encode(m.encode_family(&[
                ("instance_id", s.settings.instance_id.as_str()),
                ("mode", b.mode),
                ("topology", topology),
            ])?)?;
        }
        gauge(
            &mut e,
            "sse_open_streams",
            "Streams open now",
            s.counters.open_streams.load(Ordering::Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "sse_runtime_tasks",
            "Tasks alive in the server's runtime (a waiting stream holds none)",
            s.runtime_tasks() as i64,
        )?;
        gauge(
            &mut e,
            "sse_replay_bytes_held",
            "Bytes of replayed history streams hold unsent (REPLAY_BUDGET_MB)",
            s.scale.replay_budget().held() as i64,
        )?;
        gauge(
            &mut e,
            "sse_max_streams",
            "MAX_STREAMS",
            s.settings.max_streams as i64,
        )?;
        gauge(
            &mut e,
            "sse_sessions_with_subscribers",
            "Sessions with a stream here",
            b.sessions as i64,
        )?;
        gauge(
            &mut e,
            "sse_subscribers",
            "Live subscriptions here",
            b.subscribers as i64,
        )?;
        gauge(
            &mut e,
            "sse_draining",
            "1 while the instance drains",
            i64::from(s.is_draining()),
        )?;
        gauge(
            &mut e,
            "sse_pipeline_runs",
            "Pipeline runs executing here",
            s.runs.len() as i64,
        )?;
        gauge(
            &mut e,
            "sse_history_sessions",
            "Sessions with in-process history",
            b.history_sessions as i64,
        )?;
        gauge(
            &mut e,
            "sse_history_bytes",
            "Bytes of in-process history",
            b.history_bytes as i64,
        )?;

        counter(
            &mut e,
            "sse_stream_opens",
            "Streams opened",
            load(&s.counters.stream_opens),
        )?;
        counter(
            &mut e,
            "sse_stream_opens_first_request",
            "Streams opened as their connection's first request (without hyper's buffers)",
            load(&s.counters.stream_opens_first_request),
        )?;
        let ends = &s.counters.stream_ends;
        let stalled = load(&s.counters.stalled_writes_cut);
        counters(
            &mut e,
            "sse_stream_closes",
            "Streams that ended or were refused, by reason",
            "reason",
            &[
                // Every stream whose connection went away, including those
                // the server cut for a stalled write (which `stalled_write`
                // also counts, per connection): each label is counted where
                // it happens, so none can ever go backwards.
                ("client_gone", load(&ends.dropped)),
                ("stalled_write", stalled),
                ("drain", load(&ends.drain)),
                ("lag_cut", load(&ends.lag_cut)),
                ("broadcaster_closed", load(&ends.closed)),
                ("refused", load(&s.counters.streams_refused)),
            ],
        )?;
        counter(
            &mut e,
            "sse_heads_refused",
            "Connections closed at once (MAX_PENDING_HEADS)",
            load(&s.counters.heads_refused),
        )?;
        counters(
            &mut e,
            "sse_connections_refused",
            "Connections refused (MAX_CONNECTIONS_PER_ADDRESS, MAX_CONNECTIONS)",
            "limit",
            &[
                ("per_address", load(&s.admission.refused_per_address)),
                ("instance", load(&s.admission.refused_full)),
            ],
        )?;
        counter(
            &mut e,
            "sse_resumes",
            "Streams resumed from history with Last-Event-ID",
            load(&s.counters.resumes),
        )?;
        counter(
            &mut e,
            "sse_resets",
            "Resumes answered with reset",
            load(&s.counters.resets),
        )?;
        counter(
            &mut e,
            "sse_replays_over_budget",
            "Resumes answered with reset because their replay did not fit a replay budget",
            load(&s.counters.replays_over_budget),
        )?;
        counter(
            &mut e,
            "sse_order_resets",
            "Late events answered with reset instead of out of order",
            b.order_resets,
        )?;
        counter(
            &mut e,
            "sse_covered_by_reset",
            "Late events dropped because an earlier reset stood for them",
            b.covered_by_reset,
        )?;

        // Local: the flag sent the publish down the in-process path (or
        // there is no Redis at all). Redis and outbox: the broker's counts.
        let local = if b.redis.is_some() {
            b.flag_evaluations[1]
        } else {
            b.published
        };
        counters(
            &mut e,
            "sse_events_published",
            "Events published through this instance, by path",
            "path",
            &[
                ("local", local),
                ("redis", num(&redis, "published_redis")),
                ("outbox", num(&redis, "fallback_local")),
            ],
        )?;
        counter(
            &mut e,
            "sse_deliveries",
            "Events handed to subscriptions here, one per subscriber",
            b.deliveries,
        )?;
        counters(
            &mut e,
            "sse_rate_limited",
            "Requests answered 429, by limit",
            "limit",
            &[
                ("publish", load(&s.counters.rate_limited.publish)),
                ("sessions", load(&s.counters.rate_limited.sessions)),
                ("streams", load(&s.counters.rate_limited.streams)),
            ],
        )?;
        counter(
            &mut e,
            "sse_rate_limit_fallback_checks",
            "Rate-limit checks counted in process because Redis was unreachable",
            s.limiter.fallback_checks.load(Ordering::Relaxed),
        )?;

        let flag = s.flags.state();
        {
            let mut m = e.encode_descriptor(
                "sse_flag_enabled",
                "FF_REDIS_SSE_BROADCAST as this instance has it, and where it came from",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(flag.enabled))
                .encode(m.encode_family(&[("source", flag.source.as_str())])?)?;
        }
        counters(
            &mut e,
            "sse_flag_evaluations",
            "Flag evaluations of publishes that had a Redis path, by value",
            "value",
            &[
                ("on", b.flag_evaluations[0]),
                ("off", b.flag_evaluations[1]),
            ],
        )?;

        if b.redis.is_some() {
            gauge(
                &mut e,
                "sse_redis_subscriber_connected",
                "1 while the subscriber connection is up",
                i64::from(redis.get("subscriber_connected") == Some(&Value::Bool(true))),
            )?;
            gauge(
                &mut e,
                "sse_redis_subscribed_channels",
                "Session channels subscribed",
                num(&redis, "subscribed_channels") as i64,
            )?;
            gauge(
                &mut e,
                "sse_redis_outbox_len",
                "Events waiting for Redis",
                num(&redis, "outbox_len") as i64,
            )?;
            counters(
                &mut e,
                "sse_redis_received",
                "Events delivered here from the subscriber connection, by publisher",
                "origin",
                &[
                    ("other", num(&redis, "received")),
                    ("own", num(&redis, "own_received")),
                ],
            )?;
            for (name, key, help) in [
                (
                    "sse_redis_messages_in",
                    "messages_in",
                    "Messages on the subscriber connection",
                ),
                (
                    "sse_redis_bytes_in",
                    "bytes_in",
                    "Channel and payload bytes of those messages",
                ),
                (
                    "sse_redis_subscriber_connects",
                    "subscriber_connects",
                    "Times the subscriber connection was (re-)established",
                ),
                (
                    "sse_redis_outbox_flushed",
                    "outbox_flushed",
                    "Outbox events published once Redis was back",
                ),
                (
                    "sse_redis_outbox_reassigned",
                    "outbox_reassigned",
                    "Outbox events published under a new id",
                ),
                (
                    "sse_redis_outbox_dropped",
                    "outbox_dropped",
                    "Events dropped because the outbox was full",
                ),
                (
                    "sse_redis_caught_up",
                    "caught_up",
                    "Events read from history after a reconnect",
                ),
                (
                    "sse_redis_duplicates_dropped",
                    "duplicates_dropped",
                    "Messages received twice and dropped",
                ),
                (
                    "sse_redis_malformed_dropped",
                    "malformed_dropped",
                    "Messages or entries that did not parse",
                ),
                (
                    "sse_redis_foreign_version_dropped",
                    "foreign_version_dropped",
                    "Messages of another protocol version",
                ),
                (
                    "sse_redis_resubscribes",
                    "resubscribes",
                    "Channels Redis moved and that were subscribed again",
                ),
                (
                    "sse_redis_history_lost",
                    "history_lost",
                    "Sessions whose stream lost delivered events (failover)",
                ),
            ] {
                counter(&mut e, name, help, num(&redis, key))?;
            }
        }
        Ok(())
    }
}
