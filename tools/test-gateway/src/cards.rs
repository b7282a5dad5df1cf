//! The test cards: what confirming a PaymentIntent does for each card number, after Stripe's
//! documented test cards (<https://docs.stripe.com/testing>), plus this gateway's own cards
//! for client timeouts ([`HANG`]) and lost answers ([`ANSWER_LOST`]).
//!
//! Every number here passes the Luhn check, so the vault accepts it at tokenize time.

/// Succeeds (`succeeded`, or `requires_capture` with `capture_method=manual`).
pub const SUCCESS: &str = "4242424242424242";
/// Declined: `card_declined`, decline code `generic_decline`.
pub const DECLINED: &str = "4000000000000002";
/// Declined: `card_declined`, decline code `insufficient_funds`.
pub const INSUFFICIENT_FUNDS: &str = "4000000000009995";
/// Declined: `expired_card`.
pub const EXPIRED: &str = "4000000000000069";
/// Declined: `incorrect_cvc`.
pub const INCORRECT_CVC: &str = "4000000000000127";
/// Fails: `processing_error`.
pub const PROCESSING_ERROR: &str = "4000000000000119";
/// Needs 3-D Secure: 200 with status `requires_action`.
pub const REQUIRES_ACTION: &str = "4000002500003155";
/// Not a Stripe test card: this gateway's own. Confirming waits for the gateway's `hang`
/// duration, then succeeds as [`SUCCESS`] does. (`4000000000001111` was suggested for
/// this, but it fails the Luhn check, so neither Stripe nor the vault would accept it;
/// this is the same number with its check digit fixed.)
pub const HANG: &str = "4000000000001117";
/// Not a Stripe test card: this gateway's own. The payment goes through as with [`SUCCESS`]
/// (the PaymentIntent is stored `succeeded`, or `requires_capture`), but the answer is a
/// 500 `api_error`: the charge went through and the answer was lost. Stripe saves a 500
/// once the endpoint has begun, so a repeat with the same idempotency key gets the same
/// 500; only retrieving or searching the PaymentIntent tells what happened.
pub const ANSWER_LOST: &str = "4000000000001125";

/// What confirming a PaymentIntent paid with a card does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The payment goes through.
    Succeed,
    /// A `card_error` (HTTP 402), the PaymentIntent back to `requires_payment_method`.
    Decline(Decline),
    /// 200 with status `requires_action` (3-D Secure).
    RequiresAction,
    /// Waits for the hang duration, then succeeds.
    Hang,
    /// Succeeds, but answers 500 `api_error`.
    AnswerLost,
}

/// A Stripe `card_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decline {
    /// `error.code`.
    pub code: &'static str,
    /// `error.decline_code`.
    pub decline_code: &'static str,
    /// `error.message`, Stripe's wording.
    pub message: &'static str,
    /// `error.param`, where Stripe names one.
    pub param: Option<&'static str>,
}

/// The outcome for a card number (ASCII digits); any card not in the table succeeds.
pub fn outcome(digits: &str) -> Outcome {
    let decline = |code, decline_code, message, param| {
        Outcome::Decline(Decline {
            code,
            decline_code,
            message,
            param,
        })
    };
    match digits {
        DECLINED => decline(
            "card_declined",
            "generic_decline",
            "Your card was declined.",
            None,
        ),
        INSUFFICIENT_FUNDS => decline(
            "card_declined",
            "insufficient_funds",
            "Your card has insufficient funds.",
            None,
        ),
        // Stripe repeats the code as the decline code for these three.
        EXPIRED => decline(
            "expired_card",
            "expired_card",
            "Your card has expired.",
            Some("exp_month"),
        ),
        INCORRECT_CVC => decline(
            "incorrect_cvc",
            "incorrect_cvc",
            "Your card's security code is incorrect.",
            Some("cvc"),
        ),
        PROCESSING_ERROR => decline(
            "processing_error",
            "processing_error",
            "An error occurred while processing your card. Try again in a little bit.",
            None,
        ),
        REQUIRES_ACTION => Outcome::RequiresAction,
        HANG => Outcome::Hang,
        ANSWER_LOST => Outcome::AnswerLost,
        _ => Outcome::Succeed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cardvault::card::luhn;

    #[test]
    fn every_test_card_passes_luhn() {
        for card in [
            SUCCESS,
            DECLINED,
            INSUFFICIENT_FUNDS,
            EXPIRED,
            INCORRECT_CVC,
            PROCESSING_ERROR,
            REQUIRES_ACTION,
            HANG,
            ANSWER_LOST,
        ] {
            assert!(luhn::is_valid(card.as_bytes()), "{card}");
        }
    }

    #[test]
    fn unknown_cards_succeed_and_known_ones_do_what_stripe_documents() {
        assert_eq!(outcome("5555555555554444"), Outcome::Succeed);
        assert_eq!(outcome(HANG), Outcome::Hang);
        assert_eq!(outcome(ANSWER_LOST), Outcome::AnswerLost);
        assert_eq!(outcome(REQUIRES_ACTION), Outcome::RequiresAction);
        let Outcome::Decline(d) = outcome(INSUFFICIENT_FUNDS) else {
            panic!("insufficient funds must decline");
        };
        assert_eq!(
            (d.code, d.decline_code),
            ("card_declined", "insufficient_funds")
        );
    }
}
