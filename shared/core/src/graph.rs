//! The flow graph (spec §1.12, §4.1): dependencies, runnable nodes, descendants, approval nodes,
//! attempt limits.

use crate::model::{AutomationFlowNode, AutomationRunCheckpoint, AutomationV2Spec};
use std::collections::{BTreeSet, VecDeque};

/// Upstream's `automation_node_max_attempts`: `retry_policy.max_attempts` clamped to 1..=10;
/// otherwise 5 for nodes that declare required tools or the research-brief validator, else 3.
pub fn node_max_attempts(node: &AutomationFlowNode) -> u32 {
    if let Some(n) = node
        .retry_policy
        .as_ref()
        .and_then(|p| p.get("max_attempts"))
        .and_then(serde_json::Value::as_u64)
    {
        return n.clamp(1, 10) as u32;
    }
    let validator = node
        .metadata_at("/builder/output_contract/validator")
        .or_else(|| {
            node.extra
                .get("output_contract")
                .and_then(|c| c.get("validator"))
        })
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    let has_required_tools = ["/required_tools", "/builder/required_tools"]
        .iter()
        .filter_map(|p| node.metadata_at(p))
        .chain(node.extra.get("required_tools"))
        .any(|v| v.as_array().is_some_and(|a| !a.is_empty()));
    if validator == "research_brief" || has_required_tools {
        5
    } else {
        3
    }
}

/// Every node reachable from `roots` through reverse `depends_on` edges, roots excluded.
pub fn descendants(spec: &AutomationV2Spec, roots: &[String]) -> BTreeSet<String> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut queue: VecDeque<&str> = roots.iter().map(String::as_str).collect();
    while let Some(current) = queue.pop_front() {
        for node in &spec.flow.nodes {
            if node.depends_on.iter().any(|d| d == current) && seen.insert(node.node_id.clone()) {
                queue.push_back(&node.node_id);
            }
        }
    }
    for r in roots {
        seen.remove(r);
    }
    seen
}

/// `roots` plus all their transitive descendants.
pub fn subtree(spec: &AutomationV2Spec, roots: &[String]) -> BTreeSet<String> {
    let mut set = descendants(spec, roots);
    set.extend(roots.iter().cloned());
    set
}

/// Nodes that can run now: pending, not completed, not blocked, every dependency completed.
/// In flow order.
pub fn runnable_nodes<'a>(
    spec: &'a AutomationV2Spec,
    checkpoint: &AutomationRunCheckpoint,
) -> Vec<&'a AutomationFlowNode> {
    spec.flow
        .nodes
        .iter()
        .filter(|n| {
            checkpoint.is_pending(&n.node_id)
                && !checkpoint.is_completed(&n.node_id)
                && !checkpoint.is_blocked(&n.node_id)
                && n.depends_on.iter().all(|d| checkpoint.is_completed(d))
        })
        .collect()
}

/// Spec §4.1: when the runnable set holds no task node but at least one approval node, the first
/// runnable approval node becomes the gate.
pub fn gate_candidate<'a>(
    spec: &'a AutomationV2Spec,
    checkpoint: &AutomationRunCheckpoint,
) -> Option<&'a AutomationFlowNode> {
    let runnable = runnable_nodes(spec, checkpoint);
    if runnable.iter().any(|n| !n.is_approval()) {
        return None;
    }
    runnable.into_iter().find(|n| n.is_approval())
}

/// Problems that make a flow unrunnable, with the JSON path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowError {
    pub path: String,
    pub message: String,
}

/// Validates the flow: unique non-empty node ids, known `depends_on` targets, no cycles, approval
/// nodes carry a gate config.
pub fn validate_flow(spec: &AutomationV2Spec) -> Result<(), FlowError> {
    let nodes = &spec.flow.nodes;
    let mut ids = BTreeSet::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.node_id.trim().is_empty() {
            return Err(FlowError {
                path: format!("flow.nodes[{i}].node_id"),
                message: "node_id must not be empty".into(),
            });
        }
        if !ids.insert(n.node_id.as_str()) {
            return Err(FlowError {
                path: format!("flow.nodes[{i}].node_id"),
                message: format!("duplicate node_id `{}`", n.node_id),
            });
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        for (j, d) in n.depends_on.iter().enumerate() {
            if !ids.contains(d.as_str()) {
                return Err(FlowError {
                    path: format!("flow.nodes[{i}].depends_on[{j}]"),
                    message: format!("unknown node `{d}`"),
                });
            }
        }
        if n.stage_kind == Some(crate::model::StageKind::Approval) && n.gate.is_none() {
            return Err(FlowError {
                path: format!("flow.nodes[{i}].gate"),
                message: "approval node missing gate config".into(),
            });
        }
    }
    // Kahn's algorithm: whatever is left over sits on a cycle.
    let mut remaining: Vec<&AutomationFlowNode> = nodes.iter().collect();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    loop {
        let before = remaining.len();
        remaining.retain(|n| {
            if n.depends_on.iter().all(|d| done.contains(d.as_str())) {
                done.insert(n.node_id.as_str());
                false
            } else {
                true
            }
        });
        if remaining.is_empty() {
            return Ok(());
        }
        if remaining.len() == before {
            let i = nodes
                .iter()
                .position(|n| n.node_id == remaining[0].node_id)
                .unwrap_or(0);
            return Err(FlowError {
                path: format!("flow.nodes[{i}].depends_on"),
                message: format!("dependency cycle through `{}`", remaining[0].node_id),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AutomationFlowNode as N;

    fn diamond() -> AutomationV2Spec {
        AutomationV2Spec::new(
            "a",
            vec![
                N::task("a", &[]),
                N::task("b", &["a"]),
                N::task("c", &["a"]),
                N::approval("gate", &["b", "c"], &["b"]),
                N::task("send", &["gate"]),
            ],
        )
    }

    #[test]
    fn descendants_are_transitive_and_exclude_roots() {
        let spec = diamond();
        let d = descendants(&spec, &["b".into()]);
        assert_eq!(d.into_iter().collect::<Vec<_>>(), vec!["gate", "send"]);
        let d = descendants(&spec, &["a".into()]);
        assert_eq!(d.len(), 4);
    }

    #[test]
    fn runnable_respects_dependencies_and_gate_waits_for_task_work() {
        let spec = diamond();
        let mut cp = AutomationRunCheckpoint {
            pending_nodes: spec.flow.nodes.iter().map(|n| n.node_id.clone()).collect(),
            ..Default::default()
        };
        let ids = |v: Vec<&N>| v.into_iter().map(|n| n.node_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(runnable_nodes(&spec, &cp)), vec!["a"]);
        cp.completed_nodes = vec!["a".into(), "b".into()];
        cp.pending_nodes.retain(|n| n != "a" && n != "b");
        assert_eq!(ids(runnable_nodes(&spec, &cp)), vec!["c"]);
        assert!(gate_candidate(&spec, &cp).is_none());
        cp.completed_nodes.push("c".into());
        cp.pending_nodes.retain(|n| n != "c");
        assert_eq!(
            gate_candidate(&spec, &cp).map(|n| n.node_id.as_str()),
            Some("gate")
        );
    }

    #[test]
    fn max_attempts_clamps_retry_policy_and_defaults_to_three() {
        let mut n = N::task("x", &[]);
        assert_eq!(node_max_attempts(&n), 3);
        n.retry_policy = Some(serde_json::json!({"max_attempts": 50}));
        assert_eq!(node_max_attempts(&n), 10);
        n.retry_policy = Some(serde_json::json!({"max_attempts": 0}));
        assert_eq!(node_max_attempts(&n), 1);
        n.retry_policy = None;
        n.metadata = Some(serde_json::json!({"required_tools": ["web"]}));
        assert_eq!(node_max_attempts(&n), 5);
    }

    #[test]
    fn approval_detection_uses_stage_kind_or_required_gate() {
        let mut n = N::task("x", &[]);
        assert!(!n.is_approval());
        n.gate = Some(Default::default());
        assert!(!n.is_approval());
        if let Some(g) = n.gate.as_mut() {
            g.required = true;
        }
        assert!(n.is_approval());
    }

    #[test]
    fn validation_reports_path_of_offending_field() {
        let ok = diamond();
        assert!(validate_flow(&ok).is_ok());
        let dup = AutomationV2Spec::new("d", vec![N::task("a", &[]), N::task("a", &[])]);
        assert_eq!(
            validate_flow(&dup).expect_err("invalid flow").path,
            "flow.nodes[1].node_id"
        );
        let unknown = AutomationV2Spec::new("u", vec![N::task("a", &["zz"])]);
        assert_eq!(
            validate_flow(&unknown).expect_err("invalid flow").path,
            "flow.nodes[0].depends_on[0]"
        );
        let cyc = AutomationV2Spec::new("c", vec![N::task("a", &["b"]), N::task("b", &["a"])]);
        assert!(
            validate_flow(&cyc)
                .expect_err("invalid flow")
                .message
                .contains("cycle")
        );
        let mut gateless = N::task("g", &[]);
        gateless.stage_kind = Some(crate::model::StageKind::Approval);
        let spec = AutomationV2Spec::new("g", vec![gateless]);
        assert_eq!(
            validate_flow(&spec).expect_err("invalid flow").message,
            "approval node missing gate config"
        );
    }
}
