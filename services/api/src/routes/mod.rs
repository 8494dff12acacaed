//! Route handlers.

pub mod admin;
pub mod approvals;
pub mod automations;
pub mod runs;

use serde::Deserialize;
use tandem_core::{AutomationRunStatus, AutomationV2RunRecord, Millis};
use tandem_store::{RunFilter, StoreError};

use crate::{ApiError, AppState, Principal, check_id};

/// Default and largest page of run and automation listings.
pub const DEFAULT_PAGE: usize = 50;
pub const MAX_PAGE: usize = 500;

/// The run, if it exists and the caller may see it (else 404, also for another tenant's run).
pub async fn visible_run(
    state: &AppState,
    principal: &Principal,
    run_id: &str,
) -> Result<AutomationV2RunRecord, ApiError> {
    check_id("run_id", run_id)?;
    match tandem_store::get_run(state.pool(), run_id).await {
        Ok(run) if principal.can_see(&run.tenant_context) => Ok(run),
        Ok(_) | Err(StoreError::NotFound(_)) => Err(ApiError::run_not_found(run_id)),
        Err(e) => Err(e.into()),
    }
}

/// Query of the run listings.
#[derive(Debug, Default, Deserialize)]
pub struct RunListQuery {
    pub status: Option<String>,
    pub automation_id: Option<String>,
    pub org_id: Option<String>,
    pub workspace_id: Option<String>,
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

pub fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(0) => Err(ApiError::validation("limit", "must be at least 1")),
        Some(n) => Ok(n.min(MAX_PAGE)),
    }
}

/// A run listing's filter: the query narrowed by the caller's tenant scope.
pub fn run_filter(principal: &Principal, q: &RunListQuery) -> Result<RunFilter, ApiError> {
    let status = match q.status.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(AutomationRunStatus::parse(s).ok_or_else(|| {
            ApiError::validation(
                "status",
                &format!(
                    "unknown status `{s}`; expected one of queued, running, pausing, paused, \
                     awaiting_approval, completed, blocked, failed, cancelled"
                ),
            )
        })?),
    };
    let narrow = |scope: &Option<String>, asked: &Option<String>, what: &str| match (scope, asked) {
        (Some(s), Some(a)) if s != a => Err(ApiError::forbidden(
            "TENANT_SCOPE_DENIED",
            format!("{what} is outside the token's tenant"),
        )),
        (Some(s), _) => Ok(Some(s.clone())),
        (None, a) => Ok(a.clone()),
    };
    for id in [&q.automation_id, &q.org_id, &q.workspace_id]
        .into_iter()
        .flatten()
    {
        check_id("filter", id)?;
    }
    let before = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(parse_cursor(c)?),
    };
    Ok(RunFilter {
        org_id: narrow(&principal.org_id, &q.org_id, "org_id")?,
        workspace_id: narrow(&principal.workspace_id, &q.workspace_id, "workspace_id")?,
        automation_id: q.automation_id.clone(),
        status,
        before,
    })
}

/// Cursor `"{created_at_ms}:{run_id}"` of the last run of a page.
pub fn cursor_of(run: &AutomationV2RunRecord) -> String {
    format!("{}:{}", run.created_at_ms, run.run_id)
}

fn parse_cursor(c: &str) -> Result<(Millis, String), ApiError> {
    let bad = || ApiError::validation("cursor", "not a cursor returned by this API");
    let (ms, id) = c.split_once(':').ok_or_else(bad)?;
    let ms: Millis = ms.parse().map_err(|_| bad())?;
    check_id("cursor", id)?;
    Ok((ms, id.to_owned()))
}

/// `{runs, count, next_cursor}` of one page.
pub fn run_page(runs: Vec<AutomationV2RunRecord>, limit: usize) -> serde_json::Value {
    let next = (runs.len() == limit)
        .then(|| runs.last().map(cursor_of))
        .flatten();
    serde_json::json!({ "count": runs.len(), "runs": runs, "next_cursor": next })
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tandem_core::gate::{GateDecision, build_pending_gate};
    use tandem_core::{ActorKind, AutomationV2RunRecord, ExecutionProfile, TenantContext};

    use super::automations::parse_spec;
    use super::runs::authorize;
    use crate::Principal;

    fn path_of(v: serde_json::Value) -> String {
        match parse_spec(v) {
            Ok(_) => "ok".into(),
            Err(e) => e.extra["path"].as_str().unwrap_or("?").to_owned(),
        }
    }

    #[test]
    fn validation_paths() {
        let ok = json!({"automation_id": "a", "flow": {"nodes": [
            {"node_id": "x"}, {"node_id": "g", "depends_on": ["x"], "stage_kind": "approval",
             "gate": {"required": true, "rework_targets": ["x"]}}]}});
        assert_eq!(path_of(ok), "ok");
        assert_eq!(
            path_of(
                json!({"automation_id": "a", "flow": {"nodes": [{"node_id": "x"}, {"node_id": "x"}]}})
            ),
            "flow.nodes[1].node_id"
        );
        assert_eq!(
            path_of(
                json!({"automation_id": "a", "flow": {"nodes": [{"node_id": "x", "timeout_ms": -1}]}})
            ),
            "flow.nodes[0].timeout_ms"
        );
        assert_eq!(
            path_of(
                json!({"automation_id": "a", "flow": {"nodes": [{"node_id": "x", "objective": 3}]}})
            ),
            "flow.nodes[0].objective"
        );
        assert_eq!(
            path_of(json!({"automation_id": "a", "execution": {"profile": "fast"}})),
            "execution.profile"
        );
    }

    fn principal(kind: ActorKind, actor: &str, verified: bool, reviewer: bool) -> Principal {
        Principal {
            kind,
            actor_id: Some(actor.into()),
            source: None,
            admin: false,
            org_id: None,
            workspace_id: None,
            verified_tenant: verified,
            gate_reviewer: reviewer,
            tenant_admin: false,
        }
    }

    #[test]
    fn owner_or_admin_rule() {
        let mut spec: tandem_core::AutomationV2Spec = serde_json::from_value(json!({
            "automation_id": "a", "creator_id": " Olivia ", "flow": {"nodes": []}}))
        .expect("spec");
        let human = |actor: &str| principal(ActorKind::Human, actor, true, false);
        assert!(human("olivia").owns_or_administers(&spec));
        assert!(!human("mallory").owns_or_administers(&spec));
        assert!(principal(ActorKind::Human, "m", true, true).owns_or_administers(&spec));
        let mut admin = human("mallory");
        admin.tenant_admin = true;
        assert!(admin.owns_or_administers(&spec));
        // An automation without a creator is owned by nobody (an empty actor does not match).
        spec.creator_id = String::new();
        assert!(!human("").owns_or_administers(&spec));
        let mut none = human("x");
        none.actor_id = None;
        assert!(!none.owns_or_administers(&spec));
    }

    #[test]
    fn governed_gate_rules() {
        let spec: tandem_core::AutomationV2Spec = serde_json::from_value(json!({
            "automation_id": "a", "creator_id": "creator", "flow": {"nodes": [
                {"node_id": "g", "stage_kind": "approval", "gate": {"required": true},
                 "metadata": {"approval": {"metadata": {"risk_tier": "high"}}}}]}}))
        .expect("spec");
        let mut run = AutomationV2RunRecord::new_queued(
            "r".into(),
            &spec,
            "manual",
            ExecutionProfile::Strict,
            1,
        );
        run.tenant_context = TenantContext::explicit("o", "w");
        let gate = build_pending_gate(spec.node("g").expect("node"), 1).expect("gate");
        let code = |p: &Principal, d| authorize(p, &run, &spec, &gate, d).err().map(|e| e.code);
        let creator = principal(ActorKind::Human, "Creator", true, true);
        assert_eq!(
            code(&creator, GateDecision::Approve).as_deref(),
            Some("AUTOMATION_V2_GATE_SELF_APPROVAL_FORBIDDEN")
        );
        assert_eq!(code(&creator, GateDecision::Cancel), None);
        assert_eq!(
            code(
                &principal(ActorKind::Human, "bob", false, false),
                GateDecision::Approve
            )
            .as_deref(),
            Some("AUTOMATION_V2_GATE_REVIEWER_AUTHORITY_REQUIRED")
        );
        assert_eq!(
            code(
                &principal(ActorKind::Human, "bob", true, false),
                GateDecision::Approve
            )
            .as_deref(),
            Some("AUTOMATION_V2_GATE_REVIEWER_AUTHORITY_DENIED")
        );
        assert_eq!(
            code(
                &principal(ActorKind::Human, "bob", true, true),
                GateDecision::Approve
            ),
            None
        );
        let mut slack = principal(ActorKind::Human, "U9", false, false);
        slack.source = Some("slack".into());
        assert_eq!(code(&slack, GateDecision::Approve), None);
        // An ungoverned gate: anyone.
        let mut plain = gate.clone();
        plain.metadata = None;
        let p = principal(ActorKind::Human, "creator", false, false);
        assert!(authorize(&p, &run, &spec, &plain, GateDecision::Approve).is_ok());
    }
}
