//! Honeytokens: canary cards that look real to callers and raise the alarm when touched.

use std::sync::Arc;

use cardvault::pb::v1::{self as pb, access_admin_client::AccessAdminClient};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    access::{operator, secure},
    helpers::{Backend, captured_logs, tokenize_request, with_key},
    on_both_backends,
};

on_both_backends!(a_honeytoken_has_a_bin_of_the_tenants_cards_and_no_cards_number);

/// A number with the given prefix and check digit, 16 digits long.
fn numbered(prefix: &str, n: u32) -> String {
    let body = format!("{prefix}{n:0width$}", width = 15 - prefix.len());
    let check = char::from(cardvault::card::luhn::check_digit(body.as_bytes()));
    format!("{body}{check}")
}

async fn a_honeytoken_has_a_bin_of_the_tenants_cards_and_no_cards_number(backend: Backend) {
    let s = secure(backend).await;
    // `fingerprint`: the stored cards' fingerprints are what a honeytoken must not match.
    let (_, shop) = s
        .api_key("acme", "shop", &["tokenize", "fingerprint"])
        .await;
    let mut client = s.vault().await;
    // The tenant's cards: two Mastercard BINs, one of them with a hundred cards, so a
    // number drawn under it would often be a stored card's were it not checked.
    let bins = ["55555555", "22230031"];
    let mut fingerprints = Vec::new();
    for (bin, count) in [(bins[0], 100), (bins[1], 3)] {
        for n in 0..count {
            let card = client
                .tokenize(with_key(tokenize_request(&numbered(bin, n)), &shop))
                .await
                .expect("tokenize")
                .into_inner()
                .card
                .expect("card");
            assert!(!card.fingerprint.is_empty(), "shown to fingerprint holders");
            fingerprints.push(card.fingerprint);
        }
    }
    let acme = cardvault::vault::TenantId::parse("acme").expect("tenant");
    for _ in 0..5 {
        let minted = s
            .ops
            .mint_honeytoken(
                &operator(),
                &acme,
                cardvault::card::TokenFormat::Opaque,
                cardvault::vault::Metadata::default(),
            )
            .await
            .expect("mint");
        assert!(bins.contains(&minted.bin.as_str()), "BIN {}", minted.bin);
        assert_eq!(minted.brand, cardvault::card::Brand::Mastercard);
        let hex = minted
            .fingerprint
            .expect("the vault's own view carries the fingerprint")
            .to_hex();
        assert!(
            !fingerprints.contains(&hex),
            "a honeytoken is a stored card's number"
        );
        fingerprints.push(hex);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touching_a_honeytoken_raises_an_alarm_but_looks_like_any_card() {
    let s = secure(Backend::Sqlite).await;
    let (_, admin) = s.global_operator("acme", "ops").await;
    let (_, thief) = s
        .api_key("acme", "stolen", &["tokenize", "read", "reveal"])
        .await;
    let minted = AccessAdminClient::new(s.app.channel().await)
        .mint_honeytoken(with_key(
            pb::MintHoneytokenRequest {
                tenant: "acme".to_owned(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("mint")
        .into_inner();
    let real = s.stored_token(&thief).await;
    let mut client = s.vault().await;

    // To the caller, the honeytoken is just another card.
    let view = |token: &str| {
        with_key(
            pb::GetCardRequest {
                token: token.to_owned(),
            },
            &thief,
        )
    };
    let canary = client
        .get_card(view(&minted.token))
        .await
        .expect("get")
        .into_inner();
    let genuine = client
        .get_card(view(&real))
        .await
        .expect("get")
        .into_inner();
    let (canary, genuine) = (canary.card.expect("card"), genuine.card.expect("card"));
    assert_eq!(canary.brand, genuine.brand);
    assert_eq!(canary.bin.len(), genuine.bin.len());
    assert_eq!(canary.token.len(), genuine.token.len());
    let revealed = client
        .reveal(with_key(
            pb::RevealRequest {
                token: minted.token.clone(),
            },
            &thief,
        ))
        .await
        .expect("reveal")
        .into_inner();
    assert_eq!(revealed.number.len(), 16);

    // The operators see it: audit records marked as alarms, an error log line, a metric.
    let alarms: &'static str = Box::leak(
        format!(
            "SELECT COUNT(*) FROM audit_records WHERE alarm AND token = '{}'",
            minted.token
        )
        .into_boxed_str(),
    );
    assert_eq!(s.state.count(alarms).await, 2);
    assert_eq!(
        s.state
            .count("SELECT COUNT(*) FROM audit_records WHERE alarm")
            .await,
        2,
        "only the honeytoken's accesses are alarms"
    );
    let logs = String::from_utf8_lossy(&captured_logs()).into_owned();
    let alarm_line = logs
        .lines()
        .find(|l| l.contains("HONEYTOKEN ACCESSED") && l.contains(&minted.token))
        .expect("an alarm log line");
    assert!(alarm_line.contains("\"level\":\"ERROR\""), "{alarm_line}");
    assert!(
        !logs.contains(&revealed.number),
        "the canary PAN was logged"
    );
    let metrics = https_get(&s, "/metrics").await;
    assert!(
        metrics.contains("cardvault_honeytoken_accesses_total"),
        "{metrics}"
    );
}

/// GET over TLS from the admin listener, trusting the test CA.
pub(crate) async fn https_get(s: &crate::access::Secure, path: &str) -> String {
    let ca = s.app.ca_pem.clone().expect("ca");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(s.app.admin_addr)
        .await
        .expect("connect admin");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut body = Vec::new();
    let _ = tls.read_to_end(&mut body).await;
    String::from_utf8_lossy(&body).into_owned()
}
