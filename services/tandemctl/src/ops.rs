//! Commands over the HTTP API and NATS.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde_json::{Value, json};

use crate::http::{Api, enc};

/// Prints rows as aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!(
        "{}",
        line(headers.iter().map(|h| (*h).to_owned()).collect())
    );
    for r in rows {
        println!("{}", line(r.clone()));
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn ago(now_ms: u64, at: &Value) -> String {
    match at.as_u64() {
        Some(t) if now_ms >= t => {
            let secs = (now_ms - t) / 1000;
            if secs < 120 {
                format!("{secs}s ago")
            } else if secs < 7200 {
                format!("{}m ago", secs / 60)
            } else {
                format!("{}h ago", secs / 3600)
            }
        }
        Some(_) => "just now".into(),
        None => "-".into(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Reads automation specs from a `.json`, `.yaml` or `.yml` file: one spec, a list of specs, or
/// `{automations: [...]}`.
pub fn read_specs(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let doc: Value = if yaml {
        serde_yaml_ng::from_str(&text)
            .with_context(|| format!("{} is not valid YAML", path.display()))?
    } else {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?
    };
    Ok(match doc {
        Value::Array(items) => items,
        Value::Object(ref m) if m.get("automations").is_some_and(Value::is_array) => m
            .get("automations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        other => vec![other],
    })
}

pub async fn apply(api: &Api, file: &Path) -> anyhow::Result<()> {
    let specs = read_specs(file)?;
    if specs.is_empty() {
        bail!("{} holds no automation", file.display());
    }
    for spec in &specs {
        let v = api.ok("POST", "/automations/v2", Some(spec)).await?;
        let id = s(&v["automation"]["automation_id"]);
        let verb = if v["created"] == true {
            "created"
        } else {
            "updated"
        };
        println!("automation {id} {verb}");
    }
    Ok(())
}

pub async fn automations_list(api: &Api) -> anyhow::Result<()> {
    let v = api.ok("GET", "/automations/v2", None).await?;
    let rows: Vec<Vec<String>> = v["automations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|a| {
            vec![
                s(&a["automation_id"]),
                s(&a["status"]),
                a["flow"]["nodes"]
                    .as_array()
                    .map_or(0, Vec::len)
                    .to_string(),
                s(&a["name"]),
            ]
        })
        .collect();
    table(&["AUTOMATION", "STATUS", "NODES", "NAME"], &rows);
    Ok(())
}

pub async fn run_now(api: &Api, id: &str, reason: Option<&str>) -> anyhow::Result<String> {
    let body = json!({ "reason": reason });
    let v = api
        .ok(
            "POST",
            &format!("/automations/v2/{}/run_now", enc(id)),
            Some(&body),
        )
        .await?;
    Ok(s(&v["run"]["run_id"]))
}

fn runs_query(status: Option<&str>, automation: Option<&str>, limit: usize) -> String {
    let mut q = format!("/automations/v2/runs?limit={limit}");
    if let Some(st) = status {
        q.push_str(&format!("&status={}", enc(st)));
    }
    if let Some(a) = automation {
        q.push_str(&format!("&automation_id={}", enc(a)));
    }
    q
}

fn run_rows(runs: &[Value]) -> Vec<Vec<String>> {
    let now = now_ms();
    runs.iter()
        .map(|r| {
            let cp = &r["checkpoint"];
            let done = cp["completed_nodes"].as_array().map_or(0, Vec::len);
            let pending = cp["pending_nodes"].as_array().map_or(0, Vec::len);
            vec![
                s(&r["run_id"]),
                s(&r["automation_id"]),
                s(&r["status"]),
                format!("{done}/{}", done + pending),
                ago(now, &r["updated_at_ms"]),
                s(&r["detail"]).chars().take(60).collect(),
            ]
        })
        .collect()
}

const RUN_HEADERS: [&str; 6] = ["RUN", "AUTOMATION", "STATUS", "NODES", "UPDATED", "DETAIL"];

pub async fn runs_list(
    api: &Api,
    status: Option<&str>,
    automation: Option<&str>,
    limit: usize,
) -> anyhow::Result<()> {
    let v = api
        .ok("GET", &runs_query(status, automation, limit), None)
        .await?;
    let runs = v["runs"].as_array().cloned().unwrap_or_default();
    table(&RUN_HEADERS, &run_rows(&runs));
    Ok(())
}

pub async fn runs_get(api: &Api, id: &str) -> anyhow::Result<()> {
    let v = api
        .ok("GET", &format!("/automations/v2/runs/{}", enc(id)), None)
        .await?;
    println!("{}", serde_json::to_string_pretty(&v["run"])?);
    Ok(())
}

/// `runs watch`: the newest runs, counts by status and pending approvals, refreshed until
/// Ctrl-C.
pub async fn runs_watch(api: &Api, every: Duration, limit: usize) -> anyhow::Result<()> {
    loop {
        let v = api.ok("GET", &runs_query(None, None, limit), None).await?;
        let runs = v["runs"].as_array().cloned().unwrap_or_default();
        let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
        for r in &runs {
            *by_status.entry(s(&r["status"])).or_default() += 1;
        }
        let pending = api.ok("GET", "/approvals/pending", None).await?;
        print!("\x1b[2J\x1b[H");
        let counts: Vec<String> = by_status.iter().map(|(k, n)| format!("{k}={n}")).collect();
        println!(
            "runs (newest {limit}): {}   pending approvals: {}   (Ctrl-C to stop)\n",
            counts.join(" "),
            s(&pending["total"])
        );
        table(&RUN_HEADERS, &run_rows(&runs));
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

pub async fn run_action(
    api: &Api,
    id: &str,
    action: &str,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    let body = json!({ "reason": reason });
    let v = api
        .ok(
            "POST",
            &format!("/automations/v2/runs/{}/{action}", enc(id)),
            Some(&body),
        )
        .await?;
    let extra = if v["alreadyTerminal"] == true {
        " (already terminal)"
    } else {
        ""
    };
    println!("run {id}: {}{extra}", s(&v["run"]["status"]));
    Ok(())
}

pub async fn task_action(
    api: &Api,
    id: &str,
    node: &str,
    action: &str,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    let body = json!({ "reason": reason });
    let v = api
        .ok(
            "POST",
            &format!(
                "/automations/v2/runs/{}/tasks/{}/{action}",
                enc(id),
                enc(node)
            ),
            Some(&body),
        )
        .await?;
    println!("run {id}: {}", s(&v["run"]["status"]));
    Ok(())
}

pub async fn gates_pending(api: &Api) -> anyhow::Result<Value> {
    let v = api.ok("GET", "/approvals/pending?limit=500", None).await?;
    let now = now_ms();
    let rows: Vec<Vec<String>> = v["approvals"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let exp = match a["expires_at_ms"].as_u64() {
                Some(e) if e > now => format!("in {}s", (e - now) / 1000),
                Some(_) => "expired".into(),
                None => "-".into(),
            };
            vec![
                s(&a["run_id"]),
                s(&a["node_id"]),
                s(&a["workflow_name"]),
                ago(now, &a["requested_at_ms"]),
                exp,
                a["decisions"]
                    .as_array()
                    .map(|d| d.iter().map(s).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
                s(&a["surface_payload"]["notification_key"]),
            ]
        })
        .collect();
    table(
        &[
            "RUN",
            "GATE",
            "WORKFLOW",
            "REQUESTED",
            "EXPIRES",
            "DECISIONS",
            "NOTIFICATION KEY",
        ],
        &rows,
    );
    Ok(v)
}

pub async fn gate_decide(
    api: &Api,
    run_id: &str,
    decision: &str,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    let body = json!({ "decision": decision, "reason": reason });
    let v = api
        .ok(
            "POST",
            &format!("/automations/v2/runs/{}/gate", enc(run_id)),
            Some(&body),
        )
        .await?;
    println!(
        "run {run_id}: {decision} recorded; run is {}",
        s(&v["run"]["status"])
    );
    Ok(())
}

pub async fn audit_verify(api: &Api) -> anyhow::Result<bool> {
    let v = api.ok("GET", "/audit/verify", None).await?;
    if v["ok"] == true {
        println!("audit chain verified: {} records", s(&v["records"]));
        Ok(true)
    } else {
        println!("AUDIT CHAIN BROKEN: {}", s(&v["break"]));
        Ok(false)
    }
}

/// The explicit whole-fleet stop: fails every running run (admin token needed).
pub async fn fleet_fail_running_runs(api: &Api) -> anyhow::Result<bool> {
    let v = api
        .ok(
            "POST",
            "/admin/fleet/fail-running-runs",
            Some(&json!({"confirm": true})),
        )
        .await?;
    let failed = v["failed"].as_array().map_or(0, Vec::len);
    println!(
        "failed {failed} running run(s); {} error(s)",
        s(&v["errors"])
    );
    Ok(v["ok"] == true)
}

/// What `tokens create` asks for.
pub struct NewToken<'a> {
    pub name: &'a str,
    pub org: &'a str,
    pub workspace: &'a str,
    pub kind: &'a str,
    pub actor: Option<&'a str>,
    pub reviewer: bool,
    pub tenant_admin: bool,
}

pub async fn token_create(api: &Api, t: &NewToken<'_>) -> anyhow::Result<()> {
    let body = json!({"name": t.name, "org_id": t.org, "workspace_id": t.workspace,
                      "principal_kind": t.kind, "actor_id": t.actor,
                      "gate_reviewer": t.reviewer, "tenant_admin": t.tenant_admin});
    let v = api.ok("POST", "/auth/tokens", Some(&body)).await?;
    println!("{}", s(&v["token"]));
    eprintln!("(shown once; only its hash is stored)");
    Ok(())
}

/// One event line: time, type, run, node and the interesting properties.
pub fn format_event(subject: &str, payload: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return format!("{subject}: {}", String::from_utf8_lossy(payload));
    };
    let env = &v["envelope"];
    let props = &v["properties"];
    let time = env["occurred_at_ms"]
        .as_u64()
        .map(|ms| {
            let secs = ms / 1000 % 86_400;
            format!(
                "{:02}:{:02}:{:02}.{:03}",
                secs / 3600,
                secs / 60 % 60,
                secs % 60,
                ms % 1000
            )
        })
        .unwrap_or_else(|| "--:--:--".into());
    let mut extra = Vec::new();
    for k in [
        "status",
        "decision",
        "reason",
        "notification_key",
        "escalated_to",
        "reminder_count",
        "detail",
    ] {
        if let Some(x) = props.get(k).filter(|x| !x.is_null()) {
            extra.push(format!("{k}={}", s(x)));
        }
    }
    format!(
        "{time}  {:<48} run={} node={} {}",
        s(&v["type"]),
        s(&env["run_id"]),
        s(&env["node_id"]),
        extra.join(" ")
    )
}

/// `events tail`: subscribes to the events subjects (core NATS, live only) and prints them.
pub async fn events_tail(
    nats: &tandem_runtime::NatsArgs,
    filter: Option<&str>,
    json_out: bool,
    max: Option<usize>,
) -> anyhow::Result<()> {
    let client = tandem_bus::connect(&nats.options(), "tandemctl")
        .await
        .context("connecting to NATS (TANDEM_NATS_URL)")?;
    let subject = nats.nats_prefix.subject("tandem.events.>");
    let mut sub = client
        .subscribe(subject.clone())
        .await
        .with_context(|| format!("subscribing to {subject}"))?;
    eprintln!("tailing {subject} (Ctrl-C to stop)");
    let mut seen = 0usize;
    loop {
        tokio::select! {
            msg = sub.next() => {
                let Some(msg) = msg else { return Ok(()) };
                let line = if json_out {
                    String::from_utf8_lossy(&msg.payload).into_owned()
                } else {
                    format_event(msg.subject.as_str(), &msg.payload)
                };
                if filter.is_none_or(|f| line.contains(f)) {
                    println!("{line}");
                    seen += 1;
                    if max.is_some_and(|m| seen >= m) {
                        return Ok(());
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
