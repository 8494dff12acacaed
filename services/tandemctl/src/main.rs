//! `tandemctl`: the operator CLI.
//!
//! For now: `tandemctl migrate` (applies the embedded migrations, creating the database if it
//! does not exist) and `tandemctl schema` (prints the schema status). Commands over the HTTP API
//! arrive with the API issue.

use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tandem_runtime::{DatabaseArgs, LogFormat, backoff::Backoff};
use tandem_store::{Pool, StoreError};

/// Operator CLI for Tandem Fleet.
#[derive(Debug, Parser)]
#[command(name = "tandemctl", version)]
struct Cli {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Log format on stderr (filter with RUST_LOG; default: warnings only).
    #[arg(
        long = "log-format",
        env = "TANDEM_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the pending database migrations (creates the database first if it is missing).
    Migrate {
        /// How long to wait for PostgreSQL to accept connections, in seconds.
        #[arg(long = "wait-secs", default_value_t = 30)]
        wait_secs: u64,
    },
    /// Print the database schema version and whether this build can run against it.
    Schema,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = match tandem_runtime::telemetry::init("tandemctl", cli.log_format, None, "warn")
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tandemctl: error: {e}");
            return ExitCode::from(tandem_runtime::EXIT_CONFIG);
        }
    };
    let result = match cli.command {
        Command::Migrate { wait_secs } => {
            migrate(&cli.database.database_url, Duration::from_secs(wait_secs)).await
        }
        Command::Schema => schema(&cli.database.database_url).await,
    };
    telemetry.shutdown().await;
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandemctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pool(url: &str) -> anyhow::Result<Pool> {
    tandem_store::connect(url, "tandemctl").context("TANDEM_DATABASE_URL")
}

fn is_missing_database(e: &StoreError) -> bool {
    matches!(e, StoreError::Db(db) if db.as_db_error().is_some_and(|d| d.code().code() == "3D000"))
}

fn is_connection_problem(e: &StoreError) -> bool {
    match e {
        StoreError::Pool(_) => true,
        StoreError::Db(db) => db.as_db_error().is_none() || db.is_closed(),
        _ => false,
    }
}

async fn migrate(url: &str, wait: Duration) -> anyhow::Result<ExitCode> {
    let pool = pool(url)?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut backoff = Backoff::default();
    let mut created = false;
    let report = loop {
        match tandem_store::migrate(&pool).await {
            Ok(report) => break report,
            Err(e) if is_missing_database(&e) && !created => {
                create_database(url).await?;
                created = true;
            }
            Err(e) if is_connection_problem(&e) && tokio::time::Instant::now() < deadline => {
                let delay = backoff.next_delay();
                eprintln!(
                    "tandemctl: PostgreSQL at {} not available ({e}); retrying in {} ms",
                    tandem_bus::redact_url(url),
                    delay.as_millis()
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("migrating {}", tandem_bus::redact_url(url)));
            }
        }
    };
    if report.applied.is_empty() {
        println!("nothing to apply: schema is at version {}", report.version);
    } else {
        for v in &report.applied {
            let name = tandem_store::MIGRATIONS
                .iter()
                .find(|m| m.version == *v)
                .map_or("?", |m| m.name);
            println!("applied V{v}__{name}");
        }
        println!("schema is at version {}", report.version);
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates the database named in `url` by connecting to the `postgres` maintenance database.
async fn create_database(url: &str) -> anyhow::Result<()> {
    let config: tokio_postgres::Config = url.parse().context("TANDEM_DATABASE_URL")?;
    let name = config
        .get_dbname()
        .map(str::to_owned)
        .or_else(|| config.get_user().map(str::to_owned))
        .context("TANDEM_DATABASE_URL names no database")?;
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, connection) = admin
        .connect(tokio_postgres::NoTls)
        .await
        .context("connecting to the `postgres` database to create the missing database")?;
    let conn = tokio::spawn(connection);
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let created = match client
        .batch_execute(&format!("CREATE DATABASE {quoted}"))
        .await
    {
        Ok(()) => true,
        // 42P04 duplicate_database: someone else created it meanwhile.
        Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42P04") => false,
        Err(e) => return Err(e).with_context(|| format!("CREATE DATABASE {quoted}")),
    };
    drop(client);
    let _ = conn.await;
    if created {
        println!("created database {name}");
    }
    Ok(())
}

async fn schema(url: &str) -> anyhow::Result<ExitCode> {
    let pool = pool(url)?;
    let needed = tandem_store::latest_version();
    println!("database: {}", tandem_bus::redact_url(url));
    let version = match tandem_store::schema_version(&pool).await {
        Ok(v) => v,
        Err(e) if is_missing_database(&e) => {
            println!("status: the database does not exist: run `tandemctl migrate`");
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading the schema of {}", tandem_bus::redact_url(url)));
        }
    };
    println!("schema version: {version}");
    println!("this build needs: {needed}");
    match tandem_store::check_schema(&pool).await {
        Ok(()) => {
            println!("status: current");
            Ok(ExitCode::SUCCESS)
        }
        Err(StoreError::Schema(msg)) => {
            println!("status: {msg}");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e).context("checking the schema"),
    }
}
