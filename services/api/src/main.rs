//! `tandem-api`: the HTTP API (upstream-compatible automation, run, gate and operator routes).
//!
//! Runs the shared service lifecycle (configuration checks, Postgres and NATS with retry, schema
//! check, JetStream streams, health/readiness/metrics on `TANDEM_HEALTH_ADDR`, default
//! `127.0.0.1:39740`) and serves the API on `TANDEM_API_ADDR` (default `127.0.0.1:39731`,
//! upstream's engine port), together with `/healthz`, `/readyz` and `/metrics` for load
//! balancers that probe the API port. It also runs the background outbox relay.

use std::{net::SocketAddr, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use tandem_api::{AppState, AuthConfig, DEFAULT_MAX_BODY_BYTES};
use tandem_runtime::{CommonArgs, DEFAULT_API_ADDR, Relay, RelaySettings, ServiceInfo};

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
    /// The admin token (upstream's single-token setup). Tenant-bound tokens are created with
    /// `POST /auth/tokens` (or `tandemctl tokens create`).
    #[arg(long = "api-token", env = "TANDEM_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Local development only: requests without a token act as a local human admin.
    #[arg(
        long = "dev-mode",
        env = "TANDEM_API_DEV_MODE",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    dev_mode: bool,
    /// Largest accepted request body, in bytes.
    #[arg(long = "max-body-bytes", env = "TANDEM_API_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = tandem_runtime::parse_cli(&INFO);
    let api_addr = cli.api_addr;
    let auth = AuthConfig::new(cli.api_token.as_deref(), cli.dev_mode);
    let max_body = cli.max_body_bytes.max(1024);
    tandem_runtime::run(INFO, cli.common, move |ctx| async move {
        if auth.admin_token_hash.is_none() && !auth.dev_mode {
            tracing::warn!(
                "neither TANDEM_API_TOKEN nor TANDEM_API_DEV_MODE is set: only tenant tokens \
                 from the database are accepted"
            );
        }
        if auth.dev_mode {
            tracing::warn!("TANDEM_API_DEV_MODE: requests without a token act as a local admin");
        }
        let relay = Relay::new(
            ctx.pool.clone(),
            ctx.jetstream.clone(),
            ctx.prefix.clone(),
            RelaySettings::default(),
        );
        let state = AppState::new(
            ctx.pool.clone(),
            ctx.nats.clone(),
            ctx.prefix.clone(),
            relay.clone(),
            ctx.settings,
            auth,
        );
        let router = tandem_api::router(state, max_body).merge(ctx.health_router());
        let listener = tokio::net::TcpListener::bind(api_addr)
            .await
            .with_context(|| format!("cannot listen on {api_addr} (TANDEM_API_ADDR)"))?;
        tracing::info!(addr = %api_addr, "API listening");
        let background = tokio::spawn(relay.run(ctx.shutdown.clone()));
        let shutdown = ctx.shutdown.clone();
        let served = tandem_runtime::health::serve(listener, router, async move {
            shutdown.wait().await;
        })
        .await
        .context("API server failed");
        if let Err(e) = background.await {
            tracing::warn!(error = %e, "outbox relay task failed");
        }
        served
    })
    .await
}
