//! Sweeps on runs (spec §3.2, §3.6–§3.9, §3.12), each a pure transition of one row.
//!
//! Upstream sweeps snapshot candidates, release the lock, then update, so any state can change
//! in between (spec §5 R1, §7.9). Here the store calls each transition on the row it locked
//! `FOR UPDATE`, and every transition re-checks its own preconditions (status, stop kind, window,
//! cap, governance) on that row. A transition whose preconditions fail is a no-op
//! (`changed == false`) and the store writes nothing.
//!
//! Decisions that differ from upstream are summarized on each item and in
//! `docs/compatibility.md`:
//! * §7.6: `TANDEM_DISABLE_STALE_AUTO_RESUME` disables only the stale path.
//! * §7.7: the stale auto-resume cap counts only stale auto-resumes.
//! * §7.8: the guardrail auto-resume uses the launch-hold predicate, resumes only spend-caused
//!   stops, and skips paused automations.
//! * §7.9/R1: both auto-resumes re-check status and stop kind on the locked row.
//! * §7.30: a missing `node_attempts` entry counts as 1 attempt in the reaper and in auto-resume.

use crate::claim::claim_automation;
use crate::config::{
    AUTOMATION_STALE_NODE_TIMEOUT_GRACE_MS, DEFAULT_NODE_TIMEOUT_MS, StaleSettings,
};
use crate::effects::{Transition, update};
use crate::governance::{GovernanceSnapshot, agent_set};
use crate::graph::node_max_attempts;
use crate::model::{
    AutomationFailureRecord, AutomationFlowNode, AutomationLifecycleRecord, AutomationRunStatus,
    AutomationStatus, AutomationStopKind, AutomationV2RunRecord, AutomationV2Spec, Millis,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;

// ---------------------------------------------------------------------------------------------
// Names and strings (compatibility facts, spec §3.6–§3.9, §3.12, §3.14, §3.15)
// ---------------------------------------------------------------------------------------------

/// `pause_reason` of a stale-reaped run and the error category of stalled node outputs.
pub const STALE_NO_PROVIDER_ACTIVITY: &str = "stale_no_provider_activity";
pub const LIFECYCLE_RUN_PAUSED_STALE: &str = "run_paused_stale_no_provider_activity";
pub const LIFECYCLE_RUN_FAILED_STALE: &str = "run_failed_stale_no_provider_activity";
pub const AUDIT_PAUSED_STALE_RUN: &str = "automation_v2.internal_sweep.paused_stale_run";
pub const AUDIT_FAILED_STALE_RUN: &str = "automation_v2.internal_sweep.failed_stale_run";
pub const EVENT_RUN_PAUSED_STALE: &str = "automation_v2.run.paused_stale_no_provider_activity";
pub const EVENT_RUN_FAILED_STALE: &str = "automation_v2.run.failed_stale_no_provider_activity";
pub const EVENT_RUN_FAILED: &str = "automation_v2.run.failed";
pub const REAP_SWEEP: &str = "reap_stale_running_automation_runs";

pub const LIFECYCLE_RUN_AUTO_RESUMED: &str = "run_auto_resumed";
pub const AUTO_RESUME_AFTER_STALE_REAP: &str = "auto_resume_after_stale_reap";
pub const AUTO_RESUME_AFTER_GUARDRAIL_OVERRIDE: &str = "auto_resume_after_guardrail_override";
pub const AUDIT_AUTO_RESUMED_STALE: &str =
    "automation_v2.internal_sweep.auto_resumed_stale_reaped_run";
pub const AUDIT_AUTO_RESUMED_GUARDRAIL: &str =
    "automation_v2.internal_sweep.auto_resumed_guardrail_stopped_run";
pub const STALE_AUTO_RESUME_SWEEP: &str = "auto_resume_stale_reaped_runs";
pub const GUARDRAIL_AUTO_RESUME_SWEEP: &str = "auto_resume_guardrail_stopped_runs";

/// Guardrail stops an approved quota override can lift (§7.8 fix): the launch hold and the
/// weekly spend-cap hard stop. Budget guardrails (`max_total_*`), dependency revocation and
/// health expiry are not lifted by an override and are never auto-resumed.
pub const OVERRIDE_LIFTABLE_GUARDRAIL_EVENTS: [&str; 2] =
    ["run_launch_held", "run_paused_spend_cap_exceeded"];

pub const SHUTDOWN_DETAIL: &str = "automation run stopped during server shutdown";
pub const LIFECYCLE_RUN_FAILED_SHUTDOWN: &str = "run_failed_shutdown";
pub const AUDIT_SHUTDOWN_FAILED_RUN: &str = "automation_v2.internal_sweep.shutdown_failed_run";
pub const SHUTDOWN_SWEEP: &str = "fail_running_automation_runs_for_shutdown";

pub const SERVER_RESTART_DETAIL: &str = "automation run interrupted by server restart";
pub const LIFECYCLE_RUN_FAILED_SERVER_RESTART: &str = "run_failed_server_restart";
pub const AUDIT_SERVER_RESTART_FAILED_RUN: &str =
    "automation_v2.internal_sweep.server_restart_failed_run";
pub const PAUSING_SETTLED_DETAIL: &str = "automation run settled to paused after server restart";
pub const LIFECYCLE_RUN_PAUSING_SETTLED: &str = "run_pausing_settled_on_restart";
pub const AUDIT_SERVER_RESTART_SETTLED_PAUSING: &str =
    "automation_v2.internal_sweep.server_restart_settled_pausing_run";
pub const RECOVER_SWEEP: &str = "recover_in_flight_runs";

/// The lifecycle event that marks a node as in progress (spec §3.7).
pub const NODE_STARTED: &str = "node_started";
/// Lifecycle events that end a node's in-progress state (spec §3.7).
pub const NODE_SETTLED_EVENTS: [&str; 8] = [
    "node_completed",
    "node_completed_with_warnings",
    "node_blocked",
    "node_repair_requested",
    "node_verify_failed",
    "node_failed",
    "node_skipped_no_work",
    "node_approval_rollback",
];

// ---------------------------------------------------------------------------------------------
// §3.2 refresh_stale_running_detail
// ---------------------------------------------------------------------------------------------

/// The node id in a detail line: the text between the first ``node ` `` and the next backtick,
/// untrimmed, rejected when blank (upstream `detail_node_id`).
fn detail_node_id(detail: &str) -> Option<&str> {
    let (_, tail) = detail.split_once("node `")?;
    let (node_id, _) = tail.split_once('`')?;
    (!node_id.trim().is_empty()).then_some(node_id)
}

/// `refresh_stale_running_detail` (spec §3.2), run by every changing update.
///
/// For a `running` run whose detail names a node that has since completed: point the detail at
/// the first pending node (stored order) that is neither completed nor blocked and has attempts,
/// or say the named node completed.
pub fn refresh_stale_running_detail(run: &mut AutomationV2RunRecord) {
    if run.status != AutomationRunStatus::Running {
        return;
    }
    let Some(stale) = run
        .detail
        .as_deref()
        .and_then(detail_node_id)
        .map(str::to_owned)
    else {
        return;
    };
    let cp = &run.checkpoint;
    if !cp.is_completed(&stale) {
        return;
    }
    let active = cp.pending_nodes.iter().find_map(|id| {
        if cp.is_completed(id) || cp.is_blocked(id) {
            return None;
        }
        let attempt = cp.attempts(id);
        (attempt > 0).then(|| (id.clone(), attempt))
    });
    run.detail = Some(match active {
        Some((id, attempt)) => format!("running node `{id}` attempt {attempt}"),
        None => format!("completed node `{stale}`; continuing"),
    });
}

// ---------------------------------------------------------------------------------------------
// §3.7 stale reaper
// ---------------------------------------------------------------------------------------------

/// The latest `node_started` of a node still waiting for a settling record: its `attempt` and
/// `lease_epoch` metadata (`None` when the record lacks them: records written before the fleet,
/// or by hand).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsettledStart {
    pub attempt: Option<u32>,
    pub lease_epoch: Option<i64>,
}

/// Every node whose latest `node_started` lifecycle record is not followed by one of
/// [`NODE_SETTLED_EVENTS`], keyed by node id (`metadata.node_id`, trimmed).
pub fn unsettled_node_starts(run: &AutomationV2RunRecord) -> BTreeMap<String, UnsettledStart> {
    let mut open = BTreeMap::new();
    for record in &run.checkpoint.lifecycle_history {
        let Some(meta) = record.metadata.as_ref() else {
            continue;
        };
        let Some(node_id) = meta
            .get("node_id")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|id| !id.is_empty())
        else {
            continue;
        };
        if record.event == NODE_STARTED {
            let start = UnsettledStart {
                attempt: meta
                    .get("attempt")
                    .and_then(Value::as_u64)
                    .and_then(|a| u32::try_from(a).ok()),
                lease_epoch: meta.get("lease_epoch").and_then(Value::as_i64),
            };
            open.insert(node_id.to_owned(), start);
        } else if NODE_SETTLED_EVENTS.contains(&record.event.as_str()) {
            open.remove(node_id);
        }
    }
    open
}

/// Nodes with a `node_started` lifecycle record not followed by one of [`NODE_SETTLED_EVENTS`]
/// (upstream `automation_in_progress_node_ids`). Sorted.
pub fn in_progress_node_ids(run: &AutomationV2RunRecord) -> Vec<String> {
    unsettled_node_starts(run).into_keys().collect()
}

/// A node's timeout for the stale threshold: `timeout_ms` when positive, else
/// [`DEFAULT_NODE_TIMEOUT_MS`].
///
/// Simplification: upstream's default depends on the node's validator and objective (120 s,
/// 180 s, an env-configured execute budget, or 600 s). We use one default, the largest of
/// those, so a node without an explicit timeout is never reaped earlier than upstream would.
pub fn effective_node_timeout_ms(node: &AutomationFlowNode) -> u64 {
    node.timeout_ms
        .filter(|ms| *ms > 0)
        .unwrap_or(DEFAULT_NODE_TIMEOUT_MS)
}

/// The effective stale threshold (spec §3.7): `max(base, longest in-progress node timeout +
/// AUTOMATION_STALE_NODE_TIMEOUT_GRACE_MS)`. As upstream, without in-progress nodes the second
/// term is the grace alone, and without a definition the base is used as-is.
pub fn effective_stale_after_ms(
    run: &AutomationV2RunRecord,
    automation: Option<&AutomationV2Spec>,
    base_stale_after_ms: u64,
) -> u64 {
    let Some(automation) = automation else {
        return base_stale_after_ms;
    };
    let longest = in_progress_node_ids(run)
        .iter()
        .filter_map(|id| automation.node(id))
        .map(effective_node_timeout_ms)
        .max()
        .unwrap_or(0);
    base_stale_after_ms.max(longest.saturating_add(AUTOMATION_STALE_NODE_TIMEOUT_GRACE_MS))
}

/// Activity recorded on the row itself (upstream `automation_last_activity_at_ms`): the latest
/// lifecycle record, else `started_at_ms`, else `created_at_ms`.
pub fn row_last_activity_at_ms(run: &AutomationV2RunRecord) -> Millis {
    run.checkpoint
        .lifecycle_history
        .iter()
        .map(|r| r.recorded_at_ms)
        .max()
        .or(run.started_at_ms)
        .unwrap_or(run.created_at_ms)
}

/// What the reaper did to one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleReap {
    /// `failed` (some stalled node exhausted its attempts) rather than `paused`.
    pub terminal: bool,
    /// The effective threshold, as written in the detail, audit and event.
    pub stale_after_ms: u64,
    /// Every in-progress node (audit/event `stale_node_ids`).
    pub stale_node_ids: Vec<String>,
    /// In-progress nodes that had no output and received the stalled-error output.
    pub annotated_node_ids: Vec<String>,
    /// Annotated nodes whose attempts are exhausted.
    pub terminal_stale_node_ids: Vec<String>,
    /// Sessions and agent-team instances the run held before the handles were cleared; the
    /// sweeper cancels them across replicas (`tandem.control.cancel.<run_id>`).
    pub session_ids: Vec<String>,
    pub instance_ids: Vec<String>,
}

/// Outcome of [`reap_stale_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReapOutcome {
    NotRunning(AutomationRunStatus),
    NotStale { idle_ms: u64, stale_after_ms: u64 },
    Reaped(StaleReap),
}

fn output_validator_kind(node: &AutomationFlowNode) -> &'static str {
    let validator = node
        .metadata_at("/builder/output_contract/validator")
        .or_else(|| {
            node.extra
                .get("output_contract")
                .and_then(|c| c.get("validator"))
        })
        .and_then(Value::as_str)
        .unwrap_or_default();
    match validator {
        "code_patch" => "code_patch",
        "research_brief" => "research_brief",
        "review_decision" => "review_decision",
        "structured_json" => "structured_json",
        "standup_update" => "standup_update",
        _ => "generic_artifact",
    }
}

/// The error output the reaper writes for a stalled node (upstream
/// `build_node_execution_error_output_with_category` with category
/// `stale_no_provider_activity`): `needs_repair` / `execution_failed`, or `failed` /
/// `run_failed` when terminal.
pub fn stale_node_output(node: &AutomationFlowNode, detail: &str, terminal: bool) -> Value {
    let reason = match detail.trim() {
        "" => "node execution failed before producing a final response".to_owned(),
        trimmed => trimmed.to_owned(),
    };
    let status = if terminal { "failed" } else { "needs_repair" };
    let summary = if terminal {
        format!(
            "Node `{}` failed before producing a final response.",
            node.node_id
        )
    } else {
        format!(
            "Node `{}` failed before producing a final response and will be retried.",
            node.node_id
        )
    };
    let next_actions: Vec<&str> = if terminal {
        Vec::new()
    } else {
        vec![
            "Retry the same node execution after provider activity/heartbeat recovers.",
            "Treat this as a stale provider/session heartbeat failure, not as a valid completed handoff.",
        ]
    };
    json!({
        "status": status,
        "summary": summary,
        "blocked_reason": reason,
        "failure_kind": if terminal { "run_failed" } else { "execution_failed" },
        "blocker_category": STALE_NO_PROVIDER_ACTIVITY,
        "validator_summary": {
            "kind": output_validator_kind(node),
            "outcome": status,
            "reason": reason,
            "unmet_requirements": [],
            "warning_count": 0,
        },
        "artifact_validation": {
            "blocking_classification": STALE_NO_PROVIDER_ACTIVITY,
            "required_next_tool_actions": next_actions,
            "unmet_requirements": [],
        },
    })
}

/// Properties of `automation_v2.run.failed` (upstream `publish_automation_v2_failure_event`),
/// for a `failed` or `blocked` run; `None` otherwise.
///
/// The failing node is `last_failure.node_id`, else the first blocked node. Fields that upstream
/// derives from executor internals (workspace file checks, recent attempt evidence) are reduced
/// to what the run row holds.
pub fn run_failed_event_properties(
    run: &AutomationV2RunRecord,
    automation: Option<&AutomationV2Spec>,
) -> Option<Value> {
    if !matches!(
        run.status,
        AutomationRunStatus::Failed | AutomationRunStatus::Blocked
    ) {
        return None;
    }
    let cp = &run.checkpoint;
    let failure = cp.last_failure.as_ref();
    let node_id = failure
        .map(|f| f.node_id.as_str())
        .or_else(|| cp.blocked_nodes.first().map(String::as_str));
    let node = node_id.and_then(|id| automation.and_then(|a| a.node(id)));
    let output = node_id.and_then(|id| cp.node_outputs.get(id));
    let out_str = |key: &str| output.and_then(|o| o.get(key)).and_then(Value::as_str);
    let reason = failure
        .map(|f| f.reason.clone())
        .or_else(|| run.detail.clone())
        .or_else(|| {
            out_str("blocked_reason")
                .or_else(|| out_str("summary"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("automation run ended with status {:?}", run.status));
    let attempts = node_id.map(|id| cp.attempts(id)).unwrap_or(0);
    let max_attempts = node.map(node_max_attempts).unwrap_or(1);
    let validation_errors = output
        .and_then(|o| {
            o.pointer("/validator_summary/unmet_requirements")
                .or_else(|| o.pointer("/artifact_validation/unmet_requirements"))
        })
        .cloned()
        .unwrap_or_else(|| json!([]));
    let has_validation_errors = validation_errors.as_array().is_some_and(|a| !a.is_empty());
    let error_kind = if out_str("failure_kind") == Some("verification_failed")
        || out_str("status") == Some("verify_failed")
        || has_validation_errors
    {
        "validation_error"
    } else if run.status == AutomationRunStatus::Blocked {
        "missing_config"
    } else {
        "unknown"
    };
    let artifact_refs = output
        .and_then(|o| o.get("artifact_refs").cloned())
        .or_else(|| {
            output
                .and_then(|o| o.get("output_path").cloned())
                .map(|p| json!([p]))
        })
        .unwrap_or_else(|| json!([]));
    let next_actions = output
        .and_then(|o| o.pointer("/artifact_validation/required_next_tool_actions"))
        .cloned()
        .unwrap_or_else(|| json!([]));
    let verdicts: Vec<Value> = node_id
        .and_then(|id| cp.node_attempt_verdicts.get(id))
        .cloned()
        .unwrap_or_default();
    let reviews: Vec<Value> = verdicts
        .iter()
        .filter_map(|v| {
            let review = v.get("attempt_review")?;
            Some(json!({
                "attempt": v.get("attempt").cloned().unwrap_or(Value::Null),
                "node_id": v.get("node_id").cloned().unwrap_or(Value::Null),
                "failure_class": v.get("failure_class").cloned().unwrap_or(Value::Null),
                "attempt_review": review,
            }))
        })
        .collect();
    let output_contract = node
        .and_then(|n| n.extra.get("output_contract").cloned())
        .unwrap_or(Value::Null);
    Some(json!({
        "automation_id": run.automation_id,
        "automationID": run.automation_id,
        "workflow_id": run.automation_id,
        "workflowID": run.automation_id,
        "workflow_name": automation.map(|a| a.name.as_str()),
        "run_id": run.run_id,
        "runID": run.run_id,
        "session_id": run.latest_session_id,
        "sessionID": run.latest_session_id,
        "task_id": node_id,
        "taskID": node_id,
        "stage_id": node_id,
        "stage_name": node.map(|n| n.objective.as_str()),
        "node_id": node_id,
        "agent_id": node.map(|n| n.agent_id.as_str()),
        "agent_role": node.map(|n| n.agent_id.as_str()),
        "component": "automation_v2",
        "effective_execution_profile": run.effective_execution_profile.as_str(),
        "requested_execution_profile": run.requested_execution_profile.map(|p| p.as_str()),
        "attempt": attempts,
        "max_attempts": max_attempts,
        "retry_exhausted": attempts >= max_attempts,
        "status": if run.status == AutomationRunStatus::Blocked { "blocked" } else { "failed" },
        "reason": reason,
        "error": failure.map(|f| f.reason.as_str()).or(run.detail.as_deref()),
        "error_kind": error_kind,
        "expected_output": output_contract,
        "actual_output": out_str("summary"),
        "artifact_refs": artifact_refs,
        "missing_workspace_files": [],
        "required_next_tool_actions": next_actions,
        "input_refs": node.and_then(|n| n.extra.get("input_refs").cloned()).unwrap_or(Value::Null),
        "output_contract": output_contract,
        "validation_errors": validation_errors,
        "attempt_verdict_chain": verdicts,
        "attempt_review_chain": reviews,
        "suggested_next_action": "Inspect the failing automation node output, fix the validation/config/tool failure, then rerun the automation.",
        "tenantContext": run.tenant_context.to_value(),
    }))
}

/// `reap_stale_running_automation_runs` for one locked row (spec §3.7).
///
/// * `automation`: the live definition. Node lookups use the run's snapshot first, as upstream's
///   reaper does; the live definition only stands in for a missing snapshot.
/// * `last_activity_ms`: the run's activity column, fed by worker progress and results. The
///   reaper never reads in-process heartbeats (spec §5 item 7); the row's own lifecycle
///   activity ([`row_last_activity_at_ms`]) is also taken into account, as upstream does.
/// * `stale_after_ms`: the base threshold (`STALE_RUNNING_AUTOMATION_RUN_MS`); the effective
///   threshold is [`effective_stale_after_ms`].
///
/// A stale run: every in-progress node without an output gets the stalled-error output
/// ([`stale_node_output`]); a node is terminal when its attempts (a missing count is 1, §7.30)
/// reach `node_max_attempts`. Any terminal node fails the run, otherwise it pauses with
/// `pause_reason` `stale_no_provider_activity`. Both set stop kind `stale_reaped`,
/// `stop_reason` = detail, clear the session and instance handles, and record
/// `run_failed_stale_no_provider_activity` / `run_paused_stale_no_provider_activity`.
/// Effects: `automation_v2.run.failed` when terminal, the `failed_stale_run` /
/// `paused_stale_run` audit, and the stale engine event.
///
/// Not done here: upstream's `refresh_automation_runtime_state` (blocked-node and phase
/// recomputation) belongs to the scheduler's planning step and runs when the run is next planned.
pub fn reap_stale_run(
    run: &mut AutomationV2RunRecord,
    automation: Option<&AutomationV2Spec>,
    last_activity_ms: Millis,
    stale_after_ms: u64,
    now: Millis,
) -> Transition<ReapOutcome> {
    if run.status != AutomationRunStatus::Running {
        return Transition::unchanged(ReapOutcome::NotRunning(run.status));
    }
    let definition = claim_automation(run, automation).cloned();
    let threshold = effective_stale_after_ms(run, definition.as_ref(), stale_after_ms);
    let idle_ms = now.saturating_sub(last_activity_ms.max(row_last_activity_at_ms(run)));
    if idle_ms < threshold {
        return Transition::unchanged(ReapOutcome::NotStale {
            idle_ms,
            stale_after_ms: threshold,
        });
    }

    let stale_node_ids = in_progress_node_ids(run);
    let session_ids = run.active_session_ids.clone();
    let instance_ids = run.active_instance_ids.clone();
    let secs = threshold / 1000;
    let node_detail =
        format!("node execution stalled after no provider activity for at least {secs}s");
    let paused_detail =
        format!("automation run paused after no provider activity for at least {secs}s");

    let mut tr = update(run, now, |row, fx| {
        let mut annotated = Vec::new();
        let mut terminal_nodes = Vec::new();
        if let Some(def) = definition.as_ref() {
            for id in &stale_node_ids {
                if row.checkpoint.node_outputs.contains_key(id) {
                    continue;
                }
                let Some(node) = def.node(id) else {
                    continue;
                };
                // §7.30: a node that has a node_started record ran at least once.
                let attempts = row.checkpoint.node_attempts.get(id).copied().unwrap_or(1);
                let terminal = attempts >= node_max_attempts(node);
                if terminal {
                    terminal_nodes.push(id.clone());
                }
                row.checkpoint
                    .node_outputs
                    .insert(id.clone(), stale_node_output(node, &node_detail, terminal));
                if row.checkpoint.last_failure.is_none() {
                    row.checkpoint.last_failure = Some(AutomationFailureRecord {
                        node_id: id.clone(),
                        reason: node_detail.clone(),
                        failed_at_ms: now,
                    });
                }
                annotated.push(id.clone());
            }
        }
        let terminal = !terminal_nodes.is_empty();
        let detail = if terminal {
            format!(
                "automation run failed after no provider activity for at least {secs}s; terminal stale node(s): {}",
                terminal_nodes.join(", ")
            )
        } else if annotated.is_empty() {
            paused_detail.clone()
        } else {
            format!(
                "{paused_detail}; repairable node(s): {}",
                annotated.join(", ")
            )
        };
        if terminal {
            row.status = AutomationRunStatus::Failed;
            row.pause_reason = None;
        } else {
            row.status = AutomationRunStatus::Paused;
            row.pause_reason = Some(STALE_NO_PROVIDER_ACTIVITY.into());
        }
        row.detail = Some(detail.clone());
        row.stop_kind = Some(AutomationStopKind::StaleReaped);
        row.stop_reason = Some(detail.clone());
        row.clear_execution_handles();
        fx.lifecycle(
            row,
            if terminal {
                LIFECYCLE_RUN_FAILED_STALE
            } else {
                LIFECYCLE_RUN_PAUSED_STALE
            },
            Some(detail),
            Some(AutomationStopKind::StaleReaped),
            None,
            now,
        );
        StaleReap {
            terminal,
            stale_after_ms: threshold,
            stale_node_ids: stale_node_ids.clone(),
            annotated_node_ids: annotated,
            terminal_stale_node_ids: terminal_nodes,
            session_ids,
            instance_ids,
        }
    });

    let reap = &tr.outcome;
    let detail = run.detail.clone().unwrap_or_else(|| paused_detail.clone());
    if reap.terminal
        && let Some(props) = run_failed_event_properties(run, definition.as_ref())
    {
        let node_id = run
            .checkpoint
            .last_failure
            .as_ref()
            .map(|f| f.node_id.clone());
        tr.effects
            .event(run, EVENT_RUN_FAILED, node_id.as_deref(), props, None);
    }
    let (audit_type, outcome, event_type) = if reap.terminal {
        (AUDIT_FAILED_STALE_RUN, "failed", EVENT_RUN_FAILED_STALE)
    } else {
        (AUDIT_PAUSED_STALE_RUN, "paused", EVENT_RUN_PAUSED_STALE)
    };
    tr.effects.internal_sweep_audit(
        run,
        audit_type,
        REAP_SWEEP,
        outcome,
        Some(&detail),
        json!({
            "stale_node_ids": reap.stale_node_ids,
            "terminal_stale_node_ids": reap.terminal_stale_node_ids,
            "stale_after_ms": threshold,
        }),
    );
    let properties = json!({
        "automation_id": run.automation_id,
        "automationID": run.automation_id,
        "workflow_id": run.automation_id,
        "workflowID": run.automation_id,
        "workflow_name": definition.as_ref().map(|a| a.name.clone()),
        "run_id": run.run_id,
        "runID": run.run_id,
        "source": "automation_v2",
        "component": "automation_v2",
        "status": outcome,
        "pause_reason": run.pause_reason,
        "reason": detail,
        "detail": detail,
        "stale_node_ids": reap.stale_node_ids,
        "terminal_stale_node_ids": reap.terminal_stale_node_ids,
        "stale_after_ms": threshold,
        "tenantContext": run.tenant_context.to_value(),
    });
    tr.effects.event(run, event_type, None, properties, None);
    Transition {
        outcome: ReapOutcome::Reaped(tr.outcome),
        changed: tr.changed,
        effects: tr.effects,
    }
}

// ---------------------------------------------------------------------------------------------
// §3.8 / §3.9 auto-resume
// ---------------------------------------------------------------------------------------------

/// `recorded_at_ms` of the latest lifecycle record that is `run_paused_stale_no_provider_activity`
/// or carries stop kind `stale_reaped` (spec §3.8 step 4.1).
pub fn stale_reaped_at_ms(run: &AutomationV2RunRecord) -> Option<Millis> {
    run.checkpoint
        .lifecycle_history
        .iter()
        .rev()
        .find(|r| {
            r.event == LIFECYCLE_RUN_PAUSED_STALE
                || r.stop_kind == Some(AutomationStopKind::StaleReaped)
        })
        .map(|r| r.recorded_at_ms)
}

/// `now − stale_reaped_at ≤ window`, inclusive, saturating (spec §3.8 step 4.2).
pub fn within_auto_resume_window(now: Millis, stale_reaped_at_ms: Millis, window_ms: u64) -> bool {
    now.saturating_sub(stale_reaped_at_ms) <= window_ms
}

/// `count >= cap` (spec §3.8 step 4.3, case 3).
pub fn auto_resume_cap_reached(count: u32, cap: u32) -> bool {
    count >= cap
}

/// The number of stale auto-resumes in the run's history: `run_auto_resumed` records with
/// reason `auto_resume_after_stale_reap`.
///
/// Decision (§7.7): upstream counts every `run_auto_resumed` record, so guardrail resumes
/// (a human approving a quota override) consumed the stale budget. We count stale resumes only,
/// over the run's whole life: `TANDEM_STALE_AUTO_RESUME_MAX_ATTEMPTS` keeps its documented
/// meaning, a lifetime bound on automatic recoveries from provider stalls, so a run that stalls
/// repeatedly cannot loop; more recoveries need an operator. Per-node retries are bounded
/// separately by `node_max_attempts` (a resume requires a node with attempts left).
pub fn stale_auto_resume_count(run: &AutomationV2RunRecord) -> u32 {
    let n = run
        .checkpoint
        .lifecycle_history
        .iter()
        .filter(|r| {
            r.event == LIFECYCLE_RUN_AUTO_RESUMED
                && r.reason.as_deref() == Some(AUTO_RESUME_AFTER_STALE_REAP)
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Attempts a node has used, for nodes known to have run (a `node_started` record or an error
/// output): a missing count is 1 (§7.30, upstream's auto-resume assumed 0). With one rule the
/// reaper's "terminal" and auto-resume's "repairable" are exact complements.
fn attempts_used(run: &AutomationV2RunRecord, node_id: &str) -> u32 {
    run.checkpoint
        .node_attempts
        .get(node_id)
        .copied()
        .unwrap_or(1)
}

/// Flow nodes a stale auto-resume can repair (spec §3.8 step 4.5): not completed, output status
/// `needs_repair` (case-insensitive), attempts left. In flow order.
pub fn repairable_node_ids(
    run: &AutomationV2RunRecord,
    automation: &AutomationV2Spec,
) -> Vec<String> {
    automation
        .flow
        .nodes
        .iter()
        .filter(|node| {
            !run.checkpoint.is_completed(&node.node_id)
                && run.checkpoint.output_status(&node.node_id).as_deref() == Some("needs_repair")
                && attempts_used(run, &node.node_id) < node_max_attempts(node)
        })
        .map(|node| node.node_id.clone())
        .collect()
}

/// The latest lifecycle record with stop kind `guardrail_stopped`: what put the run in its
/// current guardrail stop.
pub fn guardrail_stop_cause(run: &AutomationV2RunRecord) -> Option<&AutomationLifecycleRecord> {
    run.checkpoint
        .lifecycle_history
        .iter()
        .rev()
        .find(|r| r.stop_kind == Some(AutomationStopKind::GuardrailStopped))
}

/// Whether the automation is paused now: the live definition's status, else the snapshot's.
fn automation_is_paused(run: &AutomationV2RunRecord, live: Option<&AutomationV2Spec>) -> bool {
    live.or(run.automation_snapshot.as_deref())
        .is_some_and(|a| a.status == AutomationStatus::Paused)
}

/// Outcome of the auto-resume transitions. Every variant but `Resumed` is a no-op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoResumeOutcome {
    /// `paused → queued`.
    Resumed,
    /// `TANDEM_DISABLE_STALE_AUTO_RESUME` is set (stale path only).
    Disabled,
    /// The locked row is no longer a candidate (cancelled, resumed, re-paused for another
    /// reason meanwhile): R1 / §7.9.
    NotCandidate {
        status: AutomationRunStatus,
        stop_kind: Option<AutomationStopKind>,
    },
    /// No reap record in the lifecycle history.
    NoStaleReapRecord,
    OutsideWindow {
        stale_reaped_at_ms: Millis,
    },
    CapReached {
        count: u32,
        cap: u32,
    },
    /// Neither a snapshot nor a live definition.
    NoAutomation,
    /// The automation is paused; its runs must not restart on their own.
    AutomationPaused,
    NoRepairableNode,
    /// An agent is still spend-paused without its own override: a claim would hold the run
    /// again, so resuming would flap.
    LaunchStillHeld,
    /// The guardrail stop was not caused by a spend pause, so an override cannot lift it.
    CauseNotLiftableByOverride {
        cause: Option<String>,
    },
    NoAgents,
    NoQuotaOverride,
}

impl AutoResumeOutcome {
    pub fn resumed(&self) -> bool {
        matches!(self, Self::Resumed)
    }
}

/// `auto_resume_stale_reaped_runs` for one locked row (spec §3.8).
///
/// Order of checks: kill switch; status `paused` and stop kind `stale_reaped` on this row (R1
/// fix: a run cancelled, resumed or re-paused meanwhile is never resurrected); latest reap
/// within the window (inclusive); stale-resume count below the cap (§7.7); a definition
/// (snapshot first, as the claim); automation not paused; a repairable node; launch not held
/// by a spend pause (left to the guardrail path). Then: `queued`, `pause_reason`, `detail`,
/// `stop_kind`, `stop_reason` cleared, lifecycle `run_auto_resumed` (reason
/// `auto_resume_after_stale_reap`, metadata `{auto_resume_window_ms, stale_reaped_at_ms}`), audit
/// `auto_resumed_stale_reaped_run`. Node outputs and attempts are kept for the repair.
///
/// §7.6: `settings.stale_auto_resume_disabled` stops only this path; the guardrail path
/// ([`auto_resume_guardrail_stopped`]) does not take the setting.
pub fn auto_resume_stale_reaped(
    run: &mut AutomationV2RunRecord,
    automation: Option<&AutomationV2Spec>,
    governance: &GovernanceSnapshot,
    settings: &StaleSettings,
    now: Millis,
) -> Transition<AutoResumeOutcome> {
    use AutoResumeOutcome as O;
    if settings.stale_auto_resume_disabled {
        return Transition::unchanged(O::Disabled);
    }
    if run.status != AutomationRunStatus::Paused
        || run.stop_kind != Some(AutomationStopKind::StaleReaped)
    {
        return Transition::unchanged(O::NotCandidate {
            status: run.status,
            stop_kind: run.stop_kind,
        });
    }
    let Some(reaped_at) = stale_reaped_at_ms(run) else {
        return Transition::unchanged(O::NoStaleReapRecord);
    };
    let window = settings.auto_resume_window_ms;
    if !within_auto_resume_window(now, reaped_at, window) {
        return Transition::unchanged(O::OutsideWindow {
            stale_reaped_at_ms: reaped_at,
        });
    }
    let count = stale_auto_resume_count(run);
    let cap = settings.auto_resume_max_attempts;
    if auto_resume_cap_reached(count, cap) {
        return Transition::unchanged(O::CapReached { count, cap });
    }
    let Some(definition) = claim_automation(run, automation) else {
        return Transition::unchanged(O::NoAutomation);
    };
    if automation_is_paused(run, automation) {
        return Transition::unchanged(O::AutomationPaused);
    }
    if repairable_node_ids(run, definition).is_empty() {
        return Transition::unchanged(O::NoRepairableNode);
    }
    if governance.launch_blocked_by_spend_pause(definition, now) {
        return Transition::unchanged(O::LaunchStillHeld);
    }

    let mut tr = update(run, now, |row, fx| {
        resume_to_queued(row);
        fx.lifecycle(
            row,
            LIFECYCLE_RUN_AUTO_RESUMED,
            Some(AUTO_RESUME_AFTER_STALE_REAP.into()),
            None,
            Some(json!({
                "auto_resume_window_ms": window,
                "stale_reaped_at_ms": reaped_at,
            })),
            now,
        );
        O::Resumed
    });
    tr.effects.internal_sweep_audit(
        run,
        AUDIT_AUTO_RESUMED_STALE,
        STALE_AUTO_RESUME_SWEEP,
        "queued",
        Some(AUTO_RESUME_AFTER_STALE_REAP),
        json!({
            "auto_resume_window_ms": window,
            "auto_resume_count_before": count,
            "auto_resume_max_attempts": cap,
            "stale_reaped_at_ms": reaped_at,
        }),
    );
    tr
}

fn resume_to_queued(row: &mut AutomationV2RunRecord) {
    row.status = AutomationRunStatus::Queued;
    row.pause_reason = None;
    row.detail = None;
    row.stop_kind = None;
    row.stop_reason = None;
}

/// `auto_resume_guardrail_stopped_runs` for one locked row (spec §3.9), with the §7.8 fixes.
///
/// Resumes a `paused` + `guardrail_stopped` run (re-checked on this row, R1) only when:
/// * a definition exists (snapshot first, exactly as the claim resolves it) and the automation
///   is not paused;
/// * the stop was caused by a spend pause, i.e. the latest `guardrail_stopped` lifecycle record
///   is one of [`OVERRIDE_LIFTABLE_GUARDRAIL_EVENTS`]; budget guardrails, dependency revocation
///   and health expiry are never auto-resumed (an override cannot lift them, so upstream flapped);
/// * the launch would no longer be held: the claim's own predicate
///   ([`GovernanceSnapshot::launch_blocked_by_spend_pause`]) is false; and
/// * at least one agent has an approved, unexpired override (the event this sweep reacts to).
///
/// Because the resume condition implies the claim's hold condition is false at the same `now`
/// and governance state, a resumed run is never held again by the next claim: no
/// held → resumed → held flapping. Tenant scoping follows the claim (the automation's tenant).
/// Writes: `queued`, reasons cleared, lifecycle `run_auto_resumed` (reason
/// `auto_resume_after_guardrail_override`, metadata `{agent_ids, stop_kind:
/// "guardrail_stopped"}`), audit `auto_resumed_guardrail_stopped_run`.
pub fn auto_resume_guardrail_stopped(
    run: &mut AutomationV2RunRecord,
    automation: Option<&AutomationV2Spec>,
    governance: &GovernanceSnapshot,
    now: Millis,
) -> Transition<AutoResumeOutcome> {
    use AutoResumeOutcome as O;
    if run.status != AutomationRunStatus::Paused
        || run.stop_kind != Some(AutomationStopKind::GuardrailStopped)
    {
        return Transition::unchanged(O::NotCandidate {
            status: run.status,
            stop_kind: run.stop_kind,
        });
    }
    let Some(definition) = claim_automation(run, automation) else {
        return Transition::unchanged(O::NoAutomation);
    };
    if automation_is_paused(run, automation) {
        return Transition::unchanged(O::AutomationPaused);
    }
    let cause = guardrail_stop_cause(run).map(|r| r.event.clone());
    if !cause
        .as_deref()
        .is_some_and(|c| OVERRIDE_LIFTABLE_GUARDRAIL_EVENTS.contains(&c))
    {
        return Transition::unchanged(O::CauseNotLiftableByOverride { cause });
    }
    let agents = agent_set(definition);
    if agents.is_empty() {
        return Transition::unchanged(O::NoAgents);
    }
    if governance.launch_blocked_by_spend_pause(definition, now) {
        return Transition::unchanged(O::LaunchStillHeld);
    }
    let tenant = definition.tenant_context();
    if !agents
        .iter()
        .any(|a| governance.has_quota_override(&tenant, a, now))
    {
        return Transition::unchanged(O::NoQuotaOverride);
    }

    let metadata = json!({
        "agent_ids": agents.iter().collect::<Vec<_>>(),
        "stop_kind": AutomationStopKind::GuardrailStopped.as_str(),
    });
    let mut tr = update(run, now, |row, fx| {
        resume_to_queued(row);
        fx.lifecycle(
            row,
            LIFECYCLE_RUN_AUTO_RESUMED,
            Some(AUTO_RESUME_AFTER_GUARDRAIL_OVERRIDE.into()),
            None,
            Some(metadata.clone()),
            now,
        );
        O::Resumed
    });
    tr.effects.internal_sweep_audit(
        run,
        AUDIT_AUTO_RESUMED_GUARDRAIL,
        GUARDRAIL_AUTO_RESUME_SWEEP,
        "queued",
        Some(AUTO_RESUME_AFTER_GUARDRAIL_OVERRIDE),
        metadata,
    );
    tr
}

// ---------------------------------------------------------------------------------------------
// §3.12 shutdown, §3.6 restart recovery
// ---------------------------------------------------------------------------------------------

/// Fails a `running` run with `detail` = `stop_reason` = `detail`, the given stop kind and
/// lifecycle event, and an internal-sweep audit with metadata `{previous_status: "running"}`.
fn fail_running(
    run: &mut AutomationV2RunRecord,
    now: Millis,
    detail: &str,
    stop_kind: AutomationStopKind,
    lifecycle_event: &str,
    audit_type: &str,
    sweep: &str,
) -> Transition<bool> {
    if run.status != AutomationRunStatus::Running {
        return Transition::unchanged(false);
    }
    let mut tr = update(run, now, |row, fx| {
        row.status = AutomationRunStatus::Failed;
        row.detail = Some(detail.into());
        row.stop_kind = Some(stop_kind);
        row.stop_reason = Some(detail.into());
        fx.lifecycle(
            row,
            lifecycle_event,
            Some(detail.into()),
            Some(stop_kind),
            None,
            now,
        );
        true
    });
    tr.effects.internal_sweep_audit(
        run,
        audit_type,
        sweep,
        "failed_running_run",
        Some(detail),
        json!({ "previous_status": "running" }),
    );
    tr
}

/// `fail_running_automation_runs_for_shutdown` for one row (spec §3.12): a `running` run fails
/// with `automation run stopped during server shutdown`, stop kind `shutdown`, lifecycle
/// `run_failed_shutdown`, audit `shutdown_failed_run`. Other statuses, `pausing` included, are
/// left alone (upstream; stuck `pausing` runs are settled by [`settle_pausing`]).
///
/// In the fleet this is the explicit full-fleet-stop operator action, never a replica's SIGTERM.
/// Outcome: whether the run was failed.
pub fn fail_running_for_shutdown(run: &mut AutomationV2RunRecord, now: Millis) -> Transition<bool> {
    fail_running(
        run,
        now,
        SHUTDOWN_DETAIL,
        AutomationStopKind::Shutdown,
        LIFECYCLE_RUN_FAILED_SHUTDOWN,
        AUDIT_SHUTDOWN_FAILED_RUN,
        SHUTDOWN_SWEEP,
    )
}

/// `recover_in_flight_runs`, `running` branch (spec §3.6): fails the run with `automation run
/// interrupted by server restart`, stop kind `server_restart`, lifecycle
/// `run_failed_server_restart`, audit `server_restart_failed_run`. Node outputs, attempts,
/// pending nodes and `last_failure` are left as they are (case 27).
///
/// In the fleet this runs only for runs whose owner is gone. Outcome: whether the run failed.
pub fn fail_running_for_server_restart(
    run: &mut AutomationV2RunRecord,
    now: Millis,
) -> Transition<bool> {
    fail_running(
        run,
        now,
        SERVER_RESTART_DETAIL,
        AutomationStopKind::ServerRestart,
        LIFECYCLE_RUN_FAILED_SERVER_RESTART,
        AUDIT_SERVER_RESTART_FAILED_RUN,
        RECOVER_SWEEP,
    )
}

/// `recover_in_flight_runs`, `pausing` branch (spec §3.6): settles the run to `paused` (freeing
/// the workspace lock), sets `pause_reason` to `automation run settled to paused after server
/// restart` if unset, records `run_pausing_settled_on_restart` (no stop kind) and the audit
/// `server_restart_settled_pausing_run`. Stop kind is left unchanged.
///
/// In the fleet this runs for `pausing` runs whose owner is gone. Outcome: whether it settled.
pub fn settle_pausing(run: &mut AutomationV2RunRecord, now: Millis) -> Transition<bool> {
    if run.status != AutomationRunStatus::Pausing {
        return Transition::unchanged(false);
    }
    let mut tr = update(run, now, |row, fx| {
        row.status = AutomationRunStatus::Paused;
        if row.pause_reason.is_none() {
            row.pause_reason = Some(PAUSING_SETTLED_DETAIL.into());
        }
        fx.lifecycle(
            row,
            LIFECYCLE_RUN_PAUSING_SETTLED,
            Some(PAUSING_SETTLED_DETAIL.into()),
            None,
            None,
            now,
        );
        true
    });
    tr.effects.internal_sweep_audit(
        run,
        AUDIT_SERVER_RESTART_SETTLED_PAUSING,
        RECOVER_SWEEP,
        "settled_pausing_run",
        Some(PAUSING_SETTLED_DETAIL),
        json!({ "previous_status": "pausing" }),
    );
    tr
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claim::{ClaimOutcome, claim_run};
    use crate::effects::lifecycle_record;
    use crate::governance::QuotaOverride;
    use crate::model::{AutomationAgentProfile, ExecutionProfile, TenantContext};
    use proptest::prelude::*;

    const NOW: Millis = 50_000_000;
    const MIN: u64 = 60_000;

    fn tenant() -> TenantContext {
        TenantContext::explicit("org-stale", "ws-stale")
    }

    fn spec_with(nodes: Vec<AutomationFlowNode>, agents: &[&str]) -> AutomationV2Spec {
        let mut s = AutomationV2Spec::new("auto-stale", nodes);
        s.metadata = Some(json!({ "tenant_context": tenant() }));
        s.creator_id = String::new();
        s.agents = agents
            .iter()
            .map(|a| AutomationAgentProfile {
                agent_id: (*a).into(),
                extra: Default::default(),
            })
            .collect();
        s
    }

    /// `collect` → `cluster_topics` → `draft`; `cluster_topics` times out after 120 s, which is
    /// upstream's default for that node in cases 13 and 16 (our default is 600 s).
    fn spec() -> AutomationV2Spec {
        let mut cluster = AutomationFlowNode::task("cluster_topics", &["collect"]);
        cluster.timeout_ms = Some(120_000);
        spec_with(
            vec![
                AutomationFlowNode::task("collect", &[]),
                cluster,
                AutomationFlowNode::task("draft", &["cluster_topics"]),
            ],
            &["agent-writer"],
        )
    }

    fn running(spec: &AutomationV2Spec, started_at: Millis) -> AutomationV2RunRecord {
        let mut run = AutomationV2RunRecord::new_queued(
            "automation-v2-run-stale".into(),
            spec,
            "manual",
            ExecutionProfile::Guided,
            started_at.saturating_sub(1_000),
        );
        run.status = AutomationRunStatus::Running;
        run.started_at_ms = Some(started_at);
        run.updated_at_ms = started_at;
        run.active_session_ids = vec!["session-1".into()];
        run.latest_session_id = Some("session-1".into());
        run.active_instance_ids = vec!["instance-1".into()];
        run
    }

    fn node_event(run: &mut AutomationV2RunRecord, event: &str, node: &str, at: Millis) {
        run.checkpoint.lifecycle_history.push(lifecycle_record(
            event,
            Some(format!("node `{node}` {event}")),
            None,
            Some(json!({ "node_id": node, "attempt": 1 })),
            "guided",
            at,
        ));
    }

    /// A run executing `cluster_topics` (attempt `attempt`) since `at`, `collect` completed.
    fn executing(
        spec: &AutomationV2Spec,
        at: Millis,
        attempt: Option<u32>,
    ) -> AutomationV2RunRecord {
        let mut run = running(spec, at);
        run.checkpoint.completed_nodes = vec!["collect".into()];
        run.checkpoint.pending_nodes = vec!["cluster_topics".into(), "draft".into()];
        run.checkpoint
            .node_outputs
            .insert("collect".into(), json!({"status": "completed"}));
        run.checkpoint.node_attempts.insert("collect".into(), 1);
        if let Some(a) = attempt {
            run.checkpoint
                .node_attempts
                .insert("cluster_topics".into(), a);
        }
        node_event(&mut run, "node_started", "cluster_topics", at);
        run.detail = Some("running node `cluster_topics` attempt 1".into());
        run
    }

    /// What the executor does when it re-runs a repaired node: a new attempt starts.
    fn restart_node(run: &mut AutomationV2RunRecord, node: &str, at: Millis) {
        run.status = AutomationRunStatus::Running;
        run.checkpoint.node_outputs.remove(node);
        *run.checkpoint.node_attempts.entry(node.into()).or_insert(0) += 1;
        node_event(run, "node_started", node, at);
    }

    fn settings() -> StaleSettings {
        StaleSettings::default()
    }

    fn reaped(tr: &Transition<ReapOutcome>) -> &StaleReap {
        match &tr.outcome {
            ReapOutcome::Reaped(r) => r,
            other => panic!("expected a reap, got {other:?}"),
        }
    }

    fn paused_gov(agents: &[&str]) -> GovernanceSnapshot {
        let t = tenant();
        let mut g = GovernanceSnapshot::default();
        for a in agents {
            g.spend_paused_agents
                .insert(crate::governance::agent_scope_key(&t, a));
        }
        g
    }

    fn with_override(
        mut g: GovernanceSnapshot,
        agent: &str,
        expires: Millis,
    ) -> GovernanceSnapshot {
        g.quota_overrides.push(QuotaOverride {
            agent_key: crate::governance::agent_scope_key(&tenant(), agent),
            expires_at_ms: expires,
        });
        g
    }

    fn lifecycle_events(run: &AutomationV2RunRecord) -> Vec<&str> {
        run.checkpoint
            .lifecycle_history
            .iter()
            .map(|r| r.event.as_str())
            .collect()
    }

    // ----- cases 1–3: window and cap helpers --------------------------------------------------

    #[test]
    fn case_1_stale_auto_resume_window_allows_fresh_reaped_runs() {
        assert!(within_auto_resume_window(10_000, 9_500, 1_000));
    }

    #[test]
    fn case_2_stale_auto_resume_window_rejects_old_reaped_runs() {
        assert!(!within_auto_resume_window(10_000, 7_000, 1_000));
        assert!(within_auto_resume_window(10_000, 9_000, 1_000), "inclusive");
        assert!(!within_auto_resume_window(10_001, 9_000, 1_000));
        assert!(
            within_auto_resume_window(5_000, 9_000, 1_000),
            "a clock that went backwards saturates to 0"
        );
    }

    #[test]
    fn case_3_stale_auto_resume_count_respects_configured_cap() {
        assert!(!auto_resume_cap_reached(0, 2));
        assert!(!auto_resume_cap_reached(1, 2));
        assert!(auto_resume_cap_reached(2, 2));
        assert!(auto_resume_cap_reached(3, 2));
        assert!(!auto_resume_cap_reached(2, 3));
    }

    // ----- case 4: refresh_stale_running_detail -----------------------------------------------

    fn detail_run(detail: &str) -> AutomationV2RunRecord {
        let s = spec();
        let mut run = running(&s, NOW);
        run.detail = Some(detail.into());
        run.checkpoint.completed_nodes = vec!["collect".into()];
        run.checkpoint.pending_nodes = vec!["draft".into()];
        run.checkpoint.node_attempts = [("draft".to_string(), 1)].into_iter().collect();
        run
    }

    #[test]
    fn case_4_stale_running_detail_moves_to_active_attempt() {
        let mut run = detail_run("retrying node `collect` after transient provider failure");
        refresh_stale_running_detail(&mut run);
        assert_eq!(
            run.detail.as_deref(),
            Some("running node `draft` attempt 1")
        );
    }

    #[test]
    fn case_4_detail_falls_back_to_completed_node_when_nothing_is_active() {
        let mut run = detail_run("retrying node `collect` after transient provider failure");
        run.checkpoint.node_attempts.clear();
        refresh_stale_running_detail(&mut run);
        assert_eq!(
            run.detail.as_deref(),
            Some("completed node `collect`; continuing")
        );
        // Blocked pending nodes are skipped too.
        let mut run = detail_run("retrying node `collect` after transient provider failure");
        run.checkpoint.blocked_nodes = vec!["draft".into()];
        refresh_stale_running_detail(&mut run);
        assert_eq!(
            run.detail.as_deref(),
            Some("completed node `collect`; continuing")
        );
    }

    #[test]
    fn case_4_detail_is_left_alone_when_not_stale_or_not_running() {
        for detail in [
            "running node `draft` attempt 1",
            "no node named here",
            "node `   ` blank",
            "node `unterminated",
        ] {
            let mut run = detail_run(detail);
            refresh_stale_running_detail(&mut run);
            assert_eq!(run.detail.as_deref(), Some(detail));
        }
        let mut run = detail_run("retrying node `collect` after transient provider failure");
        run.status = AutomationRunStatus::Paused;
        refresh_stale_running_detail(&mut run);
        assert_eq!(
            run.detail.as_deref(),
            Some("retrying node `collect` after transient provider failure")
        );
    }

    #[test]
    fn case_4_every_changing_update_refreshes_the_detail() {
        let mut run = detail_run("retrying node `collect` after transient provider failure");
        let tr = update(&mut run, NOW + 1, |row, _| {
            row.total_tokens += 1;
        });
        assert!(tr.changed);
        assert_eq!(
            run.detail.as_deref(),
            Some("running node `draft` attempt 1")
        );
    }

    // ----- stale threshold and in-progress nodes ----------------------------------------------

    #[test]
    fn in_progress_nodes_follow_started_and_settled_events() {
        let s = spec();
        let mut run = running(&s, NOW);
        node_event(&mut run, "node_started", "b", NOW);
        node_event(&mut run, "node_started", "a", NOW);
        node_event(&mut run, "node_started", "c", NOW);
        node_event(&mut run, "node_completed", "c", NOW);
        node_event(&mut run, "workflow_state_changed", "a", NOW);
        run.checkpoint.lifecycle_history.push(lifecycle_record(
            "node_started",
            None,
            None,
            Some(json!({ "node_id": "  " })),
            "guided",
            NOW,
        ));
        assert_eq!(in_progress_node_ids(&run), vec!["a", "b"], "sorted");
        for settled in NODE_SETTLED_EVENTS {
            let mut r = run.clone();
            node_event(&mut r, settled, "a", NOW);
            assert_eq!(in_progress_node_ids(&r), vec!["b"], "{settled}");
        }
        node_event(&mut run, "node_started", "c", NOW);
        assert_eq!(in_progress_node_ids(&run), vec!["a", "b", "c"], "restarted");
    }

    #[test]
    fn effective_threshold_is_longest_in_progress_timeout_plus_grace() {
        let s = spec();
        let run = executing(&s, NOW, Some(1));
        // cluster_topics: 120 s + 60 s grace.
        assert_eq!(effective_stale_after_ms(&run, Some(&s), 120_000), 180_000);
        assert_eq!(effective_stale_after_ms(&run, Some(&s), 600_000), 600_000);
        // A node without timeout uses DEFAULT_NODE_TIMEOUT_MS.
        let mut r = run.clone();
        node_event(&mut r, "node_started", "draft", NOW);
        assert_eq!(effective_stale_after_ms(&r, Some(&s), 120_000), 660_000);
        // timeout_ms 0 means "default".
        let mut s0 = s.clone();
        s0.flow.nodes[1].timeout_ms = Some(0);
        assert_eq!(effective_stale_after_ms(&run, Some(&s0), 0), 660_000);
        // No in-progress node: the grace alone is the floor (upstream); no definition: base.
        let idle = running(&s, NOW);
        assert_eq!(effective_stale_after_ms(&idle, Some(&s), 30_000), 60_000);
        assert_eq!(effective_stale_after_ms(&idle, Some(&s), 120_000), 120_000);
        assert_eq!(effective_stale_after_ms(&run, None, 30_000), 30_000);
    }

    // ----- case 12: pause a stale run ---------------------------------------------------------

    #[test]
    fn case_12_stale_running_run_is_paused_with_handles_cleared_and_tenant_preserved() {
        let s = spec();
        let mut run = running(&s, NOW - 3 * MIN);
        let tr = reap_stale_run(&mut run, Some(&s), NOW - 3 * MIN, 120_000, NOW);
        assert!(tr.changed);
        let detail = "automation run paused after no provider activity for at least 120s";
        let reap = reaped(&tr).clone();
        assert_eq!(
            reap,
            StaleReap {
                terminal: false,
                stale_after_ms: 120_000,
                stale_node_ids: vec![],
                annotated_node_ids: vec![],
                terminal_stale_node_ids: vec![],
                session_ids: vec!["session-1".into()],
                instance_ids: vec!["instance-1".into()],
            }
        );
        assert_eq!(run.status, AutomationRunStatus::Paused);
        assert_eq!(
            run.pause_reason.as_deref(),
            Some("stale_no_provider_activity")
        );
        assert_eq!(run.stop_kind, Some(AutomationStopKind::StaleReaped));
        assert_eq!(run.detail.as_deref(), Some(detail));
        assert_eq!(run.stop_reason.as_deref(), Some(detail));
        assert_eq!(run.tenant_context, tenant());
        assert!(run.active_session_ids.is_empty());
        assert_eq!(run.latest_session_id, None);
        assert!(run.active_instance_ids.is_empty());
        assert_eq!(run.updated_at_ms, NOW);
        assert_eq!(run.finished_at_ms, None);
        let record = run.checkpoint.lifecycle_history.last().expect("record");
        assert_eq!(record.event, "run_paused_stale_no_provider_activity");
        assert_eq!(record.reason.as_deref(), Some(detail));
        assert_eq!(record.stop_kind, Some(AutomationStopKind::StaleReaped));
        assert_eq!(tr.effects.lifecycle, vec![record.clone()]);

        assert_eq!(tr.effects.audit.len(), 1);
        let audit = &tr.effects.audit[0];
        assert_eq!(
            audit.event_type,
            "automation_v2.internal_sweep.paused_stale_run"
        );
        assert_eq!(audit.actor.as_deref(), Some("tandem-server:internal-sweep"));
        assert_eq!(audit.tenant_context, tenant());
        assert_eq!(
            audit.payload,
            json!({
                "source": "automation_v2_internal_sweep",
                "sweep": "reap_stale_running_automation_runs",
                "actor": {"type": "system", "id": "tandem-server", "component": "automation_v2_sweeper"},
                "run_id": "automation-v2-run-stale",
                "runID": "automation-v2-run-stale",
                "automation_id": "auto-stale",
                "automationID": "auto-stale",
                "status": "paused",
                "stop_kind": "stale_reaped",
                "reason": detail,
                "tenantContext": {"org_id": "org-stale", "workspace_id": "ws-stale", "source": "explicit"},
                "outcome": "paused",
                "metadata": {"stale_node_ids": [], "terminal_stale_node_ids": [], "stale_after_ms": 120_000},
            })
        );
        assert_eq!(tr.effects.events.len(), 1, "no run.failed for a pause");
        let event = &tr.effects.events[0];
        assert_eq!(
            event.event_type,
            "automation_v2.run.paused_stale_no_provider_activity"
        );
        assert_eq!(event.run_id, "automation-v2-run-stale");
        assert_eq!(event.tenant_context, tenant());
        assert_eq!(
            event.properties,
            json!({
                "automation_id": "auto-stale",
                "automationID": "auto-stale",
                "workflow_id": "auto-stale",
                "workflowID": "auto-stale",
                "workflow_name": "auto-stale",
                "run_id": "automation-v2-run-stale",
                "runID": "automation-v2-run-stale",
                "source": "automation_v2",
                "component": "automation_v2",
                "status": "paused",
                "pause_reason": "stale_no_provider_activity",
                "reason": detail,
                "detail": detail,
                "stale_node_ids": [],
                "terminal_stale_node_ids": [],
                "stale_after_ms": 120_000,
                "tenantContext": {"org_id": "org-stale", "workspace_id": "ws-stale", "source": "explicit"},
            })
        );
    }

    #[test]
    fn reap_is_a_no_op_when_not_stale_or_not_running() {
        let s = spec();
        let mut run = running(&s, NOW - 3 * MIN);
        let before = run.clone();
        let tr = reap_stale_run(&mut run, Some(&s), NOW - 3 * MIN, 600_000, NOW);
        assert_eq!(
            tr.outcome,
            ReapOutcome::NotStale {
                idle_ms: 180_000,
                stale_after_ms: 600_000
            }
        );
        assert!(!tr.changed && tr.effects.is_empty());
        assert_eq!(run, before);

        for status in AutomationRunStatus::ALL {
            if status == AutomationRunStatus::Running {
                continue;
            }
            let mut r = before.clone();
            r.status = status;
            let snapshot = r.clone();
            let tr = reap_stale_run(&mut r, Some(&s), 0, 1, NOW);
            assert_eq!(tr.outcome, ReapOutcome::NotRunning(status));
            assert!(!tr.changed);
            assert_eq!(r, snapshot);
        }
    }

    #[test]
    fn reap_honours_recent_activity_from_the_activity_column_and_the_row() {
        // Cases 17/18 in fleet form: the row's lifecycle is old, but the activity column (fed by
        // worker progress) is fresh.
        let s = spec();
        let mut run = executing(&s, NOW - 20 * MIN, Some(1));
        let tr = reap_stale_run(&mut run, Some(&s), NOW - 1_000, 120_000, NOW);
        assert!(matches!(
            tr.outcome,
            ReapOutcome::NotStale { idle_ms: 1_000, .. }
        ));
        assert_eq!(run.status, AutomationRunStatus::Running);
        assert_eq!(run.active_session_ids, vec!["session-1"]);
        // A stale activity column does not hide a fresh lifecycle record on the row.
        let mut run = executing(&s, NOW - 20 * MIN, Some(1));
        node_event(
            &mut run,
            "workflow_state_changed",
            "cluster_topics",
            NOW - 1_000,
        );
        let tr = reap_stale_run(&mut run, Some(&s), 0, 120_000, NOW);
        assert!(matches!(
            tr.outcome,
            ReapOutcome::NotStale { idle_ms: 1_000, .. }
        ));
    }

    // ----- case 13: repairable node, then auto-resume -----------------------------------------

    #[test]
    fn case_13_stale_reap_marks_in_progress_nodes_repairable_then_auto_resumes() {
        let s = spec();
        let started = NOW - 3 * MIN;
        let mut run = executing(&s, started, Some(1));
        let tr = reap_stale_run(&mut run, Some(&s), started, 120_000, NOW);
        let reap = reaped(&tr);
        // 120 s node timeout + 60 s grace; 180 s idle is stale (inclusive).
        assert_eq!(reap.stale_after_ms, 180_000);
        assert_eq!(reap.stale_node_ids, vec!["cluster_topics"]);
        assert_eq!(reap.annotated_node_ids, vec!["cluster_topics"]);
        assert!(reap.terminal_stale_node_ids.is_empty());
        assert_eq!(run.status, AutomationRunStatus::Paused);
        let detail = "automation run paused after no provider activity for at least 180s; repairable node(s): cluster_topics";
        assert_eq!(run.detail.as_deref(), Some(detail));
        assert_eq!(run.stop_reason.as_deref(), Some(detail));
        let output = &run.checkpoint.node_outputs["cluster_topics"];
        assert_eq!(output["status"], "needs_repair");
        assert_eq!(output["failure_kind"], "execution_failed");
        assert_eq!(output["blocker_category"], "stale_no_provider_activity");
        assert!(
            output["blocked_reason"]
                .as_str()
                .is_some_and(|r| r.contains("no provider activity"))
        );
        assert_eq!(
            output["blocked_reason"],
            "node execution stalled after no provider activity for at least 180s"
        );
        assert_eq!(output["validator_summary"]["kind"], "generic_artifact");
        assert_eq!(
            output["artifact_validation"]["required_next_tool_actions"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
        let lf = run.checkpoint.last_failure.clone().expect("last_failure");
        assert_eq!(lf.node_id, "cluster_topics");
        assert_eq!(
            lf.reason,
            "node execution stalled after no provider activity for at least 180s"
        );
        assert_eq!(lf.failed_at_ms, NOW);
        assert_eq!(
            tr.effects.audit[0].payload["metadata"],
            json!({"stale_node_ids": ["cluster_topics"], "terminal_stale_node_ids": [], "stale_after_ms": 180_000})
        );

        // Then the auto-resume sweep.
        let at = NOW + 1_000;
        let tr = auto_resume_stale_reaped(
            &mut run,
            Some(&s),
            &GovernanceSnapshot::default(),
            &settings(),
            at,
        );
        assert_eq!(tr.outcome, AutoResumeOutcome::Resumed);
        assert!(tr.changed);
        assert_eq!(run.status, AutomationRunStatus::Queued);
        assert_eq!(run.pause_reason, None);
        assert_eq!(run.stop_kind, None);
        assert_eq!(run.stop_reason, None);
        assert_eq!(run.detail, None);
        assert!(run.checkpoint.is_pending("cluster_topics"));
        assert_eq!(
            run.checkpoint.output_status("cluster_topics").as_deref(),
            Some("needs_repair")
        );
        assert_eq!(
            run.checkpoint.attempts("cluster_topics"),
            1,
            "kept for repair"
        );
        assert_eq!(run.tenant_context, tenant());
        let record = run.checkpoint.lifecycle_history.last().expect("record");
        assert_eq!(
            serde_json::to_value(record).expect("json"),
            json!({
                "event": "run_auto_resumed",
                "recorded_at_ms": at,
                "reason": "auto_resume_after_stale_reap",
                "metadata": {
                    "auto_resume_window_ms": 1_200_000,
                    "stale_reaped_at_ms": NOW,
                    "effective_execution_profile": "guided",
                }
            })
        );
        assert_eq!(tr.effects.audit.len(), 1);
        assert!(tr.effects.events.is_empty());
        let audit = &tr.effects.audit[0];
        assert_eq!(
            audit.event_type,
            "automation_v2.internal_sweep.auto_resumed_stale_reaped_run"
        );
        assert_eq!(audit.actor.as_deref(), Some("tandem-server:internal-sweep"));
        assert_eq!(audit.tenant_context, tenant());
        assert_eq!(
            audit.payload,
            json!({
                "source": "automation_v2_internal_sweep",
                "sweep": "auto_resume_stale_reaped_runs",
                "actor": {"type": "system", "id": "tandem-server", "component": "automation_v2_sweeper"},
                "run_id": "automation-v2-run-stale",
                "runID": "automation-v2-run-stale",
                "automation_id": "auto-stale",
                "automationID": "auto-stale",
                "status": "queued",
                "stop_kind": null,
                "reason": "auto_resume_after_stale_reap",
                "tenantContext": {"org_id": "org-stale", "workspace_id": "ws-stale", "source": "explicit"},
                "outcome": "queued",
                "metadata": {
                    "auto_resume_window_ms": 1_200_000,
                    "auto_resume_count_before": 0,
                    "auto_resume_max_attempts": 2,
                    "stale_reaped_at_ms": NOW,
                },
            })
        );
        // A second sweep over the now-queued row is a no-op.
        let before = run.clone();
        let tr = auto_resume_stale_reaped(
            &mut run,
            Some(&s),
            &GovernanceSnapshot::default(),
            &settings(),
            at,
        );
        assert!(matches!(tr.outcome, AutoResumeOutcome::NotCandidate { .. }));
        assert!(!tr.changed);
        assert_eq!(run, before);
    }

    #[test]
    fn reap_keeps_existing_outputs_and_last_failure() {
        let s = spec();
        let mut run = executing(&s, NOW - 12 * MIN, Some(1));
        node_event(&mut run, "node_started", "draft", NOW - 11 * MIN);
        run.checkpoint.node_outputs.insert(
            "draft".into(),
            json!({"status": "completed", "summary": "kept"}),
        );
        let earlier = AutomationFailureRecord {
            node_id: "collect".into(),
            reason: "earlier".into(),
            failed_at_ms: 1,
        };
        run.checkpoint.last_failure = Some(earlier.clone());
        let tr = reap_stale_run(&mut run, Some(&s), 0, 120_000, NOW);
        let reap = reaped(&tr);
        assert_eq!(
            reap.stale_after_ms, 660_000,
            "draft's default 600 s + grace"
        );
        assert_eq!(reap.stale_node_ids, vec!["cluster_topics", "draft"]);
        assert_eq!(reap.annotated_node_ids, vec!["cluster_topics"]);
        assert_eq!(run.checkpoint.node_outputs["draft"]["summary"], "kept");
        assert_eq!(run.checkpoint.last_failure, Some(earlier));
        assert_eq!(
            tr.effects.events[0].properties["stale_node_ids"],
            json!(["cluster_topics", "draft"])
        );
    }

    // ----- case 16: terminal stale node fails the run -----------------------------------------

    #[test]
    fn case_16_stale_reap_fails_terminal_in_progress_nodes() {
        let mut s = spec();
        s.flow.nodes[1].retry_policy = Some(json!({ "max_attempts": 1 }));
        let mut run = executing(&s, NOW - 3 * MIN, Some(1));
        let tr = reap_stale_run(&mut run, Some(&s), 0, 120_000, NOW);
        let reap = reaped(&tr).clone();
        assert!(reap.terminal);
        assert_eq!(reap.terminal_stale_node_ids, vec!["cluster_topics"]);
        assert_eq!(run.status, AutomationRunStatus::Failed);
        assert_eq!(run.pause_reason, None);
        let detail = "automation run failed after no provider activity for at least 180s; terminal stale node(s): cluster_topics";
        assert_eq!(run.detail.as_deref(), Some(detail));
        assert!(
            run.detail
                .as_deref()
                .is_some_and(|d| d.contains("terminal stale node(s): cluster_topics"))
        );
        assert_eq!(run.stop_reason.as_deref(), Some(detail));
        assert_eq!(run.stop_kind, Some(AutomationStopKind::StaleReaped));
        assert_eq!(run.finished_at_ms, Some(NOW));
        let output = &run.checkpoint.node_outputs["cluster_topics"];
        assert_eq!(output["status"], "failed");
        assert_eq!(output["failure_kind"], "run_failed");
        assert_eq!(
            output["artifact_validation"]["required_next_tool_actions"],
            json!([])
        );
        assert!(lifecycle_events(&run).contains(&"run_failed_stale_no_provider_activity"));

        let audit = &tr.effects.audit[0];
        assert_eq!(
            audit.event_type,
            "automation_v2.internal_sweep.failed_stale_run"
        );
        assert_eq!(audit.payload["outcome"], "failed");
        assert_eq!(audit.payload["status"], "failed");
        assert_eq!(
            audit.payload["metadata"],
            json!({"stale_node_ids": ["cluster_topics"], "terminal_stale_node_ids": ["cluster_topics"], "stale_after_ms": 180_000})
        );
        let types: Vec<&str> = tr
            .effects
            .events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect();
        assert_eq!(
            types,
            vec![
                "automation_v2.run.failed",
                "automation_v2.run.failed_stale_no_provider_activity"
            ]
        );
        let failed = &tr.effects.events[0];
        assert_eq!(failed.node_id.as_deref(), Some("cluster_topics"));
        assert_eq!(failed.properties["status"], "failed");
        assert_eq!(failed.properties["node_id"], "cluster_topics");
        assert_eq!(failed.properties["attempt"], 1);
        assert_eq!(failed.properties["max_attempts"], 1);
        assert_eq!(failed.properties["retry_exhausted"], true);
        assert_eq!(
            failed.properties["session_id"],
            Value::Null,
            "handles cleared"
        );
        assert_eq!(
            failed.properties["reason"],
            "node execution stalled after no provider activity for at least 180s"
        );
        assert_eq!(failed.properties["error_kind"], "unknown");
        let stale = &tr.effects.events[1].properties;
        assert_eq!(stale["status"], "failed");
        assert_eq!(stale["pause_reason"], Value::Null);
        assert_eq!(stale["terminal_stale_node_ids"], json!(["cluster_topics"]));
        // A failed run is not auto-resumed.
        let tr = auto_resume_stale_reaped(
            &mut run,
            Some(&s),
            &GovernanceSnapshot::default(),
            &settings(),
            NOW + 1,
        );
        assert!(matches!(tr.outcome, AutoResumeOutcome::NotCandidate { .. }));
    }

    // ----- §7.30 ------------------------------------------------------------------------------

    #[test]
    fn fix_7_30_missing_attempt_count_is_one_in_reaper_and_auto_resume() {
        // Reaper: max 1 and no count → terminal.
        let mut s1 = spec();
        s1.flow.nodes[1].retry_policy = Some(json!({ "max_attempts": 1 }));
        let mut run = executing(&s1, NOW - 10 * MIN, None);
        let tr = reap_stale_run(&mut run, Some(&s1), 0, 120_000, NOW);
        assert!(reaped(&tr).terminal);

        // Auto-resume: a needs_repair node with no count and max 1 has no attempt left.
        let mut run = executing(&s1, NOW - 10 * MIN, None);
        run.checkpoint
            .node_outputs
            .insert("cluster_topics".into(), json!({"status": "NEEDS_REPAIR"}));
        assert!(repairable_node_ids(&run, &s1).is_empty());
        // With max 2 it is repairable (case-insensitive status).
        let mut s2 = spec();
        s2.flow.nodes[1].retry_policy = Some(json!({ "max_attempts": 2 }));
        assert_eq!(repairable_node_ids(&run, &s2), vec!["cluster_topics"]);
        run.checkpoint.completed_nodes.push("cluster_topics".into());
        assert!(repairable_node_ids(&run, &s2).is_empty(), "completed");
    }

    // ----- window, cap, kill switch -----------------------------------------------------------

    fn reap_to_paused(run: &mut AutomationV2RunRecord, s: &AutomationV2Spec, at: Millis) {
        let tr = reap_stale_run(run, Some(s), 0, 120_000, at);
        assert!(
            matches!(&tr.outcome, ReapOutcome::Reaped(r) if !r.terminal),
            "{:?}",
            tr.outcome
        );
    }

    #[test]
    fn untested_window_and_cap_work_together_across_episodes() {
        let mut s = spec();
        s.flow.nodes[1].retry_policy = Some(json!({ "max_attempts": 10 }));
        let window = settings().auto_resume_window_ms;
        let gov = GovernanceSnapshot::default();
        let mut run = executing(&s, NOW - 10 * MIN, Some(1));
        let mut t = NOW;

        // Episode 1: reaped, resumed at the very end of the window (inclusive).
        reap_to_paused(&mut run, &s, t);
        let tr = auto_resume_stale_reaped(&mut run, Some(&s), &gov, &settings(), t + window);
        assert_eq!(tr.outcome, AutoResumeOutcome::Resumed);
        assert_eq!(
            tr.effects.audit[0].payload["metadata"]["auto_resume_count_before"],
            0
        );

        // Episode 2: the node re-runs, stalls again, resumed once more.
        t += window + 1_000;
        restart_node(&mut run, "cluster_topics", t);
        t += 10 * MIN;
        reap_to_paused(&mut run, &s, t);
        assert_eq!(
            stale_reaped_at_ms(&run),
            Some(t),
            "window restarts at the latest reap"
        );
        let tr = auto_resume_stale_reaped(&mut run, Some(&s), &gov, &settings(), t + 1);
        assert_eq!(tr.outcome, AutoResumeOutcome::Resumed);
        assert_eq!(
            tr.effects.audit[0].payload["metadata"]["auto_resume_count_before"],
            1
        );

        // Episode 3: within the window, but the cap (2) is reached.
        t += 1_000;
        restart_node(&mut run, "cluster_topics", t);
        t += 10 * MIN;
        reap_to_paused(&mut run, &s, t);
        let before = run.clone();
        let tr = auto_resume_stale_reaped(&mut run, Some(&s), &gov, &settings(), t + 1);
        assert_eq!(
            tr.outcome,
            AutoResumeOutcome::CapReached { count: 2, cap: 2 }
        );
        assert!(!tr.changed && tr.effects.is_empty());
        assert_eq!(run, before);

        // A larger cap would allow it, but not once the window has passed.
        let roomy = StaleSettings {
            auto_resume_max_attempts: 3,
            ..settings()
        };
        let tr = auto_resume_stale_reaped(&mut run, Some(&s), &gov, &roomy, t + window + 1);
        assert_eq!(
            tr.outcome,
            AutoResumeOutcome::OutsideWindow {
                stale_reaped_at_ms: t
            }
        );
        assert!(!tr.changed);
        let tr = auto_resume_stale_reaped(&mut run, Some(&s), &gov, &roomy, t + window);
        assert_eq!(tr.outcome, AutoResumeOutcome::Resumed);
    }

    fn guardrail_held_run(s: &AutomationV2Spec, gov: &GovernanceSnapshot) -> AutomationV2RunRecord {
        let mut run = AutomationV2RunRecord::new_queued(
            "automation-v2-run-held".into(),
            s,
            "manual",
            ExecutionProfile::Guided,
            NOW - MIN,
        );
        let tr = claim_run(&mut run, Some(s), None, gov, NOW);
        assert!(matches!(tr.outcome, ClaimOutcome::LaunchHeld { .. }));
        run
    }

    #[test]
    fn untested_kill_switch_disables_only_the_stale_path() {
        let s = spec();
        let disabled = StaleSettings {
            stale_auto_resume_disabled: true,
            ..settings()
        };
        let mut run = executing(&s, NOW - 3 * MIN, Some(1));
        reap_to_paused(&mut run, &s, NOW);
        let before = run.clone();
        let tr = auto_resume_stale_reaped(
            &mut run,
            Some(&s),
            &GovernanceSnapshot::default(),
            &disabled,
            NOW + 1,
        );
        assert_eq!(tr.outcome, AutoResumeOutcome::Disabled);
        assert!(!tr.changed);
        assert_eq!(run, before);

        // §7.6: the guardrail path has no such switch; it still resumes with the kill switch on.
        let held_gov = paused_gov(&["agent-writer"]);
        let mut held = guardrail_held_run(&s, &held_gov);
        let gov = with_override(held_gov, "agent-writer", NOW + 60 * MIN);
        let tr = auto_resume_guardrail_stopped(&mut held, Some(&s), &gov, NOW + 1);
        assert_eq!(tr.outcome, AutoResumeOutcome::Resumed);
    }

    #[test]
    fn fix_7_7_guardrail_resumes_do_not_consume_the_stale_cap() {
        let s = spec();
        let mut run = executing(&s, NOW - 3 * MIN, Some(1));
        for i in 0..3 {
            run.checkpoint.lifecycle_history.push(lifecycle_record(
                LIFECYCLE_RUN_AUTO_RESUMED,
                Some(AUTO_RESUME_AFTER_GUARDRAIL_OVERRIDE.into()),
                None,
                None,
                "guided",
                NOW - 10 * MIN + i,
            ));
        }
        assert_eq!(stale_auto_resume_count(&run), 0);
        reap_to_paused(&mut run, &s, NOW);
        let tr = auto_resume_stale_reaped(
            &mut run,
            Some(&s),
            &GovernanceSnapshot::default(),
            &settings(),
            NOW + 1,
        );
        assert_eq!(
            tr.outcome,
            AutoResumeOutcome::Resumed,
            "upstream would count 3 ≥ 2"
        );
        assert_eq!(stale_auto_resume_count(&run), 1);
    }

    #[test]
    fn stale_auto_resume_skip_reasons() {
        let s = spec();
        let gov = GovernanceSnapshot::default();
        let mut base = executing(&s, NOW - 3 * MIN, Some(1));
        reap_to_paused(&mut base, &s, NOW);

        // No reap record (e.g. a legacy row).
        let mut run = base.clone();
        run.checkpoint
            .lifecycle_history
            .retain(|r| r.stop_kind != Some(AutomationStopKind::StaleReaped));
        let tr = auto_resume_stale_reaped(&mut run, Some(&s), &gov, &settings(), NOW);
        assert_eq!(tr.outcome, AutoResumeOutcome::NoStaleReapRecord);

        // No definition at all.
        let mut run = base.clone();
        run.automation_snapshot = None;
        let tr = auto_resume_stale_reaped(&mut run, None, &gov, &settings(), NOW);
        assert_eq!(tr.outcome, AutoResumeOutcome::NoAutomation);

        // Automation paused (live definition).
        let mut paused = s.clone();
        paused.status = AutomationStatus::Paused;
        let mut run = base.clone();
        let tr = auto_resume_stale_reaped(&mut run, Some(&paused), &gov, &settings(), NOW);
        assert_eq!(tr.outcome, AutoResumeOutcome::AutomationPaused);

        // No repairable node (reaped without in-progress nodes).
        let mut run = running(&s, NOW - 3 * MIN);
        reap_to_paused(&mut run, &s, NOW);
        let tr = auto_resume_stale_reaped(&mut run, Some(&s), &gov, &settings(), NOW);
        assert_eq!(tr.outcome, AutoResumeOutcome::NoRepairableNode);

        // An agent is spend-paused without override: left to the guardrail path.
        let mut run = base.clone();
        let tr = auto_resume_stale_reaped(
            &mut run,
            Some(&s),
            &paused_gov(&["agent-writer"]),
            &settings(),
            NOW,
        );
        assert_eq!(tr.outcome, AutoResumeOutcome::LaunchStillHeld);
        assert!(!tr.changed);
        assert_eq!(run, base);
    }

    // ----- R1 / §7.9 --------------------------------------------------------------------------

    #[test]
    fn fix_r1_auto_resume_rechecks_status_and_stop_kind_on_the_locked_row() {
        let s = spec();
        let gov = with_override(paused_gov(&[]), "agent-writer", NOW + 60 * MIN);
        let mut reaped_run = executing(&s, NOW - 3 * MIN, Some(1));
        reap_to_paused(&mut reaped_run, &s, NOW);
        let held = guardrail_held_run(&s, &paused_gov(&["agent-writer"]));

        // What an operator may have done between the sweeper's scan and its transaction.
        let meanwhile: [(AutomationRunStatus, Option<AutomationStopKind>); 4] = [
            (
                AutomationRunStatus::Cancelled,
                Some(AutomationStopKind::OperatorStopped),
            ),
            (AutomationRunStatus::Queued, None),
            (AutomationRunStatus::Running, None),
            (AutomationRunStatus::Paused, None),
        ];
        for (status, stop_kind) in meanwhile {
            let mut run = reaped_run.clone();
            run.status = status;
            run.stop_kind = stop_kind;
            let before = run.clone();
            let tr = auto_resume_stale_reaped(&mut run, Some(&s), &gov, &settings(), NOW + 1);
            assert_eq!(
                tr.outcome,
                AutoResumeOutcome::NotCandidate { status, stop_kind }
            );
            assert!(!tr.changed && tr.effects.is_empty());
            assert_eq!(run, before, "never resurrected");

            let mut run = held.clone();
            run.status = status;
            run.stop_kind = stop_kind;
            let before = run.clone();
            let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &gov, NOW + 1);
            assert_eq!(
                tr.outcome,
                AutoResumeOutcome::NotCandidate { status, stop_kind }
            );
            assert!(!tr.changed);
            assert_eq!(run, before);
        }
        // Each path only takes its own stop kind.
        let mut run = held.clone();
        let tr = auto_resume_stale_reaped(&mut run, Some(&s), &gov, &settings(), NOW + 1);
        assert!(matches!(tr.outcome, AutoResumeOutcome::NotCandidate { .. }));
        let mut run = reaped_run.clone();
        let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &gov, NOW + 1);
        assert!(matches!(tr.outcome, AutoResumeOutcome::NotCandidate { .. }));
    }

    // ----- case 14, case 35, §7.8 -------------------------------------------------------------

    #[test]
    fn case_14_guardrail_stopped_run_auto_resumes_after_quota_override_approval() {
        let s = spec_with(
            vec![AutomationFlowNode::task("n", &[])],
            &["agent-guardrail-resume"],
        );
        let paused = paused_gov(&["agent-guardrail-resume"]);
        let mut run = guardrail_held_run(&s, &paused);
        let before = run.clone();
        let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &paused, NOW + 1);
        assert_eq!(tr.outcome, AutoResumeOutcome::LaunchStillHeld);
        assert!(!tr.changed);
        assert_eq!(run, before);
        assert_eq!(run.status, AutomationRunStatus::Paused);

        let approved = with_override(paused, "agent-guardrail-resume", NOW + 60 * MIN);
        let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &approved, NOW + 2);
        assert_eq!(tr.outcome, AutoResumeOutcome::Resumed);
        assert_eq!(run.status, AutomationRunStatus::Queued);
        assert_eq!(run.pause_reason, None);
        assert_eq!(run.stop_kind, None);
        assert_eq!(run.stop_reason, None);
        assert_eq!(run.detail, None);
        let record = run.checkpoint.lifecycle_history.last().expect("record");
        assert_eq!(
            serde_json::to_value(record).expect("json"),
            json!({
                "event": "run_auto_resumed",
                "recorded_at_ms": NOW + 2,
                "reason": "auto_resume_after_guardrail_override",
                "metadata": {
                    "agent_ids": ["agent-guardrail-resume"],
                    "stop_kind": "guardrail_stopped",
                    "effective_execution_profile": "guided",
                }
            })
        );
        let audit = &tr.effects.audit[0];
        assert_eq!(
            audit.event_type,
            "automation_v2.internal_sweep.auto_resumed_guardrail_stopped_run"
        );
        assert_eq!(
            audit.payload,
            json!({
                "source": "automation_v2_internal_sweep",
                "sweep": "auto_resume_guardrail_stopped_runs",
                "actor": {"type": "system", "id": "tandem-server", "component": "automation_v2_sweeper"},
                "run_id": "automation-v2-run-held",
                "runID": "automation-v2-run-held",
                "automation_id": "auto-stale",
                "automationID": "auto-stale",
                "status": "queued",
                "stop_kind": null,
                "reason": "auto_resume_after_guardrail_override",
                "tenantContext": {"org_id": "org-stale", "workspace_id": "ws-stale", "source": "explicit"},
                "outcome": "queued",
                "metadata": {"agent_ids": ["agent-guardrail-resume"], "stop_kind": "guardrail_stopped"},
            })
        );
    }

    #[test]
    fn case_35_held_at_launch_then_override_then_resume_then_claim_succeeds() {
        let s = spec_with(vec![AutomationFlowNode::task("n", &[])], &["agent-spender"]);
        let capped = paused_gov(&["agent-spender"]);
        let mut run = guardrail_held_run(&s, &capped);
        assert_eq!(run.status, AutomationRunStatus::Paused);
        assert_eq!(run.stop_kind, Some(AutomationStopKind::GuardrailStopped));
        assert_eq!(lifecycle_events(&run), vec!["run_launch_held"]);

        let approved = with_override(capped, "agent-spender", NOW + 60 * MIN);
        let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &approved, NOW + 1_000);
        assert_eq!(tr.outcome, AutoResumeOutcome::Resumed);
        assert_eq!(run.status, AutomationRunStatus::Queued);

        let tr = claim_run(&mut run, Some(&s), None, &approved, NOW + 2_000);
        assert_eq!(tr.outcome, ClaimOutcome::Claimed);
        assert_eq!(run.status, AutomationRunStatus::Running);
        assert_eq!(
            lifecycle_events(&run),
            vec!["run_launch_held", "run_auto_resumed"]
        );
    }

    #[test]
    fn fix_7_8_two_paused_agents_one_override_never_flap() {
        let s = spec_with(
            vec![AutomationFlowNode::task("n", &[])],
            &["agent-a", "agent-b"],
        );
        let gov = with_override(
            paused_gov(&["agent-a", "agent-b"]),
            "agent-a",
            NOW + 60 * MIN,
        );
        let mut run = guardrail_held_run(&s, &gov);
        let history_len = run.checkpoint.lifecycle_history.len();
        for tick in 1..=20 {
            let before = run.clone();
            let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &gov, NOW + tick * 1_000);
            assert_eq!(
                tr.outcome,
                AutoResumeOutcome::LaunchStillHeld,
                "tick {tick}"
            );
            assert!(!tr.changed && tr.effects.is_empty());
            assert_eq!(run, before);
            let tr = claim_run(&mut run, Some(&s), None, &gov, NOW + tick * 1_000 + 500);
            assert!(matches!(tr.outcome, ClaimOutcome::NotQueued(_)));
        }
        assert_eq!(
            run.checkpoint.lifecycle_history.len(),
            history_len,
            "no growth"
        );
        // The second override lifts the hold: one resume, then the claim succeeds.
        let gov = with_override(gov, "agent-b", NOW + 60 * MIN);
        let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &gov, NOW + 30_000);
        assert_eq!(tr.outcome, AutoResumeOutcome::Resumed);
        let tr = claim_run(&mut run, Some(&s), None, &gov, NOW + 30_000);
        assert_eq!(tr.outcome, ClaimOutcome::Claimed);
    }

    fn guardrail_paused_by(event: &str, s: &AutomationV2Spec) -> AutomationV2RunRecord {
        let mut run = running(s, NOW - 10 * MIN);
        run.status = AutomationRunStatus::Paused;
        run.stop_kind = Some(AutomationStopKind::GuardrailStopped);
        run.pause_reason = Some("guardrail".into());
        run.checkpoint.lifecycle_history.push(lifecycle_record(
            event,
            Some("guardrail".into()),
            Some(AutomationStopKind::GuardrailStopped),
            None,
            "guided",
            NOW - MIN,
        ));
        run
    }

    #[test]
    fn fix_7_8_only_spend_caused_guardrail_stops_are_resumed_by_an_override() {
        let s = spec();
        let gov = with_override(paused_gov(&[]), "agent-writer", NOW + 60 * MIN);
        // Budget guardrail, dependency revocation, health expiry: an override cannot lift them.
        for event in ["run_paused", "run_paused_governance"] {
            let mut run = guardrail_paused_by(event, &s);
            let before = run.clone();
            let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &gov, NOW);
            assert_eq!(
                tr.outcome,
                AutoResumeOutcome::CauseNotLiftableByOverride {
                    cause: Some(event.into())
                }
            );
            assert_eq!(run, before);
        }
        let mut run = guardrail_paused_by("run_paused", &s);
        run.checkpoint.lifecycle_history.clear();
        let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &gov, NOW);
        assert_eq!(
            tr.outcome,
            AutoResumeOutcome::CauseNotLiftableByOverride { cause: None }
        );
        // The weekly spend-cap hard stop is lifted by an override.
        let mut run = guardrail_paused_by("run_paused_spend_cap_exceeded", &s);
        let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &gov, NOW);
        assert_eq!(tr.outcome, AutoResumeOutcome::Resumed);
        // Without any override it stays paused, as upstream.
        let mut run = guardrail_paused_by("run_paused_spend_cap_exceeded", &s);
        let tr =
            auto_resume_guardrail_stopped(&mut run, Some(&s), &GovernanceSnapshot::default(), NOW);
        assert_eq!(tr.outcome, AutoResumeOutcome::NoQuotaOverride);
        // An expired override does not count.
        let expired = with_override(paused_gov(&[]), "agent-writer", NOW);
        let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &expired, NOW);
        assert_eq!(tr.outcome, AutoResumeOutcome::NoQuotaOverride);
    }

    #[test]
    fn fix_7_8_paused_automation_and_missing_agents_are_not_resumed() {
        let s = spec();
        let gov = with_override(paused_gov(&[]), "agent-writer", NOW + 60 * MIN);
        let mut live = s.clone();
        live.status = AutomationStatus::Paused;
        let mut run = guardrail_held_run(&s, &paused_gov(&["agent-writer"]));
        let tr = auto_resume_guardrail_stopped(&mut run, Some(&live), &gov, NOW);
        assert_eq!(tr.outcome, AutoResumeOutcome::AutomationPaused);
        assert_eq!(run.status, AutomationRunStatus::Paused);

        let mut nobody = s.clone();
        nobody.agents.clear();
        let mut run = guardrail_held_run(&s, &paused_gov(&["agent-writer"]));
        run.automation_snapshot = Some(std::sync::Arc::new(nobody));
        let tr = auto_resume_guardrail_stopped(&mut run, None, &gov, NOW);
        assert_eq!(tr.outcome, AutoResumeOutcome::NoAgents);

        let mut run = guardrail_held_run(&s, &paused_gov(&["agent-writer"]));
        run.automation_snapshot = None;
        let tr = auto_resume_guardrail_stopped(&mut run, None, &gov, NOW);
        assert_eq!(tr.outcome, AutoResumeOutcome::NoAutomation);
    }

    // ----- §3.6 restart recovery, §3.12 shutdown ----------------------------------------------

    #[test]
    fn case_27_restart_recovery_fails_running_run_without_replay() {
        let s = spec();
        let mut run = running(&s, NOW - MIN);
        run.checkpoint.pending_nodes = vec!["collect".into(), "cluster_topics".into()];
        let pending = run.checkpoint.pending_nodes.clone();
        let tr = fail_running_for_server_restart(&mut run, NOW);
        assert!(tr.outcome && tr.changed);
        assert_eq!(run.status, AutomationRunStatus::Failed);
        assert_eq!(run.stop_kind, Some(AutomationStopKind::ServerRestart));
        assert_eq!(
            run.detail.as_deref(),
            Some("automation run interrupted by server restart")
        );
        assert_eq!(run.stop_reason, run.detail);
        assert!(run.checkpoint.node_outputs.is_empty());
        assert!(run.checkpoint.node_attempts.is_empty());
        assert_eq!(run.checkpoint.pending_nodes, pending);
        assert_eq!(run.checkpoint.last_failure, None);
        assert_eq!(run.finished_at_ms, Some(NOW));
        let record = run.checkpoint.lifecycle_history.last().expect("record");
        assert_eq!(record.event, "run_failed_server_restart");
        assert_eq!(record.stop_kind, Some(AutomationStopKind::ServerRestart));
        assert_eq!(record.reason, run.detail);
        // A claim can no longer pick it up.
        let tr = claim_run(
            &mut run,
            Some(&s),
            None,
            &GovernanceSnapshot::default(),
            NOW + 1,
        );
        assert!(matches!(tr.outcome, ClaimOutcome::NotQueued(_)));
    }

    #[test]
    fn case_34_restart_recovery_records_attributed_protected_audit() {
        let s = spec();
        let mut run = running(&s, NOW - MIN);
        let tr = fail_running_for_server_restart(&mut run, NOW);
        assert_eq!(tr.effects.audit.len(), 1);
        let audit = &tr.effects.audit[0];
        assert_eq!(
            audit.event_type,
            "automation_v2.internal_sweep.server_restart_failed_run"
        );
        assert_eq!(audit.tenant_context, tenant());
        assert_eq!(audit.actor.as_deref(), Some("tandem-server:internal-sweep"));
        assert_eq!(audit.payload["run_id"], "automation-v2-run-stale");
        assert_eq!(audit.payload["sweep"], "recover_in_flight_runs");
        assert_eq!(audit.payload["outcome"], "failed_running_run");
        assert_eq!(audit.payload["status"], "failed");
        assert_eq!(audit.payload["stop_kind"], "server_restart");
        assert_eq!(
            audit.payload["reason"],
            "automation run interrupted by server restart"
        );
        assert_eq!(
            audit.payload["metadata"],
            json!({"previous_status": "running"})
        );
    }

    #[test]
    fn untested_pausing_settles_to_paused_on_restart() {
        let s = spec();
        let mut run = running(&s, NOW - MIN);
        run.status = AutomationRunStatus::Pausing;
        run.stop_kind = Some(AutomationStopKind::OperatorStopped);
        let tr = settle_pausing(&mut run, NOW);
        assert!(tr.outcome && tr.changed);
        assert_eq!(run.status, AutomationRunStatus::Paused);
        assert_eq!(
            run.pause_reason.as_deref(),
            Some("automation run settled to paused after server restart")
        );
        assert_eq!(
            run.stop_kind,
            Some(AutomationStopKind::OperatorStopped),
            "unchanged"
        );
        assert_eq!(run.finished_at_ms, None);
        assert_eq!(run.scheduler, None);
        let record = run.checkpoint.lifecycle_history.last().expect("record");
        assert_eq!(record.event, "run_pausing_settled_on_restart");
        assert_eq!(
            record.reason.as_deref(),
            Some("automation run settled to paused after server restart")
        );
        assert_eq!(record.stop_kind, None);
        let audit = &tr.effects.audit[0];
        assert_eq!(
            audit.event_type,
            "automation_v2.internal_sweep.server_restart_settled_pausing_run"
        );
        assert_eq!(audit.payload["sweep"], "recover_in_flight_runs");
        assert_eq!(audit.payload["outcome"], "settled_pausing_run");
        assert_eq!(audit.payload["status"], "paused");
        assert_eq!(
            audit.payload["metadata"],
            json!({"previous_status": "pausing"})
        );

        // An existing pause reason is kept.
        let mut run = running(&s, NOW - MIN);
        run.status = AutomationRunStatus::Pausing;
        run.pause_reason = Some("operator asked".into());
        settle_pausing(&mut run, NOW);
        assert_eq!(run.pause_reason.as_deref(), Some("operator asked"));
    }

    #[test]
    fn untested_shutdown_fails_running_runs_only() {
        let s = spec();
        let mut run = running(&s, NOW - MIN);
        let tr = fail_running_for_shutdown(&mut run, NOW);
        assert!(tr.outcome && tr.changed);
        assert_eq!(run.status, AutomationRunStatus::Failed);
        assert_eq!(run.stop_kind, Some(AutomationStopKind::Shutdown));
        assert_eq!(
            run.detail.as_deref(),
            Some("automation run stopped during server shutdown")
        );
        assert_eq!(run.stop_reason, run.detail);
        assert_eq!(run.finished_at_ms, Some(NOW));
        let record = run.checkpoint.lifecycle_history.last().expect("record");
        assert_eq!(record.event, "run_failed_shutdown");
        assert_eq!(record.stop_kind, Some(AutomationStopKind::Shutdown));
        let audit = &tr.effects.audit[0];
        assert_eq!(
            audit.event_type,
            "automation_v2.internal_sweep.shutdown_failed_run"
        );
        assert_eq!(
            audit.payload["sweep"],
            "fail_running_automation_runs_for_shutdown"
        );
        assert_eq!(audit.payload["outcome"], "failed_running_run");
        assert_eq!(audit.payload["stop_kind"], "shutdown");
        assert_eq!(
            audit.payload["metadata"],
            json!({"previous_status": "running"})
        );
    }

    #[test]
    fn restart_and_shutdown_sweeps_are_no_ops_for_other_statuses() {
        let s = spec();
        for status in AutomationRunStatus::ALL {
            let mut run = running(&s, NOW - MIN);
            run.status = status;
            let before = run.clone();
            if status != AutomationRunStatus::Running {
                let tr = fail_running_for_shutdown(&mut run, NOW);
                assert!(
                    !tr.outcome && !tr.changed && tr.effects.is_empty(),
                    "{status}"
                );
                let tr = fail_running_for_server_restart(&mut run, NOW);
                assert!(
                    !tr.outcome && !tr.changed && tr.effects.is_empty(),
                    "{status}"
                );
            }
            if status != AutomationRunStatus::Pausing {
                let tr = settle_pausing(&mut run, NOW);
                assert!(
                    !tr.outcome && !tr.changed && tr.effects.is_empty(),
                    "{status}"
                );
            }
            assert_eq!(run, before, "{status}");
        }
    }

    // ----- properties -------------------------------------------------------------------------

    proptest! {
        /// §7.8: whatever the spend pauses and overrides, a guardrail resume implies the next
        /// claim (same governance, same instant) launches, and repeated sweep/claim cycles hold a
        /// run at most once per governance state.
        #[test]
        fn prop_guardrail_resume_never_flaps(
            agents in proptest::collection::btree_set("[a-d]", 1..4),
            paused_mask in 0u8..16,
            override_mask in 0u8..16,
            expiry_offsets in proptest::collection::vec(0u64..3_000, 4),
            cycles in 1usize..8,
        ) {
            let ids: Vec<String> = agents.into_iter().map(|a| format!("agent-{a}")).collect();
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let s = spec_with(vec![AutomationFlowNode::task("n", &[])], &refs);
            let paused: Vec<&str> = refs.iter().enumerate()
                .filter(|(i, _)| paused_mask & (1 << i) != 0).map(|(_, a)| *a).collect();
            let mut gov = paused_gov(&paused);
            for (i, a) in refs.iter().enumerate() {
                if override_mask & (1 << i) != 0 {
                    gov = with_override(gov, a, NOW + expiry_offsets[i]);
                }
            }
            let mut run = AutomationV2RunRecord::new_queued(
                "automation-v2-run-prop".into(), &s, "manual", ExecutionProfile::Guided, NOW);
            for c in 0..cycles {
                let now = NOW + (c as u64) * 500;
                if run.status == AutomationRunStatus::Queued {
                    let tr = claim_run(&mut run, Some(&s), None, &gov, now);
                    if tr.outcome == ClaimOutcome::Claimed {
                        break;
                    }
                    let held = matches!(tr.outcome, ClaimOutcome::LaunchHeld { .. });
                    prop_assert!(held, "unexpected claim outcome {:?}", tr.outcome);
                }
                let tr = auto_resume_guardrail_stopped(&mut run, Some(&s), &gov, now);
                if tr.outcome.resumed() {
                    prop_assert!(!gov.launch_blocked_by_spend_pause(&s, now));
                    let tr = claim_run(&mut run, Some(&s), None, &gov, now);
                    prop_assert_eq!(tr.outcome, ClaimOutcome::Claimed);
                    break;
                }
                prop_assert!(!tr.changed);
            }
            let holds = run.checkpoint.lifecycle_history.iter()
                .filter(|r| r.event == "run_launch_held").count();
            // Overrides only expire over time, so the hold can only fire once.
            prop_assert!(holds <= 1, "held {} times", holds);
        }

        /// §7.30: the reaper's terminal nodes and auto-resume's repairable nodes are exact
        /// complements among the nodes the reaper annotated.
        #[test]
        fn prop_reap_terminal_and_resume_repairable_are_complements(
            attempts in proptest::option::of(0u32..6),
            max_attempts in 1u64..6,
        ) {
            let mut s = spec();
            s.flow.nodes[1].retry_policy = Some(json!({ "max_attempts": max_attempts }));
            let mut run = executing(&s, NOW - 10 * MIN, attempts);
            let tr = reap_stale_run(&mut run, Some(&s), 0, 120_000, NOW);
            let reap = reaped(&tr).clone();
            prop_assert_eq!(reap.terminal, run.status == AutomationRunStatus::Failed);
            prop_assert_eq!(reap.terminal, !reap.terminal_stale_node_ids.is_empty());
            let repairable = repairable_node_ids(&run, &s);
            for node in &reap.annotated_node_ids {
                prop_assert_ne!(
                    reap.terminal_stale_node_ids.contains(node),
                    repairable.contains(node)
                );
            }
        }

        /// `refresh_stale_running_detail` only ever touches running runs and is idempotent.
        #[test]
        fn prop_refresh_detail_is_idempotent_and_running_only(
            detail in "(node `[a-c]` x|[a-z `]{0,12})",
            completed in proptest::collection::vec("[a-c]", 0..3),
            pending in proptest::collection::vec("[a-c]", 0..3),
            attempt in 0u32..3,
            status_idx in 0usize..9,
        ) {
            let mut run = detail_run(&detail);
            run.status = AutomationRunStatus::ALL[status_idx];
            run.checkpoint.completed_nodes = completed;
            run.checkpoint.node_attempts = pending.iter().map(|p| (p.clone(), attempt)).collect();
            run.checkpoint.pending_nodes = pending;
            let before = run.clone();
            refresh_stale_running_detail(&mut run);
            if before.status != AutomationRunStatus::Running {
                prop_assert_eq!(&run, &before);
            }
            let once = run.clone();
            refresh_stale_running_detail(&mut run);
            prop_assert_eq!(&run, &once);
        }
    }
}
