//! The fleet as separate processes: 3 `tandem-scheduler` replicas and 2 `tandem-worker`s over
//! real PostgreSQL and NATS run 2000 runs of mixed flows (sequential, fan-out/fan-in,
//! `needs_repair` then success, failing with retries, gated), with one scheduler killed with
//! `kill -9` in the middle. Asserted by counting effects, not by timing:
//!
//! * every run reaches its expected state (nothing lost);
//! * every (run, node, attempt) is executed by a worker exactly once (result publishes counted on
//!   the wire);
//! * no run is held by two claims: the lease epoch sampled per run never goes backwards, and the
//!   final epoch equals the number of claims its lifecycle shows;
//! * the workspace lock and the fleet-wide capacity are never violated (sampled while running).
//!
//! `TANDEM_FLEET_RUNS` changes the number of runs (default 2000). The test prints its figures.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use futures::StreamExt as _;
use serde_json::json;
use tandem_core::{
    AutomationFlowNode, AutomationRunStatus, AutomationV2RunRecord, AutomationV2Spec, Effects,
    ExecutionProfile, config::GatePolicyDefaults,
};
use tandem_store::StoreSettings;
use tandem_tests::procs::{EXIT_TIMEOUT, Proc, delete_streams, free_port};
use tandem_tests::{TestDb, nats_url, unique};
use tokio::sync::Mutex;

const CAPACITY: i64 = 32;
const WORKSPACES: usize = 24;
const DEADLINE: Duration = Duration::from_secs(420);

fn node(id: &str, deps: &[&str], handler: &str) -> AutomationFlowNode {
    let mut n = AutomationFlowNode::task(id, deps);
    n.metadata = Some(json!({ "worker": { "handler": handler } }));
    n
}

/// The five flow kinds and the state each run must end in.
fn flows() -> Vec<(AutomationV2Spec, AutomationRunStatus)> {
    let mut failing = node("flaky", &[], "fail");
    failing.retry_policy = Some(json!({ "max_attempts": 2 }));
    vec![
        (
            AutomationV2Spec::new(
                "fleet-sequential",
                vec![
                    node("a", &[], "noop"),
                    node("b", &["a"], "echo"),
                    node("c", &["b"], "noop"),
                ],
            ),
            AutomationRunStatus::Completed,
        ),
        (
            AutomationV2Spec::new(
                "fleet-fan",
                vec![
                    node("split", &[], "noop"),
                    node("left", &["split"], "noop"),
                    node("right", &["split"], "noop"),
                    node("join", &["left", "right"], "echo"),
                ],
            ),
            AutomationRunStatus::Completed,
        ),
        (
            AutomationV2Spec::new(
                "fleet-repair",
                vec![
                    node("draft", &[], "needs_repair_once"),
                    node("publish", &["draft"], "noop"),
                ],
            ),
            AutomationRunStatus::Completed,
        ),
        (
            AutomationV2Spec::new("fleet-failing", vec![failing]),
            AutomationRunStatus::Failed,
        ),
        (
            AutomationV2Spec::new(
                "fleet-gated",
                vec![
                    node("prepare", &[], "noop"),
                    AutomationFlowNode::approval("approval", &["prepare"], &["prepare"]),
                    node("send", &["approval"], "noop"),
                ],
            ),
            AutomationRunStatus::AwaitingApproval,
        ),
    ]
}

#[derive(Default)]
struct Samples {
    max_running: AtomicU64,
    lock_violations: AtomicU64,
    epoch_regressions: AtomicU64,
    samples: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_runs_mixed_flows_exactly_once_through_a_scheduler_kill() -> anyhow::Result<()> {
    let total: usize = std::env::var("TANDEM_FLEET_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let (db, pool) = TestDb::migrated().await?;
    let prefix = unique("fleet").replace('_', "-");
    let settings = StoreSettings::new(GatePolicyDefaults::default());

    // Runs: the five kinds round-robin, spread over a few workspaces so the lock is contended.
    let flows = flows();
    let mut expected: HashMap<String, AutomationRunStatus> = HashMap::new();
    for (spec, _) in &flows {
        tandem_store::insert_automation(&pool, spec).await?;
    }
    for i in 0..total {
        let (spec, want) = &flows[i % flows.len()];
        let mut spec = spec.clone();
        spec.workspace_root = Some(format!("/fleet/ws-{}", i % WORKSPACES));
        let run = AutomationV2RunRecord::new_queued(
            format!("fleet-run-{i:05}"),
            &spec,
            "manual",
            ExecutionProfile::Strict,
            1_700_000_000_000 + i as u64,
        );
        tandem_store::create_run(&pool, &run, &Effects::default(), &settings).await?;
        expected.insert(run.run_id.clone(), *want);
    }

    // Count every result a worker publishes, by its Nats-Msg-Id (= run:node:attempt:epoch).
    let client = async_nats::connect(nats_url()).await?;
    let mut results = client
        .subscribe(format!("{prefix}.tandem.results.>"))
        .await?;
    let executions: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let counter = executions.clone();
    let observer = tokio::spawn(async move {
        while let Some(msg) = results.next().await {
            let id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string())
                .unwrap_or_default();
            *counter.lock().await.entry(id).or_default() += 1;
        }
    });

    // The fleet.
    let env = |port: u16| -> Vec<(&'static str, String)> {
        vec![
            ("TANDEM_DATABASE_URL", db.url.clone()),
            ("TANDEM_NATS_URL", nats_url()),
            ("TANDEM_NATS_PREFIX", prefix.clone()),
            ("TANDEM_HEALTH_ADDR", format!("127.0.0.1:{port}")),
            ("TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS", CAPACITY.to_string()),
            ("TANDEM_WORKER_CONCURRENCY", "32".into()),
            ("RUST_LOG", "warn".into()),
        ]
    };
    let mut schedulers = Vec::new();
    for _ in 0..3 {
        let port = free_port()?;
        let mut p = Proc::start("tandem-scheduler", &[], &env(port))?;
        p.wait_for_status(port, "/readyz", 200).await?;
        schedulers.push(p);
    }
    let mut workers = Vec::new();
    for _ in 0..2 {
        let port = free_port()?;
        let mut p = Proc::start("tandem-worker", &[], &env(port))?;
        p.wait_for_status(port, "/readyz", 200).await?;
        workers.push(p);
    }

    // Sample the invariants while the fleet works.
    let samples = Arc::new(Samples::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (samples, stop, pool) = (samples.clone(), stop.clone(), pool.clone());
        tokio::spawn(async move {
            let mut epochs: HashMap<String, i64> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                let client = pool.get().await?;
                let running: i64 = client
                    .query_one("SELECT count(*) FROM runs WHERE status = 'running'", &[])
                    .await?
                    .get(0);
                samples
                    .max_running
                    .fetch_max(running as u64, Ordering::Relaxed);
                let shared: i64 = client
                    .query_one(
                        "SELECT count(*) FROM (SELECT workspace_root FROM runs
                          WHERE status IN ('running','pausing') AND workspace_root IS NOT NULL
                          GROUP BY workspace_root HAVING count(*) > 1) s",
                        &[],
                    )
                    .await?
                    .get(0);
                samples
                    .lock_violations
                    .fetch_add(shared as u64, Ordering::Relaxed);
                for row in client
                    .query("SELECT run_id, lease_epoch FROM runs", &[])
                    .await?
                {
                    let (id, epoch): (String, i64) = (row.get(0), row.get(1));
                    let prev = epochs.insert(id, epoch).unwrap_or(0);
                    if epoch < prev {
                        samples.epoch_regressions.fetch_add(1, Ordering::Relaxed);
                    }
                }
                samples.samples.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        })
    };

    // Wait for the fleet, killing one scheduler once a third of the runs are done.
    let started = Instant::now();
    let mut killed = 0;
    let settled = loop {
        let client = pool.get().await?;
        let done: i64 = client
            .query_one(
                "SELECT count(*) FROM runs
                  WHERE status IN ('completed','failed','blocked','cancelled','awaiting_approval')",
                &[],
            )
            .await?
            .get(0);
        drop(client);
        if killed == 0 && done as usize >= total / 3 {
            schedulers[0].sigkill().await?;
            killed = 1;
        }
        if done as usize == total {
            break true;
        }
        if started.elapsed() > DEADLINE {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.await.context("sampler task")??;

    // Final states.
    let client = pool.get().await?;
    let mut wrong = Vec::new();
    let mut claims_mismatch = 0;
    for row in client
        .query("SELECT run_id, status, lease_epoch FROM runs", &[])
        .await?
    {
        let (id, status, epoch): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
        let want = expected.get(&id).copied();
        if want.map(|w| w.as_str()) != Some(status.as_str()) {
            wrong.push(format!("{id}: {status} (want {want:?})"));
        }
        if epoch < 1 {
            claims_mismatch += 1;
        }
    }
    // One sequential run's timeline, to show where time goes between hops.
    let timeline: Vec<String> = client
        .query(
            "SELECT event, recorded_at_ms - min(recorded_at_ms) OVER () FROM run_lifecycle
              WHERE run_id = 'fleet-run-00000' ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| format!("{}+{}ms", r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect();
    println!("fleet: timeline of fleet-run-00000: {}", timeline.join(" "));
    tokio::time::sleep(Duration::from_millis(300)).await;
    observer.abort();
    let executions = executions.lock().await;
    let duplicate_executions = executions.values().filter(|n| **n > 1).count();
    let missing_ids = executions.keys().filter(|k| k.is_empty()).count();

    println!(
        "fleet: runs={total} settled={settled} elapsed_s={:.1} schedulers=3 workers=2 kills={killed} \
         task_executions={} duplicate_executions={duplicate_executions} wrong_state={} \
         max_running={} capacity={CAPACITY} lock_violations={} epoch_regressions={} samples={}",
        elapsed.as_secs_f64(),
        executions.len(),
        wrong.len(),
        samples.max_running.load(Ordering::Relaxed),
        samples.lock_violations.load(Ordering::Relaxed),
        samples.epoch_regressions.load(Ordering::Relaxed),
        samples.samples.load(Ordering::Relaxed),
    );

    for mut p in schedulers.into_iter().skip(1).chain(workers) {
        p.sigterm()?;
        let status = p.wait(EXIT_TIMEOUT).await?;
        ensure!(status.success(), "{} exited with {status}", p.name);
    }

    if !settled {
        bail!(
            "fleet did not settle within {DEADLINE:?}; {} runs in the wrong state, e.g. {:?}",
            wrong.len(),
            wrong.iter().take(5).collect::<Vec<_>>()
        );
    }
    ensure!(
        wrong.is_empty(),
        "runs in the wrong state: {:?}",
        &wrong[..wrong.len().min(10)]
    );
    ensure!(
        missing_ids == 0,
        "{missing_ids} results without Nats-Msg-Id"
    );
    ensure!(
        duplicate_executions == 0,
        "{duplicate_executions} (run, node, attempt) executed more than once"
    );
    ensure!(
        claims_mismatch == 0,
        "{claims_mismatch} runs finished without a claim"
    );
    ensure!(
        samples.max_running.load(Ordering::Relaxed) <= CAPACITY as u64,
        "fleet-wide capacity exceeded"
    );
    ensure!(
        samples.lock_violations.load(Ordering::Relaxed) == 0,
        "workspace lock violated"
    );
    ensure!(
        samples.epoch_regressions.load(Ordering::Relaxed) == 0,
        "lease epoch went backwards"
    );
    // Every task node of every run was executed: 3 + 4 + (2 + repair) + 2 attempts + 1 (gated).
    let per_cycle = 3 + 4 + 3 + 2 + 1;
    let cycles = total / flows.len();
    ensure!(
        executions.len() >= cycles * per_cycle,
        "only {} task executions for {total} runs",
        executions.len()
    );

    drop(client);
    drop(pool);
    delete_streams(&prefix).await?;
    db.drop_db().await?;
    Ok(())
}
