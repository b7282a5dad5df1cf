//! `cardvault admin …`: tenants, principals, API keys and honeytokens, straight on the
//! database, as the local operator.

use std::{path::Path, process::ExitCode};

use cardvault::{
    card::TokenFormat,
    config::Settings,
    server,
    vault::{
        DualControlled, Metadata, NewPrincipal, Operator, Permissions, PrincipalName, TenantId,
    },
};
use clap::Subcommand;

use super::setup::{self, CommandResult, Role};

/// The `admin` commands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
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

/// Runs `cardvault admin <command>`.
pub fn run(config: Option<&Path>, command: AdminCommand) -> ExitCode {
    setup::configured(config, Role::OneShot, Ok, |settings| {
        admin(settings, command)
    })
}

/// The CLI acts at once; a request under dual control would be a bug.
const LOCAL_IS_DIRECT: &str = "the local CLI acts without dual control, yet a request was made";

async fn admin(settings: Settings, command: AdminCommand) -> CommandResult {
    let vault = server::open_vault(&settings).await?;
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
            let name = PrincipalName::parse(&name).map_err(|e| format!("--{e}"))?;
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
    Ok(ExitCode::SUCCESS)
}
