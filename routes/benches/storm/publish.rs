//! The storm's steady publishing: events go to the survivors only, so the
//! kill never costs a publish, and every stream's loss or duplicate is the
//! resume's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::sse_client::{publish_numbered, ticks, Session};

/// Publishes `rate` events/s over all sessions (each session its own task,
/// its ticks spread over the period) to the survivors (session `i` through
/// `targets[i % 2]`), until `stop`. Returns the events each session got
/// accepted and the failed publishes.
pub async fn publish(
    http: reqwest::Client,
    sessions: Vec<Arc<Session>>,
    targets: [SocketAddr; 2],
    rate: f64,
    stop: Arc<AtomicBool>,
) -> (Vec<u64>, u64) {
    let period = Duration::from_secs_f64(sessions.len() as f64 / rate);
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        let (http, stop, failures) = (http.clone(), stop.clone(), failures.clone());
        let url = session.events_url(targets[i % targets.len()]);
        let (auth, n) = (session.bearer(), sessions.len());
        tasks.push(tokio::spawn(async move {
            let mut tick = ticks(i, n, period);
            let mut s = 0u64;
            loop {
                tick.tick().await;
                if stop.load(Ordering::Relaxed) {
                    return s;
                }
                match publish_numbered(&http, &url, &auth, s).await {
                    Ok(()) => s += 1,
                    Err(e) => {
                        eprintln!("{e}");
                        // The sequence must stay gap-free: try this one again.
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.expect("publisher task"));
    }
    (counts, failures.load(Ordering::Relaxed))
}
