//! tandem-bus against the real NATS server, each test under its own subject/stream prefix:
//! `ensure_streams` is idempotent and converges, `Nats-Msg-Id` dedupes, escaped tenant ids
//! cannot reach other tenants' subjects, and wake-ups reach core subscribers.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use futures::StreamExt as _;
use tandem_bus::{
    OutgoingMessage, Prefix, StreamAction, StreamNames, StreamSettings, async_nats::jetstream,
    ensure_streams, ensure_streams_with, publish,
};
use tandem_tests::{nats_url, unique};

async fn setup() -> anyhow::Result<(async_nats::Client, jetstream::Context, Prefix)> {
    let prefix = Prefix::new(&unique("t"))?;
    let client = tandem_bus::connect(&tandem_bus::NatsOptions::new(nats_url()), "tandem-tests")
        .await
        .context("connecting to NATS")?;
    let js = tandem_bus::jetstream(client.clone());
    Ok((client, js, prefix))
}

async fn cleanup(js: &jetstream::Context, prefix: &Prefix) -> anyhow::Result<()> {
    for name in StreamNames::new(prefix).all() {
        let _ = js.delete_stream(name).await;
    }
    Ok(())
}

#[tokio::test]
async fn ensure_streams_is_idempotent_and_converges() -> anyhow::Result<()> {
    let (_client, js, prefix) = setup().await?;
    let result = async {
        let first = ensure_streams(&js, &prefix).await?;
        ensure!(
            first
                .streams
                .iter()
                .all(|(_, a)| *a == StreamAction::Created),
            "{first:?}"
        );
        let second = ensure_streams(&js, &prefix).await?;
        ensure!(
            second
                .streams
                .iter()
                .all(|(_, a)| *a == StreamAction::Unchanged),
            "{second:?}"
        );

        let names = StreamNames::new(&prefix);
        let upper = prefix.as_str().to_ascii_uppercase();
        ensure!(
            names.events == format!("{upper}_TANDEM_EVENTS"),
            "{names:?}"
        );
        let mut events = js.get_stream(&names.events).await?;
        let info = events.info().await?;
        ensure!(
            info.config.subjects == vec![format!("{prefix}.tandem.events.>")],
            "{:?}",
            info.config.subjects
        );
        ensure!(info.config.retention == jetstream::stream::RetentionPolicy::Limits);
        ensure!(info.config.duplicate_window <= info.config.max_age);
        let mut tasks = js.get_stream(&names.tasks).await?;
        ensure!(
            tasks.info().await?.config.retention == jetstream::stream::RetentionPolicy::WorkQueue
        );

        // A changed setting updates only the stream it concerns.
        let shorter = StreamSettings {
            events_max_age: Duration::from_secs(3600),
            ..StreamSettings::default()
        };
        let third = ensure_streams_with(&js, &prefix, &shorter).await?;
        for (name, action) in &third.streams {
            let want = if *name == names.events {
                StreamAction::Updated
            } else {
                StreamAction::Unchanged
            };
            ensure!(*action == want, "{third:?}");
        }
        let info = events.info().await?;
        ensure!(info.config.max_age == Duration::from_secs(3600));

        // Replicas racing at startup: all succeed.
        let racers = (0..4).map(|_| ensure_streams_with(&js, &prefix, &shorter));
        for r in futures::future::join_all(racers).await {
            r?;
        }
        Ok(())
    }
    .await;
    cleanup(&js, &prefix).await?;
    result
}

#[tokio::test]
async fn concurrent_first_ensure_succeeds_for_every_replica() -> anyhow::Result<()> {
    let (_client, js, prefix) = setup().await?;
    let result = async {
        // Replicas starting together against a server without the streams: every call succeeds
        // (creating an identical stream twice is accepted by the server), and the streams end up
        // as one would create them alone.
        let racers = (0..4).map(|_| ensure_streams(&js, &prefix));
        for r in futures::future::join_all(racers).await {
            r?;
        }
        let again = ensure_streams(&js, &prefix).await?;
        ensure!(
            again
                .streams
                .iter()
                .all(|(_, a)| *a == StreamAction::Unchanged),
            "{again:?}"
        );
        Ok(())
    }
    .await;
    cleanup(&js, &prefix).await?;
    result
}

#[tokio::test]
async fn same_msg_id_twice_is_a_duplicate() -> anyhow::Result<()> {
    let (_client, js, prefix) = setup().await?;
    let result = async {
        ensure_streams(&js, &prefix).await?;
        let msg = |id: &str| {
            OutgoingMessage::event(
                &prefix,
                "org.1",
                "ws 1",
                "approval.gate.reminder_due",
                id,
                br#"{"type":"approval.gate.reminder_due"}"#.to_vec().into(),
            )
            .with_traceparent(Some(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            ))
        };
        let a = publish(&js, msg("reminder:gate-1:1")).await?;
        ensure!(!a.duplicate, "{a:?}");
        let b = publish(&js, msg("reminder:gate-1:1")).await?;
        ensure!(
            b.duplicate,
            "second publish of the same id must be a duplicate: {b:?}"
        );
        ensure!(b.sequence == a.sequence, "{a:?} {b:?}");
        let c = publish(&js, msg("reminder:gate-1:2")).await?;
        ensure!(!c.duplicate && c.sequence > a.sequence, "{c:?}");

        let names = StreamNames::new(&prefix);
        ensure!(a.stream == names.events, "{a:?}");
        let stream = js.get_stream(&names.events).await?;
        ensure!(
            stream.cached_info().state.messages == 2,
            "{:?}",
            stream.cached_info().state
        );
        let stored = stream.get_raw_message(a.sequence).await?;
        ensure!(
            stored.subject.as_str()
                == format!("{prefix}.tandem.events.org%2E1.ws%201.approval.gate.reminder_due"),
            "{}",
            stored.subject
        );
        let headers = stored.headers;
        let get = |k: &str| headers.get(k).map(|v| v.as_str().to_owned());
        ensure!(get("Nats-Msg-Id").as_deref() == Some("reminder:gate-1:1"));
        ensure!(get("Tandem-Event-Type").as_deref() == Some("approval.gate.reminder_due"));
        ensure!(get("Tandem-Org").as_deref() == Some("org%2E1"));
        ensure!(get("Tandem-Workspace").as_deref() == Some("ws%201"));
        ensure!(get("traceparent").is_some());
        Ok(())
    }
    .await;
    cleanup(&js, &prefix).await?;
    result
}

#[tokio::test]
async fn escaped_tenant_ids_cannot_reach_other_subjects() -> anyhow::Result<()> {
    let (client, js, prefix) = setup().await?;
    let result = async {
        ensure_streams(&js, &prefix).await?;
        // A subscriber for tenant org "a" only, and one for every tenant's expiries.
        let mut only_a = client
            .subscribe(format!("{prefix}.tandem.events.a.>"))
            .await?;
        let mut expiries = client
            .subscribe(format!("{prefix}.tandem.events.*.*.approval.gate.expired"))
            .await?;
        client.flush().await?;
        // Hostile ids: an org that tries to look like "a" plus more tokens, a wildcard workspace.
        for (org, ws) in [("a.b", "w"), ("a.*", ">"), ("*", "a b"), (">", "")] {
            publish(
                &js,
                OutgoingMessage::event(
                    &prefix,
                    org,
                    ws,
                    "approval.gate.expired",
                    unique("m"),
                    b"{}".to_vec().into(),
                ),
            )
            .await?;
        }
        // The legitimate one for org "a".
        publish(
            &js,
            OutgoingMessage::event(
                &prefix,
                "a",
                "w",
                "approval.gate.expired",
                unique("m"),
                b"{}".to_vec().into(),
            ),
        )
        .await?;

        let mut seen_all = 0;
        while seen_all < 5 {
            tokio::time::timeout(Duration::from_secs(5), expiries.next())
                .await
                .context("expiry subscriber missed an event")?
                .context("subscription closed")?;
            seen_all += 1;
        }
        let first = tokio::time::timeout(Duration::from_secs(5), only_a.next())
            .await
            .context("tenant a's subscriber missed its event")?
            .context("subscription closed")?;
        ensure!(
            first.subject.as_str() == format!("{prefix}.tandem.events.a.w.approval.gate.expired"),
            "{}",
            first.subject
        );
        let extra = tokio::time::timeout(Duration::from_millis(300), only_a.next()).await;
        ensure!(
            extra.is_err(),
            "tenant a received another tenant's event: {extra:?}"
        );
        Ok(())
    }
    .await;
    cleanup(&js, &prefix).await?;
    result
}

#[tokio::test]
async fn wake_ups_reach_core_subscribers() -> anyhow::Result<()> {
    let (client, _js, prefix) = setup().await?;
    let subject = tandem_bus::wake_scheduler_subject(&prefix);
    ensure!(subject == format!("{prefix}.tandem.wake.scheduler"));
    let mut sub = client.subscribe(subject.clone()).await?;
    client.flush().await?;
    tandem_bus::wake(&client, subject).await?;
    client.flush().await?;
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .context("no wake-up")?
        .context("subscription closed")?;
    Ok(())
}
