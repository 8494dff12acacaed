//! `tandem-sweeper`: reaps stale runs, auto-resumes them, recovers stuck pausing runs and
//! half-applied gate decisions, applies retention and weekly spend caps. See the library
//! documentation (`tandem_sweeper`) for the duties; health/readiness/metrics are served on
//! `TANDEM_HEALTH_ADDR` (default `127.0.0.1:39742`), and SIGTERM/SIGINT stops the loops after the
//! transaction in progress and exits 0, failing nobody's run.

use std::process::ExitCode;

use clap::Parser;
use tandem_runtime::{CommonArgs, ServiceInfo};
use tandem_sweeper::{Sweeper, SweeperArgs};

const INFO: ServiceInfo = ServiceInfo {
    name: "tandem-sweeper",
    default_health_port: 39742,
    version: env!("CARGO_PKG_VERSION"),
};

/// Reaps stale runs, auto-resumes them, recovers stuck pausing runs and half-applied gate decisions, applies retention and weekly spend caps.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    sweeper: SweeperArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = tandem_runtime::parse_cli(&INFO);
    let config = cli.sweeper.config();
    tandem_runtime::run(INFO, cli.common, |ctx| async move {
        let sweeper = Sweeper::new(
            ctx.pool.clone(),
            ctx.nats.clone(),
            ctx.jetstream.clone(),
            ctx.prefix.clone(),
            config,
            ctx.settings,
        );
        sweeper.run(ctx.shutdown.clone()).await
    })
    .await
}
