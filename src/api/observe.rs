//! The server span and per-RPC metrics of every call, as a tower layer around the whole gRPC
//! router: it sees every call, including the ones refused before a handler runs (shed,
//! unauthenticated, undecodable), and ends when the response body ends, so a stream is
//! timed to its last message. The status comes from `grpc-status`, in the headers of a
//! trailers-only response or in the trailers.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame};
use prost::Message as _;
use tonic::codegen::{
    Service,
    http::{HeaderMap, Request, Response},
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::telemetry::propagation;

/// The `tracing` name of the server span; its exported name is the RPC's
/// (`cardvault.v1.CardVault/Tokenize`).
pub const SPAN_NAME: &str = "grpc.server";

/// Calls per service, method and status name (`OK`, `INVALID_ARGUMENT`, …).
pub const REQUESTS_METRIC: &str = "cardvault_grpc_server_requests_total";
/// Call latency per service, method and status name, to the end of the response.
pub const DURATION_METRIC: &str = "cardvault_grpc_server_request_duration_seconds";

/// The label and span values of a path no served method has: a caller choosing paths must
/// not choose label values.
const UNKNOWN: &str = "unknown";

/// gRPC status names by code, as Prometheus labels and dashboards spell them.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const CANCELLED: i32 = 1;
const UNKNOWN_CODE: i32 = 2;

/// A served method's names.
#[derive(Debug)]
struct Method {
    /// `cardvault.v1.CardVault`
    service: String,
    /// `Tokenize`
    method: String,
    /// `cardvault.v1.CardVault/Tokenize`
    full: String,
}

/// Every method the server serves, by HTTP/2 path, from the descriptors it is built from.
static METHODS: LazyLock<HashMap<String, Method>> = LazyLock::new(|| {
    let mut methods = HashMap::new();
    for set in [
        crate::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = match service.name {
                    Some(name) if package.is_empty() => name,
                    Some(name) => format!("{package}.{name}"),
                    None => continue,
                };
                for method in service.method {
                    if let Some(name) = method.name {
                        add(&mut methods, &service_name, &name);
                    }
                }
            }
        }
    }
    // Reflection, when on: its descriptors are not ours to decode.
    add(
        &mut methods,
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
    );
    add(
        &mut methods,
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
    );
    methods
});

fn add(methods: &mut HashMap<String, Method>, service: &str, method: &str) {
    let full = format!("{service}/{method}");
    methods.insert(
        format!("/{full}"),
        Method {
            service: service.to_owned(),
            method: method.to_owned(),
            full,
        },
    );
}

/// `(service, method, span name)` of `path`, or `unknown` for each when nothing serves it.
fn method_of(path: &str) -> (&'static str, &'static str, &'static str) {
    match METHODS.get(path) {
        Some(m) => (&m.service, &m.method, &m.full),
        None => (UNKNOWN, UNKNOWN, UNKNOWN),
    }
}

/// The layer to put around the router: `Server::builder().layer(observe::layer())`.
pub fn layer() -> ObserveLayer {
    ObserveLayer
}

/// Wraps a service in [`Observe`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> tower_layer::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

/// A gRPC service whose calls each get a server span and per-RPC metrics.
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S, B, R> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    R: Body,
{
    type Response = Response<ObservedBody<R>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (service, method, name) = method_of(request.uri().path());
        let span = tracing::info_span!(
            SPAN_NAME,
            otel.name = name,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            request_id = tracing::field::Empty,
            tenant = tracing::field::Empty,
            principal = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        // Only `traceparent` and `tracestate` are read; a malformed one starts a new trace.
        let _ = span.set_parent(propagation::extract(request.headers()));
        if let Some(trace_id) = propagation::trace_id(&span) {
            span.record("trace_id", trace_id);
        }
        let mut outcome = Outcome {
            span: span.clone(),
            service,
            method,
            started: Instant::now(),
            done: false,
        };
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                match future.await {
                    Ok(response) => {
                        if let Some(code) = grpc_status(response.headers()) {
                            outcome.finish(code);
                        }
                        let (parts, body) = response.into_parts();
                        Ok(Response::from_parts(
                            parts,
                            ObservedBody {
                                inner: Box::pin(body),
                                outcome,
                            },
                        ))
                    }
                    Err(err) => {
                        // tonic turns a service error into an UNKNOWN status.
                        outcome.finish(UNKNOWN_CODE);
                        Err(err)
                    }
                }
            }
            .instrument(span),
        )
    }
}

/// The `grpc-status` in `headers`, if any (`UNKNOWN` when malformed).
fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status").map(|value| {
        value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|code| (0..17).contains(code))
            .unwrap_or(UNKNOWN_CODE)
    })
}

/// Records a call's end once: on its status, or as cancelled when dropped before one (the
/// caller went away, or the request timeout gave up on it).
struct Outcome {
    span: tracing::Span,
    service: &'static str,
    method: &'static str,
    started: Instant,
    done: bool,
}

impl Outcome {
    fn finish(&mut self, code: i32) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let name = usize::try_from(code)
            .ok()
            .and_then(|i| CODE_NAMES.get(i))
            .copied()
            .unwrap_or("UNKNOWN");
        let labels = [
            ("service", self.service),
            ("method", self.method),
            ("code", name),
        ];
        metrics::counter!(REQUESTS_METRIC, &labels).increment(1);
        metrics::histogram!(DURATION_METRIC, &labels).record(self.started.elapsed().as_secs_f64());
        self.span.record("rpc.grpc.status_code", i64::from(code));
        // The server-side errors of the RPC conventions; a caller's mistake is not one.
        if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
            self.span.record("otel.status_code", "error");
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

/// A response body that records the call's outcome when its trailers (or its end) arrive.
pub struct ObservedBody<B> {
    inner: Pin<Box<B>>,
    outcome: Outcome,
}

impl<B> std::fmt::Debug for ObservedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedBody").finish_non_exhaustive()
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.outcome.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.outcome.finish(UNKNOWN_CODE),
            // A body that ends without a status answered nothing a client can read as OK.
            Poll::Ready(None) => this.outcome.finish(UNKNOWN_CODE),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_methods_are_known_and_other_paths_are_not() {
        assert_eq!(
            method_of("/cardvault.v1.CardVault/Tokenize"),
            (
                "cardvault.v1.CardVault",
                "Tokenize",
                "cardvault.v1.CardVault/Tokenize"
            )
        );
        assert_eq!(method_of("/grpc.health.v1.Health/Check").1, "Check");
        for path in ["/cardvault.v1.CardVault/4111111111111111", "/x/y", "/", ""] {
            assert_eq!(method_of(path), (UNKNOWN, UNKNOWN, UNKNOWN), "{path}");
        }
    }

    #[test]
    fn grpc_status_reads_codes_and_refuses_others() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", "3".parse().expect("header"));
        assert_eq!(grpc_status(&headers), Some(3));
        headers.insert("grpc-status", "99".parse().expect("header"));
        assert_eq!(grpc_status(&headers), Some(UNKNOWN_CODE));
    }
}
