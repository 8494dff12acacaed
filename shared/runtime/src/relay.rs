//! The outbox relay every service can run (DESIGN §2 "Outbox"): publishes committed outbox rows to
//! JetStream with `Nats-Msg-Id` = the row's dedupe id, awaits each PubAck, then marks the rows
//! published.
//!
//! Two paths share one mechanism (the store's lease claim, see `tandem_store::claim_outbox`):
//!
//! * **Writer path** ([`Relay::relay_runs`]): right after a transition commits, the writer
//!   publishes the rows of the runs it changed (and any earlier rows of those runs left behind),
//!   so events and tasks leave within a round trip of the commit. A writer that inserted its rows
//!   already leased to itself (the scheduler's claims) publishes them from memory with
//!   [`Relay::relay_leased`].
//! * **Background path** ([`Relay::run`]): a loop on every replica takes rows nobody holds (a
//!   writer crashed between commit and publish, NATS was down, a lease expired) every poll period
//!   (jittered, ≤ 1 s by default) or when nudged, and drains them batch after batch.
//!
//! Guarantees:
//!
//! * nothing uncommitted is published (rows are read after commit);
//! * a run's rows are published in id (= commit) order, by one relay at a time: its oldest
//!   unpublished row is the lock, and a failed publish stops that run's sequence;
//! * NATS down: the publish fails, the rows are released and wait; they drain when NATS is back;
//! * a crash after the PubAck and before the mark re-publishes the row once its lease expires;
//!   JetStream reports it as a duplicate if that happens within the stream's duplicate window
//!   (lease + poll ≪ window by default, see docs/nats.md), and consumers are idempotent anyway.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use tandem_bus::{BusError, OutgoingMessage, Prefix, async_nats::jetstream, task_subject};
use tandem_store::{OutboxKind, OutboxRow, Pool, StoreError};
use tokio::sync::Notify;

use crate::{backoff, shutdown::Shutdown};

/// Relay tunables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelaySettings {
    /// How long a relay holds rows it took; another relay re-publishes them after that. Must be
    /// well below the JetStream duplicate window (120 s by default) so a re-publish after a
    /// crash is recognised as a duplicate.
    pub lease: Duration,
    /// Period of the background pass (each wait is jittered down by up to 50 %).
    pub poll: Duration,
    /// Runs taken per background claim; a full claim is followed at once by the next.
    pub max_runs_per_claim: usize,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(1),
            max_runs_per_claim: 64,
        }
    }
}

/// What one relay call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Rows taken under a lease.
    pub claimed: usize,
    /// Runs those rows belong to.
    pub runs: usize,
    /// Rows the server stored.
    pub published: usize,
    /// Rows the server already had (same `Nats-Msg-Id` inside the duplicate window).
    pub duplicates: usize,
    /// Rows not published (publish failed, or an earlier row of the same run failed); released.
    pub failed: usize,
    /// Rows marked published.
    pub marked: u64,
}

impl RelayReport {
    fn add(&mut self, other: &RelayReport) {
        self.claimed += other.claimed;
        self.runs += other.runs;
        self.published += other.published;
        self.duplicates += other.duplicates;
        self.failed += other.failed;
        self.marked += other.marked;
    }
}

/// The outcome of publishing rows (without marking them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Rows acknowledged by JetStream (stored or duplicate), in id order.
    pub acked: Vec<i64>,
    pub duplicates: usize,
    /// Rows not acknowledged, in id order.
    pub failed: Vec<i64>,
}

/// Builds the JetStream message for an outbox row (subject from the fleet's prefix).
pub fn outgoing_message(prefix: &Prefix, row: &OutboxRow) -> Result<OutgoingMessage, BusError> {
    let payload = Bytes::copy_from_slice(row.payload.as_bytes());
    Ok(match &row.kind {
        OutboxKind::Event => OutgoingMessage::event(
            prefix,
            &row.org_id,
            &row.workspace_id,
            &row.event_type,
            row.dedupe_id.clone(),
            payload,
        ),
        OutboxKind::Task { queue } => {
            OutgoingMessage::new(task_subject(prefix, queue), row.dedupe_id.clone(), payload)
                .with_event_type(row.event_type.clone())
                .with_tenant(row.org_id.clone(), row.workspace_id.clone())
        }
    })
}

struct Inner {
    pool: Pool,
    js: jetstream::Context,
    prefix: Prefix,
    settings: RelaySettings,
    nudge: Notify,
}

/// The outbox relay; cheap to clone.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("prefix", &self.inner.prefix)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl Relay {
    pub fn new(
        pool: Pool,
        js: jetstream::Context,
        prefix: Prefix,
        settings: RelaySettings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                js,
                prefix,
                settings,
                nudge: Notify::new(),
            }),
        }
    }

    pub fn settings(&self) -> &RelaySettings {
        &self.inner.settings
    }

    /// Asks the background loop to run a pass now (e.g. after a writer path found a run's rows
    /// held by another relay).
    pub fn nudge(&self) {
        self.inner.nudge.notify_one();
    }

    /// The writer path: publishes the unpublished rows of these runs, right after the commit that
    /// wrote them. Rows another relay holds are left to it; when some of these runs' rows could
    /// not be taken, the background loop is nudged.
    pub async fn relay_runs(&self, run_ids: &[String]) -> Result<RelayReport, StoreError> {
        let mut total = RelayReport::default();
        if run_ids.is_empty() {
            return Ok(total);
        }
        let mut runs: Vec<String> = run_ids.to_vec();
        runs.sort();
        runs.dedup();
        // A few rounds: rows committed by another writer of the same run while we published are
        // picked up here rather than by the next background pass.
        for _ in 0..3 {
            let rows = tandem_store::claim_outbox_for_runs(
                &self.inner.pool,
                &runs,
                self.inner.settings.lease,
            )
            .await?;
            if rows.is_empty() {
                break;
            }
            let report = self.publish_and_mark(rows).await?;
            total.add(&report);
            if report.failed > 0 {
                break;
            }
        }
        Ok(total)
    }

    /// The writer path for rows a writer inserted already leased to itself (e.g.
    /// `ClaimReport::leased_outbox`): publishes them from memory and marks them, right after the
    /// commit that wrote them, with no claim and no read back. What fails to publish is released
    /// for the next relay pass.
    pub async fn relay_leased(&self, rows: Vec<OutboxRow>) -> Result<RelayReport, StoreError> {
        if rows.is_empty() {
            return Ok(RelayReport::default());
        }
        self.publish_and_mark(rows).await
    }

    /// One background claim: takes up to `max_runs_per_claim` runs' rows nobody holds, publishes
    /// and marks them.
    pub async fn drain_once(&self) -> Result<RelayReport, StoreError> {
        let rows = tandem_store::claim_outbox(
            &self.inner.pool,
            self.inner.settings.max_runs_per_claim,
            self.inner.settings.lease,
        )
        .await?;
        if rows.is_empty() {
            return Ok(RelayReport::default());
        }
        self.publish_and_mark(rows).await
    }

    /// Publishes claimed rows and marks what was acknowledged; releases the rest.
    async fn publish_and_mark(&self, rows: Vec<OutboxRow>) -> Result<RelayReport, StoreError> {
        let started = std::time::Instant::now();
        let claimed = rows.len();
        let runs = rows
            .iter()
            .map(|r| r.run_id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len();
        let outcome = self.publish_rows(&rows).await;
        let marked = tandem_store::mark_outbox_published(&self.inner.pool, &outcome.acked).await?;
        if !outcome.failed.is_empty() {
            tandem_store::release_outbox(&self.inner.pool, &outcome.failed).await?;
        }
        let report = RelayReport {
            claimed,
            runs,
            published: outcome.acked.len() - outcome.duplicates,
            duplicates: outcome.duplicates,
            failed: outcome.failed.len(),
            marked,
        };
        metrics::counter!("tandem_relay_published_total", "outcome" => "stored")
            .increment(report.published as u64);
        metrics::counter!("tandem_relay_published_total", "outcome" => "duplicate")
            .increment(report.duplicates as u64);
        metrics::counter!("tandem_relay_failed_total").increment(report.failed as u64);
        metrics::histogram!("tandem_relay_batch_seconds").record(started.elapsed().as_secs_f64());
        Ok(report)
    }

    /// Publishes rows (each run's rows in id order, runs concurrently) and returns what was
    /// acknowledged, without touching the database. A failure stops that run's sequence so a later
    /// row never overtakes an earlier one. Public so tests can simulate a crash before the mark.
    pub async fn publish_rows(&self, rows: &[OutboxRow]) -> PublishOutcome {
        let mut by_run: BTreeMap<&str, Vec<&OutboxRow>> = BTreeMap::new();
        for row in rows {
            by_run.entry(row.run_id.as_str()).or_default().push(row);
        }
        for list in by_run.values_mut() {
            list.sort_by_key(|r| r.id);
        }
        let traceparent = crate::telemetry::current_traceparent();
        let runs = by_run.into_values().map(|list| {
            let traceparent = traceparent.clone();
            async move {
                let mut out = PublishOutcome::default();
                let mut broken = false;
                for row in list {
                    if broken {
                        out.failed.push(row.id);
                        continue;
                    }
                    let msg = match outgoing_message(&self.inner.prefix, row) {
                        Ok(m) => m.with_traceparent(traceparent.clone()),
                        Err(e) => {
                            tracing::error!(outbox_id = row.id, run_id = %row.run_id, error = %e,
                                "outbox row cannot be published; it stays unpublished");
                            broken = true;
                            out.failed.push(row.id);
                            continue;
                        }
                    };
                    match tandem_bus::publish(&self.inner.js, msg).await {
                        Ok(ack) => {
                            if ack.duplicate {
                                out.duplicates += 1;
                            }
                            out.acked.push(row.id);
                        }
                        Err(e) => {
                            tracing::warn!(outbox_id = row.id, run_id = %row.run_id, error = %e,
                                "outbox publish failed; the row waits for the next relay pass");
                            broken = true;
                            out.failed.push(row.id);
                        }
                    }
                }
                out
            }
        });
        let mut total = PublishOutcome::default();
        for part in futures::future::join_all(runs).await {
            total.acked.extend(part.acked);
            total.failed.extend(part.failed);
            total.duplicates += part.duplicates;
        }
        total.acked.sort_unstable();
        total.failed.sort_unstable();
        total
    }

    /// The background loop, until `shutdown`: a pass every jittered poll period or when nudged;
    /// a full claim is followed at once by the next; failures back off.
    pub async fn run(self, shutdown: Shutdown) {
        let settings = self.inner.settings;
        let mut failures = backoff::Backoff::new(settings.poll, Duration::from_secs(30));
        loop {
            let mut wait = backoff::jittered(settings.poll, 0.5);
            loop {
                if shutdown.is_triggered() {
                    return;
                }
                match self.drain_once().await {
                    Ok(r) if r.failed > 0 => {
                        wait = failures.next_delay().max(wait);
                        break;
                    }
                    Ok(r) => {
                        failures = backoff::Backoff::new(settings.poll, Duration::from_secs(30));
                        if r.runs < settings.max_runs_per_claim {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox relay pass failed; retrying");
                        wait = failures.next_delay().max(wait);
                        break;
                    }
                }
            }
            tokio::select! {
                () = shutdown.wait() => return,
                () = self.inner.nudge.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
