//! The protected audit record and its hash (spec §1.14), byte-compatible with upstream: the
//! record hash is the hex SHA-256 of the JSON of a canonical struct whose fields are, in order,
//! `event_id, durability_str, event_type, tenant_org_id, tenant_workspace_id,
//! tenant_deployment_id, tenant_actor_id, tenant_source, actor, payload, created_at_ms, seq,
//! prev_hash`, with payload object keys in alphabetical order.

use crate::model::{Millis, TenantContext};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub const DURABILITY_REQUIRED: &str = "durable_required";

/// One line of the protected audit log, as upstream writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProtectedAuditRecord {
    pub event_id: String,
    pub durability: String,
    pub event_type: String,
    pub tenant_context: TenantContext,
    pub actor: Option<String>,
    pub payload: Value,
    pub created_at_ms: Millis,
    pub seq: u64,
    pub prev_hash: Option<String>,
    pub record_hash: String,
}

/// The canonical struct hashed by upstream; field order is the hash contract.
#[derive(Serialize)]
struct CanonicalAuditRecord<'a> {
    event_id: &'a str,
    durability_str: &'a str,
    event_type: &'a str,
    tenant_org_id: &'a str,
    tenant_workspace_id: &'a str,
    tenant_deployment_id: Option<&'a str>,
    tenant_actor_id: Option<&'a str>,
    tenant_source: &'a str,
    actor: Option<&'a str>,
    payload: Value,
    created_at_ms: Millis,
    seq: u64,
    prev_hash: Option<&'a str>,
}

/// Recursively orders object keys alphabetically, independent of serde_json's map feature.
pub fn canonicalize(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), canonicalize(&map[k]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(canonicalize).collect()),
        other => other.clone(),
    }
}

/// The record hash of spec §1.14.
#[allow(clippy::too_many_arguments)]
pub fn record_hash(
    event_id: &str,
    durability: &str,
    event_type: &str,
    tenant: &TenantContext,
    actor: Option<&str>,
    payload: &Value,
    created_at_ms: Millis,
    seq: u64,
    prev_hash: Option<&str>,
) -> String {
    let canonical = CanonicalAuditRecord {
        event_id,
        durability_str: durability,
        event_type,
        tenant_org_id: &tenant.org_id,
        tenant_workspace_id: &tenant.workspace_id,
        tenant_deployment_id: tenant.deployment_id.as_deref(),
        tenant_actor_id: tenant.actor_id.as_deref(),
        tenant_source: tenant.source.as_str(),
        actor,
        payload: canonicalize(payload),
        created_at_ms,
        seq,
        prev_hash,
    };
    // Serializing a struct of strings, numbers and a Value cannot fail.
    let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

impl ProtectedAuditRecord {
    pub fn compute_hash(&self) -> String {
        record_hash(
            &self.event_id,
            &self.durability,
            &self.event_type,
            &self.tenant_context,
            self.actor.as_deref(),
            &self.payload,
            self.created_at_ms,
            self.seq,
            self.prev_hash.as_deref(),
        )
    }
}

/// Where a chain first fails verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainBreak {
    /// `seq` is not the previous seq + 1 (a deleted, inserted or reordered record).
    SeqGap { expected: u64, found: u64 },
    /// `prev_hash` does not name the previous record's hash.
    PrevHashMismatch { seq: u64 },
    /// The stored hash does not match the record's content (an edited record).
    HashMismatch { seq: u64 },
}

/// Verifies a chain in seq order, starting from `seq == 1` with no previous hash.
pub fn verify_chain<'a>(
    records: impl IntoIterator<Item = &'a ProtectedAuditRecord>,
) -> Result<u64, ChainBreak> {
    let mut prev: Option<&str> = None;
    let mut expected = 1;
    for r in records {
        if r.seq != expected {
            return Err(ChainBreak::SeqGap {
                expected,
                found: r.seq,
            });
        }
        if r.prev_hash.as_deref() != prev {
            return Err(ChainBreak::PrevHashMismatch { seq: r.seq });
        }
        if r.compute_hash() != r.record_hash {
            return Err(ChainBreak::HashMismatch { seq: r.seq });
        }
        prev = Some(&r.record_hash);
        expected += 1;
    }
    Ok(expected - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(seq: u64, prev: Option<String>) -> ProtectedAuditRecord {
        let mut r = ProtectedAuditRecord {
            event_id: format!("00000000-0000-4000-8000-00000000000{seq}"),
            durability: DURABILITY_REQUIRED.into(),
            event_type: "automation_v2.internal_sweep.approval_gate_expired".into(),
            tenant_context: TenantContext::local_implicit(),
            actor: Some("tandem-server:internal-sweep".into()),
            payload: json!({"z": 1, "a": {"y": 2, "b": 3}}),
            created_at_ms: 1_700_000_000_000,
            seq,
            prev_hash: prev,
            record_hash: String::new(),
        };
        r.record_hash = r.compute_hash();
        r
    }

    #[test]
    fn canonical_bytes_have_upstream_field_order_and_sorted_payload() {
        let r = record(1, None);
        let canonical = CanonicalAuditRecord {
            event_id: &r.event_id,
            durability_str: &r.durability,
            event_type: &r.event_type,
            tenant_org_id: "local",
            tenant_workspace_id: "local",
            tenant_deployment_id: None,
            tenant_actor_id: None,
            tenant_source: "local_implicit",
            actor: r.actor.as_deref(),
            payload: canonicalize(&r.payload),
            created_at_ms: r.created_at_ms,
            seq: 1,
            prev_hash: None,
        };
        let text = serde_json::to_string(&canonical).expect("serializes");
        assert_eq!(
            text,
            r#"{"event_id":"00000000-0000-4000-8000-000000000001","durability_str":"durable_required","event_type":"automation_v2.internal_sweep.approval_gate_expired","tenant_org_id":"local","tenant_workspace_id":"local","tenant_deployment_id":null,"tenant_actor_id":null,"tenant_source":"local_implicit","actor":"tandem-server:internal-sweep","payload":{"a":{"b":3,"y":2},"z":1},"created_at_ms":1700000000000,"seq":1,"prev_hash":null}"#
        );
        assert_eq!(r.record_hash, hex::encode(Sha256::digest(text.as_bytes())));
    }

    #[test]
    fn payload_key_order_does_not_change_the_hash() {
        let mut a = record(1, None);
        a.payload = json!({"b": 1, "a": 2});
        let mut b = a.clone();
        b.payload = serde_json::from_str(r#"{"a":2,"b":1}"#).expect("json");
        assert_eq!(a.compute_hash(), b.compute_hash());
    }

    #[test]
    fn verify_detects_edit_delete_and_reorder() {
        let r1 = record(1, None);
        let r2 = record(2, Some(r1.record_hash.clone()));
        let r3 = record(3, Some(r2.record_hash.clone()));
        assert_eq!(verify_chain([&r1, &r2, &r3]), Ok(3));
        let mut edited = r2.clone();
        edited.payload = json!({"tampered": true});
        assert_eq!(
            verify_chain([&r1, &edited, &r3]),
            Err(ChainBreak::HashMismatch { seq: 2 })
        );
        assert_eq!(
            verify_chain([&r1, &r3]),
            Err(ChainBreak::SeqGap {
                expected: 2,
                found: 3
            })
        );
        assert_eq!(
            verify_chain([&r2, &r1]),
            Err(ChainBreak::SeqGap {
                expected: 1,
                found: 2
            })
        );
    }
}
