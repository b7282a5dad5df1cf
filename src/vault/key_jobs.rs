//! Background key jobs: rewrapping every wrapped key under the primary KEK version after a
//! KEK rotation, and re-encrypting records of retired DEKs under their tenant's active DEK
//! (then destroying the retired DEKs).
//!
//! A job's state and progress live in the `key_jobs` table, and each step is idempotent (a
//! compare-and-set on the version or DEK it read), so a job survives crashes and restarts:
//! whichever replica next holds its lease carries on where the work stands. The lease — a
//! row-level claim that expires unless renewed after every batch — keeps one replica at a
//! time on a job. Traffic keeps flowing meanwhile: rewraps touch key rows only, and
//! re-encryption updates a bounded batch of cards per statement, throttled.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::sync::watch;

use super::{Operator, TenantId, Vault, VaultError, admin::admin_event};
use crate::{
    audit::{Action, AuditEvent, Outcome},
    crypto::{
        DataKey, DekId, KekVersion, WrappedKey, audit_key_wrap_aad, dek_wrap_aad, open_record,
        seal_record, tenant_secret_wrap_aad,
    },
    id,
    store::{KeyJobKind, KeyJobRow, KeyJobState, Rewrap, SealedRecord},
};

/// Gauge of the items a key job has processed, by `kind` and `job_id`.
pub(crate) const JOB_ITEMS_DONE: &str = "cardvault_key_job_items_done";
/// Gauge of the items a key job expects to process in all (it grows if work appears while
/// the job runs), by `kind` and `job_id`. Not `…_items_total`: that name is the counter of
/// items processed, and `_total` is for counters.
pub(crate) const JOB_ITEMS_EXPECTED: &str = "cardvault_key_job_items_expected";

/// How background key jobs run.
#[derive(Debug, Clone)]
pub struct KeyJobOptions {
    /// How long a claim on a job lasts unless renewed; a crashed replica's job is taken over
    /// after this.
    pub lease: Duration,
    /// How often an idle replica looks for work (and refreshes the key provider's versions).
    pub poll: Duration,
    /// Keys or records per batch (one statement, one progress update).
    pub batch: u32,
    /// Keys rewrapped or records re-encrypted per second at most; 0 for no limit. Leaves the
    /// database (and an HSM or KMS, whose operations may be metered) room for traffic.
    pub rate: u32,
}

impl Default for KeyJobOptions {
    fn default() -> Self {
        KeyJobOptions {
            lease: Duration::from_secs(15),
            poll: Duration::from_secs(1),
            batch: 500,
            rate: 5_000,
        }
    }
}

/// Why a job run stopped before the job was done.
enum Interrupted {
    /// Another replica took the lease (this one was too slow to renew it).
    LostLease,
    /// The server is shutting down; the lease lapses and the job resumes elsewhere.
    Stopping,
    /// The work failed.
    Failed(VaultError),
}

impl From<VaultError> for Interrupted {
    fn from(err: VaultError) -> Self {
        Interrupted::Failed(err)
    }
}

/// Works on key jobs until `stop` turns true: every `options.poll`, refreshes the key
/// provider's versions and, if a job is free, claims it and runs it to the end.
pub async fn run(vault: Arc<Vault>, owner: String, mut stop: watch::Receiver<bool>) {
    let poll = vault.options.key_jobs.poll;
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        if let Err(err) = vault.keys.provider().refresh().await {
            tracing::warn!(error = %err, "could not refresh the key provider's versions");
        }
        match vault.work_on_key_jobs(&owner, &stop).await {
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "key job worker failed; will retry"),
        }
    }
}

impl Vault {
    /// Starts a job of `kind`, or returns the one of that kind already running.
    pub(super) async fn start_job(
        &self,
        op: &Operator,
        kind: KeyJobKind,
        tenant: Option<&TenantId>,
    ) -> Result<KeyJobRow, VaultError> {
        let now = OffsetDateTime::now_utc();
        let row = KeyJobRow {
            id: id::new_id("kj_").map_err(VaultError::no_randomness)?,
            kind,
            state: KeyJobState::Running,
            tenant_id: tenant.map(ToString::to_string),
            done: 0,
            total: self.job_total(kind, tenant).await?,
            requested_by: op.principal.clone(),
            lease_owner: None,
            lease_until: None,
            created_at: now,
            updated_at: now,
            finished_at: None,
            error: None,
        };
        if self.store.insert_key_job(&row).await? {
            tracing::info!(job = %row.id, kind = kind.as_str(), total = row.total, "key job started");
            return Ok(row);
        }
        self.store
            .key_jobs(0)
            .await?
            .into_iter()
            .find(|job| job.kind == kind && job.state == KeyJobState::Running)
            .ok_or_else(|| VaultError::internal("a running key job vanished", "race"))
    }

    /// How many items a job of `kind` has to process now.
    async fn job_total(
        &self,
        kind: KeyJobKind,
        tenant: Option<&TenantId>,
    ) -> Result<u64, VaultError> {
        Ok(match kind {
            KeyJobKind::Rewrap => {
                let primary = self.keys.provider().primary_version().0;
                self.store
                    .kek_usage()
                    .await?
                    .iter()
                    .filter(|u| u.version != primary)
                    .map(|u| u.deks + u.tenant_secrets + u.audit_keys)
                    .sum()
            }
            KeyJobKind::Reencrypt => self
                .store
                .dek_usage(tenant.map(TenantId::as_str))
                .await?
                .iter()
                .filter(|u| !u.dek.active)
                .map(|u| u.records)
                .sum(),
        })
    }

    /// Claims a free job, if there is one, and runs it until it is done, fails, loses its
    /// lease or `stop` turns true. Returns whether it claimed a job.
    pub async fn work_on_key_jobs(
        &self,
        owner: &str,
        stop: &watch::Receiver<bool>,
    ) -> Result<bool, VaultError> {
        let lease = time::Duration::try_from(self.options.key_jobs.lease)
            .map_err(|e| VaultError::internal("job lease out of range", e))?;
        let now = OffsetDateTime::now_utc();
        let Some(job) = self.store.claim_key_job(owner, now, now + lease).await? else {
            return Ok(false);
        };
        tracing::info!(job = %job.id, kind = %job.kind, done = job.done, "working on key job");
        let mut worker = Worker {
            vault: self,
            owner,
            lease,
            stop,
            done: job.done,
            total: job.total,
            id: job.id.clone(),
            kind: job.kind,
        };
        worker.report();
        let result = match job.kind {
            KeyJobKind::Rewrap => worker.rewrap().await,
            KeyJobKind::Reencrypt => {
                let tenant = job
                    .tenant_id
                    .as_deref()
                    .map(TenantId::parse)
                    .transpose()
                    .map_err(|_| {
                        VaultError::internal("a stored key job is malformed", "corrupt row")
                    })?;
                worker.reencrypt(tenant.as_ref()).await
            }
        };
        let at = OffsetDateTime::now_utc();
        match result {
            Ok(()) => {
                if self
                    .store
                    .finish_key_job(&job.id, owner, KeyJobState::Done, None, at)
                    .await?
                {
                    tracing::info!(job = %job.id, kind = %job.kind, done = worker.done, "key job done");
                    self.record_job(&job, Outcome::Ok, format!("done: {} items", worker.done))
                        .await;
                }
            }
            Err(Interrupted::Failed(err)) => {
                tracing::error!(job = %job.id, kind = %job.kind, error = %err, "key job failed");
                // The text is ours (no key or card data); the cause chain went to the log.
                let text = err.to_string();
                if self
                    .store
                    .finish_key_job(&job.id, owner, KeyJobState::Failed, Some(&text), at)
                    .await?
                {
                    self.record_job(&job, Outcome::Error, format!("failed: {text}"))
                        .await;
                }
            }
            Err(Interrupted::LostLease) => {
                tracing::warn!(job = %job.id, "lost the lease on a key job; another replica has it");
            }
            Err(Interrupted::Stopping) => {
                tracing::info!(job = %job.id, done = worker.done, "stopping; the key job resumes after restart");
            }
        }
        Ok(true)
    }

    async fn record_job(&self, job: &KeyJobRow, outcome: Outcome, detail: String) {
        let op = Operator {
            principal: job.requested_by.clone(),
            peer: None,
            request_id: None,
            // Only names who started the job in its records; it authorizes nothing.
            scope: super::OperatorScope::Global,
            local: false,
        };
        let mut event: AuditEvent = admin_event(&op, Action::KeyJob, outcome);
        event.tenant = job.tenant_id.clone();
        event.detail = Some(format!("job {} ({}) {detail}", job.id, job.kind));
        self.record(&event).await;
    }
}

/// One replica's run of one job.
struct Worker<'a> {
    vault: &'a Vault,
    owner: &'a str,
    lease: time::Duration,
    stop: &'a watch::Receiver<bool>,
    id: String,
    kind: KeyJobKind,
    done: u64,
    total: u64,
}

impl Worker<'_> {
    /// Publishes the job's progress gauges. Labelled by job id: ids are vault-made
    /// (`kj_` and random characters) and jobs are few (one per rotation or retirement).
    fn report(&self) {
        let labels = [
            ("kind", self.kind.as_str().to_owned()),
            ("job_id", self.id.clone()),
        ];
        metrics::gauge!(JOB_ITEMS_DONE, &labels).set(self.done as f64);
        metrics::gauge!(JOB_ITEMS_EXPECTED, &labels).set(self.total as f64);
    }

    /// Records `processed` more items and renews the lease; stops the run if the lease was
    /// lost or the server is stopping.
    async fn progress(&mut self, processed: u64) -> Result<(), Interrupted> {
        self.done += processed;
        self.total = self.total.max(self.done);
        self.report();
        metrics::counter!("cardvault_key_job_items_total", "kind" => self.kind.as_str())
            .increment(processed);
        metrics::counter!("cardvault_key_job_batches_total", "kind" => self.kind.as_str())
            .increment(1);
        let now = OffsetDateTime::now_utc();
        let renewed = self
            .vault
            .store
            .key_job_progress(
                &self.id,
                self.owner,
                self.done,
                self.total,
                now + self.lease,
            )
            .await
            .map_err(VaultError::from)?;
        if !renewed {
            return Err(Interrupted::LostLease);
        }
        if *self.stop.borrow() {
            return Err(Interrupted::Stopping);
        }
        Ok(())
    }

    /// Rewraps, batch by batch, every DEK, then every tenant secret, then the audit key that
    /// is not wrapped under the primary KEK version. Rereads the primary version every batch:
    /// if the KEK is rotated again meanwhile, the job simply moves on to the newer version.
    async fn rewrap(&mut self) -> Result<(), Interrupted> {
        let store = &self.vault.store;
        let provider = self.vault.keys.provider().clone();
        let batch = self.vault.options.key_jobs.batch;
        let rate = self.vault.options.key_jobs.rate;
        loop {
            let started = std::time::Instant::now();
            let primary = provider.primary_version();
            let deks = store
                .deks_not_under(primary.0, batch)
                .await
                .map_err(VaultError::from)?;
            if deks.is_empty() {
                break;
            }
            let mut rewraps = Vec::with_capacity(deks.len());
            for dek in deks {
                let aad = dek_wrap_aad(DekId(dek.id), &dek.tenant_id);
                let wrapped = WrappedKey {
                    kek_version: KekVersion(dek.kek_version),
                    bytes: dek.wrapped_key,
                };
                rewraps
                    .push(rewrap_one(provider.as_ref(), dek.id.to_string(), &wrapped, &aad).await?);
            }
            store
                .rewrap_deks(&rewraps)
                .await
                .map_err(VaultError::from)?;
            self.progress(rewraps.len() as u64).await?;
            throttle(rate, rewraps.len() as u64, started).await;
        }
        loop {
            let started = std::time::Instant::now();
            let primary = provider.primary_version();
            let tenants = store
                .tenants_not_under(primary.0, batch)
                .await
                .map_err(VaultError::from)?;
            if tenants.is_empty() {
                break;
            }
            let mut rewraps = Vec::with_capacity(tenants.len());
            for tenant in tenants {
                let aad = tenant_secret_wrap_aad(&tenant.id);
                let wrapped = WrappedKey {
                    kek_version: KekVersion(tenant.secret_kek_version),
                    bytes: tenant.wrapped_secret,
                };
                rewraps.push(rewrap_one(provider.as_ref(), tenant.id, &wrapped, &aad).await?);
            }
            store
                .rewrap_tenant_secrets(&rewraps)
                .await
                .map_err(VaultError::from)?;
            self.progress(rewraps.len() as u64).await?;
            throttle(rate, rewraps.len() as u64, started).await;
        }
        if let Some(key) = store.audit_key().await.map_err(VaultError::from)?
            && key.kek_version != provider.primary_version().0
        {
            let aad = audit_key_wrap_aad(key.shards);
            let wrapped = WrappedKey {
                kek_version: KekVersion(key.kek_version),
                bytes: key.wrapped_key,
            };
            let rewrap = rewrap_one(provider.as_ref(), String::new(), &wrapped, &aad).await?;
            store
                .rewrap_audit_key(&rewrap)
                .await
                .map_err(VaultError::from)?;
            self.progress(1).await?;
        }
        Ok(())
    }

    /// Re-encrypts every record of every retired DEK (of one tenant, or all) under its
    /// tenant's active DEK, then destroys each retired DEK once no record uses it and no
    /// replica can still be sealing with it (twice the DEK reservation time after it was
    /// retired: a replica renews its reservation, and so learns of the retirement, within one).
    async fn reencrypt(&mut self, tenant: Option<&TenantId>) -> Result<(), Interrupted> {
        let vault = self.vault;
        let store = &vault.store;
        let options = &vault.options.key_jobs;
        let grace = time::Duration::try_from(vault.keys.policy().reservation * 2)
            .map_err(|e| VaultError::internal("DEK reservation out of range", e))?;
        loop {
            let retired = store
                .retired_deks(tenant.map(TenantId::as_str))
                .await
                .map_err(VaultError::from)?;
            if retired.is_empty() {
                return Ok(());
            }
            let mut waiting = false;
            for dek in retired {
                let owner = TenantId::parse(&dek.tenant_id).map_err(|_| {
                    VaultError::internal("a stored tenant id is malformed", "corrupt row")
                })?;
                let old_id = DekId(dek.id);
                loop {
                    let records = store
                        .records_under(dek.id, "", options.batch)
                        .await
                        .map_err(VaultError::from)?;
                    if records.is_empty() {
                        break;
                    }
                    let started = std::time::Instant::now();
                    let count = records.len() as u64;
                    let old_key = vault.keys.dek(&owner, old_id).await?;
                    let keys = vault.keys.tenant(&owner).await?;
                    let (new_id, new_key) = vault.keys.encryptions(&owner, &keys, count).await?;
                    let resealed = tokio::task::spawn_blocking(move || {
                        reseal(&old_key, new_id, &new_key, records)
                    })
                    .await
                    .map_err(|e| VaultError::internal("the re-encryption task failed", e))??;
                    store
                        .replace_records(dek.id, &resealed)
                        .await
                        .map_err(VaultError::from)?;
                    self.progress(count).await?;
                    throttle(options.rate, count, started).await;
                }
                let now = OffsetDateTime::now_utc();
                let retired_at = dek.retired_at.unwrap_or(now);
                if now - retired_at < grace {
                    waiting = true;
                    continue;
                }
                if store
                    .destroy_dek(dek.id, now - grace)
                    .await
                    .map_err(VaultError::from)?
                {
                    vault.keys.forget_dek(old_id);
                    tracing::info!(tenant = %owner, dek_id = %dek.id, "retired data key destroyed");
                    metrics::counter!("cardvault_deks_destroyed_total").increment(1);
                }
            }
            if waiting {
                // Renew the lease while replicas drain their reservations of the retired DEKs.
                self.progress(0).await?;
                tokio::time::sleep(options.poll.min(Duration::from_secs(1))).await;
            }
        }
    }
}

/// Unwraps a key with the KEK version it names and wraps it under the primary version.
async fn rewrap_one(
    provider: &dyn crate::crypto::KeyProvider,
    id: String,
    wrapped: &WrappedKey,
    aad: &[u8],
) -> Result<Rewrap, VaultError> {
    let key = provider
        .unwrap(wrapped, aad)
        .await
        .map_err(|e| VaultError::internal("failed to unwrap a key for rewrapping", e))?;
    let new = provider
        .wrap(&key, aad)
        .await
        .map_err(|e| VaultError::internal("failed to rewrap a key", e))?;
    Ok(Rewrap {
        id,
        old_version: wrapped.kek_version.0,
        new_version: new.kek_version.0,
        wrapped: new.bytes,
    })
}

/// Opens each record with the old DEK and seals it again with the new one, for the same
/// token and tenant. The plaintext lives only in a zeroizing buffer.
fn reseal(
    old_key: &DataKey,
    new_id: DekId,
    new_key: &DataKey,
    records: Vec<SealedRecord>,
) -> Result<Vec<SealedRecord>, VaultError> {
    records
        .into_iter()
        .map(|record| {
            let plaintext = open_record(
                old_key,
                &record.tenant_id,
                &record.token,
                &record.ciphertext,
            )
            .map_err(|e| VaultError::internal("failed to open a record for re-encryption", e))?;
            let ciphertext = seal_record(
                new_key,
                new_id,
                &record.tenant_id,
                &record.token,
                &plaintext,
            )
            .map_err(|e| VaultError::internal("failed to seal a re-encrypted record", e))?;
            Ok(SealedRecord {
                dek_id: new_id.0,
                ciphertext,
                ..record
            })
        })
        .collect()
}

/// Sleeps long enough that `count` records since `started` stay within `rate` per second.
async fn throttle(rate: u32, count: u64, started: std::time::Instant) {
    if rate == 0 {
        return;
    }
    let budget = Duration::from_secs_f64(count as f64 / f64::from(rate));
    let spent = started.elapsed();
    if budget > spent {
        tokio::time::sleep(budget - spent).await;
    }
}
