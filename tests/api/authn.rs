//! Authentication as an attacker meets it: refusal floods that must not grow the audit log,
//! lock-outs of valid keys by others' failures, forged `x-forwarded-for`, the `--dev`
//! caller, streams that outlive their key, shredded tenants, forged SPIFFE names and
//! world-readable key files.

use cardvault::{
    audit::{Action, AuditEvent, Outcome},
    pb::v1::{
        self as pb, access_admin_client::AccessAdminClient, audit_client::AuditClient,
        card_vault_client::CardVaultClient, key_admin_client::KeyAdminClient,
    },
    server,
    vault::{Credentials, VaultError},
};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};

use crate::{
    access::{Secure, operator, secure, secure_with},
    helpers::{Backend, spawn_app, tokenize_request, unique_pan, with_key},
    honeytoken::https_get,
    on_both_backends,
};

on_both_backends!(
    a_flood_of_bad_tokens_writes_a_bounded_number_of_audit_records,
    a_shredded_tenants_keys_stop_at_once,
    an_import_stream_ends_once_its_key_is_revoked,
);

fn get_card(key: &str) -> tonic::Request<pb::GetCardRequest> {
    with_key(
        pb::GetCardRequest {
            token: "tok_0000000000000000000000".to_owned(),
        },
        key,
    )
}

/// The code of a GetCard for a token that does not exist: NOT_FOUND means authenticated.
async fn get_code(
    client: &mut CardVaultClient<Channel>,
    request: tonic::Request<pb::GetCardRequest>,
) -> Code {
    client
        .get_card(request)
        .await
        .map_or_else(|status| status.code(), |_| Code::Ok)
}

/// `key` with its secret replaced: the same public key id, a wrong secret.
fn wrong_secret(key: &str) -> String {
    let (id, secret) = key.rsplit_once('_').expect("cv_<id>_<secret>");
    let flipped: String = secret
        .chars()
        .map(|c| if c == 'A' { 'B' } else { 'A' })
        .collect();
    format!("{id}_{flipped}")
}

async fn authenticate_rows(s: &Secure) -> i64 {
    s.state
        .count("SELECT COUNT(*) FROM audit_records WHERE action = 'authenticate'")
        .await
}

async fn a_flood_of_bad_tokens_writes_a_bounded_number_of_audit_records(backend: Backend) {
    let mut s = secure(backend).await;
    let mut client = s.vault().await;
    // The attack: hammer the vault with bad tokens; every refusal used to be a row.
    const N: usize = 500;
    for i in 0..N {
        let code = get_code(&mut client, get_card(&format!("cv_guess{i}"))).await;
        assert!(
            matches!(code, Code::Unauthenticated | Code::ResourceExhausted),
            "{code:?}"
        );
    }
    // The first refusal is on record at once, so an alarm on it is never late.
    assert_eq!(authenticate_rows(&s).await, 1);
    let metrics = https_get(&s, "/metrics").await;
    assert!(
        metrics.contains("cardvault_refusals_aggregated_total"),
        "{metrics}"
    );

    // The count of the rest is written when the window closes, at the latest on shutdown.
    s.app.stop().await;
    let rows = authenticate_rows(&s).await;
    assert!(rows <= 3, "{rows} audit rows for {N} refusals");
    let summaries = s
        .state
        .count(
            "SELECT COUNT(*) FROM audit_records WHERE action = 'authenticate' \
             AND detail LIKE '499 more refusals from 127.0.0.1 in 60 s (%'",
        )
        .await;
    assert_eq!(
        summaries, 1,
        "the count of the suppressed refusals is recorded"
    );
    let report = crate::audit::verify(&s.state).await;
    assert!(report.is_intact(), "{:?}", report.breaks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tries_on_a_valid_keys_id_do_not_lock_the_key_out() {
    let s = secure_with(Backend::Sqlite, |settings| {
        settings.limits.failed_auth_burst = 3;
        settings.limits.failed_auth_per_minute = 1;
    })
    .await;
    let (_, victim) = s.api_key("acme", "victim", &["read"]).await;
    let mut client = s.vault().await;
    // The attack: key ids are public; 50 bad tries on the victim's id used to lock it out.
    let forged = wrong_secret(&victim);
    let mut codes = Vec::new();
    for _ in 0..50 {
        codes.push(get_code(&mut client, get_card(&forged)).await);
    }
    assert_eq!(codes[..3], [Code::Unauthenticated; 3]);
    assert!(
        codes[3..].iter().all(|c| *c == Code::ResourceExhausted),
        "failures past the limit are throttled: {codes:?}"
    );
    // The valid key still gets in, from the same address, and again later.
    assert_eq!(
        get_code(&mut client, get_card(&victim)).await,
        Code::NotFound
    );
    assert_eq!(
        get_code(&mut client, get_card(&forged)).await,
        Code::ResourceExhausted
    );
    assert_eq!(
        get_code(&mut client, get_card(&victim)).await,
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_from_a_shared_address_do_not_lock_out_a_valid_key_there() {
    let s = secure_with(Backend::Sqlite, |settings| {
        settings.limits.failed_auth_burst = 3;
        settings.limits.failed_auth_per_minute = 1;
    })
    .await;
    let (_, good) = s.api_key("acme", "a", &["read"]).await;
    let mut client = s.vault().await;
    // One client behind the shared address (a sidecar, an ingress) keeps failing.
    for _ in 0..3 {
        assert_eq!(
            get_code(&mut client, get_card("cv_guess")).await,
            Code::Unauthenticated
        );
    }
    assert_eq!(
        get_code(&mut client, get_card("cv_guess")).await,
        Code::ResourceExhausted
    );
    // Another client behind it, with a valid key, used to be refused with it.
    assert_eq!(get_code(&mut client, get_card(&good)).await, Code::NotFound);
    let recorded = s
        .state
        .count(
            "SELECT COUNT(*) FROM audit_records WHERE action = 'authenticate' \
             AND outcome = 'unauthenticated'",
        )
        .await;
    assert_eq!(
        recorded, 1,
        "the first failure is recorded at once, the rest counted"
    );
}

fn forwarded(key: &str, client: &str) -> tonic::Request<pb::GetCardRequest> {
    let mut request = get_card(key);
    request
        .metadata_mut()
        .insert("x-forwarded-for", client.parse().expect("header value"));
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_believed_only_from_a_trusted_proxy() {
    let limits = |settings: &mut cardvault::config::Settings| {
        settings.limits.failed_auth_burst = 2;
        settings.limits.failed_auth_per_minute = 1;
    };
    // The attack: a client names a fresh address on every try to escape its limit.
    let s = secure_with(Backend::Sqlite, limits).await;
    let mut client = s.vault().await;
    let codes = [
        get_code(&mut client, forwarded("cv_guess", "198.51.100.1")).await,
        get_code(&mut client, forwarded("cv_guess", "198.51.100.2")).await,
        get_code(&mut client, forwarded("cv_guess", "198.51.100.3")).await,
    ];
    assert_eq!(
        codes,
        [
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::ResourceExhausted
        ]
    );
    let spoofed = s
        .state
        .count("SELECT COUNT(*) FROM audit_records WHERE peer LIKE '198.51.100.%'")
        .await;
    assert_eq!(
        spoofed, 0,
        "an untrusted peer's header reached the audit log"
    );

    // Behind a trusted proxy the header names the client: clients are counted apart.
    let s = secure_with(Backend::Sqlite, |settings| {
        limits(settings);
        settings.auth.trusted_proxies = vec!["127.0.0.0/8".to_owned()];
    })
    .await;
    let mut client = s.vault().await;
    let codes = [
        get_code(&mut client, forwarded("cv_guess", "6.6.6.6, 198.51.100.1")).await,
        get_code(&mut client, forwarded("cv_guess", "7.7.7.7, 198.51.100.1")).await,
        get_code(&mut client, forwarded("cv_guess", "198.51.100.1")).await,
        get_code(&mut client, forwarded("cv_guess", "198.51.100.2")).await,
    ];
    assert_eq!(
        codes,
        [
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::ResourceExhausted,
            Code::Unauthenticated
        ]
    );
    let named = s
        .state
        .count("SELECT COUNT(*) FROM audit_records WHERE peer LIKE '198.51.100.1 via 127.0.0.1:%'")
        .await;
    assert_eq!(named, 1, "the audit log names the client and the proxy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_caller_cannot_administer_keys_and_needs_a_loopback_peer() {
    let app = spawn_app(Backend::Sqlite).await;
    // The attack: anyone who reaches a --dev vault without credentials used to hold
    // keys:admin — mint API keys, rotate, request and approve its own shreds.
    let mut keys = KeyAdminClient::new(app.channel().await);
    let status = keys
        .get_key_status(pb::GetKeyStatusRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut access = AccessAdminClient::new(app.channel().await);
    let status = access
        .create_tenant(pb::CreateTenantRequest {
            tenant: "initech".to_owned(),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    // Card calls still work without credentials in --dev.
    let mut client = app.client.clone();
    client
        .tokenize(tokenize_request(&unique_pan()))
        .await
        .expect("tokenize as the dev caller");

    // The vault checks the peer of each request, not just the listener's address.
    let vault = server::open_vault(&app.state.settings("dev"))
        .await
        .expect("vault");
    let from = |peer: &str| Credentials {
        peer: Some(peer.parse().expect("addr")),
        ..Credentials::default()
    };
    let remote = vault.authenticate(from("192.0.2.1:5000"), None).await;
    assert!(
        matches!(remote, Err(VaultError::Unauthenticated)),
        "{remote:?}"
    );
    let local = vault
        .authenticate(from("127.0.0.1:5000"), None)
        .await
        .expect("loopback");
    assert_eq!(local.tenant().as_str(), "dev");
    assert!(
        !local
            .principal
            .permissions
            .contains(cardvault::vault::Permission::KeysAdmin)
    );
}

async fn an_import_stream_ends_once_its_key_is_revoked(backend: Backend) {
    // Every step of a stream checks the credentials again once the last check is older
    // than the credential cache time; 0 makes that every chunk.
    let s = secure_with(backend, |settings| settings.auth.credential_cache_ms = 0).await;
    let (importer, key) = s.api_key("acme", "importer", &["tokenize"]).await;
    let mut client = s.vault().await;
    let (chunks, requests) = tokio::sync::mpsc::channel(4);
    let mut responses = client
        .import_cards(with_key(
            tokio_stream::wrappers::ReceiverStream::new(requests),
            &key,
        ))
        .await
        .expect("stream starts")
        .into_inner();
    let chunk = |prefix: &str| pb::ImportCardsRequest {
        cards: vec![pb::ImportCard {
            import_id: format!("{prefix}-1"),
            card: Some(tokenize_request(&unique_pan()).card.expect("card")),
            ..Default::default()
        }],
    };
    chunks.send(chunk("before")).await.expect("send");
    let first = responses.next().await.expect("an answer").expect("ok");
    assert_eq!(first.results[0].status(), pb::ImportStatus::Created);

    // The attack: a stream opened before the revocation kept importing after it.
    s.ops
        .revoke_principal(&operator(), &importer)
        .await
        .expect("revoke");
    chunks.send(chunk("after")).await.expect("send");
    let status = responses
        .next()
        .await
        .expect("the stream ends with a status")
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        s.state
            .count("SELECT COUNT(*) FROM cards WHERE import_id LIKE 'after-%'")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_stream_ends_once_its_key_is_revoked() {
    let s = secure_with(Backend::Sqlite, |settings| {
        settings.auth.credential_cache_ms = 0;
    })
    .await;
    let (reader, key) = s.api_key("acme", "auditor", &["audit:read"]).await;
    // More of acme's records than one page of the stream (500), each large enough that the
    // client's flow-control window and the server's send buffers (about 64 KB and 400 KB)
    // hold far fewer than a page: the vault cannot read the second page ahead.
    let mut writes = tokio::task::JoinSet::new();
    for _ in 0..600 {
        let ops = s.ops.clone();
        writes.spawn(async move {
            let mut event = AuditEvent::now(Action::GetCard, Outcome::NotFound);
            event.tenant = Some("acme".to_owned());
            event.detail = Some("x".repeat(4000));
            ops.record(&event).await;
        });
    }
    writes.join_all().await;

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&s.pki.ca_pem))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", s.app.grpc_addr))
        .expect("endpoint")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    let mut audit = AuditClient::new(channel);
    let mut records = audit
        .list_audit_records(with_key(pb::ListAuditRecordsRequest::default(), &key))
        .await
        .expect("stream starts")
        .into_inner();
    records.next().await.expect("a record").expect("ok");
    // The attack: a reader revoked mid-stream kept reading every page.
    s.ops
        .revoke_principal(&operator(), &reader)
        .await
        .expect("revoke");
    let mut received = 1;
    let ended = loop {
        match records.next().await {
            Some(Ok(_)) => received += 1,
            Some(Err(status)) => break Some(status),
            None => break None,
        }
    };
    let status =
        ended.unwrap_or_else(|| panic!("the stream ended without a status after {received}"));
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(received, 500, "only the page read before the revocation");
}

async fn a_shredded_tenants_keys_stop_at_once(backend: Backend) {
    let s = secure(backend).await;
    // Shredding another tenant takes global operators.
    let (_, alice) = s.global_operator("acme", "alice").await;
    let (_, bob) = s.global_operator("acme", "bob").await;
    let (_, shop) = s.api_key("globex", "shop", &["read"]).await;
    let mut client = s.vault().await;
    // The key is verified and cached.
    assert_eq!(get_code(&mut client, get_card(&shop)).await, Code::NotFound);

    let mut keys = KeyAdminClient::new(s.app.channel().await);
    let request = keys
        .request_shred_tenant(with_key(
            pb::RequestShredTenantRequest {
                tenant: "globex".to_owned(),
            },
            &alice,
        ))
        .await
        .expect("request")
        .into_inner()
        .request
        .expect("a request");
    keys.approve_key_request(with_key(
        pb::ApproveKeyRequestRequest {
            request_id: request.id,
        },
        &bob,
    ))
    .await
    .expect("approve");
    // Right after the shred: no more FAILED_PRECONDITION from a cached principal.
    assert_eq!(
        get_code(&mut client, get_card(&shop)).await,
        Code::Unauthenticated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_common_name_shaped_like_a_spiffe_id_is_not_that_principal() {
    let s = secure(Backend::Sqlite).await;
    let id = "spiffe://acme.test/ns/shop/sa/reader";
    s.principal("acme", "reader", &["read"], Some(id)).await;
    let read = |path: &std::path::Path| std::fs::read_to_string(path).expect("PEM");
    // The attack: a certificate from the client CA with no URI SAN, its CN set to the ID.
    let (cert, key) = s.pki.client_cert("forged", None, id);
    let mut forged = CardVaultClient::new(s.app.channel_as(&read(&cert), &read(&key)).await);
    let code = forged
        .get_card(pb::GetCardRequest {
            token: "tok_0000000000000000000000".to_owned(),
        })
        .await
        .expect_err("refused")
        .code();
    assert_eq!(code, Code::Unauthenticated);
    // The real workload, with the ID as its URI SAN, is that principal.
    let (cert, key) = s.pki.client_cert("real", Some(id), "reader");
    let mut real = CardVaultClient::new(s.app.channel_as(&read(&cert), &read(&key)).await);
    let code = real
        .get_card(pb::GetCardRequest {
            token: "tok_0000000000000000000000".to_owned(),
        })
        .await
        .expect_err("no such card")
        .code();
    assert_eq!(code, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_readable_tls_key_refuses_start_up() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = secure(Backend::Sqlite).await;
    let settings = s.state.secure_settings(&s.pki);
    // The attack surface: a key any local user can copy, served as if it were secret.
    std::fs::set_permissions(&s.pki.server_key, std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    let err = server::build(settings)
        .await
        .expect_err("a world-readable key must not be served");
    let message = err.to_string();
    let key = s.pki.server_key.display().to_string();
    assert!(message.contains(&format!("chmod 600 {key}")), "{message}");
    assert!(message.contains("0644"), "{message}");
}
