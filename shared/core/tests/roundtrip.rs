//! Upstream JSON compatibility: a run record in the upstream shape, with every field populated,
//! deserializes and serializes back to the same JSON; minimal records take upstream defaults.

use serde_json::{Value, json};
use tandem_core::{AutomationRunStatus, AutomationV2RunRecord, ExecutionProfile, TenantSource};

const FULL: &str = include_str!("fixtures/run_record_full.json");

#[test]
fn full_run_record_round_trips_unchanged() {
    let original: Value = serde_json::from_str(FULL).expect("fixture is JSON");
    let run: AutomationV2RunRecord = serde_json::from_value(original.clone()).expect("parses");
    assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
    assert_eq!(run.tenant_context.source, TenantSource::Explicit);
    assert_eq!(run.effective_execution_profile, ExecutionProfile::Guided);
    let gate = run.checkpoint.awaiting_gate.as_ref().expect("gate");
    assert_eq!(gate.policy_state_u64("reminder_count"), Some(1));
    let back = serde_json::to_value(&run).expect("serializes");
    assert_eq!(back, original);
}

#[test]
fn minimal_record_takes_upstream_defaults_and_omits_nones() {
    let minimal = json!({
        "run_id": "r1",
        "automation_id": "a1",
        "trigger_type": "manual",
        "status": "queued",
        "created_at_ms": 1,
        "updated_at_ms": 1,
        "checkpoint": {}
    });
    let run: AutomationV2RunRecord = serde_json::from_value(minimal).expect("parses");
    assert!(
        run.tenant_context.is_local_implicit(),
        "tenant defaults to local-implicit"
    );
    assert_eq!(run.effective_execution_profile, ExecutionProfile::Strict);
    assert_eq!(run.estimated_cost_usd, 0.0);
    let out = serde_json::to_value(&run).expect("serializes");
    let obj = out.as_object().expect("object");
    for omitted in [
        "started_at_ms",
        "finished_at_ms",
        "detail",
        "stop_kind",
        "scheduler",
        "awaiting_gate",
    ] {
        assert!(
            !obj.contains_key(omitted),
            "{omitted} must be omitted, not null"
        );
    }
    assert!(
        !out["checkpoint"]
            .as_object()
            .expect("cp")
            .contains_key("awaiting_gate")
    );
    assert_eq!(out["checkpoint"]["gate_history"], json!([]));
    assert_eq!(out["tenant_context"]["source"], "local_implicit");
}

#[test]
fn scheduler_queue_reason_is_serialized_even_when_null() {
    let meta = tandem_core::SchedulerMetadata {
        tenant_context: Default::default(),
        queue_reason: None,
        resource_key: None,
        rate_limited_provider: None,
        queued_at_ms: 0,
    };
    let v = serde_json::to_value(&meta).expect("serializes");
    assert_eq!(v["queue_reason"], Value::Null);
    assert!(v.as_object().expect("obj").contains_key("queue_reason"));
}

#[test]
fn unknown_enum_values_are_rejected_not_defaulted() {
    let bad = json!({
        "run_id": "r1", "automation_id": "a1", "trigger_type": "manual",
        "status": "exploded", "created_at_ms": 1, "updated_at_ms": 1, "checkpoint": {}
    });
    let err = serde_json::from_value::<AutomationV2RunRecord>(bad).expect_err("unknown status");
    assert!(err.to_string().contains("exploded"));
}

#[test]
fn checkpoint_is_required() {
    let bad = json!({
        "run_id": "r1", "automation_id": "a1", "trigger_type": "manual",
        "status": "queued", "created_at_ms": 1, "updated_at_ms": 1
    });
    assert!(serde_json::from_value::<AutomationV2RunRecord>(bad).is_err());
}
