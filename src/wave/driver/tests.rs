//! The driver over a scripted applier and an in-memory store: no PostgreSQL, so what is
//! tested is the driving itself — effects carried out, pause honoured, a store that
//! refuses writes pausing the wave.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use super::*;
use crate::apply::AppliedScript;
use crate::policy::Policy;
use crate::secret::Sealer;
use crate::store::{ProgressStore, StoreError, TenantRecord, WaveRecord};
use crate::target::Tenant;
use crate::wave::{EngineOptions, TenantState, WaveState};

/// Applies every tenant after `delay`, counting starts.
struct Scripted {
    delay: Duration,
    starts: AtomicU32,
}

impl Applier for Scripted {
    fn apply<'a>(
        &'a self,
        _run: &'a TenantRun<'a>,
        _stop: &'a StopSignal,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            Outcome::Applied {
                scripts: vec![AppliedScript {
                    script: "V1__a.sql".into(),
                    version: Some("1".into()),
                    duration: self.delay,
                    rows: None,
                }],
                notes: Vec::new(),
                baselined: 0,
            }
        })
    }
}

/// A store in memory whose writes can be made to fail.
#[derive(Default)]
struct MemStore {
    bundles: Mutex<HashMap<String, Vec<(String, String)>>>,
    waves: Mutex<BTreeMap<String, WaveRecord>>,
    tenants: Mutex<BTreeMap<(String, u32), TenantRecord>>,
    fleets: Mutex<BTreeMap<String, crate::store::FleetRecord>>,
    fleet_tenants: Mutex<BTreeMap<String, Vec<crate::store::FleetTenantRecord>>>,
    refuse_writes: AtomicBool,
}

impl MemStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.refuse_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                path: "mem".into(),
                source: std::io::Error::other("disk full"),
            });
        }
        Ok(())
    }
}

impl ProgressStore for MemStore {
    fn save_fleet(
        &self,
        fleet: &crate::store::FleetRecord,
        listed: Option<&[crate::store::FleetTenantRecord]>,
    ) -> Result<(), StoreError> {
        self.check()?;
        let mut tenants = self.fleet_tenants.lock().expect("lock");
        match listed {
            Some(t) => tenants.insert(fleet.name.clone(), t.to_vec()),
            None => tenants.remove(&fleet.name),
        };
        self.fleets
            .lock()
            .expect("lock")
            .insert(fleet.name.clone(), fleet.clone());
        Ok(())
    }
    fn load_fleets(&self) -> Result<Vec<crate::store::StoredFleet>, StoreError> {
        let fleets = self.fleets.lock().expect("lock");
        Ok(fleets
            .iter()
            .map(|(k, v)| (k.clone(), Ok(v.clone())))
            .collect())
    }
    fn load_fleet(
        &self,
        name: &str,
    ) -> Result<Option<Result<crate::store::FleetRecord, StoreError>>, StoreError> {
        Ok(self.fleets.lock().expect("lock").get(name).cloned().map(Ok))
    }
    fn load_fleet_tenants(
        &self,
        name: &str,
    ) -> Result<Vec<crate::store::FleetTenantRecord>, StoreError> {
        // As the sled store: a listed fleet without its tenants is undecodable.
        self.fleet_tenants
            .lock()
            .expect("lock")
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::Decode {
                what: format!("tenants of fleet {name}"),
                message: "they are missing".into(),
            })
    }
    fn delete_fleet(&self, name: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.fleet_tenants.lock().expect("lock").remove(name);
        Ok(self.fleets.lock().expect("lock").remove(name).is_some())
    }
    fn save_bundle(&self, bundle: &Bundle) -> Result<(), StoreError> {
        self.check()?;
        let files = bundle
            .scripts()
            .iter()
            .map(|s| (s.name.clone(), s.sql.clone()))
            .collect();
        self.bundles
            .lock()
            .expect("lock")
            .insert(bundle.id().to_string(), files);
        Ok(())
    }
    fn load_bundle(&self, id: &str) -> Result<Bundle, StoreError> {
        let files = self.bundles.lock().expect("lock").get(id).cloned();
        let files = files.ok_or_else(|| StoreError::MissingBundle(id.into()))?;
        let sources: Vec<(&str, &str)> = files
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_str()))
            .collect();
        Bundle::from_sources(&sources, "mem").map_err(|source| StoreError::Bundle {
            id: id.into(),
            source,
        })
    }
    fn create_wave(&self, wave: &WaveRecord, tenants: &[TenantRecord]) -> Result<(), StoreError> {
        self.check()?;
        for t in tenants {
            self.save_tenant(&wave.id, t)?;
        }
        self.save_wave(wave)
    }
    fn save_wave(&self, wave: &WaveRecord) -> Result<(), StoreError> {
        self.check()?;
        self.waves
            .lock()
            .expect("lock")
            .insert(wave.id.clone(), wave.clone());
        Ok(())
    }
    fn save_tenant(&self, wave_id: &str, tenant: &TenantRecord) -> Result<(), StoreError> {
        self.check()?;
        self.tenants
            .lock()
            .expect("lock")
            .insert((wave_id.to_string(), tenant.seq), tenant.clone());
        Ok(())
    }
    fn load_waves(&self) -> Result<Vec<crate::store::StoredWave>, StoreError> {
        Ok(self
            .waves
            .lock()
            .expect("lock")
            .values()
            .map(|w| (w.id.clone(), Ok(w.clone())))
            .collect())
    }
    fn load_tenants(&self, wave_id: &str) -> Result<Vec<TenantRecord>, StoreError> {
        Ok(self
            .tenants
            .lock()
            .expect("lock")
            .iter()
            .filter(|((w, _), _)| w == wave_id)
            .map(|(_, t)| t.clone())
            .collect())
    }
    fn delete_wave(&self, wave_id: &str) -> Result<(), StoreError> {
        self.waves.lock().expect("lock").remove(wave_id);
        self.tenants
            .lock()
            .expect("lock")
            .retain(|(w, _), _| w != wave_id);
        Ok(())
    }
    fn delete_bundle(&self, id: &str) -> Result<(), StoreError> {
        self.bundles.lock().expect("lock").remove(id);
        Ok(())
    }
    fn bundle_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.bundles.lock().expect("lock").keys().cloned().collect())
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Panics on every tenant.
struct Panicking;

impl Applier for Panicking {
    fn apply<'a>(
        &'a self,
        _run: &'a TenantRun<'a>,
        _stop: &'a StopSignal,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
        Box::pin(async { panic!("a bug in the applier") })
    }
}

/// An applier that panics fails its tenants instead of leaving them RUNNING for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_applier_fails_its_tenants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sealer = Sealer::open_or_create(&dir.path().join("secret.key")).expect("key");
    let options = EngineOptions {
        applier: Arc::new(Panicking),
        ..EngineOptions::default()
    };
    let engine =
        Engine::with_store(Arc::new(MemStore::default()), sealer, options).expect("engine");
    let policy = Policy {
        max_failures: crate::policy::FailureBudget::Unlimited,
        ..Policy::default()
    };
    let id = engine
        .start_wave(bundle(), fleet(3), policy, "test")
        .expect("start");
    let done = wait_for(&engine, &id, "finished", |s| s.state.is_finished()).await;
    assert_eq!((done.state, done.counts.failed), (WaveState::Failed, 3));
    let t = engine.tenants(&id, None, 0, 1).expect("tenants").remove(0);
    assert!(t.last_error.expect("why").message.contains("panicked"));
}

fn engine(store: Arc<MemStore>, applier: Arc<Scripted>) -> (Engine, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sealer = Sealer::open_or_create(&dir.path().join("secret.key")).expect("key");
    let options = EngineOptions {
        applier,
        ..EngineOptions::default()
    };
    (
        Engine::with_store(store, sealer, options).expect("engine"),
        dir,
    )
}

fn fleet(n: usize) -> Vec<Tenant> {
    (0..n)
        .map(|i| Tenant {
            id: format!("t{i:02}"),
            dsn: Dsn::parse(&format!("postgresql://u@h{}/t{i}", i % 2)).expect("dsn"),
            labels: BTreeMap::new(),
        })
        .collect()
}

fn bundle() -> Bundle {
    Bundle::from_sources(&[("V1__a.sql", "SELECT 1;")], "t").expect("bundle")
}

async fn wait_for(
    engine: &Engine,
    id: &str,
    what: &str,
    done: impl Fn(&WaveStatus) -> bool,
) -> WaveStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = engine.status(id).expect("status");
        if done(&s) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_runs_to_completion_and_its_records_are_stored() {
    let store = Arc::new(MemStore::default());
    let applier = Arc::new(Scripted {
        delay: Duration::from_millis(2),
        starts: AtomicU32::new(0),
    });
    let (engine, _dir) = engine(store.clone(), applier.clone());
    let policy = Policy {
        concurrency: 3,
        ..Policy::default()
    };
    let id = engine
        .start_wave(bundle(), fleet(10), policy, "test")
        .expect("start");
    let done = wait_for(&engine, &id, "completion", |s| s.state.is_finished()).await;
    assert_eq!(
        (done.state, done.counts.succeeded),
        (WaveState::Completed, 10)
    );
    assert_eq!(applier.starts.load(Ordering::SeqCst), 10);
    engine.shutdown().await.expect("drain");
    let stored = store
        .waves
        .lock()
        .expect("lock")
        .get(&id)
        .cloned()
        .expect("wave");
    assert_eq!(stored.state, WaveState::Completed);
    let tenants = store.load_tenants(&id).expect("tenants");
    assert!(
        tenants.iter().all(|t| t.state == TenantState::Succeeded),
        "{tenants:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_pause_is_acknowledged_nothing_starts() {
    let store = Arc::new(MemStore::default());
    let applier = Arc::new(Scripted {
        delay: Duration::from_millis(30),
        starts: AtomicU32::new(0),
    });
    let (engine, _dir) = engine(store, applier.clone());
    let id = engine
        .start_wave(
            bundle(),
            fleet(20),
            Policy {
                concurrency: 2,
                ..Policy::default()
            },
            "test",
        )
        .expect("start");
    wait_for(&engine, &id, "two running", |s| s.counts.running == 2).await;
    let paused = engine.pause(&id, "op", "").expect("pause");
    assert_eq!(paused.state, WaveState::Paused);
    let paused_at = paused.history.last().map(|h| h.at_ms).expect("history");
    wait_for(&engine, &id, "drained", |s| s.counts.running == 0).await;
    // Time for a wrongful start to happen.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Starts are stamped when decided (under the lock the pause took).
    for t in engine.tenants(&id, None, 0, 100).expect("tenants") {
        if let Some(started) = t.started_at_ms {
            assert!(
                started <= paused_at,
                "{} started after the pause",
                t.tenant_id
            );
        }
    }
    assert!(
        applier.starts.load(Ordering::SeqCst) < 20,
        "not everything ran"
    );
}

/// A store that refuses writes pauses the wave with the reason; the failure is never
/// only a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_writes_pauses_the_wave() {
    let store = Arc::new(MemStore::default());
    let applier = Arc::new(Scripted {
        delay: Duration::from_millis(20),
        starts: AtomicU32::new(0),
    });
    let (engine, _dir) = engine(store.clone(), applier);
    let id = engine
        .start_wave(
            bundle(),
            fleet(20),
            Policy {
                concurrency: 2,
                ..Policy::default()
            },
            "test",
        )
        .expect("start");
    wait_for(&engine, &id, "running", |s| s.counts.running > 0).await;
    store.refuse_writes.store(true, Ordering::SeqCst);
    let paused = wait_for(&engine, &id, "paused by the store", |s| {
        s.state == WaveState::Paused
    })
    .await;
    let reason = paused.reason.unwrap_or_default();
    assert!(
        reason.contains("progress store") && reason.contains("disk full"),
        "{reason}"
    );
    assert_eq!(
        paused.history.last().map(|h| h.actor.as_str()),
        Some(DAEMON_ACTOR)
    );
}
