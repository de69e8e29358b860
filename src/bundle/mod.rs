//! Bundles: a directory of Flyway-named SQL scripts, loaded, validated and identified.
//!
//! This module owns everything PRODUCT.md §2 says about a bundle: file naming
//! (`V<version>__<description>.sql`, `R__<description>.sql`), version order, directives
//! (`-- flotilla:…` header lines), SHA-256 checksums, the bundle id, and the rule that a
//! statement PostgreSQL refuses inside a transaction block needs `no-transaction`. A
//! [`Bundle`] is immutable once built and is only ever built valid: every problem found
//! is reported at once, with file and line. It never touches a database; the same
//! validation runs on a directory ([`Bundle::load_dir`]) and on uploaded bytes
//! ([`Bundle::from_files`]), so the daemon and the CLI cannot disagree.

pub mod flyway;
pub mod rules;
pub mod safety;
pub mod sql;
pub mod version;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use sql::{LineIndex, Statement};
pub use version::Version;

/// The largest script a bundle accepts.
pub const MAX_SCRIPT_BYTES: u64 = 16 * 1024 * 1024;

/// How many placeholder values a wave may give, and their size in all.
pub const MAX_PLACEHOLDERS: usize = 1_000;
pub const MAX_PLACEHOLDER_BYTES: usize = 1024 * 1024;

/// Whether a script is applied once, or again whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScriptKind {
    /// `B<version>__…` (Flyway's baseline migration): on a tenant whose log is empty,
    /// runs instead of every versioned script up to its version, which are recorded as
    /// `baselined` with it. Ignored on a tenant with a history.
    Baseline(Version),
    /// `V<version>__…`: applied once, in version order.
    Versioned(Version),
    /// `R__…`: applied after every versioned script, and again when its checksum changes.
    Repeatable,
    /// `beforeMigrate.sql`, `afterMigrate__check.sql`, …: Flyway's callbacks, run on each
    /// tenant at that point of its run; never recorded in the log, never planned.
    Callback(Callback),
    /// `U<version>__…` (Flyway's undo migration): reverts that version; run only by a
    /// wave started with `--undo-to` (or `--rehearse-undo`), which marks the version's
    /// log row `undone` in the same transaction.
    Undo(Version),
}

/// When a callback runs (Flyway's event names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Callback {
    /// Once per tenant run, after the lock and before any script (also when nothing is
    /// pending), in a transaction of its own.
    BeforeMigrate,
    /// Before each script, in the script's transaction.
    BeforeEachMigrate,
    /// After each script, in the script's transaction (before its log row).
    AfterEachMigrate,
    /// Once per tenant run, after every script succeeded (also when nothing was
    /// pending), in a transaction of its own: where checks go.
    AfterMigrate,
    /// Once per tenant run that failed (a script, or a callback), after the rollback.
    AfterMigrateError,
}

impl Callback {
    /// Every event, longest name first (so `afterMigrateError` is not read as
    /// `afterMigrate`).
    pub const ALL: [Callback; 5] = [
        Callback::AfterMigrateError,
        Callback::BeforeEachMigrate,
        Callback::AfterEachMigrate,
        Callback::BeforeMigrate,
        Callback::AfterMigrate,
    ];

    /// Flyway's name of the event.
    pub fn as_str(self) -> &'static str {
        match self {
            Callback::BeforeMigrate => "beforeMigrate",
            Callback::BeforeEachMigrate => "beforeEachMigrate",
            Callback::AfterEachMigrate => "afterEachMigrate",
            Callback::AfterMigrate => "afterMigrate",
            Callback::AfterMigrateError => "afterMigrateError",
        }
    }
}

/// Flyway callback events Flotilla does not run: a file named for one is refused, not
/// silently left out (a check that never runs is worse than none).
const OTHER_FLYWAY_EVENTS: &[&str] = &[
    "beforeEachMigrateStatement",
    "afterEachMigrateStatement",
    "afterEachMigrateStatementError",
    "afterEachMigrateError",
    "afterMigrateApplied",
    "afterVersioned",
    "beforeRepeatables",
    "afterMigrateOperationFinish",
    "beforeClean",
    "afterClean",
    "afterCleanError",
    "beforeInfo",
    "afterInfo",
    "afterInfoError",
    "beforeValidate",
    "afterValidate",
    "afterValidateError",
    "beforeBaseline",
    "afterBaseline",
    "afterBaselineError",
    "beforeRepair",
    "afterRepair",
    "afterRepairError",
    "beforeUndo",
    "beforeEachUndo",
    "afterEachUndo",
    "afterEachUndoError",
    "afterUndo",
    "afterUndoError",
    "beforeConnect",
    "afterConnect",
    "createSchemas",
];

impl ScriptKind {
    /// `versioned` or `repeatable`, as the execution log's `kind` column stores it.
    pub fn as_str(&self) -> &'static str {
        match self {
            ScriptKind::Baseline(_) => "baseline",
            ScriptKind::Versioned(_) => "versioned",
            ScriptKind::Repeatable => "repeatable",
            ScriptKind::Callback(_) => "callback",
            ScriptKind::Undo(_) => "undo",
        }
    }

    /// The version an undo script reverts.
    pub fn undo_version(&self) -> Option<&Version> {
        match self {
            ScriptKind::Undo(v) => Some(v),
            _ => None,
        }
    }

    /// The version, for a versioned script.
    pub fn version(&self) -> Option<&Version> {
        match self {
            ScriptKind::Versioned(v) => Some(v),
            ScriptKind::Baseline(_)
            | ScriptKind::Repeatable
            | ScriptKind::Callback(_)
            | ScriptKind::Undo(_) => None,
        }
    }

    /// The event, for a callback.
    pub fn callback(&self) -> Option<Callback> {
        match self {
            ScriptKind::Callback(c) => Some(*c),
            _ => None,
        }
    }

    /// The version a baseline script covers.
    pub fn baseline_version(&self) -> Option<&Version> {
        match self {
            ScriptKind::Baseline(v) => Some(v),
            _ => None,
        }
    }
}

/// How a script relates to transactions, from its directives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionUse {
    /// The script and its log row commit in one transaction (the default).
    Transactional,
    /// `-- flotilla:no-transaction`: statements run one by one, outside a transaction.
    NoTransaction,
}

/// A script's `-- flotilla:` header directives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Directives {
    /// `no-transaction` or not.
    pub transaction: TransactionUse,
    /// `lock-timeout <duration>`: overrides the wave's for this script.
    pub lock_timeout: Option<Duration>,
    /// `statement-timeout <duration>`: overrides the wave's for this script.
    pub statement_timeout: Option<Duration>,
    /// `max-block <duration>`: how long an application query may wait on this script's
    /// session before the watchdog cancels it; overrides the wave's.
    pub max_block: Option<Duration>,
    /// `allow <rule> <reason>` (repeatable): safety-lint rules waived for this script,
    /// with why.
    pub allow: Vec<(String, String)>,
    /// `precondition [on-fail=MODE] <SQL>`: evaluated in the script's transaction
    /// before it; what happens when it is not true.
    pub precondition: Option<Precondition>,
    /// `batch`: the script's one data-changing statement runs again and again, each
    /// run its own short transaction, until it changes no row.
    pub batch: bool,
    /// `batch-pause <duration>`: the rest between two runs of a batch script.
    pub batch_pause: Option<Duration>,
}

/// The dollar-quote tag a batch statement runs in; its text must not hold it.
pub const BATCH_TAG: &str = "$flotilla_batch$";

/// A script's `-- flotilla:precondition`, Liquibase's `preConditions` with `onFail`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Precondition {
    /// One query returning one boolean (NULL and no row are false).
    pub sql: String,
    /// What happens when it is not true.
    pub on_fail: OnFail,
}

/// What a precondition that is not true does (Liquibase's HALT, CONTINUE, MARK_RAN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OnFail {
    /// The tenant fails, naming the precondition; nothing of the script runs.
    Fail,
    /// The script does not run; a `skipped` log row says so, and the next wave asks
    /// again.
    Skip,
    /// The script does not run and is recorded as done (`baselined`, its `source`
    /// naming the precondition): no wave runs it again.
    MarkApplied,
}

impl OnFail {
    /// As written in the directive.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFail::Fail => "fail",
            OnFail::Skip => "skip",
            OnFail::MarkApplied => "mark-applied",
        }
    }
}

/// The dollar-quote tag a precondition runs in; its text must not hold it.
pub const PRECONDITION_TAG: &str = "$flotilla_precondition$";
/// The longest rest between two runs of a batch script.
const MAX_BATCH_PAUSE: Duration = Duration::from_secs(3600);
/// The longest precondition accepted.
const MAX_PRECONDITION_BYTES: usize = 4096;

impl Default for Directives {
    fn default() -> Self {
        Self {
            transaction: TransactionUse::Transactional,
            lock_timeout: None,
            statement_timeout: None,
            max_block: None,
            allow: Vec::new(),
            precondition: None,
            batch: false,
            batch_pause: None,
        }
    }
}

/// The canonical text that enters the bundle id, e.g. `no-transaction,lock-timeout=10000ms`.
impl fmt::Display for Directives {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.transaction == TransactionUse::NoTransaction {
            parts.push("no-transaction".to_string());
        }
        if let Some(d) = self.lock_timeout {
            parts.push(format!("lock-timeout={}ms", d.as_millis()));
        }
        if let Some(d) = self.statement_timeout {
            parts.push(format!("statement-timeout={}ms", d.as_millis()));
        }
        if let Some(d) = self.max_block {
            parts.push(format!("max-block={}ms", d.as_millis()));
        }
        let mut allowed: Vec<&str> = self.allow.iter().map(|(r, _)| r.as_str()).collect();
        allowed.sort_unstable();
        for rule in allowed {
            parts.push(format!("allow={rule}"));
        }
        if let Some(p) = &self.precondition {
            // The query itself is in the script's text, which the checksum covers.
            parts.push(format!("precondition={}", p.on_fail.as_str()));
        }
        if self.batch {
            parts.push("batch".to_string());
        }
        if let Some(d) = self.batch_pause {
            parts.push(format!("batch-pause={}ms", d.as_millis()));
        }
        f.write_str(&parts.join(","))
    }
}

/// One script of a bundle.
#[derive(Debug, Clone)]
pub struct Script {
    /// The file name, e.g. `V2__add_email.sql`: what the execution log's `script` holds.
    pub name: String,
    /// Versioned or repeatable.
    pub kind: ScriptKind,
    /// The description part of the name, underscores shown as spaces.
    pub description: String,
    /// SHA-256 of the script's bytes as written, lowercase hex.
    pub checksum: String,
    /// Header directives.
    pub directives: Directives,
    /// The text as written (decoded; placeholders not replaced): what Flyway's and
    /// sqlx's checksums are taken over.
    pub text: String,
    /// The text that runs: placeholders replaced, but for the tenant's own
    /// (`${flyway:database}`, …), filled in when a tenant's run starts.
    pub sql: String,
    /// `sql` still holds placeholders whose value is the tenant's own.
    pub tenant_placeholders: bool,
    /// The script split into pieces; blank pieces (only comments) included.
    pub statements: Vec<Statement>,
}

impl Script {
    /// Pieces that hold SQL, in order.
    pub fn executable_statements(&self) -> impl Iterator<Item = &Statement> {
        self.statements.iter().filter(|s| !s.is_blank())
    }

    /// The version as the log stores it, `None` for a repeatable.
    pub fn version(&self) -> Option<&Version> {
        self.kind.version()
    }
}

/// A validated bundle: baseline scripts, versioned scripts in version order, then
/// repeatables by name.
#[derive(Debug, Clone)]
pub struct Bundle {
    id: String,
    /// Shared: a tenant's copy ([`Bundle::for_tenant`]) replaces only the scripts it
    /// fills in.
    scripts: Vec<std::sync::Arc<Script>>,
    /// Every file as given (scripts and config files): what is uploaded and stored.
    files: std::sync::Arc<[BundleFile]>,
    /// The wave's placeholder values (`--placeholder`), part of the id.
    placeholders: BTreeMap<String, String>,
    /// The folder's `flyway.conf`/`flyway.toml`, or Flyway's defaults.
    config: flyway::FolderConfig,
    /// Advice found while loading (config keys not honoured, undo scripts left out).
    notes: Vec<Problem>,
}

/// What a wave gives a bundle beyond its files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleOptions {
    /// `--placeholder name=value`: over the folder config's `placeholders.*`.
    pub placeholders: BTreeMap<String, String>,
    /// A bundle stored before Flotilla replaced placeholders: its scripts run as
    /// written, as they did when it was stored (its id says nothing about
    /// replacement, so it must not start replacing now).
    pub as_written: bool,
    /// A bundle stored before Flotilla ran undo scripts: its `U…` files are left out
    /// as they were then (they are not in its id).
    pub leaves_out_undo: bool,
}

/// One thing wrong with a bundle, located as precisely as it can be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file, relative to the bundle.
    pub file: String,
    /// 1-based line, where it applies.
    pub line: Option<u32>,
    /// What is wrong and, where possible, what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Why a bundle could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The directory itself is missing or unreadable.
    #[error("cannot read bundle directory {}: {source}", path.display())]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No script at all.
    #[error(
        "bundle {location} has no scripts (expected files named V<version>__<description>.sql or R__<description>.sql)"
    )]
    Empty { location: String },
    /// A placeholder the wave gives is not usable.
    #[error("placeholder: {0}")]
    Placeholder(String),
    /// One or more scripts are invalid; every problem found is listed.
    #[error("{}", list_problems(.0))]
    Invalid(Vec<Problem>),
}

fn list_problems(problems: &[Problem]) -> String {
    let mut out = format!(
        "bundle has {} problem{}:",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&p.to_string());
    }
    out
}

/// A file of a bundle, as bytes: what travels from the CLI to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleFile {
    /// The file name inside the bundle.
    pub name: String,
    /// Its bytes.
    pub content: Vec<u8>,
}

impl Bundle {
    /// Loads and validates the `.sql` files directly inside `dir`. Other files and
    /// subdirectories are not part of the bundle; a symlink must stay inside `dir`.
    pub fn load_dir(dir: &Path) -> Result<Self, BundleError> {
        Self::load_dir_with(dir, &BundleOptions::default())
    }

    /// [`Bundle::load_dir`] with a wave's options (placeholder values).
    pub fn load_dir_with(dir: &Path, options: &BundleOptions) -> Result<Self, BundleError> {
        let (files, problems) = read_dir_files(dir)?;
        Self::build(files, options, problems, &dir.display().to_string())
    }

    /// Builds a bundle from file names and bytes; `location` names it in errors.
    pub fn from_files(files: Vec<BundleFile>, location: &str) -> Result<Self, BundleError> {
        Self::from_files_with(files, &BundleOptions::default(), location)
    }

    /// [`Bundle::from_files`] with a wave's options (placeholder values).
    pub fn from_files_with(
        files: Vec<BundleFile>,
        options: &BundleOptions,
        location: &str,
    ) -> Result<Self, BundleError> {
        Self::build(files, options, Vec::new(), location)
    }

    /// Builds a bundle from `(file name, SQL text)` pairs: bundles embedded in code,
    /// tests and benchmarks.
    pub fn from_sources(sources: &[(&str, &str)], location: &str) -> Result<Self, BundleError> {
        Self::from_files(
            sources
                .iter()
                .map(|(name, sql)| BundleFile {
                    name: name.to_string(),
                    content: sql.as_bytes().to_vec(),
                })
                .collect(),
            location,
        )
    }

    /// Validates `files`, reporting `problems` already found while reading them together
    /// with its own, so one run shows everything that is wrong.
    fn build(
        files: Vec<BundleFile>,
        options: &BundleOptions,
        mut problems: Vec<Problem>,
        location: &str,
    ) -> Result<Self, BundleError> {
        for (name, value) in &options.placeholders {
            flyway::check_wave_placeholder(name, value).map_err(BundleError::Placeholder)?;
        }
        // They are stored with the wave and shown by its status: bounded in all.
        let total: usize = options
            .placeholders
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum();
        if options.placeholders.len() > MAX_PLACEHOLDERS || total > MAX_PLACEHOLDER_BYTES {
            return Err(BundleError::Placeholder(format!(
                "{} placeholders of {total} bytes in all: at most {MAX_PLACEHOLDERS} and \
                 {MAX_PLACEHOLDER_BYTES} bytes",
                options.placeholders.len()
            )));
        }
        let mut notes = Vec::new();
        let mut config = folder_config(&files, &mut problems, &mut notes);
        if options.as_written {
            config.replacement = false;
        }
        for file in &files {
            if file.name.chars().any(char::is_control) {
                problems.push(Problem {
                    file: file.name.escape_debug().to_string(),
                    line: None,
                    message: "a file name cannot hold control characters".to_string(),
                });
            }
        }
        // Per-script `.sql.conf` files, by the script they belong to.
        let mut script_configs = BTreeMap::new();
        for file in &files {
            let Some(script) = file.name.strip_suffix(flyway::SCRIPT_CONF_SUFFIX) else {
                continue;
            };
            if config.naming.suffix_of(script).is_none() {
                continue;
            }
            let parsed = std::str::from_utf8(&file.content)
                .map_err(|_| (None, "not valid UTF-8".to_string()))
                .and_then(flyway::parse_script_conf);
            match parsed {
                Ok(c) => {
                    script_configs.insert(script.to_string(), c);
                }
                Err((line, message)) => problems.push(Problem {
                    file: file.name.clone(),
                    line,
                    message,
                }),
            }
        }
        let mut placeholders = config.placeholders.clone();
        placeholders.extend(options.placeholders.clone());
        let context = ParseContext {
            config: &config,
            placeholders: &placeholders,
        };
        let mut scripts = Vec::new();
        let mut seen_scripts = std::collections::HashSet::new();
        for file in &files {
            if is_config_file(&file.name, &config.naming) {
                continue;
            }
            seen_scripts.insert(file.name.clone());
            if options.leaves_out_undo
                && let Some(undo) = undo_version(&file.name, &config.naming)
            {
                notes.push(Problem {
                    file: file.name.clone(),
                    line: None,
                    message: format!(
                        "undo script for version {undo}: stored by a daemon that did not run undo scripts; left out"
                    ),
                });
                continue;
            }
            let script_config = script_configs.get(&file.name).copied().unwrap_or_default();
            match parse_script(file, &context, script_config) {
                Ok(script) => scripts.push(script),
                Err(mut p) => problems.append(&mut p),
            }
        }
        for name in script_configs.keys() {
            if !seen_scripts.contains(name) {
                problems.push(Problem {
                    file: format!("{name}{}", flyway::SCRIPT_CONF_SUFFIX),
                    line: None,
                    message: format!("configures {name}, which the bundle does not have"),
                });
            }
        }
        scripts.sort_by(|a, b| a.kind.cmp(&b.kind).then_with(|| a.name.cmp(&b.name)));
        // An uploaded bundle is a list, not a directory: the same name may come twice.
        let mut names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        let mut twice: Vec<&str> = names
            .windows(2)
            .filter(|p| p[0] == p[1])
            .map(|p| p[0])
            .collect();
        twice.dedup();
        for name in twice {
            problems.push(Problem {
                file: name.to_string(),
                line: None,
                message: "the bundle holds two files of this name".to_string(),
            });
        }
        for pair in scripts.windows(2) {
            let same = match (&pair[0].kind, &pair[1].kind) {
                (ScriptKind::Versioned(a), ScriptKind::Versioned(b))
                | (ScriptKind::Baseline(a), ScriptKind::Baseline(b))
                | (ScriptKind::Undo(a), ScriptKind::Undo(b)) => a == b,
                _ => false,
            };
            if same {
                let v = pair[1]
                    .kind
                    .version()
                    .or(pair[1].kind.baseline_version())
                    .or(pair[1].kind.undo_version())
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                problems.push(Problem {
                    file: pair[1].name.clone(),
                    line: None,
                    message: format!(
                        "version {v} is also used by {}: two scripts cannot share a version",
                        pair[0].name
                    ),
                });
            }
        }
        if !problems.is_empty() {
            problems.sort_by(|a, b| a.file.cmp(&b.file).then(a.line.cmp(&b.line)));
            return Err(BundleError::Invalid(problems));
        }
        if scripts.is_empty() {
            return Err(BundleError::Empty {
                location: location.to_string(),
            });
        }
        let id = bundle_id(&scripts, &files, &config.naming, &options.placeholders);
        Ok(Self {
            id,
            scripts: scripts.into_iter().map(std::sync::Arc::new).collect(),
            files: files.into(),
            placeholders: options.placeholders.clone(),
            config,
            notes,
        })
    }

    /// The bundle id: SHA-256, lowercase hex, over one line per script in order,
    /// `kind \t version \t name \t checksum \t directives \n`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The scripts in the order they apply (callbacks last: they are never planned).
    pub fn scripts(&self) -> &[std::sync::Arc<Script>] {
        &self.scripts
    }

    /// The callbacks of `event`, by name.
    pub fn callbacks(&self, event: Callback) -> impl Iterator<Item = &Script> {
        self.scripts
            .iter()
            .filter(move |s| s.kind.callback() == Some(event))
            .map(|s| &**s)
    }

    /// The undo script of `version`, if the bundle has one.
    pub fn undo_of(&self, version: &Version) -> Option<&Script> {
        self.scripts
            .iter()
            .find(|s| s.kind.undo_version() == Some(version))
            .map(|s| &**s)
    }

    /// The versions of the bundle without an undo script, in order.
    pub fn versions_without_undo(&self) -> Vec<&Version> {
        self.scripts
            .iter()
            .filter_map(|s| s.kind.version())
            .filter(|v| self.undo_of(v).is_none())
            .collect()
    }

    /// Whether the bundle has any callback.
    pub fn has_callbacks(&self) -> bool {
        self.scripts.iter().any(|s| s.kind.callback().is_some())
    }

    /// The bundle's files as given (scripts and config files), to upload or store.
    pub fn files(&self) -> &[BundleFile] {
        &self.files
    }

    /// The wave's placeholder values, as given.
    pub fn placeholders(&self) -> &BTreeMap<String, String> {
        &self.placeholders
    }

    /// The history table the folder's Flyway config names (`defaultSchema`/`schemas`,
    /// `table`), for `--adopt flyway` without a table.
    pub fn flyway_history_table(&self) -> Option<(Option<&str>, &str)> {
        let table = self.config.table.as_deref();
        let schema = self.config.default_schema.as_deref();
        match (schema, table) {
            (None, None) => None,
            (schema, table) => Some((schema, table.unwrap_or("flyway_schema_history"))),
        }
    }

    /// Whether some script holds placeholders whose value is the tenant's own.
    pub fn has_tenant_placeholders(&self) -> bool {
        self.scripts.iter().any(|s| s.tenant_placeholders)
    }

    /// This bundle with the tenant's own placeholders (`${flyway:database}`, …) filled
    /// in from `values` (name → value, as the tenant's server gave them). The scripts
    /// are rendered again from their text in one pass (a wave's value holding `${…}` is
    /// never read as a placeholder); each tenant value must pass
    /// [`flyway::tenant_value_ok`], and every statement must keep the shape it was
    /// validated with (same pieces, same leading keywords). Scripts without such
    /// placeholders are shared, not copied; the id and checksums stay.
    pub fn for_tenant(&self, values: &BTreeMap<&str, String>) -> Result<Bundle, String> {
        let mut effective = self.config.placeholders.clone();
        effective.extend(self.placeholders.clone());
        let context = ParseContext {
            config: &self.config,
            placeholders: &effective,
        };
        let (prefix, suffix) = (&self.config.prefix, &self.config.suffix);
        let mut out = self.clone();
        for slot in out.scripts.iter_mut().filter(|s| s.tenant_placeholders) {
            let script: &Script = slot;
            for (name, value) in values {
                let used = script.text.contains(&format!("{prefix}{name}{suffix}"));
                if used && !flyway::tenant_value_ok(name, value) {
                    return Err(format!(
                        "{}: the tenant's {name} is {value:?}, which cannot stand in for a \
                         placeholder without changing what a statement says (only letters, \
                         digits, `_` and inner `-`); give the value as a wave placeholder",
                        script.name
                    ));
                }
            }
            let lookup = |name: &str| match context.lookup(&script.name, name) {
                flyway::Lookup::Deferred => match values.get(name) {
                    Some(v) => flyway::Lookup::Value(v.as_str()),
                    None => flyway::Lookup::Missing,
                },
                other => other,
            };
            let (sql, _) = flyway::substitute(
                strip_bom(&script.text),
                prefix,
                suffix,
                MAX_SCRIPT_BYTES as usize,
                lookup,
            )
            .map_err(|e| match e {
                flyway::SubstituteError::Missing { name, .. } => {
                    format!(
                        "{}: the tenant gave no value for placeholder {name}",
                        script.name
                    )
                }
                flyway::SubstituteError::TooLarge { limit } => {
                    format!(
                        "{}: with the tenant's values it is over {limit} bytes",
                        script.name
                    )
                }
            })?;
            let statements = sql::split(&sql).map_err(|e| format!("{}: {e}", script.name))?;
            // The same pieces, each the same command, classified the same way (a user
            // named `concurrently` must not turn an index build into another kind).
            let class = |st: &Statement| {
                (
                    st.is_blank(),
                    st.leading.first().cloned(),
                    rules::refused_in_transaction(&st.leading).is_some(),
                    rules::transaction_control(&st.leading).is_some(),
                    rules::session_setting(&st.leading),
                )
            };
            let same_shape = statements.len() == script.statements.len()
                && statements
                    .iter()
                    .zip(&script.statements)
                    .all(|(a, b)| class(a) == class(b));
            if !same_shape {
                return Err(format!(
                    "{}: the tenant's placeholder values change how the script reads (a \
                     statement that begins with one, or a different split)",
                    script.name
                ));
            }
            let mut filled = script.clone();
            filled.sql = sql;
            filled.statements = statements;
            filled.tenant_placeholders = false;
            *slot = std::sync::Arc::new(filled);
        }
        Ok(out)
    }

    /// Advice that does not make the bundle invalid.
    pub fn warnings(&self) -> Vec<Problem> {
        let mut out = self.notes.clone();
        for script in &self.scripts {
            if script.directives.transaction == TransactionUse::NoTransaction {
                let needs = script
                    .executable_statements()
                    .any(|s| rules::refused_in_transaction(&s.leading).is_some());
                if !needs {
                    out.push(Problem {
                        file: script.name.clone(),
                        line: None,
                        message: "no-transaction is set but no statement needs it: a failure \
                                  part-way leaves earlier statements applied"
                            .to_string(),
                    });
                    continue;
                }
                // A crash between a statement and its recorded progress runs it again
                // on resume; only what is idempotent (or recovered) survives that.
                let lines = LineIndex::new(&script.sql);
                for stmt in script
                    .executable_statements()
                    .filter(|s| !rules::safe_to_rerun(&s.leading))
                {
                    out.push(Problem {
                        file: script.name.clone(),
                        line: stmt.first_token.map(|o| lines.line(o)),
                        message: "in a no-transaction script this statement runs again if a \
                                  run is interrupted right after it: make it idempotent \
                                  (IF NOT EXISTS, IF EXISTS, OR REPLACE)"
                            .to_string(),
                    });
                }
            }
        }
        out
    }
}

/// The id: one line per script; then, only when there are any (so a plain folder keeps
/// the id it always had), one per config file and one per wave placeholder (its value
/// hashed: values may hold tabs or line breaks).
fn bundle_id(
    scripts: &[Script],
    files: &[BundleFile],
    naming: &flyway::Naming,
    placeholders: &BTreeMap<String, String>,
) -> String {
    let mut h = Sha256::new();
    for s in scripts {
        let version = s
            .kind
            .version()
            .or(s.kind.baseline_version())
            .map(|v| v.to_string())
            .unwrap_or_default();
        h.update(
            format!(
                "{}\t{}\t{}\t{}\t{}\n",
                s.kind.as_str(),
                version,
                s.name,
                s.checksum,
                s.directives
            )
            .as_bytes(),
        );
    }
    let mut configs: Vec<&BundleFile> = files
        .iter()
        .filter(|f| is_config_file(&f.name, naming))
        .collect();
    configs.sort_by(|a, b| a.name.cmp(&b.name));
    for f in configs {
        h.update(format!("config\t\t{}\t{}\t\n", f.name, checksum(&f.content)).as_bytes());
    }
    for (name, value) in placeholders {
        h.update(
            format!(
                "placeholder\t\t{}\t{}\t\n",
                checksum(name.as_bytes()),
                checksum(value.as_bytes())
            )
            .as_bytes(),
        );
    }
    hex::encode(h.finalize())
}

/// `flyway.conf`, `flyway.toml` and `<script>.conf`: files that configure, not run.
fn is_config_file(name: &str, naming: &flyway::Naming) -> bool {
    name == flyway::CONF
        || name == flyway::TOML
        || name
            .strip_suffix(flyway::SCRIPT_CONF_SUFFIX)
            .is_some_and(|script| naming.suffix_of(script).is_some())
}

/// The version of an undo script (`U2__x.sql`), which Flotilla lists and leaves out.
fn undo_version(name: &str, naming: &flyway::Naming) -> Option<String> {
    let stem = name.strip_suffix(naming.suffix_of(name)?)?;
    let rest = stem.strip_prefix(naming.undo.as_str())?;
    let (version, _) = rest.split_once(naming.separator.as_str())?;
    version.parse::<Version>().ok().map(|v| v.to_string())
}

/// The folder's Flyway config: `flyway.conf` or `flyway.toml` (not both), or defaults.
fn folder_config(
    files: &[BundleFile],
    problems: &mut Vec<Problem>,
    notes: &mut Vec<Problem>,
) -> flyway::FolderConfig {
    let found: Vec<&BundleFile> = files
        .iter()
        .filter(|f| f.name == flyway::CONF || f.name == flyway::TOML)
        .collect();
    if found.len() > 1 {
        problems.push(Problem {
            file: flyway::CONF.to_string(),
            line: None,
            message: "the bundle has both flyway.conf and flyway.toml: keep one".to_string(),
        });
        return flyway::FolderConfig::default();
    }
    let Some(file) = found.first() else {
        return flyway::FolderConfig::default();
    };
    let parsed = std::str::from_utf8(&file.content)
        .map_err(|_| (None, "not valid UTF-8".to_string()))
        .and_then(|text| {
            if file.name == flyway::TOML {
                flyway::parse_toml(text)
            } else {
                flyway::parse_conf(text)
            }
        });
    match parsed {
        Ok(config) => {
            notes.extend(config.warnings.iter().map(|w| Problem {
                file: file.name.clone(),
                line: None,
                message: w.clone(),
            }));
            config
        }
        Err((line, message)) => {
            problems.push(Problem {
                file: file.name.clone(),
                line,
                message,
            });
            flyway::FolderConfig::default()
        }
    }
}

/// SHA-256 of `bytes`, lowercase hex: the checksum of a script.
pub fn checksum(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The checksum Flyway records for a script: CRC-32 over the UTF-8 bytes of each line
/// without its terminator (`\n`, `\r\n` or a lone `\r`, as Java's
/// `BufferedReader.readLine` splits), a byte-order mark dropped from the first line,
/// the result read as a signed 32-bit integer. Line endings and blank lines do not
/// change it; placeholders are not replaced before it is taken.
pub fn flyway_checksum(text: &str) -> i32 {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut crc = crc32fast::Hasher::new();
    for line in text.split(['\n', '\r']) {
        crc.update(line.as_bytes());
    }
    // Java's `(int) crc32.getValue()`: the same 32 bits, read as signed.
    crc.finalize() as i32
}

/// The checksum sqlx records for a migration: SHA-384 of its text, lowercase hex.
pub fn sqlx_checksum(text: &str) -> String {
    hex::encode(sha2::Sha384::digest(text.as_bytes()))
}

/// The `.sql` files of `dir`, and the problems of those that could not be read.
fn read_dir_files(dir: &Path) -> Result<(Vec<BundleFile>, Vec<Problem>), BundleError> {
    let dir_error = |source| BundleError::Directory {
        path: dir.to_path_buf(),
        source,
    };
    let root = dir.canonicalize().map_err(dir_error)?;
    let entries = std::fs::read_dir(&root).map_err(dir_error)?;
    let mut names = Vec::new();
    for entry in entries {
        names.push(
            entry
                .map_err(dir_error)?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    // The folder's Flyway config says which suffixes scripts have: read it first.
    let naming = [flyway::CONF, flyway::TOML]
        .iter()
        .filter(|n| names.iter().any(|name| name == *n))
        .find_map(|n| {
            // Only a small regular file inside the folder (not a link to /dev/zero).
            let path = root.join(n).canonicalize().ok()?;
            let meta = std::fs::metadata(&path).ok()?;
            if !path.starts_with(&root) || !meta.is_file() || meta.len() > 1024 * 1024 {
                return None;
            }
            let text = std::fs::read_to_string(&path).ok()?;
            let config = if *n == flyway::TOML {
                flyway::parse_toml(&text)
            } else {
                flyway::parse_conf(&text)
            };
            config.ok().map(|c| c.naming)
        })
        .unwrap_or_default();
    let mut files = Vec::new();
    let mut problems = Vec::new();
    names.sort();
    for name in names {
        if name.starts_with('.')
            || (naming.suffix_of(&name).is_none() && !is_config_file(&name, &naming))
        {
            continue;
        }
        let problem = |message: String| Problem {
            file: name.clone(),
            line: None,
            message,
        };
        let path = root.join(&name);
        let target = match path.canonicalize() {
            Ok(t) => t,
            Err(e) => {
                problems.push(problem(format!("cannot resolve: {e}")));
                continue;
            }
        };
        if !target.starts_with(&root) {
            problems.push(problem(format!(
                "symlink points outside the bundle, to {}",
                target.display()
            )));
            continue;
        }
        let meta = match std::fs::metadata(&target) {
            Ok(m) => m,
            Err(e) => {
                problems.push(problem(format!("cannot read: {e}")));
                continue;
            }
        };
        if meta.is_dir() {
            continue;
        }
        if meta.len() > MAX_SCRIPT_BYTES {
            problems.push(problem(format!(
                "script is {} bytes, over the limit of {MAX_SCRIPT_BYTES} (16 MiB)",
                meta.len()
            )));
            continue;
        }
        match std::fs::read(&target) {
            Ok(content) => files.push(BundleFile { name, content }),
            Err(e) => problems.push(problem(format!("cannot read: {e}"))),
        }
    }
    Ok((files, problems))
}

/// `text` without a leading byte-order mark.
fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Parses a file name into its kind and description, with the folder's naming.
fn parse_name(name: &str, naming: &flyway::Naming) -> Result<(ScriptKind, String), String> {
    let shape = || {
        format!(
            "the name matches neither {v}<version>{sep}<description>{suf} nor \
             {r}{sep}<description>{suf} (nor {b}<version>{sep}… for a baseline script)",
            v = naming.versioned,
            r = naming.repeatable,
            b = naming.baseline,
            sep = naming.separator,
            suf = naming
                .suffixes
                .first()
                .map(String::as_str)
                .unwrap_or(".sql"),
        )
    };
    let stem = naming
        .suffix_of(name)
        .and_then(|suffix| name.strip_suffix(suffix))
        .ok_or_else(|| format!("not a script ({})", naming.suffixes.join(", ")))?;
    let is_event = |event: &str| {
        stem == event
            || stem
                .strip_prefix(event)
                .is_some_and(|rest| rest.starts_with(naming.separator.as_str()))
    };
    if let Some(event) = Callback::ALL.into_iter().find(|c| is_event(c.as_str())) {
        return Ok((ScriptKind::Callback(event), event.as_str().to_string()));
    }
    if let Some(other) = OTHER_FLYWAY_EVENTS.iter().find(|e| is_event(e)) {
        return Err(format!(
            "Flyway callback {other}: Flotilla runs only beforeMigrate, beforeEachMigrate, \
             afterEachMigrate, afterMigrate and afterMigrateError callbacks; remove or rename it"
        ));
    }
    let describe = |d: &str| -> Result<String, String> {
        if d.trim().is_empty() {
            Err(format!(
                "the description after `{}` is empty",
                naming.separator
            ))
        } else {
            Ok(d.replace('_', " "))
        }
    };
    if let Some(desc) = stem
        .strip_prefix(naming.repeatable.as_str())
        .and_then(|rest| rest.strip_prefix(naming.separator.as_str()))
    {
        return Ok((ScriptKind::Repeatable, describe(desc)?));
    }
    // The longest prefix first, as Flyway matches them (`V` and `VB` can both be set).
    let mut kinds = [
        (&naming.versioned, 'v'),
        (&naming.baseline, 'b'),
        (&naming.undo, 'u'),
    ];
    kinds.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
    for (prefix, which) in kinds {
        if let Some(rest) = stem.strip_prefix(prefix.as_str())
            && let Some((version, desc)) = rest.split_once(naming.separator.as_str())
        {
            let version: Version = version
                .parse()
                .map_err(|e| format!("malformed version {version:?}: {e}"))?;
            let kind = match which {
                'b' => ScriptKind::Baseline(version),
                'u' => ScriptKind::Undo(version),
                _ => ScriptKind::Versioned(version),
            };
            return Ok((kind, describe(desc)?));
        }
    }
    Err(shape())
}

/// What parsing a script needs from its bundle.
struct ParseContext<'a> {
    config: &'a flyway::FolderConfig,
    /// The folder's `placeholders.*` with the wave's over them.
    placeholders: &'a BTreeMap<String, String>,
}

impl ParseContext<'_> {
    /// What `${name}` means in script `file`.
    fn lookup<'v>(&'v self, file: &'v str, name: &str) -> flyway::Lookup<'v> {
        if let Some(v) = self.placeholders.get(name) {
            return flyway::Lookup::Value(v);
        }
        match name {
            "flyway:filename" => flyway::Lookup::Value(file),
            "flyway:table" => flyway::Lookup::Value(
                self.config
                    .table
                    .as_deref()
                    .unwrap_or("flyway_schema_history"),
            ),
            "flyway:defaultSchema" => match &self.config.default_schema {
                Some(schema) => flyway::Lookup::Value(schema),
                None => flyway::Lookup::Deferred,
            },
            _ if flyway::TENANT_BUILTINS.iter().any(|(n, _)| *n == name) => {
                flyway::Lookup::Deferred
            }
            _ => flyway::Lookup::Missing,
        }
    }
}

fn parse_script(
    file: &BundleFile,
    context: &ParseContext<'_>,
    script_config: flyway::ScriptConfig,
) -> Result<Script, Vec<Problem>> {
    let name = file.name.clone();
    let config = context.config;
    let problem = |line: Option<u32>, message: String| Problem {
        file: name.clone(),
        line,
        message,
    };
    if name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(vec![problem(
            None,
            "a script name cannot contain a path".to_string(),
        )]);
    }
    let (kind, description) =
        parse_name(&name, &config.naming).map_err(|m| vec![problem(None, m)])?;
    if file.content.len() as u64 > MAX_SCRIPT_BYTES {
        return Err(vec![problem(
            None,
            format!(
                "script is {} bytes, over the limit of {MAX_SCRIPT_BYTES} (16 MiB)",
                file.content.len()
            ),
        )]);
    }
    let checksum = checksum(&file.content);
    let encoding = script_config.encoding.unwrap_or(config.encoding);
    let text = match encoding.decode(&file.content) {
        Ok(s) => s,
        Err(valid) => {
            let line = LineIndex::new(&String::from_utf8_lossy(&file.content[..valid])).line(valid);
            return Err(vec![problem(
                Some(line),
                format!(
                    "not valid {} (byte {valid}): scripts are UTF-8 text unless `encoding` \
                     says otherwise in flyway.conf or {name}.conf",
                    encoding.name()
                ),
            )]);
        }
    };
    let text_lines = LineIndex::new(&text);
    // A byte-order mark is not SQL (PostgreSQL refuses it, Flyway drops it); the text
    // as written keeps it for the checksums.
    let (sql, tenant_placeholders) = if script_config.replacement.unwrap_or(config.replacement) {
        match flyway::substitute(
            strip_bom(&text),
            &config.prefix,
            &config.suffix,
            MAX_SCRIPT_BYTES as usize,
            |n| context.lookup(&name, n),
        ) {
            Ok(done) => done,
            Err(flyway::SubstituteError::TooLarge { limit }) => {
                return Err(vec![problem(
                    None,
                    format!("with its placeholders replaced the script is over {limit} bytes"),
                )]);
            }
            Err(flyway::SubstituteError::Missing {
                at,
                name: placeholder,
            }) => {
                let hint = match placeholder.as_str() {
                    "flyway:workingDirectory" | "flyway:environment" => {
                        "Flotilla has no such value".to_string()
                    }
                    p => format!(
                        "give it with `--placeholder {p}=VALUE` or as flyway.placeholders.{p} in flyway.conf"
                    ),
                };
                let bom = text.len() - strip_bom(&text).len();
                return Err(vec![problem(
                    Some(text_lines.line(at + bom)),
                    format!(
                        "no value for placeholder {}{placeholder}{}: {hint}",
                        config.prefix, config.suffix
                    ),
                )]);
            }
        }
    } else {
        (strip_bom(&text).to_string(), false)
    };
    let lines = LineIndex::new(&sql);
    let mut problems = Vec::new();
    // With unreadable directives the script's intent is unknown, so the transaction
    // rules below are not checked: one clear error instead of a cascade.
    let directives = match parse_directives(&sql) {
        Ok(d) => Some(d),
        Err((line, message)) => {
            problems.push(problem(Some(line), message));
            None
        }
    };
    let statements = match sql::split(&sql) {
        Ok(s) => s,
        Err(e) => {
            problems.push(problem(Some(lines.line(e.offset)), e.to_string()));
            Vec::new()
        }
    };
    let mut directives = directives;
    if let Some(d) = &mut directives {
        // `executeInTransaction` (the script's `.conf`, else the folder's) as Flyway
        // reads it; the directive and a `.conf` saying opposite things is an error.
        match script_config.execute_in_transaction {
            Some(true) if d.transaction == TransactionUse::NoTransaction => {
                problems.push(problem(
                    None,
                    format!(
                        "{name}.conf says executeInTransaction=true but the script says \
                         -- flotilla:no-transaction: keep one"
                    ),
                ));
            }
            Some(false) => d.transaction = TransactionUse::NoTransaction,
            Some(true) => {}
            None if !config.execute_in_transaction => d.transaction = TransactionUse::NoTransaction,
            None => {}
        }
    }
    // Flyway's rule, for folders written for Flyway: a script whose statements all
    // refuse a transaction block runs outside one without a directive; one that mixes
    // both kinds is refused, naming a line of each (unless the folder says `mixed`,
    // when it runs outside a transaction, as Flyway runs it).
    if let Some(d) = &mut directives
        && d.transaction == TransactionUse::Transactional
        && script_config.execute_in_transaction.is_none()
    {
        let executable: Vec<_> = statements.iter().filter(|s| !s.is_blank()).collect();
        let refused = |s: &&sql::Statement| rules::refused_in_transaction(&s.leading).is_some();
        if !executable.is_empty()
            && (executable.iter().all(refused) || (config.mixed && executable.iter().any(refused)))
        {
            d.transaction = TransactionUse::NoTransaction;
        }
    }
    if let Some(d) = &directives
        && d.transaction == TransactionUse::Transactional
    {
        let first_in_transaction = statements
            .iter()
            .filter(|s| !s.is_blank())
            .find(|s| {
                rules::refused_in_transaction(&s.leading).is_none()
                    && rules::transaction_control(&s.leading).is_none()
            })
            .and_then(|s| s.first_token)
            .map(|o| lines.line(o));
        for stmt in statements.iter().filter(|s| !s.is_blank()) {
            let line = stmt.first_token.map(|o| lines.line(o));
            if let Some(what) = rules::refused_in_transaction(&stmt.leading) {
                let other = first_in_transaction
                    .map(|l| format!(", and line {l} needs one (a script cannot mix both)"))
                    .unwrap_or_default();
                problems.push(problem(
                    line,
                    format!(
                        "{what} cannot run inside a transaction block{other}; split the \
                         script, or add `-- flotilla:no-transaction` at the top of it"
                    ),
                ));
            } else if let Some(what) = rules::transaction_control(&stmt.leading) {
                problems.push(problem(
                    line,
                    format!(
                        "{what} in a transactional script would commit it apart from its log \
                         row; remove it (Flotilla wraps each script in a transaction) or mark \
                         the script `-- flotilla:no-transaction`"
                    ),
                ));
            }
        }
    }
    if let Some(d) = &directives {
        for message in batch_problems(d, &kind, &statements, &sql) {
            problems.push(problem(None, message));
        }
    }
    if let (Some(d), ScriptKind::Callback(_)) = (&directives, &kind)
        && (d.transaction == TransactionUse::NoTransaction || d.precondition.is_some())
    {
        problems.push(problem(
            None,
            "a callback runs in a transaction, unconditionally: no-transaction and \
             precondition are for migrations"
                .to_string(),
        ));
    }
    if let Some(d) = &directives
        && d.precondition.is_some()
        && (d.transaction == TransactionUse::NoTransaction
            || matches!(kind, ScriptKind::Baseline(_) | ScriptKind::Undo(_)))
    {
        problems.push(problem(
            None,
            "a precondition is evaluated in the script's transaction: a no-transaction or \
             baseline script cannot have one"
                .to_string(),
        ));
    }
    if let (Some(d), ScriptKind::Baseline(_)) = (&directives, &kind)
        && d.transaction == TransactionUse::NoTransaction
    {
        problems.push(problem(
            None,
            "a baseline script runs in one transaction with the versions it records: it \
             cannot be no-transaction"
                .to_string(),
        ));
    }
    let Some(directives) = directives.filter(|_| problems.is_empty()) else {
        return Err(problems);
    };
    Ok(Script {
        name: name.clone(),
        kind,
        description,
        checksum,
        directives,
        text,
        sql,
        tenant_placeholders,
        statements,
    })
}

/// What is wrong with a `batch` script: it must be a versioned script of one
/// data-changing statement (UPDATE, DELETE or INSERT, possibly under WITH) that
/// bounds itself with a LIMIT, so that each run is short and the statement's own
/// WHERE is the cursor.
fn batch_problems(
    d: &Directives,
    kind: &ScriptKind,
    statements: &[Statement],
    sql: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    if !d.batch {
        if d.batch_pause.is_some() {
            out.push("flotilla:batch-pause needs flotilla:batch".to_string());
        }
        return out;
    }
    if !matches!(kind, ScriptKind::Versioned(_)) {
        out.push("a batch script must be versioned (V…)".to_string());
    }
    if d.transaction == TransactionUse::NoTransaction || d.precondition.is_some() {
        out.push(
            "a batch script runs each batch in a transaction of its own: it cannot be \
             no-transaction or have a precondition"
                .to_string(),
        );
    }
    let executable: Vec<&Statement> = statements.iter().filter(|s| !s.is_blank()).collect();
    let [statement] = executable.as_slice() else {
        out.push(format!(
            "a batch script holds exactly one data-changing statement (it has {})",
            executable.len()
        ));
        return out;
    };
    let text = statement.sql(sql);
    let tokens = sql::tokens(text);
    let word = |w: &str| {
        tokens
            .iter()
            .any(|t| matches!(t, sql::Token::Word(x) if x == w))
    };
    let first = match tokens.first() {
        Some(sql::Token::Word(w)) => w.as_str(),
        _ => "",
    };
    let dml = match first {
        "update" | "delete" | "insert" => true,
        "with" => word("update") || word("delete") || word("insert"),
        _ => false,
    };
    if !dml {
        out.push(
            "a batch script's statement must change rows (UPDATE, DELETE or INSERT)".to_string(),
        );
    } else if !word("limit") {
        out.push(
            "a batch statement must bound each run with a LIMIT, e.g. `UPDATE t SET … WHERE \
             id IN (SELECT id FROM t WHERE <not yet done> LIMIT 1000)`; without one it is a \
             single long transaction"
                .to_string(),
        );
    }
    if word("returning") {
        out.push("a batch statement cannot return rows (RETURNING)".to_string());
    }
    if text.contains(BATCH_TAG) {
        out.push(format!("a batch statement cannot hold {BATCH_TAG}"));
    }
    out
}

/// `[on-fail=MODE] SQL` or `SQL on-fail=MODE`, as the words after the directive.
fn parse_precondition(words: &[&str]) -> Result<Precondition, String> {
    let mode = |w: &str| w.strip_prefix("on-fail=").map(str::to_string);
    let (on_fail, sql_words): (Option<String>, &[&str]) = match words {
        [first, rest @ ..] if mode(first).is_some() => (mode(first), rest),
        [rest @ .., last] if mode(last).is_some() => (mode(last), rest),
        all => (None, all),
    };
    let on_fail = match on_fail.as_deref() {
        None | Some("fail") => OnFail::Fail,
        Some("skip") => OnFail::Skip,
        Some("mark-applied") => OnFail::MarkApplied,
        Some(other) => {
            return Err(format!(
                "flotilla:precondition on-fail={other}: not fail, skip or mark-applied"
            ));
        }
    };
    let sql = sql_words.join(" ");
    let sql = sql.trim().trim_end_matches(';').trim().to_string();
    if sql.is_empty() {
        return Err("flotilla:precondition needs a query returning one boolean, e.g. \
                    `-- flotilla:precondition on-fail=skip SELECT to_regclass('legacy') IS NOT NULL`"
            .to_string());
    }
    if sql.len() > MAX_PRECONDITION_BYTES || sql.contains(PRECONDITION_TAG) {
        return Err(format!(
            "flotilla:precondition: at most {MAX_PRECONDITION_BYTES} bytes, without {PRECONDITION_TAG}"
        ));
    }
    match sql::split(&sql) {
        Ok(statements) if statements.iter().filter(|s| !s.is_blank()).count() == 1 => {}
        Ok(_) => {
            return Err(
                "flotilla:precondition must be one query (one boolean), not several \
                        statements"
                    .to_string(),
            );
        }
        Err(e) => return Err(format!("flotilla:precondition: {e}")),
    }
    Ok(Precondition { sql, on_fail })
}

/// Reads `-- flotilla:` directives from the comment lines at the top of a script.
fn parse_directives(sql: &str) -> Result<Directives, (u32, String)> {
    let mut d = Directives::default();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in sql.lines().enumerate() {
        let line_no = u32::try_from(n + 1).unwrap_or(u32::MAX);
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let Some(comment) = trimmed.strip_prefix("--") else {
            break;
        };
        let Some(directive) = comment.trim().strip_prefix("flotilla:") else {
            continue;
        };
        let mut words = directive.split_whitespace();
        let key = words.next().unwrap_or("");
        let arg: Vec<&str> = words.collect();
        if key != "allow" && !seen.insert(key.to_string()) {
            return Err((line_no, format!("directive flotilla:{key} is given twice")));
        }
        let duration = || -> Result<Duration, (u32, String)> {
            let text = arg.join(" ");
            if text.is_empty() {
                return Err((
                    line_no,
                    format!("flotilla:{key} needs a duration, e.g. `-- flotilla:{key} 10s`"),
                ));
            }
            humantime::parse_duration(&text).map_err(|e| {
                (
                    line_no,
                    format!("flotilla:{key}: bad duration {text:?}: {e}"),
                )
            })
        };
        match key {
            "no-transaction" => {
                if !arg.is_empty() {
                    return Err((
                        line_no,
                        "flotilla:no-transaction takes no argument".to_string(),
                    ));
                }
                d.transaction = TransactionUse::NoTransaction;
            }
            "lock-timeout" | "statement-timeout" => {
                use crate::policy::{ZeroTimeout, timeout_ms};
                let zero = if key == "lock-timeout" {
                    ZeroTimeout::Refused
                } else {
                    ZeroTimeout::MeansNone
                };
                let value = duration()?;
                // Whole milliseconds in PostgreSQL's range: `500us` must not become 0.
                timeout_ms(&format!("flotilla:{key}"), value, zero).map_err(|e| (line_no, e.0))?;
                if key == "lock-timeout" {
                    d.lock_timeout = Some(value);
                } else {
                    d.statement_timeout = Some(value);
                }
            }
            "max-block" => {
                let value = duration()?;
                crate::policy::timeout_ms(
                    "flotilla:max-block",
                    value,
                    crate::policy::ZeroTimeout::Refused,
                )
                .map_err(|e| (line_no, e.0))?;
                d.max_block = Some(value);
            }
            "allow" => {
                let Some((rule, reason)) = arg.split_first() else {
                    return Err((
                        line_no,
                        "flotilla:allow needs a rule and a reason, e.g. `-- flotilla:allow \
                         ban-drop-column the app stopped reading it in 4.2`"
                            .to_string(),
                    ));
                };
                if !safety::is_rule(rule) {
                    return Err((
                        line_no,
                        format!(
                            "flotilla:allow {rule}: no such rule (`flotilla bundle rules` lists \
                             them)"
                        ),
                    ));
                }
                if reason.is_empty() {
                    return Err((
                        line_no,
                        format!("flotilla:allow {rule} needs a reason after the rule"),
                    ));
                }
                if d.allow.iter().any(|(r, _)| r == rule) {
                    return Err((line_no, format!("flotilla:allow {rule} is given twice")));
                }
                d.allow.push((rule.to_string(), reason.join(" ")));
            }
            "precondition" => {
                d.precondition = Some(parse_precondition(&arg).map_err(|e| (line_no, e))?);
            }
            "batch" => {
                if !arg.is_empty() {
                    return Err((line_no, "flotilla:batch takes no argument".to_string()));
                }
                d.batch = true;
            }
            "batch-pause" => {
                let value = duration()?;
                if value > MAX_BATCH_PAUSE {
                    return Err((
                        line_no,
                        format!(
                            "flotilla:batch-pause is at most {}",
                            humantime::format_duration(MAX_BATCH_PAUSE)
                        ),
                    ));
                }
                d.batch_pause = Some(value);
            }
            other => {
                return Err((
                    line_no,
                    format!(
                        "unknown directive flotilla:{other} (known: no-transaction, \
                         lock-timeout, statement-timeout, max-block, allow, precondition, \
                         batch, batch-pause)"
                    ),
                ));
            }
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, sql: &str) -> BundleFile {
        BundleFile {
            name: name.to_string(),
            content: sql.as_bytes().to_vec(),
        }
    }

    fn bundle(files: &[(&str, &str)]) -> Result<Bundle, BundleError> {
        Bundle::from_files(files.iter().map(|(n, s)| file(n, s)).collect(), "test")
    }

    #[test]
    fn an_uploaded_bundle_with_a_name_twice_is_refused() {
        let p = problems(&[
            ("R__view.sql", "select 1;"),
            ("R__view.sql", "select 2;"),
            ("V1__a.sql", "select 1;"),
        ]);
        assert_eq!(
            p,
            ["R__view.sql: the bundle holds two files of this name"],
            "{p:?}"
        );
    }

    fn problems(files: &[(&str, &str)]) -> Vec<String> {
        match bundle(files) {
            Err(BundleError::Invalid(p)) => p.iter().map(|p| p.to_string()).collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn orders_versioned_numerically_then_repeatables() {
        let b = bundle(&[
            ("R__views.sql", "select 1;"),
            ("V10__ten.sql", "select 1;"),
            ("V2__two.sql", "select 1;"),
            ("V1_1__one_one.sql", "select 1;"),
            ("V1__one.sql", "select 1;"),
            ("R__a_grants.sql", "select 1;"),
            ("V1.2__one_two.sql", "select 1;"),
        ])
        .expect("valid");
        let names: Vec<_> = b.scripts().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "V1__one.sql",
                "V1_1__one_one.sql",
                "V1.2__one_two.sql",
                "V2__two.sql",
                "V10__ten.sql",
                "R__a_grants.sql",
                "R__views.sql"
            ]
        );
        assert_eq!(b.scripts()[1].description, "one one");
    }

    #[test]
    fn checksum_and_id_are_stable_and_sensitive() {
        let a = bundle(&[("V1__a.sql", "select 1;")]).expect("valid");
        assert_eq!(
            a.scripts()[0].checksum,
            // sha256("select 1;")
            checksum(b"select 1;")
        );
        assert_eq!(a.scripts()[0].checksum.len(), 64);
        let same = bundle(&[("V1__a.sql", "select 1;")]).expect("valid");
        assert_eq!(a.id(), same.id());
        let other_bytes = bundle(&[("V1__a.sql", "select 2;")]).expect("valid");
        assert_ne!(a.id(), other_bytes.id());
        let other_directive =
            bundle(&[("V1__a.sql", "-- flotilla:lock-timeout 1s\nselect 1;")]).expect("valid");
        assert_ne!(a.id(), other_directive.id());
    }

    #[test]
    fn known_checksum() {
        assert_eq!(
            checksum(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn directives() {
        let b = bundle(&[(
            "V1__idx.sql",
            "-- a comment\n-- flotilla:no-transaction\n--flotilla:lock-timeout 10s\n-- flotilla:statement-timeout 1min\n\nCREATE INDEX CONCURRENTLY i ON t (a);\n",
        )])
        .expect("valid");
        let d = &b.scripts()[0].directives;
        assert_eq!(d.transaction, TransactionUse::NoTransaction);
        assert_eq!(d.lock_timeout, Some(Duration::from_secs(10)));
        assert_eq!(d.statement_timeout, Some(Duration::from_secs(60)));
        assert_eq!(
            d.to_string(),
            "no-transaction,lock-timeout=10000ms,statement-timeout=60000ms"
        );
    }

    #[test]
    fn directives_after_sql_are_ordinary_comments() {
        let b = bundle(&[("V1__a.sql", "select 1;\n-- flotilla:bogus\n")]).expect("valid");
        assert_eq!(b.scripts()[0].directives, Directives::default());
    }

    #[test]
    fn bad_directives() {
        assert_eq!(
            problems(&[("V1__a.sql", "\n-- flotilla:no-transactoin\nselect 1;")]),
            [
                "V1__a.sql:2: unknown directive flotilla:no-transactoin (known: no-transaction, lock-timeout, statement-timeout, max-block, allow, precondition, batch, batch-pause)"
            ]
        );
        let p = problems(&[("V1__a.sql", "-- flotilla:lock-timeout soon\nselect 1;")]);
        assert!(
            p[0].starts_with("V1__a.sql:1: flotilla:lock-timeout: bad duration \"soon\""),
            "{p:?}"
        );
        for (directive, why) in [
            ("lock-timeout 500us", "whole milliseconds"),
            ("lock-timeout 0s", "1 ms"),
            ("statement-timeout 30days", "2147483647"),
        ] {
            let p = problems(&[("V1__a.sql", &format!("-- flotilla:{directive}\nselect 1;"))]);
            assert!(
                p.len() == 1 && p[0].starts_with("V1__a.sql:1: flotilla:") && p[0].contains(why),
                "{directive}: {p:?}"
            );
        }
        let p = problems(&[("V1__a.sql", "-- flotilla:lock-timeout\nselect 1;")]);
        assert!(p[0].contains("needs a duration"), "{p:?}");
        let p = problems(&[(
            "V1__a.sql",
            "-- flotilla:no-transaction\n-- flotilla:no-transaction\nvacuum;",
        )]);
        assert_eq!(
            p,
            ["V1__a.sql:2: directive flotilla:no-transaction is given twice"]
        );
    }

    #[test]
    fn transaction_incompatible_statement_is_reported_with_line() {
        let p = problems(&[(
            "V3__index.sql",
            "create table t (a int);\n\n/* build it */\nCREATE INDEX CONCURRENTLY i\n  ON t (a);\n",
        )]);
        assert_eq!(
            p,
            [
                "V3__index.sql:4: CREATE INDEX CONCURRENTLY cannot run inside a transaction block, and line 1 needs one (a script cannot mix both); split the script, or add `-- flotilla:no-transaction` at the top of it"
            ]
        );
    }

    /// Issue 12 (Flyway-compatible folders): a script of nothing but statements that
    /// refuse a transaction block runs outside one without a directive, as Flyway runs
    /// it; the bundle id says so.
    #[test]
    fn a_script_that_only_refuses_transactions_runs_without_one() {
        let b = bundle(&[
            ("V1__t.sql", "create table t (a int);"),
            (
                "V2__index.sql",
                "-- a comment\nCREATE INDEX CONCURRENTLY t_a ON t (a);\nCREATE INDEX CONCURRENTLY t_b ON t (a);",
            ),
            ("V3__vacuum.sql", "VACUUM t;"),
        ])
        .expect("valid as Flyway reads it");
        let d = |i: usize| &b.scripts()[i].directives;
        assert_eq!(d(1).transaction, TransactionUse::NoTransaction);
        assert_eq!(d(2).transaction, TransactionUse::NoTransaction);
        assert_eq!(d(0).transaction, TransactionUse::Transactional);
        assert!(
            d(1).to_string().contains("no-transaction"),
            "in the bundle id"
        );
        assert!(b.warnings().is_empty(), "{:?}", b.warnings());
    }

    #[test]
    fn transaction_control_in_transactional_script() {
        let p = problems(&[("V1__a.sql", "BEGIN;\ncreate table t();\nCOMMIT;\n")]);
        assert_eq!(p.len(), 2);
        assert!(
            p[0].starts_with("V1__a.sql:1: BEGIN in a transactional script"),
            "{p:?}"
        );
        assert!(p[1].starts_with("V1__a.sql:3: COMMIT"), "{p:?}");
        bundle(&[("V1__a.sql", "-- flotilla:no-transaction\nBEGIN;\nvacuum;\n")]).expect("allowed");
    }

    #[test]
    fn bad_names_and_duplicates() {
        let p = problems(&[
            ("V1__a.sql", "select 1;"),
            ("V1.0__b.sql", "select 1;"),
            ("Vx__c.sql", "select 1;"),
            ("V2__.sql", "select 1;"),
            ("migrate.sql", "select 1;"),
            ("V3_d.sql", "select 1;"),
        ]);
        assert_eq!(
            p,
            [
                "V1__a.sql: version 1 is also used by V1.0__b.sql: two scripts cannot share a version",
                "V2__.sql: the description after `__` is empty",
                "V3_d.sql: the name matches neither V<version>__<description>.sql nor R__<description>.sql (nor B<version>__… for a baseline script)",
                "Vx__c.sql: malformed version \"x\": version part \"x\" is not a whole number (versions look like 1, 1_1, 2.3 or 20261122_01)",
                "migrate.sql: the name matches neither V<version>__<description>.sql nor R__<description>.sql (nor B<version>__… for a baseline script)",
            ]
        );
    }

    #[test]
    fn not_utf8_names_the_line() {
        let files = vec![BundleFile {
            name: "V1__a.sql".into(),
            content: b"select 1;\nselect '\xff';\n".to_vec(),
        }];
        match Bundle::from_files(files, "t") {
            Err(BundleError::Invalid(p)) => {
                assert_eq!(p[0].line, Some(2));
                assert!(p[0].message.contains("not valid UTF-8"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unterminated_quote_names_the_line() {
        let p = problems(&[("V1__a.sql", "select 1;\nselect $x$ oops;\n")]);
        assert_eq!(
            p,
            ["V1__a.sql:2: unterminated dollar quote $x$ starting here"]
        );
    }

    #[test]
    fn empty_bundle() {
        assert!(matches!(bundle(&[]), Err(BundleError::Empty { .. })));
    }

    #[test]
    fn oversized_script() {
        let big = "x".repeat(MAX_SCRIPT_BYTES as usize + 1);
        let p = problems(&[("V1__a.sql", &big)]);
        assert!(p[0].contains("over the limit"), "{p:?}");
    }

    #[test]
    fn needless_no_transaction_is_a_warning() {
        let b = bundle(&[("V1__a.sql", "-- flotilla:no-transaction\ncreate table t();")])
            .expect("valid");
        assert_eq!(b.warnings().len(), 1);
        let b = bundle(&[("V1__a.sql", "-- flotilla:no-transaction\nvacuum;")]).expect("valid");
        assert!(b.warnings().is_empty());
    }

    /// Issue 11, case 2: what may run twice after a crash is said, with its line.
    #[test]
    fn a_statement_that_cannot_run_twice_in_a_no_transaction_script_is_a_warning() {
        let b = bundle(&[(
            "V1__a.sql",
            "-- flotilla:no-transaction\nCREATE INDEX CONCURRENTLY i ON t (a);\n\
             CREATE TABLE IF NOT EXISTS u ();\nINSERT INTO u VALUES (1);",
        )])
        .expect("valid");
        let w: Vec<String> = b.warnings().iter().map(|p| p.to_string()).collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("V1__a.sql:4:") && w[0].contains("idempotent"),
            "{w:?}"
        );
    }

    fn with_options(
        files: &[(&str, &[u8])],
        placeholders: &[(&str, &str)],
    ) -> Result<Bundle, BundleError> {
        Bundle::from_files_with(
            files
                .iter()
                .map(|(n, c)| BundleFile {
                    name: n.to_string(),
                    content: c.to_vec(),
                })
                .collect(),
            &BundleOptions {
                placeholders: placeholders
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            },
            "test",
        )
    }

    fn problem_texts(r: Result<Bundle, BundleError>) -> Vec<String> {
        match r {
            Err(BundleError::Invalid(p)) => p.iter().map(|p| p.to_string()).collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    /// Issue 12: placeholders as Flyway replaces them: the folder's defaults, the wave's
    /// over them, built-ins; the checksum stays over the file as written and the id
    /// follows the values; an unresolved one is an error naming file and line.
    #[test]
    fn placeholders_are_replaced_and_part_of_the_id() {
        let conf: &[u8] = b"flyway.placeholders.owner=app_owner\nflyway.table=history\n";
        let script: &[u8] =
            b"-- for ${flyway:filename}\nCREATE TABLE t (id int);\nALTER TABLE t OWNER TO ${owner};\nCOMMENT ON TABLE t IS '${flyway:table}';\n";
        let b = with_options(&[("flyway.conf", conf), ("V1__t.sql", script)], &[]).expect("valid");
        let s = &b.scripts()[0];
        assert!(s.sql.contains("OWNER TO app_owner;"), "{}", s.sql);
        assert!(s.sql.contains("-- for V1__t.sql"), "{}", s.sql);
        assert!(s.sql.contains("IS 'history'"), "{}", s.sql);
        assert_eq!(s.checksum, checksum(script));
        assert_eq!(s.text.as_bytes(), script);
        let over = with_options(
            &[("flyway.conf", conf), ("V1__t.sql", script)],
            &[("owner", "other")],
        )
        .expect("valid");
        assert!(over.scripts()[0].sql.contains("OWNER TO other;"));
        assert_eq!(over.scripts()[0].checksum, s.checksum);
        assert_ne!(over.id(), b.id(), "the wave's values are part of the id");
        assert_eq!(
            over.placeholders().get("owner").map(String::as_str),
            Some("other")
        );

        let p = problem_texts(with_options(&[("V1__t.sql", script)], &[]));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("V1__t.sql:3: no value for placeholder ${owner}"),
            "{p:?}"
        );
        assert!(p[0].contains("--placeholder owner=VALUE"), "{p:?}");
    }

    #[test]
    fn a_plain_folder_keeps_its_id() {
        // Bundles stored before Flyway configs and placeholders existed must reload with
        // the same id: nothing new enters the id unless it is there.
        let plain = bundle(&[("V1__a.sql", "select 1;")]).expect("valid");
        let mut h = Sha256::new();
        h.update(format!("versioned\t1\tV1__a.sql\t{}\t\n", checksum(b"select 1;")).as_bytes());
        assert_eq!(plain.id(), hex::encode(h.finalize()));
    }

    #[test]
    fn tenant_placeholders_wait_for_the_tenant_and_refuse_unsafe_values() {
        let b = bundle(&[(
            "V1__grant.sql",
            "GRANT CONNECT ON DATABASE \"${flyway:database}\" TO ${flyway:user};",
        )])
        .expect("valid");
        assert!(b.has_tenant_placeholders());
        let mut values = BTreeMap::new();
        values.insert("flyway:database", "tenant_0001".to_string());
        values.insert("flyway:user", "app".to_string());
        let filled = b.for_tenant(&values).expect("fills");
        assert_eq!(
            filled.scripts()[0].sql,
            "GRANT CONNECT ON DATABASE \"tenant_0001\" TO app;"
        );
        assert_eq!(filled.id(), b.id());
        values.insert("flyway:database", "x\"; DROP TABLE t; --".to_string());
        let e = b.for_tenant(&values).expect_err("refused");
        assert!(
            e.contains("flyway:database") && e.contains("cannot stand in"),
            "{e}"
        );
        // A user named `concurrently` would turn an index build into another kind of
        // statement: the shape check refuses it even though the name is plain.
        let index =
            bundle(&[("V1__i.sql", "CREATE INDEX ${flyway:user} ON t (c);")]).expect("valid");
        let mut values = BTreeMap::new();
        values.insert("flyway:user", "concurrently".to_string());
        let e = index
            .for_tenant(&values)
            .expect_err("changes the statement");
        assert!(e.contains("change how the script reads"), "{e}");
    }

    #[test]
    fn script_conf_files_and_folder_settings() {
        let cic: &[u8] = b"CREATE INDEX CONCURRENTLY i ON t (c);\nCREATE TABLE u (id int);\n";
        // Mixed: refused without a word, runs outside a transaction with a .conf.
        assert!(!problem_texts(with_options(&[("V1__m.sql", cic)], &[])).is_empty());
        let b = with_options(
            &[
                ("V1__m.sql", cic),
                ("V1__m.sql.conf", b"executeInTransaction=false\n"),
            ],
            &[],
        )
        .expect("valid");
        assert_eq!(
            b.scripts()[0].directives.transaction,
            TransactionUse::NoTransaction
        );
        // The folder's `mixed=true` does the same for every script.
        let b = with_options(
            &[("V1__m.sql", cic), ("flyway.conf", b"flyway.mixed=true\n")],
            &[],
        )
        .expect("valid");
        assert_eq!(
            b.scripts()[0].directives.transaction,
            TransactionUse::NoTransaction
        );
        // A .conf for a script that is not there, or contradicting a directive.
        let p = problem_texts(with_options(
            &[
                ("V1__a.sql", b"-- flotilla:no-transaction\nselect 1;"),
                ("V1__a.sql.conf", b"executeInTransaction=true"),
                ("V2__gone.sql.conf", b"executeInTransaction=false"),
            ],
            &[],
        ));
        assert!(p.iter().any(|p| p.contains("keep one")), "{p:?}");
        assert!(
            p.iter()
                .any(|p| p.starts_with("V2__gone.sql.conf: configures V2__gone.sql")),
            "{p:?}"
        );
        // ISO-8859-1 by the script's .conf: decoded, checksum over the bytes as written.
        let latin1: &[u8] = b"INSERT INTO t VALUES ('caf\xe9');";
        let b = with_options(
            &[
                ("V1__l.sql", latin1),
                ("V1__l.sql.conf", b"encoding=ISO-8859-1"),
            ],
            &[],
        )
        .expect("valid");
        assert!(b.scripts()[0].sql.contains("café"));
        assert_eq!(b.scripts()[0].checksum, checksum(latin1));
        assert_eq!(b.files().len(), 2, "configs travel with the scripts");
    }

    #[test]
    fn flyway_conf_naming_baseline_and_undo_scripts() {
        let b = with_options(
            &[
                (
                    "flyway.conf",
                    b"flyway.sqlMigrationPrefix=M\nflyway.sqlMigrationSuffixes=.pgsql\n",
                ),
                ("M1__a.pgsql", b"select 1;"),
                ("M2__b.pgsql", b"select 2;"),
                ("B2__base.pgsql", b"select 'base';"),
                ("U2__undo_b.pgsql", b"select 'undo';"),
                ("R__v.pgsql", b"select 'v';"),
            ],
            &[],
        )
        .expect("valid");
        let kinds: Vec<_> = b
            .scripts()
            .iter()
            .map(|s| (s.name.as_str(), s.kind.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("B2__base.pgsql", "baseline"),
                ("M1__a.pgsql", "versioned"),
                ("M2__b.pgsql", "versioned"),
                ("R__v.pgsql", "repeatable"),
                ("U2__undo_b.pgsql", "undo")
            ]
        );
        assert_eq!(
            b.versions_without_undo()
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>(),
            ["1"]
        );
        // A baseline script cannot be no-transaction: it records what it covers with it.
        let p = problem_texts(bundle(&[(
            "B1__b.sql",
            "-- flotilla:no-transaction\nselect 1;",
        )]));
        assert!(
            p[0].contains("baseline script runs in one transaction"),
            "{p:?}"
        );
        let p = problem_texts(with_options(
            &[
                ("flyway.conf", b"x"),
                ("flyway.toml", b""),
                ("V1__a.sql", b"select 1;"),
            ],
            &[],
        ));
        assert!(
            p.iter()
                .any(|p| p.contains("both flyway.conf and flyway.toml")),
            "{p:?}"
        );
    }

    /// A byte-order mark is dropped from what runs (PostgreSQL would refuse it) but not
    /// from what is hashed: directives and statement rules see the first line.
    #[test]
    fn a_byte_order_mark_is_not_sql() {
        let text = "\u{feff}CREATE INDEX CONCURRENTLY i ON t (c);\n";
        let b = bundle(&[("V1__i.sql", text)]).expect("valid");
        let s = &b.scripts()[0];
        assert_eq!(s.directives.transaction, TransactionUse::NoTransaction);
        assert!(!s.sql.starts_with('\u{feff}'));
        assert_eq!(s.checksum, checksum(text.as_bytes()));
        let with_directive = "\u{feff}-- flotilla:lock-timeout 2s\nselect 1;";
        let b = bundle(&[("V1__d.sql", with_directive)]).expect("valid");
        assert_eq!(
            b.scripts()[0].directives.lock_timeout,
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn names_with_control_characters_are_refused() {
        let p = problem_texts(bundle(&[("V1__a\tb.sql", "select 1;")]));
        assert!(p.iter().any(|p| p.contains("control characters")), "{p:?}");
    }

    #[test]
    fn a_wave_gives_a_bounded_set_of_placeholders() {
        let many: Vec<(String, String)> =
            (0..1_001).map(|i| (format!("p{i}"), "x".into())).collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        match with_options(&[("V1__a.sql", b"select 1;")], &refs) {
            Err(BundleError::Placeholder(m)) => assert!(m.contains("at most 1000"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
