//! Claim decision (spec §3.4, §3.5).
//!
//! [`claim_run`] is the pure counterpart of upstream's `claim_specific_automation_v2_run`. The
//! store calls it on the row it locked (`FOR UPDATE` / `SKIP LOCKED`) with a governance snapshot
//! read in the same transaction, so the runtime-context and spend-pause decisions are made on
//! exactly the state that gets written. Upstream's race R4 (spec §5: decisions taken on data read
//! outside the lock, only the status re-checked) therefore cannot happen here.
//!
//! Compatibility decision (§7.17): upstream's runtime-context failure and launch hold mutate the
//! map directly, skipping `update_automation_v2_run`. Here every outcome goes through
//! [`crate::effects::update`], so `updated_at_ms`, `finished_at_ms` and the scheduler metadata
//! follow the ordinary rules and the store runs its terminal hooks. On top of upstream's fields:
//! * runtime-context failure: `stop_kind` stays unset (as upstream), but the run gets the
//!   lifecycle record [`LIFECYCLE_RUNTIME_CONTEXT_FAILED`] and the protected audit
//!   [`AUDIT_RUNTIME_CONTEXT_FAILED`], so the failure is visible in the run history and the
//!   audit chain like every other system-initiated terminal transition;
//! * launch hold: upstream's fields and `run_launch_held` record are kept exactly, and the
//!   protected audit [`AUDIT_LAUNCH_HELD`] is added (a governance stop is audit-worthy).

use std::sync::Arc;

use crate::effects::{Transition, update};
use crate::governance::{GovernanceSnapshot, agent_set};
use crate::model::{
    AutomationFailureRecord, AutomationRunStatus, AutomationStopKind, AutomationV2RunRecord,
    AutomationV2Spec, Millis,
};
use serde_json::{Value, json};

/// Detail (and `last_failure.reason`) of the runtime-context failure (spec §3.4 step 3).
pub const RUNTIME_CONTEXT_MISSING_DETAIL: &str =
    "runtime context partition missing for automation run";
/// `last_failure.node_id` of the runtime-context failure.
pub const RUNTIME_CONTEXT_NODE_ID: &str = "runtime_context";
/// `pause_reason`, `detail` and `stop_reason` of the launch hold (spec §3.4 step 4).
pub const LAUNCH_HELD_DETAIL: &str =
    "automation run held at launch: agent weekly spend cap reached";
/// Lifecycle event of the launch hold.
pub const LIFECYCLE_LAUNCH_HELD: &str = "run_launch_held";
/// `metadata.reason` of the `run_launch_held` record.
pub const LAUNCH_HELD_METADATA_REASON: &str = "agent_spend_paused";
/// Fleet addition (§7.17): lifecycle record of the runtime-context failure.
pub const LIFECYCLE_RUNTIME_CONTEXT_FAILED: &str = "run_failed_runtime_context_missing";
/// Fleet addition (§7.17): audit of the runtime-context failure.
pub const AUDIT_RUNTIME_CONTEXT_FAILED: &str =
    "automation_v2.internal_sweep.runtime_context_missing_failed_run";
/// Fleet addition (§7.17): audit of the launch hold.
pub const AUDIT_LAUNCH_HELD: &str = "automation_v2.internal_sweep.launch_held_run";
/// `sweep` of the claim audits: upstream's function name, as the sweeps use theirs.
pub const CLAIM_SWEEP: &str = "claim_specific_automation_v2_run";

/// The definition a claim decides with (spec §3.4 step 2): the run's snapshot, else the live
/// definition.
///
/// The auto-resume sweeps use the same resolution (upstream prefers the live definition there),
/// so a resume and the claim that follows it always look at the same agent set.
pub fn claim_automation<'a>(
    run: &'a AutomationV2RunRecord,
    live: Option<&'a AutomationV2Spec>,
) -> Option<&'a AutomationV2Spec> {
    run.automation_snapshot.as_deref().or(live)
}

/// The agents that hold a launch (spec §3.5): spend-paused without their own unexpired quota
/// override, scoped by the automation's tenant. Empty means the launch is not held; equivalent to
/// [`GovernanceSnapshot::launch_blocked_by_spend_pause`].
pub fn agents_holding_launch(
    governance: &GovernanceSnapshot,
    automation: &AutomationV2Spec,
    now: Millis,
) -> Vec<String> {
    let tenant = automation.tenant_context();
    agent_set(automation)
        .into_iter()
        .filter(|agent| governance.spend_paused_without_override(&tenant, agent, now))
        .collect()
}

/// What a claim did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The row is not `queued` (claimed, cancelled or resumed elsewhere): nothing written.
    NotQueued(AutomationRunStatus),
    /// `queued → running`; the caller dispatches the run.
    Claimed,
    /// `queued → failed`: the automation needs a runtime context and none exists.
    RuntimeContextMissing,
    /// `queued → paused` (`guardrail_stopped`): these agents are spend-paused without override.
    LaunchHeld { agent_ids: Vec<String> },
}

/// `claim_specific_automation_v2_run` (spec §3.4) on a locked row.
///
/// * `automation`: the live definition; the claim decides with [`claim_automation`].
/// * `computed_runtime_context`: the freshly materialized runtime context (errors already mapped
///   to `None`); it wins over the stored one.
///
/// Checks, in upstream order: status `queued`; runtime context required but missing → failed;
/// spend-pause hold → paused; otherwise running. See the module docs for what the failure and
/// hold paths write beyond upstream (§7.17).
pub fn claim_run(
    run: &mut AutomationV2RunRecord,
    automation: Option<&AutomationV2Spec>,
    computed_runtime_context: Option<Value>,
    governance: &GovernanceSnapshot,
    now: Millis,
) -> Transition<ClaimOutcome> {
    if run.status != AutomationRunStatus::Queued {
        return Transition::unchanged(ClaimOutcome::NotQueued(run.status));
    }
    // The snapshot is shared; only a run without one copies the live definition (it becomes
    // the run's snapshot below).
    let resolved = run
        .automation_snapshot
        .clone()
        .or_else(|| automation.cloned().map(Arc::new));
    // A JSON null is no context at all.
    let computed = computed_runtime_context.filter(|v| !v.is_null());
    let stored_present = run.runtime_context.as_ref().is_some_and(|v| !v.is_null());
    let required = resolved
        .as_ref()
        .is_some_and(|a| a.requires_runtime_context());

    if required && computed.is_none() && !stored_present {
        let mut tr = update(run, now, |row, fx| {
            row.status = AutomationRunStatus::Failed;
            row.detail = Some(RUNTIME_CONTEXT_MISSING_DETAIL.into());
            if row.checkpoint.last_failure.is_none() {
                row.checkpoint.last_failure = Some(AutomationFailureRecord {
                    node_id: RUNTIME_CONTEXT_NODE_ID.into(),
                    reason: RUNTIME_CONTEXT_MISSING_DETAIL.into(),
                    failed_at_ms: now,
                });
            }
            fx.lifecycle(
                row,
                LIFECYCLE_RUNTIME_CONTEXT_FAILED,
                Some(RUNTIME_CONTEXT_MISSING_DETAIL.into()),
                None,
                None,
                now,
            );
            ClaimOutcome::RuntimeContextMissing
        });
        tr.effects.internal_sweep_audit(
            run,
            AUDIT_RUNTIME_CONTEXT_FAILED,
            CLAIM_SWEEP,
            "failed",
            Some(RUNTIME_CONTEXT_MISSING_DETAIL),
            json!({ "previous_status": "queued", "node_id": RUNTIME_CONTEXT_NODE_ID }),
        );
        return tr;
    }

    let holding = resolved
        .as_ref()
        .map(|a| agents_holding_launch(governance, a, now))
        .unwrap_or_default();
    if !holding.is_empty() {
        let mut tr = update(run, now, |row, fx| {
            row.status = AutomationRunStatus::Paused;
            row.stop_kind = Some(AutomationStopKind::GuardrailStopped);
            row.pause_reason = Some(LAUNCH_HELD_DETAIL.into());
            row.detail = Some(LAUNCH_HELD_DETAIL.into());
            row.stop_reason = Some(LAUNCH_HELD_DETAIL.into());
            fx.lifecycle(
                row,
                LIFECYCLE_LAUNCH_HELD,
                Some(LAUNCH_HELD_DETAIL.into()),
                Some(AutomationStopKind::GuardrailStopped),
                Some(json!({ "reason": LAUNCH_HELD_METADATA_REASON })),
                now,
            );
            ClaimOutcome::LaunchHeld {
                agent_ids: holding.clone(),
            }
        });
        tr.effects.internal_sweep_audit(
            run,
            AUDIT_LAUNCH_HELD,
            CLAIM_SWEEP,
            "held",
            Some(LAUNCH_HELD_DETAIL),
            json!({
                "previous_status": "queued",
                "reason": LAUNCH_HELD_METADATA_REASON,
                "agent_ids": holding,
            }),
        );
        return tr;
    }

    update(run, now, |row, _fx| {
        if row.automation_snapshot.is_none() {
            row.automation_snapshot = resolved;
        }
        if let Some(context) = computed {
            row.runtime_context = Some(context);
        }
        row.status = AutomationRunStatus::Running;
        row.started_at_ms.get_or_insert(now);
        // Upstream writes no lifecycle record for a claim (spec §3.4 step 5).
        ClaimOutcome::Claimed
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governance::{QuotaOverride, agent_scope_key};
    use crate::model::{
        AutomationAgentProfile, AutomationFlowNode, ExecutionProfile, SchedulerMetadata,
        TenantContext,
    };

    const T0: Millis = 1_000_000;

    fn spec(agents: &[&str]) -> AutomationV2Spec {
        let mut s = AutomationV2Spec::new(
            "auto-claim",
            vec![
                AutomationFlowNode::task("collect", &[]),
                AutomationFlowNode::task("draft", &["collect"]),
            ],
        );
        s.agents = agents
            .iter()
            .map(|a| AutomationAgentProfile {
                agent_id: (*a).into(),
                extra: Default::default(),
            })
            .collect();
        s
    }

    fn queued(spec: &AutomationV2Spec) -> AutomationV2RunRecord {
        let mut run = AutomationV2RunRecord::new_queued(
            "automation-v2-run-claim".into(),
            spec,
            "manual",
            ExecutionProfile::Guided,
            T0,
        );
        run.scheduler = Some(SchedulerMetadata {
            tenant_context: TenantContext::local_implicit(),
            queue_reason: None,
            resource_key: None,
            rate_limited_provider: None,
            queued_at_ms: T0,
        });
        run
    }

    fn paused_gov(agents: &[&str]) -> GovernanceSnapshot {
        let mut g = GovernanceSnapshot::default();
        for a in agents {
            g.spend_paused_agents.insert((*a).into());
        }
        g
    }

    #[test]
    fn case_36_run_launches_normally_without_governance_state() {
        let s = spec(&["agent-a"]);
        let mut run = queued(&s);
        let tr = claim_run(
            &mut run,
            Some(&s),
            None,
            &GovernanceSnapshot::default(),
            T0 + 5,
        );
        assert_eq!(tr.outcome, ClaimOutcome::Claimed);
        assert!(tr.changed);
        assert_eq!(run.status, AutomationRunStatus::Running);
        assert_eq!(run.started_at_ms, Some(T0 + 5));
        assert_eq!(run.updated_at_ms, T0 + 5);
        assert_eq!(run.scheduler, None, "cleared outside queued");
        assert!(tr.effects.is_empty(), "no lifecycle record for a claim");
        assert!(run.checkpoint.lifecycle_history.is_empty());
    }

    #[test]
    fn case_11_claim_without_runtime_context_requirement_succeeds_with_none() {
        let s = spec(&[]);
        let mut run = queued(&s);
        let tr = claim_run(&mut run, Some(&s), None, &GovernanceSnapshot::default(), T0);
        assert_eq!(tr.outcome, ClaimOutcome::Claimed);
        assert_eq!(run.status, AutomationRunStatus::Running);
        assert_eq!(run.runtime_context, None);
    }

    #[test]
    fn case_10_required_runtime_context_missing_fails_the_run() {
        let mut s = spec(&[]);
        s.metadata = Some(json!({ "context_materialization": { "partition": "p1" } }));
        let mut run = queued(&s);
        let tr = claim_run(
            &mut run,
            Some(&s),
            None,
            &GovernanceSnapshot::default(),
            T0 + 9,
        );
        assert_eq!(tr.outcome, ClaimOutcome::RuntimeContextMissing);
        assert_eq!(run.status, AutomationRunStatus::Failed);
        assert_eq!(
            run.detail.as_deref(),
            Some("runtime context partition missing for automation run")
        );
        let lf = run.checkpoint.last_failure.as_ref().expect("last_failure");
        assert_eq!(lf.node_id, "runtime_context");
        assert_eq!(lf.reason, RUNTIME_CONTEXT_MISSING_DETAIL);
        assert_eq!(lf.failed_at_ms, T0 + 9);
        assert_eq!(run.finished_at_ms, Some(T0 + 9));
        assert_eq!(run.scheduler, None);
        assert_eq!(run.started_at_ms, None, "never started");
        // Upstream-observable: no stop_kind.
        assert_eq!(run.stop_kind, None);
        // §7.17 fleet additions: lifecycle + audit.
        assert_eq!(
            run.checkpoint.lifecycle_history[0].event,
            "run_failed_runtime_context_missing"
        );
        assert_eq!(tr.effects.audit.len(), 1);
        let payload = &tr.effects.audit[0].payload;
        assert_eq!(
            tr.effects.audit[0].event_type,
            "automation_v2.internal_sweep.runtime_context_missing_failed_run"
        );
        assert_eq!(payload["sweep"], "claim_specific_automation_v2_run");
        assert_eq!(payload["status"], "failed");
        assert_eq!(payload["stop_kind"], Value::Null);
        assert_eq!(payload["outcome"], "failed");
    }

    #[test]
    fn case_10_existing_last_failure_is_kept() {
        let mut s = spec(&[]);
        s.metadata = Some(json!({ "approved_plan_materialization": {} }));
        let mut run = queued(&s);
        let earlier = AutomationFailureRecord {
            node_id: "collect".into(),
            reason: "earlier".into(),
            failed_at_ms: 1,
        };
        run.checkpoint.last_failure = Some(earlier.clone());
        claim_run(&mut run, Some(&s), None, &GovernanceSnapshot::default(), T0);
        assert_eq!(run.checkpoint.last_failure, Some(earlier));
    }

    #[test]
    fn runtime_context_computed_wins_over_stored_and_stored_suffices() {
        let mut s = spec(&[]);
        s.metadata = Some(json!({ "context_materialization": {} }));
        let mut run = queued(&s);
        run.runtime_context = Some(json!({ "v": "stored" }));
        let tr = claim_run(
            &mut run,
            Some(&s),
            Some(json!({ "v": "computed" })),
            &GovernanceSnapshot::default(),
            T0,
        );
        assert_eq!(tr.outcome, ClaimOutcome::Claimed);
        assert_eq!(run.runtime_context, Some(json!({ "v": "computed" })));

        let mut run = queued(&s);
        run.runtime_context = Some(json!({ "v": "stored" }));
        let tr = claim_run(&mut run, Some(&s), None, &GovernanceSnapshot::default(), T0);
        assert_eq!(tr.outcome, ClaimOutcome::Claimed);
        assert_eq!(run.runtime_context, Some(json!({ "v": "stored" })));

        let mut run = queued(&s);
        let tr = claim_run(
            &mut run,
            Some(&s),
            Some(Value::Null),
            &GovernanceSnapshot::default(),
            T0,
        );
        assert_eq!(
            tr.outcome,
            ClaimOutcome::RuntimeContextMissing,
            "null is none"
        );
    }

    #[test]
    fn untested_launch_hold_lifecycle_record_and_upstream_fields() {
        let s = spec(&["agent-spend"]);
        let mut run = queued(&s);
        let tr = claim_run(
            &mut run,
            Some(&s),
            None,
            &paused_gov(&["agent-spend"]),
            T0 + 3,
        );
        assert_eq!(
            tr.outcome,
            ClaimOutcome::LaunchHeld {
                agent_ids: vec!["agent-spend".into()]
            }
        );
        assert_eq!(run.status, AutomationRunStatus::Paused);
        assert_eq!(run.stop_kind, Some(AutomationStopKind::GuardrailStopped));
        for field in [&run.pause_reason, &run.detail, &run.stop_reason] {
            assert_eq!(
                field.as_deref(),
                Some("automation run held at launch: agent weekly spend cap reached")
            );
        }
        assert_eq!(run.started_at_ms, None);
        assert_eq!(run.finished_at_ms, None);
        assert_eq!(run.scheduler, None);
        let record = &run.checkpoint.lifecycle_history[0];
        let expected = serde_json::to_value(record).expect("record");
        assert_eq!(
            expected,
            json!({
                "event": "run_launch_held",
                "recorded_at_ms": T0 + 3,
                "reason": "automation run held at launch: agent weekly spend cap reached",
                "stop_kind": "guardrail_stopped",
                "metadata": {
                    "reason": "agent_spend_paused",
                    "effective_execution_profile": "guided"
                }
            })
        );
        assert_eq!(tr.effects.lifecycle, vec![record.clone()]);
        // §7.17: the hold is audited.
        assert_eq!(tr.effects.audit.len(), 1);
        let audit = &tr.effects.audit[0];
        assert_eq!(
            audit.event_type,
            "automation_v2.internal_sweep.launch_held_run"
        );
        assert_eq!(audit.payload["status"], "paused");
        assert_eq!(audit.payload["stop_kind"], "guardrail_stopped");
        assert_eq!(audit.payload["outcome"], "held");
        assert_eq!(
            audit.payload["metadata"],
            json!({"previous_status": "queued", "reason": "agent_spend_paused", "agent_ids": ["agent-spend"]})
        );
    }

    #[test]
    fn runtime_context_failure_is_checked_before_the_hold() {
        let mut s = spec(&["agent-spend"]);
        s.metadata = Some(json!({ "context_materialization": {} }));
        let mut run = queued(&s);
        let tr = claim_run(&mut run, Some(&s), None, &paused_gov(&["agent-spend"]), T0);
        assert_eq!(tr.outcome, ClaimOutcome::RuntimeContextMissing);
    }

    #[test]
    fn override_on_another_agent_does_not_lift_the_hold() {
        let s = spec(&["a1", "a2"]);
        let mut g = paused_gov(&["a1", "a2"]);
        g.quota_overrides.push(QuotaOverride {
            agent_key: "a1".into(),
            expires_at_ms: T0 + 1_000,
        });
        let mut run = queued(&s);
        let tr = claim_run(&mut run, Some(&s), None, &g, T0);
        assert_eq!(
            tr.outcome,
            ClaimOutcome::LaunchHeld {
                agent_ids: vec!["a2".into()]
            }
        );
    }

    #[test]
    fn case_37_spend_pause_does_not_cross_to_same_named_agent_in_another_tenant() {
        let tenant_a = TenantContext::explicit("org-a", "ws");
        let tenant_b = TenantContext::explicit("org-b", "ws");
        let mut g = GovernanceSnapshot::default();
        g.spend_paused_agents
            .insert(agent_scope_key(&tenant_a, "shared-agent"));
        let mut s = spec(&["shared-agent"]);
        s.metadata = Some(json!({ "tenant_context": tenant_b }));
        let mut run = queued(&s);
        let tr = claim_run(&mut run, Some(&s), None, &g, T0);
        assert_eq!(tr.outcome, ClaimOutcome::Claimed);
        assert_eq!(run.tenant_context, tenant_b);

        s.metadata = Some(json!({ "tenant_context": tenant_a }));
        let mut run = queued(&s);
        let tr = claim_run(&mut run, Some(&s), None, &g, T0);
        assert!(matches!(tr.outcome, ClaimOutcome::LaunchHeld { .. }));
    }

    #[test]
    fn not_queued_is_a_no_op() {
        let s = spec(&[]);
        for status in AutomationRunStatus::ALL {
            if status == AutomationRunStatus::Queued {
                continue;
            }
            let mut run = queued(&s);
            run.status = status;
            let before = run.clone();
            let tr = claim_run(
                &mut run,
                Some(&s),
                None,
                &GovernanceSnapshot::default(),
                T0 + 1,
            );
            assert_eq!(tr.outcome, ClaimOutcome::NotQueued(status));
            assert!(!tr.changed);
            assert!(tr.effects.is_empty());
            assert_eq!(run, before, "row untouched, updated_at_ms not bumped");
        }
    }

    #[test]
    fn claim_decides_with_snapshot_and_fills_a_missing_snapshot() {
        // Snapshot has the spend-paused agent; the live definition does not: snapshot wins.
        let snap = spec(&["paused-agent"]);
        let live = spec(&["other"]);
        let mut run = queued(&snap);
        let tr = claim_run(
            &mut run,
            Some(&live),
            None,
            &paused_gov(&["paused-agent"]),
            T0,
        );
        assert!(matches!(tr.outcome, ClaimOutcome::LaunchHeld { .. }));

        let mut run = queued(&snap);
        run.automation_snapshot = None;
        let tr = claim_run(
            &mut run,
            Some(&live),
            None,
            &GovernanceSnapshot::default(),
            T0,
        );
        assert_eq!(tr.outcome, ClaimOutcome::Claimed);
        assert_eq!(run.automation_snapshot.as_deref(), Some(&live));
    }

    #[test]
    fn started_at_is_set_once() {
        let s = spec(&[]);
        let mut run = queued(&s);
        run.started_at_ms = Some(7);
        claim_run(&mut run, Some(&s), None, &GovernanceSnapshot::default(), T0);
        assert_eq!(run.started_at_ms, Some(7));
    }

    #[test]
    fn no_automation_at_all_claims_without_checks() {
        let s = spec(&["paused-agent"]);
        let mut run = queued(&s);
        run.automation_snapshot = None;
        let tr = claim_run(&mut run, None, None, &paused_gov(&["paused-agent"]), T0);
        assert_eq!(tr.outcome, ClaimOutcome::Claimed);
    }
}
