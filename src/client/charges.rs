//! `cardvault charges …`: the caller-side tool for charges, a gRPC client of a running vault
//! (the vault holds the cards and talks to the gateways).

use std::process::ExitCode;

use tonic::transport::Channel;

use super::{
    ConnectArgs, Connection,
    charge_ops::{self, OperationArgs},
    key_admin::describe,
};
use crate::{
    gateway::OperationKind,
    pb::v1::{self as pb, card_vault_client::CardVaultClient},
};

/// A `cardvault charges` command.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ChargesCommand {
    /// Settles the caller's tenant's charges whose outcome is unknown (timeouts, lost
    /// connections) by sending them again under their gateway idempotency keys; prints one
    /// line per charge: `charge <id> <idempotency key> <status> <gateway payment id>`.
    Reconcile {
        /// At most this many charges (1 to 100).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100))]
        limit: u32,
        /// The vault (a principal with the `charge` permission).
        #[command(flatten)]
        connection: ConnectArgs,
    },
    /// Captures a charge made with manual capture (all of it, or --amount); prints one line:
    /// `capture <operation id> <charge id> <status> <amount> <gateway id> <message>`.
    Capture(OperationArgs),
    /// Refunds a captured charge (all that remains, or --amount); prints one line as capture.
    Refund(OperationArgs),
    /// Cancels an authorized, uncaptured charge; prints one line as capture.
    Cancel(OperationArgs),
}

/// Runs `command`; returns 0 on success, 1 when the vault could not be reached or refused
/// the call, 2 for unusable flags.
pub async fn run_cli(command: &ChargesCommand) -> ExitCode {
    let (limit, connection) = match command {
        ChargesCommand::Reconcile { limit, connection } => (limit, connection),
        ChargesCommand::Capture(args) => {
            return charge_ops::run(OperationKind::Capture, args).await;
        }
        ChargesCommand::Refund(args) => return charge_ops::run(OperationKind::Refund, args).await,
        ChargesCommand::Cancel(args) => return charge_ops::run(OperationKind::Cancel, args).await,
    };
    let connection = match Connection::prepare(connection, "charges") {
        Ok(connection) => connection,
        Err(err) => {
            eprintln!("cardvault charges reconcile: {err}");
            return ExitCode::from(2);
        }
    };
    let channel: Channel = match connection.connect().await {
        Ok(channel) => channel,
        Err(err) => {
            eprintln!("cardvault charges reconcile: {err}");
            return ExitCode::FAILURE;
        }
    };
    let answer = CardVaultClient::new(channel)
        .reconcile_charges(connection.request(pb::ReconcileChargesRequest { limit: *limit }))
        .await;
    match answer {
        Ok(response) => {
            let charges = response.into_inner().charges;
            for charge in &charges {
                println!("{}", line(charge));
            }
            eprintln!("{} charges reconciled", charges.len());
            ExitCode::SUCCESS
        }
        Err(status) => {
            eprintln!("cardvault charges reconcile: {}", describe(&status));
            ExitCode::FAILURE
        }
    }
}

/// `charge <id> <key> <status> <payment id or -> <message or ->`, tab-separated (tabs and
/// line breaks in the message become spaces, so one charge stays one line).
fn line(charge: &pb::ReconciledCharge) -> String {
    let status = pb::ChargeStatus::try_from(charge.status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("CHARGE_STATUS_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unspecified".to_owned());
    let payment = if charge.gateway_payment_id.is_empty() {
        "-"
    } else {
        &charge.gateway_payment_id
    };
    let message = if charge.message.is_empty() {
        "-".to_owned()
    } else {
        charge.message.replace(['\t', '\n', '\r'], " ")
    };
    format!(
        "charge\t{}\t{}\t{status}\t{payment}\t{message}",
        charge.charge_id, charge.idempotency_key
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconciled_charge_is_one_tab_separated_line() {
        let charge = pb::ReconciledCharge {
            charge_id: "ch_1".to_owned(),
            idempotency_key: "order-7".to_owned(),
            status: pb::ChargeStatus::Succeeded.into(),
            gateway_payment_id: "pi_9".to_owned(),
            message: String::new(),
        };
        assert_eq!(line(&charge), "charge\tch_1\torder-7\tsucceeded\tpi_9\t-");
        let unknown = pb::ReconciledCharge {
            status: pb::ChargeStatus::Unknown.into(),
            gateway_payment_id: String::new(),
            message: "gateway unavailable:\tHTTP 503\nretry".to_owned(),
            ..charge
        };
        assert_eq!(
            line(&unknown),
            "charge\tch_1\torder-7\tunknown\t-\tgateway unavailable: HTTP 503 retry"
        );
    }
}
