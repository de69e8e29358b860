//! What a statement's leading tokens say about how it may run: statements PostgreSQL
//! refuses inside a transaction block, statements that would break the atomicity of a
//! transactional script with its log row, and the index an interrupted
//! `CREATE INDEX CONCURRENTLY` may have left behind. Pure functions over tokens from
//! `bundle::sql`; this module never reads files or talks to a database.

use super::sql::Token;

/// Top-level words of a statement: identifiers outside parentheses, in order.
fn words(tokens: &[Token]) -> Vec<&str> {
    let mut depth = 0usize;
    let mut out = Vec::new();
    for t in tokens {
        match t {
            Token::Punct(b'(') => depth += 1,
            Token::Punct(b')') => depth = depth.saturating_sub(1),
            Token::Word(w) if depth == 0 => out.push(w.as_str()),
            // A quoted name is never a keyword.
            Token::Quoted(_) if depth == 0 => out.push("\""),
            _ => {}
        }
    }
    out
}

/// If PostgreSQL refuses this statement inside a transaction block, a short name of it
/// (for example `CREATE INDEX CONCURRENTLY`).
pub fn refused_in_transaction(tokens: &[Token]) -> Option<&'static str> {
    let w = words(tokens);
    let at = |i: usize| w.get(i).copied().unwrap_or("");
    match (at(0), at(1)) {
        ("create", "index") if at(2) == "concurrently" => Some("CREATE INDEX CONCURRENTLY"),
        ("create", "unique") if at(2) == "index" && at(3) == "concurrently" => {
            Some("CREATE UNIQUE INDEX CONCURRENTLY")
        }
        ("drop", "index") if at(2) == "concurrently" => Some("DROP INDEX CONCURRENTLY"),
        ("reindex", "index" | "table")
            if at(2) == "concurrently"
                || tokens
                    .iter()
                    .any(|t| matches!(t, Token::Word(x) if x == "concurrently")) =>
        {
            Some("REINDEX CONCURRENTLY")
        }
        ("reindex", "schema" | "database" | "system") => Some("REINDEX SCHEMA/DATABASE/SYSTEM"),
        ("vacuum", _) => Some("VACUUM"),
        ("create", "database") => Some("CREATE DATABASE"),
        ("drop", "database") => Some("DROP DATABASE"),
        ("alter", "system") => Some("ALTER SYSTEM"),
        ("create", "tablespace") => Some("CREATE TABLESPACE"),
        ("drop", "tablespace") => Some("DROP TABLESPACE"),
        ("alter", "database") if w.windows(2).any(|p| p == ["set", "tablespace"]) => {
            Some("ALTER DATABASE SET TABLESPACE")
        }
        ("alter", "table") if w.contains(&"detach") && w.last() == Some(&"concurrently") => {
            Some("ALTER TABLE DETACH PARTITION CONCURRENTLY")
        }
        // CLUSTER with no table re-clusters the whole database.
        ("cluster", "") => Some("CLUSTER without a table"),
        _ => None,
    }
}

/// If this statement ends or starts a transaction itself, its name. Inside a
/// transactional script it would commit the script apart from its log row.
pub fn transaction_control(tokens: &[Token]) -> Option<&'static str> {
    let w = words(tokens);
    let at = |i: usize| w.get(i).copied().unwrap_or("");
    match (at(0), at(1)) {
        ("begin", _) => Some("BEGIN"),
        ("start", "transaction") => Some("START TRANSACTION"),
        ("commit", _) | ("end", _) => Some("COMMIT"),
        ("abort", _) => Some("ROLLBACK"),
        // ROLLBACK TO SAVEPOINT stays inside the transaction and is fine.
        ("rollback", second) if second != "to" && at(2) != "to" => Some("ROLLBACK"),
        ("prepare", "transaction") => Some("PREPARE TRANSACTION"),
        _ => None,
    }
}

/// The index that `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ON …` builds,
/// with the table it is on (as written, possibly schema-qualified), if this is one.
pub fn concurrent_index(tokens: &[Token]) -> Option<ConcurrentIndex> {
    let name = |t: &Token| match t {
        Token::Word(w) => Some(w.clone()),
        Token::Quoted(q) => Some(q.clone()),
        _ => None,
    };
    let word = |i: usize, w: &str| matches!(tokens.get(i), Some(Token::Word(x)) if x == w);
    let mut i = 0;
    if !word(i, "create") {
        return None;
    }
    i += 1;
    if word(i, "unique") {
        i += 1;
    }
    if !(word(i, "index") && word(i + 1, "concurrently")) {
        return None;
    }
    i += 2;
    if word(i, "if") && word(i + 1, "not") && word(i + 2, "exists") {
        i += 3;
    }
    // An unnamed index gets a generated name we cannot know from the text.
    if word(i, "on") {
        return None;
    }
    let index = name(tokens.get(i)?)?;
    i += 1;
    if !word(i, "on") {
        return None;
    }
    i += 1;
    if word(i, "only") {
        i += 1;
    }
    let mut table = vec![name(tokens.get(i)?)?];
    i += 1;
    while matches!(tokens.get(i), Some(Token::Punct(b'.'))) {
        table.push(name(tokens.get(i + 1)?)?);
        i += 2;
    }
    Some(ConcurrentIndex { index, table })
}

/// What a session-level statement does to the session: set something (named by its
/// key), reset it, or reset everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange {
    Set(String),
    Reset(String),
    ResetAll,
}

/// What this statement changes in the *session* (`SET`, `SET ROLE`, `SET SESSION
/// AUTHORIZATION`, `RESET`, a bare `SELECT [pg_catalog.]set_config('name', …)`), if it
/// is one: what a resumed `no-transaction` script must restore, since the session that
/// ran it is gone. `text` is the statement's SQL (for `set_config`'s setting name).
pub fn session_change(tokens: &[Token], text: &str) -> Option<SessionChange> {
    let w = words(tokens);
    let at = |i: usize| w.get(i).copied().unwrap_or("");
    // `SET SESSION x` is `SET x`; SET LOCAL, TRANSACTION and CONSTRAINTS live in a
    // transaction only.
    let rest = if at(1) == "session" && at(2) != "authorization" {
        2
    } else {
        1
    };
    match at(0) {
        "set" => match at(1) {
            "local" | "transaction" | "constraints" => None,
            "session" if at(2) == "authorization" => {
                Some(SessionChange::Set("session authorization".into()))
            }
            "" => None,
            _ => Some(SessionChange::Set(at(rest).to_string())),
        },
        "reset" => match at(1) {
            "all" => Some(SessionChange::ResetAll),
            "session" if at(2) == "authorization" => {
                Some(SessionChange::Reset("session authorization".into()))
            }
            "" => None,
            name => Some(SessionChange::Reset(name.to_string())),
        },
        "select" => {
            // Only a statement that does nothing but call set_config: anything more
            // (another call, FROM, INTO) is not safe to run again.
            let call = matches!(
                w.as_slice(),
                ["select", "set_config"] | ["select", "pg_catalog", "set_config"]
            );
            let ends_with_call = matches!(
                tokens
                    .iter()
                    .rev()
                    .find(|t| !matches!(t, Token::Punct(b';'))),
                Some(Token::Punct(b')'))
            ) && tokens.len() < super::sql::MAX_LEADING_TOKENS;
            if !(call && ends_with_call) {
                return None;
            }
            let name = text
                .find('(')
                .map(|i| text[i + 1..].trim_start())
                .and_then(|args| args.strip_prefix('\''))
                .and_then(|args| args.split('\'').next())
                .map(str::to_ascii_lowercase)
                .unwrap_or_else(|| text.to_string());
            Some(SessionChange::Set(name))
        }
        _ => None,
    }
}

/// True for a statement that changes the session: the same judgement as
/// [`session_change`], for callers that need only the yes or no.
pub fn session_setting(tokens: &[Token]) -> bool {
    session_change(tokens, "").is_some()
}

/// What `REINDEX … CONCURRENTLY` rebuilds, if this is one: where an interrupted run may
/// have left `_ccnew`/`_ccold` indexes `INVALID`.
pub fn reindex_concurrently(tokens: &[Token]) -> Option<ReindexTarget> {
    let w = words(tokens);
    // `REINDEX KIND CONCURRENTLY name`, or the option form `REINDEX (CONCURRENTLY) KIND
    // name` of PostgreSQL 14 and later.
    let as_word = w.contains(&"concurrently");
    let as_option = tokens
        .iter()
        .any(|t| matches!(t, Token::Word(x) if x == "concurrently"));
    if w.first() != Some(&"reindex") || !(as_word || as_option) {
        return None;
    }
    let kind = w.get(1).copied()?;
    let name = name_after(tokens, if as_word { "concurrently" } else { kind });
    Some(match kind {
        "index" => ReindexTarget::IndexOf(name?),
        "table" => ReindexTarget::Table(name?),
        "schema" => ReindexTarget::Schema(name?.pop()?),
        "database" | "system" => ReindexTarget::Database,
        _ => return None,
    })
}

/// The (possibly schema-qualified) name after the top-level word `after`.
fn name_after(tokens: &[Token], after: &str) -> Option<Vec<String>> {
    let start = tokens
        .iter()
        .position(|t| matches!(t, Token::Word(w) if w == after))?;
    let part = |t: Option<&Token>| match t {
        Some(Token::Word(w)) => Some(w.clone()),
        Some(Token::Quoted(q)) => Some(q.clone()),
        _ => None,
    };
    let mut i = start + 1;
    let mut name = vec![part(tokens.get(i))?];
    i += 1;
    while matches!(tokens.get(i), Some(Token::Punct(b'.'))) {
        name.push(part(tokens.get(i + 1))?);
        i += 2;
    }
    Some(name)
}

/// What a `REINDEX … CONCURRENTLY` covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReindexTarget {
    /// The table of this index.
    IndexOf(Vec<String>),
    Table(Vec<String>),
    Schema(String),
    /// The whole database (`DATABASE` or `SYSTEM`).
    Database,
}

/// The SQLSTATE that, when this statement runs again after an interruption, means its
/// effect is already there: `DROP INDEX CONCURRENTLY` of a gone index (42704), `ALTER
/// TYPE … ADD VALUE` of a value that exists (42710).
pub fn done_if_fails_with(tokens: &[Token]) -> Option<&'static str> {
    let w = words(tokens);
    let at = |i: usize| w.get(i).copied().unwrap_or("");
    match (at(0), at(1)) {
        ("drop", "index") if at(2) == "concurrently" => Some("42704"),
        ("alter", "type") if w.windows(2).any(|p| p == ["add", "value"]) => Some("42710"),
        _ => None,
    }
}

/// True when running this statement a second time is harmless or recovered by the
/// applier: what a `no-transaction` script may hold without a lint warning, since a
/// crash between a statement and its recorded progress runs it again.
pub fn safe_to_rerun(tokens: &[Token]) -> bool {
    let w = words(tokens);
    let at = |i: usize| w.get(i).copied().unwrap_or("");
    // IF NOT EXISTS anywhere; IF EXISTS only on a DROP (an `ALTER TABLE IF EXISTS t
    // ADD COLUMN c` still fails the second time); OR REPLACE on a CREATE.
    let guarded = w.windows(3).any(|p| p == ["if", "not", "exists"])
        || (at(0) == "drop" && w.windows(2).any(|p| p == ["if", "exists"]))
        || (at(0) == "create" && w.windows(2).any(|p| p == ["or", "replace"]));
    guarded
        || concurrent_index(tokens).is_some()
        || reindex_concurrently(tokens).is_some()
        || done_if_fails_with(tokens).is_some()
        || session_setting(tokens)
        || matches!(
            (at(0), at(1)),
            (
                "vacuum" | "analyze" | "reindex" | "cluster" | "select" | "show",
                _
            ) | ("refresh", "materialized")
        )
}

/// An index built concurrently, named in its script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrentIndex {
    /// The index name, as PostgreSQL stores it (unquoted names folded to lower case).
    pub index: String,
    /// The table's name parts: `[table]` or `[schema, table]`.
    pub table: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::sql::split;

    fn first(sql: &str) -> Vec<Token> {
        split(sql).expect("lexes").remove(0).leading
    }

    #[test]
    fn statements_refused_in_a_transaction_block() {
        for (sql, name) in [
            (
                "CREATE INDEX CONCURRENTLY i ON t (a)",
                "CREATE INDEX CONCURRENTLY",
            ),
            (
                "create unique index concurrently if not exists i on t(a)",
                "CREATE UNIQUE INDEX CONCURRENTLY",
            ),
            (
                "DROP INDEX CONCURRENTLY IF EXISTS i",
                "DROP INDEX CONCURRENTLY",
            ),
            (
                "REINDEX (VERBOSE) INDEX CONCURRENTLY i",
                "REINDEX CONCURRENTLY",
            ),
            ("reindex table concurrently t", "REINDEX CONCURRENTLY"),
            ("REINDEX DATABASE app", "REINDEX SCHEMA/DATABASE/SYSTEM"),
            ("VACUUM (ANALYZE) t", "VACUUM"),
            ("vacuum", "VACUUM"),
            ("CREATE DATABASE x", "CREATE DATABASE"),
            ("DROP DATABASE x", "DROP DATABASE"),
            ("ALTER SYSTEM SET work_mem = '1MB'", "ALTER SYSTEM"),
            ("CREATE TABLESPACE ts LOCATION '/x'", "CREATE TABLESPACE"),
            (
                "ALTER DATABASE d SET TABLESPACE ts",
                "ALTER DATABASE SET TABLESPACE",
            ),
            (
                "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
                "ALTER TABLE DETACH PARTITION CONCURRENTLY",
            ),
            ("CLUSTER", "CLUSTER without a table"),
        ] {
            assert_eq!(refused_in_transaction(&first(sql)), Some(name), "{sql}");
        }
    }

    #[test]
    fn statements_fine_in_a_transaction_block() {
        for sql in [
            "CREATE INDEX i ON t (a)",
            "CREATE INDEX \"concurrently\" ON t (a)",
            "REINDEX INDEX i",
            "ALTER DATABASE d SET work_mem = '1MB'",
            "ALTER TABLE p DETACH PARTITION c",
            "CLUSTER t USING i",
            "ALTER TYPE mood ADD VALUE 'meh'",
            "select 'vacuum'",
            "create table vacuum_log (id int)",
        ] {
            assert_eq!(refused_in_transaction(&first(sql)), None, "{sql}");
        }
    }

    #[test]
    fn transaction_control_statements() {
        for (sql, want) in [
            ("BEGIN", Some("BEGIN")),
            (
                "begin transaction isolation level serializable",
                Some("BEGIN"),
            ),
            ("START TRANSACTION", Some("START TRANSACTION")),
            ("COMMIT", Some("COMMIT")),
            ("END", Some("COMMIT")),
            ("ROLLBACK", Some("ROLLBACK")),
            ("ROLLBACK TO SAVEPOINT a", None),
            ("ROLLBACK WORK TO a", None),
            ("SAVEPOINT a", None),
            ("DO $$ BEGIN COMMIT; END $$", None),
            ("select 1", None),
        ] {
            assert_eq!(transaction_control(&first(sql)), want, "{sql}");
        }
    }

    #[test]
    fn concurrent_index_names() {
        assert_eq!(
            concurrent_index(&first(
                "CREATE INDEX CONCURRENTLY Idx_A ON app.\"Users\" (a)"
            )),
            Some(ConcurrentIndex {
                index: "idx_a".into(),
                table: vec!["app".into(), "Users".into()]
            })
        );
        assert_eq!(
            concurrent_index(&first(
                "create unique index concurrently if not exists \"I\" on only t (a)"
            )),
            Some(ConcurrentIndex {
                index: "I".into(),
                table: vec!["t".into()]
            })
        );
        assert_eq!(
            concurrent_index(&first("create index concurrently on t (a)")),
            None
        );
        assert_eq!(concurrent_index(&first("create index i on t (a)")), None);
    }

    #[test]
    fn session_settings_are_recognised() {
        for sql in [
            "SET search_path TO app",
            "set session search_path = app",
            "SET ROLE migrator",
            "SET SESSION AUTHORIZATION app",
            "RESET ROLE",
            "SELECT set_config('search_path', 'app', false)",
        ] {
            assert!(session_setting(&first(sql)), "{sql}");
        }
        for sql in [
            "SET LOCAL search_path TO app",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SELECT 1",
            "CREATE TABLE set_things ()",
        ] {
            assert!(!session_setting(&first(sql)), "{sql}");
        }
    }

    #[test]
    fn session_changes_are_keyed_by_what_they_set() {
        let change = |sql: &str| session_change(&first(sql), sql);
        assert_eq!(
            change("SET search_path TO app"),
            Some(SessionChange::Set("search_path".into()))
        );
        assert_eq!(
            change("set session search_path = app"),
            Some(SessionChange::Set("search_path".into()))
        );
        assert_eq!(
            change("SET ROLE tmp"),
            Some(SessionChange::Set("role".into()))
        );
        assert_eq!(
            change("RESET ROLE"),
            Some(SessionChange::Reset("role".into()))
        );
        assert_eq!(change("RESET ALL"), Some(SessionChange::ResetAll));
        assert_eq!(
            change("SET SESSION AUTHORIZATION app"),
            Some(SessionChange::Set("session authorization".into()))
        );
        assert_eq!(
            change("SELECT pg_catalog.set_config('search_path', '', false)"),
            Some(SessionChange::Set("search_path".into()))
        );
        for not_replayable in [
            "SELECT set_config('a', 'b', false), nextval('s')",
            "SELECT set_config('a', 'b', false) FROM t",
            "SELECT set_config('a', 'b', false) INTO t",
            "SET LOCAL search_path TO app",
        ] {
            assert_eq!(change(not_replayable), None, "{not_replayable}");
        }
    }

    #[test]
    fn reindex_targets() {
        assert_eq!(
            reindex_concurrently(&first("REINDEX (VERBOSE) INDEX CONCURRENTLY app.i")),
            Some(ReindexTarget::IndexOf(vec!["app".into(), "i".into()]))
        );
        assert_eq!(
            reindex_concurrently(&first("reindex table concurrently \"T\"")),
            Some(ReindexTarget::Table(vec!["T".into()]))
        );
        assert_eq!(
            reindex_concurrently(&first("REINDEX SCHEMA CONCURRENTLY app")),
            Some(ReindexTarget::Schema("app".into()))
        );
        assert_eq!(
            reindex_concurrently(&first("REINDEX DATABASE CONCURRENTLY db")),
            Some(ReindexTarget::Database)
        );
        assert_eq!(reindex_concurrently(&first("REINDEX INDEX i")), None);
        assert_eq!(
            reindex_concurrently(&first("REINDEX (CONCURRENTLY, VERBOSE) TABLE app.t")),
            Some(ReindexTarget::Table(vec!["app".into(), "t".into()]))
        );
    }

    #[test]
    fn what_may_run_twice() {
        assert_eq!(
            done_if_fails_with(&first("DROP INDEX CONCURRENTLY i")),
            Some("42704")
        );
        assert_eq!(
            done_if_fails_with(&first("ALTER TYPE mood ADD VALUE 'meh'")),
            Some("42710")
        );
        for sql in [
            "CREATE INDEX CONCURRENTLY i ON t (a)",
            "CREATE TABLE IF NOT EXISTS t ()",
            "DROP TABLE IF EXISTS t",
            "CREATE OR REPLACE VIEW v AS SELECT 1",
            "VACUUM t",
            "ALTER TYPE mood ADD VALUE 'meh'",
            "SET search_path TO app",
        ] {
            assert!(safe_to_rerun(&first(sql)), "{sql}");
        }
        for sql in [
            "CREATE TABLE t ()",
            "ALTER TABLE IF EXISTS t ADD COLUMN c int",
            "INSERT INTO t VALUES (1)",
            "ALTER TABLE t ADD COLUMN c int",
            "UPDATE t SET a = a + 1",
        ] {
            assert!(!safe_to_rerun(&first(sql)), "{sql}");
        }
    }
}
