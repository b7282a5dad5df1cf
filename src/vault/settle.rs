//! Settling a charge: sending it the first time, and afterwards asking the gateway what became
//! of it rather than sending it again.
//!
//! One function ([`Vault::settle`]) serves the Charge RPC (a charge it finds unsettled), the
//! ReconcileCharges RPC and the background reconciler. It holds the charge's send lease for the
//! whole decision, so one request at a time talks to the gateway about a charge:
//!
//! - never sent (`attempts` was 0): send it; the first send alone may take the card's CVC hold;
//! - sent before: [`Connector::lookup`] decides. A payment the gateway holds settles the charge
//!   with its status. No payment, and the gateway still remembers the idempotency key (within
//!   [`Connector::resend_window`] of the first send): send it again under the same key, with
//!   the CVC attached to the charge only. No payment past that window: nothing was charged, and
//!   nothing can be safely sent again, so the charge settles `failed` with the gateway's answer
//!   as evidence. A gateway that cannot be asked leaves the charge `unknown` (re-sent within
//!   the window when the connector cannot look up at all, as the gateway dedupes by key).
//!
//! Every decision is audited with the settle; the card is opened only when something is sent.

use std::time::Duration;

use time::OffsetDateTime;

use super::{Authorized, TenantId, Vault, VaultError, event};
use crate::{
    audit::{Action, AuditEvent, Outcome},
    card::{Cvc, Token},
    crypto::{self, DekId},
    gateway::{ChargeCard, ChargeParams, ChargeRef, ChargeStatus, Connector, Lookup, NextAction},
    id::ChargeId,
    money::Currency,
    store::{CardRow, ChargeActionRow, ChargeRow, ChargeSettlement, ChargeState, StoreError},
};

/// A stored charge's id and currency as the types the connectors take. The API let through
/// only well-formed values, so anything else was changed in the database: an error, never
/// sent.
pub(super) fn gateway_terms(charge: &ChargeRow) -> Result<(ChargeId, Currency), VaultError> {
    let id = ChargeId::parse(&charge.id)
        .map_err(|_| StoreError::Corrupt("a stored charge id is malformed"))?;
    let currency = Currency::parse(&charge.currency)
        .map_err(|_| StoreError::Corrupt("a stored charge currency is malformed"))?;
    Ok((id, currency))
}

/// The audit principal of what the background reconciler does.
pub const RECONCILER_PRINCIPAL: &str = "system:reconciler";

/// How long a request waits for another request that is sending the same charge, between
/// looks at the row.
const WAIT_STEP: Duration = Duration::from_millis(50);

/// Who settles a charge, for its audit records.
#[derive(Debug, Clone, Copy)]
pub(super) enum Actor<'a> {
    /// A caller's request (Charge, ReconcileCharges).
    Caller(&'a Authorized),
    /// The background reconciler.
    Reconciler,
}

impl Actor<'_> {
    /// The audit event of a step of `charge`, an alarm for a honeytoken.
    fn event(&self, charge: &ChargeRow, outcome: Outcome, honeytoken: bool) -> AuditEvent {
        let token = Token::parse(&charge.token).ok();
        let mut event = match self {
            Actor::Caller(auth) => event(auth, outcome, token.as_ref()),
            Actor::Reconciler => {
                let mut event = AuditEvent::now(Action::ReconcileCharges, outcome);
                event.tenant = Some(charge.tenant_id.clone());
                event.principal = Some(RECONCILER_PRINCIPAL.to_owned());
                event.token = token.map(|t| t.as_str().to_owned());
                event
            }
        };
        event.alarm = honeytoken;
        event
    }
}

/// What one settle did.
#[derive(Debug)]
pub(super) struct Settled {
    /// The charge as it stands afterwards.
    pub charge: ChargeRow,
    /// Whether this call took the send lease (and so recorded what it did).
    pub acted: bool,
}

/// How a charge that was sent before is to be settled, from the gateway's answer.
enum Decision {
    /// Settle like this (possibly still `unknown`).
    Settle(Box<Step>),
    /// Send it again under the same keys.
    Resend,
}

impl Decision {
    fn settle(step: Step) -> Decision {
        Decision::Settle(Box::new(step))
    }
}

/// What to settle a charge with, and the audit note saying why.
struct Step {
    settlement: ChargeSettlement,
    note: String,
    honeytoken: bool,
}

impl Step {
    fn new(settlement: ChargeSettlement, note: impl Into<String>) -> Step {
        Step {
            settlement,
            note: note.into(),
            honeytoken: false,
        }
    }
}

impl Vault {
    /// Settles an unsettled charge as the [module docs](self) describe, or waits for the
    /// request that holds its send lease — until `wait_until` at the latest, when the charge is
    /// returned as it stands.
    pub(super) async fn settle(
        &self,
        actor: Actor<'_>,
        charge: &ChargeRow,
        wait_until: Option<tokio::time::Instant>,
    ) -> Result<Settled, VaultError> {
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
        loop {
            let now = OffsetDateTime::now_utc();
            let until = now.checked_add(lease).ok_or_else(|| {
                VaultError::internal("charge send lease out of range", "overflow")
            })?;
            if self.store.claim_charge_send(&charge.id, now, until).await? {
                break;
            }
            let current = self.charge_row(&charge.id).await?;
            if !is_unsettled(&current)
                || wait_until.is_some_and(|w| tokio::time::Instant::now() >= w)
            {
                return Ok(Settled {
                    charge: current,
                    acted: false,
                });
            }
            // Another request holds the lease: wait for its outcome.
            tokio::time::sleep(WAIT_STEP).await;
        }
        // The claim counted this turn; the row now says how many came before it.
        let claimed = self.charge_row(&charge.id).await?;
        let before = claimed.attempts.saturating_sub(1);
        let Step {
            settlement,
            note,
            honeytoken,
        } = if before == 0 {
            self.send(actor, &claimed, connector.as_ref()).await?
        } else {
            match self.decide(&claimed, connector.as_ref()).await? {
                Decision::Settle(step) => {
                    reconciled(Some(step.settlement.status), &step.note);
                    *step
                }
                Decision::Resend => {
                    reconciled(None, "");
                    self.send(actor, &claimed, connector.as_ref()).await?
                }
            }
        };
        let mut settled = actor.event(&claimed, Outcome::Ok, honeytoken);
        settled.detail = Some(charge_detail(
            &claimed,
            &if note.is_empty() {
                settlement.status.to_string()
            } else {
                format!("{} ({note})", settlement.status)
            },
        ));
        let mut tx = self.begin().await?;
        let changed = tx
            .settle_charge(&claimed.id, &settlement, OffsetDateTime::now_utc())
            .await?;
        self.commit_with(tx, &settled).await?;
        if changed && settlement.status != claimed.status {
            super::charge::entered_status(&claimed.gateway, settlement.status);
        }
        Ok(Settled {
            charge: self.charge_row(&claimed.id).await?,
            acted: true,
        })
    }

    /// Asks the gateway about a charge sent before, and decides from its answer.
    async fn decide(
        &self,
        charge: &ChargeRow,
        connector: &dyn Connector,
    ) -> Result<Decision, VaultError> {
        let (charge_id, currency) = gateway_terms(charge)?;
        let window = connector.resend_window();
        let now = OffsetDateTime::now_utc();
        let within = |span: Duration| {
            time::Duration::try_from(span)
                .ok()
                .and_then(|span| charge.created_at.checked_add(span))
                .is_some_and(|end| now < end)
        };
        let resendable = window.is_some_and(within);
        let lookup = connector
            .lookup(&ChargeRef {
                charge_id: &charge_id,
                payment_id: charge.gateway_payment_id.as_deref(),
                amount: charge.amount,
                currency,
            })
            .await;
        let stays =
            |message: String, note: &str| Decision::settle(Step::new(unknown(message), note));
        Ok(match lookup {
            Lookup::Found(outcome) if outcome.status == ChargeStatus::Unknown => {
                let mut settlement =
                    unknown(outcome.message.unwrap_or_else(|| {
                        "the gateway has not decided the payment yet".to_owned()
                    }));
                settlement.gateway_payment_id = outcome.payment_id;
                Decision::settle(Step::new(
                    settlement,
                    "found at the gateway, not decided yet",
                ))
            }
            Lookup::Found(outcome) => {
                let note = format!(
                    "found at the gateway{}",
                    outcome
                        .payment_id
                        .as_deref()
                        .map(|id| format!(": {id}"))
                        .unwrap_or_default()
                );
                Decision::settle(Step::new(settlement_of(outcome), note))
            }
            Lookup::NotFound { evidence } if resendable => {
                tracing::info!(charge = %charge.id, %evidence, "no payment at the gateway; re-sending under the same key");
                Decision::Resend
            }
            Lookup::NotFound { evidence } => {
                // Without a key the gateway remembers, a first send still in flight would be
                // missed; past the send lease none is (it outlasts the gateway timeout).
                if window.is_none() && within(self.options.charge_send_lease) {
                    return Ok(stays(
                        format!("no payment at the gateway yet: {evidence}"),
                        "not found, the first send may still be in flight",
                    ));
                }
                Decision::settle(Step::new(
                    ChargeSettlement {
                        status: ChargeState::Failed,
                        gateway_payment_id: None,
                        decline_code: None,
                        message: Some(format!(
                            "not charged: the gateway holds no payment for this charge past its \
                             idempotency window ({evidence})"
                        )),
                        action: None,
                    },
                    format!("not charged, evidence: {evidence}"),
                ))
            }
            Lookup::Unavailable { reason } => stays(
                format!("the gateway could not be asked: {reason}"),
                "gateway unavailable",
            ),
            Lookup::Unsupported if resendable => Decision::Resend,
            Lookup::Unsupported => stays(
                "the gateway cannot be asked about charges and its idempotency window is over \
                 (or it has none): settle this charge at the gateway"
                    .to_owned(),
                "left for an operator",
            ),
        })
    }

    /// Sends a charge (the first time, or again under the same keys) and returns how it
    /// ended. The attempt's audit record commits before anything goes out. A honeytoken is
    /// never sent: it is declined the way the gateway declines a card.
    async fn send(
        &self,
        actor: Actor<'_>,
        charge: &ChargeRow,
        connector: &dyn Connector,
    ) -> Result<Step, VaultError> {
        let tenant = TenantId::parse(&charge.tenant_id)
            .map_err(|e| VaultError::internal("a stored tenant id is malformed", e))?;
        let token = Token::parse(&charge.token)
            .map_err(|_| VaultError::internal("a stored token is malformed", "corrupt row"))?;
        let now = OffsetDateTime::now_utc();
        let Some(card_row) = self
            .store
            .card(tenant.as_str(), token.as_str(), now)
            .await?
        else {
            // The card was deleted since: nothing can be sent. It stays as it stands.
            return Ok(Step::new(
                unknown("the card is gone; settle this charge at the gateway".to_owned()),
                "card deleted, not sent",
            ));
        };
        if card_row.honeytoken {
            // Before the card is opened or anything is sent, and shaped like the gateway's
            // own decline, so the caller learns nothing; the operators get the alarm.
            return Ok(Step {
                settlement: settlement_of(connector.decoy_decline()),
                note: "honeytoken, not sent to the gateway".to_owned(),
                honeytoken: true,
            });
        }
        let mut sending = actor.event(charge, Outcome::Ok, false);
        sending.detail = Some(charge_detail(
            charge,
            &format!(
                "sending (attempt {}{})",
                charge.attempts,
                if charge.attempts > 1 { ", re-send" } else { "" }
            ),
        ));
        self.batcher().await?.audit(sending).await?;
        let outcome = self
            .call_gateway(&tenant, &token, &card_row, charge, connector)
            .await?;
        Ok(Step::new(settlement_of(outcome), ""))
    }

    /// Opens the card (and its CVC) inside the vault and sends the charge.
    async fn call_gateway(
        &self,
        tenant: &TenantId,
        token: &Token,
        card_row: &CardRow,
        charge: &ChargeRow,
        connector: &dyn Connector,
    ) -> Result<crate::gateway::Outcome, VaultError> {
        let resend = charge.attempts > 1;
        let secret = self.open_card(tenant, token, card_row).await?;
        let cvc = self
            .charge_cvc(tenant, token, charge, resend, connector)
            .await?;
        let card = ChargeCard {
            pan: &secret.pan,
            exp_month: card_row.exp_month,
            exp_year: card_row.exp_year,
            cvc: cvc.as_ref().map(Cvc::expose),
            holder: secret.holder.as_ref().map(|h| h.expose()),
        };
        let (charge_id, currency) = gateway_terms(charge)?;
        let params = ChargeParams {
            amount: charge.amount,
            currency,
            capture: charge.capture.into(),
            description: &charge.description,
            metadata: &charge.metadata,
            charge_id: &charge_id,
            resend,
        };
        Ok(connector.charge(&card, &params).await)
    }

    /// The CVC for a send: the one attached to the charge; on its first send only, else the
    /// token's hold, which the charge takes for itself and keeps (sealed) for as long as it may
    /// be re-sent. A re-send never takes a hold: that CVC belongs to the card's next charge.
    /// `None` when there is none, or the DEK that sealed it is gone.
    async fn charge_cvc(
        &self,
        tenant: &TenantId,
        token: &Token,
        charge: &ChargeRow,
        resend: bool,
        connector: &dyn Connector,
    ) -> Result<Option<Cvc>, VaultError> {
        let now = OffsetDateTime::now_utc();
        let hold = match self.store.charge_cvc(&charge.id, now).await? {
            Some(hold) => hold,
            None if resend => return Ok(None),
            None => {
                // The hold moves to the charge in one transaction: a crash between taking it
                // and attaching it leaves it where it was, never lost.
                let mut tx = self.store.begin().await?;
                let Some(mut hold) = tx
                    .take_cvc_hold(tenant.as_str(), token.as_str(), now)
                    .await?
                else {
                    return Ok(None);
                };
                let kept_until = connector
                    .resend_window()
                    .and_then(|w| time::Duration::try_from(w).ok())
                    .and_then(|w| charge.created_at.checked_add(w));
                if let Some(until) = kept_until {
                    hold.expires_at = hold.expires_at.max(until);
                }
                tx.attach_charge_cvc(&charge.id, &hold).await?;
                tx.commit().await?;
                hold
            }
        };
        let Ok(dek) = self.keys.dek(tenant, DekId(hold.dek_id)).await else {
            tracing::warn!(charge = %charge.id, "a CVC's data key is gone; charging without the CVC");
            return Ok(None);
        };
        let digits = crypto::open_record(
            &dek,
            tenant.as_str(),
            &super::charge::cvc_aad_token(token),
            &hold.ciphertext,
        )
        .map_err(|e| VaultError::internal("failed to open a CVC hold", e))?;
        let text = std::str::from_utf8(&digits)
            .map_err(|e| VaultError::internal("a CVC hold is not text", e))?;
        Cvc::parse(text).map_err(|e| VaultError::internal("a CVC hold is malformed", e))
    }

    /// A charge by id, which must exist (charges are never deleted).
    async fn charge_row(&self, id: &str) -> Result<ChargeRow, VaultError> {
        self.store
            .charge(id)
            .await?
            .ok_or_else(|| VaultError::internal("a charge vanished", "no row"))
    }
}

/// A settlement that leaves the charge `unknown`, saying why.
fn unknown(message: String) -> ChargeSettlement {
    ChargeSettlement {
        status: ChargeState::Unknown,
        gateway_payment_id: None,
        decline_code: None,
        message: Some(message),
        action: None,
    }
}

/// Counts one reconciliation's result: the state it settles the charge in, or `None` when
/// it sends the charge again.
fn reconciled(settled: Option<ChargeState>, note: &str) {
    let result = match settled {
        None => "resent",
        Some(ChargeState::Unknown) if note == "gateway unavailable" => "unavailable",
        Some(ChargeState::Unknown) => "still_unknown",
        Some(ChargeState::Failed) => "not_charged",
        Some(_) => "found",
    };
    metrics::counter!("cardvault_charge_reconciliations_total", "result" => result).increment(1);
}

/// A gateway outcome as a settlement (its texts are scrubbed by the connector).
fn settlement_of(outcome: crate::gateway::Outcome) -> ChargeSettlement {
    let action = (outcome.status == ChargeStatus::RequiresAction)
        .then(|| outcome.action.map(|a| action_row(*a)))
        .flatten();
    ChargeSettlement {
        status: outcome.status.into(),
        gateway_payment_id: outcome.payment_id,
        decline_code: outcome.decline_code,
        message: outcome.message,
        action,
    }
}

fn action_row(action: NextAction) -> ChargeActionRow {
    ChargeActionRow {
        client_secret: action.client_secret,
        kind: action.kind,
        redirect_url: action.redirect_url,
        details_json: action.details_json,
    }
}

/// `charge ch_… via stripe: 1999 EUR <what>`: a charge's audit detail (no card data).
pub(super) fn charge_detail(charge: &ChargeRow, what: &str) -> String {
    format!(
        "charge {} via {}: {} {} {what}",
        charge.id, charge.gateway, charge.amount, charge.currency
    )
}

/// Whether a charge still waits for its outcome.
pub(super) fn is_unsettled(charge: &ChargeRow) -> bool {
    charge.status.is_unsettled()
}
