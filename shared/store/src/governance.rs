//! Governance state shared by every replica: spend caps, spend pauses and quota overrides.
//! Decisions stay in `tandem_core::governance`; this module loads and stores their inputs.

use crate::StoreError;
use crate::convert::{ms_from_db, ms_to_db};
use deadpool_postgres::{Pool, Transaction};
use std::collections::HashSet;
use tandem_core::governance::{GovernanceSnapshot, QuotaOverride, agent_scope_key, agent_set};
use tandem_core::{AutomationV2Spec, Millis};
use uuid::Uuid;

/// Lifecycle of a quota override request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaOverrideStatus {
    Pending,
    Approved,
    Rejected,
    Revoked,
}

impl QuotaOverrideStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Approved, Self::Rejected, Self::Revoked]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// A quota override to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewQuotaOverride {
    /// `governance_agent_scope_key` of the agent.
    pub agent_key: String,
    pub status: QuotaOverrideStatus,
    pub expires_at_ms: Millis,
    pub approved_by: Option<String>,
    pub reason: Option<String>,
}

/// A weekly spend cap for one agent of one tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendCap {
    pub org_id: String,
    pub workspace_id: String,
    pub agent_id: String,
    pub weekly_cap_usd: f64,
}

const SNAPSHOT_ALL: &str = "
    SELECT agent_key, NULL::bigint FROM spend_pauses
    UNION ALL
    SELECT agent_key, expires_at_ms FROM quota_overrides
     WHERE status = 'approved'
       AND expires_at_ms > floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint";

const SNAPSHOT_KEYS: &str = "
    SELECT agent_key, NULL::bigint FROM spend_pauses WHERE agent_key = ANY($1)
    UNION ALL
    SELECT agent_key, expires_at_ms FROM quota_overrides
     WHERE status = 'approved' AND agent_key = ANY($1) AND expires_at_ms > $2";

fn snapshot_from_rows(rows: &[tokio_postgres::Row]) -> Result<GovernanceSnapshot, StoreError> {
    let mut snap = GovernanceSnapshot {
        spend_paused_agents: HashSet::new(),
        quota_overrides: Vec::new(),
    };
    for r in rows {
        let key: String = r.try_get(0)?;
        match r.try_get::<_, Option<i64>>(1)? {
            None => {
                snap.spend_paused_agents.insert(key);
            }
            Some(exp) => snap.quota_overrides.push(QuotaOverride {
                agent_key: key,
                expires_at_ms: ms_from_db(exp, "quota override expires_at_ms")?,
            }),
        }
    }
    snap.quota_overrides
        .sort_by(|a, b| (&a.agent_key, a.expires_at_ms).cmp(&(&b.agent_key, b.expires_at_ms)));
    Ok(snap)
}

/// Every spend pause and every approved override unexpired at the database clock.
pub async fn governance_snapshot(pool: &Pool) -> Result<GovernanceSnapshot, StoreError> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(SNAPSHOT_ALL).await?;
    snapshot_from_rows(&client.query(&stmt, &[]).await?)
}

/// The snapshot restricted to the agents of these automations (each scoped by its own tenant),
/// read inside a transition so the decision and the state it read commit together.
pub(crate) async fn scoped_snapshot(
    tx: &Transaction<'_>,
    automations: &[&AutomationV2Spec],
    now_ms: Millis,
) -> Result<GovernanceSnapshot, StoreError> {
    let mut keys: Vec<String> = automations
        .iter()
        .flat_map(|automation| {
            let tenant = automation.tenant_context();
            agent_set(automation)
                .into_iter()
                .map(move |a| agent_scope_key(&tenant, &a))
        })
        .collect();
    keys.sort();
    keys.dedup();
    let stmt = tx.prepare_cached(SNAPSHOT_KEYS).await?;
    let now = ms_to_db(now_ms, "database clock")?;
    snapshot_from_rows(&tx.query(&stmt, &[&keys, &now]).await?)
}

/// Spend-pauses an agent (by scope key). Returns false when it was already paused (the original
/// reason and time are kept).
pub async fn pause_agent_spend(
    pool: &Pool,
    agent_key: &str,
    reason: Option<&str>,
) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let n = client
        .execute(
            "INSERT INTO spend_pauses (agent_key, reason) VALUES ($1, $2)
             ON CONFLICT (agent_key) DO NOTHING",
            &[&agent_key, &reason],
        )
        .await?;
    Ok(n == 1)
}

/// Lifts a spend pause. Returns false when the agent was not paused.
pub async fn resume_agent_spend(pool: &Pool, agent_key: &str) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let n = client
        .execute(
            "DELETE FROM spend_pauses WHERE agent_key = $1",
            &[&agent_key],
        )
        .await?;
    Ok(n == 1)
}

/// Records a quota override; returns its id.
pub async fn insert_quota_override(pool: &Pool, o: &NewQuotaOverride) -> Result<Uuid, StoreError> {
    let client = pool.get().await?;
    let id = Uuid::now_v7();
    let expires = ms_to_db(o.expires_at_ms, "expires_at_ms")?;
    client
        .execute(
            "INSERT INTO quota_overrides (id, agent_key, status, expires_at_ms, approved_by, reason)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &id,
                &o.agent_key,
                &o.status.as_str(),
                &expires,
                &o.approved_by,
                &o.reason,
            ],
        )
        .await?;
    Ok(id)
}

/// Moves an override to `status` (approving records `approved_by`).
pub async fn set_quota_override_status(
    pool: &Pool,
    id: Uuid,
    status: QuotaOverrideStatus,
    approved_by: Option<&str>,
) -> Result<(), StoreError> {
    let client = pool.get().await?;
    let n = client
        .execute(
            "UPDATE quota_overrides SET status = $2, approved_by = coalesce($3, approved_by)
              WHERE id = $1",
            &[&id, &status.as_str(), &approved_by],
        )
        .await?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("quota override {id}")));
    }
    Ok(())
}

/// Sets (or replaces) an agent's weekly spend cap.
pub async fn upsert_spend_cap(pool: &Pool, cap: &SpendCap) -> Result<(), StoreError> {
    if !cap.weekly_cap_usd.is_finite() || cap.weekly_cap_usd < 0.0 {
        return Err(StoreError::Invalid(format!(
            "weekly_cap_usd must be a finite number >= 0, got {}",
            cap.weekly_cap_usd
        )));
    }
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO spend_caps (org_id, workspace_id, agent_id, weekly_cap_usd)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (org_id, workspace_id, agent_id)
             DO UPDATE SET weekly_cap_usd = EXCLUDED.weekly_cap_usd, updated_at = now()",
            &[
                &cap.org_id,
                &cap.workspace_id,
                &cap.agent_id,
                &cap.weekly_cap_usd,
            ],
        )
        .await?;
    Ok(())
}

/// The spend caps of one tenant, by agent.
pub async fn list_spend_caps(
    pool: &Pool,
    org_id: &str,
    workspace_id: &str,
) -> Result<Vec<SpendCap>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT org_id, workspace_id, agent_id, weekly_cap_usd FROM spend_caps
              WHERE org_id = $1 AND workspace_id = $2 ORDER BY agent_id",
            &[&org_id, &workspace_id],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(SpendCap {
                org_id: r.try_get(0)?,
                workspace_id: r.try_get(1)?,
                agent_id: r.try_get(2)?,
                weekly_cap_usd: r.try_get(3)?,
            })
        })
        .collect()
}
