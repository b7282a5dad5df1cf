//! Per-key token buckets for abuse limits (reveals per principal, failed authentications per
//! principal and per peer) and guess budgets (answers that would let a caller without
//! `reveal` test candidate card numbers against stored ones).
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

/// Budgets of answers that compare a caller's card number with a stored one, per principal
/// and hour (see `docs/decisions.md`, "card-number oracles").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuessBudgets {
    /// `ImportCards` resends of an existing import id with another card number (answered
    /// `CONFLICT`).
    pub import_conflicts_per_hour: u32,
    /// `reuse_existing` requests answered with an existing token.
    pub reuse_hits_per_hour: u32,
    /// `reuse_existing` requests that stored a new card, per BIN and last 4: what a caller
    /// guessing the middle digits of one stored card spends.
    pub reuse_misses_per_hour: u32,
}

impl Default for GuessBudgets {
    fn default() -> Self {
        GuessBudgets {
            import_conflicts_per_hour: 20,
            reuse_hits_per_hour: 100,
            reuse_misses_per_hour: 10,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets keyed by string (a principal id, a key id, a peer address).
#[derive(Debug)]
pub struct RateLimiter {
    /// Most tokens a bucket holds (and holds when new).
    burst: f64,
    /// Tokens added per second.
    per_sec: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Beyond this many keys, full buckets are dropped: they hold nothing a fresh bucket would
/// not, and an attacker cycling peer addresses must not grow the map without bound.
const PRUNE_ABOVE: usize = 10_000;

impl RateLimiter {
    /// A limiter allowing `rate` per key.
    pub fn new(rate: Rate) -> RateLimiter {
        RateLimiter {
            burst: f64::from(rate.burst.max(1)),
            per_sec: f64::from(rate.per_minute) / 60.0,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// A budget of `per_hour` events per key, all of which may be spent at once, refilled
    /// evenly over the hour.
    pub fn hourly(per_hour: u32) -> RateLimiter {
        RateLimiter {
            burst: f64::from(per_hour.max(1)),
            per_sec: f64::from(per_hour) / 3600.0,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whole tokens `key` holds at `now`.
    pub fn available(&self, key: &str, now: Instant) -> u64 {
        // Floored and non-negative: the cast only drops the fraction.
        self.update(key, now, |b| b.tokens.max(0.0).floor() as u64)
    }

    /// Takes `n` tokens from `key` if it holds that many and at least one, else empties it
    /// (keeping the fraction that refills the next token); whether it took them. One step
    /// under the lock, so concurrent spenders cannot both see the same tokens.
    pub fn take_or_drain(&self, key: &str, n: u64, now: Instant) -> bool {
        self.update(key, now, |b| {
            // Exact for any count a request can produce.
            let wanted = n as f64;
            if b.tokens >= wanted.max(1.0) {
                b.tokens -= wanted;
                true
            } else {
                b.tokens = b.tokens.max(0.0).fract();
                false
            }
        })
    }

    /// Returns one token taken from `key` but not used (never beyond the burst).
    pub fn give_back(&self, key: &str, now: Instant) {
        let burst = self.burst;
        self.update(key, now, |b| b.tokens = (b.tokens + 1.0).min(burst));
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

    fn update<R>(&self, key: &str, now: Instant, f: impl FnOnce(&mut Bucket) -> R) -> R {
        let (burst, per_sec) = (self.burst, self.per_sec);
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
    fn an_hourly_budget_is_spent_at_once_or_drained_and_refills_over_the_hour() {
        let budget = RateLimiter::hourly(20);
        let t0 = Instant::now();
        assert_eq!(budget.available("p", t0), 20);
        assert!(budget.take_or_drain("p", 15, t0));
        assert_eq!(budget.available("p", t0), 5);
        // Asking for more than is left empties the bucket: the next ask cannot probe again.
        assert!(!budget.take_or_drain("p", 6, t0));
        assert_eq!(budget.available("p", t0), 0);
        assert!(!budget.take_or_drain("p", 1, t0));
        // One token every three minutes.
        assert_eq!(budget.available("p", t0 + Duration::from_secs(179)), 0);
        assert_eq!(budget.available("p", t0 + Duration::from_secs(181)), 1);
        assert_eq!(budget.available("p", t0 + Duration::from_secs(3_600)), 20);
        assert!(budget.take("q", t0));
        assert_eq!(budget.available("q", t0), 19);
        // Taking nothing still needs a token: an empty budget refuses even that.
        assert!(budget.take_or_drain("q", 0, t0));
        assert_eq!(budget.available("q", t0), 19);
        assert!(budget.take_or_drain("r", 20, t0));
        assert!(!budget.take_or_drain("r", 0, t0));
    }

    #[test]
    fn a_token_given_back_is_there_again_but_never_beyond_the_burst() {
        let budget = RateLimiter::hourly(2);
        let t0 = Instant::now();
        assert!(budget.take("p", t0));
        assert!(budget.take("p", t0));
        assert!(!budget.take("p", t0));
        budget.give_back("p", t0);
        assert!(budget.take("p", t0));
        budget.give_back("p", t0);
        budget.give_back("p", t0);
        budget.give_back("p", t0);
        assert_eq!(budget.available("p", t0), 2);
    }

    /// The three guess budgets, as configured.
    #[test]
    fn guess_budgets_default_to_what_the_docs_say() {
        let b = GuessBudgets::default();
        assert_eq!(
            (
                b.import_conflicts_per_hour,
                b.reuse_hits_per_hour,
                b.reuse_misses_per_hour
            ),
            (20, 100, 10)
        );
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
