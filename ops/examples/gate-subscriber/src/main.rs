//! Example subscriber for Tandem Fleet approval-gate events (contract: docs/events.md).
//!
//! * Creates or binds the durable pull consumer `--durable` on `TANDEM_EVENTS` (with the fleet's
//!   prefix: `<PREFIX>_TANDEM_EVENTS`), filtered to `[<prefix>.]tandem.events.*.*.approval.gate.>`,
//!   explicit acks. Every replica of this program binds to the same consumer and they share the
//!   messages.
//! * Prints one line per event on stdout.
//! * Dedupes on `Nats-Msg-Id` (the `notification_key` of reminders and escalations, the event id
//!   otherwise) in a bounded in-memory set, so redeliveries and re-publishes are printed once
//!   while the process runs.
//! * Acks each message after handling it; a payload that is not an `EngineEvent` is logged and
//!   terminated (`+TERM`), so it is never redelivered.
//!
//! Deliberately depends on no `tandem-*` crate: the subject, stream name and JSON handling here
//! are what a subscriber in any language has to do.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use clap::{Parser, ValueEnum};
use futures::StreamExt as _;
use serde_json::Value;

/// Print Tandem Fleet approval-gate events from JetStream (durable pull consumer, explicit acks).
#[derive(Debug, Parser)]
#[command(name = "tandem-example-gate-subscriber", version)]
struct Args {
    /// NATS server URL.
    #[arg(
        long = "nats-url",
        env = "TANDEM_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// NATS user (with --nats-password).
    #[arg(long = "nats-user", env = "TANDEM_NATS_USER")]
    nats_user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(
        long = "nats-password",
        env = "TANDEM_NATS_PASSWORD",
        hide_env_values = true
    )]
    nats_password: Option<String>,
    /// NATS token.
    #[arg(long = "nats-token", env = "TANDEM_NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// NATS credentials file (JWT + nkey seed).
    #[arg(long = "nats-creds", env = "TANDEM_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// The fleet's subject prefix (TANDEM_NATS_PREFIX): empty for `tandem.events.…` and
    /// `TANDEM_EVENTS`, `t1` for `t1.tandem.events.…` and `T1_TANDEM_EVENTS`.
    #[arg(long = "prefix", env = "TANDEM_NATS_PREFIX", default_value = "")]
    prefix: String,
    /// Name of the durable consumer (shared by every replica of this subscriber).
    #[arg(long, default_value = "example-gate-subscriber")]
    durable: String,
    /// Where a new consumer starts: `all` (everything still in the stream) or `new`. Ignored
    /// when the consumer exists.
    #[arg(long, value_enum, default_value_t = Deliver::New)]
    deliver: Deliver,
    /// Seconds before an unacknowledged message is redelivered.
    #[arg(long, default_value_t = 30)]
    ack_wait_secs: u64,
    /// Deliveries before the server gives up on a message (then it stays in the stream but is
    /// not delivered to this consumer again).
    #[arg(long, default_value_t = 10)]
    max_deliver: i64,
    /// Unacknowledged messages in flight across all replicas. 1 keeps each run's events in
    /// commit order even with several replicas (docs/events.md, "Ordering").
    #[arg(long, default_value_t = 1)]
    max_ack_pending: i64,
    /// How many recent `Nats-Msg-Id`s the in-memory dedupe remembers.
    #[arg(long, default_value_t = 10_000)]
    dedupe_capacity: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Deliver {
    All,
    New,
}

/// The subject filter and stream name for a fleet prefix (docs/nats.md, "Prefix").
fn names(prefix: &str) -> anyhow::Result<(String, String)> {
    if prefix.is_empty() {
        return Ok((
            "tandem.events.*.*.approval.gate.>".to_owned(),
            "TANDEM_EVENTS".to_owned(),
        ));
    }
    let valid = prefix.len() <= 32
        && prefix.as_bytes()[0].is_ascii_lowercase()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !valid {
        bail!(
            "invalid --prefix {prefix:?}: 1-32 characters of a-z, 0-9, '_' and '-', starting with a letter"
        );
    }
    Ok((
        format!("{prefix}.tandem.events.*.*.approval.gate.>"),
        format!("{}_TANDEM_EVENTS", prefix.to_ascii_uppercase()),
    ))
}

/// A bounded set of recently handled ids (FIFO eviction).
///
/// In memory only: it absorbs redeliveries and re-publishes while this process runs, not
/// across restarts or replicas. To persist it, replace it with a table keyed by the id with a
/// unique constraint, and insert the id in the same transaction as your side effect:
///
/// ```sql
/// CREATE TABLE processed_tandem_events (msg_id text PRIMARY KEY, event_type text NOT NULL,
///                                       run_id text NOT NULL, processed_at timestamptz NOT NULL DEFAULT now());
/// INSERT INTO processed_tandem_events (msg_id, event_type, run_id) VALUES ($1, $2, $3)
///     ON CONFLICT (msg_id) DO NOTHING;   -- 0 rows: already handled, skip the side effect
/// ```
///
/// then commit and only then ack. Keep rows at least `TANDEM_EVENTS_MAX_AGE_SECS` (7 days), the
/// longest an event can be replayed to you.
#[derive(Debug)]
struct SeenIds {
    set: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl SeenIds {
    fn new(capacity: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: &str) {
        if self.set.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

/// The parts of an `EngineEvent` this subscriber reads.
#[derive(Debug, Clone, PartialEq)]
struct GateEvent {
    event_type: String,
    event_id: String,
    run_id: String,
    node_id: Option<String>,
    org: String,
    workspace: String,
    occurred_at_ms: u64,
    properties: serde_json::Map<String, Value>,
}

/// Parses `{type, properties, envelope}`; an error says what is missing.
fn parse_event(payload: &[u8]) -> anyhow::Result<GateEvent> {
    let v: Value = serde_json::from_slice(payload).context("payload is not JSON")?;
    let str_at = |pointer: &str| {
        v.pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("missing string {pointer}"))
    };
    let properties = v
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .ok_or_else(|| anyhow!("missing object /properties"))?;
    Ok(GateEvent {
        event_type: str_at("/type")?,
        event_id: str_at("/envelope/event_id")?,
        run_id: str_at("/envelope/run_id")?,
        node_id: str_at("/envelope/node_id").ok(),
        org: str_at("/envelope/tenant_context/org_id")?,
        workspace: str_at("/envelope/tenant_context/workspace_id")?,
        occurred_at_ms: v
            .pointer("/envelope/occurred_at_ms")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("missing number /envelope/occurred_at_ms"))?,
        properties,
    })
}

/// One output line: time, type, tenant, run, node, then the type's interesting properties.
fn describe(e: &GateEvent, msg_id: &str) -> String {
    let mut line = format!(
        "{} {} org={} workspace={} run={} node={}",
        e.occurred_at_ms,
        e.event_type,
        e.org,
        e.workspace,
        e.run_id,
        e.node_id.as_deref().unwrap_or("-"),
    );
    for key in [
        "title",
        "decision",
        "reminder_count",
        "expired",
        "escalated_to",
        "expires_at_ms",
        "step_index",
        "step_due_at_ms",
    ] {
        if let Some(v) = e.properties.get(key) {
            match v {
                Value::String(s) => line.push_str(&format!(" {key}={s:?}")),
                other => line.push_str(&format!(" {key}={other}")),
            }
        }
    }
    line.push_str(&format!(" msg_id={msg_id}"));
    line
}

async fn connect(args: &Args) -> anyhow::Result<async_nats::Client> {
    let mut options = match &args.nats_creds {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path.clone())
            .await
            .with_context(|| format!("reading {}", path.display()))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let (Some(user), Some(password)) = (&args.nats_user, &args.nats_password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &args.nats_token {
        options = options.token(token.clone());
    }
    options
        .name("tandem-example-gate-subscriber")
        .connect(args.nats_url.as_str())
        .await
        .with_context(|| format!("connecting to {}", args.nats_url))
}

/// Gets the durable consumer, creating it when missing; refuses one with another filter.
async fn bind(
    js: &jetstream::Context,
    args: &Args,
    stream_name: &str,
    filter: &str,
) -> anyhow::Result<PullConsumer> {
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| anyhow!("stream {stream_name}: {e} (has a Tandem service started yet?)"))?;
    let want = pull::Config {
        durable_name: Some(args.durable.clone()),
        description: Some("tandem-example-gate-subscriber".into()),
        deliver_policy: match args.deliver {
            Deliver::All => DeliverPolicy::All,
            Deliver::New => DeliverPolicy::New,
        },
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(args.ack_wait_secs),
        max_deliver: args.max_deliver,
        max_ack_pending: args.max_ack_pending,
        filter_subject: filter.to_owned(),
        ..Default::default()
    };
    let consumer: PullConsumer = stream
        .get_or_create_consumer(&args.durable, want)
        .await
        .map_err(|e| anyhow!("consumer {} on {stream_name}: {e}", args.durable))?;
    let have = &consumer.cached_info().config.filter_subject;
    if have != filter {
        bail!(
            "consumer {} on {stream_name} filters {have:?}, not {filter:?}: delete it or pick another --durable",
            args.durable
        );
    }
    Ok(consumer)
}

/// Handles one message and acks it (or terminates it when it can never be processed).
async fn handle(msg: jetstream::Message, seen: &mut SeenIds) -> anyhow::Result<()> {
    let (stream_seq, delivered) = msg
        .info()
        .map(|i| (i.stream_sequence, i.delivered))
        .unwrap_or((0, 0));
    let event = match parse_event(&msg.payload) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(subject = %msg.subject, stream_seq, error = %format!("{e:#}"),
                "malformed event payload; terminating it so it is not redelivered");
            return msg
                .ack_with(AckKind::Term)
                .await
                .map_err(|e| anyhow!("term: {e}"));
        }
    };
    // The broker's dedupe id; the envelope's event id for a message published without one.
    let msg_id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| event.event_id.clone());
    if seen.contains(&msg_id) {
        tracing::debug!(msg_id, stream_seq, delivered, "already handled; acking");
    } else {
        // The side effect. A real subscriber sends its notification here, keyed by `msg_id`.
        println!("{}", describe(&event, &msg_id));
        // Record before the ack: if the ack is lost, the redelivery is recognised.
        seen.insert(&msg_id);
    }
    msg.ack().await.map_err(|e| anyhow!("ack: {e}"))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (filter, stream_name) = names(&args.prefix)?;
    let client = connect(&args).await?;
    let js = jetstream::new(client);
    let consumer = bind(&js, &args, &stream_name, &filter).await?;
    tracing::info!(stream = %stream_name, consumer = %args.durable, filter = %filter, "listening");
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow!("pulling from {}: {e}", args.durable))?;
    let mut seen = SeenIds::new(args.dedupe_capacity);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; unacknowledged messages will be redelivered");
                return Ok(());
            }
            next = messages.next() => match next {
                None => bail!("the consumer's message stream ended"),
                Some(Err(e)) => tracing::warn!(error = %e, "pull failed; retrying"),
                Some(Ok(msg)) => {
                    if let Err(e) = handle(msg, &mut seen).await {
                        // Not acked: the server redelivers it after ack_wait.
                        tracing::warn!(error = %format!("{e:#}"), "message not acknowledged");
                    }
                }
            },
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    run(Args::parse()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_follow_the_fleet_prefix() {
        assert_eq!(
            names("").ok(),
            Some((
                "tandem.events.*.*.approval.gate.>".to_owned(),
                "TANDEM_EVENTS".to_owned()
            ))
        );
        assert_eq!(
            names("t_ab12").ok(),
            Some((
                "t_ab12.tandem.events.*.*.approval.gate.>".to_owned(),
                "T_AB12_TANDEM_EVENTS".to_owned()
            ))
        );
        for bad in ["T1", "1a", "a.b", "a*", "_a"] {
            assert!(names(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seen_ids_are_bounded_fifo() {
        let mut seen = SeenIds::new(2);
        seen.insert("a");
        seen.insert("b");
        seen.insert("a");
        assert!(seen.contains("a") && seen.contains("b"));
        seen.insert("c");
        assert!(!seen.contains("a"), "oldest evicted");
        assert!(seen.contains("b") && seen.contains("c"));
        assert_eq!(seen.order.len(), 2);
    }

    #[test]
    fn parses_and_describes_a_reminder() {
        let payload = json!({
            "type": "approval.gate.reminder_due",
            "properties": {"run_id": "run-1", "automation_id": "auto-email", "node_id": "approval_gate",
                           "expires_at_ms": 1767229200000u64, "expired": false, "reminder_count": 1,
                           "tenantContext": {"org_id": "acme", "workspace_id": "ops", "source": "explicit"}},
            "envelope": {"event_id": "e1", "schema_version": 1, "occurred_at_ms": 1767226200000u64,
                         "run_id": "run-1", "node_id": "approval_gate",
                         "tenant_context": {"org_id": "acme", "workspace_id": "ops", "source": "explicit"}}
        });
        let bytes = serde_json::to_vec(&payload).expect("json");
        let e = parse_event(&bytes).expect("valid");
        assert_eq!(
            describe(&e, "automation_v2:run-1:approval_gate:reminder:1"),
            "1767226200000 approval.gate.reminder_due org=acme workspace=ops run=run-1 \
             node=approval_gate reminder_count=1 expired=false expires_at_ms=1767229200000 \
             msg_id=automation_v2:run-1:approval_gate:reminder:1"
        );
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        for bad in [
            &b"not json"[..],
            br#"[]"#,
            br#"{"type": "approval.gate.expired", "properties": {}}"#,
            br#"{"type": 5, "properties": {}, "envelope": {}}"#,
        ] {
            assert!(parse_event(bad).is_err());
        }
    }
}
