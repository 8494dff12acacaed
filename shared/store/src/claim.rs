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

use std::collections::HashSet;

use crate::transition::{LockedRow, apply_locked};
use crate::{Applied, Fence, LeaseEpoch, StoreError, StoreSettings, TransitionEnv};
use deadpool_postgres::Pool;
use serde_json::Value;
use tandem_core::claim::{ClaimOutcome, claim_run};
use tandem_core::governance::GovernanceSnapshot;
use tandem_core::{AutomationV2RunRecord, QueueReason, SchedulerMetadata, Transition, update};

/// Advisory lock key serializing claim transactions fleet-wide ("tandemcl" in ASCII).
pub const CLAIM_LOCK_KEY: i64 = 0x7461_6e64_656d_636c;

/// Most candidates one claim transaction examines. Every write gets a savepoint, and PostgreSQL
/// caches 64 subtransaction ids per backend before snapshots of every session slow down.
pub const MAX_CLAIM_BATCH: usize = 64;

/// The candidate select of [`claim_runs`]: `$1` is the batch size. Public for `EXPLAIN` tests.
pub const CLAIM_CANDIDATES_SQL: &str = "
    SELECT r.run_id, r.lease_epoch, r.activity_at_ms, r.doc, r.workspace_root
      FROM runs r
     WHERE r.status = 'queued'
     ORDER BY r.created_at_ms, r.run_id
     LIMIT $1
       FOR UPDATE OF r SKIP LOCKED";

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
/// completion. Its effects (tasks, events) are persisted with the claim.
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
    let with_governance = settings.with_governance();
    let plain = StoreSettings {
        load_governance: false,
        ..*settings
    };
    let mut client = pool.get().await?;
    // Nothing queued: do not take the fleet-wide lock at all.
    let probe = client
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM runs WHERE status = 'queued')")
        .await?;
    let any: bool = client.query_one(&probe, &[]).await?.try_get(0)?;
    if !any {
        return Ok(ClaimReport::default());
    }

    let mut tx = client.transaction().await?;
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
    let cap = i64::from(limits.max_concurrent_runs);
    let mut free = (cap - running_before).max(0);

    let mut items = Vec::with_capacity(rows.len());
    let mut any_changed = false;
    for row in &rows {
        let run_id = row.try_get::<_, String>(0).unwrap_or_default();
        let parsed = LockedRow::from_row(row).and_then(|l| {
            let root: Option<String> = row.try_get(4)?;
            Ok((l, root))
        });
        let (locked, root) = match parsed {
            Ok(v) => v,
            Err(e) => {
                items.push(ClaimItem {
                    run_id,
                    result: Err(e),
                });
                continue;
            }
        };

        let wait = match &root {
            Some(r) if held.contains(r) => Some((QueueReason::WorkspaceLock, Some(r.clone()))),
            _ if free == 0 => Some((QueueReason::Capacity, None)),
            _ => None,
        };
        if let Some((reason, key)) = wait {
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
            |run, env| {
                let empty = GovernanceSnapshot::default();
                let governance = env.governance.as_ref().unwrap_or(&empty);
                let claim = claim_run(run, env.automation.as_ref(), None, governance, env.now_ms);
                if claim.outcome != ClaimOutcome::Claimed {
                    return Ok::<_, StoreError>(Transition {
                        outcome: (claim.outcome, None),
                        changed: claim.changed,
                        effects: claim.effects,
                    });
                }
                let claimed_env = TransitionEnv {
                    lease_epoch: LeaseEpoch(env.lease_epoch.0.saturating_add(1)),
                    ..env.clone()
                };
                let dispatched = dispatch(run, &claimed_env);
                let mut effects = claim.effects;
                effects.append(dispatched.effects);
                Ok(Transition {
                    outcome: (ClaimOutcome::Claimed, Some(dispatched.outcome)),
                    changed: true,
                    effects,
                })
            },
        )
        .await;
        let result = match applied {
            Ok(Applied {
                outcome,
                changed,
                run,
                lease_epoch,
                now_ms,
                outbox_ids,
                effects,
            }) => match outcome {
                (outcome, Some(dispatch_outcome)) => {
                    free -= 1;
                    if let Some(r) = root {
                        held.insert(r);
                    }
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
                    Ok(ClaimItemOutcome::Claimed {
                        claim: Box::new(claim),
                        dispatch: Box::new(dispatch),
                    })
                }
                (outcome, None) => Ok(ClaimItemOutcome::Settled(Box::new(Applied {
                    outcome,
                    changed,
                    run,
                    lease_epoch,
                    now_ms,
                    outbox_ids,
                    effects,
                }))),
            },
            Err(e) => Err(e),
        };
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
