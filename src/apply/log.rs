//! `flotilla.execution_log`: its DDL, how it is read, and the SQL text of every row
//! Flotilla writes. The tenant's log is the source of truth (PRODUCT.md §1.1); this module
//! owns its shape and never decides what to apply (that is `plan`).
//!
//! Rows are written with literals in simple-protocol batches so that a script and its
//! log row travel in one round trip and commit in one transaction. Every literal goes
//! through [`quote_literal`].

use tokio_postgres::SimpleQueryMessage;

use super::plan::{LogRow, LogStatus};

/// The session advisory lock key every Flotilla runner takes: "Flotilla" in ASCII.
pub const LOCK_KEY: i64 = 0x466c_6f74_696c_6c61;

/// The log's DDL, once, for both ways of running it.
macro_rules! log_ddl {
    () => {
        "\
CREATE SCHEMA IF NOT EXISTS flotilla;
CREATE TABLE IF NOT EXISTS flotilla.execution_log (
    id bigserial PRIMARY KEY,
    version text,
    script text NOT NULL,
    kind text NOT NULL CONSTRAINT execution_log_kind_check
        CHECK (kind IN ('versioned', 'repeatable', 'baseline')),
    checksum text NOT NULL,
    bundle_id text NOT NULL,
    wave_id text NOT NULL,
    status text NOT NULL CONSTRAINT execution_log_status_check
        CHECK (status IN ('applied', 'started', 'baselined', 'undone', 'skipped')),
    applied_at timestamptz,
    applied_by text NOT NULL DEFAULT current_user,
    xact_id text,
    duration_ms bigint,
    statements_done integer,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    source text,
    rows_changed bigint
);
CREATE UNIQUE INDEX IF NOT EXISTS execution_log_version_once
    ON flotilla.execution_log (version) WHERE kind = 'versioned';
"
    };
}

/// Creates the schema and table if missing. Run only while holding [`LOCK_KEY`].
///
/// Beyond PRODUCT.md §5.3's required columns: `statements_done` (progress of a
/// non-transactional script, for resume) and `started_at`. The unique index makes
/// "each version at most once" a property of the tenant database itself.
pub const ENSURE_SQL: &str = log_ddl!();

/// [`ENSURE_SQL`] only when the table is missing: one catalog lookup on every later run.
/// A log made before the unique index existed gets it here (the table is small and the
/// index is created once); when it cannot be built (duplicate applied rows from before)
/// the run goes on and the next one tries again.
pub const ENSURE_IF_MISSING_SQL: &str = concat!(
    "DO $flotilla$ BEGIN IF to_regclass('flotilla.execution_log') IS NULL THEN\n",
    log_ddl!(),
    // A log made by an older build is brought up to date, only under our lock: a
    // runner that is busy must not queue behind the holder. An up-to-date log (the
    // index, the `rows_changed` column and the `skipped` status there: they come with
    // the current DDL and the upgrade) costs three catalog lookups on every run.
    "ELSIF (to_regclass('flotilla.execution_log_version_once') IS NULL \
     OR NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'flotilla.execution_log'::regclass \
     AND attname = 'rows_changed' AND NOT attisdropped) \
     OR EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'flotilla.execution_log'::regclass \
     AND conname = 'execution_log_status_check' AND pg_get_constraintdef(oid) NOT LIKE '%skipped%')) \
     AND EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' \
     AND granted AND objsubid = 1 AND classid = 1181511540 AND objid = 1768713313) THEN\n",
    "IF to_regclass('flotilla.execution_log_version_once') IS NULL THEN \
     CREATE UNIQUE INDEX IF NOT EXISTS execution_log_version_once \
     ON flotilla.execution_log (version) WHERE kind = 'versioned'; END IF;\n",
    "IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'flotilla.execution_log'::regclass \
     AND attname = 'source' AND NOT attisdropped) THEN \
     ALTER TABLE flotilla.execution_log ADD COLUMN source text; END IF;\n",
    "IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'flotilla.execution_log'::regclass \
     AND attname = 'rows_changed' AND NOT attisdropped) THEN \
     ALTER TABLE flotilla.execution_log ADD COLUMN rows_changed bigint; END IF;\n",
    "IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'flotilla.execution_log'::regclass \
     AND conname = 'execution_log_status_check' \
     AND pg_get_constraintdef(oid) NOT LIKE '%skipped%') THEN \
     ALTER TABLE flotilla.execution_log DROP CONSTRAINT execution_log_status_check; \
     ALTER TABLE flotilla.execution_log ADD CONSTRAINT execution_log_status_check \
     CHECK (status IN ('applied', 'started', 'baselined', 'undone', 'skipped')); END IF;\n",
    "END IF; END $flotilla$"
);

/// Ends whatever a script set in the session (settings, role); the settings sent at
/// startup are what RESET goes back to.
pub const RESET_SESSION_SQL: &str = "RESET ALL;\nRESET ROLE;\nRESET SESSION AUTHORIZATION;";

/// The session's server process: compared with the one that took the lock.
pub const BACKEND_SQL: &str = "SELECT pg_backend_pid()";

/// Reads what the planner needs, oldest first.
pub const READ_SQL: &str = "SELECT id, version, script, kind, checksum, status, statements_done \
                            FROM flotilla.execution_log ORDER BY id";

/// Reads every column an operator looks at, oldest first; `applied_at` as epoch ms.
pub const READ_ENTRIES_SQL: &str = "SELECT id, version, script, kind, checksum, bundle_id, wave_id, status, \
     (extract(epoch FROM applied_at) * 1000)::bigint, applied_by, xact_id, duration_ms \
     FROM flotilla.execution_log ORDER BY id";

/// One row of the log as an operator reads it (`flotilla tenant log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub id: i64,
    pub version: Option<String>,
    pub script: String,
    pub kind: String,
    pub checksum: String,
    pub bundle_id: String,
    pub wave_id: String,
    /// `applied` or `started`.
    pub status: String,
    pub applied_at_ms: Option<i64>,
    pub applied_by: String,
    pub xact_id: Option<String>,
    pub duration_ms: Option<i64>,
}

/// Parses [`READ_ENTRIES_SQL`]'s result.
pub fn parse_entries(messages: &[SimpleQueryMessage]) -> Result<Vec<LogEntry>, DecodeError> {
    let mut entries = Vec::new();
    for m in messages {
        let SimpleQueryMessage::Row(r) = m else {
            continue;
        };
        let text = |i: usize| r.get(i).map(str::to_string);
        let number = |i: usize| r.get(i).and_then(|s| s.parse::<i64>().ok());
        let id = number(0).ok_or_else(|| DecodeError("a row without a numeric id".into()))?;
        entries.push(LogEntry {
            id,
            version: text(1),
            script: text(2).unwrap_or_default(),
            kind: text(3).unwrap_or_default(),
            checksum: text(4).unwrap_or_default(),
            bundle_id: text(5).unwrap_or_default(),
            wave_id: text(6).unwrap_or_default(),
            status: text(7).unwrap_or_default(),
            applied_at_ms: number(8),
            applied_by: text(9).unwrap_or_default(),
            xact_id: text(10),
            duration_ms: number(11),
        });
    }
    Ok(entries)
}

/// Takes the lock without waiting; also says which server process took it, the
/// `lock_timeout` (ms) it runs under, and whether a Flotilla session used this server
/// session before (on a real new session none did) — to tell a real session from a
/// pooler's.
pub fn try_lock_sql() -> String {
    // Cheap on every run: no scan of pg_settings or pg_locks. A server session that a
    // Flotilla session used before (a pooler's) still carries its marker.
    format!(
        "SELECT pg_try_advisory_lock({LOCK_KEY}), pg_backend_pid(), \
         (extract(epoch FROM current_setting('lock_timeout')::interval) * 1000)::bigint, \
         reused, set_config('{SESSION_MARK}', 'taken', false) \
         FROM (SELECT coalesce(current_setting('{SESSION_MARK}', true), '') <> '' AS reused \
         OFFSET 0) before"
    )
}

/// A session-level setting a Flotilla session sets when it takes the lock: a new server
/// session does not have it.
const SESSION_MARK: &str = "flotilla.session";

/// Waits for the lock (bounded by the session's `lock_timeout`).
pub fn wait_for_lock_sql() -> String {
    format!("SELECT pg_advisory_lock({LOCK_KEY})")
}

/// How [`LOCK_KEY`] shows in `pg_locks`: its high and low 32 bits (`classid`, `objid`,
/// with `objsubid = 1` for a bigint key).
fn lock_key_parts() -> (u64, u64) {
    ((LOCK_KEY as u64) >> 32, (LOCK_KEY as u64) & 0xffff_ffff)
}

/// Who holds [`LOCK_KEY`] in this database: pid, application_name, client address,
/// state, since when. A bigint advisory key shows in `pg_locks` as its high and low
/// 32 bits (`classid`, `objid`) with `objsubid = 1`.
pub fn lock_holder_sql() -> String {
    let (high, low) = lock_key_parts();
    // Without pg_read_all_stats the server hides other roles' details: say "unknown".
    format!(
        "SELECT a.pid, coalesce(a.application_name, 'unknown'), \
         CASE WHEN a.backend_start IS NULL THEN 'unknown' ELSE coalesce(host(a.client_addr), 'a local socket') END, \
         coalesce(to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), 'unknown'), \
         coalesce(a.state, 'unknown') \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {high} AND l.objid = {low} \
         AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         LIMIT 1"
    )
}

/// SQLSTATEs meaning the log does not exist yet (undefined table, invalid schema).
pub fn is_missing_log(sqlstate: Option<&str>) -> bool {
    matches!(sqlstate, Some("42P01" | "3F000"))
}

/// A SQL string literal, safe whatever `standard_conforming_strings` is.
pub fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// `NULL` or a literal.
pub fn quote_optional(s: Option<&str>) -> String {
    s.map(quote_literal).unwrap_or_else(|| "NULL".to_string())
}

/// A quoted identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The identity of a script's log row.
pub struct RowIdentity<'a> {
    pub version: Option<&'a str>,
    pub script: &'a str,
    pub kind: &'a str,
    pub checksum: &'a str,
    pub bundle_id: &'a str,
    pub wave_id: &'a str,
}

/// Name of the transaction-local setting that marks when the current script started,
/// so `duration_ms` is measured by the server inside the batch.
const STARTED_SETTING: &str = "flotilla.script_started";

/// Marks the start of a script inside a transaction.
pub fn mark_start_sql() -> String {
    format!("SELECT set_config('{STARTED_SETTING}', clock_timestamp()::text, true);")
}

fn duration_since_mark() -> String {
    format!(
        "(extract(epoch FROM clock_timestamp() - current_setting('{STARTED_SETTING}')::timestamptz) * 1000)::bigint"
    )
}

impl RowIdentity<'_> {
    /// The row's identity columns as SQL literals, in [`IDENTITY_COLUMNS`] order.
    fn values(&self) -> String {
        [
            quote_optional(self.version),
            quote_literal(self.script),
            quote_literal(self.kind),
            quote_literal(self.checksum),
            quote_literal(self.bundle_id),
            quote_literal(self.wave_id),
        ]
        .join(", ")
    }
}

/// The columns [`RowIdentity::values`] fills.
const IDENTITY_COLUMNS: &str = "version, script, kind, checksum, bundle_id, wave_id";

/// The `applied` row of a transactional script, inserted in the script's transaction.
/// It returns the duration the server measured, as a row tagged [`DURATION_TAG`].
pub fn insert_applied_sql(row: &RowIdentity<'_>) -> String {
    format!(
        "INSERT INTO flotilla.execution_log \
         ({IDENTITY_COLUMNS}, status, applied_at, applied_by, xact_id, duration_ms) \
         VALUES ({}, 'applied', clock_timestamp(), current_user, txid_current()::text, {}) \
         RETURNING duration_ms AS {DURATION_TAG}, xact_id;",
        row.values(),
        duration_since_mark(),
    )
}

/// The column name of the row a script's start returns in a message of several
/// scripts: `(pg_backend_pid(), index of the script in the message)`.
pub const SCRIPT_TAG: &str = "flotilla_script";

/// The column name of the row a script's `applied` insert returns: its `duration_ms`
/// (and, second, its transaction id, to ask whether it committed).
pub const DURATION_TAG: &str = "flotilla_duration";

/// The first statement of script `n` of a message: which server process runs it, which
/// script it is (so the answer, even one cut short by an error, says how far the
/// message got), and when it started by the server's clock.
pub fn script_start_sql(n: usize) -> String {
    format!("SELECT pg_backend_pid() AS {SCRIPT_TAG}, {n}, extract(epoch FROM clock_timestamp());")
}

/// The server's clock, to measure how long a script had run when it was cancelled
/// (a message's rows reach the client when the server flushes, not as they happen).
pub const SERVER_NOW_SQL: &str = "SELECT extract(epoch FROM clock_timestamp())";

/// True when the database holds relations of its own (outside the catalogs and
/// Flotilla's schema): a baseline is only for a tenant that was migrated before, never
/// for a new, empty one.
pub const HAS_OWN_SCHEMA_SQL: &str = "SELECT EXISTS (SELECT 1 FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'flotilla') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
     AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f'))";

/// Brings an empty log's shape up to what `baselined` and `baseline` rows need, inside
/// the recording transaction: first proves, in the database, that this session holds
/// the lock and the log is still empty; then adds the `source` column and widens the
/// status and kind checks, each only when missing (an up-to-date log costs catalog
/// lookups, no table lock). A refusal (the role does not own an old log) fails the run
/// with the server's reason.
pub const BASELINE_SHAPE_SQL: &str = "DO $flotilla$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_locks \
WHERE pid = pg_backend_pid() AND locktype = 'advisory' AND granted AND objsubid = 1 \
AND classid = 1181511540 AND objid = 1768713313) OR EXISTS (SELECT 1 FROM flotilla.execution_log) THEN \
RAISE EXCEPTION 'not baselining: this session does not hold the tenant lock, or the log is no longer empty'; \
END IF;
IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'flotilla.execution_log'::regclass \
AND attname = 'source' AND NOT attisdropped) THEN \
ALTER TABLE flotilla.execution_log ADD COLUMN source text; END IF;
IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'flotilla.execution_log'::regclass \
AND conname = 'execution_log_status_check' AND pg_get_constraintdef(oid) NOT LIKE '%skipped%') THEN \
ALTER TABLE flotilla.execution_log DROP CONSTRAINT execution_log_status_check; \
ALTER TABLE flotilla.execution_log ADD CONSTRAINT execution_log_status_check \
CHECK (status IN ('applied', 'started', 'baselined', 'undone', 'skipped')); END IF;
IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'flotilla.execution_log'::regclass \
AND conname = 'execution_log_kind_check' AND pg_get_constraintdef(oid) NOT LIKE '%''baseline''%') THEN \
ALTER TABLE flotilla.execution_log DROP CONSTRAINT execution_log_kind_check; \
ALTER TABLE flotilla.execution_log ADD CONSTRAINT execution_log_kind_check \
CHECK (kind IN ('versioned', 'repeatable', 'baseline')); END IF;
END $flotilla$;";

/// A `baselined` row: the version is recorded as done without running (a tenant
/// migrated before Flotilla met it); `source` says by what (`baseline-version 60`).
/// Who applied it and when come from the previous tool's history where it says.
pub fn insert_baselined_sql(
    row: &RowIdentity<'_>,
    source: &str,
    applied_by: Option<&str>,
    applied_at: Option<&str>,
) -> String {
    format!(
        "INSERT INTO flotilla.execution_log \
         ({IDENTITY_COLUMNS}, status, applied_at, applied_by, xact_id, source) \
         VALUES ({}, 'baselined', COALESCE({}::timestamptz, clock_timestamp()), \
         COALESCE({}, current_user), txid_current()::text, {});",
        row.values(),
        quote_optional(applied_at),
        quote_optional(applied_by),
        quote_literal(source),
    )
}

/// The SQLSTATE a precondition that is not true raises (class `FL`, Flotilla's own).
pub const PRECONDITION_SQLSTATE: &str = "FLPC1";

/// Raises [`PRECONDITION_SQLSTATE`] unless `precondition` is true, inside the script's
/// transaction (PostgreSQL then skips the rest of the block and of the message).
pub fn precondition_check_sql(script: &str, precondition: &str) -> String {
    let tag = crate::bundle::PRECONDITION_TAG;
    format!(
        "DO {tag} BEGIN IF NOT COALESCE(({precondition}), false) THEN \
         RAISE EXCEPTION USING ERRCODE = '{PRECONDITION_SQLSTATE}', MESSAGE = {}; \
         END IF; END {tag};",
        quote_literal(&format!(
            "precondition of {script} is not true: {precondition}"
        )),
    )
}

/// Raises a serialization failure (retryable) if `precondition` has become true since
/// it was found false: a script is recorded as skipped only while it still is.
pub fn precondition_still_false_sql(script: &str, precondition: &str) -> String {
    let tag = crate::bundle::PRECONDITION_TAG;
    format!(
        "DO {tag} BEGIN IF COALESCE(({precondition}), false) THEN \
         RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = {}; \
         END IF; END {tag};",
        quote_literal(&format!(
            "the precondition of {script} became true while it was being skipped; the tenant is tried again"
        )),
    )
}

/// A `skipped` row: the script did not run because its precondition was not true
/// (`on-fail=skip`); the next wave asks again.
pub fn insert_skipped_sql(row: &RowIdentity<'_>, source: &str) -> String {
    format!(
        "INSERT INTO flotilla.execution_log \
         ({IDENTITY_COLUMNS}, status, applied_at, applied_by, xact_id, source) \
         VALUES ({}, 'skipped', clock_timestamp(), current_user, txid_current()::text, {});",
        row.values(),
        quote_literal(source),
    )
}

/// Removes a version's `skipped` or `undone` row before the version is recorded again
/// (one row per version: the log's unique index).
pub fn delete_replaced_sql(version: &str) -> String {
    format!(
        "DELETE FROM flotilla.execution_log WHERE kind = 'versioned' AND version = {} \
         AND status IN ('skipped', 'undone');",
        quote_literal(version)
    )
}

/// Marks a version `undone` in its undo script's transaction: who undid it, when, in
/// which wave, and how long the undo script took (returned as the `applied` insert
/// returns it, so a message of several undo scripts reads the same way).
pub fn mark_undone_sql(version: &str, bundle_id: &str, wave_id: &str) -> String {
    format!(
        "UPDATE flotilla.execution_log SET status = 'undone', applied_at = clock_timestamp(), \
         applied_by = current_user, xact_id = txid_current()::text, duration_ms = {}, \
         bundle_id = {}, wave_id = {} \
         WHERE kind = 'versioned' AND version = {} AND status IN ('applied', 'baselined') \
         RETURNING duration_ms AS {DURATION_TAG}, xact_id;",
        duration_since_mark(),
        quote_literal(bundle_id),
        quote_literal(wave_id),
        quote_literal(version),
    )
}

/// The column name of the row one run of a batch script returns: how many rows it
/// changed.
pub const BATCH_ROWS_TAG: &str = "flotilla_batch_rows";

/// One run of a batch script: its statement and the progress of its `started` row
/// (non-empty runs in `statements_done`, rows in `rows_changed`) in one short
/// transaction, so a crash leaves the count exact; returns the rows it changed and the
/// server process. The statement is the script's own (one DML, checked at load).
pub fn batch_run_sql(log_id: i64, statement: &str) -> String {
    let tag = crate::bundle::BATCH_TAG;
    let statement = statement.trim().trim_end_matches(';');
    format!(
        "BEGIN;\n\
         DO {tag} DECLARE flotilla_rows bigint; BEGIN\n{statement}\n;\n\
         GET DIAGNOSTICS flotilla_rows = ROW_COUNT;\n\
         UPDATE flotilla.execution_log SET \
         statements_done = COALESCE(statements_done, 0) + (flotilla_rows > 0)::int, \
         rows_changed = COALESCE(rows_changed, 0) + flotilla_rows WHERE id = {log_id};\n\
         PERFORM set_config('flotilla.batch_rows', flotilla_rows::text, true);\n\
         END {tag};\n\
         SELECT current_setting('flotilla.batch_rows') AS {BATCH_ROWS_TAG}, pg_backend_pid();\n\
         COMMIT;"
    )
}

/// The rows a batch script changed in all, read when it finishes.
pub fn rows_changed_sql(log_id: i64) -> String {
    format!("SELECT COALESCE(rows_changed, 0) FROM flotilla.execution_log WHERE id = {log_id};")
}

/// The `started` row of a non-transactional script, committed before it runs.
pub fn insert_started_sql(row: &RowIdentity<'_>) -> String {
    format!(
        "INSERT INTO flotilla.execution_log ({IDENTITY_COLUMNS}, status, statements_done) \
         VALUES ({}, 'started', 0) RETURNING id;",
        row.values(),
    )
}

/// Records that `done` statements of a started script finished.
pub fn progress_sql(log_id: i64, done: usize) -> String {
    format!("UPDATE flotilla.execution_log SET statements_done = {done} WHERE id = {log_id};")
}

/// Turns a `started` row into `applied`.
pub fn finish_started_sql(log_id: i64, row: &RowIdentity<'_>, duration_ms: u128) -> String {
    format!(
        "UPDATE flotilla.execution_log SET status = 'applied', applied_at = clock_timestamp(), \
         applied_by = current_user, xact_id = txid_current()::text, duration_ms = {duration_ms}, \
         bundle_id = {}, wave_id = {} WHERE id = {log_id};",
        quote_literal(row.bundle_id),
        quote_literal(row.wave_id),
    )
}

/// Why a log row could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("flotilla.execution_log: {0}")]
pub struct DecodeError(pub String);

/// Parses [`READ_SQL`]'s result.
pub fn parse_rows(messages: &[SimpleQueryMessage]) -> Result<Vec<LogRow>, DecodeError> {
    let mut rows = Vec::new();
    for m in messages {
        let SimpleQueryMessage::Row(r) = m else {
            continue;
        };
        let text = |i: usize| r.get(i).map(str::to_string);
        let id: i64 = text(0)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| DecodeError("a row without a numeric id".into()))?;
        let status = match r.get(5) {
            Some("applied") => LogStatus::Applied,
            Some("started") => LogStatus::Started,
            Some("baselined") => LogStatus::Baselined,
            Some("undone") => LogStatus::Undone,
            Some("skipped") => LogStatus::Skipped,
            other => {
                return Err(DecodeError(format!(
                    "row {id} has unknown status {other:?}"
                )));
            }
        };
        let kind = text(3).unwrap_or_default();
        if !matches!(kind.as_str(), "versioned" | "repeatable" | "baseline") {
            return Err(DecodeError(format!("row {id} has unknown kind {kind:?}")));
        }
        rows.push(LogRow {
            id,
            version: text(1),
            script: text(2).unwrap_or_default(),
            kind,
            checksum: text(4).unwrap_or_default(),
            status,
            statements_done: text(6).and_then(|s| s.parse().ok()),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_identifiers() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b'c"), r"E'a\\b''c'");
        assert_eq!(quote_optional(None), "NULL");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
