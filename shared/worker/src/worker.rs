//! The worker: binds one durable consumer per queue, pulls tasks while it has free slots, runs
//! them ([`crate::task`]), listens for cancel hints and for tasks that ran out of deliveries, and
//! drains at shutdown.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_nats::{
    Client, Subscriber,
    jetstream::{
        self, AckKind,
        consumer::PullConsumer,
        stream::{LastRawMessageErrorKind, Stream as JsStream},
    },
};
use futures::StreamExt as _;
use serde::Deserialize;
use tandem_bus::{
    DeadLetter, Prefix, StreamNames, cancel_wildcard_subject, publish_dead_letter,
    run_id_of_cancel_subject, subject::DEADLETTER_TASKS, task_consumer_name,
};
use tandem_core::protocol::{TaskCancel, TaskMessage, TaskStatus};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
    task::{AbortHandle, JoinSet},
    time::Instant,
};

use crate::{
    WorkerError,
    cache::CompletedCache,
    config::{WorkerConfig, consumer_config},
    handler::{StopReason, TaskHandler},
    stats::{Counters, StatsHandle, WorkerStats, bump},
    task::{self, TaskRun},
};

/// How long a cancel hint that named a lease epoch keeps stopping tasks of that run (and epoch or
/// earlier) that arrive after it.
const CANCEL_MEMORY: Duration = Duration::from_secs(120);
/// After the drain timeout, how long abandoned tasks get to hand their messages back.
const ABANDON_GRACE: Duration = Duration::from_secs(2);
/// Queue group of the max-deliveries advisory subscription: one worker handles each advisory.
const ADVISORY_GROUP: &str = "tandem-workers";

/// Called after a result's PubAck and before the task's ack (see [`WorkerBuilder::before_ack`]).
pub type BeforeAckHook =
    Arc<dyn Fn(ResultPublished) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A result JetStream has stored (or recognised as a duplicate), about to be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultPublished {
    pub task_id: String,
    pub run_id: String,
    pub status: TaskStatus,
    pub stream: String,
    pub sequence: u64,
    /// The PubAck said a result with this `Nats-Msg-Id` was already stored.
    pub duplicate: bool,
    /// Re-published from the completed-results cache for a redelivery (the handler did not run).
    pub republished: bool,
}

/// Builds a [`Worker`]: `Worker::builder(client, prefix).queues(["default"]).concurrency(16)
/// .build(handler)`.
pub struct WorkerBuilder {
    client: Client,
    prefix: Prefix,
    config: WorkerConfig,
    queues_set: bool,
    hook: Option<BeforeAckHook>,
}

impl WorkerBuilder {
    /// The queues to consume, replacing the default (`default`). Duplicates are dropped.
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.queues.clear();
        self.queues_set = true;
        for q in queues {
            self = self.queue(q);
        }
        self
    }

    /// Adds a queue (the first call replaces the default `default`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        if !self.queues_set {
            self.config.queues.clear();
            self.queues_set = true;
        }
        let q = queue.into();
        if !self.config.queues.contains(&q) {
            self.config.queues.push(q);
        }
        self
    }

    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    pub fn ack_wait(mut self, d: Duration) -> Self {
        self.config.ack_wait = d;
        self
    }

    pub fn max_deliver(mut self, n: i64) -> Self {
        self.config.max_deliver = n;
        self
    }

    pub fn max_ack_pending(mut self, n: Option<i64>) -> Self {
        self.config.max_ack_pending = n;
        self
    }

    pub fn progress_interval(mut self, d: Duration) -> Self {
        self.config.progress_interval = d;
        self
    }

    pub fn fetch_batch(mut self, n: usize) -> Self {
        self.config.fetch_batch = n;
        self
    }

    pub fn fetch_expires(mut self, d: Duration) -> Self {
        self.config.fetch_expires = d;
        self
    }

    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.config.drain_timeout = d;
        self
    }

    pub fn cancel_grace(mut self, d: Duration) -> Self {
        self.config.cancel_grace = d;
        self
    }

    pub fn completed_cache(mut self, capacity: usize, ttl: Duration) -> Self {
        self.config.completed_capacity = capacity;
        self.config.completed_ttl = ttl;
        self
    }

    pub fn publish_attempts(mut self, n: u32) -> Self {
        self.config.publish_attempts = n;
        self
    }

    /// Replaces every setting at once.
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.config = config;
        self.queues_set = true;
        self
    }

    /// Runs `hook` after each result's PubAck and before the task is acknowledged; the ack waits
    /// for it. Meant for observation and for tests that must act in that window (a hook that
    /// never returns simulates a crash between the result and the ack).
    pub fn before_ack<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(ResultPublished) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.hook = Some(Arc::new(move |p| Box::pin(hook(p))));
        self
    }

    /// Checks the settings and returns the worker, ready to [`Worker::run`].
    pub fn build<H: TaskHandler>(self, handler: H) -> Result<Worker<H>, WorkerError> {
        self.config.validate()?;
        let js = tandem_bus::jetstream(self.client.clone());
        Ok(Worker {
            client: self.client,
            js,
            prefix: self.prefix,
            config: self.config,
            handler,
            hook: self.hook,
            stats: StatsHandle::default(),
        })
    }
}

/// A task worker. See the crate documentation for the protocol it follows.
pub struct Worker<H> {
    client: Client,
    js: jetstream::Context,
    prefix: Prefix,
    config: WorkerConfig,
    handler: H,
    hook: Option<BeforeAckHook>,
    stats: StatsHandle,
}

impl Worker<()> {
    /// Starts building a worker on `client` for the fleet's subject/stream `prefix`.
    pub fn builder(client: Client, prefix: Prefix) -> WorkerBuilder {
        WorkerBuilder {
            client,
            prefix,
            config: WorkerConfig::default(),
            queues_set: false,
            hook: None,
        }
    }
}

/// One task running in this process.
pub(crate) struct InFlight {
    pub token: u64,
    pub run_id: String,
    pub lease_epoch: i64,
    pub stop: Arc<watch::Sender<Option<StopReason>>>,
    pub redeliveries: mpsc::UnboundedSender<jetstream::Message>,
}

pub(crate) struct State {
    pub in_flight: HashMap<String, InFlight>,
    pub completed: CompletedCache,
    /// run id → (when, highest cancelled lease epoch).
    cancelled_runs: HashMap<String, (Instant, i64)>,
    next_token: u64,
}

impl State {
    /// Removes the in-flight entry of `task_id` if it is still the one registered with `token`.
    pub fn remove_in_flight(&mut self, task_id: &str, token: u64) {
        if self
            .in_flight
            .get(task_id)
            .is_some_and(|e| e.token == token)
        {
            self.in_flight.remove(task_id);
        }
    }

    /// Remembers that tasks of `run_id` up to `lease_epoch` are cancelled.
    pub fn remember_cancel(&mut self, run_id: &str, lease_epoch: i64, now: Instant) {
        self.cancelled_runs
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < CANCEL_MEMORY);
        let entry = self
            .cancelled_runs
            .entry(run_id.to_owned())
            .or_insert((now, lease_epoch));
        *entry = (now, entry.1.max(lease_epoch));
    }

    fn is_cancelled(&self, run_id: &str, lease_epoch: i64, now: Instant) -> bool {
        self.cancelled_runs.get(run_id).is_some_and(|(at, max)| {
            now.saturating_duration_since(*at) < CANCEL_MEMORY && lease_epoch <= *max
        })
    }

    /// Signals every in-flight task of `run_id` (with `lease_epoch <= max_epoch` when given).
    fn cancel_run(
        &mut self,
        run_id: &str,
        max_epoch: Option<i64>,
        reason: Option<String>,
    ) -> usize {
        let mut n = 0;
        for e in self.in_flight.values() {
            if e.run_id == run_id && max_epoch.is_none_or(|max| e.lease_epoch <= max) {
                let reason = reason.clone();
                e.stop.send_if_modified(|s| {
                    if s.is_none() {
                        *s = Some(StopReason::Cancelled { reason });
                        true
                    } else {
                        false
                    }
                });
                n += 1;
            }
        }
        if let Some(max) = max_epoch {
            self.remember_cancel(run_id, max, Instant::now());
        }
        n
    }
}

/// What the worker's tasks share.
pub(crate) struct Shared<H> {
    pub cfg: WorkerConfig,
    pub client: Client,
    pub js: jetstream::Context,
    pub prefix: Prefix,
    pub handler: H,
    pub hook: Option<BeforeAckHook>,
    pub counters: Arc<Counters>,
    pub state: Mutex<State>,
    pub jobs: Arc<Mutex<JoinSet<()>>>,
    pub sem: Arc<Semaphore>,
    pub stopping: watch::Receiver<bool>,
    /// Largest message the server accepts (0: unknown).
    pub max_payload: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<H: TaskHandler> Shared<H> {
    pub fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Spawns a task-handling job; the worker waits for these at shutdown.
    pub fn spawn_job<F>(&self, job: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut jobs = lock(&self.jobs);
        while let Some(done) = jobs.try_join_next() {
            log_join(done);
        }
        jobs.spawn(job);
    }
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "a worker job panicked");
    }
}

/// A bound queue: its consumer and the settings the server holds for it.
pub(crate) struct Binding {
    pub queue: String,
    pub consumer: PullConsumer,
    pub stream: String,
    pub name: String,
    /// The consumer's own `ack_wait` (paces the progress acknowledgements).
    pub ack_wait: Duration,
}

/// Aborts the worker's background tasks and jobs if [`Worker::run`] is dropped before it returns.
struct AbortGuard {
    jobs: Arc<Mutex<JoinSet<()>>>,
    handles: Vec<AbortHandle>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        for h in &self.handles {
            h.abort();
        }
        lock(&self.jobs).abort_all();
    }
}

impl<H: TaskHandler> Worker<H> {
    /// The worker's counters; the handle stays valid while and after it runs.
    pub fn stats(&self) -> StatsHandle {
        self.stats.clone()
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Consumes tasks until `shutdown` resolves, then stops pulling, lets in-flight tasks finish
    /// (up to the drain timeout; the rest are handed back to the queue) and returns the counters.
    ///
    /// The streams must exist (every Tandem service ensures them at startup, or call
    /// [`tandem_bus::ensure_streams`]); the worker waits, retrying, until they do. Dropping the
    /// returned future stops everything at once, as a crash would (unacknowledged tasks are
    /// redelivered after `ack_wait`).
    pub async fn run<S>(self, shutdown: S) -> Result<WorkerStats, WorkerError>
    where
        S: Future<Output = ()> + Send,
    {
        let Worker {
            client,
            js,
            prefix,
            config,
            handler,
            hook,
            stats,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let jobs = Arc::new(Mutex::new(JoinSet::new()));
        let shared = Arc::new(Shared {
            max_payload: client.server_info().max_payload,
            sem: Arc::new(Semaphore::new(config.concurrency)),
            state: Mutex::new(State {
                in_flight: HashMap::new(),
                completed: CompletedCache::new(config.completed_capacity, config.completed_ttl),
                cancelled_runs: HashMap::new(),
                next_token: 0,
            }),
            cfg: config,
            client,
            js,
            prefix,
            handler,
            hook,
            counters: Arc::clone(&stats.0),
            jobs: Arc::clone(&jobs),
            stopping: stop_rx,
        });
        let mut guard = AbortGuard {
            jobs,
            handles: Vec::new(),
        };

        tokio::pin!(shutdown);
        let bindings = tokio::select! {
            b = bind_all(&shared) => b,
            () = &mut shutdown => {
                tracing::info!("shutdown before the worker bound its queues");
                return Ok(stats.snapshot());
            }
        };

        let cancel_subject = cancel_wildcard_subject(&shared.prefix);
        let cancel_sub = shared
            .client
            .subscribe(cancel_subject.clone())
            .await
            .map_err(|e| WorkerError::Nats(format!("subscribing to {cancel_subject}: {e}")))?;
        guard
            .handles
            .push(tokio::spawn(cancel_loop(Arc::clone(&shared), cancel_sub)).abort_handle());
        for b in &bindings {
            let subject = format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
                b.stream, b.name
            );
            let sub = shared
                .client
                .queue_subscribe(subject.clone(), ADVISORY_GROUP.into())
                .await
                .map_err(|e| WorkerError::Nats(format!("subscribing to {subject}: {e}")))?;
            guard
                .handles
                .push(tokio::spawn(max_deliveries_loop(Arc::clone(&shared), sub)).abort_handle());
        }
        let queues: Vec<String> = bindings.iter().map(|b| b.queue.clone()).collect();
        let mut fetchers = Vec::with_capacity(bindings.len());
        for b in bindings {
            let h = tokio::spawn(fetch_loop(Arc::clone(&shared), b));
            guard.handles.push(h.abort_handle());
            fetchers.push(h);
        }
        tracing::info!(
            queues = ?queues,
            concurrency = shared.cfg.concurrency,
            "worker consuming tasks"
        );

        shutdown.await;
        let drain_deadline = Instant::now() + shared.cfg.drain_timeout;
        tracing::info!(
            in_flight = shared.state().in_flight.len(),
            drain_timeout_ms = shared.cfg.drain_timeout.as_millis() as u64,
            "worker stopping: no new tasks, draining in-flight tasks"
        );
        stop_tx.send_replace(true);
        // A pull request in progress ends by itself within `fetch_expires` (what it still brings
        // is handed back); the client gives up 5 s after that.
        let fetch_limit = shared.cfg.fetch_expires + Duration::from_secs(6);
        for f in fetchers {
            let abort = f.abort_handle();
            if tokio::time::timeout(fetch_limit, f).await.is_err() {
                abort.abort();
            }
        }

        let mut jobs = std::mem::take(&mut *lock(&shared.jobs));
        let drained = tokio::time::timeout_at(drain_deadline, join_all(&mut jobs))
            .await
            .is_ok();
        if !drained {
            let abandoned: Vec<_> = shared
                .state()
                .in_flight
                .values()
                .map(|e| Arc::clone(&e.stop))
                .collect();
            tracing::warn!(
                tasks = abandoned.len(),
                "drain timeout: handing in-flight tasks back to the queue"
            );
            for stop in abandoned {
                stop.send_replace(Some(StopReason::Shutdown));
            }
            if tokio::time::timeout(ABANDON_GRACE, join_all(&mut jobs))
                .await
                .is_err()
            {
                jobs.abort_all();
                join_all(&mut jobs).await;
            }
        }
        drop(guard);
        match tokio::time::timeout(Duration::from_secs(2), shared.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "NATS flush at worker stop failed"),
            Err(_) => tracing::warn!("NATS flush at worker stop timed out"),
        }
        let snapshot = stats.snapshot();
        tracing::info!(stats = ?snapshot, "worker stopped");
        Ok(snapshot)
    }
}

async fn join_all(jobs: &mut JoinSet<()>) {
    while let Some(done) = jobs.join_next().await {
        log_join(done);
    }
}

fn backoff(failures: u32) -> Duration {
    let ms = 250u64.saturating_mul(1u64 << failures.min(6));
    Duration::from_millis(ms.min(10_000))
}

/// How long after its expiry a pull request is given up (see `fetch_loop`).
fn watchdog_grace(cfg: &WorkerConfig) -> Duration {
    (cfg.fetch_expires / 2).clamp(Duration::from_millis(250), Duration::from_secs(2))
}

/// Sleeps unless the worker stops first; `false` when it stopped.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

async fn bind_all<H: TaskHandler>(shared: &Arc<Shared<H>>) -> Vec<Binding> {
    let mut out = Vec::with_capacity(shared.cfg.queues.len());
    for queue in &shared.cfg.queues {
        let mut failures = 0;
        loop {
            match bind(shared, queue).await {
                Ok(b) => {
                    out.push(b);
                    break;
                }
                Err(e) => {
                    failures += 1;
                    let delay = backoff(failures);
                    tracing::warn!(
                        queue,
                        attempt = failures,
                        retry_in_ms = delay.as_millis() as u64,
                        error = %e,
                        "cannot bind the task consumer yet; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
    out
}

/// Gets or creates the queue's durable consumer and reads back the settings it has.
async fn bind<H: TaskHandler>(shared: &Shared<H>, queue: &str) -> Result<Binding, String> {
    let stream_name = StreamNames::new(&shared.prefix).tasks;
    let stream: JsStream = shared
        .js
        .get_stream(&stream_name)
        .await
        .map_err(|e| format!("stream {stream_name}: {e}"))?;
    let want = consumer_config(&shared.prefix, queue, &shared.cfg);
    let name = task_consumer_name(queue);
    let consumer: PullConsumer = stream
        .get_or_create_consumer(&name, want.clone())
        .await
        .map_err(|e| format!("consumer {name} on {stream_name}: {e}"))?;
    let have = &consumer.cached_info().config;
    if have.filter_subject != want.filter_subject {
        return Err(format!(
            "consumer {name} on {stream_name} filters {:?}, not {:?}; delete it",
            have.filter_subject, want.filter_subject
        ));
    }
    let ack_wait = if have.ack_wait.is_zero() {
        crate::config::DEFAULT_ACK_WAIT // the server's default
    } else {
        have.ack_wait
    };
    if have.ack_wait != want.ack_wait || have.max_deliver != want.max_deliver {
        tracing::info!(
            consumer = %name,
            ack_wait_ms = ack_wait.as_millis() as u64,
            max_deliver = have.max_deliver,
            "bound to an existing consumer whose settings differ from this worker's; keeping them"
        );
    }
    Ok(Binding {
        queue: queue.to_owned(),
        consumer,
        stream: stream_name,
        name,
        ack_wait,
    })
}

/// Pulls tasks of one queue while the worker has free slots, until it stops.
async fn fetch_loop<H: TaskHandler>(shared: Arc<Shared<H>>, mut b: Binding) {
    let mut stop = shared.stopping.clone();
    let mut failures: u32 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let first = tokio::select! {
            p = Arc::clone(&shared.sem).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut permits = vec![first];
        while permits.len() < shared.cfg.fetch_batch {
            match Arc::clone(&shared.sem).try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let request = b
            .consumer
            .batch()
            .max_messages(permits.len())
            .expires(shared.cfg.fetch_expires)
            .messages()
            .await;
        let mut batch = match request {
            Ok(batch) => batch,
            Err(e) => {
                drop(permits);
                failures += 1;
                tracing::warn!(queue = %b.queue, attempt = failures, error = %e, "pull request failed");
                if !pause(&mut stop, backoff(failures)).await {
                    return;
                }
                rebind(&shared, &mut b).await;
                continue;
            }
        };
        // The server ends a pull request with a 408 once `fetch_expires` is over. Observed on
        // nats-server 2.9.10: a request whose expiry coincides with a redelivery sometimes gets
        // neither its message nor its 408 (the client would wait 5 s more, and the redelivery
        // waits another ack_wait). So give up on a request shortly after it should have ended.
        let ends_by = Instant::now() + shared.cfg.fetch_expires + watchdog_grace(&shared.cfg);
        let mut failed = false;
        loop {
            let item = match tokio::time::timeout_at(ends_by, batch.next()).await {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(_) => {
                    metrics::counter!("tandem_worker_stalled_pulls_total").increment(1);
                    tracing::debug!(queue = %b.queue, "pull request overran its expiry; pulling again");
                    break;
                }
            };
            match item {
                Ok(msg) => {
                    failures = 0;
                    match permits.pop() {
                        Some(permit) if !*stop.borrow() => dispatch(&shared, &b, msg, permit),
                        // Delayed past this pull request's end: handed back at once, the message
                        // would come straight back to this same request (burning deliveries).
                        _ => {
                            let delay = shared.cfg.fetch_expires + Duration::from_secs(1);
                            task::hand_back(&shared, &msg, Some(delay), "worker stopping").await;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %b.queue, error = %e, "pull request ended with an error");
                    failed = true;
                    break;
                }
            }
        }
        drop(permits);
        if failed {
            failures += 1;
            if !pause(&mut stop, backoff(failures)).await {
                return;
            }
            if failures >= 2 {
                rebind(&shared, &mut b).await;
            }
        }
    }
}

/// Binds the queue's consumer again (it may have been deleted, or the stream recreated).
async fn rebind<H: TaskHandler>(shared: &Shared<H>, b: &mut Binding) {
    match bind(shared, &b.queue).await {
        Ok(fresh) => *b = fresh,
        Err(e) => tracing::warn!(queue = %b.queue, error = %e, "cannot bind the task consumer"),
    }
}

/// Where a delivery came from.
#[derive(Debug, Clone)]
pub(crate) struct DeliveryInfo {
    pub stream: String,
    pub sequence: u64,
    pub delivered: u64,
}

/// Parses and checks a task message; the error says what is wrong.
pub(crate) fn parse_task(payload: &[u8]) -> Result<TaskMessage, String> {
    let task: TaskMessage = serde_json::from_slice(payload)
        .map_err(|e| format!("not a valid task message (JSON TaskMessage): {e}"))?;
    if task.run_id.is_empty() {
        return Err("not a valid task message: run_id is empty".into());
    }
    if task.node_id.is_empty() {
        return Err("not a valid task message: node_id is empty".into());
    }
    if task.attempt == 0 {
        return Err("not a valid task message: attempt must be at least 1".into());
    }
    Ok(task)
}

fn dispatch<H: TaskHandler>(
    shared: &Arc<Shared<H>>,
    b: &Binding,
    msg: jetstream::Message,
    permit: OwnedSemaphorePermit,
) {
    bump(&shared.counters.received);
    let info = match msg.info() {
        Ok(i) => DeliveryInfo {
            stream: i.stream.to_owned(),
            sequence: i.stream_sequence,
            delivered: u64::try_from(i.delivered).unwrap_or(0),
        },
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "message without a JetStream reply subject; ignored");
            return;
        }
    };
    let task = match parse_task(&msg.payload) {
        Ok(task) => task,
        Err(error) => {
            shared.spawn_job(task::dead_letter_task(
                Arc::clone(shared),
                b.queue.clone(),
                msg,
                info,
                error,
                permit,
            ));
            return;
        }
    };
    let task_id = task.task_id();
    let now = Instant::now();
    let mut st = shared.state();
    if let Some(cached) = st.completed.get(&task_id, now) {
        drop(st);
        shared.spawn_job(task::republish(
            Arc::clone(shared),
            b.queue.clone(),
            task_id,
            cached,
            msg,
            permit,
        ));
        return;
    }
    if let Some(entry) = st.in_flight.get(&task_id) {
        // Redelivered while this process still runs it (ack_wait lapsed, e.g. during a
        // disconnect): the running task acknowledges this delivery too. The slot is not needed.
        tracing::debug!(
            task_id,
            delivered = info.delivered,
            "redelivery of a running task"
        );
        let _ = entry.redeliveries.send(msg);
        return;
    }
    if st.is_cancelled(&task.run_id, task.lease_epoch, now) {
        drop(st);
        shared.spawn_job(task::ack_cancelled_before_start(
            Arc::clone(shared),
            b.queue.clone(),
            task_id,
            msg,
            permit,
        ));
        return;
    }
    let (stop_tx, stop_rx) = watch::channel(None);
    let stop_tx = Arc::new(stop_tx);
    let (re_tx, re_rx) = mpsc::unbounded_channel();
    st.next_token += 1;
    let token = st.next_token;
    st.in_flight.insert(
        task_id.clone(),
        InFlight {
            token,
            run_id: task.run_id.clone(),
            lease_epoch: task.lease_epoch,
            stop: Arc::clone(&stop_tx),
            redeliveries: re_tx,
        },
    );
    drop(st);
    shared.spawn_job(task::run_task(
        Arc::clone(shared),
        TaskRun {
            queue: b.queue.clone(),
            ack_wait: b.ack_wait,
            token,
            task,
            task_id,
            msg,
            delivered: info.delivered,
            stop_tx,
            stop_rx,
            redeliveries: re_rx,
            permit,
        },
    ));
}

/// Applies cancel hints (`tandem.control.cancel.<run_id>`) to the tasks running here.
async fn cancel_loop<H: TaskHandler>(shared: Arc<Shared<H>>, mut sub: Subscriber) {
    while let Some(m) = sub.next().await {
        let Some(run_id) = run_id_of_cancel_subject(&shared.prefix, m.subject.as_str()) else {
            continue;
        };
        // The subject names the run; a body naming another run is ignored.
        let body = serde_json::from_slice::<TaskCancel>(&m.payload)
            .ok()
            .filter(|c| c.run_id == run_id);
        let max_epoch = body.as_ref().and_then(|c| c.lease_epoch);
        let reason = body.and_then(|c| c.reason);
        metrics::counter!("tandem_worker_cancel_hints_total").increment(1);
        let n = shared.state().cancel_run(&run_id, max_epoch, reason);
        if n > 0 {
            tracing::info!(run_id, lease_epoch = ?max_epoch, tasks = n, "cancel hint: stopping the run's tasks");
        } else {
            tracing::debug!(run_id, "cancel hint for a run with no task here");
        }
    }
}

/// `io.nats.jetstream.advisory.v1.max_deliver`.
#[derive(Debug, Deserialize)]
struct MaxDeliveriesAdvisory {
    stream: String,
    consumer: String,
    stream_seq: u64,
    deliveries: u64,
}

/// Tasks delivered `max_deliver` times without an ack are never delivered again, but a work-queue
/// stream keeps them. When the server announces one, copy it to the dead letters and delete it.
async fn max_deliveries_loop<H: TaskHandler>(shared: Arc<Shared<H>>, mut sub: Subscriber) {
    while let Some(m) = sub.next().await {
        let adv = match serde_json::from_slice::<MaxDeliveriesAdvisory>(&m.payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(subject = %m.subject, error = %e, "unreadable max-deliveries advisory");
                continue;
            }
        };
        if let Err(e) = dead_letter_exhausted(&shared, &adv).await {
            tracing::warn!(
                stream = %adv.stream,
                sequence = adv.stream_seq,
                error = %e,
                "cannot dead-letter a task that ran out of deliveries (the next advisory retries)"
            );
        }
    }
}

async fn dead_letter_exhausted<H: TaskHandler>(
    shared: &Shared<H>,
    adv: &MaxDeliveriesAdvisory,
) -> Result<(), String> {
    let stream = shared
        .js
        .get_stream(&adv.stream)
        .await
        .map_err(|e| e.to_string())?;
    let raw = match stream.get_raw_message(adv.stream_seq).await {
        Ok(raw) => raw,
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => return Ok(()),
        Err(e)
            if matches!(e.kind(), LastRawMessageErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND) =>
        {
            return Ok(()); // acknowledged late, or already dead-lettered
        }
        Err(e) => return Err(e.to_string()),
    };
    let letter = DeadLetter {
        kind: DEADLETTER_TASKS.into(),
        subject: raw.subject.to_string(),
        stream: adv.stream.clone(),
        sequence: adv.stream_seq,
        delivered: adv.deliveries,
        payload: raw.payload,
        headers: Some(raw.headers),
        error: format!(
            "delivered {} times without an acknowledgement (max_deliver of consumer {})",
            adv.deliveries, adv.consumer
        ),
    };
    publish_dead_letter(&shared.js, &shared.prefix, &letter)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .delete_message(adv.stream_seq)
        .await
        .map_err(|e| e.to_string())
        .or_else(|e| {
            // Gone in the meantime (a late ack): the dead letter is a harmless extra copy.
            if e.contains("no message found") || e.contains("not found") {
                Ok(false)
            } else {
                Err(e)
            }
        })?;
    bump(&shared.counters.deadlettered);
    metrics::counter!("tandem_worker_deadletter_total", "kind" => DEADLETTER_TASKS, "reason" => "max_deliveries")
        .increment(1);
    tracing::warn!(
        stream = %adv.stream,
        sequence = adv.stream_seq,
        deliveries = adv.deliveries,
        subject = %letter.subject,
        "task ran out of deliveries: copied to the dead letters and removed from the queue"
    );
    Ok(())
}

/// Hands a message back to the queue at once (`-NAK`).
pub(crate) async fn nak(msg: &jetstream::Message, delay: Option<Duration>) -> bool {
    match msg.ack_with(AckKind::Nak(delay)).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "negative acknowledgement not sent");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_tasks_are_rejected_with_a_reason() {
        assert!(
            parse_task(b"not json")
                .expect_err("rejected")
                .contains("JSON")
        );
        assert!(parse_task(br#"{"run_id": 1}"#).is_err());
        let ok = br#"{"run_id":"r","node_id":"n","attempt":1,"lease_epoch":1,"automation_id":"a",
            "tenant_context":{"org_id":"o","workspace_id":"w"},"queue":"default","dispatched_at_ms":1}"#;
        assert_eq!(
            parse_task(ok).map(|t| t.task_id()).as_deref(),
            Ok("r:n:1:1")
        );
        let empty_run = String::from_utf8_lossy(ok).replace("\"run_id\":\"r\"", "\"run_id\":\"\"");
        assert!(
            parse_task(empty_run.as_bytes())
                .expect_err("rejected")
                .contains("run_id")
        );
        let zero = String::from_utf8_lossy(ok).replace("\"attempt\":1", "\"attempt\":0");
        assert!(
            parse_task(zero.as_bytes())
                .expect_err("rejected")
                .contains("attempt")
        );
    }

    #[test]
    fn cancel_memory_is_bounded_by_epoch_and_time() {
        let mut st = State {
            in_flight: HashMap::new(),
            completed: CompletedCache::new(1, Duration::from_secs(1)),
            cancelled_runs: HashMap::new(),
            next_token: 0,
        };
        let t0 = Instant::now();
        st.remember_cancel("r", 3, t0);
        assert!(st.is_cancelled("r", 3, t0));
        assert!(st.is_cancelled("r", 2, t0));
        assert!(!st.is_cancelled("r", 4, t0), "a later claim runs");
        assert!(!st.is_cancelled("other", 1, t0));
        assert!(!st.is_cancelled("r", 1, t0 + CANCEL_MEMORY));
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(1000));
        assert_eq!(backoff(30), Duration::from_secs(10));
    }
}
