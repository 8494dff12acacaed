//! JetStream stream definitions and [`ensure_streams`].
//!
//! | Stream (base name) | Retention | Subjects |
//! |---|---|---|
//! | `TANDEM_TASKS` | work queue | `tandem.tasks.>` |
//! | `TANDEM_RESULTS` | work queue | `tandem.results.>` |
//! | `TANDEM_EVENTS` | limits, `max_age` | `tandem.events.>` |
//! | `TANDEM_DEADLETTER` | limits, `max_age` 30 days | `tandem.deadletter.>` |
//!
//! Names and subjects take the fleet's [`Prefix`].
//!
//! **Duplicate window.** Every stream drops a message whose `Nats-Msg-Id` it has already stored
//! within `duplicate_window` (default 2 minutes, the server's own default). The outbox relay
//! re-publishes a row only after a crash between the PubAck and marking the row published, so
//! the window must cover that gap; after it, JetStream stores the same id again, which is why
//! consumers also dedupe on the event id. The server refuses a window longer than `max_age`, so
//! [`StreamSettings::validate`] checks `duplicate_window <= events_max_age` at startup. On the work
//! queue streams an acknowledged (deleted) message is forgotten by the dedupe map after a server
//! restart, even inside the window: results are fenced by attempt and lease epoch, not by dedupe.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    context::{CreateStreamErrorKind, GetStreamErrorKind},
    stream::{Config, DiscardPolicy, RetentionPolicy, StorageType},
};

use crate::BusError;
use crate::subject::{DEADLETTER, EVENTS, Prefix, RESULTS, TASKS};

/// Base name of the task dispatch stream.
pub const TASKS_STREAM: &str = "TANDEM_TASKS";
/// Base name of the task results stream.
pub const RESULTS_STREAM: &str = "TANDEM_RESULTS";
/// Base name of the events stream.
pub const EVENTS_STREAM: &str = "TANDEM_EVENTS";
/// Base name of the dead-letter stream.
pub const DEADLETTER_STREAM: &str = "TANDEM_DEADLETTER";

/// Age after which dead letters leave `TANDEM_DEADLETTER`: 30 days, time enough for a person to
/// look at them.
pub const DEADLETTER_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Default age after which events leave `TANDEM_EVENTS`: 7 days.
pub const DEFAULT_EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default duplicate window of every stream: 2 minutes.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// The server's lower bound for a duplicate window.
pub const MIN_DUPLICATE_WINDOW: Duration = Duration::from_millis(100);

/// Tunables of the streams (from `TANDEM_EVENTS_MAX_AGE_SECS`,
/// `TANDEM_NATS_DUPLICATE_WINDOW_SECS` and `TANDEM_NATS_STREAM_REPLICAS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    pub events_max_age: Duration,
    pub duplicate_window: Duration,
    /// Stream replicas in a clustered NATS (1 on a single server).
    pub replicas: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            events_max_age: DEFAULT_EVENTS_MAX_AGE,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            replicas: 1,
        }
    }
}

impl StreamSettings {
    /// Checks what the server would refuse, with a message that names the settings.
    pub fn validate(&self) -> Result<(), BusError> {
        let bad = |msg: String| Err(BusError::InvalidSettings(msg));
        if self.duplicate_window < MIN_DUPLICATE_WINDOW {
            return bad(format!(
                "TANDEM_NATS_DUPLICATE_WINDOW_SECS must be at least {} ms",
                MIN_DUPLICATE_WINDOW.as_millis()
            ));
        }
        if self.events_max_age.is_zero() {
            return bad("TANDEM_EVENTS_MAX_AGE_SECS must be greater than 0".into());
        }
        if self.duplicate_window > self.events_max_age {
            return bad(format!(
                "TANDEM_NATS_DUPLICATE_WINDOW_SECS ({} s) must not exceed TANDEM_EVENTS_MAX_AGE_SECS ({} s)",
                self.duplicate_window.as_secs(),
                self.events_max_age.as_secs()
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return bad("TANDEM_NATS_STREAM_REPLICAS must be between 1 and 5".into());
        }
        Ok(())
    }
}

/// The (prefixed) stream names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamNames {
    pub tasks: String,
    pub results: String,
    pub events: String,
    pub deadletter: String,
}

impl StreamNames {
    pub fn new(prefix: &Prefix) -> Self {
        Self {
            tasks: prefix.stream(TASKS_STREAM),
            results: prefix.stream(RESULTS_STREAM),
            events: prefix.stream(EVENTS_STREAM),
            deadletter: prefix.stream(DEADLETTER_STREAM),
        }
    }

    /// Every stream [`ensure_streams`] manages.
    pub fn all(&self) -> [&str; 4] {
        [&self.tasks, &self.results, &self.events, &self.deadletter]
    }
}

/// The desired configuration of the three streams, in the order tasks, results, events.
pub fn stream_configs(prefix: &Prefix, settings: &StreamSettings) -> [Config; 3] {
    let names = StreamNames::new(prefix);
    let work_queue = |name: String, subject: &str, description: &str| Config {
        name,
        description: Some(description.into()),
        subjects: vec![prefix.subject(&format!("{subject}.>"))],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        duplicate_window: settings.duplicate_window,
        num_replicas: settings.replicas,
        ..Default::default()
    };
    [
        work_queue(names.tasks, TASKS, "Tandem node task dispatch to workers"),
        work_queue(
            names.results,
            RESULTS,
            "Tandem task results and progress from workers",
        ),
        Config {
            name: names.events,
            description: Some("Tandem gate and run events for subscribers".into()),
            subjects: vec![prefix.subject(&format!("{EVENTS}.>"))],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            max_age: settings.events_max_age,
            duplicate_window: settings.duplicate_window,
            num_replicas: settings.replicas,
            ..Default::default()
        },
    ]
}

/// The desired configuration of `TANDEM_DEADLETTER`: limits retention (every dead letter stays
/// until [`DEADLETTER_MAX_AGE`], whoever reads it), file storage. Its duplicate window is the
/// fleet's, capped at the stream's `max_age` as the server requires.
pub fn deadletter_stream_config(prefix: &Prefix, settings: &StreamSettings) -> Config {
    Config {
        name: prefix.stream(DEADLETTER_STREAM),
        description: Some(
            "Tandem dead letters: task and result messages nobody can process".into(),
        ),
        subjects: vec![prefix.subject(&format!("{DEADLETTER}.>"))],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        max_age: DEADLETTER_MAX_AGE,
        duplicate_window: settings.duplicate_window.min(DEADLETTER_MAX_AGE),
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// What [`ensure_streams`] did to one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamAction {
    Created,
    Updated,
    Unchanged,
}

/// The outcome of [`ensure_streams`], one entry per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnsureReport {
    pub streams: Vec<(String, StreamAction)>,
}

/// Creates the streams ([`stream_configs`] and [`deadletter_stream_config`]) with default
/// [`StreamSettings`], or brings existing ones to the
/// desired configuration. Idempotent and safe to run from every replica at once.
pub async fn ensure_streams(
    js: &jetstream::Context,
    prefix: &Prefix,
) -> Result<EnsureReport, BusError> {
    ensure_streams_with(js, prefix, &StreamSettings::default()).await
}

/// [`ensure_streams`] with explicit settings.
///
/// An existing stream whose managed fields (subjects, `max_age`, duplicate window, replicas,
/// description) differ is updated, keeping any other setting an operator changed; one whose
/// retention or storage differs (the server cannot change those) is an error that says so.
pub async fn ensure_streams_with(
    js: &jetstream::Context,
    prefix: &Prefix,
    settings: &StreamSettings,
) -> Result<EnsureReport, BusError> {
    settings.validate()?;
    let mut streams = Vec::with_capacity(4);
    let all = stream_configs(prefix, settings)
        .into_iter()
        .chain([deadletter_stream_config(prefix, settings)]);
    for want in all {
        let action = ensure_stream(js, &want).await?;
        streams.push((want.name.clone(), action));
    }
    Ok(EnsureReport { streams })
}

fn is_not_found(kind: &GetStreamErrorKind) -> bool {
    matches!(kind, GetStreamErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

fn managed_fields_match(have: &Config, want: &Config) -> bool {
    have.subjects == want.subjects
        && have.max_age == want.max_age
        && have.duplicate_window == want.duplicate_window
        && have.num_replicas == want.num_replicas
        && have.description == want.description
}

async fn ensure_stream(js: &jetstream::Context, want: &Config) -> Result<StreamAction, BusError> {
    // Two rounds: a concurrent replica may create the stream between our lookup and our create.
    for _ in 0..2 {
        match js.get_stream(&want.name).await {
            Ok(stream) => {
                let have = &stream.cached_info().config;
                if have.retention != want.retention || have.storage != want.storage {
                    return Err(BusError::IncompatibleStream {
                        stream: want.name.clone(),
                        detail: format!(
                            "it has retention {:?} and storage {:?}, we need {:?} and {:?}; \
                             delete it (or use another TANDEM_NATS_PREFIX) and start again",
                            have.retention, have.storage, want.retention, want.storage
                        ),
                    });
                }
                if managed_fields_match(have, want) {
                    return Ok(StreamAction::Unchanged);
                }
                let mut updated = have.clone();
                updated.subjects = want.subjects.clone();
                updated.max_age = want.max_age;
                updated.duplicate_window = want.duplicate_window;
                updated.num_replicas = want.num_replicas;
                updated.description = want.description.clone();
                js.update_stream(&updated)
                    .await
                    .map_err(|e| BusError::stream(&want.name, e))?;
                return Ok(StreamAction::Updated);
            }
            Err(e) if is_not_found(&e.kind()) => match js.create_stream(want.clone()).await {
                Ok(_) => return Ok(StreamAction::Created),
                Err(e)
                    if matches!(e.kind(), CreateStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST) =>
                {
                    continue;
                }
                Err(e) => return Err(BusError::stream(&want.name, e)),
            },
            Err(e) => return Err(BusError::stream(&want.name, e)),
        }
    }
    Err(BusError::IncompatibleStream {
        stream: want.name.clone(),
        detail: "it exists with a different configuration and could not be read back".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_follow_the_prefix() {
        let p = Prefix::new("t_ab12").expect("valid");
        let [tasks, results, events] = stream_configs(&p, &StreamSettings::default());
        assert_eq!(tasks.name, "T_AB12_TANDEM_TASKS");
        assert_eq!(tasks.subjects, vec!["t_ab12.tandem.tasks.>"]);
        assert_eq!(tasks.retention, RetentionPolicy::WorkQueue);
        assert_eq!(results.name, "T_AB12_TANDEM_RESULTS");
        assert_eq!(results.subjects, vec!["t_ab12.tandem.results.>"]);
        assert_eq!(results.retention, RetentionPolicy::WorkQueue);
        assert_eq!(events.name, "T_AB12_TANDEM_EVENTS");
        assert_eq!(events.subjects, vec!["t_ab12.tandem.events.>"]);
        assert_eq!(events.retention, RetentionPolicy::Limits);
        assert_eq!(events.max_age, DEFAULT_EVENTS_MAX_AGE);
        assert!(events.duplicate_window <= events.max_age);

        let [tasks, _, events] = stream_configs(&Prefix::none(), &StreamSettings::default());
        assert_eq!(tasks.name, "TANDEM_TASKS");
        assert_eq!(events.subjects, vec!["tandem.events.>"]);
    }

    #[test]
    fn deadletter_stream_follows_the_prefix() {
        let p = Prefix::new("t_ab12").expect("valid");
        let dl = deadletter_stream_config(&p, &StreamSettings::default());
        assert_eq!(dl.name, "T_AB12_TANDEM_DEADLETTER");
        assert_eq!(dl.subjects, vec!["t_ab12.tandem.deadletter.>"]);
        assert_eq!(dl.retention, RetentionPolicy::Limits);
        assert_eq!(dl.max_age, DEADLETTER_MAX_AGE);
        assert!(dl.duplicate_window <= dl.max_age);
        let huge = StreamSettings {
            events_max_age: Duration::from_secs(365 * 24 * 3600),
            duplicate_window: Duration::from_secs(60 * 24 * 3600),
            replicas: 1,
        };
        assert!(huge.validate().is_ok());
        let dl = deadletter_stream_config(&p, &huge);
        assert_eq!(dl.duplicate_window, DEADLETTER_MAX_AGE, "capped at max age");
        let names = StreamNames::new(&p);
        assert_eq!(names.deadletter, "T_AB12_TANDEM_DEADLETTER");
        assert_eq!(names.all().len(), 4);
    }

    #[test]
    fn settings_are_validated() {
        assert!(StreamSettings::default().validate().is_ok());
        let s = StreamSettings {
            events_max_age: Duration::from_secs(60),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
        };
        let e = s.validate().expect_err("window > max age").to_string();
        assert!(e.contains("TANDEM_NATS_DUPLICATE_WINDOW_SECS"), "{e}");
        let s = StreamSettings {
            duplicate_window: Duration::from_millis(10),
            ..StreamSettings::default()
        };
        assert!(s.validate().is_err());
        let s = StreamSettings {
            replicas: 0,
            ..StreamSettings::default()
        };
        assert!(s.validate().is_err());
    }
}
