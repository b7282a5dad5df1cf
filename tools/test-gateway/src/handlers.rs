//! The endpoints, authentication, idempotency and the request log.

use std::{sync::Arc, time::Instant};

use axum::{
    body::{Body, Bytes},
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use ring::digest;
use serde_json::{Map, Value, json};

use super::{
    Idempotent, KeyEntry, RecordedRequest, Shared, StoredCard, cards,
    form::{Form, segments},
    lifecycle, paths,
    search::Query,
    stripe::{self, ApiResponse, ApiVersion, StripeError},
};
use cardvault::card::{Cvc, Pan};

/// Stripe's limit on `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Largest `amount` Stripe takes (in minor units of most currencies).
const MAX_AMOUNT: i64 = 99_999_999;

/// Chunk size of the streamed `/test/huge` body.
const HUGE_CHUNK: usize = 64 * 1024;

/// Which endpoint a POST runs.
#[derive(Debug, Clone)]
enum Endpoint {
    PaymentMethod,
    PaymentIntent,
    /// Captures the PaymentIntent with this id.
    Capture(String),
    /// Cancels the PaymentIntent with this id.
    Cancel(String),
    Refund,
}

impl Endpoint {
    /// The request path: the idempotency scope and the key of the counters.
    fn path(&self) -> String {
        match self {
            Endpoint::PaymentMethod => paths::PAYMENT_METHODS.to_owned(),
            Endpoint::PaymentIntent => paths::PAYMENT_INTENTS.to_owned(),
            Endpoint::Capture(id) => format!("{}/{id}/capture", paths::PAYMENT_INTENTS),
            Endpoint::Cancel(id) => format!("{}/{id}/cancel", paths::PAYMENT_INTENTS),
            Endpoint::Refund => paths::REFUNDS.to_owned(),
        }
    }
}

/// Middleware: logs every request (method, path, idempotency key, Stripe-Version; never the
/// body) and counts POSTs, before the handler runs.
pub(super) async fn record(
    State(gw): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    log_request(&gw, &request);
    next.run(request).await
}

fn log_request(gw: &Shared, request: &Request) {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let idempotency_key = header("idempotency-key");
    let stripe_version = header("stripe-version");
    let path = request.uri().path().to_owned();
    let mut state = gw.lock();
    if request.method() == Method::POST {
        *state.posts.entry(path.clone()).or_default() += 1;
        if let Some(key) = &idempotency_key {
            state.keys_seen.insert((path.clone(), key.clone()));
        }
    }
    state.log.push(RecordedRequest {
        method: request.method().to_string(),
        path,
        idempotency_key,
        stripe_version,
    });
}

/// `POST /v1/payment_methods`.
pub(super) async fn create_payment_method(
    State(gw): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle_post(gw, Endpoint::PaymentMethod, &headers, &body).await
}

/// `POST /v1/payment_intents`.
pub(super) async fn create_payment_intent(
    State(gw): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle_post(gw, Endpoint::PaymentIntent, &headers, &body).await
}

/// `POST /v1/payment_intents/{id}/capture`.
pub(super) async fn capture_payment_intent(
    State(gw): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle_post(gw, Endpoint::Capture(id), &headers, &body).await
}

/// `POST /v1/payment_intents/{id}/cancel`.
pub(super) async fn cancel_payment_intent(
    State(gw): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle_post(gw, Endpoint::Cancel(id), &headers, &body).await
}

/// `POST /v1/refunds`.
pub(super) async fn create_refund(
    State(gw): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle_post(gw, Endpoint::Refund, &headers, &body).await
}

/// `GET /v1/refunds/{id}`.
pub(super) async fn get_refund(
    State(gw): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = stripe_api(&gw, &headers) {
        return refused;
    }
    let found = gw
        .lock()
        .refunds
        .iter()
        .find(|r| r["id"] == id.as_str())
        .cloned();
    let response = match found {
        Some(refund) => ApiResponse::ok(refund),
        None => not_such("refund", &id, "id"),
    };
    respond(&response, false, None)
}

/// `GET /v1/payment_intents/{id}`.
pub(super) async fn get_payment_intent(
    State(gw): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = stripe_api(&gw, &headers) {
        return refused;
    }
    let found = gw.lock().payment_intents.get(&id).cloned();
    let response = match found {
        Some(intent) => ApiResponse::ok(intent),
        None => not_such("payment_intent", &id, "intent"),
    };
    respond(&response, false, None)
}

/// Stripe's default and largest page of search results.
const SEARCH_LIMIT: (usize, usize) = (10, 100);

/// `GET /v1/payment_intents/search?query=…[&limit=…][&page=…]`: Stripe's search result
/// object, newest first. `page` is the `next_page` of an earlier answer.
pub(super) async fn search_payment_intents(
    State(gw): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = stripe_api(&gw, &headers) {
        return refused;
    }
    let response = search(&gw, uri.query().unwrap_or("")).unwrap_or_else(|refused| refused);
    respond(&response, false, None)
}

fn search(gw: &Shared, query: &str) -> Result<ApiResponse, ApiResponse> {
    let form = Form::parse(query.as_bytes())
        .map_err(|err| ApiResponse::invalid(StripeError::invalid_request(err.to_string())))?;
    check_params(&form, &["query", "limit", "page"], &[], &["expand"])?;
    let text = match form.get("query") {
        None | Some("") => return Err(ApiResponse::missing("query")),
        Some(text) => text,
    };
    let parsed = Query::parse(text).map_err(|err| {
        ApiResponse::invalid(StripeError::invalid_request(err.to_string()).param("query"))
    })?;
    let limit = match form.get("limit") {
        None => SEARCH_LIMIT.0,
        Some(limit) => match limit.parse::<usize>() {
            Ok(limit) if (1..=SEARCH_LIMIT.1).contains(&limit) => limit,
            _ => {
                return Err(ApiResponse::invalid(
                    StripeError::invalid_request(format!(
                        "Invalid limit: must be an integer between 1 and {}.",
                        SEARCH_LIMIT.1
                    ))
                    .param("limit"),
                ));
            }
        },
    };
    let skip = match form.get("page") {
        None => 0,
        Some(page) => page
            .strip_prefix("page_")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                ApiResponse::invalid(
                    StripeError::invalid_request(
                        "Invalid page: use an earlier answer's next_page.",
                    )
                    .param("page"),
                )
            })?,
    };
    let hits: Vec<Value> = gw
        .lock()
        .intents_in_order()
        .rev()
        .filter(|intent| parsed.matches(intent))
        .skip(skip)
        .take(limit + 1)
        .cloned()
        .collect();
    let has_more = hits.len() > limit;
    let data: Vec<Value> = hits.into_iter().take(limit).collect();
    let next_page = if has_more {
        Value::from(format!("page_{}", skip + limit))
    } else {
        Value::Null
    };
    Ok(ApiResponse::ok(json!({
        "object": "search_result",
        "url": paths::PAYMENT_INTENTS_SEARCH,
        "has_more": has_more,
        "next_page": next_page,
        "data": data,
    })))
}

/// `GET /v1/payment_methods/{id}`.
pub(super) async fn get_payment_method(
    State(gw): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = stripe_api(&gw, &headers) {
        return refused;
    }
    let found = gw.lock().payment_methods.get(&id).map(|pm| pm.view.clone());
    let response = match found {
        Some(view) => ApiResponse::ok(view),
        None => not_such("PaymentMethod", &id, "payment_method"),
    };
    respond(&response, false, None)
}

/// `POST /test/redirect`: a 302 the vault must not follow.
pub(super) async fn redirect() -> Response {
    (
        StatusCode::FOUND,
        [(header::LOCATION, paths::PAYMENT_INTENTS)],
    )
        .into_response()
}

/// `POST /test/huge`: a 200 whose JSON body is [`super::HUGE_BODY_BYTES`] long, with a
/// `Content-Length`, or streamed without one with `?chunked=true`.
pub(super) async fn huge(uri: Uri) -> Response {
    let head = br#"{"id":"pi_huge","object":"payment_intent","status":"succeeded","padding":""#;
    let tail = br#""}"#;
    let mut body = Vec::with_capacity(super::HUGE_BODY_BYTES);
    body.extend_from_slice(head);
    body.resize(super::HUGE_BODY_BYTES - tail.len(), b'x');
    body.extend_from_slice(tail);
    let chunked = uri
        .query()
        .is_some_and(|q| q.split('&').any(|pair| pair == "chunked=true"));
    let body = if chunked {
        let chunks: Vec<Result<Bytes, std::convert::Infallible>> = body
            .chunks(HUGE_CHUNK)
            .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
            .collect();
        Body::from_stream(tokio_stream::iter(chunks))
    } else {
        Body::from(body)
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `POST /test/slow`: answers after the hang duration.
pub(super) async fn slow(State(gw): State<Arc<Shared>>) -> Response {
    gw.hang().await;
    let response = match new_id("pi_") {
        Ok(id) => ApiResponse::ok(json!({
            "id": id,
            "object": "payment_intent",
            "status": "succeeded",
        })),
        Err(response) => response,
    };
    respond(&response, false, None)
}

/// Anything else: Stripe's 404.
pub(super) async fn not_found(method: Method, uri: Uri) -> Response {
    let response = ApiResponse::error(
        StatusCode::NOT_FOUND,
        StripeError::invalid_request(format!(
            "Unrecognized request URL ({method}: {}).",
            uri.path()
        )),
    );
    respond(&response, false, None)
}

/// Authentication, parsing, idempotency, then the endpoint.
async fn handle_post(
    gw: Arc<Shared>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let version = match stripe_api(&gw, headers) {
        Ok(version) => version,
        Err(refused) => return refused,
    };
    let form = match Form::parse(body) {
        Ok(form) => form,
        Err(err) => {
            return respond(
                &ApiResponse::invalid(StripeError::invalid_request(err.to_string())),
                false,
                None,
            );
        }
    };
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(key)) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_LEN => {
            Some(key.to_owned())
        }
        Some(_) => {
            let response = ApiResponse::invalid(
                StripeError::invalid_request(format!(
                    "Invalid Idempotency-Key: must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible \
                     ASCII characters."
                ))
                .code("idempotency_key_invalid"),
            );
            return respond(&response, false, None);
        }
    };
    let Some(key) = key else {
        let response = run(gw, endpoint, form, version, None).await;
        return respond(&response, false, None);
    };

    let path = endpoint.path();
    let fingerprint = form.fingerprint();
    let conflict = {
        let mut state = gw.lock();
        let slot = (path.clone(), key.clone());
        match state.idempotent(&slot, gw.idempotency_key_ttl) {
            None => {
                state.idempotency.insert(
                    slot,
                    KeyEntry {
                        first_used: Instant::now(),
                        state: Idempotent::InProgress(fingerprint),
                    },
                );
                None
            }
            Some(Idempotent::Done(first, saved)) if *first == fingerprint => {
                let saved = saved.clone();
                state.replays += 1;
                drop(state);
                tracing::info!(
                    %path,
                    status = saved.status.as_u16(),
                    "test gateway: replayed"
                );
                return respond(&saved, true, Some(&key));
            }
            Some(Idempotent::Done(first, _) | Idempotent::InProgress(first))
                if *first != fingerprint =>
            {
                Some(ApiResponse::invalid(StripeError::idempotency(format!(
                    "Keys for idempotent requests can only be used with the same parameters \
                     they were first used with. Try using a key other than '{key}' if you \
                     meant to execute a different request."
                ))))
            }
            // Stripe words this one as an ordinary invalid request with its own code, not
            // as an `idempotency_error`: a client must read the status, not the type.
            Some(_) => Some(ApiResponse::error(
                StatusCode::CONFLICT,
                StripeError::invalid_request(format!(
                    "There is currently another in-progress request using this Idempotent \
                     Key (that probably means you submitted twice, and the other request is \
                     still going through): {key}. Please try again later."
                ))
                .code("idempotency_key_in_use"),
            )),
        }
    };
    if let Some(response) = conflict {
        return respond(&response, false, Some(&key));
    }
    let in_flight = InFlight {
        gw: gw.clone(),
        slot: Some((path, key.clone())),
    };
    let response = run(gw, endpoint, form, version, Some(in_flight)).await;
    respond(&response, false, Some(&key))
}

/// Runs the endpoint in a task of its own, so that it finishes and settles its idempotency
/// key even if the client hangs up mid-way (as a server that has begun a charge does).
async fn run(
    gw: Arc<Shared>,
    endpoint: Endpoint,
    form: Form,
    version: ApiVersion,
    in_flight: Option<InFlight>,
) -> ApiResponse {
    *gw.lock().executed.entry(endpoint.path()).or_default() += 1;
    let task = tokio::spawn(async move {
        let response = match endpoint {
            Endpoint::PaymentMethod => create_pm(&gw, &form),
            Endpoint::PaymentIntent => create_pi(&gw, &form, version).await,
            Endpoint::Capture(id) => lifecycle::capture(&gw, &id, &form),
            Endpoint::Cancel(id) => lifecycle::cancel(&gw, &id, &form),
            Endpoint::Refund => lifecycle::refund(&gw, &form),
        };
        if let Some(in_flight) = in_flight {
            in_flight.settle(&response);
        }
        response
    });
    task.await.unwrap_or_else(|_| {
        ApiResponse::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            StripeError::api("An unknown error occurred."),
        )
    })
}

/// An idempotency key in progress. [`InFlight::settle`] saves the answer (or frees the key
/// when nothing is saved); dropped unsettled (the endpoint panicked), it frees the key.
struct InFlight {
    gw: Arc<Shared>,
    slot: Option<(String, String)>,
}

impl InFlight {
    fn settle(mut self, response: &ApiResponse) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let mut state = self.gw.lock();
        if response.is_saved() {
            if let Some(entry) = state.idempotency.get_mut(&slot)
                && let Idempotent::InProgress(fingerprint) = entry.state
            {
                entry.state = Idempotent::Done(fingerprint, response.clone());
            }
        } else {
            state.idempotency.remove(&slot);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.gw.lock().idempotency.remove(&slot);
        }
    }
}

/// What every Stripe endpoint checks first: the secret key, then the `Stripe-Version`.
#[allow(
    clippy::result_large_err,
    reason = "the error is the finished response, returned at once"
)]
fn stripe_api(gw: &Shared, headers: &HeaderMap) -> Result<ApiVersion, Response> {
    authorize(gw, headers)?;
    ApiVersion::of_header(headers.get("stripe-version").map(HeaderValue::as_bytes))
        .map_err(|refused| respond(&refused, false, None))
}

/// `Authorization: Bearer <secret key>`, or a 401 as Stripe words it.
#[allow(
    clippy::result_large_err,
    reason = "the error is the finished response, returned at once"
)]
fn authorize(gw: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let message = match given {
        // Digests, so the comparison's timing says nothing about the key.
        Some(key)
            if digest::digest(&digest::SHA256, key.as_bytes()).as_ref()
                == digest::digest(&digest::SHA256, gw.secret_key.as_bytes()).as_ref() =>
        {
            return Ok(());
        }
        Some(key) => format!("Invalid API Key provided: {}", stripe::mask_key(key)),
        None => "You did not provide an API key. You need to provide your API key in the \
                 Authorization header, using Bearer auth (e.g. 'Authorization: Bearer \
                 YOUR_SECRET_KEY')."
            .to_owned(),
    };
    let mut response = respond(
        &ApiResponse::error(
            StatusCode::UNAUTHORIZED,
            StripeError::invalid_request(message),
        ),
        false,
        None,
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"Stripe\""),
    );
    Err(response)
}

/// The HTTP response for an API answer: JSON, a `Request-Id`, the idempotency key echoed,
/// and `Idempotent-Replayed: true` on a replay.
fn respond(answer: &ApiResponse, replayed: bool, key: Option<&str>) -> Response {
    let body = serde_json::to_vec(&answer.body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = (
        answer.status,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    let headers = response.headers_mut();
    if let Ok(id) = cardvault::crypto::random_base62(14)
        && let Ok(value) = HeaderValue::from_str(&format!("req_{id}"))
    {
        headers.insert("request-id", value);
    }
    if let Some(key) = key
        && let Ok(value) = HeaderValue::from_str(key)
    {
        headers.insert("idempotency-key", value);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// `prefix` and 24 random base62 characters, as Stripe's ids look.
pub(super) fn new_id(prefix: &str) -> Result<String, ApiResponse> {
    random_part(24).map(|random| format!("{prefix}{random}"))
}

/// `len` random base62 characters, or the 500 Stripe would give if it had none.
fn random_part(len: usize) -> Result<String, ApiResponse> {
    cardvault::crypto::random_base62(len).map_err(|_| {
        ApiResponse::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            StripeError::api("An unknown error occurred."),
        )
    })
}

/// 404 `resource_missing`.
pub(super) fn not_such(kind: &str, id: &str, param: &str) -> ApiResponse {
    ApiResponse::error(
        StatusCode::NOT_FOUND,
        StripeError::invalid_request(format!("No such {kind}: '{id}'"))
            .code("resource_missing")
            .param(param),
    )
}

/// 400 `parameter_unknown` for the first parameter the endpoint does not take, as Stripe
/// refuses them. `scalars` take no brackets; `one_level` take exactly one (`metadata[k]`);
/// `nested` take any.
pub(super) fn check_params(
    form: &Form,
    scalars: &[&str],
    one_level: &[(&str, Option<&[&str]>)],
    nested: &[&str],
) -> Result<(), ApiResponse> {
    for key in form.keys() {
        let Some(segs) = segments(key) else {
            continue; // Refused while parsing.
        };
        let known = match segs.as_slice() {
            [name] => scalars.contains(name),
            [name, child] => one_level.iter().any(|(n, allowed)| {
                n == name && allowed.is_none_or(|allowed| allowed.contains(child))
            }),
            _ => false,
        } || nested.contains(&segs[0]);
        if !known {
            // An unknown name is reported bare (`payment_method_types`, not
            // `payment_method_types[0]`); an unknown child of a known one in full.
            let head_known = scalars.contains(&segs[0])
                || nested.contains(&segs[0])
                || one_level.iter().any(|(n, _)| *n == segs[0]);
            let param = if head_known { key } else { segs[0] };
            return Err(ApiResponse::invalid(
                StripeError::invalid_request(format!("Received unknown parameter: {param}"))
                    .code("parameter_unknown")
                    .param(param),
            ));
        }
    }
    Ok(())
}

/// Creates a card PaymentMethod.
fn create_pm(gw: &Shared, form: &Form) -> ApiResponse {
    if let Err(refused) = check_params(
        form,
        &["type"],
        &[
            ("card", Some(&["number", "exp_month", "exp_year", "cvc"])),
            ("metadata", None),
        ],
        &["billing_details", "expand"],
    ) {
        return refused;
    }
    match form.get("type") {
        None | Some("") => return ApiResponse::missing("type"),
        Some("card") => {}
        Some(_) => {
            return ApiResponse::invalid(
                StripeError::invalid_request("Invalid type: this gateway only knows `card`.")
                    .code("parameter_invalid_empty")
                    .param("type"),
            );
        }
    }
    let card_error = |code, message, param| {
        ApiResponse::error(
            StatusCode::PAYMENT_REQUIRED,
            StripeError::card(code, message).param(param),
        )
    };
    let Some(pan) = form
        .get("card[number]")
        .and_then(|number| Pan::parse(number).ok())
    else {
        return card_error(
            "incorrect_number",
            "Your card number is incorrect.",
            "number",
        );
    };
    let today = time::OffsetDateTime::now_utc().date();
    let month = match form.get("card[exp_month]") {
        None | Some("") => return ApiResponse::missing("card[exp_month]"),
        Some(month) => match month.parse::<u8>() {
            Ok(month @ 1..=12) => month,
            _ => {
                return card_error(
                    "invalid_expiry_month",
                    "Your card's expiration month is invalid.",
                    "exp_month",
                );
            }
        },
    };
    let year = match form.get("card[exp_year]") {
        None | Some("") => return ApiResponse::missing("card[exp_year]"),
        // Two digits mean 20xx, as Stripe reads them.
        Some(year) => match year.parse::<u16>() {
            Ok(year @ 0..=99) => 2000 + year,
            Ok(year) if (2000..=2100).contains(&year) => year,
            _ => 0,
        },
    };
    let this_year = u16::try_from(today.year()).unwrap_or(u16::MAX);
    if year < this_year {
        return card_error(
            "invalid_expiry_year",
            "Your card's expiration year is invalid.",
            "exp_year",
        );
    }
    if year == this_year && month < u8::from(today.month()) {
        return card_error(
            "invalid_expiry_month",
            "Your card's expiration month is invalid.",
            "exp_month",
        );
    }
    let cvc = match Cvc::parse(form.get("card[cvc]").unwrap_or("")) {
        Ok(cvc) => cvc,
        Err(_) => {
            return card_error(
                "invalid_cvc",
                "Your card's security code is invalid.",
                "cvc",
            );
        }
    };
    let id = match new_id("pm_") {
        Ok(id) => id,
        Err(response) => return response,
    };
    let view = json!({
        "id": id,
        "object": "payment_method",
        "type": "card",
        "card": {
            "brand": stripe::brand_name(pan.brand()),
            "last4": pan.last4(),
            "exp_month": month,
            "exp_year": year,
            "funding": "credit",
            "checks": { "cvc_check": if cvc.is_some() { Value::from("unchecked") } else { Value::Null } },
        },
        "billing_details": {},
        "created": stripe::now(),
        "customer": Value::Null,
        "livemode": false,
        "metadata": metadata(form),
    });
    gw.lock().payment_methods.insert(
        id.clone(),
        StoredCard {
            pan,
            cvc,
            view: view.clone(),
        },
    );
    tracing::info!(payment_method = %id, "test gateway: payment method created");
    ApiResponse::ok(view)
}

/// `metadata[k]=v` pairs as an object; an empty value unsets a key, as in Stripe.
pub(super) fn metadata(form: &Form) -> Value {
    let map: Map<String, Value> = form
        .children("metadata")
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_owned(), Value::from(v)))
        .collect();
    Value::Object(map)
}

/// Creates a PaymentIntent and, with `confirm=true`, confirms it with its card.
async fn create_pi(gw: &Shared, form: &Form, version: ApiVersion) -> ApiResponse {
    let intent = match new_intent(gw, form, version) {
        Ok(intent) => intent,
        Err(refused) => return refused,
    };
    let NewIntent {
        mut object,
        outcome,
        payment_method,
        manual,
        return_url,
    } = intent;
    let id = object["id"].as_str().unwrap_or_default().to_owned();
    let Some(outcome) = outcome else {
        return save_intent(gw, &id, object, None);
    };
    let charge = match new_id("ch_") {
        Ok(charge) => charge,
        Err(response) => return response,
    };
    match outcome {
        cards::Outcome::Hang => {
            object["status"] = "processing".into();
            gw.lock().store_intent(&id, object.clone());
            tracing::info!(payment_intent = %id, "test gateway: hanging");
            gw.hang().await;
            succeed(&mut object, &charge, manual);
        }
        cards::Outcome::Succeed => succeed(&mut object, &charge, manual),
        cards::Outcome::AnswerLost => {
            succeed(&mut object, &charge, manual);
            save_intent(gw, &id, object, None);
            tracing::info!(payment_intent = %id, "test gateway: answering 500 after a payment");
            return ApiResponse::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                StripeError::api("An unknown error occurred"),
            );
        }
        cards::Outcome::RequiresAction => {
            object["status"] = "requires_action".into();
            object["next_action"] = match next_action(&object, return_url.as_deref()) {
                Ok(action) => action,
                Err(response) => return response,
            };
        }
        cards::Outcome::Decline(decline) => {
            let error = StripeError::card(decline.code, decline.message)
                .decline_code(decline.decline_code)
                .with("charge", charge.clone().into());
            let error = match decline.param {
                Some(param) => error.param(param),
                None => error,
            };
            object["status"] = "requires_payment_method".into();
            object["latest_charge"] = charge.into();
            object["last_payment_error"] = error
                .clone()
                .with("payment_method", payment_method.clone())
                .into_json();
            let error = error
                .with("payment_method", payment_method)
                .with("payment_intent", object.clone());
            return save_intent(gw, &id, object, Some(error));
        }
    }
    save_intent(gw, &id, object, None)
}

/// A validated PaymentIntent request.
struct NewIntent {
    /// The PaymentIntent before confirmation (`requires_confirmation`).
    object: Value,
    /// What confirming does; `None` without `confirm=true`.
    outcome: Option<cards::Outcome>,
    /// The public view of its PaymentMethod.
    payment_method: Value,
    manual: bool,
    /// Where the shopper returns after authenticating; Stripe keeps it in `next_action`
    /// only.
    return_url: Option<String>,
}

fn new_intent(gw: &Shared, form: &Form, version: ApiVersion) -> Result<NewIntent, ApiResponse> {
    let types_param = version.payment_method_types();
    check_params(
        form,
        &[
            "amount",
            "currency",
            "payment_method",
            "confirm",
            "capture_method",
            "description",
            "customer",
            "return_url",
            "off_session",
            "receipt_email",
            "setup_future_usage",
            "statement_descriptor",
            "statement_descriptor_suffix",
            "confirmation_method",
            "error_on_requires_action",
            "use_stripe_sdk",
        ],
        &[("metadata", None)],
        &[
            types_param,
            "automatic_payment_methods",
            "payment_method_options",
            "expand",
            "shipping",
            "mandate_data",
        ],
    )?;
    let invalid = |param: &str, message: String| {
        ApiResponse::invalid(StripeError::invalid_request(message).param(param))
    };
    let amount = match form.get("amount") {
        None | Some("") => return Err(ApiResponse::missing("amount")),
        Some(amount) => match amount.parse::<i64>() {
            Ok(amount @ 1..=MAX_AMOUNT) => amount,
            Ok(amount) if amount < 1 => {
                return Err(ApiResponse::invalid(
                    StripeError::invalid_request("Amount must be at least 1.")
                        .code("amount_too_small")
                        .param("amount"),
                ));
            }
            Ok(_) => {
                return Err(ApiResponse::invalid(
                    StripeError::invalid_request(format!(
                        "Amount must be no more than {MAX_AMOUNT}."
                    ))
                    .code("amount_too_large")
                    .param("amount"),
                ));
            }
            Err(_) => {
                return Err(ApiResponse::invalid(
                    StripeError::invalid_request(format!("Invalid integer: {amount}"))
                        .code("parameter_invalid_integer")
                        .param("amount"),
                ));
            }
        },
    };
    let currency = match form.get("currency") {
        None | Some("") => return Err(ApiResponse::missing("currency")),
        Some(c) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
            c.to_ascii_lowercase()
        }
        Some(c) => return Err(invalid("currency", format!("Invalid currency: {c}."))),
    };
    let pm_id = match form.get("payment_method") {
        None | Some("") => return Err(ApiResponse::missing("payment_method")),
        Some(id) => id,
    };
    let manual = match form.get("capture_method").unwrap_or("automatic") {
        "automatic" | "automatic_async" => false,
        "manual" => true,
        other => {
            return Err(invalid(
                "capture_method",
                format!(
                    "Invalid capture_method: must be one of automatic, automatic_async, or \
                     manual (got {other})."
                ),
            ));
        }
    };
    let confirm = match form.get("confirm").unwrap_or("false") {
        "true" => true,
        "false" => false,
        other => return Err(invalid("confirm", format!("Invalid boolean: {other}"))),
    };
    let (outcome, payment_method) = {
        let state = gw.lock();
        let Some(card) = state.payment_methods.get(pm_id) else {
            return Err(ApiResponse::invalid(
                StripeError::invalid_request(format!("No such PaymentMethod: '{pm_id}'"))
                    .code("resource_missing")
                    .param("payment_method"),
            ));
        };
        let outcome = confirm.then(|| cards::outcome(card.pan.expose_digits()));
        (outcome, card.view.clone())
    };
    let id = new_id("pi_")?;
    let client_secret = format!("{id}_secret_{}", random_part(24)?);
    let object = json!({
        "id": id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_received": 0,
        "canceled_at": Value::Null,
        "cancellation_reason": Value::Null,
        "capture_method": form.get("capture_method").unwrap_or("automatic"),
        "client_secret": client_secret,
        "confirmation_method": "automatic",
        "created": stripe::now(),
        "currency": currency,
        "description": form.get("description"),
        "last_payment_error": Value::Null,
        "latest_charge": Value::Null,
        "livemode": false,
        "metadata": metadata(form),
        "next_action": Value::Null,
        "payment_method": pm_id,
        types_param: payment_method_types(form, types_param),
        "status": "requires_confirmation",
    });
    Ok(NewIntent {
        object,
        outcome,
        payment_method,
        manual,
        return_url: form
            .get("return_url")
            .filter(|url| !url.is_empty())
            .map(str::to_owned),
    })
}

/// What the shop's front end needs to finish 3-D Secure, as Stripe hands it to a secret-key
/// caller: `redirect_to_url` when the intent was confirmed with a `return_url`, else
/// `use_stripe_sdk` for Stripe.js (which then uses the intent's `client_secret`). Never card
/// data.
fn next_action(intent: &Value, return_url: Option<&str>) -> Result<Value, ApiResponse> {
    let source = format!("src_{}", random_part(24)?);
    let secret = format!("src_client_secret_{}", random_part(24)?);
    let authenticate =
        format!("https://hooks.stripe.com/redirect/authenticate/{source}?client_secret={secret}");
    Ok(match return_url {
        Some(return_url) => json!({
            "type": "redirect_to_url",
            "redirect_to_url": { "url": authenticate, "return_url": return_url },
        }),
        None => json!({
            "type": "use_stripe_sdk",
            "use_stripe_sdk": {
                "type": "three_d_secure_redirect",
                "stripe_js": authenticate,
                "source": source,
                "payment_intent": intent["id"].clone(),
            },
        }),
    })
}

/// The values of the list parameter `name` (`name[]=card`, `name[0]=card`), or `["card"]`
/// when it is not given.
fn payment_method_types(form: &Form, name: &str) -> Value {
    let given: Vec<Value> = form.list(name).into_iter().map(Value::from).collect();
    if given.is_empty() {
        json!(["card"])
    } else {
        Value::Array(given)
    }
}

/// Marks a PaymentIntent paid: `succeeded`, or `requires_capture` when captured manually.
fn succeed(object: &mut Value, charge: &str, manual: bool) {
    let amount = object["amount"].clone();
    object["latest_charge"] = charge.into();
    if manual {
        object["status"] = "requires_capture".into();
        object["amount_capturable"] = amount;
    } else {
        object["status"] = "succeeded".into();
        object["amount_received"] = amount;
    }
}

/// Stores the PaymentIntent and answers with it (200) or with the card error (402).
fn save_intent(gw: &Shared, id: &str, object: Value, error: Option<StripeError>) -> ApiResponse {
    let status = object["status"].as_str().unwrap_or_default().to_owned();
    gw.lock().store_intent(id, object.clone());
    match error {
        None => {
            tracing::info!(payment_intent = %id, %status, "test gateway: payment intent");
            ApiResponse::ok(object)
        }
        Some(error) => {
            tracing::info!(payment_intent = %id, %status, "test gateway: payment intent declined");
            ApiResponse::error(StatusCode::PAYMENT_REQUIRED, error)
        }
    }
}

/// `POST /generic/charges`: a charge API of another shape than Stripe's — one JSON request
/// with the raw card, one JSON answer with a status word — for the `generic` connector:
/// `{"amount": 1000, "currency": "EUR", "card": {"number": "…", "exp_month": 12,
/// "exp_year": 2030, "cvc": "123"}}` → `{"id": "gc_…", "status": "approved"}`, or
/// `"declined"` with `reason_code` and `reason`, or `"challenge"` (3-D Secure) with
/// `challenge.url` and `challenge.token` for the shop's front end. The same test
/// cards behave as on the Stripe API. An `Idempotency-Key` header replays the first answer
/// for the same key.
pub(super) async fn generic_charge(
    State(gw): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refused) = authorize(&gw, &headers) {
        return refused;
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let fingerprint: [u8; 32] = digest::digest(&digest::SHA256, &body)
        .as_ref()
        .try_into()
        .unwrap_or([0; 32]);
    let slot = key
        .as_ref()
        .map(|key| (paths::GENERIC_CHARGES.to_owned(), key.clone()));
    if let Some(slot) = &slot {
        let mut state = gw.lock();
        if let Some(Idempotent::Done(first, saved)) = state.idempotent(slot, gw.idempotency_key_ttl)
            && *first == fingerprint
        {
            let saved = saved.clone();
            state.replays += 1;
            return respond(&saved, true, key.as_deref());
        }
    }
    let response = generic_outcome(&gw, &body).await;
    if let Some(slot) = slot {
        gw.lock().idempotency.insert(
            slot,
            KeyEntry {
                first_used: Instant::now(),
                state: Idempotent::Done(fingerprint, response.clone()),
            },
        );
    }
    respond(&response, false, key.as_deref())
}

async fn generic_outcome(gw: &Shared, body: &[u8]) -> ApiResponse {
    let bad = |message: &str| ApiResponse::invalid(StripeError::invalid_request(message));
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return bad("the body must be a JSON object");
    };
    let number = request
        .pointer("/card/number")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Ok(pan) = Pan::parse(number) else {
        return bad("card.number must be a valid card number");
    };
    if request.pointer("/amount").and_then(Value::as_u64).is_none() {
        return bad("amount must be a positive integer");
    }
    *gw.lock()
        .executed
        .entry(paths::GENERIC_CHARGES.to_owned())
        .or_default() += 1;
    let Ok(id) = new_id("gc_") else {
        return ApiResponse::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            StripeError::api("An unknown error occurred."),
        );
    };
    match cards::outcome(pan.expose_digits()) {
        cards::Outcome::Succeed => ApiResponse::ok(json!({ "id": id, "status": "approved" })),
        cards::Outcome::AnswerLost => ApiResponse::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            StripeError::api("An unknown error occurred"),
        ),
        cards::Outcome::Hang => {
            gw.hang().await;
            ApiResponse::ok(json!({ "id": id, "status": "approved" }))
        }
        cards::Outcome::RequiresAction => {
            let Ok(token) = random_part(24) else {
                return ApiResponse::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    StripeError::api("An unknown error occurred."),
                );
            };
            ApiResponse::ok(json!({
                "id": id,
                "status": "challenge",
                "challenge": {
                    "url": format!("https://acs.test-gateway.invalid/challenge/{id}"),
                    "token": token,
                },
            }))
        }
        cards::Outcome::Decline(decline) => ApiResponse::ok(json!({
            "id": id,
            "status": "declined",
            "reason_code": decline.decline_code,
            "reason": decline.message,
        })),
    }
}
