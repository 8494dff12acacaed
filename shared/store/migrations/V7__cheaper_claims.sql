-- Tandem Fleet schema, version 7: fewer writes per claimed run, one round trip per reservation.
--
-- A claim writes each run's row, its lifecycle records and its task's outbox row. This migration
-- removes work that every one of those rows paid for without needing it.

-- 1. The running-count ledger (V4) gets one delta row per statement instead of one per changed
--    row: statement-level triggers read the statement's transition tables, so a claim of 256
--    runs appends one `+256` row (and runs one trigger) instead of 256 `+1` rows. The sum, and
--    so the count every snapshot sees, is unchanged.
LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE;

DROP TRIGGER running_count_ledger_insert ON runs;
DROP TRIGGER running_count_ledger_update ON runs;
DROP TRIGGER running_count_ledger_delete ON runs;
DROP FUNCTION running_count_ledger_track();

CREATE FUNCTION running_count_ledger_track() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    delta bigint := 0;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        delta := delta + (SELECT count(*) FROM new_runs WHERE status = 'running');
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        delta := delta - (SELECT count(*) FROM old_runs WHERE status = 'running');
    END IF;
    IF delta <> 0 THEN
        INSERT INTO running_count_ledger (delta) VALUES (delta);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER running_count_ledger_insert AFTER INSERT ON runs
    REFERENCING NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION running_count_ledger_track();
CREATE TRIGGER running_count_ledger_update AFTER UPDATE ON runs
    REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs
    FOR EACH STATEMENT EXECUTE FUNCTION running_count_ledger_track();
CREATE TRIGGER running_count_ledger_delete AFTER DELETE ON runs
    REFERENCING OLD TABLE AS old_runs
    FOR EACH STATEMENT EXECUTE FUNCTION running_count_ledger_track();

-- 2. Lifecycle records: no foreign-key check per inserted record (a query and a row lock on the
--    run each), and one index instead of two. Records are only written by the store in the same
--    transaction as their run's row; deleting a run still deletes its records (a statement
--    trigger instead of ON DELETE CASCADE). The primary key is (run_id, id), the order the
--    history is read in.
ALTER TABLE run_lifecycle DROP CONSTRAINT run_lifecycle_run_id_fkey;
ALTER TABLE run_lifecycle DROP CONSTRAINT run_lifecycle_pkey;
ALTER TABLE run_lifecycle ADD CONSTRAINT run_lifecycle_pkey PRIMARY KEY (run_id, id);
DROP INDEX run_lifecycle_run_idx;

CREATE FUNCTION run_lifecycle_delete_with_run() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM run_lifecycle l USING old_runs o WHERE l.run_id = o.run_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER run_lifecycle_delete_with_run AFTER DELETE ON runs
    REFERENCING OLD TABLE AS old_runs
    FOR EACH STATEMENT EXECUTE FUNCTION run_lifecycle_delete_with_run();

-- 3. Outbox rows: `event_id` is generated per row (UUIDv7) and never looked up, so its unique
--    index only cost an insert on every write and on every published mark. Free space per page
--    lets the relay's lease (an unindexed column) be a HOT update.
ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key;
ALTER TABLE outbox SET (fillfactor = 80);

-- 4. The claim's capacity reservation in one statement (one round trip, its own transaction),
--    instead of seven: nothing queued → no lock and no reservation; otherwise, under the claim
--    lock, fold the ledger (running, reserved) and reserve up to `batch` free slots for `secs`.
--    Not durable on purpose (synchronous_commit off): a reservation lost in a crash only frees
--    its slots.
CREATE FUNCTION tandem_running_count(OUT running bigint, OUT reserved bigint)
LANGUAGE sql AS $$
    WITH expired AS (DELETE FROM running_count_ledger
                      WHERE reservation_id IS NOT NULL AND reservation_expires_at < now()),
         folded AS (DELETE FROM running_count_ledger WHERE reservation_id IS NULL
                    RETURNING delta),
         balance AS (INSERT INTO running_count_ledger (delta)
                     SELECT coalesce(sum(delta), 0) FROM folded)
    SELECT (SELECT coalesce(sum(delta), 0) FROM folded)::bigint,
           (SELECT coalesce(sum(delta), 0) FROM running_count_ledger
             WHERE reservation_id IS NOT NULL AND reservation_expires_at >= now())::bigint
$$;

CREATE FUNCTION tandem_reserve_capacity(
    lock_key bigint, batch bigint, cap bigint, secs double precision,
    OUT queued boolean, OUT running bigint, OUT slots bigint, OUT reservation_id uuid)
LANGUAGE plpgsql AS $$
DECLARE
    reserved bigint;
BEGIN
    queued := EXISTS (SELECT 1 FROM runs WHERE status = 'queued');
    running := 0;
    slots := 0;
    IF NOT queued THEN
        RETURN;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT c.running, c.reserved INTO running, reserved FROM tandem_running_count() c;
    slots := least(greatest(cap - running - reserved, 0), batch);
    IF slots > 0 THEN
        reservation_id := gen_random_uuid();
        INSERT INTO running_count_ledger (delta, reservation_id, reservation_expires_at)
            VALUES (slots, reservation_id, now() + make_interval(secs => secs));
    END IF;
END
$$;
