//! `tandemctl`: the operator CLI.
//!
//! * `migrate`, `schema`: the database (direct connection, `TANDEM_DATABASE_URL`).
//! * Over the HTTP API (`TANDEM_API_URL`, default `http://127.0.0.1:39731`, with
//!   `TANDEM_API_TOKEN`): `automations apply -f spec.(json|yaml)|list|run`,
//!   `runs list|get|watch|pause|resume|cancel|recover|task`, `gates pending|approve|rework|cancel`,
//!   `audit verify`, `tokens create`.
//! * Over NATS (`TANDEM_NATS_URL`, `TANDEM_NATS_PREFIX`): `events tail`.
//! * `up`: the whole fleet locally with a demo (see `up.rs`).

mod http;
mod ops;
mod up;

use std::{path::PathBuf, process::ExitCode, time::Duration};

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
    /// Base URL of the Tandem API.
    #[arg(
        long = "api-url",
        env = "TANDEM_API_URL",
        default_value = "http://127.0.0.1:39731",
        global = true
    )]
    api_url: String,
    /// API token (the admin `TANDEM_API_TOKEN` or a tenant token).
    #[arg(
        long = "token",
        env = "TANDEM_API_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Automations {
    /// Create or replace the automations of a `.json`, `.yaml` or `.yml` file (one spec, a list,
    /// or `{automations: [...]}`).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List automations.
    List,
    /// Start a run now (prints the run id).
    Run {
        automation_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Runs {
    /// Newest runs as a table.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long = "automation")]
        automation: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// The full run record as JSON.
    Get { run_id: String },
    /// A live table of the newest runs, refreshed until Ctrl-C.
    Watch {
        #[arg(long = "every-ms", default_value_t = 2000)]
        every_ms: u64,
        #[arg(long, default_value_t = 30)]
        limit: usize,
    },
    Pause {
        run_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Resume {
        run_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Cancel {
        run_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Recover {
        run_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// `retry`, `requeue` or `continue` a node of a run.
    Task {
        run_id: String,
        node_id: String,
        #[arg(value_parser = ["retry", "requeue", "continue"])]
        action: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Gates {
    /// Pending approvals as a table.
    Pending,
    Approve {
        run_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Rework {
        run_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Cancel {
        run_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Audit {
    /// Link pending records and verify the whole hash chain (exit 1 when broken).
    Verify,
}

#[derive(Debug, Subcommand)]
enum Fleet {
    /// Whole-fleet stop: fail every running run with upstream's shutdown strings (stop kind
    /// `shutdown`) and cancel their tasks. Stopping one replica never does this.
    FailRunningRuns {
        /// Required: confirms that every running run of the fleet is to fail.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum Events {
    /// Print gate and run events as they are published (live; Ctrl-C to stop).
    Tail {
        #[command(flatten)]
        nats: tandem_runtime::NatsArgs,
        /// Only lines containing this text.
        #[arg(long)]
        grep: Option<String>,
        /// Raw JSON instead of one line per event.
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum Tokens {
    /// Create a tenant-bound token (admin token needed); prints it once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        org: String,
        #[arg(long)]
        workspace: String,
        #[arg(long, value_parser = ["human", "agent", "system"], default_value = "human")]
        kind: String,
        #[arg(long)]
        actor: Option<String>,
        /// Verified reviewer authority for governed gates.
        #[arg(long)]
        reviewer: bool,
        /// May act on every automation of the tenant (not only those the actor created).
        #[arg(long)]
        tenant_admin: bool,
    },
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
    /// Automations over the API.
    #[command(subcommand)]
    Automations(Automations),
    /// Runs over the API.
    #[command(subcommand)]
    Runs(Runs),
    /// Approval gates over the API.
    #[command(subcommand)]
    Gates(Gates),
    /// The protected audit log.
    #[command(subcommand)]
    Audit(Audit),
    /// Events on NATS.
    #[command(subcommand)]
    Events(Events),
    /// API tokens.
    #[command(subcommand)]
    Tokens(Tokens),
    /// Whole-fleet operator actions.
    #[command(subcommand)]
    Fleet(Fleet),
    /// Run the whole fleet locally with a demo, until Ctrl-C (starts PostgreSQL and NATS when
    /// needed, installing them with apt-get when missing).
    Up(Box<up::UpArgs>),
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
        Command::Events(Events::Tail {
            nats,
            grep,
            json,
            count,
        }) => ops::events_tail(&nats, grep.as_deref(), json, count)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Up(args) => up::up(*args, &cli.database.database_url, cli.token.clone())
            .await
            .map(|ok| {
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }),
        other => match http::Api::new(&cli.api_url, cli.token.clone()) {
            Ok(api) => api_command(&api, other).await,
            Err(e) => Err(e),
        },
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

async fn api_command(api: &http::Api, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Automations(a) => match a {
            Automations::Apply { file } => ops::apply(api, &file).await?,
            Automations::List => ops::automations_list(api).await?,
            Automations::Run {
                automation_id,
                reason,
            } => println!(
                "{}",
                ops::run_now(api, &automation_id, reason.as_deref()).await?
            ),
        },
        Command::Runs(r) => match r {
            Runs::List {
                status,
                automation,
                limit,
            } => ops::runs_list(api, status.as_deref(), automation.as_deref(), limit).await?,
            Runs::Get { run_id } => ops::runs_get(api, &run_id).await?,
            Runs::Watch { every_ms, limit } => {
                ops::runs_watch(api, Duration::from_millis(every_ms.max(200)), limit).await?
            }
            Runs::Pause { run_id, reason } => {
                ops::run_action(api, &run_id, "pause", reason.as_deref()).await?
            }
            Runs::Resume { run_id, reason } => {
                ops::run_action(api, &run_id, "resume", reason.as_deref()).await?
            }
            Runs::Cancel { run_id, reason } => {
                ops::run_action(api, &run_id, "cancel", reason.as_deref()).await?
            }
            Runs::Recover { run_id, reason } => {
                ops::run_action(api, &run_id, "recover", reason.as_deref()).await?
            }
            Runs::Task {
                run_id,
                node_id,
                action,
                reason,
            } => ops::task_action(api, &run_id, &node_id, &action, reason.as_deref()).await?,
        },
        Command::Gates(g) => match g {
            Gates::Pending => {
                ops::gates_pending(api).await?;
            }
            Gates::Approve { run_id, reason } => {
                ops::gate_decide(api, &run_id, "approve", reason.as_deref()).await?
            }
            Gates::Rework { run_id, reason } => {
                ops::gate_decide(api, &run_id, "rework", reason.as_deref()).await?
            }
            Gates::Cancel { run_id, reason } => {
                ops::gate_decide(api, &run_id, "cancel", reason.as_deref()).await?
            }
        },
        Command::Audit(Audit::Verify) => {
            if !ops::audit_verify(api).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Fleet(Fleet::FailRunningRuns { yes }) => {
            if !yes {
                eprintln!("refusing without --yes: this fails every running run of the fleet");
                return Ok(ExitCode::from(2));
            }
            if !ops::fleet_fail_running_runs(api).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Tokens(Tokens::Create {
            name,
            org,
            workspace,
            kind,
            actor,
            reviewer,
            tenant_admin,
        }) => {
            ops::token_create(
                api,
                &ops::NewToken {
                    name: &name,
                    org: &org,
                    workspace: &workspace,
                    kind: &kind,
                    actor: actor.as_deref(),
                    reviewer,
                    tenant_admin,
                },
            )
            .await?
        }
        Command::Migrate { .. } | Command::Schema | Command::Events(_) | Command::Up(_) => {}
    }
    Ok(ExitCode::SUCCESS)
}
