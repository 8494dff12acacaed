//! `tandem-gate-notifier`: applies approval gate policies (expire, escalate, remind), marks stale
//! gates, publishes gate events and links the protected audit chain. See the library
//! documentation (`tandem_gate_notifier`) for the loops; health/readiness/metrics are served on
//! `TANDEM_HEALTH_ADDR` (default `127.0.0.1:39743`), and SIGTERM/SIGINT drains and exits 0.

use std::process::ExitCode;

use clap::Parser;
use tandem_gate_notifier::{GateNotifier, GateNotifierArgs};
use tandem_runtime::{CommonArgs, ServiceInfo};

const INFO: ServiceInfo = ServiceInfo {
    name: "tandem-gate-notifier",
    default_health_port: 39743,
    version: env!("CARGO_PKG_VERSION"),
};

/// Applies approval gate policies (expire, escalate, remind), marks stale gates and publishes gate events.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    notifier: GateNotifierArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = tandem_runtime::parse_cli(&INFO);
    let config = cli.notifier.config();
    tandem_runtime::run(INFO, cli.common, |ctx| async move {
        let notifier = GateNotifier::new(
            ctx.pool.clone(),
            ctx.nats.clone(),
            ctx.jetstream.clone(),
            ctx.prefix.clone(),
            config,
            ctx.settings,
        );
        notifier.run(ctx.shutdown.clone()).await
    })
    .await
}
