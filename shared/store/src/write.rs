//! Set-based persistence of run transitions: the rows of any number of changed runs, their new
//! lifecycle records, audit drafts and outbox rows are written with one statement per table
//! (`unnest` of column arrays), so a batch of N runs costs four round trips, not 4·N.
//!
//! [`prepare_write`] checks a transition and derives what to write (pure); [`write_runs`] writes
//! a set of them inside the caller's transaction. Row order inside each table follows the order
//! of `writes` (and of each run's records), so outbox ids, which the relay publishes in order,
//! follow each run's commit order.

use std::collections::HashMap;
use std::time::Duration;

use crate::convert::{ms_to_db, run_doc, to_json_text};
use crate::outbox::{OutboxKind, OutboxRow, TASK_ROW_TYPE, engine_event};
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
           next_action_at_ms = u.next_action_at_ms, stop_kind = u.stop_kind, doc = u.doc,
           has_runtime_budget = u.has_runtime_budget
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                  $7::text[], $8::bigint[], $9::bigint[], $10::bool[], $11::bigint[],
                  $12::text[], $13::jsonb[], $15::bool[])
           AS u(run_id, automation_id, org_id, workspace_id, status, lease_epoch,
                workspace_root, created_at_ms, updated_at_ms, bump_activity,
                next_action_at_ms, stop_kind, doc, has_runtime_budget)
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
    RETURNING id, event_id, false";

/// [`INSERT_OUTBOX_SQL`] for a writer that relays its rows itself right after the commit: a row
/// is inserted already leased to it (`$10` seconds) when its run has no older unpublished row,
/// as the relay's head-of-run claim would have leased it (see `crate::outbox`). The check
/// cannot race: every writer of a run's outbox rows holds the run's row lock, and rows of the
/// same statement do not see each other, so a run's new rows are all leased or none is.
const INSERT_OUTBOX_LEASED_SQL: &str = "
    INSERT INTO outbox (event_id, run_id, event_type, org_id, workspace_id, dedupe_id, payload,
                        subject_kind, task_queue, relay_lease_until)
    SELECT u.*,
           CASE WHEN EXISTS (SELECT 1 FROM outbox p
                              WHERE p.run_id = u.run_id AND p.published_at IS NULL)
                THEN NULL ELSE now() + make_interval(secs => $10) END
      FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                  $7::jsonb[], $8::text[], $9::text[])
           AS u(event_id, run_id, event_type, org_id, workspace_id, dedupe_id, payload,
                subject_kind, task_queue)
    RETURNING id, event_id, relay_lease_until IS NOT NULL";

/// How a set write's outbox rows are relayed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum OutboxRelay {
    /// By whichever relay claims them (the writer path or the background loop).
    Claimed,
    /// By the writer itself, right after its commit: rows of runs without older unpublished rows
    /// are inserted leased for this long and returned, so the writer publishes them from memory
    /// (no lease update, no read back).
    Writer(Duration),
}

/// The outbox rows a set write inserted.
#[derive(Debug, Default)]
pub(crate) struct InsertedOutbox {
    /// Each write's row ids, ascending.
    pub(crate) ids: Vec<Vec<i64>>,
    /// With [`OutboxRelay::Writer`]: the rows inserted leased to the writer, in id order.
    pub(crate) leased: Vec<OutboxRow>,
}

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
    relay: OutboxRelay,
) -> Result<InsertedOutbox, StoreError> {
    if writes.is_empty() {
        return Ok(InsertedOutbox::default());
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
    let budgets: Vec<bool> = writes.iter().map(|w| w.hot.has_runtime_budget).collect();
    let docs: Vec<&Json<Box<RawValue>>> = writes.iter().map(|w| &w.doc).collect();
    let records: Vec<RunRecords<'_>> = writes
        .iter()
        .map(|w| RunRecords {
            run_id: w.run_id,
            lifecycle: w.appended,
            effects: w.effects,
        })
        .collect();
    let columns = RecordColumns::of(&records, now_ms, relay)?;

    let update = tx.prepare_cached(UPDATE_RUNS_SQL).await?;
    let statements = columns.prepare(tx).await?;
    let update_params: [&(dyn ToSql + Sync); 15] = [
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
        &budgets,
    ];
    let (updated_rows, inserted) = futures::join!(
        tx.execute(&update, &update_params),
        columns.insert(tx, &statements)
    );
    let updated_rows = updated_rows?;
    if usize::try_from(updated_rows).ok() != Some(writes.len()) {
        return Err(StoreError::Invalid(format!(
            "wrote {updated_rows} run rows for {} transitions (a run row is missing or listed twice)",
            writes.len()
        )));
    }
    let inserted = inserted?;
    columns.into_outbox(inserted, records.len())
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
    let columns = RecordColumns::of(runs, now_ms, OutboxRelay::Claimed)?;
    let statements = columns.prepare(tx).await?;
    let inserted = columns.insert(tx, &statements).await?;
    Ok(columns.into_outbox(inserted, runs.len())?.ids)
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
    relay: OutboxRelay,
}

/// The prepared statements a [`RecordColumns`] needs (`None`: no rows for that table).
struct RecordStatements {
    lifecycle: Option<Statement>,
    audit: Option<Statement>,
    outbox: Option<Statement>,
}

impl<'a> RecordColumns<'a> {
    fn of(runs: &[RunRecords<'a>], now_ms: Millis, relay: OutboxRelay) -> Result<Self, StoreError> {
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
            relay,
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
            let sql = match self.relay {
                OutboxRelay::Claimed => INSERT_OUTBOX_SQL,
                OutboxRelay::Writer(_) => INSERT_OUTBOX_LEASED_SQL,
            };
            s.outbox = Some(tx.prepare_cached(sql).await?);
        }
        Ok(s)
    }

    /// Sends the inserts together (in lifecycle, audit, outbox order); returns the outbox
    /// rows' ids and event ids, and whether each was inserted leased.
    async fn insert(
        &self,
        tx: &Transaction<'_>,
        statements: &RecordStatements,
    ) -> Result<Vec<(i64, Uuid, bool)>, StoreError> {
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
        let lease_secs = match self.relay {
            OutboxRelay::Claimed => None,
            OutboxRelay::Writer(lease) => Some(lease.as_secs_f64().max(0.001)),
        };
        let outbox = async {
            let Some(stmt) = &statements.outbox else {
                return Ok(Vec::new());
            };
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![
                &ob.event_id,
                &ob.run_id,
                &ob.event_type,
                &ob.org_id,
                &ob.workspace_id,
                &ob.dedupe_id,
                &ob.payload,
                &ob.subject_kind,
                &ob.task_queue,
            ];
            if let Some(secs) = &lease_secs {
                params.push(secs);
            }
            tx.query(stmt, &params).await
        };
        let (lifecycle, audit, outbox) = futures::join!(lifecycle, audit, outbox);
        lifecycle?;
        audit?;
        outbox?
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect()
    }

    /// Each run's outbox row ids (ascending) and, moved out of the columns, the rows inserted
    /// leased to the writer.
    fn into_outbox(
        self,
        inserted: Vec<(i64, Uuid, bool)>,
        runs: usize,
    ) -> Result<InsertedOutbox, StoreError> {
        let mut out = InsertedOutbox {
            ids: vec![Vec::new(); runs],
            leased: Vec::new(),
        };
        if inserted.is_empty() {
            return Ok(out);
        }
        let mut by_event: HashMap<Uuid, (i64, bool)> = HashMap::with_capacity(inserted.len());
        for (id, event_id, leased) in inserted {
            by_event.insert(event_id, (id, leased));
        }
        let ob = self.outbox;
        let rows = ob
            .event_id
            .into_iter()
            .zip(ob.owner)
            .zip(ob.run_id)
            .zip(ob.event_type)
            .zip(ob.org_id)
            .zip(ob.workspace_id)
            .zip(ob.dedupe_id)
            .zip(ob.payload)
            .zip(ob.task_queue);
        for (
            (
                ((((((event_id, owner), run_id), event_type), org_id), workspace_id), dedupe_id),
                payload,
            ),
            task_queue,
        ) in rows
        {
            let (id, leased) = by_event.get(&event_id).copied().ok_or_else(|| {
                StoreError::Invalid(format!("outbox row {event_id} was not returned"))
            })?;
            out.ids[owner].push(id);
            if leased {
                out.leased.push(OutboxRow {
                    id,
                    event_id,
                    run_id,
                    event_type,
                    org_id,
                    workspace_id,
                    dedupe_id,
                    payload: String::from(Box::<str>::from(payload.0)),
                    kind: match task_queue {
                        Some(queue) => OutboxKind::Task { queue },
                        None => OutboxKind::Event,
                    },
                });
            }
        }
        // The relay publishes a run's rows in id order; keep each run's list ascending.
        for list in &mut out.ids {
            list.sort_unstable();
        }
        out.leased.sort_by_key(|r| r.id);
        Ok(out)
    }
}
