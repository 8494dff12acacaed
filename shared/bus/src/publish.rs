//! Publishing to JetStream with `Nats-Msg-Id` dedupe, and core-NATS wake-up hints.

use std::str::FromStr;

use async_nats::{
    Client, HeaderMap, HeaderName, HeaderValue, header::NATS_MESSAGE_ID, jetstream,
    jetstream::message::PublishMessage,
};
use bytes::Bytes;

use crate::BusError;
use crate::subject::{
    HEADER_EVENT_TYPE, HEADER_ORG, HEADER_TRACEPARENT, HEADER_WORKSPACE, Prefix, escape_token,
    event_subject,
};

/// One message for JetStream. `msg_id` becomes `Nats-Msg-Id`: the stable id of what is published
/// (an outbox row id, a reminder's `notification_key`), so a re-publish inside the duplicate
/// window is dropped by the server.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub subject: String,
    pub msg_id: String,
    pub payload: Bytes,
    pub event_type: Option<String>,
    /// `(org, workspace)`, sent escaped as in subjects (see [`escape_token`]).
    pub tenant: Option<(String, String)>,
    pub traceparent: Option<String>,
}

impl OutgoingMessage {
    pub fn new(subject: impl Into<String>, msg_id: impl Into<String>, payload: Bytes) -> Self {
        Self {
            subject: subject.into(),
            msg_id: msg_id.into(),
            payload,
            event_type: None,
            tenant: None,
            traceparent: None,
        }
    }

    /// An event on `tandem.events.<org>.<workspace>.<event.type>` with the event type and tenant
    /// headers set.
    pub fn event(
        prefix: &Prefix,
        org: &str,
        workspace: &str,
        event_type: &str,
        msg_id: impl Into<String>,
        payload: Bytes,
    ) -> Self {
        Self::new(
            event_subject(prefix, org, workspace, event_type),
            msg_id,
            payload,
        )
        .with_event_type(event_type)
        .with_tenant(org, workspace)
    }

    pub fn with_event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    pub fn with_tenant(mut self, org: impl Into<String>, workspace: impl Into<String>) -> Self {
        self.tenant = Some((org.into(), workspace.into()));
        self
    }

    /// Sets the W3C `traceparent` header when there is one.
    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent.filter(|t| !t.is_empty());
        self
    }

    fn headers(&self) -> Result<HeaderMap, BusError> {
        fn value(what: &str, v: &str) -> Result<HeaderValue, BusError> {
            HeaderValue::from_str(v).map_err(|_| {
                BusError::InvalidMessage(format!("{what} must not contain CR or LF: {v:?}"))
            })
        }
        fn name(n: &str) -> Result<HeaderName, BusError> {
            HeaderName::from_str(n)
                .map_err(|_| BusError::InvalidMessage(format!("invalid header name {n:?}")))
        }
        if self.msg_id.trim().is_empty() {
            return Err(BusError::InvalidMessage(
                "Nats-Msg-Id must not be empty".into(),
            ));
        }
        let mut h = HeaderMap::new();
        h.insert(NATS_MESSAGE_ID, value("Nats-Msg-Id", &self.msg_id)?);
        if let Some(t) = &self.event_type {
            h.insert(name(HEADER_EVENT_TYPE)?, value("event type", t)?);
        }
        if let Some((org, ws)) = &self.tenant {
            h.insert(name(HEADER_ORG)?, value("org", &escape_token(org))?);
            h.insert(
                name(HEADER_WORKSPACE)?,
                value("workspace", &escape_token(ws))?,
            );
        }
        if let Some(tp) = &self.traceparent {
            h.insert(name(HEADER_TRACEPARENT)?, value("traceparent", tp)?);
        }
        Ok(h)
    }
}

/// The server's acknowledgement of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub stream: String,
    pub sequence: u64,
    /// The server already held a message with this `Nats-Msg-Id` (inside the duplicate window)
    /// and dropped this one.
    pub duplicate: bool,
}

/// Publishes and waits for the PubAck. Only an `Ok` means the message is stored (or was already).
pub async fn publish(js: &jetstream::Context, msg: OutgoingMessage) -> Result<Published, BusError> {
    let headers = msg.headers()?;
    let subject = msg.subject;
    let outcome = async {
        js.send_publish(
            subject.clone(),
            PublishMessage::build()
                .payload(msg.payload)
                .headers(headers),
        )
        .await?
        .await
    }
    .await;
    match outcome {
        Ok(ack) => {
            let label = if ack.duplicate { "duplicate" } else { "stored" };
            metrics::counter!("tandem_nats_published_total", "stream" => ack.stream.clone(), "outcome" => label)
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

/// Body of a scheduler wake-up sent because capacity was released (a run stopped holding a
/// slot or a workspace root): only replicas that last saw runs waiting need to look. An empty
/// body means "look now" (a run became claimable).
pub const WAKE_CAPACITY_FREED: &[u8] = b"capacity";

/// Sends a core-NATS wake-up hint (not persisted; lost when nobody listens). Consumers must not
/// depend on it: they poll Postgres as well.
pub async fn wake(client: &Client, subject: String) -> Result<(), BusError> {
    wake_with(client, subject, b"").await
}

/// [`wake`] with a body saying why (see [`WAKE_CAPACITY_FREED`]).
pub async fn wake_with(
    client: &Client,
    subject: String,
    body: &'static [u8],
) -> Result<(), BusError> {
    client
        .publish(subject.clone(), Bytes::from_static(body))
        .await
        .map_err(|source| BusError::CorePublish { subject, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_headers() {
        let p = Prefix::none();
        let m = OutgoingMessage::event(
            &p,
            "org.1",
            "ws",
            "approval.gate.expired",
            "k1",
            Bytes::new(),
        )
        .with_traceparent(Some(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        ));
        assert_eq!(m.subject, "tandem.events.org%2E1.ws.approval.gate.expired");
        let h = m.headers().expect("valid");
        assert_eq!(h.get(NATS_MESSAGE_ID).map(|v| v.as_str()), Some("k1"));
        assert_eq!(
            h.get(HEADER_EVENT_TYPE).map(|v| v.as_str()),
            Some("approval.gate.expired")
        );
        assert_eq!(h.get(HEADER_ORG).map(|v| v.as_str()), Some("org%2E1"));
        assert_eq!(h.get(HEADER_WORKSPACE).map(|v| v.as_str()), Some("ws"));
        assert!(h.get(HEADER_TRACEPARENT).is_some());
    }

    #[test]
    fn bad_headers_are_errors_not_panics() {
        let m = OutgoingMessage::new("tandem.x", "a\r\nb", Bytes::new());
        assert!(m.headers().is_err());
        let m = OutgoingMessage::new("tandem.x", "", Bytes::new());
        assert!(m.headers().is_err());
        let m = OutgoingMessage::new("tandem.x", "id", Bytes::new()).with_event_type("x\ny");
        assert!(m.headers().is_err());
        let m = OutgoingMessage::new("tandem.x", "id", Bytes::new()).with_tenant("a\nb", "c");
        assert!(m.headers().is_ok(), "tenant ids are escaped");
    }
}
