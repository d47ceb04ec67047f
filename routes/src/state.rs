//! [`AppState`]: what every handler shares — the broadcaster, the token
//! signer, the pipeline registry, and the shutdown machinery that owns every
//! spawned task.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sse_scale::{Broadcaster, Config, OutgoingEvent, SessionId, TokenSigner};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::affinity::Affinity;
use crate::error::AppError;
use crate::pipeline::PipelineRegistry;

pub struct AppState {
    /// The one path every route publishes and subscribes through.
    pub broadcaster: Arc<dyn Broadcaster>,
    pub signer: TokenSigner,
    /// Sent in `X-Instance-Id` and the `connected` event, so a client (and a
    /// load-balancer test) can tell which instance served it.
    pub instance_id: String,
    pub affinity: Affinity,
    pub heartbeat: Duration,
    pub retry: Duration,
    pub max_event_bytes: usize,
    /// Pipeline runs executing on this instance.
    pub pipelines: PipelineRegistry,
    /// Fired on SIGTERM/SIGINT: streams end, runs stop.
    pub shutdown: CancellationToken,
    /// Owns every task spawned on behalf of a request, so shutdown can wait
    /// for them.
    pub tasks: TaskTracker,
    /// Set when shutdown begins: `/readyz` turns unready and new streams are
    /// refused.
    pub draining: AtomicBool,
    pub open_streams: AtomicUsize,
    /// Streams cut because the client fell behind its queue.
    pub slow_consumers_cut: AtomicU64,
}

impl AppState {
    pub fn new(
        config: &Config,
        broadcaster: Arc<dyn Broadcaster>,
        signer: TokenSigner,
        instance_id: String,
    ) -> Self {
        Self {
            broadcaster,
            signer,
            affinity: Affinity::new(
                &config.affinity_cookie,
                config.affinity_cookie_secure,
                &instance_id,
            ),
            instance_id,
            heartbeat: config.heartbeat(),
            retry: config.retry(),
            max_event_bytes: config.max_event_bytes as usize,
            pipelines: PipelineRegistry::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            draining: AtomicBool::new(false),
            open_streams: AtomicUsize::new(0),
            slow_consumers_cut: AtomicU64::new(0),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Checks the payload limit, then publishes. Returns the event id.
    pub async fn publish(
        &self,
        session: &SessionId,
        event: OutgoingEvent,
    ) -> Result<String, AppError> {
        if event.data.len() > self.max_event_bytes {
            return Err(AppError::too_large(self.max_event_bytes));
        }
        let id = self.broadcaster.publish(session, event).await?;
        Ok(id.to_string())
    }
}
