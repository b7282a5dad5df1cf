-- Charge forwarding (DESIGN §5): one row per (tenant, idempotency key), written `pending`
-- before the outbound call and settled after it; and short-lived, single-use CVC holds.

CREATE TABLE charges (
    id                  TEXT PRIMARY KEY,
    tenant_id           TEXT NOT NULL REFERENCES tenants (id),
    idempotency_key     TEXT NOT NULL,
    -- SHA-256 of the charge's parameters, so a reused key with other parameters is refused.
    request_hash        BYTEA NOT NULL,
    token               TEXT NOT NULL,
    gateway             TEXT NOT NULL,
    amount              BIGINT NOT NULL,
    currency            TEXT NOT NULL,
    capture             TEXT NOT NULL,
    -- Sent to the gateway again, identical, when a charge is re-sent.
    description         TEXT NOT NULL,
    metadata            JSONB NOT NULL,
    -- pending, succeeded, requires_action, declined, failed, unknown
    status              TEXT NOT NULL,
    gateway_payment_id  TEXT,
    decline_code        TEXT,
    message             TEXT,
    attempts            INTEGER NOT NULL,
    -- The CVC hold this charge took, kept sealed for its re-sends until it settles or
    -- `cvc_expires_at` passes; then erased.
    cvc_dek_id          UUID,
    cvc_ciphertext      BYTEA,
    cvc_expires_at      TIMESTAMPTZ,
    -- While set and in the future, one request is talking to the gateway for this charge.
    sending_until       TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL
);

CREATE UNIQUE INDEX charges_by_key ON charges (tenant_id, idempotency_key);
-- Reconciliation lists unsettled charges oldest first; the sweeper erases expired CVCs.
CREATE INDEX charges_unsettled ON charges (created_at, id) WHERE status IN ('pending', 'unknown');
CREATE INDEX charges_cvc_expiry ON charges (cvc_expires_at) WHERE cvc_expires_at IS NOT NULL;

-- A CVC given at tokenize time (or by HoldCvc), sealed like a card record, consumed by the
-- next charge of its token, deleted when expired. Never revealed by any RPC. `dek_id` has no
-- foreign key: a hold lives minutes, and must not keep a retired DEK from being destroyed (a
-- hold whose DEK is gone cannot be opened and counts as no hold).
CREATE TABLE cvc_holds (
    token       TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants (id),
    dek_id      UUID NOT NULL,
    ciphertext  BYTEA NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);

CREATE INDEX cvc_holds_by_expiry ON cvc_holds (expires_at);
