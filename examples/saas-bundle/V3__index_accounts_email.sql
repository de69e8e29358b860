-- flotilla:no-transaction
-- CREATE INDEX CONCURRENTLY cannot run in a transaction block. If a run is interrupted,
-- Flotilla drops the INVALID index it left behind and builds it again.
CREATE INDEX CONCURRENTLY accounts_email_idx ON accounts (email);
