//! The built-in task handlers of the reference worker, for demos, tests and benchmarks.
//!
//! A node picks its handler with `metadata.worker.handler` (the node metadata arrives as
//! `TaskMessage.metadata`):
//!
//! | Handler | Result |
//! |---|---|
//! | `noop` | `completed`, output `{"handler": "noop"}` |
//! | `sleep` | sleeps `metadata.worker.ms` (default 1000) reporting progress, then `completed` with `{"handler": "sleep", "slept_ms": ms}`; stops early when cancelled |
//! | `fail` | `failed`, output `{"handler": "fail", "error": metadata.worker.error or a default}` |
//! | `needs_repair_once` | `needs_repair` when the task has no `repair_context`, else `completed` with `{"repaired": true, "repair_context": …}` |
//! | `echo` | `completed`, output `{"objective", "upstream_outputs", "metadata"}` of the task |
//!
//! Any handler reports `metadata.worker.usage` (`{prompt_tokens, completion_tokens, cost_usd}`)
//! as its usage when the node sets it, which lets tests drive the budget guardrails. An unknown
//! handler, or none at all (unless the worker has a default handler), gives a `failed` result whose
//! output says what to set.

use std::time::Duration;

use serde_json::{Value, json};
use tandem_worker_sdk::{TaskContext, TaskHandler, TaskMessage, TaskOutcome, TaskUsage};

/// The built-in handler names.
pub const HANDLERS: &[&str] = &["noop", "sleep", "fail", "needs_repair_once", "echo"];

/// Default `metadata.worker.ms` of the `sleep` handler.
pub const DEFAULT_SLEEP_MS: u64 = 1000;
/// Longest sleep the `sleep` handler accepts (one day).
pub const MAX_SLEEP_MS: u64 = 24 * 3600 * 1000;

/// The built-in handlers, chosen per task by `metadata.worker.handler`.
#[derive(Debug, Clone, Default)]
pub struct BuiltinHandlers {
    default_handler: Option<String>,
}

impl BuiltinHandlers {
    /// `default_handler` is used for tasks that name none (it must be one of [`HANDLERS`]).
    pub fn new(default_handler: Option<String>) -> Result<Self, String> {
        if let Some(h) = &default_handler
            && !HANDLERS.contains(&h.as_str())
        {
            return Err(format!(
                "unknown default handler {h:?}; the built-in handlers are {}",
                HANDLERS.join(", ")
            ));
        }
        Ok(Self { default_handler })
    }
}

/// `metadata.worker`, or `Null`.
fn worker_meta(task: &TaskMessage) -> &Value {
    task.metadata
        .as_ref()
        .and_then(|m| m.get("worker"))
        .unwrap_or(&Value::Null)
}

fn usage_of(meta: &Value) -> TaskUsage {
    meta.get("usage")
        .and_then(|u| serde_json::from_value::<TaskUsage>(u.clone()).ok())
        .unwrap_or_default()
}

fn unknown(detail: String, named: Value) -> TaskOutcome {
    TaskOutcome::failed(json!({
        "error": "unknown worker handler",
        "detail": detail,
        "handler": named,
        "known_handlers": HANDLERS,
    }))
}

impl TaskHandler for BuiltinHandlers {
    async fn handle(&self, task: TaskMessage, ctx: TaskContext) -> TaskOutcome {
        let meta = worker_meta(&task);
        let usage = usage_of(meta);
        let named = meta.get("handler").cloned().unwrap_or(Value::Null);
        let name = match (&named, &self.default_handler) {
            (Value::String(s), _) => s.clone(),
            (Value::Null, Some(default)) => default.clone(),
            (Value::Null, None) => {
                return unknown(
                    format!(
                        "the node names no handler: set node.metadata.worker.handler to one of {}",
                        HANDLERS.join(", ")
                    ),
                    named,
                );
            }
            (other, _) => {
                return unknown(
                    format!(
                        "node.metadata.worker.handler must be a string, got {other}; use one of {}",
                        HANDLERS.join(", ")
                    ),
                    named,
                );
            }
        };
        let outcome = match name.as_str() {
            "noop" => TaskOutcome::completed(json!({"handler": "noop"})),
            "sleep" => sleep(meta, &ctx).await,
            "fail" => {
                let error = meta
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the fail handler always fails");
                TaskOutcome::failed(json!({"handler": "fail", "error": error}))
            }
            "needs_repair_once" => match &task.repair_context {
                None => TaskOutcome::needs_repair(json!({
                    "handler": "needs_repair_once",
                    "summary": "needs repair: the needs_repair_once handler asks for one repair",
                })),
                Some(previous) => TaskOutcome::completed(json!({
                    "handler": "needs_repair_once",
                    "repaired": true,
                    "repair_context": previous,
                })),
            },
            "echo" => TaskOutcome::completed(json!({
                "objective": task.objective,
                "upstream_outputs": task.upstream_outputs,
                "metadata": task.metadata,
            })),
            other => {
                return unknown(
                    format!(
                        "no built-in handler is called {other:?}; set node.metadata.worker.handler to one of {}",
                        HANDLERS.join(", ")
                    ),
                    named,
                );
            }
        };
        outcome.with_usage(usage)
    }
}

/// Sleeps `metadata.worker.ms`, reporting progress about once a second, and stops early when the
/// worker says so (cancel, deadline, shutdown).
async fn sleep(meta: &Value, ctx: &TaskContext) -> TaskOutcome {
    let ms = match meta.get("ms") {
        None | Some(Value::Null) => DEFAULT_SLEEP_MS,
        Some(v) => match v.as_u64() {
            Some(ms) if ms <= MAX_SLEEP_MS => ms,
            _ => {
                return TaskOutcome::failed(json!({
                    "handler": "sleep",
                    "error": "invalid sleep duration",
                    "detail": format!(
                        "node.metadata.worker.ms must be an integer number of milliseconds from 0 to {MAX_SLEEP_MS}, got {v}"
                    ),
                }));
            }
        },
    };
    let total = Duration::from_millis(ms);
    let start = tokio::time::Instant::now();
    let done = tokio::time::sleep(total);
    tokio::pin!(done);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = &mut done => break,
            _ = tick.tick() => {
                ctx.progress(format!("slept {} of {ms} ms", start.elapsed().as_millis()));
            }
            reason = ctx.cancelled() => {
                return TaskOutcome::failed(json!({
                    "handler": "sleep",
                    "error": "stopped",
                    "detail": format!("{reason:?}"),
                    "slept_ms": start.elapsed().as_millis() as u64,
                }));
            }
        }
    }
    TaskOutcome::completed(json!({"handler": "sleep", "slept_ms": ms}))
}
