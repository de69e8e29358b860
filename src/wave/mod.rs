//! Waves: one bundle rolled out over a set of tenants under a policy (PRODUCT.md §4).
//!
//! The [`Engine`] owns every wave of a daemon: it creates them (bundle and tenants stored
//! durably first), keeps each one's pure state machine (`machine`: every rule of a wave),
//! and drives it (`driver`: one dispatcher per active wave, tenant tasks over an
//! [`Applier`], effects carried out in order after the lock). Operator commands are
//! decided under the same lock the dispatcher decides under — so once a pause is
//! acknowledged no tenant starts — and stored before they are acknowledged.
//!
//! On open, waves that were `RUNNING` continue, `PAUSED` ones stay paused, tenants
//! recorded `RUNNING` are queued again (the applier will consult their log), and
//! `SUCCEEDED` tenants are never contacted. A stored wave this build cannot load is
//! quarantined, never a reason not to start. The engine never decides what a tenant
//! needs: the applier reads that from the tenant's own log.

mod driver;
pub mod machine;
mod queue;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bundle::Bundle;
use crate::dsn::Dsn;
use crate::policy::{Policy, PolicyError, StartOrder};
use crate::reach::Reach;
use crate::secret::{Sealer, SecretError};
use crate::store::{
    ErrorRecord, FORMAT, ProgressStore, SledStore, StateChange, StoreError, TenantRecord,
    WaveRecord,
};
use crate::target::Tenant;
pub use driver::{Applier, NoObserver, PostgresApplier, RunObserver};
use driver::{Body, Wave};
pub use machine::{Command, DAEMON_ACTOR, Machine, TenantAction, TenantState, WaveState};

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
    #[error(
        "wave {wave}: stage {stage} awaits approval; `flotilla wave approve {wave}` opens the next"
    )]
    AwaitingApproval { wave: String, stage: String },
    #[error("wave {wave}: nothing awaits approval ({why})")]
    NothingToApprove { wave: String, why: String },
    #[error(
        "wave {wave}: stage {stage} did not all succeed ({failed} failed, {cancelled} cancelled); retry them, or approve with --accept-failures"
    )]
    StageFailed {
        wave: String,
        stage: String,
        failed: u64,
        cancelled: u64,
    },
    #[error("{}", unsafe_message(.0))]
    Unsafe(Vec<crate::bundle::safety::Finding>),
}

fn unsafe_message(findings: &[crate::bundle::safety::Finding]) -> String {
    let mut out = format!(
        "the bundle has {} safety finding{} a wave does not start with; fix them, or waive \
         each with `-- flotilla:allow RULE reason` in the script, or `--allow RULE@SCRIPT` \
         for a script that already ran (its text must not change), or `--allow RULE` for \
         the whole wave:",
        findings.len(),
        if findings.len() == 1 { "" } else { "s" }
    );
    for f in findings {
        out.push_str("\n  ");
        out.push_str(&f.to_string());
    }
    out
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
    /// Tenants whose run recorded scripts as `baselined` (adopted from another tool,
    /// `--baseline-version`, covered by a baseline script), and how many scripts.
    pub baselined_tenants: u64,
    pub baselined_scripts: u64,
}

impl Counts {
    /// Counts `t`'s baselined scripts, if any.
    pub(crate) fn add_baselined(&mut self, scripts: u32) {
        if scripts > 0 {
            self.baselined_tenants += 1;
            self.baselined_scripts += u64::from(scripts);
        }
    }

    /// The count of tenants in `state`.
    pub(crate) fn slot(&mut self, state: TenantState) -> &mut u64 {
        match state {
            TenantState::Pending => &mut self.pending,
            TenantState::Running => &mut self.running,
            TenantState::Succeeded => &mut self.succeeded,
            TenantState::Failed => &mut self.failed,
            TenantState::Cancelled => &mut self.cancelled,
        }
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
    /// The placeholder values of the wave's bundle.
    pub placeholders: BTreeMap<String, String>,
    /// Safety findings waived for this wave, `rule at script:line (reason)`.
    pub waivers: Vec<String>,
    /// Hosts held by their health gate, `host: reason`.
    pub held: Vec<String>,
    /// The registered fleet the tenants were resolved from, if any.
    pub fleet: Option<String>,
    /// Its stages, the canary first (empty for a wave without stages).
    pub stages: Vec<machine::StageView>,
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
    /// Rows its batch scripts changed.
    pub rows_changed: u64,
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
            rows_changed: t.rows_changed,
        }
    }
}

/// A change in a wave, broadcast to watchers.
#[derive(Debug, Clone, PartialEq)]
pub struct WaveEvent {
    pub wave_id: String,
    pub state: WaveState,
    pub counts: Counts,
    /// The tenant that changed, if one did.
    pub tenant: Option<TenantView>,
}

struct EngineInner {
    store: Arc<dyn ProgressStore>,
    sealer: Arc<Sealer>,
    /// Registered fleets and their last censuses.
    fleets: crate::fleet::Fleets,
    reach: Reach,
    /// The lock-queue watchdog every tenant run of every wave is watched by.
    guard: Arc<crate::guard::Guard>,
    retention: Option<Duration>,
    applier: Arc<dyn Applier>,
    observer: Arc<dyn RunObserver>,
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
#[derive(Clone)]
pub struct EngineOptions {
    /// Where tenant connections may go (`allowed_hosts`) and the ambient password.
    pub reach: Reach,
    /// Finished waves older than this are forgotten (`wave_retention`); `None` keeps
    /// them.
    pub retention: Option<Duration>,
    /// Runs tenants: [`PostgresApplier`] unless a test scripts outcomes.
    pub applier: Arc<dyn Applier>,
    /// Told of every finished run (metrics).
    pub observer: Arc<dyn RunObserver>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            reach: Reach::default(),
            retention: None,
            applier: Arc::new(PostgresApplier),
            observer: Arc::new(NoObserver),
        }
    }
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("reach", &self.reach)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
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
        let sealer = Arc::new(sealer);
        let engine = Self {
            inner: Arc::new(EngineInner {
                fleets: crate::fleet::Fleets::new(store.clone(), sealer.clone()),
                store,
                sealer,
                guard: crate::guard::Guard::new(options.reach.clone()),
                reach: options.reach,
                retention: options.retention,
                applier: options.applier,
                observer: options.observer,
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
                    if !wave.lock().record().state.is_finished() {
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
        let stored = self.inner.store.load_tenants(&record.id)?;
        // A tenant interrupted mid-run goes back to the queue (its log will tell the
        // applier what happened) — unless the wave was cancelled: nothing starts in a
        // cancelled wave, so it would wait for ever. Its log still says what ran.
        let tenants = driver::interrupted(&record, stored.clone(), now_ms());
        for (before, after) in stored.iter().zip(&tenants) {
            if before.state != after.state {
                self.inner.store.save_tenant(&record.id, after)?;
            }
        }
        let body = if record.state.is_finished() {
            // Only the counts stay in memory; the tenants are read when asked for.
            let machine = Machine::new(record.clone(), tenants, 0)
                .map_err(|message| tenants_undecodable(&record.id, message))?;
            Body::Finished {
                record: Box::new(record),
                counts: machine.counts(),
                stages: machine.stages(),
            }
        } else {
            let id = record.id.clone();
            let machine = Machine::new(record, tenants, fastrand::u64(..))
                .map_err(|message| tenants_undecodable(&id, message))?;
            Body::Active(Box::new(machine))
        };
        let wave = Wave::new(body, bundle)?;
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
        self.start_wave_sized(bundle, tenants, policy, actor, &HashMap::new(), None)
    }

    /// [`Engine::start_wave`] with each tenant's database size (bytes, by tenant id), for
    /// a policy that starts the smallest first ([`StartOrder::Size`]), and the name of
    /// the registered fleet the tenants come from, if any.
    pub fn start_wave_sized(
        &self,
        bundle: Bundle,
        tenants: Vec<Tenant>,
        policy: Policy,
        actor: &str,
        sizes: &HashMap<String, u64>,
        fleet: Option<String>,
    ) -> Result<String, EngineError> {
        if self.inner.draining.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        policy.validate()?;
        // An undo wave runs only undo scripts, which are not linted: nothing the lint
        // reads runs.
        let unsafe_findings = if policy.undo_to.is_some() {
            Vec::new()
        } else {
            crate::bundle::safety::unwaived(&crate::bundle::safety::lint(&bundle), &policy.allow)
        };
        if !unsafe_findings.is_empty() {
            return Err(EngineError::Unsafe(unsafe_findings));
        }
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
        // Canaries first, then by id (or by size): a deterministic order that `seq`
        // records. With sizes, the canaries are the smallest too.
        let mut ordered = tenants;
        ordered.sort_by(|a, b| a.id.cmp(&b.id));
        if policy.start_order == StartOrder::Size {
            ordered.sort_by_key(|t| sizes.get(&t.id).copied().unwrap_or(u64::MAX));
        }
        let labels: Vec<_> = ordered.iter().map(|t| &t.labels).collect();
        let is_canary = machine::canary_flags(&policy.canary, &labels);
        let staged = machine::assign_stages(&policy, &labels)
            .map_err(|message| EngineError::Policy(PolicyError(message)))?;
        if let crate::policy::Canary::Label { key, value } = &policy.canary
            && !is_canary.iter().any(|c| *c)
        {
            // An empty canary stage would pass at once and open the gate for everyone.
            return Err(EngineError::Policy(PolicyError(format!(
                "canary label {key}={value} matches no tenant of the wave"
            ))));
        }
        // Canaries first (stage by stage, with stages); the sort is stable, so the
        // start order holds within each.
        let stage_of: Vec<u32> = match &staged {
            Some(plan) => plan.stage_of.clone(),
            None => is_canary.iter().map(|c| u32::from(!*c)).collect(),
        };
        let mut indexed: Vec<(u32, bool, Tenant)> = stage_of
            .into_iter()
            .zip(is_canary)
            .zip(ordered)
            .map(|((stage, canary), t)| (stage, canary, t))
            .collect();
        indexed.sort_by_key(|(stage, _, _)| *stage);
        let stages: Vec<crate::store::StageRecord> = match &staged {
            Some(plan) => plan
                .names
                .iter()
                .enumerate()
                .map(|(i, name)| crate::store::StageRecord {
                    name: name.clone(),
                    tenants: indexed.iter().filter(|(s, _, _)| *s == i as u32).count() as u32,
                    approval: None,
                })
                .collect(),
            None => Vec::new(),
        };

        let id = uuid::Uuid::now_v7().to_string();
        let records: Vec<TenantRecord> = indexed
            .iter()
            .enumerate()
            .map(|(seq, (_, canary, t))| TenantRecord {
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
                baselined: 0,
                rows_changed: 0,
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
                reason: match &fleet {
                    Some(f) => format!("started over {} tenants of fleet {f}", records.len()),
                    None => format!("started over {} tenants", records.len()),
                },
                at_ms: now,
            }],
            fleet,
            stages,
            stage_open: 0,
        };
        // Everything the runtime needs is computed before the first write: a wave that
        // is stored can always be loaded again.
        let machine = Machine::new(record.clone(), records.clone(), fastrand::u64(..))
            .map_err(|message| tenants_undecodable(&id, message))?;
        let wave = Wave::new(Body::Active(Box::new(machine)), Arc::new(bundle))?;
        self.inner.store.save_bundle(&wave.bundle)?;
        self.inner.store.create_wave(&record, &records)?;
        self.waves_lock().insert(id.clone(), wave.clone());
        tracing::info!(wave = %id, "wave started");
        self.ensure_dispatcher(&wave);
        Ok(id)
    }

    /// Stops new tenant starts at once; tenants in flight finish their bundle.
    pub fn pause(&self, id: &str, actor: &str, reason: &str) -> Result<WaveStatus, EngineError> {
        self.command(id, actor, reason, Command::Pause)
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
        self.command(id, actor, reason, Command::Resume(canary_failure))
    }

    /// Opens the stage after the finished one of a wave paused for approval
    /// (`approve_between_stages`), recording who approved it and the stage's counts.
    /// A stage whose tenants did not all succeed is approved only with
    /// `accept_failures`.
    pub fn approve(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        accept_failures: bool,
    ) -> Result<WaveStatus, EngineError> {
        self.command(id, actor, reason, Command::Approve { accept_failures })
    }

    /// Stops new starts; in-flight tenants stop at their next script boundary; waiting
    /// tenants become `CANCELLED`.
    pub fn cancel(&self, id: &str, actor: &str, reason: &str) -> Result<WaveStatus, EngineError> {
        self.command(id, actor, reason, Command::Cancel)
    }

    /// Puts the failed tenants of a finished or paused wave back to `PENDING`. A
    /// finished wave runs again; a paused one stays paused until resumed.
    pub fn retry(&self, id: &str, actor: &str, reason: &str) -> Result<WaveStatus, EngineError> {
        self.command(id, actor, reason, Command::Retry)
    }

    /// One wave's status.
    pub fn status(&self, id: &str) -> Result<WaveStatus, EngineError> {
        if let Some(reason) = self.unloadable_lock().get(id) {
            return Ok(unloadable_status(id, reason));
        }
        let wave = self.wave(id)?;
        let status = wave.status_of(&wave.lock());
        Ok(status)
    }

    /// Every wave, newest first (ids are UUIDv7: they sort by creation time),
    /// quarantined ones included.
    pub fn list(&self) -> Vec<WaveStatus> {
        let waves: Vec<Arc<Wave>> = self.waves_lock().values().cloned().collect();
        let mut all: Vec<WaveStatus> = waves.iter().map(|w| w.status_of(&w.lock())).collect();
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
            let mut slot = wave.lock();
            let state = slot.record().state;
            if !state.is_finished() || slot.running() > 0 {
                return Err(EngineError::InvalidState {
                    wave: id.to_string(),
                    state,
                    action: "forget (cancel it first, and let its running tenants stop)",
                });
            }
            if !still_wanted(slot.record()) {
                return Ok(());
            }
            // From here no command, result or dispatcher writes this wave again, so
            // deleting its records cannot race a retry writing them back; what was
            // decided before is written first.
            slot.forgotten = true;
            let issued = slot.issued();
            drop(slot);
            wave.wait_for_writes(issued);
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
                let slot = w.lock();
                slot.record().state.is_finished() && last_change(slot.record()) < cutoff
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
    /// store once it finished.
    fn with_tenants<T>(
        &self,
        id: &str,
        read: impl FnOnce(&[TenantRecord]) -> T,
    ) -> Result<T, EngineError> {
        if self.unloadable_lock().contains_key(id) {
            return Ok(read(&[]));
        }
        let wave = self.wave(id)?;
        self.read_tenants(&wave, read)
    }

    /// Tenants running now per database server, over every unfinished wave; servers of
    /// those waves with nothing running report 0, so a gauge falls back to zero.
    pub fn running_per_host(&self) -> BTreeMap<String, u64> {
        let waves: Vec<Arc<Wave>> = self.waves_lock().values().cloned().collect();
        let mut out = BTreeMap::new();
        for wave in waves {
            Self::running_hosts(&wave, &mut out);
        }
        out
    }

    /// A snapshot and the stream of changes after it.
    pub fn watch(
        &self,
        id: &str,
    ) -> Result<(WaveStatus, broadcast::Receiver<WaveEvent>), EngineError> {
        let wave = self.wave(id)?;
        let slot = wave.lock();
        // Subscribing under the lock: no event falls between snapshot and stream.
        let rx = wave.subscribe();
        Ok((wave.status_of(&slot), rx))
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

    /// Every tenant of a wave with its DSN opened, in `seq` order: for a census of the
    /// wave's tenants. A DSN that no longer opens is an error naming the tenant.
    pub fn wave_tenants(&self, id: &str) -> Result<Vec<Tenant>, EngineError> {
        let records = self.with_tenants(id, |tenants| {
            tenants
                .iter()
                .map(|t| (t.tenant_id.clone(), t.dsn_sealed.clone(), t.labels.clone()))
                .collect::<Vec<_>>()
        })?;
        records
            .into_iter()
            .map(|(tenant_id, sealed, labels)| {
                let text = self.inner.sealer.open(&sealed)?;
                let dsn = Dsn::parse(&text)
                    .map_err(|e| EngineError::Targets(format!("tenant {tenant_id:?}: {e}")))?;
                Ok(Tenant {
                    id: tenant_id,
                    dsn,
                    labels,
                })
            })
            .collect()
    }

    /// The bundle of the newest wave started on `fleet`, if one is still known: what a
    /// scheduled census compares that fleet with.
    pub fn latest_bundle_of_fleet(&self, fleet: &str) -> Option<Arc<Bundle>> {
        let newest = self
            .list()
            .into_iter()
            .filter(|w| w.fleet.as_deref() == Some(fleet))
            .max_by_key(|w| w.created_at_ms)?;
        self.bundle(&newest.id).ok()
    }

    /// Registered fleets and their last censuses.
    pub fn fleets(&self) -> &crate::fleet::Fleets {
        &self.inner.fleets
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

/// When a wave last changed state (ms since the epoch).
fn last_change(record: &WaveRecord) -> u64 {
    record
        .history
        .last()
        .map(|h| h.at_ms)
        .unwrap_or(record.created_at_ms)
}

fn tenants_undecodable(wave: &str, message: String) -> EngineError {
    EngineError::Store(StoreError::Decode {
        what: format!("tenants of wave {wave}"),
        message,
    })
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
        placeholders: BTreeMap::new(),
        waivers: Vec::new(),
        held: Vec::new(),
        fleet: None,
        stages: Vec::new(),
    }
}
