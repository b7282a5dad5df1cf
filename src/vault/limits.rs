//! Per-key token buckets for abuse limits (reveals per principal, failed authentications per
//! principal and per peer).
//!
//! Buckets live in the memory of one replica: with N replicas a caller spread across all of
//! them gets up to N times the configured rate. That bounds a stolen credential's damage
//! without a shared store in the request path.

use std::{collections::HashMap, sync::Mutex, time::Instant};

/// A rate: `burst` events at once, refilled at `per_minute` per minute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained events per minute.
    pub per_minute: u32,
    /// Events allowed back to back.
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets keyed by string (a principal id, a key id, a peer address).
#[derive(Debug)]
pub struct RateLimiter {
    rate: Rate,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Beyond this many keys, full buckets are dropped: they hold nothing a fresh bucket would
/// not, and an attacker cycling peer addresses must not grow the map without bound.
const PRUNE_ABOVE: usize = 10_000;

impl RateLimiter {
    /// A limiter allowing `rate` per key.
    pub fn new(rate: Rate) -> RateLimiter {
        RateLimiter {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key` at `now`; false when the bucket is empty.
    pub fn take(&self, key: &str, now: Instant) -> bool {
        self.update(key, now, |b| {
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                true
            } else {
                false
            }
        })
    }

    /// Whether `key` has a token left at `now`, without taking it.
    pub fn has_capacity(&self, key: &str, now: Instant) -> bool {
        self.update(key, now, |b| b.tokens >= 1.0)
    }

    fn update(&self, key: &str, now: Instant, f: impl FnOnce(&mut Bucket) -> bool) -> bool {
        let burst = f64::from(self.rate.burst.max(1));
        let per_sec = f64::from(self.rate.per_minute) / 60.0;
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, b| {
                let refilled = b.tokens + refill(now, b.updated, per_sec);
                refilled < burst
            });
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        bucket.tokens = (bucket.tokens + refill(now, bucket.updated, per_sec)).min(burst);
        bucket.updated = bucket.updated.max(now);
        f(bucket)
    }
}

fn refill(now: Instant, since: Instant, per_sec: f64) -> f64 {
    now.saturating_duration_since(since).as_secs_f64() * per_sec
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_is_allowed_then_refused_until_tokens_refill() {
        let limiter = RateLimiter::new(Rate {
            per_minute: 60,
            burst: 3,
        });
        let t0 = Instant::now();
        assert!(limiter.take("p", t0));
        assert!(limiter.take("p", t0));
        assert!(limiter.take("p", t0));
        assert!(!limiter.take("p", t0));
        assert!(!limiter.has_capacity("p", t0));
        // One token per second comes back.
        assert!(limiter.take("p", t0 + Duration::from_millis(1_000)));
        assert!(!limiter.take("p", t0 + Duration::from_millis(1_100)));
    }

    #[test]
    fn keys_have_separate_buckets() {
        let limiter = RateLimiter::new(Rate {
            per_minute: 1,
            burst: 1,
        });
        let t0 = Instant::now();
        assert!(limiter.take("a", t0));
        assert!(!limiter.take("a", t0));
        assert!(limiter.take("b", t0));
    }

    #[test]
    fn a_bucket_never_holds_more_than_its_burst() {
        let limiter = RateLimiter::new(Rate {
            per_minute: 600,
            burst: 2,
        });
        let t0 = Instant::now();
        assert!(limiter.has_capacity("p", t0));
        let later = t0 + Duration::from_secs(3_600);
        assert!(limiter.take("p", later));
        assert!(limiter.take("p", later));
        assert!(!limiter.take("p", later));
    }
}
