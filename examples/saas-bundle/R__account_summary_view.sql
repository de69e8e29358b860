-- A repeatable script: applied again whenever its checksum changes.
CREATE OR REPLACE VIEW account_summary AS
SELECT plan, count(*) AS accounts
FROM accounts
GROUP BY plan;
