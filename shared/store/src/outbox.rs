//! Effects persisted with a transition (audit drafts, outbox events) and the outbox reads the
//! relay needs.

use crate::StoreError;
use crate::convert::ms_to_db;
use deadpool_postgres::{Pool, Transaction};
use serde_json::{Map, Value, json};
use tandem_core::audit::DURABILITY_REQUIRED;
use tandem_core::{Effects, EventDraft, Millis};
use uuid::Uuid;

/// Inserts the audit drafts (unlinked: the chainer assigns seq and hashes later) and the outbox
/// events of one transition. Returns the outbox row ids.
pub(crate) async fn insert_effects(
    tx: &Transaction<'_>,
    effects: &Effects,
    now_ms: Millis,
) -> Result<Vec<i64>, StoreError> {
    let now = ms_to_db(now_ms, "database clock")?;
    if !effects.audit.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO audit_log (event_id, durability, event_type, tenant, actor, payload,
                                        created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await?;
        for a in &effects.audit {
            let tenant = serde_json::to_value(&a.tenant_context)?;
            tx.execute(
                &stmt,
                &[
                    &Uuid::new_v4(),
                    &DURABILITY_REQUIRED,
                    &a.event_type,
                    &tenant,
                    &a.actor,
                    &a.payload,
                    &now,
                ],
            )
            .await?;
        }
    }
    let mut ids = Vec::with_capacity(effects.events.len());
    if !effects.events.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO outbox (event_id, run_id, event_type, org_id, workspace_id, dedupe_id,
                                     payload)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 RETURNING id",
            )
            .await?;
        for e in &effects.events {
            let event_id = Uuid::now_v7();
            let payload = engine_event(e, event_id, now_ms)?;
            let dedupe_id = e.dedupe_key.clone().unwrap_or_else(|| event_id.to_string());
            let row = tx
                .query_one(
                    &stmt,
                    &[
                        &event_id,
                        &e.run_id,
                        &e.event_type,
                        &e.tenant_context.org_id,
                        &e.tenant_context.workspace_id,
                        &dedupe_id,
                        &payload,
                    ],
                )
                .await?;
            ids.push(row.try_get(0)?);
        }
    }
    Ok(ids)
}

/// The upstream `EngineEvent` wire shape (spec §1.15) with its envelope filled in by the writer,
/// so that every replica publishes byte-identical payloads for a row.
pub fn engine_event(
    e: &EventDraft,
    event_id: Uuid,
    occurred_at_ms: Millis,
) -> Result<Value, StoreError> {
    let mut envelope = Map::new();
    envelope.insert("event_id".into(), Value::String(event_id.to_string()));
    envelope.insert("schema_version".into(), json!(1));
    envelope.insert("occurred_at_ms".into(), json!(occurred_at_ms));
    envelope.insert("run_id".into(), Value::String(e.run_id.clone()));
    if let Some(node) = &e.node_id {
        envelope.insert("node_id".into(), Value::String(node.clone()));
    }
    envelope.insert(
        "tenant_context".into(),
        serde_json::to_value(&e.tenant_context)?,
    );
    Ok(json!({
        "type": e.event_type,
        "properties": e.properties,
        "envelope": Value::Object(envelope),
    }))
}

/// One outbox row, as the relay publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: Uuid,
    pub run_id: String,
    pub event_type: String,
    pub org_id: String,
    pub workspace_id: String,
    /// JetStream `Nats-Msg-Id`.
    pub dedupe_id: String,
    /// The full `EngineEvent` JSON.
    pub payload: Value,
}

const OUTBOX_COLUMNS: &str =
    "id, event_id, run_id, event_type, org_id, workspace_id, dedupe_id, payload";

fn outbox_row(r: &tokio_postgres::Row) -> Result<OutboxRow, StoreError> {
    Ok(OutboxRow {
        id: r.try_get(0)?,
        event_id: r.try_get(1)?,
        run_id: r.try_get(2)?,
        event_type: r.try_get(3)?,
        org_id: r.try_get(4)?,
        workspace_id: r.try_get(5)?,
        dedupe_id: r.try_get(6)?,
        payload: r.try_get(7)?,
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

/// Marks rows published (after their PubAck). Returns how many were newly marked.
pub async fn mark_outbox_published(pool: &Pool, ids: &[i64]) -> Result<u64, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "UPDATE outbox SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL",
        )
        .await?;
    Ok(client.execute(&stmt, &[&ids]).await?)
}
