-- Key management (DESIGN §3): DEK rotation and re-encryption, KEK rewrap jobs, dual-control
-- requests for destructive operations, crypto-shredded tenants.

-- Encryptions handed out under a DEK (replicas reserve them in blocks, so this is an upper
-- bound of the records it sealed) and when it stopped being the active DEK.
ALTER TABLE data_keys ADD COLUMN reserved BIGINT NOT NULL DEFAULT 0;
ALTER TABLE data_keys ADD COLUMN retired_at TIMESTAMPTZ;

-- Re-encryption finds a DEK's records, and destroying a DEK checks none is left, by this index.
CREATE INDEX cards_by_dek ON cards (dek_id, token);

-- A shredded tenant keeps its row (so its id is never reused and its keys never re-created)
-- with the wrapped secret erased.
ALTER TABLE tenants ADD COLUMN shredded_at TIMESTAMPTZ;

-- Background key jobs (KEK rewrap, re-encryption). Progress lives here, so a job resumes
-- after a crash; the lease makes one replica at a time work on it.
CREATE TABLE key_jobs (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    state         TEXT NOT NULL,
    tenant_id     TEXT,
    done          BIGINT NOT NULL,
    total         BIGINT NOT NULL,
    requested_by  TEXT NOT NULL,
    lease_owner   TEXT,
    lease_until   TIMESTAMPTZ,
    created_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ,
    error         TEXT
);

-- At most one running job of each kind.
CREATE UNIQUE INDEX key_jobs_one_running ON key_jobs (kind) WHERE state = 'running';
CREATE INDEX key_jobs_by_time ON key_jobs (created_at);

-- Dual control: a destructive operation is requested by one keys:admin principal and
-- approved (and then carried out) by another before `expires_at`.
CREATE TABLE key_requests (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    target        TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    requested_at  TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL,
    state         TEXT NOT NULL,
    decided_by    TEXT,
    decided_at    TIMESTAMPTZ
);

CREATE INDEX key_requests_by_state ON key_requests (state, requested_at);
