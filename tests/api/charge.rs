//! Charge forwarding end to end: the vault charges cards through the
//! project's Stripe-compatible test gateway over real TLS, with the `stripe` connector and a
//! `generic` one configured for the gateway's JSON API; exactly once per idempotency key;
//! unknown outcomes settled by reconciliation; outbound safety; tenant isolation; and no
//! card number or CVC anywhere it must not be.

use std::{sync::Arc, time::Duration};

use cardvault::{
    config::Settings,
    pb::v1::{self as pb, card_vault_client::CardVaultClient},
    tls::TlsFiles,
};
use cardvault_test_gateway::{TestGateway, TestGatewayOptions, cards, paths};
use tonic::{Code, transport::Channel};

use crate::{
    access::{operator, secure_with},
    canary::read_sqlite_files,
    helpers::{
        AppState, Backend, TestApp, captured_logs, spawn_with, tokenize_request, unique_pan,
        with_key,
    },
    on_both_backends,
    pki::Pki,
    postgres::PgServer,
};

on_both_backends!(
    every_outcome_comes_back_through_the_stripe_connector,
    every_outcome_comes_back_through_the_generic_connector,
    concurrent_duplicates_make_one_gateway_call,
    a_reused_key_with_other_parameters_is_refused,
    a_timeout_is_unknown_until_reconciled,
    a_gateway_without_idempotency_keys_is_never_sent_a_charge_twice,
    redirects_and_oversized_answers_are_refused,
    a_cvc_is_held_once_and_never_stored_or_logged,
    an_amount_the_store_cannot_hold_is_an_invalid_argument,
    a_stored_amount_out_of_range_is_named_in_the_log,
    a_honeytoken_charge_reaches_no_gateway_and_looks_like_a_decline,
    every_send_is_on_record_before_it_leaves_and_its_outcome_with_the_settle,
    a_charge_for_a_gateway_this_replica_lacks_is_recorded_and_left_alone,
    a_charge_needing_3_d_secure_hands_back_its_action_also_on_replay,
    charge_metadata_may_not_take_the_vaults_key_nor_more_than_49_entries,
);

/// A vault (tenant `dev`) whose gateways reach one test gateway over TLS.
pub(crate) struct Rig {
    pub(crate) app: TestApp,
    pub(crate) gateway: TestGateway,
    /// The vault's `[[gateways]]`, to start another vault with.
    pub(crate) gateways_toml: String,
}

/// The test gateway's TLS certificate, signed by the test CA the vault trusts.
pub(crate) async fn start_gateway(pki: &Pki, hang: Duration) -> TestGateway {
    start_gateway_with(pki, hang, TestGatewayOptions::default().idempotency_key_ttl).await
}

/// As [`start_gateway`], forgetting idempotency keys after `key_ttl`.
pub(crate) async fn start_gateway_with(
    pki: &Pki,
    hang: Duration,
    key_ttl: Duration,
) -> TestGateway {
    TestGateway::start(TestGatewayOptions {
        hang,
        idempotency_key_ttl: key_ttl,
        tls: Some(TlsFiles {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            client_ca_file: None,
        }),
        ..TestGatewayOptions::default()
    })
    .await
    .expect("test gateway starts")
}

/// `[[gateways]]` for `gateway`: `stripe` (the stripe connector), `generic` (the generic
/// connector on the gateway's JSON API), and the misbehaving `redirect` and `huge`.
fn gateways(dir: &std::path::Path, pki: &Pki, gateway: &TestGateway, timeout_ms: u64) -> String {
    let secret = dir.join("gateway.key");
    std::fs::write(&secret, format!("{}\n", gateway.secret_key())).expect("secret file");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("secret file mode");
    let common = format!(
        "base_url = \"{}\"\nca_file = \"{}\"\nsecret_file = \"{}\"\ntimeout_ms = {timeout_ms}\n",
        gateway.url(),
        pki.ca_file.display(),
        secret.display()
    );
    let generic_with = |name: &str, path: &str, idempotency: &str| {
        format!(
            r#"[[gateways]]
name = "{name}"
kind = "generic"
{common}path = "{path}"
headers = {{ Authorization = "Bearer {{{{secret}}}}" }}
{idempotency}
body_format = "json"
body = '{{"amount": {{{{amount}}}}, "currency": "{{{{currency}}}}", "card": {{"number": "{{{{card.number}}}}", "exp_month": {{{{card.exp_month}}}}, "exp_year": {{{{card.exp_year}}}}, "cvc": "{{{{card.cvc}}}}"}}}}'
status_pointer = "/status"
status_map = {{ approved = "succeeded", declined = "declined", challenge = "requires_action" }}
payment_id_pointer = "/id"
decline_code_pointer = "/reason_code"
message_pointer = "/reason"
"#
        )
    };
    let generic = |name: &str, path: &str| {
        generic_with(name, path, "idempotency_header = \"Idempotency-Key\"")
    };
    format!(
        "[[gateways]]\nname = \"stripe\"\nkind = \"stripe\"\n{common}\n{}\n{}\n{}\n{}",
        generic("generic", paths::GENERIC_CHARGES),
        generic("redirect", paths::TEST_REDIRECT),
        generic("huge", paths::TEST_HUGE),
        // A gateway that never sees the idempotency key: a charge to it is never re-sent.
        generic_with("blind", paths::GENERIC_CHARGES, ""),
    )
}

/// Puts the gateways of `toml` into `settings`.
pub(crate) fn with_gateways(settings: &mut Settings, toml: &str) {
    #[derive(serde::Deserialize)]
    struct File {
        gateways: Vec<cardvault::gateway::GatewaySettings>,
    }
    let file: File = toml::from_str(toml).expect("gateway settings parse");
    settings.gateways = file.gateways;
}

pub(crate) async fn rig_with(backend: Backend, hang: Duration, timeout_ms: u64) -> Rig {
    rig_tuned(backend, hang, timeout_ms, |_| {}).await
}

/// As [`rig_with`], with the vault's settings adjusted by `tune` before it starts.
pub(crate) async fn rig_tuned(
    backend: Backend,
    hang: Duration,
    timeout_ms: u64,
    tune: impl FnOnce(&mut Settings),
) -> Rig {
    let key_ttl = TestGatewayOptions::default().idempotency_key_ttl;
    rig_forgetful(backend, hang, timeout_ms, key_ttl, tune).await
}

/// As [`rig_tuned`], with a gateway that forgets idempotency keys after `key_ttl`.
pub(crate) async fn rig_forgetful(
    backend: Backend,
    hang: Duration,
    timeout_ms: u64,
    key_ttl: Duration,
    tune: impl FnOnce(&mut Settings),
) -> Rig {
    let state = Arc::new(AppState::new(backend).await);
    let pki = Pki::new(state.dir.path());
    let gateway = start_gateway_with(&pki, hang, key_ttl).await;
    let mut settings = state.settings("dev");
    let gateways_toml = gateways(state.dir.path(), &pki, &gateway, timeout_ms);
    with_gateways(&mut settings, &gateways_toml);
    tune(&mut settings);
    let app = spawn_with(state, "dev", settings).await;
    Rig {
        app,
        gateway,
        gateways_toml,
    }
}

pub(crate) async fn rig(backend: Backend) -> Rig {
    rig_with(backend, Duration::from_secs(30), 5_000).await
}

/// Tokenizes `number` (with `cvc` held, if given) and returns the token.
pub(crate) async fn card(client: &mut CardVaultClient<Channel>, number: &str, cvc: &str) -> String {
    let mut request = tokenize_request(number);
    request.cvc = cvc.to_owned();
    client
        .tokenize(request)
        .await
        .expect("tokenize")
        .into_inner()
        .token
}

pub(crate) fn charge_request(token: &str, gateway: &str, key: &str) -> pb::ChargeRequest {
    pb::ChargeRequest {
        token: token.to_owned(),
        amount: 1999,
        currency: "eur".to_owned(),
        gateway: gateway.to_owned(),
        idempotency_key: key.to_owned(),
        capture: pb::Capture::Automatic.into(),
        description: "order 42".to_owned(),
        metadata: [("order".to_owned(), "42".to_owned())].into(),
    }
}

pub(crate) async fn charge(
    client: &mut CardVaultClient<Channel>,
    token: &str,
    gateway: &str,
    key: &str,
) -> pb::ChargeResponse {
    client
        .charge(charge_request(token, gateway, key))
        .await
        .unwrap_or_else(|e| panic!("charge via {gateway}: {e:?}"))
        .into_inner()
}

pub(crate) fn status(response: &pb::ChargeResponse) -> pb::ChargeStatus {
    pb::ChargeStatus::try_from(response.status).expect("known status")
}

/// Charges one card of each test-card kind through `gateway`; checks status, decline code
/// and that a gateway payment id came back where the gateway gives one.
async fn every_outcome_through(backend: Backend, gateway: &str) {
    let mut rig = rig(backend).await;
    let client = &mut rig.app.client;
    let cases: [(&str, pb::ChargeStatus, &str); 7] = [
        (cards::SUCCESS, pb::ChargeStatus::Succeeded, ""),
        (
            cards::DECLINED,
            pb::ChargeStatus::Declined,
            "generic_decline",
        ),
        (
            cards::INSUFFICIENT_FUNDS,
            pb::ChargeStatus::Declined,
            "insufficient_funds",
        ),
        (cards::EXPIRED, pb::ChargeStatus::Declined, "expired_card"),
        (
            cards::INCORRECT_CVC,
            pb::ChargeStatus::Declined,
            "incorrect_cvc",
        ),
        (
            cards::PROCESSING_ERROR,
            pb::ChargeStatus::Declined,
            "processing_error",
        ),
        (cards::REQUIRES_ACTION, pb::ChargeStatus::RequiresAction, ""),
    ];
    for (i, (number, expected, decline_code)) in cases.into_iter().enumerate() {
        let token = card(client, number, "123").await;
        let answer = charge(client, &token, gateway, &format!("order-{i}")).await;
        assert_eq!(
            status(&answer),
            expected,
            "card #{i} via {gateway}: {answer:?}"
        );
        assert_eq!(answer.decline_code, decline_code, "card #{i} via {gateway}");
        if expected == pb::ChargeStatus::Declined {
            assert!(
                !answer.message.is_empty(),
                "a decline carries the gateway's message"
            );
        } else {
            assert!(!answer.gateway_payment_id.is_empty(), "{answer:?}");
        }
        assert!(answer.created);
        let masked = answer.card.expect("masked card");
        assert_eq!(masked.last4, &number[number.len() - 4..]);
        assert!(!format!("{masked:?}").contains(number));
    }
}

async fn every_outcome_comes_back_through_the_stripe_connector(backend: Backend) {
    every_outcome_through(backend, "stripe").await;
}

async fn every_outcome_comes_back_through_the_generic_connector(backend: Backend) {
    every_outcome_through(backend, "generic").await;
}

async fn concurrent_duplicates_make_one_gateway_call(backend: Backend) {
    let mut rig = rig(backend).await;
    let token = card(&mut rig.app.client, cards::SUCCESS, "").await;
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut client = rig.app.client.clone();
        let token = token.clone();
        calls.push(tokio::spawn(async move {
            charge(&mut client, &token, "stripe", "once").await
        }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("charge task"));
    }
    let first = &answers[0];
    assert_eq!(status(first), pb::ChargeStatus::Succeeded);
    for answer in &answers {
        assert_eq!(answer.charge_id, first.charge_id);
        assert_eq!(answer.gateway_payment_id, first.gateway_payment_id);
        assert_eq!(answer.status, first.status);
    }
    assert_eq!(answers.iter().filter(|a| a.created).count(), 1);
    let stats = rig.gateway.stats();
    assert_eq!(stats.executed_on(paths::PAYMENT_INTENTS), 1, "{stats:?}");
    assert_eq!(stats.posts_to(paths::PAYMENT_INTENTS), 1, "{stats:?}");
    // A later retry is answered from the vault's record, without a gateway call.
    let again = charge(&mut rig.app.client, &token, "stripe", "once").await;
    assert_eq!(again.charge_id, first.charge_id);
    assert!(!again.created);
    assert_eq!(rig.gateway.stats().posts_to(paths::PAYMENT_INTENTS), 1);
}

async fn a_reused_key_with_other_parameters_is_refused(backend: Backend) {
    let mut rig = rig(backend).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::SUCCESS, "").await;
    charge(client, &token, "stripe", "k1").await;
    let mut other = charge_request(&token, "stripe", "k1");
    other.amount += 1;
    let err = client.charge(other).await.expect_err("other amount");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Missing key, zero amount, bad currency, unknown gateway: INVALID_ARGUMENT per field.
    let mut bad = charge_request(&token, "nowhere", "");
    bad.amount = 0;
    bad.currency = "euro".to_owned();
    let err = client.charge(bad).await.expect_err("bad request");
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut fields = crate::helpers::violated_fields(&err);
    fields.sort();
    assert_eq!(fields, ["amount", "currency", "gateway", "idempotency_key"]);
    // An unknown token is NOT_FOUND, and nothing reached the gateway for any of this.
    let err = client
        .charge(charge_request("tok_0000000000000000000000", "stripe", "k2"))
        .await
        .expect_err("unknown token");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(rig.gateway.stats().executed_on(paths::PAYMENT_INTENTS), 1);
}

async fn a_timeout_is_unknown_until_reconciled(backend: Backend) {
    // The gateway answers the hang card after 1.5 s; the vault gives up after 0.5 s.
    let mut rig = rig_with(backend, Duration::from_millis(1_500), 500).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::HANG, "321").await;
    let answer = charge(client, &token, "stripe", "slow-1").await;
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let reconciled = client
        .reconcile_charges(pb::ReconcileChargesRequest { limit: 0 })
        .await
        .expect("reconcile")
        .into_inner()
        .charges;
    assert_eq!(reconciled.len(), 1, "{reconciled:?}");
    assert_eq!(reconciled[0].charge_id, answer.charge_id);
    assert_eq!(
        pb::ChargeStatus::try_from(reconciled[0].status),
        Ok(pb::ChargeStatus::Succeeded)
    );
    // The gateway ran the PaymentIntent once; reconciliation asked for it and sent nothing
    // again.
    let stats = rig.gateway.stats();
    assert_eq!(stats.executed_on(paths::PAYMENT_INTENTS), 1, "{stats:?}");
    assert_eq!(stats.posts_to(paths::PAYMENT_INTENTS), 1, "{stats:?}");
    // The caller's retry now gets the settled outcome; nothing is left to reconcile.
    let again = charge(client, &token, "stripe", "slow-1").await;
    assert_eq!(status(&again), pb::ChargeStatus::Succeeded);
    assert_eq!(again.gateway_payment_id, reconciled[0].gateway_payment_id);
    let left = client
        .reconcile_charges(pb::ReconcileChargesRequest { limit: 0 })
        .await
        .expect("reconcile")
        .into_inner()
        .charges;
    assert!(left.is_empty(), "{left:?}");
}

async fn a_gateway_without_idempotency_keys_is_never_sent_a_charge_twice(backend: Backend) {
    let mut rig = rig_with(backend, Duration::from_millis(1_500), 500).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::HANG, "").await;
    let answer = charge(client, &token, "blind", "blind-1").await;
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    // Neither a retry nor a reconciliation sends it again: the gateway could not tell a
    // re-send from a second charge.
    let again = charge(client, &token, "blind", "blind-1").await;
    assert_eq!(status(&again), pb::ChargeStatus::Unknown);
    let reconciled = client
        .reconcile_charges(pb::ReconcileChargesRequest { limit: 0 })
        .await
        .expect("reconcile")
        .into_inner()
        .charges;
    assert_eq!(reconciled.len(), 1);
    assert_eq!(
        pb::ChargeStatus::try_from(reconciled[0].status),
        Ok(pb::ChargeStatus::Unknown)
    );
    assert_eq!(rig.gateway.stats().executed_on(paths::GENERIC_CHARGES), 1);
}

async fn redirects_and_oversized_answers_are_refused(backend: Backend) {
    let mut rig = rig(backend).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::SUCCESS, "").await;
    for gateway in ["redirect", "huge"] {
        let answer = charge(client, &token, gateway, &format!("refused-{gateway}")).await;
        // The gateway may have acted before answering badly: never SUCCEEDED, never a
        // followed redirect; the outcome is unknown until reconciled.
        assert_eq!(
            status(&answer),
            pb::ChargeStatus::Unknown,
            "{gateway}: {answer:?}"
        );
        assert!(answer.gateway_payment_id.is_empty(), "{answer:?}");
    }
    // The redirect's target was never requested.
    let stats = rig.gateway.stats();
    assert_eq!(stats.posts_to(paths::PAYMENT_INTENTS), 0, "{stats:?}");
}

async fn a_cvc_is_held_once_and_never_stored_or_logged(backend: Backend) {
    let mut rig = rig(backend).await;
    let client = &mut rig.app.client;
    let pan = unique_pan();
    let cvc = "0739";
    let token = card(client, &pan, cvc).await;
    let first = charge(client, &token, "stripe", "cvc-1").await;
    assert_eq!(status(&first), pb::ChargeStatus::Succeeded);
    // The hold was used by that charge: the next charge of the card goes without a CVC.
    charge(client, &token, "stripe", "cvc-2").await;
    let checks: Vec<String> = rig
        .gateway
        .requests()
        .iter()
        .filter(|r| r.path == paths::PAYMENT_METHODS)
        .map(|r| format!("{r:?}"))
        .collect();
    assert_eq!(checks.len(), 2);
    // HoldCvc holds one for the card's next charge, and refuses what is not a CVC without
    // echoing it.
    let held = client
        .hold_cvc(pb::HoldCvcRequest {
            token: token.clone(),
            cvc: "0482".to_owned(),
        })
        .await
        .expect("hold")
        .into_inner();
    assert!(held.expires_at.is_some());
    let err = client
        .hold_cvc(pb::HoldCvcRequest {
            token: token.clone(),
            cvc: "48a1".to_owned(),
        })
        .await
        .expect_err("bad cvc");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(!format!("{err:?}").contains("48a1"));
    let declined = card(client, cards::DECLINED, "0555").await;
    let err_answer = charge(client, &declined, "stripe", "cvc-3").await;
    assert!(!format!("{err_answer:?}").contains(cards::DECLINED));

    // Nowhere: logs (every app and the test gateway in this process), audit records, rows.
    // A CVC is a few digits, so it is looked for as a value of its own: not inside a longer
    // run of letters, digits or a dotted/colon-separated number (timestamps, durations,
    // addresses). The test's CVCs start with 0, which no port number does.
    let standalone = |haystack: &str, needle: &str| {
        let joined = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '_');
        haystack.match_indices(needle).find_map(|(i, _)| {
            let before = haystack[..i].chars().next_back();
            let after = haystack[i + needle.len()..].chars().next();
            (!before.is_some_and(joined) && !after.is_some_and(joined)).then(|| {
                let from = haystack.floor_char_boundary(i.saturating_sub(60));
                let to = haystack.ceil_char_boundary((i + needle.len() + 60).min(haystack.len()));
                haystack[from..to].to_owned()
            })
        })
    };
    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    assert!(
        logs.contains("cvc-1") || logs.contains("charge"),
        "no charge lines captured"
    );
    for secret in [pan.as_str(), &pan[..12], cvc, "0482", "0555"] {
        if let Some(context) = standalone(&logs, secret) {
            panic!("a card secret is in the logs: …{context}…");
        }
    }
    let state = &rig.app.state;
    let details = audit_details(state).await;
    assert!(details.iter().any(|d| d.contains("charge ")), "{details:?}");
    for secret in [pan.as_str(), cvc, "0482", "0555"] {
        if let Some(context) = details.iter().find_map(|d| standalone(d, secret)) {
            panic!("a card secret is in the audit log: …{context}…");
        }
    }
    let stored = database_text(state);
    for secret in [pan.as_str(), &pan[..12], cvc, "0482", "0555"] {
        if let Some(context) = standalone(&stored, secret) {
            panic!("a card secret is in the database: …{context}…");
        }
    }
}

async fn an_amount_the_store_cannot_hold_is_an_invalid_argument(backend: Backend) {
    let mut rig = rig(backend).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::SUCCESS, "").await;
    for amount in [u64::MAX, 1 << 63] {
        let mut request = charge_request(&token, "stripe", &format!("huge-{amount}"));
        request.amount = amount;
        let err = client.charge(request).await.expect_err("too large");
        assert_eq!(err.code(), Code::InvalidArgument, "{amount}: {err:?}");
        assert_eq!(crate::helpers::violated_fields(&err), ["amount"]);
    }
    // Refused at the edge: no charge row, nothing sent.
    assert_eq!(rig.app.state.count("SELECT COUNT(*) FROM charges").await, 0);
    assert_eq!(rig.gateway.stats().posts_to(paths::PAYMENT_METHODS), 0);
}

async fn a_stored_amount_out_of_range_is_named_in_the_log(backend: Backend) {
    let mut rig = rig(backend).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::SUCCESS, "").await;
    charge(client, &token, "stripe", "tampered").await;
    // Someone with database access writes an amount no charge can have.
    let changed = rig
        .app
        .state
        .execute(
            "UPDATE charges SET amount = -5 WHERE idempotency_key = $1",
            &["tampered"],
        )
        .await;
    assert_eq!(changed, 1);
    let err = client
        .charge(charge_request(&token, "stripe", "tampered"))
        .await
        .expect_err("a corrupt charge");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    let request_id = err
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("request id")
        .to_owned();
    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    assert!(
        logs.lines().any(
            |l| l.contains(&request_id) && l.contains("a stored charge amount is out of range")
        ),
        "the log says what is wrong with the row"
    );
}

/// The audit records of `action` about `token`: (outcome, alarm, detail), oldest first.
async fn records_of(state: &AppState, action: &str, token: &str) -> Vec<(String, bool, String)> {
    let sql = "SELECT outcome, alarm, COALESCE(detail, '') FROM audit_records \
               WHERE action = $1 AND token = $2 ORDER BY at, shard, seq";
    match state.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&state.database_url)
                .await
                .expect("open sqlite");
            sqlx::query_as(sql)
                .bind(action)
                .bind(token)
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
                .bind(token)
                .fetch_all(&pool)
                .await
                .expect("audit")
        }
    }
}

async fn a_honeytoken_charge_reaches_no_gateway_and_looks_like_a_decline(backend: Backend) {
    let mut rig = rig(backend).await;
    let state = rig.app.state.clone();
    let ops = cardvault::server::open_vault(&state.settings("dev"))
        .await
        .expect("operator vault");
    let canary = ops
        .mint_honeytoken(
            &operator(),
            &cardvault::vault::TenantId::parse("dev").expect("tenant"),
            cardvault::card::TokenFormat::Opaque,
            cardvault::vault::Metadata::default(),
        )
        .await
        .expect("mint")
        .token;
    let canary = canary.as_str();
    let client = &mut rig.app.client;
    // What a real decline through the same connector looks like.
    let declined = card(client, cards::DECLINED, "123").await;
    let real = charge(client, &declined, "stripe", "real-decline").await;
    assert_eq!(status(&real), pb::ChargeStatus::Declined);
    let before = rig.gateway.requests().len();

    let answer = charge(client, canary, "stripe", "canary-1").await;
    assert_eq!(
        rig.gateway.requests().len(),
        before,
        "a honeytoken charge reached the gateway"
    );
    // Shaped like the real decline: same status, code, message and payment id shape.
    assert_eq!(status(&answer), pb::ChargeStatus::Declined, "{answer:?}");
    assert_eq!(answer.decline_code, real.decline_code);
    assert_eq!(answer.message, real.message);
    assert!(answer.gateway_payment_id.starts_with("pi_"), "{answer:?}");
    assert_eq!(
        answer.gateway_payment_id.len(),
        real.gateway_payment_id.len()
    );
    assert!(answer.created);
    // A retry replays it, and reconciliation has nothing to send: still no gateway contact.
    let again = charge(client, canary, "stripe", "canary-1").await;
    assert_eq!(again.charge_id, answer.charge_id);
    assert_eq!(again.gateway_payment_id, answer.gateway_payment_id);
    assert!(!again.created);
    let reconciled = client
        .reconcile_charges(pb::ReconcileChargesRequest { limit: 0 })
        .await
        .expect("reconcile")
        .into_inner()
        .charges;
    assert!(reconciled.is_empty(), "{reconciled:?}");
    assert_eq!(rig.gateway.requests().len(), before);

    // The operators see it: alarm records and the error log line.
    let records = records_of(&state, "charge", canary).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records.iter().all(|(_, alarm, _)| *alarm), "{records:?}");
    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    assert!(
        logs.lines().any(|l| l.contains("HONEYTOKEN ACCESSED")
            && l.contains(canary)
            && l.contains("\"action\":\"charge\"")),
        "no alarm log line for the charge"
    );
}

async fn every_send_is_on_record_before_it_leaves_and_its_outcome_with_the_settle(
    backend: Backend,
) {
    // The gateway holds the hang card for 6 s; the vault gives up after 4 s.
    let hang = Duration::from_secs(6);
    let mut rig = rig_with(backend, hang, 4_000).await;
    let state = rig.app.state.clone();
    let token = card(&mut rig.app.client, cards::HANG, "").await;
    let mut client = rig.app.client.clone();
    let sending = {
        let token = token.clone();
        tokio::spawn(async move { charge(&mut client, &token, "stripe", "held-1").await })
    };
    // Wait until the gateway holds the charge…
    let mut waited = 0;
    while rig.gateway.stats().posts_to(paths::PAYMENT_INTENTS) == 0 {
        assert!(waited < 400, "the charge never reached the gateway");
        tokio::time::sleep(Duration::from_millis(25)).await;
        waited += 1;
    }
    // …and look, as after a crash at this point would: the charge is on record.
    let in_flight = records_of(&state, "charge", &token).await;
    assert!(
        !sending.is_finished(),
        "the gateway answered before the audit log was read; nothing was shown"
    );
    assert_eq!(in_flight.len(), 1, "{in_flight:?}");
    assert!(in_flight[0].2.contains("attempt 1"), "{in_flight:?}");

    let answer = sending.await.expect("charge task");
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    let records = records_of(&state, "charge", &token).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records[1].2.ends_with(" unknown"), "{records:?}");

    // Once the gateway has finished, reconciliation asks it and settles with what it holds:
    // nothing is sent, so the one record is the settled outcome and how it was learnt.
    tokio::time::sleep(hang).await;
    let reconciled = rig
        .app
        .client
        .reconcile_charges(pb::ReconcileChargesRequest { limit: 0 })
        .await
        .expect("reconcile")
        .into_inner()
        .charges;
    assert_eq!(
        pb::ChargeStatus::try_from(reconciled[0].status),
        Ok(pb::ChargeStatus::Succeeded)
    );
    let records = records_of(&state, "charges.reconcile", &token).await;
    let details: Vec<&str> = records.iter().map(|(_, _, d)| d.as_str()).collect();
    assert_eq!(details.len(), 1, "{details:?}");
    assert!(
        details[0].contains(" succeeded (found at the gateway: pi_"),
        "{details:?}"
    );
    rig.app.stop().await;
    let report = crate::audit::verify(&state).await;
    assert!(report.is_intact(), "{:?}", report.breaks);
}

async fn a_charge_for_a_gateway_this_replica_lacks_is_recorded_and_left_alone(backend: Backend) {
    let mut rig = rig_with(backend, Duration::from_millis(1_500), 500).await;
    let token = card(&mut rig.app.client, cards::HANG, "").await;
    let answer = charge(&mut rig.app.client, &token, "stripe", "elsewhere-1").await;
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    // Another replica, configured without the `stripe` gateway, is asked to reconcile.
    rig.app.stop().await;
    let state = rig.app.state.clone();
    let mut settings = state.settings("dev");
    with_gateways(&mut settings, &rig.gateways_toml);
    settings.gateways.retain(|g| g.name != "stripe");
    let mut other = spawn_with(state.clone(), "dev", settings).await;
    let reconciled = other
        .client
        .reconcile_charges(pb::ReconcileChargesRequest { limit: 0 })
        .await;
    // The refusal is on record, naming the charge and the gateway.
    let refusals = records_of(&state, "charges.reconcile", &token).await;
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    let (outcome, _, detail) = &refusals[0];
    assert_eq!(outcome, "conflict");
    assert!(
        detail.contains(&answer.charge_id) && detail.contains("stripe"),
        "{detail}"
    );
    // The charge is left as it stands for a replica that has the gateway.
    let reconciled = reconciled.expect("reconcile").into_inner().charges;
    assert_eq!(reconciled.len(), 1, "{reconciled:?}");
    assert_eq!(
        pb::ChargeStatus::try_from(reconciled[0].status),
        Ok(pb::ChargeStatus::Unknown)
    );
    other.stop().await;
}

/// A charge by a principal of another tenant is NOT_FOUND, like a missing token, and
/// reaches no gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_card_cannot_be_charged() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = Pki::new(dir.path());
    let gateway = start_gateway(&pki, Duration::from_secs(30)).await;
    let toml = gateways(dir.path(), &pki, &gateway, 5_000);
    let s = secure_with(Backend::Postgres, |settings| with_gateways(settings, &toml)).await;
    let (_, acme) = s.api_key("acme", "shop", &["tokenize", "charge"]).await;
    let (_, globex) = s.api_key("globex", "shop", &["tokenize", "charge"]).await;
    let mut client = s.vault().await;
    let token = client
        .tokenize(with_key(tokenize_request(cards::SUCCESS), &acme))
        .await
        .expect("tokenize")
        .into_inner()
        .token;
    let err = client
        .charge(with_key(charge_request(&token, "stripe", "x"), &globex))
        .await
        .expect_err("other tenant");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "token not found");
    let ok = client
        .charge(with_key(charge_request(&token, "stripe", "x"), &acme))
        .await
        .expect("own tenant")
        .into_inner();
    assert_eq!(
        pb::ChargeStatus::try_from(ok.status),
        Ok(pb::ChargeStatus::Succeeded)
    );
    assert_eq!(gateway.stats().executed_on(paths::PAYMENT_INTENTS), 1);
    let _ = operator();
}

/// The `detail` of every audit record.
pub(crate) async fn audit_details(state: &AppState) -> Vec<String> {
    let sql = "SELECT COALESCE(detail, '') FROM audit_records";
    match state.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&state.database_url)
                .await
                .expect("open sqlite");
            sqlx::query_scalar(sql)
                .fetch_all(&pool)
                .await
                .expect("audit")
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&state.database_url)
                .await
                .expect("open postgres");
            sqlx::query_scalar(sql)
                .fetch_all(&pool)
                .await
                .expect("audit")
        }
    }
}

/// Everything the database holds, as text: the SQLite files, or a `pg_dump`.
pub(crate) fn database_text(state: &AppState) -> String {
    let bytes = match state.backend {
        Backend::Sqlite => read_sqlite_files(|| state.sqlite_files()),
        Backend::Postgres => {
            PgServer::get().dump(state.pg_database.as_deref().expect("database name"))
        }
    };
    String::from_utf8_lossy(&bytes).into_owned()
}

async fn a_charge_needing_3_d_secure_hands_back_its_action_also_on_replay(backend: Backend) {
    let mut rig = rig(backend).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::REQUIRES_ACTION, "0846").await;
    let answer = charge(client, &token, "stripe", "3ds-1").await;
    assert_eq!(
        status(&answer),
        pb::ChargeStatus::RequiresAction,
        "{answer:?}"
    );
    let action = answer.action.clone().expect("an action");
    // Exactly the PaymentIntent's client secret, as the gateway holds it.
    let intent = rig
        .gateway
        .payment_intent(&answer.gateway_payment_id)
        .expect("the intent");
    assert_eq!(
        action.client_secret,
        intent["client_secret"].as_str().unwrap_or_default(),
        "{action:?}"
    );
    assert!(!action.r#type.is_empty(), "{action:?}");
    assert!(!action.next_action_json.is_empty(), "{action:?}");
    let replay = charge(client, &token, "stripe", "3ds-1").await;
    assert!(!replay.created);
    assert_eq!(replay.action, Some(action.clone()));
    // The client secret is for the shop's front end, not for the logs.
    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    assert!(
        action.client_secret.is_empty() || !logs.contains(&action.client_secret),
        "client secret logged"
    );
    // A charge that settles otherwise carries none.
    let plain = card(client, cards::SUCCESS, "").await;
    let succeeded = charge(client, &plain, "stripe", "3ds-2").await;
    assert_eq!(succeeded.action, None, "{succeeded:?}");
}

async fn charge_metadata_may_not_take_the_vaults_key_nor_more_than_49_entries(backend: Backend) {
    let mut rig = rig(backend).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::SUCCESS, "").await;
    let mut reserved = charge_request(&token, "stripe", "md-1");
    reserved.metadata.insert(
        "cardvault_charge_id".to_owned(),
        "ch_forged000000000".to_owned(),
    );
    let mut crowded = charge_request(&token, "stripe", "md-2");
    crowded.metadata = (0..50).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    for request in [reserved, crowded] {
        let err = client.charge(request).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        let fields = crate::helpers::violated_fields(&err);
        assert!(fields.iter().any(|f| f == "metadata"), "{fields:?}");
        assert!(!err.message().contains("ch_forged"), "{err:?}");
    }
    let mut full = charge_request(&token, "stripe", "md-3");
    full.metadata = (0..49).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let answer = client.charge(full).await.expect("49 entries").into_inner();
    assert_eq!(status(&answer), pb::ChargeStatus::Succeeded, "{answer:?}");
    assert_eq!(rig.app.state.count("SELECT COUNT(*) FROM charges").await, 1);
}
