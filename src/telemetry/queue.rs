//! The span export queue: finished spans go into a bounded channel that a tokio task drains
//! in batches to the exporter. A request never waits for the collector: when the channel is
//! full the span is dropped, and a batch the exporter could not deliver (collector down,
//! slow past the export timeout) is dropped too; both are counted in
//! `cardvault_otel_spans_dropped_total{reason}` and in [`Dropped`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry::Context;
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    trace::{Span, SpanData, SpanExporter, SpanProcessor},
};
use tokio::sync::{mpsc, oneshot};

/// The Prometheus counter of spans that never reached the collector.
pub const DROPPED_METRIC: &str = "cardvault_otel_spans_dropped_total";

/// Limits of the export queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueOptions {
    /// Spans held waiting for export; past it new spans are dropped.
    pub max_queue_size: usize,
    /// Spans sent in one export call.
    pub max_batch_size: usize,
    /// How long a partial batch waits for more spans before it is sent.
    pub scheduled_delay: Duration,
    /// How long one export call may take before its batch is given up.
    pub export_timeout: Duration,
}

/// Spans dropped so far by one queue, shared with whoever wants to read it.
#[derive(Debug, Clone, Default)]
pub struct Dropped(Arc<AtomicU64>);

impl Dropped {
    /// Spans dropped so far (queue full or export failed).
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, spans: usize, reason: &'static str) {
        let spans = u64::try_from(spans).unwrap_or(u64::MAX);
        self.0.fetch_add(spans, Ordering::Relaxed);
        metrics::counter!(DROPPED_METRIC, "reason" => reason).increment(spans);
    }
}

enum Message {
    Span(Box<SpanData>),
    /// Export everything queued before this message, then answer.
    Flush(oneshot::Sender<()>),
    /// Export what is queued, then stop.
    Shutdown(oneshot::Sender<()>),
}

/// The processor half, installed in the tracer provider; [`QueueHandle`] drives the worker.
#[derive(Debug)]
pub struct QueueProcessor {
    sender: mpsc::Sender<Message>,
    dropped: Dropped,
}

/// Flushes and stops the worker from async code, where blocking would stall the runtime.
#[derive(Debug, Clone)]
pub struct QueueHandle {
    sender: mpsc::Sender<Message>,
    dropped: Dropped,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the span itself: its attributes are not for Debug output.
        f.write_str(match self {
            Message::Span(_) => "Span",
            Message::Flush(_) => "Flush",
            Message::Shutdown(_) => "Shutdown",
        })
    }
}

/// Starts the worker on `runtime` and returns the processor to install and its handle.
pub fn start<E>(
    exporter: E,
    options: QueueOptions,
    runtime: &tokio::runtime::Handle,
) -> (QueueProcessor, QueueHandle)
where
    E: SpanExporter + 'static,
{
    // Flush and shutdown messages share the channel; one slot more than the spans keeps a
    // full queue from refusing them for long (they are retried, see `QueueHandle::send`).
    let (sender, receiver) = mpsc::channel(options.max_queue_size.max(1));
    let dropped = Dropped::default();
    runtime.spawn(worker(exporter, receiver, options, dropped.clone()));
    (
        QueueProcessor {
            sender: sender.clone(),
            dropped: dropped.clone(),
        },
        QueueHandle { sender, dropped },
    )
}

async fn worker<E: SpanExporter>(
    exporter: E,
    mut receiver: mpsc::Receiver<Message>,
    options: QueueOptions,
    dropped: Dropped,
) {
    let batch_size = options.max_batch_size.max(1);
    let mut batch: Vec<SpanData> = Vec::with_capacity(batch_size);
    loop {
        let message = if batch.is_empty() {
            receiver.recv().await
        } else {
            match tokio::time::timeout(options.scheduled_delay, receiver.recv()).await {
                Ok(message) => message,
                Err(_) => {
                    export(&exporter, &mut batch, options.export_timeout, &dropped).await;
                    continue;
                }
            }
        };
        match message {
            Some(Message::Span(span)) => {
                batch.push(*span);
                if batch.len() >= batch_size {
                    export(&exporter, &mut batch, options.export_timeout, &dropped).await;
                }
            }
            Some(Message::Flush(done)) => {
                export(&exporter, &mut batch, options.export_timeout, &dropped).await;
                let _ = done.send(());
            }
            Some(Message::Shutdown(done)) => {
                export(&exporter, &mut batch, options.export_timeout, &dropped).await;
                let _ = exporter.shutdown_with_timeout(options.export_timeout);
                let _ = done.send(());
                break;
            }
            None => {
                export(&exporter, &mut batch, options.export_timeout, &dropped).await;
                break;
            }
        }
    }
    // Spans that arrive after shutdown are not exported: count them.
    receiver.close();
    while let Ok(message) = receiver.try_recv() {
        if let Message::Span(_) = message {
            dropped.add(1, "shutdown");
        }
    }
}

/// Sends `batch` (emptying it) within `timeout`; on failure its spans are counted dropped.
async fn export<E: SpanExporter>(
    exporter: &E,
    batch: &mut Vec<SpanData>,
    timeout: Duration,
    dropped: &Dropped,
) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let count = spans.len();
    match tokio::time::timeout(timeout, exporter.export(spans)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            dropped.add(count, "export_failed");
            // The exporter's error names the endpoint and transport cause, never span data.
            tracing::debug!(error = %err, spans = count, "span export failed");
        }
        Err(_) => {
            dropped.add(count, "export_timeout");
            tracing::debug!(spans = count, "span export timed out");
        }
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.sender.try_send(Message::Span(Box::new(span))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.dropped.add(1, "queue_full"),
            Err(mpsc::error::TrySendError::Closed(_)) => self.dropped.add(1, "shutdown"),
        }
    }

    /// Asks the worker to export what it holds without waiting: this is called from
    /// synchronous code that may be on a runtime thread. [`QueueHandle::flush`] waits.
    fn force_flush(&self) -> OTelSdkResult {
        let (done, _) = oneshot::channel();
        self.sender
            .try_send(Message::Flush(done))
            .map_err(|_| OTelSdkError::InternalFailure("span queue full or closed".to_owned()))
    }

    /// As [`SpanProcessor::force_flush`]: asks, does not wait. [`QueueHandle::shutdown`]
    /// waits, with a bound.
    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        let (done, _) = oneshot::channel();
        match self.sender.try_send(Message::Shutdown(done)) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(OTelSdkError::InternalFailure(
                "span queue full at shutdown".to_owned(),
            )),
        }
    }

    fn set_resource(&mut self, _resource: &Resource) {}
}

impl QueueHandle {
    /// Spans dropped so far.
    pub fn dropped(&self) -> &Dropped {
        &self.dropped
    }

    /// Waits until every span queued before this call was exported or dropped, at most
    /// `timeout`; false if the time ran out.
    pub async fn flush(&self, timeout: Duration) -> bool {
        self.request(Message::Flush, timeout).await
    }

    /// Exports what is queued and stops the worker, waiting at most `timeout`; false if the
    /// time ran out (the rest is then lost, as a collector that slow would lose it anyway).
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        self.request(Message::Shutdown, timeout).await
    }

    async fn request(
        &self,
        message: impl FnOnce(oneshot::Sender<()>) -> Message,
        timeout: Duration,
    ) -> bool {
        let (done, answer) = oneshot::channel();
        tokio::time::timeout(timeout, async {
            // Waits for room: a full queue drains as the worker exports.
            if self.sender.send(message(done)).await.is_err() {
                return;
            }
            let _ = answer.await;
        })
        .await
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, Default, Clone)]
    struct Recording {
        fail: bool,
        exported: Arc<Mutex<usize>>,
    }

    impl SpanExporter for Recording {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.fail {
                return Err(OTelSdkError::InternalFailure("collector down".to_owned()));
            }
            *self.exported.lock().expect("lock") += batch.len();
            Ok(())
        }
    }

    fn options(queue: usize) -> QueueOptions {
        QueueOptions {
            max_queue_size: queue,
            max_batch_size: 4,
            scheduled_delay: Duration::from_millis(50),
            export_timeout: Duration::from_secs(1),
        }
    }

    fn provider(processor: QueueProcessor) -> opentelemetry_sdk::trace::SdkTracerProvider {
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build()
    }

    fn make_spans(provider: &opentelemetry_sdk::trace::SdkTracerProvider, n: usize) {
        use opentelemetry::trace::{Tracer, TracerProvider};
        let tracer = provider.tracer("test");
        for _ in 0..n {
            drop(tracer.start("span"));
        }
    }

    #[tokio::test]
    async fn queued_spans_reach_the_exporter_on_flush() {
        let exporter = Recording::default();
        let (processor, handle) = start(
            exporter.clone(),
            options(64),
            &tokio::runtime::Handle::current(),
        );
        let provider = provider(processor);
        make_spans(&provider, 10);
        assert!(handle.flush(Duration::from_secs(5)).await);
        assert_eq!(*exporter.exported.lock().expect("lock"), 10);
        assert_eq!(handle.dropped().get(), 0);
        assert!(handle.shutdown(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn failed_exports_are_counted_as_dropped() {
        let exporter = Recording {
            fail: true,
            ..Recording::default()
        };
        let (processor, handle) = start(exporter, options(64), &tokio::runtime::Handle::current());
        let provider = provider(processor);
        make_spans(&provider, 7);
        assert!(handle.shutdown(Duration::from_secs(5)).await);
        assert_eq!(handle.dropped().get(), 7);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_instead_of_blocking() {
        // On a current-thread runtime the worker cannot run while spans are made: the
        // queue of 3 fills and the rest are dropped, without the caller waiting.
        let exporter = Recording::default();
        let (processor, handle) = start(
            exporter.clone(),
            options(3),
            &tokio::runtime::Handle::current(),
        );
        let provider = provider(processor);
        make_spans(&provider, 10);
        assert_eq!(handle.dropped().get(), 7);
        assert!(handle.shutdown(Duration::from_secs(5)).await);
        assert_eq!(*exporter.exported.lock().expect("lock"), 3);
    }
}
