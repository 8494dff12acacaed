//! Capped exponential backoff with jitter, for (re)connecting to Postgres and NATS.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    time::Duration,
};

/// Delays of `initial · 2^n`, capped at `max`, each shortened by up to 20% at random so that a
/// fleet restarting together does not retry in lock step.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    attempt: u32,
}

impl Default for Backoff {
    /// 250 ms doubling up to 10 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(250), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            next: initial.min(max),
            max,
            attempt: 0,
        }
    }

    /// How many delays were handed out so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jitter = random_unit() * 0.2;
        base.mul_f64(1.0 - jitter)
    }
}

/// `base` shortened by up to `fraction` (0..=1) at random, so that replicas polling on the same
/// period drift apart instead of hitting the database in lock step.
pub fn jittered(base: Duration, fraction: f64) -> Duration {
    let fraction = fraction.clamp(0.0, 1.0);
    base.mul_f64(1.0 - random_unit() * fraction)
}

/// A random number in [0, 1) from the std hasher's random keys (no RNG dependency needed).
pub fn random_unit() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100) && delays[0] >= Duration::from_millis(80));
        assert!(delays[1] >= Duration::from_millis(160));
        for d in &delays {
            assert!(*d <= Duration::from_secs(1));
        }
        assert!(delays[7] >= Duration::from_millis(800), "capped near max");
        assert_eq!(b.attempt(), 8);
    }
}
