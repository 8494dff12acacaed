//! Shared helpers for the integration tests: every test gets its own PostgreSQL database and its
//! own NATS subject prefix, so tests run in parallel against the real servers.
//!
//! `TANDEM_TEST_DATABASE_URL` names an admin connection (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); `TANDEM_TEST_NATS_URL` the NATS server (default
//! `nats://127.0.0.1:4222`).

pub mod bus;
pub mod gates;
pub mod procs;

use anyhow::Context as _;
use deadpool_postgres::Pool;

pub fn admin_url() -> String {
    std::env::var("TANDEM_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn nats_url() -> String {
    std::env::var("TANDEM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A short unique token for database names and subject prefixes.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

/// Replaces the database name (the last path segment) of a connection URL.
pub fn url_with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if base[..i].contains("://") && i > base.find("://").map_or(0, |p| p + 2) => {
            &base[..i]
        }
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A fresh, empty database for one test. Dropped (best effort) by [`TestDb::drop_db`].
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Creates an empty database (no schema).
    pub async fn empty() -> anyhow::Result<Self> {
        let name = unique("tandem_test");
        let admin = admin_url();
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {admin}"))?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .context("CREATE DATABASE")?;
        Ok(Self {
            url: url_with_db(&admin, &name),
            name,
        })
    }

    /// Creates a database with every migration applied.
    pub async fn migrated() -> anyhow::Result<(Self, Pool)> {
        let db = Self::empty().await?;
        let pool = tandem_store::connect(&db.url, "tandem-tests")?;
        tandem_store::migrate(&pool).await?;
        Ok((db, pool))
    }

    pub fn pool(&self) -> anyhow::Result<Pool> {
        Ok(tandem_store::connect(&self.url, "tandem-tests")?)
    }

    /// Drops the database; call at the end of a test that passed.
    pub async fn drop_db(self) -> anyhow::Result<()> {
        let (client, conn) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await?;
        Ok(())
    }
}

/// The database clock in ms (every lifecycle decision compares against it).
pub async fn db_now(pool: &Pool) -> anyhow::Result<u64> {
    let client = pool.get().await?;
    let v: i64 = client
        .query_one(
            "SELECT floor(extract(epoch FROM now()) * 1000)::bigint",
            &[],
        )
        .await?
        .get(0);
    Ok(u64::try_from(v)?)
}
