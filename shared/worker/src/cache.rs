//! Results this process computed recently, by task id: a redelivered task whose result is here is
//! answered by re-publishing the same result (JetStream drops it as a duplicate inside its window;
//! the scheduler's fence drops it after) instead of running the handler again.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use tandem_core::protocol::TaskStatus;
use tokio::time::Instant;

/// A result as it was (or is about to be) published.
#[derive(Debug, Clone)]
pub(crate) struct CachedResult {
    pub run_id: String,
    pub status: TaskStatus,
    pub payload: Bytes,
    pub traceparent: Option<String>,
}

/// Bounded by entries and by age; the oldest entries go first.
#[derive(Debug)]
pub(crate) struct CompletedCache {
    map: HashMap<String, (Instant, Arc<CachedResult>)>,
    order: VecDeque<(Instant, String)>,
    capacity: usize,
    ttl: Duration,
}

impl CompletedCache {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            ttl,
        }
    }

    pub fn insert(&mut self, task_id: String, result: Arc<CachedResult>, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        self.order.push_back((now, task_id.clone()));
        self.map.insert(task_id, (now, result));
        self.evict(now);
    }

    pub fn get(&mut self, task_id: &str, now: Instant) -> Option<Arc<CachedResult>> {
        self.evict(now);
        self.map.get(task_id).map(|(_, r)| Arc::clone(r))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn evict(&mut self, now: Instant) {
        while let Some((at, id)) = self.order.front() {
            let expired = now.saturating_duration_since(*at) >= self.ttl;
            if !expired && self.map.len() <= self.capacity && self.order.len() <= 2 * self.capacity
            {
                break;
            }
            // Only remove the map entry this order entry belongs to (an id inserted again later
            // has a newer order entry).
            if self.map.get(id).is_some_and(|(t, _)| t == at) {
                self.map.remove(id);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result() -> Arc<CachedResult> {
        Arc::new(CachedResult {
            run_id: "r".into(),
            status: TaskStatus::Completed,
            payload: Bytes::from_static(b"{}"),
            traceparent: None,
        })
    }

    #[test]
    fn bounded_by_capacity_and_age() {
        let t0 = Instant::now();
        let mut c = CompletedCache::new(2, Duration::from_secs(10));
        c.insert("a".into(), result(), t0);
        c.insert("b".into(), result(), t0);
        c.insert("c".into(), result(), t0);
        assert_eq!(c.len(), 2);
        assert!(c.get("a", t0).is_none(), "oldest evicted");
        assert!(c.get("b", t0).is_some());
        assert!(c.get("c", t0 + Duration::from_secs(9)).is_some());
        assert!(
            c.get("c", t0 + Duration::from_secs(10)).is_none(),
            "expired"
        );
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn reinserted_ids_keep_their_newest_entry() {
        let t0 = Instant::now();
        let mut c = CompletedCache::new(10, Duration::from_secs(10));
        c.insert("a".into(), result(), t0);
        c.insert("a".into(), result(), t0 + Duration::from_secs(5));
        assert!(c.get("a", t0 + Duration::from_secs(12)).is_some());
        assert!(c.get("a", t0 + Duration::from_secs(15)).is_none());
    }
}
