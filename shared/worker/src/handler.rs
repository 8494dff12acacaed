//! What a task handler implements ([`TaskHandler`]), what it gets ([`TaskContext`]) and what it
//! returns ([`TaskOutcome`]).

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use serde_json::Value;
use tandem_core::protocol::{TaskMessage, TaskStatus, TaskUsage};
use tokio::sync::watch;

/// What a handler reports for one attempt; the worker turns it into the attempt's
/// [`tandem_core::protocol::TaskResult`].
#[derive(Debug, Clone, PartialEq)]
pub struct TaskOutcome {
    pub status: TaskStatus,
    pub output: Value,
    pub usage: TaskUsage,
}

impl TaskOutcome {
    pub fn new(status: TaskStatus, output: Value) -> Self {
        Self {
            status,
            output,
            usage: TaskUsage::default(),
        }
    }

    pub fn completed(output: Value) -> Self {
        Self::new(TaskStatus::Completed, output)
    }

    pub fn needs_repair(output: Value) -> Self {
        Self::new(TaskStatus::NeedsRepair, output)
    }

    pub fn failed(output: Value) -> Self {
        Self::new(TaskStatus::Failed, output)
    }

    pub fn blocked(output: Value) -> Self {
        Self::new(TaskStatus::Blocked, output)
    }

    pub fn with_usage(mut self, usage: TaskUsage) -> Self {
        self.usage = usage;
        self
    }
}

/// Runs one task attempt. Implement it for a type, or pass an async closure
/// `|task, ctx| async move { TaskOutcome::completed(json!({})) }`.
///
/// A handler should return promptly once [`TaskContext::cancelled`] resolves (its outcome is then
/// ignored); one that does not is dropped after the worker's cancel grace period.
pub trait TaskHandler: Send + Sync + 'static {
    fn handle(
        &self,
        task: TaskMessage,
        ctx: TaskContext,
    ) -> impl Future<Output = TaskOutcome> + Send;
}

impl<F, Fut> TaskHandler for F
where
    F: Fn(TaskMessage, TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = TaskOutcome> + Send,
{
    fn handle(
        &self,
        task: TaskMessage,
        ctx: TaskContext,
    ) -> impl Future<Output = TaskOutcome> + Send {
        self(task, ctx)
    }
}

/// Why a running handler is asked to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A cancel hint arrived for the task's run (`tandem.control.cancel.<run_id>`). The task is
    /// acknowledged without a result.
    Cancelled { reason: Option<String> },
    /// `deadline_at_ms` passed. The worker reports a `failed` result that says so.
    DeadlineExceeded,
    /// The worker is shutting down and its drain period is over. The task goes back to the queue
    /// (negative acknowledgement) for another worker.
    Shutdown,
}

/// The handler's view of its task: coalesced progress reports and the stop signal.
#[derive(Debug, Clone)]
pub struct TaskContext {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    task_id: String,
    delivered: u64,
    progress: Mutex<Option<String>>,
    stop: watch::Receiver<Option<StopReason>>,
}

impl TaskContext {
    pub(crate) fn new(
        task_id: String,
        delivered: u64,
        stop: watch::Receiver<Option<StopReason>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                task_id,
                delivered,
                progress: Mutex::new(None),
                stop,
            }),
        }
    }

    /// A context outside any worker (to unit-test a handler): progress goes nowhere and it is
    /// never cancelled.
    pub fn detached(task_id: impl Into<String>) -> Self {
        // With the sender gone, `cancelled` stays pending forever.
        let (_, rx) = watch::channel(None);
        Self::new(task_id.into(), 1, rx)
    }

    /// `run_id:node_id:attempt:lease_epoch`, the task's idempotency key.
    pub fn task_id(&self) -> &str {
        &self.inner.task_id
    }

    /// How many times JetStream has delivered this task (1 the first time).
    pub fn delivered(&self) -> u64 {
        self.inner.delivered
    }

    /// Reports progress. Cheap and non-blocking: the worker sends the latest message with its next
    /// heartbeat (`tandem.progress.<run_id>`), so calling it often costs nothing extra.
    pub fn progress(&self, message: impl Into<String>) {
        let mut slot = self
            .inner
            .progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = Some(message.into());
    }

    /// The message of the next heartbeat, if the handler reported one since the last heartbeat.
    pub(crate) fn take_progress(&self) -> Option<String> {
        self.inner
            .progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Why the handler must stop, once it must.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.inner.stop.borrow().clone()
    }

    /// Whether the handler must stop (cancelled, past its deadline, or abandoned at shutdown).
    pub fn is_cancelled(&self) -> bool {
        self.inner.stop.borrow().is_some()
    }

    /// Resolves when the handler must stop, with the reason. Use it in `tokio::select!` next to
    /// the work.
    pub async fn cancelled(&self) -> StopReason {
        let mut rx = self.inner.stop.clone();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                // The worker dropped the task (and will drop this handler): never resolves.
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn progress_is_coalesced_and_stop_is_observed() {
        let (tx, rx) = watch::channel(None);
        let ctx = TaskContext::new("r:n:1:1".into(), 1, rx);
        assert_eq!(ctx.take_progress(), None);
        ctx.progress("a");
        ctx.progress("b");
        assert_eq!(ctx.take_progress().as_deref(), Some("b"));
        assert_eq!(ctx.take_progress(), None);
        assert!(!ctx.is_cancelled());
        let waiter = {
            let ctx = ctx.clone();
            tokio::spawn(async move { ctx.cancelled().await })
        };
        tx.send_replace(Some(StopReason::DeadlineExceeded));
        let reason = tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(reason, StopReason::DeadlineExceeded);
        assert!(ctx.is_cancelled());
    }
}
