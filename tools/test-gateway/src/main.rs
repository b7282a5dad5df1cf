//! The `cardvault-test-gateway` binary: a stand-alone test gateway for demos (no
//! configuration file, no database); logs go to stderr, the URL and secret key to stdout.

use std::process::ExitCode;

use cardvault::{config::LogFormat, server::shutdown_signal, telemetry};
use cardvault_test_gateway::TestGatewayArgs;
use clap::Parser;

/// Runs a Stripe-compatible test payment gateway (Stripe's test cards, idempotency keys)
/// until Ctrl-C, for demos (needs no configuration file and no database).
#[derive(Debug, Parser)]
#[command(name = "cardvault-test-gateway", version)]
struct Cli {
    #[command(flatten)]
    args: TestGatewayArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(telemetry::subscriber(
        LogFormat::Pretty,
        "info",
        std::io::stderr,
    ));
    // Card data passes through this process: panics must not print it.
    telemetry::install_panic_hook();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(cardvault_test_gateway::run_cli(
            &cli.args,
            shutdown_signal(),
        )),
        Err(err) => {
            eprintln!("cardvault-test-gateway: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}
