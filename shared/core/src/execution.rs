//! Execution transitions (spec §2.2, §3.4, §4.1; DESIGN §3.3): what the scheduler does to a
//! claimed run between the claim and a terminal or waiting status. Dispatch of node attempts to
//! workers, application of their results (fenced), retries and repair, budget guardrails,
//! terminal derivation, pausing settlement, and the operator pause / resume / cancel actions.
//!
//! Every function is pure: the caller locks the row, passes the database's `now` and the row's
//! `lease_epoch` column, and persists the run with the returned [`Effects`] in one transaction
//! (the store bumps the epoch whenever the run enters or leaves `running`/`pausing`).
//!
//! # In flight
//!
//! A node attempt is *in flight* when its `node_started` lifecycle record (metadata
//! `{node_id, attempt, lease_epoch}`) is not yet followed by one of
//! [`NODE_SETTLED_EVENTS`] for that node (the reaper's rule, [`in_progress_node_ids`]) **and**
//! was dispatched under the current lease epoch ([`in_flight_nodes`]). Attempts dispatched
//! under an earlier claim (the run was paused, reaped, failed or cancelled and later resumed,
//! recovered or requeued) can never report again (their results are fenced by epoch); they are
//! *orphans*, and the node is simply dispatched again with the next attempt number.
//!
//! # Lifecycle of a run under the scheduler
//!
//! [`dispatch_ready_nodes`], in order, on a `running` or `pausing` run:
//! 1. `blocked_nodes` is refreshed: pending nodes waiting on an incomplete dependency
//!    (upstream `refresh_automation_runtime_state`, [`gate::blocked_nodes`]) plus nodes a worker
//!    reported `blocked`.
//! 2. every flow node completed → `completed` (`automation run completed`, case 11);
//! 3. a node that cannot go on (a worker reported `blocked`, or a runnable task node has used
//!    all its attempts) → nothing new is started; once nothing is in flight the run ends
//!    `failed` (some node exhausted its attempts) or else `blocked`;
//! 4. `pausing` → nothing is started; once nothing is in flight the run settles to `paused`;
//! 5. a budget guardrail reached → `paused` (`guardrail_stopped`), in-flight tasks cancelled;
//! 6. every runnable task node that is not in flight is dispatched (bounded by
//!    `execution.max_parallel_agents`);
//! 7. nothing in flight and only approval nodes runnable → [`gate::open_gate`];
//! 8. nothing runnable, nothing in flight, not complete → `blocked` (the flow cannot progress).
//!
//! [`apply_task_result`] applies one fenced result and then runs [`dispatch_ready_nodes`] in the
//! same transition, so retries, the next nodes, gates, terminal status and pausing settlement
//! are decided atomically with the result.
//!
//! # Names
//!
//! Upstream names are kept: `node_started`, `node_completed`, `node_repair_requested`,
//! `node_failed`, `node_blocked` (spec §3.7), `run_pause_requested`, `run_paused`, `run_resumed`,
//! `run_stopped` (spec §2.2, §3.14), the 409 codes `AUTOMATION_V2_RUN_NOT_PAUSABLE` and
//! `AUTOMATION_V2_RUN_NOT_PAUSED`, the detail `automation run completed` (case 11) and the event
//! `automation_v2.run.failed`. Spec §2.2 calls the executor's terminal records "various"; the
//! names used here are ours: [`LIFECYCLE_RUN_COMPLETED`], [`LIFECYCLE_RUN_FAILED`],
//! [`LIFECYCLE_RUN_BLOCKED`], and the event [`EVENT_RUN_COMPLETED`].

use crate::config::GatePolicyDefaults;
use crate::effects::{Effects, Transition, update};
use crate::gate::{self, OpenGateOutcome};
use crate::graph::{self, node_max_attempts};
use crate::model::{
    AutomationFailureRecord, AutomationFlowNode, AutomationRunStatus, AutomationStopKind,
    AutomationV2RunRecord, AutomationV2Spec, Millis,
};
use crate::protocol::{DEFAULT_TASK_QUEUE, TaskMessage, TaskResult, TaskStatus};
use crate::sweeps::{
    EVENT_RUN_FAILED, NODE_STARTED, in_progress_node_ids, run_failed_event_properties,
};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

// ---------------------------------------------------------------------------------------------
// Names and strings
// ---------------------------------------------------------------------------------------------

/// Node settled: the worker reported `completed` (spec §3.7).
pub const LIFECYCLE_NODE_COMPLETED: &str = "node_completed";
/// Node settled: the worker reported `needs_repair` (spec §3.7).
pub const LIFECYCLE_NODE_REPAIR_REQUESTED: &str = "node_repair_requested";
/// Node settled: the worker reported `failed` (spec §3.7).
pub const LIFECYCLE_NODE_FAILED: &str = "node_failed";
/// Node settled: the worker reported `blocked` (spec §3.7).
pub const LIFECYCLE_NODE_BLOCKED: &str = "node_blocked";
/// Operator pause requested (spec §2.2).
pub const LIFECYCLE_RUN_PAUSE_REQUESTED: &str = "run_pause_requested";
/// Run paused: operator pause settled, or the executor budget guardrail (spec §2.2).
pub const LIFECYCLE_RUN_PAUSED: &str = "run_paused";
/// Operator resume (spec §2.2).
pub const LIFECYCLE_RUN_RESUMED: &str = "run_resumed";
/// Operator cancel (spec §2.2).
pub const LIFECYCLE_RUN_STOPPED: &str = "run_stopped";
/// Fleet name (spec §2.2 says "various"): the run completed.
pub const LIFECYCLE_RUN_COMPLETED: &str = "run_completed";
/// Fleet name (spec §2.2 says "various"): the run failed because a node used all its attempts.
pub const LIFECYCLE_RUN_FAILED: &str = "run_failed";
/// Fleet name (spec §2.2 says "various"): the run cannot progress (a node is blocked).
pub const LIFECYCLE_RUN_BLOCKED: &str = "run_blocked";

/// Run status event of a completed run (DESIGN §3.2 "run status events"; upstream has none).
pub const EVENT_RUN_COMPLETED: &str = "automation_v2.run.completed";

/// Detail of a completed run (spec §6 case 11).
pub const COMPLETED_DETAIL: &str = "automation run completed";
/// Detail and default `stop_reason` of an operator cancel.
pub const OPERATOR_CANCELLED_DETAIL: &str = "automation run cancelled by operator";
/// Detail of an operator-paused run (followed by `: {reason}` when one was given).
pub const OPERATOR_PAUSED_DETAIL: &str = "automation run paused by operator";
/// Detail of a run waiting for in-flight attempts before it settles to `paused`.
pub const PAUSING_DETAIL: &str = "automation run pausing; waiting for in-flight nodes to finish";

/// 409 of `POST /automations/v2/runs/{id}/pause` (spec §2.2).
pub const CODE_NOT_PAUSABLE: &str = "AUTOMATION_V2_RUN_NOT_PAUSABLE";
/// 409 of `POST /automations/v2/runs/{id}/resume` (spec §2.2).
pub const CODE_NOT_PAUSED: &str = "AUTOMATION_V2_RUN_NOT_PAUSED";

/// `failure_kind` written on a node output when the node used all its attempts (the reaper's
/// terminal convention, spec §3.7).
pub const FAILURE_KIND_RUN_FAILED: &str = "run_failed";

// ---------------------------------------------------------------------------------------------
// In-flight bookkeeping
// ---------------------------------------------------------------------------------------------

/// One node attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAttempt {
    pub node_id: String,
    pub attempt: u32,
}

/// Node attempts in flight under `lease_epoch` (see the module docs), sorted by node id. A
/// subset of [`in_progress_node_ids`], which also lists orphans of earlier claims.
pub fn in_flight_nodes(run: &AutomationV2RunRecord, lease_epoch: i64) -> Vec<NodeAttempt> {
    crate::sweeps::unsettled_node_starts(run)
        .into_iter()
        .filter_map(|(node_id, start)| {
            (start.lease_epoch == Some(lease_epoch)).then(|| NodeAttempt {
                node_id,
                attempt: start.attempt.unwrap_or(0),
            })
        })
        .collect()
}

/// Why a task result (or progress report) is not applied. Dropped results change nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// The result names another run (a routing bug; never applied).
    RunMismatch,
    /// The run is not `running` or `pausing` (paused, cancelled, failed, awaiting approval...).
    RunNotActive { status: AutomationRunStatus },
    /// Sent under an earlier (or unknown) claim of the run.
    StaleEpoch { current: i64, got: i64 },
    /// The node is not in the flow.
    UnknownNode,
    /// Not the node's current attempt (a late retry result or a duplicate of one).
    StaleAttempt { current: u32, got: u32 },
    /// The attempt is current but not in flight: already settled (a duplicate delivery) or
    /// never dispatched.
    NotInFlight,
}

impl DropReason {
    /// Stable label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::RunMismatch => "run_mismatch",
            Self::RunNotActive { .. } => "run_not_active",
            Self::StaleEpoch { .. } => "stale_epoch",
            Self::UnknownNode => "unknown_node",
            Self::StaleAttempt { .. } => "stale_attempt",
            Self::NotInFlight => "not_in_flight",
        }
    }
}

/// The fence every worker report passes before it may touch a run (DESIGN §3.3): the run is
/// `running`/`pausing`, `lease_epoch` is the row's current epoch, the node is in the flow,
/// `attempt` is the node's current attempt and that attempt is in flight under this epoch.
/// Checked in that order; the first failing check is the reason. Also usable for progress
/// reports ([`crate::protocol::TaskProgress`]) before touching the activity column.
pub fn check_task_fence(
    run: &AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    run_id: &str,
    node_id: &str,
    attempt: u32,
    lease_epoch: i64,
    current_lease_epoch: i64,
) -> Result<(), DropReason> {
    if run_id != run.run_id {
        return Err(DropReason::RunMismatch);
    }
    if !matches!(
        run.status,
        AutomationRunStatus::Running | AutomationRunStatus::Pausing
    ) {
        return Err(DropReason::RunNotActive { status: run.status });
    }
    if lease_epoch != current_lease_epoch {
        return Err(DropReason::StaleEpoch {
            current: current_lease_epoch,
            got: lease_epoch,
        });
    }
    if automation.node(node_id).is_none() {
        return Err(DropReason::UnknownNode);
    }
    let current = run.checkpoint.attempts(node_id);
    if attempt != current {
        return Err(DropReason::StaleAttempt {
            current,
            got: attempt,
        });
    }
    let in_flight = in_flight_nodes(run, current_lease_epoch)
        .into_iter()
        .any(|a| a.node_id == node_id && a.attempt == attempt);
    if !in_flight {
        return Err(DropReason::NotInFlight);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Budget guardrails
// ---------------------------------------------------------------------------------------------

/// A budget guardrail of `automation.execution` that the run has reached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GuardrailBreach {
    /// `max_total_tokens`: `total_tokens >= max`.
    Tokens { used: u64, max: u64 },
    /// `max_total_cost_usd`: `estimated_cost_usd >= max`.
    CostUsd { used: f64, max: f64 },
    /// `max_total_runtime_ms`: `now - started_at_ms >= max`.
    RuntimeMs { elapsed_ms: u64, max: u64 },
}

impl GuardrailBreach {
    /// The policy field that was reached.
    pub fn limit_name(&self) -> &'static str {
        match self {
            Self::Tokens { .. } => "max_total_tokens",
            Self::CostUsd { .. } => "max_total_cost_usd",
            Self::RuntimeMs { .. } => "max_total_runtime_ms",
        }
    }

    /// `pause_reason`, `detail` and `stop_reason` of the guardrail pause.
    pub fn detail(&self) -> String {
        let name = self.limit_name();
        match self {
            Self::Tokens { used, max } => format!(
                "automation run paused: {name} guardrail reached ({used} tokens used, limit {max})"
            ),
            Self::CostUsd { used, max } => format!(
                "automation run paused: {name} guardrail reached (${used} spent, limit ${max})"
            ),
            Self::RuntimeMs { elapsed_ms, max } => format!(
                "automation run paused: {name} guardrail reached ({elapsed_ms} ms elapsed, limit {max} ms)"
            ),
        }
    }

    fn metadata(&self) -> Value {
        let (observed, limit) = match *self {
            Self::Tokens { used, max } => (json!(used), json!(max)),
            Self::CostUsd { used, max } => (json!(used), json!(max)),
            Self::RuntimeMs { elapsed_ms, max } => (json!(elapsed_ms), json!(max)),
        };
        json!({ "guardrail": self.limit_name(), "observed": observed, "limit": limit })
    }
}

/// The first budget guardrail (tokens, cost, runtime) the run has reached, if any. A limit of 0
/// (or a non-positive / non-finite cost) means "no limit"; `max_total_tool_calls` is not
/// enforced (workers report no tool-call count). Runtime is measured from `started_at_ms`, so
/// time spent paused or awaiting approval counts, as upstream.
pub fn guardrail_breach(
    run: &AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    now: Millis,
) -> Option<GuardrailBreach> {
    let policy = automation.execution.as_ref()?;
    if let Some(max) = policy.max_total_tokens.filter(|m| *m > 0)
        && run.total_tokens >= max
    {
        return Some(GuardrailBreach::Tokens {
            used: run.total_tokens,
            max,
        });
    }
    if let Some(max) = policy
        .max_total_cost_usd
        .filter(|m| m.is_finite() && *m > 0.0)
        && run.estimated_cost_usd >= max
    {
        return Some(GuardrailBreach::CostUsd {
            used: run.estimated_cost_usd,
            max,
        });
    }
    if let (Some(max), Some(started)) = (
        policy.max_total_runtime_ms.filter(|m| *m > 0),
        run.started_at_ms,
    ) {
        let elapsed_ms = now.saturating_sub(started);
        if elapsed_ms >= max {
            return Some(GuardrailBreach::RuntimeMs { elapsed_ms, max });
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

/// What [`dispatch_ready_nodes`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum DispatchOutcome {
    /// The run is not `running` or `pausing`: nothing to do.
    NotActive { status: AutomationRunStatus },
    /// These attempts were dispatched (their [`TaskMessage`]s are in `effects.tasks`);
    /// `in_flight` lists every attempt in flight now, the new ones included.
    Dispatched {
        dispatched: Vec<NodeAttempt>,
        in_flight: Vec<NodeAttempt>,
    },
    /// Nothing new to start (in flight, throttled by `max_parallel_agents`, or `pausing`):
    /// waiting for these attempts.
    Waiting { in_flight: Vec<NodeAttempt> },
    /// A node cannot go on (`failed`: used all its attempts, else blocked by its worker): no new
    /// work starts, and the run ends once these attempts settle.
    Draining {
        node_id: String,
        in_flight: Vec<NodeAttempt>,
    },
    /// Every flow node completed: the run is `completed`.
    Completed,
    /// The run failed: `node_id` used all its attempts.
    Failed { node_id: String },
    /// The run is `blocked`: these nodes were blocked by their worker, or (nothing blocked)
    /// these incomplete nodes can never become runnable.
    Blocked { node_ids: Vec<String> },
    /// A `pausing` run had nothing left in flight: it is `paused`.
    Paused,
    /// A budget guardrail was reached: the run is `paused` (`guardrail_stopped`).
    GuardrailPaused(GuardrailBreach),
    /// Only approval nodes were runnable: the run awaits approval on this gate.
    GateOpened { node_id: String },
    /// The gate candidate has no gate config: the run failed (spec §4.1).
    GateConfigMissing { node_id: String },
}

/// Why a run cannot go on.
enum Halt {
    /// This node used all its attempts.
    Exhausted(String),
    /// These nodes were reported blocked by their worker.
    Blocked(Vec<String>),
}

enum Step {
    Done(DispatchOutcome),
    OpenGate,
}

/// The scheduler's planning step for a `running` or `pausing` run; see the module docs for the
/// order of decisions. Dispatches every runnable task node not in flight: `node_attempts + 1`, a
/// `node_started` record (metadata `{node_id, attempt, lease_epoch}`) and a [`TaskMessage`]
/// (queue `node.metadata.worker.queue` else [`DEFAULT_TASK_QUEUE`]; upstream outputs of its
/// `depends_on`; `repair_context` = its output when that is `needs_repair`; `deadline_at_ms` =
/// `now + timeout_ms` when positive). The detail becomes ``running node `{id}` attempt {n}``
/// (the first node dispatched), upstream's format (case 4).
///
/// `automation` is the definition being executed; pass the run's snapshot when it has one
/// ([`crate::claim::claim_automation`]): `pending_nodes` was built from it. Calling this when
/// nothing is due is a no-op, so the scheduler may call it on a timer (to enforce
/// `max_total_runtime_ms` while attempts run).
pub fn dispatch_ready_nodes(
    run: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    lease_epoch: i64,
    defaults: &GatePolicyDefaults,
    now: Millis,
) -> Transition<DispatchOutcome> {
    if !matches!(
        run.status,
        AutomationRunStatus::Running | AutomationRunStatus::Pausing
    ) {
        return Transition::unchanged(DispatchOutcome::NotActive { status: run.status });
    }
    let planned = update(run, now, |row, fx| {
        plan(row, automation, lease_epoch, now, fx)
    });
    match planned.outcome {
        Step::Done(outcome) => Transition {
            outcome,
            changed: planned.changed,
            effects: planned.effects,
        },
        Step::OpenGate => {
            let first = Transition {
                outcome: (),
                changed: planned.changed,
                effects: planned.effects,
            };
            let mut opened = gate::open_gate(run, automation, defaults, now);
            let outcome = match std::mem::replace(&mut opened.outcome, OpenGateOutcome::NoGate) {
                OpenGateOutcome::Opened(g) => DispatchOutcome::GateOpened { node_id: g.node_id },
                OpenGateOutcome::MissingGateConfig { node_id } => {
                    // open_gate fails the run (detail only, as upstream); announce it like
                    // every other failure.
                    if let Some(props) = run_failed_event_properties(run, Some(automation)) {
                        opened
                            .effects
                            .event(run, EVENT_RUN_FAILED, Some(&node_id), props, None);
                    }
                    DispatchOutcome::GateConfigMissing { node_id }
                }
                // Unreachable: `plan` saw a candidate on the same row.
                OpenGateOutcome::NoGate => DispatchOutcome::Waiting {
                    in_flight: Vec::new(),
                },
            };
            let ((), merged) = chain(first, opened);
            Transition {
                outcome,
                changed: merged.changed,
                effects: merged.effects,
            }
        }
    }
}

fn plan(
    row: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    lease_epoch: i64,
    now: Millis,
    fx: &mut Effects,
) -> Step {
    let in_flight = in_flight_nodes(row, lease_epoch);
    let flying: BTreeSet<&str> = in_flight.iter().map(|a| a.node_id.as_str()).collect();

    // 1. Runtime state.
    row.checkpoint.blocked_nodes = derived_blocked_nodes(automation, row);

    // 2. Completion.
    if automation
        .flow
        .nodes
        .iter()
        .all(|n| row.checkpoint.is_completed(&n.node_id))
    {
        complete(row, automation, now, fx);
        return Step::Done(DispatchOutcome::Completed);
    }

    // 3. A node that cannot go on: drain, then end.
    let runnable: Vec<&AutomationFlowNode> = graph::runnable_nodes(automation, &row.checkpoint);
    let exhausted: Vec<&AutomationFlowNode> = runnable
        .iter()
        .copied()
        .filter(|n| !n.is_approval() && !flying.contains(n.node_id.as_str()))
        .filter(|n| row.checkpoint.attempts(&n.node_id) >= node_max_attempts(n))
        .collect();
    for node in &exhausted {
        mark_exhausted(row, node);
    }
    let halt = if let Some(node) = exhausted
        .iter()
        .find(|n| {
            row.checkpoint
                .last_failure
                .as_ref()
                .is_some_and(|f| f.node_id == n.node_id)
        })
        .or(exhausted.first())
    {
        Some(Halt::Exhausted(node.node_id.clone()))
    } else {
        let blocked = worker_blocked_nodes(automation, row);
        (!blocked.is_empty()).then_some(Halt::Blocked(blocked))
    };
    if let Some(halt) = halt {
        if !in_flight.is_empty() {
            let (node_id, what) = match &halt {
                Halt::Exhausted(id) => (id.clone(), "failed"),
                Halt::Blocked(ids) => (ids.first().cloned().unwrap_or_default(), "is blocked"),
            };
            row.detail = Some(format!(
                "node `{node_id}` {what}; waiting for in-flight nodes to finish before ending the run"
            ));
            return Step::Done(DispatchOutcome::Draining { node_id, in_flight });
        }
        return Step::Done(match halt {
            Halt::Exhausted(node_id) => {
                fail_run(row, automation, &node_id, now, fx);
                DispatchOutcome::Failed { node_id }
            }
            Halt::Blocked(node_ids) => {
                block_run(row, automation, &node_ids, true, now, fx);
                DispatchOutcome::Blocked { node_ids }
            }
        });
    }

    // 4. Pausing: start nothing, settle once drained.
    if row.status == AutomationRunStatus::Pausing {
        if !in_flight.is_empty() {
            return Step::Done(DispatchOutcome::Waiting { in_flight });
        }
        row.status = AutomationRunStatus::Paused;
        let reason = row.pause_reason.clone();
        row.detail = Some(operator_paused_detail(reason.as_deref()));
        let stop_kind = row.stop_kind;
        fx.lifecycle(row, LIFECYCLE_RUN_PAUSED, reason, stop_kind, None, now);
        return Step::Done(DispatchOutcome::Paused);
    }

    // 5. Budget guardrails.
    if let Some(breach) = guardrail_breach(row, automation, now) {
        let detail = breach.detail();
        row.status = AutomationRunStatus::Paused;
        row.stop_kind = Some(AutomationStopKind::GuardrailStopped);
        row.pause_reason = Some(detail.clone());
        row.detail = Some(detail.clone());
        row.stop_reason = Some(detail.clone());
        fx.lifecycle(
            row,
            LIFECYCLE_RUN_PAUSED,
            Some(detail),
            Some(AutomationStopKind::GuardrailStopped),
            Some(breach.metadata()),
            now,
        );
        if !in_flight.is_empty() {
            fx.cancel_tasks_of.push(row.run_id.clone());
        }
        return Step::Done(DispatchOutcome::GuardrailPaused(breach));
    }

    // 6. Dispatch.
    let slots = automation
        .execution
        .as_ref()
        .and_then(|e| e.max_parallel_agents)
        .filter(|m| *m > 0)
        .map_or(usize::MAX, |m| (m as usize).saturating_sub(in_flight.len()));
    let ready: Vec<&AutomationFlowNode> = runnable
        .iter()
        .copied()
        .filter(|n| !n.is_approval() && !flying.contains(n.node_id.as_str()))
        .take(slots)
        .collect();
    if !ready.is_empty() {
        let mut dispatched = Vec::with_capacity(ready.len());
        for node in ready {
            dispatched.push(dispatch_node(row, node, lease_epoch, now, fx));
        }
        if let Some(first) = dispatched.first() {
            row.detail = Some(format!(
                "running node `{}` attempt {}",
                first.node_id, first.attempt
            ));
        }
        let mut all = in_flight;
        all.extend(dispatched.iter().cloned());
        all.sort();
        return Step::Done(DispatchOutcome::Dispatched {
            dispatched,
            in_flight: all,
        });
    }
    if !in_flight.is_empty() {
        return Step::Done(DispatchOutcome::Waiting { in_flight });
    }

    // 7. Gate.
    if graph::gate_candidate(automation, &row.checkpoint).is_some() {
        return Step::OpenGate;
    }

    // 8. Nothing can ever run.
    let stuck: Vec<String> = automation
        .flow
        .nodes
        .iter()
        .filter(|n| !row.checkpoint.is_completed(&n.node_id))
        .map(|n| n.node_id.clone())
        .collect();
    block_run(row, automation, &stuck, false, now, fx);
    Step::Done(DispatchOutcome::Blocked { node_ids: stuck })
}

/// Pending nodes (flow order) that wait on an incomplete dependency ([`gate::blocked_nodes`],
/// upstream `automation_blocked_nodes`) or that their worker reported `blocked`.
fn derived_blocked_nodes(
    automation: &AutomationV2Spec,
    run: &AutomationV2RunRecord,
) -> Vec<String> {
    let waiting: BTreeSet<String> = gate::blocked_nodes(automation, run).into_iter().collect();
    automation
        .flow
        .nodes
        .iter()
        .filter(|n| waiting.contains(&n.node_id) || is_worker_blocked(run, n))
        .map(|n| n.node_id.clone())
        .collect()
}

fn is_worker_blocked(run: &AutomationV2RunRecord, node: &AutomationFlowNode) -> bool {
    let cp = &run.checkpoint;
    cp.is_pending(&node.node_id)
        && !cp.is_completed(&node.node_id)
        && cp.output_status(&node.node_id).as_deref() == Some(TaskStatus::Blocked.as_str())
}

fn worker_blocked_nodes(automation: &AutomationV2Spec, run: &AutomationV2RunRecord) -> Vec<String> {
    automation
        .flow
        .nodes
        .iter()
        .filter(|n| is_worker_blocked(run, n))
        .map(|n| n.node_id.clone())
        .collect()
}

/// The queue of a node's tasks: `metadata.worker.queue` (trimmed, non-empty), else
/// [`DEFAULT_TASK_QUEUE`].
pub fn task_queue(node: &AutomationFlowNode) -> String {
    node.metadata_at("/worker/queue")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .unwrap_or(DEFAULT_TASK_QUEUE)
        .to_owned()
}

fn dispatch_node(
    row: &mut AutomationV2RunRecord,
    node: &AutomationFlowNode,
    lease_epoch: i64,
    now: Millis,
    fx: &mut Effects,
) -> NodeAttempt {
    let id = node.node_id.clone();
    let attempt = row.checkpoint.attempts(&id).saturating_add(1);
    row.checkpoint.node_attempts.insert(id.clone(), attempt);
    let upstream_outputs: BTreeMap<String, Value> = node
        .depends_on
        .iter()
        .filter_map(|d| {
            row.checkpoint
                .node_outputs
                .get(d)
                .map(|o| (d.clone(), o.clone()))
        })
        .collect();
    let repair_context = (row.checkpoint.output_status(&id).as_deref()
        == Some(TaskStatus::NeedsRepair.as_str()))
    .then(|| row.checkpoint.node_outputs.get(&id).cloned())
    .flatten();
    fx.lifecycle(
        row,
        NODE_STARTED,
        None,
        None,
        Some(json!({ "node_id": id, "attempt": attempt, "lease_epoch": lease_epoch })),
        now,
    );
    fx.tasks.push(TaskMessage {
        run_id: row.run_id.clone(),
        node_id: id.clone(),
        attempt,
        lease_epoch,
        automation_id: row.automation_id.clone(),
        tenant_context: row.tenant_context.clone(),
        queue: task_queue(node),
        agent_id: node.agent_id.clone(),
        objective: node.objective.clone(),
        metadata: node.metadata.clone(),
        upstream_outputs,
        repair_context,
        deadline_at_ms: node
            .timeout_ms
            .filter(|t| *t > 0)
            .map(|t| now.saturating_add(t)),
        dispatched_at_ms: now,
    });
    NodeAttempt {
        node_id: id,
        attempt,
    }
}

/// The first non-blank string among the output's `blocked_reason`, `reason`, `error`, `summary`.
fn output_reason(output: Option<&Value>) -> Option<String> {
    let output = output?;
    ["blocked_reason", "reason", "error", "summary"]
        .iter()
        .filter_map(|k| output.get(*k).and_then(Value::as_str))
        .map(str::trim)
        .find(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A node that used all its attempts: its output says `failed` (with `failure_kind`
/// `run_failed` unless the worker gave one), as the reaper marks terminal nodes.
fn mark_exhausted(row: &mut AutomationV2RunRecord, node: &AutomationFlowNode) {
    let id = &node.node_id;
    let attempts = row.checkpoint.attempts(id);
    let mut output = match row.checkpoint.node_outputs.get(id) {
        Some(Value::Object(m)) => m.clone(),
        Some(Value::Null) | None => {
            let mut m = serde_json::Map::new();
            m.insert(
                "summary".into(),
                json!(format!(
                    "Node `{id}` produced no result in {attempts} attempt(s)."
                )),
            );
            m
        }
        Some(other) => {
            let mut m = serde_json::Map::new();
            m.insert("content".into(), other.clone());
            m
        }
    };
    output.insert("status".into(), json!(TaskStatus::Failed.as_str()));
    output
        .entry("failure_kind")
        .or_insert_with(|| json!(FAILURE_KIND_RUN_FAILED));
    row.checkpoint
        .node_outputs
        .insert(id.clone(), Value::Object(output));
}

fn complete(
    row: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    now: Millis,
    fx: &mut Effects,
) {
    row.status = AutomationRunStatus::Completed;
    row.detail = Some(COMPLETED_DETAIL.into());
    fx.lifecycle(
        row,
        LIFECYCLE_RUN_COMPLETED,
        Some(COMPLETED_DETAIL.into()),
        None,
        Some(json!({ "completed_nodes": row.checkpoint.completed_nodes.len() })),
        now,
    );
    let props = run_completed_event_properties(row, automation, now);
    fx.event(row, EVENT_RUN_COMPLETED, None, props, None);
}

/// Properties of [`EVENT_RUN_COMPLETED`], in the style of the §3.7 run events.
pub fn run_completed_event_properties(
    run: &AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    now: Millis,
) -> Value {
    json!({
        "automation_id": run.automation_id,
        "automationID": run.automation_id,
        "workflow_id": run.automation_id,
        "workflowID": run.automation_id,
        "workflow_name": automation.name,
        "run_id": run.run_id,
        "runID": run.run_id,
        "source": "automation_v2",
        "component": "automation_v2",
        "status": AutomationRunStatus::Completed.as_str(),
        "reason": run.detail,
        "detail": run.detail,
        "completed_nodes": run.checkpoint.completed_nodes,
        "started_at_ms": run.started_at_ms,
        "finished_at_ms": run.finished_at_ms.unwrap_or(now),
        "prompt_tokens": run.prompt_tokens,
        "completion_tokens": run.completion_tokens,
        "total_tokens": run.total_tokens,
        "estimated_cost_usd": run.estimated_cost_usd,
        "effective_execution_profile": run.effective_execution_profile.as_str(),
        "tenantContext": run.tenant_context.to_value(),
    })
}

/// Points `last_failure` at `node_id` with `reason`, unless it already says exactly that (the
/// original time is kept).
fn record_failure(row: &mut AutomationV2RunRecord, node_id: &str, reason: &str, now: Millis) {
    if row
        .checkpoint
        .last_failure
        .as_ref()
        .is_some_and(|f| f.node_id == node_id && f.reason == reason)
    {
        return;
    }
    row.checkpoint.last_failure = Some(AutomationFailureRecord {
        node_id: node_id.into(),
        reason: reason.into(),
        failed_at_ms: now,
    });
}

fn fail_run(
    row: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    node_id: &str,
    now: Millis,
    fx: &mut Effects,
) {
    let attempts = row.checkpoint.attempts(node_id);
    let max = automation.node(node_id).map(node_max_attempts).unwrap_or(1);
    let reason = output_reason(row.checkpoint.node_outputs.get(node_id))
        .or_else(|| {
            row.checkpoint
                .last_failure
                .as_ref()
                .filter(|f| f.node_id == node_id)
                .map(|f| f.reason.clone())
        })
        .unwrap_or_else(|| format!("node `{node_id}` failed"));
    let detail = format!(
        "automation run failed: node `{node_id}` failed after {attempts} attempt(s): {reason}"
    );
    record_failure(row, node_id, &reason, now);
    row.status = AutomationRunStatus::Failed;
    row.detail = Some(detail.clone());
    fx.lifecycle(
        row,
        LIFECYCLE_RUN_FAILED,
        Some(detail),
        None,
        Some(json!({ "node_id": node_id, "attempt": attempts, "max_attempts": max })),
        now,
    );
    if let Some(props) = run_failed_event_properties(row, Some(automation)) {
        fx.event(row, EVENT_RUN_FAILED, Some(node_id), props, None);
    }
}

/// `by_worker`: the nodes were reported blocked by their worker; otherwise they are the
/// incomplete nodes of a flow that cannot progress.
fn block_run(
    row: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    node_ids: &[String],
    by_worker: bool,
    now: Millis,
    fx: &mut Effects,
) {
    let first = node_ids.first().cloned().unwrap_or_default();
    let (reason, detail) = if by_worker {
        let reason = output_reason(row.checkpoint.node_outputs.get(&first))
            .unwrap_or_else(|| format!("node `{first}` is blocked"));
        let detail = format!("automation run blocked: node `{first}` is blocked: {reason}");
        (reason, detail)
    } else {
        let reason = format!(
            "no runnable node remains; incomplete: {}",
            node_ids.join(", ")
        );
        (reason.clone(), format!("automation run blocked: {reason}"))
    };
    if !first.is_empty() {
        record_failure(row, &first, &reason, now);
    }
    row.status = AutomationRunStatus::Blocked;
    row.detail = Some(detail.clone());
    fx.lifecycle(
        row,
        LIFECYCLE_RUN_BLOCKED,
        Some(detail),
        None,
        Some(json!({ "node_ids": node_ids, "blocked_by_worker": by_worker })),
        now,
    );
    if let Some(props) = run_failed_event_properties(row, Some(automation)) {
        let node = (!first.is_empty()).then_some(first.as_str());
        fx.event(row, EVENT_RUN_FAILED, node, props, None);
    }
}

fn operator_paused_detail(reason: Option<&str>) -> String {
    match reason {
        Some(r) => format!("{OPERATOR_PAUSED_DETAIL}: {r}"),
        None => OPERATOR_PAUSED_DETAIL.into(),
    }
}

/// Appends `second`'s effects to `first`'s; the result is changed if either was.
fn chain<A, B>(first: Transition<A>, second: Transition<B>) -> (A, Transition<B>) {
    let mut effects = first.effects;
    effects.lifecycle.extend(second.effects.lifecycle);
    effects.audit.extend(second.effects.audit);
    effects.events.extend(second.effects.events);
    effects.tasks.extend(second.effects.tasks);
    for run_id in second.effects.cancel_tasks_of {
        if !effects.cancel_tasks_of.contains(&run_id) {
            effects.cancel_tasks_of.push(run_id);
        }
    }
    (
        first.outcome,
        Transition {
            outcome: second.outcome,
            changed: first.changed || second.changed,
            effects,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// What [`apply_task_result`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultOutcome {
    /// Fenced out: nothing changed (`changed == false`, no effects).
    Dropped { reason: DropReason },
    /// Applied; `next` is what the follow-up [`dispatch_ready_nodes`] did.
    Applied {
        node_id: String,
        attempt: u32,
        status: TaskStatus,
        next: DispatchOutcome,
    },
}

/// Applies one worker result to the locked run, then runs [`dispatch_ready_nodes`] in the same
/// transition.
///
/// Fenced by [`check_task_fence`]: a result that fails it is [`ResultOutcome::Dropped`] and
/// changes nothing, so a redelivered result (same attempt twice) is applied once. Otherwise:
/// * usage is added: `prompt_tokens`, `completion_tokens`, `total_tokens` (their sum) and
///   `estimated_cost_usd` (a negative or non-finite cost is ignored), all saturating;
/// * the output is stored in `node_outputs` with `status` set to the reported status (a
///   non-object output is kept under `content`);
/// * `completed`: the node moves from `pending_nodes` to `completed_nodes`, `node_completed`;
/// * `needs_repair`: `node_repair_requested`; the node is dispatched again with the output as
///   `repair_context` while attempts remain (`graph::node_max_attempts`), else the run fails;
/// * `failed`: `node_failed`, `last_failure = {node_id, reason, now}`; retried while attempts
///   remain, else the run fails (`automation_v2.run.failed`, detail naming the node);
/// * `blocked`: `node_blocked`, the node joins `blocked_nodes`; the run ends `blocked`.
///
/// The node lifecycle records carry the reason (output `blocked_reason|reason|error|summary`)
/// and metadata `{node_id, attempt, status}`. A node that cannot go on stops new dispatches;
/// attempts already in flight are still applied before the run ends (see the module docs).
pub fn apply_task_result(
    run: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    result: &TaskResult,
    current_lease_epoch: i64,
    defaults: &GatePolicyDefaults,
    now: Millis,
) -> Transition<ResultOutcome> {
    if let Err(reason) = check_task_fence(
        run,
        automation,
        &result.run_id,
        &result.node_id,
        result.attempt,
        result.lease_epoch,
        current_lease_epoch,
    ) {
        return Transition::unchanged(ResultOutcome::Dropped { reason });
    }
    let applied = update(run, now, |row, fx| apply_result(row, result, now, fx));
    let next = dispatch_ready_nodes(run, automation, current_lease_epoch, defaults, now);
    let ((), mut merged) = chain(applied, next);
    let next = std::mem::replace(
        &mut merged.outcome,
        DispatchOutcome::NotActive { status: run.status },
    );
    Transition {
        outcome: ResultOutcome::Applied {
            node_id: result.node_id.clone(),
            attempt: result.attempt,
            status: result.status,
            next,
        },
        changed: merged.changed,
        effects: merged.effects,
    }
}

fn output_with_status(output: &Value, status: TaskStatus) -> Value {
    let status = json!(status.as_str());
    match output {
        Value::Object(m) => {
            let mut m = m.clone();
            m.insert("status".into(), status);
            Value::Object(m)
        }
        Value::Null => json!({ "status": status }),
        other => json!({ "status": status, "content": other }),
    }
}

fn apply_result(
    row: &mut AutomationV2RunRecord,
    result: &TaskResult,
    now: Millis,
    fx: &mut Effects,
) {
    let usage = &result.usage;
    row.prompt_tokens = row.prompt_tokens.saturating_add(usage.prompt_tokens);
    row.completion_tokens = row
        .completion_tokens
        .saturating_add(usage.completion_tokens);
    row.total_tokens = row
        .total_tokens
        .saturating_add(usage.prompt_tokens.saturating_add(usage.completion_tokens));
    if usage.cost_usd.is_finite() && usage.cost_usd > 0.0 {
        row.estimated_cost_usd += usage.cost_usd;
    }

    let id = result.node_id.clone();
    let output = output_with_status(&result.output, result.status);
    let reason = output_reason(Some(&output));
    let cp = &mut row.checkpoint;
    cp.node_outputs.insert(id.clone(), output);
    let event = match result.status {
        TaskStatus::Completed => {
            cp.pending_nodes.retain(|n| n != &id);
            cp.blocked_nodes.retain(|n| n != &id);
            if !cp.is_completed(&id) {
                cp.completed_nodes.push(id.clone());
            }
            LIFECYCLE_NODE_COMPLETED
        }
        TaskStatus::NeedsRepair => LIFECYCLE_NODE_REPAIR_REQUESTED,
        TaskStatus::Failed => {
            let reason = reason
                .clone()
                .unwrap_or_else(|| format!("node `{id}` failed"));
            cp.last_failure = Some(AutomationFailureRecord {
                node_id: id.clone(),
                reason,
                failed_at_ms: now,
            });
            LIFECYCLE_NODE_FAILED
        }
        TaskStatus::Blocked => {
            if !cp.is_blocked(&id) {
                cp.blocked_nodes.push(id.clone());
            }
            LIFECYCLE_NODE_BLOCKED
        }
    };
    let reason = match result.status {
        TaskStatus::Completed => None,
        _ => reason,
    };
    fx.lifecycle(
        row,
        event,
        reason,
        None,
        Some(json!({
            "node_id": id,
            "attempt": result.attempt,
            "status": result.status.as_str(),
        })),
        now,
    );
}

// ---------------------------------------------------------------------------------------------
// Operator actions (spec §2.2)
// ---------------------------------------------------------------------------------------------

fn normalize_reason(reason: Option<&str>) -> Option<String> {
    reason
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
}

/// What [`request_pause`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PauseOutcome {
    /// `running` with attempts in flight → `pausing`; it settles to `paused` (`run_paused`)
    /// when the last of these reports ([`apply_task_result`]).
    Pausing { in_flight: Vec<NodeAttempt> },
    /// `running` with nothing in flight, or `queued` → `paused`.
    Paused,
    /// Any other status: 409 [`CODE_NOT_PAUSABLE`], nothing changed.
    NotPausable { status: AutomationRunStatus },
}

impl PauseOutcome {
    pub fn error_code(&self) -> Option<&'static str> {
        matches!(self, Self::NotPausable { .. }).then_some(CODE_NOT_PAUSABLE)
    }

    pub fn http_status(&self) -> u16 {
        operator_http_status(self.error_code())
    }
}

/// Operator actions answer 409 with their error code when refused, else 200 (spec §2.2).
fn operator_http_status(error_code: Option<&'static str>) -> u16 {
    if error_code.is_some() { 409 } else { 200 }
}

/// `POST /automations/v2/runs/{id}/pause` (spec §2.2) on the locked row.
///
/// * `running` with attempts in flight under `lease_epoch` → `pausing`, `pause_reason` =
///   `reason`, detail [`PAUSING_DETAIL`], lifecycle `run_pause_requested`. In-flight attempts
///   are left to finish; [`dispatch_ready_nodes`] starts nothing new and settles the run.
/// * `running` with nothing in flight, or `queued` → `paused` directly, detail
///   ``automation run paused by operator[: {reason}]``, lifecycles `run_pause_requested` then
///   `run_paused`.
/// * otherwise (`pausing` included) → [`PauseOutcome::NotPausable`].
///
/// `stop_kind` is left unchanged (spec §2.2).
pub fn request_pause(
    run: &mut AutomationV2RunRecord,
    lease_epoch: i64,
    reason: Option<&str>,
    now: Millis,
) -> Transition<PauseOutcome> {
    let status = run.status;
    if !matches!(
        status,
        AutomationRunStatus::Running | AutomationRunStatus::Queued
    ) {
        return Transition::unchanged(PauseOutcome::NotPausable { status });
    }
    let reason = normalize_reason(reason);
    let in_flight = if status == AutomationRunStatus::Running {
        in_flight_nodes(run, lease_epoch)
    } else {
        Vec::new()
    };
    update(run, now, |row, fx| {
        row.pause_reason = reason.clone();
        let stop_kind = row.stop_kind;
        let ids: Vec<&str> = in_flight.iter().map(|a| a.node_id.as_str()).collect();
        fx.lifecycle(
            row,
            LIFECYCLE_RUN_PAUSE_REQUESTED,
            reason.clone(),
            stop_kind,
            Some(json!({ "previous_status": status.as_str(), "in_flight_node_ids": ids })),
            now,
        );
        if in_flight.is_empty() {
            row.status = AutomationRunStatus::Paused;
            row.detail = Some(operator_paused_detail(reason.as_deref()));
            fx.lifecycle(row, LIFECYCLE_RUN_PAUSED, reason, stop_kind, None, now);
            PauseOutcome::Paused
        } else {
            row.status = AutomationRunStatus::Pausing;
            row.detail = Some(PAUSING_DETAIL.into());
            PauseOutcome::Pausing {
                in_flight: in_flight.clone(),
            }
        }
    })
}

/// What [`resume_run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// `paused` → `queued`.
    Resumed,
    /// Not `paused`: 409 [`CODE_NOT_PAUSED`], nothing changed.
    NotPaused { status: AutomationRunStatus },
}

impl ResumeOutcome {
    pub fn error_code(&self) -> Option<&'static str> {
        matches!(self, Self::NotPaused { .. }).then_some(CODE_NOT_PAUSED)
    }

    pub fn http_status(&self) -> u16 {
        operator_http_status(self.error_code())
    }
}

/// `POST /automations/v2/runs/{id}/resume` (spec §2.2): `paused` → `queued`, lifecycle
/// `run_resumed` (reason = the operator's), `resume_reason` = the operator's reason, and
/// `stop_kind`, `stop_reason`, `detail` **and `pause_reason`** cleared, as the auto-resumes do
/// (§7.24 fixed: upstream leaves `pause_reason` set on a queued/running run).
pub fn resume_run(
    run: &mut AutomationV2RunRecord,
    reason: Option<&str>,
    now: Millis,
) -> Transition<ResumeOutcome> {
    if run.status != AutomationRunStatus::Paused {
        return Transition::unchanged(ResumeOutcome::NotPaused { status: run.status });
    }
    let reason = normalize_reason(reason);
    update(run, now, |row, fx| {
        let previous_stop_kind = row.stop_kind.map(|k| k.as_str());
        let previous_pause_reason = row.pause_reason.take();
        row.status = AutomationRunStatus::Queued;
        row.resume_reason = reason.clone();
        row.stop_kind = None;
        row.stop_reason = None;
        row.detail = None;
        fx.lifecycle(
            row,
            LIFECYCLE_RUN_RESUMED,
            reason,
            None,
            Some(json!({
                "previous_stop_kind": previous_stop_kind,
                "previous_pause_reason": previous_pause_reason,
            })),
            now,
        );
        ResumeOutcome::Resumed
    })
}

/// What [`cancel_run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// → `cancelled`; `cancelled_tasks` when attempts were in flight (the run id is in
    /// `effects.cancel_tasks_of`).
    Cancelled {
        previous: AutomationRunStatus,
        cancelled_tasks: bool,
    },
    /// `completed`, `failed` or `cancelled`: upstream's 200 `alreadyTerminal`; nothing changed.
    AlreadyTerminal { status: AutomationRunStatus },
}

/// `POST /automations/v2/runs/{id}/cancel` (spec §2.2): any non-terminal status, and `blocked`,
/// → `cancelled`, stop kind `operator_stopped`, `stop_reason` = `detail` = the reason (default
/// [`OPERATOR_CANCELLED_DETAIL`]), lifecycle `run_stopped`. When attempts are in flight under
/// `lease_epoch` the run id goes to `effects.cancel_tasks_of` (workers abandon them; their late
/// results are dropped as `RunNotActive` / `StaleEpoch`). An `awaiting_approval` run keeps its
/// `awaiting_gate` (§7.25, kept; every gate path checks the status first).
pub fn cancel_run(
    run: &mut AutomationV2RunRecord,
    lease_epoch: i64,
    reason: Option<&str>,
    now: Millis,
) -> Transition<CancelOutcome> {
    let previous = run.status;
    if matches!(
        previous,
        AutomationRunStatus::Completed
            | AutomationRunStatus::Failed
            | AutomationRunStatus::Cancelled
    ) {
        return Transition::unchanged(CancelOutcome::AlreadyTerminal { status: previous });
    }
    let reason = normalize_reason(reason).unwrap_or_else(|| OPERATOR_CANCELLED_DETAIL.into());
    let in_flight = if previous.holds_workspace_lock() {
        in_flight_nodes(run, lease_epoch)
    } else {
        Vec::new()
    };
    update(run, now, |row, fx| {
        row.status = AutomationRunStatus::Cancelled;
        row.stop_kind = Some(AutomationStopKind::OperatorStopped);
        row.stop_reason = Some(reason.clone());
        row.detail = Some(reason.clone());
        let ids: Vec<&str> = in_flight.iter().map(|a| a.node_id.as_str()).collect();
        fx.lifecycle(
            row,
            LIFECYCLE_RUN_STOPPED,
            Some(reason.clone()),
            Some(AutomationStopKind::OperatorStopped),
            Some(json!({ "previous_status": previous.as_str(), "in_flight_node_ids": ids })),
            now,
        );
        let cancelled_tasks = !in_flight.is_empty();
        if cancelled_tasks {
            fx.cancel_tasks_of.push(row.run_id.clone());
        }
        CancelOutcome::Cancelled {
            previous,
            cancelled_tasks,
        }
    })
}

/// Nodes with an unsettled `node_started` from an earlier claim: they will never report and
/// are dispatched again (next attempt) by [`dispatch_ready_nodes`]. For diagnostics.
pub fn orphaned_nodes(run: &AutomationV2RunRecord, lease_epoch: i64) -> Vec<String> {
    let current: BTreeSet<String> = in_flight_nodes(run, lease_epoch)
        .into_iter()
        .map(|a| a.node_id)
        .collect();
    in_progress_node_ids(run)
        .into_iter()
        .filter(|id| !current.contains(id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claim::{ClaimOutcome, claim_run};
    use crate::config::StaleSettings;
    use crate::gate::{GateDecisionRequest, decide_gate};
    use crate::governance::GovernanceSnapshot;
    use crate::model::{
        AutomationExecutionPolicy, AutomationFlowNode as N, ExecutionProfile, GovernanceActorRef,
        StageKind,
    };
    use crate::protocol::TaskUsage;
    use crate::sweeps::{
        OVERRIDE_LIFTABLE_GUARDRAIL_EVENTS, ReapOutcome, auto_resume_stale_reaped, reap_stale_run,
        settle_pausing,
    };

    const T0: Millis = 1_000_000;

    /// A run driven the way the scheduler and the store drive it: the lease epoch is bumped
    /// whenever a transition makes the run enter or leave `running`/`pausing`.
    struct H {
        spec: AutomationV2Spec,
        run: AutomationV2RunRecord,
        epoch: i64,
        now: Millis,
        defaults: GatePolicyDefaults,
    }

    impl H {
        fn new(spec: AutomationV2Spec) -> Self {
            let run = AutomationV2RunRecord::new_queued(
                "automation-v2-run-exec".into(),
                &spec,
                "manual",
                ExecutionProfile::Guided,
                T0,
            );
            Self {
                spec,
                run,
                epoch: 0,
                now: T0,
                defaults: GatePolicyDefaults::default(),
            }
        }

        /// Queued → claimed → first dispatch.
        fn started(spec: AutomationV2Spec) -> (Self, Transition<DispatchOutcome>) {
            let mut h = Self::new(spec);
            assert_eq!(h.claim().outcome, ClaimOutcome::Claimed);
            let t = h.dispatch();
            (h, t)
        }

        fn track<T>(&mut self, before: AutomationRunStatus, tr: Transition<T>) -> Transition<T> {
            if tr.changed && before.holds_workspace_lock() != self.run.status.holds_workspace_lock()
            {
                self.epoch += 1;
            }
            tr
        }

        fn claim(&mut self) -> Transition<ClaimOutcome> {
            let before = self.run.status;
            let tr = claim_run(
                &mut self.run,
                Some(&self.spec),
                None,
                &GovernanceSnapshot::default(),
                self.now,
            );
            self.track(before, tr)
        }

        fn dispatch(&mut self) -> Transition<DispatchOutcome> {
            let before = self.run.status;
            let tr = dispatch_ready_nodes(
                &mut self.run,
                &self.spec,
                self.epoch,
                &self.defaults,
                self.now,
            );
            self.track(before, tr)
        }

        fn result(&self, node: &str, status: TaskStatus, output: Value) -> TaskResult {
            TaskResult {
                run_id: self.run.run_id.clone(),
                node_id: node.into(),
                attempt: self.run.checkpoint.attempts(node),
                lease_epoch: self.epoch,
                status,
                output,
                usage: TaskUsage::default(),
            }
        }

        fn deliver(&mut self, r: &TaskResult) -> Transition<ResultOutcome> {
            self.now += 10;
            let before = self.run.status;
            let tr = apply_task_result(
                &mut self.run,
                &self.spec,
                r,
                self.epoch,
                &self.defaults,
                self.now,
            );
            self.track(before, tr)
        }

        fn report(
            &mut self,
            node: &str,
            status: TaskStatus,
            output: Value,
        ) -> Transition<ResultOutcome> {
            let r = self.result(node, status, output);
            self.deliver(&r)
        }

        fn complete(&mut self, node: &str) -> Transition<ResultOutcome> {
            self.report(
                node,
                TaskStatus::Completed,
                json!({"summary": format!("{node} done")}),
            )
        }

        fn pause(&mut self, reason: Option<&str>) -> Transition<PauseOutcome> {
            let before = self.run.status;
            let tr = request_pause(&mut self.run, self.epoch, reason, self.now);
            self.track(before, tr)
        }

        fn resume(&mut self) -> Transition<ResumeOutcome> {
            let before = self.run.status;
            let tr = resume_run(&mut self.run, Some("operator resumed"), self.now);
            self.track(before, tr)
        }

        fn cancel(&mut self) -> Transition<CancelOutcome> {
            let before = self.run.status;
            let tr = cancel_run(&mut self.run, self.epoch, None, self.now);
            self.track(before, tr)
        }

        fn events(&self) -> Vec<&str> {
            self.run
                .checkpoint
                .lifecycle_history
                .iter()
                .map(|r| r.event.as_str())
                .collect()
        }
    }

    fn next(tr: &Transition<ResultOutcome>) -> &DispatchOutcome {
        match &tr.outcome {
            ResultOutcome::Applied { next, .. } => next,
            other => panic!("result not applied: {other:?}"),
        }
    }

    fn attempts(o: &DispatchOutcome) -> Vec<(String, u32)> {
        match o {
            DispatchOutcome::Dispatched { dispatched, .. } => dispatched
                .iter()
                .map(|a| (a.node_id.clone(), a.attempt))
                .collect(),
            other => panic!("nothing dispatched: {other:?}"),
        }
    }

    fn na(node: &str, attempt: u32) -> (String, u32) {
        (node.into(), attempt)
    }

    fn with_max_attempts(mut n: N, max: u64) -> N {
        n.retry_policy = Some(json!({ "max_attempts": max }));
        n
    }

    fn sequential() -> AutomationV2Spec {
        AutomationV2Spec::new(
            "auto-seq",
            vec![
                N::task("a", &[]),
                N::task("b", &["a"]),
                N::task("c", &["b"]),
            ],
        )
    }

    fn with_execution(
        mut spec: AutomationV2Spec,
        e: AutomationExecutionPolicy,
    ) -> AutomationV2Spec {
        spec.execution = Some(e);
        spec
    }

    fn assert_dropped(h: &mut H, r: &TaskResult, want: DropReason) {
        let before = h.run.clone();
        let tr = h.deliver(r);
        assert_eq!(tr.outcome, ResultOutcome::Dropped { reason: want });
        assert!(!tr.changed);
        assert!(tr.effects.is_empty());
        assert_eq!(h.run, before, "a dropped result leaves the run unchanged");
    }

    // ------------------------------------------------------------------ flows

    #[test]
    fn sequential_flow_runs_to_completion() {
        let (mut h, first) = H::started(sequential());
        assert_eq!(attempts(&first.outcome), vec![na("a", 1)]);
        assert_eq!(h.run.detail.as_deref(), Some("running node `a` attempt 1"));
        assert_eq!(h.run.checkpoint.blocked_nodes, vec!["b", "c"]);
        assert_eq!(first.effects.tasks.len(), 1);
        assert_eq!(first.effects.lifecycle.len(), 1);
        assert_eq!(
            first.effects.lifecycle[0].metadata,
            Some(
                json!({"node_id": "a", "attempt": 1, "lease_epoch": 1, "effective_execution_profile": "guided"})
            )
        );

        let t = h.complete("a");
        assert_eq!(attempts(next(&t)), vec![na("b", 1)]);
        assert_eq!(h.run.checkpoint.blocked_nodes, vec!["c"]);
        let t = h.complete("b");
        assert_eq!(attempts(next(&t)), vec![na("c", 1)]);
        let t = h.complete("c");
        assert_eq!(next(&t), &DispatchOutcome::Completed);

        let run = &h.run;
        assert_eq!(run.status, AutomationRunStatus::Completed);
        assert_eq!(run.detail.as_deref(), Some(COMPLETED_DETAIL));
        assert_eq!(run.finished_at_ms, Some(h.now));
        assert_eq!(run.checkpoint.completed_nodes, vec!["a", "b", "c"]);
        assert!(run.checkpoint.pending_nodes.is_empty());
        assert!(run.checkpoint.blocked_nodes.is_empty());
        assert_eq!(
            run.checkpoint.node_outputs["c"],
            json!({"summary": "c done", "status": "completed"})
        );
        assert_eq!(
            h.events(),
            vec![
                "node_started",
                "node_completed",
                "node_started",
                "node_completed",
                "node_started",
                "node_completed",
                "run_completed"
            ]
        );
        assert_eq!(t.effects.events.len(), 1);
        let ev = &t.effects.events[0];
        assert_eq!(ev.event_type, EVENT_RUN_COMPLETED);
        assert_eq!(ev.properties["status"], "completed");
        assert_eq!(ev.properties["runID"], h.run.run_id.as_str());
        assert_eq!(ev.properties["automationID"], "auto-seq");
        assert_eq!(ev.properties["detail"], COMPLETED_DETAIL);
        assert_eq!(ev.properties["completed_nodes"], json!(["a", "b", "c"]));
        assert_eq!(ev.properties["finished_at_ms"], json!(h.now));
        assert_eq!(ev.properties["tenantContext"]["org_id"], "local");
        assert!(in_progress_node_ids(&h.run).is_empty());
    }

    #[test]
    fn case_11_run_without_runtime_context_requirement_starts_and_completes() {
        let spec = AutomationV2Spec::new("auto-11", vec![N::task("only", &[])]);
        let mut h = H::new(spec);
        assert_eq!(h.claim().outcome, ClaimOutcome::Claimed);
        assert!(h.run.runtime_context.is_none());
        h.dispatch();
        let t = h.complete("only");
        assert_eq!(next(&t), &DispatchOutcome::Completed);
        assert_eq!(h.run.status, AutomationRunStatus::Completed);
        assert_eq!(h.run.detail.as_deref(), Some("automation run completed"));
    }

    #[test]
    fn fan_out_dispatches_both_branches_at_once_and_fan_in_waits_for_both() {
        let spec = AutomationV2Spec::new(
            "auto-fan",
            vec![
                N::task("a", &[]),
                N::task("b", &["a"]),
                N::task("c", &["a"]),
                N::task("d", &["b", "c"]),
            ],
        );
        let (mut h, _) = H::started(spec);
        let t = h.complete("a");
        assert_eq!(attempts(next(&t)), vec![na("b", 1), na("c", 1)]);
        assert_eq!(t.effects.tasks.len(), 2);
        assert_eq!(
            in_flight_nodes(&h.run, h.epoch)
                .into_iter()
                .map(|a| a.node_id)
                .collect::<Vec<_>>(),
            vec!["b", "c"]
        );
        assert_eq!(in_progress_node_ids(&h.run), vec!["b", "c"]);

        let t = h.complete("b");
        assert_eq!(
            next(&t),
            &DispatchOutcome::Waiting {
                in_flight: vec![NodeAttempt {
                    node_id: "c".into(),
                    attempt: 1
                }]
            }
        );
        assert!(t.effects.tasks.is_empty(), "the join waits for c");

        let t = h.complete("c");
        assert_eq!(attempts(next(&t)), vec![na("d", 1)]);
        let task = &t.effects.tasks[0];
        assert_eq!(
            task.upstream_outputs.keys().collect::<Vec<_>>(),
            vec!["b", "c"]
        );
        assert_eq!(task.upstream_outputs["b"]["status"], "completed");
        let t = h.complete("d");
        assert_eq!(next(&t), &DispatchOutcome::Completed);
    }

    #[test]
    fn task_message_carries_the_worker_contract() {
        let mut gpu = N::task("render", &["fetch"]);
        gpu.metadata = Some(json!({"worker": {"queue": " gpu "}, "k": 1}));
        gpu.timeout_ms = Some(5_000);
        gpu.agent_id = "renderer".into();
        let mut zero = N::task("zero", &[]);
        zero.timeout_ms = Some(0);
        let spec = AutomationV2Spec::new("auto-msg", vec![N::task("fetch", &[]), gpu, zero]);
        let (mut h, first) = H::started(spec);
        let fetch = &first.effects.tasks[0];
        assert_eq!(fetch.queue, DEFAULT_TASK_QUEUE);
        assert_eq!(fetch.deadline_at_ms, None);
        assert_eq!(first.effects.tasks[1].node_id, "zero");
        assert_eq!(
            first.effects.tasks[1].deadline_at_ms, None,
            "0 is no timeout"
        );
        h.report("zero", TaskStatus::Completed, json!("plain text output"));
        assert_eq!(
            h.run.checkpoint.node_outputs["zero"],
            json!({"status": "completed", "content": "plain text output"})
        );
        let t = h.report(
            "fetch",
            TaskStatus::Completed,
            json!({"status": "done", "content": {"rows": 3}}),
        );
        assert_eq!(
            h.run.checkpoint.node_outputs["fetch"]["status"], "completed",
            "the reported status is authoritative"
        );
        let msg = &t.effects.tasks[0];
        assert_eq!(msg.run_id, h.run.run_id);
        assert_eq!(msg.node_id, "render");
        assert_eq!(msg.attempt, 1);
        assert_eq!(msg.lease_epoch, h.epoch);
        assert_eq!(msg.automation_id, "auto-msg");
        assert_eq!(msg.tenant_context, h.run.tenant_context);
        assert_eq!(msg.queue, "gpu");
        assert_eq!(msg.agent_id, "renderer");
        assert_eq!(msg.objective, "do render");
        assert_eq!(
            msg.metadata,
            Some(json!({"worker": {"queue": " gpu "}, "k": 1}))
        );
        assert_eq!(
            msg.upstream_outputs["fetch"],
            json!({"status": "completed", "content": {"rows": 3}})
        );
        assert_eq!(msg.repair_context, None);
        assert_eq!(msg.dispatched_at_ms, h.now);
        assert_eq!(msg.deadline_at_ms, Some(h.now + 5_000));
        assert_eq!(
            msg.task_id(),
            format!("{}:render:1:{}", h.run.run_id, h.epoch)
        );
    }

    // ------------------------------------------------------------------ repair, retry, failure

    #[test]
    fn needs_repair_is_redispatched_with_repair_context_then_succeeds() {
        let spec = AutomationV2Spec::new("auto-repair", vec![N::task("draft", &[])]);
        let (mut h, _) = H::started(spec);
        let t = h.report(
            "draft",
            TaskStatus::NeedsRepair,
            json!({"summary": "missing citations", "unmet": ["cite"]}),
        );
        assert_eq!(attempts(next(&t)), vec![na("draft", 2)]);
        let stored =
            json!({"summary": "missing citations", "unmet": ["cite"], "status": "needs_repair"});
        assert_eq!(h.run.checkpoint.node_outputs["draft"], stored);
        assert_eq!(t.effects.tasks[0].repair_context, Some(stored));
        let repair = &t.effects.lifecycle[0];
        assert_eq!(repair.event, LIFECYCLE_NODE_REPAIR_REQUESTED);
        assert_eq!(repair.reason.as_deref(), Some("missing citations"));
        assert_eq!(h.run.status, AutomationRunStatus::Running);

        let t = h.complete("draft");
        assert_eq!(next(&t), &DispatchOutcome::Completed);
        assert_eq!(h.run.checkpoint.attempts("draft"), 2);
        assert_eq!(
            h.events(),
            vec![
                "node_started",
                "node_repair_requested",
                "node_started",
                "node_completed",
                "run_completed"
            ]
        );
    }

    #[test]
    fn failing_node_is_retried_then_fails_the_run_with_last_failure() {
        let spec = AutomationV2Spec::new(
            "auto-fail",
            vec![
                with_max_attempts(N::task("send", &[]), 2),
                N::task("after", &["send"]),
            ],
        );
        let (mut h, _) = H::started(spec);
        let t = h.report("send", TaskStatus::Failed, json!({"error": "provider 500"}));
        assert_eq!(attempts(next(&t)), vec![na("send", 2)]);
        assert_eq!(
            t.effects.tasks[0].repair_context, None,
            "a retry is not a repair"
        );
        assert_eq!(
            h.run.checkpoint.last_failure,
            Some(AutomationFailureRecord {
                node_id: "send".into(),
                reason: "provider 500".into(),
                failed_at_ms: h.now
            })
        );
        assert_eq!(t.effects.lifecycle[0].event, LIFECYCLE_NODE_FAILED);

        let t = h.report("send", TaskStatus::Failed, json!({"error": "provider 503"}));
        assert_eq!(
            next(&t),
            &DispatchOutcome::Failed {
                node_id: "send".into()
            }
        );
        let run = &h.run;
        assert_eq!(run.status, AutomationRunStatus::Failed);
        assert_eq!(
            run.detail.as_deref(),
            Some("automation run failed: node `send` failed after 2 attempt(s): provider 503")
        );
        assert_eq!(
            run.checkpoint.last_failure,
            Some(AutomationFailureRecord {
                node_id: "send".into(),
                reason: "provider 503".into(),
                failed_at_ms: h.now
            })
        );
        assert_eq!(run.checkpoint.node_outputs["send"]["status"], "failed");
        assert_eq!(
            run.checkpoint.node_outputs["send"]["failure_kind"],
            "run_failed"
        );
        assert_eq!(run.finished_at_ms, Some(h.now));
        assert!(run.stop_kind.is_none());
        assert_eq!(h.events().last(), Some(&LIFECYCLE_RUN_FAILED));
        assert_eq!(t.effects.events.len(), 1);
        let ev = &t.effects.events[0];
        assert_eq!(ev.event_type, "automation_v2.run.failed");
        assert_eq!(ev.node_id.as_deref(), Some("send"));
        assert_eq!(ev.properties["status"], "failed");
        assert_eq!(ev.properties["node_id"], "send");
        assert_eq!(ev.properties["attempt"], 2);
        assert_eq!(ev.properties["max_attempts"], 2);
        assert_eq!(ev.properties["retry_exhausted"], true);
        assert_eq!(ev.properties["reason"], "provider 503");
        assert!(t.effects.tasks.is_empty());
    }

    #[test]
    fn needs_repair_on_the_last_attempt_fails_the_run() {
        let spec = AutomationV2Spec::new(
            "auto-repair-max",
            vec![with_max_attempts(N::task("x", &[]), 1)],
        );
        let (mut h, _) = H::started(spec);
        let t = h.report(
            "x",
            TaskStatus::NeedsRepair,
            json!({"summary": "still wrong", "failure_kind": "verification_failed"}),
        );
        assert_eq!(
            next(&t),
            &DispatchOutcome::Failed {
                node_id: "x".into()
            }
        );
        assert_eq!(h.run.status, AutomationRunStatus::Failed);
        let out = &h.run.checkpoint.node_outputs["x"];
        assert_eq!(out["status"], "failed");
        assert_eq!(
            out["failure_kind"], "verification_failed",
            "the worker's kind is kept"
        );
        assert_eq!(
            t.effects.events[0].properties["error_kind"],
            "validation_error"
        );
        assert_eq!(
            h.run
                .checkpoint
                .last_failure
                .as_ref()
                .map(|f| f.reason.as_str()),
            Some("still wrong")
        );
    }

    #[test]
    fn the_failure_that_ends_the_run_is_the_last_one_reported() {
        let spec =
            AutomationV2Spec::new("auto-mixed", vec![with_max_attempts(N::task("x", &[]), 2)]);
        let (mut h, _) = H::started(spec);
        h.report("x", TaskStatus::Failed, json!({"error": "provider 500"}));
        let t = h.report(
            "x",
            TaskStatus::NeedsRepair,
            json!({"summary": "still wrong"}),
        );
        assert_eq!(
            next(&t),
            &DispatchOutcome::Failed {
                node_id: "x".into()
            }
        );
        assert_eq!(
            h.run.checkpoint.last_failure,
            Some(AutomationFailureRecord {
                node_id: "x".into(),
                reason: "still wrong".into(),
                failed_at_ms: h.now
            })
        );
        assert_eq!(
            h.run.detail.as_deref(),
            Some("automation run failed: node `x` failed after 2 attempt(s): still wrong")
        );
    }

    #[test]
    fn blocked_result_blocks_the_run() {
        let (mut h, _) = H::started(AutomationV2Spec::new(
            "auto-blocked",
            vec![N::task("a", &[]), N::task("b", &["a"])],
        ));
        let t = h.report(
            "a",
            TaskStatus::Blocked,
            json!({"blocked_reason": "missing API key"}),
        );
        assert_eq!(
            next(&t),
            &DispatchOutcome::Blocked {
                node_ids: vec!["a".into()]
            }
        );
        let run = &h.run;
        assert_eq!(run.status, AutomationRunStatus::Blocked);
        assert_eq!(run.checkpoint.blocked_nodes, vec!["a", "b"]);
        assert!(run.checkpoint.is_pending("a"));
        assert_eq!(
            run.detail.as_deref(),
            Some("automation run blocked: node `a` is blocked: missing API key")
        );
        assert_eq!(
            h.events(),
            vec!["node_started", "node_blocked", "run_blocked"]
        );
        assert_eq!(
            h.run.checkpoint.lifecycle_history[1].reason.as_deref(),
            Some("missing API key")
        );
        let ev = &t.effects.events[0];
        assert_eq!(ev.event_type, EVENT_RUN_FAILED);
        assert_eq!(ev.properties["status"], "blocked");
        assert_eq!(ev.properties["node_id"], "a");
        assert_eq!(ev.properties["error_kind"], "missing_config");
        assert_eq!(h.run.finished_at_ms, Some(h.now));
    }

    #[test]
    fn a_blocked_branch_starts_nothing_new_and_ends_the_run_once_siblings_settle() {
        let spec = AutomationV2Spec::new(
            "auto-drain",
            vec![
                N::task("a", &[]),
                N::task("b", &["a"]),
                N::task("c", &["a"]),
                N::task("d", &["c"]),
            ],
        );
        let (mut h, _) = H::started(spec);
        h.complete("a");
        let t = h.report("b", TaskStatus::Blocked, json!({"summary": "needs input"}));
        assert_eq!(
            next(&t),
            &DispatchOutcome::Draining {
                node_id: "b".into(),
                in_flight: vec![NodeAttempt {
                    node_id: "c".into(),
                    attempt: 1
                }]
            }
        );
        assert_eq!(h.run.status, AutomationRunStatus::Running);
        let t = h.complete("c");
        assert!(t.effects.tasks.is_empty(), "d is not started");
        assert_eq!(
            next(&t),
            &DispatchOutcome::Blocked {
                node_ids: vec!["b".into()]
            }
        );
        assert_eq!(h.run.status, AutomationRunStatus::Blocked);
        assert!(
            h.run.checkpoint.is_completed("c"),
            "the sibling's work is kept"
        );
        assert_eq!(h.run.checkpoint.attempts("d"), 0);
    }

    #[test]
    fn an_exhausted_node_drains_in_flight_siblings_then_fails_the_run() {
        let spec = AutomationV2Spec::new(
            "auto-drain-fail",
            vec![
                with_max_attempts(N::task("a", &[]), 1),
                N::task("b", &[]),
                N::task("c", &["b"]),
            ],
        );
        let (mut h, _) = H::started(spec);
        let t = h.report("a", TaskStatus::Failed, json!({"error": "boom"}));
        assert!(matches!(next(&t), DispatchOutcome::Draining { node_id, .. } if node_id == "a"));
        assert_eq!(
            h.run.detail.as_deref(),
            Some("node `a` failed; waiting for in-flight nodes to finish before ending the run")
        );
        let t = h.complete("b");
        assert_eq!(
            next(&t),
            &DispatchOutcome::Failed {
                node_id: "a".into()
            }
        );
        assert_eq!(h.run.checkpoint.attempts("c"), 0);
        assert_eq!(
            h.run
                .checkpoint
                .last_failure
                .as_ref()
                .map(|f| f.node_id.as_str()),
            Some("a")
        );
    }

    // ------------------------------------------------------------------ gates

    #[test]
    fn gate_opens_only_after_parallel_work_drains_and_approval_continues_the_flow() {
        let spec = AutomationV2Spec::new(
            "auto-gate",
            vec![
                N::task("a", &[]),
                N::task("b", &["a"]),
                N::task("c", &["a"]),
                N::approval("gate", &["a"], &["a"]),
                N::task("d", &["gate"]),
                N::task("e", &["d"]),
            ],
        );
        let (mut h, _) = H::started(spec);
        let t = h.complete("a");
        assert_eq!(attempts(next(&t)), vec![na("b", 1), na("c", 1)]);
        assert!(h.run.checkpoint.awaiting_gate.is_none());
        let t = h.complete("b");
        assert!(matches!(next(&t), DispatchOutcome::Waiting { .. }));
        assert_eq!(
            h.run.status,
            AutomationRunStatus::Running,
            "c still in flight"
        );
        assert!(h.run.checkpoint.awaiting_gate.is_none());

        let t = h.complete("c");
        assert_eq!(
            next(&t),
            &DispatchOutcome::GateOpened {
                node_id: "gate".into()
            }
        );
        assert_eq!(h.run.status, AutomationRunStatus::AwaitingApproval);
        assert_eq!(
            h.run.detail.as_deref(),
            Some("awaiting approval for gate `gate`")
        );
        assert_eq!(h.run.checkpoint.blocked_nodes, vec!["d", "e"]);
        assert!(
            t.effects
                .events
                .iter()
                .any(|e| e.event_type == gate::EVENT_GATE_REQUESTED)
        );
        let epoch_at_gate = h.epoch;
        assert_eq!(epoch_at_gate, 2, "leaving running ends the claim");

        let tr = decide_gate(
            &mut h.run,
            &h.spec,
            &h.defaults,
            &GateDecisionRequest::new("approve", GovernanceActorRef::human("reviewer")),
            h.now,
        );
        assert!(tr.changed);
        assert_eq!(h.run.status, AutomationRunStatus::Queued);
        assert_eq!(
            h.run.checkpoint.blocked_nodes,
            vec!["e"],
            "refresh_runtime_state: e waits on d"
        );
        h.claim();
        let t = h.dispatch();
        assert_eq!(attempts(&t.outcome), vec![na("d", 1)]);
        let t = h.complete("d");
        assert_eq!(
            attempts(next(&t)),
            vec![na("e", 1)],
            "blocked_nodes is refreshed, so e becomes runnable"
        );
        let t = h.complete("e");
        assert_eq!(next(&t), &DispatchOutcome::Completed);
    }

    #[test]
    fn approval_node_without_gate_config_fails_the_run_with_an_event() {
        let mut gate_node = N::task("gate", &["a"]);
        gate_node.stage_kind = Some(StageKind::Approval);
        let spec = AutomationV2Spec::new("auto-nogate", vec![N::task("a", &[]), gate_node]);
        let (mut h, _) = H::started(spec);
        let t = h.complete("a");
        assert_eq!(
            next(&t),
            &DispatchOutcome::GateConfigMissing {
                node_id: "gate".into()
            }
        );
        assert_eq!(h.run.status, AutomationRunStatus::Failed);
        assert_eq!(
            h.run.detail.as_deref(),
            Some(gate::MISSING_GATE_CONFIG_DETAIL)
        );
        assert!(
            t.effects
                .events
                .iter()
                .any(|e| e.event_type == EVENT_RUN_FAILED)
        );
    }

    // ------------------------------------------------------------------ fencing

    #[test]
    fn every_fencing_drop_reason_leaves_the_run_unchanged() {
        let (mut h, _) = H::started(sequential());
        let good = h.result("a", TaskStatus::Completed, json!({}));

        let mut r = good.clone();
        r.run_id = "another-run".into();
        assert_dropped(&mut h, &r, DropReason::RunMismatch);

        let mut r = good.clone();
        r.lease_epoch = h.epoch + 1;
        assert_dropped(&mut h, &r, DropReason::StaleEpoch { current: 1, got: 2 });
        r.lease_epoch = 0;
        assert_dropped(&mut h, &r, DropReason::StaleEpoch { current: 1, got: 0 });

        let mut r = good.clone();
        r.node_id = "zz".into();
        assert_dropped(&mut h, &r, DropReason::UnknownNode);

        let mut r = good.clone();
        r.attempt = 2;
        assert_dropped(&mut h, &r, DropReason::StaleAttempt { current: 1, got: 2 });

        // b has never been dispatched: attempt 0 is "current" but not in flight.
        let r = h.result("b", TaskStatus::Completed, json!({}));
        assert_eq!(r.attempt, 0);
        assert_dropped(&mut h, &r, DropReason::NotInFlight);

        let mut cancelled = H::started(sequential()).0;
        let late = cancelled.result("a", TaskStatus::Completed, json!({}));
        cancelled.cancel();
        let mut r = late;
        r.lease_epoch = cancelled.epoch;
        assert_dropped(
            &mut cancelled,
            &r,
            DropReason::RunNotActive {
                status: AutomationRunStatus::Cancelled,
            },
        );

        // The good one still applies.
        assert!(matches!(
            h.deliver(&good).outcome,
            ResultOutcome::Applied { .. }
        ));

        let labels: Vec<&str> = [
            DropReason::RunMismatch,
            DropReason::RunNotActive {
                status: AutomationRunStatus::Paused,
            },
            DropReason::StaleEpoch { current: 0, got: 0 },
            DropReason::UnknownNode,
            DropReason::StaleAttempt { current: 0, got: 0 },
            DropReason::NotInFlight,
        ]
        .iter()
        .map(DropReason::as_str)
        .collect();
        assert_eq!(
            labels,
            vec![
                "run_mismatch",
                "run_not_active",
                "stale_epoch",
                "unknown_node",
                "stale_attempt",
                "not_in_flight"
            ]
        );
    }

    #[test]
    fn a_duplicate_result_is_applied_once() {
        let (mut h, _) = H::started(sequential());
        let done = h.result("a", TaskStatus::Completed, json!({"summary": "ok"}));
        let first = h.deliver(&done);
        assert!(first.changed);
        assert_dropped(&mut h, &done, DropReason::NotInFlight);
        assert_eq!(h.run.checkpoint.completed_nodes, vec!["a"]);
        assert_eq!(
            h.events()
                .iter()
                .filter(|e| **e == "node_completed")
                .count(),
            1
        );

        let repair = h.result("b", TaskStatus::NeedsRepair, json!({"summary": "fix"}));
        h.deliver(&repair);
        assert_eq!(h.run.checkpoint.attempts("b"), 2);
        assert_dropped(
            &mut h,
            &repair,
            DropReason::StaleAttempt { current: 2, got: 1 },
        );

        let blocked = h.result("b", TaskStatus::Blocked, json!({}));
        h.deliver(&blocked);
        assert_eq!(h.run.status, AutomationRunStatus::Blocked);
        assert_dropped(
            &mut h,
            &blocked,
            DropReason::RunNotActive {
                status: AutomationRunStatus::Blocked,
            },
        );
    }

    #[test]
    fn progress_uses_the_same_fence() {
        let (h, _) = H::started(sequential());
        let id = h.run.run_id.clone();
        assert_eq!(check_task_fence(&h.run, &h.spec, &id, "a", 1, 1, 1), Ok(()));
        assert_eq!(
            check_task_fence(&h.run, &h.spec, &id, "a", 1, 0, 1),
            Err(DropReason::StaleEpoch { current: 1, got: 0 })
        );
    }

    // ------------------------------------------------------------------ usage and guardrails

    #[test]
    fn usage_accumulates_across_applied_results_only() {
        let (mut h, _) = H::started(sequential());
        let mut r = h.result("a", TaskStatus::Completed, json!({}));
        r.usage = TaskUsage {
            prompt_tokens: 10,
            completion_tokens: 5,
            cost_usd: 0.25,
        };
        h.deliver(&r);
        // The duplicate's usage is not counted again.
        h.deliver(&r);
        let mut r = h.result("b", TaskStatus::NeedsRepair, json!({}));
        r.usage = TaskUsage {
            prompt_tokens: 20,
            completion_tokens: 7,
            cost_usd: 0.5,
        };
        h.deliver(&r);
        let mut r = h.result("b", TaskStatus::Completed, json!({}));
        r.usage = TaskUsage {
            prompt_tokens: 1,
            completion_tokens: 1,
            cost_usd: f64::NAN,
        };
        h.deliver(&r);
        let mut r = h.result("c", TaskStatus::Completed, json!({}));
        r.usage = TaskUsage {
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: -3.0,
        };
        h.deliver(&r);
        assert_eq!(h.run.status, AutomationRunStatus::Completed);
        assert_eq!(h.run.prompt_tokens, 31);
        assert_eq!(h.run.completion_tokens, 13);
        assert_eq!(h.run.total_tokens, 44);
        assert!((h.run.estimated_cost_usd - 0.75).abs() < 1e-12);
    }

    fn fan_spec(e: AutomationExecutionPolicy) -> AutomationV2Spec {
        with_execution(
            AutomationV2Spec::new(
                "auto-budget",
                vec![
                    N::task("a", &[]),
                    N::task("b", &["a"]),
                    N::task("c", &["a"]),
                    N::task("d", &["b", "c"]),
                ],
            ),
            e,
        )
    }

    fn assert_guardrail_paused(h: &H, limit: &str) {
        let run = &h.run;
        assert_eq!(run.status, AutomationRunStatus::Paused);
        assert_eq!(run.stop_kind, Some(AutomationStopKind::GuardrailStopped));
        let detail = run.detail.clone().expect("detail");
        assert!(detail.contains(limit), "{detail}");
        assert_eq!(run.pause_reason.as_deref(), Some(detail.as_str()));
        assert_eq!(run.stop_reason.as_deref(), Some(detail.as_str()));
        let last = run.checkpoint.lifecycle_history.last().expect("record");
        assert_eq!(last.event, LIFECYCLE_RUN_PAUSED);
        assert_eq!(last.stop_kind, Some(AutomationStopKind::GuardrailStopped));
        assert_eq!(last.reason.as_deref(), Some(detail.as_str()));
        assert_eq!(
            last.metadata.as_ref().and_then(|m| m.get("guardrail")),
            Some(&json!(limit))
        );
        assert!(
            !OVERRIDE_LIFTABLE_GUARDRAIL_EVENTS.contains(&last.event.as_str()),
            "a budget stop is never auto-resumed by a quota override"
        );
    }

    #[test]
    fn token_guardrail_pauses_the_run_and_cancels_in_flight_work() {
        let (mut h, _) = H::started(fan_spec(AutomationExecutionPolicy {
            max_total_tokens: Some(100),
            ..Default::default()
        }));
        let mut r = h.result("a", TaskStatus::Completed, json!({}));
        r.usage.prompt_tokens = 60;
        let t = h.deliver(&r);
        assert_eq!(attempts(next(&t)), vec![na("b", 1), na("c", 1)]);
        let late_c = h.result("c", TaskStatus::Completed, json!({}));
        let mut r = h.result("b", TaskStatus::Completed, json!({}));
        r.usage.completion_tokens = 50;
        let t = h.deliver(&r);
        assert_eq!(
            next(&t),
            &DispatchOutcome::GuardrailPaused(GuardrailBreach::Tokens {
                used: 110,
                max: 100
            })
        );
        assert_guardrail_paused(&h, "max_total_tokens");
        assert_eq!(
            h.run.detail.as_deref(),
            Some(
                "automation run paused: max_total_tokens guardrail reached (110 tokens used, limit 100)"
            )
        );
        assert_eq!(t.effects.cancel_tasks_of, vec![h.run.run_id.clone()]);
        assert!(t.effects.tasks.is_empty());
        let mut late_c = late_c;
        late_c.lease_epoch = h.epoch;
        assert_dropped(
            &mut h,
            &late_c,
            DropReason::RunNotActive {
                status: AutomationRunStatus::Paused,
            },
        );
    }

    #[test]
    fn cost_guardrail_pauses_the_run() {
        let (mut h, _) = H::started(with_execution(
            sequential(),
            AutomationExecutionPolicy {
                max_total_cost_usd: Some(0.5),
                ..Default::default()
            },
        ));
        let mut r = h.result("a", TaskStatus::Completed, json!({}));
        r.usage.cost_usd = 0.6;
        let t = h.deliver(&r);
        assert!(matches!(
            next(&t),
            DispatchOutcome::GuardrailPaused(GuardrailBreach::CostUsd { .. })
        ));
        assert_guardrail_paused(&h, "max_total_cost_usd");
        assert!(
            t.effects.cancel_tasks_of.is_empty(),
            "nothing was in flight"
        );
        assert_eq!(h.run.checkpoint.attempts("b"), 0);
    }

    #[test]
    fn runtime_guardrail_pauses_on_a_result_or_on_a_timer_dispatch() {
        let policy = AutomationExecutionPolicy {
            max_total_runtime_ms: Some(1_000),
            ..Default::default()
        };
        // On a result.
        let (mut h, _) = H::started(with_execution(sequential(), policy.clone()));
        assert_eq!(h.run.started_at_ms, Some(T0));
        h.now = T0 + 1_500;
        let t = h.complete("a");
        assert_eq!(
            next(&t),
            &DispatchOutcome::GuardrailPaused(GuardrailBreach::RuntimeMs {
                elapsed_ms: 1_510,
                max: 1_000
            })
        );
        assert_guardrail_paused(&h, "max_total_runtime_ms");

        // On a timer while an attempt runs.
        let (mut h, _) = H::started(with_execution(sequential(), policy));
        h.now = T0 + 999;
        let t = h.dispatch();
        assert!(!t.changed, "within budget: nothing to do");
        h.now = T0 + 1_000;
        let t = h.dispatch();
        assert!(matches!(t.outcome, DispatchOutcome::GuardrailPaused(_)));
        assert_eq!(t.effects.cancel_tasks_of, vec![h.run.run_id.clone()]);
        assert_guardrail_paused(&h, "max_total_runtime_ms");
    }

    #[test]
    fn completion_wins_over_a_guardrail_and_zero_limits_mean_no_limit() {
        let (mut h, _) = H::started(with_execution(
            AutomationV2Spec::new("auto-one", vec![N::task("x", &[])]),
            AutomationExecutionPolicy {
                max_total_tokens: Some(10),
                ..Default::default()
            },
        ));
        let mut r = h.result("x", TaskStatus::Completed, json!({}));
        r.usage.prompt_tokens = 50;
        assert_eq!(next(&h.deliver(&r)), &DispatchOutcome::Completed);

        let (mut h, _) = H::started(with_execution(
            sequential(),
            AutomationExecutionPolicy {
                max_total_tokens: Some(0),
                max_total_cost_usd: Some(0.0),
                max_total_runtime_ms: Some(0),
                ..Default::default()
            },
        ));
        let mut r = h.result("a", TaskStatus::Completed, json!({}));
        r.usage.prompt_tokens = 5_000;
        r.usage.cost_usd = 9.0;
        assert_eq!(attempts(next(&h.deliver(&r))), vec![na("b", 1)]);
    }

    #[test]
    fn max_parallel_agents_bounds_dispatch() {
        let (mut h, first) = H::started(with_execution(
            AutomationV2Spec::new(
                "auto-par",
                vec![N::task("a", &[]), N::task("b", &[]), N::task("c", &[])],
            ),
            AutomationExecutionPolicy {
                max_parallel_agents: Some(2),
                ..Default::default()
            },
        ));
        assert_eq!(attempts(&first.outcome), vec![na("a", 1), na("b", 1)]);
        let t = h.complete("a");
        assert_eq!(attempts(next(&t)), vec![na("c", 1)]);
        let t = h.complete("b");
        assert!(matches!(next(&t), DispatchOutcome::Waiting { .. }));
    }

    // ------------------------------------------------------------------ operator actions

    #[test]
    fn pause_with_in_flight_work_goes_pausing_then_paused_on_the_last_result() {
        let spec = AutomationV2Spec::new(
            "auto-pause",
            vec![
                N::task("a", &[]),
                N::task("b", &["a"]),
                N::task("c", &["a"]),
                N::task("d", &["b"]),
            ],
        );
        let (mut h, _) = H::started(spec);
        h.complete("a");
        let epoch = h.epoch;
        let t = h.pause(Some("  maintenance  "));
        assert_eq!(
            t.outcome,
            PauseOutcome::Pausing {
                in_flight: vec![
                    NodeAttempt {
                        node_id: "b".into(),
                        attempt: 1
                    },
                    NodeAttempt {
                        node_id: "c".into(),
                        attempt: 1
                    }
                ]
            }
        );
        assert_eq!(h.run.status, AutomationRunStatus::Pausing);
        assert_eq!(h.epoch, epoch, "pausing keeps the claim");
        assert_eq!(h.run.pause_reason.as_deref(), Some("maintenance"));
        assert_eq!(h.run.detail.as_deref(), Some(PAUSING_DETAIL));
        assert_eq!(h.events().last(), Some(&LIFECYCLE_RUN_PAUSE_REQUESTED));
        assert!(h.run.stop_kind.is_none(), "stop_kind unchanged");

        let t = h.complete("b");
        assert!(
            t.effects.tasks.is_empty(),
            "pausing starts nothing (d is ready)"
        );
        assert!(matches!(next(&t), DispatchOutcome::Waiting { .. }));
        assert_eq!(h.run.status, AutomationRunStatus::Pausing);

        let t = h.complete("c");
        assert_eq!(next(&t), &DispatchOutcome::Paused);
        assert_eq!(h.run.status, AutomationRunStatus::Paused);
        assert_eq!(h.epoch, epoch + 1, "settling ends the claim");
        assert_eq!(
            h.run.detail.as_deref(),
            Some("automation run paused by operator: maintenance")
        );
        let last = h.run.checkpoint.lifecycle_history.last().expect("record");
        assert_eq!(last.event, LIFECYCLE_RUN_PAUSED);
        assert_eq!(last.reason.as_deref(), Some("maintenance"));

        assert_eq!(h.resume().outcome, ResumeOutcome::Resumed);
        h.claim();
        let t = h.dispatch();
        assert_eq!(attempts(&t.outcome), vec![na("d", 1)]);
        h.complete("d");
        assert_eq!(h.run.status, AutomationRunStatus::Completed);
    }

    #[test]
    fn pause_without_in_flight_work_pauses_directly() {
        // Running, claimed but nothing dispatched yet.
        let mut h = H::new(sequential());
        h.claim();
        let t = h.pause(None);
        assert_eq!(t.outcome, PauseOutcome::Paused);
        assert_eq!(h.run.status, AutomationRunStatus::Paused);
        assert_eq!(h.events(), vec!["run_pause_requested", "run_paused"]);
        assert_eq!(h.run.detail.as_deref(), Some(OPERATOR_PAUSED_DETAIL));
        assert!(h.run.pause_reason.is_none());

        // Queued.
        let mut h = H::new(sequential());
        let t = h.pause(Some("later"));
        assert_eq!(t.outcome, PauseOutcome::Paused);
        assert_eq!(h.events(), vec!["run_pause_requested", "run_paused"]);
        assert_eq!(h.run.pause_reason.as_deref(), Some("later"));
        assert_eq!(t.outcome.http_status(), 200);
    }

    #[test]
    fn pause_of_other_statuses_is_409_not_pausable() {
        let (mut h, _) = H::started(sequential());
        h.pause(None);
        assert_eq!(h.run.status, AutomationRunStatus::Pausing);
        for status in [
            AutomationRunStatus::Pausing,
            AutomationRunStatus::Paused,
            AutomationRunStatus::AwaitingApproval,
            AutomationRunStatus::Completed,
            AutomationRunStatus::Blocked,
            AutomationRunStatus::Failed,
            AutomationRunStatus::Cancelled,
        ] {
            h.run.status = status;
            let before = h.run.clone();
            let t = h.pause(Some("x"));
            assert_eq!(t.outcome, PauseOutcome::NotPausable { status });
            assert_eq!(
                t.outcome.error_code(),
                Some("AUTOMATION_V2_RUN_NOT_PAUSABLE")
            );
            assert_eq!(t.outcome.http_status(), 409);
            assert!(!t.changed);
            assert_eq!(h.run, before);
        }
    }

    #[test]
    fn section_7_24_operator_resume_clears_pause_reason() {
        let mut h = H::new(sequential());
        h.pause(Some("lunch"));
        h.run.stop_kind = Some(AutomationStopKind::GuardrailStopped);
        h.run.stop_reason = Some("budget".into());
        let t = h.resume();
        assert_eq!(t.outcome, ResumeOutcome::Resumed);
        let run = &h.run;
        assert_eq!(run.status, AutomationRunStatus::Queued);
        assert!(run.pause_reason.is_none(), "§7.24 fixed");
        assert!(run.stop_kind.is_none());
        assert!(run.stop_reason.is_none());
        assert!(run.detail.is_none());
        assert_eq!(run.resume_reason.as_deref(), Some("operator resumed"));
        let last = run.checkpoint.lifecycle_history.last().expect("record");
        assert_eq!(last.event, LIFECYCLE_RUN_RESUMED);
        assert_eq!(last.reason.as_deref(), Some("operator resumed"));
        assert_eq!(
            last.metadata
                .as_ref()
                .map(|m| (&m["previous_pause_reason"], &m["previous_stop_kind"])),
            Some((&json!("lunch"), &json!("guardrail_stopped")))
        );
    }

    #[test]
    fn resume_of_a_run_that_is_not_paused_is_409() {
        let (mut h, _) = H::started(sequential());
        let before = h.run.clone();
        let t = h.resume();
        assert_eq!(
            t.outcome,
            ResumeOutcome::NotPaused {
                status: AutomationRunStatus::Running
            }
        );
        assert_eq!(t.outcome.error_code(), Some("AUTOMATION_V2_RUN_NOT_PAUSED"));
        assert_eq!(t.outcome.http_status(), 409);
        assert!(!t.changed);
        assert_eq!(h.run, before);
    }

    #[test]
    fn cancel_with_in_flight_work_cancels_tasks_and_drops_late_results() {
        let (mut h, _) = H::started(sequential());
        let late = h.result("a", TaskStatus::Completed, json!({}));
        let t = h.cancel();
        assert_eq!(
            t.outcome,
            CancelOutcome::Cancelled {
                previous: AutomationRunStatus::Running,
                cancelled_tasks: true
            }
        );
        assert_eq!(t.effects.cancel_tasks_of, vec![h.run.run_id.clone()]);
        let run = &h.run;
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
        assert_eq!(run.stop_kind, Some(AutomationStopKind::OperatorStopped));
        assert_eq!(run.stop_reason.as_deref(), Some(OPERATOR_CANCELLED_DETAIL));
        assert_eq!(run.finished_at_ms, Some(h.now));
        let last = run.checkpoint.lifecycle_history.last().expect("record");
        assert_eq!(last.event, LIFECYCLE_RUN_STOPPED);
        assert_eq!(last.stop_kind, Some(AutomationStopKind::OperatorStopped));

        // Late result, under the old epoch (what the worker holds) and the new one.
        assert_dropped(
            &mut h,
            &late,
            DropReason::RunNotActive {
                status: AutomationRunStatus::Cancelled,
            },
        );
    }

    #[test]
    fn cancel_covers_blocked_and_non_terminal_runs_and_reports_already_terminal() {
        // Queued: nothing in flight, so no task cancellation.
        let mut h = H::new(sequential());
        let t = h.cancel();
        assert_eq!(
            t.outcome,
            CancelOutcome::Cancelled {
                previous: AutomationRunStatus::Queued,
                cancelled_tasks: false
            }
        );
        assert!(t.effects.cancel_tasks_of.is_empty());

        // Blocked is cancellable.
        let (mut h, _) = H::started(sequential());
        h.report("a", TaskStatus::Blocked, json!({}));
        assert_eq!(h.run.status, AutomationRunStatus::Blocked);
        assert!(matches!(
            h.cancel().outcome,
            CancelOutcome::Cancelled {
                previous: AutomationRunStatus::Blocked,
                ..
            }
        ));

        // Awaiting approval keeps its gate (§7.25, kept).
        let spec = AutomationV2Spec::new(
            "auto-cancel-gate",
            vec![N::task("a", &[]), N::approval("gate", &["a"], &["a"])],
        );
        let (mut h, _) = H::started(spec);
        h.complete("a");
        assert_eq!(h.run.status, AutomationRunStatus::AwaitingApproval);
        let t = h.cancel();
        assert!(t.effects.cancel_tasks_of.is_empty());
        assert_eq!(h.run.status, AutomationRunStatus::Cancelled);
        assert!(h.run.checkpoint.awaiting_gate.is_some());

        for status in [
            AutomationRunStatus::Completed,
            AutomationRunStatus::Failed,
            AutomationRunStatus::Cancelled,
        ] {
            h.run.status = status;
            let before = h.run.clone();
            let t = h.cancel();
            assert_eq!(t.outcome, CancelOutcome::AlreadyTerminal { status });
            assert!(!t.changed);
            assert_eq!(h.run, before);
        }
    }

    // ------------------------------------------------------------------ orphans, idempotence

    #[test]
    fn orphaned_attempt_of_a_reaped_run_is_redispatched_with_repair_context_after_resume() {
        let (mut h, _) = H::started(sequential());
        let orphan = h.result("a", TaskStatus::Completed, json!({}));
        h.now = T0 + 700_000;
        let reaped = reap_stale_run(&mut h.run, Some(&h.spec), T0, 600_000, h.now);
        assert!(matches!(reaped.outcome, ReapOutcome::Reaped(_)));
        h.epoch += 1; // the store ends the claim
        assert_eq!(h.run.status, AutomationRunStatus::Paused);
        let resumed = auto_resume_stale_reaped(
            &mut h.run,
            Some(&h.spec),
            &GovernanceSnapshot::default(),
            &StaleSettings::default(),
            h.now,
        );
        assert!(resumed.changed);
        h.claim();
        assert_eq!(orphaned_nodes(&h.run, h.epoch), vec!["a"]);
        let t = h.dispatch();
        assert_eq!(attempts(&t.outcome), vec![na("a", 2)]);
        let repair = t.effects.tasks[0]
            .repair_context
            .clone()
            .expect("repair context");
        assert_eq!(repair["status"], "needs_repair");
        assert_eq!(repair["blocker_category"], "stale_no_provider_activity");
        assert!(orphaned_nodes(&h.run, h.epoch).is_empty());

        assert_dropped(
            &mut h,
            &orphan,
            DropReason::StaleEpoch { current: 3, got: 1 },
        );
        let t = h.complete("a");
        assert_eq!(attempts(next(&t)), vec![na("b", 1)]);
    }

    #[test]
    fn orphan_on_its_last_attempt_fails_the_run_instead_of_exceeding_max_attempts() {
        let spec =
            AutomationV2Spec::new("auto-orphan", vec![with_max_attempts(N::task("a", &[]), 1)]);
        let (mut h, _) = H::started(spec);
        h.pause(None);
        assert_eq!(h.run.status, AutomationRunStatus::Pausing);
        // The worker died: the sweeper settles the stuck pausing run.
        let settled = settle_pausing(&mut h.run, h.now);
        assert!(settled.changed);
        h.epoch += 1;
        h.resume();
        h.claim();
        let t = h.dispatch();
        assert_eq!(
            t.outcome,
            DispatchOutcome::Failed {
                node_id: "a".into()
            }
        );
        assert_eq!(h.run.checkpoint.attempts("a"), 1);
        let out = &h.run.checkpoint.node_outputs["a"];
        assert_eq!(out["status"], "failed");
        assert_eq!(out["failure_kind"], "run_failed");
        assert_eq!(
            out["summary"],
            "Node `a` produced no result in 1 attempt(s)."
        );
        assert!(t.effects.tasks.is_empty());
    }

    #[test]
    fn dispatch_is_a_noop_when_nothing_is_due_and_for_inactive_runs() {
        let (mut h, _) = H::started(sequential());
        let before = h.run.clone();
        let t = h.dispatch();
        assert!(!t.changed);
        assert!(t.effects.is_empty());
        assert_eq!(h.run, before);
        assert!(matches!(t.outcome, DispatchOutcome::Waiting { .. }));

        let mut q = H::new(sequential());
        let t = q.dispatch();
        assert_eq!(
            t.outcome,
            DispatchOutcome::NotActive {
                status: AutomationRunStatus::Queued
            }
        );
        assert!(!t.changed);
    }

    #[test]
    fn a_flow_that_cannot_progress_is_blocked() {
        let mut h = H::new(sequential());
        // "c" fell out of pending_nodes (a hand-edited or legacy checkpoint).
        h.run.checkpoint.pending_nodes.retain(|n| n != "c");
        h.claim();
        h.dispatch();
        h.complete("a");
        let t = h.complete("b");
        assert_eq!(
            next(&t),
            &DispatchOutcome::Blocked {
                node_ids: vec!["c".into()]
            }
        );
        assert_eq!(
            h.run.detail.as_deref(),
            Some("automation run blocked: no runnable node remains; incomplete: c")
        );
    }

    #[test]
    fn node_settlement_records_are_the_reapers_settled_events() {
        for e in [
            LIFECYCLE_NODE_COMPLETED,
            LIFECYCLE_NODE_REPAIR_REQUESTED,
            LIFECYCLE_NODE_FAILED,
            LIFECYCLE_NODE_BLOCKED,
        ] {
            assert!(crate::sweeps::NODE_SETTLED_EVENTS.contains(&e), "{e}");
        }
        let (h, _) = H::started(AutomationV2Spec::new(
            "auto-two",
            vec![N::task("a", &[]), N::task("b", &[])],
        ));
        let flying: Vec<String> = in_flight_nodes(&h.run, h.epoch)
            .into_iter()
            .map(|a| a.node_id)
            .collect();
        assert_eq!(flying, in_progress_node_ids(&h.run));
        assert!(in_flight_nodes(&h.run, h.epoch + 1).is_empty());
    }

    // ------------------------------------------------------------------ property

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        /// Per node: dependency mask over earlier nodes, max attempts, kind (0 = approval).
        fn flows() -> impl Strategy<Value = Vec<(u8, u64, u8)>> {
            proptest::collection::vec((any::<u8>(), 1u64..=3, 0u8..8), 1..=7)
        }

        fn build(nodes: &[(u8, u64, u8)]) -> AutomationV2Spec {
            let names: Vec<String> = (0..nodes.len()).map(|i| format!("n{i}")).collect();
            let flow = nodes
                .iter()
                .enumerate()
                .map(|(i, (mask, max, kind))| {
                    let deps: Vec<&str> = (0..i)
                        .filter(|j| mask & (1u8 << j) != 0)
                        .map(|j| names[j].as_str())
                        .collect();
                    let node = if *kind == 0 && i > 0 {
                        N::approval(&names[i], &deps, &[])
                    } else {
                        N::task(&names[i], &deps)
                    };
                    with_max_attempts(node, *max)
                })
                .collect();
            AutomationV2Spec::new("auto-prop", flow)
        }

        fn pick_status(b: u8) -> TaskStatus {
            match b % 10 {
                0..=5 => TaskStatus::Completed,
                6 | 7 => TaskStatus::NeedsRepair,
                8 => TaskStatus::Failed,
                _ => TaskStatus::Blocked,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]

            #[test]
            fn prop_driving_results_to_quiescence_terminates_without_double_dispatch(
                nodes in flows(),
                script in proptest::collection::vec(any::<u8>(), 64..256),
                token_limit in proptest::option::of(2u64..30),
            ) {
                let mut spec = build(&nodes);
                spec.execution = Some(AutomationExecutionPolicy {
                    max_total_tokens: token_limit,
                    ..Default::default()
                });
                let max_of = |id: &str| spec.node(id).map(node_max_attempts).unwrap_or(0);
                let mut h = H::new(spec.clone());
                let mut outstanding: Vec<TaskMessage> = Vec::new();
                let mut delivered: Vec<TaskResult> = Vec::new();
                let mut seen: BTreeSet<(String, u32)> = BTreeSet::new();
                let (mut operator, mut resumes, mut decisions) = (0, 0, 0);
                let mut cursor = 0usize;
                let mut byte = || {
                    let b = script[cursor % script.len()];
                    cursor += 1;
                    b
                };
                let mut quiescent = false;

                for _ in 0..2_000 {
                    // Invariants after every step.
                    for n in &spec.flow.nodes {
                        prop_assert!(h.run.checkpoint.attempts(&n.node_id) <= max_of(&n.node_id));
                    }
                    if matches!(h.run.status, AutomationRunStatus::Running | AutomationRunStatus::Pausing) {
                        prop_assert!(
                            !in_flight_nodes(&h.run, h.epoch).is_empty(),
                            "an active run always has work in flight: {:?}", h.run.detail
                        );
                    }

                    let mut new_tasks: Vec<TaskMessage> = Vec::new();
                    match h.run.status {
                        AutomationRunStatus::Queued => {
                            prop_assert_eq!(h.claim().outcome, ClaimOutcome::Claimed);
                            new_tasks.extend(h.dispatch().effects.tasks);
                        }
                        AutomationRunStatus::Running | AutomationRunStatus::Pausing => {
                            let b = byte();
                            if b < 10 && operator < 4 && h.run.status == AutomationRunStatus::Running {
                                operator += 1;
                                prop_assert!(h.pause(Some("prop")).changed);
                            } else if b < 13 && operator < 4 {
                                operator += 1;
                                let t = h.cancel();
                                prop_assert!(t.changed);
                                prop_assert_eq!(t.effects.cancel_tasks_of.len(), 1);
                            } else if b < 50 && !delivered.is_empty() {
                                let r = delivered[usize::from(byte()) % delivered.len()].clone();
                                let before = h.run.clone();
                                let t = h.deliver(&r);
                                prop_assert!(matches!(t.outcome, ResultOutcome::Dropped { .. }), "{:?}", t.outcome);
                                prop_assert!(!t.changed);
                                prop_assert_eq!(&h.run, &before);
                            } else {
                                prop_assert!(!outstanding.is_empty());
                                let task = outstanding.remove(usize::from(byte()) % outstanding.len());
                                let mut r = h.result(&task.node_id, pick_status(byte()), json!({"summary": "s"}));
                                r.attempt = task.attempt;
                                r.lease_epoch = task.lease_epoch;
                                r.usage.prompt_tokens = 1;
                                let current = task.lease_epoch == h.epoch;
                                let before = h.run.clone();
                                let t = h.deliver(&r);
                                if current {
                                    prop_assert!(
                                        matches!(t.outcome, ResultOutcome::Applied { .. }),
                                        "an in-flight result of the current claim applies: {:?}", t.outcome
                                    );
                                } else {
                                    prop_assert!(matches!(t.outcome, ResultOutcome::Dropped { .. }), "{:?}", t.outcome);
                                    prop_assert_eq!(&h.run, &before);
                                }
                                delivered.push(r);
                                new_tasks.extend(t.effects.tasks);
                            }
                        }
                        AutomationRunStatus::Paused if resumes < 3 => {
                            resumes += 1;
                            prop_assert_eq!(h.resume().outcome, ResumeOutcome::Resumed);
                        }
                        AutomationRunStatus::AwaitingApproval if decisions < 4 => {
                            decisions += 1;
                            let decision = if byte() < 30 { "cancel" } else { "approve" };
                            let t = decide_gate(
                                &mut h.run,
                                &spec,
                                &h.defaults,
                                &GateDecisionRequest::new(decision, GovernanceActorRef::human("r")),
                                h.now,
                            );
                            prop_assert!(t.changed);
                        }
                        _ => {
                            quiescent = true;
                            break;
                        }
                    }
                    for task in new_tasks {
                        prop_assert_eq!(task.lease_epoch, h.epoch);
                        prop_assert!(task.attempt >= 1 && task.attempt <= max_of(&task.node_id));
                        let node = spec.node(&task.node_id).expect("known node");
                        prop_assert!(!node.is_approval());
                        for d in &node.depends_on {
                            prop_assert!(h.run.checkpoint.is_completed(d));
                        }
                        prop_assert!(
                            seen.insert((task.node_id.clone(), task.attempt)),
                            "({}, {}) dispatched twice", task.node_id, task.attempt
                        );
                        outstanding.push(task);
                    }
                }

                prop_assert!(quiescent, "the drive terminated");
                let status = h.run.status;
                prop_assert!(
                    status.is_terminal()
                        || matches!(status, AutomationRunStatus::AwaitingApproval | AutomationRunStatus::Paused),
                    "ended in {status}"
                );
                if status == AutomationRunStatus::Completed {
                    for n in &spec.flow.nodes {
                        prop_assert!(h.run.checkpoint.is_completed(&n.node_id));
                    }
                    prop_assert_eq!(h.run.detail.as_deref(), Some(COMPLETED_DETAIL));
                }
                // Every attempt number of a node was dispatched exactly once, in order.
                for n in &spec.flow.nodes {
                    let got: Vec<u32> = seen.iter().filter(|(id, _)| *id == n.node_id).map(|(_, a)| *a).collect();
                    let want: Vec<u32> = (1..=h.run.checkpoint.attempts(&n.node_id)).collect();
                    prop_assert_eq!(got, want);
                }
                let started = h.run.checkpoint.lifecycle_history.iter().filter(|r| r.event == NODE_STARTED).count();
                prop_assert_eq!(started, seen.len());
                // Late deliveries of everything still outstanding change nothing.
                for task in outstanding {
                    let mut r = h.result(&task.node_id, TaskStatus::Completed, json!({}));
                    r.attempt = task.attempt;
                    r.lease_epoch = task.lease_epoch;
                    let before = h.run.clone();
                    let t = h.deliver(&r);
                    prop_assert!(!t.changed);
                    prop_assert_eq!(&h.run, &before);
                }
            }
        }
    }
}
