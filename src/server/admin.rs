//! The admin HTTP port: Kubernetes probes and Prometheus metrics.

use std::sync::{Arc, OnceLock};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::{net::TcpListener, sync::watch};

use super::{HANDSHAKE_TIMEOUT, readiness::Readiness};
use crate::tls::{self, ReloadingAcceptor};

/// Histogram buckets, in seconds, for every `…_seconds` histogram: 0.1 ms (a cached
/// tokenize) to 10 s (the longest a unary call may run), about three per decade so a p99
/// is read within a bucket's width.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets for writes per group commit: powers of two up to the largest batch allowed.
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Installs the process-wide Prometheus recorder (once; later calls do nothing). Call it
/// before anything records a metric: samples recorded with no recorder installed are lost.
pub(super) fn install_recorder() {
    let _ = prometheus();
}

/// The process-wide Prometheus recorder: `metrics` allows one global recorder, and tests run
/// many vaults in one process. Histograms, not summaries: buckets aggregate across replicas.
fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = recorder_builder().build_recorder();
            let handle = recorder.handle();
            let installed = metrics::set_global_recorder(recorder).ok().map(|()| handle);
            if installed.is_some() {
                super::metric_docs::describe();
                super::metric_docs::build_info();
                super::metric_docs::start_alerting_counters();
            }
            installed
        })
        .as_ref()
}

/// The exporter's settings: histogram buckets by metric name.
fn recorder_builder() -> PrometheusBuilder {
    let builder = PrometheusBuilder::new();
    let with_buckets = builder
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("cardvault_write_batch_size".into()),
                BATCH_SIZE_BUCKETS,
            )
        });
    // Only an empty bucket list fails, and both lists are constants.
    with_buckets.unwrap_or_else(|_| PrometheusBuilder::new())
}

/// `/healthz` (the process is up), `/readyz` (each readiness check, and why it fails) for Kubernetes probes,
/// and `/metrics` for Prometheus; over TLS outside `--dev`.
pub(super) async fn admin_server(
    listener: TcpListener,
    tls: Option<ReloadingAcceptor>,
    ready: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) {
    let metrics = prometheus();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(ready): State<Arc<Readiness>>| async move {
                let status = if ready.is_ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (status, ready.report())
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                match metrics {
                    Some(handle) => (StatusCode::OK, handle.render()),
                    None => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "another metrics recorder is installed\n".to_owned(),
                    ),
                }
            }),
        )
        .with_state(ready);
    let shutdown = async move {
        let _ = stop.changed().await;
    };
    let result = match tls {
        Some(acceptor) => {
            axum::serve(
                tls::TlsListener::new(listener, acceptor, HANDSHAKE_TIMEOUT),
                app,
            )
            .with_graceful_shutdown(shutdown)
            .await
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    if let Err(err) = result {
        tracing::error!(error = %err, "admin listener failed");
    }
}
