//! `GET /approvals/pending` (spec §4.7): every awaiting run of the caller's tenant, read from the
//! status index (no window of the newest 500 runs), with `decide_endpoint` and
//! `surface_payload.notification_key`.

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tandem_core::{AutomationPendingGate, AutomationV2RunRecord, gate, policy};

use super::RunListQuery;
use super::automations::query;
use super::run_filter;
use crate::{ApiError, AppState, Principal};

/// Upper bound on awaiting runs read for one answer (a safety valve, far above any page).
const MAX_AWAITING_SCAN: usize = 100_000;

#[derive(Debug, Default, Deserialize)]
pub struct PendingQuery {
    pub org_id: Option<String>,
    pub workspace_id: Option<String>,
    /// Default 100, max 500 (spec §4.7).
    pub limit: Option<usize>,
}

/// One `ApprovalRequest` (spec §4.7).
pub fn approval_request(
    run: &AutomationV2RunRecord,
    gate: &AutomationPendingGate,
    defaults: &tandem_core::config::GatePolicyDefaults,
) -> Value {
    let snapshot = run.automation_snapshot.as_ref();
    let node = snapshot.and_then(|s| s.node(&gate.node_id));
    let expires_at_ms =
        policy::effective_policy(gate, defaults).map(|p| policy::expires_at_ms(gate, &p));
    let mut surface = Map::new();
    surface.insert("automation_v2_run_id".into(), json!(run.run_id));
    surface.insert("automation_id".into(), json!(run.automation_id));
    surface.insert("node_id".into(), json!(gate.node_id));
    surface.insert(
        "decide_endpoint".into(),
        json!(gate::decide_endpoint(&run.run_id)),
    );
    if let Some(e) = expires_at_ms {
        surface.insert("expires_at_ms".into(), json!(e));
    }
    if let Some(p) = &gate.expiry_policy {
        surface.insert("expiry_policy".into(), json!(p));
    }
    if let Some(state) = gate.policy_state() {
        surface.insert("gate_policy_state".into(), Value::Object(state.clone()));
    }
    if let Some(key) = gate.policy_state_str("notification_key") {
        surface.insert("notification_key".into(), json!(key));
    }
    let title = &gate.title;
    let preview = match &gate.instructions {
        Some(i) => format!("**{title}**\n\n{i}"),
        None => format!("**{title}**"),
    };
    let mut req = json!({
        "request_id": format!("automation_v2:{}:{}", run.run_id, gate.node_id),
        "source": "automation_v2",
        "tenant": {
            "org_id": run.tenant_context.org_id,
            "workspace_id": run.tenant_context.workspace_id,
            "user_id": run.tenant_context.actor_id,
        },
        "run_id": run.run_id,
        "node_id": gate.node_id,
        "workflow_name": snapshot
            .map(|s| s.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| run.automation_id.clone()),
        "action_kind": node.map(|n| n.objective.clone()).unwrap_or_default(),
        "action_preview_markdown": preview,
        "requested_at_ms": gate.requested_at_ms,
        "decisions": gate::offered_decisions(gate)
            .iter()
            .map(|d| d.as_str())
            .collect::<Vec<_>>(),
        "rework_targets": gate.rework_targets,
        "instructions": gate.instructions,
        "surface_payload": Value::Object(surface),
    });
    if let (Some(e), Some(obj)) = (expires_at_ms, req.as_object_mut()) {
        obj.insert("expires_at_ms".into(), json!(e));
    }
    req
}

/// `GET /approvals/pending?org_id&workspace_id&limit`.
pub async fn pending(
    State(state): State<AppState>,
    principal: Principal,
    q: Result<Query<PendingQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let filter = run_filter(
        &principal,
        &RunListQuery {
            org_id: q.org_id,
            workspace_id: q.workspace_id,
            ..Default::default()
        },
    )?;
    let limit = match q.limit {
        Some(0) => return Err(ApiError::validation("limit", "must be at least 1")),
        Some(n) => n.min(500),
        None => 100,
    };
    let runs = tandem_store::awaiting_approval_runs(
        state.pool(),
        filter.org_id.as_deref(),
        filter.workspace_id.as_deref(),
        MAX_AWAITING_SCAN,
    )
    .await?;
    let defaults = state.inner.lifecycle.gates;
    let mut items: Vec<(u64, Value)> = runs
        .iter()
        .filter_map(|run| {
            let gate = match &run.automation_snapshot {
                Some(automation) => gate::decision_gate(run, automation)?,
                None => run.checkpoint.awaiting_gate.clone()?,
            };
            Some((
                gate.requested_at_ms,
                approval_request(run, &gate, &defaults),
            ))
        })
        .collect();
    items.sort_by_key(|x| std::cmp::Reverse(x.0));
    let total = items.len();
    items.truncate(limit);
    let approvals: Vec<Value> = items.into_iter().map(|(_, v)| v).collect();
    Ok(Json(
        json!({ "count": approvals.len(), "total": total, "approvals": approvals }),
    ))
}
