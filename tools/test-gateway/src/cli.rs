//! `cardvault-test-gateway`: runs the test gateway until Ctrl-C, for demos.
//!
//! There is no `--tls-self-signed`: making a certificate needs an X.509 encoder, and the
//! workspace has one (rcgen) only for its tests. Without `--cert-file` the gateway speaks
//! plain HTTP on loopback, which the vault accepts only for a gateway marked as a loopback
//! test gateway; for HTTPS, pass a certificate (e.g. from `openssl req -x509` or mkcert).

use std::{future::Future, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use super::{TestGateway, TestGatewayOptions, cards};
use cardvault::{telemetry::error_chain, tls::TlsFiles};

/// Runs a Stripe-compatible test payment gateway (test cards, idempotency keys that expire,
/// search, capture, cancel and refunds) until Ctrl-C.
#[derive(Debug, Clone, clap::Args)]
pub struct TestGatewayArgs {
    /// Address to listen on; without TLS it must be loopback.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub addr: SocketAddr,
    /// Certificate chain (PEM) to serve HTTPS with; without it, plain HTTP on loopback.
    #[arg(long, value_name = "PEM", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of --cert-file.
    #[arg(long, value_name = "PEM", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Require client certificates chaining to this CA (PEM).
    #[arg(long, value_name = "PEM", requires = "cert_file")]
    pub client_ca_file: Option<PathBuf>,
    /// The API key clients must send as `Authorization: Bearer …`; a random `sk_test_…`
    /// when unset.
    #[arg(
        long,
        env = "CARDVAULT_TEST_GATEWAY_SECRET_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub secret_key: Option<String>,
    /// How long the hang card (4000000000001117) waits before answering.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub hang_secs: u64,
    /// How long an idempotency key is remembered after its first use; a repeat after that
    /// executes afresh, as after Stripe prunes a key (at least 24 hours there).
    #[arg(long, value_name = "SECONDS", default_value_t = 24 * 60 * 60)]
    pub idempotency_key_ttl_secs: u64,
}

/// Starts the gateway, prints its URL, secret key and test cards, and serves until
/// `shutdown` completes. Exit code 2 for unusable arguments, 1 when it cannot start.
pub async fn run_cli(args: &TestGatewayArgs, shutdown: impl Future<Output = ()>) -> ExitCode {
    let secret_key = match &args.secret_key {
        Some(key) if !key.is_empty() => key.clone(),
        Some(_) => {
            eprintln!("cardvault-test-gateway: --secret-key must not be empty");
            return ExitCode::from(2);
        }
        None => match cardvault::crypto::random_base62(24) {
            Ok(random) => format!("sk_test_{random}"),
            Err(err) => {
                eprintln!("cardvault-test-gateway: cannot make a secret key: {err}");
                return ExitCode::FAILURE;
            }
        },
    };
    let tls = match (&args.cert_file, &args.key_file) {
        (Some(cert_file), Some(key_file)) => Some(TlsFiles {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            client_ca_file: args.client_ca_file.clone(),
        }),
        _ => None,
    };
    let options = TestGatewayOptions {
        addr: args.addr,
        secret_key,
        hang: Duration::from_secs(args.hang_secs),
        idempotency_key_ttl: Duration::from_secs(args.idempotency_key_ttl_secs),
        tls,
    };
    let gateway = match TestGateway::start(options).await {
        Ok(gateway) => gateway,
        Err(err) => {
            eprintln!("cardvault-test-gateway: {}", error_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    println!("cardvault test gateway listening on {}", gateway.url());
    if !gateway.is_tls() {
        println!(
            "  plain HTTP, loopback only: mark the vault's gateway as a loopback test gateway"
        );
    }
    println!("  secret key: {}", gateway.secret_key());
    println!(
        "  Stripe-Version: {} (default {}); idempotency keys kept {} s",
        super::STRIPE_VERSIONS.join(", "),
        super::DEFAULT_STRIPE_VERSION,
        args.idempotency_key_ttl_secs
    );
    println!("  test cards (any future expiry, any CVC):");
    for (card, outcome) in [
        (
            cards::SUCCESS,
            "succeeds (requires_capture with capture_method=manual)",
        ),
        (cards::DECLINED, "card_declined / generic_decline"),
        (
            cards::INSUFFICIENT_FUNDS,
            "card_declined / insufficient_funds",
        ),
        (cards::EXPIRED, "expired_card"),
        (cards::INCORRECT_CVC, "incorrect_cvc"),
        (cards::PROCESSING_ERROR, "processing_error"),
        (cards::REQUIRES_ACTION, "requires_action (3-D Secure)"),
        (cards::HANG, "waits --hang-secs, then succeeds"),
        (
            cards::ANSWER_LOST,
            "succeeds, but answers 500 api_error (replayed as such)",
        ),
    ] {
        println!("    {card}  {outcome}");
    }
    println!("Ctrl-C stops it.");
    shutdown.await;
    gateway.shutdown().await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TestGatewayArgs,
    }

    #[test]
    fn keys_are_kept_a_day_unless_told_otherwise() {
        let default = Cli::try_parse_from(["test-gateway"]).unwrap().args;
        assert_eq!(default.idempotency_key_ttl_secs, 24 * 60 * 60);
        assert_eq!(
            Duration::from_secs(default.idempotency_key_ttl_secs),
            super::super::DEFAULT_IDEMPOTENCY_KEY_TTL
        );
        let short = Cli::try_parse_from(["test-gateway", "--idempotency-key-ttl-secs", "2"])
            .unwrap()
            .args;
        assert_eq!(short.idempotency_key_ttl_secs, 2);
        assert!(
            Cli::try_parse_from(["test-gateway", "--idempotency-key-ttl-secs", "soon"]).is_err()
        );
    }
}
