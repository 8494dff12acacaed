//! Effects persisted with a transition (audit drafts, outbox events and tasks) and the outbox
//! reads and leases the relay needs.
//!
//! # Relay claims and per-run order
//!
//! A relay takes rows with [`claim_outbox`] (any run) or [`claim_outbox_for_runs`] (the runs a
//! writer just changed). Both lock the *oldest unpublished row of each run* (`FOR UPDATE SKIP
//! LOCKED`) and only when its relay lease is free or expired, then lease **all** of that run's
//! unpublished rows (`relay_lease_until = now() + lease`) in the same statement. So:
//!
//! * a run's rows are held by one relay at a time and published in id order, which for one run
//!   is commit order (its transitions serialize on the run's row lock);
//! * replicas never publish the same row concurrently; a relay that crashed after the PubAck and
//!   before [`mark_outbox_published`] leaves a lease that expires, and the next relay re-publishes
//!   (JetStream drops it as a duplicate inside its duplicate window);
//! * a row that failed to publish is released with [`release_outbox`] and retried later.

use crate::StoreError;
use crate::convert::json_text;
use deadpool_postgres::Pool;
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;
use tandem_core::protocol::TaskMessage;
use tandem_core::{EventDraft, Millis, TenantContext};
use uuid::Uuid;

/// `outbox.event_type` of task rows (events carry their engine event type).
pub const TASK_ROW_TYPE: &str = "task.dispatch";

/// The upstream `EngineEvent` wire shape (spec §1.15) with its envelope filled in by the writer,
/// so that every replica publishes byte-identical payloads for a row. Serialized straight into
/// the outbox row's `jsonb` (members in alphabetical order, as a JSON object map would have them).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineEvent<'a> {
    pub envelope: EventEnvelope<'a>,
    pub properties: &'a Value,
    #[serde(rename = "type")]
    pub event_type: &'a str,
}

/// The envelope of an [`EngineEvent`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventEnvelope<'a> {
    pub event_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<&'a str>,
    pub occurred_at_ms: Millis,
    pub run_id: &'a str,
    pub schema_version: u32,
    pub tenant_context: &'a TenantContext,
}

/// The [`EngineEvent`] of a draft.
pub fn engine_event(e: &EventDraft, event_id: Uuid, occurred_at_ms: Millis) -> EngineEvent<'_> {
    EngineEvent {
        envelope: EventEnvelope {
            event_id: event_id.to_string(),
            node_id: e.node_id.as_deref(),
            occurred_at_ms,
            run_id: &e.run_id,
            schema_version: 1,
            tenant_context: &e.tenant_context,
        },
        properties: &e.properties,
        event_type: &e.event_type,
    }
}

/// Where an outbox row goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxKind {
    /// An engine event: `tandem.events.<org>.<workspace>.<event_type>`.
    Event,
    /// A node task: `tandem.tasks.<queue>`; the payload is a [`TaskMessage`].
    Task { queue: String },
}

/// One outbox row, as the relay publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: Uuid,
    pub run_id: String,
    /// The engine event type, or [`TASK_ROW_TYPE`] for a task.
    pub event_type: String,
    pub org_id: String,
    pub workspace_id: String,
    /// JetStream `Nats-Msg-Id`: the event's dedupe key or id, or the task id.
    pub dedupe_id: String,
    /// The full `EngineEvent` JSON, or the [`TaskMessage`] JSON: the stored text, published as
    /// is (never parsed by the relay).
    pub payload: String,
    pub kind: OutboxKind,
}

impl OutboxRow {
    /// The task of a task row (`None` for an event row, or a payload that is not a task).
    pub fn task(&self) -> Option<TaskMessage> {
        match self.kind {
            OutboxKind::Task { .. } => serde_json::from_str(&self.payload).ok(),
            OutboxKind::Event => None,
        }
    }
}

const OUTBOX_COLUMNS: &str = "id, event_id, run_id, event_type, org_id, workspace_id, dedupe_id, \
                              payload, subject_kind, task_queue";

fn outbox_row(r: &tokio_postgres::Row) -> Result<OutboxRow, StoreError> {
    let id: i64 = r.try_get(0)?;
    let kind = match (
        r.try_get::<_, String>(8)?.as_str(),
        r.try_get::<_, Option<String>>(9)?,
    ) {
        ("event", _) => OutboxKind::Event,
        ("task", Some(queue)) => OutboxKind::Task { queue },
        (other, _) => {
            return Err(StoreError::Corrupt(format!(
                "outbox row {id} has subject kind {other:?} without what it needs"
            )));
        }
    };
    Ok(OutboxRow {
        id,
        event_id: r.try_get(1)?,
        run_id: r.try_get(2)?,
        event_type: r.try_get(3)?,
        org_id: r.try_get(4)?,
        workspace_id: r.try_get(5)?,
        dedupe_id: r.try_get(6)?,
        payload: json_text(r, 7)?
            .ok_or_else(|| StoreError::Corrupt(format!("outbox row {id} has no payload")))?
            .get()
            .to_owned(),
        kind,
    })
}

/// The oldest unpublished rows (id order). Not locked: publishing is idempotent by
/// `Nats-Msg-Id`, so two relays racing on a row cost a duplicate publish JetStream drops.
pub async fn unpublished_outbox(pool: &Pool, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1"
        ))
        .await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    client
        .query(&stmt, &[&limit])
        .await?
        .iter()
        .map(outbox_row)
        .collect()
}

/// The given unpublished rows (a writer relaying its own rows right after commit).
pub async fn outbox_rows(pool: &Pool, ids: &[i64]) -> Result<Vec<OutboxRow>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox
              WHERE id = ANY($1) AND published_at IS NULL ORDER BY id"
        ))
        .await?;
    client
        .query(&stmt, &[&ids])
        .await?
        .iter()
        .map(outbox_row)
        .collect()
}

/// Marks rows published (after their PubAck) and drops their lease. Returns how many were newly
/// marked.
pub async fn mark_outbox_published(pool: &Pool, ids: &[i64]) -> Result<u64, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "UPDATE outbox SET published_at = now(), relay_lease_until = NULL
              WHERE id = ANY($1) AND published_at IS NULL",
        )
        .await?;
    Ok(client.execute(&stmt, &[&ids]).await?)
}

/// Gives back leased rows that were not published (the publish failed), so the next relay
/// attempt takes them at once instead of after the lease. Returns how many were released.
pub async fn release_outbox(pool: &Pool, ids: &[i64]) -> Result<u64, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "UPDATE outbox SET relay_lease_until = NULL
              WHERE id = ANY($1) AND published_at IS NULL",
        )
        .await?;
    Ok(client.execute(&stmt, &[&ids]).await?)
}

/// The head-of-run claim shared by [`claim_outbox`] and [`claim_outbox_for_runs`]; `run_filter`
/// narrows the heads, `order` picks which heads a `LIMIT` keeps. See the module documentation.
fn claim_sql(run_filter: &str, order: &str) -> String {
    format!(
        "WITH heads AS MATERIALIZED (
             SELECT o.id, o.run_id
               FROM outbox o
              WHERE o.published_at IS NULL {run_filter}
                AND (o.relay_lease_until IS NULL OR o.relay_lease_until <= now())
                AND NOT EXISTS (SELECT 1 FROM outbox p
                                 WHERE p.run_id = o.run_id AND p.published_at IS NULL
                                   AND p.id < o.id)
              {order}
              LIMIT $1
                FOR UPDATE OF o SKIP LOCKED
         )
         UPDATE outbox o
            SET relay_lease_until = now() + make_interval(secs => $2)
           FROM heads h
          WHERE o.run_id = h.run_id AND o.published_at IS NULL AND o.id >= h.id
         RETURNING {}",
        OUTBOX_COLUMNS
            .split(',')
            .map(|c| format!("o.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// SQL of [`claim_outbox`] (the oldest heads first), public so tests can `EXPLAIN` it.
pub fn claim_outbox_sql() -> String {
    claim_sql("", "ORDER BY o.id")
}

/// SQL of [`claim_outbox_for_runs`], public so tests can `EXPLAIN` it. No `ORDER BY`: a run has
/// one head and the limit is the number of runs, so every head is taken anyway, and without it
/// the generic plan a prepared statement settles on reads `outbox_run_unpublished_idx` for the
/// given runs instead of walking every unpublished row in id order (measured: 24 buffers and
/// 0.07 ms against 708 and 2.3 ms under a steady 1k runs/s).
pub fn claim_outbox_for_runs_sql() -> String {
    claim_sql("AND o.run_id = ANY($3)", "")
}

fn lease_secs(lease: Duration) -> f64 {
    lease.as_secs_f64().max(0.001)
}

fn sorted_rows(rows: &[tokio_postgres::Row]) -> Result<Vec<OutboxRow>, StoreError> {
    let mut out = rows.iter().map(outbox_row).collect::<Result<Vec<_>, _>>()?;
    out.sort_by_key(|r| r.id);
    Ok(out)
}

/// Leases the unpublished rows of up to `max_runs` runs (oldest first) that no other relay holds,
/// for `lease`. Returns them in id order; publish each run's rows in that order, then
/// [`mark_outbox_published`] (or [`release_outbox`] what failed).
pub async fn claim_outbox(
    pool: &Pool,
    max_runs: usize,
    lease: Duration,
) -> Result<Vec<OutboxRow>, StoreError> {
    let limit = i64::try_from(max_runs).unwrap_or(i64::MAX);
    if limit == 0 {
        return Ok(Vec::new());
    }
    let client = pool.get().await?;
    let stmt = client.prepare_cached(&claim_outbox_sql()).await?;
    sorted_rows(&client.query(&stmt, &[&limit, &lease_secs(lease)]).await?)
}

/// [`claim_outbox`] restricted to these runs: what a writer calls right after its commit to
/// publish the rows it wrote (and any earlier rows of the same runs left behind).
pub async fn claim_outbox_for_runs(
    pool: &Pool,
    run_ids: &[String],
    lease: Duration,
) -> Result<Vec<OutboxRow>, StoreError> {
    if run_ids.is_empty() {
        return Ok(Vec::new());
    }
    let limit = i64::try_from(run_ids.len()).unwrap_or(i64::MAX);
    let client = pool.get().await?;
    let stmt = client.prepare_cached(&claim_outbox_for_runs_sql()).await?;
    sorted_rows(
        &client
            .query(&stmt, &[&limit, &lease_secs(lease), &run_ids])
            .await?,
    )
}
