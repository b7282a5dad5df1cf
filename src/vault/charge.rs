//! Charging a stored card through a configured gateway, exactly once per idempotency key,
//! and the CVC holds a charge consumes.
//!
//! A charge is a `charges` row, unique per (tenant, idempotency key), written `pending`
//! before anything goes out and settled after. Only the request holding the row's send lease
//! (`sending_until`) talks to the gateway, so concurrent duplicates make one gateway call and
//! then read its outcome. The gateway idempotency key is the charge id, stable for the
//! charge's life, so a re-send after an unknown outcome (a retry by the caller, or
//! `ReconcileCharges`) is answered by the gateway from its own record rather than charging
//! again.
//!
//! The CVC: a hold (sealed like a card record, for `cvc:<token>`) waits for the card's next
//! charge; that charge takes it (deleting the hold, so it serves one charge only) and keeps it
//! sealed on the charge row for its own re-sends until the charge settles or the hold's time
//! runs out.

use std::time::Duration;

use ring::digest;
use time::OffsetDateTime;

use super::{
    Authorized, CardView, Metadata, TenantId, Vault, VaultError, event, expect_action,
    key_admin::new_id, view_of,
};
use crate::{
    audit::{Action, AuditEvent, Outcome},
    card::{Cvc, Token},
    crypto::{self, DekId},
    gateway::{Capture, ChargeCard, ChargeParams, ChargeStatus, Connector},
    store::{ChargeRow, ChargeSettlement, CvcHoldRow},
};

/// The largest amount a charge may have, in minor units: what both backends' 64-bit signed
/// `amount` column holds. Far beyond any real charge; the API refuses more at the edge.
pub const MAX_CHARGE_AMOUNT: u64 = i64::MAX.unsigned_abs();

/// A charge to make.
#[derive(Debug)]
pub struct ChargeCommand {
    /// The card's token.
    pub token: Token,
    /// Minor units, 1 to [`MAX_CHARGE_AMOUNT`].
    pub amount: u64,
    /// ISO 4217, upper case.
    pub currency: String,
    /// A configured gateway's name.
    pub gateway: String,
    /// The caller's key: one key, one charge.
    pub idempotency_key: String,
    /// Automatic or manual capture.
    pub capture: Capture,
    /// Shown by the gateway.
    pub description: String,
    /// Passed to the gateway.
    pub metadata: Metadata,
}

/// A charge's outcome.
#[derive(Debug)]
pub struct Charged {
    /// The stored charge.
    pub charge: ChargeRow,
    /// The charged card, masked.
    pub card: CardView,
    /// False when this is the stored outcome of an earlier request with the same key.
    pub created: bool,
}

/// How long a request waits for another request that is sending the same charge, between
/// looks at the row.
const WAIT_STEP: Duration = Duration::from_millis(50);

impl Vault {
    /// The names of the configured gateways.
    pub fn gateway_names(&self) -> Vec<&str> {
        self.options.gateways.names()
    }

    /// Charges a card, exactly once per idempotency key. Each send is on record before it
    /// leaves (see [`Vault::send`]); a request that sends nothing (a replay, or one that
    /// waited for another's send) records the outcome it answers with.
    #[tracing::instrument(skip_all, fields(tenant = %auth.caller().tenant(), gateway = %command.gateway))]
    pub async fn charge(
        &self,
        auth: &Authorized,
        command: ChargeCommand,
    ) -> Result<Charged, VaultError> {
        expect_action(auth, Action::Charge)?;
        let tenant = auth.caller().tenant().clone();
        let token = &command.token;
        let row = self.live_row(auth, token).await?;
        let now = OffsetDateTime::now_utc();
        let fresh = ChargeRow {
            id: new_id("ch_")?,
            tenant_id: tenant.to_string(),
            idempotency_key: command.idempotency_key.clone(),
            request_hash: request_hash(&command),
            token: token.as_str().to_owned(),
            gateway: command.gateway.clone(),
            amount: command.amount,
            currency: command.currency.clone(),
            capture: capture_name(command.capture).to_owned(),
            description: command.description.clone(),
            metadata: command.metadata.entries().to_vec(),
            status: "pending".to_owned(),
            gateway_payment_id: None,
            decline_code: None,
            message: None,
            attempts: 0,
            sending_until: None,
            created_at: now,
            updated_at: now,
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
        let (charge, sent) = if is_unsettled(&charge) {
            let sent = self.send(auth, &tenant, token, &row, &charge).await;
            self.recorded(auth, Some(token), sent).await?
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
        metrics::counter!(
            "cardvault_charges_total",
            "gateway" => charge.gateway.clone(),
            "status" => charge.status.clone()
        )
        .increment(1);
        Ok(Charged {
            card: view_of(row)?.shown_to(auth),
            charge,
            created,
        })
    }

    /// Sends an unsettled charge, exactly as it was first asked for, or waits for the request
    /// that is sending it; returns the charge as it stands afterwards, and whether this call
    /// sent it (and so recorded it).
    ///
    /// The attempt's audit record commits before anything goes to the gateway, and the
    /// outcome's in the same transaction as the settled charge: a crash during the call
    /// leaves a record of a charge that may have been made, never a charge without one.
    /// A honeytoken is never sent: it is declined the way the gateway declines a card.
    async fn send(
        &self,
        auth: &Authorized,
        tenant: &TenantId,
        token: &Token,
        card_row: &crate::store::CardRow,
        charge: &ChargeRow,
    ) -> Result<(ChargeRow, bool), VaultError> {
        let lease = time::Duration::try_from(self.options.charge_send_lease)
            .map_err(|e| VaultError::internal("charge send lease out of range", e))?;
        let connector = self
            .options
            .gateways
            .get(&charge.gateway)
            .ok_or_else(|| {
                VaultError::Precondition(format!(
                    "charge {}: gateway {:?} is not configured on this replica",
                    charge.id, charge.gateway
                ))
            })?
            .clone();
        if charge.attempts > 0 && connector.resend_window().is_none() {
            // Sent once already, to a gateway that cannot tell a re-send from a new charge:
            // the outcome stays unknown until an operator settles it at the gateway.
            return Ok((charge.clone(), false));
        }
        loop {
            let now = OffsetDateTime::now_utc();
            let until = now.checked_add(lease).ok_or_else(|| {
                VaultError::internal("charge send lease out of range", "overflow")
            })?;
            if self.store.claim_charge_send(&charge.id, now, until).await? {
                break;
            }
            // Another request is sending it: wait for its outcome.
            tokio::time::sleep(WAIT_STEP).await;
            let current = self
                .store
                .charge(&charge.id)
                .await?
                .ok_or_else(|| VaultError::internal("a charge vanished", "no row"))?;
            if !is_unsettled(&current) {
                return Ok((current, false));
            }
        }
        let honeytoken = card_row.honeytoken;
        let (outcome, what) = if honeytoken {
            // Before the card is opened or anything is sent, and shaped like the gateway's
            // own decline, so the caller learns nothing; the operators get the alarm.
            (
                connector.decoy_decline(),
                "honeytoken, not sent to the gateway",
            )
        } else {
            // The claim counted this attempt.
            let attempt = charge.attempts.saturating_add(1);
            let mut sending = charge_event(auth, Outcome::Ok, token, false);
            sending.detail = Some(charge_detail(
                charge,
                &format!("sending (attempt {attempt})"),
            ));
            self.batcher().await?.audit(sending).await?;
            (
                self.call_gateway(tenant, token, card_row, charge, connector.as_ref())
                    .await?,
                "",
            )
        };
        let settlement = ChargeSettlement {
            status: status_name(outcome.status).to_owned(),
            gateway_payment_id: outcome.payment_id,
            decline_code: outcome.decline_code,
            message: outcome.message,
        };
        let mut settled = charge_event(auth, Outcome::Ok, token, honeytoken);
        settled.detail = Some(charge_detail(
            charge,
            &if what.is_empty() {
                settlement.status.clone()
            } else {
                format!("{} ({what})", settlement.status)
            },
        ));
        let mut tx = self.begin().await?;
        tx.settle_charge(&charge.id, &settlement, OffsetDateTime::now_utc())
            .await?;
        self.commit_with(tx, &settled).await?;
        let current = self
            .store
            .charge(&charge.id)
            .await?
            .ok_or_else(|| VaultError::internal("a charge vanished", "no row"))?;
        Ok((current, true))
    }

    /// Opens the card (and the CVC held for it) inside the vault and sends the charge.
    async fn call_gateway(
        &self,
        tenant: &TenantId,
        token: &Token,
        card_row: &crate::store::CardRow,
        charge: &ChargeRow,
        connector: &dyn Connector,
    ) -> Result<crate::gateway::Outcome, VaultError> {
        let secret = self.open_card(tenant, token, card_row).await?;
        let cvc = self.charge_cvc(tenant, token, &charge.id).await?;
        let card = ChargeCard {
            pan: &secret.pan,
            exp_month: card_row.exp_month,
            exp_year: card_row.exp_year,
            cvc: cvc.as_ref().map(Cvc::expose),
            holder: secret.holder.as_ref().map(|h| h.expose()),
        };
        let params = ChargeParams {
            amount: charge.amount,
            currency: &charge.currency,
            capture: capture_of(&charge.capture),
            description: &charge.description,
            metadata: &charge.metadata,
            idempotency_key: &charge.id,
            resend: charge.attempts > 0,
        };
        Ok(connector.charge(&card, &params).await)
    }

    /// The CVC for a charge: the one already attached to it (a re-send), else the token's
    /// hold, which the charge takes for itself. `None` when there is neither, or the DEK that
    /// sealed it is gone.
    async fn charge_cvc(
        &self,
        tenant: &TenantId,
        token: &Token,
        charge_id: &str,
    ) -> Result<Option<Cvc>, VaultError> {
        let now = OffsetDateTime::now_utc();
        let hold = match self.store.charge_cvc(charge_id, now).await? {
            Some(hold) => hold,
            None => match self
                .store
                .take_cvc_hold(tenant.as_str(), token.as_str(), now)
                .await?
            {
                Some(hold) => {
                    self.store.attach_charge_cvc(charge_id, &hold).await?;
                    hold
                }
                None => return Ok(None),
            },
        };
        let Ok(dek) = self.keys.dek(tenant, DekId(hold.dek_id)).await else {
            tracing::warn!("a CVC hold's data key is gone; charging without the CVC");
            return Ok(None);
        };
        let digits = crypto::open_record(
            &dek,
            tenant.as_str(),
            &cvc_aad_token(token),
            &hold.ciphertext,
        )
        .map_err(|e| VaultError::internal("failed to open a CVC hold", e))?;
        let text = std::str::from_utf8(&digits)
            .map_err(|e| VaultError::internal("a CVC hold is not text", e))?;
        Cvc::parse(text).map_err(|e| VaultError::internal("a CVC hold is malformed", e))
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

    /// Sends the caller's tenant's unsettled charges again under their gateway idempotency
    /// keys; returns them as they stand afterwards.
    #[tracing::instrument(skip_all, fields(tenant = %auth.caller().tenant()))]
    pub async fn reconcile_charges(
        &self,
        auth: &Authorized,
        limit: u32,
    ) -> Result<Vec<ChargeRow>, VaultError> {
        expect_action(auth, Action::ReconcileCharges)?;
        let tenant = auth.caller().tenant().clone();
        let now = OffsetDateTime::now_utc();
        let pending = self
            .store
            .unsettled_charges(Some(tenant.as_str()), now, limit)
            .await?;
        let mut settled = Vec::with_capacity(pending.len());
        for charge in pending {
            let Ok(token) = Token::parse(&charge.token) else {
                return Err(VaultError::internal(
                    "a stored token is malformed",
                    "corrupt row",
                ));
            };
            let Some(card_row) = self
                .store
                .card(tenant.as_str(), token.as_str(), now)
                .await?
            else {
                // The card was deleted since: nothing can be re-sent; it stays unknown.
                settled.push(charge);
                continue;
            };
            let sent = self.send(auth, &tenant, &token, &card_row, &charge).await;
            match self.recorded(auth, Some(&token), sent).await {
                Ok((current, _)) => settled.push(current),
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
        Ok(settled)
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

/// `charge ch_… via stripe: 1999 EUR <what>`: the charge's audit detail (no card data).
fn charge_detail(charge: &ChargeRow, what: &str) -> String {
    format!(
        "charge {} via {}: {} {} {what}",
        charge.id, charge.gateway, charge.amount, charge.currency
    )
}

/// The AAD "token" of a CVC hold: a hold can never be opened as a card record, nor a card
/// record as a hold.
fn cvc_aad_token(token: &Token) -> String {
    format!("cvc:{}", token.as_str())
}

fn is_unsettled(charge: &ChargeRow) -> bool {
    matches!(charge.status.as_str(), "pending" | "unknown")
}

fn capture_of(name: &str) -> Capture {
    if name == "manual" {
        Capture::Manual
    } else {
        Capture::Automatic
    }
}

fn capture_name(capture: Capture) -> &'static str {
    match capture {
        Capture::Automatic => "automatic",
        Capture::Manual => "manual",
    }
}

/// The stored name of a status.
pub fn status_name(status: ChargeStatus) -> &'static str {
    match status {
        ChargeStatus::Succeeded => "succeeded",
        ChargeStatus::RequiresAction => "requires_action",
        ChargeStatus::Declined => "declined",
        ChargeStatus::Failed => "failed",
        ChargeStatus::Unknown => "unknown",
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
    field(command.currency.as_bytes());
    field(command.gateway.as_bytes());
    field(capture_name(command.capture).as_bytes());
    field(command.description.as_bytes());
    for (key, value) in command.metadata.entries() {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    ctx.finish().as_ref().to_vec()
}
