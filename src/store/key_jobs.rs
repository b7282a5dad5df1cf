//! Key jobs and key requests: background rewrap and re-encryption jobs under a lease, and
//! dual-control requests waiting for a second operator.

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    StoreError,
    dialect::{Pool, Row, TxDb, query, sql},
    int8, narrow,
    state::stored_enum,
};

stored_enum! {
    /// What a background key job does.
    pub enum KeyJobKind("key job kind") {
        /// Rewrap DEKs, tenant secrets and the audit key under the primary KEK version.
        Rewrap = "rewrap",
        /// Re-encrypt records of retired DEKs under active DEKs, then destroy the retired DEKs.
        Reencrypt = "reencrypt",
    }
}

stored_enum! {
    /// Where a background key job is.
    pub enum KeyJobState("key job state") {
        /// Started and not finished; at most one per kind.
        Running = "running",
        /// Finished.
        Done = "done",
        /// Stopped by an error (see [`KeyJobRow::error`]).
        Failed = "failed",
    }
}

stored_enum! {
    /// What a dual-control request asks for.
    pub enum KeyRequestKind("key request kind") {
        /// Destroy a KEK version (target: the version number).
        RetireKek = "retire_kek",
        /// Crypto-shred a tenant (target: the tenant id).
        ShredTenant = "shred_tenant",
        /// Create a principal (target: its tenant; `params`: what to create).
        CreatePrincipal = "create_principal",
        /// Revoke a principal (target: the principal id).
        RevokePrincipal = "revoke_principal",
        /// Create an API key (target: the principal id; `params`: its lifetime).
        CreateApiKey = "create_api_key",
    }
}

stored_enum! {
    /// Where a dual-control request is.
    pub enum KeyRequestState("key request state") {
        /// Waiting for approval (a failed execution leaves it so).
        Pending = "pending",
        /// Approved and carried out.
        Executed = "executed",
        /// Approval came too late.
        Expired = "expired",
    }
}

/// A background key job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyJobRow {
    /// `kj_` and 16 letters or digits.
    pub id: String,
    /// What the job does.
    pub kind: KeyJobKind,
    /// Where it is.
    pub state: KeyJobState,
    /// Re-encryption of one tenant only; `None` for all tenants (and for rewraps).
    pub tenant_id: Option<String>,
    /// Items (keys or records) processed so far.
    pub done: u64,
    /// Items to process, as counted when the job started (grows if more appear).
    pub total: u64,
    /// The operator who started it.
    pub requested_by: String,
    /// The replica working on it, while its lease lasts.
    pub lease_owner: Option<String>,
    /// When the lease ends unless renewed.
    pub lease_until: Option<OffsetDateTime>,
    /// When it was started.
    pub created_at: OffsetDateTime,
    /// Last progress.
    pub updated_at: OffsetDateTime,
    /// When it ended.
    pub finished_at: Option<OffsetDateTime>,
    /// Why it failed.
    pub error: Option<String>,
}

/// A dual-control request as stored ([`KeyRequestKind`] says what its target and params
/// are). A request whose execution fails stays pending (it can be approved again once the
/// cause is fixed, until it expires).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRequestRow {
    /// `kr_` and 16 letters or digits.
    pub id: String,
    /// What is to be done.
    pub kind: KeyRequestKind,
    /// To what.
    pub target: String,
    /// Who asked.
    pub requested_by: String,
    /// When.
    pub requested_at: OffsetDateTime,
    /// Approval after this instant is refused.
    pub expires_at: OffsetDateTime,
    /// Where it is.
    pub state: KeyRequestState,
    /// Who approved it.
    pub decided_by: Option<String>,
    /// When.
    pub decided_at: Option<OffsetDateTime>,
    /// The tenant it acts on; `None` for a vault-wide operation, which only a global
    /// operator may request or approve.
    pub tenant_id: Option<String>,
    /// What a `create_principal` request creates (JSON); `None` for the other kinds.
    pub params: Option<String>,
}

/// Background key jobs and dual-control requests.
#[async_trait]
pub trait KeyJobRepo: Send + Sync {
    /// Inserts a running job unless one of its kind is running; returns whether it inserted.
    async fn insert_key_job(&self, row: &KeyJobRow) -> Result<bool, StoreError>;
    /// The running jobs and the `limit` most recent others, newest first.
    async fn key_jobs(&self, limit: u32) -> Result<Vec<KeyJobRow>, StoreError>;
    /// Takes (or renews) the lease of the oldest running job that has no live lease of
    /// another owner, until `lease_until`; returns the job. Atomic across replicas: of two
    /// claiming the same job, one gets it.
    async fn claim_key_job(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<Option<KeyJobRow>, StoreError>;
    /// Records progress and renews the lease, if `owner` still holds it; returns whether it did.
    async fn key_job_progress(
        &self,
        id: &str,
        owner: &str,
        done: u64,
        total: u64,
        lease_until: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Ends a job held by `owner` with `state` (done or failed) and an error text; clears
    /// the lease; returns whether it did.
    async fn finish_key_job(
        &self,
        id: &str,
        owner: &str,
        state: KeyJobState,
        error: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// A dual-control request by id.
    async fn key_request(&self, id: &str) -> Result<Option<KeyRequestRow>, StoreError>;
    /// Pending requests not expired at `now`, oldest first.
    async fn pending_key_requests(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<KeyRequestRow>, StoreError>;
}

/// Dual-control requests made and decided inside a transaction (with their audit record).
#[async_trait]
pub trait KeyJobTx: Send {
    /// Inserts a dual-control request.
    async fn insert_key_request(&mut self, row: &KeyRequestRow) -> Result<(), StoreError>;
    /// Moves a pending request to `state`, recording who decided and when; returns false
    /// (changing nothing) when it is no longer pending.
    async fn decide_key_request(
        &mut self,
        id: &str,
        state: KeyRequestState,
        by: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError>;
}

macro_rules! key_job_columns {
    () => {
        "id, kind, state, tenant_id, done, total, requested_by, lease_owner, lease_until, created_at, updated_at, finished_at, error"
    };
}

macro_rules! key_request_columns {
    () => {
        "id, kind, target, requested_by, requested_at, expires_at, state, decided_by, decided_at, tenant_id, params"
    };
}

fn key_job_from_row(row: &Row) -> Result<KeyJobRow, StoreError> {
    Ok(KeyJobRow {
        id: row.get("id")?,
        kind: row.get("kind")?,
        state: row.get("state")?,
        tenant_id: row.get("tenant_id")?,
        done: narrow(row.get::<i64>("done")?, "job progress")?,
        total: narrow(row.get::<i64>("total")?, "job total")?,
        requested_by: row.get("requested_by")?,
        lease_owner: row.get("lease_owner")?,
        lease_until: row.get("lease_until")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
        finished_at: row.get("finished_at")?,
        error: row.get("error")?,
    })
}

fn key_request_from_row(row: &Row) -> Result<KeyRequestRow, StoreError> {
    Ok(KeyRequestRow {
        id: row.get("id")?,
        kind: row.get("kind")?,
        target: row.get("target")?,
        requested_by: row.get("requested_by")?,
        requested_at: row.get("requested_at")?,
        expires_at: row.get("expires_at")?,
        state: row.get("state")?,
        decided_by: row.get("decided_by")?,
        decided_at: row.get("decided_at")?,
        tenant_id: row.get("tenant_id")?,
        params: row.get("params")?,
    })
}

#[async_trait]
impl<S: Pool> KeyJobRepo for S {
    async fn insert_key_job(&self, row: &KeyJobRow) -> Result<bool, StoreError> {
        // The arbiter is the partial index only: a clash on the primary key stays an error.
        let done = query(sql!(
            "INSERT INTO key_jobs (id, kind, state, tenant_id, done, total, requested_by, \
             lease_owner, lease_until, created_at, updated_at, finished_at, error) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (kind) WHERE state = 'running' DO NOTHING"
        ))
        .bind(&row.id)
        .bind(row.kind)
        .bind(row.state)
        .bind(&row.tenant_id)
        .bind(int8(row.done, "job progress out of range")?)
        .bind(int8(row.total, "job total out of range")?)
        .bind(&row.requested_by)
        .bind(&row.lease_owner)
        .bind(row.lease_until)
        .bind(row.created_at)
        .bind(row.updated_at)
        .bind(row.finished_at)
        .bind(&row.error)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(done == 1)
    }

    async fn key_jobs(&self, limit: u32) -> Result<Vec<KeyJobRow>, StoreError> {
        query(sql!(
            "SELECT ",
            key_job_columns!(),
            " FROM key_jobs WHERE state = 'running' OR id IN (SELECT id FROM key_jobs \
             WHERE state <> 'running' ORDER BY created_at DESC, id DESC LIMIT $1) \
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(i64::from(limit))
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(key_job_from_row)
        .collect()
    }

    async fn claim_key_job(
        &self,
        owner: &str,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> Result<Option<KeyJobRow>, StoreError> {
        // The subquery picks a candidate without locking it; the outer WHERE repeats the lease
        // test so that, when another replica claimed the same row first, PostgreSQL's READ
        // COMMITTED re-checks it on the updated row and this replica takes nothing. (SQLite
        // serializes writers, so there the repeated test is merely true.)
        query(sql!(
            "UPDATE key_jobs SET lease_owner = $1, lease_until = $3, updated_at = $2 \
             WHERE id = (SELECT id FROM key_jobs WHERE state = 'running' \
               AND (lease_owner IS NULL OR lease_until < $2 OR lease_owner = $1) \
               ORDER BY created_at, id LIMIT 1) \
             AND state = 'running' \
             AND (lease_owner IS NULL OR lease_until < $2 OR lease_owner = $1) \
             RETURNING ",
            key_job_columns!()
        ))
        .bind(owner)
        .bind(now)
        .bind(lease_until)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(key_job_from_row)
        .transpose()
    }

    async fn key_job_progress(
        &self,
        id: &str,
        owner: &str,
        done: u64,
        total: u64,
        lease_until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        // The trait passes no time for `updated_at`; the vault's clock stands in for it.
        let updated = query(sql!(
            "UPDATE key_jobs SET done = $3, total = $4, lease_until = $5, updated_at = $6 \
             WHERE id = $1 AND lease_owner = $2 AND state = 'running'"
        ))
        .bind(id)
        .bind(owner)
        .bind(int8(done, "job progress out of range")?)
        .bind(int8(total, "job total out of range")?)
        .bind(lease_until)
        .bind(OffsetDateTime::now_utc())
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(updated == 1)
    }

    async fn finish_key_job(
        &self,
        id: &str,
        owner: &str,
        state: KeyJobState,
        error: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = query(sql!(
            "UPDATE key_jobs SET state = $3, error = $4, finished_at = $5, updated_at = $5, \
             lease_owner = NULL, lease_until = NULL \
             WHERE id = $1 AND lease_owner = $2 AND state = 'running'"
        ))
        .bind(id)
        .bind(owner)
        .bind(state)
        .bind(error)
        .bind(at)
        .execute(&mut self.pooled().await?)
        .await?;
        Ok(done == 1)
    }

    async fn key_request(&self, id: &str) -> Result<Option<KeyRequestRow>, StoreError> {
        query(sql!(
            "SELECT ",
            key_request_columns!(),
            " FROM key_requests WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut self.pooled().await?)
        .await?
        .as_ref()
        .map(key_request_from_row)
        .transpose()
    }

    async fn pending_key_requests(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<KeyRequestRow>, StoreError> {
        query(sql!(
            "SELECT ",
            key_request_columns!(),
            " FROM key_requests WHERE state = 'pending' AND expires_at > $1 \
             ORDER BY requested_at, id"
        ))
        .bind(now)
        .fetch_all(&mut self.pooled().await?)
        .await?
        .iter()
        .map(key_request_from_row)
        .collect()
    }
}

#[async_trait]
impl<T: TxDb> KeyJobTx for T {
    async fn insert_key_request(&mut self, row: &KeyRequestRow) -> Result<(), StoreError> {
        query(sql!(
            "INSERT INTO key_requests (id, kind, target, requested_by, requested_at, \
             expires_at, state, decided_by, decided_at, tenant_id, params) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(&row.id)
        .bind(row.kind)
        .bind(&row.target)
        .bind(&row.requested_by)
        .bind(row.requested_at)
        .bind(row.expires_at)
        .bind(row.state)
        .bind(&row.decided_by)
        .bind(row.decided_at)
        .bind(&row.tenant_id)
        .bind(&row.params)
        .execute(self)
        .await?;
        Ok(())
    }

    async fn decide_key_request(
        &mut self,
        id: &str,
        state: KeyRequestState,
        by: &str,
        at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let done = query(sql!(
            "UPDATE key_requests SET state = $2, decided_by = $3, decided_at = $4 \
             WHERE id = $1 AND state = 'pending'"
        ))
        .bind(id)
        .bind(state)
        .bind(by)
        .bind(at)
        .execute(self)
        .await?;
        Ok(done == 1)
    }
}
