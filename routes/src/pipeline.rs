//! Pipeline runs: the résumé agent's multi-stage job that streams progress to
//! the browser.
//!
//! A run executes in the background on the instance that accepted it and
//! emits `stage_start`, one `section_draft` per section, `stage_complete` for
//! each stage; with `gate`, it then emits `gate_waiting` and pauses until the
//! gate is answered (`gate_resolved`); it ends with `pipeline_complete`,
//! `pipeline_failed` or `pipeline_cancelled`.
//!
//! Every run is a task owned by the server's [`TaskTracker`](tokio_util::task::TaskTracker)
//! with a child of the shutdown token, and is bounded in time: a run asking
//! for more steps than `MAX_RUN_SECS` allows is refused, one still going
//! after it (waiting at its gate) is cancelled (`run_timeout`), and a gate
//! left unanswered for [`GATE_TIMEOUT`] cancels the run. A client address
//! may have `MAX_RUNS_PER_ADDRESS` runs executing, so no address takes
//! every slot of the instance.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sse_scale::{EventType, OutgoingEvent, SessionId};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::error::AppError;
use crate::extract::{AuthedSession, ClientIp, JsonBody, JsonOrDefault, PublishingSession};
use crate::runs::{Full, GateDecision, GateOutcome};
use crate::state::AppState;

/// How long a run waits at its gate before it is cancelled.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const MAX_STAGES: usize = 20;
const MAX_SECTIONS: u32 = 100;
const MAX_STEP_MS: u64 = 60_000;
/// Shortest pause between a run's steps: a run is a simulation of work,
/// not a way to flood a session.
const MIN_STEP_MS: u64 = 10;

/// Body of `POST /sessions/{id}/pipeline`; every field is optional.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineRequest {
    pub stages: Vec<String>,
    pub sections_per_stage: u32,
    pub step_ms: u64,
    pub gate: bool,
    /// Makes the named stage fail, to exercise a UI's error path.
    pub fail_stage: Option<String>,
}

impl Default for PipelineRequest {
    fn default() -> Self {
        Self {
            stages: ["research", "outline", "draft", "review"]
                .map(String::from)
                .to_vec(),
            sections_per_stage: 3,
            step_ms: 200,
            gate: false,
            fail_stage: None,
        }
    }
}

impl PipelineRequest {
    fn validate(&self, max_run: Duration) -> Result<(), AppError> {
        let bad = |m: String| Err(AppError::bad_request("invalid_pipeline", m));
        if self.stages.is_empty() || self.stages.len() > MAX_STAGES {
            return bad(format!("stages must hold 1-{MAX_STAGES} names"));
        }
        if self.stages.iter().any(|s| s.is_empty() || s.len() > 64) {
            return bad("stage names must be 1-64 characters".into());
        }
        if self.sections_per_stage > MAX_SECTIONS {
            return bad(format!("sections_per_stage must be at most {MAX_SECTIONS}"));
        }
        if !(MIN_STEP_MS..=MAX_STEP_MS).contains(&self.step_ms) {
            return bad(format!("step_ms must be {MIN_STEP_MS}-{MAX_STEP_MS}"));
        }
        let steps = self.stages.len() as u64 * u64::from(self.sections_per_stage);
        let lasts = Duration::from_millis(steps * self.step_ms);
        if lasts > max_run {
            return bad(format!(
                "{steps} steps of {} ms last {} s, more than MAX_RUN_SECS ({} s)",
                self.step_ms,
                lasts.as_secs(),
                max_run.as_secs()
            ));
        }
        Ok(())
    }
}

/// `POST /sessions/{id}/pipeline` → `202 {"run_id"}`.
pub async fn start(
    State(state): State<Arc<AppState>>,
    PublishingSession(session): PublishingSession,
    ClientIp(ip): ClientIp,
    JsonOrDefault(req): JsonOrDefault<PipelineRequest>,
) -> Result<Response, AppError> {
    req.validate(state.settings.max_run)?;
    if state.is_draining() {
        return Err(AppError::unavailable("this instance is draining", 1));
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let cancel = state.drain.shutdown.child_token();
    match state.runs.insert(
        &run_id,
        &session,
        ip,
        cancel.clone(),
        state.settings.run_shares,
    ) {
        Ok(()) => {}
        Err(Full::Instance) => {
            return Err(AppError::unavailable(
                "too many pipeline runs on this instance",
                5,
            ))
        }
        Err(Full::Session) => {
            return Err(AppError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_runs",
                "this session already has MAX_RUNS_PER_SESSION runs executing",
            ))
        }
        Err(Full::Address) => {
            return Err(AppError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_runs",
                "this address already has MAX_RUNS_PER_ADDRESS runs executing",
            ))
        }
    }
    let task_state = state.clone();
    let task_run = run_id.clone();
    state.tasks.spawn(async move {
        let outcome = execute(&task_state, &session, &task_run, &req, &cancel).await;
        task_state.runs.remove(&task_run);
        if let Err(e) = outcome {
            tracing::warn!(run_id = %task_run, error = %e.message, "pipeline run stopped: publish failed");
        }
    });
    Ok((StatusCode::ACCEPTED, Json(json!({ "run_id": run_id }))).into_response())
}

/// `POST /sessions/{id}/pipeline/{run_id}/gate` `{"approve", "feedback"}` → 202.
///
/// The run may live on another instance (the gate answer reached an instance
/// other than the one running the pipeline). With Redis and the flag on, the
/// answer is relayed to the owner over the control channel and this answers
/// once the owner accepted it (404 if no instance owns the run within
/// [`RELAY_TIMEOUT`](crate::runs::RELAY_TIMEOUT)). With the flag off, a run found elsewhere is a 409: the
/// balancer sent this session to the wrong instance.
pub async fn gate(
    State(state): State<Arc<AppState>>,
    PublishingSession(session): PublishingSession,
    Path((_, run_id)): Path<(String, String)>,
    JsonBody(decision): JsonBody<GateDecision>,
) -> Result<Response, AppError> {
    // Never issued here (ids are 32 hex digits): not worth asking anyone.
    if run_id.len() != 32 || !run_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(unknown_run(&run_id));
    }
    let outcome = match state
        .runs
        .resolve_local(&session, &run_id, Some(decision.clone()))
    {
        GateOutcome::Unknown => {
            let apply = state.broadcaster.crosses_instances(&session);
            state
                .runs
                .relay(&session, &run_id, decision, apply)
                .await
                .map_err(|error| {
                    tracing::warn!(%error, "cannot relay a gate answer");
                    AppError::unavailable(
                        "the run is not on this instance and the other instances cannot be reached",
                        1,
                    )
                })?
        }
        local => local,
    };
    match outcome {
        GateOutcome::Accepted => {
            Ok((StatusCode::ACCEPTED, Json(json!({ "run_id": run_id }))).into_response())
        }
        GateOutcome::NotAtGate => Err(AppError::new(
            StatusCode::CONFLICT,
            "not_at_gate",
            "the run is not waiting at a gate",
        )),
        GateOutcome::Elsewhere => Err(AppError::new(
            StatusCode::CONFLICT,
            "run_on_other_instance",
            "this run executes on another instance and cross-instance delivery \
             (FF_REDIS_SSE_BROADCAST) is off for this session: the load balancer must keep \
             the session on one instance (check its sticky-session configuration)",
        )),
        GateOutcome::Unknown => Err(unknown_run(&run_id)),
    }
}

/// `DELETE /sessions/{id}/pipeline/{run_id}` → 202; the run emits
/// `pipeline_cancelled`.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    AuthedSession(session): AuthedSession,
    Path((_, run_id)): Path<(String, String)>,
    // Read so the keep-alive connection stays usable if one was sent.
    _body: axum::body::Bytes,
) -> Result<Response, AppError> {
    if !state.runs.cancel(&session, &run_id) {
        return Err(unknown_run(&run_id));
    }
    Ok((StatusCode::ACCEPTED, Json(json!({ "run_id": run_id }))).into_response())
}

fn unknown_run(run_id: &str) -> AppError {
    AppError::not_found(format!("no pipeline run {run_id} on this session"))
}

/// How a run ended, when it did not end normally.
enum Stop {
    Cancelled(&'static str),
    Failed(String),
}

async fn execute(
    state: &AppState,
    session: &SessionId,
    run_id: &str,
    req: &PipelineRequest,
    cancel: &CancellationToken,
) -> Result<(), AppError> {
    // Each event spends the session's publish budget (waiting for room,
    // never failing for it), so a run cannot publish past the limit the
    // publishing routes keep.
    let emit = |ty: &'static str, data: Value| async move {
        state.pace_publish(session).await;
        state
            .publish(
                session,
                OutgoingEvent::json(EventType::from_static(ty), &data),
            )
            .await
    };
    let step = Duration::from_millis(req.step_ms);
    // Checked at each pause and at the gate, never in the middle of a
    // publish: a run stops between its events.
    let deadline = tokio::time::Instant::now() + state.settings.max_run;
    let pause = |step| pause(state, step, deadline, cancel);
    let total = req.stages.len();
    let body = async {
        for (index, stage) in req.stages.iter().enumerate() {
            emit(
                "stage_start",
                json!({ "run_id": run_id, "stage": stage, "index": index, "total_stages": total }),
            )
            .await?;
            for section in 0..req.sections_per_stage {
                pause(step).await?;
                let text = format!(
                    "{stage}: section {} of {}",
                    section + 1,
                    req.sections_per_stage
                );
                emit(
                    "section_draft",
                    json!({ "run_id": run_id, "stage": stage, "section": section, "text": text }),
                )
                .await?;
            }
            if req.fail_stage.as_deref() == Some(stage.as_str()) {
                return Err(Stop::Failed(format!("stage {stage} failed")));
            }
            emit(
                "stage_complete",
                json!({ "run_id": run_id, "stage": stage, "index": index }),
            )
            .await?;
        }
        if req.gate {
            let (tx, rx) = oneshot::channel();
            state.runs.wait_at_gate(run_id, tx);
            emit("gate_waiting", json!({ "run_id": run_id })).await?;
            let decision = tokio::select! {
                d = rx => d.map_err(|_| Stop::Cancelled("cancelled"))?,
                () = cancel.cancelled() => return Err(Stop::Cancelled(cancel_reason(state))),
                () = tokio::time::sleep(GATE_TIMEOUT) => return Err(Stop::Cancelled("gate_timeout")),
                () = tokio::time::sleep_until(deadline) => return Err(Stop::Cancelled("run_timeout")),
            };
            emit("gate_resolved", json!({ "run_id": run_id, "approved": decision.approve, "feedback": decision.feedback })).await?;
            if !decision.approve {
                return Err(Stop::Cancelled("rejected_at_gate"));
            }
        }
        Ok::<(), Stop>(())
    };
    match body.await {
        Ok(()) => emit("pipeline_complete", json!({ "run_id": run_id }))
            .await
            .map(drop),
        Err(Stop::Cancelled(reason)) => emit(
            "pipeline_cancelled",
            json!({ "run_id": run_id, "reason": reason }),
        )
        .await
        .map(drop),
        Err(Stop::Failed(error)) => emit(
            "pipeline_failed",
            json!({ "run_id": run_id, "error": error }),
        )
        .await
        .map(drop),
    }
}

impl From<AppError> for Stop {
    fn from(e: AppError) -> Self {
        Stop::Failed(e.message)
    }
}

fn cancel_reason(state: &AppState) -> &'static str {
    if state.drain.shutdown.is_cancelled() {
        "shutdown"
    } else {
        "cancelled"
    }
}

async fn pause(
    state: &AppState,
    step: Duration,
    deadline: tokio::time::Instant,
    cancel: &CancellationToken,
) -> Result<(), Stop> {
    tokio::select! {
        () = tokio::time::sleep(step) => Ok(()),
        () = cancel.cancelled() => Err(Stop::Cancelled(cancel_reason(state))),
        () = tokio::time::sleep_until(deadline) => Err(Stop::Cancelled("run_timeout")),
    }
}
