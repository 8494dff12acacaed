//! `tandem-sweeper`: keeps the fleet healthy without a leader. Stale reaper, bounded auto-resume,
//! recovery of stuck `pausing` runs and of settled-but-unapplied gate decisions, retention, and
//! weekly spend caps (spec §3.5–§3.9, §3.12, §4.5; DESIGN §2, §5).
//!
//! # How the work is split
//!
//! Every replica runs every enabled duty (`TANDEM_SWEEPER_DUTIES`), each on its own jittered
//! period. A pass walks its candidates in pages (`tandem_store::candidate_page`, a keyset cursor
//! read without locks) and hands each page to one short transaction
//! (`tandem_store::transition_batch` with `Sweep::Runs`): the rows are locked `FOR UPDATE SKIP
//! LOCKED`, the pure core function re-checks every precondition on the locked row against the
//! database clock, and every changed run commits with its lifecycle, audit and outbox rows. N
//! replicas therefore split the work, and a run is never acted on twice for one condition: the
//! second replica either skips the locked row or sees the committed result and declines. After a
//! commit the writer relays its outbox rows, sends cancel hints to workers
//! (`tandem.control.cancel.<run_id>`) and wakes the schedulers (`tandem.wake.scheduler`) when a
//! run became claimable or released capacity.
//!
//! The only singleton duty is the spend evaluation (it aggregates over many runs): its
//! transaction takes `pg_try_advisory_xact_lock`, and a replica that does not get it skips that
//! pass. The lock lives as long as the transaction, so a replica that dies holds nothing.
//!
//! # Duties
//!
//! * **Reap** ([`Sweeper::reap_pass`], spec §3.7): `running` runs whose activity (worker progress
//!   and results in `runs.activity_at_ms`, plus the row's own lifecycle activity; database clock)
//!   is older than `max(TANDEM_STALE_RUNNING_RUN_MS, longest in-progress node timeout + 60 s)` →
//!   `paused` with `needs_repair` outputs, or `failed` when a node's attempts are exhausted
//!   (`tandem_core::sweeps::reap_stale_run`: upstream strings, lifecycle, audit and
//!   `automation_v2.run.*_stale_no_provider_activity` events), then a cancel hint to workers.
//!   Note: the 60 s grace applies whenever the definition is known, so a base threshold below
//!   60 s acts as 60 s (upstream's rule).
//! * **Resume** ([`Sweeper::resume_pass`], spec §3.8, §3.9): stale-reaped runs inside
//!   `TANDEM_STALE_AUTO_RESUME_WINDOW_MS`, below `TANDEM_STALE_AUTO_RESUME_MAX_ATTEMPTS`, with a
//!   repairable node and no launch hold; guardrail-stopped runs whose spend-caused stop an
//!   approved override lifts. Status and stop kind are re-checked on the locked row (race R1: a
//!   run cancelled meanwhile is never resurrected); the guardrail predicate is the launch hold's
//!   (§7.8: no held/resumed flapping). `TANDEM_DISABLE_STALE_AUTO_RESUME` disables only the stale
//!   path (§7.6). Guardrail candidates are read only while some approved override is unexpired.
//! * **Recover** ([`Sweeper::recover_pass`], spec §3.6, §4.5):
//!   * `pausing` runs with nothing in flight under their lease epoch, or whose in-flight tasks
//!     are gone (activity older than the reaper's effective threshold) → `paused`
//!     (`tandem_core::sweeps::settle_pausing`: `run_pausing_settled_on_restart`, upstream
//!     strings), with a cancel hint when tasks were in flight;
//!   * `awaiting_approval` runs whose open gate instance has a settled decision that was never
//!     applied → the decision is applied (`tandem_core::gate::recover_settled_decision`);
//!   * tasks dispatched but never consumed (a lost or purged `TANDEM_TASKS` stream, a worker that
//!     died holding the message): no separate mechanism. Nothing reports for the run, so its
//!     activity lapses and the reaper pauses it with `needs_repair` outputs; the auto-resume
//!     re-queues it and the scheduler dispatches the node again as the next attempt under a new
//!     lease epoch (a late result of the lost attempt is fenced). Bounded by the stale threshold
//!     and by the auto-resume window and cap.
//! * **Retention** ([`Sweeper::retention_pass`], `TANDEM_AUTOMATION_V2_RUNS_RETENTION_DAYS`):
//!   heavy node outputs and attempt verdicts of terminal runs past retention become stubs, run
//!   rows, lifecycle and audit are kept, published outbox rows older than
//!   `TANDEM_OUTBOX_RETENTION_SECS` are deleted; all in bounded batches. See
//!   `tandem_store::prune_heavy_values` for exactly what is kept.
//! * **Spend** ([`Sweeper::spend_pass`], spec §3.5): weekly spend per tenant and agent, spend
//!   pauses recorded when a cap is crossed (with a pending quota-override request) and lifted
//!   when the spend is back under it, and the hard stop of running runs whose launch would now be
//!   held. See [`spend`].
//!
//! # Upstream's shutdown failure, as an operator action
//!
//! Upstream fails every `running` run when its one process shuts down (spec §3.12). A sweeper
//! replica stopping fails nobody's run: SIGTERM/SIGINT stops the loops after the transaction in
//! progress and exits 0. The behaviour survives as an explicit operator action for a whole-fleet
//! stop, [`fail_running_runs_for_shutdown`] (same strings, stop kind `shutdown`, lifecycle
//! `run_failed_shutdown`, audit `automation_v2.internal_sweep.shutdown_failed_run`), which the
//! API and `tandemctl` call; run it after the schedulers are stopped.
//!
//! # Metrics
//!
//! `tandem_sweeper_passes_total{duty,outcome}` (`ok`, `error`, `skipped`),
//! `tandem_sweeper_pass_seconds{duty}`, `tandem_sweeper_actions_total{duty,action}`,
//! `tandem_sweeper_declined_total{duty,reason}` (candidates the core declined on the locked row),
//! `tandem_sweeper_run_errors_total{duty}` (a run that could not be read or written; the rest of
//! its batch still commits), `tandem_sweeper_cancel_hints_total`,
//! `tandem_sweeper_wakeups_sent_total`, `tandem_sweeper_retention_bytes_saved_total`,
//! `tandem_sweeper_spend_runs_read` (gauge).

pub mod config;
pub mod spend;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tandem_bus::{Prefix, async_nats};
use tandem_core::claim::claim_automation;
use tandem_core::config::LifecycleSettings;
use tandem_core::execution::in_flight_nodes;
use tandem_core::gate::recover_settled_decision;
use tandem_core::governance::GovernanceSnapshot;
use tandem_core::protocol::TaskCancel;
use tandem_core::sweeps::{
    AutoResumeOutcome, ReapOutcome, auto_resume_guardrail_stopped, auto_resume_stale_reaped,
    effective_stale_after_ms, fail_running_for_shutdown, reap_stale_run, row_last_activity_at_ms,
    settle_pausing,
};
use tandem_core::{
    AutomationRunStatus, AutomationStopKind, AutomationV2RunRecord, Millis, Transition,
};
use tandem_runtime::{Relay, Shutdown, backoff};
use tandem_store::{
    BatchItem, CandidateCursor, Candidates, LeaseEpoch, Pool, StoreError, StoreSettings, Sweep,
    TERMINAL_STATUSES, TransitionEnv,
};

pub use config::{Duty, DutySet, SweeperArgs, SweeperConfig};

/// Pages a retention pass reads per terminal status before yielding to the next pass.
const RETENTION_PAGES_PER_PASS: usize = 40;
/// Outbox rows deleted per statement.
const OUTBOX_DELETE_BATCH: usize = 1000;
/// Delete statements per retention pass.
const OUTBOX_DELETES_PER_PASS: usize = 50;
/// Cancel-hint reason for reaped runs.
const CANCEL_REASON_STALE: &str = "stale_no_provider_activity";
/// Cancel-hint reason for the abandoned tasks of a settled `pausing` run.
const CANCEL_REASON_PAUSING: &str = "pausing_settled";
/// Cancel-hint reason for the spend-cap hard stop.
const CANCEL_REASON_SPEND_CAP: &str = "agent_spend_paused";

// ---------------------------------------------------------------------------------------------
// outcomes

/// What one pass did, per duty. Counts are of runs unless named otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassSummary {
    /// Candidates locked and examined.
    pub examined: usize,
    /// Changes committed, by action (`paused`, `failed`, `stale`, `guardrail`, ...).
    pub actions: BTreeMap<&'static str, usize>,
    /// Candidates the core declined on the locked row, by reason.
    pub declined: BTreeMap<&'static str, usize>,
    /// Runs that could not be read or written (left unchanged).
    pub errors: usize,
}

impl PassSummary {
    pub fn action(&self, name: &str) -> usize {
        self.actions.get(name).copied().unwrap_or(0)
    }

    pub fn total_actions(&self) -> usize {
        self.actions.values().sum()
    }

    fn merge(&mut self, other: PassSummary) {
        self.examined += other.examined;
        self.errors += other.errors;
        for (k, v) in other.actions {
            *self.actions.entry(k).or_default() += v;
        }
        for (k, v) in other.declined {
            *self.declined.entry(k).or_default() += v;
        }
    }
}

/// What a transition decided for one run: an action name when it changed the run, else why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Acted(&'static str),
    Declined(&'static str),
}

fn reap_verdict(o: &ReapOutcome) -> Verdict {
    match o {
        ReapOutcome::Reaped(r) if r.terminal => Verdict::Acted("failed"),
        ReapOutcome::Reaped(_) => Verdict::Acted("paused"),
        ReapOutcome::NotRunning(_) => Verdict::Declined("not_running"),
        ReapOutcome::NotStale { .. } => Verdict::Declined("not_stale"),
    }
}

fn resume_verdict(o: &AutoResumeOutcome, action: &'static str) -> Verdict {
    use AutoResumeOutcome as O;
    Verdict::Declined(match o {
        O::Resumed => return Verdict::Acted(action),
        O::Disabled => "disabled",
        O::NotCandidate { .. } => "not_candidate",
        O::NoStaleReapRecord => "no_stale_reap_record",
        O::OutsideWindow { .. } => "outside_window",
        O::CapReached { .. } => "cap_reached",
        O::NoAutomation => "no_automation",
        O::AutomationPaused => "automation_paused",
        O::NoRepairableNode => "no_repairable_node",
        O::LaunchStillHeld => "launch_still_held",
        O::CauseNotLiftableByOverride { .. } => "cause_not_liftable",
        O::NoAgents => "no_agents",
        O::NoQuotaOverride => "no_quota_override",
    })
}

/// What the operator shutdown action did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Runs failed with stop kind `shutdown`, with their lease epoch after the change (send
    /// cancel hints with it: workers abandon tasks of that epoch and earlier).
    pub failed: Vec<(String, LeaseEpoch)>,
    /// Runs with outbox rows to relay.
    pub runs_with_outbox: Vec<String>,
    /// Runs that could not be read or written.
    pub errors: usize,
}

/// Counters of this replica since it started (the same figures as the metrics, in-process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweeperStats {
    pub passes: u64,
    pub pass_errors: u64,
    pub actions: u64,
    pub run_errors: u64,
    pub cancel_hints: u64,
}

#[derive(Debug, Default)]
struct Counters {
    passes: AtomicU64,
    pass_errors: AtomicU64,
    actions: AtomicU64,
    run_errors: AtomicU64,
    cancel_hints: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// the pure per-row transitions (public for tests and benchmarks)

/// The reaper's transition for one locked row: [`reap_stale_run`] with the row's activity
/// column and the base threshold; a reaped run's in-flight tasks are cancelled after commit.
pub fn reap_transition(
    run: &mut AutomationV2RunRecord,
    env: &TransitionEnv,
    stale_running_ms: u64,
) -> Transition<ReapOutcome> {
    let mut tr = reap_stale_run(
        run,
        env.automation.as_deref(),
        env.activity_at_ms,
        stale_running_ms,
        env.now_ms,
    );
    if tr.changed && matches!(tr.outcome, ReapOutcome::Reaped(_)) {
        tr.effects.cancel_tasks_of.push(run.run_id.clone());
    }
    tr
}

/// What the stuck-pausing recovery did with one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PausingOutcome {
    NotPausing(AutomationRunStatus),
    /// Tasks are in flight and their workers were active `idle_ms` ago, under the threshold.
    InFlight {
        idle_ms: u64,
        stale_after_ms: u64,
    },
    /// Settled to `paused`; `cancelled_tasks` when in-flight tasks were abandoned.
    Settled {
        cancelled_tasks: bool,
    },
}

/// Stuck-pausing recovery for one locked row: a `pausing` run settles to `paused`
/// ([`settle_pausing`], upstream strings) when nothing is in flight under its lease epoch, or
/// when its in-flight tasks are gone (no activity for the reaper's effective threshold); the
/// abandoned tasks get a cancel hint.
pub fn settle_pausing_transition(
    run: &mut AutomationV2RunRecord,
    env: &TransitionEnv,
    stale_running_ms: u64,
) -> Transition<PausingOutcome> {
    if run.status != AutomationRunStatus::Pausing {
        return Transition::unchanged(PausingOutcome::NotPausing(run.status));
    }
    let in_flight = !in_flight_nodes(run, env.lease_epoch.0).is_empty();
    if in_flight {
        let def = claim_automation(run, env.automation.as_deref());
        let stale_after_ms = effective_stale_after_ms(run, def, stale_running_ms);
        let idle_ms = env
            .now_ms
            .saturating_sub(env.activity_at_ms.max(row_last_activity_at_ms(run)));
        if idle_ms < stale_after_ms {
            return Transition::unchanged(PausingOutcome::InFlight {
                idle_ms,
                stale_after_ms,
            });
        }
    }
    let tr = settle_pausing(run, env.now_ms);
    let mut out = Transition {
        outcome: if tr.changed {
            PausingOutcome::Settled {
                cancelled_tasks: in_flight,
            }
        } else {
            PausingOutcome::NotPausing(run.status)
        },
        changed: tr.changed,
        effects: tr.effects,
    };
    if out.changed && in_flight {
        out.effects.cancel_tasks_of.push(run.run_id.clone());
    }
    out
}

/// Recovery of a settled-but-unapplied gate decision for one locked row
/// ([`recover_settled_decision`], with the live definition, else the snapshot, as upstream).
pub fn recover_decision_transition(
    run: &mut AutomationV2RunRecord,
    env: &TransitionEnv,
) -> Transition<bool> {
    match env.automation.as_deref() {
        Some(automation) => recover_settled_decision(run, automation, env.now_ms),
        None => Transition::unchanged(false),
    }
}

/// The operator shutdown action for one locked row ([`fail_running_for_shutdown`]), with a
/// cancel hint for the run's tasks.
pub fn shutdown_transition(run: &mut AutomationV2RunRecord, now: Millis) -> Transition<bool> {
    let mut tr = fail_running_for_shutdown(run, now);
    if tr.changed {
        tr.effects.cancel_tasks_of.push(run.run_id.clone());
    }
    tr
}

// ---------------------------------------------------------------------------------------------
// the operator action

/// Fails every `running` run with upstream's shutdown strings (spec §3.12: `automation run
/// stopped during server shutdown`, stop kind `shutdown`, lifecycle `run_failed_shutdown`, audit
/// `automation_v2.internal_sweep.shutdown_failed_run`), in batches of `batch` runs, each one
/// short `SKIP LOCKED` transaction (a run another writer holds at that instant is retried once
/// the page is done). `pausing` and other statuses are left alone, as upstream.
///
/// An explicit operator action for a whole-fleet stop (stop the schedulers first); never run on
/// a replica's exit. The caller relays `runs_with_outbox` and sends the cancel hints (see
/// [`send_cancel_hints`]); [`Sweeper::fail_running_runs_for_shutdown`] does both.
pub async fn fail_running_runs_for_shutdown(
    pool: &Pool,
    settings: &StoreSettings,
    batch: usize,
) -> Result<ShutdownReport, StoreError> {
    let batch = batch.clamp(1, tandem_store::MAX_BATCH);
    let mut report = ShutdownReport::default();
    // Passes until no running run is left or a pass makes no progress (rows held elsewhere).
    for _ in 0..10 {
        let mut cursor = CandidateCursor::start();
        let mut progressed = false;
        let mut seen = 0;
        loop {
            let page =
                tandem_store::candidate_page(pool, &Candidates::Running, &cursor, batch).await?;
            let Some(last) = page.last() else { break };
            cursor = last.clone();
            seen += page.len();
            let full = page.len() == batch;
            let ids = page.into_iter().map(|c| c.run_id).collect();
            let items =
                tandem_store::transition_batch(pool, &Sweep::Runs(ids), batch, settings, |r, e| {
                    shutdown_transition(r, e.now_ms)
                })
                .await?;
            for item in items {
                match item.result {
                    Ok(a) if a.changed => {
                        progressed = true;
                        if !a.outbox_ids.is_empty() {
                            report.runs_with_outbox.push(item.run_id.clone());
                        }
                        report.failed.push((item.run_id, a.lease_epoch));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        report.errors += 1;
                        tracing::warn!(run_id = %item.run_id, error = %e, "shutdown failure of run not applied");
                    }
                }
            }
            if !full {
                break;
            }
        }
        if seen == 0 || !progressed {
            break;
        }
    }
    Ok(report)
}

/// Publishes `tandem.control.cancel.<run_id>` hints (core NATS, best effort; results of the
/// cancelled tasks are fenced by lease epoch anyway). Returns how many were sent.
pub async fn send_cancel_hints(
    nats: &async_nats::Client,
    prefix: &Prefix,
    cancels: &[(String, LeaseEpoch)],
    reason: Option<&str>,
) -> usize {
    let mut sent = 0;
    for (run_id, epoch) in cancels {
        let hint = TaskCancel {
            run_id: run_id.clone(),
            lease_epoch: Some(epoch.0),
            reason: reason.map(str::to_owned),
        };
        let body = serde_json::to_vec(&hint)
            .map(Bytes::from)
            .unwrap_or_default();
        match nats
            .publish(tandem_bus::cancel_subject(prefix, run_id), body)
            .await
        {
            Ok(()) => sent += 1,
            Err(e) => tracing::debug!(run_id = %run_id, error = %e, "cancel hint not sent"),
        }
    }
    sent
}

// ---------------------------------------------------------------------------------------------
// the service

struct Inner {
    pool: Pool,
    nats: async_nats::Client,
    prefix: Prefix,
    relay: Relay,
    config: SweeperConfig,
    lifecycle: LifecycleSettings,
    /// Without governance (reaper, recovery, shutdown).
    store: StoreSettings,
    /// With governance (auto-resume, hard stop).
    store_gov: StoreSettings,
    counters: Counters,
    /// Retention cursors per terminal status: where this replica's walk through old terminal
    /// runs stands. A terminal run's `updated_at_ms` only grows, so runs behind the cursor were
    /// handled (by this replica, or by another one that held them at that instant).
    retention_cursors: Mutex<HashMap<AutomationRunStatus, CandidateCursor>>,
    shutdown: OnceLock<Shutdown>,
}

/// One sweeper replica; cheap to clone.
#[derive(Clone)]
pub struct Sweeper {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sweeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweeper")
            .field("prefix", &self.inner.prefix)
            .field("config", &self.inner.config)
            .finish()
    }
}

/// How a batch's committed changes are reported.
struct Settled {
    summary: PassSummary,
    relay: Vec<String>,
    cancels: Vec<(String, LeaseEpoch)>,
    wake: bool,
}

impl Sweeper {
    pub fn new(
        pool: Pool,
        nats: async_nats::Client,
        js: async_nats::jetstream::Context,
        prefix: Prefix,
        config: SweeperConfig,
        lifecycle: LifecycleSettings,
    ) -> Self {
        let relay = Relay::new(pool.clone(), js, prefix.clone(), config.relay);
        let store = StoreSettings::new(lifecycle.gates);
        Self {
            inner: Arc::new(Inner {
                pool,
                nats,
                prefix,
                relay,
                config,
                lifecycle,
                store,
                store_gov: store.with_governance(),
                counters: Counters::default(),
                retention_cursors: Mutex::new(HashMap::new()),
                shutdown: OnceLock::new(),
            }),
        }
    }

    pub fn relay(&self) -> &Relay {
        &self.inner.relay
    }

    pub fn config(&self) -> &SweeperConfig {
        &self.inner.config
    }

    /// This replica's counters.
    pub fn stats(&self) -> SweeperStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SweeperStats {
            passes: get(&c.passes),
            pass_errors: get(&c.pass_errors),
            actions: get(&c.actions),
            run_errors: get(&c.run_errors),
            cancel_hints: get(&c.cancel_hints),
        }
    }

    fn stopping(&self) -> bool {
        self.inner
            .shutdown
            .get()
            .is_some_and(Shutdown::is_triggered)
    }

    /// Runs every enabled duty and the background relay until `shutdown`, then returns once the
    /// transaction in progress committed. Fails nobody's run.
    pub async fn run(&self, shutdown: Shutdown) -> anyhow::Result<()> {
        let _ = self.inner.shutdown.set(shutdown.clone());
        let duties: Vec<Duty> = self.inner.config.duties.iter().collect();
        tracing::info!(
            duties = ?duties.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
            stale_running_ms = self.inner.lifecycle.stale.stale_running_ms,
            auto_resume_window_ms = self.inner.lifecycle.stale.auto_resume_window_ms,
            auto_resume_max_attempts = self.inner.lifecycle.stale.auto_resume_max_attempts,
            stale_auto_resume_disabled = self.inner.lifecycle.stale.stale_auto_resume_disabled,
            retention_days = self.inner.lifecycle.retention_days,
            "sweeper loops starting"
        );
        let relay = tokio::spawn(self.inner.relay.clone().run(shutdown.clone()));
        futures::future::join_all(
            duties
                .into_iter()
                .map(|d| self.run_duty(d, shutdown.clone())),
        )
        .await;
        if let Err(e) = relay.await {
            tracing::warn!(error = %e, "outbox relay task failed");
        }
        Ok(())
    }

    /// One duty's loop: a pass every (jittered) period until `shutdown`; a failed pass is
    /// retried with backoff.
    async fn run_duty(&self, duty: Duty, shutdown: Shutdown) {
        let interval = self.inner.config.interval(duty);
        let mut failures = backoff::Backoff::new(
            Duration::from_millis(250),
            interval.max(Duration::from_secs(10)),
        );
        let mut wait = backoff::jittered(interval, 0.5);
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = match self.pass(duty).await {
                Ok(_) => {
                    failures = backoff::Backoff::new(
                        Duration::from_millis(250),
                        interval.max(Duration::from_secs(10)),
                    );
                    backoff::jittered(interval, 0.5)
                }
                Err(e) => {
                    let d = failures.next_delay();
                    tracing::warn!(duty = duty.as_str(), error = %e, retry_in_ms = d.as_millis() as u64, "sweeper pass failed");
                    d
                }
            };
        }
    }

    /// Runs one pass of `duty` and records its metrics.
    pub async fn pass(&self, duty: Duty) -> Result<PassSummary, StoreError> {
        let started = Instant::now();
        let result = match duty {
            Duty::Reap => self.reap_pass().await,
            Duty::Resume => self.resume_pass().await,
            Duty::Recover => self.recover_pass().await,
            Duty::Retention => self.retention_pass().await,
            Duty::Spend => self.spend_pass().await,
        };
        let d = duty.as_str();
        metrics::histogram!("tandem_sweeper_pass_seconds", "duty" => d)
            .record(started.elapsed().as_secs_f64());
        bump(&self.inner.counters.passes, 1);
        match &result {
            Ok(s) => {
                let outcome = if s.declined.contains_key("lock_held") {
                    "skipped"
                } else {
                    "ok"
                };
                metrics::counter!("tandem_sweeper_passes_total", "duty" => d, "outcome" => outcome)
                    .increment(1);
                for (action, n) in &s.actions {
                    metrics::counter!("tandem_sweeper_actions_total", "duty" => d, "action" => *action)
                        .increment(*n as u64);
                }
                for (reason, n) in &s.declined {
                    metrics::counter!("tandem_sweeper_declined_total", "duty" => d, "reason" => *reason)
                        .increment(*n as u64);
                }
                if s.errors > 0 {
                    metrics::counter!("tandem_sweeper_run_errors_total", "duty" => d)
                        .increment(s.errors as u64);
                }
                bump(&self.inner.counters.actions, s.total_actions() as u64);
                bump(&self.inner.counters.run_errors, s.errors as u64);
                if s.total_actions() > 0 || s.errors > 0 {
                    tracing::info!(duty = d, examined = s.examined, actions = ?s.actions, errors = s.errors, "sweeper pass");
                }
            }
            Err(_) => {
                metrics::counter!("tandem_sweeper_passes_total", "duty" => d, "outcome" => "error")
                    .increment(1);
                bump(&self.inner.counters.pass_errors, 1);
            }
        }
        result
    }

    // -----------------------------------------------------------------------------------------
    // the paging engine

    /// Walks `candidates` page by page; each page is one `SKIP LOCKED` transaction applying `f`
    /// to the rows it could lock; `verdict` names what the transition did. Post-commit work
    /// (relay, cancel hints, wake-ups) follows each page.
    async fn sweep_candidates<T, F, V>(
        &self,
        candidates: &Candidates,
        settings: &StoreSettings,
        cancel_reason: &str,
        mut f: F,
        verdict: V,
    ) -> Result<PassSummary, StoreError>
    where
        F: FnMut(&mut AutomationV2RunRecord, &TransitionEnv) -> Transition<T>,
        V: Fn(&T) -> Verdict,
    {
        let batch = self.inner.config.batch.clamp(1, tandem_store::MAX_BATCH);
        let mut summary = PassSummary::default();
        let mut cursor = CandidateCursor::start();
        loop {
            if self.stopping() {
                break;
            }
            let page =
                tandem_store::candidate_page(&self.inner.pool, candidates, &cursor, batch).await?;
            let Some(last) = page.last() else { break };
            cursor = last.clone();
            let full = page.len() == batch;
            let ids: Vec<String> = page.into_iter().map(|c| c.run_id).collect();
            let items = tandem_store::transition_batch(
                &self.inner.pool,
                &Sweep::Runs(ids),
                batch,
                settings,
                &mut f,
            )
            .await?;
            let settled = settle_items(items, &verdict);
            self.after_commit(
                &settled.relay,
                &settled.cancels,
                cancel_reason,
                settled.wake,
            )
            .await;
            summary.merge(settled.summary);
            if !full {
                break;
            }
        }
        Ok(summary)
    }

    /// After a commit: publish the outbox rows of these runs, send cancel hints, wake schedulers.
    async fn after_commit(
        &self,
        runs: &[String],
        cancels: &[(String, LeaseEpoch)],
        cancel_reason: &str,
        wake: bool,
    ) {
        if !runs.is_empty() {
            match self.inner.relay.relay_runs(runs).await {
                Ok(r) if r.failed > 0 => self.inner.relay.nudge(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "relaying just-committed rows failed; the background relay will");
                    self.inner.relay.nudge();
                }
            }
        }
        if !cancels.is_empty() {
            let sent = send_cancel_hints(
                &self.inner.nats,
                &self.inner.prefix,
                cancels,
                Some(cancel_reason),
            )
            .await;
            metrics::counter!("tandem_sweeper_cancel_hints_total").increment(sent as u64);
            bump(&self.inner.counters.cancel_hints, sent as u64);
        }
        if wake {
            let subject = tandem_bus::wake_scheduler_subject(&self.inner.prefix);
            match tandem_bus::wake(&self.inner.nats, subject).await {
                Ok(()) => metrics::counter!("tandem_sweeper_wakeups_sent_total").increment(1),
                Err(e) => tracing::debug!(error = %e, "wake-up not sent"),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // duties

    /// One stale-reaper pass (see the crate docs).
    pub async fn reap_pass(&self) -> Result<PassSummary, StoreError> {
        let base = self.inner.lifecycle.stale.stale_running_ms;
        self.sweep_candidates(
            &Candidates::StaleRunning { idle_ms: base },
            &self.inner.store,
            CANCEL_REASON_STALE,
            |run, env| reap_transition(run, env, base),
            reap_verdict,
        )
        .await
    }

    /// One auto-resume pass: stale-reaped runs, then guardrail-stopped runs (see the crate docs).
    pub async fn resume_pass(&self) -> Result<PassSummary, StoreError> {
        let stale = self.inner.lifecycle.stale;
        let mut summary = PassSummary::default();
        let empty = GovernanceSnapshot::default();
        if !stale.stale_auto_resume_disabled {
            let s = self
                .sweep_candidates(
                    &Candidates::Stopped {
                        status: AutomationRunStatus::Paused,
                        stop_kind: AutomationStopKind::StaleReaped,
                        updated_within_ms: Some(stale.auto_resume_window_ms),
                    },
                    &self.inner.store_gov,
                    CANCEL_REASON_STALE,
                    |run, env| {
                        let gov = env.governance.as_deref().unwrap_or(&empty);
                        auto_resume_stale_reaped(
                            run,
                            env.automation.as_deref(),
                            gov,
                            &stale,
                            env.now_ms,
                        )
                    },
                    |o| resume_verdict(o, "stale"),
                )
                .await?;
            summary.merge(s);
        }
        if tandem_store::any_active_quota_override(&self.inner.pool).await? {
            let s = self
                .sweep_candidates(
                    &Candidates::Stopped {
                        status: AutomationRunStatus::Paused,
                        stop_kind: AutomationStopKind::GuardrailStopped,
                        updated_within_ms: None,
                    },
                    &self.inner.store_gov,
                    CANCEL_REASON_STALE,
                    |run, env| {
                        let gov = env.governance.as_deref().unwrap_or(&empty);
                        auto_resume_guardrail_stopped(
                            run,
                            env.automation.as_deref(),
                            gov,
                            env.now_ms,
                        )
                    },
                    |o| resume_verdict(o, "guardrail"),
                )
                .await?;
            summary.merge(s);
        }
        Ok(summary)
    }

    /// One recovery pass: stuck `pausing` runs, then settled-but-unapplied gate decisions.
    pub async fn recover_pass(&self) -> Result<PassSummary, StoreError> {
        let base = self.inner.lifecycle.stale.stale_running_ms;
        let mut summary = self
            .sweep_candidates(
                &Candidates::Pausing,
                &self.inner.store,
                CANCEL_REASON_PAUSING,
                |run, env| settle_pausing_transition(run, env, base),
                |o| match o {
                    PausingOutcome::Settled { .. } => Verdict::Acted("pausing_settled"),
                    PausingOutcome::InFlight { .. } => Verdict::Declined("in_flight"),
                    PausingOutcome::NotPausing(_) => Verdict::Declined("not_pausing"),
                },
            )
            .await?;
        let s = self
            .sweep_candidates(
                &Candidates::SettledGates,
                &self.inner.store,
                CANCEL_REASON_STALE,
                recover_decision_transition,
                |recovered| {
                    if *recovered {
                        Verdict::Acted("decision_recovered")
                    } else {
                        Verdict::Declined("no_settled_decision")
                    }
                },
            )
            .await?;
        summary.merge(s);
        Ok(summary)
    }

    /// One retention pass: published outbox rows past the horizon, then the heavy values of
    /// terminal runs past `TANDEM_AUTOMATION_V2_RUNS_RETENTION_DAYS` (see the crate docs).
    pub async fn retention_pass(&self) -> Result<PassSummary, StoreError> {
        let mut summary = PassSummary::default();
        let mut deleted = 0usize;
        for _ in 0..OUTBOX_DELETES_PER_PASS {
            if self.stopping() {
                break;
            }
            let n = tandem_store::prune_published_outbox(
                &self.inner.pool,
                self.inner.config.outbox_retention,
                OUTBOX_DELETE_BATCH,
            )
            .await?;
            deleted += usize::try_from(n).unwrap_or(0);
            if n < OUTBOX_DELETE_BATCH as u64 {
                break;
            }
        }
        if deleted > 0 {
            summary.actions.insert("outbox_deleted", deleted);
        }

        let older_than_ms = self
            .inner
            .lifecycle
            .retention_days
            .saturating_mul(86_400_000);
        let batch = self.inner.config.batch.clamp(1, tandem_store::MAX_BATCH);
        let mut bytes_saved = 0usize;
        for status in TERMINAL_STATUSES {
            let mut cursor = self
                .retention_cursors()
                .get(&status)
                .cloned()
                .unwrap_or_else(CandidateCursor::start);
            let candidates = Candidates::TerminalOlderThan {
                status,
                older_than_ms,
            };
            for _ in 0..RETENTION_PAGES_PER_PASS {
                if self.stopping() {
                    break;
                }
                let page =
                    tandem_store::candidate_page(&self.inner.pool, &candidates, &cursor, batch)
                        .await?;
                let Some(last) = page.last().cloned() else {
                    break;
                };
                let full = page.len() == batch;
                let ids: Vec<String> = page.into_iter().map(|c| c.run_id).collect();
                let r = tandem_store::prune_terminal_runs(
                    &self.inner.pool,
                    &ids,
                    older_than_ms,
                    self.inner.config.retention_value_bytes,
                )
                .await?;
                summary.examined += r.examined;
                if r.pruned > 0 {
                    *summary.actions.entry("run_pruned").or_default() += r.pruned;
                    *summary.actions.entry("value_pruned").or_default() += r.values_pruned;
                }
                bytes_saved += r.bytes_saved;
                cursor = last;
                self.retention_cursors().insert(status, cursor.clone());
                if !full {
                    break;
                }
            }
        }
        if bytes_saved > 0 {
            metrics::counter!("tandem_sweeper_retention_bytes_saved_total")
                .increment(bytes_saved as u64);
        }
        Ok(summary)
    }

    fn retention_cursors(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<AutomationRunStatus, CandidateCursor>> {
        self.inner
            .retention_cursors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets where retention stands, so the next pass walks every old terminal run again
    /// (runs written with old timestamps after the walk passed them, e.g. an import).
    pub fn reset_retention_cursors(&self) {
        self.retention_cursors().clear();
    }

    /// One spend pass: the weekly spend-cap evaluation (fleet-wide singleton per pass), then the
    /// hard stop of running runs whose launch would now be held (see [`spend`]).
    pub async fn spend_pass(&self) -> Result<PassSummary, StoreError> {
        let mut summary = PassSummary::default();
        match tandem_store::evaluate_spend_caps(
            &self.inner.pool,
            spend::WEEK_MS,
            spend::plan_spend_caps,
        )
        .await?
        {
            None => {
                summary.declined.insert("lock_held", 1);
            }
            Some(applied) => {
                metrics::gauge!("tandem_sweeper_spend_runs_read").set(applied.runs as f64);
                summary.errors += applied.unreadable_runs;
                for (name, n) in [
                    ("agent_paused", applied.paused.len()),
                    ("agent_lifted", applied.lifted.len()),
                    ("override_requested", applied.overrides_requested),
                ] {
                    if n > 0 {
                        summary.actions.insert(name, n);
                    }
                }
                for key in &applied.paused {
                    tracing::info!(agent_key = %key, "weekly spend cap reached: agent spend-paused");
                }
                for key in &applied.lifted {
                    tracing::info!(agent_key = %key, "agent back under its weekly spend cap: spend pause lifted");
                }
            }
        }
        if tandem_store::any_spend_pause(&self.inner.pool).await? {
            let empty = GovernanceSnapshot::default();
            let s = self
                .sweep_candidates(
                    &Candidates::Running,
                    &self.inner.store_gov,
                    CANCEL_REASON_SPEND_CAP,
                    |run, env| {
                        let gov = env.governance.as_deref().unwrap_or(&empty);
                        spend::spend_cap_hard_stop(run, env.automation.as_deref(), gov, env.now_ms)
                    },
                    |o| match o {
                        spend::HardStopOutcome::Paused { .. } => Verdict::Acted("run_hard_stopped"),
                        spend::HardStopOutcome::NotCapped => Verdict::Declined("not_capped"),
                        spend::HardStopOutcome::NoAutomation => Verdict::Declined("no_automation"),
                        spend::HardStopOutcome::NotRunning(_) => Verdict::Declined("not_running"),
                    },
                )
                .await?;
            summary.merge(s);
        }
        Ok(summary)
    }

    /// The operator shutdown action ([`fail_running_runs_for_shutdown`]) with its post-commit
    /// work: relays the rows and sends the cancel hints.
    pub async fn fail_running_runs_for_shutdown(&self) -> Result<ShutdownReport, StoreError> {
        let report = fail_running_runs_for_shutdown(
            &self.inner.pool,
            &self.inner.store,
            self.inner.config.batch,
        )
        .await?;
        if !report.runs_with_outbox.is_empty()
            && let Err(e) = self.inner.relay.relay_runs(&report.runs_with_outbox).await
        {
            tracing::warn!(error = %e, "relaying the shutdown rows failed; the background relay will");
            self.inner.relay.nudge();
        }
        send_cancel_hints(
            &self.inner.nats,
            &self.inner.prefix,
            &report.failed,
            Some("shutdown"),
        )
        .await;
        metrics::counter!("tandem_sweeper_actions_total", "duty" => "shutdown", "action" => "failed")
            .increment(report.failed.len() as u64);
        Ok(report)
    }
}

/// Sorts a batch's items into the pass summary and the post-commit work.
fn settle_items<T, V>(items: Vec<BatchItem<T>>, verdict: &V) -> Settled
where
    V: Fn(&T) -> Verdict,
{
    let mut s = Settled {
        summary: PassSummary::default(),
        relay: Vec::new(),
        cancels: Vec::new(),
        wake: false,
    };
    for item in items {
        s.summary.examined += 1;
        let applied = match item.result {
            Ok(a) => a,
            Err(e) => {
                s.summary.errors += 1;
                tracing::warn!(run_id = %item.run_id, error = %e, "sweeper left a run unchanged: it could not be read or written");
                continue;
            }
        };
        match verdict(&applied.outcome) {
            Verdict::Acted(name) if applied.changed => {
                *s.summary.actions.entry(name).or_default() += 1;
            }
            Verdict::Acted(_) => {}
            Verdict::Declined(reason) => {
                *s.summary.declined.entry(reason).or_default() += 1;
            }
        }
        if !applied.changed {
            continue;
        }
        if !applied.outbox_ids.is_empty() {
            s.relay.push(item.run_id.clone());
        }
        for run_id in &applied.effects.cancel_tasks_of {
            s.cancels.push((run_id.clone(), applied.lease_epoch));
        }
        // A run that became claimable, or that released capacity or its workspace lock.
        s.wake |= applied.run.status == AutomationRunStatus::Queued
            || !applied.run.status.holds_workspace_lock();
    }
    s
}
