//! `/automations/v2/runs`: list, get, the gate decision, pause, resume, cancel.

use axum::{
    Json,
    extract::{Path, Query, State, rejection::PathRejection, rejection::QueryRejection},
    http::StatusCode,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tandem_core::gate::{
    GATE_EXPIRED_DETAIL, GateDecision, GateDecisionOutcome, GateDecisionRequest, GateDenial,
};
use tandem_core::{
    ActorKind, AutomationGateDecisionRecord, AutomationPendingGate, AutomationRunStatus,
    AutomationV2RunRecord, AutomationV2Spec,
};
use tandem_store::Fence;

use super::automations::{ReasonBody, path_id, query};
use super::{RunListQuery, page_limit, run_filter, run_page, visible_run};
use crate::auth::CHANNELS;
use crate::{ApiError, AppState, JsonBody, Principal};

/// `GET /automations/v2/runs`: newest first; filters `status`, `automation_id`, `org_id`,
/// `workspace_id`; `limit` (default 50, max 500) and `cursor` (the previous page's
/// `next_cursor`).
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    q: Result<Query<RunListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let filter = run_filter(&principal, &q)?;
    let limit = page_limit(q.limit)?;
    let runs = tandem_store::list_runs(state.pool(), &filter, limit).await?;
    Ok(Json(run_page(runs, limit)))
}

/// `GET /automations/v2/runs/{run_id}`: `{run}`, the full `AutomationV2RunRecord`.
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    run_id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let run_id = path_id(run_id)?;
    let run = visible_run(&state, &principal, &run_id).await?;
    Ok(Json(json!({ "run": run })))
}

/// Body of the gate endpoint (spec §4.2), plus the optional gate instance the client saw
/// (`node_id` and `requested_at_ms` from `/approvals/pending` or `approval.gate.requested`).
#[derive(Debug, Default, Deserialize)]
pub struct GateBody {
    pub decision: Option<String>,
    pub reason: Option<String>,
    pub node_id: Option<String>,
    pub requested_at_ms: Option<u64>,
}

fn winning(record: &AutomationGateDecisionRecord) -> Value {
    json!({
        "node_id": record.node_id,
        "decision": record.decision,
        "reason": record.reason,
        "decided_at_ms": record.decided_at_ms,
    })
}

/// Reviewer authorization of governed gates (spec §4.2 step 12). A gate is governed when its
/// metadata (top level, `gate` or `policy`) names a `risk_tier` other than `low`/`standard` or
/// `reviewer_eligibility`. On a governed gate:
/// * `approve` by the requester (the run's tenant actor, else the automation's creator) is
///   `AUTOMATION_V2_GATE_SELF_APPROVAL_FORBIDDEN`; identities are compared lower-cased with
///   channel users as `channel:{slack|discord|telegram}:{id}`;
/// * without a verified tenant context (a tenant-bound token) the decider needs
///   `AUTOMATION_V2_GATE_REVIEWER_AUTHORITY_REQUIRED`, waived for a channel-verified human and
///   for a local-implicit run;
/// * a verified context without reviewer authority is `..._REVIEWER_AUTHORITY_DENIED`.
pub fn authorize(
    principal: &Principal,
    run: &AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    gate: &AutomationPendingGate,
    decision: GateDecision,
) -> Result<(), GateDenial> {
    let meta = gate.metadata.as_ref();
    let find = |key: &str| {
        meta.and_then(|m| {
            ["", "/gate", "/policy"]
                .iter()
                .find_map(|p| m.pointer(&format!("{p}/{key}")))
        })
    };
    let tier = find("risk_tier")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase);
    let governed = find("reviewer_eligibility").is_some_and(|v| !v.is_null())
        || tier
            .as_deref()
            .is_some_and(|t| !matches!(t, "low" | "standard" | "none"));
    if !governed {
        return Ok(());
    }
    let channel = principal.source.as_deref().filter(|s| CHANNELS.contains(s));
    let decider = principal.actor_id.as_deref().map(|id| match channel {
        Some(c) => format!("channel:{c}:{id}").to_ascii_lowercase(),
        None => id.to_ascii_lowercase(),
    });
    let requester = run
        .tenant_context
        .actor_id
        .as_deref()
        .unwrap_or(&automation.creator_id)
        .trim()
        .to_ascii_lowercase();
    if decision == GateDecision::Approve && decider.as_deref() == Some(requester.as_str()) {
        return Err(GateDenial {
            code: "AUTOMATION_V2_GATE_SELF_APPROVAL_FORBIDDEN".into(),
            detail: "The requester of a governed gate cannot approve it".into(),
        });
    }
    if channel.is_some() {
        return Ok(());
    }
    if principal.verified_tenant {
        if principal.gate_reviewer {
            return Ok(());
        }
        return Err(GateDenial {
            code: "AUTOMATION_V2_GATE_REVIEWER_AUTHORITY_DENIED".into(),
            detail: "The verified reviewer lacks authority for this governed gate".into(),
        });
    }
    if run.tenant_context.is_local_implicit() {
        return Ok(());
    }
    Err(GateDenial {
        code: "AUTOMATION_V2_GATE_REVIEWER_AUTHORITY_REQUIRED".into(),
        detail: "This governed gate requires a verified reviewer with authority".into(),
    })
}

/// The error answer of a refused decision.
fn refusal(outcome: &GateDecisionOutcome, run: &AutomationV2RunRecord) -> ApiError {
    use GateDecisionOutcome as O;
    let status = StatusCode::from_u16(outcome.http_status()).unwrap_or(StatusCode::CONFLICT);
    let code = outcome
        .error_code()
        .unwrap_or("AUTOMATION_V2_RUN_UPDATE_FAILED");
    let mut err = match outcome {
        O::AlreadyDecided(_) | O::StaleInstance { .. } => {
            let mut e = ApiError::new(status, code, "Run is not awaiting approval")
                .with("runID", json!(run.run_id))
                .with("currentStatus", json!(run.status.as_str()));
            if let O::StaleInstance {
                open_requested_at_ms,
                ..
            } = outcome
            {
                e = e.with("openGateRequestedAtMs", json!(open_requested_at_ms));
            }
            e
        }
        O::GateMissing => ApiError::new(status, code, "Run is awaiting approval but has no gate"),
        O::InvalidDecision => ApiError::new(
            status,
            code,
            "decision must be one of approve, rework, cancel",
        ),
        O::DecisionNotOffered { decision, offered } => ApiError::new(
            status,
            code,
            format!("this gate does not offer `{}`", decision.as_str()),
        )
        .with(
            "offered",
            json!(offered.iter().map(|d| d.as_str()).collect::<Vec<_>>()),
        ),
        O::GateNodeNotFound { node_id } => ApiError::new(
            status,
            code,
            format!("gate node `{node_id}` is not in the automation"),
        ),
        O::GateExpired { .. } => ApiError::new(status, code, GATE_EXPIRED_DETAIL),
        O::Denied { denial, .. } => ApiError::new(status, code, denial.detail.clone()),
        O::Applied { .. } => ApiError::new(status, code, "unexpected"),
    };
    if let Some(w) = outcome.winning_decision() {
        err = err.with("winningDecision", winning(w));
    }
    err
}

/// `POST /automations/v2/runs/{run_id}/gate` `{decision, reason?}` (spec §4.2).
pub async fn gate(
    State(state): State<AppState>,
    principal: Principal,
    run_id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<GateBody>,
) -> Result<Json<Value>, ApiError> {
    let run_id = path_id(run_id)?;
    let run = visible_run(&state, &principal, &run_id).await?;
    let decider = principal.actor_ref();
    if principal.kind != ActorKind::Human {
        let audit = tandem_core::gate::gate_decision_denied_audit(
            &run,
            None,
            &decider,
            "AUTOMATION_V2_GATE_REQUIRES_HUMAN",
            "Approval gate decisions require a verified human approver",
        );
        tandem_store::append_audit(state.pool(), &audit).await?;
        metrics::counter!("tandem_api_gate_decisions_total", "result" => "requires_human")
            .increment(1);
        return Err(ApiError::forbidden(
            "AUTOMATION_V2_GATE_REQUIRES_HUMAN",
            "Approval gate decisions require a verified human approver",
        ));
    }
    let mut request = GateDecisionRequest::new(body.decision.as_deref().unwrap_or(""), decider);
    request.reason = body.reason;
    if let Some(node) = &body.node_id {
        crate::check_id("node_id", node)?;
        request.gate_node_id = Some(node.clone());
    }
    request.gate_requested_at_ms = body.requested_at_ms;
    let defaults = state.inner.lifecycle.gates;
    let applied = tandem_store::try_transition_run(
        state.pool(),
        &run_id,
        Fence::Unfenced,
        &state.inner.store,
        |run, env| {
            // The transition's automation is the live definition, else the run's snapshot.
            let automation = env
                .automation
                .clone()
                .ok_or_else(|| ApiError::automation_not_found(&run.automation_id))?;
            // Step 4, before the status check: the owner or an admin of the automation.
            if !principal.owns_or_administers(&automation) {
                metrics::counter!("tandem_api_gate_decisions_total", "result" => "access_denied")
                    .increment(1);
                return Err(ApiError::forbidden(
                    "AUTOMATION_V2_ACCESS_DENIED",
                    "only the automation's owner or an admin may decide its gates",
                ));
            }
            let snapshot = run.clone();
            Ok::<_, ApiError>(tandem_core::gate::decide_gate_with(
                run,
                &automation,
                &defaults,
                &request,
                env.now_ms,
                |gate, decision| authorize(&principal, &snapshot, &automation, gate, decision),
            ))
        },
    )
    .await?;
    if let Some(audit) = applied.outcome.denial_audit() {
        tandem_store::append_audit(state.pool(), audit).await?;
    }
    let label = match &applied.outcome {
        GateDecisionOutcome::Applied { .. } => "applied",
        GateDecisionOutcome::AlreadyDecided(_) | GateDecisionOutcome::StaleInstance { .. } => {
            "lost"
        }
        _ => "refused",
    };
    metrics::counter!("tandem_api_gate_decisions_total", "result" => label).increment(1);
    if !matches!(applied.outcome, GateDecisionOutcome::Applied { .. }) {
        return Err(refusal(&applied.outcome, &applied.run));
    }
    let queued = applied.run.status == AutomationRunStatus::Queued;
    state.after_commit(&run_id, queued, true).await;
    Ok(Json(json!({
        "ok": true,
        "run": applied.run,
        "contextRunID": Value::Null,
        "linked_context_run_id": Value::Null,
    })))
}

/// Applies a status action (pause, resume) to the locked run: 409 with the action's code and
/// the run's status when refused; after commit, relays the run's rows (and wakes the schedulers
/// when the run went back to the queue).
async fn status_action<T, F>(
    state: &AppState,
    principal: &Principal,
    run_id: &str,
    refused: &'static str,
    wake_scheduler: bool,
    error_code: fn(&T) -> Option<&'static str>,
    f: F,
) -> Result<Json<Value>, ApiError>
where
    F: FnMut(
        &mut AutomationV2RunRecord,
        &tandem_store::TransitionEnv,
    ) -> tandem_core::Transition<T>,
{
    visible_run(state, principal, run_id).await?;
    let applied =
        tandem_store::transition_run(state.pool(), run_id, Fence::Unfenced, &state.inner.store, f)
            .await?;
    if let Some(code) = error_code(&applied.outcome) {
        return Err(ApiError::conflict(code, refused)
            .with("runID", json!(run_id))
            .with("currentStatus", json!(applied.run.status.as_str())));
    }
    state.after_commit(run_id, wake_scheduler, false).await;
    Ok(Json(json!({ "ok": true, "run": applied.run })))
}

/// `POST /automations/v2/runs/{run_id}/pause` `{reason?}`.
pub async fn pause(
    State(state): State<AppState>,
    principal: Principal,
    run_id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let run_id = path_id(run_id)?;
    status_action(
        &state,
        &principal,
        &run_id,
        "Run is not pausable",
        false,
        tandem_core::execution::PauseOutcome::error_code,
        |r, env| {
            tandem_core::execution::request_pause(
                r,
                env.lease_epoch.0,
                body.reason.as_deref(),
                env.now_ms,
            )
        },
    )
    .await
}

/// `POST /automations/v2/runs/{run_id}/resume` `{reason?}`: `paused` → `queued`.
pub async fn resume(
    State(state): State<AppState>,
    principal: Principal,
    run_id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let run_id = path_id(run_id)?;
    status_action(
        &state,
        &principal,
        &run_id,
        "Run is not paused",
        true,
        tandem_core::execution::ResumeOutcome::error_code,
        |r, env| tandem_core::execution::resume_run(r, body.reason.as_deref(), env.now_ms),
    )
    .await
}

/// `POST /automations/v2/runs/{run_id}/cancel` `{reason?}`: any non-terminal run, and `blocked`,
/// → `cancelled` (`operator_stopped`); completed/failed/cancelled → 200 `alreadyTerminal`.
pub async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    run_id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let run_id = path_id(run_id)?;
    visible_run(&state, &principal, &run_id).await?;
    let applied = tandem_store::transition_run(
        state.pool(),
        &run_id,
        Fence::Unfenced,
        &state.inner.store,
        |r, env| {
            let t = tandem_core::execution::cancel_run(
                r,
                env.lease_epoch.0,
                body.reason.as_deref(),
                env.now_ms,
            );
            tandem_core::Transition {
                outcome: (t.outcome, env.lease_epoch.0),
                changed: t.changed,
                effects: t.effects,
            }
        },
    )
    .await?;
    let (outcome, epoch) = applied.outcome;
    match outcome {
        tandem_core::execution::CancelOutcome::AlreadyTerminal { .. } => Ok(Json(json!({
            "ok": true,
            "alreadyTerminal": true,
            "run": applied.run,
        }))),
        tandem_core::execution::CancelOutcome::Cancelled {
            cancelled_tasks, ..
        } => {
            state.after_commit(&run_id, true, true).await;
            if cancelled_tasks {
                state.cancel_hint(&run_id, epoch).await;
            }
            Ok(Json(json!({ "ok": true, "run": applied.run })))
        }
    }
}

fn operator_answer(
    outcome: &tandem_core::operator::OperatorOutcome,
    run: &AutomationV2RunRecord,
    node_id: Option<&str>,
) -> Result<(), ApiError> {
    use tandem_core::operator::OperatorOutcome as O;
    match outcome {
        O::Requeued { .. } => Ok(()),
        O::Refused { code, status } => Err(ApiError::conflict(
            code,
            format!("Run cannot be requeued from status {}", status.as_str()),
        )
        .with("runID", json!(run.run_id))
        .with("currentStatus", json!(status.as_str()))),
        O::NodeNotFound => Err(ApiError::not_found(
            tandem_core::operator::CODE_NODE_NOT_FOUND,
            format!("node `{}` is not in the automation", node_id.unwrap_or("")),
        )),
    }
}

/// Applies a repair action (recover, task retry/requeue/continue), which needs the run's
/// automation, to the locked run; answers 409/404 as [`operator_answer`] says, and after commit
/// relays the run's rows and wakes the schedulers (the run is queued again).
async fn repair_action<F>(
    state: &AppState,
    principal: &Principal,
    run_id: &str,
    node_id: Option<&str>,
    mut f: F,
) -> Result<Json<Value>, ApiError>
where
    F: FnMut(
        &mut AutomationV2RunRecord,
        &AutomationV2Spec,
        tandem_core::Millis,
    ) -> tandem_core::Transition<tandem_core::operator::OperatorOutcome>,
{
    visible_run(state, principal, run_id).await?;
    let applied = tandem_store::try_transition_run(
        state.pool(),
        run_id,
        Fence::Unfenced,
        &state.inner.store,
        |r, env| {
            let automation = env
                .automation
                .clone()
                .ok_or_else(|| ApiError::automation_not_found(&r.automation_id))?;
            Ok::<_, ApiError>(f(r, &automation, env.now_ms))
        },
    )
    .await?;
    operator_answer(&applied.outcome, &applied.run, node_id)?;
    state.after_commit(run_id, true, false).await;
    Ok(Json(json!({ "ok": true, "run": applied.run })))
}

/// `POST /automations/v2/runs/{run_id}/recover` `{reason?}`.
pub async fn recover(
    State(state): State<AppState>,
    principal: Principal,
    run_id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let run_id = path_id(run_id)?;
    repair_action(&state, &principal, &run_id, None, |r, automation, now| {
        tandem_core::operator::recover_run(r, automation, body.reason.as_deref(), now)
    })
    .await
}

/// `POST /automations/v2/runs/{run_id}/tasks/{node_id}/{action}` (`retry|requeue|continue`)
/// `{reason?}`.
pub async fn task(
    State(state): State<AppState>,
    principal: Principal,
    params: Result<Path<(String, String, String)>, PathRejection>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let Path((run_id, node_id, action)) =
        params.map_err(|e| ApiError::bad_request("INVALID_PATH", e.body_text()))?;
    crate::check_id("node_id", &node_id)?;
    let action = tandem_core::operator::TaskAction::parse(&action).ok_or_else(|| {
        ApiError::not_found(
            "NOT_FOUND",
            "task action must be retry, requeue or continue",
        )
    })?;
    repair_action(
        &state,
        &principal,
        &run_id,
        Some(&node_id),
        |r, automation, now| {
            tandem_core::operator::task_action(
                r,
                automation,
                &node_id,
                action,
                body.reason.as_deref(),
                now,
            )
        },
    )
    .await
}
