//! Approval-gate fixtures shared by the gate-notifier tests and the benchmark.

use anyhow::Context as _;
use serde_json::json;
use tandem_core::gate::build_pending_gate;
use tandem_core::{
    AutomationFlowNode, AutomationGateExpiryPolicy, AutomationRunStatus, AutomationV2RunRecord,
    AutomationV2Spec, ExecutionProfile, Millis, TenantContext,
};

/// The approval node of [`spec`].
pub const GATE: &str = "approval";

/// draft → approval (rework target draft) → send.
pub fn spec() -> AutomationV2Spec {
    AutomationV2Spec::new(
        "auto-gates",
        vec![
            AutomationFlowNode::task("draft", &[]),
            AutomationFlowNode::approval(GATE, &["draft"], &["draft"]),
            AutomationFlowNode::task("send", &[GATE]),
        ],
    )
}

/// A run as the scheduler leaves it when the gate opens at `requested_at_ms`: draft completed,
/// send blocked, the gate built from the node with `policy`.
pub fn awaiting_run(
    run_id: &str,
    requested_at_ms: Millis,
    policy: Option<AutomationGateExpiryPolicy>,
) -> anyhow::Result<AutomationV2RunRecord> {
    const SEC: u64 = 1_000;
    let spec = spec();
    let mut run = AutomationV2RunRecord::new_queued(
        run_id.into(),
        &spec,
        "manual",
        ExecutionProfile::Strict,
        requested_at_ms.saturating_sub(SEC),
    );
    run.tenant_context = TenantContext::explicit("org-1", "ws.one");
    run.status = AutomationRunStatus::AwaitingApproval;
    run.started_at_ms = Some(requested_at_ms.saturating_sub(SEC));
    run.updated_at_ms = requested_at_ms;
    run.checkpoint.pending_nodes.retain(|n| n != "draft");
    run.checkpoint.completed_nodes.push("draft".into());
    run.checkpoint.node_outputs.insert(
        "draft".into(),
        json!({"status": "completed", "node_id": "draft"}),
    );
    run.checkpoint.node_attempts.insert("draft".into(), 1);
    run.checkpoint.blocked_nodes = vec!["send".into()];
    let node = spec.node(GATE).context("gate node")?;
    let mut gate = build_pending_gate(node, requested_at_ms).context("gate config")?;
    gate.expiry_policy = policy;
    run.checkpoint.awaiting_gate = Some(gate);
    run.detail = Some(format!("awaiting approval for gate `{GATE}`"));
    Ok(run)
}
