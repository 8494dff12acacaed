//! Configuration shared by every service: flags with environment fallbacks (clap `env`), so
//! `--help` documents every variable and its default.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, ValueEnum};
use tandem_bus::{NatsOptions, Prefix, StreamSettings};

/// Default PostgreSQL URL (no password: add one as `postgres://user:password@host/db`).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tandem";
/// Default address of the HTTP API (upstream's engine port).
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:39731";

/// Static facts about one binary.
#[derive(Debug, Clone, Copy)]
pub struct ServiceInfo {
    /// Binary name, e.g. `tandem-scheduler`; also the OTel service name and the Postgres
    /// `application_name`.
    pub name: &'static str,
    /// Port of the default health/metrics address `127.0.0.1:<port>`.
    pub default_health_port: u16,
    pub version: &'static str,
}

impl ServiceInfo {
    pub fn default_health_addr(&self) -> String {
        format!("127.0.0.1:{}", self.default_health_port)
    }
}

/// PostgreSQL connection.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, `postgres://user[:password]@host:port/db` (the password is optional).
    #[arg(
        long = "database-url",
        env = "TANDEM_DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        hide_env_values = true
    )]
    pub database_url: String,
    /// Most PostgreSQL connections this process opens. Each holds its own buffers and a server
    /// backend; the default suits a scheduler's loops (claims, result transactions, relay).
    #[arg(
        long = "database-pool-size",
        env = "TANDEM_DATABASE_POOL_SIZE",
        default_value_t = tandem_store::DEFAULT_POOL_SIZE,
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub database_pool_size: u16,
}

/// NATS connection, JetStream streams and the subject prefix.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL (or a comma-separated list).
    #[arg(
        long = "nats-url",
        env = "TANDEM_NATS_URL",
        default_value = tandem_bus::DEFAULT_NATS_URL,
        hide_env_values = true
    )]
    pub nats_url: String,
    /// NATS user (with --nats-password).
    #[arg(long = "nats-user", env = "TANDEM_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(
        long = "nats-password",
        env = "TANDEM_NATS_PASSWORD",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(long = "nats-token", env = "TANDEM_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials file (JWT + nkey seed).
    #[arg(long = "nats-creds", env = "TANDEM_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// NATS nkey seed.
    #[arg(long = "nats-nkey", env = "TANDEM_NATS_NKEY", hide_env_values = true)]
    pub nats_nkey: Option<String>,
    /// PEM file of root certificates for the NATS server's TLS certificate.
    #[arg(long = "nats-tls-ca", env = "TANDEM_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --nats-tls-key).
    #[arg(long = "nats-tls-cert", env = "TANDEM_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM client key for mutual TLS (with --nats-tls-cert).
    #[arg(long = "nats-tls-key", env = "TANDEM_NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
    /// Require TLS to the NATS server (true/false, 1/0, yes/no).
    #[arg(
        long = "nats-tls-required",
        env = "TANDEM_NATS_TLS_REQUIRED",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub nats_tls_required: bool,
    /// Prefix of every subject and stream name (empty: `tandem.*` subjects, `TANDEM_*` streams;
    /// `t1`: `t1.tandem.*` subjects, `T1_TANDEM_*` streams).
    #[arg(long = "nats-prefix", env = "TANDEM_NATS_PREFIX", default_value = "")]
    pub nats_prefix: Prefix,
    /// Age after which events leave the TANDEM_EVENTS stream, in seconds.
    #[arg(
        long = "events-max-age-secs",
        env = "TANDEM_EVENTS_MAX_AGE_SECS",
        default_value_t = 604_800
    )]
    pub events_max_age_secs: u64,
    /// JetStream duplicate window (Nats-Msg-Id dedupe) of every stream, in seconds; at most
    /// TANDEM_EVENTS_MAX_AGE_SECS.
    #[arg(
        long = "nats-duplicate-window-secs",
        env = "TANDEM_NATS_DUPLICATE_WINDOW_SECS",
        default_value_t = 120
    )]
    pub nats_duplicate_window_secs: u64,
    /// Replicas of each stream in a clustered NATS (1-5).
    #[arg(
        long = "nats-stream-replicas",
        env = "TANDEM_NATS_STREAM_REPLICAS",
        default_value_t = 1
    )]
    pub nats_stream_replicas: usize,
}

impl NatsArgs {
    pub fn options(&self) -> NatsOptions {
        NatsOptions {
            url: self.nats_url.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            creds_file: self.nats_creds.clone(),
            nkey_seed: self.nats_nkey.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            tls_required: self.nats_tls_required,
        }
    }

    pub fn stream_settings(&self) -> StreamSettings {
        StreamSettings {
            events_max_age: Duration::from_secs(self.events_max_age_secs),
            duplicate_window: Duration::from_secs(self.nats_duplicate_window_secs),
            replicas: self.nats_stream_replicas,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs, traces and the health/metrics endpoint.
#[derive(Debug, Clone, Args)]
pub struct ObservabilityArgs {
    /// Listen address of /healthz, /readyz and /metrics [default: 127.0.0.1 and a port per
    /// service].
    #[arg(long = "health-addr", env = "TANDEM_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
    /// Log format on stderr (filter with RUST_LOG, e.g. `info,tandem=debug`).
    #[arg(
        long = "log-format",
        env = "TANDEM_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint for traces (e.g. http://127.0.0.1:4317); unset: no trace export.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Everything a long-running service reads, flattened into each binary's own `Parser`.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
}

impl CommonArgs {
    /// The health address, or the service's default.
    pub fn health_addr(&self, info: &ServiceInfo) -> SocketAddr {
        self.observability
            .health_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], info.default_health_port)))
    }
}

/// Parses the command line (and environment) of a service binary, showing the service's own
/// default health address in `--help`. Exits with clap's message and code 2 on bad input, like
/// `Parser::parse`.
pub fn parse_cli<T: Parser>(info: &ServiceInfo) -> T {
    let default_addr = info.default_health_addr();
    let command = T::command()
        .name(info.name)
        .version(info.version)
        .mut_arg("health_addr", |a| {
            a.help(format!(
                "Listen address of /healthz, /readyz and /metrics [default: {default_addr}]"
            ))
        });
    let mut matches = command.get_matches();
    match T::from_arg_matches_mut(&mut matches) {
        Ok(v) => v,
        Err(e) => e.format(&mut T::command()).exit(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }

    const INFO: ServiceInfo = ServiceInfo {
        name: "tandem-test",
        default_health_port: 39799,
        version: "0",
    };

    #[test]
    fn command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["x"]).expect("defaults parse");
        // The environment of the test runner may set these; only check what it cannot.
        assert_eq!(
            cli.common.health_addr(&INFO).to_string(),
            std::env::var("TANDEM_HEALTH_ADDR").unwrap_or_else(|_| "127.0.0.1:39799".into())
        );
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "x",
            "--database-url",
            "postgres://u:p@db:5432/t",
            "--nats-url",
            "nats://n:4222",
            "--nats-prefix",
            "t_ab12",
            "--nats-tls-required",
            "--health-addr",
            "0.0.0.0:9000",
            "--log-format",
            "json",
            "--database-pool-size",
            "4",
        ])
        .expect("parse");
        assert_eq!(cli.common.database.database_pool_size, 4);
        assert_eq!(cli.common.database.database_url, "postgres://u:p@db:5432/t");
        assert_eq!(cli.common.nats.nats_prefix.as_str(), "t_ab12");
        assert!(cli.common.nats.options().tls_required);
        assert_eq!(cli.common.observability.log_format, LogFormat::Json);
        assert_eq!(cli.common.health_addr(&INFO).to_string(), "0.0.0.0:9000");
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Cli::try_parse_from(["x", "--nats-prefix", "A.B"]).is_err());
        assert!(Cli::try_parse_from(["x", "--health-addr", "nowhere"]).is_err());
        assert!(Cli::try_parse_from(["x", "--log-format", "xml"]).is_err());
        assert!(Cli::try_parse_from(["x", "--nats-tls-required", "maybe"]).is_err());
        assert!(Cli::try_parse_from(["x", "--database-pool-size", "0"]).is_err());
    }
}
