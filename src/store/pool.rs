//! Connection-pool metrics: how long requests wait for a connection, how many wait, and how
//! full the pool is. sqlx reports the pool's size and idle count but neither waits nor
//! waiters, so every acquisition of the backends goes through [`Acquires::timed`].

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::Store;

/// Histogram of the time to get a pooled connection (failed attempts included), by
/// `backend`.
pub const ACQUIRE_DURATION: &str = "cardvault_db_pool_acquire_duration_seconds";
/// Gauge of pooled connections by `state`: `idle` or `in_use`.
pub const CONNECTIONS: &str = "cardvault_db_pool_connections";
/// Gauge of the most connections the pool opens.
pub const MAX_CONNECTIONS: &str = "cardvault_db_pool_max_connections";
/// Gauge of acquisitions waiting for a connection now.
pub const WAITERS: &str = "cardvault_db_pool_waiters";

/// A pool's occupancy at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Open connections, idle or in use.
    pub size: u32,
    /// Open connections nobody uses.
    pub idle: u32,
    /// The most connections the pool opens.
    pub max: u32,
    /// Acquisitions in progress (waiting for a connection, or opening one).
    pub waiters: u64,
}

/// Counts and times one pool's acquisitions.
#[derive(Debug, Clone)]
pub(crate) struct Acquires {
    backend: &'static str,
    waiting: Arc<AtomicU64>,
}

/// Takes one acquisition off the count however it ends (success, error, or the caller
/// dropping the future when its deadline passes).
struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Acquires {
    /// A fresh count for a pool of `backend`.
    pub(crate) fn new(backend: &'static str) -> Self {
        Self {
            backend,
            waiting: Arc::default(),
        }
    }

    /// Acquisitions in progress now.
    pub(crate) fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Runs `acquire`, counting it as waiting meanwhile and recording how long it took.
    pub(crate) async fn timed<T, E>(
        &self,
        acquire: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        let started = Instant::now();
        let result = acquire.await;
        metrics::histogram!(ACQUIRE_DURATION, "backend" => self.backend)
            .record(started.elapsed().as_secs_f64());
        result
    }
}

/// A sqlx pool's occupancy, with the acquisitions `acquires` counts as waiting.
pub(crate) fn stats<DB: sqlx::Database>(pool: &sqlx::Pool<DB>, acquires: &Acquires) -> PoolStats {
    PoolStats {
        size: pool.size(),
        idle: u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
        max: pool.options().get_max_connections(),
        waiters: acquires.waiting(),
    }
}

/// Publishes `store`'s pool gauges every `every` until `stop` changes. Sampling costs a few
/// atomic reads, so a period well under a scrape interval is cheap.
pub async fn sample_pool(store: Arc<dyn Store>, every: Duration, mut stop: watch::Receiver<bool>) {
    let Some(_) = store.pool_stats() else {
        return;
    };
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if let Some(stats) = store.pool_stats() {
            publish(&stats);
        }
    }
}

fn publish(stats: &PoolStats) {
    let in_use = stats.size.saturating_sub(stats.idle);
    metrics::gauge!(CONNECTIONS, "state" => "idle").set(f64::from(stats.idle));
    metrics::gauge!(CONNECTIONS, "state" => "in_use").set(f64::from(in_use));
    metrics::gauge!(MAX_CONNECTIONS).set(f64::from(stats.max));
    metrics::gauge!(WAITERS).set(stats.waiters as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_acquisition_counts_as_waiting_until_it_ends_or_is_dropped() {
        let acquires = Acquires::new("test");
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let pending = {
            let acquires = acquires.clone();
            tokio::spawn(async move { acquires.timed(released).await })
        };
        while acquires.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(acquires.waiting(), 1);
        release.send(()).unwrap();
        pending.await.unwrap().unwrap();
        assert_eq!(acquires.waiting(), 0);

        // A caller that gives up (its deadline passed) is no longer waiting either.
        let never = std::future::pending::<Result<(), ()>>();
        let gave_up = tokio::time::timeout(Duration::from_millis(1), acquires.timed(never)).await;
        assert!(gave_up.is_err());
        assert_eq!(acquires.waiting(), 0);
    }
}
