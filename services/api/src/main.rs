//! `tandem-api`: the HTTP API (upstream-compatible automation, run, gate and operator routes).
//!
//! The routes arrive with the API issue. Until then the binary runs the shared service lifecycle
//! (configuration checks, Postgres and NATS with retry, schema check, JetStream streams,
//! health/readiness/metrics on `TANDEM_HEALTH_ADDR`, default `127.0.0.1:39740`) and listens on
//! `TANDEM_API_ADDR` (default `127.0.0.1:39731`, upstream's engine port), where it serves the same
//! `/healthz`, `/readyz` and `/metrics` for load balancers that probe the API port.

use std::{net::SocketAddr, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use tandem_runtime::{CommonArgs, DEFAULT_API_ADDR, ServiceInfo};

const INFO: ServiceInfo = ServiceInfo {
    name: "tandem-api",
    default_health_port: 39740,
    version: env!("CARGO_PKG_VERSION"),
};

/// HTTP API of Tandem Fleet: automations, runs, gate decisions and operator actions.
#[derive(Debug, Parser)]
struct Cli {
    /// Listen address of the HTTP API.
    #[arg(long = "api-addr", env = "TANDEM_API_ADDR", default_value = DEFAULT_API_ADDR)]
    api_addr: SocketAddr,
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = tandem_runtime::parse_cli(&INFO);
    let api_addr = cli.api_addr;
    tandem_runtime::run(INFO, cli.common, move |ctx| async move {
        let listener = tokio::net::TcpListener::bind(api_addr)
            .await
            .with_context(|| format!("cannot listen on {api_addr} (TANDEM_API_ADDR)"))?;
        tracing::info!(addr = %api_addr, "API listening");
        let shutdown = ctx.shutdown.clone();
        tandem_runtime::health::serve(listener, ctx.health_router(), async move {
            shutdown.wait().await;
        })
        .await
        .context("API server failed")
    })
    .await
}
