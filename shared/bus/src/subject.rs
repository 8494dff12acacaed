//! Subject names, stream names and the escaping of variable subject tokens.
//!
//! Every name takes a [`Prefix`] so that tests (and several fleets sharing one NATS account) use
//! private subjects and streams: the empty prefix gives `tandem.…` subjects and `TANDEM_…`
//! streams; the prefix `t_ab12` gives `t_ab12.tandem.…` subjects and `T_AB12_TANDEM_…` streams.
//!
//! # Token escaping
//!
//! Tenant ids (org, workspace), run ids and queue names come from outside and end up as subject
//! tokens. [`escape_token`] maps any string to a token that cannot change the shape of the
//! subject:
//!
//! * ASCII letters, digits, `-` and `_` are kept as they are;
//! * every other byte of the UTF-8 encoding (including `.`, `*`, `>`, `%`, `$`, whitespace,
//!   control characters and non-ASCII characters) becomes `%XX`, two upper-case hex digits;
//! * the empty string becomes `_`, and the one-character string `_` becomes `%5F` so that the
//!   two stay distinct.
//!
//! The encoding is injective ([`unescape_token`] inverts it), so two distinct ids never share a
//! subject, and an escaped token only ever contains `[A-Za-z0-9_%-]`.

use std::fmt;

/// Root token of every subject, after the optional prefix.
pub const ROOT: &str = "tandem";

/// Core-NATS wake-up for schedulers (a hint: correctness never depends on it).
pub const WAKE_SCHEDULER: &str = "tandem.wake.scheduler";
/// Core-NATS wake-up for gate notifiers (a hint).
pub const WAKE_GATES: &str = "tandem.wake.gates";
/// Core-NATS cancel hint for a run's workers: `tandem.control.cancel.<run_id>`.
pub const CONTROL_CANCEL: &str = "tandem.control.cancel";
/// JetStream task dispatch: `tandem.tasks.<queue>`.
pub const TASKS: &str = "tandem.tasks";
/// JetStream task results: `tandem.results.<run_id>` (progress heartbeats are core NATS, [`PROGRESS`]).
pub const RESULTS: &str = "tandem.results";
/// JetStream events: `tandem.events.<org>.<workspace>.<event.type>`.
pub const EVENTS: &str = "tandem.events";
/// Core-NATS worker heartbeats: `tandem.progress.<run_id>` (best effort, not persisted).
pub const PROGRESS: &str = "tandem.progress";
/// JetStream dead letters: `tandem.deadletter.<kind>` ([`DEADLETTER_TASKS`],
/// [`DEADLETTER_RESULTS`]).
pub const DEADLETTER: &str = "tandem.deadletter";
/// Dead-letter kind of task messages that no worker can process.
pub const DEADLETTER_TASKS: &str = "tasks";
/// Dead-letter kind of result messages that the scheduler cannot apply.
pub const DEADLETTER_RESULTS: &str = "results";

/// Header carrying the event type (e.g. `approval.gate.expired`).
pub const HEADER_EVENT_TYPE: &str = "Tandem-Event-Type";
/// Header carrying the escaped org id of the event's tenant.
pub const HEADER_ORG: &str = "Tandem-Org";
/// Header carrying the escaped workspace id of the event's tenant.
pub const HEADER_WORKSPACE: &str = "Tandem-Workspace";
/// W3C trace context header.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Dead letters: why the message was dead-lettered (one line).
pub const HEADER_DEADLETTER_ERROR: &str = "Tandem-Deadletter-Error";
/// Dead letters: the subject the message was published on.
pub const HEADER_DEADLETTER_SUBJECT: &str = "Tandem-Deadletter-Subject";
/// Dead letters: the stream the message came from.
pub const HEADER_DEADLETTER_STREAM: &str = "Tandem-Deadletter-Stream";
/// Dead letters: the message's sequence in that stream.
pub const HEADER_DEADLETTER_SEQUENCE: &str = "Tandem-Deadletter-Sequence";
/// Dead letters: how many times the message had been delivered.
pub const HEADER_DEADLETTER_DELIVERED: &str = "Tandem-Deadletter-Delivered";
/// Dead letters: prefix under which the original `Nats-*` headers are kept (they would change how
/// the server stores the dead letter otherwise): `Nats-Msg-Id` becomes
/// `Tandem-Original-Nats-Msg-Id`.
pub const HEADER_DEADLETTER_ORIGINAL_PREFIX: &str = "Tandem-Original-";

fn keep(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Escapes one subject token (see the module documentation for the encoding).
pub fn escape_token(raw: &str) -> String {
    if raw.is_empty() {
        return "_".to_owned();
    }
    if raw == "_" {
        return "%5F".to_owned();
    }
    let mut out = String::with_capacity(raw.len());
    for &b in raw.as_bytes() {
        if keep(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(hex_digit(b >> 4));
            out.push(hex_digit(b & 0x0f));
        }
    }
    out
}

fn hex_digit(n: u8) -> char {
    char::from(if n < 10 { b'0' + n } else { b'A' + n - 10 })
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Inverts [`escape_token`]. Returns `None` for a string that no call to [`escape_token`]
/// produces (for subscribers that want the raw id back from a subject).
pub fn unescape_token(token: &str) -> Option<String> {
    if token == "_" {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            out.push((hi << 4) | lo);
            i += 3;
        } else if keep(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    let s = String::from_utf8(out).ok()?;
    // Only canonical tokens decode (escape_token never escapes a kept byte, and so on), which
    // keeps decoding a bijection with encoding.
    (escape_token(&s) == token).then_some(s)
}

/// Escapes a dotted name (an event type such as `approval.gate.expired`) token by token, so
/// subscribers can filter on its parts (`…approval.gate.>`) while no part can inject a wildcard.
pub fn escape_dotted(raw: &str) -> String {
    raw.split('.')
        .map(escape_token)
        .collect::<Vec<_>>()
        .join(".")
}

/// A subject/stream prefix for one fleet (or one test). Empty by default.
///
/// A non-empty prefix is 1–32 characters of `a-z`, `0-9`, `_` and `-`, starting with a letter.
/// Lower case only, so the upper-cased stream name prefix stays distinct per prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Prefix(String);

/// A prefix that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid NATS prefix {0:?}: use 1-32 characters of a-z, 0-9, '_' and '-', starting with a letter (or leave it empty)"
)]
pub struct InvalidPrefix(pub String);

impl Prefix {
    /// The empty prefix: `tandem.…` subjects and `TANDEM_…` streams.
    pub fn none() -> Self {
        Self(String::new())
    }

    /// Validates a prefix (the empty string is the empty prefix).
    pub fn new(raw: &str) -> Result<Self, InvalidPrefix> {
        let ok = raw.is_empty()
            || (raw.len() <= 32
                && raw.as_bytes()[0].is_ascii_lowercase()
                && raw.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                }));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidPrefix(raw.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies the prefix to a subject that starts with `tandem.`: `t_ab12.tandem.…`.
    pub fn subject(&self, subject: &str) -> String {
        if self.0.is_empty() {
            subject.to_owned()
        } else {
            format!("{}.{subject}", self.0)
        }
    }

    /// Applies the prefix to a stream name: `TANDEM_EVENTS` → `T_AB12_TANDEM_EVENTS`.
    pub fn stream(&self, base: &str) -> String {
        if self.0.is_empty() {
            base.to_owned()
        } else {
            format!("{}_{base}", self.0.to_ascii_uppercase())
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Prefix {
    type Err = InvalidPrefix;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// `tandem.events.<org>.<workspace>.<event.type>` (prefixed), with org and workspace escaped as
/// single tokens and the event type escaped part by part.
pub fn event_subject(prefix: &Prefix, org: &str, workspace: &str, event_type: &str) -> String {
    prefix.subject(&format!(
        "{EVENTS}.{}.{}.{}",
        escape_token(org),
        escape_token(workspace),
        escape_dotted(event_type)
    ))
}

/// `tandem.tasks.<queue>` (prefixed, queue escaped).
pub fn task_subject(prefix: &Prefix, queue: &str) -> String {
    prefix.subject(&format!("{TASKS}.{}", escape_token(queue)))
}

/// `tandem.results.<run_id>` (prefixed, run id escaped).
pub fn result_subject(prefix: &Prefix, run_id: &str) -> String {
    prefix.subject(&format!("{RESULTS}.{}", escape_token(run_id)))
}

/// `tandem.control.cancel.<run_id>` (prefixed, run id escaped).
pub fn cancel_subject(prefix: &Prefix, run_id: &str) -> String {
    prefix.subject(&format!("{CONTROL_CANCEL}.{}", escape_token(run_id)))
}

/// `tandem.control.cancel.*` (prefixed): every run's cancel hint, for a worker's one subscription.
pub fn cancel_wildcard_subject(prefix: &Prefix) -> String {
    prefix.subject(&format!("{CONTROL_CANCEL}.*"))
}

/// The run id of a cancel subject built by [`cancel_subject`] with the same prefix, or `None`
/// for any other subject (or a token [`escape_token`] never produces).
pub fn run_id_of_cancel_subject(prefix: &Prefix, subject: &str) -> Option<String> {
    let head = prefix.subject(&format!("{CONTROL_CANCEL}."));
    subject.strip_prefix(&head).and_then(unescape_token)
}

/// `tandem.progress.<run_id>` (prefixed, run id escaped): core-NATS worker heartbeats.
pub fn progress_subject(prefix: &Prefix, run_id: &str) -> String {
    prefix.subject(&format!("{PROGRESS}.{}", escape_token(run_id)))
}

/// `tandem.progress.*` (prefixed): every run's heartbeats, for the scheduler's subscription.
pub fn progress_wildcard_subject(prefix: &Prefix) -> String {
    prefix.subject(&format!("{PROGRESS}.*"))
}

/// `tandem.deadletter.<kind>` (prefixed, kind escaped): [`DEADLETTER_TASKS`] or
/// [`DEADLETTER_RESULTS`].
pub fn deadletter_subject(prefix: &Prefix, kind: &str) -> String {
    prefix.subject(&format!("{DEADLETTER}.{}", escape_token(kind)))
}

/// The durable pull consumer on `TANDEM_TASKS` that every worker of `queue` binds to, in any
/// language: `tandem-tasks-<queue>` (queue escaped as a subject token). A work-queue stream accepts
/// only one consumer per subject, so all workers of a queue share this one and compete for its
/// messages. Stream names carry the prefix, so the consumer name does not.
pub fn task_consumer_name(queue: &str) -> String {
    format!("tandem-tasks-{}", escape_token(queue))
}

/// The prefixed scheduler wake-up subject.
pub fn wake_scheduler_subject(prefix: &Prefix) -> String {
    prefix.subject(WAKE_SCHEDULER)
}

/// The prefixed gate-notifier wake-up subject.
pub fn wake_gates_subject(prefix: &Prefix) -> String {
    prefix.subject(WAKE_GATES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_ids_are_kept() {
        assert_eq!(escape_token("org-1_A"), "org-1_A");
        assert_eq!(escape_token("0190a5c2"), "0190a5c2");
    }

    #[test]
    fn special_characters_are_escaped() {
        assert_eq!(escape_token("a.b"), "a%2Eb");
        assert_eq!(escape_token("*"), "%2A");
        assert_eq!(escape_token(">"), "%3E");
        assert_eq!(escape_token("a b\tc"), "a%20b%09c");
        assert_eq!(escape_token("100%"), "100%25");
        assert_eq!(escape_token("$SYS"), "%24SYS");
        assert_eq!(escape_token("\u{0}\r\n"), "%00%0D%0A");
        assert_eq!(escape_token("é"), "%C3%A9");
    }

    #[test]
    fn empty_and_underscore_stay_distinct() {
        assert_eq!(escape_token(""), "_");
        assert_eq!(escape_token("_"), "%5F");
        assert_eq!(escape_token("__"), "__");
        assert_eq!(unescape_token("_").as_deref(), Some(""));
        assert_eq!(unescape_token("%5F").as_deref(), Some("_"));
    }

    #[test]
    fn non_canonical_tokens_do_not_decode() {
        assert_eq!(unescape_token("%41"), None, "A is never escaped");
        assert_eq!(unescape_token("a.b"), None);
        assert_eq!(unescape_token("%2"), None);
        assert_eq!(unescape_token("%2e"), None, "hex is upper case");
        assert_eq!(unescape_token("%FF"), None, "not UTF-8");
    }

    #[test]
    fn event_subjects() {
        let none = Prefix::none();
        assert_eq!(
            event_subject(&none, "org1", "ws1", "approval.gate.expired"),
            "tandem.events.org1.ws1.approval.gate.expired"
        );
        assert_eq!(
            event_subject(&none, "a.b", "*", "run.>"),
            "tandem.events.a%2Eb.%2A.run.%3E"
        );
        assert_eq!(
            event_subject(&none, "", "", ""),
            "tandem.events._._._",
            "empty tokens still give a valid subject"
        );
        let p = Prefix::new("t_ab12").expect("valid");
        assert_eq!(
            event_subject(&p, "o", "w", "approval.gate.requested"),
            "t_ab12.tandem.events.o.w.approval.gate.requested"
        );
        assert_eq!(p.stream("TANDEM_EVENTS"), "T_AB12_TANDEM_EVENTS");
        assert_eq!(none.stream("TANDEM_EVENTS"), "TANDEM_EVENTS");
    }

    #[test]
    fn other_subjects() {
        let p = Prefix::new("t1").expect("valid");
        assert_eq!(task_subject(&p, "default"), "t1.tandem.tasks.default");
        assert_eq!(
            result_subject(&Prefix::none(), "r.1"),
            "tandem.results.r%2E1"
        );
        assert_eq!(cancel_subject(&p, "r1"), "t1.tandem.control.cancel.r1");
        assert_eq!(wake_scheduler_subject(&p), "t1.tandem.wake.scheduler");
        assert_eq!(wake_gates_subject(&Prefix::none()), "tandem.wake.gates");
        assert_eq!(progress_subject(&p, "r.1"), "t1.tandem.progress.r%2E1");
        assert_eq!(progress_wildcard_subject(&p), "t1.tandem.progress.*");
        assert_eq!(
            deadletter_subject(&p, DEADLETTER_TASKS),
            "t1.tandem.deadletter.tasks"
        );
        assert_eq!(
            deadletter_subject(&Prefix::none(), DEADLETTER_RESULTS),
            "tandem.deadletter.results"
        );
        assert_eq!(cancel_wildcard_subject(&p), "t1.tandem.control.cancel.*");
        assert_eq!(task_consumer_name("default"), "tandem-tasks-default");
        assert_eq!(task_consumer_name("gpu.large"), "tandem-tasks-gpu%2Elarge");
    }

    #[test]
    fn cancel_subjects_give_the_run_id_back() {
        let p = Prefix::new("t1").expect("valid");
        for run in ["r1", "a.b", "*", "", "_", "é >"] {
            let s = cancel_subject(&p, run);
            assert_eq!(run_id_of_cancel_subject(&p, &s).as_deref(), Some(run));
        }
        assert_eq!(
            run_id_of_cancel_subject(&Prefix::none(), "t1.tandem.control.cancel.r1"),
            None,
            "another prefix"
        );
        assert_eq!(
            run_id_of_cancel_subject(&p, "t1.tandem.control.cancel.a.b"),
            None
        );
        assert_eq!(run_id_of_cancel_subject(&p, "t1.tandem.wake.gates"), None);
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(Prefix::new("").is_ok());
        assert!(Prefix::new("t_ab12").is_ok());
        assert!(Prefix::new("prod-eu1").is_ok());
        for bad in [
            "T_AB",
            "1abc",
            "a.b",
            "a b",
            "a*",
            "a>",
            "_a",
            &"a".repeat(33),
        ] {
            assert!(Prefix::new(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    proptest! {
        #[test]
        fn escaped_tokens_are_single_safe_tokens(s in any::<String>()) {
            let t = escape_token(&s);
            prop_assert!(!t.is_empty());
            prop_assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'%'));
            prop_assert!(!t.contains(['.', '*', '>']));
            prop_assert!(!t.chars().any(char::is_whitespace));
        }

        #[test]
        fn escaping_round_trips(s in any::<String>()) {
            prop_assert_eq!(unescape_token(&escape_token(&s)), Some(s));
        }

        #[test]
        fn distinct_inputs_give_distinct_tokens(a in any::<String>(), b in any::<String>()) {
            prop_assume!(a != b);
            prop_assert_ne!(escape_token(&a), escape_token(&b));
        }

        #[test]
        fn tricky_alphabet_is_injective(
            a in "[._*> %\t\u{0}a-]{0,6}",
            b in "[._*> %\t\u{0}a-]{0,6}",
        ) {
            prop_assume!(a != b);
            prop_assert_ne!(escape_token(&a), escape_token(&b));
        }

        #[test]
        fn event_subject_has_fixed_tenant_positions(
            org in any::<String>(), ws in any::<String>(), ty in "[a-z_.*> ]{0,12}",
        ) {
            let subject = event_subject(&Prefix::none(), &org, &ws, &ty);
            let tokens: Vec<&str> = subject.split('.').collect();
            prop_assert_eq!(tokens[0], "tandem");
            prop_assert_eq!(tokens[1], "events");
            prop_assert_eq!(unescape_token(tokens[2]), Some(org));
            prop_assert_eq!(unescape_token(tokens[3]), Some(ws));
            prop_assert!(tokens.iter().all(|t| !t.is_empty() && *t != "*" && *t != ">"));
            prop_assert!(!subject.chars().any(char::is_whitespace));
        }
    }
}
