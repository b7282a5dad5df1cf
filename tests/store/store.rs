//! The store's own contract, on both backends: insert outcomes, transactions, principals and
//! the audit chains the vault relies on.

use std::sync::Arc;

use cardvault::store::{
    self, ApiKeyRow, AuditCursor, AuditHeadRow, AuditKeyRow, AuditOutcome, AuditRow, CardInsert,
    CardRow, DekRow, ImportedCard, PrincipalRow, Store, StoreError, StoreOptions, TenantRow,
};
use time::{Duration, OffsetDateTime};

use cardvault_test_support::database::{Backend, TestDatabase};

use crate::on_both_backends;

on_both_backends!(
    token_and_canonical_conflicts_are_told_apart,
    a_token_collision_leaves_the_transaction_usable,
    a_transaction_dropped_without_commit_leaves_no_card_and_no_audit_record,
    principal_names_and_mtls_identities_are_unique_among_live_principals,
    revoking_a_principal_revokes_its_live_api_keys,
    audit_chains_page_by_seq_and_by_time_with_a_cursor,
    concurrent_appends_to_one_chain_are_serialized_by_the_head_lock,
    a_batch_insert_stores_what_it_can_and_reports_each_clash,
    a_batch_of_audit_records_extends_one_chain_in_order,
    the_fast_lane_commits_all_or_nothing,
    imported_cards_are_found_by_import_id_within_their_tenant,
);

/// A fixed, whole-second instant: both backends store microseconds, so rows read back
/// compare equal to rows written.
pub(crate) fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("valid timestamp")
}

/// A migrated store on a fresh database. The database is dropped with the first value;
/// keep it alive.
pub(crate) async fn open(backend: Backend) -> (TestDatabase, Arc<dyn Store>) {
    let state = TestDatabase::new(backend).await;
    let store = store::connect(&state.database_url, &StoreOptions::default())
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    (state, store)
}

pub(crate) fn tenant(id: &str) -> TenantRow {
    TenantRow {
        id: id.to_owned(),
        wrapped_secret: vec![0; 8],
        secret_kek_version: 1,
        created_at: t0(),
        shredded_at: None,
    }
}

/// Tenant `t` with an active DEK, whose id is returned.
async fn tenant_with_dek(store: &dyn Store) -> uuid::Uuid {
    assert!(store.insert_tenant(&tenant("t")).await.expect("tenant"));
    let dek = uuid::Uuid::new_v4();
    let row = DekRow {
        id: dek,
        tenant_id: "t".to_owned(),
        kek_version: 1,
        wrapped_key: vec![0; 8],
        active: true,
        created_at: t0(),
        reserved: 0,
        retired_at: None,
    };
    assert!(store.insert_active_dek(&row).await.expect("dek"));
    dek
}

pub(crate) fn card(token: &str, canonical: bool, dek: uuid::Uuid) -> CardRow {
    CardRow {
        token: token.to_owned(),
        tenant_id: "t".to_owned(),
        token_format: "opaque".to_owned(),
        fingerprint: vec![7; 32],
        dek_id: dek,
        ciphertext: vec![1, 2, 3],
        brand: "VISA".to_owned(),
        last4: "4242".to_owned(),
        bin: "42424242".to_owned(),
        exp_month: 12,
        exp_year: 2030,
        metadata: vec![("order".to_owned(), "42".to_owned())],
        canonical,
        created_at: OffsetDateTime::UNIX_EPOCH,
        expires_at: None,
        honeytoken: false,
        import_id: None,
    }
}

pub(crate) fn principal(id: &str, tenant_id: &str, name: &str, mtls: Option<&str>) -> PrincipalRow {
    PrincipalRow {
        id: id.to_owned(),
        tenant_id: tenant_id.to_owned(),
        name: name.to_owned(),
        mtls_identity: mtls.map(str::to_owned),
        permissions: vec!["read".to_owned(), "tokenize".to_owned()],
        created_at: t0(),
        revoked_at: None,
        created_by: Some("local:unverified:test".to_owned()),
        // Round-trips a true flag on one of them (the store does not check permissions).
        global_operator: name == "alice",
    }
}

pub(crate) fn api_key(id: &str, principal_id: &str, created_at: OffsetDateTime) -> ApiKeyRow {
    ApiKeyRow {
        id: id.to_owned(),
        principal_id: principal_id.to_owned(),
        secret_hash: vec![9; 32],
        created_at,
        expires_at: Some(created_at + Duration::days(90)),
        revoked_at: None,
        created_by: Some("p_admin".to_owned()),
    }
}

/// A head whose MACs are recognisable filler: the store stores them, it does not check them.
fn head(shard: u32, seq: u64) -> AuditHeadRow {
    AuditHeadRow {
        shard,
        seq,
        mac: vec![u8::try_from(seq % 256).expect("byte"); 32],
        head_mac: vec![0xAB; 32],
    }
}

fn record(shard: u32, seq: u64, at: OffsetDateTime, tenant_id: &str) -> AuditRow {
    AuditRow {
        shard,
        seq,
        at,
        tenant_id: Some(tenant_id.to_owned()),
        principal: Some("p_1".to_owned()),
        action: "reveal".to_owned(),
        token: Some("tok_a".to_owned()),
        outcome: AuditOutcome::Ok,
        alarm: seq == 2,
        peer: None,
        request_id: Some(format!("req-{shard}-{seq}")),
        detail: None,
        mac: vec![u8::try_from(seq % 256).expect("byte"); 32],
    }
}

/// (shard, seq) of each record, for comparing orders.
fn positions(rows: &[AuditRow]) -> Vec<(u32, u64)> {
    rows.iter().map(|r| (r.shard, r.seq)).collect()
}

/// Pages through `audit_range` `page` records at a time, as an exporter would.
async fn scan(
    store: &dyn Store,
    from: OffsetDateTime,
    to: OffsetDateTime,
    tenant_id: Option<&str>,
    page: u32,
) -> Vec<(u32, u64)> {
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let rows = store
            .audit_range(from, to, tenant_id, after, page)
            .await
            .expect("audit range");
        let Some(last) = rows.last() else {
            return seen;
        };
        assert!(
            rows.len() <= page as usize,
            "a page holds at most `limit` rows"
        );
        after = Some(AuditCursor {
            at: last.at,
            shard: last.shard,
            seq: last.seq,
        });
        seen.extend(positions(&rows));
    }
}

async fn token_and_canonical_conflicts_are_told_apart(backend: Backend) {
    let (_state, store) = open(backend).await;
    let dek = tenant_with_dek(store.as_ref()).await;
    let now = OffsetDateTime::now_utc();
    let second = DekRow {
        id: uuid::Uuid::new_v4(),
        tenant_id: "t".to_owned(),
        kek_version: 1,
        wrapped_key: vec![0; 8],
        active: true,
        created_at: now,
        reserved: 0,
        retired_at: None,
    };
    assert!(
        !store.insert_active_dek(&second).await.expect("second dek"),
        "one active DEK per tenant"
    );

    // All in one transaction: on PostgreSQL a unique violation would abort it, so this also
    // proves the savepoint keeps the transaction usable after a conflict.
    let mut tx = store.begin().await.expect("begin");
    for (token, canonical, expected) in [
        ("tok_a", true, "Inserted"),
        ("tok_a", false, "TokenTaken"),
        ("tok_b", true, "CanonicalExists"),
        ("tok_c", false, "Inserted"),
    ] {
        let outcome = tx
            .insert_card(&card(token, canonical, dek))
            .await
            .expect("insert");
        assert_eq!(format!("{outcome:?}"), expected, "{token}");
    }
    tx.commit().await.expect("commit");

    let mut tx = store.begin().await.expect("begin");
    let got = tx
        .card("t", "tok_a", now)
        .await
        .expect("read")
        .expect("row");
    assert_eq!(got, card("tok_a", true, dek));
    assert!(
        tx.card("other", "tok_a", now)
            .await
            .expect("read")
            .is_none()
    );
    assert!(tx.card("t", "tok_b", now).await.expect("read").is_none());
    assert!(tx.card("t", "tok_c", now).await.expect("read").is_some());
}

/// The vault retries a taken token with a fresh one and then appends its audit record, all
/// in one transaction; on PostgreSQL that only works because the failed INSERT ran under a
/// savepoint.
async fn a_token_collision_leaves_the_transaction_usable(backend: Backend) {
    let (_state, store) = open(backend).await;
    let dek = tenant_with_dek(store.as_ref()).await;
    let mut tx = store.begin().await.expect("begin");
    tx.insert_audit_head(&head(0, 0)).await.expect("head");
    assert!(matches!(
        tx.insert_card(&card("tok_a", false, dek))
            .await
            .expect("insert"),
        CardInsert::Inserted
    ));
    tx.commit().await.expect("commit");

    let mut tx = store.begin().await.expect("begin");
    let mut honeytoken = card("tok_a", false, dek);
    honeytoken.honeytoken = true;
    assert!(matches!(
        tx.insert_card(&honeytoken).await.expect("collision"),
        CardInsert::TokenTaken
    ));
    honeytoken.token = "tok_b".to_owned();
    assert!(matches!(
        tx.insert_card(&honeytoken).await.expect("retry"),
        CardInsert::Inserted
    ));
    let locked = tx.lock_audit_head(0).await.expect("lock").expect("head");
    assert_eq!(locked, head(0, 0));
    tx.append_audit(&[record(0, 1, t0(), "t")], &head(0, 1))
        .await
        .expect("append");
    tx.commit().await.expect("commit after a collision");

    let now = OffsetDateTime::now_utc();
    let mut tx = store.begin().await.expect("begin");
    let stored = tx.card("t", "tok_b", now).await.expect("read");
    assert_eq!(stored, Some(honeytoken), "honeytoken flag round-trips");
    let first = tx.card("t", "tok_a", now).await.expect("read");
    assert!(!first.expect("first card").honeytoken);
    drop(tx);
    assert_eq!(
        positions(&store.audit_chain(0, 0, 10).await.expect("chain")),
        [(0, 1)]
    );
}

async fn a_transaction_dropped_without_commit_leaves_no_card_and_no_audit_record(backend: Backend) {
    let (_state, store) = open(backend).await;
    let dek = tenant_with_dek(store.as_ref()).await;
    let mut tx = store.begin().await.expect("begin");
    tx.insert_audit_head(&head(0, 0)).await.expect("head");
    tx.commit().await.expect("commit");

    let mut tx = store.begin().await.expect("begin");
    tx.insert_card(&card("tok_d", false, dek))
        .await
        .expect("insert");
    tx.lock_audit_head(0).await.expect("lock").expect("head");
    tx.append_audit(&[record(0, 1, t0(), "t")], &head(0, 1))
        .await
        .expect("append");
    drop(tx);

    let mut tx = store.begin().await.expect("begin");
    let now = OffsetDateTime::now_utc();
    assert!(tx.card("t", "tok_d", now).await.expect("read").is_none());
    assert_eq!(
        tx.lock_audit_head(0).await.expect("lock"),
        Some(head(0, 0)),
        "the head lock was released with the rollback"
    );
    drop(tx);
    assert_eq!(store.audit_heads().await.expect("heads"), [head(0, 0)]);
    assert!(store.audit_chain(0, 0, 10).await.expect("chain").is_empty());
}

async fn principal_names_and_mtls_identities_are_unique_among_live_principals(backend: Backend) {
    let (_state, store) = open(backend).await;
    let alice = principal("p_1", "t", "alice", Some("spiffe://corp/alice"));

    // One transaction throughout: a refused insert must leave it usable (PostgreSQL).
    let mut tx = store.begin().await.expect("begin");
    assert!(tx.insert_tenant(&tenant("t")).await.expect("tenant"));
    assert!(!tx.insert_tenant(&tenant("t")).await.expect("tenant again"));
    assert!(tx.insert_tenant(&tenant("u")).await.expect("tenant"));
    assert!(tx.tenant_exists("u").await.expect("exists"));
    assert!(!tx.tenant_exists("nobody").await.expect("exists"));
    assert!(tx.insert_principal(&alice).await.expect("insert"));
    assert!(
        !tx.insert_principal(&principal("p_2", "t", "alice", None))
            .await
            .expect("same name"),
        "a live principal of the tenant has that name"
    );
    assert!(
        !tx.insert_principal(&principal("p_3", "t", "bob", Some("spiffe://corp/alice")))
            .await
            .expect("same identity"),
        "a live principal has that mTLS identity"
    );
    assert!(
        !tx.insert_principal(&principal("p_4", "u", "carol", Some("spiffe://corp/alice")))
            .await
            .expect("same identity, other tenant"),
        "mTLS identities are unique across tenants"
    );
    assert!(
        tx.insert_principal(&principal("p_5", "u", "alice", None))
            .await
            .expect("same name, other tenant"),
        "names are unique per tenant only"
    );
    assert!(
        tx.insert_principal(&principal("p_6", "t", "dave", None))
            .await
            .expect("no identity"),
        "principals without an mTLS identity do not collide"
    );
    tx.commit().await.expect("commit after refused inserts");

    assert_eq!(
        store.principal("p_1").await.expect("read"),
        Some(alice.clone())
    );
    assert!(store.principal("p_2").await.expect("read").is_none());
    assert_eq!(
        store
            .principal_by_mtls_identity("spiffe://corp/alice")
            .await
            .expect("by identity"),
        Some(alice.clone())
    );

    let revoked_at = t0() + Duration::hours(1);
    let mut tx = store.begin().await.expect("begin");
    assert!(
        tx.revoke_principal("p_1", revoked_at)
            .await
            .expect("revoke")
    );
    assert!(
        !tx.revoke_principal("p_1", revoked_at).await.expect("again"),
        "already revoked"
    );
    assert!(
        !tx.revoke_principal("p_none", revoked_at)
            .await
            .expect("unknown")
    );
    tx.commit().await.expect("commit");
    assert!(
        store
            .principal_by_mtls_identity("spiffe://corp/alice")
            .await
            .expect("by identity")
            .is_none(),
        "a revoked principal never authenticates"
    );

    let successor = principal("p_7", "t", "alice", Some("spiffe://corp/alice"));
    let mut tx = store.begin().await.expect("begin");
    assert!(
        tx.insert_principal(&successor).await.expect("reuse"),
        "name and identity are free again once revoked"
    );
    tx.commit().await.expect("commit");
    assert_eq!(
        store
            .principal_by_mtls_identity("spiffe://corp/alice")
            .await
            .expect("by identity"),
        Some(successor.clone())
    );

    let old = PrincipalRow {
        revoked_at: Some(revoked_at),
        ..alice
    };
    assert_eq!(
        store.principal("p_1").await.expect("read"),
        Some(old.clone())
    );
    let ids = |rows: Vec<PrincipalRow>| rows.into_iter().map(|p| p.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.principals(Some("t")).await.expect("list")),
        ["p_1", "p_7", "p_6"],
        "ordered by name, then id; revoked ones included"
    );
    assert_eq!(
        ids(store.principals(None).await.expect("list")),
        ["p_1", "p_7", "p_6", "p_5"],
        "ordered by tenant first"
    );
}

async fn revoking_a_principal_revokes_its_live_api_keys(backend: Backend) {
    let (_state, store) = open(backend).await;
    let mut tx = store.begin().await.expect("begin");
    assert!(tx.insert_tenant(&tenant("t")).await.expect("tenant"));
    assert!(
        tx.insert_principal(&principal("p_1", "t", "alice", None))
            .await
            .expect("alice")
    );
    assert!(
        tx.insert_principal(&principal("p_2", "t", "bob", None))
            .await
            .expect("bob")
    );
    let keys = [
        api_key("k_old", "p_1", t0()),
        api_key("k_new", "p_1", t0() + Duration::minutes(1)),
        api_key("k_bob", "p_2", t0()),
    ];
    for key in &keys {
        tx.insert_api_key(key).await.expect("key");
    }
    tx.commit().await.expect("commit");

    let early = t0() + Duration::minutes(5);
    let late = t0() + Duration::minutes(10);
    let mut tx = store.begin().await.expect("begin");
    assert!(tx.revoke_api_key("k_old", early).await.expect("revoke key"));
    assert!(!tx.revoke_api_key("k_old", late).await.expect("again"));
    assert!(!tx.revoke_api_key("k_none", late).await.expect("unknown"));
    assert!(tx.revoke_principal("p_1", late).await.expect("revoke"));
    tx.commit().await.expect("commit");

    let revoked = |key: &ApiKeyRow, at| ApiKeyRow {
        revoked_at: Some(at),
        ..key.clone()
    };
    assert_eq!(
        store.api_keys_of("p_1").await.expect("keys"),
        [revoked(&keys[0], early), revoked(&keys[1], late)],
        "oldest first; a key revoked earlier keeps its own revocation time"
    );
    assert_eq!(
        store.api_key("k_bob").await.expect("key"),
        Some(keys[2].clone()),
        "other principals' keys are untouched"
    );
    assert!(store.api_key("k_none").await.expect("key").is_none());
}

async fn audit_chains_page_by_seq_and_by_time_with_a_cursor(backend: Backend) {
    let (_state, store) = open(backend).await;
    assert!(store.audit_key().await.expect("no key yet").is_none());
    let key = AuditKeyRow {
        kek_version: 3,
        wrapped_key: vec![5; 40],
        shards: 2,
        created_at: t0(),
    };
    let mut tx = store.begin().await.expect("begin");
    assert!(tx.insert_audit_key(&key).await.expect("key"));
    let other = AuditKeyRow {
        kek_version: 4,
        ..key.clone()
    };
    assert!(
        !tx.insert_audit_key(&other).await.expect("second key"),
        "one audit key per vault"
    );
    tx.insert_audit_head(&head(0, 0)).await.expect("head 0");
    tx.insert_audit_head(&head(1, 0)).await.expect("head 1");
    tx.commit().await.expect("commit");
    assert_eq!(store.audit_key().await.expect("key"), Some(key));

    // Three records on chain 0 and one on chain 1; three share one instant, so the time
    // order falls back to (shard, seq).
    let at = |s| t0() + Duration::seconds(s);
    let records = [
        record(0, 1, at(10), "a"),
        record(0, 2, at(20), "b"),
        record(0, 3, at(20), "a"),
        record(1, 1, at(20), "a"),
    ];
    for r in &records {
        let mut tx = store.begin().await.expect("begin");
        let locked = tx
            .lock_audit_head(r.shard)
            .await
            .expect("lock")
            .expect("head");
        assert_eq!(locked, head(r.shard, r.seq - 1));
        tx.append_audit(std::slice::from_ref(r), &head(r.shard, r.seq))
            .await
            .expect("append");
        tx.commit().await.expect("commit");
    }

    // An append to a chain without a head is refused, not silently headless.
    let mut tx = store.begin().await.expect("begin");
    assert!(tx.lock_audit_head(7).await.expect("lock").is_none());
    let err = tx
        .append_audit(&[record(7, 1, at(30), "a")], &head(7, 1))
        .await
        .expect_err("no head");
    assert!(
        matches!(err, StoreError::Corrupt("audit chain head missing")),
        "{err:?}"
    );
    drop(tx);

    assert_eq!(
        store.audit_heads().await.expect("heads"),
        [head(0, 3), head(1, 1)]
    );

    let chain0 = store.audit_chain(0, 0, 2).await.expect("chain");
    assert_eq!(chain0, records[..2], "every field round-trips");
    let rest = store.audit_chain(0, 2, 2).await.expect("chain");
    assert_eq!(positions(&rest), [(0, 3)]);
    assert!(store.audit_chain(0, 3, 2).await.expect("chain").is_empty());
    assert_eq!(
        positions(&store.audit_chain(1, 0, 10).await.expect("chain")),
        [(1, 1)]
    );

    let (from, to) = (at(0), at(100));
    let everything = vec![(0, 1), (0, 2), (0, 3), (1, 1)];
    for page in [1, 2, 3, 10] {
        assert_eq!(
            scan(store.as_ref(), from, to, None, page).await,
            everything,
            "page size {page}"
        );
    }
    assert_eq!(
        scan(store.as_ref(), from, to, Some("a"), 1).await,
        [(0, 1), (0, 3), (1, 1)]
    );
    assert_eq!(scan(store.as_ref(), from, to, Some("b"), 1).await, [(0, 2)]);
    assert!(
        scan(store.as_ref(), from, to, Some("z"), 1)
            .await
            .is_empty()
    );
    assert_eq!(
        scan(store.as_ref(), at(10), at(20), None, 10).await,
        [(0, 1)],
        "`from` is inclusive, `to` exclusive"
    );
    assert_eq!(
        scan(store.as_ref(), at(11), at(21), None, 10).await,
        [(0, 2), (0, 3), (1, 1)]
    );
    assert_eq!(
        scan(store.as_ref(), at(11), at(21), Some("a"), 10).await,
        [(0, 3), (1, 1)]
    );

    // A cursor in the middle of the records that share an instant.
    let after = AuditCursor {
        at: at(20),
        shard: 0,
        seq: 2,
    };
    let rows = store
        .audit_range(from, to, None, Some(after), 10)
        .await
        .expect("range");
    assert_eq!(positions(&rows), [(0, 3), (1, 1)]);
}

/// Every task reads the head and writes `seq + 1`; without the lock two of them would read
/// the same head and one would fail on the `(shard, seq)` primary key or skip a number.
async fn concurrent_appends_to_one_chain_are_serialized_by_the_head_lock(backend: Backend) {
    const TASKS: u64 = 16;
    let (_state, store) = open(backend).await;
    let mut tx = store.begin().await.expect("begin");
    tx.insert_audit_head(&head(0, 0)).await.expect("head");
    tx.commit().await.expect("commit");

    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut tx = store.begin().await.expect("begin");
                let locked = tx.lock_audit_head(0).await.expect("lock").expect("head");
                // Hold the lock across a real pause, so an unserialized read would overlap.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                let seq = locked.seq + 1;
                tx.append_audit(&[record(0, seq, t0(), "t")], &head(0, seq))
                    .await
                    .expect("append");
                tx.commit().await.expect("commit");
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }

    assert_eq!(store.audit_heads().await.expect("heads"), [head(0, TASKS)]);
    let seqs: Vec<u64> = store
        .audit_chain(0, 0, 100)
        .await
        .expect("chain")
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, (1..=TASKS).collect::<Vec<_>>());
}

/// The group-commit path inserts many cards in one statement: clashes on any unique key (the
/// token, the canonical slot, the import id, a token twice in one batch) skip only their own
/// row, leave the stored card untouched and the transaction usable.
async fn a_batch_insert_stores_what_it_can_and_reports_each_clash(backend: Backend) {
    let (_state, store) = open(backend).await;
    let dek = tenant_with_dek(store.as_ref()).await;
    let mut tx = store.begin().await.expect("begin");
    tx.insert_audit_head(&head(0, 0)).await.expect("head");
    let existing = card("tok_old", false, dek);
    tx.insert_card(&existing).await.expect("insert");
    tx.commit().await.expect("commit");

    let mut taken = card("tok_old", false, dek);
    taken.ciphertext = vec![9, 9, 9];
    let canonical = card("tok_c1", true, dek);
    let second_canonical = card("tok_c2", true, dek);
    let mut imported = card("tok_i1", false, dek);
    imported.import_id = Some("row-17".to_owned());
    let mut same_import = card("tok_i2", false, dek);
    same_import.import_id = Some("row-17".to_owned());
    let fresh = card("tok_new", false, dek);
    let twice = card("tok_new", false, dek);
    let batch = [
        &fresh,
        &taken,
        &canonical,
        &second_canonical,
        &imported,
        &same_import,
        &twice,
    ];
    let mut tx = store.begin().await.expect("begin");
    let stored = tx.insert_cards(&batch).await.expect("batch insert");
    assert_eq!(stored, [true, false, true, false, true, false, false]);
    assert_eq!(tx.insert_cards(&[]).await.expect("empty batch"), [false; 0]);
    tx.lock_audit_head(0).await.expect("lock").expect("head");
    tx.append_audit(&[record(0, 1, t0(), "t")], &head(0, 1))
        .await
        .expect("the transaction is still usable");
    tx.commit().await.expect("commit");

    let now = OffsetDateTime::now_utc();
    for row in [&existing, &fresh, &canonical, &imported] {
        let got = store.card("t", &row.token, now).await.expect("read");
        assert_eq!(got.as_ref(), Some(row), "{}", row.token);
    }
    for row in [&second_canonical, &same_import] {
        assert!(
            store
                .card("t", &row.token, now)
                .await
                .expect("read")
                .is_none()
        );
    }
    assert!(
        store
            .card("other", "tok_new", now)
            .await
            .expect("read")
            .is_none(),
        "reads are scoped by tenant"
    );
}

async fn a_batch_of_audit_records_extends_one_chain_in_order(backend: Backend) {
    let (_state, store) = open(backend).await;
    let mut tx = store.begin().await.expect("begin");
    tx.insert_audit_head(&head(3, 0)).await.expect("head");
    tx.commit().await.expect("commit");

    let records: Vec<AuditRow> = (1..=3).map(|seq| record(3, seq, t0(), "t")).collect();
    let mut tx = store.begin().await.expect("begin");
    tx.lock_audit_head(3).await.expect("lock").expect("head");
    tx.append_audit(&records, &head(3, 3))
        .await
        .expect("append");
    tx.commit().await.expect("commit");

    assert_eq!(store.audit_chain(3, 0, 10).await.expect("chain"), records);
    let heads = store.audit_heads().await.expect("heads");
    assert_eq!(heads, [head(3, 3)]);
}

/// `ImportCards` answers a clashing import id from the row that holds it: one query for many
/// ids, scoped by tenant, ids that are not there simply missing from the answer.
async fn imported_cards_are_found_by_import_id_within_their_tenant(backend: Backend) {
    let (_state, store) = open(backend).await;
    let dek = tenant_with_dek(store.as_ref()).await;
    assert!(store.insert_tenant(&tenant("u")).await.expect("tenant u"));
    let imported = |token: &str, tenant_id: &str, import_id: &str, fingerprint: u8| CardRow {
        tenant_id: tenant_id.to_owned(),
        import_id: Some(import_id.to_owned()),
        fingerprint: vec![fingerprint; 32],
        ..card(token, false, dek)
    };
    let rows = [
        imported("tok_1", "t", "row-1", 1),
        imported("tok_2", "t", "row-2", 2),
        imported("tok_3", "u", "row-1", 3),
        // Quotes and brackets survive the SQLite JSON array; an expired card keeps its id.
        CardRow {
            expires_at: Some(t0()),
            ..imported("tok_4", "t", "it's [\"odd\"]", 4)
        },
        card("tok_5", false, dek),
    ];
    let mut tx = store.begin().await.expect("begin");
    let refs: Vec<&CardRow> = rows.iter().collect();
    assert_eq!(tx.insert_cards(&refs).await.expect("insert"), [true; 5]);
    tx.commit().await.expect("commit");

    let mut tx = store.begin().await.expect("begin");
    let mut found = tx
        .imported_cards("t", &["row-1", "row-2", "row-9", "it's [\"odd\"]"])
        .await
        .expect("lookup");
    found.sort_by(|a, b| a.token.cmp(&b.token));
    let expected = |row: &CardRow| ImportedCard {
        import_id: row.import_id.clone().expect("import id"),
        token: row.token.clone(),
        fingerprint: row.fingerprint.clone(),
    };
    assert_eq!(
        found,
        [expected(&rows[0]), expected(&rows[1]), expected(&rows[3])]
    );
    assert_eq!(
        tx.imported_cards("u", &["row-1", "row-2"])
            .await
            .expect("lookup"),
        [expected(&rows[2])],
        "another tenant's ids are its own"
    );
    assert!(
        tx.imported_cards("t", &[])
            .await
            .expect("no ids")
            .is_empty(),
        "an empty list asks nothing"
    );
    assert!(
        tx.imported_cards("nobody", &["row-1"])
            .await
            .expect("lookup")
            .is_empty()
    );

    // A second import of row-1 clashes on the id and stores nothing; the lookup in the same
    // transaction then names the holder.
    let again = imported("tok_6", "t", "row-1", 1);
    assert_eq!(tx.insert_cards(&[&again]).await.expect("insert"), [false]);
    assert_eq!(
        tx.imported_cards("t", &["row-1"]).await.expect("lookup"),
        [expected(&rows[0])]
    );
    tx.commit().await.expect("commit");
    assert!(
        store
            .card("t", "tok_6", OffsetDateTime::now_utc())
            .await
            .expect("read")
            .is_none()
    );
}

/// `commit_batch` (the group commit's fast lane) writes cards, records and the moved head
/// together, and nothing at all when a card clashes or the head is not the one expected.
async fn the_fast_lane_commits_all_or_nothing(backend: Backend) {
    let (_state, store) = open(backend).await;
    let dek = tenant_with_dek(store.as_ref()).await;
    let mut tx = store.begin().await.expect("begin");
    tx.insert_audit_head(&head(5, 0)).await.expect("head");
    tx.commit().await.expect("commit");
    let now = OffsetDateTime::now_utc();

    let first = card("tok_f1", false, dek);
    let second = card("tok_f2", false, dek);
    let records: Vec<AuditRow> = (1..=2).map(|seq| record(5, seq, t0(), "t")).collect();
    assert!(
        store
            .commit_batch(&[&first, &second], &records, &head(5, 0), &head(5, 2))
            .await
            .expect("commit")
    );
    assert_eq!(store.audit_chain(5, 0, 10).await.expect("chain"), records);
    assert_eq!(store.audit_heads().await.expect("heads"), [head(5, 2)]);

    // A stale head: another writer moved it. Nothing of this batch may land.
    let third = card("tok_f3", false, dek);
    let stale: Vec<AuditRow> = (1..=1).map(|seq| record(5, seq, t0(), "t")).collect();
    assert!(
        !store
            .commit_batch(&[&third], &stale, &head(5, 0), &head(5, 1))
            .await
            .expect("refused, not failed")
    );
    // A card that clashes (its token is taken) with the right head: nothing lands either.
    let mut taken = card("tok_f1", false, dek);
    taken.ciphertext = vec![9, 9];
    let next = [record(5, 3, t0(), "t")];
    assert!(
        !store
            .commit_batch(&[&third, &taken], &next, &head(5, 2), &head(5, 3))
            .await
            .expect("refused, not failed")
    );
    assert!(
        store
            .card("t", "tok_f3", now)
            .await
            .expect("read")
            .is_none()
    );
    assert_eq!(
        store.card("t", "tok_f1", now).await.expect("read"),
        Some(first),
        "the stored card is untouched"
    );
    assert_eq!(store.audit_heads().await.expect("heads"), [head(5, 2)]);
    assert_eq!(store.audit_chain(5, 0, 10).await.expect("chain").len(), 2);

    // Audit-only batches (reads) go the same way.
    assert!(
        store
            .commit_batch(&[], &next, &head(5, 2), &head(5, 3))
            .await
            .expect("commit")
    );
    assert_eq!(store.audit_heads().await.expect("heads"), [head(5, 3)]);
}
