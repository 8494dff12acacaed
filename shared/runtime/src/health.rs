//! `/healthz`, `/readyz` and `/metrics`.
//!
//! * `/healthz`: 200 while the process runs (liveness).
//! * `/readyz`: 200 only once Postgres is reachable with the schema this build needs and NATS is
//!   connected with the streams in place, and not while shutting down; otherwise 503 with a JSON
//!   body whose `reason` says what is missing.
//! * `/metrics`: Prometheus text exposition of the process's `metrics` recorder.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, RwLock},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

/// A dependency that readiness waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Postgres,
    Schema,
    Nats,
    Streams,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Postgres => "postgres",
            Component::Schema => "schema",
            Component::Nats => "nats",
            Component::Streams => "streams",
        }
    }

    const ALL: [Component; 4] = [
        Component::Postgres,
        Component::Schema,
        Component::Nats,
        Component::Streams,
    ];
}

#[derive(Debug)]
struct ReadyState {
    /// `None` = ok; `Some(reason)` = not ready.
    checks: BTreeMap<Component, Option<String>>,
    shutting_down: bool,
}

/// Shared readiness state; cheap to clone.
#[derive(Debug, Clone)]
pub struct Readiness {
    service: &'static str,
    state: Arc<RwLock<ReadyState>>,
}

impl Readiness {
    /// Every component starts as "not checked yet".
    pub fn new(service: &'static str) -> Self {
        let checks = Component::ALL
            .iter()
            .map(|c| (*c, Some("not checked yet".to_owned())))
            .collect();
        Self {
            service,
            state: Arc::new(RwLock::new(ReadyState {
                checks,
                shutting_down: false,
            })),
        }
    }

    fn write(&self, f: impl FnOnce(&mut ReadyState)) {
        let mut guard = self.state.write().unwrap_or_else(|e| e.into_inner());
        f(&mut guard);
        let ready = !guard.shutting_down && guard.checks.values().all(Option::is_none);
        metrics::gauge!("tandem_ready").set(if ready { 1.0 } else { 0.0 });
    }

    pub fn set_ok(&self, c: Component) {
        self.write(|s| {
            s.checks.insert(c, None);
        });
    }

    pub fn set_failed(&self, c: Component, reason: impl Into<String>) {
        let reason = reason.into();
        self.write(|s| {
            s.checks.insert(c, Some(reason));
        });
    }

    pub fn set_shutting_down(&self) {
        self.write(|s| s.shutting_down = true);
    }

    pub fn is_ready(&self) -> bool {
        self.reason().is_none()
    }

    /// Why the service is not ready, or `None` when it is.
    pub fn reason(&self) -> Option<String> {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        if s.shutting_down {
            return Some("shutting down".into());
        }
        let failing: Vec<String> = s
            .checks
            .iter()
            .filter_map(|(c, r)| r.as_ref().map(|r| format!("{}: {r}", c.as_str())))
            .collect();
        (!failing.is_empty()).then(|| failing.join("; "))
    }

    fn body(&self) -> serde_json::Value {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        let checks: serde_json::Map<String, serde_json::Value> = s
            .checks
            .iter()
            .map(|(c, r)| {
                let v = match r {
                    None => json!("ok"),
                    Some(r) => json!(r),
                };
                (c.as_str().to_owned(), v)
            })
            .collect();
        drop(s);
        match self.reason() {
            None => json!({"status": "ready", "service": self.service, "checks": checks}),
            Some(reason) => json!({
                "status": "not_ready",
                "service": self.service,
                "reason": reason,
                "checks": checks,
            }),
        }
    }
}

/// How often histogram samples are folded into their summaries when nobody scrapes.
const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder (once per process) and its upkeep task (call
/// inside the Tokio runtime).
pub fn install_metrics_recorder(
    service: &'static str,
) -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .add_global_label("service", service)
        .install_recorder()?;
    // Histogram samples wait in the recorder until drained; a scrape drains them, and so does
    // this upkeep, so memory stays bounded when nobody scrapes `/metrics` (or rarely does).
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    metrics::describe_gauge!(
        "tandem_ready",
        "1 when the service is ready (dependencies connected, schema current), else 0"
    );
    metrics::describe_counter!(
        "tandem_dependency_retries_total",
        "Failed connection attempts to a dependency at startup, by dependency"
    );
    metrics::describe_counter!(
        "tandem_nats_published_total",
        "JetStream publishes acknowledged, by stream and outcome (stored or duplicate)"
    );
    Ok(handle)
}

#[derive(Clone)]
struct HealthState {
    readiness: Readiness,
    metrics: PrometheusHandle,
}

/// The health router; merge it into another router to serve it on more than one address.
pub fn router(readiness: Readiness, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(HealthState { readiness, metrics })
}

async fn healthz(State(s): State<HealthState>) -> impl IntoResponse {
    Json(json!({"status": "alive", "service": s.readiness.service}))
}

async fn readyz(State(s): State<HealthState>) -> impl IntoResponse {
    let code = if s.readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(s.readiness.body()))
}

async fn metrics_text(State(s): State<HealthState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// Serves `router` on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let r = Readiness::new("t");
        assert!(!r.is_ready());
        for c in Component::ALL {
            r.set_ok(c);
        }
        assert!(r.is_ready());
        assert_eq!(r.body()["status"], "ready");
        r.set_failed(Component::Nats, "disconnected");
        assert_eq!(r.reason().as_deref(), Some("nats: disconnected"));
        assert_eq!(r.body()["checks"]["nats"], "disconnected");
        r.set_ok(Component::Nats);
        r.set_shutting_down();
        assert_eq!(r.reason().as_deref(), Some("shutting down"));
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let r = Readiness::new("t");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router(r.clone(), handle), async {
            let _ = rx.await;
        }));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        let ready = get("/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.contains("not checked yet"), "{ready}");
        for c in Component::ALL {
            r.set_ok(c);
        }
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/metrics").await.starts_with("HTTP/1.1 200"));
        let _ = tx.send(());
        server.await.expect("join").expect("serve");
    }
}
