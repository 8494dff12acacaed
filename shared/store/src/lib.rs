//! PostgreSQL store for Tandem Fleet: embedded migrations, fenced run transitions persisted with
//! their lifecycle, audit and outbox effects in one transaction, the audit chain and governance.
//!
//! PostgreSQL is the only source of truth. Every function takes a [`Pool`]; every decision is
//! made by `tandem-core` on rows locked here, against the database clock.

mod audit;
mod automations;
mod candidates;
mod claim;
mod convert;
mod error;
mod governance;
mod migrate;
mod outbox;
mod pool;
mod queries;
mod retention;
mod runs;
mod spend;
mod transition;
mod types;
mod write;

pub use audit::{MAX_LINK_BATCH, audit_record_hash, link_audit_chain, verify_audit_chain};
pub use automations::{get_automation, insert_automation, list_automations, upsert_automation};
pub use candidates::{
    CandidateCursor, Candidates, any_active_quota_override, any_spend_pause, candidate_page,
    candidates_sql,
};
pub use claim::{
    CLAIM_CANDIDATES_SQL, CLAIM_LOCK_KEY, ClaimItem, ClaimItemOutcome, ClaimLimits, ClaimReport,
    MAX_CLAIM_BATCH, RESERVATION_MARGIN_SECS, RESERVATION_SECS, RUNNING_COUNT_SQL, claim_runs,
};
pub use error::StoreError;
pub use governance::{
    NewQuotaOverride, QuotaOverrideStatus, SpendCap, governance_snapshot, insert_quota_override,
    list_spend_caps, pause_agent_spend, resume_agent_spend, set_quota_override_status,
    upsert_spend_cap,
};
pub use migrate::{
    MIGRATIONS, Migration, MigrationReport, check_schema, latest_version, migrate, schema_version,
};
pub use outbox::{
    OutboxKind, OutboxRow, TASK_ROW_TYPE, claim_outbox, claim_outbox_for_runs,
    claim_outbox_for_runs_sql, claim_outbox_sql, engine_event, mark_outbox_published, outbox_rows,
    release_outbox, unpublished_outbox,
};
pub use pool::{DEFAULT_POOL_SIZE, connect, connect_with_size};
pub use queries::{
    ApiToken, RunFilter, append_audit, audit_records, awaiting_approval_runs, db_now_ms,
    find_api_token, insert_api_token, list_automations_in, list_runs, revoke_api_token,
};
pub use retention::{
    PRUNED_MARKER, PruneReport, PrunedDoc, STUB_STRING_CHARS, TERMINAL_STATUSES,
    prune_heavy_values, prune_published_outbox, prune_terminal_runs,
};
pub use runs::{
    CLAIM_QUEUED_SQL, claim_queued, claimed_run_ids_to_tick, claimed_run_ids_to_tick_sql,
    create_run, get_run, get_stored_run, list_runs_by_status, next_action_at, next_gate_action_at,
    touch_activity,
};
pub use spend::{
    RunSpend, SPEND_LOCK_KEY, SpendApplied, SpendInputs, SpendPauseRow, SpendPlan,
    evaluate_spend_caps,
};
pub use transition::{
    BatchItem, MAX_BATCH, Sweep, sweep_select_sql, transition_batch, transition_run,
    transition_runs, transition_runs_relayed, try_transition_run,
};
pub use types::{Applied, Fence, LeaseEpoch, StoreSettings, StoredRun, TransitionEnv};

pub use deadpool_postgres::Pool;
