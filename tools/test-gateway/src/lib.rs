//! A test payment gateway: a small HTTPS server speaking the subset of Stripe's API that the
//! `stripe` connector uses, behaving like Stripe's test mode for its documented test cards.
//! The vault's tests run it in-process; the `cardvault-test-gateway` binary runs it for demos.
//!
//! # API
//!
//! Requests need `Authorization: Bearer <secret key>` (else 401 with a Stripe error
//! object). Bodies are `application/x-www-form-urlencoded` with Stripe's bracketed nested
//! keys (`card[number]`, `metadata[order]`); unknown parameters are refused as Stripe
//! refuses them. Every answer is JSON.
//!
//! - `POST /v1/payment_methods` — `type=card`, `card[number]`, `card[exp_month]`,
//!   `card[exp_year]`, `card[cvc]`, `metadata[…]` → a card PaymentMethod (`pm_…`) carrying
//!   the metadata. A bad number is a 402 `incorrect_number`. The card is kept in memory,
//!   keyed by id, for the next endpoint.
//! - `POST /v1/payment_intents` — `amount`, `currency`, `payment_method`, `confirm`,
//!   `capture_method` (`automatic` | `automatic_async` | `manual`), `description`,
//!   `metadata[…]`, `payment_method_types[]` (by version, see below) → a PaymentIntent
//!   (`pi_…`). Confirming decides by the card's number, see [`cards`]: [`cards::SUCCESS`] → `succeeded` (`requires_capture` when manual),
//!   [`cards::DECLINED`], [`cards::INSUFFICIENT_FUNDS`], [`cards::EXPIRED`],
//!   [`cards::INCORRECT_CVC`] → 402 `card_error` with Stripe's code, decline code and message
//!   and the PaymentIntent back in `requires_payment_method`, [`cards::PROCESSING_ERROR`] →
//!   402 `processing_error`, [`cards::REQUIRES_ACTION`] → 200 `requires_action`, and
//!   [`cards::HANG`] (this gateway's own card) waits [`TestGatewayOptions::hang`] — the
//!   PaymentIntent meanwhile `processing` and retrievable as such — then succeeds;
//!   [`cards::ANSWER_LOST`] (also this gateway's own) succeeds but answers 500 `api_error`,
//!   replayed as such under its key. Any other valid card succeeds.
//!   Missing `amount`, `currency` or `payment_method` is a 400 `parameter_missing` naming
//!   the `param`.
//! - `GET /v1/payment_intents/{id}`, `GET /v1/payment_methods/{id}` — the stored object
//!   (for reconciliation; `card.checks.cvc_check` says whether a CVC came with the card).
//! - `POST /v1/payment_intents/{id}/capture` — optional `amount_to_capture` (at most
//!   `amount_capturable`, else 400 `amount_too_large`), `metadata[…]`: `requires_capture` →
//!   `succeeded` with `amount_received` set and `amount_capturable` 0 (the rest is
//!   released); from any other status a 400 `payment_intent_unexpected_state` carrying the
//!   intent.
//! - `POST /v1/payment_intents/{id}/cancel` — optional `cancellation_reason`: from
//!   `requires_payment_method`, `requires_capture`, `requires_confirmation` or
//!   `requires_action` → `canceled` (`canceled_at`, `cancellation_reason`); otherwise a 400
//!   `payment_intent_unexpected_state`.
//! - `POST /v1/refunds` — `payment_intent` (or its `charge`), optional `amount` (all that
//!   remains by default), `reason`, `metadata[…]` → a Refund (`re_…`, `status: succeeded`).
//!   Only a `succeeded` intent (else 400 `payment_intent_unexpected_state`); more than
//!   remains is a 400 `amount_too_large`, nothing left a 400 `charge_already_refunded`.
//!   `GET /v1/refunds/{id}` returns one.
//! - `GET /v1/payment_intents/search?query=…` (`limit` 1–100, default 10; `page` from an
//!   answer's `next_page`) — Stripe's search result object `{"object": "search_result",
//!   "url": "/v1/payment_intents/search", "has_more": …, "next_page": …, "data": […]}`,
//!   newest first. The query language is Stripe's, for `metadata['key']:'value'`, `status`,
//!   `currency`, `customer` and `amount` clauses joined by `AND` or `OR`, `-` negating one
//!   (see `search`); a query it cannot parse is a 400 `invalid_request_error` on `query`.
//!   A PaymentIntent is found at once here, while Stripe's search index can lag writes by up
//!   to a minute: a client must not take "not found" shortly after a request as proof that
//!   no PaymentIntent was made.
//!
//! # Versions
//!
//! Every `/v1` request is read in the `Stripe-Version` it names, after the secret key is
//! checked: one of [`STRIPE_VERSIONS`], or, without the header, the account default
//! [`DEFAULT_STRIPE_VERSION`]. Any other is a 400 `invalid_request_error` ("Invalid Stripe
//! API version: …") before anything runs. Under `2024-06-20` a PaymentIntent takes
//! `payment_method_types[]` and `allowed_payment_method_types` is `parameter_unknown`; under
//! the endive versions it is the other way round (`param: payment_method_types`), and the
//! PaymentIntent shows the list under the version's name.
//!
//! # Idempotency
//!
//! As Stripe documents it, for every `/v1` POST alike: an `Idempotency-Key` header saves
//! the answer under (path, key) — paths standing in for Stripe's per-account scope — once
//! the endpoint has begun executing, 402 declines and 500s included (a 400 from validation
//! or from the intent's state saves nothing). A repeat with the same parameters gets the
//! saved answer again (same ids, same status) with `Idempotent-Replayed: true` and does
//! nothing; different parameters get a 400 `idempotency_error`; a repeat while the first is
//! still running (the hang card) gets a 409 `invalid_request_error` with code
//! `idempotency_key_in_use`, Stripe's shape for it (a client must take any 409 as "not known
//! yet, try again later"). The endpoint runs in a task of its own, so a client that times
//! out does not stop it: its answer is saved and a later retry replays it. A key is
//! forgotten [`TestGatewayOptions::idempotency_key_ttl`] after its first use (Stripe prunes
//! keys once they are at least 24 hours old): a repeat after that runs the endpoint afresh —
//! with the same parameters, a second PaymentIntent.
//!
//! # Misbehaviour for the outbound-safety tests
//!
//! Without authentication: `POST /test/redirect` → 302 to `/v1/payment_intents`;
//! `POST /test/huge` → 200 with a [`HUGE_BODY_BYTES`] JSON body (with `Content-Length`;
//! `?chunked=true` streams it without one); `POST /test/slow` → waits like the hang card,
//! then a `succeeded` PaymentIntent-shaped body (not stored).
//!
//! # Observing
//!
//! [`TestGateway::stats`] counts POSTs per path, executions and replays and distinct
//! idempotency keys; [`TestGateway::requests`] logs method, path, idempotency key and
//! `Stripe-Version` of every request; [`TestGateway::payment_intent`],
//! [`TestGateway::payment_intents_with_metadata`] and [`TestGateway::refunds_of`] show the
//! stored objects, so a test can count the PaymentIntents made for one charge. None of
//! them ever holds card data, and logs (`tracing`)
//! name only ids and statuses: card numbers and CVCs live only in the in-memory
//! PaymentMethods, as [`cardvault::card::Pan`] and [`cardvault::card::Cvc`] (zeroized, redacted).
//!
//! # TLS
//!
//! With [`TestGatewayOptions::tls`] the gateway serves HTTPS (rustls with ring, HTTP/1.1)
//! from PEM files through the same listener as the admin port ([`cardvault::tls::TlsListener`]);
//! a `client_ca_file` there makes client certificates mandatory, for testing a gateway's
//! client certificate. Without it the gateway speaks plain HTTP and refuses to listen on
//! anything but loopback: the vault allows `http://127.0.0.1` only for a gateway marked as a
//! loopback test gateway.

//!
//! # Where it lives
//!
//! A workspace member of its own (library and binary), so the vault's production build never
//! carries it. It uses the `cardvault` library for card parsing and brands, random ids, the
//! reloading TLS listener, and logging set-up.

#![forbid(unsafe_code)]

pub mod cards;
mod cli;
mod form;
mod handlers;
mod lifecycle;
mod search;
mod stripe;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt, io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    Router,
    routing::{get, post},
};
use serde_json::Value;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

pub use self::cli::{TestGatewayArgs, run_cli};
use self::stripe::ApiResponse;
use cardvault::{
    card::{Cvc, Pan},
    tls::{self, ClientAuth, ReloadingAcceptor, TlsError, TlsFiles},
};

/// Size of the `POST /test/huge` body: 10 MiB.
pub const HUGE_BODY_BYTES: usize = 10 * 1024 * 1024;

/// The secret key of [`TestGatewayOptions::default`].
pub const DEFAULT_SECRET_KEY: &str = "sk_test_cardvault_test_gateway";

/// The `Stripe-Version` assumed when a request sends none: the account default.
pub const DEFAULT_STRIPE_VERSION: &str = "2024-06-20";

/// The `Stripe-Version`s the gateway knows, oldest first: the connector's pinned default
/// and the endive releases, which renamed `payment_method_types` to
/// `allowed_payment_method_types` from `2026-09-30.endive` on.
pub const STRIPE_VERSIONS: &[&str] = &[
    DEFAULT_STRIPE_VERSION,
    "2026-09-30.endive",
    "2026-10-28.endive",
];

/// How long the hang card waits unless told otherwise.
pub const DEFAULT_HANG: Duration = Duration::from_secs(30);

/// How long an idempotency key is remembered unless told otherwise: 24 hours, the least
/// Stripe promises to keep one.
pub const DEFAULT_IDEMPOTENCY_KEY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`TestGateway::shutdown`] waits for open connections before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Paths of the API, as recorded in [`GatewayStats`].
pub mod paths {
    /// Creates card PaymentMethods.
    pub const PAYMENT_METHODS: &str = "/v1/payment_methods";
    /// Creates (and confirms) PaymentIntents.
    pub const PAYMENT_INTENTS: &str = "/v1/payment_intents";
    /// Searches PaymentIntents (`GET`).
    pub const PAYMENT_INTENTS_SEARCH: &str = "/v1/payment_intents/search";
    /// Refunds succeeded PaymentIntents.
    pub const REFUNDS: &str = "/v1/refunds";
    /// Answers with a redirect.
    pub const TEST_REDIRECT: &str = "/test/redirect";
    /// Answers with an oversized body.
    pub const TEST_HUGE: &str = "/test/huge";
    /// Answers after the hang duration.
    pub const TEST_SLOW: &str = "/test/slow";
    /// A JSON charge API of another shape, for the `generic` connector.
    pub const GENERIC_CHARGES: &str = "/generic/charges";
}

/// How to run a [`TestGateway`].
#[derive(Clone)]
pub struct TestGatewayOptions {
    /// Where to listen; port 0 picks a free port. Without TLS it must be a loopback
    /// address. Default `127.0.0.1:0`.
    pub addr: SocketAddr,
    /// The API key every `/v1` request must bear (`Authorization: Bearer …`). Default
    /// [`DEFAULT_SECRET_KEY`].
    pub secret_key: String,
    /// How long the hang card and `/test/slow` wait before answering. Default
    /// [`DEFAULT_HANG`].
    pub hang: Duration,
    /// How long after its first use an idempotency key is forgotten: a repeat after that
    /// runs the endpoint afresh (a second PaymentIntent), as after Stripe prunes a key.
    /// A key whose first request is still running is never forgotten. Default
    /// [`DEFAULT_IDEMPOTENCY_KEY_TTL`]; tests make it a second or two.
    pub idempotency_key_ttl: Duration,
    /// Certificate chain and key (PEM files) to serve HTTPS with; with `client_ca_file`,
    /// client certificates chaining to it are required. `None`: plain HTTP, loopback only.
    pub tls: Option<TlsFiles>,
}

impl Default for TestGatewayOptions {
    fn default() -> Self {
        TestGatewayOptions {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            secret_key: DEFAULT_SECRET_KEY.to_owned(),
            hang: DEFAULT_HANG,
            idempotency_key_ttl: DEFAULT_IDEMPOTENCY_KEY_TTL,
            tls: None,
        }
    }
}

impl fmt::Debug for TestGatewayOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestGatewayOptions")
            .field("addr", &self.addr)
            .field("hang", &self.hang)
            .field("idempotency_key_ttl", &self.idempotency_key_ttl)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestGatewayError {
    /// Plain HTTP was asked for on an address that is not loopback.
    #[error("refusing plain HTTP on {addr}: without TLS the test gateway listens on loopback only")]
    PlainHttpNotLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The certificate or key could not be loaded.
    #[error("cannot load the test gateway's TLS files")]
    Tls(#[from] TlsError),
}

/// Counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GatewayStats {
    /// Every POST received, by path: refused, replayed and executed alike.
    pub posts: BTreeMap<String, u64>,
    /// POSTs to the API that ran the endpoint, by path: not refused for authentication or an
    /// idempotency conflict, not answered from an idempotency key. One per PaymentIntent
    /// attempt on [`paths::PAYMENT_INTENTS`].
    pub executed: BTreeMap<String, u64>,
    /// Answers replayed from an idempotency key.
    pub replays: u64,
    /// Distinct (path, idempotency key) pairs seen on POSTs.
    pub idempotency_keys: usize,
}

impl GatewayStats {
    /// POSTs received on `path`.
    pub fn posts_to(&self, path: &str) -> u64 {
        self.posts.get(path).copied().unwrap_or(0)
    }

    /// Executions of the endpoint at `path`.
    pub fn executed_on(&self, path: &str) -> u64 {
        self.executed.get(path).copied().unwrap_or(0)
    }
}

/// One request as the gateway saw it: never its body.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordedRequest {
    /// `POST`, `GET`, …
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The `Stripe-Version` header.
    pub stripe_version: Option<String>,
}

/// A running test gateway. Stops on [`TestGateway::shutdown`], or when dropped.
pub struct TestGateway {
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for TestGateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestGateway")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl TestGateway {
    /// Binds `options.addr` and serves in a background task. Must be called inside a
    /// Tokio runtime.
    pub async fn start(options: TestGatewayOptions) -> Result<TestGateway, TestGatewayError> {
        let TestGatewayOptions {
            addr,
            secret_key,
            hang,
            idempotency_key_ttl,
            tls,
        } = options;
        if tls.is_none() && !addr.ip().is_loopback() {
            return Err(TestGatewayError::PlainHttpNotLoopback { addr });
        }
        let acceptor = tls
            .map(|files| {
                let client_auth = if files.client_ca_file.is_some() {
                    ClientAuth::Required
                } else {
                    ClientAuth::None
                };
                ReloadingAcceptor::new(files, client_auth, &[tls::ALPN_HTTP1])
            })
            .transpose()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TestGatewayError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| TestGatewayError::Bind { addr, source })?;

        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Shared {
            secret_key,
            hang,
            idempotency_key_ttl,
            stop: stopped.clone(),
            state: Mutex::default(),
        });
        let app = router(shared.clone());
        let is_tls = acceptor.is_some();
        let task = tokio::spawn(serve(listener, acceptor, app, stopped));
        tracing::info!(addr = %bound, tls = is_tls, "test gateway listening");
        Ok(TestGateway {
            addr: bound,
            tls: is_tls,
            shared,
            stop,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `https://127.0.0.1:<port>` (`http://…` without TLS). An unspecified
    /// bind address (`0.0.0.0`, `::`) is given as loopback.
    pub fn url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{addr}")
    }

    /// Whether the gateway serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The API key requests must bear.
    pub fn secret_key(&self) -> &str {
        &self.shared.secret_key
    }

    /// Counters since start.
    pub fn stats(&self) -> GatewayStats {
        let state = self.shared.lock();
        GatewayStats {
            posts: state.posts.clone(),
            executed: state.executed.clone(),
            replays: state.replays,
            idempotency_keys: state.keys_seen.len(),
        }
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().log.clone()
    }

    /// The stored PaymentIntent `id`, as `GET /v1/payment_intents/{id}` returns it.
    pub fn payment_intent(&self, id: &str) -> Option<Value> {
        self.shared.lock().payment_intents.get(id).cloned()
    }

    /// Every stored PaymentIntent whose `metadata[key]` is `value`, oldest first: how a
    /// test counts the PaymentIntents made for one charge.
    pub fn payment_intents_with_metadata(&self, key: &str, value: &str) -> Vec<Value> {
        self.shared
            .lock()
            .intents_in_order()
            .filter(|intent| intent["metadata"][key] == value)
            .cloned()
            .collect()
    }

    /// Whether PaymentMethod `id` was created with CVC `cvc` (`Some(false)` also when it came
    /// without one; `None` for an unknown id): how a test tells which CVC a re-send used,
    /// without the gateway ever showing one.
    pub fn payment_method_cvc_is(&self, id: &str, cvc: &str) -> Option<bool> {
        let state = self.shared.lock();
        let card = state.payment_methods.get(id)?;
        Some(card.cvc.as_ref().is_some_and(|held| {
            // Digests, so the comparison's timing says nothing about the CVC.
            let digest = |text: &str| ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            digest(held.expose()).as_ref() == digest(cvc).as_ref()
        }))
    }

    /// The refunds of PaymentIntent `payment_intent`, oldest first.
    pub fn refunds_of(&self, payment_intent: &str) -> Vec<Value> {
        self.shared
            .lock()
            .refunds
            .iter()
            .filter(|refund| refund["payment_intent"] == payment_intent)
            .cloned()
            .collect()
    }

    /// Stops accepting, lets requests in flight finish (hanging ones answer at once) and
    /// waits for open connections to close, at most a few seconds.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
        tracing::info!(addr = %self.addr, "test gateway stopped");
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        // The server task notices and drains on its own.
        let _ = self.stop.send(true);
    }
}

/// What the handlers share.
struct Shared {
    secret_key: String,
    hang: Duration,
    idempotency_key_ttl: Duration,
    /// Changes (or closes) when the gateway stops; hanging requests watch it.
    stop: watch::Receiver<bool>,
    state: Mutex<State>,
}

impl Shared {
    /// The state; never held across an `.await`. A handler that panicked left a whole
    /// value behind (every update is a single map operation), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the hang duration, or less if the gateway stops.
    async fn hang(&self) {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(self.hang) => {}
            _ = stop.wait_for(|stopped| *stopped) => {}
        }
    }
}

#[derive(Default)]
struct State {
    payment_methods: HashMap<String, StoredCard>,
    payment_intents: HashMap<String, Value>,
    /// PaymentIntent ids in the order they were created.
    intent_order: Vec<String>,
    /// Refunds, oldest first.
    refunds: Vec<Value>,
    /// The amount refunded so far, by PaymentIntent id.
    refunded: HashMap<String, i64>,
    idempotency: HashMap<(String, String), KeyEntry>,
    posts: BTreeMap<String, u64>,
    executed: BTreeMap<String, u64>,
    replays: u64,
    keys_seen: HashSet<(String, String)>,
    log: Vec<RecordedRequest>,
}

/// A card PaymentMethod: the card data the PaymentIntent needs, and the public view.
struct StoredCard {
    pan: Pan,
    /// Kept as Stripe keeps it for the first charge; only its presence is ever shown
    /// (`checks.cvc_check`), and tests may ask whether it equals a given one.
    cvc: Option<Cvc>,
    /// The JSON returned for it: brand, last four digits, expiry.
    view: Value,
}

impl State {
    /// Stores a new or changed PaymentIntent.
    fn store_intent(&mut self, id: &str, object: Value) {
        if self.payment_intents.insert(id.to_owned(), object).is_none() {
            self.intent_order.push(id.to_owned());
        }
    }

    /// The PaymentIntents, oldest first.
    fn intents_in_order(&self) -> impl DoubleEndedIterator<Item = &Value> {
        self.intent_order
            .iter()
            .filter_map(|id| self.payment_intents.get(id))
    }

    /// The state of idempotency key `slot`, forgetting it first when its first use is
    /// `ttl` or more ago and its request has finished.
    fn idempotent(&mut self, slot: &(String, String), ttl: Duration) -> Option<&Idempotent> {
        let expired = self.idempotency.get(slot).is_some_and(|entry| {
            matches!(entry.state, Idempotent::Done(..)) && entry.first_used.elapsed() >= ttl
        });
        if expired {
            self.idempotency.remove(slot);
            tracing::info!(path = %slot.0, "test gateway: idempotency key forgotten");
        }
        self.idempotency.get(slot).map(|entry| &entry.state)
    }
}

/// An idempotency key: when it was first used, and what became of that request.
struct KeyEntry {
    first_used: Instant,
    state: Idempotent,
}

/// An idempotency key's state, with the fingerprint of the parameters it was first used
/// with.
enum Idempotent {
    InProgress([u8; 32]),
    Done([u8; 32], ApiResponse),
}

fn router(shared: Arc<Shared>) -> Router {
    use handlers as h;
    Router::new()
        .route(paths::PAYMENT_METHODS, post(h::create_payment_method))
        .route("/v1/payment_methods/{id}", get(h::get_payment_method))
        .route(paths::PAYMENT_INTENTS, post(h::create_payment_intent))
        .route(
            paths::PAYMENT_INTENTS_SEARCH,
            get(h::search_payment_intents),
        )
        .route("/v1/payment_intents/{id}", get(h::get_payment_intent))
        .route(
            "/v1/payment_intents/{id}/capture",
            post(h::capture_payment_intent),
        )
        .route(
            "/v1/payment_intents/{id}/cancel",
            post(h::cancel_payment_intent),
        )
        .route(paths::REFUNDS, post(h::create_refund))
        .route("/v1/refunds/{id}", get(h::get_refund))
        .route(paths::TEST_REDIRECT, post(h::redirect))
        .route(paths::TEST_HUGE, post(h::huge))
        .route(paths::TEST_SLOW, post(h::slow))
        .route(paths::GENERIC_CHARGES, post(h::generic_charge))
        .fallback(h::not_found)
        .method_not_allowed_fallback(h::not_found)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            h::record,
        ))
        .with_state(shared)
}

async fn serve(
    listener: TcpListener,
    acceptor: Option<ReloadingAcceptor>,
    app: Router,
    mut stopped: watch::Receiver<bool>,
) {
    let shutdown = async move {
        let _ = stopped.wait_for(|stopped| *stopped).await;
    };
    let result = match acceptor {
        Some(acceptor) => {
            axum::serve(
                tls::TlsListener::new(listener, acceptor, HANDSHAKE_TIMEOUT),
                app,
            )
            .with_graceful_shutdown(shutdown)
            .await
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    if let Err(err) = result {
        tracing::error!(error = %err, "test gateway failed");
    }
}
