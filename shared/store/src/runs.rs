//! Runs: creation, reads, the minimal fenced claim and activity heartbeats.

use crate::convert::{
    json_text, ms_from_db, ms_to_db, opt_ms_from_db, opt_ms_to_db, run_doc, run_from_doc,
};
use crate::write::{RunRecords, insert_run_records};
use crate::{LeaseEpoch, StoreError, StoreSettings, StoredRun};
use deadpool_postgres::Pool;
use tandem_core::{AutomationRunStatus, AutomationV2RunRecord, Effects, Millis};
use tokio_postgres::Row;

/// The database clock in ms, as SQL. `statement_timestamp()` rather than `now()` where it is read
/// after a row lock: a transaction that waited for the lock must not stamp a time earlier than
/// the holder it waited for.
pub(crate) const DB_NOW_MS: &str =
    "floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint";

/// The hot columns of a run row, derived from the record on every write.
pub(crate) struct HotColumns {
    pub automation_id: String,
    pub org_id: String,
    pub workspace_id: String,
    pub status: &'static str,
    pub workspace_root: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub next_action_at_ms: Option<i64>,
    pub stop_kind: Option<&'static str>,
    /// The snapshot sets `execution.max_total_runtime_ms` (see [`claimed_run_ids_to_tick`]).
    pub has_runtime_budget: bool,
}

impl HotColumns {
    pub(crate) fn of(
        run: &AutomationV2RunRecord,
        settings: &StoreSettings,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            automation_id: run.automation_id.clone(),
            org_id: run.tenant_context.org_id.clone(),
            workspace_id: run.tenant_context.workspace_id.clone(),
            status: run.status.as_str(),
            workspace_root: run.workspace_root(),
            created_at_ms: ms_to_db(run.created_at_ms, "created_at_ms")?,
            updated_at_ms: ms_to_db(run.updated_at_ms, "updated_at_ms")?,
            next_action_at_ms: opt_ms_to_db(next_action_at(run, settings), "next_action_at_ms")?,
            stop_kind: run.stop_kind.map(|k| k.as_str()),
            has_runtime_budget: run
                .automation_snapshot
                .as_ref()
                .and_then(|s| s.execution.as_ref())
                .is_some_and(|e| e.max_total_runtime_ms.is_some()),
        })
    }
}

/// When the gate-notifier next needs this run: only awaiting runs with an open gate that has no
/// settled decision are ever due. A settled but unapplied decision is the sweeper's recovery (spec
/// §4.5), not a policy action; indexing it would put it first in the due order forever.
pub fn next_action_at(run: &AutomationV2RunRecord, settings: &StoreSettings) -> Option<Millis> {
    if run.status != AutomationRunStatus::AwaitingApproval {
        return None;
    }
    let gate = run.checkpoint.awaiting_gate.as_ref()?;
    if tandem_core::gate::settled_decision(run, gate).is_some() {
        return None;
    }
    tandem_core::policy::next_action_at(gate, &settings.gates)
}

/// Inserts a new run (lease epoch 0) with its lifecycle history and the effects of creating it
/// (audit, outbox), in one transaction. An existing `run_id` is a [`StoreError::Conflict`].
pub async fn create_run(
    pool: &Pool,
    run: &AutomationV2RunRecord,
    effects: &Effects,
    settings: &StoreSettings,
) -> Result<StoredRun, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let hot = HotColumns::of(run, settings)?;
    // A copy to serialize from: a new run's history is a record or two, and its snapshot is shared.
    let doc = run_doc(&mut run.clone())?;
    let stmt = tx
        .prepare_cached(&format!(
            "INSERT INTO runs (run_id, automation_id, org_id, workspace_id, status, lease_epoch,
                               workspace_root, created_at_ms, updated_at_ms, activity_at_ms,
                               next_action_at_ms, stop_kind, doc, has_runtime_budget)
             VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8, {DB_NOW_MS}, $9, $10, $11, $12)
             RETURNING activity_at_ms, {DB_NOW_MS}"
        ))
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &run.run_id,
                &hot.automation_id,
                &hot.org_id,
                &hot.workspace_id,
                &hot.status,
                &hot.workspace_root,
                &hot.created_at_ms,
                &hot.updated_at_ms,
                &hot.next_action_at_ms,
                &hot.stop_kind,
                &doc,
                &hot.has_runtime_budget,
            ],
        )
        .await?;
    let activity_at_ms = ms_from_db(row.try_get(0)?, "activity_at_ms")?;
    let now_ms = ms_from_db(row.try_get(1)?, "database clock")?;
    let records = RunRecords {
        run_id: &run.run_id,
        lifecycle: &run.checkpoint.lifecycle_history,
        effects,
    };
    insert_run_records(&tx, &[records], now_ms).await?;
    tx.commit().await?;
    Ok(StoredRun {
        run: run.clone(),
        lease_epoch: LeaseEpoch(0),
        activity_at_ms,
        next_action_at_ms: next_action_at(run, settings),
    })
}

/// Columns every full-run read selects, in this order; see [`stored_run_from_row`].
pub(crate) const RUN_COLUMNS: &str = "r.doc, r.lease_epoch, r.activity_at_ms, r.next_action_at_ms,
    coalesce((SELECT jsonb_agg(l.record ORDER BY l.id) FROM run_lifecycle l
              WHERE l.run_id = r.run_id), '[]'::jsonb)";

pub(crate) fn stored_run_from_row(row: &Row) -> Result<StoredRun, StoreError> {
    Ok(StoredRun {
        run: run_from_doc(
            &json_text(row, 0)?.ok_or_else(|| StoreError::Corrupt("a run has no doc".into()))?,
            json_text(row, 4)?.as_deref(),
        )?,
        lease_epoch: LeaseEpoch(row.try_get(1)?),
        activity_at_ms: ms_from_db(row.try_get(2)?, "activity_at_ms")?,
        next_action_at_ms: opt_ms_from_db(row.try_get(3)?, "next_action_at_ms")?,
    })
}

/// A run with its lease epoch and activity; [`StoreError::NotFound`] when absent.
pub async fn get_stored_run(pool: &Pool, run_id: &str) -> Result<StoredRun, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs r WHERE r.run_id = $1"
        ))
        .await?;
    let row = client
        .query_opt(&stmt, &[&run_id])
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("run {run_id}")))?;
    stored_run_from_row(&row)
}

/// The full run record, `checkpoint.lifecycle_history` reassembled in write order.
pub async fn get_run(pool: &Pool, run_id: &str) -> Result<AutomationV2RunRecord, StoreError> {
    Ok(get_stored_run(pool, run_id).await?.run)
}

/// Up to `limit` runs in `status`, least recently updated first.
pub async fn list_runs_by_status(
    pool: &Pool,
    status: AutomationRunStatus,
    limit: usize,
) -> Result<Vec<AutomationV2RunRecord>, StoreError> {
    let client = pool.get().await?;
    // The status is spelled as a literal (a closed set of words, no injection) so the statement's
    // generic plan can still use partial indexes.
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs r WHERE r.status = '{}'
             ORDER BY r.updated_at_ms, r.run_id LIMIT $1",
            status.as_str()
        ))
        .await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    client
        .query(&stmt, &[&limit])
        .await?
        .iter()
        .map(|row| stored_run_from_row(row).map(|s| s.run))
        .collect()
}

/// The minimal fenced claim: one statement that takes up to `limit` queued runs (oldest first,
/// skipping rows other claimers hold, at most one per free workspace root), sets them running
/// and bumps their lease epoch. The full scheduler claim (capacity, holds, runtime context) is
/// built on [`crate::transition_batch`]; this one exists for fencing and benchmarks.
pub const CLAIM_QUEUED_SQL: &str = "
WITH picked AS MATERIALIZED (
    SELECT run_id, workspace_root, created_at_ms
      FROM runs
     WHERE status = 'queued'
     ORDER BY created_at_ms, run_id
     LIMIT $1
       FOR UPDATE SKIP LOCKED
), chosen AS (
    SELECT DISTINCT ON (p.workspace_root IS NULL, coalesce(p.workspace_root, p.run_id)) p.run_id
      FROM picked p
     WHERE p.workspace_root IS NULL
        OR NOT EXISTS (SELECT 1 FROM runs o
                        WHERE o.workspace_root = p.workspace_root
                          AND o.status IN ('running', 'pausing'))
     ORDER BY p.workspace_root IS NULL, coalesce(p.workspace_root, p.run_id),
              p.created_at_ms, p.run_id
), clock AS (
    SELECT floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint AS now_ms
)
UPDATE runs r
   SET status = 'running',
       lease_epoch = r.lease_epoch + 1,
       activity_at_ms = clock.now_ms,
       updated_at_ms = clock.now_ms,
       next_action_at_ms = NULL,
       doc = (r.doc - 'scheduler')
             || jsonb_build_object('status', 'running', 'updated_at_ms', clock.now_ms,
                                   'started_at_ms', coalesce(r.doc -> 'started_at_ms',
                                                             to_jsonb(clock.now_ms)))
  FROM chosen, clock
 WHERE r.run_id = chosen.run_id
RETURNING r.run_id, r.lease_epoch";

/// Claims up to `limit` queued runs; returns each with its new lease epoch.
///
/// A concurrent claimer taking a run on the same workspace root makes one of the two statements
/// fail with [`StoreError::Conflict`] (the workspace-lock index), never both succeed.
pub async fn claim_queued(
    pool: &Pool,
    limit: usize,
) -> Result<Vec<(String, LeaseEpoch)>, StoreError> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(CLAIM_QUEUED_SQL).await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client.query(&stmt, &[&limit]).await?;
    let mut claimed = rows
        .iter()
        .map(|r| Ok((r.try_get::<_, String>(0)?, LeaseEpoch(r.try_get(1)?))))
        .collect::<Result<Vec<_>, StoreError>>()?;
    claimed.sort();
    Ok(claimed)
}

/// Records worker activity for a claimed run (the stale reaper's input). Fenced: only the current
/// claim can keep a run alive. Touches no indexed column, so it is a HOT update.
pub async fn touch_activity(
    pool: &Pool,
    run_id: &str,
    epoch: LeaseEpoch,
) -> Result<Millis, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "UPDATE runs SET activity_at_ms = greatest(activity_at_ms, {DB_NOW_MS})
              WHERE run_id = $1 AND lease_epoch = $2 AND status IN ('running', 'pausing')
              RETURNING activity_at_ms"
        ))
        .await?;
    if let Some(row) = client.query_opt(&stmt, &[&run_id, &epoch.0]).await? {
        return ms_from_db(row.try_get(0)?, "activity_at_ms");
    }
    let current = client
        .query_opt(
            "SELECT lease_epoch, status FROM runs WHERE run_id = $1",
            &[&run_id],
        )
        .await?;
    match current {
        None => Err(StoreError::NotFound(format!("run {run_id}"))),
        Some(row) => {
            let found = LeaseEpoch(row.try_get(0)?);
            if found != epoch {
                Err(StoreError::Fenced {
                    expected: epoch,
                    found,
                })
            } else {
                let status: String = row.try_get(1)?;
                Err(StoreError::Invalid(format!(
                    "run {run_id} is {status}, not claimed: activity is not recorded"
                )))
            }
        }
    }
}

/// The earliest `next_action_at_ms` of any awaiting gate, so the gate-notifier can sleep until
/// then (or until woken) instead of polling blindly. Reads one index entry.
pub async fn next_gate_action_at(pool: &Pool) -> Result<Option<Millis>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT min(next_action_at_ms) FROM runs WHERE status = 'awaiting_approval'",
        )
        .await?;
    let v: Option<i64> = client.query_one(&stmt, &[]).await?.try_get(0)?;
    opt_ms_from_db(v, "next_action_at_ms")
}

/// The statement of [`claimed_run_ids_to_tick`] (`$1` idle ms, `$2` limit); public for `EXPLAIN`
/// tests.
pub fn claimed_run_ids_to_tick_sql() -> String {
    format!(
        "SELECT r.run_id FROM runs r
          WHERE r.status IN ('running', 'pausing')
            AND (r.activity_at_ms < {DB_NOW_MS} - $1
                 OR r.has_runtime_budget
                 OR r.automation_id IN (
                        SELECT automation_id FROM automations
                         WHERE jsonb_typeof(spec -> 'execution' -> 'max_total_runtime_ms')
                               = 'number'))
          ORDER BY r.run_id LIMIT $2"
    )
}

/// Ids of the runs holding a claim (`running` or `pausing`) that a periodic re-evaluation can
/// change, in id order: runs whose automation (live definition or the run's snapshot) sets
/// `execution.max_total_runtime_ms`, and runs without worker activity for `idle_ms` (the safety
/// net for a run left with nothing dispatched). Reads columns only: the snapshot's budget is the
/// `has_runtime_budget` column and the live definitions with a budget are found once (migration
/// V8; parsing every claimed run's document took 0.5 s per call at 100k claimed runs).
pub async fn claimed_run_ids_to_tick(
    pool: &Pool,
    idle_ms: i64,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(&claimed_run_ids_to_tick_sql())
        .await?;
    client
        .query(&stmt, &[&idle_ms, &limit])
        .await?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
}
