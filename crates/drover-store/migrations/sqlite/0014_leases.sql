-- Named leases: the work that must run once across every server sharing the database
-- (lease reaping, reconciliation, sweeps, webhook delivery) is done by whoever holds the
-- `leader` lease. A holder renews it well before `expires_at`; a holder that dies lets it
-- lapse, and another server takes it.

CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
