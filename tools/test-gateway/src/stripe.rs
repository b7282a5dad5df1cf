//! Stripe's wire shapes: error objects and the JSON responses the gateway stores and replays.

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

/// One answer of the API: status and JSON body. This is what an idempotency key stores and
/// replays byte for byte.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON body.
    pub body: Value,
}

impl ApiResponse {
    /// 200 with `body`.
    pub fn ok(body: Value) -> Self {
        ApiResponse {
            status: StatusCode::OK,
            body,
        }
    }

    /// `status` with `{"error": …}`.
    pub fn error(status: StatusCode, error: StripeError) -> Self {
        ApiResponse {
            status,
            body: json!({ "error": error.into_json() }),
        }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid(error: StripeError) -> Self {
        Self::error(StatusCode::BAD_REQUEST, error)
    }

    /// 400 `parameter_missing` for `param`.
    pub fn missing(param: &str) -> Self {
        Self::invalid(
            StripeError::invalid_request(format!("Missing required param: {param}."))
                .code("parameter_missing")
                .param(param),
        )
    }

    /// Whether an idempotency key keeps this answer. Stripe saves a result once the endpoint
    /// has begun executing, errors included (a 402 decline replays as a 402, a 500 as a
    /// 500); a request that
    /// failed validation (400) saved nothing and may be retried with the same key.
    pub fn is_saved(&self) -> bool {
        self.status != StatusCode::BAD_REQUEST
    }
}

/// A Stripe error object: `type`, `code`, `decline_code`, `message`, `param`, `doc_url`
/// and, on card errors, the objects involved.
#[derive(Debug, Clone)]
pub struct StripeError {
    kind: &'static str,
    code: Option<&'static str>,
    decline_code: Option<&'static str>,
    message: String,
    param: Option<String>,
    extra: Map<String, Value>,
}

impl StripeError {
    fn new(kind: &'static str, message: impl Into<String>) -> Self {
        StripeError {
            kind,
            code: None,
            decline_code: None,
            message: message.into(),
            param: None,
            extra: Map::new(),
        }
    }

    /// `invalid_request_error`: bad parameters, unknown ids, authentication.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new("invalid_request_error", message)
    }

    /// `card_error` with `code`.
    pub fn card(code: &'static str, message: impl Into<String>) -> Self {
        Self::new("card_error", message).code(code)
    }

    /// `idempotency_error`.
    pub fn idempotency(message: impl Into<String>) -> Self {
        Self::new("idempotency_error", message)
    }

    /// `api_error`: the gateway's own fault.
    pub fn api(message: impl Into<String>) -> Self {
        Self::new("api_error", message)
    }

    /// Sets `code`.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Sets `decline_code`.
    pub fn decline_code(mut self, decline_code: &'static str) -> Self {
        self.decline_code = Some(decline_code);
        self
    }

    /// Sets `param`.
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Adds a field such as `payment_intent` or `charge`.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// The object under `"error"`. `code` is always present (null when none), as the
    /// connector reads it; the others only when set.
    pub fn into_json(self) -> Value {
        let mut out = Map::new();
        out.insert("type".into(), self.kind.into());
        out.insert("code".into(), self.code.map_or(Value::Null, Value::from));
        if let Some(code) = self.code {
            out.insert(
                "doc_url".into(),
                format!(
                    "https://stripe.com/docs/error-codes/{}",
                    code.replace('_', "-")
                )
                .into(),
            );
        }
        if let Some(decline_code) = self.decline_code {
            out.insert("decline_code".into(), decline_code.into());
        }
        out.insert("message".into(), self.message.into());
        if let Some(param) = self.param {
            out.insert("param".into(), param.into());
        }
        out.extend(self.extra);
        Value::Object(out)
    }
}

/// A `Stripe-Version` this gateway speaks, by the parameters that differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiVersion {
    /// [`super::DEFAULT_STRIPE_VERSION`] and before the endive release: PaymentIntents
    /// take `payment_method_types[]`.
    Legacy,
    /// `2026-09-30.endive` and later: the parameter is `allowed_payment_method_types[]`.
    Endive,
}

impl ApiVersion {
    /// The version a request asks for with its `Stripe-Version` header; without one, the
    /// account's default ([`super::DEFAULT_STRIPE_VERSION`]). One this gateway does not
    /// list is a 400, as Stripe refuses a version it does not know.
    pub fn of_header(header: Option<&[u8]>) -> Result<ApiVersion, ApiResponse> {
        let Some(raw) = header else {
            return Ok(ApiVersion::Legacy);
        };
        let text = std::str::from_utf8(raw).unwrap_or("").trim();
        if !super::STRIPE_VERSIONS.contains(&text) {
            let shown: String = text.chars().take(64).collect();
            return Err(ApiResponse::invalid(StripeError::invalid_request(format!(
                "Invalid Stripe API version: {shown}"
            ))));
        }
        Ok(if text.ends_with(".endive") {
            ApiVersion::Endive
        } else {
            ApiVersion::Legacy
        })
    }

    /// The PaymentIntent parameter listing the payment method types.
    pub fn payment_method_types(self) -> &'static str {
        match self {
            ApiVersion::Legacy => "payment_method_types",
            ApiVersion::Endive => "allowed_payment_method_types",
        }
    }
}

/// Stripe's name for a brand (`payment_method.card.brand`).
pub fn brand_name(brand: cardvault::card::Brand) -> &'static str {
    use cardvault::card::Brand;
    match brand {
        Brand::Visa => "visa",
        // Stripe files Maestro under Mastercard.
        Brand::Mastercard | Brand::Maestro => "mastercard",
        Brand::Amex => "amex",
        Brand::Discover => "discover",
        Brand::Jcb => "jcb",
        Brand::DinersClub => "diners",
        Brand::UnionPay => "unionpay",
        Brand::Unknown => "unknown",
    }
}

/// Seconds since the Unix epoch, for `created`.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Shows an API key as Stripe does in its 401 message: the prefix and the last four
/// characters, never the whole key.
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..8].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_always_carry_a_code_field() {
        let json = StripeError::invalid_request("Invalid API Key provided").into_json();
        assert_eq!(json["type"], "invalid_request_error");
        assert!(json["code"].is_null());
        assert!(json.get("doc_url").is_none());
    }

    #[test]
    fn card_errors_carry_decline_codes_and_doc_urls() {
        let json = StripeError::card("card_declined", "Your card was declined.")
            .decline_code("generic_decline")
            .into_json();
        assert_eq!(json["code"], "card_declined");
        assert_eq!(json["decline_code"], "generic_decline");
        assert_eq!(
            json["doc_url"],
            "https://stripe.com/docs/error-codes/card-declined"
        );
    }

    #[test]
    fn validation_errors_are_not_saved_for_replay_but_declines_are() {
        assert!(!ApiResponse::missing("amount").is_saved());
        assert!(
            ApiResponse::error(StatusCode::PAYMENT_REQUIRED, StripeError::card("x", "y"))
                .is_saved()
        );
        assert!(
            ApiResponse::error(StatusCode::INTERNAL_SERVER_ERROR, StripeError::api("x")).is_saved()
        );
    }

    #[test]
    fn versions_are_the_listed_ones_and_absent_means_the_default() {
        assert_eq!(ApiVersion::of_header(None).unwrap(), ApiVersion::Legacy);
        assert_eq!(
            ApiVersion::of_header(Some(b"2024-06-20")).unwrap(),
            ApiVersion::Legacy
        );
        for endive in [&b"2026-09-30.endive"[..], b"2026-10-28.endive"] {
            assert_eq!(
                ApiVersion::of_header(Some(endive)).unwrap(),
                ApiVersion::Endive
            );
        }
        let refused = ApiVersion::of_header(Some(b"2026-10-29.endive")).unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            refused.body["error"]["message"],
            "Invalid Stripe API version: 2026-10-29.endive"
        );
        assert!(!refused.is_saved());
    }

    #[test]
    fn masked_keys_keep_only_prefix_and_last_four() {
        assert_eq!(mask_key("sk_test_abcdefgh1234"), "sk_test_********1234");
        assert_eq!(mask_key("short"), "*****");
    }
}
