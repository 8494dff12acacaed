//! `tandem-scheduler`: claims queued runs fleet-wide, dispatches their runnable task nodes to
//! workers, opens approval gates, applies task results and worker progress.
//!
//! Every replica runs the same loops, and any replica may do any piece of work:
//!
//! * **Claim loop** ([`Scheduler::claim_once`]): one transaction per batch under the fleet-wide
//!   claim lock (`tandem_store::claim_runs`): capacity, workspace lock, runtime-context failure,
//!   launch hold, `lease_epoch + 1`, then `dispatch_ready_nodes` on what became running; the tasks
//!   and events go to the outbox in the same transaction. Up to `claim_concurrency` passes are in
//!   flight (a wake-up during a pass starts the next at once; passes take disjoint runs). A full
//!   batch starts the next pass at once; otherwise the loop
//!   waits for a wake-up (`tandem.wake.scheduler`, core NATS) or a jittered poll.
//! * **Results** ([`Scheduler::run_results`]): one durable pull consumer on `TANDEM_RESULTS`
//!   shared by every replica. A result is applied in one transaction (`apply_task_result`, fenced
//!   by attempt and lease epoch: a stale result is dropped and counted), then acknowledged. A
//!   message that is not a result is copied to `tandem.deadletter.results` and terminated.
//! * **Progress** ([`Scheduler::run_progress`]): worker heartbeats on `tandem.progress.*` (core
//!   NATS, queue group), coalesced to at most one fenced activity write per run per flush period.
//! * **Outbox relay** (`tandem_runtime::Relay`): the writer publishes its own rows right after
//!   commit; a background pass picks up anything left behind.
//!
//! After a commit: the relay publishes the new tasks and events, cancel hints go to workers for
//! runs that stopped (`tandem.control.cancel.<run_id>`), and a "capacity freed" wake-up goes to
//! every scheduler when a run released capacity (only replicas whose last pass left runs waiting
//! act on it). The results of one fetched batch share this work.
//!
//! Shutdown (SIGTERM/SIGINT): the loops stop taking new work, finish what they hold (the current
//! claim transaction, the results being applied), flush progress, and return. Nothing is failed or
//! released on exit: this replica's claims stay valid, and any other replica applies their results.

pub mod config;
mod exec;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::StreamExt as _;
use tandem_bus::{
    DeadLetter, Prefix, StreamNames,
    async_nats::{
        self,
        jetstream::{
            self, AckKind,
            consumer::{AckPolicy, PullConsumer, pull},
        },
    },
};
use tandem_core::config::LifecycleSettings;
use tandem_core::protocol::{TaskCancel, TaskProgress, TaskResult};
use tandem_core::{AutomationRunStatus, claim::ClaimOutcome};
use tandem_runtime::{Relay, Shutdown, backoff};
use tandem_store::{ClaimItemOutcome, ClaimLimits, LeaseEpoch, Pool, StoreError, StoreSettings};
use tokio::sync::{Notify, Semaphore};

pub use config::{SchedulerArgs, SchedulerConfig};
pub use exec::ResultDisposition;

/// Name of the one durable consumer on `TANDEM_RESULTS` that every replica binds to.
pub const RESULTS_CONSUMER: &str = "tandem-scheduler-results";
/// Queue group of the progress subscription: each heartbeat reaches one replica.
pub const PROGRESS_QUEUE_GROUP: &str = "tandem-scheduler";
/// Consecutive failed fetches after which the results loop re-binds its consumer.
pub const RESULTS_FETCH_FAILURES_BEFORE_REBIND: u32 = 5;
/// Claim passes whose post-commit work (relay, hints) may run while the next pass claims.
const AFTER_CLAIM_IN_FLIGHT: u32 = 4;
/// Results per transaction below which a fetched batch is not split further.
const RESULTS_PER_TRANSACTION: usize = 16;
/// Claimed runs re-evaluated per transaction by [`Scheduler::tick_claimed`].
const TICK_CHUNK: usize = 50;

/// What one claim pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimSummary {
    pub examined: usize,
    pub claimed: usize,
    pub runtime_context_failed: usize,
    pub launch_held: usize,
    pub waiting_capacity: usize,
    pub waiting_workspace_lock: usize,
    /// Queue reasons written (they changed).
    pub reasons_recorded: usize,
    pub errors: usize,
    pub tasks_dispatched: usize,
    /// The candidate select was full: more queued runs may be claimable right away.
    pub full_batch: bool,
    /// `running` runs fleet-wide when the pass started.
    pub running_before: i64,
}

/// Counters of this replica since it started (the same figures as the Prometheus metrics,
/// readable in-process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub claims: u64,
    pub tasks_dispatched: u64,
    pub results_applied: u64,
    pub results_dropped: u64,
    pub results_deadlettered: u64,
    pub results_retried: u64,
    pub progress_touched: u64,
}

#[derive(Debug, Default)]
struct Counters {
    claims: AtomicU64,
    tasks_dispatched: AtomicU64,
    results_applied: AtomicU64,
    results_dropped: AtomicU64,
    results_deadlettered: AtomicU64,
    results_retried: AtomicU64,
    progress_touched: AtomicU64,
}

/// Post-commit work of one or more transactions, done once for all of them: relay the runs'
/// outbox rows, send cancel hints, wake schedulers (capacity freed) and gate-notifiers (a gate
/// opened).
#[derive(Debug, Default)]
struct AfterCommit {
    relay: Vec<String>,
    /// Outbox rows committed already leased to this replica, to publish from memory.
    leased: Vec<tandem_store::OutboxRow>,
    cancels: Vec<(String, LeaseEpoch)>,
    wake: bool,
    gate_opened: bool,
}

impl AfterCommit {
    fn is_empty(&self) -> bool {
        self.relay.is_empty()
            && self.leased.is_empty()
            && self.cancels.is_empty()
            && !self.wake
            && !self.gate_opened
    }

    fn merge(&mut self, other: AfterCommit) {
        self.relay.extend(other.relay);
        self.leased.extend(other.leased);
        self.cancels.extend(other.cancels);
        self.wake |= other.wake;
        self.gate_opened |= other.gate_opened;
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What applying one result did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultApplied {
    /// Applied and committed; the run is now in `status`.
    Applied {
        status: AutomationRunStatus,
        tasks_dispatched: usize,
    },
    /// Not applied (stale attempt or epoch, unknown run, run no longer running, ...), counted in
    /// `tandem_scheduler_results_dropped_total{reason}`.
    Dropped { reason: String },
}

/// Why a result message could not be handled at all.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResultError {
    /// Not a task result (bad JSON, wrong schema, run id not matching the subject): dead-letter.
    #[error("malformed task result: {0}")]
    Malformed(String),
    /// The database refused for a reason that will not go away by retrying (corrupt row): dead-letter.
    #[error("task result cannot be applied: {0}")]
    Permanent(String),
    /// The database is unavailable or busy: redeliver later.
    #[error("task result not applied yet: {0}")]
    Transient(String),
}

impl ResultError {
    fn from_store(e: StoreError) -> Self {
        if is_transient(&e) {
            ResultError::Transient(e.to_string())
        } else {
            ResultError::Permanent(e.to_string())
        }
    }
}

struct Inner {
    pool: Pool,
    nats: async_nats::Client,
    js: jetstream::Context,
    prefix: Prefix,
    streams: StreamNames,
    relay: Relay,
    config: SchedulerConfig,
    lifecycle: LifecycleSettings,
    store: StoreSettings,
    /// Local claim-loop wake-up (fed by `tandem.wake.scheduler`).
    wake: Notify,
    /// The last claim pass left runs waiting (capacity, workspace lock) or may have (a full
    /// batch, an error): a "capacity freed" wake-up is only worth a pass then.
    runs_waiting: AtomicBool,
    /// Post-claim work (relay, hints) in flight, so the next claim need not wait for it.
    after_claim: Arc<Semaphore>,
    counters: Counters,
}

/// One scheduler replica's state; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("prefix", &self.inner.prefix)
            .field("config", &self.inner.config)
            .finish()
    }
}

fn reason_label(r: tandem_core::QueueReason) -> &'static str {
    match r {
        tandem_core::QueueReason::Capacity => "capacity",
        tandem_core::QueueReason::WorkspaceLock => "workspace_lock",
        tandem_core::QueueReason::RateLimit => "rate_limit",
    }
}

/// Which of `groups` transactions a result subject (one per run) goes to.
fn run_partition(subject: &str, groups: usize) -> usize {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    subject.hash(&mut h);
    usize::try_from(h.finish() % groups.max(1) as u64).unwrap_or(0)
}

fn is_transient(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Db(_) | StoreError::Pool(_) | StoreError::Conflict { .. }
    )
}

impl Scheduler {
    pub fn new(
        pool: Pool,
        nats: async_nats::Client,
        js: jetstream::Context,
        prefix: Prefix,
        config: SchedulerConfig,
        lifecycle: LifecycleSettings,
    ) -> Self {
        let relay = Relay::new(pool.clone(), js.clone(), prefix.clone(), config.relay);
        Self {
            inner: Arc::new(Inner {
                streams: StreamNames::new(&prefix),
                store: StoreSettings::new(lifecycle.gates),
                pool,
                nats,
                js,
                prefix,
                relay,
                config,
                lifecycle,
                wake: Notify::new(),
                runs_waiting: AtomicBool::new(true),
                after_claim: Arc::new(Semaphore::new(AFTER_CLAIM_IN_FLIGHT as usize)),
                counters: Counters::default(),
            }),
        }
    }

    pub fn relay(&self) -> &Relay {
        &self.inner.relay
    }

    /// This replica's counters.
    pub fn stats(&self) -> SchedulerStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SchedulerStats {
            claims: get(&c.claims),
            tasks_dispatched: get(&c.tasks_dispatched),
            results_applied: get(&c.results_applied),
            results_dropped: get(&c.results_dropped),
            results_deadlettered: get(&c.results_deadlettered),
            results_retried: get(&c.results_retried),
            progress_touched: get(&c.progress_touched),
        }
    }

    /// Runs every loop until `shutdown`, then returns once they drained.
    pub async fn run(&self, shutdown: Shutdown) -> anyhow::Result<()> {
        let wake_sub = self
            .inner
            .nats
            .subscribe(tandem_bus::wake_scheduler_subject(&self.inner.prefix))
            .await
            .map_err(|e| anyhow::anyhow!("subscribing to scheduler wake-ups: {e}"))?;
        let progress_sub = self
            .inner
            .nats
            .queue_subscribe(
                tandem_bus::progress_wildcard_subject(&self.inner.prefix),
                PROGRESS_QUEUE_GROUP.to_owned(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("subscribing to worker progress: {e}"))?;
        tracing::info!(
            max_concurrent_runs = self.inner.lifecycle.max_concurrent_runs,
            claim_batch = self.inner.config.claim_batch,
            results_consumer = RESULTS_CONSUMER,
            "scheduler loops starting"
        );
        let wake = {
            let me = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { me.run_wake_listener(wake_sub, shutdown).await })
        };
        let relay = tokio::spawn(self.inner.relay.clone().run(shutdown.clone()));
        tokio::join!(
            self.run_claim_loop(shutdown.clone()),
            self.run_results_with_recovery(shutdown.clone()),
            self.run_progress(progress_sub, shutdown.clone()),
            self.run_tick_loop(shutdown.clone()),
        );
        wake.abort();
        // Post-claim relays still in flight finish before the process exits.
        if let Ok(all) = self
            .inner
            .after_claim
            .acquire_many(AFTER_CLAIM_IN_FLIGHT)
            .await
        {
            drop(all);
        }
        if let Err(e) = relay.await {
            tracing::warn!(error = %e, "outbox relay task failed");
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // claims

    /// One claim transaction, then the post-commit work (relay, wake-up). See the crate docs.
    pub async fn claim_once(&self) -> Result<ClaimSummary, StoreError> {
        let started = Instant::now();
        let limits = ClaimLimits {
            max_concurrent_runs: self.inner.lifecycle.max_concurrent_runs,
            batch: self.inner.config.claim_batch,
            relay_lease: Some(self.inner.relay.settings().lease),
        };
        let gates = self.inner.lifecycle.gates;
        let mut report = tandem_store::claim_runs(&self.inner.pool, limits, &self.inner.store, {
            |run, env| exec::dispatch(run, env, &gates)
        })
        .await?;
        let mut s = ClaimSummary {
            examined: report.items.len(),
            full_batch: report.full_batch,
            running_before: report.running_before,
            ..ClaimSummary::default()
        };
        let mut after = AfterCommit {
            relay: report.runs_with_outbox(),
            leased: std::mem::take(&mut report.leased_outbox),
            ..AfterCommit::default()
        };
        for item in &report.items {
            match &item.result {
                Ok(ClaimItemOutcome::Claimed { dispatch, .. }) => {
                    s.claimed += 1;
                    s.tasks_dispatched += dispatch.effects.tasks.len();
                    after.wake |= dispatch.run.status != AutomationRunStatus::Running;
                    after.gate_opened |=
                        dispatch.run.status == AutomationRunStatus::AwaitingApproval;
                    for run in &dispatch.effects.cancel_tasks_of {
                        after.cancels.push((run.clone(), dispatch.lease_epoch));
                    }
                }
                Ok(ClaimItemOutcome::Settled(a)) => match &a.outcome {
                    ClaimOutcome::RuntimeContextMissing => s.runtime_context_failed += 1,
                    ClaimOutcome::LaunchHeld { .. } => s.launch_held += 1,
                    ClaimOutcome::Claimed | ClaimOutcome::NotQueued(_) => {}
                },
                Ok(ClaimItemOutcome::Waiting {
                    reason, recorded, ..
                }) => {
                    match reason {
                        tandem_core::QueueReason::WorkspaceLock => s.waiting_workspace_lock += 1,
                        _ => s.waiting_capacity += 1,
                    }
                    if *recorded {
                        s.reasons_recorded += 1;
                        metrics::counter!("tandem_scheduler_queue_reasons_recorded_total",
                            "reason" => reason_label(*reason))
                        .increment(1);
                    }
                }
                Err(e) => {
                    s.errors += 1;
                    tracing::warn!(run_id = %item.run_id, error = %e, "claim of run failed");
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        metrics::histogram!("tandem_scheduler_claim_seconds").record(elapsed);
        metrics::counter!("tandem_scheduler_claim_passes_total").increment(1);
        for (outcome, n) in [
            ("claimed", s.claimed),
            ("runtime_context_missing", s.runtime_context_failed),
            ("launch_held", s.launch_held),
            ("error", s.errors),
        ] {
            if n > 0 {
                metrics::counter!("tandem_scheduler_claims_total", "outcome" => outcome)
                    .increment(n as u64);
            }
        }
        if s.tasks_dispatched > 0 {
            metrics::counter!("tandem_scheduler_tasks_dispatched_total")
                .increment(s.tasks_dispatched as u64);
        }
        bump(&self.inner.counters.claims, s.claimed as u64);
        bump(
            &self.inner.counters.tasks_dispatched,
            s.tasks_dispatched as u64,
        );
        metrics::gauge!("tandem_scheduler_running_runs").set(report.running_before as f64);
        if s.claimed > 0 || s.runtime_context_failed > 0 || s.launch_held > 0 {
            tracing::debug!(?s, "claim pass");
        }
        // The relay of this pass runs beside the next pass (bounded; the relay keeps each run's
        // rows in order by itself), so claiming does not wait for PubAcks.
        if !after.is_empty() {
            match self.inner.after_claim.clone().acquire_owned().await {
                Ok(permit) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.finish_commits(after).await;
                        drop(permit);
                    });
                }
                Err(_) => self.finish_commits(after).await,
            }
        }
        Ok(s)
    }

    /// The claim loop, until `shutdown` (the passes in flight finish first). Up to
    /// `claim_concurrency` passes run at once: a wake-up that arrives while a pass is still
    /// writing starts another, so a run enqueued then waits for its own pass only. A full batch
    /// starts the next pass at once; otherwise the next starts on a wake-up or after a jittered
    /// poll. A failed pass holds every new pass off for a growing back-off.
    pub async fn run_claim_loop(&self, shutdown: Shutdown) {
        let poll = self.inner.config.poll_interval;
        let max_in_flight = self.inner.config.claim_concurrency.max(1);
        let fresh_backoff =
            || backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        let mut failures = fresh_backoff();
        let mut in_flight = futures::stream::FuturesUnordered::new();
        // When the next pass starts (once a slot is free), and the back-off floor under it.
        let mut next_pass = tokio::time::Instant::now();
        let mut not_before = next_pass;
        loop {
            let slot_free = in_flight.len() < max_in_flight;
            tokio::select! {
                biased;
                () = shutdown.wait() => break,
                Some(pass) = in_flight.next(), if !in_flight.is_empty() => {
                    let pass: Result<ClaimSummary, StoreError> = pass;
                    let waiting = match &pass {
                        Ok(s) => s.full_batch || s.waiting_capacity > 0
                            || s.waiting_workspace_lock > 0,
                        Err(_) => true,
                    };
                    self.inner.runs_waiting.store(waiting, Ordering::Relaxed);
                    let now = tokio::time::Instant::now();
                    match pass {
                        Ok(s) => {
                            failures = fresh_backoff();
                            if s.full_batch && s.claimed > 0 {
                                next_pass = next_pass.min(now);
                            }
                        }
                        Err(e) => {
                            let d = failures.next_delay();
                            tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64,
                                "claim pass failed");
                            metrics::counter!("tandem_scheduler_claim_errors_total").increment(1);
                            not_before = now + d;
                            next_pass = not_before;
                        }
                    }
                }
                () = self.inner.wake.notified(), if slot_free => {
                    next_pass = next_pass.min(tokio::time::Instant::now().max(not_before));
                }
                () = tokio::time::sleep_until(next_pass), if slot_free => {
                    in_flight.push(self.claim_once());
                    next_pass = tokio::time::Instant::now() + backoff::jittered(poll, 0.5);
                }
            }
        }
        // The passes in flight commit (or roll back) before the loop returns.
        while in_flight.next().await.is_some() {}
    }

    /// Re-evaluates claimed (`running`/`pausing`) runs once with `dispatch_ready_nodes`, in
    /// chunks of `SKIP LOCKED` batches: enforces `max_total_runtime_ms` while attempts run, and
    /// picks up a run left with nothing dispatched. Only runs that could change are read: those
    /// with a runtime limit, and those without worker activity for a tick period (a run with
    /// work in flight reports results or heartbeats). A run with nothing due is not written.
    /// Returns how many runs changed.
    pub async fn tick_claimed(&self) -> Result<usize, StoreError> {
        let idle_ms =
            i64::try_from(self.inner.config.tick_interval.as_millis()).unwrap_or(i64::MAX);
        let ids = tandem_store::claimed_run_ids_to_tick(&self.inner.pool, idle_ms, 100_000).await?;
        let gates = self.inner.lifecycle.gates;
        let mut changed = 0;
        for chunk in ids.chunks(TICK_CHUNK) {
            let items = tandem_store::transition_batch(
                &self.inner.pool,
                &tandem_store::Sweep::Runs(chunk.to_vec()),
                chunk.len(),
                &self.inner.store,
                |run, env| exec::dispatch(run, env, &gates),
            )
            .await?;
            let mut after = AfterCommit::default();
            for item in items {
                let Ok(a) = item.result else { continue };
                if !a.changed {
                    continue;
                }
                changed += 1;
                if !a.outbox_ids.is_empty() {
                    after.relay.push(item.run_id.clone());
                }
                for r in &a.effects.cancel_tasks_of {
                    after.cancels.push((r.clone(), a.lease_epoch));
                }
                after.wake |= !a.run.status.holds_workspace_lock();
                after.gate_opened |= a.run.status == AutomationRunStatus::AwaitingApproval;
                bump(
                    &self.inner.counters.tasks_dispatched,
                    a.effects.tasks.len() as u64,
                );
            }
            self.finish_commits(after).await;
        }
        if changed > 0 {
            metrics::counter!("tandem_scheduler_tick_changed_total").increment(changed as u64);
        }
        Ok(changed)
    }

    /// Runs [`Self::tick_claimed`] every tick period (jittered), until `shutdown`.
    pub async fn run_tick_loop(&self, shutdown: Shutdown) {
        loop {
            let wait = backoff::jittered(self.inner.config.tick_interval, 0.5);
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let started = Instant::now();
            if let Err(e) = self.tick_claimed().await {
                tracing::warn!(error = %e, "re-evaluating claimed runs failed");
            }
            metrics::histogram!("tandem_scheduler_tick_seconds")
                .record(started.elapsed().as_secs_f64());
        }
    }

    async fn run_wake_listener(&self, mut sub: async_nats::Subscriber, shutdown: Shutdown) {
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                m = sub.next() => match m {
                    // Capacity freed matters only if the last pass left runs waiting; any other
                    // hint (a run became claimable) always wakes the claim loop.
                    Some(m) if m.payload.as_ref() == tandem_bus::WAKE_CAPACITY_FREED
                        && !self.inner.runs_waiting.load(Ordering::Relaxed) => {
                        metrics::counter!("tandem_scheduler_wakeups_skipped_total").increment(1);
                    }
                    Some(_) => self.inner.wake.notify_one(),
                    None => return,
                },
            }
        }
    }

    /// Wakes this replica's claim loop now (tests, or after a local change).
    pub fn wake_local(&self) {
        self.inner.wake.notify_one();
    }

    /// A gate opened: gate-notifiers re-read their next due time (a hint; they also poll).
    async fn wake_gate_notifiers(&self) {
        let subject = tandem_bus::wake_gates_subject(&self.inner.prefix);
        if let Err(e) = tandem_bus::wake(&self.inner.nats, subject).await {
            tracing::debug!(error = %e, "gate-notifier wake-up not sent");
        }
    }

    /// After commits: publish the outbox rows of their runs, send cancel hints, wake
    /// gate-notifiers when a gate opened and, when capacity was released, send a "capacity
    /// freed" wake-up to the schedulers.
    async fn finish_commits(&self, after: AfterCommit) {
        if after.gate_opened {
            self.wake_gate_notifiers().await;
        }
        if !after.leased.is_empty() {
            match self.inner.relay.relay_leased(after.leased).await {
                Ok(r) if r.failed > 0 => self.inner.relay.nudge(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "relaying just-committed leased rows failed; they are published when their lease expires");
                    self.inner.relay.nudge();
                }
            }
        }
        if !after.relay.is_empty() {
            match self.inner.relay.relay_runs(&after.relay).await {
                Ok(r) if r.failed > 0 => self.inner.relay.nudge(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "relaying just-committed rows failed; the background relay will");
                    self.inner.relay.nudge();
                }
            }
        }
        for (run_id, epoch) in &after.cancels {
            let hint = TaskCancel {
                run_id: run_id.clone(),
                lease_epoch: Some(epoch.0),
                reason: None,
            };
            let body = serde_json::to_vec(&hint)
                .map(Bytes::from)
                .unwrap_or_default();
            let subject = tandem_bus::cancel_subject(&self.inner.prefix, run_id);
            match self.inner.nats.publish(subject, body).await {
                Ok(()) => metrics::counter!("tandem_scheduler_cancel_hints_total").increment(1),
                Err(e) => tracing::debug!(run_id = %run_id, error = %e, "cancel hint not sent"),
            }
        }
        if after.wake {
            let subject = tandem_bus::wake_scheduler_subject(&self.inner.prefix);
            match tandem_bus::wake_with(&self.inner.nats, subject, tandem_bus::WAKE_CAPACITY_FREED)
                .await
            {
                Ok(()) => metrics::counter!("tandem_scheduler_wakeups_sent_total").increment(1),
                Err(e) => tracing::debug!(error = %e, "wake-up not sent"),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // results

    /// The shared durable pull consumer on `TANDEM_RESULTS` (created by the first replica).
    pub async fn results_consumer(&self) -> anyhow::Result<PullConsumer> {
        let stream = self
            .inner
            .js
            .get_stream(&self.inner.streams.results)
            .await
            .map_err(|e| anyhow::anyhow!("stream {}: {e}", self.inner.streams.results))?;
        let consumer = stream
            .get_or_create_consumer(
                RESULTS_CONSUMER,
                pull::Config {
                    durable_name: Some(RESULTS_CONSUMER.to_owned()),
                    description: Some(
                        "tandem-scheduler: applies task results (all replicas)".into(),
                    ),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.inner.config.results_ack_wait,
                    filter_subject: self
                        .inner
                        .prefix
                        .subject(&format!("{}.>", tandem_bus::subject::RESULTS)),
                    max_ack_pending: 4096,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "consumer {RESULTS_CONSUMER} on {}: {e}",
                    self.inner.streams.results
                )
            })?;
        Ok(consumer)
    }

    /// Applies one result (see [`Self::apply_results`]).
    pub async fn apply_result(&self, result: &TaskResult) -> Result<ResultApplied, ResultError> {
        self.apply_results(std::slice::from_ref(result))
            .await?
            .pop()
            .unwrap_or_else(|| Err(ResultError::Permanent("no outcome for the result".into())))
    }

    /// Applies results in one transaction: their runs are locked in run id order, each run's
    /// results are applied in arrival order (fenced by attempt and lease epoch inside the core
    /// transition), and every changed run is written with set statements, its activity time
    /// moved to the database clock (a result is worker activity). Then relays, cancels and
    /// wakes once for the batch. Returns one outcome per result, in order; dropped results are
    /// counted.
    pub async fn apply_results(
        &self,
        results: &[TaskResult],
    ) -> Result<Vec<Result<ResultApplied, ResultError>>, ResultError> {
        let (outcomes, after) = self.apply_results_deferred(results).await?;
        self.finish_commits(after).await;
        Ok(outcomes)
    }

    /// [`Self::apply_results`] without the post-commit work, which it returns so a caller that
    /// applied several batches does it once for all of them.
    async fn apply_results_deferred(
        &self,
        results: &[TaskResult],
    ) -> Result<(Vec<Result<ResultApplied, ResultError>>, AfterCommit), ResultError> {
        let started = Instant::now();
        let gates = self.inner.lifecycle.gates;
        let mut by_run: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, r) in results.iter().enumerate() {
            by_run.entry(r.run_id.as_str()).or_default().push(i);
        }
        let run_ids: Vec<String> = by_run.keys().map(|id| (*id).to_owned()).collect();
        let (items, leased) = tandem_store::transition_runs_relayed(
            &self.inner.pool,
            &run_ids,
            &self.inner.store,
            true,
            self.inner.relay.settings().lease,
            |run, env| {
                let mut outcomes = Vec::new();
                let mut changed = false;
                let mut effects = tandem_core::Effects::default();
                for &i in by_run.get(run.run_id.as_str()).into_iter().flatten() {
                    let t = exec::apply_result(run, env, &results[i], &gates);
                    changed |= t.changed;
                    effects.append(t.effects);
                    outcomes.push((i, t.outcome));
                }
                tandem_core::Transition {
                    outcome: outcomes,
                    changed,
                    effects,
                }
            },
        )
        .await
        .map_err(ResultError::from_store)?;

        let mut outcomes: Vec<Option<Result<ResultApplied, ResultError>>> =
            results.iter().map(|_| None).collect();
        // Runs whose new outbox rows this replica holds leased and publishes from memory.
        let leased_runs: HashSet<String> = leased.iter().map(|r| r.run_id.clone()).collect();
        let mut after = AfterCommit {
            leased,
            ..AfterCommit::default()
        };
        for item in items {
            let indices = by_run
                .get(item.run_id.as_str())
                .cloned()
                .unwrap_or_default();
            let applied = match item.result {
                Ok(a) => a,
                Err(StoreError::NotFound(_)) => {
                    for i in indices {
                        outcomes[i] = Some(Ok(self.dropped("unknown_run", &results[i])));
                    }
                    continue;
                }
                Err(e) => {
                    let e = ResultError::from_store(e);
                    for i in indices {
                        outcomes[i] = Some(Err(e.clone()));
                    }
                    continue;
                }
            };
            let status = applied.run.status;
            let mut tasks = applied.effects.tasks.len();
            for (i, disposition) in &applied.outcome {
                let outcome = match disposition {
                    ResultDisposition::Dropped(reason) => self.dropped(reason, &results[*i]),
                    ResultDisposition::Applied => {
                        metrics::counter!("tandem_scheduler_results_applied_total").increment(1);
                        bump(&self.inner.counters.results_applied, 1);
                        metrics::histogram!("tandem_scheduler_result_seconds")
                            .record(started.elapsed().as_secs_f64());
                        // The run's dispatches are reported once, with its first applied result.
                        ResultApplied::Applied {
                            status,
                            tasks_dispatched: std::mem::take(&mut tasks),
                        }
                    }
                };
                outcomes[*i] = Some(Ok(outcome));
            }
            if !applied.changed {
                continue;
            }
            let dispatched = applied.effects.tasks.len();
            if dispatched > 0 {
                metrics::counter!("tandem_scheduler_tasks_dispatched_total")
                    .increment(dispatched as u64);
                bump(&self.inner.counters.tasks_dispatched, dispatched as u64);
            }
            after.cancels.extend(
                applied
                    .effects
                    .cancel_tasks_of
                    .iter()
                    .map(|r| (r.clone(), applied.lease_epoch)),
            );
            if !applied.outbox_ids.is_empty() && !leased_runs.contains(&item.run_id) {
                after.relay.push(item.run_id.clone());
            }
            after.wake |=
                status != AutomationRunStatus::Running && status != AutomationRunStatus::Pausing;
            after.gate_opened |= status == AutomationRunStatus::AwaitingApproval;
        }
        let outcomes = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(ResultError::Permanent("result not reached".into()))))
            .collect();
        Ok((outcomes, after))
    }

    fn dropped(&self, reason: &str, result: &TaskResult) -> ResultApplied {
        metrics::counter!("tandem_scheduler_results_dropped_total", "reason" => reason.to_owned())
            .increment(1);
        bump(&self.inner.counters.results_dropped, 1);
        tracing::info!(
            run_id = %result.run_id,
            node_id = %result.node_id,
            attempt = result.attempt,
            lease_epoch = result.lease_epoch,
            reason,
            "task result dropped"
        );
        ResultApplied::Dropped {
            reason: reason.to_owned(),
        }
    }

    /// Parses a result message. The subject must name the same run as the payload.
    pub fn parse_result(&self, subject: &str, payload: &[u8]) -> Result<TaskResult, ResultError> {
        let result: TaskResult =
            serde_json::from_slice(payload).map_err(|e| ResultError::Malformed(e.to_string()))?;
        let expected = tandem_bus::result_subject(&self.inner.prefix, &result.run_id);
        if subject != expected {
            return Err(ResultError::Malformed(format!(
                "result for run {:?} arrived on subject {subject:?} (expected {expected:?})",
                result.run_id
            )));
        }
        Ok(result)
    }

    /// Handles one delivered result message (see [`Self::handle_result_messages`]).
    pub async fn handle_result_message(&self, msg: jetstream::Message) {
        self.handle_result_messages(vec![msg]).await;
    }

    /// Handles delivered result messages: parse, apply the results in one transaction, then
    /// settle each message: ack; transient failure → Nak with delay; malformed or permanently
    /// failing → dead-letter copy, then Term.
    pub async fn handle_result_messages(&self, msgs: Vec<jetstream::Message>) {
        let after = self.handle_result_messages_deferred(msgs).await;
        self.finish_commits(after).await;
    }

    /// [`Self::handle_result_messages`] without the post-commit work, which it returns. The
    /// messages are settled first: the results they carry are committed by then.
    async fn handle_result_messages_deferred(&self, msgs: Vec<jetstream::Message>) -> AfterCommit {
        let mut after = AfterCommit::default();
        let mut valid = Vec::with_capacity(msgs.len());
        let mut results = Vec::with_capacity(msgs.len());
        let mut settle = Vec::new();
        for msg in msgs {
            match self.parse_result(msg.subject.as_str(), &msg.payload) {
                Ok(r) => {
                    results.push(r);
                    valid.push(msg);
                }
                Err(e) => settle.push((msg, Err(e))),
            }
        }
        if !results.is_empty() {
            match self.apply_results_deferred(&results).await {
                Ok((outcomes, deferred)) => {
                    after = deferred;
                    settle.extend(
                        valid
                            .into_iter()
                            .zip(outcomes.into_iter().map(|o| o.map(|_| ()))),
                    );
                }
                Err(e) => settle.extend(valid.into_iter().map(|m| (m, Err(e.clone())))),
            }
        }
        futures::future::join_all(
            settle
                .into_iter()
                .map(|(msg, outcome)| self.settle_result_message(msg, outcome)),
        )
        .await;
        after
    }

    /// Acknowledges a handled result message according to its outcome.
    async fn settle_result_message(
        &self,
        msg: jetstream::Message,
        outcome: Result<(), ResultError>,
    ) {
        let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
        let ack = match outcome {
            // A plain ack: the result is committed, so an ack that gets lost only redelivers a
            // result the fence then drops (its attempt is no longer current).
            Ok(()) => msg.ack().await,
            Err(ResultError::Transient(e)) => {
                let delay = Duration::from_millis(500)
                    .saturating_mul(u32::try_from(delivered.clamp(1, 20)).unwrap_or(20));
                tracing::warn!(subject = %msg.subject, error = %e, delivered, "task result not applied; redelivering later");
                metrics::counter!("tandem_scheduler_results_retried_total").increment(1);
                bump(&self.inner.counters.results_retried, 1);
                msg.ack_with(AckKind::Nak(Some(delay))).await
            }
            Err(e) => {
                let reason = match &e {
                    ResultError::Malformed(_) => "malformed",
                    _ => "unapplicable",
                };
                match self.dead_letter(&msg, &e.to_string()).await {
                    Ok(()) => {
                        metrics::counter!("tandem_scheduler_results_deadlettered_total", "reason" => reason)
                            .increment(1);
                        bump(&self.inner.counters.results_deadlettered, 1);
                        tracing::error!(subject = %msg.subject, error = %e, "task result dead-lettered");
                        msg.ack_with(AckKind::Term).await
                    }
                    Err(dl) => {
                        tracing::warn!(subject = %msg.subject, error = %dl, "dead-lettering failed; redelivering later");
                        msg.ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                            .await
                    }
                }
            }
        };
        if let Err(e) = ack {
            tracing::warn!(error = %e, "acknowledging a result message failed; it will be redelivered");
        }
    }

    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        error: &str,
    ) -> Result<(), tandem_bus::BusError> {
        let (stream, sequence, delivered) = match msg.info() {
            Ok(i) => (
                i.stream.to_owned(),
                i.stream_sequence,
                i.delivered.max(0) as u64,
            ),
            Err(_) => (self.inner.streams.results.clone(), 0, 1),
        };
        let letter = DeadLetter {
            kind: tandem_bus::subject::DEADLETTER_RESULTS.to_owned(),
            subject: msg.subject.to_string(),
            stream,
            sequence,
            delivered,
            payload: msg.payload.clone(),
            headers: msg.headers.clone(),
            error: error.to_owned(),
        };
        tandem_bus::publish_dead_letter(&self.inner.js, &self.inner.prefix, &letter).await?;
        Ok(())
    }

    /// Binds the shared results consumer (creating it if needed) and runs [`Self::run_results`];
    /// re-binds with backoff when binding fails or the consumer stops answering (deleted, NATS
    /// restarted without its state), until `shutdown`.
    pub async fn run_results_with_recovery(&self, shutdown: Shutdown) {
        let mut failures = backoff::Backoff::default();
        while !shutdown.is_triggered() {
            match self.results_consumer().await {
                Ok(consumer) => {
                    failures = backoff::Backoff::default();
                    self.run_results(consumer, shutdown.clone()).await;
                }
                Err(e) => {
                    let d = failures.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64,
                        "binding the results consumer failed; retrying");
                    tokio::select! {
                        () = shutdown.wait() => return,
                        () = tokio::time::sleep(d) => {}
                    }
                }
            }
        }
    }

    /// The results loop on one consumer, until `shutdown` (the batch in progress is applied and
    /// acked first) or until fetching failed [`RESULTS_FETCH_FAILURES_BEFORE_REBIND`] times in a
    /// row.
    pub async fn run_results(&self, consumer: PullConsumer, shutdown: Shutdown) {
        let batch = self.inner.config.results_batch;
        let concurrency = self.inner.config.results_concurrency;
        let mut failures = backoff::Backoff::default();
        while !shutdown.is_triggered() {
            if failures.attempt() >= RESULTS_FETCH_FAILURES_BEFORE_REBIND {
                return;
            }
            let messages = consumer
                .fetch()
                .max_messages(batch)
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    let d = failures.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "fetching results failed");
                    tokio::select! {
                        () = shutdown.wait() => return,
                        () = tokio::time::sleep(d) => {}
                    }
                    continue;
                }
            };
            failures = backoff::Backoff::default();
            let msgs: Vec<jetstream::Message> = messages
                .filter_map(|m| async move {
                    m.map_err(|e| tracing::debug!(error = %e, "result fetch item failed"))
                        .ok()
                })
                .collect()
                .await;
            // Up to `concurrency` transactions per batch, each owning whole runs (a run's results
            // stay in order, and two transactions never wait on each other's rows).
            let groups = msgs
                .len()
                .div_ceil(RESULTS_PER_TRANSACTION)
                .clamp(1, concurrency);
            let mut parts: Vec<Vec<jetstream::Message>> = (0..groups).map(|_| Vec::new()).collect();
            for msg in msgs {
                let part = run_partition(msg.subject.as_str(), groups);
                parts[part].push(msg);
            }
            // Their post-commit work (relay, hints, wake-ups) is done once for the whole batch.
            let mut after = AfterCommit::default();
            for part in futures::future::join_all(
                parts
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| self.handle_result_messages_deferred(p)),
            )
            .await
            {
                after.merge(part);
            }
            self.finish_commits(after).await;
        }
    }

    // -----------------------------------------------------------------------------------------
    // progress

    /// Records coalesced progress: one fenced activity write per run. Returns how many runs were
    /// touched.
    pub async fn flush_progress(&self, pending: &mut HashMap<String, i64>) -> usize {
        let mut touched = 0;
        for (run_id, epoch) in pending.drain() {
            match tandem_store::touch_activity(&self.inner.pool, &run_id, LeaseEpoch(epoch)).await {
                Ok(_) => {
                    touched += 1;
                    bump(&self.inner.counters.progress_touched, 1);
                    metrics::counter!("tandem_scheduler_progress_total", "outcome" => "touched")
                        .increment(1);
                }
                Err(
                    StoreError::Fenced { .. } | StoreError::Invalid(_) | StoreError::NotFound(_),
                ) => {
                    metrics::counter!("tandem_scheduler_progress_total", "outcome" => "stale")
                        .increment(1);
                }
                Err(e) => {
                    metrics::counter!("tandem_scheduler_progress_total", "outcome" => "error")
                        .increment(1);
                    tracing::debug!(run_id = %run_id, error = %e, "recording progress failed");
                }
            }
        }
        touched
    }

    /// The progress loop: collects heartbeats, writes them once per flush period, until
    /// `shutdown` (pending heartbeats are flushed first).
    pub async fn run_progress(&self, mut sub: async_nats::Subscriber, shutdown: Shutdown) {
        let mut pending: HashMap<String, i64> = HashMap::new();
        let mut tick = tokio::time::interval(self.inner.config.progress_flush);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.wait() => break,
                _ = tick.tick() => {
                    self.flush_progress(&mut pending).await;
                }
                m = sub.next() => match m {
                    Some(msg) => match serde_json::from_slice::<TaskProgress>(&msg.payload) {
                        Ok(p) => {
                            metrics::counter!("tandem_scheduler_progress_total", "outcome" => "received").increment(1);
                            let e = pending.entry(p.run_id).or_insert(p.lease_epoch);
                            *e = (*e).max(p.lease_epoch);
                        }
                        Err(e) => {
                            metrics::counter!("tandem_scheduler_progress_total", "outcome" => "malformed").increment(1);
                            tracing::debug!(subject = %msg.subject, error = %e, "malformed progress message ignored");
                        }
                    },
                    None => break,
                },
            }
        }
        self.flush_progress(&mut pending).await;
    }
}
