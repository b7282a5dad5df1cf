//! Logging and traces, composed once. Spans use `skip_all`, and request messages are never
//! recorded, so card data cannot become a log field or span attribute by accident.

pub mod propagation;
mod queue;
mod traces;

use tracing::Subscriber;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, fmt::MakeWriter, layer::SubscriberExt,
};

pub use self::{
    queue::{DROPPED_METRIC, Dropped},
    traces::{Traces, TracesError, enabled as traces_enabled},
};
use crate::config::LogFormat;

/// A subscriber writing `format` lines to `writer`, filtered by `RUST_LOG` when set, else by
/// `level`.
pub fn subscriber<W>(
    format: LogFormat,
    level: &str,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync + 'static>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    subscriber_with_traces(format, level, writer, None)
}

/// As [`subscriber`], also exporting spans through `traces` when given: only the vault's
/// own spans and events (target `cardvault`, info and above), never those of its libraries.
pub fn subscriber_with_traces<W>(
    format: LogFormat,
    level: &str,
    writer: W,
    traces: Option<&Traces>,
) -> Box<dyn Subscriber + Send + Sync + 'static>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let otel = traces.map(|traces| {
        tracing_opentelemetry::layer()
            .with_tracer(traces.tracer())
            // Source locations, thread names and busy/idle times add bytes to every span
            // and say nothing an operator reads a trace for.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target("cardvault", tracing::Level::INFO))
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match format {
        LogFormat::Json => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    // The whole list: a line logged inside a child span (a vault operation,
                    // a gateway request) still carries the call's request id and trace id,
                    // which live on the server span at the list's root.
                    .with_span_list(true)
                    .with_writer(writer),
            ),
        ),
        LogFormat::Pretty => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_writer(writer),
            ),
        ),
    }
}

/// Installs `subscriber` as the global default.
pub fn init(subscriber: Box<dyn Subscriber + Send + Sync + 'static>) {
    // Fails only if a subscriber is already set (tests), which is fine to keep.
    let _ = tracing::subscriber::set_global_default(subscriber);
}

/// Replaces the default panic message with one that omits the payload: a panic message is
/// built from whatever values the panicking code had at hand, and those must never reach a
/// log. The location is enough to find the bug.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown location".to_owned());
        tracing::error!(%location, "panic (message withheld: it may contain request data)");
        eprintln!("cardvault panicked at {location} (message withheld)");
    }));
}

/// An error and all its sources, joined by `: ` — "outer: inner: innermost" — for logs and
/// for the one line a command prints when it fails ("database unavailable" or "transport
/// error" alone would hide a TLS or auth cause). A cause that repeats the text before it
/// (hyper and tonic often repeat their source's message) is said once. The crate's error
/// types never carry card data, so the chain is safe to log.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
