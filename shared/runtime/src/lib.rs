//! The runtime every Tandem Fleet binary shares: configuration from flags and environment,
//! telemetry (logs, optional OTLP traces), the `/healthz` `/readyz` `/metrics` endpoint, graceful
//! shutdown, and connecting to Postgres and NATS with capped exponential backoff.
//!
//! A service's `main` is:
//!
//! ```no_run
//! use clap::Parser;
//! use tandem_runtime::{CommonArgs, ServiceInfo};
//!
//! const INFO: ServiceInfo = ServiceInfo {
//!     name: "tandem-example",
//!     default_health_port: 39799,
//!     version: env!("CARGO_PKG_VERSION"),
//! };
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     common: CommonArgs,
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     let cli: Cli = tandem_runtime::parse_cli(&INFO);
//!     tandem_runtime::run(INFO, cli.common, |ctx| async move {
//!         ctx.shutdown.wait().await; // the service's loops go here
//!         Ok(())
//!     })
//!     .await
//! }
//! ```

pub mod backoff;
pub mod config;
pub mod health;
pub mod relay;
pub mod service;
pub mod shutdown;
pub mod telemetry;

pub use config::{
    CommonArgs, DEFAULT_API_ADDR, DEFAULT_DATABASE_URL, DatabaseArgs, LogFormat, NatsArgs,
    ObservabilityArgs, ServiceInfo, parse_cli,
};
pub use relay::{PublishOutcome, Relay, RelayReport, RelaySettings};
pub use service::{EXIT_CONFIG, EXIT_FAILURE, Failure, ServiceContext, run};
pub use shutdown::{Shutdown, ShutdownTrigger};
pub use telemetry::{current_traceparent, set_parent_from_traceparent};
