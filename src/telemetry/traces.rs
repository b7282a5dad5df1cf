//! The OTLP/gRPC trace pipeline: exporter, resource, sampler and the export queue, built
//! once per process (or per test vault) and handed to the log subscriber as a layer.

use std::time::Duration;

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracer, SdkTracerProvider},
};

use super::queue::{self, Dropped, QueueHandle, QueueOptions};
use crate::config::TelemetrySettings;

/// The standard variables that turn export on when `telemetry.otlp_endpoint` is unset.
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The trace pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    /// The CA file for an https collector could not be read.
    #[error("telemetry.ca_file {path}: {source}")]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The exporter refused its configuration (a malformed endpoint, say).
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// A running trace pipeline: the tracer for the `tracing` layer, and the queue to flush.
#[derive(Debug, Clone)]
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    queue: QueueHandle,
    shutdown_timeout: Duration,
}

/// Whether export is on: the setting, else either standard endpoint variable.
pub fn enabled(settings: &TelemetrySettings) -> bool {
    settings
        .otlp_endpoint
        .as_deref()
        .is_some_and(|e| !e.is_empty())
        || ENDPOINT_VARS
            .iter()
            .any(|var| std::env::var(var).is_ok_and(|v| !v.is_empty()))
}

impl Traces {
    /// Builds the pipeline if export is on ([`enabled`]), with its worker on `runtime`.
    pub fn start(
        settings: &TelemetrySettings,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Option<Traces>, TracesError> {
        if !enabled(settings) {
            return Ok(None);
        }
        // The exporter's lazy channel spawns its worker on the current runtime.
        let _entered = runtime.enter();
        let export_timeout = Duration::from_millis(settings.export_timeout_ms);
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_timeout(export_timeout);
        if let Some(endpoint) = settings.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|source| TracesError::CaFile {
                path: path.clone(),
                source,
            })?;
            builder = builder.with_tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            );
        } else if endpoint_is_https(settings) {
            // The same roots in every image, as for gateways: no system store.
            builder = builder.with_tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .trust_anchors(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            );
        }
        let exporter = builder.build()?;
        let (processor, queue) = queue::start(
            exporter,
            QueueOptions {
                max_queue_size: settings.max_queue_size,
                max_batch_size: settings.max_export_batch_size,
                scheduled_delay: Duration::from_millis(settings.scheduled_delay_ms),
                export_timeout,
            },
            runtime,
        );
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sampling_ratio,
            ))))
            .with_resource(resource())
            .build();
        let tracer = provider.tracer("cardvault");
        Ok(Some(Traces {
            provider,
            tracer,
            queue,
            shutdown_timeout: Duration::from_millis(settings.shutdown_timeout_ms),
        }))
    }

    /// The tracer the `tracing` layer exports through.
    pub fn tracer(&self) -> SdkTracer {
        self.tracer.clone()
    }

    /// Spans dropped so far (queue full, collector down or slow).
    pub fn dropped(&self) -> &Dropped {
        self.queue.dropped()
    }

    /// Waits until the spans finished so far are exported or dropped, at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> bool {
        self.queue.flush(timeout).await
    }

    /// Exports what is queued and stops, within `telemetry.shutdown_timeout_ms`: a collector
    /// that is down must not hold the pod past its termination grace period.
    pub async fn shutdown(self) {
        if !self.queue.shutdown(self.shutdown_timeout).await {
            tracing::warn!("span export did not finish before the shutdown timeout");
        }
        // The queue is stopped; this only marks the provider shut down.
        let _ = self.provider.shutdown();
    }
}

fn endpoint_is_https(settings: &TelemetrySettings) -> bool {
    let configured = settings.otlp_endpoint.clone().filter(|e| !e.is_empty());
    configured
        .or_else(|| {
            ENDPOINT_VARS
                .iter()
                .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
        })
        .is_some_and(|e| e.to_ascii_lowercase().starts_with("https://"))
}

/// `service.name` and the rest from `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` as the
/// specification says, with "cardvault" and the crate version where they name none.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let mut builder = Resource::builder();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    if !named {
        builder = builder.with_service_name("cardvault");
    }
    if detected
        .get(&opentelemetry::Key::from_static_str("service.version"))
        .is_none()
    {
        builder =
            builder.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    builder.build()
}
