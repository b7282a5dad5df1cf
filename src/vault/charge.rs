//! Charging a stored card through a configured gateway, exactly once per idempotency key,
//! and the CVC holds a charge consumes.
//!
//! A charge is a `charges` row, unique per (tenant, idempotency key), written `pending`
//! before anything goes out and settled after. Only the request holding the row's send lease
//! (`sending_until`) talks to the gateway, so concurrent duplicates make one gateway call and
//! then read its outcome. The gateway idempotency key is the charge id, stable for the
//! charge's life. A charge whose outcome is unknown (a retry by the caller,
//! `ReconcileCharges`, the background reconciler) is settled by asking the gateway, and sent
//! again only while the gateway still remembers its key (see the `settle` module).
//!
//! The CVC: a hold (sealed like a card record, for `cvc:<token>`) waits for the card's next
//! charge; that charge's first send takes it (deleting the hold, so it serves one charge only)
//! and keeps it sealed on the charge row for its own re-sends until the charge settles or can
//! no longer be re-sent.

use std::sync::Arc;

use ring::digest;

use time::OffsetDateTime;

use super::{
    Authorized, CardView, ChargeView, IdempotencyKey, Metadata, TenantId, Vault, VaultError, event,
    expect_action,
    settle::{Actor, charge_detail, is_unsettled},
    view_of,
};
use crate::{
    audit::{Action, AuditEvent, Outcome},
    card::{Cvc, Token},
    crypto,
    gateway::{Capture, ChargeStatus},
    id::ChargeId,
    money::Currency,
    store::{CaptureMethod, ChargeRow, ChargeState, CvcHoldRow},
};

/// The largest amount a charge may have, in minor units: what both backends' 64-bit signed
/// `amount` column holds. Far beyond any real charge; the API refuses more at the edge.
pub const MAX_CHARGE_AMOUNT: u64 = i64::MAX.unsigned_abs();

/// The metadata key the connectors tag a payment with (the vault's charge id), so the
/// gateway can be asked about it; a caller may not use it.
pub const RESERVED_METADATA_KEY: &str = "cardvault_charge_id";

/// Most metadata entries a charge may carry: Stripe takes 50, and the vault adds one.
pub const MAX_CHARGE_METADATA: usize = 49;

/// A charge to make.
#[derive(Debug)]
pub struct ChargeCommand {
    /// The card's token.
    pub token: Token,
    /// Minor units, 1 to [`MAX_CHARGE_AMOUNT`].
    pub amount: u64,
    /// The charge's currency.
    pub currency: Currency,
    /// A configured gateway's name.
    pub gateway: String,
    /// The caller's key: one key, one charge. Never sent to the gateway (the charge id is).
    pub idempotency_key: IdempotencyKey,
    /// Automatic or manual capture.
    pub capture: Capture,
    /// Shown by the gateway.
    pub description: String,
    /// Passed to the gateway.
    pub metadata: Metadata,
}

/// Counter of charges entering each status (`pending` when created, then each settlement),
/// by `gateway` (a configured name) and `status`.
pub(crate) const CHARGES: &str = "cardvault_charges_total";

/// Counts a charge entering `status`: once per transition, never for a replayed answer.
pub(super) fn entered_status(gateway: &str, status: ChargeState) {
    metrics::counter!(CHARGES, "gateway" => gateway.to_owned(), "status" => status.as_str())
        .increment(1);
}

/// A charge's outcome.
#[derive(Debug)]
pub struct Charged {
    /// The charge as it stands.
    pub charge: ChargeView,
    /// The charged card, masked.
    pub card: CardView,
    /// False when this is the stored outcome of an earlier request with the same key.
    pub created: bool,
}

impl Vault {
    /// The names of the configured gateways.
    pub fn gateway_names(&self) -> Vec<&str> {
        self.options.gateways.names()
    }

    /// Charges a card, exactly once per idempotency key. Each send is on record before it
    /// leaves; a request that sends nothing (a replay, or one that waited for another's send)
    /// records the outcome it answers with. A request that finds another one sending the
    /// charge waits for it until `wait_until` at most, and then answers with the charge as it
    /// stands (`pending`: its outcome is not known yet).
    #[tracing::instrument(skip_all, fields(tenant = %auth.caller().tenant(), gateway = %command.gateway))]
    pub async fn charge(
        &self,
        auth: &Authorized,
        command: ChargeCommand,
        wait_until: Option<tokio::time::Instant>,
    ) -> Result<Charged, VaultError> {
        expect_action(auth, Action::Charge)?;
        let tenant = auth.caller().tenant().clone();
        let token = &command.token;
        let row = self.live_row(auth, token).await?;
        let now = OffsetDateTime::now_utc();
        let fresh = ChargeRow {
            id: ChargeId::generate()
                .map_err(VaultError::no_randomness)?
                .into_string(),
            tenant_id: tenant.to_string(),
            idempotency_key: command.idempotency_key.as_str().to_owned(),
            request_hash: request_hash(&command),
            token: token.as_str().to_owned(),
            gateway: command.gateway.clone(),
            amount: command.amount,
            currency: command.currency.as_str().to_owned(),
            capture: command.capture.into(),
            description: command.description.clone(),
            metadata: command.metadata.entries().to_vec(),
            status: ChargeState::Pending,
            gateway_payment_id: None,
            decline_code: None,
            message: None,
            attempts: 0,
            sending_until: None,
            created_at: now,
            updated_at: now,
            action: None,
            reconcile_attempts: 0,
            next_reconcile_at: None,
        };
        let (charge, created) = match self.store.insert_charge(&fresh).await? {
            None => (fresh, true),
            Some(existing) if existing.request_hash != fresh.request_hash => {
                let mut refused = charge_event(auth, Outcome::Conflict, token, row.honeytoken);
                refused.detail = Some(format!(
                    "charge {}: idempotency key reused with other parameters",
                    existing.id
                ));
                self.record(&refused).await;
                self.alarm_if(row.honeytoken, auth, token);
                return Err(VaultError::Precondition(
                    "this idempotency key was used for a charge with other parameters".to_owned(),
                ));
            }
            Some(existing) => (existing, false),
        };
        if created {
            entered_status(&charge.gateway, charge.status);
        }
        let (charge, sent) = if is_unsettled(&charge) {
            let settled = self.settle(Actor::Caller(auth), &charge, wait_until).await;
            let settled = self.recorded(auth, Some(token), settled).await?;
            (settled.charge, settled.acted)
        } else {
            (charge, false)
        };
        if !sent {
            let mut answered = charge_event(auth, Outcome::Ok, token, row.honeytoken);
            answered.detail = Some(charge_detail(
                &charge,
                &format!(
                    "{}{}",
                    charge.status,
                    if created { "" } else { " (replayed)" }
                ),
            ));
            self.batcher().await?.audit(answered).await?;
        }
        self.alarm_if(row.honeytoken, auth, token);
        Ok(Charged {
            card: view_of(row)?.shown_to(auth),
            charge: charge.into(),
            created,
        })
    }

    /// Holds a CVC for the next charge of a card of the caller's tenant; returns when the
    /// hold lapses.
    #[tracing::instrument(skip_all, fields(tenant = %auth.caller().tenant()))]
    pub async fn hold_cvc(
        &self,
        auth: &Authorized,
        token: &Token,
        cvc: &Cvc,
    ) -> Result<OffsetDateTime, VaultError> {
        expect_action(auth, Action::HoldCvc)?;
        self.live_row(auth, token).await?;
        let held = self.put_cvc_hold(auth.caller().tenant(), token, cvc).await;
        let expires_at = self.recorded(auth, Some(token), held).await?;
        self.batcher()
            .await?
            .audit(event(auth, Outcome::Ok, Some(token)))
            .await?;
        Ok(expires_at)
    }

    /// Seals a CVC under the tenant's active DEK and stores it as the token's hold.
    pub(super) async fn put_cvc_hold(
        &self,
        tenant: &TenantId,
        token: &Token,
        cvc: &Cvc,
    ) -> Result<OffsetDateTime, VaultError> {
        let keys = self.keys.tenant(tenant).await?;
        let (dek_id, dek) = self.keys.encryptions(tenant, &keys, 1).await?;
        let ciphertext = crypto::seal_record(
            &dek,
            dek_id,
            tenant.as_str(),
            &cvc_aad_token(token),
            cvc.expose().as_bytes(),
        )
        .map_err(|e| VaultError::internal("failed to seal a CVC", e))?;
        let ttl = time::Duration::try_from(self.options.cvc_hold_ttl)
            .map_err(|e| VaultError::internal("CVC hold time out of range", e))?;
        let expires_at = OffsetDateTime::now_utc()
            .checked_add(ttl)
            .ok_or_else(|| VaultError::internal("CVC hold time out of range", "overflow"))?;
        self.store
            .put_cvc_hold(&CvcHoldRow {
                token: token.as_str().to_owned(),
                tenant_id: tenant.to_string(),
                dek_id: dek_id.0,
                ciphertext,
                expires_at,
            })
            .await?;
        Ok(expires_at)
    }

    /// Settles the caller's tenant's unsettled charges by asking their gateways (see
    /// the `settle` module); returns them as they stand afterwards.
    #[tracing::instrument(skip_all, fields(tenant = %auth.caller().tenant()))]
    pub async fn reconcile_charges(
        &self,
        auth: &Authorized,
        limit: u32,
    ) -> Result<Vec<ChargeView>, VaultError> {
        expect_action(auth, Action::ReconcileCharges)?;
        let tenant = auth.caller().tenant().clone();
        let now = OffsetDateTime::now_utc();
        let pending = self
            .store
            .unsettled_charges(Some(tenant.as_str()), now, limit)
            .await?;
        let mut settled = Vec::with_capacity(pending.len());
        for charge in pending {
            let token = Token::parse(&charge.token).ok();
            let result = self.settle(Actor::Caller(auth), &charge, None).await;
            match self.recorded(auth, token.as_ref(), result).await {
                Ok(done) => settled.push(done.charge),
                // A gateway only another replica has: that replica can settle it; this one
                // leaves it as it stands rather than fail the others.
                Err(VaultError::Precondition(_)) => settled.push(charge),
                Err(err) => return Err(err),
            }
        }
        let mut done = event(auth, Outcome::Ok, None);
        done.detail = Some(format!(
            "reconciled {} charges: {}",
            settled.len(),
            settled
                .iter()
                .map(|c| format!("{} {}", c.id, c.status))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        self.record(&done).await;
        Ok(settled.into_iter().map(ChargeView::from).collect())
    }

    /// The caller's charge under `idempotency_key` as it stands, with its card: the answer to
    /// a request whose deadline came before the charge's outcome. Audited as such, in the
    /// background: the deadline leaves no time to wait for a commit.
    pub async fn charge_in_progress(
        self: &Arc<Self>,
        auth: &Authorized,
        token: &Token,
        idempotency_key: &IdempotencyKey,
    ) -> Result<Charged, VaultError> {
        expect_action(auth, Action::Charge)?;
        let tenant = auth.caller().tenant();
        let row = self.live_row(auth, token).await?;
        let charge = self
            .store
            .charge_by_key(tenant.as_str(), idempotency_key.as_str())
            .await?
            .ok_or_else(|| {
                // Not even written yet: the database is too slow for the deadline.
                VaultError::Unavailable(
                    "the charge was not recorded within the request's deadline".into(),
                )
            })?;
        let mut answered = charge_event(auth, Outcome::Ok, token, row.honeytoken);
        answered.detail = Some(charge_detail(
            &charge,
            &format!("{} (answered at the request's deadline)", charge.status),
        ));
        let vault = self.clone();
        tokio::spawn(async move { vault.record(&answered).await });
        Ok(Charged {
            card: view_of(row)?.shown_to(auth),
            charge: charge.into(),
            created: false,
        })
    }
}

/// The audit event of a charge request about `token`, an alarm for a honeytoken.
fn charge_event(
    auth: &Authorized,
    outcome: Outcome,
    token: &Token,
    honeytoken: bool,
) -> AuditEvent {
    let mut event = event(auth, outcome, Some(token));
    event.alarm = honeytoken;
    event
}

/// The AAD "token" of a CVC hold: a hold can never be opened as a card record, nor a card
/// record as a hold.
pub(super) fn cvc_aad_token(token: &Token) -> String {
    format!("cvc:{}", token.as_str())
}

// The gateway's words and the store's are kept apart (neither layer may import the other);
// the vault translates, exhaustively, so a new variant on either side fails to compile here.

impl From<CaptureMethod> for Capture {
    fn from(capture: CaptureMethod) -> Capture {
        match capture {
            CaptureMethod::Automatic => Capture::Automatic,
            CaptureMethod::Manual => Capture::Manual,
        }
    }
}

impl From<Capture> for CaptureMethod {
    fn from(capture: Capture) -> CaptureMethod {
        match capture {
            Capture::Automatic => CaptureMethod::Automatic,
            Capture::Manual => CaptureMethod::Manual,
        }
    }
}

impl From<ChargeStatus> for ChargeState {
    fn from(status: ChargeStatus) -> ChargeState {
        match status {
            ChargeStatus::Succeeded => ChargeState::Succeeded,
            ChargeStatus::RequiresAction => ChargeState::RequiresAction,
            ChargeStatus::Declined => ChargeState::Declined,
            ChargeStatus::Failed => ChargeState::Failed,
            ChargeStatus::Unknown => ChargeState::Unknown,
        }
    }
}

/// SHA-256 over the charge's parameters, each length-prefixed so no two parameter sets
/// share an encoding.
fn request_hash(command: &ChargeCommand) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut field = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    };
    field(command.token.as_str().as_bytes());
    field(&command.amount.to_be_bytes());
    field(command.currency.as_str().as_bytes());
    field(command.gateway.as_bytes());
    field(CaptureMethod::from(command.capture).as_str().as_bytes());
    field(command.description.as_bytes());
    for (key, value) in command.metadata.entries() {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    ctx.finish().as_ref().to_vec()
}
