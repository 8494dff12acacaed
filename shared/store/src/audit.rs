//! The protected audit chain (spec §1.14) across all replicas.
//!
//! Writers insert audit rows unlinked inside their own transactions, so gate actions never wait
//! on one global lock. A single chainer at a time ([`link_audit_chain`], under an advisory lock)
//! then links unlinked rows in id order: seq = head + 1, prev_hash = head hash, record_hash per
//! upstream's canonical hash. [`verify_audit_chain`] re-derives every hash from stored content.

use crate::StoreError;
use crate::convert::ms_from_db;
use deadpool_postgres::Pool;
use tandem_core::TenantContext;
use tandem_core::audit::{ChainBreak, ProtectedAuditRecord, record_hash};
use tokio_postgres::IsolationLevel;
use tokio_postgres::Row;

/// Advisory lock key serializing chainers ("tandemau" in ASCII).
const AUDIT_CHAIN_LOCK_KEY: i64 = 0x7461_6e64_656d_6175;

/// Most rows one [`link_audit_chain`] call links, bounding how long it holds the chain lock.
pub const MAX_LINK_BATCH: usize = 10_000;

/// Rows read per page by [`verify_audit_chain`].
const VERIFY_PAGE: i64 = 5_000;

/// Links up to `max_rows` (at most [`MAX_LINK_BATCH`]) unlinked audit rows, oldest id first.
/// Returns how many were linked. Concurrent callers wait for each other, so the chain never forks.
pub async fn link_audit_chain(pool: &Pool, max_rows: usize) -> Result<u64, StoreError> {
    let limit = i64::try_from(max_rows.min(MAX_LINK_BATCH)).unwrap_or(0);
    if limit == 0 {
        return Ok(0);
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_CHAIN_LOCK_KEY])
        .await?;
    let head = tx
        .query_opt(
            "SELECT seq, record_hash FROM audit_chain_head WHERE singleton FOR UPDATE",
            &[],
        )
        .await?
        .ok_or_else(|| StoreError::Corrupt("audit_chain_head has no row".into()))?;
    let mut seq: i64 = head.try_get(0)?;
    let mut prev: Option<String> = head.try_get(1)?;
    let rows = tx
        .query(
            "SELECT id, event_id, durability, event_type, tenant, actor, payload, created_at_ms
               FROM audit_log WHERE seq IS NULL ORDER BY id LIMIT $1",
            &[&limit],
        )
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut seqs = Vec::with_capacity(rows.len());
    let mut prevs: Vec<Option<String>> = Vec::with_capacity(rows.len());
    let mut hashes = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: i64 = row.try_get(0)?;
        seq += 1;
        let mut record = record_from_row(row, 1, None, String::new())
            .map_err(|e| StoreError::Corrupt(format!("audit_log id {id}: {e}")))?;
        record.seq = u64::try_from(seq)
            .map_err(|_| StoreError::Corrupt(format!("audit chain seq {seq} is negative")))?;
        record.prev_hash = prev.clone();
        let hash = record.compute_hash();
        ids.push(id);
        seqs.push(seq);
        prevs.push(prev.replace(hash.clone()));
        hashes.push(hash);
    }
    let updated = tx
        .execute(
            "UPDATE audit_log a
                SET seq = u.seq, prev_hash = u.prev_hash, record_hash = u.record_hash
               FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[])
                    AS u(id, seq, prev_hash, record_hash)
              WHERE a.id = u.id AND a.seq IS NULL",
            &[&ids, &seqs, &prevs, &hashes],
        )
        .await?;
    if updated != ids.len() as u64 {
        return Err(StoreError::Corrupt(format!(
            "linked {updated} of {} audit rows; rolled back",
            ids.len()
        )));
    }
    tx.execute(
        "UPDATE audit_chain_head SET seq = $1, record_hash = $2, updated_at = now()
          WHERE singleton",
        &[&seq, &prev],
    )
    .await?;
    tx.commit().await?;
    Ok(updated)
}

/// Builds the record from columns `id, event_id, durability, event_type, tenant, actor, payload,
/// created_at_ms` (index 0..=7); seq, prev_hash and record_hash come from the caller.
fn record_from_row(
    row: &Row,
    seq: u64,
    prev_hash: Option<String>,
    record_hash: String,
) -> Result<ProtectedAuditRecord, StoreError> {
    let event_id: uuid::Uuid = row.try_get(1)?;
    let tenant: TenantContext = serde_json::from_value(row.try_get(4)?)?;
    Ok(ProtectedAuditRecord {
        event_id: event_id.to_string(),
        durability: row.try_get(2)?,
        event_type: row.try_get(3)?,
        tenant_context: tenant,
        actor: row.try_get(5)?,
        payload: row.try_get(6)?,
        created_at_ms: ms_from_db(row.try_get(7)?, "audit created_at_ms")?,
        seq,
        prev_hash,
        record_hash,
    })
}

/// Verifies the whole linked chain from seq 1 and that it ends at the chain head.
///
/// The outer error is the database; the inner one is the verdict: an edited row
/// ([`ChainBreak::HashMismatch`]), a deleted or reordered row ([`ChainBreak::SeqGap`],
/// [`ChainBreak::PrevHashMismatch`]). A chain whose tail was deleted ends short of the head and
/// reports `SeqGap { expected: <last verified seq + 1>, found: <head seq + 1> }`; a head whose
/// hash is not the last record's reports `HashMismatch { seq: <head seq> }`.
/// Reads one consistent snapshot, page by page, so memory does not grow with the log.
pub async fn verify_audit_chain(pool: &Pool) -> Result<Result<u64, ChainBreak>, StoreError> {
    let mut client = pool.get().await?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut verifier = ChainVerifier::default();
    let mut after: i64 = 0;
    loop {
        let rows = tx
            .query(
                "SELECT id, event_id, durability, event_type, tenant, actor, payload,
                        created_at_ms, seq, prev_hash, record_hash
                   FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&after, &VERIFY_PAGE],
            )
            .await?;
        for row in &rows {
            let seq: i64 = row.try_get(8)?;
            after = seq;
            let seq = u64::try_from(seq)
                .map_err(|_| StoreError::Corrupt(format!("audit seq {seq} is negative")))?;
            let record = record_from_row(row, seq, row.try_get(9)?, row.try_get(10)?)?;
            if let Err(b) = verifier.push(&record) {
                return Ok(Err(b));
            }
        }
        if rows.len() < VERIFY_PAGE as usize {
            break;
        }
    }
    let head = tx
        .query_opt(
            "SELECT seq, record_hash FROM audit_chain_head WHERE singleton",
            &[],
        )
        .await?
        .ok_or_else(|| StoreError::Corrupt("audit_chain_head has no row".into()))?;
    let head_seq: i64 = head.try_get(0)?;
    let head_hash: Option<String> = head.try_get(1)?;
    let head_seq = u64::try_from(head_seq)
        .map_err(|_| StoreError::Corrupt(format!("audit head seq {head_seq} is negative")))?;
    tx.commit().await?;
    let verified = verifier.verified();
    if head_seq != verified {
        return Ok(Err(ChainBreak::SeqGap {
            expected: verified + 1,
            found: head_seq + 1,
        }));
    }
    if head_hash != verifier.prev {
        return Ok(Err(ChainBreak::HashMismatch { seq: head_seq }));
    }
    Ok(Ok(verified))
}

/// `tandem_core::audit::verify_chain`, one record at a time, so a chain can be verified page by
/// page. Same checks in the same order; `tests::agrees_with_core_verify_chain` keeps them equal.
#[derive(Debug, Default)]
struct ChainVerifier {
    verified: u64,
    prev: Option<String>,
}

impl ChainVerifier {
    fn push(&mut self, r: &ProtectedAuditRecord) -> Result<(), ChainBreak> {
        let expected = self.verified + 1;
        if r.seq != expected {
            return Err(ChainBreak::SeqGap {
                expected,
                found: r.seq,
            });
        }
        if r.prev_hash != self.prev {
            return Err(ChainBreak::PrevHashMismatch { seq: r.seq });
        }
        if r.compute_hash() != r.record_hash {
            return Err(ChainBreak::HashMismatch { seq: r.seq });
        }
        self.prev = Some(r.record_hash.clone());
        self.verified = expected;
        Ok(())
    }

    fn verified(&self) -> u64 {
        self.verified
    }
}

/// The record hash of a row (exposed for tools that re-derive hashes).
pub fn audit_record_hash(r: &ProtectedAuditRecord) -> String {
    record_hash(
        &r.event_id,
        &r.durability,
        &r.event_type,
        &r.tenant_context,
        r.actor.as_deref(),
        &r.payload,
        r.created_at_ms,
        r.seq,
        r.prev_hash.as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tandem_core::audit::verify_chain;

    fn chain(n: u64) -> Vec<ProtectedAuditRecord> {
        let mut prev = None;
        (1..=n)
            .map(|seq| {
                let mut r = ProtectedAuditRecord {
                    event_id: format!("00000000-0000-4000-8000-{seq:012}"),
                    durability: "durable_required".into(),
                    event_type: "t".into(),
                    tenant_context: TenantContext::local_implicit(),
                    actor: None,
                    payload: json!({"n": seq}),
                    created_at_ms: seq,
                    seq,
                    prev_hash: prev.clone(),
                    record_hash: String::new(),
                };
                r.record_hash = audit_record_hash(&r);
                prev = Some(r.record_hash.clone());
                r
            })
            .collect()
    }

    fn incremental(records: &[ProtectedAuditRecord]) -> Result<u64, ChainBreak> {
        let mut v = ChainVerifier::default();
        for r in records {
            v.push(r)?;
        }
        Ok(v.verified())
    }

    #[test]
    fn agrees_with_core_verify_chain() {
        let good = chain(5);
        let mut cases = vec![good.clone(), Vec::new()];
        let mut edited = good.clone();
        edited[2].payload = json!({"n": 99});
        cases.push(edited);
        let mut deleted = good.clone();
        deleted.remove(1);
        cases.push(deleted);
        let mut swapped = good.clone();
        swapped.swap(1, 2);
        cases.push(swapped);
        let mut reseq = good.clone();
        reseq.swap(1, 2);
        reseq[1].seq = 2;
        reseq[2].seq = 3;
        cases.push(reseq);
        let mut relinked = good.clone();
        relinked[3].prev_hash = Some("x".into());
        cases.push(relinked);
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(incremental(c), verify_chain(c.iter()), "case {i}");
        }
        assert_eq!(incremental(&good), Ok(5));
    }
}
