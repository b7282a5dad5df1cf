//! Readiness: gRPC health and `/readyz` follow what the vault needs to serve.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

use super::{READINESS_INTERVAL, SERVICE_NAME};
use crate::store::Store;

/// Keeps gRPC health and `/readyz` in step with the database: ready only while it answers.
pub(super) async fn readiness(
    store: Arc<dyn Store>,
    health: HealthReporter,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(READINESS_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let ok = store.ping().await.is_ok();
        if ok != ready.swap(ok, Ordering::SeqCst) {
            tracing::info!(ready = ok, "readiness changed");
        }
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health.set_service_status(SERVICE_NAME, status).await;
    }
}
