//! Integration tests of `tandem-store` against a real PostgreSQL. Every test gets its own database
//! (`TestDb`), so they run in parallel; a passing test drops its database.

use anyhow::{Context as _, bail, ensure};
use deadpool_postgres::Pool;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tandem_core::audit::ChainBreak;
use tandem_core::config::GatePolicyDefaults;
use tandem_core::governance::agent_scope_key;
use tandem_core::{
    ActorKind, AutomationAgentProfile, AutomationExecutionPolicy, AutomationFailureRecord,
    AutomationFlowNode, AutomationGateDecisionRecord, AutomationGateExpiryAction,
    AutomationGateExpiryPolicy, AutomationLifecycleRecord, AutomationPendingGate,
    AutomationRunCheckpoint, AutomationRunStatus, AutomationStopKind, AutomationV2RunRecord,
    AutomationV2Spec, Effects, ExecutionProfile, GovernanceActorRef, Millis, QueueReason,
    SchedulerMetadata, TenantContext, TenantSource, Transition, update,
};
use tandem_store::{
    Fence, LeaseEpoch, NewQuotaOverride, QuotaOverrideStatus, StoreError, StoreSettings, Sweep,
};
use tandem_tests::{TestDb, db_now};

// ---------------------------------------------------------------------------------------------
// helpers

fn settings() -> StoreSettings {
    StoreSettings::default()
}

/// Row counts of runs, run_lifecycle, audit_log, outbox.
async fn counts(pool: &Pool) -> anyhow::Result<[i64; 4]> {
    let c = pool.get().await?;
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM run_lifecycle),
                    (SELECT count(*) FROM audit_log), (SELECT count(*) FROM outbox)",
            &[],
        )
        .await?;
    Ok([r.get(0), r.get(1), r.get(2), r.get(3)])
}

/// The row version (xmin) and updated_at_ms of a run: a rewrite changes xmin even when every
/// value stays the same.
async fn row_version(pool: &Pool, run_id: &str) -> anyhow::Result<(String, i64, i64)> {
    let c = pool.get().await?;
    let r = c
        .query_one(
            "SELECT xmin::text, updated_at_ms, lease_epoch FROM runs WHERE run_id = $1",
            &[&run_id],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

fn spec(id: &str) -> AutomationV2Spec {
    AutomationV2Spec::new(
        id,
        vec![
            AutomationFlowNode::task("draft", &[]),
            AutomationFlowNode::approval("approval", &["draft"], &["draft"]),
        ],
    )
}

fn queued_run(run_id: &str, workspace_root: Option<&str>, now: Millis) -> AutomationV2RunRecord {
    let mut s = spec("auto-1");
    s.workspace_root = workspace_root.map(str::to_owned);
    AutomationV2RunRecord::new_queued(run_id.into(), &s, "manual", ExecutionProfile::Strict, now)
}

fn gate(requested_at_ms: Millis) -> AutomationPendingGate {
    AutomationPendingGate {
        node_id: "approval".into(),
        title: "Approve".into(),
        instructions: None,
        decisions: vec!["approve".into(), "rework".into(), "cancel".into()],
        rework_targets: vec!["draft".into()],
        requested_at_ms,
        upstream_node_ids: vec!["draft".into()],
        metadata: None,
        expiry_policy: None,
    }
}

fn awaiting_run(run_id: &str, requested_at_ms: Millis) -> AutomationV2RunRecord {
    let mut run = queued_run(run_id, None, requested_at_ms);
    run.status = AutomationRunStatus::AwaitingApproval;
    run.checkpoint.awaiting_gate = Some(gate(requested_at_ms));
    run
}

async fn create(pool: &Pool, run: &AutomationV2RunRecord) -> anyhow::Result<()> {
    tandem_store::create_run(pool, run, &Effects::default(), &settings()).await?;
    Ok(())
}

/// A transition that pauses the run with one lifecycle record, one audit draft and one event.
fn pause(run: &mut AutomationV2RunRecord, now: Millis, dedupe: Option<String>) -> Transition<()> {
    update(run, now, |run, fx| {
        run.status = AutomationRunStatus::Paused;
        run.pause_reason = Some("operator".into());
        fx.lifecycle(run, "run_paused", Some("operator".into()), None, None, now);
        fx.internal_sweep_audit(
            run,
            "automation_v2.test.paused",
            "test_sweep",
            "paused",
            Some("operator"),
            json!({"why": "test"}),
        );
        let props = json!({"runID": run.run_id, "status": "paused"});
        fx.event(
            run,
            "automation_v2.run.paused",
            Some("draft"),
            props,
            dedupe,
        );
    })
}

fn is_fenced(e: &StoreError, expected: i64, found: i64) -> bool {
    matches!(e, StoreError::Fenced { expected: x, found: y }
        if *x == LeaseEpoch(expected) && *y == LeaseEpoch(found))
}

// ---------------------------------------------------------------------------------------------
// migrations and schema checks

#[tokio::test]
async fn migrate_is_idempotent_and_records_checksums() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    let pool = db.pool()?;
    assert_eq!(tandem_store::schema_version(&pool).await?, 0);
    let first = tandem_store::migrate(&pool).await?;
    let all: Vec<i32> = tandem_store::MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(first.applied, all);
    assert_eq!(first.version, tandem_store::latest_version());
    let second = tandem_store::migrate(&pool).await?;
    assert!(second.applied.is_empty(), "second run applied {second:?}");
    assert_eq!(second.version, first.version);
    tandem_store::check_schema(&pool).await?;
    let c = pool.get().await?;
    let rows = c
        .query(
            "SELECT version, name, checksum FROM tandem_schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    assert_eq!(rows.len(), tandem_store::MIGRATIONS.len());
    // Pooled sessions carry the store's lock timeout unless the URL sets options itself.
    let lock_timeout: String = c.query_one("SHOW lock_timeout", &[]).await?.get(0);
    assert_eq!(lock_timeout, "10s");
    let app: String = c.query_one("SHOW application_name", &[]).await?.get(0);
    assert_eq!(app, "tandem-tests");
    for (row, m) in rows.iter().zip(tandem_store::MIGRATIONS) {
        assert_eq!(row.get::<_, i32>(0), m.version);
        assert_eq!(row.get::<_, String>(1), m.name);
        assert_eq!(row.get::<_, String>(2), m.checksum());
    }
    drop(c);
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_both_succeed_and_apply_once() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    let (a, b) = (db.pool()?, db.pool()?);
    let (ra, rb) = tokio::join!(tandem_store::migrate(&a), tandem_store::migrate(&b));
    let (ra, rb) = (ra?, rb?);
    let mut applied = [ra.applied.clone(), rb.applied.clone()];
    applied.sort();
    let all: Vec<i32> = tandem_store::MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(
        applied,
        [vec![], all.clone()],
        "exactly one call applied the migrations"
    );
    let c = a.get().await?;
    let n: i64 = c
        .query_one("SELECT count(*) FROM tandem_schema_migrations", &[])
        .await?
        .get(0);
    assert_eq!(n, i64::try_from(all.len())?);
    tandem_store::check_schema(&b).await?;
    drop((c, a, b));
    db.drop_db().await
}

#[tokio::test]
async fn check_schema_refuses_unmigrated_newer_and_edited_schemas() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    let pool = db.pool()?;
    let n = tandem_store::latest_version();

    let err = tandem_store::check_schema(&pool)
        .await
        .err()
        .context("empty database accepted")?;
    assert!(matches!(err, StoreError::Schema(_)));
    assert_eq!(
        err.to_string(),
        format!(
            "database schema is not migrated (version 0, this build needs {n}): run `tandemctl migrate`"
        )
    );

    tandem_store::migrate(&pool).await?;
    tandem_store::check_schema(&pool).await?;

    // Migrations recorded but none left (someone emptied the table): still "not migrated".
    let c = pool.get().await?;
    c.batch_execute(
        "CREATE TABLE saved_migrations AS SELECT * FROM tandem_schema_migrations;
         DELETE FROM tandem_schema_migrations;",
    )
    .await?;
    let err = tandem_store::check_schema(&pool)
        .await
        .err()
        .context("emptied migration table accepted")?;
    assert!(
        err.to_string().contains("is not migrated (version 0"),
        "{err}"
    );
    c.batch_execute(
        "INSERT INTO tandem_schema_migrations SELECT * FROM saved_migrations;
         DROP TABLE saved_migrations;",
    )
    .await?;
    tandem_store::check_schema(&pool).await?;

    // A newer binary migrated this database.
    c.execute(
        "INSERT INTO tandem_schema_migrations (version, name, checksum) VALUES ($1, 'future', 'x')",
        &[&(n + 1)],
    )
    .await?;
    let err = tandem_store::check_schema(&pool)
        .await
        .err()
        .context("newer schema accepted")?;
    assert_eq!(
        err.to_string(),
        format!(
            "database schema version {} is newer than this build ({n}): upgrade the binaries",
            n + 1
        )
    );
    let err = tandem_store::migrate(&pool)
        .await
        .err()
        .context("migrate ran on a newer schema")?;
    assert!(err.to_string().contains("newer than this build"), "{err}");
    c.execute(
        "DELETE FROM tandem_schema_migrations WHERE version = $1",
        &[&(n + 1)],
    )
    .await?;

    // An applied migration whose file was edited afterwards.
    c.execute(
        "UPDATE tandem_schema_migrations SET checksum = 'edited' WHERE version = 1",
        &[],
    )
    .await?;
    for err in [
        tandem_store::check_schema(&pool).await.err(),
        tandem_store::migrate(&pool).await.err(),
    ] {
        let err = err.context("edited migration accepted")?;
        let text = err.to_string();
        assert!(
            text.contains("V1__initial was modified after it was applied"),
            "{text}"
        );
    }
    drop(c);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn connect_accepts_passwords_and_rejects_garbage() -> anyhow::Result<()> {
    // Building a pool is lazy: these only parse.
    tandem_store::connect("postgres://u:secret@127.0.0.1:5432/db", "t")?;
    tandem_store::connect("postgres://u@127.0.0.1/db?sslmode=disable", "t")?;
    let err = tandem_store::connect("postgres://u@127.0.0.1:notaport/db", "t")
        .err()
        .context("bad URL accepted")?;
    assert!(matches!(err, StoreError::Config(_)), "{err}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// runs

fn full_run(now: Millis) -> AutomationV2RunRecord {
    let tenant = TenantContext {
        org_id: "org-1".into(),
        workspace_id: "ws-1".into(),
        deployment_id: Some("dep-1".into()),
        actor_id: Some("user-1".into()),
        source: TenantSource::Explicit,
    };
    let mut snapshot = spec("auto-full");
    snapshot.description = Some("every field".into());
    snapshot.agents = vec![AutomationAgentProfile {
        agent_id: "agent-a".into(),
        extra: BTreeMap::from([("model".into(), json!("m-1"))]),
    }];
    snapshot.execution = Some(AutomationExecutionPolicy {
        profile: Some(ExecutionProfile::Guided),
        max_parallel_agents: Some(2),
        max_total_runtime_ms: Some(60_000),
        max_total_tool_calls: Some(10),
        max_total_tokens: Some(1_000),
        max_total_cost_usd: Some(1.25),
    });
    snapshot.workspace_root = Some("  /srv/ws-1  ".into());
    snapshot.metadata = Some(json!({"tenant_context": tenant}));
    snapshot
        .extra
        .insert("schedule".into(), json!({"cron": "0 * * * *"}));
    let lifecycle = vec![
        AutomationLifecycleRecord {
            event: "run_queued".into(),
            recorded_at_ms: now - 3_000,
            reason: None,
            stop_kind: None,
            metadata: Some(json!({"effective_execution_profile": "guided"})),
        },
        AutomationLifecycleRecord {
            event: "run_paused".into(),
            recorded_at_ms: now - 2_000,
            reason: Some("operator said so ✓".into()),
            stop_kind: Some(AutomationStopKind::OperatorStopped),
            metadata: Some(json!({"n": 1.5, "nested": {"z": [1, 2, 3]}})),
        },
        AutomationLifecycleRecord {
            event: "approval_gate_opened".into(),
            recorded_at_ms: now - 1_000,
            reason: None,
            stop_kind: None,
            metadata: None,
        },
    ];
    AutomationV2RunRecord {
        run_id: "run-full".into(),
        automation_id: "auto-full".into(),
        tenant_context: tenant.clone(),
        trigger_type: "manual".into(),
        status: AutomationRunStatus::AwaitingApproval,
        created_at_ms: now - 5_000,
        updated_at_ms: now - 1_000,
        started_at_ms: Some(now - 4_000),
        finished_at_ms: Some(now - 500),
        active_session_ids: vec!["s-1".into(), "s-2".into()],
        latest_session_id: Some("s-2".into()),
        active_instance_ids: vec!["i-1".into()],
        checkpoint: AutomationRunCheckpoint {
            completed_nodes: vec!["draft".into()],
            pending_nodes: vec!["approval".into()],
            node_outputs: HashMap::from([(
                "draft".into(),
                json!({"status": "completed", "text": "hello \"world\"", "cost": 0.1}),
            )]),
            node_attempts: HashMap::from([("draft".into(), 2)]),
            node_attempt_verdicts: HashMap::from([("draft".into(), vec![json!({"ok": false})])]),
            blocked_nodes: vec!["never".into()],
            awaiting_gate: Some(AutomationPendingGate {
                node_id: "approval".into(),
                title: "Approve the draft".into(),
                instructions: Some("read it".into()),
                decisions: vec!["approve".into(), "rework".into()],
                rework_targets: vec!["draft".into()],
                requested_at_ms: now - 1_000,
                upstream_node_ids: vec!["draft".into()],
                metadata: Some(json!({"gate_policy_state": {"last_reminded_at_ms": now - 900}})),
                expiry_policy: Some(AutomationGateExpiryPolicy {
                    expires_after_ms: Some(3_600_000),
                    on_expiry: Some(AutomationGateExpiryAction::Remind),
                    escalate_to: Some("boss".into()),
                    remind_every_ms: Some(600_000),
                    steps: None,
                }),
            }),
            gate_history: vec![AutomationGateDecisionRecord {
                node_id: "approval".into(),
                decision: "rework".into(),
                reason: Some("typo".into()),
                decided_at_ms: now - 2_500,
                decided_by: Some(GovernanceActorRef {
                    kind: ActorKind::Human,
                    actor_id: Some("user-1".into()),
                    source: Some("api".into()),
                }),
                metadata: Some(json!({"k": "v"})),
            }],
            lifecycle_history: lifecycle,
            last_failure: Some(AutomationFailureRecord {
                node_id: "draft".into(),
                reason: "first try failed".into(),
                failed_at_ms: now - 3_500,
            }),
        },
        runtime_context: Some(json!({"routines": []})),
        automation_snapshot: Some(std::sync::Arc::new(snapshot)),
        pause_reason: Some("p".into()),
        resume_reason: Some("r".into()),
        detail: Some("waiting".into()),
        stop_kind: Some(AutomationStopKind::GuardrailStopped),
        stop_reason: Some("budget".into()),
        prompt_tokens: 10,
        completion_tokens: 20,
        total_tokens: 30,
        estimated_cost_usd: 0.1 + 0.2,
        scheduler: Some(SchedulerMetadata {
            tenant_context: tenant,
            queue_reason: Some(QueueReason::WorkspaceLock),
            resource_key: Some("/srv/ws-1".into()),
            rate_limited_provider: Some("p".into()),
            queued_at_ms: now - 4_500,
        }),
        trigger_reason: Some("because".into()),
        consumed_handoff_id: Some("h-1".into()),
        learning_summary: Some(json!({"learned": true})),
        effective_execution_profile: ExecutionProfile::Guided,
        requested_execution_profile: Some(ExecutionProfile::Yolo),
    }
}

#[tokio::test]
async fn a_relayed_batch_leases_its_outbox_rows_only_where_nothing_older_is_unpublished()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create(&pool, &queued_run("r1", None, now)).await?;
    create(&pool, &queued_run("r2", None, now)).await?;
    let note = |i: u64| {
        move |run: &mut AutomationV2RunRecord, env: &tandem_store::TransitionEnv| {
            update(run, env.now_ms, |run, fx| {
                fx.event(run, "automation_v2.run.note", None, json!({ "i": i }), None)
            })
        }
    };
    let ids = ["r1".to_owned(), "r2".to_owned()];
    let lease = std::time::Duration::from_secs(30);
    // Nothing older: both runs' rows come back leased, and nobody else can take them.
    let (items, leased) =
        tandem_store::transition_runs_relayed(&pool, &ids, &settings(), false, lease, note(1))
            .await?;
    ensure!(items.iter().all(|i| i.result.is_ok()), "{items:?}");
    let runs: Vec<&str> = leased.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(runs, ["r1", "r2"]);
    assert!(
        tandem_store::claim_outbox(&pool, 10, lease)
            .await?
            .is_empty(),
        "leased rows are not for the taking"
    );
    let payload: Value = serde_json::from_str(&leased[0].payload)?;
    assert_eq!(payload["properties"]["i"], 1);
    assert_eq!(payload["envelope"]["run_id"], "r1");
    // r1's row published, r2's not: r2's next row waits behind it, unleased; r1's is leased.
    tandem_store::mark_outbox_published(&pool, &[leased[0].id]).await?;
    let (_, leased) =
        tandem_store::transition_runs_relayed(&pool, &ids, &settings(), false, lease, note(2))
            .await?;
    let runs: Vec<&str> = leased.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(runs, ["r1"]);
    // The plain batch never leases.
    let items = tandem_store::transition_runs(&pool, &ids, &settings(), false, note(3)).await?;
    let c = pool.get().await?;
    let unleased: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox WHERE relay_lease_until IS NULL AND published_at IS NULL",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(unleased, 3, "r2's second row and both third rows");
    ensure!(items.iter().all(|i| i.result.is_ok()), "{items:?}");
    drop(c);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn create_and_get_round_trip_every_field() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    let run = full_run(now);
    let stored = tandem_store::create_run(&pool, &run, &Effects::default(), &settings()).await?;
    assert_eq!(stored.lease_epoch, LeaseEpoch(0));

    let got = tandem_store::get_stored_run(&pool, "run-full").await?;
    assert_eq!(got.run, run, "round trip must be lossless");
    assert_eq!(got.run.checkpoint.lifecycle_history.len(), 3);
    assert_eq!(got.lease_epoch, LeaseEpoch(0));
    let gate = run.checkpoint.awaiting_gate.as_ref().context("gate")?;
    let expected_next = tandem_core::policy::next_action_at(gate, &GatePolicyDefaults::default());
    assert!(expected_next.is_some());
    assert_eq!(got.next_action_at_ms, expected_next);
    assert_eq!(stored.next_action_at_ms, expected_next);

    let c = pool.get().await?;
    let row = c
        .query_one(
            "SELECT automation_id, org_id, workspace_id, status, workspace_root, stop_kind,
                    created_at_ms, updated_at_ms, next_action_at_ms,
                    coalesce(jsonb_array_length(doc -> 'checkpoint' -> 'lifecycle_history'), 0) > 0,
                    (SELECT count(*) FROM run_lifecycle WHERE run_id = 'run-full')
               FROM runs WHERE run_id = 'run-full'",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "auto-full");
    assert_eq!(row.get::<_, String>(1), "org-1");
    assert_eq!(row.get::<_, String>(2), "ws-1");
    assert_eq!(row.get::<_, String>(3), "awaiting_approval");
    assert_eq!(
        row.get::<_, Option<String>>(4).as_deref(),
        Some("/srv/ws-1")
    );
    assert_eq!(
        row.get::<_, Option<String>>(5).as_deref(),
        Some("guardrail_stopped")
    );
    assert_eq!(row.get::<_, i64>(6), i64::try_from(run.created_at_ms)?);
    assert_eq!(row.get::<_, i64>(7), i64::try_from(run.updated_at_ms)?);
    assert_eq!(
        row.get::<_, Option<i64>>(8),
        expected_next.map(i64::try_from).transpose()?
    );
    assert!(
        !row.get::<_, bool>(9),
        "doc must not carry lifecycle records (they live in run_lifecycle)"
    );
    assert_eq!(row.get::<_, i64>(10), 3);

    // Duplicates and absent runs are typed errors.
    let dup = tandem_store::create_run(&pool, &run, &Effects::default(), &settings()).await;
    assert!(matches!(dup, Err(StoreError::Conflict { .. })), "{dup:?}");
    let missing = tandem_store::get_run(&pool, "nope").await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
    let missing =
        tandem_store::transition_run(&pool, "nope", Fence::Unfenced, &settings(), |_, _| {
            Transition::unchanged(())
        })
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );

    let listed =
        tandem_store::list_runs_by_status(&pool, AutomationRunStatus::AwaitingApproval, 10).await?;
    assert_eq!(listed, vec![run]);
    assert!(
        tandem_store::list_runs_by_status(&pool, AutomationRunStatus::Queued, 10)
            .await?
            .is_empty()
    );
    drop(c);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn corrupt_stored_json_is_an_error_not_a_panic() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create(&pool, &queued_run("r1", None, now)).await?;
    let c = pool.get().await?;
    c.execute(
        "UPDATE runs SET doc = jsonb_set(doc, '{status}', '\"exploded\"') WHERE run_id = 'r1'",
        &[],
    )
    .await?;
    let got = tandem_store::get_run(&pool, "r1").await;
    assert!(matches!(got, Err(StoreError::Serde(_))), "{got:?}");
    let t = tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, env| {
        pause(run, env.now_ms, None)
    })
    .await;
    assert!(matches!(t, Err(StoreError::Serde(_))), "{t:?}");
    drop(c);
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// transitions

#[tokio::test]
async fn changing_transition_writes_row_lifecycle_audit_and_outbox_together() -> anyhow::Result<()>
{
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    let run = queued_run("r1", None, now - 10);
    create(&pool, &run).await?;
    let before = counts(&pool).await?;
    assert_eq!(before, [1, 0, 0, 0]);

    let applied =
        tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, env| {
            assert_eq!(env.lease_epoch, LeaseEpoch(0));
            assert!(!env.automation_is_live, "no live definition stored");
            assert_eq!(
                env.automation.as_deref().map(|a| a.automation_id.as_str()),
                Some("auto-1")
            );
            pause(run, env.now_ms, Some("notify-key-1".into()))
        })
        .await?;
    assert!(applied.changed);
    assert!(applied.now_ms >= now, "the closure saw the database clock");
    assert_eq!(applied.run.status, AutomationRunStatus::Paused);
    assert_eq!(applied.run.updated_at_ms, applied.now_ms);
    assert_eq!(applied.outbox_ids.len(), 1);
    assert_eq!(counts(&pool).await?, [1, 1, 1, 1]);

    let stored = tandem_store::get_run(&pool, "r1").await?;
    assert_eq!(stored, applied.run, "persisted run equals the returned run");
    assert_eq!(stored.checkpoint.lifecycle_history.len(), 1);
    assert_eq!(stored.checkpoint.lifecycle_history[0].event, "run_paused");

    let c = pool.get().await?;
    let row = c
        .query_one(
            "SELECT status, updated_at_ms, stop_kind FROM runs WHERE run_id = 'r1'",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "paused");
    assert_eq!(row.get::<_, i64>(1), i64::try_from(applied.now_ms)?);

    let audit = c
        .query_one(
            "SELECT event_type, actor, durability, seq, record_hash, payload, created_at_ms, tenant
               FROM audit_log",
            &[],
        )
        .await?;
    assert_eq!(audit.get::<_, String>(0), "automation_v2.test.paused");
    assert_eq!(
        audit.get::<_, Option<String>>(1).as_deref(),
        Some("tandem-server:internal-sweep")
    );
    assert_eq!(audit.get::<_, String>(2), "durable_required");
    assert_eq!(audit.get::<_, Option<i64>>(3), None, "written unlinked");
    assert_eq!(audit.get::<_, Option<String>>(4), None);
    let payload: Value = audit.get(5);
    assert_eq!(payload["status"], "paused");
    assert_eq!(payload["runID"], "r1");
    assert_eq!(audit.get::<_, i64>(6), i64::try_from(applied.now_ms)?);
    assert_eq!(audit.get::<_, Value>(7)["org_id"], "local");

    let rows = tandem_store::outbox_rows(&pool, &applied.outbox_ids).await?;
    let ev = rows.first().context("outbox row")?;
    assert_eq!(ev.event_type, "automation_v2.run.paused");
    assert_eq!(ev.run_id, "r1");
    assert_eq!(
        (ev.org_id.as_str(), ev.workspace_id.as_str()),
        ("local", "local")
    );
    assert_eq!(ev.dedupe_id, "notify-key-1");
    let payload: Value = serde_json::from_str(&ev.payload)?;
    assert_eq!(payload["type"], "automation_v2.run.paused");
    assert_eq!(payload["properties"]["status"], "paused");
    let env = &payload["envelope"];
    assert_eq!(env["event_id"], ev.event_id.to_string());
    assert_eq!(env["schema_version"], 1);
    assert_eq!(env["occurred_at_ms"], applied.now_ms);
    assert_eq!(env["run_id"], "r1");
    assert_eq!(env["node_id"], "draft");
    assert_eq!(env["tenant_context"]["source"], "local_implicit");

    // Without a dedupe key, the outbox uses the event's own id; node_id is omitted when absent.
    let applied =
        tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, env| {
            update(run, env.now_ms, |run, fx| {
                fx.event(run, "automation_v2.run.note", None, json!({}), None)
            })
        })
        .await?;
    let rows = tandem_store::outbox_rows(&pool, &applied.outbox_ids).await?;
    let ev = rows.first().context("outbox row")?;
    assert_eq!(ev.dedupe_id, ev.event_id.to_string());
    let payload: Value = serde_json::from_str(&ev.payload)?;
    assert!(payload["envelope"].get("node_id").is_none());

    // The relay's reads.
    let pending = tandem_store::unpublished_outbox(&pool, 10).await?;
    assert_eq!(pending.len(), 2);
    let ids: Vec<i64> = pending.iter().map(|r| r.id).collect();
    assert_eq!(tandem_store::mark_outbox_published(&pool, &ids).await?, 2);
    assert_eq!(tandem_store::mark_outbox_published(&pool, &ids).await?, 0);
    assert!(
        tandem_store::unpublished_outbox(&pool, 10)
            .await?
            .is_empty()
    );
    drop(c);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn no_op_transition_writes_nothing() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create(&pool, &queued_run("r1", None, now)).await?;
    let before_counts = counts(&pool).await?;
    let before_row = row_version(&pool, "r1").await?;

    let applied =
        tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, env| {
            // Reads, decides nothing changes.
            update(run, env.now_ms, |run, _fx| {
                run.status == AutomationRunStatus::Queued
            })
        })
        .await?;
    assert!(!applied.changed);
    assert!(applied.outcome);
    assert!(applied.outbox_ids.is_empty());
    assert_eq!(
        row_version(&pool, "r1").await?,
        before_row,
        "row not rewritten"
    );
    assert_eq!(counts(&pool).await?, before_counts);

    // A closure that reports "unchanged" even though it touched the record also writes nothing.
    let applied =
        tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, _| {
            run.detail = Some("scribble".into());
            Transition::unchanged(())
        })
        .await?;
    assert!(!applied.changed);
    assert_eq!(
        applied.run.detail, None,
        "returned run is the persisted one"
    );
    assert_eq!(row_version(&pool, "r1").await?, before_row);
    assert_eq!(tandem_store::get_run(&pool, "r1").await?.detail, None);
    drop(pool);
    db.drop_db().await
}

#[derive(Debug)]
enum AppError {
    Store(StoreError),
    Refused(&'static str),
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError::Store(e)
    }
}

#[tokio::test]
async fn failed_transitions_roll_back_everything() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create(&pool, &queued_run("r1", None, now)).await?;
    let before_counts = counts(&pool).await?;
    let before_row = row_version(&pool, "r1").await?;

    // 1. The closure fails after computing a change.
    let r =
        tandem_store::try_transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, env| {
            let t = pause(run, env.now_ms, None);
            if t.changed {
                return Err(AppError::Refused("policy says no"));
            }
            Ok(t)
        })
        .await;
    assert!(
        matches!(r, Err(AppError::Refused("policy says no"))),
        "{r:?}"
    );
    let missing =
        tandem_store::try_transition_run(&pool, "nope", Fence::Unfenced, &settings(), |_, _| {
            Ok::<_, AppError>(Transition::unchanged(()))
        })
        .await;
    assert!(
        matches!(missing, Err(AppError::Store(StoreError::NotFound(_)))),
        "{missing:?}"
    );
    assert_eq!(row_version(&pool, "r1").await?, before_row);
    assert_eq!(counts(&pool).await?, before_counts);

    // 2. The database rejects the last write (jsonb cannot hold U+0000) after the row, the
    //    lifecycle record and the audit draft were written: all of it rolls back.
    let r = tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, env| {
        update(run, env.now_ms, |run, fx| {
            run.status = AutomationRunStatus::Paused;
            fx.lifecycle(run, "run_paused", None, None, None, env.now_ms);
            fx.internal_sweep_audit(run, "automation_v2.test", "s", "o", None, json!({}));
            fx.event(
                run,
                "automation_v2.run.paused",
                None,
                json!({"bad": "nul\u{0}byte"}),
                None,
            );
        })
    })
    .await;
    assert!(matches!(r, Err(StoreError::Db(_))), "{r:?}");
    assert_eq!(row_version(&pool, "r1").await?, before_row);
    assert_eq!(counts(&pool).await?, before_counts);
    assert_eq!(
        tandem_store::get_run(&pool, "r1").await?.status,
        AutomationRunStatus::Queued
    );

    // 3. A transition may only append to lifecycle history.
    create(&pool, &awaiting_run("r2", now)).await?;
    tandem_store::transition_run(&pool, "r2", Fence::Unfenced, &settings(), |run, env| {
        update(run, env.now_ms, |run, fx| {
            fx.lifecycle(run, "first", None, None, None, env.now_ms)
        })
    })
    .await?;
    let before_counts = counts(&pool).await?;
    let r = tandem_store::transition_run(&pool, "r2", Fence::Unfenced, &settings(), |run, env| {
        update(run, env.now_ms, |run, _| {
            run.checkpoint.lifecycle_history.clear();
        })
    })
    .await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    assert_eq!(counts(&pool).await?, before_counts);
    drop(pool);
    db.drop_db().await
}

async fn lifecycle_count(c: &tokio_postgres::Client, run_id: &str) -> anyhow::Result<i64> {
    Ok(c.query_one(
        "SELECT count(*) FROM run_lifecycle WHERE run_id = $1",
        &[&run_id],
    )
    .await?
    .get(0))
}

#[tokio::test]
async fn run_lifecycle_is_append_only() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create(&pool, &full_run(now)).await?;
    let c = pool.get().await?;
    let err = c
        .execute("UPDATE run_lifecycle SET event = 'forged'", &[])
        .await
        .err()
        .context("lifecycle update accepted")?;
    assert!(err.to_string().contains("append-only") || format!("{err:?}").contains("append-only"));

    // Deleting a run (an operator's SQL; the engine never does) deletes its records with it.
    let run_id = full_run(now).run_id;
    assert!(
        lifecycle_count(&c, &run_id).await? > 0,
        "the run has lifecycle records"
    );
    c.execute("DELETE FROM runs WHERE run_id = $1", &[&run_id])
        .await?;
    assert_eq!(
        lifecycle_count(&c, &run_id).await?,
        0,
        "its records went with it"
    );
    drop(c);
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// claims and fencing

#[tokio::test]
async fn fencing_rejects_stale_epochs_and_claims_bump_strictly() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create(&pool, &queued_run("r1", None, now)).await?;

    let claimed = tandem_store::claim_queued(&pool, 10).await?;
    assert_eq!(claimed, vec![("r1".to_owned(), LeaseEpoch(1))]);
    let stored = tandem_store::get_stored_run(&pool, "r1").await?;
    assert_eq!(stored.run.status, AutomationRunStatus::Running);
    assert!(stored.run.started_at_ms.is_some());
    assert!(stored.run.scheduler.is_none());
    assert_eq!(stored.lease_epoch, LeaseEpoch(1));
    assert!(
        tandem_store::claim_queued(&pool, 10).await?.is_empty(),
        "claimed once"
    );

    // A stale epoch writes nothing.
    let before_counts = counts(&pool).await?;
    let before_row = row_version(&pool, "r1").await?;
    let stale = tandem_store::transition_run(
        &pool,
        "r1",
        Fence::Epoch(LeaseEpoch(0)),
        &settings(),
        |run, env| {
            update(run, env.now_ms, |run, fx| {
                fx.lifecycle(run, "x", None, None, None, env.now_ms)
            })
        },
    )
    .await;
    match &stale {
        Err(e) => assert!(is_fenced(e, 0, 1), "{e:?}"),
        Ok(_) => bail!("stale fence accepted"),
    }
    assert_eq!(row_version(&pool, "r1").await?, before_row);
    assert_eq!(counts(&pool).await?, before_counts);
    let hb = tandem_store::touch_activity(&pool, "r1", LeaseEpoch(0)).await;
    assert!(matches!(&hb, Err(e) if is_fenced(e, 0, 1)), "{hb:?}");

    // The current epoch is accepted; staying claimed keeps the epoch.
    let ok = tandem_store::transition_run(
        &pool,
        "r1",
        Fence::Epoch(LeaseEpoch(1)),
        &settings(),
        |run, env| {
            update(run, env.now_ms, |run, _| {
                run.detail = Some("working".into())
            })
        },
    )
    .await?;
    assert!(ok.changed);
    assert_eq!(ok.lease_epoch, LeaseEpoch(1));
    let t1 = tandem_store::touch_activity(&pool, "r1", LeaseEpoch(1)).await?;
    assert!(t1 >= now);

    // Leaving the claimed statuses ends the claim: the old epoch is fenced from then on.
    let paused =
        tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, env| {
            pause(run, env.now_ms, None)
        })
        .await?;
    assert_eq!(paused.lease_epoch, LeaseEpoch(2));
    let late = tandem_store::transition_run(
        &pool,
        "r1",
        Fence::Epoch(LeaseEpoch(1)),
        &settings(),
        |run, env| {
            update(run, env.now_ms, |run, _| {
                run.detail = Some("late result".into())
            })
        },
    )
    .await;
    assert!(matches!(&late, Err(e) if is_fenced(e, 1, 2)), "{late:?}");

    // Requeue and claim again: strictly greater epoch.
    tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, env| {
        update(run, env.now_ms, |run, _| {
            run.status = AutomationRunStatus::Queued
        })
    })
    .await?;
    let again = tandem_store::claim_queued(&pool, 10).await?;
    assert_eq!(again, vec![("r1".to_owned(), LeaseEpoch(3))]);
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_claim_each_run_exactly_once() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    for i in 0..60 {
        create(&pool, &queued_run(&format!("r{i:03}"), None, now + i)).await?;
    }
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let pool = db.pool()?;
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = tandem_store::claim_queued(&pool, 4).await?;
                if got.is_empty() {
                    return Ok::<_, StoreError>(mine);
                }
                mine.extend(got);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    assert_eq!(all.len(), 60, "every run claimed once");
    let ids: HashSet<&String> = all.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 60, "no run claimed twice");
    assert!(all.iter().all(|(_, e)| *e == LeaseEpoch(1)));
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn workspace_lock_is_enforced_by_the_database() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create(&pool, &queued_run("a", Some("/srv/shared"), now)).await?;
    create(&pool, &queued_run("b", Some(" /srv/shared "), now + 1)).await?;
    create(&pool, &queued_run("c", Some("/srv/other"), now + 2)).await?;

    // The claim takes one run per free root.
    let claimed = tandem_store::claim_queued(&pool, 10).await?;
    let ids: Vec<&str> = claimed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, vec!["a", "c"]);
    assert!(
        tandem_store::claim_queued(&pool, 10).await?.is_empty(),
        "root still locked"
    );

    // Forcing a second running run on the same root is a Conflict, and writes nothing.
    let before_counts = counts(&pool).await?;
    let before_row = row_version(&pool, "b").await?;
    let r = tandem_store::transition_run(&pool, "b", Fence::Unfenced, &settings(), |run, env| {
        update(run, env.now_ms, |run, fx| {
            run.status = AutomationRunStatus::Running;
            fx.lifecycle(run, "run_started", None, None, None, env.now_ms);
        })
    })
    .await;
    match &r {
        Err(StoreError::Conflict { constraint, .. }) => {
            assert_eq!(constraint, "runs_workspace_lock_idx")
        }
        other => bail!("expected a workspace-lock conflict, got {other:?}"),
    }
    assert_eq!(row_version(&pool, "b").await?, before_row);
    assert_eq!(counts(&pool).await?, before_counts);

    // `pausing` holds the lock too; a terminal status releases it.
    tandem_store::transition_run(
        &pool,
        "a",
        Fence::Epoch(LeaseEpoch(1)),
        &settings(),
        |run, env| {
            update(run, env.now_ms, |run, _| {
                run.status = AutomationRunStatus::Pausing
            })
        },
    )
    .await?;
    assert!(tandem_store::claim_queued(&pool, 10).await?.is_empty());
    tandem_store::transition_run(
        &pool,
        "a",
        Fence::Epoch(LeaseEpoch(1)),
        &settings(),
        |run, env| {
            update(run, env.now_ms, |run, _| {
                run.status = AutomationRunStatus::Completed
            })
        },
    )
    .await?;
    let claimed = tandem_store::claim_queued(&pool, 10).await?;
    assert_eq!(claimed, vec![("b".to_owned(), LeaseEpoch(1))]);
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transitions_on_one_run_serialize() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create(&pool, &awaiting_run("r1", now)).await?;
    let pool = Arc::new(pool);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let pool = Arc::clone(&pool);
        tasks.push(tokio::spawn(async move {
            tandem_store::transition_run(
                &pool,
                "r1",
                Fence::Unfenced,
                &settings(),
                move |run, env| {
                    update(run, env.now_ms, |run, fx| {
                        if !run.checkpoint.gate_history.is_empty() {
                            return false;
                        }
                        run.checkpoint
                            .gate_history
                            .push(AutomationGateDecisionRecord {
                                node_id: "approval".into(),
                                decision: "approve".into(),
                                reason: Some(format!("task {i}")),
                                decided_at_ms: env.now_ms,
                                decided_by: Some(GovernanceActorRef::human(&format!("u{i}"))),
                                metadata: None,
                            });
                        run.checkpoint.awaiting_gate = None;
                        run.status = AutomationRunStatus::Queued;
                        fx.lifecycle(
                            run,
                            "approval_decision_recorded",
                            None,
                            None,
                            None,
                            env.now_ms,
                        );
                        fx.event(
                            run,
                            "approval.decision.recorded",
                            Some("approval"),
                            json!({}),
                            None,
                        );
                        true
                    })
                },
            )
            .await
        }));
    }
    let mut winners = 0;
    for t in tasks {
        let applied = t.await??;
        if applied.outcome {
            winners += 1;
            assert!(applied.changed);
        } else {
            assert!(!applied.changed, "losers write nothing");
        }
    }
    assert_eq!(winners, 1);
    let run = tandem_store::get_run(&pool, "r1").await?;
    assert_eq!(run.checkpoint.gate_history.len(), 1);
    assert_eq!(run.checkpoint.lifecycle_history.len(), 1);
    assert_eq!(counts(&pool).await?, [1, 1, 0, 1]);
    let stored = tandem_store::get_stored_run(&pool, "r1").await?;
    assert_eq!(stored.next_action_at_ms, None, "no longer awaiting");
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// sweeps

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn due_gate_batches_act_once_per_due_gate_across_replicas() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    let day = 86_400_000;
    // Due: requested two days ago, so the one-day stale marking is due (expiry is 7 days out).
    for i in 0..40 {
        create(&pool, &awaiting_run(&format!("due{i:02}"), now - 2 * day)).await?;
    }
    // Not due yet.
    for i in 0..5 {
        create(&pool, &awaiting_run(&format!("later{i}"), now)).await?;
    }
    assert_eq!(
        tandem_store::next_gate_action_at(&pool).await?,
        Some(now - day),
        "the earliest stale marking"
    );
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = db.pool()?;
        tasks.push(tokio::spawn(async move {
            let mut acted = Vec::new();
            loop {
                let items = tandem_store::transition_batch(
                    &pool,
                    &Sweep::DueGates,
                    7,
                    &settings(),
                    |run, env| {
                        update(run, env.now_ms, |run, fx| {
                            let gate = run.checkpoint.awaiting_gate.as_mut()?;
                            if gate.is_marked_stale() {
                                return None;
                            }
                            gate.metadata = Some(json!({"stale": true}));
                            fx.lifecycle(
                                run,
                                "approval_gate_marked_stale",
                                None,
                                None,
                                None,
                                env.now_ms,
                            );
                            Some(run.run_id.clone())
                        })
                    },
                )
                .await?;
                if items.is_empty() {
                    return Ok::<_, StoreError>(acted);
                }
                for item in items {
                    let applied = item.result?;
                    assert!(applied.changed, "only due gates are selected");
                    acted.extend(applied.outcome);
                }
            }
        }));
    }
    let mut acted = Vec::new();
    for t in tasks {
        acted.extend(t.await??);
    }
    acted.sort();
    let expected: Vec<String> = (0..40).map(|i| format!("due{i:02}")).collect();
    assert_eq!(acted, expected, "each due gate acted on exactly once");
    let c = pool.get().await?;
    let per_run: Vec<(String, i64)> = c
        .query(
            "SELECT r.run_id, count(l.id) FROM runs r LEFT JOIN run_lifecycle l USING (run_id)
              GROUP BY r.run_id ORDER BY r.run_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (id, n) in per_run {
        assert_eq!(n, i64::from(id.starts_with("due")), "{id}");
    }
    // next_action_at_ms moved to the expiry: nothing is due any more.
    let stored = tandem_store::get_stored_run(&pool, "due00").await?;
    assert_eq!(stored.next_action_at_ms, Some(now - 2 * day + 7 * day));
    assert_eq!(
        tandem_store::next_gate_action_at(&pool).await?,
        Some(now + day),
        "the not-yet-due gates' stale marking is next"
    );
    let again = tandem_store::transition_batch(&pool, &Sweep::DueGates, 50, &settings(), |_, _| {
        Transition::unchanged(())
    })
    .await?;
    assert!(again.is_empty());
    drop(c);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn batch_isolates_a_failing_run_and_selects_by_sweep() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    for id in ["a", "b", "c"] {
        create(&pool, &queued_run(id, None, now)).await?;
    }
    let items = tandem_store::transition_batch(
        &pool,
        &Sweep::Runs(vec!["a".into(), "b".into(), "c".into(), "zz".into()]),
        10,
        &settings(),
        |run, env| {
            update(run, env.now_ms, |run, fx| {
                run.status = AutomationRunStatus::Cancelled;
                fx.lifecycle(run, "run_cancelled", None, None, None, env.now_ms);
                let text = if run.run_id == "b" { "nul\u{0}" } else { "ok" };
                fx.event(
                    run,
                    "automation_v2.run.cancelled",
                    None,
                    json!({ "t": text }),
                    None,
                );
            })
        },
    )
    .await?;
    let ids: Vec<&str> = items.iter().map(|i| i.run_id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b", "c"]);
    assert!(items[0].result.is_ok() && items[2].result.is_ok());
    assert!(matches!(items[1].result, Err(StoreError::Db(_))));
    assert_eq!(counts(&pool).await?, [3, 2, 0, 2], "b rolled back alone");
    assert_eq!(
        tandem_store::get_run(&pool, "b").await?.status,
        AutomationRunStatus::Queued
    );

    // Stopped runs by status and stop kind; stale running runs by activity.
    create(&pool, &queued_run("d", None, now)).await?;
    tandem_store::claim_queued(&pool, 10).await?;
    let c = pool.get().await?;
    c.execute(
        "UPDATE runs SET activity_at_ms = activity_at_ms - 700000 WHERE run_id = 'b'",
        &[],
    )
    .await?;
    let stale = tandem_store::transition_batch(
        &pool,
        &Sweep::StaleRunning { idle_ms: 600_000 },
        10,
        &settings(),
        |run, env| {
            update(run, env.now_ms, |run, _| {
                run.status = AutomationRunStatus::Paused;
                run.stop_kind = Some(AutomationStopKind::StaleReaped);
            })
        },
    )
    .await?;
    let ids: Vec<&str> = stale.iter().map(|i| i.run_id.as_str()).collect();
    assert_eq!(ids, vec!["b"], "only the idle running run");
    let reaped = tandem_store::transition_batch(
        &pool,
        &Sweep::Stopped {
            status: AutomationRunStatus::Paused,
            stop_kind: AutomationStopKind::StaleReaped,
        },
        10,
        &settings(),
        |_, _| Transition::unchanged(()),
    )
    .await?;
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].run_id, "b");
    let running = tandem_store::transition_batch(
        &pool,
        &Sweep::InStatus(AutomationRunStatus::Running),
        10,
        &settings(),
        |_, _| Transition::unchanged(()),
    )
    .await?;
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].run_id, "d");
    drop(c);
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_batch_claims_in_order_and_bumps_epochs() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    for i in 0..6 {
        create(&pool, &queued_run(&format!("q{i}"), None, now + 10 - i)).await?;
    }
    let claim = |pool: Pool| async move {
        tandem_store::transition_batch(&pool, &Sweep::Queued, 2, &settings(), |run, env| {
            update(run, env.now_ms, |run, _| {
                run.status = AutomationRunStatus::Running;
                run.started_at_ms.get_or_insert(env.now_ms);
            })
        })
        .await
    };
    let (a, b) = tokio::join!(claim(db.pool()?), claim(db.pool()?));
    let mut claimed: Vec<(String, LeaseEpoch)> = Vec::new();
    for item in a?.into_iter().chain(b?) {
        let applied = item.result?;
        claimed.push((item.run_id, applied.lease_epoch));
    }
    claimed.sort();
    // Oldest first (q5 was created first); two claimers took four distinct runs.
    let ids: Vec<&str> = claimed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, vec!["q2", "q3", "q4", "q5"]);
    assert!(claimed.iter().all(|(_, e)| *e == LeaseEpoch(1)));
    let left = tandem_store::list_runs_by_status(&pool, AutomationRunStatus::Queued, 10).await?;
    assert_eq!(left.len(), 2);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn claim_and_due_gate_selects_use_the_partial_indexes() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let c = pool.get().await?;
    // 20k rows, 1 % queued, 9 % awaiting with gates far in the future.
    c.batch_execute(
        "INSERT INTO runs (run_id, automation_id, org_id, workspace_id, status, created_at_ms,
                           updated_at_ms, activity_at_ms, next_action_at_ms, doc)
         SELECT 'r' || g, 'a', 'o', 'w',
                CASE WHEN g % 100 = 0 THEN 'queued'
                     WHEN g % 10 = 0 THEN 'awaiting_approval'
                     ELSE 'completed' END,
                g, g, g,
                CASE WHEN g % 10 = 0 AND g % 100 <> 0 THEN 10000000000000 + g END,
                '{}'::jsonb
           FROM generate_series(1, 20000) g;
         ANALYZE runs;
         SET plan_cache_mode = force_generic_plan;",
    )
    .await?;
    let plan = |name: &'static str, sql: String, args: &'static str| {
        let c = &c;
        async move {
            c.batch_execute(&format!("PREPARE {name} AS {sql}")).await?;
            let mut text = String::new();
            for m in c
                .simple_query(&format!("EXPLAIN EXECUTE {name}({args})"))
                .await?
            {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                    text.push_str(r.get(0).unwrap_or_default());
                    text.push('\n');
                }
            }
            anyhow::Ok(text)
        }
    };
    let claim = plan("claim", tandem_store::CLAIM_QUEUED_SQL.to_owned(), "10").await?;
    ensure!(claim.contains("runs_queued_idx"), "claim plan:\n{claim}");
    ensure!(!claim.contains("Seq Scan on runs"), "claim plan:\n{claim}");
    let queued = plan(
        "queued",
        tandem_store::sweep_select_sql(&Sweep::Queued),
        "10",
    )
    .await?;
    ensure!(queued.contains("runs_queued_idx"), "queued plan:\n{queued}");
    ensure!(
        !queued.contains("Sort"),
        "queued runs come off the index in order:\n{queued}"
    );
    let due = plan(
        "due",
        tandem_store::sweep_select_sql(&Sweep::DueGates),
        "50",
    )
    .await?;
    ensure!(due.contains("runs_due_gate_idx"), "due plan:\n{due}");
    ensure!(!due.contains("Seq Scan"), "due plan:\n{due}");
    ensure!(
        !due.contains("Sort"),
        "due gates come off the index in order:\n{due}"
    );
    let stale = plan(
        "stale",
        tandem_store::sweep_select_sql(&Sweep::StaleRunning { idle_ms: 1 }),
        "50, 1",
    )
    .await?;
    ensure!(!stale.contains("Seq Scan"), "stale plan:\n{stale}");
    drop(c);
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// audit chain

/// Writes `n` audit drafts through transitions on `runs` runs.
async fn write_audit(pool: &Pool, run_id: &str, n: usize) -> anyhow::Result<()> {
    for i in 0..n {
        tandem_store::transition_run(pool, run_id, Fence::Unfenced, &settings(), |run, env| {
            update(run, env.now_ms, |run, fx| {
                fx.internal_sweep_audit(
                    run,
                    "automation_v2.test.audit",
                    "test",
                    "ok",
                    None,
                    json!({"i": i, "float": 0.1, "nested": {"b": 1, "a": [true, null]}}),
                )
            })
        })
        .await?;
    }
    Ok(())
}

async fn linked_chain(n: usize) -> anyhow::Result<(TestDb, Pool)> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create(&pool, &queued_run("r1", None, now)).await?;
    write_audit(&pool, "r1", n).await?;
    assert_eq!(
        tandem_store::link_audit_chain(&pool, 1_000).await?,
        n as u64
    );
    assert_eq!(tandem_store::verify_audit_chain(&pool).await?, Ok(n as u64));
    Ok((db, pool))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_chain_links_concurrent_writers_into_one_verifiable_chain() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    assert_eq!(
        tandem_store::verify_audit_chain(&pool).await?,
        Ok(0),
        "empty chain"
    );
    for w in 0..5 {
        create(&pool, &queued_run(&format!("w{w}"), None, now)).await?;
    }
    let mut writers = Vec::new();
    for w in 0..5 {
        let pool = db.pool()?;
        writers.push(tokio::spawn(async move {
            write_audit(&pool, &format!("w{w}"), 8).await
        }));
    }
    let mut chainers = Vec::new();
    for _ in 0..3 {
        let pool = db.pool()?;
        chainers.push(tokio::spawn(async move {
            let mut linked = 0;
            for _ in 0..15 {
                linked += tandem_store::link_audit_chain(&pool, 3).await?;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Ok::<_, StoreError>(linked)
        }));
    }
    for w in writers {
        w.await??;
    }
    let mut linked = 0;
    for c in chainers {
        linked += c.await??;
    }
    loop {
        let n = tandem_store::link_audit_chain(&pool, 7).await?;
        if n == 0 {
            break;
        }
        linked += n;
    }
    assert_eq!(linked, 40, "every row linked exactly once");
    assert_eq!(tandem_store::verify_audit_chain(&pool).await?, Ok(40));
    let c = pool.get().await?;
    let r = c
        .query_one(
            "SELECT count(*), count(DISTINCT seq), min(seq), max(seq),
                    (SELECT seq FROM audit_chain_head) FROM audit_log",
            &[],
        )
        .await?;
    assert_eq!(
        (
            r.get::<_, i64>(0),
            r.get::<_, i64>(1),
            r.get::<_, Option<i64>>(2)
        ),
        (40, 40, Some(1))
    );
    assert_eq!(
        (r.get::<_, Option<i64>>(3), r.get::<_, i64>(4)),
        (Some(40), 40)
    );

    // The guard trigger: linked rows cannot be edited or deleted through normal writes.
    let err = c
        .execute("UPDATE audit_log SET payload = '{}' WHERE seq = 3", &[])
        .await
        .err()
        .context("linked audit row updated")?;
    assert!(format!("{err:?}").contains("append-only"), "{err:?}");
    let err = c
        .execute("DELETE FROM audit_log WHERE seq = 3", &[])
        .await
        .err()
        .context("linked audit row deleted")?;
    assert!(format!("{err:?}").contains("cannot be deleted"), "{err:?}");
    drop(c);
    drop(pool);
    db.drop_db().await
}

/// Tampering as a table owner would: with the guard trigger disabled.
async fn tamper(pool: &Pool, sql: &str) -> anyhow::Result<()> {
    let c = pool.get().await?;
    c.batch_execute(&format!(
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_guard;
         {sql};
         ALTER TABLE audit_log ENABLE TRIGGER audit_log_guard;"
    ))
    .await?;
    Ok(())
}

#[tokio::test]
async fn audit_chain_detects_an_edited_row() -> anyhow::Result<()> {
    let (db, pool) = linked_chain(6).await?;
    tamper(
        &pool,
        "UPDATE audit_log SET payload = jsonb_set(payload, '{outcome}', '\"forged\"') WHERE seq = 4",
    )
    .await?;
    assert_eq!(
        tandem_store::verify_audit_chain(&pool).await?,
        Err(ChainBreak::HashMismatch { seq: 4 })
    );
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn audit_chain_detects_a_deleted_row() -> anyhow::Result<()> {
    let (db, pool) = linked_chain(6).await?;
    tamper(&pool, "DELETE FROM audit_log WHERE seq = 3").await?;
    assert_eq!(
        tandem_store::verify_audit_chain(&pool).await?,
        Err(ChainBreak::SeqGap {
            expected: 3,
            found: 4
        })
    );
    // Deleting the tail is caught by the chain head.
    tamper(&pool, "DELETE FROM audit_log WHERE seq >= 3").await?;
    assert_eq!(
        tandem_store::verify_audit_chain(&pool).await?,
        Err(ChainBreak::SeqGap {
            expected: 3,
            found: 7
        })
    );
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn audit_chain_detects_reordered_rows() -> anyhow::Result<()> {
    let (db, pool) = linked_chain(6).await?;
    tamper(
        &pool,
        "UPDATE audit_log SET seq = seq + 1000 WHERE seq IN (2, 3);
         UPDATE audit_log SET seq = CASE seq WHEN 1002 THEN 3 ELSE 2 END
          WHERE seq IN (1002, 1003)",
    )
    .await?;
    assert_eq!(
        tandem_store::verify_audit_chain(&pool).await?,
        Err(ChainBreak::PrevHashMismatch { seq: 2 })
    );
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn audit_chain_keeps_growing_after_verification() -> anyhow::Result<()> {
    let (db, pool) = linked_chain(3).await?;
    write_audit(&pool, "r1", 2).await?;
    assert_eq!(
        tandem_store::verify_audit_chain(&pool).await?,
        Ok(3),
        "unlinked rows are not part of the chain yet"
    );
    assert_eq!(tandem_store::link_audit_chain(&pool, 1).await?, 1);
    assert_eq!(tandem_store::link_audit_chain(&pool, 10).await?, 1);
    assert_eq!(tandem_store::link_audit_chain(&pool, 10).await?, 0);
    assert_eq!(tandem_store::verify_audit_chain(&pool).await?, Ok(5));
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// automations and governance

#[tokio::test]
async fn automations_store_and_feed_the_transition_env() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    let mut a = spec("auto-1");
    a.metadata = Some(json!({"tenant_context": TenantContext::explicit("o", "w")}));
    a.extra
        .insert("unknown_upstream_field".into(), json!([1, 2]));
    tandem_store::insert_automation(&pool, &a).await?;
    assert_eq!(tandem_store::get_automation(&pool, "auto-1").await?, a);
    let dup = tandem_store::insert_automation(&pool, &a).await;
    assert!(matches!(dup, Err(StoreError::Conflict { .. })), "{dup:?}");
    a.name = "renamed".into();
    tandem_store::upsert_automation(&pool, &a).await?;
    assert_eq!(
        tandem_store::get_automation(&pool, "auto-1").await?.name,
        "renamed"
    );
    assert_eq!(
        tandem_store::list_automations(&pool, "o", "w", 10).await?,
        vec![a]
    );
    assert!(
        tandem_store::list_automations(&pool, "local", "local", 10)
            .await?
            .is_empty()
    );
    let missing = tandem_store::get_automation(&pool, "nope").await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))));

    create(&pool, &queued_run("r1", None, now)).await?;
    let seen = tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |_, env| {
        Transition::unchanged((
            env.automation_is_live,
            env.automation.as_deref().map(|a| a.name.clone()),
            env.governance.is_some(),
        ))
    })
    .await?;
    assert_eq!(seen.outcome, (true, Some("renamed".into()), false));
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn governance_snapshot_reads_pauses_and_live_overrides() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    let tenant = TenantContext::explicit("org", "ws");
    let key_a = agent_scope_key(&tenant, "agent-a");
    let key_b = agent_scope_key(&tenant, "agent-b");
    let other_tenant_key = agent_scope_key(&TenantContext::explicit("org2", "ws"), "agent-a");

    assert!(tandem_store::pause_agent_spend(&pool, &key_a, Some("over cap")).await?);
    assert!(
        !tandem_store::pause_agent_spend(&pool, &key_a, None).await?,
        "already paused"
    );
    assert!(tandem_store::pause_agent_spend(&pool, &other_tenant_key, None).await?);
    let ov = |key: &str, status, expires_at_ms| NewQuotaOverride {
        agent_key: key.to_owned(),
        status,
        expires_at_ms,
        approved_by: None,
        reason: Some("test".into()),
    };
    let live = tandem_store::insert_quota_override(
        &pool,
        &ov(&key_b, QuotaOverrideStatus::Pending, now + 3_600_000),
    )
    .await?;
    tandem_store::insert_quota_override(&pool, &ov(&key_a, QuotaOverrideStatus::Approved, now - 1))
        .await?;
    tandem_store::insert_quota_override(
        &pool,
        &ov(&key_a, QuotaOverrideStatus::Rejected, now + 3_600_000),
    )
    .await?;

    let snap = tandem_store::governance_snapshot(&pool).await?;
    assert_eq!(
        snap.spend_paused_agents,
        HashSet::from([key_a.clone(), other_tenant_key.clone()])
    );
    assert!(
        snap.quota_overrides.is_empty(),
        "pending, expired, rejected: none live"
    );

    tandem_store::set_quota_override_status(
        &pool,
        live,
        QuotaOverrideStatus::Approved,
        Some("boss"),
    )
    .await?;
    let snap = tandem_store::governance_snapshot(&pool).await?;
    assert_eq!(snap.quota_overrides.len(), 1);
    assert_eq!(snap.quota_overrides[0].agent_key, key_b);
    assert!(snap.has_quota_override(&tenant, "agent-b", now));
    assert!(snap.spend_paused_without_override(&tenant, "agent-a", now));
    let missing = tandem_store::set_quota_override_status(
        &pool,
        uuid::Uuid::new_v4(),
        QuotaOverrideStatus::Revoked,
        None,
    )
    .await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))));

    // Inside a transition: scoped to the automation's agents and tenant.
    let mut a = spec("auto-g");
    a.creator_id = "agent-a".into();
    a.agents = vec![AutomationAgentProfile {
        agent_id: "agent-b".into(),
        extra: BTreeMap::new(),
    }];
    a.metadata = Some(json!({"tenant_context": tenant}));
    tandem_store::insert_automation(&pool, &a).await?;
    let mut run =
        AutomationV2RunRecord::new_queued("rg".into(), &a, "manual", ExecutionProfile::Strict, now);
    run.tenant_context = tenant.clone();
    create(&pool, &run).await?;
    let seen = tandem_store::transition_run(
        &pool,
        "rg",
        Fence::Unfenced,
        &settings().with_governance(),
        |_, env| Transition::unchanged(env.governance.clone()),
    )
    .await?;
    let g = seen.outcome.context("governance loaded")?;
    assert_eq!(
        g.spend_paused_agents,
        HashSet::from([key_a.clone()]),
        "other tenant excluded"
    );
    assert_eq!(g.quota_overrides.len(), 1);
    assert!(
        g.launch_blocked_by_spend_pause(&a, now),
        "agent-a paused without override"
    );

    assert!(tandem_store::resume_agent_spend(&pool, &key_a).await?);
    assert!(!tandem_store::resume_agent_spend(&pool, &key_a).await?);

    tandem_store::upsert_spend_cap(
        &pool,
        &tandem_store::SpendCap {
            org_id: "org".into(),
            workspace_id: "ws".into(),
            agent_id: "agent-a".into(),
            weekly_cap_usd: 10.0,
        },
    )
    .await?;
    tandem_store::upsert_spend_cap(
        &pool,
        &tandem_store::SpendCap {
            org_id: "org".into(),
            workspace_id: "ws".into(),
            agent_id: "agent-a".into(),
            weekly_cap_usd: 12.5,
        },
    )
    .await?;
    let caps = tandem_store::list_spend_caps(&pool, "org", "ws").await?;
    assert_eq!(caps.len(), 1);
    assert_eq!(caps[0].weekly_cap_usd, 12.5);
    let bad = tandem_store::upsert_spend_cap(
        &pool,
        &tandem_store::SpendCap {
            org_id: "org".into(),
            workspace_id: "ws".into(),
            agent_id: "x".into(),
            weekly_cap_usd: f64::NAN,
        },
    )
    .await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))));
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transition_runs_locks_in_id_order_reports_unknown_runs_and_bumps_activity()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    for id in ["b", "a", "c"] {
        create(&pool, &queued_run(id, None, now)).await?;
    }
    let before = tandem_store::get_stored_run(&pool, "c")
        .await?
        .activity_at_ms;
    // Activity is stamped with the database clock: let it move on.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let ids: Vec<String> = ["c", "zz", "a", "b"].map(String::from).to_vec();
    let items = tandem_store::transition_runs(&pool, &ids, &settings(), true, |run, env| {
        if run.run_id == "c" {
            Transition::unchanged(())
        } else {
            pause(run, env.now_ms, None)
        }
    })
    .await?;
    let order: Vec<&str> = items.iter().map(|i| i.run_id.as_str()).collect();
    assert_eq!(order, ["a", "b", "c", "zz"], "run id order");
    assert!(matches!(items[3].result, Err(StoreError::NotFound(_))));
    for id in ["a", "b"] {
        let s = tandem_store::get_stored_run(&pool, id).await?;
        assert_eq!(s.run.status, AutomationRunStatus::Paused);
        assert!(
            s.activity_at_ms > before,
            "{id}: a changed run's activity moves on"
        );
    }
    let c = tandem_store::get_stored_run(&pool, "c").await?;
    assert_eq!(c.run.status, AutomationRunStatus::Queued);
    assert_eq!(c.activity_at_ms, before, "an unchanged run is not written");
    assert_eq!(
        counts(&pool).await?[3],
        2,
        "one outbox event per changed run"
    );

    // Overlapping sets in opposite orders, many times at once: the id-ordered locks never
    // deadlock, and every call applies to every run.
    let mut calls = Vec::new();
    for i in 0..8 {
        let pool = pool.clone();
        let ids: Vec<String> = if i % 2 == 0 {
            ["a", "b", "c"].map(String::from).to_vec()
        } else {
            ["c", "b", "a"].map(String::from).to_vec()
        };
        calls.push(tokio::spawn(async move {
            tandem_store::transition_runs(&pool, &ids, &settings(), false, |run, env| {
                update(run, env.now_ms, |run, _| {
                    run.detail = Some(format!("{}+", run.detail.clone().unwrap_or_default()));
                })
            })
            .await
        }));
    }
    for call in calls {
        let items = call.await??;
        assert!(items.iter().all(|i| i.result.is_ok()), "{items:?}");
    }
    for id in ["a", "b", "c"] {
        let detail = tandem_store::get_run(&pool, id)
            .await?
            .detail
            .unwrap_or_default();
        assert_eq!(detail.matches('+').count(), 8, "{id}: {detail}");
    }
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// the running-count ledger (capacity)

/// `running` runs by `count(*)`, and by the ledger's sum.
async fn running_counts(pool: &Pool) -> anyhow::Result<(i64, i64)> {
    let row = pool
        .get()
        .await?
        .query_one(
            "SELECT (SELECT count(*) FROM runs WHERE status = 'running'),
                    (SELECT coalesce(sum(delta), 0)::bigint FROM running_count_ledger
                      WHERE reservation_id IS NULL)",
            &[],
        )
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// The claimer's fold of the ledger, under the claim lock as in a claim.
async fn fold_running_count(pool: &Pool) -> anyhow::Result<i64> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&tandem_store::CLAIM_LOCK_KEY],
    )
    .await?;
    let n: i64 = tx
        .query_one(tandem_store::RUNNING_COUNT_SQL, &[])
        .await?
        .try_get(0)?;
    tx.commit().await?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn running_count_ledger_matches_count_under_concurrent_writers_and_folds()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    for i in 0..40 {
        create(&pool, &queued_run(&format!("l{i:02}"), None, now + i)).await?;
    }
    // Every kind of write that enters or leaves `running`: set updates, an insert of a running
    // row, a delete of one, and updates that do not touch `running` at all.
    let client = pool.get().await?;
    client
        .batch_execute(
            "UPDATE runs SET status = 'running' WHERE run_id < 'l10';
             UPDATE runs SET status = 'completed' WHERE run_id IN ('l00', 'l01');
             UPDATE runs SET status = 'failed' WHERE run_id = 'l30';
             UPDATE runs SET activity_at_ms = activity_at_ms + 1 WHERE run_id < 'l10';
             INSERT INTO runs (run_id, automation_id, org_id, workspace_id, status, lease_epoch,
                               created_at_ms, updated_at_ms, activity_at_ms, doc)
                  SELECT 'extra', automation_id, org_id, workspace_id, 'running', 1,
                         created_at_ms, updated_at_ms, activity_at_ms, doc
                    FROM runs WHERE run_id = 'l20';
             DELETE FROM runs WHERE run_id = 'l02';",
        )
        .await?;
    // l03..l09 and `extra` are running.
    assert_eq!(running_counts(&pool).await?, (8, 8));
    assert_eq!(fold_running_count(&pool).await?, 8);

    // Writers flip statuses in their own transactions (some rolled back) while folds run.
    let mut tasks = Vec::new();
    for w in 0..6usize {
        let pool = db.pool()?;
        tasks.push(tokio::spawn(async move {
            for k in 0..40usize {
                let mut client = pool.get().await?;
                let tx = client.transaction().await?;
                let id = format!("l{:02}", 10 + (w * 7 + k * 3) % 30);
                let status = ["running", "queued", "completed", "running"][k % 4];
                tx.execute(
                    "UPDATE runs SET status = $2 WHERE run_id = $1",
                    &[&id, &status],
                )
                .await?;
                if k % 5 == 0 {
                    tx.rollback().await?;
                } else {
                    tx.commit().await?;
                }
            }
            anyhow::Ok(())
        }));
    }
    let folder = {
        let pool = db.pool()?;
        tokio::spawn(async move {
            for _ in 0..60 {
                fold_running_count(&pool).await?;
            }
            anyhow::Ok(())
        })
    };
    for t in tasks {
        t.await??;
    }
    folder.await??;
    let (counted, ledger) = running_counts(&pool).await?;
    assert_eq!(ledger, counted, "the ledger's sum is the running count");
    assert_eq!(fold_running_count(&pool).await?, counted);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM running_count_ledger", &[])
        .await?
        .try_get(0)?;
    assert_eq!(rows, 1, "a fold leaves one balance row");

    // The claim reads the same count.
    create(&pool, &queued_run("last", None, now + 100)).await?;
    let limits = tandem_store::ClaimLimits {
        max_concurrent_runs: 1_000,
        batch: 8,
        relay_lease: None,
    };
    let report =
        tandem_store::claim_runs(&pool, limits, &settings(), |_, _| Transition::unchanged(()))
            .await?;
    assert_eq!(report.running_before, counted);
    let claimed = report.claimed() as i64;
    assert!(claimed >= 1, "at least the new run was claimed");
    assert_eq!(
        running_counts(&pool).await?,
        (counted + claimed, counted + claimed)
    );
    drop(client);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn a_claim_whose_reservation_is_about_to_expire_commits_nothing() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    for i in 0..3 {
        create(&pool, &queued_run(&format!("e{i}"), None, now + i)).await?;
    }
    // Reservations are written expiring within the take-back margin, as if the claim had been
    // stalled for most of their life.
    let client = pool.get().await?;
    client
        .batch_execute(&format!(
            "CREATE FUNCTION short_reservation() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.reservation_id IS NOT NULL THEN
                     NEW.reservation_expires_at := now() + make_interval(secs => {});
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER short_reservation BEFORE INSERT ON running_count_ledger
                 FOR EACH ROW EXECUTE FUNCTION short_reservation();",
            tandem_store::RESERVATION_MARGIN_SECS / 2
        ))
        .await?;
    let limits = tandem_store::ClaimLimits {
        max_concurrent_runs: 10,
        batch: 8,
        relay_lease: None,
    };
    let err =
        tandem_store::claim_runs(&pool, limits, &settings(), |_, _| Transition::unchanged(()))
            .await
            .err()
            .context("a claim past its reservation committed")?;
    assert!(err.to_string().contains("reservation"), "{err}");
    let queued: i64 = client
        .query_one("SELECT count(*) FROM runs WHERE status = 'queued'", &[])
        .await?
        .try_get(0)?;
    assert_eq!(queued, 3, "nothing was claimed");
    assert_eq!(running_counts(&pool).await?, (0, 0));

    // With reservations that hold, the same claim goes through.
    client
        .batch_execute("DROP TRIGGER short_reservation ON running_count_ledger")
        .await?;
    let report =
        tandem_store::claim_runs(&pool, limits, &settings(), |_, _| Transition::unchanged(()))
            .await?;
    assert_eq!(report.claimed(), 3);
    drop(client);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn capacity_reservations_count_against_the_cap_until_released_or_expired()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    for i in 0..6 {
        create(&pool, &queued_run(&format!("c{i}"), None, now + i)).await?;
    }
    let limits = tandem_store::ClaimLimits {
        max_concurrent_runs: 3,
        batch: 8,
        relay_lease: None,
    };
    let claim = || async {
        tandem_store::claim_runs(&pool, limits, &settings(), |_, _| Transition::unchanged(())).await
    };
    // Another replica is mid-claim with 2 slots reserved: 1 slot is left.
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO running_count_ledger (delta, reservation_id, reservation_expires_at)
             VALUES (2, gen_random_uuid(), now() + interval '30 seconds')",
            &[],
        )
        .await?;
    let first = claim().await?;
    assert_eq!(first.claimed(), 1, "reserved slots are not free");
    // That replica died: its reservation expires and its slots come back.
    client
        .execute(
            "UPDATE running_count_ledger SET reservation_expires_at = now() - interval '1 second'
              WHERE reservation_id IS NOT NULL",
            &[],
        )
        .await?;
    let second = claim().await?;
    assert_eq!(second.running_before, 1);
    assert_eq!(second.claimed(), 2, "expired reservations free their slots");
    let third = claim().await?;
    assert_eq!(third.claimed(), 0, "the cap is reached");
    let reservations: i64 = client
        .query_one(
            "SELECT count(*) FROM running_count_ledger WHERE reservation_id IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    assert_eq!(reservations, 0, "claims release their reservations");
    assert_eq!(running_counts(&pool).await?, (3, 3));
    drop(client);
    drop(pool);
    db.drop_db().await
}
