//! Gate expiry policy (spec §1.10, §3.10, §4.2 step 11): effective policy, expiry time, reminder
//! due-ness, late-decision rejection, and the next time a gate needs attention.
//!
//! # Escalation ladders (Tandem Fleet extension)
//!
//! A stored policy may list its steps as data instead of upstream's single
//! `expires_after_ms` / `on_expiry` / `remind_every_ms` triple:
//!
//! ```json
//! {"escalate_to": "team-lead",
//!  "steps": [{"after_ms": 3600000,  "action": "remind"},
//!            {"after_ms": 14400000, "action": "escalate", "escalate_to": "director"},
//!            {"after_ms": 86400000, "action": "cancel"}]}
//! ```
//!
//! * `after_ms` counts from the gate's `requested_at_ms`; `action` is `remind`, `escalate` or
//!   `cancel` (upstream's [`AutomationGateExpiryAction`] spelling); `escalate_to` (escalate steps
//!   only) falls back to the policy's `escalate_to`, then to `unassigned_escalation_principal`.
//! * A non-empty `steps` replaces `expires_after_ms`, `on_expiry` and `remind_every_ms` (the
//!   API rejects the combination, [`validate_expiry_policy`]). `steps: []` means "no ladder".
//! * The ladder's *expiry* (`expires_at_ms` in events, the pending-approvals list and the policy
//!   state) is the due time of its last step; `on_expiry` of the [`EffectivePolicy`] is the last
//!   step's action. So a ladder ending in `cancel` rejects late human decisions exactly like an
//!   upstream `cancel` policy once that step is due ([`rejects_late_human_decision`]).
//! * Steps fire in array order, each exactly once. Progress is
//!   `gate_policy_state.steps_applied` on the open gate (persisted with the run), so any later
//!   call applies only what is left; the gate-notifier applies **every overdue step in one
//!   call**, in order (see `gate::process_gate_policies`). Nothing follows a `cancel` step (it
//!   closes the gate). A ladder that ends with `remind` or `escalate` leaves the gate waiting for a
//!   human, with no further automatic action (no repetition after the last step).
//! * Run-time tolerance for records that never went through validation: steps with an unknown
//!   action are inert (skipped), steps after the first `cancel` never run, and a step is never
//!   due before an earlier one (its due offset is the largest `after_ms` up to it).

use crate::config::GatePolicyDefaults;
use crate::graph::FlowError;
use crate::model::{
    AutomationGateEscalationStep, AutomationGateExpiryAction, AutomationGateExpiryPolicy,
    AutomationGateStepAction, AutomationPendingGate, Millis,
};

/// Most steps a ladder may have (validation); each applied step writes a lifecycle record, an
/// audit record and an event.
pub const MAX_LADDER_STEPS: usize = 32;

/// `gate_policy_state` key counting the ladder steps applied to the open gate instance.
pub const STEPS_APPLIED_KEY: &str = "steps_applied";

/// One step of the effective ladder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LadderStep {
    /// Position in the stored `steps` array (published as `step_index`).
    pub index: usize,
    /// `after_ms` as stored.
    pub after_ms: u64,
    /// When the step is due, relative to `requested_at_ms`: the largest `after_ms` of this step
    /// and every effective step before it, so steps are never due out of array order.
    pub due_after_ms: u64,
    pub action: AutomationGateExpiryAction,
    /// The step's own `escalate_to`, as stored.
    pub escalate_to: Option<String>,
}

impl LadderStep {
    fn to_stored(&self) -> AutomationGateEscalationStep {
        AutomationGateEscalationStep {
            after_ms: self.after_ms,
            action: AutomationGateStepAction::Known(self.action),
            escalate_to: self.escalate_to.clone(),
        }
    }
}

/// The policy in force for a gate, with upstream's normalisation applied.
///
/// For a ladder (`steps` non-empty), `expires_after_ms` is the last step's due offset,
/// `on_expiry` its action and `remind_every_ms` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub expires_after_ms: u64,
    pub on_expiry: AutomationGateExpiryAction,
    pub escalate_to: Option<String>,
    pub remind_every_ms: Option<u64>,
    /// The escalation ladder; empty for an upstream single-action policy.
    pub steps: Vec<LadderStep>,
}

impl EffectivePolicy {
    /// Whether this is an escalation ladder rather than an upstream single-action policy.
    pub fn is_ladder(&self) -> bool {
        !self.steps.is_empty()
    }

    /// The stored shape, absent fields omitted (audit and lifecycle `expiry_policy`). A ladder
    /// gives `{escalate_to?, steps}` (its effective steps, as stored).
    pub fn to_stored(&self) -> AutomationGateExpiryPolicy {
        if self.is_ladder() {
            return AutomationGateExpiryPolicy {
                escalate_to: self.escalate_to.clone(),
                steps: Some(self.steps.iter().map(LadderStep::to_stored).collect()),
                ..Default::default()
            };
        }
        AutomationGateExpiryPolicy {
            expires_after_ms: Some(self.expires_after_ms),
            on_expiry: Some(self.on_expiry),
            escalate_to: self.escalate_to.clone(),
            remind_every_ms: self.remind_every_ms,
            steps: None,
        }
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self.to_stored()).unwrap_or(serde_json::Value::Null)
    }
}

/// The effective ladder of stored steps: unknown actions skipped, cut after the first `cancel`,
/// due offsets made non-decreasing.
pub fn ladder_steps(steps: &[AutomationGateEscalationStep]) -> Vec<LadderStep> {
    let mut out = Vec::new();
    let mut due = 0u64;
    for (index, step) in steps.iter().enumerate() {
        let Some(action) = step.action.known() else {
            continue;
        };
        due = due.max(step.after_ms);
        out.push(LadderStep {
            index,
            after_ms: step.after_ms,
            due_after_ms: due,
            action,
            escalate_to: step.escalate_to.clone(),
        });
        if action == AutomationGateExpiryAction::Cancel {
            break;
        }
    }
    out
}

/// `effective_automation_gate_expiry_policy` (spec §1.10). `None`: no expiry, no escalation and
/// no reminders, even when `remind_every_ms` is set (upstream behaviour, kept; §7.11).
///
/// A policy with a non-empty `steps` list is a ladder (module documentation); it is `None` only
/// when none of its steps has a known action.
pub fn effective_policy(
    gate: &AutomationPendingGate,
    defaults: &GatePolicyDefaults,
) -> Option<EffectivePolicy> {
    let stored = match &gate.expiry_policy {
        Some(p) => p.clone(),
        None => AutomationGateExpiryPolicy {
            expires_after_ms: defaults.expires_after_ms,
            on_expiry: Some(defaults.on_expiry),
            ..Default::default()
        },
    };
    if let Some(steps) = stored.steps.as_deref().filter(|s| !s.is_empty()) {
        let steps = ladder_steps(steps);
        let last = steps.last()?;
        return Some(EffectivePolicy {
            expires_after_ms: last.due_after_ms,
            on_expiry: last.action,
            escalate_to: stored.escalate_to,
            remind_every_ms: None,
            steps,
        });
    }
    let expires_after_ms = stored.expires_after_ms.filter(|ms| *ms > 0)?;
    Some(EffectivePolicy {
        expires_after_ms,
        on_expiry: stored.on_expiry.unwrap_or(defaults.on_expiry),
        escalate_to: stored.escalate_to,
        remind_every_ms: stored.remind_every_ms.filter(|ms| *ms > 0),
        steps: Vec::new(),
    })
}

/// How many ladder steps the open gate instance has applied (`gate_policy_state.steps_applied`).
pub fn steps_applied(gate: &AutomationPendingGate) -> usize {
    gate.policy_state_u64(STEPS_APPLIED_KEY)
        .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// The first ladder step the gate has not applied yet (`None`: not a ladder, or all applied).
pub fn next_ladder_step<'a>(
    gate: &AutomationPendingGate,
    policy: &'a EffectivePolicy,
) -> Option<&'a LadderStep> {
    policy.steps.get(steps_applied(gate))
}

/// When `step` is due for `gate`.
pub fn step_due_at(gate: &AutomationPendingGate, step: &LadderStep) -> Millis {
    gate.requested_at_ms.saturating_add(step.due_after_ms)
}

/// Whether `step` falls at the ladder's expiry (its due offset is the last step's): a remind
/// step there is an `expired` reminder, an escalate step there an expiry escalation.
pub fn step_at_expiry(policy: &EffectivePolicy, step: &LadderStep) -> bool {
    step.due_after_ms >= policy.expires_after_ms
}

/// Checks a stored policy as the API must before accepting it (400 on error). Paths are
/// relative to the policy object (`steps[2].action`); upstream-shaped policies always pass.
///
/// Rules for `steps`: not empty, at most [`MAX_LADDER_STEPS`]; not combined with
/// `expires_after_ms`, `on_expiry` or `remind_every_ms`; each `action` one of `remind`,
/// `escalate`, `cancel`; `after_ms` never smaller than the previous step's; nothing after a
/// `cancel` step; `escalate_to` only on escalate steps.
pub fn validate_expiry_policy(policy: &AutomationGateExpiryPolicy) -> Result<(), FlowError> {
    let err = |path: String, message: String| Err(FlowError { path, message });
    let Some(steps) = &policy.steps else {
        return Ok(());
    };
    if steps.is_empty() {
        return err(
            "steps".into(),
            "steps must list at least one step (omit it for a single-action policy)".into(),
        );
    }
    if steps.len() > MAX_LADDER_STEPS {
        return err(
            "steps".into(),
            format!(
                "at most {MAX_LADDER_STEPS} steps are allowed, got {}",
                steps.len()
            ),
        );
    }
    for (field, set) in [
        ("expires_after_ms", policy.expires_after_ms.is_some()),
        ("on_expiry", policy.on_expiry.is_some()),
        ("remind_every_ms", policy.remind_every_ms.is_some()),
    ] {
        if set {
            return err(
                field.into(),
                format!("{field} cannot be combined with steps: the last step is the expiry"),
            );
        }
    }
    let mut previous: Option<u64> = None;
    for (i, step) in steps.iter().enumerate() {
        let Some(action) = step.action.known() else {
            return err(
                format!("steps[{i}].action"),
                format!(
                    "unknown action {:?}: expected one of \"remind\", \"escalate\", \"cancel\"",
                    step.action.as_str()
                ),
            );
        };
        if let Some(prev) = previous
            && step.after_ms < prev
        {
            return err(
                format!("steps[{i}].after_ms"),
                format!(
                    "steps must be in time order: after_ms {} is before the previous step's {prev}",
                    step.after_ms
                ),
            );
        }
        previous = Some(step.after_ms);
        if step.escalate_to.is_some() && action != AutomationGateExpiryAction::Escalate {
            return err(
                format!("steps[{i}].escalate_to"),
                format!(
                    "escalate_to is only read by escalate steps, not {}",
                    action.as_str()
                ),
            );
        }
        if action == AutomationGateExpiryAction::Cancel && i + 1 < steps.len() {
            return err(
                format!("steps[{}]", i + 1),
                "no step may follow a cancel step: cancel closes the gate".into(),
            );
        }
    }
    Ok(())
}

/// `automation_gate_expires_at_ms`.
pub fn expires_at_ms(gate: &AutomationPendingGate, policy: &EffectivePolicy) -> Millis {
    gate.requested_at_ms.saturating_add(policy.expires_after_ms)
}

/// `gate_policy_reminder_due` (spec §3.10).
pub fn reminder_due(
    gate: &AutomationPendingGate,
    policy: &EffectivePolicy,
    now: Millis,
    expires_at: Millis,
) -> bool {
    let remind = policy.on_expiry == AutomationGateExpiryAction::Remind;
    if now >= expires_at && !remind {
        return false;
    }
    let last = gate.policy_state_u64("last_reminded_at_ms");
    match policy.remind_every_ms {
        None => now >= expires_at && remind && last.is_none(),
        Some(every) => now.saturating_sub(last.unwrap_or(gate.requested_at_ms)) >= every,
    }
}

/// `automation_gate_rejects_late_human_decision` (spec §4.2 step 11): once a cancel policy's
/// expiry time has passed, cancel wins even if the sweep has not run yet. For a ladder this is
/// the due time of its `cancel` step (always its last effective step).
pub fn rejects_late_human_decision(
    gate: &AutomationPendingGate,
    defaults: &GatePolicyDefaults,
    now: Millis,
) -> bool {
    effective_policy(gate, defaults).is_some_and(|p| {
        p.on_expiry == AutomationGateExpiryAction::Cancel && now >= expires_at_ms(gate, &p)
    })
}

/// When this gate next needs the gate-notifier: the earliest of its next policy action
/// (reminder, expiry, escalation; for a ladder, the next unapplied step) and its stale marking.
/// `None`: nothing will ever be due.
///
/// The store indexes this value so the notifier reads only due gates (O(due), not O(all)).
pub fn next_action_at(
    gate: &AutomationPendingGate,
    defaults: &GatePolicyDefaults,
) -> Option<Millis> {
    let stale_at = (!gate.is_marked_stale())
        .then(|| gate.requested_at_ms.saturating_add(defaults.stale_after_ms));
    let policy_at = effective_policy(gate, defaults).and_then(|p| {
        if p.is_ladder() {
            return next_ladder_step(gate, &p).map(|s| step_due_at(gate, s));
        }
        let expires_at = expires_at_ms(gate, &p);
        let last = gate.policy_state_u64("last_reminded_at_ms");
        let next_reminder = p
            .remind_every_ms
            .map(|every| last.unwrap_or(gate.requested_at_ms).saturating_add(every));
        match p.on_expiry {
            AutomationGateExpiryAction::Cancel => {
                Some(next_reminder.map_or(expires_at, |r| r.min(expires_at)))
            }
            AutomationGateExpiryAction::Escalate => {
                if gate.policy_state_u64("escalated_at_ms").is_some() {
                    None
                } else {
                    Some(next_reminder.map_or(expires_at, |r| r.min(expires_at)))
                }
            }
            AutomationGateExpiryAction::Remind => match next_reminder {
                Some(r) => Some(r),
                None if last.is_none() => Some(expires_at),
                None => None,
            },
        }
    });
    match (stale_at, policy_at) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AutomationGateExpiryAction as A;
    use serde_json::json;

    fn gate(policy: Option<AutomationGateExpiryPolicy>) -> AutomationPendingGate {
        AutomationPendingGate {
            node_id: "approval".into(),
            title: "Approve".into(),
            instructions: None,
            decisions: vec![],
            rework_targets: vec![],
            requested_at_ms: 1_000,
            upstream_node_ids: vec![],
            metadata: None,
            expiry_policy: policy,
        }
    }

    fn pol(
        expires: Option<u64>,
        on: Option<A>,
        every: Option<u64>,
    ) -> Option<AutomationGateExpiryPolicy> {
        Some(AutomationGateExpiryPolicy {
            expires_after_ms: expires,
            on_expiry: on,
            escalate_to: None,
            remind_every_ms: every,
            steps: None,
        })
    }

    #[test]
    fn default_policy_is_seven_day_cancel() {
        let d = GatePolicyDefaults::default();
        let p = effective_policy(&gate(None), &d).expect("default policy");
        assert_eq!(p.expires_after_ms, 604_800_000);
        assert_eq!(p.on_expiry, A::Cancel);
        assert_eq!(expires_at_ms(&gate(None), &p), 1_000 + 604_800_000);
    }

    #[test]
    fn default_policy_follows_env_defaults_and_zero_disables() {
        let d = GatePolicyDefaults {
            expires_after_ms: Some(50),
            on_expiry: A::Escalate,
            ..Default::default()
        };
        let p = effective_policy(&gate(None), &d).expect("policy");
        assert_eq!((p.expires_after_ms, p.on_expiry), (50, A::Escalate));
        let none = GatePolicyDefaults {
            expires_after_ms: None,
            ..Default::default()
        };
        assert!(effective_policy(&gate(None), &none).is_none());
    }

    #[test]
    fn explicit_policy_without_expiry_disables_everything_even_reminders() {
        let d = GatePolicyDefaults::default();
        assert!(effective_policy(&gate(pol(None, Some(A::Remind), Some(10))), &d).is_none());
        assert!(effective_policy(&gate(pol(Some(0), Some(A::Remind), Some(10))), &d).is_none());
        let p = effective_policy(&gate(pol(Some(10), None, Some(0))), &d).expect("policy");
        assert_eq!(
            p.on_expiry,
            A::Cancel,
            "missing action filled with the default"
        );
        assert_eq!(p.remind_every_ms, None, "0 interval normalised to None");
    }

    #[test]
    fn reminders_before_expiry_for_all_actions_and_after_expiry_only_for_remind() {
        let d = GatePolicyDefaults::default();
        for action in [A::Cancel, A::Escalate, A::Remind] {
            let g = gate(pol(Some(10_000), Some(action), Some(1_000)));
            let p = effective_policy(&g, &d).expect("policy");
            let exp = expires_at_ms(&g, &p);
            assert!(!reminder_due(&g, &p, 1_999, exp));
            assert!(
                reminder_due(&g, &p, 2_000, exp),
                "first reminder at requested + interval"
            );
            assert_eq!(reminder_due(&g, &p, exp, exp), action == A::Remind);
        }
    }

    #[test]
    fn remind_without_interval_fires_once_at_expiry() {
        let d = GatePolicyDefaults::default();
        let mut g = gate(pol(Some(10), Some(A::Remind), None));
        let p = effective_policy(&g, &d).expect("policy");
        assert!(!reminder_due(&g, &p, 1_009, 1_010));
        assert!(reminder_due(&g, &p, 1_010, 1_010));
        g.metadata = Some(json!({"gate_policy_state": {"last_reminded_at_ms": 1_010}}));
        assert!(!reminder_due(&g, &p, 99_999, 1_010));
    }

    #[test]
    fn case_8_expired_cancel_policy_rejects_late_human_decision() {
        let d = GatePolicyDefaults::default();
        let mut g = gate(pol(Some(5), Some(A::Cancel), None));
        g.requested_at_ms = 10;
        assert!(rejects_late_human_decision(&g, &d, 15));
        assert!(!rejects_late_human_decision(&g, &d, 14));
        g.expiry_policy = pol(Some(5), Some(A::Escalate), None);
        assert!(!rejects_late_human_decision(&g, &d, 15));
        g.expiry_policy = pol(Some(5), Some(A::Remind), None);
        assert!(!rejects_late_human_decision(&g, &d, 15));
    }

    #[test]
    fn next_action_at_is_earliest_pending_step() {
        let d = GatePolicyDefaults {
            stale_after_ms: 100_000,
            ..Default::default()
        };
        let g = gate(pol(Some(10_000), Some(A::Cancel), Some(3_000)));
        assert_eq!(next_action_at(&g, &d), Some(4_000));
        let mut g = gate(pol(Some(10_000), Some(A::Escalate), None));
        assert_eq!(next_action_at(&g, &d), Some(11_000));
        g.metadata = Some(json!({"gate_policy_state": {"escalated_at_ms": 11_000}}));
        assert_eq!(
            next_action_at(&g, &d),
            Some(101_000),
            "only the stale marking is left"
        );
        g.metadata = Some(json!({"stale": true, "gate_policy_state": {"escalated_at_ms": 11_000}}));
        assert_eq!(next_action_at(&g, &d), None);
    }

    fn ladder(steps: &[(u64, &str)]) -> Option<AutomationGateExpiryPolicy> {
        Some(AutomationGateExpiryPolicy {
            steps: Some(
                steps
                    .iter()
                    .map(|(after_ms, action)| AutomationGateEscalationStep {
                        after_ms: *after_ms,
                        action: AutomationGateStepAction::parse(action),
                        escalate_to: None,
                    })
                    .collect(),
            ),
            ..Default::default()
        })
    }

    #[test]
    fn upstream_policy_json_is_unchanged_and_ladder_json_round_trips() {
        let upstream = json!({"expires_after_ms": 10, "on_expiry": "escalate",
                              "escalate_to": "lead", "remind_every_ms": 5});
        let p: AutomationGateExpiryPolicy =
            serde_json::from_value(upstream.clone()).expect("upstream shape");
        assert_eq!(p.steps, None);
        assert_eq!(serde_json::to_value(&p).expect("ser"), upstream);
        let with_ladder = json!({"escalate_to": "lead", "steps": [
            {"after_ms": 1, "action": "remind"},
            {"after_ms": 2, "action": "escalate", "escalate_to": "boss"},
            {"after_ms": 3, "action": "page"},
            {"after_ms": 4, "action": "cancel"}]});
        let p: AutomationGateExpiryPolicy =
            serde_json::from_value(with_ladder.clone()).expect("ladder shape");
        let steps = p.steps.as_ref().expect("steps");
        assert_eq!(steps[0].action, AutomationGateStepAction::Known(A::Remind));
        assert_eq!(
            steps[2].action,
            AutomationGateStepAction::Unknown("page".into()),
            "an unknown action still parses, for validation to report it"
        );
        assert_eq!(serde_json::to_value(&p).expect("ser"), with_ladder);
        assert!(
            serde_json::from_value::<AutomationGateExpiryPolicy>(
                json!({"steps": [{"after_ms": 1, "action": 5}]})
            )
            .is_err(),
            "a non-string action is a type error"
        );
    }

    #[test]
    fn ladder_effective_policy_ends_with_its_last_step() {
        let d = GatePolicyDefaults::default();
        let g = gate(ladder(&[
            (100, "remind"),
            (300, "escalate"),
            (700, "cancel"),
        ]));
        let p = effective_policy(&g, &d).expect("ladder");
        assert!(p.is_ladder());
        assert_eq!((p.expires_after_ms, p.on_expiry), (700, A::Cancel));
        assert_eq!(expires_at_ms(&g, &p), 1_700);
        assert_eq!(
            p.to_value(),
            json!({"steps": [{"after_ms": 100, "action": "remind"},
                             {"after_ms": 300, "action": "escalate"},
                             {"after_ms": 700, "action": "cancel"}]})
        );
        // The ladder replaces the upstream fields, even when a record carries both.
        let mut both = ladder(&[(100, "remind")]).expect("policy");
        both.expires_after_ms = Some(5);
        both.on_expiry = Some(A::Cancel);
        both.remind_every_ms = Some(1);
        let p = effective_policy(&gate(Some(both)), &d).expect("ladder");
        assert_eq!(
            (p.expires_after_ms, p.on_expiry, p.remind_every_ms),
            (100, A::Remind, None)
        );
        // `steps: []` is no ladder: the upstream fields apply.
        let mut empty = pol(Some(50), Some(A::Remind), None).expect("policy");
        empty.steps = Some(vec![]);
        let p = effective_policy(&gate(Some(empty)), &d).expect("upstream");
        assert!(!p.is_ladder());
        assert_eq!((p.expires_after_ms, p.on_expiry), (50, A::Remind));
        // Only unknown actions: no effective policy (manual only).
        assert!(effective_policy(&gate(ladder(&[(1, "page")])), &d).is_none());
    }

    #[test]
    fn ladder_runtime_tolerates_unvalidated_steps() {
        let steps = ladder(&[
            (500, "remind"),
            (200, "escalate"),
            (300, "page"),
            (900, "cancel"),
            (950, "remind"),
        ])
        .and_then(|p| p.steps)
        .expect("steps");
        let l = ladder_steps(&steps);
        let summary: Vec<(usize, u64, A)> = l
            .iter()
            .map(|s| (s.index, s.due_after_ms, s.action))
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, 500, A::Remind),
                (1, 500, A::Escalate),
                (3, 900, A::Cancel)
            ],
            "unknown skipped, never due before an earlier step, nothing after cancel"
        );
    }

    #[test]
    fn ladder_next_action_is_the_next_unapplied_step() {
        let d = GatePolicyDefaults {
            stale_after_ms: 100_000,
            ..Default::default()
        };
        let mut g = gate(ladder(&[
            (100, "remind"),
            (300, "escalate"),
            (700, "cancel"),
        ]));
        assert_eq!(next_action_at(&g, &d), Some(1_100));
        g.metadata = Some(json!({"gate_policy_state": {"steps_applied": 2}}));
        assert_eq!(next_action_at(&g, &d), Some(1_700));
        g.metadata = Some(json!({"gate_policy_state": {"steps_applied": 3}}));
        assert_eq!(
            next_action_at(&g, &d),
            Some(101_000),
            "only stale marking left"
        );
        // An escalation marker does not end a ladder (it may escalate more than once).
        let mut g = gate(ladder(&[(100, "escalate"), (300, "escalate")]));
        g.metadata =
            Some(json!({"gate_policy_state": {"steps_applied": 1, "escalated_at_ms": 1_100}}));
        assert_eq!(next_action_at(&g, &d), Some(1_300));
    }

    #[test]
    fn ladder_cancel_step_rejects_late_human_decisions_like_upstream_expiry() {
        let d = GatePolicyDefaults::default();
        let g = gate(ladder(&[(100, "remind"), (300, "cancel")]));
        assert!(!rejects_late_human_decision(&g, &d, 1_299));
        assert!(rejects_late_human_decision(&g, &d, 1_300));
        let g = gate(ladder(&[(100, "remind"), (300, "escalate")]));
        assert!(!rejects_late_human_decision(&g, &d, 99_999));
    }

    fn invalid(policy: serde_json::Value) -> (String, String) {
        let p: AutomationGateExpiryPolicy = serde_json::from_value(policy).expect("parses");
        let e = validate_expiry_policy(&p).expect_err("invalid");
        (e.path, e.message)
    }

    #[test]
    fn validation_reports_the_path_of_what_is_wrong() {
        let ok: AutomationGateExpiryPolicy = serde_json::from_value(json!({
            "escalate_to": "lead",
            "steps": [{"after_ms": 0, "action": "remind"},
                      {"after_ms": 0, "action": "escalate", "escalate_to": "boss"},
                      {"after_ms": 10, "action": "cancel"}]}))
        .expect("parses");
        assert_eq!(validate_expiry_policy(&ok), Ok(()));
        for upstream in [
            pol(Some(1), Some(A::Remind), Some(1)),
            pol(None, None, None),
            Some(Default::default()),
        ] {
            assert_eq!(validate_expiry_policy(&upstream.expect("p")), Ok(()));
        }
        let (path, msg) = invalid(json!({"steps": [{"after_ms": 1, "action": "remind"},
                                                   {"after_ms": 2, "action": "page"}]}));
        assert_eq!(path, "steps[1].action");
        assert!(msg.contains("unknown action \"page\""), "{msg}");
        let (path, _) = invalid(json!({"steps": [{"after_ms": 1, "action": "Remind"}]}));
        assert_eq!(
            path, "steps[0].action",
            "exact spelling, as upstream's enum"
        );
        assert_eq!(invalid(json!({"steps": []})).0, "steps");
        let (path, msg) = invalid(json!({"steps": [{"after_ms": 5, "action": "remind"},
                                                   {"after_ms": 4, "action": "cancel"}]}));
        assert_eq!(path, "steps[1].after_ms");
        assert!(msg.contains("time order"), "{msg}");
        let (path, _) = invalid(json!({"steps": [{"after_ms": 5, "action": "cancel"},
                                                 {"after_ms": 6, "action": "remind"}]}));
        assert_eq!(path, "steps[1]");
        let (path, _) = invalid(json!({"steps": [
            {"after_ms": 5, "action": "remind", "escalate_to": "x"}]}));
        assert_eq!(path, "steps[0].escalate_to");
        for field in ["expires_after_ms", "remind_every_ms"] {
            let (path, _) =
                invalid(json!({field: 5, "steps": [{"after_ms": 5, "action": "remind"}]}));
            assert_eq!(path, field);
        }
        let (path, _) =
            invalid(json!({"on_expiry": "cancel", "steps": [{"after_ms": 5, "action": "remind"}]}));
        assert_eq!(path, "on_expiry");
        let many: Vec<_> = (0..=MAX_LADDER_STEPS as u64)
            .map(|i| json!({"after_ms": i, "action": "remind"}))
            .collect();
        assert_eq!(invalid(json!({ "steps": many })).0, "steps");
    }
}
