//! The gateway layer against real servers over real TLS: the `stripe` connector through the
//! project's test gateway (`cardvault_test_gateway`), the `generic` connector through the test
//! gateway's misbehaving endpoints and through a small JSON gateway started in each test.
//!
//! Every server here is HTTPS with a throwaway CA (`support/pki.rs`) except where plain
//! HTTP to a loopback test gateway is the point.

use cardvault_test_support::pki;

use std::{
    collections::BTreeMap,
    io,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::Path,
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use cardvault::{
    card::Pan,
    gateway::{
        Capture, ChargeCard, ChargeParams, ChargeRef, ChargeStatus, Connector, GatewayKind,
        GatewaySettings, Gateways, Lookup, Operation, OperationKind, OperationStatus, Outcome,
        config::MappedStatus,
    },
    id::{ChargeId, MalformedId, OperationId},
    money::Currency,
    tls::{self, ClientAuth, ReloadingAcceptor, TlsFiles, TlsListener},
};
use cardvault_test_gateway::{TestGateway, TestGatewayOptions, cards, paths};
use serde_json::{Value, json};
use tempfile::TempDir;

/// How long the hang card and `/test/slow` wait in these tests.
const HANG: Duration = Duration::from_millis(1500);
/// The connector timeout of the timeout tests: well below [`HANG`].
const SHORT_TIMEOUT_MS: u64 = 300;
/// A CVC unlikely to appear by chance in logs (no timestamps are logged).
const CANARY_CVC: &str = "9731";

/// A test gateway over TLS, its PKI and a secret file holding its API key.
struct Harness {
    dir: TempDir,
    pki: pki::Pki,
    gateway: TestGateway,
    secret_file: PathBuf,
}

impl Harness {
    async fn start() -> Harness {
        Harness::start_with(false).await
    }

    /// With `mtls`, the gateway requires client certificates from the test CA.
    async fn start_with(mtls: bool) -> Harness {
        Harness::start_with_options(mtls, TestGatewayOptions::default()).await
    }

    /// A gateway that forgets idempotency keys `ttl` after their first use.
    async fn start_forgetting_keys_after(ttl: Duration) -> Harness {
        Harness::start_with_options(
            false,
            TestGatewayOptions {
                idempotency_key_ttl: ttl,
                ..TestGatewayOptions::default()
            },
        )
        .await
    }

    async fn start_with_options(mtls: bool, options: TestGatewayOptions) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = pki::Pki::new(dir.path());
        let gateway = TestGateway::start(TestGatewayOptions {
            hang: HANG,
            tls: Some(TlsFiles {
                cert_file: pki.server_cert.clone(),
                key_file: pki.server_key.clone(),
                client_ca_file: mtls.then(|| pki.ca_file.clone()),
            }),
            ..options
        })
        .await
        .expect("start the test gateway");
        let secret_file = dir.path().join("stripe-secret");
        write_secret(&secret_file, format!("{}\n", gateway.secret_key()));
        Harness {
            dir,
            pki,
            gateway,
            secret_file,
        }
    }

    /// A `stripe` gateway named `stripe` pointed at the test gateway, trusting the test CA.
    fn stripe(&self) -> GatewaySettings {
        GatewaySettings {
            ca_file: Some(self.pki.ca_file.clone()),
            secret_file: Some(self.secret_file.clone()),
            ..GatewaySettings::new("stripe", GatewayKind::Stripe, &self.gateway.url())
        }
    }

    /// A `generic` gateway posting `{}` to `path` of the test gateway, reading `/status`.
    fn generic_at(&self, path: &str) -> GatewaySettings {
        GatewaySettings {
            ca_file: Some(self.pki.ca_file.clone()),
            path: Some(path.to_owned()),
            body: Some(r#"{"amount": {{amount}}}"#.to_owned()),
            status_pointer: Some("/status".to_owned()),
            status_map: Some(BTreeMap::from([(
                "succeeded".to_owned(),
                MappedStatus::Succeeded,
            )])),
            payment_id_pointer: Some("/id".to_owned()),
            ..GatewaySettings::new("misbehaving", GatewayKind::Generic, &self.gateway.url())
        }
    }
}

/// The one connector of `settings`. Every test builds one, so every test logs into
/// [`logs`].
fn connector(settings: GatewaySettings) -> Arc<dyn Connector> {
    logs();
    let name = settings.name.clone();
    let gateways = Gateways::from_settings(&[settings]).expect("valid gateway settings");
    assert_eq!(gateways.names(), [name.as_str()]);
    gateways.get(&name).expect("configured").clone()
}

fn card<'a>(pan: &'a Pan, cvc: Option<&'a str>) -> ChargeCard<'a> {
    ChargeCard {
        pan,
        exp_month: 12,
        exp_year: 2034,
        cvc,
        holder: Some("Ada Lovelace"),
    }
}

/// A test's id of kind `T`: the prefix and `name`'s letters and digits, zero-padded to 16, so
/// tests can still name their charges. Leaked: a test makes a handful.
fn test_id<T>(name: &str, prefix: &str, parse: fn(&str) -> Result<T, MalformedId>) -> &'static T {
    let name = name.strip_prefix(prefix).unwrap_or(name);
    let alnum: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
    let id =
        parse(&format!("{prefix}{alnum:0>16}")).expect("a test id of at most 16 letters or digits");
    Box::leak(Box::new(id))
}

/// The charge id a test names `name`.
fn charge_id(name: &str) -> &'static ChargeId {
    test_id(name, ChargeId::PREFIX, ChargeId::parse)
}

/// The operation id a test names `name`.
fn operation_id(name: &str) -> &'static OperationId {
    test_id(name, OperationId::PREFIX, OperationId::parse)
}

fn eur() -> Currency {
    Currency::parse("EUR").expect("a currency")
}

/// A charge of 19.99 EUR whose charge id a test names `name`.
fn params(name: &str) -> ChargeParams<'static> {
    ChargeParams {
        amount: 1999,
        currency: eur(),
        capture: Capture::Automatic,
        description: "order 42",
        metadata: &[],
        charge_id: charge_id(name),
        resend: false,
    }
}

/// Charges `digits` once with `key`.
async fn charge(connector: &dyn Connector, digits: &str, key: &str) -> Outcome {
    let pan = Pan::parse(digits).expect("valid test card");
    connector
        .charge(&card(&pan, Some("123")), &params(key))
        .await
}

// ---------------------------------------------------------------------------------------
// stripe through the test gateway
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn stripe_charges_a_good_card_with_per_step_idempotency_keys_and_the_pinned_version() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let outcome = charge(stripe.as_ref(), cards::SUCCESS, "order-1").await;

    assert_eq!(outcome.status, ChargeStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.http_status, Some(200));
    let id = outcome.payment_id.expect("a PaymentIntent id");
    assert!(id.starts_with("pi_"), "{id}");
    let intent = h.gateway.payment_intent(&id).expect("stored");
    assert_eq!(intent["status"], "succeeded");
    assert_eq!(intent["amount"], 1999);
    assert_eq!(intent["currency"], "eur");
    assert_eq!(intent["capture_method"], "automatic");
    assert_eq!(intent["description"], "order 42");

    let posts: Vec<_> = h
        .gateway
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 2);
    assert_eq!(posts[0].path, paths::PAYMENT_METHODS);
    assert_eq!(
        posts[0].idempotency_key.as_deref(),
        Some(format!("{}-pm", charge_id("order-1")).as_str())
    );
    assert_eq!(posts[1].path, paths::PAYMENT_INTENTS);
    assert_eq!(
        posts[1].idempotency_key.as_deref(),
        Some(format!("{}-pi", charge_id("order-1")).as_str())
    );
    for post in &posts {
        assert_eq!(post.stripe_version.as_deref(), Some("2024-06-20"));
    }
}

#[tokio::test]
async fn stripe_sends_metadata_tagged_with_the_charge_id_and_a_card_without_cvc() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let pan = Pan::parse(cards::SUCCESS).unwrap();
    let metadata = [
        ("order".to_owned(), "42 & more".to_owned()),
        ("note".to_owned(), "ü=€".to_owned()),
    ];
    let outcome = stripe
        .charge(
            &card(&pan, None),
            &ChargeParams {
                metadata: &metadata,
                ..params("order-meta")
            },
        )
        .await;
    assert_eq!(outcome.status, ChargeStatus::Succeeded, "{outcome:?}");
    let intent = h
        .gateway
        .payment_intent(outcome.payment_id.as_deref().unwrap())
        .unwrap();
    assert_eq!(
        intent["metadata"],
        json!({"order": "42 & more", "note": "ü=€", "cardvault_charge_id": charge_id("order-meta").as_str()}),
        "the caller's metadata, then the charge id"
    );
}

#[tokio::test]
async fn stripe_maps_every_declining_test_card_to_its_decline_code() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    for (digits, decline_code, message) in [
        (
            cards::DECLINED,
            "generic_decline",
            "Your card was declined.",
        ),
        (
            cards::INSUFFICIENT_FUNDS,
            "insufficient_funds",
            "Your card has insufficient funds.",
        ),
        (cards::EXPIRED, "expired_card", "Your card has expired."),
        (
            cards::INCORRECT_CVC,
            "incorrect_cvc",
            "Your card's security code is incorrect.",
        ),
        (
            cards::PROCESSING_ERROR,
            "processing_error",
            "An error occurred while processing your card. Try again in a little bit.",
        ),
    ] {
        let outcome = charge(stripe.as_ref(), digits, digits).await;
        assert_eq!(
            outcome.status,
            ChargeStatus::Declined,
            "{digits}: {outcome:?}"
        );
        assert_eq!(outcome.decline_code.as_deref(), Some(decline_code));
        assert_eq!(outcome.message.as_deref(), Some(message));
        assert_eq!(outcome.http_status, Some(402));
        let id = outcome.payment_id.expect("the declined PaymentIntent");
        assert_eq!(
            h.gateway.payment_intent(&id).unwrap()["status"],
            "requires_payment_method"
        );
    }
}

#[tokio::test]
async fn stripe_reports_a_card_needing_3ds_as_requires_action_with_its_next_action() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let outcome = charge(stripe.as_ref(), cards::REQUIRES_ACTION, "order-3ds").await;
    assert_eq!(outcome.status, ChargeStatus::RequiresAction, "{outcome:?}");
    let id = outcome.payment_id.clone().expect("the intent");
    let intent = h.gateway.payment_intent(&id).expect("stored");
    let action = outcome.action.expect("what the front end needs");
    assert_eq!(
        action.kind.as_deref(),
        intent["next_action"]["type"].as_str()
    );
    let secret = action.client_secret.as_deref().expect("a client secret");
    assert!(secret.starts_with(&format!("{id}_secret_")), "{secret}");
    assert_eq!(Some(secret), intent["client_secret"].as_str());
    let details: Value = serde_json::from_str(action.details_json.as_deref().unwrap()).unwrap();
    assert_eq!(details, intent["next_action"]);
}

#[tokio::test]
async fn the_charge_id_can_go_into_the_description_too() {
    let h = Harness::start().await;
    let stripe = connector(GatewaySettings {
        charge_id_in_description: true,
        ..h.stripe()
    });
    let pan = Pan::parse(cards::SUCCESS).unwrap();
    for (key, description, expected) in [
        ("ch_desc1", "order 42", "order 42 [ch_00000000000desc1]"),
        ("ch_desc2", "", "ch_00000000000desc2"),
    ] {
        let outcome = stripe
            .charge(
                &card(&pan, Some("123")),
                &ChargeParams {
                    description,
                    ..params(key)
                },
            )
            .await;
        assert_eq!(outcome.status, ChargeStatus::Succeeded, "{outcome:?}");
        let intent = h
            .gateway
            .payment_intent(outcome.payment_id.as_deref().unwrap())
            .unwrap();
        assert_eq!(intent["description"], expected);
    }
}

#[tokio::test]
async fn stripe_manual_capture_is_an_authorization_reported_as_succeeded() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let pan = Pan::parse(cards::SUCCESS).unwrap();
    let outcome = stripe
        .charge(
            &card(&pan, Some("123")),
            &ChargeParams {
                capture: Capture::Manual,
                ..params("order-auth")
            },
        )
        .await;
    assert_eq!(outcome.status, ChargeStatus::Succeeded, "{outcome:?}");
    let intent = h
        .gateway
        .payment_intent(outcome.payment_id.as_deref().unwrap())
        .unwrap();
    assert_eq!(intent["status"], "requires_capture");
    assert_eq!(intent["capture_method"], "manual");
}

#[tokio::test]
async fn the_same_idempotency_key_twice_makes_one_payment_intent() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let first = charge(stripe.as_ref(), cards::SUCCESS, "order-twice").await;
    let second = charge(stripe.as_ref(), cards::SUCCESS, "order-twice").await;
    assert_eq!(first.status, ChargeStatus::Succeeded);
    assert_eq!(second, first, "the re-send gets the same answer");

    let stats = h.gateway.stats();
    assert_eq!(stats.posts_to(paths::PAYMENT_INTENTS), 2);
    assert_eq!(
        stats.executed_on(paths::PAYMENT_INTENTS),
        1,
        "one PaymentIntent"
    );
    assert_eq!(stats.executed_on(paths::PAYMENT_METHODS), 1);
    assert_eq!(stats.replays, 2);

    let other = charge(stripe.as_ref(), cards::SUCCESS, "order-other").await;
    assert_ne!(
        other.payment_id, first.payment_id,
        "a new key is a new charge"
    );
}

#[tokio::test]
async fn reusing_a_key_with_other_parameters_is_refused_without_a_second_charge() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let pan = Pan::parse(cards::SUCCESS).unwrap();
    let first = stripe
        .charge(&card(&pan, Some("123")), &params("order-reuse"))
        .await;
    assert_eq!(first.status, ChargeStatus::Succeeded);
    let changed = stripe
        .charge(
            &card(&pan, Some("123")),
            &ChargeParams {
                amount: 5000,
                ..params("order-reuse")
            },
        )
        .await;
    assert_eq!(changed.status, ChargeStatus::Failed, "{changed:?}");
    assert!(changed.message.unwrap().contains("same parameters"));
    assert_eq!(h.gateway.stats().executed_on(paths::PAYMENT_INTENTS), 1);
}

#[tokio::test]
async fn a_timeout_is_unknown_and_a_resend_with_the_same_key_settles_it() {
    let h = Harness::start().await;
    let stripe = connector(GatewaySettings {
        timeout_ms: SHORT_TIMEOUT_MS,
        ..h.stripe()
    });

    let timed_out = charge(stripe.as_ref(), cards::HANG, "order-hang").await;
    assert_eq!(timed_out.status, ChargeStatus::Unknown, "{timed_out:?}");
    assert_eq!(timed_out.message.as_deref(), Some("gateway timed out"));
    assert_eq!(timed_out.http_status, None);

    // Still running at the gateway: Stripe says so (409), which is still unknown.
    let busy = charge(stripe.as_ref(), cards::HANG, "order-hang").await;
    assert_eq!(busy.status, ChargeStatus::Unknown, "{busy:?}");
    assert_eq!(busy.http_status, Some(409));

    tokio::time::sleep(HANG + Duration::from_millis(300)).await;
    let settled = charge(stripe.as_ref(), cards::HANG, "order-hang").await;
    assert_eq!(settled.status, ChargeStatus::Succeeded, "{settled:?}");
    assert_eq!(
        h.gateway.stats().executed_on(paths::PAYMENT_INTENTS),
        1,
        "the timed-out attempt was the only charge"
    );
}

#[tokio::test]
async fn a_409_while_the_first_request_runs_is_unknown_and_the_charge_settles_once() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let first = {
        let stripe = stripe.clone();
        tokio::spawn(async move { charge(stripe.as_ref(), cards::HANG, "order-busy").await })
    };
    // The second send goes out once the first has reached the PaymentIntent step.
    while h.gateway.stats().posts_to(paths::PAYMENT_INTENTS) == 0 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let busy = charge(stripe.as_ref(), cards::HANG, "order-busy").await;
    assert_eq!(busy.status, ChargeStatus::Unknown, "{busy:?}");
    assert_eq!(busy.http_status, Some(409));
    assert!(
        busy.message
            .as_deref()
            .unwrap_or("")
            .contains("in-progress"),
        "Stripe's own words: {busy:?}"
    );

    let settled = first.await.expect("first send");
    assert_eq!(settled.status, ChargeStatus::Succeeded, "{settled:?}");
    assert_eq!(h.gateway.stats().executed_on(paths::PAYMENT_INTENTS), 1);
    let found = stripe
        .lookup(&ChargeRef {
            charge_id: charge_id("order-busy"),
            payment_id: settled.payment_id.as_deref(),
            amount: 1999,
            currency: eur(),
        })
        .await;
    match found {
        Lookup::Found(outcome) => {
            assert_eq!(outcome.status, ChargeStatus::Succeeded);
            assert_eq!(outcome.payment_id, settled.payment_id);
        }
        other => panic!("expected the intent, got {other:?}"),
    }
}

#[tokio::test]
async fn a_resend_whose_payment_method_step_differs_is_unknown_not_failed() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let pan = Pan::parse(cards::SUCCESS).unwrap();
    let first = stripe
        .charge(&card(&pan, Some("123")), &params("order-lapsed"))
        .await;
    assert_eq!(first.status, ChargeStatus::Succeeded, "{first:?}");

    // The CVC hold lapsed: the re-send's PaymentMethod step has no card[cvc], Stripe refuses
    // the key for other parameters — which says nothing about the PaymentIntent.
    let resent = stripe
        .charge(
            &card(&pan, None),
            &ChargeParams {
                resend: true,
                ..params("order-lapsed")
            },
        )
        .await;
    assert_eq!(resent.status, ChargeStatus::Unknown, "{resent:?}");
    assert_eq!(resent.http_status, Some(400));
    let message = resent.message.unwrap();
    assert!(
        message.contains("same parameters") && message.contains("may have charged"),
        "{message}"
    );

    // The same answer on a first send does prove nothing was charged under this key.
    let first_send = stripe
        .charge(&card(&pan, None), &params("order-lapsed"))
        .await;
    assert_eq!(first_send.status, ChargeStatus::Failed, "{first_send:?}");

    // A re-send with the first send's exact parameters gets Stripe's saved answers.
    let replay = stripe
        .charge(
            &card(&pan, Some("123")),
            &ChargeParams {
                resend: true,
                ..params("order-lapsed")
            },
        )
        .await;
    assert_eq!(replay.status, ChargeStatus::Succeeded, "{replay:?}");
    assert_eq!(replay.payment_id, first.payment_id);
    assert_eq!(h.gateway.stats().executed_on(paths::PAYMENT_INTENTS), 1);
}

#[tokio::test]
async fn a_resend_that_cannot_reach_the_gateway_is_unknown() {
    let h = Harness::start().await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let stripe = connector(GatewaySettings {
        base_url: url,
        ..h.stripe()
    });
    let first = charge(stripe.as_ref(), cards::SUCCESS, "order-gone").await;
    assert_eq!(first.status, ChargeStatus::Failed, "{first:?}");
    let pan = Pan::parse(cards::SUCCESS).unwrap();
    let resent = stripe
        .charge(
            &card(&pan, Some("123")),
            &ChargeParams {
                resend: true,
                ..params("order-gone")
            },
        )
        .await;
    assert_eq!(resent.status, ChargeStatus::Unknown, "{resent:?}");
}

#[tokio::test]
async fn lookup_by_payment_id_finds_the_intent_or_proves_there_is_none() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let charged = charge(stripe.as_ref(), cards::SUCCESS, "order-look").await;
    let id = charged.payment_id.clone().expect("an intent");
    let reference = ChargeRef {
        charge_id: charge_id("order-look"),
        payment_id: Some(&id),
        amount: 1999,
        currency: eur(),
    };
    assert_eq!(
        stripe.lookup(&reference).await,
        Lookup::Found(charged.clone())
    );

    match stripe
        .lookup(&ChargeRef {
            payment_id: Some("pi_NoSuchIntent"),
            ..reference
        })
        .await
    {
        Lookup::NotFound { evidence } => assert!(
            evidence.contains("pi_NoSuchIntent") && evidence.contains("404"),
            "{evidence}"
        ),
        other => panic!("expected not found, got {other:?}"),
    }
    match stripe
        .lookup(&ChargeRef {
            amount: 2000,
            ..reference
        })
        .await
    {
        Lookup::Unavailable { reason } => {
            assert!(
                reason.contains("operator") && reason.contains(&id),
                "{reason}"
            );
        }
        other => panic!("another amount is not this charge: {other:?}"),
    }
    assert!(matches!(
        stripe
            .lookup(&ChargeRef {
                payment_id: Some("pi_1/../../v1/refunds"),
                ..reference
            })
            .await,
        Lookup::Unavailable { .. }
    ));
    let gets: Vec<_> = h
        .gateway
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    assert_eq!(gets.len(), 3, "the odd id was never sent");
    assert!(gets.iter().all(|r| r.idempotency_key.is_none()));
}

/// A charge the vault has no payment id for.
fn by_charge_id(name: &str) -> ChargeRef<'static> {
    ChargeRef {
        charge_id: charge_id(name),
        payment_id: None,
        amount: 1999,
        currency: eur(),
    }
}

#[tokio::test]
async fn lookup_by_search_finds_a_charge_whose_answer_was_lost_and_proves_an_absent_one() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let lost = charge(stripe.as_ref(), cards::ANSWER_LOST, "order-lost").await;
    assert_eq!(lost.status, ChargeStatus::Unknown, "{lost:?}");
    assert_eq!(lost.http_status, Some(500));
    // Re-sending only replays Stripe's saved 500: asking is the way to learn the truth.
    let pan = Pan::parse(cards::ANSWER_LOST).unwrap();
    let replayed = stripe
        .charge(
            &card(&pan, Some("123")),
            &ChargeParams {
                resend: true,
                ..params("order-lost")
            },
        )
        .await;
    assert_eq!(replayed.status, ChargeStatus::Unknown, "{replayed:?}");

    let found = stripe.lookup(&by_charge_id("order-lost")).await;
    let Lookup::Found(outcome) = found else {
        panic!("expected the intent, got {found:?}");
    };
    assert_eq!(outcome.status, ChargeStatus::Succeeded);
    let intents = h
        .gateway
        .payment_intents_with_metadata("cardvault_charge_id", charge_id("order-lost").as_str());
    assert_eq!(intents.len(), 1);
    assert_eq!(outcome.payment_id.as_deref(), intents[0]["id"].as_str());

    match stripe.lookup(&by_charge_id("order-never-sent")).await {
        Lookup::NotFound { evidence } => assert_eq!(
            evidence,
            "GET /v1/payment_intents/search query=metadata['cardvault_charge_id']:'ch_00orderneversent' → HTTP 200, 0 results"
        ),
        other => panic!("expected not found, got {other:?}"),
    }
    let search = h
        .gateway
        .requests()
        .into_iter()
        .rfind(|r| r.method == "GET")
        .expect("the search");
    assert_eq!(search.path, paths::PAYMENT_INTENTS_SEARCH);
}

#[tokio::test]
async fn lookup_while_the_gateway_is_still_processing_is_found_but_unknown() {
    let h = Harness::start().await;
    let stripe = connector(GatewaySettings {
        timeout_ms: SHORT_TIMEOUT_MS,
        ..h.stripe()
    });
    let timed_out = charge(stripe.as_ref(), cards::HANG, "order-processing").await;
    assert_eq!(timed_out.status, ChargeStatus::Unknown);
    let patient = connector(h.stripe());
    match patient.lookup(&by_charge_id("order-processing")).await {
        Lookup::Found(outcome) => {
            assert_eq!(outcome.status, ChargeStatus::Unknown, "{outcome:?}");
            assert_eq!(outcome.message.as_deref(), Some("payment is processing"));
        }
        other => panic!("expected the processing intent, got {other:?}"),
    }
    let give_up = std::time::Instant::now() + 4 * HANG;
    loop {
        match patient.lookup(&by_charge_id("order-processing")).await {
            Lookup::Found(outcome) if outcome.status == ChargeStatus::Unknown => {
                assert!(
                    std::time::Instant::now() < give_up,
                    "the hang card settles after its hang"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Lookup::Found(outcome) => {
                assert_eq!(outcome.status, ChargeStatus::Succeeded, "{outcome:?}");
                break;
            }
            other => panic!("expected the intent, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn after_the_gateway_forgot_the_key_a_lookup_still_finds_the_payment() {
    let ttl = Duration::from_millis(500);
    let h = Harness::start_forgetting_keys_after(ttl).await;
    let stripe = connector(h.stripe());
    let lost = charge(stripe.as_ref(), cards::ANSWER_LOST, "order-pruned").await;
    assert_eq!(lost.status, ChargeStatus::Unknown);
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;

    // What the vault does: ask, and find the payment, so it never re-sends.
    let Lookup::Found(found) = stripe.lookup(&by_charge_id("order-pruned")).await else {
        panic!("the payment is found by its tag");
    };
    assert_eq!(found.status, ChargeStatus::Succeeded);

    // What re-sending would have done: a second PaymentIntent. A lookup then reports the one
    // that charged, whichever it is.
    let second = charge(stripe.as_ref(), cards::SUCCESS, "order-pruned").await;
    assert_eq!(second.status, ChargeStatus::Succeeded, "{second:?}");
    let intents = h
        .gateway
        .payment_intents_with_metadata("cardvault_charge_id", charge_id("order-pruned").as_str());
    assert_eq!(intents.len(), 2, "the hazard the window guards against");
    let Lookup::Found(either) = stripe.lookup(&by_charge_id("order-pruned")).await else {
        panic!("found");
    };
    assert_eq!(either.status, ChargeStatus::Succeeded);
    let logs = String::from_utf8(logs().0.lock().unwrap().clone()).unwrap();
    for intent in &intents {
        let id = intent["id"].as_str().unwrap();
        assert!(
            logs.lines()
                .any(|l| l.contains("several payment intents") && l.contains(id)),
            "the warning names {id}"
        );
    }
}

#[tokio::test]
async fn lookup_of_an_unreachable_gateway_is_unavailable_and_generic_without_lookup_path_unsupported()
 {
    let h = Harness::start().await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let stripe = connector(GatewaySettings {
        base_url: url,
        ..h.stripe()
    });
    let reference = ChargeRef {
        charge_id: charge_id("order-x"),
        payment_id: Some("pi_1"),
        amount: 1999,
        currency: eur(),
    };
    assert!(matches!(
        stripe.lookup(&reference).await,
        Lookup::Unavailable { .. }
    ));
    let generic = connector(h.generic_at(paths::GENERIC_CHARGES));
    assert_eq!(generic.lookup(&reference).await, Lookup::Unsupported);
    assert!(!generic.supports(OperationKind::Refund));
    let refused = generic
        .operate(&Operation {
            kind: OperationKind::Refund,
            payment_id: "p_1",
            amount: None,
            currency: eur(),
            charge_id: charge_id("order-x"),
            operation_id: operation_id("op_1"),
        })
        .await;
    assert_eq!(refused.status, OperationStatus::Failed);
    assert!(stripe.supports(OperationKind::Capture) && stripe.supports(OperationKind::Cancel));
}

#[tokio::test]
async fn a_configured_endive_version_charges_with_its_own_parameter_names() {
    let h = Harness::start().await;
    for version in ["2026-09-30.endive", "2026-10-28.endive"] {
        let stripe = connector(GatewaySettings {
            stripe_version: Some(version.to_owned()),
            ..h.stripe()
        });
        let outcome = charge(stripe.as_ref(), cards::SUCCESS, version).await;
        assert_eq!(
            outcome.status,
            ChargeStatus::Succeeded,
            "{version}: {outcome:?}"
        );
        let intent = h
            .gateway
            .payment_intent(outcome.payment_id.as_deref().unwrap())
            .unwrap();
        assert_eq!(intent["status"], "succeeded");
    }
    let posts: Vec<_> = h
        .gateway
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 4);
    assert!(
        posts[..2]
            .iter()
            .all(|p| p.stripe_version.as_deref() == Some("2026-09-30.endive"))
    );
    assert!(
        posts[2..]
            .iter()
            .all(|p| p.stripe_version.as_deref() == Some("2026-10-28.endive"))
    );
}

#[tokio::test]
async fn an_unknown_stripe_version_is_refused_at_start_up() {
    let h = Harness::start().await;
    let err = Gateways::from_settings(&[GatewaySettings {
        stripe_version: Some("2025-03-31.basil".to_owned()),
        ..h.stripe()
    }])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("2025-03-31.basil") && err.contains("2024-06-20, 2026-09-30.endive"),
        "{err}"
    );
}

#[tokio::test]
async fn the_resend_window_follows_the_setting_and_needs_the_key_at_the_gateway() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    assert_eq!(stripe.resend_window(), Some(Duration::from_secs(23 * 3600)));
    let short = connector(GatewaySettings {
        idempotency_window_secs: 120,
        ..h.stripe()
    });
    assert_eq!(short.resend_window(), Some(Duration::from_secs(120)));
    let keyless = connector(h.generic_at(paths::GENERIC_CHARGES));
    assert_eq!(keyless.resend_window(), None, "the key never reaches it");
    let keyed = connector(GatewaySettings {
        idempotency_header: Some("Idempotency-Key".to_owned()),
        idempotency_window_secs: 3600,
        ..h.generic_at(paths::GENERIC_CHARGES)
    });
    assert_eq!(keyed.resend_window(), Some(Duration::from_secs(3600)));
}

/// A Stripe-shaped server whose two charge steps each take `delay`.
async fn slow_stripe(pki: &pki::Pki, delay: Duration) -> String {
    let app = Router::new()
        .route(
            "/v1/payment_methods",
            post(move || async move {
                tokio::time::sleep(delay).await;
                json!({"id": "pm_slow", "object": "payment_method"}).to_string()
            }),
        )
        .route(
            "/v1/payment_intents",
            post(move || async move {
                tokio::time::sleep(delay).await;
                json!({"id": "pi_slow", "object": "payment_intent", "status": "succeeded",
                       "amount": 1999, "currency": "eur"})
                .to_string()
            }),
        );
    serve_tls(pki, app).await
}

/// Serves `app` over TLS with the test PKI's server certificate; its base URL.
async fn serve_tls(pki: &pki::Pki, app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = ReloadingAcceptor::new(
        TlsFiles {
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            client_ca_file: None,
        },
        ClientAuth::None,
        &[tls::ALPN_HTTP1],
    )
    .unwrap();
    let listener = TlsListener::new(listener, acceptor, Duration::from_secs(5));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("https://{addr}")
}

/// A capture, cancel or refund of `payment_id` under `key`.
fn operation<'a>(
    kind: OperationKind,
    payment_id: &'a str,
    amount: Option<u64>,
    key: &'a str,
) -> Operation<'a> {
    Operation {
        kind,
        payment_id,
        amount,
        currency: eur(),
        charge_id: charge_id("ch_lifecycle"),
        operation_id: operation_id(key),
    }
}

#[tokio::test]
async fn capture_refund_and_cancel_through_the_test_gateway_are_idempotent() {
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let pan = Pan::parse(cards::SUCCESS).unwrap();
    let manual = |key| ChargeParams {
        capture: Capture::Manual,
        ..params(key)
    };
    let authorized = stripe
        .charge(&card(&pan, Some("123")), &manual("order-capture"))
        .await;
    assert_eq!(authorized.status, ChargeStatus::Succeeded, "{authorized:?}");
    let id = authorized.payment_id.expect("the intent");

    let capture = operation(OperationKind::Capture, &id, Some(1500), "op_capture");
    let captured = stripe.operate(&capture).await;
    assert_eq!(captured.status, OperationStatus::Succeeded, "{captured:?}");
    assert_eq!(
        (captured.gateway_id.as_deref(), captured.amount),
        (Some(id.as_str()), Some(1500))
    );
    assert_eq!(
        stripe.operate(&capture).await,
        captured,
        "a replay, not a second capture"
    );
    let intent = h.gateway.payment_intent(&id).unwrap();
    assert_eq!(
        (
            intent["status"].as_str(),
            intent["amount_received"].as_u64()
        ),
        (Some("succeeded"), Some(1500))
    );
    let other_amount = stripe
        .operate(&operation(
            OperationKind::Capture,
            &id,
            Some(1000),
            "op_capture",
        ))
        .await;
    assert_eq!(
        other_amount.status,
        OperationStatus::Failed,
        "{other_amount:?}"
    );

    let refund = operation(OperationKind::Refund, &id, Some(500), "op_refund");
    let refunded = stripe.operate(&refund).await;
    assert_eq!(refunded.status, OperationStatus::Succeeded, "{refunded:?}");
    let refund_id = refunded.gateway_id.clone().expect("re_…");
    assert!(refund_id.starts_with("re_"), "{refund_id}");
    assert_eq!(refunded.amount, Some(500));
    assert_eq!(
        stripe.operate(&refund).await,
        refunded,
        "a replay, not a second refund"
    );
    let refunds = h.gateway.refunds_of(&id);
    assert_eq!(refunds.len(), 1);
    assert_eq!(
        refunds[0]["metadata"]["cardvault_charge_id"],
        charge_id("ch_lifecycle").as_str()
    );
    let too_much = stripe
        .operate(&operation(
            OperationKind::Refund,
            &id,
            Some(5000),
            "op_refund_2",
        ))
        .await;
    assert_eq!(too_much.status, OperationStatus::Failed, "{too_much:?}");
    assert!(too_much.message.is_some());

    let other = stripe
        .charge(&card(&pan, Some("123")), &manual("order-cancel"))
        .await;
    let other_id = other.payment_id.expect("the intent");
    let cancel = operation(OperationKind::Cancel, &other_id, None, "op_cancel");
    let canceled = stripe.operate(&cancel).await;
    assert_eq!(canceled.status, OperationStatus::Succeeded, "{canceled:?}");
    assert_eq!(stripe.operate(&cancel).await, canceled);
    assert_eq!(
        h.gateway.payment_intent(&other_id).unwrap()["status"],
        "canceled"
    );
    let late = stripe
        .operate(&operation(
            OperationKind::Capture,
            &other_id,
            None,
            "op_capture_late",
        ))
        .await;
    assert_eq!(late.status, OperationStatus::Failed, "{late:?}");
}

/// One request a [`stripe_operations_server`] received.
#[derive(Debug, Clone)]
struct OperationRequest {
    path: String,
    idempotency_key: Option<String>,
    form: Vec<(String, String)>,
}

/// A Stripe-shaped server for capture, cancel and refund: `pi_busy` is answered 409, `pi_gone`
/// 400, `pi_down` 503; anything else as Stripe does when it worked.
async fn stripe_operations_server(pki: &pki::Pki) -> (String, Arc<Mutex<Vec<OperationRequest>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    let app = Router::new().fallback(post(
        move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
            let log = log.clone();
            async move {
                let form: Vec<(String, String)> = url_form(&body);
                let path = uri.path().to_owned();
                log.lock().unwrap().push(OperationRequest {
                    path: path.clone(),
                    idempotency_key: headers
                        .get("idempotency-key")
                        .map(|v| v.to_str().unwrap().to_owned()),
                    form: form.clone(),
                });
                let field = |name: &str| {
                    form.iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                };
                let intent = path
                    .strip_prefix("/v1/payment_intents/")
                    .and_then(|rest| rest.split('/').next())
                    .map(str::to_owned)
                    .or_else(|| field("payment_intent"))
                    .unwrap_or_default();
                let (status, answer) = match intent.as_str() {
                    "pi_busy" => (
                        StatusCode::CONFLICT,
                        json!({"error": {"type": "invalid_request_error",
                                         "code": "idempotency_key_in_use",
                                         "message": "There is currently another in-progress request using this Idempotent Key"}}),
                    ),
                    "pi_gone" => (
                        StatusCode::BAD_REQUEST,
                        json!({"error": {"type": "invalid_request_error",
                                         "code": "payment_intent_unexpected_state",
                                         "message": "This PaymentIntent's status is canceled."}}),
                    ),
                    "pi_down" => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"error": {"type": "api_error", "message": "try later"}}),
                    ),
                    _ if path.ends_with("/capture") => (
                        StatusCode::OK,
                        json!({"id": intent, "object": "payment_intent", "status": "succeeded",
                               "amount_received": field("amount_to_capture")
                                   .map_or(1999, |a| a.parse::<u64>().unwrap())}),
                    ),
                    _ if path.ends_with("/cancel") => (
                        StatusCode::OK,
                        json!({"id": intent, "object": "payment_intent", "status": "canceled"}),
                    ),
                    _ => (
                        StatusCode::OK,
                        json!({"id": "re_1", "object": "refund", "status": "pending",
                               "amount": field("amount").map_or(1999, |a| a.parse::<u64>().unwrap())}),
                    ),
                };
                (status, answer.to_string())
            }
        },
    ));
    (serve_tls(pki, app).await, received)
}

/// A form body's pairs, decoded.
fn url_form(body: &[u8]) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{}", String::from_utf8_lossy(body)))
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[tokio::test]
async fn stripe_capture_cancel_and_refund_send_the_documented_requests() {
    let h = Harness::start().await;
    let (url, received) = stripe_operations_server(&h.pki).await;
    let stripe = connector(GatewaySettings {
        base_url: url,
        ..h.stripe()
    });
    let operation = |kind, payment_id, amount, key| Operation {
        kind,
        payment_id,
        amount,
        currency: eur(),
        charge_id: charge_id("ch_ops"),
        operation_id: operation_id(key),
    };
    let captured = stripe
        .operate(&operation(
            OperationKind::Capture,
            "pi_ok",
            Some(1500),
            "op_1",
        ))
        .await;
    assert_eq!(captured.status, OperationStatus::Succeeded, "{captured:?}");
    assert_eq!(
        (captured.gateway_id.as_deref(), captured.amount),
        (Some("pi_ok"), Some(1500))
    );
    let canceled = stripe
        .operate(&operation(OperationKind::Cancel, "pi_ok", None, "op_2"))
        .await;
    assert_eq!(canceled.status, OperationStatus::Succeeded, "{canceled:?}");
    let refunded = stripe
        .operate(&operation(
            OperationKind::Refund,
            "pi_ok",
            Some(700),
            "op_3",
        ))
        .await;
    assert_eq!(
        refunded.status,
        OperationStatus::Succeeded,
        "pending counts"
    );
    assert_eq!(
        (refunded.gateway_id.as_deref(), refunded.amount),
        (Some("re_1"), Some(700))
    );

    let requests = received.lock().unwrap().clone();
    let shape: Vec<_> = requests
        .iter()
        .map(|r| {
            (
                r.path.as_str(),
                r.idempotency_key.as_deref(),
                r.form.clone(),
            )
        })
        .collect();
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    assert_eq!(
        shape,
        [
            (
                "/v1/payment_intents/pi_ok/capture",
                Some(operation_id("op_1").as_str()),
                pairs(&[("amount_to_capture", "1500")])
            ),
            (
                "/v1/payment_intents/pi_ok/cancel",
                Some(operation_id("op_2").as_str()),
                vec![],
            ),
            (
                "/v1/refunds",
                Some(operation_id("op_3").as_str()),
                pairs(&[
                    ("payment_intent", "pi_ok"),
                    ("amount", "700"),
                    (
                        "metadata[cardvault_charge_id]",
                        charge_id("ch_ops").as_str()
                    )
                ])
            ),
        ]
    );

    for (payment_id, status) in [
        ("pi_busy", OperationStatus::Unknown),
        ("pi_down", OperationStatus::Unknown),
        ("pi_gone", OperationStatus::Failed),
    ] {
        let outcome = stripe
            .operate(&operation(OperationKind::Refund, payment_id, None, "op_4"))
            .await;
        assert_eq!(outcome.status, status, "{payment_id}: {outcome:?}");
        assert!(outcome.message.is_some());
    }
    let refused = stripe
        .operate(&operation(
            OperationKind::Capture,
            "pi_../refunds",
            None,
            "op_5",
        ))
        .await;
    assert_eq!(refused.status, OperationStatus::Failed);
    assert_eq!(
        received.lock().unwrap().len(),
        6,
        "the odd id was never sent"
    );
}

#[tokio::test]
async fn timeout_ms_bounds_both_stripe_steps_together() {
    let h = Harness::start().await;
    let step = Duration::from_millis(400);
    let url = slow_stripe(&h.pki, step).await;
    // Each step alone fits in the timeout; both together do not.
    let stripe = connector(GatewaySettings {
        base_url: url.clone(),
        timeout_ms: 650,
        ..h.stripe()
    });
    let outcome = charge(stripe.as_ref(), cards::SUCCESS, "order-slow").await;
    assert_eq!(outcome.status, ChargeStatus::Unknown, "{outcome:?}");
    assert_eq!(outcome.message.as_deref(), Some("gateway timed out"));

    let roomy = connector(GatewaySettings {
        base_url: url,
        timeout_ms: 3_000,
        ..h.stripe()
    });
    let outcome = charge(roomy.as_ref(), cards::SUCCESS, "order-slow-2").await;
    assert_eq!(outcome.status, ChargeStatus::Succeeded, "{outcome:?}");
}

#[tokio::test]
async fn a_wrong_secret_key_fails_without_echoing_the_key() {
    let h = Harness::start().await;
    let wrong = h.dir.path().join("wrong-secret");
    write_secret(&wrong, "sk_test_wrong_key_0123456789");
    let stripe = connector(GatewaySettings {
        secret_file: Some(wrong),
        ..h.stripe()
    });
    let outcome = charge(stripe.as_ref(), cards::SUCCESS, "order-auth-fail").await;
    assert_eq!(outcome.status, ChargeStatus::Failed, "{outcome:?}");
    assert_eq!(outcome.http_status, Some(401));
    let message = outcome.message.unwrap();
    assert!(message.contains("Invalid API Key"), "{message}");
    assert!(
        !message.contains("sk_test_wrong_key_0123456789"),
        "{message}"
    );
    assert_eq!(h.gateway.stats().executed_on(paths::PAYMENT_INTENTS), 0);
}

#[tokio::test]
async fn an_unreachable_gateway_fails_because_nothing_was_sent() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    write_secret(&secret, "sk_test_x");
    let stripe = connector(GatewaySettings {
        secret_file: Some(secret),
        ..GatewaySettings::new("stripe", GatewayKind::Stripe, &format!("https://{closed}"))
    });
    let outcome = charge(stripe.as_ref(), cards::SUCCESS, "order-closed").await;
    assert_eq!(outcome.status, ChargeStatus::Failed, "{outcome:?}");
    assert_eq!(
        outcome.message.as_deref(),
        Some("payment method not created: gateway unreachable")
    );
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_gateway_certificate_from_an_untrusted_ca_is_refused() {
    let h = Harness::start().await;
    // The built-in roots (no ca_file) do not know the test CA; neither does another CA.
    for ca_file in [None, Some(h.pki.other_ca_file.clone())] {
        let stripe = connector(GatewaySettings {
            ca_file,
            ..h.stripe()
        });
        let outcome = charge(stripe.as_ref(), cards::SUCCESS, "order-untrusted").await;
        assert_eq!(outcome.status, ChargeStatus::Failed, "{outcome:?}");
    }
    assert_eq!(h.gateway.stats().posts_to(paths::PAYMENT_METHODS), 0);
}

#[tokio::test]
async fn a_client_certificate_is_presented_when_configured() {
    let h = Harness::start_with(true).await;
    let (cert, key) = h.pki.client_cert("vault", None, "cardvault");
    let with_cert = connector(GatewaySettings {
        client_cert_file: Some(cert),
        client_key_file: Some(key),
        ..h.stripe()
    });
    let outcome = charge(with_cert.as_ref(), cards::SUCCESS, "order-mtls").await;
    assert_eq!(outcome.status, ChargeStatus::Succeeded, "{outcome:?}");

    let without = connector(h.stripe());
    let outcome = charge(without.as_ref(), cards::SUCCESS, "order-no-cert").await;
    assert_eq!(outcome.status, ChargeStatus::Failed, "{outcome:?}");
}

#[tokio::test]
async fn plain_http_works_only_for_a_loopback_test_gateway() {
    let gateway = TestGateway::start(TestGatewayOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    write_secret(&secret, gateway.secret_key());
    let settings = GatewaySettings {
        secret_file: Some(secret),
        ..GatewaySettings::new("stripe", GatewayKind::Stripe, &gateway.url())
    };
    assert!(gateway.url().starts_with("http://127.0.0.1:"));
    let err = Gateways::from_settings(std::slice::from_ref(&settings)).unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");

    let stripe = connector(GatewaySettings {
        loopback_test_gateway: true,
        ..settings
    });
    let outcome = charge(stripe.as_ref(), cards::SUCCESS, "order-http").await;
    assert_eq!(outcome.status, ChargeStatus::Succeeded, "{outcome:?}");
}

#[tokio::test]
async fn start_up_refuses_unreadable_tls_files_and_secrets() {
    let h = Harness::start().await;
    let missing = h.dir.path().join("missing.pem");
    let err = Gateways::from_settings(&[GatewaySettings {
        ca_file: Some(missing.clone()),
        ..h.stripe()
    }])
    .unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let err = Gateways::from_settings(&[GatewaySettings {
        secret_file: Some(missing),
        ..h.stripe()
    }])
    .unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let err = Gateways::from_settings(&[GatewaySettings {
        ca_file: Some(h.secret_file.clone()),
        ..h.stripe()
    }])
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("no certificate"), "{text}");
    assert!(!text.contains(h.gateway.secret_key()), "{text}");
}

// ---------------------------------------------------------------------------------------
// Outbound safety through the test gateway's misbehaving endpoints (generic connector)
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_redirect_is_refused_and_not_followed() {
    let h = Harness::start().await;
    let generic = connector(h.generic_at(paths::TEST_REDIRECT));
    let outcome = charge(generic.as_ref(), cards::SUCCESS, "order-redirect").await;
    assert_eq!(outcome.status, ChargeStatus::Unknown, "{outcome:?}");
    assert_eq!(outcome.http_status, Some(302));
    assert!(outcome.message.unwrap().contains("redirect"));
    let stats = h.gateway.stats();
    assert_eq!(stats.posts_to(paths::TEST_REDIRECT), 1);
    assert_eq!(stats.posts_to(paths::PAYMENT_INTENTS), 0, "not followed");
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_or_without_content_length() {
    let h = Harness::start().await;
    for path in [paths::TEST_HUGE, "/test/huge?chunked=true"] {
        let generic = connector(h.generic_at(path));
        let outcome = charge(generic.as_ref(), cards::SUCCESS, "order-huge").await;
        assert_eq!(outcome.status, ChargeStatus::Unknown, "{path}: {outcome:?}");
        assert_eq!(outcome.http_status, Some(200));
        assert!(outcome.message.unwrap().contains("too large"));
    }
    // The cap is the reason: with room for it, the same answer is read and mapped.
    let roomy = connector(GatewaySettings {
        max_response_bytes: 16 * 1024 * 1024,
        ..h.generic_at(paths::TEST_HUGE)
    });
    let outcome = charge(roomy.as_ref(), cards::SUCCESS, "order-huge").await;
    assert_eq!(outcome.status, ChargeStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.payment_id.as_deref(), Some("pi_huge"));
}

#[tokio::test]
async fn a_slow_generic_gateway_times_out_as_unknown() {
    let h = Harness::start().await;
    let generic = connector(GatewaySettings {
        timeout_ms: SHORT_TIMEOUT_MS,
        ..h.generic_at(paths::TEST_SLOW)
    });
    let outcome = charge(generic.as_ref(), cards::SUCCESS, "order-slow").await;
    assert_eq!(outcome.status, ChargeStatus::Unknown, "{outcome:?}");
    assert_eq!(outcome.message.as_deref(), Some("gateway timed out"));
}

// ---------------------------------------------------------------------------------------
// generic against a small JSON gateway started in the test, over TLS
// ---------------------------------------------------------------------------------------

/// What the JSON gateway received.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

/// A JSON gateway on `POST /charges`: `4000000000000002` is refused (402, with the card
/// number echoed in its message, as a careless gateway might), `4000000000000069` is
/// pending, anything else approved. Form bodies are always approved.
async fn json_gateway(pki: &pki::Pki) -> (String, Arc<Mutex<Vec<Received>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    let app = Router::new().route(
        "/charges",
        post(move |headers: HeaderMap, body: Bytes| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(Received {
                    headers: headers.clone(),
                    body: body.clone(),
                });
                let Ok(request) = serde_json::from_slice::<Value>(&body) else {
                    return (
                        StatusCode::OK,
                        json!({"payment": {"id": "pay_form", "state": "APPROVED"}}).to_string(),
                    );
                };
                let number = request["card"]["number"].as_str().unwrap_or_default();
                let (status, answer) = match number {
                    "4000000000000002" => (
                        StatusCode::PAYMENT_REQUIRED,
                        json!({"payment": {"id": "pay_2", "state": "REFUSED"},
                               "error": {"code": "05", "message": format!("Do not honor: card {number}")}}),
                    ),
                    "4000000000000069" => (
                        StatusCode::OK,
                        json!({"payment": {"id": "pay_3", "state": "PENDING"}}),
                    ),
                    "4000002500003155" => (
                        StatusCode::OK,
                        json!({"payment": {"id": "pay_4", "state": "CHALLENGE"},
                               "challenge": {"client_secret": "cs_4", "url": "https://acs.example/4",
                                             "method": "GET", "echo": format!("card {number}")}}),
                    ),
                    _ => (
                        StatusCode::CREATED,
                        json!({"payment": {"id": "pay_1", "state": "APPROVED"}}),
                    ),
                };
                (status, answer.to_string())
            }
        }),
    );
    let lookups = received.clone();
    let app = app.route(
        "/lookup/{reference}",
        get(move |Path(reference): Path<String>, headers: HeaderMap| {
            let log = lookups.clone();
            async move {
                log.lock().unwrap().push(Received {
                    headers,
                    body: Bytes::new(),
                });
                let (status, answer) = match reference.as_str() {
                    r if r == charge_id("order-g1").as_str() => (
                        StatusCode::OK,
                        json!({"payment": {"id": "pay_1", "state": "APPROVED"},
                                   "error": {"message": "paid with 4242 4242 4242 4242"}}),
                    ),
                    r if r == charge_id("order-g3").as_str() => (
                        StatusCode::OK,
                        json!({"payment": {"id": "pay_3", "state": "PENDING"}}),
                    ),
                    r if r == charge_id("order-broken").as_str() => {
                        (StatusCode::SERVICE_UNAVAILABLE, json!({}))
                    }
                    _ => (StatusCode::NOT_FOUND, json!({"error": "no such payment"})),
                };
                (status, answer.to_string())
            }
        }),
    );
    (serve_tls(pki, app).await, received)
}

/// The documented example of a generic JSON gateway, from TOML.
fn generic_json_settings(url: &str, pki: &pki::Pki, secret_file: &std::path::Path) -> String {
    format!(
        r#"
        name = "acme"
        kind = "generic"
        base_url = "{url}"
        ca_file = "{ca}"
        secret_file = "{secret}"
        path = "/charges"
        headers = {{ Authorization = "Bearer {{{{secret}}}}", X-Amount = "{{{{amount}}}} {{{{currency}}}}" }}
        idempotency_header = "Idempotency-Key"
        body = '''{{"amount": {{{{amount}}}}, "currency": "{{{{currency}}}}", "capture": "{{{{capture}}}}",
                  "description": "{{{{description}}}}", "reference": "{{{{idempotency_key}}}}",
                  "card": {{"number": "{{{{card.number}}}}", "exp_month": {{{{card.exp_month}}}},
                           "exp_year": {{{{card.exp_year}}}}, "cvc": "{{{{card.cvc}}}}",
                           "holder": "{{{{card.holder}}}}"}}}}'''
        status_pointer = "/payment/state"
        status_map = {{ APPROVED = "succeeded", REFUSED = "declined", CHALLENGE = "requires_action" }}
        payment_id_pointer = "/payment/id"
        decline_code_pointer = "/error/code"
        message_pointer = "/error/message"
        client_secret_pointer = "/challenge/client_secret"
        redirect_url_pointer = "/challenge/url"
        next_action_pointer = "/challenge"
        lookup_path = "/lookup/{{{{idempotency_key}}}}"
        "#,
        ca = pki.ca_file.display(),
        secret = secret_file.display(),
    )
}

#[tokio::test]
async fn generic_renders_the_json_template_with_escaping_headers_and_idempotency() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new(dir.path());
    let (url, received) = json_gateway(&pki).await;
    let secret = dir.path().join("acme-secret");
    write_secret(&secret, "acme_live_key\n");
    let settings: GatewaySettings =
        toml::from_str(&generic_json_settings(&url, &pki, &secret)).expect("parse TOML");
    let acme = connector(settings);

    let pan = Pan::parse(cards::SUCCESS).unwrap();
    let outcome = acme
        .charge(
            &ChargeCard {
                holder: Some("Dr. \"Ada\" O'Brien\\"),
                ..card(&pan, Some("123"))
            },
            &ChargeParams {
                description: "line1\nline2 \u{1}",
                ..params("order-g1")
            },
        )
        .await;
    assert_eq!(
        outcome,
        Outcome {
            status: ChargeStatus::Succeeded,
            payment_id: Some("pay_1".to_owned()),
            decline_code: None,
            message: None,
            http_status: Some(201),
            action: None,
        }
    );

    let received = received.lock().unwrap()[0].clone();
    let body: Value = serde_json::from_slice(&received.body).expect("valid JSON on the wire");
    assert_eq!(
        body,
        json!({
            "amount": 1999, "currency": "EUR", "capture": "automatic",
            "description": "line1\nline2 \u{1}", "reference": charge_id("order-g1").as_str(),
            "card": {"number": cards::SUCCESS, "exp_month": 12, "exp_year": 2034, "cvc": "123",
                     "holder": "Dr. \"Ada\" O'Brien\\"}
        })
    );
    let header = |name: &str| received.headers.get(name).unwrap().to_str().unwrap();
    assert_eq!(header("authorization"), "Bearer acme_live_key");
    assert_eq!(header("x-amount"), "1999 EUR");
    assert_eq!(header("idempotency-key"), charge_id("order-g1").as_str());
    assert_eq!(header("content-type"), "application/json");
}

#[tokio::test]
async fn generic_maps_declines_and_unmapped_states_by_json_pointer() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new(dir.path());
    let (url, _received) = json_gateway(&pki).await;
    let secret = dir.path().join("acme-secret");
    write_secret(&secret, "acme_live_key");
    let acme = connector(toml::from_str(&generic_json_settings(&url, &pki, &secret)).unwrap());

    let declined = charge(acme.as_ref(), cards::DECLINED, "order-g2").await;
    assert_eq!(
        declined,
        Outcome {
            status: ChargeStatus::Declined,
            payment_id: Some("pay_2".to_owned()),
            decline_code: Some("05".to_owned()),
            // The gateway echoed the card number; the outcome masks it.
            message: Some("Do not honor: card 400000******0002".to_owned()),
            http_status: Some(402),
            action: None,
        }
    );

    let pending = charge(acme.as_ref(), cards::EXPIRED, "order-g3").await;
    assert_eq!(pending.status, ChargeStatus::Unknown, "{pending:?}");
    assert_eq!(pending.payment_id.as_deref(), Some("pay_3"));
    assert!(pending.message.unwrap().contains("PENDING"));
}

#[tokio::test]
async fn generic_hands_back_a_challenge_and_looks_charges_up_by_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new(dir.path());
    let (url, received) = json_gateway(&pki).await;
    let secret = dir.path().join("acme-secret");
    write_secret(&secret, "acme_live_key");
    let acme = connector(toml::from_str(&generic_json_settings(&url, &pki, &secret)).unwrap());

    let challenged = charge(acme.as_ref(), cards::REQUIRES_ACTION, "order-g4").await;
    assert_eq!(
        challenged.status,
        ChargeStatus::RequiresAction,
        "{challenged:?}"
    );
    let action = challenged.action.expect("the challenge");
    assert_eq!(action.client_secret.as_deref(), Some("cs_4"));
    assert_eq!(
        action.redirect_url.as_deref(),
        Some("https://acs.example/4")
    );
    let details: Value = serde_json::from_str(action.details_json.as_deref().unwrap()).unwrap();
    assert_eq!(details["method"], "GET");
    assert_eq!(
        details["echo"], "card 400000******3155",
        "a card number in the action is masked"
    );

    let reference = |name| ChargeRef {
        charge_id: charge_id(name),
        payment_id: None,
        amount: 1999,
        currency: eur(),
    };
    match acme.lookup(&reference("order-g1")).await {
        Lookup::Found(outcome) => {
            assert_eq!(outcome.status, ChargeStatus::Succeeded);
            assert_eq!(outcome.payment_id.as_deref(), Some("pay_1"));
            assert_eq!(
                outcome.message.as_deref(),
                Some("paid with 424242******4242"),
                "no card at a lookup, every card number masked"
            );
        }
        other => panic!("expected found, got {other:?}"),
    }
    match acme.lookup(&reference("order-g3")).await {
        Lookup::Found(outcome) => assert_eq!(outcome.status, ChargeStatus::Unknown),
        other => panic!("expected found, got {other:?}"),
    }
    match acme.lookup(&reference("order-none")).await {
        Lookup::NotFound { evidence } => {
            assert_eq!(
                evidence,
                "GET /lookup/ch_0000000ordernone → HTTP 404 (no such payment)"
            );
        }
        other => panic!("expected not found, got {other:?}"),
    }
    assert!(matches!(
        acme.lookup(&reference("order-broken")).await,
        Lookup::Unavailable { .. }
    ));
    let lookups: Vec<_> = received
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.body.is_empty())
        .map(|r| r.headers.clone())
        .collect();
    assert_eq!(lookups.len(), 4);
    for headers in &lookups {
        assert_eq!(headers["authorization"], "Bearer acme_live_key");
        assert!(headers.get("content-type").is_none(), "a GET has no body");
    }
    assert_eq!(
        lookups[2]["idempotency-key"],
        charge_id("order-none").as_str()
    );
}

#[tokio::test]
async fn generic_form_bodies_are_percent_encoded() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new(dir.path());
    let (url, received) = json_gateway(&pki).await;
    let mut settings: GatewaySettings = toml::from_str(&format!(
        r#"
        name = "formpay"
        kind = "generic"
        base_url = "{url}"
        ca_file = "{ca}"
        path = "/charges"
        body_format = "form"
        body = "card[number]={{{{card.number}}}}&amount={{{{amount}}}}&desc={{{{description}}}}&cvc={{{{card.cvc}}}}"
        status_pointer = "/payment/state"
        status_map = {{ APPROVED = "succeeded" }}
        "#,
        ca = pki.ca_file.display(),
    ))
    .unwrap();
    settings.success_http_statuses = Some(vec![200]);
    let formpay = connector(settings);
    let pan = Pan::parse(cards::SUCCESS).unwrap();
    let outcome = formpay
        .charge(
            &card(&pan, None),
            &ChargeParams {
                description: "a&b=c d+é",
                ..params("order-f1")
            },
        )
        .await;
    assert_eq!(outcome.status, ChargeStatus::Succeeded, "{outcome:?}");
    let received = received.lock().unwrap()[0].clone();
    assert_eq!(
        std::str::from_utf8(&received.body).unwrap(),
        "card[number]=4242424242424242&amount=1999&desc=a%26b%3Dc+d%2B%C3%A9&cvc="
    );
    assert_eq!(
        received.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
}

// ---------------------------------------------------------------------------------------
// Card data stays out of logs, outcomes and errors
// ---------------------------------------------------------------------------------------

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Everything every test in this binary logs, at every level, from every crate (hyper, h2
/// and rustls included), without timestamps. One global subscriber: a thread-local one
/// misses events whose callsites other test threads registered first.
fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .without_time()
            .with_writer(captured.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        captured
    })
}

#[tokio::test]
async fn no_card_number_or_cvc_reaches_logs_or_outcomes() {
    let canary = "5555555555554444";
    let h = Harness::start().await;
    let stripe = connector(h.stripe());
    let slow = connector(GatewaySettings {
        timeout_ms: SHORT_TIMEOUT_MS,
        ..h.stripe()
    });
    let huge = connector(h.generic_at(paths::TEST_HUGE));
    let pan = Pan::parse(canary).unwrap();
    let hang = Pan::parse(cards::HANG).unwrap();
    let mut outcomes = Vec::new();
    for (connector, pan, key) in [
        (&stripe, &pan, "canary-1"),
        (&slow, &hang, "canary-2"),
        (&huge, &pan, "canary-3"),
    ] {
        let outcome = connector
            .charge(&card(pan, Some(CANARY_CVC)), &params(key))
            .await;
        outcomes.push(format!("{outcome:?}"));
    }
    let charged = stripe
        .charge(&card(&pan, Some(CANARY_CVC)), &params("canary-4"))
        .await;
    let payment_id = charged.payment_id.clone();
    outcomes.push(format!("{charged:?}"));
    for payment_id in [payment_id.as_deref(), None] {
        let found = stripe
            .lookup(&ChargeRef {
                charge_id: charge_id("canary-4"),
                payment_id,
                amount: 1999,
                currency: eur(),
            })
            .await;
        outcomes.push(format!("{found:?}"));
    }
    let absent = stripe.lookup(&by_charge_id("canary-6")).await;
    assert!(matches!(absent, Lookup::NotFound { .. }), "{absent:?}");
    outcomes.push(format!("{absent:?}"));
    let refund = stripe
        .operate(&Operation {
            kind: OperationKind::Refund,
            payment_id: payment_id.as_deref().unwrap_or("pi_missing"),
            amount: None,
            currency: eur(),
            charge_id: charge_id("canary-4"),
            operation_id: operation_id("op_canary-5"),
        })
        .await;
    outcomes.push(format!("{refund:?}"));
    outcomes.push(format!("{stripe:?} {huge:?}"));
    outcomes.push(format!("{:?}", card(&pan, Some(CANARY_CVC))));

    let logs = String::from_utf8(logs().0.lock().unwrap().clone()).unwrap();
    // The ids are `…canaryN`: the last six characters name each.
    for key in ["anary1", "anary2", "anary3", "anary4", "anary5"] {
        let line = format!("idempotency_key_suffix=\"{key}\"");
        assert!(
            logs.contains(&line),
            "the charge or operation {key} was logged"
        );
    }
    assert!(
        logs.contains("gateway lookup") && logs.contains("charge_id_suffix=\"anary4\""),
        "the lookups were logged"
    );
    assert!(
        logs.contains("charge_id_suffix=\"anary6\"") && logs.contains("…anary6"),
        "the absent charge's lookup was logged with its evidence"
    );
    assert!(
        !logs.contains(charge_id("canary-4").as_str())
            && !logs.contains(charge_id("canary-6").as_str()),
        "logs name a charge by the end of its id only"
    );
    // Every card number any test here uses, the canary CVC and the API key: none may
    // appear, whichever test logged it.
    let secrets = [
        canary,
        cards::SUCCESS,
        cards::DECLINED,
        cards::INSUFFICIENT_FUNDS,
        cards::EXPIRED,
        cards::INCORRECT_CVC,
        cards::PROCESSING_ERROR,
        cards::REQUIRES_ACTION,
        cards::HANG,
        CANARY_CVC,
        h.gateway.secret_key(),
    ];
    for text in outcomes.iter().chain([&logs]) {
        for secret in secrets {
            assert!(!text.contains(secret), "{secret} leaked");
        }
    }
}

/// Writes a secret file as the vault demands: mode 0600.
fn write_secret(path: &std::path::Path, contents: impl AsRef<[u8]>) {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_ref()))
        .expect("write secret file");
}
