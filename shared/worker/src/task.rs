//! One task: run the handler under supervision (heartbeats, progress acks, deadline, cancel,
//! shutdown), then publish the result, wait for its PubAck, and only then acknowledge the task.

use std::{
    any::Any,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::FutureExt as _;
use serde_json::json;
use tandem_bus::{
    DeadLetter, OutgoingMessage, Published, progress_subject, publish, publish_dead_letter,
    result_subject, subject::DEADLETTER_TASKS,
};
use tandem_core::protocol::{TaskMessage, TaskProgress, TaskResult, TaskStatus};
use tokio::{
    sync::{OwnedSemaphorePermit, mpsc, watch},
    time::Instant,
};
use tracing::Instrument as _;

use crate::{
    cache::CachedResult,
    handler::{StopReason, TaskContext, TaskHandler, TaskOutcome},
    stats::bump,
    worker::{DeliveryInfo, ResultPublished, Shared, nak},
};

/// Delay before a task whose result could not be published is delivered again.
const REDELIVER_AFTER_PUBLISH_FAILURE: Duration = Duration::from_secs(5);
/// Delay before a malformed task whose dead letter could not be published is tried again.
const REDELIVER_AFTER_DEADLETTER_FAILURE: Duration = Duration::from_secs(5);
/// Room left for headers when checking a result against the server's `max_payload`.
const HEADER_ROOM: usize = 4096;

/// Milliseconds since the Unix epoch (the clock `deadline_at_ms` is compared with).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Everything [`run_task`] needs; built by the dispatcher, which registered the task as in flight.
pub(crate) struct TaskRun {
    pub queue: String,
    pub ack_wait: Duration,
    pub token: u64,
    pub task: TaskMessage,
    pub task_id: String,
    pub msg: jetstream::Message,
    pub delivered: u64,
    pub stop_tx: Arc<watch::Sender<Option<StopReason>>>,
    pub stop_rx: watch::Receiver<Option<StopReason>>,
    pub redeliveries: mpsc::UnboundedReceiver<jetstream::Message>,
    pub permit: OwnedSemaphorePermit,
}

/// Counts the task in `in_flight` while it lives, and unregisters it however it ends (also when
/// the job is aborted).
struct InFlightGuard<H: TaskHandler> {
    shared: Arc<Shared<H>>,
    task_id: String,
    token: u64,
}

impl<H: TaskHandler> InFlightGuard<H> {
    fn new(shared: Arc<Shared<H>>, task_id: String, token: u64) -> Self {
        shared
            .counters
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("tandem_worker_in_flight").increment(1.0);
        Self {
            shared,
            task_id,
            token,
        }
    }
}

impl<H: TaskHandler> Drop for InFlightGuard<H> {
    fn drop(&mut self) {
        self.shared
            .counters
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("tandem_worker_in_flight").decrement(1.0);
        self.shared
            .state()
            .remove_in_flight(&self.task_id, self.token);
    }
}

enum Supervised {
    Outcome(TaskOutcome),
    Cancelled(Option<String>),
    Abandoned,
}

pub(crate) async fn run_task<H: TaskHandler>(shared: Arc<Shared<H>>, run: TaskRun) {
    let span = tracing::info_span!(
        "task",
        queue = %run.queue,
        run_id = %run.task.run_id,
        node_id = %run.task.node_id,
        attempt = run.task.attempt,
        lease_epoch = run.task.lease_epoch,
        delivered = run.delivered,
    );
    execute(shared, run).instrument(span).await;
}

async fn execute<H: TaskHandler>(shared: Arc<Shared<H>>, run: TaskRun) {
    let TaskRun {
        queue,
        ack_wait,
        token,
        task,
        task_id,
        msg,
        delivered,
        stop_tx,
        stop_rx,
        mut redeliveries,
        permit: _permit,
    } = run;
    let _in_flight = InFlightGuard::new(Arc::clone(&shared), task_id.clone(), token);
    let traceparent = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(tandem_bus::subject::HEADER_TRACEPARENT))
        .map(|v| v.as_str().to_owned());
    let mut deliveries = vec![msg];
    let started = Instant::now();
    bump(&shared.counters.started);
    tracing::debug!(task_id, "task started");

    let now = now_ms();
    let outcome = match task.deadline_at_ms {
        Some(deadline) if now >= deadline => {
            bump(&shared.counters.deadline_exceeded);
            tracing::info!(
                task_id,
                deadline_at_ms = deadline,
                "task is past its deadline; failing it without running"
            );
            deadline_outcome(deadline, now, true)
        }
        _ => {
            let ctx = TaskContext::new(task_id.clone(), delivered, stop_rx.clone());
            let supervised = supervise(
                &shared,
                &task,
                &ctx,
                ack_wait,
                &stop_tx,
                stop_rx,
                &mut redeliveries,
                &mut deliveries,
            )
            .await;
            match supervised {
                Supervised::Outcome(o) => o,
                Supervised::Cancelled(reason) => {
                    {
                        let mut st = shared.state();
                        st.remove_in_flight(&task_id, token);
                        st.remember_cancel(&task.run_id, task.lease_epoch, Instant::now());
                    }
                    while let Ok(m) = redeliveries.try_recv() {
                        deliveries.push(m);
                    }
                    bump(&shared.counters.cancelled);
                    metrics::counter!("tandem_worker_tasks_total", "queue" => queue.clone(), "outcome" => "cancelled").increment(1);
                    tracing::info!(task_id, reason = ?reason, "task cancelled: acknowledged without a result");
                    ack_all(&shared, &deliveries).await;
                    return;
                }
                Supervised::Abandoned => {
                    shared.state().remove_in_flight(&task_id, token);
                    while let Ok(m) = redeliveries.try_recv() {
                        deliveries.push(m);
                    }
                    metrics::counter!("tandem_worker_tasks_total", "queue" => queue.clone(), "outcome" => "abandoned").increment(1);
                    tracing::warn!(
                        task_id,
                        "task abandoned at shutdown: handed back to the queue"
                    );
                    for d in &deliveries {
                        hand_back(&shared, d, None, "drain timeout").await;
                    }
                    return;
                }
            }
        }
    };

    let result = TaskResult::for_task(&task, outcome.status, outcome.output, outcome.usage);
    let cached = Arc::new(CachedResult {
        run_id: task.run_id.clone(),
        status: result.status,
        payload: encode_result(result, shared.max_payload),
        traceparent,
    });
    {
        // Atomically: a redelivery from now on finds the result instead of the running task.
        let mut st = shared.state();
        st.remove_in_flight(&task_id, token);
        st.completed
            .insert(task_id.clone(), Arc::clone(&cached), Instant::now());
    }
    while let Ok(m) = redeliveries.try_recv() {
        deliveries.push(m);
    }
    metrics::histogram!("tandem_worker_task_duration_seconds", "queue" => queue.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("tandem_worker_tasks_total", "queue" => queue.clone(), "outcome" => cached.status.as_str())
        .increment(1);
    tracing::debug!(task_id, status = cached.status.as_str(), "task finished");
    settle(&shared, &task_id, &cached, &deliveries, false).await;
}

#[allow(clippy::too_many_arguments)]
async fn supervise<H: TaskHandler>(
    shared: &Arc<Shared<H>>,
    task: &TaskMessage,
    ctx: &TaskContext,
    ack_wait: Duration,
    stop_tx: &watch::Sender<Option<StopReason>>,
    mut stop: watch::Receiver<Option<StopReason>>,
    redeliveries: &mut mpsc::UnboundedReceiver<jetstream::Message>,
    deliveries: &mut Vec<jetstream::Message>,
) -> Supervised {
    let cfg = &shared.cfg;
    let handler = AssertUnwindSafe(shared.handler.handle(task.clone(), ctx.clone())).catch_unwind();
    tokio::pin!(handler);
    let start = Instant::now();
    let mut heartbeat =
        tokio::time::interval_at(start + cfg.progress_interval, cfg.progress_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let keepalive_every = keepalive_interval(ack_wait);
    let mut keepalive = tokio::time::interval_at(start + keepalive_every, keepalive_every);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = task.deadline_at_ms;
    let deadline_at = deadline
        .map(|d| start + Duration::from_millis(d.saturating_sub(now_ms())))
        .unwrap_or(start + Duration::from_secs(365 * 24 * 3600));
    let deadline_sleep = tokio::time::sleep_until(deadline_at);
    tokio::pin!(deadline_sleep);

    loop {
        tokio::select! {
            r = &mut handler => {
                // A handler that returns because it was told to stop: its outcome is not the
                // task's (the stop reason decides what happens).
                let stopped = stop.borrow_and_update().clone();
                match stopped {
                    Some(StopReason::Cancelled { reason }) => return Supervised::Cancelled(reason),
                    Some(StopReason::Shutdown) => return Supervised::Abandoned,
                    Some(StopReason::DeadlineExceeded) | None => {}
                }
                return Supervised::Outcome(match r {
                    Ok(outcome) => outcome,
                    Err(panic) => panic_outcome(shared, panic),
                });
            }
            _ = heartbeat.tick() => send_heartbeat(shared, task, ctx.take_progress()).await,
            _ = keepalive.tick() => keep_alive(deliveries).await,
            Some(m) = redeliveries.recv() => {
                keep_alive(std::slice::from_ref(&m)).await;
                deliveries.push(m);
            }
            () = &mut deadline_sleep, if deadline.is_some() => {
                stop_tx.send_if_modified(|s| {
                    if s.is_none() {
                        *s = Some(StopReason::DeadlineExceeded);
                        true
                    } else {
                        false
                    }
                });
                let _ = tokio::time::timeout(cfg.cancel_grace, &mut handler).await;
                bump(&shared.counters.deadline_exceeded);
                let deadline = deadline.unwrap_or_default();
                tracing::info!(deadline_at_ms = deadline, "task deadline passed while running; failing it");
                return Supervised::Outcome(deadline_outcome(deadline, now_ms(), false));
            }
            changed = stop.changed() => {
                if changed.is_err() {
                    continue; // cannot happen: this task holds the sender
                }
                let reason = stop.borrow_and_update().clone();
                match reason {
                    Some(StopReason::Cancelled { reason }) => {
                        let _ = tokio::time::timeout(cfg.cancel_grace, &mut handler).await;
                        return Supervised::Cancelled(reason);
                    }
                    Some(StopReason::Shutdown) => return Supervised::Abandoned,
                    Some(StopReason::DeadlineExceeded) | None => {}
                }
            }
        }
    }
}

/// Progress acknowledgements restart `ack_wait`; send them three times per period.
fn keepalive_interval(ack_wait: Duration) -> Duration {
    (ack_wait / 3).max(Duration::from_millis(200))
}

fn panic_outcome<H: TaskHandler>(shared: &Shared<H>, panic: Box<dyn Any + Send>) -> TaskOutcome {
    bump(&shared.counters.handler_panics);
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned());
    tracing::error!(panic = %message, "task handler panicked; reporting the task as failed");
    TaskOutcome::failed(json!({
        "error": "the task handler panicked",
        "detail": message,
    }))
}

fn deadline_outcome(deadline_at_ms: u64, now_ms: u64, before_start: bool) -> TaskOutcome {
    let detail = if before_start {
        format!(
            "the task reached the worker after its deadline_at_ms ({deadline_at_ms}); now is {now_ms}, so it was not run"
        )
    } else {
        format!(
            "the task was still running at its deadline_at_ms ({deadline_at_ms}) and was stopped"
        )
    };
    TaskOutcome::failed(json!({
        "error": "deadline exceeded",
        "detail": detail,
        "deadline_at_ms": deadline_at_ms,
        "now_ms": now_ms,
    }))
}

/// The result's JSON. A result the server could not accept (over `max_payload`) or that cannot be
/// encoded becomes a `failed` result that says why, so the task still settles.
pub(crate) fn encode_result(mut result: TaskResult, max_payload: usize) -> Bytes {
    if !result.usage.cost_usd.is_finite() {
        tracing::warn!(
            cost_usd = result.usage.cost_usd,
            "handler reported a non-finite cost; sending 0"
        );
        result.usage.cost_usd = 0.0;
    }
    let limit = if max_payload == 0 {
        usize::MAX
    } else {
        max_payload.saturating_sub(HEADER_ROOM).max(1024)
    };
    let replacement = match serde_json::to_vec(&result) {
        Ok(v) if v.len() <= limit => return Bytes::from(v),
        Ok(v) => json!({
            "error": "result too large",
            "detail": format!(
                "the handler's result is {} bytes; the NATS server accepts at most {} per message",
                v.len(),
                limit
            ),
            "original_status": result.status.as_str(),
        }),
        Err(e) => json!({
            "error": "result cannot be encoded",
            "detail": e.to_string(),
            "original_status": result.status.as_str(),
        }),
    };
    tracing::warn!(output = %replacement, "reporting the task as failed instead of its result");
    result.status = TaskStatus::Failed;
    result.output = replacement;
    serde_json::to_vec(&result)
        .map(Bytes::from)
        .unwrap_or_else(|_| Bytes::from_static(b"{}"))
}

async fn send_heartbeat<H: TaskHandler>(
    shared: &Shared<H>,
    task: &TaskMessage,
    message: Option<String>,
) {
    let progress = TaskProgress::for_task(task, message);
    let Ok(payload) = serde_json::to_vec(&progress) else {
        return;
    };
    let subject = progress_subject(&shared.prefix, &task.run_id);
    match shared.client.publish(subject, payload.into()).await {
        Ok(()) => {
            bump(&shared.counters.heartbeats);
            metrics::counter!("tandem_worker_heartbeats_total").increment(1);
        }
        Err(e) => tracing::debug!(error = %e, "heartbeat not sent"),
    }
}

/// `+WPI` on every delivery of the task: restarts their `ack_wait`.
async fn keep_alive(deliveries: &[jetstream::Message]) {
    for d in deliveries {
        if let Err(e) = d.ack_with(AckKind::Progress).await {
            tracing::debug!(error = %e, "progress acknowledgement not sent");
        }
    }
}

/// Acknowledges every delivery of a settled task: the newest with a confirmed ack, older ones
/// with a plain one.
async fn ack_all<H: TaskHandler>(shared: &Shared<H>, deliveries: &[jetstream::Message]) {
    let Some((newest, older)) = deliveries.split_last() else {
        return;
    };
    for d in older {
        let _ = d.ack().await;
    }
    match newest.double_ack().await {
        Ok(()) => bump(&shared.counters.acked),
        Err(e) => {
            bump(&shared.counters.ack_errors);
            metrics::counter!("tandem_worker_ack_errors_total").increment(1);
            tracing::warn!(error = %e, "task acknowledgement not confirmed; a redelivery will re-publish the same result");
        }
    }
}

/// Publishes the result (retrying), waits for its PubAck, then acknowledges the task. If the
/// result cannot be published, the task goes back to the queue and nothing is acknowledged.
async fn settle<H: TaskHandler>(
    shared: &Shared<H>,
    task_id: &str,
    cached: &CachedResult,
    deliveries: &[jetstream::Message],
    republished: bool,
) {
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        match publish_result(shared, task_id, cached).await {
            Ok(p) => {
                bump(&shared.counters.results_published);
                if p.duplicate {
                    bump(&shared.counters.duplicate_results);
                }
                let label = if p.duplicate { "duplicate" } else { "stored" };
                metrics::counter!("tandem_worker_results_total", "outcome" => label).increment(1);
                if let Some(hook) = &shared.hook {
                    hook(ResultPublished {
                        task_id: task_id.to_owned(),
                        run_id: cached.run_id.clone(),
                        status: cached.status,
                        stream: p.stream.clone(),
                        sequence: p.sequence,
                        duplicate: p.duplicate,
                        republished,
                    })
                    .await;
                }
                ack_all(shared, deliveries).await;
                return;
            }
            Err(e) => {
                bump(&shared.counters.publish_errors);
                metrics::counter!("tandem_worker_result_publish_errors_total").increment(1);
                if attempt >= shared.cfg.publish_attempts {
                    tracing::error!(
                        task_id,
                        attempts = attempt,
                        error = %e,
                        "cannot publish the task's result; handing the task back to the queue"
                    );
                    for d in deliveries {
                        if nak(d, Some(REDELIVER_AFTER_PUBLISH_FAILURE)).await {
                            bump(&shared.counters.nacked);
                        }
                    }
                    return;
                }
                let delay = Duration::from_millis((100u64 << attempt.min(6)).min(5_000));
                tracing::warn!(task_id, attempt, retry_in_ms = delay.as_millis() as u64, error = %e, "publishing the result failed; retrying");
                keep_alive(deliveries).await;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn publish_result<H: TaskHandler>(
    shared: &Shared<H>,
    task_id: &str,
    cached: &CachedResult,
) -> Result<Published, tandem_bus::BusError> {
    let msg = OutgoingMessage::new(
        result_subject(&shared.prefix, &cached.run_id),
        task_id,
        cached.payload.clone(),
    )
    .with_traceparent(cached.traceparent.clone());
    publish(&shared.js, msg).await
}

/// A redelivery of a task this process already finished: publish the same result again and ack.
pub(crate) async fn republish<H: TaskHandler>(
    shared: Arc<Shared<H>>,
    queue: String,
    task_id: String,
    cached: Arc<CachedResult>,
    msg: jetstream::Message,
    _permit: OwnedSemaphorePermit,
) {
    bump(&shared.counters.republished);
    metrics::counter!("tandem_worker_tasks_total", "queue" => queue, "outcome" => "republished")
        .increment(1);
    tracing::info!(
        task_id,
        "redelivery of a task this worker already finished: re-publishing its result"
    );
    settle(&shared, &task_id, &cached, std::slice::from_ref(&msg), true).await;
}

/// A task of a run whose cancel hint (with its lease epoch) arrived before the task: ack it
/// without running it.
pub(crate) async fn ack_cancelled_before_start<H: TaskHandler>(
    shared: Arc<Shared<H>>,
    queue: String,
    task_id: String,
    msg: jetstream::Message,
    _permit: OwnedSemaphorePermit,
) {
    bump(&shared.counters.cancelled);
    metrics::counter!("tandem_worker_tasks_total", "queue" => queue, "outcome" => "cancelled")
        .increment(1);
    tracing::info!(
        task_id,
        "task of a cancelled run: acknowledged without running it"
    );
    ack_all(&shared, std::slice::from_ref(&msg)).await;
}

/// A message that is not a task: copy it to `tandem.deadletter.tasks`, wait for the PubAck, then
/// terminate it (`+TERM`, never redelivered).
pub(crate) async fn dead_letter_task<H: TaskHandler>(
    shared: Arc<Shared<H>>,
    queue: String,
    msg: jetstream::Message,
    info: DeliveryInfo,
    error: String,
    _permit: OwnedSemaphorePermit,
) {
    let preview: String = String::from_utf8_lossy(&msg.payload[..msg.payload.len().min(200)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let letter = DeadLetter {
        kind: DEADLETTER_TASKS.into(),
        subject: msg.subject.to_string(),
        stream: info.stream.clone(),
        sequence: info.sequence,
        delivered: info.delivered,
        payload: msg.payload.clone(),
        headers: msg.headers.clone(),
        error: error.clone(),
    };
    match publish_dead_letter(&shared.js, &shared.prefix, &letter).await {
        Ok(_) => {
            bump(&shared.counters.deadlettered);
            metrics::counter!("tandem_worker_deadletter_total", "kind" => DEADLETTER_TASKS, "reason" => "malformed")
                .increment(1);
            tracing::warn!(
                queue,
                subject = %msg.subject,
                stream = %info.stream,
                sequence = info.sequence,
                bytes = msg.payload.len(),
                payload_preview = %preview,
                error = %error,
                "malformed task message: copied to the dead letters and terminated"
            );
            if let Err(e) = msg.double_ack_with(AckKind::Term).await {
                bump(&shared.counters.ack_errors);
                tracing::warn!(error = %e, "terminating the malformed message was not confirmed");
            }
        }
        Err(e) => {
            tracing::error!(
                queue,
                sequence = info.sequence,
                error = %e,
                "cannot publish a dead letter for a malformed task; it will be delivered again"
            );
            if nak(&msg, Some(REDELIVER_AFTER_DEADLETTER_FAILURE)).await {
                bump(&shared.counters.nacked);
            }
        }
    }
}

/// Hands a received message back to the queue for another worker, after `delay` (`None`: at
/// once).
pub(crate) async fn hand_back<H: TaskHandler>(
    shared: &Shared<H>,
    msg: &jetstream::Message,
    delay: Option<Duration>,
    why: &'static str,
) {
    if nak(msg, delay).await {
        bump(&shared.counters.nacked);
        metrics::counter!("tandem_worker_nacks_total", "reason" => why).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::protocol::TaskUsage;

    fn result(output: serde_json::Value) -> TaskResult {
        TaskResult {
            run_id: "r".into(),
            node_id: "n".into(),
            attempt: 1,
            lease_epoch: 1,
            status: TaskStatus::Completed,
            output,
            usage: TaskUsage {
                prompt_tokens: 1,
                completion_tokens: 2,
                cost_usd: f64::NAN,
            },
        }
    }

    #[test]
    fn results_are_encoded_and_oversize_ones_fail_clearly() {
        let ok = encode_result(result(json!({"a": 1})), 1 << 20);
        let back: TaskResult = serde_json::from_slice(&ok).expect("valid result");
        assert_eq!(back.status, TaskStatus::Completed);
        assert_eq!(back.usage.cost_usd, 0.0, "NaN cost is sent as 0");

        let big = encode_result(result(json!({"blob": "x".repeat(10_000)})), 8192);
        let back: TaskResult = serde_json::from_slice(&big).expect("valid result");
        assert_eq!(back.status, TaskStatus::Failed);
        assert_eq!(back.output["error"], "result too large");
        assert_eq!(back.output["original_status"], "completed");
    }

    #[test]
    fn deadline_outcomes_say_what_happened() {
        let o = deadline_outcome(10, 20, true);
        assert_eq!(o.status, TaskStatus::Failed);
        assert_eq!(o.output["error"], "deadline exceeded");
        assert!(
            o.output["detail"]
                .as_str()
                .is_some_and(|d| d.contains("not run"))
        );
        let o = deadline_outcome(10, 20, false);
        assert!(
            o.output["detail"]
                .as_str()
                .is_some_and(|d| d.contains("stopped"))
        );
    }

    #[test]
    fn keepalive_runs_three_times_per_ack_wait() {
        assert_eq!(
            keepalive_interval(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(
            keepalive_interval(Duration::from_millis(300)),
            Duration::from_millis(200)
        );
    }
}
