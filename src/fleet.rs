//! Fleets: named sets of tenants an operator registers once — listed (a CSV), a catalog
//! query, or discovery of a server's databases — and then names in `wave start`,
//! `plan` and `fleet census`. The registry checks names, seals every DSN before it is
//! stored (like a wave's tenants), resolves a fleet into tenants at each use (catalog
//! and discovery run again), and keeps each fleet's last census. It never connects on
//! its own (resolving a catalog or discovery source is `target`'s job) and never
//! stores a DSN in the clear.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::census::Census;
use crate::dsn::Dsn;
use crate::secret::{Sealer, SecretError};
use crate::store::{
    FORMAT, FleetRecord, FleetSourceRecord, FleetTenantRecord, ProgressStore, StoreError,
};
use crate::target::{TargetSource, Tenant};

/// The longest fleet name.
pub const MAX_NAME: usize = 63;

/// Why a fleet could not be registered, found or used.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(
        "fleet name {0:?}: use 1 to {MAX_NAME} lowercase letters, digits, '-' or '_', starting with a letter or digit"
    )]
    BadName(String),
    #[error("fleet {0:?} already exists; remove it first or register with replace")]
    Exists(String),
    #[error("fleet {0:?} not found")]
    NotFound(String),
    #[error("fleet {0:?} has no census yet (run one without --cached, or set census_interval)")]
    NoCensus(String),
    #[error("fleet {name:?} cannot be loaded ({reason}); remove it and register it again")]
    Unloadable { name: String, reason: String },
    #[error("fleet {name:?}: a stored connection string does not open: {source}")]
    Secret {
        name: String,
        #[source]
        source: SecretError,
    },
    #[error("fleet {name:?}: a stored connection string no longer parses: {message}")]
    Dsn { name: String, message: String },
    #[error("fleet {name:?}: {source}")]
    Targets {
        name: String,
        #[source]
        source: crate::target::TargetError,
    },
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

/// What a registration gives: the source as requested and what it resolved to.
#[derive(Debug, Clone)]
pub struct NewFleet {
    pub name: String,
    pub source: TargetSource,
    /// The tenants the source resolved to now (kept for a listed fleet, counted for
    /// the others).
    pub tenants: Vec<Tenant>,
    pub labels: BTreeMap<String, String>,
}

/// A fleet as shown: never a DSN with its password.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetView {
    pub name: String,
    /// `list`, `catalog` or `discover`.
    pub kind: &'static str,
    /// The source in words, DSNs redacted.
    pub source: String,
    pub labels: BTreeMap<String, String>,
    pub created_by: String,
    pub created_at_ms: u64,
    pub tenants_when_added: u64,
    /// Why it cannot be loaded, for a record this build cannot read.
    pub unloadable: Option<String>,
}

/// How a registered fleet resolves: tenants already known, or a source to run.
#[derive(Debug, Clone)]
pub enum FleetTargets {
    Listed(Vec<Tenant>),
    Source(TargetSource),
}

/// The registry over the daemon's store.
pub struct Fleets {
    store: Arc<dyn ProgressStore>,
    sealer: Arc<Sealer>,
    /// Serializes "is the name free? store it" so two registrations cannot both win.
    writes: Mutex<()>,
    censuses: Mutex<HashMap<String, Arc<Census>>>,
}

impl Fleets {
    /// The registry of `store`, sealing with `sealer`.
    pub fn new(store: Arc<dyn ProgressStore>, sealer: Arc<Sealer>) -> Self {
        Self {
            store,
            sealer,
            writes: Mutex::new(()),
            censuses: Mutex::new(HashMap::new()),
        }
    }

    /// Registers a fleet (durably), or replaces one of that name when `replace`.
    pub fn add(
        &self,
        fleet: NewFleet,
        actor: &str,
        replace: bool,
        now_ms: u64,
    ) -> Result<FleetView, FleetError> {
        check_name(&fleet.name)?;
        let seal = |dsn: &str| self.sealer.seal(dsn);
        let redact = |dsn: &str| Dsn::parse(dsn).map(|d| d.to_string()).unwrap_or_default();
        let source = match &fleet.source {
            TargetSource::Csv { .. } => FleetSourceRecord::List {
                tenants: fleet
                    .tenants
                    .iter()
                    .map(|t| FleetTenantRecord {
                        id: t.id.clone(),
                        dsn_sealed: seal(t.dsn.secret_text()),
                        labels: t.labels.clone(),
                    })
                    .collect(),
            },
            TargetSource::Catalog { dsn, query } => FleetSourceRecord::Catalog {
                dsn_sealed: seal(dsn),
                dsn_redacted: redact(dsn),
                query: query.clone(),
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
        if !replace && self.find(&fleet.name)?.is_some() {
            return Err(FleetError::Exists(fleet.name));
        }
        self.store.save_fleet(&record)?;
        lock(&self.censuses).remove(&fleet.name);
        Ok(view(&record))
    }

    /// Every fleet, by name; a record this build cannot read is listed with why.
    pub fn list(&self) -> Result<Vec<FleetView>, FleetError> {
        Ok(self
            .store
            .load_fleets()?
            .into_iter()
            .map(|(name, record)| match record {
                Ok(r) => view(&r),
                Err(e) => FleetView {
                    name,
                    kind: "unknown",
                    source: String::new(),
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
        Ok(view(&self.record(name)?))
    }

    /// Removes a fleet (and its cached census); its waves keep their tenants.
    pub fn remove(&self, name: &str) -> Result<(), FleetError> {
        check_name(name)?;
        let _writing = lock(&self.writes);
        lock(&self.censuses).remove(name);
        if self.store.delete_fleet(name)? {
            Ok(())
        } else {
            Err(FleetError::NotFound(name.to_string()))
        }
    }

    /// What the fleet resolves from, DSNs opened, plus its labels (which each tenant
    /// carries unless it has its own value: see [`with_fleet_labels`]).
    pub fn targets(
        &self,
        name: &str,
    ) -> Result<(FleetTargets, BTreeMap<String, String>), FleetError> {
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
            FleetSourceRecord::List { tenants } => {
                let mut out = Vec::with_capacity(tenants.len());
                for t in tenants {
                    let dsn = Dsn::parse(&open(&t.dsn_sealed)?).map_err(|e| FleetError::Dsn {
                        name: name.to_string(),
                        message: format!("tenant {:?}: {e}", t.id),
                    })?;
                    out.push(Tenant {
                        id: t.id.clone(),
                        dsn,
                        labels: t.labels.clone(),
                    });
                }
                FleetTargets::Listed(out)
            }
            FleetSourceRecord::Catalog {
                dsn_sealed, query, ..
            } => FleetTargets::Source(TargetSource::Catalog {
                dsn: open(dsn_sealed)?,
                query: query.clone(),
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
        Ok((targets, record.labels))
    }

    /// The fleet's tenants now: listed ones as registered, a catalog or discovery run
    /// again; every one on a server `reach` allows (`allowed_hosts` may have changed
    /// since), at most `max_tenants`, the fleet's labels added.
    pub async fn resolve(
        &self,
        name: &str,
        reach: &crate::reach::Reach,
        max_tenants: usize,
    ) -> Result<Vec<Tenant>, FleetError> {
        let (targets, labels) = self.targets(name)?;
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
        with_fleet_labels(&mut tenants, &labels);
        Ok(tenants)
    }

    /// One scheduled round: a census of every registered fleet, one after the other,
    /// each compared with the bundle `bundle_for` gives (that of the newest wave started
    /// on it), kept as the fleet's last. A fleet that cannot be resolved is logged and
    /// skipped. Returns how many censuses were taken.
    pub async fn census_all(
        &self,
        reach: &crate::reach::Reach,
        max_tenants: usize,
        options: &crate::census::CensusOptions,
        bundle_for: impl Fn(&str) -> Option<Arc<crate::bundle::Bundle>>,
    ) -> usize {
        let names = match self.names() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "scheduled census: cannot list fleets");
                return 0;
            }
        };
        let mut taken = 0;
        for name in names {
            match self.resolve(&name, reach, max_tenants).await {
                Ok(tenants) => {
                    let census = crate::census::take(
                        &name,
                        tenants,
                        bundle_for(&name),
                        options,
                        reach,
                        "schedule",
                    )
                    .await;
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

    /// Names of every loadable fleet (the scheduled census walks them).
    pub fn names(&self) -> Result<Vec<String>, FleetError> {
        Ok(self
            .store
            .load_fleets()?
            .into_iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(n, _)| n)
            .collect())
    }

    /// Keeps `census` as the fleet's last one (if the fleet still exists).
    pub fn remember_census(&self, census: Census) -> Arc<Census> {
        let census = Arc::new(census);
        if let Ok(Some(_)) = self.find(&census.fleet) {
            lock(&self.censuses).insert(census.fleet.clone(), census.clone());
        }
        census
    }

    /// The fleet's last census, if one was taken since the daemon started.
    pub fn cached_census(&self, name: &str) -> Option<Arc<Census>> {
        lock(&self.censuses).get(name).cloned()
    }

    /// Every fleet's last census (for metrics).
    pub fn cached_censuses(&self) -> Vec<Arc<Census>> {
        lock(&self.censuses).values().cloned().collect()
    }

    fn record(&self, name: &str) -> Result<FleetRecord, FleetError> {
        check_name(name)?;
        self.find(name)?
            .ok_or_else(|| FleetError::NotFound(name.to_string()))
    }

    fn find(&self, name: &str) -> Result<Option<FleetRecord>, FleetError> {
        match self.store.load_fleet(name)? {
            None => Ok(None),
            Some(Ok(record)) => Ok(Some(record)),
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

fn view(record: &FleetRecord) -> FleetView {
    let (kind, source) = match &record.source {
        FleetSourceRecord::List { tenants } => {
            ("list", format!("{} listed tenants", tenants.len()))
        }
        FleetSourceRecord::Catalog {
            dsn_redacted,
            query,
            ..
        } => ("catalog", format!("catalog {dsn_redacted}: {query}")),
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
        labels: record.labels.clone(),
        created_by: record.created_by.clone(),
        created_at_ms: record.created_at_ms,
        tenants_when_added: record.tenants_when_added,
        unloadable: None,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

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
