//! `cardvault probe`: the container's health check of the admin port.

use std::{path::Path, process::ExitCode};

use cardvault::client::probe::{ProbeArgs, run_cli};

/// Runs `cardvault probe`. No telemetry set-up, so a health check every few seconds adds no
/// log lines; it reads settings itself, and only when flags leave a gap. One thread: it makes
/// one request.
pub fn run(config: Option<&Path>, args: &ProbeArgs) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run_cli(args, config)),
        Err(err) => {
            eprintln!("cardvault probe: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}
