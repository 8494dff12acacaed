//! Approval gates (spec §4): opening, human decisions, expiry, escalation, reminders, stale
//! marking and recovery of settled decisions.
//!
//! Every public transition is pure: it takes the run row (locked by the caller), the database's
//! `now`, and returns a [`Transition`] whose effects (lifecycle, audit, events) are persisted with
//! the row in one transaction. Functions named `apply_*` are the closure-level primitives upstream
//! calls inside `update_automation_v2_run`; call them only inside [`update`].
//!
//! Gate *instances*: a gate node can be opened several times in one run (rework, task retry,
//! recover). An instance is identified by `(node_id, requested_at_ms)`. Upstream identifies gates
//! by `node_id` only (spec §7.13, race R5); here every guard is instance-scoped:
//! * a history record belongs to the open instance iff `decided_at_ms >= requested_at_ms`;
//! * a new instance starts strictly after the node's latest history record ([`open_gate`]) and a
//!   decision is never recorded before its instance started, so instance windows never overlap.

use crate::config::GatePolicyDefaults;
use crate::effects::{AuditDraft, Effects, Transition, update};
use crate::graph;
use crate::model::{
    AutomationFlowNode, AutomationGateDecisionRecord, AutomationGateExpiryAction,
    AutomationGateExpiryPolicy, AutomationPendingGate, AutomationRunStatus, AutomationStopKind,
    AutomationV2RunRecord, AutomationV2Spec, GovernanceActorRef, Millis,
};
use crate::policy::{self, EffectivePolicy};
use serde_json::{Map, Value, json};

/// Engine event emitted when a gate opens (new in Tandem Fleet; upstream emits nothing, §7.14).
pub const EVENT_GATE_REQUESTED: &str = "approval.gate.requested";
/// Engine event of the expiry sweep (spec §3.10).
pub const EVENT_GATE_EXPIRED: &str = "approval.gate.expired";
/// Engine event of the escalation sweep (spec §3.10).
pub const EVENT_GATE_ESCALATED: &str = "approval.gate.escalated";
/// Engine event of the reminder sweep (spec §3.10).
pub const EVENT_GATE_REMINDER_DUE: &str = "approval.gate.reminder_due";
/// Engine event of a human decision (spec §4.2 step 14).
pub const EVENT_DECISION_RECORDED: &str = "approval.decision.recorded";
/// Protected audit of an applied human decision (spec §3.15).
pub const AUDIT_GATE_DECIDED: &str = "automation.governance.gate_decided";
/// Protected audit of a refused human decision (spec §3.15).
pub const AUDIT_GATE_DECISION_DENIED: &str = "automation.governance.gate_decision_denied";

/// Lifecycle event of an expiry (spec §3.14, §4.4).
pub const LIFECYCLE_GATE_EXPIRED: &str = "approval_gate_expired";
/// Lifecycle event of an escalation (spec §3.14, §3.10).
pub const LIFECYCLE_GATE_ESCALATED: &str = "approval_gate_escalated";
/// Lifecycle event of a reminder (spec §3.14, §3.10).
pub const LIFECYCLE_GATE_REMINDER_DUE: &str = "approval_gate_reminder_due";
/// Lifecycle event of the stale marker (spec §3.14, §3.11).
pub const LIFECYCLE_GATE_MARKED_STALE: &str = "approval_gate_marked_stale";
/// Lifecycle event of a recovered settled decision (spec §3.14, §4.5).
pub const LIFECYCLE_GATE_DECISION_RECOVERED: &str = "approval_gate_decision_recovered";
/// Lifecycle event of a gate cancel or expiry (spec §3.14, §4.3, §4.4).
pub const LIFECYCLE_RUN_CANCELLED: &str = "run_cancelled";

/// `stale_policy` value of the stale marker (spec §1.7, §3.11).
pub const STALE_POLICY: &str = "manual_only_visible_status";
/// `escalated_to` when the policy names nobody (spec §3.10).
pub const UNASSIGNED_ESCALATION_PRINCIPAL: &str = "unassigned_escalation_principal";
/// Detail of a run whose approval node has no gate config (spec §4.1).
pub const MISSING_GATE_CONFIG_DETAIL: &str = "approval node missing gate config";
/// Detail of the late-decision denial (spec §4.2 step 11).
pub const GATE_EXPIRED_DETAIL: &str = "Approval gate expired before this decision was submitted";

/// 409 of the gate endpoint: not awaiting approval / already decided (spec §4.2 steps 5, 13).
pub const CODE_NOT_AWAITING_APPROVAL: &str = "AUTOMATION_V2_RUN_NOT_AWAITING_APPROVAL";
/// 409: awaiting approval without any gate (spec §4.2 step 7).
pub const CODE_GATE_MISSING: &str = "AUTOMATION_V2_RUN_GATE_MISSING";
/// 400: not `approve|rework|cancel` (spec §4.2 step 8), or not offered by the gate (§7.15).
pub const CODE_INVALID_DECISION: &str = "AUTOMATION_V2_GATE_INVALID_DECISION";
/// 404: the gate node is not in the automation (spec §4.2 step 9).
pub const CODE_GATE_NODE_NOT_FOUND: &str = "AUTOMATION_V2_GATE_NODE_NOT_FOUND";
/// 409: late decision on an expired cancel-policy gate (spec §4.2 step 11).
pub const CODE_GATE_EXPIRED: &str = "AUTOMATION_V2_GATE_EXPIRED";

const SWEEP_GATE_POLICIES: &str = "process_awaiting_approval_gate_policies";
const SWEEP_MARK_STALE: &str = "mark_stale_awaiting_approval_runs";
const SWEEP_RECOVER: &str = "recover_in_flight_runs";

/// Where a human decides a run's gate (spec §4.7 `decide_endpoint`).
pub fn decide_endpoint(run_id: &str) -> String {
    format!("/automations/v2/runs/{run_id}/gate")
}

/// `notification_key` of a reminder (`kind = "reminder"`) or escalation (`"escalated"`), spec
/// §3.10: `automation_v2:{run_id}:{node_id}:{kind}:{n}`.
pub fn notification_key(run_id: &str, node_id: &str, kind: &str, count: u64) -> String {
    format!("automation_v2:{run_id}:{node_id}:{kind}:{count}")
}

// ------------------------------------------------------------------------------------------------
// Decisions
// ------------------------------------------------------------------------------------------------

/// A human gate decision (spec §4.2 step 8). `expired` is only ever written by the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GateDecision {
    Approve,
    Rework,
    Cancel,
}

impl GateDecision {
    pub const ALL: [GateDecision; 3] = [Self::Approve, Self::Rework, Self::Cancel];

    /// The HTTP normalisation: trimmed, lower-cased, exactly `approve|rework|cancel`.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "approve" => Some(Self::Approve),
            "rework" => Some(Self::Rework),
            "cancel" => Some(Self::Cancel),
            _ => None,
        }
    }

    /// The aggregator's mapping of a gate's `decisions` labels (spec §4.7).
    pub fn from_gate_label(label: &str) -> Option<Self> {
        match label.trim().to_ascii_lowercase().as_str() {
            "approve" => Some(Self::Approve),
            "rework" | "changes" | "request_changes" | "ask_changes" => Some(Self::Rework),
            "cancel" | "reject" | "deny" => Some(Self::Cancel),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Rework => "rework",
            Self::Cancel => "cancel",
        }
    }
}

/// The decisions a gate offers, as the pending-approvals aggregator lists them (spec §4.7): its
/// `decisions` labels mapped, plus `rework` when it has rework targets. In
/// [`GateDecision::ALL`] order, deduplicated.
pub fn offered_decisions(gate: &AutomationPendingGate) -> Vec<GateDecision> {
    let mut offered: Vec<GateDecision> = gate
        .decisions
        .iter()
        .filter_map(|l| GateDecision::from_gate_label(l))
        .collect();
    if !gate.rework_targets.is_empty() {
        offered.push(GateDecision::Rework);
    }
    offered.sort();
    offered.dedup();
    offered
}

/// Whether `decision` may be applied to `gate` (fix of spec §7.15). A gate without a
/// `decisions` list (legacy definitions) accepts all three, as upstream does.
pub fn decision_offered(gate: &AutomationPendingGate, decision: GateDecision) -> bool {
    gate.decisions.is_empty() || offered_decisions(gate).contains(&decision)
}

/// A human decision as the gate endpoint receives it (spec §4.2).
#[derive(Debug, Clone, PartialEq)]
pub struct GateDecisionRequest {
    /// Raw decision string; normalised by [`GateDecision::parse`].
    pub decision: String,
    /// Raw reason; trimmed, empty becomes `None` (spec §4.2 step 10).
    pub reason: Option<String>,
    /// The resolved, verified decider.
    pub decided_by: GovernanceActorRef,
    /// The gate node the client saw (e.g. from the approval `request_id`), race R5.
    pub gate_node_id: Option<String>,
    /// The gate instance the client saw (`requested_at_ms` from `/approvals/pending` or the
    /// `approval.gate.requested` event), race R5. `None` keeps upstream behaviour.
    pub gate_requested_at_ms: Option<Millis>,
}

impl GateDecisionRequest {
    pub fn new(decision: &str, decided_by: GovernanceActorRef) -> Self {
        Self {
            decision: decision.into(),
            reason: None,
            decided_by,
            gate_node_id: None,
            gate_requested_at_ms: None,
        }
    }

    pub fn with_reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Names the gate instance this decision is aimed at (race R5).
    pub fn for_instance(mut self, node_id: &str, requested_at_ms: Millis) -> Self {
        self.gate_node_id = Some(node_id.into());
        self.gate_requested_at_ms = Some(requested_at_ms);
        self
    }
}

/// A refusal by the caller's reviewer authorization (spec §4.2 step 12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateDenial {
    /// e.g. `AUTOMATION_V2_GATE_SELF_APPROVAL_FORBIDDEN`.
    pub code: String,
    pub detail: String,
}

/// Result of [`decide_gate`]. Only `Applied` changes the run.
// `Applied` carries the whole gate (one value per HTTP decision, never stored in bulk); boxing it
// would change the variant's shape for every caller for no measurable gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum GateDecisionOutcome {
    /// The decision was recorded; effects hold the `gate_decided` audit and the
    /// `approval.decision.recorded` event.
    Applied {
        gate: AutomationPendingGate,
        record: AutomationGateDecisionRecord,
    },
    /// Not awaiting approval, already settled, or no longer pending (409 with
    /// `winningDecision`).
    AlreadyDecided(Option<AutomationGateDecisionRecord>),
    /// The request named a gate instance other than the open one (race R5); `winner` is the
    /// decision that closed the named instance, when one was recorded.
    StaleInstance {
        winner: Option<AutomationGateDecisionRecord>,
        open_requested_at_ms: Millis,
    },
    /// Awaiting approval but no gate, open or recoverable (409 `AUTOMATION_V2_RUN_GATE_MISSING`).
    GateMissing,
    /// Not `approve|rework|cancel` after normalisation (400).
    InvalidDecision,
    /// A valid decision the gate does not offer (400, spec §7.15 fix).
    DecisionNotOffered {
        decision: GateDecision,
        offered: Vec<GateDecision>,
    },
    /// The gate node is not in the automation (404).
    GateNodeNotFound { node_id: String },
    /// A cancel policy's expiry passed (409). The run is unchanged; the caller must append
    /// `audit` (`automation.governance.gate_decision_denied`).
    GateExpired { audit: AuditDraft },
    /// Refused by the caller's authorizer (403). The run is unchanged; append `audit`.
    Denied {
        denial: GateDenial,
        audit: AuditDraft,
    },
}

impl GateDecisionOutcome {
    /// The upstream error code for a refusal; `None` for `Applied`.
    pub fn error_code(&self) -> Option<&str> {
        match self {
            Self::Applied { .. } => None,
            Self::AlreadyDecided(_) | Self::StaleInstance { .. } => {
                Some(CODE_NOT_AWAITING_APPROVAL)
            }
            Self::GateMissing => Some(CODE_GATE_MISSING),
            Self::InvalidDecision | Self::DecisionNotOffered { .. } => Some(CODE_INVALID_DECISION),
            Self::GateNodeNotFound { .. } => Some(CODE_GATE_NODE_NOT_FOUND),
            Self::GateExpired { .. } => Some(CODE_GATE_EXPIRED),
            Self::Denied { denial, .. } => Some(&denial.code),
        }
    }

    /// The HTTP status upstream answers with (200 for `Applied`).
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Applied { .. } => 200,
            Self::AlreadyDecided(_)
            | Self::StaleInstance { .. }
            | Self::GateMissing
            | Self::GateExpired { .. } => 409,
            Self::InvalidDecision | Self::DecisionNotOffered { .. } => 400,
            Self::GateNodeNotFound { .. } => 404,
            Self::Denied { .. } => 403,
        }
    }

    /// The record for the 409 body's `winningDecision`.
    pub fn winning_decision(&self) -> Option<&AutomationGateDecisionRecord> {
        match self {
            Self::AlreadyDecided(w) | Self::StaleInstance { winner: w, .. } => w.as_ref(),
            _ => None,
        }
    }

    /// Any audit the caller must append although the run did not change.
    pub fn denial_audit(&self) -> Option<&AuditDraft> {
        match self {
            Self::GateExpired { audit } | Self::Denied { audit, .. } => Some(audit),
            _ => None,
        }
    }
}

/// Result of the closure-level primitives [`apply_gate_decision`] and [`apply_gate_expiry`]
/// (upstream `AutomationGateDecisionOutcome`).
#[derive(Debug, Clone, PartialEq)]
pub enum GateApply {
    Applied(AutomationGateDecisionRecord),
    AlreadyDecided(Option<AutomationGateDecisionRecord>),
}

// ------------------------------------------------------------------------------------------------
// Instance-scoped history queries
// ------------------------------------------------------------------------------------------------

/// The latest history record for `node_id`, any instance (spec §1.8).
pub fn latest_record<'a>(
    run: &'a AutomationV2RunRecord,
    node_id: &str,
) -> Option<&'a AutomationGateDecisionRecord> {
    run.checkpoint
        .gate_history
        .iter()
        .rev()
        .find(|r| r.node_id == node_id)
}

/// `settled_gate_decision`, scoped to the gate *instance* (fix of spec §7.13): the latest record
/// for the gate's node decided at or after the instance opened, unless it is `rework`.
/// Decisions of earlier instances never settle a re-opened gate.
pub fn settled_decision<'a>(
    run: &'a AutomationV2RunRecord,
    gate: &AutomationPendingGate,
) -> Option<&'a AutomationGateDecisionRecord> {
    run.checkpoint
        .gate_history
        .iter()
        .rev()
        .find(|r| r.node_id == gate.node_id && r.decided_at_ms >= gate.requested_at_ms)
        .filter(|r| r.decision != "rework")
}

/// Spec §4.3 step 2, instance-scoped: the run awaits approval and either its open gate is this
/// instance (same node *and* `requested_at_ms`; upstream compares the node only, race R5), or no
/// gate is open and the node is pending with no history at all (a recovered gate).
fn gate_is_pending(run: &AutomationV2RunRecord, gate: &AutomationPendingGate) -> bool {
    run.status == AutomationRunStatus::AwaitingApproval
        && match &run.checkpoint.awaiting_gate {
            Some(open) => {
                open.node_id == gate.node_id && open.requested_at_ms == gate.requested_at_ms
            }
            None => {
                run.checkpoint.is_pending(&gate.node_id)
                    && !run
                        .checkpoint
                        .gate_history
                        .iter()
                        .any(|r| r.node_id == gate.node_id)
            }
        }
}

/// The first decision recorded for `node_id` in the instance that opened at `since` (and before
/// `until`, the next instance), i.e. the decision that closed it.
fn instance_closing_record(
    run: &AutomationV2RunRecord,
    node_id: &str,
    since: Millis,
    until: Option<Millis>,
) -> Option<AutomationGateDecisionRecord> {
    run.checkpoint
        .gate_history
        .iter()
        .find(|r| {
            r.node_id == node_id
                && r.decided_at_ms >= since
                && until.is_none_or(|u| r.decided_at_ms < u)
        })
        .cloned()
}

/// When the next instance of `node_id` may start: `now`, or just after the node's latest
/// decision when that is not earlier (same-millisecond re-open), so instance windows never
/// overlap and an old decision can never be read as the new instance's.
fn next_instance_start(run: &AutomationV2RunRecord, node_id: &str, now: Millis) -> Millis {
    latest_record(run, node_id).map_or(now, |r| now.max(r.decided_at_ms.saturating_add(1)))
}

// ------------------------------------------------------------------------------------------------
// Building and opening gates
// ------------------------------------------------------------------------------------------------

/// The node-metadata locations of an expiry policy, in upstream's order of precedence (§4.1).
const METADATA_POLICY_POINTERS: [&str; 4] = [
    "/approval/expiry_policy",
    "/approval/gate_expiry_policy",
    "/approval/policy/expiry",
    "/approval/policy/gate_expiry",
];

/// The first policy under `node.metadata.approval` that deserializes (spec §4.1).
pub fn expiry_policy_from_node_metadata(
    node: &AutomationFlowNode,
) -> Option<AutomationGateExpiryPolicy> {
    METADATA_POLICY_POINTERS.iter().find_map(|p| {
        node.metadata_at(p)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    })
}

/// Validates the expiry policy each gate node would open with (spec §4.1 precedence:
/// `gate.expiry_policy`, else the first policy under `metadata.approval` that deserializes) with
/// [`policy::validate_expiry_policy`]. Call it with `graph::validate_flow` when an automation is
/// created or updated and answer 400 with the error's `path` and `message`, e.g.
/// `flow.nodes[1].gate.expiry_policy.steps[2].action`: `unknown action "page"; …`.
pub fn validate_gate_policies(spec: &AutomationV2Spec) -> Result<(), graph::FlowError> {
    for (i, node) in spec.flow.nodes.iter().enumerate() {
        let Some(gate) = &node.gate else {
            continue;
        };
        let (base, policy) = if let Some(p) = &gate.expiry_policy {
            (format!("flow.nodes[{i}].gate.expiry_policy"), p.clone())
        } else if let Some((pointer, p)) = METADATA_POLICY_POINTERS.iter().find_map(|ptr| {
            node.metadata_at(ptr)
                .and_then(|v| serde_json::from_value::<AutomationGateExpiryPolicy>(v.clone()).ok())
                .map(|p| (*ptr, p))
        }) {
            (
                format!("flow.nodes[{i}].metadata{}", pointer.replace('/', ".")),
                p,
            )
        } else {
            continue;
        };
        policy::validate_expiry_policy(&policy).map_err(|e| graph::FlowError {
            path: format!("{base}.{}", e.path),
            message: e.message,
        })?;
    }
    Ok(())
}

/// `build_automation_pending_gate` (spec §4.1). `None` when the node has no `gate` config.
///
/// * `title`: `metadata.builder.title`, else the objective;
/// * `instructions`, `decisions`, `rework_targets` from `node.gate`;
/// * `upstream_node_ids` = `depends_on`; `metadata` = `metadata.approval.metadata`;
/// * `expiry_policy` = `gate.expiry_policy`, else [`expiry_policy_from_node_metadata`].
pub fn build_pending_gate(node: &AutomationFlowNode, now: Millis) -> Option<AutomationPendingGate> {
    let gate = node.gate.as_ref()?;
    Some(AutomationPendingGate {
        node_id: node.node_id.clone(),
        title: node
            .metadata_at("/builder/title")
            .and_then(Value::as_str)
            .unwrap_or(&node.objective)
            .to_owned(),
        instructions: gate.instructions.clone(),
        decisions: gate.decisions.clone(),
        rework_targets: gate.rework_targets.clone(),
        requested_at_ms: now,
        upstream_node_ids: node.depends_on.clone(),
        // JSON null is "absent": the stored record omits it, so keep the round trip stable.
        metadata: node
            .metadata_at("/approval/metadata")
            .filter(|v| !v.is_null())
            .cloned(),
        expiry_policy: gate
            .expiry_policy
            .clone()
            .or_else(|| expiry_policy_from_node_metadata(node)),
    })
}

/// The gate a human decision applies to (spec §4.2 step 7): the open gate, else the recovered
/// gate — the first flow node that is pending, has no gate history and is an approval node,
/// built with `requested_at_ms = max(updated_at_ms, created_at_ms)`.
pub fn decision_gate(
    run: &AutomationV2RunRecord,
    automation: &AutomationV2Spec,
) -> Option<AutomationPendingGate> {
    if let Some(open) = &run.checkpoint.awaiting_gate {
        return Some(open.clone());
    }
    let node = automation.flow.nodes.iter().find(|n| {
        run.checkpoint.is_pending(&n.node_id)
            && !run
                .checkpoint
                .gate_history
                .iter()
                .any(|r| r.node_id == n.node_id)
            && n.is_approval()
    })?;
    build_pending_gate(node, run.updated_at_ms.max(run.created_at_ms))
}

/// What [`open_gate`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum OpenGateOutcome {
    /// The run now awaits approval on this gate.
    Opened(Box<AutomationPendingGate>),
    /// The gate candidate is an approval node only by `stage_kind`: the run failed with
    /// `approval node missing gate config`.
    MissingGateConfig { node_id: String },
    /// The run is not running, or task work is still runnable, or no approval node is runnable.
    NoGate,
}

/// The executor's gate step (spec §4.1, `pause_automation_run_for_gate`): when only approval
/// nodes are runnable, the first one becomes the gate. The run goes to `awaiting_approval` with
/// detail ``awaiting approval for gate `{node}` ``, `awaiting_gate` set and `blocked_nodes` = the
/// gate's transitive descendants.
///
/// Compatibility decisions (docs/compatibility.md):
/// * emits the engine event `approval.gate.requested` (upstream emits nothing, §7.14) with
///   `{run_id, automation_id, node_id, title, requested_at_ms, expires_at_ms?, decide_endpoint,
///   tenantContext}`;
/// * writes **no** lifecycle record, as upstream: `lifecycle_history` is client-visible and
///   compared by golden projections; the event, the status and the gate already record it;
/// * `requested_at_ms` is `now`, or 1 ms after the node's latest decision when that is not
///   earlier, so a same-millisecond re-open is still a distinct instance (§7.13).
pub fn open_gate(
    run: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    defaults: &GatePolicyDefaults,
    now: Millis,
) -> Transition<OpenGateOutcome> {
    if run.status != AutomationRunStatus::Running {
        return Transition::unchanged(OpenGateOutcome::NoGate);
    }
    let Some(node) = graph::gate_candidate(automation, &run.checkpoint) else {
        return Transition::unchanged(OpenGateOutcome::NoGate);
    };
    let node_id = node.node_id.clone();
    let Some(mut gate) = build_pending_gate(node, now) else {
        return update(run, now, |run, _| {
            run.status = AutomationRunStatus::Failed;
            run.detail = Some(MISSING_GATE_CONFIG_DETAIL.into());
            OpenGateOutcome::MissingGateConfig { node_id }
        });
    };
    gate.requested_at_ms = next_instance_start(run, &node_id, now);
    let blocked: Vec<String> = graph::descendants(automation, std::slice::from_ref(&node_id))
        .into_iter()
        .collect();
    update(run, now, |run, fx| {
        run.status = AutomationRunStatus::AwaitingApproval;
        run.detail = Some(format!("awaiting approval for gate `{node_id}`"));
        run.checkpoint.awaiting_gate = Some(gate.clone());
        run.checkpoint.blocked_nodes = blocked;
        let mut props = json!({
            "run_id": run.run_id,
            "automation_id": run.automation_id,
            "node_id": node_id,
            "title": gate.title,
            "requested_at_ms": gate.requested_at_ms,
            "decide_endpoint": decide_endpoint(&run.run_id),
            "tenantContext": run.tenant_context.to_value(),
        });
        if let (Some(p), Some(obj)) = (
            policy::effective_policy(&gate, defaults),
            props.as_object_mut(),
        ) {
            obj.insert(
                "expires_at_ms".into(),
                json!(policy::expires_at_ms(&gate, &p)),
            );
        }
        fx.event(run, EVENT_GATE_REQUESTED, Some(&node_id), props, None);
        OpenGateOutcome::Opened(Box::new(gate))
    })
}

// ------------------------------------------------------------------------------------------------
// Runtime state
// ------------------------------------------------------------------------------------------------

/// `automation_blocked_nodes` (spec §4.3 step 5): pending nodes (flow order) with a dependency
/// not completed.
/// Upstream also blocks nodes of phases that are not open yet; phases are not modelled here.
pub fn blocked_nodes(automation: &AutomationV2Spec, run: &AutomationV2RunRecord) -> Vec<String> {
    automation
        .flow
        .nodes
        .iter()
        .filter(|n| run.checkpoint.is_pending(&n.node_id))
        .filter(|n| n.depends_on.iter().any(|d| !run.checkpoint.is_completed(d)))
        .map(|n| n.node_id.clone())
        .collect()
}

/// `refresh_automation_runtime_state` (spec §4.3 step 5): recomputes `blocked_nodes` (the
/// `phase_opened` lifecycle event of upstream's phases is out of scope).
pub fn refresh_runtime_state(automation: &AutomationV2Spec, run: &mut AutomationV2RunRecord) {
    run.checkpoint.blocked_nodes = blocked_nodes(automation, run);
}

// ------------------------------------------------------------------------------------------------
// Human decisions
// ------------------------------------------------------------------------------------------------

/// The denial audit `automation.governance.gate_decision_denied` (spec §3.15): actor = the
/// decider's `actor_id`, else its `source`; tenant = the run's; `nodeID`/`resource` null when no
/// gate is known (e.g. a non-human decider).
pub fn gate_decision_denied_audit(
    run: &AutomationV2RunRecord,
    gate: Option<&AutomationPendingGate>,
    actor: &GovernanceActorRef,
    code: &str,
    detail: &str,
) -> AuditDraft {
    AuditDraft {
        event_type: AUDIT_GATE_DECISION_DENIED.into(),
        actor: actor.actor_id.clone().or_else(|| actor.source.clone()),
        tenant_context: run.tenant_context.clone(),
        payload: json!({
            "runID": run.run_id,
            "automationID": run.automation_id,
            "nodeID": gate.map(|g| g.node_id.clone()),
            "resource": gate.map(|g| json!({
                "kind": "approval",
                "id": format!("{}:{}", run.automation_id, g.node_id),
            })),
            "decision": "denied",
            "code": code,
            "detail": detail,
            "actor": actor,
        }),
    }
}

/// [`decide_gate_with`] without a reviewer authorizer (the caller authorized beforehand).
pub fn decide_gate(
    run: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    defaults: &GatePolicyDefaults,
    request: &GateDecisionRequest,
    now: Millis,
) -> Transition<GateDecisionOutcome> {
    decide_gate_with(run, automation, defaults, request, now, |_, _| Ok(()))
}

/// A human gate decision on the locked row: spec §4.2 steps 5–14 with §4.3 applied.
///
/// Order of checks (upstream's, with our fixes marked):
/// 5. status is not `awaiting_approval` → `AlreadyDecided(winner)`; the winner is this gate's
///    latest record when the node is known (request or the leftover gate of an operator cancel,
///    §7.25), else the last record of any node (upstream, §7.16 fixed where possible);
/// 7. gate = open gate, else the recovered gate → else `GateMissing`;
/// 8. decision normalised (trim + lowercase) → else `InvalidDecision`;
///    *fix §7.15*: a decision the gate does not offer → `DecisionNotOffered`;
/// 9. gate node not in `automation` → `GateNodeNotFound`;
/// 10. reason trimmed, empty → `None`;
///    *fix R5*: a request naming another instance → `StaleInstance` (nothing changes);
/// 11. late decision on an expired cancel-policy gate → `GateExpired` with the denial audit;
/// 12. `authorize(gate, decision)` (the caller's reviewer rules) → `Denied` with the audit;
/// 13. [`apply_gate_decision`] (settled and pending guards, instance-scoped);
/// 14. on success: audit `automation.governance.gate_decided` and event
///     `approval.decision.recorded`.
///
/// No lifecycle record for approve/rework, as upstream (§7.14): the gate_history record, the
/// audit and the event record it, and `lifecycle_history` stays byte-compatible. Cancel writes
/// `run_cancelled`.
pub fn decide_gate_with(
    run: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    defaults: &GatePolicyDefaults,
    request: &GateDecisionRequest,
    now: Millis,
    authorize: impl FnOnce(&AutomationPendingGate, GateDecision) -> Result<(), GateDenial>,
) -> Transition<GateDecisionOutcome> {
    use GateDecisionOutcome as O;
    if run.status != AutomationRunStatus::AwaitingApproval {
        return Transition::unchanged(O::AlreadyDecided(early_winner(run, request)));
    }
    let Some(gate) = decision_gate(run, automation) else {
        return Transition::unchanged(O::GateMissing);
    };
    let Some(decision) = GateDecision::parse(&request.decision) else {
        return Transition::unchanged(O::InvalidDecision);
    };
    if !decision_offered(&gate, decision) {
        return Transition::unchanged(O::DecisionNotOffered {
            decision,
            offered: offered_decisions(&gate),
        });
    }
    if automation.node(&gate.node_id).is_none() {
        return Transition::unchanged(O::GateNodeNotFound {
            node_id: gate.node_id,
        });
    }
    let reason = request
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned);
    let named_node = request.gate_node_id.as_deref().unwrap_or(&gate.node_id);
    let named_at = request.gate_requested_at_ms.unwrap_or(gate.requested_at_ms);
    if named_node != gate.node_id || named_at != gate.requested_at_ms {
        let until = (named_node == gate.node_id).then_some(gate.requested_at_ms);
        return Transition::unchanged(O::StaleInstance {
            winner: instance_closing_record(run, named_node, named_at, until),
            open_requested_at_ms: gate.requested_at_ms,
        });
    }
    if policy::rejects_late_human_decision(&gate, defaults, now) {
        let audit = gate_decision_denied_audit(
            run,
            Some(&gate),
            &request.decided_by,
            CODE_GATE_EXPIRED,
            GATE_EXPIRED_DETAIL,
        );
        return Transition::unchanged(O::GateExpired { audit });
    }
    if let Err(denial) = authorize(&gate, decision) {
        let audit = gate_decision_denied_audit(
            run,
            Some(&gate),
            &request.decided_by,
            &denial.code,
            &denial.detail,
        );
        return Transition::unchanged(O::Denied { denial, audit });
    }
    let decider = request.decided_by.clone();
    update(run, now, |run, fx| {
        match apply_gate_decision(
            run,
            fx,
            automation,
            &gate,
            decision,
            reason.clone(),
            Some(decider.clone()),
            now,
        ) {
            GateApply::AlreadyDecided(winner) => O::AlreadyDecided(winner),
            GateApply::Applied(record) => {
                fx.audit.push(AuditDraft {
                    event_type: AUDIT_GATE_DECIDED.into(),
                    actor: decider.actor_id.clone().or_else(|| decider.source.clone()),
                    tenant_context: run.tenant_context.clone(),
                    payload: json!({
                        "runID": run.run_id,
                        "automationID": automation.automation_id,
                        "nodeID": gate.node_id,
                        "decision": decision.as_str(),
                        "reason": reason,
                        "decidedBy": decider,
                    }),
                });
                let props = json!({
                    "run_id": run.run_id,
                    "automation_id": automation.automation_id,
                    "node_id": gate.node_id,
                    "decision": decision.as_str(),
                    "reason": reason,
                    "executed_as": "approval_gate",
                    "decided_by": decider,
                    "timestamp": now,
                    "tenantContext": run.tenant_context.to_value(),
                });
                fx.event(
                    run,
                    EVENT_DECISION_RECORDED,
                    Some(&gate.node_id),
                    props,
                    None,
                );
                O::Applied {
                    gate: gate.clone(),
                    record,
                }
            }
        }
    })
}

/// `winningDecision` of the early not-awaiting path (spec §4.2 step 5, §7.16).
fn early_winner(
    run: &AutomationV2RunRecord,
    request: &GateDecisionRequest,
) -> Option<AutomationGateDecisionRecord> {
    let node = request.gate_node_id.as_deref().or(run
        .checkpoint
        .awaiting_gate
        .as_ref()
        .map(|g| g.node_id.as_str()));
    match (node, request.gate_requested_at_ms) {
        (Some(node), Some(since)) => instance_closing_record(run, node, since, None),
        (Some(node), None) => latest_record(run, node).cloned(),
        // Nothing names a gate: upstream's "last record of any node".
        (None, _) => run.checkpoint.gate_history.last().cloned(),
    }
}

/// `apply_automation_gate_decision` (spec §4.3); call inside [`update`].
///
/// Guards, instance-scoped (§7.13, R5): a settled decision of *this* instance →
/// `AlreadyDecided(Some(it))`; not pending → `AlreadyDecided(this node's latest record)`
/// (upstream: the last record of any node, §7.16). Then appends the record (`decided_at_ms` is
/// never before the instance opened, so it always belongs to it), clears `awaiting_gate` and
/// applies approve / rework / cancel. Non-cancel decisions set `resume_reason`, clear the
/// execution handles and refresh `blocked_nodes`.
#[allow(clippy::too_many_arguments)]
pub fn apply_gate_decision(
    run: &mut AutomationV2RunRecord,
    fx: &mut Effects,
    automation: &AutomationV2Spec,
    gate: &AutomationPendingGate,
    decision: GateDecision,
    reason: Option<String>,
    decided_by: Option<GovernanceActorRef>,
    now: Millis,
) -> GateApply {
    if let Some(winner) = settled_decision(run, gate) {
        return GateApply::AlreadyDecided(Some(winner.clone()));
    }
    if !gate_is_pending(run, gate) {
        return GateApply::AlreadyDecided(latest_record(run, &gate.node_id).cloned());
    }
    let record = AutomationGateDecisionRecord {
        node_id: gate.node_id.clone(),
        decision: decision.as_str().into(),
        reason: reason.clone(),
        decided_at_ms: now.max(gate.requested_at_ms),
        decided_by,
        metadata: gate.metadata.clone(),
    };
    run.checkpoint.gate_history.push(record.clone());
    run.checkpoint.awaiting_gate = None;
    match decision {
        GateDecision::Approve => apply_approval(run, gate, reason, now),
        GateDecision::Rework => apply_rework(run, automation, gate),
        GateDecision::Cancel => apply_cancel(run, fx, gate, reason, now),
    }
    if decision != GateDecision::Cancel {
        run.resume_reason = Some(format!(
            "gate `{}` decision: {}",
            gate.node_id,
            decision.as_str()
        ));
        run.clear_execution_handles();
        refresh_runtime_state(automation, run);
    }
    GateApply::Applied(record)
}

/// `apply_gate_approval` (spec §4.3 step 4, approve).
fn apply_approval(
    run: &mut AutomationV2RunRecord,
    gate: &AutomationPendingGate,
    reason: Option<String>,
    now: Millis,
) {
    let node = &gate.node_id;
    run.status = AutomationRunStatus::Queued;
    run.detail = Some(format!("gate `{node}` approved"));
    run.stop_kind = None;
    run.stop_reason = None;
    let cp = &mut run.checkpoint;
    cp.blocked_nodes.retain(|n| n != node);
    if cp.last_failure.as_ref().is_some_and(|f| &f.node_id == node) {
        cp.last_failure = None;
    }
    cp.pending_nodes.retain(|n| n != node);
    if !cp.is_completed(node) {
        cp.completed_nodes.push(node.clone());
    }
    // `status: completed` is what terminal-run accounting reads; without it the run would
    // later derive as incomplete.
    cp.node_outputs.insert(
        node.clone(),
        json!({
            "contract_kind": "approval_gate",
            "status": "completed",
            "summary": format!("Gate `{node}` approved."),
            "content": {"decision": "approve", "reason": reason},
            "created_at_ms": now,
            "node_id": node,
        }),
    );
}

/// `apply_gate_rework` (spec §4.3 step 4, rework): resets the rework targets (else the gate's
/// upstream nodes) plus the gate and all their descendants; `pending_nodes` ends sorted and
/// deduplicated, as upstream.
fn apply_rework(
    run: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    gate: &AutomationPendingGate,
) {
    run.status = AutomationRunStatus::Queued;
    run.detail = Some(format!("gate `{}` sent work back for rework", gate.node_id));
    run.stop_kind = None;
    run.stop_reason = None;
    let mut roots = if gate.rework_targets.is_empty() {
        gate.upstream_node_ids.clone()
    } else {
        gate.rework_targets.clone()
    };
    roots.push(gate.node_id.clone());
    let reset = graph::subtree(automation, &roots);
    let cp = &mut run.checkpoint;
    for node in &reset {
        cp.node_outputs.remove(node);
        cp.node_attempts.remove(node);
    }
    cp.completed_nodes.retain(|n| !reset.contains(n));
    cp.pending_nodes.extend(reset);
    cp.pending_nodes.sort();
    cp.pending_nodes.dedup();
}

/// `apply_gate_cancel` (spec §4.3 step 4, cancel).
fn apply_cancel(
    run: &mut AutomationV2RunRecord,
    fx: &mut Effects,
    gate: &AutomationPendingGate,
    reason: Option<String>,
    now: Millis,
) {
    let stop_reason =
        reason.unwrap_or_else(|| format!("gate `{}` cancelled the run", gate.node_id));
    run.status = AutomationRunStatus::Cancelled;
    run.detail = Some(stop_reason.clone());
    run.stop_kind = Some(AutomationStopKind::Cancelled);
    run.stop_reason = Some(stop_reason.clone());
    fx.lifecycle(
        run,
        LIFECYCLE_RUN_CANCELLED,
        Some(stop_reason),
        Some(AutomationStopKind::Cancelled),
        None,
        now,
    );
}

/// `apply_gate_expired` (spec §4.4 step 3): cancelled, lifecycles `approval_gate_expired` then
/// `run_cancelled`.
fn apply_expired(
    run: &mut AutomationV2RunRecord,
    fx: &mut Effects,
    gate: &AutomationPendingGate,
    reason: Option<String>,
    now: Millis,
) {
    let stop_reason =
        reason.unwrap_or_else(|| format!("gate `{}` expired before approval", gate.node_id));
    run.status = AutomationRunStatus::Cancelled;
    run.detail = Some(stop_reason.clone());
    run.stop_kind = Some(AutomationStopKind::Cancelled);
    run.stop_reason = Some(stop_reason.clone());
    for event in [LIFECYCLE_GATE_EXPIRED, LIFECYCLE_RUN_CANCELLED] {
        fx.lifecycle(
            run,
            event,
            Some(stop_reason.clone()),
            Some(AutomationStopKind::Cancelled),
            None,
            now,
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Expiry, escalation, reminders, stale marking
// ------------------------------------------------------------------------------------------------

/// `apply_automation_gate_expiry` (spec §4.4); call inside [`update`].
///
/// Same instance-scoped guards as [`apply_gate_decision`]. Appends the `expired` record (system
/// actor `{kind: system, source: automation_gate_expiry}`, metadata `{expiry_policy,
/// expires_at_ms, expired_at_ms, gate_metadata}`), clears `awaiting_gate` and cancels the run
/// (`approval_gate_expired`, `run_cancelled`, stop kind `cancelled`). Nodes, sessions and
/// `resume_reason` are untouched.
pub fn apply_gate_expiry(
    run: &mut AutomationV2RunRecord,
    fx: &mut Effects,
    gate: &AutomationPendingGate,
    reason: Option<String>,
    expires_at_ms: Millis,
    policy: &EffectivePolicy,
    now: Millis,
) -> GateApply {
    if let Some(winner) = settled_decision(run, gate) {
        return GateApply::AlreadyDecided(Some(winner.clone()));
    }
    if !gate_is_pending(run, gate) {
        return GateApply::AlreadyDecided(latest_record(run, &gate.node_id).cloned());
    }
    let expired_at_ms = now.max(gate.requested_at_ms);
    let record = AutomationGateDecisionRecord {
        node_id: gate.node_id.clone(),
        decision: "expired".into(),
        reason: reason.clone(),
        decided_at_ms: expired_at_ms,
        decided_by: Some(GovernanceActorRef::gate_expiry()),
        metadata: Some(json!({
            "expiry_policy": policy.to_value(),
            "expires_at_ms": expires_at_ms,
            "expired_at_ms": expired_at_ms,
            "gate_metadata": gate.metadata,
        })),
    };
    run.checkpoint.gate_history.push(record.clone());
    run.checkpoint.awaiting_gate = None;
    apply_expired(run, fx, gate, reason, now);
    GateApply::Applied(record)
}

/// One thing the gate-notifier did to a run (spec §3.10, §3.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateAction {
    /// Cancel policy expired the gate; the run is cancelled.
    Expired {
        node_id: String,
        expires_at_ms: Millis,
    },
    /// Escalate policy expired the gate; the run still awaits approval.
    Escalated {
        node_id: String,
        escalated_to: String,
        reminder_count: u64,
        notification_key: String,
    },
    /// A reminder; `expired` after expiry (Remind policy only).
    Reminded {
        node_id: String,
        expired: bool,
        reminder_count: u64,
        notification_key: String,
    },
    /// The stale marker was written.
    MarkedStale { node_id: String },
}

/// An internal-sweep audit, built from the run right after its action ([`flush_audits`]).
struct SweepAudit {
    event_type: &'static str,
    sweep: &'static str,
    outcome: &'static str,
    reason: String,
    metadata: Value,
}

/// Turns pending sweep audits into audit drafts, each built from the run as its action left it
/// (status after), as upstream builds each audit from the run its own update returned.
fn flush_audits(run: &AutomationV2RunRecord, fx: &mut Effects, audits: &mut Vec<SweepAudit>) {
    for a in audits.drain(..) {
        fx.internal_sweep_audit(
            run,
            a.event_type,
            a.sweep,
            a.outcome,
            Some(&a.reason),
            a.metadata,
        );
    }
}

/// Everything the gate-notifier does to one row at `now`, in upstream's order
/// (`process_awaiting_approval_gate_policies` then `mark_stale_awaiting_approval_runs`):
///
/// 1. Policy step (spec §3.10), on the open gate's effective policy:
///    * `now >= expires_at`: cancel → [`apply_gate_expiry`]; escalate → once (marker
///      `gate_policy_state.escalated_at_ms`); remind → a reminder with `expired = true` when due;
///    * before expiry, any action: a reminder when due.
///
///    For an escalation ladder (`expiry_policy.steps`, see `policy.rs`) instead: **every** step
///    due at `now` and not applied yet, in order, in this one call (catch-up after downtime
///    applies the missed steps in sequence rather than one per tick). Each step is upstream's
///    action for its kind — `remind` → reminder (`approval.gate.reminder_due`, key
///    `…:reminder:{n}`), `escalate` → escalation (`approval.gate.escalated`, key
///    `…:escalated:{n}`), `cancel` → expiry (`approval.gate.expired`, run cancelled, nothing
///    after it) — with the same lifecycle, audit and event, plus `step_index` and
///    `step_due_at_ms` in the lifecycle/audit metadata and event properties. Progress is
///    `gate_policy_state.steps_applied` on the row, so no later call repeats a step.
/// 2. Stale marking (spec §3.11), re-checking status, gate presence, the marker and the age on
///    the row it gets (fix of §7.9 / race R2).
///
/// A row with nothing due is a no-op (`changed == false`, no effects). Reminders are idempotent
/// by construction: due-ness reads `last_reminded_at_ms` from this row, so a second call at the
/// same `now` does nothing.
///
/// Compatibility decisions (docs/compatibility.md):
/// * `reminder_count` (shared by reminders and escalation, spec §3.10) continues across
///   instances of the same gate node in a run, so `notification_key`s never repeat: durable
///   dedupe keyed on them (JetStream `Nats-Msg-Id`, the delivery table) would otherwise swallow a
///   re-opened gate's `:reminder:1`. The first instance counts exactly as upstream.
/// * The stale detail keeps upstream's text, including `no automatic expiry action is
///   configured` (§7.10): detail strings are compatibility facts and clients match on them; the
///   real expiry is published as `expires_at_ms` (`approval.gate.requested`, pending approvals).
/// * The stale marker preserves non-object gate metadata under `legacy_metadata`, as the
///   policy-state writer does (upstream discards it, §7.10).
/// * Escalation stays a marker, at most once per instance, `escalate_to` only recorded (§7.12);
///   a ladder may escalate once per escalate step.
pub fn process_gate_policies(
    run: &mut AutomationV2RunRecord,
    defaults: &GatePolicyDefaults,
    now: Millis,
) -> Transition<Vec<GateAction>> {
    update(run, now, |run, fx| {
        let mut audits = Vec::new();
        let mut actions = policy_step(run, fx, &mut audits, defaults, now);
        flush_audits(run, fx, &mut audits);
        if let Some(action) = stale_step(run, fx, &mut audits, defaults.stale_after_ms, now) {
            actions.push(action);
        }
        flush_audits(run, fx, &mut audits);
        actions
    })
}

fn policy_step(
    run: &mut AutomationV2RunRecord,
    fx: &mut Effects,
    audits: &mut Vec<SweepAudit>,
    defaults: &GatePolicyDefaults,
    now: Millis,
) -> Vec<GateAction> {
    if run.status != AutomationRunStatus::AwaitingApproval {
        return Vec::new();
    }
    let Some(gate) = run.checkpoint.awaiting_gate.clone() else {
        return Vec::new();
    };
    let Some(policy) = policy::effective_policy(&gate, defaults) else {
        return Vec::new();
    };
    if policy.is_ladder() {
        return apply_ladder_steps(run, fx, audits, &policy, now);
    }
    let expires_at = policy::expires_at_ms(&gate, &policy);
    let action = if now >= expires_at {
        match policy.on_expiry {
            AutomationGateExpiryAction::Cancel => {
                expire(run, fx, audits, &gate, &policy, None, now)
            }
            AutomationGateExpiryAction::Escalate => {
                if policy_state_has(&gate, "escalated_at_ms") {
                    None
                } else {
                    Some(escalate(
                        run, fx, audits, &gate, &policy, expires_at, None, now,
                    ))
                }
            }
            AutomationGateExpiryAction::Remind => {
                policy::reminder_due(&gate, &policy, now, expires_at)
                    .then(|| remind(run, fx, audits, &gate, &policy, expires_at, true, None, now))
            }
        }
    } else {
        policy::reminder_due(&gate, &policy, now, expires_at).then(|| {
            remind(
                run, fx, audits, &gate, &policy, expires_at, false, None, now,
            )
        })
    };
    action.into_iter().collect()
}

/// The ladder part of [`process_gate_policies`]: applies every step due at `now` that the open
/// gate instance has not applied, in order. Stops at the first step not yet due, after a
/// `cancel` step, or when the gate is no longer open.
fn apply_ladder_steps(
    run: &mut AutomationV2RunRecord,
    fx: &mut Effects,
    audits: &mut Vec<SweepAudit>,
    policy: &EffectivePolicy,
    now: Millis,
) -> Vec<GateAction> {
    let mut actions = Vec::new();
    // Each iteration applies one step and advances `steps_applied`, or stops: bounded anyway.
    for _ in 0..policy.steps.len() {
        if run.status != AutomationRunStatus::AwaitingApproval {
            break;
        }
        let Some(gate) = run.checkpoint.awaiting_gate.clone() else {
            break;
        };
        let Some(step) = policy::next_ladder_step(&gate, policy) else {
            break;
        };
        if now < policy::step_due_at(&gate, step) {
            break;
        }
        let expires_at = policy::expires_at_ms(&gate, policy);
        match step.action {
            AutomationGateExpiryAction::Remind => {
                let expired = policy::step_at_expiry(policy, step);
                actions.push(remind(
                    run,
                    fx,
                    audits,
                    &gate,
                    policy,
                    expires_at,
                    expired,
                    Some(step),
                    now,
                ));
            }
            AutomationGateExpiryAction::Escalate => {
                actions.push(escalate(
                    run,
                    fx,
                    audits,
                    &gate,
                    policy,
                    expires_at,
                    Some(step),
                    now,
                ));
            }
            AutomationGateExpiryAction::Cancel => {
                actions.extend(expire(run, fx, audits, &gate, policy, Some(step), now));
                flush_audits(run, fx, audits);
                break;
            }
        }
        flush_audits(run, fx, audits);
    }
    actions
}

/// Adds a ladder step's identification (`step_index`, `step_due_at_ms`) to an object: the
/// lifecycle/audit metadata and event properties of a step. Upstream policies add nothing.
fn with_step(
    mut value: Value,
    gate: &AutomationPendingGate,
    step: Option<&policy::LadderStep>,
) -> Value {
    if let (Some(step), Some(obj)) = (step, value.as_object_mut()) {
        obj.insert("step_index".into(), json!(step.index));
        obj.insert(
            "step_due_at_ms".into(),
            json!(policy::step_due_at(gate, step)),
        );
    }
    value
}

/// The `gate_policy_state` entry recording that `step` was applied (ladders only).
fn steps_applied_entry(
    gate: &AutomationPendingGate,
    step: Option<&policy::LadderStep>,
) -> Option<(&'static str, Value)> {
    step.map(|_| {
        (
            policy::STEPS_APPLIED_KEY,
            json!(policy::steps_applied(gate).saturating_add(1)),
        )
    })
}

/// `expire_awaiting_approval_gate` (spec §3.10); `step` when a ladder's `cancel` step expires it.
fn expire(
    run: &mut AutomationV2RunRecord,
    fx: &mut Effects,
    audits: &mut Vec<SweepAudit>,
    gate: &AutomationPendingGate,
    policy: &EffectivePolicy,
    step: Option<&policy::LadderStep>,
    now: Millis,
) -> Option<GateAction> {
    let node = &gate.node_id;
    let expires_at = policy::expires_at_ms(gate, policy);
    let reason = format!("approval gate `{node}` expired before a decision was recorded");
    match apply_gate_expiry(run, fx, gate, Some(reason.clone()), expires_at, policy, now) {
        GateApply::AlreadyDecided(_) => None,
        GateApply::Applied(_) => {
            audits.push(SweepAudit {
                event_type: "automation_v2.internal_sweep.approval_gate_expired",
                sweep: SWEEP_GATE_POLICIES,
                outcome: "expired_cancelled",
                reason,
                metadata: with_step(
                    json!({
                        "node_id": node,
                        "expires_at_ms": expires_at,
                        "expiry_policy": policy.to_value(),
                    }),
                    gate,
                    step,
                ),
            });
            let props = with_step(
                json!({
                    "run_id": run.run_id,
                    "automation_id": run.automation_id,
                    "node_id": node,
                    "decision": "expired",
                    "expires_at_ms": expires_at,
                    "tenantContext": run.tenant_context.to_value(),
                }),
                gate,
                step,
            );
            fx.event(run, EVENT_GATE_EXPIRED, Some(node), props, None);
            Some(GateAction::Expired {
                node_id: node.clone(),
                expires_at_ms: expires_at,
            })
        }
    }
}

/// `escalate_awaiting_approval_gate` (spec §3.10). The caller checked the escalation marker
/// (upstream policy) or the ladder progress (`step`).
///
/// A ladder step escalates to its own `escalate_to`, else the policy's, else
/// `unassigned_escalation_principal`. A step before the ladder's expiry says
/// ``approval gate `{node}` was escalated to {x}`` (audit outcome `escalated`); at the expiry
/// the text and outcome are upstream's (`expired and was escalated`, `expired_escalated`).
#[allow(clippy::too_many_arguments)]
fn escalate(
    run: &mut AutomationV2RunRecord,
    fx: &mut Effects,
    audits: &mut Vec<SweepAudit>,
    gate: &AutomationPendingGate,
    policy: &EffectivePolicy,
    expires_at: Millis,
    step: Option<&policy::LadderStep>,
    now: Millis,
) -> GateAction {
    let node = gate.node_id.clone();
    let principal = |s: Option<&str>| {
        s.map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let escalated_to = principal(step.and_then(|s| s.escalate_to.as_deref()))
        .or_else(|| principal(policy.escalate_to.as_deref()))
        .unwrap_or_else(|| UNASSIGNED_ESCALATION_PRINCIPAL.to_owned());
    let at_expiry = step.is_none_or(|s| policy::step_at_expiry(policy, s));
    let detail = if at_expiry {
        format!("approval gate `{node}` expired and was escalated to {escalated_to}")
    } else {
        format!("approval gate `{node}` was escalated to {escalated_to}")
    };
    let count = next_reminder_count(run, gate);
    let key = notification_key(&run.run_id, &node, "escalated", count);
    let progress = steps_applied_entry(gate, step);
    if let Some(open) = run.checkpoint.awaiting_gate.as_mut() {
        update_policy_state(
            open,
            [
                ("escalated_at_ms", json!(now)),
                ("escalated_to", json!(escalated_to)),
                ("expires_at_ms", json!(expires_at)),
                ("reminder_count", json!(count)),
                ("notification_key", json!(key)),
            ]
            .into_iter()
            .chain(progress),
        );
    }
    run.detail = Some(detail.clone());
    let metadata = with_step(
        json!({
            "node_id": node,
            "expires_at_ms": expires_at,
            "escalated_to": escalated_to,
            "expiry_policy": policy.to_value(),
        }),
        gate,
        step,
    );
    fx.lifecycle(
        run,
        LIFECYCLE_GATE_ESCALATED,
        Some(detail.clone()),
        None,
        Some(metadata.clone()),
        now,
    );
    audits.push(SweepAudit {
        event_type: "automation_v2.internal_sweep.approval_gate_escalated",
        sweep: SWEEP_GATE_POLICIES,
        outcome: if at_expiry {
            "expired_escalated"
        } else {
            "escalated"
        },
        reason: detail,
        metadata,
    });
    let props = with_step(
        json!({
            "run_id": run.run_id,
            "automation_id": run.automation_id,
            "node_id": node,
            "expires_at_ms": expires_at,
            "escalated_to": escalated_to,
            "tenantContext": run.tenant_context.to_value(),
        }),
        gate,
        step,
    );
    fx.event(
        run,
        EVENT_GATE_ESCALATED,
        Some(&node),
        props,
        Some(key.clone()),
    );
    GateAction::Escalated {
        node_id: node,
        escalated_to,
        reminder_count: count,
        notification_key: key,
    }
}

/// `record_awaiting_approval_gate_reminder` (spec §3.10). The caller checked due-ness on this
/// row (upstream policy) or the ladder progress (`step`).
#[allow(clippy::too_many_arguments)]
fn remind(
    run: &mut AutomationV2RunRecord,
    fx: &mut Effects,
    audits: &mut Vec<SweepAudit>,
    gate: &AutomationPendingGate,
    policy: &EffectivePolicy,
    expires_at: Millis,
    expired: bool,
    step: Option<&policy::LadderStep>,
    now: Millis,
) -> GateAction {
    let node = gate.node_id.clone();
    let detail = if expired {
        format!("approval gate `{node}` is expired and still awaiting a decision")
    } else {
        format!("approval gate `{node}` is still awaiting a decision")
    };
    let count = next_reminder_count(run, gate);
    let key = notification_key(&run.run_id, &node, "reminder", count);
    let progress = steps_applied_entry(gate, step);
    if let Some(open) = run.checkpoint.awaiting_gate.as_mut() {
        update_policy_state(
            open,
            [
                ("last_reminded_at_ms", json!(now)),
                ("reminder_count", json!(count)),
                ("expires_at_ms", json!(expires_at)),
                ("expired_reminder", json!(expired)),
                ("notification_key", json!(key)),
            ]
            .into_iter()
            .chain(progress),
        );
    }
    run.detail = Some(detail.clone());
    let metadata = with_step(
        json!({
            "node_id": node,
            "expires_at_ms": expires_at,
            "expired": expired,
            "reminder_count": count,
            "expiry_policy": policy.to_value(),
        }),
        gate,
        step,
    );
    fx.lifecycle(
        run,
        LIFECYCLE_GATE_REMINDER_DUE,
        Some(detail.clone()),
        None,
        Some(metadata.clone()),
        now,
    );
    audits.push(SweepAudit {
        event_type: "automation_v2.internal_sweep.approval_gate_reminder_due",
        sweep: SWEEP_GATE_POLICIES,
        outcome: if expired {
            "expired_reminder_due"
        } else {
            "reminder_due"
        },
        reason: detail,
        metadata,
    });
    let props = with_step(
        json!({
            "run_id": run.run_id,
            "automation_id": run.automation_id,
            "node_id": node,
            "expires_at_ms": expires_at,
            "expired": expired,
            "reminder_count": count,
            "tenantContext": run.tenant_context.to_value(),
        }),
        gate,
        step,
    );
    fx.event(
        run,
        EVENT_GATE_REMINDER_DUE,
        Some(&node),
        props,
        Some(key.clone()),
    );
    GateAction::Reminded {
        node_id: node,
        expired,
        reminder_count: count,
        notification_key: key,
    }
}

/// `mark_stale_awaiting_approval_runs` for one row (spec §3.11), with the guards upstream lacks
/// (§7.9, R2): the row must still await approval on an unmarked gate at least `stale_after_ms`
/// old.
fn stale_step(
    run: &mut AutomationV2RunRecord,
    fx: &mut Effects,
    audits: &mut Vec<SweepAudit>,
    stale_after_ms: u64,
    now: Millis,
) -> Option<GateAction> {
    if run.status != AutomationRunStatus::AwaitingApproval {
        return None;
    }
    let gate = run.checkpoint.awaiting_gate.as_mut()?;
    if now.saturating_sub(gate.requested_at_ms) < stale_after_ms || gate.is_marked_stale() {
        return None;
    }
    let node = gate.node_id.clone();
    let requested_at_ms = gate.requested_at_ms;
    let detail = format!(
        "awaiting manual approval for gate `{node}` for at least {}s; no automatic expiry action is configured",
        stale_after_ms / 1000
    );
    let mut metadata = metadata_object(gate.metadata.take());
    metadata.insert("stale".into(), json!(true));
    metadata.insert("stale_policy".into(), json!(STALE_POLICY));
    metadata.insert("stale_after_ms".into(), json!(stale_after_ms));
    metadata.insert("stale_marked_at_ms".into(), json!(now));
    metadata.insert("requested_at_ms".into(), json!(requested_at_ms));
    gate.metadata = Some(Value::Object(metadata));
    run.detail = Some(detail.clone());
    let record_metadata = json!({
        "node_id": node,
        "requested_at_ms": requested_at_ms,
        "stale_after_ms": stale_after_ms,
        "policy": STALE_POLICY,
    });
    fx.lifecycle(
        run,
        LIFECYCLE_GATE_MARKED_STALE,
        Some(detail.clone()),
        None,
        Some(record_metadata.clone()),
        now,
    );
    audits.push(SweepAudit {
        event_type: "automation_v2.internal_sweep.approval_gate_marked_stale",
        sweep: SWEEP_MARK_STALE,
        outcome: "marked_stale",
        reason: detail,
        metadata: record_metadata,
    });
    Some(GateAction::MarkedStale { node_id: node })
}

/// Gate metadata as an object; a non-object value is kept under `legacy_metadata`.
fn metadata_object(metadata: Option<Value>) -> Map<String, Value> {
    match metadata {
        Some(Value::Object(map)) => map,
        Some(other) => {
            let mut map = Map::new();
            map.insert("legacy_metadata".into(), other);
            map
        }
        None => Map::new(),
    }
}

/// `update_gate_policy_state`: merges `updates` into `metadata.gate_policy_state`.
fn update_policy_state<'a>(
    gate: &mut AutomationPendingGate,
    updates: impl IntoIterator<Item = (&'a str, Value)>,
) {
    let mut metadata = metadata_object(gate.metadata.take());
    let mut state = match metadata.remove("gate_policy_state") {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    for (key, value) in updates {
        state.insert(key.into(), value);
    }
    metadata.insert("gate_policy_state".into(), Value::Object(state));
    gate.metadata = Some(Value::Object(metadata));
}

/// `gate_policy_state_has`: presence of the key, whatever its value.
fn policy_state_has(gate: &AutomationPendingGate, key: &str) -> bool {
    gate.policy_state().is_some_and(|s| s.contains_key(key))
}

/// The next `reminder_count` for `gate`: one more than the highest count the node has reached
/// in this run — the open gate's stored count, the number of reminder and escalation lifecycle
/// records for the node (each increments it once), and the counts copied into earlier
/// instances' decision records. For a first instance this is upstream's `stored + 1`.
fn next_reminder_count(run: &AutomationV2RunRecord, gate: &AutomationPendingGate) -> u64 {
    let node = gate.node_id.as_str();
    let stored = gate.policy_state_u64("reminder_count").unwrap_or(0);
    let from_lifecycle = run
        .checkpoint
        .lifecycle_history
        .iter()
        .filter(|r| r.event == LIFECYCLE_GATE_REMINDER_DUE || r.event == LIFECYCLE_GATE_ESCALATED)
        .filter(|r| {
            r.metadata
                .as_ref()
                .and_then(|m| m.get("node_id"))
                .and_then(Value::as_str)
                == Some(node)
        })
        .count() as u64;
    let from_history = run
        .checkpoint
        .gate_history
        .iter()
        .filter(|r| r.node_id == node)
        .filter_map(|r| r.metadata.as_ref())
        .flat_map(|m| {
            [
                "/gate_policy_state/reminder_count",
                "/gate_metadata/gate_policy_state/reminder_count",
            ]
            .into_iter()
            .filter_map(|p| m.pointer(p).and_then(Value::as_u64))
        })
        .max()
        .unwrap_or(0);
    stored
        .max(from_lifecycle)
        .max(from_history)
        .saturating_add(1)
}

// ------------------------------------------------------------------------------------------------
// Recovery
// ------------------------------------------------------------------------------------------------

/// `recover_settled_automation_gate_decision` (spec §4.5) plus its internal-sweep audit
/// (spec §3.6): a run awaiting approval whose *open instance* already has a settled decision
/// (a crash between "history appended" and "status changed") gets that decision applied:
///
/// * approve: approval applied with the recorded reason, `resume_reason` ``recovered settled
///   gate `{node}` approval after restart``, handles cleared, lifecycle
///   `approval_gate_decision_recovered` (no stop kind), `blocked_nodes` refreshed;
/// * cancel: `run_cancelled`, then `approval_gate_decision_recovered` (stop kind cancelled);
/// * expired: `approval_gate_expired`, `run_cancelled`, then `approval_gate_decision_recovered`.
///
/// gate_history is not appended again. When applied, the audit
/// `automation_v2.internal_sweep.approval_gate_decision_recovered` (outcome
/// `recovered_settled_gate_decision`, reason = the new detail, metadata `{previous_status}`) is in
/// the effects: callers must not add another.
///
/// Differences from upstream (docs/compatibility.md): the settled check is instance-scoped
/// (§7.13), so a re-opened gate never gets an earlier instance's decision re-applied; an
/// unknown settled decision string changes nothing (upstream clears `awaiting_gate` anyway,
/// leaving a gate-less awaiting run).
pub fn recover_settled_decision(
    run: &mut AutomationV2RunRecord,
    automation: &AutomationV2Spec,
    now: Millis,
) -> Transition<bool> {
    update(run, now, |run, fx| {
        if run.status != AutomationRunStatus::AwaitingApproval {
            return false;
        }
        let Some(gate) = run.checkpoint.awaiting_gate.clone() else {
            return false;
        };
        let Some(record) = settled_decision(run, &gate).cloned() else {
            return false;
        };
        let node = &gate.node_id;
        match record.decision.as_str() {
            "approve" => {
                run.checkpoint.awaiting_gate = None;
                apply_approval(run, &gate, record.reason.clone(), now);
                run.resume_reason = Some(format!(
                    "recovered settled gate `{node}` approval after restart"
                ));
                run.clear_execution_handles();
                fx.lifecycle(
                    run,
                    LIFECYCLE_GATE_DECISION_RECOVERED,
                    Some(format!("recovered approved gate `{node}` after restart")),
                    None,
                    None,
                    now,
                );
                refresh_runtime_state(automation, run);
            }
            "cancel" => {
                run.checkpoint.awaiting_gate = None;
                apply_cancel(run, fx, &gate, record.reason.clone(), now);
                fx.lifecycle(
                    run,
                    LIFECYCLE_GATE_DECISION_RECOVERED,
                    Some(format!("recovered cancelled gate `{node}` after restart")),
                    Some(AutomationStopKind::Cancelled),
                    None,
                    now,
                );
            }
            "expired" => {
                run.checkpoint.awaiting_gate = None;
                apply_expired(run, fx, &gate, record.reason.clone(), now);
                fx.lifecycle(
                    run,
                    LIFECYCLE_GATE_DECISION_RECOVERED,
                    Some(format!("recovered expired gate `{node}` after restart")),
                    Some(AutomationStopKind::Cancelled),
                    None,
                    now,
                );
            }
            _ => return false,
        }
        fx.internal_sweep_audit(
            run,
            "automation_v2.internal_sweep.approval_gate_decision_recovered",
            SWEEP_RECOVER,
            "recovered_settled_gate_decision",
            run.detail.as_deref(),
            json!({"previous_status": "awaiting_approval"}),
        );
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        ActorKind, AutomationFailureRecord, AutomationFlowNode as N, AutomationGateEscalationStep,
        AutomationGateExpiryAction as A, AutomationGateStepAction, ExecutionProfile,
    };
    use std::collections::HashSet;

    const T0: Millis = 1_700_000_000_000;
    const SEC: u64 = 1_000;
    const DAY: u64 = 86_400_000;
    const GATE: &str = "approval_gate";

    type Run = AutomationV2RunRecord;

    fn tenant_json() -> Value {
        json!({"org_id": "org-1", "workspace_id": "ws-1", "source": "explicit"})
    }

    fn with_tenant(mut spec: AutomationV2Spec) -> AutomationV2Spec {
        spec.metadata = Some(json!({ "tenant_context": tenant_json() }));
        spec
    }

    /// Spec §6 cases 20–23: compose → approval_gate (rework target compose) → send.
    fn email_spec() -> AutomationV2Spec {
        with_tenant(AutomationV2Spec::new(
            "auto-email",
            vec![
                N::task("compose", &[]),
                N::approval(GATE, &["compose"], &["compose"]),
                N::task("send", &[GATE]),
            ],
        ))
    }

    fn new_run(spec: &AutomationV2Spec) -> Run {
        let mut run = Run::new_queued("run-1".into(), spec, "manual", ExecutionProfile::Strict, T0);
        run.status = AutomationRunStatus::Running;
        run.started_at_ms = Some(T0);
        run
    }

    /// What the executor records for a finished task node.
    fn complete(run: &mut Run, node: &str) {
        run.checkpoint.pending_nodes.retain(|n| n != node);
        if !run.checkpoint.is_completed(node) {
            run.checkpoint.completed_nodes.push(node.into());
        }
        run.checkpoint
            .node_outputs
            .insert(node.into(), json!({"status": "completed", "node_id": node}));
        run.checkpoint.node_attempts.insert(node.into(), 1);
    }

    fn defaults() -> GatePolicyDefaults {
        GatePolicyDefaults::default()
    }

    fn open(run: &mut Run, spec: &AutomationV2Spec, now: Millis) -> AutomationPendingGate {
        // The executor refreshes runtime state after each node result.
        refresh_runtime_state(spec, run);
        match open_gate(run, spec, &defaults(), now).outcome {
            OpenGateOutcome::Opened(g) => *g,
            other => panic!("gate did not open: {other:?}"),
        }
    }

    fn awaiting(spec: &AutomationV2Spec, done: &[&str], at: Millis) -> Run {
        let mut run = new_run(spec);
        for n in done {
            complete(&mut run, n);
        }
        open(&mut run, spec, at);
        run
    }

    fn pol(
        expires: u64,
        on: A,
        every: Option<u64>,
        escalate_to: Option<&str>,
    ) -> AutomationGateExpiryPolicy {
        AutomationGateExpiryPolicy {
            expires_after_ms: Some(expires),
            on_expiry: Some(on),
            escalate_to: escalate_to.map(str::to_owned),
            remind_every_ms: every,
            steps: None,
        }
    }

    fn set_policy(run: &mut Run, policy: AutomationGateExpiryPolicy) {
        run.checkpoint
            .awaiting_gate
            .as_mut()
            .expect("open gate")
            .expiry_policy = Some(policy);
    }

    fn alice() -> GovernanceActorRef {
        GovernanceActorRef::human("alice")
    }

    fn req(decision: &str) -> GateDecisionRequest {
        GateDecisionRequest::new(decision, alice())
    }

    fn decide(
        run: &mut Run,
        spec: &AutomationV2Spec,
        r: &GateDecisionRequest,
        now: Millis,
    ) -> Transition<GateDecisionOutcome> {
        decide_gate(run, spec, &defaults(), r, now)
    }

    fn is_applied(o: &GateDecisionOutcome) -> bool {
        matches!(o, GateDecisionOutcome::Applied { .. })
    }

    fn events(run: &Run) -> Vec<&str> {
        run.checkpoint
            .lifecycle_history
            .iter()
            .map(|r| r.event.as_str())
            .collect()
    }

    fn gate_state(run: &Run) -> Map<String, Value> {
        run.checkpoint
            .awaiting_gate
            .as_ref()
            .and_then(|g| g.policy_state().cloned())
            .unwrap_or_default()
    }

    fn sweep(run: &mut Run, now: Millis) -> Transition<Vec<GateAction>> {
        process_gate_policies(run, &defaults(), now)
    }

    /// A task endpoint's retry of the gate node (spec §2.2): awaiting_gate cleared, the gate
    /// pending again, gate_history kept. Then the scheduler claims the run.
    fn retry_gate_and_claim(run: &mut Run) {
        run.checkpoint.awaiting_gate = None;
        run.checkpoint.completed_nodes.retain(|n| n != GATE);
        run.checkpoint.node_outputs.remove(GATE);
        if !run.checkpoint.is_pending(GATE) {
            run.checkpoint.pending_nodes.push(GATE.into());
        }
        run.stop_kind = None;
        run.stop_reason = None;
        run.status = AutomationRunStatus::Running;
    }

    // --------------------------------------------------------------------------------------
    // Building and opening
    // --------------------------------------------------------------------------------------

    #[test]
    fn build_pending_gate_reads_title_metadata_and_policy_in_upstream_precedence() {
        let mut node = N::approval("g", &["a", "b"], &["a"]);
        node.gate.as_mut().expect("gate").instructions = Some("check it".into());
        node.metadata = Some(json!({
            "builder": {"title": "Review the draft"},
            "approval": {
                "metadata": {"risk_tier": "high"},
                "gate_expiry_policy": {"expires_after_ms": 20, "on_expiry": "remind"},
                "policy": {"expiry": {"expires_after_ms": 30}},
                "expiry_policy": "not a policy"
            }
        }));
        let gate = build_pending_gate(&node, 42).expect("gate config");
        assert_eq!(gate.node_id, "g");
        assert_eq!(gate.title, "Review the draft");
        assert_eq!(gate.instructions.as_deref(), Some("check it"));
        assert_eq!(gate.decisions, vec!["approve", "rework", "cancel"]);
        assert_eq!(gate.rework_targets, vec!["a"]);
        assert_eq!(gate.upstream_node_ids, vec!["a", "b"]);
        assert_eq!(gate.requested_at_ms, 42);
        assert_eq!(gate.metadata, Some(json!({"risk_tier": "high"})));
        // `/approval/expiry_policy` does not deserialize, so the next pointer wins.
        assert_eq!(gate.expiry_policy, Some(pol(20, A::Remind, None, None)));
        // The gate config's own policy wins over metadata.
        node.gate.as_mut().expect("gate").expiry_policy = Some(pol(5, A::Cancel, None, None));
        let gate = build_pending_gate(&node, 42).expect("gate config");
        assert_eq!(gate.expiry_policy, Some(pol(5, A::Cancel, None, None)));
    }

    #[test]
    fn build_pending_gate_falls_back_to_objective_and_needs_gate_config() {
        let mut node = N::approval("g", &[], &[]);
        node.metadata = Some(
            json!({"approval": {"metadata": null, "policy": {"gate_expiry": {"expires_after_ms": 9}}}}),
        );
        let gate = build_pending_gate(&node, 1).expect("gate config");
        assert_eq!(gate.title, "do g");
        assert_eq!(gate.metadata, None, "null metadata is absent");
        assert_eq!(gate.expiry_policy.and_then(|p| p.expires_after_ms), Some(9));
        node.gate = None;
        assert!(build_pending_gate(&node, 1).is_none());
    }

    #[test]
    fn open_gate_awaits_approval_blocks_descendants_and_emits_requested_event() {
        let spec = email_spec();
        let mut run = new_run(&spec);
        complete(&mut run, "compose");
        let t = open_gate(&mut run, &spec, &defaults(), T0 + SEC);
        assert!(t.changed);
        let OpenGateOutcome::Opened(gate) = t.outcome else {
            panic!("not opened: {:?}", t.outcome);
        };
        assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
        assert_eq!(
            run.detail.as_deref(),
            Some("awaiting approval for gate `approval_gate`")
        );
        assert_eq!(run.checkpoint.awaiting_gate.as_ref(), Some(gate.as_ref()));
        assert_eq!(gate.requested_at_ms, T0 + SEC);
        assert_eq!(run.checkpoint.blocked_nodes, vec!["send"]);
        assert_eq!(run.updated_at_ms, T0 + SEC);
        assert!(
            t.effects.lifecycle.is_empty(),
            "upstream writes no lifecycle record (§7.14)"
        );
        assert!(t.effects.audit.is_empty());
        assert_eq!(t.effects.events.len(), 1);
        let e = &t.effects.events[0];
        assert_eq!(e.event_type, "approval.gate.requested");
        assert_eq!(e.node_id.as_deref(), Some(GATE));
        assert_eq!(e.run_id, "run-1");
        assert_eq!(e.dedupe_key, None);
        assert_eq!(
            e.properties,
            json!({
                "run_id": "run-1",
                "automation_id": "auto-email",
                "node_id": GATE,
                "title": "do approval_gate",
                "requested_at_ms": T0 + SEC,
                "expires_at_ms": T0 + SEC + 604_800_000,
                "decide_endpoint": "/automations/v2/runs/run-1/gate",
                "tenantContext": tenant_json(),
            })
        );
    }

    #[test]
    fn open_gate_event_omits_expires_at_without_effective_policy() {
        let spec = email_spec();
        let mut run = new_run(&spec);
        complete(&mut run, "compose");
        let no_default = GatePolicyDefaults {
            expires_after_ms: None,
            ..defaults()
        };
        let t = open_gate(&mut run, &spec, &no_default, T0);
        assert!(
            t.effects.events[0]
                .properties
                .get("expires_at_ms")
                .is_none()
        );
    }

    #[test]
    fn open_gate_fails_run_for_approval_node_without_gate_config() {
        let mut gateless = N::task(GATE, &["compose"]);
        gateless.stage_kind = Some(crate::model::StageKind::Approval);
        let spec = AutomationV2Spec::new("a", vec![N::task("compose", &[]), gateless]);
        let mut run = new_run(&spec);
        complete(&mut run, "compose");
        let t = open_gate(&mut run, &spec, &defaults(), T0 + SEC);
        assert!(t.changed);
        assert_eq!(
            t.outcome,
            OpenGateOutcome::MissingGateConfig {
                node_id: GATE.into()
            }
        );
        assert_eq!(run.status, AutomationRunStatus::Failed);
        assert_eq!(
            run.detail.as_deref(),
            Some("approval node missing gate config")
        );
        assert_eq!(run.finished_at_ms, Some(T0 + SEC));
        assert!(run.checkpoint.awaiting_gate.is_none());
    }

    #[test]
    fn open_gate_is_a_noop_while_task_work_is_runnable_or_run_not_running() {
        let spec = email_spec();
        let mut run = new_run(&spec);
        let before = run.clone();
        let t = open_gate(&mut run, &spec, &defaults(), T0);
        assert_eq!(t.outcome, OpenGateOutcome::NoGate);
        assert!(!t.changed && t.effects.is_empty());
        assert_eq!(run, before);
        complete(&mut run, "compose");
        run.status = AutomationRunStatus::Queued;
        let before = run.clone();
        let t = open_gate(&mut run, &spec, &defaults(), T0);
        assert_eq!(t.outcome, OpenGateOutcome::NoGate);
        assert!(!t.changed);
        assert_eq!(run, before);
    }

    #[test]
    fn reopen_in_the_same_millisecond_is_a_new_instance() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        let t = decide(&mut run, &spec, &req("approve"), T0 + SEC);
        assert!(is_applied(&t.outcome));
        retry_gate_and_claim(&mut run);
        let gate = open(&mut run, &spec, T0 + SEC);
        assert_eq!(
            gate.requested_at_ms,
            T0 + SEC + 1,
            "strictly after the old decision"
        );
        assert!(settled_decision(&run, &gate).is_none());
        // A decision in that same millisecond is recorded inside the new instance.
        let t = decide(&mut run, &spec, &req("cancel"), T0 + SEC);
        let GateDecisionOutcome::Applied { record, .. } = t.outcome else {
            panic!("not applied: {:?}", t.outcome);
        };
        assert_eq!(record.decided_at_ms, T0 + SEC + 1);
    }

    // --------------------------------------------------------------------------------------
    // Human decisions (spec §4.2, §4.3)
    // --------------------------------------------------------------------------------------

    #[test]
    fn case_20_email_approval_golden_approve_path() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0 + SEC);
        run.active_session_ids = vec!["s1".into()];
        run.latest_session_id = Some("s1".into());
        run.active_instance_ids = vec!["i1".into()];
        assert_eq!(run.checkpoint.blocked_nodes, vec!["send"]);
        let t = decide(
            &mut run,
            &spec,
            &req("approve").with_reason("  LGTM "),
            T0 + 2 * SEC,
        );
        assert!(t.changed);
        assert!(is_applied(&t.outcome));
        assert_eq!(run.status, AutomationRunStatus::Queued);
        assert!(run.checkpoint.awaiting_gate.is_none());
        assert_eq!(run.checkpoint.gate_history.len(), 1);
        let rec = &run.checkpoint.gate_history[0];
        assert_eq!(rec.decision, "approve");
        assert_eq!(rec.reason.as_deref(), Some("LGTM"));
        assert_eq!(rec.decided_at_ms, T0 + 2 * SEC);
        assert_eq!(
            rec.decided_by.as_ref().map(|a| a.kind),
            Some(ActorKind::Human)
        );
        assert!(run.checkpoint.is_completed(GATE));
        assert!(!run.checkpoint.is_pending(GATE));
        assert_eq!(
            run.checkpoint.node_outputs[GATE],
            json!({
                "contract_kind": "approval_gate",
                "status": "completed",
                "summary": "Gate `approval_gate` approved.",
                "content": {"decision": "approve", "reason": "LGTM"},
                "created_at_ms": T0 + 2 * SEC,
                "node_id": GATE,
            })
        );
        assert!(run.checkpoint.is_pending("send"));
        assert!(!run.checkpoint.is_completed("send"));
        assert!(
            run.checkpoint.blocked_nodes.is_empty(),
            "send is runnable now"
        );
        assert_eq!(run.detail.as_deref(), Some("gate `approval_gate` approved"));
        assert_eq!(
            run.resume_reason.as_deref(),
            Some("gate `approval_gate` decision: approve")
        );
        assert!(run.active_session_ids.is_empty() && run.latest_session_id.is_none());
        assert!(run.active_instance_ids.is_empty());
        assert_eq!((run.stop_kind, run.stop_reason.as_deref()), (None, None));
        assert!(
            t.effects.lifecycle.is_empty(),
            "no lifecycle record for approve (§7.14)"
        );
    }

    #[test]
    fn case_21_email_approval_golden_cancel_path_never_sends() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0 + SEC);
        let t = decide(
            &mut run,
            &spec,
            &req("cancel").with_reason("   "),
            T0 + 2 * SEC,
        );
        assert!(is_applied(&t.outcome));
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
        assert_eq!(run.stop_kind, Some(AutomationStopKind::Cancelled));
        let text = "gate `approval_gate` cancelled the run";
        assert_eq!(run.detail.as_deref(), Some(text));
        assert_eq!(run.stop_reason.as_deref(), Some(text));
        assert_eq!(run.finished_at_ms, Some(T0 + 2 * SEC));
        assert!(!run.checkpoint.is_completed(GATE));
        assert_eq!(run.checkpoint.gate_history.len(), 1);
        assert_eq!(run.checkpoint.gate_history[0].decision, "cancel");
        assert_eq!(
            run.checkpoint.gate_history[0].reason, None,
            "blank reason is None"
        );
        assert_eq!(events(&run), vec!["run_cancelled"]);
        let lc = &t.effects.lifecycle[0];
        assert_eq!(lc.reason.as_deref(), Some(text));
        assert_eq!(lc.stop_kind, Some(AutomationStopKind::Cancelled));
        assert!(!run.checkpoint.is_completed("send"));
        assert!(run.resume_reason.is_none(), "cancel sets no resume reason");
    }

    #[test]
    fn case_22_email_approval_golden_rework_rearms_and_second_approval_releases_send() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0 + SEC);
        let t = decide(
            &mut run,
            &spec,
            &req("rework").with_reason("tone"),
            T0 + 2 * SEC,
        );
        assert!(is_applied(&t.outcome));
        assert!(
            t.effects.lifecycle.is_empty(),
            "no lifecycle record for rework (§7.14)"
        );
        assert_eq!(run.status, AutomationRunStatus::Queued);
        assert_eq!(
            run.detail.as_deref(),
            Some("gate `approval_gate` sent work back for rework")
        );
        assert!(run.checkpoint.is_pending("compose"));
        assert!(!run.checkpoint.is_completed("compose"));
        assert!(!run.checkpoint.node_outputs.contains_key("compose"));
        assert!(!run.checkpoint.node_attempts.contains_key("compose"));
        assert!(run.checkpoint.is_pending(GATE), "gate re-armed");
        assert_eq!(
            run.checkpoint.pending_nodes,
            vec!["approval_gate", "compose", "send"],
            "sorted and deduplicated"
        );
        assert_eq!(run.checkpoint.blocked_nodes, vec![GATE, "send"]);
        assert_eq!(
            run.resume_reason.as_deref(),
            Some("gate `approval_gate` decision: rework")
        );
        // The executor redoes compose and reaches the gate again: a fresh instance.
        run.status = AutomationRunStatus::Running;
        complete(&mut run, "compose");
        let gate = open(&mut run, &spec, T0 + 10 * SEC);
        assert_eq!(gate.requested_at_ms, T0 + 10 * SEC);
        let t = decide(&mut run, &spec, &req("approve"), T0 + 11 * SEC);
        assert!(is_applied(&t.outcome));
        let decisions: Vec<&str> = run
            .checkpoint
            .gate_history
            .iter()
            .map(|r| r.decision.as_str())
            .collect();
        assert_eq!(decisions, vec!["rework", "approve"]);
        assert_eq!(run.status, AutomationRunStatus::Queued);
        assert!(run.checkpoint.is_pending("send"));
    }

    #[test]
    fn case_23_email_approval_golden_rejects_decisions_on_settled_gates() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0 + SEC);
        // A decision for a node that never was a gate, while the real gate is open.
        let mut not_a_gate = run.checkpoint.awaiting_gate.clone().expect("open gate");
        not_a_gate.node_id = "send".into();
        let t = update(&mut run, T0 + 2 * SEC, |run, fx| {
            apply_gate_decision(
                run,
                fx,
                &spec,
                &not_a_gate,
                GateDecision::Approve,
                None,
                Some(alice()),
                T0 + 2 * SEC,
            )
        });
        assert_eq!(t.outcome, GateApply::AlreadyDecided(None));
        assert!(!t.changed);
        let gate = run.checkpoint.awaiting_gate.clone().expect("open gate");
        let t = decide(&mut run, &spec, &req("approve"), T0 + 2 * SEC);
        assert!(is_applied(&t.outcome));
        let winner = run.checkpoint.gate_history[0].clone();
        // A second decision on the settled gate, straight through §4.3.
        let t = update(&mut run, T0 + 3 * SEC, |run, fx| {
            apply_gate_decision(
                run,
                fx,
                &spec,
                &gate,
                GateDecision::Cancel,
                None,
                Some(alice()),
                T0 + 3 * SEC,
            )
        });
        assert_eq!(t.outcome, GateApply::AlreadyDecided(Some(winner.clone())));
        assert!(!t.changed && t.effects.is_empty());
        // And through the endpoint path.
        let t = decide(&mut run, &spec, &req("cancel"), T0 + 3 * SEC);
        assert_eq!(t.outcome, GateDecisionOutcome::AlreadyDecided(Some(winner)));
        assert_eq!(run.checkpoint.gate_history.len(), 1);
        assert_eq!(run.status, AutomationRunStatus::Queued);
    }

    #[test]
    fn case_29_two_sequential_decisions_on_one_row_yield_one_winner() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0 + SEC);
        let first = decide(&mut run, &spec, &req("approve"), T0 + 2 * SEC);
        let after_first = run.clone();
        let second = decide(&mut run, &spec, &req("cancel"), T0 + 2 * SEC);
        assert!(is_applied(&first.outcome));
        let GateDecisionOutcome::AlreadyDecided(Some(winner)) = &second.outcome else {
            panic!("loser not answered: {:?}", second.outcome);
        };
        assert_eq!(winner.decision, "approve");
        assert_eq!(
            second.outcome.error_code(),
            Some("AUTOMATION_V2_RUN_NOT_AWAITING_APPROVAL")
        );
        assert_eq!(second.outcome.http_status(), 409);
        assert!(!second.changed && second.effects.is_empty());
        assert_eq!(run, after_first, "the loser changes nothing");
        assert_eq!(run.checkpoint.gate_history.len(), 1);
        assert_eq!(
            first.effects.audit.len(),
            1,
            "exactly one gate_decided audit"
        );
        assert_eq!(first.effects.events.len(), 1, "exactly one decision event");
    }

    #[test]
    fn case_32_stale_gate_decision_is_rejected() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0 + SEC);
        run.status = AutomationRunStatus::Cancelled;
        run.checkpoint.awaiting_gate = None;
        let before = run.clone();
        let t = decide(&mut run, &spec, &req("approve"), T0 + 2 * SEC);
        assert_eq!(t.outcome, GateDecisionOutcome::AlreadyDecided(None));
        assert!(!t.changed);
        assert_eq!(run, before);
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
        assert!(run.checkpoint.gate_history.is_empty());
        // Also when the stale decision reaches §4.3 with the gate it saw.
        let gate = before.checkpoint.awaiting_gate.clone();
        let mut other = awaiting(&spec, &["compose"], T0 + SEC);
        let seen = other.checkpoint.awaiting_gate.clone().expect("open gate");
        other.status = AutomationRunStatus::Cancelled;
        other.checkpoint.awaiting_gate = gate;
        let t = update(&mut other, T0 + 2 * SEC, |run, fx| {
            apply_gate_decision(
                run,
                fx,
                &spec,
                &seen,
                GateDecision::Approve,
                None,
                Some(alice()),
                T0 + 2 * SEC,
            )
        });
        assert_eq!(t.outcome, GateApply::AlreadyDecided(None));
    }

    #[test]
    fn case_38_gate_rework_clears_downstream_outputs_and_requeues_subtree() {
        let spec = AutomationV2Spec::new(
            "auto-review",
            vec![
                N::task("draft", &[]),
                N::task("review", &["draft"]),
                N::approval("approval", &["review"], &["draft"]),
            ],
        );
        let mut run = new_run(&spec);
        complete(&mut run, "draft");
        complete(&mut run, "review");
        open(&mut run, &spec, T0 + SEC);
        let t = decide(&mut run, &spec, &req("rework"), T0 + 2 * SEC);
        assert!(is_applied(&t.outcome));
        assert_eq!(run.status, AutomationRunStatus::Queued);
        assert!(run.checkpoint.completed_nodes.is_empty());
        for n in ["draft", "review", "approval"] {
            assert!(run.checkpoint.is_pending(n), "{n} pending");
        }
        assert!(!run.checkpoint.node_outputs.contains_key("draft"));
        assert!(!run.checkpoint.node_outputs.contains_key("review"));
        assert!(
            run.checkpoint
                .gate_history
                .iter()
                .any(|r| r.decision == "rework")
        );
    }

    #[test]
    fn case_39_gate_rework_on_failed_branch_preserves_completed_sibling_branch() {
        let spec = AutomationV2Spec::new(
            "auto-branch",
            vec![
                N::task("research", &[]),
                N::task("analysis", &["research"]),
                N::task("draft", &["research"]),
                N::approval("publish", &["draft", "analysis"], &["draft"]),
            ],
        );
        let mut run = new_run(&spec);
        for n in ["research", "analysis", "draft"] {
            complete(&mut run, n);
        }
        run.checkpoint.node_attempts.insert("draft".into(), 2);
        open(&mut run, &spec, T0 + SEC);
        run.active_session_ids = vec!["s1".into()];
        run.latest_session_id = Some("s1".into());
        run.active_instance_ids = vec!["i1".into()];
        let t = decide(&mut run, &spec, &req("rework"), T0 + 2 * SEC);
        assert!(is_applied(&t.outcome));
        assert_eq!(run.status, AutomationRunStatus::Queued);
        for n in ["research", "analysis"] {
            assert!(run.checkpoint.is_completed(n), "{n} stays completed");
            assert!(
                run.checkpoint.node_outputs.contains_key(n),
                "{n} keeps its output"
            );
        }
        for n in ["draft", "publish"] {
            assert!(run.checkpoint.is_pending(n) && !run.checkpoint.is_completed(n));
        }
        assert!(!run.checkpoint.is_pending("analysis"));
        assert_eq!(run.checkpoint.blocked_nodes, vec!["publish"]);
        assert!(run.checkpoint.awaiting_gate.is_none());
        assert!(!run.checkpoint.node_attempts.contains_key("draft"));
        assert!(run.active_session_ids.is_empty() && run.latest_session_id.is_none());
        assert!(run.active_instance_ids.is_empty());
    }

    #[test]
    fn rework_without_targets_resets_the_gates_upstream_nodes() {
        let spec = AutomationV2Spec::new(
            "a",
            vec![
                N::task("x", &[]),
                N::task("y", &[]),
                N::approval("g", &["y"], &[]),
            ],
        );
        let mut run = new_run(&spec);
        complete(&mut run, "x");
        complete(&mut run, "y");
        open(&mut run, &spec, T0);
        assert!(is_applied(
            &decide(&mut run, &spec, &req("rework"), T0 + 1).outcome
        ));
        assert!(run.checkpoint.is_completed("x"), "not upstream of the gate");
        assert!(run.checkpoint.is_pending("y") && run.checkpoint.is_pending("g"));
    }

    #[test]
    fn approve_clears_last_failure_of_the_gate_node_only() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        run.checkpoint.last_failure = Some(AutomationFailureRecord {
            node_id: GATE.into(),
            reason: "x".into(),
            failed_at_ms: 1,
        });
        decide(&mut run, &spec, &req("approve"), T0 + 1);
        assert!(run.checkpoint.last_failure.is_none());
        let mut run = awaiting(&spec, &["compose"], T0);
        let other = AutomationFailureRecord {
            node_id: "compose".into(),
            reason: "x".into(),
            failed_at_ms: 1,
        };
        run.checkpoint.last_failure = Some(other.clone());
        decide(&mut run, &spec, &req("approve"), T0 + 1);
        assert_eq!(run.checkpoint.last_failure, Some(other));
    }

    #[test]
    fn case_40_gate_decide_recovers_missing_awaiting_gate_from_pending_node() {
        let spec = with_tenant(AutomationV2Spec::new(
            "auto-agg",
            vec![
                N::task("draft", &[]),
                N::approval("approval", &["draft"], &[]),
            ],
        ));
        let mut run = new_run(&spec);
        complete(&mut run, "draft");
        run.status = AutomationRunStatus::AwaitingApproval;
        run.updated_at_ms = T0 + 5 * SEC;
        assert!(run.checkpoint.awaiting_gate.is_none());
        let gate = decision_gate(&run, &spec).expect("recovered gate");
        assert_eq!(gate.node_id, "approval");
        assert_eq!(
            gate.requested_at_ms,
            T0 + 5 * SEC,
            "max(updated_at, created_at)"
        );
        let r = req("approve").for_instance("approval", T0 + 5 * SEC);
        let t = decide(&mut run, &spec, &r, T0 + 6 * SEC);
        assert!(is_applied(&t.outcome), "{:?}", t.outcome);
        assert!(run.checkpoint.awaiting_gate.is_none());
        assert!(run.checkpoint.is_completed("approval"));
        assert_eq!(run.status, AutomationRunStatus::Queued);
    }

    #[test]
    fn gate_missing_when_awaiting_without_any_recoverable_gate() {
        let spec = email_spec();
        let mut run = new_run(&spec);
        run.status = AutomationRunStatus::AwaitingApproval;
        run.checkpoint.pending_nodes = vec!["send".into()];
        let t = decide(&mut run, &spec, &req("approve"), T0);
        assert_eq!(t.outcome, GateDecisionOutcome::GateMissing);
        assert_eq!(
            t.outcome.error_code(),
            Some("AUTOMATION_V2_RUN_GATE_MISSING")
        );
        assert!(!t.changed);
    }

    #[test]
    fn gate_node_missing_from_automation_is_not_found() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        let live = AutomationV2Spec::new("auto-email", vec![N::task("compose", &[])]);
        let t = decide(&mut run, &live, &req("approve"), T0 + 1);
        assert_eq!(
            t.outcome,
            GateDecisionOutcome::GateNodeNotFound {
                node_id: GATE.into()
            }
        );
        assert_eq!(t.outcome.http_status(), 404);
        assert!(!t.changed);
    }

    #[test]
    fn case_41_not_awaiting_answer_includes_winning_decision() {
        let spec = AutomationV2Spec::new(
            "auto-agg",
            vec![
                N::task("draft", &[]),
                N::approval("approval", &["draft"], &[]),
            ],
        );
        let mut run = new_run(&spec);
        run.status = AutomationRunStatus::Queued;
        let record = AutomationGateDecisionRecord {
            node_id: "approval".into(),
            decision: "approve".into(),
            reason: Some("looks good".into()),
            decided_at_ms: T0 + 7,
            decided_by: Some(alice()),
            metadata: None,
        };
        run.checkpoint.gate_history.push(record.clone());
        let t = decide(&mut run, &spec, &req("approve"), T0 + SEC);
        assert_eq!(
            t.outcome,
            GateDecisionOutcome::AlreadyDecided(Some(record.clone()))
        );
        assert_eq!(t.outcome.winning_decision(), Some(&record));
        assert_eq!(
            t.outcome.error_code(),
            Some("AUTOMATION_V2_RUN_NOT_AWAITING_APPROVAL")
        );
        assert!(!t.changed);
    }

    #[test]
    fn decision_is_trimmed_and_lowercased_and_invalid_changes_nothing() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        let before = run.clone();
        for bad in ["maybe", "", "approved", "expired"] {
            let t = decide(&mut run, &spec, &req(bad), T0 + 1);
            assert_eq!(t.outcome, GateDecisionOutcome::InvalidDecision, "{bad}");
            assert_eq!(
                t.outcome.error_code(),
                Some("AUTOMATION_V2_GATE_INVALID_DECISION")
            );
            assert_eq!(t.outcome.http_status(), 400);
            assert!(!t.changed && t.effects.is_empty());
            assert_eq!(run, before);
        }
        let t = decide(&mut run, &spec, &req("  ApPrOvE\n"), T0 + 1);
        assert!(is_applied(&t.outcome));
        assert_eq!(run.checkpoint.gate_history[0].decision, "approve");
    }

    #[test]
    fn gate_decided_audit_and_decision_recorded_event_payloads() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        run.checkpoint
            .awaiting_gate
            .as_mut()
            .expect("gate")
            .metadata = Some(json!({"risk_tier": "low"}));
        let decider = GovernanceActorRef {
            kind: ActorKind::Human,
            actor_id: None,
            source: Some("slack".into()),
        };
        let r = GateDecisionRequest::new("approve", decider).with_reason(" ship it ");
        let t = decide(&mut run, &spec, &r, T0 + 5);
        let GateDecisionOutcome::Applied { gate, record } = &t.outcome else {
            panic!("not applied");
        };
        assert_eq!(gate.node_id, GATE);
        assert_eq!(
            record.metadata,
            Some(json!({"risk_tier": "low"})),
            "a copy of the gate metadata"
        );
        assert_eq!(t.effects.audit.len(), 1);
        let audit = &t.effects.audit[0];
        assert_eq!(audit.event_type, "automation.governance.gate_decided");
        assert_eq!(
            audit.actor.as_deref(),
            Some("slack"),
            "actor_id, else source"
        );
        assert_eq!(audit.tenant_context, run.tenant_context);
        assert_eq!(
            audit.payload,
            json!({
                "runID": "run-1",
                "automationID": "auto-email",
                "nodeID": GATE,
                "decision": "approve",
                "reason": "ship it",
                "decidedBy": {"kind": "human", "source": "slack"},
            })
        );
        assert_eq!(t.effects.events.len(), 1);
        let e = &t.effects.events[0];
        assert_eq!(e.event_type, "approval.decision.recorded");
        assert_eq!(e.node_id.as_deref(), Some(GATE));
        assert_eq!(
            e.properties,
            json!({
                "run_id": "run-1",
                "automation_id": "auto-email",
                "node_id": GATE,
                "decision": "approve",
                "reason": "ship it",
                "executed_as": "approval_gate",
                "decided_by": {"kind": "human", "source": "slack"},
                "timestamp": T0 + 5,
                "tenantContext": tenant_json(),
            })
        );
        // Without a reason the keys stay, as null.
        let mut run = awaiting(&spec, &["compose"], T0);
        let t = decide(&mut run, &spec, &req("rework"), T0 + 5);
        assert_eq!(t.effects.audit[0].actor.as_deref(), Some("alice"));
        assert_eq!(t.effects.audit[0].payload["reason"], Value::Null);
        assert_eq!(t.effects.events[0].properties["reason"], Value::Null);
    }

    #[test]
    fn case_8_late_decision_on_expired_cancel_gate_is_denied_with_audit() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0 + 10);
        set_policy(&mut run, pol(5, A::Cancel, None, None));
        let before = run.clone();
        let t = decide(&mut run, &spec, &req("approve"), T0 + 15);
        let GateDecisionOutcome::GateExpired { audit } = &t.outcome else {
            panic!("not rejected: {:?}", t.outcome);
        };
        assert!(
            !t.changed && t.effects.is_empty(),
            "the caller appends the denial audit"
        );
        assert_eq!(run, before);
        assert_eq!(t.outcome.error_code(), Some("AUTOMATION_V2_GATE_EXPIRED"));
        assert_eq!(t.outcome.http_status(), 409);
        assert_eq!(t.outcome.denial_audit(), Some(audit));
        assert_eq!(
            audit.event_type,
            "automation.governance.gate_decision_denied"
        );
        assert_eq!(audit.actor.as_deref(), Some("alice"));
        assert_eq!(audit.tenant_context, run.tenant_context);
        assert_eq!(
            audit.payload,
            json!({
                "runID": "run-1",
                "automationID": "auto-email",
                "nodeID": GATE,
                "resource": {"kind": "approval", "id": "auto-email:approval_gate"},
                "decision": "denied",
                "code": "AUTOMATION_V2_GATE_EXPIRED",
                "detail": "Approval gate expired before this decision was submitted",
                "actor": {"kind": "human", "actor_id": "alice"},
            })
        );
        // One millisecond earlier the decision is accepted.
        let mut run = before.clone();
        assert!(is_applied(
            &decide(&mut run, &spec, &req("approve"), T0 + 14).outcome
        ));
        // Escalate and remind gates keep accepting decisions after expiry.
        for action in [A::Escalate, A::Remind] {
            let mut run = before.clone();
            set_policy(&mut run, pol(5, action, None, None));
            assert!(is_applied(
                &decide(&mut run, &spec, &req("approve"), T0 + 15).outcome
            ));
        }
    }

    #[test]
    fn denial_audit_without_gate_has_null_node_and_resource() {
        let spec = email_spec();
        let run = awaiting(&spec, &["compose"], T0);
        let agent = GovernanceActorRef {
            kind: ActorKind::Agent,
            actor_id: Some("bot".into()),
            source: None,
        };
        let audit = gate_decision_denied_audit(
            &run,
            None,
            &agent,
            "AUTOMATION_V2_GATE_REQUIRES_HUMAN",
            "Approval gate decisions require a verified human approver",
        );
        assert_eq!(audit.actor.as_deref(), Some("bot"));
        assert_eq!(
            audit.payload,
            json!({
                "runID": "run-1",
                "automationID": "auto-email",
                "nodeID": null,
                "resource": null,
                "decision": "denied",
                "code": "AUTOMATION_V2_GATE_REQUIRES_HUMAN",
                "detail": "Approval gate decisions require a verified human approver",
                "actor": {"kind": "agent", "actor_id": "bot"},
            })
        );
    }

    #[test]
    fn authorizer_denial_is_audited_and_changes_nothing() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        let before = run.clone();
        let mut seen = None;
        let t = decide_gate_with(
            &mut run,
            &spec,
            &defaults(),
            &req("approve"),
            T0 + 1,
            |g, d| {
                seen = Some((g.node_id.clone(), d));
                Err(GateDenial {
                    code: "AUTOMATION_V2_GATE_SELF_APPROVAL_FORBIDDEN".into(),
                    detail: "requester cannot approve".into(),
                })
            },
        );
        assert_eq!(seen, Some((GATE.to_owned(), GateDecision::Approve)));
        assert!(!t.changed && t.effects.is_empty());
        assert_eq!(run, before);
        assert_eq!(t.outcome.http_status(), 403);
        assert_eq!(
            t.outcome.error_code(),
            Some("AUTOMATION_V2_GATE_SELF_APPROVAL_FORBIDDEN")
        );
        let audit = t.outcome.denial_audit().expect("denial audit");
        assert_eq!(
            audit.payload["code"],
            "AUTOMATION_V2_GATE_SELF_APPROVAL_FORBIDDEN"
        );
        assert_eq!(audit.payload["detail"], "requester cannot approve");
        assert_eq!(audit.payload["nodeID"], GATE);
    }

    #[test]
    fn section_7_15_decision_not_offered_by_the_gate_is_rejected() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        {
            let gate = run.checkpoint.awaiting_gate.as_mut().expect("gate");
            gate.decisions = vec!["Approve".into(), "reject".into()];
            gate.rework_targets.clear();
        }
        let before = run.clone();
        let t = decide(&mut run, &spec, &req("rework"), T0 + 1);
        assert_eq!(
            t.outcome,
            GateDecisionOutcome::DecisionNotOffered {
                decision: GateDecision::Rework,
                offered: vec![GateDecision::Approve, GateDecision::Cancel],
            }
        );
        assert_eq!(
            t.outcome.error_code(),
            Some("AUTOMATION_V2_GATE_INVALID_DECISION")
        );
        assert!(!t.changed);
        assert_eq!(run, before);
        // `reject` offers cancel (the aggregator's mapping).
        assert!(is_applied(
            &decide(&mut run, &spec, &req("cancel"), T0 + 1).outcome
        ));
        // Rework targets offer rework; a gate without a decisions list accepts everything.
        let mut gate = before.checkpoint.awaiting_gate.clone().expect("gate");
        gate.decisions = vec!["approve".into()];
        gate.rework_targets = vec!["compose".into()];
        assert!(decision_offered(&gate, GateDecision::Rework));
        assert!(!decision_offered(&gate, GateDecision::Cancel));
        gate.decisions.clear();
        gate.rework_targets.clear();
        assert!(
            GateDecision::ALL
                .iter()
                .all(|d| decision_offered(&gate, *d))
        );
    }

    /// Two gates: gate1 approved, then gate2 cancelled.
    fn two_gate_run() -> (AutomationV2Spec, Run) {
        let spec = AutomationV2Spec::new(
            "two",
            vec![
                N::task("a", &[]),
                N::approval("gate1", &["a"], &[]),
                N::task("b", &["gate1"]),
                N::approval("gate2", &["b"], &[]),
            ],
        );
        let mut run = new_run(&spec);
        complete(&mut run, "a");
        open(&mut run, &spec, T0);
        decide(
            &mut run,
            &spec,
            &req("approve").with_reason("first"),
            T0 + 1,
        );
        run.status = AutomationRunStatus::Running;
        complete(&mut run, "b");
        open(&mut run, &spec, T0 + 2);
        decide(&mut run, &spec, &req("cancel"), T0 + 3);
        (spec, run)
    }

    #[test]
    fn section_7_16_winning_decision_belongs_to_the_named_gate() {
        let (spec, mut run) = two_gate_run();
        let mut r = req("approve");
        r.gate_node_id = Some("gate1".into());
        let t = decide(&mut run, &spec, &r, T0 + 4);
        let winner = t.outcome.winning_decision().expect("winner");
        assert_eq!(
            (winner.node_id.as_str(), winner.decision.as_str()),
            ("gate1", "approve")
        );
        // Nothing names a gate: upstream's last record of any node.
        let t = decide(&mut run, &spec, &req("approve"), T0 + 4);
        let winner = t.outcome.winning_decision().expect("winner");
        assert_eq!(
            (winner.node_id.as_str(), winner.decision.as_str()),
            ("gate2", "cancel")
        );
    }

    #[test]
    fn section_7_25_operator_cancelled_gate_is_neither_decided_nor_swept() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(1, A::Cancel, Some(10), None));
        // Operator cancel leaves awaiting_gate set and records no history.
        run.status = AutomationRunStatus::Cancelled;
        run.stop_kind = Some(AutomationStopKind::OperatorStopped);
        let before = run.clone();
        let t = decide(&mut run, &spec, &req("approve"), T0 + 5);
        assert_eq!(t.outcome, GateDecisionOutcome::AlreadyDecided(None));
        let t = sweep(&mut run, T0 + 3 * DAY);
        assert!(!t.changed && t.outcome.is_empty());
        let t = recover_settled_decision(&mut run, &spec, T0 + 3 * DAY);
        assert!(!t.changed && !t.outcome);
        assert_eq!(run, before);
    }

    #[test]
    fn r5_decision_for_a_previous_instance_does_not_apply_to_the_reopened_gate() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0 + SEC);
        let first = run.checkpoint.awaiting_gate.clone().expect("gate");
        decide(&mut run, &spec, &req("rework"), T0 + 2 * SEC);
        run.status = AutomationRunStatus::Running;
        complete(&mut run, "compose");
        let second = open(&mut run, &spec, T0 + 10 * SEC);
        let before = run.clone();
        // A slow request (or an old Slack card) aimed at the first instance.
        let stale = req("approve").for_instance(GATE, first.requested_at_ms);
        let t = decide(&mut run, &spec, &stale, T0 + 11 * SEC);
        let GateDecisionOutcome::StaleInstance {
            winner,
            open_requested_at_ms,
        } = &t.outcome
        else {
            panic!("stale decision applied: {:?}", t.outcome);
        };
        assert_eq!(*open_requested_at_ms, second.requested_at_ms);
        assert_eq!(winner.as_ref().map(|w| w.decision.as_str()), Some("rework"));
        assert_eq!(
            t.outcome.error_code(),
            Some("AUTOMATION_V2_RUN_NOT_AWAITING_APPROVAL")
        );
        assert!(!t.changed && t.effects.is_empty());
        assert_eq!(run, before);
        // Another node named: stale as well.
        let mut other = req("approve");
        other.gate_node_id = Some("send".into());
        assert!(matches!(
            decide(&mut run, &spec, &other, T0 + 11 * SEC).outcome,
            GateDecisionOutcome::StaleInstance { .. }
        ));
        // The primitive also refuses a gate snapshot of the previous instance (upstream
        // compares node ids only).
        let t = update(&mut run, T0 + 11 * SEC, |run, fx| {
            apply_gate_decision(
                run,
                fx,
                &spec,
                &first,
                GateDecision::Approve,
                None,
                Some(alice()),
                T0 + 11 * SEC,
            )
        });
        assert!(matches!(t.outcome, GateApply::AlreadyDecided(_)));
        assert!(!t.changed);
        // Aimed at the open instance, it applies.
        let current = req("approve").for_instance(GATE, second.requested_at_ms);
        assert!(is_applied(
            &decide(&mut run, &spec, &current, T0 + 11 * SEC).outcome
        ));
    }

    #[test]
    fn section_7_13_reopened_gate_can_be_decided_after_an_earlier_approval() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        decide(&mut run, &spec, &req("approve"), T0 + SEC);
        retry_gate_and_claim(&mut run);
        let gate = open(&mut run, &spec, T0 + 5 * SEC);
        assert!(
            settled_decision(&run, &gate).is_none(),
            "the old approve is another instance"
        );
        let t = decide(&mut run, &spec, &req("cancel"), T0 + 6 * SEC);
        assert!(
            is_applied(&t.outcome),
            "upstream answers AlreadyDecided(approve)"
        );
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
        assert_eq!(run.checkpoint.gate_history.len(), 2);
    }

    #[test]
    fn section_7_13_reopened_gate_can_expire_after_an_earlier_decision() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        decide(&mut run, &spec, &req("approve"), T0 + SEC);
        retry_gate_and_claim(&mut run);
        open(&mut run, &spec, T0 + 5 * SEC);
        set_policy(&mut run, pol(SEC, A::Cancel, None, None));
        let t = sweep(&mut run, T0 + 6 * SEC);
        assert_eq!(t.outcome.len(), 1);
        assert!(matches!(t.outcome[0], GateAction::Expired { .. }));
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
        let decisions: Vec<&str> = run
            .checkpoint
            .gate_history
            .iter()
            .map(|r| r.decision.as_str())
            .collect();
        assert_eq!(decisions, vec!["approve", "expired"]);
    }

    #[test]
    fn section_7_13_recovery_never_reapplies_an_old_instance_decision() {
        let spec = email_spec();
        for old in ["approve", "cancel"] {
            let mut run = awaiting(&spec, &["compose"], T0);
            decide(&mut run, &spec, &req(old), T0 + SEC);
            retry_gate_and_claim(&mut run);
            open(&mut run, &spec, T0 + 5 * SEC);
            let before = run.clone();
            let t = recover_settled_decision(&mut run, &spec, T0 + 6 * SEC);
            assert!(!t.outcome && !t.changed && t.effects.is_empty(), "{old}");
            assert_eq!(run, before, "upstream silently re-applies the old {old}");
            assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
        }
    }

    // --------------------------------------------------------------------------------------
    // Recovery (spec §4.5)
    // --------------------------------------------------------------------------------------

    fn half_applied(spec: &AutomationV2Spec, decision: &str, reason: Option<&str>) -> Run {
        let mut run = awaiting(spec, &["compose"], T0);
        let gate = run.checkpoint.awaiting_gate.clone().expect("gate");
        run.checkpoint
            .gate_history
            .push(AutomationGateDecisionRecord {
                node_id: GATE.into(),
                decision: decision.into(),
                reason: reason.map(str::to_owned),
                decided_at_ms: T0 + SEC,
                decided_by: Some(alice()),
                metadata: gate.metadata,
            });
        run
    }

    #[test]
    fn case_31_restart_recovers_half_applied_gate_decision() {
        let spec = email_spec();
        let mut run = half_applied(&spec, "approve", Some("ok"));
        run.active_session_ids = vec!["s".into()];
        let t = recover_settled_decision(&mut run, &spec, T0 + 5 * SEC);
        assert!(t.outcome && t.changed);
        assert_eq!(run.status, AutomationRunStatus::Queued);
        assert!(run.checkpoint.awaiting_gate.is_none());
        assert_eq!(run.checkpoint.gate_history.len(), 1, "not appended again");
        assert_eq!(
            run.checkpoint.output_status(GATE).as_deref(),
            Some("completed")
        );
        assert_eq!(run.checkpoint.node_outputs[GATE]["content"]["reason"], "ok");
        assert!(run.checkpoint.is_pending("send"));
        assert!(run.checkpoint.blocked_nodes.is_empty());
        assert!(run.active_session_ids.is_empty());
        assert_eq!(
            run.resume_reason.as_deref(),
            Some("recovered settled gate `approval_gate` approval after restart")
        );
        assert_eq!(events(&run), vec!["approval_gate_decision_recovered"]);
        let lc = &run.checkpoint.lifecycle_history[0];
        assert_eq!(
            lc.reason.as_deref(),
            Some("recovered approved gate `approval_gate` after restart")
        );
        assert_eq!(lc.stop_kind, None);
        assert_eq!(t.effects.audit.len(), 1);
        let audit = &t.effects.audit[0];
        assert_eq!(
            audit.event_type,
            "automation_v2.internal_sweep.approval_gate_decision_recovered"
        );
        assert_eq!(audit.actor.as_deref(), Some("tandem-server:internal-sweep"));
        assert_eq!(
            audit.payload,
            json!({
                "source": "automation_v2_internal_sweep",
                "sweep": "recover_in_flight_runs",
                "actor": {"type": "system", "id": "tandem-server", "component": "automation_v2_sweeper"},
                "run_id": "run-1",
                "runID": "run-1",
                "automation_id": "auto-email",
                "automationID": "auto-email",
                "status": "queued",
                "stop_kind": null,
                "reason": "gate `approval_gate` approved",
                "tenantContext": tenant_json(),
                "outcome": "recovered_settled_gate_decision",
                "metadata": {"previous_status": "awaiting_approval"},
            })
        );
        // A later duplicate approve is answered with the recovered winner.
        let t = decide(&mut run, &spec, &req("approve"), T0 + 6 * SEC);
        let GateDecisionOutcome::AlreadyDecided(Some(w)) = t.outcome else {
            panic!("duplicate applied");
        };
        assert_eq!(w.decision, "approve");
        assert_eq!(run.checkpoint.gate_history.len(), 1);
    }

    #[test]
    fn recovery_of_settled_cancel_and_expired_decisions() {
        let spec = email_spec();
        let mut run = half_applied(&spec, "cancel", None);
        let t = recover_settled_decision(&mut run, &spec, T0 + 5 * SEC);
        assert!(t.outcome);
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
        assert_eq!(run.stop_kind, Some(AutomationStopKind::Cancelled));
        assert_eq!(
            events(&run),
            vec!["run_cancelled", "approval_gate_decision_recovered"]
        );
        assert_eq!(
            run.checkpoint.lifecycle_history[1].stop_kind,
            Some(AutomationStopKind::Cancelled)
        );
        assert_eq!(t.effects.audit[0].payload["status"], "cancelled");
        assert_eq!(t.effects.audit[0].payload["stop_kind"], "cancelled");
        assert_eq!(
            t.effects.audit[0].payload["reason"],
            "gate `approval_gate` cancelled the run"
        );

        let mut run = half_applied(&spec, "expired", Some("too late"));
        let t = recover_settled_decision(&mut run, &spec, T0 + 5 * SEC);
        assert!(t.outcome);
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
        assert_eq!(run.detail.as_deref(), Some("too late"));
        assert_eq!(
            events(&run),
            vec![
                "approval_gate_expired",
                "run_cancelled",
                "approval_gate_decision_recovered"
            ]
        );
        assert_eq!(
            run.checkpoint.lifecycle_history[2].reason.as_deref(),
            Some("recovered expired gate `approval_gate` after restart")
        );
        assert_eq!(run.checkpoint.gate_history.len(), 1);
    }

    #[test]
    fn recovery_is_a_noop_without_a_settled_decision() {
        let spec = email_spec();
        for run in [
            awaiting(&spec, &["compose"], T0),
            half_applied(&spec, "rework", None),
            half_applied(&spec, "something_else", None),
        ] {
            let mut run = run;
            let before = run.clone();
            let t = recover_settled_decision(&mut run, &spec, T0 + 5 * SEC);
            assert!(!t.outcome && !t.changed && t.effects.is_empty());
            assert_eq!(run, before, "awaiting_gate is kept (upstream clears it)");
        }
    }

    // --------------------------------------------------------------------------------------
    // Expiry, escalation, reminders (spec §3.10, §4.4)
    // --------------------------------------------------------------------------------------

    #[test]
    fn case_5_approval_gate_expiry_policy_auto_cancels_with_expired_record() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(1, A::Cancel, None, None));
        let t = sweep(&mut run, T0 + 10 * SEC);
        assert_eq!(
            t.outcome,
            vec![GateAction::Expired {
                node_id: GATE.into(),
                expires_at_ms: T0 + 1,
            }]
        );
        let second = sweep(&mut run, T0 + 10 * SEC);
        assert!(second.outcome.is_empty() && !second.changed && second.effects.is_empty());
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
        assert_eq!(run.stop_kind, Some(AutomationStopKind::Cancelled));
        let reason = "approval gate `approval_gate` expired before a decision was recorded";
        assert_eq!(run.detail.as_deref(), Some(reason));
        assert_eq!(run.stop_reason.as_deref(), Some(reason));
        assert_eq!(run.finished_at_ms, Some(T0 + 10 * SEC));
        assert!(run.checkpoint.awaiting_gate.is_none());
        assert_eq!(run.checkpoint.gate_history.len(), 1);
        assert_eq!(events(&run), vec!["approval_gate_expired", "run_cancelled"]);
        for lc in &run.checkpoint.lifecycle_history {
            assert_eq!(lc.stop_kind, Some(AutomationStopKind::Cancelled));
            assert_eq!(lc.reason.as_deref(), Some(reason));
        }
        assert_eq!(
            run.checkpoint.pending_nodes,
            vec![GATE, "send"],
            "nodes untouched"
        );
        // A human decision after expiry finds the gate settled.
        let t = decide(&mut run, &spec, &req("approve"), T0 + 11 * SEC);
        assert!(
            matches!(t.outcome, GateDecisionOutcome::AlreadyDecided(Some(ref w)) if w.decision == "expired")
        );
    }

    #[test]
    fn expired_record_has_system_actor_and_expiry_metadata() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(1, A::Cancel, None, None));
        run.checkpoint
            .awaiting_gate
            .as_mut()
            .expect("gate")
            .metadata = Some(json!({"k": 1}));
        sweep(&mut run, T0 + 10 * SEC);
        let rec = serde_json::to_value(&run.checkpoint.gate_history[0]).expect("json");
        assert_eq!(
            rec,
            json!({
                "node_id": GATE,
                "decision": "expired",
                "reason": "approval gate `approval_gate` expired before a decision was recorded",
                "decided_at_ms": T0 + 10 * SEC,
                "decided_by": {"kind": "system", "source": "automation_gate_expiry"},
                "metadata": {
                    "expiry_policy": {"expires_after_ms": 1, "on_expiry": "cancel"},
                    "expires_at_ms": T0 + 1,
                    "expired_at_ms": T0 + 10 * SEC,
                    "gate_metadata": {"k": 1},
                },
            })
        );
        // Without gate metadata, `gate_metadata` is null.
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(1, A::Cancel, None, None));
        sweep(&mut run, T0 + 10 * SEC);
        let meta = run.checkpoint.gate_history[0]
            .metadata
            .as_ref()
            .expect("meta");
        assert_eq!(meta["gate_metadata"], Value::Null);
    }

    #[test]
    fn apply_gate_expiry_without_reason_uses_default_text() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        let gate = run.checkpoint.awaiting_gate.clone().expect("gate");
        let policy = policy::effective_policy(&gate, &defaults()).expect("policy");
        let t = update(&mut run, T0 + 1, |run, fx| {
            apply_gate_expiry(run, fx, &gate, None, T0, &policy, T0 + 1)
        });
        assert!(matches!(t.outcome, GateApply::Applied(_)));
        assert_eq!(
            run.detail.as_deref(),
            Some("gate `approval_gate` expired before approval")
        );
        // Settled now: a second expiry is refused with the winner.
        let t = update(&mut run, T0 + 2, |run, fx| {
            apply_gate_expiry(run, fx, &gate, None, T0, &policy, T0 + 2)
        });
        assert!(matches!(t.outcome, GateApply::AlreadyDecided(Some(_))));
        assert!(!t.changed);
    }

    #[test]
    fn case_6_approval_gate_reminder_policy_updates_notification_key() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(3_600_000, A::Cancel, Some(60_000), None));
        let now = T0 + 120 * SEC;
        let t = sweep(&mut run, now);
        let key = "automation_v2:run-1:approval_gate:reminder:1";
        assert_eq!(
            t.outcome,
            vec![GateAction::Reminded {
                node_id: GATE.into(),
                expired: false,
                reminder_count: 1,
                notification_key: key.into(),
            }]
        );
        let second = sweep(&mut run, now);
        assert!(second.outcome.is_empty() && !second.changed);
        assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
        assert_eq!(
            run.detail.as_deref(),
            Some("approval gate `approval_gate` is still awaiting a decision")
        );
        assert_eq!(
            Value::Object(gate_state(&run)),
            json!({
                "last_reminded_at_ms": now,
                "reminder_count": 1,
                "expires_at_ms": T0 + 3_600_000,
                "expired_reminder": false,
                "notification_key": key,
            })
        );
        assert!(key.contains(":reminder:1"));
    }

    #[test]
    fn case_7_approval_gate_escalation_policy_updates_notification_key() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(1, A::Escalate, None, Some(" risk-lead ")));
        let now = T0 + 120 * SEC;
        let t = sweep(&mut run, now);
        let key = "automation_v2:run-1:approval_gate:escalated:1";
        assert_eq!(
            t.outcome,
            vec![GateAction::Escalated {
                node_id: GATE.into(),
                escalated_to: "risk-lead".into(),
                reminder_count: 1,
                notification_key: key.into(),
            }]
        );
        let second = sweep(&mut run, now + 10 * SEC);
        assert!(second.outcome.is_empty() && !second.changed);
        assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
        assert_eq!(events(&run), vec!["approval_gate_escalated"]);
        assert_eq!(
            run.detail.as_deref(),
            Some("approval gate `approval_gate` expired and was escalated to risk-lead")
        );
        assert_eq!(
            Value::Object(gate_state(&run)),
            json!({
                "escalated_at_ms": now,
                "escalated_to": "risk-lead",
                "expires_at_ms": T0 + 1,
                "reminder_count": 1,
                "notification_key": key,
            })
        );
    }

    #[test]
    fn escalation_without_principal_goes_to_unassigned() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(1, A::Escalate, None, Some("  ")));
        let t = sweep(&mut run, T0 + 5);
        assert!(matches!(
            &t.outcome[0],
            GateAction::Escalated { escalated_to, .. } if escalated_to == "unassigned_escalation_principal"
        ));
    }

    #[test]
    fn escalation_after_two_reminders_shares_the_count() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(2_500, A::Escalate, Some(1_000), Some("lead")));
        let mut keys = Vec::new();
        for dt in [1_000, 2_000, 2_500, 3_500, 4_500, 100_000] {
            for a in sweep(&mut run, T0 + dt).outcome {
                match a {
                    GateAction::Reminded {
                        notification_key, ..
                    }
                    | GateAction::Escalated {
                        notification_key, ..
                    } => keys.push(notification_key),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(
            keys,
            vec![
                "automation_v2:run-1:approval_gate:reminder:1",
                "automation_v2:run-1:approval_gate:reminder:2",
                "automation_v2:run-1:approval_gate:escalated:3",
            ],
            "no reminders after expiry for a non-remind policy, escalation once (§7.12)"
        );
        assert_eq!(gate_state(&run)["reminder_count"], 3);
        assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
    }

    #[test]
    fn cancel_policy_reminds_before_expiry_then_expires() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(2_500, A::Cancel, Some(1_000), None));
        let kinds: Vec<Vec<GateAction>> = [1_000, 2_000, 2_500]
            .iter()
            .map(|dt| sweep(&mut run, T0 + dt).outcome)
            .collect();
        assert!(matches!(
            kinds[0][0],
            GateAction::Reminded {
                reminder_count: 1,
                ..
            }
        ));
        assert!(matches!(
            kinds[1][0],
            GateAction::Reminded {
                reminder_count: 2,
                ..
            }
        ));
        assert!(matches!(kinds[2][0], GateAction::Expired { .. }));
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
    }

    #[test]
    fn remind_policy_with_interval_keeps_reminding_after_expiry() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(10_000, A::Remind, Some(3_000), None));
        let mut seen = Vec::new();
        for dt in [3_000, 6_000, 9_000, 10_000, 12_000, 12_500, 15_000, 60_000] {
            let t = sweep(&mut run, T0 + dt);
            for a in t.outcome {
                if let GateAction::Reminded {
                    expired,
                    reminder_count,
                    ..
                } = a
                {
                    seen.push((dt, expired, reminder_count));
                }
            }
            if dt == 12_000 {
                assert_eq!(
                    t.effects.audit[0].payload["outcome"],
                    "expired_reminder_due"
                );
                assert_eq!(
                    run.detail.as_deref(),
                    Some("approval gate `approval_gate` is expired and still awaiting a decision")
                );
                assert_eq!(gate_state(&run)["expired_reminder"], true);
            }
        }
        assert_eq!(
            seen,
            vec![
                (3_000, false, 1),
                (6_000, false, 2),
                (9_000, false, 3),
                (12_000, true, 4),
                (15_000, true, 5),
                (60_000, true, 6),
            ]
        );
        assert_eq!(
            run.status,
            AutomationRunStatus::AwaitingApproval,
            "remind never cancels"
        );
        assert!(is_applied(
            &decide(&mut run, &spec, &req("approve"), T0 + 61_000).outcome
        ));
    }

    #[test]
    fn remind_policy_without_interval_reminds_once_at_expiry() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(10_000, A::Remind, None, None));
        assert!(!sweep(&mut run, T0 + 9_999).changed);
        let t = sweep(&mut run, T0 + 10_000);
        assert_eq!(
            t.outcome,
            vec![GateAction::Reminded {
                node_id: GATE.into(),
                expired: true,
                reminder_count: 1,
                notification_key: "automation_v2:run-1:approval_gate:reminder:1".into(),
            }]
        );
        assert!(!sweep(&mut run, T0 + 20_000).changed);
        assert!(!sweep(&mut run, T0 + 20 * 60_000).changed);
        assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
    }

    #[test]
    fn default_seven_day_policy_cancels_a_gate_without_explicit_policy() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        // Mark stale first so only the policy step remains.
        sweep(&mut run, T0 + DAY);
        let t = sweep(&mut run, T0 + 604_800_000 - 1);
        assert!(!t.changed, "nothing due one millisecond before 7 days");
        let t = sweep(&mut run, T0 + 604_800_000);
        assert_eq!(
            t.outcome,
            vec![GateAction::Expired {
                node_id: GATE.into(),
                expires_at_ms: T0 + 604_800_000,
            }]
        );
        assert_eq!(
            t.effects.audit[0].payload["metadata"]["expiry_policy"],
            json!({"expires_after_ms": 604_800_000, "on_expiry": "cancel"})
        );
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
    }

    #[test]
    fn default_policy_follows_env_defaults() {
        let spec = email_spec();
        let env = GatePolicyDefaults {
            expires_after_ms: Some(50 * SEC),
            on_expiry: A::Escalate,
            stale_after_ms: DAY,
        };
        let mut run = awaiting(&spec, &["compose"], T0);
        assert!(!process_gate_policies(&mut run, &env, T0 + 49 * SEC).changed);
        let t = process_gate_policies(&mut run, &env, T0 + 50 * SEC);
        assert!(matches!(
            &t.outcome[0],
            GateAction::Escalated { escalated_to, .. } if escalated_to == "unassigned_escalation_principal"
        ));
        // `TANDEM_APPROVAL_GATE_DEFAULT_EXPIRES_AFTER_MS=0`: no expiry, only stale marking.
        let none = GatePolicyDefaults {
            expires_after_ms: None,
            ..defaults()
        };
        let mut run = awaiting(&spec, &["compose"], T0);
        let t = process_gate_policies(&mut run, &none, T0 + 30 * DAY);
        assert_eq!(
            t.outcome,
            vec![GateAction::MarkedStale {
                node_id: GATE.into()
            }]
        );
    }

    #[test]
    fn gate_sweep_audit_payloads() {
        let spec = email_spec();
        let base = |status: &str,
                    stop_kind: Value,
                    reason: &str,
                    sweep: &str,
                    outcome: &str,
                    metadata: Value| {
            json!({
                "source": "automation_v2_internal_sweep",
                "sweep": sweep,
                "actor": {"type": "system", "id": "tandem-server", "component": "automation_v2_sweeper"},
                "run_id": "run-1",
                "runID": "run-1",
                "automation_id": "auto-email",
                "automationID": "auto-email",
                "status": status,
                "stop_kind": stop_kind,
                "reason": reason,
                "tenantContext": tenant_json(),
                "outcome": outcome,
                "metadata": metadata,
            })
        };
        let check = |t: &Transition<Vec<GateAction>>, event_type: &str, expected: Value| {
            assert_eq!(t.effects.audit.len(), 1);
            let a = &t.effects.audit[0];
            assert_eq!(a.event_type, event_type);
            assert_eq!(a.actor.as_deref(), Some("tandem-server:internal-sweep"));
            assert_eq!(a.tenant_context.org_id, "org-1");
            assert_eq!(a.payload, expected);
        };

        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(1, A::Cancel, None, None));
        let t = sweep(&mut run, T0 + 10);
        check(
            &t,
            "automation_v2.internal_sweep.approval_gate_expired",
            base(
                "cancelled",
                json!("cancelled"),
                "approval gate `approval_gate` expired before a decision was recorded",
                "process_awaiting_approval_gate_policies",
                "expired_cancelled",
                json!({
                    "node_id": GATE,
                    "expires_at_ms": T0 + 1,
                    "expiry_policy": {"expires_after_ms": 1, "on_expiry": "cancel"},
                }),
            ),
        );

        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(1, A::Escalate, None, Some("risk-lead")));
        let t = sweep(&mut run, T0 + 10);
        let meta = json!({
            "node_id": GATE,
            "expires_at_ms": T0 + 1,
            "escalated_to": "risk-lead",
            "expiry_policy": {"expires_after_ms": 1, "on_expiry": "escalate", "escalate_to": "risk-lead"},
        });
        check(
            &t,
            "automation_v2.internal_sweep.approval_gate_escalated",
            base(
                "awaiting_approval",
                Value::Null,
                "approval gate `approval_gate` expired and was escalated to risk-lead",
                "process_awaiting_approval_gate_policies",
                "expired_escalated",
                meta.clone(),
            ),
        );
        let mut lc_meta = meta;
        lc_meta["effective_execution_profile"] = json!("strict");
        assert_eq!(t.effects.lifecycle[0].metadata, Some(lc_meta));

        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(100, A::Cancel, Some(10), None));
        let t = sweep(&mut run, T0 + 10);
        let meta = json!({
            "node_id": GATE,
            "expires_at_ms": T0 + 100,
            "expired": false,
            "reminder_count": 1,
            "expiry_policy": {"expires_after_ms": 100, "on_expiry": "cancel", "remind_every_ms": 10},
        });
        check(
            &t,
            "automation_v2.internal_sweep.approval_gate_reminder_due",
            base(
                "awaiting_approval",
                Value::Null,
                "approval gate `approval_gate` is still awaiting a decision",
                "process_awaiting_approval_gate_policies",
                "reminder_due",
                meta.clone(),
            ),
        );
        let mut lc_meta = meta;
        lc_meta["effective_execution_profile"] = json!("strict");
        assert_eq!(t.effects.lifecycle[0].event, "approval_gate_reminder_due");
        assert_eq!(t.effects.lifecycle[0].metadata, Some(lc_meta));

        let mut run = awaiting(&spec, &["compose"], T0);
        let t = sweep(&mut run, T0 + DAY);
        let meta = json!({
            "node_id": GATE,
            "requested_at_ms": T0,
            "stale_after_ms": DAY,
            "policy": "manual_only_visible_status",
        });
        check(
            &t,
            "automation_v2.internal_sweep.approval_gate_marked_stale",
            base(
                "awaiting_approval",
                Value::Null,
                "awaiting manual approval for gate `approval_gate` for at least 86400s; no automatic expiry action is configured",
                "mark_stale_awaiting_approval_runs",
                "marked_stale",
                meta.clone(),
            ),
        );
        let mut lc_meta = meta;
        lc_meta["effective_execution_profile"] = json!("strict");
        assert_eq!(t.effects.lifecycle[0].metadata, Some(lc_meta));
    }

    #[test]
    fn approval_gate_event_payloads() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(1, A::Cancel, None, None));
        let t = sweep(&mut run, T0 + 10);
        assert_eq!(t.effects.events.len(), 1);
        let e = &t.effects.events[0];
        assert_eq!(
            (e.event_type.as_str(), e.dedupe_key.as_deref()),
            ("approval.gate.expired", None)
        );
        assert_eq!(e.node_id.as_deref(), Some(GATE));
        assert_eq!(
            e.properties,
            json!({
                "run_id": "run-1",
                "automation_id": "auto-email",
                "node_id": GATE,
                "decision": "expired",
                "expires_at_ms": T0 + 1,
                "tenantContext": tenant_json(),
            })
        );

        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(1, A::Escalate, None, Some("risk-lead")));
        let t = sweep(&mut run, T0 + 10);
        let e = &t.effects.events[0];
        assert_eq!(e.event_type, "approval.gate.escalated");
        assert_eq!(
            e.dedupe_key.as_deref(),
            Some("automation_v2:run-1:approval_gate:escalated:1"),
            "dedupe key = notification_key"
        );
        assert_eq!(
            e.properties,
            json!({
                "run_id": "run-1",
                "automation_id": "auto-email",
                "node_id": GATE,
                "expires_at_ms": T0 + 1,
                "escalated_to": "risk-lead",
                "tenantContext": tenant_json(),
            })
        );

        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(5, A::Remind, None, None));
        let t = sweep(&mut run, T0 + 10);
        let e = &t.effects.events[0];
        assert_eq!(e.event_type, "approval.gate.reminder_due");
        assert_eq!(
            e.dedupe_key.as_deref(),
            Some("automation_v2:run-1:approval_gate:reminder:1")
        );
        assert_eq!(
            e.properties,
            json!({
                "run_id": "run-1",
                "automation_id": "auto-email",
                "node_id": GATE,
                "expires_at_ms": T0 + 5,
                "expired": true,
                "reminder_count": 1,
                "tenantContext": tenant_json(),
            })
        );
        // Stale marking emits no event (spec §3.11).
        let mut run = awaiting(&spec, &["compose"], T0);
        assert!(sweep(&mut run, T0 + DAY).effects.events.is_empty());
    }

    // --------------------------------------------------------------------------------------
    // Escalation ladders (Tandem Fleet extension, policy.rs)
    // --------------------------------------------------------------------------------------

    fn step(
        after_ms: u64,
        action: &str,
        escalate_to: Option<&str>,
    ) -> AutomationGateEscalationStep {
        AutomationGateEscalationStep {
            after_ms,
            action: AutomationGateStepAction::parse(action),
            escalate_to: escalate_to.map(str::to_owned),
        }
    }

    fn ladder_policy(
        steps: Vec<AutomationGateEscalationStep>,
        escalate_to: Option<&str>,
    ) -> AutomationGateExpiryPolicy {
        AutomationGateExpiryPolicy {
            escalate_to: escalate_to.map(str::to_owned),
            steps: Some(steps),
            ..Default::default()
        }
    }

    /// remind @1 s, remind @2 s, escalate to `director` @3 s, cancel @4 s.
    fn four_step_ladder() -> AutomationGateExpiryPolicy {
        ladder_policy(
            vec![
                step(SEC, "remind", None),
                step(2 * SEC, "remind", None),
                step(3 * SEC, "escalate", Some("director")),
                step(4 * SEC, "cancel", None),
            ],
            Some("lead"),
        )
    }

    fn step_indices(t: &Transition<Vec<GateAction>>) -> Vec<u64> {
        t.effects
            .events
            .iter()
            .filter_map(|e| e.properties.get("step_index").and_then(Value::as_u64))
            .collect()
    }

    fn next_at(run: &Run) -> Option<Millis> {
        let d = GatePolicyDefaults {
            stale_after_ms: 1_000 * DAY,
            ..defaults()
        };
        run.checkpoint
            .awaiting_gate
            .as_ref()
            .and_then(|g| policy::next_action_at(g, &d))
    }

    #[test]
    fn ladder_applies_each_step_once_in_order_with_upstream_events_and_keys() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, four_step_ladder());
        assert_eq!(next_at(&run), Some(T0 + SEC));
        assert!(!sweep(&mut run, T0 + SEC - 1).changed);

        // Step 0: a reminder, upstream payload plus the step's identification.
        let t = sweep(&mut run, T0 + SEC);
        let key1 = "automation_v2:run-1:approval_gate:reminder:1";
        assert_eq!(
            t.outcome,
            vec![GateAction::Reminded {
                node_id: GATE.into(),
                expired: false,
                reminder_count: 1,
                notification_key: key1.into(),
            }]
        );
        let e = &t.effects.events[0];
        assert_eq!(e.event_type, EVENT_GATE_REMINDER_DUE);
        assert_eq!(e.dedupe_key.as_deref(), Some(key1));
        assert_eq!(
            e.properties,
            json!({
                "run_id": "run-1",
                "automation_id": "auto-email",
                "node_id": GATE,
                "expires_at_ms": T0 + 4 * SEC,
                "expired": false,
                "reminder_count": 1,
                "tenantContext": tenant_json(),
                "step_index": 0,
                "step_due_at_ms": T0 + SEC,
            })
        );
        assert_eq!(gate_state(&run)["steps_applied"], 1);
        assert_eq!(next_at(&run), Some(T0 + 2 * SEC));
        assert!(!sweep(&mut run, T0 + SEC).changed, "same now: nothing");
        assert!(!sweep(&mut run, T0 + 2 * SEC - 1).changed);

        // Step 1 (late is fine), step 2: escalation before the ladder's expiry.
        let t = sweep(&mut run, T0 + 2_500);
        assert_eq!(step_indices(&t), vec![1]);
        assert_eq!(
            t.effects.events[0].dedupe_key.as_deref(),
            Some("automation_v2:run-1:approval_gate:reminder:2")
        );
        let t = sweep(&mut run, T0 + 3 * SEC);
        let key3 = "automation_v2:run-1:approval_gate:escalated:3";
        assert_eq!(
            t.outcome,
            vec![GateAction::Escalated {
                node_id: GATE.into(),
                escalated_to: "director".into(),
                reminder_count: 3,
                notification_key: key3.into(),
            }]
        );
        assert_eq!(
            t.effects.events[0].properties,
            json!({
                "run_id": "run-1",
                "automation_id": "auto-email",
                "node_id": GATE,
                "expires_at_ms": T0 + 4 * SEC,
                "escalated_to": "director",
                "tenantContext": tenant_json(),
                "step_index": 2,
                "step_due_at_ms": T0 + 3 * SEC,
            })
        );
        assert_eq!(t.effects.audit[0].payload["outcome"], "escalated");
        assert_eq!(
            run.detail.as_deref(),
            Some("approval gate `approval_gate` was escalated to director")
        );
        assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
        assert_eq!(next_at(&run), Some(T0 + 4 * SEC));

        // Step 3: cancel, exactly upstream's expiry; nothing after it.
        let t = sweep(&mut run, T0 + 4 * SEC);
        assert_eq!(
            t.outcome,
            vec![GateAction::Expired {
                node_id: GATE.into(),
                expires_at_ms: T0 + 4 * SEC,
            }]
        );
        let e = &t.effects.events[0];
        assert_eq!(
            (e.event_type.as_str(), e.dedupe_key.as_deref()),
            (EVENT_GATE_EXPIRED, None)
        );
        assert_eq!(e.properties["decision"], "expired");
        assert_eq!(e.properties["step_index"], 3);
        assert_eq!(t.effects.audit[0].payload["outcome"], "expired_cancelled");
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
        assert_eq!(run.stop_kind, Some(AutomationStopKind::Cancelled));
        let last = run.checkpoint.gate_history.last().expect("expired record");
        assert_eq!(last.decision, "expired");
        assert_eq!(
            last.metadata.as_ref().expect("meta")["expiry_policy"],
            four_step_ladder_value()
        );
        assert_eq!(
            events(&run),
            vec![
                "approval_gate_reminder_due",
                "approval_gate_reminder_due",
                "approval_gate_escalated",
                "approval_gate_expired",
                "run_cancelled",
            ]
        );
        assert!(
            !sweep(&mut run, T0 + DAY).changed,
            "nothing after a terminal step"
        );
    }

    fn four_step_ladder_value() -> Value {
        json!({"escalate_to": "lead", "steps": [
            {"after_ms": SEC, "action": "remind"},
            {"after_ms": 2 * SEC, "action": "remind"},
            {"after_ms": 3 * SEC, "action": "escalate", "escalate_to": "director"},
            {"after_ms": 4 * SEC, "action": "cancel"},
        ]})
    }

    #[test]
    fn ladder_catches_up_every_overdue_step_in_one_call_in_order() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, four_step_ladder());
        // Partial catch-up: the two reminders, not the escalation yet.
        let t = sweep(&mut run, T0 + 2_999);
        assert_eq!(step_indices(&t), vec![0, 1]);
        // The rest, after a long outage.
        let t = sweep(&mut run, T0 + DAY / 2);
        assert_eq!(step_indices(&t), vec![2, 3]);
        assert!(matches!(
            t.outcome[..],
            [GateAction::Escalated { .. }, GateAction::Expired { .. }]
        ));
        // Each audit is built from the run its own step left: the escalation still awaited.
        let statuses: Vec<(&str, &str)> = t
            .effects
            .audit
            .iter()
            .map(|a| {
                (
                    a.payload["outcome"].as_str().unwrap_or_default(),
                    a.payload["status"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            statuses,
            vec![
                ("escalated", "awaiting_approval"),
                ("expired_cancelled", "cancelled")
            ]
        );

        // All four in one call.
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, four_step_ladder());
        let t = sweep(&mut run, T0 + 10 * SEC);
        assert_eq!(step_indices(&t), vec![0, 1, 2, 3]);
        let keys: Vec<Option<&str>> = t
            .effects
            .events
            .iter()
            .map(|e| e.dedupe_key.as_deref())
            .collect();
        assert_eq!(
            keys,
            vec![
                Some("automation_v2:run-1:approval_gate:reminder:1"),
                Some("automation_v2:run-1:approval_gate:reminder:2"),
                Some("automation_v2:run-1:approval_gate:escalated:3"),
                None,
            ]
        );
        assert_eq!(t.effects.audit.len(), 4);
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
    }

    #[test]
    fn human_decision_after_a_ladder_cancel_step_behaves_like_after_upstream_expiry() {
        let spec = email_spec();
        // Due but not swept yet: 409 AUTOMATION_V2_GATE_EXPIRED with the denial audit.
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, four_step_ladder());
        let before = run.clone();
        let t = decide(&mut run, &spec, &req("approve"), T0 + 4 * SEC);
        assert!(matches!(t.outcome, GateDecisionOutcome::GateExpired { .. }));
        assert_eq!(t.outcome.error_code(), Some(CODE_GATE_EXPIRED));
        assert_eq!(run, before);
        // Swept: not awaiting approval, the winner is the expired record.
        sweep(&mut run, T0 + 4 * SEC);
        let t = decide(&mut run, &spec, &req("approve"), T0 + 5 * SEC);
        assert_eq!(t.outcome.http_status(), 409);
        assert_eq!(
            t.outcome.winning_decision().map(|r| r.decision.as_str()),
            Some("expired")
        );
        // Before the cancel step (even after the escalation) a decision applies.
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, four_step_ladder());
        sweep(&mut run, T0 + 3 * SEC);
        let t = decide(&mut run, &spec, &req("approve"), T0 + 4 * SEC - 1);
        assert!(is_applied(&t.outcome));
        assert!(
            !sweep(&mut run, T0 + DAY).changed,
            "a decided gate has no ladder left"
        );
    }

    #[test]
    fn ladder_without_cancel_escalates_at_its_expiry_then_waits_for_a_human() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(
            &mut run,
            ladder_policy(
                vec![
                    step(SEC, "escalate", Some("  ")),
                    step(2 * SEC, "escalate", None),
                    step(3 * SEC, "remind", None),
                ],
                None,
            ),
        );
        let t = sweep(&mut run, T0 + 2 * SEC);
        let to: Vec<&str> = t
            .outcome
            .iter()
            .filter_map(|a| match a {
                GateAction::Escalated { escalated_to, .. } => Some(escalated_to.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            to,
            vec![
                UNASSIGNED_ESCALATION_PRINCIPAL,
                UNASSIGNED_ESCALATION_PRINCIPAL
            ],
            "blank step principal → policy's → unassigned; a ladder may escalate twice"
        );
        let t = sweep(&mut run, T0 + 3 * SEC);
        assert_eq!(
            t.outcome,
            vec![GateAction::Reminded {
                node_id: GATE.into(),
                expired: true,
                reminder_count: 3,
                notification_key: "automation_v2:run-1:approval_gate:reminder:3".into(),
            }],
            "a reminder at the ladder's expiry is an expired reminder"
        );
        assert_eq!(
            t.effects.audit[0].payload["outcome"],
            "expired_reminder_due"
        );
        assert_eq!(
            next_at(&run),
            Some(T0 + 1_000 * DAY),
            "ladder done: only the stale marking is left"
        );
        assert!(
            !sweep(&mut run, T0 + 30 * SEC).changed,
            "no repetition after the last step"
        );
        let t = decide(&mut run, &spec, &req("approve"), T0 + 40 * SEC);
        assert!(
            is_applied(&t.outcome),
            "no cancel step: late decisions are accepted"
        );
    }

    #[test]
    fn ladder_escalation_at_expiry_keeps_upstream_text_and_outcome() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(
            &mut run,
            ladder_policy(vec![step(SEC, "escalate", None)], Some(" lead ")),
        );
        let t = sweep(&mut run, T0 + SEC);
        assert_eq!(
            run.detail.as_deref(),
            Some("approval gate `approval_gate` expired and was escalated to lead")
        );
        assert_eq!(t.effects.audit[0].payload["outcome"], "expired_escalated");
        assert_eq!(
            t.effects.lifecycle[0].metadata,
            Some(json!({
                "node_id": GATE,
                "expires_at_ms": T0 + SEC,
                "escalated_to": "lead",
                "expiry_policy": {"escalate_to": " lead ",
                                  "steps": [{"after_ms": SEC, "action": "escalate"}]},
                "step_index": 0,
                "step_due_at_ms": T0 + SEC,
                "effective_execution_profile": "strict",
            }))
        );
    }

    #[test]
    fn ladder_runtime_skips_unknown_actions_and_never_runs_past_cancel() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(
            &mut run,
            ladder_policy(
                vec![
                    step(SEC, "page", None),
                    step(2 * SEC, "remind", None),
                    step(SEC, "cancel", None),
                    step(5 * SEC, "remind", None),
                ],
                None,
            ),
        );
        let t = sweep(&mut run, T0 + 2 * SEC);
        assert_eq!(
            step_indices(&t),
            vec![1, 2],
            "cancel at 1 s is not due before the remind at 2 s"
        );
        assert_eq!(run.status, AutomationRunStatus::Cancelled);
    }

    #[test]
    fn ladder_keys_continue_across_gate_instances() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(
            &mut run,
            ladder_policy(
                vec![step(SEC, "remind", None), step(2 * SEC, "escalate", None)],
                None,
            ),
        );
        let mut keys = Vec::new();
        let mut collect = |t: Transition<Vec<GateAction>>| {
            keys.extend(t.effects.events.into_iter().filter_map(|e| e.dedupe_key));
        };
        collect(sweep(&mut run, T0 + 2 * SEC));
        decide(&mut run, &spec, &req("rework"), T0 + 3 * SEC);
        run.status = AutomationRunStatus::Running;
        complete(&mut run, "compose");
        let reopened = open(&mut run, &spec, T0 + 4 * SEC);
        set_policy(
            &mut run,
            ladder_policy(
                vec![step(SEC, "remind", None), step(2 * SEC, "escalate", None)],
                None,
            ),
        );
        assert_eq!(
            policy::steps_applied(&reopened),
            0,
            "a new instance starts its ladder over"
        );
        collect(sweep(&mut run, T0 + 10 * SEC));
        assert_eq!(
            keys,
            vec![
                "automation_v2:run-1:approval_gate:reminder:1",
                "automation_v2:run-1:approval_gate:escalated:2",
                "automation_v2:run-1:approval_gate:reminder:3",
                "automation_v2:run-1:approval_gate:escalated:4",
            ]
        );
    }

    #[test]
    fn open_gate_publishes_the_ladder_expiry() {
        let mut spec = email_spec();
        if let Some(g) = spec.flow.nodes[1].gate.as_mut() {
            g.expiry_policy = Some(four_step_ladder());
        }
        let mut run = new_run(&spec);
        complete(&mut run, "compose");
        refresh_runtime_state(&spec, &mut run);
        let t = open_gate(&mut run, &spec, &defaults(), T0);
        assert_eq!(
            t.effects.events[0].properties["expires_at_ms"],
            T0 + 4 * SEC
        );
    }

    #[test]
    fn spec_validation_names_the_policy_path() {
        let mut spec = email_spec();
        assert_eq!(validate_gate_policies(&spec), Ok(()));
        if let Some(g) = spec.flow.nodes[1].gate.as_mut() {
            g.expiry_policy = Some(ladder_policy(
                vec![step(SEC, "remind", None), step(2 * SEC, "page", None)],
                None,
            ));
        }
        let e = validate_gate_policies(&spec).expect_err("unknown action");
        assert_eq!(e.path, "flow.nodes[1].gate.expiry_policy.steps[1].action");
        assert!(e.message.contains("\"page\""), "{}", e.message);
        // A policy given in the node metadata is checked where the gate would read it from.
        if let Some(g) = spec.flow.nodes[1].gate.as_mut() {
            g.expiry_policy = None;
        }
        spec.flow.nodes[1].metadata = Some(json!({"approval": {
            "expiry_policy": "not a policy",
            "gate_expiry_policy": {"steps": [{"after_ms": 1, "action": "cancel"},
                                             {"after_ms": 2, "action": "remind"}]}}}));
        let e = validate_gate_policies(&spec).expect_err("step after cancel");
        assert_eq!(
            e.path,
            "flow.nodes[1].metadata.approval.gate_expiry_policy.steps[1]"
        );
        // The whole spec JSON with an unknown action still parses: validation reports it.
        let mut v = serde_json::to_value(email_spec()).expect("ser");
        v["flow"]["nodes"][1]["gate"]["expiry_policy"] =
            json!({"steps": [{"after_ms": 1, "action": "sms"}]});
        let parsed: AutomationV2Spec = serde_json::from_value(v).expect("parses");
        assert_eq!(
            validate_gate_policies(&parsed).map_err(|e| e.path),
            Err("flow.nodes[1].gate.expiry_policy.steps[0].action".into())
        );
    }

    // --------------------------------------------------------------------------------------
    // Stale marking (spec §3.11)
    // --------------------------------------------------------------------------------------

    #[test]
    fn case_15_awaiting_approval_runs_are_marked_stale_with_visible_manual_policy() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        run.checkpoint
            .awaiting_gate
            .as_mut()
            .expect("gate")
            .metadata = Some(json!({"risk": "low"}));
        let now = T0 + 2 * DAY;
        let t = sweep(&mut run, now);
        assert_eq!(
            t.outcome,
            vec![GateAction::MarkedStale {
                node_id: GATE.into()
            }]
        );
        let second = sweep(&mut run, now);
        assert!(second.outcome.is_empty() && !second.changed);
        assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
        assert!(
            run.detail
                .as_deref()
                .is_some_and(|d| d.contains("awaiting manual approval"))
        );
        assert_eq!(
            run.detail.as_deref(),
            Some(
                "awaiting manual approval for gate `approval_gate` for at least 86400s; no automatic expiry action is configured"
            ),
            "upstream text kept although the 7-day cancel applies (§7.10)"
        );
        assert_eq!(
            run.checkpoint
                .awaiting_gate
                .as_ref()
                .and_then(|g| g.metadata.clone()),
            Some(json!({
                "risk": "low",
                "stale": true,
                "stale_policy": "manual_only_visible_status",
                "stale_after_ms": DAY,
                "stale_marked_at_ms": now,
                "requested_at_ms": T0,
            }))
        );
        assert_eq!(events(&run), vec!["approval_gate_marked_stale"]);
        assert!(!sweep(&mut run, T0 + DAY - 1).changed);
    }

    #[test]
    fn stale_marking_waits_for_stale_after_ms() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        assert!(!sweep(&mut run, T0 + DAY - 1).changed);
        assert!(sweep(&mut run, T0 + DAY).changed);
    }

    #[test]
    fn section_7_9_r2_stale_marking_rechecks_status_on_the_row() {
        let spec = email_spec();
        for status in [
            AutomationRunStatus::Queued,
            AutomationRunStatus::Cancelled,
            AutomationRunStatus::Paused,
        ] {
            // The row changed after the notifier selected it; the gate may even be left set.
            let mut run = awaiting(&spec, &["compose"], T0);
            run.status = status;
            let before = run.clone();
            let t = sweep(&mut run, T0 + 3 * DAY);
            assert!(!t.changed && t.effects.is_empty() && t.outcome.is_empty());
            assert_eq!(
                run, before,
                "upstream overwrites detail and records a marker"
            );
        }
        let mut run = awaiting(&spec, &["compose"], T0);
        run.checkpoint.awaiting_gate = None;
        assert!(!sweep(&mut run, T0 + 3 * DAY).changed);
    }

    #[test]
    fn non_object_gate_metadata_is_kept_as_legacy_metadata() {
        let spec = email_spec();
        // Stale marker: upstream discards it (§7.10); we keep it.
        let mut run = awaiting(&spec, &["compose"], T0);
        run.checkpoint
            .awaiting_gate
            .as_mut()
            .expect("gate")
            .metadata = Some(json!("legacy"));
        sweep(&mut run, T0 + DAY);
        let meta = run
            .checkpoint
            .awaiting_gate
            .as_ref()
            .and_then(|g| g.metadata.clone());
        assert_eq!(
            meta.as_ref().map(|m| m["legacy_metadata"].clone()),
            Some(json!("legacy"))
        );
        assert_eq!(meta.map(|m| m["stale"].clone()), Some(json!(true)));
        // Policy-state writer (upstream behaviour).
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(100, A::Cancel, Some(10), None));
        run.checkpoint
            .awaiting_gate
            .as_mut()
            .expect("gate")
            .metadata = Some(json!([1, 2]));
        sweep(&mut run, T0 + 10);
        let meta = run
            .checkpoint
            .awaiting_gate
            .as_ref()
            .and_then(|g| g.metadata.clone());
        assert_eq!(
            meta.as_ref().map(|m| m["legacy_metadata"].clone()),
            Some(json!([1, 2]))
        );
        assert_eq!(
            meta.map(|m| m["gate_policy_state"]["reminder_count"].clone()),
            Some(json!(1))
        );
    }

    #[test]
    fn stale_marking_runs_after_the_policy_step_on_the_same_tick() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(7 * DAY, A::Cancel, Some(DAY), None));
        let t = sweep(&mut run, T0 + DAY);
        assert_eq!(t.outcome.len(), 2);
        assert!(matches!(t.outcome[0], GateAction::Reminded { .. }));
        assert!(matches!(t.outcome[1], GateAction::MarkedStale { .. }));
        assert_eq!(
            events(&run),
            vec!["approval_gate_reminder_due", "approval_gate_marked_stale"]
        );
        let types: Vec<&str> = t
            .effects
            .audit
            .iter()
            .map(|a| a.event_type.as_str())
            .collect();
        assert_eq!(
            types,
            vec![
                "automation_v2.internal_sweep.approval_gate_reminder_due",
                "automation_v2.internal_sweep.approval_gate_marked_stale",
            ]
        );
        assert!(
            run.detail
                .as_deref()
                .is_some_and(|d| d.starts_with("awaiting manual approval")),
            "the stale detail overwrites the reminder's, as upstream"
        );
        let meta = run
            .checkpoint
            .awaiting_gate
            .as_ref()
            .and_then(|g| g.metadata.clone());
        assert_eq!(
            meta.map(|m| m["gate_policy_state"]["reminder_count"].clone()),
            Some(json!(1)),
            "the stale marker keeps the policy state"
        );
        // An expired gate is not marked stale on the same tick.
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(DAY, A::Cancel, None, None));
        let t = sweep(&mut run, T0 + 2 * DAY);
        assert_eq!(t.outcome.len(), 1);
        assert_eq!(t.effects.audit.len(), 1);
    }

    // --------------------------------------------------------------------------------------
    // No-ops and idempotency
    // --------------------------------------------------------------------------------------

    #[test]
    fn nothing_due_is_a_noop_with_no_effects() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(DAY, A::Cancel, Some(DAY / 2), None));
        let before = run.clone();
        let t = sweep(&mut run, T0 + 1_000);
        assert!(!t.changed && t.effects.is_empty() && t.outcome.is_empty());
        assert_eq!(run, before, "updated_at_ms not bumped either");
        // A run that is not awaiting approval.
        let mut queued = new_run(&spec);
        queued.status = AutomationRunStatus::Queued;
        let before = queued.clone();
        assert!(!sweep(&mut queued, T0 + 30 * DAY).changed);
        assert_eq!(queued, before);
    }

    #[test]
    fn reminder_is_applied_at_most_once_at_the_same_now() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(DAY, A::Remind, Some(10), None));
        let first = sweep(&mut run, T0 + 50);
        let second = sweep(&mut run, T0 + 50);
        assert_eq!(first.outcome.len(), 1);
        assert!(!second.changed && second.effects.is_empty());
        // Reminders do not catch up on missed intervals: one per sweep.
        let third = sweep(&mut run, T0 + 500);
        assert!(matches!(
            third.outcome[..],
            [GateAction::Reminded {
                reminder_count: 2,
                ..
            }]
        ));
    }

    #[test]
    fn reminder_count_continues_across_gate_instances_so_keys_never_repeat() {
        let spec = email_spec();
        let mut run = awaiting(&spec, &["compose"], T0);
        set_policy(&mut run, pol(DAY, A::Cancel, Some(SEC), None));
        sweep(&mut run, T0 + SEC);
        sweep(&mut run, T0 + 2 * SEC);
        decide(&mut run, &spec, &req("rework"), T0 + 3 * SEC);
        run.status = AutomationRunStatus::Running;
        complete(&mut run, "compose");
        open(&mut run, &spec, T0 + 4 * SEC);
        set_policy(&mut run, pol(DAY, A::Escalate, Some(SEC), None));
        let t = sweep(&mut run, T0 + 5 * SEC);
        assert!(matches!(
            &t.outcome[..],
            [GateAction::Reminded { reminder_count: 3, notification_key, .. }]
                if notification_key == "automation_v2:run-1:approval_gate:reminder:3"
        ));
        // A third instance after a cancel + task retry, escalating: the count still grows.
        decide(&mut run, &spec, &req("cancel"), T0 + 6 * SEC);
        retry_gate_and_claim(&mut run);
        open(&mut run, &spec, T0 + 7 * SEC);
        set_policy(&mut run, pol(1, A::Escalate, None, None));
        let t = sweep(&mut run, T0 + 8 * SEC);
        assert!(matches!(
            &t.outcome[..],
            [GateAction::Escalated {
                reminder_count: 4,
                ..
            }]
        ));
    }

    #[test]
    fn decision_gate_prefers_the_open_gate_and_is_none_without_candidates() {
        let spec = email_spec();
        let run = awaiting(&spec, &["compose"], T0);
        assert_eq!(
            decision_gate(&run, &spec),
            run.checkpoint.awaiting_gate.clone()
        );
        let mut run = new_run(&spec);
        run.checkpoint.pending_nodes = vec!["send".into()];
        assert!(decision_gate(&run, &spec).is_none());
        // A pending gate node that already has history is not recovered.
        let mut run = new_run(&spec);
        run.checkpoint
            .gate_history
            .push(AutomationGateDecisionRecord {
                node_id: GATE.into(),
                decision: "rework".into(),
                reason: None,
                decided_at_ms: T0,
                decided_by: None,
                metadata: None,
            });
        assert!(decision_gate(&run, &spec).is_none());
    }

    // --------------------------------------------------------------------------------------
    // Property tests
    // --------------------------------------------------------------------------------------

    mod props {
        use super::*;
        use crate::effects::EventDraft;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        #[derive(Debug, Clone)]
        enum Aim {
            Unspecified,
            Current,
            Previous,
            Other(u64),
        }

        #[derive(Debug, Clone)]
        enum Op {
            Decide {
                decision: usize,
                aim: Aim,
                dt: u64,
            },
            Sweep {
                dt: u64,
            },
            Recover {
                dt: u64,
            },
            /// The executor reaches the gate again (after rework, or a task retry).
            Reopen {
                dt: u64,
            },
            /// An upstream crash between "history appended" and "status changed".
            HalfApply {
                decision: usize,
                dt: u64,
            },
        }

        const DECISIONS: [&str; 5] = ["approve", "rework", "cancel", " Approve ", "bogus"];
        const HALF: [&str; 3] = ["approve", "cancel", "expired"];

        fn dt() -> impl Strategy<Value = u64> {
            prop_oneof![Just(0u64), 1u64..50, 50u64..3_000, 3_000u64..20_000]
        }

        fn aim() -> impl Strategy<Value = Aim> {
            prop_oneof![
                Just(Aim::Unspecified),
                Just(Aim::Current),
                Just(Aim::Previous),
                (0u64..10_000).prop_map(Aim::Other),
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0usize..DECISIONS.len(), aim(), dt())
                    .prop_map(|(decision, aim, dt)| Op::Decide { decision, aim, dt }),
                4 => dt().prop_map(|dt| Op::Sweep { dt }),
                1 => dt().prop_map(|dt| Op::Recover { dt }),
                3 => dt().prop_map(|dt| Op::Reopen { dt }),
                1 => (0usize..HALF.len(), dt()).prop_map(|(decision, dt)| Op::HalfApply { decision, dt }),
            ]
        }

        fn policy() -> impl Strategy<Value = AutomationGateExpiryPolicy> {
            (
                prop_oneof![Just(A::Cancel), Just(A::Escalate), Just(A::Remind)],
                500u64..20_000,
                prop::option::of(200u64..5_000),
            )
                .prop_map(|(on, expires, every)| pol(expires, on, every, Some("lead")))
        }

        /// Brings a queued or cancelled run back to an open gate, as the executor and the task
        /// endpoints do.
        fn reopen(
            run: &mut Run,
            spec: &AutomationV2Spec,
            now: Millis,
        ) -> Option<AutomationPendingGate> {
            match run.status {
                AutomationRunStatus::Queued | AutomationRunStatus::Cancelled => {
                    if run.status == AutomationRunStatus::Cancelled
                        || run.checkpoint.is_completed(GATE)
                    {
                        retry_gate_and_claim(run);
                    }
                    run.status = AutomationRunStatus::Running;
                    if run.checkpoint.is_pending("compose") {
                        complete(run, "compose");
                    }
                    refresh_runtime_state(spec, run);
                    match open_gate(run, spec, &defaults(), now).outcome {
                        OpenGateOutcome::Opened(g) => Some(*g),
                        other => panic!("gate did not reopen: {other:?}"),
                    }
                }
                _ => None,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            #[test]
            fn gate_instances_settle_at_most_once_and_notification_keys_never_repeat(
                gate_policy in policy(),
                ops in prop::collection::vec(op(), 1..60),
            ) {
                let mut spec = email_spec();
                if let Some(g) = spec.flow.nodes[1].gate.as_mut() {
                    g.expiry_policy = Some(gate_policy);
                }
                let defaults = GatePolicyDefaults { stale_after_ms: 4_000, ..defaults() };
                let mut now = T0;
                let mut run = awaiting(&spec, &["compose"], now);
                let mut instances: Vec<Millis> =
                    vec![run.checkpoint.awaiting_gate.as_ref().map_or(0, |g| g.requested_at_ms)];
                let mut keys: HashSet<String> = HashSet::new();
                let mut last_count = 0u64;

                for op in ops {
                    let open_at = run.checkpoint.awaiting_gate.as_ref().map(|g| g.requested_at_ms);
                    match op {
                        Op::Decide { decision, aim, dt } => {
                            now += dt;
                            let expected = match aim {
                                Aim::Unspecified => None,
                                Aim::Current => open_at,
                                Aim::Previous => instances.iter().rev().nth(1).copied(),
                                Aim::Other(x) => Some(T0 + x),
                            };
                            let mut r = req(DECISIONS[decision]);
                            r.gate_requested_at_ms = expected;
                            let before = run.clone();
                            let t = decide_gate(&mut run, &spec, &defaults, &r, now);
                            if !t.changed {
                                prop_assert!(t.effects.is_empty());
                                prop_assert_eq!(&run, &before);
                            }
                            if let GateDecisionOutcome::Applied { gate, record } = &t.outcome {
                                prop_assert_eq!(Some(gate.requested_at_ms), open_at);
                                prop_assert!(expected.is_none() || expected == open_at, "R5: stale instance applied");
                                prop_assert!(record.decided_at_ms >= gate.requested_at_ms);
                                prop_assert!(run.checkpoint.awaiting_gate.is_none());
                            } else {
                                prop_assert!(!t.changed);
                            }
                        }
                        Op::Sweep { dt } => {
                            now += dt;
                            let t = process_gate_policies(&mut run, &defaults, now);
                            prop_assert_eq!(t.changed, !t.outcome.is_empty());
                            let mut dedupe: Vec<&str> = t
                                .effects
                                .events
                                .iter()
                                .filter_map(|e| e.dedupe_key.as_deref())
                                .collect();
                            for a in &t.outcome {
                                if let GateAction::Reminded { reminder_count, notification_key, .. }
                                | GateAction::Escalated { reminder_count, notification_key, .. } = a
                                {
                                    prop_assert!(*reminder_count > last_count, "reminder_count decreased");
                                    last_count = *reminder_count;
                                    prop_assert!(keys.insert(notification_key.clone()), "key repeated: {}", notification_key);
                                    prop_assert_eq!(dedupe.first().copied(), Some(notification_key.as_str()));
                                    dedupe.remove(0);
                                }
                            }
                            let again = process_gate_policies(&mut run, &defaults, now);
                            prop_assert!(
                                !again.outcome.iter().any(|a| matches!(a, GateAction::Reminded { .. })),
                                "a second sweep at the same now reminded again"
                            );
                            for a in &again.outcome {
                                if let GateAction::Escalated { reminder_count, notification_key, .. } = a {
                                    prop_assert!(*reminder_count > last_count);
                                    last_count = *reminder_count;
                                    prop_assert!(keys.insert(notification_key.clone()));
                                }
                            }
                        }
                        Op::Recover { dt } => {
                            now += dt;
                            let before = run.clone();
                            let t = recover_settled_decision(&mut run, &spec, now);
                            if !t.outcome {
                                prop_assert!(!t.changed);
                                prop_assert_eq!(&run, &before);
                            } else {
                                prop_assert_eq!(run.checkpoint.gate_history.len(), before.checkpoint.gate_history.len());
                            }
                        }
                        Op::Reopen { dt } => {
                            now += dt;
                            if let Some(g) = reopen(&mut run, &spec, now) {
                                prop_assert!(g.requested_at_ms > *instances.last().unwrap_or(&0));
                                instances.push(g.requested_at_ms);
                            }
                        }
                        Op::HalfApply { decision, dt } => {
                            now += dt;
                            // Only where upstream could crash: an open gate with no record yet.
                            if let Some(g) = run.checkpoint.awaiting_gate.clone()
                                && run.status == AutomationRunStatus::AwaitingApproval
                                && !run.checkpoint.gate_history.iter().any(|r| r.decided_at_ms >= g.requested_at_ms)
                            {
                                run.checkpoint.gate_history.push(AutomationGateDecisionRecord {
                                    node_id: GATE.into(),
                                    decision: HALF[decision].into(),
                                    reason: None,
                                    decided_at_ms: now.max(g.requested_at_ms),
                                    decided_by: Some(alice()),
                                    metadata: g.metadata.clone(),
                                });
                            }
                        }
                    }

                    // At most one decision record (settled or rework) per gate instance, and
                    // every record falls inside an instance.
                    let mut per_instance = vec![0usize; instances.len()];
                    for r in &run.checkpoint.gate_history {
                        let idx = instances.iter().rposition(|start| *start <= r.decided_at_ms);
                        prop_assert!(idx.is_some(), "record before the first instance");
                        if let Some(i) = idx {
                            per_instance[i] += 1;
                        }
                    }
                    prop_assert!(per_instance.iter().all(|n| *n <= 1), "instances: {:?} history: {:?}", instances, run.checkpoint.gate_history);
                    if run.status == AutomationRunStatus::AwaitingApproval {
                        prop_assert!(run.checkpoint.awaiting_gate.is_some());
                    }
                }
            }
        }

        #[derive(Debug, Clone)]
        enum LadderOp {
            /// A gate-notifier call at `now + dt - back` (`back` > 0: a call at an earlier time
            /// than one already made, e.g. a slow replica).
            Sweep {
                dt: u64,
                back: u64,
            },
            Decide {
                decision: usize,
                dt: u64,
            },
            Reopen {
                dt: u64,
            },
        }

        fn ladder_op() -> impl Strategy<Value = LadderOp> {
            prop_oneof![
                8 => (dt(), prop_oneof![3 => Just(0u64), 1 => 0u64..5_000])
                    .prop_map(|(dt, back)| LadderOp::Sweep { dt, back }),
                2 => (0usize..3, dt()).prop_map(|(decision, dt)| LadderOp::Decide { decision, dt }),
                2 => dt().prop_map(|dt| LadderOp::Reopen { dt }),
            ]
        }

        /// Valid ladders: 1–6 remind/escalate steps in time order (equal offsets allowed),
        /// optionally ending with `cancel`.
        fn ladder() -> impl Strategy<Value = AutomationGateExpiryPolicy> {
            (
                prop::collection::vec(
                    (
                        prop_oneof![Just(0u64), 1u64..4_000],
                        prop_oneof![Just("remind"), Just("escalate")],
                        any::<bool>(),
                    ),
                    1..7,
                ),
                any::<bool>(),
                0u64..4_000,
            )
                .prop_map(|(body, end_with_cancel, gap)| {
                    let mut at = 0;
                    let mut steps = Vec::new();
                    for (g, action, named) in body {
                        at += g;
                        let to = (action == "escalate" && named).then_some("director");
                        steps.push(step(at, action, to));
                    }
                    if end_with_cancel {
                        steps.push(step(at + gap, "cancel", None));
                    }
                    ladder_policy(steps, Some("lead"))
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]

            /// Under any interleaving of gate-notifier calls at arbitrary times (including
            /// repeated and out-of-order ones), human decisions and gate re-opens, every ladder
            /// step of a gate instance is applied exactly once, in order, never before it is due,
            /// all overdue steps are caught up by the next call, notification keys never repeat,
            /// nothing follows a `cancel` step, and `next_action_at` is the next unapplied step.
            #[test]
            fn ladder_steps_apply_once_in_order_and_keys_never_repeat(
                gate_policy in ladder(),
                ops in prop::collection::vec(ladder_op(), 1..50),
            ) {
                prop_assert_eq!(policy::validate_expiry_policy(&gate_policy), Ok(()));
                let stored = gate_policy.steps.clone().unwrap_or_default();
                let steps = policy::ladder_steps(&stored);
                prop_assert_eq!(steps.len(), stored.len(), "valid ladders lose no step");
                let mut spec = email_spec();
                if let Some(g) = spec.flow.nodes[1].gate.as_mut() {
                    g.expiry_policy = Some(gate_policy);
                }
                let defaults = GatePolicyDefaults { stale_after_ms: 4_000, ..defaults() };
                let far = GatePolicyDefaults { stale_after_ms: 1_000 * DAY, ..defaults };
                let mut now = T0;
                let mut run = awaiting(&spec, &["compose"], now);
                // Per gate instance (requested_at_ms): steps applied so far, and whether a
                // terminal (cancel) step was applied.
                let mut applied: BTreeMap<Millis, (usize, bool)> = BTreeMap::new();
                let mut keys: HashSet<String> = HashSet::new();

                for op in ops {
                    match op {
                        LadderOp::Sweep { dt, back } => {
                            now += dt;
                            let at = now.saturating_sub(back);
                            let open = (run.status == AutomationRunStatus::AwaitingApproval)
                                .then(|| run.checkpoint.awaiting_gate.clone())
                                .flatten();
                            let t = process_gate_policies(&mut run, &defaults, at);
                            let ladder_events: Vec<&EventDraft> = t
                                .effects
                                .events
                                .iter()
                                .filter(|e| e.event_type.starts_with("approval.gate."))
                                .collect();
                            let Some(gate) = open else {
                                prop_assert!(ladder_events.is_empty(), "events without an open gate");
                                continue;
                            };
                            let entry = applied.entry(gate.requested_at_ms).or_insert((0, false));
                            prop_assert!(!entry.1 || ladder_events.is_empty(), "event after a terminal step");
                            prop_assert_eq!(policy::steps_applied(&gate), entry.0, "persisted progress");
                            let first = entry.0;
                            for (n, e) in ladder_events.iter().enumerate() {
                                let idx = e.properties["step_index"].as_u64().map(|i| i as usize);
                                prop_assert_eq!(idx, Some(first + n), "in order, each once");
                                let s = &steps[first + n];
                                let due = gate.requested_at_ms + s.due_after_ms;
                                prop_assert!(due <= at, "applied before due");
                                prop_assert_eq!(e.properties["step_due_at_ms"].as_u64(), Some(due));
                                let (ty, kind) = match s.action {
                                    A::Remind => (EVENT_GATE_REMINDER_DUE, Some(":reminder:")),
                                    A::Escalate => (EVENT_GATE_ESCALATED, Some(":escalated:")),
                                    A::Cancel => (EVENT_GATE_EXPIRED, None),
                                };
                                prop_assert_eq!(e.event_type.as_str(), ty);
                                match (kind, &e.dedupe_key) {
                                    (Some(k), Some(key)) => {
                                        prop_assert!(key.contains(k));
                                        prop_assert!(keys.insert(key.clone()), "key repeated: {}", key);
                                    }
                                    (None, None) => {}
                                    (kind, key) => prop_assert!(false, "key {:?} for {:?}", key, kind),
                                }
                                if s.action == A::Cancel {
                                    prop_assert_eq!(n + 1, ladder_events.len(), "nothing after cancel");
                                    entry.1 = true;
                                }
                            }
                            entry.0 += ladder_events.len();
                            // One lifecycle record per step of its kind (cancel: expired + cancelled).
                            let count = |name: &str| t.effects.lifecycle.iter().filter(|r| r.event == name).count();
                            let of = |ty: &str| ladder_events.iter().filter(|e| e.event_type == ty).count();
                            prop_assert_eq!(count(LIFECYCLE_GATE_REMINDER_DUE), of(EVENT_GATE_REMINDER_DUE));
                            prop_assert_eq!(count(LIFECYCLE_GATE_ESCALATED), of(EVENT_GATE_ESCALATED));
                            prop_assert_eq!(count(LIFECYCLE_GATE_EXPIRED), of(EVENT_GATE_EXPIRED));
                            // Catch-up: every step due at `at` is applied now, unless one closed the gate.
                            let due_now = steps
                                .iter()
                                .take_while(|s| gate.requested_at_ms + s.due_after_ms <= at)
                                .count();
                            prop_assert_eq!(entry.0, first.max(due_now));
                            if entry.1 {
                                prop_assert_eq!(run.status, AutomationRunStatus::Cancelled);
                                prop_assert_eq!(
                                    run.checkpoint.gate_history.last().map(|r| r.decision.as_str()),
                                    Some("expired")
                                );
                            } else {
                                let g = run.checkpoint.awaiting_gate.as_ref();
                                prop_assert_eq!(g.map(|g| g.requested_at_ms), Some(gate.requested_at_ms));
                                if let Some(g) = g {
                                    prop_assert_eq!(policy::steps_applied(g), entry.0);
                                    let stale = (!g.is_marked_stale())
                                        .then(|| g.requested_at_ms + far.stale_after_ms);
                                    let expected = steps
                                        .get(entry.0)
                                        .map(|s| g.requested_at_ms + s.due_after_ms)
                                        .or(stale);
                                    prop_assert_eq!(policy::next_action_at(g, &far), expected);
                                    if let Some(next) = steps.get(entry.0) {
                                        prop_assert!(g.requested_at_ms + next.due_after_ms > at);
                                    }
                                }
                            }
                            // The same call again applies nothing.
                            let again = process_gate_policies(&mut run, &defaults, at);
                            prop_assert!(!again
                                .effects
                                .events
                                .iter()
                                .any(|e| e.event_type.starts_with("approval.gate.")));
                        }
                        LadderOp::Decide { decision, dt } => {
                            now += dt;
                            let open = (run.status == AutomationRunStatus::AwaitingApproval)
                                .then(|| run.checkpoint.awaiting_gate.clone())
                                .flatten();
                            let t = decide(&mut run, &spec, &req(["approve", "rework", "cancel"][decision]), now);
                            if let Some(gate) = open {
                                let cancel_due = steps.iter().any(|s| {
                                    s.action == A::Cancel && gate.requested_at_ms + s.due_after_ms <= now
                                });
                                if cancel_due {
                                    let expired = matches!(t.outcome, GateDecisionOutcome::GateExpired { .. });
                                    prop_assert!(expired, "{:?}", t.outcome);
                                    prop_assert!(!t.changed);
                                } else {
                                    prop_assert!(is_applied(&t.outcome), "{:?}", t.outcome);
                                }
                            } else {
                                prop_assert!(!t.changed);
                            }
                        }
                        LadderOp::Reopen { dt } => {
                            now += dt;
                            if let Some(g) = reopen(&mut run, &spec, now) {
                                prop_assert_eq!(policy::steps_applied(&g), 0);
                                prop_assert!(!applied.contains_key(&g.requested_at_ms));
                            }
                        }
                    }
                }
            }
        }
    }
}
