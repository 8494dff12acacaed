//! Worker settings and the consumer configuration they give.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use tandem_bus::{Prefix, task_consumer_name, task_subject};

use crate::WorkerError;

/// Default number of tasks a worker runs at once.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Default `ack_wait` of a task consumer: a task not acknowledged (nor kept alive with a
/// progress acknowledgement) within it is delivered again.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Default `max_deliver` of a task consumer.
pub const DEFAULT_MAX_DELIVER: i64 = 5;
/// Default interval of the `tandem.progress.<run_id>` heartbeats of a running task.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// Default time a pull request waits for tasks before the worker asks again.
pub const DEFAULT_FETCH_EXPIRES: Duration = Duration::from_secs(2);
/// Default time in-flight tasks get to finish at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(25);
/// Default time a cancelled or timed-out handler gets to return before it is dropped.
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Everything a [`crate::Worker`] is configured with. Build it with [`crate::WorkerBuilder`].
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Queues to consume (`tandem.tasks.<queue>`), without duplicates.
    pub queues: Vec<String>,
    /// Tasks run at once across all queues.
    pub concurrency: usize,
    /// `ack_wait` of consumers this worker creates. A worker binding to an existing consumer uses
    /// that consumer's own `ack_wait` to pace its progress acknowledgements.
    pub ack_wait: Duration,
    /// `max_deliver` of consumers this worker creates.
    pub max_deliver: i64,
    /// `max_ack_pending` of consumers this worker creates (`None`: the server's default).
    pub max_ack_pending: Option<i64>,
    /// Interval of the core-NATS progress heartbeats of a running task (the first one goes out
    /// one interval after the start, so short tasks send none).
    pub progress_interval: Duration,
    /// Most messages asked for in one pull request.
    pub fetch_batch: usize,
    /// How long one pull request waits for messages.
    pub fetch_expires: Duration,
    /// How long in-flight tasks may run after shutdown starts; the rest go back to the queue.
    pub drain_timeout: Duration,
    /// How long a cancelled or timed-out handler has to return before it is dropped.
    pub cancel_grace: Duration,
    /// How many completed results are remembered for redeliveries, and for how long.
    pub completed_capacity: usize,
    pub completed_ttl: Duration,
    /// Publish attempts of one result before the task is handed back to the queue.
    pub publish_attempts: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queues: vec![tandem_core::protocol::DEFAULT_TASK_QUEUE.to_owned()],
            concurrency: DEFAULT_CONCURRENCY,
            ack_wait: DEFAULT_ACK_WAIT,
            max_deliver: DEFAULT_MAX_DELIVER,
            max_ack_pending: None,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            fetch_batch: 64,
            fetch_expires: DEFAULT_FETCH_EXPIRES,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            cancel_grace: DEFAULT_CANCEL_GRACE,
            completed_capacity: 10_000,
            completed_ttl: Duration::from_secs(15 * 60),
            publish_attempts: 8,
        }
    }
}

impl WorkerConfig {
    /// Checks the settings; the message names the setting.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let bad = |m: String| Err(WorkerError::InvalidConfig(m));
        if self.queues.is_empty() {
            return bad("at least one queue is needed".into());
        }
        if let Some(q) = self.queues.iter().find(|q| q.trim().is_empty()) {
            return bad(format!("queue names must not be empty (got {q:?})"));
        }
        if self.concurrency == 0 || self.concurrency > 100_000 {
            return bad(format!(
                "concurrency must be between 1 and 100000 (got {})",
                self.concurrency
            ));
        }
        if self.ack_wait < Duration::from_secs(1) {
            return bad(format!(
                "ack_wait must be at least 1 s (got {:?})",
                self.ack_wait
            ));
        }
        if self.max_deliver < 1 {
            return bad(format!(
                "max_deliver must be at least 1 (got {}): redelivery must be bounded",
                self.max_deliver
            ));
        }
        if matches!(self.max_ack_pending, Some(n) if n < 1) {
            return bad("max_ack_pending must be at least 1".into());
        }
        if self.progress_interval.is_zero() || self.progress_interval >= self.ack_wait {
            return bad(format!(
                "progress_interval ({:?}) must be above 0 and below ack_wait ({:?})",
                self.progress_interval, self.ack_wait
            ));
        }
        if self.fetch_batch == 0 {
            return bad("fetch_batch must be at least 1".into());
        }
        if self.fetch_expires < Duration::from_millis(100) {
            return bad(format!(
                "fetch_expires must be at least 100 ms (got {:?})",
                self.fetch_expires
            ));
        }
        if self.publish_attempts == 0 {
            return bad("publish_attempts must be at least 1".into());
        }
        Ok(())
    }
}

/// The configuration of the durable pull consumer of `queue` on `TANDEM_TASKS`: name
/// [`task_consumer_name`], filter `tandem.tasks.<queue>`, explicit acks, deliver all.
pub fn consumer_config(prefix: &Prefix, queue: &str, config: &WorkerConfig) -> pull::Config {
    let name = task_consumer_name(queue);
    pull::Config {
        durable_name: Some(name),
        description: Some(format!("Tandem workers of task queue {queue:?}")),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_deliver: config.max_deliver,
        filter_subject: task_subject(prefix, queue),
        max_ack_pending: config.max_ack_pending.unwrap_or_default(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_named() {
        assert!(WorkerConfig::default().validate().is_ok());
        let c = WorkerConfig {
            concurrency: 0,
            ..WorkerConfig::default()
        };
        assert!(
            c.validate()
                .expect_err("rejected")
                .to_string()
                .contains("concurrency")
        );
        let c = WorkerConfig {
            max_deliver: -1,
            ..WorkerConfig::default()
        };
        assert!(
            c.validate()
                .expect_err("rejected")
                .to_string()
                .contains("max_deliver")
        );
        let c = WorkerConfig {
            progress_interval: Duration::from_secs(30),
            ..WorkerConfig::default()
        };
        assert!(c.validate().is_err());
        let c = WorkerConfig {
            queues: vec![" ".into()],
            ..WorkerConfig::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn consumer_is_durable_explicit_and_filtered() {
        let p = Prefix::new("t1").expect("valid");
        let c = consumer_config(&p, "gpu.large", &WorkerConfig::default());
        assert_eq!(c.durable_name.as_deref(), Some("tandem-tasks-gpu%2Elarge"));
        assert_eq!(c.filter_subject, "t1.tandem.tasks.gpu%2Elarge");
        assert_eq!(c.ack_policy, AckPolicy::Explicit);
        assert_eq!(c.max_deliver, DEFAULT_MAX_DELIVER);
        assert_eq!(c.ack_wait, DEFAULT_ACK_WAIT);
    }
}
