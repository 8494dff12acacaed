//! A NATS connection with the streams of a fresh subject prefix, for one test.

use anyhow::Context as _;
use tandem_bus::{
    Prefix, StreamNames,
    async_nats::{self, jetstream},
};

use crate::{nats_url, procs::delete_streams, unique};

pub struct TestBus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub prefix: Prefix,
}

impl TestBus {
    /// Connects and creates the streams under a unique prefix starting with `tag`.
    pub async fn new(tag: &str) -> anyhow::Result<Self> {
        let prefix = Prefix::new(&unique(tag))?;
        let client = tandem_bus::connect(&tandem_bus::NatsOptions::new(nats_url()), "tandem-tests")
            .await
            .context("connecting to NATS")?;
        let js = tandem_bus::jetstream(client.clone());
        tandem_bus::ensure_streams(&js, &prefix).await?;
        Ok(Self { client, js, prefix })
    }

    pub fn names(&self) -> StreamNames {
        StreamNames::new(&self.prefix)
    }

    /// Messages currently stored in `stream`.
    pub async fn messages(&self, stream: &str) -> anyhow::Result<u64> {
        Ok(self
            .js
            .get_stream(stream)
            .await?
            .info()
            .await?
            .state
            .messages)
    }

    /// Deletes this prefix's streams.
    pub async fn cleanup(&self) -> anyhow::Result<()> {
        delete_streams(self.prefix.as_str()).await
    }
}
