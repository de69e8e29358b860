//! The safety lint: statements that take locks or rewrite tables in ways that freeze an
//! application (an index built without `CONCURRENTLY`, a column type change, a
//! constraint validated under `ACCESS EXCLUSIVE`, …) or break its clients (a dropped or
//! renamed column), each with a rule id, why it hurts and the safe pattern.
//!
//! Rule ids follow squawk's (<https://squawkhq.com/docs/rules>) where the rule is the
//! same, so a team that knows one knows the other; the rules are written on Flotilla's
//! own splitter rather than by embedding `squawk-linter` (see ARCHITECTURE.md). A rule
//! that concerns a table created earlier in the same script does not fire: a new table
//! is empty and nobody waits on it. The lint is pure: it reads a bundle and never
//! decides whether a wave may start (that is the engine's, with the wave's waivers).

use std::collections::HashSet;

use super::sql::{self, LineIndex, Token};
use super::{Bundle, Script};

/// Every rule, with what it is about: the ids `--allow` and `-- flotilla:allow` take.
pub const RULES: &[(&str, &str)] = &[
    (
        "require-concurrent-index-creation",
        "CREATE INDEX without CONCURRENTLY blocks writes to the table while it builds",
    ),
    (
        "require-concurrent-index-deletion",
        "DROP INDEX without CONCURRENTLY takes ACCESS EXCLUSIVE on the table",
    ),
    (
        "changing-column-type",
        "ALTER COLUMN … TYPE rewrites the table (and its indexes) under ACCESS EXCLUSIVE",
    ),
    (
        "adding-not-nullable-field",
        "SET NOT NULL scans the whole table under ACCESS EXCLUSIVE",
    ),
    (
        "adding-foreign-key-constraint",
        "a foreign key added without NOT VALID is checked row by row while both tables are locked",
    ),
    (
        "constraint-missing-not-valid",
        "a CHECK constraint added without NOT VALID scans the table under ACCESS EXCLUSIVE",
    ),
    (
        "disallowed-unique-constraint",
        "ADD UNIQUE / PRIMARY KEY builds its index under ACCESS EXCLUSIVE",
    ),
    (
        "adding-field-with-default",
        "ADD COLUMN with a volatile default (or a serial, or a stored generated column) rewrites the table",
    ),
    (
        "ban-drop-column",
        "DROP COLUMN breaks every client that still reads the column",
    ),
    (
        "renaming-table",
        "renaming a table breaks every client that still uses the old name",
    ),
    (
        "renaming-column",
        "renaming a column breaks every client that still uses the old name",
    ),
    (
        "ban-vacuum-full",
        "VACUUM FULL rewrites the table under ACCESS EXCLUSIVE",
    ),
    (
        "ban-cluster",
        "CLUSTER rewrites the table under ACCESS EXCLUSIVE",
    ),
];

/// Whether `rule` is one of [`RULES`].
pub fn is_rule(rule: &str) -> bool {
    RULES.iter().any(|(id, _)| *id == rule)
}

/// Whether a wave's `allow` entry is well formed: `RULE` (the whole bundle) or
/// `RULE@SCRIPT` (one script: one that already ran everywhere, whose text cannot take
/// a directive without changing its checksum).
pub fn is_allow_entry(entry: &str) -> bool {
    match entry.split_once('@') {
        Some((rule, script)) => is_rule(rule) && !script.trim().is_empty(),
        None => is_rule(entry),
    }
}

/// Whether the wave's `allow` list waives `f`.
fn allowed_by(allow: &[String], f: &Finding) -> bool {
    allow.iter().any(|a| match a.split_once('@') {
        Some((rule, script)) => rule == f.rule && script == f.script,
        None => a == f.rule,
    })
}

/// One statement a rule fires on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub rule: &'static str,
    pub script: String,
    /// 1-based line of the statement's first token.
    pub line: Option<u32>,
    /// The table it touches, as written, when the statement names one.
    pub table: Option<String>,
    /// Why it hurts.
    pub why: &'static str,
    /// The safe pattern.
    pub fix: &'static str,
    /// The reason given by a `-- flotilla:allow` directive of the script, if waived there.
    pub waived_by_script: Option<String>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.script)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": {} ({}); {}", self.rule, self.why, self.fix)
    }
}

/// The findings a wave refuses to start with: not waived by the script's
/// `-- flotilla:allow` nor by the wave's `allow` list.
pub fn unwaived(findings: &[Finding], allow: &[String]) -> Vec<Finding> {
    findings
        .iter()
        .filter(|f| f.waived_by_script.is_none() && !allowed_by(allow, f))
        .cloned()
        .collect()
}

/// The waivers in force, as a wave's status shows them: `rule at script:line (reason)`.
pub fn waivers(findings: &[Finding], allow: &[String]) -> Vec<String> {
    findings
        .iter()
        .filter_map(|f| {
            let place = match f.line {
                Some(line) => format!("{}:{line}", f.script),
                None => f.script.clone(),
            };
            match (&f.waived_by_script, waived_by_wave(allow, f)) {
                (Some(reason), _) => Some(format!("{} at {place} ({reason})", f.rule)),
                (None, Some(entry)) => Some(format!("{} at {place} (--allow {entry})", f.rule)),
                (None, None) => None,
            }
        })
        .collect()
}

/// How a wave's `allow` waives `f`, if it does: the matching entry.
pub fn waived_by_wave<'a>(allow: &'a [String], f: &Finding) -> Option<&'a str> {
    allow
        .iter()
        .find(|a| allowed_by(std::slice::from_ref(a), f))
        .map(String::as_str)
}

/// Every finding of `bundle`, scripts in apply order.
pub fn lint(bundle: &Bundle) -> Vec<Finding> {
    // Undo scripts are destructive by nature (they drop what a version made) and run
    // only when an operator asks for an undo: they are not linted.
    bundle
        .scripts()
        .iter()
        .filter(|s| s.kind.undo_version().is_none())
        .flat_map(|s| lint_script(s))
        .collect()
}

/// The findings of one script.
pub fn lint_script(script: &Script) -> Vec<Finding> {
    let lines = LineIndex::new(&script.sql);
    let mut created: HashSet<String> = HashSet::new();
    let mut validated: HashSet<String> = HashSet::new();
    let mut altered: HashSet<String> = HashSet::new();
    let transactional = script.directives.transaction == super::TransactionUse::Transactional;
    let mut out = Vec::new();
    for stmt in script.executable_statements() {
        let tokens = sql::tokens(stmt.sql(&script.sql));
        let line = stmt.first_token.map(|o| lines.line(o));
        let mut fire = |rule: &'static str, table: Option<String>, fix: &'static str| {
            if table.as_ref().is_some_and(|t| created.contains(&key(t))) {
                return;
            }
            let why = RULES
                .iter()
                .find(|(id, _)| *id == rule)
                .map(|(_, why)| *why)
                .unwrap_or("");
            let waived_by_script = script
                .directives
                .allow
                .iter()
                .find(|(r, _)| r == rule)
                .map(|(_, reason)| reason.clone());
            out.push(Finding {
                rule,
                script: script.name.clone(),
                line,
                table,
                why,
                fix,
                waived_by_script,
            });
        };
        let w = |i: usize| word(&tokens, i);
        match (w(0), w(1)) {
            (Some("create"), _) => {
                if let Some(table) = created_table(&tokens) {
                    created.insert(key(&table));
                } else if let Some((concurrently, table)) = index_creation(&tokens)
                    && !concurrently
                {
                    fire(
                        "require-concurrent-index-creation",
                        table,
                        "CREATE INDEX CONCURRENTLY in a no-transaction script",
                    );
                }
            }
            (Some("drop"), Some("index")) if w(2) != Some("concurrently") => fire(
                "require-concurrent-index-deletion",
                None,
                "DROP INDEX CONCURRENTLY in a no-transaction script",
            ),
            (Some("vacuum"), _) if vacuum_full(&tokens) => fire(
                "ban-vacuum-full",
                None,
                "plain VACUUM, or pg_repack for a rewrite without the long lock",
            ),
            (Some("cluster"), _) => fire(
                "ban-cluster",
                None,
                "pg_repack, which reorders without holding ACCESS EXCLUSIVE",
            ),
            (Some("alter"), Some("table")) => {
                let Some((table, actions)) = alter_table(&tokens) else {
                    continue;
                };
                for action in actions {
                    for (rule, fix) in alter_action(action, &table, &validated) {
                        fire(rule, Some(table.clone()), fix);
                    }
                    if contains_seq(action, &["validate", "constraint"]) {
                        // After an ALTER of the same table in the same transaction, the
                        // scan runs under the ACCESS EXCLUSIVE lock that ALTER took.
                        if transactional && altered.contains(&key(&table)) {
                            fire(
                                "constraint-missing-not-valid",
                                Some(table.clone()),
                                "VALIDATE CONSTRAINT in a later script: in the script that \
                                 added the constraint, the transaction still holds the ALTER's \
                                 ACCESS EXCLUSIVE lock while it scans",
                            );
                        }
                        validated.insert(key(&table));
                    }
                }
                altered.insert(key(&table));
            }
            _ => {}
        }
    }
    out
}

/// How a table name is compared: as written (folded by the splitter), `public.`
/// dropped, so `items` and `public.items` are one table and `audit.items` another.
fn key(table: &str) -> String {
    table.strip_prefix("public.").unwrap_or(table).to_string()
}

fn word(tokens: &[Token], i: usize) -> Option<&str> {
    match tokens.get(i) {
        Some(Token::Word(w)) => Some(w.as_str()),
        _ => None,
    }
}

fn name(t: Option<&Token>) -> Option<String> {
    match t {
        Some(Token::Word(w)) => Some(w.clone()),
        Some(Token::Quoted(q)) => Some(q.clone()),
        _ => None,
    }
}

/// A possibly schema-qualified name starting at `i`, and the index after it.
fn qualified_name(tokens: &[Token], mut i: usize) -> Option<(String, usize)> {
    let mut parts = vec![name(tokens.get(i))?];
    i += 1;
    while matches!(tokens.get(i), Some(Token::Punct(b'.'))) {
        parts.push(name(tokens.get(i + 1))?);
        i += 2;
    }
    Some((parts.join("."), i))
}

fn skip_words(tokens: &[Token], mut i: usize, words: &[&str]) -> usize {
    while word(tokens, i).is_some_and(|w| words.contains(&w)) {
        i += 1;
    }
    i
}

/// `CREATE [GLOBAL|LOCAL] [TEMP|UNLOGGED] TABLE [IF NOT EXISTS] name`.
fn created_table(tokens: &[Token]) -> Option<String> {
    let i = skip_words(
        tokens,
        1,
        &["global", "local", "temp", "temporary", "unlogged"],
    );
    if word(tokens, i) != Some("table") {
        return None;
    }
    let mut i = i + 1;
    if word(tokens, i) == Some("if") {
        i += 3;
    }
    qualified_name(tokens, i).map(|(n, _)| n)
}

/// `CREATE [UNIQUE] INDEX [CONCURRENTLY] … ON [ONLY] table`: whether concurrently, and
/// the table.
fn index_creation(tokens: &[Token]) -> Option<(bool, Option<String>)> {
    let mut i = 1;
    if word(tokens, i) == Some("unique") {
        i += 1;
    }
    if word(tokens, i) != Some("index") {
        return None;
    }
    let concurrently = word(tokens, i + 1) == Some("concurrently");
    let on = (i..tokens.len()).find(|&j| word(tokens, j) == Some("on"))?;
    // `ON ONLY parent` creates an invalid index on a partitioned table without touching
    // its partitions: the safe first step there.
    if word(tokens, on + 1) == Some("only") {
        return Some((true, None));
    }
    Some((concurrently, qualified_name(tokens, on + 1).map(|(n, _)| n)))
}

fn vacuum_full(tokens: &[Token]) -> bool {
    tokens
        .iter()
        .take_while(|t| !matches!(t, Token::Punct(b')')))
        .any(|t| matches!(t, Token::Word(w) if w == "full"))
        && !tokens
            .iter()
            .any(|t| matches!(t, Token::Word(w) if w == "false"))
}

/// `ALTER TABLE [IF EXISTS] [ONLY] name [*] action [, action …]`: the table and its
/// actions, split at top-level commas.
fn alter_table(tokens: &[Token]) -> Option<(String, Vec<&[Token]>)> {
    let mut i = 2;
    if word(tokens, i) == Some("if") {
        i += 2;
    }
    i = skip_words(tokens, i, &["only"]);
    let (table, mut i) = qualified_name(tokens, i)?;
    if matches!(tokens.get(i), Some(Token::Punct(b'*'))) {
        i += 1;
    }
    let rest = tokens.get(i..)?;
    let mut actions = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (j, t) in rest.iter().enumerate() {
        match t {
            Token::Punct(b'(') => depth += 1,
            Token::Punct(b')') => depth = depth.saturating_sub(1),
            Token::Punct(b',') if depth == 0 => {
                actions.push(&rest[start..j]);
                start = j + 1;
            }
            _ => {}
        }
    }
    actions.push(&rest[start..]);
    Some((table, actions))
}

fn contains_seq(tokens: &[Token], seq: &[&str]) -> bool {
    (0..tokens.len()).any(|i| {
        seq.iter()
            .enumerate()
            .all(|(k, w)| word(tokens, i + k) == Some(*w))
    })
}

fn contains_word(tokens: &[Token], w: &str) -> bool {
    tokens.iter().any(|t| matches!(t, Token::Word(x) if x == w))
}

/// Functions whose value differs per row: a default calling one is written into every
/// existing row, rewriting the table.
const VOLATILE: &[&str] = &[
    "random",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "clock_timestamp",
    "timeofday",
    "nextval",
    "statement_timestamp",
    "txid_current",
];

/// The rules one `ALTER TABLE` action breaks, with their safe pattern.
fn alter_action(
    action: &[Token],
    table: &str,
    validated: &HashSet<String>,
) -> Vec<(&'static str, &'static str)> {
    let w = |i: usize| word(action, i);
    let mut out = Vec::new();
    match (w(0), w(1)) {
        (Some("alter"), _) => {
            let after_column = if w(1) == Some("column") { 3 } else { 2 };
            let verb = (w(after_column), w(after_column + 1), w(after_column + 2));
            match verb {
                (Some("type"), _, _) | (Some("set"), Some("data"), Some("type")) => out.push((
                    "changing-column-type",
                    "add a new column, backfill it in batches, switch readers, drop the old one",
                )),
                (Some("set"), Some("not"), Some("null")) if !validated.contains(&key(table)) => out
                    .push((
                        "adding-not-nullable-field",
                        "ADD CONSTRAINT … CHECK (col IS NOT NULL) NOT VALID in one script; \
                         VALIDATE CONSTRAINT (no long lock), then SET NOT NULL (PostgreSQL 12+ \
                         uses the check) in the next, and drop the check",
                    )),
                _ => {}
            }
        }
        (Some("add"), _) => {
            let is_column = w(1) == Some("column")
                || !matches!(
                    w(1),
                    Some("constraint" | "unique" | "primary" | "foreign" | "check" | "exclude")
                );
            if is_column {
                let default_volatile = action.windows(2).any(|p| {
                    matches!((&p[0], &p[1]), (Token::Word(f), Token::Punct(b'(')) if VOLATILE.contains(&f.as_str()))
                }) && contains_word(action, "default");
                let serial = action.iter().any(|t| {
                    matches!(t, Token::Word(x) if matches!(x.as_str(), "serial" | "bigserial" | "smallserial" | "serial4" | "serial8" | "serial2"))
                });
                let stored = (contains_seq(action, &["generated", "always", "as"])
                    && contains_word(action, "stored"))
                    || contains_seq(action, &["as", "identity"]);
                if default_volatile || serial || stored {
                    out.push((
                        "adding-field-with-default",
                        "add the column without the default (or with a constant one), set the \
                         default afterwards, backfill existing rows in batches",
                    ));
                }
                if contains_word(action, "references") {
                    out.push((
                        "adding-foreign-key-constraint",
                        "add the column, then ADD CONSTRAINT … FOREIGN KEY … NOT VALID and \
                         VALIDATE CONSTRAINT in a later script",
                    ));
                }
            } else {
                let not_valid = contains_seq(action, &["not", "valid"]);
                if contains_seq(action, &["foreign", "key"]) && !not_valid {
                    out.push((
                        "adding-foreign-key-constraint",
                        "ADD CONSTRAINT … FOREIGN KEY … NOT VALID, then VALIDATE CONSTRAINT in a \
                         later script (it takes a lock that lets writes go on)",
                    ));
                } else if contains_word(action, "check") && !not_valid {
                    out.push((
                        "constraint-missing-not-valid",
                        "ADD CONSTRAINT … CHECK (…) NOT VALID, then VALIDATE CONSTRAINT in a \
                         later script",
                    ));
                } else if (contains_word(action, "unique")
                    || contains_seq(action, &["primary", "key"]))
                    && !contains_seq(action, &["using", "index"])
                {
                    out.push((
                        "disallowed-unique-constraint",
                        "CREATE UNIQUE INDEX CONCURRENTLY first, then ADD CONSTRAINT … UNIQUE \
                         USING INDEX (or PRIMARY KEY USING INDEX)",
                    ));
                }
            }
        }
        (Some("drop"), _) => {
            let is_column = w(1) == Some("column")
                || !matches!(
                    w(1),
                    Some(
                        "constraint"
                            | "not"
                            | "default"
                            | "expression"
                            | "identity"
                            | "row"
                            | "trigger"
                            | "rule"
                    )
                );
            if is_column {
                out.push((
                    "ban-drop-column",
                    "stop every reader and writer of the column first (a release before), then \
                     drop it",
                ));
            }
        }
        (Some("rename"), Some("to")) => out.push((
            "renaming-table",
            "add a view under the new name (or the old), move clients, then rename",
        )),
        (Some("rename"), _) if w(1) != Some("constraint") => out.push((
            "renaming-column",
            "add the new column, write both, move readers, then drop the old one",
        )),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests;
