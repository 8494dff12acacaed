//! The worker protocol (DESIGN §3.3): what the scheduler dispatches to workers and what workers
//! report back. Plain serde types so a worker can be written in any language; the wire format is
//! documented in docs/worker-protocol.md.

use crate::model::{Millis, TenantContext};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The queue a node's tasks go to: `node.metadata.worker.queue`, else this.
pub const DEFAULT_TASK_QUEUE: &str = "default";

/// One node attempt dispatched to a worker (`tandem.tasks.<queue>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMessage {
    pub run_id: String,
    pub node_id: String,
    /// 1-based attempt number of this node in this run.
    pub attempt: u32,
    /// The run's lease epoch at dispatch; results carrying another epoch are dropped.
    pub lease_epoch: i64,
    pub automation_id: String,
    pub tenant_context: TenantContext,
    pub queue: String,
    #[serde(default)]
    pub agent_id: String,
    #[serde(default)]
    pub objective: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Outputs of the node's `depends_on` nodes, by node id.
    #[serde(default)]
    pub upstream_outputs: BTreeMap<String, Value>,
    /// The previous `needs_repair` output when this attempt is a repair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair_context: Option<Value>,
    /// Dispatch time plus the node's `timeout_ms`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at_ms: Option<Millis>,
    pub dispatched_at_ms: Millis,
}

impl TaskMessage {
    /// Stable id of this dispatch: JetStream `Nats-Msg-Id` and the idempotency key of a worker.
    pub fn task_id(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.run_id, self.node_id, self.attempt, self.lease_epoch
        )
    }
}

/// Outcome a worker reports for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Completed,
    NeedsRepair,
    Failed,
    Blocked,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::NeedsRepair => "needs_repair",
            Self::Failed => "failed",
            Self::Blocked => "blocked",
        }
    }
}

/// Token and cost usage of one attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub cost_usd: f64,
}

/// The one result of an attempt (`tandem.results.<run_id>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub run_id: String,
    pub node_id: String,
    pub attempt: u32,
    pub lease_epoch: i64,
    pub status: TaskStatus,
    #[serde(default)]
    pub output: Value,
    #[serde(default)]
    pub usage: TaskUsage,
}

impl TaskResult {
    /// The result of `task`'s attempt (same run, node, attempt and lease epoch).
    pub fn for_task(
        task: &TaskMessage,
        status: TaskStatus,
        output: Value,
        usage: TaskUsage,
    ) -> Self {
        Self {
            run_id: task.run_id.clone(),
            node_id: task.node_id.clone(),
            attempt: task.attempt,
            lease_epoch: task.lease_epoch,
            status,
            output,
            usage,
        }
    }

    /// The id of the attempt this result answers: equal to [`TaskMessage::task_id`] of the task,
    /// and the result's `Nats-Msg-Id`.
    pub fn task_id(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.run_id, self.node_id, self.attempt, self.lease_epoch
        )
    }
}

/// A heartbeat from a worker while it works (`tandem.progress.<run_id>`, core NATS): keeps the
/// run's activity time fresh. Best effort; losing one is harmless.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskProgress {
    pub run_id: String,
    pub node_id: String,
    pub attempt: u32,
    pub lease_epoch: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl TaskProgress {
    /// A heartbeat for `task`'s attempt.
    pub fn for_task(task: &TaskMessage, message: Option<String>) -> Self {
        Self {
            run_id: task.run_id.clone(),
            node_id: task.node_id.clone(),
            attempt: task.attempt,
            lease_epoch: task.lease_epoch,
            message,
        }
    }
}

/// The optional JSON body of a cancel hint (`tandem.control.cancel.<run_id>`, core NATS). The
/// subject names the run; an empty or unparsable body cancels every in-flight task of the run.
/// With `lease_epoch`, only tasks dispatched under that epoch or an earlier one are cancelled, so
/// a late hint cannot stop the tasks of a later claim of the same run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCancel {
    pub run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_epoch: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn result_wire_shape_is_snake_case_and_usage_defaults() {
        let r: TaskResult = serde_json::from_value(json!({
            "run_id": "r", "node_id": "n", "attempt": 1, "lease_epoch": 3,
            "status": "needs_repair", "output": {"summary": "x"}
        }))
        .expect("parses");
        assert_eq!(r.status, TaskStatus::NeedsRepair);
        assert_eq!(r.usage, TaskUsage::default());
        let bad = json!({"run_id": "r", "node_id": "n", "attempt": 1, "lease_epoch": 3, "status": "done"});
        assert!(serde_json::from_value::<TaskResult>(bad).is_err());
    }

    #[test]
    fn result_and_progress_for_a_task_share_its_id() {
        let task: TaskMessage = serde_json::from_value(json!({
            "run_id": "r", "node_id": "n", "attempt": 2, "lease_epoch": 5, "automation_id": "a",
            "tenant_context": {"org_id": "o", "workspace_id": "w"}, "queue": "default",
            "dispatched_at_ms": 1
        }))
        .expect("parses");
        let r = TaskResult::for_task(&task, TaskStatus::Failed, json!({}), TaskUsage::default());
        assert_eq!(r.task_id(), task.task_id());
        assert_eq!(r.task_id(), "r:n:2:5");
        let p = TaskProgress::for_task(&task, Some("half way".into()));
        assert_eq!((p.attempt, p.lease_epoch), (2, 5));
        let c: TaskCancel = serde_json::from_value(json!({"run_id": "r"})).expect("parses");
        assert_eq!(c.lease_epoch, None);
    }
}
