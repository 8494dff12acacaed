-- Tandem Fleet schema, version 1.
--
-- Conventions: timestamps that the run model carries are bigint milliseconds since the Unix epoch
-- (the model's u64 `Millis`), always taken from the database clock; bookkeeping-only timestamps
-- are timestamptz. Statuses are text with CHECK constraints (adding a value is a plain migration).

-- Automation definitions. `spec` is the full upstream `AutomationV2Spec` JSON; the tenant and the
-- status are copied out so they can be filtered without parsing JSON.
CREATE TABLE automations (
    automation_id  text        PRIMARY KEY,
    org_id         text        NOT NULL,
    workspace_id   text        NOT NULL,
    status         text        NOT NULL CHECK (status IN ('active', 'paused', 'draft')),
    spec           jsonb       NOT NULL,
    created_at_ms  bigint      NOT NULL,
    updated_at_ms  bigint      NOT NULL
);
CREATE INDEX automations_tenant_idx ON automations (org_id, workspace_id, automation_id);

-- Runs: a small hot row. `doc` is the `AutomationV2RunRecord` JSON without
-- `checkpoint.lifecycle_history` (append-only, kept in run_lifecycle so a transition never
-- rewrites history). Every other column is derived from the record by the store on each write,
-- except `lease_epoch` (the fencing token, bumped by claims) and `activity_at_ms` (worker
-- progress). `activity_at_ms` is deliberately in no index so heartbeats can be HOT updates, which
-- is also why the table keeps 20 % free space per page.
CREATE TABLE runs (
    run_id             text    PRIMARY KEY,
    automation_id      text    NOT NULL,
    org_id             text    NOT NULL,
    workspace_id       text    NOT NULL,
    status             text    NOT NULL CHECK (status IN (
                           'queued', 'running', 'pausing', 'paused', 'awaiting_approval',
                           'completed', 'blocked', 'failed', 'cancelled')),
    lease_epoch        bigint  NOT NULL DEFAULT 0 CHECK (lease_epoch >= 0),
    workspace_root     text,
    created_at_ms      bigint  NOT NULL,
    updated_at_ms      bigint  NOT NULL,
    activity_at_ms     bigint  NOT NULL,
    next_action_at_ms  bigint,
    stop_kind          text    CHECK (stop_kind IN (
                           'cancelled', 'operator_stopped', 'guardrail_stopped', 'panic',
                           'shutdown', 'server_restart', 'stale_reaped')),
    doc                jsonb   NOT NULL
) WITH (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 50,
    autovacuum_analyze_scale_factor = 0.02
);

-- The claim queue. Queries must spell `status = 'queued'` literally so generic plans still match.
CREATE INDEX runs_queued_idx ON runs (created_at_ms, run_id) WHERE status = 'queued';
-- Gates due for the gate-notifier: O(due), not O(all awaiting gates).
CREATE INDEX runs_due_gate_idx ON runs (next_action_at_ms) WHERE status = 'awaiting_approval';
-- The workspace lock: at most one running|pausing run per workspace root, enforced here rather
-- than by check-then-act in N schedulers.
CREATE UNIQUE INDEX runs_workspace_lock_idx ON runs (workspace_root)
    WHERE status IN ('running', 'pausing') AND workspace_root IS NOT NULL;
-- Runs holding a claim, for the stale reaper and capacity counts (keyed on the immutable run_id
-- so activity updates stay HOT).
CREATE INDEX runs_active_idx ON runs (run_id) WHERE status IN ('running', 'pausing');
-- Listing by status (API, approvals, retention of terminal runs).
CREATE INDEX runs_status_idx ON runs (status, updated_at_ms);
-- Runs of one automation, newest first.
CREATE INDEX runs_automation_idx ON runs (automation_id, created_at_ms DESC);
-- Tenant-scoped listing.
CREATE INDEX runs_tenant_idx ON runs (org_id, workspace_id, created_at_ms DESC);

-- Lifecycle history, append-only: one row per `AutomationLifecycleRecord`, in `id` order.
CREATE TABLE run_lifecycle (
    id              bigserial  PRIMARY KEY,
    run_id          text       NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    event           text       NOT NULL,
    recorded_at_ms  bigint     NOT NULL,
    record          jsonb      NOT NULL
);
CREATE INDEX run_lifecycle_run_idx ON run_lifecycle (run_id, id);

CREATE FUNCTION tandem_reject_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: rows cannot be updated', TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER run_lifecycle_append_only
    BEFORE UPDATE ON run_lifecycle
    FOR EACH ROW EXECUTE FUNCTION tandem_reject_update();

-- Transactional outbox: written in the same transaction as the state change, published to
-- JetStream by the relay with `Nats-Msg-Id` = dedupe_id, then marked published.
CREATE TABLE outbox (
    id            bigserial    PRIMARY KEY,
    event_id      uuid         NOT NULL UNIQUE,
    run_id        text         NOT NULL,
    event_type    text         NOT NULL,
    org_id        text         NOT NULL,
    workspace_id  text         NOT NULL,
    dedupe_id     text         NOT NULL,
    payload       jsonb        NOT NULL,
    created_at    timestamptz  NOT NULL DEFAULT now(),
    published_at  timestamptz
) WITH (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 50,
    autovacuum_analyze_scale_factor = 0.02
);
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published_idx ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Protected audit log: one hash chain (spec §1.14) across all replicas. Writers insert rows
-- unlinked (seq, prev_hash, record_hash NULL) inside their own transaction; a single chainer
-- links them in id order, so gate actions never serialize on the chain at write time.
CREATE TABLE audit_log (
    id             bigserial  PRIMARY KEY,
    event_id       uuid       NOT NULL UNIQUE,
    durability     text       NOT NULL,
    event_type     text       NOT NULL,
    tenant         jsonb      NOT NULL,
    actor          text,
    payload        jsonb      NOT NULL,
    created_at_ms  bigint     NOT NULL,
    seq            bigint     UNIQUE CHECK (seq >= 1),
    prev_hash      text,
    record_hash    text,
    CHECK ((seq IS NULL) = (record_hash IS NULL)),
    CHECK (seq IS NOT NULL OR prev_hash IS NULL)
);
CREATE INDEX audit_log_unlinked_idx ON audit_log (id) WHERE seq IS NULL;

-- Linked audit rows are immutable; the only permitted update is linking an unlinked row.
-- (A table owner can still disable this trigger: verification is what detects tampering.)
CREATE FUNCTION tandem_audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.seq IS NOT NULL THEN
            RAISE EXCEPTION 'audit_log row % is linked into the chain and cannot be deleted', OLD.seq
                USING ERRCODE = 'restrict_violation';
        END IF;
        RETURN OLD;
    END IF;
    IF OLD.seq IS NOT NULL
       OR NEW.id IS DISTINCT FROM OLD.id
       OR NEW.event_id IS DISTINCT FROM OLD.event_id
       OR NEW.durability IS DISTINCT FROM OLD.durability
       OR NEW.event_type IS DISTINCT FROM OLD.event_type
       OR NEW.tenant IS DISTINCT FROM OLD.tenant
       OR NEW.actor IS DISTINCT FROM OLD.actor
       OR NEW.payload IS DISTINCT FROM OLD.payload
       OR NEW.created_at_ms IS DISTINCT FROM OLD.created_at_ms THEN
        RAISE EXCEPTION 'audit_log is append-only: only linking an unlinked row is allowed'
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER audit_log_guard
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION tandem_audit_guard();

-- The chain head: the last linked seq and its hash. One row.
CREATE TABLE audit_chain_head (
    singleton    boolean      PRIMARY KEY DEFAULT true CHECK (singleton),
    seq          bigint       NOT NULL DEFAULT 0 CHECK (seq >= 0),
    record_hash  text,
    updated_at   timestamptz  NOT NULL DEFAULT now()
);
INSERT INTO audit_chain_head DEFAULT VALUES;

-- Governance (spec §3.5), shared by every replica.
CREATE TABLE spend_caps (
    org_id          text              NOT NULL,
    workspace_id    text              NOT NULL,
    agent_id        text              NOT NULL,
    weekly_cap_usd  double precision  NOT NULL CHECK (weekly_cap_usd >= 0),
    updated_at      timestamptz       NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, workspace_id, agent_id)
);

-- Spend-paused agents, keyed by `governance_agent_scope_key`.
CREATE TABLE spend_pauses (
    agent_key  text         PRIMARY KEY,
    reason     text,
    paused_at  timestamptz  NOT NULL DEFAULT now()
);

CREATE TABLE quota_overrides (
    id             uuid         PRIMARY KEY,
    agent_key      text         NOT NULL,
    status         text         NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'revoked')),
    expires_at_ms  bigint       NOT NULL,
    approved_by    text,
    reason         text,
    created_at     timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX quota_overrides_approved_idx ON quota_overrides (agent_key, expires_at_ms)
    WHERE status = 'approved';
