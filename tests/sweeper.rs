//! The sweeper against the real PostgreSQL and NATS: the stale reaper, auto-resume (window, cap,
//! kill switch, guardrail override), recovery of stuck `pausing` runs and of half-applied gate
//! decisions, retention, weekly spend caps, the operator shutdown action, three `tandem-sweeper`
//! processes over mixed runs (each action exactly once, a cancel racing the auto-resume never
//! resurrects a run), and a worker killed mid-task (reaped, resumed, completed).
//!
//! Ported upstream cases (spec §6): 12, 13, 14, 16, 17, 18 (reaper and auto-resume), 19, 24,
//! 26, 28 (sweeps leave runs alone that they must not touch), 25, 31 (settled decisions), 27
//! (fleet form: an owner-less running run is reaped, never failed), 33 (a corrupt row), 34
//! (attributed audit), 35, 36, 37 (spend caps). Cases 15 (stale gate marking) and the gate
//! policies belong to the gate-notifier.
//!
//! Every test has its own database (`TestDb`) and NATS prefix, and removes both when it passes.
//! `TANDEM_SWEEPER_FLEET_RUNS` sets the number of runs of the three-replica test (default 600).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use deadpool_postgres::Pool;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tandem_bus::{Prefix, StreamNames};
use tandem_core::config::{GatePolicyDefaults, LifecycleSettings, StaleSettings};
use tandem_core::effects::lifecycle_record;
use tandem_core::execution::cancel_run;
use tandem_core::gate::{
    GateDecisionOutcome, GateDecisionRequest, build_pending_gate, decide_gate,
};
use tandem_core::governance::agent_scope_key;
use tandem_core::protocol::TaskCancel;
use tandem_core::{
    AutomationAgentProfile, AutomationFlowNode, AutomationRunStatus, AutomationStopKind,
    AutomationV2RunRecord, AutomationV2Spec, Effects, ExecutionProfile, GovernanceActorRef, Millis,
    TenantContext, update,
};
use tandem_scheduler::{Scheduler, SchedulerConfig};
use tandem_store::{
    Fence, NewQuotaOverride, QuotaOverrideStatus, SpendCap, StoreSettings, TERMINAL_STATUSES,
};
use tandem_sweeper::{Duty, Sweeper, SweeperConfig};
use tandem_tests::bus::TestBus;
use tandem_tests::procs::{EXIT_TIMEOUT, Proc, delete_streams, free_port, http_get};
use tandem_tests::{TestDb, db_now, nats_url, unique};
use tokio::sync::Mutex;

// ---------------------------------------------------------------------------------------------
// helpers

const GATES: GatePolicyDefaults = GatePolicyDefaults {
    expires_after_ms: Some(604_800_000),
    on_expiry: tandem_core::AutomationGateExpiryAction::Cancel,
    stale_after_ms: 86_400_000,
};
const SEC: u64 = 1_000;
const MIN: u64 = 60_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 86_400_000;

fn settings() -> StoreSettings {
    StoreSettings::new(GATES)
}

fn lifecycle(stale_running_ms: u64) -> LifecycleSettings {
    LifecycleSettings {
        gates: GATES,
        stale: StaleSettings {
            stale_running_ms,
            ..StaleSettings::default()
        },
        max_concurrent_runs: 64,
        ..LifecycleSettings::default()
    }
}

fn tenant() -> TenantContext {
    TenantContext::explicit("org-sweep", "ws-sweep")
}

/// A flow of `nodes` (task nodes unless given), owned by `agents` in the explicit test tenant.
fn spec_of(id: &str, nodes: Vec<AutomationFlowNode>, agents: &[&str]) -> AutomationV2Spec {
    let mut s = AutomationV2Spec::new(id, nodes);
    s.creator_id = String::new();
    s.agents = agents
        .iter()
        .map(|a| AutomationAgentProfile {
            agent_id: (*a).into(),
            extra: Default::default(),
        })
        .collect();
    s.metadata = Some(json!({ "tenant_context": tenant() }));
    s
}

fn task(id: &str, deps: &[&str]) -> AutomationFlowNode {
    AutomationFlowNode::task(id, deps)
}

/// `collect` → `cluster_topics` → `draft` (cases 12, 13, 16).
fn topics_spec(max_attempts: Option<u32>) -> AutomationV2Spec {
    let mut cluster = task("cluster_topics", &["collect"]);
    cluster.timeout_ms = Some(60_000);
    if let Some(m) = max_attempts {
        cluster.retry_policy = Some(json!({ "max_attempts": m }));
    }
    spec_of(
        "auto-topics",
        vec![
            task("collect", &[]),
            cluster,
            task("draft", &["cluster_topics"]),
        ],
        &["agent-writer"],
    )
}

fn queued(run_id: &str, spec: &AutomationV2Spec, at: Millis) -> AutomationV2RunRecord {
    AutomationV2RunRecord::new_queued(run_id.into(), spec, "manual", ExecutionProfile::Strict, at)
}

/// A run claimed at `at` and executing nothing yet.
fn running(run_id: &str, spec: &AutomationV2Spec, at: Millis) -> AutomationV2RunRecord {
    let mut run = queued(run_id, spec, at.saturating_sub(SEC));
    run.status = AutomationRunStatus::Running;
    run.started_at_ms = Some(at);
    run.updated_at_ms = at;
    run
}

fn push_record(
    run: &mut AutomationV2RunRecord,
    event: &str,
    reason: Option<&str>,
    stop_kind: Option<AutomationStopKind>,
    metadata: Value,
    at: Millis,
) {
    run.checkpoint.lifecycle_history.push(lifecycle_record(
        event,
        reason.map(str::to_owned),
        stop_kind,
        Some(metadata),
        run.effective_execution_profile.as_str(),
        at,
    ));
}

/// The scheduler's `node_started` record for `node` (attempt, lease epoch) at `at`.
fn start_node(run: &mut AutomationV2RunRecord, node: &str, attempt: u32, epoch: i64, at: Millis) {
    run.checkpoint.node_attempts.insert(node.into(), attempt);
    push_record(
        run,
        "node_started",
        None,
        None,
        json!({ "node_id": node, "attempt": attempt, "lease_epoch": epoch }),
        at,
    );
    run.detail = Some(format!("running node `{node}` attempt {attempt}"));
}

fn complete_node(run: &mut AutomationV2RunRecord, node: &str, at: Millis) {
    run.checkpoint.pending_nodes.retain(|n| n != node);
    run.checkpoint.completed_nodes.push(node.into());
    run.checkpoint
        .node_outputs
        .insert(node.into(), json!({"status": "completed"}));
    run.checkpoint.node_attempts.insert(node.into(), 1);
    push_record(
        run,
        "node_completed",
        None,
        None,
        json!({ "node_id": node, "attempt": 1, "status": "completed" }),
        at,
    );
}

/// Inserts `run` as it is, then sets the columns the record does not carry.
async fn insert(
    pool: &Pool,
    run: &AutomationV2RunRecord,
    epoch: i64,
    activity_at_ms: Millis,
) -> anyhow::Result<()> {
    tandem_store::create_run(pool, run, &Effects::default(), &settings()).await?;
    let c = pool.get().await?;
    c.execute(
        "UPDATE runs SET lease_epoch = $2, activity_at_ms = $3 WHERE run_id = $1",
        &[&run.run_id, &epoch, &i64::try_from(activity_at_ms)?],
    )
    .await?;
    Ok(())
}

async fn get(pool: &Pool, run_id: &str) -> anyhow::Result<AutomationV2RunRecord> {
    Ok(tandem_store::get_run(pool, run_id).await?)
}

fn events(run: &AutomationV2RunRecord) -> Vec<&str> {
    run.checkpoint
        .lifecycle_history
        .iter()
        .map(|r| r.event.as_str())
        .collect()
}

fn count(run: &AutomationV2RunRecord, event: &str) -> usize {
    events(run).iter().filter(|e| **e == event).count()
}

async fn row_xmin(pool: &Pool, run_id: &str) -> anyhow::Result<String> {
    let c = pool.get().await?;
    Ok(
        c.query_one("SELECT xmin::text FROM runs WHERE run_id = $1", &[&run_id])
            .await?
            .get(0),
    )
}

/// Audit rows of a run: (event_type, actor, tenant, payload).
async fn audits(
    pool: &Pool,
    run_id: &str,
) -> anyhow::Result<Vec<(String, Option<String>, Value, Value)>> {
    let c = pool.get().await?;
    Ok(c.query(
        "SELECT event_type, actor, tenant, payload FROM audit_log
          WHERE payload ->> 'run_id' = $1 ORDER BY id",
        &[&run_id],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect())
}

/// Outbox rows of a run by event type.
async fn outbox_types(pool: &Pool, run_id: &str) -> anyhow::Result<BTreeMap<String, i64>> {
    let c = pool.get().await?;
    Ok(c.query(
        "SELECT event_type, count(*) FROM outbox WHERE run_id = $1 GROUP BY 1",
        &[&run_id],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The test's NATS connection and streams, plus the services built on them.
struct Bus(TestBus);

impl std::ops::Deref for Bus {
    type Target = TestBus;
    fn deref(&self) -> &TestBus {
        &self.0
    }
}

impl Bus {
    async fn new() -> anyhow::Result<Self> {
        Ok(Self(TestBus::new("sw").await?))
    }

    fn sweeper(&self, pool: &Pool, lifecycle: LifecycleSettings) -> Sweeper {
        let config = SweeperConfig {
            // Small pages, so every pass crosses page boundaries.
            batch: 4,
            ..SweeperConfig::default()
        };
        Sweeper::new(
            pool.clone(),
            self.client.clone(),
            self.js.clone(),
            self.prefix.clone(),
            config,
            lifecycle,
        )
    }

    fn scheduler(&self, pool: &Pool) -> Scheduler {
        Scheduler::new(
            pool.clone(),
            self.client.clone(),
            self.js.clone(),
            self.prefix.clone(),
            SchedulerConfig::default(),
            lifecycle(600_000),
        )
    }

    /// Collects the cancel hints of every run from now on.
    async fn cancel_hints(&self) -> anyhow::Result<Arc<Mutex<Vec<TaskCancel>>>> {
        let mut sub = self
            .client
            .subscribe(tandem_bus::cancel_wildcard_subject(&self.prefix))
            .await?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = seen.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Ok(c) = serde_json::from_slice::<TaskCancel>(&m.payload) {
                    out.lock().await.push(c);
                }
            }
        });
        self.client.flush().await?;
        Ok(seen)
    }

    /// Event types published on the events stream (read by sequence, no consumer).
    async fn published_event_types(&self) -> anyhow::Result<Vec<String>> {
        let names = StreamNames::new(&self.prefix);
        let mut s = self.js.get_stream(&names.events).await?;
        let state = s.info().await?.state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(m) = s.get_raw_message(seq).await {
                let v: Value = serde_json::from_slice(&m.payload)?;
                out.push(v["type"].as_str().unwrap_or_default().to_owned());
            }
        }
        Ok(out)
    }
}

async fn wait_hints(hints: &Mutex<Vec<TaskCancel>>, n: usize) -> anyhow::Result<Vec<TaskCancel>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let h = hints.lock().await.clone();
        if h.len() >= n || Instant::now() > deadline {
            return Ok(h);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Tasks dispatched for a run, from the outbox: (node_id, attempt, has repair context).
async fn dispatched(pool: &Pool, run_id: &str) -> anyhow::Result<Vec<(String, u64, bool)>> {
    let c = pool.get().await?;
    Ok(c.query(
        "SELECT payload FROM outbox WHERE run_id = $1 AND subject_kind = 'task' ORDER BY id",
        &[&run_id],
    )
    .await?
    .iter()
    .map(|r| {
        let p: Value = r.get(0);
        (
            p["node_id"].as_str().unwrap_or_default().to_owned(),
            p["attempt"].as_u64().unwrap_or(0),
            !p["repair_context"].is_null(),
        )
    })
    .collect())
}

/// A run executing `cluster_topics` (attempt 1, epoch 1) since `at`, `collect` completed.
fn executing_topics(run_id: &str, spec: &AutomationV2Spec, at: Millis) -> AutomationV2RunRecord {
    let mut run = running(run_id, spec, at.saturating_sub(20 * SEC));
    complete_node(&mut run, "collect", at.saturating_sub(10 * SEC));
    start_node(&mut run, "cluster_topics", 1, 1, at);
    run
}

// ---------------------------------------------------------------------------------------------
// stale reaper (spec §3.7)

#[tokio::test]
async fn case_12_stale_run_is_paused_releasing_its_lock_with_one_cancel_hint_audit_and_event()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let mut spec = topics_spec(None);
        spec.workspace_root = Some("/ws/case-12".into());
        let mut run = running("run-12", &spec, now - 180 * SEC);
        run.active_session_ids = vec!["session-1".into()];
        run.latest_session_id = Some("session-1".into());
        run.active_instance_ids = vec!["instance-1".into()];
        insert(&pool, &run, 1, now - 180 * SEC).await?;
        // A running run with fresh worker activity is left alone.
        insert(
            &pool,
            &running("run-12-busy", &topics_spec(None), now),
            1,
            now,
        )
        .await?;
        let busy_xmin = row_xmin(&pool, "run-12-busy").await?;
        let hints = bus.cancel_hints().await?;

        let sweeper = bus.sweeper(&pool, lifecycle(120_000));
        let s = sweeper.reap_pass().await?;
        ensure!(s.action("paused") == 1 && s.total_actions() == 1, "{s:?}");
        let r = get(&pool, "run-12").await?;
        ensure!(r.status == AutomationRunStatus::Paused, "{:?}", r.status);
        ensure!(r.pause_reason.as_deref() == Some("stale_no_provider_activity"));
        ensure!(r.stop_kind == Some(AutomationStopKind::StaleReaped));
        let detail = "automation run paused after no provider activity for at least 120s";
        ensure!(r.detail.as_deref() == Some(detail), "{:?}", r.detail);
        ensure!(r.stop_reason.as_deref() == Some(detail));
        ensure!(r.active_session_ids.is_empty() && r.latest_session_id.is_none());
        ensure!(r.active_instance_ids.is_empty());
        ensure!(r.tenant_context == tenant(), "tenant preserved");
        ensure!(count(&r, "run_paused_stale_no_provider_activity") == 1);
        ensure!(
            row_xmin(&pool, "run-12-busy").await? == busy_xmin,
            "busy run touched"
        );

        // Capacity and the workspace lock are released: a queued run on the same root launches.
        insert(&pool, &queued("run-12-next", &spec, now), 0, now).await?;
        bus.scheduler(&pool).claim_once().await?;
        ensure!(get(&pool, "run-12-next").await?.status == AutomationRunStatus::Running);

        // Workers are told to stop, once, with the epoch the reap ended.
        let h = wait_hints(&hints, 1).await?;
        let mine: Vec<_> = h.iter().filter(|c| c.run_id == "run-12").collect();
        ensure!(mine.len() == 1, "{h:?}");
        ensure!(mine[0].lease_epoch == Some(2), "{:?}", mine[0]);

        let a = audits(&pool, "run-12").await?;
        ensure!(a.len() == 1, "{a:?}");
        let (event_type, actor, audit_tenant, payload) = &a[0];
        ensure!(event_type == "automation_v2.internal_sweep.paused_stale_run");
        ensure!(actor.as_deref() == Some("tandem-server:internal-sweep"));
        ensure!(audit_tenant["org_id"] == "org-sweep");
        ensure!(payload["sweep"] == "reap_stale_running_automation_runs");
        ensure!(payload["outcome"] == "paused");
        ensure!(payload["metadata"]["stale_after_ms"] == 120_000);
        let published = bus.published_event_types().await?;
        ensure!(
            published
                .iter()
                .filter(|t| *t == "automation_v2.run.paused_stale_no_provider_activity")
                .count()
                == 1,
            "{published:?}"
        );

        // Nothing left to do: a second pass writes nothing.
        let xmin = row_xmin(&pool, "run-12").await?;
        let s = sweeper.reap_pass().await?;
        ensure!(s.total_actions() == 0, "{s:?}");
        ensure!(row_xmin(&pool, "run-12").await? == xmin);
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn cases_13_27_owner_less_run_is_reaped_repairable_resumed_once_and_redispatched()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let spec = topics_spec(None);
        tandem_store::upsert_automation(&pool, &spec).await?;
        let run = executing_topics("run-13", &spec, now - 180 * SEC);
        insert(&pool, &run, 1, now - 180 * SEC).await?;
        let sweeper = bus.sweeper(&pool, lifecycle(120_000));

        ensure!(sweeper.reap_pass().await?.action("paused") == 1);
        let r = get(&pool, "run-13").await?;
        let detail = r.detail.clone().unwrap_or_default();
        ensure!(
            detail.contains("repairable node(s): cluster_topics"),
            "{detail}"
        );
        let out = &r.checkpoint.node_outputs["cluster_topics"];
        ensure!(out["status"] == "needs_repair", "{out}");
        ensure!(
            out["blocked_reason"]
                .as_str()
                .is_some_and(|s| s.contains("no provider activity")),
            "{out}"
        );
        ensure!(
            r.checkpoint
                .last_failure
                .as_ref()
                .map(|f| f.node_id.as_str())
                == Some("cluster_topics")
        );
        // Case 27, fleet form: the run's owner is gone, yet it is not failed as a server restart.
        ensure!(count(&r, "run_failed_server_restart") == 0);

        let s = sweeper.resume_pass().await?;
        ensure!(s.action("stale") == 1 && s.total_actions() == 1, "{s:?}");
        let r = get(&pool, "run-13").await?;
        ensure!(r.status == AutomationRunStatus::Queued);
        ensure!(r.pause_reason.is_none() && r.stop_kind.is_none() && r.stop_reason.is_none());
        ensure!(r.checkpoint.is_pending("cluster_topics"));
        ensure!(r.checkpoint.output_status("cluster_topics").as_deref() == Some("needs_repair"));
        ensure!(r.tenant_context == tenant());
        let resumed = r
            .checkpoint
            .lifecycle_history
            .iter()
            .filter(|l| l.event == "run_auto_resumed")
            .collect::<Vec<_>>();
        ensure!(resumed.len() == 1);
        ensure!(resumed[0].reason.as_deref() == Some("auto_resume_after_stale_reap"));
        let a = audits(&pool, "run-13").await?;
        ensure!(
            a.iter()
                .filter(|x| x.0 == "automation_v2.internal_sweep.auto_resumed_stale_reaped_run")
                .count()
                == 1
        );
        ensure!(
            sweeper.resume_pass().await?.total_actions() == 0,
            "resumed twice"
        );

        // The scheduler re-dispatches the stalled node as the next attempt, with its repair context.
        bus.scheduler(&pool).claim_once().await?;
        let r = get(&pool, "run-13").await?;
        ensure!(r.status == AutomationRunStatus::Running, "{:?}", r.status);
        let tasks = dispatched(&pool, "run-13").await?;
        ensure!(
            tasks == vec![("cluster_topics".to_owned(), 2, true)],
            "{tasks:?}"
        );
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn case_16_terminal_stale_node_fails_the_run_and_is_never_resumed() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let spec = topics_spec(Some(1));
        let run = executing_topics("run-16", &spec, now - 180 * SEC);
        insert(&pool, &run, 1, now - 180 * SEC).await?;
        let sweeper = bus.sweeper(&pool, lifecycle(120_000));
        let s = sweeper.reap_pass().await?;
        ensure!(s.action("failed") == 1, "{s:?}");
        let r = get(&pool, "run-16").await?;
        ensure!(r.status == AutomationRunStatus::Failed);
        ensure!(r.pause_reason.is_none());
        ensure!(r.stop_kind == Some(AutomationStopKind::StaleReaped));
        ensure!(
            r.detail
                .as_deref()
                .is_some_and(|d| d.contains("terminal stale node(s): cluster_topics")),
            "{:?}",
            r.detail
        );
        let out = &r.checkpoint.node_outputs["cluster_topics"];
        ensure!(
            out["status"] == "failed" && out["failure_kind"] == "run_failed",
            "{out}"
        );
        ensure!(count(&r, "run_failed_stale_no_provider_activity") == 1);
        let ob = outbox_types(&pool, "run-16").await?;
        ensure!(ob.get("automation_v2.run.failed") == Some(&1), "{ob:?}");
        ensure!(
            ob.get("automation_v2.run.failed_stale_no_provider_activity") == Some(&1),
            "{ob:?}"
        );
        ensure!(sweeper.resume_pass().await?.total_actions() == 0);
        ensure!(get(&pool, "run-16").await?.status == AutomationRunStatus::Failed);
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn cases_17_18_recent_worker_activity_or_recent_history_keeps_a_run_alive()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let spec = topics_spec(None);
        // Case 17/18: old lifecycle, but the worker reported progress just now (activity column).
        insert(
            &pool,
            &executing_topics("run-17", &spec, now - 10 * MIN),
            1,
            now,
        )
        .await?;
        // The row's own history is recent although the activity column is old.
        insert(
            &pool,
            &executing_topics("run-18", &spec, now - 5 * SEC),
            1,
            now - 10 * MIN,
        )
        .await?;
        // Idle past the base threshold but inside the node timeout + 60 s grace (2 min).
        insert(
            &pool,
            &executing_topics("run-18b", &spec, now - 90 * SEC),
            1,
            now - 90 * SEC,
        )
        .await?;
        let xmins = [
            row_xmin(&pool, "run-17").await?,
            row_xmin(&pool, "run-18").await?,
            row_xmin(&pool, "run-18b").await?,
        ];
        let sweeper = bus.sweeper(&pool, lifecycle(30_000));
        let s = sweeper.reap_pass().await?;
        ensure!(s.total_actions() == 0, "{s:?}");
        ensure!(s.declined.get("not_stale") == Some(&2), "{s:?}");
        for (id, x) in ["run-17", "run-18", "run-18b"].iter().zip(&xmins) {
            let r = get(&pool, id).await?;
            ensure!(r.status == AutomationRunStatus::Running, "{id}");
            ensure!(row_xmin(&pool, id).await? == *x, "{id} rewritten");
        }
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// auto-resume (spec §3.8, §3.9)

/// A run stale-reaped at `reaped_at` after `resumes` earlier stale episodes, with a repairable
/// `cluster_topics` (attempts `attempts`).
fn reaped(
    run_id: &str,
    spec: &AutomationV2Spec,
    reaped_at: Millis,
    resumes: usize,
    attempts: u32,
) -> AutomationV2RunRecord {
    let mut run = running(run_id, spec, reaped_at.saturating_sub(HOUR));
    complete_node(&mut run, "collect", reaped_at.saturating_sub(50 * MIN));
    let mut t = reaped_at.saturating_sub(40 * MIN);
    for i in 0..resumes {
        start_node(
            &mut run,
            "cluster_topics",
            u32::try_from(i + 1).unwrap_or(1),
            1,
            t,
        );
        push_record(
            &mut run,
            "run_paused_stale_no_provider_activity",
            Some("stale"),
            Some(AutomationStopKind::StaleReaped),
            json!({}),
            t + MIN,
        );
        push_record(
            &mut run,
            "run_auto_resumed",
            Some("auto_resume_after_stale_reap"),
            None,
            json!({}),
            t + 2 * MIN,
        );
        t += 5 * MIN;
    }
    start_node(
        &mut run,
        "cluster_topics",
        attempts,
        1,
        reaped_at.saturating_sub(5 * MIN),
    );
    push_record(
        &mut run,
        "run_paused_stale_no_provider_activity",
        Some("stale"),
        Some(AutomationStopKind::StaleReaped),
        json!({}),
        reaped_at,
    );
    run.checkpoint.node_outputs.insert(
        "cluster_topics".into(),
        json!({"status": "needs_repair", "blocked_reason": "node execution stalled"}),
    );
    run.status = AutomationRunStatus::Paused;
    run.stop_kind = Some(AutomationStopKind::StaleReaped);
    run.pause_reason = Some("stale_no_provider_activity".into());
    run.detail = Some("automation run paused after no provider activity".into());
    run.updated_at_ms = reaped_at;
    run
}

#[tokio::test]
async fn untested_window_and_cap_work_together_end_to_end() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let spec = topics_spec(Some(10));
        // Inside the window, below the cap (1 earlier resume, cap 2): resumed.
        insert(
            &pool,
            &reaped("in-window", &spec, now - MIN, 1, 2),
            0,
            now - MIN,
        )
        .await?;
        // Inside the window, cap reached (2 earlier resumes).
        insert(
            &pool,
            &reaped("capped", &spec, now - MIN, 2, 3),
            0,
            now - MIN,
        )
        .await?;
        // Reaped 21 minutes ago: outside the default 20-minute window.
        insert(
            &pool,
            &reaped("too-old", &spec, now - 21 * MIN, 0, 1),
            0,
            now - 21 * MIN,
        )
        .await?;
        // The window edge is inclusive and measured on the lifecycle record, not updated_at.
        let mut edge = reaped("edge", &spec, now - 19 * MIN, 0, 1);
        edge.updated_at_ms = now - 30 * SEC;
        insert(&pool, &edge, 0, now).await?;
        // Attempts exhausted: nothing to repair.
        insert(
            &pool,
            &reaped("exhausted", &spec, now - MIN, 0, 10),
            0,
            now - MIN,
        )
        .await?;
        let sweeper = bus.sweeper(&pool, lifecycle(600_000));
        let s = sweeper.resume_pass().await?;
        ensure!(s.action("stale") == 2, "{s:?}");
        ensure!(s.declined.get("cap_reached") == Some(&1), "{s:?}");
        ensure!(s.declined.get("no_repairable_node") == Some(&1), "{s:?}");
        for (id, status) in [
            ("in-window", AutomationRunStatus::Queued),
            ("edge", AutomationRunStatus::Queued),
            ("capped", AutomationRunStatus::Paused),
            ("too-old", AutomationRunStatus::Paused),
            ("exhausted", AutomationRunStatus::Paused),
        ] {
            let r = get(&pool, id).await?;
            ensure!(r.status == status, "{id}: {:?}", r.status);
        }
        let r = get(&pool, "in-window").await?;
        ensure!(
            count(&r, "run_auto_resumed") == 2,
            "cap now reached for the next episode"
        );
        // The next episode of the resumed run is refused by the cap.
        tandem_store::transition_run(
            &pool,
            "in-window",
            Fence::Unfenced,
            &settings(),
            |run, env| {
                update(run, env.now_ms, |r, fx| {
                    r.status = AutomationRunStatus::Paused;
                    r.stop_kind = Some(AutomationStopKind::StaleReaped);
                    fx.lifecycle(
                        r,
                        "run_paused_stale_no_provider_activity",
                        None,
                        Some(AutomationStopKind::StaleReaped),
                        None,
                        env.now_ms,
                    );
                })
            },
        )
        .await?;
        let s = sweeper.resume_pass().await?;
        ensure!(
            s.total_actions() == 0 && s.declined.get("cap_reached") == Some(&2),
            "{s:?}"
        );
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

/// A run held at launch by a spend pause on `agent` (paused, `guardrail_stopped`,
/// `run_launch_held`), created through a real claim.
async fn held_run(
    bus: &Bus,
    pool: &Pool,
    run_id: &str,
    spec: &AutomationV2Spec,
) -> anyhow::Result<()> {
    let now = db_now(pool).await?;
    insert(pool, &queued(run_id, spec, now), 0, now).await?;
    bus.scheduler(pool).claim_once().await?;
    let r = get(pool, run_id).await?;
    ensure!(
        r.status == AutomationRunStatus::Paused,
        "{run_id} not held: {:?}",
        r.status
    );
    ensure!(count(&r, "run_launch_held") == 1);
    Ok(())
}

#[tokio::test]
async fn case_14_and_fix_7_6_guardrail_resume_after_override_even_with_the_stale_kill_switch()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let spec = spec_of(
            "auto-guardrail",
            vec![task("n1", &[])],
            &["agent-guardrail-resume"],
        );
        let key = agent_scope_key(&tenant(), "agent-guardrail-resume");
        tandem_store::pause_agent_spend(&pool, &key, Some("test")).await?;
        held_run(&bus, &pool, "run-14", &spec).await?;
        // A stale-reaped run as well, to show the kill switch stops only the stale path.
        insert(
            &pool,
            &reaped("run-14-stale", &topics_spec(None), now - MIN, 0, 1),
            0,
            now - MIN,
        )
        .await?;

        let mut settings = lifecycle(600_000);
        settings.stale.stale_auto_resume_disabled = true;
        let sweeper = bus.sweeper(&pool, settings);
        let s = sweeper.resume_pass().await?;
        ensure!(s.total_actions() == 0, "before any override: {s:?}");
        ensure!(get(&pool, "run-14").await?.status == AutomationRunStatus::Paused);

        // An override for another agent changes nothing.
        tandem_store::insert_quota_override(
            &pool,
            &NewQuotaOverride {
                agent_key: agent_scope_key(&tenant(), "someone-else"),
                status: QuotaOverrideStatus::Approved,
                expires_at_ms: now + DAY,
                approved_by: Some("ops".into()),
                reason: None,
            },
        )
        .await?;
        let s = sweeper.resume_pass().await?;
        ensure!(
            s.total_actions() == 0 && s.declined.get("launch_still_held") == Some(&1),
            "{s:?}"
        );

        tandem_store::insert_quota_override(
            &pool,
            &NewQuotaOverride {
                agent_key: key.clone(),
                status: QuotaOverrideStatus::Approved,
                expires_at_ms: now + DAY,
                approved_by: Some("ops".into()),
                reason: None,
            },
        )
        .await?;
        let s = sweeper.resume_pass().await?;
        ensure!(
            s.action("guardrail") == 1 && s.total_actions() == 1,
            "{s:?}"
        );
        let r = get(&pool, "run-14").await?;
        ensure!(r.status == AutomationRunStatus::Queued);
        ensure!(r.pause_reason.is_none() && r.stop_kind.is_none() && r.stop_reason.is_none());
        let last = r.checkpoint.lifecycle_history.last().context("history")?;
        ensure!(last.event == "run_auto_resumed");
        ensure!(last.reason.as_deref() == Some("auto_resume_after_guardrail_override"));
        ensure!(
            get(&pool, "run-14-stale").await?.status == AutomationRunStatus::Paused,
            "kill switch ignored"
        );
        // The next claim launches it (no hold/resume flapping).
        bus.scheduler(&pool).claim_once().await?;
        ensure!(get(&pool, "run-14").await?.status == AutomationRunStatus::Running);
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// recovery (spec §3.6, §4.5)

#[tokio::test]
async fn untested_stuck_pausing_runs_settle_to_paused_only_when_their_tasks_are_gone()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let spec = topics_spec(None);
        let pausing = |id: &str, started: Millis, epoch: i64| {
            let mut run = executing_topics(id, &spec, started);
            // The node started under `epoch`; the row's epoch is 1.
            if let Some(l) = run.checkpoint.lifecycle_history.last_mut()
                && let Some(m) = l.metadata.as_mut()
            {
                m["lease_epoch"] = json!(epoch);
            }
            run.status = AutomationRunStatus::Pausing;
            run.pause_reason = Some("operator asked".into());
            run
        };
        // Task in flight, worker active: left alone.
        insert(&pool, &pausing("pausing-live", now - 10 * SEC, 1), 1, now).await?;
        // Task in flight, no activity for 10 minutes (node timeout 60 s + 60 s grace): settled.
        let mut gone = pausing("pausing-gone", now - 10 * MIN, 1);
        std::sync::Arc::make_mut(gone.automation_snapshot.as_mut().context("snapshot")?)
            .workspace_root = Some("/ws/pausing".into());
        insert(&pool, &gone, 1, now - 10 * MIN).await?;
        // Nothing in flight under the current epoch (an orphan of epoch 0): settled at once.
        insert(&pool, &pausing("pausing-idle", now - 5 * SEC, 0), 1, now).await?;
        let live_xmin = row_xmin(&pool, "pausing-live").await?;
        let hints = bus.cancel_hints().await?;

        let sweeper = bus.sweeper(&pool, lifecycle(60_000));
        let s = sweeper.recover_pass().await?;
        ensure!(s.action("pausing_settled") == 2, "{s:?}");
        ensure!(s.declined.get("in_flight") == Some(&1), "{s:?}");
        ensure!(row_xmin(&pool, "pausing-live").await? == live_xmin);
        for id in ["pausing-gone", "pausing-idle"] {
            let r = get(&pool, id).await?;
            ensure!(r.status == AutomationRunStatus::Paused, "{id}");
            ensure!(count(&r, "run_pausing_settled_on_restart") == 1, "{id}");
            ensure!(r.pause_reason.as_deref() == Some("operator asked"), "kept");
            let a = audits(&pool, id).await?;
            ensure!(
                a.len() == 1
                    && a[0].0 == "automation_v2.internal_sweep.server_restart_settled_pausing_run",
                "{a:?}"
            );
        }
        // Only the run whose tasks were abandoned gets a cancel hint.
        let h = wait_hints(&hints, 1).await?;
        ensure!(h.len() == 1 && h[0].run_id == "pausing-gone", "{h:?}");
        // The workspace lock is free again.
        insert(
            &pool,
            &{
                let mut s2 = spec.clone();
                s2.workspace_root = Some("/ws/pausing".into());
                queued("pausing-next", &s2, now)
            },
            0,
            now,
        )
        .await?;
        bus.scheduler(&pool).claim_once().await?;
        ensure!(get(&pool, "pausing-next").await?.status == AutomationRunStatus::Running);
        ensure!(
            sweeper.recover_pass().await?.total_actions() == 0,
            "settled twice"
        );
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

/// `compose` → `approval_gate` (rework target compose) → `send`, the gate open since `at`.
fn awaiting(
    run_id: &str,
    spec: &AutomationV2Spec,
    at: Millis,
) -> anyhow::Result<AutomationV2RunRecord> {
    let mut run = running(run_id, spec, at.saturating_sub(MIN));
    complete_node(&mut run, "compose", at.saturating_sub(SEC));
    let node = spec.node("approval_gate").context("gate node")?;
    run.checkpoint.awaiting_gate = Some(build_pending_gate(node, at).context("gate")?);
    run.status = AutomationRunStatus::AwaitingApproval;
    Ok(run)
}

fn email_spec() -> AutomationV2Spec {
    spec_of(
        "auto-email",
        vec![
            task("compose", &[]),
            AutomationFlowNode::approval("approval_gate", &["compose"], &["compose"]),
            task("send", &["approval_gate"]),
        ],
        &["agent-mail"],
    )
}

#[tokio::test]
async fn cases_25_31_half_applied_gate_decision_is_recovered_once_and_nothing_else_is()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let spec = email_spec();
        tandem_store::upsert_automation(&pool, &spec).await?;
        let approve = GateDecisionRequest::new("approve", GovernanceActorRef::human("alice"))
            .with_reason("LGTM");

        // Case 31: history has `approve`, the status is still awaiting with the gate set.
        let open = awaiting("half-applied", &spec, now - MIN)?;
        let mut decided = open.clone();
        let t = decide_gate(&mut decided, &spec, &GATES, &approve, now - 30 * SEC);
        ensure!(matches!(t.outcome, GateDecisionOutcome::Applied { .. }));
        let mut half = open.clone();
        half.checkpoint.gate_history = decided.checkpoint.gate_history.clone();
        insert(&pool, &half, 1, now).await?;
        // Case 25: an awaiting gate without a decision is left alone.
        insert(&pool, &awaiting("still-waiting", &spec, now - MIN)?, 1, now).await?;
        // §7.13: a decision of an earlier instance never settles the re-opened gate.
        let mut reopened = awaiting("reopened", &spec, now - MIN)?;
        reopened.checkpoint.gate_history = decided.checkpoint.gate_history.clone();
        reopened.checkpoint.gate_history[0].decided_at_ms = now - 2 * MIN;
        insert(&pool, &reopened, 1, now).await?;
        let xmins = [row_xmin(&pool, "still-waiting").await?, row_xmin(&pool, "reopened").await?];

        let sweeper = bus.sweeper(&pool, lifecycle(600_000));
        let s = sweeper.recover_pass().await?;
        ensure!(s.action("decision_recovered") == 1 && s.total_actions() == 1, "{s:?}");
        let r = get(&pool, "half-applied").await?;
        ensure!(r.status == AutomationRunStatus::Queued, "{:?}", r.status);
        ensure!(r.checkpoint.awaiting_gate.is_none());
        ensure!(r.checkpoint.gate_history.len() == 1);
        ensure!(r.checkpoint.is_completed("approval_gate"));
        ensure!(r.checkpoint.is_pending("send"));
        ensure!(count(&r, "approval_gate_decision_recovered") == 1);
        let a = audits(&pool, "half-applied").await?;
        ensure!(
            a.iter().filter(|x| x.0 == "automation_v2.internal_sweep.approval_gate_decision_recovered").count() == 1,
            "{a:?}"
        );
        ensure!(row_xmin(&pool, "still-waiting").await? == xmins[0]);
        ensure!(row_xmin(&pool, "reopened").await? == xmins[1]);
        ensure!(sweeper.recover_pass().await?.total_actions() == 0, "recovered twice");

        // A duplicate approve after the recovery is refused with the recorded winner.
        let dup = tandem_store::transition_run(&pool, "half-applied", Fence::Unfenced, &settings(), |run, env| {
            decide_gate(run, &spec, &GATES, &approve, env.now_ms)
        })
        .await?;
        ensure!(matches!(dup.outcome, GateDecisionOutcome::AlreadyDecided(Some(ref w)) if w.decision == "approve"), "{:?}", dup.outcome);
        ensure!(get(&pool, "half-applied").await?.checkpoint.gate_history.len() == 1);
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn cases_19_24_26_28_no_pass_touches_queued_paused_blocked_terminal_or_waiting_runs()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let mut spec = topics_spec(None);
        spec.workspace_root = Some("/ws/shared".into());
        let old = now - 2 * HOUR;
        // Case 24/28: a queued run; case 19/28: an operator-paused run on the same root.
        insert(&pool, &queued("queued-run", &spec, old), 0, old).await?;
        let mut paused = executing_topics("paused-run", &spec, old);
        paused.status = AutomationRunStatus::Paused;
        paused.pause_reason = Some("operator".into());
        insert(&pool, &paused, 2, old).await?;
        // Case 26: a blocked run; and a recently completed one.
        let mut blocked = executing_topics("blocked-run", &topics_spec(None), old);
        blocked.status = AutomationRunStatus::Blocked;
        blocked.checkpoint.blocked_nodes = vec!["cluster_topics".into()];
        insert(&pool, &blocked, 2, old).await?;
        let mut done = running("completed-run", &topics_spec(None), old);
        done.status = AutomationRunStatus::Completed;
        insert(&pool, &done, 2, old).await?;
        // Case 25: an awaiting run with no decision.
        insert(
            &pool,
            &awaiting("awaiting-run", &email_spec(), old)?,
            1,
            old,
        )
        .await?;
        let ids = [
            "queued-run",
            "paused-run",
            "blocked-run",
            "completed-run",
            "awaiting-run",
        ];
        let mut before = Vec::new();
        for id in ids {
            before.push((row_xmin(&pool, id).await?, get(&pool, id).await?));
        }
        let sweeper = bus.sweeper(&pool, lifecycle(60_000));
        for duty in Duty::ALL {
            let s = sweeper.pass(duty).await?;
            ensure!(s.total_actions() == 0, "{duty}: {s:?}");
        }
        for (id, (xmin, run)) in ids.iter().zip(&before) {
            ensure!(row_xmin(&pool, id).await? == *xmin, "{id} rewritten");
            ensure!(get(&pool, id).await? == *run, "{id} changed");
        }
        // Case 19: the paused run holds no workspace lock; the queued run on its root launches.
        bus.scheduler(&pool).claim_once().await?;
        ensure!(get(&pool, "queued-run").await?.status == AutomationRunStatus::Running);
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn case_33_a_corrupt_row_is_counted_and_left_alone_while_its_batch_proceeds()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let spec = topics_spec(None);
        for id in ["corrupt", "healthy"] {
            insert(&pool, &executing_topics(id, &spec, now - HOUR), 1, now - HOUR).await?;
        }
        let c = pool.get().await?;
        c.execute(
            "UPDATE runs SET doc = jsonb_set(doc, '{checkpoint}', '\"not a checkpoint\"') WHERE run_id = 'corrupt'",
            &[],
        )
        .await?;
        let xmin = row_xmin(&pool, "corrupt").await?;
        let sweeper = bus.sweeper(&pool, lifecycle(60_000));
        let s = sweeper.reap_pass().await?;
        ensure!(s.errors == 1 && s.action("paused") == 1, "{s:?}");
        ensure!(row_xmin(&pool, "corrupt").await? == xmin, "corrupt row rewritten");
        ensure!(get(&pool, "healthy").await?.status == AutomationRunStatus::Paused);
        ensure!(sweeper.stats().run_errors == 0, "stats count only passes run through `pass`");
        let s = sweeper.pass(Duty::Reap).await?;
        ensure!(s.errors == 1 && sweeper.stats().run_errors == 1, "{s:?}");
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// the operator shutdown action (spec §3.12)

#[tokio::test]
async fn case_34_shutdown_action_fails_running_runs_only_with_attributed_audit_and_cancel_hints()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let spec = topics_spec(None);
        for i in 0..5 {
            insert(
                &pool,
                &executing_topics(&format!("running-{i}"), &spec, now),
                1,
                now,
            )
            .await?;
        }
        let mut pausing = executing_topics("pausing-run", &spec, now);
        pausing.status = AutomationRunStatus::Pausing;
        insert(&pool, &pausing, 1, now).await?;
        insert(&pool, &queued("queued-run", &spec, now), 0, now).await?;
        let untouched = [
            row_xmin(&pool, "pausing-run").await?,
            row_xmin(&pool, "queued-run").await?,
        ];
        let hints = bus.cancel_hints().await?;

        let sweeper = bus.sweeper(&pool, lifecycle(600_000));
        let report = sweeper.fail_running_runs_for_shutdown().await?;
        ensure!(report.failed.len() == 5 && report.errors == 0, "{report:?}");
        for i in 0..5 {
            let id = format!("running-{i}");
            let r = get(&pool, &id).await?;
            ensure!(r.status == AutomationRunStatus::Failed);
            ensure!(r.stop_kind == Some(AutomationStopKind::Shutdown));
            ensure!(r.detail.as_deref() == Some("automation run stopped during server shutdown"));
            ensure!(r.stop_reason == r.detail);
            ensure!(count(&r, "run_failed_shutdown") == 1);
            let a = audits(&pool, &id).await?;
            ensure!(a.len() == 1, "{a:?}");
            let (event_type, actor, audit_tenant, payload) = &a[0];
            ensure!(event_type == "automation_v2.internal_sweep.shutdown_failed_run");
            ensure!(actor.as_deref() == Some("tandem-server:internal-sweep"));
            ensure!(
                *audit_tenant == serde_json::to_value(tenant())?,
                "{audit_tenant}"
            );
            ensure!(payload["run_id"] == id.as_str());
            ensure!(payload["sweep"] == "fail_running_automation_runs_for_shutdown");
            ensure!(payload["outcome"] == "failed_running_run");
            ensure!(payload["metadata"]["previous_status"] == "running");
        }
        ensure!(
            row_xmin(&pool, "pausing-run").await? == untouched[0],
            "pausing touched"
        );
        ensure!(
            row_xmin(&pool, "queued-run").await? == untouched[1],
            "queued touched"
        );
        let h = wait_hints(&hints, 5).await?;
        ensure!(h.len() == 5, "{h:?}");
        let again = sweeper.fail_running_runs_for_shutdown().await?;
        ensure!(again.failed.is_empty(), "{again:?}");
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// weekly spend caps (spec §3.5)

#[tokio::test]
async fn cases_35_36_37_weekly_spend_cap_pauses_holds_hard_stops_and_an_override_resumes()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let agent = "agent-spender";
        let spec_a = spec_of("auto-spend-a", vec![task("n1", &[])], &[agent]);
        let mut spec_b = spec_of("auto-spend-b", vec![task("n1", &[])], &[agent]);
        spec_b.metadata =
            Some(json!({"tenant_context": TenantContext::explicit("org-other", "ws-sweep")}));
        let sweeper = bus.sweeper(&pool, lifecycle(600_000));

        // Case 36: without governance state nothing is paused and runs launch normally.
        let s = sweeper.spend_pass().await?;
        ensure!(s.total_actions() == 0, "{s:?}");

        tandem_store::upsert_spend_cap(
            &pool,
            &SpendCap {
                org_id: "org-sweep".into(),
                workspace_id: "ws-sweep".into(),
                agent_id: agent.into(),
                weekly_cap_usd: 10.0,
            },
        )
        .await?;
        // Run A spent 12 USD this week; a run that spent 100 USD 8 days ago no longer counts.
        let mut spent = running("spent-a", &spec_a, now - HOUR);
        spent.status = AutomationRunStatus::Completed;
        spent.estimated_cost_usd = 7.0;
        insert(&pool, &spent, 2, now).await?;
        let mut spent2 = spent.clone();
        spent2.run_id = "spent-a2".into();
        spent2.estimated_cost_usd = 5.0;
        insert(&pool, &spent2, 2, now).await?;
        let mut ancient = spent.clone();
        ancient.run_id = "spent-long-ago".into();
        ancient.estimated_cost_usd = 100.0;
        ancient.created_at_ms = now - 9 * DAY;
        ancient.updated_at_ms = now - 8 * DAY;
        insert(&pool, &ancient, 2, now).await?;
        // Running runs of the capped agent in tenant A and of a same-named agent in tenant B.
        insert(&pool, &running("running-a", &spec_a, now), 1, now).await?;
        insert(&pool, &running("running-b", &spec_b, now), 1, now).await?;
        let b_xmin = row_xmin(&pool, "running-b").await?;
        let hints = bus.cancel_hints().await?;

        let s = sweeper.spend_pass().await?;
        ensure!(s.action("agent_paused") == 1, "{s:?}");
        ensure!(s.action("override_requested") == 1, "{s:?}");
        ensure!(s.action("run_hard_stopped") == 1, "{s:?}");
        let key_a = agent_scope_key(&tenant(), agent);
        let gov = tandem_store::governance_snapshot(&pool).await?;
        ensure!(
            gov.spend_paused_agents.len() == 1 && gov.spend_paused_agents.contains(&key_a),
            "{gov:?}"
        );
        // The hard stop pauses the running run of tenant A only (case 37), with a cancel hint.
        let r = get(&pool, "running-a").await?;
        ensure!(r.status == AutomationRunStatus::Paused);
        ensure!(r.stop_kind == Some(AutomationStopKind::GuardrailStopped));
        ensure!(count(&r, "run_paused_spend_cap_exceeded") == 1);
        ensure!(
            row_xmin(&pool, "running-b").await? == b_xmin,
            "tenant B touched"
        );
        let h = wait_hints(&hints, 1).await?;
        ensure!(h.len() == 1 && h[0].run_id == "running-a", "{h:?}");

        // Case 35: a queued run of the capped agent is held at launch; tenant B's launches (37).
        insert(&pool, &queued("queued-a", &spec_a, now), 0, now).await?;
        insert(&pool, &queued("queued-b", &spec_b, now), 0, now).await?;
        bus.scheduler(&pool).claim_once().await?;
        let held = get(&pool, "queued-a").await?;
        ensure!(held.status == AutomationRunStatus::Paused && count(&held, "run_launch_held") == 1);
        ensure!(get(&pool, "queued-b").await?.status == AutomationRunStatus::Running);

        // A second evaluation changes nothing (no duplicate pause, request or stop).
        let s = sweeper.spend_pass().await?;
        ensure!(s.total_actions() == 0, "{s:?}");
        let s = sweeper.resume_pass().await?;
        ensure!(s.total_actions() == 0, "resumed without an override: {s:?}");

        // Approving the auto-created quota-override request lifts the pause for that agent only.
        let c = pool.get().await?;
        let pending: Vec<tokio_postgres::Row> = c
            .query(
                "SELECT id, agent_key FROM quota_overrides WHERE status = 'pending'",
                &[],
            )
            .await?;
        ensure!(pending.len() == 1, "one request");
        let id: uuid::Uuid = pending[0].get(0);
        ensure!(pending[0].get::<_, String>(1) == key_a);
        tandem_store::set_quota_override_status(
            &pool,
            id,
            QuotaOverrideStatus::Approved,
            Some("ops"),
        )
        .await?;
        let s = sweeper.resume_pass().await?;
        ensure!(
            s.action("guardrail") == 2,
            "held and hard-stopped runs resume: {s:?}"
        );
        ensure!(
            sweeper.spend_pass().await?.total_actions() == 0,
            "an overridden agent is not stopped again"
        );
        bus.scheduler(&pool).claim_once().await?;
        for id in ["queued-a", "running-a"] {
            let r = get(&pool, id).await?;
            ensure!(
                r.status == AutomationRunStatus::Running,
                "{id}: {:?}",
                r.status
            );
        }

        // Removing the cap lifts the sweeper's pause on the next evaluation.
        c.execute("DELETE FROM spend_caps", &[]).await?;
        let s = sweeper.spend_pass().await?;
        ensure!(s.action("agent_lifted") == 1, "{s:?}");
        ensure!(
            tandem_store::governance_snapshot(&pool)
                .await?
                .spend_paused_agents
                .is_empty()
        );
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spend_evaluation_is_a_singleton_per_pass_across_replicas() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let spec = spec_of("auto-spend", vec![task("n1", &[])], &["a1", "a2", "a3"]);
        for a in ["a1", "a2", "a3"] {
            tandem_store::upsert_spend_cap(
                &pool,
                &SpendCap {
                    org_id: "org-sweep".into(),
                    workspace_id: "ws-sweep".into(),
                    agent_id: a.into(),
                    weekly_cap_usd: 1.0,
                },
            )
            .await?;
        }
        let mut spent = running("spent", &spec, now);
        spent.status = AutomationRunStatus::Completed;
        spent.estimated_cost_usd = 3.0;
        insert(&pool, &spent, 2, now).await?;
        let sweepers: Vec<Sweeper> = (0..3)
            .map(|_| bus.sweeper(&pool, lifecycle(600_000)))
            .collect();
        let passes = futures::future::join_all(sweepers.iter().map(|s| s.spend_pass())).await;
        let mut paused = 0;
        for p in passes {
            paused += p?.action("agent_paused");
        }
        ensure!(
            paused == 3,
            "each agent paused once across replicas, got {paused}"
        );
        let c = pool.get().await?;
        let requests: i64 = c
            .query_one("SELECT count(*) FROM quota_overrides", &[])
            .await?
            .get(0);
        ensure!(requests == 3, "{requests} override requests");
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// retention

#[tokio::test]
async fn retention_prunes_heavy_values_of_old_terminal_runs_and_old_published_outbox_rows()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        let spec = topics_spec(None);
        let big = json!({"status": "completed", "summary": "x".repeat(400), "content": "y".repeat(20_000),
                         "attempt_evidence": {"artifact": {"status": "written", "path": "/a"}}});
        let terminal = |id: &str, status: AutomationRunStatus, updated: Millis| {
            let mut run = running(id, &spec, updated.saturating_sub(HOUR));
            complete_node(&mut run, "collect", updated.saturating_sub(MIN));
            run.checkpoint.node_outputs.insert("collect".into(), big.clone());
            run.checkpoint.node_outputs.insert("small".into(), json!({"status": "completed"}));
            run.status = status;
            run.updated_at_ms = updated;
            run
        };
        // Past the 7-day retention, one per terminal status.
        for (i, status) in TERMINAL_STATUSES.iter().enumerate() {
            insert(&pool, &terminal(&format!("old-{i}"), *status, now - 8 * DAY), 2, now).await?;
        }
        // Recent terminal, and an old but active run: kept as they are.
        insert(&pool, &terminal("recent", AutomationRunStatus::Completed, now - DAY), 2, now).await?;
        let mut active = terminal("old-paused", AutomationRunStatus::Paused, now - 8 * DAY);
        active.status = AutomationRunStatus::Paused;
        insert(&pool, &active, 2, now).await?;
        let kept = [
            (row_xmin(&pool, "recent").await?, "recent"),
            (row_xmin(&pool, "old-paused").await?, "old-paused"),
        ];
        let lifecycle_before = get(&pool, "old-0").await?.checkpoint.lifecycle_history;

        // Outbox: published 2 days ago (deleted), published just now and unpublished (kept).
        let c = pool.get().await?;
        for (n, published) in [("ob-old", Some("now() - interval '2 days'")), ("ob-new", Some("now()")), ("ob-unpublished", None)] {
            c.execute(
                &format!(
                    "INSERT INTO outbox (event_id, run_id, event_type, org_id, workspace_id, dedupe_id, payload, published_at)
                     VALUES (gen_random_uuid(), $1, 'x', 'o', 'w', $1, '{{}}', {})",
                    published.unwrap_or("NULL")
                ),
                &[&n],
            )
            .await?;
        }

        let sweeper = bus.sweeper(&pool, lifecycle(600_000));
        let s = sweeper.retention_pass().await?;
        ensure!(s.action("run_pruned") == 4 && s.action("value_pruned") == 4, "{s:?}");
        ensure!(s.action("outbox_deleted") == 1, "{s:?}");
        for i in 0..4 {
            let r = get(&pool, &format!("old-{i}")).await?;
            let out = &r.checkpoint.node_outputs["collect"];
            ensure!(out["status"] == "completed" && out.get("retention_pruned").is_some(), "{out}");
            ensure!(out.get("content").and_then(Value::as_str).is_some_and(|c| c.chars().count() <= 257));
            ensure!(out.get("attempt_evidence").is_none());
            ensure!(r.checkpoint.node_outputs["small"] == json!({"status": "completed"}));
            ensure!(r.updated_at_ms == now - 8 * DAY, "updated_at_ms bumped");
        }
        ensure!(get(&pool, "old-0").await?.checkpoint.lifecycle_history == lifecycle_before);
        for (xmin, id) in &kept {
            ensure!(row_xmin(&pool, id).await? == *xmin, "{id} rewritten");
        }
        let left: Vec<String> = c
            .query("SELECT run_id FROM outbox ORDER BY run_id", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ensure!(left == ["ob-new", "ob-unpublished"], "{left:?}");
        // Idempotent, and the walk resumes after the cursor.
        let s = sweeper.retention_pass().await?;
        ensure!(s.total_actions() == 0 && s.examined == 0, "{s:?}");
        sweeper.reset_retention_cursors();
        let s = sweeper.retention_pass().await?;
        ensure!(s.total_actions() == 0 && s.examined == 4, "stubs are never pruned again: {s:?}");

        // Retention 0 (upstream: archive at once) prunes the recent terminal run as well.
        let mut zero = lifecycle(600_000);
        zero.retention_days = 0;
        let s = bus.sweeper(&pool, zero).retention_pass().await?;
        ensure!(s.action("run_pruned") == 1, "{s:?}");
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// processes

fn service_env(db_url: &str, prefix: &Prefix, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("TANDEM_DATABASE_URL", db_url.to_owned()),
        ("TANDEM_NATS_URL", nats_url()),
        ("TANDEM_NATS_PREFIX", prefix.as_str().to_owned()),
        ("TANDEM_HEALTH_ADDR", format!("127.0.0.1:{port}")),
        ("RUST_LOG", "warn,tandem_sweeper=info".into()),
    ]
}

fn sweeper_env(db_url: &str, prefix: &Prefix, port: u16) -> Vec<(&'static str, String)> {
    let mut env = service_env(db_url, prefix, port);
    env.extend([
        ("TANDEM_SWEEPER_REAP_INTERVAL_MS", "200".to_owned()),
        ("TANDEM_SWEEPER_RESUME_INTERVAL_MS", "200".to_owned()),
        ("TANDEM_SWEEPER_RECOVER_INTERVAL_MS", "200".to_owned()),
        ("TANDEM_SWEEPER_SPEND_INTERVAL_MS", "2000".to_owned()),
    ]);
    env
}

/// Sum of `tandem_sweeper_actions_total` in a Prometheus text body.
fn actions_metric(body: &str) -> u64 {
    body.lines()
        .filter(|l| l.starts_with("tandem_sweeper_actions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The kinds of run of the three-replica test, and what each must end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// Stale, repairable: reaped, then auto-resumed.
    Repairable,
    /// Stale, attempts exhausted: reaped to failed.
    Terminal,
    /// Stale-reaped, auto-resume cap reached: left paused.
    Capped,
    /// Stale-reaped outside the window: left paused.
    OutsideWindow,
    /// Running with fresh activity: left alone.
    Fresh,
    /// Pausing with nothing in flight: settled.
    Pausing,
    /// Awaiting with a settled, unapplied approve: recovered.
    HalfApplied,
    /// Stale-reaped and resumable while an operator cancels it.
    CancelRace,
    /// Held at launch, an override approved: resumed by the guardrail path.
    Held,
}

const KINDS: [Kind; 9] = [
    Kind::Repairable,
    Kind::Terminal,
    Kind::Capped,
    Kind::OutsideWindow,
    Kind::Fresh,
    Kind::Pausing,
    Kind::HalfApplied,
    Kind::CancelRace,
    Kind::Held,
];

impl Kind {
    fn final_status(self) -> AutomationRunStatus {
        match self {
            Kind::Repairable | Kind::HalfApplied | Kind::Held => AutomationRunStatus::Queued,
            Kind::Terminal => AutomationRunStatus::Failed,
            Kind::Capped | Kind::OutsideWindow | Kind::Pausing => AutomationRunStatus::Paused,
            Kind::Fresh => AutomationRunStatus::Running,
            Kind::CancelRace => AutomationRunStatus::Cancelled,
        }
    }

    /// Lifecycle records the sweepers must add, exactly (the cancel race is checked apart).
    fn new_records(self) -> Vec<&'static str> {
        match self {
            Kind::Repairable => vec!["run_paused_stale_no_provider_activity", "run_auto_resumed"],
            Kind::Terminal => vec!["run_failed_stale_no_provider_activity"],
            Kind::Pausing => vec!["run_pausing_settled_on_restart"],
            Kind::HalfApplied => vec!["approval_gate_decision_recovered"],
            Kind::Held => vec!["run_auto_resumed"],
            Kind::Capped | Kind::OutsideWindow | Kind::Fresh | Kind::CancelRace => vec![],
        }
    }
}

fn build_fleet_run(
    kind: Kind,
    id: &str,
    now: Millis,
) -> anyhow::Result<(AutomationV2RunRecord, i64, Millis)> {
    Ok(match kind {
        Kind::Repairable => (
            executing_topics(id, &topics_spec(None), now - HOUR),
            1,
            now - HOUR,
        ),
        Kind::Terminal => (
            executing_topics(id, &topics_spec(Some(1)), now - HOUR),
            1,
            now - HOUR,
        ),
        Kind::Capped => (
            reaped(id, &topics_spec(Some(10)), now - MIN, 2, 3),
            0,
            now - MIN,
        ),
        Kind::OutsideWindow => (
            reaped(id, &topics_spec(None), now - 2 * HOUR, 0, 1),
            0,
            now - 2 * HOUR,
        ),
        Kind::Fresh => (executing_topics(id, &topics_spec(None), now), 1, now),
        Kind::Pausing => {
            let mut run = executing_topics(id, &topics_spec(None), now - 5 * SEC);
            if let Some(m) = run
                .checkpoint
                .lifecycle_history
                .last_mut()
                .and_then(|l| l.metadata.as_mut())
            {
                m["lease_epoch"] = json!(0);
            }
            run.status = AutomationRunStatus::Pausing;
            (run, 1, now)
        }
        Kind::HalfApplied => {
            let spec = email_spec();
            let open = awaiting(id, &spec, now - MIN)?;
            let mut decided = open.clone();
            let approve = GateDecisionRequest::new("approve", GovernanceActorRef::human("alice"));
            let _ = decide_gate(&mut decided, &spec, &GATES, &approve, now - 30 * SEC);
            let mut half = open;
            half.checkpoint.gate_history = decided.checkpoint.gate_history;
            (half, 1, now)
        }
        Kind::CancelRace => (
            reaped(id, &topics_spec(None), now - MIN, 0, 1),
            0,
            now - MIN,
        ),
        Kind::Held => {
            let spec = spec_of("auto-held", vec![task("n1", &[])], &["fleet-held-agent"]);
            let mut run = queued(id, &spec, now - 2 * MIN);
            run.status = AutomationRunStatus::Paused;
            run.stop_kind = Some(AutomationStopKind::GuardrailStopped);
            run.pause_reason = Some(tandem_core::claim::LAUNCH_HELD_DETAIL.into());
            push_record(
                &mut run,
                "run_launch_held",
                Some(tandem_core::claim::LAUNCH_HELD_DETAIL),
                Some(AutomationStopKind::GuardrailStopped),
                json!({"reason": "agent_spend_paused"}),
                now - MIN,
            );
            run.updated_at_ms = now - MIN;
            (run, 0, now - MIN)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sweeper_processes_act_on_mixed_runs_exactly_once_and_a_cancel_always_wins()
-> anyhow::Result<()> {
    let total: usize = std::env::var("TANDEM_SWEEPER_FLEET_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let (db, pool) = TestDb::migrated().await?;
    let prefix = Prefix::new(&unique("swfleet"))?;
    let result = async {
        let now = db_now(&pool).await?;
        let held_key = agent_scope_key(&tenant(), "fleet-held-agent");
        tandem_store::pause_agent_spend(&pool, &held_key, Some("fleet test")).await?;
        tandem_store::insert_quota_override(&pool, &NewQuotaOverride {
            agent_key: held_key,
            status: QuotaOverrideStatus::Approved,
            expires_at_ms: now + DAY,
            approved_by: Some("ops".into()),
            reason: None,
        })
        .await?;
        tandem_store::upsert_automation(&pool, &email_spec()).await?;

        let mut runs: Vec<(String, Kind)> = Vec::with_capacity(total);
        let mut built = Vec::with_capacity(total);
        for i in 0..total {
            let kind = KINDS[i % KINDS.len()];
            let id = format!("sw-{i:05}");
            built.push(build_fleet_run(kind, &id, now)?);
            runs.push((id, kind));
        }
        let created = Instant::now();
        let inserted: Vec<anyhow::Result<()>> = futures::stream::iter(built)
            .map(|(run, epoch, activity)| {
                let pool = pool.clone();
                async move { insert(&pool, &run, epoch, activity).await }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for r in inserted {
            r?;
        }
        println!("sweeper fleet: created {total} runs in {:.1}s", created.elapsed().as_secs_f64());
        let t0 = db_now(&pool).await?;
        let kind_of: HashMap<String, Kind> = runs.iter().cloned().collect();

        // Three replicas, and an operator cancelling every CancelRace run while they work.
        let mut sweepers = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..3 {
            let port = free_port()?;
            sweepers.push(Proc::start("tandem-sweeper", &[], &sweeper_env(&db.url, &prefix, port))?);
            ports.push(port);
        }
        let started = Instant::now();
        let race_ids: Vec<String> = runs
            .iter()
            .filter(|(_, k)| *k == Kind::CancelRace)
            .map(|(id, _)| id.clone())
            .collect();
        let canceller = {
            let pool = pool.clone();
            tokio::spawn(async move {
                // Spread the cancels over the first seconds, so some land before, some while
                // and some after a replica resumes the run.
                let n = race_ids.len().max(1);
                futures::stream::iter(race_ids.into_iter().enumerate())
                    .map(|(i, id)| {
                        let pool = pool.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis((i * 600 / n) as u64)).await;
                            tandem_store::transition_run(&pool, &id, Fence::Unfenced, &settings(), |run, env| {
                                cancel_run(run, env.lease_epoch.0, Some("operator cancel"), env.now_ms)
                            })
                            .await
                            .map(|_| ())
                            .map_err(anyhow::Error::from)
                        }
                    })
                    .buffer_unordered(16)
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<anyhow::Result<Vec<()>>>()
            })
        };
        for (p, port) in sweepers.iter_mut().zip(&ports) {
            p.wait_for_status(*port, "/readyz", 200).await?;
        }
        canceller.await.context("canceller")??;

        // Until every run reached its final status.
        let deadline = Duration::from_secs(600);
        loop {
            let c = pool.get().await?;
            let rows = c.query("SELECT run_id, status FROM runs", &[]).await?;
            let pending = rows
                .iter()
                .filter(|r| {
                    let id: String = r.get(0);
                    let status: String = r.get(1);
                    kind_of.get(&id).is_some_and(|k| k.final_status().as_str() != status)
                })
                .count();
            if pending == 0 {
                break;
            }
            if started.elapsed() > deadline {
                bail!("{pending} runs did not reach their final status within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let settle = started.elapsed();
        // A few more passes of every replica: nothing may happen twice.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut per_replica = Vec::new();
        for port in &ports {
            let (code, body) = http_get(*port, "/metrics").await?;
            ensure!(code == 200);
            per_replica.push(actions_metric(&body));
        }
        for p in &mut sweepers {
            p.sigterm()?;
            let status = p.wait(EXIT_TIMEOUT).await?;
            ensure!(status.success(), "sweeper exit {status}; stderr:\n{}", p.stderr());
        }

        // Count every effect per run.
        let c = pool.get().await?;
        let mut new_records: HashMap<String, Vec<(String, Option<String>)>> = HashMap::new();
        for r in c
            .query(
                "SELECT run_id, event, record ->> 'reason' FROM run_lifecycle
                  WHERE recorded_at_ms >= $1 ORDER BY id",
                &[&i64::try_from(t0)?],
            )
            .await?
        {
            new_records.entry(r.get(0)).or_default().push((r.get(1), r.get(2)));
        }
        let mut duplicates = 0usize;
        let mut wrong = Vec::new();
        let mut reaps = 0usize;
        let mut resumes = 0usize;
        let (mut race_before, mut race_after) = (0usize, 0usize);
        let mut tally: BTreeMap<&str, usize> = BTreeMap::new();
        for (id, kind) in &runs {
            let got: Vec<&str> = new_records
                .get(id)
                .map(|v| v.iter().map(|(e, _)| e.as_str()).collect())
                .unwrap_or_default();
            for e in &got {
                *tally.entry(e).or_default() += 1;
            }
            reaps += got.iter().filter(|e| e.starts_with("run_") && e.ends_with("_stale_no_provider_activity")).count();
            resumes += got.iter().filter(|e| **e == "run_auto_resumed").count();
            if *kind == Kind::CancelRace {
                let stops = got.iter().filter(|e| **e == "run_stopped").count();
                let resumed: Vec<usize> = got.iter().enumerate().filter(|(_, e)| **e == "run_auto_resumed").map(|(i, _)| i).collect();
                let stop_at = got.iter().position(|e| *e == "run_stopped");
                if stops != 1 || resumed.len() > 1 || got.len() != stops + resumed.len() {
                    duplicates += got.len().saturating_sub(2);
                    wrong.push(format!("{id}: {got:?}"));
                }
                match (resumed.first(), stop_at) {
                    (Some(r), Some(s)) if *r < s => race_after += 1,
                    (None, Some(_)) => race_before += 1,
                    _ => wrong.push(format!("{id}: resumed after the cancel: {got:?}")),
                }
                continue;
            }
            let mut want = kind.new_records();
            let mut have = got.clone();
            want.sort_unstable();
            have.sort_unstable();
            if have != want {
                duplicates += have.len().saturating_sub(want.len());
                wrong.push(format!("{id} ({kind:?}): {got:?}, want {want:?}"));
            }
        }
        let statuses: HashMap<String, String> = c
            .query("SELECT run_id, status FROM runs", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        for (id, kind) in &runs {
            if statuses.get(id).map(String::as_str) != Some(kind.final_status().as_str()) {
                wrong.push(format!("{id} ({kind:?}) ended {:?}", statuses.get(id)));
            }
        }
        // At most one audit record and one outbox row per run and type.
        let audit_dups: i64 = c
            .query_one(
                "SELECT count(*) FROM (SELECT payload ->> 'run_id', event_type FROM audit_log
                  GROUP BY 1, 2 HAVING count(*) > 1) d",
                &[],
            )
            .await?
            .get(0);
        let outbox_dups: i64 = c
            .query_one(
                "SELECT count(*) FROM (SELECT run_id, event_type FROM outbox
                  GROUP BY 1, 2 HAVING count(*) > 1) d",
                &[],
            )
            .await?
            .get(0);
        let sweep_audits: i64 = c
            .query_one(
                "SELECT count(*) FROM audit_log WHERE event_type LIKE 'automation_v2.internal_sweep.%'",
                &[],
            )
            .await?
            .get(0);
        let expected_actions: usize = tally
            .iter()
            .filter(|(e, _)| **e != "run_stopped")
            .map(|(_, n)| *n)
            .sum();
        let metric_actions: u64 = per_replica.iter().sum();
        println!(
            "sweeper fleet: runs={total} replicas=3 settle_s={:.1} reaps={reaps} resumes={resumes} \
             lifecycle={tally:?} cancel_race: cancelled_before_resume={race_before} \
             resumed_then_cancelled={race_after} resurrected=0 sweep_audits={sweep_audits} \
             actions_per_replica={per_replica:?} duplicates={} wrong={}",
            settle.as_secs_f64(),
            duplicates + usize::try_from(audit_dups + outbox_dups).unwrap_or(0),
            wrong.len(),
        );
        ensure!(wrong.is_empty(), "{} runs wrong, e.g. {:?}", wrong.len(), &wrong[..wrong.len().min(8)]);
        ensure!(duplicates == 0, "{duplicates} duplicate lifecycle records");
        ensure!(audit_dups == 0, "{audit_dups} duplicate audit records");
        ensure!(outbox_dups == 0, "{outbox_dups} duplicate outbox rows");
        ensure!(
            usize::try_from(sweep_audits)? == expected_actions,
            "{sweep_audits} sweep audits for {expected_actions} actions"
        );
        ensure!(
            metric_actions == expected_actions as u64,
            "replicas report {metric_actions} actions, the database holds {expected_actions}"
        );
        anyhow::Ok(())
    }
    .await;
    delete_streams(prefix.as_str()).await?;
    result?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_task_leaves_a_run_that_is_reaped_resumed_once_and_completed()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let prefix = Prefix::new(&unique("swkill"))?;
    let result = async {
        let mut slow = task("slow", &[]);
        // The deadline a task gets is its node timeout: long enough for the sleep.
        slow.metadata = Some(json!({"worker": {"handler": "sleep", "ms": 2000}}));
        slow.timeout_ms = Some(4000);
        let spec = spec_of("auto-killed-worker", vec![slow], &["agent-sleepy"]);
        tandem_store::upsert_automation(&pool, &spec).await?;
        let now = db_now(&pool).await?;
        insert(&pool, &queued("run-kill", &spec, now), 0, now).await?;

        let sport = free_port()?;
        let mut senv = service_env(&db.url, &prefix, sport);
        senv.push(("TANDEM_SCHEDULER_POLL_MS", "200".into()));
        senv.push(("TANDEM_SCHEDULER_PROGRESS_FLUSH_MS", "100".into()));
        let mut scheduler = Proc::start("tandem-scheduler", &[], &senv)?;
        let wport = free_port()?;
        let mut wenv = service_env(&db.url, &prefix, wport);
        wenv.push(("TANDEM_WORKER_PROGRESS_INTERVAL_MS", "200".into()));
        let mut worker = Proc::start("tandem-worker", &[], &wenv)?;
        let swport = free_port()?;
        let mut swenv = sweeper_env(&db.url, &prefix, swport);
        swenv.push(("TANDEM_STALE_RUNNING_RUN_MS", "2000".into()));
        let mut sweeper = Proc::start("tandem-sweeper", &[], &swenv)?;
        scheduler.wait_for_status(sport, "/readyz", 200).await?;
        worker.wait_for_status(wport, "/readyz", 200).await?;
        sweeper.wait_for_status(swport, "/readyz", 200).await?;

        eventually(
            "the worker to start the task",
            Duration::from_secs(30),
            || {
                let pool = pool.clone();
                async move { Ok(count(&get(&pool, "run-kill").await?, "node_started") == 1) }
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(800)).await;
        worker.sigkill().await?;
        let killed = Instant::now();

        // Effective threshold: max(2 s, node timeout 4 s + 60 s grace) = 64 s of silence.
        eventually(
            "the sweeper to reap and resume the run",
            Duration::from_secs(180),
            || {
                let pool = pool.clone();
                async move {
                    let r = get(&pool, "run-kill").await?;
                    ensure!(!r.status.is_terminal(), "run ended {:?}", r.status);
                    Ok(count(&r, "run_auto_resumed") == 1)
                }
            },
        )
        .await?;
        let reaped_after = killed.elapsed();
        let r = get(&pool, "run-kill").await?;
        ensure!(
            count(&r, "run_paused_stale_no_provider_activity") == 1,
            "{:?}",
            events(&r)
        );

        let wport2 = free_port()?;
        let mut worker2 =
            Proc::start("tandem-worker", &[], &service_env(&db.url, &prefix, wport2))?;
        worker2.wait_for_status(wport2, "/readyz", 200).await?;
        eventually("the run to complete", Duration::from_secs(120), || {
            let pool = pool.clone();
            async move {
                let r = get(&pool, "run-kill").await?;
                let s = r.status;
                ensure!(
                    !s.is_terminal() || s == AutomationRunStatus::Completed,
                    "run ended {s:?}: {:?} {:?} {:?}",
                    r.detail,
                    r.checkpoint.lifecycle_history,
                    r.checkpoint.node_outputs
                );
                Ok(s == AutomationRunStatus::Completed)
            }
        })
        .await?;
        // More sweeper passes: nothing else happens to the completed run.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let r = get(&pool, "run-kill").await?;
        ensure!(r.status == AutomationRunStatus::Completed);
        ensure!(count(&r, "run_auto_resumed") == 1, "{:?}", events(&r));
        ensure!(count(&r, "run_paused_stale_no_provider_activity") == 1);
        ensure!(
            r.checkpoint.attempts("slow") == 2,
            "attempts {:?}",
            r.checkpoint.node_attempts
        );
        ensure!(r.checkpoint.node_outputs["slow"]["slept_ms"] == 2000);
        ensure!(count(&r, "run_failed_shutdown") == 0);
        println!(
            "killed worker: reaped and resumed {:.1}s after the kill; lifecycle {:?}",
            reaped_after.as_secs_f64(),
            events(&r)
        );
        for p in [&mut scheduler, &mut sweeper, &mut worker2] {
            p.sigterm()?;
            let status = p.wait(EXIT_TIMEOUT).await?;
            ensure!(
                status.success(),
                "{} exit {status}; stderr:\n{}",
                p.name,
                p.stderr()
            );
        }
        anyhow::Ok(())
    }
    .await;
    delete_streams(prefix.as_str()).await?;
    result?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn declined_candidates_never_starve_the_stale_runs_behind_them() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let result = async {
        let now = db_now(&pool).await?;
        // Ten runs idle for 5 minutes whose node may run for 10 (threshold 11 minutes): first in
        // the activity order, and declined on every pass.
        let mut long = topics_spec(None);
        for n in &mut long.flow.nodes {
            n.timeout_ms = Some(600_000);
        }
        for i in 0..10 {
            let id = format!("long-{i}");
            insert(
                &pool,
                &executing_topics(&id, &long, now - 5 * MIN),
                1,
                now - 5 * MIN,
            )
            .await?;
        }
        // Behind them, a run stale for 3 minutes with a 1-minute node (threshold 2 minutes).
        insert(
            &pool,
            &executing_topics("stale", &topics_spec(None), now - 3 * MIN),
            1,
            now - 3 * MIN,
        )
        .await?;
        let sweeper = bus.sweeper(&pool, lifecycle(30_000));
        let s = sweeper.reap_pass().await?;
        ensure!(s.action("paused") == 1, "{s:?}");
        ensure!(s.declined.get("not_stale") == Some(&10), "{s:?}");
        ensure!(get(&pool, "stale").await?.status == AutomationRunStatus::Paused);
        anyhow::Ok(())
    }
    .await;
    bus.cleanup().await?;
    result?;
    drop(pool);
    db.drop_db().await
}
