//! The sweeper's own settings (flags with environment fallbacks).
//!
//! The upstream variables the sweeper acts on are lifecycle settings read and validated by the
//! runtime (`tandem_core::config::LifecycleSettings`), with upstream names and defaults:
//! `TANDEM_STALE_RUNNING_RUN_MS` (reaper base threshold, 600 000), `TANDEM_STALE_AUTO_RESUME_WINDOW_MS`
//! (1 200 000), `TANDEM_STALE_AUTO_RESUME_MAX_ATTEMPTS` (2), `TANDEM_DISABLE_STALE_AUTO_RESUME`
//! (presence disables the stale auto-resume only, see docs/compatibility.md §7.6) and
//! `TANDEM_AUTOMATION_V2_RUNS_RETENTION_DAYS` (7; 0 prunes terminal runs on the next pass, as
//! upstream's archiver archives them at once). Only the sweeper acts on them.
//!
//! The variables below are new (`TANDEM_SWEEPER_*`, `TANDEM_OUTBOX_RETENTION_SECS`): how often
//! each duty runs on this replica, which duties it runs, batch sizes and the outbox horizon.

use std::{fmt, str::FromStr, time::Duration};

use clap::Args;
use tandem_runtime::RelaySettings;
use tandem_store::MAX_BATCH;

/// Default runs per transaction: short lock hold times, few round trips.
pub const DEFAULT_BATCH: u16 = 100;

/// One of the sweeper's duties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Duty {
    /// Stale reaper (spec §3.7).
    Reap,
    /// Auto-resume of stale-reaped and guardrail-stopped runs (spec §3.8, §3.9).
    Resume,
    /// Stuck `pausing` runs and settled-but-unapplied gate decisions (spec §3.6, §4.5).
    Recover,
    /// Heavy data of old terminal runs, published outbox rows.
    Retention,
    /// Weekly spend caps (spec §3.5) and the spend-cap hard stop.
    Spend,
}

impl Duty {
    pub const ALL: [Duty; 5] = [
        Duty::Reap,
        Duty::Resume,
        Duty::Recover,
        Duty::Retention,
        Duty::Spend,
    ];

    /// The duty's name in flags and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Duty::Reap => "reap",
            Duty::Resume => "resume",
            Duty::Recover => "recover",
            Duty::Retention => "retention",
            Duty::Spend => "spend",
        }
    }
}

impl fmt::Display for Duty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The duties a replica runs (`TANDEM_SWEEPER_DUTIES`: `all`, or a comma-separated list of
/// `reap`, `resume`, `recover`, `retention`, `spend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DutySet([bool; 5]);

impl DutySet {
    pub fn all() -> Self {
        Self([true; 5])
    }

    pub fn only(duties: &[Duty]) -> Self {
        let mut s = [false; 5];
        for d in duties {
            s[*d as usize] = true;
        }
        Self(s)
    }

    pub fn contains(&self, duty: Duty) -> bool {
        self.0[duty as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = Duty> + '_ {
        Duty::ALL.into_iter().filter(|d| self.contains(*d))
    }
}

impl FromStr for DutySet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(Self::all());
        }
        let mut duties = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let d = Duty::ALL
                .into_iter()
                .find(|d| d.as_str().eq_ignore_ascii_case(part))
                .ok_or_else(|| {
                    format!(
                        "unknown duty {part:?}: expected `all` or a comma-separated list of \
                         reap, resume, recover, retention, spend"
                    )
                })?;
            duties.push(d);
        }
        if duties.is_empty() {
            return Err("no duty given: expected `all` or a comma-separated list of reap, resume, recover, retention, spend".into());
        }
        Ok(Self::only(&duties))
    }
}

/// `tandem-sweeper` flags.
#[derive(Debug, Clone, Args)]
pub struct SweeperArgs {
    /// Duties this replica runs: `all`, or a comma-separated list of reap, resume, recover,
    /// retention, spend.
    #[arg(
        long = "duties",
        env = "TANDEM_SWEEPER_DUTIES",
        default_value = "all",
        value_parser = clap::value_parser!(DutySet)
    )]
    pub duties: DutySet,
    /// Runs per transaction (1 to the store's largest batch); a pass walks its candidates page
    /// by page, one short transaction per page.
    #[arg(
        long = "batch",
        env = "TANDEM_SWEEPER_BATCH",
        default_value_t = DEFAULT_BATCH,
        value_parser = clap::value_parser!(u16).range(1..=MAX_BATCH as i64)
    )]
    pub batch: u16,
    /// Period of the stale reaper, in milliseconds (each wait is jittered down by up to half).
    #[arg(
        long = "reap-interval-ms",
        env = "TANDEM_SWEEPER_REAP_INTERVAL_MS",
        default_value_t = 5_000,
        value_parser = clap::value_parser!(u64).range(50..=3_600_000)
    )]
    pub reap_interval_ms: u64,
    /// Period of the auto-resume pass, in milliseconds (jittered down by up to half).
    #[arg(
        long = "resume-interval-ms",
        env = "TANDEM_SWEEPER_RESUME_INTERVAL_MS",
        default_value_t = 5_000,
        value_parser = clap::value_parser!(u64).range(50..=3_600_000)
    )]
    pub resume_interval_ms: u64,
    /// Period of the recovery pass (stuck pausing runs, settled gate decisions), in milliseconds
    /// (jittered down by up to half).
    #[arg(
        long = "recover-interval-ms",
        env = "TANDEM_SWEEPER_RECOVER_INTERVAL_MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(50..=3_600_000)
    )]
    pub recover_interval_ms: u64,
    /// Period of the retention pass, in milliseconds (jittered down by up to half).
    #[arg(
        long = "retention-interval-ms",
        env = "TANDEM_SWEEPER_RETENTION_INTERVAL_MS",
        default_value_t = 60_000,
        value_parser = clap::value_parser!(u64).range(50..=86_400_000)
    )]
    pub retention_interval_ms: u64,
    /// Period of the weekly spend-cap evaluation, in milliseconds (jittered down by up to half).
    #[arg(
        long = "spend-interval-ms",
        env = "TANDEM_SWEEPER_SPEND_INTERVAL_MS",
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(50..=86_400_000)
    )]
    pub spend_interval_ms: u64,
    /// Published outbox rows older than this many seconds are deleted by the retention pass
    /// (0: as soon as they are published).
    #[arg(
        long = "outbox-retention-secs",
        env = "TANDEM_OUTBOX_RETENTION_SECS",
        default_value_t = 86_400,
        value_parser = clap::value_parser!(u64).range(0..=31_536_000)
    )]
    pub outbox_retention_secs: u64,
    /// A terminal run's node output or attempt verdict whose JSON is larger than this many bytes
    /// is replaced by a stub once the run is past retention (64 B to 16 MiB).
    #[arg(
        long = "retention-value-bytes",
        env = "TANDEM_SWEEPER_RETENTION_VALUE_BYTES",
        default_value_t = 1024,
        value_parser = clap::value_parser!(u64).range(64..=16_777_216)
    )]
    pub retention_value_bytes: u64,
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

impl SweeperArgs {
    pub fn config(&self) -> SweeperConfig {
        SweeperConfig {
            duties: self.duties,
            batch: usize::from(self.batch),
            reap_interval: Duration::from_millis(self.reap_interval_ms),
            resume_interval: Duration::from_millis(self.resume_interval_ms),
            recover_interval: Duration::from_millis(self.recover_interval_ms),
            retention_interval: Duration::from_millis(self.retention_interval_ms),
            spend_interval: Duration::from_millis(self.spend_interval_ms),
            outbox_retention: Duration::from_secs(self.outbox_retention_secs),
            retention_value_bytes: usize::try_from(self.retention_value_bytes)
                .unwrap_or(usize::MAX),
            relay: RelaySettings {
                lease: Duration::from_secs(self.relay_lease_secs),
                ..RelaySettings::default()
            },
        }
    }
}

/// The sweeper's settings, as used by [`crate::Sweeper`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweeperConfig {
    pub duties: DutySet,
    /// Runs per transaction (at most `tandem_store::MAX_BATCH`).
    pub batch: usize,
    pub reap_interval: Duration,
    pub resume_interval: Duration,
    pub recover_interval: Duration,
    pub retention_interval: Duration,
    pub spend_interval: Duration,
    pub outbox_retention: Duration,
    pub retention_value_bytes: usize,
    pub relay: RelaySettings,
}

impl SweeperConfig {
    /// The period of `duty`.
    pub fn interval(&self, duty: Duty) -> Duration {
        match duty {
            Duty::Reap => self.reap_interval,
            Duty::Resume => self.resume_interval,
            Duty::Recover => self.recover_interval,
            Duty::Retention => self.retention_interval,
            Duty::Spend => self.spend_interval,
        }
    }
}

impl Default for SweeperConfig {
    fn default() -> Self {
        Self {
            duties: DutySet::all(),
            batch: usize::from(DEFAULT_BATCH),
            reap_interval: Duration::from_secs(5),
            resume_interval: Duration::from_secs(5),
            recover_interval: Duration::from_secs(10),
            retention_interval: Duration::from_secs(60),
            spend_interval: Duration::from_secs(30),
            outbox_retention: Duration::from_secs(86_400),
            retention_value_bytes: 1024,
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
        sweeper: SweeperArgs,
    }

    #[test]
    fn defaults_and_bounds() {
        let cli = Cli::try_parse_from(["x"]).expect("defaults parse");
        assert_eq!(cli.sweeper.config(), SweeperConfig::default());
        for bad in [
            ["x", "--batch", "0"],
            ["x", "--batch", "100000"],
            ["x", "--reap-interval-ms", "10"],
            ["x", "--duties", "reap,explode"],
            ["x", "--duties", ","],
            ["x", "--retention-value-bytes", "1"],
            ["x", "--relay-lease-secs", "0"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
        let above = (MAX_BATCH + 1).to_string();
        assert!(Cli::try_parse_from(["x", "--batch", above.as_str()]).is_err());
        let cli =
            Cli::try_parse_from(["x", "--duties", " Reap, spend ", "--batch", "7"]).expect("parse");
        let c = cli.sweeper.config();
        assert_eq!(c.batch, 7);
        assert_eq!(
            c.duties.iter().collect::<Vec<_>>(),
            vec![Duty::Reap, Duty::Spend]
        );
        assert!(!c.duties.contains(Duty::Retention));
        assert_eq!(c.interval(Duty::Spend), Duration::from_secs(30));
    }
}
