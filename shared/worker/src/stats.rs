//! Counters of one worker, readable while it runs ([`StatsHandle::snapshot`]). The same events
//! are also exported as Prometheus metrics through the `metrics` facade (see the crate docs).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

/// A snapshot of a worker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Messages received from the task consumers (including redeliveries and malformed ones).
    pub received: u64,
    /// Handler runs started.
    pub started: u64,
    /// Results stored by JetStream (PubAck received), first publishes and re-publishes.
    pub results_published: u64,
    /// Of those, PubAcks that said `duplicate` (the same task id was already stored).
    pub duplicate_results: u64,
    /// Redeliveries answered from the completed-results cache without running the handler.
    pub republished: u64,
    /// Tasks acknowledged after their result (or cancel) was settled.
    pub acked: u64,
    /// Tasks stopped by a cancel hint (acknowledged without a result).
    pub cancelled: u64,
    /// Tasks failed because their deadline passed.
    pub deadline_exceeded: u64,
    /// Messages copied to the dead-letter subject (malformed, or too many deliveries).
    pub deadlettered: u64,
    /// Handlers that panicked (reported as `failed`).
    pub handler_panics: u64,
    /// Tasks handed back to the queue (negative acknowledgement).
    pub nacked: u64,
    /// Acknowledgements the server did not confirm.
    pub ack_errors: u64,
    /// Result publishes that failed (each retry counts).
    pub publish_errors: u64,
    /// Heartbeats sent on `tandem.progress.<run_id>`.
    pub heartbeats: u64,
    /// Tasks running now.
    pub in_flight: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub received: AtomicU64,
    pub started: AtomicU64,
    pub results_published: AtomicU64,
    pub duplicate_results: AtomicU64,
    pub republished: AtomicU64,
    pub acked: AtomicU64,
    pub cancelled: AtomicU64,
    pub deadline_exceeded: AtomicU64,
    pub deadlettered: AtomicU64,
    pub handler_panics: AtomicU64,
    pub nacked: AtomicU64,
    pub ack_errors: AtomicU64,
    pub publish_errors: AtomicU64,
    pub heartbeats: AtomicU64,
    pub in_flight: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A cheap, cloneable view of a worker's counters.
#[derive(Debug, Clone, Default)]
pub struct StatsHandle(pub(crate) Arc<Counters>);

impl StatsHandle {
    pub fn snapshot(&self) -> WorkerStats {
        let c = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkerStats {
            received: get(&c.received),
            started: get(&c.started),
            results_published: get(&c.results_published),
            duplicate_results: get(&c.duplicate_results),
            republished: get(&c.republished),
            acked: get(&c.acked),
            cancelled: get(&c.cancelled),
            deadline_exceeded: get(&c.deadline_exceeded),
            deadlettered: get(&c.deadlettered),
            handler_panics: get(&c.handler_panics),
            nacked: get(&c.nacked),
            ack_errors: get(&c.ack_errors),
            publish_errors: get(&c.publish_errors),
            heartbeats: get(&c.heartbeats),
            in_flight: get(&c.in_flight),
        }
    }
}
