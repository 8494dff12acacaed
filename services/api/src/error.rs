//! JSON errors `{error, code, ...}` and the response counters.

use axum::{
    Json,
    extract::Request,
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};
use tandem_store::StoreError;

/// An error answer: status, upstream-style `code`, message, and extra body fields.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub extra: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_owned(),
            message: message.into(),
            extra: Map::new(),
        }
    }

    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 400 `INVALID_ARGUMENT` naming the JSON path of the offending field.
    pub fn validation(path: &str, message: &str) -> Self {
        let text = if path.is_empty() {
            message.to_owned()
        } else {
            format!("{path}: {message}")
        };
        Self::bad_request("INVALID_ARGUMENT", text).with("path", json!(path))
    }

    pub fn not_found(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn forbidden(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }

    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// A run that is absent or belongs to another tenant (upstream answers both with 404).
    pub fn run_not_found(run_id: &str) -> Self {
        Self::not_found(
            "AUTOMATION_V2_RUN_NOT_FOUND",
            format!("Automation run not found: {run_id}"),
        )
    }

    pub fn automation_not_found(id: &str) -> Self {
        Self::not_found(
            "AUTOMATION_V2_NOT_FOUND",
            format!("Automation not found: {id}"),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound(what) => Self::not_found("NOT_FOUND", format!("{what} not found")),
            StoreError::Conflict { message, .. } => Self::conflict("CONFLICT", message.clone()),
            StoreError::Fenced { .. } => Self::conflict("CONFLICT", e.to_string()),
            StoreError::Invalid(m) => Self::bad_request("INVALID_ARGUMENT", m.clone()),
            StoreError::Db(db) => {
                // Class 22 (data exception) is bad input that got past validation: still a 400.
                if let Some(d) = db.as_db_error()
                    && d.code().code().starts_with("22")
                {
                    return Self::bad_request("INVALID_ARGUMENT", d.message().to_owned());
                }
                if db.as_db_error().is_none() || db.is_closed() {
                    return Self::unavailable(&e);
                }
                Self::internal(&e)
            }
            StoreError::Pool(_) => Self::unavailable(&e),
            _ => Self::internal(&e),
        }
    }
}

impl ApiError {
    fn unavailable(e: &StoreError) -> Self {
        tracing::warn!(error = %e, "database unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "STORE_UNAVAILABLE",
            "the database is not available; retry later",
        )
    }

    fn internal(e: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "internal error (see the api logs)",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".into(), Value::String(self.message));
        body.insert("code".into(), Value::String(self.code));
        body.extend(self.extra);
        (self.status, Json(Value::Object(body))).into_response()
    }
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("NOT_FOUND", "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "method not allowed on this route",
    )
}

/// Counts answers by status class (`tandem_api_responses_total{class}`), times them
/// (`tandem_api_request_duration_seconds`), and replaces axum's
/// plain-text rejections (wrong content, bad path or query) with JSON errors.
pub async fn count_responses(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    metrics::histogram!("tandem_api_request_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    let status = resp.status();
    let class = match status.as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    };
    metrics::counter!("tandem_api_responses_total", "class" => class).increment(1);
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json && (status.is_client_error() || status.is_server_error()) {
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "PAYLOAD_TOO_LARGE",
            StatusCode::NOT_FOUND => "NOT_FOUND",
            StatusCode::METHOD_NOT_ALLOWED => "METHOD_NOT_ALLOWED",
            s if s.is_server_error() => "INTERNAL",
            _ => "INVALID_REQUEST",
        };
        let reason = status.canonical_reason().unwrap_or("error");
        let text = axum::body::to_bytes(resp.into_body(), 4096)
            .await
            .ok()
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
            .filter(|t| !t.is_empty());
        let message = match text {
            Some(t) => format!("{reason}: {t}"),
            None => reason.to_owned(),
        };
        return ApiError::new(status, code, message).into_response();
    }
    resp
}
