//! Retention (`TANDEM_AUTOMATION_V2_RUNS_RETENTION_DAYS`): what a fleet under steady load keeps
//! and what it prunes, in bounded batches.
//!
//! Decision (upstream archives old terminal runs out of its hot file but keeps them readable,
//! spec §1.16 and case 9):
//!
//! * **Kept**: every run row and every `run_lifecycle` record (a run stays readable by
//!   `GET /automations/v2/runs/{id}` with its full history, as upstream's archived shards do), the
//!   protected audit log (a hash chain; deleting from it is what verification must detect), and
//!   `automation_snapshot`, `runtime_context`, `gate_history`, `last_failure` (small, and what a
//!   later recover/retry of an old run needs).
//! * **Pruned**: the heavy part of a terminal run, its node outputs and attempt verdicts (worker
//!   output bodies: drafts, artifacts, reviews). Each value larger than the configured byte limit
//!   is replaced by a stub that keeps its top-level scalar fields (`status`, `contract_kind`,
//!   `failure_kind`, `decision`, …; strings shortened to [`STUB_STRING_CHARS`] characters) and
//!   records `retention_pruned: {pruned_at_ms, original_bytes}`. Small values are kept as they are.
//!   The stub keeps every field the lifecycle logic reads, so a pruned run can still be recovered
//!   or retried; only the bodies are gone. `updated_at_ms` is not bumped (nothing about the run's
//!   state changed) and nothing is written to the lifecycle, audit or outbox.
//! * **Deleted**: outbox rows published longer ago than the outbox horizon (they exist only to be
//!   relayed; JetStream holds the events for subscribers).
//!
//! So the heavy tables stop growing with time: `runs.doc` shrinks to a small, bounded size once
//! a run is past retention, and `outbox` holds at most the horizon's worth of rows. Run rows,
//! lifecycle records and audit records still grow with the number of runs (by design: history).

use std::time::Duration;

use crate::runs::DB_NOW_MS;
use crate::{Pool, StoreError, convert::ms_to_db};
use serde_json::{Map, Value, json};
use tandem_core::{AutomationRunStatus, Millis};

/// Terminal statuses (spec §1.1), whose heavy data retention prunes.
pub const TERMINAL_STATUSES: [AutomationRunStatus; 4] = [
    AutomationRunStatus::Completed,
    AutomationRunStatus::Blocked,
    AutomationRunStatus::Failed,
    AutomationRunStatus::Cancelled,
];

/// Longest string (in characters) a pruned value's stub keeps per field.
pub const STUB_STRING_CHARS: usize = 256;

/// The key that marks a stub.
pub const PRUNED_MARKER: &str = "retention_pruned";

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0)
}

fn shorten(s: &str) -> Value {
    if s.chars().count() <= STUB_STRING_CHARS {
        return Value::String(s.to_owned());
    }
    let mut out: String = s.chars().take(STUB_STRING_CHARS).collect();
    out.push('…');
    Value::String(out)
}

/// The stub of a heavy value: its top-level scalars (strings shortened) plus the marker.
fn stub(value: &Value, original_bytes: usize, now_ms: Millis) -> Value {
    let mut m = Map::new();
    match value {
        Value::Object(obj) => {
            for (k, v) in obj {
                match v {
                    Value::String(s) => {
                        m.insert(k.clone(), shorten(s));
                    }
                    Value::Bool(_) | Value::Number(_) | Value::Null => {
                        m.insert(k.clone(), v.clone());
                    }
                    Value::Array(_) | Value::Object(_) => {}
                }
            }
        }
        Value::String(s) => {
            m.insert("content".into(), shorten(s));
        }
        _ => {}
    }
    m.insert(
        PRUNED_MARKER.into(),
        json!({ "pruned_at_ms": now_ms, "original_bytes": original_bytes }),
    );
    Value::Object(m)
}

/// Replaces `v` by its stub when its JSON is larger than `max_bytes` (and it is not already a
/// stub). Returns the bytes saved.
fn prune_value(v: &mut Value, max_bytes: usize, now_ms: Millis) -> Option<usize> {
    if v.get(PRUNED_MARKER).is_some() {
        return None;
    }
    let len = json_len(v);
    if len <= max_bytes {
        return None;
    }
    let s = stub(v, len, now_ms);
    let saved = len.saturating_sub(json_len(&s));
    *v = s;
    Some(saved)
}

/// What pruning one run document did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrunedDoc {
    /// Node outputs and attempt verdicts replaced by stubs.
    pub values_pruned: usize,
    pub bytes_saved: usize,
}

/// Prunes the heavy values of a run document (`runs.doc`, i.e. the record without its
/// lifecycle history): every `checkpoint.node_outputs` value and every element of
/// `checkpoint.node_attempt_verdicts` whose JSON exceeds `max_bytes` becomes a stub (see the
/// module docs). Idempotent: stubs are never pruned again. Pure.
pub fn prune_heavy_values(doc: &mut Value, max_bytes: usize, now_ms: Millis) -> PrunedDoc {
    let mut out = PrunedDoc::default();
    let Some(cp) = doc.get_mut("checkpoint").and_then(Value::as_object_mut) else {
        return out;
    };
    let mut count = |saved: Option<usize>| {
        if let Some(s) = saved {
            out.values_pruned += 1;
            out.bytes_saved += s;
        }
    };
    if let Some(outputs) = cp.get_mut("node_outputs").and_then(Value::as_object_mut) {
        for v in outputs.values_mut() {
            count(prune_value(v, max_bytes, now_ms));
        }
    }
    if let Some(verdicts) = cp
        .get_mut("node_attempt_verdicts")
        .and_then(Value::as_object_mut)
    {
        for list in verdicts.values_mut() {
            if let Some(items) = list.as_array_mut() {
                for v in items {
                    count(prune_value(v, max_bytes, now_ms));
                }
            }
        }
    }
    out
}

/// What [`prune_terminal_runs`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Rows locked and examined (rows held by another replica, no longer terminal or no longer
    /// old enough are skipped).
    pub examined: usize,
    /// Rows rewritten.
    pub pruned: usize,
    pub values_pruned: usize,
    pub bytes_saved: usize,
}

/// Prunes the heavy values (see [`prune_heavy_values`]) of these runs, in one short transaction:
/// rows are locked `FOR UPDATE SKIP LOCKED` and re-checked (still terminal, last updated more
/// than `older_than_ms` ago by the database clock); only the rows that changed are rewritten, and
/// only their `doc`.
pub async fn prune_terminal_runs(
    pool: &Pool,
    run_ids: &[String],
    older_than_ms: u64,
    max_value_bytes: usize,
) -> Result<PruneReport, StoreError> {
    let mut report = PruneReport::default();
    if run_ids.is_empty() {
        return Ok(report);
    }
    let older = ms_to_db(older_than_ms.min(i64::MAX as u64), "retention")?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT run_id, doc, {DB_NOW_MS} FROM runs
              WHERE run_id = ANY($1)
                AND status IN ('completed', 'blocked', 'failed', 'cancelled')
                AND updated_at_ms < {DB_NOW_MS} - $2
              ORDER BY run_id
                FOR UPDATE SKIP LOCKED"
        ))
        .await?;
    let rows = tx.query(&stmt, &[&run_ids, &older]).await?;
    let mut ids: Vec<String> = Vec::new();
    let mut docs: Vec<Value> = Vec::new();
    for row in &rows {
        report.examined += 1;
        let id: String = row.try_get(0)?;
        let mut doc: Value = row.try_get(1)?;
        let now: i64 = row.try_get(2)?;
        let now_ms = u64::try_from(now).unwrap_or(0);
        let p = prune_heavy_values(&mut doc, max_value_bytes, now_ms);
        if p.values_pruned > 0 {
            report.pruned += 1;
            report.values_pruned += p.values_pruned;
            report.bytes_saved += p.bytes_saved;
            ids.push(id);
            docs.push(doc);
        }
    }
    if ids.is_empty() {
        tx.rollback().await?;
        return Ok(report);
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE runs r SET doc = u.doc
               FROM unnest($1::text[], $2::jsonb[]) AS u(run_id, doc)
              WHERE r.run_id = u.run_id",
        )
        .await?;
    tx.execute(&stmt, &[&ids, &docs]).await?;
    tx.commit().await?;
    Ok(report)
}

/// Deletes up to `limit` outbox rows published more than `older_than` ago (oldest first, rows
/// another replica is deleting are skipped). Returns how many were deleted; fewer than `limit`
/// means nothing older is left.
pub async fn prune_published_outbox(
    pool: &Pool,
    older_than: Duration,
    limit: usize,
) -> Result<u64, StoreError> {
    let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
    let secs = older_than.as_secs_f64();
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "DELETE FROM outbox WHERE id IN (
                 SELECT id FROM outbox
                  WHERE published_at IS NOT NULL
                    AND published_at < now() - make_interval(secs => $1)
                  ORDER BY published_at
                  LIMIT $2
                    FOR UPDATE SKIP LOCKED)",
        )
        .await?;
    Ok(client.execute(&stmt, &[&secs, &limit]).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heavy_outputs_become_stubs_keeping_scalars_and_small_ones_stay() {
        let big = "x".repeat(5000);
        let mut doc = json!({
            "run_id": "r",
            "checkpoint": {
                "node_outputs": {
                    "small": {"status": "completed", "summary": "ok"},
                    "big": {"status": "completed", "contract_kind": "approval_gate",
                            "content": big, "attempt_evidence": {"artifact": {"path": "/p"}},
                            "n": 3, "flag": true},
                },
                "node_attempt_verdicts": {"big": [{"attempt": 1, "review": big}, {"attempt": 2}]},
            }
        });
        let p = prune_heavy_values(&mut doc, 1024, 42);
        assert_eq!(p.values_pruned, 2);
        assert!(p.bytes_saved > 8000);
        let outputs = &doc["checkpoint"]["node_outputs"];
        assert_eq!(
            outputs["small"],
            json!({"status": "completed", "summary": "ok"})
        );
        let b = &outputs["big"];
        assert_eq!(b["status"], "completed");
        assert_eq!(b["contract_kind"], "approval_gate");
        assert_eq!(b["n"], 3);
        assert_eq!(b["flag"], true);
        assert!(b.get("attempt_evidence").is_none());
        let content = b["content"].as_str().unwrap_or_default();
        assert_eq!(content.chars().count(), STUB_STRING_CHARS + 1);
        assert_eq!(b[PRUNED_MARKER]["pruned_at_ms"], 42);
        assert_eq!(
            doc["checkpoint"]["node_attempt_verdicts"]["big"][1]["attempt"],
            2
        );
        assert!(json_len(b) < 1024);
        let again = prune_heavy_values(&mut doc, 1024, 43);
        assert_eq!(again, PrunedDoc::default(), "stubs are never pruned again");
    }

    #[test]
    fn documents_without_a_checkpoint_are_left_alone() {
        let mut doc = json!({"run_id": "r"});
        assert_eq!(prune_heavy_values(&mut doc, 1, 1), PrunedDoc::default());
        assert_eq!(doc, json!({"run_id": "r"}));
    }
}
