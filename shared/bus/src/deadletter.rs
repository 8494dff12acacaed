//! Dead letters: a copy of a message nobody can process (not JSON, wrong schema, delivered too
//! many times), published to `tandem.deadletter.<kind>` (stream `TANDEM_DEADLETTER`) before the
//! original is terminated, so nothing is lost and the consumer keeps going.
//!
//! The dead letter carries the original payload byte for byte and the original headers, plus:
//!
//! | Header | Value |
//! |---|---|
//! | `Nats-Msg-Id` | `<kind>:<stream>:<sequence>`: a retried dead-lettering is stored once |
//! | `Tandem-Deadletter-Error` | why (one line, at most 1000 characters) |
//! | `Tandem-Deadletter-Subject` | the subject the message was published on |
//! | `Tandem-Deadletter-Stream`, `Tandem-Deadletter-Sequence` | where it was stored |
//! | `Tandem-Deadletter-Delivered` | how many times it had been delivered |
//!
//! Original `Nats-*` headers (which would change how the server stores the copy, e.g.
//! `Nats-Msg-Id` or `Nats-Expected-Stream`) are kept under `Tandem-Original-Nats-*`.

use std::str::FromStr;

use async_nats::{
    HeaderMap, HeaderName, HeaderValue, header::NATS_MESSAGE_ID, jetstream,
    jetstream::message::PublishMessage,
};
use bytes::Bytes;

use crate::BusError;
use crate::publish::Published;
use crate::subject::{
    HEADER_DEADLETTER_DELIVERED, HEADER_DEADLETTER_ERROR, HEADER_DEADLETTER_ORIGINAL_PREFIX,
    HEADER_DEADLETTER_SEQUENCE, HEADER_DEADLETTER_STREAM, HEADER_DEADLETTER_SUBJECT, Prefix,
    deadletter_subject,
};

/// Longest error text kept in `Tandem-Deadletter-Error`.
pub const MAX_DEADLETTER_ERROR_CHARS: usize = 1000;

/// A message to dead-letter, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// [`crate::subject::DEADLETTER_TASKS`] or [`crate::subject::DEADLETTER_RESULTS`].
    pub kind: String,
    /// The subject the original was published on.
    pub subject: String,
    /// The stream and sequence the original was stored at.
    pub stream: String,
    pub sequence: u64,
    /// Deliveries of the original so far.
    pub delivered: u64,
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    pub error: String,
}

impl DeadLetter {
    /// The dead letter's `Nats-Msg-Id`: stable per original message, so dead-lettering it again
    /// (after a crash between the PubAck and terminating the original) stores one copy.
    pub fn msg_id(&self) -> String {
        format!("{}:{}:{}", self.kind, self.stream, self.sequence)
    }

    fn header_map(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(original) = &self.headers {
            for (name, values) in original.iter() {
                let name: &str = name.as_ref();
                let kept = if name.to_ascii_lowercase().starts_with("nats-") {
                    format!("{HEADER_DEADLETTER_ORIGINAL_PREFIX}{name}")
                } else {
                    name.to_owned()
                };
                // Names and values come from a parsed message; a name that does not parse back
                // is dropped rather than failing the dead-lettering.
                let Ok(kept) = HeaderName::from_str(&kept) else {
                    continue;
                };
                for v in values {
                    h.append(kept.clone(), v.clone());
                }
            }
        }
        let mut set = |name: &str, value: String| {
            if let (Ok(n), Ok(v)) = (HeaderName::from_str(name), HeaderValue::from_str(&value)) {
                h.insert(n, v);
            }
        };
        set(HEADER_DEADLETTER_ERROR, one_line(&self.error));
        set(HEADER_DEADLETTER_SUBJECT, one_line(&self.subject));
        set(HEADER_DEADLETTER_STREAM, one_line(&self.stream));
        set(HEADER_DEADLETTER_SEQUENCE, self.sequence.to_string());
        set(HEADER_DEADLETTER_DELIVERED, self.delivered.to_string());
        if let Ok(id) = HeaderValue::from_str(&one_line(&self.msg_id())) {
            h.insert(NATS_MESSAGE_ID, id);
        }
        h
    }
}

/// Replaces CR, LF and other control characters by spaces and bounds the length, so the text is
/// a valid header value.
fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_DEADLETTER_ERROR_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > MAX_DEADLETTER_ERROR_CHARS {
        out.push('…');
    }
    out
}

/// Publishes the dead letter to `tandem.deadletter.<kind>` and waits for the PubAck. Only after
/// an `Ok` may the caller terminate (`+TERM`) or delete the original.
pub async fn publish_dead_letter(
    js: &jetstream::Context,
    prefix: &Prefix,
    letter: &DeadLetter,
) -> Result<Published, BusError> {
    let subject = deadletter_subject(prefix, &letter.kind);
    let outcome = async {
        js.send_publish(
            subject.clone(),
            PublishMessage::build()
                .payload(letter.payload.clone())
                .headers(letter.header_map()),
        )
        .await?
        .await
    }
    .await;
    match outcome {
        Ok(ack) => {
            metrics::counter!("tandem_nats_deadletters_published_total", "kind" => letter.kind.clone())
                .increment(1);
            Ok(Published {
                stream: ack.stream,
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            })
        }
        Err(source) => {
            metrics::counter!("tandem_nats_publish_errors_total").increment(1);
            Err(BusError::Publish { subject, source })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(headers: Option<HeaderMap>, error: &str) -> DeadLetter {
        DeadLetter {
            kind: "tasks".into(),
            subject: "t1.tandem.tasks.default".into(),
            stream: "T1_TANDEM_TASKS".into(),
            sequence: 7,
            delivered: 1,
            payload: Bytes::from_static(b"not json"),
            headers,
            error: error.into(),
        }
    }

    #[test]
    fn headers_keep_the_original_and_say_why() {
        let mut orig = HeaderMap::new();
        orig.insert(NATS_MESSAGE_ID, "r1:n1:1:1");
        orig.insert("traceparent", "00-abc-def-01");
        orig.insert("Nats-Expected-Stream", "X");
        let h = letter(Some(orig), "expected value at line 1\ncolumn 1").header_map();
        assert_eq!(
            h.get(NATS_MESSAGE_ID).map(|v| v.as_str()),
            Some("tasks:T1_TANDEM_TASKS:7")
        );
        assert_eq!(
            h.get("Tandem-Original-Nats-Msg-Id").map(|v| v.as_str()),
            Some("r1:n1:1:1")
        );
        assert_eq!(
            h.get("Tandem-Original-Nats-Expected-Stream")
                .map(|v| v.as_str()),
            Some("X")
        );
        assert!(h.get("Nats-Expected-Stream").is_none());
        assert_eq!(
            h.get("traceparent").map(|v| v.as_str()),
            Some("00-abc-def-01")
        );
        assert_eq!(
            h.get(HEADER_DEADLETTER_ERROR).map(|v| v.as_str()),
            Some("expected value at line 1 column 1")
        );
        assert_eq!(
            h.get(HEADER_DEADLETTER_SEQUENCE).map(|v| v.as_str()),
            Some("7")
        );
        assert_eq!(
            h.get(HEADER_DEADLETTER_SUBJECT).map(|v| v.as_str()),
            Some("t1.tandem.tasks.default")
        );
    }

    #[test]
    fn long_errors_are_bounded() {
        let long = "x".repeat(5000);
        let h = letter(None, &long).header_map();
        let kept = h
            .get(HEADER_DEADLETTER_ERROR)
            .map(|v| v.as_str().chars().count());
        assert_eq!(kept, Some(MAX_DEADLETTER_ERROR_CHARS + 1));
    }
}
