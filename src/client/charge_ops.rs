//! `cardvault charges capture|refund|cancel`: finishing a charge's life from the command line,
//! by charge id, through a running vault (the vault talks to the gateway; no card is needed).

use std::process::ExitCode;

use super::{ConnectArgs, Connection, key_admin::describe};
use crate::{
    gateway::OperationKind,
    pb::v1::{self as pb, card_vault_client::CardVaultClient},
};

/// The flags of one capture, refund or cancellation.
#[derive(Debug, Clone, clap::Args)]
pub struct OperationArgs {
    /// The vault's charge id (`ch_…`), as the charge's answer gave it.
    #[arg(long, value_name = "ID")]
    pub charge: String,
    /// Your key for this operation: the same key again returns the stored result (and
    /// re-sends it while its outcome is unknown) instead of doing it twice.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: String,
    /// Minor units to capture or refund; 0 (the default) for all of it or all that remains.
    /// Not for a cancellation.
    #[arg(long)]
    pub amount: Option<u64>,
    /// The vault (a principal with the `charge` permission).
    #[command(flatten)]
    pub connection: ConnectArgs,
}

/// Sends one operation and prints its result as one line (see [`line`]); returns 0 when the
/// vault answered, 1 when it could not be reached or refused, 2 for unusable flags.
pub async fn run(kind: OperationKind, args: &OperationArgs) -> ExitCode {
    let name = format!("cardvault charges {}", kind.as_str());
    if kind == OperationKind::Cancel && args.amount.is_some() {
        eprintln!("{name}: --amount is not used: a cancellation releases all of it");
        return ExitCode::from(2);
    }
    let connection = match Connection::prepare(&args.connection, "charges") {
        Ok(connection) => connection,
        Err(err) => {
            eprintln!("{name}: {err}");
            return ExitCode::from(2);
        }
    };
    let mut client = match connection.connect().await {
        Ok(channel) => CardVaultClient::new(channel),
        Err(err) => {
            eprintln!("{name}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let charge_id = args.charge.clone();
    let idempotency_key = args.idempotency_key.clone();
    let amount = args.amount.unwrap_or(0);
    let answer = match kind {
        OperationKind::Capture => {
            client
                .capture_charge(connection.request(pb::CaptureChargeRequest {
                    charge_id,
                    idempotency_key,
                    amount,
                }))
                .await
        }
        OperationKind::Refund => {
            client
                .refund_charge(connection.request(pb::RefundChargeRequest {
                    charge_id,
                    idempotency_key,
                    amount,
                }))
                .await
        }
        OperationKind::Cancel => {
            client
                .cancel_charge(connection.request(pb::CancelChargeRequest {
                    charge_id,
                    idempotency_key,
                }))
                .await
        }
    };
    match answer {
        Ok(response) => {
            println!("{}", line(&response.into_inner()));
            ExitCode::SUCCESS
        }
        Err(status) => {
            eprintln!("{name}: {}", describe(&status));
            ExitCode::FAILURE
        }
    }
}

/// `<kind> <operation id> <charge id> <status> <amount> <gateway id or -> <message or ->`,
/// tab-separated.
fn line(op: &pb::ChargeOperationResponse) -> String {
    let kind = op
        .kind()
        .as_str_name()
        .trim_start_matches("CHARGE_OPERATION_KIND_")
        .to_ascii_lowercase();
    let status = op
        .status()
        .as_str_name()
        .trim_start_matches("CHARGE_OPERATION_STATUS_")
        .to_ascii_lowercase();
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    format!(
        "{kind}\t{}\t{}\t{status}\t{}\t{}\t{}",
        op.operation_id,
        op.charge_id,
        op.amount,
        or_dash(&op.gateway_id),
        or_dash(&op.message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_is_one_tab_separated_line() {
        let op = pb::ChargeOperationResponse {
            operation_id: "op_1".to_owned(),
            charge_id: "ch_1".to_owned(),
            kind: pb::ChargeOperationKind::Refund.into(),
            status: pb::ChargeOperationStatus::Succeeded.into(),
            amount: 500,
            gateway_id: "re_9".to_owned(),
            message: String::new(),
            created: true,
        };
        assert_eq!(line(&op), "refund\top_1\tch_1\tsucceeded\t500\tre_9\t-");
    }
}
