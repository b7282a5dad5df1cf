//! W3C trace context (`traceparent`, `tracestate`) in and out of HTTP/2 headers: taken from
//! incoming gRPC metadata, sent on outbound gateway requests. Only those two headers are
//! read or written; no other metadata value reaches a span.

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http::{HeaderMap, HeaderName, HeaderValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The caller's trace context from `headers` (empty when they carry none or a malformed one).
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// Adds `span`'s trace context to `headers`; nothing when traces are off.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeadersMut(headers));
}

/// `span`'s trace id as 32 hex digits, when it has a valid one (traces on).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[test]
    fn a_span_sends_its_trace_on_and_a_caller_s_trace_is_taken() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let mut incoming = HeaderMap::new();
            incoming.insert(
                "traceparent",
                HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
            incoming.insert(
                "x-card-number",
                HeaderValue::from_static("4111111111111111"),
            );
            let span = tracing::info_span!("server");
            assert!(span.set_parent(extract(&incoming)).is_ok());
            assert_eq!(
                trace_id(&span).as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
            let child = span.in_scope(|| tracing::info_span!("gateway.request"));
            let mut outgoing = HeaderMap::new();
            inject(&child, &mut outgoing);
            let sent = outgoing
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .expect("traceparent sent");
            assert!(
                sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{sent}"
            );
            // The child's own span id, not the caller's.
            assert!(!sent.contains("00f067aa0ba902b7"), "{sent}");
            // Only trace context goes out: nothing else of the incoming metadata.
            assert!(
                outgoing
                    .keys()
                    .all(|k| k == "traceparent" || k == "tracestate")
            );
        });
    }

    #[test]
    fn without_traces_nothing_is_sent() {
        let span = tracing::info_span!("untraced");
        let mut outgoing = HeaderMap::new();
        inject(&span, &mut outgoing);
        assert!(outgoing.is_empty());
        assert_eq!(trace_id(&span), None);
    }
}
