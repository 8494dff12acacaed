-- Tandem Fleet schema, version 2: task dispatch through the outbox, and relay leases.
--
-- An outbox row is now either an engine event (published to
-- `tandem.events.<org>.<workspace>.<event.type>`, as in V1) or a node task for workers (published
-- to `tandem.tasks.<task_queue>`, `Nats-Msg-Id` = the task id `run:node:attempt:epoch`). The subject
-- prefix is the fleet's configuration, so rows store what the subject is built from, not the
-- subject itself. Rows written by V1 binaries are events.
ALTER TABLE outbox
    ADD COLUMN subject_kind text NOT NULL DEFAULT 'event'
        CHECK (subject_kind IN ('event', 'task')),
    ADD COLUMN task_queue text,
    -- A relay that took the row to publish it holds it until then (see the relay in
    -- shared/runtime): other relays skip the row, and the run's later rows, until it expires.
    ADD COLUMN relay_lease_until timestamptz,
    ADD CONSTRAINT outbox_task_queue_check CHECK ((subject_kind = 'task') = (task_queue IS NOT NULL));

-- Per-run publish order: a relay publishes a run's rows in id order, starting at the run's oldest
-- unpublished row, so it looks that row up per run.
CREATE INDEX outbox_run_unpublished_idx ON outbox (run_id, id) WHERE published_at IS NULL;
