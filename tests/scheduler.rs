//! The scheduler against the real PostgreSQL and NATS: the V2 migration, the fleet-wide batch
//! claim (capacity, workspace lock, queue reasons, lease epochs, runtime-context failure and
//! launch hold inside the claim), the outbox relay (once per row, crash between PubAck and mark,
//! NATS unreachable), result application (stale results dropped, poisoned messages
//! dead-lettered) and the `tandem-scheduler` binary running flows to `completed` with an
//! in-test worker.
//!
//! Every test has its own database (`TestDb`) and NATS prefix (`unique`), and removes both when
//! it passes.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use deadpool_postgres::Pool;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tandem_bus::{
    OutgoingMessage, Prefix, StreamNames,
    async_nats::{self, jetstream},
};
use tandem_core::claim::{ClaimOutcome, LAUNCH_HELD_DETAIL, RUNTIME_CONTEXT_MISSING_DETAIL};
use tandem_core::config::{GatePolicyDefaults, LifecycleSettings};
use tandem_core::execution::{apply_task_result, dispatch_ready_nodes, request_pause, resume_run};
use tandem_core::governance::agent_scope_key;
use tandem_core::protocol::{TaskMessage, TaskResult, TaskStatus, TaskUsage};
use tandem_core::{
    AutomationAgentProfile, AutomationFlowNode, AutomationRunStatus, AutomationStopKind,
    AutomationV2RunRecord, AutomationV2Spec, Effects, ExecutionProfile, Millis, QueueReason,
    Transition, update,
};
use tandem_runtime::{Relay, RelaySettings, Shutdown};
use tandem_scheduler::{ResultApplied, Scheduler, SchedulerConfig};
use tandem_store::{
    ClaimItemOutcome, ClaimLimits, ClaimReport, Fence, LeaseEpoch, OutboxKind, StoreSettings,
};
use tandem_tests::bus::TestBus;
use tandem_tests::procs::{EXIT_TIMEOUT, Proc, delete_streams, free_port, http_get};
use tandem_tests::{TestDb, db_now, nats_url, unique};

// ---------------------------------------------------------------------------------------------
// helpers

const GATES: GatePolicyDefaults = GatePolicyDefaults {
    expires_after_ms: Some(604_800_000),
    on_expiry: tandem_core::AutomationGateExpiryAction::Cancel,
    stale_after_ms: 86_400_000,
};

fn settings() -> StoreSettings {
    StoreSettings::new(GATES)
}

/// A linear flow `n1 → n2 → …` of task nodes.
fn chain_spec(id: &str, nodes: usize) -> AutomationV2Spec {
    let names: Vec<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
    let flow = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if i == 0 {
                AutomationFlowNode::task(n, &[])
            } else {
                AutomationFlowNode::task(n, &[names[i - 1].as_str()])
            }
        })
        .collect();
    AutomationV2Spec::new(id, flow)
}

fn queued(run_id: &str, spec: &AutomationV2Spec, created_at_ms: Millis) -> AutomationV2RunRecord {
    AutomationV2RunRecord::new_queued(
        run_id.into(),
        spec,
        "manual",
        ExecutionProfile::Strict,
        created_at_ms,
    )
}

/// Creates a queued run of `spec`.
async fn create_queued(
    pool: &Pool,
    run_id: &str,
    spec: &AutomationV2Spec,
    created_at_ms: Millis,
) -> anyhow::Result<()> {
    let run = queued(run_id, spec, created_at_ms);
    tandem_store::create_run(pool, &run, &Effects::default(), &settings()).await?;
    Ok(())
}

/// Creates a queued run of a one-node flow on `root`.
async fn create_on_root(
    pool: &Pool,
    run_id: &str,
    root: Option<&str>,
    created_at_ms: Millis,
) -> anyhow::Result<()> {
    let mut spec = chain_spec("auto", 1);
    spec.workspace_root = root.map(str::to_owned);
    let run = queued(run_id, &spec, created_at_ms);
    tandem_store::create_run(pool, &run, &Effects::default(), &settings()).await?;
    Ok(())
}

/// A claim pass that dispatches nothing (the runs stay `running`).
async fn claim_plain(pool: &Pool, cap: u32, batch: usize) -> anyhow::Result<ClaimReport<()>> {
    let limits = ClaimLimits {
        max_concurrent_runs: cap,
        batch,
        relay_lease: None,
    };
    Ok(
        tandem_store::claim_runs(pool, limits, &settings(), |_, _| Transition::unchanged(()))
            .await?,
    )
}

/// A claim pass that dispatches with the core, as the scheduler does.
async fn claim_dispatching(
    pool: &Pool,
    cap: u32,
) -> anyhow::Result<ClaimReport<Option<tandem_core::execution::DispatchOutcome>>> {
    claim_dispatching_leased(pool, cap, None).await
}

/// [`claim_dispatching`] with the claim's outbox rows leased to the caller (`relay_lease`).
async fn claim_dispatching_leased(
    pool: &Pool,
    cap: u32,
    relay_lease: Option<Duration>,
) -> anyhow::Result<ClaimReport<Option<tandem_core::execution::DispatchOutcome>>> {
    let limits = ClaimLimits {
        max_concurrent_runs: cap,
        batch: 64,
        relay_lease,
    };
    Ok(
        tandem_store::claim_runs(pool, limits, &settings(), |run, env| {
            let Some(a) =
                tandem_core::claim::claim_automation(run, env.automation.as_deref()).cloned()
            else {
                return Transition::unchanged(None);
            };
            let t = dispatch_ready_nodes(run, &a, env.lease_epoch.0, &GATES, env.now_ms);
            Transition {
                outcome: Some(t.outcome),
                changed: t.changed,
                effects: t.effects,
            }
        })
        .await?,
    )
}

fn claimed_ids<D>(report: &ClaimReport<D>) -> Vec<String> {
    report
        .items
        .iter()
        .filter(|i| matches!(i.result, Ok(ClaimItemOutcome::Claimed { .. })))
        .map(|i| i.run_id.clone())
        .collect()
}

async fn count_status(pool: &Pool, status: &str) -> anyhow::Result<i64> {
    let c = pool.get().await?;
    Ok(
        c.query_one("SELECT count(*) FROM runs WHERE status = $1", &[&status])
            .await?
            .get(0),
    )
}

async fn row_xmin(pool: &Pool, run_id: &str) -> anyhow::Result<String> {
    let c = pool.get().await?;
    Ok(
        c.query_one("SELECT xmin::text FROM runs WHERE run_id = $1", &[&run_id])
            .await?
            .get(0),
    )
}

async fn epoch_of(pool: &Pool, run_id: &str) -> anyhow::Result<i64> {
    Ok(tandem_store::get_stored_run(pool, run_id)
        .await?
        .lease_epoch
        .0)
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
        Ok(Self(TestBus::new("t").await?))
    }

    fn scheduler(&self, pool: &Pool, cap: u32) -> Scheduler {
        let lifecycle = LifecycleSettings {
            max_concurrent_runs: cap,
            gates: GATES,
            ..LifecycleSettings::default()
        };
        Scheduler::new(
            pool.clone(),
            self.client.clone(),
            self.js.clone(),
            self.prefix.clone(),
            SchedulerConfig::default(),
            lifecycle,
        )
    }
}

/// All messages of a stream, in stream order: (subject, payload). Read by sequence, without a
/// consumer (a work-queue stream must not get a second one).
async fn read_stream(bus: &Bus, stream: &str) -> anyhow::Result<Vec<(String, Value)>> {
    let mut s = bus.js.get_stream(stream).await?;
    let state = s.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push((m.subject.to_string(), serde_json::from_slice(&m.payload)?));
        }
    }
    Ok(out)
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// migration

/// Applies migrations V1..=`version` the way `migrate` records them (an older build's schema).
async fn migrate_up_to(pool: &Pool, version: i32) -> anyhow::Result<()> {
    let c = pool.get().await?;
    c.batch_execute(
        "CREATE TABLE tandem_schema_migrations (
             version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    for m in tandem_store::MIGRATIONS
        .iter()
        .filter(|m| m.version <= version)
    {
        c.batch_execute(m.sql).await?;
        c.execute(
            "INSERT INTO tandem_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &m.checksum()],
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn v2_migration_applies_over_v1_and_keeps_v1_rows_as_events() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    let pool = db.pool()?;
    {
        // What `migrate` did before V2 existed.
        migrate_up_to(&pool, 1).await?;
        let c = pool.get().await?;
        c.execute(
            "INSERT INTO outbox (event_id, run_id, event_type, org_id, workspace_id, dedupe_id, payload)
             VALUES (gen_random_uuid(), 'r-old', 'automation_v2.run.failed', 'o', 'w', 'k-old', '{}')",
            &[],
        )
        .await?;
    }
    assert_eq!(tandem_store::schema_version(&pool).await?, 1);
    let err = tandem_store::check_schema(&pool)
        .await
        .err()
        .context("V1 accepted")?;
    assert!(
        err.to_string().contains("partially migrated (version 1"),
        "{err}"
    );

    let report = tandem_store::migrate(&pool).await?;
    let later: Vec<i32> = (2..=tandem_store::latest_version()).collect();
    assert_eq!(report.applied, later, "V2 and every later migration");
    assert_eq!(report.version, tandem_store::latest_version());
    tandem_store::check_schema(&pool).await?;

    let rows = tandem_store::unpublished_outbox(&pool, 10).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].kind, OutboxKind::Event, "V1 rows are events");
    let c = pool.get().await?;
    // A task row needs its queue, and an event row must not have one.
    for (kind, queue) in [
        ("task", None::<&str>),
        ("event", Some("default")),
        ("other", None),
    ] {
        let r = c
            .execute(
                "INSERT INTO outbox (event_id, run_id, event_type, org_id, workspace_id, dedupe_id,
                                     payload, subject_kind, task_queue)
                 VALUES (gen_random_uuid(), 'r', 't', 'o', 'w', 'k', '{}', $1, $2)",
                &[&kind, &queue],
            )
            .await;
        ensure!(r.is_err(), "{kind} row with queue {queue:?} accepted");
    }
    drop(c);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn v8_migration_backfills_the_runtime_budget_of_claimed_runs() -> anyhow::Result<()> {
    let db = TestDb::empty().await?;
    let pool = db.pool()?;
    {
        // The schema as V7 left it, with runs written by a V7 build.
        migrate_up_to(&pool, 7).await?;
        let c = pool.get().await?;
        for (id, status, budget) in [
            ("running-budget", "running", true),
            ("pausing-budget", "pausing", true),
            ("running-none", "running", false),
            ("queued-budget", "queued", true),
        ] {
            let execution = if budget {
                json!({"max_total_runtime_ms": 1000})
            } else {
                json!({})
            };
            let doc = json!({"run_id": id, "automation_snapshot": {"execution": execution}});
            c.execute(
                "INSERT INTO runs (run_id, automation_id, org_id, workspace_id, status,
                                   created_at_ms, updated_at_ms, activity_at_ms, doc)
                 VALUES ($1, 'a', 'o', 'w', $2, 1, 1, 1, $3)",
                &[&id, &status, &doc],
            )
            .await?;
        }
    }
    let report = tandem_store::migrate(&pool).await?;
    assert_eq!(report.applied, [8]);
    let c = pool.get().await?;
    let flagged: Vec<String> = c
        .query(
            "SELECT run_id FROM runs WHERE has_runtime_budget ORDER BY run_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Claimed runs now; the queued one gets its flag when its claim writes the row.
    assert_eq!(flagged, ["pausing-budget", "running-budget"]);
    drop(c);
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// claims

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_is_never_exceeded_with_three_concurrent_claimers() -> anyhow::Result<()> {
    const CAP: u32 = 4;
    const RUNS: usize = 40;
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    for i in 0..RUNS {
        create_on_root(&pool, &format!("r{i:03}"), None, now + i as u64).await?;
    }
    let done = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicI64::new(0));

    // Three claimers, each with its own pool (its own connections), as three replicas.
    let mut claimers = Vec::new();
    for _ in 0..3 {
        let pool = db.pool()?;
        let done = done.clone();
        claimers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let report = claim_plain(&pool, CAP, 8).await?;
                ensure!(
                    report.items.iter().all(|i| i.result.is_ok()),
                    "a claim failed: {report:?}"
                );
                mine.extend(claimed_ids(&report));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(mine)
        }));
    }
    // A sampler: every committed state has at most CAP running runs.
    let sampler = {
        let pool = db.pool()?;
        let done = done.clone();
        let max_seen = max_seen.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let n = count_status(&pool, "running").await?;
                max_seen.fetch_max(n, Ordering::Relaxed);
                ensure!(n <= i64::from(CAP), "{n} runs running with capacity {CAP}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok(())
        })
    };
    // A completer frees capacity one run at a time, each time the claimers filled it, until
    // every run finished.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut completed = 0;
    let mut saturated = 0;
    while completed < RUNS {
        ensure!(Instant::now() < deadline, "only {completed} runs completed");
        let running =
            tandem_store::list_runs_by_status(&pool, AutomationRunStatus::Running, 100).await?;
        let want = (RUNS - completed).min(CAP as usize);
        if running.len() < want {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        ensure!(running.len() <= CAP as usize, "{} running", running.len());
        if running.len() == CAP as usize {
            saturated += 1;
        }
        let Some(run) = running.first() else {
            bail!("nothing running");
        };
        tandem_store::transition_run(
            &pool,
            &run.run_id,
            Fence::Unfenced,
            &settings(),
            |run, env| {
                update(run, env.now_ms, |run, _| {
                    run.status = AutomationRunStatus::Completed
                })
            },
        )
        .await?;
        completed += 1;
    }
    done.store(true, Ordering::Relaxed);
    sampler.await??;
    let mut all = Vec::new();
    for c in claimers {
        all.extend(c.await??);
    }
    assert_eq!(all.len(), RUNS, "every run claimed once: {all:?}");
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        RUNS,
        "no run claimed twice"
    );
    assert!(max_seen.load(Ordering::Relaxed) <= i64::from(CAP));
    assert!(
        saturated >= RUNS - CAP as usize,
        "the claimers filled the capacity each time"
    );
    assert_eq!(count_status(&pool, "completed").await?, RUNS as i64);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn workspace_lock_claims_one_run_per_root_and_records_the_reason() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create_on_root(&pool, "a", Some("/srv/shared"), now).await?;
    create_on_root(&pool, "b", Some(" /srv/shared "), now + 1).await?;
    create_on_root(&pool, "c", Some("/srv/other"), now + 2).await?;

    let report = claim_plain(&pool, 8, 64).await?;
    assert_eq!(claimed_ids(&report), vec!["a", "c"]);
    let b = report
        .items
        .iter()
        .find(|i| i.run_id == "b")
        .context("b examined")?;
    match &b.result {
        Ok(ClaimItemOutcome::Waiting {
            reason: QueueReason::WorkspaceLock,
            resource_key: Some(key),
            recorded: true,
        }) => assert_eq!(key, "/srv/shared"),
        other => bail!("b: {other:?}"),
    }
    let stored = tandem_store::get_run(&pool, "b").await?;
    assert_eq!(stored.status, AutomationRunStatus::Queued);
    let meta = stored.scheduler.context("scheduler metadata")?;
    assert_eq!(meta.queue_reason, Some(QueueReason::WorkspaceLock));
    assert_eq!(meta.resource_key.as_deref(), Some("/srv/shared"));

    // Still waiting for the same reason: nothing is written again.
    let before = row_xmin(&pool, "b").await?;
    let report = claim_plain(&pool, 8, 64).await?;
    assert!(claimed_ids(&report).is_empty());
    assert!(matches!(
        report.items[0].result,
        Ok(ClaimItemOutcome::Waiting {
            recorded: false,
            ..
        })
    ));
    assert_eq!(row_xmin(&pool, "b").await?, before, "no write storm");

    // `pausing` keeps the lock; a terminal status releases it and b is claimed.
    for (status, expect_claim) in [
        (AutomationRunStatus::Pausing, false),
        (AutomationRunStatus::Completed, true),
    ] {
        tandem_store::transition_run(&pool, "a", Fence::Unfenced, &settings(), |run, env| {
            update(run, env.now_ms, |run, _| run.status = status)
        })
        .await?;
        let report = claim_plain(&pool, 8, 64).await?;
        assert_eq!(
            !claimed_ids(&report).is_empty(),
            expect_claim,
            "{status:?}: {report:?}"
        );
    }
    let b = tandem_store::get_run(&pool, "b").await?;
    assert_eq!(b.status, AutomationRunStatus::Running);
    assert_eq!(b.scheduler, None, "the queue reason leaves with the queue");
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn a_failing_set_write_falls_back_to_run_by_run_and_leaves_only_the_bad_run()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    for (i, id) in ["a", "poison", "c"].iter().enumerate() {
        create_on_root(&pool, id, None, now + i as u64).await?;
    }
    // A constraint the set-based write cannot satisfy for one run: the whole statement fails,
    // so the claim must redo the batch with a savepoint per run.
    let c = pool.get().await?;
    c.batch_execute(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.run_id = 'poison' AND NEW.status = 'running' THEN
             RAISE EXCEPTION 'poisoned row';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_poison BEFORE UPDATE ON runs
           FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .await?;
    let report = claim_dispatching(&pool, 8).await?;
    assert_eq!(claimed_ids(&report), vec!["a", "c"]);
    let poison = report
        .items
        .iter()
        .find(|i| i.run_id == "poison")
        .context("poison examined")?;
    assert!(
        matches!(&poison.result, Err(e) if e.to_string().contains("poisoned row")),
        "{poison:?}"
    );
    assert_eq!(count_status(&pool, "running").await?, 2);
    assert_eq!(
        tandem_store::get_run(&pool, "poison").await?.status,
        AutomationRunStatus::Queued
    );
    for id in ["a", "c"] {
        assert_eq!(epoch_of(&pool, id).await?, 1, "{id} claimed once");
    }
    let tasks: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox WHERE subject_kind = 'task'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        tasks, 2,
        "one task per claimed run, none for the rolled-back one"
    );
    drop(c);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn capacity_queue_reason_is_recorded_once_and_wins_after_the_lock() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create_on_root(&pool, "r1", Some("/w1"), now).await?;
    create_on_root(&pool, "r2", Some("/w1"), now + 1).await?;
    create_on_root(&pool, "r3", Some("/w2"), now + 2).await?;
    create_on_root(&pool, "r4", None, now + 3).await?;

    let report = claim_plain(&pool, 1, 64).await?;
    assert_eq!(claimed_ids(&report), vec!["r1"]);
    let reasons: BTreeMap<String, (QueueReason, Option<String>, bool)> = report
        .items
        .iter()
        .filter_map(|i| match &i.result {
            Ok(ClaimItemOutcome::Waiting {
                reason,
                resource_key,
                recorded,
            }) => Some((i.run_id.clone(), (*reason, resource_key.clone(), *recorded))),
            _ => None,
        })
        .collect();
    // Upstream's order: the workspace lock is checked before capacity.
    assert_eq!(
        reasons,
        BTreeMap::from([
            (
                "r2".into(),
                (QueueReason::WorkspaceLock, Some("/w1".into()), true)
            ),
            ("r3".into(), (QueueReason::Capacity, None, true)),
            ("r4".into(), (QueueReason::Capacity, None, true)),
        ])
    );
    for id in ["r3", "r4"] {
        let run = tandem_store::get_run(&pool, id).await?;
        let meta = run.scheduler.context("meta")?;
        assert_eq!(meta.queue_reason, Some(QueueReason::Capacity));
        assert_eq!(meta.resource_key, None);
        assert_eq!(meta.tenant_context, run.tenant_context);
    }
    let versions = (row_xmin(&pool, "r3").await?, row_xmin(&pool, "r4").await?);
    for _ in 0..3 {
        let report = claim_plain(&pool, 1, 64).await?;
        assert!(claimed_ids(&report).is_empty());
        assert!(report.items.iter().all(|i| matches!(
            i.result,
            Ok(ClaimItemOutcome::Waiting {
                recorded: false,
                ..
            })
        )));
    }
    assert_eq!(
        (row_xmin(&pool, "r3").await?, row_xmin(&pool, "r4").await?),
        versions,
        "waiting runs are not rewritten"
    );
    // r1 ends: the oldest waiting run (r2, no longer locked out) takes the slot.
    tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, env| {
        update(run, env.now_ms, |run, _| {
            run.status = AutomationRunStatus::Failed
        })
    })
    .await?;
    let report = claim_plain(&pool, 1, 64).await?;
    assert_eq!(
        claimed_ids(&report),
        vec!["r2"],
        "r2 was the oldest waiting run"
    );
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn lease_epoch_strictly_increases_across_reclaims_and_fences_old_results()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let spec = chain_spec("auto-epoch", 2);
    tandem_store::upsert_automation(&pool, &spec).await?;
    let now = db_now(&pool).await?;
    let run = queued("r1", &spec, now);
    tandem_store::create_run(&pool, &run, &Effects::default(), &settings()).await?;

    let mut epochs = vec![epoch_of(&pool, "r1").await?];
    let report = claim_dispatching(&pool, 8).await?;
    let Some(Ok(ClaimItemOutcome::Claimed { claim, dispatch })) =
        report.items.first().map(|i| &i.result)
    else {
        bail!("not claimed: {report:?}");
    };
    assert_eq!(claim.lease_epoch, LeaseEpoch(1));
    assert_eq!(dispatch.lease_epoch, LeaseEpoch(1));
    let task = dispatch
        .effects
        .tasks
        .first()
        .context("n1 dispatched")?
        .clone();
    assert_eq!(
        (task.node_id.as_str(), task.attempt, task.lease_epoch),
        ("n1", 1, 1)
    );
    // The task is in the outbox, as a task row.
    let rows = tandem_store::outbox_rows(&pool, &dispatch.outbox_ids).await?;
    let row = rows
        .iter()
        .find(|r| r.dedupe_id == task.task_id())
        .context("task row")?;
    assert_eq!(
        row.kind,
        OutboxKind::Task {
            queue: "default".into()
        }
    );
    assert_eq!(row.task().as_ref(), Some(&task));
    epochs.push(epoch_of(&pool, "r1").await?);

    // Pause while n1 is in flight (pausing keeps the claim), then n1's result settles it.
    let t = tandem_store::transition_run(
        &pool,
        "r1",
        Fence::Epoch(LeaseEpoch(1)),
        &settings(),
        |run, env| request_pause(run, env.lease_epoch.0, Some("operator"), env.now_ms),
    )
    .await?;
    assert_eq!(t.run.status, AutomationRunStatus::Pausing);
    let result = TaskResult::for_task(
        &task,
        TaskStatus::Completed,
        json!({"summary": "ok"}),
        TaskUsage::default(),
    );
    let apply = |result: TaskResult| {
        let pool = pool.clone();
        async move {
            tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, env| {
                let a = run
                    .automation_snapshot
                    .clone()
                    .unwrap_or_else(|| chain_spec("x", 1).into());
                apply_task_result(run, &a, &result, env.lease_epoch.0, &GATES, env.now_ms)
            })
            .await
        }
    };
    let applied = apply(result.clone()).await?;
    assert_eq!(applied.run.status, AutomationRunStatus::Paused);
    epochs.push(applied.lease_epoch.0);

    tandem_store::transition_run(&pool, "r1", Fence::Unfenced, &settings(), |run, env| {
        resume_run(run, None, env.now_ms)
    })
    .await?;
    epochs.push(epoch_of(&pool, "r1").await?);
    let report = claim_dispatching(&pool, 8).await?;
    assert_eq!(claimed_ids(&report), vec!["r1"]);
    epochs.push(epoch_of(&pool, "r1").await?);

    // 0 (created) → 1 (claimed) → 2 (paused) → 2 (queued) → 3 (claimed again).
    assert_eq!(epochs, vec![0, 1, 2, 2, 3]);
    // A result of the first claim (even a re-delivery of an applied one) is fenced out.
    let stale = apply(result).await?;
    assert!(!stale.changed, "{:?}", stale.outcome);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn case_10_runtime_context_failure_is_decided_inside_the_claim() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let mut needs = chain_spec("auto-ctx", 1);
    needs.metadata = Some(json!({"context_materialization": {"partition": "p1"}}));
    needs.workspace_root = Some("/srv/ctx".into());
    tandem_store::upsert_automation(&pool, &needs).await?;
    let now = db_now(&pool).await?;
    // Missing context (fails), stored context (claims), and a second run on the same root that
    // is admitted because the failure took neither capacity nor the lock.
    let missing = queued("r-missing", &needs, now);
    let mut stored = queued("r-stored", &needs, now + 1);
    stored.runtime_context = Some(json!({"partition": "p1"}));
    for r in [&missing, &stored] {
        tandem_store::create_run(&pool, r, &Effects::default(), &settings()).await?;
    }

    let report = claim_plain(&pool, 1, 64).await?;
    match &report.items[0].result {
        Ok(ClaimItemOutcome::Settled(a)) => {
            assert_eq!(a.outcome, ClaimOutcome::RuntimeContextMissing)
        }
        other => bail!("r-missing: {other:?}"),
    }
    assert_eq!(
        claimed_ids(&report),
        vec!["r-stored"],
        "capacity 1 went to the next run"
    );
    let s = tandem_store::get_stored_run(&pool, "r-missing").await?;
    assert_eq!(s.run.status, AutomationRunStatus::Failed);
    assert_eq!(
        s.run.detail.as_deref(),
        Some(RUNTIME_CONTEXT_MISSING_DETAIL)
    );
    let lf = s.run.checkpoint.last_failure.context("last_failure")?;
    assert_eq!(lf.node_id, "runtime_context");
    assert_eq!(s.run.stop_kind, None);
    assert_eq!(s.lease_epoch, LeaseEpoch(0), "never claimed");
    assert!(s.run.finished_at_ms.is_some());
    let c = pool.get().await?;
    let audits: i64 = c
        .query_one(
            "SELECT count(*) FROM audit_log
              WHERE event_type = 'automation_v2.internal_sweep.runtime_context_missing_failed_run'
                AND payload->>'run_id' = 'r-missing'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(audits, 1, "audited in the claim transaction");
    drop(c);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn cases_35_36_launch_hold_in_the_claim_and_launch_after_override() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let mut held_spec = chain_spec("auto-held", 1);
    held_spec.agents = vec![AutomationAgentProfile {
        agent_id: "agent-spend".into(),
        extra: Default::default(),
    }];
    let free_spec = chain_spec("auto-free", 1);
    tandem_store::upsert_automation(&pool, &held_spec).await?;
    tandem_store::upsert_automation(&pool, &free_spec).await?;
    let tenant = held_spec.tenant_context();
    tandem_store::pause_agent_spend(&pool, &agent_scope_key(&tenant, "agent-spend"), Some("cap"))
        .await?;
    let now = db_now(&pool).await?;
    create_queued(&pool, "held", &held_spec, now).await?;
    create_queued(&pool, "free", &free_spec, now + 1).await?;

    let report = claim_plain(&pool, 8, 64).await?;
    match &report.items[0].result {
        Ok(ClaimItemOutcome::Settled(a)) => assert_eq!(
            a.outcome,
            ClaimOutcome::LaunchHeld {
                agent_ids: vec!["agent-spend".into()]
            }
        ),
        other => bail!("held: {other:?}"),
    }
    // Case 36: without governance state the run launches normally.
    assert_eq!(claimed_ids(&report), vec!["free"]);
    let held = tandem_store::get_stored_run(&pool, "held").await?;
    assert_eq!(held.run.status, AutomationRunStatus::Paused);
    assert_eq!(
        held.run.stop_kind,
        Some(AutomationStopKind::GuardrailStopped)
    );
    assert_eq!(held.run.pause_reason.as_deref(), Some(LAUNCH_HELD_DETAIL));
    assert_eq!(held.lease_epoch, LeaseEpoch(0));
    let last = held
        .run
        .checkpoint
        .lifecycle_history
        .last()
        .context("record")?;
    assert_eq!(last.event, "run_launch_held");
    assert_eq!(
        last.metadata.as_ref().and_then(|m| m.get("reason")),
        Some(&json!("agent_spend_paused"))
    );

    // Case 35: an approved override lets the next claim launch it.
    tandem_store::insert_quota_override(
        &pool,
        &tandem_store::NewQuotaOverride {
            agent_key: agent_scope_key(&tenant, "agent-spend"),
            status: tandem_store::QuotaOverrideStatus::Approved,
            expires_at_ms: now + 3_600_000,
            approved_by: Some("finance".into()),
            reason: None,
        },
    )
    .await?;
    tandem_store::transition_run(&pool, "held", Fence::Unfenced, &settings(), |run, env| {
        update(run, env.now_ms, |run, _| {
            run.status = AutomationRunStatus::Queued;
            run.stop_kind = None;
        })
    })
    .await?;
    let report = claim_plain(&pool, 8, 64).await?;
    assert_eq!(claimed_ids(&report), vec!["held"]);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn claim_probe_and_candidates_use_the_partial_indexes() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let c = pool.get().await?;
    c.batch_execute(
        "INSERT INTO runs (run_id, automation_id, org_id, workspace_id, status, created_at_ms,
                           updated_at_ms, activity_at_ms, doc)
         SELECT 'r' || g, 'a', 'o', 'w',
                CASE WHEN g % 100 = 0 THEN 'queued' ELSE 'completed' END, g, g, g, '{}'::jsonb
           FROM generate_series(1, 20000) g;
         ANALYZE runs;
         SET plan_cache_mode = force_generic_plan;",
    )
    .await?;
    c.batch_execute(&format!(
        "PREPARE cand AS {}",
        tandem_store::CLAIM_CANDIDATES_SQL
    ))
    .await?;
    let mut plan = String::new();
    for m in c.simple_query("EXPLAIN EXECUTE cand(64)").await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            plan.push_str(r.get(0).unwrap_or_default());
            plan.push('\n');
        }
    }
    ensure!(plan.contains("runs_queued_idx"), "{plan}");
    ensure!(!plan.contains("Seq Scan"), "{plan}");
    drop(c);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn writer_relay_claim_reads_only_its_runs_rows_even_with_a_generic_plan() -> anyhow::Result<()>
{
    let (db, pool) = TestDb::migrated().await?;
    let c = pool.get().await?;
    // A backlog of unpublished rows of other runs, as under a steady load.
    c.batch_execute(
        "INSERT INTO outbox (event_id, run_id, event_type, org_id, workspace_id, dedupe_id,
                             payload)
         SELECT gen_random_uuid(), 'r' || (g % 2000), 'automation.run.started', 'o', 'w',
                'd' || g, '{}'::jsonb
           FROM generate_series(1, 20000) g;
         ANALYZE outbox;
         SET plan_cache_mode = force_generic_plan;",
    )
    .await?;
    c.batch_execute(&format!(
        "PREPARE mine(bigint, float8, text[]) AS {}",
        tandem_store::claim_outbox_for_runs_sql()
    ))
    .await?;
    let mut plan = String::new();
    for m in c
        .simple_query("EXPLAIN EXECUTE mine(3, 30, '{r1,r2,r3}')")
        .await?
    {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            plan.push_str(r.get(0).unwrap_or_default());
            plan.push('\n');
        }
    }
    ensure!(plan.contains("outbox_run_unpublished_idx"), "{plan}");
    ensure!(
        !plan.contains("outbox_unpublished_idx") && !plan.contains("Seq Scan"),
        "the claim of three runs' rows walks other rows:\n{plan}"
    );
    drop(c);
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// outbox relay

/// Commits `events` events and `tasks` tasks on each of `runs` runs (one transition per run),
/// tagging each with its index in the run so order can be checked on the wire.
async fn write_outbox(pool: &Pool, runs: usize, events: usize, tasks: usize) -> anyhow::Result<()> {
    let now = db_now(pool).await?;
    let spec = chain_spec("auto-relay", 1);
    for r in 0..runs {
        let run_id = format!("relay-{r:03}");
        tandem_store::create_run(
            pool,
            &queued(&run_id, &spec, now),
            &Effects::default(),
            &settings(),
        )
        .await?;
        tandem_store::transition_run(pool, &run_id, Fence::Unfenced, &settings(), |run, env| {
            update(run, env.now_ms, |run, fx| {
                for i in 0..events {
                    fx.event(run, "automation_v2.run.note", None, json!({"i": i}), None);
                }
                for i in 0..tasks {
                    fx.tasks.push(TaskMessage {
                        run_id: run.run_id.clone(),
                        node_id: format!("n{i}"),
                        attempt: 1,
                        lease_epoch: 1,
                        automation_id: run.automation_id.clone(),
                        tenant_context: run.tenant_context.clone(),
                        queue: "default".into(),
                        agent_id: String::new(),
                        objective: String::new(),
                        metadata: Some(json!({"i": i})),
                        upstream_outputs: Default::default(),
                        repair_context: None,
                        deadline_at_ms: None,
                        dispatched_at_ms: env.now_ms,
                    });
                }
            })
        })
        .await?;
    }
    Ok(())
}

async fn unpublished(pool: &Pool) -> anyhow::Result<i64> {
    let c = pool.get().await?;
    Ok(c.query_one(
        "SELECT count(*) FROM outbox WHERE published_at IS NULL",
        &[],
    )
    .await?
    .get(0))
}

fn relay(pool: &Pool, js: &jetstream::Context, prefix: &Prefix, lease: Duration) -> Relay {
    Relay::new(
        pool.clone(),
        js.clone(),
        prefix.clone(),
        RelaySettings {
            lease,
            poll: Duration::from_millis(100),
            max_runs_per_claim: 7,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_publishes_each_row_once_in_run_order_across_replicas() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    write_outbox(&pool, 20, 4, 2).await?;
    assert_eq!(unpublished(&pool).await?, 20 * 6);

    // Three relays drain concurrently, plus writer-path relays of a few runs.
    let mut tasks = Vec::new();
    for i in 0..3 {
        let r = relay(&db.pool()?, &bus.js, &bus.prefix, Duration::from_secs(30));
        tasks.push(tokio::spawn(async move {
            let mut total = tandem_runtime::RelayReport::default();
            if i == 0 {
                let runs: Vec<String> = (0..20)
                    .step_by(3)
                    .map(|r| format!("relay-{r:03}"))
                    .collect();
                let w = r.relay_runs(&runs).await?;
                total.published += w.published;
                total.duplicates += w.duplicates;
            }
            loop {
                let rep = r.drain_once().await?;
                if rep.claimed == 0 {
                    return anyhow::Ok(total);
                }
                total.published += rep.published;
                total.duplicates += rep.duplicates;
                total.failed += rep.failed;
            }
        }));
    }
    let mut published = 0;
    for t in tasks {
        let rep = t.await??;
        ensure!(rep.duplicates == 0 && rep.failed == 0, "{rep:?}");
        published += rep.published;
    }
    assert_eq!(published, 120, "every row published by exactly one relay");
    assert_eq!(unpublished(&pool).await?, 0);
    let names = bus.names();
    assert_eq!(bus.messages(&names.events).await?, 80);
    assert_eq!(bus.messages(&names.tasks).await?, 40);

    // Per run, events reached the stream in commit order.
    let events = read_stream(&bus, &names.events).await?;
    let mut order: HashMap<String, Vec<u64>> = HashMap::new();
    for (subject, payload) in &events {
        ensure!(subject.ends_with(".automation_v2.run.note"), "{subject}");
        let run = payload["envelope"]["run_id"]
            .as_str()
            .context("run_id")?
            .to_owned();
        order
            .entry(run)
            .or_default()
            .push(payload["properties"]["i"].as_u64().context("i")?);
    }
    assert_eq!(order.len(), 20);
    for (run, seq) in &order {
        assert_eq!(seq, &vec![0, 1, 2, 3], "{run}");
    }
    let tasks = read_stream(&bus, &names.tasks).await?;
    for (subject, payload) in &tasks {
        ensure!(
            subject == &tandem_bus::task_subject(&bus.prefix, "default"),
            "{subject}"
        );
        serde_json::from_value::<TaskMessage>(payload.clone())?;
    }
    // Nothing left: another pass publishes nothing.
    let r = relay(&pool, &bus.js, &bus.prefix, Duration::from_secs(30));
    assert_eq!(r.drain_once().await?.claimed, 0);
    bus.cleanup().await?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn a_claim_leases_its_rows_to_the_claimer_unless_an_older_row_is_unpublished()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let now = db_now(&pool).await?;
    for i in 0..3 {
        create_on_root(&pool, &format!("r{i}"), None, now + i).await?;
    }
    // r1 has an older row nobody has published yet: its new row must wait behind it.
    pool.get()
        .await?
        .execute(
            "INSERT INTO outbox (event_id, run_id, event_type, org_id, workspace_id, dedupe_id,
                                 payload)
             VALUES (gen_random_uuid(), 'r1', 'automation_v2.run.note', 'local', 'local',
                     'older-r1', '{\"type\": \"automation_v2.run.note\"}')",
            &[],
        )
        .await?;

    let mut report = claim_dispatching_leased(&pool, 10, Some(Duration::from_secs(30))).await?;
    assert_eq!(claimed_ids(&report), ["r0", "r1", "r2"]);
    let leased_runs: Vec<&str> = report
        .leased_outbox
        .iter()
        .map(|r| r.run_id.as_str())
        .collect();
    assert_eq!(leased_runs, ["r0", "r2"], "one task row each, in id order");
    assert_eq!(
        report.runs_with_outbox(),
        ["r1"],
        "only r1 needs a relay claim"
    );
    let c = pool.get().await?;
    let leases: Vec<(String, bool)> = c
        .query(
            "SELECT run_id, relay_lease_until > now() FROM outbox
              WHERE subject_kind = 'task' ORDER BY run_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<bool>>(1).unwrap_or(false)))
        .collect();
    assert_eq!(
        leases,
        [
            ("r0".into(), true),
            ("r1".into(), false),
            ("r2".into(), true)
        ]
    );
    // The rows in hand are the committed rows (same payload JSON, as the relay would read).
    for row in &report.leased_outbox {
        let stored = tandem_store::outbox_rows(&pool, &[row.id]).await?;
        let stored = stored.first().context("stored row")?;
        assert_eq!(
            serde_json::from_str::<Value>(&row.payload)?,
            serde_json::from_str::<Value>(&stored.payload)?
        );
        assert_eq!(
            (&row.kind, &row.dedupe_id),
            (&stored.kind, &stored.dedupe_id)
        );
        assert!(row.task().is_some(), "a task row");
    }

    // Another relay takes only r1's rows (older first); the leased ones are not for the taking.
    let other = relay(&pool, &bus.js, &bus.prefix, Duration::from_secs(30));
    let background = other.drain_once().await?;
    assert_eq!(
        (background.claimed, background.runs),
        (2, 1),
        "{background:?}"
    );
    assert_eq!(other.drain_once().await?.claimed, 0);
    // The claimer publishes its rows from memory and marks them.
    let mine = relay(&pool, &bus.js, &bus.prefix, Duration::from_secs(30));
    let published = mine
        .relay_leased(std::mem::take(&mut report.leased_outbox))
        .await?;
    assert_eq!(
        (published.published, published.marked),
        (2, 2),
        "{published:?}"
    );
    assert_eq!(unpublished(&pool).await?, 0);
    let names = bus.names();
    let tasks = read_stream(&bus, &names.tasks).await?;
    let mut runs: Vec<String> = tasks
        .iter()
        .map(|(_, p)| serde_json::from_value::<TaskMessage>(p.clone()).map(|t| t.run_id))
        .collect::<Result<_, _>>()?;
    runs.sort();
    assert_eq!(runs, ["r0", "r1", "r2"], "every task published once");
    drop(c);
    bus.cleanup().await?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn relay_crash_between_puback_and_mark_republishes_as_a_duplicate() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    write_outbox(&pool, 2, 2, 1).await?;
    let lease = Duration::from_millis(800);
    let crashed = relay(&pool, &bus.js, &bus.prefix, lease);
    let rows = tandem_store::claim_outbox(&pool, 10, lease).await?;
    assert_eq!(rows.len(), 6);
    // Published and acknowledged, then the relay "dies" before marking.
    let out = crashed.publish_rows(&rows).await;
    assert_eq!(
        (out.acked.len(), out.duplicates, out.failed.len()),
        (6, 0, 0)
    );
    drop(crashed);
    let names = bus.names();
    assert_eq!(bus.messages(&names.events).await?, 4);
    assert_eq!(bus.messages(&names.tasks).await?, 2);
    assert_eq!(unpublished(&pool).await?, 6);

    // While the lease holds, nobody else takes the rows.
    let other = relay(&pool, &bus.js, &bus.prefix, Duration::from_secs(30));
    assert_eq!(
        other.drain_once().await?.claimed,
        0,
        "leased rows are skipped"
    );
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    let rep = other.drain_once().await?;
    assert_eq!(
        (rep.claimed, rep.published, rep.duplicates, rep.marked),
        (6, 0, 6, 6),
        "{rep:?}"
    );
    assert_eq!(bus.messages(&names.events).await?, 4, "stored once");
    assert_eq!(bus.messages(&names.tasks).await?, 2, "stored once");
    assert_eq!(unpublished(&pool).await?, 0);
    bus.cleanup().await?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn relay_rows_wait_while_nats_is_unreachable_and_drain_afterwards() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    write_outbox(&pool, 3, 2, 1).await?;

    // A client pointed at a closed port: it keeps trying in the background; every publish
    // times out.
    let closed = free_port()?;
    let down = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(format!("nats://127.0.0.1:{closed}"))
        .await?;
    let down_js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(300))
        .build(down);
    let r = relay(&pool, &down_js, &bus.prefix, Duration::from_secs(30));
    let runs: Vec<String> = (0..3).map(|i| format!("relay-{i:03}")).collect();
    let rep = r.relay_runs(&runs).await?;
    assert_eq!((rep.published, rep.marked), (0, 0), "{rep:?}");
    assert!(rep.failed > 0, "{rep:?}");
    let rep = r.drain_once().await?;
    assert_eq!(
        (rep.claimed, rep.failed, rep.marked),
        (9, 9, 0),
        "released rows are retried: {rep:?}"
    );
    assert_eq!(unpublished(&pool).await?, 9, "rows wait");
    let c = pool.get().await?;
    let leased: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox WHERE relay_lease_until IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(leased, 0, "failed rows are released at once");
    drop(c);

    // NATS is back (a relay with a working connection): everything drains, once.
    let up = relay(&pool, &bus.js, &bus.prefix, Duration::from_secs(30));
    let rep = up.drain_once().await?;
    assert_eq!(
        (rep.published, rep.duplicates, rep.marked),
        (9, 0, 9),
        "{rep:?}"
    );
    assert_eq!(unpublished(&pool).await?, 0);
    let names = bus.names();
    assert_eq!(bus.messages(&names.events).await?, 6);
    assert_eq!(bus.messages(&names.tasks).await?, 3);
    bus.cleanup().await?;
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// results

/// A claimed run of a `nodes`-node chain with its first task dispatched; returns that task.
async fn claimed_run(
    pool: &Pool,
    sched: &Scheduler,
    run_id: &str,
    nodes: usize,
) -> anyhow::Result<TaskMessage> {
    let spec = chain_spec(&format!("auto-{run_id}"), nodes);
    tandem_store::upsert_automation(pool, &spec).await?;
    let now = db_now(pool).await?;
    tandem_store::create_run(
        pool,
        &queued(run_id, &spec, now),
        &Effects::default(),
        &settings(),
    )
    .await?;
    let s = sched.claim_once().await?;
    ensure!(s.claimed == 1 && s.tasks_dispatched == 1, "{s:?}");
    let c = pool.get().await?;
    let payload: Value = c
        .query_one(
            "SELECT payload FROM outbox WHERE run_id = $1 AND subject_kind = 'task'
              ORDER BY id DESC LIMIT 1",
            &[&run_id],
        )
        .await?
        .get(0);
    Ok(serde_json::from_value(payload)?)
}

#[tokio::test]
async fn stale_results_are_dropped_and_counted() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let sched = bus.scheduler(&pool, 8);
    let task = claimed_run(&pool, &sched, "r1", 2).await?;
    assert_eq!(task.lease_epoch, 1);
    // Relayed by the writer right after the claim committed (beside the next claim pass).
    eventually("the task relayed", Duration::from_secs(5), || async {
        Ok(unpublished(&pool).await? == 0)
    })
    .await?;
    assert_eq!(bus.messages(&bus.names().tasks).await?, 1);

    let ok = TaskResult::for_task(
        &task,
        TaskStatus::Completed,
        json!({"summary": "done"}),
        TaskUsage::default(),
    );
    let mut old_epoch = ok.clone();
    old_epoch.lease_epoch = 0;
    let mut old_attempt = ok.clone();
    old_attempt.attempt = 0;
    let mut unknown = ok.clone();
    unknown.run_id = "nope".into();
    for (r, reason) in [
        (&old_epoch, "stale_epoch"),
        (&old_attempt, "stale_attempt"),
        (&unknown, "unknown_run"),
    ] {
        let before = row_xmin(&pool, "r1").await?;
        assert_eq!(
            sched.apply_result(r).await?,
            ResultApplied::Dropped {
                reason: reason.into()
            }
        );
        assert_eq!(
            row_xmin(&pool, "r1").await?,
            before,
            "{reason}: nothing written"
        );
    }
    match sched.apply_result(&ok).await? {
        ResultApplied::Applied {
            status,
            tasks_dispatched,
        } => {
            assert_eq!(
                (status, tasks_dispatched),
                (AutomationRunStatus::Running, 1)
            )
        }
        other => bail!("{other:?}"),
    }
    // A redelivery of the applied result is dropped too.
    assert_eq!(
        sched.apply_result(&ok).await?,
        ResultApplied::Dropped {
            reason: "not_in_flight".into()
        }
    );
    let stats = sched.stats();
    assert_eq!(
        (stats.results_applied, stats.results_dropped),
        (1, 4),
        "{stats:?}"
    );
    let run = tandem_store::get_run(&pool, "r1").await?;
    assert_eq!(run.checkpoint.completed_nodes, vec!["n1"]);
    assert_eq!(run.checkpoint.attempts("n2"), 1, "n2 dispatched after n1");
    assert_eq!(bus.messages(&bus.names().tasks).await?, 2);
    bus.cleanup().await?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poisoned_result_is_dead_lettered_and_the_consumer_keeps_applying() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let sched = bus.scheduler(&pool, 8);
    let task = claimed_run(&pool, &sched, "r1", 1).await?;
    let consumer = sched.results_consumer().await?;
    let (trigger, shutdown) = Shutdown::manual();
    let loop_task = {
        let sched = sched.clone();
        tokio::spawn(async move { sched.run_results(consumer, shutdown).await })
    };
    let subject = tandem_bus::result_subject(&bus.prefix, "r1");
    // Not JSON; JSON of the wrong shape; a result for another run on r1's subject; then the
    // real result.
    for (i, body) in [
        b"\x00not json at all".to_vec(),
        br#"{"run_id": "r1", "status": "done"}"#.to_vec(),
        serde_json::to_vec(&json!({"run_id": "r2", "node_id": "n1", "attempt": 1,
            "lease_epoch": 1, "status": "completed"}))?,
    ]
    .into_iter()
    .enumerate()
    {
        tandem_bus::publish(
            &bus.js,
            OutgoingMessage::new(subject.clone(), format!("poison-{i}"), Bytes::from(body)),
        )
        .await?;
    }
    let ok = TaskResult::for_task(
        &task,
        TaskStatus::Completed,
        json!({"summary": "done"}),
        TaskUsage::default(),
    );
    tandem_bus::publish(
        &bus.js,
        OutgoingMessage::new(subject, ok.task_id(), Bytes::from(serde_json::to_vec(&ok)?)),
    )
    .await?;

    eventually("the run to complete", Duration::from_secs(20), || {
        let pool = pool.clone();
        async move {
            Ok(tandem_store::get_run(&pool, "r1").await?.status == AutomationRunStatus::Completed)
        }
    })
    .await?;
    let names = bus.names();
    eventually(
        "3 dead letters and an empty results stream",
        Duration::from_secs(10),
        || async {
            Ok(bus.messages(&names.deadletter).await? == 3
                && bus.messages(&names.results).await? == 0)
        },
    )
    .await?;
    let stats = sched.stats();
    assert_eq!(
        (stats.results_deadlettered, stats.results_applied),
        (3, 1),
        "{stats:?}"
    );
    // The dead letter keeps the payload and says why (results are applied concurrently, so the
    // dead letters may be in any order).
    let dl = bus.js.get_stream(&names.deadletter).await?;
    let mut first = None;
    for seq in 1..=3 {
        let m = dl.get_raw_message(seq).await?;
        if &m.payload[..] == b"\x00not json at all" {
            first = Some(m);
        }
    }
    let first = first.context("the non-JSON message was dead-lettered")?;
    assert!(
        first
            .headers
            .get("Tandem-Deadletter-Error")
            .is_some_and(|v| v.as_str().contains("malformed")),
        "{:?}",
        first.headers
    );
    assert_eq!(
        first.subject.as_str(),
        tandem_bus::deadletter_subject(&bus.prefix, "results")
    );

    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(10), loop_task).await??;
    bus.cleanup().await?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn tick_pauses_a_run_over_its_runtime_budget_and_sends_a_cancel_hint() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let sched = bus.scheduler(&pool, 8);
    let mut spec = chain_spec("auto-budget", 2);
    spec.execution = Some(tandem_core::AutomationExecutionPolicy {
        max_total_runtime_ms: Some(400),
        ..Default::default()
    });
    tandem_store::upsert_automation(&pool, &spec).await?;
    let now = db_now(&pool).await?;
    create_queued(&pool, "r1", &spec, now).await?;
    let mut cancels = bus
        .client
        .subscribe(tandem_bus::cancel_subject(&bus.prefix, "r1"))
        .await?;
    assert_eq!(sched.claim_once().await?.claimed, 1);

    // Within budget, with n1 in flight: nothing is due, nothing is written.
    let before = row_xmin(&pool, "r1").await?;
    assert_eq!(sched.tick_claimed().await?, 0);
    assert_eq!(row_xmin(&pool, "r1").await?, before);

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sched.tick_claimed().await?, 1);
    let s = tandem_store::get_stored_run(&pool, "r1").await?;
    assert_eq!(s.run.status, AutomationRunStatus::Paused);
    assert_eq!(s.run.stop_kind, Some(AutomationStopKind::GuardrailStopped));
    assert_eq!(s.lease_epoch, LeaseEpoch(2), "the claim ended");
    let hint = tokio::time::timeout(Duration::from_secs(5), cancels.next())
        .await?
        .context("cancel hint")?;
    let hint: tandem_core::protocol::TaskCancel = serde_json::from_slice(&hint.payload)?;
    assert_eq!((hint.run_id.as_str(), hint.lease_epoch), ("r1", Some(2)));
    assert_eq!(sched.tick_claimed().await?, 0, "nothing claimed any more");
    bus.cleanup().await?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn tick_reads_only_runs_it_could_change() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let sched = bus.scheduler(&pool, 8);
    let now = db_now(&pool).await?;
    create_on_root(&pool, "idle", None, now).await?;
    create_on_root(&pool, "busy", None, now + 1).await?;
    // Claimed without dispatching: both are running with nothing in flight.
    assert_eq!(
        claimed_ids(&claim_plain(&pool, 8, 10).await?),
        ["idle", "busy"]
    );

    // Fresh activity and no runtime limit: the tick does not read them.
    let before = row_xmin(&pool, "idle").await?;
    assert_eq!(sched.tick_claimed().await?, 0);
    assert_eq!(row_xmin(&pool, "idle").await?, before);

    // A run silent for longer than a tick period is re-evaluated, and its node dispatched.
    pool.get()
        .await?
        .execute(
            "UPDATE runs SET activity_at_ms = activity_at_ms - 60000 WHERE run_id = 'idle'",
            &[],
        )
        .await?;
    assert_eq!(sched.tick_claimed().await?, 1);
    assert_eq!(
        tandem_store::get_run(&pool, "idle")
            .await?
            .checkpoint
            .node_attempts
            .len(),
        1,
        "the idle run's node was dispatched"
    );
    assert!(
        tandem_store::get_run(&pool, "busy")
            .await?
            .checkpoint
            .node_attempts
            .is_empty(),
        "the run with recent activity was not read"
    );

    // Fresh activity but a runtime budget, on the run's snapshot or on the live definition:
    // read (and found from columns, never by parsing a claimed run's document).
    let budget = Some(tandem_core::AutomationExecutionPolicy {
        max_total_runtime_ms: Some(3_600_000),
        ..Default::default()
    });
    let mut snap = chain_spec("auto-snap-budget", 1);
    snap.execution = budget.clone();
    let mut live = chain_spec("auto-live-budget", 1);
    create_queued(&pool, "snap", &snap, now + 2).await?;
    create_queued(&pool, "live", &live, now + 3).await?;
    live.execution = budget;
    tandem_store::upsert_automation(&pool, &live).await?;
    assert_eq!(
        claimed_ids(&claim_plain(&pool, 8, 10).await?),
        ["snap", "live"]
    );
    let due = tandem_store::claimed_run_ids_to_tick(&pool, 30_000, 100).await?;
    assert_eq!(
        due,
        ["idle", "live", "snap"],
        "idle is still silent; busy is not due"
    );
    let c = pool.get().await?;
    let plan: Vec<String> = c
        .query(
            &format!(
                "EXPLAIN (VERBOSE) {}",
                tandem_store::claimed_run_ids_to_tick_sql()
                    .replace("$1", "60000")
                    .replace("$2", "100")
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(
        !plan.iter().any(|l| l.contains("r.doc")),
        "the tick query reads run documents: {plan:#?}"
    );
    drop(c);
    bus.cleanup().await?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_is_coalesced_to_one_fenced_write_per_run_per_flush() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let sched = bus.scheduler(&pool, 8);
    let task = claimed_run(&pool, &sched, "r1", 1).await?;
    let sub = bus
        .client
        .queue_subscribe(
            tandem_bus::progress_wildcard_subject(&bus.prefix),
            tandem_scheduler::PROGRESS_QUEUE_GROUP.to_owned(),
        )
        .await?;
    let (trigger, shutdown) = Shutdown::manual();
    let loop_task = {
        let sched = sched.clone();
        tokio::spawn(async move { sched.run_progress(sub, shutdown).await })
    };
    let before = tandem_store::get_stored_run(&pool, "r1")
        .await?
        .activity_at_ms;
    let subject = tandem_bus::progress_subject(&bus.prefix, "r1");
    let mut stale = tandem_core::protocol::TaskProgress::for_task(&task, None);
    stale.run_id = "r-gone".into();
    for i in 0..40 {
        let p = tandem_core::protocol::TaskProgress::for_task(&task, Some(format!("step {i}")));
        bus.client
            .publish(subject.clone(), Bytes::from(serde_json::to_vec(&p)?))
            .await?;
    }
    // A heartbeat for a run that does not exist, and garbage: ignored, counted.
    bus.client
        .publish(
            tandem_bus::progress_subject(&bus.prefix, "r-gone"),
            Bytes::from(serde_json::to_vec(&stale)?),
        )
        .await?;
    bus.client
        .publish(subject.clone(), Bytes::from_static(b"garbage"))
        .await?;
    bus.client.flush().await?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(5), loop_task).await??;
    let touched = sched.stats().progress_touched;
    assert!(
        (1..=2).contains(&touched),
        "40 heartbeats in well under a second gave {touched} writes"
    );
    let after = tandem_store::get_stored_run(&pool, "r1")
        .await?
        .activity_at_ms;
    assert!(after > before, "activity advanced: {before} → {after}");
    bus.cleanup().await?;
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// the binary, end to end

/// An in-test worker: takes tasks of the `default` queue, reports progress, publishes a
/// `completed` result (JetStream, `Nats-Msg-Id` = task id), then acks the task. Returns the
/// tasks it handled.
async fn fake_worker(
    js: jetstream::Context,
    client: async_nats::Client,
    prefix: Prefix,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<TaskMessage>> {
    let stream = js.get_stream(StreamNames::new(&prefix).tasks).await?;
    let name = tandem_bus::task_consumer_name("default");
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &name,
            jetstream::consumer::pull::Config {
                durable_name: Some(name.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                filter_subject: tandem_bus::task_subject(&prefix, "default"),
                ..Default::default()
            },
        )
        .await?;
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut batch = consumer
            .fetch()
            .max_messages(10)
            .expires(Duration::from_millis(300))
            .messages()
            .await?;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| anyhow::anyhow!(e))?;
            let task: TaskMessage = serde_json::from_slice(&m.payload)?;
            let progress =
                tandem_core::protocol::TaskProgress::for_task(&task, Some("working".into()));
            client
                .publish(
                    tandem_bus::progress_subject(&prefix, &task.run_id),
                    Bytes::from(serde_json::to_vec(&progress)?),
                )
                .await?;
            tokio::time::sleep(Duration::from_millis(150)).await;
            let output = json!({"summary": format!("{} done", task.node_id)});
            let result = TaskResult::for_task(
                &task,
                TaskStatus::Completed,
                output,
                TaskUsage {
                    prompt_tokens: 10,
                    completion_tokens: 5,
                    cost_usd: 0.01,
                },
            );
            tandem_bus::publish(
                &js,
                OutgoingMessage::new(
                    tandem_bus::result_subject(&prefix, &task.run_id),
                    result.task_id(),
                    Bytes::from(serde_json::to_vec(&result)?),
                ),
            )
            .await?;
            m.double_ack().await.map_err(|e| anyhow::anyhow!(e))?;
            seen.push(task);
        }
    }
    Ok(seen)
}

fn scheduler_env(db_url: &str, prefix: &Prefix, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("TANDEM_DATABASE_URL", db_url.to_owned()),
        ("TANDEM_NATS_URL", nats_url()),
        ("TANDEM_NATS_PREFIX", prefix.as_str().to_owned()),
        ("TANDEM_HEALTH_ADDR", format!("127.0.0.1:{port}")),
        ("TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS", "4".into()),
        ("TANDEM_SCHEDULER_POLL_MS", "300".into()),
        ("TANDEM_SCHEDULER_PROGRESS_FLUSH_MS", "100".into()),
        ("RUST_LOG", "info,tandem_scheduler=debug".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduler_binaries_run_three_node_flows_to_completed_and_survive_a_replica_exit()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let spec = chain_spec("auto-e2e", 3);
    tandem_store::upsert_automation(&pool, &spec).await?;
    let now = db_now(&pool).await?;
    let runs: Vec<String> = (0..3).map(|i| format!("e2e-{i}")).collect();
    for (i, id) in runs.iter().enumerate() {
        let mut spec = spec.clone();
        spec.workspace_root = Some(format!("/srv/e2e/{i}"));
        create_queued(&pool, id, &spec, now + i as u64).await?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn(fake_worker(
        bus.js.clone(),
        bus.client.clone(),
        bus.prefix.clone(),
        stop.clone(),
    ));
    let result = async {
        let ports = [free_port()?, free_port()?];
        let mut replicas = Vec::new();
        for port in ports {
            let mut p = Proc::start(
                "tandem-scheduler",
                &[],
                &scheduler_env(&db.url, &bus.prefix, port),
            )?;
            p.wait_for_status(port, "/readyz", 200).await?;
            replicas.push(p);
        }
        // A hint is enough to start at once (the poll would find the runs anyway).
        tandem_bus::wake(&bus.client, tandem_bus::wake_scheduler_subject(&bus.prefix)).await?;

        // One replica leaves as soon as the first node of any run completed; the runs go on.
        eventually("a first node to complete", Duration::from_secs(30), || {
            let pool = pool.clone();
            let runs = runs.clone();
            async move {
                for id in &runs {
                    if !tandem_store::get_run(&pool, id)
                        .await?
                        .checkpoint
                        .completed_nodes
                        .is_empty()
                    {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
        })
        .await?;
        let mut leaving = replicas.remove(0);
        leaving.sigterm()?;
        let status = leaving.wait(EXIT_TIMEOUT).await?;
        ensure!(
            status.success(),
            "exit {status}; stderr:\n{}",
            leaving.stderr()
        );

        eventually("every run to complete", Duration::from_secs(60), || {
            let pool = pool.clone();
            let runs = runs.clone();
            async move {
                for id in &runs {
                    let s = tandem_store::get_run(&pool, id).await?.status;
                    ensure!(
                        !s.is_terminal() || s == AutomationRunStatus::Completed,
                        "run {id} ended {s:?}"
                    );
                    if s != AutomationRunStatus::Completed {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        })
        .await?;
        for id in &runs {
            let run = tandem_store::get_stored_run(&pool, id).await?;
            assert_eq!(
                run.run.checkpoint.completed_nodes,
                vec!["n1", "n2", "n3"],
                "{id}"
            );
            assert_eq!(run.run.detail.as_deref(), Some("automation run completed"));
            assert_eq!(run.run.total_tokens, 45, "usage of three attempts");
            let events: Vec<&str> = run
                .run
                .checkpoint
                .lifecycle_history
                .iter()
                .map(|r| r.event.as_str())
                .collect();
            assert_eq!(
                events.iter().filter(|e| **e == "node_started").count(),
                3,
                "{events:?}"
            );
            assert_eq!(
                events.iter().filter(|e| **e == "node_completed").count(),
                3,
                "{events:?}"
            );
            assert_eq!(run.lease_epoch, LeaseEpoch(2), "one claim, then completion");
        }
        eventually("the outbox to drain", Duration::from_secs(10), || {
            let pool = pool.clone();
            async move { Ok(unpublished(&pool).await? == 0) }
        })
        .await?;
        // Completion events reached the events stream, once per run.
        let completed: Vec<_> = read_stream(&bus, &bus.names().events)
            .await?
            .into_iter()
            .filter(|(_, p)| p["type"] == "automation_v2.run.completed")
            .collect();
        assert_eq!(completed.len(), runs.len());

        let survivor = &mut replicas[0];
        let (code, metrics) = http_get(ports[1], "/metrics").await?;
        ensure!(code == 200, "/metrics answered {code}");
        for series in [
            "tandem_scheduler_claim_passes_total",
            "tandem_scheduler_results_applied_total",
            "tandem_relay_published_total",
        ] {
            ensure!(metrics.contains(series), "{series} missing:\n{metrics}");
        }
        survivor.sigterm()?;
        let status = survivor.wait(EXIT_TIMEOUT).await?;
        ensure!(
            status.success(),
            "exit {status}; stderr:\n{}",
            survivor.stderr()
        );
        anyhow::Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let handled = worker.await??;
    result?;
    // Every (run, node) was executed exactly once: no double dispatch across two replicas.
    let ids: HashSet<String> = handled.iter().map(TaskMessage::task_id).collect();
    assert_eq!(handled.len(), 9, "{ids:?}");
    assert_eq!(ids.len(), 9);
    delete_streams(bus.prefix.as_str()).await?;
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduler_and_real_worker_binaries_complete_a_flow_with_a_repair() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let node = |id: &str, deps: &[&str], handler: &str| {
        let mut n = AutomationFlowNode::task(id, deps);
        n.metadata = Some(json!({"worker": {"handler": handler}}));
        n
    };
    // n1 → {n2 (asks for one repair), n3} → n4 (echoes its upstream outputs).
    let spec = AutomationV2Spec::new(
        "auto-real-worker",
        vec![
            node("n1", &[], "noop"),
            node("n2", &["n1"], "needs_repair_once"),
            node("n3", &["n1"], "noop"),
            node("n4", &["n2", "n3"], "echo"),
        ],
    );
    tandem_store::upsert_automation(&pool, &spec).await?;
    let now = db_now(&pool).await?;
    create_queued(&pool, "rw-1", &spec, now).await?;

    let result = async {
        let sport = free_port()?;
        let mut scheduler = Proc::start(
            "tandem-scheduler",
            &[],
            &scheduler_env(&db.url, &bus.prefix, sport),
        )?;
        let wport = free_port()?;
        let mut worker_env = scheduler_env(&db.url, &bus.prefix, wport);
        worker_env.push(("TANDEM_WORKER_PROGRESS_INTERVAL_MS", "200".into()));
        let mut worker = Proc::start("tandem-worker", &[], &worker_env)?;
        scheduler.wait_for_status(sport, "/readyz", 200).await?;
        worker.wait_for_status(wport, "/readyz", 200).await?;

        eventually("the run to complete", Duration::from_secs(60), || {
            let pool = pool.clone();
            async move {
                let s = tandem_store::get_run(&pool, "rw-1").await?.status;
                ensure!(
                    !s.is_terminal() || s == AutomationRunStatus::Completed,
                    "run ended {s:?}"
                );
                Ok(s == AutomationRunStatus::Completed)
            }
        })
        .await?;
        let run = tandem_store::get_run(&pool, "rw-1").await?;
        let mut done = run.checkpoint.completed_nodes.clone();
        done.sort();
        assert_eq!(done, vec!["n1", "n2", "n3", "n4"]);
        assert_eq!(run.checkpoint.attempts("n2"), 2, "one repair");
        assert_eq!(run.checkpoint.attempts("n4"), 1);
        let n4 = run.checkpoint.node_outputs.get("n4").context("n4 output")?;
        ensure!(
            n4["upstream_outputs"]["n2"]["repaired"] == json!(true),
            "n4 saw the repaired output of n2: {n4}"
        );
        for p in [&mut scheduler, &mut worker] {
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
    delete_streams(bus.prefix.as_str()).await?;
    result?;
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// upstream restart cases (spec §6 cases 26–28), in the fleet's form: a scheduler (re)start never
// recovers, fails or re-locks anything; claims only ever take queued runs.

/// Sets a run's status directly through a transition (test setup).
async fn force_status(
    pool: &Pool,
    run_id: &str,
    status: AutomationRunStatus,
) -> anyhow::Result<()> {
    tandem_store::transition_run(pool, run_id, Fence::Unfenced, &settings(), |run, env| {
        update(run, env.now_ms, |r, _| r.status = status)
    })
    .await?;
    Ok(())
}

/// Whether `run_id` is still queued.
async fn is_queued(pool: &Pool, run_id: &str) -> anyhow::Result<bool> {
    Ok(tandem_store::get_run(pool, run_id).await?.status == AutomationRunStatus::Queued)
}

/// A scheduler replica running in this process on `pool` and `bus`, started only by wake-ups
/// (no poll or tick within a test), with `claim_concurrency` passes at most in flight; stop it
/// with the returned trigger and await the handle.
fn start_woken_scheduler(
    pool: &Pool,
    bus: &Bus,
    claim_concurrency: usize,
) -> (
    tandem_runtime::ShutdownTrigger,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let config = SchedulerConfig {
        poll_interval: Duration::from_secs(120),
        tick_interval: Duration::from_secs(600),
        claim_concurrency,
        ..SchedulerConfig::default()
    };
    let sched = Scheduler::new(
        pool.clone(),
        bus.client.clone(),
        bus.js.clone(),
        bus.prefix.clone(),
        config,
        LifecycleSettings {
            max_concurrent_runs: 10,
            gates: GATES,
            ..LifecycleSettings::default()
        },
    );
    let (trigger, shutdown) = Shutdown::manual();
    let running = tokio::spawn(async move { sched.run(shutdown).await });
    (trigger, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_freed_wakeups_only_wake_replicas_that_saw_runs_waiting() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    let (trigger, running) = start_woken_scheduler(&pool, &bus, 1);
    let subject = tandem_bus::wake_scheduler_subject(&bus.prefix);
    let plain_wake = || tandem_bus::wake(&bus.client, subject.clone());
    let capacity_wake = || {
        tandem_bus::wake_with(
            &bus.client,
            subject.clone(),
            tandem_bus::WAKE_CAPACITY_FREED,
        )
    };
    let result = async {
        let now = db_now(&pool).await?;
        // A plain hint starts a pass (repeated until the replica has subscribed).
        create_on_root(&pool, "a", Some("/w/a"), now).await?;
        eventually(
            "a plain hint to claim a",
            Duration::from_secs(20),
            || async {
                plain_wake().await?;
                Ok(!is_queued(&pool, "a").await?)
            },
        )
        .await?;

        // That pass left nothing waiting: a "capacity freed" hint is not worth a pass.
        create_on_root(&pool, "b", Some("/w/b"), now + 1).await?;
        capacity_wake().await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ensure!(
            is_queued(&pool, "b").await?,
            "a capacity hint woke an idle replica"
        );
        plain_wake().await?;
        eventually(
            "a plain hint to claim b",
            Duration::from_secs(10),
            || async { Ok(!is_queued(&pool, "b").await?) },
        )
        .await?;

        // c waits for b's workspace root; once b lets go, a capacity hint claims it.
        create_on_root(&pool, "c", Some("/w/b"), now + 2).await?;
        plain_wake().await?;
        eventually(
            "c to wait for the workspace lock",
            Duration::from_secs(10),
            || async {
                Ok(tandem_store::get_run(&pool, "c")
                    .await?
                    .scheduler
                    .and_then(|s| s.queue_reason)
                    == Some(QueueReason::WorkspaceLock))
            },
        )
        .await?;
        force_status(&pool, "b", AutomationRunStatus::Completed).await?;
        capacity_wake().await?;
        eventually(
            "a capacity hint to claim c",
            Duration::from_secs(10),
            || async { Ok(!is_queued(&pool, "c").await?) },
        )
        .await?;
        anyhow::Ok(())
    }
    .await;
    trigger.trigger();
    running.await??;
    result?;
    drop(pool);
    bus.cleanup().await?;
    db.drop_db().await
}

/// Backends of this database waiting for a lock.
async fn lock_waiters(pool: &Pool) -> anyhow::Result<i64> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await?;
    Ok(row.try_get(0)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wakeup_starts_a_second_claim_pass_while_the_first_is_still_writing() -> anyhow::Result<()>
{
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new().await?;
    // Another session's claim of "holder" on /w/held, not yet committed: a claim of a run on the
    // same root must wait for it at the workspace-lock index. Taken before the replica starts,
    // so its first pass cannot claim "holder" itself.
    let now = db_now(&pool).await?;
    create_on_root(&pool, "holder", Some("/w/held"), now).await?;
    let mut other = pool.get().await?;
    let other_tx = other.transaction().await?;
    other_tx
        .execute(
            "UPDATE runs SET status = 'running' WHERE run_id = 'holder'",
            &[],
        )
        .await?;
    let (trigger, running) = start_woken_scheduler(&pool, &bus, 2);
    let subject = tandem_bus::wake_scheduler_subject(&bus.prefix);
    let wake = || tandem_bus::wake(&bus.client, subject.clone());
    let result = async {
        create_on_root(&pool, "blocked", Some("/w/held"), now + 1).await?;
        eventually(
            "a pass to wait on the workspace lock",
            Duration::from_secs(20),
            || async {
                wake().await?;
                Ok(lock_waiters(&pool).await? > 0)
            },
        )
        .await?;
        // That pass has not committed; a wake-up still gets "free" claimed by a second pass.
        create_on_root(&pool, "free", None, now + 2).await?;
        eventually(
            "a second pass to claim free",
            Duration::from_secs(10),
            || async {
                wake().await?;
                Ok(!is_queued(&pool, "free").await?)
            },
        )
        .await?;
        ensure!(is_queued(&pool, "blocked").await?, "blocked was claimed");
        anyhow::Ok(())
    }
    .await;
    // The other session gives up its claim: the waiting pass claims "blocked".
    other_tx.rollback().await?;
    let result = match result {
        Ok(()) => {
            eventually(
                "the first pass to claim blocked",
                Duration::from_secs(10),
                || async { Ok(!is_queued(&pool, "blocked").await?) },
            )
            .await
        }
        Err(e) => Err(e),
    };
    trigger.trigger();
    running.await??;
    result?;
    drop(other);
    drop(pool);
    bus.cleanup().await?;
    db.drop_db().await
}

#[tokio::test]
async fn case_26_blocked_run_is_never_claimed_and_stays_unchanged() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    create_on_root(&pool, "blocked-run", Some("/ws/blocked"), 1).await?;
    force_status(&pool, "blocked-run", AutomationRunStatus::Blocked).await?;
    let before = tandem_store::get_run(&pool, "blocked-run").await?;
    let xmin = row_xmin(&pool, "blocked-run").await?;
    let report = claim_dispatching(&pool, 8).await?;
    ensure!(claimed_ids(&report).is_empty(), "a blocked run was claimed");
    ensure!(
        row_xmin(&pool, "blocked-run").await? == xmin,
        "blocked row was rewritten"
    );
    ensure!(tandem_store::get_run(&pool, "blocked-run").await? == before);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn case_28_paused_and_queued_runs_are_preserved_and_no_workspace_is_locked()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    create_on_root(&pool, "paused-run", Some("/ws/a"), 1).await?;
    force_status(&pool, "paused-run", AutomationRunStatus::Paused).await?;
    create_on_root(&pool, "queued-run", Some("/ws/b"), 2).await?;
    // A second run on the paused run's workspace: admissible, because paused holds no lock.
    create_on_root(&pool, "same-root-run", Some("/ws/a"), 3).await?;
    let paused_xmin = row_xmin(&pool, "paused-run").await?;
    let report = claim_plain(&pool, 8, 64).await?;
    let mut claimed = claimed_ids(&report);
    claimed.sort();
    ensure!(
        claimed == ["queued-run", "same-root-run"],
        "claimed {claimed:?}"
    );
    ensure!(
        row_xmin(&pool, "paused-run").await? == paused_xmin,
        "paused row was touched"
    );
    let paused = tandem_store::get_run(&pool, "paused-run").await?;
    ensure!(paused.status == AutomationRunStatus::Paused);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn case_27_fleet_form_scheduler_start_never_fails_running_runs() -> anyhow::Result<()> {
    // Upstream fails every `running` run at startup (server_restart). A fleet replica starting
    // must leave runs claimed by others alone: their lease epoch and status stay as they are.
    let (db, pool) = TestDb::migrated().await?;
    create_on_root(&pool, "busy-run", Some("/ws/busy"), 1).await?;
    let report = claim_plain(&pool, 8, 64).await?;
    ensure!(claimed_ids(&report) == ["busy-run"]);
    let epoch = epoch_of(&pool, "busy-run").await?;
    let prefix = Prefix::new(&unique("sched"))?;
    let port = free_port()?;
    let mut p = Proc::start(
        "tandem-scheduler",
        &[],
        &scheduler_env(&db.url, &prefix, port),
    )?;
    p.wait_for_status(port, "/readyz", 200).await?;
    // Let it run a few claim polls and a tick.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let run = tandem_store::get_run(&pool, "busy-run").await?;
    ensure!(
        run.status == AutomationRunStatus::Running,
        "status {:?}",
        run.status
    );
    ensure!(run.stop_kind.is_none());
    ensure!(
        epoch_of(&pool, "busy-run").await? == epoch,
        "lease epoch changed"
    );
    ensure!(
        !run.checkpoint
            .lifecycle_history
            .iter()
            .any(|l| l.event == "run_failed_server_restart"),
        "a restart failure was recorded"
    );
    p.sigterm()?;
    ensure!(p.wait(EXIT_TIMEOUT).await?.success());
    drop(pool);
    delete_streams(prefix.as_str()).await?;
    db.drop_db().await
}
