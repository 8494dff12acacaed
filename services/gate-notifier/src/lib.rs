//! `tandem-gate-notifier`: applies approval gate policies (expire → cancel, escalate, remind) and
//! stale-gate marking (spec §3.10, §3.11), publishes the gate events, and links the protected
//! audit chain.
//!
//! Every replica runs the same loops and any replica may act on any gate:
//!
//! * **Gate loop** ([`GateNotifier::run`]): one transaction per batch of due gates
//!   ([`sweep_due_gates`]: `tandem_store::transition_batch` with `Sweep::DueGates`, i.e. awaiting
//!   runs whose indexed `next_action_at_ms` is due by the database clock, `FOR UPDATE SKIP
//!   LOCKED`). Each locked row goes through `tandem_core::gate::process_gate_policies` at the
//!   database's `now`; the row, its lifecycle records, audit rows and outbox events commit
//!   together. The core decides due-ness from the locked row, so N replicas act once per due
//!   step. A full batch that made progress is followed at once by the next; otherwise the loop
//!   sleeps until the earliest `next_action_at_ms` (computed against the database clock, capped
//!   by the safety poll `TANDEM_GATE_NOTIFIER_POLL_MS`) or until a wake-up arrives on
//!   `tandem.wake.gates` (core NATS, a hint only). A row indexed as due under other gate
//!   settings (a writer configured with other `TANDEM_APPROVAL_GATE_*` values) is rewritten
//!   unchanged so its index entry follows this replica's settings ([`GateOutcome::Rescheduled`]);
//!   a row the core cannot act on is counted and left alone ([`GateOutcome::Stuck`]), and a batch
//!   of only such rows is not repeated before the safety poll.
//! * **Outbox relay** (`tandem_runtime::Relay`): the rows a batch wrote are handed to a writer
//!   relay task right after commit (the gate loop never waits on NATS, so gate actions stay on
//!   time while NATS is down); the background relay takes anything left behind.
//! * **Audit chainer**: `tandem_store::link_audit_chain` every `TANDEM_AUDIT_LINK_MS` (one linker
//!   at a time fleet-wide, by an advisory lock in the store).
//!
//! Shutdown (SIGTERM/SIGINT): the loops stop taking work, the transaction in progress commits,
//! the writer relay publishes what it was handed, and [`GateNotifier::run`] returns.

pub mod config;

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use tandem_bus::{Prefix, async_nats};
use tandem_core::config::LifecycleSettings;
use tandem_core::gate::{GateAction, process_gate_policies};
use tandem_core::{AutomationV2RunRecord, Effects, Millis, Transition};
use tandem_runtime::{Relay, Shutdown, backoff};
use tandem_store::{MAX_BATCH, Pool, StoreError, StoreSettings, Sweep, TransitionEnv};
use tokio::sync::{Notify, mpsc};

pub use config::{GateNotifierArgs, GateNotifierConfig};

/// Shortest wait before retrying when gates are due but another replica holds them.
const LOCKED_RETRY: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// One selected run

/// What the gate-notifier did with one run it selected as due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateOutcome {
    /// `process_gate_policies` applied these actions (in order).
    Acted {
        actions: Vec<GateAction>,
        /// `now − due time` by this replica's settings (how late the action is).
        lag_ms: Option<u64>,
    },
    /// Nothing is due by this replica's gate settings: the row's `next_action_at_ms` had been
    /// computed with other settings (a writer configured differently). The row is rewritten
    /// unchanged so the index holds this replica's next action time (`None`: never).
    Rescheduled { next_action_at_ms: Option<Millis> },
    /// Due by the index and by this replica's settings, yet the core has nothing to do (e.g. an
    /// awaiting run whose open gate already has a settled decision, which the sweeper's recovery
    /// settles). Nothing is written; the row stays due and is counted.
    Stuck { due_at_ms: Millis },
}

/// The transition the gate-notifier applies to a locked due run: the core's gate policies at the
/// database's `now` (spec §3.10, §3.11). Pure; public for tests and benchmarks.
pub fn gate_transition(
    run: &mut AutomationV2RunRecord,
    env: &TransitionEnv,
    store: &StoreSettings,
) -> Transition<GateOutcome> {
    let due_at = tandem_store::next_action_at(run, store);
    let applied = process_gate_policies(run, &store.gates, env.now_ms);
    if applied.changed {
        return Transition {
            outcome: GateOutcome::Acted {
                actions: applied.outcome,
                lag_ms: due_at.map(|d| env.now_ms.saturating_sub(d)),
            },
            changed: true,
            effects: applied.effects,
        };
    }
    match due_at {
        Some(due_at_ms) if due_at_ms <= env.now_ms => {
            Transition::unchanged(GateOutcome::Stuck { due_at_ms })
        }
        // The row was selected as due (its column is at or before `now`), but by these settings
        // the next action is later or never: persisting the unchanged run rewrites the column.
        next => Transition {
            outcome: GateOutcome::Rescheduled {
                next_action_at_ms: next,
            },
            changed: true,
            effects: Effects::default(),
        },
    }
}

/// The metric label of an action.
pub fn action_kind(a: &GateAction) -> &'static str {
    if matches!(a, GateAction::Expired { .. }) {
        "expired"
    } else if matches!(a, GateAction::Escalated { .. }) {
        "escalated"
    } else if matches!(a, GateAction::Reminded { .. }) {
        "reminded"
    } else if matches!(a, GateAction::MarkedStale { .. }) {
        "marked_stale"
    } else {
        "other"
    }
}

// ---------------------------------------------------------------------------------------------
// One batch

/// Gate actions by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActionCounts {
    pub expired: u64,
    pub escalated: u64,
    pub reminded: u64,
    pub marked_stale: u64,
    pub other: u64,
}

impl ActionCounts {
    fn add_action(&mut self, a: &GateAction) {
        match action_kind(a) {
            "expired" => self.expired += 1,
            "escalated" => self.escalated += 1,
            "reminded" => self.reminded += 1,
            "marked_stale" => self.marked_stale += 1,
            _ => self.other += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.expired + self.escalated + self.reminded + self.marked_stale + self.other
    }
}

/// What one batch ([`sweep_due_gates`]) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Runs selected (locked) as due.
    pub selected: usize,
    /// The select returned `limit` rows: more may be due right away.
    pub full_batch: bool,
    /// Runs whose gate policies acted (written with effects).
    pub changed: usize,
    pub actions: ActionCounts,
    /// Runs rewritten only to move `next_action_at_ms` (see [`GateOutcome::Rescheduled`]).
    pub rescheduled: usize,
    /// Runs due with nothing to do (see [`GateOutcome::Stuck`]).
    pub stuck: Vec<String>,
    /// Runs whose transition failed and was rolled back to its savepoint.
    pub errors: usize,
    /// Runs that wrote outbox rows, for the writer relay.
    pub runs_with_outbox: Vec<String>,
    /// Lateness of each acting run (`now − due`), in ms.
    pub lag_ms: Vec<u64>,
    /// The database clock the last acting run saw.
    pub now_ms: Option<Millis>,
}

impl SweepReport {
    /// Runs this batch moved on (acted on or rescheduled): a batch without progress is not
    /// repeated at once, whatever is still due.
    pub fn progress(&self) -> usize {
        self.changed + self.rescheduled
    }
}

/// One gate-notifier transaction: locks up to `limit` (≤ `tandem_store::MAX_BATCH`) due awaiting
/// runs other replicas do not hold, applies [`gate_transition`] to each and commits row,
/// lifecycle, audit and outbox together. Needs only PostgreSQL (no NATS): relaying the written
/// outbox rows is the caller's job (`runs_with_outbox`).
pub async fn sweep_due_gates(
    pool: &Pool,
    limit: usize,
    store: &StoreSettings,
) -> Result<SweepReport, StoreError> {
    let limit = limit.clamp(1, MAX_BATCH);
    let items = tandem_store::transition_batch(pool, &Sweep::DueGates, limit, store, |run, env| {
        gate_transition(run, env, store)
    })
    .await?;
    let mut r = SweepReport {
        selected: items.len(),
        full_batch: items.len() >= limit,
        ..SweepReport::default()
    };
    for item in items {
        let applied = match item.result {
            Ok(a) => a,
            Err(e) => {
                r.errors += 1;
                tracing::warn!(run_id = %item.run_id, error = %e, "gate policies not applied to run");
                continue;
            }
        };
        match &applied.outcome {
            GateOutcome::Acted { actions, lag_ms } => {
                r.changed += 1;
                for a in actions {
                    r.actions.add_action(a);
                }
                r.lag_ms.extend(*lag_ms);
                r.now_ms = Some(applied.now_ms);
            }
            GateOutcome::Rescheduled { next_action_at_ms } => {
                r.rescheduled += 1;
                tracing::info!(run_id = %item.run_id, next_action_at_ms = ?next_action_at_ms,
                    "gate was indexed as due with other gate settings; rescheduled with this replica's");
            }
            GateOutcome::Stuck { due_at_ms } => {
                tracing::warn!(run_id = %item.run_id, due_at_ms,
                    "gate is due but its policies have nothing to do; left for recovery");
                r.stuck.push(item.run_id.clone());
            }
        }
        if !applied.outbox_ids.is_empty() {
            r.runs_with_outbox.push(item.run_id);
        }
    }
    Ok(r)
}

/// The database clock in ms.
pub async fn db_clock_ms(pool: &Pool) -> Result<Millis, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached("SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint")
        .await?;
    let v: i64 = client.query_one(&stmt, &[]).await?.try_get(0)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("database clock {v} is negative")))
}

/// How long until the earliest gate action is due, by the database clock (zero when one is due
/// now); `None` when no awaiting gate will ever need the notifier.
pub async fn until_next_gate_action(pool: &Pool) -> Result<Option<Duration>, StoreError> {
    let Some(next) = tandem_store::next_gate_action_at(pool).await? else {
        return Ok(None);
    };
    let now = db_clock_ms(pool).await?;
    Ok(Some(Duration::from_millis(next.saturating_sub(now))))
}

/// Sends a `tandem.wake.gates` hint (e.g. after opening a gate whose first action is due soon).
pub async fn wake_gate_notifiers(
    nats: &async_nats::Client,
    prefix: &Prefix,
) -> Result<(), tandem_bus::BusError> {
    tandem_bus::wake(nats, tandem_bus::wake_gates_subject(prefix)).await
}

// ---------------------------------------------------------------------------------------------
// The service

/// Counters of this replica since it started (the same figures as the Prometheus metrics,
/// readable in-process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GateNotifierStats {
    pub batches: u64,
    pub runs_changed: u64,
    pub actions: ActionCounts,
    pub rescheduled: u64,
    pub stuck: u64,
    pub run_errors: u64,
    pub batch_errors: u64,
    pub relayed_published: u64,
    pub relayed_duplicates: u64,
    pub relay_failed: u64,
    pub audit_linked: u64,
    pub wakeups: u64,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    runs_changed: AtomicU64,
    expired: AtomicU64,
    escalated: AtomicU64,
    reminded: AtomicU64,
    marked_stale: AtomicU64,
    other: AtomicU64,
    rescheduled: AtomicU64,
    stuck: AtomicU64,
    run_errors: AtomicU64,
    batch_errors: AtomicU64,
    relayed_published: AtomicU64,
    relayed_duplicates: AtomicU64,
    relay_failed: AtomicU64,
    audit_linked: AtomicU64,
    wakeups: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Where the gate loop sends the runs whose outbox rows it just committed.
enum RelaySink {
    /// Relay right away, in the loop (tests, benchmarks).
    Inline,
    /// Hand to the writer relay task (the service): the loop never waits on NATS.
    Task(mpsc::UnboundedSender<Vec<String>>),
}

struct Inner {
    pool: Pool,
    nats: async_nats::Client,
    prefix: Prefix,
    relay: Relay,
    config: GateNotifierConfig,
    store: StoreSettings,
    /// Local gate-loop wake-up (fed by `tandem.wake.gates`).
    wake: Notify,
    counters: Counters,
}

/// One gate-notifier replica's state; cheap to clone.
#[derive(Clone)]
pub struct GateNotifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GateNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateNotifier")
            .field("prefix", &self.inner.prefix)
            .field("config", &self.inner.config)
            .field("gates", &self.inner.store.gates)
            .finish()
    }
}

impl GateNotifier {
    pub fn new(
        pool: Pool,
        nats: async_nats::Client,
        js: async_nats::jetstream::Context,
        prefix: Prefix,
        config: GateNotifierConfig,
        lifecycle: LifecycleSettings,
    ) -> Self {
        let relay = Relay::new(pool.clone(), js, prefix.clone(), config.relay);
        Self {
            inner: Arc::new(Inner {
                store: StoreSettings::new(lifecycle.gates),
                pool,
                nats,
                prefix,
                relay,
                config,
                wake: Notify::new(),
                counters: Counters::default(),
            }),
        }
    }

    pub fn relay(&self) -> &Relay {
        &self.inner.relay
    }

    pub fn store_settings(&self) -> &StoreSettings {
        &self.inner.store
    }

    /// This replica's counters.
    pub fn stats(&self) -> GateNotifierStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GateNotifierStats {
            batches: get(&c.batches),
            runs_changed: get(&c.runs_changed),
            actions: ActionCounts {
                expired: get(&c.expired),
                escalated: get(&c.escalated),
                reminded: get(&c.reminded),
                marked_stale: get(&c.marked_stale),
                other: get(&c.other),
            },
            rescheduled: get(&c.rescheduled),
            stuck: get(&c.stuck),
            run_errors: get(&c.run_errors),
            batch_errors: get(&c.batch_errors),
            relayed_published: get(&c.relayed_published),
            relayed_duplicates: get(&c.relayed_duplicates),
            relay_failed: get(&c.relay_failed),
            audit_linked: get(&c.audit_linked),
            wakeups: get(&c.wakeups),
        }
    }

    /// Runs every loop until `shutdown`, then returns once they drained.
    pub async fn run(&self, shutdown: Shutdown) -> anyhow::Result<()> {
        let wake_sub = self
            .inner
            .nats
            .subscribe(tandem_bus::wake_gates_subject(&self.inner.prefix))
            .await
            .map_err(|e| anyhow::anyhow!("subscribing to gate wake-ups: {e}"))?;
        tracing::info!(
            batch = self.inner.config.batch,
            poll_ms = self.inner.config.poll_interval.as_millis() as u64,
            audit_link_ms = self.inner.config.audit_link_interval.map(|d| d.as_millis() as u64),
            default_expires_after_ms = ?self.inner.store.gates.expires_after_ms,
            default_on_expiry = self.inner.store.gates.on_expiry.as_str(),
            stale_after_ms = self.inner.store.gates.stale_after_ms,
            "gate-notifier loops starting"
        );
        let wake = {
            let me = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { me.run_wake_listener(wake_sub, shutdown).await })
        };
        let relay = tokio::spawn(self.inner.relay.clone().run(shutdown.clone()));
        let (tx, rx) = mpsc::unbounded_channel();
        let gates = async {
            self.gate_loop(shutdown.clone(), RelaySink::Task(tx)).await;
        };
        tokio::join!(
            gates,
            self.run_writer_relay(rx),
            self.run_audit_chainer(shutdown.clone()),
        );
        wake.abort();
        if let Err(e) = relay.await {
            tracing::warn!(error = %e, "outbox relay task failed");
        }
        Ok(())
    }

    /// Wakes this replica's gate loop now (tests, or after a local change).
    pub fn wake_local(&self) {
        self.inner.wake.notify_one();
    }

    /// One batch, then the writer relay of its rows, inline. See [`sweep_due_gates`].
    pub async fn sweep_once(&self) -> Result<SweepReport, StoreError> {
        let report = self.pass().await?;
        self.relay_now(&report.runs_with_outbox).await;
        Ok(report)
    }

    /// The gate loop with the writer relay inline (tests and benchmarks; the service uses
    /// [`Self::run`], whose gate loop never waits on NATS), until `shutdown`.
    pub async fn run_gate_loop(&self, shutdown: Shutdown) {
        self.gate_loop(shutdown, RelaySink::Inline).await;
    }

    /// One batch with metrics and counters.
    async fn pass(&self) -> Result<SweepReport, StoreError> {
        let started = Instant::now();
        let result =
            sweep_due_gates(&self.inner.pool, self.inner.config.batch, &self.inner.store).await;
        metrics::histogram!("tandem_gate_notifier_batch_seconds")
            .record(started.elapsed().as_secs_f64());
        let c = &self.inner.counters;
        let r = match result {
            Ok(r) => r,
            Err(e) => {
                bump(&c.batch_errors, 1);
                metrics::counter!("tandem_gate_notifier_batches_total", "outcome" => "error")
                    .increment(1);
                return Err(e);
            }
        };
        bump(&c.batches, 1);
        let outcome = if r.changed > 0 {
            "changed"
        } else if r.selected > 0 {
            "unchanged"
        } else {
            "empty"
        };
        metrics::counter!("tandem_gate_notifier_batches_total", "outcome" => outcome).increment(1);
        bump(&c.runs_changed, r.changed as u64);
        for (kind, n, counter) in [
            ("expired", r.actions.expired, &c.expired),
            ("escalated", r.actions.escalated, &c.escalated),
            ("reminded", r.actions.reminded, &c.reminded),
            ("marked_stale", r.actions.marked_stale, &c.marked_stale),
            ("other", r.actions.other, &c.other),
        ] {
            if n > 0 {
                bump(counter, n);
                metrics::counter!("tandem_gate_notifier_actions_total", "action" => kind)
                    .increment(n);
            }
        }
        for (name, n, counter) in [
            (
                "tandem_gate_notifier_rescheduled_total",
                r.rescheduled as u64,
                &c.rescheduled,
            ),
            (
                "tandem_gate_notifier_stuck_total",
                r.stuck.len() as u64,
                &c.stuck,
            ),
            (
                "tandem_gate_notifier_run_errors_total",
                r.errors as u64,
                &c.run_errors,
            ),
        ] {
            if n > 0 {
                bump(counter, n);
                metrics::counter!(name).increment(n);
            }
        }
        for lag in &r.lag_ms {
            metrics::histogram!("tandem_gate_notifier_action_lag_seconds")
                .record(*lag as f64 / 1000.0);
        }
        if r.changed > 0 {
            tracing::debug!(
                selected = r.selected,
                changed = r.changed,
                actions = r.actions.total(),
                "gate batch"
            );
        }
        Ok(r)
    }

    async fn gate_loop(&self, shutdown: Shutdown, sink: RelaySink) {
        let new_backoff =
            || backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        let mut failures = new_backoff();
        loop {
            if shutdown.is_triggered() {
                return;
            }
            let wait = match self.pass().await {
                Ok(r) => {
                    failures = new_backoff();
                    if !r.runs_with_outbox.is_empty() {
                        match &sink {
                            RelaySink::Inline => self.relay_now(&r.runs_with_outbox).await,
                            RelaySink::Task(tx) => {
                                if tx.send(r.runs_with_outbox.clone()).is_err() {
                                    // The writer relay is gone; the background relay publishes.
                                    self.inner.relay.nudge();
                                }
                            }
                        }
                    }
                    if r.full_batch && r.progress() > 0 {
                        continue;
                    }
                    self.idle_wait(&r).await
                }
                Err(e) => {
                    let d = failures.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "gate batch failed");
                    d
                }
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                () = shutdown.wait() => return,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// How long to sleep after a batch that did not fill up: until the earliest next action by
    /// the database clock, at most the (jittered) safety poll.
    async fn idle_wait(&self, r: &SweepReport) -> Duration {
        let cap = backoff::jittered(self.inner.config.poll_interval, 0.5);
        let until = match until_next_gate_action(&self.inner.pool).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "reading the next gate action failed; polling");
                return cap;
            }
        };
        match until {
            None => cap,
            Some(d) if d.is_zero() => {
                if r.selected == 0 {
                    // Due rows exist but other replicas hold them.
                    LOCKED_RETRY
                } else if r.progress() == 0 {
                    // Only rows nothing can be done with (stuck, or failing) are due: do not
                    // spin on them.
                    cap
                } else {
                    Duration::ZERO
                }
            }
            // A few ms of jitter so replicas due at the same instant do not collide exactly.
            Some(d) => {
                (d + Duration::from_micros((backoff::random_unit() * 5_000.0) as u64)).min(cap)
            }
        }
    }

    /// The writer path: publishes the outbox rows of these runs now.
    async fn relay_now(&self, runs: &[String]) {
        if runs.is_empty() {
            return;
        }
        let c = &self.inner.counters;
        match self.inner.relay.relay_runs(runs).await {
            Ok(r) => {
                bump(&c.relayed_published, r.published as u64);
                bump(&c.relayed_duplicates, r.duplicates as u64);
                bump(&c.relay_failed, r.failed as u64);
                for (outcome, n) in [
                    ("published", r.published),
                    ("duplicate", r.duplicates),
                    ("failed", r.failed),
                ] {
                    if n > 0 {
                        metrics::counter!("tandem_gate_notifier_relayed_total", "outcome" => outcome)
                            .increment(n as u64);
                    }
                }
                if r.failed > 0 {
                    self.inner.relay.nudge();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "relaying just-committed gate events failed; the background relay will");
                self.inner.relay.nudge();
            }
        }
    }

    /// The writer relay task: publishes the rows the gate loop committed, coalescing whatever
    /// queued up meanwhile. Returns once the gate loop is gone and the queue is empty.
    async fn run_writer_relay(&self, mut rx: mpsc::UnboundedReceiver<Vec<String>>) {
        while let Some(first) = rx.recv().await {
            let mut runs: BTreeSet<String> = first.into_iter().collect();
            while let Ok(more) = rx.try_recv() {
                runs.extend(more);
            }
            let runs: Vec<String> = runs.into_iter().collect();
            self.relay_now(&runs).await;
        }
    }

    /// Links unlinked audit rows into the chain once (at most `tandem_store::MAX_LINK_BATCH`).
    pub async fn link_audit_once(&self) -> Result<u64, StoreError> {
        let linked =
            tandem_store::link_audit_chain(&self.inner.pool, tandem_store::MAX_LINK_BATCH).await?;
        if linked > 0 {
            bump(&self.inner.counters.audit_linked, linked);
            metrics::counter!("tandem_gate_notifier_audit_linked_total").increment(linked);
        }
        Ok(linked)
    }

    /// The audit chainer, until `shutdown` (a link in progress commits first). Does nothing when
    /// the chainer is disabled on this replica.
    pub async fn run_audit_chainer(&self, shutdown: Shutdown) {
        let Some(period) = self.inner.config.audit_link_interval else {
            return;
        };
        let mut failures = backoff::Backoff::new(period, Duration::from_secs(30));
        loop {
            if shutdown.is_triggered() {
                return;
            }
            let wait = match self.link_audit_once().await {
                Ok(n) if n as usize >= tandem_store::MAX_LINK_BATCH => continue,
                Ok(_) => {
                    failures = backoff::Backoff::new(period, Duration::from_secs(30));
                    backoff::jittered(period, 0.5)
                }
                Err(e) => {
                    metrics::counter!("tandem_gate_notifier_audit_link_errors_total").increment(1);
                    let d = failures.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "linking the audit chain failed");
                    d
                }
            };
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn run_wake_listener(&self, mut sub: async_nats::Subscriber, shutdown: Shutdown) {
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                m = sub.next() => match m {
                    Some(_) => {
                        bump(&self.inner.counters.wakeups, 1);
                        metrics::counter!("tandem_gate_notifier_wakeups_received_total").increment(1);
                        self.inner.wake.notify_one();
                    }
                    None => return,
                },
            }
        }
    }
}
