//! The tenant applier: brings one tenant database up to a bundle, exactly once, with its
//! execution log as the source of truth (PRODUCT.md §5).
//!
//! A run connects, takes the Flotilla advisory lock without waiting (held elsewhere →
//! [`Outcome::Busy`]), reads or creates `flotilla.execution_log`, plans with the pure
//! [`plan`] function, and runs the steps. A transactional script and its log row go in
//! one block, `BEGIN; script; INSERT log row; COMMIT`; consecutive transactional scripts
//! travel in one message (one round trip), a block each, or all in one block in
//! `per-tenant` mode. A `no-transaction` script commits a `started` row, runs statement by
//! statement recording progress, then marks the row `applied`; a run that finds a
//! `started` row resumes at the recorded statement, first dropping an index left
//! `INVALID` by an interrupted `CREATE INDEX CONCURRENTLY` (one that finished after its
//! runner was lost is kept, and the statement counted as done).
//!
//! This module never retries and never sleeps: it reports an [`Outcome`] and leaves the
//! decision to the scheduler. It never trusts anything but the tenant's own log.

pub mod adopt;
pub mod log;
pub mod plan;

use std::time::{Duration, Instant};

use tokio_postgres::SimpleQueryMessage;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::bundle::{Bundle, Callback, Script, TransactionUse, rules};
use crate::connect::{Session, SessionSettings};
use crate::dsn::Dsn;
use crate::failure::{CancelCause, DbFailure, FailureKind, Retryability};
use crate::reach::Reach;
use log::RowIdentity;
pub use plan::{DriftPolicy, OrderPolicy, Plan, PlanError, PlanOptions, StepAction};

/// How transactional scripts are grouped into transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransactionMode {
    /// Each script commits with its log row.
    #[default]
    PerScript,
    /// All transactional scripts of a tenant commit together (split only around
    /// `no-transaction` scripts).
    PerTenant,
}

/// Asks a running tenant to stop: at the next script boundary, or at once.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    boundary: CancellationToken,
    now: CancellationToken,
}

impl StopSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stop before the next script starts; the running one finishes.
    pub fn stop_at_boundary(&self) {
        self.boundary.cancel();
    }

    /// Stop now: also send PostgreSQL's cancel request for the running statement.
    pub fn stop_now(&self) {
        self.boundary.cancel();
        self.now.cancel();
    }

    /// True once any stop was asked for.
    pub fn is_stopping(&self) -> bool {
        self.boundary.is_cancelled()
    }
}

/// One script that committed during the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedScript {
    pub script: String,
    pub version: Option<String>,
    pub duration: Duration,
    /// Rows a batch script changed in all (over every run of it, resumed ones too).
    pub rows: Option<u64>,
}

/// Why a tenant run failed. `retryability` says whether the scheduler may try again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The session could not be opened.
    #[error("{0}")]
    Connect(DbFailure),
    /// Locking, reading or creating the execution log failed.
    #[error("execution log: {0}")]
    Log(DbFailure),
    /// The log has a row Flotilla cannot interpret.
    #[error(transparent)]
    Decode(#[from] log::DecodeError),
    /// The tenant's state forbids applying (drift, out of order, changed interrupted script).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The tenant cannot be undone as asked (a version without an undo script, …).
    #[error(transparent)]
    Undo(#[from] plan::UndoError),
    /// A phase of an undo rehearsal failed: the undo, or applying again after it.
    #[error("undo rehearsal, {phase}: {error}")]
    Rehearsal {
        phase: &'static str,
        error: Box<ApplyError>,
    },
    /// The previous tool's history forbids adopting the tenant (a failed or dirty row,
    /// a script changed since it ran, no history on a database with a schema).
    #[error("adopt: {0}")]
    Adopt(Box<adopt::AdoptError>),
    /// The previous tool's history table could not be read.
    #[error("adopt: reading {table}: {failure}")]
    History { table: String, failure: DbFailure },
    /// A placeholder whose value is the tenant's own (`${flyway:database}`, …) cannot
    /// be filled in on this tenant.
    #[error("placeholder: {0}")]
    TenantPlaceholder(String),
    /// A script failed.
    #[error("{script}{}: {failure}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Script {
        script: String,
        /// 1-based line in the script, where the server or the statement tells.
        line: Option<u32>,
        failure: DbFailure,
    },
}

impl From<adopt::AdoptError> for ApplyError {
    fn from(e: adopt::AdoptError) -> Self {
        ApplyError::Adopt(Box::new(e))
    }
}

impl ApplyError {
    /// True when a script's session broke under it (no answer from the server).
    fn connection_lost(&self) -> bool {
        matches!(self, ApplyError::Script { failure, .. } if failure.is_connection_lost())
    }

    /// Retryable or permanent: the single answer the scheduler acts on.
    pub fn retryability(&self) -> Retryability {
        match self {
            ApplyError::Connect(f)
            | ApplyError::Log(f)
            | ApplyError::History { failure: f, .. }
            | ApplyError::Script { failure: f, .. } => f.retryability,
            ApplyError::Decode(_) => FailureKind::Unexpected.retryability(),
            // The tenant's state forbids applying until a person acts.
            ApplyError::Plan(_)
            | ApplyError::Undo(_)
            | ApplyError::Adopt(_)
            | ApplyError::TenantPlaceholder(_) => FailureKind::Refused.retryability(),
            ApplyError::Rehearsal { error, .. } => error.retryability(),
        }
    }

    /// The SQLSTATE, when the failure came from the server.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ApplyError::Connect(f)
            | ApplyError::Log(f)
            | ApplyError::History { failure: f, .. }
            | ApplyError::Script { failure: f, .. } => f.sqlstate.as_deref(),
            ApplyError::Rehearsal { error, .. } => error.sqlstate(),
            _ => None,
        }
    }

    /// The script that failed, if a script did.
    pub fn script(&self) -> Option<&str> {
        match self {
            ApplyError::Script { script, .. } => Some(script),
            ApplyError::Rehearsal { error, .. } => error.script(),
            _ => None,
        }
    }
}

/// How a tenant run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to do (beyond recording `baselined` scripts: how many).
    UpToDate { notes: Vec<String>, baselined: u32 },
    /// Every pending script applied; `baselined` scripts recorded as done without
    /// running (adopted, `--baseline-version`, covered by a baseline script).
    Applied {
        scripts: Vec<AppliedScript>,
        notes: Vec<String>,
        baselined: u32,
    },
    /// Another session holds the tenant's lock; try later. `holder` says who, read
    /// from `pg_locks`/`pg_stat_activity` when the server would tell.
    Busy { holder: Option<String> },
    /// Stopped by a [`StopSignal`]; `scripts` committed before it.
    Cancelled { scripts: Vec<AppliedScript> },
    /// Failed; `scripts` committed before the failure.
    Failed {
        scripts: Vec<AppliedScript>,
        error: ApplyError,
    },
}

/// Everything one tenant run needs.
#[derive(Debug, Clone)]
pub struct TenantRun<'a> {
    pub bundle: &'a Bundle,
    pub wave_id: &'a str,
    pub dsn: &'a Dsn,
    /// Where the daemon may connect, and with which ambient password.
    pub reach: &'a Reach,
    pub settings: SessionSettings,
    pub mode: TransactionMode,
    pub plan_options: PlanOptions,
    /// `--baseline-version` or `--adopt`: what an empty log records first.
    pub prior: Option<Prior>,
    /// The lock-queue watchdog that watches this run's session, if any.
    pub guard: Option<std::sync::Arc<crate::guard::Guard>>,
    /// How long an application query may wait on this run's session (scripts' own
    /// `max-block` directives override it).
    pub max_block: Duration,
    /// Whether this run undoes versions instead of (or as well as) applying them.
    pub undo: Undo,
}

/// What a tenant run does about undo scripts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Undo {
    /// Apply what is pending; undo scripts do not run.
    #[default]
    None,
    /// Undo every version above this one, newest first, each by its undo script with
    /// its log row marked `undone` in the same transaction (`--undo-to`); nothing is
    /// applied, and no migrate callback runs.
    To(crate::bundle::Version),
    /// Apply what is pending, undo what this run applied, then apply it again
    /// (`--rehearse-undo`, for canaries): the undo scripts are executed on a real
    /// tenant before the rest of the fleet depends on them.
    Rehearse,
}

/// What a tenant whose log is empty records as `baselined` before anything runs: the
/// history Flotilla did not write itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prior {
    /// `--baseline-version V`: every version up to V (a fleet migrated by hand).
    BaselineVersion(crate::bundle::Version),
    /// `--adopt tool[=schema.table]`: what the previous tool's history says ran.
    Adopt(adopt::Source),
}

impl std::fmt::Display for Prior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Prior::BaselineVersion(v) => write!(f, "up to baseline-version {v}"),
            Prior::Adopt(source) => write!(f, "adopted from {source}"),
        }
    }
}

/// What [`Prior`] means for one tenant: the rows to record (none for a new tenant, or
/// an empty history) and what to tell about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorDecision {
    pub rows: Vec<adopt::Recorded>,
    /// Set when nothing is recorded and why is worth telling.
    pub skipped: Option<String>,
}

impl PriorDecision {
    /// The note of a run (`done`) or a plan about what was or would be recorded.
    pub fn describe(&self, prior: &Prior, done: bool) -> Option<String> {
        if let Some(why) = &self.skipped {
            return Some(format!("not baselined: {why}"));
        }
        (!self.rows.is_empty()).then(|| {
            format!(
                "{} {} script{} as baselined (not run), {prior}",
                if done { "recorded" } else { "would record" },
                self.rows.len(),
                if self.rows.len() == 1 { "" } else { "s" },
            )
        })
    }

    /// The rows as the planner reads them, as if they were in the log.
    pub fn log_rows(&self) -> Vec<plan::LogRow> {
        self.rows
            .iter()
            .enumerate()
            .map(|(n, r)| plan::LogRow {
                id: n as i64 + 1,
                version: r.version.clone(),
                script: r.script.clone(),
                kind: r.kind.to_string(),
                checksum: r.checksum.clone(),
                status: plan::LogStatus::Baselined,
                statements_done: None,
            })
            .collect()
    }
}

/// Decides what `prior` records on this tenant, reading on `client` (inside the
/// applier's transaction, or a plan's read-only one): nothing on a database with no
/// schema of its own (a new tenant runs every version); the bundle's versions up to V;
/// or what the previous tool's history says, refused when that history forbids it.
async fn decide_prior(
    client: &tokio_postgres::Client,
    bundle: &Bundle,
    prior: &Prior,
) -> Result<PriorDecision, ApplyError> {
    // The tenant's objects are read as Flotilla's role: nothing of theirs may resolve
    // in place of the catalog's, and no row-security policy of theirs may run.
    client
        .batch_execute("SET LOCAL search_path = pg_catalog, pg_temp; SET LOCAL row_security = off")
        .await
        .map_err(|e| ApplyError::Log(DbFailure::from(&e)))?;
    let own = client
        .simple_query(log::HAS_OWN_SCHEMA_SQL)
        .await
        .map_err(|e| ApplyError::Log(DbFailure::from(&e)))?;
    if first_value(&own).as_deref() != Some("t") {
        return Ok(PriorDecision {
            rows: Vec::new(),
            skipped: Some(
                "the database has no schema of its own (a new tenant): every version runs"
                    .to_string(),
            ),
        });
    }
    let rows = match prior {
        Prior::BaselineVersion(upto) => adopt::baseline_rows(bundle, upto),
        Prior::Adopt(source) => {
            let table = format!("{}.{}", source.schema, source.table);
            let history_error = |e: tokio_postgres::Error| ApplyError::History {
                table: table.clone(),
                failure: DbFailure::from(&e),
            };
            let described = client
                .simple_query(&source.inspect_sql())
                .await
                .map_err(history_error)?;
            let Some(relation) = described.iter().find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some((
                    r.get(0).unwrap_or_default().to_string(),
                    r.get(1) == Some("t"),
                    r.get(2) == Some("t"),
                )),
                _ => None,
            }) else {
                return Err(adopt::AdoptError::NoHistory {
                    tool: source.tool.as_str(),
                    table,
                }
                .into());
            };
            if let Some(reason) = source.refuse_relation(&relation.0, relation.1, relation.2) {
                return Err(adopt::AdoptError::NotAHistory { table, reason }.into());
            }
            let history = client
                .simple_query(&source.read_sql())
                .await
                .map_err(history_error)?;
            let rows = adopt::decide(bundle, source, &adopt::parse_history(&history))?;
            if rows.is_empty() {
                return Ok(PriorDecision {
                    rows,
                    skipped: Some(format!("{table} records nothing the bundle has")),
                });
            }
            rows
        }
    };
    Ok(PriorDecision {
        rows,
        skipped: None,
    })
}

/// Brings the tenant of `run.dsn` up to `run.bundle`.
pub async fn apply_tenant(run: &TenantRun<'_>, stop: &StopSignal) -> Outcome {
    let (outcome, session) = run_session(run, stop).await;
    if let Some(session) = session {
        session.close().await;
    }
    match outcome {
        Outcome::Failed {
            scripts,
            error: error @ ApplyError::Script { .. },
        } if error.connection_lost() => confirm_from_log(run, scripts, error).await,
        other => other,
    }
}

/// The connection broke while a script ran: its COMMIT may have happened without our
/// hearing of it. Ask the log (on a new session) before reporting a failure, so a lost
/// reply is not a failed tenant — with `retries = 0` there would be no second look.
async fn confirm_from_log(
    run: &TenantRun<'_>,
    scripts: Vec<AppliedScript>,
    error: ApplyError,
) -> Outcome {
    let confirmed = match read_log_after_the_lost_run(run).await {
        Ok(rows) => plan::plan(run.bundle, &rows, run.plan_options)
            .ok()
            .filter(|p| p.steps.is_empty()),
        Err(_) => None,
    };
    match confirmed {
        Some(plan) => {
            tracing::info!(error = %error, "the connection was lost, but the log shows every script applied");
            let mut notes = plan.notes;
            notes.push(format!(
                "the connection was lost ({error}); the tenant's log shows every script applied"
            ));
            Outcome::Applied {
                scripts,
                notes,
                baselined: 0,
            }
        }
        None => Outcome::Failed { scripts, error },
    }
}

/// Reads the log on a new session once the lost session's server process has let go of
/// the lock (it may still be running the batch that ends in its COMMIT); the wait is
/// bounded by the session's `lock_timeout`.
async fn read_log_after_the_lost_run(run: &TenantRun<'_>) -> Result<Vec<plan::LogRow>, ApplyError> {
    let session = Session::connect(run.dsn, &run.settings, run.reach)
        .await
        .map_err(ApplyError::Connect)?;
    let result = async {
        let client = session.client();
        client
            .batch_execute(&log::wait_for_lock_sql())
            .await
            .map_err(|e| ApplyError::Log(DbFailure::from(&e)))?;
        match client.simple_query(log::READ_SQL).await {
            Ok(messages) => Ok(log::parse_rows(&messages)?),
            Err(e) => Err(ApplyError::Log(DbFailure::from(&e))),
        }
    }
    .await;
    session.close().await;
    result
}

async fn run_session(run: &TenantRun<'_>, stop: &StopSignal) -> (Outcome, Option<Session>) {
    let session = match Session::connect(run.dsn, &run.settings, run.reach).await {
        Ok(s) => s,
        Err(f) => {
            let failed = Outcome::Failed {
                scripts: Vec::new(),
                error: ApplyError::Connect(f),
            };
            return (failed, None);
        }
    };
    let (log_rows, backend) = match lock_and_read_log(&session, &run.settings).await {
        Ok(Some(read)) => read,
        Ok(None) => {
            let holder = lock_holder(&session).await;
            return (Outcome::Busy { holder }, Some(session));
        }
        Err(error) => {
            let failed = Outcome::Failed {
                scripts: Vec::new(),
                error,
            };
            return (failed, Some(session));
        }
    };
    // Scripts with the tenant's own placeholders get them filled in here, once per run.
    let filled;
    let filled_run;
    let run = if run.bundle.has_tenant_placeholders() {
        filled = match fill_tenant_placeholders(run.bundle, &session).await {
            Ok(b) => b,
            Err(error) => {
                let failed = Outcome::Failed {
                    scripts: Vec::new(),
                    error,
                };
                return (failed, Some(session));
            }
        };
        filled_run = TenantRun {
            bundle: &filled,
            ..run.clone()
        };
        &filled_run
    } else {
        run
    };
    let mut notes = Vec::new();
    let mut baselined = 0u32;
    let log_rows = match &run.prior {
        Some(prior) if !log_rows.is_empty() => {
            notes.push(format!(
                "not baselined: the log already has {} rows ({prior} applies only to an empty log)",
                log_rows.len()
            ));
            log_rows
        }
        Some(prior) => match record_prior(run, prior, &session, &backend).await {
            Ok((decision, rows)) => {
                notes.extend(decision.describe(prior, true));
                if rows.is_some() {
                    baselined = u32::try_from(decision.rows.len()).unwrap_or(u32::MAX);
                }
                rows.unwrap_or(log_rows)
            }
            Err(error) => {
                let failed = Outcome::Failed {
                    scripts: Vec::new(),
                    error,
                };
                return (failed, Some(session));
            }
        },
        None => log_rows,
    };
    let plan = match &run.undo {
        Undo::To(target) => {
            plan::plan_undo(run.bundle, &log_rows, Some(target)).map_err(ApplyError::from)
        }
        Undo::None | Undo::Rehearse => {
            plan::plan(run.bundle, &log_rows, run.plan_options).map_err(ApplyError::from)
        }
    };
    let plan = match plan {
        Ok(p) => p,
        Err(error) => {
            let failed = Outcome::Failed {
                scripts: Vec::new(),
                error,
            };
            return (failed, Some(session));
        }
    };
    notes.extend(plan.notes.iter().cloned());
    // Migrate callbacks are for migrating; an undo wave runs none of them.
    let callbacks = !matches!(run.undo, Undo::To(_)) && run.bundle.has_callbacks();
    if plan.steps.is_empty() && !callbacks {
        return (Outcome::UpToDate { notes, baselined }, Some(session));
    }
    // What a rehearsal undoes back to: the version the tenant had before this run.
    let had = highest_applied(&log_rows);
    // Watched from here on: the scripts are about to take their locks.
    let watch = run.guard.as_ref().and_then(|g| {
        let pid = backend.pid.parse::<i32>().ok()?;
        Some(g.watch(run.dsn, pid, run.max_block))
    });
    let mut runner = Runner {
        run,
        session: &session,
        backend,
        stop,
        watch: watch.as_ref(),
        applied: Vec::new(),
        committed: 0,
        unmet: std::collections::HashSet::new(),
        replaced_rows: std::collections::HashSet::new(),
    };
    // The advisory lock ends with the session: no extra round trip to unlock.
    // Flyway's order: beforeMigrate, the scripts (each between beforeEachMigrate and
    // afterEachMigrate), afterMigrate; afterMigrateError when any of it failed.
    let before = if callbacks {
        runner.callbacks(Callback::BeforeMigrate).await
    } else {
        Ok(false)
    };
    let mut result = match before {
        Ok(false) => runner.execute(&plan).await,
        Ok(true) => Ok(Completion::Stopped),
        Err(e) => Err(e),
    };
    if matches!(result, Ok(Completion::Done))
        && run.undo == Undo::Rehearse
        && !runner.applied.is_empty()
    {
        let forward = runner.applied.len();
        result = runner.rehearse(had.as_ref()).await;
        if matches!(result, Ok(Completion::Done)) {
            let undone: Vec<&str> = runner.applied[forward..]
                .iter()
                .filter(|a| {
                    run.bundle
                        .scripts()
                        .iter()
                        .any(|s| s.name == a.script && s.kind.undo_version().is_some())
                })
                .map(|a| a.script.as_str())
                .collect();
            notes.push(format!(
                "undo rehearsed: {} ran, then the versions were applied again",
                undone.join(", ")
            ));
        }
    }
    if callbacks && matches!(result, Ok(Completion::Done)) {
        result = match runner.callbacks(Callback::AfterMigrate).await {
            Ok(false) => Ok(Completion::Done),
            Ok(true) => Ok(Completion::Stopped),
            Err(e) => Err(e),
        };
    }
    if let Err(error) = &result
        && callbacks
        && !error.connection_lost()
        && run
            .bundle
            .callbacks(Callback::AfterMigrateError)
            .next()
            .is_some()
    {
        // Best effort, after the failed transaction rolled back: its own failure is
        // logged, never put in the place of the error that made the run fail.
        if let Err(e) = runner.callbacks(Callback::AfterMigrateError).await {
            tracing::warn!(error = %e, "afterMigrateError callback failed");
            notes.push(format!("afterMigrateError failed: {e}"));
        }
    }
    let mut unmet: Vec<&String> = runner.unmet.iter().collect();
    unmet.sort();
    for script in unmet {
        if let Some(p) = run
            .bundle
            .scripts()
            .iter()
            .find(|s| &s.name == script)
            .and_then(|s| s.directives.precondition.as_ref())
        {
            notes.push(format!(
                "{script}: precondition not true, {}",
                match p.on_fail {
                    crate::bundle::OnFail::MarkApplied => "recorded as applied without running",
                    _ => "skipped (asked again next wave)",
                }
            ));
        }
    }
    let outcome = match result {
        Ok(Completion::Done) if plan.steps.is_empty() => Outcome::UpToDate { notes, baselined },
        Ok(Completion::Done) => Outcome::Applied {
            baselined: baselined + covered_by_baseline_scripts(run.bundle, &runner.applied),
            scripts: runner.applied,
            notes,
        },
        Ok(Completion::Stopped) => Outcome::Cancelled {
            scripts: runner.applied,
        },
        Err(error) => Outcome::Failed {
            scripts: runner.applied,
            error,
        },
    };
    (outcome, Some(session))
}

/// The highest version the log holds applied (or baselined), latest row per version.
fn highest_applied(log: &[plan::LogRow]) -> Option<crate::bundle::Version> {
    let mut latest: std::collections::HashMap<&str, &plan::LogRow> =
        std::collections::HashMap::new();
    for row in log.iter().filter(|r| r.kind == "versioned") {
        if let Some(v) = row.version.as_deref() {
            let slot = latest.entry(v).or_insert(row);
            if row.id > slot.id {
                *slot = row;
            }
        }
    }
    latest
        .into_iter()
        .filter(|(_, r)| r.status.counts_as_applied())
        .filter_map(|(v, _)| v.parse::<crate::bundle::Version>().ok())
        .max()
}

/// How many versioned scripts the baseline scripts among `applied` recorded.
fn covered_by_baseline_scripts(bundle: &Bundle, applied: &[AppliedScript]) -> u32 {
    let covered = applied
        .iter()
        .filter_map(|a| bundle.scripts().iter().find(|s| s.name == a.script))
        .filter_map(|s| s.kind.baseline_version())
        .map(|b| {
            bundle
                .scripts()
                .iter()
                .filter(|s| s.version().is_some_and(|v| v <= b))
                .count()
        })
        .sum::<usize>();
    u32::try_from(covered).unwrap_or(u32::MAX)
}

/// `bundle` with the tenant's own placeholders (`${flyway:user}`, `${flyway:database}`,
/// …) filled in from what the tenant's server says.
async fn fill_tenant_placeholders(
    bundle: &Bundle,
    session: &Session,
) -> Result<Bundle, ApplyError> {
    use crate::bundle::flyway::TENANT_BUILTINS;
    let sql = format!(
        "SELECT {}",
        TENANT_BUILTINS
            .iter()
            .map(|(_, expr)| *expr)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let messages = session
        .client()
        .simple_query(&sql)
        .await
        .map_err(|e| ApplyError::Log(DbFailure::from(&e)))?;
    let mut values = std::collections::BTreeMap::new();
    for m in &messages {
        if let SimpleQueryMessage::Row(row) = m {
            for (i, (name, _)) in TENANT_BUILTINS.iter().enumerate() {
                if let Some(v) = row.get(i) {
                    values.insert(*name, v.to_string());
                }
            }
        }
    }
    bundle
        .for_tenant(&values)
        .map_err(ApplyError::TenantPlaceholder)
}

/// Records what `prior` says ran as `baselined` rows, in one transaction with the
/// reads that decided them (under the tenant's lock, on a log that was empty), and
/// reads the log again; the log's rows are `None` when nothing was recorded.
async fn record_prior(
    run: &TenantRun<'_>,
    prior: &Prior,
    session: &Session,
    backend: &Backend,
) -> Result<(PriorDecision, Option<Vec<plan::LogRow>>), ApplyError> {
    let client = session.client();
    let rollback = || async {
        let _ = client.batch_execute("ROLLBACK").await;
    };
    // The shape check proves, in this transaction, that the lock is ours and the log
    // still empty; the rows are written by the server process that holds the lock.
    let begin = format!("BEGIN;\n{};\n{}", log::BACKEND_SQL, log::BASELINE_SHAPE_SQL);
    match client.simple_query(&begin).await {
        Ok(rows) => {
            if let Err(e) = backend.same_as(first_value(&rows).as_deref()) {
                rollback().await;
                return Err(e);
            }
        }
        Err(e) => {
            rollback().await;
            return Err(ApplyError::Log(DbFailure::from(&e)));
        }
    }
    let decision = match decide_prior(client, run.bundle, prior).await {
        Ok(d) => d,
        Err(e) => {
            rollback().await;
            return Err(e);
        }
    };
    if decision.rows.is_empty() {
        rollback().await;
        return Ok((decision, None));
    }
    // What would follow must be plannable before anything is recorded: a refused
    // tenant (a gap out of order, drift) is left exactly as it was found.
    if let Err(e) = plan::plan(run.bundle, &decision.log_rows(), run.plan_options) {
        rollback().await;
        return Err(e.into());
    }
    let mut sql = String::new();
    for r in &decision.rows {
        let row = RowIdentity {
            version: r.version.as_deref(),
            script: &r.script,
            kind: r.kind,
            checksum: &r.checksum,
            bundle_id: run.bundle.id(),
            wave_id: run.wave_id,
        };
        sql.push_str(&log::insert_baselined_sql(
            &row,
            &r.source,
            r.applied_by.as_deref(),
            r.applied_at.as_deref(),
        ));
        sql.push('\n');
    }
    sql.push_str("COMMIT;");
    if let Err(e) = client.simple_query(&sql).await {
        rollback().await;
        return Err(ApplyError::Log(DbFailure::from(&e)));
    }
    let rows = client
        .simple_query(log::READ_SQL)
        .await
        .map_err(|e| ApplyError::Log(DbFailure::from(&e)))?;
    let rows = log::parse_rows(&rows)?;
    Ok((decision, Some(rows)))
}

/// What `prior` would record on the tenant of `dsn`, for a dry run: the same reads as
/// a wave's, in a read-only transaction, without the lock.
pub async fn rehearse_prior(
    dsn: &Dsn,
    settings: &SessionSettings,
    reach: &Reach,
    bundle: &Bundle,
    prior: &Prior,
) -> Result<PriorDecision, ApplyError> {
    let session = Session::connect(dsn, settings, reach)
        .await
        .map_err(ApplyError::Connect)?;
    let client = session.client();
    let result = match client.batch_execute("BEGIN READ ONLY").await {
        Ok(()) => decide_prior(client, bundle, prior).await,
        Err(e) => Err(ApplyError::Log(DbFailure::from(&e))),
    };
    let _ = client.batch_execute("ROLLBACK").await;
    session.close().await;
    result
}

/// The total size in bytes (indexes and TOAST included) of each of `tables` (as a
/// safety finding names them) in the tenant's database, for a plan to show what a
/// rewrite or a long lock would touch; `None` for a table that is not there (yet).
/// Takes no lock; reads only the catalog's numbers.
pub async fn table_sizes(
    dsn: &Dsn,
    settings: &SessionSettings,
    reach: &Reach,
    tables: &[String],
) -> Result<Vec<(String, Option<u64>)>, ApplyError> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = tables
        .iter()
        .map(|t| {
            let qualified = t
                .split('.')
                .map(log::quote_ident)
                .collect::<Vec<_>>()
                .join(".");
            log::quote_literal(&qualified)
        })
        .collect();
    let sql = format!(
        "SELECT pg_catalog.pg_total_relation_size(pg_catalog.to_regclass(t))          FROM unnest(ARRAY[{}]::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n",
        names.join(", ")
    );
    let session = Session::connect(dsn, settings, reach)
        .await
        .map_err(ApplyError::Connect)?;
    let result = session.client().simple_query(&sql).await;
    session.close().await;
    let rows = result.map_err(|e| ApplyError::Log(DbFailure::from(&e)))?;
    let sizes = rows.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).and_then(|v| v.parse().ok())),
        _ => None,
    });
    Ok(tables.iter().cloned().zip(sizes).collect())
}

/// Reads the tenant's log for planning without applying anything (a dry run); takes no
/// lock and creates nothing. A tenant without a log has an empty one.
pub async fn read_log(
    dsn: &Dsn,
    settings: &SessionSettings,
    reach: &Reach,
) -> Result<Vec<plan::LogRow>, ApplyError> {
    query_log(dsn, settings, reach, log::READ_SQL, log::parse_rows).await
}

/// Reads the tenant's whole log as operators see it; takes no lock, creates nothing.
pub async fn read_log_entries(
    dsn: &Dsn,
    settings: &SessionSettings,
    reach: &Reach,
) -> Result<Vec<log::LogEntry>, ApplyError> {
    query_log(
        dsn,
        settings,
        reach,
        log::READ_ENTRIES_SQL,
        log::parse_entries,
    )
    .await
}

async fn query_log<T>(
    dsn: &Dsn,
    settings: &SessionSettings,
    reach: &Reach,
    sql: &str,
    parse: fn(&[SimpleQueryMessage]) -> Result<Vec<T>, log::DecodeError>,
) -> Result<Vec<T>, ApplyError> {
    let session = Session::connect(dsn, settings, reach)
        .await
        .map_err(ApplyError::Connect)?;
    let result = match session.client().simple_query(sql).await {
        Ok(messages) => Ok(parse(&messages)?),
        Err(e) => {
            let f = DbFailure::from(&e);
            if log::is_missing_log(f.sqlstate.as_deref()) {
                Ok(Vec::new())
            } else {
                Err(ApplyError::Log(f))
            }
        }
    };
    session.close().await;
    result
}

/// Takes the lock, ensures the log exists and reads it, in one pipelined round trip;
/// `None` when busy.
///
/// The three are separate statements sent back to back, each in its own implicit
/// transaction, so the read's snapshot is taken after the lock is held: a runner that
/// just finished and released the lock cannot be missed. The ensure step only creates
/// what is missing; when we turn out not to hold the lock its outcome is ignored.
async fn lock_and_read_log(
    session: &Session,
    settings: &SessionSettings,
) -> Result<Option<(Vec<plan::LogRow>, Backend)>, ApplyError> {
    let client = session.client();
    let lock_sql = log::try_lock_sql();
    let (locked, ensured, read, after) = tokio::join!(
        client.simple_query(&lock_sql),
        client.simple_query(log::ENSURE_IF_MISSING_SQL),
        client.simple_query(log::READ_SQL),
        client.simple_query(log::BACKEND_SQL)
    );
    let locked = locked.map_err(|e| ApplyError::Log(DbFailure::from(&e)))?;
    let values = first_row(&locked);
    if values.first().map(String::as_str) != Some("t") {
        return Ok(None);
    }
    let backend = Backend::check(&values[1..], settings)?;
    let after = after.map_err(|e| ApplyError::Log(DbFailure::from(&e)))?;
    backend.same_as(first_value(&after).as_deref())?;
    match read {
        Ok(messages) => Ok(Some((log::parse_rows(&messages)?, backend))),
        Err(e) => {
            let f = DbFailure::from(&e);
            if !log::is_missing_log(f.sqlstate.as_deref()) {
                return Err(ApplyError::Log(f));
            }
            // The ensure step failed (its error says why) or raced a runner that did
            // not hold the lock; we hold it now, so create plainly and start empty.
            if let Err(e) = ensured {
                tracing::debug!(error = %DbFailure::from(&e), "ensuring the log failed; retrying under the lock");
            }
            client
                .batch_execute(log::ENSURE_SQL)
                .await
                .map_err(|e| ApplyError::Log(DbFailure::from(&e)))?;
            Ok(Some((Vec::new(), backend)))
        }
    }
}

/// Who holds the Flotilla lock on this tenant, in words, if the server tells.
async fn lock_holder(session: &Session) -> Option<String> {
    let rows = session
        .client()
        .simple_query(&log::lock_holder_sql())
        .await
        .ok()?;
    let v = first_row(&rows);
    let [pid, app, from, since, state] = v.as_slice() else {
        return None;
    };
    Some(format!(
        "advisory lock held by pid {pid} (application_name {app:?}, from {from}, session started {since}, {state})"
    ))
}

/// The server process a run's session is attached to, and proof that the session's
/// startup settings reached it. A connection pooler in transaction mode breaks both:
/// it may drop the startup `options` (our timeouts) and hand each transaction to
/// another backend (so the session advisory lock protects nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Backend {
    pid: String,
}

impl Backend {
    /// From the lock query's `pg_backend_pid(), lock_timeout in ms, reused, mark`.
    fn check(values: &[String], settings: &SessionSettings) -> Result<Self, ApplyError> {
        let [pid, lock_timeout_ms, reused, _mark] = values else {
            return Err(pooler("the lock query returned an unexpected row"));
        };
        if reused == "t" {
            // A new session cannot carry the mark: this server session was shared.
            return Err(pooler(&format!(
                "server process {pid} was already used by another Flotilla session"
            )));
        }
        let want = settings.lock_timeout.as_millis().to_string();
        if *lock_timeout_ms != want {
            return Err(pooler(&format!(
                "the session's lock_timeout is {lock_timeout_ms} ms, not the {want} ms Flotilla set in its startup options"
            )));
        }
        Ok(Self { pid: pid.clone() })
    }

    /// Fails when a statement of this run ran on another backend.
    fn same_as(&self, pid: Option<&str>) -> Result<(), ApplyError> {
        match pid {
            Some(p) if p == self.pid => Ok(()),
            Some(p) => Err(pooler(&format!(
                "statements of one run reached two server processes (pid {} then {p})",
                self.pid
            ))),
            None => Err(pooler("a statement did not report its server process")),
        }
    }
}

/// The permanent, instructive error for a session that is not a real session.
fn pooler(what: &str) -> ApplyError {
    ApplyError::Log(DbFailure::of_kind(
        FailureKind::Refused,
        format!(
            "{what}: this looks like a connection pooler in transaction (or statement) mode; \
             Flotilla needs a direct or session-pooled connection (its advisory lock and \
             session settings live in one server session)"
        ),
    ))
}

/// Every column of the first row, as text (NULL as empty).
fn first_row(messages: &[SimpleQueryMessage]) -> Vec<String> {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or_default().to_string())
                    .collect(),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

enum Completion {
    Done,
    Stopped,
}

/// Why one batch did not complete.
/// What a soft stop does to a batch that is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SoftStop {
    /// Nothing: it takes effect after the batch (between scripts, between messages).
    AfterIt,
    /// Cancels it: the batch is one atomic block, which then rolls back whole.
    CancelsIt,
}

enum BatchError {
    Db(tokio_postgres::Error),
    /// A hard stop cancelled the running statement.
    Cancelled,
}

struct Runner<'r, 'a> {
    run: &'r TenantRun<'a>,
    session: &'r Session,
    backend: Backend,
    stop: &'r StopSignal,
    watch: Option<&'r crate::guard::Watch>,
    applied: Vec<AppliedScript>,
    /// Scripts committed in this run (applied, or recorded as skipped or marked).
    committed: usize,
    /// Scripts whose precondition was found not true (`on-fail=skip|mark-applied`):
    /// recorded instead of run when their block is sent again.
    unmet: std::collections::HashSet<String>,
    /// Versions whose `skipped` or `undone` row goes when they are recorded again.
    replaced_rows: std::collections::HashSet<String>,
}

impl Runner<'_, '_> {
    async fn execute(&mut self, plan: &Plan) -> Result<Completion, ApplyError> {
        let scripts = self.run.bundle.scripts();
        self.replaced_rows = plan
            .replaced
            .iter()
            .map(|&i| scripts[i].name.clone())
            .collect();
        let mut i = 0;
        while i < plan.steps.len() {
            if self.stop.is_stopping() {
                return Ok(Completion::Stopped);
            }
            let step = &plan.steps[i];
            let script = &scripts[step.script];
            if script.directives.batch {
                let span = script_span(&[script]);
                let stopped = self
                    .run_batches(script, &step.action)
                    .instrument(span.clone())
                    .await;
                if traced(&span, stopped)? {
                    return Ok(Completion::Stopped);
                }
                i += 1;
                continue;
            }
            if script.directives.transaction == TransactionUse::NoTransaction {
                let span = script_span(&[script]);
                let stopped = self
                    .run_without_transaction(script, &step.action)
                    .instrument(span.clone())
                    .await;
                if traced(&span, stopped)? {
                    return Ok(Completion::Stopped);
                }
                i += 1;
                continue;
            }
            // Consecutive transactional scripts go in one message: a block each in
            // per-script mode (at most a few, so a soft stop is not long in coming), all
            // of them in one block in per-tenant mode.
            let mut end = i + 1;
            let limit = match self.run.mode {
                TransactionMode::PerTenant => usize::MAX,
                TransactionMode::PerScript => SCRIPTS_PER_MESSAGE,
            };
            let mut bytes = scripts[step.script].sql.len();
            while end < plan.steps.len()
                && end - i < limit
                && scripts[plan.steps[end].script].directives.transaction
                    == TransactionUse::Transactional
                && !scripts[plan.steps[end].script].directives.batch
                && (self.run.mode == TransactionMode::PerTenant
                    || bytes + scripts[plan.steps[end].script].sql.len() <= BYTES_PER_MESSAGE)
            {
                bytes += scripts[plan.steps[end].script].sql.len();
                end += 1;
            }
            let group: Vec<&Script> = plan.steps[i..end]
                .iter()
                .map(|s| &*scripts[s.script])
                .collect();
            let blocks: Vec<Vec<&Script>> = match self.run.mode {
                TransactionMode::PerTenant => vec![group.clone()],
                TransactionMode::PerScript => group.iter().map(|s| vec![*s]).collect(),
            };
            let span = script_span(&group);
            let committed_before = self.committed;
            let stopped = match self.run_message(&blocks).instrument(span.clone()).await {
                // A precondition that is not true, of a script that is then skipped or
                // marked: the message stopped at it (its block rolled back); send the
                // rest again from the first script that did not commit, this one
                // recorded instead of run.
                Err(ApplyError::Script {
                    ref script,
                    ref failure,
                    ..
                }) if failure.sqlstate.as_deref() == Some(log::PRECONDITION_SQLSTATE)
                    && !self.unmet.contains(script)
                    && group.iter().any(|s| {
                        &s.name == script
                            && s.directives
                                .precondition
                                .as_ref()
                                .is_some_and(|p| p.on_fail != crate::bundle::OnFail::Fail)
                    }) =>
                {
                    self.unmet.insert(script.clone());
                    i += self.committed - committed_before;
                    continue;
                }
                other => other,
            };
            if traced(&span, stopped)? {
                return Ok(Completion::Stopped);
            }
            i = end;
        }
        Ok(Completion::Done)
    }

    /// Runs `sql`; a hard stop sends a cancel request and waits for the server's answer.
    async fn batch(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>, BatchError> {
        let mut got = Vec::new();
        self.batch_partial(sql, SoftStop::AfterIt, &mut |m| got.push(m))
            .await
            .map(|()| got)
    }

    /// Runs `sql`, handing each message of the answer to `each` as it streams (so what
    /// came before an error is known), under the hard stop, the watchdog, and the soft
    /// stop as `soft_stop` says.
    async fn batch_partial(
        &self,
        sql: &str,
        soft_stop: SoftStop,
        each: &mut (dyn FnMut(SimpleQueryMessage) + Send),
    ) -> Result<(), BatchError> {
        use futures_util::StreamExt as _;
        // A trip that came after the last statement finished is about nothing that
        // still runs: this batch starts clean.
        if let Some(w) = self.watch {
            w.clear();
        }
        let query = async {
            let stream = self.session.client().simple_query_raw(sql).await?;
            futures_util::pin_mut!(stream);
            while let Some(message) = stream.next().await {
                each(message?);
            }
            Ok::<(), tokio_postgres::Error>(())
        };
        tokio::pin!(query);
        let tripped = async {
            match self.watch {
                Some(w) => w.tripped().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // The answer first: a statement that finished is not cancelled after it.
            biased;
            result = &mut query => result.map_err(BatchError::Db),
            _ = tripped => {
                // An application waits on us past max_block: our statement goes (its
                // transaction rolls back) and the failure says why.
                self.session.cancel_running_statement().await;
                let result = query.await;
                if result.is_ok()
                    && let Some(w) = self.watch
                {
                    // It finished before the cancel arrived: the block is over.
                    w.clear();
                }
                result.map_err(BatchError::Db)
            }
            _ = self.stop.now.cancelled() => self.cancel_and_wait(query.as_mut()).await,
            _ = self.stop.boundary.cancelled(), if soft_stop == SoftStop::CancelsIt => {
                self.cancel_and_wait(query.as_mut()).await
            }
        }
    }

    /// Cancels the running statement for a stop and waits for the server's answer.
    async fn cancel_and_wait<F>(&self, query: std::pin::Pin<&mut F>) -> Result<(), BatchError>
    where
        F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
    {
        self.session.cancel_running_statement().await;
        match query.await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
                Err(BatchError::Cancelled)
            }
            Err(e) => Err(BatchError::Db(e)),
        }
    }

    /// The watchdog's limit while `script` runs: its `max-block` directive, or the run's.
    fn watch_for(&self, script: &Script) {
        if let Some(w) = self.watch {
            w.set_max_block(script.directives.max_block.unwrap_or(self.run.max_block));
        }
    }

    /// Leaves a failed transaction block; the session may be gone, so errors are moot.
    async fn rollback(&self) {
        let _ = self.session.client().batch_execute("ROLLBACK").await;
    }

    fn identity<'s>(&'s self, script: &'s Script, version: Option<&'s str>) -> RowIdentity<'s> {
        RowIdentity {
            version,
            script: &script.name,
            kind: script.kind.as_str(),
            checksum: &script.checksum,
            bundle_id: self.run.bundle.id(),
            wave_id: self.run.wave_id,
        }
    }

    /// The log rows a transactional script commits with: its `applied` row; for a
    /// baseline script (kind `baseline`), also one `baselined` row per version it
    /// covers, which is what later runs plan against.
    fn log_rows_sql(&self, script: &Script) -> String {
        if let Some(undoes) = script.kind.undo_version() {
            return log::mark_undone_sql(
                &undoes.to_string(),
                self.run.bundle.id(),
                self.run.wave_id,
            );
        }
        let Some(covers) = script.kind.baseline_version() else {
            let version = script.version().map(|v| v.to_string());
            return log::insert_applied_sql(&self.identity(script, version.as_deref()));
        };
        let own_version = covers.to_string();
        let mut sql = log::insert_applied_sql(&self.identity(script, Some(&own_version)));
        let source = format!(
            "baseline script {} (sha256 {})",
            script.name, script.checksum
        );
        for covered in self
            .run
            .bundle
            .scripts()
            .iter()
            .filter(|s| s.version().is_some_and(|v| v <= covers))
        {
            let version = covered.version().map(|v| v.to_string());
            sql.push('\n');
            sql.push_str(&log::insert_baselined_sql(
                &self.identity(covered, version.as_deref()),
                &source,
                None,
                None,
            ));
        }
        sql
    }

    fn timeout_overrides(&self, script: &Script, scope: &str) -> String {
        let mut sql = String::new();
        if let Some(d) = script.directives.lock_timeout {
            sql.push_str(&format!("SET {scope}lock_timeout = {};\n", d.as_millis()));
        }
        if let Some(d) = script.directives.statement_timeout {
            sql.push_str(&format!(
                "SET {scope}statement_timeout = {};\n",
                d.as_millis()
            ));
        }
        sql
    }

    fn restore_timeouts(&self, script: &Script) -> String {
        let s = &self.run.settings;
        let mut sql = String::new();
        if script.directives.lock_timeout.is_some() {
            sql.push_str(&format!(
                "SET LOCAL lock_timeout = {};\n",
                s.lock_timeout.as_millis()
            ));
        }
        if script.directives.statement_timeout.is_some() {
            sql.push_str(&format!(
                "SET LOCAL statement_timeout = {};\n",
                s.statement_timeout.as_millis()
            ));
        }
        sql
    }

    /// Runs consecutive transactional scripts in one message, one round trip: `blocks`
    /// of scripts, each block its own `BEGIN … COMMIT` (a script per block in
    /// per-script mode, the whole run in one block in per-tenant mode), each script with
    /// its start row, its `SET LOCAL`s and its log row. PostgreSQL commits each block on
    /// its own and skips the rest of the message at the first error, so per-script
    /// atomicity and stop-at-the-first-failure hold as with one message per script. The
    /// answer, read as it streams, says how far the message got: each script's start row
    /// names it, and its log row returns its duration and transaction id; after an
    /// error, the last block whose log rows came back is asked (`txid_status`) whether
    /// its COMMIT happened (a cancel arriving during a COMMIT strikes after it). Returns
    /// true when a stop interrupted it.
    async fn run_message(&mut self, blocks: &[Vec<&Script>]) -> Result<bool, ApplyError> {
        // Every script of the message, in order, with its block.
        let flat: Vec<(usize, &Script)> = blocks
            .iter()
            .enumerate()
            .flat_map(|(b, block)| block.iter().map(move |s| (b, *s)))
            .collect();
        let max_blocks: Vec<Duration> = flat
            .iter()
            .map(|(_, s)| s.directives.max_block.unwrap_or(self.run.max_block))
            .collect();
        let mut message = MessageText::default();
        // Where each script's own text starts in the message, in characters (the unit
        // of an error's position).
        let mut script_at: Vec<usize> = Vec::with_capacity(flat.len());
        let mut n = 0usize;
        for block in blocks {
            message.push("BEGIN;\n");
            for script in block {
                message.push(&log::script_start_sql(n));
                message.push("\n");
                message.push(&log::mark_start_sql());
                message.push("\n");
                if script.kind.baseline_version().is_some() {
                    // Proves the lock is ours and the log still empty, and lets the log
                    // hold `baseline` and `baselined` rows.
                    message.push(log::BASELINE_SHAPE_SQL);
                    message.push("\n");
                }
                message.push(&self.replaced_row_sql(script));
                if let Some(p) = &script.directives.precondition
                    && self.unmet.contains(&script.name)
                {
                    // Recorded, not run: the precondition is asked once more, in this
                    // transaction, so a script is never recorded skipped while true.
                    script_at.push(message.chars);
                    message.push(&log::precondition_still_false_sql(&script.name, &p.sql));
                    message.push("\n");
                    message.push(&self.unmet_row_sql(script, p));
                    message.push("\n");
                    n += 1;
                    continue;
                }
                message.push(&self.timeout_overrides(script, "LOCAL "));
                // In a DO block: an error in the precondition is reported by its own
                // position (inside the block), never as a position in the message.
                if let Some(p) = &script.directives.precondition {
                    message.push(&log::precondition_check_sql(&script.name, &p.sql));
                    message.push("\n");
                }
                // Migrate callbacks go around migrations, not undo scripts.
                let migrating = script.kind.undo_version().is_none();
                if migrating {
                    message.push(&self.each_callbacks_sql(Callback::BeforeEachMigrate));
                }
                script_at.push(message.chars);
                message.push(&script.sql);
                // A newline first: the script may end in a `--` comment.
                message.push("\n;\n");
                if migrating {
                    message.push(&self.each_callbacks_sql(Callback::AfterEachMigrate));
                }
                message.push(&self.restore_timeouts(script));
                message.push(&self.log_rows_sql(script));
                message.push("\n");
                n += 1;
            }
            message.push("COMMIT;\n");
        }
        let started = Instant::now();
        let mut progress = Progress::new(flat.len());
        // Per-tenant mode is one atomic block: a soft stop rolls it back, as it did at
        // the next script boundary when its scripts went one round trip each.
        let soft_stop = match self.run.mode {
            TransactionMode::PerTenant => SoftStop::CancelsIt,
            TransactionMode::PerScript => SoftStop::AfterIt,
        };
        let watch = self.watch;
        let result = self
            .batch_partial(&message.sql, soft_stop, &mut |m| {
                // Each script's own max_block from the moment it starts.
                if let Some(i) = progress.read(&m)
                    && let (Some(w), Some(limit)) = (watch, max_blocks.get(i))
                {
                    w.set_max_block(*limit);
                }
            })
            .await;
        // The statements of one run must reach the server process holding its lock.
        for pid in &progress.backends {
            if let Err(e) = self.backend.same_as(Some(pid)) {
                if result.is_err() {
                    self.rollback().await;
                }
                return Err(e);
            }
        }
        let error = match result {
            Ok(()) => {
                self.push_applied(&flat, &progress, blocks.len());
                tracing::debug!(scripts = flat.len(), elapsed = ?started.elapsed(), "message committed");
                return Ok(false);
            }
            Err(error) => error,
        };
        let position = match &error {
            BatchError::Db(e) => e.as_db_error().and_then(|db| match db.position() {
                Some(tokio_postgres::error::ErrorPosition::Original(pos)) => Some(*pos),
                _ => None,
            }),
            BatchError::Cancelled => None,
        };
        self.rollback().await;
        let lost = matches!(&error, BatchError::Db(e) if e.is_closed());
        if progress.reached.is_none() && !lost && flat.len() > 1 {
            // Refused before any of it ran: PostgreSQL parses a whole message first. A
            // position says whose the syntax error is; the scripts before it run as they
            // would one message each. Without one, each block goes on its own.
            let culprit = position.and_then(|pos| {
                script_at
                    .iter()
                    .rposition(|at| (pos as usize).saturating_sub(1) >= *at)
            });
            if let (Some(i), BatchError::Db(e)) = (culprit, &error) {
                let failed_block = flat[i].0;
                if failed_block > 0 && Box::pin(self.run_message(&blocks[..failed_block])).await? {
                    return Ok(true);
                }
                let script = flat[i].1;
                return Err(ApplyError::Script {
                    script: script.name.clone(),
                    line: position.and_then(|pos| line_in_message(&script_at, i, script, pos)),
                    failure: self.failure(script, e, started.elapsed()),
                });
            }
            if culprit.is_none() && matches!(error, BatchError::Db(_)) {
                for block in blocks {
                    if Box::pin(self.run_message(std::slice::from_ref(block))).await? {
                        return Ok(true);
                    }
                }
                return Ok(false);
            }
        }
        // Blocks before the one the message stopped in committed (their COMMIT came
        // before the next block's start row). That one too, if its log rows came back
        // and its transaction says so: a cancel meant for it can strike just after.
        let reached = progress
            .reached
            .unwrap_or(0)
            .min(flat.len().saturating_sub(1));
        let mut stopped_block = flat.get(reached).map(|(b, _)| *b).unwrap_or(0);
        let last_of_block = flat
            .iter()
            .rposition(|(b, _)| *b == stopped_block)
            .unwrap_or(reached);
        if let Some(xid) = progress.xids.get(last_of_block).cloned().flatten()
            && self.committed(&xid).await
        {
            stopped_block += 1;
        }
        self.push_applied(&flat, &progress, stopped_block);
        // The script that failed: the one that was running, in the block that did not
        // commit; the first of the next block when a cancel struck after a COMMIT.
        let failed = if flat.get(reached).is_some_and(|(b, _)| *b == stopped_block) {
            Some(reached)
        } else {
            flat.iter().position(|(b, _)| *b == stopped_block)
        };
        let Some(failed) = failed else {
            // Every block committed: what struck came after the last COMMIT.
            return Ok(matches!(error, BatchError::Cancelled));
        };
        let script = flat[failed].1;
        match error {
            BatchError::Cancelled => Ok(true),
            BatchError::Db(e) => {
                // How long the script had run, by the server's clock: told apart from a
                // statement_timeout only for a cancel, one more round trip.
                let mut ran = started.elapsed();
                if DbFailure::from(&e).is_cancelled_statement()
                    && let Some(start) = progress.started_at[failed]
                    && let Ok(rows) = self
                        .session
                        .client()
                        .simple_query(log::SERVER_NOW_SQL)
                        .await
                    && let Some(now) = first_value(&rows).and_then(|v| v.parse::<f64>().ok())
                {
                    ran = Duration::from_secs_f64((now - start).max(0.0));
                }
                Err(ApplyError::Script {
                    script: script.name.clone(),
                    line: position.and_then(|pos| line_in_message(&script_at, failed, script, pos)),
                    failure: self.failure(script, &e, ran),
                })
            }
        }
    }

    /// The second and third parts of an undo rehearsal, after the forward run applied
    /// something: undo every version above `had` (what the tenant had before), then
    /// apply again what is pending. Each part plans from the log as it is then.
    async fn rehearse(
        &mut self,
        had: Option<&crate::bundle::Version>,
    ) -> Result<Completion, ApplyError> {
        let wrap = |phase: &'static str| {
            move |error: ApplyError| ApplyError::Rehearsal {
                phase,
                error: Box::new(error),
            }
        };
        let log = self.read_log().await.map_err(wrap("reading the log"))?;
        let undo =
            plan::plan_undo(self.run.bundle, &log, had).map_err(|e| wrap("undo")(e.into()))?;
        match self.execute(&undo).await.map_err(wrap("undo"))? {
            Completion::Done => {}
            Completion::Stopped => return Ok(Completion::Stopped),
        }
        let log = self.read_log().await.map_err(wrap("reading the log"))?;
        let again = plan::plan(self.run.bundle, &log, self.run.plan_options)
            .map_err(|e| wrap("applying again")(e.into()))?;
        self.execute(&again).await.map_err(wrap("applying again"))
    }

    /// The log as it is now (the lock is held: no other runner changes it).
    async fn read_log(&self) -> Result<Vec<plan::LogRow>, ApplyError> {
        let messages = self
            .session
            .client()
            .simple_query(log::READ_SQL)
            .await
            .map_err(|e| ApplyError::Log(DbFailure::from(&e)))?;
        Ok(log::parse_rows(&messages)?)
    }

    /// Runs the callbacks of `event`, each in a transaction of its own. True when a stop
    /// interrupted them.
    async fn callbacks(&mut self, event: Callback) -> Result<bool, ApplyError> {
        let bundle = self.run.bundle;
        for callback in bundle.callbacks(event) {
            if self.stop.is_stopping() && event != Callback::AfterMigrateError {
                return Ok(true);
            }
            self.watch_for(callback);
            let mut message = MessageText::default();
            message.push("BEGIN;\n");
            message.push(&self.timeout_overrides(callback, "LOCAL "));
            let at = message.chars;
            message.push(&callback.sql);
            message.push("\n;\nCOMMIT;");
            let started = Instant::now();
            match self.batch(&message.sql).await {
                Ok(_) => {}
                Err(BatchError::Cancelled) => {
                    self.rollback().await;
                    return Ok(true);
                }
                Err(BatchError::Db(e)) => {
                    self.rollback().await;
                    let line = e.as_db_error().and_then(|db| match db.position() {
                        Some(tokio_postgres::error::ErrorPosition::Original(pos)) => {
                            line_in_message(&[at], 0, callback, *pos)
                        }
                        _ => None,
                    });
                    return Err(ApplyError::Script {
                        script: callback.name.clone(),
                        line,
                        failure: self.failure(callback, &e, started.elapsed()),
                    });
                }
            }
        }
        Ok(false)
    }

    /// The `beforeEachMigrate` (or `afterEachMigrate`) callbacks' text, to run in a
    /// script's own transaction.
    fn each_callbacks_sql(&self, event: Callback) -> String {
        let mut sql = String::new();
        for callback in self.run.bundle.callbacks(event) {
            sql.push_str(&callback.sql);
            // A newline first: the callback may end in a `--` comment.
            sql.push_str("\n;\n");
        }
        sql
    }

    /// Deletes the `skipped` or `undone` row of the script's version, if the plan saw
    /// one, before a new row of that version is written in the same transaction (one
    /// row per version: the log's unique index). Empty otherwise.
    fn replaced_row_sql(&self, script: &Script) -> String {
        match script.version() {
            Some(version) if self.replaced_rows.contains(&script.name) => {
                format!("{}\n", log::delete_replaced_sql(&version.to_string()))
            }
            _ => String::new(),
        }
    }

    /// The row of a script whose precondition is not true: `skipped`, or `baselined`
    /// for `on-fail=mark-applied`; `source` names the precondition.
    fn unmet_row_sql(&self, script: &Script, p: &crate::bundle::Precondition) -> String {
        let version = script.version().map(|v| v.to_string());
        let row = self.identity(script, version.as_deref());
        let source = format!(
            "precondition not true (on-fail={}): {}",
            p.on_fail.as_str(),
            p.sql
        );
        match p.on_fail {
            crate::bundle::OnFail::MarkApplied => {
                log::insert_baselined_sql(&row, &source, None, None)
            }
            _ => log::insert_skipped_sql(&row, &source),
        }
    }

    /// The scripts of the blocks before `upto_block` as applied, with their durations
    /// (those recorded without running, their precondition not true, only counted).
    fn push_applied(&mut self, flat: &[(usize, &Script)], progress: &Progress, upto_block: usize) {
        for (i, (b, script)) in flat.iter().enumerate() {
            if *b < upto_block {
                self.committed += 1;
                if self.unmet.contains(&script.name) {
                    continue;
                }
                self.applied.push(AppliedScript {
                    script: script.name.clone(),
                    version: script
                        .version()
                        .or(script.kind.baseline_version())
                        .map(|v| v.to_string()),
                    duration: Duration::from_millis(
                        progress.durations.get(i).copied().flatten().unwrap_or(0),
                    ),
                    rows: None,
                });
            }
        }
    }

    /// Whether transaction `xid` committed (one round trip, after an interrupted message).
    async fn committed(&self, xid: &str) -> bool {
        let Ok(xid) = xid.parse::<u64>() else {
            return false;
        };
        match self
            .session
            .client()
            .simple_query(&format!("SELECT txid_status({xid})"))
            .await
        {
            Ok(rows) => first_value(&rows).as_deref() == Some("committed"),
            Err(_) => false,
        }
    }

    /// Runs a `batch` script: its `started` row first, then its statement again and
    /// again, each run a short transaction of its own that also records the run's rows
    /// in the row, resting `batch-pause` between runs, until a run changes nothing. A
    /// resumed script simply goes on (the statement's own WHERE is the cursor). Returns
    /// true when a stop interrupted it between two runs (its `started` row stays).
    async fn run_batches(
        &mut self,
        script: &Script,
        action: &StepAction,
    ) -> Result<bool, ApplyError> {
        let version = script.version().map(|v| v.to_string());
        self.watch_for(script);
        let started = Instant::now();
        let fail = |e: BatchError, ran: Duration| -> Result<bool, ApplyError> {
            match e {
                BatchError::Cancelled => Ok(true),
                BatchError::Db(e) => Err(ApplyError::Script {
                    script: script.name.clone(),
                    line: None,
                    failure: self.failure(script, &e, ran),
                }),
            }
        };
        let statement = script
            .executable_statements()
            .next()
            .map(|s| s.sql(&script.sql))
            .unwrap_or_default();
        let log_id = match action {
            StepAction::Resume { log_id, .. } => *log_id,
            StepAction::Apply | StepAction::Reapply | StepAction::Supersede { .. } => {
                // The row first: its id is the first value of the answer, whatever a
                // callback returns.
                let sql = format!(
                    "{}{}\n{}",
                    self.replaced_row_sql(script),
                    log::insert_started_sql(&self.identity(script, version.as_deref())),
                    self.each_callbacks_sql(Callback::BeforeEachMigrate),
                );
                match self.batch(&sql).await {
                    Ok(rows) => {
                        first_value(&rows)
                            .and_then(|v| v.parse().ok())
                            .ok_or_else(|| {
                                ApplyError::Log(DbFailure::of_kind(
                                    FailureKind::Unexpected,
                                    "inserting the started row returned no id",
                                ))
                            })?
                    }
                    Err(e) => return fail(e, Duration::ZERO),
                }
            }
        };
        let overrides = self.timeout_overrides(script, "LOCAL ");
        let pause = script.directives.batch_pause.unwrap_or(Duration::ZERO);
        let mut runs = 0u64;
        loop {
            if runs > 0 && self.stop.is_stopping() {
                return Ok(true);
            }
            let mut sql = log::batch_run_sql(log_id, statement);
            if !overrides.is_empty() {
                sql = sql.replacen("BEGIN;\n", &format!("BEGIN;\n{overrides}"), 1);
            }
            let run_started = Instant::now();
            let rows = match self.batch(&sql).await {
                Ok(messages) => {
                    let values = first_row(&messages);
                    self.backend.same_as(values.get(1).map(String::as_str))?;
                    values
                        .first()
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| {
                            ApplyError::Log(DbFailure::of_kind(
                                FailureKind::Unexpected,
                                "a batch run returned no row count",
                            ))
                        })?
                }
                Err(e) => {
                    self.rollback().await;
                    return fail(e, run_started.elapsed());
                }
            };
            runs += 1;
            if rows == 0 {
                break;
            }
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.stop.boundary.cancelled() => return Ok(true),
                    _ = self.stop.now.cancelled() => return Ok(true),
                }
            }
        }
        // The count first: it is the first value of the answer, whatever a callback
        // returns.
        let finish = format!(
            "{}\n{}\n{}{}",
            log::RESET_SESSION_SQL,
            log::rows_changed_sql(log_id),
            self.each_callbacks_sql(Callback::AfterEachMigrate),
            log::finish_started_sql(
                log_id,
                &self.identity(script, version.as_deref()),
                started.elapsed().as_millis(),
            ),
        );
        let total = match self.batch(&finish).await {
            Ok(messages) => first_value(&messages).and_then(|v| v.parse::<u64>().ok()),
            Err(e) => return fail(e, Duration::ZERO),
        };
        self.committed += 1;
        self.applied.push(AppliedScript {
            script: script.name.clone(),
            version,
            duration: started.elapsed(),
            rows: total,
        });
        Ok(false)
    }

    /// Runs a `no-transaction` script statement by statement. Returns true when a stop
    /// interrupted it (its `started` row stays, to be resumed).
    async fn run_without_transaction(
        &mut self,
        script: &Script,
        action: &StepAction,
    ) -> Result<bool, ApplyError> {
        let version = script.version().map(|v| v.to_string());
        self.watch_for(script);
        let started = Instant::now();
        let fail = |e: BatchError, line: Option<u32>, ran: Duration| -> Result<bool, ApplyError> {
            match e {
                BatchError::Cancelled => Ok(true),
                BatchError::Db(e) => Err(ApplyError::Script {
                    script: script.name.clone(),
                    line,
                    failure: self.failure(script, &e, ran),
                }),
            }
        };
        let no_time = Duration::ZERO;
        let overrides = self.timeout_overrides(script, "");
        let statements: Vec<_> = script.executable_statements().collect();
        let (log_id, from) = match action {
            StepAction::Resume {
                log_id,
                from_statement,
            } => {
                // The session that ran the first statements is gone, and with it what
                // they set: restore their net effect (the last SET of each setting, none
                // that was RESET later) so the rest runs — and recovery looks — where
                // they meant.
                let mut replay = overrides.clone();
                for sql in session_replay(
                    script,
                    &statements[..(*from_statement).min(statements.len())],
                ) {
                    replay.push_str(sql);
                    replay.push('\n');
                }
                if !replay.is_empty()
                    && let Err(e) = self.batch(&replay).await
                {
                    return fail(e, None, no_time);
                }
                (*log_id, *from_statement)
            }
            StepAction::Apply | StepAction::Reapply | StepAction::Supersede { .. } => {
                if matches!(action, StepAction::Supersede { .. })
                    && let Err(e) = self.clean_up_superseded(script, &statements).await
                {
                    return fail(e, None, no_time);
                }
                // beforeEachMigrate commits with the started row (one implicit
                // transaction); a resumed script does not run it again.
                let sql = format!(
                    "{overrides}{}{}\n{}",
                    self.replaced_row_sql(script),
                    log::insert_started_sql(&self.identity(script, version.as_deref())),
                    self.each_callbacks_sql(Callback::BeforeEachMigrate),
                );
                match self.batch(&sql).await {
                    Ok(rows) => {
                        let id =
                            first_value(&rows)
                                .and_then(|v| v.parse().ok())
                                .ok_or_else(|| {
                                    ApplyError::Log(DbFailure::of_kind(
                                        FailureKind::Unexpected,
                                        "inserting the started row returned no id",
                                    ))
                                })?;
                        (id, 0)
                    }
                    Err(e) => return fail(e, None, no_time),
                }
            }
        };
        let lines = crate::bundle::LineIndex::new(&script.sql);
        let resuming = matches!(action, StepAction::Resume { .. });
        for (n, stmt) in statements.iter().enumerate().skip(from) {
            let line = stmt.first_token.map(|o| lines.line(o));
            if n > from && self.stop.is_stopping() {
                return Ok(true);
            }
            // The statement a run was cut off at may have run (its progress was not
            // recorded): recover what PostgreSQL leaves half-done, then run it again.
            let uncertain = resuming && n == from;
            let mut already_done = false;
            if uncertain {
                match self.recover(stmt, true).await {
                    Ok(done) => already_done = done,
                    Err(e) => return fail(e, line, no_time),
                }
            }
            let statement_started = Instant::now();
            if !already_done && let Err(e) = self.batch(stmt.sql(&script.sql)).await {
                // Only a server error with exactly the SQLSTATE that means "already
                // there": a lost connection (no SQLSTATE) proves nothing.
                let done_anyway = uncertain
                    && rules::done_if_fails_with(&stmt.leading).is_some_and(|want| {
                        matches!(&e, BatchError::Db(db) if db.code().map(|c| c.code()) == Some(want))
                    });
                if !done_anyway {
                    return fail(e, line, statement_started.elapsed());
                }
                tracing::info!(script = %script.name, line, "the interrupted statement's effect is already there");
            }
            // As the session's own role, whatever the script SET ROLE to (the log is
            // Flotilla's); SET LOCAL ends with this transaction, the script's role stays.
            let progress = format!(
                "BEGIN;\nSET LOCAL ROLE NONE;\n{};\n{}\nCOMMIT;",
                log::BACKEND_SQL,
                log::progress_sql(log_id, n + 1)
            );
            match self.batch(&progress).await {
                Ok(rows) => self.backend.same_as(first_value(&rows).as_deref())?,
                Err(e) => return fail(e, line, no_time),
            }
        }
        let mut finish = log::finish_started_sql(
            log_id,
            &self.identity(script, version.as_deref()),
            started.elapsed().as_millis(),
        );
        // What the script set in the session ends with it, so the scripts after it run
        // as they would on a fresh session (as after a crash); the startup settings
        // (timeouts) survive RESET. Before the UPDATE: a SET ROLE must not decide who
        // may write the log.
        // afterEachMigrate commits with the row that says the script finished: if it
        // fails, the script stays `started` with every statement done, and the next run
        // only finishes it (and runs afterEachMigrate again).
        finish = format!(
            "{}\n{}{finish}",
            log::RESET_SESSION_SQL,
            self.each_callbacks_sql(Callback::AfterEachMigrate)
        );
        if let Err(e) = self.batch(&finish).await {
            return fail(e, None, no_time);
        }
        self.committed += 1;
        self.applied.push(AppliedScript {
            script: script.name.clone(),
            version,
            duration: started.elapsed(),
            rows: None,
        });
        Ok(false)
    }

    /// What a failed statement of `script` means, with a cancel (57014) told apart by
    /// the `statement_timeout` in force and how long the statement ran.
    fn failure(&self, script: &Script, e: &tokio_postgres::Error, ran: Duration) -> DbFailure {
        let failure = DbFailure::from(e);
        if !failure.is_cancelled_statement() {
            return failure;
        }
        if let Some(why) = self.watch.and_then(|w| w.reason()) {
            return failure.cancelled_by(CancelCause::Watchdog(why));
        }
        let timeout = script
            .directives
            .statement_timeout
            .unwrap_or(self.run.settings.statement_timeout);
        failure.cancelled_by(CancelCause::judge(timeout, ran))
    }

    /// Before the new version of an interrupted repeatable starts (and records its
    /// `started` row): drop what the old run may have left `INVALID` for any index the
    /// new one builds or rebuilds concurrently. Run with the script's own session
    /// settings in force, in order, then reset, so names resolve as the script means.
    async fn clean_up_superseded(
        &self,
        script: &Script,
        statements: &[&crate::bundle::Statement],
    ) -> Result<(), BatchError> {
        for stmt in statements {
            if rules::session_setting(&stmt.leading) {
                self.batch(stmt.sql(&script.sql)).await?;
            } else {
                self.recover(stmt, false).await?;
            }
        }
        self.batch(log::RESET_SESSION_SQL).await?;
        Ok(())
    }

    /// Before running a statement whose earlier run may have been cut off (`uncertain`),
    /// or that follows a changed version of an interrupted repeatable: drop what an
    /// interrupted `CREATE INDEX CONCURRENTLY` or `REINDEX … CONCURRENTLY` left
    /// `INVALID`. True when the statement's effect is already complete (an uncertain
    /// `CREATE INDEX CONCURRENTLY` whose index is valid).
    async fn recover(
        &self,
        stmt: &crate::bundle::Statement,
        uncertain: bool,
    ) -> Result<bool, BatchError> {
        if let Some(index) = rules::concurrent_index(&stmt.leading) {
            let built = self.recover_concurrent_index(&index).await?;
            // A valid index of that name after a *different* script's run is not this
            // statement's work: let the statement decide (IF NOT EXISTS, or an error).
            return Ok(built && uncertain);
        }
        if let Some(target) = rules::reindex_concurrently(&stmt.leading) {
            self.drop_reindex_leftovers(&target).await?;
        }
        Ok(false)
    }

    /// Drops the `INVALID` `_ccnew`/`_ccold` indexes an interrupted `REINDEX …
    /// CONCURRENTLY` leaves on what it covers, so running it again starts clean.
    async fn drop_reindex_leftovers(
        &self,
        target: &rules::ReindexTarget,
    ) -> Result<(), BatchError> {
        let qualified = |parts: &[String]| {
            log::quote_literal(
                &parts
                    .iter()
                    .map(|p| log::quote_ident(p))
                    .collect::<Vec<_>>()
                    .join("."),
            )
        };
        let scope = match target {
            rules::ReindexTarget::IndexOf(index) => format!(
                "i.indrelid = (SELECT indrelid FROM pg_index WHERE indexrelid = to_regclass({}))",
                qualified(index)
            ),
            rules::ReindexTarget::Table(table) => {
                format!("i.indrelid = to_regclass({})", qualified(table))
            }
            rules::ReindexTarget::Schema(schema) => {
                format!("n.nspname = {}", log::quote_literal(schema))
            }
            rules::ReindexTarget::Database => "true".to_string(),
        };
        let find = format!(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE NOT i.indisvalid AND c.relname ~ '_cc(new|old)[0-9]*$' AND {scope}"
        );
        let rows = self.batch(&find).await?;
        for m in &rows {
            if let SimpleQueryMessage::Row(r) = m
                && let Some(name) = r.get(0)
            {
                tracing::info!(index = %name, "dropping an index left INVALID by an interrupted REINDEX CONCURRENTLY");
                self.batch(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                    .await?;
            }
        }
        Ok(())
    }

    /// Makes an interrupted `CREATE INDEX CONCURRENTLY` safe to continue. An `INVALID`
    /// index it left is dropped (the statement runs again). A `VALID` one means the build
    /// finished after the runner was lost — the server completes a statement whose
    /// client died, and the session's advisory lock kept us out until it had — so the
    /// statement's effect is there: `true`, skip it rather than fail on "already exists".
    async fn recover_concurrent_index(
        &self,
        index: &rules::ConcurrentIndex,
    ) -> Result<bool, BatchError> {
        let table = index
            .table
            .iter()
            .map(|p| log::quote_ident(p))
            .collect::<Vec<_>>()
            .join(".");
        let find = format!(
            "SELECT format('%I.%I', n.nspname, c.relname), i.indisvalid FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = {} AND i.indrelid = to_regclass({})",
            log::quote_literal(&index.index),
            log::quote_literal(&table)
        );
        let rows = self.batch(&find).await?;
        let found = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((
                r.get(0).unwrap_or_default().to_string(),
                r.get(1) == Some("t"),
            )),
            _ => None,
        });
        match found {
            Some((name, true)) => {
                tracing::info!(index = %name, "an interrupted CREATE INDEX CONCURRENTLY finished; keeping its index");
                Ok(true)
            }
            Some((name, false)) => {
                tracing::info!(index = %name, "dropping an index left INVALID by an interrupted run");
                self.batch(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                    .await?;
                Ok(false)
            }
            None => Ok(false),
        }
    }
}

/// The statements that restore, on a new session, what `done` (the statements of a
/// script that ran before an interruption) left set in the old one: the last `SET` of
/// each setting, none that a later `RESET` (or `RESET ALL`) undid, in the order they ran.
fn session_replay<'s>(script: &'s Script, done: &[&crate::bundle::Statement]) -> Vec<&'s str> {
    let mut kept: Vec<(String, &'s str)> = Vec::new();
    for stmt in done {
        let sql = stmt.sql(&script.sql);
        match rules::session_change(&stmt.leading, sql) {
            Some(rules::SessionChange::Set(key)) => {
                kept.retain(|(k, _)| *k != key);
                kept.push((key, sql));
            }
            Some(rules::SessionChange::Reset(key)) => kept.retain(|(k, _)| *k != key),
            Some(rules::SessionChange::ResetAll) => kept.clear(),
            None => {}
        }
    }
    kept.into_iter().map(|(_, sql)| sql).collect()
}

/// The span of one script, or of the scripts sharing one transaction (`per-tenant`).
fn script_span(scripts: &[&Script]) -> tracing::Span {
    let names: Vec<&str> = scripts.iter().map(|s| s.name.as_str()).collect();
    tracing::info_span!(
        "script",
        script = %names.join(","),
        sqlstate = tracing::field::Empty,
        failed_script = tracing::field::Empty,
    )
}

/// Records a failure on the span of the scripts (one message may hold several: which
/// one failed) and passes the result on.
fn traced<T>(span: &tracing::Span, result: Result<T, ApplyError>) -> Result<T, ApplyError> {
    if let Err(e) = &result {
        if let Some(sqlstate) = e.sqlstate() {
            span.record("sqlstate", sqlstate);
        }
        if let Some(script) = e.script() {
            span.record("failed_script", script);
        }
    }
    result
}

/// What the answer to a message of scripts has said so far.
struct Progress {
    /// The last script whose start row came back (in order: a row out of order, which
    /// only a script's own query could produce, is not believed).
    reached: Option<usize>,
    /// When each script started, by the server's clock (seconds since the epoch).
    started_at: Vec<Option<f64>>,
    /// Each script's `duration_ms`, from its log row.
    durations: Vec<Option<u64>>,
    /// Each script's transaction id, from its log row.
    xids: Vec<Option<String>>,
    /// Every server process a start row came from (one, unless a pooler interfered).
    backends: Vec<String>,
}

impl Progress {
    fn new(scripts: usize) -> Self {
        Self {
            reached: None,
            started_at: vec![None; scripts],
            durations: vec![None; scripts],
            xids: vec![None; scripts],
            backends: Vec::new(),
        }
    }

    /// Reads one message of the answer; the index of the script that just started, if
    /// this was its start row.
    fn read(&mut self, message: &SimpleQueryMessage) -> Option<usize> {
        let SimpleQueryMessage::Row(row) = message else {
            return None;
        };
        match row.columns().first().map(|c| c.name()) {
            Some(log::SCRIPT_TAG) => {
                let expected = self.reached.map_or(0, |r| r + 1);
                if row.get(1).and_then(|v| v.parse::<usize>().ok()) != Some(expected)
                    || expected >= self.started_at.len()
                {
                    return None;
                }
                if let Some(pid) = row.get(0)
                    && !self.backends.iter().any(|b| b == pid)
                {
                    self.backends.push(pid.to_string());
                }
                self.reached = Some(expected);
                self.started_at[expected] = row.get(2).and_then(|v| v.parse().ok());
                return Some(expected);
            }
            Some(log::DURATION_TAG) => {
                if let Some(i) = self.reached {
                    self.durations[i] = row.get(0).and_then(|v| v.parse().ok());
                    self.xids[i] = row.get(1).map(str::to_string);
                }
            }
            _ => {}
        }
        None
    }
}

/// A message being built, counting its characters (the unit of an error's position).
#[derive(Default)]
struct MessageText {
    sql: String,
    chars: usize,
}

impl MessageText {
    fn push(&mut self, text: &str) {
        self.chars += text.chars().count();
        self.sql.push_str(text);
    }
}

/// How many transactional scripts a message holds at most in per-script mode: one round
/// trip for a tenant's usual release, and a soft stop waits for no more than these.
const SCRIPTS_PER_MESSAGE: usize = 16;

/// How much script text a message holds at most in per-script mode (a bigger script
/// goes alone): what the server logs of a failed message stays bounded.
const BYTES_PER_MESSAGE: usize = 4 * 1024 * 1024;

/// Maps a 1-based character position in a message to a line of script `n`, which
/// starts at character `script_at[n]`; `None` when the position is outside it.
fn line_in_message(script_at: &[usize], n: usize, script: &Script, position: u32) -> Option<u32> {
    let pos = usize::try_from(position).ok()?.checked_sub(1)?;
    let in_script = pos.checked_sub(*script_at.get(n)?)?;
    let byte = script.sql.char_indices().nth(in_script).map(|(b, _)| b)?;
    Some(crate::bundle::LineIndex::new(&script.sql).line(byte))
}
