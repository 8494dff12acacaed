//! Set-based persistence of run transitions: the rows of any number of changed runs, their new
//! lifecycle records, audit drafts and outbox rows are written with one statement per table
//! (`unnest` of column arrays), so a batch of N runs costs four round trips, not 4·N.
//!
//! [`prepare_write`] checks a transition and derives what to write (pure); [`write_runs`] writes
//! a set of them inside the caller's transaction. Row order inside each table follows the order
//! of `writes` (and of each run's records), so outbox ids, which the relay publishes in order,
//! follow each run's commit order.

use std::collections::HashMap;

use crate::convert::{ms_to_db, run_doc, to_json_text};
use crate::outbox::{TASK_ROW_TYPE, engine_event};
use crate::runs::HotColumns;
use crate::{LeaseEpoch, StoreError, StoreSettings, TransitionEnv};
use deadpool_postgres::Transaction;
use serde_json::Value;
use serde_json::value::RawValue;
use tandem_core::audit::DURABILITY_REQUIRED;
use tandem_core::{AutomationLifecycleRecord, AutomationV2RunRecord, Effects, Millis};
use tokio_postgres::Statement;
use tokio_postgres::types::{Json, ToSql};
use uuid::Uuid;

/// One changed run, ready to be written.
pub(crate) struct RunWrite<'a> {
    run_id: &'a str,
    hot: HotColumns,
    doc: Json<Box<RawValue>>,
    /// The row's epoch after the write.
    pub(crate) lease_epoch: LeaseEpoch,
    /// Move `activity_at_ms` to the database clock: the status changed, or the caller says the
    /// write is worker activity.
    bump_activity: bool,
    appended: &'a [AutomationLifecycleRecord],
    effects: &'a Effects,
}

/// Checks that a transition kept the run's identity and only appended to its lifecycle history,
/// and derives the row to write. The lease epoch changes when the run enters or leaves a claimed
/// status (`running`/`pausing`). `activity` marks the write as worker activity.
pub(crate) fn prepare_write<'a>(
    before: &AutomationV2RunRecord,
    run: &'a mut AutomationV2RunRecord,
    effects: &'a Effects,
    env: &TransitionEnv,
    settings: &StoreSettings,
    activity: bool,
) -> Result<RunWrite<'a>, StoreError> {
    // Serialized first: it moves the history out and back (see `run_doc`).
    let doc = run_doc(run)?;
    let run: &'a AutomationV2RunRecord = run;
    if run.run_id != before.run_id {
        return Err(StoreError::Invalid(format!(
            "a transition changed run_id {} to {}",
            before.run_id, run.run_id
        )));
    }
    let old = &before.checkpoint.lifecycle_history;
    let new = &run.checkpoint.lifecycle_history;
    if new.len() < old.len() || new[..old.len()] != old[..] {
        return Err(StoreError::Invalid(format!(
            "a transition of run {} rewrote its lifecycle history (append-only)",
            run.run_id
        )));
    }
    let appended = &new[old.len()..];
    if appended != effects.lifecycle.as_slice() {
        tracing::warn!(
            run_id = %run.run_id,
            "lifecycle effects differ from the records appended to the run; persisting the run's"
        );
    }
    let lease_epoch = if before.status.holds_workspace_lock() != run.status.holds_workspace_lock() {
        LeaseEpoch(env.lease_epoch.0.saturating_add(1))
    } else {
        env.lease_epoch
    };
    Ok(RunWrite {
        run_id: &run.run_id,
        hot: HotColumns::of(run, settings)?,
        doc,
        lease_epoch,
        bump_activity: activity || before.status != run.status,
        appended,
        effects,
    })
}

const UPDATE_RUNS_SQL: &str = "
    UPDATE runs r
       SET automation_id = u.automation_id, org_id = u.org_id, workspace_id = u.workspace_id,
           status = u.status, lease_epoch = u.lease_epoch, workspace_root = u.workspace_root,
           created_at_ms = u.created_at_ms, updated_at_ms = u.updated_at_ms,
           activity_at_ms = CASE WHEN u.bump_activity THEN greatest(r.activity_at_ms, $14)
                                 ELSE r.activity_at_ms END,
           next_action_at_ms = u.next_action_at_ms, stop_kind = u.stop_kind, doc = u.doc
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                  $7::text[], $8::bigint[], $9::bigint[], $10::bool[], $11::bigint[],
                  $12::text[], $13::jsonb[])
           AS u(run_id, automation_id, org_id, workspace_id, status, lease_epoch,
                workspace_root, created_at_ms, updated_at_ms, bump_activity,
                next_action_at_ms, stop_kind, doc)
     WHERE r.run_id = u.run_id";

const INSERT_LIFECYCLE_SQL: &str = "
    INSERT INTO run_lifecycle (run_id, event, recorded_at_ms, record)
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[])";

const INSERT_AUDIT_SQL: &str = "
    INSERT INTO audit_log (event_id, durability, event_type, tenant, actor, payload, created_at_ms)
    SELECT e, $2, t, tn, a, p, $7
      FROM unnest($1::uuid[], $3::text[], $4::jsonb[], $5::text[], $6::jsonb[]) AS u(e, t, tn, a, p)";

const INSERT_OUTBOX_SQL: &str = "
    INSERT INTO outbox (event_id, run_id, event_type, org_id, workspace_id, dedupe_id, payload,
                        subject_kind, task_queue)
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::jsonb[], $8::text[], $9::text[])
    RETURNING id, event_id";

/// Column arrays of the outbox rows of a set of writes.
#[derive(Default)]
struct OutboxColumns {
    event_id: Vec<Uuid>,
    run_id: Vec<String>,
    event_type: Vec<String>,
    org_id: Vec<String>,
    workspace_id: Vec<String>,
    dedupe_id: Vec<String>,
    payload: Vec<Json<Box<RawValue>>>,
    subject_kind: Vec<&'static str>,
    task_queue: Vec<Option<String>>,
    /// Index into `writes` of each row.
    owner: Vec<usize>,
}

impl OutboxColumns {
    fn push_effects(
        &mut self,
        owner: usize,
        effects: &Effects,
        now_ms: Millis,
    ) -> Result<(), StoreError> {
        for e in &effects.events {
            let event_id = Uuid::now_v7();
            self.payload
                .push(to_json_text(&engine_event(e, event_id, now_ms))?);
            self.dedupe_id
                .push(e.dedupe_key.clone().unwrap_or_else(|| event_id.to_string()));
            self.event_id.push(event_id);
            self.run_id.push(e.run_id.clone());
            self.event_type.push(e.event_type.clone());
            self.org_id.push(e.tenant_context.org_id.clone());
            self.workspace_id
                .push(e.tenant_context.workspace_id.clone());
            self.subject_kind.push("event");
            self.task_queue.push(None);
            self.owner.push(owner);
        }
        for t in &effects.tasks {
            self.payload.push(to_json_text(t)?);
            self.dedupe_id.push(t.task_id());
            self.event_id.push(Uuid::now_v7());
            self.run_id.push(t.run_id.clone());
            self.event_type.push(TASK_ROW_TYPE.to_owned());
            self.org_id.push(t.tenant_context.org_id.clone());
            self.workspace_id
                .push(t.tenant_context.workspace_id.clone());
            self.subject_kind.push("task");
            self.task_queue.push(Some(t.queue.clone()));
            self.owner.push(owner);
        }
        Ok(())
    }
}

/// Writes the rows, lifecycle records, audit drafts and outbox rows of `writes` inside `tx`.
/// Returns each write's outbox row ids, in row order.
///
/// The statements are prepared first and then sent together (tokio-postgres pipelines requests
/// polled concurrently and executes them in the order first polled), so the write costs one
/// round trip however many tables it touches. The caller's earlier requests on `tx` run first.
pub(crate) async fn write_runs(
    tx: &Transaction<'_>,
    writes: &[RunWrite<'_>],
    now_ms: Millis,
) -> Result<Vec<Vec<i64>>, StoreError> {
    if writes.is_empty() {
        return Ok(Vec::new());
    }
    let now = ms_to_db(now_ms, "database clock")?;
    let run_ids: Vec<&str> = writes.iter().map(|w| w.run_id).collect();
    let automation_ids: Vec<&str> = writes
        .iter()
        .map(|w| w.hot.automation_id.as_str())
        .collect();
    let org_ids: Vec<&str> = writes.iter().map(|w| w.hot.org_id.as_str()).collect();
    let workspace_ids: Vec<&str> = writes.iter().map(|w| w.hot.workspace_id.as_str()).collect();
    let statuses: Vec<&str> = writes.iter().map(|w| w.hot.status).collect();
    let epochs: Vec<i64> = writes.iter().map(|w| w.lease_epoch.0).collect();
    let roots: Vec<Option<&str>> = writes
        .iter()
        .map(|w| w.hot.workspace_root.as_deref())
        .collect();
    let created: Vec<i64> = writes.iter().map(|w| w.hot.created_at_ms).collect();
    let updated: Vec<i64> = writes.iter().map(|w| w.hot.updated_at_ms).collect();
    let bump_activity: Vec<bool> = writes.iter().map(|w| w.bump_activity).collect();
    let next_action: Vec<Option<i64>> = writes.iter().map(|w| w.hot.next_action_at_ms).collect();
    let stop_kinds: Vec<Option<&str>> = writes.iter().map(|w| w.hot.stop_kind).collect();
    let docs: Vec<&Json<Box<RawValue>>> = writes.iter().map(|w| &w.doc).collect();
    let records: Vec<RunRecords<'_>> = writes
        .iter()
        .map(|w| RunRecords {
            run_id: w.run_id,
            lifecycle: w.appended,
            effects: w.effects,
        })
        .collect();
    let columns = RecordColumns::of(&records, now_ms)?;

    let update = tx.prepare_cached(UPDATE_RUNS_SQL).await?;
    let statements = columns.prepare(tx).await?;
    let update_params: [&(dyn ToSql + Sync); 14] = [
        &run_ids,
        &automation_ids,
        &org_ids,
        &workspace_ids,
        &statuses,
        &epochs,
        &roots,
        &created,
        &updated,
        &bump_activity,
        &next_action,
        &stop_kinds,
        &docs,
        &now,
    ];
    let (updated_rows, ids) = futures::join!(
        tx.execute(&update, &update_params),
        columns.insert(tx, &statements, records.len())
    );
    let updated_rows = updated_rows?;
    if usize::try_from(updated_rows).ok() != Some(writes.len()) {
        return Err(StoreError::Invalid(format!(
            "wrote {updated_rows} run rows for {} transitions (a run row is missing or listed twice)",
            writes.len()
        )));
    }
    ids
}

/// What one run's transition adds besides its row.
pub(crate) struct RunRecords<'a> {
    pub(crate) run_id: &'a str,
    pub(crate) lifecycle: &'a [AutomationLifecycleRecord],
    pub(crate) effects: &'a Effects,
}

/// Inserts the lifecycle records, audit drafts (unlinked: the chainer links them later) and
/// outbox rows of a set of runs, one statement per table, pipelined. Returns each run's outbox
/// row ids.
pub(crate) async fn insert_run_records(
    tx: &Transaction<'_>,
    runs: &[RunRecords<'_>],
    now_ms: Millis,
) -> Result<Vec<Vec<i64>>, StoreError> {
    let columns = RecordColumns::of(runs, now_ms)?;
    let statements = columns.prepare(tx).await?;
    columns.insert(tx, &statements, runs.len()).await
}

/// Column arrays of the lifecycle, audit and outbox rows of a set of runs.
struct RecordColumns<'a> {
    now: i64,
    lc_run: Vec<&'a str>,
    lc_event: Vec<&'a str>,
    lc_at: Vec<i64>,
    lc_record: Vec<Value>,
    au_id: Vec<Uuid>,
    au_type: Vec<&'a str>,
    au_tenant: Vec<Value>,
    au_actor: Vec<Option<&'a str>>,
    au_payload: Vec<&'a Value>,
    outbox: OutboxColumns,
}

/// The prepared statements a [`RecordColumns`] needs (`None`: no rows for that table).
struct RecordStatements {
    lifecycle: Option<Statement>,
    audit: Option<Statement>,
    outbox: Option<Statement>,
}

impl<'a> RecordColumns<'a> {
    fn of(runs: &[RunRecords<'a>], now_ms: Millis) -> Result<Self, StoreError> {
        let mut c = RecordColumns {
            now: ms_to_db(now_ms, "database clock")?,
            lc_run: Vec::new(),
            lc_event: Vec::new(),
            lc_at: Vec::new(),
            lc_record: Vec::new(),
            au_id: Vec::new(),
            au_type: Vec::new(),
            au_tenant: Vec::new(),
            au_actor: Vec::new(),
            au_payload: Vec::new(),
            outbox: OutboxColumns::default(),
        };
        for w in runs {
            for r in w.lifecycle {
                c.lc_run.push(w.run_id);
                c.lc_event.push(&r.event);
                c.lc_at
                    .push(ms_to_db(r.recorded_at_ms, "lifecycle recorded_at_ms")?);
                c.lc_record.push(serde_json::to_value(r)?);
            }
        }
        for a in runs.iter().flat_map(|w| &w.effects.audit) {
            c.au_id.push(Uuid::new_v4());
            c.au_type.push(&a.event_type);
            c.au_tenant.push(serde_json::to_value(&a.tenant_context)?);
            c.au_actor.push(a.actor.as_deref());
            c.au_payload.push(&a.payload);
        }
        for (i, w) in runs.iter().enumerate() {
            c.outbox.push_effects(i, w.effects, now_ms)?;
        }
        Ok(c)
    }

    async fn prepare(&self, tx: &Transaction<'_>) -> Result<RecordStatements, StoreError> {
        let mut s = RecordStatements {
            lifecycle: None,
            audit: None,
            outbox: None,
        };
        if !self.lc_run.is_empty() {
            s.lifecycle = Some(tx.prepare_cached(INSERT_LIFECYCLE_SQL).await?);
        }
        if !self.au_id.is_empty() {
            s.audit = Some(tx.prepare_cached(INSERT_AUDIT_SQL).await?);
        }
        if !self.outbox.event_id.is_empty() {
            s.outbox = Some(tx.prepare_cached(INSERT_OUTBOX_SQL).await?);
        }
        Ok(s)
    }

    /// Sends the inserts together (in lifecycle, audit, outbox order); returns each of the
    /// `runs` runs' outbox row ids.
    async fn insert(
        &self,
        tx: &Transaction<'_>,
        statements: &RecordStatements,
        runs: usize,
    ) -> Result<Vec<Vec<i64>>, StoreError> {
        let lifecycle = async {
            match &statements.lifecycle {
                Some(stmt) => tx
                    .execute(
                        stmt,
                        &[&self.lc_run, &self.lc_event, &self.lc_at, &self.lc_record],
                    )
                    .await
                    .map(drop),
                None => Ok(()),
            }
        };
        let audit = async {
            match &statements.audit {
                Some(stmt) => tx
                    .execute(
                        stmt,
                        &[
                            &self.au_id,
                            &DURABILITY_REQUIRED,
                            &self.au_type,
                            &self.au_tenant,
                            &self.au_actor,
                            &self.au_payload,
                            &self.now,
                        ],
                    )
                    .await
                    .map(drop),
                None => Ok(()),
            }
        };
        let ob = &self.outbox;
        let outbox = async {
            match &statements.outbox {
                Some(stmt) => {
                    tx.query(
                        stmt,
                        &[
                            &ob.event_id,
                            &ob.run_id,
                            &ob.event_type,
                            &ob.org_id,
                            &ob.workspace_id,
                            &ob.dedupe_id,
                            &ob.payload,
                            &ob.subject_kind,
                            &ob.task_queue,
                        ],
                    )
                    .await
                }
                None => Ok(Vec::new()),
            }
        };
        let (lifecycle, audit, outbox) = futures::join!(lifecycle, audit, outbox);
        lifecycle?;
        audit?;
        let rows = outbox?;
        let mut ids = vec![Vec::new(); runs];
        if rows.is_empty() {
            return Ok(ids);
        }
        let mut by_event: HashMap<Uuid, i64> = HashMap::with_capacity(rows.len());
        for row in &rows {
            by_event.insert(row.try_get(1)?, row.try_get(0)?);
        }
        for (event_id, owner) in ob.event_id.iter().zip(&ob.owner) {
            let id = by_event.get(event_id).copied().ok_or_else(|| {
                StoreError::Invalid(format!("outbox row {event_id} was not returned"))
            })?;
            ids[*owner].push(id);
        }
        // The relay publishes a run's rows in id order; keep each run's list ascending.
        for list in &mut ids {
            list.sort_unstable();
        }
        Ok(ids)
    }
}
