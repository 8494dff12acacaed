//! Gate expiry policy (spec §1.10, §3.10, §4.2 step 11): effective policy, expiry time, reminder
//! due-ness, late-decision rejection, and the next time a gate needs attention.

use crate::config::GatePolicyDefaults;
use crate::model::{
    AutomationGateExpiryAction, AutomationGateExpiryPolicy, AutomationPendingGate, Millis,
};

/// The policy in force for a gate, with upstream's normalisation applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectivePolicy {
    pub expires_after_ms: u64,
    pub on_expiry: AutomationGateExpiryAction,
    pub escalate_to: Option<String>,
    pub remind_every_ms: Option<u64>,
}

impl EffectivePolicy {
    /// The stored shape, absent fields omitted (audit and lifecycle `expiry_policy`).
    pub fn to_stored(&self) -> AutomationGateExpiryPolicy {
        AutomationGateExpiryPolicy {
            expires_after_ms: Some(self.expires_after_ms),
            on_expiry: Some(self.on_expiry),
            escalate_to: self.escalate_to.clone(),
            remind_every_ms: self.remind_every_ms,
        }
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self.to_stored()).unwrap_or(serde_json::Value::Null)
    }
}

/// `effective_automation_gate_expiry_policy` (spec §1.10). `None`: no expiry, no escalation and
/// no reminders, even when `remind_every_ms` is set (upstream behaviour, kept; §7.11).
pub fn effective_policy(
    gate: &AutomationPendingGate,
    defaults: &GatePolicyDefaults,
) -> Option<EffectivePolicy> {
    let stored = match &gate.expiry_policy {
        Some(p) => p.clone(),
        None => AutomationGateExpiryPolicy {
            expires_after_ms: defaults.expires_after_ms,
            on_expiry: Some(defaults.on_expiry),
            escalate_to: None,
            remind_every_ms: None,
        },
    };
    let expires_after_ms = stored.expires_after_ms.filter(|ms| *ms > 0)?;
    Some(EffectivePolicy {
        expires_after_ms,
        on_expiry: stored.on_expiry.unwrap_or(defaults.on_expiry),
        escalate_to: stored.escalate_to,
        remind_every_ms: stored.remind_every_ms.filter(|ms| *ms > 0),
    })
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
/// expiry time has passed, cancel wins even if the sweep has not run yet.
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
/// (reminder, expiry, escalation) and its stale marking. `None`: nothing will ever be due.
///
/// The store indexes this value so the notifier reads only due gates (O(due), not O(all)).
pub fn next_action_at(
    gate: &AutomationPendingGate,
    defaults: &GatePolicyDefaults,
) -> Option<Millis> {
    let stale_at = (!gate.is_marked_stale())
        .then(|| gate.requested_at_ms.saturating_add(defaults.stale_after_ms));
    let policy_at = effective_policy(gate, defaults).and_then(|p| {
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
}
