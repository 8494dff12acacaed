//! The scheduler's calls into the core's execution transitions, on a row the store locked.
//!
//! Both execute the run's snapshot when it has one, else the live definition
//! (`tandem_core::claim::claim_automation`): `pending_nodes` was built from the snapshot.

use std::sync::Arc;
use tandem_core::config::GatePolicyDefaults;
use tandem_core::execution::{
    DispatchOutcome, ResultOutcome, apply_task_result, dispatch_ready_nodes,
};
use tandem_core::protocol::TaskResult;

use tandem_core::{AutomationV2RunRecord, AutomationV2Spec, Transition};
use tandem_store::TransitionEnv;

/// The definition [`tandem_core::claim::claim_automation`] picks (the snapshot, else the live one), shared rather
/// than copied, since the transition borrows the run mutably.
fn definition(run: &AutomationV2RunRecord, env: &TransitionEnv) -> Option<Arc<AutomationV2Spec>> {
    run.automation_snapshot
        .clone()
        .or_else(|| env.automation.clone())
}

/// What the dispatch after a claim did (`None`: the run has no definition to execute).
pub(crate) type Dispatched = Option<DispatchOutcome>;

/// `dispatch_ready_nodes` on a run that just became running; `env.lease_epoch` is the new claim's
/// epoch.
pub(crate) fn dispatch(
    run: &mut AutomationV2RunRecord,
    env: &TransitionEnv,
    defaults: &GatePolicyDefaults,
) -> Transition<Dispatched> {
    let Some(automation) = definition(run, env) else {
        tracing::warn!(run_id = %run.run_id, automation_id = %run.automation_id,
            "claimed run has neither a snapshot nor a stored definition; nothing to dispatch");
        return Transition::unchanged(None);
    };
    let t = dispatch_ready_nodes(run, &automation, env.lease_epoch.0, defaults, env.now_ms);
    Transition {
        outcome: Some(t.outcome),
        changed: t.changed,
        effects: t.effects,
    }
}

/// Whether a result was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultDisposition {
    Applied,
    /// Not applied; the reason is the metric label (`stale_epoch`, `stale_attempt`, ...).
    Dropped(String),
}

/// `apply_task_result`, fenced by the row's lease epoch.
pub(crate) fn apply_result(
    run: &mut AutomationV2RunRecord,
    env: &TransitionEnv,
    result: &TaskResult,
    defaults: &GatePolicyDefaults,
) -> Transition<ResultDisposition> {
    let Some(automation) = definition(run, env) else {
        return Transition::unchanged(ResultDisposition::Dropped("no_automation".into()));
    };
    let t = apply_task_result(
        run,
        &automation,
        result,
        env.lease_epoch.0,
        defaults,
        env.now_ms,
    );
    let outcome = match t.outcome {
        ResultOutcome::Dropped { reason } => ResultDisposition::Dropped(reason.as_str().into()),
        ResultOutcome::Applied { .. } => ResultDisposition::Applied,
    };
    Transition {
        outcome,
        changed: t.changed,
        effects: t.effects,
    }
}
