//! The `cardvault` binary: parses the command line, loads configuration, starts telemetry
//! and hands over to the library.

use std::{path::PathBuf, process::ExitCode};

use cardvault::{
    audit,
    card::TokenFormat,
    client,
    config::{KeyProviderKind, LogFormat, Settings},
    crypto::{LocalKeyring, Pkcs11Provider},
    loadgen, server, telemetry, testgw,
    vault::{self, DualControlled, Metadata, NewPrincipal, Operator, Permissions, TenantId},
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
        /// in --data-dir, every loopback caller without credentials is tenant `dev` with every
        /// permission but keys:admin, gRPC reflection on.
        #[arg(long)]
        dev: bool,
        /// Directory for the embedded database and the dev keyring (data.dir).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Applies database migrations and exits.
    Migrate,
    /// Key management: `init` makes a KEK before the first start; the other commands call
    /// a running vault's KeyAdmin service over gRPC as a keys:admin principal (they need no
    /// configuration file and no database: only --target and credentials).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Tenants, principals, API keys and honeytokens, straight on the database: the bootstrap
    /// and break-glass path (needs the database and the key provider, so it can do everything
    /// and acts without dual control). Every action is written to the audit log as
    /// `local:unverified:<user>`: the OS user is not an identity the vault checks.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Load-generates against a running vault over gRPC and reports throughput and latency
    /// percentiles (needs no configuration file and no database).
    Bench(Box<loadgen::BenchArgs>),
    /// Runs a Stripe-compatible test payment gateway (Stripe's test cards, idempotency keys)
    /// until Ctrl-C, for demos (needs no configuration file and no database).
    TestGateway(testgw::TestGatewayArgs),
    /// Charges, through a running vault over gRPC (needs no configuration file).
    Charges {
        #[command(subcommand)]
        command: client::charges::ChargesCommand,
    },
    /// Asks the admin port for /healthz (or --path /readyz) and exits 0 on 200, else 1: the
    /// container's health check, with no curl in the image (needs no database).
    Probe(client::probe::ProbeArgs),
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Creates a tenant and its key material.
    CreateTenant {
        /// Tenant id: 1 to 64 of a-z, 0-9, '_' or '-'.
        tenant: String,
    },
    /// Creates a principal; prints its id.
    CreatePrincipal {
        /// Its tenant.
        #[arg(long)]
        tenant: String,
        /// Its name, unique in the tenant.
        #[arg(long)]
        name: String,
        /// Comma-separated: tokenize, read, reveal, charge, delete, keys:admin, audit:read,
        /// fingerprint. The CLI creates operators and card-data principals at once (the API
        /// only requests them): it is how the first operators are made.
        #[arg(long, value_delimiter = ',', required = true)]
        permissions: Vec<String>,
        /// SPIFFE ID or certificate CN it authenticates as over mTLS.
        #[arg(long)]
        mtls_identity: Option<String>,
        /// With keys:admin: an operator of every tenant, not only of --tenant.
        #[arg(long)]
        global_operator: bool,
    },
    /// Lists principals and their API key ids.
    ListPrincipals {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revokes a principal and all its API keys.
    RevokePrincipal {
        /// Principal id (p_…).
        principal_id: String,
    },
    /// Creates an API key and prints it, once.
    CreateApiKey {
        /// Principal id (p_…).
        principal_id: String,
        /// Days until it expires, 1 to 36600 (100 years); never when unset.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=36_600))]
        valid_for_days: Option<u32>,
    },
    /// Revokes an API key.
    RevokeApiKey {
        /// Key id (the part between `cv_` and the second `_`).
        key_id: String,
    },
    /// Mints a honeytoken card in a tenant and prints its token.
    MintHoneytoken {
        /// Its tenant.
        #[arg(long)]
        tenant: String,
        /// Issue a PAN-shaped token instead of an opaque one.
        #[arg(long)]
        pan_shaped: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Checks every audit chain end to end; exits 1 and names the first bad record of each
    /// broken chain. An older copy of the whole log passes this: check it against anchors
    /// (--anchor) to catch a rollback.
    Verify {
        /// Anchor file (JSON lines, from `audit anchor` or `audit.anchor_file`): every line
        /// must be an anchor this vault made and left unchanged, and every chain must still
        /// hold each record an anchor holds; exits 1 and names the chain and records if not.
        #[arg(long, value_name = "FILE")]
        anchor: Option<PathBuf>,
    },
    /// Anchors the audit log now: one JSON line stating every chain's head, MAC'd under a
    /// key derived from the audit key. Ship it where the database's writers cannot rewrite it.
    Anchor {
        /// Append it to FILE (created mode 0600; fsynced) instead of printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
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
    KeyAdmin(client::keys::KeyAdminCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A client of the vault, not the vault: no settings, no telemetry, no database.
    if let Command::Bench(args) = &cli.command {
        return bench(cli.config.as_deref(), args);
    }
    if let Command::Keys {
        command: KeysCommand::KeyAdmin(command),
    } = &cli.command
    {
        return keys_client(cli.config.as_deref(), command);
    }
    if let Command::TestGateway(args) = &cli.command {
        return test_gateway(cli.config.as_deref(), args);
    }
    if let Command::Charges { command } = &cli.command {
        if cli.config.is_some() {
            eprintln!(
                "cardvault charges: --config is not used: this command calls a running vault"
            );
            return ExitCode::from(2);
        }
        return match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime.block_on(client::charges::run_cli(command)),
            Err(err) => {
                eprintln!("cardvault charges: cannot start the async runtime: {err}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Probe(args) = &cli.command {
        return probe(cli.config.as_deref(), args);
    }
    let settings = match load_settings(&cli) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("cardvault: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cardvault: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Traces are the server's only; their export worker runs on the runtime.
    let traces = if matches!(cli.command, Command::Serve { .. }) {
        match telemetry::Traces::start(&settings.telemetry, runtime.handle()) {
            Ok(traces) => traces,
            Err(err) => {
                eprintln!("cardvault: {err}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    // The server logs to stdout (for the container runtime); the one-shot commands print
    // their results there, so their logs go to stderr.
    if matches!(cli.command, Command::Serve { .. }) {
        telemetry::init(telemetry::subscriber_with_traces(
            settings.log.format,
            &settings.log.level,
            std::io::stdout,
            traces.as_ref(),
        ));
    } else {
        telemetry::init(telemetry::subscriber(
            settings.log.format,
            &settings.log.level,
            std::io::stderr,
        ));
    }
    telemetry::install_panic_hook();

    let outcome = runtime.block_on(run(cli.command, settings));
    // After the server stopped: the last spans out, within telemetry.shutdown_timeout_ms.
    if let Some(traces) = traces {
        runtime.block_on(traces.shutdown());
    }
    match outcome {
        Ok(code) => code,
        Err(err) => {
            // The whole chain: "database unavailable" alone would hide a TLS or auth cause.
            let mut text = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            tracing::error!(error = %text, "cardvault failed");
            eprintln!("cardvault: {text}");
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

async fn run(command: Command, settings: Settings) -> Result<ExitCode, Box<dyn std::error::Error>> {
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
        } => match settings.keys.provider {
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
        },
        // Dispatched in `main` before settings load; it never gets here.
        Command::Bench(_) => return Err("bench runs without settings".into()),
        Command::TestGateway(_) => return Err("test-gateway runs without settings".into()),
        Command::Keys {
            command: KeysCommand::KeyAdmin(_),
        } => return Err("keys commands of a running vault run without settings".into()),
        Command::Charges { .. } => return Err("charges commands run without settings".into()),
        Command::Probe(_) => return Err("probe runs before settings load".into()),
        Command::Admin { command } => admin(command, &settings).await?,
        Command::Audit {
            command: AuditCommand::Verify { anchor },
        } => return audit_verify(&settings, anchor.as_deref()).await,
        Command::Audit {
            command: AuditCommand::Anchor { out },
        } => {
            let vault = server::open_vault(&settings).await?;
            let auditor = vault.auditor().await?;
            let anchor = auditor.anchor(vault.store().as_ref()).await?;
            match out {
                Some(path) => {
                    audit::AnchorSink::File(path.clone())
                        .append(&anchor)
                        .await?;
                    eprintln!(
                        "anchor {} ({} chains) appended to {}",
                        anchor.seq,
                        anchor.heads.len(),
                        path.display()
                    );
                }
                None => audit::AnchorSink::Stdout.append(&anchor).await?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cardvault audit verify [--anchor FILE]`: exit 1 when a chain is broken, an anchor line
/// is not authentic, or a chain no longer holds an anchored record.
async fn audit_verify(
    settings: &Settings,
    anchor_file: Option<&std::path::Path>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let vault = server::open_vault(settings).await?;
    let auditor = vault.auditor().await?;
    let anchors = match anchor_file {
        Some(path) => Some(auditor.read_anchors(path)?),
        None => None,
    };
    let report = match &anchors {
        Some(anchors) => audit::verify_anchored(vault.store().as_ref(), auditor, anchors).await?,
        None => audit::verify(vault.store().as_ref(), auditor).await?,
    };
    let mut failed = false;
    if report.breaks.is_empty() {
        println!(
            "audit log intact: {} records in {} chains verified",
            report.records, report.shards
        );
    } else {
        for broken in &report.breaks {
            println!("audit log BROKEN: {broken}");
        }
        println!(
            "{} of {} chains broken; {} records verified before the breaks",
            report.breaks.len(),
            report.shards,
            report.records
        );
        failed = true;
    }
    let Some(anchors) = anchors else {
        return Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    };
    for bad in &anchors.bad_lines {
        println!("audit anchor BAD: {bad}");
    }
    for broken in &report.anchor_breaks {
        let what = if broken.rolled_back {
            "ROLLED BACK"
        } else {
            "REWRITTEN"
        };
        println!("audit log {what}: {broken}");
    }
    failed |= !anchors.bad_lines.is_empty() || !report.anchor_breaks.is_empty();
    let newest = anchors
        .newest
        .map_or_else(|| "none".to_owned(), |newest| newest.to_string());
    println!(
        "anchors: {} of {} lines authentic (newest: {newest}); {} anchored heads match the \
         log; {} chains disagree with them",
        anchors.authentic(),
        anchors.lines,
        report.anchored,
        report.anchor_breaks.len()
    );
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The CLI acts at once; a request under dual control would be a bug.
const LOCAL_IS_DIRECT: &str = "the local CLI acts without dual control, yet a request was made";

async fn admin(
    command: AdminCommand,
    settings: &Settings,
) -> Result<(), Box<dyn std::error::Error>> {
    let vault = server::open_vault(settings).await?;
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let op = Operator::local(&user);
    match command {
        AdminCommand::CreateTenant { tenant } => {
            vault.create_tenant(&op, &TenantId::parse(&tenant)?).await?;
            println!("created tenant {tenant}");
        }
        AdminCommand::CreatePrincipal {
            tenant,
            name,
            permissions,
            mtls_identity,
            global_operator,
        } => {
            if !vault::admin::valid_principal_name(&name) {
                return Err("--name must be 1 to 64 of A-Z a-z 0-9 . _ -".into());
            }
            let permissions = Permissions::parse(permissions.iter().map(String::as_str))?;
            let created = vault
                .create_principal(
                    &op,
                    NewPrincipal {
                        tenant: TenantId::parse(&tenant)?,
                        name,
                        permissions,
                        mtls_identity,
                        global_operator,
                    },
                )
                .await?;
            match created {
                DualControlled::Done(row) => println!("{}", row.id),
                DualControlled::Pending(_) => return Err(LOCAL_IS_DIRECT.into()),
            }
        }
        AdminCommand::ListPrincipals { tenant } => {
            let tenant = tenant.as_deref().map(TenantId::parse).transpose()?;
            for p in vault.list_principals(&op, tenant.as_ref()).await? {
                let keys = vault.api_keys_of(&p.id).await?;
                let live_keys: Vec<&str> = keys
                    .iter()
                    .filter(|k| k.revoked_at.is_none())
                    .map(|k| k.id.as_str())
                    .collect();
                println!(
                    "{}\t{}\t{}\t{}{}\t{}\t{}\tkeys:{}",
                    p.id,
                    p.tenant_id,
                    p.name,
                    p.permissions.join(","),
                    if p.global_operator { " (global)" } else { "" },
                    p.mtls_identity.as_deref().unwrap_or("-"),
                    if p.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "live"
                    },
                    live_keys.join(",")
                );
            }
        }
        AdminCommand::RevokePrincipal { principal_id } => {
            match vault.revoke_principal(&op, &principal_id).await? {
                DualControlled::Done(()) => {
                    println!("revoked principal {principal_id} and its API keys");
                }
                DualControlled::Pending(_) => return Err(LOCAL_IS_DIRECT.into()),
            }
        }
        AdminCommand::CreateApiKey {
            principal_id,
            valid_for_days,
        } => {
            let valid_for = valid_for_days.map(|d| time::Duration::days(i64::from(d)));
            let DualControlled::Done(created) =
                vault.create_api_key(&op, &principal_id, valid_for).await?
            else {
                return Err(LOCAL_IS_DIRECT.into());
            };
            eprintln!(
                "API key {} for {principal_id}: shown once, store it in your secret manager",
                created.row.id
            );
            println!("{}", created.key.expose());
        }
        AdminCommand::RevokeApiKey { key_id } => {
            vault.revoke_api_key(&op, &key_id).await?;
            println!("revoked API key {key_id}");
        }
        AdminCommand::MintHoneytoken { tenant, pan_shaped } => {
            let format = if pan_shaped {
                TokenFormat::PanShaped
            } else {
                TokenFormat::Opaque
            };
            let view = vault
                .mint_honeytoken(&op, &TenantId::parse(&tenant)?, format, Metadata::default())
                .await?;
            println!("{}", view.token.as_str());
        }
    }
    Ok(())
}

fn bench(config: Option<&std::path::Path>, args: &loadgen::BenchArgs) -> ExitCode {
    if config.is_some() {
        eprintln!("cardvault bench: --config is not used by bench; its options are flags");
        return ExitCode::from(2);
    }
    // The generated cards pass through this process: panics must not print them.
    telemetry::install_panic_hook();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(loadgen::run_cli(args)),
        Err(err) => {
            eprintln!("cardvault bench: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `cardvault test-gateway`: a stand-alone server, like `bench` without settings; logs go to
/// stderr, the URL and secret key to stdout.
fn test_gateway(config: Option<&std::path::Path>, args: &testgw::TestGatewayArgs) -> ExitCode {
    if config.is_some() {
        eprintln!(
            "cardvault test-gateway: --config is not used by test-gateway; its options are flags"
        );
        return ExitCode::from(2);
    }
    telemetry::init(telemetry::subscriber(
        LogFormat::Pretty,
        "info",
        std::io::stderr,
    ));
    // Card data passes through this process: panics must not print it.
    telemetry::install_panic_hook();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(testgw::run_cli(args, shutdown_signal())),
        Err(err) => {
            eprintln!("cardvault test-gateway: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `cardvault probe`: no telemetry set-up, so a health check every few seconds adds no log
/// lines; it reads settings itself, and only when flags leave a gap.
fn probe(config: Option<&std::path::Path>, args: &client::probe::ProbeArgs) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(client::probe::run_cli(args, config)),
        Err(err) => {
            eprintln!("cardvault probe: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `cardvault keys <rotate-kek|…>`: a client of a running vault, like `bench`.
fn keys_client(
    config: Option<&std::path::Path>,
    command: &client::keys::KeyAdminCommand,
) -> ExitCode {
    if config.is_some() {
        eprintln!(
            "cardvault keys {}: --config is not used: this command calls a running vault; its \
             options are flags",
            command.name()
        );
        return ExitCode::from(2);
    }
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(client::keys::run_cli(command)),
        Err(err) => {
            eprintln!(
                "cardvault keys {}: cannot start the async runtime: {err}",
                command.name()
            );
            ExitCode::FAILURE
        }
    }
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
