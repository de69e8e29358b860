//! Adoption: what a tenant migrated by another tool (Flyway, dbmate, golang-migrate,
//! sqlx) already has, read from that tool's history table and turned into the
//! `baselined` rows Flotilla records before it runs anything (`--adopt`), and the
//! `--baseline-version` rule for fleets migrated by hand.
//!
//! This module owns the other tools' history formats and their rules: which rows count
//! as applied (Flyway's baseline, delete and undo rows; golang-migrate's single current
//! version), which refuse a tenant (a failed Flyway or sqlx row, a dirty golang-migrate
//! version, a script changed since the tool ran it: Flyway's CRC-32 and sqlx's SHA-384
//! compared with the bundle's file), and the one SELECT that reads each table. Deciding
//! is pure ([`decide`]); the applier runs the reads and writes the rows under the tenant's
//! lock, in one transaction with the log's creation. It never writes to another tool's
//! table and never trusts a table name it did not validate as an identifier.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use tokio_postgres::SimpleQueryMessage;

use super::log::{quote_ident, quote_literal};
use crate::bundle::{self, Bundle, ScriptKind, Version};

/// The migration tool whose history a wave adopts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tool {
    Flyway,
    Dbmate,
    GolangMigrate,
    Sqlx,
}

impl Tool {
    /// The name `--adopt` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Tool::Flyway => "flyway",
            Tool::Dbmate => "dbmate",
            Tool::GolangMigrate => "golang-migrate",
            Tool::Sqlx => "sqlx",
        }
    }

    /// The table the tool keeps its history in by default.
    fn default_table(self) -> &'static str {
        match self {
            Tool::Flyway => "flyway_schema_history",
            Tool::Dbmate | Tool::GolangMigrate => "schema_migrations",
            Tool::Sqlx => "_sqlx_migrations",
        }
    }
}

/// Where the previous tool's history lives: `flyway`, `flyway=public.flyway_schema_history`,
/// `sqlx=_sqlx_migrations` (schema `public` when none is given).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    pub tool: Tool,
    pub schema: String,
    pub table: String,
}

/// Why an `--adopt` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("adopt {given:?}: {reason}")]
pub struct SourceError {
    given: String,
    reason: String,
}

impl FromStr for Source {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| SourceError {
            given: s.to_string(),
            reason,
        };
        let (tool, table) = match s.split_once('=') {
            Some((tool, table)) => (tool, Some(table)),
            None => (s, None),
        };
        let tool = match tool.trim() {
            "flyway" => Tool::Flyway,
            "dbmate" => Tool::Dbmate,
            "golang-migrate" => Tool::GolangMigrate,
            "sqlx" => Tool::Sqlx,
            other => {
                return Err(fail(format!(
                    "unknown tool {other:?} (known: flyway, dbmate, golang-migrate, sqlx)"
                )));
            }
        };
        let (schema, table) = match table.map(str::trim) {
            None => ("public".to_string(), tool.default_table().to_string()),
            Some(t) => {
                let (schema, table) = match t.split_once('.') {
                    Some((schema, table)) => (schema, table),
                    None => ("public", t),
                };
                (
                    identifier(schema).map_err(&fail)?,
                    identifier(table).map_err(&fail)?,
                )
            }
        };
        Ok(Self {
            tool,
            schema,
            table,
        })
    }
}

/// An unquoted SQL identifier, folded to lower case as PostgreSQL folds it. Anything
/// else is refused rather than quoted: the name becomes part of a query.
fn identifier(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    if ok {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(format!(
            "{name:?} is not a plain identifier (letters, digits, _ and $, at most 63, not \
             starting with a digit); give schema.table"
        ))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}.{}", self.tool.as_str(), self.schema, self.table)
    }
}

impl Source {
    /// `schema.table`, quoted for SQL.
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    /// What the history relation is, one row or none when it does not exist: its
    /// `relkind`, whether it has a `dirty` column (golang-migrate's, not dbmate's), and
    /// whether any column has a type defined in the database (whose text output would
    /// run the tenant's own code as Flotilla's role).
    pub fn inspect_sql(&self) -> String {
        format!(
            "SELECT c.relkind::text, \
             EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid \
             AND a.attname = 'dirty' AND a.attnum > 0 AND NOT a.attisdropped), \
             EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid \
             AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid >= 16384) \
             FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass({})",
            quote_literal(&self.qualified())
        )
    }

    /// Why the relation [`Source::inspect_sql`] described cannot be read as this tool's
    /// history, if it cannot.
    pub fn refuse_relation(
        &self,
        relkind: &str,
        has_dirty: bool,
        user_types: bool,
    ) -> Option<String> {
        if relkind != "r" && relkind != "p" {
            return Some(format!(
                "is not a table (relkind {relkind:?}): Flotilla reads a history only from a \
                 plain table, never through a view or function"
            ));
        }
        if user_types {
            return Some(
                "has a column of a type defined in the database: not a history table as the \
                 tool creates it"
                    .to_string(),
            );
        }
        match (self.tool, has_dirty) {
            (Tool::Dbmate, true) => Some(
                "has a `dirty` column: it is golang-migrate's table (its one row is the \
                 current version), not dbmate's; use --adopt golang-migrate"
                    .to_string(),
            ),
            (Tool::GolangMigrate, false) => Some(
                "has no `dirty` column: it is not golang-migrate's table (dbmate's has one \
                 row per version); use --adopt dbmate"
                    .to_string(),
            ),
            _ => None,
        }
    }

    /// The one query that reads the history, every column as text, oldest first.
    pub fn read_sql(&self) -> String {
        let t = self.qualified();
        match self.tool {
            Tool::Flyway => format!(
                "SELECT installed_rank::text, version::text, description::text, type::text, \
                 script::text, checksum::text, installed_by::text, installed_on::text, \
                 success::text FROM {t} ORDER BY installed_rank"
            ),
            Tool::Dbmate => format!(
                "SELECT NULL, version::text, NULL, NULL, NULL, NULL, NULL, NULL, 'true' FROM {t}"
            ),
            Tool::GolangMigrate => format!(
                "SELECT NULL, version::text, NULL, NULL, NULL, NULL, NULL, NULL, \
                 (NOT dirty)::text FROM {t}"
            ),
            Tool::Sqlx => format!(
                "SELECT NULL, version::text, description::text, NULL, NULL, \
                 encode(checksum, 'hex'), NULL, installed_on::text, success::text \
                 FROM {t} ORDER BY version"
            ),
        }
    }
}

/// One row of another tool's history, as [`Source::read_sql`] reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryRow {
    /// Flyway's `installed_rank`.
    pub rank: Option<i64>,
    pub version: Option<String>,
    pub description: Option<String>,
    /// Flyway's `type` (`SQL`, `BASELINE`, `DELETE`, `UNDO_SQL`, …).
    pub kind: Option<String>,
    pub script: Option<String>,
    /// Flyway's signed CRC-32 as text, or sqlx's SHA-384 in hex.
    pub checksum: Option<String>,
    pub installed_by: Option<String>,
    pub installed_on: Option<String>,
    /// Flyway's and sqlx's `success`; golang-migrate's `NOT dirty`.
    pub success: bool,
}

/// Parses [`Source::read_sql`]'s result.
pub fn parse_history(messages: &[SimpleQueryMessage]) -> Vec<HistoryRow> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .map(|r| {
            let text = |i: usize| r.get(i).map(str::to_string);
            HistoryRow {
                rank: text(0).and_then(|s| s.parse().ok()),
                version: text(1),
                description: text(2),
                kind: text(3),
                script: text(4),
                checksum: text(5),
                installed_by: text(6),
                installed_on: text(7),
                success: r.get(8) == Some("true"),
            }
        })
        .collect()
}

/// A `baselined` row to record: a script the previous tool (or the operator's
/// `--baseline-version`) says is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Canonical version; `None` for a repeatable.
    pub version: Option<String>,
    /// The bundle's file name, or the history's when the bundle does not have it.
    pub script: String,
    /// `versioned` or `repeatable`.
    pub kind: &'static str,
    /// The bundle's SHA-256 when the bundle has the script (its content was checked
    /// where the tool keeps a checksum); otherwise the tool's own, prefixed with its name.
    pub checksum: String,
    /// Why it is recorded: the tool, table and row, or the baseline version.
    pub source: String,
    /// Who applied it and when, as the history says.
    pub applied_by: Option<String>,
    pub applied_at: Option<String>,
}

/// Why a tenant's history cannot be adopted. Permanent: a person must look.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdoptError {
    #[error(
        "{table} has no such table, and the database has a schema of its own: nothing says \
         which versions ran; adopt from the right table (--adopt {tool}=schema.table) or \
         record them with --baseline-version"
    )]
    NoHistory { tool: &'static str, table: String },
    #[error(
        "{table} records a failed migration, version {version} ({script}){rank}: Flyway \
         refuses to migrate past it too; undo its partial changes by hand, remove the row \
         (`flyway repair`), and start again"
    )]
    FlywayFailed {
        table: String,
        version: String,
        script: String,
        rank: String,
    },
    #[error(
        "{table} records version {version} as failed (success = false): sqlx refuses to \
         migrate past it too; fix the database by hand and delete that row"
    )]
    SqlxFailed { table: String, version: String },
    #[error(
        "{table} says version {version} is dirty: golang-migrate stopped part-way through \
         it; fix the database by hand, then `migrate force` the last good version"
    )]
    Dirty { table: String, version: String },
    #[error(
        "drift: {script} (version {version}) changed since {tool} applied it ({tool} \
         recorded checksum {recorded}, the file now has {file}); restore the file as it \
         was applied, as `{tool} validate` would require"
    )]
    Drift {
        tool: &'static str,
        script: String,
        version: String,
        recorded: String,
        file: String,
    },
    #[error(
        "{table}: version {version} was applied as {recorded}, the bundle has {script}: \
         {what}"
    )]
    Mismatch {
        table: String,
        version: String,
        recorded: String,
        script: String,
        what: &'static str,
    },
    #[error("{table} {reason}")]
    NotAHistory { table: String, reason: String },
    #[error("{table}: version {version:?} is not a version Flotilla can read ({reason})")]
    BadVersion {
        table: String,
        version: String,
        reason: String,
    },
}

/// The rows to record for `--baseline-version upto`: every versioned script up to it.
pub fn baseline_rows(bundle: &Bundle, upto: &Version) -> Vec<Recorded> {
    bundle
        .scripts()
        .iter()
        .filter(|s| s.version().is_some_and(|v| v <= upto))
        .map(|s| recorded_from_bundle(s, format!("baseline-version {upto}"), None, None))
        .collect()
}

fn recorded_from_bundle(
    script: &bundle::Script,
    source: String,
    applied_by: Option<String>,
    applied_at: Option<String>,
) -> Recorded {
    Recorded {
        version: script.version().map(|v| v.to_string()),
        script: script.name.clone(),
        kind: script.kind.as_str(),
        checksum: script.checksum.clone(),
        source,
        applied_by,
        applied_at,
    }
}

/// What the previous tool's `history` means for `bundle`: the rows to record, or why
/// the tenant must be refused. Rows are in the history's order.
pub fn decide(
    bundle: &Bundle,
    source: &Source,
    history: &[HistoryRow],
) -> Result<Vec<Recorded>, AdoptError> {
    let table = format!("{}.{}", source.schema, source.table);
    let parse = |raw: &str| -> Result<Version, AdoptError> {
        raw.trim()
            .parse()
            .map_err(|e: bundle::version::VersionError| AdoptError::BadVersion {
                table: table.clone(),
                version: raw.to_string(),
                reason: e.to_string(),
            })
    };
    let by_version: BTreeMap<Version, &bundle::Script> = bundle
        .scripts()
        .iter()
        .filter_map(|s| s.version().map(|v| (v.clone(), &**s)))
        .collect();
    match source.tool {
        Tool::Flyway => decide_flyway(bundle, source, &table, history, &by_version, &parse),
        Tool::GolangMigrate => {
            // One row: the current version; every earlier one is applied (linear).
            let Some(row) = history.iter().find(|r| r.version.is_some()) else {
                return Ok(Vec::new());
            };
            let raw = row.version.clone().unwrap_or_default();
            if !row.success {
                return Err(AdoptError::Dirty {
                    table,
                    version: raw,
                });
            }
            let current = parse(&raw)?;
            let src = format!("{source} version {current}");
            Ok(by_version
                .range(..=current)
                .map(|(_, s)| recorded_from_bundle(s, src.clone(), None, None))
                .collect())
        }
        Tool::Dbmate | Tool::Sqlx => {
            let mut out = Vec::new();
            let mut rows: Vec<(Version, &HistoryRow)> = Vec::new();
            for row in history {
                let Some(raw) = &row.version else { continue };
                if !row.success {
                    return Err(AdoptError::SqlxFailed {
                        table,
                        version: raw.clone(),
                    });
                }
                rows.push((parse(raw)?, row));
            }
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            // `1` and `01` are one version to Flotilla: record it once.
            rows.dedup_by(|a, b| a.0 == b.0);
            for (version, row) in rows {
                let src = format!("{source} version {version}");
                match by_version.get(&version) {
                    Some(script) => {
                        if source.tool == Tool::Sqlx
                            && let Some(recorded) = &row.checksum
                        {
                            // sqlx hashes the file as written.
                            let file = bundle::sqlx_checksum(&script.text);
                            if !recorded.eq_ignore_ascii_case(&file) {
                                return Err(AdoptError::Drift {
                                    tool: source.tool.as_str(),
                                    script: script.name.clone(),
                                    version: version.to_string(),
                                    recorded: recorded.clone(),
                                    file,
                                });
                            }
                        }
                        out.push(recorded_from_bundle(
                            script,
                            src,
                            None,
                            row.installed_on.clone(),
                        ));
                    }
                    None => out.push(Recorded {
                        version: Some(version.to_string()),
                        script: format!("{} version {version}", source.tool.as_str()),
                        kind: "versioned",
                        checksum: format!(
                            "{}:{}",
                            source.tool.as_str(),
                            row.checksum.as_deref().unwrap_or("none")
                        ),
                        source: src,
                        applied_by: None,
                        applied_at: row.installed_on.clone(),
                    }),
                }
            }
            Ok(out)
        }
    }
}

/// Flyway's history, as `flyway migrate` reads it: rows in `installed_rank` order; a
/// `BASELINE`/`*_BASELINE` row covers every version up to its own; `DELETE` and
/// `UNDO_*` rows take a version back; `SCHEMA` rows are Flyway's own bookkeeping; a
/// repeatable is matched by description and counts only with the checksum of the file.
fn decide_flyway(
    bundle: &Bundle,
    source: &Source,
    table: &str,
    history: &[HistoryRow],
    by_version: &BTreeMap<Version, &bundle::Script>,
    parse: &dyn Fn(&str) -> Result<Version, AdoptError>,
) -> Result<Vec<Recorded>, AdoptError> {
    let mut applied: BTreeMap<Version, &HistoryRow> = BTreeMap::new();
    let mut baseline: Option<(Version, &HistoryRow)> = None;
    let mut repeatable: BTreeMap<String, &HistoryRow> = BTreeMap::new();
    for row in history {
        let kind = row.kind.as_deref().unwrap_or("SQL").to_ascii_uppercase();
        if kind == "SCHEMA" {
            continue;
        }
        let Some(raw) = row.version.as_deref().filter(|v| !v.trim().is_empty()) else {
            // A repeatable: the latest successful run of each description counts; a
            // `DELETE` row (repair of a missing repeatable) takes it back.
            if let Some(d) = &row.description {
                if kind == "DELETE" || kind.starts_with("UNDO_") {
                    repeatable.remove(d);
                } else if row.success {
                    repeatable.insert(d.clone(), row);
                }
            }
            continue;
        };
        if !row.success {
            return Err(AdoptError::FlywayFailed {
                table: table.to_string(),
                version: raw.to_string(),
                script: row.script.clone().unwrap_or_default(),
                rank: row
                    .rank
                    .map(|r| format!(", installed_rank {r}"))
                    .unwrap_or_default(),
            });
        }
        let version = parse(raw)?;
        if kind == "DELETE" || kind.starts_with("UNDO_") {
            applied.remove(&version);
        } else if kind == "BASELINE" || kind.ends_with("_BASELINE") {
            baseline = Some((version, row));
        } else {
            applied.insert(version, row);
        }
    }
    let mut out = Vec::new();
    if let Some((upto, row)) = &baseline {
        let src = format!(
            "{source} baseline {upto}{}",
            row.rank
                .map(|r| format!(" (installed_rank {r})"))
                .unwrap_or_default()
        );
        for (_, script) in by_version
            .range(..=upto.clone())
            .filter(|(v, _)| !applied.contains_key(*v))
        {
            out.push(recorded_from_bundle(
                script,
                src.clone(),
                row.installed_by.clone(),
                row.installed_on.clone(),
            ));
        }
    }
    for (version, row) in &applied {
        let rank = row
            .rank
            .map(|r| format!(" installed_rank {r}"))
            .unwrap_or_default();
        let recorded_checksum = row.checksum.clone().unwrap_or_else(|| "null".to_string());
        let src = format!("{source}{rank} checksum {recorded_checksum}");
        let Some(script) = by_version.get(version) else {
            out.push(Recorded {
                version: Some(version.to_string()),
                script: row
                    .script
                    .clone()
                    .unwrap_or_else(|| format!("flyway version {version}")),
                kind: "versioned",
                checksum: format!("flyway:{recorded_checksum}"),
                source: src,
                applied_by: row.installed_by.clone(),
                applied_at: row.installed_on.clone(),
            });
            continue;
        };
        let kind = row.kind.as_deref().unwrap_or("SQL");
        if !kind.eq_ignore_ascii_case("SQL") {
            return Err(AdoptError::Mismatch {
                table: table.to_string(),
                version: version.to_string(),
                recorded: format!("a {kind} migration"),
                script: script.name.clone(),
                what: "Flotilla runs SQL files only; keep the version out of the bundle or \
                       record it with --baseline-version",
            });
        }
        // Flyway checksums a versioned script as written (placeholders not replaced).
        let file = bundle::flyway_checksum(&script.text).to_string();
        if row.checksum.as_deref() != Some(file.as_str()) {
            return Err(AdoptError::Drift {
                tool: "flyway",
                script: script.name.clone(),
                version: version.to_string(),
                recorded: recorded_checksum,
                file,
            });
        }
        if let Some(d) = &row.description
            && *d != script.description
        {
            return Err(AdoptError::Mismatch {
                table: table.to_string(),
                version: version.to_string(),
                recorded: format!("{d:?}"),
                script: script.name.clone(),
                what: "the descriptions differ (as `flyway validate` reports); rename the \
                       file back",
            });
        }
        out.push(recorded_from_bundle(
            script,
            src,
            row.installed_by.clone(),
            row.installed_on.clone(),
        ));
    }
    // A repeatable counts as run only when Flyway ran the file as it is now; otherwise
    // it runs again, as Flyway would run it. Flyway checksums a repeatable after its
    // placeholders are replaced (when replacement is on), so its text as it runs.
    for script in bundle
        .scripts()
        .iter()
        .filter(|s| s.kind == ScriptKind::Repeatable)
    {
        let Some(row) = repeatable.get(&script.description) else {
            continue;
        };
        let file = bundle::flyway_checksum(&script.sql).to_string();
        if row.checksum.as_deref() == Some(file.as_str()) {
            let rank = row
                .rank
                .map(|r| format!(" installed_rank {r}"))
                .unwrap_or_default();
            out.push(recorded_from_bundle(
                script,
                format!("{source}{rank} checksum {file}"),
                row.installed_by.clone(),
                row.installed_on.clone(),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
