//! The life of a service process, shared by every binary:
//!
//! 1. telemetry, then configuration checks (an invalid value stops startup naming the variable);
//! 2. the health/metrics endpoint (so `/healthz` answers while dependencies are awaited);
//! 3. Postgres with retry and capped exponential backoff, then the schema check (an unmigrated,
//!    partially migrated or newer schema stops startup with the store's message);
//! 4. NATS with retry, then the JetStream streams;
//! 5. "ready", and the service's own work until SIGTERM/SIGINT;
//! 6. drain (bounded by `TANDEM_SCHEDULER_SHUTDOWN_TIMEOUT_SECS`), flush, exit 0.
//!
//! No service needs another to be up: each waits for Postgres and NATS by itself, logging every
//! retry, and a signal during the wait exits 0.

use std::{future::Future, process::ExitCode, time::Duration};

use metrics_exporter_prometheus::PrometheusHandle;
use tandem_bus::{
    BusError, NatsOptions, Prefix, StreamNames, StreamSettings, async_nats, redact_url,
};
use tandem_core::config::LifecycleSettings;
use tandem_store::{Pool, StoreError};

use crate::{
    backoff::Backoff,
    config::{CommonArgs, ServiceInfo},
    health::{self, Component, Readiness},
    shutdown::Shutdown,
    telemetry,
};

/// Exit code for a configuration error (as clap uses for bad flags).
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for any other startup or runtime failure.
pub const EXIT_FAILURE: u8 = 1;

/// How often readiness re-checks Postgres, the schema and NATS once started.
const READINESS_INTERVAL: Duration = Duration::from_secs(5);

/// What a running service gets: connected dependencies and the shutdown signal.
pub struct ServiceContext {
    pub info: ServiceInfo,
    pub common: CommonArgs,
    pub settings: LifecycleSettings,
    pub pool: Pool,
    pub nats: async_nats::Client,
    pub jetstream: async_nats::jetstream::Context,
    pub prefix: Prefix,
    pub streams: StreamNames,
    pub shutdown: Shutdown,
    pub readiness: Readiness,
    pub metrics: PrometheusHandle,
}

impl ServiceContext {
    /// `/healthz`, `/readyz` and `/metrics`, to merge into another router (the API serves them on
    /// its own address too).
    pub fn health_router(&self) -> axum::Router {
        health::router(self.readiness.clone(), self.metrics.clone())
    }
}

/// A reason to stop, with the exit code that goes with it.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn config(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_CONFIG,
            message: message.into(),
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_FAILURE,
            message: message.into(),
        }
    }
}

/// Runs a service: see the module documentation. `body` does the service's own work and must
/// return once `ctx.shutdown` fires, after draining what it has in flight.
pub async fn run<F, Fut>(info: ServiceInfo, common: CommonArgs, body: F) -> ExitCode
where
    F: FnOnce(ServiceContext) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let telemetry = match telemetry::init(
        info.name,
        common.observability.log_format,
        common.observability.otlp_endpoint.as_deref(),
        telemetry::DEFAULT_FILTER,
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: error: {e}", info.name);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let code = match run_service(info, common, body).await {
        Ok(()) => {
            tracing::info!(service = info.name, "stopped");
            ExitCode::SUCCESS
        }
        Err(f) => {
            tracing::error!(service = info.name, "{}", f.message);
            ExitCode::from(f.code)
        }
    };
    telemetry.shutdown().await;
    code
}

/// Checks what can be checked without any dependency: lifecycle settings, NATS options, stream
/// settings and the database URL. Errors name the variable.
pub fn validate_config(
    info: &ServiceInfo,
    common: &CommonArgs,
) -> Result<(LifecycleSettings, NatsOptions, StreamSettings, Pool), Failure> {
    let settings = LifecycleSettings::from_env().map_err(|e| Failure::config(e.to_string()))?;
    let nats = common.nats.options();
    nats.validate()
        .map_err(|e| Failure::config(e.to_string()))?;
    let streams = common.nats.stream_settings();
    streams
        .validate()
        .map_err(|e| Failure::config(e.to_string()))?;
    let pool = tandem_store::connect_with_size(
        &common.database.database_url,
        info.name,
        usize::from(common.database.database_pool_size),
    )
    .map_err(|e| Failure::config(format!("TANDEM_DATABASE_URL: {e}")))?;
    Ok((settings, nats, streams, pool))
}

async fn run_service<F, Fut>(info: ServiceInfo, common: CommonArgs, body: F) -> Result<(), Failure>
where
    F: FnOnce(ServiceContext) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let (settings, nats_options, stream_settings, pool) = validate_config(&info, &common)?;
    let metrics = health::install_metrics_recorder(info.name)
        .map_err(|e| Failure::fatal(format!("cannot install the metrics recorder: {e}")))?;
    metrics::gauge!("tandem_build_info", "version" => info.version).set(1.0);

    let (_trigger, shutdown) = Shutdown::install();
    let readiness = Readiness::new(info.name);

    let health_addr = common.health_addr(&info);
    let listener = tokio::net::TcpListener::bind(health_addr)
        .await
        .map_err(|e| {
            Failure::fatal(format!(
                "cannot listen on {health_addr} (TANDEM_HEALTH_ADDR): {e}"
            ))
        })?;
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(health::serve(
        listener,
        health::router(readiness.clone(), metrics.clone()),
        async {
            let _ = http_stopped.await;
        },
    ));
    tracing::info!(addr = %health_addr, "health endpoint listening");

    let prefix = common.nats.nats_prefix.clone();
    let startup = async {
        wait_for_postgres(&pool, &common.database.database_url, &readiness).await?;
        let client = connect_nats(&nats_options, info.name, &readiness).await?;
        let js = tandem_bus::jetstream(client.clone());
        ensure_streams(&js, &prefix, &stream_settings, &readiness).await?;
        Ok::<_, Failure>((client, js))
    };
    let started = tokio::select! {
        r = startup => Some(r),
        () = shutdown.wait() => None,
    };
    let (nats, jetstream) = match started {
        Some(Ok(v)) => v,
        Some(Err(f)) => {
            readiness.set_shutting_down();
            stop_server(stop_http, http).await;
            return Err(f);
        }
        None => {
            tracing::info!("shutdown requested during startup");
            readiness.set_shutting_down();
            stop_server(stop_http, http).await;
            return Ok(());
        }
    };

    let monitor = tokio::spawn(monitor(
        pool.clone(),
        jetstream.clone(),
        prefix.clone(),
        stream_settings,
        readiness.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    tracing::info!(
        service = info.name,
        version = info.version,
        health_addr = %health_addr,
        nats_prefix = %prefix,
        "ready"
    );

    let drain = Duration::from_secs(settings.shutdown_timeout_secs);
    let ctx = ServiceContext {
        info,
        common: common.clone(),
        settings,
        pool: pool.clone(),
        nats: nats.clone(),
        jetstream,
        streams: StreamNames::new(&prefix),
        prefix,
        shutdown: shutdown.clone(),
        readiness: readiness.clone(),
        metrics,
    };
    let work = body(ctx);
    tokio::pin!(work);
    let outcome = tokio::select! {
        r = &mut work => r.map_err(|e| Failure::fatal(format!("{e:#}"))),
        () = async {
            shutdown.wait().await;
            readiness.set_shutting_down();
            tokio::time::sleep(drain).await;
        } => Err(Failure::fatal(format!(
            "in-flight work did not drain within {} s (TANDEM_SCHEDULER_SHUTDOWN_TIMEOUT_SECS)",
            drain.as_secs()
        ))),
    };

    readiness.set_shutting_down();
    monitor.abort();
    match tokio::time::timeout(Duration::from_secs(2), nats.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "NATS flush at shutdown failed"),
        Err(_) => tracing::warn!("NATS flush at shutdown timed out"),
    }
    pool.close();
    stop_server(stop_http, http).await;
    outcome
}

async fn stop_server(
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let _ = stop.send(());
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "health endpoint failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "health endpoint task failed"),
        Err(_) => tracing::warn!("health endpoint did not stop within 2 s"),
    }
}

fn retry_counter(dependency: &'static str) {
    metrics::counter!("tandem_dependency_retries_total", "dependency" => dependency).increment(1);
}

/// `3D000 invalid_catalog_name`: the database named in the URL does not exist. Returns the
/// server's message.
fn missing_database(e: &StoreError) -> Option<String> {
    match e {
        StoreError::Db(db) => db
            .as_db_error()
            .filter(|d| d.code().code() == "3D000")
            .map(|d| d.message().to_owned()),
        _ => None,
    }
}

/// Waits until Postgres answers and checks the schema; a schema problem is fatal.
pub async fn wait_for_postgres(
    pool: &Pool,
    url: &str,
    readiness: &Readiness,
) -> Result<(), Failure> {
    let mut backoff = Backoff::default();
    loop {
        match tandem_store::check_schema(pool).await {
            Ok(()) => {
                readiness.set_ok(Component::Postgres);
                readiness.set_ok(Component::Schema);
                tracing::info!(
                    database = %redact_url(url),
                    schema_version = tandem_store::latest_version(),
                    "postgres connected; schema current"
                );
                return Ok(());
            }
            Err(StoreError::Schema(msg)) => {
                readiness.set_ok(Component::Postgres);
                readiness.set_failed(Component::Schema, msg.clone());
                return Err(Failure::fatal(format!("refusing to start: {msg}")));
            }
            Err(e) if missing_database(&e).is_some() => {
                let msg = missing_database(&e).unwrap_or_default();
                return Err(Failure::fatal(format!(
                    "refusing to start: {msg} ({}): run `tandemctl migrate`, which creates it",
                    redact_url(url)
                )));
            }
            Err(e) => {
                let delay = backoff.next_delay();
                retry_counter("postgres");
                readiness.set_failed(Component::Postgres, format!("waiting: {e}"));
                tracing::warn!(
                    database = %redact_url(url),
                    attempt = backoff.attempt(),
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "postgres not available; retrying"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Connects to NATS, retrying connection failures forever; bad options are fatal.
pub async fn connect_nats(
    options: &NatsOptions,
    name: &str,
    readiness: &Readiness,
) -> Result<async_nats::Client, Failure> {
    let mut backoff = Backoff::default();
    loop {
        match tandem_bus::connect(options, name).await {
            Ok(client) => {
                readiness.set_ok(Component::Nats);
                tracing::info!(
                    url = %redact_url(&options.url),
                    server_version = %client.server_info().version,
                    "NATS connected"
                );
                return Ok(client);
            }
            Err(e @ BusError::Connect { .. }) => {
                let delay = backoff.next_delay();
                retry_counter("nats");
                readiness.set_failed(Component::Nats, format!("waiting: {e}"));
                tracing::warn!(
                    attempt = backoff.attempt(),
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "NATS not available; retrying"
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(Failure::config(e.to_string())),
        }
    }
}

/// Creates or updates the streams, retrying transient failures (e.g. JetStream not ready yet).
pub async fn ensure_streams(
    js: &async_nats::jetstream::Context,
    prefix: &Prefix,
    settings: &StreamSettings,
    readiness: &Readiness,
) -> Result<(), Failure> {
    let mut backoff = Backoff::default();
    loop {
        match tandem_bus::ensure_streams_with(js, prefix, settings).await {
            Ok(report) => {
                readiness.set_ok(Component::Streams);
                for (stream, action) in &report.streams {
                    tracing::info!(stream, action = ?action, "JetStream stream in place");
                }
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay();
                retry_counter("jetstream");
                readiness.set_failed(Component::Streams, format!("waiting: {e}"));
                tracing::warn!(
                    attempt = backoff.attempt(),
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "JetStream streams not available; retrying"
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                readiness.set_failed(Component::Streams, e.to_string());
                return Err(Failure::fatal(e.to_string()));
            }
        }
    }
}

/// Keeps readiness truthful after startup: re-checks Postgres and the schema, watches the NATS
/// connection, re-ensures the streams after a reconnect (a server may have lost them), and runs
/// the metrics recorder's upkeep.
async fn monitor(
    pool: Pool,
    js: async_nats::jetstream::Context,
    prefix: Prefix,
    stream_settings: StreamSettings,
    readiness: Readiness,
    metrics: PrometheusHandle,
    shutdown: Shutdown,
) {
    let mut nats_was_connected = true;
    let mut tick = tokio::time::interval(READINESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; startup just checked everything
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        metrics.run_upkeep();
        match tokio::time::timeout(READINESS_INTERVAL, tandem_store::check_schema(&pool)).await {
            Ok(Ok(())) => {
                readiness.set_ok(Component::Postgres);
                readiness.set_ok(Component::Schema);
            }
            Ok(Err(StoreError::Schema(msg))) => {
                readiness.set_ok(Component::Postgres);
                if readiness.is_ready() {
                    tracing::error!("{msg}");
                }
                readiness.set_failed(Component::Schema, msg);
            }
            Ok(Err(e)) => {
                if readiness.is_ready() {
                    tracing::warn!(error = %e, "postgres unavailable");
                }
                readiness.set_failed(Component::Postgres, e.to_string());
            }
            Err(_) => readiness.set_failed(Component::Postgres, "check timed out"),
        }
        let connected = matches!(
            js.client().connection_state(),
            async_nats::connection::State::Connected
        );
        if connected {
            readiness.set_ok(Component::Nats);
            if !nats_was_connected {
                match tandem_bus::ensure_streams_with(&js, &prefix, &stream_settings).await {
                    Ok(_) => readiness.set_ok(Component::Streams),
                    Err(e) => {
                        tracing::warn!(error = %e, "re-ensuring streams after reconnect failed");
                        readiness.set_failed(Component::Streams, e.to_string());
                        continue; // try again next tick
                    }
                }
            }
        } else {
            readiness.set_failed(Component::Nats, "disconnected; reconnecting");
        }
        nats_was_connected = connected;
    }
}
