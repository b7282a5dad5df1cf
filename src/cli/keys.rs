//! `cardvault keys …`: `init` makes KEK version 1 from the configuration; the other commands
//! are clients of a running vault's KeyAdmin service.

use std::{path::Path, path::PathBuf, process::ExitCode};

use cardvault::{
    client::key_admin::{KeyAdminCommand, run_cli},
    config::{KeyProviderKind, Settings},
    crypto::{LocalKeyring, Pkcs11Provider},
};

use super::setup::{self, CommandResult, Role};

/// The `keys` commands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Creates KEK version 1: a new local keyring file (mode 0600), or, with
    /// keys.provider = "pkcs11", a key generated inside the HSM token. Refuses if one exists.
    Init {
        /// Local keyring only: where to write it (default: keys.keyring, else
        /// <data.dir>/keyring.toml).
        #[arg(long, value_name = "FILE")]
        keyring: Option<PathBuf>,
    },
    /// rotate-kek, rotate-deks, status, request-retire-kek, request-shred-tenant, approve.
    #[command(flatten)]
    KeyAdmin(KeyAdminCommand),
}

/// Runs `cardvault keys <command>`.
pub fn run(config: Option<&Path>, command: KeysCommand) -> ExitCode {
    match command {
        KeysCommand::Init { keyring } => setup::configured(config, Role::OneShot, Ok, |settings| {
            init(settings, keyring)
        }),
        KeysCommand::KeyAdmin(command) => key_admin(config, &command),
    }
}

/// `cardvault keys init`.
async fn init(settings: Settings, keyring: Option<PathBuf>) -> CommandResult {
    match settings.keys.provider {
        KeyProviderKind::Local => {
            let path = keyring.unwrap_or_else(|| settings.keyring_path());
            LocalKeyring::init(&path)?;
            println!(
                "created keyring {} (mode 0600) with KEK version 1. Back it up: every card \
                 stored under it is unreadable without it.",
                path.display()
            );
        }
        KeyProviderKind::Pkcs11 => {
            if keyring.is_some() {
                return Err("--keyring applies to the local key provider only".into());
            }
            let provider = Pkcs11Provider::init(settings.keys.pkcs11_config()?)?;
            println!("created KEK version 1 in token {}", provider.token_label());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cardvault keys <rotate-kek|…>`: a client of a running vault, with no configuration file.
fn key_admin(config: Option<&Path>, command: &KeyAdminCommand) -> ExitCode {
    if let Some(code) = setup::no_config(config, || {
        format!(
            "cardvault keys {}: --config is not used: this command calls a running vault; its \
             options are flags",
            command.name()
        )
    }) {
        return code;
    }
    setup::client(
        &format!("cardvault keys {}", command.name()),
        run_cli(command),
    )
}
