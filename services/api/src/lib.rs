//! `tandem-api`: the upstream-compatible HTTP API (DESIGN §3.1).
//!
//! Every handler is thin: authenticate, load, call the pure core inside
//! [`tandem_store::try_transition_run`] (row locked `FOR UPDATE`, database clock), answer with the
//! upstream status and error code. After a commit the handler relays the run's outbox rows
//! itself (low latency; the background relay picks up anything left behind) and sends the
//! wake-up hints (`tandem.wake.scheduler` for a queued run, `tandem.wake.gates` after a gate
//! decision).
//!
//! Errors are JSON `{error, code}` (plus `path` for validation errors, `winningDecision` for a
//! lost gate race). Bad input is always a 4xx: bodies are size-limited, parsed by hand with the
//! JSON path of the offending field, strings with NUL characters are refused before they reach
//! PostgreSQL, and a data exception from the database is still answered as a 400.

pub mod auth;
pub mod error;
pub mod openapi;
pub mod routes;

use std::sync::Arc;

use axum::{
    Router,
    extract::{DefaultBodyLimit, FromRequest, Request},
    http::StatusCode,
    routing::{get, post},
};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tandem_bus::{Prefix, async_nats};
use tandem_core::config::LifecycleSettings;
use tandem_runtime::Relay;
use tandem_store::{Pool, StoreSettings};

pub use auth::{AuthConfig, Principal};
pub use error::ApiError;

/// Default request body limit (`TANDEM_API_MAX_BODY_BYTES`).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Inner>,
}

pub struct Inner {
    pub pool: Pool,
    pub nats: async_nats::Client,
    pub prefix: Prefix,
    pub relay: Relay,
    pub store: StoreSettings,
    pub lifecycle: LifecycleSettings,
    pub auth: AuthConfig,
}

impl AppState {
    pub fn new(
        pool: Pool,
        nats: async_nats::Client,
        prefix: Prefix,
        relay: Relay,
        lifecycle: LifecycleSettings,
        auth: AuthConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                nats,
                prefix,
                relay,
                store: StoreSettings::new(lifecycle.gates),
                lifecycle,
                auth,
            }),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// After a commit: publish the run's outbox rows now, then the wake-up hints. Failures are
    /// logged only: the background relay and the services' polling are the fallback.
    pub async fn after_commit(&self, run_id: &str, wake_scheduler: bool, wake_gates: bool) {
        self.after_commit_runs(&[run_id.to_owned()], wake_scheduler, wake_gates)
            .await;
    }

    /// [`Self::after_commit`] for many runs: one relay pass, one wake-up of each kind.
    pub async fn after_commit_runs(
        &self,
        run_ids: &[String],
        wake_scheduler: bool,
        wake_gates: bool,
    ) {
        match self.inner.relay.relay_runs(run_ids).await {
            Ok(r) if r.failed > 0 => self.inner.relay.nudge(),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(runs = run_ids.len(), error = %e, "relaying just-committed rows failed; the background relay will");
                self.inner.relay.nudge();
            }
        }
        if wake_scheduler {
            let subject = tandem_bus::wake_scheduler_subject(&self.inner.prefix);
            if let Err(e) = tandem_bus::wake(&self.inner.nats, subject).await {
                tracing::debug!(error = %e, "scheduler wake-up not sent");
            }
        }
        if wake_gates {
            let subject = tandem_bus::wake_gates_subject(&self.inner.prefix);
            if let Err(e) = tandem_bus::wake(&self.inner.nats, subject).await {
                tracing::debug!(error = %e, "gate-notifier wake-up not sent");
            }
        }
    }

    /// Sends a cancel hint to workers of a run that stopped with tasks in flight.
    pub async fn cancel_hint(&self, run_id: &str, lease_epoch: i64) {
        let hint = tandem_core::protocol::TaskCancel {
            run_id: run_id.to_owned(),
            lease_epoch: Some(lease_epoch),
            reason: None,
        };
        let body = serde_json::to_vec(&hint)
            .map(Bytes::from)
            .unwrap_or_default();
        let subject = tandem_bus::cancel_subject(&self.inner.prefix, run_id);
        if let Err(e) = self.inner.nats.publish(subject, body).await {
            tracing::debug!(run_id, error = %e, "cancel hint not sent");
        }
    }
}

/// The API router (without `/healthz` `/readyz` `/metrics`, which the binary merges in).
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    use routes::{admin, approvals, automations, runs};
    Router::new()
        .route("/openapi.json", get(openapi::openapi))
        .route(
            "/automations/v2",
            post(automations::create).get(automations::list),
        )
        .route("/automations/v2/runs", get(runs::list))
        .route("/automations/v2/runs/{run_id}", get(runs::get))
        .route("/automations/v2/runs/{run_id}/gate", post(runs::gate))
        .route("/automations/v2/runs/{run_id}/pause", post(runs::pause))
        .route("/automations/v2/runs/{run_id}/resume", post(runs::resume))
        .route("/automations/v2/runs/{run_id}/cancel", post(runs::cancel))
        .route("/automations/v2/runs/{run_id}/recover", post(runs::recover))
        .route(
            "/automations/v2/runs/{run_id}/tasks/{node_id}/{action}",
            post(runs::task),
        )
        .route("/automations/v2/{id}", get(automations::get))
        .route("/automations/v2/{id}/run_now", post(automations::run_now))
        .route("/automations/v2/{id}/pause", post(automations::pause))
        .route("/automations/v2/{id}/resume", post(automations::resume))
        .route("/automations/v2/{id}/runs", get(automations::runs))
        .route("/approvals/pending", get(approvals::pending))
        .route(
            "/audit/verify",
            get(admin::audit_verify).post(admin::audit_verify),
        )
        .route(
            "/governance/spend-caps",
            get(admin::list_spend_caps).post(admin::put_spend_cap),
        )
        .route(
            "/governance/spend-pauses",
            post(admin::pause_spend).delete(admin::resume_spend),
        )
        .route("/governance/quota-overrides", post(admin::create_override))
        .route(
            "/governance/quota-overrides/{id}",
            post(admin::set_override_status),
        )
        .route(
            "/admin/fleet/fail-running-runs",
            post(admin::fail_running_runs),
        )
        .route("/auth/tokens", post(admin::create_token))
        .route("/auth/tokens/revoke", post(admin::revoke_token))
        .route("/auth/whoami", get(admin::whoami))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn(error::count_responses))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

// ------------------------------------------------------------------------------------------------
// Input
// ------------------------------------------------------------------------------------------------

/// A JSON body parsed by hand: size-limited (413), syntax errors and type errors answered 400
/// with the JSON path of the offending field, NUL characters refused (PostgreSQL cannot store
/// them). An empty body is `{}`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(status, "PAYLOAD_TOO_LARGE", "request body is too large")
            } else {
                ApiError::bad_request("INVALID_BODY", format!("cannot read the body: {e}"))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a body as [`JsonBody`] does.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("INVALID_JSON", format!("invalid JSON: {e}")))?;
    if let Some(path) = nul_path(&value, "$") {
        return Err(ApiError::validation(
            &path,
            "strings must not contain NUL characters",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ApiError::validation(&path, &e.into_inner().to_string())
    })
}

/// The path of the first string (or key) holding a NUL character.
fn nul_path(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::String(s) if s.contains('\0') => Some(at.to_owned()),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_path(x, &format!("{at}[{i}]"))),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                Some(at.to_owned())
            } else {
                nul_path(x, &format!("{at}.{k}"))
            }
        }),
        _ => None,
    }
}

/// Checks an id taken from a path or query: non-empty, at most 256 bytes, no control characters.
pub fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "INVALID_ID",
            format!("{what} must be 1-256 characters without control characters"),
        ));
    }
    Ok(())
}
