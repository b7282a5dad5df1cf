//! Group commit: the hot path's writes — new cards and audit records — from many concurrent
//! requests committed together in one transaction.
//!
//! A durable commit costs a disk flush, whatever it holds. One transaction per request caps
//! throughput at what the database can flush; with many requests per transaction the same
//! flush makes all of them durable. Each caller still waits for the commit of its own batch
//! before it is answered, so an acknowledged card (or a revealed PAN's audit record) is on
//! disk, exactly as with one transaction each.
//!
//! Writers (a few tasks) take whatever is queued, up to `max_size`; when more than one write
//! was waiting — the sign of concurrent load — a writer may linger up to `max_wait` for more
//! (0 by default: batches form by themselves while the previous one flushes, and measured
//! waits only cost throughput), so a lone request never waits. While one writer's
//! transaction commits, another gathers the next batch.
//!
//! A batch first takes the fast lane ([`Store::commit_batch`]): each writer owns a few audit
//! chains and remembers their heads, so it can compute the records' MACs up front and write
//! cards, records and the moved head in one all-or-nothing statement on PostgreSQL — one
//! round trip and one flush per batch — which checks that no card clashed and that the head
//! did not move (another replica, or an administrative action, may have appended). If either
//! happened, nothing was written and the batch takes the locked path: a transaction that
//! locks a chain head first. There, cards whose token or canonical slot clashes are handed
//! back unstored (the caller resolves them in a transaction of their own), and they leave no
//! audit record in the batch. A statement error fails no one blindly: the batch is retried one write per
//! transaction, so only a write that fails alone fails. A failed commit, or a database that
//! cannot be reached, fails the whole batch with a status saying so.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::{
    sync::{Mutex, mpsc, oneshot},
    time::Instant,
};

use tracing::Instrument;

use super::VaultError;
use crate::{
    audit::{AuditEvent, Auditor},
    store::{AuditHeadRow, CardRow, Store, StoreError},
};

/// Histogram of writes per group commit.
const BATCH_SIZE: &str = "cardvault_write_batch_size";
/// Histogram of how long a group commit takes, retries included, by `backend`.
const COMMIT_DURATION: &str = "cardvault_db_batch_commit_duration_seconds";

/// How writes are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Most writes in one transaction.
    pub max_size: usize,
    /// Longest a writer waits for more writes once it has more than one (0: never).
    pub max_wait: Duration,
    /// Transactions in flight at once; 0 picks the backend's default (PostgreSQL 2, SQLite 1,
    /// since SQLite has one writer anyway).
    pub writers: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_size: 256,
            max_wait: Duration::ZERO,
            writers: 0,
        }
    }
}

/// What happened to one write.
#[derive(Debug)]
pub(crate) struct Written {
    /// False when the card clashed with a unique key and was not stored (nor its record).
    pub stored: bool,
    /// The card, handed back.
    pub card: Option<CardRow>,
    /// The audit event, handed back (a card that clashed is recorded on another path).
    pub audit: AuditEvent,
}

struct Job {
    card: Option<CardRow>,
    audit: AuditEvent,
    reply: oneshot::Sender<Result<Written, VaultError>>,
    /// The deadline of the call that queued the write, if it has one.
    deadline: Option<Instant>,
    /// The caller's span, so the commit shows up in its request's trace.
    span: tracing::Span,
}

impl Job {
    /// A new card whose caller has given up (hung up, or its deadline passed) before its
    /// batch formed: storing it would leave a card nobody holds the token of. Audit-only
    /// writes (refusals, reveals) are never dropped: what happened is recorded regardless.
    fn abandoned(&self, now: Instant) -> bool {
        self.card.is_some()
            && (self.reply.is_closed() || self.deadline.is_some_and(|deadline| deadline <= now))
    }
}

/// The queue of writes and the tasks that commit them. Dropping it lets the writers finish
/// what is queued and stop.
#[derive(Debug)]
pub(crate) struct Batcher {
    queue: mpsc::Sender<Job>,
}

/// Why a batch failed, shared by every write in it.
#[derive(Debug, thiserror::Error)]
#[error("the group commit that held this write failed")]
struct BatchFailed(#[source] Arc<VaultError>);

/// A failure before COMMIT was sent leaves nothing behind and may be retried per write; a
/// failed COMMIT may or may not have happened.
enum Failure {
    BeforeCommit(VaultError),
    AtCommit(VaultError),
}

impl Batcher {
    /// Starts the writers on the current runtime.
    pub fn start(store: Arc<dyn Store>, auditor: Arc<Auditor>, options: BatchOptions) -> Self {
        let max_size = options.max_size.max(1);
        let writers = match options.writers {
            0 if store.backend() == "sqlite" => 1,
            0 => 2,
            n => n,
        };
        // Bounded, so a database that stalls pushes back on callers instead of queueing
        // without limit; room for every writer's next batch.
        let (queue, rx) = mpsc::channel(max_size * (writers + 1));
        let writer = Arc::new(Writer {
            store,
            auditor,
            rx: Mutex::new(rx),
            max_size,
            max_wait: options.max_wait,
        });
        let shards = writer.auditor.shards().max(1);
        for index in 0..writers {
            // Each writer appends to its own chains, so writers of one replica never race for
            // a chain head; a writer with none of its own (more writers than chains) shares.
            let index = u32::try_from(index).unwrap_or(0);
            let step = u32::try_from(writers).unwrap_or(1);
            let own: Vec<u32> = (0..shards).filter(|s| s % step == index % step).collect();
            let lane = Lane {
                shards: if own.is_empty() {
                    vec![index % shards]
                } else {
                    own
                },
                next: 0,
                heads: HashMap::new(),
            };
            tokio::spawn(writer.clone().run(lane));
        }
        Batcher { queue }
    }

    /// Stores `card` (if any) and appends `audit` in the next group commit; answers once
    /// that commit is durable.
    pub async fn write(
        &self,
        card: Option<CardRow>,
        audit: AuditEvent,
    ) -> Result<Written, VaultError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            card,
            audit,
            reply,
            deadline: super::deadline::current(),
            span: tracing::Span::current(),
        };
        self.queue
            .send(job)
            .await
            .map_err(|_| VaultError::internal("the write queue is closed", "writers stopped"))?;
        answer.await.map_err(|_| {
            VaultError::internal("a writer stopped before answering", "writer task ended")
        })?
    }

    /// Appends one audit record in the next group commit.
    pub async fn audit(&self, audit: AuditEvent) -> Result<(), VaultError> {
        self.write(None, audit).await.map(drop)
    }
}

/// One writer's chains and the heads it last wrote to them.
struct Lane {
    shards: Vec<u32>,
    next: usize,
    heads: HashMap<u32, AuditHeadRow>,
}

impl Lane {
    fn next_shard(&mut self) -> u32 {
        let shard = self.shards[self.next % self.shards.len()];
        self.next = self.next.wrapping_add(1);
        shard
    }
}

struct Writer {
    store: Arc<dyn Store>,
    auditor: Arc<Auditor>,
    rx: Mutex<mpsc::Receiver<Job>>,
    max_size: usize,
    max_wait: Duration,
}

impl Writer {
    async fn run(self: Arc<Self>, mut lane: Lane) {
        while let Some(jobs) = self.next_batch().await {
            let now = Instant::now();
            let (abandoned, jobs): (Vec<Job>, Vec<Job>) =
                jobs.into_iter().partition(|job| job.abandoned(now));
            for job in abandoned {
                metrics::counter!("cardvault_write_abandoned_total").increment(1);
                let _ = job.reply.send(Err(VaultError::DeadlineExceeded));
            }
            if jobs.is_empty() {
                continue;
            }
            metrics::histogram!(BATCH_SIZE).record(jobs.len() as f64);
            let span = commit_span(&jobs, self.store.backend());
            let started = Instant::now();
            self.commit(&mut lane, jobs).instrument(span).await;
            metrics::histogram!(COMMIT_DURATION, "backend" => self.store.backend())
                .record(started.elapsed().as_secs_f64());
        }
    }

    /// The next batch, or `None` once the queue is closed and empty.
    async fn next_batch(&self) -> Option<Vec<Job>> {
        let mut rx = self.rx.lock().await;
        let first = rx.recv().await?;
        let mut jobs = Vec::with_capacity(self.max_size.min(64));
        jobs.push(first);
        while jobs.len() < self.max_size {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if jobs.len() > 1 && !self.max_wait.is_zero() {
            // Tokio's timers tick in milliseconds, far coarser than the wait wanted here, so
            // the writer yields to let request tasks enqueue and checks the clock itself.
            let deadline = Instant::now() + self.max_wait;
            while jobs.len() < self.max_size && Instant::now() < deadline {
                tokio::task::yield_now().await;
                while jobs.len() < self.max_size {
                    match rx.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
            }
        }
        Some(jobs)
    }

    async fn commit(&self, lane: &mut Lane, jobs: Vec<Job>) {
        match self.try_fast(lane, &jobs).await {
            Ok(true) => return answer_all(jobs, std::iter::repeat(true)),
            // A clash: resolved below, under a lock, write by write.
            Ok(false) => metrics::counter!("cardvault_write_batch_clashes_total").increment(1),
            Err(Failure::AtCommit(err)) => return fail_all(jobs, err),
            // Nothing was written; the locked path below retries and isolates the failure.
            Err(Failure::BeforeCommit(_)) => {}
        }
        match self.try_commit(&jobs).await {
            Ok(stored) => answer_all(jobs, stored),
            Err(Failure::BeforeCommit(err))
                if jobs.len() > 1 && !matches!(err, VaultError::Unavailable(_)) =>
            {
                tracing::warn!(error = %err, writes = jobs.len(), "a write batch failed; committing its writes one by one");
                for job in jobs {
                    match self.try_commit(std::slice::from_ref(&job)).await {
                        Ok(stored) => answer_all(vec![job], stored),
                        Err(Failure::BeforeCommit(err) | Failure::AtCommit(err)) => {
                            crate::audit::append_failed(1);
                            let _ = job.reply.send(Err(err));
                        }
                    }
                }
            }
            Err(Failure::BeforeCommit(err) | Failure::AtCommit(err)) => fail_all(jobs, err),
        }
    }

    /// The fast lane: every card and every record in one all-or-nothing write that assumes
    /// no clash — no card's unique keys taken, and the chain head where this writer last
    /// left it. Ok(false) when that did not hold (nothing was written).
    async fn try_fast(&self, lane: &mut Lane, jobs: &[Job]) -> Result<bool, Failure> {
        let shard = lane.next_shard();
        if !lane.heads.contains_key(&shard) {
            // One read refreshes every head of this lane that is not cached.
            for head in self.store.audit_heads().await.map_err(fast_failure)? {
                if lane.shards.contains(&head.shard) {
                    lane.heads.entry(head.shard).or_insert(head);
                }
            }
        }
        let head = lane.heads.remove(&shard).ok_or_else(|| {
            Failure::BeforeCommit(VaultError::internal(
                "an audit chain head is missing",
                "no head row",
            ))
        })?;
        let cards: Vec<&CardRow> = jobs.iter().filter_map(|j| j.card.as_ref()).collect();
        let events: Vec<&AuditEvent> = jobs.iter().map(|j| &j.audit).collect();
        let (records, new_head) = self.auditor.extend(&head, &events);
        let committed = self
            .store
            .commit_batch(&cards, &records, &head, &new_head)
            .await
            .map_err(fast_failure)?;
        if committed {
            lane.heads.insert(shard, new_head);
        }
        Ok(committed)
    }

    /// One transaction: the cards, then the audit records of every write that took effect.
    async fn try_commit(&self, jobs: &[Job]) -> Result<Vec<bool>, Failure> {
        let before = |e: VaultError| Failure::BeforeCommit(e);
        let mut tx = self.store.begin().await.map_err(|e| before(e.into()))?;
        let cards: Vec<&CardRow> = jobs.iter().filter_map(|j| j.card.as_ref()).collect();
        let mut inserted = if cards.is_empty() {
            Vec::new()
        } else {
            tx.insert_cards(&cards)
                .await
                .map_err(|e| before(e.into()))?
        }
        .into_iter();
        let stored: Vec<bool> = jobs
            .iter()
            .map(|job| job.card.is_none() || inserted.next().unwrap_or(false))
            .collect();
        let events: Vec<&AuditEvent> = jobs
            .iter()
            .zip(&stored)
            .filter_map(|(job, stored)| stored.then_some(&job.audit))
            .collect();
        self.auditor
            .append_all(tx.as_mut(), &events)
            .await
            .map_err(|e| before(e.into()))?;
        tx.commit().await.map_err(|e| Failure::AtCommit(e.into()))?;
        Ok(stored)
    }
}

/// The span of one group commit. A batch serves many requests but a span has one parent:
/// it is the child of the first write's request and links to the others' (OpenTelemetry
/// span links), so every request's trace leads to the commit that made it durable. It
/// carries sizes and the backend only, never a card or an audit detail.
fn commit_span(jobs: &[Job], backend: &'static str) -> tracing::Span {
    let parent = jobs.first().and_then(|job| job.span.id());
    // OpenTelemetry's names for the two backends.
    let system = match backend {
        "postgres" => "postgresql",
        other => other,
    };
    let span = tracing::info_span!(
        parent: parent,
        "db.batch_commit",
        db.system = system,
        // As i64: OpenTelemetry has no unsigned integers, and the exporter would send a
        // usize as a string.
        db.batch.size = jobs.len() as i64,
        db.batch.cards = jobs.iter().filter(|job| job.card.is_some()).count() as i64,
    );
    for job in jobs.iter().skip(1) {
        span.follows_from(&job.span);
    }
    span
}

/// A fast-lane error: an unreachable database leaves the outcome unknown (the statement
/// may have committed); any other error means the statement failed and wrote nothing.
fn fast_failure(err: StoreError) -> Failure {
    match err {
        StoreError::Unavailable(_) => Failure::AtCommit(err.into()),
        other => Failure::BeforeCommit(other.into()),
    }
}

/// Answers each job with whether its write took effect.
fn answer_all(jobs: Vec<Job>, stored: impl IntoIterator<Item = bool>) {
    for (job, stored) in jobs.into_iter().zip(stored) {
        // A card that clashed left no record in this batch.
        if stored {
            crate::audit::appended([&job.audit]);
        }
        let _ = job.reply.send(Ok(Written {
            stored,
            card: job.card,
            audit: job.audit,
        }));
    }
}

/// Fails every job of a batch with a copy of one cause.
fn fail_all(jobs: Vec<Job>, err: VaultError) {
    let cause = Arc::new(err);
    crate::audit::append_failed(jobs.len());
    for job in jobs {
        let _ = job.reply.send(Err(shared(&cause)));
    }
}

/// Each caller's copy of a batch's failure: unavailable stays unavailable (retryable).
fn shared(cause: &Arc<VaultError>) -> VaultError {
    let failed = BatchFailed(cause.clone());
    match **cause {
        VaultError::Unavailable(_) => VaultError::Unavailable(Box::new(failed)),
        _ => VaultError::internal("the group commit that held this write failed", failed),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use tracing::{Subscriber, span};
    use tracing_subscriber::{
        layer::{Context, Layer},
        prelude::*,
        registry::LookupSpan,
    };

    use super::*;
    use crate::{
        audit::{Action, Outcome},
        crypto::LocalKeyring,
        store::{self, StoreOptions},
    };

    /// A span's name and its parent's name, if it has one.
    type Parented = (String, Option<String>);

    /// Each new span's name and its parent's name; each follows-from link, by names.
    #[derive(Clone, Default)]
    struct Spans {
        parents: Arc<StdMutex<Vec<Parented>>>,
        links: Arc<StdMutex<Vec<(String, String)>>>,
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
        fn on_new_span(&self, _: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
            let span = ctx.span(id).expect("new span");
            let parent = span.parent().map(|p| p.name().to_owned());
            self.parents
                .lock()
                .unwrap()
                .push((span.name().to_owned(), parent));
        }

        fn on_follows_from(&self, id: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
            let name = |id| {
                ctx.span(id)
                    .map(|s| s.name().to_owned())
                    .unwrap_or_default()
            };
            self.links.lock().unwrap().push((name(id), name(follows)));
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_span_is_the_child_of_the_first_request_and_linked_to_the_others() {
        let spans = Spans::default();
        // Thread-local, and a current-thread runtime runs the writers on this thread.
        let _default =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("batch.db").display());
        let store = store::connect(&url, &StoreOptions::default())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let provider = LocalKeyring::ephemeral().unwrap();
        let auditor = Arc::new(Auditor::open(store.as_ref(), &provider).await.unwrap());
        let batcher = Batcher::start(store, auditor, BatchOptions::default());

        let write = |request: &'static str| {
            batcher
                .audit(AuditEvent::now(Action::Tokenize, Outcome::Ok))
                .instrument(tracing::info_span!("request", name = request))
        };
        // Queued together (the writer runs only when this task yields), so one batch.
        let (first, second) = tokio::join!(write("first"), write("second"));
        first.unwrap();
        second.unwrap();

        let parents = spans.parents.lock().unwrap().clone();
        let commits: Vec<_> = parents
            .iter()
            .filter(|(name, _)| name == "db.batch_commit")
            .collect();
        assert_eq!(commits.len(), 1, "one batch: {parents:?}");
        assert_eq!(commits[0].1.as_deref(), Some("request"), "{parents:?}");
        let links = spans.links.lock().unwrap().clone();
        assert_eq!(
            links,
            vec![("db.batch_commit".to_owned(), "request".to_owned())],
            "the second request is linked"
        );
    }
}
