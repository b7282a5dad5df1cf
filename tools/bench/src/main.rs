//! The `cardvault-bench` binary: load-generates against a running vault over gRPC and
//! reports throughput and latency percentiles (no configuration file, no database).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cardvault_bench::BenchArgs::parse();
    // The generated cards pass through this process: panics must not print them.
    cardvault::telemetry::install_panic_hook();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(cardvault_bench::run_cli(&args)),
        Err(err) => {
            eprintln!("cardvault-bench: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}
