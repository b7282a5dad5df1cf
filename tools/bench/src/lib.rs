//! `cardvault-bench`: a load generator that speaks the vault's real gRPC API.
//!
//! - [`BenchArgs`] is the command line; [`Bench::prepare`] checks it and reads the files it
//!   names (CA, client certificate, API key); [`Bench::run`] connects, fills the token pool,
//!   warms up, measures and returns a [`Report`].
//! - **Closed loop** (default): `--concurrency` workers spread round-robin over
//!   `--connections` HTTP/2 connections, each sending its next request when the previous one
//!   has answered.
//! - **Open loop** (`--rate`): requests are due at fixed intervals whatever the answers; the
//!   workers bound how many are in flight. Latency runs from the due time, so a vault that
//!   stalls is charged for the requests it kept waiting (no coordinated omission).
//! - Cards come from [`cards`]: random, Luhn-valid, distinct, never printed.
//! - `reveal`, `get` and `mixed` first tokenize `--pool` cards (not measured) and then pick
//!   among their tokens at random. `mixed` is [`MIX_TOKENIZE_PERCENT`] % tokenize,
//!   [`MIX_GET_PERCENT`] % get, the rest reveal.
//!
//! - `import` streams `--requests` cards through `ImportCards` ([`import`]).
//!
//! The tool needs no configuration file and no database: only a target. It is a workspace
//! member of its own, so the vault's production build never carries it, and it uses only the
//! client side of the `cardvault` library: the generated protobuf code, the connection flags
//! of [`cardvault::client`], Luhn, and the panic hook and error chain of
//! [`cardvault::telemetry`].

#![forbid(unsafe_code)]

pub mod cards;
pub mod import;
pub mod report;
mod runner;

use std::{process::ExitCode, time::Duration};

use tonic::{metadata::AsciiMetadataValue, transport::Endpoint};
#[cfg(test)]
use zeroize::Zeroizing;

pub use import::ImportReport;
pub use report::{Latency, Report, RpcStats};

pub use cardvault::client::API_KEY_ENV;
use cardvault::{
    client::{ClientError, ConnectArgs, Connection},
    pb::v1 as pb,
    telemetry::error_chain,
};

/// Share of tokenize requests in the `mixed` workload, in percent.
pub const MIX_TOKENIZE_PERCENT: u64 = 20;
/// Share of get requests in the `mixed` workload, in percent; the rest are reveals.
pub const MIX_GET_PERCENT: u64 = 40;

/// In an open loop, a send that leaves more than this after its due time counts as late:
/// every worker was busy when it fell due.
pub const LATE_AFTER: Duration = Duration::from_millis(1);

/// Duration of the measured phase when neither `--duration` nor `--requests` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Load-generates against a running vault over gRPC and reports throughput and latency
/// percentiles (needs no configuration file and no database).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "cardvault-bench", version)]
pub struct BenchArgs {
    /// The vault to load (`--target`, TLS and API key flags).
    #[command(flatten)]
    pub connection: ConnectArgs,
    /// What to send; mixed is 20 % tokenize, 40 % get, 40 % reveal; import streams
    /// --requests cards through ImportCards, one stream per connection.
    #[arg(long, value_enum, default_value_t = Workload::Tokenize)]
    pub rpc: Workload,
    /// Workers, i.e. requests in flight at most.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// HTTP/2 connections the workers are spread over, round-robin.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub connections: u32,
    /// Length of the measured phase, e.g. 10s, 500ms, 2m [default: 10s].
    #[arg(long, value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Measure exactly this many requests instead of a duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Load sent before measuring, not counted (connections, caches and the database warm up).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Open loop: this many requests per second in total, whatever the answers.
    #[arg(long, value_name = "REQ/S", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Cards tokenized before a reveal, get or mixed run, whose tokens the run then reads.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub pool: u32,
    /// Cards per ImportCards message (--rpc import).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub chunk: u32,
    /// Token format asked for by tokenize requests.
    #[arg(long, value_enum, default_value_t = TokenFormatArg::Opaque)]
    pub token_format: TokenFormatArg,
}

/// What a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Tokenize fresh random cards.
    Tokenize,
    /// Reveal tokens from the pool.
    Reveal,
    /// GetCard on tokens from the pool.
    Get,
    /// A fixed mix of tokenize, get and reveal.
    Mixed,
    /// Bulk import through the ImportCards stream.
    Import,
}

impl Workload {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Tokenize => "tokenize",
            Workload::Reveal => "reveal",
            Workload::Get => "get",
            Workload::Mixed => "mixed",
            Workload::Import => "import",
        }
    }

    /// The RPCs this workload sends, in report order.
    pub fn rpcs(self) -> &'static [Rpc] {
        match self {
            Workload::Tokenize => &[Rpc::Tokenize],
            Workload::Reveal => &[Rpc::Reveal],
            Workload::Get => &[Rpc::Get],
            Workload::Mixed => &[Rpc::Tokenize, Rpc::Get, Rpc::Reveal],
            Workload::Import => &[],
        }
    }

    /// Whether the run reads tokens, and so needs a pool first.
    fn needs_pool(self) -> bool {
        !matches!(self, Workload::Tokenize | Workload::Import)
    }
}

/// One RPC of the `CardVault` service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `Tokenize`.
    Tokenize,
    /// `GetCard`.
    Get,
    /// `Reveal`.
    Reveal,
}

impl Rpc {
    /// The name used in reports (`by_rpc` keys).
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Tokenize => "tokenize",
            Rpc::Get => "get",
            Rpc::Reveal => "reveal",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// `--token-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenFormatArg {
    /// `tok_` and 22 base62 characters.
    Opaque,
    /// Digits, the PAN's length, failing Luhn.
    PanShaped,
}

impl TokenFormatArg {
    fn to_pb(self) -> pb::TokenFormat {
        match self {
            TokenFormatArg::Opaque => pb::TokenFormat::Opaque,
            TokenFormatArg::PanShaped => pb::TokenFormat::PanShaped,
        }
    }
}

/// Where progress goes while a run is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nowhere (tests, embedding).
    Off,
    /// One line a second on stderr, rewritten in place when stderr is a terminal.
    Stderr,
}

/// Why a run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The arguments or the files they name are unusable.
    #[error("{0}")]
    Usage(String),
    /// A connection to the target could not be set up.
    #[error("cannot connect to {target}: {cause}")]
    Connect {
        /// The `--target`.
        target: String,
        /// The whole cause chain (TCP, TLS, HTTP/2).
        cause: String,
    },
    /// Tokenizing the pool failed, so there is nothing to read.
    #[error("tokenizing the pool of cards failed: {0}")]
    Pool(String),
    /// Ctrl-C before the measured phase started.
    #[error("interrupted before the measured phase")]
    Interrupted,
    /// The OS random generator failed.
    #[error("cannot seed the card generator from the OS random generator")]
    Random,
}

impl From<ClientError> for BenchError {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::Usage(message) => BenchError::Usage(message),
            ClientError::Connect { target, cause } => BenchError::Connect { target, cause },
        }
    }
}

/// When the measured phase ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    After(Duration),
    Requests(u64),
}

/// A checked run, ready to go: arguments validated, files read.
pub struct Bench {
    target: String,
    endpoint: Endpoint,
    workload: Workload,
    concurrency: usize,
    connections: usize,
    end: End,
    warmup: Duration,
    rate: Option<f64>,
    pool: usize,
    chunk: usize,
    token_format: pb::TokenFormat,
    /// `Bearer <key>`, marked sensitive so HTTP/2 never indexes it in HPACK tables.
    authorization: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for Bench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bench")
            .field("target", &self.target)
            .field("workload", &self.workload)
            .field("concurrency", &self.concurrency)
            .field("connections", &self.connections)
            .field("end", &self.end)
            .field("warmup", &self.warmup)
            .field("rate", &self.rate)
            .field("pool", &self.pool)
            .field("authenticated", &self.authorization.is_some())
            .finish_non_exhaustive()
    }
}

impl Bench {
    /// Checks `args` and reads the CA, client certificate and API key they name (the API
    /// key from `$CARDVAULT_API_KEY` when no file is given).
    pub fn prepare(args: &BenchArgs) -> Result<Bench, BenchError> {
        Bench::from_connection(args, Connection::prepare(&args.connection, "bench")?)
    }

    /// As [`Bench::prepare`], with the environment's API key given.
    #[cfg(test)]
    fn prepare_with_env_key(
        args: &BenchArgs,
        env_key: Option<Zeroizing<String>>,
    ) -> Result<Bench, BenchError> {
        let connection = Connection::prepare_with_env_key(&args.connection, "bench", env_key)?;
        Bench::from_connection(args, connection)
    }

    fn from_connection(args: &BenchArgs, connection: Connection) -> Result<Bench, BenchError> {
        let usage = |message: String| BenchError::Usage(message);
        if args.rpc == Workload::Import && (args.requests.is_none() || args.rate.is_some()) {
            return Err(usage(
                "--rpc import needs --requests N (cards to import) and takes no --rate".to_owned(),
            ));
        }
        if args.connections > args.concurrency {
            return Err(usage(format!(
                "--connections {} exceeds --concurrency {}: some connections would carry nothing",
                args.connections, args.concurrency
            )));
        }

        Ok(Bench {
            target: connection.target().to_owned(),
            endpoint: connection.endpoint().clone(),
            workload: args.rpc,
            concurrency: args.concurrency as usize,
            connections: args.connections as usize,
            end: match args.requests {
                Some(n) => End::Requests(n),
                None => End::After(args.duration.unwrap_or(DEFAULT_DURATION)),
            },
            warmup: args.warmup,
            rate: args.rate,
            pool: if args.rpc.needs_pool() {
                args.pool as usize
            } else {
                0
            },
            chunk: args.chunk as usize,
            token_format: args.token_format.to_pb(),
            authorization: connection.authorization().cloned(),
        })
    }

    /// Whether requests carry an API key.
    pub fn has_api_key(&self) -> bool {
        self.authorization.is_some()
    }

    /// Connects, fills the pool, warms up and measures. Completing `interrupt` (Ctrl-C in
    /// the CLI) stops sending; what was measured so far is reported.
    pub async fn run(
        &self,
        progress: Progress,
        interrupt: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Report, BenchError> {
        if self.workload == Workload::Import {
            return Err(BenchError::Usage(
                "an import run is started with Bench::run_import".to_owned(),
            ));
        }
        runner::run(self, progress, interrupt).await
    }

    /// Runs an `--rpc import` bench: every card through `ImportCards`.
    pub async fn run_import(&self) -> Result<ImportReport, BenchError> {
        import::run(self).await
    }
}

/// Parses a duration: a non-negative decimal number followed by `ms`, `s`, `m` or `h`
/// (`500ms`, `10s`, `1.5s`, `2m`). A bare number is refused: `10` could mean anything.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} needs a unit: e.g. 10s, 500ms, 2m"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 10s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: the unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is out of range"))
}

/// Parses `--rate`: requests per second, a positive number.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 && rate <= 10_000_000.0 => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a rate: requests per second, above 0 and at most 10000000"
        )),
    }
}

/// `cardvault-bench`: prepares, runs, prints the report on stdout (text or `--json`) and
/// returns the exit code: 0 when the run happened (errors are in the report), 2 for unusable
/// arguments, 1 when the target or the pool could not be set up.
pub async fn run_cli(args: &BenchArgs) -> ExitCode {
    let bench = match Bench::prepare(args) {
        Ok(bench) => bench,
        Err(err) => {
            eprintln!("cardvault-bench: {err}");
            return ExitCode::from(2);
        }
    };
    if bench.has_api_key() && !args.connection.target.starts_with("https://") {
        eprintln!(
            "cardvault-bench: warning: sending the API key over plain text to {}",
            args.connection.target
        );
    }
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No signal handling here: never interrupt rather than stop at once.
            std::future::pending::<()>().await;
        }
        // The first Ctrl-C waits for requests in flight; a second one must still quit.
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("cardvault-bench: interrupted twice, quitting without a report");
                std::process::exit(130);
            }
        });
    };
    if args.rpc == Workload::Import {
        return match bench.run_import().await {
            Ok(report) => {
                if args.json {
                    println!("{}", report.to_json());
                } else {
                    print!("{}", report.to_text());
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("cardvault-bench: {err}");
                ExitCode::FAILURE
            }
        };
    }
    match bench.run(Progress::Stderr, interrupt).await {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            if report.total().ok == 0 {
                eprintln!(
                    "cardvault-bench: warning: no request succeeded (see the errors by code)"
                );
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("cardvault-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(extra: &[&str]) -> Result<BenchArgs, clap::Error> {
        BenchArgs::try_parse_from(std::iter::once("bench").chain(extra.iter().copied()))
    }

    #[test]
    fn durations_take_ms_s_m_and_h_with_decimals() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn durations_without_a_known_unit_or_number_are_refused() {
        for bad in ["10", "", "s", "abc", "-1s", "10x", "1..5s", "10 s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rates_must_be_positive_and_finite() {
        assert_eq!(parse_rate("2500"), Ok(2500.0));
        assert_eq!(parse_rate("0.5"), Ok(0.5));
        for bad in ["0", "-1", "NaN", "inf", "fast", ""] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn defaults_are_a_ten_second_closed_loop_tokenize_run() {
        let args = args(&[]).expect("defaults parse");
        assert_eq!(args.connection.target, "http://127.0.0.1:50051");
        assert_eq!(args.rpc, Workload::Tokenize);
        assert_eq!((args.concurrency, args.connections), (32, 4));
        assert_eq!(args.warmup, Duration::from_secs(2));
        assert_eq!(args.pool, 1000);
        let bench = Bench::prepare_with_env_key(&args, None).expect("prepares");
        assert_eq!(bench.end, End::After(Duration::from_secs(10)));
        assert_eq!(bench.rate, None);
        assert_eq!(bench.pool, 0, "tokenize needs no pool");
        assert!(!bench.has_api_key());
    }

    #[test]
    fn every_documented_flag_parses() {
        let args = args(&[
            "--target",
            "https://vault.internal:443",
            "--rpc",
            "mixed",
            "--concurrency",
            "64",
            "--connections",
            "8",
            "--requests",
            "5000",
            "--warmup",
            "0s",
            "--rate",
            "1000",
            "--json",
            "--ca-file",
            "ca.pem",
            "--cert-file",
            "c.pem",
            "--key-file",
            "c.key",
            "--api-key-file",
            "key",
            "--tls-server-name",
            "vault",
            "--pool",
            "50",
            "--token-format",
            "pan-shaped",
        ])
        .expect("parses");
        assert_eq!(args.rpc, Workload::Mixed);
        assert_eq!(args.requests, Some(5000));
        assert_eq!(args.rate, Some(1000.0));
        assert_eq!(args.token_format, TokenFormatArg::PanShaped);
        assert!(args.json);
    }

    #[test]
    fn duration_and_requests_exclude_each_other_and_a_cert_needs_its_key() {
        assert!(args(&["--duration", "1s", "--requests", "10"]).is_err());
        assert!(args(&["--cert-file", "c.pem"]).is_err());
        assert!(args(&["--key-file", "c.key"]).is_err());
        assert!(args(&["--concurrency", "0"]).is_err());
        assert!(args(&["--rpc", "delete"]).is_err());
    }

    #[test]
    fn bad_targets_and_tls_flags_without_tls_are_usage_errors() {
        let prepare = |extra: &[&str]| {
            Bench::prepare_with_env_key(&args(extra).expect("parses"), None).map(drop)
        };
        for extra in [
            &["--target", "127.0.0.1:50051"][..],
            &["--target", "ftp://127.0.0.1:50051"],
            &["--target", "https://127.0.0.1:50051"],
            &["--ca-file", "ca.pem"],
            &["--concurrency", "2", "--connections", "3"],
        ] {
            assert!(
                matches!(prepare(extra), Err(BenchError::Usage(_))),
                "{extra:?} accepted"
            );
        }
    }

    #[test]
    fn the_api_key_comes_from_its_file_before_the_environment_and_is_never_echoed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("key");
        std::fs::write(&file, "cv_abc_secret\n").expect("write key");
        let from_file = Bench::prepare_with_env_key(
            &args(&["--api-key-file", file.to_str().expect("utf-8")]).expect("parses"),
            Some(Zeroizing::new("cv_env_other".to_owned())),
        )
        .expect("prepares");
        let header = from_file.authorization.as_ref().expect("a key");
        assert_eq!(header.to_str().expect("ascii"), "Bearer cv_abc_secret");
        assert!(header.is_sensitive());
        assert!(!format!("{from_file:?}").contains("secret"));

        let from_env = Bench::prepare_with_env_key(
            &args(&[]).expect("parses"),
            Some(Zeroizing::new("cv_env_key".to_owned())),
        )
        .expect("prepares");
        assert_eq!(
            from_env
                .authorization
                .as_ref()
                .expect("a key")
                .to_str()
                .expect("ascii"),
            "Bearer cv_env_key"
        );

        std::fs::write(&file, "cv_bad\u{7f}key").expect("write key");
        let err = Bench::prepare_with_env_key(
            &args(&["--api-key-file", file.to_str().expect("utf-8")]).expect("parses"),
            None,
        )
        .expect_err("refused");
        assert!(!err.to_string().contains("cv_bad"));
    }

    #[test]
    fn requests_mode_and_pool_follow_the_arguments() {
        let bench = Bench::prepare_with_env_key(
            &args(&["--rpc", "reveal", "--requests", "7", "--pool", "3"]).expect("parses"),
            None,
        )
        .expect("prepares");
        assert_eq!(bench.end, End::Requests(7));
        assert_eq!(bench.pool, 3);
    }
}
