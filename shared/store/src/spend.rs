//! Weekly spend-cap evaluation (spec §3.5, §2.2 "weekly spend cap"): loads the caps, the spend
//! accumulated by recent runs and the current spend pauses, lets a pure planner decide, and
//! applies its plan (spend pauses recorded or lifted, quota-override requests opened) in the same
//! transaction.
//!
//! The evaluation is a fleet-wide singleton per pass: the transaction first takes a
//! transaction-scoped advisory lock with `pg_try_advisory_xact_lock`; a replica that does not get
//! it skips the pass (another replica is evaluating the same state). Released at commit, so a
//! replica that dies mid-pass holds nothing.

use crate::convert::{ms_from_db, ms_to_db};
use crate::governance::{NewQuotaOverride, SpendCap};
use crate::runs::DB_NOW_MS;
use crate::{Pool, StoreError};
use serde_json::Value;
use tandem_core::{AutomationV2Spec, Millis, TenantContext};
use uuid::Uuid;

/// Advisory lock key of the spend evaluation ("tandem" + "spnd" as ASCII).
pub const SPEND_LOCK_KEY: i64 = 0x7461_6e64_7370_6e64;

/// One run's contribution: its accumulated `estimated_cost_usd` and the definition whose agents
/// it is attributed to (the run's snapshot, else the live definition).
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpend {
    pub run_id: String,
    pub tenant_context: TenantContext,
    pub automation: Option<AutomationV2Spec>,
    pub cost_usd: f64,
}

/// A spend pause as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendPauseRow {
    pub agent_key: String,
    pub reason: Option<String>,
}

/// What the planner sees: read in the evaluation's transaction, at its database clock.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendInputs {
    pub now_ms: Millis,
    pub window_ms: u64,
    pub caps: Vec<SpendCap>,
    /// Runs of capped tenants updated inside the window with a positive cost.
    pub runs: Vec<RunSpend>,
    /// Rows whose JSON could not be read (counted, left out).
    pub unreadable_runs: usize,
    pub pauses: Vec<SpendPauseRow>,
}

/// What the planner decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpendPlan {
    /// Spend pauses to record: `(agent_key, reason)`; an existing pause is kept as it is.
    pub pause: Vec<(String, String)>,
    /// Spend pauses to lift, exactly as read (`agent_key`, `reason`): a pause whose reason
    /// changed meanwhile (an operator replaced it) is left alone.
    pub lift: Vec<SpendPauseRow>,
    /// Quota-override requests to open (`pending`), unless the agent already has a pending one or
    /// an approved unexpired one.
    pub request_overrides: Vec<NewQuotaOverride>,
}

/// What [`evaluate_spend_caps`] applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpendApplied {
    pub now_ms: Millis,
    pub caps: usize,
    pub runs: usize,
    pub unreadable_runs: usize,
    /// Agent keys newly spend-paused.
    pub paused: Vec<String>,
    /// Agent keys whose pause was lifted.
    pub lifted: Vec<String>,
    /// Quota-override requests opened.
    pub overrides_requested: usize,
}

const RUNS_SQL: &str = "
    SELECT r.run_id, r.doc -> 'tenant_context', coalesce(r.doc -> 'automation_snapshot', a.spec),
           CASE WHEN jsonb_typeof(r.doc -> 'estimated_cost_usd') = 'number'
                THEN (r.doc -> 'estimated_cost_usd')::float8 ELSE 0 END AS cost
      FROM runs r
      LEFT JOIN automations a ON a.automation_id = r.automation_id
     WHERE r.status IN ('queued', 'running', 'pausing', 'paused', 'awaiting_approval',
                        'completed', 'blocked', 'failed', 'cancelled')
       AND r.updated_at_ms >= $1
       AND EXISTS (SELECT 1 FROM spend_caps c
                    WHERE c.org_id = r.org_id AND c.workspace_id = r.workspace_id)
       AND CASE WHEN jsonb_typeof(r.doc -> 'estimated_cost_usd') = 'number'
                THEN (r.doc -> 'estimated_cost_usd')::float8 ELSE 0 END > 0";

/// Runs one spend evaluation: takes the fleet-wide lock (returns `Ok(None)` when another replica
/// holds it), reads [`SpendInputs`] (runs updated at or after `now − window_ms`), calls `plan`,
/// and applies the plan; all in one transaction.
pub async fn evaluate_spend_caps<F>(
    pool: &Pool,
    window_ms: u64,
    plan: F,
) -> Result<Option<SpendApplied>, StoreError>
where
    F: FnOnce(&SpendInputs) -> SpendPlan,
{
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            &format!("SELECT pg_try_advisory_xact_lock($1), {DB_NOW_MS}"),
            &[&SPEND_LOCK_KEY],
        )
        .await?;
    if !row.try_get::<_, bool>(0)? {
        tx.rollback().await?;
        return Ok(None);
    }
    let now_ms = ms_from_db(row.try_get(1)?, "database clock")?;
    let since = ms_to_db(now_ms.saturating_sub(window_ms), "spend window start")?;

    let caps = tx
        .query(
            "SELECT org_id, workspace_id, agent_id, weekly_cap_usd FROM spend_caps
              ORDER BY org_id, workspace_id, agent_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(SpendCap {
                org_id: r.try_get(0)?,
                workspace_id: r.try_get(1)?,
                agent_id: r.try_get(2)?,
                weekly_cap_usd: r.try_get(3)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let pauses = tx
        .query(
            "SELECT agent_key, reason FROM spend_pauses ORDER BY agent_key",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(SpendPauseRow {
                agent_key: r.try_get(0)?,
                reason: r.try_get(1)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;

    let mut runs = Vec::new();
    let mut unreadable_runs = 0;
    if !caps.is_empty() {
        let stmt = tx.prepare_cached(RUNS_SQL).await?;
        for r in tx.query(&stmt, &[&since]).await? {
            let run_id: String = r.try_get(0)?;
            let tenant: Option<Value> = r.try_get(1)?;
            let spec: Option<Value> = r.try_get(2)?;
            let cost: f64 = r.try_get(3)?;
            let tenant_context = match tenant {
                None | Some(Value::Null) => Ok(TenantContext::default()),
                Some(v) => serde_json::from_value::<TenantContext>(v),
            };
            let automation = spec
                .filter(|v| !v.is_null())
                .map(serde_json::from_value::<AutomationV2Spec>)
                .transpose();
            match (tenant_context, automation) {
                (Ok(tenant_context), Ok(automation)) if cost.is_finite() => runs.push(RunSpend {
                    run_id,
                    tenant_context,
                    automation,
                    cost_usd: cost,
                }),
                _ => {
                    unreadable_runs += 1;
                    tracing::warn!(run_id = %run_id, "run left out of the spend evaluation: unreadable tenant, definition or cost");
                }
            }
        }
    }

    let inputs = SpendInputs {
        now_ms,
        window_ms,
        caps,
        runs,
        unreadable_runs,
        pauses,
    };
    let plan = plan(&inputs);
    let mut applied = SpendApplied {
        now_ms,
        caps: inputs.caps.len(),
        runs: inputs.runs.len(),
        unreadable_runs,
        ..SpendApplied::default()
    };
    for (key, reason) in &plan.pause {
        let n = tx
            .execute(
                "INSERT INTO spend_pauses (agent_key, reason) VALUES ($1, $2)
                 ON CONFLICT (agent_key) DO NOTHING",
                &[key, reason],
            )
            .await?;
        if n == 1 {
            applied.paused.push(key.clone());
        }
    }
    for p in &plan.lift {
        let n = tx
            .execute(
                "DELETE FROM spend_pauses
                  WHERE agent_key = $1 AND reason IS NOT DISTINCT FROM $2",
                &[&p.agent_key, &p.reason],
            )
            .await?;
        if n == 1 {
            applied.lifted.push(p.agent_key.clone());
        }
    }
    for o in &plan.request_overrides {
        let expires = ms_to_db(o.expires_at_ms, "expires_at_ms")?;
        let now = ms_to_db(now_ms, "database clock")?;
        let n = tx
            .execute(
                "INSERT INTO quota_overrides (id, agent_key, status, expires_at_ms, approved_by, reason)
                 SELECT $1, $2, $3, $4, $5, $6
                  WHERE NOT EXISTS (
                        SELECT 1 FROM quota_overrides
                         WHERE agent_key = $2
                           AND (status = 'pending'
                                OR (status = 'approved' AND expires_at_ms > $7)))",
                &[
                    &Uuid::now_v7(),
                    &o.agent_key,
                    &o.status.as_str(),
                    &expires,
                    &o.approved_by,
                    &o.reason,
                    &now,
                ],
            )
            .await?;
        applied.overrides_requested += usize::try_from(n).unwrap_or(0);
    }
    tx.commit().await?;
    Ok(Some(applied))
}
