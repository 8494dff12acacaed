//! Upstream data model (spec §1), with the exact upstream serde spelling.
//!
//! Conventions kept from upstream: `Option` fields are omitted when `None`, collections default to
//! empty, enums are snake_case. Free-form JSON stays `serde_json::Value`. Types whose upstream shape
//! is much wider than what the lifecycle reads (the automation spec, flow nodes, agents) model the
//! fields we read and keep every other field in `extra`, so a record round-trips unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};

/// Upstream timestamps: u64 milliseconds since the Unix epoch.
pub type Millis = u64;

/// Spec §1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum AutomationRunStatus {
    Queued,
    Running,
    Pausing,
    Paused,
    AwaitingApproval,
    Completed,
    Blocked,
    Failed,
    Cancelled,
}

impl AutomationRunStatus {
    pub const ALL: [AutomationRunStatus; 9] = [
        Self::Queued,
        Self::Running,
        Self::Pausing,
        Self::Paused,
        Self::AwaitingApproval,
        Self::Completed,
        Self::Blocked,
        Self::Failed,
        Self::Cancelled,
    ];

    /// `automation_run_is_terminal`.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Blocked | Self::Failed | Self::Cancelled
        )
    }

    /// `automation_status_uses_scheduler_capacity`.
    pub fn uses_scheduler_capacity(self) -> bool {
        self == Self::Running
    }

    /// `automation_status_holds_workspace_lock`.
    pub fn holds_workspace_lock(self) -> bool {
        matches!(self, Self::Running | Self::Pausing)
    }

    /// The wire spelling, also used as the Postgres column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Pausing => "pausing",
            Self::Paused => "paused",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Completed => "completed",
            Self::Blocked => "blocked",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for AutomationRunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Spec §1.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutomationStopKind {
    Cancelled,
    OperatorStopped,
    GuardrailStopped,
    Panic,
    Shutdown,
    ServerRestart,
    StaleReaped,
}

impl AutomationStopKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::OperatorStopped => "operator_stopped",
            Self::GuardrailStopped => "guardrail_stopped",
            Self::Panic => "panic",
            Self::Shutdown => "shutdown",
            Self::ServerRestart => "server_restart",
            Self::StaleReaped => "stale_reaped",
        }
    }
}

/// Spec §1.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutomationGateExpiryAction {
    Cancel,
    Escalate,
    Remind,
}

impl AutomationGateExpiryAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Escalate => "escalate",
            Self::Remind => "remind",
        }
    }

    /// Trimmed, case-insensitive, as upstream reads `TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY`.
    pub fn parse_lenient(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cancel" => Some(Self::Cancel),
            "escalate" => Some(Self::Escalate),
            "remind" => Some(Self::Remind),
            _ => None,
        }
    }
}

/// `TenantSource` of spec §1.4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantSource {
    #[default]
    LocalImplicit,
    Explicit,
}

impl TenantSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LocalImplicit => "local_implicit",
            Self::Explicit => "explicit",
        }
    }
}

/// Spec §1.4.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TenantContext {
    pub org_id: String,
    pub workspace_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    #[serde(default)]
    pub source: TenantSource,
}

impl Default for TenantContext {
    fn default() -> Self {
        Self::local_implicit()
    }
}

impl TenantContext {
    pub fn local_implicit() -> Self {
        Self {
            org_id: "local".into(),
            workspace_id: "local".into(),
            deployment_id: None,
            actor_id: None,
            source: TenantSource::LocalImplicit,
        }
    }

    pub fn explicit(org_id: &str, workspace_id: &str) -> Self {
        Self {
            org_id: org_id.into(),
            workspace_id: workspace_id.into(),
            deployment_id: None,
            actor_id: None,
            source: TenantSource::Explicit,
        }
    }

    pub fn is_local_implicit(&self) -> bool {
        self.org_id == "local"
            && self.workspace_id == "local"
            && self.deployment_id.is_none()
            && self.actor_id.is_none()
            && self.source == TenantSource::LocalImplicit
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// `ExecutionProfile` (`strict` | `guided` | `yolo`); the run record defaults to `strict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionProfile {
    #[default]
    Strict,
    Guided,
    Yolo,
}

impl ExecutionProfile {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Guided => "guided",
            Self::Yolo => "yolo",
        }
    }
}

/// `AutomationFailureRecord`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutomationFailureRecord {
    pub node_id: String,
    pub reason: String,
    pub failed_at_ms: Millis,
}

/// `GovernanceActorRef`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GovernanceActorRef {
    pub kind: ActorKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl GovernanceActorRef {
    pub fn human(actor_id: &str) -> Self {
        Self {
            kind: ActorKind::Human,
            actor_id: Some(actor_id.into()),
            source: None,
        }
    }

    /// The system actor the expiry sweep decides with.
    pub fn gate_expiry() -> Self {
        Self {
            kind: ActorKind::System,
            actor_id: None,
            source: Some("automation_gate_expiry".into()),
        }
    }
}

/// Principal kinds of `GovernanceActorRef`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    Human,
    Agent,
    System,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Human => "human",
            Self::Agent => "agent",
            Self::System => "system",
        }
    }
}

/// Spec §1.10, stored shape. Every field optional and omitted when `None`.
///
/// `steps` is a Tandem Fleet extension (an escalation ladder, see `policy.rs` and
/// docs/compatibility.md): absent in upstream records, so they round-trip byte for byte. When
/// it holds at least one step, the ladder replaces `expires_after_ms`, `on_expiry` and
/// `remind_every_ms`; `escalate_to` stays the default principal of its escalate steps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutomationGateExpiryPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_expiry: Option<AutomationGateExpiryAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remind_every_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<AutomationGateEscalationStep>>,
}

/// One step of an escalation ladder (Tandem Fleet extension):
/// `{"after_ms": u64, "action": "remind"|"escalate"|"cancel", "escalate_to"?: String}`.
///
/// `after_ms` counts from the gate's `requested_at_ms`. `escalate_to` is read by escalate steps
/// only (falling back to the policy's `escalate_to`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutomationGateEscalationStep {
    pub after_ms: u64,
    pub action: AutomationGateStepAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_to: Option<String>,
}

/// The `action` of a ladder step. Any string deserializes, so that an unknown action reaches
/// validation (`policy::validate_expiry_policy`, a 400 naming the field's path) instead of failing
/// the whole document without one; it serializes back unchanged. At run time a step with an
/// unknown action is inert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutomationGateStepAction {
    Known(AutomationGateExpiryAction),
    Unknown(String),
}

impl AutomationGateStepAction {
    /// Exact spelling (`cancel`, `escalate`, `remind`), as serde reads the upstream enum.
    pub fn parse(raw: &str) -> Self {
        match raw {
            "cancel" => Self::Known(AutomationGateExpiryAction::Cancel),
            "escalate" => Self::Known(AutomationGateExpiryAction::Escalate),
            "remind" => Self::Known(AutomationGateExpiryAction::Remind),
            other => Self::Unknown(other.to_owned()),
        }
    }

    pub fn known(&self) -> Option<AutomationGateExpiryAction> {
        match self {
            Self::Known(a) => Some(*a),
            Self::Unknown(_) => None,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Known(a) => a.as_str(),
            Self::Unknown(s) => s,
        }
    }
}

impl From<AutomationGateExpiryAction> for AutomationGateStepAction {
    fn from(a: AutomationGateExpiryAction) -> Self {
        Self::Known(a)
    }
}

impl Serialize for AutomationGateStepAction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AutomationGateStepAction {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Ok(Self::parse(&raw))
    }
}

/// Spec §1.7.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutomationPendingGate {
    pub node_id: String,
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    #[serde(default)]
    pub decisions: Vec<String>,
    #[serde(default)]
    pub rework_targets: Vec<String>,
    pub requested_at_ms: Millis,
    #[serde(default)]
    pub upstream_node_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_policy: Option<AutomationGateExpiryPolicy>,
}

impl AutomationPendingGate {
    /// `metadata.gate_policy_state`, when present and an object.
    pub fn policy_state(&self) -> Option<&Map<String, Value>> {
        self.metadata
            .as_ref()?
            .get("gate_policy_state")?
            .as_object()
    }

    pub fn policy_state_u64(&self, key: &str) -> Option<u64> {
        self.policy_state()?.get(key)?.as_u64()
    }

    pub fn policy_state_str(&self, key: &str) -> Option<&str> {
        self.policy_state()?.get(key)?.as_str()
    }

    /// Top-level `metadata.stale == true` (spec §3.11).
    pub fn is_marked_stale(&self) -> bool {
        self.metadata
            .as_ref()
            .and_then(|m| m.get("stale"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// Spec §1.8.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutomationGateDecisionRecord {
    pub node_id: String,
    pub decision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub decided_at_ms: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<GovernanceActorRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// Spec §1.9.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutomationLifecycleRecord {
    pub event: String,
    pub recorded_at_ms: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_kind: Option<AutomationStopKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// Spec §1.6.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AutomationRunCheckpoint {
    #[serde(default)]
    pub completed_nodes: Vec<String>,
    #[serde(default)]
    pub pending_nodes: Vec<String>,
    #[serde(default)]
    pub node_outputs: HashMap<String, Value>,
    #[serde(default)]
    pub node_attempts: HashMap<String, u32>,
    #[serde(default)]
    pub node_attempt_verdicts: HashMap<String, Vec<Value>>,
    #[serde(default)]
    pub blocked_nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting_gate: Option<AutomationPendingGate>,
    #[serde(default)]
    pub gate_history: Vec<AutomationGateDecisionRecord>,
    #[serde(default)]
    pub lifecycle_history: Vec<AutomationLifecycleRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<AutomationFailureRecord>,
}

impl AutomationRunCheckpoint {
    pub fn is_completed(&self, node_id: &str) -> bool {
        self.completed_nodes.iter().any(|n| n == node_id)
    }

    pub fn is_pending(&self, node_id: &str) -> bool {
        self.pending_nodes.iter().any(|n| n == node_id)
    }

    pub fn is_blocked(&self, node_id: &str) -> bool {
        self.blocked_nodes.iter().any(|n| n == node_id)
    }

    pub fn attempts(&self, node_id: &str) -> u32 {
        self.node_attempts.get(node_id).copied().unwrap_or(0)
    }

    /// `status` of a node output, lower-cased.
    pub fn output_status(&self, node_id: &str) -> Option<String> {
        self.node_outputs
            .get(node_id)?
            .get("status")?
            .as_str()
            .map(str::to_ascii_lowercase)
    }
}

/// Spec §1.11.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueReason {
    Capacity,
    WorkspaceLock,
    RateLimit,
}

/// Spec §1.11. `queue_reason` is serialized even when null.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerMetadata {
    #[serde(default)]
    pub tenant_context: TenantContext,
    #[serde(default)]
    pub queue_reason: Option<QueueReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limited_provider: Option<String>,
    #[serde(default)]
    pub queued_at_ms: Millis,
}

/// Spec §1.5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutomationV2RunRecord {
    pub run_id: String,
    pub automation_id: String,
    #[serde(default)]
    pub tenant_context: TenantContext,
    pub trigger_type: String,
    pub status: AutomationRunStatus,
    pub created_at_ms: Millis,
    pub updated_at_ms: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<Millis>,
    #[serde(default)]
    pub active_session_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_session_id: Option<String>,
    #[serde(default)]
    pub active_instance_ids: Vec<String>,
    pub checkpoint: AutomationRunCheckpoint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_context: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Shared, not copied, between the record, its transition environment and the writes made
    /// from it: a spec is the largest part of a run and transitions never change it.
    pub automation_snapshot: Option<std::sync::Arc<AutomationV2Spec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_kind: Option<AutomationStopKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    #[serde(default)]
    pub estimated_cost_usd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_handoff_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_summary: Option<Value>,
    #[serde(default)]
    pub effective_execution_profile: ExecutionProfile,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_execution_profile: Option<ExecutionProfile>,
}

impl AutomationV2RunRecord {
    /// A new queued run for `automation` (`create_automation_v2_run`): every flow node pending,
    /// the spec snapshotted with its effective profile, the tenant copied from the spec.
    pub fn new_queued(
        run_id: String,
        automation: &AutomationV2Spec,
        trigger_type: &str,
        profile: ExecutionProfile,
        now: Millis,
    ) -> Self {
        let mut snapshot = automation.clone();
        snapshot
            .execution
            .get_or_insert_with(Default::default)
            .profile = Some(profile);
        Self {
            run_id,
            automation_id: automation.automation_id.clone(),
            tenant_context: automation.tenant_context(),
            trigger_type: trigger_type.into(),
            status: AutomationRunStatus::Queued,
            created_at_ms: now,
            updated_at_ms: now,
            started_at_ms: None,
            finished_at_ms: None,
            active_session_ids: Vec::new(),
            latest_session_id: None,
            active_instance_ids: Vec::new(),
            checkpoint: AutomationRunCheckpoint {
                pending_nodes: automation
                    .flow
                    .nodes
                    .iter()
                    .map(|n| n.node_id.clone())
                    .collect(),
                ..Default::default()
            },
            runtime_context: None,
            automation_snapshot: Some(std::sync::Arc::new(snapshot)),
            pause_reason: None,
            resume_reason: None,
            detail: None,
            stop_kind: None,
            stop_reason: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            estimated_cost_usd: 0.0,
            scheduler: None,
            trigger_reason: None,
            consumed_handoff_id: None,
            learning_summary: None,
            effective_execution_profile: profile,
            requested_execution_profile: None,
        }
    }

    /// Workspace root for locking (spec §2.1): the trimmed snapshot root. Empty means no lock.
    pub fn workspace_root(&self) -> Option<String> {
        self.automation_snapshot
            .as_ref()
            .and_then(|s| s.workspace_root.as_deref())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }

    /// Clears the execution handles (sessions, instances).
    pub fn clear_execution_handles(&mut self) {
        self.active_session_ids.clear();
        self.latest_session_id = None;
        self.active_instance_ids.clear();
    }
}

/// `AutomationV2Spec.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutomationStatus {
    #[default]
    Active,
    Paused,
    Draft,
}

/// `AutomationV2Spec.execution`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AutomationExecutionPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ExecutionProfile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel_agents: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_runtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_tool_calls: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_cost_usd: Option<f64>,
}

/// `AutomationAgentProfile`: only `agent_id` is read here; the rest round-trips in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutomationAgentProfile {
    pub agent_id: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// `AutomationApprovalGate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AutomationApprovalGate {
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub decisions: Vec<String>,
    #[serde(default)]
    pub rework_targets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_policy: Option<AutomationGateExpiryPolicy>,
}

/// `stage_kind` of a flow node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Orchestrator,
    Workstream,
    Review,
    Test,
    Approval,
}

/// `AutomationFlowNode`: the fields this subsystem reads; the rest round-trips in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutomationFlowNode {
    pub node_id: String,
    #[serde(default)]
    pub agent_id: String,
    #[serde(default)]
    pub objective: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_kind: Option<StageKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<AutomationApprovalGate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl AutomationFlowNode {
    /// A plain task node (used by tests and demos).
    pub fn task(node_id: &str, depends_on: &[&str]) -> Self {
        Self {
            node_id: node_id.into(),
            agent_id: "agent".into(),
            objective: format!("do {node_id}"),
            depends_on: depends_on.iter().map(|s| (*s).to_owned()).collect(),
            retry_policy: None,
            timeout_ms: None,
            stage_kind: None,
            gate: None,
            metadata: None,
            extra: BTreeMap::new(),
        }
    }

    /// An approval node with a gate config (used by tests and demos).
    pub fn approval(node_id: &str, depends_on: &[&str], rework_targets: &[&str]) -> Self {
        Self {
            stage_kind: Some(StageKind::Approval),
            gate: Some(AutomationApprovalGate {
                required: true,
                decisions: vec!["approve".into(), "rework".into(), "cancel".into()],
                rework_targets: rework_targets.iter().map(|s| (*s).to_owned()).collect(),
                instructions: None,
                expiry_policy: None,
            }),
            ..Self::task(node_id, depends_on)
        }
    }

    /// Spec §1.12: `stage_kind == approval` or `gate.required`.
    pub fn is_approval(&self) -> bool {
        self.stage_kind == Some(StageKind::Approval)
            || self.gate.as_ref().is_some_and(|g| g.required)
    }

    /// A JSON pointer into `metadata`.
    pub fn metadata_at(&self, pointer: &str) -> Option<&Value> {
        self.metadata.as_ref()?.pointer(pointer)
    }
}

/// `flow` of a spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AutomationFlow {
    #[serde(default)]
    pub nodes: Vec<AutomationFlowNode>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// `AutomationV2Spec` (spec §1.12): the fields the lifecycle reads; every other upstream field
/// (schedule, knowledge, output targets, watch conditions, ...) round-trips in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutomationV2Spec {
    pub automation_id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub status: AutomationStatus,
    #[serde(default)]
    pub agents: Vec<AutomationAgentProfile>,
    #[serde(default)]
    pub flow: AutomationFlow,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution: Option<AutomationExecutionPolicy>,
    #[serde(default)]
    pub created_at_ms: Millis,
    #[serde(default)]
    pub updated_at_ms: Millis,
    #[serde(default)]
    pub creator_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_root: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl AutomationV2Spec {
    /// A minimal active spec (used by tests and demos).
    pub fn new(automation_id: &str, nodes: Vec<AutomationFlowNode>) -> Self {
        Self {
            automation_id: automation_id.into(),
            name: automation_id.into(),
            description: None,
            status: AutomationStatus::Active,
            agents: Vec::new(),
            flow: AutomationFlow {
                nodes,
                extra: BTreeMap::new(),
            },
            execution: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            creator_id: "creator".into(),
            workspace_root: None,
            metadata: None,
            extra: BTreeMap::new(),
        }
    }

    /// `metadata.tenant_context`, falling back to local-implicit.
    pub fn tenant_context(&self) -> TenantContext {
        self.metadata
            .as_ref()
            .and_then(|m| m.get("tenant_context"))
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default()
    }

    /// Spec §1.12 `requires_runtime_context()`.
    pub fn requires_runtime_context(&self) -> bool {
        let Some(meta) = self.metadata.as_ref() else {
            return false;
        };
        let present = |k: &str| meta.get(k).is_some_and(|v| !v.is_null());
        present("context_materialization")
            || present("approved_plan_materialization")
            || ["shared_context_pack_ids", "shared_context_packs"]
                .iter()
                .any(|k| {
                    meta.get(*k)
                        .and_then(Value::as_array)
                        .is_some_and(|a| !a.is_empty())
                })
    }

    pub fn node(&self, node_id: &str) -> Option<&AutomationFlowNode> {
        self.flow.nodes.iter().find(|n| n.node_id == node_id)
    }
}
