//! Embedded, hand-rolled migrations.
//!
//! Each migration is an SQL file compiled into the binary. `migrate` applies the missing ones in
//! one transaction under a transaction-scoped advisory lock, so N replicas (or an operator and a
//! replica) can call it at once: one applies, the others wait and then find nothing to do.
//! Applied migrations are recorded with a checksum; editing an applied file is an error rather
//! than silent drift.

use crate::StoreError;
use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// Hex SHA-256 of the SQL text: what `tandem_schema_migrations.checksum` records.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

/// Every migration this build knows, in version order (versions are 1..=N, no gaps).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../migrations/V1__initial.sql"),
    },
    Migration {
        version: 2,
        name: "outbox_tasks_and_relay_leases",
        sql: include_str!("../migrations/V2__outbox_tasks_and_relay_leases.sql"),
    },
    Migration {
        version: 3,
        name: "api_tokens",
        sql: include_str!("../migrations/V3__api_tokens.sql"),
    },
    Migration {
        version: 4,
        name: "running_count_ledger",
        sql: include_str!("../migrations/V4__running_count_ledger.sql"),
    },
    Migration {
        version: 5,
        name: "api_token_tenant_admin",
        sql: include_str!("../migrations/V5__api_token_tenant_admin.sql"),
    },
    Migration {
        version: 6,
        name: "capacity_reservations",
        sql: include_str!("../migrations/V6__capacity_reservations.sql"),
    },
    Migration {
        version: 7,
        name: "cheaper_claims",
        sql: include_str!("../migrations/V7__cheaper_claims.sql"),
    },
    Migration {
        version: 8,
        name: "runtime_budget_column",
        sql: include_str!("../migrations/V8__runtime_budget_column.sql"),
    },
];

/// The schema version this build needs.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this call, in order (empty when already up to date).
    pub applied: Vec<i32>,
    /// The schema version after the call.
    pub version: i32,
}

/// Advisory lock key for migrations ("tandem" + "mig" as ASCII); any constant shared by all
/// builds works.
const MIGRATION_LOCK_KEY: i64 = 0x7461_6e64_656d_6d69;

const CREATE_MIGRATIONS_TABLE: &str = "
    CREATE TABLE IF NOT EXISTS tandem_schema_migrations (
        version     integer     PRIMARY KEY,
        name        text        NOT NULL,
        checksum    text        NOT NULL,
        applied_at  timestamptz NOT NULL DEFAULT now()
    )";

/// Applies every missing migration in one transaction. Idempotent; safe to call concurrently.
pub async fn migrate(pool: &Pool) -> Result<MigrationReport, StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // Waiting for another replica's migration is expected and may take longer than the pool's
    // default lock timeout.
    tx.batch_execute("SET LOCAL lock_timeout = 0").await?;
    // Lock before touching the catalog: concurrent `CREATE TABLE IF NOT EXISTS` can otherwise
    // race on the catalog's unique index.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    tx.batch_execute(CREATE_MIGRATIONS_TABLE).await?;
    let applied = applied_migrations(&tx).await?;
    verify_applied(&applied)?;
    let mut report = MigrationReport {
        applied: Vec::new(),
        version: 0,
    };
    for m in MIGRATIONS {
        if applied.iter().any(|a| a.version == m.version) {
            continue;
        }
        tx.batch_execute(m.sql).await.map_err(|e| {
            StoreError::Schema(format!(
                "migration V{}__{} failed: {}",
                m.version,
                m.name,
                db_message(&e)
            ))
        })?;
        tx.execute(
            "INSERT INTO tandem_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &m.checksum()],
        )
        .await?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        report.applied.push(m.version);
    }
    tx.commit().await?;
    report.version = latest_version();
    Ok(report)
}

/// Refuses to run against a database whose schema is not exactly the one this build needs.
///
/// Services call this at startup (and in readiness) instead of migrating themselves, so that a
/// rolling upgrade never has an old binary writing into a newer schema unnoticed.
pub async fn check_schema(pool: &Pool) -> Result<(), StoreError> {
    let client = pool.get().await?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('tandem_schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    let needed = latest_version();
    if !exists {
        return Err(not_migrated(0, needed));
    }
    let applied = applied_migrations(&client).await?;
    verify_applied(&applied)?;
    let current = applied.iter().map(|a| a.version).max().unwrap_or(0);
    if current == 0 {
        return Err(not_migrated(0, needed));
    }
    let missing: Vec<i32> = MIGRATIONS
        .iter()
        .filter(|m| !applied.iter().any(|a| a.version == m.version))
        .map(|m| m.version)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if current >= needed {
        // Has the latest but lacks an earlier one: a hole, not just "behind".
        return Err(StoreError::Schema(format!(
            "database schema is partially migrated (version {current} applied but {} missing, \
             this build needs {needed}): run `tandemctl migrate`",
            versions(&missing)
        )));
    }
    Err(not_migrated(current, needed))
}

/// The highest applied version (0 for an unmigrated database).
pub async fn schema_version(pool: &Pool) -> Result<i32, StoreError> {
    let client = pool.get().await?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('tandem_schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM tandem_schema_migrations", &[])
        .await?
        .try_get(0)?;
    Ok(v.unwrap_or(0))
}

fn not_migrated(current: i32, needed: i32) -> StoreError {
    if current == 0 {
        StoreError::Schema(format!(
            "database schema is not migrated (version 0, this build needs {needed}): run `tandemctl migrate`"
        ))
    } else {
        StoreError::Schema(format!(
            "database schema is partially migrated (version {current}, this build needs {needed}): run `tandemctl migrate`"
        ))
    }
}

struct Applied {
    version: i32,
    name: String,
    checksum: String,
}

async fn applied_migrations(
    client: &impl deadpool_postgres::GenericClient,
) -> Result<Vec<Applied>, StoreError> {
    let rows = client
        .query(
            "SELECT version, name, checksum FROM tandem_schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Applied {
                version: r.try_get(0)?,
                name: r.try_get(1)?,
                checksum: r.try_get(2)?,
            })
        })
        .collect()
}

/// Newer schema or an edited migration: both mean this build must not touch the database.
fn verify_applied(applied: &[Applied]) -> Result<(), StoreError> {
    let needed = latest_version();
    if let Some(newest) = applied.iter().map(|a| a.version).max()
        && newest > needed
    {
        return Err(StoreError::Schema(format!(
            "database schema version {newest} is newer than this build ({needed}): upgrade the binaries"
        )));
    }
    for a in applied {
        if let Some(m) = MIGRATIONS.iter().find(|m| m.version == a.version)
            && m.checksum() != a.checksum
        {
            return Err(StoreError::Schema(format!(
                "migration V{}__{} was modified after it was applied (checksum {} in the database, \
                 {} in this build): restore the original migration file",
                a.version,
                a.name,
                a.checksum,
                m.checksum()
            )));
        }
    }
    Ok(())
}

fn versions(v: &[i32]) -> String {
    v.iter()
        .map(|v| format!("V{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => e.to_string(),
    }
}
