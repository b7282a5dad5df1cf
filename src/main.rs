//! The `cardvault` binary: parses the command line, loads configuration, starts telemetry
//! and hands over to the library.

use std::{path::PathBuf, process::ExitCode};

use cardvault::{
    config::{LogFormat, Settings},
    crypto::LocalKeyring,
    server, telemetry,
};
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
    Serve {
        /// Development mode: no TLS, loopback only, embedded SQLite and a generated keyring
        /// in --data-dir, every caller is tenant `dev` with every permission.
        #[arg(long)]
        dev: bool,
        /// Directory for the embedded database and the dev keyring (data.dir).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Applies database migrations and exits.
    Migrate,
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Creates a new local keyring (mode 0600) with one KEK; refuses to overwrite one.
    Init {
        /// Where to write it (default: keys.keyring, else <data.dir>/keyring.toml).
        #[arg(long, value_name = "FILE")]
        keyring: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match load_settings(&cli) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("cardvault: {err}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(telemetry::subscriber(
        settings.log.format,
        &settings.log.level,
        std::io::stdout,
    ));
    telemetry::install_panic_hook();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cardvault: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "cardvault failed");
            eprintln!("cardvault: {err}");
            ExitCode::FAILURE
        }
    }
}

fn load_settings(cli: &Cli) -> Result<Settings, Box<dyn std::error::Error>> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Command::Serve { dev, data_dir } = &cli.command {
        if let Some(dir) = data_dir {
            settings.data.dir = dir.clone();
        }
        if *dev {
            settings = settings.into_dev()?;
            // A terminal user reads pretty logs; `CARDVAULT_LOG_FORMAT=json` still wins.
            if std::env::var_os("CARDVAULT_LOG_FORMAT").is_none() {
                settings.log.format = LogFormat::Pretty;
            }
        }
    }
    Ok(settings)
}

async fn run(command: Command, settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Serve { .. } => {
            let app = server::build(settings).await?;
            println!(
                "cardvault listening: gRPC {} · admin http://{}",
                app.grpc_addr(),
                app.admin_addr()
            );
            app.run_until_stopped(shutdown_signal()).await?;
        }
        Command::Migrate => {
            let store = server::open_store(&settings).await?;
            store.migrate().await?;
            println!("migrations applied ({})", store.backend());
        }
        Command::Keys {
            command: KeysCommand::Init { keyring },
        } => {
            let path = keyring.unwrap_or_else(|| settings.keyring_path());
            LocalKeyring::init(&path)?;
            println!(
                "created keyring {} (mode 0600) with KEK version 1. Back it up: every card \
                 stored under it is unreadable without it.",
                path.display()
            );
        }
    }
    Ok(())
}

/// Completes on SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
