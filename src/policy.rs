//! A wave's policy (PRODUCT.md §4): how wide, how fast, how careful. Plain data with
//! validation; persisted with the wave so a resumed wave runs under the same rules. The
//! scheduler reads it; this module never schedules.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::apply::{DriftPolicy, OrderPolicy, PlanOptions, TransactionMode};
use crate::connect::SessionSettings;

/// Which tenants go first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum Canary {
    /// No canary stage.
    #[default]
    None,
    /// The first `count` tenants (in target order).
    Count { count: u32 },
    /// Tenants whose label `key` equals `value`.
    Label { key: String, value: String },
}

/// A stage after the canary: the next tenants to open, once every earlier stage is
/// done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum Stage {
    /// The next `count` tenants (in start order) of those no earlier stage took.
    Count { count: u32 },
    /// The tenants no earlier stage took whose label `key` equals `value`.
    Label { key: String, value: String },
    /// Every tenant no earlier stage took (only last).
    Rest,
}

/// Most stages a wave may have after its canary.
pub const MAX_STAGES: usize = 16;

impl Stage {
    /// From its spelling: `rest`, a count (`20`, `count=20`), or a label match
    /// (`region=eu`).
    pub fn parse(spec: &str) -> Result<Stage, PolicyError> {
        let spec = spec.trim();
        if spec == "rest" {
            return Ok(Stage::Rest);
        }
        let count = spec.strip_prefix("count=").unwrap_or(spec);
        if !count.is_empty() && count.bytes().all(|b| b.is_ascii_digit()) {
            return match count.parse::<u32>() {
                Ok(0) | Err(_) => Err(PolicyError(format!(
                    "stage {spec:?}: a count must be within 1..{}",
                    u32::MAX
                ))),
                Ok(count) => Ok(Stage::Count { count }),
            };
        }
        match spec.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => Ok(Stage::Label {
                key: key.trim().to_string(),
                value: value.to_string(),
            }),
            _ => Err(PolicyError(format!(
                "stage {spec:?} is not `rest`, a count (20) or a label match (key=value)"
            ))),
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Count { count } => write!(f, "{count}"),
            Stage::Label { key, value } => write!(f, "{key}={value}"),
            Stage::Rest => f.write_str("rest"),
        }
    }
}

impl std::fmt::Display for Canary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Canary::None => f.write_str("none"),
            Canary::Count { count } => write!(f, "{count}"),
            Canary::Label { key, value } => write!(f, "{key}={value}"),
        }
    }
}

/// What happens when every canary succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AfterCanary {
    /// Go on with the rest.
    #[default]
    Continue,
    /// Pause for an operator to resume.
    Pause,
}

/// How many failed tenants the wave tolerates before pausing itself.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum FailureBudget {
    /// Pause when more than this many tenants failed.
    Count(u32),
    /// Pause when more than this share of the wave's tenants failed, in [0, 1].
    Ratio(f64),
    /// Never pause for failures.
    Unlimited,
}

impl Default for FailureBudget {
    fn default() -> Self {
        FailureBudget::Ratio(0.1)
    }
}

impl FailureBudget {
    /// True when `failed` of `total` exceeds the budget.
    pub fn exceeded(&self, failed: u64, total: u64) -> bool {
        match *self {
            FailureBudget::Count(n) => failed > u64::from(n),
            FailureBudget::Ratio(r) => total > 0 && (failed as f64) / (total as f64) > r,
            FailureBudget::Unlimited => false,
        }
    }
}

/// In which order a wave's tenants start, after its canaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartOrder {
    /// By tenant id: deterministic, and what earlier waves did.
    #[default]
    Id,
    /// Smallest database first (`pg_database_size` read at start), so the canary and
    /// the early part of the wave meet the cheapest cases; ties and unknown sizes by id,
    /// unknown last.
    Size,
}

/// A wave's policy. Durations are milliseconds so the persisted form is plain numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Tenants in flight for the whole wave (≥ 1).
    pub concurrency: u32,
    /// Tenants in flight on one database server; `None`: only `concurrency` limits.
    pub per_host: Option<u32>,
    /// Tenant starts per second; `None`: unlimited.
    pub rate: Option<f64>,
    pub canary: Canary,
    pub after_canary: AfterCanary,
    /// The stages after the canary, in order (tenants no stage takes form a last one).
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// Pause at the end of every stage until an operator approves the next.
    #[serde(default)]
    pub approve_between_stages: bool,
    /// `--undo-to V`: the wave undoes every version above V on each tenant (canonical
    /// version text) instead of applying anything.
    #[serde(default)]
    pub undo_to: Option<String>,
    /// `--rehearse-undo`: each canary applies, undoes what it applied, and applies it
    /// again, before the next stage may start.
    #[serde(default)]
    pub rehearse_undo: bool,
    pub max_failures: FailureBudget,
    /// Attempts after the first, for retryable failures only.
    pub retries: u32,
    /// First retry delay; doubles per attempt, with full jitter, up to `backoff_max_ms`.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub transaction: TransactionMode,
    /// `lock_timeout` of a tenant's first attempt: short, so an application queued
    /// behind a lock Flotilla waits for is not stalled for long. Each retry doubles it,
    /// up to `lock_timeout_max_ms`.
    pub lock_timeout_ms: u64,
    /// The ceiling retries escalate `lock_timeout` to; `None`: the larger of
    /// `lock_timeout_ms` and 5 s.
    #[serde(default)]
    pub lock_timeout_max_ms: Option<u64>,
    /// How long an application query may wait on a Flotilla session (blocked by a lock
    /// it holds or waits for) before the watchdog cancels Flotilla's statement.
    /// A wave stored by an older daemon has none: off (`MAX_TIMEOUT_MS`), as it was.
    #[serde(default = "off_max_block_ms")]
    pub max_block_ms: u64,
    /// Health gate: hold a host while a standby's replay lags more than this (0: off;
    /// off for a wave stored by an older daemon).
    #[serde(default)]
    pub max_replication_lag_ms: u64,
    /// Health gate: hold a host while more than this share of `max_connections` is in
    /// use (1.0: off; off for a wave stored by an older daemon).
    #[serde(default = "off_max_connections_share")]
    pub max_connections_share: f64,
    /// Health gate: an operator's read-only SQL returning one boolean; `false` holds
    /// the host.
    #[serde(default)]
    pub gate_sql: Option<String>,
    /// A host held longer than this pauses the wave.
    #[serde(default = "default_max_hold_ms")]
    pub max_hold_ms: u64,
    /// In which order tenants start (canaries first either way).
    #[serde(default)]
    pub start_order: StartOrder,
    /// 0: no limit.
    pub statement_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// `idle_in_transaction_session_timeout` of every tenant session: a daemon that
    /// stalls (or vanishes) mid-transaction does not keep its locks for long.
    #[serde(default = "default_idle_in_transaction_timeout_ms")]
    pub idle_in_transaction_timeout_ms: u64,
    /// How long a tenant may stay busy (its advisory lock held by another runner)
    /// before it fails.
    #[serde(default = "default_busy_timeout_ms")]
    pub busy_timeout_ms: u64,
    /// On a tenant whose execution log is empty, record every version up to this one as
    /// `baselined` (done without running) before applying the rest: a fleet migrated
    /// before Flotilla met it. Canonical version text.
    #[serde(default)]
    pub baseline_version: Option<String>,
    /// On a tenant whose execution log is empty, record as `baselined` what the previous
    /// migration tool's history says ran (`flyway`, `dbmate`, `golang-migrate`, `sqlx`,
    /// optionally `=schema.table`), refusing a tenant whose history forbids it.
    /// Canonical form (`flyway=public.flyway_schema_history`).
    #[serde(default)]
    pub adopt: Option<String>,
    /// Safety-lint rules waived for the whole wave (`--allow RULE`): a bundle with an
    /// unwaived finding does not start.
    #[serde(default)]
    pub allow: Vec<String>,
    pub drift: DriftPolicy,
    pub order: OrderPolicy,
}

/// The applier leaves a transaction idle only for one round trip between two batches
/// of a `per-tenant` transaction: a few seconds covers a slow network with room.
fn default_idle_in_transaction_timeout_ms() -> u64 {
    10_000
}

/// An application query may wait this long on Flotilla: noticeable in a p99, not an
/// incident.
fn default_max_block_ms() -> u64 {
    1_000
}

/// A wave stored before the watchdog existed keeps running without it.
fn off_max_block_ms() -> u64 {
    MAX_TIMEOUT_MS
}

/// A wave stored before the gates existed keeps running without them.
fn off_max_connections_share() -> f64 {
    1.0
}

fn default_max_replication_lag_ms() -> u64 {
    10_000
}

fn default_max_connections_share() -> f64 {
    0.9
}

fn default_max_hold_ms() -> u64 {
    10 * 60 * 1000
}

/// The longest `--gate-sql` accepted.
pub const MAX_GATE_SQL_BYTES: usize = 16 * 1024;

/// Where escalating lock timeouts stop by default.
const DEFAULT_LOCK_TIMEOUT_CEILING_MS: u64 = 5_000;

fn default_busy_timeout_ms() -> u64 {
    10 * 60 * 1000
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            concurrency: 16,
            per_host: None,
            rate: None,
            canary: Canary::None,
            after_canary: AfterCanary::Continue,
            stages: Vec::new(),
            approve_between_stages: false,
            undo_to: None,
            rehearse_undo: false,
            max_failures: FailureBudget::default(),
            retries: 3,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
            transaction: TransactionMode::PerScript,
            lock_timeout_ms: 500,
            lock_timeout_max_ms: None,
            max_block_ms: default_max_block_ms(),
            max_replication_lag_ms: default_max_replication_lag_ms(),
            max_connections_share: default_max_connections_share(),
            gate_sql: None,
            max_hold_ms: default_max_hold_ms(),
            start_order: StartOrder::Id,
            statement_timeout_ms: 0,
            connect_timeout_ms: 10_000,
            idle_in_transaction_timeout_ms: default_idle_in_transaction_timeout_ms(),
            busy_timeout_ms: default_busy_timeout_ms(),
            baseline_version: None,
            adopt: None,
            allow: Vec::new(),
            drift: DriftPolicy::Fail,
            order: OrderPolicy::Strict,
        }
    }
}

/// A policy that makes no sense, with the field named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy: {0}")]
pub struct PolicyError(pub String);

/// The largest timeout PostgreSQL accepts (its GUCs are 32-bit milliseconds): beyond
/// it every session would fail at connect.
pub const MAX_TIMEOUT_MS: u64 = i32::MAX as u64;
/// Most tenants in flight a wave may ask for, in the whole wave or on one server.
pub const MAX_CONCURRENCY: u32 = 10_000;
/// Most retries a policy may ask for: beyond this a retry loop is an outage, not a blip.
pub const MAX_RETRIES: u32 = 100;
/// Slowest start rate: one tenant every 1,000 s. Slower is a paused wave.
pub const MIN_RATE: f64 = 0.001;
/// Fastest start rate; above it the limiter's period would round to nothing.
pub const MAX_RATE: f64 = 100_000.0;
/// Longest retry backoff.
pub const MAX_BACKOFF_MS: u64 = 24 * 60 * 60 * 1000;

/// Whether a timeout of zero means "no limit" or is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroTimeout {
    /// 0 disables the limit (`statement_timeout`).
    MeansNone,
    /// The limit must be set (`lock_timeout`: every session sets one, PRODUCT.md §1.4).
    Refused,
}

/// Checks a timeout in milliseconds against what PostgreSQL accepts, naming `field`.
pub fn check_timeout_ms(field: &str, ms: u64, zero: ZeroTimeout) -> Result<(), PolicyError> {
    match (ms, zero) {
        (0, ZeroTimeout::MeansNone) => Ok(()),
        (1..=MAX_TIMEOUT_MS, _) => Ok(()),
        (_, ZeroTimeout::MeansNone) => Err(PolicyError(format!(
            "{field} must be 0 (no limit) or within 1 ms..{MAX_TIMEOUT_MS} ms (got {ms} ms)"
        ))),
        (_, ZeroTimeout::Refused) => Err(PolicyError(format!(
            "{field} must be within 1 ms..{MAX_TIMEOUT_MS} ms (got {ms} ms)"
        ))),
    }
}

/// A duration given by a person (a flag, a directive) as whole milliseconds, checked
/// like [`check_timeout_ms`]. A sub-millisecond part is refused rather than rounded:
/// `500us` would otherwise become 0, which PostgreSQL reads as "no timeout".
pub fn timeout_ms(field: &str, d: Duration, zero: ZeroTimeout) -> Result<u64, PolicyError> {
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(PolicyError(format!(
            "{field} must be whole milliseconds (got {d:?})"
        )));
    }
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    check_timeout_ms(field, ms, zero)?;
    Ok(ms)
}

impl Policy {
    /// Checks every field against its allowed range; the message names the field and
    /// the range. The one validation of a policy: the API, the CLI and the engine (for
    /// stored waves too) all call this.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |m: String| Err(PolicyError(m));
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return bad(format!(
                "concurrency must be within 1..{MAX_CONCURRENCY} (got {})",
                self.concurrency
            ));
        }
        if let Some(n) = self.per_host
            && !(1..=MAX_CONCURRENCY).contains(&n)
        {
            return bad(format!(
                "per_host must be within 1..{MAX_CONCURRENCY}, or unset (got {n})"
            ));
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && (MIN_RATE..=MAX_RATE).contains(&rate))
        {
            return bad(format!(
                "rate must be within {MIN_RATE}..{MAX_RATE} starts per second, or unset for unlimited (got {rate})"
            ));
        }
        if let FailureBudget::Ratio(r) = self.max_failures
            && !(0.0..=1.0).contains(&r)
        {
            return bad(format!("max_failures ratio must be within 0..1 (got {r})"));
        }
        if let Canary::Count { count: 0 } = self.canary {
            return bad("canary count must be at least 1 (or no canary)".into());
        }
        if let Canary::Label { key, .. } = &self.canary
            && key.trim().is_empty()
        {
            return bad("canary label needs a key (key=value)".into());
        }
        if !self.stages.is_empty() && self.canary == Canary::None {
            return bad("stages need a canary: the first stage is the canary".into());
        }
        if self.approve_between_stages && self.canary == Canary::None {
            return bad("approve_between_stages needs stages (at least a canary)".into());
        }
        if self.stages.len() > MAX_STAGES {
            return bad(format!(
                "at most {MAX_STAGES} stages after the canary (got {})",
                self.stages.len()
            ));
        }
        for (i, stage) in self.stages.iter().enumerate() {
            match stage {
                Stage::Count { count: 0 } => {
                    return bad(format!("stage {}: a count must be at least 1", i + 2));
                }
                Stage::Label { key, .. } if key.trim().is_empty() => {
                    return bad(format!("stage {}: a label match needs a key", i + 2));
                }
                Stage::Rest if i + 1 != self.stages.len() => {
                    return bad(format!(
                        "stage {}: `rest` takes every tenant left, so it can only be last",
                        i + 2
                    ));
                }
                _ => {}
            }
        }
        if let Some(v) = &self.undo_to {
            let canonical = v
                .parse::<crate::bundle::Version>()
                .map(|p| p.to_string())
                .ok();
            if canonical.as_deref() != Some(v.as_str()) {
                return bad(format!(
                    "undo_to {v:?} is not a version in canonical form (integers separated by ., e.g. 3 or 2.1)"
                ));
            }
            if self.baseline_version.is_some() || self.adopt.is_some() || self.rehearse_undo {
                return bad(
                    "undo_to undoes: it goes with neither baseline_version, adopt nor rehearse_undo"
                        .into(),
                );
            }
        }
        if self.rehearse_undo && self.canary == Canary::None {
            return bad("rehearse_undo needs a canary: the canaries rehearse the undo".into());
        }
        if self.retries > MAX_RETRIES {
            return bad(format!(
                "retries must be within 0..{MAX_RETRIES} (got {})",
                self.retries
            ));
        }
        if !(1..=MAX_BACKOFF_MS).contains(&self.backoff_max_ms)
            || !(1..=self.backoff_max_ms).contains(&self.backoff_base_ms)
        {
            return bad(format!(
                "backoff must satisfy 1 <= backoff_base_ms <= backoff_max_ms <= {MAX_BACKOFF_MS} (got {} and {})",
                self.backoff_base_ms, self.backoff_max_ms
            ));
        }
        check_timeout_ms("lock_timeout", self.lock_timeout_ms, ZeroTimeout::Refused)?;
        if let Some(max) = self.lock_timeout_max_ms {
            check_timeout_ms("lock_timeout_max", max, ZeroTimeout::Refused)?;
            if max < self.lock_timeout_ms {
                return bad(format!(
                    "lock_timeout_max ({max} ms) is below lock_timeout ({} ms): retries \
                     escalate from lock_timeout up to it",
                    self.lock_timeout_ms
                ));
            }
        }
        check_timeout_ms("max_block", self.max_block_ms, ZeroTimeout::Refused)?;
        check_timeout_ms(
            "max_replication_lag",
            self.max_replication_lag_ms,
            ZeroTimeout::MeansNone,
        )?;
        check_timeout_ms("max_hold", self.max_hold_ms, ZeroTimeout::Refused)?;
        if !(self.max_connections_share > 0.0 && self.max_connections_share <= 1.0) {
            return bad(format!(
                "max_connections_share must be within (0, 1] (got {})",
                self.max_connections_share
            ));
        }
        if let Some(sql) = &self.gate_sql
            && (sql.trim().is_empty() || sql.len() > MAX_GATE_SQL_BYTES)
        {
            return bad(format!(
                "gate_sql must be one statement of at most {MAX_GATE_SQL_BYTES} bytes"
            ));
        }
        check_timeout_ms(
            "statement_timeout",
            self.statement_timeout_ms,
            ZeroTimeout::MeansNone,
        )?;
        check_timeout_ms(
            "connect_timeout",
            self.connect_timeout_ms,
            ZeroTimeout::Refused,
        )?;
        check_timeout_ms(
            "idle_in_transaction_timeout",
            self.idle_in_transaction_timeout_ms,
            ZeroTimeout::Refused,
        )?;
        check_timeout_ms("busy_timeout", self.busy_timeout_ms, ZeroTimeout::Refused)?;
        if let Some(v) = &self.baseline_version {
            self.baseline()
                .filter(|parsed| parsed.to_string() == *v)
                .ok_or_else(|| {
                    PolicyError(format!(
                        "baseline_version {v:?} is not a version (integers separated by . or _, e.g. 60 or 2.3)"
                    ))
                })?;
        }
        if let Some(rule) = self
            .allow
            .iter()
            .find(|r| !crate::bundle::safety::is_allow_entry(r))
        {
            return bad(format!(
                "allow {rule:?}: not RULE or RULE@SCRIPT with a safety rule (`flotilla bundle \
                 rules` lists them)"
            ));
        }
        if let Some(a) = &self.adopt {
            let source: crate::apply::adopt::Source = a
                .parse()
                .map_err(|e: crate::apply::adopt::SourceError| PolicyError(e.to_string()))?;
            if source.to_string() != *a {
                return bad(format!(
                    "adopt {a:?} is not in its canonical form \"{source}\""
                ));
            }
            if self.baseline_version.is_some() {
                return bad(
                    "adopt and baseline_version exclude each other: an empty log is either \
                     adopted from a tool's history or baselined up to a version"
                        .to_string(),
                );
            }
        }
        Ok(())
    }

    /// The baseline version, parsed.
    pub fn baseline(&self) -> Option<crate::bundle::Version> {
        self.baseline_version.as_deref()?.parse().ok()
    }

    /// What an empty log records first: `adopt` or `baseline_version` (validated).
    /// What a tenant run does about undo scripts: the whole wave undoes (`undo_to`),
    /// or canaries rehearse (`rehearse_undo`).
    pub fn undo_for(&self, canary: bool) -> crate::apply::Undo {
        if let Some(v) = self.undo_to.as_deref().and_then(|v| v.parse().ok()) {
            return crate::apply::Undo::To(v);
        }
        if self.rehearse_undo && canary {
            return crate::apply::Undo::Rehearse;
        }
        crate::apply::Undo::None
    }

    pub fn prior(&self) -> Option<crate::apply::Prior> {
        if let Some(source) = self.adopt.as_deref().and_then(|a| a.parse().ok()) {
            return Some(crate::apply::Prior::Adopt(source));
        }
        self.baseline().map(crate::apply::Prior::BaselineVersion)
    }

    /// A policy stored by an earlier build, brought within today's ranges where its
    /// meaning survives: `lock_timeout` 0 ("wait for ever", which the CLI once offered)
    /// becomes the longest PostgreSQL accepts, and a rate, concurrency or retry count
    /// beyond today's bounds is clamped to them. A running wave keeps running after an
    /// upgrade; what cannot be mended (a NaN rate) is left for validation to refuse.
    pub fn upgraded(mut self) -> Self {
        if self.lock_timeout_ms == 0 {
            self.lock_timeout_ms = MAX_TIMEOUT_MS;
        }
        self.lock_timeout_ms = self.lock_timeout_ms.min(MAX_TIMEOUT_MS);
        self.statement_timeout_ms = self.statement_timeout_ms.min(MAX_TIMEOUT_MS);
        self.rate = self.rate.map(|r| {
            if r > 0.0 {
                r.clamp(MIN_RATE, MAX_RATE)
            } else {
                r
            }
        });
        self.concurrency = self.concurrency.min(MAX_CONCURRENCY);
        self.per_host = self.per_host.map(|n| n.min(MAX_CONCURRENCY));
        self.retries = self.retries.min(MAX_RETRIES);
        self
    }

    /// Time between two tenant starts under `rate`, for the rate limiter. `None` when
    /// the policy sets no rate, or one that [`Policy::validate`] refuses (never a panic).
    pub fn start_interval(&self) -> Option<Duration> {
        let rate = self.rate?;
        Duration::try_from_secs_f64(1.0 / rate)
            .ok()
            .filter(|d| !d.is_zero())
    }

    /// The session settings a tenant run uses.
    /// The `lock_timeout` of a tenant's attempt after `retries` retries: doubled per
    /// retry from `lock_timeout_ms`, at most the ceiling. Short first, as GitLab's and
    /// postgres.ai's practice has it: a short wait that fails and comes back costs the
    /// application less than a long one it queues behind.
    pub fn lock_timeout_for(&self, retries: u32) -> Duration {
        let ceiling = self
            .lock_timeout_max_ms
            .unwrap_or(self.lock_timeout_ms.max(DEFAULT_LOCK_TIMEOUT_CEILING_MS));
        let escalated = self
            .lock_timeout_ms
            .saturating_mul(1u64 << retries.min(20))
            .min(ceiling.max(self.lock_timeout_ms));
        Duration::from_millis(escalated)
    }

    /// Whether any health gate is on (each reading costs a short session per host).
    pub fn gates_on(&self) -> bool {
        self.max_replication_lag_ms > 0
            || self.max_connections_share < 1.0
            || self.gate_sql.is_some()
    }

    /// A tenant session's settings on its attempt after `retries` retries.
    pub fn session_settings_for(&self, retries: u32) -> SessionSettings {
        SessionSettings {
            lock_timeout: self.lock_timeout_for(retries),
            ..self.session_settings()
        }
    }

    pub fn session_settings(&self) -> SessionSettings {
        SessionSettings {
            lock_timeout: Duration::from_millis(self.lock_timeout_ms),
            statement_timeout: Duration::from_millis(self.statement_timeout_ms),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            idle_in_transaction_timeout: Duration::from_millis(self.idle_in_transaction_timeout_ms),
            ..SessionSettings::default()
        }
    }

    /// The planner's rules.
    pub fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            drift: self.drift,
            order: self.order,
        }
    }

    /// Delay before retry number `attempt` (1 = first retry): exponential, with jitter
    /// from `rng` (half the delay to all of it), so a wave's decisions can be replayed.
    pub fn backoff(&self, attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        let exp = self
            .backoff_base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(20));
        let cap = exp.min(self.backoff_max_ms).max(1);
        Duration::from_millis(rng.u64(cap / 2..=cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p_rate(rate: f64) -> Result<(), PolicyError> {
        Policy {
            rate: Some(rate),
            ..Policy::default()
        }
        .validate()
    }

    #[test]
    fn stages_parse_and_validate() {
        assert_eq!(Stage::parse("rest"), Ok(Stage::Rest));
        assert_eq!(Stage::parse("20"), Ok(Stage::Count { count: 20 }));
        assert_eq!(Stage::parse("count=7"), Ok(Stage::Count { count: 7 }));
        assert_eq!(
            Stage::parse("region=eu"),
            Ok(Stage::Label {
                key: "region".into(),
                value: "eu".into()
            })
        );
        for bad in ["0", "99999999999", "=eu", "", "eu"] {
            assert!(Stage::parse(bad).is_err(), "{bad:?}");
        }
        for stage in ["20", "region=eu", "rest"] {
            let parsed = Stage::parse(stage).expect("parses");
            assert_eq!(parsed.to_string(), stage, "round trip");
        }
        let with = |canary: Canary, stages: Vec<Stage>, approve: bool| Policy {
            canary,
            stages,
            approve_between_stages: approve,
            ..Policy::default()
        };
        let one = Canary::Count { count: 1 };
        assert!(
            with(
                one.clone(),
                vec![Stage::Count { count: 2 }, Stage::Rest],
                true
            )
            .validate()
            .is_ok()
        );
        let refused = [
            with(Canary::None, vec![Stage::Rest], false),
            with(Canary::None, Vec::new(), true),
            with(
                one.clone(),
                vec![Stage::Rest, Stage::Count { count: 2 }],
                false,
            ),
            with(one.clone(), vec![Stage::Count { count: 0 }], false),
            with(one, vec![Stage::Count { count: 1 }; MAX_STAGES + 1], false),
        ];
        for p in refused {
            assert!(p.validate().is_err(), "{:?}", p.stages);
        }
    }

    #[test]
    fn every_valid_rate_has_an_interval() {
        for rate in [MIN_RATE, 0.5, 1.0, 333.3, MAX_RATE] {
            assert!(p_rate(rate).is_ok(), "{rate}");
            let p = Policy {
                rate: Some(rate),
                ..Policy::default()
            };
            assert!(p.start_interval().is_some(), "{rate}");
        }
        let absurd = Policy {
            rate: Some(1e-300),
            ..Policy::default()
        };
        assert_eq!(absurd.start_interval(), None, "no panic on a refused rate");
    }

    #[test]
    fn stored_policies_of_earlier_builds_still_load() {
        let old = Policy {
            lock_timeout_ms: 0,
            rate: Some(1e-9),
            concurrency: 50_000,
            retries: 1_000,
            ..Policy::default()
        };
        assert!(old.validate().is_err(), "today's rules refuse it as given");
        let up = old.upgraded();
        assert_eq!(up.validate(), Ok(()));
        assert_eq!(up.lock_timeout_ms, MAX_TIMEOUT_MS, "0 meant wait for ever");
        let broken = Policy {
            rate: Some(f64::NAN),
            ..Policy::default()
        };
        assert!(broken.upgraded().validate().is_err(), "a NaN stays refused");
    }

    #[test]
    fn timeouts_are_whole_milliseconds_in_range() {
        let ms = |d: Duration, z| timeout_ms("lock-timeout", d, z);
        assert_eq!(ms(Duration::from_secs(2), ZeroTimeout::Refused), Ok(2_000));
        assert!(ms(Duration::from_micros(500), ZeroTimeout::Refused).is_err());
        assert!(ms(Duration::from_micros(1_500), ZeroTimeout::MeansNone).is_err());
        assert!(ms(Duration::ZERO, ZeroTimeout::Refused).is_err());
        assert_eq!(ms(Duration::ZERO, ZeroTimeout::MeansNone), Ok(0));
        let err = ms(Duration::from_secs(30 * 24 * 3600), ZeroTimeout::MeansNone).unwrap_err();
        assert!(err.0.contains("2147483647"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let p = |f: fn(&mut Policy)| {
            let mut p = Policy::default();
            f(&mut p);
            p.validate()
        };
        assert!(p(|_| {}).is_ok());
        assert!(
            p(|p| p.concurrency = 0)
                .unwrap_err()
                .0
                .contains("concurrency")
        );
        assert!(
            p(|p| p.max_failures = FailureBudget::Ratio(1.5))
                .unwrap_err()
                .0
                .contains("ratio")
        );
        assert!(p(|p| p.rate = Some(0.0)).unwrap_err().0.contains("rate"));
        for rate in [1e-20, f64::NAN, f64::INFINITY, -1.0, 1e9] {
            let err = p_rate(rate).unwrap_err().0;
            assert!(
                err.contains("rate") && err.contains("0.001"),
                "{rate}: {err}"
            );
        }
        assert!(
            p(|p| p.lock_timeout_ms = 0)
                .unwrap_err()
                .0
                .contains("lock_timeout")
        );
        assert!(
            p(|p| p.statement_timeout_ms = MAX_TIMEOUT_MS + 1)
                .unwrap_err()
                .0
                .contains("statement_timeout")
        );
        assert!(p(|p| p.statement_timeout_ms = 0).is_ok(), "0 = no limit");
        assert!(
            p(|p| p.retries = MAX_RETRIES + 1)
                .unwrap_err()
                .0
                .contains("retries")
        );
        assert!(
            p(|p| p.concurrency = MAX_CONCURRENCY + 1)
                .unwrap_err()
                .0
                .contains("concurrency")
        );
        assert!(
            p(|p| p.per_host = Some(0))
                .unwrap_err()
                .0
                .contains("per_host")
        );
        assert!(
            p(|p| p.canary = Canary::Count { count: 0 })
                .unwrap_err()
                .0
                .contains("canary")
        );
    }

    #[test]
    fn budgets() {
        assert!(!FailureBudget::Count(2).exceeded(2, 10));
        assert!(FailureBudget::Count(2).exceeded(3, 10));
        assert!(FailureBudget::Count(0).exceeded(1, 10));
        assert!(!FailureBudget::Ratio(0.1).exceeded(1, 10));
        assert!(FailureBudget::Ratio(0.1).exceeded(2, 10));
        assert!(!FailureBudget::Unlimited.exceeded(100, 100));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = Policy {
            backoff_base_ms: 100,
            backoff_max_ms: 1_000,
            ..Policy::default()
        };
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..50 {
            let first = p.backoff(1, &mut rng).as_millis();
            assert!((50..=100).contains(&first), "{first}");
            let third = p.backoff(3, &mut rng).as_millis();
            assert!((200..=400).contains(&third), "{third}");
            assert!(p.backoff(30, &mut rng).as_millis() <= 1_000);
        }
    }

    #[test]
    fn persisted_form_rejects_unknown_variants() {
        let json = serde_json::to_string(&Policy::default()).expect("json");
        let back: Policy = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, Policy::default());
        let broken = json.replace("per-script", "per-galaxy");
        assert!(serde_json::from_str::<Policy>(&broken).is_err());
    }

    #[test]
    fn lock_timeouts_escalate_per_retry_up_to_the_ceiling() {
        let p = Policy::default();
        let ms = |r| p.lock_timeout_for(r).as_millis();
        assert_eq!(
            [ms(0), ms(1), ms(2), ms(3), ms(4), ms(40)],
            [500, 1000, 2000, 4000, 5000, 5000]
        );
        let fixed = Policy {
            lock_timeout_ms: 10_000,
            ..Policy::default()
        };
        assert_eq!(
            fixed.lock_timeout_for(3).as_millis(),
            10_000,
            "a long start stays"
        );
        let capped = Policy {
            lock_timeout_max_ms: Some(800),
            ..Policy::default()
        };
        assert_eq!(capped.lock_timeout_for(5).as_millis(), 800);
        let below = Policy {
            lock_timeout_max_ms: Some(100),
            ..Policy::default()
        };
        assert!(below.validate().unwrap_err().0.contains("lock_timeout_max"));
    }
}
