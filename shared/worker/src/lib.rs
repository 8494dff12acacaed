//! `tandem-worker-sdk`: write a Tandem task worker in Rust.
//!
//! The protocol (docs/worker-protocol.md) in short: the scheduler publishes one
//! [`TaskMessage`] per node attempt on `tandem.tasks.<queue>` (stream `TANDEM_TASKS`, work queue,
//! `Nats-Msg-Id` = [`TaskMessage::task_id`]). Every worker of a queue binds to the queue's durable
//! pull consumer ([`tandem_bus::task_consumer_name`]) and competes for its messages. A worker runs
//! the task, publishes one [`TaskResult`] on `tandem.results.<run_id>` with the same
//! `Nats-Msg-Id`, waits for JetStream's PubAck, and only then acknowledges the task.
//!
//! ```no_run
//! use serde_json::json;
//! use tandem_worker_sdk::{TaskContext, TaskMessage, TaskOutcome, Worker};
//!
//! # async fn demo(client: async_nats::Client) -> Result<(), tandem_worker_sdk::WorkerError> {
//! let worker = Worker::builder(client, tandem_bus::Prefix::none())
//!     .queues(["default"])
//!     .concurrency(16)
//!     .build(|task: TaskMessage, ctx: TaskContext| async move {
//!         ctx.progress("thinking");
//!         TaskOutcome::completed(json!({"summary": task.objective}))
//!     })?;
//! let stats = worker.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! println!("{stats:?}");
//! # Ok(())
//! # }
//! ```
//!
//! What the worker does for you:
//!
//! * **Consumers.** One durable pull consumer per queue on `TANDEM_TASKS`, created by the first
//!   worker (explicit ack, `ack_wait` 30 s, `max_deliver` 5, deliver all) and shared by all.
//! * **Concurrency.** At most `concurrency` tasks at once across queues; it pulls only as many
//!   messages as it has free slots, so nothing waits in a local buffer while its `ack_wait` runs.
//! * **Liveness.** While a handler runs: `+WPI` progress acks three times per `ack_wait`, and a
//!   [`tandem_core::protocol::TaskProgress`] heartbeat on `tandem.progress.<run_id>` (core NATS)
//!   every `progress_interval` carrying the latest [`TaskContext::progress`] message.
//! * **Result, then ack.** The result is published and its PubAck awaited before the task's ack
//!   (confirmed with a double ack). Publish failures are retried, then the task is handed back.
//! * **Redeliveries.** A redelivered task this process already finished gets the same result
//!   re-published (JetStream reports the duplicate) and is acked, without running the handler.
//! * **Cancel.** A cancel hint on `tandem.control.cancel.<run_id>` stops the run's running
//!   handlers ([`TaskContext::cancelled`]); the task is acked **without a result**.
//! * **Deadline.** A task past `deadline_at_ms` is not run, and a handler still running at it is
//!   stopped: either way the result is `failed` with `output.error = "deadline exceeded"`.
//! * **Poison.** A message that is not a valid task is copied to `tandem.deadletter.tasks` (raw
//!   payload, headers, error), then terminated; a task delivered `max_deliver` times without an
//!   ack is copied there and deleted. `tandem_worker_deadletter_total` counts both.
//! * **Shutdown.** [`Worker::run`]'s shutdown future stops the pulling; running tasks get
//!   `drain_timeout` to finish, then are handed back to the queue.
//!
//! Metrics (through the `metrics` facade): `tandem_worker_tasks_total{queue,outcome}`,
//! `tandem_worker_task_duration_seconds{queue}`, `tandem_worker_in_flight`,
//! `tandem_worker_results_total{outcome=stored|duplicate}`,
//! `tandem_worker_result_publish_errors_total`, `tandem_worker_ack_errors_total`,
//! `tandem_worker_nacks_total{reason}`, `tandem_worker_heartbeats_total`,
//! `tandem_worker_cancel_hints_total`, `tandem_worker_deadletter_total{kind,reason}`.

mod cache;
pub mod config;
mod handler;
mod stats;
mod task;
mod worker;

pub use config::{WorkerConfig, consumer_config};
pub use handler::{StopReason, TaskContext, TaskHandler, TaskOutcome};
pub use stats::{StatsHandle, WorkerStats};
pub use tandem_core::protocol::{
    TaskCancel, TaskMessage, TaskProgress, TaskResult, TaskStatus, TaskUsage,
};
pub use worker::{BeforeAckHook, ResultPublished, Worker, WorkerBuilder};

/// Errors of the worker. Messages name the setting or the NATS operation involved.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid worker configuration: {0}")]
    InvalidConfig(String),
    #[error("NATS: {0}")]
    Nats(String),
}
