-- Core vault schema. Only the clear fields of DESIGN §3 are stored in clear; the PAN and the
-- cardholder name live only inside `cards.ciphertext`.

CREATE TABLE tenants (
    id                  TEXT PRIMARY KEY,
    -- Random per-tenant secret (fingerprint key material), wrapped by the KEK.
    wrapped_secret      BYTEA NOT NULL,
    secret_kek_version  BIGINT NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL
);

CREATE TABLE data_keys (
    id           UUID PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants (id),
    kek_version  BIGINT NOT NULL,
    wrapped_key  BYTEA NOT NULL,
    active       BOOLEAN NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL
);

-- At most one active data key per tenant; concurrent replicas race on this index.
CREATE UNIQUE INDEX data_keys_one_active ON data_keys (tenant_id) WHERE active;

CREATE TABLE cards (
    token         TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants (id),
    token_format  TEXT NOT NULL,
    fingerprint   BYTEA NOT NULL,
    dek_id        UUID NOT NULL REFERENCES data_keys (id),
    ciphertext    BYTEA NOT NULL,
    brand         TEXT NOT NULL,
    last4         TEXT NOT NULL,
    bin           TEXT NOT NULL,
    exp_month     INTEGER NOT NULL,
    exp_year      INTEGER NOT NULL,
    metadata      JSONB NOT NULL,
    -- True for the one row `reuse_existing` resolves to for a (tenant, PAN, expiry, format).
    canonical     BOOLEAN NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ
);

CREATE INDEX cards_by_fingerprint ON cards (tenant_id, fingerprint);
CREATE UNIQUE INDEX cards_canonical
    ON cards (tenant_id, fingerprint, exp_month, exp_year, token_format) WHERE canonical;
CREATE INDEX cards_by_expiry ON cards (expires_at) WHERE expires_at IS NOT NULL;
