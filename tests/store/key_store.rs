//! The store's key-management contract, on both backends: what each KEK version wraps,
//! rewraps and DEK rotation by compare-and-set, encryption reservations, re-encryption and
//! destruction of retired DEKs, leased key jobs, dual-control requests and crypto-shredding.

use std::sync::Arc;

use cardvault::store::{
    AuditKeyRow, CardRow, DekRow, DekUsage, KekUsage, KeyJobKind, KeyJobRow, KeyJobState,
    KeyRequestKind, KeyRequestRow, KeyRequestState, Rewrap, SealedRecord, Shredded, Store,
    StoreError, TenantRow,
};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use cardvault_test_support::database::Backend;

use crate::{
    on_both_backends,
    store::{api_key, card, open, principal, t0, tenant},
};

on_both_backends!(
    kek_usage_counts_what_each_version_wraps_and_follows_rewraps,
    keys_not_under_a_version_page_by_id_and_stale_rewraps_are_skipped,
    rotating_a_dek_retires_the_old_one_unless_another_rotation_came_first,
    encryptions_are_reserved_up_to_the_limit_and_only_under_the_active_dek,
    records_page_by_token_and_are_replaced_only_while_still_under_the_old_dek,
    a_dek_is_destroyed_only_once_retired_before_the_cutoff_and_unused,
    one_job_runs_per_kind_and_only_its_lease_holder_moves_it,
    key_jobs_lists_running_jobs_and_the_most_recent_others_newest_first,
    two_replicas_claiming_one_job_at_once_get_it_once,
    a_dual_control_request_is_pending_until_expiry_and_decided_once,
    shredding_a_tenant_erases_its_keys_cards_and_access_and_nothing_else,
);

fn at(seconds: i64) -> OffsetDateTime {
    t0() + Duration::seconds(seconds)
}

/// Filler standing for key bytes wrapped under `version`, recognisable when read back.
fn wrapped(version: u32) -> Vec<u8> {
    vec![u8::try_from(version).expect("small version"); 40]
}

/// An active DEK of `tenant_id` wrapped under `version`, with a fresh id.
fn dek(tenant_id: &str, version: u32, created_at: OffsetDateTime) -> DekRow {
    DekRow {
        id: Uuid::new_v4(),
        tenant_id: tenant_id.to_owned(),
        kek_version: version,
        wrapped_key: wrapped(version),
        active: true,
        created_at,
        reserved: 0,
        retired_at: None,
    }
}

fn rewrap(id: impl Into<String>, old_version: u32, new_version: u32) -> Rewrap {
    Rewrap {
        id: id.into(),
        old_version,
        new_version,
        wrapped: wrapped(new_version),
    }
}

fn usage(version: u32, deks: u64, tenant_secrets: u64, audit_keys: u64, records: u64) -> KekUsage {
    KekUsage {
        version,
        deks,
        tenant_secrets,
        audit_keys,
        records,
    }
}

/// A card of `tenant_id` sealed by `dek`.
fn sealed(token: &str, tenant_id: &str, dek: Uuid) -> CardRow {
    CardRow {
        tenant_id: tenant_id.to_owned(),
        ..card(token, false, dek)
    }
}

fn job(id: &str, kind: &str, state: &str, created_at: OffsetDateTime) -> KeyJobRow {
    KeyJobRow {
        id: id.to_owned(),
        kind: KeyJobKind::parse(kind).expect("a job kind"),
        state: KeyJobState::parse(state).expect("a job state"),
        tenant_id: None,
        done: 0,
        total: 10,
        requested_by: "p_admin".to_owned(),
        lease_owner: None,
        lease_until: None,
        created_at,
        updated_at: created_at,
        finished_at: (state != "running").then_some(created_at),
        error: None,
    }
}

fn request(id: &str, requested_at: OffsetDateTime, expires_at: OffsetDateTime) -> KeyRequestRow {
    KeyRequestRow {
        id: id.to_owned(),
        kind: KeyRequestKind::ShredTenant,
        target: "t".to_owned(),
        requested_by: "p_alice".to_owned(),
        requested_at,
        expires_at,
        state: KeyRequestState::Pending,
        decided_by: None,
        decided_at: None,
        tenant_id: Some("t".to_owned()),
        params: Some("{\"name\":\"x\"}".to_owned()),
    }
}

async fn insert_tenant(store: &dyn Store, id: &str, secret_version: u32) {
    let row = TenantRow {
        secret_kek_version: secret_version,
        wrapped_secret: wrapped(secret_version),
        ..tenant(id)
    };
    assert!(store.insert_tenant(&row).await.expect("tenant"), "{id}");
}

async fn insert_dek(store: &dyn Store, row: &DekRow) {
    assert!(store.insert_active_dek(row).await.expect("dek"));
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

fn tokens(records: &[SealedRecord]) -> Vec<&str> {
    records.iter().map(|r| r.token.as_str()).collect()
}

async fn kek_usage_counts_what_each_version_wraps_and_follows_rewraps(backend: Backend) {
    let (_state, store) = open(backend).await;
    assert!(
        store.kek_usage().await.expect("usage").is_empty(),
        "nothing stored, no version"
    );

    insert_tenant(store.as_ref(), "a", 1).await;
    insert_tenant(store.as_ref(), "b", 2).await;
    let a1 = dek("a", 1, at(0));
    insert_dek(store.as_ref(), &a1).await;
    let a2 = dek("a", 2, at(1));
    assert!(
        store
            .rotate_dek("a", Some(a1.id), &a2, at(1))
            .await
            .expect("rotate")
    );
    let b2 = dek("b", 2, at(0));
    insert_dek(store.as_ref(), &b2).await;
    store_cards(
        store.as_ref(),
        &[
            sealed("tok_a1", "a", a1.id),
            sealed("tok_a2", "a", a1.id),
            sealed("tok_b1", "b", b2.id),
        ],
    )
    .await;
    let mut tx = store.begin().await.expect("begin");
    let audit_key = AuditKeyRow {
        kek_version: 3,
        wrapped_key: wrapped(3),
        shards: 2,
        created_at: t0(),
    };
    assert!(tx.insert_audit_key(&audit_key).await.expect("audit key"));
    tx.commit().await.expect("commit");

    assert_eq!(
        store.kek_usage().await.expect("usage"),
        [
            usage(1, 1, 1, 0, 2),
            // The retired DEK of `a` counts as much as an active one.
            usage(2, 2, 1, 0, 1),
            usage(3, 0, 0, 1, 0),
        ]
    );

    // Move everything off version 1: it is no longer listed at all.
    assert_eq!(
        store
            .rewrap_deks(&[rewrap(a1.id.to_string(), 1, 3)])
            .await
            .expect("rewrap deks"),
        1
    );
    assert_eq!(
        store
            .rewrap_tenant_secrets(&[rewrap("a", 1, 3)])
            .await
            .expect("rewrap secrets"),
        1
    );
    let after = store.kek_usage().await.expect("usage");
    assert_eq!(after, [usage(2, 2, 1, 0, 1), usage(3, 1, 1, 1, 2)]);
    assert!(after.iter().all(KekUsage::in_use));

    // The audit key by compare-and-set too (its id is ignored).
    assert!(
        !store
            .rewrap_audit_key(&rewrap("ignored", 2, 4))
            .await
            .expect("stale"),
        "the audit key is not under version 2"
    );
    assert!(
        store
            .rewrap_audit_key(&rewrap("ignored", 3, 4))
            .await
            .expect("rewrap audit key")
    );
    assert_eq!(
        store.audit_key().await.expect("audit key"),
        Some(AuditKeyRow {
            kek_version: 4,
            wrapped_key: wrapped(4),
            ..audit_key
        })
    );
    assert_eq!(
        store.kek_usage().await.expect("usage"),
        [
            usage(2, 2, 1, 0, 1),
            usage(3, 1, 1, 0, 2),
            usage(4, 0, 0, 1, 0)
        ]
    );
}

/// The rewrap job reads a page of keys not yet under the new version, rewraps it, and asks
/// again: each page starts where the last left off because the rewrapped keys drop out.
async fn keys_not_under_a_version_page_by_id_and_stale_rewraps_are_skipped(backend: Backend) {
    let (_state, store) = open(backend).await;
    let mut old_deks = Vec::new();
    for i in 0..5 {
        let id = format!("t{i}");
        insert_tenant(store.as_ref(), &id, 1).await;
        let row = dek(&id, 1, t0());
        insert_dek(store.as_ref(), &row).await;
        old_deks.push(row);
    }
    insert_tenant(store.as_ref(), "z", 2).await;
    insert_dek(store.as_ref(), &dek("z", 2, t0())).await;
    insert_tenant(store.as_ref(), "s", 1).await;
    let mut tx = store.begin().await.expect("begin");
    tx.shred_tenant("s", t0()).await.expect("shred");
    tx.commit().await.expect("commit");
    old_deks.sort_by_key(|d| d.id);

    let mut seen = Vec::new();
    loop {
        let page = store.deks_not_under(2, 2).await.expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2, "a page holds at most `limit` keys");
        let rewraps: Vec<Rewrap> = page
            .iter()
            .map(|d| rewrap(d.id.to_string(), d.kek_version, 2))
            .collect();
        assert_eq!(
            store.rewrap_deks(&rewraps).await.expect("rewrap"),
            page.len() as u64
        );
        seen.extend(page);
    }
    assert_eq!(seen, old_deks, "every DEK once, by id, as it was read");
    for d in &old_deks {
        let now = store.dek(&d.tenant_id, d.id).await.expect("read");
        assert_eq!(
            now,
            Some(DekRow {
                kek_version: 2,
                wrapped_key: wrapped(2),
                ..d.clone()
            })
        );
    }

    // Compare-and-set: a rewrap read under a version the key no longer has is skipped, the
    // others in the same batch still apply.
    let (first, second) = (&old_deks[0], &old_deks[1]);
    let batch = [
        rewrap(first.id.to_string(), 1, 3),
        rewrap(second.id.to_string(), 2, 3),
        rewrap("not-a-uuid", 2, 3),
        rewrap(Uuid::new_v4().to_string(), 2, 3),
    ];
    assert_eq!(store.rewrap_deks(&batch).await.expect("rewrap"), 1);
    assert_eq!(store.rewrap_deks(&[]).await.expect("empty"), 0);
    let first_now = store.dek(&first.tenant_id, first.id).await.expect("read");
    assert_eq!(
        first_now.map(|d| (d.kek_version, d.wrapped_key)),
        Some((2, wrapped(2)))
    );
    let second_now = store.dek(&second.tenant_id, second.id).await.expect("read");
    assert_eq!(
        second_now.map(|d| (d.kek_version, d.wrapped_key)),
        Some((3, wrapped(3)))
    );

    // Tenant secrets the same way; a shredded tenant has no secret left to rewrap.
    let mut seen = Vec::new();
    loop {
        let page = store.tenants_not_under(2, 2).await.expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        let rewraps: Vec<Rewrap> = page
            .iter()
            .map(|t| rewrap(t.id.clone(), t.secret_kek_version, 2))
            .collect();
        assert_eq!(
            store.rewrap_tenant_secrets(&rewraps).await.expect("rewrap"),
            page.len() as u64
        );
        seen.extend(page.into_iter().map(|t| t.id));
    }
    assert_eq!(seen, ["t0", "t1", "t2", "t3", "t4"]);
    assert_eq!(
        store.tenant("t3").await.expect("read"),
        Some(TenantRow {
            secret_kek_version: 2,
            wrapped_secret: wrapped(2),
            ..tenant("t3")
        })
    );
    let batch = [
        rewrap("t0", 1, 3),
        rewrap("s", 1, 3),
        rewrap("nobody", 2, 3),
    ];
    assert_eq!(
        store.rewrap_tenant_secrets(&batch).await.expect("stale"),
        0,
        "stale, shredded and unknown tenants are all skipped"
    );
    let shredded = store.tenant("s").await.expect("read").expect("row");
    assert!(shredded.wrapped_secret.is_empty());
    assert_eq!(store.rewrap_tenant_secrets(&[]).await.expect("empty"), 0);
}

async fn rotating_a_dek_retires_the_old_one_unless_another_rotation_came_first(backend: Backend) {
    let (_state, store) = open(backend).await;
    insert_tenant(store.as_ref(), "t", 1).await;
    insert_tenant(store.as_ref(), "u", 1).await;

    let d1 = DekRow {
        reserved: 5,
        ..dek("t", 1, at(0))
    };
    assert!(
        store
            .rotate_dek("t", None, &d1, at(0))
            .await
            .expect("first"),
        "a tenant's first DEK"
    );
    assert_eq!(
        store.active_dek("t").await.expect("read"),
        Some(d1.clone()),
        "every field round-trips, `reserved` included"
    );
    let other = dek("t", 1, at(0));
    assert!(
        !store
            .rotate_dek("t", None, &other, at(0))
            .await
            .expect("none expected"),
        "`None` expects no active DEK"
    );
    assert!(store.dek("t", other.id).await.expect("read").is_none());

    let d2 = dek("t", 1, at(3600));
    assert!(
        store
            .rotate_dek("t", Some(d1.id), &d2, at(3600))
            .await
            .expect("rotate")
    );
    let d1_retired = DekRow {
        active: false,
        retired_at: Some(at(3600)),
        ..d1.clone()
    };
    assert_eq!(
        store.dek("t", d1.id).await.expect("read"),
        Some(d1_retired.clone())
    );
    assert_eq!(store.active_dek("t").await.expect("read"), Some(d2.clone()));

    // Another replica already rotated d1 away: nothing changes.
    let d3 = dek("t", 1, at(7200));
    assert!(
        !store
            .rotate_dek("t", Some(d1.id), &d3, at(7200))
            .await
            .expect("stale")
    );
    assert_eq!(
        store.dek("t", d1.id).await.expect("read"),
        Some(d1_retired.clone()),
        "retired_at is the first retirement's"
    );
    assert_eq!(store.active_dek("t").await.expect("read"), Some(d2.clone()));
    assert!(store.dek("t", d3.id).await.expect("read").is_none());
    // A DEK of another tenant is not this tenant's to retire.
    assert!(
        !store
            .rotate_dek("u", Some(d2.id), &dek("u", 1, at(7200)), at(7200))
            .await
            .expect("other tenant")
    );
    assert!(store.active_dek("u").await.expect("read").is_none());
    assert_eq!(store.active_dek("t").await.expect("read"), Some(d2.clone()));

    // Two replicas rotating from the same DEK at once: one wins, the other changes nothing.
    let (x, y) = (dek("t", 1, at(9000)), dek("t", 1, at(9000)));
    let (rx, ry) = tokio::join!(
        store.rotate_dek("t", Some(d2.id), &x, at(9000)),
        store.rotate_dek("t", Some(d2.id), &y, at(9000)),
    );
    let (rx, ry) = (rx.expect("x"), ry.expect("y"));
    assert!(rx != ry, "exactly one rotation wins: {rx} {ry}");
    let (winner, loser) = if rx { (x, y) } else { (y, x) };
    assert_eq!(
        store.active_dek("t").await.expect("read"),
        Some(winner.clone())
    );
    assert!(store.dek("t", loser.id).await.expect("read").is_none());
    // And two replicas creating a tenant's first DEK at once.
    let (p, q) = (dek("u", 1, at(0)), dek("u", 1, at(0)));
    let (rp, rq) = tokio::join!(
        store.rotate_dek("u", None, &p, at(0)),
        store.rotate_dek("u", None, &q, at(0)),
    );
    assert!(rp.expect("p") != rq.expect("q"), "exactly one first DEK");

    let d2_retired = DekRow {
        active: false,
        retired_at: Some(at(9000)),
        ..d2.clone()
    };
    assert_eq!(
        store.retired_deks(Some("t")).await.expect("retired"),
        [d1_retired.clone(), d2_retired.clone()],
        "oldest first"
    );
    assert!(
        store
            .retired_deks(Some("u"))
            .await
            .expect("retired")
            .is_empty()
    );
    assert_eq!(
        store.retired_deks(None).await.expect("retired"),
        [d1_retired.clone(), d2_retired.clone()]
    );
    let listed: Vec<(Uuid, u64)> = store
        .dek_usage(Some("t"))
        .await
        .expect("usage")
        .into_iter()
        .map(|u| (u.dek.id, u.records))
        .collect();
    assert_eq!(
        listed,
        [(winner.id, 0), (d2.id, 0), (d1.id, 0)],
        "active first, then newest first"
    );
    let everyone = store.dek_usage(None).await.expect("usage");
    assert_eq!(everyone.len(), 4);
    assert!(everyone[..3].iter().all(|u| u.dek.tenant_id == "t"));
    assert_eq!(everyone[3].dek.tenant_id, "u", "ordered by tenant first");
}

async fn encryptions_are_reserved_up_to_the_limit_and_only_under_the_active_dek(backend: Backend) {
    let (_state, store) = open(backend).await;
    insert_tenant(store.as_ref(), "t", 1).await;
    let d1 = dek("t", 1, at(0));
    insert_dek(store.as_ref(), &d1).await;

    let reserve = |dek: Uuid, count: u64, max: u64| {
        let store = Arc::clone(&store);
        async move {
            store
                .reserve_encryptions(dek, count, max)
                .await
                .expect("reserve")
        }
    };
    assert_eq!(reserve(d1.id, 40, 100).await, Some(40));
    assert_eq!(reserve(d1.id, 40, 100).await, Some(80));
    assert_eq!(reserve(d1.id, 40, 100).await, None, "would pass the limit");
    assert_eq!(
        reserve(d1.id, 20, 100).await,
        Some(100),
        "up to the limit exactly"
    );
    assert_eq!(reserve(d1.id, 1, 100).await, None);
    assert_eq!(reserve(d1.id, 200, 100).await, None, "more than the limit");
    assert_eq!(
        store
            .dek("t", d1.id)
            .await
            .expect("read")
            .map(|d| d.reserved),
        Some(100)
    );

    let d2 = dek("t", 1, at(60));
    assert!(
        store
            .rotate_dek("t", Some(d1.id), &d2, at(60))
            .await
            .expect("rotate")
    );
    assert_eq!(
        reserve(d1.id, 1, 1000).await,
        None,
        "a retired DEK hands out nothing"
    );
    assert_eq!(
        store
            .dek("t", d1.id)
            .await
            .expect("read")
            .map(|d| d.reserved),
        Some(100)
    );
    assert_eq!(reserve(Uuid::new_v4(), 1, 100).await, None, "unknown DEK");

    // Replicas reserving at once never hand out more than the limit between them.
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(reserve(d2.id, 10, 50)))
        .collect();
    let mut granted = Vec::new();
    for task in tasks {
        if let Some(reserved) = task.await.expect("task") {
            granted.push(reserved);
        }
    }
    granted.sort_unstable();
    assert_eq!(granted, [10, 20, 30, 40, 50]);
    assert_eq!(
        store
            .dek("t", d2.id)
            .await
            .expect("read")
            .map(|d| d.reserved),
        Some(50)
    );
}

async fn records_page_by_token_and_are_replaced_only_while_still_under_the_old_dek(
    backend: Backend,
) {
    let (_state, store) = open(backend).await;
    insert_tenant(store.as_ref(), "t", 1).await;
    insert_tenant(store.as_ref(), "u", 1).await;
    let d1 = dek("t", 1, at(0));
    insert_dek(store.as_ref(), &d1).await;
    let u1 = dek("u", 1, at(0));
    insert_dek(store.as_ref(), &u1).await;
    let mut rows: Vec<CardRow> = (1..=5)
        .map(|i| sealed(&format!("tok_{i}"), "t", d1.id))
        .collect();
    rows.push(sealed("tok_u", "u", u1.id));
    store_cards(store.as_ref(), &rows).await;
    let d2 = dek("t", 1, at(60));
    assert!(
        store
            .rotate_dek("t", Some(d1.id), &d2, at(60))
            .await
            .expect("rotate")
    );

    let page = |after: &'static str, limit| {
        let store = Arc::clone(&store);
        async move {
            store
                .records_under(d1.id, after, limit)
                .await
                .expect("page")
        }
    };
    let first = page("", 2).await;
    assert_eq!(
        first[0],
        SealedRecord {
            token: "tok_1".to_owned(),
            tenant_id: "t".to_owned(),
            dek_id: d1.id,
            ciphertext: rows[0].ciphertext.clone(),
        }
    );
    assert_eq!(tokens(&first), ["tok_1", "tok_2"]);
    assert_eq!(tokens(&page("tok_2", 2).await), ["tok_3", "tok_4"]);
    assert_eq!(tokens(&page("tok_4", 2).await), ["tok_5"]);
    assert!(page("tok_5", 2).await.is_empty());
    assert_eq!(
        tokens(&store.records_under(u1.id, "", 10).await.expect("page")),
        ["tok_u"]
    );

    let resealed = |token: &str| SealedRecord {
        token: token.to_owned(),
        tenant_id: "t".to_owned(),
        dek_id: d2.id,
        ciphertext: vec![9, 9, 9],
    };
    assert_eq!(
        store
            .replace_records(d1.id, &[resealed("tok_1"), resealed("tok_2")])
            .await
            .expect("replace"),
        2
    );
    let now = OffsetDateTime::now_utc();
    assert_eq!(
        store.card("t", "tok_1", now).await.expect("read"),
        Some(CardRow {
            dek_id: d2.id,
            ciphertext: vec![9, 9, 9],
            ..rows[0].clone()
        }),
        "only the DEK and the sealed record change"
    );

    // Compare-and-set: a record no longer under the old DEK, or named with another tenant,
    // or not there at all, is left alone.
    let stale = SealedRecord {
        ciphertext: vec![8],
        ..resealed("tok_1")
    };
    let other_tenant = SealedRecord {
        tenant_id: "u".to_owned(),
        ..resealed("tok_3")
    };
    assert_eq!(
        store
            .replace_records(d1.id, &[stale, other_tenant, resealed("tok_none")])
            .await
            .expect("replace"),
        0
    );
    assert_eq!(
        store
            .card("t", "tok_1", now)
            .await
            .expect("read")
            .map(|c| c.ciphertext),
        Some(vec![9, 9, 9])
    );
    assert_eq!(
        store.card("t", "tok_3", now).await.expect("read"),
        Some(rows[2].clone())
    );
    assert_eq!(store.replace_records(d1.id, &[]).await.expect("empty"), 0);

    assert_eq!(tokens(&page("", 10).await), ["tok_3", "tok_4", "tok_5"]);
    let counts: Vec<DekUsage> = store.dek_usage(Some("t")).await.expect("usage");
    assert_eq!(
        counts,
        [
            DekUsage {
                dek: d2.clone(),
                records: 2
            },
            DekUsage {
                dek: DekRow {
                    active: false,
                    retired_at: Some(at(60)),
                    ..d1.clone()
                },
                records: 3
            },
        ]
    );
}

async fn a_dek_is_destroyed_only_once_retired_before_the_cutoff_and_unused(backend: Backend) {
    let (_state, store) = open(backend).await;
    insert_tenant(store.as_ref(), "t", 1).await;
    let d1 = dek("t", 1, at(0));
    insert_dek(store.as_ref(), &d1).await;
    store_cards(store.as_ref(), &[sealed("tok_1", "t", d1.id)]).await;
    let far = at(1_000_000);

    assert!(
        !store.destroy_dek(d1.id, far).await.expect("active"),
        "the active DEK stays"
    );
    let retired_at = at(3600);
    let d2 = dek("t", 1, retired_at);
    assert!(
        store
            .rotate_dek("t", Some(d1.id), &d2, retired_at)
            .await
            .expect("rotate")
    );
    assert!(
        !store.destroy_dek(d1.id, far).await.expect("in use"),
        "a record still needs it"
    );
    let moved = SealedRecord {
        token: "tok_1".to_owned(),
        tenant_id: "t".to_owned(),
        dek_id: d2.id,
        ciphertext: vec![4, 5, 6],
    };
    assert_eq!(
        store
            .replace_records(d1.id, std::slice::from_ref(&moved))
            .await
            .expect("move"),
        1
    );
    assert!(
        !store
            .destroy_dek(d1.id, retired_at)
            .await
            .expect("at cutoff"),
        "retired at the cutoff is not before it"
    );
    assert!(
        !store
            .destroy_dek(d1.id, retired_at - Duration::seconds(1))
            .await
            .expect("before")
    );
    assert!(
        store
            .destroy_dek(d1.id, retired_at + Duration::seconds(1))
            .await
            .expect("destroy")
    );
    assert!(store.dek("t", d1.id).await.expect("read").is_none());
    assert!(
        !store.destroy_dek(d1.id, far).await.expect("again"),
        "already gone"
    );
    assert!(!store.destroy_dek(d2.id, far).await.expect("active"));

    // A card sealed by a retired DEK still being committed (a replica that reserved
    // encryptions before the rotation) keeps the DEK: refused, not failed.
    let d3 = dek("t", 1, at(7200));
    assert!(
        store
            .rotate_dek("t", Some(d2.id), &d3, at(7200))
            .await
            .expect("rotate")
    );
    let moved_on = SealedRecord {
        dek_id: d3.id,
        ..moved
    };
    assert_eq!(
        store
            .replace_records(d2.id, std::slice::from_ref(&moved_on))
            .await
            .expect("move"),
        1,
        "d2 now seals nothing committed"
    );
    let mut tx = store.begin().await.expect("begin");
    let late = sealed("tok_late", "t", d2.id);
    tx.insert_card(&late).await.expect("insert");
    let destroyer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.destroy_dek(d2.id, far).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    tx.commit().await.expect("commit");
    assert!(!destroyer.await.expect("task").expect("refused, not failed"));
    assert!(store.dek("t", d2.id).await.expect("read").is_some());
    let now = OffsetDateTime::now_utc();
    assert!(
        store
            .card("t", "tok_late", now)
            .await
            .expect("read")
            .is_some()
    );
}

async fn one_job_runs_per_kind_and_only_its_lease_holder_moves_it(backend: Backend) {
    let (_state, store) = open(backend).await;
    let j1 = job("kj_1", "rewrap", "running", at(0));
    assert!(store.insert_key_job(&j1).await.expect("insert"));
    assert!(
        !store
            .insert_key_job(&job("kj_2", "rewrap", "running", at(0)))
            .await
            .expect("second rewrap"),
        "one running job of a kind"
    );
    let j3 = KeyJobRow {
        tenant_id: Some("t".to_owned()),
        ..job("kj_3", "reencrypt", "running", at(1))
    };
    assert!(store.insert_key_job(&j3).await.expect("other kind"));
    let err = store
        .insert_key_job(&job("kj_1", "rewrap", "done", at(2)))
        .await
        .expect_err("an id taken is an error, not a running job");
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");

    let claim = |owner: &'static str, now: i64, until: i64| {
        let store = Arc::clone(&store);
        async move {
            store
                .claim_key_job(owner, at(now), at(until))
                .await
                .expect("claim")
        }
    };
    assert_eq!(
        claim("r1", 10, 40).await,
        Some(KeyJobRow {
            lease_owner: Some("r1".to_owned()),
            lease_until: Some(at(40)),
            updated_at: at(10),
            ..j1.clone()
        }),
        "the oldest job first"
    );
    let taken = claim("r2", 20, 50).await.expect("next job");
    assert_eq!(taken.id, "kj_3", "a job with a live lease is skipped");
    assert_eq!(taken.tenant_id.as_deref(), Some("t"));
    assert!(claim("r3", 20, 50).await.is_none(), "every job is leased");
    let renewed = claim("r1", 30, 70).await.expect("renew");
    assert_eq!(
        (renewed.id.as_str(), renewed.lease_until),
        ("kj_1", Some(at(70))),
        "a holder renews its own lease"
    );

    // Progress only by the holder.
    assert!(
        !store
            .key_job_progress("kj_1", "r2", 5, 12, at(99))
            .await
            .expect("progress")
    );
    assert!(
        store
            .key_job_progress("kj_1", "r1", 5, 12, at(80))
            .await
            .expect("progress")
    );
    let listed = store.key_jobs(10).await.expect("jobs");
    let row = listed.iter().find(|j| j.id == "kj_1").expect("kj_1");
    assert_eq!(
        (
            row.done,
            row.total,
            row.lease_owner.as_deref(),
            row.lease_until
        ),
        (5, 12, Some("r1"), Some(at(80)))
    );

    // A lapsed lease passes to another replica, and the old holder is locked out.
    assert_eq!(
        claim("r3", 60, 200).await.map(|j| j.id),
        Some("kj_3".to_owned())
    );
    assert!(
        !store
            .key_job_progress("kj_3", "r2", 1, 10, at(100))
            .await
            .expect("progress")
    );
    assert!(
        claim("r2", 80, 200).await.is_none(),
        "a lease is live until its last instant"
    );
    assert_eq!(
        claim("r2", 81, 200).await.map(|j| j.id),
        Some("kj_1".to_owned())
    );
    assert!(
        !store
            .key_job_progress("kj_1", "r1", 6, 12, at(200))
            .await
            .expect("progress")
    );
    assert!(
        !store
            .finish_key_job("kj_1", "r1", KeyJobState::Done, None, at(90))
            .await
            .expect("finish")
    );

    assert!(
        store
            .finish_key_job("kj_1", "r2", KeyJobState::Done, None, at(90))
            .await
            .expect("finish")
    );
    assert!(
        !store
            .finish_key_job("kj_1", "r2", KeyJobState::Done, None, at(91))
            .await
            .expect("again"),
        "a finished job stays finished"
    );
    assert!(
        store
            .finish_key_job(
                "kj_3",
                "r3",
                KeyJobState::Failed,
                Some("KEK version 1 unavailable"),
                at(95)
            )
            .await
            .expect("fail")
    );
    let listed = store.key_jobs(10).await.expect("jobs");
    assert_eq!(
        listed,
        [
            KeyJobRow {
                state: KeyJobState::Failed,
                lease_owner: None,
                lease_until: None,
                updated_at: at(95),
                finished_at: Some(at(95)),
                error: Some("KEK version 1 unavailable".to_owned()),
                ..j3.clone()
            },
            KeyJobRow {
                state: KeyJobState::Done,
                done: 5,
                total: 12,
                lease_owner: None,
                lease_until: None,
                updated_at: at(90),
                finished_at: Some(at(90)),
                ..j1.clone()
            },
        ]
    );
    assert!(claim("r1", 100, 200).await.is_none(), "nothing is running");
    assert!(
        store
            .insert_key_job(&job("kj_4", "rewrap", "running", at(100)))
            .await
            .expect("insert"),
        "a new rewrap may start once the last one ended"
    );
}

async fn key_jobs_lists_running_jobs_and_the_most_recent_others_newest_first(backend: Backend) {
    let (_state, store) = open(backend).await;
    let rows = [
        job("kj_run", "rewrap", "running", at(0)),
        job("kj_a", "rewrap", "done", at(10)),
        job("kj_b", "reencrypt", "failed", at(20)),
        job("kj_c", "rewrap", "done", at(30)),
        job("kj_d", "reencrypt", "running", at(40)),
    ];
    for row in &rows {
        assert!(store.insert_key_job(row).await.expect("insert"));
    }
    let ids = |jobs: Vec<KeyJobRow>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.key_jobs(2).await.expect("jobs")),
        ["kj_d", "kj_c", "kj_b", "kj_run"],
        "an old running job is listed however many finished since"
    );
    assert_eq!(
        ids(store.key_jobs(0).await.expect("jobs")),
        ["kj_d", "kj_run"]
    );
    let all = store.key_jobs(10).await.expect("jobs");
    let mut expected = rows.to_vec();
    expected.reverse();
    assert_eq!(all, expected, "every field round-trips");
}

/// Replicas race for a job as soon as it is started; the lease must go to one of them. On
/// PostgreSQL both may pick the same candidate, and only the re-checked outer WHERE stops the
/// second from taking it too.
async fn two_replicas_claiming_one_job_at_once_get_it_once(backend: Backend) {
    let (_state, store) = open(backend).await;
    for round in 0..20 {
        let row = job(&format!("kj_race{round}"), "rewrap", "running", at(round));
        assert!(store.insert_key_job(&row).await.expect("insert"));
        let now = at(round);
        let until = now + Duration::seconds(30);
        let (a, b) = tokio::join!(
            store.claim_key_job("r1", now, until),
            store.claim_key_job("r2", now, until),
        );
        let (owner, claimed) = match (a.expect("r1"), b.expect("r2")) {
            (Some(j), None) => ("r1", j),
            (None, Some(j)) => ("r2", j),
            other => panic!("round {round}: expected one claim, got {other:?}"),
        };
        assert_eq!(claimed.id, row.id);
        assert_eq!(claimed.lease_owner.as_deref(), Some(owner));
        assert!(
            store
                .finish_key_job(&row.id, owner, KeyJobState::Done, None, now)
                .await
                .expect("finish")
        );
    }
}

async fn a_dual_control_request_is_pending_until_expiry_and_decided_once(backend: Backend) {
    let (_state, store) = open(backend).await;
    let r1 = request("kr_1", at(0), at(3600));
    let r2 = request("kr_2", at(60), at(120));
    let r3 = KeyRequestRow {
        kind: KeyRequestKind::RetireKek,
        target: "1".to_owned(),
        ..request("kr_3", at(120), at(3600))
    };
    let mut tx = store.begin().await.expect("begin");
    for row in [&r3, &r1, &r2] {
        tx.insert_key_request(row).await.expect("insert");
    }
    tx.commit().await.expect("commit");
    let mut tx = store.begin().await.expect("begin");
    assert!(
        tx.insert_key_request(&r1).await.is_err(),
        "a request id is unique"
    );
    drop(tx);

    assert_eq!(
        store.pending_key_requests(at(100)).await.expect("pending"),
        [r1.clone(), r2.clone(), r3.clone()],
        "oldest first"
    );
    assert_eq!(
        store.pending_key_requests(at(120)).await.expect("pending"),
        [r1.clone(), r3.clone()],
        "expired at its expiry instant"
    );
    assert_eq!(
        store.key_request("kr_2").await.expect("read"),
        Some(r2.clone())
    );
    assert!(store.key_request("kr_none").await.expect("read").is_none());

    let mut tx = store.begin().await.expect("begin");
    assert!(
        tx.decide_key_request("kr_1", KeyRequestState::Executed, "p_bob", at(300))
            .await
            .expect("decide")
    );
    assert!(
        !tx.decide_key_request("kr_1", KeyRequestState::Expired, "p_carol", at(301))
            .await
            .expect("again"),
        "decided once"
    );
    assert!(
        !tx.decide_key_request("kr_none", KeyRequestState::Executed, "p_bob", at(300))
            .await
            .expect("unknown")
    );
    tx.commit().await.expect("commit");

    // A decision rolled back leaves the request pending.
    let mut tx = store.begin().await.expect("begin");
    assert!(
        tx.decide_key_request("kr_3", KeyRequestState::Executed, "p_bob", at(310))
            .await
            .expect("decide")
    );
    drop(tx);

    let decided = KeyRequestRow {
        state: KeyRequestState::Executed,
        decided_by: Some("p_bob".to_owned()),
        decided_at: Some(at(300)),
        ..r1.clone()
    };
    assert_eq!(
        store.key_request("kr_1").await.expect("read"),
        Some(decided)
    );
    assert_eq!(
        store.pending_key_requests(at(400)).await.expect("pending"),
        [r3]
    );
}

async fn shredding_a_tenant_erases_its_keys_cards_and_access_and_nothing_else(backend: Backend) {
    let (_state, store) = open(backend).await;
    insert_tenant(store.as_ref(), "t", 1).await;
    insert_tenant(store.as_ref(), "u", 1).await;
    let t1 = dek("t", 1, at(0));
    insert_dek(store.as_ref(), &t1).await;
    let t2 = dek("t", 1, at(60));
    assert!(
        store
            .rotate_dek("t", Some(t1.id), &t2, at(60))
            .await
            .expect("rotate")
    );
    let u1 = dek("u", 1, at(0));
    insert_dek(store.as_ref(), &u1).await;
    let u_card = sealed("tok_u", "u", u1.id);
    store_cards(
        store.as_ref(),
        &[
            sealed("tok_t1", "t", t1.id),
            sealed("tok_t2", "t", t2.id),
            sealed("tok_t3", "t", t2.id),
            u_card.clone(),
        ],
    )
    .await;

    let early = at(100);
    let keys = [
        api_key("k_t1", "p_t1", at(0)),
        api_key("k_t2", "p_t1", at(1)),
        api_key("k_t3", "p_t2", at(0)),
        api_key("k_u", "p_u", at(0)),
    ];
    let mut tx = store.begin().await.expect("begin");
    for p in [
        principal("p_t1", "t", "app", None),
        principal("p_t2", "t", "old-app", None),
        principal("p_u", "u", "app", None),
    ] {
        assert!(tx.insert_principal(&p).await.expect("principal"));
    }
    for key in &keys {
        tx.insert_api_key(key).await.expect("key");
    }
    assert!(tx.revoke_principal("p_t2", early).await.expect("revoke"));
    tx.commit().await.expect("commit");
    assert_eq!(
        store.kek_usage().await.expect("usage"),
        [usage(1, 3, 2, 0, 4)]
    );

    let shred_at = at(86_400);
    let mut tx = store.begin().await.expect("begin");
    let shredded = tx.shred_tenant("t", shred_at).await.expect("shred");
    tx.commit().await.expect("commit");
    assert_eq!(
        shredded,
        Shredded {
            cards: 3,
            deks: 2,
            principals: 1
        },
        "a principal revoked before is not counted again"
    );

    assert_eq!(
        store.tenant("t").await.expect("read"),
        Some(TenantRow {
            wrapped_secret: Vec::new(),
            shredded_at: Some(shred_at),
            ..tenant("t")
        }),
        "the row stays, its secret erased"
    );
    assert!(store.active_dek("t").await.expect("read").is_none());
    assert!(store.dek("t", t1.id).await.expect("read").is_none());
    assert!(
        store
            .retired_deks(Some("t"))
            .await
            .expect("read")
            .is_empty()
    );
    assert!(store.dek_usage(Some("t")).await.expect("read").is_empty());
    assert!(
        store
            .records_under(t2.id, "", 10)
            .await
            .expect("read")
            .is_empty()
    );
    let now = OffsetDateTime::now_utc();
    assert!(
        store
            .card("t", "tok_t2", now)
            .await
            .expect("read")
            .is_none()
    );

    let revoked_at = |id: &'static str| {
        let store = Arc::clone(&store);
        async move {
            store
                .principal(id)
                .await
                .expect("read")
                .expect("principal")
                .revoked_at
        }
    };
    assert_eq!(revoked_at("p_t1").await, Some(shred_at));
    assert_eq!(
        revoked_at("p_t2").await,
        Some(early),
        "an earlier revocation keeps its time"
    );
    assert_eq!(revoked_at("p_u").await, None);
    let key_revoked_at = |id: &'static str| {
        let store = Arc::clone(&store);
        async move {
            store
                .api_key(id)
                .await
                .expect("read")
                .expect("key")
                .revoked_at
        }
    };
    assert_eq!(key_revoked_at("k_t1").await, Some(shred_at));
    assert_eq!(key_revoked_at("k_t2").await, Some(shred_at));
    assert_eq!(key_revoked_at("k_t3").await, Some(early));
    assert_eq!(key_revoked_at("k_u").await, None);

    // The other tenant is untouched.
    assert_eq!(
        store.tenant("u").await.expect("read"),
        Some(TenantRow {
            wrapped_secret: wrapped(1),
            ..tenant("u")
        })
    );
    assert_eq!(store.active_dek("u").await.expect("read"), Some(u1.clone()));
    assert_eq!(
        store.card("u", "tok_u", now).await.expect("read"),
        Some(u_card)
    );

    assert_eq!(
        store.kek_usage().await.expect("usage"),
        [usage(1, 1, 1, 0, 1)],
        "nothing of the shredded tenant is wrapped any more"
    );
    let not_under: Vec<String> = store
        .tenants_not_under(2, 10)
        .await
        .expect("tenants")
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(not_under, ["u"]);

    // Shredding again finds nothing left, and the first shred time stays.
    let mut tx = store.begin().await.expect("begin");
    assert_eq!(
        tx.shred_tenant("t", shred_at + Duration::days(1))
            .await
            .expect("again"),
        Shredded::default()
    );
    tx.commit().await.expect("commit");
    assert_eq!(
        store
            .tenant("t")
            .await
            .expect("read")
            .and_then(|t| t.shredded_at),
        Some(shred_at)
    );

    // A tenant is never inserted shredded, whatever the row says.
    let fresh = TenantRow {
        shredded_at: Some(shred_at),
        ..tenant("v")
    };
    assert!(store.insert_tenant(&fresh).await.expect("insert"));
    assert_eq!(
        store
            .tenant("v")
            .await
            .expect("read")
            .and_then(|t| t.shredded_at),
        None
    );
}
