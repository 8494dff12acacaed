-- The fleet-wide count of `running` runs (TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS) as a ledger of
-- deltas, so a claim reads the count in O(1) instead of counting every running run (O(running)
-- per claim pass, the largest cost of a claim when thousands of runs are running).
--
-- Triggers on `runs` append +1 / -1 for every row entering or leaving `running`, in the writing
-- transaction, so the ledger's sum is the count as of any snapshot, exactly as `count(*)` would
-- see it; every write path (scheduler, sweeper, api, an operator's SQL) is covered. Appends never
-- contend on a shared row. The claimer, which holds the claim lock, folds the committed deltas
-- into one row on every pass, so the ledger stays a handful of rows.
CREATE TABLE running_count_ledger (
    delta bigint NOT NULL
) WITH (
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_scale_factor = 0
);

CREATE FUNCTION running_count_ledger_track() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.status = 'running' THEN
        INSERT INTO running_count_ledger (delta) VALUES (-1);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.status = 'running' THEN
        INSERT INTO running_count_ledger (delta) VALUES (1);
    END IF;
    RETURN NULL;
END
$$;

LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE;

-- WHEN clauses keep the function off every write that does not enter or leave `running`
-- (activity bumps, gate writes, queued-run inserts).
CREATE TRIGGER running_count_ledger_insert AFTER INSERT ON runs
    FOR EACH ROW WHEN (NEW.status = 'running')
    EXECUTE FUNCTION running_count_ledger_track();
CREATE TRIGGER running_count_ledger_update AFTER UPDATE OF status ON runs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       AND (OLD.status = 'running' OR NEW.status = 'running'))
    EXECUTE FUNCTION running_count_ledger_track();
CREATE TRIGGER running_count_ledger_delete AFTER DELETE ON runs
    FOR EACH ROW WHEN (OLD.status = 'running')
    EXECUTE FUNCTION running_count_ledger_track();

-- Opening balance (writers of `runs` are held off since the first CREATE TRIGGER, so no change
-- falls between the triggers and the count).
INSERT INTO running_count_ledger (delta)
    SELECT count(*) FROM runs WHERE status = 'running';
