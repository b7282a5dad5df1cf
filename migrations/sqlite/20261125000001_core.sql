-- Core vault schema (SQLite). Same shape as migrations/postgres; timestamps are Unix
-- microseconds (INTEGER) so comparisons are exact and index-friendly.

CREATE TABLE tenants (
    id                  TEXT PRIMARY KEY NOT NULL,
    wrapped_secret      BLOB NOT NULL,
    secret_kek_version  INTEGER NOT NULL,
    created_at          INTEGER NOT NULL
) STRICT;

CREATE TABLE data_keys (
    id           BLOB PRIMARY KEY NOT NULL,
    tenant_id    TEXT NOT NULL REFERENCES tenants (id),
    kek_version  INTEGER NOT NULL,
    wrapped_key  BLOB NOT NULL,
    active       INTEGER NOT NULL,
    created_at   INTEGER NOT NULL
) STRICT;

CREATE UNIQUE INDEX data_keys_one_active ON data_keys (tenant_id) WHERE active = 1;

CREATE TABLE cards (
    token         TEXT PRIMARY KEY NOT NULL,
    tenant_id     TEXT NOT NULL REFERENCES tenants (id),
    token_format  TEXT NOT NULL,
    fingerprint   BLOB NOT NULL,
    dek_id        BLOB NOT NULL REFERENCES data_keys (id),
    ciphertext    BLOB NOT NULL,
    brand         TEXT NOT NULL,
    last4         TEXT NOT NULL,
    bin           TEXT NOT NULL,
    exp_month     INTEGER NOT NULL,
    exp_year      INTEGER NOT NULL,
    metadata      TEXT NOT NULL,
    canonical     INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER
) STRICT;

CREATE INDEX cards_by_fingerprint ON cards (tenant_id, fingerprint);
CREATE UNIQUE INDEX cards_canonical
    ON cards (tenant_id, fingerprint, exp_month, exp_year, token_format) WHERE canonical = 1;
CREATE INDEX cards_by_expiry ON cards (expires_at) WHERE expires_at IS NOT NULL;
