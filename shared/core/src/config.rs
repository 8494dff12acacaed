//! Lifecycle settings read from the environment, with upstream names and defaults (spec
//! Appendix A). Parsing is pure: it takes a lookup function, so it is tested without touching the
//! process environment.
//!
//! Upstream silently falls back to the default on an unparsable value; we refuse to start and
//! name the variable instead (docs/compatibility.md).

use crate::model::AutomationGateExpiryAction;

pub const DEFAULT_APPROVAL_GATE_EXPIRES_AFTER_MS: u64 = 604_800_000;
pub const DEFAULT_APPROVAL_GATE_STALE_AFTER_MS: u64 = 86_400_000;
pub const DEFAULT_STALE_AUTO_RESUME_WINDOW_MS: u64 = 1_200_000;
pub const DEFAULT_STALE_AUTO_RESUME_MAX_ATTEMPTS: u32 = 2;
pub const STALE_RUNNING_AUTOMATION_RUN_MS: u64 = 600_000;
pub const AUTOMATION_STALE_NODE_TIMEOUT_GRACE_MS: u64 = 60_000;
/// Used when a node has no positive `timeout_ms`.
pub const DEFAULT_NODE_TIMEOUT_MS: u64 = 600_000;
pub const DEFAULT_SCHEDULER_MAX_CONCURRENT_RUNS: u32 = 8;
pub const DEFAULT_SCHEDULER_SHUTDOWN_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_RUNS_RETENTION_DAYS: u64 = 7;

/// A setting whose value cannot be used. The message names the variable and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}={value:?}: expected {expected}")]
pub struct ConfigError {
    pub var: String,
    pub value: String,
    pub expected: String,
}

/// Gate policy defaults (spec §1.10, §3.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatePolicyDefaults {
    /// `TANDEM_APPROVAL_GATE_DEFAULT_EXPIRES_AFTER_MS`; `None` when set to 0 (no default expiry).
    pub expires_after_ms: Option<u64>,
    /// `TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY`.
    pub on_expiry: AutomationGateExpiryAction,
    /// `TANDEM_APPROVAL_GATE_STALE_AFTER_MS`.
    pub stale_after_ms: u64,
}

impl Default for GatePolicyDefaults {
    fn default() -> Self {
        Self {
            expires_after_ms: Some(DEFAULT_APPROVAL_GATE_EXPIRES_AFTER_MS),
            on_expiry: AutomationGateExpiryAction::Cancel,
            stale_after_ms: DEFAULT_APPROVAL_GATE_STALE_AFTER_MS,
        }
    }
}

/// Stale reaper and auto-resume settings (spec §3.7, §3.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleSettings {
    /// `TANDEM_STALE_RUNNING_RUN_MS` (upstream hard-codes 600 000).
    pub stale_running_ms: u64,
    /// `TANDEM_STALE_AUTO_RESUME_WINDOW_MS`.
    pub auto_resume_window_ms: u64,
    /// `TANDEM_STALE_AUTO_RESUME_MAX_ATTEMPTS`.
    pub auto_resume_max_attempts: u32,
    /// `TANDEM_DISABLE_STALE_AUTO_RESUME` present (any value). Disables only the stale path.
    pub stale_auto_resume_disabled: bool,
}

impl Default for StaleSettings {
    fn default() -> Self {
        Self {
            stale_running_ms: STALE_RUNNING_AUTOMATION_RUN_MS,
            auto_resume_window_ms: DEFAULT_STALE_AUTO_RESUME_WINDOW_MS,
            auto_resume_max_attempts: DEFAULT_STALE_AUTO_RESUME_MAX_ATTEMPTS,
            stale_auto_resume_disabled: false,
        }
    }
}

/// Every lifecycle setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecycleSettings {
    pub gates: GatePolicyDefaults,
    pub stale: StaleSettings,
    /// `TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS`, fleet-wide.
    pub max_concurrent_runs: u32,
    /// `TANDEM_SCHEDULER_SHUTDOWN_TIMEOUT_SECS`.
    pub shutdown_timeout_secs: u64,
    /// `TANDEM_AUTOMATION_V2_RUNS_RETENTION_DAYS`.
    pub retention_days: u64,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        Self {
            gates: GatePolicyDefaults::default(),
            stale: StaleSettings::default(),
            max_concurrent_runs: DEFAULT_SCHEDULER_MAX_CONCURRENT_RUNS,
            shutdown_timeout_secs: DEFAULT_SCHEDULER_SHUTDOWN_TIMEOUT_SECS,
            retention_days: DEFAULT_RUNS_RETENTION_DAYS,
        }
    }
}

fn invalid(var: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError {
        var: var.into(),
        value: value.into(),
        expected: expected.into(),
    }
}

fn parse_u64(
    lookup: &impl Fn(&str) -> Option<String>,
    var: &str,
    default: u64,
    allow_zero: bool,
) -> Result<u64, ConfigError> {
    let Some(raw) = lookup(var) else {
        return Ok(default);
    };
    let expected = if allow_zero {
        "a whole number of milliseconds (0 or more)"
    } else {
        "a whole number greater than 0"
    };
    match raw.trim().parse::<u64>() {
        Ok(0) if !allow_zero => Err(invalid(var, &raw, expected)),
        Ok(v) => Ok(v),
        Err(_) => Err(invalid(var, &raw, expected)),
    }
}

impl LifecycleSettings {
    /// Reads every setting through `lookup` (normally `std::env::var(..).ok()`).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let d = Self::default();
        let expires = parse_u64(
            &lookup,
            "TANDEM_APPROVAL_GATE_DEFAULT_EXPIRES_AFTER_MS",
            DEFAULT_APPROVAL_GATE_EXPIRES_AFTER_MS,
            true,
        )?;
        let on_expiry = match lookup("TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY") {
            None => d.gates.on_expiry,
            Some(raw) => AutomationGateExpiryAction::parse_lenient(&raw).ok_or_else(|| {
                invalid(
                    "TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY",
                    &raw,
                    "one of cancel, escalate, remind",
                )
            })?,
        };
        let max_attempts = parse_u64(
            &lookup,
            "TANDEM_STALE_AUTO_RESUME_MAX_ATTEMPTS",
            u64::from(DEFAULT_STALE_AUTO_RESUME_MAX_ATTEMPTS),
            false,
        )?;
        let max_runs = parse_u64(
            &lookup,
            "TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS",
            u64::from(DEFAULT_SCHEDULER_MAX_CONCURRENT_RUNS),
            false,
        )?;
        let too_big = |var: &str, v: u64| -> Result<u32, ConfigError> {
            u32::try_from(v).map_err(|_| invalid(var, &v.to_string(), "a number below 2^32"))
        };
        Ok(Self {
            gates: GatePolicyDefaults {
                expires_after_ms: (expires > 0).then_some(expires),
                on_expiry,
                stale_after_ms: parse_u64(
                    &lookup,
                    "TANDEM_APPROVAL_GATE_STALE_AFTER_MS",
                    DEFAULT_APPROVAL_GATE_STALE_AFTER_MS,
                    false,
                )?,
            },
            stale: StaleSettings {
                stale_running_ms: parse_u64(
                    &lookup,
                    "TANDEM_STALE_RUNNING_RUN_MS",
                    STALE_RUNNING_AUTOMATION_RUN_MS,
                    false,
                )?,
                auto_resume_window_ms: parse_u64(
                    &lookup,
                    "TANDEM_STALE_AUTO_RESUME_WINDOW_MS",
                    DEFAULT_STALE_AUTO_RESUME_WINDOW_MS,
                    false,
                )?,
                auto_resume_max_attempts: too_big(
                    "TANDEM_STALE_AUTO_RESUME_MAX_ATTEMPTS",
                    max_attempts,
                )?,
                stale_auto_resume_disabled: lookup("TANDEM_DISABLE_STALE_AUTO_RESUME").is_some(),
            },
            max_concurrent_runs: too_big("TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS", max_runs)?,
            shutdown_timeout_secs: parse_u64(
                &lookup,
                "TANDEM_SCHEDULER_SHUTDOWN_TIMEOUT_SECS",
                DEFAULT_SCHEDULER_SHUTDOWN_TIMEOUT_SECS,
                false,
            )?,
            retention_days: parse_u64(
                &lookup,
                "TANDEM_AUTOMATION_V2_RUNS_RETENTION_DAYS",
                DEFAULT_RUNS_RETENTION_DAYS,
                true,
            )?,
        })
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<LifecycleSettings, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        LifecycleSettings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_upstream_constants() {
        let s = settings(&[]).expect("defaults");
        assert_eq!(s.gates.expires_after_ms, Some(604_800_000));
        assert_eq!(s.gates.on_expiry, AutomationGateExpiryAction::Cancel);
        assert_eq!(s.gates.stale_after_ms, 86_400_000);
        assert_eq!(s.stale.auto_resume_window_ms, 1_200_000);
        assert_eq!(s.stale.auto_resume_max_attempts, 2);
        assert_eq!(s.stale.stale_running_ms, 600_000);
        assert!(!s.stale.stale_auto_resume_disabled);
        assert_eq!(s.max_concurrent_runs, 8);
        assert_eq!(s.shutdown_timeout_secs, 30);
        assert_eq!(s.retention_days, 7);
    }

    #[test]
    fn default_gate_policy_env_vars_are_read() {
        let s = settings(&[
            ("TANDEM_APPROVAL_GATE_DEFAULT_EXPIRES_AFTER_MS", " 5000 "),
            ("TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY", " Remind "),
        ])
        .expect("valid");
        assert_eq!(s.gates.expires_after_ms, Some(5000));
        assert_eq!(s.gates.on_expiry, AutomationGateExpiryAction::Remind);
        let s = settings(&[("TANDEM_APPROVAL_GATE_DEFAULT_EXPIRES_AFTER_MS", "0")]).expect("0");
        assert_eq!(s.gates.expires_after_ms, None, "0 means no default expiry");
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let e = settings(&[("TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY", "explode")])
            .expect_err("invalid value");
        assert_eq!(e.var, "TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY");
        assert!(
            e.to_string()
                .contains("TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY")
        );
        let e = settings(&[("TANDEM_APPROVAL_GATE_DEFAULT_EXPIRES_AFTER_MS", "7d")])
            .expect_err("invalid value");
        assert_eq!(e.var, "TANDEM_APPROVAL_GATE_DEFAULT_EXPIRES_AFTER_MS");
        let e =
            settings(&[("TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS", "0")]).expect_err("invalid value");
        assert_eq!(e.var, "TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS");
        let e =
            settings(&[("TANDEM_STALE_AUTO_RESUME_WINDOW_MS", "-1")]).expect_err("invalid value");
        assert_eq!(e.var, "TANDEM_STALE_AUTO_RESUME_WINDOW_MS");
    }

    #[test]
    fn kill_switch_is_presence_based() {
        let s = settings(&[("TANDEM_DISABLE_STALE_AUTO_RESUME", "")]).expect("valid");
        assert!(s.stale.stale_auto_resume_disabled);
        let s = settings(&[("TANDEM_DISABLE_STALE_AUTO_RESUME", "false")]).expect("valid");
        assert!(s.stale.stale_auto_resume_disabled, "any value, as upstream");
    }
}
