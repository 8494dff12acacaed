//! The scheduler's batch claim (spec §3.4; DESIGN §4 guarantees 1 and 4).
//!
//! Two transactions per batch, on two connections. Only the second, one statement, is serialized
//! fleet-wide (transaction-scoped advisory lock [`CLAIM_LOCK_KEY`]); the claim itself runs
//! concurrently on every replica:
//!
//! 1. **Candidates** (the claim transaction, no fleet lock). The oldest queued runs
//!    (`created_at_ms, run_id`, the `runs_queued_idx` order), `FOR UPDATE SKIP LOCKED`, so
//!    concurrent claims take disjoint runs and a run another writer holds (an operator
//!    cancelling it, say) is skipped. None: nothing more happens (no lock, no reservation).
//! 2. **Reserve**, on a second pooled connection, beside step 3. One statement, its own
//!    transaction (a database function, migration V7): under the lock, the number of `running`
//!    runs from a trigger-maintained ledger in O(1), and the slots other claims hold reserved
//!    ([`RUNNING_COUNT_SQL`]; upstream counts capacity on `running` only; `pausing` holds the
//!    workspace lock but not capacity). Free = `TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS − running −
//!    reserved`; as many slots as there are candidates, at most the free ones, are reserved (a
//!    ledger row that expires after [`RESERVATION_SECS`]) and committed, not durably (a
//!    reservation lost in a crash only frees its slots). Sized to the locked candidates, a pass
//!    never holds slots it cannot fill, so concurrent passes (other replicas, or this one's
//!    next) share the capacity.
//! 3. The workspace roots among the candidates that a `running|pausing` run holds (one indexed
//!    probe of `runs_workspace_lock_idx`).
//! 4. Per candidate, in order, as upstream's admission does: a held root (or one claimed earlier in
//!    this batch) → wait with `workspace_lock` and `resource_key` = the root; no reserved slot
//!    left → wait with `capacity`; otherwise core [`claim_run`] on the locked row with a
//!    governance snapshot read in this transaction (runtime-context failure, spend-pause launch
//!    hold, or `queued → running` with `lease_epoch + 1`), and for a run that became running the
//!    caller's dispatch transition (`dispatch_ready_nodes`) in the same transaction, fenced by
//!    the new epoch.
//! 5. A waiting run's `scheduler.queue_reason`/`resource_key` is written only when it differs from
//!    the stored one, so an idle fleet at capacity writes nothing.
//! 6. The reservation is deleted in the same commit as the claims (whose deltas the triggers
//!    append), so another replica's reserve step sees either both or neither. The delete goes
//!    out with the loads of step 4 and only counts if the reservation still holds for
//!    [`RESERVATION_MARGIN_SECS`]; a claim whose reservation expired (and may be handed out
//!    again) rolls back: the capacity is never exceeded.
//!
//! The decisions are made in memory on the locked rows, and every changed run is written with one
//! statement per table (`crate::write`), so a batch costs a fixed number of round trips. When
//! that write fails (a corrupt row, or a workspace-lock conflict with a concurrent claim, which
//! `runs_workspace_lock_idx` rejects: the index is the lock), the runs are written one by one
//! under savepoints and only the failing run stays queued. A replica that finds nothing queued
//! takes no lock at all.

use std::collections::HashSet;
use std::time::Duration;

use crate::outbox::OutboxRow;
use crate::transition::{Changed, LoadedRun, LockedRow, WriteResult, load_envs, write_changed};
use crate::write::OutboxRelay;
use crate::{Applied, LeaseEpoch, StoreError, StoreSettings, TransitionEnv};
use deadpool_postgres::{Pool, Transaction};
use serde_json::value::RawValue;
use tandem_core::claim::{ClaimOutcome, claim_run};
use tandem_core::governance::GovernanceSnapshot;
use tandem_core::{
    AutomationV2RunRecord, Effects, QueueReason, SchedulerMetadata, Transition, update,
};
use tokio_postgres::Row;

/// Advisory lock key serializing claim transactions fleet-wide ("tandemcl" in ASCII).
pub const CLAIM_LOCK_KEY: i64 = 0x7461_6e64_656d_636c;

/// Most candidates one claim transaction examines. The set-based claim writes a whole batch with
/// a handful of statements, so the bound only keeps the fleet-wide lock's hold time short.
pub const MAX_CLAIM_BATCH: usize = 512;

/// The candidate select of [`claim_runs`]: `$1` is the batch size. Public for `EXPLAIN` tests.
pub const CLAIM_CANDIDATES_SQL: &str = "
    SELECT r.run_id, r.lease_epoch, r.activity_at_ms, r.doc, r.workspace_root
      FROM runs r
     WHERE r.status = 'queued'
     ORDER BY r.created_at_ms, r.run_id
     LIMIT $1
       FOR UPDATE OF r SKIP LOCKED";

/// The fleet-wide `running` count from the ledger of deltas (migration V4), folding the
/// committed deltas into one row as it reads them: O(deltas since the last pass), not
/// O(running), and the slots other claims have reserved and not yet used (migration V6),
/// dropping expired reservations. Only the claimer folds, under the claim lock; deltas committed
/// after this statement's snapshot stay for the next pass, so the sum is exactly what `count(*)`
/// would see. Columns: running, reserved. (The SQL lives in migration V7, where the reservation
/// uses it.)
pub const RUNNING_COUNT_SQL: &str = "SELECT running, reserved FROM tandem_running_count()";

/// The reservation step in one statement (migration V7): `$1` lock key, `$2` batch, `$3` cap,
/// `$4` expiry in seconds. Columns: queued (any run queued; if not, nothing was locked or
/// reserved), running, slots, reservation id (NULL when no slot was free).
const RESERVE_CAPACITY_SQL: &str = "
    SELECT queued, running, slots, reservation_id FROM tandem_reserve_capacity($1, $2, $3, $4)";

/// How long a capacity reservation holds its slots. A claim transaction takes milliseconds; one
/// that outlives its reservation rolls back instead of exceeding the capacity.
pub const RESERVATION_SECS: i32 = 30;

/// Gives a capacity reservation back (`$1` = its id).
const RELEASE_RESERVATION_SQL: &str = "DELETE FROM running_count_ledger WHERE reservation_id = $1";

/// How long a reservation must still hold when a claim transaction takes it back: the claims
/// commit after that (write and commit take milliseconds), and a reservation is only handed out
/// again once expired, so the margin keeps a slow claim from overlapping a new reservation.
pub const RESERVATION_MARGIN_SECS: i32 = 10;

/// Takes a reservation back inside the claim transaction (`$1` its id), only if it holds for
/// another `$2` seconds (see [`RESERVATION_MARGIN_SECS`]).
const TAKE_BACK_RESERVATION_SQL: &str = "
    DELETE FROM running_count_ledger
     WHERE reservation_id = $1
       AND reservation_expires_at > clock_timestamp() + make_interval(secs => $2)";

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
    /// `Some(lease)`: the caller publishes the claim's outbox rows itself right after the
    /// commit. Rows of runs with no older unpublished row are then inserted already leased to it
    /// for `lease` and returned in [`ClaimReport::leased_outbox`] (publish them, then
    /// `mark_outbox_published`); if the caller dies first, another relay publishes them when the
    /// lease expires. `None`: rows are left for a relay to claim (`claim_outbox_for_runs`).
    pub relay_lease: Option<Duration>,
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
    /// With [`ClaimLimits::relay_lease`]: the committed outbox rows leased to the caller, in id
    /// order, for it to publish.
    pub leased_outbox: Vec<OutboxRow>,
}

impl<D> Default for ClaimReport<D> {
    fn default() -> Self {
        Self {
            running_before: 0,
            items: Vec::new(),
            full_batch: false,
            leased_outbox: Vec::new(),
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

    /// Runs whose transaction wrote outbox rows that are not in [`Self::leased_outbox`] (to
    /// relay with `claim_outbox_for_runs` right after commit).
    pub fn runs_with_outbox(&self) -> Vec<String> {
        let leased: HashSet<&str> = self
            .leased_outbox
            .iter()
            .map(|r| r.run_id.as_str())
            .collect();
        self.items
            .iter()
            .filter(|i| !leased.contains(i.run_id.as_str()))
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

/// Whether the stored doc already says the run waits for `reason` on `key`. Reads only the
/// doc's `scheduler` member (the rest is skipped, not parsed into anything).
fn same_wait(doc: &RawValue, reason: QueueReason, key: Option<&str>) -> bool {
    #[derive(serde::Deserialize)]
    struct Wait {
        queue_reason: Option<QueueReason>,
        resource_key: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        scheduler: Option<Wait>,
    }
    match serde_json::from_str::<Doc>(doc.get()) {
        Ok(Doc { scheduler: Some(w) }) => {
            w.queue_reason == Some(reason) && w.resource_key.as_deref() == key
        }
        _ => false,
    }
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

/// Claims queued runs fleet-wide; see the module documentation for the algorithm. Uses two of
/// the pool's connections at once (the claim transaction and, briefly, the reservation), so the
/// pool needs at least two.
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
    if pool.status().max_size < 2 {
        return Err(StoreError::Config(
            "a claim needs a connection pool of at least 2 connections".into(),
        ));
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let candidates = select_candidates(&tx, batch).await?;
    if candidates.is_empty() {
        // Nothing queued (or every queued run is being claimed): no lock, no reservation.
        tx.rollback().await?;
        return Ok(ClaimReport::default());
    }
    let (reservation, held) = futures::join!(
        reserve_capacity(pool, candidates.len(), limits.max_concurrent_runs),
        held_roots(&tx, &candidates)
    );
    let (reservation, held) = match (reservation, held) {
        (Ok(r), Ok(h)) => (r, h),
        (Ok(r), Err(e)) => {
            release_reservation_now(pool, &r).await;
            return Err(e);
        }
        (Err(e), _) => return Err(e),
    };
    let start = ClaimStart {
        full_batch: candidates.len() == batch,
        rows: candidates,
        held,
    };
    let result = claim_set(tx, &reservation, start, &limits, settings, &mut dispatch).await;
    if result.is_err() {
        release_reservation_now(pool, &reservation).await;
    }
    result
}

/// Gives the slots back now rather than at expiry (best effort: on a broken connection the
/// expiry does it).
async fn release_reservation_now(pool: &Pool, reservation: &Reservation) {
    if let Some(id) = reservation.id
        && let Ok(client) = pool.get().await
    {
        let _ = client.execute(RELEASE_RESERVATION_SQL, &[&id]).await;
    }
}

/// Slots a claim may fill, reserved fleet-wide.
struct Reservation {
    /// `running` runs when the reservation was taken.
    running_before: i64,
    /// Slots reserved (0: none free; no reservation row).
    slots: i64,
    id: Option<uuid::Uuid>,
}

/// Reserves up to `wanted` slots of free capacity under the claim lock (the only part of a claim
/// that replicas serialize on), in one statement that is its own transaction, on a connection of
/// its own (the claim transaction holds the candidates meanwhile).
async fn reserve_capacity(pool: &Pool, wanted: usize, cap: u32) -> Result<Reservation, StoreError> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(RESERVE_CAPACITY_SQL).await?;
    let wanted = i64::try_from(wanted).unwrap_or(i64::MAX);
    let row = client
        .query_one(
            &stmt,
            &[
                &CLAIM_LOCK_KEY,
                &wanted,
                &i64::from(cap),
                &f64::from(RESERVATION_SECS),
            ],
        )
        .await?;
    // Column 0 ("any run queued") is true here: the candidates are queued, only locked.
    Ok(Reservation {
        running_before: row.try_get(1)?,
        slots: row.try_get(2)?,
        id: row.try_get(3)?,
    })
}

/// Gives the reservation back inside the claim transaction, in the same commit as the claims
/// it covers. `false`: it expired (or is about to), so the claims must not commit.
async fn release_reservation(tx: &Transaction<'_>, id: uuid::Uuid) -> Result<bool, StoreError> {
    let stmt = tx.prepare_cached(TAKE_BACK_RESERVATION_SQL).await?;
    let margin = f64::from(RESERVATION_MARGIN_SECS);
    Ok(tx.execute(&stmt, &[&id, &margin]).await? == 1)
}

/// The claim transaction's opening: candidates (locked) and which of their workspace roots are
/// held.
struct ClaimStart {
    rows: Vec<Row>,
    held: HashSet<String>,
    full_batch: bool,
}

/// The oldest queued runs nobody else holds, locked.
async fn select_candidates(tx: &Transaction<'_>, batch: usize) -> Result<Vec<Row>, StoreError> {
    let select = tx.prepare_cached(CLAIM_CANDIDATES_SQL).await?;
    let batch = i64::try_from(batch).unwrap_or(1);
    Ok(tx.query(&select, &[&batch]).await?)
}

/// The candidates' workspace roots that a `running|pausing` run holds.
async fn held_roots(tx: &Transaction<'_>, rows: &[Row]) -> Result<HashSet<String>, StoreError> {
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
    Ok(held)
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
    let governance = env.governance.as_deref().unwrap_or(&empty);
    let claim = claim_run(run, env.automation.as_deref(), None, governance, env.now_ms);
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
    /// Changed: the run id and its index among the changed runs.
    Write(String, usize),
}

/// What a changed candidate's write means.
enum Plan<D> {
    /// Its queue reason is recorded.
    Wait {
        reason: QueueReason,
        key: Option<String>,
    },
    /// Claimed (and dispatched) or settled otherwise.
    Claim((ClaimOutcome, Option<D>)),
}

/// The claim: decisions in memory, then one statement per table for the whole batch (see
/// `crate::write`; when that fails, run by run under savepoints, so only a bad run stays queued).
async fn claim_set<D, F>(
    mut tx: Transaction<'_>,
    reservation: &Reservation,
    start: ClaimStart,
    limits: &ClaimLimits,
    settings: &StoreSettings,
    dispatch: &mut F,
) -> Result<ClaimReport<D>, StoreError>
where
    F: FnMut(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<D>,
{
    let running_before = reservation.running_before;
    let ClaimStart {
        rows,
        mut held,
        full_batch,
    } = start;

    // Decide who waits and who is claimed from the row alone (no parse for runs whose recorded
    // wait reason is already right), then load what the rest need in three set queries.
    struct Candidate {
        locked: LockedRow,
        root: Option<String>,
    }
    // Phase one admits provisionally: a provisional admission that settles otherwise (a launch
    // hold, say) can only make a later run wait one pass longer under its recorded reason.
    let mut provisional_free = reservation.slots;
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
        let released = match reservation.id {
            Some(id) => Some(release_reservation(&tx, id).await?),
            None => None,
        };
        finish_claim(tx, released, false).await?;
        return Ok(ClaimReport {
            running_before,
            items: items.into_iter().flatten().collect(),
            full_batch,
            leased_outbox: Vec::new(),
        });
    }

    let mut slots = Vec::with_capacity(candidates.len());
    let mut roots = Vec::with_capacity(candidates.len());
    let mut locked = Vec::with_capacity(candidates.len());
    for (slot, c) in candidates {
        slots.push(slot);
        roots.push(c.root);
        locked.push(c.locked);
    }
    // The reservation is given back in the same round trip as the loads (pipelined): it only
    // has to be gone in the same commit as the claims.
    let governed = settings.with_governance();
    let (released, loaded) = futures::join!(
        async {
            match reservation.id {
                Some(id) => release_reservation(&tx, id).await.map(Some),
                None => Ok(None),
            }
        },
        load_envs(&tx, locked, &governed)
    );
    let released = released?;
    let loaded = loaded?;
    // Decide, in candidate order, with the same admission rules as the run-by-run path.
    let mut free = reservation.slots;
    let mut plans: Vec<(usize, Planned<D>)> = Vec::with_capacity(loaded.len());
    let mut changed: Vec<Changed<Plan<D>>> = Vec::new();
    for ((slot, root), LoadedRun { run_id, loaded }) in slots.into_iter().zip(roots).zip(loaded) {
        let (mut run, env) = match loaded {
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
        let before = run.clone();
        if let Some((reason, key)) = wait_reason(root.as_ref(), &held, free) {
            let t = wait_transition(&mut run, &env, reason, key.clone());
            if !t.changed {
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
            let transition = Transition {
                outcome: Plan::Wait { reason, key },
                changed: true,
                effects: t.effects,
            };
            plans.push((slot, Planned::Write(run_id, changed.len())));
            changed.push(Changed {
                before,
                run,
                env,
                transition,
            });
            continue;
        }
        let t = claim_and_dispatch(&mut run, &env, dispatch);
        if t.outcome.1.is_some() {
            free -= 1;
            if let Some(r) = root {
                held.insert(r);
            }
        }
        if !t.changed {
            let applied = Applied {
                outcome: t.outcome,
                changed: false,
                run: before,
                lease_epoch: env.lease_epoch,
                now_ms: env.now_ms,
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
        let transition = Transition {
            outcome: Plan::Claim(t.outcome),
            changed: true,
            effects: t.effects,
        };
        plans.push((slot, Planned::Write(run_id, changed.len())));
        changed.push(Changed {
            before,
            run,
            env,
            transition,
        });
    }

    // One set-based write for every changed run (run by run if that fails).
    let relay = match limits.relay_lease {
        Some(lease) => OutboxRelay::Writer(lease),
        None => OutboxRelay::Claimed,
    };
    let (written, leased_outbox) =
        write_changed(&mut tx, &mut changed, settings, false, relay).await?;
    let any_changed = written.iter().any(Result::is_ok);
    let mut changed: Vec<Option<(Changed<Plan<D>>, WriteResult)>> =
        changed.into_iter().zip(written).map(Some).collect();
    for (slot, plan) in plans {
        let item = match plan {
            Planned::Done(item) => item,
            Planned::Write(run_id, i) => {
                let result = match changed.get_mut(i).and_then(Option::take) {
                    Some((c, Ok((lease_epoch, outbox_ids)))) => match c.transition.outcome {
                        Plan::Wait { reason, key } => Ok(ClaimItemOutcome::Waiting {
                            reason,
                            resource_key: key,
                            recorded: true,
                        }),
                        Plan::Claim(outcome) => Ok(claimed_item(Applied {
                            outcome,
                            changed: true,
                            run: c.run,
                            lease_epoch,
                            now_ms: c.env.now_ms,
                            outbox_ids,
                            effects: c.transition.effects,
                        })),
                    },
                    Some((_, Err(e))) => {
                        tracing::warn!(run_id = %run_id, error = %e, "claim write failed; the run stays queued");
                        Err(e)
                    }
                    None => Err(StoreError::Invalid("claim plan lost".into())),
                };
                ClaimItem { run_id, result }
            }
        };
        if let Some(s) = items.get_mut(slot) {
            *s = Some(item);
        }
    }
    finish_claim(tx, released, any_changed).await?;
    Ok(ClaimReport {
        running_before,
        items: items.into_iter().flatten().collect(),
        full_batch,
        leased_outbox,
    })
}

/// Commits the claim, whose transaction released its reservation (`released`: whether it
/// found it; `None`: it had none); rolls the claims back when the reservation had expired (its
/// slots may have gone to another claim).
async fn finish_claim(
    tx: Transaction<'_>,
    released: Option<bool>,
    any_changed: bool,
) -> Result<(), StoreError> {
    if released == Some(false) {
        tx.rollback().await?;
        return Err(StoreError::Invalid(format!(
            "the claim outlived its capacity reservation ({RESERVATION_SECS} s); \
             nothing was claimed"
        )));
    }
    if any_changed || released.is_some() {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_wait_compares_reason_and_key() {
        let raw = |v: serde_json::Value| serde_json::value::to_raw_value(&v).expect("serializes");
        let doc = raw(
            json!({"run_id": "r", "scheduler": {"queue_reason": "workspace_lock",
            "resource_key": "/w", "queued_at_ms": 1}, "checkpoint": {"x": [1, 2]}}),
        );
        assert!(same_wait(&doc, QueueReason::WorkspaceLock, Some("/w")));
        assert!(!same_wait(&doc, QueueReason::WorkspaceLock, Some("/x")));
        assert!(!same_wait(&doc, QueueReason::Capacity, None));
        let doc = raw(json!({"scheduler": {"queue_reason": "capacity"}}));
        assert!(same_wait(&doc, QueueReason::Capacity, None));
        assert!(!same_wait(&raw(json!({})), QueueReason::Capacity, None));
        let doc = raw(json!({"scheduler": {"queue_reason": null}}));
        assert!(!same_wait(&doc, QueueReason::Capacity, None));
        let doc = raw(json!({"scheduler": null}));
        assert!(!same_wait(&doc, QueueReason::Capacity, None));
        let doc = raw(json!({"scheduler": {"queue_reason": "no_such_reason"}}));
        assert!(!same_wait(&doc, QueueReason::Capacity, None));
    }
}
