//! `/metrics` after real traffic: every family the vault promises is there, with values the
//! traffic explains, as histograms where it times or sizes something; and no card number,
//! CVC or token appears in it.
//!
//! The recorder is process-wide and the other tests of this binary feed it too, so checks
//! are "present" and "grew", never exact totals.

use std::time::Duration;

use cardvault::{
    card::TokenFormat,
    pb::v1 as pb,
    server,
    vault::{Metadata, TenantId},
};
use cardvault_test_gateway::cards;

use crate::{
    access::{operator, secure},
    charge::{card, charge, rig_tuned},
    errors::http_get,
    helpers::{AppState, Backend, spawn_with, tokenize_request, unique_pan},
    honeytoken::https_get,
    import::{card as import_card, chunk, import},
    on_both_backends,
};

on_both_backends!(traffic_shows_in_every_metric_family_and_no_card_data_does);

/// One sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// The samples of one scrape.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(response: &str) -> Scrape {
        let text = response
            .split_once("\r\n\r\n")
            .map_or(response, |(_, body)| body)
            .to_owned();
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("sample has a value");
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, labels_of(rest.trim_end_matches('}'))),
                    None => (series, Vec::new()),
                };
                (name.to_owned(), labels, value)
            })
            .collect();
        Scrape { text, samples }
    }

    /// The sum of `name`'s samples carrying every label in `want`; `None` when none does.
    fn value(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, value)| *value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Asserts `name{want}` is present and above zero.
    fn positive(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let value = self
            .value(name, want)
            .unwrap_or_else(|| panic!("{name}{want:?} missing from:\n{}", self.text));
        assert!(value > 0.0, "{name}{want:?} = {value}");
        value
    }

    /// Asserts `name{want}` is present (zero allowed).
    fn present(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.value(name, want)
            .unwrap_or_else(|| panic!("{name}{want:?} missing from:\n{}", self.text))
    }

    /// Asserts the family is a histogram (with buckets, not a summary's quantiles) that
    /// counted something with `want`, and that its description was registered.
    fn histogram(&self, name: &str, want: &[(&str, &str)]) {
        assert!(
            self.text.contains(&format!("# TYPE {name} histogram")),
            "{name} is not a histogram:\n{}",
            self.text
        );
        self.described(name);
        self.positive(&format!("{name}_count"), want);
        assert!(
            self.value(&format!("{name}_bucket"), &[("le", "+Inf")])
                .is_some(),
            "{name} has no buckets"
        );
    }

    fn described(&self, name: &str) {
        assert!(
            self.text.contains(&format!("# HELP {name} ")),
            "{name} has no description"
        );
    }

    /// Every label value of every sample.
    fn label_values(&self) -> impl Iterator<Item = &str> {
        self.samples
            .iter()
            .flat_map(|(_, labels, _)| labels.iter().map(|(_, v)| v.as_str()))
    }
}

/// `a="x",b="y"` → pairs; the vault's label values hold no quotes or commas.
fn labels_of(text: &str) -> Vec<(String, String)> {
    text.split("\",")
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').expect("label pair");
            (key.to_owned(), value.trim_matches('"').to_owned())
        })
        .collect()
}

async fn traffic_shows_in_every_metric_family_and_no_card_data_does(backend: Backend) {
    // A DEK cache of one key, and a new DEK every two cards: the second DEK evicts the
    // first, and revealing a card sealed under the first misses and evicts again.
    let mut rig = rig_tuned(backend, Duration::from_secs(30), 5_000, |s| {
        s.keys.dek_cache_size = 1;
        s.keys.dek_max_encryptions = 2;
    })
    .await;
    let settings = rig.app.state.settings("dev");
    let ops = server::open_vault(&settings).await.expect("operator vault");
    let dev = TenantId::parse("dev").expect("tenant");
    let client = &mut rig.app.client;
    let backend_name = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };

    // The canary: a card number and CVC that must appear nowhere in the scrape.
    let pan = unique_pan();
    let cvc = "739";
    let canary = card(client, &pan, cvc).await;
    let mut shaped = tokenize_request(&pan);
    shaped.token_format = pb::TokenFormat::PanShaped.into();
    let shaped = client
        .tokenize(shaped)
        .await
        .expect("pan-shaped tokenize")
        .into_inner()
        .token;
    let revealed = client
        .reveal(pb::RevealRequest {
            token: canary.clone(),
        })
        .await
        .expect("reveal")
        .into_inner();
    assert_eq!(revealed.number, pan);
    // A failing call: no such token.
    let missing = client
        .get_card(pb::GetCardRequest {
            token: "tok_AAAAAAAAAAAAAAAAAAAAAA".to_owned(),
        })
        .await
        .expect_err("no such card");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    // A charge the test gateway approves: pending, then succeeded.
    let paying = card(client, cards::SUCCESS, "123").await;
    let charged = charge(
        client,
        &paying,
        "stripe",
        &format!("m-{}", uuid::Uuid::new_v4()),
    )
    .await;
    assert_eq!(
        pb::ChargeStatus::try_from(charged.status),
        Ok(pb::ChargeStatus::Succeeded)
    );
    // An import, a honeytoken touched, cards sealed under a newer DEK revealed next to the
    // canary, and a KEK rotation whose rewrap job this test runs itself.
    let imported = import(
        client,
        vec![chunk(vec![import_card(
            &format!("metrics-{}", uuid::Uuid::new_v4()),
            &unique_pan(),
        )])],
    )
    .await;
    assert_eq!(imported.len(), 1);
    let honeytoken = ops
        .mint_honeytoken(&operator(), &dev, TokenFormat::Opaque, Metadata::default())
        .await
        .expect("mint");
    client
        .get_card(pb::GetCardRequest {
            token: honeytoken.token.as_str().to_owned(),
        })
        .await
        .expect("a honeytoken looks like any card");
    let after_rotation = card(client, &unique_pan(), "").await;
    for token in [&after_rotation, &canary, &after_rotation] {
        client
            .reveal(pb::RevealRequest {
                token: token.clone(),
            })
            .await
            .expect("reveal");
    }
    let (_, job) = ops.rotate_kek(&operator()).await.expect("rotate KEK");
    let (_stop, stop) = tokio::sync::watch::channel(false);
    // The app's own job runner may claim the job first; either way its gauges appear.
    let _ = ops.work_on_key_jobs("metrics-test", &stop).await;

    let mut scrape = Scrape::parse(&http_get(rig.app.admin_addr, "/metrics").await);
    for _ in 0..100 {
        if scrape
            .value("cardvault_key_job_items_expected", &[("job_id", &job.id)])
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        scrape = Scrape::parse(&http_get(rig.app.admin_addr, "/metrics").await);
    }

    // Database pool and group commit.
    scrape.histogram(
        "cardvault_db_pool_acquire_duration_seconds",
        &[("backend", backend_name)],
    );
    scrape.present("cardvault_db_pool_connections", &[("state", "idle")]);
    scrape.present("cardvault_db_pool_connections", &[("state", "in_use")]);
    scrape.positive("cardvault_db_pool_max_connections", &[]);
    scrape.present("cardvault_db_pool_waiters", &[]);
    scrape.histogram(
        "cardvault_db_batch_commit_duration_seconds",
        &[("backend", backend_name)],
    );
    scrape.histogram("cardvault_write_batch_size", &[]);
    // Buckets fit for 0.1 ms to 10 s.
    for le in ["0.0001", "10"] {
        scrape.present(
            "cardvault_db_batch_commit_duration_seconds_bucket",
            &[("le", le)],
        );
    }

    // Keys.
    scrape.positive("cardvault_dek_cache_hits_total", &[]);
    scrape.positive("cardvault_dek_cache_misses_total", &[]);
    scrape.positive("cardvault_dek_cache_evictions_total", &[]);
    for operation in ["wrap", "unwrap", "rotate"] {
        scrape.histogram(
            "cardvault_key_provider_request_duration_seconds",
            &[("provider", "local"), ("operation", operation)],
        );
        scrape.present(
            "cardvault_key_provider_errors_total",
            &[("provider", "local"), ("operation", operation)],
        );
    }
    let job_labels = [("kind", "rewrap"), ("job_id", job.id.as_str())];
    let expected = scrape.present("cardvault_key_job_items_expected", &job_labels);
    let done = scrape.present("cardvault_key_job_items_done", &job_labels);
    assert!(done <= expected, "done {done} of {expected}");

    // Charges and the gateway.
    scrape.positive(
        "cardvault_charges_total",
        &[("gateway", "stripe"), ("status", "pending")],
    );
    scrape.positive(
        "cardvault_charges_total",
        &[("gateway", "stripe"), ("status", "succeeded")],
    );
    scrape.positive(
        "cardvault_gateway_requests_total",
        &[("gateway", "stripe"), ("outcome", "succeeded")],
    );
    scrape.histogram(
        "cardvault_gateway_latency_seconds",
        &[("gateway", "stripe"), ("outcome", "succeeded")],
    );

    // Audit and alarms.
    scrape.positive("cardvault_audit_appends_total", &[("outcome", "ok")]);
    scrape.positive("cardvault_audit_appends_total", &[("outcome", "not_found")]);
    scrape.present(
        "cardvault_audit_verify_failures_total",
        &[("check", "head")],
    );
    scrape.positive("cardvault_honeytoken_accesses_total", &[("tenant", "dev")]);

    // Build info.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        scrape.value("cardvault_build_info", &[("version", version)]),
        Some(1.0),
        "{}",
        scrape.text
    );
    let sha = scrape
        .samples
        .iter()
        .find(|(n, _, _)| n == "cardvault_build_info")
        .and_then(|(_, labels, _)| labels.iter().find(|(k, _)| k == "git_sha"))
        .map(|(_, v)| v.clone())
        .expect("git_sha label");
    assert!(
        sha == "unknown" || sha.bytes().all(|b| b.is_ascii_hexdigit()),
        "{sha}"
    );

    // The canary scan. A CVC is three digits, which counts and bucket bounds may hold by
    // chance, so it is looked for in label values (where a leak would be); everything
    // longer is looked for in the whole text.
    let first6_last4 = format!("{}{}", &pan[..6], &pan[pan.len() - 4..]);
    for forbidden in [
        pan.as_str(),
        &pan[..12],
        &first6_last4,
        &canary,
        &shaped,
        &paying,
        &after_rotation,
        honeytoken.token.as_str(),
    ] {
        assert!(
            !scrape.text.contains(forbidden),
            "{forbidden} appears in /metrics"
        );
    }
    for value in scrape.label_values() {
        assert!(
            !value.contains(cvc) && !value.contains(&pan[pan.len() - 4..]),
            "label value {value:?} holds the canary's CVC or last four"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_expiry_gauge_is_the_served_certificates_not_after() {
    let s = secure(Backend::Sqlite).await;
    let der = s.pki.server_cert_der();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("test certificate parses");
    let not_after = cert.validity().not_after.timestamp() as f64;
    let scrape = Scrape::parse(&https_get(&s, "/metrics").await);
    scrape.described("cardvault_tls_certificate_expiry_timestamp_seconds");
    for listener in ["grpc", "admin"] {
        assert_eq!(
            scrape.value(
                "cardvault_tls_certificate_expiry_timestamp_seconds",
                &[("listener", listener)]
            ),
            Some(not_after),
            "{listener}: {}",
            scrape.text
        );
    }
}

on_both_backends!(a_chain_head_altered_in_the_database_counts_as_an_audit_verify_failure);

async fn a_chain_head_altered_in_the_database_counts_as_an_audit_verify_failure(backend: Backend) {
    let state = std::sync::Arc::new(AppState::new(backend).await);
    let mut settings = state.settings("dev");
    settings.audit.anchor_file = Some(state.dir.path().join("anchors.jsonl"));
    settings.audit.anchor_interval_secs = 1;
    let mut app = spawn_with(state.clone(), "dev", settings).await;
    app.tokenize(&unique_pan()).await;
    let failures = |scrape: &Scrape| {
        scrape.present(
            "cardvault_audit_verify_failures_total",
            &[("check", "head")],
        )
    };
    let before = failures(&Scrape::parse(&http_get(app.admin_addr, "/metrics").await));

    // A head moved without its MAC: what an attacker hiding records would have to do.
    state
        .execute("UPDATE audit_heads SET seq = seq + 1000", &[])
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let scrape = Scrape::parse(&http_get(app.admin_addr, "/metrics").await);
        if failures(&scrape) > before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no verify failure counted within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}
