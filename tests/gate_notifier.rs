//! The gate-notifier against the real PostgreSQL and NATS.
//!
//! * Store/core level (no NATS): upstream acceptance cases 5–8 and 15 (spec §6) ported to the
//!   database through `transition_batch(Sweep::DueGates)` + `process_gate_policies`
//!   ([`tandem_gate_notifier::sweep_due_gates`]); a human decision racing the expiry (each order
//!   forced with a held row lock, then many concurrent races): exactly one winner, the loser gets
//!   the 409 mapping with `winningDecision`; an overdue escalation ladder catches up in one
//!   commit, in order; rows indexed with other gate settings are rescheduled, rows the core
//!   cannot act on are left alone; the audit chain written by gate actions catches an edited, a
//!   deleted and a reordered row.
//! * In-process service (shared NATS): the loop sleeps until the next action by the database
//!   clock, wakes on `tandem.wake.gates`, publishes the events with `Nats-Msg-Id` =
//!   `notification_key`, links the audit chain, stops on shutdown.
//! * Binary: an invalid gate setting stops startup naming the variable.
//! * Fleet: 3 `tandem-gate-notifier` processes against their own `nats-server` (own port and
//!   `-sd` directory, so restarting it disturbs no other test) and `TANDEM_GATE_FLEET_GATES`
//!   gates (default 1000) with mixed short policies; every notification key reaches
//!   `TANDEM_EVENTS` exactly once and the lifecycle, audit and outbox counts are exact per gate.
//!   The second variant `kill -9`s a notifier and restarts `nats-server` during the run.
//!
//! Every test has its own database (`TestDb`) and NATS prefix (`unique`) and removes both when it
//! passes.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use deadpool_postgres::Pool;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tandem_bus::{
    Prefix, StreamNames,
    async_nats::{self, jetstream},
};
use tandem_core::audit::ChainBreak;
use tandem_core::config::{GatePolicyDefaults, LifecycleSettings};
use tandem_core::gate::{
    CODE_GATE_EXPIRED, CODE_NOT_AWAITING_APPROVAL, GateAction, GateDecisionOutcome,
    GateDecisionRequest, decide_gate,
};
use tandem_core::{
    AutomationGateDecisionRecord, AutomationGateEscalationStep, AutomationGateExpiryAction as A,
    AutomationGateExpiryPolicy, AutomationRunStatus, AutomationStopKind, AutomationV2RunRecord,
    Effects, GovernanceActorRef, Transition,
};
use tandem_gate_notifier::{
    GateNotifier, GateNotifierConfig, GateOutcome, SweepReport, gate_transition, sweep_due_gates,
};
use tandem_runtime::{RelaySettings, Shutdown};
use tandem_store::{Applied, Fence, StoreSettings, Sweep};
use tandem_tests::gates::{GATE, awaiting_run, spec};
use tandem_tests::procs::{EXIT_TIMEOUT, Proc, free_port, http_get};
use tandem_tests::{TestDb, db_now, nats_url, unique};

const SEC: u64 = 1_000;
const DAY: u64 = 86_400_000;

// ---------------------------------------------------------------------------------------------
// helpers

fn defaults() -> GatePolicyDefaults {
    GatePolicyDefaults::default()
}

fn settings() -> StoreSettings {
    StoreSettings::new(defaults())
}

fn policy(
    expires_after_ms: u64,
    on: A,
    remind_every_ms: Option<u64>,
    escalate_to: Option<&str>,
) -> AutomationGateExpiryPolicy {
    AutomationGateExpiryPolicy {
        expires_after_ms: Some(expires_after_ms),
        on_expiry: Some(on),
        escalate_to: escalate_to.map(str::to_owned),
        remind_every_ms,
        ..Default::default()
    }
}

async fn create(
    pool: &Pool,
    run: &AutomationV2RunRecord,
    settings: &StoreSettings,
) -> anyhow::Result<()> {
    tandem_store::create_run(pool, run, &Effects::default(), settings).await?;
    Ok(())
}

async fn sweep(pool: &Pool) -> anyhow::Result<SweepReport> {
    Ok(sweep_due_gates(pool, 50, &settings()).await?)
}

/// A human gate decision through the store, as the API's gate endpoint applies it.
async fn decide(
    pool: &Pool,
    run_id: &str,
    decision: &str,
    gates: GatePolicyDefaults,
) -> anyhow::Result<Applied<GateDecisionOutcome>> {
    let request = GateDecisionRequest::new(decision, GovernanceActorRef::human("alice"));
    Ok(tandem_store::transition_run(
        pool,
        run_id,
        Fence::Unfenced,
        &StoreSettings::new(gates),
        |run, env| match env.automation.as_deref() {
            Some(a) => decide_gate(run, a, &gates, &request, env.now_ms),
            None => Transition::unchanged(GateDecisionOutcome::GateMissing),
        },
    )
    .await?)
}

fn lifecycle_events(run: &AutomationV2RunRecord) -> Vec<String> {
    run.checkpoint
        .lifecycle_history
        .iter()
        .map(|r| r.event.clone())
        .collect()
}

/// Audit event types of a run, in write order.
async fn audit_types(pool: &Pool, run_id: &str) -> anyhow::Result<Vec<String>> {
    let c = pool.get().await?;
    Ok(c.query(
        "SELECT event_type FROM audit_log
          WHERE coalesce(payload->>'run_id', payload->>'runID') = $1 ORDER BY id",
        &[&run_id],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// Outbox rows of a run: (event type, dedupe id, payload), in write order.
async fn outbox_of(pool: &Pool, run_id: &str) -> anyhow::Result<Vec<(String, String, Value)>> {
    let c = pool.get().await?;
    Ok(c.query(
        "SELECT event_type, dedupe_id, payload FROM outbox WHERE run_id = $1 ORDER BY id",
        &[&run_id],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect())
}

fn policy_state(run: &AutomationV2RunRecord) -> Value {
    run.checkpoint
        .awaiting_gate
        .as_ref()
        .and_then(|g| g.metadata.as_ref())
        .and_then(|m| m.get("gate_policy_state"))
        .cloned()
        .unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------------------------
// spec §6 acceptance cases against the database

#[tokio::test]
async fn case_5_expiry_policy_auto_cancels_with_one_expired_record() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    let requested = now - 10 * SEC;
    create(
        &pool,
        &awaiting_run("r5", requested, Some(policy(1, A::Cancel, None, None)))?,
        &settings(),
    )
    .await?;
    let first = sweep(&pool).await?;
    assert_eq!((first.selected, first.changed), (1, 1));
    assert_eq!(first.actions.expired, 1);
    assert_eq!(first.actions.total(), 1);
    assert_eq!(first.runs_with_outbox, vec!["r5".to_owned()]);
    assert!(first.lag_ms[0] >= 10 * SEC - 1, "{:?}", first.lag_ms);
    let second = sweep(&pool).await?;
    assert_eq!(second.selected, 0, "an expired gate is never due again");

    let stored = tandem_store::get_stored_run(&pool, "r5").await?;
    let run = stored.run;
    assert_eq!(run.status, AutomationRunStatus::Cancelled);
    assert_eq!(run.stop_kind, Some(AutomationStopKind::Cancelled));
    assert!(run.checkpoint.awaiting_gate.is_none());
    assert_eq!(stored.next_action_at_ms, None);
    assert_eq!(run.checkpoint.gate_history.len(), 1);
    assert_eq!(run.checkpoint.gate_history[0].decision, "expired");
    assert_eq!(
        lifecycle_events(&run),
        vec!["approval_gate_expired", "run_cancelled"]
    );
    assert_eq!(
        audit_types(&pool, "r5").await?,
        vec!["automation_v2.internal_sweep.approval_gate_expired"]
    );
    let outbox = outbox_of(&pool, "r5").await?;
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].0, "approval.gate.expired");
    assert_eq!(
        outbox[0].2["properties"],
        json!({
            "run_id": "r5",
            "automation_id": "auto-gates",
            "node_id": GATE,
            "decision": "expired",
            "expires_at_ms": requested + 1,
            "tenantContext": {"org_id": "org-1", "workspace_id": "ws.one", "source": "explicit"},
        })
    );
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn case_6_reminder_policy_updates_notification_key() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    let requested = now - 120 * SEC;
    create(
        &pool,
        &awaiting_run(
            "r6",
            requested,
            Some(policy(3_600_000, A::Cancel, Some(60_000), None)),
        )?,
        &settings(),
    )
    .await?;
    let first = sweep(&pool).await?;
    assert_eq!((first.changed, first.actions.reminded), (1, 1));
    assert_eq!(sweep(&pool).await?.selected, 0, "sweep → 1, then 0");

    let stored = tandem_store::get_stored_run(&pool, "r6").await?;
    let run = &stored.run;
    assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
    let key = "automation_v2:r6:approval:reminder:1";
    let state = policy_state(run);
    assert_eq!(state["reminder_count"], 1);
    assert_eq!(state["notification_key"], key);
    assert_eq!(state["expires_at_ms"], requested + 3_600_000);
    assert_eq!(state["expired_reminder"], false);
    let reminded_at = state["last_reminded_at_ms"].as_u64().context("reminded")?;
    assert!(reminded_at >= now);
    assert_eq!(
        stored.next_action_at_ms,
        Some(reminded_at + 60_000),
        "the next reminder is indexed"
    );
    assert_eq!(lifecycle_events(run), vec!["approval_gate_reminder_due"]);
    let outbox = outbox_of(&pool, "r6").await?;
    assert_eq!(outbox.len(), 1);
    let (event_type, dedupe_id, payload) = &outbox[0];
    assert_eq!(event_type, "approval.gate.reminder_due");
    assert_eq!(dedupe_id, key, "Nats-Msg-Id is the notification key");
    assert_eq!(payload["properties"]["reminder_count"], 1);
    assert_eq!(payload["properties"]["expired"], false);
    assert_eq!(
        payload["properties"]["expires_at_ms"],
        requested + 3_600_000
    );
    assert_eq!(
        audit_types(&pool, "r6").await?,
        vec!["automation_v2.internal_sweep.approval_gate_reminder_due"]
    );
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn case_7_escalation_policy_updates_notification_key() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    let requested = now - 120 * SEC;
    create(
        &pool,
        &awaiting_run(
            "r7",
            requested,
            Some(policy(1, A::Escalate, None, Some("risk-lead"))),
        )?,
        &settings(),
    )
    .await?;
    let first = sweep(&pool).await?;
    assert_eq!((first.changed, first.actions.escalated), (1, 1));
    assert_eq!(sweep(&pool).await?.selected, 0, "sweep → 1, then 0");

    let stored = tandem_store::get_stored_run(&pool, "r7").await?;
    let run = &stored.run;
    assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
    assert_eq!(lifecycle_events(run), vec!["approval_gate_escalated"]);
    let key = "automation_v2:r7:approval:escalated:1";
    let state = policy_state(run);
    assert_eq!(state["escalated_to"], "risk-lead");
    assert_eq!(state["reminder_count"], 1);
    assert_eq!(state["notification_key"], key);
    assert_eq!(
        stored.next_action_at_ms,
        Some(requested + DAY),
        "only the stale marking is left"
    );
    let outbox = outbox_of(&pool, "r7").await?;
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].0, "approval.gate.escalated");
    assert_eq!(outbox[0].1, key);
    assert_eq!(outbox[0].2["properties"]["escalated_to"], "risk-lead");
    assert_eq!(
        audit_types(&pool, "r7").await?,
        vec!["automation_v2.internal_sweep.approval_gate_escalated"]
    );
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn case_8_expired_cancel_policy_rejects_late_human_decision() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    let late = now - 15 * SEC;
    for (id, requested, p) in [
        ("cancel-late", late, policy(5, A::Cancel, None, None)),
        ("cancel-early", now, policy(60_000, A::Cancel, None, None)),
        ("escalate-late", late, policy(5, A::Escalate, None, None)),
        ("remind-late", late, policy(5, A::Remind, None, None)),
        ("cancel-swept", late, policy(5, A::Cancel, None, None)),
    ] {
        create(&pool, &awaiting_run(id, requested, Some(p))?, &settings()).await?;
    }
    // The expiry time passed, the sweep has not run: cancel still wins deterministically.
    let before = tandem_store::get_stored_run(&pool, "cancel-late").await?;
    let a = decide(&pool, "cancel-late", "approve", defaults()).await?;
    assert!(
        matches!(a.outcome, GateDecisionOutcome::GateExpired { .. }),
        "{:?}",
        a.outcome
    );
    assert!(!a.changed);
    assert_eq!(a.outcome.http_status(), 409);
    assert_eq!(a.outcome.error_code(), Some(CODE_GATE_EXPIRED));
    assert!(a.outcome.denial_audit().is_some());
    assert_eq!(
        tandem_store::get_stored_run(&pool, "cancel-late").await?,
        before,
        "nothing written"
    );
    // Before expiry, and escalate / remind policies after expiry: accepted.
    for id in ["cancel-early", "escalate-late", "remind-late"] {
        let a = decide(&pool, id, "approve", defaults()).await?;
        assert!(
            matches!(a.outcome, GateDecisionOutcome::Applied { .. }),
            "{id}: {:?}",
            a.outcome
        );
        assert_eq!(a.outcome.http_status(), 200);
        assert_eq!(a.run.status, AutomationRunStatus::Queued, "{id}");
    }
    // Once the sweep expired it: 409 not awaiting approval, with the expiry as winner.
    let swept = sweep(&pool).await?;
    assert_eq!(
        swept.actions.expired, 2,
        "cancel-late and cancel-swept expire"
    );
    let a = decide(&pool, "cancel-swept", "approve", defaults()).await?;
    assert_eq!(a.outcome.http_status(), 409);
    assert_eq!(a.outcome.error_code(), Some(CODE_NOT_AWAITING_APPROVAL));
    let winner = a.outcome.winning_decision().context("winningDecision")?;
    assert_eq!(winner.decision, "expired");
    assert_eq!(winner.node_id, GATE);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn case_15_awaiting_runs_are_marked_stale_with_visible_manual_policy() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    let requested = now - 2 * DAY;
    create(&pool, &awaiting_run("r15", requested, None)?, &settings()).await?;
    let first = sweep(&pool).await?;
    assert_eq!((first.changed, first.actions.marked_stale), (1, 1));
    assert_eq!(first.actions.total(), 1, "the 7-day expiry is not due yet");
    assert!(
        first.runs_with_outbox.is_empty(),
        "stale marking emits no event"
    );
    assert_eq!(sweep(&pool).await?.selected, 0, "sweep → 1, then 0");

    let stored = tandem_store::get_stored_run(&pool, "r15").await?;
    let run = &stored.run;
    assert_eq!(run.status, AutomationRunStatus::AwaitingApproval);
    assert_eq!(
        run.detail.as_deref(),
        Some(
            "awaiting manual approval for gate `approval` for at least 86400s; no automatic expiry action is configured"
        )
    );
    let meta = run
        .checkpoint
        .awaiting_gate
        .as_ref()
        .and_then(|g| g.metadata.clone())
        .context("gate metadata")?;
    assert_eq!(meta["stale"], true);
    assert_eq!(meta["stale_policy"], "manual_only_visible_status");
    assert_eq!(meta["stale_after_ms"], DAY);
    assert_eq!(meta["requested_at_ms"], requested);
    assert_eq!(lifecycle_events(run), vec!["approval_gate_marked_stale"]);
    assert_eq!(
        stored.next_action_at_ms,
        Some(requested + 7 * DAY),
        "the default 7-day expiry is next"
    );
    assert_eq!(
        audit_types(&pool, "r15").await?,
        vec!["automation_v2.internal_sweep.approval_gate_marked_stale"]
    );
    assert!(outbox_of(&pool, "r15").await?.is_empty());
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn escalation_ladder_catches_up_in_one_commit_in_order() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    let step = |after_ms: u64, action: A| AutomationGateEscalationStep {
        after_ms,
        action: action.into(),
        escalate_to: None,
    };
    let ladder = AutomationGateExpiryPolicy {
        escalate_to: Some("risk-lead".into()),
        steps: Some(vec![
            step(1_000, A::Remind),
            step(2_000, A::Escalate),
            step(3_000, A::Cancel),
        ]),
        ..Default::default()
    };
    // Every step is overdue: a notifier that was down catches up in one transaction.
    create(
        &pool,
        &awaiting_run("ladder", now - 10 * SEC, Some(ladder))?,
        &settings(),
    )
    .await?;
    let r = sweep(&pool).await?;
    assert_eq!((r.selected, r.changed), (1, 1));
    assert_eq!(
        (r.actions.reminded, r.actions.escalated, r.actions.expired),
        (1, 1, 1)
    );
    assert_eq!(sweep(&pool).await?.selected, 0);
    let run = tandem_store::get_run(&pool, "ladder").await?;
    assert_eq!(run.status, AutomationRunStatus::Cancelled);
    let outbox = outbox_of(&pool, "ladder").await?;
    let kinds: Vec<(&str, &str)> = outbox
        .iter()
        .map(|(t, id, _)| (t.as_str(), id.as_str()))
        .collect();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    assert_eq!(
        kinds[..2],
        [
            (
                "approval.gate.reminder_due",
                "automation_v2:ladder:approval:reminder:1"
            ),
            (
                "approval.gate.escalated",
                "automation_v2:ladder:approval:escalated:2"
            ),
        ]
    );
    assert_eq!(kinds[2].0, "approval.gate.expired");
    for (i, (_, _, payload)) in outbox.iter().enumerate() {
        assert_eq!(payload["properties"]["step_index"], i, "{payload}");
    }
    assert_eq!(audit_types(&pool, "ladder").await?.len(), 3);
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn rows_indexed_with_other_settings_are_rescheduled_and_settled_gates_are_never_due()
-> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    // Written by a replica whose stale threshold is one hour: indexed as due now.
    let hourly = StoreSettings::new(GatePolicyDefaults {
        stale_after_ms: 3_600_000,
        ..defaults()
    });
    let requested = now - 2 * 3_600_000;
    create(&pool, &awaiting_run("other", requested, None)?, &hourly).await?;
    // An awaiting run whose open instance already has a settled decision (a half-applied
    // decision, which the sweeper's recovery settles): not indexed as due at all, so it can never
    // sit at the head of the due order.
    let mut half = awaiting_run(
        "half",
        now - 10 * SEC,
        Some(policy(1, A::Cancel, None, None)),
    )?;
    half.checkpoint
        .gate_history
        .push(AutomationGateDecisionRecord {
            node_id: GATE.into(),
            decision: "approve".into(),
            reason: None,
            decided_at_ms: now - 5 * SEC,
            decided_by: Some(GovernanceActorRef::human("bob")),
            metadata: None,
        });
    create(&pool, &half, &settings()).await?;

    let r = sweep(&pool).await?;
    assert_eq!(r.selected, 1);
    assert_eq!(r.rescheduled, 1);
    assert!(r.stuck.is_empty());
    assert_eq!(r.changed, 0);
    assert_eq!(r.actions.total(), 0);
    let other = tandem_store::get_stored_run(&pool, "other").await?;
    assert_eq!(
        other.next_action_at_ms,
        Some(requested + DAY),
        "indexed with this replica's 24 h threshold"
    );
    assert!(other.run.checkpoint.lifecycle_history.is_empty());
    assert_eq!(
        other.run.updated_at_ms, requested,
        "the record is unchanged"
    );
    let half_row = tandem_store::get_stored_run(&pool, "half").await?;
    assert_eq!(half_row.run, half, "nothing written");
    assert_eq!(
        half_row.next_action_at_ms, None,
        "a settled gate is never due"
    );
    let r = sweep(&pool).await?;
    assert_eq!(
        (r.selected, r.rescheduled, r.stuck.len()),
        (0, 0, 0),
        "nothing is due again"
    );
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// a human decision racing the expiry

/// Holds a row lock inside a transition closure until released: the closure reports that it runs
/// (so the row is locked) and blocks its thread until the test releases it.
struct Hold {
    locked: Arc<std::sync::atomic::AtomicBool>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Hold {
    fn new() -> (
        Self,
        Arc<std::sync::atomic::AtomicBool>,
        std::sync::mpsc::Sender<()>,
    ) {
        let locked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        (
            Self {
                locked: locked.clone(),
                release: std::sync::Mutex::new(rx),
            },
            locked,
            tx,
        )
    }

    /// Called inside the closure, with the row locked. `block_in_place`: the worker hands its
    /// other tasks (and the runtime's drivers) over while it blocks.
    fn hold(&self) {
        self.locked.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::task::block_in_place(|| {
            if let Ok(rx) = self.release.lock() {
                let _ = rx.recv_timeout(Duration::from_secs(30));
            }
        });
    }
}

async fn wait_locked(locked: &std::sync::atomic::AtomicBool) -> anyhow::Result<()> {
    wait_until("the row lock", Duration::from_secs(20), async || {
        Ok(locked.load(std::sync::atomic::Ordering::SeqCst))
    })
    .await
}

/// Applies the gate-notifier transition to due gates, holding their row locks until released.
async fn sweep_holding(pool: Pool, hold: Hold) -> anyhow::Result<Vec<GateOutcome>> {
    let s = settings();
    let items = tandem_store::transition_batch(&pool, &Sweep::DueGates, 50, &s, |run, env| {
        let t = gate_transition(run, env, &s);
        hold.hold();
        t
    })
    .await?;
    items
        .into_iter()
        .map(|i| Ok(i.result?.outcome))
        .collect::<anyhow::Result<Vec<_>>>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decision_waiting_on_the_expiry_loses_with_winning_decision() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    create(
        &pool,
        &awaiting_run(
            "race",
            now - 10 * SEC,
            Some(policy(1, A::Cancel, None, None)),
        )?,
        &settings(),
    )
    .await?;
    let (hold, locked, release) = Hold::new();
    let notifier = tokio::spawn(sweep_holding(pool.clone(), hold));
    wait_locked(&locked).await?;
    // The notifier holds the row: the decision blocks on it.
    let decider = {
        let pool = pool.clone();
        tokio::spawn(async move { decide(&pool, "race", "approve", defaults()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    if decider.is_finished() {
        let r = decider.await?;
        bail!("the decision did not wait for the row lock: {r:?}");
    }
    release.send(())?;
    let outcomes = notifier.await??;
    let decision = decider.await??;
    assert!(matches!(&outcomes[..], [GateOutcome::Acted { actions, .. }]
        if matches!(actions[..], [GateAction::Expired { .. }])));
    assert!(!decision.changed);
    assert_eq!(decision.outcome.http_status(), 409);
    assert_eq!(
        decision.outcome.error_code(),
        Some(CODE_NOT_AWAITING_APPROVAL)
    );
    let winner = decision
        .outcome
        .winning_decision()
        .context("winningDecision")?;
    assert_eq!(winner.decision, "expired");
    let run = tandem_store::get_run(&pool, "race").await?;
    assert_eq!(run.checkpoint.gate_history.len(), 1);
    assert_eq!(run.status, AutomationRunStatus::Cancelled);
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiry_racing_a_decision_in_flight_skips_it_and_never_acts() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    // Expires 2 s from now; the decision locks the row before that and holds it past it.
    create(
        &pool,
        &awaiting_run("race", now, Some(policy(2_000, A::Cancel, None, None)))?,
        &settings(),
    )
    .await?;
    let (hold, locked, release) = Hold::new();
    let decider = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let request = GateDecisionRequest::new("approve", GovernanceActorRef::human("alice"));
            tandem_store::transition_run(&pool, "race", Fence::Unfenced, &settings(), |run, env| {
                let t = match env.automation.as_deref() {
                    Some(a) => decide_gate(run, a, &defaults(), &request, env.now_ms),
                    None => Transition::unchanged(GateDecisionOutcome::GateMissing),
                };
                hold.hold();
                t
            })
            .await
        })
    };
    wait_locked(&locked).await?;
    wait_until("the expiry time", Duration::from_secs(10), async || {
        Ok(db_now(&pool).await? >= now + 2_000)
    })
    .await?;
    let during = sweep(&pool).await?;
    assert_eq!(
        during.selected, 0,
        "SKIP LOCKED: the decision holds the row"
    );
    release.send(())?;
    let decision = decider.await??;
    assert!(
        matches!(decision.outcome, GateDecisionOutcome::Applied { .. }),
        "{:?}",
        decision.outcome
    );
    let after = sweep(&pool).await?;
    assert_eq!(after.selected, 0, "decided: no longer awaiting");
    let run = tandem_store::get_run(&pool, "race").await?;
    assert_eq!(run.status, AutomationRunStatus::Queued);
    assert_eq!(run.checkpoint.gate_history.len(), 1);
    assert_eq!(run.checkpoint.gate_history[0].decision, "approve");
    assert!(!lifecycle_events(&run).contains(&"approval_gate_expired".to_owned()));
    let outbox = outbox_of(&pool, "race").await?;
    assert_eq!(
        outbox.iter().map(|o| o.0.as_str()).collect::<Vec<_>>(),
        vec!["approval.decision.recorded"]
    );
    drop(pool);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_decisions_and_expiry_sweeps_settle_each_gate_once() -> anyhow::Result<()> {
    const RUNS: u64 = 30;
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    // Gate i expires at base + 25·i ms; its decision lands 150 ms before (even i) or after (odd
    // i) that, while two notifier loops sweep continuously.
    let base = now + 800;
    for i in 0..RUNS {
        let expires_at = base + 25 * i;
        create(
            &pool,
            &awaiting_run(
                &format!("g{i:02}"),
                expires_at - 1_000,
                Some(policy(1_000, A::Cancel, None, None)),
            )?,
            &settings(),
        )
        .await?;
    }
    let local_base =
        Instant::now() + Duration::from_millis(base.saturating_sub(db_now(&pool).await?));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut sweepers = Vec::new();
    for _ in 0..2 {
        let (pool, stop) = (pool.clone(), stop.clone());
        sweepers.push(tokio::spawn(async move {
            let mut expired = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                expired += sweep_due_gates(&pool, 7, &settings())
                    .await?
                    .actions
                    .expired;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            anyhow::Ok(expired)
        }));
    }
    let mut deciders = Vec::new();
    for i in 0..RUNS {
        let pool = pool.clone();
        let at = local_base + Duration::from_millis(25 * i);
        let at = if i % 2 == 0 {
            at - Duration::from_millis(150)
        } else {
            at + Duration::from_millis(150)
        };
        deciders.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            decide(&pool, &format!("g{i:02}"), "approve", defaults()).await
        }));
    }
    let mut decisions = Vec::new();
    for d in deciders {
        decisions.push(d.await??);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut swept = 0;
    for s in sweepers {
        swept += s.await??;
    }

    let (mut human, mut expiry) = (0, 0);
    for (i, d) in decisions.iter().enumerate() {
        let id = format!("g{i:02}");
        let run = tandem_store::get_run(&pool, &id).await?;
        ensure!(
            run.checkpoint.gate_history.len() == 1,
            "{id}: {} decisions recorded",
            run.checkpoint.gate_history.len()
        );
        let events = lifecycle_events(&run);
        let outbox: Vec<String> = outbox_of(&pool, &id)
            .await?
            .into_iter()
            .map(|o| o.0)
            .collect();
        let audits = audit_types(&pool, &id).await?;
        match run.checkpoint.gate_history[0].decision.as_str() {
            "approve" => {
                human += 1;
                ensure!(
                    matches!(d.outcome, GateDecisionOutcome::Applied { .. }),
                    "{id}"
                );
                ensure!(run.status == AutomationRunStatus::Queued, "{id}");
                ensure!(events.is_empty(), "{id}: {events:?}");
                ensure!(outbox == ["approval.decision.recorded"], "{id}: {outbox:?}");
                ensure!(
                    audits == ["automation.governance.gate_decided"],
                    "{id}: {audits:?}"
                );
            }
            "expired" => {
                expiry += 1;
                ensure!(!d.changed && d.outcome.http_status() == 409, "{id}");
                // Either refused as late (the sweep had not run yet) or found already decided.
                match &d.outcome {
                    GateDecisionOutcome::GateExpired { .. } => {}
                    GateDecisionOutcome::AlreadyDecided(Some(w)) if w.decision == "expired" => {}
                    other => bail!("{id}: loser got {other:?}"),
                }
                ensure!(run.status == AutomationRunStatus::Cancelled, "{id}");
                ensure!(
                    events == ["approval_gate_expired", "run_cancelled"],
                    "{id}: {events:?}"
                );
                ensure!(outbox == ["approval.gate.expired"], "{id}: {outbox:?}");
                ensure!(
                    audits == ["automation_v2.internal_sweep.approval_gate_expired"],
                    "{id}: {audits:?}"
                );
            }
            other => bail!("{id}: unexpected decision {other}"),
        }
    }
    println!("race: runs={RUNS} human_wins={human} expiry_wins={expiry} swept={swept}");
    assert_eq!(human + expiry, RUNS);
    assert_eq!(
        swept, expiry,
        "every expiry counted once across both sweepers"
    );
    assert!(
        human > 0 && expiry > 0,
        "both sides won some races ({human}/{expiry})"
    );
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// the audit chain written by gate actions

/// A database whose audit log holds the records of gate actions (expiry, escalation, reminder,
/// stale marking), linked into one verified chain.
async fn gate_audit_chain() -> anyhow::Result<(TestDb, Pool, u64)> {
    let (db, pool) = TestDb::migrated().await?;
    let now = db_now(&pool).await?;
    for (id, requested, p) in [
        (
            "a-expire",
            now - 10 * SEC,
            Some(policy(1, A::Cancel, None, None)),
        ),
        (
            "b-escalate",
            now - 2 * DAY,
            Some(policy(1, A::Escalate, None, Some("risk-lead"))),
        ),
        (
            "c-remind",
            now - 120 * SEC,
            Some(policy(3_600_000, A::Cancel, Some(60_000), None)),
        ),
        ("d-stale", now - 2 * DAY, None),
    ] {
        create(&pool, &awaiting_run(id, requested, p)?, &settings()).await?;
    }
    let r = sweep(&pool).await?;
    assert_eq!(
        r.actions.total(),
        5,
        "b-escalate escalates and is marked stale"
    );
    let linked = tandem_store::link_audit_chain(&pool, 1_000).await?;
    assert_eq!(linked, 5);
    assert_eq!(tandem_store::verify_audit_chain(&pool).await?, Ok(5));
    Ok((db, pool, linked))
}

/// Tampering as a table owner would: with the guard trigger disabled.
async fn tamper(pool: &Pool, sql: &str) -> anyhow::Result<()> {
    pool.get()
        .await?
        .batch_execute(&format!(
            "ALTER TABLE audit_log DISABLE TRIGGER audit_log_guard;
             {sql};
             ALTER TABLE audit_log ENABLE TRIGGER audit_log_guard;"
        ))
        .await?;
    Ok(())
}

#[tokio::test]
async fn gate_audit_chain_detects_an_edited_record() -> anyhow::Result<()> {
    let (db, pool, _) = gate_audit_chain().await?;
    tamper(
        &pool,
        "UPDATE audit_log SET payload = jsonb_set(payload, '{outcome}', '\"approved\"')
          WHERE seq = 3",
    )
    .await?;
    assert_eq!(
        tandem_store::verify_audit_chain(&pool).await?,
        Err(ChainBreak::HashMismatch { seq: 3 })
    );
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn gate_audit_chain_detects_a_deleted_record() -> anyhow::Result<()> {
    let (db, pool, _) = gate_audit_chain().await?;
    tamper(&pool, "DELETE FROM audit_log WHERE seq = 2").await?;
    assert_eq!(
        tandem_store::verify_audit_chain(&pool).await?,
        Err(ChainBreak::SeqGap {
            expected: 2,
            found: 3
        })
    );
    drop(pool);
    db.drop_db().await
}

#[tokio::test]
async fn gate_audit_chain_detects_reordered_records() -> anyhow::Result<()> {
    let (db, pool, _) = gate_audit_chain().await?;
    tamper(
        &pool,
        "UPDATE audit_log SET seq = seq + 1000 WHERE seq IN (2, 3);
         UPDATE audit_log SET seq = CASE seq WHEN 1002 THEN 3 ELSE 2 END
          WHERE seq IN (1002, 1003)",
    )
    .await?;
    assert_eq!(
        tandem_store::verify_audit_chain(&pool).await?,
        Err(ChainBreak::PrevHashMismatch { seq: 2 })
    );
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// the service in-process (shared NATS)

/// A NATS connection with the streams of a fresh prefix.
struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: Prefix,
}

impl Bus {
    async fn new(url: &str) -> anyhow::Result<Self> {
        let prefix = Prefix::new(&unique("g").replace('_', "-"))?;
        let client = tandem_bus::connect(&tandem_bus::NatsOptions::new(url), "tandem-tests")
            .await
            .context("connecting to NATS")?;
        let js = tandem_bus::jetstream(client.clone());
        tandem_bus::ensure_streams(&js, &prefix).await?;
        Ok(Self { client, js, prefix })
    }

    fn events(&self) -> String {
        StreamNames::new(&self.prefix).events
    }

    async fn cleanup(&self) {
        for name in StreamNames::new(&self.prefix).all() {
            let _ = self.js.delete_stream(name).await;
        }
    }
}

/// Every message of a stream: (Nats-Msg-Id, subject, payload).
async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
) -> anyhow::Result<Vec<(String, String, Value)>> {
    let mut stream = js.get_stream(stream).await?;
    let total = stream.info().await?.state.messages as usize;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: -1,
            ..Default::default()
        })
        .await?;
    let mut out = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < total && Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_secs(2))
            .messages()
            .await?;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("fetching: {e}"))?;
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string())
                .unwrap_or_default();
            let payload: Value = serde_json::from_slice(&m.payload)?;
            out.push((id, m.subject.to_string(), payload));
            m.ack().await.map_err(|e| anyhow::anyhow!("acking: {e}"))?;
        }
    }
    ensure!(
        out.len() == total,
        "read {} of {total} stream messages",
        out.len()
    );
    Ok(out)
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn lifecycle_count(pool: &Pool, run_id: &str, event: &str) -> anyhow::Result<i64> {
    Ok(pool
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM run_lifecycle WHERE run_id = $1 AND event = $2",
            &[&run_id, &event],
        )
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifier_sleeps_until_due_wakes_on_hint_publishes_and_links_audit() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    let bus = Bus::new(&nats_url()).await?;
    let config = GateNotifierConfig {
        poll_interval: Duration::from_secs(60),
        audit_link_interval: Some(Duration::from_millis(100)),
        relay: RelaySettings {
            poll: Duration::from_secs(60),
            ..RelaySettings::default()
        },
        ..GateNotifierConfig::default()
    };
    let notifier = GateNotifier::new(
        pool.clone(),
        bus.client.clone(),
        bus.js.clone(),
        bus.prefix.clone(),
        config,
        LifecycleSettings::default(),
    );
    let (trigger, shutdown) = Shutdown::manual();
    let task = {
        let n = notifier.clone();
        tokio::spawn(async move { n.run(shutdown).await })
    };
    let result = async {
        // Nothing awaits: the loop sleeps on the 30–60 s safety poll.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let batches = notifier.stats().batches;

        // A gate escalating 1.5 s from now, announced by a wake-up: the loop re-reads the next
        // action and sleeps until it is due by the database clock, no longer.
        let now = db_now(&pool).await?;
        let due = now + 1_500;
        create(
            &pool,
            &awaiting_run(
                "esc",
                now,
                Some(policy(1_500, A::Escalate, None, Some("risk-lead"))),
            )?,
            &settings(),
        )
        .await?;
        tandem_gate_notifier::wake_gate_notifiers(&bus.client, &bus.prefix).await?;
        wait_until("the escalation", Duration::from_secs(10), async || {
            Ok(lifecycle_count(&pool, "esc", "approval_gate_escalated").await? == 1)
        })
        .await?;
        let run = tandem_store::get_run(&pool, "esc").await?;
        let at = run.checkpoint.lifecycle_history[0].recorded_at_ms;
        ensure!(at >= due, "escalated before it was due ({at} < {due})");
        ensure!(
            at - due < 1_000,
            "escalated {} ms after it was due",
            at - due
        );
        ensure!(
            notifier.stats().batches - batches <= 4,
            "the loop slept instead of polling: {} batches",
            notifier.stats().batches - batches
        );

        // A gate inserted already due, without a wake-up, waits for the safety poll...
        create(
            &pool,
            &awaiting_run("stale", now - 2 * DAY, None)?,
            &settings(),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(700)).await;
        ensure!(
            lifecycle_count(&pool, "stale", "approval_gate_marked_stale").await? == 0,
            "acted without a wake-up or poll"
        );
        // ...and a wake-up makes the loop look now.
        let woken = Instant::now();
        tandem_gate_notifier::wake_gate_notifiers(&bus.client, &bus.prefix).await?;
        wait_until("the stale marking", Duration::from_secs(5), async || {
            Ok(lifecycle_count(&pool, "stale", "approval_gate_marked_stale").await? == 1)
        })
        .await?;
        ensure!(woken.elapsed() < Duration::from_secs(2));
        ensure!(notifier.stats().wakeups >= 2);

        // The escalation event is on TANDEM_EVENTS once, under its notification key.
        let key = "automation_v2:esc:approval:escalated:1";
        wait_until("the event", Duration::from_secs(10), async || {
            Ok(bus
                .js
                .get_stream(bus.events())
                .await?
                .info()
                .await?
                .state
                .messages
                >= 1)
        })
        .await?;
        let messages = read_stream(&bus.js, &bus.events()).await?;
        ensure!(messages.len() == 1, "{messages:?}");
        let (id, subject, payload) = &messages[0];
        ensure!(id == key, "Nats-Msg-Id {id}");
        ensure!(
            subject
                == &format!(
                    "{}.tandem.events.org-1.ws%2Eone.approval.gate.escalated",
                    bus.prefix
                ),
            "{subject}"
        );
        ensure!(payload["type"] == "approval.gate.escalated");
        ensure!(payload["properties"]["escalated_to"] == "risk-lead");
        ensure!(notifier.stats().relayed_published == 1);

        // The chainer linked both audit records.
        wait_until("the audit chain", Duration::from_secs(5), async || {
            Ok(tandem_store::verify_audit_chain(&pool).await? == Ok(2))
        })
        .await?;
        ensure!(notifier.stats().audit_linked == 2);
        let s = notifier.stats();
        ensure!(
            (s.actions.escalated, s.actions.marked_stale, s.stuck) == (1, 1, 0),
            "{s:?}"
        );
        Ok(())
    }
    .await;
    trigger.trigger();
    let stopped = tokio::time::timeout(Duration::from_secs(5), task).await;
    bus.cleanup().await;
    result?;
    stopped.context("the notifier did not stop within 5 s")???;
    drop(pool);
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// the binary

#[tokio::test]
async fn invalid_gate_settings_stop_startup_naming_the_variable() -> anyhow::Result<()> {
    let (db, pool) = TestDb::migrated().await?;
    drop(pool);
    for (var, value) in [
        ("TANDEM_APPROVAL_GATE_DEFAULT_EXPIRES_AFTER_MS", "7d"),
        ("TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY", "explode"),
        ("TANDEM_APPROVAL_GATE_STALE_AFTER_MS", "0"),
        ("TANDEM_APPROVAL_GATE_STALE_AFTER_MS", "-5"),
    ] {
        let env = vec![
            ("TANDEM_DATABASE_URL", db.url.clone()),
            ("TANDEM_NATS_URL", nats_url()),
            ("TANDEM_NATS_PREFIX", unique("t")),
            ("TANDEM_HEALTH_ADDR", format!("127.0.0.1:{}", free_port()?)),
            (var, value.to_owned()),
        ];
        let mut svc = Proc::start("tandem-gate-notifier", &[], &env)?;
        let status = svc.wait(EXIT_TIMEOUT).await?;
        let stderr = svc.stderr();
        ensure!(
            status.code() == Some(2),
            "{var}={value}: exit {status}; stderr:\n{stderr}"
        );
        ensure!(
            stderr.contains(var) && stderr.contains(value),
            "{var}={value}: stderr:\n{stderr}"
        );
    }
    db.drop_db().await
}

// ---------------------------------------------------------------------------------------------
// fleet

/// A `nats-server` of the test's own (port, JetStream store directory), restartable.
struct NatsServer {
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    /// Starts logged as ready so far (the log is appended across restarts).
    starts: usize,
}

fn nats_server_bin() -> String {
    if let Ok(b) = std::env::var("TANDEM_TEST_NATS_SERVER") {
        return b;
    }
    if std::path::Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server".into()
    } else {
        "nats-server".into()
    }
}

impl NatsServer {
    async fn start() -> anyhow::Result<Self> {
        let tag = unique("nats");
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&dir)?;
        let mut s = Self {
            port: free_port()?,
            log: std::env::temp_dir().join(format!("{tag}.log")),
            dir,
            child: None,
            starts: 0,
        };
        s.spawn().await?;
        Ok(s)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = tokio::process::Command::new(nats_server_bin())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawning nats-server (set TANDEM_TEST_NATS_SERVER)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = async_nats::connect(self.url()).await
                && c.flush().await.is_ok()
                && std::fs::read_to_string(&self.log)
                    .unwrap_or_default()
                    .matches("Server is ready")
                    .count()
                    > self.starts
            {
                self.starts += 1;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server on {} not ready; log:\n{}",
                    self.port,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A clean stop (SIGTERM: the server flushes its store), then a start on the same port and
    /// store directory.
    async fn restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().context("nats-server already reaped")?;
            std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()?;
            match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
                Ok(status) => {
                    status?;
                }
                Err(_) => child.kill().await?,
            }
        }
        tokio::time::sleep(down_for).await;
        self.spawn().await
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The gate kinds of the fleet test, round-robin over the gates. Times are in units `u` ms;
/// stale marking is at 3u, the env default policy expires after 2u and escalates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// Cancel at 1.5u: one expiry.
    Cancel,
    /// Reminder every u, cancel at 1.5u: one reminder, one expiry.
    CancelRemind,
    /// Escalate at 1.5u: one escalation (`escalated:1`), then stale at 3u.
    Escalate,
    /// Reminder every u, escalate at 2u: `reminder:1`, `escalated:2`, stale.
    EscalateRemind,
    /// Remind at 1.5u without interval: exactly one (expired) reminder, stale.
    RemindOnce,
    /// Remind every u, expiring at 1.5u: reminders forever (≥ u apart) until the test cancels
    /// the run; stale.
    RemindEvery,
    /// No policy: the env default (escalate at 2u), stale.
    Default,
    /// `expires_after_ms: 0`: no policy at all, only the stale marking.
    NoExpiry,
}

const KINDS: [Kind; 8] = [
    Kind::Cancel,
    Kind::CancelRemind,
    Kind::Escalate,
    Kind::EscalateRemind,
    Kind::RemindOnce,
    Kind::RemindEvery,
    Kind::Default,
    Kind::NoExpiry,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Cancel => "cancel",
            Kind::CancelRemind => "cancel_remind",
            Kind::Escalate => "escalate",
            Kind::EscalateRemind => "escalate_remind",
            Kind::RemindOnce => "remind_once",
            Kind::RemindEvery => "remind_every",
            Kind::Default => "default",
            Kind::NoExpiry => "no_expiry",
        }
    }

    fn policy(self, u: u64) -> Option<AutomationGateExpiryPolicy> {
        let h = u * 3 / 2;
        match self {
            Kind::Cancel => Some(policy(h, A::Cancel, None, None)),
            Kind::CancelRemind => Some(policy(h, A::Cancel, Some(u), None)),
            Kind::Escalate => Some(policy(h, A::Escalate, None, Some("risk-lead"))),
            Kind::EscalateRemind => Some(policy(2 * u, A::Escalate, Some(u), Some("risk-lead"))),
            Kind::RemindOnce => Some(policy(h, A::Remind, None, None)),
            Kind::RemindEvery => Some(policy(h, A::Remind, Some(u), None)),
            Kind::Default => None,
            Kind::NoExpiry => Some(AutomationGateExpiryPolicy {
                expires_after_ms: Some(0),
                ..Default::default()
            }),
        }
    }

    /// (reminders, escalations, expiries, stale markings); reminders `None`: open-ended.
    fn expected(self) -> (Option<u64>, u64, u64, u64) {
        match self {
            Kind::Cancel => (Some(0), 0, 1, 0),
            Kind::CancelRemind => (Some(1), 0, 1, 0),
            Kind::Escalate => (Some(0), 1, 0, 1),
            Kind::EscalateRemind => (Some(1), 1, 0, 1),
            Kind::RemindOnce => (Some(1), 0, 0, 1),
            Kind::RemindEvery => (None, 0, 0, 1),
            Kind::Default => (Some(0), 1, 0, 1),
            Kind::NoExpiry => (Some(0), 0, 0, 1),
        }
    }
}

fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The fleet tests run one at a time: they measure timing-sensitive counts on a shared machine.
static FLEET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Default)]
struct PerRun {
    kind: Option<Kind>,
    requested_at_ms: u64,
    lifecycle: BTreeMap<String, i64>,
    audit: BTreeMap<String, i64>,
    outbox: BTreeMap<String, i64>,
    stream: BTreeMap<String, i64>,
    reminder_times: Vec<u64>,
    keys_db: Vec<String>,
    keys_stream: Vec<String>,
}

async fn fleet(chaos: bool) -> anyhow::Result<()> {
    let _serial = FLEET.lock().await;
    let gates = env_u64("TANDEM_GATE_FLEET_GATES", 1000) as usize;
    let u = env_u64("TANDEM_GATE_FLEET_UNIT_MS", 2000);
    let replicas = 3;
    let label = if chaos { "fleet-chaos" } else { "fleet" };

    let mut nats = NatsServer::start().await?;
    let (db, pool) = TestDb::migrated().await?;
    let prefix = unique("gf").replace('_', "-");
    let gate_defaults = GatePolicyDefaults {
        expires_after_ms: Some(2 * u),
        on_expiry: A::Escalate,
        stale_after_ms: 3 * u,
    };
    let store = StoreSettings::new(gate_defaults);
    tandem_store::insert_automation(&pool, &spec()).await?;

    let env = |port: u16, nats_url: String| -> Vec<(&'static str, String)> {
        vec![
            ("TANDEM_DATABASE_URL", db.url.clone()),
            ("TANDEM_NATS_URL", nats_url),
            ("TANDEM_NATS_PREFIX", prefix.clone()),
            ("TANDEM_HEALTH_ADDR", format!("127.0.0.1:{port}")),
            (
                "TANDEM_APPROVAL_GATE_DEFAULT_EXPIRES_AFTER_MS",
                (2 * u).to_string(),
            ),
            ("TANDEM_APPROVAL_GATE_DEFAULT_ON_EXPIRY", "escalate".into()),
            ("TANDEM_APPROVAL_GATE_STALE_AFTER_MS", (3 * u).to_string()),
            ("TANDEM_GATE_NOTIFIER_POLL_MS", "500".into()),
            ("TANDEM_OUTBOX_RELAY_LEASE_SECS", "5".into()),
            ("TANDEM_AUDIT_LINK_MS", "250".into()),
            ("RUST_LOG", "warn".into()),
        ]
    };
    let mut notifiers = Vec::new();
    for _ in 0..replicas {
        let port = free_port()?;
        let mut p = Proc::start("tandem-gate-notifier", &[], &env(port, nats.url()))?;
        p.wait_for_status(port, "/readyz", 200).await?;
        notifiers.push((p, port));
    }

    // Seed the gates while the fleet runs, each opened "now" by the database clock, announcing
    // them with wake-ups as the scheduler would.
    let started = Instant::now();
    let seeded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seeded_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let requested: Arc<tokio::sync::Mutex<HashMap<String, (Kind, u64)>>> = Arc::default();
    let seeders = 4;
    let mut seed_tasks = Vec::new();
    for s in 0..seeders {
        let (pool, seeded, seeded_ms, requested, nats_url, prefix) = (
            pool.clone(),
            seeded.clone(),
            seeded_ms.clone(),
            requested.clone(),
            nats.url(),
            Prefix::new(&prefix)?,
        );
        seed_tasks.push(tokio::spawn(async move {
            let client = async_nats::connect(nats_url).await.ok();
            let ids: Vec<usize> = (s..gates).step_by(seeders).collect();
            for chunk in ids.chunks(20) {
                let now = db_now(&pool).await?;
                for &i in chunk {
                    let kind = KINDS[i % KINDS.len()];
                    let id = format!("g{i:05}-{}", kind.name());
                    let run = awaiting_run(&id, now, kind.policy(u))?;
                    tandem_store::create_run(&pool, &run, &Effects::default(), &store).await?;
                    requested.lock().await.insert(id, (kind, now));
                    seeded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if let Some(c) = &client {
                    let _ = tandem_gate_notifier::wake_gate_notifiers(c, &prefix).await;
                }
            }
            seeded_ms.fetch_max(
                started.elapsed().as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            anyhow::Ok(())
        }));
    }

    // Chaos: kill -9 one notifier a third of the way, restart nats-server two thirds of the way,
    // restart the killed notifier once seeding is done.
    let mut kills = 0;
    let mut nats_restarts = 0;
    // Chaos, while gates are acting: kill -9 one notifier once a third is seeded and the first
    // reminders are due (u), restart nats-server once two thirds are seeded and expiries and
    // escalations are due (1.6u), restart the killed notifier once seeding is done.
    let mut nats_down: Option<(u64, u64)> = None;
    if chaos {
        let count = || seeded.load(std::sync::atomic::Ordering::Relaxed);
        let after = |f: f64| started + Duration::from_millis((u as f64 * f) as u64);
        wait_until("a third seeded", Duration::from_secs(300), async || {
            Ok(count() >= gates / 3 && Instant::now() >= after(1.0))
        })
        .await?;
        notifiers[0].0.sigkill().await?;
        kills += 1;
        wait_until("two thirds seeded", Duration::from_secs(300), async || {
            Ok(count() >= 2 * gates / 3 && Instant::now() >= after(1.6))
        })
        .await?;
        let down = db_now(&pool).await?;
        nats.restart(Duration::from_millis(1500)).await?;
        nats_down = Some((down, db_now(&pool).await?));
        nats_restarts += 1;
    }
    for t in seed_tasks {
        t.await??;
    }
    let seeded_in = Duration::from_millis(seeded_ms.load(std::sync::atomic::Ordering::Relaxed));
    if chaos {
        let port = free_port()?;
        let mut p = Proc::start("tandem-gate-notifier", &[], &env(port, nats.url()))?;
        p.wait_for_status(port, "/readyz", 200).await?;
        notifiers[0] = (p, port);
    }

    // Wait until every gate has nothing left to do but the repeating reminders.
    wait_until(
        "finite gate actions",
        Duration::from_secs(120) + 6 * Duration::from_millis(u),
        async || {
            let n: i64 = pool
                .get()
                .await?
                .query_one(
                    "SELECT count(*) FROM runs r
                      WHERE CASE WHEN r.run_id LIKE '%-remind_every'
                                 -- repeating: wait for its one stale marking
                                 THEN NOT EXISTS (SELECT 1 FROM run_lifecycle l
                                                   WHERE l.run_id = r.run_id
                                                     AND l.event = 'approval_gate_marked_stale')
                                 ELSE r.next_action_at_ms IS NOT NULL END",
                    &[],
                )
                .await?
                .get(0);
            Ok(n == 0)
        },
    )
    .await?;
    let actions_done_in = started.elapsed();

    // Stop the repeating reminders with a human cancel decision.
    let remind_every: Vec<String> = requested
        .lock()
        .await
        .iter()
        .filter(|(_, (k, _))| *k == Kind::RemindEvery)
        .map(|(id, _)| id.clone())
        .collect();
    let mut cancelled_at: HashMap<String, u64> = HashMap::new();
    for id in &remind_every {
        let a = decide(&pool, id, "cancel", gate_defaults).await?;
        ensure!(
            matches!(a.outcome, GateDecisionOutcome::Applied { .. }),
            "{id}: {:?}",
            a.outcome
        );
        cancelled_at.insert(id.clone(), a.now_ms);
    }

    // Everything published and linked.
    wait_until(
        "outbox published and audit linked",
        Duration::from_secs(180),
        async || {
            let row = pool
                .get()
                .await?
                .query_one(
                    "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL),
                        (SELECT count(*) FROM audit_log WHERE seq IS NULL)",
                    &[],
                )
                .await?;
            Ok(row.get::<_, i64>(0) == 0 && row.get::<_, i64>(1) == 0)
        },
    )
    .await?;
    let drained_in = started.elapsed();
    let chain = tandem_store::verify_audit_chain(&pool).await?;

    // What the replicas measured: actions by kind and how late they were (due → committed).
    let mut replica_metrics = Vec::new();
    for (_, port) in &notifiers {
        let (_, body) = http_get(*port, "/metrics").await?;
        let mut summary = Vec::new();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let label = |key: &str| {
                series
                    .split_once(&format!("{key}=\""))
                    .and_then(|(_, rest)| rest.split_once('"'))
                    .map(|(v, _)| v.to_owned())
            };
            if series.starts_with("tandem_gate_notifier_actions_total")
                && let Some(action) = label("action")
            {
                summary.push(format!("{action}={value}"));
            } else if series.starts_with("tandem_gate_notifier_action_lag_seconds{")
                && let Some(q) = label("quantile")
                && ["0.5", "0.99", "1"].contains(&q.as_str())
            {
                let ms = value.parse::<f64>().unwrap_or(f64::NAN) * 1000.0;
                summary.push(format!("lag_q{q}={ms:.0}ms"));
            }
        }
        let lines = summary;
        replica_metrics.push(lines.join(" "));
    }

    // Stop the fleet: SIGTERM, exit 0.
    for (p, _) in &mut notifiers {
        p.sigterm()?;
        let status = p.wait(EXIT_TIMEOUT).await?;
        ensure!(
            status.success(),
            "{} exited with {status}; stderr:\n{}",
            p.name,
            p.stderr()
        );
    }

    // Count everything per run.
    let requested = requested.lock().await.clone();
    let mut runs: HashMap<String, PerRun> = requested
        .iter()
        .map(|(id, (k, at))| {
            (
                id.clone(),
                PerRun {
                    kind: Some(*k),
                    requested_at_ms: *at,
                    ..PerRun::default()
                },
            )
        })
        .collect();
    let c = pool.get().await?;
    for r in c
        .query(
            "SELECT run_id, event, count(*) FROM run_lifecycle GROUP BY 1, 2",
            &[],
        )
        .await?
    {
        let e = runs.entry(r.get(0)).or_default();
        e.lifecycle.insert(r.get(1), r.get(2));
    }
    for r in c
        .query(
            "SELECT run_id, recorded_at_ms FROM run_lifecycle
              WHERE event = 'approval_gate_reminder_due' ORDER BY run_id, id",
            &[],
        )
        .await?
    {
        let t: i64 = r.get(1);
        runs.entry(r.get(0))
            .or_default()
            .reminder_times
            .push(u64::try_from(t)?);
    }
    for r in c
        .query(
            "SELECT coalesce(payload->>'run_id', payload->>'runID'), event_type, count(*)
               FROM audit_log GROUP BY 1, 2",
            &[],
        )
        .await?
    {
        let id: Option<String> = r.get(0);
        let e = runs.entry(id.unwrap_or_default()).or_default();
        e.audit.insert(r.get(1), r.get(2));
    }
    let mut outbox_total = 0;
    for r in c
        .query("SELECT run_id, event_type, dedupe_id FROM outbox", &[])
        .await?
    {
        outbox_total += 1;
        let e = runs.entry(r.get(0)).or_default();
        let t: String = r.get(1);
        if t == "approval.gate.reminder_due" || t == "approval.gate.escalated" {
            e.keys_db.push(r.get(2));
        }
        *e.outbox.entry(t).or_default() += 1;
    }
    drop(c);

    // The stream, after a restart of its server in the chaos variant.
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let messages = read_stream(&js, &StreamNames::new(&Prefix::new(&prefix)?).events).await?;
    let mut by_id: HashMap<String, u32> = HashMap::new();
    let mut by_payload: HashMap<String, u32> = HashMap::new();
    let mut id_mismatch = Vec::new();
    for (id, _subject, p) in &messages {
        *by_id.entry(id.clone()).or_default() += 1;
        let t = p["type"].as_str().unwrap_or_default().to_owned();
        let run_id = p["properties"]["run_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let payload_key = match t.as_str() {
            "approval.gate.reminder_due" | "approval.gate.escalated" => {
                let node = p["properties"]["node_id"].as_str().unwrap_or_default();
                runs.entry(run_id.clone())
                    .or_default()
                    .keys_stream
                    .push(id.clone());
                if t == "approval.gate.reminder_due" {
                    // A reminder names its count: the key follows from the payload.
                    let n = p["properties"]["reminder_count"].as_u64().unwrap_or(0);
                    let key = tandem_core::gate::notification_key(&run_id, node, "reminder", n);
                    if &key != id {
                        id_mismatch.push(format!("{id} carries {key}"));
                    }
                    key
                } else {
                    // An escalation's properties carry no count (spec §3.10): one per gate
                    // instance, identified by its expiry time.
                    let prefix = format!("automation_v2:{run_id}:{node}:escalated:");
                    if !id.starts_with(&prefix) {
                        id_mismatch.push(format!("{id} is not an escalation key of {run_id}"));
                    }
                    format!("{prefix}{}", p["properties"]["expires_at_ms"])
                }
            }
            _ => p["envelope"]["event_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        };
        *by_payload.entry(payload_key).or_default() += 1;
        *runs.entry(run_id).or_default().stream.entry(t).or_default() += 1;
    }
    let dup_ids = by_id.values().filter(|n| **n > 1).count();
    let dup_payloads = by_payload.values().filter(|n| **n > 1).count();

    // Compare with the policy.
    let mut wrong = Vec::new();
    let mut totals: BTreeMap<&str, i64> = BTreeMap::new();
    let mut reminders_every = Vec::new();
    for (id, r) in &runs {
        let Some(kind) = r.kind else {
            wrong.push(format!("{id}: records of an unknown run"));
            continue;
        };
        let l = |e: &str| r.lifecycle.get(e).copied().unwrap_or(0);
        let a = |e: &str| r.audit.get(e).copied().unwrap_or(0);
        let o = |e: &str| r.outbox.get(e).copied().unwrap_or(0);
        let s = |e: &str| r.stream.get(e).copied().unwrap_or(0);
        let (reminders, escalations, expiries, stale) = kind.expected();
        let got_reminders = l("approval_gate_reminder_due") as u64;
        match reminders {
            Some(n) if n != got_reminders => {
                wrong.push(format!("{id}: {got_reminders} reminders, want {n}"));
            }
            Some(_) => {}
            None => {
                // Repeating: at least the first one and one after expiry, never closer than u,
                // never more than fit before the cancel.
                let until = cancelled_at.get(id).copied().unwrap_or(0);
                let max = until.saturating_sub(r.requested_at_ms) / u;
                reminders_every.push(got_reminders);
                if got_reminders < 2 || got_reminders > max {
                    wrong.push(format!(
                        "{id}: {got_reminders} reminders, want 2..={max} before the cancel"
                    ));
                }
                let mut prev = r.requested_at_ms;
                for t in &r.reminder_times {
                    if *t < prev + u {
                        wrong.push(format!("{id}: reminder {} ms after the previous", t - prev));
                    }
                    prev = *t;
                }
            }
        }
        let want_cancel = expiries + u64::from(kind == Kind::RemindEvery);
        for (what, got, want) in [
            (
                "escalations",
                l("approval_gate_escalated") as u64,
                escalations,
            ),
            ("expiries", l("approval_gate_expired") as u64, expiries),
            ("run_cancelled", l("run_cancelled") as u64, want_cancel),
            ("stale", l("approval_gate_marked_stale") as u64, stale),
        ] {
            if got != want {
                wrong.push(format!("{id}: {got} {what}, want {want}"));
            }
        }
        // Audit, outbox and stream agree with the lifecycle, one for one.
        for (lc, audit, event) in [
            (
                "approval_gate_reminder_due",
                "automation_v2.internal_sweep.approval_gate_reminder_due",
                Some("approval.gate.reminder_due"),
            ),
            (
                "approval_gate_escalated",
                "automation_v2.internal_sweep.approval_gate_escalated",
                Some("approval.gate.escalated"),
            ),
            (
                "approval_gate_expired",
                "automation_v2.internal_sweep.approval_gate_expired",
                Some("approval.gate.expired"),
            ),
            (
                "approval_gate_marked_stale",
                "automation_v2.internal_sweep.approval_gate_marked_stale",
                None,
            ),
        ] {
            let n = l(lc);
            *totals.entry(lc).or_default() += n;
            if a(audit) != n {
                wrong.push(format!("{id}: {} {audit} audits for {n} {lc}", a(audit)));
            }
            if let Some(event) = event
                && (o(event) != n || s(event) != n)
            {
                wrong.push(format!(
                    "{id}: {n} {lc} but {} outbox rows and {} stream messages",
                    o(event),
                    s(event)
                ));
            }
        }
        let decided = i64::from(kind == Kind::RemindEvery);
        if a("automation.governance.gate_decided") != decided
            || o("approval.decision.recorded") != decided
            || s("approval.decision.recorded") != decided
        {
            wrong.push(format!("{id}: decision records do not match"));
        }
        // Keys: the shared count runs 1..=n without gaps, each key once in the DB and on the
        // stream.
        let mut db_keys = r.keys_db.clone();
        db_keys.sort();
        let mut stream_keys = r.keys_stream.clone();
        stream_keys.sort();
        if db_keys != stream_keys {
            wrong.push(format!("{id}: keys {db_keys:?} vs stream {stream_keys:?}"));
        }
        let mut counts: Vec<u64> = db_keys
            .iter()
            .filter_map(|k| k.rsplit(':').next().and_then(|n| n.parse().ok()))
            .collect();
        counts.sort_unstable();
        if counts != (1..=counts.len() as u64).collect::<Vec<_>>() {
            wrong.push(format!("{id}: notification counts {counts:?}"));
        }
    }
    let mut acted_while_nats_down = 0;
    if let Some((from, to)) = nats_down {
        let (from, to) = (i64::try_from(from)?, i64::try_from(to)?);
        acted_while_nats_down = pool
            .get()
            .await?
            .query_one(
                "SELECT count(*) FROM run_lifecycle WHERE recorded_at_ms BETWEEN $1 AND $2",
                &[&from, &to],
            )
            .await?
            .get::<_, i64>(0);
    }
    let lost = runs.len().saturating_sub(gates);
    let stream_total = messages.len();
    reminders_every.sort_unstable();
    println!(
        "{label}: gates={gates} unit_ms={u} notifiers={replicas} kills={kills} \
         nats_restarts={nats_restarts} acted_while_nats_down={acted_while_nats_down} seeded_s={:.1} actions_done_s={:.1} drained_s={:.1} \
         lifecycle={totals:?} outbox={outbox_total} stream={stream_total} \
         duplicate_ids={dup_ids} duplicate_payloads={dup_payloads} id_mismatch={} \
         wrong={} unknown_runs={lost} remind_every_reminders(min/median/max)={:?}/{:?}/{:?} \
         audit_chain={chain:?}",
        seeded_in.as_secs_f64(),
        actions_done_in.as_secs_f64(),
        drained_in.as_secs_f64(),
        id_mismatch.len(),
        wrong.len(),
        reminders_every.first(),
        reminders_every.get(reminders_every.len() / 2),
        reminders_every.last(),
    );
    for (i, m) in replica_metrics.iter().enumerate() {
        println!("{label}: replica {i}: {m}");
    }
    ensure!(
        wrong.is_empty(),
        "{} runs off their policy, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    ensure!(dup_ids == 0, "{dup_ids} Nats-Msg-Ids stored more than once");
    ensure!(
        !chaos || acted_while_nats_down > 0,
        "no gate acted while NATS was down: the chaos missed the run"
    );
    ensure!(
        dup_payloads == 0,
        "{dup_payloads} events stored more than once"
    );
    ensure!(id_mismatch.is_empty(), "{:?}", &id_mismatch[..]);
    ensure!(
        stream_total == outbox_total,
        "{stream_total} stream messages for {outbox_total} outbox rows"
    );
    let audit_rows: i64 = pool
        .get()
        .await?
        .query_one("SELECT count(*) FROM audit_log", &[])
        .await?
        .get(0);
    ensure!(
        chain == Ok(u64::try_from(audit_rows)?),
        "audit chain {chain:?} for {audit_rows} rows"
    );

    let _ = js
        .delete_stream(StreamNames::new(&Prefix::new(&prefix)?).events)
        .await;
    drop(pool);
    drop(nats);
    db.drop_db().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_of_three_notifiers_acts_once_per_gate_step() -> anyhow::Result<()> {
    fleet(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_stays_exact_through_a_notifier_kill_and_a_nats_restart() -> anyhow::Result<()> {
    fleet(true).await
}
