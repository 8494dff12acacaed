//! Value types shared by the store API.

use std::sync::Arc;

use tandem_core::config::GatePolicyDefaults;
use tandem_core::governance::GovernanceSnapshot;
use tandem_core::{AutomationV2RunRecord, AutomationV2Spec, Effects, Millis};

/// The lease epoch of a claim: the fencing token every write on behalf of a claim carries.
///
/// A newtype so an epoch cannot be confused with a timestamp or a count at a call site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseEpoch(pub i64);

impl std::fmt::Display for LeaseEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether a write is made on behalf of a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// Operator, API and sweep actions: they act on the row as it is, not on behalf of a claim.
    Unfenced,
    /// A claim holder's write: rejected with [`crate::StoreError::Fenced`] unless the row still
    /// has this epoch.
    Epoch(LeaseEpoch),
}

/// Store-wide settings that shape what a transition persists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreSettings {
    /// Gate policy defaults, needed to compute `runs.next_action_at_ms` from the awaiting gate.
    pub gates: GatePolicyDefaults,
    /// Load a [`GovernanceSnapshot`] (scoped to the automation's agents) into
    /// [`TransitionEnv::governance`]. Off by default: most transitions do not need it and it
    /// costs a query.
    pub load_governance: bool,
}

impl StoreSettings {
    pub fn new(gates: GatePolicyDefaults) -> Self {
        Self {
            gates,
            load_governance: false,
        }
    }

    /// The same settings, also loading governance for each transition.
    pub fn with_governance(self) -> Self {
        Self {
            load_governance: true,
            ..self
        }
    }
}

/// What a transition closure may read besides the run: everything comes from the same
/// transaction that holds the run's row lock.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionEnv {
    /// The database clock in ms, read after the row lock was granted. Transitions must use this,
    /// never the replica's clock.
    pub now_ms: Millis,
    /// The row's lease epoch before this transition.
    pub lease_epoch: LeaseEpoch,
    /// Last worker activity (`runs.activity_at_ms`).
    pub activity_at_ms: Millis,
    /// The live automation definition, else the run's snapshot (what the executor and the
    /// auto-resume sweeps use). Upstream's claim prefers the snapshot instead: that is
    /// `run.automation_snapshot.as_ref().or(env.automation.as_deref())`.
    pub automation: Option<Arc<AutomationV2Spec>>,
    /// True when [`Self::automation`] is the live definition.
    pub automation_is_live: bool,
    /// Spend pauses and approved, unexpired quota overrides of the automation's agents, when
    /// [`StoreSettings::load_governance`] is set.
    pub governance: Option<Arc<GovernanceSnapshot>>,
}

/// A run as stored, with the columns the record does not carry.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRun {
    pub run: AutomationV2RunRecord,
    pub lease_epoch: LeaseEpoch,
    pub activity_at_ms: Millis,
    pub next_action_at_ms: Option<Millis>,
}

/// The result of a transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied<T> {
    pub outcome: T,
    /// False: the closure changed nothing and nothing was written.
    pub changed: bool,
    /// The run as persisted (unchanged runs: as loaded).
    pub run: AutomationV2RunRecord,
    /// The row's lease epoch after the transition (changes when the run enters or leaves a
    /// claimed status, see [`crate::transition_run`]).
    pub lease_epoch: LeaseEpoch,
    /// The database clock the closure saw.
    pub now_ms: Millis,
    /// Outbox rows written, so the writer can relay them right after commit.
    pub outbox_ids: Vec<i64>,
    /// The effects persisted (empty for an unchanged run). `cancel_tasks_of` is not persisted:
    /// the writer sends those cancel hints after commit.
    pub effects: Effects,
}
