//! `tandem-sweeper`: Reaps stale runs, auto-resumes them, recovers half-applied gate decisions and
//! stuck pausing runs, and applies retention.
//!
//! The sweeps arrive with the sweeper issue. Until then the binary runs the shared service
//! lifecycle only: configuration checks, Postgres and NATS with retry, schema check, JetStream
//! streams, health/readiness/metrics on `TANDEM_HEALTH_ADDR` (default `127.0.0.1:39742`), and a
//! clean exit on SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use tandem_runtime::{CommonArgs, ServiceInfo};

const INFO: ServiceInfo = ServiceInfo {
    name: "tandem-sweeper",
    default_health_port: 39742,
    version: env!("CARGO_PKG_VERSION"),
};

/// Reaps stale runs, auto-resumes them, recovers half-applied gate decisions and stuck pausing runs, and applies retention.
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
