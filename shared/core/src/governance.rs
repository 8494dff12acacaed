//! Governance checks used by claims and auto-resume (spec §3.5): agent sets, scope keys, spend
//! pauses and quota overrides. The store loads a [`GovernanceSnapshot`]; the checks are pure.

use crate::model::{AutomationV2Spec, Millis, TenantContext};
use std::collections::{BTreeSet, HashSet};

/// `governance_agent_scope_key` (spec §1.4).
pub fn agent_scope_key(tenant: &TenantContext, agent_id: &str) -> String {
    let agent = agent_id.trim();
    if tenant.is_local_implicit() {
        return agent.to_owned();
    }
    let parts = serde_json::json!([
        tenant.org_id,
        tenant.workspace_id,
        tenant.deployment_id.clone().unwrap_or_default(),
        agent
    ]);
    format!("tenant:{parts}")
}

/// The agent set of an automation: `{creator_id} ∪ agents[].agent_id`, blank entries removed,
/// entries kept untrimmed, ordered.
pub fn agent_set(automation: &AutomationV2Spec) -> BTreeSet<String> {
    std::iter::once(automation.creator_id.clone())
        .chain(automation.agents.iter().map(|a| a.agent_id.clone()))
        .filter(|a| !a.trim().is_empty())
        .collect()
}

/// An approved quota override for one scoped agent key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaOverride {
    pub agent_key: String,
    pub expires_at_ms: Millis,
}

/// The governance state a decision needs: spend-paused agent keys and approved overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GovernanceSnapshot {
    pub spend_paused_agents: HashSet<String>,
    pub quota_overrides: Vec<QuotaOverride>,
}

impl GovernanceSnapshot {
    /// `tenant_agent_has_quota_override`: an approved override, unexpired at `now`.
    pub fn has_quota_override(&self, tenant: &TenantContext, agent: &str, now: Millis) -> bool {
        let key = agent_scope_key(tenant, agent);
        self.quota_overrides
            .iter()
            .any(|o| o.agent_key == key && o.expires_at_ms > now)
    }

    /// `tenant_agent_spend_paused_without_quota_override`.
    pub fn spend_paused_without_override(
        &self,
        tenant: &TenantContext,
        agent: &str,
        now: Millis,
    ) -> bool {
        self.spend_paused_agents
            .contains(&agent_scope_key(tenant, agent))
            && !self.has_quota_override(tenant, agent, now)
    }

    /// `run_launch_blocked_by_spend_pause`: any agent of the automation spend-paused without its
    /// own override. The tenant is the automation's (spec §3.5).
    pub fn launch_blocked_by_spend_pause(
        &self,
        automation: &AutomationV2Spec,
        now: Millis,
    ) -> bool {
        let tenant = automation.tenant_context();
        agent_set(automation)
            .iter()
            .any(|a| self.spend_paused_without_override(&tenant, a, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AutomationAgentProfile, AutomationFlowNode};
    use serde_json::json;

    fn spec_with(agent: &str, tenant: Option<TenantContext>) -> AutomationV2Spec {
        let mut s = AutomationV2Spec::new("a", vec![AutomationFlowNode::task("n", &[])]);
        s.creator_id = " ".into();
        s.agents = vec![AutomationAgentProfile {
            agent_id: agent.into(),
            extra: Default::default(),
        }];
        if let Some(t) = tenant {
            s.metadata = Some(json!({ "tenant_context": t }));
        }
        s
    }

    #[test]
    fn scope_key_is_plain_for_local_and_tenant_scoped_otherwise() {
        assert_eq!(
            agent_scope_key(&TenantContext::local_implicit(), " a1 "),
            "a1"
        );
        let t = TenantContext::explicit("org", "ws");
        assert_eq!(agent_scope_key(&t, "a1"), r#"tenant:["org","ws","","a1"]"#);
    }

    #[test]
    fn case_37_spend_pause_does_not_cross_tenants() {
        let a = TenantContext::explicit("org-a", "ws");
        let b = TenantContext::explicit("org-b", "ws");
        let mut g = GovernanceSnapshot::default();
        g.spend_paused_agents
            .insert(agent_scope_key(&a, "shared-agent"));
        assert!(g.launch_blocked_by_spend_pause(&spec_with("shared-agent", Some(a)), 0));
        assert!(!g.launch_blocked_by_spend_pause(&spec_with("shared-agent", Some(b)), 0));
    }

    #[test]
    fn override_lifts_only_its_own_agent_and_expires() {
        let t = TenantContext::local_implicit();
        let mut g = GovernanceSnapshot::default();
        g.spend_paused_agents.insert("x".into());
        g.spend_paused_agents.insert("y".into());
        g.quota_overrides.push(QuotaOverride {
            agent_key: "x".into(),
            expires_at_ms: 100,
        });
        assert!(!g.spend_paused_without_override(&t, "x", 99));
        assert!(
            g.spend_paused_without_override(&t, "x", 100),
            "expired at 100"
        );
        assert!(g.spend_paused_without_override(&t, "y", 0));
        assert!(agent_set(&spec_with("x", None)).contains("x"));
        assert!(
            !agent_set(&spec_with("x", None)).contains(" "),
            "blank creator removed"
        );
    }
}
