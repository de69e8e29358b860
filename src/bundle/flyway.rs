//! Flyway's folder conventions, so a folder written for Flyway loads unchanged: the
//! folder's `flyway.conf` / `flyway.toml` (naming prefixes and suffixes, placeholders,
//! history table and schema, encoding, `mixed`, `executeInTransaction`), per-script
//! `V1__x.sql.conf` files, encodings, and `${…}` placeholders with Flyway's built-ins.
//!
//! This module only reads text and answers questions about it; it never decides what a
//! bundle is (that is `bundle`'s) and never touches a database. A setting that would
//! change what runs is honoured; one that Flotilla replaces by a wave flag, or that only
//! concerns connections, is reported as a warning naming what to use instead: nothing
//! in a config file is ignored silently.

use std::collections::BTreeMap;

/// The folder-wide config file names Flotilla reads, as Flyway names them.
pub const CONF: &str = "flyway.conf";
pub const TOML: &str = "flyway.toml";
/// The suffix of a per-script config file (`V1__x.sql` + `.conf`).
pub const SCRIPT_CONF_SUFFIX: &str = ".conf";

/// How script files are named: Flyway's prefixes, separator and suffixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    pub versioned: String,
    pub repeatable: String,
    pub baseline: String,
    pub undo: String,
    pub separator: String,
    pub suffixes: Vec<String>,
}

impl Default for Naming {
    fn default() -> Self {
        Self {
            versioned: "V".into(),
            repeatable: "R".into(),
            baseline: "B".into(),
            undo: "U".into(),
            separator: "__".into(),
            suffixes: vec![".sql".into()],
        }
    }
}

impl Naming {
    /// The suffix `name` ends with, if it is a script name at all.
    pub fn suffix_of(&self, name: &str) -> Option<&str> {
        self.suffixes
            .iter()
            .map(String::as_str)
            .find(|s| name.len() > s.len() && name.ends_with(s))
    }
}

/// A text encoding a script may be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Utf8,
    Ascii,
    Latin1,
}

impl Encoding {
    /// Parses Flyway's `encoding` value (Java charset names).
    pub fn parse(name: &str) -> Result<Self, String> {
        match name.trim().to_ascii_uppercase().replace('_', "-").as_str() {
            "UTF-8" | "UTF8" => Ok(Encoding::Utf8),
            "US-ASCII" | "ASCII" => Ok(Encoding::Ascii),
            "ISO-8859-1" | "ISO8859-1" | "LATIN1" | "LATIN-1" => Ok(Encoding::Latin1),
            other => Err(format!(
                "encoding {other:?} is not supported (UTF-8, US-ASCII, ISO-8859-1): convert the \
                 file to UTF-8"
            )),
        }
    }

    /// The charset name, as Java (and Flyway) spell it.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Utf8 => "UTF-8",
            Encoding::Ascii => "US-ASCII",
            Encoding::Latin1 => "ISO-8859-1",
        }
    }

    /// The text of `bytes`, or the byte offset where they stop being valid.
    pub fn decode(self, bytes: &[u8]) -> Result<String, usize> {
        match self {
            Encoding::Utf8 => std::str::from_utf8(bytes)
                .map(str::to_string)
                .map_err(|e| e.valid_up_to()),
            Encoding::Ascii => match bytes.iter().position(|b| !b.is_ascii()) {
                Some(at) => Err(at),
                None => Ok(bytes.iter().map(|&b| char::from(b)).collect()),
            },
            Encoding::Latin1 => Ok(bytes.iter().map(|&b| char::from(b)).collect()),
        }
    }
}

/// The folder's `flyway.conf` or `flyway.toml`, as far as it changes what runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderConfig {
    pub naming: Naming,
    /// `placeholders.*`: defaults a wave's `--placeholder` overrides.
    pub placeholders: BTreeMap<String, String>,
    pub replacement: bool,
    pub prefix: String,
    pub suffix: String,
    /// `table`: Flyway's history table (for `--adopt flyway` and `${flyway:table}`).
    pub table: Option<String>,
    /// `defaultSchema`, else the first of `schemas`.
    pub default_schema: Option<String>,
    pub encoding: Encoding,
    /// `mixed`: a script mixing statements that refuse a transaction with others runs
    /// outside a transaction instead of being refused.
    pub mixed: bool,
    /// `executeInTransaction=false`: every script runs outside a transaction.
    pub execute_in_transaction: bool,
    /// What the file says that Flotilla does not do as Flyway would, and what to use.
    pub warnings: Vec<String>,
}

impl Default for FolderConfig {
    fn default() -> Self {
        Self {
            naming: Naming::default(),
            placeholders: BTreeMap::new(),
            replacement: true,
            prefix: "${".into(),
            suffix: "}".into(),
            table: None,
            default_schema: None,
            encoding: Encoding::Utf8,
            mixed: false,
            execute_in_transaction: true,
            warnings: Vec::new(),
        }
    }
}

/// A problem in a config file: the line when known, and what is wrong.
pub type ConfError = (Option<u32>, String);

fn boolean(key: &str, value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("{key} must be true or false, not {other:?}")),
    }
}

fn non_empty(key: &str, value: &str) -> Result<String, String> {
    let v = value.trim();
    if v.is_empty() {
        Err(format!("{key} cannot be empty"))
    } else {
        Ok(v.to_string())
    }
}

impl FolderConfig {
    /// Applies one `key` (without the `flyway.` prefix) to the config.
    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        if let Some(name) = key.strip_prefix("placeholders.") {
            check_wave_placeholder(name, value)?;
            if value.contains("${") {
                // Flyway expands environment variables in its config; Flotilla reads
                // no environment for SQL: the value must come with the wave.
                self.warnings.push(format!(
                    "placeholders.{name} = {value:?} refers to the environment, which \
                     Flotilla does not read: give it with `--placeholder {name}=VALUE`"
                ));
                return Ok(());
            }
            self.placeholders
                .insert(name.to_string(), value.to_string());
            return Ok(());
        }
        let list = || -> Vec<String> {
            value
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        match key {
            "placeholderReplacement" => self.replacement = boolean(key, value)?,
            "placeholderPrefix" => {
                self.prefix = non_empty(key, value)?;
                check_delimiter(key, &self.prefix)?;
            }
            "placeholderSuffix" => {
                self.suffix = non_empty(key, value)?;
                check_delimiter(key, &self.suffix)?;
            }
            "table" => self.table = Some(non_empty(key, value)?),
            "defaultSchema" => self.default_schema = Some(non_empty(key, value)?),
            "schemas" => {
                if self.default_schema.is_none() {
                    self.default_schema = list().into_iter().next();
                }
            }
            "encoding" => self.encoding = Encoding::parse(value)?,
            "mixed" => self.mixed = boolean(key, value)?,
            "executeInTransaction" => self.execute_in_transaction = boolean(key, value)?,
            "sqlMigrationPrefix" => self.naming.versioned = non_empty(key, value)?,
            "repeatableSqlMigrationPrefix" => self.naming.repeatable = non_empty(key, value)?,
            "baselineMigrationPrefix" => self.naming.baseline = non_empty(key, value)?,
            "undoSqlMigrationPrefix" => self.naming.undo = non_empty(key, value)?,
            "sqlMigrationSeparator" => self.naming.separator = non_empty(key, value)?,
            "sqlMigrationSuffixes" => {
                let suffixes = list();
                if suffixes.is_empty() {
                    return Err("sqlMigrationSuffixes cannot be empty".into());
                }
                self.naming.suffixes = suffixes;
            }
            other => self.warnings.push(unused_key_warning(other)),
        }
        Ok(())
    }

    /// Checks what only makes sense once every key is read.
    fn finish(self) -> Result<Self, String> {
        let n = &self.naming;
        let prefixes = [&n.versioned, &n.repeatable, &n.baseline, &n.undo];
        for (i, a) in prefixes.iter().enumerate() {
            for b in &prefixes[i + 1..] {
                if a == b {
                    return Err(format!(
                        "two kinds of migration share the prefix {a:?}: each needs its own"
                    ));
                }
            }
        }
        if self.prefix == self.suffix {
            return Err("placeholderPrefix and placeholderSuffix must differ".into());
        }
        Ok(self)
    }
}

/// What to tell about a Flyway setting that Flotilla does not honour from the file.
fn unused_key_warning(key: &str) -> String {
    let instead = match key {
        "outOfOrder" => "use `--allow-out-of-order` on the wave",
        "baselineVersion" => "use `--baseline-version` on the wave",
        "baselineOnMigrate" | "baselineDescription" => {
            "use `--adopt flyway` or `--baseline-version` on the wave"
        }
        "validateOnMigrate" | "ignoreMigrationPatterns" | "validateMigrationNaming" => {
            "Flotilla always validates: drift fails a tenant unless `--allow-drift`"
        }
        "group" => "use `--transaction per-tenant` on the wave",
        "target" | "cherryPick" => "Flotilla applies the whole bundle: leave later scripts out",
        "url"
        | "user"
        | "password"
        | "driver"
        | "jdbcProperties"
        | "connectRetries"
        | "connectRetriesInterval"
        | "initSql"
        | "environment" => "connections come from the wave's targets",
        "locations" => "the bundle is this folder",
        "cleanDisabled" | "cleanOnValidationError" => "Flotilla never cleans a database",
        "installedBy" => "the log records the session's user",
        _ => "not used by Flotilla",
    };
    format!("{key} is ignored: {instead}")
}

fn check_placeholder_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains(['{', '}', '\n', '\r']) {
        return Err(format!("placeholder name {name:?} is not usable"));
    }
    if name.starts_with("flyway:") {
        return Err(format!(
            "placeholder {name:?}: names starting with flyway: are Flyway's built-ins"
        ));
    }
    Ok(())
}

/// Checks a placeholder a wave gives (`--placeholder name=value`).
pub fn check_wave_placeholder(name: &str, value: &str) -> Result<(), String> {
    check_placeholder_name(name)?;
    if value.len() > 64 * 1024 {
        return Err(format!("placeholder {name:?}: the value is over 64 KiB"));
    }
    Ok(())
}

/// Parses `flyway.conf` (Java properties, keys `flyway.*`).
pub fn parse_conf(text: &str) -> Result<FolderConfig, ConfError> {
    let mut cfg = FolderConfig::default();
    for (line, key, value) in properties(text) {
        let Some(key) = key.strip_prefix("flyway.") else {
            cfg.warnings.push(format!(
                "line {line}: {key} is not a Flyway setting (flyway.*): ignored"
            ));
            continue;
        };
        cfg.set(key, &value).map_err(|e| (Some(line), e))?;
    }
    cfg.finish().map_err(|e| (None, e))
}

/// Parses `flyway.toml` (Flyway 10: a `[flyway]` table, `[flyway.placeholders]`).
pub fn parse_toml(text: &str) -> Result<FolderConfig, ConfError> {
    let doc: toml::Table = toml::from_str(text).map_err(|e| (None, e.to_string()))?;
    let mut cfg = FolderConfig::default();
    for (section, value) in &doc {
        if section != "flyway" {
            cfg.warnings.push(match section.as_str() {
                "environments" => {
                    "[environments] is ignored: connections come from the wave's targets"
                        .to_string()
                }
                other => format!("[{other}] is not used by Flotilla: ignored"),
            });
            continue;
        }
        let Some(table) = value.as_table() else {
            return Err((None, "flyway must be a table ([flyway])".into()));
        };
        for (key, value) in table {
            if key == "placeholders" {
                let Some(placeholders) = value.as_table() else {
                    return Err((None, "flyway.placeholders must be a table".into()));
                };
                for (name, v) in placeholders {
                    cfg.set(&format!("placeholders.{name}"), &toml_text(v))
                        .map_err(|e| (None, e))?;
                }
                continue;
            }
            if value.is_table() {
                cfg.warnings
                    .push(format!("[flyway.{key}] is not used by Flotilla: ignored"));
                continue;
            }
            cfg.set(key, &toml_text(value)).map_err(|e| (None, e))?;
        }
    }
    cfg.finish().map_err(|e| (None, e))
}

/// A TOML value as the text a `.conf` file would hold (lists joined by commas).
fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) => items.iter().map(toml_text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// `V1__x.sql.conf`: what one script may say about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScriptConfig {
    pub execute_in_transaction: Option<bool>,
    pub encoding: Option<Encoding>,
    pub replacement: Option<bool>,
}

/// Parses a per-script config file. Unknown keys are errors: the file is a handful of
/// lines about one script, and a misspelt `executeInTransaction` must not pass.
pub fn parse_script_conf(text: &str) -> Result<ScriptConfig, ConfError> {
    let mut cfg = ScriptConfig::default();
    for (line, key, value) in properties(text) {
        let result = match key.as_str() {
            "executeInTransaction" => boolean(&key, &value).map(|b| {
                cfg.execute_in_transaction = Some(b);
            }),
            "encoding" => Encoding::parse(&value).map(|e| cfg.encoding = Some(e)),
            "placeholderReplacement" => boolean(&key, &value).map(|b| cfg.replacement = Some(b)),
            other => Err(format!(
                "unknown setting {other:?} (known: executeInTransaction, encoding, \
                 placeholderReplacement)"
            )),
        };
        result.map_err(|e| (Some(line), e))?;
    }
    Ok(cfg)
}

/// `flyway.conf` entries as Flyway reads them: `(line, key, value)`, with `#`/`!`
/// comments and `=`, `:` or blanks between key and value. Flyway doubles every
/// backslash before Java's property parser sees the text, so a backslash is literal,
/// except one ending a line whose next line has content and no `=`: that continues the
/// value there.
fn properties(text: &str) -> Vec<(u32, String, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let n = i;
        let first = lines[i].trim_start();
        i += 1;
        if first.is_empty() || first.starts_with('#') || first.starts_with('!') {
            continue;
        }
        let mut logical = first.to_string();
        while logical.ends_with('\\')
            && lines
                .get(i)
                .is_some_and(|next| !next.trim().is_empty() && !next.contains('='))
        {
            logical.pop();
            logical.push_str(lines[i].trim_start());
            i += 1;
        }
        let key_end = logical
            .find(|c: char| c == '=' || c == ':' || c.is_whitespace())
            .unwrap_or(logical.len());
        let key = logical[..key_end].to_string();
        let mut rest = logical[key_end..].trim_start();
        if let Some(r) = rest.strip_prefix(['=', ':']) {
            rest = r.trim_start();
        }
        out.push((
            u32::try_from(n + 1).unwrap_or(u32::MAX),
            key,
            rest.to_string(),
        ));
    }
    out
}

/// Built-in placeholders whose value is the tenant's own (asked of its server when a
/// run starts), and the SQL expression that gives it.
pub const TENANT_BUILTINS: &[(&str, &str)] = &[
    ("flyway:user", "current_user"),
    ("flyway:database", "current_database()"),
    (
        "flyway:timestamp",
        "to_char(now(), 'YYYY-MM-DD HH24:MI:SS')",
    ),
    ("flyway:defaultSchema", "current_schema()"),
];

/// Whether a value from a tenant can stand in for `name` without changing what a
/// statement says: a database, user or schema name of letters, digits, `_` and inner
/// single `-` (no spaces, quotes, dots, `;`, `$` or comment starts: `alice WITH GRANT
/// OPTION` must not become part of a GRANT); the timestamp as the server formats it.
pub fn tenant_value_ok(name: &str, value: &str) -> bool {
    if value.is_empty() || value.len() > 63 {
        return false;
    }
    if name == "flyway:timestamp" {
        return value
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '-' | ' ' | ':'));
    }
    value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !value.contains("--")
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// Checks a custom placeholder prefix or suffix: one made of quote or comment
/// characters could turn a comment into code once replaced.
fn check_delimiter(key: &str, value: &str) -> Result<(), String> {
    if value.contains(['\'', '"', ';', '\n', '\r'])
        || value.contains("--")
        || value.contains("/*")
        || value.contains("*/")
    {
        return Err(format!(
            "{key} {value:?} holds quote, `;` or comment characters: pick another"
        ));
    }
    Ok(())
}

/// Why substitution stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubstituteError {
    /// No value for the placeholder at this byte offset.
    Missing { at: usize, name: String },
    /// The text would grow past the limit.
    TooLarge { limit: usize },
}

/// What a placeholder name resolves to.
pub enum Lookup<'a> {
    Value(&'a str),
    /// Left in place, for the tenant's run to fill in.
    Deferred,
    Missing,
}

/// Replaces `prefix name suffix` in `text`, in one pass (a value is never scanned
/// again), as Flyway does: the name runs to the first suffix on the same line; a prefix
/// with no suffix on its line is plain text. Linear in the text; the result may not grow
/// past `limit` bytes. Returns the text and whether a placeholder was deferred.
pub fn substitute<'v>(
    text: &str,
    prefix: &str,
    suffix: &str,
    limit: usize,
    lookup: impl Fn(&str) -> Lookup<'v>,
) -> Result<(String, bool), SubstituteError> {
    let mut out = String::with_capacity(text.len());
    let mut deferred = false;
    let mut rest = text;
    let mut offset = 0;
    while let Some(at) = rest.find(prefix) {
        let after = &rest[at + prefix.len()..];
        let line_end = after.find(['\n', '\r']).unwrap_or(after.len());
        let Some(len) = after[..line_end].find(suffix).filter(|&l| l > 0) else {
            // No placeholder ends on this line: nothing more on it is one.
            let skip = at + prefix.len() + line_end;
            out.push_str(&rest[..skip]);
            offset += skip;
            rest = &rest[skip..];
            continue;
        };
        let name = &after[..len];
        out.push_str(&rest[..at]);
        let whole = at + prefix.len() + len + suffix.len();
        match lookup(name) {
            Lookup::Value(v) => out.push_str(v),
            Lookup::Deferred => {
                deferred = true;
                out.push_str(&rest[at..whole]);
            }
            Lookup::Missing => {
                return Err(SubstituteError::Missing {
                    at: offset + at,
                    name: name.to_string(),
                });
            }
        }
        if out.len() > limit {
            return Err(SubstituteError::TooLarge { limit });
        }
        offset += whole;
        rest = &rest[whole..];
    }
    out.push_str(rest);
    if out.len() > limit {
        return Err(SubstituteError::TooLarge { limit });
    }
    Ok((out, deferred))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_files_read_as_java_properties() {
        let cfg = parse_conf(
            "# comment\n! also a comment\nflyway.placeholders.owner = app_owner\n\
             flyway.placeholders.motd=C:\\temp\\x, world \\\n   again\n\
             flyway.table: history\nflyway.schemas=app,audit\n\
             flyway.sqlMigrationSuffixes=.sql,.pgsql\nflyway.url=jdbc:postgresql://x/y\n\
             flyway.outOfOrder=true\nflyway.mixed=true\nother.key=1\n",
        )
        .expect("valid");
        assert_eq!(cfg.placeholders["owner"], "app_owner");
        // Backslashes are literal, as Flyway reads them; a trailing one continues.
        assert_eq!(cfg.placeholders["motd"], "C:\\temp\\x, world again");
        assert_eq!(cfg.table.as_deref(), Some("history"));
        assert_eq!(cfg.default_schema.as_deref(), Some("app"));
        assert_eq!(cfg.naming.suffixes, [".sql", ".pgsql"]);
        assert!(cfg.mixed);
        let w = cfg.warnings.join("\n");
        assert!(w.contains("url is ignored: connections come from"), "{w}");
        assert!(
            w.contains("outOfOrder is ignored: use `--allow-out-of-order`"),
            "{w}"
        );
        assert!(w.contains("other.key is not a Flyway setting"), "{w}");
    }

    #[test]
    fn toml_files_read_as_flyway_10_writes_them() {
        let cfg = parse_toml(
            "[environments.default]\nurl = \"jdbc:postgresql://db/app\"\n\n[flyway]\n\
             defaultSchema = \"app\"\nlocations = [\"filesystem:sql\"]\n\
             placeholderReplacement = true\n\n[flyway.placeholders]\nowner = \"app_owner\"\n",
        )
        .expect("valid");
        assert_eq!(cfg.default_schema.as_deref(), Some("app"));
        assert_eq!(cfg.placeholders["owner"], "app_owner");
        let w = cfg.warnings.join("\n");
        assert!(w.contains("[environments] is ignored"), "{w}");
        assert!(
            w.contains("locations is ignored: the bundle is this folder"),
            "{w}"
        );
    }

    #[test]
    fn bad_config_values_are_named() {
        let (line, e) = parse_conf("flyway.mixed=yes\n").expect_err("bad bool");
        assert_eq!(line, Some(1));
        assert!(e.contains("mixed must be true or false"), "{e}");
        let (_, e) = parse_conf("flyway.sqlMigrationPrefix=R\n").expect_err("clash");
        assert!(e.contains("share the prefix"), "{e}");
        let (_, e) = parse_conf("flyway.encoding=EBCDIC\n").expect_err("encoding");
        assert!(e.contains("not supported"), "{e}");
        let (_, e) =
            parse_toml("[flyway.placeholders]\n\"flyway:user\" = \"x\"\n").expect_err("builtin");
        assert!(e.contains("built-ins"), "{e}");
        assert!(parse_toml("[flyway\n").is_err());
        let (line, e) = parse_script_conf("executeInTransaction=false\nexecuteInTransacton=true\n")
            .expect_err("typo");
        assert_eq!(line, Some(2));
        assert!(e.contains("executeInTransacton"), "{e}");
    }

    #[test]
    fn substitution_is_one_pass_and_line_bound() {
        let lookup = |n: &str| match n {
            "a" => Lookup::Value("${b}"),
            "b" => Lookup::Value("B"),
            "flyway:user" => Lookup::Deferred,
            _ => Lookup::Missing,
        };
        let (out, deferred) = substitute(
            "x ${a} ${b} ${flyway:user} $ {a} ${\n}",
            "${",
            "}",
            1000,
            lookup,
        )
        .expect("ok");
        assert_eq!(out, "x ${b} B ${flyway:user} $ {a} ${\n}");
        assert!(deferred);
        let missing =
            substitute("ok;\nselect '${nope}';", "${", "}", 1000, lookup).expect_err("missing");
        assert_eq!(
            missing,
            SubstituteError::Missing {
                at: 12,
                name: "nope".into()
            }
        );
        // Growth is bounded, and a line of prefixes without a suffix is one step.
        let big = "${b}".repeat(100);
        assert_eq!(
            substitute(&big, "${", "}", 50, |_| Lookup::Value("0123456789")),
            Err(SubstituteError::TooLarge { limit: 50 })
        );
        let prefixes = "${".repeat(200_000);
        let (same, _) = substitute(&prefixes, "${", "}", usize::MAX, lookup).expect("plain text");
        assert_eq!(same, prefixes);
    }

    #[test]
    fn encodings_decode_or_say_where_they_stop() {
        assert_eq!(
            Encoding::Latin1
                .decode(&[0x63, 0x61, 0x66, 0xe9])
                .expect("latin1"),
            "café"
        );
        assert_eq!(Encoding::Ascii.decode(b"ab\xe9"), Err(2));
        assert_eq!(Encoding::Utf8.decode(b"ab\xe9"), Err(2));
    }

    #[test]
    fn tenant_values_that_could_change_what_a_statement_says_are_refused() {
        for ok in ["tenant_0001", "tenant-42", "App2"] {
            assert!(tenant_value_ok("flyway:database", ok), "{ok}");
        }
        assert!(tenant_value_ok("flyway:timestamp", "2024-01-01 12:00:00"));
        for bad in [
            "",
            "a'b",
            "a;b",
            "a--b",
            "-a",
            "a-",
            "$x$",
            "a\nb",
            "a\"b",
            "a/*b",
            "app.v2",
            "alice WITH GRANT OPTION",
            "x AUTHORIZATION postgres",
        ] {
            assert!(!tenant_value_ok("flyway:user", bad), "{bad}");
        }
        assert!(!tenant_value_ok("flyway:timestamp", "now'"));
    }
}
