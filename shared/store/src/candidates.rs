//! Candidate pages for the sweeper's duties: run ids in a stable keyset order, read without locks.
//!
//! [`crate::transition_batch`] selects `… ORDER BY … LIMIT n FOR UPDATE SKIP LOCKED` and acts on
//! what it got. For a sweep whose candidates are not all actionable that is a trap: rows the core
//! declines (a run idle past the base threshold but inside its longer node timeout, a stale-reaped
//! run whose auto-resume cap is reached, a held run without an override) stay first in the order
//! and fill every batch, so the runs behind them starve. The sweeper therefore walks candidates in
//! pages with a keyset cursor `(key, run_id)` that only moves forward within a pass, and hands
//! each page to `transition_batch(Sweep::Runs(ids))`, which locks (`SKIP LOCKED`) and re-checks
//! every row before acting. A page read here is only a hint; the decision is always made on the
//! locked row against the database clock.
//!
//! Every statement spells its status literally, so its generic plan can use the partial and
//! status indexes (see [`candidates_sql`]).

use crate::convert::ms_to_db;
use crate::{Pool, StoreError};
use tandem_core::{AutomationRunStatus, AutomationStopKind};

/// The database clock in ms at statement start (candidate pages are hints, read without locks).
const NOW_MS: &str = "floor(extract(epoch FROM now()) * 1000)::bigint";

/// Which runs a sweeper duty pages through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidates {
    /// `running` runs whose activity column is at least `idle_ms` old, by
    /// `(activity_at_ms, run_id)` (stale reaper; the core applies the effective threshold).
    StaleRunning { idle_ms: u64 },
    /// Every `running` run, by `run_id` (operator shutdown, spend-cap hard stop).
    Running,
    /// Every `pausing` run, by `(activity_at_ms, run_id)` (stuck-pausing recovery).
    Pausing,
    /// Runs in `status` with `stop_kind`, by `(updated_at_ms, run_id)`; with
    /// `updated_within_ms`, only those updated at most that long ago (auto-resume: a run last
    /// updated before the window opened cannot have been reaped inside it).
    Stopped {
        status: AutomationRunStatus,
        stop_kind: AutomationStopKind,
        updated_within_ms: Option<u64>,
    },
    /// `awaiting_approval` runs with no indexed gate action and some gate history, by `run_id`:
    /// the only awaiting runs that can hold a settled but unapplied decision (the store indexes
    /// no next action for them, see [`crate::next_action_at`]).
    SettledGates,
    /// Runs in the terminal `status` last updated more than `older_than_ms` ago, by
    /// `(updated_at_ms, run_id)` (retention).
    TerminalOlderThan {
        status: AutomationRunStatus,
        older_than_ms: u64,
    },
}

/// A position in a candidate order: the ordering key (a bigint column, or 0) and the run id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CandidateCursor {
    pub key: i64,
    pub run_id: String,
}

impl CandidateCursor {
    /// Before every candidate.
    pub fn start() -> Self {
        Self {
            key: i64::MIN,
            run_id: String::new(),
        }
    }
}

/// The page statement of `c`: `$1` limit, `$2`/`$3` the cursor, `$4` the variant's duration if
/// it has one. Public so tests can `EXPLAIN` it.
pub fn candidates_sql(c: &Candidates) -> String {
    let (key, filter) = match c {
        Candidates::StaleRunning { .. } => (
            "r.activity_at_ms",
            format!("r.status = 'running' AND r.activity_at_ms <= {NOW_MS} - $4"),
        ),
        Candidates::Running => ("0::bigint", "r.status = 'running'".to_owned()),
        Candidates::Pausing => ("r.activity_at_ms", "r.status = 'pausing'".to_owned()),
        Candidates::Stopped {
            status,
            stop_kind,
            updated_within_ms,
        } => {
            let mut f = format!(
                "r.status = '{}' AND r.stop_kind = '{}'",
                status.as_str(),
                stop_kind.as_str()
            );
            if updated_within_ms.is_some() {
                f.push_str(&format!(" AND r.updated_at_ms >= {NOW_MS} - $4"));
            }
            ("r.updated_at_ms", f)
        }
        Candidates::SettledGates => (
            "0::bigint",
            // CASE, not AND: the length of a non-array (a corrupt row) must never be asked for.
            "r.status = 'awaiting_approval' AND r.next_action_at_ms IS NULL
             AND CASE WHEN jsonb_typeof(r.doc -> 'checkpoint' -> 'gate_history') = 'array'
                      THEN jsonb_array_length(r.doc -> 'checkpoint' -> 'gate_history') > 0
                      ELSE false END"
                .to_owned(),
        ),
        Candidates::TerminalOlderThan { status, .. } => (
            "r.updated_at_ms",
            format!(
                "r.status = '{}' AND r.updated_at_ms < {NOW_MS} - $4",
                status.as_str()
            ),
        ),
    };
    format!(
        "SELECT r.run_id, {key} FROM runs r
          WHERE {filter} AND ({key}, r.run_id) > ($2::bigint, $3::text)
          ORDER BY {key}, r.run_id LIMIT $1"
    )
}

fn duration_param(c: &Candidates) -> Result<Option<i64>, StoreError> {
    let ms = match c {
        Candidates::StaleRunning { idle_ms } => Some(*idle_ms),
        Candidates::Stopped {
            updated_within_ms, ..
        } => *updated_within_ms,
        Candidates::TerminalOlderThan { older_than_ms, .. } => Some(*older_than_ms),
        Candidates::Running | Candidates::Pausing | Candidates::SettledGates => None,
    };
    // Durations beyond the bigint range (a huge window or retention) are clamped to it.
    ms.map(|ms| ms_to_db(ms.min(i64::MAX as u64), "candidate duration"))
        .transpose()
}

/// The next page of up to `limit` candidates after `after`, in the variant's order. An empty
/// page means the pass is done.
pub async fn candidate_page(
    pool: &Pool,
    candidates: &Candidates,
    after: &CandidateCursor,
    limit: usize,
) -> Result<Vec<CandidateCursor>, StoreError> {
    let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
    let client = pool.get().await?;
    let stmt = client.prepare_cached(&candidates_sql(candidates)).await?;
    let rows = match duration_param(candidates)? {
        Some(ms) => {
            client
                .query(&stmt, &[&limit, &after.key, &after.run_id, &ms])
                .await?
        }
        None => {
            client
                .query(&stmt, &[&limit, &after.key, &after.run_id])
                .await?
        }
    };
    rows.iter()
        .map(|r| {
            Ok(CandidateCursor {
                run_id: r.try_get(0)?,
                key: r.try_get(1)?,
            })
        })
        .collect()
}

/// Whether any approved quota override is unexpired at the database clock: the guardrail
/// auto-resume has nothing to do without one (it resumes only runs an override lifts).
pub async fn any_active_quota_override(pool: &Pool) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(&format!(
            "SELECT EXISTS (SELECT 1 FROM quota_overrides
                             WHERE status = 'approved' AND expires_at_ms > {NOW_MS})"
        ))
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.try_get(0)?)
}

/// Whether any agent is spend-paused (the spend-cap hard stop has nothing to do otherwise).
pub async fn any_spend_pause(pool: &Pool) -> Result<bool, StoreError> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM spend_pauses)")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.try_get(0)?)
}
