//! Charge latency overhead of the vault (issue 7; docs/benchmarks.md "Charge overhead").
//!
//! ```sh
//! cargo bench --bench charge                    # 300 charges each way
//! cargo bench --bench charge -- --charges 1000
//! ```
//!
//! In one run, against one test gateway (`cardvault_test_gateway`, plain HTTP on loopback so both
//! paths pay the same transport): `--charges` sequential charges made
//! 1. by a client straight at the gateway — the two Stripe calls a shop would make itself
//!    (create a card PaymentMethod, then create and confirm a PaymentIntent); and
//! 2. through the vault — `CardVault.Charge` over gRPC to a vault in this process (`--dev`,
//!    SQLite in a temp dir), which reads and decrypts the card, writes the `pending` charge
//!    row, makes the same two calls, settles the row and appends the audit record.
//!
//! It prints both latency distributions and their difference: what putting the vault on
//! the charge path costs.

use std::time::{Duration, Instant};

use cardvault::{
    config::Settings,
    pb::v1::{self as pb, card_vault_client::CardVaultClient},
    server,
};
use cardvault_test_gateway::{TestGateway, TestGatewayOptions, cards};

fn charges() -> usize {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--charges" {
            return args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--charges needs a number");
        }
    }
    300
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(name: &str, mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    let mean = samples.iter().sum::<Duration>().as_secs_f64() * 1000.0 / samples.len() as f64;
    println!(
        "{name:<34} n={:<5} mean {mean:>7.3} ms  p50 {:>7.3}  p90 {:>7.3}  p99 {:>7.3}  max {:>7.3}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
        percentile(&samples, 1.0),
    );
    percentile(&samples, 0.5)
}

/// The two Stripe calls, straight from a client.
async fn direct(client: &reqwest::Client, url: &str, secret: &str, i: usize) {
    let pm: serde_json::Value = client
        .post(format!("{url}/v1/payment_methods"))
        .bearer_auth(secret)
        .header("Idempotency-Key", format!("direct-{i}-pm"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!(
            "type=card&card%5Bnumber%5D={}&card%5Bexp_month%5D=12&card%5Bexp_year%5D=2030",
            cards::SUCCESS
        ))
        .send()
        .await
        .expect("payment method")
        .json()
        .await
        .expect("payment method json");
    let pm = pm["id"].as_str().expect("pm id");
    let pi: serde_json::Value = client
        .post(format!("{url}/v1/payment_intents"))
        .bearer_auth(secret)
        .header("Idempotency-Key", format!("direct-{i}-pi"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!(
            "amount=1999&currency=eur&payment_method={pm}&confirm=true&capture_method=automatic"
        ))
        .send()
        .await
        .expect("payment intent")
        .json()
        .await
        .expect("payment intent json");
    assert_eq!(pi["status"], "succeeded", "{pi}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = charges();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let gateway = TestGateway::start(TestGatewayOptions::default())
        .await
        .expect("test gateway");
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("gateway.key");
    std::fs::write(&secret, gateway.secret_key()).expect("secret");
    let mut settings = Settings::load(None).expect("defaults");
    settings.grpc.addr = "127.0.0.1:0".parse().expect("addr");
    settings.admin.addr = "127.0.0.1:0".parse().expect("addr");
    settings.data.dir = dir.path().to_owned();
    settings.log.level = "warn".to_owned();
    settings = settings.into_dev().expect("dev settings");
    #[derive(serde::Deserialize)]
    struct File {
        gateways: Vec<cardvault::gateway::GatewaySettings>,
    }
    let file: File = toml::from_str(&format!(
        "[[gateways]]\nname = \"test\"\nkind = \"stripe\"\nbase_url = \"{}\"\n\
         loopback_test_gateway = true\nsecret_file = \"{}\"\n",
        gateway.url(),
        secret.display()
    ))
    .expect("gateway settings");
    settings.gateways = file.gateways;
    let app = server::build(settings).await.expect("vault");
    let addr = app.grpc_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let mut vault = CardVaultClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the vault");
    let token = vault
        .tokenize(pb::TokenizeRequest {
            card: Some(pb::CardInput {
                number: cards::SUCCESS.to_owned(),
                exp_month: 12,
                exp_year: 2030,
                cardholder_name: String::new(),
            }),
            ..pb::TokenizeRequest::default()
        })
        .await
        .expect("tokenize")
        .into_inner()
        .token;
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
        .build()
        .expect("http client");

    // Warm up both paths (connections, caches, the vault's DEK and batcher).
    for i in 0..20 {
        direct(&http, &gateway.url(), gateway.secret_key(), 1_000_000 + i).await;
        charge(&mut vault, &token, &format!("warm-{i}")).await;
    }
    // Interleaved, so both paths see the same machine at the same moments.
    let (mut straight, mut through) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let started = Instant::now();
        direct(&http, &gateway.url(), gateway.secret_key(), i).await;
        straight.push(started.elapsed());
        let started = Instant::now();
        charge(&mut vault, &token, &format!("order-{i}")).await;
        through.push(started.elapsed());
    }
    println!("charge latency, {n} sequential charges each way, same run:");
    let a = report("client → test gateway (2 calls)", straight);
    let b = report("client → vault → test gateway", through);
    println!("vault overhead at p50: {:.3} ms", b - a);

    let _ = stop.send(());
    let _ = served.await;
    gateway.shutdown().await;
}

async fn charge(vault: &mut CardVaultClient<tonic::transport::Channel>, token: &str, key: &str) {
    let answer = vault
        .charge(pb::ChargeRequest {
            token: token.to_owned(),
            amount: 1999,
            currency: "EUR".to_owned(),
            gateway: "test".to_owned(),
            idempotency_key: key.to_owned(),
            ..pb::ChargeRequest::default()
        })
        .await
        .expect("charge")
        .into_inner();
    assert_eq!(
        answer.status,
        pb::ChargeStatus::Succeeded as i32,
        "{answer:?}"
    );
}
