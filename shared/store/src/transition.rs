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

use std::collections::HashMap;

use crate::convert::{attach_history, json_text, ms_from_db, ms_to_db};
use crate::governance::scoped_snapshot;
use crate::outbox::OutboxRow;
use crate::runs::DB_NOW_MS;
use crate::write::{OutboxRelay, prepare_write, write_runs};
use crate::{Applied, Fence, LeaseEpoch, StoreError, StoreSettings, TransitionEnv};
use deadpool_postgres::{Pool, Transaction};
use serde_json::value::RawValue;
use std::sync::Arc;
use tandem_core::{
    AutomationRunStatus, AutomationStopKind, AutomationV2RunRecord, AutomationV2Spec, Effects,
    Millis, Transition,
};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

/// Largest batch [`transition_batch`] processes in one transaction. The batch is written with
/// set statements, so the bound only keeps lock hold times short; only when that write fails does
/// each run get a savepoint (more than 64 of them overflow PostgreSQL's per-backend subxid cache,
/// a cost paid in that rare fallback only).
pub const MAX_BATCH: usize = 500;

/// A locked run row before the closure runs.
pub(crate) struct LockedRow {
    pub(crate) run_id: String,
    pub(crate) lease_epoch: LeaseEpoch,
    pub(crate) activity_at_ms: i64,
    /// `runs.doc` as stored (text; parsed only for runs a decision needs).
    pub(crate) doc: Box<RawValue>,
}

impl LockedRow {
    /// Columns 0..=3: run_id, lease_epoch, activity_at_ms, doc.
    pub(crate) fn from_row(row: &Row) -> Result<Self, StoreError> {
        Ok(Self {
            run_id: row.try_get(0)?,
            lease_epoch: LeaseEpoch(row.try_get(1)?),
            activity_at_ms: row.try_get(2)?,
            doc: json_text(row, 3)?
                .ok_or_else(|| StoreError::Corrupt("a run has no doc".into()))?,
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
    /// An error here (e.g. a corrupt row or a workspace-lock conflict) left this run unwritten;
    /// the rest of the batch still commits.
    pub result: Result<Applied<T>, StoreError>,
}

/// Applies `f` to up to `limit` (at most [`MAX_BATCH`]) runs selected by `sweep`, in one
/// transaction, skipping rows other replicas hold (`FOR UPDATE SKIP LOCKED`), so N sweepers
/// split the work and never act on a run twice. Writes are unfenced: sweeps act on the row as
/// it is, and the closure must re-check the condition it acts on (the row is locked, so the
/// check holds until commit).
///
/// The changed runs are written with set statements (see [`write_changed`]): one failing run does
/// not undo the others. Returns one item per selected run, unchanged ones included.
pub async fn transition_batch<T, F>(
    pool: &Pool,
    sweep: &Sweep,
    limit: usize,
    settings: &StoreSettings,
    f: F,
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
    let (locked, mut unreadable) = locked_rows(&rows);
    let (mut items, any_changed, _) =
        apply_rows(&mut tx, locked, settings, false, OutboxRelay::Claimed, f).await?;
    items.append(&mut unreadable);
    if any_changed {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(items)
}

/// Applies a transition to each of `run_ids` in one transaction, waiting for row locks (in run id
/// order, so concurrent callers cannot deadlock). For work that must reach these runs, like task
/// results; sweeps use [`transition_batch`], which skips locked rows.
///
/// `bump_activity`: every changed run's `activity_at_ms` moves to the database clock (a task
/// result is worker activity). Items come in run id order; an unknown run is a
/// [`StoreError::NotFound`] item.
pub async fn transition_runs<T, F>(
    pool: &Pool,
    run_ids: &[String],
    settings: &StoreSettings,
    bump_activity: bool,
    f: F,
) -> Result<Vec<BatchItem<T>>, StoreError>
where
    F: FnMut(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<T>,
{
    let (items, _) = lock_and_apply(
        pool,
        run_ids,
        settings,
        bump_activity,
        OutboxRelay::Claimed,
        f,
    )
    .await?;
    Ok(items)
}

/// [`transition_runs`] for a writer that publishes the outbox rows of these runs itself right
/// after the commit: rows of runs with no older unpublished row are inserted already leased to
/// it for `relay_lease` and returned (committed, in id order) for it to publish (then
/// `mark_outbox_published`); the other runs' rows wait for a relay claim as usual
/// (`claim_outbox_for_runs`).
pub async fn transition_runs_relayed<T, F>(
    pool: &Pool,
    run_ids: &[String],
    settings: &StoreSettings,
    bump_activity: bool,
    relay_lease: std::time::Duration,
    f: F,
) -> Result<(Vec<BatchItem<T>>, Vec<OutboxRow>), StoreError>
where
    F: FnMut(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<T>,
{
    lock_and_apply(
        pool,
        run_ids,
        settings,
        bump_activity,
        OutboxRelay::Writer(relay_lease),
        f,
    )
    .await
}

async fn lock_and_apply<T, F>(
    pool: &Pool,
    run_ids: &[String],
    settings: &StoreSettings,
    bump_activity: bool,
    relay: OutboxRelay,
    f: F,
) -> Result<(Vec<BatchItem<T>>, Vec<OutboxRow>), StoreError>
where
    F: FnMut(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<T>,
{
    let mut ids: Vec<&str> = run_ids.iter().map(String::as_str).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut client = pool.get().await?;
    let mut tx = client.transaction().await?;
    let stmt = tx
        .prepare_cached(
            "SELECT run_id, lease_epoch, activity_at_ms, doc FROM runs
              WHERE run_id = ANY($1) ORDER BY run_id FOR UPDATE",
        )
        .await?;
    let rows = tx.query(&stmt, &[&ids]).await?;
    let (locked, mut unreadable) = locked_rows(&rows);
    let (mut items, any_changed, leased) =
        apply_rows(&mut tx, locked, settings, bump_activity, relay, f).await?;
    items.append(&mut unreadable);
    if any_changed {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    for id in ids {
        if !items.iter().any(|i| i.run_id == id) {
            items.push(BatchItem {
                run_id: id.to_owned(),
                result: Err(StoreError::NotFound(format!("run {id}"))),
            });
        }
    }
    items.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    Ok((items, leased))
}

/// Splits selected rows into locked rows and report items for rows that could not be read.
fn locked_rows<T>(rows: &[Row]) -> (Vec<LockedRow>, Vec<BatchItem<T>>) {
    let mut locked = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for row in rows {
        match LockedRow::from_row(row) {
            Ok(l) => locked.push(l),
            Err(e) => unreadable.push(BatchItem {
                run_id: row.try_get::<_, String>(0).unwrap_or_default(),
                result: Err(e),
            }),
        }
    }
    (locked, unreadable)
}

/// A run and what its transition may read, loaded for a set of locked rows at once.
pub(crate) struct LoadedRun {
    pub(crate) run_id: String,
    pub(crate) loaded: Result<(AutomationV2RunRecord, TransitionEnv), StoreError>,
}

/// The lifecycle history of each run of `$1` (runs without records are absent), and the database
/// clock (always one row: the clock with a NULL run id when no run has records).
fn histories_sql() -> String {
    format!(
        "SELECT h.run_id, h.records, {DB_NOW_MS}
           FROM (SELECT 1) one
           LEFT JOIN (SELECT run_id, jsonb_agg(record ORDER BY id) AS records
                        FROM run_lifecycle WHERE run_id = ANY($1) GROUP BY run_id) h ON true"
    )
}

/// [`load_env`] for many locked rows in three set queries (histories and clock, live
/// automations, governance of all their agents). A run that cannot be read is an error item;
/// the others are unaffected.
pub(crate) async fn load_envs(
    tx: &Transaction<'_>,
    rows: Vec<LockedRow>,
    settings: &StoreSettings,
) -> Result<Vec<LoadedRun>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    // Each doc parsed straight into a record (a doc that does not parse is that run's error);
    // the automations the records name are read with the histories (pipelined: one round trip).
    let mut parsed: Vec<(LockedRow, Result<AutomationV2RunRecord, StoreError>)> = rows
        .into_iter()
        .map(|l| {
            let run = serde_json::from_str::<AutomationV2RunRecord>(l.doc.get())
                .map_err(StoreError::from);
            (l, run)
        })
        .collect();
    let ids: Vec<&str> = parsed.iter().map(|(l, _)| l.run_id.as_str()).collect();
    let mut automation_ids: Vec<&str> = parsed
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|r| r.automation_id.as_str()))
        .collect();
    automation_ids.sort_unstable();
    automation_ids.dedup();
    let histories_stmt = tx.prepare_cached(&histories_sql()).await?;
    let automations_stmt = tx
        .prepare_cached("SELECT automation_id, spec FROM automations WHERE automation_id = ANY($1)")
        .await?;
    let history_params: [&(dyn ToSql + Sync); 1] = [&ids];
    let automation_params: [&(dyn ToSql + Sync); 1] = [&automation_ids];
    let (history_rows, automation_rows) = futures::join!(
        tx.query(&histories_stmt, &history_params),
        tx.query(&automations_stmt, &automation_params)
    );
    let mut histories: HashMap<String, Box<RawValue>> = HashMap::with_capacity(parsed.len());
    let mut now_ms: Option<Millis> = None;
    for r in history_rows? {
        now_ms = Some(ms_from_db(r.try_get(2)?, "database clock")?);
        if let (Some(id), Some(records)) = (r.try_get::<_, Option<String>>(0)?, json_text(&r, 1)?) {
            histories.insert(id, records);
        }
    }
    let now_ms =
        now_ms.ok_or_else(|| StoreError::Invalid("the history query returned no row".into()))?;
    let mut live: HashMap<String, Result<Arc<AutomationV2Spec>, String>> = HashMap::new();
    for r in automation_rows? {
        let spec = json_text(&r, 1)?
            .ok_or_else(|| "no spec".to_owned())
            .and_then(|t| {
                serde_json::from_str::<AutomationV2Spec>(t.get()).map_err(|e| e.to_string())
            });
        live.insert(r.try_get(0)?, spec.map(Arc::new));
    }
    for (l, run) in &mut parsed {
        if let Ok(r) = run
            && let Err(e) = attach_history(r, histories.remove(&l.run_id).as_deref())
        {
            *run = Err(e);
        }
    }
    // One snapshot scoped to the agents of every run's live definition and snapshot: each run
    // looks up its own agents in it.
    let governance = if settings.load_governance {
        let specs: Vec<&AutomationV2Spec> = live
            .values()
            .filter_map(|s| s.as_deref().ok())
            .chain(
                parsed
                    .iter()
                    .filter_map(|(_, r)| r.as_ref().ok()?.automation_snapshot.as_deref()),
            )
            .collect();
        Some(Arc::new(scoped_snapshot(tx, &specs, now_ms).await?))
    } else {
        None
    };

    let mut out = Vec::with_capacity(parsed.len());
    for (locked, run) in parsed {
        let loaded = run.and_then(|run| {
            let (automation, automation_is_live) = match live.get(&run.automation_id) {
                Some(Ok(spec)) => (Some(Arc::clone(spec)), true),
                Some(Err(e)) => {
                    return Err(StoreError::Corrupt(format!(
                        "automation {} has an unreadable spec: {e}",
                        run.automation_id
                    )));
                }
                None => (run.automation_snapshot.clone(), false),
            };
            let env = TransitionEnv {
                now_ms,
                lease_epoch: locked.lease_epoch,
                activity_at_ms: ms_from_db(locked.activity_at_ms, "activity_at_ms")?,
                automation,
                automation_is_live,
                governance: governance.clone(),
            };
            Ok((run, env))
        });
        out.push(LoadedRun {
            run_id: locked.run_id,
            loaded,
        });
    }
    Ok(out)
}

/// A changed run between its transition and its write.
pub(crate) struct Changed<T> {
    pub(crate) before: AutomationV2RunRecord,
    pub(crate) run: AutomationV2RunRecord,
    pub(crate) env: TransitionEnv,
    pub(crate) transition: Transition<T>,
}

/// A changed run's epoch after the write and its outbox ids, or why it was not written.
pub(crate) type WriteResult = Result<(LeaseEpoch, Vec<i64>), StoreError>;

/// Writes changed runs with set statements under one savepoint; when that fails (a constraint,
/// a trigger, a value the database refuses), each run is written under its own savepoint so only
/// the failing ones are left out. Returns, per run, its epoch and outbox ids or its error, and
/// the outbox rows inserted leased to the writer (with [`OutboxRelay::Writer`]).
pub(crate) async fn write_changed<T>(
    tx: &mut Transaction<'_>,
    changed: &mut [Changed<T>],
    settings: &StoreSettings,
    bump_activity: bool,
    relay: OutboxRelay,
) -> Result<(Vec<WriteResult>, Vec<OutboxRow>), StoreError> {
    let mut results: Vec<Option<WriteResult>> = Vec::with_capacity(changed.len());
    let mut writes = Vec::with_capacity(changed.len());
    let mut slots = Vec::with_capacity(changed.len());
    let now_ms = changed.first().map(|c| c.env.now_ms);
    for (i, c) in changed.iter_mut().enumerate() {
        match prepare_write(
            &c.before,
            &mut c.run,
            &c.transition.effects,
            &c.env,
            settings,
            bump_activity,
        ) {
            Ok(w) => {
                writes.push(w);
                slots.push(i);
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let Some(now_ms) = now_ms else {
        return Ok((Vec::new(), Vec::new()));
    };
    let mut leased = Vec::new();
    // The savepoint goes out in the same round trip as the writes (pipelined, executed in
    // order). It is left in place when they succeed: the commit releases it.
    let (savepoint, written) = futures::join!(
        tx.batch_execute("SAVEPOINT tandem_set_write"),
        write_runs(tx, &writes, now_ms, relay)
    );
    savepoint?;
    match written {
        Ok(inserted) => {
            for ((slot, w), ids) in slots.iter().zip(&writes).zip(inserted.ids) {
                results[*slot] = Some(Ok((w.lease_epoch, ids)));
            }
            leased = inserted.leased;
        }
        Err(e) if e.is_connection() => return Err(e),
        Err(e) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT tandem_set_write")
                .await?;
            tracing::warn!(error = %e, runs = writes.len(), "set write failed; writing run by run");
            for (slot, w) in slots.iter().zip(writes) {
                let sp = tx.savepoint("tandem_run_write").await?;
                let epoch = w.lease_epoch;
                match write_runs(&sp, &[w], now_ms, relay).await {
                    Ok(mut inserted) => {
                        sp.commit().await?;
                        let ids = inserted.ids.pop().unwrap_or_default();
                        results[*slot] = Some(Ok((epoch, ids)));
                        leased.append(&mut inserted.leased);
                    }
                    Err(e) if e.is_connection() => return Err(e),
                    Err(e) => {
                        sp.rollback().await?;
                        results[*slot] = Some(Err(e));
                    }
                }
            }
        }
    }
    let results = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(StoreError::Invalid("run not written".into()))))
        .collect();
    Ok((results, leased))
}

/// Loads, transitions and writes a set of locked rows (see [`load_envs`], [`write_changed`]).
/// Returns the items in row order and whether anything was written.
async fn apply_rows<T, F>(
    tx: &mut Transaction<'_>,
    rows: Vec<LockedRow>,
    settings: &StoreSettings,
    bump_activity: bool,
    relay: OutboxRelay,
    mut f: F,
) -> Result<(Vec<BatchItem<T>>, bool, Vec<OutboxRow>), StoreError>
where
    F: FnMut(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<T>,
{
    enum Step<T> {
        Done(Box<BatchItem<T>>),
        Write(String, usize),
    }
    let loaded = load_envs(tx, rows, settings).await?;
    let mut steps = Vec::with_capacity(loaded.len());
    let mut changed: Vec<Changed<T>> = Vec::new();
    for LoadedRun { run_id, loaded } in loaded {
        let (mut run, env) = match loaded {
            Ok(v) => v,
            Err(e) => {
                steps.push(Step::Done(Box::new(BatchItem {
                    run_id,
                    result: Err(e),
                })));
                continue;
            }
        };
        let before = run.clone();
        let transition = f(&mut run, &env);
        if !transition.changed {
            steps.push(Step::Done(Box::new(BatchItem {
                run_id,
                result: Ok(Applied {
                    outcome: transition.outcome,
                    changed: false,
                    run: before,
                    lease_epoch: env.lease_epoch,
                    now_ms: env.now_ms,
                    outbox_ids: Vec::new(),
                    effects: Effects::default(),
                }),
            })));
            continue;
        }
        steps.push(Step::Write(run_id, changed.len()));
        changed.push(Changed {
            before,
            run,
            env,
            transition,
        });
    }
    let (written, leased) = write_changed(tx, &mut changed, settings, bump_activity, relay).await?;
    let any_changed = written.iter().any(Result::is_ok);
    let mut changed: Vec<Option<(Changed<T>, WriteResult)>> =
        changed.into_iter().zip(written).map(Some).collect();
    let items = steps
        .into_iter()
        .map(|step| match step {
            Step::Done(item) => *item,
            Step::Write(run_id, i) => {
                let result = match changed.get_mut(i).and_then(Option::take) {
                    Some((c, Ok((lease_epoch, outbox_ids)))) => Ok(Applied {
                        outcome: c.transition.outcome,
                        changed: true,
                        run: c.run,
                        lease_epoch,
                        now_ms: c.env.now_ms,
                        outbox_ids,
                        effects: c.transition.effects,
                    }),
                    Some((_, Err(e))) => Err(e),
                    None => Err(StoreError::Invalid("run transition lost".into())),
                };
                BatchItem { run_id, result }
            }
        })
        .collect();
    Ok((items, any_changed, leased))
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
    let (lease_epoch, outbox_ids) =
        persist(tx, &before, &mut run, &transition, &env, settings).await?;
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
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {DB_NOW_MS},
                    (SELECT jsonb_agg(record ORDER BY id) FROM run_lifecycle WHERE run_id = $1),
                    (SELECT spec FROM automations WHERE automation_id = $2)"
        ))
        .await?;
    let mut run: AutomationV2RunRecord = serde_json::from_str(locked.doc.get())?;
    let row = tx
        .query_one(&stmt, &[&locked.run_id, &run.automation_id])
        .await?;
    let now_ms = ms_from_db(row.try_get(0)?, "database clock")?;
    attach_history(&mut run, json_text(&row, 1)?.as_deref())?;
    let (automation, automation_is_live) = match json_text(&row, 2)? {
        Some(spec) => (
            Some(Arc::new(serde_json::from_str::<AutomationV2Spec>(
                spec.get(),
            )?)),
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
            .map(|s| &**s)
            .collect();
        Some(Arc::new(scoped_snapshot(tx, &specs, now_ms).await?))
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
    run: &mut AutomationV2RunRecord,
    transition: &Transition<T>,
    env: &TransitionEnv,
    settings: &StoreSettings,
) -> Result<(LeaseEpoch, Vec<i64>), StoreError> {
    let write = prepare_write(before, run, &transition.effects, env, settings, false)?;
    let lease_epoch = write.lease_epoch;
    let mut inserted = write_runs(tx, &[write], env.now_ms, OutboxRelay::Claimed).await?;
    Ok((lease_epoch, inserted.ids.pop().unwrap_or_default()))
}
