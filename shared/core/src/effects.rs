//! What a transition returns: whether the run changed, and the effects to persist with it in the
//! same transaction (lifecycle records, protected audit records, events for the outbox).
//!
//! Every transition goes through [`update`], the pure counterpart of upstream's
//! `update_automation_v2_run` (spec §3.1): it applies a closure to the run and, only when something
//! changed, runs the update hooks (stale-detail refresh, scheduler metadata cleared outside
//! `queued`, `updated_at_ms` bumped, `finished_at_ms` set on a terminal status). A closure that
//! changes nothing yields `changed == false` and no effects, so the store writes nothing
//! (upstream bumps `updated_at_ms` and re-persists even then; we do not).

use crate::model::{
    AutomationLifecycleRecord, AutomationRunStatus, AutomationStopKind, AutomationV2RunRecord,
    Millis, TenantContext,
};
use serde_json::{Map, Value, json};

/// The envelope `actor` of every internal-sweep audit record (spec §1.14).
pub const INTERNAL_SWEEP_ACTOR: &str = "tandem-server:internal-sweep";

/// A protected audit record before the chain links it (seq, prev_hash and record_hash are
/// assigned by the store's chainer).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditDraft {
    pub event_type: String,
    pub actor: Option<String>,
    pub tenant_context: TenantContext,
    pub payload: Value,
}

/// An engine event (spec §1.15) before the outbox gives it an envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct EventDraft {
    /// `type`, e.g. `approval.gate.reminder_due`.
    pub event_type: String,
    pub properties: Value,
    pub run_id: String,
    pub node_id: Option<String>,
    pub tenant_context: TenantContext,
    /// Stable dedupe id for JetStream `Nats-Msg-Id`: the `notification_key` for reminders and
    /// escalations. `None` means the outbox uses the row's own stable event id.
    pub dedupe_key: Option<String>,
}

/// Effects of one transition, persisted atomically with the run row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    /// Lifecycle records appended by this transition (also appended to the run's
    /// `checkpoint.lifecycle_history`).
    pub lifecycle: Vec<AutomationLifecycleRecord>,
    pub audit: Vec<AuditDraft>,
    pub events: Vec<EventDraft>,
    /// Node attempts to dispatch to workers, through the outbox (`tandem.tasks.<queue>`).
    pub tasks: Vec<crate::protocol::TaskMessage>,
    /// Runs whose in-flight tasks workers must abandon (`tandem.control.cancel.<run_id>`, core
    /// NATS, sent after commit; best effort, results are fenced anyway).
    pub cancel_tasks_of: Vec<String>,
}

impl Effects {
    /// Appends `other`'s effects after this one's (two transitions persisted as one write).
    pub fn append(&mut self, other: Effects) {
        self.lifecycle.extend(other.lifecycle);
        self.audit.extend(other.audit);
        self.events.extend(other.events);
        self.tasks.extend(other.tasks);
        self.cancel_tasks_of.extend(other.cancel_tasks_of);
    }

    pub fn is_empty(&self) -> bool {
        self.lifecycle.is_empty()
            && self.audit.is_empty()
            && self.events.is_empty()
            && self.tasks.is_empty()
            && self.cancel_tasks_of.is_empty()
    }

    /// The lifecycle writer (`record_automation_lifecycle_event_with_metadata`, spec §1.9):
    /// appends to the run's history and to the effects, merging `effective_execution_profile`
    /// into the metadata (a caller-supplied value wins; a non-object is wrapped as `value`).
    pub fn lifecycle(
        &mut self,
        run: &mut AutomationV2RunRecord,
        event: &str,
        reason: Option<String>,
        stop_kind: Option<AutomationStopKind>,
        metadata: Option<Value>,
        now: Millis,
    ) {
        let record = lifecycle_record(
            event,
            reason,
            stop_kind,
            metadata,
            run.effective_execution_profile.as_str(),
            now,
        );
        run.checkpoint.lifecycle_history.push(record.clone());
        self.lifecycle.push(record);
    }

    /// `append_internal_sweep_protected_audit_event` (spec §1.14), built from the run *after*
    /// the update.
    pub fn internal_sweep_audit(
        &mut self,
        run: &AutomationV2RunRecord,
        event_type: &str,
        sweep: &str,
        outcome: &str,
        reason: Option<&str>,
        metadata: Value,
    ) {
        self.audit.push(AuditDraft {
            event_type: event_type.into(),
            actor: Some(INTERNAL_SWEEP_ACTOR.into()),
            tenant_context: run.tenant_context.clone(),
            payload: internal_sweep_audit_payload(run, sweep, outcome, reason, metadata),
        });
    }

    pub fn event(
        &mut self,
        run: &AutomationV2RunRecord,
        event_type: &str,
        node_id: Option<&str>,
        properties: Value,
        dedupe_key: Option<String>,
    ) {
        self.events.push(EventDraft {
            event_type: event_type.into(),
            properties,
            run_id: run.run_id.clone(),
            node_id: node_id.map(str::to_owned),
            tenant_context: run.tenant_context.clone(),
            dedupe_key,
        });
    }
}

/// A lifecycle record as the upstream writer builds it (spec §1.9, §6 case 54).
pub fn lifecycle_record(
    event: &str,
    reason: Option<String>,
    stop_kind: Option<AutomationStopKind>,
    metadata: Option<Value>,
    profile: &str,
    now: Millis,
) -> AutomationLifecycleRecord {
    let profile = Value::String(profile.to_owned());
    let metadata = match metadata {
        None => {
            let mut m = Map::new();
            m.insert("effective_execution_profile".into(), profile);
            Value::Object(m)
        }
        Some(Value::Object(mut m)) => {
            m.entry("effective_execution_profile").or_insert(profile);
            Value::Object(m)
        }
        Some(other) => json!({ "value": other, "effective_execution_profile": profile }),
    };
    AutomationLifecycleRecord {
        event: event.into(),
        recorded_at_ms: now,
        reason,
        stop_kind,
        metadata: Some(metadata),
    }
}

/// The internal-sweep audit payload (spec §1.14). Keys serialize alphabetically (BTreeMap), as
/// upstream's `serde_json` without `preserve_order` does.
pub fn internal_sweep_audit_payload(
    run: &AutomationV2RunRecord,
    sweep: &str,
    outcome: &str,
    reason: Option<&str>,
    metadata: Value,
) -> Value {
    json!({
        "source": "automation_v2_internal_sweep",
        "sweep": sweep,
        "actor": {"type": "system", "id": "tandem-server", "component": "automation_v2_sweeper"},
        "run_id": run.run_id,
        "runID": run.run_id,
        "automation_id": run.automation_id,
        "automationID": run.automation_id,
        "status": run.status.as_str(),
        "stop_kind": run.stop_kind.map(|k| k.as_str()),
        "reason": reason,
        "tenantContext": run.tenant_context.to_value(),
        "outcome": outcome,
        "metadata": metadata,
    })
}

/// The result of a transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition<T> {
    pub outcome: T,
    /// False for a no-op: the store must write nothing.
    pub changed: bool,
    pub effects: Effects,
}

impl<T> Transition<T> {
    pub fn unchanged(outcome: T) -> Self {
        Self {
            outcome,
            changed: false,
            effects: Effects::default(),
        }
    }
}

/// Applies `f` as one update of `run` (spec §3.1 steps 3–7), reporting whether anything changed.
///
/// The run is compared before and after; when the closure changed nothing and produced no
/// effects, the hooks do not run and the transition is a no-op.
pub fn update<T>(
    run: &mut AutomationV2RunRecord,
    now: Millis,
    f: impl FnOnce(&mut AutomationV2RunRecord, &mut Effects) -> T,
) -> Transition<T> {
    let before = run.clone();
    let mut effects = Effects::default();
    let outcome = f(run, &mut effects);
    if *run == before && effects.is_empty() {
        return Transition::unchanged(outcome);
    }
    finish_update(run, now);
    Transition {
        outcome,
        changed: true,
        effects,
    }
}

/// The hooks every changing update runs (spec §3.1 steps 4–7).
fn finish_update(run: &mut AutomationV2RunRecord, now: Millis) {
    crate::sweeps::refresh_stale_running_detail(run);
    if run.status != AutomationRunStatus::Queued {
        run.scheduler = None;
    }
    run.updated_at_ms = now;
    if run.status.is_terminal() && run.finished_at_ms.is_none() {
        run.finished_at_ms = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AutomationFlowNode, AutomationV2Spec, ExecutionProfile};

    fn run() -> AutomationV2RunRecord {
        let spec = AutomationV2Spec::new("a", vec![AutomationFlowNode::task("n", &[])]);
        AutomationV2RunRecord::new_queued("r".into(), &spec, "manual", ExecutionProfile::Guided, 10)
    }

    #[test]
    fn case_54_lifecycle_metadata_carries_effective_profile_when_absent() {
        let r = lifecycle_record("run_paused", None, None, None, "guided", 5);
        assert_eq!(
            r.metadata,
            Some(json!({"effective_execution_profile": "guided"}))
        );
        assert_eq!(r.recorded_at_ms, 5);
    }

    #[test]
    fn case_54_lifecycle_metadata_does_not_overwrite_existing_profile_key() {
        let given = json!({"effective_execution_profile": "yolo"});
        let r = lifecycle_record("e", None, None, Some(given.clone()), "strict", 5);
        assert_eq!(r.metadata, Some(given));
    }

    #[test]
    fn case_54_lifecycle_metadata_merges_into_existing_object_and_wraps_non_objects() {
        let r = lifecycle_record("e", None, None, Some(json!({"node_id": "x"})), "strict", 5);
        assert_eq!(
            r.metadata,
            Some(json!({"node_id": "x", "effective_execution_profile": "strict"}))
        );
        let r = lifecycle_record("e", None, None, Some(json!(7)), "strict", 5);
        assert_eq!(
            r.metadata,
            Some(json!({"value": 7, "effective_execution_profile": "strict"}))
        );
    }

    #[test]
    fn no_op_update_changes_nothing_and_reports_unchanged() {
        let mut r = run();
        let before = r.clone();
        let t = update(&mut r, 99, |_, _| 42);
        assert_eq!(t.outcome, 42);
        assert!(!t.changed);
        assert!(t.effects.is_empty());
        assert_eq!(r, before, "updated_at_ms is not bumped by a no-op");
    }

    #[test]
    fn changing_update_runs_hooks() {
        let mut r = run();
        r.scheduler = Some(crate::model::SchedulerMetadata {
            tenant_context: Default::default(),
            queue_reason: None,
            resource_key: None,
            rate_limited_provider: None,
            queued_at_ms: 1,
        });
        let t = update(&mut r, 99, |run, fx| {
            run.status = AutomationRunStatus::Failed;
            fx.lifecycle(
                run,
                "run_failed_shutdown",
                None,
                Some(AutomationStopKind::Shutdown),
                None,
                99,
            );
        });
        assert!(t.changed);
        assert_eq!(r.updated_at_ms, 99);
        assert_eq!(
            r.finished_at_ms,
            Some(99),
            "terminal status sets finished_at_ms"
        );
        assert!(
            r.scheduler.is_none(),
            "scheduler metadata cleared outside queued"
        );
        assert_eq!(t.effects.lifecycle.len(), 1);
        assert_eq!(r.checkpoint.lifecycle_history, t.effects.lifecycle);
        // finished_at_ms is set once.
        update(&mut r, 150, |run, _| run.detail = Some("x".into()));
        assert_eq!(r.finished_at_ms, Some(99));
    }

    #[test]
    fn internal_sweep_payload_has_upstream_keys() {
        let mut r = run();
        r.status = AutomationRunStatus::Cancelled;
        r.stop_kind = Some(AutomationStopKind::Cancelled);
        let p =
            internal_sweep_audit_payload(&r, "sweep_x", "outcome_y", Some("why"), json!({"k": 1}));
        assert_eq!(
            p,
            json!({
                "source": "automation_v2_internal_sweep",
                "sweep": "sweep_x",
                "actor": {"type": "system", "id": "tandem-server", "component": "automation_v2_sweeper"},
                "run_id": "r", "runID": "r",
                "automation_id": "a", "automationID": "a",
                "status": "cancelled",
                "stop_kind": "cancelled",
                "reason": "why",
                "tenantContext": {"org_id": "local", "workspace_id": "local", "source": "local_implicit"},
                "outcome": "outcome_y",
                "metadata": {"k": 1}
            })
        );
        let keys: Vec<&String> = p.as_object().expect("obj").keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "payload keys serialize alphabetically");
    }
}
