//! Background deletion of cards whose token has expired, and of expired CVCs. Expired
//! tokens already read as `NOT_FOUND` (every query filters on `expires_at`); the sweeper
//! reclaims their rows in bounded batches so no statement holds locks for long. Expired CVC
//! holds are never used (taking one checks its expiry); the sweeper erases them.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::store::{CardRepo, ChargeRepo, Store};

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
        match sweep_cvcs(store.as_ref(), batch).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(erased = n, "swept expired CVC holds"),
            Err(err) => tracing::warn!(error = %err, "sweeping CVC holds failed; will retry"),
        }
    }
}

/// Deletes every card expired by now, `batch` rows per statement; returns how many.
pub async fn sweep_once(store: &dyn CardRepo, batch: u32) -> Result<u64, crate::store::StoreError> {
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

/// Deletes every expired CVC hold and erases the expired CVCs attached to charges (PCI DSS
/// 3.3: sensitive authentication data is kept no longer than needed); returns how many.
pub async fn sweep_cvcs(
    store: &dyn ChargeRepo,
    batch: u32,
) -> Result<u64, crate::store::StoreError> {
    let now = OffsetDateTime::now_utc();
    let mut total = 0;
    loop {
        let holds = store.delete_expired_cvc_holds(now, batch).await?;
        let attached = store.erase_expired_charge_cvcs(now, batch).await?;
        total += holds + attached;
        if holds < u64::from(batch) && attached < u64::from(batch) {
            return Ok(total);
        }
    }
}
