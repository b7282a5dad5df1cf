//! The set-up every command shares: configuration, async runtime, telemetry, and the exit
//! code of a failure.

use std::{error::Error, future::Future, path::Path, process::ExitCode};

use cardvault::{config::Settings, telemetry};
use tokio::runtime::Runtime;

/// What a command's error turns into: its whole chain on stderr (and in the log), exit 1.
pub type CommandResult = Result<ExitCode, Box<dyn Error>>;

/// How a command that runs on the vault's configuration logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `serve`: logs to stdout (for the container runtime) and exports traces.
    Server,
    /// A one-shot command: prints its results on stdout, so its logs go to stderr; no traces.
    OneShot,
}

/// Runs a command on the vault's configuration: loads it from `config` (and the
/// environment), lets `adjust` apply the command's own flags, starts the runtime and
/// telemetry for `role`, runs `command` and flushes the traces. Exit code 2 when the
/// configuration is unusable, 1 when the runtime cannot start or the command fails (its
/// whole error chain printed as `cardvault: …`), else what the command returns.
pub fn configured<C, F>(
    config: Option<&Path>,
    role: Role,
    adjust: impl FnOnce(Settings) -> Result<Settings, Box<dyn Error>>,
    command: C,
) -> ExitCode
where
    C: FnOnce(Settings) -> F,
    F: Future<Output = CommandResult>,
{
    let settings = match Settings::load(config).map_err(Into::into).and_then(adjust) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("cardvault: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cardvault: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let traces = match role {
        // Traces are the server's only; their export worker runs on the runtime.
        Role::Server => match telemetry::Traces::start(&settings.telemetry, runtime.handle()) {
            Ok(traces) => traces,
            Err(err) => {
                eprintln!("cardvault: {err}");
                return ExitCode::from(2);
            }
        },
        Role::OneShot => None,
    };
    match role {
        Role::Server => telemetry::init(telemetry::subscriber_with_traces(
            settings.log.format,
            &settings.log.level,
            std::io::stdout,
            traces.as_ref(),
        )),
        Role::OneShot => telemetry::init(telemetry::subscriber(
            settings.log.format,
            &settings.log.level,
            std::io::stderr,
        )),
    }
    telemetry::install_panic_hook();

    let outcome = runtime.block_on(command(settings));
    // After the server stopped: the last spans out, within telemetry.shutdown_timeout_ms.
    if let Some(traces) = traces {
        runtime.block_on(traces.shutdown());
    }
    match outcome {
        Ok(code) => code,
        Err(err) => {
            let text = telemetry::error_chain(err.as_ref());
            // The target the line had when this code sat in the binary's root: log filters
            // keep matching it.
            tracing::error!(target: "cardvault", error = %text, "cardvault failed");
            eprintln!("cardvault: {text}");
            ExitCode::FAILURE
        }
    }
}

/// Refuses `--config` for a client of a running vault, whose options are all flags: exit
/// code 2 after `message` on stderr.
pub fn no_config(config: Option<&Path>, message: impl FnOnce() -> String) -> Option<ExitCode> {
    config.map(|_| {
        eprintln!("{}", message());
        ExitCode::from(2)
    })
}

/// Runs a client of a running vault on a multi-threaded runtime; `name` prefixes the error
/// when the runtime cannot start (exit code 1).
pub fn client<F>(name: &str, command: F) -> ExitCode
where
    F: Future<Output = ExitCode>,
{
    match Runtime::new() {
        Ok(runtime) => runtime.block_on(command),
        Err(err) => {
            eprintln!("{name}: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}
