//! The progress store: what the daemon remembers across restarts, on sled, behind the
//! narrow [`ProgressStore`] trait (a shared PostgreSQL-backed store may follow).
//!
//! # What do we store?
//! - **Bundles**, by id, with the bytes of every script, written and flushed before the
//!   wave that uses them exists: a resumed wave must apply exactly what it started with.
//! - **Waves**: policy, state, reason, and the audit trail of every state change (who,
//!   when, why). Flushed before a state change is acknowledged: a wave paused or
//!   cancelled by an operator must still be so after a crash.
//! - **Fleets**: a registered fleet's name, labels and source (the catalog's or
//!   discovery server's DSN *sealed* like a wave's; a listed fleet's tenants, DSNs
//!   sealed, in a tree of their own so listing fleets never decodes them), record and
//!   tenants written in one transaction and flushed before the registration is
//!   acknowledged. A census of a fleet is not stored: it is a
//!   reading of the tenants' logs, kept in memory until the next one.
//! - **Tenant runs**: state, attempts, generation, last error, timestamps, labels, the
//!   redacted DSN for display, and the DSN *sealed* with the data dir's key (see
//!   `secret`) — never a password in the clear. Written without a flush: sled persists
//!   them within its flush interval, and losing the latest few costs only a recheck.
//!
//! What is deliberately **not** trusted: a tenant run's state for deciding what ran. The
//! store is a cursor that makes resume cheap; the tenant's `flotilla.execution_log`
//! decides. A tenant recorded `RUNNING` (or whose `SUCCEEDED` was not yet flushed) is
//! simply handed to the applier again, which finds its log up to date. That is why only
//! bundles and wave records need a flush before acting.
//!
//! Records carry a format version; every enum is an explicit tag, and an unknown tag or
//! version is a decode error, never a silent default. One process owns a data dir: a
//! second one fails to open it with a clear error.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bundle::{Bundle, BundleError, BundleFile};
use crate::policy::Policy;
use crate::wave::{TenantState, WaveState};

/// The record format this build writes and reads.
pub const FORMAT: u32 = 1;

/// One change of a wave's state, for the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateChange {
    pub from: Option<WaveState>,
    pub to: WaveState,
    /// A token name, or `flotillad` for the daemon's own decisions.
    pub actor: String,
    pub reason: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// A wave as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveRecord {
    pub format: u32,
    pub id: String,
    pub bundle_id: String,
    pub policy: Policy,
    pub state: WaveState,
    /// Why the wave is in its state, when that needs saying.
    pub reason: Option<String>,
    pub created_at_ms: u64,
    /// Set once every canary succeeded.
    pub canary_passed: bool,
    pub history: Vec<StateChange>,
    /// The registered fleet the wave's tenants were resolved from, if any.
    #[serde(default)]
    pub fleet: Option<String>,
    /// The wave's stages in order, the canary first; their tenants are consecutive
    /// `seq`s. Empty for a wave without stages (or stored before they existed): then
    /// only the canary gate applies.
    #[serde(default)]
    pub stages: Vec<StageRecord>,
    /// The last stage whose tenants may start (every earlier one is open too).
    #[serde(default)]
    pub stage_open: u32,
}

/// One stage of a wave, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    /// As given: `canary (5)`, `region=eu`, `rest`.
    pub name: String,
    /// How many tenants it holds.
    pub tenants: u32,
    /// Who opened the stage after this one, when approval was required.
    #[serde(default)]
    pub approval: Option<ApprovalRecord>,
}

/// An operator's approval of a finished stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    /// The token name.
    pub by: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The stage's tenants when approved.
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Approved although some of them did not succeed (`--accept-failures`).
    pub accepted_failures: bool,
}

/// A failure as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub script: Option<String>,
    pub sqlstate: Option<String>,
    pub message: String,
    pub retryability: crate::failure::Retryability,
}

/// A tenant's run within a wave, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub format: u32,
    /// Position in the wave's order (canaries first, then by id).
    pub seq: u32,
    pub tenant_id: String,
    /// The DSN sealed with the data dir's key.
    pub dsn_sealed: String,
    /// The DSN without its password, for display.
    pub dsn_redacted: String,
    /// `host:port`.
    pub host: String,
    pub labels: BTreeMap<String, String>,
    pub canary: bool,
    pub state: TenantState,
    /// Runs started (Busy answers included).
    pub attempts: u32,
    /// Retries spent on retryable failures (Busy answers excluded).
    pub retries_used: u32,
    /// Bumped before every start; a result for an older generation is stale.
    pub generation: u64,
    pub last_error: Option<ErrorRecord>,
    /// Since when (ms since the epoch) the tenant has been found busy without a break.
    #[serde(default)]
    pub busy_since_ms: Option<u64>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// Scripts its successful run recorded as `baselined` (adopted, baseline version,
    /// baseline script).
    #[serde(default)]
    pub baselined: u32,
    /// Rows its batch scripts changed, over every run reported (a backfill's progress).
    #[serde(default)]
    pub rows_changed: u64,
}

/// A registered fleet, as stored: where its tenants come from, resolved again each time
/// a wave, plan or census uses it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRecord {
    pub format: u32,
    pub name: String,
    pub source: FleetSourceRecord,
    /// The fleet's own labels; each tenant carries them unless it has its own value.
    pub labels: BTreeMap<String, String>,
    /// The token name that registered it.
    pub created_by: String,
    pub created_at_ms: u64,
    /// Tenants the source resolved to when it was registered.
    pub tenants_when_added: u64,
}

/// Where a fleet's tenants come from, with every DSN sealed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FleetSourceRecord {
    /// Tenants listed when the fleet was registered (a CSV file), stored apart
    /// ([`ProgressStore::load_fleet_tenants`]).
    List,
    /// A query on a catalog database, run again at every use.
    Catalog {
        dsn_sealed: String,
        dsn_redacted: String,
        /// Sealed too: a catalog query may assemble DSNs, passwords included.
        query_sealed: String,
    },
    /// Databases of one server whose name is `LIKE pattern`, discovered at every use.
    Discover {
        dsn_sealed: String,
        dsn_redacted: String,
        pattern: String,
    },
}

/// One listed tenant of a fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetTenantRecord {
    pub id: String,
    /// The DSN sealed with the data dir's key.
    pub dsn_sealed: String,
    pub labels: BTreeMap<String, String>,
}

/// A listed fleet's tenants as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FleetTenantsRecord {
    format: u32,
    tenants: Vec<FleetTenantRecord>,
}

/// One stored fleet: its name, and its record or why it cannot be decoded.
pub type StoredFleet = (String, Result<FleetRecord, StoreError>);

/// A bundle's bytes as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BundleRecord {
    format: u32,
    id: String,
    /// (file name, text) of the files that are UTF-8 (nearly always all of them).
    files: Vec<(String, String)>,
    /// (file name, bytes in hex) of files in another encoding (`encoding` in the
    /// folder's Flyway config): stored as given, so the bundle hashes the same.
    #[serde(default)]
    other_files: Vec<(String, String)>,
    /// The wave's placeholder values: part of the bundle id.
    #[serde(default)]
    placeholders: BTreeMap<String, String>,
    /// Written by daemons that replace placeholders; a record without it was stored
    /// before, and its scripts run as written.
    #[serde(default)]
    replaces_placeholders: bool,
    /// Written by daemons that run undo scripts; a record without it was stored
    /// before, and its `U…` files stay left out (they are not in its id).
    #[serde(default)]
    includes_undo: bool,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data dir {path} is in use by another flotillad (lock file {lock})")]
    Locked { path: String, lock: String },
    #[error("progress store at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("progress store: {0}")]
    Sled(#[from] sled::Error),
    #[error("progress store: cannot decode {what}: {message}")]
    Decode { what: String, message: String },
    #[error("progress store: {what} has format {found}, this flotillad reads format {FORMAT}")]
    Format { what: String, found: u32 },
    #[error("progress store: bundle {0} is missing")]
    MissingBundle(String),
    #[error("progress store: stored bundle {id} no longer validates: {source}")]
    Bundle {
        id: String,
        #[source]
        source: BundleError,
    },
}

/// One stored wave: its key, and its record or why it cannot be decoded.
pub type StoredWave = (String, Result<WaveRecord, StoreError>);

/// What the wave engine needs from a store. Implementations must make
/// [`create_wave`](Self::create_wave) and [`save_wave`](Self::save_wave) durable before
/// returning; [`save_tenant`](Self::save_tenant) may be batched.
pub trait ProgressStore: Send + Sync + 'static {
    /// Stores a bundle's bytes (durably).
    fn save_bundle(&self, bundle: &Bundle) -> Result<(), StoreError>;
    /// Loads and re-validates a stored bundle.
    fn load_bundle(&self, id: &str) -> Result<Bundle, StoreError>;
    /// Stores a new wave with all its tenants (durably).
    fn create_wave(&self, wave: &WaveRecord, tenants: &[TenantRecord]) -> Result<(), StoreError>;
    /// Stores a wave record (durably).
    fn save_wave(&self, wave: &WaveRecord) -> Result<(), StoreError>;
    /// Stores a tenant record (durable within the flush interval).
    fn save_tenant(&self, wave_id: &str, tenant: &TenantRecord) -> Result<(), StoreError>;
    /// Every wave, by id: a record that cannot be decoded is an `Err` of its own, so
    /// one bad record never hides the others (the engine quarantines it). The outer
    /// error is the store itself failing.
    fn load_waves(&self) -> Result<Vec<StoredWave>, StoreError>;
    /// A wave's tenants, by `seq`.
    fn load_tenants(&self, wave_id: &str) -> Result<Vec<TenantRecord>, StoreError>;
    /// Removes a wave and its tenant records, atomically and durably. The bundle stays
    /// (other waves may share it); see [`Self::delete_bundle`].
    fn delete_wave(&self, wave_id: &str) -> Result<(), StoreError>;
    /// Removes a bundle no wave uses any more.
    fn delete_bundle(&self, id: &str) -> Result<(), StoreError>;
    /// The ids of every stored bundle.
    fn bundle_ids(&self) -> Result<Vec<String>, StoreError>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Stores (or replaces) a fleet by name with its listed tenants, if it has some,
    /// in one transaction (durably).
    fn save_fleet(
        &self,
        fleet: &FleetRecord,
        listed: Option<&[FleetTenantRecord]>,
    ) -> Result<(), StoreError>;
    /// A listed fleet's tenants.
    fn load_fleet_tenants(&self, name: &str) -> Result<Vec<FleetTenantRecord>, StoreError>;
    /// Every fleet, by name; an undecodable record is an `Err` of its own.
    fn load_fleets(&self) -> Result<Vec<StoredFleet>, StoreError>;
    /// One fleet, if there is one of that name (the inner `Err`: it cannot be decoded).
    fn load_fleet(&self, name: &str)
    -> Result<Option<Result<FleetRecord, StoreError>>, StoreError>;
    /// Removes a fleet and its listed tenants (durably); `false` when there was none
    /// of that name.
    fn delete_fleet(&self, name: &str) -> Result<bool, StoreError>;
}

/// The sled-backed store.
pub struct SledStore {
    db: sled::Db,
    bundles: sled::Tree,
    waves: sled::Tree,
    tenants: sled::Tree,
    fleets: sled::Tree,
    fleet_tenants: sled::Tree,
    // Held for the life of the store: the data dir's owner lock.
    _lock: File,
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Decode {
        what: what.to_string(),
        message: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Records are plain structs of strings, numbers and maps with string keys: encoding
    // cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn check_format(what: &str, found: u32) -> Result<(), StoreError> {
    if found == FORMAT {
        Ok(())
    } else {
        Err(StoreError::Format {
            what: what.to_string(),
            found,
        })
    }
}

/// A sled transaction's failure: the storage's, or an abort (which none of ours asks
/// for).
fn transaction_error(e: sled::transaction::TransactionError<()>, what: &str) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
        sled::transaction::TransactionError::Abort(()) => StoreError::Decode {
            what: what.to_string(),
            message: "the transaction was aborted".into(),
        },
    }
}

fn decode_fleet(name: &str, bytes: &[u8]) -> Result<FleetRecord, StoreError> {
    let what = format!("fleet {name}");
    let record: FleetRecord = decode(&what, bytes)?;
    check_format(&what, record.format)?;
    if record.name != name {
        return Err(StoreError::Decode {
            what,
            message: format!("it is stored under another name ({:?})", record.name),
        });
    }
    Ok(record)
}

fn tenant_key(wave_id: &str, seq: u32) -> Vec<u8> {
    format!("{wave_id}/{seq:010}").into_bytes()
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, taking the data dir's lock.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| StoreError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path: PathBuf = dir.join("flotillad.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked {
                path: dir.display().to_string(),
                lock: lock_path.display().to_string(),
            });
        }
        let db = sled::Config::new()
            .path(dir.join("store"))
            .cache_capacity(32 * 1024 * 1024)
            .flush_every_ms(Some(200))
            .open()?;
        Ok(Self {
            bundles: db.open_tree("bundles")?,
            waves: db.open_tree("waves")?,
            tenants: db.open_tree("tenants")?,
            fleets: db.open_tree("fleets")?,
            fleet_tenants: db.open_tree("fleet_tenants")?,
            db,
            _lock: lock,
        })
    }
}

impl ProgressStore for SledStore {
    fn save_bundle(&self, bundle: &Bundle) -> Result<(), StoreError> {
        if self.bundles.contains_key(bundle.id())? {
            return Ok(());
        }
        let record = BundleRecord {
            format: FORMAT,
            id: bundle.id().to_string(),
            files: bundle
                .files()
                .iter()
                .filter_map(|f| Some((f.name.clone(), String::from_utf8(f.content.clone()).ok()?)))
                .collect(),
            other_files: bundle
                .files()
                .iter()
                .filter(|f| std::str::from_utf8(&f.content).is_err())
                .map(|f| (f.name.clone(), hex::encode(&f.content)))
                .collect(),
            placeholders: bundle.placeholders().clone(),
            replaces_placeholders: true,
            includes_undo: true,
        };
        self.bundles.insert(bundle.id(), encode(&record))?;
        self.flush()
    }

    fn load_bundle(&self, id: &str) -> Result<Bundle, StoreError> {
        let bytes = self
            .bundles
            .get(id)?
            .ok_or_else(|| StoreError::MissingBundle(id.to_string()))?;
        let record: BundleRecord = decode(&format!("bundle {id}"), &bytes)?;
        check_format(&format!("bundle {id}"), record.format)?;
        let mut files: Vec<BundleFile> = record
            .files
            .into_iter()
            .map(|(name, text)| BundleFile {
                name,
                content: text.into_bytes(),
            })
            .collect();
        for (name, bytes) in record.other_files {
            let content = hex::decode(&bytes).map_err(|e| StoreError::Decode {
                what: format!("bundle {id} file {name}"),
                message: e.to_string(),
            })?;
            files.push(BundleFile { name, content });
        }
        let options = crate::bundle::BundleOptions {
            placeholders: record.placeholders,
            as_written: !record.replaces_placeholders,
            leaves_out_undo: !record.includes_undo,
        };
        let bundle = Bundle::from_files_with(files, &options, &format!("stored bundle {id}"))
            .map_err(|source| StoreError::Bundle {
                id: id.to_string(),
                source,
            })?;
        if bundle.id() != id {
            return Err(StoreError::Decode {
                what: format!("bundle {id}"),
                message: format!("its scripts now hash to {}", bundle.id()),
            });
        }
        Ok(bundle)
    }

    fn create_wave(&self, wave: &WaveRecord, tenants: &[TenantRecord]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for t in tenants {
            batch.insert(tenant_key(&wave.id, t.seq), encode(t));
        }
        self.tenants.apply_batch(batch)?;
        // The wave record last: a wave that exists has all its tenants.
        self.waves.insert(wave.id.as_bytes(), encode(wave))?;
        self.flush()
    }

    fn save_wave(&self, wave: &WaveRecord) -> Result<(), StoreError> {
        self.waves.insert(wave.id.as_bytes(), encode(wave))?;
        self.flush()
    }

    fn save_tenant(&self, wave_id: &str, tenant: &TenantRecord) -> Result<(), StoreError> {
        self.tenants
            .insert(tenant_key(wave_id, tenant.seq), encode(tenant))?;
        Ok(())
    }

    fn load_waves(&self) -> Result<Vec<StoredWave>, StoreError> {
        let mut out = Vec::new();
        for item in self.waves.iter() {
            let (key, bytes) = item?;
            let id = String::from_utf8_lossy(&key).into_owned();
            let what = format!("wave {id}");
            let record = decode::<WaveRecord>(&what, &bytes).and_then(|record| {
                check_format(&what, record.format)?;
                if record.id != id {
                    return Err(StoreError::Decode {
                        what,
                        message: format!("it is stored under another id ({:?})", record.id),
                    });
                }
                Ok(record)
            });
            out.push((id, record));
        }
        Ok(out)
    }

    fn delete_wave(&self, wave_id: &str) -> Result<(), StoreError> {
        use sled::Transactional as _;
        let keys = self
            .tenants
            .scan_prefix(format!("{wave_id}/").as_bytes())
            .keys()
            .collect::<Result<Vec<_>, _>>()?;
        // One transaction over both trees: a crash leaves the wave whole or gone.
        (&self.waves, &self.tenants)
            .transaction(|(waves, tenant_tree)| {
                waves.remove(wave_id.as_bytes())?;
                for key in &keys {
                    tenant_tree.remove(key)?;
                }
                Ok(())
            })
            .map_err(|e| transaction_error(e, &format!("wave {wave_id}")))?;
        self.flush()
    }

    fn delete_bundle(&self, id: &str) -> Result<(), StoreError> {
        self.bundles.remove(id)?;
        self.flush()
    }

    fn bundle_ids(&self) -> Result<Vec<String>, StoreError> {
        self.bundles
            .iter()
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
            .collect()
    }

    fn load_tenants(&self, wave_id: &str) -> Result<Vec<TenantRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.tenants.scan_prefix(format!("{wave_id}/").as_bytes()) {
            let (key, bytes) = item?;
            let what = format!("tenant {}", String::from_utf8_lossy(&key));
            let record: TenantRecord = decode(&what, &bytes)?;
            check_format(&what, record.format)?;
            out.push(record);
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn save_fleet(
        &self,
        fleet: &FleetRecord,
        listed: Option<&[FleetTenantRecord]>,
    ) -> Result<(), StoreError> {
        use sled::Transactional as _;
        let tenants = listed.map(|tenants| {
            encode(&FleetTenantsRecord {
                format: FORMAT,
                tenants: tenants.to_vec(),
            })
        });
        let record = encode(fleet);
        // One transaction: a crash leaves the old fleet or the new one, never a record
        // with another fleet's tenants.
        (&self.fleets, &self.fleet_tenants)
            .transaction(|(fleets, fleet_tenants)| {
                match &tenants {
                    Some(t) => fleet_tenants.insert(fleet.name.as_bytes(), t.as_slice())?,
                    None => fleet_tenants.remove(fleet.name.as_bytes())?,
                };
                fleets.insert(fleet.name.as_bytes(), record.as_slice())?;
                Ok(())
            })
            .map_err(|e| transaction_error(e, &format!("fleet {}", fleet.name)))?;
        self.flush()
    }

    fn load_fleet_tenants(&self, name: &str) -> Result<Vec<FleetTenantRecord>, StoreError> {
        let what = format!("tenants of fleet {name}");
        let bytes = self
            .fleet_tenants
            .get(name.as_bytes())?
            .ok_or_else(|| StoreError::Decode {
                what: what.clone(),
                message: "they are missing".into(),
            })?;
        let record: FleetTenantsRecord = decode(&what, &bytes)?;
        check_format(&what, record.format)?;
        Ok(record.tenants)
    }

    fn load_fleets(&self) -> Result<Vec<StoredFleet>, StoreError> {
        let mut out = Vec::new();
        for item in self.fleets.iter() {
            let (key, bytes) = item?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let record = decode_fleet(&name, &bytes);
            out.push((name, record));
        }
        Ok(out)
    }

    fn load_fleet(
        &self,
        name: &str,
    ) -> Result<Option<Result<FleetRecord, StoreError>>, StoreError> {
        Ok(self
            .fleets
            .get(name.as_bytes())?
            .map(|bytes| decode_fleet(name, &bytes)))
    }

    fn delete_fleet(&self, name: &str) -> Result<bool, StoreError> {
        use sled::Transactional as _;
        let existed = (&self.fleets, &self.fleet_tenants)
            .transaction(|(fleets, fleet_tenants)| {
                fleet_tenants.remove(name.as_bytes())?;
                Ok(fleets.remove(name.as_bytes())?.is_some())
            })
            .map_err(|e| transaction_error(e, &format!("fleet {name}")))?;
        self.flush()?;
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(id: &str) -> WaveRecord {
        WaveRecord {
            format: FORMAT,
            id: id.to_string(),
            bundle_id: "b".into(),
            policy: Policy::default(),
            state: WaveState::Running,
            reason: None,
            created_at_ms: 1,
            canary_passed: false,
            history: vec![],
            fleet: None,
            stages: Vec::new(),
            stage_open: 0,
        }
    }

    fn tenant(seq: u32) -> TenantRecord {
        TenantRecord {
            format: FORMAT,
            seq,
            tenant_id: format!("t{seq}"),
            dsn_sealed: "00".into(),
            dsn_redacted: "postgresql://u@h:5432/t".into(),
            host: "h:5432".into(),
            labels: BTreeMap::new(),
            canary: false,
            state: TenantState::Pending,
            attempts: 0,
            retries_used: 0,
            generation: 0,
            last_error: None,
            busy_since_ms: None,
            started_at_ms: None,
            finished_at_ms: None,
            baselined: 0,
            rows_changed: 0,
        }
    }

    #[test]
    fn round_trip_and_second_opener_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            let second = SledStore::open(dir.path());
            assert!(
                matches!(second, Err(StoreError::Locked { .. })),
                "a second opener is refused"
            );
            store
                .create_wave(&wave("w1"), &[tenant(0), tenant(1), tenant(10)])
                .expect("create");
            let mut t = tenant(1);
            t.state = TenantState::Succeeded;
            store.save_tenant("w1", &t).expect("save");
            store.flush().expect("flush");
        }
        // sled's background flusher may hold the file lock for a moment after the last
        // handle is dropped (a new process never sees this: the lock dies with the old
        // one); wait for it, bounded.
        let mut reopened = SledStore::open(dir.path());
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            reopened = SledStore::open(dir.path());
        }
        let store = reopened.expect("reopen");
        let waves = store.load_waves().expect("waves");
        assert_eq!(waves.len(), 1);
        assert_eq!(waves[0].0, "w1");
        assert_eq!(waves[0].1.as_ref().expect("decodes"), &wave("w1"));
        let tenants = store.load_tenants("w1").expect("tenants");
        assert_eq!(
            tenants.iter().map(|t| t.seq).collect::<Vec<_>>(),
            [0, 1, 10],
            "ordered by seq"
        );
        assert_eq!(tenants[1].state, TenantState::Succeeded);

        store.delete_wave("w1").expect("delete");
        assert!(store.load_waves().expect("waves").is_empty());
        assert!(store.load_tenants("w1").expect("tenants").is_empty());
    }

    #[test]
    fn unknown_variants_and_formats_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let mut bytes = encode(&wave("w1"));
        bytes = String::from_utf8(bytes)
            .expect("utf8")
            .replace("RUNNING", "SNOOZING")
            .into_bytes();
        store.waves.insert("w1", bytes).expect("insert");
        store
            .waves
            .insert("w2", encode(&wave("w2")))
            .expect("insert");
        let loaded = store.load_waves().expect("the store itself reads");
        assert!(matches!(loaded[0].1, Err(StoreError::Decode { .. })));
        assert!(loaded[1].1.is_ok(), "one bad record hides no other");
        let mut future = wave("w1");
        future.format = 99;
        store.waves.insert("w1", encode(&future)).expect("insert");
        assert!(matches!(
            store.load_waves().expect("reads")[0].1,
            Err(StoreError::Format { found: 99, .. })
        ));
    }

    #[test]
    fn fleets_round_trip_and_replace_or_remove_their_tenants_with_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let record = |source| FleetRecord {
            format: FORMAT,
            name: "prod".into(),
            source,
            labels: [("env".to_string(), "prod".to_string())].into(),
            created_by: "ops".into(),
            created_at_ms: 7,
            tenants_when_added: 1,
        };
        let tenants = vec![FleetTenantRecord {
            id: "t".into(),
            dsn_sealed: "sealed".into(),
            labels: BTreeMap::new(),
        }];
        let listed = record(FleetSourceRecord::List);
        store.save_fleet(&listed, Some(&tenants)).expect("save");
        assert_eq!(store.load_fleet_tenants("prod").expect("tenants"), tenants);
        let loaded = store.load_fleet("prod").expect("load").expect("some");
        assert_eq!(loaded.expect("decodes"), listed);
        // Replaced by a catalog fleet: the listed tenants go with the old record.
        let catalog = record(FleetSourceRecord::Catalog {
            dsn_sealed: "d".into(),
            dsn_redacted: "postgres://u@h/c".into(),
            query_sealed: "q".into(),
        });
        store.save_fleet(&catalog, None).expect("replace");
        assert!(store.load_fleet_tenants("prod").is_err());
        assert_eq!(store.load_fleets().expect("list").len(), 1);
        // A record this build cannot read is listed as such, never hidden.
        store
            .fleets
            .insert("broken", b"{not json".as_slice())
            .expect("insert");
        let all = store.load_fleets().expect("list");
        assert!(all.iter().any(|(n, r)| n == "broken" && r.is_err()));
        assert!(store.delete_fleet("prod").expect("delete"));
        assert!(!store.delete_fleet("prod").expect("delete again"));
        assert!(store.load_fleet("prod").expect("load").is_none());
    }

    #[test]
    fn bundles_round_trip_by_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let b = Bundle::from_files(
            vec![BundleFile {
                name: "V1__a.sql".into(),
                content: b"select 1;".to_vec(),
            }],
            "t",
        )
        .expect("bundle");
        store.save_bundle(&b).expect("save");
        assert_eq!(store.load_bundle(b.id()).expect("load").id(), b.id());
        assert!(matches!(
            store.load_bundle("nope"),
            Err(StoreError::MissingBundle(_))
        ));
    }

    /// A Flyway folder (config files, a script in ISO-8859-1, wave placeholders) comes
    /// back from the store as the same bundle: same id, same text that runs.
    #[test]
    fn flyway_bundles_with_placeholders_and_other_encodings_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let file = |name: &str, content: &[u8]| BundleFile {
            name: name.into(),
            content: content.to_vec(),
        };
        let options = crate::bundle::BundleOptions {
            placeholders: [("owner".to_string(), "app".to_string())].into(),
            ..Default::default()
        };
        let b = Bundle::from_files_with(
            vec![
                file("flyway.conf", b"flyway.placeholders.owner=nobody\n"),
                file(
                    "V1__a.sql",
                    b"CREATE TABLE t (c text);\nALTER TABLE t OWNER TO ${owner};",
                ),
                file("V2__l.sql", b"INSERT INTO t VALUES ('caf\xe9');"),
                file("V2__l.sql.conf", b"encoding=ISO-8859-1\n"),
            ],
            &options,
            "t",
        )
        .expect("bundle");
        store.save_bundle(&b).expect("save");
        let back = store.load_bundle(b.id()).expect("load");
        assert_eq!(back.id(), b.id());
        assert_eq!(back.placeholders(), b.placeholders());
        let sql: Vec<&str> = back.scripts().iter().map(|s| s.sql.as_str()).collect();
        assert_eq!(
            sql,
            [
                "CREATE TABLE t (c text);\nALTER TABLE t OWNER TO app;",
                "INSERT INTO t VALUES ('café');"
            ]
        );
    }

    /// A bundle stored by a daemon from before placeholders: `${…}` in it is text, as
    /// it was when the wave started; it loads with the same id and runs as written.
    #[test]
    fn bundles_stored_before_placeholders_run_as_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let sql = "INSERT INTO greetings VALUES ('Hello ${first_name}');";
        let old = Bundle::from_files_with(
            vec![BundleFile {
                name: "V1__seed.sql".into(),
                content: sql.as_bytes().to_vec(),
            }],
            &crate::bundle::BundleOptions {
                as_written: true,
                ..Default::default()
            },
            "t",
        )
        .expect("as written, it is valid");
        // The record as the older daemon wrote it: no placeholder fields at all.
        let record = serde_json::json!({
            "format": FORMAT,
            "id": old.id(),
            "files": [["V1__seed.sql", sql]],
        });
        store
            .bundles
            .insert(old.id(), serde_json::to_vec(&record).expect("json"))
            .expect("insert");
        let back = store.load_bundle(old.id()).expect("loads");
        assert_eq!(back.scripts()[0].sql, sql);
        // The same folder given today is Flyway's: the placeholder needs a value.
        assert!(Bundle::from_sources(&[("V1__seed.sql", sql)], "t").is_err());
    }
}
