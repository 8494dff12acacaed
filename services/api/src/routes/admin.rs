//! Governance (spend caps, spend pauses, quota overrides), audit verification and API tokens.
//! Governance and tokens need the admin token; audit verification any authenticated caller.

use axum::{
    Json,
    extract::{Path, Query, State, rejection::PathRejection, rejection::QueryRejection},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tandem_core::{ActorKind, TenantContext};
use tandem_store::{ApiToken, NewQuotaOverride, QuotaOverrideStatus, SpendCap, StoreError};

use super::automations::{path_id, query};
use crate::auth::hash_token;
use crate::{ApiError, AppState, JsonBody, Principal, check_id};

/// `GET|POST /audit/verify`: links pending audit records, then verifies the whole chain.
pub async fn audit_verify(
    State(state): State<AppState>,
    _principal: Principal,
) -> Result<Json<Value>, ApiError> {
    // Link what is waiting so the answer covers every committed record.
    while tandem_store::link_audit_chain(state.pool(), tandem_store::MAX_LINK_BATCH).await? > 0 {}
    match tandem_store::verify_audit_chain(state.pool()).await? {
        Ok(records) => Ok(Json(json!({ "ok": true, "records": records }))),
        Err(b) => Ok(Json(json!({ "ok": false, "break": format!("{b:?}") }))),
    }
}

#[derive(Debug, Deserialize)]
pub struct SpendCapBody {
    pub org_id: Option<String>,
    pub workspace_id: Option<String>,
    pub agent_id: String,
    pub weekly_cap_usd: f64,
}

fn tenant_of(
    principal: &Principal,
    org: Option<String>,
    ws: Option<String>,
) -> Result<TenantContext, ApiError> {
    let org = org
        .or_else(|| principal.org_id.clone())
        .unwrap_or_else(|| "local".into());
    let ws = ws
        .or_else(|| principal.workspace_id.clone())
        .unwrap_or_else(|| "local".into());
    check_id("org_id", &org)?;
    check_id("workspace_id", &ws)?;
    let tenant = if org == "local" && ws == "local" {
        TenantContext::local_implicit()
    } else {
        TenantContext::explicit(&org, &ws)
    };
    if !principal.can_see(&tenant) {
        return Err(ApiError::forbidden(
            "TENANT_SCOPE_DENIED",
            "tenant outside the token's",
        ));
    }
    Ok(tenant)
}

/// `POST /governance/spend-caps` `{org_id?, workspace_id?, agent_id, weekly_cap_usd}`.
pub async fn put_spend_cap(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<SpendCapBody>,
) -> Result<Json<Value>, ApiError> {
    principal.require_admin()?;
    let tenant = tenant_of(&principal, body.org_id, body.workspace_id)?;
    check_id("agent_id", &body.agent_id)?;
    if !body.weekly_cap_usd.is_finite() || body.weekly_cap_usd < 0.0 {
        return Err(ApiError::validation(
            "weekly_cap_usd",
            "must be a number >= 0",
        ));
    }
    let cap = SpendCap {
        org_id: tenant.org_id,
        workspace_id: tenant.workspace_id,
        agent_id: body.agent_id,
        weekly_cap_usd: body.weekly_cap_usd,
    };
    tandem_store::upsert_spend_cap(state.pool(), &cap).await?;
    Ok(Json(json!({ "ok": true })))
}

#[derive(Debug, Default, Deserialize)]
pub struct TenantQuery {
    pub org_id: Option<String>,
    pub workspace_id: Option<String>,
}

/// `GET /governance/spend-caps?org_id&workspace_id`.
pub async fn list_spend_caps(
    State(state): State<AppState>,
    principal: Principal,
    q: Result<Query<TenantQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let tenant = tenant_of(&principal, q.org_id, q.workspace_id)?;
    let caps =
        tandem_store::list_spend_caps(state.pool(), &tenant.org_id, &tenant.workspace_id).await?;
    let caps: Vec<Value> = caps
        .iter()
        .map(|c| {
            json!({"org_id": c.org_id, "workspace_id": c.workspace_id, "agent_id": c.agent_id,
                   "weekly_cap_usd": c.weekly_cap_usd})
        })
        .collect();
    Ok(Json(json!({ "spend_caps": caps })))
}

#[derive(Debug, Deserialize)]
pub struct AgentBody {
    pub org_id: Option<String>,
    pub workspace_id: Option<String>,
    pub agent_id: String,
    pub reason: Option<String>,
}

/// `POST /governance/spend-pauses` `{org_id?, workspace_id?, agent_id, reason?}`.
pub async fn pause_spend(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<AgentBody>,
) -> Result<Json<Value>, ApiError> {
    principal.require_admin()?;
    let tenant = tenant_of(&principal, body.org_id, body.workspace_id)?;
    check_id("agent_id", &body.agent_id)?;
    let key = tandem_core::governance::agent_scope_key(&tenant, &body.agent_id);
    let created =
        tandem_store::pause_agent_spend(state.pool(), &key, body.reason.as_deref()).await?;
    Ok(Json(
        json!({ "ok": true, "created": created, "agent_key": key }),
    ))
}

/// `DELETE /governance/spend-pauses` `{org_id?, workspace_id?, agent_id}`.
pub async fn resume_spend(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<AgentBody>,
) -> Result<Json<Value>, ApiError> {
    principal.require_admin()?;
    let tenant = tenant_of(&principal, body.org_id, body.workspace_id)?;
    check_id("agent_id", &body.agent_id)?;
    let key = tandem_core::governance::agent_scope_key(&tenant, &body.agent_id);
    let removed = tandem_store::resume_agent_spend(state.pool(), &key).await?;
    Ok(Json(json!({ "ok": true, "removed": removed })))
}

#[derive(Debug, Deserialize)]
pub struct OverrideBody {
    pub org_id: Option<String>,
    pub workspace_id: Option<String>,
    pub agent_id: String,
    pub status: Option<String>,
    pub expires_at_ms: u64,
    pub reason: Option<String>,
}

fn override_status(s: Option<&str>) -> Result<QuotaOverrideStatus, ApiError> {
    let s = s.unwrap_or("pending");
    QuotaOverrideStatus::parse(s).ok_or_else(|| {
        ApiError::validation(
            "status",
            &format!("unknown status `{s}`; expected pending, approved, rejected or revoked"),
        )
    })
}

/// `POST /governance/quota-overrides` `{agent_id, expires_at_ms, status?, reason?}`.
pub async fn create_override(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<OverrideBody>,
) -> Result<Json<Value>, ApiError> {
    principal.require_admin()?;
    let tenant = tenant_of(&principal, body.org_id, body.workspace_id)?;
    check_id("agent_id", &body.agent_id)?;
    let status = override_status(body.status.as_deref())?;
    let o = NewQuotaOverride {
        agent_key: tandem_core::governance::agent_scope_key(&tenant, &body.agent_id),
        status,
        expires_at_ms: body.expires_at_ms,
        approved_by: (status == QuotaOverrideStatus::Approved)
            .then(|| principal.actor_id.clone())
            .flatten(),
        reason: body.reason,
    };
    let id = tandem_store::insert_quota_override(state.pool(), &o).await?;
    Ok(Json(json!({ "ok": true, "id": id.to_string() })))
}

#[derive(Debug, Deserialize)]
pub struct OverrideStatusBody {
    pub status: String,
}

/// `POST /governance/quota-overrides/{id}` `{status}`.
pub async fn set_override_status(
    State(state): State<AppState>,
    principal: Principal,
    id: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<OverrideStatusBody>,
) -> Result<Json<Value>, ApiError> {
    principal.require_admin()?;
    let id = path_id(id)?;
    let id = uuid::Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request("INVALID_ID", "not a quota override id"))?;
    let status = override_status(Some(&body.status))?;
    match tandem_store::set_quota_override_status(
        state.pool(),
        id,
        status,
        principal.actor_id.as_deref(),
    )
    .await
    {
        Ok(()) => Ok(Json(json!({ "ok": true }))),
        Err(StoreError::NotFound(_)) => {
            Err(ApiError::not_found("NOT_FOUND", "no such quota override"))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize)]
pub struct TokenBody {
    pub name: String,
    pub org_id: String,
    pub workspace_id: String,
    pub principal_kind: ActorKind,
    pub actor_id: Option<String>,
    #[serde(default)]
    pub gate_reviewer: bool,
    #[serde(default)]
    pub tenant_admin: bool,
}

/// `POST /auth/tokens` (admin): creates a tenant-bound token; the token is in this answer only.
pub async fn create_token(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<TokenBody>,
) -> Result<Json<Value>, ApiError> {
    principal.require_admin()?;
    for (what, v) in [
        ("name", &body.name),
        ("org_id", &body.org_id),
        ("workspace_id", &body.workspace_id),
    ] {
        check_id(what, v)?;
    }
    if let Some(a) = &body.actor_id {
        check_id("actor_id", a)?;
    }
    let token = format!(
        "tdm_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let stored = ApiToken {
        token_hash: hash_token(&token),
        name: body.name,
        org_id: body.org_id,
        workspace_id: body.workspace_id,
        principal_kind: body.principal_kind,
        actor_id: body.actor_id,
        gate_reviewer: body.gate_reviewer,
        tenant_admin: body.tenant_admin,
    };
    tandem_store::insert_api_token(state.pool(), &stored).await?;
    Ok(Json(json!({
        "ok": true,
        "token": token,
        "name": stored.name,
        "org_id": stored.org_id,
        "workspace_id": stored.workspace_id,
        "principal_kind": stored.principal_kind,
        "actor_id": stored.actor_id,
        "gate_reviewer": stored.gate_reviewer,
        "tenant_admin": stored.tenant_admin,
    })))
}

/// `GET /auth/whoami`: the resolved principal.
pub async fn whoami(principal: Principal) -> Json<Value> {
    Json(json!({
        "kind": principal.kind,
        "actor_id": principal.actor_id,
        "source": principal.source,
        "admin": principal.admin,
        "org_id": principal.org_id,
        "workspace_id": principal.workspace_id,
        "verified_tenant": principal.verified_tenant,
        "gate_reviewer": principal.gate_reviewer,
        "tenant_admin": principal.tenant_admin,
    }))
}

#[derive(Debug, Deserialize)]
pub struct RevokeBody {
    /// The token itself, or
    pub token: Option<String>,
    /// its hex SHA-256.
    pub token_hash: Option<String>,
}

/// `POST /auth/tokens/revoke` (admin) `{token}` or `{token_hash}`.
pub async fn revoke_token(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<RevokeBody>,
) -> Result<Json<Value>, ApiError> {
    principal.require_admin()?;
    let hash = match (body.token, body.token_hash) {
        (Some(t), _) => hash_token(t.trim()),
        (None, Some(h)) => h.trim().to_ascii_lowercase(),
        (None, None) => {
            return Err(ApiError::validation(
                "token",
                "give `token` or `token_hash`",
            ));
        }
    };
    check_id("token_hash", &hash)?;
    if tandem_store::revoke_api_token(state.pool(), &hash).await? {
        Ok(Json(json!({ "ok": true })))
    } else {
        Err(ApiError::not_found("NOT_FOUND", "no such active token"))
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct FailRunningBody {
    /// Must be `true`: the action fails every running run of the fleet.
    #[serde(default)]
    pub confirm: bool,
}

/// `POST /admin/fleet/fail-running-runs` (admin) `{confirm: true}`: the explicit whole-fleet stop
/// (spec §3.12). Every `running` run fails with upstream's shutdown strings (stop kind
/// `shutdown`), its events are relayed and its workers get cancel hints. Never run implicitly:
/// one replica stopping fails nobody's run.
pub async fn fail_running_runs(
    State(state): State<AppState>,
    principal: Principal,
    JsonBody(body): JsonBody<FailRunningBody>,
) -> Result<Json<Value>, ApiError> {
    principal.require_admin()?;
    if !body.confirm {
        return Err(ApiError::validation(
            "confirm",
            "must be true: this fails every running run of the fleet",
        ));
    }
    let report = tandem_sweeper::fail_running_runs_for_shutdown(
        state.pool(),
        &state.inner.store,
        tandem_store::MAX_BATCH,
    )
    .await?;
    state
        .after_commit_runs(&report.runs_with_outbox, false, false)
        .await;
    let hints = tandem_sweeper::send_cancel_hints(
        &state.inner.nats,
        &state.inner.prefix,
        &report.failed,
        Some("fleet shutdown"),
    )
    .await;
    tracing::warn!(
        failed = report.failed.len(),
        errors = report.errors,
        "operator failed every running run (fleet shutdown)"
    );
    let failed: Vec<&str> = report.failed.iter().map(|(id, _)| id.as_str()).collect();
    Ok(Json(json!({
        "ok": report.errors == 0,
        "failed": failed,
        "errors": report.errors,
        "cancel_hints": hints,
    })))
}
