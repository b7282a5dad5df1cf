//! The `stripe` connector: the public Stripe API as documented.
//!
//! # Charge
//!
//! 1. `POST {base}/v1/payment_methods` — `type=card`, `card[number]`, `card[exp_month]`,
//!    `card[exp_year]`, `card[cvc]` (only when the charge has one), `billing_details[name]`
//!    (only when the holder is known) and `metadata[cardvault_charge_id]` → a PaymentMethod
//!    `pm_…`.
//! 2. `POST {base}/v1/payment_intents` — `amount`, `currency` (lower-case, as Stripe writes
//!    it), `payment_method=pm_…`, `confirm=true`, `capture_method=automatic|manual`, the card
//!    as the only payment method type (so that Stripe does not ask for a `return_url` for
//!    redirect-based methods the account may have enabled: `payment_method_types[0]=card`
//!    up to 2024-06-20, `allowed_payment_method_types[0]=card` from 2026-09-30.endive, which
//!    removed the old name), `description` (when not empty; with ` [ch_…]` appended when
//!    `charge_id_in_description` is set), the caller's `metadata[k]=v` and then
//!    `metadata[cardvault_charge_id]` → a confirmed PaymentIntent `pi_…`.
//!
//! `metadata[cardvault_charge_id]` is [`ChargeParams::charge_id`], the vault's charge
//! id, written after the caller's metadata (a caller key of that name is left out), so that
//! [`Connector::lookup`] can find the payment by Stripe's search when no answer named it.
//!
//! Every POST carries `Authorization: Bearer <secret key>`, the pinned `Stripe-Version` and
//! an `Idempotency-Key` derived from the charge id and distinct per step: `<key>-pm` for the
//! PaymentMethod, `<key>-pi` for the PaymentIntent. A re-send with the same key and the same
//! parameters therefore gets Stripe's saved answers: the same PaymentMethod and the same
//! PaymentIntent, never a second charge — as long as Stripe still keeps the key (at least 24
//! hours; [`Connector::resend_window`] is `idempotency_window_secs`, 23 hours by default).
//!
//! # Mapping
//!
//! PaymentIntent `status`: `succeeded` → Succeeded; `requires_capture` (manual capture) →
//! Succeeded, meaning *authorized*, to be captured later; `requires_action` →
//! RequiresAction with [`NextAction`] (`client_secret`, `next_action.type`,
//! `next_action.redirect_to_url.url` and the whole `next_action`); `processing` → Unknown;
//! `requires_payment_method` → Declined (with `last_payment_error`'s codes);
//! `requires_confirmation` and `canceled` → Failed (not charged); anything else → Unknown.
//!
//! Stripe errors (`{"error": {type, code, decline_code, message, payment_intent}}`): any HTTP
//! 409, whatever its body (Stripe answers `invalid_request_error` /
//! `idempotency_key_in_use` while a request with the same key is still being processed) →
//! Unknown; `card_error` → Declined with `decline_code` (or `code` when there is none) and
//! the message; any other 4xx (`invalid_request_error`, `idempotency_error` for a key reused
//! with other parameters, authentication, rate limits) → Failed with the message. The
//! payment id comes from `error.payment_intent.id` when present. 5xx, a body that does not
//! parse, a redirect, an oversized body, a timeout or a broken connection while creating the
//! PaymentIntent → Unknown.
//!
//! On a first send, step 1 charges nothing, so anything that goes wrong there other than a
//! `card_error` (Declined, e.g. `incorrect_number`) or a 409 (Unknown) is Failed: the
//! PaymentIntent was never sent. On a re-send ([`ChargeParams::resend`]) the first send may
//! have charged, so every failure of step 1 is Unknown (a lapsed CVC hold, for one, changes
//! step 1's parameters and Stripe refuses the key with `idempotency_error`), and of step 2
//! only a PaymentIntent, a `card_error` or a plain `invalid_request_error` settle the charge.
//!
//! # Lookup
//!
//! With a payment id, `GET /v1/payment_intents/{id}` (404 → not found); without, `GET
//! /v1/payment_intents/search?query=metadata['cardvault_charge_id']:'<charge id>'`. A found
//! PaymentIntent maps as above; one whose amount or currency differs from the charge is for
//! an operator to look at (Unavailable). Of several found, the one that charged wins. Stripe
//! documents search as eventually consistent (usually under a minute): a charge sent moments
//! ago may not be found yet, which the caller's backoff has to allow for.
//!
//! # Capture, cancel, refund
//!
//! `POST /v1/payment_intents/{id}/capture` (`amount_to_capture` for a partial capture),
//! `POST /v1/payment_intents/{id}/cancel`, `POST /v1/refunds` (`payment_intent`, `amount`,
//! `metadata[cardvault_charge_id]`), each with the operation's own `Idempotency-Key`.

use std::{fmt, time::Duration};

use reqwest::{
    Method, Url,
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use secrecy::ExposeSecret as _;
use serde_json::Value;
use zeroize::Zeroizing;

use super::{
    ChargeCard, ChargeParams, ChargeRef, ChargeStatus, Connector, GatewayError, GatewaySettings,
    Lookup, NextAction, Operation, OperationKind, OperationOutcome, OperationStatus, Outcome,
    client::{self, Deadline, Failure, HttpClient},
    encode, observed, observed_lookup, observed_operation,
};

const STRIPE_VERSION: HeaderName = HeaderName::from_static("stripe-version");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The metadata key that tags every PaymentMethod, PaymentIntent and refund with the vault's
/// charge id.
pub(crate) const CHARGE_ID_METADATA: &str = "cardvault_charge_id";

/// How each known `Stripe-Version` names the PaymentIntent's list of payment method types
/// (2026-09-30.endive renamed it and stopped accepting the old name).
const PAYMENT_METHOD_TYPES_PARAM: [(&str, &str); 3] = [
    ("2024-06-20", "payment_method_types[0]"),
    ("2026-09-30.endive", "allowed_payment_method_types[0]"),
    ("2026-10-28.endive", "allowed_payment_method_types[0]"),
];

/// The name `version` gives the payment method types parameter, if this connector knows it.
fn payment_method_types_param(version: &str) -> Option<&'static str> {
    PAYMENT_METHOD_TYPES_PARAM
        .iter()
        .find_map(|(v, param)| (*v == version).then_some(*param))
}

/// A `stripe` gateway.
pub(crate) struct StripeConnector {
    name: String,
    http: HttpClient,
    payment_methods: Url,
    payment_intents: Url,
    search: Url,
    refunds: Url,
    /// `Bearer <secret>`, marked sensitive. Built once, so the secret is not copied into a
    /// fresh (unzeroized) header buffer on every request.
    authorization: HeaderValue,
    version: HeaderValue,
    payment_method_types: &'static str,
    charge_id_in_description: bool,
    resend_window: Duration,
}

impl fmt::Debug for StripeConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeConnector")
            .field("name", &self.name)
            .field("payment_intents", &self.payment_intents.as_str())
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl StripeConnector {
    /// Builds the connector from checked settings, reading the secret and TLS files.
    pub(crate) fn new(settings: &GatewaySettings) -> Result<StripeConnector, GatewayError> {
        let config_error = |reason: &str| GatewayError::Config {
            gateway: settings.name.clone(),
            reason: reason.to_owned(),
        };
        let payment_method_types = payment_method_types_param(settings.stripe_version())
            .ok_or_else(|| config_error("stripe_version is not one this connector knows"))?;
        let secret = settings
            .secret_source()
            .ok_or_else(|| config_error("set secret_file or secret_env"))?
            .read(&settings.name)?;
        let mut bearer = Zeroizing::new(String::with_capacity(7 + secret.expose_secret().len()));
        bearer.push_str("Bearer ");
        bearer.push_str(secret.expose_secret());
        let authorization = HeaderValue::from_str(&bearer)
            .map(client::sensitive)
            .map_err(|_| config_error("the secret is not a valid header value"))?;
        let version = HeaderValue::from_str(settings.stripe_version())
            .map_err(|_| config_error("stripe_version is not a valid header value"))?;
        let http = HttpClient::new(settings)?;
        Ok(StripeConnector {
            name: settings.name.clone(),
            payment_methods: http.url("/v1/payment_methods")?,
            payment_intents: http.url("/v1/payment_intents")?,
            search: http.url("/v1/payment_intents/search")?,
            refunds: http.url("/v1/refunds")?,
            http,
            authorization,
            version,
            payment_method_types,
            charge_id_in_description: settings.charge_id_in_description,
            resend_window: settings.idempotency_window(),
        })
    }

    /// Headers of a request; `idempotency_key` for a POST.
    fn headers(&self, idempotency_key: Option<&str>) -> Option<HeaderMap> {
        let mut headers = HeaderMap::with_capacity(5);
        headers.insert(header::AUTHORIZATION, self.authorization.clone());
        headers.insert(STRIPE_VERSION, self.version.clone());
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(key) = idempotency_key {
            headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_str(key).ok()?);
            let (name, value) = client::content_type(true);
            headers.insert(name, value);
        }
        Some(headers)
    }

    fn post_headers(&self, idempotency_key: &str, suffix: &str) -> Result<HeaderMap, Outcome> {
        self.headers(Some(&format!("{idempotency_key}{suffix}")))
            .ok_or_else(|| Outcome::ours(ChargeStatus::Failed, "invalid idempotency key", None))
    }

    async fn charge_steps(&self, card: &ChargeCard<'_>, params: &ChargeParams<'_>) -> Outcome {
        let deadline = self.http.deadline();
        let before_intent = if params
            .metadata
            .iter()
            .any(|(k, _)| k.is_empty() || k.contains(['[', ']']))
        {
            Err(Outcome::ours(
                ChargeStatus::Failed,
                "metadata keys must be non-empty and without square brackets (Stripe)",
                None,
            ))
        } else {
            self.create_payment_method(card, params, deadline).await
        };
        let payment_method = match before_intent {
            Ok(id) => id,
            Err(outcome) if params.resend && outcome.status != ChargeStatus::Unknown => {
                return unknown_on_resend(outcome, "the payment method step failed");
            }
            Err(outcome) => return outcome,
        };
        let (outcome, settles) = self
            .create_payment_intent(&payment_method, params, deadline)
            .await;
        if params.resend && !settles && outcome.status != ChargeStatus::Unknown {
            return unknown_on_resend(
                outcome,
                "the payment intent step gave no answer about the payment",
            );
        }
        outcome
    }

    /// Step 1; `Err` is the charge's outcome when there is no PaymentMethod.
    async fn create_payment_method(
        &self,
        card: &ChargeCard<'_>,
        params: &ChargeParams<'_>,
        deadline: Deadline,
    ) -> Result<String, Outcome> {
        let headers = self.post_headers(params.charge_id.as_str(), "-pm")?;
        let exp_month = Zeroizing::new(card.exp_month.to_string());
        let exp_year = Zeroizing::new(card.exp_year.to_string());
        let tag = format!("metadata[{CHARGE_ID_METADATA}]");
        let mut pairs = vec![
            ("type", "card"),
            ("card[number]", card.pan.expose_digits()),
            ("card[exp_month]", exp_month.as_str()),
            ("card[exp_year]", exp_year.as_str()),
        ];
        if let Some(cvc) = card.cvc {
            pairs.push(("card[cvc]", cvc));
        }
        if let Some(holder) = card.holder {
            pairs.push(("billing_details[name]", holder));
        }
        pairs.push((tag.as_str(), params.charge_id.as_str()));
        let body = encode::form_body(&pairs);
        drop(pairs);
        match self
            .http
            .send(
                "payment_method",
                Method::POST,
                &self.payment_methods,
                headers,
                body,
                deadline,
            )
            .await
        {
            Ok(answer) => map_payment_method(answer.status, &answer.body),
            Err(failure) => Err(Outcome::ours(
                ChargeStatus::Failed,
                format!("payment method not created: {}", failure.message()),
                failure.http_status(),
            )),
        }
    }

    /// Step 2: the outcome, and whether it settles a re-sent charge.
    async fn create_payment_intent(
        &self,
        payment_method: &str,
        params: &ChargeParams<'_>,
        deadline: Deadline,
    ) -> (Outcome, bool) {
        let headers = match self.post_headers(params.charge_id.as_str(), "-pi") {
            Ok(headers) => headers,
            Err(outcome) => return (outcome, false),
        };
        let body = payment_intent_body(
            payment_method,
            params,
            self.payment_method_types,
            self.charge_id_in_description,
        );
        match self
            .http
            .send(
                "payment_intent",
                Method::POST,
                &self.payment_intents,
                headers,
                body,
                deadline,
            )
            .await
        {
            Ok(answer) => map_payment_intent(answer.status, &answer.body),
            Err(failure) if failure.not_sent() => (
                Outcome::ours(ChargeStatus::Failed, failure.message(), None),
                false,
            ),
            // Sent, or maybe sent: Stripe may have charged.
            Err(failure) => (
                Outcome::ours(
                    ChargeStatus::Unknown,
                    failure.message(),
                    failure.http_status(),
                ),
                false,
            ),
        }
    }

    async fn lookup_steps(&self, charge: &ChargeRef<'_>) -> Lookup {
        let deadline = self.http.deadline();
        let Some(headers) = self.headers(None) else {
            return Lookup::Unavailable {
                reason: "cannot build the request headers".to_owned(),
            };
        };
        let intent = match charge.payment_id {
            Some(id) => self.retrieve(id, headers, deadline).await,
            None => {
                self.search_by_charge(charge.charge_id.as_str(), headers, deadline)
                    .await
            }
        };
        match intent {
            Ok(intent) => match mismatch(&intent, charge) {
                Some(reason) => Lookup::Unavailable { reason },
                None => Lookup::Found(map_intent_object(&intent, 200)),
            },
            Err(lookup) => lookup,
        }
    }

    /// `GET /v1/payment_intents/{id}`: the intent, or the lookup's result without one.
    async fn retrieve(
        &self,
        id: &str,
        headers: HeaderMap,
        deadline: Deadline,
    ) -> Result<Value, Lookup> {
        let Some(url) = self.intent_url(id, "") else {
            return Err(Lookup::Unavailable {
                reason: "the payment id is not a Stripe PaymentIntent id".to_owned(),
            });
        };
        let asked = format!("GET /v1/payment_intents/{id}");
        let answer = self
            .http
            .send(
                "lookup",
                Method::GET,
                &url,
                headers,
                Zeroizing::new(Vec::new()),
                deadline,
            )
            .await
            .map_err(|failure| unavailable_after(&asked, failure))?;
        let parsed: Option<Value> = serde_json::from_slice(&answer.body).ok();
        match answer.status {
            200 => parsed
                .filter(|v| v.get("object").and_then(Value::as_str) == Some("payment_intent"))
                .ok_or_else(|| Lookup::Unavailable {
                    reason: format!("{asked} → HTTP 200 without a PaymentIntent"),
                }),
            404 => Err(Lookup::NotFound {
                evidence: format!(
                    "{asked} → HTTP 404 ({})",
                    parsed
                        .as_ref()
                        .and_then(|v| text(v, "/error/code").or_else(|| text(v, "/error/message")))
                        .unwrap_or_else(|| "no such payment intent".to_owned())
                ),
            }),
            status => Err(Lookup::Unavailable {
                reason: error_answer(&asked, status, parsed.as_ref()),
            }),
        }
    }

    /// Stripe's search for the intent tagged with `charge_id`.
    async fn search_by_charge(
        &self,
        charge_id: &str,
        headers: HeaderMap,
        deadline: Deadline,
    ) -> Result<Value, Lookup> {
        let query = search_query(charge_id);
        let mut url = self.search.clone();
        url.query_pairs_mut().append_pair("query", &query);
        let asked = format!("GET /v1/payment_intents/search query={query}");
        let answer = self
            .http
            .send(
                "lookup",
                Method::GET,
                &url,
                headers,
                Zeroizing::new(Vec::new()),
                deadline,
            )
            .await
            .map_err(|failure| unavailable_after(&asked, failure))?;
        let parsed: Option<Value> = serde_json::from_slice(&answer.body).ok();
        if answer.status != 200 {
            return Err(Lookup::Unavailable {
                reason: error_answer(&asked, answer.status, parsed.as_ref()),
            });
        }
        let Some(found) = parsed
            .as_ref()
            .and_then(|v| v.get("data"))
            .and_then(Value::as_array)
        else {
            return Err(Lookup::Unavailable {
                reason: format!("{asked} → HTTP 200 without a result list"),
            });
        };
        match found.as_slice() {
            [] => Err(Lookup::NotFound {
                evidence: format!("{asked} → HTTP 200, 0 results"),
            }),
            [one] => Ok(one.clone()),
            several => {
                let ids: Vec<String> = several.iter().filter_map(|i| text(i, "/id")).collect();
                let chosen = pick_intent(several).clone();
                tracing::warn!(
                    gateway = %self.name,
                    payment_intents = ids.join(", "),
                    chosen = text(&chosen, "/id").unwrap_or_default(),
                    "several payment intents carry one charge id"
                );
                Ok(chosen)
            }
        }
    }

    /// `{base}/v1/payment_intents/{id}{tail}`, for an id of letters, digits and `_` only.
    fn intent_url(&self, id: &str, tail: &str) -> Option<Url> {
        let plain = !id.is_empty()
            && id.len() <= 255
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        plain
            .then(|| {
                self.http
                    .url(&format!("/v1/payment_intents/{id}{tail}"))
                    .ok()
            })
            .flatten()
    }

    async fn operate_steps(&self, operation: &Operation<'_>) -> OperationOutcome {
        let deadline = self.http.deadline();
        let failed = |message: &str| OperationOutcome {
            status: OperationStatus::Failed,
            gateway_id: None,
            amount: None,
            message: Some(message.to_owned()),
            http_status: None,
        };
        let Some(headers) = self.headers(Some(operation.operation_id.as_str())) else {
            return failed("invalid idempotency key");
        };
        let amount = operation.amount.map(|a| a.to_string());
        let tag = format!("metadata[{CHARGE_ID_METADATA}]");
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        let url = match operation.kind {
            OperationKind::Capture => {
                if let Some(amount) = &amount {
                    pairs.push(("amount_to_capture", amount));
                }
                self.intent_url(operation.payment_id, "/capture")
            }
            OperationKind::Cancel => self.intent_url(operation.payment_id, "/cancel"),
            OperationKind::Refund => {
                pairs.push(("payment_intent", operation.payment_id));
                if let Some(amount) = &amount {
                    pairs.push(("amount", amount));
                }
                pairs.push((tag.as_str(), operation.charge_id.as_str()));
                self.intent_url(operation.payment_id, "")
                    .map(|_| self.refunds.clone())
            }
        };
        let Some(url) = url else {
            return failed("the payment id is not a Stripe PaymentIntent id");
        };
        let body = encode::form_body(&pairs);
        match self
            .http
            .send(
                operation.kind.as_str(),
                Method::POST,
                &url,
                headers,
                body,
                deadline,
            )
            .await
        {
            Ok(answer) => map_operation(operation.kind, answer.status, &answer.body),
            Err(failure) => OperationOutcome {
                status: if failure.not_sent() {
                    OperationStatus::Failed
                } else {
                    OperationStatus::Unknown
                },
                gateway_id: None,
                amount: None,
                message: Some(failure.message().to_owned()),
                http_status: failure.http_status(),
            },
        }
    }
}

/// Step 2's form body: the same bytes for the same charge, so a re-send matches the first
/// send's parameters as Stripe's idempotency check demands.
fn payment_intent_body(
    payment_method: &str,
    params: &ChargeParams<'_>,
    payment_method_types: &str,
    charge_id_in_description: bool,
) -> Zeroizing<Vec<u8>> {
    let amount = params.amount.to_string();
    let currency = params.currency.as_str().to_ascii_lowercase();
    let description = match (charge_id_in_description, params.description) {
        (false, description) => description.to_owned(),
        (true, "") => params.charge_id.as_str().to_owned(),
        (true, description) => format!("{description} [{}]", params.charge_id.as_str()),
    };
    let callers: Vec<(String, &str)> = params
        .metadata
        .iter()
        .filter(|(k, _)| k != CHARGE_ID_METADATA)
        .map(|(k, v)| (format!("metadata[{k}]"), v.as_str()))
        .collect();
    let tag = format!("metadata[{CHARGE_ID_METADATA}]");
    let mut pairs = vec![
        ("amount", amount.as_str()),
        ("currency", currency.as_str()),
        ("payment_method", payment_method),
        ("confirm", "true"),
        ("capture_method", params.capture.as_str()),
        (payment_method_types, "card"),
    ];
    if !description.is_empty() {
        pairs.push(("description", description.as_str()));
    }
    for (key, value) in &callers {
        pairs.push((key.as_str(), value));
    }
    pairs.push((tag.as_str(), params.charge_id.as_str()));
    encode::form_body(&pairs)
}

/// `outcome` of a re-send that says nothing about the payment itself: Unknown, saying why.
fn unknown_on_resend(outcome: Outcome, what: &str) -> Outcome {
    let cause = outcome.message.unwrap_or_default();
    Outcome {
        status: ChargeStatus::Unknown,
        decline_code: None,
        message: Some(format!(
            "{what} on a re-send ({cause}); the first send may have charged: look the charge up"
        )),
        action: None,
        ..outcome
    }
}

/// Stripe's search query for the intent tagged with `charge_id` (quotes and backslashes
/// escaped as the search query language wants them).
fn search_query(charge_id: &str) -> String {
    let escaped = charge_id.replace('\\', "\\\\").replace('\'', "\\'");
    format!("metadata['{CHARGE_ID_METADATA}']:'{escaped}'")
}

/// Of several intents tagged with one charge, the one that took money, else one still on its
/// way, else the first.
fn pick_intent(intents: &[Value]) -> &Value {
    let rank = |intent: &Value| match intent.get("status").and_then(Value::as_str) {
        Some("succeeded" | "requires_capture") => 0,
        Some("processing" | "requires_action") => 1,
        _ => 2,
    };
    intents
        .iter()
        .min_by_key(|intent| rank(intent))
        .unwrap_or(&intents[0])
}

/// Why a found intent cannot be the charge: another amount or currency.
fn mismatch(intent: &Value, charge: &ChargeRef<'_>) -> Option<String> {
    let amount = intent.get("amount").and_then(Value::as_u64);
    let currency = intent.get("currency").and_then(Value::as_str);
    let expected_currency = charge.currency.as_str().to_ascii_lowercase();
    (amount != Some(charge.amount) || currency != Some(expected_currency.as_str())).then(|| {
        format!(
            "payment intent {} is for {} {}, the charge for {} {}: an operator must look",
            text(intent, "/id").unwrap_or_else(|| "(no id)".to_owned()),
            amount.map_or_else(|| "?".to_owned(), |a| a.to_string()),
            currency.unwrap_or("?"),
            charge.amount,
            charge.currency,
        )
    })
}

/// A lookup that got no answer.
fn unavailable_after(asked: &str, failure: Failure) -> Lookup {
    Lookup::Unavailable {
        reason: format!("{asked}: {}", failure.message()),
    }
}

/// An error answer, described.
fn error_answer(asked: &str, status: u16, parsed: Option<&Value>) -> String {
    match parsed.and_then(|v| text(v, "/error/message")) {
        Some(message) => format!("{asked} → HTTP {status}: {message}"),
        None => format!("{asked} → HTTP {status}"),
    }
}

#[async_trait::async_trait]
impl Connector for StripeConnector {
    fn name(&self) -> &str {
        &self.name
    }

    fn resend_window(&self) -> Option<Duration> {
        Some(self.resend_window)
    }

    async fn charge(&self, card: &ChargeCard<'_>, params: &ChargeParams<'_>) -> Outcome {
        observed(&self.name, card, params, self.charge_steps(card, params)).await
    }

    async fn lookup(&self, charge: &ChargeRef<'_>) -> Lookup {
        observed_lookup(&self.name, charge, self.lookup_steps(charge)).await
    }

    fn supports(&self, kind: OperationKind) -> bool {
        matches!(
            kind,
            OperationKind::Capture | OperationKind::Refund | OperationKind::Cancel
        )
    }

    async fn operate(&self, operation: &Operation<'_>) -> OperationOutcome {
        observed_operation(&self.name, operation, self.operate_steps(operation)).await
    }

    /// Stripe declines a confirmed PaymentIntent with HTTP 402 and names the intent it
    /// created (`pi_` and 24 letters and digits), so the decoy names one too.
    fn decoy_decline(&self) -> Outcome {
        Outcome {
            payment_id: crate::crypto::random_base62(PAYMENT_INTENT_ID_CHARS)
                .ok()
                .map(|id| format!("pi_{id}")),
            http_status: Some(402),
            ..super::generic_decline()
        }
    }
}

/// Letters and digits after `pi_` in a PaymentIntent id.
const PAYMENT_INTENT_ID_CHARS: usize = 24;

/// A string field of a JSON object.
fn text(value: &Value, pointer: &str) -> Option<String> {
    value.pointer(pointer)?.as_str().map(str::to_owned)
}

/// Step 1's answer: the PaymentMethod id, or the charge's outcome.
fn map_payment_method(http_status: u16, body: &[u8]) -> Result<String, Outcome> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if http_status == 200 {
        return parsed.as_ref().and_then(|v| text(v, "/id")).ok_or_else(|| {
            Outcome::ours(
                ChargeStatus::Failed,
                "payment method not created: unparseable gateway response",
                Some(http_status),
            )
        });
    }
    if http_status == 409 {
        return Err(in_progress(parsed.as_ref()));
    }
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    match error.map(|e| map_error(http_status, e)) {
        Some(
            outcome @ Outcome {
                status: ChargeStatus::Declined | ChargeStatus::Unknown,
                ..
            },
        ) => Err(outcome),
        Some(mut outcome) => {
            outcome.status = ChargeStatus::Failed;
            Err(outcome)
        }
        None => Err(Outcome::ours(
            ChargeStatus::Failed,
            format!("payment method not created: gateway answered HTTP {http_status}"),
            Some(http_status),
        )),
    }
}

/// Any 409: Stripe is still processing a request with the same key (whatever the body).
fn in_progress(parsed: Option<&Value>) -> Outcome {
    Outcome {
        payment_id: parsed.and_then(|v| text(v, "/error/payment_intent/id")),
        ..Outcome::ours(
            ChargeStatus::Unknown,
            parsed
                .and_then(|v| text(v, "/error/message"))
                .unwrap_or_else(|| {
                    "a request with the same key is in progress (HTTP 409)".to_owned()
                }),
            Some(409),
        )
    }
}

/// Step 2's answer, and whether it settles a re-sent charge: a PaymentIntent, a card error or
/// a plain invalid request do; an error that is about the request (authentication, rate
/// limits, a key reused with other parameters) does not.
fn map_payment_intent(http_status: u16, body: &[u8]) -> (Outcome, bool) {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let unknown =
        |message: String| Outcome::ours(ChargeStatus::Unknown, message, Some(http_status));
    match http_status {
        200 => {
            let Some(intent) = parsed.as_ref().filter(|v| v.is_object()) else {
                return (unknown("unparseable gateway response".to_owned()), false);
            };
            (map_intent_object(intent, http_status), true)
        }
        409 => (in_progress(parsed.as_ref()), false),
        400..=499 => match parsed.as_ref().and_then(|v| v.get("error")) {
            Some(error) => {
                let kind = error.get("type").and_then(Value::as_str);
                let settles = match kind {
                    Some("card_error") => true,
                    Some("invalid_request_error") => http_status == 400,
                    _ => false,
                };
                (map_error(http_status, error), settles)
            }
            None => (
                unknown(format!("unparseable gateway error (HTTP {http_status})")),
                false,
            ),
        },
        _ => {
            let message = parsed.as_ref().and_then(|v| text(v, "/error/message"));
            (
                Outcome {
                    message: Some(
                        message.unwrap_or_else(|| format!("gateway error (HTTP {http_status})")),
                    ),
                    ..unknown(String::new())
                },
                false,
            )
        }
    }
}

/// A PaymentIntent object.
fn map_intent_object(intent: &Value, http_status: u16) -> Outcome {
    let stripe_status = intent.get("status").and_then(Value::as_str);
    let status = match stripe_status {
        Some("succeeded" | "requires_capture") => ChargeStatus::Succeeded,
        Some("requires_action") => ChargeStatus::RequiresAction,
        Some("requires_payment_method") => ChargeStatus::Declined,
        Some("requires_confirmation" | "canceled") => ChargeStatus::Failed,
        // `processing`, and statuses newer than this connector.
        _ => ChargeStatus::Unknown,
    };
    let (decline_code, message) = match intent.get("last_payment_error") {
        Some(error) if error.is_object() => (
            text(error, "/decline_code").or_else(|| text(error, "/code")),
            text(error, "/message"),
        ),
        _ => (None, None),
    };
    let message = message.or_else(|| match stripe_status {
        Some("processing") => Some("payment is processing".to_owned()),
        Some(s @ ("requires_confirmation" | "canceled")) => Some(format!("payment intent is {s}")),
        Some(s) if status == ChargeStatus::Unknown => Some(format!("unexpected status {s}")),
        None => Some("payment intent without a status".to_owned()),
        _ => None,
    });
    let action = (status == ChargeStatus::RequiresAction).then(|| {
        let next = intent.get("next_action").filter(|v| v.is_object());
        Box::new(NextAction {
            client_secret: text(intent, "/client_secret"),
            kind: next.and_then(|n| text(n, "/type")),
            redirect_url: next.and_then(|n| text(n, "/redirect_to_url/url")),
            details_json: next.map(Value::to_string),
        })
    });
    Outcome {
        status,
        payment_id: text(intent, "/id"),
        decline_code: if status == ChargeStatus::Declined {
            decline_code
        } else {
            None
        },
        message,
        http_status: Some(http_status),
        action,
    }
}

/// A Stripe error object (not a 409: [`in_progress`]).
fn map_error(http_status: u16, error: &Value) -> Outcome {
    let kind = error.get("type").and_then(Value::as_str);
    let code = text(error, "/code");
    let message = text(error, "/message");
    let payment_id = text(error, "/payment_intent/id");
    let (status, decline_code) = match kind {
        Some("card_error") => (
            ChargeStatus::Declined,
            text(error, "/decline_code").or(code),
        ),
        _ => (ChargeStatus::Failed, None),
    };
    Outcome {
        status,
        payment_id,
        decline_code,
        message,
        http_status: Some(http_status),
        action: None,
    }
}

/// The answer to a capture, cancel or refund.
fn map_operation(kind: OperationKind, http_status: u16, body: &[u8]) -> OperationOutcome {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let outcome = |status, message: Option<String>| OperationOutcome {
        status,
        gateway_id: None,
        amount: None,
        message,
        http_status: Some(http_status),
    };
    match http_status {
        200 => {
            let Some(object) = parsed.as_ref().filter(|v| v.is_object()) else {
                return outcome(
                    OperationStatus::Unknown,
                    Some("unparseable gateway response".to_owned()),
                );
            };
            let stripe_status = object.get("status").and_then(Value::as_str);
            let (status, amount) = match (kind, stripe_status) {
                (OperationKind::Capture, Some("succeeded")) => (
                    OperationStatus::Succeeded,
                    object.get("amount_received").and_then(Value::as_u64),
                ),
                (OperationKind::Cancel, Some("canceled")) => (OperationStatus::Succeeded, None),
                (OperationKind::Refund, Some("succeeded" | "pending")) => (
                    OperationStatus::Succeeded,
                    object.get("amount").and_then(Value::as_u64),
                ),
                (OperationKind::Refund, Some("failed" | "canceled")) => (
                    OperationStatus::Failed,
                    object.get("amount").and_then(Value::as_u64),
                ),
                _ => (OperationStatus::Unknown, None),
            };
            let message = match (status, stripe_status) {
                (OperationStatus::Succeeded, _) => None,
                (OperationStatus::Failed, _) => text(object, "/failure_reason")
                    .map(|r| format!("refund failed: {r}"))
                    .or_else(|| stripe_status.map(|s| format!("refund {s}"))),
                (_, Some(s)) => Some(format!("unexpected status {s} after {}", kind.as_str())),
                (_, None) => Some(format!("no status after {}", kind.as_str())),
            };
            OperationOutcome {
                gateway_id: text(object, "/id"),
                amount,
                ..outcome(status, message)
            }
        }
        409 => outcome(
            OperationStatus::Unknown,
            Some(
                parsed
                    .as_ref()
                    .and_then(|v| text(v, "/error/message"))
                    .unwrap_or_else(|| "a request with the same key is in progress".to_owned()),
            ),
        ),
        400..=499 => match parsed.as_ref().and_then(|v| text(v, "/error/message")) {
            Some(message) => outcome(OperationStatus::Failed, Some(message)),
            None if parsed.is_some() => outcome(
                OperationStatus::Failed,
                Some(format!(
                    "gateway refused the {} (HTTP {http_status})",
                    kind.as_str()
                )),
            ),
            None => outcome(
                OperationStatus::Unknown,
                Some(format!("unparseable gateway error (HTTP {http_status})")),
            ),
        },
        _ => outcome(
            OperationStatus::Unknown,
            Some(
                parsed
                    .as_ref()
                    .and_then(|v| text(v, "/error/message"))
                    .unwrap_or_else(|| format!("gateway error (HTTP {http_status})")),
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{id::ChargeId, money::Currency};

    fn intent(status: u16, body: Value) -> Outcome {
        map_payment_intent(status, body.to_string().as_bytes()).0
    }

    fn settles_resend(status: u16, body: Value) -> bool {
        map_payment_intent(status, body.to_string().as_bytes()).1
    }

    #[test]
    fn payment_intent_statuses_map_as_documented() {
        for (stripe, ours) in [
            ("succeeded", ChargeStatus::Succeeded),
            ("requires_capture", ChargeStatus::Succeeded),
            ("requires_action", ChargeStatus::RequiresAction),
            ("processing", ChargeStatus::Unknown),
            ("requires_payment_method", ChargeStatus::Declined),
            ("requires_confirmation", ChargeStatus::Failed),
            ("canceled", ChargeStatus::Failed),
            ("something_new", ChargeStatus::Unknown),
        ] {
            let outcome = intent(200, json!({"id": "pi_1", "status": stripe}));
            assert_eq!(outcome.status, ours, "{stripe}");
            assert_eq!(outcome.payment_id.as_deref(), Some("pi_1"));
            assert_eq!(outcome.http_status, Some(200));
        }
    }

    #[test]
    fn a_declined_intent_carries_its_last_payment_error() {
        let outcome = intent(
            200,
            json!({"id": "pi_1", "status": "requires_payment_method",
                   "last_payment_error": {"type": "card_error", "code": "card_declined",
                                          "decline_code": "insufficient_funds",
                                          "message": "Your card has insufficient funds."}}),
        );
        assert_eq!(outcome.status, ChargeStatus::Declined);
        assert_eq!(outcome.decline_code.as_deref(), Some("insufficient_funds"));
        assert_eq!(
            outcome.message.as_deref(),
            Some("Your card has insufficient funds.")
        );
    }

    #[test]
    fn card_errors_are_declines_with_the_decline_code_or_else_the_code() {
        let outcome = intent(
            402,
            json!({"error": {"type": "card_error", "code": "card_declined",
                             "decline_code": "generic_decline", "message": "Your card was declined.",
                             "payment_intent": {"id": "pi_9", "status": "requires_payment_method"}}}),
        );
        assert_eq!(
            outcome,
            Outcome {
                status: ChargeStatus::Declined,
                payment_id: Some("pi_9".to_owned()),
                decline_code: Some("generic_decline".to_owned()),
                message: Some("Your card was declined.".to_owned()),
                http_status: Some(402),
                action: None,
            }
        );
        let outcome = intent(
            402,
            json!({"error": {"type": "card_error", "code": "expired_card", "message": "x"}}),
        );
        assert_eq!(outcome.decline_code.as_deref(), Some("expired_card"));
    }

    #[test]
    fn other_client_errors_fail_and_an_idempotent_request_in_progress_is_unknown() {
        let invalid = intent(
            400,
            json!({"error": {"type": "invalid_request_error", "code": "parameter_missing",
                             "message": "Missing required param: amount."}}),
        );
        assert_eq!(invalid.status, ChargeStatus::Failed);
        assert_eq!(
            invalid.message.as_deref(),
            Some("Missing required param: amount.")
        );
        assert_eq!(invalid.decline_code, None);
        let auth = intent(
            401,
            json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key"}}),
        );
        assert_eq!(auth.status, ChargeStatus::Failed);
        let busy = intent(
            409,
            json!({"error": {"type": "idempotency_error",
                             "message": "Another request with the same key is in progress"}}),
        );
        assert_eq!(busy.status, ChargeStatus::Unknown);
        let mismatch = intent(
            400,
            json!({"error": {"type": "idempotency_error",
                             "message": "Keys for idempotent requests can only be used with the same parameters"}}),
        );
        assert_eq!(mismatch.status, ChargeStatus::Failed);
    }

    #[test]
    fn server_errors_and_unparseable_answers_are_unknown() {
        assert_eq!(
            intent(
                500,
                json!({"error": {"type": "api_error", "message": "boom"}})
            )
            .status,
            ChargeStatus::Unknown
        );
        assert_eq!(
            map_payment_intent(502, b"<html>bad gateway</html>")
                .0
                .status,
            ChargeStatus::Unknown
        );
        assert_eq!(
            map_payment_intent(200, b"not json").0.status,
            ChargeStatus::Unknown
        );
        assert_eq!(
            map_payment_intent(400, b"not json").0.status,
            ChargeStatus::Unknown
        );
        assert_eq!(
            intent(201, json!({"id": "pi_1", "status": "succeeded"})).status,
            ChargeStatus::Unknown
        );
    }

    #[test]
    fn a_failed_payment_method_step_never_reports_a_charge() {
        assert_eq!(
            map_payment_method(200, br#"{"id": "pm_1"}"#).unwrap(),
            "pm_1"
        );
        let declined = map_payment_method(
            402,
            br#"{"error": {"type": "card_error", "code": "incorrect_number", "message": "Your card number is incorrect."}}"#,
        )
        .unwrap_err();
        assert_eq!(declined.status, ChargeStatus::Declined);
        assert_eq!(declined.decline_code.as_deref(), Some("incorrect_number"));
        for (status, body) in [
            (
                500,
                &br#"{"error": {"type": "api_error", "message": "boom"}}"#[..],
            ),
            (200, b"garbage"),
            (404, b"<html>"),
        ] {
            let outcome = map_payment_method(status, body).unwrap_err();
            assert_eq!(outcome.status, ChargeStatus::Failed, "{status}");
        }
        let busy = map_payment_method(
            409,
            br#"{"error": {"type": "idempotency_error", "message": "in progress"}}"#,
        )
        .unwrap_err();
        assert_eq!(busy.status, ChargeStatus::Unknown);
    }

    /// Stripe's real answer while a request with the same key is still being processed.
    fn key_in_use() -> Value {
        json!({"error": {"type": "invalid_request_error", "code": "idempotency_key_in_use",
                         "message": "There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through): ch_1-pi. Please try again later."}})
    }

    #[test]
    fn any_409_is_unknown_on_both_steps_whatever_its_body() {
        for body in [
            key_in_use(),
            json!({"error": {"type": "api_error"}}),
            json!("x"),
        ] {
            let outcome = intent(409, body.clone());
            assert_eq!(outcome.status, ChargeStatus::Unknown, "{body}");
            assert_eq!(outcome.http_status, Some(409));
            let step1 = map_payment_method(409, body.to_string().as_bytes()).unwrap_err();
            assert_eq!(step1.status, ChargeStatus::Unknown, "{body}");
        }
        for body in [&b"<html>conflict</html>"[..], b""] {
            assert_eq!(
                map_payment_intent(409, body).0.status,
                ChargeStatus::Unknown
            );
            assert_eq!(
                map_payment_method(409, body).unwrap_err().status,
                ChargeStatus::Unknown
            );
        }
        assert!(
            intent(409, key_in_use())
                .message
                .unwrap()
                .contains("in-progress request")
        );
    }

    #[test]
    fn only_answers_about_the_payment_settle_a_resend() {
        assert!(settles_resend(
            200,
            json!({"id": "pi_1", "status": "succeeded"})
        ));
        assert!(settles_resend(
            402,
            json!({"error": {"type": "card_error", "code": "card_declined"}})
        ));
        assert!(settles_resend(
            400,
            json!({"error": {"type": "invalid_request_error", "code": "parameter_missing"}})
        ));
        for (status, body) in [
            (409, key_in_use()),
            (
                400,
                json!({"error": {"type": "idempotency_error",
                                 "message": "Keys for idempotent requests can only be used with the same parameters"}}),
            ),
            (
                401,
                json!({"error": {"type": "invalid_request_error", "message": "Invalid API Key"}}),
            ),
            (
                429,
                json!({"error": {"type": "invalid_request_error", "code": "rate_limit"}}),
            ),
            (500, json!({"error": {"type": "api_error"}})),
        ] {
            assert!(!settles_resend(status, body.clone()), "{status} {body}");
        }
    }

    #[test]
    fn a_resend_turns_a_refusal_into_unknown_keeping_the_gateway_reason() {
        let refused = map_payment_method(
            400,
            br#"{"error": {"type": "idempotency_error", "message": "Keys for idempotent requests can only be used with the same parameters"}}"#,
        )
        .unwrap_err();
        assert_eq!(refused.status, ChargeStatus::Failed, "on a first send");
        let resent = unknown_on_resend(refused, "the payment method step failed");
        assert_eq!(resent.status, ChargeStatus::Unknown);
        assert_eq!(resent.http_status, Some(400));
        let message = resent.message.unwrap();
        assert!(
            message.contains("same parameters") && message.contains("may have charged"),
            "{message}"
        );
        let declined = map_payment_method(
            402,
            br#"{"error": {"type": "card_error", "code": "incorrect_number"}}"#,
        )
        .unwrap_err();
        let resent = unknown_on_resend(declined, "the payment method step failed");
        assert_eq!(
            (resent.status, resent.decline_code),
            (ChargeStatus::Unknown, None)
        );
    }

    #[test]
    fn requires_action_hands_back_the_client_secret_and_next_action() {
        let outcome = intent(
            200,
            json!({"id": "pi_3ds", "object": "payment_intent", "status": "requires_action",
                   "client_secret": "pi_3ds_secret_abc",
                   "next_action": {"type": "redirect_to_url",
                                   "redirect_to_url": {"url": "https://hooks.stripe.com/3d_secure/x",
                                                       "return_url": "https://shop.example/back"}}}),
        );
        assert_eq!(outcome.status, ChargeStatus::RequiresAction);
        let action = outcome.action.expect("an action");
        assert_eq!(action.client_secret.as_deref(), Some("pi_3ds_secret_abc"));
        assert_eq!(action.kind.as_deref(), Some("redirect_to_url"));
        assert_eq!(
            action.redirect_url.as_deref(),
            Some("https://hooks.stripe.com/3d_secure/x")
        );
        let details: Value = serde_json::from_str(action.details_json.as_deref().unwrap()).unwrap();
        assert_eq!(
            details["redirect_to_url"]["return_url"],
            "https://shop.example/back"
        );

        let sdk = intent(
            200,
            json!({"id": "pi_2", "status": "requires_action", "client_secret": "s",
                   "next_action": {"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}}}),
        );
        let action = sdk.action.unwrap();
        assert_eq!(action.kind.as_deref(), Some("use_stripe_sdk"));
        assert_eq!(action.redirect_url, None);
        assert!(
            intent(200, json!({"id": "pi_1", "status": "succeeded"}))
                .action
                .is_none()
        );
    }

    #[test]
    fn each_known_version_names_the_payment_method_types_its_own_way() {
        assert_eq!(
            payment_method_types_param("2024-06-20"),
            Some("payment_method_types[0]")
        );
        for endive in ["2026-09-30.endive", "2026-10-28.endive"] {
            assert_eq!(
                payment_method_types_param(endive),
                Some("allowed_payment_method_types[0]")
            );
        }
        assert_eq!(payment_method_types_param("2025-01-01"), None);
        for (version, _) in PAYMENT_METHOD_TYPES_PARAM {
            assert!(super::super::config::KNOWN_STRIPE_VERSIONS.contains(&version));
        }
        assert_eq!(
            PAYMENT_METHOD_TYPES_PARAM.len(),
            super::super::config::KNOWN_STRIPE_VERSIONS.len()
        );
    }

    #[test]
    fn the_search_query_names_the_charge_id_with_quotes_escaped() {
        assert_eq!(
            search_query("ch_abc"),
            "metadata['cardvault_charge_id']:'ch_abc'"
        );
        assert_eq!(
            search_query(r"a'b\c"),
            r"metadata['cardvault_charge_id']:'a\'b\\c'"
        );
    }

    #[test]
    fn of_several_intents_the_one_that_charged_is_chosen() {
        let intents = [
            json!({"id": "pi_a", "status": "requires_payment_method"}),
            json!({"id": "pi_b", "status": "processing"}),
            json!({"id": "pi_c", "status": "requires_capture"}),
        ];
        assert_eq!(pick_intent(&intents)["id"], "pi_c");
        assert_eq!(pick_intent(&intents[..2])["id"], "pi_b");
        assert_eq!(pick_intent(&intents[..1])["id"], "pi_a");
    }

    #[test]
    fn an_intent_for_another_amount_or_currency_is_not_the_charge() {
        let charge_id = ChargeId::parse("ch_0000000000000001").unwrap();
        let charge = ChargeRef {
            charge_id: &charge_id,
            payment_id: None,
            amount: 1999,
            currency: Currency::parse("EUR").unwrap(),
        };
        let same = json!({"id": "pi_1", "amount": 1999, "currency": "eur"});
        assert_eq!(mismatch(&same, &charge), None);
        let reason = mismatch(
            &json!({"id": "pi_1", "amount": 2000, "currency": "eur"}),
            &charge,
        )
        .expect("mismatch");
        assert!(
            reason.contains("pi_1") && reason.contains("2000"),
            "{reason}"
        );
        assert!(
            mismatch(
                &json!({"id": "pi_1", "amount": 1999, "currency": "usd"}),
                &charge
            )
            .is_some()
        );
        assert!(mismatch(&json!({"id": "pi_1"}), &charge).is_some());
    }

    #[test]
    fn operations_map_as_documented() {
        let op =
            |kind, status, body: Value| map_operation(kind, status, body.to_string().as_bytes());
        let captured = op(
            OperationKind::Capture,
            200,
            json!({"id": "pi_1", "status": "succeeded", "amount_received": 500}),
        );
        assert_eq!(
            captured,
            OperationOutcome {
                status: OperationStatus::Succeeded,
                gateway_id: Some("pi_1".to_owned()),
                amount: Some(500),
                message: None,
                http_status: Some(200),
            }
        );
        let canceled = op(
            OperationKind::Cancel,
            200,
            json!({"id": "pi_1", "status": "canceled"}),
        );
        assert_eq!(canceled.status, OperationStatus::Succeeded);
        for (refund_status, ours) in [
            ("succeeded", OperationStatus::Succeeded),
            ("pending", OperationStatus::Succeeded),
            ("failed", OperationStatus::Failed),
            ("canceled", OperationStatus::Failed),
            ("requires_action", OperationStatus::Unknown),
        ] {
            let refund = op(
                OperationKind::Refund,
                200,
                json!({"id": "re_1", "object": "refund", "status": refund_status, "amount": 300}),
            );
            assert_eq!(refund.status, ours, "{refund_status}");
            assert_eq!(refund.gateway_id.as_deref(), Some("re_1"));
        }
        assert_eq!(
            op(OperationKind::Refund, 409, key_in_use()).status,
            OperationStatus::Unknown
        );
        assert_eq!(
            op(
                OperationKind::Capture,
                503,
                json!({"error": {"type": "api_error"}})
            )
            .status,
            OperationStatus::Unknown
        );
        assert_eq!(
            map_operation(OperationKind::Capture, 200, b"nope").status,
            OperationStatus::Unknown
        );
        let refused = op(
            OperationKind::Capture,
            400,
            json!({"error": {"type": "invalid_request_error", "code": "payment_intent_unexpected_state",
                             "message": "This PaymentIntent could not be captured because it has a status of canceled."}}),
        );
        assert_eq!(refused.status, OperationStatus::Failed);
        assert!(refused.message.unwrap().contains("status of canceled"));
        assert_eq!(
            op(
                OperationKind::Capture,
                200,
                json!({"id": "pi_1", "status": "processing"})
            )
            .status,
            OperationStatus::Unknown
        );
    }

    #[test]
    fn the_intent_body_names_the_version_parameter_and_tags_the_charge_last() {
        let metadata = [
            ("order".to_owned(), "42".to_owned()),
            (CHARGE_ID_METADATA.to_owned(), "spoofed".to_owned()),
        ];
        let charge_id = ChargeId::parse("ch_0000000000000001").unwrap();
        let params = ChargeParams {
            amount: 1999,
            currency: Currency::parse("EUR").unwrap(),
            capture: super::super::Capture::Manual,
            description: "order 42",
            metadata: &metadata,
            charge_id: &charge_id,
            resend: false,
        };
        let body = |types, in_description| {
            String::from_utf8(payment_intent_body("pm_1", &params, types, in_description).to_vec())
                .unwrap()
        };
        assert_eq!(
            body("payment_method_types[0]", false),
            "amount=1999&currency=eur&payment_method=pm_1&confirm=true&capture_method=manual&\
             payment_method_types%5B0%5D=card&description=order+42&metadata%5Border%5D=42&\
             metadata%5Bcardvault_charge_id%5D=ch_0000000000000001"
        );
        let endive = body(
            payment_method_types_param("2026-10-28.endive").unwrap(),
            true,
        );
        assert!(
            endive.contains("&allowed_payment_method_types%5B0%5D=card&")
                && !endive.contains("&payment_method_types")
                && endive.contains("description=order+42+%5Bch_0000000000000001%5D"),
            "{endive}"
        );
        assert!(!endive.contains("spoofed"), "the caller cannot set the tag");
    }
}
