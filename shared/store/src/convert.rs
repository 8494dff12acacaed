//! Conversions between the model and columns. Stored content is never trusted to fit: every
//! conversion returns an error instead of panicking.

use crate::StoreError;
use serde_json::Value;
use tandem_core::{AutomationLifecycleRecord, AutomationV2RunRecord, Millis};

/// The model's u64 milliseconds as a bigint column value.
pub(crate) fn ms_to_db(ms: Millis, what: &str) -> Result<i64, StoreError> {
    i64::try_from(ms).map_err(|_| StoreError::Invalid(format!("{what} {ms} does not fit a bigint")))
}

/// A bigint column as the model's u64 milliseconds.
pub(crate) fn ms_from_db(v: i64, what: &str) -> Result<Millis, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative ({v})")))
}

pub(crate) fn opt_ms_to_db(ms: Option<Millis>, what: &str) -> Result<Option<i64>, StoreError> {
    ms.map(|m| ms_to_db(m, what)).transpose()
}

pub(crate) fn opt_ms_from_db(v: Option<i64>, what: &str) -> Result<Option<Millis>, StoreError> {
    v.map(|m| ms_from_db(m, what)).transpose()
}

/// The `runs.doc` value: the record without `checkpoint.lifecycle_history`, which lives in
/// `run_lifecycle` so that no transition rewrites history.
pub(crate) fn run_doc(run: &AutomationV2RunRecord) -> Result<Value, StoreError> {
    let mut doc = serde_json::to_value(run)?;
    if let Some(cp) = doc.get_mut("checkpoint").and_then(Value::as_object_mut) {
        cp.remove("lifecycle_history");
    }
    Ok(doc)
}

/// Reassembles a record from `runs.doc` and its lifecycle rows (a JSON array in id order).
pub(crate) fn run_from_doc(
    doc: Value,
    lifecycle: Value,
) -> Result<AutomationV2RunRecord, StoreError> {
    let mut run: AutomationV2RunRecord = serde_json::from_value(doc)?;
    run.checkpoint.lifecycle_history = match lifecycle {
        Value::Null => Vec::new(),
        other => serde_json::from_value::<Vec<AutomationLifecycleRecord>>(other)?,
    };
    Ok(run)
}
