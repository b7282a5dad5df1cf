//! Key administration (the `KeyAdmin` service): rotate the KEK and the DEKs, report what
//! each key protects and how the background jobs are doing, and the operations under dual
//! control — retiring a KEK version, crypto-shredding a tenant, and creating, revoking or
//! minting a key for a principal that holds operator or card-data power: one `keys:admin`
//! principal requests, an independent one approves before the request expires, and the
//! approval carries the operation out. Every step writes an audit record.

use std::{collections::HashSet, fmt, sync::Arc};

use time::OffsetDateTime;

use super::{
    ApiKeyView, CreatedApiKey, DataKeyView, KekUsageView, KeyJobView, KeyRequestView, NewPrincipal,
    Operator, OperatorScope, Permissions, PrincipalName, PrincipalView, ShreddedView, TenantId,
    Vault, VaultError,
    admin::{admin_event, new_api_key, new_principal_row, scope_of},
    tenant_keys::DekPolicy,
};
use crate::{
    audit::{Action, AuditEvent, Outcome},
    crypto::{CryptoError, DekId, KekVersion, KeyProvider},
    id,
    store::{KeyJobKind, KeyRequestKind, KeyRequestRow, KeyRequestState, PrincipalRow},
};

/// An operation that needs dual control: one operator requests it, another approves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOperation {
    /// Destroy a KEK version in the key provider. Allowed only when nothing stored is
    /// wrapped under it and it is not the primary version.
    RetireKek(KekVersion),
    /// Destroy a tenant's data keys and secret (its cards become unreadable for good),
    /// delete its cards and revoke its principals.
    ShredTenant(TenantId),
    /// Create a principal that would hold `keys:admin` or a card-data permission.
    CreatePrincipal(NewPrincipal),
    /// Revoke an operator (a principal holding `keys:admin`) and its API keys.
    RevokePrincipal {
        /// Its id.
        principal: String,
        /// Its tenant; `None` for a global operator.
        tenant: Option<TenantId>,
    },
    /// Create an API key for a principal that holds `keys:admin` or a card-data permission.
    /// The approver is shown the key.
    CreateApiKey {
        /// The principal's id.
        principal: String,
        /// Its tenant; `None` for a global operator.
        tenant: Option<TenantId>,
        /// The key's lifetime; it never expires when unset.
        valid_for: Option<time::Duration>,
    },
}

/// What a `create_principal` or `create_api_key` request stores besides its target.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct RequestParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    permissions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtls_identity: Option<String>,
    #[serde(default)]
    global_operator: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    valid_for_secs: Option<i64>,
}

impl KeyOperation {
    /// The request to revoke a stored principal.
    pub(super) fn revoke_principal(row: &PrincipalRow) -> KeyOperation {
        KeyOperation::RevokePrincipal {
            principal: row.id.clone(),
            tenant: scope_of(row),
        }
    }

    /// The stored kind.
    pub fn kind(&self) -> KeyRequestKind {
        match self {
            KeyOperation::RetireKek(_) => KeyRequestKind::RetireKek,
            KeyOperation::ShredTenant(_) => KeyRequestKind::ShredTenant,
            KeyOperation::CreatePrincipal(_) => KeyRequestKind::CreatePrincipal,
            KeyOperation::RevokePrincipal { .. } => KeyRequestKind::RevokePrincipal,
            KeyOperation::CreateApiKey { .. } => KeyRequestKind::CreateApiKey,
        }
    }

    /// The stored target: the version number, the tenant id (shred, create principal) or
    /// the principal id (revoke principal, create API key).
    pub fn target(&self) -> String {
        match self {
            KeyOperation::RetireKek(version) => version.0.to_string(),
            KeyOperation::ShredTenant(tenant) => tenant.to_string(),
            KeyOperation::CreatePrincipal(new) => new.tenant.to_string(),
            KeyOperation::RevokePrincipal { principal, .. }
            | KeyOperation::CreateApiKey { principal, .. } => principal.clone(),
        }
    }

    /// The tenant it acts on; `None` for what only a global operator may request and
    /// approve (a KEK version, a global operator).
    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            KeyOperation::RetireKek(_) => None,
            KeyOperation::ShredTenant(tenant) => Some(tenant),
            KeyOperation::CreatePrincipal(new) => new.scope_tenant(),
            KeyOperation::RevokePrincipal { tenant, .. }
            | KeyOperation::CreateApiKey { tenant, .. } => tenant.as_ref(),
        }
    }

    fn params(&self) -> Option<String> {
        let params = match self {
            KeyOperation::CreatePrincipal(new) => RequestParams {
                name: Some(new.name.to_string()),
                permissions: new.permissions.owned_names(),
                mtls_identity: new.mtls_identity.clone(),
                global_operator: new.global_operator,
                valid_for_secs: None,
            },
            KeyOperation::CreateApiKey { valid_for, .. } => RequestParams {
                name: None,
                permissions: Vec::new(),
                mtls_identity: None,
                global_operator: false,
                valid_for_secs: valid_for.map(|d| d.whole_seconds()),
            },
            _ => return None,
        };
        serde_json::to_string(&params).ok()
    }

    /// The operation a stored request describes.
    pub(super) fn of(row: &KeyRequestRow) -> Result<KeyOperation, VaultError> {
        let corrupt = || VaultError::internal("a stored key request is malformed", "corrupt row");
        let tenant = || {
            row.tenant_id
                .as_deref()
                .map(TenantId::parse)
                .transpose()
                .map_err(|_| corrupt())
        };
        let params = || -> Result<RequestParams, VaultError> {
            serde_json::from_str(row.params.as_deref().ok_or_else(corrupt)?).map_err(|_| corrupt())
        };
        match row.kind {
            KeyRequestKind::RetireKek => row
                .target
                .parse()
                .map(|v| KeyOperation::RetireKek(KekVersion(v)))
                .map_err(|_| corrupt()),
            KeyRequestKind::ShredTenant => TenantId::parse(&row.target)
                .map(KeyOperation::ShredTenant)
                .map_err(|_| corrupt()),
            KeyRequestKind::CreatePrincipal => {
                let params = params()?;
                Ok(KeyOperation::CreatePrincipal(NewPrincipal {
                    tenant: TenantId::parse(&row.target).map_err(|_| corrupt())?,
                    name: params
                        .name
                        .as_deref()
                        .and_then(|name| PrincipalName::parse(name).ok())
                        .ok_or_else(corrupt)?,
                    permissions: Permissions::parse(params.permissions.iter().map(String::as_str))
                        .map_err(|_| corrupt())?,
                    mtls_identity: params.mtls_identity,
                    global_operator: params.global_operator,
                }))
            }
            KeyRequestKind::RevokePrincipal => Ok(KeyOperation::RevokePrincipal {
                principal: row.target.clone(),
                tenant: tenant()?,
            }),
            KeyRequestKind::CreateApiKey => Ok(KeyOperation::CreateApiKey {
                principal: row.target.clone(),
                tenant: tenant()?,
                valid_for: params()?.valid_for_secs.map(time::Duration::seconds),
            }),
        }
    }
}

impl fmt::Display for KeyOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyOperation::RetireKek(version) => write!(f, "retire KEK {version}"),
            KeyOperation::ShredTenant(tenant) => write!(f, "shred tenant {tenant}"),
            KeyOperation::CreatePrincipal(new) => write!(
                f,
                "create principal {} of tenant {} with {}{}",
                new.name,
                new.tenant,
                new.permissions.names().join(","),
                if new.global_operator {
                    " (global operator)"
                } else {
                    ""
                }
            ),
            KeyOperation::RevokePrincipal { principal, .. } => {
                write!(f, "revoke principal {principal}")
            }
            KeyOperation::CreateApiKey { principal, .. } => {
                write!(f, "create an API key for principal {principal}")
            }
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
    pub usage: KekUsageView,
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
    pub deks: Vec<DataKeyView>,
    /// Running jobs and the most recent finished ones.
    pub jobs: Vec<KeyJobView>,
    /// Dual-control requests waiting for approval.
    pub requests: Vec<KeyRequestView>,
    /// When DEKs are replaced automatically.
    pub policy: DekPolicy,
}

/// What `RotateDeks` did.
#[derive(Debug, Clone)]
pub struct RotatedDeks {
    /// The new active DEKs, one per tenant rotated.
    pub deks: Vec<DataKeyView>,
    /// The re-encryption job, when asked for.
    pub job: Option<KeyJobView>,
}

/// What an approval carried out.
#[derive(Debug)]
pub struct Approved {
    /// The request, now `executed`.
    pub request: KeyRequestView,
    /// For a shred, what it removed.
    pub shredded: Option<ShreddedView>,
    /// For a principal's creation, the principal.
    pub principal: Option<PrincipalView>,
    /// For an API key's creation, the key: shown to the approver, once.
    pub api_key: Option<CreatedApiKey>,
}

/// How many finished jobs `GetKeyStatus` shows besides the running ones.
const RECENT_JOBS: u32 = 10;

/// How long one replica may take to make a new KEK version before another may try.
const KEK_ROTATION_LEASE: time::Duration = time::Duration::seconds(60);

impl Vault {
    /// Makes a new KEK version primary at once (new wrappings use it from now on) and starts
    /// — or, if one is running, joins — the job that rewraps every DEK, tenant secret and the
    /// audit key under it.
    ///
    /// Global operators only. One rotation runs at a time across every replica (a lease in
    /// the database): a rotation asked for while another is under way is refused with
    /// `Precondition`, never turned into a second, conflicting version.
    pub async fn rotate_kek(&self, op: &Operator) -> Result<(KekVersion, KeyJobView), VaultError> {
        let mut event = admin_event(op, Action::RotateKek, Outcome::Ok);
        self.within_scope(op, None, &event).await?;
        let owner = id::new_id("kr_rotate_").map_err(VaultError::no_randomness)?;
        let now = OffsetDateTime::now_utc();
        if !self
            .store
            .claim_kek_rotation(&owner, now, now + KEK_ROTATION_LEASE)
            .await?
        {
            event.outcome = Outcome::Conflict;
            event.detail = Some("another KEK rotation is under way".to_owned());
            self.record(&event).await;
            return Err(VaultError::Precondition(
                "another KEK rotation is under way; look at GetKeyStatus and try again".to_owned(),
            ));
        }
        let rotated = self.rotate_provider().await;
        let made = rotated.as_ref().ok().map(|v| v.0);
        if let Err(err) = self
            .store
            .release_kek_rotation(&owner, made, OffsetDateTime::now_utc())
            .await
        {
            // The lease runs out by itself; the version is made either way.
            tracing::warn!(error = %err, "could not release the KEK rotation lease");
        }
        let version = match rotated {
            Ok(version) => version,
            Err(err) => {
                event.outcome = Outcome::Error;
                self.record(&event).await;
                return Err(err);
            }
        };
        tracing::info!(kek_version = %version, provider = self.keys.provider().name(), "new primary KEK version");
        let job = self.start_job(op, KeyJobKind::Rewrap, None).await?;
        event.detail = Some(format!("new primary KEK {version}; rewrap job {}", job.id));
        self.record_or_fail(&event).await?;
        Ok((version, job.into()))
    }

    /// Makes the key provider's next version primary, holding the rotation lease. The
    /// provider is read afresh first, and must know at least the version the last rotation
    /// recorded: a replica with a stale view would otherwise make a version number that
    /// already exists.
    async fn rotate_provider(&self) -> Result<KekVersion, VaultError> {
        let provider = self.refreshed_provider().await?;
        if let Some(recorded) = self.store.rotated_kek_version().await?
            && provider.primary_version().0 < recorded
        {
            return Err(VaultError::Precondition(format!(
                "the {} key provider shows KEK v{} as primary but v{recorded} was made; \
                 it does not see the other replicas' keys",
                provider.name(),
                provider.primary_version().0
            )));
        }
        provider.rotate().await.map_err(|err| match err {
            CryptoError::Unsupported { .. } => VaultError::Precondition(format!(
                "the {} key provider cannot rotate: {err}",
                provider.name()
            )),
            other => VaultError::internal("failed to rotate the KEK", other),
        })
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
        // A tenant's operator rotates its own tenant's key: "every tenant" is its own.
        let tenant = match (tenant, &op.scope) {
            (None, OperatorScope::Tenant(own)) => Some(own),
            (tenant, _) => tenant,
        };
        let mut event = admin_event(op, Action::RotateDeks, Outcome::Ok);
        event.tenant = tenant.map(ToString::to_string);
        self.within_scope(op, tenant, &event).await?;
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
            deks.push(DataKeyView::of(self.keys.rotate_now(tenant).await?, 0));
        }
        let job = if reencrypt {
            Some(self.start_job(op, KeyJobKind::Reencrypt, tenant).await?)
        } else {
            None
        };
        event.detail = Some(match &job {
            Some(job) => format!("{} new DEKs; re-encryption job {}", deks.len(), job.id),
            None => format!("{} new DEKs", deks.len()),
        });
        self.record_or_fail(&event).await?;
        Ok(RotatedDeks {
            deks,
            job: job.map(KeyJobView::from),
        })
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
        let tenant = match (tenant, &op.scope) {
            (None, OperatorScope::Tenant(own)) => Some(own),
            (tenant, _) => tenant,
        };
        let mut event = admin_event(op, Action::KeyStatus, Outcome::Ok);
        event.tenant = tenant.map(ToString::to_string);
        self.within_scope(op, tenant, &event).await?;
        let global = op.scope.covers(None);
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
                    usage: found
                        .map(|i| usage.swap_remove(i))
                        .map(KekUsageView::from)
                        .unwrap_or_default(),
                }
            })
            .collect();
        // Versions the provider no longer holds but something is wrapped under: unreadable
        // keys, shown so an operator sees them.
        keks.extend(usage.into_iter().map(|usage| KekStatus {
            version: KekVersion(usage.version),
            primary: false,
            usage: usage.into(),
        }));
        keks.sort_by_key(|k| k.version);
        if !global {
            // What each KEK version wraps counts every tenant's keys and records.
            keks.clear();
        }
        let in_scope = |t: Option<&str>| global || t == tenant.map(TenantId::as_str);
        let status = KeyStatus {
            provider: provider.name(),
            primary,
            keks,
            deks: self
                .store
                .dek_usage(tenant.map(TenantId::as_str))
                .await?
                .into_iter()
                .map(DataKeyView::from)
                .collect(),
            jobs: self
                .store
                .key_jobs(RECENT_JOBS)
                .await?
                .into_iter()
                .filter(|job| in_scope(job.tenant_id.as_deref()))
                .map(KeyJobView::from)
                .collect(),
            requests: self
                .store
                .pending_key_requests(OffsetDateTime::now_utc())
                .await?
                .into_iter()
                .filter(|request| in_scope(request.tenant_id.as_deref()))
                .map(KeyRequestView::from)
                .collect(),
            policy: self.keys.policy().clone(),
        };
        self.record_or_fail(&event).await?;
        Ok(status)
    }

    /// Asks for an operation under dual control; another operator must approve it within
    /// `keys.approval_ttl_secs`. Refuses at once what the operator may not ask for (outside
    /// its scope) and what could never be approved: an unknown or primary KEK version, a
    /// missing or already shredded tenant, a missing principal.
    pub async fn request_key_operation(
        &self,
        op: &Operator,
        operation: KeyOperation,
    ) -> Result<KeyRequestView, VaultError> {
        let mut event = admin_event(op, Action::RequestKeyOperation, Outcome::Ok);
        event.detail = Some(operation.to_string());
        event.tenant = operation.tenant().map(ToString::to_string);
        self.within_scope(op, operation.tenant(), &event).await?;
        if let Err(err) = self.check_operation(&operation).await {
            event.outcome = outcome_of(&err);
            self.record(&event).await;
            return Err(err);
        }
        let now = OffsetDateTime::now_utc();
        let ttl = time::Duration::try_from(self.options.approval_ttl)
            .map_err(|e| VaultError::internal("approval time limit out of range", e))?;
        let row = KeyRequestRow {
            id: id::new_id("kr_").map_err(VaultError::no_randomness)?,
            kind: operation.kind(),
            target: operation.target(),
            requested_by: op.principal.clone(),
            requested_at: now,
            expires_at: now + ttl,
            state: KeyRequestState::Pending,
            decided_by: None,
            decided_at: None,
            tenant_id: operation.tenant().map(ToString::to_string),
            params: operation.params(),
        };
        let mut tx = self.begin().await?;
        tx.insert_key_request(&row).await?;
        event.detail = Some(format!("request {}: {operation}", row.id));
        self.commit_with(tx, &event).await?;
        Ok(row.into())
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
            KeyOperation::ShredTenant(tenant) => self.check_live_tenant(tenant).await,
            KeyOperation::CreatePrincipal(new) => self.check_live_tenant(&new.tenant).await,
            KeyOperation::RevokePrincipal { principal, .. }
            | KeyOperation::CreateApiKey { principal, .. } => {
                match self.store.principal(principal).await? {
                    Some(row) if row.revoked_at.is_none() => Ok(()),
                    _ => Err(VaultError::Missing("no live principal with that id")),
                }
            }
        }
    }

    async fn check_live_tenant(&self, tenant: &TenantId) -> Result<(), VaultError> {
        match self.store.tenant(tenant.as_str()).await? {
            Some(row) if row.shredded_at.is_none() => Ok(()),
            Some(_) => Err(VaultError::Precondition(format!(
                "tenant {tenant} is already shredded"
            ))),
            None => Err(VaultError::Missing("tenant not found")),
        }
    }

    /// Everyone who could act as `principal`: itself, whoever created it, whoever was shown
    /// one of its API keys, and — transitively — whoever could act as those. An operator who
    /// created another principal, or minted its key, may hold its credentials.
    async fn holders(&self, principal: &str) -> Result<HashSet<String>, VaultError> {
        let mut seen = HashSet::new();
        let mut queue = vec![principal.to_owned()];
        while let Some(id) = queue.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            // Configuration principals, the CLI and the --dev caller have no rows.
            let Some(row) = self.store.principal(&id).await? else {
                continue;
            };
            queue.extend(row.created_by);
            queue.extend(
                self.store
                    .api_keys_of(&id)
                    .await?
                    .into_iter()
                    .filter_map(|key| key.created_by),
            );
        }
        Ok(seen)
    }

    /// Refuses an approval that is not the act of a second, independent operator: the
    /// requester itself, an operator the requester created or minted a credential for (or
    /// the reverse), or one created after the request.
    async fn check_approver(
        &self,
        op: &Operator,
        request: &KeyRequestRow,
    ) -> Result<(), VaultError> {
        if request.requested_by == op.principal {
            return Err(VaultError::SeparationOfDuties(
                "dual control: a request must be approved by another keys:admin principal \
                 than the one who made it",
            ));
        }
        if self
            .holders(&op.principal)
            .await?
            .contains(&request.requested_by)
        {
            return Err(VaultError::SeparationOfDuties(
                "dual control: the approver was created by the requester, or holds an API key \
                 the requester minted",
            ));
        }
        if self
            .holders(&request.requested_by)
            .await?
            .contains(&op.principal)
        {
            return Err(VaultError::SeparationOfDuties(
                "dual control: the requester was created by the approver, or holds an API key \
                 the approver minted",
            ));
        }
        if let Some(approver) = self.store.principal(&op.principal).await?
            && approver.created_at > request.requested_at
        {
            return Err(VaultError::SeparationOfDuties(
                "dual control: the approver was created after the request",
            ));
        }
        Ok(())
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
            // These records committed in the operation's own transaction.
            Ok(approved)
                if approved.shredded.is_some()
                    || approved.principal.is_some()
                    || approved.api_key.is_some()
                    || approved.request.kind == KeyRequestKind::RevokePrincipal => {}
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
        event.tenant = operation.tenant().map(ToString::to_string);
        if !op.scope.covers(operation.tenant()) {
            return Err(VaultError::SeparationOfDuties(match operation.tenant() {
                Some(_) => "operator scope: a tenant's operator manages its own tenant only",
                None => "operator scope: only a global operator may do this",
            }));
        }
        if request.state != KeyRequestState::Pending {
            return Err(VaultError::Precondition(format!(
                "request {id} is {}, not pending",
                request.state
            )));
        }
        self.check_approver(op, &request).await?;
        let now = OffsetDateTime::now_utc();
        if now >= request.expires_at {
            let mut tx = self.begin().await?;
            tx.decide_key_request(id, KeyRequestState::Expired, &op.principal, now)
                .await?;
            tx.commit().await?;
            return Err(VaultError::Precondition(format!(
                "request {id} expired; make a new one"
            )));
        }
        self.check_operation(&operation).await?;
        let mut principal = None;
        let mut api_key = None;
        let shredded = match &operation {
            KeyOperation::CreatePrincipal(new) => {
                let mut tx = self.begin().await?;
                if !tx
                    .decide_key_request(id, KeyRequestState::Executed, &op.principal, now)
                    .await?
                {
                    return Err(VaultError::Precondition(format!(
                        "request {id} was decided meanwhile"
                    )));
                }
                // Created by the requester: it may not approve the requester's requests.
                let row = new_principal_row(new.clone(), &request.requested_by)?;
                event.detail = Some(format!("request {id}: {operation}: principal {}", row.id));
                // A refusal (name taken, tenant gone) rolls back and is recorded by the caller.
                let mut refusal = event.clone();
                let row = self
                    .insert_principal(tx.as_mut(), row, &mut refusal)
                    .await?;
                // The record commits with the principal: both happen or neither.
                self.commit_with(tx, event).await?;
                principal = Some(row);
                None
            }
            KeyOperation::RevokePrincipal {
                principal: target, ..
            } => {
                let mut tx = self.begin().await?;
                if !tx
                    .decide_key_request(id, KeyRequestState::Executed, &op.principal, now)
                    .await?
                {
                    return Err(VaultError::Precondition(format!(
                        "request {id} was decided meanwhile"
                    )));
                }
                if !tx.revoke_principal(target, now).await? {
                    return Err(VaultError::Missing("no live principal with that id"));
                }
                self.commit_with(tx, event).await?;
                self.credentials.forget(None, Some(target));
                None
            }
            KeyOperation::CreateApiKey {
                principal: target,
                valid_for,
                ..
            } => {
                let mut tx = self.begin().await?;
                if !tx
                    .decide_key_request(id, KeyRequestState::Executed, &op.principal, now)
                    .await?
                {
                    return Err(VaultError::Precondition(format!(
                        "request {id} was decided meanwhile"
                    )));
                }
                // The approver is shown the key, so it is the one recorded as its holder.
                let (key, row) = new_api_key(target, *valid_for, &op.principal)?;
                tx.insert_api_key(&row).await?;
                event.detail = Some(format!("request {id}: {operation}: API key {}", row.id));
                self.commit_with(tx, event).await?;
                api_key = Some(CreatedApiKey {
                    key,
                    row: ApiKeyView::from(&row),
                });
                None
            }
            KeyOperation::RetireKek(version) => {
                self.retire_kek(*version).await?;
                let mut tx = self.begin().await?;
                if !tx
                    .decide_key_request(id, KeyRequestState::Executed, &op.principal, now)
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
                    .decide_key_request(id, KeyRequestState::Executed, &op.principal, now)
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
        request.state = KeyRequestState::Executed;
        request.decided_by = Some(op.principal.clone());
        request.decided_at = Some(now);
        Ok(Approved {
            request: request.into(),
            shredded: shredded.map(ShreddedView::from),
            principal: principal.map(PrincipalView::from),
            api_key,
        })
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
