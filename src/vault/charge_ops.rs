//! Capturing, refunding and cancelling a charge the gateway holds, exactly once per
//! idempotency key, so a shop never needs the card to finish an order's life.
//!
//! An operation is a `charge_operations` row, unique per (tenant, idempotency key). The rules
//! (what may be captured, refunded or cancelled, and how much) are checked against the charge
//! and its earlier operations in the transaction that inserts the operation `pending`, with
//! the charge row locked: two requests on one charge are checked one after the other, each
//! seeing the other's operation, so two refunds racing cannot together exceed what was
//! captured. An operation that is pending or whose outcome is unknown counts as done for
//! those rules. The `pending` row commits with the audit record of its first send, before
//! anything leaves; its outcome commits with the outcome's audit record.
//!
//! The gateway's idempotency key is the operation id (`op_…`), stable for its life: the same
//! request again while the outcome is unknown sends it again under that key, which the gateway
//! answers from its own record rather than refunding twice.

use std::time::Duration;

use ring::digest;
use time::OffsetDateTime;

use super::{
    Authorized, ChargeOperationView, IdempotencyKey, Vault, VaultError, event, expect_action,
    settle::gateway_terms,
};
use crate::{
    audit::{Action, AuditEvent, Outcome},
    card::Token,
    gateway::{Connector, Operation, OperationKind, OperationStatus},
    id::{ChargeId, OperationId},
    store::{
        CaptureMethod, ChargeOperationKind, ChargeOperationRow, ChargeOperationState, ChargeRow,
        ChargeState, OperationSettlement, StoreError,
    },
};

/// A capture, refund or cancellation to make.
#[derive(Debug, Clone)]
pub struct OperationCommand {
    /// What to do.
    pub kind: OperationKind,
    /// The vault's charge id.
    pub charge_id: ChargeId,
    /// The caller's key: one key, one operation. Never sent to the gateway (the operation
    /// id is).
    pub idempotency_key: IdempotencyKey,
    /// Minor units to capture or refund; 0 for all of it (always 0 for a cancellation).
    pub amount: u64,
}

/// An operation's outcome.
#[derive(Debug)]
pub struct Operated {
    /// The operation as it stands.
    pub operation: ChargeOperationView,
    /// False when this is the stored outcome of an earlier request with the same key.
    pub created: bool,
}

/// How long a request waits for another request that is sending the same operation, between
/// looks at the row.
const WAIT_STEP: Duration = Duration::from_millis(50);

/// The audit action of an operation kind.
pub fn action_of(kind: OperationKind) -> Action {
    match kind {
        OperationKind::Capture => Action::CaptureCharge,
        OperationKind::Refund => Action::RefundCharge,
        OperationKind::Cancel => Action::CancelCharge,
    }
}

/// A charge's context for one operation request: who asks, the charge's token (for the audit
/// records) and whether it is a honeytoken's.
struct Scope<'a> {
    auth: &'a Authorized,
    token: Option<Token>,
    honeytoken: bool,
}

impl Scope<'_> {
    /// The audit event of this request, an alarm for a honeytoken's charge.
    fn event(&self, outcome: Outcome, detail: String) -> AuditEvent {
        let mut event = event(self.auth, outcome, self.token.as_ref());
        event.alarm = self.honeytoken;
        event.detail = Some(detail);
        event
    }
}

impl Vault {
    /// Captures, refunds or cancels a charge of the caller's tenant, exactly once per
    /// idempotency key. Another tenant's charge is `Missing` exactly like an unknown one; a
    /// broken rule, a reused key with other parameters or a gateway that cannot do it is a
    /// recorded `Precondition`.
    #[tracing::instrument(skip_all, fields(tenant = %auth.caller().tenant(), kind = command.kind.as_str()))]
    pub async fn operate_charge(
        &self,
        auth: &Authorized,
        command: OperationCommand,
    ) -> Result<Operated, VaultError> {
        expect_action(auth, action_of(command.kind))?;
        let tenant = auth.caller().tenant().as_str().to_owned();
        let hash = request_hash(&command);
        let charge = match self.store.charge(command.charge_id.as_str()).await? {
            // Another tenant's charge is answered exactly as a missing one.
            Some(charge) if charge.tenant_id == tenant => charge,
            _ => {
                let mut missing = event(auth, Outcome::NotFound, None);
                missing.detail = Some(format!(
                    "{} of charge {}: no such charge",
                    command.kind.as_str(),
                    command.charge_id
                ));
                self.record(&missing).await;
                return Err(VaultError::Missing("charge not found"));
            }
        };
        let scope = self.scope(auth, &charge).await?;
        let operated = match self
            .store
            .charge_operation_by_key(&tenant, command.idempotency_key.as_str())
            .await?
        {
            Some(existing) => self.answer_existing(&scope, &charge, existing, &hash).await,
            None => self.start(&scope, &charge, &command, hash).await,
        };
        if let (Some(token), true) = (&scope.token, scope.honeytoken) {
            self.alarm_if(true, auth, token);
        }
        let operated = operated?;
        metrics::counter!(
            "cardvault_charge_operations_total",
            "kind" => operated.operation.kind.as_str(),
            "status" => operated.operation.status.as_str(),
        )
        .increment(1);
        Ok(operated)
    }

    /// The charge's token and whether it is a honeytoken's (a deleted card is not: the
    /// alarm was raised when its charge was asked for).
    async fn scope<'a>(
        &self,
        auth: &'a Authorized,
        charge: &ChargeRow,
    ) -> Result<Scope<'a>, VaultError> {
        let token = Token::parse(&charge.token).ok();
        let honeytoken = match &token {
            Some(token) => self
                .store
                .card(&charge.tenant_id, token.as_str(), OffsetDateTime::now_utc())
                .await?
                .is_some_and(|card| card.honeytoken),
            None => false,
        };
        Ok(Scope {
            auth,
            token,
            honeytoken,
        })
    }

    /// A new key: checks the rules and inserts the operation `pending` (holding its send
    /// lease) in one transaction with the charge locked, then sends it.
    async fn start(
        &self,
        scope: &Scope<'_>,
        charge: &ChargeRow,
        command: &OperationCommand,
        hash: Vec<u8>,
    ) -> Result<Operated, VaultError> {
        let kind = command.kind;
        let connector = self.connector_for(scope, charge, kind).await?;
        let now = OffsetDateTime::now_utc();
        let until = self.lease_until(now)?;
        let mut tx = self.begin().await?;
        let locked = tx
            .lock_charge(&charge.id)
            .await?
            .ok_or_else(|| VaultError::internal("a charge vanished", "no row"))?;
        let earlier = tx.charge_operations(&charge.id).await?;
        // A request with the same key got here first (after this one found the key free):
        // its operation is not a rival to check against but the answer to give.
        if let Some(same) = earlier
            .iter()
            .find(|op| op.idempotency_key == command.idempotency_key.as_str())
        {
            let existing = same.clone();
            drop(tx);
            return self.answer_existing(scope, charge, existing, &hash).await;
        }
        let amount = match check(kind, command.amount, &locked, &earlier) {
            Ok(amount) => amount,
            Err(why) => {
                drop(tx);
                return Err(self.refuse(scope, why).await);
            }
        };
        let row = ChargeOperationRow {
            id: OperationId::generate()
                .map_err(VaultError::no_randomness)?
                .into_string(),
            tenant_id: charge.tenant_id.clone(),
            charge_id: charge.id.clone(),
            kind: kind.into(),
            idempotency_key: command.idempotency_key.as_str().to_owned(),
            request_hash: hash.clone(),
            amount,
            status: ChargeOperationState::Pending,
            gateway_id: None,
            amount_done: None,
            message: None,
            attempts: 1,
            sending_until: Some(until),
            created_at: now,
            updated_at: now,
        };
        if !tx.insert_charge_operation(&row).await? {
            // A request with the same key inserted first: answer as it did.
            drop(tx);
            let existing = self
                .store
                .charge_operation_by_key(&row.tenant_id, &row.idempotency_key)
                .await?
                .ok_or_else(|| VaultError::internal("an operation vanished", "no row"))?;
            return self.answer_existing(scope, charge, existing, &hash).await;
        }
        let sending = scope.event(Outcome::Ok, detail(&row, charge, "sending (attempt 1)"));
        self.commit_with(tx, &sending).await?;
        let operation = self
            .send_operation(scope, charge, &row, connector.as_ref())
            .await?;
        Ok(Operated {
            operation: operation.into(),
            created: true,
        })
    }

    /// A key seen before: refused with other parameters; else its stored outcome, sent again
    /// under its gateway key while that outcome is unknown.
    async fn answer_existing(
        &self,
        scope: &Scope<'_>,
        charge: &ChargeRow,
        existing: ChargeOperationRow,
        hash: &[u8],
    ) -> Result<Operated, VaultError> {
        if existing.request_hash != hash {
            let refused = scope.event(
                Outcome::Conflict,
                format!(
                    "operation {}: idempotency key reused with other parameters",
                    existing.id
                ),
            );
            self.record(&refused).await;
            return Err(VaultError::Precondition(
                "this idempotency key was used for an operation with other parameters".to_owned(),
            ));
        }
        let mut operation = existing;
        if is_unsettled(&operation) {
            let kind = OperationKind::from(operation.kind);
            let connector = self.connector_for(scope, charge, kind).await?;
            loop {
                let now = OffsetDateTime::now_utc();
                let until = self.lease_until(now)?;
                if self
                    .store
                    .claim_charge_operation_send(&operation.id, now, until)
                    .await?
                {
                    // The claim counted this attempt.
                    let attempt = operation.attempts.saturating_add(1);
                    let sending = scope.event(
                        Outcome::Ok,
                        detail(&operation, charge, &format!("sending (attempt {attempt})")),
                    );
                    self.batcher().await?.audit(sending).await?;
                    let settled = self
                        .send_operation(scope, charge, &operation, connector.as_ref())
                        .await?;
                    return Ok(Operated {
                        operation: settled.into(),
                        created: false,
                    });
                }
                // Another request is sending it: wait for its outcome.
                tokio::time::sleep(WAIT_STEP).await;
                operation = self
                    .store
                    .charge_operation(&operation.id)
                    .await?
                    .ok_or_else(|| VaultError::internal("an operation vanished", "no row"))?;
                if !is_unsettled(&operation) {
                    break;
                }
            }
        }
        let answered = scope.event(
            Outcome::Ok,
            detail(
                &operation,
                charge,
                &format!("{} (replayed)", operation.status),
            ),
        );
        self.batcher().await?.audit(answered).await?;
        Ok(Operated {
            operation: operation.into(),
            created: false,
        })
    }

    /// Sends an operation whose send lease this request holds, and settles it with the
    /// outcome's audit record in one transaction.
    async fn send_operation(
        &self,
        scope: &Scope<'_>,
        charge: &ChargeRow,
        operation: &ChargeOperationRow,
        connector: &dyn Connector,
    ) -> Result<ChargeOperationRow, VaultError> {
        let kind = OperationKind::from(operation.kind);
        // The rules refused any charge without one; a row changed under us is not sent.
        let payment_id = charge
            .gateway_payment_id
            .as_deref()
            .ok_or_else(|| VaultError::internal("a charge lost its payment id", "no id"))?;
        let (charge_id, currency) = gateway_terms(charge)?;
        let operation_id = OperationId::parse(&operation.id)
            .map_err(|_| StoreError::Corrupt("a stored charge operation id is malformed"))?;
        let request = Operation {
            kind,
            payment_id,
            amount: (kind != OperationKind::Cancel).then_some(operation.amount),
            currency,
            charge_id: &charge_id,
            operation_id: &operation_id,
        };
        // The connector logs the call and counts it (`cardvault_gateway_operations_total`).
        let outcome = connector.operate(&request).await;
        let settlement = OperationSettlement {
            status: outcome.status.into(),
            gateway_id: outcome.gateway_id,
            amount_done: outcome.amount,
            message: outcome.message,
        };
        let settled = scope.event(
            Outcome::Ok,
            detail(operation, charge, settlement.status.as_str()),
        );
        let mut tx = self.begin().await?;
        tx.settle_charge_operation(&operation.id, &settlement, OffsetDateTime::now_utc())
            .await?;
        self.commit_with(tx, &settled).await?;
        self.store
            .charge_operation(&operation.id)
            .await?
            .ok_or_else(|| VaultError::internal("an operation vanished", "no row"))
    }

    /// The charge's connector, if this replica has it and it can do `kind`; else a recorded
    /// refusal.
    async fn connector_for(
        &self,
        scope: &Scope<'_>,
        charge: &ChargeRow,
        kind: OperationKind,
    ) -> Result<std::sync::Arc<dyn Connector>, VaultError> {
        match self.options.gateways.get(&charge.gateway) {
            Some(connector) if connector.supports(kind) => Ok(connector.clone()),
            Some(_) => Err(self
                .refuse(
                    scope,
                    format!(
                        "gateway {:?} cannot {} a charge through the vault",
                        charge.gateway,
                        kind.as_str()
                    ),
                )
                .await),
            None => Err(self
                .refuse(
                    scope,
                    format!(
                        "charge {}: gateway {:?} is not configured on this replica",
                        charge.id, charge.gateway
                    ),
                )
                .await),
        }
    }

    /// Records a refusal and returns it as a `Precondition`.
    async fn refuse(&self, scope: &Scope<'_>, why: String) -> VaultError {
        self.record(&scope.event(Outcome::Conflict, why.clone()))
            .await;
        VaultError::Precondition(why)
    }

    /// When a send lease taken at `now` ends.
    fn lease_until(&self, now: OffsetDateTime) -> Result<OffsetDateTime, VaultError> {
        let lease = time::Duration::try_from(self.options.charge_send_lease)
            .map_err(|e| VaultError::internal("charge send lease out of range", e))?;
        now.checked_add(lease)
            .ok_or_else(|| VaultError::internal("charge send lease out of range", "overflow"))
    }
}

/// Whether an operation may have happened or may still: pending, unknown or succeeded.
fn counts(operation: &ChargeOperationRow) -> bool {
    operation.status != ChargeOperationState::Failed
}

fn is_unsettled(operation: &ChargeOperationRow) -> bool {
    operation.status.is_unsettled()
}

/// What an operation did, or may have: the gateway's amount once it succeeded, else what
/// was asked.
fn taken(operation: &ChargeOperationRow) -> u64 {
    match (operation.status, operation.amount_done) {
        (ChargeOperationState::Succeeded, Some(done)) => done,
        _ => operation.amount,
    }
}

// The gateway's words and the store's are kept apart (neither layer may import the other);
// the vault translates, exhaustively.

impl From<ChargeOperationKind> for OperationKind {
    fn from(kind: ChargeOperationKind) -> OperationKind {
        match kind {
            ChargeOperationKind::Capture => OperationKind::Capture,
            ChargeOperationKind::Refund => OperationKind::Refund,
            ChargeOperationKind::Cancel => OperationKind::Cancel,
        }
    }
}

impl From<OperationKind> for ChargeOperationKind {
    fn from(kind: OperationKind) -> ChargeOperationKind {
        match kind {
            OperationKind::Capture => ChargeOperationKind::Capture,
            OperationKind::Refund => ChargeOperationKind::Refund,
            OperationKind::Cancel => ChargeOperationKind::Cancel,
        }
    }
}

impl From<OperationStatus> for ChargeOperationState {
    fn from(status: OperationStatus) -> ChargeOperationState {
        match status {
            OperationStatus::Succeeded => ChargeOperationState::Succeeded,
            OperationStatus::Failed => ChargeOperationState::Failed,
            OperationStatus::Unknown => ChargeOperationState::Unknown,
        }
    }
}

/// Checks `kind` of `requested` minor units (0: all) against the charge and its earlier
/// operations; returns the amount to ask of the gateway, or why not.
fn check(
    kind: OperationKind,
    requested: u64,
    charge: &ChargeRow,
    earlier: &[ChargeOperationRow],
) -> Result<u64, String> {
    let id = &charge.id;
    let what = kind.as_str();
    match charge.status {
        ChargeState::Succeeded => {}
        ChargeState::RequiresAction if kind == OperationKind::Cancel => {}
        ChargeState::Pending | ChargeState::Unknown => {
            return Err(format!(
                "charge {id}: its outcome is not known yet; reconcile it before you {what} it"
            ));
        }
        status => {
            return Err(format!(
                "charge {id} is {status}: only an authorized charge can be {}",
                past(kind)
            ));
        }
    }
    if charge.gateway_payment_id.is_none() {
        return Err(format!(
            "charge {id} has no gateway payment id: nothing to {what}"
        ));
    }
    let of = |k: OperationKind| {
        earlier
            .iter()
            .filter(move |op| op.kind == ChargeOperationKind::from(k) && counts(op))
    };
    let manual = charge.capture == CaptureMethod::Manual;
    if let Some(cancel) = of(OperationKind::Cancel).next() {
        return Err(format!(
            "charge {id} is cancelled (or being cancelled: {} {})",
            cancel.id, cancel.status
        ));
    }
    let capture = of(OperationKind::Capture).next();
    match kind {
        OperationKind::Capture => {
            if !manual {
                return Err(format!("charge {id} was captured automatically"));
            }
            if let Some(capture) = capture {
                return Err(format!(
                    "charge {id} is captured already (or being captured: {} {})",
                    capture.id, capture.status
                ));
            }
            within(requested, charge.amount, "the authorized amount")
        }
        OperationKind::Refund => {
            let captured = if !manual {
                charge.amount
            } else {
                match capture {
                    Some(capture) if capture.status == ChargeOperationState::Succeeded => {
                        taken(capture)
                    }
                    Some(capture) => {
                        return Err(format!(
                            "charge {id}: its capture {} is {}; retry it with its idempotency key first",
                            capture.id, capture.status
                        ));
                    }
                    None => {
                        return Err(format!(
                            "charge {id} is authorized but not captured: cancel it instead"
                        ));
                    }
                }
            };
            let refunded: u64 = of(OperationKind::Refund).map(taken).sum();
            let remaining = captured.saturating_sub(refunded);
            if remaining == 0 {
                return Err(format!(
                    "charge {id}: all {captured} captured is refunded (or being refunded)"
                ));
            }
            within(requested, remaining, "what remains to refund")
        }
        OperationKind::Cancel => {
            if charge.status == ChargeState::Succeeded && !manual {
                return Err(format!(
                    "charge {id} was captured automatically: refund it instead"
                ));
            }
            if let Some(capture) = capture {
                return Err(format!(
                    "charge {id} is captured (or being captured: {} {}): refund it instead",
                    capture.id, capture.status
                ));
            }
            Ok(0)
        }
    }
}

/// `requested` (0: all of `limit`), if it is at most `limit`.
fn within(requested: u64, limit: u64, what: &str) -> Result<u64, String> {
    match requested {
        0 => Ok(limit),
        n if n <= limit => Ok(n),
        n => Err(format!("amount {n} exceeds {what} ({limit})")),
    }
}

fn past(kind: OperationKind) -> &'static str {
    match kind {
        OperationKind::Capture => "captured",
        OperationKind::Refund => "refunded",
        OperationKind::Cancel => "cancelled",
    }
}

/// `refund op_… of charge ch_… via stripe: 500 EUR <what>`: an operation's audit detail.
fn detail(operation: &ChargeOperationRow, charge: &ChargeRow, what: &str) -> String {
    format!(
        "{} {} of charge {} via {}: {} {} {what}",
        operation.kind, operation.id, charge.id, charge.gateway, operation.amount, charge.currency
    )
}

/// SHA-256 over the request's parameters, each length-prefixed.
fn request_hash(command: &OperationCommand) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut field = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    };
    field(command.kind.as_str().as_bytes());
    field(command.charge_id.as_str().as_bytes());
    field(&command.amount.to_be_bytes());
    ctx.finish().as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(capture: &str, status: &str, amount: u64) -> ChargeRow {
        let now = OffsetDateTime::now_utc();
        ChargeRow {
            id: "ch_1".to_owned(),
            tenant_id: "t".to_owned(),
            idempotency_key: "k".to_owned(),
            request_hash: vec![],
            token: "tok".to_owned(),
            gateway: "stripe".to_owned(),
            amount,
            currency: "EUR".to_owned(),
            capture: CaptureMethod::parse(capture).expect("a capture method"),
            description: String::new(),
            metadata: vec![],
            status: ChargeState::parse(status).expect("a charge status"),
            gateway_payment_id: Some("pi_1".to_owned()),
            decline_code: None,
            message: None,
            attempts: 1,
            sending_until: None,
            created_at: now,
            updated_at: now,
            action: None,
            reconcile_attempts: 0,
            next_reconcile_at: None,
        }
    }

    fn op(kind: OperationKind, status: &str, amount: u64, done: Option<u64>) -> ChargeOperationRow {
        let now = OffsetDateTime::now_utc();
        ChargeOperationRow {
            id: format!("op_{}", kind.as_str()),
            tenant_id: "t".to_owned(),
            charge_id: "ch_1".to_owned(),
            kind: kind.into(),
            idempotency_key: "k".to_owned(),
            request_hash: vec![],
            amount,
            status: ChargeOperationState::parse(status).expect("an operation status"),
            gateway_id: None,
            amount_done: done,
            message: None,
            attempts: 1,
            sending_until: None,
            created_at: now,
            updated_at: now,
        }
    }

    use OperationKind::{Cancel, Capture as Cap, Refund};

    #[test]
    fn a_manual_charge_is_captured_once_up_to_its_authorized_amount() {
        let c = charge("manual", "succeeded", 1000);
        assert_eq!(check(Cap, 0, &c, &[]), Ok(1000));
        assert_eq!(check(Cap, 400, &c, &[]), Ok(400));
        assert!(check(Cap, 1001, &c, &[]).is_err());
        for status in ["pending", "unknown", "succeeded"] {
            let earlier = [op(Cap, status, 400, None)];
            assert!(check(Cap, 100, &c, &earlier).is_err(), "{status}");
        }
        // A capture that failed took nothing.
        assert_eq!(
            check(Cap, 0, &c, &[op(Cap, "failed", 1000, None)]),
            Ok(1000)
        );
        assert!(check(Cap, 0, &charge("automatic", "succeeded", 1000), &[]).is_err());
    }

    #[test]
    fn only_a_charge_that_succeeded_and_has_a_payment_id_is_touched() {
        for status in [
            "declined",
            "failed",
            "pending",
            "unknown",
            "requires_action",
        ] {
            let c = charge("manual", status, 1000);
            assert!(check(Cap, 0, &c, &[]).is_err(), "{status}");
            assert!(check(Refund, 0, &c, &[]).is_err(), "{status}");
        }
        // A honeytoken's charge: declined without a payment.
        let mut decoy = charge("automatic", "declined", 1000);
        decoy.gateway_payment_id = None;
        for kind in [Cap, Refund, Cancel] {
            assert!(check(kind, 0, &decoy, &[]).is_err());
        }
        let mut no_id = charge("automatic", "succeeded", 1000);
        no_id.gateway_payment_id = None;
        assert!(check(Refund, 0, &no_id, &[]).is_err());
    }

    #[test]
    fn refunds_never_exceed_what_was_captured_counting_those_in_flight() {
        let auto = charge("automatic", "succeeded", 1000);
        assert_eq!(check(Refund, 0, &auto, &[]), Ok(1000));
        let earlier = [
            op(Refund, "succeeded", 300, Some(300)),
            op(Refund, "unknown", 200, None),
            op(Refund, "pending", 100, None),
            op(Refund, "failed", 900, None),
        ];
        assert_eq!(check(Refund, 0, &auto, &earlier), Ok(400));
        assert_eq!(check(Refund, 400, &auto, &earlier), Ok(400));
        assert!(check(Refund, 401, &auto, &earlier).is_err());
        let all = [op(Refund, "succeeded", 1000, Some(1000))];
        assert!(check(Refund, 0, &auto, &all).is_err());

        let manual = charge("manual", "succeeded", 1000);
        assert!(check(Refund, 0, &manual, &[]).is_err(), "not captured");
        assert!(check(Refund, 0, &manual, &[op(Cap, "unknown", 1000, None)]).is_err());
        let partly = [op(Cap, "succeeded", 600, Some(600))];
        assert_eq!(check(Refund, 0, &manual, &partly), Ok(600));
        assert!(check(Refund, 601, &manual, &partly).is_err());
    }

    #[test]
    fn cancel_is_for_an_uncaptured_authorization_or_a_charge_awaiting_the_cardholder() {
        let manual = charge("manual", "succeeded", 1000);
        assert_eq!(check(Cancel, 0, &manual, &[]), Ok(0));
        assert!(check(Cancel, 0, &manual, &[op(Cap, "pending", 1000, None)]).is_err());
        assert!(check(Cancel, 0, &manual, &[op(Cancel, "succeeded", 0, None)]).is_err());
        assert!(check(Cap, 0, &manual, &[op(Cancel, "unknown", 0, None)]).is_err());
        assert_eq!(
            check(
                Cancel,
                0,
                &charge("automatic", "requires_action", 1000),
                &[]
            ),
            Ok(0)
        );
        assert!(check(Cancel, 0, &charge("automatic", "succeeded", 1000), &[]).is_err());
    }

    #[test]
    fn every_operation_needs_the_charge_permission() {
        for kind in [Cap, Refund, Cancel] {
            assert_eq!(
                super::super::Permission::for_action(action_of(kind)),
                super::super::Permission::Charge,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn the_request_hash_covers_kind_charge_and_amount() {
        let base = OperationCommand {
            kind: Refund,
            charge_id: ChargeId::parse("ch_0000000000000001").unwrap(),
            idempotency_key: IdempotencyKey::parse("k").unwrap(),
            amount: 100,
        };
        let hash = request_hash(&base);
        let mut other_key = base.clone();
        other_key.idempotency_key = IdempotencyKey::parse("k2").unwrap();
        assert_eq!(request_hash(&other_key), hash);
        for changed in [
            OperationCommand {
                kind: Cap,
                ..base.clone()
            },
            OperationCommand {
                charge_id: ChargeId::parse("ch_0000000000000002").unwrap(),
                ..base.clone()
            },
            OperationCommand {
                amount: 101,
                ..base.clone()
            },
        ] {
            assert_ne!(request_hash(&changed), hash);
        }
    }
}
