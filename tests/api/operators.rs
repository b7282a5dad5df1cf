//! Least privilege for operators, each test written as the attack: one operator alone tries
//! to get what needs two (an operator of its own making, a principal that reads cards, an
//! approval by a principal created after the request, another operator revoked), a tenant's
//! operator reaches for another tenant, and two replicas rotate the KEK at once.

use cardvault::{
    crypto::{KekVersion, KeyProvider, LocalKeyring},
    pb::v1::{
        self as pb, access_admin_client::AccessAdminClient, key_admin_client::KeyAdminClient,
    },
    server,
    vault::{Operator, TenantId, VaultError},
};
use tonic::{Code, transport::Channel};

use crate::{
    access::{Secure, secure},
    helpers::{Backend, tokenize_request, unique_pan, with_key},
    on_both_backends,
};

on_both_backends!(
    self_approval_through_a_freshly_created_operator_is_refused,
    an_operator_holding_a_key_the_requester_was_shown_cannot_approve,
    an_operator_created_after_the_request_cannot_approve_it,
    an_operator_or_a_card_reader_is_only_requested_until_a_second_operator_approves,
    revoking_another_operator_needs_a_second_operator,
    a_tenant_operator_cannot_touch_another_tenant,
    concurrent_kek_rotations_make_one_version_each_and_every_card_still_reveals,
);

async fn access(s: &Secure) -> AccessAdminClient<Channel> {
    AccessAdminClient::new(s.app.channel().await)
}

async fn keys(s: &Secure) -> KeyAdminClient<Channel> {
    KeyAdminClient::new(s.app.channel().await)
}

async fn request_shred(s: &Secure, tenant: &str, key: &str) -> String {
    keys(s)
        .await
        .request_shred_tenant(with_key(
            pb::RequestShredTenantRequest {
                tenant: tenant.to_owned(),
            },
            key,
        ))
        .await
        .expect("request")
        .into_inner()
        .request
        .expect("a request")
        .id
}

async fn approve(
    s: &Secure,
    request_id: &str,
    key: &str,
) -> Result<pb::ApproveKeyRequestResponse, tonic::Status> {
    keys(s)
        .await
        .approve_key_request(with_key(
            pb::ApproveKeyRequestRequest {
                request_id: request_id.to_owned(),
            },
            key,
        ))
        .await
        .map(tonic::Response::into_inner)
}

fn create_principal(tenant: &str, name: &str, permissions: &[&str]) -> pb::CreatePrincipalRequest {
    pb::CreatePrincipalRequest {
        tenant: tenant.to_owned(),
        name: name.to_owned(),
        permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
        mtls_identity: String::new(),
        global_operator: false,
    }
}

/// Whether tenant `globex` is still unshredded, as the database shows.
async fn globex_is_live(s: &Secure) -> bool {
    s.state
        .count("SELECT COUNT(*) FROM tenants WHERE id = 'globex' AND shredded_at IS NULL")
        .await
        == 1
}

/// Whether an operator's key still gets an answer from KeyAdmin.
async fn still_works(s: &Secure, key: &str) -> bool {
    keys(s)
        .await
        .get_key_status(with_key(pb::GetKeyStatusRequest::default(), key))
        .await
        .is_ok()
}

async fn audited_refusals(s: &Secure, principal: &str) -> i64 {
    // The principal id is random base62; it cannot break out of the literal.
    let sql = format!(
        "SELECT COUNT(*) FROM audit_records WHERE principal = '{principal}' \
         AND outcome = 'permission_denied'"
    );
    s.state.count(Box::leak(sql.into_boxed_str())).await
}

async fn self_approval_through_a_freshly_created_operator_is_refused(backend: Backend) {
    let s = secure(backend).await;
    let (alice_id, alice) = s.global_operator("acme", "alice").await;
    let (_, bob) = s.global_operator("acme", "bob").await;

    // Alice asks for an operator of her own. She gets a request, not a principal.
    let mut twin = create_principal("acme", "alice-twin", &["keys:admin"]);
    twin.global_operator = true;
    let created = access(&s)
        .await
        .create_principal(with_key(twin, &alice))
        .await
        .expect("create")
        .into_inner();
    assert!(created.principal.is_none(), "created at once: {created:?}");
    let pending = created.pending_request.expect("a pending request");
    assert_eq!(pending.kind(), pb::key_request::Kind::CreatePrincipal);
    assert!(pending.tenant.is_empty(), "a global operator is vault-wide");
    let spec = pending.principal.expect("what is to be created");
    assert_eq!(
        (spec.name.as_str(), spec.permissions, spec.global_operator),
        ("alice-twin", vec!["keys:admin".to_owned()], true)
    );
    // She cannot approve it herself.
    let own = approve(&s, &pending.id, &alice).await.expect_err("refused");
    assert_eq!(own.code(), Code::PermissionDenied);

    // Bob approves; the twin exists, recorded as created by Alice.
    let approved = approve(&s, &pending.id, &bob).await.expect("approve");
    let twin_id = approved.principal_id;
    assert!(twin_id.starts_with("p_"), "{twin_id}");
    let listed = access(&s)
        .await
        .list_principals(with_key(pb::ListPrincipalsRequest::default(), &alice))
        .await
        .expect("list")
        .into_inner()
        .principals;
    let row = listed.iter().find(|p| p.id == twin_id).expect("listed");
    assert_eq!(row.created_by, alice_id);
    assert!(row.global_operator);

    // However the twin got its credentials, it cannot approve Alice's requests.
    let twin_key = s.key_for(&twin_id).await;
    let shred = request_shred(&s, "globex", &alice).await;
    let refused = approve(&s, &shred, &twin_key).await.expect_err("refused");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("created by the requester"),
        "{}",
        refused.message()
    );
    assert!(globex_is_live(&s).await, "not shredded");
    assert_eq!(audited_refusals(&s, &twin_id).await, 1);
    // An independent operator still can.
    let done = approve(&s, &shred, &bob).await.expect("bob approves");
    assert_eq!(
        done.request.expect("request").state(),
        pb::key_request::State::Executed
    );
}

async fn an_operator_holding_a_key_the_requester_was_shown_cannot_approve(backend: Backend) {
    let s = secure(backend).await;
    let (_, alice) = s.global_operator("acme", "alice").await;
    let (bob_id, _) = s.global_operator("acme", "bob").await;
    let (_, carol) = s.global_operator("acme", "carol").await;

    // Alice asks for a new key for Bob; minting an operator's key is dual-controlled.
    let created = access(&s)
        .await
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                principal_id: bob_id.clone(),
                valid_for: None,
            },
            &alice,
        ))
        .await
        .expect("create key")
        .into_inner();
    assert!(created.api_key.is_empty(), "a key was handed out at once");
    let pending = created.pending_request.expect("pending");
    assert_eq!(pending.kind(), pb::key_request::Kind::CreateApiKey);
    // Carol approves and is the one shown the key: from now on she could act as Bob.
    let approved = approve(&s, &pending.id, &carol).await.expect("approve");
    let bob_by_carol = approved.api_key;
    assert!(bob_by_carol.starts_with("cv_"), "the approver gets the key");

    // Carol asks for a shred and approves it "as Bob".
    let shred = request_shred(&s, "globex", &carol).await;
    let refused = approve(&s, &shred, &bob_by_carol)
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused
            .message()
            .contains("holds an API key the requester minted"),
        "{}",
        refused.message()
    );
    assert!(globex_is_live(&s).await);
    assert_eq!(audited_refusals(&s, &bob_id).await, 1);
}

async fn an_operator_created_after_the_request_cannot_approve_it(backend: Backend) {
    let s = secure(backend).await;
    let (_, alice) = s.global_operator("acme", "alice").await;
    let (_, bob) = s.global_operator("acme", "bob").await;
    let shred = request_shred(&s, "globex", &alice).await;

    // An operator made after the request (here by the CLI, not by Alice).
    let (late_id, late) = s.global_operator("acme", "late").await;
    let refused = approve(&s, &shred, &late).await.expect_err("refused");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("created after the request"),
        "{}",
        refused.message()
    );
    assert!(globex_is_live(&s).await, "not shredded");
    assert_eq!(audited_refusals(&s, &late_id).await, 1);

    // The request is still pending; an operator that existed before approves it.
    let done = approve(&s, &shred, &bob).await.expect("approve");
    assert!(done.shredded.is_some());
    assert!(!globex_is_live(&s).await);
}

async fn an_operator_or_a_card_reader_is_only_requested_until_a_second_operator_approves(
    backend: Backend,
) {
    let s = secure(backend).await;
    let (alice_id, alice) = s.global_operator("acme", "alice").await;
    let (_, bob) = s.global_operator("acme", "bob").await;
    let mut admin = access(&s).await;
    let names = async |admin: &mut AccessAdminClient<Channel>| -> Vec<String> {
        admin
            .list_principals(with_key(
                pb::ListPrincipalsRequest {
                    tenant: "acme".to_owned(),
                },
                &alice,
            ))
            .await
            .expect("list")
            .into_inner()
            .principals
            .into_iter()
            .map(|p| p.name)
            .collect()
    };

    let mut pending = Vec::new();
    for (name, permissions) in [
        ("reader", &["reveal"][..]),
        ("biller", &["charge", "read"][..]),
        ("ops2", &["keys:admin"][..]),
    ] {
        let created = admin
            .create_principal(with_key(
                create_principal("acme", name, permissions),
                &alice,
            ))
            .await
            .expect("create")
            .into_inner();
        assert!(created.principal.is_none(), "{name} created at once");
        let request = created.pending_request.expect("pending");
        assert_eq!(request.tenant, "acme");
        pending.push(request.id);
    }
    // None of them exists yet; a principal without card-data power is created at once.
    let shop = admin
        .create_principal(with_key(
            create_principal("acme", "shop", &["tokenize"]),
            &alice,
        ))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(shop.principal.expect("created").name, "shop");
    assert!(shop.pending_request.is_none());
    let before = names(&mut admin).await;
    assert!(
        !before
            .iter()
            .any(|n| ["reader", "biller", "ops2"].contains(&n.as_str())),
        "{before:?}"
    );

    // Bob approves the reader; it exists, created by Alice.
    let approved = approve(&s, &pending[0], &bob).await.expect("approve");
    let reader_id = approved.principal_id;
    assert!(names(&mut admin).await.contains(&"reader".to_owned()));
    // Its first API key is requested too, and only the approval shows it.
    let key_request = admin
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                principal_id: reader_id.clone(),
                valid_for: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
            },
            &alice,
        ))
        .await
        .expect("create key")
        .into_inner();
    assert!(key_request.api_key.is_empty() && key_request.info.is_none());
    let key_request = key_request.pending_request.expect("pending");
    assert_eq!(key_request.api_key_valid_for.map(|d| d.seconds), Some(3600));
    let key = approve(&s, &key_request.id, &bob)
        .await
        .expect("approve")
        .api_key;
    // The key authenticates as the reader: a missing token is NOT_FOUND, not UNAUTHENTICATED.
    let missing = s
        .vault()
        .await
        .reveal(with_key(
            pb::RevealRequest {
                token: "tok_0000000000000000000000".to_owned(),
            },
            &key,
        ))
        .await
        .expect_err("no such card");
    assert_eq!(missing.code(), Code::NotFound);
    let listed = admin
        .list_principals(with_key(pb::ListPrincipalsRequest::default(), &alice))
        .await
        .expect("list")
        .into_inner()
        .principals;
    let reader = listed.iter().find(|p| p.id == reader_id).expect("listed");
    assert_eq!(reader.created_by, alice_id);
    assert!(!reader.global_operator);
}

async fn revoking_another_operator_needs_a_second_operator(backend: Backend) {
    let s = secure(backend).await;
    let (_, alice) = s.global_operator("acme", "alice").await;
    let (bob_id, bob) = s.global_operator("acme", "bob").await;
    let (_, carol) = s.global_operator("acme", "carol").await;
    let reader = s.principal("acme", "reader", &["read"], None).await;
    let mut admin = access(&s).await;
    let revoke = |id: &str, key: &str| {
        with_key(
            pb::RevokePrincipalRequest {
                principal_id: id.to_owned(),
            },
            key,
        )
    };

    let pending = admin
        .revoke_principal(revoke(&bob_id, &alice))
        .await
        .expect("revoke")
        .into_inner()
        .pending_request
        .expect("revoking an operator is requested");
    assert_eq!(pending.kind(), pb::key_request::Kind::RevokePrincipal);
    assert_eq!(pending.target, bob_id);
    // Bob still works.
    assert!(still_works(&s, &bob).await);

    // A principal that is no operator is revoked at once.
    let done = admin
        .revoke_principal(revoke(&reader, &alice))
        .await
        .expect("revoke")
        .into_inner();
    assert!(done.pending_request.is_none());

    approve(&s, &pending.id, &carol).await.expect("approve");
    assert!(!still_works(&s, &bob).await, "bob is revoked");
}

async fn a_tenant_operator_cannot_touch_another_tenant(backend: Backend) {
    let s = secure(backend).await;
    let (_, alice) = s.global_operator("acme", "alice").await;
    let acme_ops = s
        .principal("acme", "acme-ops", &["keys:admin", "audit:read"], None)
        .await;
    let local = s.key_for(&acme_ops).await;
    let globex_reader = s.principal("globex", "reader", &["read"], None).await;
    let globex_shred = request_shred(&s, "globex", &alice).await;
    let mut admin = access(&s).await;
    let mut key_admin = keys(&s).await;
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |e| e.code());

    let mut global_ops = create_principal("acme", "acme-root", &["keys:admin"]);
    global_ops.global_operator = true;
    let attempts = [
        (
            "create a globex principal",
            code(
                admin
                    .create_principal(with_key(
                        create_principal("globex", "mine", &["read"]),
                        &local,
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "create a global operator",
            code(
                admin
                    .create_principal(with_key(global_ops, &local))
                    .await
                    .map(drop),
            ),
        ),
        (
            "list globex",
            code(
                admin
                    .list_principals(with_key(
                        pb::ListPrincipalsRequest {
                            tenant: "globex".to_owned(),
                        },
                        &local,
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "revoke a globex principal",
            code(
                admin
                    .revoke_principal(with_key(
                        pb::RevokePrincipalRequest {
                            principal_id: globex_reader.clone(),
                        },
                        &local,
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "mint a key for a globex principal",
            code(
                admin
                    .create_api_key(with_key(
                        pb::CreateApiKeyRequest {
                            principal_id: globex_reader.clone(),
                            valid_for: None,
                        },
                        &local,
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "plant a globex honeytoken",
            code(
                admin
                    .mint_honeytoken(with_key(
                        pb::MintHoneytokenRequest {
                            tenant: "globex".to_owned(),
                            ..Default::default()
                        },
                        &local,
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "create a tenant",
            code(
                admin
                    .create_tenant(with_key(
                        pb::CreateTenantRequest {
                            tenant: "initech".to_owned(),
                        },
                        &local,
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "ask to shred globex",
            code(
                key_admin
                    .request_shred_tenant(with_key(
                        pb::RequestShredTenantRequest {
                            tenant: "globex".to_owned(),
                        },
                        &local,
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "approve a globex shred",
            code(approve(&s, &globex_shred, &local).await.map(drop)),
        ),
        (
            "rotate globex's data key",
            code(
                key_admin
                    .rotate_deks(with_key(
                        pb::RotateDeksRequest {
                            tenant: "globex".to_owned(),
                            reencrypt: false,
                        },
                        &local,
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "read globex's key status",
            code(
                key_admin
                    .get_key_status(with_key(
                        pb::GetKeyStatusRequest {
                            tenant: "globex".to_owned(),
                        },
                        &local,
                    ))
                    .await
                    .map(drop),
            ),
        ),
        (
            "rotate the KEK",
            code(
                key_admin
                    .rotate_kek(with_key(pb::RotateKekRequest {}, &local))
                    .await
                    .map(drop),
            ),
        ),
    ];
    for (what, code) in &attempts {
        assert_eq!(*code, Code::PermissionDenied, "{what}");
    }
    assert_eq!(
        audited_refusals(&s, &acme_ops).await,
        i64::try_from(attempts.len()).expect("small")
    );
    assert!(globex_is_live(&s).await);

    // Within its own tenant it works, and "every tenant" means its own.
    let shop = admin
        .create_principal(with_key(
            create_principal("acme", "shop", &["tokenize"]),
            &local,
        ))
        .await
        .expect("own tenant")
        .into_inner();
    assert!(shop.principal.is_some());
    let tenants: Vec<String> = admin
        .list_principals(with_key(pb::ListPrincipalsRequest::default(), &local))
        .await
        .expect("list")
        .into_inner()
        .principals
        .into_iter()
        .map(|p| p.tenant)
        .collect();
    assert!(tenants.iter().all(|t| t == "acme"), "{tenants:?}");
    let rotated = key_admin
        .rotate_deks(with_key(pb::RotateDeksRequest::default(), &local))
        .await
        .expect("own tenant's key")
        .into_inner();
    let rotated: Vec<&str> = rotated.deks.iter().map(|d| d.tenant.as_str()).collect();
    assert_eq!(rotated, ["acme"]);
    let status = key_admin
        .get_key_status(with_key(pb::GetKeyStatusRequest::default(), &local))
        .await
        .expect("status")
        .into_inner();
    assert!(status.deks.iter().all(|d| d.tenant == "acme"));
    assert!(
        status.pending_requests.is_empty(),
        "globex's shred request is not acme's business"
    );
    // Its audit reading is its own tenant's.
    let mut stream = cardvault::pb::v1::audit_client::AuditClient::new(s.app.channel().await)
        .list_audit_records(with_key(pb::ListAuditRecordsRequest::default(), &local))
        .await
        .expect("audit")
        .into_inner();
    let mut records = Vec::new();
    while let Some(record) = stream.message().await.expect("audit record") {
        records.push(record);
    }
    assert!(!records.is_empty());
    assert!(records.iter().all(|r| r.tenant == "acme"), "{records:?}");
}

async fn concurrent_kek_rotations_make_one_version_each_and_every_card_still_reveals(
    backend: Backend,
) {
    let s = secure(backend).await;
    let (_, cards_key) = s.api_key("acme", "shop", &["tokenize", "reveal"]).await;
    let mut client = s.vault().await;
    let mut cards = Vec::new();
    for _ in 0..5 {
        let pan = unique_pan();
        let token = client
            .tokenize(with_key(tokenize_request(&pan), &cards_key))
            .await
            .expect("tokenize")
            .into_inner()
            .token;
        cards.push((token, pan));
    }
    // Two replicas on one database and one keyring file, besides the serving app.
    let settings = s.state.secure_settings(&s.pki);
    let replicas = [
        server::open_vault(&settings).await.expect("replica a"),
        server::open_vault(&settings).await.expect("replica b"),
    ];
    let op = Operator::local("test");
    let mut made = Vec::new();
    for round in 0..8 {
        // Each replica on its own task, released together, as two pods would be.
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let tasks = replicas.clone().map(|replica| {
            let (start, op) = (start.clone(), op.clone());
            tokio::spawn(async move {
                start.wait().await;
                replica.rotate_kek(&op).await
            })
        });
        let mut succeeded = 0;
        for task in tasks {
            let result = task.await.expect("rotation task");
            match result {
                Ok((version, _job)) => {
                    made.push(version);
                    succeeded += 1;
                }
                Err(VaultError::Precondition(why)) => {
                    assert!(why.contains("under way"), "round {round}: {why}");
                }
                Err(other) => panic!("round {round}: {other}"),
            }
        }
        assert!(succeeded >= 1, "round {round}: neither rotated");
    }
    let mut sorted = made.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), made.len(), "one version made twice: {made:?}");
    let file = LocalKeyring::load(&s.state.dir.path().join("keyring.toml")).expect("keyring");
    assert_eq!(
        file.versions().len(),
        1 + made.len(),
        "every rotation added exactly one version"
    );
    assert_eq!(
        file.primary_version(),
        KekVersion(1 + u32::try_from(made.len()).expect("few"))
    );

    // What each replica wraps now, the other (and the file) opens.
    for (i, tenant) in ["after-a", "after-b"].into_iter().enumerate() {
        let tenant = TenantId::parse(tenant).expect("tenant");
        replicas[i]
            .create_tenant(&op, &tenant)
            .await
            .expect("create tenant");
        let other = &replicas[1 - i];
        other
            .key_status(&op, Some(&tenant))
            .await
            .expect("refresh the other replica");
        other
            .warm_up(Some(&tenant))
            .await
            .expect("the other replica opens the tenant's keys");
    }
    for (token, pan) in &cards {
        let revealed = client
            .reveal(with_key(
                pb::RevealRequest {
                    token: token.clone(),
                },
                &cards_key,
            ))
            .await
            .expect("reveal")
            .into_inner();
        assert_eq!(&revealed.number, pan);
    }
}
