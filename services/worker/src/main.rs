//! `tandem-worker`: Reference worker for the task protocol: consumes node tasks and reports
//! results.
//!
//! The task consumer and its built-in handlers arrive with the worker issue. Until then the binary
//! runs the shared service lifecycle only: configuration checks, Postgres and NATS with retry,
//! schema check, JetStream streams, health/readiness/metrics on `TANDEM_HEALTH_ADDR` (default
//! `127.0.0.1:39744`), and a clean exit on SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use tandem_runtime::{CommonArgs, ServiceInfo};

const INFO: ServiceInfo = ServiceInfo {
    name: "tandem-worker",
    default_health_port: 39744,
    version: env!("CARGO_PKG_VERSION"),
};

/// Reference worker for the task protocol: consumes node tasks and reports results.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = tandem_runtime::parse_cli(&INFO);
    tandem_runtime::run(INFO, cli.common, |ctx| async move {
        ctx.shutdown.wait().await;
        Ok(())
    })
    .await
}
