-- Tandem Fleet schema, version 8: the scheduler's periodic re-evaluation finds the claimed runs
-- with a runtime budget from a column instead of parsing every claimed run's document.
--
-- `has_runtime_budget` says whether the run's snapshot sets `execution.max_total_runtime_ms`.
-- The store derives it from the record on every write, like the other hot columns, so only the
-- runs claimed right now need a backfill (a queued run gets it when its claim writes the row).
-- Not indexed: the re-evaluation reads the claimed runs anyway (for their activity), and an
-- unindexed column keeps progress and heartbeat writes HOT.
ALTER TABLE runs ADD COLUMN has_runtime_budget boolean NOT NULL DEFAULT false;

UPDATE runs SET has_runtime_budget = true
 WHERE status IN ('running', 'pausing')
   AND jsonb_typeof(doc -> 'automation_snapshot' -> 'execution' -> 'max_total_runtime_ms')
       = 'number';
