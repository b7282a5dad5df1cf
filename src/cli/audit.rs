//! `cardvault audit …`: verifies and anchors the audit log.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use cardvault::{audit, config::Settings, server};
use clap::Subcommand;

use super::setup::{self, CommandResult, Role};

/// The `audit` commands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
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

/// Runs `cardvault audit <command>`.
pub fn run(config: Option<&Path>, command: AuditCommand) -> ExitCode {
    setup::configured(config, Role::OneShot, Ok, |settings| async move {
        match command {
            AuditCommand::Verify { anchor } => verify(&settings, anchor.as_deref()).await,
            AuditCommand::Anchor { out } => anchor(&settings, out).await,
        }
    })
}

/// `cardvault audit anchor [--out FILE]`.
async fn anchor(settings: &Settings, out: Option<PathBuf>) -> CommandResult {
    let vault = server::open_vault(settings).await?;
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
    Ok(ExitCode::SUCCESS)
}

/// `cardvault audit verify [--anchor FILE]`: exit 1 when a chain is broken, an anchor line
/// is not authentic, or a chain no longer holds an anchored record.
async fn verify(settings: &Settings, anchor_file: Option<&Path>) -> CommandResult {
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
