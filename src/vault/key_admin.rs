//! Key administration (the `KeyAdmin` service): rotate the KEK and the DEKs, report what
//! each key protects and how the background jobs are doing, and the two destructive
//! operations — retiring a KEK version and crypto-shredding a tenant — under dual control:
//! one `keys:admin` principal requests, a different one approves before the request expires,
//! and the approval carries the operation out. Every step writes an audit record.

use std::{fmt, sync::Arc};

use time::OffsetDateTime;

use super::{
    Operator, TenantId, Vault, VaultError, admin::admin_event, key_jobs::JobKind, keys::DekPolicy,
};
use crate::{
    audit::{Action, AuditEvent, Outcome},
    crypto::{self, CryptoError, DekId, KekVersion, KeyProvider},
    store::{DekRow, DekUsage, KekUsage, KeyJobRow, KeyRequestRow, Shredded},
};

/// A destructive key operation that needs dual control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOperation {
    /// Destroy a KEK version in the key provider. Allowed only when nothing stored is
    /// wrapped under it and it is not the primary version.
    RetireKek(KekVersion),
    /// Destroy a tenant's data keys and secret (its cards become unreadable for good),
    /// delete its cards and revoke its principals.
    ShredTenant(TenantId),
}

impl KeyOperation {
    /// The stored kind.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyOperation::RetireKek(_) => "retire_kek",
            KeyOperation::ShredTenant(_) => "shred_tenant",
        }
    }

    /// The stored target: the version number or the tenant id.
    pub fn target(&self) -> String {
        match self {
            KeyOperation::RetireKek(version) => version.0.to_string(),
            KeyOperation::ShredTenant(tenant) => tenant.to_string(),
        }
    }

    /// The operation a stored request describes.
    pub fn of(row: &KeyRequestRow) -> Result<KeyOperation, VaultError> {
        let corrupt = || VaultError::internal("a stored key request is malformed", "corrupt row");
        match row.kind.as_str() {
            "retire_kek" => row
                .target
                .parse()
                .map(|v| KeyOperation::RetireKek(KekVersion(v)))
                .map_err(|_| corrupt()),
            "shred_tenant" => TenantId::parse(&row.target)
                .map(KeyOperation::ShredTenant)
                .map_err(|_| corrupt()),
            _ => Err(corrupt()),
        }
    }
}

impl fmt::Display for KeyOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyOperation::RetireKek(version) => write!(f, "retire KEK {version}"),
            KeyOperation::ShredTenant(tenant) => write!(f, "shred tenant {tenant}"),
        }
    }
}

/// One KEK version the provider holds, and what it wraps.
#[derive(Debug, Clone)]
pub struct KekStatus {
    /// The version.
    pub version: KekVersion,
    /// Whether new wrappings use it.
    pub primary: bool,
    /// What is wrapped under it.
    pub usage: KekUsage,
}

/// Everything `GetKeyStatus` reports.
#[derive(Debug, Clone)]
pub struct KeyStatus {
    /// The key provider's name (`local`, `pkcs11`).
    pub provider: &'static str,
    /// The primary KEK version.
    pub primary: KekVersion,
    /// Every version the provider holds, and any version something is still wrapped under
    /// (which would then be unreadable: the status shows it rather than hiding it).
    pub keks: Vec<KekStatus>,
    /// DEKs (of the asked tenant, or all) with their record counts.
    pub deks: Vec<DekUsage>,
    /// Running jobs and the most recent finished ones.
    pub jobs: Vec<KeyJobRow>,
    /// Dual-control requests waiting for approval.
    pub requests: Vec<KeyRequestRow>,
    /// When DEKs are replaced automatically.
    pub policy: DekPolicy,
}

/// What `RotateDeks` did.
#[derive(Debug, Clone)]
pub struct RotatedDeks {
    /// The new active DEKs, one per tenant rotated.
    pub deks: Vec<DekRow>,
    /// The re-encryption job, when asked for.
    pub job: Option<KeyJobRow>,
}

/// What an approval carried out.
#[derive(Debug, Clone)]
pub struct Approved {
    /// The request, now `executed`.
    pub request: KeyRequestRow,
    /// For a shred, what it removed.
    pub shredded: Option<Shredded>,
}

/// How many finished jobs `GetKeyStatus` shows besides the running ones.
const RECENT_JOBS: u32 = 10;

impl Vault {
    /// Makes a new KEK version primary at once (new wrappings use it from now on) and starts
    /// — or, if one is running, joins — the job that rewraps every DEK, tenant secret and the
    /// audit key under it.
    pub async fn rotate_kek(&self, op: &Operator) -> Result<(KekVersion, KeyJobRow), VaultError> {
        let provider = self.refreshed_provider().await?;
        let mut event = admin_event(op, Action::RotateKek, Outcome::Ok);
        let version = match provider.rotate().await {
            Ok(version) => version,
            Err(err) => {
                event.outcome = Outcome::Error;
                self.record(&event).await;
                return Err(match err {
                    CryptoError::Unsupported { .. } => VaultError::Precondition(format!(
                        "the {} key provider cannot rotate: {err}",
                        provider.name()
                    )),
                    other => VaultError::internal("failed to rotate the KEK", other),
                });
            }
        };
        tracing::info!(kek_version = %version, provider = provider.name(), "new primary KEK version");
        let job = self.start_job(op, JobKind::Rewrap, None).await?;
        event.detail = Some(format!("new primary KEK {version}; rewrap job {}", job.id));
        self.record_or_fail(&event).await?;
        Ok((version, job))
    }

    /// Makes a new DEK active now for one tenant or for every tenant; records sealed before
    /// stay readable under their old DEK. With `reencrypt`, also starts (or joins) the job
    /// that re-encrypts every record of a retired DEK under its tenant's active DEK and then
    /// destroys the retired DEKs.
    pub async fn rotate_deks(
        &self,
        op: &Operator,
        tenant: Option<&TenantId>,
        reencrypt: bool,
    ) -> Result<RotatedDeks, VaultError> {
        let mut event = admin_event(op, Action::RotateDeks, Outcome::Ok);
        event.tenant = tenant.map(ToString::to_string);
        let tenants = match tenant {
            Some(tenant) => match self.store.tenant(tenant.as_str()).await? {
                Some(row) if row.shredded_at.is_none() => vec![tenant.clone()],
                _ => {
                    event.outcome = Outcome::NotFound;
                    self.record(&event).await;
                    return Err(VaultError::Missing("tenant not found"));
                }
            },
            None => self.tenants_with_keys().await?,
        };
        let mut deks = Vec::with_capacity(tenants.len());
        for tenant in &tenants {
            deks.push(self.keys.rotate_now(tenant).await?);
        }
        let job = if reencrypt {
            Some(self.start_job(op, JobKind::Reencrypt, tenant).await?)
        } else {
            None
        };
        event.detail = Some(match &job {
            Some(job) => format!("{} new DEKs; re-encryption job {}", deks.len(), job.id),
            None => format!("{} new DEKs", deks.len()),
        });
        self.record_or_fail(&event).await?;
        Ok(RotatedDeks { deks, job })
    }

    /// Every tenant that has an active DEK (shredded tenants have none).
    async fn tenants_with_keys(&self) -> Result<Vec<TenantId>, VaultError> {
        let mut tenants: Vec<TenantId> = self
            .store
            .dek_usage(None)
            .await?
            .into_iter()
            .filter(|usage| usage.dek.active)
            .map(|usage| {
                TenantId::parse(&usage.dek.tenant_id).map_err(|_| {
                    VaultError::internal("a stored tenant id is malformed", "corrupt row")
                })
            })
            .collect::<Result<_, _>>()?;
        tenants.dedup();
        Ok(tenants)
    }

    /// KEK versions and what they wrap, DEKs and what they seal, jobs and pending requests.
    pub async fn key_status(
        &self,
        op: &Operator,
        tenant: Option<&TenantId>,
    ) -> Result<KeyStatus, VaultError> {
        let provider = self.refreshed_provider().await?;
        let primary = provider.primary_version();
        let mut usage = self.store.kek_usage().await?;
        let mut keks: Vec<KekStatus> = provider
            .versions()
            .into_iter()
            .map(|version| {
                let found = usage.iter().position(|u| u.version == version.0);
                KekStatus {
                    version,
                    primary: version == primary,
                    usage: found.map(|i| usage.swap_remove(i)).unwrap_or(KekUsage {
                        version: version.0,
                        ..KekUsage::default()
                    }),
                }
            })
            .collect();
        // Versions the provider no longer holds but something is wrapped under: unreadable
        // keys, shown so an operator sees them.
        keks.extend(usage.into_iter().map(|usage| KekStatus {
            version: KekVersion(usage.version),
            primary: false,
            usage,
        }));
        keks.sort_by_key(|k| k.version);
        let status = KeyStatus {
            provider: provider.name(),
            primary,
            keks,
            deks: self.store.dek_usage(tenant.map(TenantId::as_str)).await?,
            jobs: self.store.key_jobs(RECENT_JOBS).await?,
            requests: self
                .store
                .pending_key_requests(OffsetDateTime::now_utc())
                .await?,
            policy: self.keys.policy().clone(),
        };
        let mut event = admin_event(op, Action::KeyStatus, Outcome::Ok);
        event.tenant = tenant.map(ToString::to_string);
        self.record_or_fail(&event).await?;
        Ok(status)
    }

    /// Asks for a destructive operation; another `keys:admin` principal must approve it
    /// within `keys.approval_ttl_secs`. Refuses at once what could never be approved: an
    /// unknown or primary KEK version, a missing or already shredded tenant.
    pub async fn request_key_operation(
        &self,
        op: &Operator,
        operation: KeyOperation,
    ) -> Result<KeyRequestRow, VaultError> {
        let mut event = admin_event(op, Action::RequestKeyOperation, Outcome::Ok);
        event.detail = Some(operation.to_string());
        if let KeyOperation::ShredTenant(tenant) = &operation {
            event.tenant = Some(tenant.to_string());
        }
        if let Err(err) = self.check_operation(&operation).await {
            event.outcome = outcome_of(&err);
            self.record(&event).await;
            return Err(err);
        }
        let now = OffsetDateTime::now_utc();
        let ttl = time::Duration::try_from(self.options.approval_ttl)
            .map_err(|e| VaultError::internal("approval time limit out of range", e))?;
        let row = KeyRequestRow {
            id: new_id("kr_")?,
            kind: operation.kind().to_owned(),
            target: operation.target(),
            requested_by: op.principal.clone(),
            requested_at: now,
            expires_at: now + ttl,
            state: "pending".to_owned(),
            decided_by: None,
            decided_at: None,
        };
        let mut tx = self.begin().await?;
        tx.insert_key_request(&row).await?;
        event.detail = Some(format!("request {}: {operation}", row.id));
        self.commit_with(tx, &event).await?;
        Ok(row)
    }

    /// What would stop `operation` now.
    async fn check_operation(&self, operation: &KeyOperation) -> Result<(), VaultError> {
        match operation {
            KeyOperation::RetireKek(version) => {
                let provider = self.refreshed_provider().await?;
                if !provider.versions().contains(version) {
                    return Err(VaultError::Missing("KEK version not found"));
                }
                if provider.primary_version() == *version {
                    return Err(VaultError::Precondition(format!(
                        "KEK {version} is the primary version; rotate the KEK first"
                    )));
                }
                Ok(())
            }
            KeyOperation::ShredTenant(tenant) => match self.store.tenant(tenant.as_str()).await? {
                Some(row) if row.shredded_at.is_none() => Ok(()),
                Some(_) => Err(VaultError::Precondition(format!(
                    "tenant {tenant} is already shredded"
                ))),
                None => Err(VaultError::Missing("tenant not found")),
            },
        }
    }

    /// Approves a pending request and carries it out. The approver must be another principal
    /// than the requester, and the request must not have expired.
    pub async fn approve_key_request(
        &self,
        op: &Operator,
        id: &str,
    ) -> Result<Approved, VaultError> {
        let mut event = admin_event(op, Action::ApproveKeyOperation, Outcome::Ok);
        event.detail = Some(format!("request {}", truncated(id)));
        let result = self.approve(op, id, &mut event).await;
        match &result {
            // A shred's record committed in the shred's own transaction.
            Ok(approved) if approved.shredded.is_some() => {}
            Ok(_) => self.record_or_fail(&event).await?,
            Err(err) => {
                event.outcome = outcome_of(err);
                self.record(&event).await;
            }
        }
        result
    }

    async fn approve(
        &self,
        op: &Operator,
        id: &str,
        event: &mut AuditEvent,
    ) -> Result<Approved, VaultError> {
        let Some(mut request) = self.store.key_request(id).await? else {
            return Err(VaultError::Missing("key request not found"));
        };
        let operation = KeyOperation::of(&request)?;
        event.detail = Some(format!("request {id}: {operation}"));
        if let KeyOperation::ShredTenant(tenant) = &operation {
            event.tenant = Some(tenant.to_string());
        }
        if request.state != "pending" {
            return Err(VaultError::Precondition(format!(
                "request {id} is {}, not pending",
                request.state
            )));
        }
        if request.requested_by == op.principal {
            return Err(VaultError::SeparationOfDuties(
                "dual control: a request must be approved by another keys:admin principal \
                 than the one who made it",
            ));
        }
        let now = OffsetDateTime::now_utc();
        if now >= request.expires_at {
            let mut tx = self.begin().await?;
            tx.decide_key_request(id, "expired", &op.principal, now)
                .await?;
            tx.commit().await?;
            return Err(VaultError::Precondition(format!(
                "request {id} expired; make a new one"
            )));
        }
        self.check_operation(&operation).await?;
        let shredded = match &operation {
            KeyOperation::RetireKek(version) => {
                self.retire_kek(*version).await?;
                let mut tx = self.begin().await?;
                if !tx
                    .decide_key_request(id, "executed", &op.principal, now)
                    .await?
                {
                    return Err(VaultError::Precondition(format!(
                        "request {id} was decided meanwhile"
                    )));
                }
                tx.commit().await?;
                None
            }
            KeyOperation::ShredTenant(tenant) => {
                let deks: Vec<DekId> = self
                    .store
                    .dek_usage(Some(tenant.as_str()))
                    .await?
                    .into_iter()
                    .map(|usage| DekId(usage.dek.id))
                    .collect();
                let mut tx = self.begin().await?;
                if !tx
                    .decide_key_request(id, "executed", &op.principal, now)
                    .await?
                {
                    return Err(VaultError::Precondition(format!(
                        "request {id} was decided meanwhile"
                    )));
                }
                let shredded = tx.shred_tenant(tenant.as_str(), now).await?;
                event.detail = Some(format!(
                    "request {id}: {operation}: {} cards, {} data keys, {} principals",
                    shredded.cards, shredded.deks, shredded.principals
                ));
                // The record commits with the shred: both happen or neither.
                self.commit_with(tx, event).await?;
                self.keys.forget_tenant(tenant, &deks);
                // The shred revoked the tenant's principals: their keys stop here at once.
                self.credentials.forget_tenant(tenant);
                tracing::warn!(tenant = %tenant, cards = shredded.cards, deks = shredded.deks, "tenant crypto-shredded");
                Some(shredded)
            }
        };
        request.state = "executed".to_owned();
        request.decided_by = Some(op.principal.clone());
        request.decided_at = Some(now);
        Ok(Approved { request, shredded })
    }

    /// Destroys a KEK version in the provider once nothing stored is wrapped under it.
    async fn retire_kek(&self, version: KekVersion) -> Result<(), VaultError> {
        let usage = self
            .store
            .kek_usage()
            .await?
            .into_iter()
            .find(|u| u.version == version.0)
            .unwrap_or_default();
        if usage.in_use() {
            return Err(VaultError::Precondition(format!(
                "KEK {version} still wraps {} data keys, {} tenant secrets and {} audit keys; \
                 wait for the rewrap job (GetKeyStatus shows its progress)",
                usage.deks, usage.tenant_secrets, usage.audit_keys
            )));
        }
        match self.keys.provider().retire(version).await {
            Ok(()) => {
                tracing::warn!(kek_version = %version, "KEK version retired (destroyed)");
                Ok(())
            }
            Err(CryptoError::Unsupported { .. }) => Err(VaultError::Precondition(format!(
                "the {} key provider cannot retire KEK versions",
                self.keys.provider().name()
            ))),
            Err(err) => Err(VaultError::internal("failed to retire a KEK version", err)),
        }
    }

    /// The key provider, after picking up versions another replica may have created or
    /// retired since this one last looked.
    async fn refreshed_provider(&self) -> Result<&Arc<dyn KeyProvider>, VaultError> {
        let provider = self.keys.provider();
        provider
            .refresh()
            .await
            .map_err(|e| VaultError::internal("failed to refresh the key provider", e))?;
        Ok(provider)
    }

    /// Records an event whose action already happened; unlike [`Vault::record`], a failure
    /// to record fails the request, so an operator never gets a success that is not in the
    /// audit log.
    async fn record_or_fail(&self, event: &AuditEvent) -> Result<(), VaultError> {
        let tx = self.begin().await?;
        self.commit_with(tx, event).await
    }
}

/// The audit outcome of a refusal.
fn outcome_of(err: &VaultError) -> Outcome {
    match err {
        VaultError::Missing(_) => Outcome::NotFound,
        VaultError::Precondition(_) | VaultError::Conflict(_) => Outcome::Conflict,
        VaultError::SeparationOfDuties(_) | VaultError::PermissionDenied => {
            Outcome::PermissionDenied
        }
        _ => Outcome::Error,
    }
}

/// A caller-supplied id, cut short for the audit log.
fn truncated(id: &str) -> String {
    id.chars().take(40).collect()
}

/// A fresh id: `prefix` and 16 base62 characters from the OS CSPRNG.
pub(super) fn new_id(prefix: &str) -> Result<String, VaultError> {
    let mut id = String::from(prefix);
    id.push_str(
        &crypto::random_base62(16)
            .map_err(|e| VaultError::internal("the OS random generator failed", e))?,
    );
    Ok(id)
}
