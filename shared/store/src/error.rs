//! The store's one error type: callers branch on the variant (fenced, conflict, not found), never
//! on message text.

use crate::LeaseEpoch;

/// Everything a store call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    /// The row's lease epoch moved on: the caller's claim is stale and must stop writing.
    #[error("fenced: claim holds lease epoch {expected}, row has {found}")]
    Fenced {
        expected: LeaseEpoch,
        found: LeaseEpoch,
    },
    /// The database schema does not match this build; the message says what to run.
    #[error("{0}")]
    Schema(String),
    /// A unique constraint rejected the write (e.g. the workspace lock).
    #[error("conflict on {constraint}: {message}")]
    Conflict { constraint: String, message: String },
    #[error("invalid connection configuration: {0}")]
    Config(String),
    #[error("connection pool: {0}")]
    Pool(String),
    #[error("database: {}", describe(.0))]
    Db(#[source] tokio_postgres::Error),
    #[error("stored JSON does not match the model: {0}")]
    Serde(#[from] serde_json::Error),
    /// The caller asked for something the store cannot persist (e.g. a transition that rewrites
    /// lifecycle history, or a timestamp beyond the bigint range).
    #[error("invalid write: {0}")]
    Invalid(String),
    /// Stored content breaks an invariant the store relies on (e.g. an unknown status).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// The connection or the pool failed, not a statement: nothing more can be done on it.
    pub fn is_connection(&self) -> bool {
        match self {
            StoreError::Pool(_) => true,
            StoreError::Db(e) => e.is_closed(),
            _ => false,
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    /// Unique violations become [`StoreError::Conflict`] so callers can match on them.
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error()
            && *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
        {
            return StoreError::Conflict {
                constraint: db.constraint().unwrap_or_default().to_owned(),
                message: db.message().to_owned(),
            };
        }
        StoreError::Db(e)
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::from(e),
            other => StoreError::Pool(other.to_string()),
        }
    }
}

/// tokio-postgres displays a server error as just "db error"; say what the server said.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(": ");
                s.push_str(detail);
            }
            s
        }
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}
