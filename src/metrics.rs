//! Latency histograms of the toolkit's parts, for Prometheus.
//!
//! Counters stay in the parts that count them and are read when a scrape
//! asks (the reference server's `/metrics` reads the same values as
//! `/stats`, so the two never disagree). What cannot be read afterwards —
//! how long things took — is recorded here, process-wide, in histograms with
//! fixed buckets: memory stays bounded however long nobody scrapes.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::event::EventId;

struct Histograms {
    publish_to_write: Histogram,
    redis_round_trip: Histogram,
}

fn histograms() -> &'static Histograms {
    static H: OnceLock<Histograms> = OnceLock::new();
    H.get_or_init(|| Histograms {
        // 0.5 ms .. 10 s.
        publish_to_write: Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
        ]),
        // 0.1 ms .. 1 s (the command timeout).
        redis_round_trip: Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]),
    })
}

/// A live event was written to a stream: the time since it was published,
/// read from its id (`<ms>-<seq>`, the publisher's or Redis' clock, so a
/// clock difference between hosts adds to it). Replayed events are not
/// counted: their age is the client's absence, not the server's latency.
pub(crate) fn written(id: EventId) {
    // Announcements and order resets carry no id: nothing to time.
    if id == EventId::ZERO {
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let ms = now.saturating_sub(id.ms);
    histograms().publish_to_write.observe(ms as f64 / 1000.0);
}

/// One Redis command (or pipeline, or script) took `elapsed`.
pub(crate) fn redis_call(elapsed: Duration) {
    histograms().redis_round_trip.observe(elapsed.as_secs_f64());
}

/// Adds the histograms to `registry`.
pub fn register(registry: &mut Registry) {
    let h = histograms();
    registry.register_with_unit(
        "sse_publish_to_write",
        "Time from an event's publish (its id) to its write into a stream, live events only",
        Unit::Seconds,
        h.publish_to_write.clone(),
    );
    registry.register_with_unit(
        "sse_redis_round_trip",
        "Duration of one Redis command, pipeline or script of the shared client",
        Unit::Seconds,
        h.redis_round_trip.clone(),
    );
}
