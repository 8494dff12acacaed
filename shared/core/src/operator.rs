//! Operator repair actions as pure transitions (spec §2.2): `recover` and the task endpoints
//! `retry`, `requeue`, `continue`; the other operator actions (`request_pause`, `resume_run`,
//! `cancel_run`) are in [`crate::execution`]. Callers run them on the locked row (the API does so
//! inside `tandem_store::transition_run`).
//!
//! Spec §2.2 names the statuses, the lifecycle events and what is cleared; the reset rules are
//! ours, documented per action:
//!
//! * **recover** (`paused`, `failed`, `blocked`, or `completed` with blocked nodes → `queued`,
//!   else 409 `AUTOMATION_V2_RUN_NOT_RECOVERABLE`): nodes whose output is `failed`, `blocked` or
//!   `needs_repair` are reset (output and attempts removed, pending again), `last_failure` is
//!   cleared; lifecycle `run_recovered_from_pause` (from `paused`) or `run_recovered`.
//! * **retry** `{node}`: the node and its descendants are reset (outputs, attempts, completion);
//!   lifecycle `run_task_retried`.
//! * **requeue** `{node}`: as retry, but attempt counts are kept (the next attempt is counted
//!   against the node's retry budget); lifecycle `run_task_requeued`.
//! * **continue** `{node}`: only the node itself is reset (completed descendants keep their
//!   outputs); lifecycle `run_task_continued`.
//!
//! The task endpoints accept any status except `running`, `queued` and `pausing` (cancelled runs
//! included, as upstream) and 409 `AUTOMATION_V2_RUN_NOT_REQUEUEABLE` otherwise. Every action
//! clears `awaiting_gate` (gate_history is kept), `stop_kind`, `stop_reason`, `pause_reason`,
//! `detail`, `finished_at_ms` and the execution handles, and recomputes `blocked_nodes`.

use std::collections::BTreeSet;

use crate::{
    AutomationRunStatus, AutomationV2RunRecord, AutomationV2Spec, Effects, Millis, Transition,
    update,
};
use serde_json::json;

pub const CODE_NOT_RECOVERABLE: &str = "AUTOMATION_V2_RUN_NOT_RECOVERABLE";
pub const CODE_NOT_REQUEUEABLE: &str = "AUTOMATION_V2_RUN_NOT_REQUEUEABLE";
pub const CODE_NODE_NOT_FOUND: &str = "AUTOMATION_V2_NODE_NOT_FOUND";

/// The task endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskAction {
    Retry,
    Requeue,
    Continue,
}

impl TaskAction {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "retry" => Some(Self::Retry),
            "requeue" => Some(Self::Requeue),
            "continue" => Some(Self::Continue),
            _ => None,
        }
    }

    pub fn lifecycle_event(self) -> &'static str {
        match self {
            Self::Retry => "run_task_retried",
            Self::Requeue => "run_task_requeued",
            Self::Continue => "run_task_continued",
        }
    }
}

/// What an operator action did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorOutcome {
    Requeued {
        previous: AutomationRunStatus,
        reset_nodes: Vec<String>,
    },
    /// 409 with this code; nothing changed.
    Refused {
        code: &'static str,
        status: AutomationRunStatus,
    },
    /// 404: the node is not in the automation.
    NodeNotFound,
}

fn reset_nodes(run: &mut AutomationV2RunRecord, nodes: &BTreeSet<String>, keep_attempts: bool) {
    let cp = &mut run.checkpoint;
    for n in nodes {
        cp.node_outputs.remove(n);
        if !keep_attempts {
            cp.node_attempts.remove(n);
        }
        cp.completed_nodes.retain(|c| c != n);
        if !cp.pending_nodes.contains(n) {
            cp.pending_nodes.push(n.clone());
        }
    }
    if cp
        .last_failure
        .as_ref()
        .is_some_and(|f| nodes.contains(&f.node_id))
    {
        cp.last_failure = None;
    }
}

/// Pending nodes back in flow order (unknown ids last, as they were).
fn flow_order(automation: &AutomationV2Spec, run: &mut AutomationV2RunRecord) {
    let pos = |id: &String| {
        automation
            .flow
            .nodes
            .iter()
            .position(|n| &n.node_id == id)
            .unwrap_or(usize::MAX)
    };
    run.checkpoint.pending_nodes.sort_by_key(pos);
}

fn requeue(
    row: &mut AutomationV2RunRecord,
    fx: &mut Effects,
    automation: &AutomationV2Spec,
    event: &str,
    reason: Option<String>,
    meta: serde_json::Value,
    now: Millis,
) {
    row.status = AutomationRunStatus::Queued;
    row.checkpoint.awaiting_gate = None;
    row.stop_kind = None;
    row.stop_reason = None;
    row.pause_reason = None;
    row.detail = None;
    row.finished_at_ms = None;
    row.resume_reason = reason.clone();
    row.clear_execution_handles();
    flow_order(automation, row);
    crate::gate::refresh_runtime_state(automation, row);
    fx.lifecycle(row, event, reason, None, Some(meta), now);
}

fn normalize(reason: Option<&str>) -> Option<String> {
    reason
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
}

/// `POST /automations/v2/runs/{id}/recover`.
pub fn recover_run(
    run: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    reason: Option<&str>,
    now: Millis,
) -> Transition<OperatorOutcome> {
    use AutomationRunStatus as S;
    let previous = run.status;
    let recoverable = match previous {
        S::Paused | S::Failed | S::Blocked => true,
        S::Completed => !run.checkpoint.blocked_nodes.is_empty(),
        _ => false,
    };
    if !recoverable {
        return Transition::unchanged(OperatorOutcome::Refused {
            code: CODE_NOT_RECOVERABLE,
            status: previous,
        });
    }
    let reason = normalize(reason);
    update(run, now, |row, fx| {
        let broken: BTreeSet<String> = row
            .checkpoint
            .node_outputs
            .iter()
            .filter(|(_, v)| {
                matches!(
                    v.get("status").and_then(|s| s.as_str()),
                    Some("failed" | "blocked" | "needs_repair")
                )
            })
            .map(|(k, _)| k.clone())
            .collect();
        reset_nodes(row, &broken, false);
        row.checkpoint.last_failure = None;
        let event = if previous == S::Paused {
            "run_recovered_from_pause"
        } else {
            "run_recovered"
        };
        let reset: Vec<String> = broken.into_iter().collect();
        requeue(
            row,
            fx,
            automation,
            event,
            reason,
            json!({"previous_status": previous.as_str(), "reset_nodes": reset}),
            now,
        );
        OperatorOutcome::Requeued {
            previous,
            reset_nodes: reset,
        }
    })
}

/// `POST /automations/v2/runs/{id}/tasks/{node_id}/retry|requeue|continue`.
pub fn task_action(
    run: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    node_id: &str,
    action: TaskAction,
    reason: Option<&str>,
    now: Millis,
) -> Transition<OperatorOutcome> {
    use AutomationRunStatus as S;
    let previous = run.status;
    if matches!(previous, S::Running | S::Queued | S::Pausing) {
        return Transition::unchanged(OperatorOutcome::Refused {
            code: CODE_NOT_REQUEUEABLE,
            status: previous,
        });
    }
    if automation.node(node_id).is_none() {
        return Transition::unchanged(OperatorOutcome::NodeNotFound);
    }
    let roots = vec![node_id.to_owned()];
    let nodes: BTreeSet<String> = match action {
        TaskAction::Continue => roots.iter().cloned().collect(),
        TaskAction::Retry | TaskAction::Requeue => crate::graph::subtree(automation, &roots),
    };
    let reason = normalize(reason);
    update(run, now, |row, fx| {
        reset_nodes(row, &nodes, action == TaskAction::Requeue);
        let reset: Vec<String> = nodes.iter().cloned().collect();
        requeue(
            row,
            fx,
            automation,
            action.lifecycle_event(),
            reason,
            json!({"previous_status": previous.as_str(), "node_id": node_id, "reset_nodes": reset}),
            now,
        );
        OperatorOutcome::Requeued {
            previous,
            reset_nodes: reset,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AutomationFlowNode as N, ExecutionProfile};

    fn spec() -> AutomationV2Spec {
        AutomationV2Spec::new(
            "a",
            vec![
                N::task("x", &[]),
                N::task("y", &["x"]),
                N::task("z", &["y"]),
            ],
        )
    }

    fn done(run: &mut AutomationV2RunRecord, n: &str, status: &str) {
        run.checkpoint.pending_nodes.retain(|p| p != n);
        if status == "completed" {
            run.checkpoint.completed_nodes.push(n.into());
        }
        run.checkpoint
            .node_outputs
            .insert(n.into(), json!({"status": status}));
        run.checkpoint.node_attempts.insert(n.into(), 2);
    }

    fn run(status: AutomationRunStatus) -> AutomationV2RunRecord {
        let mut r = AutomationV2RunRecord::new_queued(
            "r".into(),
            &spec(),
            "manual",
            ExecutionProfile::Strict,
            1,
        );
        r.status = status;
        r
    }

    #[test]
    fn recover_resets_failed_nodes_and_requeues() {
        let mut r = run(AutomationRunStatus::Failed);
        done(&mut r, "x", "completed");
        done(&mut r, "y", "failed");
        r.finished_at_ms = Some(5);
        let t = recover_run(&mut r, &spec(), Some(" again "), 10);
        assert!(t.changed);
        assert_eq!(r.status, AutomationRunStatus::Queued);
        assert_eq!(r.checkpoint.pending_nodes, vec!["y", "z"]);
        assert_eq!(r.checkpoint.completed_nodes, vec!["x"]);
        assert!(!r.checkpoint.node_outputs.contains_key("y"));
        assert_eq!(r.finished_at_ms, None);
        assert_eq!(t.effects.lifecycle[0].event, "run_recovered");
        assert_eq!(r.resume_reason.as_deref(), Some("again"));
    }

    #[test]
    fn recover_refuses_running_and_plain_completed() {
        for s in [AutomationRunStatus::Running, AutomationRunStatus::Completed] {
            let mut r = run(s);
            let t = recover_run(&mut r, &spec(), None, 10);
            assert!(!t.changed);
            assert!(matches!(
                t.outcome,
                OperatorOutcome::Refused {
                    code: CODE_NOT_RECOVERABLE,
                    ..
                }
            ));
        }
        let mut r = run(AutomationRunStatus::Paused);
        let t = recover_run(&mut r, &spec(), None, 10);
        assert_eq!(t.effects.lifecycle[0].event, "run_recovered_from_pause");
    }

    #[test]
    fn task_actions_reset_what_they_say() {
        let s = spec();
        let mut base = run(AutomationRunStatus::Cancelled);
        for n in ["x", "y", "z"] {
            done(&mut base, n, "completed");
        }
        let mut r = base.clone();
        let t = task_action(&mut r, &s, "y", TaskAction::Retry, None, 10);
        assert_eq!(t.effects.lifecycle[0].event, "run_task_retried");
        assert_eq!(r.checkpoint.pending_nodes, vec!["y", "z"]);
        assert!(!r.checkpoint.node_attempts.contains_key("y"));
        let mut r = base.clone();
        task_action(&mut r, &s, "y", TaskAction::Requeue, None, 10);
        assert_eq!(r.checkpoint.node_attempts.get("y"), Some(&2));
        assert_eq!(r.checkpoint.pending_nodes, vec!["y", "z"]);
        let mut r = base.clone();
        task_action(&mut r, &s, "y", TaskAction::Continue, None, 10);
        assert_eq!(r.checkpoint.pending_nodes, vec!["y"]);
        assert!(r.checkpoint.completed_nodes.contains(&"z".to_owned()));
        let mut r = base.clone();
        let t = task_action(&mut r, &s, "nope", TaskAction::Retry, None, 10);
        assert_eq!(t.outcome, OperatorOutcome::NodeNotFound);
        let mut r = run(AutomationRunStatus::Running);
        let t = task_action(&mut r, &s, "x", TaskAction::Retry, None, 10);
        assert!(!t.changed);
    }
}
