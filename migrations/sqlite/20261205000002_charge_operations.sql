-- Follow-ups on a charge the gateway holds (SQLite; same shape as migrations/postgres,
-- timestamps in Unix microseconds): captures, refunds and cancellations. One row per
-- (tenant, idempotency key), written `pending` before the outbound call (in the transaction
-- that checked it against the charge and its earlier operations) and settled after it.

CREATE TABLE charge_operations (
    id                  TEXT PRIMARY KEY NOT NULL,
    tenant_id           TEXT NOT NULL REFERENCES tenants (id),
    charge_id           TEXT NOT NULL REFERENCES charges (id),
    -- capture, refund, cancel
    kind                TEXT NOT NULL,
    idempotency_key     TEXT NOT NULL,
    -- SHA-256 of the request's parameters, so a reused key with other parameters is refused.
    request_hash        BLOB NOT NULL,
    -- Minor units asked of the gateway (what "all" came to when the caller asked for all);
    -- 0 for a cancellation.
    amount              INTEGER NOT NULL,
    -- pending, succeeded, failed, unknown
    status              TEXT NOT NULL,
    gateway_id          TEXT,
    -- Minor units the gateway reports done, when it says.
    amount_done         INTEGER,
    message             TEXT,
    attempts            INTEGER NOT NULL,
    -- While set and in the future, one request is talking to the gateway for this operation.
    sending_until       INTEGER,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
) STRICT;

CREATE UNIQUE INDEX charge_operations_by_key ON charge_operations (tenant_id, idempotency_key);
-- The rules read a charge's operations together.
CREATE INDEX charge_operations_by_charge ON charge_operations (charge_id, created_at);
