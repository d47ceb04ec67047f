//! [`Runs`]: the pipeline runs executing on this instance, and the relay
//! that gets a gate answer to the instance running the pipeline.
//!
//! A gate answer may reach an instance other than the one running the
//! pipeline. It then goes out on the [`ControlBus`]: every instance hears
//! it, the owner applies it and replies, and the asking instance answers
//! its client. With the flag off for the session, the owner only says that
//! it has the run (the balancer sent the session to the wrong instance).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sse_scale::{ControlBus, SessionId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Runs one instance executes at once; more → 503.
pub const MAX_RUNS: usize = 1024;

/// How long a relayed gate answer waits for the owning instance.
pub const RELAY_TIMEOUT: Duration = Duration::from_secs(2);

/// A reviewer's answer at the gate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GateDecision {
    pub approve: bool,
    #[serde(default)]
    pub feedback: String,
}

/// What became of a gate answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateOutcome {
    Accepted,
    NotAtGate,
    /// The run exists on the answering instance, which was only asked.
    Elsewhere,
    Unknown,
}

/// Messages on the control bus.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Control {
    GateRequest {
        req: String,
        from: String,
        run_id: String,
        session: String,
        /// Apply the decision (flag on), or only ask who owns the run.
        decision: Option<GateDecision>,
    },
    GateReply {
        req: String,
        to: String,
        outcome: GateOutcome,
    },
}

struct Run {
    session: SessionId,
    /// The client address that started it (`MAX_RUNS_PER_ADDRESS`).
    address: std::net::IpAddr,
    /// Present while the run waits at its gate.
    gate: Option<oneshot::Sender<GateDecision>>,
    cancel: CancellationToken,
}

/// Why a run was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The instance runs [`MAX_RUNS`].
    Instance,
    /// The session has its share running.
    Session,
    /// The client address has its share running.
    Address,
}

/// How many runs one session and one client address may have executing.
#[derive(Debug, Clone, Copy)]
pub struct Shares {
    pub per_session: usize,
    pub per_address: usize,
}

/// The relay could not reach the other instances.
#[derive(Debug, thiserror::Error)]
#[error("cannot relay the gate answer: {0}")]
pub struct RelayError(String);

/// See the module docs.
pub struct Runs {
    runs: Mutex<HashMap<String, Run>>,
    /// Gate answers relayed from here and waiting on a reply, by request.
    pending: Mutex<HashMap<String, oneshot::Sender<GateOutcome>>>,
    bus: Arc<dyn ControlBus>,
    node_id: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections are single map operations; a poisoned map is intact.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Runs {
    /// `node_id` names this process on the bus.
    pub fn new(bus: Arc<dyn ControlBus>, node_id: String) -> Self {
        Self {
            runs: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            bus,
            node_id,
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.runs).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a run started from `address`, unless the instance already
    /// runs [`MAX_RUNS`], or the session or the address its share.
    pub fn insert(
        &self,
        run_id: &str,
        session: &SessionId,
        address: std::net::IpAddr,
        cancel: CancellationToken,
        shares: Shares,
    ) -> Result<(), Full> {
        let mut runs = lock(&self.runs);
        if runs.len() >= MAX_RUNS {
            return Err(Full::Instance);
        }
        if runs.values().filter(|r| &r.session == session).count() >= shares.per_session {
            return Err(Full::Session);
        }
        if runs.values().filter(|r| r.address == address).count() >= shares.per_address {
            return Err(Full::Address);
        }
        runs.insert(
            run_id.to_owned(),
            Run {
                session: session.clone(),
                address,
                gate: None,
                cancel,
            },
        );
        Ok(())
    }

    pub fn remove(&self, run_id: &str) {
        lock(&self.runs).remove(run_id);
    }

    /// The run now waits at its gate for `tx`.
    pub fn wait_at_gate(&self, run_id: &str, tx: oneshot::Sender<GateDecision>) {
        if let Some(run) = lock(&self.runs).get_mut(run_id) {
            run.gate = Some(tx);
        }
    }

    /// Cancels a run of `session` on this instance; false if there is none.
    pub fn cancel(&self, session: &SessionId, run_id: &str) -> bool {
        match lock(&self.runs)
            .get(run_id)
            .filter(|r| &r.session == session)
        {
            Some(run) => {
                run.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Applies `decision` to a run of this instance (or, with `None`, only
    /// says whether the run is here).
    pub fn resolve_local(
        &self,
        session: &SessionId,
        run_id: &str,
        decision: Option<GateDecision>,
    ) -> GateOutcome {
        let (tx, decision) = {
            let mut runs = lock(&self.runs);
            let Some(run) = runs.get_mut(run_id).filter(|r| &r.session == session) else {
                return GateOutcome::Unknown;
            };
            let Some(decision) = decision else {
                return GateOutcome::Elsewhere;
            };
            match run.gate.take() {
                Some(tx) => (tx, decision),
                None => return GateOutcome::NotAtGate,
            }
        };
        // The run may have been cancelled between the lookup and here.
        match tx.send(decision) {
            Ok(()) => GateOutcome::Accepted,
            Err(_) => GateOutcome::Unknown,
        }
    }

    /// Asks every instance for the run; `apply` then sends the decision to
    /// the owner, else the owner only says it has the run.
    ///
    /// Asked first without the decision: an answer for a run no instance
    /// holds (a made-up id) never goes to every instance with its feedback.
    pub async fn relay(
        &self,
        session: &SessionId,
        run_id: &str,
        decision: GateDecision,
        apply: bool,
    ) -> Result<GateOutcome, RelayError> {
        if !self.bus.reaches_others() {
            return Ok(GateOutcome::Unknown);
        }
        let owned = self.ask(session, run_id, None).await?;
        if !apply || owned != GateOutcome::Elsewhere {
            return Ok(owned);
        }
        self.ask(session, run_id, Some(decision)).await
    }

    /// One question on the control bus, and the owner's reply.
    async fn ask(
        &self,
        session: &SessionId,
        run_id: &str,
        decision: Option<GateDecision>,
    ) -> Result<GateOutcome, RelayError> {
        let req = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(req.clone(), tx);
        let _pending = Pending(self, req.clone());
        let msg = Control::GateRequest {
            req,
            from: self.node_id.clone(),
            run_id: run_id.to_owned(),
            session: session.to_string(),
            decision,
        };
        self.send(&msg).await?;
        Ok(tokio::time::timeout(RELAY_TIMEOUT, rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(GateOutcome::Unknown))
    }

    async fn send(&self, msg: &Control) -> Result<(), RelayError> {
        // Serialising strings and enums cannot fail.
        let payload = Bytes::from(serde_json::to_vec(msg).unwrap_or_default());
        self.bus
            .send(payload)
            .await
            .map_err(|e| RelayError(e.to_string()))
    }

    /// Serves the control bus until `stop`: answers gate requests for runs
    /// of this instance and hands replies to the requests waiting here.
    pub async fn serve_control(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Bytes>,
        stop: CancellationToken,
    ) {
        loop {
            let payload = tokio::select! {
                () = stop.cancelled() => return,
                msg = rx.recv() => match msg { Some(p) => p, None => return },
            };
            match serde_json::from_slice::<Control>(&payload) {
                Ok(Control::GateRequest {
                    req,
                    from,
                    run_id,
                    session,
                    decision,
                }) => {
                    let Ok(session) = SessionId::parse(&session) else {
                        continue;
                    };
                    let outcome = self.resolve_local(&session, &run_id, decision);
                    if outcome == GateOutcome::Unknown {
                        continue; // Not ours; the owner (if any) answers.
                    }
                    let reply = Control::GateReply {
                        req,
                        to: from,
                        outcome,
                    };
                    if let Err(error) = self.send(&reply).await {
                        tracing::warn!(%error, "cannot send a gate reply");
                    }
                }
                Ok(Control::GateReply { req, to, outcome }) if to == self.node_id => {
                    if let Some(tx) = lock(&self.pending).remove(&req) {
                        let _ = tx.send(outcome);
                    }
                }
                Ok(Control::GateReply { .. }) => {}
                Err(error) => {
                    tracing::warn!(%error, "malformed control message dropped");
                }
            }
        }
    }
}

/// Removes a pending request however the wait ends.
struct Pending<'a>(&'a Runs, String);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        lock(&self.0.pending).remove(&self.1);
    }
}
