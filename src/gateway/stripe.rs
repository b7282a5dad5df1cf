//! The `stripe` connector: the public Stripe API as documented.
//!
//! 1. `POST {base}/v1/payment_methods` — `type=card`, `card[number]`, `card[exp_month]`,
//!    `card[exp_year]`, `card[cvc]` (only when the charge has one) and
//!    `billing_details[name]` (only when the holder is known) → a PaymentMethod `pm_…`.
//! 2. `POST {base}/v1/payment_intents` — `amount`, `currency` (lower-case, as Stripe writes
//!    it), `payment_method=pm_…`, `confirm=true`, `capture_method=automatic|manual`,
//!    `payment_method_types[0]=card` (so that Stripe does not ask for a `return_url` for
//!    redirect-based methods the account may have enabled), `description` (when not empty)
//!    and `metadata[k]=v` → a confirmed PaymentIntent `pi_…`.
//!
//! Every POST carries `Authorization: Bearer <secret key>`, the pinned `Stripe-Version` and
//! an `Idempotency-Key` derived from [`ChargeParams::idempotency_key`] and distinct per step:
//! `<key>-pm` for the PaymentMethod, `<key>-pi` for the PaymentIntent. A re-send with the
//! same key therefore gets Stripe's saved answers: the same PaymentMethod and the same
//! PaymentIntent, never a second charge.
//!
//! # Mapping
//!
//! PaymentIntent `status`: `succeeded` → Succeeded; `requires_capture` (manual capture) →
//! Succeeded, meaning *authorized*, to be captured later; `requires_action` →
//! RequiresAction; `processing` → Unknown; `requires_payment_method` → Declined (with
//! `last_payment_error`'s codes); `requires_confirmation` and `canceled` → Failed (not
//! charged); anything else → Unknown.
//!
//! Stripe errors (`{"error": {type, code, decline_code, message, payment_intent}}`):
//! `card_error` → Declined with `decline_code` (or `code` when there is none) and the
//! message; `idempotency_error` for a request still in progress (HTTP 409) → Unknown; any
//! other 4xx (`invalid_request_error`, authentication, rate limits) → Failed with the
//! message. The payment id comes from `error.payment_intent.id` when present. 5xx, a body
//! that does not parse, a redirect, an oversized body, a timeout or a broken connection
//! while creating the PaymentIntent → Unknown.
//!
//! Step 1 charges nothing, so anything that goes wrong there other than a `card_error`
//! (Declined, e.g. `incorrect_number`) or a request still in progress (Unknown) is Failed:
//! the PaymentIntent was never sent.

use std::fmt;

use reqwest::{
    Method, Url,
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use secrecy::ExposeSecret as _;
use serde_json::Value;
use zeroize::Zeroizing;

use super::{
    ChargeCard, ChargeParams, ChargeStatus, Connector, GatewayError, GatewaySettings, Outcome,
    client::{self, Failure, HttpClient},
    encode, observed,
};

const STRIPE_VERSION: HeaderName = HeaderName::from_static("stripe-version");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A `stripe` gateway.
pub(crate) struct StripeConnector {
    name: String,
    http: HttpClient,
    payment_methods: Url,
    payment_intents: Url,
    /// `Bearer <secret>`, marked sensitive. Built once, so the secret is not copied into a
    /// fresh (unzeroized) header buffer on every request.
    authorization: HeaderValue,
    version: HeaderValue,
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
            http,
            authorization,
            version,
        })
    }

    fn headers(&self, idempotency_key: &str, suffix: &str) -> Result<HeaderMap, Outcome> {
        let key = HeaderValue::from_str(&format!("{idempotency_key}{suffix}"))
            .map_err(|_| Outcome::ours(ChargeStatus::Failed, "invalid idempotency key", None))?;
        let mut headers = HeaderMap::with_capacity(5);
        headers.insert(header::AUTHORIZATION, self.authorization.clone());
        headers.insert(STRIPE_VERSION, self.version.clone());
        headers.insert(IDEMPOTENCY_KEY, key);
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let (name, value) = client::content_type(true);
        headers.insert(name, value);
        Ok(headers)
    }

    async fn charge_steps(&self, card: &ChargeCard<'_>, params: &ChargeParams<'_>) -> Outcome {
        if params
            .metadata
            .iter()
            .any(|(k, _)| k.is_empty() || k.contains(['[', ']']))
        {
            return Outcome::ours(
                ChargeStatus::Failed,
                "metadata keys must be non-empty and without square brackets (Stripe)",
                None,
            );
        }
        let payment_method = match self.create_payment_method(card, params).await {
            Ok(id) => id,
            Err(outcome) => return outcome,
        };
        self.create_payment_intent(&payment_method, params).await
    }

    /// Step 1; `Err` is the charge's outcome when there is no PaymentMethod.
    async fn create_payment_method(
        &self,
        card: &ChargeCard<'_>,
        params: &ChargeParams<'_>,
    ) -> Result<String, Outcome> {
        let headers = self.headers(params.idempotency_key, "-pm")?;
        let exp_month = Zeroizing::new(card.exp_month.to_string());
        let exp_year = Zeroizing::new(card.exp_year.to_string());
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

    /// Step 2.
    async fn create_payment_intent(
        &self,
        payment_method: &str,
        params: &ChargeParams<'_>,
    ) -> Outcome {
        let headers = match self.headers(params.idempotency_key, "-pi") {
            Ok(headers) => headers,
            Err(outcome) => return outcome,
        };
        let amount = params.amount.to_string();
        let currency = params.currency.to_ascii_lowercase();
        let metadata_keys: Vec<String> = params
            .metadata
            .iter()
            .map(|(k, _)| format!("metadata[{k}]"))
            .collect();
        let mut pairs = vec![
            ("amount", amount.as_str()),
            ("currency", currency.as_str()),
            ("payment_method", payment_method),
            ("confirm", "true"),
            ("capture_method", params.capture.as_str()),
            ("payment_method_types[0]", "card"),
        ];
        if !params.description.is_empty() {
            pairs.push(("description", params.description));
        }
        for (key, (_, value)) in metadata_keys.iter().zip(params.metadata) {
            pairs.push((key.as_str(), value.as_str()));
        }
        let body = encode::form_body(&pairs);
        match self
            .http
            .send(
                "payment_intent",
                Method::POST,
                &self.payment_intents,
                headers,
                body,
            )
            .await
        {
            Ok(answer) => map_payment_intent(answer.status, &answer.body),
            // Sent, or maybe sent: Stripe may have charged.
            Err(Failure::Unreachable) => {
                Outcome::ours(ChargeStatus::Failed, Failure::Unreachable.message(), None)
            }
            Err(failure) => Outcome::ours(
                ChargeStatus::Unknown,
                failure.message(),
                failure.http_status(),
            ),
        }
    }
}

#[async_trait::async_trait]
impl Connector for StripeConnector {
    fn name(&self) -> &str {
        &self.name
    }

    fn resend_window(&self) -> Option<std::time::Duration> {
        // Stripe keeps idempotency keys at least 24 hours; an hour's margin.
        Some(std::time::Duration::from_secs(23 * 3600))
    }

    async fn charge(&self, card: &ChargeCard<'_>, params: &ChargeParams<'_>) -> Outcome {
        observed(&self.name, card, params, self.charge_steps(card, params)).await
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

/// Step 2's answer.
fn map_payment_intent(http_status: u16, body: &[u8]) -> Outcome {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let unknown =
        |message: String| Outcome::ours(ChargeStatus::Unknown, message, Some(http_status));
    match http_status {
        200 => {
            let Some(intent) = parsed.as_ref().filter(|v| v.is_object()) else {
                return unknown("unparseable gateway response".to_owned());
            };
            map_intent_object(intent, http_status)
        }
        400..=499 => match parsed.as_ref().and_then(|v| v.get("error")) {
            Some(error) => map_error(http_status, error),
            None => unknown(format!("unparseable gateway error (HTTP {http_status})")),
        },
        _ => {
            let message = parsed.as_ref().and_then(|v| text(v, "/error/message"));
            Outcome {
                message: Some(
                    message.unwrap_or_else(|| format!("gateway error (HTTP {http_status})")),
                ),
                ..unknown(String::new())
            }
        }
    }
}

/// A PaymentIntent object.
fn map_intent_object(intent: &Value, http_status: u16) -> Outcome {
    let status = match intent.get("status").and_then(Value::as_str) {
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
    let message = message.or_else(|| match intent.get("status").and_then(Value::as_str) {
        Some("processing") => Some("payment is processing".to_owned()),
        Some(s @ ("requires_confirmation" | "canceled")) => Some(format!("payment intent is {s}")),
        Some(s) if status == ChargeStatus::Unknown => Some(format!("unexpected status {s}")),
        None => Some("payment intent without a status".to_owned()),
        _ => None,
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
        action: None,
    }
}

/// A Stripe error object.
fn map_error(http_status: u16, error: &Value) -> Outcome {
    let kind = error.get("type").and_then(Value::as_str);
    let code = text(error, "/code");
    let message = text(error, "/message");
    let payment_id = text(error, "/payment_intent/id");
    let in_progress = http_status == 409
        || message
            .as_deref()
            .is_some_and(|m| m.to_ascii_lowercase().contains("in progress"));
    let (status, decline_code) = match kind {
        Some("card_error") => (
            ChargeStatus::Declined,
            text(error, "/decline_code").or(code),
        ),
        Some("idempotency_error") if in_progress => (ChargeStatus::Unknown, None),
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn intent(status: u16, body: Value) -> Outcome {
        map_payment_intent(status, body.to_string().as_bytes())
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
            map_payment_intent(502, b"<html>bad gateway</html>").status,
            ChargeStatus::Unknown
        );
        assert_eq!(
            map_payment_intent(200, b"not json").status,
            ChargeStatus::Unknown
        );
        assert_eq!(
            map_payment_intent(400, b"not json").status,
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
}
