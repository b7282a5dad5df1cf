//! `cardvault.v1.Audit`: streams audit records by time range.

use std::{pin::Pin, sync::Arc};

use time::OffsetDateTime;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::{
    auth::RequestCredentials,
    convert::{timestamp, to_timestamp},
    error::ApiError,
    rpc,
};
use crate::{
    audit::Action,
    card::FieldViolation,
    pb::v1::{self as pb, audit_server::Audit},
    vault::{AuditRecordView, Vault},
};

/// Records fetched per database round trip while streaming.
const PAGE: u32 = 500;

/// The audit-reading service.
#[derive(Debug, Clone)]
pub struct AuditService {
    vault: Arc<Vault>,
}

impl AuditService {
    /// A service over a vault.
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

fn record(row: AuditRecordView) -> pb::AuditRecord {
    pb::AuditRecord {
        chain: row.chain,
        seq: row.seq,
        time: Some(to_timestamp(row.at)),
        tenant: row.tenant_id.unwrap_or_default(),
        principal: row.principal.unwrap_or_default(),
        action: row.action,
        token: row.token.unwrap_or_default(),
        outcome: row.outcome.as_str().to_owned(),
        alarm: row.alarm,
        peer: row.peer.unwrap_or_default(),
        request_id: row.request_id.unwrap_or_default(),
        detail: row.detail.unwrap_or_default(),
        mac: row.mac,
    }
}

type RecordStream = Pin<Box<dyn Stream<Item = Result<pb::AuditRecord, Status>> + Send>>;

#[tonic::async_trait]
impl Audit for AuditService {
    type ListAuditRecordsStream = RecordStream;

    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<Self::ListAuditRecordsStream>, Status> {
        let credentials = RequestCredentials::of(&request);
        let message = request.into_inner();
        rpc::run_rechecked(
            &self.vault,
            Action::ReadAudit,
            credentials,
            |mut recheck| async move {
                let auth = recheck.auth().clone();
                let bad_time = |field| {
                    ApiError::Invalid(vec![FieldViolation::new(field, &"not a valid timestamp")])
                };
                let from = match &message.start_time {
                    Some(ts) => timestamp(ts).ok_or_else(|| bad_time("start_time"))?,
                    None => OffsetDateTime::UNIX_EPOCH,
                };
                let to = match &message.end_time {
                    Some(ts) => timestamp(ts).ok_or_else(|| bad_time("end_time"))?,
                    None => OffsetDateTime::now_utc(),
                };
                // The first page is read (and the read recorded) before the stream starts, so
                // a refusal or an outage is the call's status rather than a broken stream.
                let first = self
                    .vault
                    .audit_records(&auth, from, to, None, PAGE)
                    .await?;
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                let vault = self.vault.clone();
                tokio::spawn(async move {
                    let mut page = first;
                    loop {
                        let full = page.len() == PAGE as usize;
                        let cursor = page.last().map(AuditRecordView::position);
                        for row in page {
                            if tx.send(Ok(record(row))).await.is_err() {
                                return; // the client went away
                            }
                        }
                        let Some(cursor) = cursor.filter(|_| full) else {
                            return;
                        };
                        // A reader whose key was revoked meanwhile gets no further page.
                        let auth = match recheck.recheck().await {
                            Ok(auth) => auth.clone(),
                            Err(err) => {
                                let _ = tx.send(Err(recheck.status(err))).await;
                                return;
                            }
                        };
                        page = match vault
                            .audit_records(&auth, from, to, Some(cursor), PAGE)
                            .await
                        {
                            Ok(next) => next,
                            Err(err) => {
                                tracing::warn!(error = %err, "audit stream failed");
                                let _ = tx
                                    .send(Err(Status::unavailable(
                                        "audit stream interrupted; retry",
                                    )))
                                    .await;
                                return;
                            }
                        };
                    }
                });
                Ok(Box::pin(ReceiverStream::new(rx)) as RecordStream)
            },
        )
        .await
    }
}
