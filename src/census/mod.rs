//! The census: where every tenant of a fleet stands. It reads each tenant's
//! `flotilla.execution_log` (and, when asked, a [fingerprint](fingerprint) of its actual
//! schema) on short read-only sessions, bounded like a wave (in all and per server),
//! and summarizes: each tenant's highest version, interrupted scripts, checksum drift
//! and pending scripts against a bundle, versions the bundle does not know; for the
//! fleet, a version histogram, counts per state and per server, schema fingerprint
//! groups per version with a diff of each minority against the majority, and the
//! outliers. A census never writes to a tenant, takes no advisory lock and never
//! decides anything about a wave: it is a reading, kept in memory until the next one.

pub mod fingerprint;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::apply::log;
use crate::apply::plan::{self, DriftPolicy, LogRow, LogStatus, OrderPolicy, PlanOptions};
use crate::bundle::{Bundle, ScriptKind, Version};
use crate::connect::{Session, SessionSettings};
use crate::failure::DbFailure;
use crate::reach::Reach;
use crate::target::Tenant;

pub use fingerprint::{ChangeKind, Schema, SchemaChange};

/// Histogram label of tenants whose log records no version (or that have no log).
pub const NO_VERSION: &str = "none";
/// Histogram label of tenants the census could not read.
pub const UNREACHABLE: &str = "unreachable";
/// Tenants read at once unless the request says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Tenants read at once on one server unless the request says otherwise.
pub const DEFAULT_PER_HOST: usize = 8;
/// The most tenants a census reads at once: a census must never crowd a fleet's
/// servers (a viewer may take one).
pub const MAX_CONCURRENCY: usize = 64;
/// The most tenants a census reads at once on one server.
pub const MAX_PER_HOST: usize = 16;
/// How long the log query may run on the server.
const LOG_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the fingerprint query may run on the server: shorter than the log's, so
/// a huge catalog costs the tenant its fingerprint, never its log reading.
const FINGERPRINT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one tenant's reading may take: connecting (5 s), then the log query and
/// the fingerprint query, which run one after the other on the server.
pub const TENANT_DEADLINE: Duration = Duration::from_secs(5 + 10 + 5 + 1);
/// Scripts or versions named per tenant in each list (pending, started, drifted,
/// ahead); the pending count is always whole, the others say how many more in a note.
const MAX_LISTED: usize = 20;
/// Distinct schemas kept for diffs: a fleet whose every tenant differs (a timestamp in
/// a default, per-tenant objects) must not hold every schema in memory; groups past
/// this many are counted but listed without a diff.
const MAX_SCHEMAS: usize = 256;
/// Schema changes listed per fingerprint group.
const MAX_CHANGES: usize = 50;
/// Tenant ids listed per fingerprint group.
const MAX_MEMBERS: usize = 20;

/// Why a census was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CensusTrigger {
    /// An operator or viewer asked (`fleet census`, `wave status`).
    Request,
    /// The daemon's `census_interval`.
    Schedule,
}

impl CensusTrigger {
    /// The name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CensusTrigger::Request => "request",
            CensusTrigger::Schedule => "schedule",
        }
    }
}

/// Where one tenant stands, most pressing first: a tenant is in the first state that
/// applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CensusState {
    /// Could not be read (connection refused, timed out, no privilege).
    Unreachable,
    /// A `started` row: a `no-transaction` script was interrupted.
    Interrupted,
    /// An applied version's checksum differs from the bundle's script.
    Drifted,
    /// Its schema differs from that of most tenants at its version.
    SchemaDrift,
    /// Its log has versions the bundle does not know.
    Ahead,
    /// No `flotilla.execution_log`: never migrated by Flotilla.
    Unmanaged,
    /// Has scripts of the bundle to run (without a bundle: below the newest version
    /// any tenant of the fleet has).
    Behind,
    /// Up to date.
    Current,
}

impl CensusState {
    /// Every state, in order.
    pub const ALL: [CensusState; 8] = [
        CensusState::Unreachable,
        CensusState::Interrupted,
        CensusState::Drifted,
        CensusState::SchemaDrift,
        CensusState::Ahead,
        CensusState::Unmanaged,
        CensusState::Behind,
        CensusState::Current,
    ];

    /// The name used in JSON, metrics and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            CensusState::Unreachable => "unreachable",
            CensusState::Interrupted => "interrupted",
            CensusState::Drifted => "drifted",
            CensusState::SchemaDrift => "schema_drift",
            CensusState::Ahead => "ahead",
            CensusState::Unmanaged => "unmanaged",
            CensusState::Behind => "behind",
            CensusState::Current => "current",
        }
    }

    /// Whether a person should look at a tenant in this state (being behind is the
    /// normal state of a fleet between waves).
    pub fn is_outlier(self) -> bool {
        !matches!(self, CensusState::Behind | CensusState::Current)
    }
}

/// What the census found on one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantCensus {
    /// The tenant, as the fleet names it.
    pub tenant_id: String,
    /// `host:port`.
    pub host: String,
    /// The first state that applies to it.
    pub state: CensusState,
    /// The highest version recorded applied or baselined.
    pub version: Option<String>,
    /// Versions applied by running them.
    pub applied: u32,
    /// Versions recorded as baselined (counted apart from `applied`).
    pub baselined: u32,
    /// Scripts with a `started` row.
    pub started: Vec<String>,
    /// Scripts whose applied checksum differs from the bundle's.
    pub drifted: Vec<String>,
    /// Versions the log has and the bundle does not know.
    pub ahead: Vec<String>,
    /// Scripts of the bundle the tenant would get (the first few), and how many.
    pub pending: Vec<String>,
    /// How many scripts of the bundle it would get (whole, however many are listed).
    pub pending_count: u32,
    /// In a minority fingerprint group at its version (whatever its state).
    pub schema_drift: bool,
    /// Why it could not be read.
    pub error: Option<DbFailure>,
    /// Whether it has a `flotilla.execution_log`.
    pub has_log: bool,
    /// Its schema's fingerprint, when asked for and read.
    pub fingerprint: Option<String>,
    /// What else is worth saying (a plan that could not be made).
    pub notes: Vec<String>,
}

impl TenantCensus {
    /// The histogram bucket it falls in.
    pub fn bucket(&self) -> &str {
        if self.state == CensusState::Unreachable {
            UNREACHABLE
        } else {
            self.version.as_deref().unwrap_or(NO_VERSION)
        }
    }
}

/// Tenants sharing one schema at one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FingerprintGroup {
    /// The histogram bucket (version, or `none`).
    pub version: String,
    /// The fingerprint the group shares.
    pub fingerprint: String,
    /// How many tenants are in the group.
    pub tenants: u64,
    /// The group the others at its version are compared with: the largest (on a tie,
    /// the smallest fingerprint, and `tied` says so).
    pub reference: bool,
    /// Tied with another group for largest: none of its tenants is called drifted.
    pub tied: bool,
    /// How this group's schema differs from the reference's (empty for the reference).
    pub changes: Vec<SchemaChange>,
    /// More changes than listed.
    pub more_changes: usize,
    /// Its tenants (the first few).
    pub members: Vec<String>,
}

/// Tenants of one server, per state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCensus {
    /// `host:port`.
    pub host: String,
    /// How many tenants of the fleet are on it.
    pub tenants: u64,
    /// Its tenants per state (states without tenants left out).
    pub states: BTreeMap<CensusState, u64>,
}

/// One census of a fleet.
#[derive(Debug, Clone)]
pub struct Census {
    /// The fleet (or `wave:ID` for a wave's tenants).
    pub fleet: String,
    /// The bundle compared with, if any.
    pub bundle_id: Option<String>,
    /// Whether schema fingerprints were read.
    pub fingerprinted: bool,
    /// Why it was taken.
    pub trigger: CensusTrigger,
    /// When the reading began (Unix ms).
    pub started_at_ms: u64,
    /// When the last tenant was read (Unix ms).
    pub finished_at_ms: u64,
    /// Every tenant, in the fleet's order.
    pub tenants: Vec<TenantCensus>,
    /// Which registration of the fleet was read (see [`crate::fleet::ResolvedFleet`];
    /// `0` for a wave's tenants): a census of a fleet replaced since is not kept.
    pub fleet_registration: u64,
    /// Tenants per bucket: versions in version order, then `none`, then `unreachable`.
    pub histogram: Vec<(String, u64)>,
    /// Tenants per state (every state, zeros included).
    pub states: BTreeMap<CensusState, u64>,
    /// Per server, by `host:port`.
    pub hosts: Vec<HostCensus>,
    /// Fingerprint groups, by version, the reference first.
    pub fingerprints: Vec<FingerprintGroup>,
}

impl Census {
    /// Tenants a person should look at.
    pub fn outliers(&self) -> impl Iterator<Item = &TenantCensus> {
        self.tenants.iter().filter(|t| t.state.is_outlier())
    }

    /// Tenants in `state`.
    pub fn count(&self, state: CensusState) -> u64 {
        self.states.get(&state).copied().unwrap_or(0)
    }

    /// Tenants whose applied checksums or schema differ, whatever their state.
    pub fn drifted(&self) -> u64 {
        self.tenants
            .iter()
            .filter(|t| !t.drifted.is_empty() || t.schema_drift)
            .count() as u64
    }
}

/// How a census runs.
#[derive(Debug, Clone)]
pub struct CensusOptions {
    /// Tenants read at once (at most [`MAX_CONCURRENCY`]).
    pub concurrency: usize,
    /// Tenants read at once on one server (at most [`MAX_PER_HOST`]).
    pub per_host: usize,
    /// Also read each tenant's schema fingerprint.
    pub fingerprint: bool,
}

impl Default for CensusOptions {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            per_host: DEFAULT_PER_HOST,
            fingerprint: false,
        }
    }
}

/// The session of a census read: read-only (`catalog_only` pins `search_path` and makes
/// the session read-only), a short lock timeout (only an `ACCESS EXCLUSIVE` lock on the
/// log or the catalog can block it), every statement bounded.
fn census_settings() -> SessionSettings {
    SessionSettings {
        application_name: "flotilla-census",
        lock_timeout: Duration::from_millis(500),
        ..SessionSettings::catalog_reader(LOG_STATEMENT_TIMEOUT)
    }
}

/// Takes a census of `tenants` (a fleet resolved a moment ago) against `bundle`, if
/// given. Never fails as a whole: a tenant that cannot be read is `unreachable`.
pub async fn take(
    fleet: &str,
    tenants: Vec<Tenant>,
    bundle: Option<Arc<Bundle>>,
    options: &CensusOptions,
    reach: &Reach,
    trigger: CensusTrigger,
) -> Census {
    let started_at_ms = crate::wave::now_ms();
    let fingerprint = options.fingerprint;
    let reach = reach.clone();
    let visit_bundle = bundle.clone();
    // One schema per distinct fingerprint, kept as readings arrive: a fleet mostly
    // shares a few, and 100,000 copies of one would not fit.
    let schemas: Arc<std::sync::Mutex<HashMap<String, Schema>>> = Default::default();
    let visit_schemas = schemas.clone();
    let ids: Vec<(String, String)> = tenants
        .iter()
        .map(|t| (t.id.clone(), t.dsn.host().to_string()))
        .collect();
    let readings = crate::target::visit_bounded(
        tenants,
        options.concurrency.clamp(1, MAX_CONCURRENCY),
        options.per_host.clamp(1, MAX_PER_HOST),
        move |tenant| {
            let (reach, bundle) = (reach.clone(), visit_bundle.clone());
            let schemas = visit_schemas.clone();
            async move {
                let read = read_tenant(&tenant, bundle.as_deref(), fingerprint, &reach);
                let (census, schema) = match tokio::time::timeout(TENANT_DEADLINE, read).await {
                    Ok(reading) => reading,
                    Err(_) => (
                        unreachable(
                            &tenant.id,
                            tenant.dsn.host(),
                            DbFailure::of_kind(
                                crate::failure::FailureKind::TimedOut,
                                format!("no answer within {TENANT_DEADLINE:?}"),
                            ),
                        ),
                        None,
                    ),
                };
                if let (Some(fp), Some(schema)) = (&census.fingerprint, schema) {
                    let mut schemas = crate::lock(&schemas);
                    if schemas.len() < MAX_SCHEMAS {
                        schemas.entry(fp.clone()).or_insert(schema);
                    }
                }
                census
            }
        },
    )
    .await;
    let read: Vec<TenantCensus> = ids
        .iter()
        .zip(readings)
        .map(|((id, host), reading)| {
            reading.unwrap_or_else(|| {
                unreachable(
                    id,
                    host,
                    DbFailure::of_kind(
                        crate::failure::FailureKind::Unexpected,
                        "the census task of this tenant failed",
                    ),
                )
            })
        })
        .collect();
    let schemas = std::mem::take(&mut *crate::lock(&schemas));
    let mut census = summarize(fleet, read, &schemas, bundle.is_some());
    census.bundle_id = bundle.map(|b| b.id().to_string());
    census.fingerprinted = fingerprint;
    census.trigger = trigger;
    census.started_at_ms = started_at_ms;
    census.finished_at_ms = crate::wave::now_ms();
    census
}

fn unreachable(tenant_id: &str, host: &str, error: DbFailure) -> TenantCensus {
    TenantCensus {
        tenant_id: tenant_id.to_string(),
        host: host.to_string(),
        state: CensusState::Unreachable,
        version: None,
        applied: 0,
        baselined: 0,
        started: Vec::new(),
        drifted: Vec::new(),
        ahead: Vec::new(),
        pending: Vec::new(),
        pending_count: 0,
        schema_drift: false,
        error: Some(error),
        has_log: false,
        fingerprint: None,
        notes: Vec::new(),
    }
}

/// Reads one tenant: its log and, when asked, its schema, pipelined on one session.
async fn read_tenant(
    tenant: &Tenant,
    bundle: Option<&Bundle>,
    fingerprint: bool,
    reach: &Reach,
) -> (TenantCensus, Option<Schema>) {
    let failed = |e: DbFailure| (unreachable(&tenant.id, tenant.dsn.host(), e), None);
    let session = match Session::connect(&tenant.dsn, &census_settings(), reach).await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let client = session.client();
    let log_read = client.simple_query(log::READ_SQL);
    let (log_result, schema_result) = if fingerprint {
        // Pipelined behind the log query; its own, shorter timeout set in the same
        // message (the session is read-only, SET is allowed).
        let fingerprint_sql = format!(
            "SET statement_timeout = {}; {}",
            FINGERPRINT_STATEMENT_TIMEOUT.as_millis(),
            fingerprint::FINGERPRINT_SQL
        );
        let (l, s) = tokio::join!(log_read, client.simple_query(&fingerprint_sql));
        (l, Some(s))
    } else {
        (log_read.await, None)
    };
    session.close().await;
    let rows = match log_result {
        Ok(messages) => match log::parse_rows(&messages) {
            Ok(rows) => Some(rows),
            Err(e) => {
                return failed(DbFailure::of_kind(
                    crate::failure::FailureKind::Unexpected,
                    format!("the execution log cannot be read: {e}"),
                ));
            }
        },
        Err(e) => {
            let failure = DbFailure::from(&e);
            if log::is_missing_log(failure.sqlstate.as_deref()) {
                None
            } else {
                return failed(failure);
            }
        }
    };
    let mut census = examine(tenant, rows.as_deref(), bundle);
    // A fingerprint that cannot be read (a timeout on a huge catalog) leaves the log's
    // reading standing.
    let schema = match schema_result {
        None => None,
        Some(Ok(messages)) => Some(Schema::from_messages(&messages)),
        Some(Err(e)) => {
            census
                .notes
                .push(format!("no fingerprint: {}", DbFailure::from(&e)));
            None
        }
    };
    census.fingerprint = schema.as_ref().map(Schema::fingerprint);
    (census, schema)
}

/// What a tenant's log rows say against `bundle`; `rows` is `None` for a tenant without
/// a log. Pure. The state is provisional: `Behind` without a bundle and `SchemaDrift`
/// are decided with the whole fleet in view ([`summarize`]). Only the latest row of a
/// version (or of a repeatable) counts, as for the planner: a repeatable's `started`
/// row that a newer run superseded is history, not an interruption.
pub fn examine(tenant: &Tenant, rows: Option<&[LogRow]>, bundle: Option<&Bundle>) -> TenantCensus {
    let mut out = TenantCensus {
        tenant_id: tenant.id.clone(),
        host: tenant.dsn.host().to_string(),
        state: CensusState::Current,
        version: None,
        applied: 0,
        baselined: 0,
        started: Vec::new(),
        drifted: Vec::new(),
        ahead: Vec::new(),
        pending: Vec::new(),
        pending_count: 0,
        schema_drift: false,
        error: None,
        has_log: rows.is_some(),
        fingerprint: None,
        notes: Vec::new(),
    };
    let lenient = PlanOptions {
        drift: DriftPolicy::Allow,
        order: OrderPolicy::AllowOutOfOrder,
    };
    let Some(rows) = rows else {
        out.state = CensusState::Unmanaged;
        if let Some(bundle) = bundle {
            // What a wave would run on it (a baseline script instead of what it covers).
            if let Ok(p) = plan::plan(bundle, &[], lenient) {
                out.set_pending(p.steps.iter().map(|s| &bundle.scripts()[s.script].name));
            }
        }
        return out;
    };
    // The latest row per version, and per repeatable script.
    let mut versioned: BTreeMap<Version, &LogRow> = BTreeMap::new();
    let mut repeatable: BTreeMap<&str, &LogRow> = BTreeMap::new();
    for row in rows {
        let slot = match (row.kind.as_str(), row.version.as_deref()) {
            ("versioned", Some(v)) => match v.parse::<Version>() {
                Ok(v) => versioned.entry(v).or_insert(row),
                Err(_) => {
                    out.notes.push(format!(
                        "log row {} has version {v:?}, not a version",
                        row.id
                    ));
                    continue;
                }
            },
            ("repeatable", _) => repeatable.entry(row.script.as_str()).or_insert(row),
            _ => continue,
        };
        if row.id > slot.id {
            *slot = row;
        }
    }
    for row in versioned.values().chain(repeatable.values()) {
        if row.status == LogStatus::Started {
            out.started.push(row.script.clone());
        }
    }
    for row in versioned.values() {
        match row.status {
            LogStatus::Applied => out.applied += 1,
            LogStatus::Baselined => out.baselined += 1,
            _ => {}
        }
    }
    // Canonical text: `1.0` and `1` are one version, one bucket.
    let highest = versioned
        .iter()
        .filter(|(_, r)| r.status.counts_as_applied())
        .map(|(v, _)| v)
        .next_back();
    out.version = highest.map(Version::to_string);
    if let Some(bundle) = bundle {
        let mut known = std::collections::HashSet::new();
        for script in bundle.scripts() {
            if let ScriptKind::Versioned(version) = &script.kind {
                if let Some(row) = versioned.get(version)
                    && row.status.counts_as_applied()
                    && row.checksum != script.checksum
                {
                    out.drifted.push(script.name.clone());
                }
                known.insert(version.clone());
            }
        }
        for (v, row) in &versioned {
            if row.status.counts_as_applied() && !known.contains(v) {
                out.ahead.push(v.to_string());
            }
        }
        // The same planner a wave uses, told to tolerate what the census reports.
        match plan::plan(bundle, rows, lenient) {
            Ok(p) => {
                // Only never-applied versions are out of order (resuming an interrupted
                // older script is not).
                let older: Vec<&str> = p
                    .steps
                    .iter()
                    .filter(|s| s.action == plan::StepAction::Apply)
                    .map(|s| &bundle.scripts()[s.script])
                    .filter(|s| s.version().is_some_and(|v| highest.is_some_and(|h| v < h)))
                    .map(|s| s.name.as_str())
                    .collect();
                if !older.is_empty() {
                    let more = older.len().saturating_sub(MAX_LISTED);
                    out.notes.push(format!(
                        "out of order: {} older than version {} it has{}; a wave fails it unless out-of-order is allowed",
                        older[..older.len().min(MAX_LISTED)].join(", "),
                        out.version.as_deref().unwrap_or("?"),
                        if more > 0 { format!(" (and {more} more)") } else { String::new() }
                    ));
                }
                out.set_pending(p.steps.iter().map(|s| &bundle.scripts()[s.script].name));
            }
            Err(e) => out.notes.push(format!("no plan: {e}")),
        }
    }
    out.state = if !out.started.is_empty() {
        CensusState::Interrupted
    } else if !out.drifted.is_empty() {
        CensusState::Drifted
    } else if !out.ahead.is_empty() {
        CensusState::Ahead
    } else if out.pending_count > 0 {
        CensusState::Behind
    } else {
        CensusState::Current
    };
    // The state is decided on the whole lists; the answer names the first few.
    for (what, list) in [
        ("interrupted scripts", &mut out.started),
        ("drifted scripts", &mut out.drifted),
        ("versions ahead", &mut out.ahead),
    ] {
        if list.len() > MAX_LISTED {
            let more = list.len() - MAX_LISTED;
            list.truncate(MAX_LISTED);
            out.notes.push(format!("{more} more {what} than listed"));
        }
    }
    out
}

impl TenantCensus {
    fn set_pending<'a>(&mut self, names: impl Iterator<Item = &'a String>) {
        let names: Vec<&String> = names.collect();
        self.pending_count = u32::try_from(names.len()).unwrap_or(u32::MAX);
        self.pending = names.into_iter().take(MAX_LISTED).cloned().collect();
    }
}

/// The fleet's view: states decided with every tenant in sight (without a bundle,
/// `Behind` means below the newest version any readable tenant has; a minority
/// fingerprint at a version is `SchemaDrift`), the histogram, per-server counts and
/// fingerprint groups. Pure.
pub fn summarize(
    fleet: &str,
    mut tenants: Vec<TenantCensus>,
    schemas: &HashMap<String, Schema>,
    with_bundle: bool,
) -> Census {
    if !with_bundle {
        let newest = tenants
            .iter()
            .filter_map(|t| t.version.as_deref()?.parse::<Version>().ok())
            .max();
        for t in tenants
            .iter_mut()
            .filter(|t| t.state == CensusState::Current)
        {
            let below = match (&newest, t.version.as_deref()) {
                (Some(n), Some(v)) => v.parse::<Version>().is_ok_and(|v| v < *n),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if below {
                t.state = CensusState::Behind;
            }
        }
    }

    // Fingerprint groups per bucket; the largest is the reference.
    let mut groups: BTreeMap<String, BTreeMap<String, Vec<usize>>> = BTreeMap::new();
    for (i, t) in tenants.iter().enumerate() {
        if let Some(fp) = &t.fingerprint {
            groups
                .entry(t.bucket().to_string())
                .or_default()
                .entry(fp.clone())
                .or_default()
                .push(i);
        }
    }
    let mut fingerprints = Vec::new();
    for (bucket, by_fp) in &groups {
        let largest = by_fp.values().map(Vec::len).max().unwrap_or(0);
        let tied = by_fp.values().filter(|m| m.len() == largest).count() > 1;
        // BTreeMap order: on a tie, the smallest fingerprint is the reference.
        let Some((reference_fp, _)) = by_fp.iter().find(|(_, m)| m.len() == largest) else {
            continue;
        };
        let reference_schema = schemas.get(reference_fp);
        for (fp, members) in by_fp {
            let reference = fp == reference_fp;
            let mut changes = match (reference, reference_schema, schemas.get(fp)) {
                (false, Some(r), Some(s)) => fingerprint::diff(r, s),
                _ => Vec::new(),
            };
            let more_changes = changes.len().saturating_sub(MAX_CHANGES);
            changes.truncate(MAX_CHANGES);
            // Groups tied for largest: neither is the odd one out. A smaller group
            // still is.
            if members.len() < largest {
                for &i in members {
                    tenants[i].schema_drift = true;
                    if tenants[i].state > CensusState::SchemaDrift {
                        tenants[i].state = CensusState::SchemaDrift;
                    }
                }
            }
            fingerprints.push(FingerprintGroup {
                version: bucket.clone(),
                fingerprint: fp.clone(),
                tenants: members.len() as u64,
                reference,
                tied: tied && members.len() == largest,
                changes,
                more_changes,
                members: members
                    .iter()
                    .take(MAX_MEMBERS)
                    .map(|&i| tenants[i].tenant_id.clone())
                    .collect(),
            });
        }
    }
    fingerprints.sort_by(|a, b| {
        bucket_order(&a.version, &b.version)
            .then(b.reference.cmp(&a.reference))
            .then(b.tenants.cmp(&a.tenants))
            .then(a.fingerprint.cmp(&b.fingerprint))
    });

    let mut histogram: BTreeMap<String, u64> = BTreeMap::new();
    let mut states: BTreeMap<CensusState, u64> = CensusState::ALL.iter().map(|s| (*s, 0)).collect();
    let mut hosts: BTreeMap<String, HostCensus> = BTreeMap::new();
    for t in &tenants {
        *histogram.entry(t.bucket().to_string()).or_default() += 1;
        *states.entry(t.state).or_default() += 1;
        let host = hosts.entry(t.host.clone()).or_insert_with(|| HostCensus {
            host: t.host.clone(),
            tenants: 0,
            states: BTreeMap::new(),
        });
        host.tenants += 1;
        *host.states.entry(t.state).or_default() += 1;
    }
    let mut histogram: Vec<(String, u64)> = histogram.into_iter().collect();
    histogram.sort_by(|a, b| bucket_order(&a.0, &b.0));
    Census {
        fleet: fleet.to_string(),
        bundle_id: None,
        fingerprinted: !schemas.is_empty(),
        trigger: CensusTrigger::Request,
        started_at_ms: 0,
        finished_at_ms: 0,
        tenants,
        histogram,
        states,
        hosts: hosts.into_values().collect(),
        fingerprints,
        fleet_registration: 0,
    }
}

/// Buckets in version order, then `none`, then `unreachable`.
fn bucket_order(a: &str, b: &str) -> std::cmp::Ordering {
    let rank = |s: &str| match s {
        UNREACHABLE => (2, None),
        NO_VERSION => (1, None),
        v => (0, v.parse::<Version>().ok()),
    };
    rank(a).cmp(&rank(b)).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests;
