//! `[[gateways]]`: one table per payment gateway the vault may charge through.
//!
//! Loading only deserializes; [`GatewaySettings::check`] (called by
//! [`Gateways::from_settings`](super::Gateways::from_settings) at start-up) enforces the
//! rules below, so a gateway that is configured wrongly stops the vault from starting instead
//! of failing its first charge.
//!
//! ```toml
//! [[gateways]]
//! name = "stripe"
//! kind = "stripe"
//! base_url = "https://api.stripe.com"
//! secret_env = "STRIPE_SECRET_KEY"
//!
//! [[gateways]]
//! name = "acme"
//! kind = "generic"
//! base_url = "https://pay.acme.example"
//! secret_file = "/run/secrets/acme"
//! ca_file = "/etc/cardvault/acme-ca.pem"
//! path = "/v2/charges"
//! headers = { Authorization = "Bearer {{secret}}" }
//! idempotency_header = "Idempotency-Key"
//! body_format = "json"
//! body = '''{"amount": {{amount}}, "currency": "{{currency}}",
//!           "card": {"number": "{{card.number}}", "cvc": "{{card.cvc}}",
//!                    "exp_month": {{card.exp_month}}, "exp_year": {{card.exp_year}}}}'''
//! status_pointer = "/status"
//! status_map = { approved = "succeeded", declined = "declined", challenge = "requires_action" }
//! payment_id_pointer = "/id"
//! decline_code_pointer = "/reason_code"
//! message_pointer = "/reason"
//! ```
//!
//! Rules:
//! - `name`: 1 to 64 characters of `a-z`, `0-9`, `-`, `_`, unique (it is a metrics label and
//!   the name callers charge through).
//! - `base_url` must be `https://…` with no user info, query or fragment. Only with
//!   `loopback_test_gateway = true` may it be `http://127.0.0.1:…` or `http://[::1]:…`, and
//!   that flag itself requires a loopback IP address as host (never a name: DNS could point
//!   `localhost` elsewhere).
//! - `ca_file` replaces the built-in roots (Mozilla's, from `webpki-roots`) for this gateway;
//!   `client_cert_file` and `client_key_file` go together (mTLS).
//! - The API secret comes from exactly one of `secret_file` (one trailing newline ignored) or
//!   `secret_env` (a variable name). `stripe` requires one; `generic` requires one exactly
//!   when its templates use `{{secret}}`.
//! - `stripe_version` and `charge_id_in_description` apply to `stripe` only; `method`, `path`,
//!   `headers`, `body_format`, `body`, `idempotency_header`, the pointers, `status_map`,
//!   `success_http_statuses`, `lookup_path` and `lookup_not_found_statuses` apply to
//!   `generic` only. Setting one on the other kind is an error.
//! - `stripe_version` must be one of [`KNOWN_STRIPE_VERSIONS`]: the parameters of a charge
//!   differ between versions, and a version this connector does not know would fail every
//!   charge.
//! - `idempotency_window_secs` is 60 seconds to 7 days; `timeout_ms` bounds a whole connector
//!   call (the vault checks it against `grpc.request_timeout_ms`).
//! - `lookup_path` starts with `/`; `lookup_not_found_statuses` are 4xx and need it.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::GatewayError;

/// Default for [`GatewaySettings::connect_timeout_ms`].
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 3_000;
/// Default for [`GatewaySettings::timeout_ms`]: with the vault's own second of work, inside
/// the default gRPC deadline of 10 s.
pub const DEFAULT_TIMEOUT_MS: u64 = 8_000;
/// Default for [`GatewaySettings::idempotency_window_secs`]: 23 hours, an hour inside the 24
/// hours Stripe keeps idempotency keys at least.
pub const DEFAULT_IDEMPOTENCY_WINDOW_SECS: u64 = 82_800;
/// Shortest accepted [`GatewaySettings::idempotency_window_secs`].
pub const MIN_IDEMPOTENCY_WINDOW_SECS: u64 = 60;
/// Longest accepted [`GatewaySettings::idempotency_window_secs`]: 7 days.
pub const MAX_IDEMPOTENCY_WINDOW_SECS: u64 = 7 * 24 * 3600;
/// Default for [`GatewaySettings::lookup_not_found_statuses`].
pub const DEFAULT_LOOKUP_NOT_FOUND_STATUSES: [u16; 1] = [404];
/// Default for [`GatewaySettings::max_response_bytes`]: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 1024 * 1024;
/// Default for [`GatewaySettings::stripe_version`]: the `Stripe-Version` the connector is
/// written against.
pub const DEFAULT_STRIPE_VERSION: &str = "2024-06-20";
/// Default for [`GatewaySettings::success_http_statuses`].
pub const DEFAULT_SUCCESS_HTTP_STATUSES: [u16; 2] = [200, 201];

/// Longest gateway name.
const MAX_NAME_LEN: usize = 64;

/// Which connector speaks to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayKind {
    /// The public Stripe API: a card PaymentMethod, then a confirmed PaymentIntent.
    Stripe,
    /// A request template and a response mapping by JSON pointer.
    Generic,
}

/// HTTP method of a `generic` gateway's charge request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// `POST` (the default).
    #[default]
    Post,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
}

/// How a `generic` gateway's body template is encoded, and so how placeholders are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    /// `application/json` (the default). Placeholders render as JSON-escaped string
    /// *content without quotes*: the template writes `"{{card.number}}"` for a string and
    /// `{{amount}}` for a number.
    #[default]
    Json,
    /// `application/x-www-form-urlencoded`. Placeholders render percent-encoded; the template
    /// writes the keys, `=` and `&` itself (`card[number]={{card.number}}&amount={{amount}}`).
    Form,
}

/// What a gateway's status value means, the right-hand side of
/// [`GatewaySettings::status_map`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MappedStatus {
    /// Charged (or authorized, for manual capture).
    Succeeded,
    /// The cardholder must act (e.g. 3-D Secure).
    RequiresAction,
    /// The issuer or gateway declined the card.
    Declined,
    /// The gateway refused the request; nothing was charged.
    Failed,
}

/// One `[[gateways]]` table. See the [module docs](self) for the rules
/// [`GatewaySettings::check`] enforces. `Debug` shows where the secret comes from, never the
/// secret (it is not in this struct at all: it is read at start-up).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// The name callers charge through; also the `gateway` label of metrics and logs.
    pub name: String,
    /// `"stripe"` or `"generic"`.
    pub kind: GatewayKind,
    /// Scheme, host, port and optional path prefix, e.g. `https://api.stripe.com`.
    pub base_url: String,
    /// Allows `http://127.0.0.1:…` / `http://[::1]:…` for a test gateway on this host.
    #[serde(default)]
    pub loopback_test_gateway: bool,
    /// PEM bundle of the CAs to trust for this gateway instead of the built-in roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain to present to the gateway (mTLS), leaf first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file` (PKCS#8, SEC1 or PKCS#1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
    /// File holding the API secret; one trailing newline is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Name of the environment variable holding the API secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// Time allowed to open the TCP connection and finish the TLS handshake, in ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed for one whole connector call, in ms: every HTTP exchange of one charge
    /// (both Stripe steps), lookup or operation together. Must leave the vault a second of
    /// its own work inside `grpc.request_timeout_ms`.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long after a charge's first send the gateway still recognises its idempotency key,
    /// in seconds (60 to 7 days). The vault re-sends an unknown charge only within it. For
    /// `generic`, it applies only when the key is sent at all.
    #[serde(default = "default_idempotency_window_secs")]
    pub idempotency_window_secs: u64,
    /// Largest response body read; a larger one is refused.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,

    /// `stripe`: the pinned `Stripe-Version` header (default [`DEFAULT_STRIPE_VERSION`]);
    /// one of [`KNOWN_STRIPE_VERSIONS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_version: Option<String>,
    /// `stripe`: also put the vault's charge id into the PaymentIntent's description
    /// (`order 42 [ch_…]`, or `ch_…` alone), for dashboards that show no metadata.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub charge_id_in_description: bool,

    /// `generic`: HTTP method (default `POST`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
    /// `generic`: path appended to `base_url`, starting with `/`; no placeholders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `generic`: extra request headers. Values may use placeholders other than `card.*`
    /// (card data never goes into headers), e.g. `Authorization = "Bearer {{secret}}"`.
    /// Put credentials in through `{{secret}}`, never literally: these settings are plain
    /// configuration (and `Debug`-printed as such).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
    /// `generic`: `"json"` (default) or `"form"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_format: Option<BodyFormat>,
    /// `generic`: the body template (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// `generic`: a header that carries `{{idempotency_key}}`, e.g. `Idempotency-Key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_header: Option<String>,
    /// `generic`: JSON pointer (RFC 6901) to the status in the response (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_pointer: Option<String>,
    /// `generic`: gateway status value → meaning. Values not in the map are `Unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_map: Option<BTreeMap<String, MappedStatus>>,
    /// `generic`: JSON pointer to the gateway's payment id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id_pointer: Option<String>,
    /// `generic`: JSON pointer to a decline code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decline_code_pointer: Option<String>,
    /// `generic`: JSON pointer to a human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_pointer: Option<String>,
    /// `generic`: HTTP statuses whose body is mapped as a charge result (default
    /// [`DEFAULT_SUCCESS_HTTP_STATUSES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_http_statuses: Option<Vec<u16>>,
    /// `generic`: JSON pointer to the client secret the front end needs for a
    /// `requires_action` answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_pointer: Option<String>,
    /// `generic`: JSON pointer to the URL to send the cardholder to for a `requires_action`
    /// answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_url_pointer: Option<String>,
    /// `generic`: JSON pointer to the gateway's action object (handed back as JSON) for a
    /// `requires_action` answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_action_pointer: Option<String>,
    /// `generic`: path (appended to `base_url`) of a `GET` that tells what became of a
    /// charge; may use `{{idempotency_key}}` and `{{payment_id}}`. Its answer is mapped like a
    /// charge's. Without it, charges of this gateway cannot be looked up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup_path: Option<String>,
    /// `generic`: HTTP statuses of a lookup that mean "no such payment" (default
    /// [`DEFAULT_LOOKUP_NOT_FOUND_STATUSES`]); 4xx only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup_not_found_statuses: Option<Vec<u16>>,
}

/// The `Stripe-Version`s the `stripe` connector knows the parameters of; any other is refused
/// at start-up.
pub const KNOWN_STRIPE_VERSIONS: [&str; 3] =
    ["2024-06-20", "2026-09-30.endive", "2026-10-28.endive"];

fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

fn default_idempotency_window_secs() -> u64 {
    DEFAULT_IDEMPOTENCY_WINDOW_SECS
}

fn default_max_response_bytes() -> u64 {
    DEFAULT_MAX_RESPONSE_BYTES
}

/// Where a gateway's API secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file; one trailing newline (`\n` or `\r\n`) is ignored.
    File(PathBuf),
    /// An environment variable, by name.
    Env(String),
}

impl GatewaySettings {
    /// A gateway with the required keys and every default, for code and tests that build
    /// settings by hand.
    pub fn new(name: &str, kind: GatewayKind, base_url: &str) -> GatewaySettings {
        GatewaySettings {
            name: name.to_owned(),
            kind,
            base_url: base_url.to_owned(),
            loopback_test_gateway: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            secret_file: None,
            secret_env: None,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            idempotency_window_secs: DEFAULT_IDEMPOTENCY_WINDOW_SECS,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            stripe_version: None,
            charge_id_in_description: false,
            method: None,
            path: None,
            headers: None,
            body_format: None,
            body: None,
            idempotency_header: None,
            status_pointer: None,
            status_map: None,
            payment_id_pointer: None,
            decline_code_pointer: None,
            message_pointer: None,
            success_http_statuses: None,
            client_secret_pointer: None,
            redirect_url_pointer: None,
            next_action_pointer: None,
            lookup_path: None,
            lookup_not_found_statuses: None,
        }
    }

    /// Checks the rules of the [module docs](self) that need no file or variable: names,
    /// URL, TLS file pairs, secret source, timeouts and which keys apply to the kind.
    /// Templates are checked when the connector is built.
    pub fn check(&self) -> Result<(), GatewayError> {
        let reject = |reason: String| {
            Err(GatewayError::Config {
                gateway: self.name.clone(),
                reason,
            })
        };
        if self.name.is_empty()
            || self.name.len() > MAX_NAME_LEN
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return reject(format!(
                "name must be 1 to {MAX_NAME_LEN} characters of a-z, 0-9, '-' and '_'"
            ));
        }
        self.base_url()?;
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return reject("client_cert_file and client_key_file go together".to_owned());
        }
        if self.secret_file.is_some() && self.secret_env.is_some() {
            return reject("set only one of secret_file and secret_env".to_owned());
        }
        if self.secret_env.as_deref() == Some("") {
            return reject("secret_env must name an environment variable".to_owned());
        }
        if self.connect_timeout_ms == 0 || self.timeout_ms == 0 {
            return reject("connect_timeout_ms and timeout_ms must be positive".to_owned());
        }
        if self.max_response_bytes == 0 || usize::try_from(self.max_response_bytes).is_err() {
            return reject("max_response_bytes must be positive".to_owned());
        }
        if !(MIN_IDEMPOTENCY_WINDOW_SECS..=MAX_IDEMPOTENCY_WINDOW_SECS)
            .contains(&self.idempotency_window_secs)
        {
            return reject(format!(
                "idempotency_window_secs must be {MIN_IDEMPOTENCY_WINDOW_SECS} to \
                 {MAX_IDEMPOTENCY_WINDOW_SECS} (7 days), and within the time the gateway keeps \
                 idempotency keys"
            ));
        }
        match self.kind {
            GatewayKind::Stripe => {
                if let Some(key) = self.generic_keys_set().first() {
                    return reject(format!("{key} applies only to kind = \"generic\""));
                }
                if self.secret_source().is_none() {
                    return reject(
                        "kind = \"stripe\" needs the API secret key: set secret_file or secret_env"
                            .to_owned(),
                    );
                }
                if !KNOWN_STRIPE_VERSIONS.contains(&self.stripe_version()) {
                    return reject(format!(
                        "stripe_version {:?} is not one this connector knows the parameters of \
                         (known: {})",
                        self.stripe_version(),
                        KNOWN_STRIPE_VERSIONS.join(", ")
                    ));
                }
            }
            GatewayKind::Generic => {
                if self.stripe_version.is_some() {
                    return reject("stripe_version applies only to kind = \"stripe\"".to_owned());
                }
                if self.charge_id_in_description {
                    return reject(
                        "charge_id_in_description applies only to kind = \"stripe\"".to_owned(),
                    );
                }
                if self.body.is_none() {
                    return reject("kind = \"generic\" needs a body template".to_owned());
                }
                if self.status_pointer.is_none() {
                    return reject("kind = \"generic\" needs status_pointer".to_owned());
                }
                if self.status_map.as_ref().is_none_or(BTreeMap::is_empty) {
                    return reject("kind = \"generic\" needs a non-empty status_map".to_owned());
                }
                for (key, pointer) in [
                    ("status_pointer", &self.status_pointer),
                    ("payment_id_pointer", &self.payment_id_pointer),
                    ("decline_code_pointer", &self.decline_code_pointer),
                    ("message_pointer", &self.message_pointer),
                    ("client_secret_pointer", &self.client_secret_pointer),
                    ("redirect_url_pointer", &self.redirect_url_pointer),
                    ("next_action_pointer", &self.next_action_pointer),
                ] {
                    if let Some(p) = pointer
                        && !p.is_empty()
                        && !p.starts_with('/')
                    {
                        return reject(format!(
                            "{key} must be a JSON pointer: empty or starting with '/'"
                        ));
                    }
                }
                let path = self.path.as_deref().unwrap_or("");
                if !path.is_empty() && !path.starts_with('/') {
                    return reject("path must start with '/'".to_owned());
                }
                if path.contains("{{") || path.contains('#') || path.contains(char::is_whitespace) {
                    return reject(
                        "path must be a fixed path: no placeholders, fragment or spaces".to_owned(),
                    );
                }
                if self.success_http_statuses().is_empty()
                    || self
                        .success_http_statuses()
                        .iter()
                        .any(|s| !(200..300).contains(s))
                {
                    return reject(
                        "success_http_statuses must list 2xx statuses (at least one)".to_owned(),
                    );
                }
                if let Some(lookup) = &self.lookup_path
                    && (!lookup.starts_with('/')
                        || lookup.contains('#')
                        || lookup.contains(char::is_whitespace))
                {
                    return reject(
                        "lookup_path must start with '/' and have no fragment or spaces".to_owned(),
                    );
                }
                if self.lookup_not_found_statuses.is_some() && self.lookup_path.is_none() {
                    return reject("lookup_not_found_statuses needs lookup_path".to_owned());
                }
                if self
                    .lookup_not_found_statuses()
                    .iter()
                    .any(|s| !(400..500).contains(s))
                {
                    return reject("lookup_not_found_statuses must list 4xx statuses".to_owned());
                }
            }
        }
        Ok(())
    }

    /// `base_url` parsed and checked against the HTTPS / loopback rule, with any trailing `/`
    /// removed from its path so that paths can be appended.
    pub fn base_url(&self) -> Result<reqwest::Url, GatewayError> {
        let reject = |reason: &str| {
            Err(GatewayError::Config {
                gateway: self.name.clone(),
                reason: reason.to_owned(),
            })
        };
        let Ok(mut url) = reqwest::Url::parse(&self.base_url) else {
            return reject("base_url is not a valid URL");
        };
        if !url.username().is_empty() || url.password().is_some() {
            return reject("base_url must not contain user info; use secret_file or secret_env");
        }
        if url.query().is_some() || url.fragment().is_some() {
            return reject("base_url must not have a query or fragment");
        }
        // An IP literal (IPv6 in brackets) that is loopback; names never count.
        let loopback_ip = url
            .host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<IpAddr>().ok())
            .is_some_and(|ip| ip.is_loopback());
        match url.scheme() {
            "https" => {}
            "http" if self.loopback_test_gateway => {}
            "http" => {
                return reject(
                    "base_url must be https:// (http:// is allowed only for a gateway marked \
                     loopback_test_gateway = true on 127.0.0.1 or [::1])",
                );
            }
            _ => return reject("base_url must be https://"),
        }
        if self.loopback_test_gateway && !loopback_ip {
            return reject(
                "loopback_test_gateway = true requires base_url on a loopback IP address \
                 (127.0.0.1 or [::1])",
            );
        }
        let trimmed = url.path().trim_end_matches('/').to_owned();
        url.set_path(&trimmed);
        Ok(url)
    }

    /// Where the API secret comes from, if anywhere (`check` refuses both at once).
    pub fn secret_source(&self) -> Option<SecretSource> {
        match (&self.secret_file, &self.secret_env) {
            (Some(path), _) => Some(SecretSource::File(path.clone())),
            (None, Some(name)) => Some(SecretSource::Env(name.clone())),
            (None, None) => None,
        }
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The timeout of one whole HTTP exchange.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// `stripe_version` or its default.
    pub fn stripe_version(&self) -> &str {
        self.stripe_version
            .as_deref()
            .unwrap_or(DEFAULT_STRIPE_VERSION)
    }

    /// `lookup_not_found_statuses` or its default.
    pub fn lookup_not_found_statuses(&self) -> &[u16] {
        self.lookup_not_found_statuses
            .as_deref()
            .unwrap_or(&DEFAULT_LOOKUP_NOT_FOUND_STATUSES)
    }

    /// The idempotency window.
    pub fn idempotency_window(&self) -> Duration {
        Duration::from_secs(self.idempotency_window_secs)
    }

    /// `method` or its default.
    pub fn method(&self) -> HttpMethod {
        self.method.unwrap_or_default()
    }

    /// `body_format` or its default.
    pub fn body_format(&self) -> BodyFormat {
        self.body_format.unwrap_or_default()
    }

    /// `success_http_statuses` or its default.
    pub fn success_http_statuses(&self) -> &[u16] {
        self.success_http_statuses
            .as_deref()
            .unwrap_or(&DEFAULT_SUCCESS_HTTP_STATUSES)
    }

    /// The `generic`-only keys that are set, by name.
    fn generic_keys_set(&self) -> Vec<&'static str> {
        [
            ("method", self.method.is_some()),
            ("path", self.path.is_some()),
            ("headers", self.headers.is_some()),
            ("body_format", self.body_format.is_some()),
            ("body", self.body.is_some()),
            ("idempotency_header", self.idempotency_header.is_some()),
            ("status_pointer", self.status_pointer.is_some()),
            ("status_map", self.status_map.is_some()),
            ("payment_id_pointer", self.payment_id_pointer.is_some()),
            ("decline_code_pointer", self.decline_code_pointer.is_some()),
            ("message_pointer", self.message_pointer.is_some()),
            (
                "success_http_statuses",
                self.success_http_statuses.is_some(),
            ),
            (
                "client_secret_pointer",
                self.client_secret_pointer.is_some(),
            ),
            ("redirect_url_pointer", self.redirect_url_pointer.is_some()),
            ("next_action_pointer", self.next_action_pointer.is_some()),
            ("lookup_path", self.lookup_path.is_some()),
            (
                "lookup_not_found_statuses",
                self.lookup_not_found_statuses.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

/// Checks every gateway ([`GatewaySettings::check`]) and that names are unique.
pub fn check_all(settings: &[GatewaySettings]) -> Result<(), GatewayError> {
    let mut seen = std::collections::BTreeSet::new();
    for gateway in settings {
        gateway.check()?;
        if !seen.insert(gateway.name.as_str()) {
            return Err(GatewayError::Config {
                gateway: gateway.name.clone(),
                reason: "another gateway has the same name".to_owned(),
            });
        }
    }
    Ok(())
}

/// Largest secret file read, in bytes.
const MAX_SECRET_FILE_BYTES: u64 = 16 * 1024;

impl SecretSource {
    /// Reads the secret. It must be non-empty visible ASCII (it goes into HTTP headers and
    /// bodies). Errors name the file or variable, never the contents.
    pub fn read(&self, gateway: &str) -> Result<secrecy::SecretString, GatewayError> {
        match self {
            SecretSource::File(path) => read_secret_file(gateway, path),
            SecretSource::Env(name) => {
                let invalid = |reason: &str| GatewayError::Secret {
                    gateway: gateway.to_owned(),
                    reason: format!("environment variable {name} {reason}"),
                };
                let value = std::env::var_os(name).ok_or_else(|| invalid("is not set"))?;
                let value = zeroize::Zeroizing::new(
                    value
                        .into_string()
                        .map_err(|_| invalid("is not valid UTF-8"))?,
                );
                checked_secret(&value).map_err(invalid)
            }
        }
    }
}

fn read_secret_file(gateway: &str, path: &Path) -> Result<secrecy::SecretString, GatewayError> {
    let invalid = |reason: String| GatewayError::Secret {
        gateway: gateway.to_owned(),
        reason: format!("secret file {}: {reason}", path.display()),
    };
    let bytes = crate::secret_file::read(path, MAX_SECRET_FILE_BYTES).map_err(|e| {
        GatewayError::Secret {
            gateway: gateway.to_owned(),
            reason: format!("secret file: {e}"),
        }
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|_| invalid("not valid UTF-8".to_owned()))?;
    let line = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(text);
    checked_secret(line).map_err(|reason| invalid(reason.to_owned()))
}

fn checked_secret(value: &str) -> Result<secrecy::SecretString, &'static str> {
    if value.is_empty() {
        return Err("is empty");
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be visible ASCII without spaces");
    }
    Ok(secrecy::SecretString::from(value))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    fn stripe(url: &str) -> GatewaySettings {
        GatewaySettings {
            secret_env: Some("CARDVAULT_TEST_UNUSED".to_owned()),
            ..GatewaySettings::new("stripe", GatewayKind::Stripe, url)
        }
    }

    fn generic(url: &str) -> GatewaySettings {
        GatewaySettings {
            body: Some(r#"{"n":"{{card.number}}"}"#.to_owned()),
            status_pointer: Some("/status".to_owned()),
            status_map: Some(BTreeMap::from([("ok".to_owned(), MappedStatus::Succeeded)])),
            ..GatewaySettings::new("acme", GatewayKind::Generic, url)
        }
    }

    fn reason(result: Result<(), GatewayError>) -> String {
        result.expect_err("settings should be refused").to_string()
    }

    #[test]
    fn a_minimal_toml_table_gets_the_documented_defaults() {
        let s: GatewaySettings = toml::from_str(
            r#"
            name = "stripe"
            kind = "stripe"
            base_url = "https://api.stripe.com/"
            secret_env = "STRIPE_KEY"
            "#,
        )
        .expect("parse");
        s.check().expect("valid");
        assert!(!s.loopback_test_gateway);
        assert_eq!(s.connect_timeout(), Duration::from_secs(3));
        assert_eq!(s.timeout(), Duration::from_secs(8));
        assert_eq!(s.idempotency_window(), Duration::from_secs(23 * 3600));
        assert!(!s.charge_id_in_description);
        assert_eq!(s.max_response_bytes, 1024 * 1024);
        assert_eq!(s.stripe_version(), "2024-06-20");
        assert_eq!(s.method(), HttpMethod::Post);
        assert_eq!(s.body_format(), BodyFormat::Json);
        assert_eq!(s.success_http_statuses(), &[200, 201]);
        assert_eq!(s.base_url().unwrap().as_str(), "https://api.stripe.com/");
    }

    #[test]
    fn an_unknown_key_is_refused_by_serde() {
        let err = toml::from_str::<GatewaySettings>(
            r#"
            name = "stripe"
            kind = "stripe"
            base_url = "https://api.stripe.com"
            secret_envv = "STRIPE_KEY"
            "#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("secret_envv"), "{err}");
    }

    #[test]
    fn a_generic_table_parses_with_maps_and_enums() {
        let s: GatewaySettings = toml::from_str(
            r#"
            name = "acme"
            kind = "generic"
            base_url = "https://pay.acme.example/api/"
            method = "PUT"
            path = "/v2/charges"
            headers = { Authorization = "Bearer {{secret}}" }
            secret_file = "/run/secrets/acme"
            body_format = "form"
            body = "number={{card.number}}"
            status_pointer = "/status"
            status_map = { approved = "succeeded", challenge = "requires_action" }
            success_http_statuses = [200]
            "#,
        )
        .expect("parse");
        s.check().expect("valid");
        assert_eq!(s.method(), HttpMethod::Put);
        assert_eq!(s.body_format(), BodyFormat::Form);
        assert_eq!(
            s.status_map.as_ref().unwrap()["challenge"],
            MappedStatus::RequiresAction
        );
        assert_eq!(
            s.base_url().unwrap().as_str(),
            "https://pay.acme.example/api"
        );
        assert_eq!(
            s.secret_source(),
            Some(SecretSource::File("/run/secrets/acme".into()))
        );
    }

    #[test]
    fn plain_http_is_refused_without_the_loopback_test_flag() {
        let err = reason(stripe("http://127.0.0.1:8080").check());
        assert!(err.contains("https://"), "{err}");
        let err = reason(stripe("http://api.stripe.com").check());
        assert!(err.contains("https://"), "{err}");
    }

    #[test]
    fn plain_http_is_allowed_only_to_a_loopback_ip_of_a_test_gateway() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://[::1]:8080",
            "https://127.0.0.1:1",
        ] {
            let s = GatewaySettings {
                loopback_test_gateway: true,
                ..stripe(ok)
            };
            s.check().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "http://localhost:8080",
            "http://10.0.0.1:8080",
            "https://api.stripe.com",
        ] {
            let s = GatewaySettings {
                loopback_test_gateway: true,
                ..stripe(bad)
            };
            let err = reason(s.check());
            assert!(err.contains("loopback"), "{bad}: {err}");
        }
    }

    #[test]
    fn other_schemes_user_info_and_queries_are_refused() {
        for bad in [
            "ftp://api.stripe.com",
            "https://user:pw@api.stripe.com",
            "https://api.stripe.com/?key=1",
            "https://api.stripe.com/#x",
            "not a url",
        ] {
            let err = reason(stripe(bad).check());
            assert!(!err.contains("pw"), "{err}");
        }
    }

    #[test]
    fn names_must_be_simple_and_unique() {
        for bad in ["", "Stripe", "a b", "a.b", &"x".repeat(65)] {
            let s = GatewaySettings {
                name: bad.to_owned(),
                ..stripe("https://api.stripe.com")
            };
            assert!(s.check().is_err(), "{bad:?}");
        }
        let err = check_all(&[
            stripe("https://api.stripe.com"),
            stripe("https://api.stripe.com"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("same name"), "{err}");
    }

    #[test]
    fn stripe_needs_exactly_one_secret_source() {
        let none = GatewaySettings {
            secret_env: None,
            ..stripe("https://api.stripe.com")
        };
        assert!(reason(none.check()).contains("secret_file or secret_env"));
        let both = GatewaySettings {
            secret_file: Some("/run/secrets/stripe".into()),
            ..stripe("https://api.stripe.com")
        };
        assert!(reason(both.check()).contains("only one"));
    }

    #[test]
    fn keys_of_the_other_kind_are_refused() {
        let s = GatewaySettings {
            body: Some("x".to_owned()),
            ..stripe("https://api.stripe.com")
        };
        assert!(reason(s.check()).contains("body applies only"));
        let g = GatewaySettings {
            stripe_version: Some("2024-06-20".to_owned()),
            ..generic("https://pay.acme.example")
        };
        assert!(reason(g.check()).contains("stripe_version applies only"));
    }

    #[test]
    fn generic_needs_a_body_a_status_pointer_and_a_map() {
        generic("https://pay.acme.example").check().expect("valid");
        let no_body = GatewaySettings {
            body: None,
            ..generic("https://pay.acme.example")
        };
        assert!(reason(no_body.check()).contains("body"));
        let no_pointer = GatewaySettings {
            status_pointer: None,
            ..generic("https://pay.acme.example")
        };
        assert!(reason(no_pointer.check()).contains("status_pointer"));
        let bad_pointer = GatewaySettings {
            status_pointer: Some("status".to_owned()),
            ..generic("https://pay.acme.example")
        };
        assert!(reason(bad_pointer.check()).contains("JSON pointer"));
        let placeholder_path = GatewaySettings {
            path: Some("/charge/{{card.number}}".to_owned()),
            ..generic("https://pay.acme.example")
        };
        assert!(reason(placeholder_path.check()).contains("no placeholders"));
        let non_2xx = GatewaySettings {
            success_http_statuses: Some(vec![200, 402]),
            ..generic("https://pay.acme.example")
        };
        assert!(reason(non_2xx.check()).contains("2xx"));
    }

    #[test]
    fn tls_file_pairs_and_timeouts_are_checked() {
        let half = GatewaySettings {
            client_cert_file: Some("/etc/c.pem".into()),
            ..stripe("https://api.stripe.com")
        };
        assert!(reason(half.check()).contains("go together"));
        let zero = GatewaySettings {
            timeout_ms: 0,
            ..stripe("https://api.stripe.com")
        };
        assert!(reason(zero.check()).contains("positive"));
    }

    #[test]
    fn a_secret_file_is_read_without_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "sk_test_abc\r\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let secret = SecretSource::File(path.clone()).read("g").unwrap();
        assert_eq!(secret.expose_secret(), "sk_test_abc");

        std::fs::write(&path, "sk test\n").unwrap();
        let err = SecretSource::File(path.clone()).read("g").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("visible ASCII") && !text.contains("sk test"),
            "{text}"
        );

        std::fs::write(&path, "\n").unwrap();
        assert!(SecretSource::File(path.clone()).read("g").is_err());

        // The attack: a secret any local user may read is refused, naming the fix.
        std::fs::write(&path, "sk_test_abc\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let err = SecretSource::File(path.clone()).read("g").unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let missing = SecretSource::File(dir.path().join("absent")).read("g");
        assert!(missing.unwrap_err().to_string().contains("absent"));
    }

    #[test]
    fn a_secret_from_the_environment_is_read_by_name() {
        // A variable name private to this test, and read-only elsewhere: other tests never
        // set it, so reading it races with nothing.
        let unset = SecretSource::Env("CARDVAULT_GATEWAY_TEST_SURELY_UNSET".to_owned());
        let err = unset.read("g").unwrap_err().to_string();
        assert!(err.contains("CARDVAULT_GATEWAY_TEST_SURELY_UNSET") && err.contains("not set"));
        // Cargo sets CARGO_PKG_NAME for the tests it runs (and setting a variable here would
        // take `unsafe`, which the crate forbids).
        if let Ok(expected) = std::env::var("CARGO_PKG_NAME") {
            let secret = SecretSource::Env("CARGO_PKG_NAME".to_owned())
                .read("g")
                .unwrap();
            assert_eq!(secret.expose_secret(), expected);
        }
    }

    #[test]
    fn only_known_stripe_versions_are_accepted() {
        for known in KNOWN_STRIPE_VERSIONS {
            let s = GatewaySettings {
                stripe_version: Some(known.to_owned()),
                ..stripe("https://api.stripe.com")
            };
            s.check().unwrap_or_else(|e| panic!("{known}: {e}"));
        }
        let s = GatewaySettings {
            stripe_version: Some("2025-03-31.basil".to_owned()),
            ..stripe("https://api.stripe.com")
        };
        let err = reason(s.check());
        assert!(
            err.contains("2025-03-31.basil") && err.contains("2026-10-28.endive"),
            "{err}"
        );
    }

    #[test]
    fn the_idempotency_window_is_bounded() {
        for (secs, ok) in [
            (59, false),
            (60, true),
            (82_800, true),
            (604_800, true),
            (604_801, false),
        ] {
            let s = GatewaySettings {
                idempotency_window_secs: secs,
                ..stripe("https://api.stripe.com")
            };
            assert_eq!(s.check().is_ok(), ok, "{secs}");
        }
    }

    #[test]
    fn lookup_and_action_settings_belong_to_generic_and_are_checked() {
        let with_lookup = GatewaySettings {
            lookup_path: Some("/charges/{{idempotency_key}}".to_owned()),
            lookup_not_found_statuses: Some(vec![404, 410]),
            client_secret_pointer: Some("/challenge/secret".to_owned()),
            ..generic("https://pay.acme.example")
        };
        with_lookup.check().expect("valid");
        assert_eq!(with_lookup.lookup_not_found_statuses(), &[404, 410]);
        let bad_path = GatewaySettings {
            lookup_path: Some("charges".to_owned()),
            ..generic("https://pay.acme.example")
        };
        assert!(reason(bad_path.check()).contains("lookup_path"));
        let not_4xx = GatewaySettings {
            lookup_not_found_statuses: Some(vec![200]),
            ..with_lookup.clone()
        };
        assert!(reason(not_4xx.check()).contains("4xx"));
        let orphan = GatewaySettings {
            lookup_not_found_statuses: Some(vec![404]),
            ..generic("https://pay.acme.example")
        };
        assert!(reason(orphan.check()).contains("needs lookup_path"));
        let bad_pointer = GatewaySettings {
            next_action_pointer: Some("challenge".to_owned()),
            ..generic("https://pay.acme.example")
        };
        assert!(reason(bad_pointer.check()).contains("JSON pointer"));
        let on_stripe = GatewaySettings {
            lookup_path: Some("/x".to_owned()),
            ..stripe("https://api.stripe.com")
        };
        assert!(reason(on_stripe.check()).contains("lookup_path applies only"));
        let description_on_generic = GatewaySettings {
            charge_id_in_description: true,
            ..generic("https://pay.acme.example")
        };
        assert!(reason(description_on_generic.check()).contains("charge_id_in_description"));
    }
}
