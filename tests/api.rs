//! `tandem-api` as a real process against the real PostgreSQL and NATS.
//!
//! * Routes: automations (create with validation, get, list, run_now, pause, resume, runs), runs
//!   (list with filters and cursor pagination, get, pause, resume, cancel), the gate decision,
//!   pending approvals, governance, audit verification, tokens, `/openapi.json`, health.
//! * Upstream HTTP acceptance cases 38–50 (spec §6).
//! * Two api replicas racing approve vs cancel on one gate: exactly one 200 and one 409 with
//!   `winningDecision`.
//! * Malformed input (invalid JSON, wrong types, huge bodies, unknown enums, injection strings in
//!   ids and headers) → 4xx, never 5xx, and the api keeps serving.
//!
//! Runs in a given state (awaiting a gate, completed nodes) are written with the store, as the
//! scheduler would leave them; every decision goes through HTTP. Each test has its own database
//! and NATS prefix.

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tandem_core::gate::build_pending_gate;
use tandem_core::{
    AutomationRunStatus, AutomationV2RunRecord, AutomationV2Spec, Effects, ExecutionProfile,
    TenantContext,
};
use tandem_tests::procs::{EXIT_TIMEOUT, Proc, delete_streams, free_port};
use tandem_tests::{TestDb, db_now, nats_url, unique};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const ADMIN: &str = "admin-secret-token";

// ------------------------------------------------------------------------------------------------
// Harness
// ------------------------------------------------------------------------------------------------

/// A minimal HTTP/1.1 client: `(status, JSON body or the raw text as a string)`.
async fn raw_request(port: u16, head: &str, body: &[u8]) -> anyhow::Result<(u16, Value)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(head.as_bytes()).await?;
    // The server may answer (413) before reading the whole body; a reset is fine then.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .context("response timeout")??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (headers, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP response: {text:?}"))?;
    let code: u16 = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status: {headers:?}"))?;
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    Ok((code, value))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, Value)> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() || method != "GET" {
        head.push_str("Content-Type: application/json\r\n");
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    raw_request(port, &head, body).await
}

/// One api process with its own database and NATS prefix.
struct Api {
    proc: Proc,
    port: u16,
}

struct Fixture {
    db: TestDb,
    pool: Pool,
    prefix: String,
    apis: Vec<Api>,
}

impl Fixture {
    async fn start(replicas: usize) -> anyhow::Result<Self> {
        let (db, pool) = TestDb::migrated().await?;
        let prefix = unique("t");
        let mut apis = Vec::new();
        for _ in 0..replicas {
            apis.push(start_api(&db.url, &prefix, &[]).await?);
        }
        Ok(Self {
            db,
            pool,
            prefix,
            apis,
        })
    }

    fn port(&self) -> u16 {
        self.apis[0].port
    }

    /// As the admin token.
    async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        self.call(self.port(), method, path, &[], body).await
    }

    async fn call(
        &self,
        port: u16,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let auth = format!("Bearer {ADMIN}");
        let mut headers = vec![("Authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        let body = body.map(|b| b.to_string().into_bytes());
        http(port, method, path, &headers, body.as_deref()).await
    }

    /// As a token.
    async fn as_token(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let body = body.map(|b| b.to_string().into_bytes());
        http(
            self.port(),
            method,
            path,
            &[("X-Tandem-Token", token)],
            body.as_deref(),
        )
        .await
    }

    async fn token(
        &self,
        org: &str,
        ws: &str,
        kind: &str,
        actor: &str,
        reviewer: bool,
    ) -> anyhow::Result<String> {
        self.token_from(json!({"name": actor, "org_id": org, "workspace_id": ws,
                               "principal_kind": kind, "actor_id": actor,
                               "gate_reviewer": reviewer}))
            .await
    }

    /// A token from a full `POST /auth/tokens` body.
    async fn token_from(&self, request: Value) -> anyhow::Result<String> {
        let (code, body) = self.admin("POST", "/auth/tokens", Some(request)).await?;
        ensure!(code == 200, "token: {code} {body}");
        Ok(body["token"].as_str().context("token")?.to_owned())
    }

    async fn finish(self) -> anyhow::Result<()> {
        for mut api in self.apis {
            api.proc.sigterm()?;
            let status = api.proc.wait(EXIT_TIMEOUT).await?;
            ensure!(
                status.success(),
                "api exited with {status}:\n{}",
                api.proc.stderr()
            );
            ensure!(
                !api.proc.stderr().contains("panicked"),
                "api panicked:\n{}",
                api.proc.stderr()
            );
        }
        drop(self.pool);
        delete_streams(&self.prefix).await?;
        self.db.drop_db().await
    }
}

async fn start_api(db_url: &str, prefix: &str, extra: &[(&str, String)]) -> anyhow::Result<Api> {
    let port = free_port()?;
    let health = free_port()?;
    let mut env = vec![
        ("TANDEM_DATABASE_URL", db_url.to_owned()),
        ("TANDEM_NATS_URL", nats_url()),
        ("TANDEM_NATS_PREFIX", prefix.to_owned()),
        ("TANDEM_HEALTH_ADDR", format!("127.0.0.1:{health}")),
        ("TANDEM_API_ADDR", format!("127.0.0.1:{port}")),
        ("TANDEM_API_TOKEN", ADMIN.to_owned()),
        ("TANDEM_API_MAX_BODY_BYTES", "65536".to_owned()),
    ];
    env.extend(extra.iter().cloned());
    let mut proc = Proc::start("tandem-api", &[], &env)?;
    proc.wait_for_status(port, "/readyz", 200).await?;
    Ok(Api { proc, port })
}

// ------------------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------------------

fn node(id: &str, deps: &[&str]) -> Value {
    json!({"node_id": id, "agent_id": "agent", "objective": format!("do {id}"), "depends_on": deps})
}

fn gate_node(id: &str, deps: &[&str], rework: &[&str], policy: Option<Value>) -> Value {
    let mut gate = json!({"required": true, "decisions": ["approve", "rework", "cancel"],
                          "rework_targets": rework});
    if let (Some(p), Some(g)) = (policy, gate.as_object_mut()) {
        g.insert("expiry_policy".into(), p);
    }
    json!({"node_id": id, "agent_id": "reviewer", "objective": format!("review {id}"),
           "depends_on": deps, "stage_kind": "approval", "gate": gate})
}

fn automation(id: &str, nodes: Vec<Value>, tenant: Option<(&str, &str)>) -> Value {
    let mut a = json!({"automation_id": id, "name": id, "creator_id": "creator",
                       "flow": {"nodes": nodes}});
    if let (Some((o, w)), Some(obj)) = (tenant, a.as_object_mut()) {
        obj.insert(
            "metadata".into(),
            json!({"tenant_context": {"org_id": o, "workspace_id": w, "source": "explicit"}}),
        );
    }
    a
}

/// A run of `spec` as the scheduler leaves it: `done` completed (with outputs and attempts),
/// the rest pending, then the gate `gate` opened `age_ms` ago (or only pending, with no
/// `awaiting_gate`, when `open` is false).
async fn awaiting_run(
    pool: &Pool,
    spec: &AutomationV2Spec,
    done: &[&str],
    gate: &str,
    age_ms: u64,
    open: bool,
) -> anyhow::Result<AutomationV2RunRecord> {
    let run = build_awaiting(pool, spec, done, gate, age_ms, open).await?;
    tandem_store::create_run(pool, &run, &Effects::default(), &Default::default()).await?;
    Ok(run)
}

/// [`awaiting_run`] without storing it.
async fn build_awaiting(
    pool: &Pool,
    spec: &AutomationV2Spec,
    done: &[&str],
    gate: &str,
    age_ms: u64,
    open: bool,
) -> anyhow::Result<AutomationV2RunRecord> {
    let now = db_now(pool).await?;
    let at = now.saturating_sub(age_ms);
    let run_id = format!("automation-v2-run-{}", uuid::Uuid::new_v4());
    let mut run = AutomationV2RunRecord::new_queued(
        run_id,
        spec,
        "manual",
        ExecutionProfile::Strict,
        at.saturating_sub(1_000),
    );
    run.status = AutomationRunStatus::AwaitingApproval;
    run.started_at_ms = Some(at.saturating_sub(1_000));
    run.updated_at_ms = at;
    for n in done {
        run.checkpoint.pending_nodes.retain(|p| p != n);
        run.checkpoint.completed_nodes.push((*n).to_owned());
        run.checkpoint.node_outputs.insert(
            (*n).to_owned(),
            json!({"status": "completed", "node_id": n}),
        );
        run.checkpoint.node_attempts.insert((*n).to_owned(), 1);
    }
    let g = build_pending_gate(spec.node(gate).context("gate node")?, at).context("gate cfg")?;
    run.checkpoint.blocked_nodes = tandem_core::graph::descendants(spec, &[gate.to_owned()])
        .into_iter()
        .filter(|n| n != gate)
        .collect();
    if open {
        run.checkpoint.awaiting_gate = Some(g);
    }
    run.active_session_ids = vec!["session-1".into()];
    run.latest_session_id = Some("session-1".into());
    run.active_instance_ids = vec!["instance-1".into()];
    run.detail = Some(format!("awaiting approval for gate `{gate}`"));
    Ok(run)
}

async fn create_automation(fx: &Fixture, body: Value) -> anyhow::Result<AutomationV2Spec> {
    let (code, resp) = fx.admin("POST", "/automations/v2", Some(body)).await?;
    ensure!(code == 200, "create automation: {code} {resp}");
    Ok(serde_json::from_value(resp["automation"].clone())?)
}

fn gate_path(run_id: &str) -> String {
    format!("/automations/v2/runs/{run_id}/gate")
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn audit_count(pool: &Pool, event_type: &str, code: &str) -> anyhow::Result<usize> {
    let rows = tandem_store::audit_records(pool, event_type, 1000).await?;
    Ok(rows
        .iter()
        .filter(|r| code.is_empty() || r["payload"]["code"] == code)
        .count())
}

// ------------------------------------------------------------------------------------------------
// Routes
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn automations_runs_and_operator_actions() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    let port = fx.port();
    // Auth: no token → 401 JSON; X-Tandem-Token works; unknown token → 401.
    let (code, body) = http(port, "GET", "/automations/v2/runs", &[], None).await?;
    ensure!(
        code == 401 && body["code"] == "UNAUTHORIZED",
        "{code} {body}"
    );
    let (code, _) = http(
        port,
        "GET",
        "/automations/v2/runs",
        &[("X-Tandem-Token", ADMIN)],
        None,
    )
    .await?;
    ensure!(code == 200, "x-tandem-token: {code}");
    let (code, _) = http(
        port,
        "GET",
        "/automations/v2/runs",
        &[("Authorization", "Bearer nope")],
        None,
    )
    .await?;
    ensure!(code == 401, "unknown token: {code}");
    // Health and the OpenAPI document on the API port.
    let (code, _) = http(port, "GET", "/healthz", &[], None).await?;
    ensure!(code == 200);
    let (code, doc) = fx.admin("GET", "/openapi.json", None).await?;
    ensure!(code == 200 && doc["openapi"] == "3.1.0", "{code}");
    ensure!(doc["paths"]["/automations/v2/runs/{run_id}/gate"].is_object());

    // Create, get, list, replace.
    let spec = create_automation(
        &fx,
        automation("auto-ops", vec![node("a", &[]), node("b", &["a"])], None),
    )
    .await?;
    ensure!(spec.created_at_ms > 0 && spec.updated_at_ms >= spec.created_at_ms);
    let (code, got) = fx.admin("GET", "/automations/v2/auto-ops", None).await?;
    ensure!(
        code == 200 && got["automation"]["automation_id"] == "auto-ops",
        "{got}"
    );
    let (code, list) = fx.admin("GET", "/automations/v2", None).await?;
    ensure!(code == 200 && list["count"] == 1, "{list}");
    let (code, again) = fx
        .admin(
            "POST",
            "/automations/v2",
            Some(automation(
                "auto-ops",
                vec![node("a", &[]), node("b", &["a"])],
                None,
            )),
        )
        .await?;
    ensure!(code == 200 && again["created"] == false, "{again}");
    let (code, missing) = fx.admin("GET", "/automations/v2/nope", None).await?;
    ensure!(
        code == 404 && missing["code"] == "AUTOMATION_V2_NOT_FOUND",
        "{missing}"
    );

    // run_now: a queued run with every node pending; it is listed and readable.
    let mut run_ids = Vec::new();
    for _ in 0..5 {
        let (code, r) = fx
            .admin(
                "POST",
                "/automations/v2/auto-ops/run_now",
                Some(json!({"reason": "test"})),
            )
            .await?;
        ensure!(code == 200 && r["ok"] == true, "run_now: {code} {r}");
        ensure!(r["run"]["status"] == "queued", "{r}");
        ensure!(strs(&r["run"]["checkpoint"]["pending_nodes"]) == ["a", "b"]);
        let id = r["run"]["run_id"].as_str().context("run_id")?.to_owned();
        ensure!(id.starts_with("automation-v2-run-"));
        run_ids.push(id);
    }
    let (code, one) = fx
        .admin("GET", &format!("/automations/v2/runs/{}", run_ids[0]), None)
        .await?;
    ensure!(
        code == 200 && one["run"]["run_id"] == run_ids[0].as_str(),
        "{one}"
    );
    ensure!(one["run"]["checkpoint"]["lifecycle_history"].is_array());
    // Pagination: 2 + 2 + 1, newest first, no duplicates.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/automations/v2/runs?limit=2&cursor={c}"),
            None => "/automations/v2/runs?limit=2".to_owned(),
        };
        let (code, page) = fx.admin("GET", &path, None).await?;
        ensure!(code == 200, "{page}");
        for r in page["runs"].as_array().context("runs")? {
            seen.push(r["run_id"].as_str().context("id")?.to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    ensure!(seen.len() == 5 && sorted.len() == 5, "pages: {seen:?}");
    let (_, by_auto) = fx
        .admin("GET", "/automations/v2/auto-ops/runs", None)
        .await?;
    ensure!(by_auto["count"] == 5, "{by_auto}");
    let (_, filtered) = fx
        .admin("GET", "/automations/v2/runs?status=completed", None)
        .await?;
    ensure!(filtered["count"] == 0, "{filtered}");
    let (code, bad) = fx
        .admin("GET", "/automations/v2/runs?status=exploded", None)
        .await?;
    ensure!(code == 400 && bad["path"] == "status", "{code} {bad}");

    // Operator actions and their codes.
    let r0 = &run_ids[0];
    let (code, p) = fx
        .admin(
            "POST",
            &format!("/automations/v2/runs/{r0}/pause"),
            Some(json!({"reason": "hold"})),
        )
        .await?;
    ensure!(code == 200 && p["run"]["status"] == "paused", "{p}");
    let (code, p2) = fx
        .admin("POST", &format!("/automations/v2/runs/{r0}/pause"), None)
        .await?;
    ensure!(
        code == 409 && p2["code"] == "AUTOMATION_V2_RUN_NOT_PAUSABLE",
        "{code} {p2}"
    );
    let (code, r) = fx
        .admin("POST", &format!("/automations/v2/runs/{r0}/resume"), None)
        .await?;
    ensure!(code == 200 && r["run"]["status"] == "queued", "{r}");
    let (code, r2) = fx
        .admin("POST", &format!("/automations/v2/runs/{r0}/resume"), None)
        .await?;
    ensure!(
        code == 409 && r2["code"] == "AUTOMATION_V2_RUN_NOT_PAUSED",
        "{code} {r2}"
    );
    let (code, c) = fx
        .admin(
            "POST",
            &format!("/automations/v2/runs/{r0}/cancel"),
            Some(json!({"reason": "stop"})),
        )
        .await?;
    ensure!(code == 200 && c["run"]["status"] == "cancelled", "{c}");
    ensure!(c["run"]["stop_kind"] == "operator_stopped", "{c}");
    let (code, c2) = fx
        .admin("POST", &format!("/automations/v2/runs/{r0}/cancel"), None)
        .await?;
    ensure!(code == 200 && c2["alreadyTerminal"] == true, "{c2}");
    let (code, nf) = fx
        .admin("POST", "/automations/v2/runs/nope/cancel", None)
        .await?;
    ensure!(
        code == 404 && nf["code"] == "AUTOMATION_V2_RUN_NOT_FOUND",
        "{nf}"
    );
    // Gate decision on a run that never had a gate: 409 without a winner.
    let (code, g) = fx
        .admin(
            "POST",
            &gate_path(&run_ids[1]),
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 409 && g["code"] == "AUTOMATION_V2_RUN_NOT_AWAITING_APPROVAL",
        "{g}"
    );
    ensure!(g["currentStatus"] == "queued" && g.get("winningDecision").is_none());

    // Automation pause / resume.
    let (code, ap) = fx
        .admin("POST", "/automations/v2/auto-ops/pause", None)
        .await?;
    ensure!(
        code == 200 && ap["automation"]["status"] == "paused",
        "{ap}"
    );
    let (code, ar) = fx
        .admin("POST", "/automations/v2/auto-ops/resume", None)
        .await?;
    ensure!(
        code == 200 && ar["automation"]["status"] == "active",
        "{ar}"
    );

    // The operator actions' lifecycle records and events committed; the outbox is relayed.
    let client = fx.pool.get().await?;
    let unpublished: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await?
        .get(0);
    ensure!(unpublished == 0, "{unpublished} outbox rows not relayed");
    drop(client);
    fx.finish().await
}

#[tokio::test]
async fn validation_errors_name_the_json_path() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    let cases: Vec<(Value, &str)> = vec![
        (
            automation("v1", vec![node("a", &[]), node("a", &[])], None),
            "flow.nodes[1].node_id",
        ),
        (
            automation("v2", vec![node("a", &["ghost"])], None),
            "flow.nodes[0].depends_on[0]",
        ),
        (
            automation("v3", vec![node("a", &["b"]), node("b", &["a"])], None),
            "flow.nodes",
        ),
        (
            automation(
                "v4",
                vec![json!({"node_id": "g", "stage_kind": "approval"})],
                None,
            ),
            "flow.nodes[0].gate",
        ),
        (
            automation(
                "v5",
                vec![json!({"node_id": "a", "stage_kind": "teleport"})],
                None,
            ),
            "flow.nodes[0].stage_kind",
        ),
        (
            json!({"automation_id": "v6", "status": "sleeping", "flow": {"nodes": []}}),
            "status",
        ),
        (
            automation(
                "v7",
                vec![
                    node("a", &[]),
                    gate_node(
                        "g",
                        &["a"],
                        &["a"],
                        Some(json!({"expires_after_ms": -5, "on_expiry": "cancel"})),
                    ),
                ],
                None,
            ),
            "flow.nodes[1].gate.expiry_policy.expires_after_ms",
        ),
        (
            automation(
                "v8",
                vec![
                    node("a", &[]),
                    gate_node(
                        "g",
                        &["a"],
                        &["a"],
                        Some(json!({"expires_after_ms": 5, "on_expiry": "explode"})),
                    ),
                ],
                None,
            ),
            "flow.nodes[1].gate.expiry_policy.on_expiry",
        ),
        (
            automation(
                "v9",
                vec![node("a", &[]), gate_node("g", &["a"], &["zzz"], None)],
                None,
            ),
            "flow.nodes[1].gate.rework_targets[0]",
        ),
        (
            json!({"automation_id": "v10", "execution": {"max_total_cost_usd": -1},
                   "flow": {"nodes": []}}),
            "execution.max_total_cost_usd",
        ),
        (
            json!({"automation_id": "v11", "flow": {"nodes": [
                {"node_id": "a", "retry_policy": {"max_attempts": 0}}]}}),
            "flow.nodes[0].retry_policy.max_attempts",
        ),
        (
            json!({"automation_id": "", "flow": {"nodes": []}}),
            "automation_id",
        ),
        (json!({"automation_id": 7}), "automation_id"),
        (
            json!({"automation_id": "v14", "flow": {"nodes": [{"node_id": "a", "depends_on": "x"}]}}),
            "flow.nodes[0].depends_on",
        ),
    ];
    for (body, want_path) in cases {
        let (code, resp) = fx
            .admin("POST", "/automations/v2", Some(body.clone()))
            .await?;
        ensure!(code == 400, "{body} → {code} {resp}");
        let path = resp["path"].as_str().unwrap_or_default();
        ensure!(
            path.starts_with(want_path),
            "{body}: path {path:?}, want {want_path:?} ({resp})"
        );
        ensure!(resp["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // None of them was stored.
    let (_, list) = fx.admin("GET", "/automations/v2", None).await?;
    ensure!(list["count"] == 0, "{list}");
    fx.finish().await
}

// ------------------------------------------------------------------------------------------------
// Gate decisions: upstream HTTP cases 38–50
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn gate_cases_38_to_42_and_49() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    // 38: rework clears downstream outputs and requeues the subtree.
    let spec = create_automation(
        &fx,
        automation(
            "auto-38",
            vec![
                node("draft", &[]),
                node("review", &["draft"]),
                gate_node("approval", &["review"], &["draft"], None),
                node("send", &["approval"]),
            ],
            None,
        ),
    )
    .await?;
    let run = awaiting_run(
        &fx.pool,
        &spec,
        &["draft", "review"],
        "approval",
        1_000,
        true,
    )
    .await?;
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "rework", "reason": "redo"})),
        )
        .await?;
    ensure!(code == 200 && body["ok"] == true, "38: {code} {body}");
    let r = &body["run"];
    ensure!(r["status"] == "queued", "38: {r}");
    ensure!(
        strs(&r["checkpoint"]["completed_nodes"]).is_empty(),
        "38: {r}"
    );
    let pending = strs(&r["checkpoint"]["pending_nodes"]);
    for n in ["draft", "review", "approval"] {
        ensure!(pending.contains(&n.to_owned()), "38 pending {pending:?}");
    }
    ensure!(r["checkpoint"]["node_outputs"].get("draft").is_none());
    ensure!(r["checkpoint"]["node_outputs"].get("review").is_none());
    ensure!(r["checkpoint"]["gate_history"][0]["decision"] == "rework");

    // 39: rework on a branched flow keeps the completed sibling branch.
    let spec = create_automation(
        &fx,
        automation(
            "auto-39",
            vec![
                node("research", &[]),
                node("analysis", &["research"]),
                node("draft", &["research"]),
                gate_node("publish", &["analysis", "draft"], &["draft"], None),
            ],
            None,
        ),
    )
    .await?;
    let run = awaiting_run(
        &fx.pool,
        &spec,
        &["research", "analysis", "draft"],
        "publish",
        1_000,
        true,
    )
    .await?;
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "rework"})),
        )
        .await?;
    ensure!(code == 200, "39: {code} {body}");
    let r = &body["run"];
    let cp = &r["checkpoint"];
    let completed = strs(&cp["completed_nodes"]);
    let pending = strs(&cp["pending_nodes"]);
    ensure!(r["status"] == "queued");
    ensure!(
        completed.contains(&"research".to_owned()) && completed.contains(&"analysis".to_owned()),
        "39 completed {completed:?}"
    );
    ensure!(
        cp["node_outputs"].get("research").is_some()
            && cp["node_outputs"].get("analysis").is_some()
    );
    ensure!(
        pending.contains(&"draft".to_owned()) && pending.contains(&"publish".to_owned()),
        "39 pending {pending:?}"
    );
    ensure!(!pending.contains(&"analysis".to_owned()));
    ensure!(!completed.contains(&"draft".to_owned()) && !completed.contains(&"publish".to_owned()));
    ensure!(
        strs(&cp["blocked_nodes"]) == ["publish"],
        "39 blocked {}",
        cp["blocked_nodes"]
    );
    ensure!(cp.get("awaiting_gate").is_none());
    ensure!(cp["node_attempts"].get("draft").is_none());
    ensure!(
        strs(&r["active_session_ids"]).is_empty() && strs(&r["active_instance_ids"]).is_empty()
    );
    ensure!(r.get("latest_session_id").is_none());

    // 40: the gate is recovered from the pending node when `awaiting_gate` is missing.
    let spec = create_automation(
        &fx,
        automation(
            "auto-40",
            vec![
                node("draft", &[]),
                gate_node("approval", &["draft"], &["draft"], None),
            ],
            None,
        ),
    )
    .await?;
    let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, false).await?;
    // The pending list recovers it too (case 51).
    let (_, pend) = fx.admin("GET", "/approvals/pending", None).await?;
    let listed = pend["approvals"]
        .as_array()
        .context("approvals")?
        .iter()
        .any(|a| a["run_id"] == run.run_id.as_str() && a["node_id"] == "approval");
    ensure!(listed, "40/51: recovered gate not listed: {pend}");
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(code == 200, "40: {code} {body}");
    let cp = &body["run"]["checkpoint"];
    ensure!(cp.get("awaiting_gate").is_none());
    ensure!(strs(&cp["completed_nodes"]).contains(&"approval".to_owned()));
    ensure!(cp["node_outputs"]["approval"]["status"] == "completed");
    ensure!(cp["node_outputs"]["approval"]["contract_kind"] == "approval_gate");

    // 41: a decision on a queued run with an approve in history → 409 with winningDecision.
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "cancel"})),
        )
        .await?;
    ensure!(code == 409, "41: {code} {body}");
    ensure!(body["code"] == "AUTOMATION_V2_RUN_NOT_AWAITING_APPROVAL");
    ensure!(body["runID"] == run.run_id.as_str() && body["currentStatus"] == "queued");
    let w = &body["winningDecision"];
    ensure!(
        w["decision"] == "approve" && w["node_id"] == "approval",
        "41: {body}"
    );
    ensure!(w["decided_at_ms"].as_u64().is_some() && w.get("reason").is_some());

    // 49: the decider is recorded as a human; the decision event is published (outbox relayed).
    let spec38: AutomationV2Spec = spec.clone();
    let run = awaiting_run(&fx.pool, &spec38, &["draft"], "approval", 1_000, true).await?;
    let (code, body) = fx
        .call(
            fx.port(),
            "POST",
            &gate_path(&run.run_id),
            &[("x-tandem-actor-id", "alice")],
            Some(json!({"decision": " APPROVE ", "reason": "  looks good "})),
        )
        .await?;
    ensure!(code == 200, "49: {code} {body}");
    let rec = &body["run"]["checkpoint"]["gate_history"][0];
    ensure!(
        rec["decided_by"]["kind"] == "human" && rec["decided_by"]["actor_id"] == "alice",
        "{rec}"
    );
    ensure!(
        rec["reason"] == "looks good" && rec["decision"] == "approve",
        "{rec}"
    );
    let client = fx.pool.get().await?;
    let published: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE run_id = $1
                AND event_type = 'approval.decision.recorded' AND published_at IS NOT NULL",
            &[&run.run_id],
        )
        .await?
        .get(0);
    ensure!(published == 1, "decision event published: {published}");
    drop(client);
    ensure!(audit_count(&fx.pool, "automation.governance.gate_decided", "").await? >= 2);

    // Invalid decision → 400; expired cancel-policy gate → 409 GATE_EXPIRED with denial audit.
    let run = awaiting_run(&fx.pool, &spec38, &["draft"], "approval", 1_000, true).await?;
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "maybe"})),
        )
        .await?;
    ensure!(
        code == 400 && body["code"] == "AUTOMATION_V2_GATE_INVALID_DECISION",
        "{code} {body}"
    );
    let (code, body) = fx
        .admin("POST", &gate_path(&run.run_id), Some(json!({})))
        .await?;
    ensure!(code == 400, "missing decision: {code} {body}");
    let spec_exp = create_automation(
        &fx,
        automation(
            "auto-exp",
            vec![
                node("draft", &[]),
                gate_node(
                    "approval",
                    &["draft"],
                    &["draft"],
                    Some(json!({"expires_after_ms": 5_000, "on_expiry": "cancel"})),
                ),
            ],
            None,
        ),
    )
    .await?;
    let run = awaiting_run(&fx.pool, &spec_exp, &["draft"], "approval", 60_000, true).await?;
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 409 && body["code"] == "AUTOMATION_V2_GATE_EXPIRED",
        "{code} {body}"
    );
    ensure!(
        audit_count(
            &fx.pool,
            "automation.governance.gate_decision_denied",
            "AUTOMATION_V2_GATE_EXPIRED"
        )
        .await?
            == 1
    );

    // 42: approve and cancel in parallel over HTTP: one 200, one 409 with the winner.
    for _ in 0..5 {
        let run = awaiting_run(&fx.pool, &spec38, &["draft"], "approval", 1_000, true).await?;
        let path = gate_path(&run.run_id);
        let (a, b) = tokio::join!(
            fx.admin("POST", &path, Some(json!({"decision": "approve"}))),
            fx.admin("POST", &path, Some(json!({"decision": "cancel"}))),
        );
        check_race(&fx.pool, &run.run_id, a?, b?).await?;
    }
    fx.finish().await
}

/// Exactly one 200 and one 409 with `winningDecision` naming the winner; one history record.
async fn check_race(
    pool: &Pool,
    run_id: &str,
    a: (u16, Value),
    b: (u16, Value),
) -> anyhow::Result<()> {
    let mut codes = [a.0, b.0];
    codes.sort_unstable();
    ensure!(
        codes == [200, 409],
        "race: {} {} / {} {}",
        a.0,
        a.1,
        b.0,
        b.1
    );
    let (winner, loser) = if a.0 == 200 { (a.1, b.1) } else { (b.1, a.1) };
    ensure!(
        loser["code"] == "AUTOMATION_V2_RUN_NOT_AWAITING_APPROVAL",
        "{loser}"
    );
    let won = winner["run"]["checkpoint"]["gate_history"][0]["decision"].clone();
    ensure!(
        loser["winningDecision"]["decision"] == won,
        "loser names {} but {won} won",
        loser["winningDecision"]
    );
    let run = tandem_store::get_run(pool, run_id).await?;
    ensure!(
        run.checkpoint.gate_history.len() == 1,
        "history: {:?}",
        run.checkpoint.gate_history
    );
    ensure!(run.checkpoint.awaiting_gate.is_none() || run.status == AutomationRunStatus::Cancelled);
    Ok(())
}

#[tokio::test]
async fn gate_authorization_cases_43_to_48_and_50() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    let tenant_a = ("org-a", "ws-a");
    let governed = |id: &str, tenant: Option<(&str, &str)>| {
        let mut g = gate_node("approval", &["draft"], &["draft"], None);
        if let Some(o) = g.as_object_mut() {
            o.insert(
                "metadata".into(),
                json!({"approval": {"metadata": {"risk_tier": "elevated",
                                                 "reviewer_eligibility": {"role": "admin"}}}}),
            );
        }
        automation(id, vec![node("draft", &[]), g], tenant)
    };
    // 43: a request in an agent's context cannot decide; denial audited; nothing changes.
    let plain = create_automation(
        &fx,
        automation(
            "auto-43",
            vec![
                node("draft", &[]),
                gate_node("approval", &["draft"], &["draft"], None),
            ],
            None,
        ),
    )
    .await?;
    let run = awaiting_run(&fx.pool, &plain, &["draft"], "approval", 1_000, true).await?;
    let (code, body) = fx
        .call(
            fx.port(),
            "POST",
            &gate_path(&run.run_id),
            &[
                ("x-tandem-request-source", "agent"),
                ("x-tandem-agent-id", "bot-1"),
            ],
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 403 && body["code"] == "AUTOMATION_V2_GATE_REQUIRES_HUMAN",
        "43: {code} {body}"
    );
    let stored = tandem_store::get_run(&fx.pool, &run.run_id).await?;
    ensure!(stored.status == AutomationRunStatus::AwaitingApproval);
    ensure!(stored.checkpoint.gate_history.is_empty());
    let denials =
        tandem_store::audit_records(&fx.pool, "automation.governance.gate_decision_denied", 10)
            .await?;
    ensure!(
        denials.iter().any(
            |d| d["payload"]["code"] == "AUTOMATION_V2_GATE_REQUIRES_HUMAN"
                && d["payload"]["nodeID"].is_null()
                && d["actor"] == "bot-1"
        ),
        "43 audit: {denials:?}"
    );
    // An agent token of the tenant: same 403.
    let agent = fx
        .token("local", "local", "agent", "agent-7", false)
        .await?;
    let (code, body) = fx
        .as_token(
            &agent,
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 403 && body["code"] == "AUTOMATION_V2_GATE_REQUIRES_HUMAN",
        "{code} {body}"
    );

    // 44: requester == decider on a governed gate → self-approval forbidden, audited.
    let gov = create_automation(&fx, governed("auto-44", Some(tenant_a))).await?;
    let mut run44 = build_awaiting(&fx.pool, &gov, &["draft"], "approval", 1_000, false).await?;
    run44.tenant_context.actor_id = Some("carol".into());
    run44.checkpoint.awaiting_gate =
        build_pending_gate(gov.node("approval").context("node")?, run44.updated_at_ms);
    tandem_store::create_run(&fx.pool, &run44, &Effects::default(), &Default::default()).await?;
    let carol = fx.token("org-a", "ws-a", "human", "carol", true).await?;
    let (code, body) = fx
        .as_token(
            &carol,
            "POST",
            &gate_path(&run44.run_id),
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 403 && body["code"] == "AUTOMATION_V2_GATE_SELF_APPROVAL_FORBIDDEN",
        "44: {code} {body}"
    );
    let d = tandem_store::audit_records(&fx.pool, "automation.governance.gate_decision_denied", 20)
        .await?;
    ensure!(
        d.iter().any(
            |r| r["payload"]["code"] == "AUTOMATION_V2_GATE_SELF_APPROVAL_FORBIDDEN"
                && r["payload"]["automationID"] == "auto-44"
        ),
        "44 audit"
    );
    // 45: requester `channel:slack:U123`, decider U123 via slack → self-approval too.
    let mut run45 = run44.clone();
    run45.run_id = format!("automation-v2-run-{}", uuid::Uuid::new_v4());
    run45.tenant_context.actor_id = Some("channel:slack:U123".into());
    tandem_store::create_run(&fx.pool, &run45, &Effects::default(), &Default::default()).await?;
    let (code, body) = fx
        .call(
            fx.port(),
            "POST",
            &gate_path(&run45.run_id),
            &[
                ("x-tandem-channel", "slack"),
                ("x-tandem-channel-user", "U123"),
            ],
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 403 && body["code"] == "AUTOMATION_V2_GATE_SELF_APPROVAL_FORBIDDEN",
        "45: {code} {body}"
    );
    // 46: no verified context (the unscoped admin token) → reviewer authority required.
    let (code, body) = fx
        .call(
            fx.port(),
            "POST",
            &gate_path(&run45.run_id),
            &[("x-tandem-actor-id", "dave")],
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 403 && body["code"] == "AUTOMATION_V2_GATE_REVIEWER_AUTHORITY_REQUIRED",
        "46: {code} {body}"
    );
    // A verified reviewer without authority (a tenant admin, so step 4 passes) → denied.
    let erin = fx
        .token_from(
            json!({"name": "erin", "org_id": "org-a", "workspace_id": "ws-a",
                           "principal_kind": "human", "actor_id": "erin",
                           "tenant_admin": true}),
        )
        .await?;
    let (code, body) = fx
        .as_token(
            &erin,
            "POST",
            &gate_path(&run45.run_id),
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 403 && body["code"] == "AUTOMATION_V2_GATE_REVIEWER_AUTHORITY_DENIED",
        "{code} {body}"
    );
    // 47: a channel-verified reviewer (U999 on slack) → ok.
    let (code, body) = fx
        .call(
            fx.port(),
            "POST",
            &gate_path(&run45.run_id),
            &[
                ("x-tandem-channel", "slack"),
                ("x-tandem-channel-user", "U999"),
            ],
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 200 && body["run"]["status"] == "queued",
        "47: {code} {body}"
    );
    let h = &body["run"]["checkpoint"]["gate_history"];
    ensure!(h.as_array().map(Vec::len) == Some(1), "47: {h}");
    ensure!(h[0]["decided_by"]["source"] == "slack");
    // 48: a verified reviewer with authority → ok.
    let frank = fx.token("org-a", "ws-a", "human", "frank", true).await?;
    let (code, body) = fx
        .as_token(
            &frank,
            "POST",
            &gate_path(&run44.run_id),
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 200 && body["run"]["status"] == "queued",
        "48: {code} {body}"
    );

    // 50: tenant B cannot see tenant A's automation or runs: 404 everywhere.
    let bob = fx.token("org-b", "ws-b", "human", "bob", true).await?;
    let run50 = awaiting_run(&fx.pool, &gov, &["draft"], "approval", 1_000, true).await?;
    let r = &run50.run_id;
    for (method, path, body) in [
        ("POST", gate_path(r), Some(json!({"decision": "approve"}))),
        ("GET", format!("/automations/v2/runs/{r}"), None),
        ("POST", format!("/automations/v2/runs/{r}/pause"), None),
        ("POST", format!("/automations/v2/runs/{r}/resume"), None),
        ("POST", format!("/automations/v2/runs/{r}/cancel"), None),
        ("GET", "/automations/v2/auto-44".to_owned(), None),
        ("POST", "/automations/v2/auto-44/run_now".to_owned(), None),
        ("GET", "/automations/v2/auto-44/runs".to_owned(), None),
        ("POST", "/automations/v2/auto-44/pause".to_owned(), None),
    ] {
        let (code, resp) = fx.as_token(&bob, method, &path, body).await?;
        ensure!(code == 404, "50: {method} {path} → {code} {resp}");
    }
    let (_, list) = fx
        .as_token(&bob, "GET", "/automations/v2/runs", None)
        .await?;
    ensure!(list["count"] == 0, "50 list: {list}");
    let (_, pend) = fx.as_token(&bob, "GET", "/approvals/pending", None).await?;
    ensure!(pend["count"] == 0, "50 pending: {pend}");
    // Headers cannot widen a tenant token.
    let (code, _) = http(
        fx.port(),
        "GET",
        "/automations/v2/runs",
        &[("X-Tandem-Token", &bob), ("x-tandem-org-id", "org-a")],
        None,
    )
    .await?;
    ensure!(code == 403, "tenant header widening: {code}");
    // Tenant A's human sees the run; still awaiting after all of B's attempts.
    let (code, got) = fx
        .as_token(&frank, "GET", &format!("/automations/v2/runs/{r}"), None)
        .await?;
    ensure!(
        code == 200 && got["run"]["status"] == "awaiting_approval",
        "{code} {got}"
    );
    // Only the admin creates tokens.
    let (code, _) = fx
        .as_token(
            &frank,
            "POST",
            "/auth/tokens",
            Some(json!({"name": "x", "org_id": "org-b", "workspace_id": "ws-b", "principal_kind": "human"})),
        )
        .await?;
    ensure!(code == 403, "token creation by a tenant token: {code}");
    fx.finish().await
}

// ------------------------------------------------------------------------------------------------
// Pending approvals
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn pending_approvals_list_every_awaiting_run() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    let spec = create_automation(
        &fx,
        automation(
            "auto-pending",
            vec![
                node("draft", &[]),
                gate_node(
                    "approval",
                    &["draft"],
                    &["draft"],
                    Some(json!({"expires_after_ms": 3_600_000, "on_expiry": "cancel",
                                "remind_every_ms": 60_000})),
                ),
            ],
            None,
        ),
    )
    .await?;
    // One old awaiting run with a notification key, behind 520 newer runs (upstream's
    // aggregator only walks the 500 newest).
    let mut old = build_awaiting(&fx.pool, &spec, &["draft"], "approval", 3_000_000, false).await?;
    let key = format!("automation_v2:{}:approval:reminder:1", old.run_id);
    let mut gate = build_pending_gate(spec.node("approval").context("node")?, old.updated_at_ms)
        .context("gate")?;
    gate.metadata =
        Some(json!({"gate_policy_state": {"notification_key": key, "reminder_count": 1}}));
    old.checkpoint.awaiting_gate = Some(gate);
    old.created_at_ms = 1;
    tandem_store::create_run(&fx.pool, &old, &Effects::default(), &Default::default()).await?;
    for _ in 0..520 {
        let (code, _) = fx
            .admin("POST", "/automations/v2/auto-pending/run_now", None)
            .await?;
        ensure!(code == 200);
    }
    let newer = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
    let (code, body) = fx
        .admin("GET", "/approvals/pending?limit=500", None)
        .await?;
    ensure!(code == 200, "{body}");
    let approvals = body["approvals"].as_array().context("approvals")?;
    let ids: Vec<&str> = approvals
        .iter()
        .filter_map(|a| a["run_id"].as_str())
        .collect();
    ensure!(ids.contains(&old.run_id.as_str()), "blind spot: {ids:?}");
    ensure!(ids.contains(&newer.run_id.as_str()));
    // Newest gate first.
    ensure!(ids.first() == Some(&newer.run_id.as_str()), "{ids:?}");
    let a = approvals
        .iter()
        .find(|a| a["run_id"] == old.run_id.as_str())
        .context("old")?;
    ensure!(a["request_id"] == format!("automation_v2:{}:approval", old.run_id).as_str());
    ensure!(a["source"] == "automation_v2");
    let sp = &a["surface_payload"];
    ensure!(
        sp["decide_endpoint"] == gate_path(&old.run_id).as_str(),
        "{sp}"
    );
    ensure!(sp["notification_key"] == key.as_str(), "{sp}");
    let requested = a["requested_at_ms"].as_u64().context("requested")?;
    ensure!(
        a["expires_at_ms"].as_u64() == Some(requested + 3_600_000),
        "{a}"
    );
    ensure!(
        strs(&a["decisions"]) == ["approve", "rework", "cancel"],
        "{a}"
    );
    // limit.
    let (_, one) = fx.admin("GET", "/approvals/pending?limit=1", None).await?;
    ensure!(one["count"] == 1 && one["total"] == 2, "{one}");
    fx.finish().await
}

// ------------------------------------------------------------------------------------------------
// Two replicas
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn two_replicas_race_approve_vs_cancel() -> anyhow::Result<()> {
    let fx = Fixture::start(2).await?;
    let spec = create_automation(
        &fx,
        automation(
            "auto-race",
            vec![
                node("draft", &[]),
                gate_node("approval", &["draft"], &["draft"], None),
            ],
            None,
        ),
    )
    .await?;
    let (p1, p2) = (fx.apis[0].port, fx.apis[1].port);
    let mut winners = std::collections::BTreeMap::new();
    for i in 0..20 {
        let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
        let path = gate_path(&run.run_id);
        // Alternate which replica gets which decision.
        let (pa, pb) = if i % 2 == 0 { (p1, p2) } else { (p2, p1) };
        let (a, b) = tokio::join!(
            fx.call(pa, "POST", &path, &[], Some(json!({"decision": "approve"}))),
            fx.call(pb, "POST", &path, &[], Some(json!({"decision": "cancel"}))),
        );
        let (a, b) = (a?, b?);
        let won = if a.0 == 200 { "approve" } else { "cancel" };
        *winners.entry(won).or_insert(0) += 1;
        check_race(&fx.pool, &run.run_id, a, b).await?;
    }
    eprintln!("race winners: {winners:?}");
    fx.finish().await
}

// ------------------------------------------------------------------------------------------------
// Malformed input
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_input_is_4xx_and_the_api_keeps_serving() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    let spec = create_automation(
        &fx,
        automation(
            "auto-bad",
            vec![
                node("draft", &[]),
                gate_node("approval", &["draft"], &["draft"], None),
            ],
            None,
        ),
    )
    .await?;
    let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
    let gp = gate_path(&run.run_id);
    let port = fx.port();
    let auth = format!("Bearer {ADMIN}");
    let a = [("Authorization", auth.as_str())];
    let huge = vec![b'a'; 200_000];
    let mut huge_json = b"{\"automation_id\":\"x\",\"name\":\"".to_vec();
    huge_json.extend(std::iter::repeat_n(b'a', 100_000));
    huge_json.extend(b"\"}");
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let bodies: Vec<(&str, String, Vec<u8>)> = vec![
        ("POST", "/automations/v2".into(), b"{not json".to_vec()),
        ("POST", "/automations/v2".into(), b"[]".to_vec()),
        ("POST", "/automations/v2".into(), b"null".to_vec()),
        ("POST", "/automations/v2".into(), b"\"str\"".to_vec()),
        ("POST", "/automations/v2".into(), huge.clone()),
        ("POST", "/automations/v2".into(), huge_json),
        ("POST", "/automations/v2".into(), deep.into_bytes()),
        ("POST", "/automations/v2".into(), br#"{"automation_id":"a\u0000b"}"#.to_vec()),
        ("POST", "/automations/v2".into(), br#"{"automation_id":"ok","flow":{"nodes":[{"node_id":"x\u0000"}]}}"#.to_vec()),
        ("POST", "/automations/v2".into(), br#"{"automation_id":"ok","flow":"nodes"}"#.to_vec()),
        ("POST", "/automations/v2".into(), br#"{"automation_id":"ok","flow":{"nodes":[{"node_id":"a","timeout_ms":1e400}]}}"#.to_vec()),
        ("POST", "/automations/v2".into(), br#"{"automation_id":"ok","created_at_ms":-1}"#.to_vec()),
        ("POST", "/automations/v2".into(), br#"{"automation_id":"ok","created_at_ms":18446744073709551615}"#.to_vec()),
        ("POST", "/automations/v2".into(), br#"{"automation_id":"ok","metadata":{"tenant_context":{"org_id":1}}}"#.to_vec()),
        ("POST", "/automations/v2".into(), br#"{"automation_id":"ok","metadata":{"tenant_context":{"org_id":"o","workspace_id":"w","source":"alien"}}}"#.to_vec()),
        ("POST", gp.clone(), br#"{"decision": 5}"#.to_vec()),
        ("POST", gp.clone(), br#"{"decision": ["approve"]}"#.to_vec()),
        ("POST", gp.clone(), br#"{"decision": "approve", "reason": {"x": 1}}"#.to_vec()),
        ("POST", gp.clone(), br#"{"decision": "'; DROP TABLE runs; --"}"#.to_vec()),
        ("POST", gp.clone(), br#"{"decision": "approve", "requested_at_ms": -3}"#.to_vec()),
        ("POST", gp.clone(), br#"{"decision": "approve", "node_id": "x\u0000"}"#.to_vec()),
        ("POST", gp.clone(), huge.clone()),
        ("POST", "/automations/v2/runs/%00/gate".into(), br#"{"decision":"approve"}"#.to_vec()),
        ("POST", "/automations/v2/runs/'%20OR%201=1--/gate".into(), br#"{"decision":"approve"}"#.to_vec()),
        ("POST", "/automations/v2/runs/%ff%fe/cancel".into(), Vec::new()),
        ("GET", "/automations/v2/runs?limit=-1".into(), Vec::new()),
        ("GET", "/automations/v2/runs?limit=abc".into(), Vec::new()),
        ("GET", "/automations/v2/runs?limit=0".into(), Vec::new()),
        ("GET", "/automations/v2/runs?status=%00".into(), Vec::new()),
        ("GET", "/automations/v2/runs?cursor=zzz".into(), Vec::new()),
        ("GET", "/automations/v2/runs?cursor=1:%00".into(), Vec::new()),
        ("GET", "/automations/v2/runs?automation_id=%00".into(), Vec::new()),
        ("GET", "/approvals/pending?limit=99999999999999999999999".into(), Vec::new()),
        ("POST", "/automations/v2/auto-bad/run_now".into(), br#"{"execution_profile":"turbo"}"#.to_vec()),
        ("POST", format!("/automations/v2/runs/{}/pause", run.run_id), br#"{"reason": 12}"#.to_vec()),
        ("POST", "/governance/spend-caps".into(), br#"{"agent_id":"a","weekly_cap_usd":-3}"#.to_vec()),
        ("POST", "/governance/spend-caps".into(), br#"{"agent_id":"a","weekly_cap_usd":"lots"}"#.to_vec()),
        ("POST", "/governance/quota-overrides".into(), br#"{"agent_id":"a","expires_at_ms":1,"status":"maybe"}"#.to_vec()),
        ("POST", "/governance/quota-overrides/not-a-uuid".into(), br#"{"status":"approved"}"#.to_vec()),
        ("POST", "/auth/tokens".into(), br#"{"name":"x","org_id":"o","workspace_id":"w","principal_kind":"robot"}"#.to_vec()),
        ("DELETE", "/automations/v2".into(), Vec::new()),
        ("GET", "/no/such/route".into(), Vec::new()),
    ];
    for (method, path, body) in &bodies {
        let (code, resp) = http(port, method, path, &a, Some(body)).await?;
        ensure!(
            (400..500).contains(&code),
            "{method} {path} ({} bytes) → {code} {resp}",
            body.len()
        );
        ensure!(
            resp["code"].is_string() && resp["error"].is_string(),
            "{method} {path}: not a JSON error: {resp}"
        );
    }
    // Headers: injection strings, non-ASCII, a wrong scheme, a huge token.
    let long = "x".repeat(10_000);
    let header_cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("Authorization", "Basic Zm9vOmJhcg==")],
        vec![("Authorization", "Bearer ' OR '1'='1")],
        vec![("X-Tandem-Token", long.as_str())],
        vec![
            ("Authorization", auth.as_str()),
            ("x-tandem-org-id", "a\u{7f}b"),
        ],
        vec![
            ("Authorization", auth.as_str()),
            ("x-tandem-org-id", long.as_str()),
        ],
        vec![
            ("Authorization", auth.as_str()),
            ("x-tandem-channel", "pager"),
        ],
    ];
    for h in &header_cases {
        let (code, resp) = http(port, "GET", "/automations/v2/runs", h, None).await?;
        ensure!((400..500).contains(&code), "{h:?} → {code} {resp}");
    }
    // A raw non-UTF-8 header value.
    let (code, _) = raw_request(
        port,
        "GET /automations/v2/runs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Tandem-Token: \u{e9}t\u{e9}\r\n\r\n",
        b"",
    )
    .await?;
    ensure!((400..500).contains(&code), "non-ASCII token → {code}");
    // Still serving, and nothing was changed by all that.
    let (code, _) = http(port, "GET", "/healthz", &[], None).await?;
    ensure!(code == 200);
    let stored = tandem_store::get_run(&fx.pool, &run.run_id).await?;
    ensure!(stored.status == AutomationRunStatus::AwaitingApproval);
    ensure!(stored.checkpoint.gate_history.is_empty());
    let (code, body) = fx
        .admin("POST", &gp, Some(json!({"decision": "approve"})))
        .await?;
    ensure!(code == 200, "{code} {body}");
    let (_, list) = fx.admin("GET", "/automations/v2", None).await?;
    ensure!(list["count"] == 1, "{list}");
    fx.finish().await
}

// ------------------------------------------------------------------------------------------------
// Governance, audit, dev mode
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn governance_audit_and_dev_mode() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    let (code, b) = fx
        .admin(
            "POST",
            "/governance/spend-caps",
            Some(
                json!({"org_id": "org-g", "workspace_id": "ws-g", "agent_id": "writer",
                        "weekly_cap_usd": 10.5}),
            ),
        )
        .await?;
    ensure!(code == 200, "{code} {b}");
    let (code, caps) = fx
        .admin(
            "GET",
            "/governance/spend-caps?org_id=org-g&workspace_id=ws-g",
            None,
        )
        .await?;
    ensure!(
        code == 200 && caps["spend_caps"][0]["weekly_cap_usd"] == 10.5,
        "{caps}"
    );
    let (code, p) = fx
        .admin(
            "POST",
            "/governance/spend-pauses",
            Some(
                json!({"org_id": "org-g", "workspace_id": "ws-g", "agent_id": "writer",
                        "reason": "over"}),
            ),
        )
        .await?;
    ensure!(code == 200 && p["created"] == true, "{p}");
    let snap = tandem_store::governance_snapshot(&fx.pool).await?;
    let tenant = TenantContext::explicit("org-g", "ws-g");
    ensure!(
        snap.spend_paused_agents
            .contains(&tandem_core::governance::agent_scope_key(&tenant, "writer"))
    );
    let now = db_now(&fx.pool).await?;
    let (code, o) = fx
        .admin(
            "POST",
            "/governance/quota-overrides",
            Some(
                json!({"org_id": "org-g", "workspace_id": "ws-g", "agent_id": "writer",
                        "expires_at_ms": now + 3_600_000}),
            ),
        )
        .await?;
    ensure!(code == 200, "{o}");
    let id = o["id"].as_str().context("id")?;
    let (code, s) = fx
        .admin(
            "POST",
            &format!("/governance/quota-overrides/{id}"),
            Some(json!({"status": "approved"})),
        )
        .await?;
    ensure!(code == 200, "{s}");
    let snap = tandem_store::governance_snapshot(&fx.pool).await?;
    ensure!(snap.has_quota_override(&tenant, "writer", now));
    let (code, d) = fx
        .admin(
            "DELETE",
            "/governance/spend-pauses",
            Some(json!({"org_id": "org-g", "workspace_id": "ws-g", "agent_id": "writer"})),
        )
        .await?;
    ensure!(code == 200 && d["removed"] == true, "{d}");
    // A tenant token cannot change governance.
    let t = fx.token("org-g", "ws-g", "human", "h", false).await?;
    let (code, _) = fx
        .as_token(
            &t,
            "POST",
            "/governance/spend-pauses",
            Some(json!({"agent_id": "writer"})),
        )
        .await?;
    ensure!(code == 403);
    // Audit: a denial writes a record; verification links and verifies the chain.
    let spec = create_automation(
        &fx,
        automation(
            "auto-audit",
            vec![
                node("draft", &[]),
                gate_node("approval", &["draft"], &["draft"], None),
            ],
            None,
        ),
    )
    .await?;
    let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
    let (code, _) = fx
        .admin(
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(code == 200);
    let (code, v) = fx.admin("GET", "/audit/verify", None).await?;
    ensure!(
        code == 200 && v["ok"] == true && v["records"].as_u64() >= Some(1),
        "{v}"
    );
    let (_, who) = fx.as_token(&t, "GET", "/auth/whoami", None).await?;
    let who_before = who.clone();
    let (code, body) = fx
        .admin("POST", "/auth/tokens/revoke", Some(json!({ "token": t })))
        .await?;
    ensure!(code == 200, "revoke: {code} {body}");
    let (code, _) = fx.as_token(&t, "GET", "/auth/whoami", None).await?;
    ensure!(code == 401, "revoked token still accepted: {code}");
    let who = who_before;
    ensure!(
        who["org_id"] == "org-g" && who["kind"] == "human" && who["admin"] == false,
        "{who}"
    );

    // Dev mode: no token needed; without it and without a token: 401.
    let dev = start_api(
        &fx.db.url,
        &fx.prefix,
        &[("TANDEM_API_DEV_MODE", "1".into())],
    )
    .await?;
    let (code, who) = http(dev.port, "GET", "/auth/whoami", &[], None).await?;
    ensure!(code == 200 && who["admin"] == true, "{code} {who}");
    let mut dev = dev;
    dev.proc.sigterm()?;
    let status = dev.proc.wait(EXIT_TIMEOUT).await?;
    if !status.success() {
        bail!("dev api exited with {status}");
    }
    fx.finish().await
}

// ------------------------------------------------------------------------------------------------
// Recover and task actions
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn recover_and_task_actions() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    let spec = create_automation(
        &fx,
        automation(
            "auto-fix",
            vec![
                node("draft", &[]),
                gate_node("approval", &["draft"], &["draft"], None),
                node("send", &["approval"]),
            ],
            None,
        ),
    )
    .await?;
    // A failed run: recover resets the failed node and requeues.
    let mut failed = build_awaiting(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
    failed.status = AutomationRunStatus::Failed;
    failed.finished_at_ms = Some(failed.updated_at_ms);
    failed
        .checkpoint
        .node_outputs
        .insert("draft".into(), json!({"status": "failed"}));
    tandem_store::create_run(&fx.pool, &failed, &Effects::default(), &Default::default()).await?;
    let (code, body) = fx
        .admin(
            "POST",
            &format!("/automations/v2/runs/{}/recover", failed.run_id),
            Some(json!({"reason": "fixed"})),
        )
        .await?;
    ensure!(
        code == 200 && body["run"]["status"] == "queued",
        "{code} {body}"
    );
    ensure!(body["run"].get("finished_at_ms").is_none(), "{body}");
    ensure!(body["run"]["checkpoint"].get("awaiting_gate").is_none());
    ensure!(strs(&body["run"]["checkpoint"]["pending_nodes"]).contains(&"draft".to_owned()));
    let events: Vec<String> = body["run"]["checkpoint"]["lifecycle_history"]
        .as_array()
        .context("history")?
        .iter()
        .filter_map(|r| r["event"].as_str().map(str::to_owned))
        .collect();
    ensure!(events.contains(&"run_recovered".to_owned()), "{events:?}");
    // A queued run is not recoverable, nor requeueable.
    let (code, body) = fx
        .admin(
            "POST",
            &format!("/automations/v2/runs/{}/recover", failed.run_id),
            None,
        )
        .await?;
    ensure!(
        code == 409 && body["code"] == "AUTOMATION_V2_RUN_NOT_RECOVERABLE",
        "{body}"
    );
    let (code, body) = fx
        .admin(
            "POST",
            &format!("/automations/v2/runs/{}/tasks/draft/retry", failed.run_id),
            None,
        )
        .await?;
    ensure!(
        code == 409 && body["code"] == "AUTOMATION_V2_RUN_NOT_REQUEUEABLE",
        "{body}"
    );

    // An awaiting run: retry of `draft` clears the gate, keeps gate_history, resets the subtree.
    let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
    for (action, event) in [
        ("retry", "run_task_retried"),
        ("requeue", "run_task_requeued"),
        ("continue", "run_task_continued"),
    ] {
        let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
        let (code, body) = fx
            .admin(
                "POST",
                &format!("/automations/v2/runs/{}/tasks/draft/{action}", run.run_id),
                None,
            )
            .await?;
        ensure!(
            code == 200 && body["run"]["status"] == "queued",
            "{action}: {code} {body}"
        );
        let cp = &body["run"]["checkpoint"];
        ensure!(cp.get("awaiting_gate").is_none(), "{action}");
        ensure!(
            strs(&cp["pending_nodes"]).first().map(String::as_str) == Some("draft"),
            "{action}: {cp}"
        );
        let last = cp["lifecycle_history"]
            .as_array()
            .and_then(|h| h.last())
            .context("history")?;
        ensure!(last["event"] == event, "{action}: {last}");
    }
    let (code, body) = fx
        .admin(
            "POST",
            &format!("/automations/v2/runs/{}/tasks/ghost/retry", run.run_id),
            None,
        )
        .await?;
    ensure!(
        code == 404 && body["code"] == "AUTOMATION_V2_NODE_NOT_FOUND",
        "{body}"
    );
    let (code, _) = fx
        .admin(
            "POST",
            &format!("/automations/v2/runs/{}/tasks/draft/explode", run.run_id),
            None,
        )
        .await?;
    ensure!(code == 404, "unknown task action: {code}");
    fx.finish().await
}

// ------------------------------------------------------------------------------------------------
// tandemctl over HTTP and NATS
// ------------------------------------------------------------------------------------------------

async fn ctl(fx: &Fixture, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let env = vec![
        ("TANDEM_API_URL", format!("http://127.0.0.1:{}", fx.port())),
        ("TANDEM_API_TOKEN", ADMIN.to_owned()),
        ("TANDEM_NATS_URL", nats_url()),
        ("TANDEM_NATS_PREFIX", fx.prefix.clone()),
    ];
    let mut p = Proc::start("tandemctl", args, &env)?;
    let status = p.wait(Duration::from_secs(30)).await?;
    Ok((status.success(), p.stdout(), p.stderr()))
}

#[tokio::test]
async fn tandemctl_commands_over_the_api() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    let dir = std::env::temp_dir().join(unique("ctl"));
    std::fs::create_dir_all(&dir)?;
    let yaml = dir.join("spec.yaml");
    std::fs::write(
        &yaml,
        "automation_id: auto-ctl\nname: ctl demo\ncreator_id: ops\nflow:\n  nodes:\n    - node_id: draft\n      agent_id: writer\n      objective: write\n    - node_id: approval\n      stage_kind: approval\n      depends_on: [draft]\n      gate:\n        required: true\n        decisions: [approve, rework, cancel]\n        rework_targets: [draft]\n",
    )?;
    let file = yaml.to_string_lossy().into_owned();
    let (ok, out, err) = ctl(&fx, &["automations", "apply", "-f", &file]).await?;
    ensure!(
        ok && out.contains("automation auto-ctl created"),
        "{out}\n{err}"
    );
    let (ok, out, err) = ctl(&fx, &["automations", "list"]).await?;
    ensure!(ok && out.contains("auto-ctl"), "{out}\n{err}");
    let (ok, out, err) = ctl(&fx, &["automations", "run", "auto-ctl"]).await?;
    ensure!(
        ok && out.trim().starts_with("automation-v2-run-"),
        "{out}\n{err}"
    );
    let queued = out.trim().to_owned();
    let (ok, out, _) = ctl(&fx, &["runs", "list", "--status", "queued"]).await?;
    ensure!(
        ok && out.contains(&queued) && out.contains("STATUS"),
        "{out}"
    );
    let (ok, out, _) = ctl(&fx, &["runs", "get", &queued]).await?;
    let got: Value = serde_json::from_str(&out)?;
    ensure!(ok && got["run_id"] == queued.as_str(), "{out}");
    // A bad spec: the API's message and JSON path, exit 1.
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"automation_id":"x","flow":{"nodes":[{"node_id":"a","depends_on":["b"]}]}}"#,
    )?;
    let (ok, _, err) = ctl(&fx, &["automations", "apply", "-f", &bad.to_string_lossy()]).await?;
    ensure!(!ok && err.contains("flow.nodes[0].depends_on[0]"), "{err}");

    // Gates: pending, approve (an event arrives on NATS), a second decision is refused.
    let spec = tandem_store::get_automation(&fx.pool, "auto-ctl").await?;
    let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
    let (ok, out, _) = ctl(&fx, &["gates", "pending"]).await?;
    ensure!(
        ok && out.contains(&run.run_id) && out.contains("approval"),
        "{out}"
    );
    let env = vec![
        ("TANDEM_NATS_URL", nats_url()),
        ("TANDEM_NATS_PREFIX", fx.prefix.clone()),
    ];
    let mut tail = Proc::start("tandemctl", &["events", "tail", "--count", "1"], &env)?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (ok, out, err) = ctl(
        &fx,
        &["gates", "approve", &run.run_id, "--reason", "ship it"],
    )
    .await?;
    ensure!(ok && out.contains("approve recorded"), "{out}\n{err}");
    let status = tail.wait(Duration::from_secs(15)).await?;
    ensure!(
        status.success() && tail.stdout().contains("approval.decision.recorded"),
        "tail: {}\n{}",
        tail.stdout(),
        tail.stderr()
    );
    let (ok, _, err) = ctl(&fx, &["gates", "cancel", &run.run_id]).await?;
    ensure!(
        !ok && err.contains("AUTOMATION_V2_RUN_NOT_AWAITING_APPROVAL") && err.contains("approve"),
        "{err}"
    );
    let (ok, out, _) = ctl(&fx, &["runs", "cancel", &queued]).await?;
    ensure!(ok && out.contains("cancelled"), "{out}");
    let (ok, out, err) = ctl(&fx, &["audit", "verify"]).await?;
    ensure!(ok && out.contains("audit chain verified"), "{out}\n{err}");
    let (ok, out, _) = ctl(
        &fx,
        &[
            "tokens",
            "create",
            "--name",
            "t",
            "--org",
            "o",
            "--workspace",
            "w",
            "--tenant-admin",
        ],
    )
    .await?;
    ensure!(ok && out.trim().starts_with("tdm_"), "{out}");
    let (_, who) = fx.as_token(out.trim(), "GET", "/auth/whoami", None).await?;
    ensure!(who["tenant_admin"] == true, "{who}");
    let _ = std::fs::remove_dir_all(&dir);
    fx.finish().await
}

// ------------------------------------------------------------------------------------------------
// tandemctl up (smoke)
// ------------------------------------------------------------------------------------------------

/// `tandemctl up --smoke`: the whole fleet as child processes of tandemctl; demo runs complete
/// and a reminder arrives on NATS; then every service stops cleanly (exit 0).
#[tokio::test]
async fn tandemctl_up_smoke() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    let prefix = unique("t");
    let api_port = free_port()?;
    let env = vec![
        ("TANDEM_DATABASE_URL", db.url.clone()),
        ("TANDEM_NATS_URL", nats_url()),
        ("TANDEM_NATS_PREFIX", prefix.clone()),
        ("PATH", std::env::var("PATH").unwrap_or_default()),
    ];
    let port = format!("127.0.0.1:{api_port}");
    let mut up = Proc::start(
        "tandemctl",
        &[
            "up",
            "--smoke",
            "--for-secs",
            "90",
            "--no-ensure",
            "--api-addr",
            &port,
        ],
        &env,
    )?;
    let status = up.wait(Duration::from_secs(150)).await?;
    let (out, err) = (up.stdout(), up.stderr());
    ensure!(status.success(), "up exited with {status}\n{out}\n{err}");
    ensure!(
        out.contains("smoke: ") && out.contains("reminder events"),
        "{out}"
    );
    ensure!(
        err.contains("worker-2 stopped") && err.contains("api stopped"),
        "{err}"
    );
    delete_streams(&prefix).await?;
    db.drop_db().await
}

// ------------------------------------------------------------------------------------------------
// The remaining gate error codes
// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn gate_error_codes() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    let nodes = |decisions: Value| {
        vec![
            node("draft", &[]),
            json!({"node_id": "approval", "stage_kind": "approval", "depends_on": ["draft"],
                   "gate": {"required": true, "decisions": decisions}}),
        ]
    };
    let spec = create_automation(
        &fx,
        automation("auto-codes", nodes(json!(["approve", "cancel"])), None),
    )
    .await?;
    // A decision the gate does not offer (no rework targets, no `rework` label) → 400.
    let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "rework"})),
        )
        .await?;
    ensure!(
        code == 400 && body["code"] == "AUTOMATION_V2_GATE_INVALID_DECISION",
        "not offered: {code} {body}"
    );
    ensure!(strs(&body["offered"]) == ["approve", "cancel"], "{body}");
    // A decision aimed at another instance of the gate → 409, nothing changes.
    let requested = run
        .checkpoint
        .awaiting_gate
        .as_ref()
        .context("gate")?
        .requested_at_ms;
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "approve", "node_id": "approval",
                        "requested_at_ms": requested - 5_000})),
        )
        .await?;
    ensure!(
        code == 409 && body["code"] == "AUTOMATION_V2_RUN_NOT_AWAITING_APPROVAL",
        "stale instance: {code} {body}"
    );
    ensure!(body["openGateRequestedAtMs"] == requested, "{body}");
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "approve", "node_id": "approval",
                        "requested_at_ms": requested})),
        )
        .await?;
    ensure!(code == 200, "named instance: {code} {body}");

    // Awaiting approval without any gate, open or recoverable → 409 GATE_MISSING.
    let mut gateless =
        build_awaiting(&fx.pool, &spec, &["draft"], "approval", 1_000, false).await?;
    gateless.checkpoint.pending_nodes.clear();
    tandem_store::create_run(
        &fx.pool,
        &gateless,
        &Effects::default(),
        &Default::default(),
    )
    .await?;
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path(&gateless.run_id),
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 409 && body["code"] == "AUTOMATION_V2_RUN_GATE_MISSING",
        "gate missing: {code} {body}"
    );

    // The live automation no longer has the gate node → 404 GATE_NODE_NOT_FOUND.
    let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
    create_automation(
        &fx,
        automation("auto-codes", vec![node("draft", &[])], None),
    )
    .await?;
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path(&run.run_id),
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 404 && body["code"] == "AUTOMATION_V2_GATE_NODE_NOT_FOUND",
        "gate node: {code} {body}"
    );
    // Unknown run → 404 RUN_NOT_FOUND; too large → 413; wrong method → 405; JSON errors.
    let (code, body) = fx
        .admin(
            "POST",
            &gate_path("automation-v2-run-nope"),
            Some(json!({"decision": "approve"})),
        )
        .await?;
    ensure!(
        code == 404 && body["code"] == "AUTOMATION_V2_RUN_NOT_FOUND",
        "{body}"
    );
    let big = json!({"decision": "approve", "reason": "x".repeat(100_000)});
    let (code, body) = fx.admin("POST", &gate_path(&run.run_id), Some(big)).await?;
    ensure!(
        code == 413 && body["code"] == "PAYLOAD_TOO_LARGE",
        "{code} {body}"
    );
    let (code, body) = fx.admin("PUT", &gate_path(&run.run_id), None).await?;
    ensure!(
        code == 405 && body["code"] == "METHOD_NOT_ALLOWED",
        "{code} {body}"
    );
    // A tenant token cannot create an automation in another tenant.
    let t = fx.token("org-x", "ws-x", "human", "x", false).await?;
    let (code, body) = fx
        .as_token(
            &t,
            "POST",
            "/automations/v2",
            Some(automation(
                "auto-other",
                vec![node("a", &[])],
                Some(("org-y", "ws-y")),
            )),
        )
        .await?;
    ensure!(
        code == 403 && body["code"] == "TENANT_SCOPE_DENIED",
        "{code} {body}"
    );
    // Without a tenant in the spec, the token's tenant is stamped.
    let (code, body) = fx
        .as_token(
            &t,
            "POST",
            "/automations/v2",
            Some(automation("auto-mine", vec![node("a", &[])], None)),
        )
        .await?;
    ensure!(code == 200, "{code} {body}");
    ensure!(
        body["automation"]["metadata"]["tenant_context"]["org_id"] == "org-x",
        "{body}"
    );
    let (code, runs) = fx
        .as_token(&t, "POST", "/automations/v2/auto-mine/run_now", None)
        .await?;
    ensure!(
        code == 200 && runs["run"]["tenant_context"]["workspace_id"] == "ws-x",
        "{code} {runs}"
    );
    fx.finish().await
}

#[tokio::test]
async fn fleet_shutdown_action_fails_running_runs_only_when_confirmed_by_an_admin()
-> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    let (code, _) = fx
        .admin(
            "POST",
            "/automations/v2",
            Some(automation("auto-stop", vec![node("a", &[])], None)),
        )
        .await?;
    ensure!(code == 200, "create: {code}");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (code, r) = fx
            .admin("POST", "/automations/v2/auto-stop/run_now", Some(json!({})))
            .await?;
        ensure!(code == 200, "run_now: {code} {r}");
        ids.push(r["run"]["run_id"].as_str().context("run_id")?.to_owned());
    }
    // Two of them running (claimed as the scheduler does), one left queued.
    let limits = tandem_store::ClaimLimits {
        max_concurrent_runs: 2,
        batch: 8,
        relay_lease: None,
    };
    tandem_store::claim_runs(&fx.pool, limits, &Default::default(), |_, _| {
        tandem_core::Transition::unchanged(())
    })
    .await?;

    let (code, body) = fx
        .admin("POST", "/admin/fleet/fail-running-runs", Some(json!({})))
        .await?;
    ensure!(
        code == 400 && body["path"] == "confirm",
        "unconfirmed: {code} {body}"
    );
    let human = fx.token("local", "local", "human", "alice", true).await?;
    let (code, body) = fx
        .as_token(
            &human,
            "POST",
            "/admin/fleet/fail-running-runs",
            Some(json!({"confirm": true})),
        )
        .await?;
    ensure!(code == 403, "non-admin: {code} {body}");
    let mut statuses = Vec::new();
    for id in &ids {
        statuses.push(tandem_store::get_run(&fx.pool, id).await?.status);
    }
    ensure!(
        statuses
            .iter()
            .filter(|s| **s == AutomationRunStatus::Running)
            .count()
            == 2,
        "refused requests change nothing: {statuses:?}"
    );

    let (code, body) = fx
        .admin(
            "POST",
            "/admin/fleet/fail-running-runs",
            Some(json!({"confirm": true})),
        )
        .await?;
    ensure!(code == 200 && body["ok"] == true, "{code} {body}");
    ensure!(body["failed"].as_array().map(Vec::len) == Some(2), "{body}");
    for id in &ids {
        let run = tandem_store::get_run(&fx.pool, id).await?;
        if body["failed"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| f == id.as_str())
        {
            ensure!(
                run.status == AutomationRunStatus::Failed,
                "{id}: {:?}",
                run.status
            );
            ensure!(
                run.stop_kind == Some(tandem_core::AutomationStopKind::Shutdown),
                "{id}: {:?}",
                run.stop_kind
            );
            ensure!(
                run.detail.as_deref() == Some("automation run stopped during server shutdown"),
                "{id}: {:?}",
                run.detail
            );
        } else {
            ensure!(
                run.status == AutomationRunStatus::Queued,
                "{id}: queued runs are kept"
            );
        }
    }
    // Nothing running is left: a second call fails nobody.
    let (code, body) = fx
        .admin(
            "POST",
            "/admin/fleet/fail-running-runs",
            Some(json!({"confirm": true})),
        )
        .await?;
    ensure!(
        code == 200 && body["failed"].as_array().map(Vec::len) == Some(0),
        "{body}"
    );
    // The CLI refuses without --yes, and reports what it failed.
    let (ok, _, err) = ctl(&fx, &["fleet", "fail-running-runs"]).await?;
    ensure!(!ok && err.contains("--yes"), "{err}");
    let (ok, out, err) = ctl(&fx, &["fleet", "fail-running-runs", "--yes"]).await?;
    ensure!(ok && out.contains("failed 0 running run(s)"), "{out} {err}");
    fx.finish().await
}

#[tokio::test]
async fn automation_pause_pauses_every_running_run_not_only_the_first_100() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    create_automation(&fx, automation("auto-many", vec![node("a", &[])], None)).await?;
    let (code, r) = fx
        .admin("POST", "/automations/v2/auto-many/run_now", None)
        .await?;
    ensure!(code == 200, "run_now: {code} {r}");
    let template = r["run"]["run_id"].as_str().context("run_id")?.to_owned();
    // 250 running runs (claimed, nothing in flight) and 5 queued ones, copied from the template.
    let client = fx.pool.get().await?;
    client
        .execute(
            "INSERT INTO runs (run_id, automation_id, org_id, workspace_id, status, lease_epoch,
                               created_at_ms, updated_at_ms, activity_at_ms, doc)
             SELECT 'many-' || g, automation_id, org_id, workspace_id,
                    CASE WHEN g <= 250 THEN 'running' ELSE 'queued' END,
                    CASE WHEN g <= 250 THEN 1 ELSE 0 END,
                    created_at_ms + g, updated_at_ms, activity_at_ms,
                    doc || jsonb_build_object(
                        'run_id', 'many-' || g,
                        'created_at_ms', created_at_ms + g,
                        'status', CASE WHEN g <= 250 THEN 'running' ELSE 'queued' END)
               FROM runs, generate_series(1, 255) g
              WHERE run_id = $1",
            &[&template],
        )
        .await?;
    let (code, ap) = fx
        .admin(
            "POST",
            "/automations/v2/auto-many/pause",
            Some(json!({"reason": "maintenance"})),
        )
        .await?;
    ensure!(
        code == 200 && ap["automation"]["status"] == "paused",
        "{ap}"
    );
    let paused = strs(&ap["paused_run_ids"]);
    ensure!(paused.len() == 250, "{} runs paused", paused.len());
    let counts: Vec<(String, i64)> = client
        .query(
            "SELECT status, count(*) FROM runs WHERE run_id LIKE 'many-%' GROUP BY status
              ORDER BY status",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Upstream pauses running runs only: the queued ones (and the template) stay queued.
    ensure!(
        counts == vec![("paused".to_owned(), 250), ("queued".to_owned(), 5)],
        "{counts:?}"
    );
    let reasons: i64 = client
        .query_one(
            "SELECT count(*) FROM runs WHERE run_id LIKE 'many-%'
                AND doc->>'pause_reason' = 'maintenance'",
            &[],
        )
        .await?
        .get(0);
    ensure!(reasons == 250, "{reasons} runs carry the pause reason");
    drop(client);
    fx.finish().await
}

#[tokio::test]
async fn gate_decisions_need_the_automation_owner_or_an_admin() -> anyhow::Result<()> {
    let fx = Fixture::start(1).await?;
    let tenant = Some(("org-o", "ws-o"));
    let mut body = automation(
        "auto-owned",
        vec![
            node("draft", &[]),
            gate_node("approval", &["draft"], &[], None),
        ],
        tenant,
    );
    body["creator_id"] = json!("Olivia");
    let spec = create_automation(&fx, body).await?;
    let token = |actor: &'static str, tenant_admin: bool| {
        json!({"name": actor, "org_id": "org-o", "workspace_id": "ws-o",
               "principal_kind": "human", "actor_id": actor, "tenant_admin": tenant_admin})
    };
    let approve = Some(json!({"decision": "approve"}));

    // A human of the tenant who neither owns the automation nor administers the tenant: 403,
    // and the gate stays open.
    let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
    let mallory = fx.token_from(token("mallory", false)).await?;
    let (code, resp) = fx
        .as_token(&mallory, "POST", &gate_path(&run.run_id), approve.clone())
        .await?;
    ensure!(
        code == 403 && resp["code"] == "AUTOMATION_V2_ACCESS_DENIED",
        "{code} {resp}"
    );
    let stored = tandem_store::get_run(&fx.pool, &run.run_id).await?;
    ensure!(stored.status == AutomationRunStatus::AwaitingApproval);
    ensure!(stored.checkpoint.gate_history.is_empty());

    // The owner (creator_id, compared case-insensitively) may decide.
    let olivia = fx.token_from(token("olivia", false)).await?;
    let (code, resp) = fx
        .as_token(&olivia, "POST", &gate_path(&run.run_id), approve.clone())
        .await?;
    ensure!(
        code == 200 && resp["run"]["status"] == "queued",
        "{code} {resp}"
    );

    // So may a tenant admin.
    let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
    let tara = fx.token_from(token("tara", true)).await?;
    let (code, resp) = fx
        .as_token(&tara, "POST", &gate_path(&run.run_id), approve.clone())
        .await?;
    ensure!(
        code == 200 && resp["run"]["status"] == "queued",
        "{code} {resp}"
    );

    // The automation cannot be resolved (deleted, and the run carries no snapshot): 404.
    let run = awaiting_run(&fx.pool, &spec, &["draft"], "approval", 1_000, true).await?;
    let client = fx.pool.get().await?;
    client
        .execute(
            "UPDATE runs SET doc = doc - 'automation_snapshot' WHERE run_id = $1",
            &[&run.run_id],
        )
        .await?;
    client
        .execute(
            "DELETE FROM automations WHERE automation_id = 'auto-owned'",
            &[],
        )
        .await?;
    let (code, resp) = fx
        .as_token(&olivia, "POST", &gate_path(&run.run_id), approve.clone())
        .await?;
    ensure!(
        code == 404 && resp["code"] == "AUTOMATION_V2_NOT_FOUND",
        "{code} {resp}"
    );
    drop(client);
    fx.finish().await
}
