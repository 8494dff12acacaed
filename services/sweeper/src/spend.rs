//! Weekly spend caps (spec §3.5; §2.2 "governance weekly spend cap hard stop"), pure.
//!
//! * **Spend.** An agent's weekly spend in a tenant is the sum of `estimated_cost_usd` (the usage
//!   workers report with their results, accumulated on the run) over the runs updated in the last
//!   7 days (database clock) whose agent set contains the agent. The agent set and the tenant are
//!   the ones the launch hold uses: the run's snapshot, else the live definition (spec §3.5,
//!   `claim_automation`); the tenant is that definition's. Runs report usage per run, not per
//!   node, so a run's whole cost counts for every agent of its set (conservative: a cap is a
//!   guard, and this is the same set the hold checks).
//! * **Crossing.** A cap is reached when the spend is positive and at least the cap. The sweeper
//!   then records a spend pause for the agent's scope key (one per tenant deployment seen), with a
//!   reason starting with [`SPEND_PAUSE_REASON_PREFIX`], and opens a `pending` quota-override
//!   request (expiring a week later) for an operator to approve, as upstream's governance does.
//! * **Lifting.** A pause the sweeper recorded is lifted when the agent's spend is back under
//!   its cap (the window moved on, or the cap was raised or removed). Pauses recorded by anyone
//!   else are never touched.
//! * **Override.** An approved, unexpired quota override lifts the pause for that agent only: the
//!   launch hold and the guardrail auto-resume read it (`GovernanceSnapshot`).
//! * **Hard stop.** A `running` run whose launch would now be held (an agent of its set is
//!   spend-paused without its own override) is paused: `guardrail_stopped`, lifecycle
//!   `run_paused_spend_cap_exceeded`, in-flight tasks cancelled. An approved override then lets
//!   the guardrail auto-resume re-queue it (that cause is override-liftable, §7.8).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use tandem_core::claim::{LAUNCH_HELD_METADATA_REASON, agents_holding_launch, claim_automation};
use tandem_core::governance::{GovernanceSnapshot, agent_scope_key, agent_set};
use tandem_core::{
    AutomationRunStatus, AutomationStopKind, AutomationV2RunRecord, AutomationV2Spec, Millis,
    Transition, update,
};
use tandem_store::{NewQuotaOverride, QuotaOverrideStatus, SpendInputs, SpendPauseRow, SpendPlan};

/// The spend window: one week.
pub const WEEK_MS: u64 = 604_800_000;
/// Every spend pause the sweeper records has a reason starting with this; only those are ever
/// lifted by the sweeper.
pub const SPEND_PAUSE_REASON_PREFIX: &str = "weekly_spend_cap:";
/// Lifecycle event of the hard stop (spec §2.2).
pub const LIFECYCLE_RUN_PAUSED_SPEND_CAP: &str = "run_paused_spend_cap_exceeded";
/// `pause_reason`, `detail` and `stop_reason` of the hard stop (upstream's hold string, for a
/// run that was already running).
pub const SPEND_CAP_PAUSED_DETAIL: &str = "automation run paused: agent weekly spend cap reached";
/// Audit of the hard stop (fleet name; upstream records none).
pub const AUDIT_SPEND_CAP_PAUSED_RUN: &str = "automation_v2.internal_sweep.spend_cap_paused_run";
/// `sweep` of the hard-stop audit.
pub const SPEND_SWEEP: &str = "evaluate_weekly_spend_caps";

/// `(org_id, workspace_id, agent_id)`, the agent trimmed.
pub type AgentTenantKey = (String, String, String);

/// One agent's spend over the window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentSpend {
    pub spend_usd: f64,
    pub runs: usize,
    /// The governance scope keys of this agent seen on the contributing runs (one per tenant
    /// deployment).
    pub scope_keys: BTreeSet<String>,
}

/// Weekly spend per `(org, workspace, agent)`, from the runs of [`SpendInputs`].
pub fn weekly_spend(inputs: &SpendInputs) -> BTreeMap<AgentTenantKey, AgentSpend> {
    let mut out: BTreeMap<AgentTenantKey, AgentSpend> = BTreeMap::new();
    for r in &inputs.runs {
        if !(r.cost_usd.is_finite() && r.cost_usd > 0.0) {
            continue;
        }
        let Some(def) = r.automation.as_ref() else {
            continue;
        };
        let tenant = def.tenant_context();
        for agent in agent_set(def) {
            let key = (
                tenant.org_id.clone(),
                tenant.workspace_id.clone(),
                agent.trim().to_owned(),
            );
            let e = out.entry(key).or_default();
            e.spend_usd += r.cost_usd;
            e.runs += 1;
            e.scope_keys.insert(agent_scope_key(&tenant, &agent));
        }
    }
    out
}

/// A cap is reached when something was spent and the spend is at least the cap.
pub fn cap_reached(spend_usd: f64, cap_usd: f64) -> bool {
    spend_usd > 0.0 && spend_usd >= cap_usd
}

/// `(org, workspace, agent)` of a governance scope key (`tandem_core::governance::agent_scope_key`):
/// a bare key is a local-implicit tenant's agent (`local`/`local`), `tenant:[org, ws, deployment,
/// agent]` an explicit one. `None` for a key in neither form.
pub fn parse_agent_scope_key(key: &str) -> Option<AgentTenantKey> {
    match key.strip_prefix("tenant:") {
        Some(json) => {
            let parts: Vec<String> = serde_json::from_str(json).ok()?;
            match parts.as_slice() {
                [org, ws, _deployment, agent] => Some((org.clone(), ws.clone(), agent.clone())),
                _ => None,
            }
        }
        None => {
            let agent = key.trim();
            (!agent.is_empty()).then(|| ("local".to_owned(), "local".to_owned(), agent.to_owned()))
        }
    }
}

/// Decides which spend pauses to record and lift and which override requests to open (see the
/// module docs). Pure; the store applies the plan in the transaction that read the inputs.
pub fn plan_spend_caps(inputs: &SpendInputs) -> SpendPlan {
    let spend = weekly_spend(inputs);
    let caps: BTreeMap<AgentTenantKey, f64> = inputs
        .caps
        .iter()
        .map(|c| {
            (
                (
                    c.org_id.clone(),
                    c.workspace_id.clone(),
                    c.agent_id.trim().to_owned(),
                ),
                c.weekly_cap_usd,
            )
        })
        .collect();
    let paused: BTreeSet<&str> = inputs.pauses.iter().map(|p| p.agent_key.as_str()).collect();
    let mut plan = SpendPlan::default();
    for (key, cap) in &caps {
        let Some(s) = spend.get(key) else {
            continue;
        };
        if !cap_reached(s.spend_usd, *cap) {
            continue;
        }
        let reason = format!(
            "{SPEND_PAUSE_REASON_PREFIX} agent {:?} of {}/{} spent {:.4} USD in the last 7 days \
             (cap {:.4} USD)",
            key.2, key.0, key.1, s.spend_usd, cap
        );
        for scope_key in &s.scope_keys {
            if paused.contains(scope_key.as_str()) {
                continue;
            }
            plan.pause.push((scope_key.clone(), reason.clone()));
            plan.request_overrides.push(NewQuotaOverride {
                agent_key: scope_key.clone(),
                status: QuotaOverrideStatus::Pending,
                expires_at_ms: inputs.now_ms.saturating_add(WEEK_MS),
                approved_by: None,
                reason: Some(reason.clone()),
            });
        }
    }
    for p in &inputs.pauses {
        let ours = p
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with(SPEND_PAUSE_REASON_PREFIX));
        if !ours {
            continue;
        }
        let Some(key) = parse_agent_scope_key(&p.agent_key) else {
            continue;
        };
        let still_reached = match (caps.get(&key), spend.get(&key)) {
            (Some(cap), Some(s)) => cap_reached(s.spend_usd, *cap),
            _ => false,
        };
        if !still_reached {
            plan.lift.push(SpendPauseRow {
                agent_key: p.agent_key.clone(),
                reason: p.reason.clone(),
            });
        }
    }
    plan
}

/// What [`spend_cap_hard_stop`] did. Every variant but `Paused` is a no-op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HardStopOutcome {
    NotRunning(AutomationRunStatus),
    NoAutomation,
    /// No agent of the run is spend-paused without its own override.
    NotCapped,
    /// `running → paused`; these agents hold it.
    Paused {
        agent_ids: Vec<String>,
    },
}

/// The weekly spend-cap hard stop for one locked `running` row: when the claim would now hold
/// the run (the same predicate, definition and tenant as the launch hold), the run pauses with
/// stop kind `guardrail_stopped`, `pause_reason` = `detail` = `stop_reason` =
/// [`SPEND_CAP_PAUSED_DETAIL`], lifecycle `run_paused_spend_cap_exceeded` (metadata `{reason:
/// "agent_spend_paused", agent_ids}`), the audit [`AUDIT_SPEND_CAP_PAUSED_RUN`], and a cancel of
/// its in-flight tasks (the store bumps the lease epoch, so their late results are dropped; the
/// attempts are dispatched again after a resume).
pub fn spend_cap_hard_stop(
    run: &mut AutomationV2RunRecord,
    live: Option<&AutomationV2Spec>,
    governance: &GovernanceSnapshot,
    now: Millis,
) -> Transition<HardStopOutcome> {
    if run.status != AutomationRunStatus::Running {
        return Transition::unchanged(HardStopOutcome::NotRunning(run.status));
    }
    let Some(def) = claim_automation(run, live).cloned() else {
        return Transition::unchanged(HardStopOutcome::NoAutomation);
    };
    let agents = agents_holding_launch(governance, &def, now);
    if agents.is_empty() {
        return Transition::unchanged(HardStopOutcome::NotCapped);
    }
    let metadata = json!({ "reason": LAUNCH_HELD_METADATA_REASON, "agent_ids": agents });
    let mut tr = update(run, now, |row, fx| {
        row.status = AutomationRunStatus::Paused;
        row.stop_kind = Some(AutomationStopKind::GuardrailStopped);
        row.pause_reason = Some(SPEND_CAP_PAUSED_DETAIL.into());
        row.detail = Some(SPEND_CAP_PAUSED_DETAIL.into());
        row.stop_reason = Some(SPEND_CAP_PAUSED_DETAIL.into());
        fx.lifecycle(
            row,
            LIFECYCLE_RUN_PAUSED_SPEND_CAP,
            Some(SPEND_CAP_PAUSED_DETAIL.into()),
            Some(AutomationStopKind::GuardrailStopped),
            Some(metadata.clone()),
            now,
        );
        fx.cancel_tasks_of.push(row.run_id.clone());
        HardStopOutcome::Paused {
            agent_ids: agents.clone(),
        }
    });
    tr.effects.internal_sweep_audit(
        run,
        AUDIT_SPEND_CAP_PAUSED_RUN,
        SPEND_SWEEP,
        "paused",
        Some(SPEND_CAP_PAUSED_DETAIL),
        json!({ "agent_ids": agents, "previous_status": "running" }),
    );
    tr
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::governance::QuotaOverride;
    use tandem_core::sweeps::{AutoResumeOutcome, auto_resume_guardrail_stopped};
    use tandem_core::{
        AutomationAgentProfile, AutomationFlowNode, ExecutionProfile, TenantContext,
    };
    use tandem_store::{RunSpend, SpendCap};

    const NOW: Millis = 1_800_000_000_000;

    fn spec(id: &str, org: &str, agents: &[&str]) -> AutomationV2Spec {
        let mut s = AutomationV2Spec::new(id, vec![AutomationFlowNode::task("n", &[])]);
        s.creator_id = String::new();
        s.agents = agents
            .iter()
            .map(|a| AutomationAgentProfile {
                agent_id: (*a).into(),
                extra: Default::default(),
            })
            .collect();
        s.metadata = Some(json!({"tenant_context": TenantContext::explicit(org, "ws")}));
        s
    }

    fn run_spend(id: &str, def: &AutomationV2Spec, cost: f64) -> RunSpend {
        RunSpend {
            run_id: id.into(),
            tenant_context: def.tenant_context(),
            automation: Some(def.clone()),
            cost_usd: cost,
        }
    }

    fn cap(org: &str, agent: &str, usd: f64) -> SpendCap {
        SpendCap {
            org_id: org.into(),
            workspace_id: "ws".into(),
            agent_id: agent.into(),
            weekly_cap_usd: usd,
        }
    }

    fn inputs(runs: Vec<RunSpend>, caps: Vec<SpendCap>, pauses: Vec<SpendPauseRow>) -> SpendInputs {
        SpendInputs {
            now_ms: NOW,
            window_ms: WEEK_MS,
            caps,
            runs,
            unreadable_runs: 0,
            pauses,
        }
    }

    #[test]
    fn crossing_a_cap_pauses_that_agent_in_that_tenant_only_and_requests_an_override() {
        let a = spec("a", "org-a", &["writer", "reviewer"]);
        let b = spec("b", "org-b", &["writer"]);
        let i = inputs(
            vec![
                run_spend("r1", &a, 7.0),
                run_spend("r2", &a, 5.0),
                run_spend("r3", &b, 50.0),
            ],
            vec![cap("org-a", "writer", 10.0), cap("org-a", "reviewer", 20.0)],
            vec![],
        );
        let spend = weekly_spend(&i);
        let writer = &spend[&("org-a".into(), "ws".into(), "writer".into())];
        assert!((writer.spend_usd - 12.0).abs() < 1e-9);
        assert_eq!(writer.runs, 2);
        let plan = plan_spend_caps(&i);
        let key_a = agent_scope_key(&TenantContext::explicit("org-a", "ws"), "writer");
        assert_eq!(plan.pause.len(), 1, "{plan:?}");
        assert_eq!(plan.pause[0].0, key_a);
        assert!(plan.pause[0].1.starts_with(SPEND_PAUSE_REASON_PREFIX));
        assert_eq!(plan.request_overrides.len(), 1);
        assert_eq!(plan.request_overrides[0].agent_key, key_a);
        assert_eq!(plan.request_overrides[0].expires_at_ms, NOW + WEEK_MS);
        assert!(plan.lift.is_empty());
    }

    #[test]
    fn an_existing_pause_is_kept_and_lifted_only_when_back_under_the_cap_and_ours() {
        let a = spec("a", "org-a", &["writer"]);
        let key = agent_scope_key(&TenantContext::explicit("org-a", "ws"), "writer");
        let ours = SpendPauseRow {
            agent_key: key.clone(),
            reason: Some(format!("{SPEND_PAUSE_REASON_PREFIX} x")),
        };
        let operator = SpendPauseRow {
            agent_key: "someone-else".into(),
            reason: Some("manual".into()),
        };
        // Still over: nothing to do.
        let i = inputs(
            vec![run_spend("r1", &a, 12.0)],
            vec![cap("org-a", "writer", 10.0)],
            vec![ours.clone(), operator.clone()],
        );
        assert_eq!(plan_spend_caps(&i), SpendPlan::default());
        // The window moved on (no runs): ours is lifted, the operator's stays.
        let i = inputs(
            vec![],
            vec![cap("org-a", "writer", 10.0)],
            vec![ours.clone(), operator.clone()],
        );
        assert_eq!(plan_spend_caps(&i).lift, vec![ours.clone()]);
        // The cap was raised.
        let i = inputs(
            vec![run_spend("r1", &a, 12.0)],
            vec![cap("org-a", "writer", 100.0)],
            vec![ours.clone()],
        );
        assert_eq!(plan_spend_caps(&i).lift, vec![ours]);
    }

    #[test]
    fn zero_spend_never_reaches_a_zero_cap_and_bad_costs_are_ignored() {
        assert!(!cap_reached(0.0, 0.0));
        assert!(cap_reached(0.01, 0.0));
        assert!(cap_reached(10.0, 10.0));
        assert!(!cap_reached(9.99, 10.0));
        let a = spec("a", "org-a", &["writer"]);
        let i = inputs(
            vec![run_spend("r1", &a, f64::NAN), run_spend("r2", &a, -5.0)],
            vec![cap("org-a", "writer", 0.0)],
            vec![],
        );
        assert_eq!(plan_spend_caps(&i), SpendPlan::default());
    }

    #[test]
    fn scope_keys_round_trip_through_the_parser() {
        let t = TenantContext::explicit("org.x", "ws y");
        let key = agent_scope_key(&t, " agent-1 ");
        assert_eq!(
            parse_agent_scope_key(&key),
            Some(("org.x".into(), "ws y".into(), "agent-1".into()))
        );
        let local = agent_scope_key(&TenantContext::local_implicit(), "a2");
        assert_eq!(
            parse_agent_scope_key(&local),
            Some(("local".into(), "local".into(), "a2".into()))
        );
        assert_eq!(parse_agent_scope_key("tenant:[1,2]"), None);
        assert_eq!(parse_agent_scope_key("  "), None);
    }

    #[test]
    fn hard_stop_pauses_running_runs_of_capped_agents_and_an_override_resumes_them() {
        let def = spec("a", "org-a", &["writer", "reviewer"]);
        let mut run = AutomationV2RunRecord::new_queued(
            "run-1".into(),
            &def,
            "manual",
            ExecutionProfile::Strict,
            NOW - 1000,
        );
        run.status = AutomationRunStatus::Running;
        let tenant = def.tenant_context();
        let mut gov = GovernanceSnapshot::default();
        let t = spend_cap_hard_stop(&mut run, None, &gov, NOW);
        assert!(!t.changed);
        assert_eq!(t.outcome, HardStopOutcome::NotCapped);

        gov.spend_paused_agents
            .insert(agent_scope_key(&tenant, "writer"));
        let t = spend_cap_hard_stop(&mut run, None, &gov, NOW);
        assert!(t.changed);
        assert_eq!(
            t.outcome,
            HardStopOutcome::Paused {
                agent_ids: vec!["writer".into()]
            }
        );
        assert_eq!(run.status, AutomationRunStatus::Paused);
        assert_eq!(run.stop_kind, Some(AutomationStopKind::GuardrailStopped));
        assert_eq!(run.pause_reason.as_deref(), Some(SPEND_CAP_PAUSED_DETAIL));
        assert_eq!(t.effects.cancel_tasks_of, vec!["run-1".to_owned()]);
        assert_eq!(t.effects.audit.len(), 1);
        assert_eq!(t.effects.audit[0].event_type, AUDIT_SPEND_CAP_PAUSED_RUN);
        let last = run.checkpoint.lifecycle_history.last().expect("record");
        assert_eq!(last.event, LIFECYCLE_RUN_PAUSED_SPEND_CAP);

        // Not running any more: a second pass does nothing.
        let again = spend_cap_hard_stop(&mut run, None, &gov, NOW + 1);
        assert!(!again.changed);

        // An override for the capped agent lets the guardrail auto-resume re-queue it.
        let blocked = auto_resume_guardrail_stopped(&mut run.clone(), None, &gov, NOW + 2);
        assert_eq!(blocked.outcome, AutoResumeOutcome::LaunchStillHeld);
        gov.quota_overrides.push(QuotaOverride {
            agent_key: agent_scope_key(&tenant, "writer"),
            expires_at_ms: NOW + WEEK_MS,
        });
        let resumed = auto_resume_guardrail_stopped(&mut run, None, &gov, NOW + 3);
        assert_eq!(resumed.outcome, AutoResumeOutcome::Resumed);
        assert_eq!(run.status, AutomationRunStatus::Queued);
    }
}
