//! The test payment gateway over real TLS: authentication, every test card, idempotency as
//! Stripe documents it, the misbehaving endpoints, and plain HTTP on loopback.

use cardvault_test_support::pki;

use std::time::{Duration, Instant};

use cardvault::tls::TlsFiles;
use cardvault_test_gateway::{
    GatewayStats, HUGE_BODY_BYTES, TestGateway, TestGatewayError, TestGatewayOptions, cards, paths,
};
use reqwest::{StatusCode, header::HeaderMap};
use serde_json::Value;
use tempfile::TempDir;

/// The secret key of every gateway here.
const KEY: &str = "sk_test_4eC39HqLyjWDarjtT1zdp7dc";

/// A future expiry year for the cards.
const EXP_YEAR: &str = "2099";

/// A gateway over TLS and a client that trusts its CA.
struct Harness {
    gateway: TestGateway,
    client: reqwest::Client,
    pki: pki::Pki,
    _dir: TempDir,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(Duration::from_secs(30), false).await
    }

    async fn start_with(hang: Duration, require_client_certs: bool) -> Harness {
        let options = TestGatewayOptions {
            hang,
            ..TestGatewayOptions::default()
        };
        Self::start_options(options, require_client_certs).await
    }

    /// `options` with this harness's secret key and TLS files.
    async fn start_options(options: TestGatewayOptions, require_client_certs: bool) -> Harness {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let pki = pki::Pki::new(dir.path());
        let gateway = TestGateway::start(TestGatewayOptions {
            secret_key: KEY.to_owned(),
            tls: Some(TlsFiles {
                cert_file: pki.server_cert.clone(),
                key_file: pki.server_key.clone(),
                client_ca_file: require_client_certs.then(|| pki.ca_file.clone()),
            }),
            ..options
        })
        .await
        .unwrap();
        let client = client_trusting(&pki, None);
        Harness {
            gateway,
            client,
            pki,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.url())
    }

    /// POSTs a form with the secret key and, when given, an idempotency key.
    async fn post(&self, path: &str, params: &[(&str, &str)], key: Option<&str>) -> Answer {
        self.post_as(Some("2024-06-20"), path, params, key).await
    }

    /// POSTs as [`Harness::post`] does, with `Stripe-Version: version` (none if `None`).
    async fn post_as(
        &self,
        version: Option<&str>,
        path: &str,
        params: &[(&str, &str)],
        key: Option<&str>,
    ) -> Answer {
        let mut request = self
            .client
            .post(self.url(path))
            .bearer_auth(KEY)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(encode(params));
        if let Some(version) = version {
            request = request.header("Stripe-Version", version);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        Answer::of(request.send().await.unwrap()).await
    }

    /// Searches PaymentIntents with `query` (and a `limit`, `page` when given).
    async fn search(&self, params: &[(&str, &str)]) -> Answer {
        let response = self
            .client
            .get(format!(
                "{}?{}",
                self.url(paths::PAYMENT_INTENTS_SEARCH),
                encode(params)
            ))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        Answer::of(response).await
    }

    async fn get(&self, path: &str) -> Answer {
        let response = self
            .client
            .get(self.url(path))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        Answer::of(response).await
    }

    /// A card PaymentMethod for `number`; returns its id.
    async fn payment_method(&self, number: &str) -> String {
        let answer = self
            .post(paths::PAYMENT_METHODS, &card_params(number), None)
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        answer.body["id"].as_str().unwrap().to_owned()
    }

    /// Creates and confirms a PaymentIntent of 1234 usd paid with `number`.
    async fn charge(&self, number: &str, capture_method: &str) -> Answer {
        let pm = self.payment_method(number).await;
        self.post(
            paths::PAYMENT_INTENTS,
            &intent_params(&pm, capture_method),
            None,
        )
        .await
    }

    fn stats(&self) -> GatewayStats {
        self.gateway.stats()
    }
}

/// A reqwest client trusting the test CA only, presenting `identity` (cert, key) if given.
fn client_trusting(
    pki: &pki::Pki,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([ca])
        .redirect(reqwest::redirect::Policy::none());
    if let Some((cert, key)) = identity {
        let mut pem = std::fs::read(cert).unwrap();
        pem.extend(std::fs::read(key).unwrap());
        builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

/// Status, headers and JSON body of a response.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    async fn of(response: reqwest::Response) -> Answer {
        let status = response.status();
        let headers = response.headers().clone();
        if status.is_success() || status.is_client_error() || status.is_server_error() {
            assert_eq!(
                headers.get("content-type").unwrap(),
                "application/json",
                "every answer is JSON"
            );
        }
        let bytes = response.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    fn error(&self) -> &Value {
        &self.body["error"]
    }

    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
}

/// Form-encodes `params`, escaping everything but unreserved characters (brackets too, so
/// the gateway's decoding of keys is exercised).
fn encode(params: &[(&str, &str)]) -> String {
    fn escape(text: &str) -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    char::from(b).to_string()
                }
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    params
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn card_params(number: &str) -> Vec<(&str, &str)> {
    vec![
        ("type", "card"),
        ("card[number]", number),
        ("card[exp_month]", "12"),
        ("card[exp_year]", EXP_YEAR),
        ("card[cvc]", "123"),
    ]
}

fn intent_params<'a>(pm: &'a str, capture_method: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("amount", "1234"),
        ("currency", "usd"),
        ("payment_method", pm),
        ("confirm", "true"),
        ("capture_method", capture_method),
        ("description", "Order #42 café"),
        ("metadata[order]", "42"),
    ]
}

/// `prefix` and 24 base62 characters.
fn assert_id(id: &Value, prefix: &str) {
    let id = id.as_str().unwrap_or_else(|| panic!("no id: {id}"));
    let rest = id
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{id} lacks {prefix}"));
    assert_eq!(rest.len(), 24, "{id}");
    assert!(rest.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
}

#[tokio::test]
async fn requests_without_the_right_secret_key_are_refused_with_401() {
    let h = Harness::start().await;
    let body = encode(&card_params(cards::SUCCESS));

    let missing = h
        .client
        .post(h.url(paths::PAYMENT_METHODS))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let missing = Answer::of(missing).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.error()["type"], "invalid_request_error");
    assert!(missing.error()["code"].is_null());

    let wrong = h
        .client
        .post(h.url(paths::PAYMENT_METHODS))
        .bearer_auth("sk_test_wrongwrongwrong9876")
        .body(body)
        .send()
        .await
        .unwrap();
    let wrong = Answer::of(wrong).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.error()["type"], "invalid_request_error");
    assert!(wrong.error()["code"].is_null());
    let message = wrong.error()["message"].as_str().unwrap();
    assert!(message.starts_with("Invalid API Key provided"), "{message}");
    assert!(
        message.ends_with("9876") && !message.contains("wrongwrong"),
        "{message}"
    );

    let get = h
        .client
        .get(h.url("/v1/payment_intents/pi_x"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(h.stats().executed_on(paths::PAYMENT_METHODS), 0);
}

#[tokio::test]
async fn a_payment_method_shows_brand_last4_and_expiry_but_never_the_number() {
    let h = Harness::start().await;
    let answer = h
        .post(paths::PAYMENT_METHODS, &card_params(cards::SUCCESS), None)
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_id(&answer.body["id"], "pm_");
    assert_eq!(answer.body["object"], "payment_method");
    assert_eq!(answer.body["type"], "card");
    let card = &answer.body["card"];
    assert_eq!(card["brand"], "visa");
    assert_eq!(card["last4"], "4242");
    assert_eq!(card["exp_month"], 12);
    assert_eq!(card["exp_year"], 2099);
    let text = answer.body.to_string();
    assert!(
        !text.contains(cards::SUCCESS) && !text.contains("\"123\""),
        "{text}"
    );

    let id = answer.body["id"].as_str().unwrap();
    let fetched = h.get(&format!("/v1/payment_methods/{id}")).await;
    assert_eq!(fetched.body, answer.body);
}

#[tokio::test]
async fn a_test_can_tell_which_cvc_a_payment_method_came_with_without_seeing_it() {
    let h = Harness::start().await;
    let with = h.payment_method(cards::SUCCESS).await;
    assert_eq!(h.gateway.payment_method_cvc_is(&with, "123"), Some(true));
    assert_eq!(h.gateway.payment_method_cvc_is(&with, "124"), Some(false));
    let without: Vec<_> = card_params(cards::SUCCESS)
        .into_iter()
        .filter(|(k, _)| *k != "card[cvc]")
        .collect();
    let answer = h.post(paths::PAYMENT_METHODS, &without, None).await;
    let id = answer.body["id"].as_str().unwrap();
    assert!(answer.body["card"]["checks"]["cvc_check"].is_null());
    assert_eq!(h.gateway.payment_method_cvc_is(id, "123"), Some(false));
    assert_eq!(h.gateway.payment_method_cvc_is("pm_nope", "123"), None);
}

#[tokio::test]
async fn missing_or_invalid_card_numbers_are_402_incorrect_number() {
    let h = Harness::start().await;
    let without: Vec<_> = card_params(cards::SUCCESS)
        .into_iter()
        .filter(|(k, _)| *k != "card[number]")
        .collect();
    for params in [without, card_params("4242424242424241"), card_params("42x")] {
        let answer = h.post(paths::PAYMENT_METHODS, &params, None).await;
        assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(answer.error()["type"], "card_error");
        assert_eq!(answer.error()["code"], "incorrect_number");
    }
}

#[tokio::test]
async fn each_test_card_confirms_as_stripe_documents() {
    let h = Harness::start().await;

    let ok = h.charge(cards::SUCCESS, "automatic").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_id(&ok.body["id"], "pi_");
    assert_eq!(ok.body["object"], "payment_intent");
    assert_eq!(ok.body["status"], "succeeded");
    assert_eq!(ok.body["amount"], 1234);
    assert_eq!(ok.body["amount_received"], 1234);
    assert_eq!(ok.body["currency"], "usd");
    assert_eq!(ok.body["description"], "Order #42 café");
    assert_eq!(ok.body["metadata"]["order"], "42");

    // Any other valid card succeeds too.
    let other = h.charge("5555555555554444", "automatic").await;
    assert_eq!(other.body["status"], "succeeded");

    let action = h.charge(cards::REQUIRES_ACTION, "automatic").await;
    assert_eq!(action.status, StatusCode::OK);
    assert_eq!(action.body["status"], "requires_action");

    let declines = [
        (
            cards::DECLINED,
            "card_declined",
            "generic_decline",
            "Your card was declined.",
        ),
        (
            cards::INSUFFICIENT_FUNDS,
            "card_declined",
            "insufficient_funds",
            "Your card has insufficient funds.",
        ),
        (
            cards::EXPIRED,
            "expired_card",
            "expired_card",
            "Your card has expired.",
        ),
        (
            cards::INCORRECT_CVC,
            "incorrect_cvc",
            "incorrect_cvc",
            "Your card's security code is incorrect.",
        ),
        (
            cards::PROCESSING_ERROR,
            "processing_error",
            "processing_error",
            "An error occurred while processing your card. Try again in a little bit.",
        ),
    ];
    for (card, code, decline_code, message) in declines {
        let answer = h.charge(card, "automatic").await;
        assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED, "{card}");
        let error = answer.error();
        assert_eq!(error["type"], "card_error", "{card}");
        assert_eq!(error["code"], code, "{card}");
        assert_eq!(error["decline_code"], decline_code, "{card}");
        assert_eq!(error["message"], message, "{card}");
        assert_id(&error["payment_intent"]["id"], "pi_");
        assert_eq!(error["payment_intent"]["status"], "requires_payment_method");
        assert!(!answer.body.to_string().contains(card), "{card} echoed");

        // The declined PaymentIntent is stored as such.
        let id = error["payment_intent"]["id"].as_str().unwrap();
        let stored = h.get(&format!("/v1/payment_intents/{id}")).await;
        assert_eq!(stored.body["status"], "requires_payment_method");
        assert_eq!(stored.body["last_payment_error"]["code"], code);
    }
}

#[tokio::test]
async fn manual_capture_leaves_the_intent_requires_capture() {
    let h = Harness::start().await;
    let answer = h.charge(cards::SUCCESS, "manual").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body["status"], "requires_capture");
    assert_eq!(answer.body["capture_method"], "manual");
    assert_eq!(answer.body["amount_capturable"], 1234);
    assert_eq!(answer.body["amount_received"], 0);
}

#[tokio::test]
async fn missing_amount_currency_or_payment_method_is_400_naming_the_param() {
    let h = Harness::start().await;
    let pm = h.payment_method(cards::SUCCESS).await;
    for missing in ["amount", "currency", "payment_method"] {
        let params: Vec<_> = intent_params(&pm, "automatic")
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
        let answer = h.post(paths::PAYMENT_INTENTS, &params, None).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{missing}");
        assert_eq!(answer.error()["type"], "invalid_request_error");
        assert_eq!(answer.error()["code"], "parameter_missing");
        assert_eq!(answer.error()["param"], missing);
    }

    let mut unknown_pm = intent_params("pm_doesnotexist", "automatic");
    unknown_pm.push(("statement_descriptor", "SHOP"));
    let answer = h.post(paths::PAYMENT_INTENTS, &unknown_pm, None).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.error()["code"], "resource_missing");
    assert_eq!(answer.error()["param"], "payment_method");
}

#[tokio::test]
async fn unknown_parameters_are_refused_as_stripe_refuses_them() {
    let h = Harness::start().await;
    let mut params = card_params(cards::SUCCESS);
    params.push(("card[pin]", "0000"));
    let answer = h.post(paths::PAYMENT_METHODS, &params, None).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.error()["code"], "parameter_unknown");
    assert_eq!(answer.error()["param"], "card[pin]");
}

#[tokio::test]
async fn an_idempotent_replay_returns_the_same_answer_without_doing_anything_again() {
    let h = Harness::start().await;
    let first_pm = h
        .post(
            paths::PAYMENT_METHODS,
            &card_params(cards::SUCCESS),
            Some("order-1-pm"),
        )
        .await;
    let again_pm = h
        .post(
            paths::PAYMENT_METHODS,
            &card_params(cards::SUCCESS),
            Some("order-1-pm"),
        )
        .await;
    assert!(!first_pm.replayed());
    assert!(again_pm.replayed());
    assert_eq!(again_pm.body, first_pm.body);

    let pm = first_pm.body["id"].as_str().unwrap();
    let params = intent_params(pm, "automatic");
    let first = h
        .post(paths::PAYMENT_INTENTS, &params, Some("order-1-pi"))
        .await;
    // Same parameters in another order are the same parameters.
    let mut reordered = params.clone();
    reordered.reverse();
    let again = h
        .post(paths::PAYMENT_INTENTS, &reordered, Some("order-1-pi"))
        .await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.replayed());
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(again.body, first.body);

    // Declines are saved and replayed too.
    let declined_pm = h.payment_method(cards::DECLINED).await;
    let declined_params = intent_params(&declined_pm, "automatic");
    let declined = h
        .post(paths::PAYMENT_INTENTS, &declined_params, Some("order-2-pi"))
        .await;
    let declined_again = h
        .post(paths::PAYMENT_INTENTS, &declined_params, Some("order-2-pi"))
        .await;
    assert_eq!(declined_again.status, StatusCode::PAYMENT_REQUIRED);
    assert!(declined_again.replayed());
    assert_eq!(declined_again.body, declined.body);

    let stats = h.stats();
    assert_eq!(stats.posts_to(paths::PAYMENT_INTENTS), 4);
    assert_eq!(stats.executed_on(paths::PAYMENT_INTENTS), 2);
    assert_eq!(stats.replays, 3);
    assert_eq!(stats.idempotency_keys, 3);
}

#[tokio::test]
async fn the_same_key_with_other_parameters_is_an_idempotency_error() {
    let h = Harness::start().await;
    let pm = h.payment_method(cards::SUCCESS).await;
    let first = h
        .post(
            paths::PAYMENT_INTENTS,
            &intent_params(&pm, "automatic"),
            Some("k1"),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK);
    let mut other = intent_params(&pm, "automatic");
    other[0] = ("amount", "999");
    let answer = h.post(paths::PAYMENT_INTENTS, &other, Some("k1")).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.error()["type"], "idempotency_error");
    assert_eq!(
        answer.error()["message"],
        "Keys for idempotent requests can only be used with the same parameters they were \
         first used with. Try using a key other than 'k1' if you meant to execute a different \
         request."
    );
    assert_eq!(h.stats().executed_on(paths::PAYMENT_INTENTS), 1);
}

#[tokio::test]
async fn keys_are_scoped_per_path_and_validation_failures_are_not_saved() {
    let h = Harness::start().await;
    let pm = h
        .post(
            paths::PAYMENT_METHODS,
            &card_params(cards::SUCCESS),
            Some("shared-key"),
        )
        .await;
    let pm = pm.body["id"].as_str().unwrap().to_owned();

    // A 400 saves nothing: the same key may be retried with corrected parameters.
    let mut bad = intent_params(&pm, "automatic");
    bad.retain(|(k, _)| *k != "amount");
    let refused = h
        .post(paths::PAYMENT_INTENTS, &bad, Some("shared-key"))
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let answer = h
        .post(
            paths::PAYMENT_INTENTS,
            &intent_params(&pm, "automatic"),
            Some("shared-key"),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(!answer.replayed());
    assert_eq!(answer.body["status"], "succeeded");
}

#[tokio::test]
async fn a_concurrent_duplicate_of_a_hanging_request_is_409_and_the_first_still_succeeds() {
    let h = Harness::start_with(Duration::from_secs(2), false).await;
    let pm = h.payment_method(cards::HANG).await;
    let params = intent_params(&pm, "automatic");

    let started = Instant::now();
    let (first, second) = tokio::join!(
        h.post(paths::PAYMENT_INTENTS, &params, Some("hang-1")),
        async {
            // Let the first arrive and start hanging.
            while h.stats().executed_on(paths::PAYMENT_INTENTS) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            h.post(paths::PAYMENT_INTENTS, &params, Some("hang-1"))
                .await
        }
    );
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert_eq!(second.error()["type"], "invalid_request_error");
    assert_eq!(second.error()["code"], "idempotency_key_in_use");
    assert_eq!(
        second.error()["message"],
        "There is currently another in-progress request using this Idempotent Key (that \
         probably means you submitted twice, and the other request is still going through): \
         hang-1. Please try again later."
    );
    assert_eq!(
        second.error()["doc_url"],
        "https://stripe.com/docs/error-codes/idempotency-key-in-use"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body["status"], "succeeded");

    let replay = h
        .post(paths::PAYMENT_INTENTS, &params, Some("hang-1"))
        .await;
    assert!(replay.replayed());
    assert_eq!(replay.body["id"], first.body["id"]);
    assert_eq!(h.stats().executed_on(paths::PAYMENT_INTENTS), 1);
}

#[tokio::test]
async fn a_client_that_times_out_finds_the_result_under_its_key_later() {
    let h = Harness::start_with(Duration::from_secs(2), false).await;
    let pm = h.payment_method(cards::HANG).await;
    let params = intent_params(&pm, "manual");
    let timed_out = h
        .client
        .post(h.url(paths::PAYMENT_INTENTS))
        .bearer_auth(KEY)
        .header("Idempotency-Key", "timeout-1")
        .body(encode(&params))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(timed_out.unwrap_err().is_timeout());

    // The gateway carries on without the client; a retry while it does is a 409.
    let busy = h
        .post(paths::PAYMENT_INTENTS, &params, Some("timeout-1"))
        .await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert_eq!(busy.error()["code"], "idempotency_key_in_use");

    // Retry as a reconciler would, until the first attempt has finished.
    let deadline = Instant::now() + Duration::from_secs(20);
    let retry = loop {
        let retry = h
            .post(paths::PAYMENT_INTENTS, &params, Some("timeout-1"))
            .await;
        if retry.status != StatusCode::CONFLICT || Instant::now() > deadline {
            break retry;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.body);
    assert!(retry.replayed());
    assert_eq!(retry.body["status"], "requires_capture");
    assert_eq!(h.stats().executed_on(paths::PAYMENT_INTENTS), 1);
}

#[tokio::test]
async fn a_key_past_its_lifetime_is_forgotten_and_a_repeat_makes_a_second_payment_intent() {
    let ttl = Duration::from_secs(1);
    let h = Harness::start_options(
        TestGatewayOptions {
            idempotency_key_ttl: ttl,
            ..TestGatewayOptions::default()
        },
        false,
    )
    .await;
    let pm = h.payment_method(cards::SUCCESS).await;
    let params = intent_params(&pm, "automatic");
    let first = h
        .post(paths::PAYMENT_INTENTS, &params, Some("pruned-1"))
        .await;
    let within = h
        .post(paths::PAYMENT_INTENTS, &params, Some("pruned-1"))
        .await;
    assert!(within.replayed());
    assert_eq!(within.body["id"], first.body["id"]);

    // Waiting out the key's lifetime, as a day passes at Stripe.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let after = h
        .post(paths::PAYMENT_INTENTS, &params, Some("pruned-1"))
        .await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    assert!(!after.replayed());
    assert_eq!(after.body["status"], "succeeded");
    assert_ne!(after.body["id"], first.body["id"], "a second PaymentIntent");
    assert_eq!(h.stats().executed_on(paths::PAYMENT_INTENTS), 2);

    // The fresh answer is saved under the key anew.
    let again = h
        .post(paths::PAYMENT_INTENTS, &params, Some("pruned-1"))
        .await;
    assert!(again.replayed());
    assert_eq!(again.body["id"], after.body["id"]);
}

#[tokio::test]
async fn a_key_whose_request_still_runs_is_not_forgotten_past_its_lifetime() {
    let h = Harness::start_options(
        TestGatewayOptions {
            hang: Duration::from_secs(2),
            idempotency_key_ttl: Duration::from_millis(200),
            ..TestGatewayOptions::default()
        },
        false,
    )
    .await;
    let pm = h.payment_method(cards::HANG).await;
    let params = intent_params(&pm, "automatic");
    let (first, second) = tokio::join!(
        h.post(paths::PAYMENT_INTENTS, &params, Some("long-1")),
        async {
            while h.stats().executed_on(paths::PAYMENT_INTENTS) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
            h.post(paths::PAYMENT_INTENTS, &params, Some("long-1"))
                .await
        }
    );
    assert_eq!(second.status, StatusCode::CONFLICT, "{}", second.body);
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(h.stats().executed_on(paths::PAYMENT_INTENTS), 1);
}

#[tokio::test]
async fn a_lost_answer_is_a_saved_500_while_the_payment_intent_succeeded() {
    let h = Harness::start().await;
    let pm = h.payment_method(cards::ANSWER_LOST).await;
    let params = intent_params(&pm, "automatic");
    let first = h
        .post(paths::PAYMENT_INTENTS, &params, Some("lost-1"))
        .await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(first.error()["type"], "api_error");
    assert!(
        first.error().get("payment_intent").is_none(),
        "{}",
        first.body
    );

    // The same key gets the same 500 back, and nothing runs again.
    let again = h
        .post(paths::PAYMENT_INTENTS, &params, Some("lost-1"))
        .await;
    assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(h.stats().executed_on(paths::PAYMENT_INTENTS), 1);

    // Yet the payment went through.
    let intents = h.gateway.payment_intents_with_metadata("order", "42");
    assert_eq!(intents.len(), 1);
    assert_eq!(intents[0]["status"], "succeeded");
    assert_eq!(intents[0]["amount_received"], 1234);
    let id = intents[0]["id"].as_str().unwrap();
    let fetched = h.get(&format!("/v1/payment_intents/{id}")).await;
    assert_eq!(fetched.body["status"], "succeeded");
}

#[tokio::test]
async fn a_hanging_payment_intent_is_retrievable_as_processing_while_it_runs() {
    let h = Harness::start_with(Duration::from_secs(2), false).await;
    let pm = h.payment_method(cards::HANG).await;
    let params = intent_params(&pm, "automatic");
    let (first, seen) = tokio::join!(
        h.post(paths::PAYMENT_INTENTS, &params, Some("hang-seen")),
        async {
            let intent = loop {
                if let Some(intent) = h.gateway.payment_intents_with_metadata("order", "42").pop() {
                    break intent;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let id = intent["id"].as_str().unwrap().to_owned();
            h.get(&format!("/v1/payment_intents/{id}")).await
        }
    );
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(seen.body["status"], "processing");
    assert_eq!(seen.body["amount_received"], 0);
    assert_eq!(first.body["status"], "succeeded");
    assert_eq!(first.body["id"], seen.body["id"]);
    let id = first.body["id"].as_str().unwrap();
    let after = h.get(&format!("/v1/payment_intents/{id}")).await;
    assert_eq!(after.body["status"], "succeeded");
}

/// Creates and confirms a PaymentIntent for `number` with `metadata[charge_id]` and
/// `metadata[shop]`; returns its id.
async fn charge_with_metadata(h: &Harness, number: &str, charge_id: &str, shop: &str) -> String {
    let pm = h.payment_method(number).await;
    let params = [
        ("amount", "500"),
        ("currency", "eur"),
        ("payment_method", pm.as_str()),
        ("confirm", "true"),
        ("metadata[charge_id]", charge_id),
        ("metadata[shop]", shop),
    ];
    let answer = h.post(paths::PAYMENT_INTENTS, &params, None).await;
    let intent = if answer.status == StatusCode::OK {
        &answer.body
    } else {
        &answer.error()["payment_intent"]
    };
    intent["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn search_finds_payment_intents_by_metadata_as_stripe_answers() {
    let h = Harness::start().await;
    let first = charge_with_metadata(&h, cards::SUCCESS, "ch_a", "north").await;
    let declined = charge_with_metadata(&h, cards::DECLINED, "ch_b", "north").await;
    let again = charge_with_metadata(&h, cards::SUCCESS, "ch_a", "south").await;

    let found = h.search(&[("query", "metadata['charge_id']:'ch_a'")]).await;
    assert_eq!(found.status, StatusCode::OK, "{}", found.body);
    assert_eq!(found.body["object"], "search_result");
    assert_eq!(found.body["url"], "/v1/payment_intents/search");
    assert_eq!(found.body["has_more"], false);
    assert!(found.body["next_page"].is_null());
    let ids: Vec<&str> = found.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pi| pi["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [again.as_str(), first.as_str()], "newest first");
    assert_eq!(found.body["data"][1]["object"], "payment_intent");

    let both = h
        .search(&[(
            "query",
            "metadata[\"charge_id\"]:\"ch_a\" AND metadata['shop']:'north'",
        )])
        .await;
    let data = both.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], first.as_str());

    let by_status = h
        .search(&[(
            "query",
            "metadata['shop']:'north' AND status:'requires_payment_method'",
        )])
        .await;
    assert_eq!(by_status.body["data"][0]["id"], declined.as_str());

    let none = h
        .search(&[("query", "metadata['charge_id']:'ch_zzz'")])
        .await;
    assert_eq!(none.status, StatusCode::OK);
    assert_eq!(none.body["data"], Value::Array(vec![]));

    let paged = h
        .search(&[("query", "status:'succeeded'"), ("limit", "1")])
        .await;
    assert_eq!(paged.body["has_more"], true);
    assert_eq!(paged.body["data"][0]["id"], again.as_str());
    let page = paged.body["next_page"].as_str().unwrap();
    let rest = h
        .search(&[
            ("query", "status:'succeeded'"),
            ("limit", "1"),
            ("page", page),
        ])
        .await;
    assert_eq!(rest.body["data"][0]["id"], first.as_str());
    assert_eq!(rest.body["has_more"], false);
}

#[tokio::test]
async fn a_payment_intent_is_searchable_while_it_is_still_processing() {
    let h = Harness::start_with(Duration::from_secs(2), false).await;
    let pm = h.payment_method(cards::HANG).await;
    let mut params = intent_params(&pm, "automatic");
    params.push(("metadata[charge_id]", "ch_slow"));
    let (first, seen) = tokio::join!(
        h.post(paths::PAYMENT_INTENTS, &params, Some("slow-pi")),
        async {
            loop {
                let found = h
                    .search(&[("query", "metadata['charge_id']:'ch_slow'")])
                    .await;
                if found.body["data"].as_array().is_some_and(|d| !d.is_empty()) {
                    break found;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    );
    assert_eq!(seen.body["data"][0]["status"], "processing");
    assert_eq!(seen.body["data"][0]["id"], first.body["id"]);
    assert_eq!(first.body["status"], "succeeded");
}

#[tokio::test]
async fn a_search_query_that_does_not_parse_is_a_400_on_query() {
    let h = Harness::start().await;
    for query in [
        "metadata['charge_id']",
        "metadata[charge_id]:'x'",
        "charge_id:'x'",
        "status:'a' and status:'b'",
        "status:'a' AND status:'b' OR status:'c'",
    ] {
        let answer = h.search(&[("query", query)]).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(answer.error()["type"], "invalid_request_error", "{query}");
        assert_eq!(answer.error()["param"], "query", "{query}");
        let message = answer.error()["message"].as_str().unwrap();
        assert!(
            message.starts_with("We were unable to parse your search query."),
            "{message}"
        );
    }
    let missing = h.search(&[]).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.error()["code"], "parameter_missing");
    let unknown = h.search(&[("query", "status:'a'"), ("sort", "x")]).await;
    assert_eq!(unknown.error()["code"], "parameter_unknown");
    let unauthenticated = h
        .client
        .get(format!(
            "{}?{}",
            h.url(paths::PAYMENT_INTENTS_SEARCH),
            encode(&[("query", "status:'succeeded'")])
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn payment_methods_carry_their_metadata() {
    let h = Harness::start().await;
    let mut params = card_params(cards::SUCCESS);
    params.push(("metadata[charge_id]", "ch_pm"));
    let answer = h.post(paths::PAYMENT_METHODS, &params, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["metadata"]["charge_id"], "ch_pm");
    let id = answer.body["id"].as_str().unwrap();
    let fetched = h.get(&format!("/v1/payment_methods/{id}")).await;
    assert_eq!(fetched.body["metadata"]["charge_id"], "ch_pm");
}

#[tokio::test]
async fn the_pinned_version_takes_payment_method_types_and_refuses_the_endive_name() {
    let h = Harness::start().await;
    let pm = h.payment_method(cards::SUCCESS).await;
    for version in [Some("2024-06-20"), None] {
        let mut params = intent_params(&pm, "automatic");
        params.push(("payment_method_types[]", "card"));
        let ok = h
            .post_as(version, paths::PAYMENT_INTENTS, &params, None)
            .await;
        assert_eq!(ok.status, StatusCode::OK, "{version:?}: {}", ok.body);
        assert_eq!(ok.body["payment_method_types"], serde_json::json!(["card"]));

        let mut params = intent_params(&pm, "automatic");
        params.push(("allowed_payment_method_types[0]", "card"));
        let refused = h
            .post_as(version, paths::PAYMENT_INTENTS, &params, None)
            .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{version:?}");
        assert_eq!(refused.error()["code"], "parameter_unknown");
        assert_eq!(refused.error()["param"], "allowed_payment_method_types");
    }
}

#[tokio::test]
async fn endive_versions_take_allowed_payment_method_types_and_refuse_the_old_name() {
    let h = Harness::start().await;
    let pm = h.payment_method(cards::SUCCESS).await;
    for version in ["2026-09-30.endive", "2026-10-28.endive"] {
        for old in ["payment_method_types[0]", "payment_method_types[]"] {
            let mut params = intent_params(&pm, "automatic");
            params.push((old, "card"));
            let refused = h
                .post_as(
                    Some(version),
                    paths::PAYMENT_INTENTS,
                    &params,
                    Some(version),
                )
                .await;
            assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{version} {old}");
            let error = refused.error();
            assert_eq!(error["type"], "invalid_request_error");
            assert_eq!(error["code"], "parameter_unknown");
            assert_eq!(error["param"], "payment_method_types");
            assert_eq!(
                error["message"],
                "Received unknown parameter: payment_method_types"
            );
        }

        // A refusal saved nothing: the same key with the version's parameter charges.
        let mut params = intent_params(&pm, "automatic");
        params.push(("allowed_payment_method_types[0]", "card"));
        let ok = h
            .post_as(
                Some(version),
                paths::PAYMENT_INTENTS,
                &params,
                Some(version),
            )
            .await;
        assert_eq!(ok.status, StatusCode::OK, "{version}: {}", ok.body);
        assert_eq!(ok.body["status"], "succeeded");
        assert_eq!(
            ok.body["allowed_payment_method_types"],
            serde_json::json!(["card"])
        );
    }
    assert_eq!(h.stats().executed_on(paths::PAYMENT_INTENTS), 6);
}

#[tokio::test]
async fn an_unknown_stripe_version_is_refused_before_anything_runs() {
    let h = Harness::start().await;
    let refused = h
        .post_as(
            Some("2026-11-01.endive"),
            paths::PAYMENT_METHODS,
            &card_params(cards::SUCCESS),
            Some("v-1"),
        )
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.error()["type"], "invalid_request_error");
    assert_eq!(
        refused.error()["message"],
        "Invalid Stripe API version: 2026-11-01.endive"
    );
    assert_eq!(h.stats().executed_on(paths::PAYMENT_METHODS), 0);

    let get = h
        .client
        .get(h.url("/v1/payment_intents/pi_x"))
        .bearer_auth(KEY)
        .header("Stripe-Version", "1999-01-01")
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::BAD_REQUEST);

    // The key saved nothing either.
    let ok = h
        .post(
            paths::PAYMENT_METHODS,
            &card_params(cards::SUCCESS),
            Some("v-1"),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(!ok.replayed());
}

#[tokio::test]
async fn a_3ds_intent_hands_back_its_client_secret_and_next_action_without_card_data() {
    let h = Harness::start().await;
    let sdk = h.charge(cards::REQUIRES_ACTION, "automatic").await;
    assert_eq!(sdk.status, StatusCode::OK);
    assert_eq!(sdk.body["status"], "requires_action");
    let id = sdk.body["id"].as_str().unwrap();
    let secret = sdk.body["client_secret"].as_str().unwrap();
    let random = secret
        .strip_prefix(&format!("{id}_secret_"))
        .unwrap_or_else(|| panic!("{secret}"));
    assert!(!random.is_empty() && random.bytes().all(|b| b.is_ascii_alphanumeric()));
    let action = &sdk.body["next_action"];
    assert_eq!(action["type"], "use_stripe_sdk");
    assert_eq!(action["use_stripe_sdk"]["type"], "three_d_secure_redirect");
    assert!(action["use_stripe_sdk"]["stripe_js"].is_string());
    assert_eq!(action["use_stripe_sdk"]["payment_intent"], id);
    assert!(
        !sdk.body.to_string().contains(cards::REQUIRES_ACTION),
        "{}",
        sdk.body
    );

    let pm = h.payment_method(cards::REQUIRES_ACTION).await;
    let mut params = intent_params(&pm, "automatic");
    params.push(("return_url", "https://shop.example/after-3ds?order=42"));
    let redirect = h.post(paths::PAYMENT_INTENTS, &params, None).await;
    let action = &redirect.body["next_action"];
    assert_eq!(action["type"], "redirect_to_url");
    assert_eq!(
        action["redirect_to_url"]["return_url"],
        "https://shop.example/after-3ds?order=42"
    );
    assert!(
        action["redirect_to_url"]["url"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );

    // Every intent carries its own client secret; a paid one has no next action.
    let paid = h.charge(cards::SUCCESS, "automatic").await;
    assert!(paid.body["next_action"].is_null());
    assert_ne!(paid.body["client_secret"], sdk.body["client_secret"]);
    assert!(
        paid.body["client_secret"]
            .as_str()
            .unwrap()
            .starts_with(paid.body["id"].as_str().unwrap())
    );
}

#[tokio::test]
async fn the_generic_endpoint_hands_back_a_challenge_for_the_3ds_card() {
    let h = Harness::start().await;
    let body = serde_json::json!({
        "amount": 1000,
        "currency": "EUR",
        "card": {"number": cards::REQUIRES_ACTION, "exp_month": 12, "exp_year": 2099, "cvc": "123"},
    });
    let response = h
        .client
        .post(h.url(paths::GENERIC_CHARGES))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let answer = Answer::of(response).await;
    assert_eq!(answer.body["status"], "challenge");
    assert!(
        answer.body["challenge"]["url"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );
    assert!(answer.body["challenge"]["token"].is_string());
    assert!(!answer.body.to_string().contains(cards::REQUIRES_ACTION));
}

fn capture_path(id: &str) -> String {
    format!("{}/{id}/capture", paths::PAYMENT_INTENTS)
}

fn cancel_path(id: &str) -> String {
    format!("{}/{id}/cancel", paths::PAYMENT_INTENTS)
}

#[tokio::test]
async fn capture_takes_a_manual_intent_to_succeeded_once_and_idempotently() {
    let h = Harness::start().await;
    let manual = h.charge(cards::SUCCESS, "manual").await;
    let id = manual.body["id"].as_str().unwrap();

    let too_much = h
        .post(
            &capture_path(id),
            &[("amount_to_capture", "1235")],
            Some("cap-1"),
        )
        .await;
    assert_eq!(too_much.status, StatusCode::BAD_REQUEST);
    assert_eq!(too_much.error()["code"], "amount_too_large");
    assert_eq!(too_much.error()["param"], "amount_to_capture");

    let captured = h
        .post(
            &capture_path(id),
            &[("amount_to_capture", "1000")],
            Some("cap-1"),
        )
        .await;
    assert_eq!(captured.status, StatusCode::OK, "{}", captured.body);
    assert!(!captured.replayed(), "the refused attempt saved nothing");
    assert_eq!(captured.body["id"], id);
    assert_eq!(captured.body["status"], "succeeded");
    assert_eq!(captured.body["amount_received"], 1000);
    assert_eq!(captured.body["amount_capturable"], 0);
    assert_eq!(h.gateway.payment_intent(id).unwrap(), captured.body);

    let replay = h
        .post(
            &capture_path(id),
            &[("amount_to_capture", "1000")],
            Some("cap-1"),
        )
        .await;
    assert!(replay.replayed());
    assert_eq!(replay.body, captured.body);

    let twice = h.post(&capture_path(id), &[], Some("cap-2")).await;
    assert_eq!(twice.status, StatusCode::BAD_REQUEST);
    assert_eq!(twice.error()["type"], "invalid_request_error");
    assert_eq!(twice.error()["code"], "payment_intent_unexpected_state");
    assert_eq!(twice.error()["payment_intent"]["status"], "succeeded");

    let automatic = h.charge(cards::SUCCESS, "automatic").await;
    let auto_id = automatic.body["id"].as_str().unwrap();
    let refused = h.post(&capture_path(auto_id), &[], None).await;
    assert_eq!(refused.error()["code"], "payment_intent_unexpected_state");

    // Without an amount, all that is capturable.
    let whole = h.charge(cards::SUCCESS, "manual").await;
    let whole_id = whole.body["id"].as_str().unwrap();
    let all = h.post(&capture_path(whole_id), &[], None).await;
    assert_eq!(all.body["amount_received"], 1234);

    let missing = h.post(&capture_path("pi_nope"), &[], None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error()["code"], "resource_missing");
}

#[tokio::test]
async fn cancel_takes_an_unpaid_or_uncaptured_intent_to_canceled_but_not_a_succeeded_one() {
    let h = Harness::start().await;
    let manual = h.charge(cards::SUCCESS, "manual").await;
    let id = manual.body["id"].as_str().unwrap();
    let params = [("cancellation_reason", "requested_by_customer")];
    let canceled = h.post(&cancel_path(id), &params, Some("void-1")).await;
    assert_eq!(canceled.status, StatusCode::OK, "{}", canceled.body);
    assert_eq!(canceled.body["status"], "canceled");
    assert_eq!(
        canceled.body["cancellation_reason"],
        "requested_by_customer"
    );
    assert!(canceled.body["canceled_at"].is_i64());
    assert_eq!(canceled.body["amount_capturable"], 0);
    assert_eq!(canceled.body["amount_received"], 0);
    let replay = h.post(&cancel_path(id), &params, Some("void-1")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, canceled.body);
    assert_eq!(h.stats().executed_on(&cancel_path(id)), 1);

    // A canceled intent cannot be captured.
    let capture = h.post(&capture_path(id), &[], None).await;
    assert_eq!(capture.error()["code"], "payment_intent_unexpected_state");

    let action = h.charge(cards::REQUIRES_ACTION, "automatic").await;
    let action_id = action.body["id"].as_str().unwrap();
    let canceled = h.post(&cancel_path(action_id), &[], None).await;
    assert_eq!(canceled.body["status"], "canceled");
    assert!(canceled.body["next_action"].is_null());

    let declined = h.charge(cards::DECLINED, "automatic").await;
    let declined_id = declined.error()["payment_intent"]["id"].as_str().unwrap();
    let canceled = h.post(&cancel_path(declined_id), &[], None).await;
    assert_eq!(canceled.body["status"], "canceled");

    let paid = h.charge(cards::SUCCESS, "automatic").await;
    let paid_id = paid.body["id"].as_str().unwrap();
    let refused = h.post(&cancel_path(paid_id), &[], None).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.error()["code"], "payment_intent_unexpected_state");
    assert_eq!(
        h.gateway.payment_intent(paid_id).unwrap()["status"],
        "succeeded"
    );

    let bad_reason = h
        .post(
            &cancel_path(paid_id),
            &[("cancellation_reason", "bored")],
            None,
        )
        .await;
    assert_eq!(bad_reason.error()["param"], "cancellation_reason");
}

#[tokio::test]
async fn refunds_never_exceed_what_was_received_and_replay_under_their_key() {
    let h = Harness::start().await;
    let paid = h.charge(cards::SUCCESS, "automatic").await;
    let id = paid.body["id"].as_str().unwrap();
    let part = [
        ("payment_intent", id),
        ("amount", "234"),
        ("reason", "requested_by_customer"),
        ("metadata[charge_id]", "ch_r"),
    ];
    let first = h.post(paths::REFUNDS, &part, Some("refund-1")).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_id(&first.body["id"], "re_");
    assert_eq!(first.body["object"], "refund");
    assert_eq!(first.body["status"], "succeeded");
    assert_eq!(first.body["amount"], 234);
    assert_eq!(first.body["currency"], "usd");
    assert_eq!(first.body["payment_intent"], id);
    assert_eq!(first.body["charge"], paid.body["latest_charge"]);
    assert_eq!(first.body["reason"], "requested_by_customer");
    assert_eq!(first.body["metadata"]["charge_id"], "ch_r");
    let replay = h.post(paths::REFUNDS, &part, Some("refund-1")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert_eq!(h.gateway.refunds_of(id).len(), 1);

    let too_much = h
        .post(
            paths::REFUNDS,
            &[("payment_intent", id), ("amount", "1001")],
            None,
        )
        .await;
    assert_eq!(too_much.status, StatusCode::BAD_REQUEST);
    assert_eq!(too_much.error()["code"], "amount_too_large");

    // Without an amount, what remains; named by the charge this time.
    let charge = paid.body["latest_charge"].as_str().unwrap();
    let rest = h.post(paths::REFUNDS, &[("charge", charge)], None).await;
    assert_eq!(rest.status, StatusCode::OK, "{}", rest.body);
    assert_eq!(rest.body["amount"], 1000);

    let again = h
        .post(paths::REFUNDS, &[("payment_intent", id)], None)
        .await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert_eq!(again.error()["code"], "charge_already_refunded");
    assert_eq!(h.gateway.refunds_of(id).len(), 2);

    let refund_id = first.body["id"].as_str().unwrap();
    let fetched = h.get(&format!("/v1/refunds/{refund_id}")).await;
    assert_eq!(fetched.body, first.body);

    let uncaptured = h.charge(cards::SUCCESS, "manual").await;
    let uncaptured_id = uncaptured.body["id"].as_str().unwrap();
    let refused = h
        .post(paths::REFUNDS, &[("payment_intent", uncaptured_id)], None)
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.error()["code"], "payment_intent_unexpected_state");

    let missing = h
        .post(paths::REFUNDS, &[("payment_intent", "pi_nope")], None)
        .await;
    assert_eq!(missing.error()["code"], "resource_missing");
    let neither = h.post(paths::REFUNDS, &[("amount", "1")], None).await;
    assert_eq!(neither.error()["code"], "parameter_missing");
}

#[tokio::test]
async fn get_payment_intent_returns_the_stored_intent() {
    let h = Harness::start().await;
    let created = h.charge(cards::SUCCESS, "manual").await;
    let id = created.body["id"].as_str().unwrap();
    let fetched = h.get(&format!("/v1/payment_intents/{id}")).await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.body, created.body);
    assert_eq!(h.gateway.payment_intent(id).unwrap(), created.body);

    let missing = h.get("/v1/payment_intents/pi_nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error()["type"], "invalid_request_error");
    assert_eq!(missing.error()["code"], "resource_missing");
}

#[tokio::test]
async fn the_redirect_endpoint_answers_302_to_payment_intents() {
    let h = Harness::start().await;
    let response = h
        .client
        .post(h.url(paths::TEST_REDIRECT))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(
        response.headers().get("location").unwrap(),
        paths::PAYMENT_INTENTS
    );
}

#[tokio::test]
async fn the_huge_endpoint_answers_with_ten_mebibytes_of_json() {
    let h = Harness::start().await;
    let response = h.client.post(h.url(paths::TEST_HUGE)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.content_length(), Some(HUGE_BODY_BYTES as u64));
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), HUGE_BODY_BYTES);
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["object"], "payment_intent");

    let mut streamed = h
        .client
        .post(h.url("/test/huge?chunked=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.content_length(), None, "no length announced");
    let mut total = 0;
    while let Some(chunk) = streamed.chunk().await.unwrap() {
        total += chunk.len();
    }
    assert_eq!(total, HUGE_BODY_BYTES);
}

#[tokio::test]
async fn the_slow_endpoint_answers_after_the_hang_duration() {
    let h = Harness::start_with(Duration::from_millis(300), false).await;
    let started = Instant::now();
    let response = h.client.post(h.url(paths::TEST_SLOW)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn requests_are_logged_with_keys_and_stripe_version_but_no_card_data() {
    let h = Harness::start().await;
    h.post(
        paths::PAYMENT_METHODS,
        &card_params(cards::SUCCESS),
        Some("log-1"),
    )
    .await;
    let log = h.gateway.requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].method, "POST");
    assert_eq!(log[0].path, paths::PAYMENT_METHODS);
    assert_eq!(log[0].idempotency_key.as_deref(), Some("log-1"));
    assert_eq!(log[0].stripe_version.as_deref(), Some("2024-06-20"));
    let text = format!("{log:?} {:?} {:?}", h.stats(), h.gateway);
    assert!(
        !text.contains(cards::SUCCESS) && !text.contains("123"),
        "{text}"
    );
}

#[tokio::test]
async fn no_answer_log_or_stored_object_ever_holds_a_card_number_or_cvc() {
    let h = Harness::start_with(Duration::from_millis(50), false).await;
    let cvc = "8642";
    let all = [
        cards::SUCCESS,
        cards::DECLINED,
        cards::INSUFFICIENT_FUNDS,
        cards::EXPIRED,
        cards::INCORRECT_CVC,
        cards::PROCESSING_ERROR,
        cards::REQUIRES_ACTION,
        cards::HANG,
        cards::ANSWER_LOST,
    ];
    let mut seen = Vec::new();
    for (n, card) in all.iter().enumerate() {
        let mut params = card_params(card);
        params[4] = ("card[cvc]", cvc);
        params.push(("metadata[charge_id]", "ch_canary"));
        let key = format!("canary-{n}");
        let pm = h.post(paths::PAYMENT_METHODS, &params, Some(&key)).await;
        let pm_id = pm.body["id"].as_str().unwrap().to_owned();
        seen.push(pm.body);
        let mut intent = intent_params(&pm_id, "manual");
        intent.push(("metadata[charge_id]", "ch_canary"));
        for _ in 0..2 {
            let answer = h.post(paths::PAYMENT_INTENTS, &intent, Some(&key)).await;
            seen.push(answer.body);
        }
    }
    for intent in h
        .gateway
        .payment_intents_with_metadata("charge_id", "ch_canary")
    {
        let id = intent["id"].as_str().unwrap();
        if intent["status"] == "requires_capture" {
            let captured = h.post(&capture_path(id), &[], None).await;
            let refund = h
                .post(paths::REFUNDS, &[("payment_intent", id)], None)
                .await;
            seen.extend([captured.body, refund.body]);
        } else {
            seen.push(h.post(&cancel_path(id), &[], None).await.body);
        }
        seen.push(intent);
    }
    let search = h
        .search(&[
            ("query", "metadata['charge_id']:'ch_canary'"),
            ("limit", "100"),
        ])
        .await;
    assert_eq!(search.body["data"].as_array().unwrap().len(), all.len());
    seen.push(search.body);
    let text = format!(
        "{} {:?} {:?} {:?}",
        serde_json::to_string(&seen).unwrap(),
        h.gateway.requests(),
        h.stats(),
        h.gateway
    );
    for card in all {
        assert!(!text.contains(card), "{card} found");
    }
    assert!(!text.contains(cvc), "the CVC found");
}

#[tokio::test]
async fn client_certificates_are_required_when_a_client_ca_is_given() {
    let h = Harness::start_with(Duration::from_secs(30), true).await;
    let refused = h.client.get(h.url("/v1/payment_intents/pi_x")).send().await;
    assert!(
        refused.is_err(),
        "a client without a certificate got through"
    );

    let (cert, key) = h.pki.client_cert("vault", None, "vault");
    let client = client_trusting(&h.pki, Some((&cert, &key)));
    let response = client
        .get(h.url("/v1/payment_intents/pi_x"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn plain_http_works_on_loopback() {
    let gateway = TestGateway::start(TestGatewayOptions {
        secret_key: KEY.to_owned(),
        ..TestGatewayOptions::default()
    })
    .await
    .unwrap();
    assert!(gateway.url().starts_with("http://127.0.0.1:"));
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}{}", gateway.url(), paths::PAYMENT_METHODS))
        .bearer_auth(KEY)
        .body(encode(&card_params(cards::SUCCESS)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["card"]["last4"], "4242");
    gateway.shutdown().await;
}

#[tokio::test]
async fn plain_http_is_refused_off_loopback() {
    let err = TestGateway::start(TestGatewayOptions {
        addr: "0.0.0.0:0".parse().unwrap(),
        ..TestGatewayOptions::default()
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, TestGatewayError::PlainHttpNotLoopback { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn shutdown_answers_hanging_requests_at_once() {
    let h = Harness::start().await;
    let pm = h.payment_method(cards::HANG).await;
    let body = encode(&intent_params(&pm, "automatic"));
    let started = Instant::now();
    let Harness {
        gateway, client, ..
    } = h;
    let url = format!("{}{}", gateway.url(), paths::PAYMENT_INTENTS);
    let pending = tokio::spawn(async move {
        client
            .post(url)
            .bearer_auth(KEY)
            .body(body)
            .send()
            .await
            .map(|r| r.status())
    });
    while gateway.stats().executed_on(paths::PAYMENT_INTENTS) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway.shutdown().await;
    let status = pending.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(10));
}
