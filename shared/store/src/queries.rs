//! Read models and small writes of the HTTP API: paginated run listing with filters, every
//! awaiting run (pending approvals, no 500-run window), audit records that change no run, the
//! database clock, and hashed API tokens.

use crate::StoreError;
use crate::convert::ms_from_db;
use crate::runs::{DB_NOW_MS, RUN_COLUMNS, stored_run_from_row};
use deadpool_postgres::Pool;
use tandem_core::audit::DURABILITY_REQUIRED;
use tandem_core::{ActorKind, AuditDraft, AutomationRunStatus, AutomationV2RunRecord, Millis};
use uuid::Uuid;

/// The database clock in ms (what every API-created record is stamped with).
pub async fn db_now_ms(pool: &Pool) -> Result<Millis, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(&format!("SELECT {DB_NOW_MS}"), &[])
        .await?;
    ms_from_db(row.try_get(0)?, "database clock")
}

/// Filters of [`list_runs`]; `None` means "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    pub org_id: Option<String>,
    pub workspace_id: Option<String>,
    pub automation_id: Option<String>,
    pub status: Option<AutomationRunStatus>,
    /// Keyset cursor: only runs strictly after `(created_at_ms, run_id)` in the newest-first
    /// order.
    pub before: Option<(Millis, String)>,
}

/// Runs matching `filter`, newest first (`created_at_ms DESC, run_id DESC`), at most `limit`.
/// Page on with the last run's `(created_at_ms, run_id)` as [`RunFilter::before`].
pub async fn list_runs(
    pool: &Pool,
    filter: &RunFilter,
    limit: usize,
) -> Result<Vec<AutomationV2RunRecord>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs r
              WHERE ($1::text IS NULL OR r.org_id = $1)
                AND ($2::text IS NULL OR r.workspace_id = $2)
                AND ($3::text IS NULL OR r.automation_id = $3)
                AND ($4::text IS NULL OR r.status = $4)
                AND ($5::bigint IS NULL OR (r.created_at_ms, r.run_id) < ($5, $6::text))
              ORDER BY r.created_at_ms DESC, r.run_id DESC
              LIMIT $7"
        ))
        .await?;
    let status = filter.status.map(|s| s.as_str());
    let (before_ms, before_id) = match &filter.before {
        Some((ms, id)) => (
            Some(i64::try_from(*ms).unwrap_or(i64::MAX)),
            Some(id.as_str()),
        ),
        None => (None, None),
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    client
        .query(
            &stmt,
            &[
                &filter.org_id,
                &filter.workspace_id,
                &filter.automation_id,
                &status,
                &before_ms,
                &before_id,
                &limit,
            ],
        )
        .await?
        .iter()
        .map(|row| stored_run_from_row(row).map(|s| s.run))
        .collect()
}

/// Every `awaiting_approval` run of the tenant (`None`: any), read from the status index: the
/// pending-approvals list sees all of them, not a window of the newest runs (spec §4.7 walks only
/// the 500 newest). Bounded by `max` as a safety valve.
pub async fn awaiting_approval_runs(
    pool: &Pool,
    org_id: Option<&str>,
    workspace_id: Option<&str>,
    max: usize,
) -> Result<Vec<AutomationV2RunRecord>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT r.doc, r.lease_epoch, r.activity_at_ms, r.next_action_at_ms, '[]'::jsonb
               FROM runs r
              WHERE r.status = 'awaiting_approval'
                AND ($1::text IS NULL OR r.org_id = $1)
                AND ($2::text IS NULL OR r.workspace_id = $2)
              ORDER BY r.updated_at_ms DESC, r.run_id
              LIMIT $3",
        )
        .await?;
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    client
        .query(&stmt, &[&org_id, &workspace_id, &max])
        .await?
        .iter()
        .map(|row| stored_run_from_row(row).map(|s| s.run))
        .collect()
}

/// Appends one protected audit record that goes with no run change (e.g. a denied gate
/// decision). Unlinked: the chainer links it like every other record.
pub async fn append_audit(pool: &Pool, draft: &AuditDraft) -> Result<(), StoreError> {
    let client = pool.get().await?;
    let tenant = serde_json::to_value(&draft.tenant_context)?;
    client
        .execute(
            &format!(
                "INSERT INTO audit_log (event_id, durability, event_type, tenant, actor, payload,
                                        created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, {DB_NOW_MS})"
            ),
            &[
                &Uuid::new_v4(),
                &DURABILITY_REQUIRED,
                &draft.event_type,
                &tenant,
                &draft.actor,
                &draft.payload,
            ],
        )
        .await?;
    Ok(())
}

/// Automations of one org and/or workspace (`None`: any), by id.
pub async fn list_automations_in(
    pool: &Pool,
    org_id: Option<&str>,
    workspace_id: Option<&str>,
    limit: usize,
) -> Result<Vec<tandem_core::AutomationV2Spec>, StoreError> {
    let client = pool.get().await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT spec FROM automations
              WHERE ($1::text IS NULL OR org_id = $1) AND ($2::text IS NULL OR workspace_id = $2)
              ORDER BY automation_id LIMIT $3",
            &[&org_id, &workspace_id, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| Ok(serde_json::from_value(r.try_get(0)?)?))
        .collect()
}

/// The newest audit records of one type (tests and operators), as JSON objects with
/// `event_type`, `actor`, `tenant`, `payload`, `seq` and `created_at_ms`.
pub async fn audit_records(
    pool: &Pool,
    event_type: &str,
    limit: usize,
) -> Result<Vec<serde_json::Value>, StoreError> {
    let client = pool.get().await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT jsonb_build_object('event_type', event_type, 'actor', actor, 'tenant', tenant,
                                       'payload', payload, 'seq', seq, 'created_at_ms', created_at_ms)
               FROM audit_log WHERE event_type = $1 ORDER BY id DESC LIMIT $2",
            &[&event_type, &limit],
        )
        .await?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// A stored API token (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub token_hash: String,
    pub name: String,
    pub org_id: String,
    pub workspace_id: String,
    pub principal_kind: ActorKind,
    pub actor_id: Option<String>,
    /// Verified reviewer authority for governed gates.
    pub gate_reviewer: bool,
    /// May act on every automation of its tenant, not only those its actor created.
    pub tenant_admin: bool,
}

fn kind_from_str(s: &str) -> Result<ActorKind, StoreError> {
    match s {
        "human" => Ok(ActorKind::Human),
        "agent" => Ok(ActorKind::Agent),
        "system" => Ok(ActorKind::System),
        other => Err(StoreError::Invalid(format!(
            "unknown principal kind {other}"
        ))),
    }
}

/// Stores a token (by its hash). An existing hash is a [`StoreError::Conflict`].
pub async fn insert_api_token(pool: &Pool, token: &ApiToken) -> Result<(), StoreError> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO api_tokens (token_hash, name, org_id, workspace_id, principal_kind,
                                     actor_id, gate_reviewer, tenant_admin)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &token.token_hash,
                &token.name,
                &token.org_id,
                &token.workspace_id,
                &token.principal_kind.as_str(),
                &token.actor_id,
                &token.gate_reviewer,
                &token.tenant_admin,
            ],
        )
        .await?;
    Ok(())
}

/// The unrevoked token with this hash.
pub async fn find_api_token(pool: &Pool, token_hash: &str) -> Result<Option<ApiToken>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT token_hash, name, org_id, workspace_id, principal_kind, actor_id, gate_reviewer,
                    tenant_admin
               FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
        )
        .await?;
    let Some(row) = client.query_opt(&stmt, &[&token_hash]).await? else {
        return Ok(None);
    };
    let kind: String = row.try_get(4)?;
    Ok(Some(ApiToken {
        token_hash: row.try_get(0)?,
        name: row.try_get(1)?,
        org_id: row.try_get(2)?,
        workspace_id: row.try_get(3)?,
        principal_kind: kind_from_str(&kind)?,
        actor_id: row.try_get(5)?,
        gate_reviewer: row.try_get(6)?,
        tenant_admin: row.try_get(7)?,
    }))
}

/// Revokes a token; false when no unrevoked token has this hash.
pub async fn revoke_api_token(pool: &Pool, token_hash: &str) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let n = client
        .execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL",
            &[&token_hash],
        )
        .await?;
    Ok(n == 1)
}
