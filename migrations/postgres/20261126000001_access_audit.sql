-- Access control (principals, API keys), honeytokens and the MAC-chained audit log.

-- Canary cards minted by operators; any access raises an alarm. Callers cannot tell them
-- from real cards; a database reader can (they see ciphertext only, never a PAN).
ALTER TABLE cards ADD COLUMN honeytoken BOOLEAN NOT NULL DEFAULT FALSE;

CREATE TABLE principals (
    id             TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL REFERENCES tenants (id),
    name           TEXT NOT NULL,
    -- SPIFFE ID or certificate CN this principal authenticates as over mTLS.
    mtls_identity  TEXT,
    -- Space-separated, sorted permission names.
    permissions    TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    revoked_at     TIMESTAMPTZ
);

CREATE UNIQUE INDEX principals_live_name ON principals (tenant_id, name) WHERE revoked_at IS NULL;
CREATE UNIQUE INDEX principals_live_mtls_identity
    ON principals (mtls_identity) WHERE revoked_at IS NULL AND mtls_identity IS NOT NULL;

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    principal_id  TEXT NOT NULL REFERENCES principals (id),
    -- SHA-256 of the whole key; the key itself is shown once and never stored.
    secret_hash   BYTEA NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ
);

CREATE INDEX api_keys_by_principal ON api_keys (principal_id);

-- One audit MAC key per vault, wrapped by the KEK; `shards` is bound into the wrapping.
CREATE TABLE audit_keys (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    kek_version  BIGINT NOT NULL,
    wrapped_key  BYTEA NOT NULL,
    shards       INTEGER NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL
);

-- The head of each audit chain, locked by every append to that chain.
CREATE TABLE audit_heads (
    shard     INTEGER PRIMARY KEY,
    seq       BIGINT NOT NULL,
    mac       BYTEA NOT NULL,
    head_mac  BYTEA NOT NULL
);

CREATE TABLE audit_records (
    shard       INTEGER NOT NULL,
    seq         BIGINT NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    tenant_id   TEXT,
    principal   TEXT,
    action      TEXT NOT NULL,
    token       TEXT,
    outcome     TEXT NOT NULL,
    alarm       BOOLEAN NOT NULL,
    peer        TEXT,
    request_id  TEXT,
    detail      TEXT,
    mac         BYTEA NOT NULL,
    PRIMARY KEY (shard, seq)
);

CREATE INDEX audit_records_by_time ON audit_records (at, shard, seq);
CREATE INDEX audit_records_by_tenant_time ON audit_records (tenant_id, at, shard, seq);
