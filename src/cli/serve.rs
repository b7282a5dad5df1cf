//! `cardvault serve`: runs the vault until SIGTERM or Ctrl-C.

use std::{path::Path, path::PathBuf, process::ExitCode};

use cardvault::{
    config::{LogFormat, Settings},
    server,
};

use super::setup::{self, CommandResult, Role};

/// The flags of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Development mode: no TLS, loopback only, embedded SQLite and a generated keyring
    /// in --data-dir, every loopback caller without credentials is tenant `dev` with every
    /// permission but keys:admin, gRPC reflection on.
    #[arg(long)]
    dev: bool,
    /// Directory for the embedded database and the dev keyring (data.dir).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl ServeArgs {
    /// The configuration with these flags applied.
    fn apply(self, mut settings: Settings) -> Result<Settings, Box<dyn std::error::Error>> {
        if let Some(dir) = self.data_dir {
            settings.data.dir = dir;
        }
        if self.dev {
            settings = settings.into_dev()?;
            // A terminal user reads pretty logs; `CARDVAULT_LOG_FORMAT=json` still wins.
            if std::env::var_os("CARDVAULT_LOG_FORMAT").is_none() {
                settings.log.format = LogFormat::Pretty;
            }
        }
        Ok(settings)
    }
}

/// Runs `cardvault serve`.
pub fn run(config: Option<&Path>, args: ServeArgs) -> ExitCode {
    setup::configured(config, Role::Server, |settings| args.apply(settings), serve)
}

async fn serve(settings: Settings) -> CommandResult {
    let app = server::build(settings).await?;
    println!(
        "cardvault listening: gRPC {} · admin http://{}",
        app.grpc_addr(),
        app.admin_addr()
    );
    app.run_until_stopped(server::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
