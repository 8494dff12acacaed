//! The NATS side of the fleet: connection options, the three JetStream streams, escaped subjects,
//! publishing with `Nats-Msg-Id` dedupe, and core-NATS wake-up hints.
//!
//! Subjects and streams (all under a configurable [`Prefix`]):
//!
//! | What | Subject | Stream |
//! |---|---|---|
//! | task dispatch | `tandem.tasks.<queue>` | `TANDEM_TASKS` (work queue) |
//! | task results | `tandem.results.<run_id>` | `TANDEM_RESULTS` (work queue) |
//! | gate and run events | `tandem.events.<org>.<workspace>.<event.type>` | `TANDEM_EVENTS` (limits, max age) |
//! | dead letters | `tandem.deadletter.<kind>` (`tasks`, `results`) | `TANDEM_DEADLETTER` (limits, 30 days) |
//! | worker heartbeats | `tandem.progress.<run_id>` | none (core NATS, best effort) |
//! | scheduler wake-up | `tandem.wake.scheduler` | none (core NATS, a hint) |
//! | gate-notifier wake-up | `tandem.wake.gates` | none (core NATS, a hint) |
//! | cancel hint | `tandem.control.cancel.<run_id>` | none (core NATS, a hint) |
//!
//! KV buckets are deliberately not used: async-nats 0.51 cannot create them on nats-server 2.9.

mod connect;
pub mod deadletter;
mod publish;
pub mod streams;
pub mod subject;

pub use async_nats;
pub use connect::{DEFAULT_NATS_URL, NatsOptions, connect, jetstream, redact_url};
pub use deadletter::{DeadLetter, publish_dead_letter};
pub use publish::{OutgoingMessage, Published, WAKE_CAPACITY_FREED, publish, wake, wake_with};
pub use streams::{
    EnsureReport, StreamAction, StreamNames, StreamSettings, ensure_streams, ensure_streams_with,
};
pub use subject::{
    InvalidPrefix, Prefix, cancel_subject, cancel_wildcard_subject, deadletter_subject,
    escape_token, event_subject, progress_subject, progress_wildcard_subject, result_subject,
    run_id_of_cancel_subject, task_consumer_name, task_subject, unescape_token, wake_gates_subject,
    wake_scheduler_subject,
};

/// Errors of the bus. Messages name the setting or stream involved.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid NATS options: {0}")]
    InvalidOptions(String),
    #[error("invalid stream settings: {0}")]
    InvalidSettings(String),
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("JetStream stream {stream}: {source}")]
    Stream {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("JetStream stream {stream} is incompatible: {detail}")]
    IncompatibleStream { stream: String, detail: String },
    #[error("publishing to {subject}: {source}")]
    Publish {
        subject: String,
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    #[error("publishing to {subject}: {source}")]
    CorePublish {
        subject: String,
        #[source]
        source: async_nats::PublishError,
    },
}

impl BusError {
    fn stream(stream: &str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Stream {
            stream: stream.to_owned(),
            source: Box::new(source),
        }
    }

    /// Whether retrying later may help (the server or the network), as opposed to a
    /// configuration problem that needs a person.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { source, .. } => !matches!(
                source.kind(),
                async_nats::ConnectErrorKind::Authentication
                    | async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::ServerParse
                    | async_nats::ConnectErrorKind::Tls
            ),
            Self::Stream { .. } | Self::Publish { .. } | Self::CorePublish { .. } => true,
            Self::InvalidOptions(_)
            | Self::InvalidSettings(_)
            | Self::InvalidMessage(_)
            | Self::IncompatibleStream { .. } => false,
        }
    }
}
