//! Waves: one bundle rolled out over a set of tenants under a policy (PRODUCT.md §4).
//!
//! The [`Engine`] owns every wave of a daemon: it creates them (bundle and tenants stored
//! durably first), runs one dispatcher task per active wave, and takes operator commands
//! (pause, resume, cancel, retry) that change a wave's state under the same lock the
//! dispatcher decides under — so once a pause is acknowledged no tenant starts. A tenant
//! run is a task that calls the applier and reports back; its result becomes a decision
//! (succeeded, retry later with backoff, failed, cancelled), never a crashed loop. The
//! failure budget and a failed canary pause the wave by themselves, saying why.
//!
//! On open, waves that were `RUNNING` continue, `PAUSED` ones stay paused, tenants
//! recorded `RUNNING` are queued again (the applier will consult their log), and
//! `SUCCEEDED` tenants are never contacted. The engine never decides what a tenant needs:
//! the applier reads that from the tenant's own log.

mod queue;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::apply::{Outcome, StopSignal, TenantRun, apply_tenant};
use crate::bundle::Bundle;
use crate::dsn::Dsn;
use crate::policy::{AfterCanary, Canary, Policy, PolicyError};
use crate::reach::Reach;
use crate::secret::{Sealer, SecretError};
use crate::store::{
    ErrorRecord, FORMAT, ProgressStore, SledStore, StateChange, StoreError, TenantRecord,
    TenantState, WaveRecord, WaveState,
};
use crate::target::Tenant;
use crate::telemetry::metrics::RunDecision;
use queue::{Limits, Queue};
use tracing::Instrument as _;

/// The actor name of the daemon's own decisions.
pub const DAEMON_ACTOR: &str = "flotillad";

/// How many events a watcher may fall behind before it must resync from a snapshot.
const EVENT_BUFFER: usize = 1024;

/// Milliseconds since the epoch: the one clock of persisted and reported times.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("wave {0} not found")]
    NotFound(String),
    #[error("wave {wave} is {}: cannot {action}", state.as_str())]
    InvalidState {
        wave: String,
        state: WaveState,
        action: &'static str,
    },
    #[error("wave {wave} has no tenant {tenant:?}")]
    TenantNotFound { wave: String, tenant: String },
    #[error("wave {0} has no failed tenants to retry")]
    NothingToRetry(String),
    #[error("invalid targets: {0}")]
    Targets(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("wave {wave} is quarantined ({reason}); only `forget` applies to it")]
    Unloadable { wave: String, reason: String },
    #[error(
        "wave {wave}: canary tenant {tenant:?} failed; retry it, or resume with --accept-canary-failure to go on without it"
    )]
    CanaryFailed { wave: String, tenant: String },
}

/// Whether resuming may pass a canary stage that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryFailure {
    /// Refuse to resume while a canary tenant is failed.
    Refuse,
    /// The operator accepts the failure: the rest of the fleet may start.
    Accept,
}

/// Tenants per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub total: u64,
    pub pending: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl Counts {
    fn slot(&mut self, state: TenantState) -> &mut u64 {
        match state {
            TenantState::Pending => &mut self.pending,
            TenantState::Running => &mut self.running,
            TenantState::Succeeded => &mut self.succeeded,
            TenantState::Failed => &mut self.failed,
            TenantState::Cancelled => &mut self.cancelled,
        }
    }

    fn add(&mut self, state: TenantState) {
        *self.slot(state) += 1;
    }

    fn moved(&mut self, from: TenantState, to: TenantState) {
        let s = self.slot(from);
        *s = s.saturating_sub(1);
        self.add(to);
    }
}

/// A wave as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct WaveStatus {
    pub id: String,
    pub bundle_id: String,
    pub state: WaveState,
    pub reason: Option<String>,
    pub counts: Counts,
    pub policy: Policy,
    pub created_at_ms: u64,
    pub history: Vec<StateChange>,
}

/// A tenant run as operators see it: no secrets.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantView {
    pub seq: u32,
    pub tenant_id: String,
    pub host: String,
    pub dsn: String,
    pub labels: BTreeMap<String, String>,
    pub canary: bool,
    pub state: TenantState,
    pub attempts: u32,
    pub last_error: Option<ErrorRecord>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
}

impl From<&TenantRecord> for TenantView {
    fn from(t: &TenantRecord) -> Self {
        Self {
            seq: t.seq,
            tenant_id: t.tenant_id.clone(),
            host: t.host.clone(),
            dsn: t.dsn_redacted.clone(),
            labels: t.labels.clone(),
            canary: t.canary,
            state: t.state,
            attempts: t.attempts,
            last_error: t.last_error.clone(),
            started_at_ms: t.started_at_ms,
            finished_at_ms: t.finished_at_ms,
        }
    }
}

/// A change in a wave, broadcast to watchers.
#[derive(Debug, Clone)]
pub struct WaveEvent {
    pub wave_id: String,
    pub state: WaveState,
    pub counts: Counts,
    /// The tenant that changed, if one did.
    pub tenant: Option<TenantView>,
}

/// The runtime of one wave.
struct Wave {
    id: String,
    bundle: Arc<Bundle>,
    inner: Mutex<WaveInner>,
    wake: Notify,
    events: broadcast::Sender<WaveEvent>,
    limiter: Option<DefaultDirectRateLimiter>,
}

struct WaveInner {
    record: WaveRecord,
    /// Every tenant by `seq` while the wave is unfinished. A finished wave keeps only
    /// its counts in memory (`tenants_in_store`): its tenants are read from the store
    /// when asked for, so a daemon holding months of waves holds no tenant records.
    tenants: Vec<TenantRecord>,
    tenants_in_store: bool,
    /// Set by `forget` under the lock: nothing may write this wave any more.
    forgotten: bool,
    counts: Counts,
    queue: Queue,
    stops: HashMap<u32, StopSignal>,
    canaries: u32,
    dispatching: bool,
}

enum Decision {
    Start {
        seq: u32,
        generation: u64,
        sealed: String,
        stop: StopSignal,
    },
    Wait,
    WaitUntil(Instant),
    Exit,
}

impl Wave {
    fn lock(&self) -> MutexGuard<'_, WaveInner> {
        // A panic while holding this lock would be a bug; the state is still consistent
        // record by record, so keep serving rather than poison every later call.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(inner: &WaveInner) -> WaveStatus {
        WaveStatus {
            id: inner.record.id.clone(),
            bundle_id: inner.record.bundle_id.clone(),
            state: inner.record.state,
            reason: inner.record.reason.clone(),
            counts: inner.counts,
            policy: inner.record.policy.clone(),
            created_at_ms: inner.record.created_at_ms,
            history: inner.record.history.clone(),
        }
    }

    fn emit(&self, inner: &WaveInner, tenant: Option<&TenantRecord>) {
        // No receivers is fine; a slow receiver lags and resyncs, it never blocks us.
        let _ = self.events.send(WaveEvent {
            wave_id: self.id.clone(),
            state: inner.record.state,
            counts: inner.counts,
            tenant: tenant.map(TenantView::from),
        });
    }
}

impl WaveInner {
    fn transition(&mut self, to: WaveState, actor: &str, reason: &str) {
        let from = self.record.state;
        self.record.state = to;
        self.record.reason = (!reason.is_empty()).then(|| reason.to_string());
        self.record.history.push(StateChange {
            from: Some(from),
            to,
            actor: actor.to_string(),
            reason: reason.to_string(),
            at_ms: now_ms(),
        });
        tracing::info!(wave = %self.record.id, from = from.as_str(), to = to.as_str(), actor, reason, "wave state changed");
    }

    /// Drops a finished wave's tenant records from memory; the store holds them.
    fn release_tenants(&mut self) {
        self.tenants = Vec::new();
        self.tenants_in_store = true;
    }

    /// Records something that happened to the wave without changing its state.
    fn note(&mut self, state: WaveState, actor: &str, reason: &str) {
        self.record.reason = Some(reason.to_string());
        self.record.history.push(StateChange {
            from: Some(state),
            to: state,
            actor: actor.to_string(),
            reason: reason.to_string(),
            at_ms: now_ms(),
        });
    }

    fn set_tenant(&mut self, seq: u32, to: TenantState) {
        let t = &mut self.tenants[seq as usize];
        let from = t.state;
        t.state = to;
        self.counts.moved(from, to);
    }

    fn limits(&self) -> Limits {
        let p = &self.record.policy;
        Limits {
            concurrency: p.concurrency,
            per_host: p.per_host,
            gate: if self.record.canary_passed || self.canaries == 0 {
                u32::MAX
            } else {
                self.canaries
            },
        }
    }
}

struct EngineInner {
    store: Arc<dyn ProgressStore>,
    sealer: Sealer,
    reach: Reach,
    retention: Option<Duration>,
    waves: Mutex<BTreeMap<String, Arc<Wave>>>,
    /// Stored waves this build cannot load, by id, with why: shown as `FAILED`
    /// (`unloadable: …`), never run, never rewritten, forgettable.
    unloadable: Mutex<BTreeMap<String, String>>,
    draining: CancellationToken,
    tasks: TaskTracker,
}

/// Runs every wave of one daemon. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

/// How an engine runs, beyond its store.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Where tenant connections may go (`allowed_hosts`) and the ambient password.
    pub reach: Reach,
    /// Finished waves older than this are forgotten (`wave_retention`); `None` keeps
    /// them.
    pub retention: Option<Duration>,
}

/// How often finished waves are checked against the retention.
const RETENTION_SWEEP: Duration = Duration::from_secs(3600);

impl Engine {
    /// Opens the data dir with default options and resumes its waves. Must run inside a
    /// Tokio runtime.
    pub fn open(data_dir: &Path) -> Result<Self, EngineError> {
        Self::open_with(data_dir, EngineOptions::default())
    }

    /// Opens the data dir and resumes its waves. Must run inside a Tokio runtime.
    pub fn open_with(data_dir: &Path, options: EngineOptions) -> Result<Self, EngineError> {
        let store = SledStore::open(data_dir)?;
        let sealer = Sealer::open_or_create(&data_dir.join("secret.key"))?;
        Self::with_store(Arc::new(store), sealer, options)
    }

    /// Opens with any store (a shared store later; tests). A wave that cannot be
    /// loaded (an undecodable record, a bundle or policy today's rules refuse) is
    /// quarantined: the daemon starts, that wave shows `FAILED` with the reason, and
    /// the others run. Only the store itself failing is an error.
    pub fn with_store(
        store: Arc<dyn ProgressStore>,
        sealer: Sealer,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        let engine = Self {
            inner: Arc::new(EngineInner {
                store,
                sealer,
                reach: options.reach,
                retention: options.retention,
                waves: Mutex::new(BTreeMap::new()),
                unloadable: Mutex::new(BTreeMap::new()),
                draining: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        };
        let mut records = engine.inner.store.load_waves()?;
        records.sort_by(|a, b| a.0.cmp(&b.0));
        engine.collect_bundles(&records)?;
        for (id, record) in records {
            match engine.load_wave(record) {
                Ok(wave) => {
                    if !wave.lock().record.state.is_finished() {
                        engine.ensure_dispatcher(&wave);
                    }
                }
                Err(e) => {
                    let reason = format!("unloadable: {e}");
                    tracing::error!(wave = %id, %reason, "a stored wave cannot be loaded; it is quarantined (shown FAILED, not run); `flotilla wave forget` removes it");
                    engine.unloadable_lock().insert(id, reason);
                }
            }
        }
        engine.start_retention_sweeps();
        Ok(engine)
    }

    /// Deletes stored bundles no stored wave uses (left by `forget` and retention, which
    /// never delete one while the daemon runs: a new wave may be storing it). Skipped
    /// when a wave record cannot be decoded: its bundle is unknown.
    fn collect_bundles(&self, records: &[crate::store::StoredWave]) -> Result<(), EngineError> {
        let mut used = std::collections::HashSet::new();
        for (_, record) in records {
            match record {
                Ok(r) => used.insert(r.bundle_id.as_str()),
                Err(_) => return Ok(()),
            };
        }
        for id in self.inner.store.bundle_ids()? {
            if !used.contains(id.as_str()) {
                self.inner.store.delete_bundle(&id)?;
                tracing::info!(bundle = %id, "deleted a bundle no wave uses");
            }
        }
        Ok(())
    }

    /// Builds one stored wave's runtime and registers it.
    fn load_wave(&self, record: Result<WaveRecord, StoreError>) -> Result<Arc<Wave>, EngineError> {
        let mut record = record?;
        record.policy = record.policy.upgraded();
        record.policy.validate()?;
        let bundle = Arc::new(self.inner.store.load_bundle(&record.bundle_id)?);
        let mut tenants = self.inner.store.load_tenants(&record.id)?;
        // A tenant interrupted mid-run goes back to the queue (its log will tell the
        // applier what happened) — unless the wave was cancelled: nothing starts in a
        // cancelled wave, so it would wait for ever. Its log still says what ran.
        let interrupted = if record.state == WaveState::Cancelled {
            TenantState::Cancelled
        } else {
            TenantState::Pending
        };
        for t in tenants.iter_mut().filter(|t| {
            t.state == TenantState::Running
                || (t.state == TenantState::Pending && interrupted == TenantState::Cancelled)
        }) {
            t.state = interrupted;
            if interrupted == TenantState::Cancelled {
                t.finished_at_ms = Some(now_ms());
            }
            self.inner.store.save_tenant(&record.id, t)?;
        }
        let wave = build_wave(record, tenants, bundle)?;
        self.waves_lock().insert(wave.id.clone(), wave.clone());
        Ok(wave)
    }

    fn unloadable_lock(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        self.inner
            .unloadable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn waves_lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Wave>>> {
        self.inner.waves.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wave(&self, id: &str) -> Result<Arc<Wave>, EngineError> {
        if let Some(reason) = self.unloadable_lock().get(id) {
            return Err(EngineError::Unloadable {
                wave: id.to_string(),
                reason: reason.clone(),
            });
        }
        self.waves_lock()
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(id.to_string()))
    }

    /// Creates a wave and starts it. The bundle and every tenant are stored durably
    /// before this returns the wave id.
    pub fn start_wave(
        &self,
        bundle: Bundle,
        tenants: Vec<Tenant>,
        policy: Policy,
        actor: &str,
    ) -> Result<String, EngineError> {
        if self.inner.draining.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        policy.validate()?;
        if tenants.is_empty() {
            return Err(EngineError::Targets("no tenants".into()));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = tenants.iter().find(|t| !seen.insert(t.id.as_str())) {
            return Err(EngineError::Targets(format!(
                "duplicate tenant id {:?}",
                dup.id
            )));
        }
        // Canaries first, then by id: a deterministic order that `seq` records.
        let mut ordered = tenants;
        ordered.sort_by(|a, b| a.id.cmp(&b.id));
        let is_canary: Vec<bool> = match &policy.canary {
            Canary::None => vec![false; ordered.len()],
            Canary::Count { count } => (0..ordered.len()).map(|i| i < *count as usize).collect(),
            Canary::Label { key, value } => ordered
                .iter()
                .map(|t| t.labels.get(key) == Some(value))
                .collect(),
        };
        if let Canary::Label { key, value } = &policy.canary
            && !is_canary.iter().any(|c| *c)
        {
            // An empty canary stage would pass at once and open the gate for everyone.
            return Err(EngineError::Policy(PolicyError(format!(
                "canary label {key}={value} matches no tenant of the wave"
            ))));
        }
        let mut indexed: Vec<(bool, Tenant)> = is_canary.into_iter().zip(ordered).collect();
        indexed.sort_by_key(|(canary, _)| !*canary);

        let id = uuid::Uuid::now_v7().to_string();
        let records: Vec<TenantRecord> = indexed
            .iter()
            .enumerate()
            .map(|(seq, (canary, t))| TenantRecord {
                format: FORMAT,
                seq: seq as u32,
                tenant_id: t.id.clone(),
                dsn_sealed: self.inner.sealer.seal(t.dsn.secret_text()),
                dsn_redacted: t.dsn.to_string(),
                host: t.dsn.host().to_string(),
                labels: t.labels.clone(),
                canary: *canary,
                state: TenantState::Pending,
                attempts: 0,
                retries_used: 0,
                generation: 0,
                last_error: None,
                busy_since_ms: None,
                started_at_ms: None,
                finished_at_ms: None,
            })
            .collect();
        let now = now_ms();
        let record = WaveRecord {
            format: FORMAT,
            id: id.clone(),
            bundle_id: bundle.id().to_string(),
            policy,
            state: WaveState::Running,
            reason: None,
            created_at_ms: now,
            canary_passed: false,
            history: vec![StateChange {
                from: None,
                to: WaveState::Running,
                actor: actor.to_string(),
                reason: format!("started over {} tenants", records.len()),
                at_ms: now,
            }],
        };
        // Everything the runtime needs is computed before the first write: a wave that
        // is stored can always be loaded again.
        let wave = build_wave(record.clone(), records.clone(), Arc::new(bundle))?;
        self.inner.store.save_bundle(&wave.bundle)?;
        self.inner.store.create_wave(&record, &records)?;
        self.waves_lock().insert(id.clone(), wave.clone());
        tracing::info!(wave = %id, "wave started");
        self.ensure_dispatcher(&wave);
        Ok(id)
    }

    fn ensure_dispatcher(&self, wave: &Arc<Wave>) {
        let mut inner = wave.lock();
        if inner.dispatching || self.inner.draining.is_cancelled() {
            return;
        }
        inner.dispatching = true;
        drop(inner);
        let engine = self.clone();
        let wave = wave.clone();
        self.inner.tasks.spawn(async move {
            let span =
                tracing::info_span!("wave", wave_id = %wave.id, bundle_id = %wave.bundle.id());
            engine.dispatch(wave).instrument(span).await
        });
    }

    /// One wave's dispatcher: starts tenants while the policy allows, until the wave
    /// finishes, or the daemon drains.
    async fn dispatch(self, wave: Arc<Wave>) {
        loop {
            let notified = wave.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(limiter) = &wave.limiter
                && self.can_start(&wave)
            {
                tokio::select! {
                    _ = limiter.until_ready() => {}
                    _ = self.inner.draining.cancelled() => {}
                }
            }
            match self.decide(&wave) {
                Decision::Start {
                    seq,
                    generation,
                    sealed,
                    stop,
                } => self.spawn_tenant(&wave, seq, generation, sealed, stop),
                Decision::Wait => {
                    tokio::select! {
                        _ = notified => {}
                        _ = self.inner.draining.cancelled() => {}
                    }
                }
                Decision::WaitUntil(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.inner.draining.cancelled() => {}
                    }
                }
                Decision::Exit => return,
            }
        }
    }

    fn can_start(&self, wave: &Wave) -> bool {
        let mut inner = wave.lock();
        inner.record.state == WaveState::Running
            && inner.queue.running() < inner.record.policy.concurrency
            && {
                inner.queue.promote_due(Instant::now());
                !inner.queue.is_empty()
            }
    }

    fn decide(&self, wave: &Wave) -> Decision {
        let mut inner = wave.lock();
        let draining = self.inner.draining.is_cancelled();
        let decision = match inner.record.state {
            WaveState::Running if draining => Decision::Exit,
            WaveState::Running => {
                inner.queue.promote_due(Instant::now());
                let limits = inner.limits();
                if let Some((seq, _host)) = inner.queue.take_next(limits) {
                    let stop = StopSignal::new();
                    inner.stops.insert(seq, stop.clone());
                    inner.set_tenant(seq, TenantState::Running);
                    let t = &mut inner.tenants[seq as usize];
                    t.attempts += 1;
                    t.generation += 1;
                    t.started_at_ms = Some(now_ms());
                    t.finished_at_ms = None;
                    let (generation, sealed) = (t.generation, t.dsn_sealed.clone());
                    // Not stored: a tenant found RUNNING on open is queued again anyway,
                    // so recording the start would buy nothing but a write per tenant.
                    let t = inner.tenants[seq as usize].clone();
                    wave.emit(&inner, Some(&t));
                    Decision::Start {
                        seq,
                        generation,
                        sealed,
                        stop,
                    }
                } else if inner.queue.running() == 0 && inner.queue.is_empty() {
                    if inner.counts.succeeded + inner.counts.failed + inner.counts.cancelled
                        == inner.counts.total
                    {
                        let (to, reason) =
                            if inner.counts.failed == 0 && inner.counts.cancelled == 0 {
                                (WaveState::Completed, String::new())
                            } else {
                                (
                                    WaveState::Failed,
                                    format!(
                                        "{} of {} tenants failed",
                                        inner.counts.failed, inner.counts.total
                                    ),
                                )
                            };
                        inner.transition(to, DAEMON_ACTOR, &reason);
                        self.save_wave(&inner);
                        wave.emit(&inner, None);
                        Decision::Exit
                    } else {
                        // Gated by the canary stage with nothing left to run: wait.
                        Decision::Wait
                    }
                } else if let Some(at) = inner.queue.next_due() {
                    Decision::WaitUntil(at)
                } else {
                    Decision::Wait
                }
            }
            WaveState::Pending | WaveState::Paused if draining => Decision::Exit,
            WaveState::Pending | WaveState::Paused => Decision::Wait,
            WaveState::Cancelled if inner.queue.running() > 0 && !draining => Decision::Wait,
            WaveState::Cancelled | WaveState::Completed | WaveState::Failed => Decision::Exit,
        };
        if matches!(decision, Decision::Exit) {
            inner.dispatching = false;
            if inner.record.state.is_finished() && inner.queue.running() == 0 {
                inner.release_tenants();
            }
        }
        decision
    }

    fn save_wave(&self, inner: &WaveInner) {
        if let Err(e) = self.inner.store.save_wave(&inner.record) {
            tracing::error!(wave = %inner.record.id, error = %e, "cannot store the wave state");
        }
    }

    fn spawn_tenant(
        &self,
        wave: &Arc<Wave>,
        seq: u32,
        generation: u64,
        sealed: String,
        stop: StopSignal,
    ) {
        let engine = self.clone();
        let wave = wave.clone();
        // A child of the dispatcher's wave span, with what a trace needs to find a tenant.
        let span = {
            let inner = wave.lock();
            let t = &inner.tenants[seq as usize];
            tracing::info_span!(
                "tenant",
                wave_id = %wave.id,
                tenant_id = %t.tenant_id,
                host = %t.host,
                attempt = t.attempts,
                decision = tracing::field::Empty,
                sqlstate = tracing::field::Empty,
                failed_script = tracing::field::Empty,
                error = tracing::field::Empty,
            )
        };
        let task = async move {
            let policy = wave.lock().record.policy.clone();
            let outcome = match engine
                .inner
                .sealer
                .open(&sealed)
                .map(|text| Dsn::parse(&text))
            {
                Ok(Ok(dsn)) => {
                    let run = TenantRun {
                        bundle: &wave.bundle,
                        wave_id: &wave.id,
                        dsn: &dsn,
                        reach: &engine.inner.reach,
                        settings: policy.session_settings(),
                        mode: policy.transaction,
                        plan_options: policy.plan_options(),
                    };
                    apply_tenant(&run, &stop).await
                }
                Ok(Err(e)) => failed_before_start(e.to_string()),
                Err(e) => failed_before_start(e.to_string()),
            };
            engine.finish_tenant(&wave, seq, generation, outcome);
        };
        self.inner.tasks.spawn(task.instrument(span));
    }

    fn finish_tenant(&self, wave: &Wave, seq: u32, generation: u64, outcome: Outcome) {
        let mut inner = wave.lock();
        if inner.forgotten {
            return;
        }
        let Some(current) = inner.tenants.get(seq as usize) else {
            return;
        };
        if current.generation != generation || current.state != TenantState::Running {
            tracing::warn!(wave = %wave.id, seq, generation, "dropping a stale tenant result");
            return;
        }
        let host = current.host.clone();
        inner.queue.finished(&host);
        inner.stops.remove(&seq);
        let policy = inner.record.policy.clone();
        let cancelled_wave = inner.record.state == WaveState::Cancelled;
        let now = Instant::now();
        let next = match &outcome {
            Outcome::UpToDate { .. } | Outcome::Applied { .. } => TenantState::Succeeded,
            Outcome::Cancelled { .. } => TenantState::Cancelled,
            Outcome::Busy { .. } if cancelled_wave => TenantState::Cancelled,
            Outcome::Busy { holder } => {
                // Someone else holds the tenant: not a failure and not a retry spent,
                // until it has lasted longer than the policy's busy_timeout.
                let t = &mut inner.tenants[seq as usize];
                let wall = now_ms();
                let since = *t.busy_since_ms.get_or_insert(wall);
                let why = format!(
                    "busy: {}",
                    holder
                        .as_deref()
                        .unwrap_or("the Flotilla advisory lock is held by another session")
                );
                let busy_for = wall.saturating_sub(since);
                let gave_up = busy_for >= policy.busy_timeout_ms;
                t.last_error = Some(ErrorRecord {
                    script: None,
                    sqlstate: None,
                    message: if gave_up {
                        format!(
                            "{why}; still busy after {} (busy_timeout)",
                            humantime::format_duration(Duration::from_millis(busy_for))
                        )
                    } else {
                        why
                    },
                    retryability: if gave_up {
                        crate::failure::Retryability::Permanent
                    } else {
                        crate::failure::Retryability::Retryable
                    },
                });
                if gave_up {
                    TenantState::Failed
                } else {
                    let busy_round = t.attempts;
                    let delay = policy
                        .backoff(busy_round.min(6))
                        .max(Duration::from_millis(200));
                    inner.queue.push_delayed(seq, &host, now + delay);
                    TenantState::Pending
                }
            }
            Outcome::Failed { error, .. } => {
                let t = &mut inner.tenants[seq as usize];
                t.last_error = Some(ErrorRecord {
                    script: error.script().map(str::to_string),
                    sqlstate: error.sqlstate().map(str::to_string),
                    message: error.to_string(),
                    retryability: error.retryability(),
                });
                let retryable = error.retryability() == crate::failure::Retryability::Retryable;
                if retryable && t.retries_used < policy.retries && !cancelled_wave {
                    t.retries_used += 1;
                    let delay = policy.backoff(t.retries_used);
                    tracing::info!(wave = %wave.id, tenant = %t.tenant_id, error = %error, ?delay, "retryable failure; retrying later");
                    inner.queue.push_delayed(seq, &host, now + delay);
                    TenantState::Pending
                } else {
                    tracing::warn!(wave = %wave.id, tenant = %t.tenant_id, error = %error, "tenant failed");
                    TenantState::Failed
                }
            }
        };
        let decision = match next {
            TenantState::Succeeded => RunDecision::Succeeded,
            TenantState::Failed => RunDecision::Failed,
            TenantState::Cancelled => RunDecision::Cancelled,
            _ if matches!(outcome, Outcome::Busy { .. }) => RunDecision::Busy,
            _ => RunDecision::Retried,
        };
        crate::telemetry::metrics::runs().record(&outcome, decision);
        record_on_span(&outcome, decision);
        inner.set_tenant(seq, next);
        if !matches!(outcome, Outcome::Busy { .. }) {
            inner.tenants[seq as usize].busy_since_ms = None;
        }
        if next == TenantState::Succeeded {
            inner.tenants[seq as usize].last_error = None;
        }
        if next != TenantState::Pending {
            inner.tenants[seq as usize].finished_at_ms = Some(now_ms());
        }
        let t = inner.tenants[seq as usize].clone();
        if let Err(e) = self.inner.store.save_tenant(&wave.id, &t) {
            tracing::error!(wave = %wave.id, error = %e, "cannot record a tenant result");
        }
        self.after_tenant(&mut inner, &t);
        wave.emit(&inner, Some(&t));
        drop(inner);
        wave.wake.notify_one();
    }

    /// Canary and failure-budget decisions after a tenant finished.
    fn after_tenant(&self, inner: &mut WaveInner, t: &TenantRecord) {
        // Every canary's outcome counts, whatever the wave's state when it arrives: a
        // canary that fails while an operator has the wave paused must still keep the
        // rest of the fleet from starting.
        if t.canary && !inner.record.canary_passed {
            if t.state == TenantState::Failed {
                let reason = format!(
                    "canary tenant {} failed: {}; retry it, or resume with --accept-canary-failure",
                    t.tenant_id,
                    t.last_error
                        .as_ref()
                        .map(|e| e.message.as_str())
                        .unwrap_or("")
                );
                match inner.record.state {
                    WaveState::Running => {
                        inner.transition(WaveState::Paused, DAEMON_ACTOR, &reason);
                    }
                    WaveState::Paused | WaveState::Pending => {
                        let state = inner.record.state;
                        inner.note(state, DAEMON_ACTOR, &reason);
                    }
                    _ => return,
                }
                self.save_wave(inner);
                return;
            }
            let all_passed = inner
                .tenants
                .iter()
                .filter(|c| c.canary)
                .all(|c| c.state == TenantState::Succeeded);
            if all_passed {
                inner.record.canary_passed = true;
                if inner.record.policy.after_canary == AfterCanary::Pause
                    && inner.record.state == WaveState::Running
                {
                    inner.transition(
                        WaveState::Paused,
                        DAEMON_ACTOR,
                        "canary stage succeeded; resume to continue",
                    );
                }
                self.save_wave(inner);
                return;
            }
        }
        if inner.record.state != WaveState::Running {
            return;
        }
        let budget = inner.record.policy.max_failures;
        if t.state == TenantState::Failed
            && budget.exceeded(inner.counts.failed, inner.counts.total)
        {
            let reason = format!(
                "failure budget exceeded: {} of {} tenants failed (budget {budget:?})",
                inner.counts.failed, inner.counts.total
            );
            inner.transition(WaveState::Paused, DAEMON_ACTOR, &reason);
            self.save_wave(inner);
        }
    }

    fn command(
        &self,
        id: &str,
        actor: &str,
        action: &'static str,
        apply: impl FnOnce(&mut WaveInner) -> Result<Vec<u32>, EngineError>,
    ) -> Result<WaveStatus, EngineError> {
        let wave = self.wave(id)?;
        let mut inner = wave.lock();
        if inner.tenants_in_store {
            inner.tenants = self.inner.store.load_tenants(id)?;
            inner.tenants_in_store = false;
        }
        if inner.forgotten {
            return Err(EngineError::NotFound(id.to_string()));
        }
        let applied = apply(&mut inner).and_then(|changed_tenants| {
            // Durable before acknowledged: tenants first, the wave record (flushed) last.
            for seq in changed_tenants {
                self.inner
                    .store
                    .save_tenant(id, &inner.tenants[seq as usize])?;
            }
            self.inner.store.save_wave(&inner.record)?;
            Ok(())
        });
        // Only once its tenants are stored may a finished wave let go of them.
        if inner.record.state.is_finished() && inner.queue.running() == 0 {
            inner.release_tenants();
        }
        applied?;
        wave.emit(&inner, None);
        let status = Wave::status(&inner);
        drop(inner);
        tracing::info!(wave = %id, actor, action, "operator command");
        wave.wake.notify_one();
        if status.state == WaveState::Running {
            self.ensure_dispatcher(&wave);
        }
        Ok(status)
    }

    /// Stops new tenant starts at once; tenants in flight finish their bundle.
    pub fn pause(&self, id: &str, actor: &str, reason: &str) -> Result<WaveStatus, EngineError> {
        self.command(id, actor, "pause", |inner| match inner.record.state {
            WaveState::Running | WaveState::Pending => {
                inner.transition(WaveState::Paused, actor, reason);
                Ok(Vec::new())
            }
            state => Err(EngineError::InvalidState {
                wave: id.to_string(),
                state,
                action: "pause",
            }),
        })
    }

    /// Continues a paused wave. A wave whose canary failed (and was not retried to
    /// success) resumes only when the operator accepts that failure.
    pub fn resume(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        canary_failure: CanaryFailure,
    ) -> Result<WaveStatus, EngineError> {
        self.command(id, actor, "resume", |inner| match inner.record.state {
            WaveState::Paused | WaveState::Pending => {
                if !inner.record.canary_passed
                    && let Some(failed) = inner
                        .tenants
                        .iter()
                        .find(|t| t.canary && t.state == TenantState::Failed)
                {
                    if canary_failure == CanaryFailure::Refuse {
                        return Err(EngineError::CanaryFailed {
                            wave: id.to_string(),
                            tenant: failed.tenant_id.clone(),
                        });
                    }
                    inner.record.canary_passed = true;
                    inner.note(
                        inner.record.state,
                        actor,
                        "the canary stage's failures are accepted",
                    );
                }
                inner.transition(WaveState::Running, actor, reason);
                Ok(Vec::new())
            }
            state => Err(EngineError::InvalidState {
                wave: id.to_string(),
                state,
                action: "resume",
            }),
        })
    }

    /// Stops new starts; in-flight tenants stop at their next script boundary; waiting
    /// tenants become `CANCELLED`.
    pub fn cancel(&self, id: &str, actor: &str, reason: &str) -> Result<WaveStatus, EngineError> {
        self.command(id, actor, "cancel", |inner| {
            if inner.record.state.is_finished() {
                return Err(EngineError::InvalidState {
                    wave: id.to_string(),
                    state: inner.record.state,
                    action: "cancel",
                });
            }
            inner.transition(WaveState::Cancelled, actor, reason);
            let waiting = inner.queue.drain_waiting();
            for &seq in &waiting {
                inner.set_tenant(seq, TenantState::Cancelled);
                inner.tenants[seq as usize].finished_at_ms = Some(now_ms());
            }
            for stop in inner.stops.values() {
                stop.stop_at_boundary();
            }
            Ok(waiting)
        })
    }

    /// Puts the failed tenants of a finished or paused wave back to `PENDING`. A
    /// finished wave runs again; a paused one stays paused until resumed.
    pub fn retry(&self, id: &str, actor: &str, reason: &str) -> Result<WaveStatus, EngineError> {
        self.command(id, actor, "retry", |inner| {
            match inner.record.state {
                WaveState::Failed | WaveState::Completed | WaveState::Paused => {}
                state => {
                    return Err(EngineError::InvalidState {
                        wave: id.to_string(),
                        state,
                        action: "retry",
                    });
                }
            }
            let failed: Vec<(u32, String)> = inner
                .tenants
                .iter()
                .filter(|t| t.state == TenantState::Failed)
                .map(|t| (t.seq, t.host.clone()))
                .collect();
            if failed.is_empty() {
                return Err(EngineError::NothingToRetry(id.to_string()));
            }
            for (seq, host) in &failed {
                inner.set_tenant(*seq, TenantState::Pending);
                let t = &mut inner.tenants[*seq as usize];
                t.retries_used = 0;
                t.finished_at_ms = None;
                inner.queue.push_ready(*seq, host);
            }
            let why = if reason.is_empty() {
                format!("retry {} failed tenants", failed.len())
            } else {
                reason.to_string()
            };
            if inner.record.state == WaveState::Paused {
                inner.note(WaveState::Paused, actor, &why);
            } else {
                inner.transition(WaveState::Running, actor, &why);
            }
            Ok(failed.iter().map(|(seq, _)| *seq).collect())
        })
    }

    /// One wave's status.
    pub fn status(&self, id: &str) -> Result<WaveStatus, EngineError> {
        if let Some(reason) = self.unloadable_lock().get(id) {
            return Ok(unloadable_status(id, reason));
        }
        let wave = self.wave(id)?;
        let inner = wave.lock();
        Ok(Wave::status(&inner))
    }

    /// Every wave, newest first (ids are UUIDv7: they sort by creation time),
    /// quarantined ones included.
    pub fn list(&self) -> Vec<WaveStatus> {
        let waves: Vec<Arc<Wave>> = self.waves_lock().values().cloned().collect();
        let mut all: Vec<WaveStatus> = waves.iter().map(|w| Wave::status(&w.lock())).collect();
        all.extend(
            self.unloadable_lock()
                .iter()
                .map(|(id, reason)| unloadable_status(id, reason)),
        );
        all.sort_by(|a, b| b.id.cmp(&a.id));
        all
    }

    /// Removes a finished wave (or a quarantined one) from the daemon and its store:
    /// status, tenants and history are gone for good; the tenants' own execution logs
    /// keep what ran. A wave that is not finished must be cancelled first.
    pub fn forget(&self, id: &str, actor: &str, reason: &str) -> Result<(), EngineError> {
        self.forget_if(id, actor, reason, |_| true)
    }

    /// [`Engine::forget`] when `still_wanted` holds for the wave's record, checked under
    /// the wave's lock together with its state: nothing can change it in between.
    fn forget_if(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        still_wanted: impl FnOnce(&WaveRecord) -> bool,
    ) -> Result<(), EngineError> {
        if self.unloadable_lock().contains_key(id) {
            self.inner.store.delete_wave(id)?;
            self.unloadable_lock().remove(id);
            tracing::info!(wave = %id, actor, reason, "quarantined wave forgotten");
            return Ok(());
        }
        let wave = self.wave(id)?;
        {
            let mut inner = wave.lock();
            let state = inner.record.state;
            if !state.is_finished() || inner.queue.running() > 0 {
                return Err(EngineError::InvalidState {
                    wave: id.to_string(),
                    state,
                    action: "forget (cancel it first, and let its running tenants stop)",
                });
            }
            if !still_wanted(&inner.record) {
                return Ok(());
            }
            // From here no command, result or dispatcher writes this wave again, so
            // deleting its records cannot race a retry writing them back.
            inner.forgotten = true;
        }
        self.waves_lock().remove(id);
        self.inner.store.delete_wave(id)?;
        // Its bundle is collected when the daemon next opens the store, if no wave
        // uses it then: deleting it now could race a new wave storing the same bundle.
        tracing::info!(wave = %id, actor, reason, "wave forgotten");
        Ok(())
    }

    /// Finished waves whose last change is older than `cutoff` (ms since the epoch).
    fn expired(&self, cutoff: u64) -> Vec<String> {
        let waves: Vec<Arc<Wave>> = self.waves_lock().values().cloned().collect();
        waves
            .iter()
            .filter(|w| {
                let inner = w.lock();
                inner.record.state.is_finished() && last_change(&inner.record) < cutoff
            })
            .map(|w| w.id.clone())
            .collect()
    }

    /// Forgets finished waves past the retention now; returns how many.
    pub fn sweep_retention(&self) -> usize {
        let Some(retention) = self.inner.retention else {
            return 0;
        };
        let cutoff =
            now_ms().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let reason = format!(
            "finished more than {} ago (wave_retention)",
            humantime::format_duration(retention)
        );
        let mut forgotten = 0;
        for id in self.expired(cutoff) {
            // Checked again under the lock: a retry may have revived it meanwhile.
            let still_expired = |r: &WaveRecord| last_change(r) < cutoff;
            match self.forget_if(&id, DAEMON_ACTOR, &reason, still_expired) {
                Ok(()) => forgotten += 1,
                Err(EngineError::InvalidState { .. } | EngineError::NotFound(_)) => {}
                Err(e) => tracing::warn!(wave = %id, error = %e, "cannot forget an expired wave"),
            }
        }
        forgotten
    }

    fn start_retention_sweeps(&self) {
        if self.inner.retention.is_none() {
            return;
        }
        let engine = self.clone();
        self.inner.tasks.spawn(async move {
            loop {
                let sweeper = engine.clone();
                // Store deletes flush: off the runtime threads.
                let _ = tokio::task::spawn_blocking(move || sweeper.sweep_retention()).await;
                tokio::select! {
                    _ = tokio::time::sleep(RETENTION_SWEEP) => {}
                    _ = engine.inner.draining.cancelled() => return,
                }
            }
        });
    }

    /// A wave's tenants in `seq` order, optionally only those in `state`, starting at
    /// `from_seq`. Paging by `seq` (not by position in the filtered list) means a tenant
    /// that changes state between two pages is neither skipped nor repeated.
    pub fn tenants(
        &self,
        id: &str,
        state: Option<TenantState>,
        from_seq: u32,
        limit: usize,
    ) -> Result<Vec<TenantView>, EngineError> {
        let pick = |tenants: &[TenantRecord]| {
            tenants
                .iter()
                .skip(from_seq as usize)
                .filter(|t| state.is_none_or(|s| t.state == s))
                .take(limit)
                .map(TenantView::from)
                .collect()
        };
        self.with_tenants(id, pick)
    }

    /// Runs `read` over a wave's tenants: in memory while the wave runs, read from the
    /// store (without holding the wave's lock) once it finished.
    fn with_tenants<T>(
        &self,
        id: &str,
        read: impl FnOnce(&[TenantRecord]) -> T,
    ) -> Result<T, EngineError> {
        if self.unloadable_lock().contains_key(id) {
            return Ok(read(&[]));
        }
        let wave = self.wave(id)?;
        {
            let inner = wave.lock();
            if inner.forgotten {
                return Err(EngineError::NotFound(id.to_string()));
            }
            if !inner.tenants_in_store {
                return Ok(read(&inner.tenants));
            }
        }
        Ok(read(&self.inner.store.load_tenants(id)?))
    }

    /// Tenants running now per database server, over every unfinished wave; servers of
    /// those waves with nothing running report 0, so a gauge falls back to zero.
    pub fn running_per_host(&self) -> BTreeMap<String, u64> {
        let waves: Vec<Arc<Wave>> = self.waves_lock().values().cloned().collect();
        let mut out = BTreeMap::new();
        for wave in waves {
            let inner = wave.lock();
            if inner.record.state.is_finished() && inner.counts.running == 0 {
                continue;
            }
            for t in &inner.tenants {
                *out.entry(t.host.clone()).or_insert(0) +=
                    u64::from(t.state == TenantState::Running);
            }
        }
        out
    }

    /// A snapshot and the stream of changes after it.
    pub fn watch(
        &self,
        id: &str,
    ) -> Result<(WaveStatus, broadcast::Receiver<WaveEvent>), EngineError> {
        let wave = self.wave(id)?;
        let inner = wave.lock();
        // Subscribing under the lock: no event falls between snapshot and stream.
        let rx = wave.events.subscribe();
        Ok((Wave::status(&inner), rx))
    }

    /// The connection string of one tenant of a wave, unsealed: for reading its log on
    /// an operator's request. Never returned to a client.
    pub fn tenant_dsn(&self, id: &str, tenant_id: &str) -> Result<Dsn, EngineError> {
        let sealed = self
            .with_tenants(id, |tenants| {
                tenants
                    .iter()
                    .find(|t| t.tenant_id == tenant_id)
                    .map(|t| t.dsn_sealed.clone())
            })?
            .ok_or_else(|| EngineError::TenantNotFound {
                wave: id.to_string(),
                tenant: tenant_id.to_string(),
            })?;
        let text = self.inner.sealer.open(&sealed)?;
        Dsn::parse(&text).map_err(|e| EngineError::Targets(e.to_string()))
    }

    /// Where this engine's connections may go: plans and log reads use it too.
    pub fn reach(&self) -> &Reach {
        &self.inner.reach
    }

    /// True once [`Engine::shutdown`] began: long-lived readers (watch streams) end.
    pub fn draining(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.inner.draining.clone().cancelled_owned()
    }

    /// The bundle of a wave.
    pub fn bundle(&self, id: &str) -> Result<Arc<Bundle>, EngineError> {
        Ok(self.wave(id)?.bundle.clone())
    }

    /// Drains: no new starts, in-flight tenants finish, the store is flushed. Waves stay
    /// `RUNNING` in the store and resume when the daemon opens the data dir again.
    pub async fn shutdown(&self) -> Result<(), EngineError> {
        self.inner.draining.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.inner.store.flush()?;
        Ok(())
    }
}

/// A wave's runtime from its records, computed completely before anything is stored or
/// registered: what cannot be built is refused (a new wave) or quarantined (a stored
/// one), never half-made. A finished wave keeps only its counts in memory.
fn build_wave(
    record: WaveRecord,
    tenants: Vec<TenantRecord>,
    bundle: Arc<Bundle>,
) -> Result<Arc<Wave>, EngineError> {
    let mut counts = Counts::default();
    let mut queue = Queue::default();
    let mut canaries = 0;
    for (i, t) in tenants.iter().enumerate() {
        if t.seq as usize != i {
            return Err(EngineError::Store(StoreError::Decode {
                what: format!("tenants of wave {}", record.id),
                message: format!("tenant #{i} has seq {}", t.seq),
            }));
        }
        counts.total += 1;
        counts.add(t.state);
        if t.state == TenantState::Pending {
            queue.push_ready(t.seq, &t.host);
        }
        if t.canary {
            canaries += 1;
        }
    }
    // governor counts whole cells per period: express fractional rates as one start
    // per 1/rate seconds. The policy was validated, so the interval exists.
    let limiter = match (record.policy.rate, record.policy.start_interval()) {
        (None, _) => None,
        (Some(_), Some(period)) => Quota::with_period(period).map(RateLimiter::direct),
        (Some(rate), None) => {
            return Err(EngineError::Policy(PolicyError(format!(
                "rate {rate} gives no start interval"
            ))));
        }
    };
    let finished = record.state.is_finished();
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    Ok(Arc::new(Wave {
        id: record.id.clone(),
        bundle,
        inner: Mutex::new(WaveInner {
            record,
            tenants: if finished { Vec::new() } else { tenants },
            tenants_in_store: finished,
            forgotten: false,
            counts,
            queue,
            stops: HashMap::new(),
            canaries,
            dispatching: false,
        }),
        wake: Notify::new(),
        events,
        limiter,
    }))
}

/// When a wave last changed state (ms since the epoch).
fn last_change(record: &WaveRecord) -> u64 {
    record
        .history
        .last()
        .map(|h| h.at_ms)
        .unwrap_or(record.created_at_ms)
}

/// How a quarantined wave shows: `FAILED`, with why, and nothing else known.
fn unloadable_status(id: &str, reason: &str) -> WaveStatus {
    WaveStatus {
        id: id.to_string(),
        bundle_id: String::new(),
        state: WaveState::Failed,
        reason: Some(reason.to_string()),
        counts: Counts::default(),
        policy: Policy::default(),
        created_at_ms: 0,
        history: Vec::new(),
    }
}

/// Puts the result of a run on the current (tenant) span, for traces.
fn record_on_span(outcome: &Outcome, decision: RunDecision) {
    let span = tracing::Span::current();
    span.record("decision", format!("{decision:?}").to_ascii_lowercase());
    if let Outcome::Failed { error, .. } = outcome {
        if let Some(sqlstate) = error.sqlstate() {
            span.record("sqlstate", sqlstate);
        }
        if let Some(script) = error.script() {
            span.record("failed_script", script);
        }
        span.record("error", error.to_string());
    }
}

fn failed_before_start(message: String) -> Outcome {
    Outcome::Failed {
        scripts: Vec::new(),
        error: crate::apply::ApplyError::Connect(crate::failure::DbFailure::client(
            message,
            crate::failure::Retryability::Permanent,
        )),
    }
}
