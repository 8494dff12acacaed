//! `tandem-worker`: reference worker for the task protocol (docs/worker-protocol.md). Consumes
//! node tasks from `tandem.tasks.<queue>` with the built-in handlers of this crate (chosen per
//! node by `metadata.worker.handler`: noop, sleep, fail, needs_repair_once, echo) and reports
//! results, on top of `tandem-worker-sdk`.
//!
//! Runs the shared service lifecycle: configuration checks, Postgres and NATS with retry, schema
//! check, JetStream streams, health/readiness/metrics on `TANDEM_HEALTH_ADDR` (default
//! `127.0.0.1:39744`), and on SIGTERM/SIGINT stops pulling, lets in-flight tasks finish (within
//! `TANDEM_SCHEDULER_SHUTDOWN_TIMEOUT_SECS`, less a margin; the rest go back to the queue) and
//! exits 0.

use std::{process::ExitCode, time::Duration};

use clap::{Args, Parser};
use tandem_runtime::{CommonArgs, EXIT_CONFIG, ServiceInfo};
use tandem_worker::{BuiltinHandlers, HANDLERS};
use tandem_worker_sdk::{Worker, WorkerConfig};

const INFO: ServiceInfo = ServiceInfo {
    name: "tandem-worker",
    default_health_port: 39744,
    version: env!("CARGO_PKG_VERSION"),
};

/// Time kept back from the service's shutdown budget for handing tasks back and flushing.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(3);

/// A comma-separated list of queue names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QueueList(Vec<String>);

fn parse_queues(raw: &str) -> Result<QueueList, String> {
    let mut queues: Vec<String> = Vec::new();
    for q in raw.split(',').map(str::trim) {
        if q.is_empty() {
            return Err(format!(
                "TANDEM_WORKER_QUEUES must be a comma-separated list of non-empty queue names, got {raw:?}"
            ));
        }
        if !queues.iter().any(|have| have == q) {
            queues.push(q.to_owned());
        }
    }
    Ok(QueueList(queues))
}

fn parse_concurrency(raw: &str) -> Result<usize, String> {
    match raw.trim().parse::<usize>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(n),
        _ => Err(format!(
            "TANDEM_WORKER_CONCURRENCY must be an integer from 1 to 100000, got {raw:?}"
        )),
    }
}

fn parse_secs(var: &'static str) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |raw: &str| match raw.trim().parse::<u64>() {
        Ok(n) if (1..=86_400).contains(&n) => Ok(n),
        _ => Err(format!(
            "{var} must be a whole number of seconds from 1 to 86400, got {raw:?}"
        )),
    }
}

fn parse_max_deliver(raw: &str) -> Result<i64, String> {
    match raw.trim().parse::<i64>() {
        Ok(n) if (1..=1000).contains(&n) => Ok(n),
        _ => Err(format!(
            "TANDEM_WORKER_MAX_DELIVER must be an integer from 1 to 1000, got {raw:?}"
        )),
    }
}

fn parse_progress_ms(raw: &str) -> Result<u64, String> {
    match raw.trim().parse::<u64>() {
        Ok(n) if (100..=600_000).contains(&n) => Ok(n),
        _ => Err(format!(
            "TANDEM_WORKER_PROGRESS_INTERVAL_MS must be an integer from 100 to 600000, got {raw:?}"
        )),
    }
}

fn parse_handler(raw: &str) -> Result<String, String> {
    let h = raw.trim();
    if HANDLERS.contains(&h) {
        Ok(h.to_owned())
    } else {
        Err(format!(
            "TANDEM_WORKER_DEFAULT_HANDLER must be one of {}, got {raw:?}",
            HANDLERS.join(", ")
        ))
    }
}

/// Task consumption settings.
#[derive(Debug, Clone, Args)]
struct WorkerArgs {
    /// Task queues to consume, comma-separated (tasks of `tandem.tasks.<queue>`).
    #[arg(
        long = "queues",
        env = "TANDEM_WORKER_QUEUES",
        default_value = "default",
        value_parser = parse_queues
    )]
    queues: QueueList,
    /// Tasks run at once, across all queues.
    #[arg(
        long = "concurrency",
        env = "TANDEM_WORKER_CONCURRENCY",
        default_value = "16",
        value_parser = parse_concurrency
    )]
    concurrency: usize,
    /// ack_wait of the task consumers this worker creates, in seconds (an existing consumer keeps
    /// its own).
    #[arg(
        long = "ack-wait-secs",
        env = "TANDEM_WORKER_ACK_WAIT_SECS",
        default_value = "30",
        value_parser = parse_secs("TANDEM_WORKER_ACK_WAIT_SECS")
    )]
    ack_wait_secs: u64,
    /// max_deliver of the task consumers this worker creates.
    #[arg(
        long = "max-deliver",
        env = "TANDEM_WORKER_MAX_DELIVER",
        default_value = "5",
        value_parser = parse_max_deliver
    )]
    max_deliver: i64,
    /// Interval of the progress heartbeats of a running task, in milliseconds.
    #[arg(
        long = "progress-interval-ms",
        env = "TANDEM_WORKER_PROGRESS_INTERVAL_MS",
        default_value = "2000",
        value_parser = parse_progress_ms
    )]
    progress_interval_ms: u64,
    /// Handler for tasks whose node names none (unset: such tasks fail, saying what to set).
    #[arg(
        long = "default-handler",
        env = "TANDEM_WORKER_DEFAULT_HANDLER",
        value_parser = parse_handler
    )]
    default_handler: Option<String>,
}

/// Reference worker for the task protocol: consumes node tasks and reports results.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    worker: WorkerArgs,
}

fn worker_config(args: &WorkerArgs) -> WorkerConfig {
    WorkerConfig {
        queues: args.queues.0.clone(),
        concurrency: args.concurrency,
        ack_wait: Duration::from_secs(args.ack_wait_secs),
        max_deliver: args.max_deliver,
        progress_interval: Duration::from_millis(args.progress_interval_ms),
        ..WorkerConfig::default()
    }
}

/// In-flight tasks may use the service's shutdown budget less a margin (at least half of it).
fn drain_timeout(shutdown_timeout_secs: u64) -> Duration {
    let total = Duration::from_secs(shutdown_timeout_secs);
    total.saturating_sub(SHUTDOWN_MARGIN).max(total / 2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = tandem_runtime::parse_cli(&INFO);
    let config = worker_config(&cli.worker);
    if let Err(e) = config.validate() {
        eprintln!(
            "{}: error: {e} (TANDEM_WORKER_ACK_WAIT_SECS, TANDEM_WORKER_PROGRESS_INTERVAL_MS)",
            INFO.name
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let handlers = match BuiltinHandlers::new(cli.worker.default_handler.clone()) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("{}: error: TANDEM_WORKER_DEFAULT_HANDLER: {e}", INFO.name);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tandem_runtime::run(INFO, cli.common, |ctx| async move {
        let config = WorkerConfig {
            drain_timeout: drain_timeout(ctx.settings.shutdown_timeout_secs),
            ..config
        };
        let worker = Worker::builder(ctx.nats.clone(), ctx.prefix.clone())
            .config(config)
            .build(handlers)?;
        let shutdown = ctx.shutdown.clone();
        worker.run(async move { shutdown.wait().await }).await?;
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn queues_and_concurrency_parse_and_name_the_variable() {
        assert_eq!(
            parse_queues("default, gpu ,default"),
            Ok(QueueList(vec!["default".into(), "gpu".into()]))
        );
        assert!(
            parse_queues("a,,b")
                .expect_err("empty name")
                .contains("TANDEM_WORKER_QUEUES")
        );
        assert_eq!(parse_concurrency("16"), Ok(16));
        for bad in ["0", "-1", "x", ""] {
            assert!(
                parse_concurrency(bad)
                    .expect_err("rejected")
                    .contains("TANDEM_WORKER_CONCURRENCY")
            );
        }
        assert!(parse_handler("noop").is_ok());
        assert!(parse_handler("nope").is_err());
        assert!(parse_max_deliver("0").is_err());
    }

    #[test]
    fn defaults_give_a_valid_config() {
        let cli = Cli::try_parse_from(["tandem-worker"]).expect("defaults parse");
        let c = worker_config(&cli.worker);
        assert!(c.validate().is_ok());
        assert_eq!(drain_timeout(30), Duration::from_secs(27));
        assert_eq!(drain_timeout(4), Duration::from_secs(2));
        assert_eq!(drain_timeout(0), Duration::ZERO);
    }
}
