//! One wave as a pure state machine: its record, its tenants and its queue, and every
//! rule of PRODUCT.md §4 — who starts next, canary gate, failure budget, retries with
//! backoff, busy requeue and `busy_timeout`, pause, resume, cancel, retry, and when a wave
//! is finished. Synchronous, no I/O, no clock of its own (every input carries [`Now`]),
//! no randomness but its own seeded generator: what it decides can be replayed.
//!
//! Inputs are [`Machine::next_start`], [`Machine::on_outcome`] and [`Machine::command`];
//! each returns what was decided and the [`Effect`]s that must follow (persist a tenant or
//! the wave, emit an event, stop a running tenant). The driver applies the effects; the
//! machine never writes anything itself. Tenant states change in one place
//! ([`Machine::set_state`]), which also keeps the per-state counts: counting 100,000
//! tenants at every event would cost more than the events, so the counts are kept in step
//! there, and the property test checks after every step that they equal a recount.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::queue::{Limits, Queue};
use super::{CanaryFailure, Counts, EngineError, TenantView, WaveEvent, WaveStatus};
use crate::apply::Outcome;
use crate::failure::Retryability;
use crate::policy::{AfterCanary, Canary};
use crate::store::{ErrorRecord, StateChange, TenantRecord, WaveRecord};

/// The actor name of the daemon's own decisions.
pub const DAEMON_ACTOR: &str = "flotillad";

/// A wave's lifecycle (PRODUCT.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WaveState {
    Pending,
    Running,
    Paused,
    Completed,
    Failed,
    Cancelled,
}

impl WaveState {
    /// Every state, in lifecycle order.
    pub const ALL: [WaveState; 6] = [
        WaveState::Pending,
        WaveState::Running,
        WaveState::Paused,
        WaveState::Completed,
        WaveState::Failed,
        WaveState::Cancelled,
    ];

    /// Finished: nothing starts and nothing will without a retry.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            WaveState::Completed | WaveState::Failed | WaveState::Cancelled
        )
    }

    /// Settled: nothing more happens to the wave without an operator — it is finished
    /// and nothing of it runs any more. The one definition a watcher, the API and the
    /// CLI use to know when to stop following.
    pub fn is_settled(self, running: u64) -> bool {
        self.is_finished() && running == 0
    }

    /// The upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            WaveState::Pending => "PENDING",
            WaveState::Running => "RUNNING",
            WaveState::Paused => "PAUSED",
            WaveState::Completed => "COMPLETED",
            WaveState::Failed => "FAILED",
            WaveState::Cancelled => "CANCELLED",
        }
    }
}

/// A tenant's state within a wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TenantState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TenantState {
    /// The upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            TenantState::Pending => "PENDING",
            TenantState::Running => "RUNNING",
            TenantState::Succeeded => "SUCCEEDED",
            TenantState::Failed => "FAILED",
            TenantState::Cancelled => "CANCELLED",
        }
    }

    /// Done for this wave unless retried.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TenantState::Succeeded | TenantState::Failed | TenantState::Cancelled
        )
    }
}

/// The time an input happens at: a monotonic instant for delays, wall-clock milliseconds
/// for what is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Instant,
    pub wall_ms: u64,
}

/// What an operator (or the daemon itself) asks of a wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Stop new starts; in-flight tenants finish their bundle.
    Pause,
    /// Continue; past a failed canary only when accepted.
    Resume(CanaryFailure),
    /// Stop new starts, stop in-flight tenants at the next script boundary, cancel the
    /// waiting ones.
    Cancel,
    /// Failed tenants back to pending.
    Retry,
}

impl Command {
    /// The verb, for logs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume(_) => "resume",
            Command::Cancel => "cancel",
            Command::Retry => "retry",
        }
    }
}

/// What the machine decided about a finished tenant run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantAction {
    /// Applied or already up to date.
    Succeed,
    /// A retryable failure with retries left: again after the delay.
    RetryAfter(Duration),
    /// Someone else holds the tenant: again after the delay, no retry spent.
    RequeueBusy(Duration),
    /// Failed for good (or until an operator retries).
    Fail,
    /// Stopped by a cancel.
    Cancel,
}

impl TenantAction {
    /// The lower-case name, for metrics and traces.
    pub fn as_str(self) -> &'static str {
        match self {
            TenantAction::Succeed => "succeeded",
            TenantAction::RetryAfter(_) => "retried",
            TenantAction::RequeueBusy(_) => "busy",
            TenantAction::Fail => "failed",
            TenantAction::Cancel => "cancelled",
        }
    }
}

/// What must follow a decision; the driver does it, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Store this tenant record (within the store's flush interval).
    PersistTenant(TenantRecord),
    /// Store the wave record durably before acknowledging.
    PersistWave(WaveRecord),
    /// Tell watchers.
    Emit(WaveEvent),
    /// Ask the running tenant `seq` to stop at its next script boundary.
    Stop(u32),
}

/// What the dispatcher should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Start tenant `seq` under this generation.
    Start { seq: u32, generation: u64 },
    /// Nothing to start until something happens.
    Wait,
    /// Nothing to start before this instant (a delayed retry).
    WaitUntil(Instant),
    /// The dispatcher is done (the wave finished, or the daemon drains).
    Exit,
}

/// One wave: its record, its tenants by `seq`, its queue.
#[derive(Debug)]
pub struct Machine {
    record: WaveRecord,
    tenants: Vec<TenantRecord>,
    queue: Queue,
    counts: Counts,
    canaries: u32,
    rng: fastrand::Rng,
    /// Hosts held by a failing health gate: why, and since when (wall ms). Not
    /// persisted: a restarted daemon reads health again before it starts anyone.
    holds: BTreeMap<String, (String, u64)>,
}

impl Machine {
    /// A machine for stored (or new) records. Tenants must be in `seq` order from 0;
    /// `RUNNING` ones are taken as interrupted (the caller decides what that means) and
    /// counted as they are. `seed` drives backoff jitter.
    pub fn new(record: WaveRecord, tenants: Vec<TenantRecord>, seed: u64) -> Result<Self, String> {
        let mut queue = Queue::default();
        let mut counts = Counts::default();
        let mut canaries = 0;
        let mut tenants = tenants;
        for (i, t) in tenants.iter_mut().enumerate() {
            if t.seq as usize != i {
                return Err(format!("tenant #{i} has seq {}", t.seq));
            }
            // Time the daemon was down is not time a tenant was busy.
            t.busy_since_ms = None;
            counts.total += 1;
            *counts.slot(t.state) += 1;
            counts.add_baselined(t.baselined);
            match t.state {
                TenantState::Pending => queue.push_ready(t.seq, &t.host),
                TenantState::Running => queue.resume_running(&t.host),
                _ => {}
            }
            canaries += u32::from(t.canary);
        }
        Ok(Self {
            record,
            tenants,
            queue,
            counts,
            canaries,
            rng: fastrand::Rng::with_seed(seed),
            holds: BTreeMap::new(),
        })
    }

    /// Hosts with tenants waiting to start: whose health the driver reads.
    pub fn waiting_hosts(&self) -> Vec<String> {
        self.queue.waiting_hosts()
    }

    /// A waiting tenant on `host` (to reach the server with), if any.
    pub fn tenant_on(&self, host: &str) -> Option<&TenantRecord> {
        self.tenants
            .iter()
            .find(|t| t.host == host && t.state == TenantState::Pending)
    }

    /// Held hosts, `host: reason`, for status.
    pub fn holds(&self) -> Vec<String> {
        self.holds
            .iter()
            .map(|(host, (reason, _))| format!("{host}: {reason}"))
            .collect()
    }

    /// A health reading of `host`: `Some(reason)` holds new starts there (others go on),
    /// `None` releases it. A host held longer than the policy's `max_hold_ms` pauses the
    /// wave with the hold's reason, for an operator to look.
    pub fn on_gate(&mut self, host: &str, verdict: Option<String>, now: Now) -> Vec<Effect> {
        let mut effects = Vec::new();
        match verdict {
            Some(reason) => {
                let since = match self.holds.get(host) {
                    Some((_, since)) => *since,
                    None => now.wall_ms,
                };
                let newly = self.queue.hold(host);
                self.holds.insert(host.to_string(), (reason.clone(), since));
                if newly {
                    tracing::warn!(wave = %self.record.id, host, reason = %reason, "host held by its health gate");
                    effects.push(self.event(None));
                }
                let held_for = now.wall_ms.saturating_sub(since);
                if self.record.state == WaveState::Running
                    && held_for >= self.record.policy.max_hold_ms
                {
                    let why = format!(
                        "host {host} held for {}: {reason}",
                        humantime::format_duration(Duration::from_millis(held_for))
                    );
                    self.transition(WaveState::Paused, DAEMON_ACTOR, &why, now);
                    effects.push(Effect::PersistWave(self.record.clone()));
                    effects.push(self.event(None));
                }
            }
            None => {
                if self.holds.remove(host).is_some() {
                    self.queue.release(host);
                    tracing::info!(wave = %self.record.id, host, "host released by its health gate");
                    effects.push(self.event(None));
                }
            }
        }
        effects
    }

    /// The wave record.
    pub fn record(&self) -> &WaveRecord {
        &self.record
    }

    /// Every tenant, by `seq`.
    pub fn tenants(&self) -> &[TenantRecord] {
        &self.tenants
    }

    /// One tenant.
    pub fn tenant(&self, seq: u32) -> Option<&TenantRecord> {
        self.tenants.get(seq as usize)
    }

    /// Tenants per state.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Tenants per state, counted afresh: what [`Machine::counts`] must always equal.
    pub fn recount(&self) -> Counts {
        let mut c = Counts {
            total: self.tenants.len() as u64,
            ..Counts::default()
        };
        for t in &self.tenants {
            *c.slot(t.state) += 1;
            c.add_baselined(t.baselined);
        }
        c
    }

    /// Tenants in flight, per the queue: what the per-host limits are enforced on.
    pub fn in_flight(&self) -> u32 {
        self.queue.running()
    }

    /// Tenants in flight on `host`, per the queue.
    pub fn in_flight_on(&self, host: &str) -> u32 {
        self.queue.running_on(host)
    }

    /// The wave as operators see it.
    pub fn status(&self) -> WaveStatus {
        WaveStatus {
            id: self.record.id.clone(),
            bundle_id: self.record.bundle_id.clone(),
            state: self.record.state,
            reason: self.record.reason.clone(),
            counts: self.counts,
            policy: self.record.policy.clone(),
            created_at_ms: self.record.created_at_ms,
            history: self.record.history.clone(),
            // The machine does not hold the bundle; the wave fills these in.
            placeholders: Default::default(),
            waivers: Vec::new(),
            held: self.holds(),
            fleet: self.record.fleet.clone(),
        }
    }

    /// Takes the records back (a finished wave keeps only its counts in memory).
    pub fn into_parts(self) -> (WaveRecord, Vec<TenantRecord>) {
        (self.record, self.tenants)
    }

    fn event(&self, tenant: Option<u32>) -> Effect {
        Effect::Emit(WaveEvent {
            wave_id: self.record.id.clone(),
            state: self.record.state,
            counts: self.counts,
            tenant: tenant
                .and_then(|seq| self.tenant(seq))
                .map(TenantView::from),
        })
    }

    /// The one place a tenant's state changes: the counts follow.
    fn set_state(&mut self, seq: u32, to: TenantState) {
        let Some(t) = self.tenants.get_mut(seq as usize) else {
            return;
        };
        let from = std::mem::replace(&mut t.state, to);
        *self.counts.slot(from) -= 1;
        *self.counts.slot(to) += 1;
    }

    fn transition(&mut self, to: WaveState, actor: &str, reason: &str, now: Now) {
        let from = self.record.state;
        self.record.state = to;
        self.record.reason = (!reason.is_empty()).then(|| reason.to_string());
        self.record.history.push(StateChange {
            from: Some(from),
            to,
            actor: actor.to_string(),
            reason: reason.to_string(),
            at_ms: now.wall_ms,
        });
        tracing::info!(wave = %self.record.id, from = from.as_str(), to = to.as_str(), actor, reason, "wave state changed");
    }

    /// Every record as it is now, to write again after the store failed a write.
    pub fn snapshot(&self) -> Vec<Effect> {
        let mut out: Vec<Effect> = self
            .tenants
            .iter()
            .filter(|t| t.state != TenantState::Running)
            .cloned()
            .map(Effect::PersistTenant)
            .collect();
        out.push(Effect::PersistWave(self.record.clone()));
        out
    }

    /// Records a problem the daemon hit (a store that refused a write) in the history,
    /// without changing the wave's state.
    pub fn note_problem(&mut self, reason: &str, now: Now) -> Vec<Effect> {
        self.note(DAEMON_ACTOR, reason, now);
        vec![Effect::PersistWave(self.record.clone()), self.event(None)]
    }

    /// Records something that happened without changing the wave's state.
    fn note(&mut self, actor: &str, reason: &str, now: Now) {
        let state = self.record.state;
        self.record.reason = Some(reason.to_string());
        self.record.history.push(StateChange {
            from: Some(state),
            to: state,
            actor: actor.to_string(),
            reason: reason.to_string(),
            at_ms: now.wall_ms,
        });
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

    /// True when a start could happen now (for the rate limiter: wait for a permit only
    /// when there is something to spend it on).
    pub fn can_start(&mut self, now: Now) -> bool {
        self.queue.promote_due(now.mono);
        self.record.state == WaveState::Running
            && self.queue.running() < self.record.policy.concurrency
            && !self.queue.is_empty()
    }

    /// What the dispatcher does next; when it starts a tenant, the tenant is `RUNNING`
    /// with a new generation. `draining`: the daemon is stopping, start nothing.
    pub fn next_start(&mut self, now: Now, draining: bool) -> (Step, Vec<Effect>) {
        let state = self.record.state;
        match state {
            WaveState::Running if draining => (Step::Exit, Vec::new()),
            WaveState::Running => {
                self.queue.promote_due(now.mono);
                if let Some((seq, _host)) = self.queue.take_next(self.limits()) {
                    self.set_state(seq, TenantState::Running);
                    let generation = match self.tenants.get_mut(seq as usize) {
                        Some(t) => {
                            t.attempts += 1;
                            t.generation += 1;
                            t.started_at_ms = Some(now.wall_ms);
                            t.finished_at_ms = None;
                            t.generation
                        }
                        None => return (Step::Wait, Vec::new()),
                    };
                    // Not persisted: a tenant found RUNNING on open is queued again
                    // anyway, so recording the start would buy a write per tenant.
                    let effects = vec![self.event(Some(seq))];
                    (Step::Start { seq, generation }, effects)
                } else if self.queue.running() == 0 && self.queue.is_empty() {
                    if self.tenants.iter().all(|t| t.state.is_terminal()) {
                        let c = self.counts;
                        let (to, reason) = if c.failed == 0 && c.cancelled == 0 {
                            (WaveState::Completed, String::new())
                        } else {
                            (
                                WaveState::Failed,
                                format!("{} of {} tenants failed", c.failed, c.total),
                            )
                        };
                        self.transition(to, DAEMON_ACTOR, &reason, now);
                        let effects =
                            vec![Effect::PersistWave(self.record.clone()), self.event(None)];
                        (Step::Exit, effects)
                    } else {
                        // Held by the canary gate with nothing left to run.
                        (Step::Wait, Vec::new())
                    }
                } else if let Some(at) = self.queue.next_due() {
                    (Step::WaitUntil(at), Vec::new())
                } else {
                    (Step::Wait, Vec::new())
                }
            }
            WaveState::Pending | WaveState::Paused if draining => (Step::Exit, Vec::new()),
            WaveState::Pending | WaveState::Paused => (Step::Wait, Vec::new()),
            WaveState::Cancelled if self.queue.running() > 0 && !draining => {
                (Step::Wait, Vec::new())
            }
            WaveState::Cancelled | WaveState::Completed | WaveState::Failed => {
                (Step::Exit, Vec::new())
            }
        }
    }

    /// A tenant run finished. A result for another generation, or for a tenant that is
    /// not running, is stale and changes nothing (`None`).
    pub fn on_outcome(
        &mut self,
        seq: u32,
        generation: u64,
        outcome: &Outcome,
        now: Now,
    ) -> (Option<TenantAction>, Vec<Effect>) {
        let Some(current) = self.tenant(seq) else {
            return (None, Vec::new());
        };
        if current.generation != generation || current.state != TenantState::Running {
            tracing::warn!(wave = %self.record.id, seq, generation, "dropping a stale tenant result");
            return (None, Vec::new());
        }
        let host = current.host.clone();
        self.queue.finished(&host);
        let policy = self.record.policy.clone();
        let cancelled_wave = self.record.state == WaveState::Cancelled;
        let Some(t) = self.tenants.get_mut(seq as usize) else {
            return (None, Vec::new());
        };
        let action = match outcome {
            Outcome::UpToDate { .. } | Outcome::Applied { .. } => TenantAction::Succeed,
            Outcome::Cancelled { .. } => TenantAction::Cancel,
            Outcome::Busy { .. } if cancelled_wave => TenantAction::Cancel,
            Outcome::Busy { holder } => {
                // Not a failure and not a retry spent, until it lasts past busy_timeout.
                let since = *t.busy_since_ms.get_or_insert(now.wall_ms);
                let busy_for = now.wall_ms.saturating_sub(since);
                let why = format!(
                    "busy: {}",
                    holder
                        .as_deref()
                        .unwrap_or("the Flotilla advisory lock is held by another session")
                );
                if busy_for >= policy.busy_timeout_ms {
                    // A retry of this tenant starts a new window.
                    t.busy_since_ms = None;
                    t.last_error = Some(ErrorRecord {
                        script: None,
                        sqlstate: None,
                        message: format!(
                            "{why}; still busy after {} (busy_timeout)",
                            humantime::format_duration(Duration::from_millis(busy_for))
                        ),
                        retryability: Retryability::Permanent,
                    });
                    TenantAction::Fail
                } else {
                    t.last_error = Some(ErrorRecord {
                        script: None,
                        sqlstate: None,
                        message: why,
                        retryability: Retryability::Retryable,
                    });
                    let delay = policy
                        .backoff(t.attempts.min(6), &mut self.rng)
                        .max(Duration::from_millis(200));
                    TenantAction::RequeueBusy(delay)
                }
            }
            Outcome::Failed { error, .. } => {
                t.last_error = Some(ErrorRecord {
                    script: error.script().map(str::to_string),
                    sqlstate: error.sqlstate().map(str::to_string),
                    message: error.to_string(),
                    retryability: error.retryability(),
                });
                if error.retryability() == Retryability::Retryable
                    && t.retries_used < policy.retries
                    && !cancelled_wave
                {
                    t.retries_used += 1;
                    let delay = policy.backoff(t.retries_used, &mut self.rng);
                    tracing::info!(wave = %self.record.id, tenant = %t.tenant_id, error = %error, ?delay, "retryable failure; retrying later");
                    TenantAction::RetryAfter(delay)
                } else {
                    tracing::warn!(wave = %self.record.id, tenant = %t.tenant_id, error = %error, "tenant failed");
                    TenantAction::Fail
                }
            }
        };
        if !matches!(outcome, Outcome::Busy { .. }) {
            t.busy_since_ms = None;
        }
        let next = match action {
            TenantAction::Succeed => {
                t.last_error = None;
                // A tenant is baselined once (its log is no longer empty after).
                if let Outcome::Applied { baselined, .. } | Outcome::UpToDate { baselined, .. } =
                    outcome
                    && *baselined > 0
                    && t.baselined == 0
                {
                    t.baselined = *baselined;
                    self.counts.add_baselined(*baselined);
                }
                TenantState::Succeeded
            }
            TenantAction::Fail => TenantState::Failed,
            TenantAction::Cancel => TenantState::Cancelled,
            TenantAction::RetryAfter(delay) | TenantAction::RequeueBusy(delay) => {
                self.queue.push_delayed(seq, &host, now.mono + delay);
                TenantState::Pending
            }
        };
        if next.is_terminal()
            && let Some(t) = self.tenants.get_mut(seq as usize)
        {
            t.finished_at_ms = Some(now.wall_ms);
        }
        self.set_state(seq, next);
        let mut effects = Vec::new();
        if let Some(t) = self.tenant(seq) {
            effects.push(Effect::PersistTenant(t.clone()));
        }
        if self.after_tenant(seq, now) {
            effects.push(Effect::PersistWave(self.record.clone()));
        }
        effects.push(self.event(Some(seq)));
        (Some(action), effects)
    }

    /// The canary and failure-budget rules after a tenant finished; true when the wave
    /// record changed.
    ///
    /// Every canary's outcome counts, whatever the wave's state when it arrives: a canary
    /// that fails while an operator has the wave paused must still keep the rest of the
    /// fleet from starting.
    fn after_tenant(&mut self, seq: u32, now: Now) -> bool {
        let Some(t) = self.tenant(seq) else {
            return false;
        };
        if t.canary && !self.record.canary_passed {
            if t.state == TenantState::Failed {
                let reason = format!(
                    "canary tenant {} failed: {}; retry it, or resume with --accept-canary-failure",
                    t.tenant_id,
                    t.last_error
                        .as_ref()
                        .map(|e| e.message.as_str())
                        .unwrap_or("")
                );
                return match self.record.state {
                    WaveState::Running => {
                        self.transition(WaveState::Paused, DAEMON_ACTOR, &reason, now);
                        true
                    }
                    WaveState::Paused | WaveState::Pending => {
                        self.note(DAEMON_ACTOR, &reason, now);
                        true
                    }
                    _ => false,
                };
            }
            let all_passed = self
                .tenants
                .iter()
                .filter(|c| c.canary)
                .all(|c| c.state == TenantState::Succeeded);
            if all_passed {
                self.record.canary_passed = true;
                if self.record.policy.after_canary == AfterCanary::Pause {
                    let checkpoint = "canary stage succeeded; resume to continue";
                    match self.record.state {
                        WaveState::Running => {
                            self.transition(WaveState::Paused, DAEMON_ACTOR, checkpoint, now)
                        }
                        // Already paused by an operator: say that this resume is also
                        // the canary checkpoint's.
                        WaveState::Paused | WaveState::Pending => {
                            self.note(DAEMON_ACTOR, checkpoint, now)
                        }
                        _ => {}
                    }
                }
                return true;
            }
        }
        if self.record.state != WaveState::Running {
            return false;
        }
        let budget = self.record.policy.max_failures;
        let failed = self
            .tenant(seq)
            .is_some_and(|t| t.state == TenantState::Failed);
        if failed && budget.exceeded(self.counts.failed, self.counts.total) {
            let reason = format!(
                "failure budget exceeded: {} of {} tenants failed (budget {budget:?})",
                self.counts.failed, self.counts.total
            );
            self.transition(WaveState::Paused, DAEMON_ACTOR, &reason, now);
            return true;
        }
        false
    }

    /// An operator's (or the daemon's) command. Refused with the reason when the wave's
    /// state does not allow it; otherwise the effects include persisting every tenant it
    /// changed and the wave record.
    pub fn command(
        &mut self,
        command: Command,
        actor: &str,
        reason: &str,
        now: Now,
    ) -> Result<Vec<Effect>, EngineError> {
        let id = self.record.id.clone();
        let state = self.record.state;
        let refuse = |action: &'static str| EngineError::InvalidState {
            wave: id.clone(),
            state,
            action,
        };
        let mut effects = Vec::new();
        let mut changed: Vec<u32> = Vec::new();
        match command {
            Command::Pause => match state {
                WaveState::Running | WaveState::Pending => {
                    self.transition(WaveState::Paused, actor, reason, now);
                }
                _ => return Err(refuse("pause")),
            },
            Command::Resume(canary_failure) => {
                if !matches!(state, WaveState::Paused | WaveState::Pending) {
                    return Err(refuse("resume"));
                }
                if !self.record.canary_passed
                    && let Some(failed) = self
                        .tenants
                        .iter()
                        .find(|t| t.canary && t.state == TenantState::Failed)
                {
                    if canary_failure == CanaryFailure::Refuse {
                        return Err(EngineError::CanaryFailed {
                            wave: id,
                            tenant: failed.tenant_id.clone(),
                        });
                    }
                    self.record.canary_passed = true;
                    self.note(actor, "the canary stage's failures are accepted", now);
                }
                // Time spent paused is not time spent busy. A running tenant's record is
                // stored with its outcome (its start never is).
                for t in self
                    .tenants
                    .iter_mut()
                    .filter(|t| t.busy_since_ms.is_some())
                {
                    t.busy_since_ms = None;
                    if t.state != TenantState::Running {
                        changed.push(t.seq);
                    }
                }
                // Nor time held: a resumed wave gives its held servers a new max_hold
                // (else the first reading would pause it again at once).
                for (_, since) in self.holds.values_mut() {
                    *since = now.wall_ms;
                }
                self.transition(WaveState::Running, actor, reason, now);
            }
            Command::Cancel => {
                if state.is_finished() {
                    return Err(refuse("cancel"));
                }
                self.transition(WaveState::Cancelled, actor, reason, now);
                for seq in self.queue.drain_waiting() {
                    self.set_state(seq, TenantState::Cancelled);
                    if let Some(t) = self.tenants.get_mut(seq as usize) {
                        t.finished_at_ms = Some(now.wall_ms);
                    }
                    changed.push(seq);
                }
                effects.extend(
                    self.tenants
                        .iter()
                        .filter(|t| t.state == TenantState::Running)
                        .map(|t| Effect::Stop(t.seq)),
                );
            }
            Command::Retry => {
                if !matches!(
                    state,
                    WaveState::Failed | WaveState::Completed | WaveState::Paused
                ) {
                    return Err(refuse("retry"));
                }
                let failed: Vec<(u32, String)> = self
                    .tenants
                    .iter()
                    .filter(|t| t.state == TenantState::Failed)
                    .map(|t| (t.seq, t.host.clone()))
                    .collect();
                if failed.is_empty() {
                    return Err(EngineError::NothingToRetry(id));
                }
                for (seq, host) in &failed {
                    self.set_state(*seq, TenantState::Pending);
                    if let Some(t) = self.tenants.get_mut(*seq as usize) {
                        t.retries_used = 0;
                        t.busy_since_ms = None;
                        t.finished_at_ms = None;
                    }
                    self.queue.push_ready(*seq, host);
                    changed.push(*seq);
                }
                let why = if reason.is_empty() {
                    format!("retry {} failed tenants", failed.len())
                } else {
                    reason.to_string()
                };
                if state == WaveState::Paused {
                    self.note(actor, &why, now);
                } else {
                    self.transition(WaveState::Running, actor, &why, now);
                }
            }
        }
        let mut out: Vec<Effect> = changed
            .iter()
            .filter_map(|seq| self.tenant(*seq).cloned().map(Effect::PersistTenant))
            .collect();
        out.push(Effect::PersistWave(self.record.clone()));
        out.push(self.event(None));
        out.extend(effects);
        Ok(out)
    }
}

/// Which tenants of an ordered list are canaries under `canary` (first N, or a label).
pub fn canary_flags(
    canary: &Canary,
    labels: &[&std::collections::BTreeMap<String, String>],
) -> Vec<bool> {
    match canary {
        Canary::None => vec![false; labels.len()],
        Canary::Count { count } => (0..labels.len()).map(|i| i < *count as usize).collect(),
        Canary::Label { key, value } => labels.iter().map(|l| l.get(key) == Some(value)).collect(),
    }
}

#[cfg(test)]
mod tests;
