//! Traces over OTLP: a collector started by the test receives the spans of a Tokenize, a
//! Reveal and a Charge, under the caller's trace, with the gateway request as a child, and no
//! card data; a collector that is down costs no call anything but dropped (and counted)
//! spans.
//!
//! The tracer is per vault, not process-wide: each test runs its vault on a runtime whose
//! threads all use a subscriber exporting to that test's pipeline, while the rest of this
//! binary keeps the global one. Both run on PostgreSQL: SQLite's driver works on threads of
//! its own, outside the test's runtime, and a span whose last handle is dropped on a thread
//! with another default subscriber cannot be closed there.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use cardvault::{
    config::{LogFormat, Settings},
    pb::v1 as pb,
    telemetry::{self, Traces},
};
use cardvault_test_gateway::cards;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind},
};
use prost::Message as _;
use tokio_stream::wrappers::TcpListenerStream;

use crate::{
    charge::{card, charge_request, rig_tuned},
    errors::http_get,
    helpers::{Backend, spawn_with, tokenize_request, unique_pan},
};

/// What a collector received.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .lock()
            .expect("collector lock")
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.0.lock().expect("collector lock").clone()
    }

    fn spans(&self) -> Vec<Span> {
        self.requests()
            .into_iter()
            .flat_map(|r| r.resource_spans)
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .collect()
    }
}

async fn start_collector() -> (SocketAddr, Collector) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind collector");
    let addr = listener.local_addr().expect("collector addr");
    let collector = Collector::default();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    (addr, collector)
}

/// JSON log lines written by the traced vault.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lines lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `test` on a runtime whose every thread logs and traces through a subscriber
/// exporting to `endpoint` with `settings`' telemetry; the export pipeline runs on a runtime
/// of its own (its threads use the global subscriber, so export is never traced itself).
fn traced<F, Fut>(endpoint: &str, tune: impl FnOnce(&mut Settings), test: F)
where
    F: FnOnce(Traces, Lines) -> Fut,
    Fut: Future<Output = ()>,
{
    let pipeline = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("pipeline runtime");
    let mut settings = Settings::load(None).expect("default settings");
    settings.telemetry.otlp_endpoint = Some(endpoint.to_owned());
    settings.telemetry.scheduled_delay_ms = 50;
    tune(&mut settings);
    let traces = Traces::start(&settings.telemetry, pipeline.handle())
        .expect("traces start")
        .expect("traces on");
    let lines = Lines::default();
    let writer = lines.clone();
    let dispatch = tracing::Dispatch::new(telemetry::subscriber_with_traces(
        LogFormat::Json,
        "info",
        move || writer.clone(),
        Some(&traces),
    ));
    let thread_dispatch = dispatch.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            // For the thread's whole life: it belongs to this test's runtime only.
            std::mem::forget(tracing::dispatcher::set_default(&thread_dispatch));
        })
        .build()
        .expect("test runtime");
    let _default = tracing::dispatcher::set_default(&dispatch);
    runtime.block_on(test(traces, lines));
    drop(runtime);
    drop(pipeline);
}

fn with_traceparent<T>(message: T, trace_id: &str, parent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent}-01")
            .parse()
            .expect("traceparent"),
    );
    request
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn string_attribute(span: &Span, key: &str) -> String {
    match attribute(&span.attributes, key) {
        Some(Value::StringValue(s)) => s.clone(),
        other => panic!("{} has {key} = {other:?}", span.name),
    }
}

fn int_attribute(span: &Span, key: &str) -> i64 {
    match attribute(&span.attributes, key) {
        Some(Value::IntValue(i)) => *i,
        other => panic!("{} has {key} = {other:?}", span.name),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one server span named `name`.
fn server_span<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == name && s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(found.len(), 1, "server spans named {name}: {found:#?}");
    found[0]
}

/// Waits (bounded) until the collector holds server spans named each of `names`.
async fn wait_for(traces: &Traces, collector: &Collector, names: &[&str]) -> Vec<Span> {
    for _ in 0..100 {
        // A server span ends when its response body is dropped, just after the client read it.
        traces.flush(Duration::from_secs(5)).await;
        let spans = collector.spans();
        if names.iter().all(|n| {
            spans
                .iter()
                .any(|s| s.name == *n && s.kind == SpanKind::Server as i32)
        }) {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("spans {names:?} never arrived: {:#?}", collector.spans());
}

#[test]
fn spans_of_tokenize_reveal_and_charge_reach_the_collector_under_the_callers_trace() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (collector_addr, collector) = runtime.block_on(start_collector());
    traced(
        &format!("http://{collector_addr}"),
        |_| {},
        |traces, lines| async move {
            let mut rig =
                rig_tuned(Backend::Postgres, Duration::from_secs(30), 5_000, |_| {}).await;
            let client = &mut rig.app.client;
            let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
            let caller_span = "00f067aa0ba902b7";

            let pan = unique_pan();
            let token = client
                .tokenize(with_traceparent(
                    tokenize_request(&pan),
                    trace_id,
                    caller_span,
                ))
                .await
                .expect("tokenize")
                .into_inner()
                .token;
            let revealed = client
                .reveal(with_traceparent(
                    pb::RevealRequest {
                        token: token.clone(),
                    },
                    trace_id,
                    caller_span,
                ))
                .await
                .expect("reveal")
                .into_inner();
            assert_eq!(revealed.number, pan);
            let cvc = "739";
            let charged_token = card(client, cards::SUCCESS, cvc).await;
            let charge = client
                .charge(with_traceparent(
                    charge_request(&charged_token, "stripe", "otel-1"),
                    trace_id,
                    caller_span,
                ))
                .await
                .expect("charge")
                .into_inner();

            let names = [
                "cardvault.v1.CardVault/Tokenize",
                "cardvault.v1.CardVault/Reveal",
                "cardvault.v1.CardVault/Charge",
            ];
            let spans = wait_for(&traces, &collector, &names).await;
            for name in names {
                let span = server_span(
                    &spans
                        .iter()
                        .filter(|s| hex(&s.trace_id) == trace_id)
                        .cloned()
                        .collect::<Vec<_>>(),
                    name,
                )
                .clone();
                assert_eq!(hex(&span.parent_span_id), caller_span, "{name}");
                assert_eq!(string_attribute(&span, "rpc.system"), "grpc");
                assert_eq!(
                    string_attribute(&span, "rpc.service"),
                    "cardvault.v1.CardVault"
                );
                assert_eq!(
                    format!(
                        "cardvault.v1.CardVault/{}",
                        string_attribute(&span, "rpc.method")
                    ),
                    name
                );
                assert_eq!(int_attribute(&span, "rpc.grpc.status_code"), 0, "{name}");
                assert_eq!(string_attribute(&span, "tenant"), "dev");
                assert!(!string_attribute(&span, "principal").is_empty());
                assert!(!string_attribute(&span, "request_id").is_empty());
            }

            // The gateway request: a client span in the caller's trace, under the Charge.
            let charge_span = server_span(&spans, "cardvault.v1.CardVault/Charge").clone();
            let gateway: Vec<&Span> = spans
                .iter()
                .filter(|s| s.name == "gateway.request")
                .collect();
            assert!(!gateway.is_empty(), "no gateway span: {spans:#?}");
            for span in &gateway {
                assert_eq!(span.kind, SpanKind::Client as i32);
                assert_eq!(hex(&span.trace_id), trace_id);
                assert!(
                    descends_from(span, &charge_span, &spans),
                    "{span:#?} is not under {charge_span:#?}"
                );
                assert_eq!(string_attribute(span, "http.request.method"), "POST");
                assert_eq!(string_attribute(span, "cardvault.gateway"), "stripe");
                assert_eq!(int_attribute(span, "http.response.status_code"), 200);
                assert!(attribute(&span.attributes, "url.full").is_none());
            }

            // The database commits: a batch's span is a child of the call that opened the
            // batch, so the traced Tokenize and Reveal (whose audit record is committed
            // before the number leaves) each show theirs.
            let in_trace: Vec<Span> = spans
                .iter()
                .filter(|s| hex(&s.trace_id) == trace_id)
                .cloned()
                .collect();
            for name in [
                "cardvault.v1.CardVault/Tokenize",
                "cardvault.v1.CardVault/Reveal",
            ] {
                let call = server_span(&in_trace, name);
                let commits: Vec<&Span> = in_trace
                    .iter()
                    .filter(|s| s.name == "db.batch_commit" && descends_from(s, call, &in_trace))
                    .collect();
                assert!(
                    !commits.is_empty(),
                    "no db.batch_commit under {name}: {in_trace:#?}"
                );
                for commit in commits {
                    assert_eq!(string_attribute(commit, "db.system"), "postgresql");
                    assert!(int_attribute(commit, "db.batch.size") >= 1, "{commit:#?}");
                }
            }
            // Key-provider calls made for a traced call sit under it too.
            for span in in_trace.iter().filter(|s| s.name.starts_with("kms.")) {
                assert!(
                    names
                        .iter()
                        .any(|n| descends_from(span, server_span(&in_trace, n), &in_trace)),
                    "{span:#?} is under none of the calls"
                );
            }

            // No card data, token or CVC anywhere in what was exported.
            let requests = collector.requests();
            assert!(!requests.is_empty());
            for request in &requests {
                let bytes = request.encode_to_vec();
                let text = format!("{request:?}");
                for secret in [
                    pan.as_str(),
                    cards::SUCCESS,
                    token.as_str(),
                    charged_token.as_str(),
                    charge.charge_id.as_str(),
                ] {
                    // The charge id is not secret, but must not have been needed either.
                    if secret == charge.charge_id {
                        continue;
                    }
                    assert!(!text.contains(secret), "exported: {secret}");
                    assert!(
                        !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                        "exported bytes hold {secret}"
                    );
                }
                // A 3-digit CVC would match digits of timestamps and ids by chance: look for
                // it as a whole string or number value instead.
                assert!(!text.contains(&format!("StringValue(\"{cvc}\")")));
                assert!(!text.contains(&format!("IntValue({cvc})")));
            }

            // Every JSON log line of the traced calls carries the caller's trace id.
            let logs = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf8");
            let request_lines: Vec<&str> = logs
                .lines()
                .filter(|l| l.contains("\"message\":\"request\""))
                .filter(|l| l.contains(trace_id))
                .collect();
            assert_eq!(request_lines.len(), 3, "{logs}");
            // Also lines logged inside a child span: the server span heads their span list.
            let in_spans: Vec<&str> = logs.lines().filter(|l| l.contains("\"span\":{")).collect();
            assert!(in_spans.len() >= 3, "{logs}");
            for line in in_spans {
                assert!(line.contains("\"request_id\""), "{line}");
                assert!(line.contains("\"trace_id\""), "{line}");
            }
            assert!(!logs.contains(&pan));
        },
    );
}

/// Whether `span` is `ancestor` or under it, following parents within `spans`.
fn descends_from(span: &Span, ancestor: &Span, spans: &[Span]) -> bool {
    let mut current = span.clone();
    for _ in 0..16 {
        if current.parent_span_id == ancestor.span_id {
            return true;
        }
        match spans.iter().find(|s| s.span_id == current.parent_span_id) {
            Some(parent) => current = parent.clone(),
            None => return false,
        }
    }
    false
}

#[test]
fn a_collector_that_is_down_fails_no_call_and_the_lost_spans_are_counted() {
    // Nothing listens on a port that was bound and released.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = dead.local_addr().expect("addr");
    drop(dead);
    traced(
        &format!("http://{addr}"),
        |settings| {
            settings.telemetry.export_timeout_ms = 500;
            settings.telemetry.max_export_batch_size = 8;
        },
        |traces, _| async move {
            let state = Arc::new(crate::helpers::AppState::new(Backend::Postgres).await);
            let settings = state.settings("dev");
            let mut app = spawn_with(state, "dev", settings).await;
            for _ in 0..40 {
                app.client
                    .tokenize(tokenize_request(&unique_pan()))
                    .await
                    .expect("tokenize succeeds with the collector down");
            }
            traces.flush(Duration::from_secs(30)).await;
            assert!(traces.dropped().get() > 0, "no span counted as dropped");
            let metrics = http_get(app.admin_addr, "/metrics").await;
            let dropped: f64 = metrics
                .lines()
                .filter(|l| l.starts_with(telemetry::DROPPED_METRIC))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            assert!(dropped > 0.0, "{metrics}");
            app.stop().await;
            traces.shutdown().await;
        },
    );
}
