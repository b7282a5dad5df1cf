//! `cardvault charges …`: charges through a running vault over gRPC (no configuration file).

use std::{path::Path, process::ExitCode};

use cardvault::client::charges::{ChargesCommand, run_cli};

use super::setup;

/// Runs `cardvault charges <command>`.
pub fn run(config: Option<&Path>, command: &ChargesCommand) -> ExitCode {
    if let Some(code) = setup::no_config(config, || {
        "cardvault charges: --config is not used: this command calls a running vault".to_owned()
    }) {
        return code;
    }
    setup::client("cardvault charges", run_cli(command))
}
