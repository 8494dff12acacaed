//! `tandem-bench gates`: gate-notifier figures against the real PostgreSQL and NATS.
//!
//! * `gate_throughput`: N gates already due (expire → cancel), drained by 1 and by 3
//!   `tandem-gate-notifier` processes: actions/s from the first action to the last committed,
//!   and to the last event published.
//! * `gate_due_to_published`: gates falling due at a steady rate while 3 notifiers run: the
//!   time from each gate's due time to its `approval.gate.expired` event being stored by
//!   JetStream (the stream's own timestamp; one host, one clock), p50/p99.
//! * `gate_idle_tick`: the cost of one idle notifier tick (the due-gate select plus the
//!   next-due read) with 10k and with 1M gates that are not yet due, p50/p99 over many ticks.
//!
//! Gates are inserted with set-based SQL from one record built by the test fixtures, so seeding
//! a million rows takes seconds, not hours.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tandem_bus::async_nats::jetstream;
use tandem_core::config::GatePolicyDefaults;
use tandem_core::{AutomationGateExpiryAction, AutomationGateExpiryPolicy};
use tandem_store::StoreSettings;
use tandem_tests::gates::{awaiting_run, spec};
use tandem_tests::procs::{Proc, delete_streams, free_port};
use tandem_tests::{TestDb, db_now, nats_url, unique};

use crate::{Fleet, count, emit, percentile, wait_count};

/// Inserts `n` awaiting runs `<tag>-<i>` (i from 0) whose gate was requested at
/// `first_due_ms - lead_ms + i * step_ms` with an expire → cancel policy of `lead_ms`, so gate `i`
/// is due at `first_due_ms + i * step_ms`.
async fn seed_gates(
    pool: &deadpool_postgres::Pool,
    tag: &str,
    n: usize,
    first_due_ms: u64,
    step_ms: u64,
    lead_ms: u64,
) -> anyhow::Result<()> {
    let policy = AutomationGateExpiryPolicy {
        expires_after_ms: Some(lead_ms),
        on_expiry: Some(AutomationGateExpiryAction::Cancel),
        ..Default::default()
    };
    let template = awaiting_run("template", first_due_ms - lead_ms, Some(policy))?;
    let mut doc = serde_json::to_value(&template)?;
    if let Some(cp) = doc.get_mut("checkpoint").and_then(Value::as_object_mut) {
        cp.remove("lifecycle_history");
    }
    let client = pool.get().await?;
    let chunk = 100_000usize;
    let mut start = 0usize;
    while start < n {
        let end = (start + chunk).min(n);
        let (lo, hi) = (i64::try_from(start)?, i64::try_from(end)? - 1);
        client
            .execute(
                "INSERT INTO runs (run_id, automation_id, org_id, workspace_id, status, lease_epoch,
                                   workspace_root, created_at_ms, updated_at_ms, activity_at_ms,
                                   next_action_at_ms, stop_kind, doc)
                 SELECT $1 || '-' || g, 'auto-gates', 'org-1', 'ws.one', 'awaiting_approval', 0,
                        NULL, r, r, r, r + $5, NULL,
                        jsonb_set(jsonb_set(jsonb_set($6::jsonb, '{run_id}', to_jsonb($1 || '-' || g)),
                                            '{checkpoint,awaiting_gate,requested_at_ms}', to_jsonb(r)),
                                  '{updated_at_ms}', to_jsonb(r))
                   FROM generate_series($2::bigint, $3::bigint) g,
                        LATERAL (SELECT $4::bigint + g * $7::bigint AS r) t",
                &[
                    &tag,
                    &lo,
                    &hi,
                    &(i64::try_from(first_due_ms)? - i64::try_from(lead_ms)?),
                    &i64::try_from(lead_ms)?,
                    &doc,
                    &i64::try_from(step_ms)?,
                ],
            )
            .await
            .context("seeding gates")?;
        start = end;
    }
    client.execute("ANALYZE runs", &[]).await?;
    Ok(())
}

async fn start_notifiers(db_url: &str, prefix: &str, n: usize) -> anyhow::Result<Fleet> {
    let mut procs = Vec::new();
    for _ in 0..n {
        let port = free_port()?;
        let env = vec![
            ("TANDEM_DATABASE_URL", db_url.to_owned()),
            ("TANDEM_NATS_URL", nats_url()),
            ("TANDEM_NATS_PREFIX", prefix.to_owned()),
            ("TANDEM_HEALTH_ADDR", format!("127.0.0.1:{port}")),
            ("RUST_LOG", "warn".into()),
        ];
        let mut p = Proc::start("tandem-gate-notifier", &[], &env)?;
        p.wait_for_status(port, "/readyz", 200).await?;
        procs.push(p);
    }
    Ok(Fleet {
        procs,
        scheduler_ports: Vec::new(),
    })
}

/// JetStream's stored timestamp (ms) of every `approval.gate.expired` event, by run id.
async fn expired_event_times(
    js: &jetstream::Context,
    stream: &str,
) -> anyhow::Result<Vec<(String, i64)>> {
    let mut stream = js.get_stream(stream).await?;
    let total = stream.info().await?.state.messages as usize;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut out = Vec::with_capacity(total);
    let mut seen = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen < total && Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(2))
            .messages()
            .await?;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("fetching events: {e}"))?;
            seen += 1;
            let stored_ms = m
                .info()
                .map(|i| (i.published.unix_timestamp_nanos() / 1_000_000) as i64)
                .map_err(|e| anyhow::anyhow!("message info: {e}"))?;
            let v: Value = serde_json::from_slice(&m.payload)?;
            if v.get("type").and_then(Value::as_str) == Some("approval.gate.expired")
                && let Some(run_id) = v.pointer("/envelope/run_id").and_then(Value::as_str)
            {
                out.push((run_id.to_owned(), stored_ms));
            }
        }
    }
    Ok(out)
}

pub async fn gates(
    throughput: usize,
    rate: u64,
    seconds: u64,
    idle: &[usize],
) -> anyhow::Result<()> {
    let limit = Duration::from_secs(600);
    let nats =
        tandem_bus::connect(&tandem_bus::NatsOptions::new(nats_url()), "tandem-bench").await?;
    let js = tandem_bus::jetstream(nats.clone());

    // 1. Throughput: everything due at once.
    for replicas in [1usize, 3] {
        let (db, pool) = TestDb::migrated().await?;
        tandem_store::upsert_automation(&pool, &spec()).await?;
        let prefix = unique("gbench");
        let fleet = start_notifiers(&db.url, &prefix, replicas).await?;
        // Seeded in one statement (all rows appear at its commit), then one wake-up: the clock
        // starts when the notifiers can first see the gates.
        let now = db_now(&pool).await?;
        seed_gates(
            &pool,
            "due",
            throughput,
            now.saturating_sub(1_000),
            0,
            1_000,
        )
        .await?;
        let started = Instant::now();
        tandem_bus::wake(
            &nats,
            tandem_bus::wake_gates_subject(&tandem_bus::Prefix::new(&prefix)?),
        )
        .await?;
        let acted = wait_count(
            &pool,
            "SELECT count(*) FROM runs WHERE status = 'cancelled'",
            throughput as i64,
            limit,
        )
        .await?;
        wait_count(
            &pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
            throughput as i64,
            limit,
        )
        .await?;
        let published = started.elapsed();
        emit(json!({
            "bench": "gate_throughput",
            "notifier_replicas": replicas,
            "gates": throughput,
            "actions_per_s": throughput as f64 / acted.as_secs_f64(),
            "published_per_s": throughput as f64 / published.as_secs_f64(),
            "seconds_to_last_action": acted.as_secs_f64(),
            "seconds_to_last_publish": published.as_secs_f64(),
            "rss": fleet.rss(),
        }));
        fleet.stop().await?;
        drop(pool);
        delete_streams(&prefix).await?;
        db.drop_db().await?;
    }

    // 2. Due → published at a steady rate, 3 replicas.
    {
        let (db, pool) = TestDb::migrated().await?;
        tandem_store::upsert_automation(&pool, &spec()).await?;
        let prefix = unique("gbench");
        let fleet = start_notifiers(&db.url, &prefix, 3).await?;
        let n = usize::try_from(rate * seconds)?;
        let step_ms = (1_000 / rate.max(1)).max(1);
        // The first gate falls due 2 s from now, after seeding.
        let first_due = db_now(&pool).await? + 2_000;
        seed_gates(&pool, "steady", n, first_due, step_ms, 60_000).await?;
        wait_count(
            &pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
            n as i64,
            limit,
        )
        .await?;
        let names = tandem_bus::StreamNames::new(&tandem_bus::Prefix::new(&prefix)?);
        let times = expired_event_times(&js, &names.events).await?;
        let mut lat: Vec<i64> = times
            .iter()
            .filter_map(|(run_id, stored)| {
                let i: i64 = run_id.strip_prefix("steady-")?.parse().ok()?;
                Some(stored - (first_due as i64 + i * step_ms as i64))
            })
            .collect();
        lat.sort_unstable();
        emit(json!({
            "bench": "gate_due_to_published",
            "notifier_replicas": 3,
            "gates": n,
            "events_read": lat.len(),
            "rate_per_s": 1_000 / step_ms,
            "p50_ms": percentile(&lat, 0.50),
            "p99_ms": percentile(&lat, 0.99),
            "max_ms": lat.last(),
            "rss": fleet.rss(),
        }));
        fleet.stop().await?;
        drop(pool);
        delete_streams(&prefix).await?;
        db.drop_db().await?;
    }

    // 3. Idle tick cost with many gates that are not yet due.
    for &n in idle {
        let (db, pool) = TestDb::migrated().await?;
        tandem_store::upsert_automation(&pool, &spec()).await?;
        let now = db_now(&pool).await?;
        let seeding = Instant::now();
        // Due in 10 days and later: never touched by the ticks below.
        seed_gates(&pool, "idle", n, now + 10 * 86_400_000, 1, 60_000).await?;
        let seed_s = seeding.elapsed().as_secs_f64();
        let settings = StoreSettings::new(GatePolicyDefaults::default());
        let mut ticks = Vec::with_capacity(500);
        for _ in 0..500 {
            let t = Instant::now();
            let report = tandem_gate_notifier::sweep_due_gates(&pool, 50, &settings).await?;
            let next = tandem_gate_notifier::until_next_gate_action(&pool).await?;
            ticks.push(t.elapsed().as_micros() as i64);
            anyhow::ensure!(
                report.selected == 0,
                "an idle tick selected {}",
                report.selected
            );
            anyhow::ensure!(next.is_some(), "the next due gate was not found");
        }
        ticks.sort_unstable();
        emit(json!({
            "bench": "gate_idle_tick",
            "not_yet_due_gates": n,
            "rows_in_table": count(&pool, "SELECT count(*) FROM runs").await?,
            "seed_seconds": seed_s,
            "ticks": ticks.len(),
            "p50_ms": percentile(&ticks, 0.50).map(|us| us as f64 / 1000.0),
            "p99_ms": percentile(&ticks, 0.99).map(|us| us as f64 / 1000.0),
        }));
        drop(pool);
        db.drop_db().await?;
    }
    Ok(())
}
