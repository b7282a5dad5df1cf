//! The `cardvault` command line: one file per command group, each with its arguments and its
//! run function, all dispatched from [`main`]. [`setup`] is the one place that loads the
//! configuration, starts the async runtime and telemetry, and turns an error into the exit
//! code.
//!
//! Commands that run on the vault's configuration (`serve`, `migrate`, `keys init`,
//! `admin`, `audit`) go through [`setup::configured`]; the clients of a running vault
//! (`keys <rotate-kek|…>`, `charges`, `probe`) read no configuration file (`probe` only
//! when its flags leave a gap) and start only a runtime.

mod admin;
mod audit;
mod charges;
mod keys;
mod migrate;
mod probe;
mod serve;
mod setup;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// A payment-card tokenization vault.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file; every key can also be set as CARDVAULT_<SECTION>_<KEY>.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the vault.
    Serve(serve::ServeArgs),
    /// Applies database migrations and exits.
    Migrate,
    /// Key management: `init` makes a KEK before the first start; the other commands call
    /// a running vault's KeyAdmin service over gRPC as a keys:admin principal (they need no
    /// configuration file and no database: only --target and credentials).
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Tenants, principals, API keys and honeytokens, straight on the database: the bootstrap
    /// and break-glass path (needs the database and the key provider, so it can do everything
    /// and acts without dual control). Every action is written to the audit log as
    /// `local:unverified:<user>`: the OS user is not an identity the vault checks.
    Admin {
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Charges, through a running vault over gRPC (needs no configuration file).
    Charges {
        #[command(subcommand)]
        command: cardvault::client::charges::ChargesCommand,
    },
    /// Asks the admin port for /healthz (or --path /readyz) and exits 0 on 200, else 1: the
    /// container's health check, with no curl in the image (needs no database).
    Probe(cardvault::client::probe::ProbeArgs),
}

/// Parses the command line and runs the command; the process exits with what it returns.
pub fn main() -> ExitCode {
    let Cli { config, command } = Cli::parse();
    let config = config.as_deref();
    match command {
        Command::Serve(args) => serve::run(config, args),
        Command::Migrate => migrate::run(config),
        Command::Keys { command } => keys::run(config, command),
        Command::Admin { command } => admin::run(config, command),
        Command::Audit { command } => audit::run(config, command),
        Command::Charges { command } => charges::run(config, &command),
        Command::Probe(args) => probe::run(config, &args),
    }
}
