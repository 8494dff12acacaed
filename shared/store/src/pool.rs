//! Connection pool construction.

use crate::StoreError;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::str::FromStr;
use std::time::Duration;

/// Default most connections per pool (services: `TANDEM_DATABASE_POOL_SIZE`).
pub const DEFAULT_POOL_SIZE: u16 = 16;

/// Builds a pool from a `postgres://user[:password]@host:port/db` URL (or key=value string).
///
/// Sync and lazy: no connection is opened until first use, so services start without Postgres
/// being up and reconnect through the pool. `app_name` shows in `pg_stat_activity`.
pub fn connect(url: &str, app_name: &str) -> Result<Pool, StoreError> {
    connect_with_size(url, app_name, usize::from(DEFAULT_POOL_SIZE))
}

/// [`connect`] with an explicit maximum number of connections (benchmarks, busy replicas).
pub fn connect_with_size(url: &str, app_name: &str, max_size: usize) -> Result<Pool, StoreError> {
    let mut pg = tokio_postgres::Config::from_str(url)
        .map_err(|e| StoreError::Config(format!("database URL: {e}")))?;
    if pg.get_application_name().is_none() {
        pg.application_name(app_name);
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(10));
    }
    if pg.get_options().is_none() {
        // A stuck transaction or DDL must not hang every replica (lock waits fail after 10 s), and
        // an abandoned transaction must not pin the xmin horizon of the whole queue.
        pg.options("-c lock_timeout=10000 -c idle_in_transaction_session_timeout=60000");
    }
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| StoreError::Config(format!("connection pool: {e}")))
}
