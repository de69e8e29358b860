-- A column with a constant default is a catalog-only change since PostgreSQL 11:
-- no table rewrite, a short ACCESS EXCLUSIVE lock (bounded by lock_timeout).
ALTER TABLE accounts ADD COLUMN plan text NOT NULL DEFAULT 'free';
