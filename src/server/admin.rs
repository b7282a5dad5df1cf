//! The admin HTTP port: Kubernetes probes and Prometheus metrics.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::{net::TcpListener, sync::watch};

use super::HANDSHAKE_TIMEOUT;
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

/// `/healthz` (the process is up), `/readyz` (the database answers) for Kubernetes probes,
/// and `/metrics` for Prometheus; over TLS outside `--dev`.
pub(super) async fn admin_server(
    listener: TcpListener,
    tls: Option<ReloadingAcceptor>,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let metrics = prometheus();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(ready): State<Arc<AtomicBool>>| async move {
                if ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
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
