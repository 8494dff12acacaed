//! `GET /openapi.json`: a hand-written OpenAPI 3.1 document (no generator dependency).

use axum::Json;
use serde_json::{Value, json};

fn op(summary: &str, body: Option<&str>, errors: &[(&str, &str)]) -> Value {
    let mut responses = serde_json::Map::new();
    responses.insert(
        "200".into(),
        json!({"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}),
    );
    for (status, what) in errors {
        responses.insert(
            (*status).into(),
            json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
    }
    let mut o = json!({ "summary": summary, "responses": Value::Object(responses) });
    if let (Some(b), Some(obj)) = (body, o.as_object_mut()) {
        obj.insert(
            "requestBody".into(),
            json!({"required": false, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{b}")}}}}),
        );
    }
    o
}

const AUTH: (&str, &str) = ("401", "missing, unknown or revoked token");
const BAD: (&str, &str) = ("400", "invalid input (code, message, JSON path)");
const NF: (&str, &str) = ("404", "not found, or another tenant's");

/// The document.
pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Tandem Fleet API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Upstream-compatible (tandem-server 0.6.2) automation v2 API. Auth: \
                `Authorization: Bearer <token>` or `X-Tandem-Token`. Errors: `{error, code}`."
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "tandemToken": {"type": "apiKey", "in": "header", "name": "X-Tandem-Token"}
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error", "code"], "properties": {
                    "error": {"type": "string"}, "code": {"type": "string"},
                    "path": {"type": "string"}, "runID": {"type": "string"},
                    "currentStatus": {"type": "string"},
                    "winningDecision": {"type": "object", "properties": {
                        "node_id": {"type": "string"}, "decision": {"type": "string"},
                        "reason": {"type": ["string", "null"]}, "decided_at_ms": {"type": "integer"}}}
                }},
                "AutomationV2Spec": {"type": "object", "required": ["automation_id"],
                    "description": "Upstream AutomationV2Spec (snake_case)."},
                "GateDecision": {"type": "object", "properties": {
                    "decision": {"type": "string", "enum": ["approve", "rework", "cancel"]},
                    "reason": {"type": "string"},
                    "node_id": {"type": "string"}, "requested_at_ms": {"type": "integer"}}},
                "Reason": {"type": "object", "properties": {"reason": {"type": "string"}}},
                "RunNow": {"type": "object", "properties": {"reason": {"type": "string"},
                    "execution_profile": {"type": "string", "enum": ["strict", "guided", "yolo"]},
                    "trigger_type": {"type": "string"}}},
                "SpendCap": {"type": "object", "required": ["agent_id", "weekly_cap_usd"]},
                "Agent": {"type": "object", "required": ["agent_id"]},
                "QuotaOverride": {"type": "object", "required": ["agent_id", "expires_at_ms"]},
                "Token": {"type": "object", "required": ["name", "org_id", "workspace_id", "principal_kind"]}
            }
        },
        "security": [{"bearer": []}, {"tandemToken": []}],
        "paths": {
            "/automations/v2": {
                "post": op("Create or replace an automation (validated)", Some("AutomationV2Spec"), &[AUTH, BAD, ("403", "tenant outside the token's"), ("409", "id taken by another tenant"), ("413", "body too large")]),
                "get": op("List automations of a tenant", None, &[AUTH])
            },
            "/automations/v2/{id}": {"get": op("Get an automation", None, &[AUTH, NF])},
            "/automations/v2/{id}/run_now": {"post": op("Create a queued run; returns {ok, run}", Some("RunNow"), &[AUTH, NF])},
            "/automations/v2/{id}/pause": {"post": op("Pause an automation and its running runs", Some("Reason"), &[AUTH, NF])},
            "/automations/v2/{id}/resume": {"post": op("Resume an automation", None, &[AUTH, NF])},
            "/automations/v2/{id}/runs": {"get": op("Runs of an automation (limit, cursor, status)", None, &[AUTH, NF, BAD])},
            "/automations/v2/runs": {"get": op("Runs, newest first: status, automation_id, org_id, workspace_id, limit, cursor", None, &[AUTH, BAD])},
            "/automations/v2/runs/{run_id}": {"get": op("The full AutomationV2RunRecord as {run}", None, &[AUTH, NF])},
            "/automations/v2/runs/{run_id}/gate": {"post": op("Decide the run's approval gate", Some("GateDecision"), &[AUTH, NF,
                ("400", "AUTOMATION_V2_GATE_INVALID_DECISION"),
                ("403", "AUTOMATION_V2_GATE_REQUIRES_HUMAN, ..._SELF_APPROVAL_FORBIDDEN, ..._REVIEWER_AUTHORITY_REQUIRED|DENIED"),
                ("409", "AUTOMATION_V2_RUN_NOT_AWAITING_APPROVAL (+winningDecision), AUTOMATION_V2_GATE_EXPIRED, AUTOMATION_V2_RUN_GATE_MISSING")])},
            "/automations/v2/runs/{run_id}/pause": {"post": op("Pause a queued or running run", Some("Reason"), &[AUTH, NF, ("409", "AUTOMATION_V2_RUN_NOT_PAUSABLE")])},
            "/automations/v2/runs/{run_id}/resume": {"post": op("Resume a paused run", Some("Reason"), &[AUTH, NF, ("409", "AUTOMATION_V2_RUN_NOT_PAUSED")])},
            "/automations/v2/runs/{run_id}/cancel": {"post": op("Cancel a run (200 alreadyTerminal when terminal)", Some("Reason"), &[AUTH, NF])},
            "/automations/v2/runs/{run_id}/recover": {"post": op("Requeue a paused, failed, blocked or completed-with-blocked-nodes run", Some("Reason"), &[AUTH, NF, ("409", "AUTOMATION_V2_RUN_NOT_RECOVERABLE")])},
            "/automations/v2/runs/{run_id}/tasks/{node_id}/retry": {"post": op("Reset the node and its descendants (attempts too) and requeue", Some("Reason"), &[AUTH, NF, ("409", "AUTOMATION_V2_RUN_NOT_REQUEUEABLE")])},
            "/automations/v2/runs/{run_id}/tasks/{node_id}/requeue": {"post": op("Reset the node and its descendants (attempts kept) and requeue", Some("Reason"), &[AUTH, NF, ("409", "AUTOMATION_V2_RUN_NOT_REQUEUEABLE")])},
            "/automations/v2/runs/{run_id}/tasks/{node_id}/continue": {"post": op("Reset only the node and requeue", Some("Reason"), &[AUTH, NF, ("409", "AUTOMATION_V2_RUN_NOT_REQUEUEABLE")])},
            "/approvals/pending": {"get": op("Pending approvals (spec §4.7 shape): org_id, workspace_id, limit", None, &[AUTH])},
            "/audit/verify": {"get": op("Link and verify the audit hash chain", None, &[AUTH])},
            "/admin/fleet/fail-running-runs": {"post": op("Whole-fleet stop: fail every running run (admin; body {\"confirm\": true})", None, &[AUTH])},
            "/governance/spend-caps": {
                "get": op("Weekly spend caps of a tenant", None, &[AUTH]),
                "post": op("Set a weekly spend cap (admin)", Some("SpendCap"), &[AUTH, BAD])
            },
            "/governance/spend-pauses": {
                "post": op("Pause an agent's spend (admin)", Some("Agent"), &[AUTH, BAD]),
                "delete": op("Lift an agent's spend pause (admin)", Some("Agent"), &[AUTH, BAD])
            },
            "/governance/quota-overrides": {"post": op("Create a quota override (admin)", Some("QuotaOverride"), &[AUTH, BAD])},
            "/governance/quota-overrides/{id}": {"post": op("Set a quota override's status (admin)", None, &[AUTH, BAD, NF])},
            "/auth/tokens": {"post": op("Create a tenant-bound token (admin); shown once", Some("Token"), &[AUTH, BAD])},
            "/auth/tokens/revoke": {"post": op("Revoke a token by value or hash (admin)", None, &[AUTH, BAD, NF])},
            "/auth/whoami": {"get": op("The resolved principal", None, &[AUTH])},
            "/healthz": {"get": op("Liveness", None, &[])},
            "/readyz": {"get": op("Readiness (Postgres, schema, NATS)", None, &[])},
            "/metrics": {"get": op("Prometheus metrics", None, &[])}
        }
    })
}

pub async fn openapi() -> Json<Value> {
    Json(document())
}
