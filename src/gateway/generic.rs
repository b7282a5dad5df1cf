//! The `generic` connector: one request built from a template, one response mapped by JSON
//! pointers, so a gateway can be reached by configuration alone.
//!
//! # Request
//!
//! `method {base_url}{path}` with `Content-Type` for `body_format` (unless `headers` sets
//! one), the configured `headers` (placeholders allowed except `card.*`: card data never goes
//! into a header), `idempotency_header: {{idempotency_key}}` when configured, and the `body`
//! template rendered as described in the [template module](super::template): JSON-escaped
//! without quotes for `json`, percent-encoded for `form`; an absent CVC or holder renders
//! empty. At start-up a `json` template is rendered with sample values and must parse as
//! JSON, which catches a string placeholder left without quotes.
//!
//! The rendered body exists only in a zeroizing buffer handed to the HTTP client; it is never
//! logged and no error quotes it (they name the gateway and the HTTP status).
//!
//! # Response
//!
//! - HTTP status in `success_http_statuses`: the value at `status_pointer` (a string, or a
//!   number or boolean as its JSON text) looked up in `status_map`. A value missing from the
//!   map, or no value at all, is Unknown: the gateway answered but we cannot tell what it did.
//! - 4xx: if the body parses and its status maps to requires_action, declined or failed,
//!   that; otherwise Failed with the message at `message_pointer` (a mapped "succeeded"
//!   on a 4xx is contradictory and Unknown).
//! - 5xx, any other status (e.g. 202), a body that does not parse as JSON, a redirect, an
//!   oversized body, a timeout or a broken connection → Unknown; the connection could not
//!   be opened → Failed.
//!
//! `payment_id_pointer`, `decline_code_pointer` and `message_pointer` fill the outcome
//! whenever the body parses (decline codes only for declined outcomes). For a
//! `requires_action` answer, `client_secret_pointer`, `redirect_url_pointer` and
//! `next_action_pointer` (a subtree, handed back as JSON) fill what the shop's front end
//! needs; card data is never among it (texts are scrubbed like every gateway text).
//!
//! # Lookup
//!
//! With `lookup_path`, `GET {base_url}{lookup_path}` with `{{idempotency_key}}` and
//! `{{payment_id}}` filled in (percent-encoded), the configured headers that need no
//! per-charge value and `idempotency_header`. A status in `lookup_not_found_statuses` (404 by
//! default) means the gateway holds no payment for the charge; a status in
//! `success_http_statuses` is mapped like a charge's answer; anything else, or no answer, is
//! "try later". Without `lookup_path` charges cannot be looked up, and an unknown one stays
//! for an operator.

use std::{collections::BTreeMap, fmt};

use reqwest::{
    Method, Url,
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;

use super::{
    Capture, ChargeCard, ChargeParams, ChargeRef, ChargeStatus, Connector, GatewayError,
    GatewaySettings, Lookup, NextAction, Outcome,
    client::{self, HttpClient},
    config::{BodyFormat, HttpMethod, MappedStatus},
    encode, observed, observed_lookup,
    template::{Escape, Field, Template, Values},
};
use crate::{card::Pan, id::ChargeId, money::Currency};

/// Headers the HTTP client sets itself; a template must not.
const RESERVED_HEADERS: [&str; 5] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
];

/// A `generic` gateway.
pub(crate) struct GenericConnector {
    name: String,
    http: HttpClient,
    url: Url,
    method: Method,
    format: BodyFormat,
    body: Template,
    /// Headers that need no per-charge value, rendered once (secrets marked sensitive).
    fixed_headers: HeaderMap,
    /// Headers with per-charge placeholders, rendered for each charge.
    templated_headers: Vec<(HeaderName, Template)>,
    idempotency_header: Option<HeaderName>,
    secret: Option<SecretString>,
    mapping: ResponseMapping,
    lookup: Option<LookupPath>,
    lookup_not_found_statuses: Vec<u16>,
    idempotency_window: std::time::Duration,
}

/// A piece of `lookup_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathPart {
    Literal(String),
    IdempotencyKey,
    PaymentId,
}

/// A parsed `lookup_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LookupPath(Vec<PathPart>);

impl LookupPath {
    /// Parses a path whose only placeholders are `{{idempotency_key}}` and `{{payment_id}}`.
    fn parse(text: &str) -> Result<LookupPath, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(PathPart::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| "a '{{' has no closing '}}'".to_owned())?;
            parts.push(match after[..close].trim() {
                "idempotency_key" => PathPart::IdempotencyKey,
                "payment_id" => PathPart::PaymentId,
                _ => {
                    return Err(
                        "only {{idempotency_key}} and {{payment_id}} may be used".to_owned()
                    );
                }
            });
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(PathPart::Literal(rest.to_owned()));
        }
        Ok(LookupPath(parts))
    }

    /// The path for `charge`, values percent-encoded; `None` when it needs a payment id the
    /// charge does not have.
    fn render(&self, charge: &ChargeRef<'_>) -> Option<String> {
        let mut out = Vec::new();
        for part in &self.0 {
            let value = match part {
                PathPart::Literal(text) => {
                    out.extend_from_slice(text.as_bytes());
                    continue;
                }
                PathPart::IdempotencyKey => charge.charge_id.as_str(),
                PathPart::PaymentId => charge.payment_id?,
            };
            out.extend_from_slice(&encode::build(|sink| encode::form_component(value, sink)));
        }
        String::from_utf8(out).ok()
    }
}

impl fmt::Debug for GenericConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenericConnector")
            .field("name", &self.name)
            .field("method", &self.method)
            .field("url", &self.url.as_str())
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// How a response becomes an [`Outcome`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResponseMapping {
    pub(crate) status_pointer: String,
    pub(crate) status_map: BTreeMap<String, MappedStatus>,
    pub(crate) payment_id_pointer: Option<String>,
    pub(crate) decline_code_pointer: Option<String>,
    pub(crate) message_pointer: Option<String>,
    pub(crate) success_http_statuses: Vec<u16>,
    pub(crate) client_secret_pointer: Option<String>,
    pub(crate) redirect_url_pointer: Option<String>,
    pub(crate) next_action_pointer: Option<String>,
}

impl GenericConnector {
    /// Builds the connector from checked settings: parses the templates, reads the secret
    /// and the TLS files.
    pub(crate) fn new(settings: &GatewaySettings) -> Result<GenericConnector, GatewayError> {
        let name = settings.name.clone();
        let reject = |reason: String| GatewayError::Config {
            gateway: name.clone(),
            reason,
        };
        let format = settings.body_format();
        let body = Template::parse(settings.body.as_deref().unwrap_or(""))
            .map_err(|e| reject(format!("body: {e}")))?;

        let mut header_templates = Vec::new();
        for (key, value) in settings.headers.iter().flatten() {
            let header_name = HeaderName::from_bytes(key.as_bytes())
                .map_err(|_| reject(format!("headers: {key:?} is not a valid header name")))?;
            if RESERVED_HEADERS.contains(&header_name.as_str()) {
                return Err(reject(format!(
                    "headers: {key} is set by the HTTP client and cannot be configured"
                )));
            }
            let template =
                Template::parse(value).map_err(|e| reject(format!("headers.{key}: {e}")))?;
            if template.fields().any(Field::is_card) {
                return Err(reject(format!(
                    "headers.{key}: card placeholders are not allowed in headers"
                )));
            }
            header_templates.push((header_name, template));
        }
        let idempotency_header = settings
            .idempotency_header
            .as_deref()
            .map(|h| {
                HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    reject(format!(
                        "idempotency_header {h:?} is not a valid header name"
                    ))
                })
            })
            .transpose()?;

        let uses_secret = body.fields().any(|f| f == Field::Secret)
            || header_templates
                .iter()
                .any(|(_, t)| t.fields().any(|f| f == Field::Secret));
        let secret = match (settings.secret_source(), uses_secret) {
            (Some(source), _) => Some(source.read(&settings.name)?),
            (None, true) => {
                return Err(reject(
                    "the templates use {{secret}}: set secret_file or secret_env".to_owned(),
                ));
            }
            (None, false) => None,
        };

        let sample_pan = Pan::parse(SAMPLE_PAN).map_err(|_| reject("internal".to_owned()))?;
        let sample_card = ChargeCard {
            pan: &sample_pan,
            exp_month: 12,
            exp_year: 2030,
            cvc: Some("123"),
            holder: Some("Sample Holder"),
        };
        let sample_id =
            ChargeId::parse("ch_0000000000sample").map_err(|e| reject(e.to_string()))?;
        let sample_params = ChargeParams {
            amount: 100,
            currency: Currency::parse("EUR").map_err(|e| reject(e.to_string()))?,
            capture: Capture::Automatic,
            description: "sample",
            metadata: &[],
            charge_id: &sample_id,
            resend: false,
        };
        let secret_text = secret.as_ref().map_or("", |s| s.expose_secret());
        let sample = Values::new(&sample_card, &sample_params, secret_text);
        if format == BodyFormat::Json {
            let rendered = body.render(&sample, Escape::Json);
            if serde_json::from_slice::<serde::de::IgnoredAny>(&rendered).is_err() {
                return Err(reject(
                    "body does not render to valid JSON (string placeholders need quotes \
                     around them: \"{{card.number}}\")"
                        .to_owned(),
                ));
            }
        }

        let mut fixed_headers = HeaderMap::new();
        let (content_type, value) = client::content_type(format == BodyFormat::Form);
        fixed_headers.insert(content_type, value);
        fixed_headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let mut templated_headers = Vec::new();
        for (header_name, template) in header_templates {
            let per_charge = template.fields().any(|f| f != Field::Secret);
            let rendered = template.render(&sample, Escape::Raw);
            let value = HeaderValue::from_bytes(&rendered).map_err(|_| {
                reject(format!(
                    "headers.{header_name}: the value is not a valid header value"
                ))
            })?;
            if per_charge {
                templated_headers.push((header_name, template));
            } else {
                let value = if template.fields().any(|f| f == Field::Secret) {
                    client::sensitive(value)
                } else {
                    value
                };
                fixed_headers.insert(header_name, value);
            }
        }

        let mapping = ResponseMapping {
            status_pointer: settings.status_pointer.clone().unwrap_or_default(),
            status_map: settings.status_map.clone().unwrap_or_default(),
            payment_id_pointer: settings.payment_id_pointer.clone(),
            decline_code_pointer: settings.decline_code_pointer.clone(),
            message_pointer: settings.message_pointer.clone(),
            success_http_statuses: settings.success_http_statuses().to_vec(),
            client_secret_pointer: settings.client_secret_pointer.clone(),
            redirect_url_pointer: settings.redirect_url_pointer.clone(),
            next_action_pointer: settings.next_action_pointer.clone(),
        };
        let lookup = settings
            .lookup_path
            .as_deref()
            .map(LookupPath::parse)
            .transpose()
            .map_err(|e| reject(format!("lookup_path: {e}")))?;
        let http = HttpClient::new(settings)?;
        Ok(GenericConnector {
            url: http.url(settings.path.as_deref().unwrap_or(""))?,
            method: match settings.method() {
                HttpMethod::Post => Method::POST,
                HttpMethod::Put => Method::PUT,
                HttpMethod::Patch => Method::PATCH,
            },
            format,
            body,
            fixed_headers,
            templated_headers,
            idempotency_header,
            secret,
            mapping,
            lookup,
            lookup_not_found_statuses: settings.lookup_not_found_statuses().to_vec(),
            idempotency_window: settings.idempotency_window(),
            http,
            name: settings.name.clone(),
        })
    }

    async fn lookup_steps(&self, lookup: &LookupPath, charge: &ChargeRef<'_>) -> Lookup {
        let deadline = self.http.deadline();
        let Some(path) = lookup.render(charge) else {
            return Lookup::Unavailable {
                reason: "lookup_path needs the payment id, and the charge has none".to_owned(),
            };
        };
        let Ok(url) = self.http.url(&path) else {
            return Lookup::Unavailable {
                reason: "lookup_path does not make a valid URL for this charge".to_owned(),
            };
        };
        let mut headers = self.fixed_headers.clone();
        headers.remove(header::CONTENT_TYPE);
        if let Some(name) = &self.idempotency_header {
            let Ok(value) = HeaderValue::from_str(charge.charge_id.as_str()) else {
                return Lookup::Unavailable {
                    reason: "the charge id is not a valid header value".to_owned(),
                };
            };
            headers.insert(name.clone(), value);
        }
        let asked = format!("GET {path}");
        let answer = match self
            .http
            .send(
                "lookup",
                Method::GET,
                &url,
                headers,
                zeroize::Zeroizing::new(Vec::new()),
                deadline,
            )
            .await
        {
            Ok(answer) => answer,
            Err(failure) => {
                return Lookup::Unavailable {
                    reason: format!("{asked}: {}", failure.message()),
                };
            }
        };
        if self.lookup_not_found_statuses.contains(&answer.status) {
            return Lookup::NotFound {
                evidence: format!("{asked} → HTTP {} (no such payment)", answer.status),
            };
        }
        if !self.mapping.success_http_statuses.contains(&answer.status)
            || serde_json::from_slice::<serde::de::IgnoredAny>(&answer.body).is_err()
        {
            return Lookup::Unavailable {
                reason: format!("{asked} → HTTP {} (not a usable answer)", answer.status),
            };
        }
        Lookup::Found(self.mapping.map(answer.status, &answer.body))
    }

    async fn send_charge(&self, card: &ChargeCard<'_>, params: &ChargeParams<'_>) -> Outcome {
        let secret = self.secret.as_ref().map_or("", |s| s.expose_secret());
        let values = Values::new(card, params, secret);
        let mut headers = self.fixed_headers.clone();
        for (name, template) in &self.templated_headers {
            let rendered = template.render(&values, Escape::Raw);
            let Ok(value) = HeaderValue::from_bytes(&rendered) else {
                return Outcome::ours(
                    ChargeStatus::Failed,
                    format!("header {name} renders to an invalid value for this charge"),
                    None,
                );
            };
            let sensitive = template.fields().any(|f| f == Field::Secret);
            headers.insert(
                name.clone(),
                if sensitive {
                    client::sensitive(value)
                } else {
                    value
                },
            );
        }
        if let Some(name) = &self.idempotency_header {
            let Ok(value) = HeaderValue::from_str(params.charge_id.as_str()) else {
                return Outcome::ours(ChargeStatus::Failed, "invalid idempotency key", None);
            };
            headers.insert(name.clone(), value);
        }
        let escape = match self.format {
            BodyFormat::Json => Escape::Json,
            BodyFormat::Form => Escape::Form,
        };
        let body = self.body.render(&values, escape);
        drop(values);
        let deadline = self.http.deadline();
        match self
            .http
            .send(
                "charge",
                self.method.clone(),
                &self.url,
                headers,
                body,
                deadline,
            )
            .await
        {
            Ok(answer) => self.mapping.map(answer.status, &answer.body),
            Err(failure) if failure.not_sent() => {
                Outcome::ours(ChargeStatus::Failed, failure.message(), None)
            }
            Err(failure) => Outcome::ours(
                ChargeStatus::Unknown,
                failure.message(),
                failure.http_status(),
            ),
        }
    }
}

/// Renders the sample values at start-up; a Luhn-valid test number.
const SAMPLE_PAN: &str = "4242424242424242";

#[async_trait::async_trait]
impl Connector for GenericConnector {
    fn name(&self) -> &str {
        &self.name
    }

    /// Only when the key reaches the gateway: as `idempotency_header`, or as
    /// `{{idempotency_key}}` in a header or the body.
    fn resend_window(&self) -> Option<std::time::Duration> {
        let sends_key = self.idempotency_header.is_some()
            || self
                .body
                .fields()
                .chain(self.templated_headers.iter().flat_map(|(_, t)| t.fields()))
                .any(|field| field == Field::IdempotencyKey);
        sends_key.then_some(self.idempotency_window)
    }

    async fn charge(&self, card: &ChargeCard<'_>, params: &ChargeParams<'_>) -> Outcome {
        observed(&self.name, card, params, self.send_charge(card, params)).await
    }

    async fn lookup(&self, charge: &ChargeRef<'_>) -> Lookup {
        match &self.lookup {
            Some(lookup) => {
                observed_lookup(&self.name, charge, self.lookup_steps(lookup, charge)).await
            }
            None => Lookup::Unsupported,
        }
    }
}

/// The text at `pointer`: a string as is, a number or boolean as its JSON text.
fn text_at(value: &Value, pointer: Option<&str>) -> Option<String> {
    match value.pointer(pointer?)? {
        Value::String(s) => Some(s.clone()),
        v @ (Value::Number(_) | Value::Bool(_)) => Some(v.to_string()),
        _ => None,
    }
}

impl ResponseMapping {
    /// The outcome of an answer (never a 3xx: the client refuses those).
    pub(crate) fn map(&self, http_status: u16, body: &[u8]) -> Outcome {
        let unknown =
            |message: String| Outcome::ours(ChargeStatus::Unknown, message, Some(http_status));
        if http_status >= 500 {
            return unknown(format!("gateway error (HTTP {http_status})"));
        }
        let Ok(parsed) = serde_json::from_slice::<Value>(body) else {
            return unknown(format!("unparseable gateway response (HTTP {http_status})"));
        };
        let gateway_status = text_at(&parsed, Some(&self.status_pointer));
        let mapped = gateway_status
            .as_ref()
            .and_then(|s| self.status_map.get(s))
            .copied();
        let status = if self.success_http_statuses.contains(&http_status) {
            match mapped {
                Some(m) => charge_status(m),
                None => ChargeStatus::Unknown,
            }
        } else if (400..500).contains(&http_status) {
            match mapped {
                Some(MappedStatus::Succeeded) => ChargeStatus::Unknown,
                Some(m) => charge_status(m),
                None => ChargeStatus::Failed,
            }
        } else {
            ChargeStatus::Unknown
        };
        let message = text_at(&parsed, self.message_pointer.as_deref()).or_else(|| {
            match (status, &gateway_status, mapped) {
                (ChargeStatus::Unknown, Some(s), None) => {
                    Some(format!("gateway status {s:?} is not in status_map"))
                }
                (ChargeStatus::Unknown, None, _) => Some(format!(
                    "no status at {} (HTTP {http_status})",
                    self.status_pointer
                )),
                (ChargeStatus::Unknown, _, _) => {
                    Some(format!("unexpected gateway answer (HTTP {http_status})"))
                }
                (ChargeStatus::Failed, _, _) => {
                    Some(format!("gateway refused the request (HTTP {http_status})"))
                }
                _ => None,
            }
        });
        Outcome {
            status,
            payment_id: text_at(&parsed, self.payment_id_pointer.as_deref()),
            decline_code: if status == ChargeStatus::Declined {
                text_at(&parsed, self.decline_code_pointer.as_deref())
            } else {
                None
            },
            message,
            http_status: Some(http_status),
            action: (status == ChargeStatus::RequiresAction)
                .then(|| self.action(&parsed))
                .flatten(),
        }
    }

    /// What the front end needs for a `requires_action` answer, when anything is mapped.
    fn action(&self, parsed: &Value) -> Option<Box<NextAction>> {
        let action = NextAction {
            client_secret: text_at(parsed, self.client_secret_pointer.as_deref()),
            kind: None,
            redirect_url: text_at(parsed, self.redirect_url_pointer.as_deref()),
            details_json: self
                .next_action_pointer
                .as_deref()
                .and_then(|p| parsed.pointer(p))
                .map(Value::to_string),
        };
        (action != NextAction::default()).then(|| Box::new(action))
    }
}

fn charge_status(mapped: MappedStatus) -> ChargeStatus {
    match mapped {
        MappedStatus::Succeeded => ChargeStatus::Succeeded,
        MappedStatus::RequiresAction => ChargeStatus::RequiresAction,
        MappedStatus::Declined => ChargeStatus::Declined,
        MappedStatus::Failed => ChargeStatus::Failed,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::gateway::{GatewayKind, GatewaySettings};

    fn mapping() -> ResponseMapping {
        ResponseMapping {
            status_pointer: "/result/state".to_owned(),
            status_map: BTreeMap::from([
                ("approved".to_owned(), MappedStatus::Succeeded),
                ("challenge".to_owned(), MappedStatus::RequiresAction),
                ("refused".to_owned(), MappedStatus::Declined),
                ("error".to_owned(), MappedStatus::Failed),
                ("1".to_owned(), MappedStatus::Succeeded),
            ]),
            payment_id_pointer: Some("/id".to_owned()),
            decline_code_pointer: Some("/result/reason".to_owned()),
            message_pointer: Some("/result/text".to_owned()),
            success_http_statuses: vec![200, 201],
            client_secret_pointer: Some("/challenge/secret".to_owned()),
            redirect_url_pointer: Some("/challenge/url".to_owned()),
            next_action_pointer: Some("/challenge".to_owned()),
        }
    }

    fn map(status: u16, body: Value) -> Outcome {
        mapping().map(status, body.to_string().as_bytes())
    }

    #[test]
    fn json_pointers_fill_the_outcome() {
        let outcome = map(
            201,
            json!({"id": "ch_1", "result": {"state": "refused", "reason": "51", "text": "Insufficient funds"}}),
        );
        assert_eq!(
            outcome,
            Outcome {
                status: ChargeStatus::Declined,
                payment_id: Some("ch_1".to_owned()),
                decline_code: Some("51".to_owned()),
                message: Some("Insufficient funds".to_owned()),
                http_status: Some(201),
                action: None,
            }
        );
        let approved = map(200, json!({"id": 77, "result": {"state": "approved"}}));
        assert_eq!(approved.status, ChargeStatus::Succeeded);
        assert_eq!(
            approved.payment_id.as_deref(),
            Some("77"),
            "numbers as text"
        );
        assert_eq!(approved.decline_code, None);
        let numeric = map(200, json!({"result": {"state": 1}}));
        assert_eq!(
            numeric.status,
            ChargeStatus::Succeeded,
            "numbers map by text"
        );
        assert_eq!(
            map(200, json!({"result": {"state": "challenge"}})).status,
            ChargeStatus::RequiresAction
        );
    }

    #[test]
    fn unmapped_or_missing_statuses_are_unknown() {
        let outcome = map(200, json!({"result": {"state": "pending"}}));
        assert_eq!(outcome.status, ChargeStatus::Unknown);
        assert!(outcome.message.unwrap().contains("\"pending\""));
        assert_eq!(map(200, json!({"other": 1})).status, ChargeStatus::Unknown);
        assert_eq!(mapping().map(200, b"<html>").status, ChargeStatus::Unknown);
    }

    #[test]
    fn client_errors_fail_unless_their_status_maps() {
        let refused = map(422, json!({"result": {"text": "amount too large"}}));
        assert_eq!(refused.status, ChargeStatus::Failed);
        assert_eq!(refused.message.as_deref(), Some("amount too large"));
        assert_eq!(
            map(402, json!({"result": {"state": "refused"}})).status,
            ChargeStatus::Declined
        );
        assert_eq!(
            map(400, json!({"result": {"state": "approved"}})).status,
            ChargeStatus::Unknown,
            "a success on a 4xx is contradictory"
        );
        assert_eq!(
            mapping().map(404, b"Not Found").status,
            ChargeStatus::Unknown,
            "an unparseable answer"
        );
    }

    #[test]
    fn server_errors_and_unexpected_statuses_are_unknown() {
        assert_eq!(
            map(500, json!({"result": {"state": "refused"}})).status,
            ChargeStatus::Unknown
        );
        assert_eq!(
            map(202, json!({"result": {"state": "approved"}})).status,
            ChargeStatus::Unknown
        );
    }

    fn settings(body: &str) -> GatewaySettings {
        GatewaySettings {
            body: Some(body.to_owned()),
            status_pointer: Some("/status".to_owned()),
            status_map: Some(BTreeMap::from([("ok".to_owned(), MappedStatus::Succeeded)])),
            ..GatewaySettings::new("acme", GatewayKind::Generic, "https://pay.acme.example")
        }
    }

    fn build_error(settings: &GatewaySettings) -> String {
        GenericConnector::new(settings)
            .expect_err("should be refused")
            .to_string()
    }

    #[test]
    fn templates_are_checked_at_start_up() {
        GenericConnector::new(&settings(r#"{"n": "{{card.number}}", "a": {{amount}}}"#))
            .expect("valid");
        let unknown = build_error(&settings(r#"{"n": "{{card.pan}}"}"#));
        assert!(
            unknown.contains("unknown placeholder {{card.pan}}"),
            "{unknown}"
        );
        let unquoted = build_error(&settings(r#"{"d": {{description}}}"#));
        assert!(unquoted.contains("valid JSON"), "{unquoted}");
        let form = GatewaySettings {
            body_format: Some(BodyFormat::Form),
            ..settings("n={{card.number}}&d={{description}}")
        };
        GenericConnector::new(&form).expect("form bodies are not JSON");
    }

    #[test]
    fn headers_cannot_carry_card_data_and_need_the_secret_they_use() {
        let mut s = settings(r#"{"n": "{{card.number}}"}"#);
        s.headers = Some(BTreeMap::from([(
            "X-Card".to_owned(),
            "{{card.number}}".to_owned(),
        )]));
        assert!(build_error(&s).contains("card placeholders are not allowed"));
        s.headers = Some(BTreeMap::from([(
            "Authorization".to_owned(),
            "Bearer {{secret}}".to_owned(),
        )]));
        assert!(build_error(&s).contains("{{secret}}"));
        s.headers = Some(BTreeMap::from([(
            "Content-Length".to_owned(),
            "1".to_owned(),
        )]));
        assert!(build_error(&s).contains("set by the HTTP client"));
        s.headers = Some(BTreeMap::from([(
            "X-Order".to_owned(),
            "{{idempotency_key}}".to_owned(),
        )]));
        let connector = GenericConnector::new(&s).expect("per-charge header");
        assert_eq!(connector.templated_headers.len(), 1);
    }

    #[test]
    fn a_challenge_hands_back_the_mapped_action_fields() {
        let outcome = map(
            200,
            json!({"id": "p_1", "result": {"state": "challenge"},
                   "challenge": {"secret": "cs_1", "url": "https://acs.example/3ds", "method": "GET"}}),
        );
        assert_eq!(outcome.status, ChargeStatus::RequiresAction);
        let action = outcome.action.expect("an action");
        assert_eq!(action.client_secret.as_deref(), Some("cs_1"));
        assert_eq!(
            action.redirect_url.as_deref(),
            Some("https://acs.example/3ds")
        );
        let details: Value = serde_json::from_str(action.details_json.as_deref().unwrap()).unwrap();
        assert_eq!(details["method"], "GET");
        let approved = map(
            200,
            json!({"result": {"state": "approved"}, "challenge": {"secret": "x"}}),
        );
        assert!(approved.action.is_none(), "only for requires_action");
        let bare = map(200, json!({"result": {"state": "challenge"}}));
        assert!(bare.action.is_none(), "nothing mapped, no action");
    }

    #[test]
    fn the_lookup_path_takes_two_placeholders_percent_encoded() {
        let path = LookupPath::parse("/v2/charges/{{ payment_id }}?ref={{idempotency_key}}")
            .expect("valid");
        let charge_id = ChargeId::parse("ch_0000000000000001").unwrap();
        let charge = ChargeRef {
            charge_id: &charge_id,
            payment_id: Some("p/9 x"),
            amount: 100,
            currency: Currency::parse("EUR").unwrap(),
        };
        assert_eq!(
            path.render(&charge).as_deref(),
            Some("/v2/charges/p%2F9+x?ref=ch_0000000000000001")
        );
        let without = ChargeRef {
            payment_id: None,
            ..charge
        };
        assert_eq!(path.render(&without), None, "needs the payment id");
        let by_key = LookupPath::parse("/charges/{{idempotency_key}}").unwrap();
        assert_eq!(
            by_key.render(&without).as_deref(),
            Some("/charges/ch_0000000000000001")
        );
        let err = LookupPath::parse("/c/{{card.number}}").unwrap_err();
        assert!(err.contains("only {{idempotency_key}}"), "{err}");
        assert!(LookupPath::parse("/c/{{payment_id").is_err());
    }
}
