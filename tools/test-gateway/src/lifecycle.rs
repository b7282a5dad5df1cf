//! What happens to a PaymentIntent after it is confirmed: capture of a manual one, cancel,
//! and refunds. Each checks and changes the stored intent under one lock, so two requests
//! with different idempotency keys cannot both capture, cancel or over-refund it.

use serde_json::{Value, json};

use super::{
    Shared, State,
    form::Form,
    handlers::{check_params, metadata, new_id, not_such},
    stripe::{self, ApiResponse, StripeError},
};

/// Statuses a PaymentIntent may be canceled from.
const CANCELABLE: &[&str] = &[
    "requires_payment_method",
    "requires_capture",
    "requires_confirmation",
    "requires_action",
];

/// Reasons Stripe takes for a cancellation.
const CANCELLATION_REASONS: &[&str] = &[
    "duplicate",
    "fraudulent",
    "requested_by_customer",
    "abandoned",
];

/// Reasons Stripe takes for a refund.
const REFUND_REASONS: &[&str] = &["duplicate", "fraudulent", "requested_by_customer"];

/// `POST /v1/payment_intents/{id}/capture`: `requires_capture` → `succeeded`, capturing
/// `amount_to_capture` (at most `amount_capturable`, all of it by default); the rest is
/// released, as Stripe does without `final_capture=false`.
pub(super) fn capture(gw: &Shared, id: &str, form: &Form) -> ApiResponse {
    if let Err(refused) = check_params(
        form,
        &[
            "amount_to_capture",
            "statement_descriptor",
            "statement_descriptor_suffix",
        ],
        &[("metadata", None)],
        &["expand"],
    ) {
        return refused;
    }
    let mut state = gw.lock();
    let Some(intent) = state.payment_intents.get(id) else {
        return not_such("payment_intent", id, "intent");
    };
    if intent["status"] != "requires_capture" {
        return unexpected_state(
            intent,
            "could not be captured",
            "may be captured",
            &["requires_capture"],
        );
    }
    let capturable = intent["amount_capturable"].as_i64().unwrap_or(0);
    let amount = match form.get("amount_to_capture") {
        None => capturable,
        Some(text) => match text.parse::<i64>() {
            Ok(amount) if (1..=capturable).contains(&amount) => amount,
            Ok(amount) if amount > capturable => {
                return ApiResponse::invalid(
                    StripeError::invalid_request(format!(
                        "The amount to capture ({amount}) is greater than the amount \
                         capturable ({capturable})."
                    ))
                    .code("amount_too_large")
                    .param("amount_to_capture"),
                );
            }
            _ => {
                return ApiResponse::invalid(
                    StripeError::invalid_request(
                        "Invalid amount_to_capture: must be a positive integer.",
                    )
                    .code("parameter_invalid_integer")
                    .param("amount_to_capture"),
                );
            }
        },
    };
    let mut intent = intent.clone();
    intent["status"] = "succeeded".into();
    intent["amount_received"] = amount.into();
    intent["amount_capturable"] = 0.into();
    merge_metadata(&mut intent, form);
    store(&mut state, id, intent, "captured")
}

/// `POST /v1/payment_intents/{id}/cancel`: → `canceled`, from the statuses Stripe allows.
pub(super) fn cancel(gw: &Shared, id: &str, form: &Form) -> ApiResponse {
    if let Err(refused) = check_params(form, &["cancellation_reason"], &[], &["expand"]) {
        return refused;
    }
    let reason = form.get("cancellation_reason");
    if let Some(reason) = reason
        && !CANCELLATION_REASONS.contains(&reason)
    {
        return invalid_enum("cancellation_reason", CANCELLATION_REASONS);
    }
    let mut state = gw.lock();
    let Some(intent) = state.payment_intents.get(id) else {
        return not_such("payment_intent", id, "intent");
    };
    let status = intent["status"].as_str().unwrap_or_default();
    if !CANCELABLE.contains(&status) {
        return unexpected_state(intent, "cannot be canceled", "may be canceled", CANCELABLE);
    }
    let mut intent = intent.clone();
    intent["status"] = "canceled".into();
    intent["canceled_at"] = stripe::now().into();
    intent["cancellation_reason"] = reason.map_or(Value::Null, Value::from);
    intent["amount_capturable"] = 0.into();
    intent["next_action"] = Value::Null;
    store(&mut state, id, intent, "canceled")
}

/// `POST /v1/refunds`: refunds `amount` (all that remains by default) of a succeeded
/// PaymentIntent, named by `payment_intent` or by its `charge`.
pub(super) fn refund(gw: &Shared, form: &Form) -> ApiResponse {
    if let Err(refused) = check_params(
        form,
        &[
            "payment_intent",
            "charge",
            "amount",
            "reason",
            "instructions_email",
            "refund_application_fee",
            "reverse_transfer",
        ],
        &[("metadata", None)],
        &["expand"],
    ) {
        return refused;
    }
    let reason = form.get("reason");
    if let Some(reason) = reason
        && !REFUND_REASONS.contains(&reason)
    {
        return invalid_enum("reason", REFUND_REASONS);
    }
    let mut state = gw.lock();
    let (intent, param) = match (form.get("payment_intent"), form.get("charge")) {
        (Some(pi), _) if !pi.is_empty() => (state.payment_intents.get(pi), ("payment_intent", pi)),
        (_, Some(ch)) if !ch.is_empty() => (
            state
                .payment_intents
                .values()
                .find(|intent| intent["latest_charge"] == ch),
            ("charge", ch),
        ),
        _ => {
            return ApiResponse::invalid(
                StripeError::invalid_request("One of `charge` or `payment_intent` is required.")
                    .code("parameter_missing")
                    .param("payment_intent"),
            );
        }
    };
    let Some(intent) = intent else {
        return ApiResponse::invalid(
            StripeError::invalid_request(format!("No such {}: '{}'", param.0, param.1))
                .code("resource_missing")
                .param(param.0),
        );
    };
    let pi = intent["id"].as_str().unwrap_or_default().to_owned();
    let charge = intent["latest_charge"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if intent["status"] != "succeeded" {
        return ApiResponse::invalid(
            StripeError::invalid_request(format!(
                "This PaymentIntent ({pi}) does not have a successful charge to refund."
            ))
            .code("payment_intent_unexpected_state")
            .param(param.0),
        );
    }
    let received = intent["amount_received"].as_i64().unwrap_or(0);
    let currency = intent["currency"].clone();
    let refunded = state.refunded.get(&pi).copied().unwrap_or(0);
    let remaining = received - refunded;
    if remaining <= 0 {
        return ApiResponse::invalid(
            StripeError::invalid_request(format!("Charge {charge} has already been refunded."))
                .code("charge_already_refunded")
                .param(param.0),
        );
    }
    let amount = match form.get("amount") {
        None => remaining,
        Some(text) => match text.parse::<i64>() {
            Ok(amount) if (1..=remaining).contains(&amount) => amount,
            Ok(amount) if amount > remaining => {
                return ApiResponse::invalid(
                    StripeError::invalid_request(format!(
                        "Refund amount ({amount}) is greater than unrefunded amount on charge \
                         ({remaining})"
                    ))
                    .code("amount_too_large")
                    .param("amount"),
                );
            }
            _ => {
                return ApiResponse::invalid(
                    StripeError::invalid_request("Invalid amount: must be a positive integer.")
                        .code("parameter_invalid_integer")
                        .param("amount"),
                );
            }
        },
    };
    let id = match new_id("re_") {
        Ok(id) => id,
        Err(response) => return response,
    };
    let refund = json!({
        "id": id,
        "object": "refund",
        "amount": amount,
        "charge": charge,
        "created": stripe::now(),
        "currency": currency,
        "metadata": metadata(form),
        "payment_intent": pi,
        "reason": reason,
        "status": "succeeded",
    });
    state.refunded.insert(pi.clone(), refunded + amount);
    state.refunds.push(refund.clone());
    tracing::info!(refund = %id, payment_intent = %pi, amount, "test gateway: refunded");
    ApiResponse::ok(refund)
}

/// Adds `metadata[…]` of `form` to the object's metadata; an empty value removes a key.
fn merge_metadata(object: &mut Value, form: &Form) {
    let children = form.children("metadata");
    if let Some(map) = object["metadata"].as_object_mut() {
        for (key, value) in children {
            if value.is_empty() {
                map.remove(key);
            } else {
                map.insert(key.to_owned(), value.into());
            }
        }
    }
}

fn store(state: &mut State, id: &str, intent: Value, what: &str) -> ApiResponse {
    let status = intent["status"].as_str().unwrap_or_default().to_owned();
    state.store_intent(id, intent.clone());
    tracing::info!(payment_intent = %id, %status, "test gateway: payment intent {what}");
    ApiResponse::ok(intent)
}

/// 400 `payment_intent_unexpected_state`, carrying the intent as Stripe does.
fn unexpected_state(intent: &Value, failed: &str, may: &str, allowed: &[&str]) -> ApiResponse {
    let status = intent["status"].as_str().unwrap_or_default();
    ApiResponse::invalid(
        StripeError::invalid_request(format!(
            "This PaymentIntent {failed} because it has a status of {status}. Only a \
             PaymentIntent with one of the following statuses {may}: {}.",
            allowed.join(", ")
        ))
        .code("payment_intent_unexpected_state")
        .with("payment_intent", intent.clone()),
    )
}

fn invalid_enum(param: &'static str, allowed: &[&str]) -> ApiResponse {
    ApiResponse::invalid(
        StripeError::invalid_request(format!(
            "Invalid {param}: must be one of {}",
            allowed.join(", ")
        ))
        .param(param),
    )
}
