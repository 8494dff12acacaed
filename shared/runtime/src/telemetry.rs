//! Logs (tracing-subscriber on stderr, text or JSON, filtered by `RUST_LOG`) and, only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, OpenTelemetry traces over OTLP/gRPC.

use std::{collections::HashMap, io::IsTerminal as _, time::Duration};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

use crate::config::LogFormat;

/// Filter used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info,tonic=warn,h2=warn,hyper=warn,tower=warn,opentelemetry_sdk=warn,async_nats=warn,tokio_postgres=warn";

/// Upper bound on flushing spans at exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(String),
}

/// Keeps the tracer provider alive; call [`Telemetry::shutdown`] before exiting.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset.
pub fn init(
    service: &'static str,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    default_filter: &str,
) -> Result<Telemetry, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).unwrap_or_else(|e| {
            eprintln!("{service}: ignoring invalid RUST_LOG={v:?}: {e}");
            EnvFilter::new(default_filter)
        }),
        _ => EnvFilter::new(default_filter),
    };
    let ansi = std::io::stderr().is_terminal();
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .compact()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = match otlp_endpoint.map(str::trim).filter(|e| !e.is_empty()) {
        Some(endpoint) => Some(tracer_provider(service, endpoint)?),
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(Telemetry { provider })
}

fn tracer_provider(
    service: &'static str,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    // Must run inside the tokio runtime (tonic). The channel is lazy: no collector is needed to
    // start, failed exports are logged by the SDK and dropped.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    Ok(provider)
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the trace exporter, waiting at most a few seconds.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let flush =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT));
        match tokio::time::timeout(SHUTDOWN_TIMEOUT + Duration::from_secs(1), flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace exporter shutdown failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "trace exporter shutdown panicked"),
            Err(_) => tracing::warn!("trace exporter shutdown timed out"),
        }
    }
}

/// The W3C `traceparent` of the current span, when traces are exported (for NATS headers).
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.remove("traceparent")
}

/// Makes the span a child of the trace named by a received `traceparent` header.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    let carrier: HashMap<String, String> =
        HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    if let Err(e) = span.set_parent(context) {
        tracing::debug!(error = %e, "cannot set the span's remote parent");
    }
}
