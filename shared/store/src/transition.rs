//! The one way a run changes: lock the row, call a pure transition, persist the row and its
//! effects in the same transaction.
//!
//! Every write path (API actions, scheduler, sweeper, gate-notifier) goes through
//! [`try_transition_run`] / [`transition_run`] for one run, or [`transition_batch`] for sweeps,
//! so the rules below hold everywhere:
//!
//! * the closure sees the run as committed, under `FOR UPDATE`, with the database clock;
//! * a fenced write whose epoch is not the row's is rejected before the closure runs;
//! * a no-op (`changed == false`) writes nothing at all;
//! * otherwise the row (hot columns recomputed from the record), the new lifecycle records, the
//!   audit drafts and the outbox events commit together or not at all;
//! * the lease epoch changes whenever the run enters or leaves a claimed status
//!   (`running`/`pausing`): entering is a new claim, leaving ends the claim, so a writer still
//!   holding the old epoch (a worker whose run was reaped, cancelled or paused) is fenced.

use crate::convert::{ms_from_db, ms_to_db};
use crate::governance::scoped_snapshot;
use crate::runs::DB_NOW_MS;
use crate::write::{prepare_write, write_runs};
use crate::{Applied, Fence, LeaseEpoch, StoreError, StoreSettings, TransitionEnv};
use deadpool_postgres::{Pool, Transaction};
use serde_json::Value;
use tandem_core::{
    AutomationLifecycleRecord, AutomationRunStatus, AutomationStopKind, AutomationV2RunRecord,
    AutomationV2Spec, Effects, Transition,
};
use tokio_postgres::Row;

/// Largest batch [`transition_batch`] processes in one transaction. Each run gets a savepoint;
/// staying under PostgreSQL's 64 cached subtransactions per backend avoids subxid overflow,
/// which would slow every other session's snapshot checks.
pub const MAX_BATCH: usize = 50;

/// A locked run row before the closure runs.
pub(crate) struct LockedRow {
    pub(crate) run_id: String,
    pub(crate) lease_epoch: LeaseEpoch,
    pub(crate) activity_at_ms: i64,
    pub(crate) doc: Value,
}

impl LockedRow {
    /// Columns 0..=3: run_id, lease_epoch, activity_at_ms, doc.
    pub(crate) fn from_row(row: &Row) -> Result<Self, StoreError> {
        Ok(Self {
            run_id: row.try_get(0)?,
            lease_epoch: LeaseEpoch(row.try_get(1)?),
            activity_at_ms: row.try_get(2)?,
            doc: row.try_get(3)?,
        })
    }
}

/// Applies an infallible transition to one run. See [`try_transition_run`].
pub async fn transition_run<T, F>(
    pool: &Pool,
    run_id: &str,
    fence: Fence,
    settings: &StoreSettings,
    f: F,
) -> Result<Applied<T>, StoreError>
where
    F: FnOnce(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<T>,
{
    try_transition_run(pool, run_id, fence, settings, |run, env| {
        Ok::<_, StoreError>(f(run, env))
    })
    .await
}

/// Applies a transition to one run in one transaction.
///
/// `f` receives the run (lifecycle history included) and a [`TransitionEnv`]; it returns a
/// [`Transition`] (usually built with [`tandem_core::update`]) or an error of the caller's type,
/// which rolls everything back. Errors: [`StoreError::NotFound`], [`StoreError::Fenced`],
/// [`StoreError::Conflict`] (e.g. the workspace lock), [`StoreError::Invalid`] (the closure
/// rewrote history or the run id), database and JSON errors.
pub async fn try_transition_run<T, E, F>(
    pool: &Pool,
    run_id: &str,
    fence: Fence,
    settings: &StoreSettings,
    f: F,
) -> Result<Applied<T>, E>
where
    E: From<StoreError>,
    F: FnOnce(&mut AutomationV2RunRecord, &TransitionEnv) -> Result<Transition<T>, E>,
{
    let mut client = pool.get().await.map_err(StoreError::from)?;
    let tx = client.transaction().await.map_err(StoreError::from)?;
    let stmt = tx
        .prepare_cached(
            "SELECT run_id, lease_epoch, activity_at_ms, doc FROM runs WHERE run_id = $1 FOR UPDATE",
        )
        .await
        .map_err(StoreError::from)?;
    let row = tx
        .query_opt(&stmt, &[&run_id])
        .await
        .map_err(StoreError::from)?
        .ok_or_else(|| StoreError::NotFound(format!("run {run_id}")))?;
    let locked = LockedRow::from_row(&row)?;
    let applied = apply_locked(&tx, locked, fence, settings, f).await?;
    if applied.changed {
        tx.commit().await.map_err(StoreError::from)?;
    } else {
        tx.rollback().await.map_err(StoreError::from)?;
    }
    Ok(applied)
}

/// Which runs a sweep batch selects. Each variant is one indexed statement with the status
/// spelled literally (see [`sweep_select_sql`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sweep {
    /// Queued runs, oldest first (`created_at_ms, run_id`, the claim order): the scheduler's batch
    /// claim. Entering `running` bumps the lease epoch, see the module docs.
    Queued,
    /// Awaiting runs whose `next_action_at_ms` is due at the database clock (gate-notifier).
    DueGates,
    /// Running runs without worker activity for `idle_ms` (stale reaper).
    StaleRunning { idle_ms: u64 },
    /// Runs in `status` with `stop_kind` (auto-resume of stale-reaped or guardrail-stopped runs).
    Stopped {
        status: AutomationRunStatus,
        stop_kind: AutomationStopKind,
    },
    /// Any run in `status`, least recently updated first (stuck `pausing`, retention, ...).
    InStatus(AutomationRunStatus),
    /// These runs (recovery of known ids, tests).
    Runs(Vec<String>),
}

/// The candidate select of a sweep: `$1` is the limit, `$2` the variant's parameter if any.
/// Public so tests and benchmarks can `EXPLAIN` the exact statements.
pub fn sweep_select_sql(sweep: &Sweep) -> String {
    const COLS: &str = "SELECT r.run_id, r.lease_epoch, r.activity_at_ms, r.doc FROM runs r";
    const NOW: &str = "floor(extract(epoch FROM now()) * 1000)::bigint";
    let (filter, order) = match sweep {
        Sweep::Queued => (
            "r.status = 'queued'".to_owned(),
            "r.created_at_ms, r.run_id".to_owned(),
        ),
        Sweep::DueGates => (
            format!("r.status = 'awaiting_approval' AND r.next_action_at_ms <= {NOW}"),
            "r.next_action_at_ms".to_owned(),
        ),
        Sweep::StaleRunning { .. } => (
            format!("r.status = 'running' AND r.activity_at_ms <= {NOW} - $2"),
            "r.activity_at_ms, r.run_id".to_owned(),
        ),
        Sweep::Stopped { status, stop_kind } => (
            format!(
                "r.status = '{}' AND r.stop_kind = '{}'",
                status.as_str(),
                stop_kind.as_str()
            ),
            "r.updated_at_ms".to_owned(),
        ),
        Sweep::InStatus(status) => (
            format!("r.status = '{}'", status.as_str()),
            "r.updated_at_ms".to_owned(),
        ),
        Sweep::Runs(_) => ("r.run_id = ANY($2)".to_owned(), "r.run_id".to_owned()),
    };
    format!("{COLS} WHERE {filter} ORDER BY {order} LIMIT $1 FOR UPDATE OF r SKIP LOCKED")
}

/// The outcome for one run of a batch.
#[derive(Debug)]
pub struct BatchItem<T> {
    pub run_id: String,
    /// An error here (e.g. a corrupt row or a workspace-lock conflict) was rolled back to the
    /// run's savepoint; the rest of the batch still commits.
    pub result: Result<Applied<T>, StoreError>,
}

/// Applies `f` to up to `limit` (at most [`MAX_BATCH`]) runs selected by `sweep`, in one
/// transaction, skipping rows other replicas hold (`FOR UPDATE SKIP LOCKED`), so N sweepers
/// split the work and never act on a run twice. Writes are unfenced: sweeps act on the row as
/// it is, and the closure must re-check the condition it acts on (the row is locked, so the
/// check holds until commit).
///
/// Each run is applied under its own savepoint, so one failing run does not undo the others.
/// Returns one item per selected run, unchanged ones included.
pub async fn transition_batch<T, F>(
    pool: &Pool,
    sweep: &Sweep,
    limit: usize,
    settings: &StoreSettings,
    mut f: F,
) -> Result<Vec<BatchItem<T>>, StoreError>
where
    F: FnMut(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<T>,
{
    let limit = i64::try_from(limit.min(MAX_BATCH)).unwrap_or(1);
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut client = pool.get().await?;
    let mut tx = client.transaction().await?;
    let stmt = tx.prepare_cached(&sweep_select_sql(sweep)).await?;
    let rows = match sweep {
        Sweep::StaleRunning { idle_ms } => {
            let idle = ms_to_db(*idle_ms, "idle_ms")?;
            tx.query(&stmt, &[&limit, &idle]).await?
        }
        Sweep::Runs(ids) => tx.query(&stmt, &[&limit, ids]).await?,
        Sweep::Queued | Sweep::DueGates | Sweep::Stopped { .. } | Sweep::InStatus(_) => {
            tx.query(&stmt, &[&limit]).await?
        }
    };
    let mut items = Vec::with_capacity(rows.len());
    let mut any_changed = false;
    for row in &rows {
        let locked = match LockedRow::from_row(row) {
            Ok(l) => l,
            Err(e) => {
                let run_id = row.try_get::<_, String>(0).unwrap_or_default();
                items.push(BatchItem {
                    run_id,
                    result: Err(e),
                });
                continue;
            }
        };
        let run_id = locked.run_id.clone();
        let sp = tx.savepoint("tandem_batch_item").await?;
        let result = apply_locked(&sp, locked, Fence::Unfenced, settings, |run, env| {
            Ok::<_, StoreError>(f(run, env))
        })
        .await;
        match &result {
            Ok(a) if a.changed => {
                sp.commit().await?;
                any_changed = true;
            }
            Ok(_) => sp.rollback().await?,
            Err(e) => {
                tracing::warn!(run_id = %run_id, error = %e, "batch transition failed; rolled back");
                sp.rollback().await?;
            }
        }
        items.push(BatchItem { run_id, result });
    }
    if any_changed {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(items)
}

/// Loads the environment, runs the closure and persists a change; the row is already locked.
pub(crate) async fn apply_locked<T, E, F>(
    tx: &Transaction<'_>,
    locked: LockedRow,
    fence: Fence,
    settings: &StoreSettings,
    f: F,
) -> Result<Applied<T>, E>
where
    E: From<StoreError>,
    F: FnOnce(&mut AutomationV2RunRecord, &TransitionEnv) -> Result<Transition<T>, E>,
{
    if let Fence::Epoch(expected) = fence
        && expected != locked.lease_epoch
    {
        return Err(StoreError::Fenced {
            expected,
            found: locked.lease_epoch,
        }
        .into());
    }
    let (mut run, env) = load_env(tx, locked, settings).await?;
    let before = run.clone();
    let transition = f(&mut run, &env)?;
    if !transition.changed {
        return Ok(Applied {
            outcome: transition.outcome,
            changed: false,
            run: before,
            lease_epoch: env.lease_epoch,
            now_ms: env.now_ms,
            outbox_ids: Vec::new(),
            effects: Effects::default(),
        });
    }
    let (lease_epoch, outbox_ids) = persist(tx, &before, &run, &transition, &env, settings).await?;
    Ok(Applied {
        outcome: transition.outcome,
        changed: true,
        run,
        lease_epoch,
        now_ms: env.now_ms,
        outbox_ids,
        effects: transition.effects,
    })
}

/// Reads the clock (after the lock), the lifecycle history and the live automation in one round
/// trip, plus governance when asked for.
async fn load_env(
    tx: &Transaction<'_>,
    locked: LockedRow,
    settings: &StoreSettings,
) -> Result<(AutomationV2RunRecord, TransitionEnv), StoreError> {
    let mut run: AutomationV2RunRecord = serde_json::from_value(locked.doc)?;
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {DB_NOW_MS},
                    coalesce((SELECT jsonb_agg(record ORDER BY id) FROM run_lifecycle
                               WHERE run_id = $1), '[]'::jsonb),
                    (SELECT spec FROM automations WHERE automation_id = $2)"
        ))
        .await?;
    let row = tx
        .query_one(&stmt, &[&locked.run_id, &run.automation_id])
        .await?;
    let now_ms = ms_from_db(row.try_get(0)?, "database clock")?;
    run.checkpoint.lifecycle_history =
        serde_json::from_value::<Vec<AutomationLifecycleRecord>>(row.try_get(1)?)?;
    let live: Option<Value> = row.try_get(2)?;
    let (automation, automation_is_live) = match live {
        Some(spec) => (
            Some(serde_json::from_value::<AutomationV2Spec>(spec)?),
            true,
        ),
        None => (run.automation_snapshot.clone(), false),
    };
    // Scoped to the agents of both the live definition and the run's snapshot: the claim decides
    // with the snapshot (spec §3.4), the executor and the auto-resume sweeps with the live one.
    let governance = if settings.load_governance {
        let specs: Vec<&AutomationV2Spec> = automation
            .iter()
            .chain(run.automation_snapshot.iter())
            .collect();
        Some(scoped_snapshot(tx, &specs, now_ms).await?)
    } else {
        None
    };
    let env = TransitionEnv {
        now_ms,
        lease_epoch: locked.lease_epoch,
        activity_at_ms: ms_from_db(locked.activity_at_ms, "activity_at_ms")?,
        automation,
        automation_is_live,
        governance,
    };
    Ok((run, env))
}

/// Writes a changed run: row, new lifecycle records, audit drafts, outbox events.
async fn persist<T>(
    tx: &Transaction<'_>,
    before: &AutomationV2RunRecord,
    run: &AutomationV2RunRecord,
    transition: &Transition<T>,
    env: &TransitionEnv,
    settings: &StoreSettings,
) -> Result<(LeaseEpoch, Vec<i64>), StoreError> {
    let write = prepare_write(before, run, &transition.effects, env, settings)?;
    let lease_epoch = write.lease_epoch;
    let mut ids = write_runs(tx, &[write], env.now_ms).await?;
    Ok((lease_epoch, ids.pop().unwrap_or_default()))
}
