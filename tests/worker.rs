//! The worker library (`tandem-worker-sdk`) and the reference `tandem-worker` against the real
//! NATS server, each test under its own subject/stream prefix. Tasks are published straight on
//! `tandem.tasks.<queue>` (as the scheduler's outbox relay does) and the tests read what lands in
//! the streams:
//!
//! * every built-in handler's result, including `needs_repair_once` with and without
//!   `repair_context`, unknown and missing handlers, and escaped run ids in result subjects;
//! * the result is stored before the task is acked: a worker that dies in between leaves the task
//!   unacked, the redelivery's result carries the same `Nats-Msg-Id` and JetStream reports it as a
//!   duplicate; a redelivery to the worker that finished the task re-publishes without re-running;
//! * two workers on one queue: 200 tasks, exactly 200 distinct results, none lost;
//! * malformed messages go to `tandem.deadletter.tasks` with the raw payload and headers, and the
//!   worker keeps serving; a task that runs out of deliveries is dead-lettered too;
//! * cancel hints, deadlines, heartbeats and progress acks, graceful drain and hand-back;
//! * the `tandem-worker` binary end to end, and its configuration errors.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};
use async_nats::{HeaderMap, header::NATS_MESSAGE_ID, jetstream};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tandem_bus::{
    Prefix, StreamNames, cancel_subject, progress_subject, result_subject, task_subject,
};
use tandem_core::{model::TenantContext, protocol::TaskCancel};
use tandem_tests::{
    TestDb, nats_url,
    procs::{EXIT_TIMEOUT, Proc, free_port, http_get},
    unique,
};
use tandem_worker::BuiltinHandlers;
use tandem_worker_sdk::{
    ResultPublished, TaskContext, TaskHandler, TaskMessage, TaskOutcome, TaskProgress, TaskResult,
    TaskStatus, Worker, WorkerBuilder, WorkerStats,
};
use tokio::sync::{mpsc, oneshot};

const WAIT: Duration = Duration::from_secs(20);

struct Env {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: Prefix,
}

impl Env {
    async fn new() -> anyhow::Result<Self> {
        let prefix = Prefix::new(&unique("w"))?;
        let client = connect().await?;
        let js = tandem_bus::jetstream(client.clone());
        tandem_bus::ensure_streams(&js, &prefix).await?;
        Ok(Self { client, js, prefix })
    }

    fn names(&self) -> StreamNames {
        StreamNames::new(&self.prefix)
    }

    async fn cleanup(&self) {
        for name in self.names().all() {
            let _ = self.js.delete_stream(name).await;
        }
    }

    /// A worker builder on its own connection (so a test can "kill" one worker alone).
    async fn builder(&self) -> anyhow::Result<WorkerBuilder> {
        Ok(Worker::builder(connect().await?, self.prefix.clone())
            .progress_interval(Duration::from_millis(300))
            .fetch_expires(Duration::from_millis(500)))
    }

    async fn publish_task(&self, queue: &str, task: &TaskMessage) -> anyhow::Result<()> {
        let payload = serde_json::to_vec(task)?;
        let msg = tandem_bus::OutgoingMessage::new(
            task_subject(&self.prefix, queue),
            task.task_id(),
            payload.into(),
        );
        tandem_bus::publish(&self.js, msg).await?;
        Ok(())
    }

    async fn stream_messages(&self, stream: &str) -> anyhow::Result<u64> {
        let mut s = self.js.get_stream(stream).await?;
        Ok(s.info().await?.state.messages)
    }

    /// Every message stored in a stream: (subject, headers, payload).
    async fn read_stream(&self, stream: &str) -> anyhow::Result<Vec<(String, HeaderMap, Vec<u8>)>> {
        let mut s = self.js.get_stream(stream).await?;
        let state = s.info().await?.state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(m) = s.get_raw_message(seq).await {
                out.push((m.subject.to_string(), m.headers, m.payload.to_vec()));
            }
        }
        Ok(out)
    }

    /// The results stored so far, by task id (= their `Nats-Msg-Id`), checking both agree.
    async fn results(&self) -> anyhow::Result<Vec<(String, String, TaskResult)>> {
        let mut out = Vec::new();
        for (subject, headers, payload) in self.read_stream(&self.names().results).await? {
            let r: TaskResult = serde_json::from_slice(&payload)
                .with_context(|| String::from_utf8_lossy(&payload).into_owned())?;
            let msg_id = headers
                .get(NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            ensure!(
                msg_id == r.task_id(),
                "Nats-Msg-Id {msg_id} for result {r:?}"
            );
            ensure!(
                subject == result_subject(&self.prefix, &r.run_id),
                "result of {} on {subject}",
                r.run_id
            );
            out.push((subject, msg_id, r));
        }
        Ok(out)
    }

    async fn wait_for_results(&self, n: usize) -> anyhow::Result<BTreeMap<String, TaskResult>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let rs = self.results().await?;
            if rs.len() >= n {
                return Ok(rs.into_iter().map(|(_, id, r)| (id, r)).collect());
            }
            if Instant::now() > deadline {
                bail!("{} of {n} results after {WAIT:?}: {rs:?}", rs.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_stream_count(&self, stream: &str, n: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let have = self.stream_messages(stream).await?;
            if have == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{stream} holds {have} messages, expected {n}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn connect() -> anyhow::Result<async_nats::Client> {
    tandem_bus::connect(&tandem_bus::NatsOptions::new(nats_url()), "tandem-tests")
        .await
        .context("connecting to NATS")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn task(run_id: &str, node_id: &str, worker: Value) -> TaskMessage {
    TaskMessage {
        run_id: run_id.into(),
        node_id: node_id.into(),
        attempt: 1,
        lease_epoch: 1,
        automation_id: "auto-1".into(),
        tenant_context: TenantContext::default(),
        queue: "default".into(),
        agent_id: "agent-1".into(),
        objective: format!("objective of {node_id}"),
        metadata: Some(json!({ "worker": worker })),
        upstream_outputs: BTreeMap::new(),
        repair_context: None,
        deadline_at_ms: None,
        dispatched_at_ms: now_ms(),
    }
}

/// A worker running in the background, stopped through its shutdown future.
struct Running {
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<WorkerStats, tandem_worker_sdk::WorkerError>>,
    stats: tandem_worker_sdk::StatsHandle,
}

impl Running {
    fn start<H: TaskHandler>(worker: Worker<H>) -> Self {
        let (tx, rx) = oneshot::channel::<()>();
        let stats = worker.stats();
        let handle = tokio::spawn(worker.run(async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            handle,
            stats,
        }
    }

    fn stats(&self) -> WorkerStats {
        self.stats.snapshot()
    }

    /// Graceful shutdown; returns the final counters.
    async fn stop(mut self) -> anyhow::Result<WorkerStats> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        Ok(tokio::time::timeout(Duration::from_secs(40), &mut self.handle).await???)
    }

    /// As a crash: the run future is dropped; nothing drains, nothing is acknowledged.
    async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Runs `body` and always deletes the test's streams.
macro_rules! with_env {
    ($env:ident, $body:block) => {{
        let $env = Env::new().await?;
        let result: anyhow::Result<()> = async { $body }.await;
        $env.cleanup().await;
        result
    }};
}

#[tokio::test]
async fn builtin_handlers_report_their_results() -> anyhow::Result<()> {
    with_env!(env, {
        let worker = Running::start(env.builder().await?.build(BuiltinHandlers::default())?);
        let run = "run.with dots*"; // escaped in the result subject
        let mut echo = task(run, "echo", json!({"handler": "echo", "extra": [1, 2]}));
        echo.upstream_outputs
            .insert("up".into(), json!({"summary": "from upstream"}));
        let mut repaired = task(run, "repaired", json!({"handler": "needs_repair_once"}));
        repaired.repair_context = Some(json!({"summary": "first try"}));
        let tasks = vec![
            task(
                run,
                "noop",
                json!({"handler": "noop", "usage": {"prompt_tokens": 3, "completion_tokens": 4, "cost_usd": 0.5}}),
            ),
            task(run, "sleep", json!({"handler": "sleep", "ms": 50})),
            task(run, "fail", json!({"handler": "fail", "error": "boom"})),
            task(run, "repair", json!({"handler": "needs_repair_once"})),
            repaired,
            echo.clone(),
            task(run, "bogus", json!({"handler": "bogus"})),
            task(run, "none", json!({})),
        ];
        for t in &tasks {
            env.publish_task("default", t).await?;
        }
        let results = env.wait_for_results(tasks.len()).await?;
        let by_node = |node: &str| -> anyhow::Result<&TaskResult> {
            results
                .get(&format!("{run}:{node}:1:1"))
                .with_context(|| format!("no result for {node}: {results:?}"))
        };
        let r = by_node("noop")?;
        ensure!(r.status == TaskStatus::Completed, "{r:?}");
        ensure!(
            r.usage.prompt_tokens == 3 && r.usage.completion_tokens == 4 && r.usage.cost_usd == 0.5,
            "{r:?}"
        );
        let r = by_node("sleep")?;
        ensure!(
            r.status == TaskStatus::Completed && r.output["slept_ms"] == 50,
            "{r:?}"
        );
        let r = by_node("fail")?;
        ensure!(
            r.status == TaskStatus::Failed && r.output["error"] == "boom",
            "{r:?}"
        );
        let r = by_node("repair")?;
        ensure!(
            r.status == TaskStatus::NeedsRepair,
            "without repair_context: {r:?}"
        );
        let r = by_node("repaired")?;
        ensure!(
            r.status == TaskStatus::Completed,
            "with repair_context: {r:?}"
        );
        ensure!(
            r.output["repair_context"] == json!({"summary": "first try"}),
            "{r:?}"
        );
        let r = by_node("echo")?;
        ensure!(r.status == TaskStatus::Completed, "{r:?}");
        ensure!(
            r.output
                == json!({
                    "objective": echo.objective,
                    "upstream_outputs": {"up": {"summary": "from upstream"}},
                    "metadata": echo.metadata,
                }),
            "{r:?}"
        );
        for node in ["bogus", "none"] {
            let r = by_node(node)?;
            ensure!(r.status == TaskStatus::Failed, "{r:?}");
            ensure!(r.output["error"] == "unknown worker handler", "{r:?}");
            ensure!(
                r.output["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("node.metadata.worker.handler")),
                "{r:?}"
            );
        }
        for r in results.values() {
            ensure!((r.attempt, r.lease_epoch) == (1, 1), "{r:?}");
        }
        env.wait_for_stream_count(&env.names().tasks, 0).await?;
        let stats = worker.stop().await?;
        ensure!(stats.results_published == tasks.len() as u64, "{stats:?}");
        ensure!(stats.acked == tasks.len() as u64, "{stats:?}");
        Ok(())
    })
}

#[tokio::test]
async fn result_is_stored_before_the_ack_and_a_crash_in_between_redelivers_the_same_result()
-> anyhow::Result<()> {
    with_env!(env, {
        let runs = Arc::new(AtomicU32::new(0));
        let counting = {
            let runs = Arc::clone(&runs);
            move |_t: TaskMessage, ctx: TaskContext| {
                let runs = Arc::clone(&runs);
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    TaskOutcome::completed(json!({"delivered": ctx.delivered()}))
                }
            }
        };
        // Worker 1 publishes the result, then "dies" before its ack: its hook reports the
        // PubAck and never returns.
        let (published_tx, mut published_rx) = mpsc::unbounded_channel::<ResultPublished>();
        let w1 = env
            .builder()
            .await?
            .ack_wait(Duration::from_secs(2))
            .before_ack(move |p| {
                let tx = published_tx.clone();
                async move {
                    let _ = tx.send(p);
                    std::future::pending::<()>().await;
                }
            })
            .build(counting.clone())?;
        let w1 = Running::start(w1);
        let t = task("run-crash", "n1", json!({}));
        env.publish_task("default", &t).await?;
        let first = tokio::time::timeout(WAIT, published_rx.recv())
            .await?
            .context("worker 1 published nothing")?;
        ensure!(
            first.task_id == t.task_id() && !first.duplicate,
            "{first:?}"
        );

        // In that window the result is stored and the task is not acknowledged.
        let results = env.results().await?;
        ensure!(
            results.len() == 1 && results[0].1 == t.task_id(),
            "{results:?}"
        );
        let names = env.names();
        ensure!(
            env.stream_messages(&names.tasks).await? == 1,
            "task acked before its result settled"
        );
        let consumer: jetstream::consumer::PullConsumer = env
            .js
            .get_stream(&names.tasks)
            .await?
            .get_consumer(&tandem_bus::task_consumer_name("default"))
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let mut consumer = consumer;
        ensure!(consumer.info().await?.num_ack_pending == 1);

        w1.kill().await;

        // Worker 2 (another process as far as NATS knows) gets the redelivery after ack_wait.
        let (tx2, mut rx2) = mpsc::unbounded_channel::<ResultPublished>();
        let w2 = Running::start(
            env.builder()
                .await?
                .ack_wait(Duration::from_secs(2))
                .before_ack(move |p| {
                    let tx = tx2.clone();
                    async move {
                        let _ = tx.send(p);
                    }
                })
                .build(counting)?,
        );
        let second = tokio::time::timeout(WAIT, rx2.recv())
            .await?
            .context("worker 2 published nothing")?;
        ensure!(second.task_id == t.task_id(), "{second:?}");
        ensure!(
            second.duplicate,
            "same Nats-Msg-Id inside the window must be a duplicate: {second:?}"
        );
        ensure!(
            !second.republished,
            "worker 2 never saw the task: {second:?}"
        );
        ensure!(second.sequence == first.sequence, "{first:?} vs {second:?}");
        ensure!(
            runs.load(Ordering::SeqCst) == 2,
            "the handler ran once per worker"
        );
        env.wait_for_stream_count(&names.tasks, 0).await?;
        ensure!(env.results().await?.len() == 1, "one stored result");
        let stats = w2.stop().await?;
        ensure!(
            stats.duplicate_results == 1 && stats.acked == 1,
            "{stats:?}"
        );
        Ok(())
    })
}

#[tokio::test]
async fn redelivery_of_a_finished_task_republishes_without_rerunning() -> anyhow::Result<()> {
    with_env!(env, {
        let runs = Arc::new(AtomicU32::new(0));
        let handler = {
            let runs = Arc::clone(&runs);
            move |_t: TaskMessage, _ctx: TaskContext| {
                let runs = Arc::clone(&runs);
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    TaskOutcome::completed(json!({}))
                }
            }
        };
        let seen = Arc::new(std::sync::Mutex::new(Vec::<ResultPublished>::new()));
        let hook_seen = Arc::clone(&seen);
        // The first ack is held past ack_wait, so the server redelivers to this same worker.
        let w = Running::start(
            env.builder()
                .await?
                .ack_wait(Duration::from_secs(1))
                .before_ack(move |p| {
                    let seen = Arc::clone(&hook_seen);
                    async move {
                        let first = {
                            let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                            s.push(p.clone());
                            s.len() == 1
                        };
                        if first {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                        }
                    }
                })
                .build(handler)?,
        );
        let t = task("run-redeliver", "n1", json!({}));
        env.publish_task("default", &t).await?;
        wait_until("the re-published result", || {
            w.stats().republished == 1 && w.stats().acked >= 1
        })
        .await
        .with_context(|| format!("{:?}", w.stats()))?;
        env.wait_for_stream_count(&env.names().tasks, 0).await?;
        let stats = w.stop().await?;
        ensure!(runs.load(Ordering::SeqCst) == 1, "the handler ran again");
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        ensure!(seen.len() == 2, "{seen:?}");
        ensure!(!seen[0].republished && !seen[0].duplicate, "{seen:?}");
        ensure!(seen[1].republished && seen[1].duplicate, "{seen:?}");
        ensure!(env.results().await?.len() == 1);
        ensure!(stats.started == 1, "{stats:?}");
        Ok(())
    })
}

#[tokio::test]
async fn two_workers_on_one_queue_lose_nothing() -> anyhow::Result<()> {
    with_env!(env, {
        let a = Running::start(
            env.builder()
                .await?
                .concurrency(8)
                .build(BuiltinHandlers::default())?,
        );
        let b = Running::start(
            env.builder()
                .await?
                .concurrency(8)
                .build(BuiltinHandlers::default())?,
        );
        let mut ids = BTreeSet::new();
        for i in 0..200 {
            let t = task(
                &format!("run-{}", i % 20),
                &format!("n{i}"),
                json!({"handler": "noop"}),
            );
            ids.insert(t.task_id());
            env.publish_task("default", &t).await?;
        }
        let results = env.wait_for_results(200).await?;
        ensure!(
            results.keys().cloned().collect::<BTreeSet<_>>() == ids,
            "ids differ"
        );
        env.wait_for_stream_count(&env.names().tasks, 0).await?;
        let (sa, sb) = (a.stop().await?, b.stop().await?);
        ensure!(
            env.results().await?.len() == 200,
            "exactly 200 stored results"
        );
        ensure!(sa.started + sb.started == 200, "{sa:?} {sb:?}");
        ensure!(
            sa.duplicate_results + sb.duplicate_results == 0,
            "{sa:?} {sb:?}"
        );
        ensure!(sa.acked + sb.acked == 200, "{sa:?} {sb:?}");
        Ok(())
    })
}

#[tokio::test]
async fn malformed_tasks_are_dead_lettered_and_the_worker_keeps_serving() -> anyhow::Result<()> {
    with_env!(env, {
        let w = Running::start(env.builder().await?.build(BuiltinHandlers::default())?);
        let subject = task_subject(&env.prefix, "default");
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, "bad-1");
        headers.insert("X-Test", "kept");
        let raw1: &[u8] = b"not json {";
        env.js
            .publish_with_headers(subject.clone(), headers, raw1.to_vec().into())
            .await?
            .await?;
        let raw2: &[u8] = br#"{"run_id": 5, "node_id": "n"}"#;
        env.js
            .publish(subject.clone(), raw2.to_vec().into())
            .await?
            .await?;
        let good = task("run-after-poison", "n1", json!({"handler": "noop"}));
        env.publish_task("default", &good).await?;

        let results = env.wait_for_results(1).await?;
        ensure!(results.contains_key(&good.task_id()), "{results:?}");
        let names = env.names();
        env.wait_for_stream_count(&names.deadletter, 2).await?;
        env.wait_for_stream_count(&names.tasks, 0).await?;
        let letters = env.read_stream(&names.deadletter).await?;
        let want_subject = format!("{}.tandem.deadletter.tasks", env.prefix);
        let (s1, h1, p1) = &letters[0];
        ensure!(*s1 == want_subject, "{s1}");
        ensure!(p1.as_slice() == raw1, "raw payload kept byte for byte");
        ensure!(
            h1.get("X-Test").map(|v| v.as_str()) == Some("kept"),
            "{h1:?}"
        );
        ensure!(
            h1.get("Tandem-Original-Nats-Msg-Id").map(|v| v.as_str()) == Some("bad-1"),
            "{h1:?}"
        );
        ensure!(
            h1.get("Tandem-Deadletter-Error")
                .is_some_and(|v| v.as_str().contains("not a valid task message")),
            "{h1:?}"
        );
        ensure!(
            h1.get("Tandem-Deadletter-Subject").map(|v| v.as_str()) == Some(subject.as_str()),
            "{h1:?}"
        );
        let (_, h2, p2) = &letters[1];
        ensure!(p2.as_slice() == raw2);
        ensure!(h2.get("Tandem-Deadletter-Error").is_some(), "{h2:?}");
        let stats = w.stop().await?;
        ensure!(
            stats.deadlettered == 2 && stats.results_published == 1,
            "{stats:?}"
        );
        Ok(())
    })
}

#[tokio::test]
async fn task_out_of_deliveries_is_dead_lettered_and_removed() -> anyhow::Result<()> {
    with_env!(env, {
        // One slot, held by a task that waits for the test: the worker listens for advisories but
        // does not pull while the test plays a consumer that never acks.
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let handler = move |t: TaskMessage, _ctx: TaskContext| {
            let mut release = release_rx.clone();
            async move {
                if t.node_id == "hold" {
                    let _ = release.wait_for(|r| *r).await;
                }
                TaskOutcome::completed(json!({}))
            }
        };
        let w = Running::start(
            env.builder()
                .await?
                .concurrency(1)
                .ack_wait(Duration::from_secs(1))
                .max_deliver(2)
                .build(handler)?,
        );
        env.publish_task("default", &task("run-hold", "hold", json!({})))
            .await?;
        wait_until("the holding task", || w.stats().started == 1).await?;

        let poison = task("run-poison", "never-acked", json!({}));
        env.publish_task("default", &poison).await?;
        let consumer: jetstream::consumer::PullConsumer = env
            .js
            .get_stream(&env.names().tasks)
            .await?
            .get_consumer(&tandem_bus::task_consumer_name("default"))
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        for delivery in 1..=2 {
            let deadline = Instant::now() + WAIT;
            loop {
                let mut batch = consumer.fetch().max_messages(1).messages().await?;
                if let Some(m) = batch.next().await {
                    let m = m.map_err(|e| anyhow::anyhow!(e))?;
                    let info = m.info().map_err(|e| anyhow::anyhow!(e))?;
                    ensure!(info.delivered == delivery, "delivery {}", info.delivered);
                    break; // never acked
                }
                ensure!(Instant::now() < deadline, "no delivery {delivery}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        release_tx.send_replace(true);

        env.wait_for_stream_count(&env.names().deadletter, 1)
            .await?;
        let letters = env.read_stream(&env.names().deadletter).await?;
        let (_, h, p) = &letters[0];
        let back: TaskMessage = serde_json::from_slice(p)?;
        ensure!(back == poison, "raw task kept");
        ensure!(
            h.get("Tandem-Deadletter-Error")
                .is_some_and(|v| v.as_str().contains("without an acknowledgement")),
            "{h:?}"
        );
        ensure!(
            h.get("Tandem-Deadletter-Delivered").map(|v| v.as_str()) == Some("2"),
            "{h:?}"
        );
        env.wait_for_stream_count(&env.names().tasks, 0).await?;
        let stats = w.stop().await?;
        ensure!(stats.deadlettered == 1, "{stats:?}");
        ensure!(
            env.results().await?.len() == 1,
            "only the holding task has a result"
        );
        Ok(())
    })
}

#[tokio::test]
async fn cancel_hint_stops_a_sleeping_task_without_a_result() -> anyhow::Result<()> {
    with_env!(env, {
        let w = Running::start(env.builder().await?.build(BuiltinHandlers::default())?);
        let run = "run-cancel";
        let mut progress = env
            .client
            .subscribe(progress_subject(&env.prefix, run))
            .await?;
        let t = task(run, "sleeper", json!({"handler": "sleep", "ms": 60_000}));
        env.publish_task("default", &t).await?;
        tokio::time::timeout(WAIT, progress.next())
            .await?
            .context("no heartbeat")?;

        let started = Instant::now();
        let cancel = TaskCancel {
            run_id: run.into(),
            lease_epoch: Some(1),
            reason: Some("run cancelled".into()),
        };
        env.client
            .publish(
                cancel_subject(&env.prefix, run),
                serde_json::to_vec(&cancel)?.into(),
            )
            .await?;
        wait_until("the cancel", || w.stats().cancelled == 1).await?;
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "the sleep was not interrupted"
        );
        env.wait_for_stream_count(&env.names().tasks, 0).await?;

        // The same run's tasks at that epoch are skipped; a later claim (epoch 2) runs.
        let late = task(run, "late", json!({"handler": "noop"}));
        env.publish_task("default", &late).await?;
        let mut next = task(run, "next", json!({"handler": "noop"}));
        next.lease_epoch = 2;
        env.publish_task("default", &next).await?;
        let results = env.wait_for_results(1).await?;
        ensure!(
            results.keys().collect::<Vec<_>>() == vec![&next.task_id()],
            "{results:?}"
        );
        env.wait_for_stream_count(&env.names().tasks, 0).await?;
        let stats = w.stop().await?;
        ensure!(stats.cancelled == 2, "{stats:?}");
        ensure!(
            env.results().await?.len() == 1,
            "no result for cancelled tasks"
        );
        Ok(())
    })
}

#[tokio::test]
async fn heartbeats_and_progress_acks_keep_a_long_task_alive() -> anyhow::Result<()> {
    with_env!(env, {
        // ack_wait 1 s, task 3.5 s: only the progress acks prevent a redelivery.
        let w = Running::start(
            env.builder()
                .await?
                .ack_wait(Duration::from_secs(1))
                .progress_interval(Duration::from_millis(400))
                .build(BuiltinHandlers::default())?,
        );
        let run = "run-progress";
        let mut sub = env
            .client
            .subscribe(progress_subject(&env.prefix, run))
            .await?;
        let t = task(run, "n1", json!({"handler": "sleep", "ms": 3500}));
        env.publish_task("default", &t).await?;
        let results = env.wait_for_results(1).await?;
        ensure!(results[&t.task_id()].status == TaskStatus::Completed);
        let mut beats = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            beats.push(serde_json::from_slice::<TaskProgress>(&m.payload)?);
        }
        ensure!(beats.len() >= 5, "{} heartbeats: {beats:?}", beats.len());
        ensure!(
            beats
                .iter()
                .all(|b| b.node_id == "n1" && b.attempt == 1 && b.lease_epoch == 1),
            "{beats:?}"
        );
        ensure!(
            beats.iter().any(|b| b
                .message
                .as_deref()
                .is_some_and(|m| m.starts_with("slept "))),
            "the handler's progress message: {beats:?}"
        );
        let stats = w.stop().await?;
        ensure!(
            stats.started == 1,
            "redelivered despite progress acks: {stats:?}"
        );
        ensure!(
            stats.duplicate_results == 0 && stats.acked == 1,
            "{stats:?}"
        );
        Ok(())
    })
}

#[tokio::test]
async fn deadlines_fail_tasks_clearly() -> anyhow::Result<()> {
    with_env!(env, {
        let runs = Arc::new(AtomicU32::new(0));
        let handler = {
            let runs = Arc::clone(&runs);
            move |_t: TaskMessage, ctx: TaskContext| {
                let runs = Arc::clone(&runs);
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    ctx.cancelled().await;
                    TaskOutcome::completed(json!({"ignored": true}))
                }
            }
        };
        let w = Running::start(env.builder().await?.build(handler)?);
        let mut late = task("run-deadline", "late", json!({}));
        late.deadline_at_ms = Some(now_ms() - 1000);
        env.publish_task("default", &late).await?;
        let results = env.wait_for_results(1).await?;
        let r = &results[&late.task_id()];
        ensure!(
            r.status == TaskStatus::Failed && r.output["error"] == "deadline exceeded",
            "{r:?}"
        );
        ensure!(
            runs.load(Ordering::SeqCst) == 0,
            "a task past its deadline ran"
        );

        let started = Instant::now();
        let mut slow = task("run-deadline", "slow", json!({}));
        slow.deadline_at_ms = Some(now_ms() + 1000);
        env.publish_task("default", &slow).await?;
        let results = env.wait_for_results(2).await?;
        let r = &results[&slow.task_id()];
        ensure!(
            r.status == TaskStatus::Failed && r.output["error"] == "deadline exceeded",
            "{r:?}"
        );
        ensure!(
            r.output["detail"]
                .as_str()
                .is_some_and(|d| d.contains("still running")),
            "{r:?}"
        );
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let stats = w.stop().await?;
        ensure!(stats.deadline_exceeded == 2, "{stats:?}");
        Ok(())
    })
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_task_finish() -> anyhow::Result<()> {
    with_env!(env, {
        let w = Running::start(env.builder().await?.build(BuiltinHandlers::default())?);
        let run = "run-drain";
        let mut progress = env
            .client
            .subscribe(progress_subject(&env.prefix, run))
            .await?;
        let t = task(run, "n1", json!({"handler": "sleep", "ms": 2000}));
        env.publish_task("default", &t).await?;
        tokio::time::timeout(WAIT, progress.next())
            .await?
            .context("no heartbeat")?;
        let stopping = Instant::now();
        let (stop_tx, handle) = (w.stop, w.handle);
        if let Some(tx) = stop_tx {
            let _ = tx.send(());
        }
        // Published after the shutdown started: left in the queue for another worker.
        let after = task(run, "after", json!({"handler": "noop"}));
        env.publish_task("default", &after).await?;
        let stats = tokio::time::timeout(Duration::from_secs(30), handle).await???;
        ensure!(
            stopping.elapsed() >= Duration::from_millis(1000),
            "returned before the task finished"
        );
        let results = env.wait_for_results(1).await?;
        ensure!(
            results.keys().collect::<Vec<_>>() == vec![&t.task_id()],
            "{results:?}"
        );
        ensure!(results[&t.task_id()].status == TaskStatus::Completed);
        ensure!(stats.acked == 1 && stats.started == 1, "{stats:?}");
        let left = env.stream_messages(&env.names().tasks).await?;
        ensure!(
            left == 1,
            "the later task stays queued: {left} left; {stats:?}"
        );
        Ok(())
    })
}

#[tokio::test]
async fn drain_timeout_hands_unfinished_tasks_back_to_the_queue() -> anyhow::Result<()> {
    with_env!(env, {
        let stubborn = |_t: TaskMessage, _ctx: TaskContext| async move {
            std::future::pending::<()>().await;
            TaskOutcome::completed(json!({}))
        };
        let w1 = Running::start(
            env.builder()
                .await?
                .drain_timeout(Duration::from_millis(500))
                .build(stubborn)?,
        );
        let t = task("run-handback", "n1", json!({}));
        env.publish_task("default", &t).await?;
        wait_until("the task to start", || w1.stats().started == 1).await?;
        let stopping = Instant::now();
        let stats = w1.stop().await?;
        ensure!(
            stopping.elapsed() < Duration::from_secs(10),
            "{:?}",
            stopping.elapsed()
        );
        ensure!(stats.nacked == 1 && stats.acked == 0, "{stats:?}");
        ensure!(
            env.stream_messages(&env.names().tasks).await? == 1,
            "task kept"
        );

        // Handed back at once (no ack_wait to sit out): another worker finishes it quickly.
        let picked_up = Instant::now();
        let w2 = Running::start(env.builder().await?.build(
            |_t: TaskMessage, ctx: TaskContext| async move {
                TaskOutcome::completed(json!({"delivered": ctx.delivered()}))
            },
        )?);
        let results = env.wait_for_results(1).await?;
        let r = &results[&t.task_id()];
        ensure!(r.output["delivered"] == 2, "{r:?}");
        ensure!(
            picked_up.elapsed() < Duration::from_secs(10),
            "{:?}",
            picked_up.elapsed()
        );
        w2.stop().await?;
        Ok(())
    })
}

fn worker_env(db_url: &str, prefix: &str, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("TANDEM_DATABASE_URL", db_url.to_owned()),
        ("TANDEM_NATS_URL", nats_url()),
        ("TANDEM_NATS_PREFIX", prefix.to_owned()),
        ("TANDEM_HEALTH_ADDR", format!("127.0.0.1:{port}")),
        ("TANDEM_WORKER_QUEUES", "default,gpu".into()),
        ("TANDEM_WORKER_CONCURRENCY", "4".into()),
        ("TANDEM_WORKER_PROGRESS_INTERVAL_MS", "300".into()),
    ]
}

#[tokio::test]
async fn reference_worker_binary_serves_queues_and_drains_on_sigterm() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    drop(pool);
    let prefix_raw = unique("w");
    let port = free_port()?;
    let result = async {
        let mut svc = Proc::start(
            "tandem-worker",
            &[],
            &worker_env(&db.url, &prefix_raw, port),
        )?;
        svc.wait_for_status(port, "/readyz", 200).await?;
        let env = Env {
            client: connect().await?,
            js: tandem_bus::jetstream(connect().await?),
            prefix: Prefix::new(&prefix_raw)?,
        };
        let echo = task("bin-run", "echo", json!({"handler": "echo"}));
        env.publish_task("default", &echo).await?;
        let mut gpu = task("bin-run", "gpu", json!({"handler": "needs_repair_once"}));
        gpu.queue = "gpu".into();
        env.publish_task("gpu", &gpu).await?;
        let results = env.wait_for_results(2).await?;
        ensure!(
            results[&echo.task_id()].output["objective"] == "objective of echo",
            "{results:?}"
        );
        ensure!(
            results[&gpu.task_id()].status == TaskStatus::NeedsRepair,
            "{results:?}"
        );

        let mut progress = env
            .client
            .subscribe(progress_subject(&env.prefix, "bin-run"))
            .await?;
        let sleeper = task(
            "bin-run",
            "sleeper",
            json!({"handler": "sleep", "ms": 1500}),
        );
        env.publish_task("default", &sleeper).await?;
        tokio::time::timeout(WAIT, progress.next())
            .await?
            .context("no heartbeat from the binary")?;
        let (code, metrics) = http_get(port, "/metrics").await?;
        ensure!(
            code == 200 && metrics.contains("tandem_worker_tasks_total"),
            "{metrics}"
        );
        svc.sigterm()?;
        let status = svc.wait(EXIT_TIMEOUT).await?;
        ensure!(status.success(), "exit {status}; stderr:\n{}", svc.stderr());
        let results = env.wait_for_results(3).await?;
        ensure!(
            results[&sleeper.task_id()].status == TaskStatus::Completed,
            "the in-flight task finished during the drain: {results:?}"
        );
        ensure!(env.stream_messages(&env.names().tasks).await? == 0);
        Ok(())
    }
    .await;
    tandem_tests::procs::delete_streams(&prefix_raw).await?;
    result?;
    db.drop_db().await
}

#[tokio::test]
async fn reference_worker_rejects_bad_settings_naming_the_variable() -> anyhow::Result<()> {
    for (var, value) in [
        ("TANDEM_WORKER_CONCURRENCY", "0"),
        ("TANDEM_WORKER_QUEUES", "default,,gpu"),
        ("TANDEM_WORKER_DEFAULT_HANDLER", "teleport"),
    ] {
        let mut env = worker_env(
            "postgres://postgres@127.0.0.1:1/none",
            &unique("w"),
            free_port()?,
        );
        env.retain(|(k, _)| *k != var);
        env.push((var, value.into()));
        let mut svc = Proc::start("tandem-worker", &[], &env)?;
        let status = svc.wait(EXIT_TIMEOUT).await?;
        ensure!(status.code() == Some(2), "{var}={value}: exit {status}");
        ensure!(
            svc.stderr().contains(var),
            "{var}: stderr:\n{}",
            svc.stderr()
        );
    }
    Ok(())
}
