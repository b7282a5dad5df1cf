//! `cardvault migrate`: applies the database migrations and exits.

use std::{path::Path, process::ExitCode};

use cardvault::{config::Settings, server};

use super::setup::{self, CommandResult, Role};

/// Runs `cardvault migrate`.
pub fn run(config: Option<&Path>) -> ExitCode {
    setup::configured(config, Role::OneShot, Ok, migrate)
}

async fn migrate(settings: Settings) -> CommandResult {
    let store = server::open_store(&settings).await?;
    store.migrate().await?;
    println!("migrations applied ({})", store.backend());
    Ok(ExitCode::SUCCESS)
}
