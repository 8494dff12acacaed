//! `cargo run --release -p tandem-bench -- scheduler`: measures the scheduler and workers as
//! separate processes against the real PostgreSQL and NATS of this machine, and prints one JSON
//! object per figure, plus the raw PostgreSQL claim+complete limit (`ops/bench/pg-limit`) measured
//! in the same run so every figure can be read as a ratio to this machine's limit.
//!
//! Figures:
//! * `burn_down`: 100k queued one-task runs claimed by 1 and by 2 scheduler replicas (runs/s
//!   from the first claim to the last, no workers, capacity unbounded).
//! * `end_to_end`: one-task no-op runs completed per second with 2 workers.
//! * `enqueue_to_claim`: enqueue → claimed latency (p50/p99) at a steady enqueue rate, also counted
//!   from the enqueue's commit (`committed_to_claim_*`: the part the scheduler is responsible for).
//! * peak RSS (`VmHWM`) of every process.
//!
//! `tandem-bench gates`: see the `gates` module.

mod gates;

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tandem_core::{
    AutomationFlowNode, AutomationV2RunRecord, AutomationV2Spec, Effects, ExecutionProfile,
    config::GatePolicyDefaults,
};
use tandem_store::StoreSettings;
use tandem_tests::procs::{Proc, delete_streams, free_port, http_get};
use tandem_tests::{TestDb, nats_url, unique};

#[derive(Parser)]
#[command(about = "Tandem Fleet benchmarks; figures are printed as JSON lines")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Scheduler claim burn-down, end-to-end runs/s, enqueue→claim latency, RSS, pg limit.
    Scheduler(SchedulerBench),
    /// Gate-notifier actions/s (1 and 3 replicas), due → published latency, idle tick cost.
    Gates {
        /// Gates due at once in each throughput measurement.
        #[arg(long, default_value_t = 20_000)]
        gates: usize,
        /// Gates falling due per second in the latency measurement.
        #[arg(long, default_value_t = 500)]
        rate: u64,
        /// Seconds of gates falling due in the latency measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Not-yet-due gate counts for the idle tick measurement.
        #[arg(long, value_delimiter = ',', default_values_t = [10_000usize, 1_000_000])]
        idle: Vec<usize>,
    },
}

/// The scheduler bench's figures, for `--only`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Figure {
    PgLimit,
    BurnDown,
    EndToEnd,
    EnqueueToClaim,
}

/// What the scheduler bench measures.
#[derive(clap::Args)]
struct SchedulerBench {
    /// Runs in each burn-down.
    #[arg(long, default_value_t = 100_000)]
    runs: usize,
    /// Runs in the end-to-end measurement.
    #[arg(long, default_value_t = 20_000)]
    e2e_runs: usize,
    /// Steady enqueue rate (runs/s) for the latency measurement.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Seconds of steady enqueueing.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Scheduler replica counts for the burn-down.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2])]
    replicas: Vec<usize>,
    /// Figures to measure (all by default).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Figure>,
}

impl SchedulerBench {
    fn wants(&self, f: Figure) -> bool {
        self.only.is_empty() || self.only.contains(&f)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Scheduler(bench) => scheduler(bench).await,
        Bench::Gates {
            gates: n,
            rate,
            seconds,
            idle,
        } => gates::gates(n, rate, seconds, &idle).await,
    }
}

fn emit(v: Value) {
    println!("{v}");
}

fn noop_spec() -> AutomationV2Spec {
    let mut n = AutomationFlowNode::task("work", &[]);
    n.metadata = Some(json!({"worker": {"handler": "noop"}}));
    AutomationV2Spec::new("bench-noop", vec![n])
}

/// Inserts `n` queued one-task runs in bulk (one template row copied by SQL).
async fn enqueue_bulk(pool: &deadpool_postgres::Pool, tag: &str, n: usize) -> anyhow::Result<()> {
    let settings = StoreSettings::new(GatePolicyDefaults::default());
    let template_id = format!("{tag}-template");
    let run = AutomationV2RunRecord::new_queued(
        template_id.clone(),
        &noop_spec(),
        "manual",
        ExecutionProfile::Strict,
        0,
    );
    tandem_store::create_run(pool, &run, &Effects::default(), &settings).await?;
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO runs (run_id, automation_id, org_id, workspace_id, status, lease_epoch,
                               workspace_root, created_at_ms, updated_at_ms, activity_at_ms,
                               next_action_at_ms, stop_kind, doc)
             SELECT $2 || '-' || g, automation_id, org_id, workspace_id, 'queued', 0, NULL,
                    created_at_ms + g, updated_at_ms, activity_at_ms, NULL, NULL,
                    jsonb_set(doc, '{run_id}', to_jsonb($2 || '-' || g))
               FROM runs, generate_series(1, $3::int) g
              WHERE run_id = $1",
            &[&template_id, &tag, &(n as i32)],
        )
        .await?;
    client
        .execute("DELETE FROM runs WHERE run_id = $1", &[&template_id])
        .await?;
    client.batch_execute("ANALYZE runs").await?;
    Ok(())
}

async fn count(pool: &deadpool_postgres::Pool, sql: &str) -> anyhow::Result<i64> {
    Ok(pool.get().await?.query_one(sql, &[]).await?.get(0))
}

/// Peak resident set size of a process, in MiB.
fn peak_rss_mib(p: &Proc) -> Option<f64> {
    let pid = p.child.id()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Scheduler counters the bench waits on: metric name and a label it must carry, if any.
const CLAIMED: (&str, &str) = ("tandem_scheduler_claims_total", "outcome=\"claimed\"");
const RESULTS_APPLIED: (&str, &str) = ("tandem_scheduler_results_applied_total", "");

struct Fleet {
    procs: Vec<Proc>,
    /// Health/metrics port of each scheduler replica.
    scheduler_ports: Vec<u16>,
}

impl Fleet {
    async fn start(
        db_url: &str,
        prefix: &str,
        schedulers: usize,
        workers: usize,
        capacity: u64,
    ) -> anyhow::Result<Self> {
        let mut procs = Vec::new();
        let mut scheduler_ports = Vec::new();
        for (bin, n) in [("tandem-scheduler", schedulers), ("tandem-worker", workers)] {
            for _ in 0..n {
                let port = free_port()?;
                let env = vec![
                    ("TANDEM_DATABASE_URL", db_url.to_owned()),
                    ("TANDEM_NATS_URL", nats_url()),
                    ("TANDEM_NATS_PREFIX", prefix.to_owned()),
                    ("TANDEM_HEALTH_ADDR", format!("127.0.0.1:{port}")),
                    ("TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS", capacity.to_string()),
                    ("TANDEM_WORKER_CONCURRENCY", "64".into()),
                    ("RUST_LOG", "warn".into()),
                ];
                let mut p = Proc::start(bin, &[], &env)?;
                p.wait_for_status(port, "/readyz", 200).await?;
                procs.push(p);
                if bin == "tandem-scheduler" {
                    scheduler_ports.push(port);
                }
            }
        }
        Ok(Self {
            procs,
            scheduler_ports,
        })
    }

    /// A series summed over the replicas' `/metrics`.
    async fn sum(&self, (name, label): (&str, &str)) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for port in &self.scheduler_ports {
            let (_, body) = http_get(*port, "/metrics").await?;
            total += body
                .lines()
                .find(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(['{', ' ']) && rest.contains(label))
                })
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
        Ok(total)
    }

    /// A counter summed over the replicas' `/metrics`.
    async fn counter(&self, series: (&str, &str)) -> anyhow::Result<u64> {
        Ok(self.sum(series).await? as u64)
    }

    /// The mean of a seconds summary over the replicas, in milliseconds.
    async fn mean_ms(&self, summary: &str) -> anyhow::Result<Option<f64>> {
        let sum = self.sum((&format!("{summary}_sum"), "")).await?;
        let count = self.sum((&format!("{summary}_count"), "")).await?;
        Ok((count > 0.0).then(|| sum * 1000.0 / count))
    }

    /// Waits until the replicas' `series` counter reaches `target`; returns the elapsed time.
    /// Reads the replicas' metrics, so the bench puts no load on the database while it waits.
    async fn wait_counter(
        &self,
        series: (&str, &str),
        target: u64,
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let n = self.counter(series).await?;
            if n >= target {
                return Ok(started.elapsed());
            }
            ensure!(
                started.elapsed() < limit,
                "timed out: {} at {n} of {target} after {limit:?}",
                series.0
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn rss(&self) -> Value {
        Value::Array(
            self.procs
                .iter()
                .map(|p| json!({"process": p.name, "peak_rss_mib": peak_rss_mib(p)}))
                .collect(),
        )
    }

    async fn stop(self) -> anyhow::Result<()> {
        for mut p in self.procs {
            p.sigterm()?;
            p.wait(Duration::from_secs(30)).await?;
            // Warnings and errors of the services (they run with RUST_LOG=warn), so a figure
            // never hides a failing fleet.
            let log = p.stderr();
            if !log.trim().is_empty() {
                eprintln!("--- {} stderr (last 20 lines) ---", p.name);
                let lines: Vec<&str> = log.lines().collect();
                for l in &lines[lines.len().saturating_sub(20)..] {
                    eprintln!("{l}");
                }
            }
        }
        Ok(())
    }
}

/// Waits until `sql` (a count) reaches `target`; returns the elapsed time.
async fn wait_count(
    pool: &deadpool_postgres::Pool,
    sql: &str,
    target: i64,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let n = count(pool, sql).await?;
        if n >= target {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < limit,
            "timed out: {n} of {target} after {limit:?} ({sql})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied()
}

async fn scheduler(bench: SchedulerBench) -> anyhow::Result<()> {
    let SchedulerBench {
        runs,
        e2e_runs,
        rate,
        seconds,
        ..
    } = bench;
    let limit = Duration::from_secs(600);

    // 1. Raw PostgreSQL limit, same machine, same run.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/pg-limit");
    let pg_limit_args = if bench.wants(Figure::PgLimit) {
        vec![
            vec!["--seconds", "10"],
            vec!["--seconds", "10", "--batch", "50", "--clients", "4"],
        ]
    } else {
        Vec::new()
    };
    for args in pg_limit_args {
        let out = tokio::process::Command::new("bash")
            .arg(script)
            .args(&args)
            .output()
            .await
            .context("running ops/bench/pg-limit")?;
        ensure!(
            out.status.success(),
            "pg-limit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }

    // 2. Burn-down with 1 and 2 replicas.
    let burn_down_replicas = if bench.wants(Figure::BurnDown) {
        bench.replicas.clone()
    } else {
        Vec::new()
    };
    for replicas in burn_down_replicas {
        let (db, pool) = TestDb::migrated().await?;
        let prefix = unique("bench");
        enqueue_bulk(&pool, "burn", runs).await?;
        let fleet = Fleet::start(&db.url, &prefix, replicas, 0, 10_000_000).await?;
        let took = fleet.wait_counter(CLAIMED, runs as u64, limit).await?;
        emit(json!({
            "bench": "burn_down",
            "scheduler_replicas": replicas,
            "runs": runs,
            "seconds": took.as_secs_f64(),
            "runs_per_s": runs as f64 / took.as_secs_f64(),
            "rss": fleet.rss(),
        }));
        fleet.stop().await?;
        drop(pool);
        delete_streams(&prefix).await?;
        db.drop_db().await?;
    }

    // 3. End to end with 2 workers.
    if bench.wants(Figure::EndToEnd) {
        let (db, pool) = TestDb::migrated().await?;
        let prefix = unique("bench");
        enqueue_bulk(&pool, "e2e", e2e_runs).await?;
        let fleet = Fleet::start(&db.url, &prefix, 2, 2, 10_000_000).await?;
        let took = fleet
            .wait_counter(RESULTS_APPLIED, e2e_runs as u64, limit)
            .await?;
        // One task per run: every applied result completed its run.
        let completed = count(
            &pool,
            "SELECT count(*) FROM runs WHERE status = 'completed'",
        )
        .await?;
        ensure!(
            completed == e2e_runs as i64,
            "{completed} of {e2e_runs} runs completed after every result was applied"
        );
        emit(json!({
            "bench": "end_to_end",
            "scheduler_replicas": 2,
            "workers": 2,
            "runs": e2e_runs,
            "seconds": took.as_secs_f64(),
            "runs_per_s": e2e_runs as f64 / took.as_secs_f64(),
            "rss": fleet.rss(),
        }));
        fleet.stop().await?;
        drop(pool);
        delete_streams(&prefix).await?;
        db.drop_db().await?;
    }

    // 4. Enqueue → claimed latency at a steady rate (2 replicas, 2 workers so runs finish).
    if bench.wants(Figure::EnqueueToClaim) {
        let (db, pool) = TestDb::migrated().await?;
        let prefix = unique("bench");
        let fleet = Fleet::start(&db.url, &prefix, 2, 2, 10_000_000).await?;
        let settings = StoreSettings::new(GatePolicyDefaults::default());
        // Enqueuers hint the schedulers as the API does; the poll is only the fallback.
        let nats =
            tandem_bus::connect(&tandem_bus::NatsOptions::new(nats_url()), "tandem-bench").await?;
        let wake = tandem_bus::wake_scheduler_subject(&tandem_bus::Prefix::new(&prefix)?);
        let spec = noop_spec();
        let total = rate * seconds;
        let tick = Duration::from_micros(1_000_000 / rate.max(1));
        let started = Instant::now();
        let mut inserts = Vec::with_capacity(total as usize);
        for i in 0..total {
            let due = started + tick * (i as u32);
            tokio::time::sleep_until(due.into()).await;
            // Stamped with this host's clock, which is also the database's clock here; the claim
            // stamps started_at_ms from the database's now().
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default();
            let run = AutomationV2RunRecord::new_queued(
                format!("steady-{i}"),
                &spec,
                "manual",
                ExecutionProfile::Strict,
                now_ms,
            );
            let pool = pool.clone();
            // Inserted concurrently so the enqueue rate does not depend on insert latency.
            let (nats, wake) = (nats.clone(), wake.clone());
            let sent = Instant::now();
            inserts.push(tokio::spawn(async move {
                tandem_store::create_run(&pool, &run, &Effects::default(), &settings).await?;
                let committed = sent.elapsed();
                tandem_bus::wake(&nats, wake).await?;
                anyhow::Ok(committed)
            }));
        }
        // How long the enqueue's own insert took to commit (part of the figure below).
        let mut commit_ms = Vec::with_capacity(inserts.len());
        for insert in inserts {
            commit_ms.push(insert.await??.as_millis() as i64);
        }
        let enqueue_s = started.elapsed().as_secs_f64();
        fleet.wait_counter(CLAIMED, total, limit).await?;
        let rows = pool
            .get()
            .await?
            .query(
                "SELECT run_id, (doc->>'started_at_ms')::bigint - created_at_ms FROM runs
                  WHERE doc ? 'started_at_ms'",
                &[],
            )
            .await?;
        let mut lat: Vec<i64> = Vec::with_capacity(rows.len());
        // The same latency counted from the enqueue's commit instead of its start: what the
        // scheduler is responsible for (run `steady-{i}` committed `commit_ms[i]` after its start).
        let mut from_commit: Vec<i64> = Vec::with_capacity(rows.len());
        for r in &rows {
            let total = r.get::<_, i64>(1);
            lat.push(total);
            let i = r
                .get::<_, &str>(0)
                .strip_prefix("steady-")
                .and_then(|i| i.parse::<usize>().ok());
            if let Some(committed) = i.and_then(|i| commit_ms.get(i)) {
                from_commit.push(total - committed);
            }
        }
        lat.sort_unstable();
        from_commit.sort_unstable();
        commit_ms.sort_unstable();
        emit(json!({
            "bench": "enqueue_to_claim",
            "target_rate_per_s": rate,
            "achieved_rate_per_s": total as f64 / enqueue_s,
            "runs": total,
            "p50_ms": percentile(&lat, 0.50),
            "p99_ms": percentile(&lat, 0.99),
            "max_ms": lat.last(),
            "enqueue_commit_p50_ms": percentile(&commit_ms, 0.50),
            "enqueue_commit_p99_ms": percentile(&commit_ms, 0.99),
            "committed_to_claim_p50_ms": percentile(&from_commit, 0.50),
            "committed_to_claim_p99_ms": percentile(&from_commit, 0.99),
            "claim_pass_mean_ms": fleet.mean_ms("tandem_scheduler_claim_seconds").await?,
            "rss": fleet.rss(),
        }));
        fleet.stop().await?;
        drop(pool);
        delete_streams(&prefix).await?;
        db.drop_db().await?;
    }
    Ok(())
}
