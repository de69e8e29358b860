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
use crate::store::{ApprovalRecord, ErrorRecord, StateChange, TenantRecord, WaveRecord};

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
    /// Open the stage after the finished one (a wave with `approve_between_stages`);
    /// `accept_failures` when some of its tenants did not succeed.
    Approve { accept_failures: bool },
}

impl Command {
    /// The verb, for logs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume(_) => "resume",
            Command::Cancel => "cancel",
            Command::Retry => "retry",
            Command::Approve { .. } => "approve",
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
    /// Where each stage's tenants end (exclusive `seq`), from the record's stages.
    stage_ends: Vec<u32>,
}

/// A stage as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct StageView {
    /// `canary (5)`, `region=eu`, `rest`.
    pub name: String,
    /// Its tenants per state.
    pub counts: Counts,
    /// Its tenants may start.
    pub open: bool,
    /// Who opened the next stage, when approval was required.
    pub approval: Option<ApprovalRecord>,
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
        let mut stage_ends = Vec::with_capacity(record.stages.len());
        let mut end = 0u32;
        for stage in &record.stages {
            end = end.saturating_add(stage.tenants);
            stage_ends.push(end);
        }
        if !record.stages.is_empty()
            && (end as usize != tenants.len() || record.stage_open as usize >= record.stages.len())
        {
            return Err(format!(
                "its stages hold {end} tenants ({} open of {}), it has {}",
                record.stage_open + 1,
                record.stages.len(),
                tenants.len()
            ));
        }
        Ok(Self {
            record,
            tenants,
            queue,
            counts,
            canaries,
            rng: fastrand::Rng::with_seed(seed),
            holds: BTreeMap::new(),
            stage_ends,
        })
    }

    /// The `seq`s of stage `i`.
    fn stage_range(&self, i: usize) -> std::ops::Range<usize> {
        let start = if i == 0 {
            0
        } else {
            self.stage_ends[i - 1] as usize
        };
        start..self.stage_ends[i] as usize
    }

    /// Stage `i`'s tenants per state.
    fn stage_counts(&self, i: usize) -> Counts {
        let mut c = Counts::default();
        for t in &self.tenants[self.stage_range(i)] {
            c.total += 1;
            *c.slot(t.state) += 1;
            c.add_baselined(t.baselined);
        }
        c
    }

    /// `stage 2 (region=eu)`.
    fn stage_name(&self, i: usize) -> String {
        match self.record.stages.get(i) {
            Some(s) => format!("{} ({})", i + 1, s.name),
            None => format!("{}", i + 1),
        }
    }

    /// The wave's stages with their counts (empty for a wave without stages).
    pub fn stages(&self) -> Vec<StageView> {
        (0..self.record.stages.len())
            .map(|i| StageView {
                name: self.record.stages[i].name.clone(),
                counts: self.stage_counts(i),
                open: i <= self.record.stage_open as usize,
                approval: self.record.stages[i].approval.clone(),
            })
            .collect()
    }

    /// The stage whose end awaits an operator's approval: the open one, when the wave
    /// requires approval between stages, a stage follows it, and every tenant of the
    /// open stages is done. Derived, never stored: a restart cannot lose it.
    pub fn awaiting_approval(&self) -> Option<usize> {
        let open = self.record.stage_open as usize;
        (self.record.policy.approve_between_stages
            && open + 1 < self.record.stages.len()
            && self.stages_done(open))
        .then_some(open)
    }

    /// Every tenant of stages `..=open` is done. Cheap while tenants run (their stage
    /// is not done); otherwise scanned from the end, where the ones still waiting are
    /// (tenants start in `seq` order), so a 100,000-tenant stage is not read whole at
    /// every outcome.
    fn stages_done(&self, open: usize) -> bool {
        self.queue.running() == 0
            && self.tenants[..self.stage_ends[open] as usize]
                .iter()
                .rev()
                .all(|t| t.state.is_terminal())
    }

    /// At the end of the open stage: open the next one, or (approval required) pause
    /// for it. True when the record changed. Called after every tenant outcome and
    /// before every start, so a decision lost to a crash is taken again.
    fn end_of_stage(&mut self, now: Now) -> bool {
        let open = self.record.stage_open as usize;
        if open + 1 >= self.record.stages.len() || !self.stages_done(open) {
            return false;
        }
        let c = self.stage_counts(open);
        // A failed canary keeps its own rule: resume --accept-canary-failure (or
        // approve --accept-failures) passes it, nothing else.
        if open == 0
            && !self.record.canary_passed
            && (c.failed > 0 || c.cancelled > 0)
            && !self.record.policy.approve_between_stages
        {
            return false;
        }
        let done = format!(
            "stage {} finished: {} succeeded, {} failed, {} cancelled",
            self.stage_name(open),
            c.succeeded,
            c.failed,
            c.cancelled
        );
        if self.record.policy.approve_between_stages {
            if self.record.state != WaveState::Running {
                return false;
            }
            let why = format!(
                "{done}; `flotilla wave approve` opens stage {}",
                self.stage_name(open + 1)
            );
            self.transition(WaveState::Paused, DAEMON_ACTOR, &why, now);
            return true;
        }
        if open == 0 {
            self.record.canary_passed = true;
        }
        self.record.stage_open += 1;
        let opened = format!("{done}; stage {} opens", self.stage_name(open + 1));
        if open == 0 && self.record.policy.after_canary == AfterCanary::Pause {
            let checkpoint = format!("{opened} when resumed");
            match self.record.state {
                WaveState::Running => {
                    self.transition(WaveState::Paused, DAEMON_ACTOR, &checkpoint, now)
                }
                _ => self.note(DAEMON_ACTOR, &checkpoint, now),
            }
        } else {
            self.note(DAEMON_ACTOR, &opened, now);
        }
        true
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
            stages: self.stages(),
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
        let gate = if let Some(end) = self.stage_ends.get(self.record.stage_open as usize) {
            *end
        } else if self.record.canary_passed || self.canaries == 0 {
            u32::MAX
        } else {
            self.canaries
        };
        Limits {
            concurrency: p.concurrency,
            per_host: p.per_host,
            gate,
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
                } else if self.end_of_stage(now) {
                    // Taken again here, not only after an outcome: a decision lost to
                    // a crash (the wave record not yet written) is not lost for good.
                    let mut effects =
                        vec![Effect::PersistWave(self.record.clone()), self.event(None)];
                    // Opened: start the next stage's first tenant now (at most once per
                    // stage, so this recursion is shallow). Paused: wait.
                    let (step, more) = self.next_start(now, draining);
                    effects.extend(more);
                    (step, effects)
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
        // A batch script reports its rows once, when it finishes (a run cut short
        // reports none; the run that finishes it, every row).
        if let Outcome::Applied { scripts, .. }
        | Outcome::Cancelled { scripts }
        | Outcome::Failed { scripts, .. } = outcome
        {
            let rows: u64 = scripts.iter().filter_map(|s| s.rows).sum();
            t.rows_changed = t.rows_changed.saturating_add(rows);
        }
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
            // With stages, the end of the canary is the end of stage 1 (below).
            if all_passed && self.record.stages.is_empty() {
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
        let stage_changed = self.end_of_stage(now);
        if self.record.state != WaveState::Running {
            return stage_changed;
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
        stage_changed
    }

    /// What resuming resets: time spent paused is not time spent busy, nor time held
    /// (a resumed wave gives its held servers a new `max_hold`, else the first reading
    /// would pause it again at once). A running tenant's record is stored with its
    /// outcome (its start never is), so only the others are `changed`.
    fn unpause(&mut self, changed: &mut Vec<u32>, now: Now) {
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
        for (_, since) in self.holds.values_mut() {
            *since = now.wall_ms;
        }
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
                if let Some(stage) = self.awaiting_approval() {
                    return Err(EngineError::AwaitingApproval {
                        wave: id,
                        stage: self.stage_name(stage),
                    });
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
                self.unpause(&mut changed, now);
                self.transition(WaveState::Running, actor, reason, now);
            }
            Command::Approve { accept_failures } => {
                if state != WaveState::Paused {
                    return Err(refuse("approve"));
                }
                let Some(stage) = self.awaiting_approval() else {
                    let why = if !self.record.policy.approve_between_stages {
                        "it was started without --approve-between-stages".to_string()
                    } else if self.record.stage_open as usize + 1 >= self.record.stages.len() {
                        "its last stage is open".to_string()
                    } else {
                        format!(
                            "stage {} has tenants still to run; resume it",
                            self.stage_name(self.record.stage_open as usize)
                        )
                    };
                    return Err(EngineError::NothingToApprove { wave: id, why });
                };
                let c = self.stage_counts(stage);
                let failures = c.failed > 0 || c.cancelled > 0;
                if failures && !accept_failures {
                    return Err(EngineError::StageFailed {
                        wave: id,
                        stage: self.stage_name(stage),
                        failed: c.failed,
                        cancelled: c.cancelled,
                    });
                }
                self.record.stages[stage].approval = Some(ApprovalRecord {
                    by: actor.to_string(),
                    at_ms: now.wall_ms,
                    succeeded: c.succeeded,
                    failed: c.failed,
                    cancelled: c.cancelled,
                    accepted_failures: failures,
                });
                if stage == 0 {
                    self.record.canary_passed = true;
                }
                self.record.stage_open += 1;
                let mut why = format!(
                    "approved stage {}: {} succeeded, {} failed, {} cancelled{}; stage {} opens",
                    self.stage_name(stage),
                    c.succeeded,
                    c.failed,
                    c.cancelled,
                    if failures { " (failures accepted)" } else { "" },
                    self.stage_name(stage + 1)
                );
                if !reason.is_empty() {
                    why = format!("{why}: {reason}");
                }
                self.unpause(&mut changed, now);
                self.transition(WaveState::Running, actor, &why, now);
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

/// The stages of a wave over tenants in start order: for each tenant the stage it is
/// in, and each stage's name. Stage 0 is the canary; each later stage takes, of the
/// tenants no earlier stage took, its count (the first ones) or its label's matches;
/// tenants left over form a last stage `rest`. A stage that would take nobody is an
/// error naming it (an empty stage would pass at once). `None` for a policy without
/// stages (only the canary gate, as before stages existed).
pub fn assign_stages(
    policy: &crate::policy::Policy,
    labels: &[&std::collections::BTreeMap<String, String>],
) -> Result<Option<StagePlan>, String> {
    use crate::policy::Stage;
    if policy.stages.is_empty() && !policy.approve_between_stages {
        return Ok(None);
    }
    let unassigned = u32::MAX;
    let mut stage_of = vec![unassigned; labels.len()];
    let mut names = Vec::new();
    for (i, canary) in canary_flags(&policy.canary, labels).into_iter().enumerate() {
        if canary {
            stage_of[i] = 0;
        }
    }
    names.push(format!("canary ({})", policy.canary));
    for stage in &policy.stages {
        let index = names.len() as u32;
        let mut taken = 0usize;
        for (i, l) in labels.iter().enumerate() {
            if stage_of[i] != unassigned {
                continue;
            }
            let takes = match stage {
                Stage::Count { count } => taken < *count as usize,
                Stage::Label { key, value } => l.get(key) == Some(value),
                Stage::Rest => true,
            };
            if takes {
                stage_of[i] = index;
                taken += 1;
            }
        }
        names.push(stage.to_string());
    }
    if stage_of.contains(&unassigned) {
        let index = names.len() as u32;
        for s in stage_of.iter_mut().filter(|s| **s == unassigned) {
            *s = index;
        }
        names.push("rest".to_string());
    }
    for (i, name) in names.iter().enumerate() {
        if !stage_of.contains(&(i as u32)) {
            return Err(format!(
                "stage {} ({name}) takes no tenant of the wave",
                i + 1
            ));
        }
    }
    Ok(Some(StagePlan { stage_of, names }))
}

/// Which stage each tenant of a wave is in, and the stages' names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePlan {
    /// Per tenant, in start order.
    pub stage_of: Vec<u32>,
    /// Per stage, the canary first.
    pub names: Vec<String>,
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
