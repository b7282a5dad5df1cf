//! The store's charge-forwarding contract, on both backends: charges unique per tenant and
//! idempotency key, the right to send claimed by one request at a time, settlement, the
//! reconciler's list, the CVC attached to a charge, and single-use CVC holds that never
//! outlive their card or their tenant's keys.

use std::sync::Arc;

use cardvault::store::{
    CaptureMethod, CardRow, ChargeActionRow, ChargeRow, ChargeSettlement, ChargeState, CvcHoldRow,
    DekRow, ReuseKey, Shredded, Store, StoreError,
};
use time::{Duration, OffsetDateTime};
use tokio::task::JoinSet;
use uuid::Uuid;

use cardvault_test_support::database::Backend;

use crate::{
    on_both_backends,
    store::{card, open, t0, tenant},
};

on_both_backends!(
    a_reused_idempotency_key_returns_the_existing_charge_and_keys_are_per_tenant,
    a_charge_is_found_by_key_only_within_its_tenant,
    the_right_to_send_is_held_by_one_request_until_it_lapses_or_the_charge_settles,
    of_ten_concurrent_claims_exactly_one_takes_the_send,
    a_charge_settles_only_from_pending_or_unknown_and_keeps_an_earlier_payment_id,
    unsettled_charges_are_unknown_or_idle_pending_ones_oldest_first,
    a_charge_keeps_its_cvc_for_re_sends_until_it_settles_or_the_cvc_expires,
    a_cvc_hold_is_replaced_by_its_tenant_and_taken_once_while_live,
    expired_cvc_holds_are_swept_up_to_the_limit,
    deleting_a_card_deletes_its_cvc_hold,
    shredding_a_tenant_deletes_its_cvc_holds_and_keeps_its_charges,
    due_charges_wait_for_their_backoff_and_settle_with_their_action,
    unknown_charges_are_counted_and_alarmed_once,
    a_job_lease_is_held_by_one_owner_until_it_lapses_or_is_released,
    a_hold_moves_to_its_charge_in_one_transaction,
);

fn at(seconds: i64) -> OffsetDateTime {
    t0() + Duration::seconds(seconds)
}

/// A pending charge of `tenant_id` for `tok_a`, never sent.
fn charge(id: &str, tenant_id: &str, key: &str, created_at: OffsetDateTime) -> ChargeRow {
    ChargeRow {
        id: id.to_owned(),
        tenant_id: tenant_id.to_owned(),
        idempotency_key: key.to_owned(),
        request_hash: vec![3; 32],
        token: "tok_a".to_owned(),
        gateway: "stripe".to_owned(),
        amount: 1999,
        currency: "EUR".to_owned(),
        capture: CaptureMethod::Automatic,
        description: "order 42".to_owned(),
        metadata: vec![
            ("cart".to_owned(), "c-9".to_owned()),
            ("order".to_owned(), "42".to_owned()),
        ],
        status: ChargeState::Pending,
        gateway_payment_id: None,
        decline_code: None,
        message: None,
        attempts: 0,
        sending_until: None,
        created_at,
        updated_at: created_at,
        action: None,
        reconcile_attempts: 0,
        next_reconcile_at: None,
    }
}

fn settlement(status: &str, payment_id: Option<&str>) -> ChargeSettlement {
    ChargeSettlement {
        status: ChargeState::parse(status).expect("a charge status"),
        gateway_payment_id: payment_id.map(str::to_owned),
        decline_code: None,
        message: None,
        action: None,
    }
}

/// A hold of `token` for `tenant_id`; `fill` makes its ciphertext recognisable.
fn hold(token: &str, tenant_id: &str, fill: u8, expires_at: OffsetDateTime) -> CvcHoldRow {
    CvcHoldRow {
        token: token.to_owned(),
        tenant_id: tenant_id.to_owned(),
        dek_id: Uuid::new_v4(),
        ciphertext: vec![fill; 40],
        expires_at,
    }
}

/// Tenants `t` and `u`.
async fn two_tenants(store: &dyn Store) {
    for id in ["t", "u"] {
        assert!(
            store.insert_tenant(&tenant(id)).await.expect("tenant"),
            "{id}"
        );
    }
}

async fn insert(store: &dyn Store, row: &ChargeRow) {
    assert_eq!(
        store.insert_charge(row).await.expect("insert charge"),
        None,
        "{} is new",
        row.id
    );
}

/// Attaches a hold to a charge as the vault does: inside a transaction.
async fn attach(store: &dyn Store, charge_id: &str, hold: &CvcHoldRow) -> Result<(), StoreError> {
    let mut tx = store.begin().await?;
    tx.attach_charge_cvc(charge_id, hold).await?;
    tx.commit().await
}

async fn read(store: &dyn Store, id: &str) -> ChargeRow {
    store
        .charge(id)
        .await
        .expect("read charge")
        .unwrap_or_else(|| panic!("charge {id}"))
}

fn ids(rows: &[ChargeRow]) -> Vec<&str> {
    rows.iter().map(|r| r.id.as_str()).collect()
}

/// An active DEK for `tenant_id`, whose id is returned.
async fn dek_of(store: &dyn Store, tenant_id: &str) -> Uuid {
    let row = DekRow {
        id: Uuid::new_v4(),
        tenant_id: tenant_id.to_owned(),
        kek_version: 1,
        wrapped_key: vec![0; 8],
        active: true,
        created_at: t0(),
        reserved: 0,
        retired_at: None,
    };
    assert!(store.insert_active_dek(&row).await.expect("dek"));
    row.id
}

async fn store_cards(store: &dyn Store, rows: &[CardRow]) {
    let refs: Vec<&CardRow> = rows.iter().collect();
    let mut tx = store.begin().await.expect("begin");
    assert!(
        tx.insert_cards(&refs)
            .await
            .expect("insert")
            .iter()
            .all(|stored| *stored)
    );
    tx.commit().await.expect("commit");
}

async fn a_reused_idempotency_key_returns_the_existing_charge_and_keys_are_per_tenant(
    backend: Backend,
) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    let first = charge("ch_1", "t", "key-1", at(0));
    insert(store.as_ref(), &first).await;
    assert_eq!(read(store.as_ref(), "ch_1").await, first, "round trip");

    let again = ChargeRow {
        amount: 5,
        request_hash: vec![4; 32],
        ..charge("ch_2", "t", "key-1", at(10))
    };
    assert_eq!(
        store.insert_charge(&again).await.expect("duplicate key"),
        Some(first.clone()),
        "the existing row comes back, whatever the new one holds"
    );
    assert!(store.charge("ch_2").await.expect("read").is_none());
    assert_eq!(
        store.insert_charge(&first).await.expect("same row again"),
        Some(first.clone()),
        "a row sent twice is a duplicate key, not an id clash"
    );

    let other_tenant = charge("ch_3", "u", "key-1", at(20));
    insert(store.as_ref(), &other_tenant).await;
    assert_eq!(read(store.as_ref(), "ch_3").await, other_tenant);

    assert!(
        store
            .insert_charge(&charge("ch_1", "t", "key-2", at(30)))
            .await
            .is_err(),
        "an id clash under another key is an error"
    );
    assert!(
        store
            .charge_by_key("t", "key-2")
            .await
            .expect("read")
            .is_none()
    );
}

async fn a_charge_is_found_by_key_only_within_its_tenant(backend: Backend) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    let t_charge = charge("ch_t", "t", "key-1", at(0));
    insert(store.as_ref(), &t_charge).await;

    assert_eq!(
        store.charge_by_key("t", "key-1").await.expect("read"),
        Some(t_charge)
    );
    assert!(
        store
            .charge_by_key("u", "key-1")
            .await
            .expect("read")
            .is_none(),
        "another tenant's key names nothing"
    );
    assert!(
        store
            .charge_by_key("t", "key-2")
            .await
            .expect("read")
            .is_none()
    );
    assert!(store.charge("ch_none").await.expect("read").is_none());
}

async fn the_right_to_send_is_held_by_one_request_until_it_lapses_or_the_charge_settles(
    backend: Backend,
) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    insert(store.as_ref(), &charge("ch_1", "t", "key-1", at(0))).await;

    assert!(
        store
            .claim_charge_send("ch_1", at(10), at(40))
            .await
            .expect("claim")
    );
    let claimed = read(store.as_ref(), "ch_1").await;
    assert_eq!(
        (claimed.attempts, claimed.sending_until, claimed.updated_at),
        (1, Some(at(40)), at(10))
    );
    assert!(
        !store
            .claim_charge_send("ch_1", at(20), at(50))
            .await
            .expect("claim while live"),
        "a live send keeps others out"
    );
    assert!(
        !store
            .claim_charge_send("ch_1", at(40), at(70))
            .await
            .expect("claim at the deadline"),
        "the send is live up to and including `sending_until`"
    );
    assert_eq!(read(store.as_ref(), "ch_1").await.attempts, 1);

    assert!(
        store
            .claim_charge_send("ch_1", at(41), at(71))
            .await
            .expect("claim after it lapsed"),
        "a lapsed send can be taken over"
    );
    let retaken = read(store.as_ref(), "ch_1").await;
    assert_eq!((retaken.attempts, retaken.sending_until), (2, Some(at(71))));

    assert!(
        store
            .settle_charge("ch_1", &settlement("unknown", None), at(50))
            .await
            .expect("settle unknown")
    );
    assert!(
        store
            .claim_charge_send("ch_1", at(51), at(81))
            .await
            .expect("claim unknown"),
        "an unknown outcome is sent again"
    );
    assert!(
        store
            .settle_charge("ch_1", &settlement("succeeded", Some("pi_1")), at(60))
            .await
            .expect("settle")
    );
    assert!(
        !store
            .claim_charge_send("ch_1", at(500), at(530))
            .await
            .expect("claim settled"),
        "a settled charge is never sent again"
    );
    assert_eq!(read(store.as_ref(), "ch_1").await.attempts, 3);
    assert!(
        !store
            .claim_charge_send("ch_none", at(0), at(30))
            .await
            .expect("claim missing")
    );
}

async fn of_ten_concurrent_claims_exactly_one_takes_the_send(backend: Backend) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    for round in 0..5 {
        let id = format!("ch_race{round}");
        insert(
            store.as_ref(),
            &charge(&id, "t", &format!("key-{round}"), at(round)),
        )
        .await;
        let now = at(100 + round);
        let mut claims = JoinSet::new();
        for _ in 0..10 {
            let store = Arc::clone(&store);
            let id = id.clone();
            claims.spawn(async move {
                store
                    .claim_charge_send(&id, now, now + Duration::seconds(30))
                    .await
                    .expect("claim")
            });
        }
        let won = claims.join_all().await;
        assert_eq!(
            won.iter().filter(|took| **took).count(),
            1,
            "round {round}: {won:?}"
        );
        assert_eq!(read(store.as_ref(), &id).await.attempts, 1, "round {round}");
    }
}

async fn a_charge_settles_only_from_pending_or_unknown_and_keeps_an_earlier_payment_id(
    backend: Backend,
) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    let row = charge("ch_1", "t", "key-1", at(0));
    insert(store.as_ref(), &row).await;
    assert!(
        store
            .claim_charge_send("ch_1", at(1), at(31))
            .await
            .expect("claim")
    );

    let timed_out = ChargeSettlement {
        message: Some("gateway timed out".to_owned()),
        ..settlement("unknown", Some("pi_1"))
    };
    assert!(
        store
            .settle_charge("ch_1", &timed_out, at(5))
            .await
            .expect("settle")
    );
    assert_eq!(
        read(store.as_ref(), "ch_1").await,
        ChargeRow {
            status: ChargeState::Unknown,
            gateway_payment_id: Some("pi_1".to_owned()),
            message: Some("gateway timed out".to_owned()),
            attempts: 1,
            sending_until: None,
            updated_at: at(5),
            ..row.clone()
        },
        "settling ends the send"
    );

    let declined = ChargeSettlement {
        decline_code: Some("insufficient_funds".to_owned()),
        message: Some("Your card has insufficient funds.".to_owned()),
        ..settlement("declined", None)
    };
    assert!(
        store
            .settle_charge("ch_1", &declined, at(9))
            .await
            .expect("settle")
    );
    let settled = ChargeRow {
        status: ChargeState::Declined,
        gateway_payment_id: Some("pi_1".to_owned()),
        decline_code: Some("insufficient_funds".to_owned()),
        message: Some("Your card has insufficient funds.".to_owned()),
        attempts: 1,
        updated_at: at(9),
        ..row.clone()
    };
    assert_eq!(
        read(store.as_ref(), "ch_1").await,
        settled,
        "no new payment id keeps the earlier one; code and message are replaced"
    );

    for status in ["succeeded", "unknown", "failed"] {
        assert!(
            !store
                .settle_charge("ch_1", &settlement(status, Some("pi_2")), at(20))
                .await
                .expect("settle again"),
            "{status}"
        );
    }
    assert_eq!(
        read(store.as_ref(), "ch_1").await,
        settled,
        "a final status is final"
    );
    assert!(
        !store
            .settle_charge("ch_none", &settlement("succeeded", None), at(20))
            .await
            .expect("settle missing")
    );

    insert(store.as_ref(), &charge("ch_2", "t", "key-2", at(0))).await;
    assert!(
        store
            .settle_charge("ch_2", &settlement("succeeded", Some("pi_9")), at(3))
            .await
            .expect("settle pending")
    );
    assert_eq!(
        read(store.as_ref(), "ch_2")
            .await
            .gateway_payment_id
            .as_deref(),
        Some("pi_9")
    );
}

async fn unsettled_charges_are_unknown_or_idle_pending_ones_oldest_first(backend: Backend) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    let now = at(1000);
    // (id, tenant, created, status, sending_until)
    let rows = [
        ("ch_idle", "t", 10, "pending", None),
        (
            "ch_sending",
            "t",
            20,
            "pending",
            Some(now + Duration::seconds(1)),
        ),
        (
            "ch_lapsed",
            "t",
            30,
            "pending",
            Some(now - Duration::seconds(1)),
        ),
        ("ch_unknown_b", "t", 5, "unknown", None),
        ("ch_unknown_a", "t", 5, "unknown", None),
        (
            "ch_resending",
            "t",
            40,
            "unknown",
            Some(now + Duration::seconds(1)),
        ),
        ("ch_succeeded", "t", 1, "succeeded", None),
        ("ch_declined", "t", 1, "declined", None),
        ("ch_failed", "t", 1, "failed", None),
        ("ch_action", "t", 1, "requires_action", None),
        ("ch_other", "u", 15, "pending", None),
    ];
    for (i, (id, tenant_id, created, status, sending_until)) in rows.into_iter().enumerate() {
        let row = ChargeRow {
            status: ChargeState::parse(status).expect("a charge status"),
            sending_until,
            ..charge(id, tenant_id, &format!("key-{i}"), at(created))
        };
        insert(store.as_ref(), &row).await;
    }

    let all = store
        .unsettled_charges(None, now, 100)
        .await
        .expect("unsettled");
    assert_eq!(
        ids(&all),
        [
            "ch_unknown_a",
            "ch_unknown_b",
            "ch_idle",
            "ch_other",
            "ch_lapsed",
            "ch_resending"
        ],
        "by creation, then id; an unknown charge is listed even while being re-sent"
    );
    let of_t = store
        .unsettled_charges(Some("t"), now, 100)
        .await
        .expect("unsettled of t");
    assert_eq!(
        ids(&of_t),
        [
            "ch_unknown_a",
            "ch_unknown_b",
            "ch_idle",
            "ch_lapsed",
            "ch_resending"
        ]
    );
    let first_two = store
        .unsettled_charges(Some("t"), now, 2)
        .await
        .expect("limited");
    assert_eq!(ids(&first_two), ["ch_unknown_a", "ch_unknown_b"]);
    assert!(
        store
            .unsettled_charges(Some("nobody"), now, 100)
            .await
            .expect("none")
            .is_empty()
    );
    let later = store
        .unsettled_charges(Some("t"), now + Duration::seconds(2), 100)
        .await
        .expect("later");
    assert_eq!(
        ids(&later),
        [
            "ch_unknown_a",
            "ch_unknown_b",
            "ch_idle",
            "ch_sending",
            "ch_lapsed",
            "ch_resending"
        ],
        "once its send lapses a pending charge is listed"
    );
}

async fn a_charge_keeps_its_cvc_for_re_sends_until_it_settles_or_the_cvc_expires(backend: Backend) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    for (id, created) in [("ch_1", 0), ("ch_2", 1), ("ch_3", 2), ("ch_4", 3)] {
        insert(store.as_ref(), &charge(id, "t", id, at(created))).await;
    }
    let cvc = hold("tok_a", "t", 0xC1, at(600));
    assert!(
        store
            .charge_cvc("ch_1", at(0))
            .await
            .expect("read")
            .is_none(),
        "no CVC attached yet"
    );
    attach(store.as_ref(), "ch_1", &cvc).await.expect("attach");
    assert_eq!(
        store.charge_cvc("ch_1", at(599)).await.expect("read"),
        Some(cvc.clone())
    );
    assert!(
        store
            .charge_cvc("ch_1", at(600))
            .await
            .expect("read")
            .is_none(),
        "an expired CVC is not returned"
    );

    // A hold never moves to another tenant's charge or another card's.
    attach(store.as_ref(), "ch_2", &hold("tok_a", "u", 0xC2, at(600)))
        .await
        .expect("attach other tenant");
    attach(store.as_ref(), "ch_2", &hold("tok_b", "t", 0xC2, at(600)))
        .await
        .expect("attach other token");
    assert!(
        store
            .charge_cvc("ch_2", at(0))
            .await
            .expect("read")
            .is_none()
    );

    assert!(
        store
            .settle_charge("ch_1", &settlement("unknown", None), at(10))
            .await
            .expect("settle unknown")
    );
    assert_eq!(
        store.charge_cvc("ch_1", at(11)).await.expect("read"),
        Some(cvc.clone()),
        "an unknown outcome is sent again, with its CVC"
    );
    assert!(
        store
            .settle_charge("ch_1", &settlement("succeeded", Some("pi_1")), at(12))
            .await
            .expect("settle")
    );
    assert!(
        store
            .charge_cvc("ch_1", at(13))
            .await
            .expect("read")
            .is_none(),
        "a final status erases the CVC"
    );
    attach(store.as_ref(), "ch_1", &cvc)
        .await
        .expect("attach to a settled charge");
    assert!(
        store
            .charge_cvc("ch_1", at(13))
            .await
            .expect("read")
            .is_none(),
        "a settled charge gets no CVC back"
    );

    // The sweep erases expired CVCs, oldest first and up to the limit.
    for (id, expires) in [("ch_2", 100), ("ch_3", 50), ("ch_4", 300)] {
        attach(store.as_ref(), id, &hold("tok_a", "t", 0xC3, at(expires)))
            .await
            .expect("attach");
    }
    assert_eq!(
        store
            .erase_expired_charge_cvcs(at(200), 1)
            .await
            .expect("erase"),
        1
    );
    assert!(
        store
            .charge_cvc("ch_3", at(0))
            .await
            .expect("read")
            .is_none(),
        "the oldest went first"
    );
    assert!(
        store
            .charge_cvc("ch_2", at(0))
            .await
            .expect("read")
            .is_some()
    );
    assert_eq!(
        store
            .erase_expired_charge_cvcs(at(200), 10)
            .await
            .expect("erase"),
        1
    );
    assert!(
        store
            .charge_cvc("ch_2", at(0))
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        store
            .charge_cvc("ch_4", at(200))
            .await
            .expect("read")
            .is_some(),
        "a live CVC stays"
    );
    assert_eq!(
        store
            .erase_expired_charge_cvcs(at(200), 10)
            .await
            .expect("erase"),
        0
    );
    let ch_4 = read(store.as_ref(), "ch_4").await;
    assert_eq!(
        (ch_4.status.as_str(), ch_4.updated_at),
        ("pending", at(3)),
        "attaching and erasing a CVC leave the charge itself alone"
    );
}

async fn a_cvc_hold_is_replaced_by_its_tenant_and_taken_once_while_live(backend: Backend) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    let first = hold("tok_a", "t", 1, at(300));
    store.put_cvc_hold(&first).await.expect("put");
    let second = hold("tok_a", "t", 2, at(600));
    store.put_cvc_hold(&second).await.expect("replace");
    store
        .put_cvc_hold(&hold("tok_a", "u", 3, at(900)))
        .await
        .expect("put by another tenant");

    assert!(
        store
            .take_cvc_hold("u", "tok_a", at(0))
            .await
            .expect("take")
            .is_none(),
        "another tenant neither replaced nor takes the hold"
    );
    assert_eq!(
        store
            .take_cvc_hold("t", "tok_a", at(0))
            .await
            .expect("take"),
        Some(second.clone()),
        "the latest put wins"
    );
    assert!(
        store
            .take_cvc_hold("t", "tok_a", at(0))
            .await
            .expect("take again")
            .is_none(),
        "a hold is used once"
    );

    store.put_cvc_hold(&second).await.expect("put again");
    assert!(
        store
            .take_cvc_hold("t", "tok_a", at(600))
            .await
            .expect("take expired")
            .is_none(),
        "an expired hold is not taken"
    );
    assert_eq!(
        store
            .delete_expired_cvc_holds(at(600), 10)
            .await
            .expect("sweep"),
        0,
        "taking an expired hold deleted it"
    );
    assert!(
        store
            .take_cvc_hold("t", "tok_a", at(0))
            .await
            .expect("take")
            .is_none()
    );
    assert!(
        store
            .take_cvc_hold("t", "tok_none", at(0))
            .await
            .expect("take missing")
            .is_none()
    );
}

async fn expired_cvc_holds_are_swept_up_to_the_limit(backend: Backend) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    let live = hold("tok_live", "t", 4, at(500));
    for row in [
        hold("tok_1", "t", 1, at(100)),
        hold("tok_2", "u", 2, at(200)),
        hold("tok_3", "t", 3, at(300)),
        live.clone(),
    ] {
        store.put_cvc_hold(&row).await.expect("put");
    }
    assert_eq!(
        store
            .delete_expired_cvc_holds(at(300), 2)
            .await
            .expect("sweep"),
        2
    );
    assert_eq!(
        store
            .delete_expired_cvc_holds(at(300), 2)
            .await
            .expect("sweep"),
        1,
        "expiring at `now` counts as expired"
    );
    assert_eq!(
        store
            .delete_expired_cvc_holds(at(300), 2)
            .await
            .expect("sweep"),
        0
    );
    assert_eq!(
        store
            .take_cvc_hold("t", "tok_live", at(300))
            .await
            .expect("take"),
        Some(live)
    );
}

async fn deleting_a_card_deletes_its_cvc_hold(backend: Backend) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    let dek = dek_of(store.as_ref(), "t").await;
    let expiring = |token: &str, expires_at: OffsetDateTime| CardRow {
        expires_at: Some(expires_at),
        ..card(token, false, dek)
    };
    let canonical_expired = CardRow {
        expires_at: Some(at(50)),
        fingerprint: vec![8; 32],
        ..card("tok_canon", true, dek)
    };
    store_cards(
        store.as_ref(),
        &[
            card("tok_del", false, dek),
            card("tok_keep", false, dek),
            expiring("tok_exp1", at(100)),
            expiring("tok_exp2", at(200)),
            expiring("tok_live", at(10_000)),
            canonical_expired.clone(),
        ],
    )
    .await;
    let far = at(100_000);
    for token in [
        "tok_del",
        "tok_keep",
        "tok_exp1",
        "tok_exp2",
        "tok_live",
        "tok_canon",
    ] {
        store
            .put_cvc_hold(&hold(token, "t", 1, far))
            .await
            .expect("put");
    }
    let has_hold = |token: &'static str| {
        let store = Arc::clone(&store);
        async move {
            let taken = store.take_cvc_hold("t", token, at(0)).await.expect("take");
            if let Some(row) = &taken {
                store.put_cvc_hold(row).await.expect("put back");
            }
            taken.is_some()
        }
    };

    let mut tx = store.begin().await.expect("begin");
    assert!(
        !tx.delete_card("u", "tok_del", at(0))
            .await
            .expect("delete as another tenant")
    );
    tx.commit().await.expect("commit");
    assert!(has_hold("tok_del").await, "nothing deleted, hold kept");

    let mut tx = store.begin().await.expect("begin");
    assert!(tx.delete_card("t", "tok_del", at(0)).await.expect("delete"));
    tx.commit().await.expect("commit");
    assert!(!has_hold("tok_del").await, "the hold went with its card");
    assert!(has_hold("tok_keep").await);

    let mut tx = store.begin().await.expect("begin");
    assert!(
        tx.delete_card("t", "tok_keep", at(0))
            .await
            .expect("delete")
    );
    drop(tx);
    assert!(
        has_hold("tok_keep").await,
        "a rolled-back delete keeps the hold"
    );

    assert_eq!(
        store.delete_expired(at(150), 10).await.expect("sweep"),
        2,
        "tok_canon and tok_exp1"
    );
    assert!(!has_hold("tok_exp1").await);
    assert!(!has_hold("tok_canon").await);
    assert!(has_hold("tok_exp2").await);
    assert!(has_hold("tok_live").await);

    // An expired canonical card is deleted to make room for a new one; its hold goes too.
    store_cards(store.as_ref(), std::slice::from_ref(&canonical_expired)).await;
    store
        .put_cvc_hold(&hold("tok_canon", "t", 1, far))
        .await
        .expect("put");
    let mut tx = store.begin().await.expect("begin");
    tx.delete_expired_canonical(
        ReuseKey {
            tenant_id: "t",
            fingerprint: &canonical_expired.fingerprint,
            exp_month: canonical_expired.exp_month,
            exp_year: canonical_expired.exp_year,
            token_format: &canonical_expired.token_format,
        },
        at(150),
    )
    .await
    .expect("delete expired canonical");
    tx.commit().await.expect("commit");
    assert!(!has_hold("tok_canon").await);
    assert!(has_hold("tok_exp2").await);
}

async fn shredding_a_tenant_deletes_its_cvc_holds_and_keeps_its_charges(backend: Backend) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    let t_dek = dek_of(store.as_ref(), "t").await;
    let u_dek = dek_of(store.as_ref(), "u").await;
    store_cards(
        store.as_ref(),
        &[
            card("tok_a", false, t_dek),
            CardRow {
                tenant_id: "u".to_owned(),
                ..card("tok_u", false, u_dek)
            },
        ],
    )
    .await;
    let t_charge = charge("ch_t", "t", "key-1", at(0));
    let u_charge = ChargeRow {
        token: "tok_u".to_owned(),
        ..charge("ch_u", "u", "key-1", at(0))
    };
    insert(store.as_ref(), &t_charge).await;
    insert(store.as_ref(), &u_charge).await;
    let far = at(100_000);
    let t_cvc = hold("tok_a", "t", 1, far);
    let u_cvc = hold("tok_u", "u", 2, far);
    attach(store.as_ref(), "ch_t", &t_cvc)
        .await
        .expect("attach");
    attach(store.as_ref(), "ch_u", &u_cvc)
        .await
        .expect("attach");
    // A hold of a token with no card: the shred goes by tenant, not through the cards.
    for row in [&t_cvc, &hold("tok_gone", "t", 3, far), &u_cvc] {
        store.put_cvc_hold(row).await.expect("put");
    }

    let mut tx = store.begin().await.expect("begin");
    let shredded = tx.shred_tenant("t", at(10)).await.expect("shred");
    tx.commit().await.expect("commit");
    assert_eq!(
        shredded,
        Shredded {
            cards: 1,
            deks: 1,
            principals: 0
        }
    );

    for token in ["tok_a", "tok_gone"] {
        assert!(
            store
                .take_cvc_hold("t", token, at(0))
                .await
                .expect("take")
                .is_none(),
            "{token}"
        );
    }
    assert_eq!(
        read(store.as_ref(), "ch_t").await,
        t_charge,
        "the charge stays, as it was"
    );
    assert!(
        store
            .charge_cvc("ch_t", at(0))
            .await
            .expect("read")
            .is_none(),
        "its CVC does not"
    );
    assert_eq!(
        store.charge_by_key("t", "key-1").await.expect("read"),
        Some(t_charge)
    );

    assert_eq!(
        store.charge_cvc("ch_u", at(0)).await.expect("read"),
        Some(u_cvc.clone()),
        "another tenant keeps everything"
    );
    assert_eq!(
        store
            .take_cvc_hold("u", "tok_u", at(0))
            .await
            .expect("take"),
        Some(u_cvc)
    );
    assert_eq!(read(store.as_ref(), "ch_u").await, u_charge);
}

async fn due_charges_wait_for_their_backoff_and_settle_with_their_action(backend: Backend) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    insert(store.as_ref(), &charge("ch_1", "t", "key-1", at(0))).await;
    insert(store.as_ref(), &charge("ch_2", "u", "key-2", at(1))).await;
    // Every tenant's, oldest first, until one is deferred.
    let due = store.charges_due(at(10), 10).await.expect("due");
    assert_eq!(ids(&due), ["ch_1", "ch_2"]);
    assert!(
        store
            .defer_charge_reconcile("ch_1", 3, at(40))
            .await
            .expect("defer")
    );
    let deferred = read(store.as_ref(), "ch_1").await;
    assert_eq!(deferred.reconcile_attempts, 3);
    assert_eq!(deferred.next_reconcile_at, Some(at(40)));
    assert_eq!(
        ids(&store.charges_due(at(39), 10).await.expect("due")),
        ["ch_2"]
    );
    assert_eq!(
        ids(&store.charges_due(at(40), 10).await.expect("due")),
        ["ch_1", "ch_2"]
    );
    // A 3-D Secure outcome keeps its action; settling to anything else clears it, and a
    // settled charge is neither due nor deferred.
    let action = ChargeActionRow {
        client_secret: Some("pi_1_secret_x".to_owned()),
        kind: Some("use_stripe_sdk".to_owned()),
        redirect_url: None,
        details_json: Some("{}".to_owned()),
    };
    let challenged = ChargeSettlement {
        action: Some(action.clone()),
        ..settlement("requires_action", Some("pi_2"))
    };
    assert!(
        store
            .settle_charge("ch_2", &challenged, at(41))
            .await
            .expect("settle")
    );
    let stored = read(store.as_ref(), "ch_2").await;
    assert_eq!(stored.action, Some(action.clone()));
    assert!(
        !format!("{stored:?}").contains("pi_1_secret_x"),
        "Debug shows the client secret"
    );
    assert_eq!(
        ids(&store.charges_due(at(50), 10).await.expect("due")),
        ["ch_1"]
    );
    assert!(
        !store
            .defer_charge_reconcile("ch_2", 1, at(60))
            .await
            .expect("defer")
    );
    let unknown = ChargeSettlement {
        action: Some(action),
        ..settlement("unknown", None)
    };
    store
        .settle_charge("ch_1", &unknown, at(51))
        .await
        .expect("settle");
    store
        .settle_charge("ch_1", &settlement("succeeded", Some("pi_1")), at(52))
        .await
        .expect("settle");
    assert_eq!(read(store.as_ref(), "ch_1").await.action, None);
}

async fn unknown_charges_are_counted_and_alarmed_once(backend: Backend) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    for (id, tenant, created) in [("ch_1", "t", 0), ("ch_2", "u", 100), ("ch_3", "t", 200)] {
        insert(store.as_ref(), &charge(id, tenant, id, at(created))).await;
    }
    for id in ["ch_1", "ch_2"] {
        store
            .settle_charge(id, &settlement("unknown", None), at(300))
            .await
            .expect("settle");
    }
    // ch_3 is pending, not unknown.
    assert_eq!(
        store.unknown_charge_counts(at(50)).await.expect("count"),
        (2, 1)
    );
    assert_eq!(
        store.unknown_charge_counts(at(500)).await.expect("count"),
        (2, 2)
    );
    assert!(
        store
            .mark_charge_alarmed("ch_1", at(301))
            .await
            .expect("mark")
    );
    assert!(
        !store
            .mark_charge_alarmed("ch_1", at(302))
            .await
            .expect("mark")
    );
    assert!(
        store
            .mark_charge_alarmed("ch_2", at(302))
            .await
            .expect("mark")
    );
}

async fn a_job_lease_is_held_by_one_owner_until_it_lapses_or_is_released(backend: Backend) {
    let (_state, store) = open(backend).await;
    let job = "charges.reconcile";
    assert!(
        store
            .claim_job_lease(job, "a", at(0), at(60))
            .await
            .expect("claim")
    );
    assert!(
        !store
            .claim_job_lease(job, "b", at(10), at(70))
            .await
            .expect("claim")
    );
    // Its owner renews it; another job is another lease.
    assert!(
        store
            .claim_job_lease(job, "a", at(20), at(80))
            .await
            .expect("claim")
    );
    assert!(
        store
            .claim_job_lease("other", "b", at(20), at(80))
            .await
            .expect("claim")
    );
    assert!(
        !store
            .claim_job_lease(job, "b", at(79), at(139))
            .await
            .expect("claim")
    );
    // Lapsed, anyone takes it.
    assert!(
        store
            .claim_job_lease(job, "b", at(81), at(141))
            .await
            .expect("claim")
    );
    assert!(
        !store
            .claim_job_lease(job, "a", at(90), at(150))
            .await
            .expect("claim")
    );
    // Released by a non-owner: nothing; by its owner: free.
    store.release_job_lease(job, "a").await.expect("release");
    assert!(
        !store
            .claim_job_lease(job, "a", at(91), at(151))
            .await
            .expect("claim")
    );
    store.release_job_lease(job, "b").await.expect("release");
    assert!(
        store
            .claim_job_lease(job, "a", at(92), at(152))
            .await
            .expect("claim")
    );
}

/// Taking a token's hold and attaching it to a charge happen in one transaction: until it
/// commits, the hold stays the token's (a crash in between loses nothing), and once it
/// commits, the hold is the charge's and the token's is gone.
async fn a_hold_moves_to_its_charge_in_one_transaction(backend: Backend) {
    let (_state, store) = open(backend).await;
    two_tenants(store.as_ref()).await;
    insert(store.as_ref(), &charge("ch_1", "t", "k1", at(0))).await;
    let held = hold("tok_a", "t", 0xC4, at(600));
    store.put_cvc_hold(&held).await.expect("put");

    // Taken and attached, then dropped without commit (as a crash would): nothing moved.
    {
        let mut tx = store.begin().await.expect("begin");
        let taken = tx
            .take_cvc_hold("t", "tok_a", at(0))
            .await
            .expect("take")
            .expect("the hold is live");
        assert_eq!(taken, held);
        tx.attach_charge_cvc("ch_1", &taken).await.expect("attach");
    }
    assert!(
        store
            .charge_cvc("ch_1", at(0))
            .await
            .expect("read")
            .is_none(),
        "an uncommitted move attaches nothing"
    );

    // Committed: the charge has the CVC, the token's hold is gone.
    let mut tx = store.begin().await.expect("begin");
    let taken = tx
        .take_cvc_hold("t", "tok_a", at(0))
        .await
        .expect("take")
        .expect("the hold is still the token's");
    tx.attach_charge_cvc("ch_1", &taken).await.expect("attach");
    tx.commit().await.expect("commit");
    assert_eq!(
        store.charge_cvc("ch_1", at(0)).await.expect("read"),
        Some(held)
    );
    assert!(
        store
            .take_cvc_hold("t", "tok_a", at(0))
            .await
            .expect("take again")
            .is_none(),
        "the hold moved: the token has none left"
    );
}
