//! `/automations/v2`: create (validated), get, list, pause, resume, `run_now`, runs of one.

use axum::{
    Json,
    extract::{Path, Query, State, rejection::PathRejection, rejection::QueryRejection},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tandem_core::{
    AutomationRunStatus, AutomationStatus, AutomationV2RunRecord, AutomationV2Spec, Effects,
    ExecutionProfile, TenantContext,
};
use tandem_store::StoreError;

use super::{RunListQuery, page_limit, run_filter, run_page};
use crate::{ApiError, AppState, JsonBody, Principal, check_id};

/// Largest number of flow nodes an automation may have.
pub const MAX_NODES: usize = 1000;

pub(crate) fn path_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = p.map_err(|e| ApiError::bad_request("INVALID_PATH", e.body_text()))?;
    Ok(id)
}

pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request("INVALID_QUERY", e.body_text()))
}

// ------------------------------------------------------------------------------------------------
// Validation
// ------------------------------------------------------------------------------------------------

fn expect_enum(v: Option<&Value>, path: &str, allowed: &[&str]) -> Result<(), ApiError> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(()),
        Some(other) => Err(ApiError::validation(
            path,
            &format!(
                "unknown value {other}; expected one of {}",
                allowed.join(", ")
            ),
        )),
    }
}

fn expect_count(v: Option<&Value>, path: &str, min: u64) -> Result<(), ApiError> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|x| x >= min) => Ok(()),
        Some(other) => Err(ApiError::validation(
            path,
            &format!("must be an integer >= {min}, got {other}"),
        )),
    }
}

fn expect_amount(v: Option<&Value>, path: &str) -> Result<(), ApiError> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) if n.as_f64().is_some_and(|x| x.is_finite() && x >= 0.0) => Ok(()),
        Some(other) => Err(ApiError::validation(
            path,
            &format!("must be a number >= 0, got {other}"),
        )),
    }
}

/// Checks of the raw JSON that serde alone would answer without a precise path or not at all:
/// enum spellings, negative or nonsensical numbers, gate labels and rework targets.
pub fn validate_spec_value(v: &Value) -> Result<(), ApiError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::validation("", "an automation must be a JSON object"))?;
    match obj.get("automation_id") {
        Some(Value::String(id)) => check_id("automation_id", id)
            .map_err(|e| ApiError::validation("automation_id", &e.message))?,
        _ => return Err(ApiError::validation("automation_id", "required string")),
    }
    expect_enum(obj.get("status"), "status", &["active", "paused", "draft"])?;
    if let Some(exec) = obj.get("execution").filter(|e| !e.is_null()) {
        expect_enum(
            exec.get("profile"),
            "execution.profile",
            &["strict", "guided", "yolo"],
        )?;
        expect_count(
            exec.get("max_parallel_agents"),
            "execution.max_parallel_agents",
            1,
        )?;
        for k in [
            "max_total_runtime_ms",
            "max_total_tool_calls",
            "max_total_tokens",
        ] {
            expect_count(exec.get(k), &format!("execution.{k}"), 1)?;
        }
        expect_amount(
            exec.get("max_total_cost_usd"),
            "execution.max_total_cost_usd",
        )?;
    }
    if let Some(meta) = obj.get("metadata").filter(|m| !m.is_null())
        && let Some(t) = meta.get("tenant_context").filter(|t| !t.is_null())
    {
        serde_path_to_error::deserialize::<_, TenantContext>(t.clone()).map_err(|e| {
            ApiError::validation(
                &format!("metadata.tenant_context.{}", e.path()),
                &e.inner().to_string(),
            )
        })?;
    }
    let Some(flow) = obj.get("flow").filter(|f| !f.is_null()) else {
        return Ok(());
    };
    let nodes = match flow.get("nodes") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::validation("flow.nodes", "must be an array")),
    };
    if nodes.len() > MAX_NODES {
        return Err(ApiError::validation(
            "flow.nodes",
            &format!("at most {MAX_NODES} nodes"),
        ));
    }
    let ids: Vec<&str> = nodes
        .iter()
        .filter_map(|n| n.get("node_id").and_then(Value::as_str))
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        let at = format!("flow.nodes[{i}]");
        if !n.is_object() {
            return Err(ApiError::validation(&at, "a node must be an object"));
        }
        match n.get("node_id") {
            Some(Value::String(id)) => {
                check_id("node_id", id)
                    .map_err(|e| ApiError::validation(&format!("{at}.node_id"), &e.message))?;
            }
            _ => {
                return Err(ApiError::validation(
                    &format!("{at}.node_id"),
                    "required string",
                ));
            }
        }
        expect_enum(
            n.get("stage_kind"),
            &format!("{at}.stage_kind"),
            &["orchestrator", "workstream", "review", "test", "approval"],
        )?;
        expect_count(n.get("timeout_ms"), &format!("{at}.timeout_ms"), 1)?;
        if let Some(rp) = n.get("retry_policy").filter(|r| !r.is_null()) {
            if !rp.is_object() {
                return Err(ApiError::validation(
                    &format!("{at}.retry_policy"),
                    "must be an object",
                ));
            }
            expect_count(
                rp.get("max_attempts"),
                &format!("{at}.retry_policy.max_attempts"),
                1,
            )?;
        }
        let Some(gate) = n.get("gate").filter(|g| !g.is_null()) else {
            continue;
        };
        if let Some(decisions) = gate.get("decisions").and_then(Value::as_array) {
            for (j, d) in decisions.iter().enumerate() {
                let ok = d
                    .as_str()
                    .is_some_and(|l| tandem_core::gate::GateDecision::from_gate_label(l).is_some());
                if !ok {
                    return Err(ApiError::validation(
                        &format!("{at}.gate.decisions[{j}]"),
                        &format!(
                            "unknown decision {d}; expected approve, rework (changes, \
                             request_changes, ask_changes) or cancel (reject, deny)"
                        ),
                    ));
                }
            }
        }
        if let Some(targets) = gate.get("rework_targets").and_then(Value::as_array) {
            for (j, t) in targets.iter().enumerate() {
                if !t.as_str().is_some_and(|t| ids.contains(&t)) {
                    return Err(ApiError::validation(
                        &format!("{at}.gate.rework_targets[{j}]"),
                        &format!("unknown node {t}"),
                    ));
                }
            }
        }
        if let Some(p) = gate.get("expiry_policy").filter(|p| !p.is_null()) {
            let base = format!("{at}.gate.expiry_policy");
            expect_enum(
                p.get("on_expiry"),
                &format!("{base}.on_expiry"),
                &["cancel", "escalate", "remind"],
            )?;
            expect_count(
                p.get("expires_after_ms"),
                &format!("{base}.expires_after_ms"),
                0,
            )?;
            expect_count(
                p.get("remind_every_ms"),
                &format!("{base}.remind_every_ms"),
                0,
            )?;
        }
    }
    Ok(())
}

/// Parses and validates an automation: JSON shape, enums, the flow graph (duplicate ids, unknown
/// `depends_on`, cycles, approval nodes without gate config) and gate policies.
pub fn parse_spec(v: Value) -> Result<AutomationV2Spec, ApiError> {
    validate_spec_value(&v)?;
    let spec: AutomationV2Spec = serde_path_to_error::deserialize(v)
        .map_err(|e| ApiError::validation(&e.path().to_string(), &e.inner().to_string()))?;
    tandem_core::graph::validate_flow(&spec)
        .map_err(|e| ApiError::validation(&e.path, &e.message))?;
    tandem_core::gate::validate_gate_policies(&spec)
        .map_err(|e| ApiError::validation(&e.path, &e.message))?;
    Ok(spec)
}

// ------------------------------------------------------------------------------------------------
// Handlers
// ------------------------------------------------------------------------------------------------

/// The automation, if it exists and the caller may see it.
pub async fn visible_automation(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<AutomationV2Spec, ApiError> {
    check_id("automation_id", id)?;
    match tandem_store::get_automation(state.pool(), id).await {
        Ok(spec) if principal.can_see(&spec.tenant_context()) => Ok(spec),
        Ok(_) | Err(StoreError::NotFound(_)) => Err(ApiError::automation_not_found(id)),
        Err(e) => Err(e.into()),
    }
}

/// `POST /automations/v2`: creates or replaces an automation.
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    let mut spec = parse_spec(body)?;
    let named_tenant = spec
        .metadata
        .as_ref()
        .and_then(|m| m.get("tenant_context"))
        .is_some_and(|t| !t.is_null());
    if !named_tenant && let Some(t) = principal.default_tenant() {
        let meta = spec.metadata.get_or_insert_with(|| json!({}));
        match meta.as_object_mut() {
            Some(m) => {
                m.insert("tenant_context".into(), t.to_value());
            }
            None => return Err(ApiError::validation("metadata", "must be an object")),
        }
    }
    let tenant = spec.tenant_context();
    if !principal.can_see(&tenant) {
        return Err(ApiError::forbidden(
            "TENANT_SCOPE_DENIED",
            "metadata.tenant_context names a tenant outside the token's",
        ));
    }
    let now = tandem_store::db_now_ms(state.pool()).await?;
    let existing = match tandem_store::get_automation(state.pool(), &spec.automation_id).await {
        Ok(e) => Some(e),
        Err(StoreError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(e) = &existing {
        if !principal.can_see(&e.tenant_context()) {
            return Err(ApiError::conflict(
                "AUTOMATION_V2_ID_TAKEN",
                "automation_id is taken; choose another",
            ));
        }
        spec.created_at_ms = e.created_at_ms;
    } else if spec.created_at_ms == 0 {
        spec.created_at_ms = now;
    }
    spec.updated_at_ms = now;
    if spec.creator_id.trim().is_empty()
        && let Some(a) = &principal.actor_id
    {
        spec.creator_id = a.clone();
    }
    tandem_store::upsert_automation(state.pool(), &spec).await?;
    Ok(Json(
        json!({ "ok": true, "created": existing.is_none(), "automation": spec }),
    ))
}

/// `GET /automations/v2/{id}`.
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(id)?;
    let spec = visible_automation(&state, &principal, &id).await?;
    Ok(Json(json!({ "automation": spec })))
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub org_id: Option<String>,
    pub workspace_id: Option<String>,
    pub limit: Option<usize>,
}

/// `GET /automations/v2`: automations by id, of the caller's tenant (an unscoped admin sees
/// every tenant unless it names one with `org_id`/`workspace_id`).
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    q: Result<Query<ListQuery>, QueryRejection>,
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
    let limit = page_limit(q.limit)?;
    let automations = tandem_store::list_automations_in(
        state.pool(),
        filter.org_id.as_deref(),
        filter.workspace_id.as_deref(),
        limit,
    )
    .await?;
    Ok(Json(
        json!({ "count": automations.len(), "automations": automations }),
    ))
}

#[derive(Debug, Default, Deserialize)]
pub struct RunNowBody {
    pub reason: Option<String>,
    pub execution_profile: Option<ExecutionProfile>,
    pub trigger_type: Option<String>,
}

fn default_profile() -> ExecutionProfile {
    match std::env::var("TANDEM_DEFAULT_EXECUTION_PROFILE")
        .ok()
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("strict") => ExecutionProfile::Strict,
        Some("yolo") => ExecutionProfile::Yolo,
        _ => ExecutionProfile::Guided,
    }
}

/// `POST /automations/v2/{id}/run_now`: creates a queued run and returns it.
pub async fn run_now(
    State(state): State<AppState>,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<RunNowBody>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(id)?;
    let spec = visible_automation(&state, &principal, &id).await?;
    if spec.status == AutomationStatus::Draft {
        return Err(ApiError::conflict(
            "AUTOMATION_V2_NOT_ACTIVE",
            "a draft automation cannot run",
        ));
    }
    let profile = body
        .execution_profile
        .or_else(|| spec.execution.as_ref().and_then(|e| e.profile))
        .unwrap_or_else(default_profile);
    let trigger = body.trigger_type.as_deref().unwrap_or("manual");
    check_id("trigger_type", trigger)?;
    let now = tandem_store::db_now_ms(state.pool()).await?;
    let run_id = format!("automation-v2-run-{}", uuid::Uuid::new_v4());
    let mut run = AutomationV2RunRecord::new_queued(run_id, &spec, trigger, profile, now);
    run.requested_execution_profile = body.execution_profile;
    run.trigger_reason = body
        .reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty());
    let stored =
        tandem_store::create_run(state.pool(), &run, &Effects::default(), &state.inner.store)
            .await?;
    state.after_commit(&stored.run.run_id, true, false).await;
    metrics::counter!("tandem_api_runs_created_total").increment(1);
    Ok(Json(json!({ "ok": true, "run": stored.run })))
}

#[derive(Debug, Default, Deserialize)]
pub struct ReasonBody {
    pub reason: Option<String>,
}

/// Runs paused per transaction by the automation-level pause.
const AUTOMATION_PAUSE_PAGE: usize = 200;

/// `POST /automations/v2/{id}/pause`: the automation stops launching runs (status `paused`) and
/// every one of its running runs is paused (pausing while tasks are in flight); upstream pauses
/// only the first 100 it lists.
pub async fn pause(
    State(state): State<AppState>,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(id)?;
    let mut spec = visible_automation(&state, &principal, &id).await?;
    spec.status = AutomationStatus::Paused;
    spec.updated_at_ms = tandem_store::db_now_ms(state.pool()).await?;
    tandem_store::upsert_automation(state.pool(), &spec).await?;
    // Every running run of the automation, a page at a time (upstream pauses only the first 100
    // it lists). Each page is one transaction that waits for the rows' locks, so a run another
    // writer holds is paused right after that writer commits, not skipped.
    let mut filter = tandem_store::RunFilter {
        automation_id: Some(id.clone()),
        status: Some(AutomationRunStatus::Running),
        ..Default::default()
    };
    let mut paused = Vec::new();
    loop {
        let page = tandem_store::list_runs(state.pool(), &filter, AUTOMATION_PAUSE_PAGE).await?;
        let Some(last) = page.last() else { break };
        filter.before = Some((last.created_at_ms, last.run_id.clone()));
        let ids: Vec<String> = page.iter().map(|r| r.run_id.clone()).collect();
        let items = tandem_store::transition_runs(
            state.pool(),
            &ids,
            &state.inner.store,
            false,
            |r, env| {
                // Only runs still running: one that moved on since the listing is left alone.
                if r.status != AutomationRunStatus::Running {
                    return tandem_core::Transition::unchanged(());
                }
                let t = tandem_core::execution::request_pause(
                    r,
                    env.lease_epoch.0,
                    body.reason.as_deref(),
                    env.now_ms,
                );
                tandem_core::Transition {
                    outcome: (),
                    changed: t.changed,
                    effects: t.effects,
                }
            },
        )
        .await?;
        let first_new = paused.len();
        for item in items {
            match item.result {
                Ok(a) if a.changed => paused.push(a.run.run_id),
                Ok(_) => {}
                Err(e) => tracing::warn!(run_id = %item.run_id, error = %e, "pausing a run failed"),
            }
        }
        state
            .after_commit_runs(&paused[first_new..], false, false)
            .await;
        if page.len() < AUTOMATION_PAUSE_PAGE {
            break;
        }
    }
    Ok(Json(
        json!({ "ok": true, "automation": spec, "paused_run_ids": paused }),
    ))
}

/// `POST /automations/v2/{id}/resume`: the automation is active again (paused runs stay paused;
/// resume them one by one).
pub async fn resume(
    State(state): State<AppState>,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(id)?;
    let mut spec = visible_automation(&state, &principal, &id).await?;
    spec.status = AutomationStatus::Active;
    spec.updated_at_ms = tandem_store::db_now_ms(state.pool()).await?;
    tandem_store::upsert_automation(state.pool(), &spec).await?;
    Ok(Json(json!({ "ok": true, "automation": spec })))
}

/// `GET /automations/v2/{id}/runs`: the automation's runs, newest first, paginated.
pub async fn runs(
    State(state): State<AppState>,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<RunListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = path_id(id)?;
    let mut q = query(q)?;
    visible_automation(&state, &principal, &id).await?;
    q.automation_id = Some(id);
    let filter = run_filter(&principal, &q)?;
    let limit = page_limit(q.limit)?;
    let runs = tandem_store::list_runs(state.pool(), &filter, limit).await?;
    Ok(Json(run_page(runs, limit)))
}
