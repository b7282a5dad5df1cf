-- Operators and dual control: who created each principal and API key, which operators
-- manage every tenant, what a dual-controlled request on a principal carries, and the one
-- KEK rotation under way.

-- The operator that created the row: a principal id, or `local:unverified:<user>` for the
-- `cardvault admin` CLI. NULL for rows made before this was recorded. Approvals check it: an
-- operator may not approve a request of whoever created it or minted its credentials.
ALTER TABLE principals ADD COLUMN created_by TEXT;
ALTER TABLE api_keys ADD COLUMN created_by TEXT;

-- A keys:admin principal manages its own tenant only, unless it is a global operator.
ALTER TABLE principals ADD COLUMN global_operator BOOLEAN NOT NULL DEFAULT FALSE;
-- Operators made before scoping managed every tenant; they keep doing so.
UPDATE principals SET global_operator = TRUE
    WHERE ' ' || permissions || ' ' LIKE '% keys:admin %';

-- The tenant a request acts on (NULL: vault-wide, e.g. retiring a KEK version or creating a
-- global operator) and, for creating a principal, what to create (JSON).
ALTER TABLE key_requests ADD COLUMN tenant_id TEXT;
ALTER TABLE key_requests ADD COLUMN params TEXT;
UPDATE key_requests SET tenant_id = target WHERE kind = 'shred_tenant';

-- One KEK rotation at a time across replicas: a replica takes the lease (owner, until)
-- before the key provider makes a new version and gives it back after; `version` is the
-- primary version the last rotation made.
CREATE TABLE kek_rotation (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    version         BIGINT NOT NULL,
    lease_owner     TEXT,
    lease_until     TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ NOT NULL
);
