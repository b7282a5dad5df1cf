//! `cardvault keys rotate-kek | rotate-deks | status | request-retire-kek |
//! request-shred-tenant | approve`: the operators' client of the `KeyAdmin` service.
//!
//! These talk to a running vault over gRPC, never to the database: the vault runs the key
//! jobs, holds the key provider, checks `keys:admin` and dual control, and audits every
//! call under the caller's principal. So they need no configuration file, only a target and
//! credentials ([`ConnectArgs`]).
//!
//! Output goes to stdout as tab-separated lines whose first field says what the line is
//! (`kek`, `dek`, `job`, `request`, `shredded`) and whose second is the id, so scripts can
//! `grep ^job | cut -f2`; a sentence for the human goes to stderr. `status` prints readable
//! tables, or one JSON object with `--json`. A refused or failed call exits 1 with the gRPC
//! status; unusable flags exit 2.

use std::{fmt::Write as _, process::ExitCode};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tonic::{Status, transport::Channel};
use tonic_types::StatusExt;

use super::{ConnectArgs, Connection};
use crate::pb::v1::{self as pb, key_admin_client::KeyAdminClient};

/// A `cardvault keys` command that calls the `KeyAdmin` service of a running vault.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeyAdminCommand {
    /// Makes a new KEK version primary on a running vault and starts the job that rewraps
    /// every data key under it; prints the version and the job.
    RotateKek {
        /// The vault.
        #[command(flatten)]
        connection: ConnectArgs,
    },
    /// Makes new data keys active now (one tenant's or every tenant's); prints them.
    RotateDeks {
        /// Only this tenant's data key [default: every tenant's].
        #[arg(long)]
        tenant: Option<String>,
        /// Also re-encrypt every record under the new keys, then destroy the old ones.
        #[arg(long)]
        reencrypt: bool,
        /// The vault.
        #[command(flatten)]
        connection: ConnectArgs,
    },
    /// Shows the key provider, KEK versions, data keys, key jobs and pending requests.
    Status {
        /// Only this tenant's data keys [default: all].
        #[arg(long)]
        tenant: Option<String>,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
        /// The vault.
        #[command(flatten)]
        connection: ConnectArgs,
    },
    /// Asks for a KEK version to be destroyed; another keys:admin principal must approve.
    /// Prints the request.
    RequestRetireKek {
        /// The KEK version, from 1 (not the primary one).
        #[arg(value_name = "VERSION", value_parser = clap::value_parser!(u32).range(1..))]
        version: u32,
        /// The vault.
        #[command(flatten)]
        connection: ConnectArgs,
    },
    /// Asks for a tenant to be crypto-shredded (its keys destroyed, its cards deleted, its
    /// principals revoked); another keys:admin principal must approve. Prints the request.
    RequestShredTenant {
        /// The tenant.
        #[arg(value_name = "TENANT")]
        tenant: String,
        /// The vault.
        #[command(flatten)]
        connection: ConnectArgs,
    },
    /// Approves another principal's request and carries it out.
    Approve {
        /// The request id (kr_…), as `request-…` printed it.
        #[arg(value_name = "REQUEST_ID")]
        request_id: String,
        /// The vault.
        #[command(flatten)]
        connection: ConnectArgs,
    },
}

impl KeyAdminCommand {
    /// The subcommand's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            KeyAdminCommand::RotateKek { .. } => "rotate-kek",
            KeyAdminCommand::RotateDeks { .. } => "rotate-deks",
            KeyAdminCommand::Status { .. } => "status",
            KeyAdminCommand::RequestRetireKek { .. } => "request-retire-kek",
            KeyAdminCommand::RequestShredTenant { .. } => "request-shred-tenant",
            KeyAdminCommand::Approve { .. } => "approve",
        }
    }

    /// Its connection flags.
    pub fn connection(&self) -> &ConnectArgs {
        match self {
            KeyAdminCommand::RotateKek { connection }
            | KeyAdminCommand::RotateDeks { connection, .. }
            | KeyAdminCommand::Status { connection, .. }
            | KeyAdminCommand::RequestRetireKek { connection, .. }
            | KeyAdminCommand::RequestShredTenant { connection, .. }
            | KeyAdminCommand::Approve { connection, .. } => connection,
        }
    }
}

/// What a command prints: `stdout` for scripts, `note` (stderr) for the human.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Lines for stdout.
    pub stdout: String,
    /// Lines for stderr.
    pub note: String,
}

/// Runs `command` and prints its output; returns the exit code: 0 on success, 1 when the
/// vault could not be reached or refused the call (its status on stderr), 2 for unusable
/// flags.
pub async fn run_cli(command: &KeyAdminCommand) -> ExitCode {
    let name = command.name();
    let connection = match Connection::prepare(command.connection(), "keys") {
        Ok(connection) => connection,
        Err(err) => {
            eprintln!("cardvault keys {name}: {err}");
            return ExitCode::from(2);
        }
    };
    if connection.authorization().is_some() && !connection.is_tls() {
        eprintln!(
            "cardvault keys {name}: warning: sending the API key over plain text to {}",
            connection.target()
        );
    }
    let channel = match connection.connect().await {
        Ok(channel) => channel,
        Err(err) => {
            eprintln!("cardvault keys {name}: {err}");
            return ExitCode::FAILURE;
        }
    };
    match call(command, &connection, KeyAdminClient::new(channel)).await {
        Ok(output) => {
            print!("{}", output.stdout);
            eprint!("{}", output.note);
            ExitCode::SUCCESS
        }
        Err(status) => {
            eprintln!("cardvault keys {name}: {}", describe(&status));
            ExitCode::FAILURE
        }
    }
}

/// Sends the command's one RPC and formats the answer.
async fn call(
    command: &KeyAdminCommand,
    connection: &Connection,
    mut client: KeyAdminClient<Channel>,
) -> Result<Output, Status> {
    Ok(match command {
        KeyAdminCommand::RotateKek { .. } => rotated_kek(
            &client
                .rotate_kek(connection.request(pb::RotateKekRequest {}))
                .await?
                .into_inner(),
        ),
        KeyAdminCommand::RotateDeks {
            tenant, reencrypt, ..
        } => rotated_deks(
            &client
                .rotate_deks(connection.request(pb::RotateDeksRequest {
                    tenant: tenant.clone().unwrap_or_default(),
                    reencrypt: *reencrypt,
                }))
                .await?
                .into_inner(),
        ),
        KeyAdminCommand::Status { tenant, json, .. } => {
            let status = client
                .get_key_status(connection.request(pb::GetKeyStatusRequest {
                    tenant: tenant.clone().unwrap_or_default(),
                }))
                .await?
                .into_inner();
            Output {
                stdout: if *json {
                    format!("{}\n", status_json(&status))
                } else {
                    status_text(&status)
                },
                note: String::new(),
            }
        }
        KeyAdminCommand::RequestRetireKek { version, .. } => requested(
            client
                .request_retire_kek(connection.request(pb::RequestRetireKekRequest {
                    kek_version: *version,
                }))
                .await?
                .into_inner(),
        ),
        KeyAdminCommand::RequestShredTenant { tenant, .. } => requested(
            client
                .request_shred_tenant(connection.request(pb::RequestShredTenantRequest {
                    tenant: tenant.clone(),
                }))
                .await?
                .into_inner(),
        ),
        KeyAdminCommand::Approve { request_id, .. } => approved(
            &client
                .approve_key_request(connection.request(pb::ApproveKeyRequestRequest {
                    request_id: request_id.clone(),
                }))
                .await?
                .into_inner(),
        ),
    })
}

/// `NotFound: key request not found`, with each field violation of an INVALID_ARGUMENT.
pub fn describe(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(bad_request) = status.get_details_bad_request() {
        for violation in &bad_request.field_violations {
            let _ = write!(text, "; {}: {}", violation.field, violation.description);
        }
    }
    text
}

fn rotated_kek(response: &pb::RotateKekResponse) -> Output {
    let mut out = Output::default();
    let _ = writeln!(out.stdout, "kek\t{}\tprimary", response.kek_version);
    if let Some(job) = &response.job {
        out.stdout.push_str(&job_line(job));
        let _ = writeln!(
            out.note,
            "KEK v{} is primary; job {} rewraps {} keys under it (`cardvault keys status` shows \
             its progress)",
            response.kek_version, job.id, job.total
        );
    }
    out
}

fn rotated_deks(response: &pb::RotateDeksResponse) -> Output {
    let mut out = Output::default();
    for dek in &response.deks {
        let _ = writeln!(
            out.stdout,
            "dek\t{}\t{}\tv{}\t{}",
            dek.id,
            dek.tenant,
            dek.kek_version,
            if dek.active { "active" } else { "retired" }
        );
    }
    match &response.job {
        Some(job) => {
            out.stdout.push_str(&job_line(job));
            let _ = writeln!(
                out.note,
                "{} new data keys; job {} re-encrypts {} records under them, then destroys \
                 the old keys (`cardvault keys status` shows its progress)",
                response.deks.len(),
                job.id,
                job.total
            );
        }
        None => {
            let _ = writeln!(
                out.note,
                "{} new data keys; records sealed before stay under the old ones (--reencrypt \
                 moves them)",
                response.deks.len()
            );
        }
    }
    out
}

fn requested(response: pb::KeyRequestResponse) -> Output {
    let mut out = Output::default();
    if let Some(request) = &response.request {
        out.stdout.push_str(&request_line(request));
        let _ = writeln!(
            out.note,
            "another, independent keys:admin principal must approve before {}: cardvault keys \
             approve {}",
            time(request.expires_at.as_ref()),
            request.id
        );
    }
    out
}

fn approved(response: &pb::ApproveKeyRequestResponse) -> Output {
    let mut out = Output::default();
    if let Some(request) = &response.request {
        out.stdout.push_str(&request_line(request));
        let _ = writeln!(
            out.note,
            "request {} executed: {} {}",
            request.id,
            name(request.kind().as_str_name(), "KIND_"),
            request.target
        );
    }
    if let Some(shredded) = &response.shredded {
        let _ = writeln!(
            out.stdout,
            "shredded\t{}\t{}\t{}",
            shredded.cards, shredded.data_keys, shredded.principals
        );
        let _ = writeln!(
            out.note,
            "{} cards deleted, {} data keys destroyed, {} principals revoked",
            shredded.cards, shredded.data_keys, shredded.principals
        );
    }
    if !response.principal_id.is_empty() {
        let _ = writeln!(out.stdout, "principal\t{}", response.principal_id);
    }
    if !response.api_key.is_empty() {
        // This approval's purpose: the approver is the one shown the new key.
        let _ = writeln!(
            out.stdout,
            "api_key\t{}\t{}",
            response.api_key_id, response.api_key
        );
        let _ = writeln!(
            out.note,
            "API key {} shown once: hand it to its principal's owner through your secret manager",
            response.api_key_id
        );
    }
    out
}

/// `job <id> <kind> <state> <done>/<total>`.
fn job_line(job: &pb::KeyJob) -> String {
    format!(
        "job\t{}\t{}\t{}\t{}/{}\n",
        job.id,
        name(job.kind().as_str_name(), "KIND_"),
        name(job.state().as_str_name(), "STATE_"),
        job.done,
        job.total
    )
}

/// `request <id> <kind> <target> <state> <expires_at>`.
fn request_line(request: &pb::KeyRequest) -> String {
    format!(
        "request\t{}\t{}\t{}\t{}\t{}\n",
        request.id,
        name(request.kind().as_str_name(), "KIND_"),
        request.target,
        name(request.state().as_str_name(), "STATE_"),
        time(request.expires_at.as_ref())
    )
}

/// `KIND_RETIRE_KEK` → `retire_kek`.
fn name(value: &str, prefix: &str) -> String {
    value
        .strip_prefix(prefix)
        .unwrap_or(value)
        .to_ascii_lowercase()
}

/// RFC 3339 to the second, UTC.
fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    ts.and_then(|ts| OffsetDateTime::from_unix_timestamp(ts.seconds).ok())
        .and_then(|at| at.format(&Rfc3339).ok())
}

/// [`rfc3339`], or `-` when unset.
fn time(ts: Option<&prost_types::Timestamp>) -> String {
    rfc3339(ts).unwrap_or_else(|| "-".to_owned())
}

/// `90 days`, `36 hours`, `90 s`.
fn age(duration: Option<&prost_types::Duration>) -> String {
    match duration.map(|d| d.seconds) {
        None => "-".to_owned(),
        Some(s) if s > 0 && s % 86_400 == 0 => format!("{} days", s / 86_400),
        Some(s) if s > 0 && s % 3_600 == 0 => format!("{} hours", s / 3_600),
        Some(s) => format!("{s} s"),
    }
}

fn progress(done: u64, total: u64) -> String {
    if total == 0 {
        format!("{done}/{total}")
    } else {
        // For people to read: the rounding of huge counts does not matter.
        let percent = (done as f64 / total as f64 * 100.0).min(100.0);
        format!("{done}/{total} ({percent:.0}%)")
    }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// Columns left-aligned and separated by two spaces; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The status as tables for people.
pub fn status_text(status: &pb::GetKeyStatusResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "provider: {}", status.provider);
    let _ = writeln!(out, "primary KEK: v{}", status.primary_kek_version);
    let _ = writeln!(
        out,
        "new data key after: {} encryptions or {}",
        status.dek_max_encryptions,
        age(status.dek_max_age.as_ref())
    );

    out.push('\n');
    let keks: Vec<Vec<String>> = status
        .kek_versions
        .iter()
        .map(|kek| {
            vec![
                format!("v{}", kek.version),
                if kek.primary { "yes" } else { "no" }.to_owned(),
                kek.data_keys.to_string(),
                kek.tenant_secrets.to_string(),
                kek.audit_keys.to_string(),
                kek.records.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "KEK",
            "PRIMARY",
            "DATA_KEYS",
            "TENANT_SECRETS",
            "AUDIT_KEYS",
            "RECORDS",
        ],
        &keks,
    ));

    out.push('\n');
    if status.deks.is_empty() {
        out.push_str("no data keys\n");
    } else {
        let deks: Vec<Vec<String>> = status
            .deks
            .iter()
            .map(|dek| {
                vec![
                    dek.id.clone(),
                    dek.tenant.clone(),
                    format!("v{}", dek.kek_version),
                    if dek.active { "yes" } else { "no" }.to_owned(),
                    dek.records.to_string(),
                    dek.encryptions_reserved.to_string(),
                    time(dek.created_at.as_ref()),
                    time(dek.retired_at.as_ref()),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "DATA_KEY", "TENANT", "KEK", "ACTIVE", "RECORDS", "RESERVED", "CREATED", "RETIRED",
            ],
            &deks,
        ));
    }

    out.push('\n');
    if status.jobs.is_empty() {
        out.push_str("no key jobs\n");
    } else {
        let jobs: Vec<Vec<String>> = status
            .jobs
            .iter()
            .map(|job| {
                vec![
                    job.id.clone(),
                    name(job.kind().as_str_name(), "KIND_"),
                    name(job.state().as_str_name(), "STATE_"),
                    if job.tenant.is_empty() {
                        "*".to_owned()
                    } else {
                        job.tenant.clone()
                    },
                    progress(job.done, job.total),
                    or_dash(&job.requested_by).to_owned(),
                    or_dash(&job.worker).to_owned(),
                    time(job.created_at.as_ref()),
                    time(job.finished_at.as_ref()),
                    or_dash(&job.error).to_owned(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "JOB",
                "KIND",
                "STATE",
                "TENANT",
                "PROGRESS",
                "REQUESTED_BY",
                "WORKER",
                "STARTED",
                "FINISHED",
                "ERROR",
            ],
            &jobs,
        ));
    }

    out.push('\n');
    if status.pending_requests.is_empty() {
        out.push_str("no pending requests\n");
    } else {
        let requests: Vec<Vec<String>> = status
            .pending_requests
            .iter()
            .map(|request| {
                vec![
                    request.id.clone(),
                    name(request.kind().as_str_name(), "KIND_"),
                    request.target.clone(),
                    request.requested_by.clone(),
                    time(request.requested_at.as_ref()),
                    time(request.expires_at.as_ref()),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "REQUEST",
                "KIND",
                "TARGET",
                "REQUESTED_BY",
                "REQUESTED",
                "EXPIRES",
            ],
            &requests,
        ));
    }
    out
}

/// The status as one JSON object: the response's fields by their proto names, enums as
/// lower-case names (`rewrap`, `running`), times as RFC 3339 strings or null.
pub fn status_json(status: &pb::GetKeyStatusResponse) -> serde_json::Value {
    use serde_json::json;
    let opt_time = rfc3339;
    json!({
        "provider": status.provider,
        "primary_kek_version": status.primary_kek_version,
        "kek_versions": status.kek_versions.iter().map(|kek| json!({
            "version": kek.version,
            "primary": kek.primary,
            "data_keys": kek.data_keys,
            "tenant_secrets": kek.tenant_secrets,
            "audit_keys": kek.audit_keys,
            "records": kek.records,
        })).collect::<Vec<_>>(),
        "deks": status.deks.iter().map(|dek| json!({
            "id": dek.id,
            "tenant": dek.tenant,
            "kek_version": dek.kek_version,
            "active": dek.active,
            "records": dek.records,
            "encryptions_reserved": dek.encryptions_reserved,
            "created_at": opt_time(dek.created_at.as_ref()),
            "retired_at": opt_time(dek.retired_at.as_ref()),
        })).collect::<Vec<_>>(),
        "jobs": status.jobs.iter().map(|job| json!({
            "id": job.id,
            "kind": name(job.kind().as_str_name(), "KIND_"),
            "state": name(job.state().as_str_name(), "STATE_"),
            "tenant": job.tenant,
            "done": job.done,
            "total": job.total,
            "requested_by": job.requested_by,
            "worker": job.worker,
            "created_at": opt_time(job.created_at.as_ref()),
            "updated_at": opt_time(job.updated_at.as_ref()),
            "finished_at": opt_time(job.finished_at.as_ref()),
            "error": job.error,
        })).collect::<Vec<_>>(),
        "pending_requests": status.pending_requests.iter().map(|request| json!({
            "id": request.id,
            "kind": name(request.kind().as_str_name(), "KIND_"),
            "target": request.target,
            "requested_by": request.requested_by,
            "requested_at": opt_time(request.requested_at.as_ref()),
            "expires_at": opt_time(request.expires_at.as_ref()),
            "state": name(request.state().as_str_name(), "STATE_"),
        })).collect::<Vec<_>>(),
        "dek_max_encryptions": status.dek_max_encryptions,
        "dek_max_age_seconds": status.dek_max_age.as_ref().map(|d| d.seconds),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: KeyAdminCommand,
    }

    fn parse(args: &[&str]) -> Result<KeyAdminCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("keys").chain(args.iter().copied())).map(|c| c.command)
    }

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn status() -> pb::GetKeyStatusResponse {
        pb::GetKeyStatusResponse {
            provider: "local".to_owned(),
            primary_kek_version: 2,
            kek_versions: vec![
                pb::KekVersionInfo {
                    version: 1,
                    primary: false,
                    data_keys: 1,
                    tenant_secrets: 0,
                    audit_keys: 0,
                    records: 40,
                },
                pb::KekVersionInfo {
                    version: 2,
                    primary: true,
                    data_keys: 2,
                    tenant_secrets: 2,
                    audit_keys: 1,
                    records: 2,
                },
            ],
            deks: vec![pb::DataKeyInfo {
                id: "5f0c6a3e-0000-4000-8000-000000000001".to_owned(),
                tenant: "acme".to_owned(),
                kek_version: 1,
                active: false,
                records: 40,
                encryptions_reserved: 1024,
                created_at: ts(1_767_225_600),
                retired_at: ts(1_767_312_000),
            }],
            jobs: vec![pb::KeyJob {
                id: "kj_0123456789abcdef".to_owned(),
                kind: pb::key_job::Kind::Rewrap.into(),
                state: pb::key_job::State::Running.into(),
                done: 1,
                total: 4,
                requested_by: "p_admin".to_owned(),
                worker: "vault-0-abc".to_owned(),
                created_at: ts(1_767_312_000),
                updated_at: ts(1_767_312_001),
                ..pb::KeyJob::default()
            }],
            pending_requests: vec![pb::KeyRequest {
                id: "kr_0123456789abcdef".to_owned(),
                kind: pb::key_request::Kind::RetireKek.into(),
                target: "1".to_owned(),
                requested_by: "p_admin".to_owned(),
                requested_at: ts(1_767_312_000),
                expires_at: ts(1_767_315_600),
                state: pb::key_request::State::Pending.into(),
                ..pb::KeyRequest::default()
            }],
            dek_max_encryptions: 100_000_000,
            dek_max_age: Some(prost_types::Duration {
                seconds: 90 * 86_400,
                nanos: 0,
            }),
        }
    }

    #[test]
    fn every_subcommand_parses_with_connection_flags() {
        let status = parse(&[
            "status",
            "--tenant",
            "acme",
            "--json",
            "--target",
            "https://vault:50051",
            "--ca-file",
            "ca.pem",
            "--cert-file",
            "c.pem",
            "--key-file",
            "c.key",
            "--api-key-file",
            "key",
        ])
        .expect("parses");
        assert!(
            matches!(&status, KeyAdminCommand::Status { tenant: Some(t), json: true, .. } if t == "acme")
        );
        assert_eq!(status.connection().target, "https://vault:50051");
        assert!(matches!(
            parse(&["rotate-deks", "--reencrypt"]).expect("parses"),
            KeyAdminCommand::RotateDeks {
                tenant: None,
                reencrypt: true,
                ..
            }
        ));
        assert!(matches!(
            parse(&["request-retire-kek", "3"]).expect("parses"),
            KeyAdminCommand::RequestRetireKek { version: 3, .. }
        ));
        for (args, name) in [
            (&["rotate-kek"][..], "rotate-kek"),
            (&["request-shred-tenant", "acme"], "request-shred-tenant"),
            (&["approve", "kr_x"], "approve"),
        ] {
            let command = parse(args).expect("parses");
            assert_eq!(command.name(), name);
            assert_eq!(command.connection().target, "http://127.0.0.1:50051");
        }
    }

    #[test]
    fn version_zero_a_missing_argument_and_a_lone_cert_are_refused() {
        assert!(parse(&["request-retire-kek", "0"]).is_err());
        assert!(parse(&["request-shred-tenant"]).is_err());
        assert!(parse(&["approve"]).is_err());
        assert!(parse(&["status", "--cert-file", "c.pem"]).is_err());
    }

    #[test]
    fn the_status_table_names_the_provider_versions_keys_jobs_and_requests() {
        let text = status_text(&status());
        assert!(
            text.starts_with("provider: local\nprimary KEK: v2\n"),
            "{text}"
        );
        assert!(text.contains("100000000 encryptions or 90 days"), "{text}");
        assert!(
            text.contains("kj_0123456789abcdef  rewrap  running"),
            "{text}"
        );
        assert!(text.contains("1/4 (25%)"), "{text}");
        assert!(text.contains("kr_0123456789abcdef  retire_kek"), "{text}");
        assert!(text.contains("2026-01-01T00:00:00Z"), "{text}");
        let kek_rows: Vec<&str> = text.lines().filter(|l| l.starts_with('v')).collect();
        assert_eq!(kek_rows.len(), 2, "{text}");
        assert!(
            kek_rows[1]
                .split_whitespace()
                .eq(["v2", "yes", "2", "2", "1", "2"])
        );
        for line in text.lines() {
            assert_eq!(line, line.trim_end(), "no trailing spaces");
        }
    }

    #[test]
    fn an_empty_status_says_so_instead_of_printing_empty_tables() {
        let text = status_text(&pb::GetKeyStatusResponse {
            deks: vec![],
            jobs: vec![],
            pending_requests: vec![],
            ..status()
        });
        for empty in ["no data keys", "no key jobs", "no pending requests"] {
            assert!(text.contains(empty), "{text}");
        }
    }

    #[test]
    fn the_status_json_uses_proto_field_names_and_readable_enums() {
        let json = status_json(&status());
        assert_eq!(json["provider"], "local");
        assert_eq!(json["primary_kek_version"], 2);
        assert_eq!(json["kek_versions"][1]["audit_keys"], 1);
        assert_eq!(json["deks"][0]["retired_at"], "2026-01-02T00:00:00Z");
        assert_eq!(json["jobs"][0]["kind"], "rewrap");
        assert_eq!(json["jobs"][0]["state"], "running");
        assert_eq!(json["jobs"][0]["finished_at"], serde_json::Value::Null);
        assert_eq!(json["pending_requests"][0]["kind"], "retire_kek");
        assert_eq!(json["dek_max_age_seconds"], 90 * 86_400);
    }

    #[test]
    fn action_output_puts_a_kind_then_the_id_on_each_stdout_line() {
        let out = rotated_kek(&pb::RotateKekResponse {
            kek_version: 2,
            job: status().jobs.into_iter().next(),
        });
        assert_eq!(
            out.stdout,
            "kek\t2\tprimary\njob\tkj_0123456789abcdef\trewrap\trunning\t1/4\n"
        );
        assert!(out.note.contains("kj_0123456789abcdef"));

        let out = requested(pb::KeyRequestResponse {
            request: status().pending_requests.into_iter().next(),
        });
        assert_eq!(
            out.stdout,
            "request\tkr_0123456789abcdef\tretire_kek\t1\tpending\t2026-01-02T01:00:00Z\n"
        );
        assert!(
            out.note
                .contains("cardvault keys approve kr_0123456789abcdef")
        );

        let out = approved(&pb::ApproveKeyRequestResponse {
            request: Some(pb::KeyRequest {
                id: "kr_x".to_owned(),
                kind: pb::key_request::Kind::ShredTenant.into(),
                target: "acme".to_owned(),
                state: pb::key_request::State::Executed.into(),
                ..pb::KeyRequest::default()
            }),
            shredded: Some(pb::ShredResult {
                cards: 3,
                data_keys: 1,
                principals: 2,
            }),
            ..pb::ApproveKeyRequestResponse::default()
        });
        assert_eq!(
            out.stdout,
            "request\tkr_x\tshred_tenant\tacme\texecuted\t-\nshredded\t3\t1\t2\n"
        );
    }

    #[test]
    fn a_refusal_is_described_by_its_code_message_and_field_violations() {
        let status = Status::permission_denied("dual control: approve someone else's request");
        assert_eq!(
            describe(&status),
            "PermissionDenied: dual control: approve someone else's request"
        );
        let mut details = tonic_types::ErrorDetails::new();
        details.add_bad_request_violation("tenant", "must be 1 to 64 characters");
        let invalid =
            Status::with_error_details(tonic::Code::InvalidArgument, "invalid request", details);
        assert_eq!(
            describe(&invalid),
            "InvalidArgument: invalid request; tenant: must be 1 to 64 characters"
        );
    }
}
