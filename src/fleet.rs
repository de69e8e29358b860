//! Fleets: named sets of tenants an operator registers once — listed (a CSV), a catalog
//! query, or discovery of a server's databases — and then names in `wave start`,
//! `plan` and `fleet census`. The registry checks names and labels, seals every DSN
//! before it is stored (like a wave's tenants), resolves a fleet into tenants at each
//! use (catalog and discovery run again, `allowed_hosts` is checked again), runs the
//! scheduled census rounds, and keeps each fleet's last census. It never connects on
//! its own (resolving a catalog or discovery source is `target`'s job, reading tenants
//! the census's) and never stores a DSN in the clear.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::census::Census;
use crate::dsn::Dsn;
use crate::lock;
use crate::reach::Reach;
use crate::secret::{Sealer, SecretError};
use crate::store::{
    FORMAT, FleetRecord, FleetSourceRecord, FleetTenantRecord, ProgressStore, StoreError,
};
use crate::target::{TargetSource, Tenant};

/// The longest fleet name (and label key).
pub const MAX_NAME: usize = 63;
/// A fleet's labels are copied into every tenant of every wave started from it: kept
/// few and short, like a tenant's own.
pub const MAX_LABELS: usize = 32;
/// The longest label value.
pub const MAX_LABEL_VALUE: usize = 256;
/// Censuses taken at once, on request and scheduled together; more requests are
/// refused (the schedule waits for a slot).
pub const MAX_CONCURRENT_CENSUSES: usize = 2;

/// Why a fleet could not be registered, found or used.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A name outside `[a-z0-9][a-z0-9_-]{0,62}`.
    #[error(
        "fleet name {0:?}: use 1 to {MAX_NAME} lowercase letters, digits, '-' or '_', starting with a letter or digit"
    )]
    BadName(String),
    /// Labels too many, too long, or with characters a label cannot have.
    #[error("fleet labels: {0}")]
    BadLabels(String),
    /// Registering a name in use without `replace`.
    #[error("fleet {0:?} already exists; remove it first or register with replace")]
    Exists(String),
    #[error("fleet {0:?} not found")]
    NotFound(String),
    /// `--cached` before any census of the fleet.
    #[error("fleet {0:?} has no census yet (run one without --cached, or set census_interval)")]
    NoCensus(String),
    /// A stored record this build cannot read.
    #[error("fleet {name:?} cannot be loaded ({reason}); remove it and register it again")]
    Unloadable { name: String, reason: String },
    /// A sealed DSN that does not open with this data dir's key.
    #[error("fleet {name:?}: a stored connection string does not open: {source}")]
    Secret {
        name: String,
        #[source]
        source: SecretError,
    },
    /// A stored DSN today's parser refuses.
    #[error("fleet {name:?}: a stored connection string no longer parses: {message}")]
    Dsn { name: String, message: String },
    /// The source could not be resolved now (catalog down, `allowed_hosts` changed).
    #[error("fleet {name:?}: {source}")]
    Targets {
        name: String,
        #[source]
        source: crate::target::TargetError,
    },
    /// The source resolves to more tenants than the daemon takes.
    #[error("fleet {name:?} resolves to {count} tenants, more than the daemon's limit of {max}")]
    TooMany {
        name: String,
        count: usize,
        max: usize,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks a fleet name: it appears in metrics labels, URLs and shell commands.
pub fn check_name(name: &str) -> Result<(), FleetError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(FleetError::BadName(name.chars().take(80).collect()))
    }
}

/// Checks a fleet's labels: keys plain (they become tenant labels, matched by
/// `--canary key=value`), values without control characters, few and short.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), FleetError> {
    if labels.len() > MAX_LABELS {
        return Err(FleetError::BadLabels(format!(
            "{} labels, at most {MAX_LABELS}",
            labels.len()
        )));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_NAME
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !key_ok {
            return Err(FleetError::BadLabels(format!(
                "key {:?}: use 1 to {MAX_NAME} of a-z A-Z 0-9 - _ . /",
                key.chars().take(80).collect::<String>()
            )));
        }
        if value.len() > MAX_LABEL_VALUE || value.chars().any(char::is_control) {
            return Err(FleetError::BadLabels(format!(
                "value of {key:?}: at most {MAX_LABEL_VALUE} bytes, no control characters"
            )));
        }
    }
    Ok(())
}

/// What a registration gives: the source as requested and what it resolved to.
#[derive(Debug, Clone)]
pub struct NewFleet {
    /// The name, checked by [`check_name`].
    pub name: String,
    /// Where the tenants come from (for a CSV, the tenants below are what is kept).
    pub source: TargetSource,
    /// The tenants the source resolved to now (kept for a listed fleet, counted for
    /// the others).
    pub tenants: Vec<Tenant>,
    /// The fleet's own labels, checked by [`check_labels`].
    pub labels: BTreeMap<String, String>,
}

/// A fleet as shown: never a DSN with its password.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetView {
    /// The fleet's name.
    pub name: String,
    /// `list`, `catalog` or `discover`.
    pub kind: &'static str,
    /// The source in words, DSNs redacted, without a catalog query.
    pub source: String,
    /// The catalog query: shown to operators only (a catalog query may assemble DSNs).
    pub query: Option<String>,
    /// Labels every tenant carries unless it sets its own.
    pub labels: BTreeMap<String, String>,
    /// The token name that registered it.
    pub created_by: String,
    /// When it was registered (Unix ms).
    pub created_at_ms: u64,
    /// How many tenants its source resolved to at registration.
    pub tenants_when_added: u64,
    /// Why it cannot be loaded, for a record this build cannot read.
    pub unloadable: Option<String>,
}

/// How a registered fleet resolves: tenants already known, or a source to run.
#[derive(Debug, Clone)]
pub enum FleetTargets {
    /// A listed fleet's tenants, DSNs opened.
    Listed(Vec<Tenant>),
    /// A catalog or discovery source to run again.
    Source(TargetSource),
}

/// A fleet's tenants now, and which registration of it they come from.
#[derive(Debug, Clone)]
pub struct ResolvedFleet {
    /// Every tenant, the fleet's labels added.
    pub tenants: Vec<Tenant>,
    /// Which registration of the fleet this is: a number the registry gives each
    /// `add` and `remove` of a name while the daemon runs (never a clock reading, which
    /// two replacements within a millisecond would share). A census is kept as the
    /// fleet's last only if the registration is still this one.
    pub registration: u64,
}

/// Each fleet's last censuses.
#[derive(Default)]
struct Censuses {
    /// The last one, on request or scheduled (`fleet census --cached`).
    last: HashMap<String, Arc<Census>>,
    /// The last scheduled one: what the metrics export, so a census someone asked for
    /// (against any bundle, without fingerprints) does not change what alerts see.
    scheduled: HashMap<String, Arc<Census>>,
    /// Each name's registration (absent: unchanged since the daemon started, `0`).
    registrations: HashMap<String, u64>,
    last_registration: u64,
    /// The last histogram census of each settled wave, for `wave status`.
    waves: HashMap<String, WaveCensus>,
}

/// A settled wave's census, kept while the wave does not change.
struct WaveCensus {
    /// The wave's history length when it was taken: any state change makes it stale.
    changes: usize,
    taken: std::time::Instant,
    census: Arc<Census>,
}

/// How long a settled wave's census answers `wave status` again (its tenants can still
/// change under another wave or by hand).
const WAVE_CENSUS_FRESH: std::time::Duration = std::time::Duration::from_secs(30);
/// Settled waves whose census is kept.
const WAVE_CENSUSES_KEPT: usize = 64;

/// The registry over the daemon's store.
pub struct Fleets {
    store: Arc<dyn ProgressStore>,
    sealer: Arc<Sealer>,
    /// Serializes "is the name free? store it" against another registration or removal.
    writes: Mutex<()>,
    censuses: Mutex<Censuses>,
    census_slots: Arc<Semaphore>,
}

impl Fleets {
    /// The registry of `store`, sealing with `sealer`.
    pub fn new(store: Arc<dyn ProgressStore>, sealer: Arc<Sealer>) -> Self {
        Self {
            store,
            sealer,
            writes: Mutex::new(()),
            censuses: Mutex::new(Censuses::default()),
            census_slots: Arc::new(Semaphore::new(MAX_CONCURRENT_CENSUSES)),
        }
    }

    /// The permits every census takes (on request: tried; scheduled: waited for).
    pub(crate) fn census_slots(&self) -> &Arc<Semaphore> {
        &self.census_slots
    }

    /// Registers a fleet (durably), or replaces one of that name when `replace`.
    /// Writes the store: call it off the async runtime.
    pub fn add(
        &self,
        fleet: NewFleet,
        actor: &str,
        replace: bool,
        now_ms: u64,
    ) -> Result<FleetView, FleetError> {
        check_name(&fleet.name)?;
        check_labels(&fleet.labels)?;
        let seal = |dsn: &str| self.sealer.seal(dsn);
        let redact = |dsn: &str| Dsn::parse(dsn).map(|d| d.to_string()).unwrap_or_default();
        let mut listed = None;
        let source = match &fleet.source {
            TargetSource::Csv { .. } => {
                listed = Some(
                    fleet
                        .tenants
                        .iter()
                        .map(|t| FleetTenantRecord {
                            id: t.id.clone(),
                            dsn_sealed: seal(t.dsn.secret_text()),
                            labels: t.labels.clone(),
                        })
                        .collect::<Vec<_>>(),
                );
                FleetSourceRecord::List
            }
            TargetSource::Catalog { dsn, query } => FleetSourceRecord::Catalog {
                dsn_sealed: seal(dsn),
                dsn_redacted: redact(dsn),
                query_sealed: seal(query),
            },
            TargetSource::Discover { dsn, pattern } => FleetSourceRecord::Discover {
                dsn_sealed: seal(dsn),
                dsn_redacted: redact(dsn),
                pattern: pattern.clone(),
            },
        };
        let record = FleetRecord {
            format: FORMAT,
            name: fleet.name.clone(),
            source,
            labels: fleet.labels,
            created_by: actor.to_string(),
            created_at_ms: now_ms,
            tenants_when_added: fleet.tenants.len() as u64,
        };
        let _writing = lock(&self.writes);
        if !replace && self.store.load_fleet(&fleet.name)?.is_some() {
            return Err(FleetError::Exists(fleet.name));
        }
        self.store.save_fleet(&record, listed.as_deref())?;
        self.new_registration(&fleet.name);
        Ok(self.view(&record))
    }

    /// Every fleet, by name; a record this build cannot read is listed with why.
    pub fn list(&self) -> Result<Vec<FleetView>, FleetError> {
        Ok(self
            .store
            .load_fleets()?
            .into_iter()
            .map(|(name, record)| match record {
                Ok(r) => self.view(&r),
                Err(e) => FleetView {
                    name,
                    kind: "unknown",
                    source: String::new(),
                    query: None,
                    labels: BTreeMap::new(),
                    created_by: String::new(),
                    created_at_ms: 0,
                    tenants_when_added: 0,
                    unloadable: Some(e.to_string()),
                },
            })
            .collect())
    }

    /// One fleet as shown.
    pub fn get(&self, name: &str) -> Result<FleetView, FleetError> {
        Ok(self.view(&self.record(name)?))
    }

    /// Removes a fleet (and its cached censuses); its waves keep their tenants. Writes
    /// the store: call it off the async runtime.
    pub fn remove(&self, name: &str) -> Result<(), FleetError> {
        check_name(name)?;
        let _writing = lock(&self.writes);
        let deleted = self.store.delete_fleet(name);
        // Even on a store error: what was read before may be gone.
        self.new_registration(name);
        if deleted? {
            Ok(())
        } else {
            Err(FleetError::NotFound(name.to_string()))
        }
    }

    /// Forgets the name's censuses and gives it a new registration, so a census that
    /// read the old one is not kept.
    fn new_registration(&self, name: &str) {
        let mut censuses = lock(&self.censuses);
        censuses.last.remove(name);
        censuses.scheduled.remove(name);
        censuses.last_registration += 1;
        let registration = censuses.last_registration;
        censuses
            .registrations
            .insert(name.to_string(), registration);
    }

    fn registration(&self, name: &str) -> u64 {
        lock(&self.censuses)
            .registrations
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// What the fleet resolves from, DSNs opened, with its record (whose labels each
    /// tenant carries unless it has its own value: see [`with_fleet_labels`]).
    pub fn targets(&self, name: &str) -> Result<(FleetTargets, FleetRecord), FleetError> {
        let record = self.record(name)?;
        let open = |sealed: &str| {
            self.sealer
                .open(sealed)
                .map_err(|source| FleetError::Secret {
                    name: name.to_string(),
                    source,
                })
        };
        let targets = match &record.source {
            FleetSourceRecord::List => {
                // Missing or undecodable listed tenants: the fleet's record cannot be
                // used (as its own record would be), not a failing store.
                let tenants = self.store.load_fleet_tenants(name).map_err(|e| match e {
                    StoreError::Decode { .. } | StoreError::Format { .. } => {
                        FleetError::Unloadable {
                            name: name.to_string(),
                            reason: e.to_string(),
                        }
                    }
                    other => FleetError::Store(other),
                })?;
                let mut out = Vec::with_capacity(tenants.len());
                for t in tenants {
                    let dsn = Dsn::parse(&open(&t.dsn_sealed)?).map_err(|e| FleetError::Dsn {
                        name: name.to_string(),
                        message: format!("tenant {:?}: {e}", t.id),
                    })?;
                    out.push(Tenant {
                        id: t.id,
                        dsn,
                        labels: t.labels,
                    });
                }
                FleetTargets::Listed(out)
            }
            FleetSourceRecord::Catalog {
                dsn_sealed,
                query_sealed,
                ..
            } => FleetTargets::Source(TargetSource::Catalog {
                dsn: open(dsn_sealed)?,
                query: open(query_sealed)?,
            }),
            FleetSourceRecord::Discover {
                dsn_sealed,
                pattern,
                ..
            } => FleetTargets::Source(TargetSource::Discover {
                dsn: open(dsn_sealed)?,
                pattern: pattern.clone(),
            }),
        };
        Ok((targets, record))
    }

    /// The fleet's tenants now: listed ones as registered, a catalog or discovery run
    /// again; every one on a server `reach` allows (`allowed_hosts` may have changed
    /// since), at most `max_tenants`, the fleet's labels added.
    pub async fn resolve(
        &self,
        name: &str,
        reach: &Reach,
        max_tenants: usize,
    ) -> Result<ResolvedFleet, FleetError> {
        // Read before the record: a replacement in between makes the census stale
        // (dropped), never a census of the old record kept as the new one's.
        let registration = self.registration(name);
        let (targets, record) = self.targets(name)?;
        let targets_error = |source| FleetError::Targets {
            name: name.to_string(),
            source,
        };
        let mut tenants = match targets {
            FleetTargets::Listed(tenants) => tenants,
            FleetTargets::Source(source) => crate::target::resolve(&source, reach, max_tenants)
                .await
                .map_err(targets_error)?,
        };
        if tenants.len() > max_tenants {
            return Err(FleetError::TooMany {
                name: name.to_string(),
                count: tenants.len(),
                max: max_tenants,
            });
        }
        crate::target::check_reach(&tenants, reach, &format!("fleet {name}"))
            .map_err(targets_error)?;
        with_fleet_labels(&mut tenants, &record.labels);
        Ok(ResolvedFleet {
            tenants,
            registration,
        })
    }

    /// One scheduled round: a census of every registered fleet, one after the other
    /// (each waiting for a census slot), each compared with the bundle `bundle_for`
    /// gives (that of the newest wave started on it). A fleet that cannot be resolved
    /// is logged and skipped. Returns how many censuses were taken.
    pub async fn census_all(
        &self,
        reach: &Reach,
        max_tenants: usize,
        options: &crate::census::CensusOptions,
        bundle_for: impl Fn(&str) -> Option<Arc<crate::bundle::Bundle>>,
    ) -> usize {
        let names = match self.store.load_fleets() {
            Ok(fleets) => fleets
                .into_iter()
                .filter(|(_, r)| r.is_ok())
                .map(|(n, _)| n),
            Err(e) => {
                tracing::warn!(error = %e, "scheduled census: cannot list fleets");
                return 0;
            }
        };
        let mut taken = 0;
        for name in names {
            let Ok(_slot) = self.census_slots.clone().acquire_owned().await else {
                return taken;
            };
            match self.resolve(&name, reach, max_tenants).await {
                Ok(resolved) => {
                    let mut census = crate::census::take(
                        &name,
                        resolved.tenants,
                        bundle_for(&name),
                        options,
                        reach,
                        crate::census::CensusTrigger::Schedule,
                    )
                    .await;
                    census.fleet_registration = resolved.registration;
                    tracing::info!(
                        fleet = %name,
                        tenants = census.tenants.len(),
                        outliers = census.outliers().count(),
                        "scheduled census taken"
                    );
                    self.remember_census(census);
                    taken += 1;
                }
                Err(e) => tracing::warn!(fleet = %name, error = %e, "scheduled census skipped"),
            }
        }
        taken
    }

    /// Keeps `census` as the fleet's last one — if the fleet is still the registration
    /// it read (not removed or replaced meanwhile) — and, when scheduled, as the one
    /// the metrics export.
    pub(crate) fn remember_census(&self, census: Census) -> Arc<Census> {
        let census = Arc::new(census);
        let mut censuses = lock(&self.censuses);
        let registration = censuses.registrations.get(&census.fleet).copied();
        if registration.unwrap_or(0) == census.fleet_registration {
            censuses.last.insert(census.fleet.clone(), census.clone());
            if census.trigger == crate::census::CensusTrigger::Schedule {
                censuses
                    .scheduled
                    .insert(census.fleet.clone(), census.clone());
            }
        }
        census
    }

    /// A settled wave's census taken while its history had `changes` entries, if
    /// recent enough to answer again.
    pub(crate) fn wave_census(&self, wave_id: &str, changes: usize) -> Option<Arc<Census>> {
        let censuses = lock(&self.censuses);
        let kept = censuses.waves.get(wave_id)?;
        (kept.changes == changes && kept.taken.elapsed() < WAVE_CENSUS_FRESH)
            .then(|| kept.census.clone())
    }

    /// Keeps a settled wave's census (the stalest one goes when too many are kept).
    pub(crate) fn remember_wave_census(
        &self,
        wave_id: &str,
        changes: usize,
        census: Census,
    ) -> Arc<Census> {
        let census = Arc::new(census);
        let mut censuses = lock(&self.censuses);
        if censuses.waves.len() >= WAVE_CENSUSES_KEPT && !censuses.waves.contains_key(wave_id) {
            let stalest = censuses
                .waves
                .iter()
                .min_by_key(|(_, w)| w.taken)
                .map(|(id, _)| id.clone());
            if let Some(id) = stalest {
                censuses.waves.remove(&id);
            }
        }
        censuses.waves.insert(
            wave_id.to_string(),
            WaveCensus {
                changes,
                taken: std::time::Instant::now(),
                census: census.clone(),
            },
        );
        census
    }

    /// The fleet's last census, if one was taken since the daemon started.
    pub fn cached_census(&self, name: &str) -> Option<Arc<Census>> {
        lock(&self.censuses).last.get(name).cloned()
    }

    /// Every fleet's last scheduled census (for metrics).
    pub fn scheduled_censuses(&self) -> Vec<Arc<Census>> {
        lock(&self.censuses).scheduled.values().cloned().collect()
    }

    fn record(&self, name: &str) -> Result<FleetRecord, FleetError> {
        check_name(name)?;
        match self.store.load_fleet(name)? {
            None => Err(FleetError::NotFound(name.to_string())),
            Some(Ok(record)) => Ok(record),
            Some(Err(e)) => Err(FleetError::Unloadable {
                name: name.to_string(),
                reason: e.to_string(),
            }),
        }
    }
}

/// Gives each tenant the fleet's labels it does not set itself.
pub fn with_fleet_labels(tenants: &mut [Tenant], labels: &BTreeMap<String, String>) {
    if labels.is_empty() {
        return;
    }
    for t in tenants {
        for (k, v) in labels {
            t.labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
}

impl Fleets {
    /// A record as shown (the catalog query opened: the API shows it to operators).
    fn view(&self, record: &FleetRecord) -> FleetView {
        view(record, |sealed| self.sealer.open(sealed).ok())
    }
}

fn view(record: &FleetRecord, open: impl Fn(&str) -> Option<String>) -> FleetView {
    let mut query = None;
    let (kind, source) = match &record.source {
        FleetSourceRecord::List => (
            "list",
            format!("{} listed tenants", record.tenants_when_added),
        ),
        FleetSourceRecord::Catalog {
            dsn_redacted,
            query_sealed,
            ..
        } => {
            query = Some(open(query_sealed).unwrap_or_else(|| "(does not open)".into()));
            ("catalog", format!("catalog {dsn_redacted}"))
        }
        FleetSourceRecord::Discover {
            dsn_redacted,
            pattern,
            ..
        } => (
            "discover",
            format!("databases LIKE {pattern:?} on {dsn_redacted}"),
        ),
    };
    FleetView {
        name: record.name.clone(),
        kind,
        source,
        query,
        labels: record.labels.clone(),
        created_by: record.created_by.clone(),
        created_at_ms: record.created_at_ms,
        tenants_when_added: record.tenants_when_added,
        unloadable: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A census that read a fleet replaced (even within the same millisecond) or
    /// removed while it ran is not kept as that fleet's last.
    #[tokio::test]
    async fn a_census_of_a_replaced_fleet_is_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn ProgressStore> =
            Arc::new(crate::store::SledStore::open(&dir.path().join("data")).expect("store"));
        let sealer = Arc::new(Sealer::open_or_create(&dir.path().join("secret.key")).expect("key"));
        let fleets = Fleets::new(store, sealer);
        let fleet = |dsn: &str| NewFleet {
            name: "prod".into(),
            source: TargetSource::Csv {
                text: String::new(),
                origin: "test".into(),
            },
            tenants: crate::target::from_entries(
                vec![("t1".into(), dsn.into(), BTreeMap::new())],
                "test",
            )
            .expect("tenant"),
            labels: BTreeMap::new(),
        };
        let reach = Reach::without_ambient_password(crate::reach::AllowedHosts::any());
        let census_of = |resolved: &ResolvedFleet| {
            let mut census = crate::census::summarize("prod", Vec::new(), &HashMap::new(), false);
            census.fleet_registration = resolved.registration;
            census
        };
        fleets
            .add(fleet("postgresql://u@h1/db"), "op", false, 1)
            .expect("add");
        let before = fleets.resolve("prod", &reach, 10).await.expect("resolve");
        // Replaced with the same clock reading while the census ran.
        fleets
            .add(fleet("postgresql://u@h2/db"), "op", true, 1)
            .expect("replace");
        fleets.remember_census(census_of(&before));
        assert!(
            fleets.cached_census("prod").is_none(),
            "a stale census is kept"
        );

        let after = fleets.resolve("prod", &reach, 10).await.expect("resolve");
        assert_eq!(after.tenants[0].dsn.host(), "h2:5432");
        fleets.remember_census(census_of(&after));
        assert!(
            fleets.cached_census("prod").is_some(),
            "a current census is lost"
        );

        fleets.remove("prod").expect("remove");
        assert!(fleets.cached_census("prod").is_none());
        fleets.remember_census(census_of(&after));
        assert!(
            fleets.cached_census("prod").is_none(),
            "kept for a removed fleet"
        );
    }

    #[test]
    fn names_are_plain() {
        for ok in ["prod", "eu-west_1", "0fleet", "a"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_NAME + 1);
        for bad in [
            "",
            "Prod",
            "-x",
            "_x",
            "a b",
            "a/b",
            "a\"b",
            "ü",
            long.as_str(),
        ] {
            assert!(
                matches!(check_name(bad), Err(FleetError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn labels_are_few_plain_and_short() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(check_labels(&labels(&[("env", "prod"), ("team/owner", "a b")])).is_ok());
        for bad in [
            labels(&[("", "x")]),
            labels(&[("a=b", "x")]),
            labels(&[("env", "line\nbreak")]),
            labels(&[("env", &"x".repeat(MAX_LABEL_VALUE + 1))]),
            (0..=MAX_LABELS)
                .map(|i| (format!("k{i}"), String::new()))
                .collect(),
        ] {
            assert!(
                matches!(check_labels(&bad), Err(FleetError::BadLabels(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn fleet_labels_never_override_a_tenants_own() {
        let mut tenants = vec![Tenant {
            id: "t".into(),
            dsn: Dsn::parse("postgres://u@h/t").expect("dsn"),
            labels: [("region".to_string(), "us".to_string())].into(),
        }];
        let labels = [
            ("region".to_string(), "eu".to_string()),
            ("env".to_string(), "prod".to_string()),
        ]
        .into();
        with_fleet_labels(&mut tenants, &labels);
        assert_eq!(tenants[0].labels["region"], "us");
        assert_eq!(tenants[0].labels["env"], "prod");
    }
}
