//! `tandem-scheduler`: claims queued runs fleet-wide, dispatches their task nodes to workers,
//! opens approval gates, applies task results and worker progress. See the library
//! documentation (`tandem_scheduler`) for the loops; health/readiness/metrics are served on
//! `TANDEM_HEALTH_ADDR` (default `127.0.0.1:39741`), and SIGTERM/SIGINT drains and exits 0.

use std::process::ExitCode;

use clap::Parser;
use tandem_runtime::{CommonArgs, ServiceInfo};
use tandem_scheduler::{Scheduler, SchedulerArgs};

const INFO: ServiceInfo = ServiceInfo {
    name: "tandem-scheduler",
    default_health_port: 39741,
    version: env!("CARGO_PKG_VERSION"),
};

/// Claims queued runs, dispatches their task nodes to workers, opens approval gates and applies task results.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    scheduler: SchedulerArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = tandem_runtime::parse_cli(&INFO);
    let config = cli.scheduler.config();
    // Each claim pass holds its transaction's connection and briefly a second one (the capacity
    // reservation), so the pool must leave one over.
    let pool_size = usize::from(cli.common.database.database_pool_size);
    if pool_size <= config.claim_concurrency {
        eprintln!(
            "{}: error: TANDEM_DATABASE_POOL_SIZE ({pool_size}) must exceed \
             TANDEM_SCHEDULER_CLAIM_CONCURRENCY ({})",
            INFO.name, config.claim_concurrency
        );
        return ExitCode::from(tandem_runtime::EXIT_CONFIG);
    }
    tandem_runtime::run(INFO, cli.common, |ctx| async move {
        let scheduler = Scheduler::new(
            ctx.pool.clone(),
            ctx.nats.clone(),
            ctx.jetstream.clone(),
            ctx.prefix.clone(),
            config,
            ctx.settings,
        );
        scheduler.run(ctx.shutdown.clone()).await
    })
    .await
}
