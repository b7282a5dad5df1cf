//! The vault core: who may do what, and tokenize, import, look up, reveal and delete cards.
//!
//! This layer orchestrates the others — validated domain values in (`card`), keys and
//! ciphertext from `crypto`, rows to and from `store`, records to `audit` — and knows nothing
//! of gRPC or SQL dialects. Every operation takes an [`Authorized`] (so it cannot run without
//! a permission check), is scoped by the caller's tenant, and writes its audit record in the
//! same transaction as its effect.

pub mod access;
pub mod admin;
mod authn;
mod batch;
mod charge;
mod charge_ops;
pub mod deadline;
mod error;
mod guess;
mod import;
pub mod key_control;
pub mod key_jobs;
pub mod limits;
pub mod metadata;
pub mod names;
pub mod peer;
pub mod reconciler;
mod record;
pub mod refusals;
mod seal;
mod settle;
pub mod sweeper;
mod tenant;
mod tenant_keys;
mod views;

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::sync::OnceCell;

pub use self::{
    access::{
        Authorized, Caller, ConfigPrincipal, Credentials, Operator, OperatorScope, Permission,
        Permissions, Principal, needs_dual_control,
    },
    admin::{CreatedApiKey, DualControlled, NewPrincipal},
    batch::BatchOptions,
    charge::{
        ChargeCommand, Charged, MAX_CHARGE_AMOUNT, MAX_CHARGE_METADATA, RESERVED_METADATA_KEY,
    },
    charge_ops::{Operated, OperationCommand, action_of},
    error::VaultError,
    import::{ImportChunk, ImportCommand, ImportEntry, ImportId, ImportOutcome, MAX_IMPORT_CHUNK},
    key_control::{Approved, KekStatus, KeyOperation, KeyStatus, RotatedDeks},
    key_jobs::KeyJobOptions,
    limits::{GuessBudgets, Rate},
    metadata::Metadata,
    names::{IdempotencyKey, InvalidIdempotencyKey, InvalidPrincipalName, PrincipalName},
    peer::{Cidr, InvalidCidr},
    tenant::{InvalidTenantId, TenantId},
    tenant_keys::DekPolicy,
    views::{
        ApiKeyView, AuditPosition, AuditRecordView, ChargeActionView, ChargeOperationView,
        ChargeView, DataKeyView, KekUsageView, KeyJobView, KeyRequestView, PrincipalView,
        ShreddedView,
    },
};
use self::{
    authn::CredentialCache,
    batch::Batcher,
    guess::Guesses,
    limits::RateLimiter,
    refusals::Refusals,
    seal::{Sealer, format_name},
    tenant_keys::KeyManager,
};
/// The states of what the vault keeps — charges, their follow-ups, key jobs, dual-control
/// requests — as the store holds them: closed sets, each stored as one fixed name and read
/// back strictly (an unknown stored name is a corrupt row, never a default). They are the
/// store's types because the store decodes them and imports nothing; they are the vault's
/// vocabulary too, and callers take them from here.
pub use crate::store::{
    CaptureMethod, ChargeOperationKind, ChargeOperationState, ChargeState, KeyJobKind, KeyJobState,
    KeyRequestKind, KeyRequestState,
};
use crate::{
    audit::{Action, AuditEvent, Auditor, Outcome},
    card::{Brand, Card, CardholderName, Cvc, Pan, Token, TokenFormat},
    crypto::{self, DekId, Fingerprint, KeyProvider},
    gateway::Gateways,
    store::{CardInsert, CardRow, ReuseKey, Store, StoreTx},
};

/// How many fresh tokens to draw when the first ones collide with existing cards. Opaque
/// tokens never collide in practice; PAN-shaped tokens of short PANs have as few as 10^8
/// values per last-4, so a collision is rare but possible.
const TOKEN_ATTEMPTS: usize = 8;

/// A request to store a card.
#[derive(Debug)]
pub struct TokenizeCommand {
    /// The validated card.
    pub card: Card,
    /// A CVC to hold for the card's next charge (never stored with the card).
    pub cvc: Option<Cvc>,
    /// Shape of the token to issue.
    pub format: TokenFormat,
    /// Return an existing live token for the same PAN, expiry and format instead of
    /// storing a second copy.
    pub reuse_existing: bool,
    /// Caller metadata.
    pub metadata: Metadata,
    /// When the token stops resolving, if ever.
    pub expires_at: Option<OffsetDateTime>,
}

/// What the vault shows about a stored card: no PAN, no cardholder name.
#[derive(Debug, Clone)]
pub struct CardView {
    /// The token.
    pub token: Token,
    /// Brand.
    pub brand: Brand,
    /// Last 4 digits.
    pub last4: String,
    /// First 6 or 8 digits.
    pub bin: String,
    /// Expiry month.
    pub exp_month: u8,
    /// Expiry year.
    pub exp_year: u16,
    /// Keyed PAN fingerprint (per tenant); `None` for callers without the `fingerprint`
    /// permission.
    pub fingerprint: Option<Fingerprint>,
    /// Caller metadata, sorted by key.
    pub metadata: Vec<(String, String)>,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Token expiry, if any.
    pub expires_at: Option<OffsetDateTime>,
}

impl CardView {
    /// The view as `auth`'s caller may see it: the fingerprint only for callers holding
    /// `fingerprint`. Every operation that answers with a card passes its view through here.
    fn shown_to(mut self, auth: &Authorized) -> CardView {
        if !auth.sees_fingerprints() {
            self.fingerprint = None;
        }
        self
    }
}

/// Result of [`Vault::tokenize`].
#[derive(Debug)]
pub struct Tokenized {
    /// The stored card.
    pub card: CardView,
    /// False when an existing token was returned.
    pub created: bool,
}

/// Result of [`Vault::reveal`]: the card's secret fields. Debug masks them.
#[derive(Debug)]
pub struct RevealedCard {
    /// The PAN.
    pub pan: Pan,
    /// The cardholder name, if stored.
    pub holder: Option<CardholderName>,
    /// The card's public view.
    pub card: CardView,
}

/// How the vault authenticates and limits callers.
#[derive(Debug, Clone)]
pub struct VaultOptions {
    /// How many unwrapped data keys to keep in memory.
    pub dek_cache_size: usize,
    /// Tenant of callers without credentials on a loopback connection (`--dev` only),
    /// holding every permission but `keys:admin`.
    pub unauthenticated_tenant: Option<TenantId>,
    /// Proxies whose `x-forwarded-for` names the client; every other peer is the client.
    pub trusted_proxies: Vec<Cidr>,
    /// How long refusals of one source are counted into one audit record.
    pub refusal_window: Duration,
    /// Principals declared in configuration.
    pub config_principals: Vec<ConfigPrincipal>,
    /// Reveals per principal.
    pub reveal_rate: Rate,
    /// Failed authentications per peer address and per API key.
    pub failed_auth_rate: Rate,
    /// Answers that compare a caller's card number with a stored one, per principal.
    pub guess_budgets: GuessBudgets,
    /// How long a verified API key is trusted before its row is read again. Revocations on
    /// this replica apply at once; on other replicas within this time.
    pub credential_cache_ttl: Duration,
    /// Group commit of new cards and audit records.
    pub batch: BatchOptions,
    /// When data keys are replaced automatically.
    pub dek_policy: DekPolicy,
    /// Background key jobs (rewrap, re-encryption).
    pub key_jobs: KeyJobOptions,
    /// How long a dual-control request waits for its approval.
    pub approval_ttl: Duration,
    /// The payment gateways charges may go to.
    pub gateways: Arc<Gateways>,
    /// How long a CVC hold waits for its charge.
    pub cvc_hold_ttl: Duration,
    /// How long one request may be sending a charge before another may send it again (must
    /// exceed the gateways' total timeouts).
    pub charge_send_lease: Duration,
    /// The background reconciliation of unknown charges.
    pub reconcile: reconciler::ReconcileOptions,
    /// The server's longest unary call: a charge answers within it (or the caller's shorter
    /// deadline) whether or not its gateway has.
    pub request_timeout: Duration,
}

impl Default for VaultOptions {
    fn default() -> Self {
        VaultOptions {
            dek_cache_size: 1024,
            unauthenticated_tenant: None,
            trusted_proxies: Vec::new(),
            refusal_window: Duration::from_secs(60),
            config_principals: Vec::new(),
            reveal_rate: Rate {
                per_minute: 600,
                burst: 60,
            },
            failed_auth_rate: Rate {
                per_minute: 10,
                burst: 10,
            },
            guess_budgets: GuessBudgets::default(),
            credential_cache_ttl: Duration::from_secs(5),
            batch: BatchOptions::default(),
            dek_policy: DekPolicy::default(),
            key_jobs: KeyJobOptions::default(),
            approval_ttl: Duration::from_secs(15 * 60),
            gateways: Arc::new(Gateways::empty()),
            cvc_hold_ttl: Duration::from_secs(10 * 60),
            charge_send_lease: Duration::from_secs(60),
            reconcile: reconciler::ReconcileOptions::default(),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// The vault. Cheap to share behind an `Arc`; all state lives in the store, apart from
/// caches of unwrapped keys and verified credentials, and rate-limit buckets.
#[derive(Debug)]
pub struct Vault {
    store: Arc<dyn Store>,
    keys: KeyManager,
    /// Loaded on first use, so the vault starts (not ready) while the database is down.
    auditor: OnceCell<Arc<Auditor>>,
    /// Started with the auditor it writes with.
    batcher: OnceCell<Batcher>,
    options: VaultOptions,
    reveals: RateLimiter,
    failed_auth: RateLimiter,
    refusals: Refusals,
    guesses: Guesses,
    credentials: CredentialCache,
}

impl Vault {
    /// A vault over a store and a key provider.
    pub fn new(
        store: Arc<dyn Store>,
        provider: Arc<dyn KeyProvider>,
        options: VaultOptions,
    ) -> Vault {
        Vault {
            keys: KeyManager::new(
                provider,
                store.clone(),
                options.dek_cache_size,
                options.dek_policy.clone(),
            ),
            store,
            auditor: OnceCell::new(),
            batcher: OnceCell::new(),
            reveals: RateLimiter::new(options.reveal_rate),
            failed_auth: RateLimiter::new(options.failed_auth_rate),
            refusals: Refusals::new(options.refusal_window),
            guesses: Guesses::new(options.guess_budgets),
            credentials: CredentialCache::default(),
            options,
        }
    }

    /// The audit log writer, loading (or on a new database creating) the audit key.
    pub async fn auditor(&self) -> Result<&Auditor, VaultError> {
        Ok(self.shared_auditor().await?)
    }

    async fn shared_auditor(&self) -> Result<&Arc<Auditor>, VaultError> {
        Ok(self
            .auditor
            .get_or_try_init(|| async {
                Auditor::open(self.store.as_ref(), self.keys.provider().as_ref())
                    .await
                    .map(Arc::new)
            })
            .await?)
    }

    /// The group-commit queue, started on first use.
    async fn batcher(&self) -> Result<&Batcher, VaultError> {
        let auditor = self.shared_auditor().await?;
        Ok(self
            .batcher
            .get_or_init(|| async {
                Batcher::start(self.store.clone(), auditor.clone(), self.options.batch)
            })
            .await)
    }

    /// Starts a transaction that will end in [`Vault::commit_with`]. The audit key is loaded
    /// (on a new database: created, in a transaction of its own) first: creating it inside
    /// the caller's transaction would wait on that very transaction on SQLite.
    async fn begin(&self) -> Result<Box<dyn StoreTx>, VaultError> {
        self.shared_auditor().await?;
        Ok(self.store.begin().await?)
    }

    /// Appends `event` in `tx` (last, as the audit design requires) and commits.
    async fn commit_with(
        &self,
        mut tx: Box<dyn StoreTx>,
        event: &AuditEvent,
    ) -> Result<(), VaultError> {
        let committed = async {
            self.auditor().await?.append(tx.as_mut(), event).await?;
            tx.commit().await?;
            Ok::<_, VaultError>(())
        }
        .await;
        match &committed {
            Ok(()) => crate::audit::appended([event]),
            Err(_) => crate::audit::append_failed(1),
        }
        committed
    }

    /// Records an event that has no other write (a refusal, a failed request). A failure to
    /// record is logged; the request fails either way.
    pub async fn record(&self, event: &AuditEvent) {
        let result = match self.batcher().await {
            Ok(batcher) => batcher.audit(event.clone()).await,
            Err(err) => Err(err),
        };
        if let Err(err) = result {
            tracing::error!(error = %err, action = event.action.as_str(), "could not write an audit record");
        }
    }

    /// Passes `result` on, first recording it when it is a refusal raised below a card
    /// operation that nothing has recorded yet — a crypto-shredded tenant, a gateway this
    /// replica does not have, too many records for one data key — so that every refusal of a
    /// card operation is in the audit log ([`VaultError::is_audited`] counts on it).
    async fn recorded<T>(
        &self,
        auth: &Authorized,
        token: Option<&Token>,
        result: Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        if let Err(VaultError::Precondition(why)) = &result {
            let mut refused = event(auth, Outcome::Conflict, token);
            refused.detail = Some(why.clone());
            self.record(&refused).await;
        }
        result
    }

    /// Records the failure of an authorized request that the vault did not record itself
    /// (see [`VaultError::is_audited`]): malformed arguments, internal errors.
    pub async fn record_failure(&self, auth: &Authorized, outcome: Outcome) {
        self.record(&event(auth, outcome, None)).await;
    }

    /// The server's longest unary call (see [`VaultOptions::request_timeout`]).
    pub fn request_timeout(&self) -> Duration {
        self.options.request_timeout
    }

    /// The store, for readiness checks and the sweeper.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The key provider, for readiness checks.
    pub fn key_provider(&self) -> &Arc<dyn crate::crypto::KeyProvider> {
        self.keys.provider()
    }

    /// Loads (or creates) a tenant's keys, so the first request does not pay for it.
    pub async fn warm_up(&self, tenant: Option<&TenantId>) -> Result<(), VaultError> {
        self.auditor().await?;
        if let Some(tenant) = tenant {
            self.keys.tenant(tenant).await?;
        }
        Ok(())
    }

    /// Encrypts and stores a card (the command is already valid) and records it.
    #[tracing::instrument(skip_all, fields(tenant = %auth.caller().tenant()))]
    pub async fn tokenize(
        &self,
        auth: &Authorized,
        command: TokenizeCommand,
    ) -> Result<Tokenized, VaultError> {
        expect_action(auth, Action::Tokenize)?;
        let tenant = auth.caller().tenant().clone();
        let mut command = command;
        let cvc = command.cvc.take();
        // `reuse_existing` tells a stored card from a new one: budgeted per principal.
        let reserved = if command.reuse_existing {
            let pan = &command.card.pan;
            Some(
                self.reserve_reuse_budget(auth, pan.bin(), pan.last4())
                    .await?,
            )
        } else {
            None
        };
        let stored = self
            .store_card(&tenant, command, false, event(auth, Outcome::Ok, None))
            .await;
        if let Some(reserved) = reserved {
            let created = stored.as_ref().ok().map(|t| t.created);
            self.settle_reuse_budget(auth, reserved, created);
        }
        let tokenized = self.recorded(auth, None, stored).await?;
        if let Some(cvc) = cvc {
            let token = &tokenized.card.token;
            let held = self.put_cvc_hold(&tenant, token, &cvc).await;
            self.recorded(auth, Some(token), held).await?;
        }
        Ok(Tokenized {
            card: tokenized.card.shown_to(auth),
            created: tokenized.created,
        })
    }

    /// Stores a card and appends `audit` (with the token filled in) in the same transaction.
    async fn store_card(
        &self,
        tenant: &TenantId,
        command: TokenizeCommand,
        honeytoken: bool,
        mut audit: AuditEvent,
    ) -> Result<Tokenized, VaultError> {
        let keys = self.keys.tenant(tenant).await?;
        let card = &command.card;
        let (dek_id, dek) = self.keys.encryptions(tenant, &keys, 1).await?;
        let sealer = Sealer {
            tenant,
            card,
            format: command.format,
            metadata: &command.metadata,
            canonical: command.reuse_existing,
            expires_at: command.expires_at,
            import_id: None,
            fingerprint: keys
                .fingerprint
                .fingerprint(card.pan.expose_digits().as_bytes()),
            dek: &dek,
            dek_id,
            plaintext: record::encode(&card.pan, card.holder.as_ref()),
            now: now_micros(),
            honeytoken,
        };
        if !command.reuse_existing {
            // The hot path: one try in the next group commit. A clash (a PAN-shaped token
            // already taken) falls through to the one-by-one path below.
            let row = sealer.row()?;
            audit.token = Some(row.token.clone());
            let written = self.batcher().await?.write(Some(row), audit).await?;
            if let (true, Some(row)) = (written.stored, written.card) {
                return Ok(Tokenized {
                    card: view_of(row)?,
                    created: true,
                });
            }
            audit = written.audit;
            tracing::debug!("token collided with an existing card; redrawing");
        }
        self.store_card_alone(&sealer, audit).await
    }

    /// Stores a card in a transaction of its own: for `reuse_existing` (which reads before
    /// it writes) and for clashes on the group-commit path.
    async fn store_card_alone(
        &self,
        sealer: &Sealer<'_>,
        mut audit: AuditEvent,
    ) -> Result<Tokenized, VaultError> {
        let reuse_key = ReuseKey {
            tenant_id: sealer.tenant.as_str(),
            fingerprint: sealer.fingerprint.as_bytes(),
            exp_month: sealer.card.expiry.month(),
            exp_year: sealer.card.expiry.year(),
            token_format: format_name(sealer.format),
        };
        let now = sealer.now;
        let mut tx = self.begin().await?;
        // Canonical rows are exactly the `reuse_existing` ones.
        if sealer.canonical
            && let Some(row) = tx.reusable_card(reuse_key, now).await?
        {
            audit.token = Some(row.token.clone());
            audit.detail = Some("returned an existing token".to_owned());
            self.commit_with(tx, &audit).await?;
            return Ok(Tokenized {
                card: view_of(row)?,
                created: false,
            });
        }

        let mut retried_expired_canonical = false;
        let mut attempt = 0;
        while attempt < TOKEN_ATTEMPTS {
            attempt += 1;
            let row = sealer.row()?;
            match tx.insert_card(&row).await? {
                CardInsert::Inserted => {
                    audit.token = Some(row.token.clone());
                    self.commit_with(tx, &audit).await?;
                    return Ok(Tokenized {
                        card: view_of(row)?,
                        created: true,
                    });
                }
                CardInsert::TokenTaken => {
                    tracing::debug!(attempt, "token collided with an existing card; redrawing");
                }
                CardInsert::CanonicalExists => {
                    // A concurrent reuse_existing call stored the same card first: answer
                    // with its token. If the holder of the slot has expired, free it once.
                    if let Some(row) = tx.reusable_card(reuse_key, now).await? {
                        audit.token = Some(row.token.clone());
                        audit.detail = Some("returned an existing token".to_owned());
                        self.commit_with(tx, &audit).await?;
                        return Ok(Tokenized {
                            card: view_of(row)?,
                            created: false,
                        });
                    }
                    if retried_expired_canonical {
                        break;
                    }
                    retried_expired_canonical = true;
                    tx.delete_expired_canonical(reuse_key, now).await?;
                    attempt -= 1;
                }
            }
        }
        Err(VaultError::internal(
            "could not store the card under a fresh token",
            "every attempt collided",
        ))
    }

    /// The card's public view.
    #[tracing::instrument(skip_all, fields(tenant = %auth.caller().tenant()))]
    pub async fn get_card(&self, auth: &Authorized, token: &Token) -> Result<CardView, VaultError> {
        expect_action(auth, Action::GetCard)?;
        let row = self.live_row(auth, token).await?;
        let honeytoken = row.honeytoken;
        self.batcher()
            .await?
            .audit(access_event(auth, token, honeytoken))
            .await?;
        self.alarm_if(honeytoken, auth, token);
        Ok(view_of(row)?.shown_to(auth))
    }

    /// Decrypts a card's record (inside the vault: for reveal and charge).
    async fn open_card(
        &self,
        tenant: &TenantId,
        token: &Token,
        row: &CardRow,
    ) -> Result<record::CardSecret, VaultError> {
        let sealed_by = crypto::record_dek_id(&row.ciphertext)
            .map_err(|e| VaultError::internal("a card record has a malformed header", e))?;
        if sealed_by != DekId(row.dek_id) {
            return Err(VaultError::internal(
                "a card record's header names another DEK than its row",
                "dek id mismatch",
            ));
        }
        let dek = self.keys.dek(tenant, sealed_by).await?;
        let plaintext = crypto::open_record(&dek, tenant.as_str(), token.as_str(), &row.ciphertext)
            .map_err(|e| {
                // Authentication failure means the row was altered, moved or the wrong key
                // is in use: an operator must look at this one.
                tracing::error!(token = token.as_str(), "card record failed authentication");
                VaultError::internal("failed to open a card record", e)
            })?;
        record::decode(&plaintext)
            .map_err(|e| VaultError::internal("failed to decode a card record", e))
    }

    /// The card's secret fields, decrypted inside the vault. They leave this function only
    /// after the audit record of the reveal has committed.
    #[tracing::instrument(skip_all, fields(tenant = %auth.caller().tenant()))]
    pub async fn reveal(
        &self,
        auth: &Authorized,
        token: &Token,
    ) -> Result<RevealedCard, VaultError> {
        expect_action(auth, Action::Reveal)?;
        let tenant = auth.caller().tenant();
        let row = self.live_row(auth, token).await?;
        let secret = self.open_card(tenant, token, &row).await?;
        let honeytoken = row.honeytoken;
        self.batcher()
            .await?
            .audit(access_event(auth, token, honeytoken))
            .await?;
        self.alarm_if(honeytoken, auth, token);
        Ok(RevealedCard {
            pan: secret.pan,
            holder: secret.holder,
            card: view_of(row)?.shown_to(auth),
        })
    }

    /// Deletes a live card; the token stops resolving at once.
    #[tracing::instrument(skip_all, fields(tenant = %auth.caller().tenant()))]
    pub async fn delete(&self, auth: &Authorized, token: &Token) -> Result<(), VaultError> {
        expect_action(auth, Action::DeleteCard)?;
        let now = OffsetDateTime::now_utc();
        let tenant = auth.caller().tenant().as_str();
        let mut tx = self.begin().await?;
        let Some(row) = tx.card(tenant, token.as_str(), now).await? else {
            drop(tx);
            return Err(self.not_found(auth, token).await);
        };
        tx.delete_card(tenant, token.as_str(), now).await?;
        self.commit_with(tx, &access_event(auth, token, row.honeytoken))
            .await?;
        self.alarm_if(row.honeytoken, auth, token);
        Ok(())
    }

    /// Audit records between `from` (inclusive) and `to` (exclusive), oldest first, after
    /// `cursor`. Global operators see every tenant; others (a tenant's operators included)
    /// see their own tenant's.
    /// The first page of a read is itself recorded.
    pub async fn audit_records(
        &self,
        auth: &Authorized,
        from: OffsetDateTime,
        to: OffsetDateTime,
        cursor: Option<AuditPosition>,
        limit: u32,
    ) -> Result<Vec<AuditRecordView>, VaultError> {
        expect_action(auth, Action::ReadAudit)?;
        if cursor.is_none() {
            let mut audit = event(auth, Outcome::Ok, None);
            audit.detail = Some(format!("from {from} to {to}"));
            self.batcher().await?.audit(audit).await?;
        }
        let tenant = (!auth.is_global_operator()).then(|| auth.caller().tenant().as_str());
        Ok(self
            .store
            .audit_range(from, to, tenant, cursor.map(Into::into), limit)
            .await?
            .into_iter()
            .map(AuditRecordView::from)
            .collect())
    }

    /// Reads a live card of the caller's tenant. A missing card (or another tenant's: the
    /// query cannot tell them apart) is recorded and `NotFound`.
    async fn live_row(&self, auth: &Authorized, token: &Token) -> Result<CardRow, VaultError> {
        let now = OffsetDateTime::now_utc();
        match self
            .store
            .card(auth.caller().tenant().as_str(), token.as_str(), now)
            .await?
        {
            Some(row) => Ok(row),
            None => Err(self.not_found(auth, token).await),
        }
    }

    /// Records a request for a missing token; the error to return (`NotFound`, unless the
    /// record could not be written).
    async fn not_found(&self, auth: &Authorized, token: &Token) -> VaultError {
        let recorded = match self.batcher().await {
            Ok(batcher) => {
                batcher
                    .audit(event(auth, Outcome::NotFound, Some(token)))
                    .await
            }
            Err(err) => Err(err),
        };
        recorded.err().unwrap_or(VaultError::NotFound)
    }

    /// Raises the alarm for an access to a honeytoken: the audit record is already marked;
    /// this adds an error-level log line (no card data) and a metric.
    fn alarm_if(&self, honeytoken: bool, auth: &Authorized, token: &Token) {
        if !honeytoken {
            return;
        }
        let caller = auth.caller();
        tracing::error!(
            alarm = "honeytoken",
            action = auth.action().as_str(),
            token = token.as_str(),
            tenant = %caller.tenant(),
            principal = %caller.principal.id,
            peer = caller.peer.as_deref().unwrap_or(""),
            "HONEYTOKEN ACCESSED: a canary card was used; treat this principal's credentials as compromised"
        );
        metrics::counter!(
            "cardvault_honeytoken_accesses_total",
            "tenant" => caller.tenant().to_string(),
            "action" => auth.action().as_str(),
        )
        .increment(1);
    }
}

/// Guards against passing an authorization for one action to another operation.
fn expect_action(auth: &Authorized, action: Action) -> Result<(), VaultError> {
    if auth.action() == action {
        Ok(())
    } else {
        Err(VaultError::internal(
            "an operation was called with an authorization for another action",
            "action mismatch",
        ))
    }
}

/// The audit event of an authorized request.
fn event(auth: &Authorized, outcome: Outcome, token: Option<&Token>) -> AuditEvent {
    let caller = auth.caller();
    let mut event = AuditEvent::now(auth.action(), outcome);
    event.tenant = Some(caller.tenant().to_string());
    event.principal = Some(caller.principal.id.clone());
    event.peer = caller.peer.clone();
    event.request_id = caller.request_id.clone();
    event.token = token.map(|t| t.as_str().to_owned());
    event
}

/// The audit event of a successful card access, marked as an alarm for a honeytoken.
fn access_event(auth: &Authorized, token: &Token, honeytoken: bool) -> AuditEvent {
    let mut event = event(auth, Outcome::Ok, Some(token));
    if honeytoken {
        event.alarm = true;
        event.detail = Some("honeytoken accessed".to_owned());
    }
    event
}

/// Now, truncated to the microsecond precision both backends store, so what tokenize
/// returns is exactly what a later read returns.
fn now_micros() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

fn view_of(row: CardRow) -> Result<CardView, VaultError> {
    let corrupt = |what: &'static str| VaultError::internal(what, "corrupt row");
    Ok(CardView {
        token: Token::parse(&row.token).map_err(|_| corrupt("a stored token is malformed"))?,
        brand: Brand::from_name(&row.brand).ok_or_else(|| corrupt("a stored brand is unknown"))?,
        last4: row.last4,
        bin: row.bin,
        exp_month: row.exp_month,
        exp_year: row.exp_year,
        fingerprint: Some(
            Fingerprint::from_bytes(&row.fingerprint)
                .map_err(|_| corrupt("a stored fingerprint is malformed"))?,
        ),
        metadata: row.metadata,
        created_at: row.created_at,
        expires_at: row.expires_at,
    })
}
