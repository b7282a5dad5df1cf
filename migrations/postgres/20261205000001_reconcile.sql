-- Reconciliation by asking the gateway: what a REQUIRES_ACTION charge hands back to the shop's
-- front end, the background reconciler's per-charge backoff and alarm, and a lease so only one
-- replica runs that job at a time.

-- The gateway's next action for a charge that waits for the cardholder (3-D Secure). The
-- client secret is not card data: it lets the cardholder's browser finish this one payment.
ALTER TABLE charges ADD COLUMN action_client_secret TEXT;
ALTER TABLE charges ADD COLUMN action_type TEXT;
ALTER TABLE charges ADD COLUMN action_redirect_url TEXT;
ALTER TABLE charges ADD COLUMN action_json TEXT;
-- How often the reconciler has tried to settle the charge, and when it may try next (NULL:
-- now).
ALTER TABLE charges ADD COLUMN reconcile_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE charges ADD COLUMN next_reconcile_at TIMESTAMPTZ;
-- When the alarm for a charge unknown for too long was raised, so it is raised once.
ALTER TABLE charges ADD COLUMN alarmed_at TIMESTAMPTZ;

-- One row per background job that must run on one replica at a time.
CREATE TABLE job_leases (
    name         TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    lease_until  TIMESTAMPTZ NOT NULL
);
