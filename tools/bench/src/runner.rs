//! Connections, the token pool, the workers (closed or open loop) and the progress line.
//!
//! Workers keep their own stats and merge them at the end, so the request path takes no
//! lock; only a few relaxed atomic counters are shared, for the progress line and for
//! handing out requests or open-loop slots.

use std::{
    io::{IsTerminal, Write as _},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use ring::rand::SystemRandom;
use tokio::{task::JoinSet, time::Instant};
use tonic::{Request, Status, metadata::AsciiMetadataValue, transport::Channel};

use super::{
    Bench, BenchError, End, LATE_AFTER, MIX_GET_PERCENT, MIX_TOKENIZE_PERCENT, Progress, Rpc,
    Workload,
    cards::{CardGenerator, FastRng},
    error_chain,
    report::{Report, RpcStats, code_name},
};
use cardvault::pb::v1::{self as pb, card_vault_client::CardVaultClient};

pub(super) async fn run(
    bench: &Bench,
    progress: Progress,
    interrupt: impl Future<Output = ()> + Send + 'static,
) -> Result<Report, BenchError> {
    let channels = connect(bench).await?;
    let stop = Arc::new(Stop::default());
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            interrupt.await;
            stop.set();
        })
    };
    let result = run_connected(bench, progress, &channels, stop).await;
    watcher.abort();
    result
}

/// Set once by the interrupt; remembers when, for the open loop's missed-slot count.
#[derive(Debug, Default)]
struct Stop {
    stopped: AtomicBool,
    at: std::sync::OnceLock<Instant>,
}

impl Stop {
    fn set(&self) {
        let _ = self.at.set(Instant::now());
        self.stopped.store(true, Relaxed);
    }

    fn is_set(&self) -> bool {
        self.stopped.load(Relaxed)
    }
}

/// One channel per connection: a tonic `Channel` is one HTTP/2 connection.
pub(super) async fn connect(bench: &Bench) -> Result<Vec<Channel>, BenchError> {
    let mut channels = Vec::with_capacity(bench.connections);
    for _ in 0..bench.connections {
        let channel = bench
            .endpoint
            .connect()
            .await
            .map_err(|e| BenchError::Connect {
                target: bench.target.clone(),
                cause: error_chain(&e),
            })?;
        channels.push(channel);
    }
    Ok(channels)
}

async fn run_connected(
    bench: &Bench,
    progress: Progress,
    channels: &[Channel],
    stop: Arc<Stop>,
) -> Result<Report, BenchError> {
    let system = SystemRandom::new();
    let this_year = u32::try_from(time::OffsetDateTime::now_utc().year()).unwrap_or(2026);
    let mut generators = (0..bench.concurrency)
        .map(|_| {
            FastRng::from_os(&system)
                .map(|rng| CardGenerator::new(rng, this_year))
                .map_err(|_| BenchError::Random)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let callers: Vec<Caller> = (0..bench.concurrency)
        .map(|i| Caller {
            client: CardVaultClient::new(channels[i % channels.len()].clone()),
            authorization: bench.authorization.clone(),
            token_format: bench.token_format as i32,
        })
        .collect();

    let pool: Arc<[String]> = if bench.pool > 0 {
        build_pool(bench, progress, &callers, &mut generators, &stop).await?
    } else {
        Arc::from(Vec::new())
    };
    if stop.is_set() {
        return Err(BenchError::Interrupted);
    }

    let start = Instant::now();
    let measure_from = start + bench.warmup;
    let schedule = bench.rate.map(|rate| Schedule::new(rate, bench, start));
    let shared = Arc::new(Shared {
        workload: bench.workload,
        measure_from,
        end: bench.end,
        deadline: match bench.end {
            End::After(duration) => Some(measure_from + duration),
            End::Requests(_) => None,
        },
        schedule,
        claimed: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        measured: AtomicU64::new(0),
        measured_errors: AtomicU64::new(0),
        stop: stop.clone(),
        pool,
    });

    let mut workers = JoinSet::new();
    for (caller, cards) in callers.into_iter().zip(generators) {
        workers.spawn(worker(shared.clone(), caller, cards));
    }
    let ticker = (progress == Progress::Stderr).then(|| {
        let shared = shared.clone();
        tokio::spawn(progress_line(
            shared,
            start,
            std::io::stderr().is_terminal(),
        ))
    });

    let mut by_rpc: Vec<(Rpc, RpcStats)> = bench
        .workload
        .rpcs()
        .iter()
        .map(|&rpc| (rpc, RpcStats::new()))
        .collect();
    let mut late = 0;
    while let Some(joined) = workers.join_next().await {
        // A worker only ends by returning its stats; a panic would be a bug to surface.
        let outcome = joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        for (rpc, stats) in &mut by_rpc {
            stats.merge(&outcome.stats[rpc.index()]);
        }
        late += outcome.late;
    }
    let finished = Instant::now();
    if let Some(ticker) = ticker {
        ticker.abort();
        finish_progress_line();
    }

    let requests: u64 = by_rpc.iter().map(|(_, s)| s.requests).sum();
    let missed = shared
        .schedule
        .as_ref()
        .map(|s| s.missed(requests, stop.at.get().copied()));
    Ok(Report {
        workload: bench.workload,
        target: bench.target.clone(),
        concurrency: bench.concurrency,
        connections: bench.connections,
        rate: bench.rate,
        duration: finished.saturating_duration_since(measure_from),
        by_rpc,
        late_sends: shared.schedule.as_ref().map(|_| late),
        missed_sends: missed,
        interrupted: stop.is_set(),
    })
}

/// Tokenizes `bench.pool` cards with every worker's caller, unmeasured; fails on the first
/// error, since reading a pool that is not there measures nothing.
async fn build_pool(
    bench: &Bench,
    progress: Progress,
    callers: &[Caller],
    generators: &mut [CardGenerator],
    stop: &Arc<Stop>,
) -> Result<Arc<[String]>, BenchError> {
    let started = Instant::now();
    if progress == Progress::Stderr {
        eprintln!("pool: tokenizing {} cards (not measured)…", bench.pool);
    }
    let next = Arc::new(AtomicU64::new(0));
    let target = bench.pool as u64;
    let mut tasks = JoinSet::new();
    let workers = bench.concurrency.min(bench.pool);
    for (caller, cards) in callers.iter().zip(generators.iter_mut()).take(workers) {
        let mut caller = caller.clone();
        let mut cards = cards.split();
        let next = next.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut tokens = Vec::new();
            while next.fetch_add(1, Relaxed) < target && !stop.is_set() {
                let token = caller.tokenize(&mut cards).await?;
                tokens.push(token);
            }
            Ok::<_, Status>(tokens)
        });
    }
    let mut pool = Vec::with_capacity(bench.pool);
    while let Some(joined) = tasks.join_next().await {
        let tokens = joined
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
            .map_err(|status| {
                BenchError::Pool(format!(
                    "{}: {}",
                    code_name(status.code()),
                    status.message()
                ))
            })?;
        pool.extend(tokens);
    }
    if stop.is_set() {
        return Err(BenchError::Interrupted);
    }
    if progress == Progress::Stderr {
        eprintln!(
            "pool: {} tokens in {:.1} s",
            pool.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(Arc::from(pool))
}

/// A worker's handle on one connection, with the parts of every request it reuses.
#[derive(Clone)]
struct Caller {
    /// A clone of one connection's channel: cheap, and it keeps requests on that connection.
    client: CardVaultClient<Channel>,
    /// Cloning a header value shares its bytes, so the key is not copied per request.
    authorization: Option<AsciiMetadataValue>,
    token_format: i32,
}

impl Caller {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    fn tokenize_request(&self, cards: &mut CardGenerator) -> Request<pb::TokenizeRequest> {
        self.request(pb::TokenizeRequest {
            card: Some(cards.card()),
            token_format: self.token_format,
            ..Default::default()
        })
    }

    async fn tokenize(&mut self, cards: &mut CardGenerator) -> Result<String, Status> {
        let request = self.tokenize_request(cards);
        Ok(self.client.tokenize(request).await?.into_inner().token)
    }

    /// Sends one request of `rpc`. tonic takes each message by value and encodes it into its
    /// own buffer, so a fresh card or a clone of a pooled token per request is the floor;
    /// everything else (client, header, generator) is reused. Answers are dropped unread:
    /// a reveal's card data is never looked at, let alone printed.
    async fn call(
        &mut self,
        rpc: Rpc,
        cards: &mut CardGenerator,
        pool: &[String],
    ) -> Result<(), Status> {
        match rpc {
            Rpc::Tokenize => {
                let request = self.tokenize_request(cards);
                self.client.tokenize(request).await.map(drop)
            }
            Rpc::Get => {
                let token = pick_token(cards, pool);
                let request = self.request(pb::GetCardRequest { token });
                self.client.get_card(request).await.map(drop)
            }
            Rpc::Reveal => {
                let token = pick_token(cards, pool);
                let request = self.request(pb::RevealRequest { token });
                self.client.reveal(request).await.map(drop)
            }
        }
    }
}

fn pick_token(cards: &mut CardGenerator, pool: &[String]) -> String {
    pool[cards.rng().below(pool.len() as u64) as usize].clone()
}

/// What every worker reads.
struct Shared {
    workload: Workload,
    measure_from: Instant,
    end: End,
    /// End of the measured phase for a duration run.
    deadline: Option<Instant>,
    schedule: Option<Schedule>,
    /// Measured requests handed out so far (closed loop with `--requests`).
    claimed: AtomicU64,
    /// Answers in every phase, for the current rate.
    completed: AtomicU64,
    /// Answers in the measured phase.
    measured: AtomicU64,
    /// Error answers in the measured phase.
    measured_errors: AtomicU64,
    stop: Arc<Stop>,
    pool: Arc<[String]>,
}

impl Shared {
    fn pick_rpc(&self, rng: &mut FastRng) -> Rpc {
        match self.workload {
            // Import runs never get here (`Bench::run` refuses them).
            Workload::Tokenize | Workload::Import => Rpc::Tokenize,
            Workload::Get => Rpc::Get,
            Workload::Reveal => Rpc::Reveal,
            Workload::Mixed => {
                let roll = rng.below(100);
                if roll < MIX_TOKENIZE_PERCENT {
                    Rpc::Tokenize
                } else if roll < MIX_TOKENIZE_PERCENT + MIX_GET_PERCENT {
                    Rpc::Get
                } else {
                    Rpc::Reveal
                }
            }
        }
    }

    fn record(&self, stats: &mut RpcStats, outcome: Result<(), Status>, latency: Duration) {
        self.measured.fetch_add(1, Relaxed);
        match outcome {
            Ok(()) => stats.record_ok(latency),
            Err(status) => {
                self.measured_errors.fetch_add(1, Relaxed);
                stats.record_error(status.code());
            }
        }
    }
}

/// The open loop's timetable: slot `k` falls due at `start + k / rate`. Slots before
/// `warmup_slots` are the warm-up; the run has `total_slots`.
struct Schedule {
    start: Instant,
    rate: f64,
    next: AtomicU64,
    warmup_slots: u64,
    total_slots: u64,
    /// Slots left unsent when the measured phase ends count as missed (duration runs); a
    /// `--requests` run sends every slot, late if it must.
    drop_at_deadline: bool,
}

impl Schedule {
    fn new(rate: f64, bench: &Bench, start: Instant) -> Schedule {
        let slots_before = |d: Duration| (d.as_secs_f64() * rate).ceil() as u64;
        let warmup_slots = slots_before(bench.warmup);
        let (total_slots, drop_at_deadline) = match bench.end {
            End::Requests(n) => (warmup_slots + n, false),
            End::After(duration) => (slots_before(bench.warmup + duration), true),
        };
        Schedule {
            start,
            rate,
            next: AtomicU64::new(0),
            warmup_slots,
            total_slots,
            drop_at_deadline,
        }
    }

    fn due(&self, slot: u64) -> Instant {
        self.start + Duration::from_secs_f64(slot as f64 / self.rate)
    }

    /// Measured slots that fell due (before the end, or before the interrupt) but were
    /// never sent.
    fn missed(&self, sent: u64, interrupted_at: Option<Instant>) -> u64 {
        let due_end = match interrupted_at {
            Some(at) => {
                let elapsed = at.saturating_duration_since(self.start).as_secs_f64();
                ((elapsed * self.rate).ceil() as u64).min(self.total_slots)
            }
            None => self.total_slots,
        };
        due_end
            .saturating_sub(self.warmup_slots)
            .saturating_sub(sent)
    }
}

struct WorkerOutcome {
    /// Indexed by [`Rpc::index`].
    stats: [RpcStats; 3],
    late: u64,
}

async fn worker(
    shared: Arc<Shared>,
    mut caller: Caller,
    mut cards: CardGenerator,
) -> WorkerOutcome {
    let mut outcome = WorkerOutcome {
        stats: [RpcStats::new(), RpcStats::new(), RpcStats::new()],
        late: 0,
    };
    match &shared.schedule {
        None => closed_loop(&shared, &mut caller, &mut cards, &mut outcome).await,
        Some(schedule) => {
            open_loop(&shared, schedule, &mut caller, &mut cards, &mut outcome).await;
        }
    }
    outcome
}

/// Sends the next request as soon as the previous one has answered.
async fn closed_loop(
    shared: &Shared,
    caller: &mut Caller,
    cards: &mut CardGenerator,
    outcome: &mut WorkerOutcome,
) {
    loop {
        if shared.stop.is_set() {
            return;
        }
        let sent = Instant::now();
        let measured = sent >= shared.measure_from;
        if measured {
            let more = match shared.end {
                End::After(_) => shared.deadline.is_none_or(|deadline| sent < deadline),
                End::Requests(n) => shared.claimed.fetch_add(1, Relaxed) < n,
            };
            if !more {
                return;
            }
        }
        let rpc = shared.pick_rpc(cards.rng());
        let result = caller.call(rpc, cards, &shared.pool).await;
        let latency = sent.elapsed();
        shared.completed.fetch_add(1, Relaxed);
        if measured {
            shared.record(&mut outcome.stats[rpc.index()], result, latency);
        }
    }
}

/// Takes the next due slot, waits for its time, sends. Latency of a slot that was already
/// due when this worker got to it runs from its due time, so the wait for a free worker
/// counts; a slot this worker waited for runs from when the timer woke it, so the timer's
/// millisecond granularity is not charged to the vault.
async fn open_loop(
    shared: &Shared,
    schedule: &Schedule,
    caller: &mut Caller,
    cards: &mut CardGenerator,
    outcome: &mut WorkerOutcome,
) {
    loop {
        if shared.stop.is_set() {
            return;
        }
        let slot = schedule.next.fetch_add(1, Relaxed);
        if slot >= schedule.total_slots {
            return;
        }
        let due = schedule.due(slot);
        let now = Instant::now();
        let measured = slot >= schedule.warmup_slots;
        if schedule.drop_at_deadline && shared.deadline.is_some_and(|deadline| now >= deadline) {
            // Every worker was busy until the end: this and the remaining slots are missed.
            return;
        }
        let origin = if due > now {
            tokio::time::sleep_until(due).await;
            Instant::now()
        } else {
            if measured && now - due > LATE_AFTER {
                outcome.late += 1;
            }
            due
        };
        let rpc = shared.pick_rpc(cards.rng());
        let result = caller.call(rpc, cards, &shared.pool).await;
        let latency = origin.elapsed();
        shared.completed.fetch_add(1, Relaxed);
        if measured {
            shared.record(&mut outcome.stats[rpc.index()], result, latency);
        }
    }
}

/// Once a second: phase, elapsed time, measured requests, current rate, errors. Rewritten
/// in place on a terminal; one line each otherwise (CI logs, `2>file`).
async fn progress_line(shared: Arc<Shared>, start: Instant, tty: bool) {
    let tick = Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at(start + tick, tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut last_count, mut last_at) = (0, start);
    loop {
        let now = ticker.tick().await;
        let count = shared.completed.load(Relaxed);
        let seconds = now.saturating_duration_since(last_at).as_secs_f64();
        let rps = if seconds > 0.0 {
            (count - last_count) as f64 / seconds
        } else {
            0.0
        };
        (last_count, last_at) = (count, now);
        // `<=`: the tick that lands exactly on the end of the warm-up still reports it.
        let line = if now <= shared.measure_from {
            format!(
                "warm-up  {:>6.1} s  rps {rps:>9.0}",
                now.saturating_duration_since(start).as_secs_f64()
            )
        } else {
            format!(
                "measure  {:>6.1} s  requests {:>10}  rps {rps:>9.0}  errors {}",
                now.saturating_duration_since(shared.measure_from)
                    .as_secs_f64(),
                shared.measured.load(Relaxed),
                shared.measured_errors.load(Relaxed),
            )
        };
        let mut err = std::io::stderr().lock();
        // Progress is best effort: a closed stderr must not stop the run.
        let _ = if tty {
            write!(err, "\r{line:<78}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

/// Clears the progress line on a terminal so the report starts on a clean line.
fn finish_progress_line() {
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r{:78}\r", "");
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::BenchArgs;

    fn bench(extra: &[&str]) -> Bench {
        let args = BenchArgs::try_parse_from(std::iter::once("bench").chain(extra.iter().copied()))
            .expect("parses");
        Bench::prepare_with_env_key(&args, None).expect("prepares")
    }

    #[test]
    fn an_open_loop_duration_run_has_one_slot_per_interval_and_counts_unsent_ones_as_missed() {
        let start = Instant::now();
        let b = bench(&["--rate", "100", "--warmup", "2s", "--duration", "10s"]);
        let schedule = Schedule::new(100.0, &b, start);
        assert_eq!(schedule.warmup_slots, 200);
        assert_eq!(schedule.total_slots, 1200);
        assert!(schedule.drop_at_deadline);
        assert_eq!(schedule.due(150), start + Duration::from_millis(1500));
        assert_eq!(schedule.missed(1000, None), 0);
        assert_eq!(schedule.missed(990, None), 10);
        // Interrupted 5 s in: 300 measured slots had fallen due.
        let at = start + Duration::from_secs(5);
        assert_eq!(schedule.missed(280, Some(at)), 20);
        // Interrupted during the warm-up: nothing measured was due.
        assert_eq!(schedule.missed(0, Some(start + Duration::from_secs(1))), 0);
    }

    #[test]
    fn an_open_loop_requests_run_sends_every_slot() {
        let b = bench(&["--rate", "50", "--warmup", "0s", "--requests", "75"]);
        let schedule = Schedule::new(50.0, &b, Instant::now());
        assert_eq!((schedule.warmup_slots, schedule.total_slots), (0, 75));
        assert!(!schedule.drop_at_deadline);
    }

    #[test]
    fn the_mixed_workload_follows_its_documented_shares() {
        let shared = Shared {
            workload: Workload::Mixed,
            measure_from: Instant::now(),
            end: End::Requests(1),
            deadline: None,
            schedule: None,
            claimed: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            measured: AtomicU64::new(0),
            measured_errors: AtomicU64::new(0),
            stop: Arc::new(Stop::default()),
            pool: Arc::from(Vec::new()),
        };
        let mut rng = FastRng::seeded(9);
        let mut counts = [0u32; 3];
        for _ in 0..100_000 {
            counts[shared.pick_rpc(&mut rng).index()] += 1;
        }
        let share = |rpc: Rpc| f64::from(counts[rpc.index()]) / 1000.0;
        assert!((share(Rpc::Tokenize) - 20.0).abs() < 1.0, "{counts:?}");
        assert!((share(Rpc::Get) - 40.0).abs() < 1.0, "{counts:?}");
        assert!((share(Rpc::Reveal) - 40.0).abs() < 1.0, "{counts:?}");
    }
}
