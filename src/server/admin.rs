//! The admin HTTP port: Kubernetes probes and Prometheus metrics.

use std::sync::{Arc, OnceLock};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::{net::TcpListener, sync::watch};

use super::{HANDSHAKE_TIMEOUT, readiness::Readiness};
use crate::tls::{self, ReloadingAcceptor};

/// The process-wide Prometheus recorder: `metrics` allows one global recorder, and tests run
/// many vaults in one process.
fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .as_ref()
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
