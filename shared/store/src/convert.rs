//! Conversions between the model and columns. Stored content is never trusted to fit: every
//! conversion returns an error instead of panicking.
//!
//! JSON documents go between the model and `jsonb` columns as text (`serde_json::value::RawValue`
//! inside `tokio_postgres::types::Json`), parsed straight into the model's types and serialized
//! straight from them: a run document through a `serde_json::Value` tree cost the scheduler more
//! CPU (allocating and freeing the tree's maps) than everything else it does per claimed run.

use crate::StoreError;
use serde_json::value::RawValue;
use tandem_core::{AutomationLifecycleRecord, AutomationV2RunRecord, Millis};
use tokio_postgres::Row;
use tokio_postgres::types::Json;

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

/// A `jsonb` column's text, unparsed (`None` for SQL NULL).
pub(crate) fn json_text(row: &Row, idx: usize) -> Result<Option<Box<RawValue>>, StoreError> {
    Ok(row
        .try_get::<_, Option<Json<Box<RawValue>>>>(idx)?
        .map(|j| j.0))
}

/// Serialized JSON as a `jsonb` parameter (sent as text, never built as a `Value`).
pub(crate) fn to_json_text<T: serde::Serialize + ?Sized>(
    value: &T,
) -> Result<Json<Box<RawValue>>, StoreError> {
    Ok(Json(serde_json::value::to_raw_value(value)?))
}

/// The `runs.doc` text: the record with an empty `checkpoint.lifecycle_history`, which lives in
/// `run_lifecycle` so that no transition rewrites history. The history is moved out while the
/// record is serialized and put back (so the record is unchanged when this returns).
pub(crate) fn run_doc(run: &mut AutomationV2RunRecord) -> Result<Json<Box<RawValue>>, StoreError> {
    let history = std::mem::take(&mut run.checkpoint.lifecycle_history);
    let doc = to_json_text(&*run);
    run.checkpoint.lifecycle_history = history;
    doc
}

/// Reassembles a record from `runs.doc` and its lifecycle rows (a JSON array in id order, or
/// `None` when the run has none).
pub(crate) fn run_from_doc(
    doc: &RawValue,
    lifecycle: Option<&RawValue>,
) -> Result<AutomationV2RunRecord, StoreError> {
    let mut run: AutomationV2RunRecord = serde_json::from_str(doc.get())?;
    attach_history(&mut run, lifecycle)?;
    Ok(run)
}

/// Sets a record's lifecycle history from its `run_lifecycle` rows (see [`run_from_doc`]).
pub(crate) fn attach_history(
    run: &mut AutomationV2RunRecord,
    lifecycle: Option<&RawValue>,
) -> Result<(), StoreError> {
    run.checkpoint.lifecycle_history = match lifecycle {
        None => Vec::new(),
        Some(records) => {
            serde_json::from_str::<Option<Vec<AutomationLifecycleRecord>>>(records.get())?
                .unwrap_or_default()
        }
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::{AutomationFlowNode, AutomationV2Spec, ExecutionProfile};

    fn run_with_history() -> AutomationV2RunRecord {
        let spec = AutomationV2Spec::new("a", vec![AutomationFlowNode::task("n", &[])]);
        let mut run = AutomationV2RunRecord::new_queued(
            "r".into(),
            &spec,
            "manual",
            ExecutionProfile::Strict,
            5,
        );
        run.checkpoint
            .lifecycle_history
            .push(AutomationLifecycleRecord {
                event: "run_created".into(),
                recorded_at_ms: 5,
                reason: None,
                stop_kind: None,
                metadata: None,
            });
        run
    }

    #[test]
    fn the_doc_leaves_the_history_out_and_the_record_unchanged() {
        let mut run = run_with_history();
        let before = run.clone();
        let doc = run_doc(&mut run).expect("serializes");
        assert_eq!(run, before, "history put back");
        let v: serde_json::Value = serde_json::from_str(doc.0.get()).expect("json");
        assert_eq!(
            v["checkpoint"]["lifecycle_history"],
            serde_json::json!([]),
            "{v}"
        );
        assert_eq!(v["run_id"], "r");
    }

    #[test]
    fn doc_and_history_reassemble_the_record() {
        let mut run = run_with_history();
        let doc = run_doc(&mut run).expect("serializes");
        let history = to_json_text(&run.checkpoint.lifecycle_history).expect("serializes");
        let back = run_from_doc(&doc.0, Some(&history.0)).expect("parses");
        assert_eq!(back, run);
        let null = RawValue::from_string("null".into()).expect("raw");
        let bare = run_from_doc(&doc.0, Some(&null)).expect("parses");
        assert!(bare.checkpoint.lifecycle_history.is_empty());
        assert!(run_from_doc(&RawValue::from_string("[1]".into()).expect("raw"), None).is_err());
    }
}
