//! An OTLP/gRPC trace collector that keeps nothing: it counts the spans it receives and
//! prints the count every few seconds and on Ctrl-C / SIGTERM. For measuring what trace
//! export costs the vault (scripts/otel-overhead), without a real collector.
//!
//! With `--print` it also prints every span it receives, one line each (trace, span, parent,
//! name, duration, attributes), to see a trace's shape by hand.
//!
//! ```sh
//! cargo run --release --example otlp_sink                  # listens on 127.0.0.1:4317
//! cargo run --release --example otlp_sink -- 127.0.0.1:14317
//! cargo run --release --example otlp_sink -- 127.0.0.1:14317 --print
//! ```

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    trace::v1::Span,
};

#[derive(Default, Clone)]
struct Sink {
    spans: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    print: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One line per span; attribute values as the protobuf's `Debug` shows them.
fn print_span(span: &Span) {
    let parent = if span.parent_span_id.is_empty() {
        "-".to_owned()
    } else {
        hex(&span.parent_span_id)
    };
    let micros = span
        .end_time_unix_nano
        .saturating_sub(span.start_time_unix_nano)
        / 1_000;
    let attributes: Vec<String> = span
        .attributes
        .iter()
        .map(|kv| {
            let value = kv.value.as_ref().and_then(|v| v.value.as_ref());
            format!("{}={value:?}", kv.key)
        })
        .collect();
    println!(
        "span trace={} id={} parent={parent} name={:?} kind={} us={micros} {}",
        hex(&span.trace_id),
        hex(&span.span_id),
        span.name,
        span.kind,
        attributes.join(" ")
    );
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.print {
            for span in request
                .get_ref()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
            {
                print_span(span);
            }
        }
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans
            .fetch_add(u64::try_from(spans).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Sink {
    fn report(&self) {
        println!(
            "otlp_sink: {} spans in {} export requests",
            self.spans.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed)
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let print = args.iter().any(|a| a == "--print");
    let addr: SocketAddr = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or("127.0.0.1:4317", String::as_str)
        .parse()?;
    let sink = Sink {
        print,
        ..Sink::default()
    };
    let ticker = sink.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        every.tick().await;
        loop {
            every.tick().await;
            ticker.report();
        }
    });
    println!("otlp_sink: listening on {addr}");
    let stop = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(term) => { term.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink.clone()))
        .serve_with_shutdown(addr, stop)
        .await?;
    sink.report();
    Ok(())
}
