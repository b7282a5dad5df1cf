//! Access control: TLS, principals from API keys and client certificates, permissions,
//! tenant isolation, abuse limits.

use std::{sync::Arc, time::Duration};

use cardvault::{
    pb::v1::{
        self as pb, access_admin_client::AccessAdminClient, audit_client::AuditClient,
        card_vault_client::CardVaultClient,
    },
    server,
    vault::{DualControlled, NewPrincipal, Operator, Permissions, PrincipalName, TenantId, Vault},
};
use tonic::{Code, transport::Channel};

use crate::{
    helpers::{
        AppState, Backend, TestApp, spawn_with, tokenize_request, try_connect, unique_pan, with_key,
    },
    on_both_backends,
    pki::Pki,
};

/// A production-shaped vault (TLS, mTLS, no unauthenticated callers) and an operator's
/// handle on its database, as `cardvault admin` has.
pub struct Secure {
    pub app: TestApp,
    pub pki: Pki,
    pub ops: Arc<Vault>,
    pub state: Arc<AppState>,
}

/// Starts a secure vault with tenants `acme` and `globex`.
pub async fn secure(backend: Backend) -> Secure {
    secure_with(backend, |_| {}).await
}

/// As [`secure`], with settings adjusted first.
pub async fn secure_with(
    backend: Backend,
    adjust: impl FnOnce(&mut cardvault::config::Settings),
) -> Secure {
    let state = Arc::new(AppState::new(backend).await);
    let pki = Pki::new(state.dir.path());
    let mut settings = state.secure_settings(&pki);
    adjust(&mut settings);
    let app = spawn_with(state.clone(), "unused", settings.clone()).await;
    let ops = server::open_vault(&settings).await.expect("operator vault");
    for tenant in ["acme", "globex"] {
        ops.create_tenant(&operator(), &TenantId::parse(tenant).expect("tenant"))
            .await
            .expect("create tenant");
    }
    Secure {
        app,
        pki,
        ops,
        state,
    }
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).expect("read PEM")
}

pub fn operator() -> Operator {
    Operator::local("test")
}

impl Secure {
    /// A principal of `tenant` with `permissions` and an API key for it.
    pub async fn api_key(
        &self,
        tenant: &str,
        name: &str,
        permissions: &[&str],
    ) -> (String, String) {
        let row = self.principal(tenant, name, permissions, None).await;
        (row.clone(), self.key_for(&row).await)
    }

    /// A global operator (`keys:admin` of every tenant) of `tenant`, made by the CLI, and an
    /// API key for it.
    pub async fn global_operator(&self, tenant: &str, name: &str) -> (String, String) {
        let row = self
            .principal_with(tenant, name, &["keys:admin"], None, true)
            .await;
        (row.clone(), self.key_for(&row).await)
    }

    /// An API key for a principal, made by the CLI.
    pub async fn key_for(&self, principal: &str) -> String {
        match self
            .ops
            .create_api_key(&operator(), principal, None)
            .await
            .expect("api key")
        {
            DualControlled::Done(key) => key.key.expose().to_owned(),
            DualControlled::Pending(_) => panic!("the CLI acts at once"),
        }
    }

    /// A principal; returns its id.
    pub async fn principal(
        &self,
        tenant: &str,
        name: &str,
        permissions: &[&str],
        mtls_identity: Option<&str>,
    ) -> String {
        self.principal_with(tenant, name, permissions, mtls_identity, false)
            .await
    }

    /// A principal made by the CLI, maybe a global operator; returns its id.
    pub async fn principal_with(
        &self,
        tenant: &str,
        name: &str,
        permissions: &[&str],
        mtls_identity: Option<&str>,
        global_operator: bool,
    ) -> String {
        match self
            .ops
            .create_principal(
                &operator(),
                NewPrincipal {
                    tenant: TenantId::parse(tenant).expect("tenant"),
                    name: PrincipalName::parse(name).expect("name"),
                    permissions: Permissions::parse(permissions.iter().copied())
                        .expect("permissions"),
                    mtls_identity: mtls_identity.map(str::to_owned),
                    global_operator,
                },
            )
            .await
            .expect("principal")
        {
            DualControlled::Done(row) => row.id,
            DualControlled::Pending(_) => panic!("the CLI acts at once"),
        }
    }

    pub async fn vault(&self) -> CardVaultClient<Channel> {
        CardVaultClient::new(self.app.channel().await)
    }

    /// Tokenizes a fresh card as a principal holding every card permission of `tenant`.
    pub async fn stored_token(&self, key: &str) -> String {
        self.vault()
            .await
            .tokenize(with_key(tokenize_request(&unique_pan()), key))
            .await
            .expect("tokenize")
            .into_inner()
            .token
    }
}

fn authed<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    match key {
        Some(k) => with_key(message, k),
        None => tonic::Request::new(message),
    }
}

/// The outcome of each card RPC for a caller: `true` when allowed.
async fn card_rpcs(
    client: &mut CardVaultClient<Channel>,
    key: Option<&str>,
    fresh_token: impl AsyncFn() -> String,
) -> [(&'static str, Code); 4] {
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let tokenize = code(
        client
            .tokenize(authed(tokenize_request(&unique_pan()), key))
            .await
            .map(drop),
    );
    let token = fresh_token().await;
    let get = code(
        client
            .get_card(authed(
                pb::GetCardRequest {
                    token: token.clone(),
                },
                key,
            ))
            .await
            .map(drop),
    );
    let reveal = code(
        client
            .reveal(authed(
                pb::RevealRequest {
                    token: token.clone(),
                },
                key,
            ))
            .await
            .map(drop),
    );
    let delete = code(
        client
            .delete_card(authed(pb::DeleteCardRequest { token }, key))
            .await
            .map(drop),
    );
    [
        ("tokenize", tokenize),
        ("read", get),
        ("reveal", reveal),
        ("delete", delete),
    ]
}

fn expect_only(result: [(&'static str, Code); 4], allowed: &str) {
    for (permission, code) in result {
        let expected = if permission == allowed {
            Code::Ok
        } else {
            Code::PermissionDenied
        };
        assert_eq!(code, expected, "{permission} with only {allowed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_card_permission_allows_its_rpc_and_nothing_else_for_api_keys() {
    let s = secure(Backend::Sqlite).await;
    let (_, all) = s
        .api_key("acme", "all", &["tokenize", "read", "reveal", "delete"])
        .await;
    let mut client = s.vault().await;
    for permission in ["tokenize", "read", "reveal", "delete"] {
        let (_, key) = s.api_key("acme", permission, &[permission]).await;
        let result = card_rpcs(&mut client, Some(&key), async || s.stored_token(&all).await).await;
        expect_only(result, permission);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_card_permission_allows_its_rpc_and_nothing_else_for_mtls_principals() {
    let s = secure(Backend::Sqlite).await;
    let (_, all) = s
        .api_key("acme", "all", &["tokenize", "read", "reveal", "delete"])
        .await;
    for (i, permission) in ["tokenize", "read", "reveal", "delete"].iter().enumerate() {
        // Alternate SPIFFE IDs and plain CNs: both name principals.
        let (spiffe, cn) = if i % 2 == 0 {
            (
                Some(format!("spiffe://acme.test/{permission}")),
                format!("ignored-{permission}"),
            )
        } else {
            (None, format!("svc-{permission}"))
        };
        let identity = spiffe.clone().unwrap_or_else(|| cn.clone());
        s.principal("acme", permission, &[permission], Some(&identity))
            .await;
        let (cert, key) = s.pki.client_cert(permission, spiffe.as_deref(), &cn);
        let (cert, key) = (read(&cert), read(&key));
        let mut client = CardVaultClient::new(s.app.channel_as(&cert, &key).await);
        let result = card_rpcs(&mut client, None, async || s.stored_token(&all).await).await;
        expect_only(result, permission);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_audit_permissions_are_enforced() {
    let s = secure(Backend::Sqlite).await;
    let (_, admin) = s.global_operator("acme", "ops").await;
    let (_, auditor) = s.api_key("acme", "auditor", &["audit:read"]).await;
    let (_, reader) = s.api_key("acme", "reader", &["read"]).await;
    let mut access = AccessAdminClient::new(s.app.channel().await);
    let mut audit = AuditClient::new(s.app.channel().await);
    let create = |key: &str, tenant: &str| {
        with_key(
            pb::CreateTenantRequest {
                tenant: tenant.to_owned(),
            },
            key,
        )
    };
    assert!(
        access
            .create_tenant(create(&admin, "initech"))
            .await
            .is_ok()
    );
    for key in [&auditor, &reader] {
        let err = access
            .create_tenant(create(key, "umbrella"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }
    let list = |key: &str| with_key(pb::ListAuditRecordsRequest::default(), key);
    assert!(audit.list_audit_records(list(&auditor)).await.is_ok());
    for key in [&admin, &reader] {
        let err = audit.list_audit_records(list(key)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_revoked_unknown_and_malformed_credentials_are_all_refused_alike() {
    let s = secure(Backend::Sqlite).await;
    let (_, admin) = s.global_operator("acme", "ops").await;
    let reader = s.principal("acme", "reader", &["read"], None).await;
    let mut access = AccessAdminClient::new(s.app.channel().await);
    let new_key = async |valid_for: Option<prost_types::Duration>| {
        AccessAdminClient::new(s.app.channel().await)
            .create_api_key(with_key(
                pb::CreateApiKeyRequest {
                    principal_id: reader.clone(),
                    valid_for,
                },
                &admin,
            ))
            .await
            .expect("create key")
            .into_inner()
    };
    let short = new_key(Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    }))
    .await;
    let revoked = new_key(None).await;
    let live = new_key(None).await;
    let mut client = s.vault().await;
    let get = |key: &str| {
        with_key(
            pb::GetCardRequest {
                token: "tok_0000000000000000000000".to_owned(),
            },
            key,
        )
    };
    // A live key authenticates (the token is simply missing).
    let err = client.get_card(get(&live.api_key)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    access
        .revoke_api_key(with_key(
            pb::RevokeApiKeyRequest {
                key_id: revoked.info.as_ref().expect("info").id.clone(),
            },
            &admin,
        ))
        .await
        .expect("revoke");
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let mut wrong_secret = live.api_key.clone();
    wrong_secret.replace_range(wrong_secret.len() - 4.., "abcd");
    let refusals = [
        short.api_key.as_str(),
        revoked.api_key.as_str(),
        wrong_secret.as_str(),
        "cv_AAAAAAAAAAAAAAAA_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
        "not-a-key",
    ];
    let mut messages = Vec::new();
    for key in refusals {
        let err = client.get_card(get(key)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{key}");
        messages.push(err.message().to_owned());
    }
    // No credentials at all.
    let err = client
        .get_card(pb::GetCardRequest {
            token: "tok_0000000000000000000000".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    messages.push(err.message().to_owned());
    messages.dedup();
    assert_eq!(messages, vec!["authentication required".to_owned()]);

    // Revoking the principal kills its remaining key.
    access
        .revoke_principal(with_key(
            pb::RevokePrincipalRequest {
                principal_id: reader.clone(),
            },
            &admin,
        ))
        .await
        .expect("revoke principal");
    let err = client.get_card(get(&live.api_key)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    let s = secure(Backend::Sqlite).await;
    // Even with a principal of its name, a certificate from an unknown CA gets nowhere.
    s.principal("acme", "intruder", &["read"], Some("intruder"))
        .await;
    let (cert, key) = (
        read(&s.pki.other_client_cert),
        read(&s.pki.other_client_key),
    );
    let result = async {
        let channel = try_connect(
            s.app.grpc_addr,
            s.app.ca_pem.as_deref(),
            Some((&cert, &key)),
        )
        .await
        .map_err(|e| e.to_string())?;
        CardVaultClient::new(channel)
            .get_card(pb::GetCardRequest {
                token: "tok_0000000000000000000000".to_owned(),
            })
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    assert!(result.is_err(), "a foreign client certificate got through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_is_refused_outside_dev() {
    let s = secure(Backend::Sqlite).await;
    // A plain-text client cannot talk to the TLS listener.
    let plain = try_connect(s.app.grpc_addr, None, None).await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => CardVaultClient::new(channel)
            .get_card(pb::GetCardRequest {
                token: "tok_0000000000000000000000".to_owned(),
            })
            .await
            .is_err(),
    };
    assert!(refused);
    // And a vault without a certificate does not start unless it is --dev.
    let mut settings = s.state.secure_settings(&s.pki);
    settings.tls.cert_file = None;
    settings.tls.key_file = None;
    settings.tls.client_ca_file = None;
    let err = server::build(settings)
        .await
        .expect_err("plain text outside --dev");
    assert!(err.to_string().contains("TLS is required"), "{err}");
}

on_both_backends!(another_tenants_token_is_indistinguishable_from_a_missing_one);

async fn another_tenants_token_is_indistinguishable_from_a_missing_one(backend: Backend) {
    let s = secure(backend).await;
    let every = ["tokenize", "read", "reveal", "delete"];
    let (_, a) = s.api_key("acme", "a", &every).await;
    let (_, b) = s.api_key("globex", "b", &every).await;
    let token = s.stored_token(&a).await;
    let missing = "tok_0000000000000000000000".to_owned();
    let mut client = s.vault().await;
    let mut seen = Vec::new();
    for t in [&token, &missing] {
        let get = client
            .get_card(with_key(pb::GetCardRequest { token: t.clone() }, &b))
            .await
            .unwrap_err();
        let reveal = client
            .reveal(with_key(pb::RevealRequest { token: t.clone() }, &b))
            .await
            .unwrap_err();
        let delete = client
            .delete_card(with_key(pb::DeleteCardRequest { token: t.clone() }, &b))
            .await
            .unwrap_err();
        seen.push(
            [get, reveal, delete].map(|e| (e.code(), e.message().to_owned(), e.details().to_vec())),
        );
    }
    assert_eq!(
        seen[0], seen[1],
        "another tenant's token looks different from a missing one"
    );
    assert_eq!(seen[0][0].0, Code::NotFound);
    // Tenant A's card is untouched.
    let card = client
        .reveal(with_key(pb::RevealRequest { token }, &a))
        .await
        .expect("owner reveals");
    assert_eq!(card.into_inner().number.len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reveals_over_the_rate_are_refused_and_recorded() {
    let s = secure_with(Backend::Sqlite, |settings| {
        settings.limits.reveal_burst = 2;
        settings.limits.reveal_per_minute = 1;
    })
    .await;
    let (_, key) = s.api_key("acme", "a", &["tokenize", "reveal"]).await;
    let token = s.stored_token(&key).await;
    let mut client = s.vault().await;
    let reveal = || {
        with_key(
            pb::RevealRequest {
                token: token.clone(),
            },
            &key,
        )
    };
    assert!(client.reveal(reveal()).await.is_ok());
    assert!(client.reveal(reveal()).await.is_ok());
    let err = client.reveal(reveal()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let limited = s
        .state
        .count("SELECT COUNT(*) FROM audit_records WHERE action = 'reveal' AND outcome = 'rate_limited'")
        .await;
    assert_eq!(limited, 1);
}

/// The attacker holding one permission other than `charge` (or one operator alone) tries to
/// capture, refund or cancel a charge, or reconcile the tenant's charges: every attempt is
/// PERMISSION_DENIED before the charge is looked up, so the answer is the same whatever the
/// charge id and says nothing about which charges exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_charge_permission_reaches_capture_refund_cancel_and_reconcile() {
    let s = secure(Backend::Sqlite).await;
    let mut callers = Vec::new();
    for permission in ["tokenize", "read", "reveal", "fingerprint", "audit:read"] {
        // A principal name has no ':' (`audit:read` is the permission, `audit-read` the name).
        let name = permission.replace(':', "-");
        callers.push(s.api_key("acme", &name, &[permission]).await.1);
    }
    callers.push(s.global_operator("acme", "ops").await.1);
    let mut vault = CardVaultClient::new(s.app.channel().await);
    for key in &callers {
        for charge_id in ["ch_0000000000000000", "ch_AAAAAAAAAAAAAAAA"] {
            let capture = vault
                .capture_charge(with_key(
                    pb::CaptureChargeRequest {
                        charge_id: charge_id.to_owned(),
                        idempotency_key: "cap-1".to_owned(),
                        amount: 0,
                    },
                    key,
                ))
                .await
                .unwrap_err();
            let refund = vault
                .refund_charge(with_key(
                    pb::RefundChargeRequest {
                        charge_id: charge_id.to_owned(),
                        idempotency_key: "ref-1".to_owned(),
                        amount: 0,
                    },
                    key,
                ))
                .await
                .unwrap_err();
            let cancel = vault
                .cancel_charge(with_key(
                    pb::CancelChargeRequest {
                        charge_id: charge_id.to_owned(),
                        idempotency_key: "can-1".to_owned(),
                    },
                    key,
                ))
                .await
                .unwrap_err();
            for err in [capture, refund, cancel] {
                assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
                assert!(!err.message().contains(charge_id), "{err:?}");
            }
        }
        let reconcile = vault
            .reconcile_charges(with_key(pb::ReconcileChargesRequest { limit: 0 }, key))
            .await
            .unwrap_err();
        assert_eq!(reconcile.code(), Code::PermissionDenied, "{reconcile:?}");
    }
}
