//! The `cardvault` binary: the production vault and its operators' commands. Each command
//! group lives in `cli/`, which parses the command line, loads configuration, starts
//! telemetry and hands over to the library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
