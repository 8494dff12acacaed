//! The scheduler's batch claim (spec §3.4; DESIGN §4 guarantees 1 and 4).
//!
//! One transaction per batch, serialized fleet-wide on a transaction-scoped advisory lock
//! ([`CLAIM_LOCK_KEY`]) so that the capacity count and the workspace-lock check cannot be raced by
//! another replica's claim:
//!
//! 1. `pg_advisory_xact_lock(CLAIM_LOCK_KEY)`; then `count(*)` of `running` runs (upstream counts
//!    capacity on `running` only; `pausing` holds the workspace lock but not capacity). Free
//!    capacity is `TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS − running`.
//! 2. The oldest queued runs (`created_at_ms, run_id`, the `runs_queued_idx` order), `FOR UPDATE
//!    SKIP LOCKED` so a run another writer holds (an operator cancelling it, say) is skipped, not
//!    waited for.
//! 3. The workspace roots among them that a `running|pausing` run holds (one indexed probe of
//!    `runs_workspace_lock_idx`).
//! 4. Per candidate, in order, as upstream's admission does: a held root (or one claimed earlier in
//!    this batch) → wait with `workspace_lock` and `resource_key` = the root; no capacity left →
//!    wait with `capacity`; otherwise core [`claim_run`] on the locked row with a governance
//!    snapshot read in this transaction (runtime-context failure, spend-pause launch hold, or
//!    `queued → running` with `lease_epoch + 1`), and for a run that became running the caller's
//!    dispatch transition (`dispatch_ready_nodes`) in the same transaction, fenced by the new epoch.
//! 5. A waiting run's `scheduler.queue_reason`/`resource_key` is written only when it differs from
//!    the stored one, so an idle fleet at capacity writes nothing.
//!
//! Each candidate runs under its own savepoint, so one failing run (a corrupt row, a workspace-lock
//! conflict from `runs_workspace_lock_idx`, which stays the backstop) does not undo the others.
//! The lock is held for one short transaction; a replica that finds nothing queued does not take
//! it at all.

use std::collections::{HashMap, HashSet};

use crate::convert::{ms_from_db, run_from_doc};
use crate::governance::scoped_snapshot;
use crate::runs::DB_NOW_MS;
use crate::transition::{LockedRow, apply_locked};
use crate::write::{prepare_write, write_runs};
use crate::{Applied, Fence, LeaseEpoch, StoreError, StoreSettings, TransitionEnv};
use deadpool_postgres::{Client, Pool, Transaction};
use serde_json::Value;
use tandem_core::claim::{ClaimOutcome, claim_run};
use tandem_core::governance::GovernanceSnapshot;
use tandem_core::{
    AutomationV2RunRecord, AutomationV2Spec, Effects, Millis, QueueReason, SchedulerMetadata,
    Transition, update,
};
use tokio_postgres::Row;

/// Advisory lock key serializing claim transactions fleet-wide ("tandemcl" in ASCII).
pub const CLAIM_LOCK_KEY: i64 = 0x7461_6e64_656d_636c;

/// Most candidates one claim transaction examines. The set-based claim writes a whole batch with
/// a handful of statements, so the bound only keeps the fleet-wide lock's hold time short.
pub const MAX_CLAIM_BATCH: usize = 512;

/// Candidates of the run-by-run fallback: each gets a savepoint, and PostgreSQL caches 64
/// subtransaction ids per backend before snapshots of every session slow down.
pub const ISOLATED_CLAIM_BATCH: usize = 50;

/// The candidate select of [`claim_runs`]: `$1` is the batch size. Public for `EXPLAIN` tests.
pub const CLAIM_CANDIDATES_SQL: &str = "
    SELECT r.run_id, r.lease_epoch, r.activity_at_ms, r.doc, r.workspace_root
      FROM runs r
     WHERE r.status = 'queued'
     ORDER BY r.created_at_ms, r.run_id
     LIMIT $1
       FOR UPDATE OF r SKIP LOCKED";

/// The lifecycle history of each run of `$1` (runs without records are absent), and the database
/// clock (always one row: the clock with a NULL run id when no run has records).
fn claim_env_sql() -> String {
    format!(
        "SELECT h.run_id, h.records, {DB_NOW_MS}
           FROM (SELECT 1) one
           LEFT JOIN (SELECT run_id, jsonb_agg(record ORDER BY id) AS records
                        FROM run_lifecycle WHERE run_id = ANY($1) GROUP BY run_id) h ON true"
    )
}

/// The live definitions of a set of automations.
const AUTOMATIONS_SQL: &str =
    "SELECT automation_id, spec FROM automations WHERE automation_id = ANY($1)";

/// Roots (of `$1`) held by a run that holds the workspace lock.
const HELD_ROOTS_SQL: &str = "
    SELECT DISTINCT workspace_root FROM runs
     WHERE status IN ('running', 'pausing') AND workspace_root = ANY($1)";

/// How much a claim may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimLimits {
    /// `TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS`: `running` runs allowed fleet-wide.
    pub max_concurrent_runs: u32,
    /// Queued runs examined per transaction (clamped to [`MAX_CLAIM_BATCH`]).
    pub batch: usize,
}

/// What happened to one examined queued run.
#[derive(Debug)]
pub enum ClaimItemOutcome<D> {
    /// `queued → running` (lease epoch + 1), then the dispatch transition, in one transaction.
    /// `dispatch.lease_epoch` is the row's epoch at commit (dispatch may already have moved the
    /// run on, e.g. to `awaiting_approval`, which ends the claim and bumps it again).
    Claimed {
        claim: Box<Applied<ClaimOutcome>>,
        dispatch: Box<Applied<D>>,
    },
    /// The claim decided something else: [`ClaimOutcome::RuntimeContextMissing`] (failed) or
    /// [`ClaimOutcome::LaunchHeld`] (paused, `guardrail_stopped`).
    Settled(Box<Applied<ClaimOutcome>>),
    /// The run waits. `recorded`: its `scheduler.queue_reason` changed and was written.
    Waiting {
        reason: QueueReason,
        resource_key: Option<String>,
        recorded: bool,
    },
}

/// One examined run.
#[derive(Debug)]
pub struct ClaimItem<D> {
    pub run_id: String,
    /// An error was rolled back to the run's savepoint; the run stays queued.
    pub result: Result<ClaimItemOutcome<D>, StoreError>,
}

/// The outcome of one [`claim_runs`] transaction.
#[derive(Debug)]
pub struct ClaimReport<D> {
    /// `running` runs fleet-wide when the claim started (under the claim lock).
    pub running_before: i64,
    /// Queued runs examined, in claim order.
    pub items: Vec<ClaimItem<D>>,
    /// The candidate select returned a full batch: more queued runs may be waiting.
    pub full_batch: bool,
}

impl<D> Default for ClaimReport<D> {
    fn default() -> Self {
        Self {
            running_before: 0,
            items: Vec::new(),
            full_batch: false,
        }
    }
}

impl<D> ClaimReport<D> {
    /// Runs that became running.
    pub fn claimed(&self) -> usize {
        self.items
            .iter()
            .filter(|i| matches!(i.result, Ok(ClaimItemOutcome::Claimed { .. })))
            .count()
    }

    /// Runs whose transaction wrote outbox rows (to relay right after commit).
    pub fn runs_with_outbox(&self) -> Vec<String> {
        self.items
            .iter()
            .filter(|i| match &i.result {
                Ok(ClaimItemOutcome::Claimed { claim, dispatch }) => {
                    !claim.outbox_ids.is_empty() || !dispatch.outbox_ids.is_empty()
                }
                Ok(ClaimItemOutcome::Settled(a)) => !a.outbox_ids.is_empty(),
                _ => false,
            })
            .map(|i| i.run_id.clone())
            .collect()
    }
}

/// Whether the stored doc already says the run waits for `reason` on `key`.
fn same_wait(doc: &Value, reason: QueueReason, key: Option<&str>) -> bool {
    let Some(meta) = doc.get("scheduler") else {
        return false;
    };
    let want = match serde_json::to_value(reason) {
        Ok(v) => v,
        Err(_) => return false,
    };
    meta.get("queue_reason") == Some(&want)
        && meta.get("resource_key").and_then(Value::as_str) == key
}

/// Records why a queued run waits (spec §3.0: persisted only when it differs).
fn wait_transition(
    run: &mut AutomationV2RunRecord,
    env: &TransitionEnv,
    reason: QueueReason,
    key: Option<String>,
) -> Transition<()> {
    let unchanged = run
        .scheduler
        .as_ref()
        .is_some_and(|s| s.queue_reason == Some(reason) && s.resource_key == key);
    if unchanged {
        return Transition::unchanged(());
    }
    update(run, env.now_ms, |run, _| {
        let tenant = run.tenant_context.clone();
        let queued_at_ms = run.updated_at_ms;
        let meta = run.scheduler.get_or_insert(SchedulerMetadata {
            tenant_context: tenant,
            queue_reason: None,
            resource_key: None,
            rate_limited_provider: None,
            queued_at_ms,
        });
        meta.queue_reason = Some(reason);
        meta.resource_key = key;
        meta.rate_limited_provider = None;
    })
}

/// Claims queued runs fleet-wide; see the module documentation for the algorithm.
///
/// `dispatch` runs on each run that became `running`, with the row fenced by the new lease epoch
/// (`env.lease_epoch`); it is where the caller dispatches runnable nodes, opens gates or derives
/// completion. Its effects (tasks, events) are persisted with the claim. It must be pure: when
/// the set-based write fails, the batch is redone run by run and `dispatch` runs again.
pub async fn claim_runs<D, F>(
    pool: &Pool,
    limits: ClaimLimits,
    settings: &StoreSettings,
    mut dispatch: F,
) -> Result<ClaimReport<D>, StoreError>
where
    F: FnMut(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<D>,
{
    let batch = limits.batch.min(MAX_CLAIM_BATCH);
    if batch == 0 {
        return Ok(ClaimReport::default());
    }
    let mut client = pool.get().await?;
    // Nothing queued: do not take the fleet-wide lock at all.
    let probe = client
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM runs WHERE status = 'queued')")
        .await?;
    let any: bool = client.query_one(&probe, &[]).await?.try_get(0)?;
    if !any {
        return Ok(ClaimReport::default());
    }
    let limits = ClaimLimits { batch, ..limits };
    match claim_set(&mut client, limits, settings, &mut dispatch).await {
        Ok(report) => Ok(report),
        Err(e) if e.is_connection() => Err(e),
        Err(e) => {
            // A statement of the set-based write failed (a corrupt value, a constraint that
            // fired): redo a smaller batch with one savepoint per run, so only the bad run stays
            // behind.
            tracing::warn!(error = %e, "set-based claim failed; retrying run by run");
            let limits = ClaimLimits {
                batch: batch.min(ISOLATED_CLAIM_BATCH),
                ..limits
            };
            claim_isolated(&mut client, limits, settings, &mut dispatch).await
        }
    }
}

/// The claim transaction's opening: the fleet-wide lock, `running` count, candidates (locked),
/// and which of their workspace roots are held.
struct ClaimStart {
    running_before: i64,
    rows: Vec<Row>,
    held: HashSet<String>,
    full_batch: bool,
}

async fn claim_start(tx: &Transaction<'_>, batch: usize) -> Result<ClaimStart, StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CLAIM_LOCK_KEY])
        .await?;
    let count = tx
        .prepare_cached("SELECT count(*) FROM runs WHERE status = 'running'")
        .await?;
    let running_before: i64 = tx.query_one(&count, &[]).await?.try_get(0)?;
    let select = tx.prepare_cached(CLAIM_CANDIDATES_SQL).await?;
    let batch_i64 = i64::try_from(batch).unwrap_or(1);
    let rows = tx.query(&select, &[&batch_i64]).await?;
    let full_batch = rows.len() == batch;

    let mut roots: Vec<String> = rows
        .iter()
        .filter_map(|r| r.try_get::<_, Option<String>>(4).ok().flatten())
        .collect();
    roots.sort();
    roots.dedup();
    let mut held: HashSet<String> = HashSet::new();
    if !roots.is_empty() {
        let stmt = tx.prepare_cached(HELD_ROOTS_SQL).await?;
        for r in tx.query(&stmt, &[&roots]).await? {
            held.insert(r.try_get(0)?);
        }
    }
    Ok(ClaimStart {
        running_before,
        rows,
        held,
        full_batch,
    })
}

/// A candidate row and its workspace root; an unreadable row becomes its report item.
fn candidate_of<D>(row: &Row) -> Result<(LockedRow, Option<String>), ClaimItem<D>> {
    LockedRow::from_row(row)
        .and_then(|l| Ok((l, row.try_get::<_, Option<String>>(4)?)))
        .map_err(|e| ClaimItem {
            run_id: row.try_get::<_, String>(0).unwrap_or_default(),
            result: Err(e),
        })
}

/// Why a candidate cannot start now, if it cannot.
fn wait_reason(
    root: Option<&String>,
    held: &HashSet<String>,
    free: i64,
) -> Option<(QueueReason, Option<String>)> {
    match root {
        Some(r) if held.contains(r) => Some((QueueReason::WorkspaceLock, Some(r.clone()))),
        _ if free == 0 => Some((QueueReason::Capacity, None)),
        _ => None,
    }
}

/// Core [`claim_run`] on a locked run, then `dispatch` (with the epoch the claim gives the row)
/// when it became running. The outcome's second part is the dispatch outcome of a claimed run.
fn claim_and_dispatch<D, F>(
    run: &mut AutomationV2RunRecord,
    env: &TransitionEnv,
    dispatch: &mut F,
) -> Transition<(ClaimOutcome, Option<D>)>
where
    F: FnMut(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<D>,
{
    let empty = GovernanceSnapshot::default();
    let governance = env.governance.as_ref().unwrap_or(&empty);
    let claim = claim_run(run, env.automation.as_ref(), None, governance, env.now_ms);
    if claim.outcome != ClaimOutcome::Claimed {
        return Transition {
            outcome: (claim.outcome, None),
            changed: claim.changed,
            effects: claim.effects,
        };
    }
    let claimed_env = TransitionEnv {
        lease_epoch: LeaseEpoch(env.lease_epoch.0.saturating_add(1)),
        ..env.clone()
    };
    let dispatched = dispatch(run, &claimed_env);
    let mut effects = claim.effects;
    effects.append(dispatched.effects);
    Transition {
        outcome: (ClaimOutcome::Claimed, Some(dispatched.outcome)),
        changed: true,
        effects,
    }
}

/// Splits one persisted claim-and-dispatch into the report's item.
fn claimed_item<D>(applied: Applied<(ClaimOutcome, Option<D>)>) -> ClaimItemOutcome<D> {
    let Applied {
        outcome,
        changed,
        run,
        lease_epoch,
        now_ms,
        outbox_ids,
        effects,
    } = applied;
    match outcome {
        (outcome, Some(dispatch_outcome)) => {
            // One write, reported as its two parts; the persisted effects and outbox rows
            // belong to the dispatch part so they are handled once.
            let claim = Applied {
                outcome,
                changed,
                run: run.clone(),
                lease_epoch,
                now_ms,
                outbox_ids: Vec::new(),
                effects: Default::default(),
            };
            let dispatch = Applied {
                outcome: dispatch_outcome,
                changed,
                run,
                lease_epoch,
                now_ms,
                outbox_ids,
                effects,
            };
            ClaimItemOutcome::Claimed {
                claim: Box::new(claim),
                dispatch: Box::new(dispatch),
            }
        }
        (outcome, None) => ClaimItemOutcome::Settled(Box::new(Applied {
            outcome,
            changed,
            run,
            lease_epoch,
            now_ms,
            outbox_ids,
            effects,
        })),
    }
}

/// What the set-based claim decided for one candidate, before writing.
enum Planned<D> {
    /// Final without a write (waiting, unchanged; or an error).
    Done(ClaimItem<D>),
    Wait {
        run_id: String,
        reason: QueueReason,
        key: Option<String>,
        write: PlannedWrite<()>,
    },
    Claim {
        run_id: String,
        write: PlannedWrite<(ClaimOutcome, Option<D>)>,
    },
}

/// A changed run waiting to be written.
struct PlannedWrite<T> {
    before: AutomationV2RunRecord,
    run: AutomationV2RunRecord,
    env: TransitionEnv,
    transition: Transition<T>,
}

/// The set-based claim: decisions in memory, then one statement per table for the whole batch
/// (see `crate::write`). No savepoints, so the batch may be large.
async fn claim_set<D, F>(
    client: &mut Client,
    limits: ClaimLimits,
    settings: &StoreSettings,
    dispatch: &mut F,
) -> Result<ClaimReport<D>, StoreError>
where
    F: FnMut(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<D>,
{
    let tx = client.transaction().await?;
    let ClaimStart {
        running_before,
        rows,
        mut held,
        full_batch,
    } = claim_start(&tx, limits.batch).await?;
    let cap = i64::from(limits.max_concurrent_runs);

    // Decide who waits and who is claimed from the row alone (no parse for runs whose recorded
    // wait reason is already right), then load what the rest need in three set queries.
    struct Candidate {
        locked: LockedRow,
        root: Option<String>,
    }
    // Phase one admits provisionally: a provisional admission that settles otherwise (a launch
    // hold, say) can only make a later run wait one pass longer under its recorded reason.
    let mut provisional_free = (cap - running_before).max(0);
    let mut provisional_held = held.clone();
    let mut items: Vec<Option<ClaimItem<D>>> = Vec::with_capacity(rows.len());
    let mut candidates: Vec<(usize, Candidate)> = Vec::new();
    for row in &rows {
        let (locked, root) = match candidate_of(row) {
            Ok(v) => v,
            Err(item) => {
                items.push(Some(item));
                continue;
            }
        };
        let run_id = locked.run_id.clone();
        match &wait_reason(root.as_ref(), &provisional_held, provisional_free) {
            Some((reason, key)) if same_wait(&locked.doc, *reason, key.as_deref()) => {
                items.push(Some(ClaimItem {
                    run_id,
                    result: Ok(ClaimItemOutcome::Waiting {
                        reason: *reason,
                        resource_key: key.clone(),
                        recorded: false,
                    }),
                }));
                continue;
            }
            Some(_) => {}
            None => {
                provisional_free -= 1;
                if let Some(r) = &root {
                    provisional_held.insert(r.clone());
                }
            }
        }
        items.push(None);
        candidates.push((items.len() - 1, Candidate { locked, root }));
    }
    if candidates.is_empty() {
        tx.rollback().await?;
        return Ok(ClaimReport {
            running_before,
            items: items.into_iter().flatten().collect(),
            full_batch,
        });
    }

    let ids: Vec<&str> = candidates
        .iter()
        .map(|(_, c)| c.locked.run_id.as_str())
        .collect();
    let env_rows = tx
        .query(&tx.prepare_cached(&claim_env_sql()).await?, &[&ids])
        .await?;
    let mut history: HashMap<String, Value> = HashMap::with_capacity(env_rows.len());
    let mut now_ms: Option<Millis> = None;
    for r in &env_rows {
        now_ms = Some(ms_from_db(r.try_get(2)?, "database clock")?);
        if let Some(id) = r.try_get::<_, Option<String>>(0)? {
            history.insert(id, r.try_get(1)?);
        }
    }
    let now_ms = match now_ms {
        Some(n) => n,
        None => {
            return Err(StoreError::Invalid(
                "claim environment query returned no row".into(),
            ));
        }
    };

    // Parse every candidate, then load the automations and governance for all of them at once.
    let mut parsed: Vec<(usize, Candidate, Result<AutomationV2RunRecord, StoreError>)> =
        Vec::with_capacity(candidates.len());
    for (slot, c) in candidates {
        let lifecycle = history.remove(&c.locked.run_id).unwrap_or(Value::Null);
        let run = run_from_doc(c.locked.doc.clone(), lifecycle);
        parsed.push((slot, c, run));
    }
    let mut automation_ids: Vec<&str> = parsed
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok().map(|r| r.automation_id.as_str()))
        .collect();
    automation_ids.sort_unstable();
    automation_ids.dedup();
    let mut live: HashMap<String, AutomationV2Spec> = HashMap::new();
    let mut live_errors: HashMap<String, String> = HashMap::new();
    let stmt = tx.prepare_cached(AUTOMATIONS_SQL).await?;
    for r in tx.query(&stmt, &[&automation_ids]).await? {
        let id: String = r.try_get(0)?;
        match serde_json::from_value::<AutomationV2Spec>(r.try_get(1)?) {
            Ok(spec) => {
                live.insert(id, spec);
            }
            Err(e) => {
                live_errors.insert(id, e.to_string());
            }
        }
    }
    let governance = if settings.with_governance().load_governance {
        let specs: Vec<&AutomationV2Spec> = live
            .values()
            .chain(
                parsed
                    .iter()
                    .filter_map(|(_, _, r)| r.as_ref().ok()?.automation_snapshot.as_ref()),
            )
            .collect();
        Some(scoped_snapshot(&tx, &specs, now_ms).await?)
    } else {
        None
    };

    // Decide, in candidate order, with the same admission rules as the run-by-run path.
    let mut free = (cap - running_before).max(0);
    let mut plans: Vec<(usize, Planned<D>)> = Vec::with_capacity(parsed.len());
    for (slot, c, run) in parsed {
        let run_id = c.locked.run_id.clone();
        let mut run = match run {
            Ok(r) => r,
            Err(e) => {
                plans.push((
                    slot,
                    Planned::Done(ClaimItem {
                        run_id,
                        result: Err(e),
                    }),
                ));
                continue;
            }
        };
        if let Some(err) = live_errors.get(&run.automation_id) {
            plans.push((
                slot,
                Planned::Done(ClaimItem {
                    run_id,
                    result: Err(StoreError::Invalid(format!(
                        "automation {} has an unreadable spec: {err}",
                        run.automation_id
                    ))),
                }),
            ));
            continue;
        }
        let (automation, automation_is_live) = match live.get(&run.automation_id) {
            Some(spec) => (Some(spec.clone()), true),
            None => (run.automation_snapshot.clone(), false),
        };
        let activity_at_ms = match ms_from_db(c.locked.activity_at_ms, "activity_at_ms") {
            Ok(v) => v,
            Err(e) => {
                plans.push((
                    slot,
                    Planned::Done(ClaimItem {
                        run_id,
                        result: Err(e),
                    }),
                ));
                continue;
            }
        };
        let env = TransitionEnv {
            now_ms,
            lease_epoch: c.locked.lease_epoch,
            activity_at_ms,
            automation,
            automation_is_live,
            governance: governance.clone(),
        };
        let before = run.clone();
        if let Some((reason, key)) = wait_reason(c.root.as_ref(), &held, free) {
            let transition = wait_transition(&mut run, &env, reason, key.clone());
            if !transition.changed {
                plans.push((
                    slot,
                    Planned::Done(ClaimItem {
                        run_id,
                        result: Ok(ClaimItemOutcome::Waiting {
                            reason,
                            resource_key: key,
                            recorded: false,
                        }),
                    }),
                ));
                continue;
            }
            plans.push((
                slot,
                Planned::Wait {
                    run_id,
                    reason,
                    key,
                    write: PlannedWrite {
                        before,
                        run,
                        env,
                        transition,
                    },
                },
            ));
            continue;
        }
        let transition = claim_and_dispatch(&mut run, &env, dispatch);
        if transition.outcome.1.is_some() {
            free -= 1;
            if let Some(r) = c.root {
                held.insert(r);
            }
        }
        if !transition.changed {
            let applied = Applied {
                outcome: transition.outcome,
                changed: false,
                run: before,
                lease_epoch: env.lease_epoch,
                now_ms,
                outbox_ids: Vec::new(),
                effects: Effects::default(),
            };
            plans.push((
                slot,
                Planned::Done(ClaimItem {
                    run_id,
                    result: Ok(claimed_item(applied)),
                }),
            ));
            continue;
        }
        plans.push((
            slot,
            Planned::Claim {
                run_id,
                write: PlannedWrite {
                    before,
                    run,
                    env,
                    transition,
                },
            },
        ));
    }

    // One set-based write for every changed run.
    let mut writes = Vec::new();
    for (_, plan) in &plans {
        let w = match plan {
            Planned::Done(_) => continue,
            Planned::Wait { write, .. } => prepare_write(
                &write.before,
                &write.run,
                &write.transition.effects,
                &write.env,
                settings,
            )?,
            Planned::Claim { write, .. } => prepare_write(
                &write.before,
                &write.run,
                &write.transition.effects,
                &write.env,
                settings,
            )?,
        };
        writes.push(w);
    }
    let epochs: Vec<LeaseEpoch> = writes.iter().map(|w| w.lease_epoch).collect();
    let outbox = write_runs(&tx, &writes, now_ms).await?;
    drop(writes);
    let any_changed = !epochs.is_empty();
    let mut written = epochs.into_iter().zip(outbox);
    for (slot, plan) in plans {
        let item = match plan {
            Planned::Done(item) => item,
            Planned::Wait {
                run_id,
                reason,
                key,
                ..
            } => {
                written.next();
                ClaimItem {
                    run_id,
                    result: Ok(ClaimItemOutcome::Waiting {
                        reason,
                        resource_key: key,
                        recorded: true,
                    }),
                }
            }
            Planned::Claim { run_id, write } => {
                let (lease_epoch, outbox_ids) = written.next().ok_or_else(|| {
                    StoreError::Invalid("claim write results out of step with the plan".into())
                })?;
                let applied = Applied {
                    outcome: write.transition.outcome,
                    changed: true,
                    run: write.run,
                    lease_epoch,
                    now_ms,
                    outbox_ids,
                    effects: write.transition.effects,
                };
                ClaimItem {
                    run_id,
                    result: Ok(claimed_item(applied)),
                }
            }
        };
        if let Some(s) = items.get_mut(slot) {
            *s = Some(item);
        }
    }
    if any_changed {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(ClaimReport {
        running_before,
        items: items.into_iter().flatten().collect(),
        full_batch,
    })
}

/// The claim with one savepoint per candidate (the fallback of [`claim_runs`]).
async fn claim_isolated<D, F>(
    client: &mut Client,
    limits: ClaimLimits,
    settings: &StoreSettings,
    dispatch: &mut F,
) -> Result<ClaimReport<D>, StoreError>
where
    F: FnMut(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<D>,
{
    let with_governance = settings.with_governance();
    let plain = StoreSettings {
        load_governance: false,
        ..*settings
    };
    let mut tx = client.transaction().await?;
    let ClaimStart {
        running_before,
        rows,
        mut held,
        full_batch,
    } = claim_start(&tx, limits.batch).await?;
    let cap = i64::from(limits.max_concurrent_runs);
    let mut free = (cap - running_before).max(0);

    let mut items = Vec::with_capacity(rows.len());
    let mut any_changed = false;
    for row in &rows {
        let (locked, root) = match candidate_of(row) {
            Ok(v) => v,
            Err(item) => {
                items.push(item);
                continue;
            }
        };
        let run_id = locked.run_id.clone();

        if let Some((reason, key)) = wait_reason(root.as_ref(), &held, free) {
            if same_wait(&locked.doc, reason, key.as_deref()) {
                items.push(ClaimItem {
                    run_id,
                    result: Ok(ClaimItemOutcome::Waiting {
                        reason,
                        resource_key: key,
                        recorded: false,
                    }),
                });
                continue;
            }
            let sp = tx.savepoint("tandem_claim_wait").await?;
            let k = key.clone();
            let result = apply_locked(&sp, locked, Fence::Unfenced, &plain, |run, env| {
                Ok::<_, StoreError>(wait_transition(run, env, reason, k))
            })
            .await;
            let result = match result {
                Ok(a) => {
                    if a.changed {
                        sp.commit().await?;
                        any_changed = true;
                    } else {
                        sp.rollback().await?;
                    }
                    Ok(ClaimItemOutcome::Waiting {
                        reason,
                        resource_key: key,
                        recorded: a.changed,
                    })
                }
                Err(e) => {
                    tracing::warn!(run_id = %run_id, error = %e, "recording queue reason failed; rolled back");
                    sp.rollback().await?;
                    Err(e)
                }
            };
            items.push(ClaimItem { run_id, result });
            continue;
        }

        // Admissible: claim, and dispatch what became running, in one load and one write under
        // one savepoint. Entering `running` bumps the lease epoch by one (see `persist`), so the
        // dispatch runs with the epoch the row will carry.
        let sp = tx.savepoint("tandem_claim").await?;
        let applied = apply_locked(
            &sp,
            locked,
            Fence::Unfenced,
            &with_governance,
            |run, env| Ok::<_, StoreError>(claim_and_dispatch(run, env, dispatch)),
        )
        .await;
        let result = applied.map(|a| {
            if a.outcome.1.is_some() {
                free -= 1;
                if let Some(r) = root {
                    held.insert(r);
                }
            }
            claimed_item(a)
        });
        match &result {
            Ok(ClaimItemOutcome::Settled(a)) if !a.changed => sp.rollback().await?,
            Ok(_) => {
                sp.commit().await?;
                any_changed = true;
            }
            Err(e) => {
                tracing::warn!(run_id = %run_id, error = %e, "claim failed; rolled back, the run stays queued");
                sp.rollback().await?;
            }
        }
        items.push(ClaimItem { run_id, result });
    }
    if any_changed {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(ClaimReport {
        running_before,
        items,
        full_batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_wait_compares_reason_and_key() {
        let doc = json!({"scheduler": {"queue_reason": "workspace_lock", "resource_key": "/w"}});
        assert!(same_wait(&doc, QueueReason::WorkspaceLock, Some("/w")));
        assert!(!same_wait(&doc, QueueReason::WorkspaceLock, Some("/x")));
        assert!(!same_wait(&doc, QueueReason::Capacity, None));
        let doc = json!({"scheduler": {"queue_reason": "capacity"}});
        assert!(same_wait(&doc, QueueReason::Capacity, None));
        assert!(!same_wait(&json!({}), QueueReason::Capacity, None));
        let doc = json!({"scheduler": {"queue_reason": null}});
        assert!(!same_wait(&doc, QueueReason::Capacity, None));
    }
}
