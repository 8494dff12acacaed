-- Capacity reservations: a claim reserves its slots in a short transaction under the claim lock
-- (a ledger row with `reservation_id`, counted against TANDEM_SCHEDULER_MAX_CONCURRENT_RUNS
-- until it expires), then claims without the fleet-wide lock, so replicas claim concurrently.
-- The claim transaction deletes its reservation in the same commit as the claims it makes (whose
-- +1 deltas the triggers append), and rolls back if the reservation is gone (expired and
-- reclaimed), so capacity is never exceeded.
ALTER TABLE running_count_ledger
    ADD COLUMN reservation_id uuid,
    ADD COLUMN reservation_expires_at timestamptz;
