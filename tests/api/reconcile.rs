//! Charges whose outcome is not known: the vault settles them by asking the gateway (or, while
//! the gateway still remembers the key, by sending them again), on its own in the background,
//! and a caller whose deadline is shorter than the gateway gets a clear answer in time. Each
//! failure that once ended FAILED while the gateway held a payment is reproduced here against
//! the test gateway, and no card number or CVC shows up anywhere along the way.

use std::time::Duration;

use cardvault::{
    pb::v1 as pb,
    store::{CaptureMethod, ChargeRow, ChargeState},
};
use cardvault_test_gateway::{cards, paths};
use time::OffsetDateTime;

use crate::{
    charge::{
        Rig, audit_details, card, charge, charge_request, database_text, rig_forgetful, rig_tuned,
        status,
    },
    helpers::{AppState, Backend, captured_logs, unique_pan},
    on_both_backends,
};

on_both_backends!(
    a_caller_deadline_shorter_than_the_gateway_gets_unknown_in_time_then_the_charge_settles,
    scheduled_reconciliation_settles_unknown_charges_without_an_operator,
    a_resend_after_the_cvc_hold_lapsed_uses_its_own_cvc_and_never_another_charges_hold,
    a_charge_that_stays_unknown_raises_the_alarm_once,
    a_charge_whose_gateway_cannot_be_asked_nor_sent_again_stays_for_an_operator,
    an_answer_lost_in_a_500_is_settled_by_asking_the_gateway,
    a_key_the_gateway_forgot_never_leads_to_a_second_payment,
    a_charge_still_processing_at_the_gateway_stays_unknown_and_then_succeeds_once,
    a_charge_the_gateway_never_got_is_resent_within_the_window_and_not_charged_past_it,
);

/// Waits (polling, at most `within`) until `done` holds; false if it never did.
async fn eventually<F, Fut>(within: Duration, mut done: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < end {
        if done().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done().await
}

/// One text column of every row `sql` selects (a charge's status, an audit principal, …).
async fn texts(state: &AppState, sql: &'static str) -> Vec<String> {
    match state.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&state.database_url)
                .await
                .expect("open sqlite");
            sqlx::query_scalar(sql)
                .fetch_all(&pool)
                .await
                .expect("query")
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&state.database_url)
                .await
                .expect("open postgres");
            sqlx::query_scalar(sql)
                .fetch_all(&pool)
                .await
                .expect("query")
        }
    }
}

async fn charge_statuses(state: &AppState) -> Vec<String> {
    texts(state, "SELECT status FROM charges ORDER BY created_at").await
}

/// Whether `secret` appears as a value of its own in `haystack` (not inside a longer number
/// or word), with some context if so.
fn standalone(haystack: &str, secret: &str) -> Option<String> {
    let joined = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '_');
    haystack.match_indices(secret).find_map(|(i, _)| {
        let before = haystack[..i].chars().next_back();
        let after = haystack[i + secret.len()..].chars().next();
        (!before.is_some_and(joined) && !after.is_some_and(joined)).then(|| {
            let from = haystack.floor_char_boundary(i.saturating_sub(60));
            let to = haystack.ceil_char_boundary((i + secret.len() + 60).min(haystack.len()));
            haystack[from..to].to_owned()
        })
    })
}

/// The PAN and CVCs are in no log line, audit record or database column.
async fn assert_no_card_secrets(rig: &Rig, secrets: &[&str]) {
    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    let details = audit_details(&rig.app.state).await.join("\n");
    let stored = database_text(&rig.app.state);
    for secret in secrets {
        for (place, text) in [
            ("logs", &logs),
            ("audit log", &details),
            ("database", &stored),
        ] {
            if let Some(context) = standalone(text, secret) {
                panic!("a card secret is in the {place}: …{context}…");
            }
        }
    }
}

async fn a_caller_deadline_shorter_than_the_gateway_gets_unknown_in_time_then_the_charge_settles(
    backend: Backend,
) {
    // The gateway answers the hang card after 2 s, within the vault's 5 s gateway timeout;
    // the caller waits 1 s.
    let mut rig = rig_tuned(backend, Duration::from_secs(2), 5_000, |_| {}).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::HANG, "0813").await;
    let mut request = tonic::Request::new(charge_request(&token, "stripe", "late-1"));
    request.set_timeout(Duration::from_secs(1));
    let answer = client
        .charge(request)
        .await
        .expect("an answer, not CANCELLED")
        .into_inner();
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    assert!(
        answer
            .message
            .contains("has not answered within the request's deadline"),
        "{answer:?}"
    );
    assert!(answer.charge_id.starts_with("ch_"), "{answer:?}");
    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    assert!(
        logs.lines().any(|l| l.contains(&answer.charge_id)
            && l.contains("has not answered within the request's deadline")),
        "no warn line names the charge"
    );
    // A duplicate while the first send is out is answered by its own deadline too.
    let mut again = tonic::Request::new(charge_request(&token, "stripe", "late-1"));
    again.set_timeout(Duration::from_secs(1));
    let duplicate = client.charge(again).await.expect("answer").into_inner();
    assert_eq!(duplicate.charge_id, answer.charge_id);
    // The send went on without the caller and settled the charge.
    let settled = eventually(Duration::from_secs(10), || async {
        charge_statuses(&rig.app.state).await == ["succeeded"]
    })
    .await;
    assert!(settled, "{:?}", charge_statuses(&rig.app.state).await);
    let replay = charge(client, &token, "stripe", "late-1").await;
    assert_eq!(status(&replay), pb::ChargeStatus::Succeeded, "{replay:?}");
    assert_eq!(rig.gateway.stats().executed_on(paths::PAYMENT_INTENTS), 1);
    assert_no_card_secrets(&rig, &[cards::HANG, "0813"]).await;
}

async fn scheduled_reconciliation_settles_unknown_charges_without_an_operator(backend: Backend) {
    // The gateway answers after 1.5 s; the vault gives up after 0.5 s; the reconciler runs
    // every second.
    let mut rig = rig_tuned(backend, Duration::from_millis(1_500), 500, |s| {
        s.charges.reconcile_interval_secs = 1;
    })
    .await;
    let client = &mut rig.app.client;
    let token = card(client, cards::HANG, "0927").await;
    let answer = charge(client, &token, "stripe", "background-1").await;
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    let settled = eventually(Duration::from_secs(20), || async {
        charge_statuses(&rig.app.state).await == ["succeeded"]
    })
    .await;
    assert!(settled, "{:?}", charge_statuses(&rig.app.state).await);
    // Nobody called ReconcileCharges: the reconciler did it, on record as itself.
    let principals = texts(
        &rig.app.state,
        "SELECT COALESCE(principal, '') FROM audit_records WHERE action = 'charges.reconcile'",
    )
    .await;
    assert!(
        !principals.is_empty() && principals.iter().all(|p| p == "system:reconciler"),
        "{principals:?}"
    );
    assert_eq!(rig.gateway.stats().executed_on(paths::PAYMENT_INTENTS), 1);
    let replay = charge(client, &token, "stripe", "background-1").await;
    assert_eq!(status(&replay), pb::ChargeStatus::Succeeded);
    // The operator sees it in the metrics.
    let metrics = crate::errors::http_get(rig.app.admin_addr, "/metrics").await;
    for name in [
        "cardvault_charges_unknown",
        "cardvault_charges_unknown_overdue",
        "cardvault_charge_reconciliations_total{result=\"found\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from {metrics}");
    }
    assert_no_card_secrets(&rig, &[cards::HANG, "0927"]).await;
}

async fn a_resend_after_the_cvc_hold_lapsed_uses_its_own_cvc_and_never_another_charges_hold(
    backend: Backend,
) {
    // Holds last 2 s; the gateway answers after 1.5 s, the vault gives up after 0.5 s.
    let mut rig = rig_tuned(backend, Duration::from_millis(1_500), 500, |s| {
        s.charges.cvc_hold_secs = 2;
    })
    .await;
    let client = &mut rig.app.client;
    let token = card(client, cards::HANG, "0361").await;
    let answer = charge(client, &token, "stripe", "lapsed-1").await;
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    // The first charge's hold would have lapsed by now; the card's next charge gets a CVC.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    client
        .hold_cvc(pb::HoldCvcRequest {
            token: token.clone(),
            cvc: "0742".to_owned(),
        })
        .await
        .expect("hold");
    let reconciled = client
        .reconcile_charges(pb::ReconcileChargesRequest { limit: 0 })
        .await
        .expect("reconcile")
        .into_inner()
        .charges;
    assert_eq!(reconciled.len(), 1, "{reconciled:?}");
    // Re-sent with exactly its first parameters (its own CVC): the gateway replayed its
    // answer. Another CVC, or none, would have been refused as another request under the
    // same key, which must never read as FAILED either.
    assert_eq!(
        pb::ChargeStatus::try_from(reconciled[0].status),
        Ok(pb::ChargeStatus::Succeeded),
        "{reconciled:?}"
    );
    let stats = rig.gateway.stats();
    assert_eq!(stats.executed_on(paths::PAYMENT_INTENTS), 1, "{stats:?}");
    let intent = rig
        .gateway
        .payment_intent(&reconciled[0].gateway_payment_id)
        .expect("the intent");
    let method = intent["payment_method"]
        .as_str()
        .expect("its PaymentMethod");
    assert_eq!(
        rig.gateway.payment_method_cvc_is(method, "0361"),
        Some(true)
    );
    assert_eq!(
        rig.gateway.payment_method_cvc_is(method, "0742"),
        Some(false)
    );
    // The next charge's hold is untouched, and settling erased the charge's own CVC.
    let state = &rig.app.state;
    assert_eq!(state.count("SELECT COUNT(*) FROM cvc_holds").await, 1);
    assert_eq!(
        state
            .count("SELECT COUNT(*) FROM charges WHERE cvc_ciphertext IS NOT NULL")
            .await,
        0
    );
    assert_no_card_secrets(&rig, &[cards::HANG, "0361", "0742"]).await;
}

async fn a_charge_that_stays_unknown_raises_the_alarm_once(backend: Backend) {
    // `blind` never sees the key, so an unknown charge to it stays unknown; the alarm age is
    // a second and the reconciler runs every second.
    let mut rig = rig_tuned(backend, Duration::from_millis(1_500), 500, |s| {
        s.charges.reconcile_interval_secs = 1;
        s.charges.unknown_alarm_secs = 1;
    })
    .await;
    let client = &mut rig.app.client;
    let token = card(client, cards::HANG, "").await;
    let answer = charge(client, &token, "blind", "alarm-1").await;
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    let id = answer.charge_id.clone();
    let raised = eventually(Duration::from_secs(20), || async {
        let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
        logs.lines()
            .filter(|l| l.contains("CHARGE UNKNOWN TOO LONG") && l.contains(&id))
            .count()
            >= 2
    })
    .await;
    assert!(raised, "the alarm line was not logged on two runs");
    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    let line = logs
        .lines()
        .find(|l| l.contains("CHARGE UNKNOWN TOO LONG") && l.contains(&id))
        .expect("alarm line");
    assert!(
        line.contains("dev") && line.contains("blind") && line.contains("age_secs"),
        "{line}"
    );
    // Logged on every run, recorded once.
    let alarms = texts(
        &rig.app.state,
        "SELECT COALESCE(detail, '') FROM audit_records WHERE alarm AND action = 'charges.reconcile'",
    )
    .await;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert!(alarms[0].contains(&id), "{alarms:?}");
    assert_eq!(charge_statuses(&rig.app.state).await, ["unknown"]);
    assert_eq!(rig.gateway.stats().executed_on(paths::GENERIC_CHARGES), 1);
}

async fn a_charge_whose_gateway_cannot_be_asked_nor_sent_again_stays_for_an_operator(
    backend: Backend,
) {
    let mut rig = rig_tuned(backend, Duration::from_millis(1_500), 500, |_| {}).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::HANG, "").await;
    let answer = charge(client, &token, "blind", "operator-1").await;
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let reconciled = client
        .reconcile_charges(pb::ReconcileChargesRequest { limit: 0 })
        .await
        .expect("reconcile")
        .into_inner()
        .charges;
    assert_eq!(reconciled.len(), 1, "{reconciled:?}");
    assert_eq!(
        pb::ChargeStatus::try_from(reconciled[0].status),
        Ok(pb::ChargeStatus::Unknown)
    );
    // The message says why it is still unknown and what to do.
    assert!(
        reconciled[0]
            .message
            .contains("settle this charge at the gateway"),
        "{reconciled:?}"
    );
    assert_eq!(rig.gateway.stats().executed_on(paths::GENERIC_CHARGES), 1);
}

/// The PaymentIntents the test gateway holds for one vault charge.
fn intents_of(rig: &Rig, charge_id: &str) -> usize {
    rig.gateway
        .payment_intents_with_metadata("cardvault_charge_id", charge_id)
        .len()
}

async fn reconcile(rig: &mut Rig) -> Vec<pb::ReconciledCharge> {
    rig.app
        .client
        .reconcile_charges(pb::ReconcileChargesRequest { limit: 0 })
        .await
        .expect("reconcile")
        .into_inner()
        .charges
}

fn reconciled_status(charge: &pb::ReconciledCharge) -> pb::ChargeStatus {
    pb::ChargeStatus::try_from(charge.status).expect("known status")
}

async fn an_answer_lost_in_a_500_is_settled_by_asking_the_gateway(backend: Backend) {
    let mut rig = rig_tuned(backend, Duration::from_secs(30), 5_000, |_| {}).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::ANSWER_LOST, "0518").await;
    let answer = charge(client, &token, "stripe", "lost-1").await;
    // The gateway charged and answered 500: unknown, never failed.
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    // A re-send would get the saved 500 again; asking finds the payment.
    let reconciled = reconcile(&mut rig).await;
    assert_eq!(reconciled.len(), 1, "{reconciled:?}");
    assert_eq!(
        reconciled_status(&reconciled[0]),
        pb::ChargeStatus::Succeeded,
        "{reconciled:?}"
    );
    assert!(reconciled[0].gateway_payment_id.starts_with("pi_"));
    assert_eq!(intents_of(&rig, &answer.charge_id), 1);
    let replay = charge(&mut rig.app.client, &token, "stripe", "lost-1").await;
    assert_eq!(status(&replay), pb::ChargeStatus::Succeeded);
    assert_eq!(replay.gateway_payment_id, reconciled[0].gateway_payment_id);
    let details = audit_details(&rig.app.state).await;
    assert!(
        details
            .iter()
            .any(|d| d.contains(&answer.charge_id) && d.contains("found at the gateway")),
        "{details:?}"
    );
    assert_no_card_secrets(&rig, &[cards::ANSWER_LOST, "0518"]).await;
}

async fn a_key_the_gateway_forgot_never_leads_to_a_second_payment(backend: Backend) {
    // The gateway forgets keys after a second, as Stripe does after a day; it answers the
    // hang card after 1.5 s, the vault gives up after 0.5 s.
    let mut rig = rig_forgetful(
        backend,
        Duration::from_millis(1_500),
        500,
        Duration::from_secs(1),
        |_| {},
    )
    .await;
    let client = &mut rig.app.client;
    let token = card(client, cards::HANG, "0633").await;
    let answer = charge(client, &token, "stripe", "pruned-1").await;
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    // The payment went through, and the gateway has forgotten the key since.
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    let reconciled = reconcile(&mut rig).await;
    assert_eq!(
        reconciled_status(&reconciled[0]),
        pb::ChargeStatus::Succeeded,
        "{reconciled:?}"
    );
    // A re-send under the forgotten key would have made a second one.
    assert_eq!(intents_of(&rig, &answer.charge_id), 1);
    let replay = charge(&mut rig.app.client, &token, "stripe", "pruned-1").await;
    assert_eq!(status(&replay), pb::ChargeStatus::Succeeded);
    assert_eq!(intents_of(&rig, &answer.charge_id), 1);
    assert_no_card_secrets(&rig, &[cards::HANG, "0633"]).await;
}

async fn a_charge_still_processing_at_the_gateway_stays_unknown_and_then_succeeds_once(
    backend: Backend,
) {
    // The gateway takes 2 s; the vault gives up after 0.5 s and the caller retries at once,
    // while the first request is still running (a re-send now would get Stripe's 409).
    let mut rig = rig_tuned(backend, Duration::from_secs(2), 500, |_| {}).await;
    let client = &mut rig.app.client;
    let token = card(client, cards::HANG, "0271").await;
    let answer = charge(client, &token, "stripe", "busy-1").await;
    assert_eq!(status(&answer), pb::ChargeStatus::Unknown, "{answer:?}");
    let retry = charge(client, &token, "stripe", "busy-1").await;
    assert_eq!(status(&retry), pb::ChargeStatus::Unknown, "{retry:?}");
    let reconciled = reconcile(&mut rig).await;
    assert_eq!(
        reconciled_status(&reconciled[0]),
        pb::ChargeStatus::Unknown,
        "{reconciled:?}"
    );
    assert!(!reconciled[0].message.is_empty(), "{reconciled:?}");
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let settled = charge(&mut rig.app.client, &token, "stripe", "busy-1").await;
    assert_eq!(status(&settled), pb::ChargeStatus::Succeeded, "{settled:?}");
    assert_eq!(intents_of(&rig, &answer.charge_id), 1);
    let stats = rig.gateway.stats();
    assert_eq!(stats.executed_on(paths::PAYMENT_INTENTS), 1, "{stats:?}");
}

/// An unknown charge of tenant `dev` for `token`, sent once `age` ago (as after a crash
/// right after sending): written straight to the store, the gateway never saw it.
fn unknown_charge(id: &str, token: &str, age: time::Duration) -> ChargeRow {
    let created_at = OffsetDateTime::now_utc() - age;
    ChargeRow {
        id: id.to_owned(),
        tenant_id: "dev".to_owned(),
        idempotency_key: format!("key-{id}"),
        request_hash: vec![7; 32],
        token: token.to_owned(),
        gateway: "stripe".to_owned(),
        amount: 1999,
        currency: "EUR".to_owned(),
        capture: CaptureMethod::Automatic,
        description: "order 42".to_owned(),
        metadata: Vec::new(),
        status: ChargeState::Unknown,
        gateway_payment_id: None,
        decline_code: None,
        message: Some("gateway timed out".to_owned()),
        attempts: 1,
        sending_until: None,
        created_at,
        updated_at: created_at,
        action: None,
        reconcile_attempts: 0,
        next_reconcile_at: None,
    }
}

async fn a_charge_the_gateway_never_got_is_resent_within_the_window_and_not_charged_past_it(
    backend: Backend,
) {
    let mut rig = rig_tuned(backend, Duration::from_secs(30), 5_000, |_| {}).await;
    let pan = unique_pan();
    let token = card(&mut rig.app.client, &pan, "").await;
    let mut settings = rig.app.state.settings("dev");
    crate::charge::with_gateways(&mut settings, &rig.gateways_toml);
    let vault = cardvault::server::open_vault(&settings)
        .await
        .expect("vault on the same database");
    let recent = "ch_recentChargeAbCd";
    let old = "ch_oldChargeWxYzAbC";
    for row in [
        unknown_charge(recent, &token, time::Duration::minutes(1)),
        // Past the gateway's 23 h idempotency window.
        unknown_charge(old, &token, time::Duration::hours(24)),
    ] {
        assert!(
            vault
                .store()
                .insert_charge(&row)
                .await
                .expect("insert")
                .is_none()
        );
    }
    let reconciled = reconcile(&mut rig).await;
    let of = |id: &str| {
        reconciled
            .iter()
            .find(|c| c.charge_id == id)
            .unwrap_or_else(|| panic!("{id} in {reconciled:?}"))
    };
    // No payment, key still remembered: sent again, once.
    assert_eq!(reconciled_status(of(recent)), pb::ChargeStatus::Succeeded);
    assert_eq!(intents_of(&rig, recent), 1);
    // No payment, key possibly forgotten: not charged, and never sent again.
    let failed = of(old);
    assert_eq!(
        reconciled_status(failed),
        pb::ChargeStatus::Failed,
        "{failed:?}"
    );
    assert!(
        failed.message.starts_with("not charged") && failed.message.contains(old),
        "the evidence names how the gateway was asked: {failed:?}"
    );
    assert_eq!(intents_of(&rig, old), 0);
    let details = audit_details(&rig.app.state).await;
    assert!(
        details
            .iter()
            .any(|d| d.contains(old) && d.contains("failed (not charged, evidence:")),
        "{details:?}"
    );
    assert_no_card_secrets(&rig, &[pan.as_str()]).await;
}
