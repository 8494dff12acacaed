//! The gate-notifier's own settings (flags with environment fallbacks). The gate policy defaults
//! (`TANDEM_APPROVAL_GATE_DEFAULT_EXPIRES_AFTER_MS`, `TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY`,
//! `TANDEM_APPROVAL_GATE_STALE_AFTER_MS`) and the shutdown grace period are lifecycle settings
//! read and validated by the runtime (`tandem_core::config::LifecycleSettings`).

use std::time::Duration;

use clap::Args;
use tandem_runtime::RelaySettings;
use tandem_store::MAX_BATCH;

/// `tandem-gate-notifier` flags.
#[derive(Debug, Clone, Args)]
pub struct GateNotifierArgs {
    /// Due gates examined per transaction (1-500). A full batch that changed something is followed
    /// at once by the next.
    #[arg(
        long = "batch",
        env = "TANDEM_GATE_NOTIFIER_BATCH",
        default_value_t = 200,
        value_parser = clap::value_parser!(u16).range(1..=MAX_BATCH as i64)
    )]
    pub batch: u16,
    /// Longest sleep between passes, in milliseconds: a safety poll for when no wake-up arrives
    /// (each wait is jittered down by up to half). Otherwise the notifier sleeps until the
    /// earliest gate action is due, by the database clock.
    #[arg(
        long = "poll-ms",
        env = "TANDEM_GATE_NOTIFIER_POLL_MS",
        default_value_t = 2000,
        value_parser = clap::value_parser!(u64).range(10..=60_000)
    )]
    pub poll_ms: u64,
    /// How often this replica links new audit rows into the protected audit chain, in
    /// milliseconds (jittered down by up to half); 0 disables the chainer on this replica. Only
    /// one chainer links at a time fleet-wide (advisory lock), so running it on every replica is
    /// safe.
    #[arg(
        long = "audit-link-ms",
        env = "TANDEM_AUDIT_LINK_MS",
        default_value_t = 500,
        value_parser = clap::value_parser!(u64).range(0..=60_000)
    )]
    pub audit_link_ms: u64,
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

impl GateNotifierArgs {
    pub fn config(&self) -> GateNotifierConfig {
        GateNotifierConfig {
            batch: usize::from(self.batch),
            poll_interval: Duration::from_millis(self.poll_ms),
            audit_link_interval: (self.audit_link_ms > 0)
                .then(|| Duration::from_millis(self.audit_link_ms)),
            relay: RelaySettings {
                lease: Duration::from_secs(self.relay_lease_secs),
                ..RelaySettings::default()
            },
        }
    }
}

/// The gate-notifier's settings, as used by [`crate::GateNotifier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateNotifierConfig {
    /// Runs per `transition_batch` (at most `tandem_store::MAX_BATCH`).
    pub batch: usize,
    /// Longest sleep between passes (safety poll).
    pub poll_interval: Duration,
    /// Period of the audit chainer; `None`: this replica does not link.
    pub audit_link_interval: Option<Duration>,
    pub relay: RelaySettings,
}

impl Default for GateNotifierConfig {
    fn default() -> Self {
        Self {
            batch: 200,
            poll_interval: Duration::from_secs(2),
            audit_link_interval: Some(Duration::from_millis(500)),
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
        notifier: GateNotifierArgs,
    }

    #[test]
    fn defaults_and_bounds() {
        let cli = Cli::try_parse_from(["x"]).expect("defaults parse");
        let c = cli.notifier.config();
        assert_eq!(c, GateNotifierConfig::default());
        assert_eq!(c.batch, 200);
        assert_eq!(c.relay.lease, Duration::from_secs(30));
        for bad in [
            ["x", "--batch", "0"],
            ["x", "--batch", "501"],
            ["x", "--poll-ms", "5"],
            ["x", "--audit-link-ms", "60001"],
            ["x", "--relay-lease-secs", "0"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
        let cli = Cli::try_parse_from(["x", "--batch", "7", "--audit-link-ms", "0"]).expect("ok");
        let c = cli.notifier.config();
        assert_eq!(c.batch, 7);
        assert_eq!(c.audit_link_interval, None, "0 disables the chainer");
    }
}
