//! CaptureCharge, RefundCharge and CancelCharge: the vault's rules and idempotency against a
//! recording connector (every call it gets, and the answer it is told to give), on both
//! backends; then end to end through the `stripe` connector and the test gateway over TLS.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use cardvault::{
    gateway::{
        ChargeCard, ChargeParams, Connector, Gateways, Operation, OperationKind, OperationOutcome,
        OperationStatus, Outcome,
    },
    id::ChargeId,
    pb::v1 as pb,
    server,
    store::{CaptureMethod, CardRow, ChargeRow, ChargeSettlement, ChargeState, Store},
    tls::TlsFiles,
    vault::{
        Authorized, Credentials, IdempotencyKey, Operated, OperationCommand, TenantId, Vault,
        VaultError, VaultOptions,
    },
};
use cardvault_test_gateway::{TestGateway, TestGatewayOptions};
use time::OffsetDateTime;
use tokio::task::JoinSet;
use tonic::Code;

use crate::{
    canary::read_sqlite_files,
    helpers::{
        AppState, Backend, captured_logs, spawn_app, spawn_with, tokenize_request, unique_pan,
        violated_fields,
    },
    on_both_backends,
    pki::Pki,
    postgres::PgServer,
};

on_both_backends!(
    each_operation_is_sent_once_per_key_and_a_reused_key_with_other_parameters_is_refused,
    an_unknown_operation_is_sent_again_under_its_own_gateway_key,
    concurrent_refunds_never_exceed_what_was_captured,
    concurrent_duplicates_of_one_key_make_one_gateway_call,
    another_tenants_charge_is_not_found_exactly_like_a_missing_one,
    broken_rules_and_incapable_gateways_are_refused_before_anything_is_sent,
    a_cancelled_authorization_is_never_captured,
    bad_requests_name_their_fields_and_unknown_charges_are_not_found,
    a_honeytokens_charge_is_refused_like_a_decline_and_raises_the_alarm,
    capture_refund_and_cancel_through_stripe_over_tls_once_per_key_and_without_card_data,
);

/// One call the connector got: kind, payment id, amount, gateway idempotency key.
type Call = (OperationKind, String, Option<u64>, String);

/// A connector that records every operation and answers as told, after `delay`.
#[derive(Debug)]
struct Recorder {
    name: &'static str,
    capable: bool,
    delay: Duration,
    answer: Mutex<OperationStatus>,
    calls: Mutex<Vec<Call>>,
}

impl Recorder {
    fn new(name: &'static str, capable: bool, delay: Duration) -> Arc<Recorder> {
        Arc::new(Recorder {
            name,
            capable,
            delay,
            answer: Mutex::new(OperationStatus::Succeeded),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn answer(&self, status: OperationStatus) {
        *self.answer.lock().expect("answer") = status;
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }
}

#[async_trait::async_trait]
impl Connector for Recorder {
    fn name(&self) -> &str {
        self.name
    }

    async fn charge(&self, _card: &ChargeCard<'_>, _params: &ChargeParams<'_>) -> Outcome {
        panic!("these tests make no charges through the connector")
    }

    fn resend_window(&self) -> Option<Duration> {
        Some(Duration::from_secs(24 * 3600))
    }

    fn supports(&self, _kind: OperationKind) -> bool {
        self.capable
    }

    async fn operate(&self, operation: &Operation<'_>) -> OperationOutcome {
        self.calls.lock().expect("calls").push((
            operation.kind,
            operation.payment_id.to_owned(),
            operation.amount,
            operation.operation_id.to_string(),
        ));
        tokio::time::sleep(self.delay).await;
        let status = *self.answer.lock().expect("answer");
        OperationOutcome {
            status,
            gateway_id: (status == OperationStatus::Succeeded)
                .then(|| format!("gw_{}", operation.operation_id)),
            amount: (status == OperationStatus::Succeeded)
                .then_some(operation.amount)
                .flatten(),
            message: (status != OperationStatus::Succeeded).then(|| "gateway said no".to_owned()),
            http_status: Some(200),
        }
    }
}

/// A vault (tenant `dev`, the loopback caller) whose gateways are `pay` (a capable
/// recorder) and `blind` (one that cannot do operations); tenant `other` exists too.
struct Rig {
    state: AppState,
    vault: Arc<Vault>,
    store: Arc<dyn Store>,
    pay: Arc<Recorder>,
}

async fn rig(backend: Backend, delay: Duration) -> Rig {
    let state = AppState::new(backend).await;
    let settings = state.settings("dev");
    let store = server::open_store(&settings).await.expect("store");
    store.migrate().await.expect("migrate");
    let provider = server::key_provider(&settings).expect("keys");
    let pay = Recorder::new("pay", true, delay);
    let mut gateways = Gateways::empty();
    gateways.insert(pay.clone());
    gateways.insert(Recorder::new("blind", false, Duration::ZERO));
    let dev = TenantId::parse("dev").expect("tenant");
    let vault = Arc::new(Vault::new(
        store.clone(),
        provider,
        VaultOptions {
            unauthenticated_tenant: Some(dev.clone()),
            gateways: Arc::new(gateways),
            ..VaultOptions::default()
        },
    ));
    vault.warm_up(Some(&dev)).await.expect("dev");
    vault
        .warm_up(Some(&TenantId::parse("other").expect("tenant")))
        .await
        .expect("other");
    Rig {
        state,
        vault,
        store,
        pay,
    }
}

impl Rig {
    /// The loopback caller, authorized for `kind`.
    async fn auth(&self, kind: OperationKind) -> Authorized {
        let caller = self
            .vault
            .authenticate(
                Credentials {
                    bearer: None,
                    mtls_identity: None,
                    peer: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 40_000))),
                    forwarded_for: None,
                },
                None,
            )
            .await
            .expect("loopback caller");
        self.vault
            .authorize(caller, cardvault::vault::action_of(kind))
            .await
            .expect("authorized")
    }

    /// A charge of `tenant` through `gateway`, settled `status` with payment id `pi_…`
    /// (none when `payment` is false).
    async fn charge(
        &self,
        tenant: &str,
        gateway: &str,
        capture: &str,
        status: &str,
        payment: bool,
    ) -> String {
        self.charge_of("tok_none", tenant, gateway, capture, status, payment)
            .await
    }

    /// As [`Rig::charge`], of the card `token`.
    async fn charge_of(
        &self,
        token: &str,
        tenant: &str,
        gateway: &str,
        capture: &str,
        status: &str,
        payment: bool,
    ) -> String {
        let id = format!("ch_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let now = OffsetDateTime::now_utc();
        let row = ChargeRow {
            id: id.clone(),
            tenant_id: tenant.to_owned(),
            idempotency_key: format!("order-{id}"),
            request_hash: vec![1; 32],
            token: token.to_owned(),
            gateway: gateway.to_owned(),
            amount: 1000,
            currency: "EUR".to_owned(),
            capture: CaptureMethod::parse(capture).expect("a capture method"),
            description: String::new(),
            metadata: Vec::new(),
            status: ChargeState::Pending,
            gateway_payment_id: None,
            decline_code: None,
            message: None,
            attempts: 1,
            sending_until: None,
            created_at: now,
            updated_at: now,
            action: None,
            reconcile_attempts: 0,
            next_reconcile_at: None,
        };
        assert_eq!(self.store.insert_charge(&row).await.expect("charge"), None);
        if status != "pending" {
            let settled = ChargeSettlement {
                status: ChargeState::parse(status).expect("a charge status"),
                gateway_payment_id: payment.then(|| format!("pi_{}", &id[3..])),
                decline_code: None,
                message: None,
                action: None,
            };
            assert!(
                self.store
                    .settle_charge(&id, &settled, now)
                    .await
                    .expect("settle")
            );
        }
        id
    }

    async fn operate(
        &self,
        kind: OperationKind,
        charge_id: &str,
        key: &str,
        amount: u64,
    ) -> Result<Operated, VaultError> {
        let auth = self.auth(kind).await;
        self.vault
            .operate_charge(
                &auth,
                OperationCommand {
                    kind,
                    charge_id: ChargeId::parse(charge_id).expect("a charge id"),
                    idempotency_key: IdempotencyKey::parse(key).expect("an idempotency key"),
                    amount,
                },
            )
            .await
    }
}

fn refused(result: Result<Operated, VaultError>, why: &str) -> String {
    match result {
        Err(VaultError::Precondition(text)) => {
            assert!(text.contains(why), "{text:?} should say {why:?}");
            text
        }
        other => panic!("expected a refusal saying {why:?}, got {other:?}"),
    }
}

async fn each_operation_is_sent_once_per_key_and_a_reused_key_with_other_parameters_is_refused(
    backend: Backend,
) {
    let rig = rig(backend, Duration::ZERO).await;
    let charge = rig.charge("dev", "pay", "manual", "succeeded", true).await;
    let payment = format!("pi_{}", &charge[3..]);

    let captured = rig
        .operate(OperationKind::Capture, &charge, "cap-1", 600)
        .await
        .expect("capture");
    let op = &captured.operation;
    assert!(captured.created);
    assert!(op.id.starts_with("op_"), "{}", op.id);
    assert_eq!(
        (op.status.as_str(), op.amount, op.amount_done),
        ("succeeded", 600, Some(600))
    );
    assert_eq!(
        rig.pay.calls(),
        vec![(
            OperationKind::Capture,
            payment.clone(),
            Some(600),
            op.id.clone()
        )],
        "sent once, under the operation id, for the charge's payment"
    );

    let again = rig
        .operate(OperationKind::Capture, &charge, "cap-1", 600)
        .await
        .expect("replay");
    assert!(!again.created);
    assert_eq!(again.operation, captured.operation, "the stored answer");
    assert_eq!(rig.pay.calls().len(), 1, "a replay sends nothing");
    refused(
        rig.operate(OperationKind::Capture, &charge, "cap-1", 700)
            .await,
        "other parameters",
    );
    refused(
        rig.operate(OperationKind::Refund, &charge, "cap-1", 600)
            .await,
        "other parameters",
    );

    // Refunds: in part twice, then more than remains, then the rest (0 = all that remains).
    let first = rig
        .operate(OperationKind::Refund, &charge, "ref-1", 200)
        .await
        .expect("refund");
    let second = rig
        .operate(OperationKind::Refund, &charge, "ref-2", 100)
        .await
        .expect("refund");
    assert_eq!(first.operation.status.as_str(), "succeeded");
    assert_eq!(second.operation.status.as_str(), "succeeded");
    assert_ne!(first.operation.id, second.operation.id);
    let too_much = refused(
        rig.operate(OperationKind::Refund, &charge, "ref-3", 301)
            .await,
        "exceeds what remains to refund (300)",
    );
    assert!(!too_much.contains("4242"), "{too_much}");
    let rest = rig
        .operate(OperationKind::Refund, &charge, "ref-4", 0)
        .await
        .expect("the rest");
    assert_eq!(rest.operation.amount, 300, "0 refunds what remains");
    refused(
        rig.operate(OperationKind::Refund, &charge, "ref-5", 0)
            .await,
        "refunded",
    );
    let sent: Vec<Option<u64>> = rig.pay.calls().iter().map(|c| c.2).collect();
    assert_eq!(sent, vec![Some(600), Some(200), Some(100), Some(300)]);

    // On record: the send before it left, its outcome, the replay and both refusals.
    let id = &captured.operation.id;
    let records = audit_of(&rig.state, "charges.capture").await;
    let expected = [
        (
            "ok",
            format!("capture {id} of charge {charge} via pay: 600 EUR sending (attempt 1)"),
        ),
        (
            "ok",
            format!("capture {id} of charge {charge} via pay: 600 EUR succeeded"),
        ),
        (
            "ok",
            format!("capture {id} of charge {charge} via pay: 600 EUR succeeded (replayed)"),
        ),
        (
            "conflict",
            format!("operation {id}: idempotency key reused with other parameters"),
        ),
    ];
    let got: Vec<(&str, &str)> = records
        .iter()
        .map(|(o, d)| (o.as_str(), d.as_str()))
        .collect();
    let want: Vec<(&str, &str)> = expected.iter().map(|(o, d)| (*o, d.as_str())).collect();
    assert_eq!(got, want);
    let refunds = audit_of(&rig.state, "charges.refund").await;
    assert!(
        refunds
            .iter()
            .any(|(o, d)| o == "conflict" && d.contains("exceeds what remains to refund")),
        "{refunds:?}"
    );
}

/// `(outcome, detail)` of the audit records of `action`, oldest first.
async fn audit_of(state: &AppState, action: &str) -> Vec<(String, String)> {
    let sql = "SELECT outcome, COALESCE(detail, '') FROM audit_records \
               WHERE action = $1 ORDER BY at, shard, seq";
    match state.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&state.database_url)
                .await
                .expect("open sqlite");
            sqlx::query_as(sql)
                .bind(action)
                .fetch_all(&pool)
                .await
                .expect("audit")
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&state.database_url)
                .await
                .expect("open postgres");
            sqlx::query_as(sql)
                .bind(action)
                .fetch_all(&pool)
                .await
                .expect("audit")
        }
    }
}

async fn an_unknown_operation_is_sent_again_under_its_own_gateway_key(backend: Backend) {
    let rig = rig(backend, Duration::ZERO).await;
    let charge = rig
        .charge("dev", "pay", "automatic", "succeeded", true)
        .await;
    rig.pay.answer(OperationStatus::Unknown);
    let unknown = rig
        .operate(OperationKind::Refund, &charge, "ref-1", 300)
        .await
        .expect("sent");
    assert_eq!(unknown.operation.status.as_str(), "unknown");
    assert_eq!(unknown.operation.attempts, 1);

    // While unknown, the refund counts as taken.
    refused(
        rig.operate(OperationKind::Refund, &charge, "ref-2", 701)
            .await,
        "exceeds what remains to refund (700)",
    );

    rig.pay.answer(OperationStatus::Succeeded);
    let settled = rig
        .operate(OperationKind::Refund, &charge, "ref-1", 300)
        .await
        .expect("re-sent");
    assert!(!settled.created);
    assert_eq!(settled.operation.id, unknown.operation.id);
    assert_eq!(settled.operation.status.as_str(), "succeeded");
    assert_eq!(settled.operation.attempts, 2);
    let keys: Vec<String> = rig.pay.calls().into_iter().map(|c| c.3).collect();
    assert_eq!(
        keys,
        vec![unknown.operation.id.clone(), unknown.operation.id.clone()],
        "the re-send uses the same gateway key"
    );
    // Settled: the same key again sends nothing more.
    rig.operate(OperationKind::Refund, &charge, "ref-1", 300)
        .await
        .expect("replay");
    assert_eq!(rig.pay.calls().len(), 2);
}

async fn concurrent_refunds_never_exceed_what_was_captured(backend: Backend) {
    // Each gateway call takes a while, so the requests overlap at the gateway too.
    let rig = Arc::new(rig(backend, Duration::from_millis(50)).await);
    let charge = rig
        .charge("dev", "pay", "automatic", "succeeded", true)
        .await;
    let mut tasks = JoinSet::new();
    for i in 0..8 {
        let rig = rig.clone();
        let charge = charge.clone();
        tasks.spawn(async move {
            rig.operate(OperationKind::Refund, &charge, &format!("race-{i}"), 300)
                .await
        });
    }
    let (mut done, mut refusals) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result.expect("task") {
            Ok(op) => {
                assert_eq!(op.operation.status.as_str(), "succeeded");
                done += 1;
            }
            Err(VaultError::Precondition(_)) => refusals += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        (done, refusals),
        (3, 5),
        "3 × 300 fit in 1000, a 4th does not"
    );
    let refunded: u64 = rig.pay.calls().iter().filter_map(|c| c.2).sum();
    assert_eq!(refunded, 900);
}

async fn concurrent_duplicates_of_one_key_make_one_gateway_call(backend: Backend) {
    let rig = Arc::new(rig(backend, Duration::from_millis(100)).await);
    let charge = rig.charge("dev", "pay", "manual", "succeeded", true).await;
    let mut tasks = JoinSet::new();
    for _ in 0..6 {
        let rig = rig.clone();
        let charge = charge.clone();
        tasks.spawn(async move {
            rig.operate(OperationKind::Capture, &charge, "cap-once", 0)
                .await
        });
    }
    let mut answers = Vec::new();
    while let Some(result) = tasks.join_next().await {
        answers.push(result.expect("task").expect("answered"));
    }
    assert_eq!(rig.pay.calls().len(), 1, "one gateway call");
    assert_eq!(answers.iter().filter(|a| a.created).count(), 1);
    for answer in &answers {
        assert_eq!(answer.operation.id, answers[0].operation.id);
        assert_eq!(
            answer.operation.status.as_str(),
            "succeeded",
            "waited for the outcome"
        );
    }
}

async fn another_tenants_charge_is_not_found_exactly_like_a_missing_one(backend: Backend) {
    let rig = rig(backend, Duration::ZERO).await;
    let theirs = rig
        .charge("other", "pay", "manual", "succeeded", true)
        .await;
    for kind in [
        OperationKind::Capture,
        OperationKind::Refund,
        OperationKind::Cancel,
    ] {
        let foreign = rig.operate(kind, &theirs, "k-1", 0).await;
        let missing = rig.operate(kind, "ch_0000000000000000", "k-2", 0).await;
        match (foreign, missing) {
            (Err(VaultError::Missing(a)), Err(VaultError::Missing(b))) => assert_eq!(a, b),
            other => panic!("expected both not found, got {other:?}"),
        }
    }
    assert!(rig.pay.calls().is_empty());
    assert!(
        rig.store
            .charge_operation_by_key("dev", "k-1")
            .await
            .expect("read")
            .is_none(),
        "nothing stored"
    );
}

async fn broken_rules_and_incapable_gateways_are_refused_before_anything_is_sent(backend: Backend) {
    let rig = rig(backend, Duration::ZERO).await;
    // A declined charge without a payment id.
    let declined = rig
        .charge("dev", "pay", "automatic", "declined", false)
        .await;
    for kind in [
        OperationKind::Capture,
        OperationKind::Refund,
        OperationKind::Cancel,
    ] {
        refused(
            rig.operate(kind, &declined, &format!("d-{}", kind.as_str()), 0)
                .await,
            "is declined",
        );
    }
    let unknown = rig
        .charge("dev", "pay", "automatic", "pending", false)
        .await;
    refused(
        rig.operate(OperationKind::Refund, &unknown, "u-1", 0).await,
        "not known yet",
    );
    let automatic = rig
        .charge("dev", "pay", "automatic", "succeeded", true)
        .await;
    refused(
        rig.operate(OperationKind::Capture, &automatic, "a-1", 0)
            .await,
        "captured automatically",
    );
    refused(
        rig.operate(OperationKind::Cancel, &automatic, "a-2", 0)
            .await,
        "refund it instead",
    );
    refused(
        rig.operate(OperationKind::Refund, &automatic, "a-3", 1001)
            .await,
        "exceeds",
    );
    let manual = rig.charge("dev", "pay", "manual", "succeeded", true).await;
    refused(
        rig.operate(OperationKind::Refund, &manual, "m-1", 0).await,
        "not captured",
    );
    refused(
        rig.operate(OperationKind::Capture, &manual, "m-2", 1001)
            .await,
        "exceeds the authorized amount (1000)",
    );
    let blind = rig
        .charge("dev", "blind", "manual", "succeeded", true)
        .await;
    refused(
        rig.operate(OperationKind::Capture, &blind, "b-1", 0).await,
        "cannot capture",
    );
    let elsewhere = rig.charge("dev", "gone", "manual", "succeeded", true).await;
    refused(
        rig.operate(OperationKind::Capture, &elsewhere, "g-1", 0)
            .await,
        "not configured on this replica",
    );
    assert!(rig.pay.calls().is_empty(), "nothing was sent");
    // A refused request stores nothing: its key stays free for a request that can succeed.
    let ok = rig
        .operate(OperationKind::Capture, &manual, "m-2", 1000)
        .await
        .expect("capture");
    assert_eq!(ok.operation.status.as_str(), "succeeded");
}

async fn a_cancelled_authorization_is_never_captured(backend: Backend) {
    let rig = rig(backend, Duration::ZERO).await;
    let charge = rig.charge("dev", "pay", "manual", "succeeded", true).await;
    let cancelled = rig
        .operate(OperationKind::Cancel, &charge, "c-1", 0)
        .await
        .expect("cancel");
    assert_eq!(cancelled.operation.status.as_str(), "succeeded");
    assert_eq!(cancelled.operation.amount, 0);
    assert_eq!(rig.pay.calls()[0].2, None, "a cancellation sends no amount");
    refused(
        rig.operate(OperationKind::Capture, &charge, "c-2", 0).await,
        "cancelled",
    );
    refused(
        rig.operate(OperationKind::Cancel, &charge, "c-3", 0).await,
        "cancelled",
    );
    let replay = rig
        .operate(OperationKind::Cancel, &charge, "c-1", 0)
        .await
        .expect("replay");
    assert_eq!(replay.operation.id, cancelled.operation.id);
    assert_eq!(rig.pay.calls().len(), 1);

    // A charge waiting for the cardholder can be cancelled too.
    let waiting = rig
        .charge("dev", "pay", "automatic", "requires_action", true)
        .await;
    let voided = rig
        .operate(OperationKind::Cancel, &waiting, "w-1", 0)
        .await
        .expect("cancel");
    assert_eq!(voided.operation.status.as_str(), "succeeded");
}

async fn bad_requests_name_their_fields_and_unknown_charges_are_not_found(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut client = app.client.clone();
    let card_number = "4242424242424242";
    // Malformed charge id, a key carrying a card number, an amount no store holds.
    let err = client
        .refund_charge(pb::RefundChargeRequest {
            charge_id: card_number.to_owned(),
            idempotency_key: format!("refund {card_number}"),
            amount: u64::MAX,
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&err),
        vec!["charge_id", "idempotency_key", "amount"]
    );
    assert!(!format!("{err:?}").contains(card_number), "{err:?}");
    let err = client
        .capture_charge(pb::CaptureChargeRequest {
            charge_id: "ch_0000000000000000".to_owned(),
            idempotency_key: String::new(),
            amount: 0,
        })
        .await
        .expect_err("refused");
    assert_eq!(violated_fields(&err), vec!["idempotency_key"]);
    let err = client
        .cancel_charge(pb::CancelChargeRequest {
            charge_id: "ch_0000000000000000".to_owned(),
            idempotency_key: "cancel-1".to_owned(),
        })
        .await
        .expect_err("no such charge");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "charge not found");
}

async fn a_honeytokens_charge_is_refused_like_a_decline_and_raises_the_alarm(backend: Backend) {
    let rig = rig(backend, Duration::ZERO).await;
    let dek = rig
        .store
        .active_dek("dev")
        .await
        .expect("read")
        .expect("dev has a data key")
        .id;
    let honey = "tok_HoneyHoneyHoneyHoneyHo";
    let real = "tok_RealRealRealRealRealRe";
    let mut tx = rig.store.begin().await.expect("begin");
    for (token, honeytoken) in [(honey, true), (real, false)] {
        tx.insert_card(&CardRow {
            token: token.to_owned(),
            tenant_id: "dev".to_owned(),
            token_format: "opaque".to_owned(),
            fingerprint: token.as_bytes().to_vec(),
            dek_id: dek,
            ciphertext: vec![1, 2, 3],
            brand: "VISA".to_owned(),
            last4: "4242".to_owned(),
            bin: "42424242".to_owned(),
            exp_month: 12,
            exp_year: 2030,
            metadata: Vec::new(),
            canonical: false,
            created_at: OffsetDateTime::now_utc(),
            expires_at: None,
            honeytoken,
            import_id: None,
        })
        .await
        .expect("card");
    }
    tx.commit().await.expect("commit");
    // The vault declines a honeytoken's charge itself, shaped like the gateway's decline
    // (for Stripe with a made-up PaymentIntent id), so its row looks like a real decline's.
    let decoy = rig
        .charge_of(honey, "dev", "pay", "automatic", "declined", true)
        .await;
    let declined = rig
        .charge_of(real, "dev", "pay", "automatic", "declined", true)
        .await;
    for kind in [
        OperationKind::Capture,
        OperationKind::Refund,
        OperationKind::Cancel,
    ] {
        let a = refused(rig.operate(kind, &decoy, "h-1", 0).await, "declined");
        let b = refused(rig.operate(kind, &declined, "h-2", 0).await, "declined");
        assert_eq!(a.replace(&decoy, "ch_"), b.replace(&declined, "ch_"));
    }
    assert!(rig.pay.calls().is_empty(), "nothing sent");
    let alarms = alarms_of(&rig.state, honey).await;
    assert_eq!(
        alarms,
        vec![true; 3],
        "each refusal on record, marked alarm"
    );
    assert_eq!(alarms_of(&rig.state, real).await, vec![false; 3]);
}

/// The `alarm` flags of the operation records about `token`, oldest first.
async fn alarms_of(state: &AppState, token: &str) -> Vec<bool> {
    let sql = "SELECT alarm FROM audit_records WHERE token = $1 \
               AND action IN ('charges.capture', 'charges.refund', 'charges.cancel') \
               ORDER BY at, shard, seq";
    match state.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&state.database_url)
                .await
                .expect("open sqlite");
            sqlx::query_scalar(sql)
                .bind(token)
                .fetch_all(&pool)
                .await
                .expect("audit")
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&state.database_url)
                .await
                .expect("open postgres");
            sqlx::query_scalar(sql)
                .bind(token)
                .fetch_all(&pool)
                .await
                .expect("audit")
        }
    }
}

/// A dev vault whose one gateway, `stripe`, is the test gateway over TLS.
async fn stripe_rig(backend: Backend) -> (crate::helpers::TestApp, TestGateway) {
    let state = Arc::new(AppState::new(backend).await);
    let pki = Pki::new(state.dir.path());
    let gateway = TestGateway::start(TestGatewayOptions {
        tls: Some(TlsFiles {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            client_ca_file: None,
        }),
        ..TestGatewayOptions::default()
    })
    .await
    .expect("test gateway starts");
    let secret = state.dir.path().join("gateway.key");
    std::fs::write(&secret, format!("{}\n", gateway.secret_key())).expect("secret file");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("secret file mode");
    let toml = format!(
        "[[gateways]]\nname = \"stripe\"\nkind = \"stripe\"\nbase_url = \"{}\"\nca_file = \"{}\"\nsecret_file = \"{}\"\n",
        gateway.url(),
        pki.ca_file.display(),
        secret.display()
    );
    #[derive(serde::Deserialize)]
    struct File {
        gateways: Vec<cardvault::gateway::GatewaySettings>,
    }
    let mut settings = state.settings("dev");
    settings.gateways = toml::from_str::<File>(&toml)
        .expect("gateway settings")
        .gateways;
    (spawn_with(state, "dev", settings).await, gateway)
}

async fn capture_refund_and_cancel_through_stripe_over_tls_once_per_key_and_without_card_data(
    backend: Backend,
) {
    let (app, gateway) = stripe_rig(backend).await;
    let mut client = app.client.clone();
    let pan = unique_pan();
    let cvc = "0618";
    let mut tokenize = tokenize_request(&pan);
    tokenize.cvc = cvc.to_owned();
    let token = client
        .tokenize(tokenize)
        .await
        .expect("tokenize")
        .into_inner()
        .token;
    let charge = |key: &str, capture: pb::Capture| pb::ChargeRequest {
        token: token.clone(),
        amount: 5000,
        currency: "eur".to_owned(),
        gateway: "stripe".to_owned(),
        idempotency_key: key.to_owned(),
        capture: capture.into(),
        description: String::new(),
        metadata: Default::default(),
    };
    let manual = client
        .charge(charge("order-1", pb::Capture::Manual))
        .await
        .expect("authorize")
        .into_inner();
    assert_eq!(manual.status(), pb::ChargeStatus::Succeeded);
    let capture = pb::CaptureChargeRequest {
        charge_id: manual.charge_id.clone(),
        idempotency_key: "order-1-capture".to_owned(),
        amount: 4000,
    };
    let captured = client
        .capture_charge(capture.clone())
        .await
        .expect("capture")
        .into_inner();
    assert_eq!(
        (captured.kind(), captured.status(), captured.amount),
        (
            pb::ChargeOperationKind::Capture,
            pb::ChargeOperationStatus::Succeeded,
            4000
        ),
        "{captured:?}"
    );
    assert_eq!(captured.gateway_id, manual.gateway_payment_id);
    assert!(captured.created);
    let again = client
        .capture_charge(capture.clone())
        .await
        .expect("replay")
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.operation_id, captured.operation_id);
    let err = client
        .capture_charge(pb::CaptureChargeRequest {
            amount: 3000,
            ..capture.clone()
        })
        .await
        .expect_err("other amount");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let captures: Vec<_> = gateway
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/capture"))
        .collect();
    assert_eq!(captures.len(), 1, "one capture reached the gateway");
    assert_eq!(
        captures[0].idempotency_key.as_deref(),
        Some(captured.operation_id.as_str())
    );

    // Refunds: two parts, then more than remains (refused), then the rest.
    let refund = |key: &str, amount: u64| pb::RefundChargeRequest {
        charge_id: manual.charge_id.clone(),
        idempotency_key: key.to_owned(),
        amount,
    };
    for (key, amount) in [("r-1", 1500), ("r-2", 1500)] {
        let refunded = client
            .refund_charge(refund(key, amount))
            .await
            .expect("refund")
            .into_inner();
        assert_eq!(refunded.status(), pb::ChargeOperationStatus::Succeeded);
        assert_eq!(refunded.amount, amount);
        assert!(refunded.gateway_id.starts_with("re_"), "{refunded:?}");
    }
    let err = client
        .refund_charge(refund("r-3", 1001))
        .await
        .expect_err("too much");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("(1000)"), "{}", err.message());
    let rest = client
        .refund_charge(refund("r-4", 0))
        .await
        .expect("the rest")
        .into_inner();
    assert_eq!(rest.amount, 1000);

    // Cancel an authorization instead; it can no longer be captured.
    let other = client
        .charge(charge("order-2", pb::Capture::Manual))
        .await
        .expect("authorize")
        .into_inner();
    let cancelled = client
        .cancel_charge(pb::CancelChargeRequest {
            charge_id: other.charge_id.clone(),
            idempotency_key: "order-2-cancel".to_owned(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.status(), pb::ChargeOperationStatus::Succeeded);
    let err = client
        .capture_charge(pb::CaptureChargeRequest {
            charge_id: other.charge_id.clone(),
            idempotency_key: "order-2-capture".to_owned(),
            amount: 0,
        })
        .await
        .expect_err("cancelled");
    assert_eq!(err.code(), Code::FailedPrecondition);

    // No card number or CVC in the logs, the audit details or the database.
    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    assert!(logs.contains("capture"), "operation log lines captured");
    let stored = match backend {
        Backend::Sqlite => read_sqlite_files(|| app.state.sqlite_files()),
        Backend::Postgres => {
            PgServer::get().dump(app.state.pg_database.as_deref().expect("database name"))
        }
    };
    let stored = String::from_utf8_lossy(&stored).into_owned();
    assert!(
        stored.contains(&captured.operation_id),
        "the dump has the rows"
    );
    for (place, text) in [("logs", &logs), ("database", &stored)] {
        for secret in [pan.as_str(), &pan[..12]] {
            assert!(!text.contains(secret), "a card number is in the {place}");
        }
        let joined = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '_');
        let standalone = text.match_indices(cvc).any(|(i, _)| {
            !text[..i].chars().next_back().is_some_and(joined)
                && !text[i + cvc.len()..].chars().next().is_some_and(joined)
        });
        assert!(!standalone, "the CVC is in the {place}");
    }
}
