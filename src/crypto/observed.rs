//! A key provider seen from outside: every call to the wrapped provider gets a span, a
//! latency sample and, on failure, an error count, so a slow or failing HSM shows up in
//! traces and on dashboards whichever provider is configured.
//!
//! Spans and labels carry the provider's kind and the operation only: never plaintexts,
//! wrapped bytes, AAD (it names tenants and DEK ids) or key material. The KEK version, a small
//! public counter, is recorded on the span.

use std::{future::Future, sync::Arc, time::Instant};

use tracing::{Instrument, field::Empty};
use zeroize::Zeroizing;

use super::{CryptoError, KekVersion, KeyProvider, WrappedKey};

/// Histogram of key-provider call latency, by `provider` and `operation`.
pub const REQUEST_DURATION: &str = "cardvault_key_provider_request_duration_seconds";
/// Counter of failed key-provider calls, by `provider` and `operation`.
pub const ERRORS: &str = "cardvault_key_provider_errors_total";

/// A span named `$name` (span names are static) with the provider kind and, when the call
/// names one, the KEK version.
macro_rules! kms_span {
    ($name:literal, $provider:expr, $version:expr) => {
        kms_span!(tracing::Level::INFO, $name, $provider, $version)
    };
    ($level:expr, $name:literal, $provider:expr, $version:expr) => {
        tracing::span!(
            $level,
            $name,
            kms.provider = $provider,
            kms.kek_version = $version.map(|v: KekVersion| i64::from(v.0)),
            otel.status_code = Empty,
        )
    };
}

/// Wraps any [`KeyProvider`] with spans (`kms.wrap`, `kms.unwrap`, `kms.rotate`,
/// `kms.retire`, `kms.refresh`) and metrics ([`REQUEST_DURATION`], [`ERRORS`]).
#[derive(Debug)]
pub struct ObservedProvider {
    inner: Arc<dyn KeyProvider>,
}

impl ObservedProvider {
    /// Observes `inner`. Its error series start at 0, so an alert on their increase fires
    /// on the first failure too (a series born at 1 shows no increase).
    pub fn new(inner: Arc<dyn KeyProvider>) -> Self {
        let provider = inner.name();
        for operation in ["wrap", "unwrap", "rotate", "retire", "refresh"] {
            metrics::counter!(ERRORS, "provider" => provider, "operation" => operation)
                .increment(0);
        }
        Self { inner }
    }

    /// Runs one provider call inside `span`, timing it and counting a failure.
    async fn observe<T>(
        &self,
        operation: &'static str,
        span: tracing::Span,
        call: impl Future<Output = Result<T, CryptoError>>,
    ) -> Result<T, CryptoError> {
        let provider = self.inner.name();
        let started = Instant::now();
        let result = call.instrument(span.clone()).await;
        metrics::histogram!(
            REQUEST_DURATION,
            "provider" => provider,
            "operation" => operation,
        )
        .record(started.elapsed().as_secs_f64());
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
            metrics::counter!(ERRORS, "provider" => provider, "operation" => operation)
                .increment(1);
        }
        result
    }
}

#[async_trait::async_trait]
impl KeyProvider for ObservedProvider {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn primary_version(&self) -> KekVersion {
        self.inner.primary_version()
    }

    fn versions(&self) -> Vec<KekVersion> {
        self.inner.versions()
    }

    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<WrappedKey, CryptoError> {
        let span = kms_span!("kms.wrap", self.name(), Some(self.primary_version()));
        self.observe("wrap", span, self.inner.wrap(plaintext, aad))
            .await
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let span = kms_span!("kms.unwrap", self.name(), Some(wrapped.kek_version));
        self.observe("unwrap", span, self.inner.unwrap(wrapped, aad))
            .await
    }

    async fn rotate(&self) -> Result<KekVersion, CryptoError> {
        let span = kms_span!("kms.rotate", self.name(), None);
        self.observe("rotate", span, self.inner.rotate()).await
    }

    async fn retire(&self, version: KekVersion) -> Result<(), CryptoError> {
        let span = kms_span!("kms.retire", self.name(), Some(version));
        self.observe("retire", span, self.inner.retire(version))
            .await
    }

    async fn refresh(&self) -> Result<(), CryptoError> {
        // Debug: the key-job runner refreshes every poll (a second by default), and a root
        // span a second per replica would drown the traces worth reading.
        let span = kms_span!(tracing::Level::DEBUG, "kms.refresh", self.name(), None);
        self.observe("refresh", span, self.inner.refresh()).await
    }

    async fn check(&self) -> Result<(), CryptoError> {
        // Forwarded unobserved: readiness checks every second, and the provider's own check
        // may be cheaper than the default wrap-and-unwrap (the keyring checks its files).
        // A failing check is reported by readiness, with its reason, not as a kms span.
        self.inner.check().await
    }
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;
    use crate::crypto::LocalKeyring;

    /// The line of `family` whose labels contain `operation`, from a Prometheus scrape.
    fn sample(scrape: &str, family: &str, operation: &str) -> Option<f64> {
        let needle = format!("operation=\"{operation}\"");
        scrape
            .lines()
            .find(|l| l.starts_with(family) && l.contains(&needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// The names of the spans opened, in order.
    #[derive(Clone, Default)]
    struct Names(Arc<std::sync::Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Names {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let name = attrs.metadata().name().to_owned();
            self.0.lock().unwrap().push(name);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_are_timed_and_failures_counted_by_operation() {
        use tracing_subscriber::prelude::*;

        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Thread-local, and a current-thread runtime polls everything on this thread.
        let _local = metrics::set_default_local_recorder(&recorder);
        let names = Names::default();
        let _spans =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(names.clone()));

        let provider = ObservedProvider::new(Arc::new(LocalKeyring::ephemeral().unwrap()));
        assert_eq!(provider.name(), "local");
        let wrapped = provider.wrap(&[7u8; 32], b"aad").await.unwrap();
        assert_eq!(
            provider.unwrap(&wrapped, b"aad").await.unwrap().as_slice(),
            &[7u8; 32]
        );
        assert!(matches!(
            provider.unwrap(&wrapped, b"other").await,
            Err(CryptoError::Unwrap)
        ));

        let scrape = handle.render();
        assert!(
            scrape.contains("provider=\"local\""),
            "provider label missing:\n{scrape}"
        );
        let count = format!("{REQUEST_DURATION}_count");
        assert_eq!(sample(&scrape, &count, "wrap"), Some(1.0), "{scrape}");
        assert_eq!(sample(&scrape, &count, "unwrap"), Some(2.0), "{scrape}");
        assert_eq!(sample(&scrape, ERRORS, "unwrap"), Some(1.0), "{scrape}");
        assert_eq!(sample(&scrape, ERRORS, "wrap"), Some(0.0), "{scrape}");
        assert_eq!(
            *names.0.lock().unwrap(),
            ["kms.wrap", "kms.unwrap", "kms.unwrap"],
            "one span per call, named by operation"
        );
    }
}
