//! Background deletion of cards whose token has expired. Expired tokens already read as
//! `NOT_FOUND` (every query filters on `expires_at`); the sweeper reclaims their rows in
//! bounded batches so no statement holds locks for long.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::store::Store;

/// Runs until `stop` turns true: every `interval`, deletes expired cards `batch` at a time
/// until a batch comes back short.
pub async fn run(
    store: Arc<dyn Store>,
    interval: Duration,
    batch: u32,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        match sweep_once(store.as_ref(), batch).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "swept expired tokens"),
            Err(err) => tracing::warn!(error = %err, "sweeping expired tokens failed; will retry"),
        }
    }
}

/// Deletes every card expired by now, `batch` rows per statement; returns how many.
pub async fn sweep_once(store: &dyn Store, batch: u32) -> Result<u64, crate::store::StoreError> {
    let now = OffsetDateTime::now_utc();
    let mut total = 0;
    loop {
        let n = store.delete_expired(now, batch).await?;
        total += n;
        if n < u64::from(batch) {
            return Ok(total);
        }
    }
}
