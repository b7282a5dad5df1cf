//! The audit log: append-only, HMAC-SHA256-chained records of every sensitive action.
//!
//! # Design
//!
//! Records live in [`SHARDS`] independent chains. An append picks a chain round-robin, locks
//! that chain's head row (`SELECT … FOR UPDATE`), writes the record with
//! `mac = HMAC(audit key, shard ‖ seq ‖ previous mac ‖ record fields)`, and moves the head,
//! all inside the transaction of the action it records: the action and its record commit
//! together or not at all. Concurrent requests contend on one of sixteen head rows instead
//! of on one global lock; SQLite serializes writers anyway.
//!
//! Each chain starts at a genesis MAC derived from the audit key, so a chain cannot be
//! replaced wholesale; sequence numbers are gap-free, so a deleted record shows as a gap; the
//! MAC covers the sequence number and the previous MAC, so an edited or reordered record
//! fails its MAC; and the head row carries its own MAC over `(shard, seq, mac)`, so cutting
//! the tail and winding the head back needs the key too. The audit key is wrapped by the KEK
//! and the wrapping binds the number of chains. [`verify`] checks all of it.
//!
//! A database writer who saved an older copy of the head rows and the records up to them can
//! still restore it: an older history verifies as well as the current one. [`anchor`]s,
//! MAC'd statements of every chain's head exported out of the database, catch that:
//! [`verify_anchored`] checks the chains against them.
//!
//! Appends always come last in a transaction, so a transaction holding a head lock waits for
//! nothing but its commit, and no two transactions can wait on each other in a cycle.

mod anchor;
mod chain;
mod verify;

/// Counter of audit records committed, by the audited event's `outcome` (a fixed set).
pub const APPENDS: &str = "cardvault_audit_appends_total";
/// Counter of audit writes whose transaction failed, so the events they carried are not
/// in the log (the requests failed with them).
pub const APPEND_FAILURES: &str = "cardvault_audit_append_failures_total";
/// Counter of audit checks that found the log tampered with, by `check`: `head` (a chain
/// head failed its MAC when anchoring) or `chain` (a full verify found a break).
pub const VERIFY_FAILURES: &str = "cardvault_audit_verify_failures_total";

/// Counts `events` as committed to the log; call it after the commit.
pub(crate) fn appended<'a>(events: impl IntoIterator<Item = &'a AuditEvent>) {
    for event in events {
        metrics::counter!(APPENDS, "outcome" => event.outcome.as_str()).increment(1);
    }
}

/// Counts `events` audit records lost with a failed transaction.
pub(crate) fn append_failed(events: usize) {
    metrics::counter!(APPEND_FAILURES).increment(events as u64);
}

use std::sync::atomic::{AtomicU32, Ordering};

use time::OffsetDateTime;

pub use self::anchor::{
    ANCHOR_FORMAT_V1, ANCHOR_KIND, Anchor, AnchorRef, AnchorSink, AnchoredHead, Anchors,
    BadAnchorLine,
};
pub use self::verify::{AnchorBreak, Break, Report, verify, verify_anchored};
/// A stored audit record, as read back.
pub use crate::store::AuditRow as AuditRecord;
use crate::{
    crypto::{
        AnchorKey, AuditKey, CryptoError, KekVersion, KeyProvider, WrappedKey, audit_key_wrap_aad,
    },
    store::{AuditHeadRow, AuditKeyRow, AuditRow, Store, StoreError, StoreTx},
};

/// Number of audit chains a new vault creates.
pub const SHARDS: u32 = 16;

/// What was done. The names are stable: they are stored and MAC'd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `Tokenize`.
    Tokenize,
    /// `GetCard`.
    GetCard,
    /// `Reveal`.
    Reveal,
    /// `DeleteCard`.
    DeleteCard,
    /// `Charge`.
    Charge,
    /// A request whose credentials were missing, malformed, unknown, expired or revoked.
    Authenticate,
    /// Streaming audit records.
    ReadAudit,
    /// Creating a tenant.
    CreateTenant,
    /// Creating a principal.
    CreatePrincipal,
    /// Listing principals.
    ListPrincipals,
    /// Revoking a principal.
    RevokePrincipal,
    /// Creating an API key.
    CreateApiKey,
    /// Revoking an API key.
    RevokeApiKey,
    /// Minting a honeytoken.
    MintHoneytoken,
    /// One chunk of an `ImportCards` stream (one record per chunk, not per card).
    ImportCards,
    /// Making a new KEK version primary (and starting the rewrap job).
    RotateKek,
    /// Making new DEKs active (and optionally starting re-encryption).
    RotateDeks,
    /// Reading key versions, usage and jobs.
    KeyStatus,
    /// Asking for a dual-controlled operation (retire a KEK, shred a tenant).
    RequestKeyOperation,
    /// Approving (and so carrying out) a dual-controlled operation.
    ApproveKeyOperation,
    /// A background key job (rewrap, re-encryption) finishing or failing.
    KeyJob,
    /// Holding a CVC for a card's next charge.
    HoldCvc,
    /// Settling charges whose outcome was unknown.
    ReconcileCharges,
    /// `CaptureCharge`.
    CaptureCharge,
    /// `RefundCharge`.
    RefundCharge,
    /// `CancelCharge`.
    CancelCharge,
}

impl Action {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Tokenize => "tokenize",
            Action::GetCard => "get_card",
            Action::Reveal => "reveal",
            Action::DeleteCard => "delete_card",
            Action::Charge => "charge",
            Action::Authenticate => "authenticate",
            Action::ReadAudit => "audit.read",
            Action::CreateTenant => "admin.create_tenant",
            Action::CreatePrincipal => "admin.create_principal",
            Action::ListPrincipals => "admin.list_principals",
            Action::RevokePrincipal => "admin.revoke_principal",
            Action::CreateApiKey => "admin.create_api_key",
            Action::RevokeApiKey => "admin.revoke_api_key",
            Action::MintHoneytoken => "admin.mint_honeytoken",
            Action::ImportCards => "import_cards",
            Action::RotateKek => "keys.rotate_kek",
            Action::RotateDeks => "keys.rotate_deks",
            Action::KeyStatus => "keys.status",
            Action::RequestKeyOperation => "keys.request",
            Action::ApproveKeyOperation => "keys.approve",
            Action::KeyJob => "keys.job",
            Action::HoldCvc => "hold_cvc",
            Action::ReconcileCharges => "charges.reconcile",
            Action::CaptureCharge => "charges.capture",
            Action::RefundCharge => "charges.refund",
            Action::CancelCharge => "charges.cancel",
        }
    }
}

/// How it ended. Defined by the store, which stores it in [`AuditRecord::outcome`] and
/// reads back only names it knows (the store imports nothing from the crate).
pub use crate::store::AuditOutcome as Outcome;

/// An event to record. Never holds a PAN, CVC or key: tokens and ids only.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// When it happened.
    pub at: OffsetDateTime,
    /// Tenant acted on.
    pub tenant: Option<String>,
    /// Principal id that acted (`p_…`, `config:<name>`, or `local:unverified:<user>` for the CLI, whose OS user the vault does not verify).
    pub principal: Option<String>,
    /// What was done.
    pub action: Action,
    /// Token acted on.
    pub token: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// Needs an operator's attention (honeytoken access).
    pub alarm: bool,
    /// Caller's network address.
    pub peer: Option<String>,
    /// Request id.
    pub request_id: Option<String>,
    /// Extra non-secret context.
    pub detail: Option<String>,
}

impl AuditEvent {
    /// An event happening now, with everything optional left empty.
    pub fn now(action: Action, outcome: Outcome) -> AuditEvent {
        let now = OffsetDateTime::now_utc();
        AuditEvent {
            // Both backends keep microseconds; truncating here makes the MAC'd value and the
            // stored value the same.
            at: now
                .replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
                .unwrap_or(now),
            tenant: None,
            principal: None,
            action,
            token: None,
            outcome,
            alarm: false,
            peer: None,
            request_id: None,
            detail: None,
        }
    }
}

/// Audit failures. An action whose record cannot be written does not happen.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit key could not be created or unwrapped.
    #[error("audit key: {0}")]
    Key(#[from] CryptoError),
    /// Audit state in the database is not what the vault writes.
    #[error("audit log corrupt: {0}")]
    Corrupt(&'static str),
    /// `audit verify` on a database where no audit key was ever created.
    #[error("this database has no audit key yet: no record was ever written")]
    NoAuditKey,
    /// An anchor line is not one the vault writes (the reason never holds more than the
    /// line's structure: anchors carry no secrets anyway).
    #[error("{0}")]
    BadAnchor(String),
    /// An anchor file could not be read or written.
    #[error("anchor file {}: {source}", path.display())]
    AnchorFile {
        /// The file (`-` for standard output).
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Appends audit records; holds the unwrapped audit key.
pub struct Auditor {
    key: AuditKey,
    anchor_key: AnchorKey,
    shards: u32,
    next: AtomicU32,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// Loads the audit key, creating it and the empty chains on first use (replicas racing
    /// to create it agree on one through the table's single-row key).
    pub async fn open(store: &dyn Store, provider: &dyn KeyProvider) -> Result<Self, AuditError> {
        if let Some(auditor) = Self::load(store, provider).await? {
            return Ok(auditor);
        }
        let key = AuditKey::generate()?;
        let wrapped = provider
            .wrap(key.expose_bytes(), &audit_key_wrap_aad(SHARDS))
            .await?;
        let row = AuditKeyRow {
            kek_version: wrapped.kek_version.0,
            wrapped_key: wrapped.bytes,
            shards: SHARDS,
            created_at: OffsetDateTime::now_utc(),
        };
        let mut tx = store.begin().await?;
        if tx.insert_audit_key(&row).await? {
            for shard in 0..SHARDS {
                tx.insert_audit_head(&chain::genesis_head(&key, shard))
                    .await?;
            }
            tx.commit().await?;
            tracing::info!(shards = SHARDS, "created the audit key and chains");
            return Ok(Auditor::new(key, SHARDS));
        }
        drop(tx);
        Self::load(store, provider)
            .await?
            .ok_or(AuditError::Corrupt(
                "audit key vanished while being created",
            ))
    }

    /// Loads the audit key if one exists.
    pub async fn load(
        store: &dyn Store,
        provider: &dyn KeyProvider,
    ) -> Result<Option<Self>, AuditError> {
        let Some(row) = store.audit_key().await? else {
            return Ok(None);
        };
        let wrapped = WrappedKey {
            kek_version: KekVersion(row.kek_version),
            bytes: row.wrapped_key,
        };
        let bytes = provider
            .unwrap(&wrapped, &audit_key_wrap_aad(row.shards))
            .await?;
        let key = AuditKey::from_bytes(&bytes)?;
        Ok(Some(Auditor::new(key, row.shards)))
    }

    fn new(key: AuditKey, shards: u32) -> Auditor {
        // Replicas start at different chains so they do not all contend on chain 0 first.
        let mut start = [0u8; 4];
        let _ = crate::crypto::fill_random(&mut start);
        Auditor {
            anchor_key: key.anchor_key(),
            key,
            shards,
            next: AtomicU32::new(u32::from_be_bytes(start)),
        }
    }

    /// Number of chains.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Appends `event` inside `tx`. Call it last in the transaction, then commit.
    pub async fn append(&self, tx: &mut dyn StoreTx, event: &AuditEvent) -> Result<(), AuditError> {
        self.append_all(tx, &[event]).await
    }

    /// Appends `events`, in order, to one chain inside `tx`: one head lock, one insert and
    /// one head update however many there are (the group-commit path). Call it last in the
    /// transaction, then commit.
    pub async fn append_all(
        &self,
        tx: &mut dyn StoreTx,
        events: &[&AuditEvent],
    ) -> Result<(), AuditError> {
        if events.is_empty() {
            return Ok(());
        }
        let shard = self.next.fetch_add(1, Ordering::Relaxed) % self.shards;
        let head = tx
            .lock_audit_head(shard)
            .await?
            .ok_or(AuditError::Corrupt("audit chain head missing"))?;
        let (records, new_head) = self.extend(&head, events);
        tx.append_audit(&records, &new_head).await?;
        Ok(())
    }

    /// The records that append `events`, in order, to the chain whose head is `head`, and
    /// the chain's new head: MACs only, no I/O. Whoever writes them must make sure `head` is
    /// still the chain's head when they commit (a lock, or a conditional update).
    pub fn extend(
        &self,
        head: &AuditHeadRow,
        events: &[&AuditEvent],
    ) -> (Vec<AuditRow>, AuditHeadRow) {
        let shard = head.shard;
        let mut records = Vec::with_capacity(events.len());
        let (mut seq, mut mac) = (head.seq, head.mac.clone());
        for event in events {
            seq += 1;
            let mut row = AuditRow {
                shard,
                seq,
                at: event.at,
                tenant_id: event.tenant.clone(),
                principal: event.principal.clone(),
                action: event.action.as_str().to_owned(),
                token: event.token.clone(),
                outcome: event.outcome,
                alarm: event.alarm,
                peer: event.peer.clone(),
                request_id: event.request_id.clone(),
                detail: event.detail.clone(),
                mac: Vec::new(),
            };
            row.mac = chain::record_mac(&self.key, &row, &mac).to_vec();
            mac.clone_from(&row.mac);
            records.push(row);
        }
        (records, chain::head(&self.key, shard, seq, &mac))
    }

    /// Records `event` in a transaction of its own (for events with no other write, such as
    /// a refused request).
    pub async fn record(&self, store: &dyn Store, event: &AuditEvent) -> Result<(), AuditError> {
        let mut tx = store.begin().await?;
        self.append(tx.as_mut(), event).await?;
        tx.commit().await?;
        appended([event]);
        Ok(())
    }

    pub(crate) fn key(&self) -> &AuditKey {
        &self.key
    }

    fn anchor_key(&self) -> &AnchorKey {
        &self.anchor_key
    }
}
