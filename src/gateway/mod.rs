//! The gateway layer: configured connectors that send a charge to a payment gateway over
//! HTTPS, only to gateways named in configuration. It never logs a card number or returns one.
//!
//! - [`config`] — `[[gateways]]` settings and their start-up checks.
//! - [`Gateways`] — the connectors by name, built once at start-up; nothing else is reachable
//!   (callers name a gateway, never a URL).
//! - [`Connector`] — one charge: [`ChargeCard`] + [`ChargeParams`] → [`Outcome`]. Two kinds:
//!   `stripe` (the public Stripe API: a card PaymentMethod, then a confirmed PaymentIntent)
//!   and `generic` (a request template and a response mapping by JSON pointer).
//! - The outbound client (private `client` module): one `reqwest::Client` per gateway with its
//!   own rustls configuration (ring; per-gateway CA bundle and client certificate), no
//!   redirects, no proxies, connect and total timeouts, and a response size cap.
//!
//! # When is an outcome `Unknown`?
//!
//! Whenever the gateway may have charged the card but we cannot tell: a timeout or a broken
//! connection after the charge request was sent, any HTTP 409 (Stripe's answer while a request
//! with the same idempotency key is still being processed, whatever its body says), a 5xx
//! answer, a redirect, a response over `max_response_bytes`, or one we cannot parse. The
//! caller must then look the charge up ([`Connector::lookup`]) and re-send only with the
//! *same* [`ChargeParams::charge_id`] within [`Connector::resend_window`], never charge
//! again under a new key. An outcome is `Failed` only when nothing can have been charged: the
//! request was never sent (the connection could not be opened, or the call's time ran out
//! before it), the gateway refused the request with a 4xx error, or — for `stripe` — a step
//! before the PaymentIntent failed. On a re-send ([`ChargeParams::resend`]) the last rule does
//! not hold: the first send may have charged, so only a definitive answer about the payment
//! itself settles the charge, and everything else is `Unknown`.
//!
//! # Time
//!
//! A gateway's `timeout_ms` bounds a whole connector call — both Stripe steps of a charge
//! together, a lookup, an operation — so that it fits inside the caller's own deadline
//! (start-up checks `timeout_ms` against `grpc.request_timeout_ms`).
//!
//! # Card data
//!
//! Request bodies are built in zeroizing buffers of exact size and handed to the HTTP client
//! without copies of ours (what hyper and rustls copy internally for sending is beyond our
//! reach). Logs carry the gateway name, step, HTTP status, latency and the last characters
//! of the idempotency key; never URLs with data, headers or bodies. Every text an [`Outcome`]
//! takes from a gateway is scrubbed of the PAN (replaced by its masked form) and of the CVC,
//! in case a gateway echoes them.

pub mod config;

mod client;
mod encode;
mod generic;
mod stripe;
mod template;

use std::{collections::BTreeMap, fmt, sync::Arc, time::Instant};

pub use config::{GatewayKind, GatewaySettings};

use crate::{
    card::{Pan, detect},
    id::{ChargeId, OperationId},
    money::Currency,
};

/// When the gateway takes the money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capture {
    /// Authorize and capture in one step.
    Automatic,
    /// Authorize only; the merchant captures later.
    Manual,
}

impl Capture {
    /// `"automatic"` or `"manual"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Capture::Automatic => "automatic",
            Capture::Manual => "manual",
        }
    }
}

/// What became of a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChargeStatus {
    /// Charged — or, with [`Capture::Manual`], authorized and waiting to be captured.
    Succeeded,
    /// The cardholder must act (e.g. 3-D Secure); not charged yet.
    RequiresAction,
    /// The issuer or the gateway declined the card; see [`Outcome::decline_code`].
    Declined,
    /// Nothing was charged: the gateway was unreachable or refused the request.
    Failed,
    /// The gateway may or may not have charged: re-send with the same idempotency key or
    /// reconcile (see the [module docs](self)).
    Unknown,
}

impl ChargeStatus {
    /// Lower-case name, as used in the `outcome` metric label: `succeeded`,
    /// `requires_action`, `declined`, `failed`, `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeStatus::Succeeded => "succeeded",
            ChargeStatus::RequiresAction => "requires_action",
            ChargeStatus::Declined => "declined",
            ChargeStatus::Failed => "failed",
            ChargeStatus::Unknown => "unknown",
        }
    }
}

/// The card as the connector needs it. Holds borrowed secrets; never Debug-prints them:
/// `Debug` shows the masked PAN and whether a CVC is present, nothing else.
pub struct ChargeCard<'a> {
    /// The card number.
    pub pan: &'a Pan,
    /// Expiry month, 1 to 12.
    pub exp_month: u8,
    /// Expiry year, four digits.
    pub exp_year: u16,
    /// The CVC (3 or 4 digits, already validated), when the charge has one.
    pub cvc: Option<&'a str>,
    /// The cardholder name, when known.
    pub holder: Option<&'a str>,
}

impl fmt::Debug for ChargeCard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChargeCard")
            .field("pan", &self.pan)
            .field("has_cvc", &self.cvc.is_some())
            .finish_non_exhaustive()
    }
}

/// What to charge, and the key that makes re-sending safe.
#[derive(Debug, Clone, Copy)]
pub struct ChargeParams<'a> {
    /// Amount in minor units (cents for USD, yen for JPY).
    pub amount: u64,
    /// The charge's currency.
    pub currency: Currency,
    /// Capture now or later.
    pub capture: Capture,
    /// Shown to the merchant in the gateway's dashboard; may be empty.
    pub description: &'a str,
    /// Key/value pairs the gateway stores with the payment (`stripe` sends them as
    /// `metadata[k]=v`; `generic` templates have no placeholder for them).
    pub metadata: &'a [(String, String)],
    /// The vault's charge id, the charge's gateway key, stable across re-sends. Never the
    /// caller's idempotency key: the type admits only the vault's own ids. Connectors derive
    /// the gateway's idempotency keys from it, so a re-send is recognized by the gateway, and
    /// tag the payment with it (Stripe: `metadata[cardvault_charge_id]`) so that
    /// [`Connector::lookup`] can find it.
    pub charge_id: &'a ChargeId,
    /// This charge was sent before and its outcome is unknown. On a re-send only a definitive
    /// answer about the payment itself may settle the charge: a failure of any earlier step
    /// (e.g. Stripe's PaymentMethod) is [`ChargeStatus::Unknown`], never
    /// [`ChargeStatus::Failed`], because the first send may have charged.
    pub resend: bool,
}

/// What the shop's front end needs to finish a [`ChargeStatus::RequiresAction`] charge (3-D
/// Secure). Never card data. `Debug` does not show the client secret.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct NextAction {
    /// Stripe: the PaymentIntent's `client_secret`, for Stripe.js `handleNextAction`.
    pub client_secret: Option<String>,
    /// The kind of action, in the gateway's words (Stripe: `next_action.type`).
    pub kind: Option<String>,
    /// Where to send the cardholder, when the action is a redirect.
    pub redirect_url: Option<String>,
    /// The gateway's whole action object as JSON (scrubbed like every gateway text).
    pub details_json: Option<String>,
}

impl fmt::Debug for NextAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NextAction")
            .field("has_client_secret", &self.client_secret.is_some())
            .field("kind", &self.kind)
            .field("redirect_url", &self.redirect_url)
            .finish_non_exhaustive()
    }
}

/// A charge the vault may have sent, to look up at the gateway.
#[derive(Debug, Clone, Copy)]
pub struct ChargeRef<'a> {
    /// The vault's charge id, as sent in [`ChargeParams::charge_id`].
    pub charge_id: &'a ChargeId,
    /// The gateway's payment id, when an earlier answer carried one.
    pub payment_id: Option<&'a str>,
    /// Amount in minor units, as sent.
    pub amount: u64,
    /// The currency, as sent.
    pub currency: Currency,
}

/// What the gateway says about a charge the vault may have sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The gateway holds a payment for the charge: its outcome ([`ChargeStatus::Unknown`]
    /// while the gateway itself has not decided, e.g. Stripe's `processing`).
    Found(Outcome),
    /// The gateway answered and holds no payment for the charge. `evidence` says how it was
    /// asked and what it answered (no card data), for the audit record.
    NotFound {
        /// E.g. `GET /v1/payment_intents/search metadata['cardvault_charge_id']:'ch_…' → 0
        /// results`.
        evidence: String,
    },
    /// The gateway could not be asked (unreachable, 5xx, an unreadable answer): try later.
    Unavailable {
        /// Why, in our words or the gateway's (no card data).
        reason: String,
    },
    /// This connector cannot look charges up.
    Unsupported,
}

/// A follow-up on a charge the gateway holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OperationKind {
    /// Capture an authorization ([`Capture::Manual`]), in full or in part.
    Capture,
    /// Refund a captured payment, in full or in part.
    Refund,
    /// Cancel (void) an uncaptured payment.
    Cancel,
}

impl OperationKind {
    /// `"capture"`, `"refund"` or `"cancel"`.
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Capture => "capture",
            OperationKind::Refund => "refund",
            OperationKind::Cancel => "cancel",
        }
    }
}

/// One follow-up to send.
#[derive(Debug, Clone, Copy)]
pub struct Operation<'a> {
    /// What to do.
    pub kind: OperationKind,
    /// The gateway's payment id (Stripe: the PaymentIntent `pi_…`).
    pub payment_id: &'a str,
    /// Minor units to capture or refund; `None` for all of it (always `None` for a cancel).
    pub amount: Option<u64>,
    /// The charge's currency.
    pub currency: Currency,
    /// The vault's charge id, for the gateway's metadata.
    pub charge_id: &'a ChargeId,
    /// The operation's id, its gateway key, stable across re-sends.
    pub operation_id: &'a OperationId,
}

/// Where a follow-up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OperationStatus {
    /// The gateway did it.
    Succeeded,
    /// The gateway refused it or could not be reached before sending; nothing changed.
    Failed,
    /// The gateway may or may not have done it: re-send with the same key.
    Unknown,
}

impl OperationStatus {
    /// `"succeeded"`, `"failed"` or `"unknown"`.
    pub fn as_str(self) -> &'static str {
        match self {
            OperationStatus::Succeeded => "succeeded",
            OperationStatus::Failed => "failed",
            OperationStatus::Unknown => "unknown",
        }
    }
}

/// The result of one follow-up. Free of card data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationOutcome {
    /// Where it ended.
    pub status: OperationStatus,
    /// The gateway's id of what it made or changed (Stripe: `re_…` for a refund, the
    /// PaymentIntent for a capture or cancel).
    pub gateway_id: Option<String>,
    /// Minor units the gateway reports captured or refunded, when it says.
    pub amount: Option<u64>,
    /// The gateway's message, or ours.
    pub message: Option<String>,
    /// HTTP status of the gateway's answer, if it answered.
    pub http_status: Option<u16>,
}

/// The result of one charge. Free of card data (gateway texts are scrubbed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// What became of the charge.
    pub status: ChargeStatus,
    /// The gateway's id of the payment (Stripe: the PaymentIntent `pi_…`), when it gave one.
    pub payment_id: Option<String>,
    /// Why it was declined, in the gateway's words (Stripe: `decline_code`, else `code`).
    pub decline_code: Option<String>,
    /// A human-readable message from the gateway, or ours when there was no usable answer
    /// (e.g. `"gateway unreachable"`). Never contains the request body.
    pub message: Option<String>,
    /// HTTP status of the gateway's last answer, if it answered.
    pub http_status: Option<u16>,
    /// For [`ChargeStatus::RequiresAction`]: what the cardholder's browser needs (boxed:
    /// rare, and it keeps every `Result<_, Outcome>` small).
    pub action: Option<Box<NextAction>>,
}

impl Outcome {
    /// An outcome with a status and our own message, nothing from the gateway.
    pub(crate) fn ours(
        status: ChargeStatus,
        message: impl Into<String>,
        http_status: Option<u16>,
    ) -> Outcome {
        Outcome {
            status,
            payment_id: None,
            decline_code: None,
            message: Some(message.into()),
            http_status,
            action: None,
        }
    }

    /// Scrubs every gateway-supplied text of card data (see [`scrub`]) and bounds its
    /// length. The payment id keeps every number but the charged card's: an id must stay
    /// usable, and a gateway's numeric ids pass Luhn one time in ten. Without a card (a
    /// lookup), messages lose every card number and ids keep theirs.
    fn scrubbed(mut self, card: Option<&ChargeCard<'_>>) -> Outcome {
        if let Some(id) = &mut self.payment_id {
            *id = scrub(id, card, Text::PaymentId);
        }
        for text in [&mut self.decline_code, &mut self.message]
            .into_iter()
            .flatten()
        {
            *text = scrub(text, card, Text::Message);
        }
        if let Some(action) = &mut self.action {
            for id in [&mut action.client_secret, &mut action.redirect_url]
                .into_iter()
                .flatten()
            {
                *id = scrub(id, card, Text::PaymentId);
            }
            if let Some(kind) = &mut action.kind {
                *kind = scrub(kind, card, Text::Message);
            }
            action.details_json = action
                .details_json
                .take()
                .and_then(|json| scrub_json(&json, card));
        }
        self
    }
}

/// Largest [`NextAction::details_json`] handed back, in bytes; a larger one is dropped (cut
/// short it would no longer be JSON).
const MAX_ACTION_JSON_BYTES: usize = 16 * 1024;

/// `json` with every string in it scrubbed as a message (no string keeps a card number, the
/// CVC or the holder's name) and every number that [`scrub`] would change turned into its
/// scrubbed text. `None` when it does not parse or comes out larger than
/// [`MAX_ACTION_JSON_BYTES`].
fn scrub_json(json: &str, card: Option<&ChargeCard<'_>>) -> Option<String> {
    fn walk(value: &mut serde_json::Value, card: Option<&ChargeCard<'_>>) {
        use serde_json::Value;
        match value {
            Value::String(text) => *text = scrub_unbounded(text, card),
            Value::Number(number) => {
                let text = number.to_string();
                let scrubbed = scrub_unbounded(&text, card);
                if scrubbed != text {
                    *value = Value::String(scrubbed);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| walk(item, card)),
            Value::Object(fields) => fields.values_mut().for_each(|item| walk(item, card)),
            Value::Null | Value::Bool(_) => {}
        }
    }
    let mut value: serde_json::Value = serde_json::from_str(json).ok()?;
    walk(&mut value, card);
    let out = value.to_string();
    (out.len() <= MAX_ACTION_JSON_BYTES).then_some(out)
}

/// Longest gateway-supplied text kept in an [`Outcome`], in characters.
const MAX_TEXT_CHARS: usize = 500;

/// What a gateway-supplied text is, for [`scrub`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Text {
    /// The gateway's id of the payment.
    PaymentId,
    /// A decline code or a message.
    Message,
}

/// `text` cut to [`MAX_TEXT_CHARS`] after, for a message, masking every card number in it
/// (any grouping, any script's digits: a gateway may echo the number we sent or quote
/// another), removing the cardholder's name and replacing every run of digits equal to the
/// CVC by `***`. A payment id gets only the charged card's number masked (nothing without a
/// card).
fn scrub(text: &str, card: Option<&ChargeCard<'_>>, kind: Text) -> String {
    let mut out = match kind {
        Text::Message => scrub_unbounded(text, card),
        Text::PaymentId => match card {
            Some(card) => {
                let pan = card.pan.expose_digits();
                detect::replace_card_numbers(text, |digits| {
                    digits.contains(pan).then(|| detect::mask_digits(digits))
                })
            }
            None => text.to_owned(),
        },
    };
    if out.chars().count() > MAX_TEXT_CHARS {
        out = out.chars().take(MAX_TEXT_CHARS).collect();
        out.push('…');
    }
    out
}

/// A message scrubbed as [`scrub`] does, without the length bound.
fn scrub_unbounded(text: &str, card: Option<&ChargeCard<'_>>) -> String {
    let mut out = detect::replace_card_numbers(text, |digits| Some(detect::mask_digits(digits)));
    if let Some(card) = card {
        if let Some(cvc) = card.cvc {
            out = hide_digit_runs(&out, cvc);
        }
        if let Some(holder) = card.holder {
            out = remove_name(&out, holder);
        }
    }
    out
}

/// `text` with every maximal run of digits (of any script) whose value is `secret` (ASCII
/// digits) replaced by `***`.
fn hide_digit_runs(text: &str, secret: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run_start = None;
    let mut run_digits = String::new();
    let flush = |out: &mut String, run: &str, digits: &str| {
        out.push_str(if digits == secret { "***" } else { run });
    };
    for (at, c) in text.char_indices() {
        match (detect::digit_value(c), run_start) {
            (Some(d), None) => {
                run_start = Some(at);
                run_digits.push(char::from(b'0' + d));
            }
            (Some(d), Some(_)) => run_digits.push(char::from(b'0' + d)),
            (None, Some(start)) => {
                flush(&mut out, &text[start..at], &run_digits);
                run_digits.clear();
                run_start = None;
                out.push(c);
            }
            (None, None) => out.push(c),
        }
    }
    if let Some(start) = run_start {
        flush(&mut out, &text[start..], &run_digits);
    }
    out
}

/// `text` without the cardholder's name: the whole name, then each part of it of two or more
/// characters (gateways write `LOVELACE/ADA` too), matched case-insensitively as whole
/// words and replaced by `***`.
fn remove_name(text: &str, name: &str) -> String {
    let whole = name.trim();
    let parts = whole
        .split(|c: char| !c.is_alphanumeric())
        .filter(|part| part.chars().count() >= 2);
    let mut out = text.to_owned();
    for needle in std::iter::once(whole).chain(parts) {
        out = replace_word(&out, needle);
    }
    out
}

/// `text` with every whole-word, case-insensitive occurrence of `needle` replaced by `***`.
fn replace_word(text: &str, needle: &str) -> String {
    let needle: Vec<char> = needle.chars().collect();
    if needle.is_empty() {
        return text.to_owned();
    }
    let same = |a: char, b: char| a == b || a.to_lowercase().eq(b.to_lowercase());
    let hay: Vec<(usize, char)> = text.char_indices().collect();
    let word_edge = |i: usize| hay.get(i).is_none_or(|(_, c)| !c.is_alphanumeric());
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        let end = i + needle.len();
        let found = (i == 0 || word_edge(i - 1))
            && word_edge(end)
            && needle
                .iter()
                .zip(&hay[i..end])
                .all(|(&n, &(_, c))| same(c, n));
        if found {
            out.push_str(&text[copied..hay[i].0]);
            out.push_str("***");
            copied = hay.get(end).map_or(text.len(), |(at, _)| *at);
            i = end;
        } else {
            i += 1;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// Sends charges to one configured gateway.
#[async_trait::async_trait]
pub trait Connector: Send + Sync + fmt::Debug {
    /// The gateway's configured name.
    fn name(&self) -> &str;

    /// Sends one charge and reports what became of it; never fails otherwise (every
    /// problem is an [`Outcome`], see [`ChargeStatus`]). Re-sending with the same
    /// [`ChargeParams::charge_id`] and parameters never charges twice, as far as the
    /// gateway honours idempotency keys.
    async fn charge(&self, card: &ChargeCard<'_>, params: &ChargeParams<'_>) -> Outcome;

    /// How long after a charge is first sent the gateway still recognises its idempotency
    /// key, so that sending it again cannot charge twice (Stripe keeps keys at least 24 hours).
    /// `None` when the gateway does not receive the key at all. The vault re-sends a charge
    /// only within this window, and only after [`Connector::lookup`] found no payment for it.
    fn resend_window(&self) -> Option<std::time::Duration>;

    /// Asks the gateway what became of a charge: by payment id when known, else by the
    /// charge id the connector tagged the payment with. The default cannot look up.
    async fn lookup(&self, charge: &ChargeRef<'_>) -> Lookup {
        let _ = charge;
        Lookup::Unsupported
    }

    /// Whether this connector can send `kind`.
    fn supports(&self, kind: OperationKind) -> bool {
        let _ = kind;
        false
    }

    /// Sends a capture, refund or cancel for a payment the gateway holds. Re-sending with the
    /// same [`Operation::operation_id`] and parameters never does it twice. The default
    /// refuses (see [`Connector::supports`]).
    async fn operate(&self, operation: &Operation<'_>) -> OperationOutcome {
        OperationOutcome {
            status: OperationStatus::Failed,
            gateway_id: None,
            amount: None,
            message: Some(format!(
                "gateway {} cannot {}",
                self.name(),
                operation.kind.as_str()
            )),
            http_status: None,
        }
    }

    /// A decline made up without contacting the gateway, shaped like the one it gives for a
    /// card its issuer declines: the answer to a charge the vault will not send (a
    /// honeytoken's), which must not look different to the caller. The default is the
    /// generic decline of most gateways, without a payment id.
    fn decoy_decline(&self) -> Outcome {
        generic_decline()
    }
}

/// A card declined without a more specific reason, in Stripe's words (which many gateways
/// share): `generic_decline`, "Your card was declined.".
fn generic_decline() -> Outcome {
    Outcome {
        status: ChargeStatus::Declined,
        payment_id: None,
        decline_code: Some("generic_decline".to_owned()),
        message: Some("Your card was declined.".to_owned()),
        http_status: None,
        action: None,
    }
}

/// Why the gateways could not be set up. Names the gateway and the setting or file, never a
/// secret or a template's rendering.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// A setting breaks a rule of [`config`].
    #[error("gateway {gateway:?}: {reason}")]
    Config {
        /// The gateway's name.
        gateway: String,
        /// What is wrong.
        reason: String,
    },
    /// The API secret could not be read.
    #[error("gateway {gateway:?}: {reason}")]
    Secret {
        /// The gateway's name.
        gateway: String,
        /// Which file or variable, and what went wrong (never its contents).
        reason: String,
    },
    /// The CA bundle or client certificate could not be loaded.
    #[error("gateway {gateway:?}: {reason}")]
    Tls {
        /// The gateway's name.
        gateway: String,
        /// Which file, and what went wrong.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("gateway {gateway:?}: cannot build the HTTP client")]
    Client {
        /// The gateway's name.
        gateway: String,
        /// reqwest's reason.
        #[source]
        source: reqwest::Error,
    },
}

/// The configured connectors, by name.
#[derive(Debug, Clone, Default)]
pub struct Gateways {
    by_name: BTreeMap<String, Arc<dyn Connector>>,
}

impl Gateways {
    /// Checks the settings, reads secrets and certificates and builds one connector per
    /// gateway. Any problem stops here, at start-up.
    pub fn from_settings(settings: &[GatewaySettings]) -> Result<Gateways, GatewayError> {
        config::check_all(settings)?;
        let mut gateways = Gateways::empty();
        for gateway in settings {
            let connector: Arc<dyn Connector> = match gateway.kind {
                GatewayKind::Stripe => Arc::new(stripe::StripeConnector::new(gateway)?),
                GatewayKind::Generic => Arc::new(generic::GenericConnector::new(gateway)?),
            };
            gateways.insert(connector);
        }
        Ok(gateways)
    }

    /// No gateways: every charge names an unknown gateway.
    pub fn empty() -> Gateways {
        Gateways::default()
    }

    /// Adds (or replaces) a connector under its [`Connector::name`]; for tests that charge
    /// through a fake.
    pub fn insert(&mut self, connector: Arc<dyn Connector>) {
        self.by_name.insert(connector.name().to_owned(), connector);
    }

    /// The connector named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Connector>> {
        self.by_name.get(name)
    }

    /// The configured names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }
}

/// The last characters of a charge or operation id, enough to find it in logs.
fn key_suffix(key: &str) -> &str {
    const SHOWN: usize = 6;
    let start = key
        .char_indices()
        .rev()
        .nth(SHOWN - 1)
        .map_or(0, |(i, _)| i);
    &key[start..]
}

/// Runs one charge with its log line and metrics, and scrubs the outcome.
async fn observed(
    gateway: &str,
    card: &ChargeCard<'_>,
    params: &ChargeParams<'_>,
    charge: impl Future<Output = Outcome>,
) -> Outcome {
    let started = Instant::now();
    let outcome = charge.await.scrubbed(Some(card));
    let elapsed = started.elapsed();
    metrics::counter!(
        "cardvault_gateway_requests_total",
        "gateway" => gateway.to_owned(),
        "outcome" => outcome.status.as_str(),
    )
    .increment(1);
    metrics::histogram!(
        "cardvault_gateway_latency_seconds",
        "gateway" => gateway.to_owned(),
        "outcome" => outcome.status.as_str(),
    )
    .record(elapsed.as_secs_f64());
    let latency_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    let key = key_suffix(params.charge_id.as_str());
    match outcome.status {
        ChargeStatus::Succeeded | ChargeStatus::RequiresAction | ChargeStatus::Declined => {
            tracing::info!(
                gateway,
                outcome = outcome.status.as_str(),
                http_status = outcome.http_status,
                latency_ms,
                idempotency_key_suffix = key,
                resend = params.resend,
                "gateway charge"
            );
        }
        ChargeStatus::Failed | ChargeStatus::Unknown => {
            tracing::warn!(
                gateway,
                outcome = outcome.status.as_str(),
                http_status = outcome.http_status,
                latency_ms,
                idempotency_key_suffix = key,
                resend = params.resend,
                reason = outcome.message.as_deref().unwrap_or(""),
                "gateway charge"
            );
        }
    }
    outcome
}

/// Runs one lookup with its log line and metrics, and scrubs what the gateway said (there is
/// no card at a lookup: every card number in a text is masked).
async fn observed_lookup(
    gateway: &str,
    charge: &ChargeRef<'_>,
    lookup: impl Future<Output = Lookup>,
) -> Lookup {
    let started = Instant::now();
    let result = match lookup.await {
        Lookup::Found(outcome) => Lookup::Found(outcome.scrubbed(None)),
        Lookup::NotFound { evidence } => Lookup::NotFound {
            evidence: scrub(&evidence, None, Text::Message),
        },
        Lookup::Unavailable { reason } => Lookup::Unavailable {
            reason: scrub(&reason, None, Text::Message),
        },
        Lookup::Unsupported => Lookup::Unsupported,
    };
    let elapsed = started.elapsed();
    let latency_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    let (label, detail) = match &result {
        Lookup::Found(outcome) => (outcome.status.as_str(), outcome.message.as_deref()),
        Lookup::NotFound { evidence } => ("not_found", Some(evidence.as_str())),
        Lookup::Unavailable { reason } => ("unavailable", Some(reason.as_str())),
        Lookup::Unsupported => ("unsupported", None),
    };
    metrics::counter!(
        "cardvault_gateway_lookups_total",
        "gateway" => gateway.to_owned(),
        "result" => label,
    )
    .increment(1);
    metrics::histogram!(
        "cardvault_gateway_lookup_latency_seconds",
        "gateway" => gateway.to_owned(),
        "result" => label,
    )
    .record(elapsed.as_secs_f64());
    // Logs name a charge by the end of its id only, here too.
    let suffix = key_suffix(charge.charge_id.as_str());
    let detail = detail
        .unwrap_or("")
        .replace(charge.charge_id.as_str(), &format!("…{suffix}"));
    tracing::info!(
        gateway,
        result = label,
        latency_ms,
        charge_id_suffix = suffix,
        detail,
        "gateway lookup"
    );
    result
}

/// Runs one capture, refund or cancel with its log line and metrics, and scrubs the
/// gateway's message.
async fn observed_operation(
    gateway: &str,
    operation: &Operation<'_>,
    run: impl Future<Output = OperationOutcome>,
) -> OperationOutcome {
    let started = Instant::now();
    let key = operation.operation_id.as_str();
    let mut outcome = run.await;
    outcome.message = outcome.message.map(|m| scrub(&m, None, Text::Message));
    outcome.gateway_id = outcome
        .gateway_id
        .map(|id| scrub(&id, None, Text::PaymentId));
    let elapsed = started.elapsed();
    metrics::counter!(
        "cardvault_gateway_operations_total",
        "gateway" => gateway.to_owned(),
        "operation" => operation.kind.as_str(),
        "outcome" => outcome.status.as_str(),
    )
    .increment(1);
    metrics::histogram!(
        "cardvault_gateway_operation_latency_seconds",
        "gateway" => gateway.to_owned(),
        "operation" => operation.kind.as_str(),
        "outcome" => outcome.status.as_str(),
    )
    .record(elapsed.as_secs_f64());
    let latency_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    let level_info = outcome.status == OperationStatus::Succeeded;
    let reason = outcome.message.as_deref().unwrap_or("");
    if level_info {
        tracing::info!(
            gateway,
            operation = operation.kind.as_str(),
            outcome = outcome.status.as_str(),
            http_status = outcome.http_status,
            latency_ms,
            idempotency_key_suffix = key_suffix(key),
            "gateway operation"
        );
    } else {
        tracing::warn!(
            gateway,
            operation = operation.kind.as_str(),
            outcome = outcome.status.as_str(),
            http_status = outcome.http_status,
            latency_ms,
            idempotency_key_suffix = key_suffix(key),
            reason,
            "gateway operation"
        );
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card<'a>(pan: &'a Pan, cvc: Option<&'a str>) -> ChargeCard<'a> {
        ChargeCard {
            pan,
            exp_month: 12,
            exp_year: 2030,
            cvc,
            holder: Some("Ada Lovelace"),
        }
    }

    #[test]
    fn charge_card_debug_shows_only_the_masked_pan() {
        let pan = Pan::parse("4242424242424242").unwrap();
        let text = format!("{:?}", card(&pan, Some("987")));
        assert_eq!(
            text,
            "ChargeCard { pan: Pan(424242******4242), has_cvc: true, .. }"
        );
    }

    #[test]
    fn scrubbing_masks_the_pan_and_hides_the_cvc_but_keeps_other_numbers() {
        let pan = Pan::parse("4242424242424242").unwrap();
        let c = card(&pan, Some("987"));
        assert_eq!(
            scrub(
                "card 4242424242424242 cvc 987 amount 9870 x987",
                Some(&c),
                Text::Message
            ),
            "card 424242******4242 cvc *** amount 9870 x***"
        );
        assert_eq!(
            scrub("pi_987 4242424242424242", Some(&c), Text::PaymentId),
            "pi_987 424242******4242"
        );
        assert_eq!(scrub("no digits", Some(&c), Text::Message), "no digits");
        let long = "é".repeat(600);
        assert_eq!(
            scrub(&long, Some(&c), Text::Message).chars().count(),
            MAX_TEXT_CHARS + 1
        );
    }

    #[test]
    fn grouped_and_unicode_card_numbers_and_other_cards_are_masked_in_messages() {
        let pan = Pan::parse("4242424242424242").unwrap();
        let c = card(&pan, Some("987"));
        for (text, scrubbed) in [
            (
                "card 4242 4242 4242 4242 refused",
                "card 424242******4242 refused",
            ),
            ("card 4242-4242-4242-4242", "card 424242******4242"),
            ("card 4242.4242.4242.4242", "card 424242******4242"),
            (
                "card ４２４２４２４２４２４２４２４２",
                "card 424242******4242",
            ),
            ("card ٤٢٤٢ ٤٢٤٢ ٤٢٤٢ ٤٢٤٢", "card 424242******4242"),
            // A number the gateway quotes that is not the charged card, of no known brand.
            ("use 0004 2424 2424 2424 242", "use 000424*********4242"),
            ("cvc ٩٨٧ wrong", "cvc *** wrong"),
        ] {
            assert_eq!(scrub(text, Some(&c), Text::Message), scrubbed, "{text}");
        }
    }

    #[test]
    fn the_cardholder_name_is_removed_from_messages_in_any_case_and_order() {
        let pan = Pan::parse("4242424242424242").unwrap();
        let c = card(&pan, None);
        for (text, scrubbed) in [
            ("declined for Ada Lovelace", "declined for ***"),
            ("declined for ADA LOVELACE.", "declined for ***."),
            ("holder LOVELACE/ADA", "holder ***/***"),
            ("ada lovelace's card", "***'s card"),
            // Whole words only: a part of another word stays.
            ("Adamant lovelaceful", "Adamant lovelaceful"),
        ] {
            assert_eq!(scrub(text, Some(&c), Text::Message), scrubbed, "{text}");
        }
    }

    #[test]
    fn a_payment_id_keeps_its_own_numbers_but_not_the_card_number() {
        let pan = Pan::parse("4242424242424242").unwrap();
        let c = card(&pan, Some("987"));
        // Passes Luhn, but is the gateway's id: kept, or the charge could not be found.
        assert_eq!(
            scrub("1234567812345670", Some(&c), Text::PaymentId),
            "1234567812345670"
        );
        assert_eq!(
            scrub("987-4242 4242 4242 4242", Some(&c), Text::PaymentId),
            "987-424242******4242"
        );
    }

    proptest::proptest! {
        #[test]
        fn no_card_number_or_name_survives_a_message(
            payload in proptest::collection::vec(0u8..10, 11..=18),
            separator in proptest::sample::select(vec!["", " ", "-", ".", "\u{A0}"]),
            group in 3usize..=5,
            zero in proptest::sample::select(vec![0x30u32, 0xFF10, 0x660, 0x966]),
            upper in proptest::bool::ANY,
        ) {
            // Any Luhn-valid number, grouped and written in one script, beside the name.
            let mut digits: Vec<u8> = payload.iter().map(|d| b'0' + d).collect();
            digits.push(crate::card::luhn::check_digit(&digits));
            let ascii = String::from_utf8(digits).expect("ASCII");
            let written: Vec<String> = ascii
                .as_bytes()
                .chunks(group)
                .map(|g| {
                    g.iter()
                        .map(|b| char::from_u32(zero + u32::from(b - b'0')).expect("digit"))
                        .collect()
                })
                .collect();
            let name = if upper { "ADA LOVELACE" } else { "Ada Lovelace" };
            let text = format!("declined: {} ({name})", written.join(separator));
            let pan = Pan::parse("4242424242424242").unwrap();
            let scrubbed = scrub(&text, Some(&card(&pan, None)), Text::Message);
            let normalized: String = scrubbed
                .chars()
                .filter_map(|c| match detect::digit_value(c) {
                    Some(d) => Some(char::from(b'0' + d)),
                    None => (c == '*').then_some('*'),
                })
                .collect();
            proptest::prop_assert!(!normalized.contains(&ascii), "{scrubbed}");
            proptest::prop_assert!(!scrubbed.to_lowercase().contains("lovelace"), "{scrubbed}");
        }
    }

    #[test]
    fn outcome_scrubbing_covers_every_gateway_text() {
        let pan = Pan::parse("4242424242424242").unwrap();
        let outcome = Outcome {
            status: ChargeStatus::Declined,
            payment_id: Some("pi_4242424242424242".to_owned()),
            decline_code: Some("987".to_owned()),
            message: Some("bad card 4242424242424242".to_owned()),
            http_status: Some(402),
            action: None,
        }
        .scrubbed(Some(&card(&pan, Some("987"))));
        let text = format!("{outcome:?}");
        assert!(
            !text.contains("4242424242424242") && !text.contains("987"),
            "{text}"
        );
    }

    #[test]
    fn only_a_short_suffix_of_the_idempotency_key_is_logged() {
        assert_eq!(key_suffix("order-1234567"), "234567");
        assert_eq!(key_suffix("abc"), "abc");
        assert_eq!(key_suffix("ééééééé"), "éééééé");
    }

    #[test]
    fn gateways_are_found_by_name() {
        let gateways = Gateways::from_settings(&[]).unwrap();
        assert!(gateways.names().is_empty());
        assert!(gateways.get("stripe").is_none());
    }

    #[test]
    fn an_action_is_scrubbed_and_its_json_stays_json() {
        let pan = Pan::parse("4242424242424242").unwrap();
        let outcome = Outcome {
            status: ChargeStatus::RequiresAction,
            payment_id: Some("pi_1".to_owned()),
            decline_code: None,
            message: None,
            http_status: Some(200),
            action: Some(Box::new(NextAction {
                client_secret: Some("pi_1_secret_4242424242424242".to_owned()),
                kind: Some("redirect_to_url".to_owned()),
                redirect_url: Some("https://acs.example/?pan=4242424242424242&n=987".to_owned()),
                details_json: Some(
                    r#"{"card": 4242424242424242, "note": ["cvc 987", "Ada Lovelace"], "n": 5}"#
                        .to_owned(),
                ),
            })),
        }
        .scrubbed(Some(&card(&pan, Some("987"))));
        let action = outcome.action.unwrap();
        assert_eq!(
            action.client_secret.as_deref(),
            Some("pi_1_secret_424242******4242")
        );
        assert!(!action.redirect_url.unwrap().contains("4242424242424242"));
        let details: serde_json::Value =
            serde_json::from_str(action.details_json.as_deref().unwrap()).expect("still JSON");
        assert_eq!(
            details,
            serde_json::json!({"card": "424242******4242", "note": ["cvc ***", "***"], "n": 5})
        );
        assert_eq!(scrub_json("not json", None), None);
        let huge = format!("{{\"x\": \"{}\"}}", "a".repeat(MAX_ACTION_JSON_BYTES));
        assert_eq!(scrub_json(&huge, None), None, "too large to hand back");
    }

    #[test]
    fn without_a_card_messages_lose_every_card_number_and_ids_keep_theirs() {
        assert_eq!(
            scrub("card 5555 5555 5555 4444 refused", None, Text::Message),
            "card 555555******4444 refused"
        );
        assert_eq!(
            scrub("1234567812345670", None, Text::PaymentId),
            "1234567812345670"
        );
    }
}
