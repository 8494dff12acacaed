//! The scheduler's own settings (flags with environment fallbacks). The fleet-wide capacity
//! (`TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS`) and the shutdown grace period are lifecycle settings
//! read by the runtime (`tandem_core::config::LifecycleSettings`).

use std::time::Duration;

use clap::Args;
use tandem_runtime::RelaySettings;
use tandem_store::MAX_CLAIM_BATCH;

/// `tandem-scheduler` flags.
#[derive(Debug, Clone, Args)]
pub struct SchedulerArgs {
    /// Queued runs examined per claim transaction (1-512). A full batch is followed at once by the
    /// next.
    #[arg(
        long = "claim-batch",
        env = "TANDEM_SCHEDULER_CLAIM_BATCH",
        default_value_t = 256,
        value_parser = clap::value_parser!(u16).range(1..=MAX_CLAIM_BATCH as i64)
    )]
    pub claim_batch: u16,
    /// Claim passes this replica keeps in flight (1-16): a wake-up that arrives while a pass is
    /// writing starts the next one at once instead of waiting for that commit. Passes take
    /// disjoint runs (`SKIP LOCKED`) and share the fleet-wide capacity reservations. Worth
    /// raising when database round trips, not CPU, bound a pass (a remote database); on a
    /// CPU-bound host a second pass only adds memory. Needs TANDEM_DATABASE_POOL_SIZE above it.
    #[arg(
        long = "claim-concurrency",
        env = "TANDEM_SCHEDULER_CLAIM_CONCURRENCY",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=16)
    )]
    pub claim_concurrency: u8,
    /// Longest wait between claim passes when no wake-up arrives, in milliseconds (each wait is
    /// jittered down by up to half).
    #[arg(
        long = "poll-ms",
        env = "TANDEM_SCHEDULER_POLL_MS",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(10..=60_000)
    )]
    pub poll_ms: u64,
    /// Result messages fetched per pull from the shared results consumer.
    #[arg(
        long = "results-batch",
        env = "TANDEM_SCHEDULER_RESULTS_BATCH",
        default_value_t = 256,
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub results_batch: u16,
    /// Results applied concurrently by this replica.
    #[arg(
        long = "results-concurrency",
        env = "TANDEM_SCHEDULER_RESULTS_CONCURRENCY",
        default_value_t = 8,
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    pub results_concurrency: u16,
    /// How often coalesced worker progress is written (at most one activity write per run per
    /// period), in milliseconds.
    #[arg(
        long = "progress-flush-ms",
        env = "TANDEM_SCHEDULER_PROGRESS_FLUSH_MS",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(50..=60_000)
    )]
    pub progress_flush_ms: u64,
    /// How often this replica re-evaluates the claimed runs (runtime guardrails, runs left with
    /// nothing dispatched), in milliseconds (jittered down by up to half).
    #[arg(
        long = "tick-ms",
        env = "TANDEM_SCHEDULER_TICK_MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(100..=3_600_000)
    )]
    pub tick_ms: u64,
    /// How long the outbox relay holds rows it is publishing before another replica may take
    /// them over, in seconds. Keep it well below TANDEM_NATS_DUPLICATE_WINDOW_SECS.
    #[arg(
        long = "relay-lease-secs",
        env = "TANDEM_OUTBOX_RELAY_LEASE_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub relay_lease_secs: u64,
}

impl SchedulerArgs {
    pub fn config(&self) -> SchedulerConfig {
        SchedulerConfig {
            claim_batch: usize::from(self.claim_batch),
            claim_concurrency: usize::from(self.claim_concurrency),
            poll_interval: Duration::from_millis(self.poll_ms),
            results_batch: usize::from(self.results_batch),
            results_concurrency: usize::from(self.results_concurrency),
            results_ack_wait: DEFAULT_RESULTS_ACK_WAIT,
            progress_flush: Duration::from_millis(self.progress_flush_ms),
            tick_interval: Duration::from_millis(self.tick_ms),
            relay: RelaySettings {
                lease: Duration::from_secs(self.relay_lease_secs),
                poll: Duration::from_millis(self.poll_ms),
                ..RelaySettings::default()
            },
        }
    }
}

/// `ack_wait` of the shared results consumer: a result not acknowledged within it is redelivered
/// (to any replica); applying is idempotent, so a redelivery is harmless.
pub const DEFAULT_RESULTS_ACK_WAIT: Duration = Duration::from_secs(30);

/// The scheduler's settings, as used by [`crate::Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub claim_batch: usize,
    /// Claim passes in flight at once (at least 1).
    pub claim_concurrency: usize,
    pub poll_interval: Duration,
    pub results_batch: usize,
    pub results_concurrency: usize,
    pub results_ack_wait: Duration,
    pub progress_flush: Duration,
    pub tick_interval: Duration,
    pub relay: RelaySettings,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            claim_batch: 256,
            claim_concurrency: 1,
            poll_interval: Duration::from_secs(1),
            results_batch: 64,
            results_concurrency: 8,
            results_ack_wait: DEFAULT_RESULTS_ACK_WAIT,
            progress_flush: Duration::from_secs(1),
            tick_interval: Duration::from_secs(10),
            relay: RelaySettings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        scheduler: SchedulerArgs,
    }

    #[test]
    fn defaults_and_bounds() {
        let cli = Cli::try_parse_from(["x"]).expect("defaults parse");
        let c = cli.scheduler.config();
        assert_eq!(c.claim_batch, 256);
        assert_eq!(c.claim_concurrency, 1);
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert_eq!(c.relay.lease, Duration::from_secs(30));
        assert_eq!(c.relay.poll, c.poll_interval);
        for bad in [
            ["x", "--claim-batch", "0"],
            ["x", "--claim-batch", "513"],
            ["x", "--claim-concurrency", "0"],
            ["x", "--claim-concurrency", "17"],
            ["x", "--poll-ms", "1"],
            ["x", "--results-concurrency", "0"],
            ["x", "--relay-lease-secs", "0"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
        let cli = Cli::try_parse_from([
            "x",
            "--claim-batch",
            "8",
            "--tick-ms",
            "500",
            "--claim-concurrency",
            "3",
        ])
        .expect("parse");
        assert_eq!(cli.scheduler.config().claim_batch, 8);
        assert_eq!(cli.scheduler.config().claim_concurrency, 3);
        assert_eq!(
            cli.scheduler.config().tick_interval,
            Duration::from_millis(500)
        );
    }
}
