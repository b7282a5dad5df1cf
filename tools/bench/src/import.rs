//! `--rpc import`: `--requests` random cards through `ImportCards`, in chunks of `--chunk`,
//! over `--connections` streams at once (one per connection), each stream keeping up to
//! [`CHUNKS_IN_FLIGHT`] chunks unanswered. Reports cards per second, the latency of a chunk
//! (from when it was handed to the stream until its answer, i.e. durably committed: it
//! includes the time it queued behind the chunks ahead of it), and the cards by outcome.

use std::{collections::BTreeMap, time::Duration};

use ring::rand::SystemRandom;
use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};
use tonic::Request;

use super::{
    Bench, BenchError, End, Latency, RpcStats,
    cards::{CardGenerator, FastRng},
    error_chain,
    report::code_name,
};
use cardvault::pb::v1::{self as pb, card_vault_client::CardVaultClient};

/// Chunks a stream sends ahead of the answers: enough to keep the vault's pipeline (4 chunks
/// per stream) full while the next one is generated.
pub const CHUNKS_IN_FLIGHT: usize = 4;

/// The result of an import run.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The `--target` URI.
    pub target: String,
    /// Streams (= connections).
    pub streams: usize,
    /// Cards per chunk.
    pub chunk: usize,
    /// From the first chunk sent to the last answer.
    pub duration: Duration,
    /// Cards sent.
    pub cards: u64,
    /// Cards by outcome (`created`, `already_imported`, `invalid`, `conflict`).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Chunks answered and their latency; failed streams by status code.
    pub chunks: RpcStats,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    rpc: &'static str,
    target: &'a str,
    streams: usize,
    chunk: usize,
    duration_s: f64,
    cards: u64,
    cards_per_s: f64,
    outcomes: &'a BTreeMap<&'static str, u64>,
    chunks: u64,
    stream_errors: BTreeMap<&'static str, u64>,
    chunk_latency_ms: Option<Latency>,
}

impl ImportReport {
    /// Cards answered per second of the run.
    pub fn cards_per_second(&self) -> f64 {
        let answered: u64 = self.outcomes.values().sum();
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            answered as f64 / secs
        } else {
            0.0
        }
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> String {
        let json = JsonReport {
            rpc: "import",
            target: &self.target,
            streams: self.streams,
            chunk: self.chunk,
            duration_s: (self.duration.as_secs_f64() * 1000.0).round() / 1000.0,
            cards: self.cards,
            cards_per_s: self.cards_per_second().round(),
            outcomes: &self.outcomes,
            chunks: self.chunks.ok,
            stream_errors: self.chunks.errors(),
            chunk_latency_ms: self.chunks.latency_ms(),
        };
        serde_json::to_string(&json).expect("report serializes")
    }

    /// The report as text.
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "cardvault-bench: import against {}, {} stream(s), {} cards per chunk\n  \
             duration    {:.2} s\n  cards       {} sent\n  throughput  {:.0} cards/s\n",
            self.target,
            self.streams,
            self.chunk,
            self.duration.as_secs_f64(),
            self.cards,
            self.cards_per_second(),
        );
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        text.push_str(&format!("  outcomes    {}\n", outcomes.join(", ")));
        if let Some(l) = self.chunks.latency_ms() {
            text.push_str(&format!(
                "  chunk ms    p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  ({} chunks)\n",
                l.p50, l.p90, l.p99, l.max, self.chunks.ok
            ));
        }
        for (code, n) in self.chunks.errors() {
            text.push_str(&format!("  stream error {code} {n}\n"));
        }
        text
    }
}

/// Runs the import: the cards are split evenly over the streams.
pub(super) async fn run(bench: &Bench) -> Result<ImportReport, BenchError> {
    let End::Requests(cards) = bench.end else {
        return Err(BenchError::Usage(
            "--rpc import needs --requests N: the number of cards to import".to_owned(),
        ));
    };
    let channels = super::runner::connect(bench).await?;
    let system = SystemRandom::new();
    let this_year = u32::try_from(time::OffsetDateTime::now_utc().year()).unwrap_or(2026);
    // Import ids must be unique per tenant across runs too: a random prefix per run.
    let run_id = FastRng::from_os(&system)
        .map_err(|_| BenchError::Random)?
        .below(u64::MAX);
    let streams = channels.len() as u64;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, channel) in channels.into_iter().enumerate() {
        let index = index as u64;
        let share = cards / streams + u64::from(index < cards % streams);
        let rng = FastRng::from_os(&system).map_err(|_| BenchError::Random)?;
        let generator = CardGenerator::new(rng, this_year);
        let stream = Stream {
            client: CardVaultClient::new(channel),
            authorization: bench.authorization.clone(),
            generator,
            chunk: bench.chunk,
            id_prefix: format!("bench-{}-{}-", letters(run_id), letters(index)),
            token_format: bench.token_format as i32,
        };
        tasks.spawn(stream.run(share));
    }
    let mut outcomes = BTreeMap::new();
    let mut chunks = RpcStats::new();
    while let Some(done) = tasks.join_next().await {
        let (stream_outcomes, stream_chunks) =
            done.map_err(|e| BenchError::Usage(format!("an import stream panicked: {e}")))?;
        for (name, n) in stream_outcomes {
            *outcomes.entry(name).or_insert(0) += n;
        }
        chunks.merge(&stream_chunks);
    }
    Ok(ImportReport {
        target: bench.target.clone(),
        streams: streams as usize,
        chunk: bench.chunk,
        duration: started.elapsed(),
        cards,
        outcomes,
        chunks,
    })
}

/// `n` in base 26 as letters. Import ids are stored in clear, so the vault refuses one in
/// which digit groups could spell a card number; ids without digits never trip that check.
fn letters(mut n: u64) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        n /= 26;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

struct Stream {
    client: CardVaultClient<tonic::transport::Channel>,
    authorization: Option<tonic::metadata::AsciiMetadataValue>,
    generator: CardGenerator,
    chunk: usize,
    id_prefix: String,
    token_format: i32,
}

impl Stream {
    /// Sends `cards` cards and reads every answer; a failed stream counts once, by code.
    async fn run(mut self, cards: u64) -> (BTreeMap<&'static str, u64>, RpcStats) {
        let mut outcomes = BTreeMap::new();
        let mut stats = RpcStats::new();
        if cards == 0 {
            return (outcomes, stats);
        }
        let (tx, rx) = mpsc::channel::<pb::ImportCardsRequest>(CHUNKS_IN_FLIGHT);
        // Send times of unanswered chunks, in order: answers come in request order.
        let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Instant>();
        let chunk = self.chunk as u64;
        let mut generator = self.generator;
        let prefix = self.id_prefix;
        let token_format = self.token_format;
        let producer = tokio::spawn(async move {
            let mut next = 0u64;
            while next < cards {
                let n = chunk.min(cards - next);
                let request = pb::ImportCardsRequest {
                    cards: (next..next + n)
                        .map(|i| pb::ImportCard {
                            import_id: format!("{prefix}{}", letters(i)),
                            card: Some(generator.card()),
                            metadata: Default::default(),
                            token_format,
                        })
                        .collect(),
                };
                next += n;
                let _ = sent_tx.send(Instant::now());
                if tx.send(request).await.is_err() {
                    return;
                }
            }
        });
        let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(auth) = &self.authorization {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        let outcome = async {
            let mut answers = self.client.import_cards(request).await?.into_inner();
            while let Some(answer) = answers.message().await? {
                let sent = sent_rx.recv().await.unwrap_or_else(Instant::now);
                stats.record_ok(sent.elapsed());
                for result in answer.results {
                    let name = match pb::ImportStatus::try_from(result.status) {
                        Ok(pb::ImportStatus::Created) => "created",
                        Ok(pb::ImportStatus::AlreadyImported) => "already_imported",
                        Ok(pb::ImportStatus::Invalid) => "invalid",
                        Ok(pb::ImportStatus::Conflict) => "conflict",
                        _ => "unknown",
                    };
                    *outcomes.entry(name).or_insert(0) += 1;
                }
            }
            Ok::<(), tonic::Status>(())
        }
        .await;
        if let Err(status) = outcome {
            eprintln!(
                "cardvault-bench: an import stream failed: {} ({})",
                code_name(status.code()),
                error_chain(&status)
            );
            stats.record_error(status.code());
        }
        producer.abort();
        (outcomes, stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_ids_are_distinct_and_digit_free() {
        let ids: std::collections::HashSet<String> = (0..100_000).map(letters).collect();
        assert_eq!(ids.len(), 100_000);
        assert!(ids.iter().all(|id| !id.bytes().any(|b| b.is_ascii_digit())));
        assert_eq!(letters(0), "a");
        assert_eq!(letters(26), "ba");
    }
}
