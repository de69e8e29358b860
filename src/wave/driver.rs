//! The driver around each wave's [`Machine`]: one dispatcher task per active wave (rate
//! limiter, tenant tasks over an [`Applier`]), and the one way a decision's effects are
//! carried out.
//!
//! A decision is made under the wave's lock. Its events go out at once (still under the
//! lock, so watchers see them in the order they were decided — a broadcast send never
//! blocks). Its store writes are carried out *after* the lock is released, on the blocking
//! pool, in decision order: each decision with writes takes a ticket under the lock, and
//! writers go by ticket. So an fsync never stalls a status call, and a later state of a
//! tenant is never overwritten by an earlier one. A write that fails pauses the wave,
//! saying why; it is never only a log line. This module never decides anything a wave's
//! rules decide: that is the machine's.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::machine::{Command, DAEMON_ACTOR, Effect, Machine, Now, Step, TenantAction};
use super::{Counts, Engine, EngineError, WaveEvent, WaveStatus, now_ms};
use crate::apply::{Outcome, StopSignal, TenantRun, apply_tenant};
use crate::bundle::Bundle;
use crate::dsn::Dsn;
use crate::failure::{DbFailure, FailureKind};
use crate::store::{StoreError, TenantRecord, WaveRecord};

/// How many events a watcher may fall behind before it must resync from a snapshot.
const EVENT_BUFFER: usize = 1024;

/// Runs one tenant: the real applier in production, a scripted one in tests.
pub trait Applier: Send + Sync + 'static {
    /// Brings the tenant of `run` up to its bundle, stopping when `stop` says.
    fn apply<'a>(
        &'a self,
        run: &'a TenantRun<'a>,
        stop: &'a StopSignal,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;
}

/// The applier that talks to PostgreSQL ([`apply_tenant`]).
#[derive(Debug, Default)]
pub struct PostgresApplier;

impl Applier for PostgresApplier {
    fn apply<'a>(
        &'a self,
        run: &'a TenantRun<'a>,
        stop: &'a StopSignal,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
        Box::pin(apply_tenant(run, stop))
    }
}

/// Told of every finished tenant run and what was decided about it (metrics).
pub trait RunObserver: Send + Sync + 'static {
    /// One finished run.
    fn tenant_finished(&self, outcome: &Outcome, action: TenantAction);
}

/// Observes nothing.
#[derive(Debug, Default)]
pub struct NoObserver;

impl RunObserver for NoObserver {
    fn tenant_finished(&self, _: &Outcome, _: TenantAction) {}
}

/// The runtime of one wave.
pub(super) struct Wave {
    pub(super) id: String,
    pub(super) bundle: Arc<Bundle>,
    /// The safety findings waived for this wave (worked out once: status is hot).
    waivers: Vec<String>,
    slot: Mutex<Slot>,
    /// The ticket whose writes may go next; see the module doc.
    written: Mutex<u64>,
    turn: Condvar,
    wake: Notify,
    events: broadcast::Sender<WaveEvent>,
    limiter: Option<DefaultDirectRateLimiter>,
}

/// What the wave's lock guards.
pub(super) struct Slot {
    pub(super) body: Body,
    stops: HashMap<u32, StopSignal>,
    dispatching: bool,
    /// Set by `forget` under the lock: nothing may write this wave any more.
    pub(super) forgotten: bool,
    /// The next write ticket to hand out.
    issued: u64,
    /// Set when a store write failed (with why): the store may lag memory, so the wave
    /// is not let go of, and its whole state is written again before the next command.
    dirty: Option<String>,
}

/// A wave in memory: running with its machine, or finished with only its counts (its
/// tenants stay in the store, read when asked for, so months of waves cost no memory).
pub(super) enum Body {
    Active(Box<Machine>),
    Finished {
        record: Box<WaveRecord>,
        counts: Counts,
        /// Per stage (a few at most), so status shows them without the tenants.
        stages: Vec<super::machine::StageView>,
    },
}

impl Wave {
    /// The wave as operators see it: `slot`'s status with what the bundle adds.
    pub(super) fn status_of(&self, slot: &Slot) -> WaveStatus {
        let mut status = slot.status();
        status.placeholders = self.bundle.placeholders().clone();
        status.waivers = self.waivers.clone();
        status
    }
}

impl Slot {
    pub(super) fn record(&self) -> &WaveRecord {
        match &self.body {
            Body::Active(m) => m.record(),
            Body::Finished { record, .. } => record,
        }
    }

    pub(super) fn status(&self) -> WaveStatus {
        match &self.body {
            Body::Active(m) => m.status(),
            Body::Finished {
                record,
                counts,
                stages,
            } => WaveStatus {
                id: record.id.clone(),
                bundle_id: record.bundle_id.clone(),
                state: record.state,
                reason: record.reason.clone(),
                counts: *counts,
                policy: record.policy.clone(),
                created_at_ms: record.created_at_ms,
                history: record.history.clone(),
                placeholders: Default::default(),
                waivers: Vec::new(),
                held: Vec::new(),
                fleet: record.fleet.clone(),
                stages: stages.clone(),
            },
        }
    }

    /// The next write ticket: every write decided so far is below it.
    pub(super) fn issued(&self) -> u64 {
        self.issued
    }

    pub(super) fn running(&self) -> u32 {
        match &self.body {
            Body::Active(m) => m.in_flight(),
            Body::Finished { .. } => 0,
        }
    }

    /// A finished wave with nothing in flight lets go of its machine (unless the store
    /// may lag it).
    fn release_if_done(&mut self) {
        if let Body::Active(m) = &self.body
            && self.dirty.is_none()
            && m.record().state.is_finished()
            && m.in_flight() == 0
        {
            let counts = m.counts();
            let stages = m.stages();
            let record = m.record().clone();
            self.body = Body::Finished {
                record: Box::new(record),
                counts,
                stages,
            };
        }
    }
}

/// The wall and monotonic clocks, read once per input.
pub(super) fn now() -> Now {
    Now {
        mono: Instant::now(),
        wall_ms: now_ms(),
    }
}

/// Store writes of one decision, to be carried out in ticket order.
pub(super) struct Writes {
    ticket: u64,
    effects: Vec<Effect>,
}

impl Wave {
    /// A wave's runtime around `machine` (or a finished wave's record and counts),
    /// computed before anything is stored or registered.
    pub(super) fn new(body: Body, bundle: Arc<Bundle>) -> Result<Arc<Self>, EngineError> {
        let record = match &body {
            Body::Active(m) => m.record(),
            Body::Finished { record, .. } => record,
        };
        // governor counts whole cells per period: express fractional rates as one start
        // per 1/rate seconds. A validated policy has an interval.
        let limiter = match (record.policy.rate, record.policy.start_interval()) {
            (None, _) => None,
            (Some(_), Some(period)) => Quota::with_period(period).map(RateLimiter::direct),
            (Some(rate), None) => {
                return Err(EngineError::Policy(crate::policy::PolicyError(format!(
                    "rate {rate} gives no start interval"
                ))));
            }
        };
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let waivers = crate::bundle::safety::waivers(
            &crate::bundle::safety::lint(&bundle),
            &record.policy.allow,
        );
        Ok(Arc::new(Self {
            id: record.id.clone(),
            waivers,
            bundle,
            slot: Mutex::new(Slot {
                body,
                stops: HashMap::new(),
                dispatching: false,
                forgotten: false,
                issued: 0,
                dirty: None,
            }),
            written: Mutex::new(0),
            turn: Condvar::new(),
            wake: Notify::new(),
            events,
            limiter,
        }))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Slot> {
        // A panic while holding this lock would be a bug; the state is still consistent
        // record by record, so keep serving rather than poison every later call.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to events; under the lock, so no event falls between a snapshot taken
    /// under the same lock and the stream.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<WaveEvent> {
        self.events.subscribe()
    }

    /// Sends a decision's events and stops now (under the lock), and hands out a ticket
    /// for its store writes, which the caller carries out with [`Engine::write`] after
    /// releasing the lock.
    pub(super) fn dispatch_effects(&self, slot: &mut Slot, effects: Vec<Effect>) -> Option<Writes> {
        let mut writes = Vec::new();
        for effect in effects {
            match effect {
                // No receivers is fine; a slow receiver lags and resyncs, never blocks us.
                Effect::Emit(event) => drop(self.events.send(event)),
                Effect::Stop(seq) => {
                    if let Some(stop) = slot.stops.get(&seq) {
                        stop.stop_at_boundary();
                    }
                }
                write => writes.push(write),
            }
        }
        if writes.is_empty() {
            return None;
        }
        let ticket = slot.issued;
        slot.issued += 1;
        Some(Writes {
            ticket,
            effects: writes,
        })
    }

    /// Waits until the writes of every ticket before `issued` are carried out (before
    /// reading this wave's records back from the store). Call it without the wave's
    /// lock: status calls must not wait behind an fsync.
    pub(super) fn wait_for_writes(&self, issued: u64) {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        while *written < issued {
            written = self.turn.wait(written).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The wave's lock, once every write decided before is in the store: the lock is
    /// let go while waiting, and taken again until no new write was decided meanwhile.
    pub(super) fn lock_when_written(&self) -> MutexGuard<'_, Slot> {
        loop {
            let issued = self.lock().issued;
            self.wait_for_writes(issued);
            let slot = self.lock();
            if slot.issued == issued {
                return slot;
            }
        }
    }
}

/// Advances the write turn when dropped, so a failed or panicking writer never blocks
/// the ones after it.
struct Turn<'a> {
    wave: &'a Wave,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut written = self.wave.written.lock().unwrap_or_else(|p| p.into_inner());
        *written += 1;
        self.wave.turn.notify_all();
    }
}

impl Engine {
    /// Carries out one decision's store writes, in ticket order. Blocks: call it on the
    /// blocking pool. A failed write pauses the wave with the reason.
    pub(super) fn write(&self, wave: &Wave, writes: Writes) -> Result<(), StoreError> {
        let result = {
            let mut written = wave.written.lock().unwrap_or_else(|p| p.into_inner());
            while *written < writes.ticket {
                written = wave.turn.wait(written).unwrap_or_else(|p| p.into_inner());
            }
            drop(written);
            let _turn = Turn { wave };
            self.store_effects(&wave.id, writes.effects)
        };
        if let Err(e) = &result {
            self.pause_for_store(wave, e);
        }
        result
    }

    fn store_effects(&self, wave_id: &str, effects: Vec<Effect>) -> Result<(), StoreError> {
        for effect in effects {
            match effect {
                Effect::PersistTenant(t) => self.inner.store.save_tenant(wave_id, &t)?,
                Effect::PersistWave(r) => self.inner.store.save_wave(&r)?,
                Effect::Emit(_) | Effect::Stop(_) => {}
            }
        }
        Ok(())
    }

    /// The store refused a write: pause the wave (nothing more starts on a state the
    /// daemon cannot record) and say why. Its own write is best effort.
    fn pause_for_store(&self, wave: &Wave, error: &StoreError) {
        tracing::error!(wave = %wave.id, %error, "cannot write the progress store; pausing the wave");
        let reason = format!("the progress store failed: {error}");
        let mut slot = wave.lock();
        slot.dirty = Some(reason.clone());
        let Body::Active(machine) = &mut slot.body else {
            return;
        };
        // Paused if it runs; otherwise (already paused, or finished) the history says it.
        let effects = machine
            .command(Command::Pause, DAEMON_ACTOR, &reason, now())
            .unwrap_or_else(|_| machine.note_problem(&reason, now()));
        let writes = wave.dispatch_effects(&mut slot, effects);
        drop(slot);
        if let Some(writes) = writes {
            let mut written = wave.written.lock().unwrap_or_else(|p| p.into_inner());
            while *written < writes.ticket {
                written = wave.turn.wait(written).unwrap_or_else(|p| p.into_inner());
            }
            drop(written);
            let _turn = Turn { wave };
            if let Err(e) = self.store_effects(&wave.id, writes.effects) {
                tracing::error!(wave = %wave.id, error = %e, "cannot record the pause either");
            }
        }
    }

    /// An operator's command: decided under the wave's lock, stored durably (in order
    /// with everything decided before it) before it returns. Blocks on the store.
    pub(super) fn command(
        &self,
        id: &str,
        actor: &str,
        reason: &str,
        command: Command,
    ) -> Result<WaveStatus, EngineError> {
        let wave = self.wave(id)?;
        let mut slot = wave.lock();
        if matches!(slot.body, Body::Finished { .. }) {
            // Woken for a command (a retry): its tenants come back from the store, once
            // every write decided for it is there.
            drop(slot);
            slot = wave.lock_when_written();
        }
        if slot.forgotten {
            return Err(EngineError::NotFound(id.to_string()));
        }
        if let Body::Finished { record, .. } = &slot.body {
            let record = (**record).clone();
            let tenants = interrupted(&record, self.inner.store.load_tenants(id)?, now_ms());
            let machine = Machine::new(record, tenants, fastrand::u64(..)).map_err(|message| {
                EngineError::Store(StoreError::Decode {
                    what: format!("tenants of wave {id}"),
                    message,
                })
            })?;
            slot.body = Body::Active(Box::new(machine));
        }
        let dirty = slot.dirty.is_some();
        let Body::Active(machine) = &mut slot.body else {
            return Err(EngineError::NotFound(id.to_string()));
        };
        // After a failed write the store may lag: write everything again first.
        let mut effects = if dirty {
            machine.snapshot()
        } else {
            Vec::new()
        };
        let decided = machine.command(command, actor, reason, now());
        let writes = match decided {
            Ok(more) => {
                effects.extend(more);
                wave.dispatch_effects(&mut slot, effects)
            }
            Err(e) => {
                slot.release_if_done();
                return Err(e);
            }
        };
        let status = wave.status_of(&slot);
        drop(slot);
        // Durable before acknowledged.
        let written = match writes {
            Some(writes) => self.write(&wave, writes),
            None => Ok(()),
        };
        {
            let mut slot = wave.lock();
            if written.is_ok() {
                slot.dirty = None;
            }
            slot.release_if_done();
        }
        wave.wake.notify_one();
        if status.state == super::WaveState::Running {
            self.ensure_dispatcher(&wave);
        }
        written?;
        tracing::info!(wave = %id, actor, action = command.as_str(), "operator command");
        Ok(status)
    }

    /// Starts the wave's dispatcher unless one runs (or the daemon drains).
    pub(super) fn ensure_dispatcher(&self, wave: &Arc<Wave>) {
        let mut slot = wave.lock();
        if slot.dispatching || self.inner.draining.is_cancelled() {
            return;
        }
        slot.dispatching = true;
        drop(slot);
        let engine = self.clone();
        let wave = wave.clone();
        self.inner.tasks.spawn(async move {
            let span =
                tracing::info_span!("wave", wave_id = %wave.id, bundle_id = %wave.bundle.id());
            engine.dispatch(wave).instrument(span).await
        });
    }

    /// One wave's dispatcher: starts tenants while the machine allows, until the wave
    /// finishes or the daemon drains.
    async fn dispatch(self, wave: Arc<Wave>) {
        // The first round of health readings comes before the first start.
        let mut next_gate = tokio::time::Instant::now();
        loop {
            let notified = wave.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if tokio::time::Instant::now() >= next_gate {
                self.gate_round(&wave).await;
                next_gate = tokio::time::Instant::now() + crate::guard::GATE_INTERVAL;
            }
            // A held host is read again on time even when nothing else happens.
            let held = self.has_holds(&wave);
            if let Some(limiter) = &wave.limiter
                && self.can_start(&wave)
            {
                tokio::select! {
                    _ = limiter.until_ready() => {}
                    _ = self.inner.draining.cancelled() => {}
                }
            }
            let (step, start, writes) = self.decide(&wave);
            if let Some(writes) = writes {
                let (engine, w) = (self.clone(), wave.clone());
                let _ = tokio::task::spawn_blocking(move || engine.write(&w, writes)).await;
            }
            match step {
                Step::Start { seq, generation } => {
                    if let Some((sealed, stop)) = start {
                        self.spawn_tenant(&wave, seq, generation, sealed, stop);
                    }
                }
                Step::Wait => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(next_gate), if held => {}
                        _ = self.inner.draining.cancelled() => {}
                    }
                }
                Step::WaitUntil(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                        _ = tokio::time::sleep_until(next_gate), if held => {}
                        _ = self.inner.draining.cancelled() => {}
                    }
                }
                Step::Exit => {
                    // `dispatching` was cleared with the decision, under the lock: a
                    // retry meanwhile starts a dispatcher of its own.
                    wave.lock().release_if_done();
                    return;
                }
            }
        }
    }

    fn has_holds(&self, wave: &Wave) -> bool {
        match &wave.lock().body {
            Body::Active(m) => !m.holds().is_empty(),
            Body::Finished { .. } => false,
        }
    }

    /// Reads the health of every server with tenants waiting (a short session each, a
    /// few at a time, off the wave's lock) and hands the verdicts to the machine, which
    /// holds or releases hosts, or pauses the wave for a host held too long. A server
    /// that cannot be asked keeps its state: its tenants will say what is wrong.
    async fn gate_round(&self, wave: &Arc<Wave>) {
        use futures_util::StreamExt as _;
        let (policy, hosts) = {
            let slot = wave.lock();
            let Body::Active(m) = &slot.body else {
                return;
            };
            let policy = m.record().policy.clone();
            if m.record().state != super::WaveState::Running || !policy.gates_on() {
                return;
            }
            let hosts: Vec<(String, String)> = m
                .waiting_hosts()
                .into_iter()
                .filter_map(|h| m.tenant_on(&h).map(|t| (h, t.dsn_sealed.clone())))
                .collect();
            (policy, hosts)
        };
        if hosts.is_empty() {
            return;
        }
        let (sealer, reach) = (&self.inner.sealer, &self.inner.reach);
        let policy = &policy;
        let readings: Vec<(String, Option<Option<String>>)> = futures_util::stream::iter(hosts)
            .map(|(host, sealed)| async move {
                let dsn = sealer.open(&sealed).ok().and_then(|t| Dsn::parse(&t).ok());
                let verdict = match dsn {
                    Some(dsn) => {
                        // Bounded: a server that hangs must not hold up the others' starts.
                        match tokio::time::timeout(
                            crate::guard::HEALTH_DEADLINE,
                            crate::guard::read_health(&dsn, reach, policy.gate_sql.as_deref()),
                        )
                        .await
                        {
                            Ok(Ok(health)) => Some(crate::guard::verdict(&health, policy)),
                            Ok(Err(e)) => {
                                tracing::warn!(host = %host, error = %e, "cannot read the host's health");
                                None
                            }
                            Err(_) => {
                                tracing::warn!(host = %host, "the host's health did not answer in time");
                                None
                            }
                        }
                    }
                    None => None,
                };
                (host, verdict)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let writes = {
            let mut slot = wave.lock();
            let Body::Active(m) = &mut slot.body else {
                return;
            };
            let mut effects = Vec::new();
            for (host, verdict) in readings {
                if let Some(verdict) = verdict {
                    effects.extend(m.on_gate(&host, verdict, now()));
                }
            }
            wave.dispatch_effects(&mut slot, effects)
        };
        if let Some(writes) = writes {
            let (engine, w) = (self.clone(), wave.clone());
            let _ = tokio::task::spawn_blocking(move || engine.write(&w, writes)).await;
        }
    }

    fn can_start(&self, wave: &Wave) -> bool {
        let mut slot = wave.lock();
        match &mut slot.body {
            Body::Active(m) => m.can_start(now()),
            Body::Finished { .. } => false,
        }
    }

    /// The machine's next step, with what a start needs (the sealed DSN, a stop signal).
    fn decide(&self, wave: &Wave) -> (Step, Option<(String, StopSignal)>, Option<Writes>) {
        let mut slot = wave.lock();
        let draining = self.inner.draining.is_cancelled();
        let forgotten = slot.forgotten;
        let (step, effects) = match &mut slot.body {
            Body::Active(machine) if !forgotten => machine.next_start(now(), draining),
            _ => (Step::Exit, Vec::new()),
        };
        if step == Step::Exit {
            slot.dispatching = false;
        }
        let Body::Active(machine) = &mut slot.body else {
            return (Step::Exit, None, None);
        };
        let start = match step {
            Step::Start { seq, .. } => machine
                .tenant(seq)
                .map(|t| (t.dsn_sealed.clone(), StopSignal::new())),
            _ => None,
        };
        if let (Step::Start { seq, .. }, Some((_, stop))) = (step, &start) {
            slot.stops.insert(seq, stop.clone());
        }
        let writes = wave.dispatch_effects(&mut slot, effects);
        (step, start, writes)
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
        let (span, policy, retries_used, canary) = {
            let slot = wave.lock();
            let Body::Active(machine) = &slot.body else {
                return;
            };
            let Some(t) = machine.tenant(seq) else {
                return;
            };
            let span = tracing::info_span!(
                "tenant",
                wave_id = %wave.id,
                tenant_id = %t.tenant_id,
                host = %t.host,
                attempt = t.attempts,
                decision = tracing::field::Empty,
                sqlstate = tracing::field::Empty,
                failed_script = tracing::field::Empty,
                error = tracing::field::Empty,
            );
            (
                span,
                machine.record().policy.clone(),
                t.retries_used,
                t.canary,
            )
        };
        let task = async move {
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
                        settings: policy.session_settings_for(retries_used),
                        mode: policy.transaction,
                        plan_options: policy.plan_options(),
                        prior: policy.prior(),
                        guard: Some(engine.inner.guard.clone()),
                        max_block: std::time::Duration::from_millis(policy.max_block_ms),
                        undo: policy.undo_for(canary),
                    };
                    // A panic in the applier is a bug; it must not leave the tenant
                    // RUNNING for ever: it fails, and its log says what ran.
                    use futures_util::FutureExt as _;
                    std::panic::AssertUnwindSafe(engine.inner.applier.apply(&run, &stop))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            tracing::error!("the applier panicked; failing the tenant");
                            failed_before_start(
                                "the applier panicked (a bug in Flotilla); the tenant's log says what ran"
                                    .to_string(),
                            )
                        })
                }
                Ok(Err(e)) => failed_before_start(e.to_string()),
                Err(e) => failed_before_start(e.to_string()),
            };
            let (e, w) = (engine.clone(), wave.clone());
            let writes = engine.finish_tenant(&wave, seq, generation, &outcome);
            // The slot is free now; the next start need not wait for this write.
            wave.wake.notify_one();
            if let Some(writes) = writes {
                let _ = tokio::task::spawn_blocking(move || e.write(&w, writes)).await;
            }
        };
        self.inner.tasks.spawn(task.instrument(span));
    }

    /// A tenant run's outcome, decided by the machine; returns the writes to carry out.
    fn finish_tenant(
        &self,
        wave: &Wave,
        seq: u32,
        generation: u64,
        outcome: &Outcome,
    ) -> Option<Writes> {
        let (action, writes) = {
            let mut slot = wave.lock();
            if slot.forgotten {
                return None;
            }
            let Body::Active(machine) = &mut slot.body else {
                return None;
            };
            let (action, effects) = machine.on_outcome(seq, generation, outcome, now());
            let action = action?;
            slot.stops.remove(&seq);
            (action, wave.dispatch_effects(&mut slot, effects))
        };
        // Outside the slot's lock: recording a metric can wait for the metrics
        // pipeline, whose collection (a scrape) reads every wave's slot — holding both
        // in opposite orders deadlocked a daemon in CI.
        self.inner.observer.tenant_finished(outcome, action);
        record_on_span(outcome, action);
        writes
    }

    /// Tenants in flight per server in this wave.
    pub(super) fn running_hosts(wave: &Wave, out: &mut std::collections::BTreeMap<String, u64>) {
        let slot = wave.lock();
        let Body::Active(machine) = &slot.body else {
            return;
        };
        for t in machine.tenants() {
            *out.entry(t.host.clone()).or_insert(0) +=
                u64::from(t.state == super::TenantState::Running);
        }
    }

    /// A wave's tenants: from its machine while it runs, from the store once it finished
    /// (after every write decided for it).
    pub(super) fn read_tenants<T>(
        &self,
        wave: &Wave,
        read: impl FnOnce(&[TenantRecord]) -> T,
    ) -> Result<T, EngineError> {
        let slot = wave.lock();
        if slot.forgotten {
            return Err(EngineError::NotFound(wave.id.clone()));
        }
        if let Body::Active(machine) = &slot.body {
            return Ok(read(machine.tenants()));
        }
        let issued = slot.issued;
        drop(slot);
        wave.wait_for_writes(issued);
        Ok(read(&self.inner.store.load_tenants(&wave.id)?))
    }
}

/// Stored tenants as a machine may take them: one recorded `RUNNING` was interrupted
/// (its start is never stored), so it waits again — or, in a cancelled wave, is
/// cancelled. The same rule as opening the store.
pub(super) fn interrupted(
    record: &WaveRecord,
    mut tenants: Vec<TenantRecord>,
    now_ms: u64,
) -> Vec<TenantRecord> {
    use super::TenantState::{Cancelled, Pending, Running};
    let cancelled = record.state == super::WaveState::Cancelled;
    for t in tenants.iter_mut() {
        match t.state {
            Running | Pending if cancelled => {
                t.state = Cancelled;
                t.finished_at_ms = Some(now_ms);
            }
            Running => t.state = Pending,
            _ => {}
        }
    }
    tenants
}

/// Puts the result of a run on the current (tenant) span, for traces.
fn record_on_span(outcome: &Outcome, action: TenantAction) {
    let span = tracing::Span::current();
    span.record("decision", action.as_str());
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
        error: crate::apply::ApplyError::Connect(DbFailure::of_kind(FailureKind::Refused, message)),
    }
}

#[cfg(test)]
mod tests;
