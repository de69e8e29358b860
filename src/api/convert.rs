//! Conversions between `flotilla.v1` messages and domain types, explicit and in one place.
//! Incoming messages are validated here (a zero concurrency, a ratio above 1, an unknown
//! enum value) with the field named; outgoing ones never carry a secret. Nothing here
//! does I/O.

use std::collections::BTreeMap;

use prost_types::Timestamp;

use super::ApiError;
use super::v1;
use crate::apply::log::LogEntry;
use crate::apply::{DriftPolicy, OrderPolicy, PlanOptions, StepAction, TransactionMode};
use crate::bundle::{Bundle, BundleFile};
use crate::config::Limits;
use crate::policy::{AfterCanary, Canary, FailureBudget, Policy};
use crate::reach::Reach;
use crate::store::StateChange;
use crate::target::TargetSource;
use crate::wave::{Counts, TenantView, WaveEvent, WaveStatus};
use crate::wave::{TenantState, WaveState};

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(ms: u64) -> Timestamp {
    Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Protobuf wave state of a domain one.
pub fn wave_state(s: WaveState) -> v1::WaveState {
    match s {
        WaveState::Pending => v1::WaveState::Pending,
        WaveState::Running => v1::WaveState::Running,
        WaveState::Paused => v1::WaveState::Paused,
        WaveState::Completed => v1::WaveState::Completed,
        WaveState::Failed => v1::WaveState::Failed,
        WaveState::Cancelled => v1::WaveState::Cancelled,
    }
}

/// The domain wave state of a protobuf one (`None` for UNSPECIFIED or unknown).
pub fn wave_state_from_proto(raw: i32) -> Option<WaveState> {
    match v1::WaveState::try_from(raw).ok()? {
        v1::WaveState::Unspecified => None,
        v1::WaveState::Pending => Some(WaveState::Pending),
        v1::WaveState::Running => Some(WaveState::Running),
        v1::WaveState::Paused => Some(WaveState::Paused),
        v1::WaveState::Completed => Some(WaveState::Completed),
        v1::WaveState::Failed => Some(WaveState::Failed),
        v1::WaveState::Cancelled => Some(WaveState::Cancelled),
    }
}

/// True when a wave event says the wave is settled ([`WaveState::is_settled`]).
pub fn event_settled(event: &v1::WaveEvent) -> bool {
    let running = event.tenants.as_ref().map(|c| c.running).unwrap_or(0);
    wave_state_from_proto(event.state).is_some_and(|s| s.is_settled(running))
}

/// Protobuf tenant state of a domain one.
pub fn tenant_state(s: TenantState) -> v1::TenantState {
    match s {
        TenantState::Pending => v1::TenantState::Pending,
        TenantState::Running => v1::TenantState::Running,
        TenantState::Succeeded => v1::TenantState::Succeeded,
        TenantState::Failed => v1::TenantState::Failed,
        TenantState::Cancelled => v1::TenantState::Cancelled,
    }
}

/// A tenant state filter: `None` for UNSPECIFIED (every state).
pub fn tenant_state_filter(raw: i32) -> Result<Option<TenantState>, ApiError> {
    match v1::TenantState::try_from(raw) {
        Ok(v1::TenantState::Unspecified) => Ok(None),
        Ok(v1::TenantState::Pending) => Ok(Some(TenantState::Pending)),
        Ok(v1::TenantState::Running) => Ok(Some(TenantState::Running)),
        Ok(v1::TenantState::Succeeded) => Ok(Some(TenantState::Succeeded)),
        Ok(v1::TenantState::Failed) => Ok(Some(TenantState::Failed)),
        Ok(v1::TenantState::Cancelled) => Ok(Some(TenantState::Cancelled)),
        Err(_) => Err(ApiError::Invalid(format!(
            "state: unknown tenant state {raw}"
        ))),
    }
}

/// Per-state counts.
pub fn counts(c: &Counts) -> v1::TenantCounts {
    v1::TenantCounts {
        total: c.total,
        pending: c.pending,
        running: c.running,
        succeeded: c.succeeded,
        failed: c.failed,
        cancelled: c.cancelled,
        baselined_tenants: c.baselined_tenants,
        baselined_scripts: c.baselined_scripts,
    }
}

fn state_change(c: &StateChange) -> v1::StateChange {
    v1::StateChange {
        from: c.from.map(wave_state).unwrap_or(v1::WaveState::Unspecified) as i32,
        to: wave_state(c.to) as i32,
        actor: c.actor.clone(),
        reason: c.reason.clone(),
        at: Some(timestamp(c.at_ms)),
    }
}

/// A wave as the API shows it.
pub fn wave(w: &WaveStatus) -> v1::Wave {
    v1::Wave {
        wave_id: w.id.clone(),
        bundle_id: w.bundle_id.clone(),
        state: wave_state(w.state) as i32,
        tenants: Some(counts(&w.counts)),
        policy: Some(policy_to_proto(&w.policy)),
        created_at: Some(timestamp(w.created_at_ms)),
        reason: w.reason.clone().unwrap_or_default(),
        history: w.history.iter().map(state_change).collect(),
        placeholders: w.placeholders.clone().into_iter().collect(),
        waivers: w.waivers.clone(),
        held: w.held.clone(),
        fleet: w.fleet.clone().unwrap_or_default(),
        stages: w
            .stages
            .iter()
            .map(|s| v1::Stage {
                name: s.name.clone(),
                tenants: Some(counts(&s.counts)),
                open: s.open,
                approval: s.approval.as_ref().map(|a| v1::Approval {
                    by: a.by.clone(),
                    at: Some(timestamp(a.at_ms)),
                    succeeded: a.succeeded,
                    failed: a.failed,
                    cancelled: a.cancelled,
                    accepted_failures: a.accepted_failures,
                }),
            })
            .collect(),
    }
}

/// A safety finding on the wire, waived or not under the wave's `allow`.
pub fn safety_finding(f: &crate::bundle::safety::Finding, allow: &[String]) -> v1::SafetyFinding {
    let by_flag = crate::bundle::safety::waived_by_wave(allow, f);
    v1::SafetyFinding {
        rule: f.rule.to_string(),
        script: f.script.clone(),
        line: f.line.unwrap_or(0),
        table: f.table.clone().unwrap_or_default(),
        why: f.why.to_string(),
        fix: f.fix.to_string(),
        waived: f.waived_by_script.is_some() || by_flag.is_some(),
        waiver: match (&f.waived_by_script, by_flag) {
            (Some(reason), _) => reason.clone(),
            (None, Some(entry)) => format!("--allow {entry}"),
            (None, None) => String::new(),
        },
    }
}

/// A wave as `role` may see it: placeholder values (often passwords, as in Flyway
/// folders) only for operators, who could start the wave themselves; a viewer sees
/// each name with a short hash of its value, enough to tell two waves apart.
pub fn wave_for(w: &WaveStatus, role: crate::config::Role) -> v1::Wave {
    let mut out = wave(w);
    if role != crate::config::Role::Operator {
        if let Some(p) = out.policy.as_mut()
            && !p.gate_sql.is_empty()
        {
            p.gate_sql = "(set; operators see it)".to_string();
        }
        for value in out.placeholders.values_mut() {
            let digest = crate::bundle::checksum(value.as_bytes());
            *value = format!("sha256:{}", &digest[..12]);
        }
    }
    out
}

/// A tenant run as the API shows it: no connection string.
pub fn tenant(t: &TenantView) -> v1::TenantRun {
    v1::TenantRun {
        tenant_id: t.tenant_id.clone(),
        host: t.host.clone(),
        state: tenant_state(t.state) as i32,
        attempts: t.attempts,
        last_error: t.last_error.as_ref().map(|e| v1::TenantFailure {
            script: e.script.clone().unwrap_or_default(),
            sqlstate: e.sqlstate.clone().unwrap_or_default(),
            message: e.message.clone(),
            retryable: e.retryability == crate::failure::Retryability::Retryable,
        }),
        started_at: t.started_at_ms.map(timestamp),
        finished_at: t.finished_at_ms.map(timestamp),
        labels: t.labels.clone().into_iter().collect(),
        rows_changed: t.rows_changed,
    }
}

/// A progress event.
pub fn event(e: &WaveEvent, at_ms: u64) -> v1::WaveEvent {
    v1::WaveEvent {
        wave_id: e.wave_id.clone(),
        state: wave_state(e.state) as i32,
        tenants: Some(counts(&e.counts)),
        tenant: e.tenant.as_ref().map(tenant),
        at: Some(timestamp(at_ms)),
    }
}

/// The snapshot event a watch starts with (and resyncs with after lagging).
pub fn snapshot_event(w: &WaveStatus, at_ms: u64) -> v1::WaveEvent {
    v1::WaveEvent {
        wave_id: w.id.clone(),
        state: wave_state(w.state) as i32,
        tenants: Some(counts(&w.counts)),
        tenant: None,
        at: Some(timestamp(at_ms)),
    }
}

/// One execution-log row.
pub fn log_row(e: &LogEntry) -> v1::LogRow {
    v1::LogRow {
        id: e.id,
        version: e.version.clone().unwrap_or_default(),
        script: e.script.clone(),
        kind: e.kind.clone(),
        checksum: e.checksum.clone(),
        bundle_id: e.bundle_id.clone(),
        wave_id: e.wave_id.clone(),
        status: e.status.clone(),
        applied_at: e.applied_at_ms.map(|ms| timestamp(ms.max(0) as u64)),
        applied_by: e.applied_by.clone(),
        xact_id: e.xact_id.clone().unwrap_or_default(),
        duration_ms: e.duration_ms.unwrap_or_default(),
    }
}

/// The protobuf form of a policy; `policy_from_proto(policy_to_proto(p)) == p` for every
/// policy the API can express.
pub fn policy_to_proto(p: &Policy) -> v1::Policy {
    use v1::policy::MaxFailures;
    let (canary_count, canary_label) = match &p.canary {
        Canary::None => (0, String::new()),
        Canary::Count { count } => (*count, String::new()),
        Canary::Label { key, value } => (0, format!("{key}={value}")),
    };
    v1::Policy {
        concurrency: p.concurrency,
        per_host: p.per_host.unwrap_or(0),
        rate: p.rate.unwrap_or(0.0),
        canary_count,
        canary_label,
        pause_after_canary: p.after_canary == AfterCanary::Pause,
        stages: p.stages.iter().map(ToString::to_string).collect(),
        approve_between_stages: p.approve_between_stages,
        undo_to: p.undo_to.clone().unwrap_or_default(),
        rehearse_undo: p.rehearse_undo,
        max_failures: Some(match p.max_failures {
            FailureBudget::Count(n) => MaxFailures::MaxFailuresCount(n),
            FailureBudget::Ratio(r) => MaxFailures::MaxFailuresRatio(r),
            FailureBudget::Unlimited => MaxFailures::MaxFailuresUnlimited(true),
        }),
        retries: Some(p.retries),
        transaction: match p.transaction {
            TransactionMode::PerScript => v1::TransactionMode::PerScript,
            TransactionMode::PerTenant => v1::TransactionMode::PerTenant,
        } as i32,
        lock_timeout_ms: Some(p.lock_timeout_ms),
        statement_timeout_ms: Some(p.statement_timeout_ms),
        allow_drift: p.drift == DriftPolicy::Allow,
        allow_out_of_order: p.order == OrderPolicy::AllowOutOfOrder,
        idle_in_transaction_timeout_ms: Some(p.idle_in_transaction_timeout_ms),
        busy_timeout_ms: Some(p.busy_timeout_ms),
        baseline_version: p.baseline_version.clone().unwrap_or_default(),
        adopt: p.adopt.clone().unwrap_or_default(),
        allow: p.allow.clone(),
        lock_timeout_max_ms: p.lock_timeout_max_ms,
        max_block_ms: Some(p.max_block_ms),
        max_replication_lag_ms: Some(p.max_replication_lag_ms),
        max_connections_share: Some(p.max_connections_share),
        gate_sql: p.gate_sql.clone().unwrap_or_default(),
        max_hold_ms: Some(p.max_hold_ms),
        start_order: match p.start_order {
            crate::policy::StartOrder::Id => v1::StartOrder::Id,
            crate::policy::StartOrder::Size => v1::StartOrder::Size,
        } as i32,
    }
}

/// The wire form of how a planned step runs.
pub fn plan_action(action: &StepAction) -> v1::PlanAction {
    match action {
        StepAction::Apply => v1::PlanAction::Apply,
        StepAction::Reapply => v1::PlanAction::Reapply,
        StepAction::Resume { .. } => v1::PlanAction::Resume,
        StepAction::Supersede { .. } => v1::PlanAction::Supersede,
    }
}

/// The lower-case name of a plan action (`apply`, `reapply`, `resume`, `supersede`).
pub fn plan_action_name(action: v1::PlanAction) -> &'static str {
    match action {
        v1::PlanAction::Unspecified => "unspecified",
        v1::PlanAction::Apply => "apply",
        v1::PlanAction::Reapply => "reapply",
        v1::PlanAction::Resume => "resume",
        v1::PlanAction::Supersede => "supersede",
        v1::PlanAction::Baseline => "baseline",
        v1::PlanAction::Undo => "undo",
    }
}

/// The typed reason a plan would refuse a tenant, from the error that says so.
pub fn plan_problem(error: &crate::apply::ApplyError) -> v1::PlanProblem {
    use crate::apply::ApplyError;
    let kind = match error {
        ApplyError::Connect(_) | ApplyError::Log(_) | ApplyError::History { .. } => {
            v1::PlanProblemKind::Unreadable
        }
        ApplyError::Decode(_) | ApplyError::Script { .. } | ApplyError::TenantPlaceholder(_) => {
            v1::PlanProblemKind::Unexpected
        }
        ApplyError::Adopt(_) => v1::PlanProblemKind::AdoptionRefused,
        ApplyError::Undo(_) => v1::PlanProblemKind::UndoRefused,
        ApplyError::Rehearsal { .. } => v1::PlanProblemKind::Unexpected,
        ApplyError::Plan(p) => match p {
            crate::apply::PlanError::Drift { .. } => v1::PlanProblemKind::Drift,
            crate::apply::PlanError::OutOfOrder { .. } => v1::PlanProblemKind::OutOfOrder,
            crate::apply::PlanError::InterruptedScriptChanged { .. } => {
                v1::PlanProblemKind::InterruptedScriptChanged
            }
        },
    };
    v1::PlanProblem {
        kind: kind as i32,
        message: error.to_string(),
    }
}

/// `adopt` for a wave of `bundle`: a bare `flyway` takes the history table the bundle's
/// Flyway config names (`defaultSchema`/`schemas` and `table`), as Flyway would.
pub fn adopt_for_bundle(raw: &str, bundle: &Bundle) -> Option<String> {
    if raw.trim() == "flyway"
        && let Some((schema, table)) = bundle.flyway_history_table()
    {
        return adopt_source(&format!("flyway={}.{table}", schema.unwrap_or("public")));
    }
    adopt_source(raw)
}

/// A wire `adopt` value in canonical form; empty is none; text that does not parse is
/// kept for validation to refuse by name.
pub fn adopt_source(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.parse::<crate::apply::adopt::Source>()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| raw.to_string()),
    )
}

/// A wire baseline version in the canonical form the log stores (`1.1` for `1_1`);
/// empty is none; text that is no version is kept for validation to refuse by name.
pub fn baseline_version(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.parse::<crate::bundle::Version>()
            .map(|v| v.to_string())
            .unwrap_or_else(|_| raw.to_string()),
    )
}

/// The planner's rules from the two wire flags `Policy` and `PlanRequest` both carry.
pub fn plan_options(allow_drift: bool, allow_out_of_order: bool) -> PlanOptions {
    PlanOptions {
        drift: if allow_drift {
            DriftPolicy::Allow
        } else {
            DriftPolicy::Fail
        },
        order: if allow_out_of_order {
            OrderPolicy::AllowOutOfOrder
        } else {
            OrderPolicy::Strict
        },
    }
}

/// A validated domain policy from a request's; `None` is refused (concurrency has no
/// default on the wire: a client must say how wide to go). Ranges are checked by
/// [`Policy::validate`] alone; this only converts the wire's shapes.
pub fn policy_from_proto(p: Option<v1::Policy>) -> Result<Policy, ApiError> {
    use v1::policy::MaxFailures;
    let invalid = |m: String| Err(ApiError::Invalid(format!("policy.{m}")));
    let Some(p) = p else {
        return invalid("concurrency: missing policy; concurrency must be at least 1".into());
    };
    let defaults = Policy::default();
    let canary = match (p.canary_count, p.canary_label.trim()) {
        (0, "") => Canary::None,
        (count, "") => Canary::Count { count },
        (0, label) => match label.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => Canary::Label {
                key: key.trim().to_string(),
                value: value.trim().to_string(),
            },
            _ => return invalid(format!("canary_label must be key=value (got {label:?})")),
        },
        _ => return invalid("canary_count and canary_label: give one, not both".into()),
    };
    let after_canary = if p.pause_after_canary {
        if canary == Canary::None {
            return invalid("pause_after_canary needs a canary (count or label)".into());
        }
        AfterCanary::Pause
    } else {
        AfterCanary::Continue
    };
    let stages = p
        .stages
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            crate::policy::Stage::parse(spec)
                .map_err(|e| ApiError::Invalid(format!("policy.stages[{i}]: {}", e.0)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let max_failures = match p.max_failures {
        None => defaults.max_failures,
        Some(MaxFailures::MaxFailuresCount(n)) => FailureBudget::Count(n),
        Some(MaxFailures::MaxFailuresRatio(r)) => FailureBudget::Ratio(r),
        Some(MaxFailures::MaxFailuresUnlimited(true)) => FailureBudget::Unlimited,
        Some(MaxFailures::MaxFailuresUnlimited(false)) => {
            return invalid("max_failures_unlimited, when set, must be true".into());
        }
    };
    let retries = p.retries.unwrap_or(defaults.retries);
    let transaction = match v1::TransactionMode::try_from(p.transaction) {
        Ok(v1::TransactionMode::Unspecified | v1::TransactionMode::PerScript) => {
            TransactionMode::PerScript
        }
        Ok(v1::TransactionMode::PerTenant) => TransactionMode::PerTenant,
        Err(_) => return invalid(format!("transaction: unknown mode {}", p.transaction)),
    };
    let rules = plan_options(p.allow_drift, p.allow_out_of_order);
    let policy = Policy {
        concurrency: p.concurrency,
        per_host: (p.per_host > 0).then_some(p.per_host),
        // 0 on the wire is "unlimited"; anything else, negative or NaN included, is
        // the policy's to judge.
        rate: (p.rate != 0.0).then_some(p.rate),
        canary,
        after_canary,
        stages,
        approve_between_stages: p.approve_between_stages,
        // Canonical text, as the log stores versions; the policy's validation names a
        // malformed one.
        undo_to: match p.undo_to.trim() {
            "" => None,
            v => Some(
                v.parse::<crate::bundle::Version>()
                    .map(|v| v.to_string())
                    .unwrap_or_else(|_| v.to_string()),
            ),
        },
        rehearse_undo: p.rehearse_undo,
        max_failures,
        retries,
        transaction,
        lock_timeout_ms: p.lock_timeout_ms.unwrap_or(defaults.lock_timeout_ms),
        statement_timeout_ms: p.statement_timeout_ms.unwrap_or(0),
        idle_in_transaction_timeout_ms: p
            .idle_in_transaction_timeout_ms
            .unwrap_or(defaults.idle_in_transaction_timeout_ms),
        busy_timeout_ms: p.busy_timeout_ms.unwrap_or(defaults.busy_timeout_ms),
        baseline_version: baseline_version(&p.baseline_version),
        adopt: adopt_source(&p.adopt),
        allow: p.allow.clone(),
        lock_timeout_max_ms: p.lock_timeout_max_ms,
        max_block_ms: p.max_block_ms.unwrap_or(defaults.max_block_ms),
        max_replication_lag_ms: p
            .max_replication_lag_ms
            .unwrap_or(defaults.max_replication_lag_ms),
        max_connections_share: p
            .max_connections_share
            .unwrap_or(defaults.max_connections_share),
        gate_sql: (!p.gate_sql.trim().is_empty()).then(|| p.gate_sql.clone()),
        max_hold_ms: p.max_hold_ms.unwrap_or(defaults.max_hold_ms),
        start_order: match v1::StartOrder::try_from(p.start_order) {
            Ok(v1::StartOrder::Size) => crate::policy::StartOrder::Size,
            Ok(v1::StartOrder::Id | v1::StartOrder::Unspecified) => crate::policy::StartOrder::Id,
            Err(_) => {
                return Err(ApiError::Invalid(format!(
                    "policy.start_order: unknown value {}",
                    p.start_order
                )));
            }
        },
        drift: rules.drift,
        order: rules.order,
        ..defaults
    };
    policy
        .validate()
        .map_err(|e| ApiError::Invalid(e.to_string()))?;
    Ok(policy)
}

/// The wire form of a bundle.
pub fn bundle_to_proto(b: &Bundle) -> v1::Bundle {
    v1::Bundle {
        bundle_id: b.id().to_string(),
        files: b
            .files()
            .iter()
            .map(|f| v1::BundleFile {
                name: f.name.clone(),
                content: f.content.clone(),
            })
            .collect(),
        placeholders: b.placeholders().clone().into_iter().collect(),
    }
}

/// A bundle from the wire: within the size limit, valid, and with the id the client
/// computed (a mismatch means the two disagree on the bytes or on the rules).
pub fn bundle_from_proto(b: Option<v1::Bundle>, limits: &Limits) -> Result<Bundle, ApiError> {
    let b = b.ok_or_else(|| ApiError::Invalid("bundle: missing".into()))?;
    let size: usize = b.files.iter().map(|f| f.content.len()).sum();
    if size > limits.max_bundle_bytes {
        return Err(ApiError::Invalid(format!(
            "bundle: {size} bytes of scripts, over the daemon's limit of {} (limits.max_bundle_bytes)",
            limits.max_bundle_bytes
        )));
    }
    let files = b
        .files
        .into_iter()
        .map(|f| BundleFile {
            name: f.name,
            content: f.content,
        })
        .collect();
    let options = crate::bundle::BundleOptions {
        placeholders: b.placeholders.into_iter().collect(),
        ..Default::default()
    };
    let bundle = Bundle::from_files_with(files, &options, "uploaded bundle")?;
    if !b.bundle_id.is_empty() && b.bundle_id != bundle.id() {
        return Err(ApiError::BundleIdMismatch {
            sent: b.bundle_id,
            computed: bundle.id().to_string(),
        });
    }
    Ok(bundle)
}

/// Where a request's tenants come from, whatever request carried them.
pub enum Targets {
    /// Tenants listed in the request, already split into fields.
    List(Vec<v1::Tenant>),
    /// A source the daemon resolves.
    Source(TargetSource),
    /// A registered fleet, by name.
    Fleet(String),
}

/// Tenants resolved for a request, and the fleet they came from.
pub struct Resolved {
    pub tenants: Vec<crate::target::Tenant>,
    /// The registered fleet, if the request named one.
    pub fleet: Option<String>,
    /// Which registration of that fleet was read (`0` without a fleet).
    pub fleet_registration: u64,
}

impl Targets {
    /// From `StartWaveRequest.targets`.
    pub fn from_start(t: Option<v1::start_wave_request::Targets>) -> Result<Self, ApiError> {
        use v1::start_wave_request::Targets as T;
        Ok(match t {
            None => return Err(missing_targets()),
            Some(T::TargetList(l)) => Targets::List(l.tenants),
            Some(T::Catalog(c)) => catalog(c)?,
            Some(T::Discover(d)) => discover(d)?,
            Some(T::Fleet(name)) => Targets::Fleet(name),
        })
    }

    /// From `PlanRequest.targets`.
    pub fn from_plan(t: Option<v1::plan_request::Targets>) -> Result<Self, ApiError> {
        use v1::plan_request::Targets as T;
        Ok(match t {
            None => return Err(missing_targets()),
            Some(T::TargetList(l)) => Targets::List(l.tenants),
            Some(T::Catalog(c)) => catalog(c)?,
            Some(T::Discover(d)) => discover(d)?,
            Some(T::Fleet(name)) => Targets::Fleet(name),
        })
    }

    /// From `AddFleetRequest.source`.
    pub fn from_fleet_source(t: Option<v1::add_fleet_request::Source>) -> Result<Self, ApiError> {
        use v1::add_fleet_request::Source as S;
        Ok(match t {
            None => return Err(missing_targets()),
            Some(S::TargetList(l)) => Targets::List(l.tenants),
            Some(S::Catalog(c)) => catalog(c)?,
            Some(S::Discover(d)) => discover(d)?,
        })
    }

    /// Resolves into tenants, within the tenant limit, every one on a server `reach`
    /// allows (a refused host is named now, not failed tenant by tenant later). A fleet
    /// resolves from what it was registered with, its labels added.
    pub async fn resolve(
        self,
        limits: &Limits,
        reach: &Reach,
        fleets: &crate::fleet::Fleets,
    ) -> Result<Resolved, ApiError> {
        let (tenants, origin) = match self {
            Targets::Fleet(name) => {
                let resolved = fleets.resolve(&name, reach, limits.max_tenants).await?;
                return Ok(Resolved {
                    tenants: resolved.tenants,
                    fleet: Some(name),
                    fleet_registration: resolved.registration,
                });
            }
            Targets::List(list) => {
                check_count(list.len(), limits)?;
                let entries = list
                    .into_iter()
                    .map(|t| {
                        let labels: BTreeMap<String, String> = t.labels.into_iter().collect();
                        (t.tenant_id, t.dsn, labels)
                    })
                    .collect();
                (
                    crate::target::from_entries(entries, "target list")?,
                    "target list",
                )
            }
            Targets::Source(source) => (
                crate::target::resolve(&source, reach, limits.max_tenants).await?,
                "targets",
            ),
        };
        check_count(tenants.len(), limits)?;
        crate::target::check_reach(&tenants, reach, origin)?;
        Ok(Resolved {
            tenants,
            fleet: None,
            fleet_registration: 0,
        })
    }
}

impl Targets {
    /// For `StartWaveRequest` (the CLI's side of the same type).
    pub fn into_start(self) -> Result<v1::start_wave_request::Targets, ApiError> {
        use v1::start_wave_request::Targets as T;
        Ok(match self.into_wire()? {
            Wire::List(l) => T::TargetList(l),
            Wire::Catalog(c) => T::Catalog(c),
            Wire::Discover(d) => T::Discover(d),
            Wire::Fleet(name) => T::Fleet(name),
        })
    }

    /// For `AddFleetRequest` (a fleet cannot be made of another fleet).
    pub fn into_fleet_source(self) -> Result<v1::add_fleet_request::Source, ApiError> {
        use v1::add_fleet_request::Source as S;
        Ok(match self.into_wire()? {
            Wire::List(l) => S::TargetList(l),
            Wire::Catalog(c) => S::Catalog(c),
            Wire::Discover(d) => S::Discover(d),
            Wire::Fleet(_) => {
                return Err(ApiError::Invalid(
                    "a fleet is registered from a target list, a catalog or a discovery spec"
                        .into(),
                ));
            }
        })
    }

    /// For `PlanRequest`.
    pub fn into_plan(self) -> Result<v1::plan_request::Targets, ApiError> {
        use v1::plan_request::Targets as T;
        Ok(match self.into_wire()? {
            Wire::List(l) => T::TargetList(l),
            Wire::Catalog(c) => T::Catalog(c),
            Wire::Discover(d) => T::Discover(d),
            Wire::Fleet(name) => T::Fleet(name),
        })
    }

    /// The shape both requests share; CSV text travels as the rows it holds.
    fn into_wire(self) -> Result<Wire, ApiError> {
        Ok(match self {
            Targets::List(tenants) => Wire::List(v1::TargetList { tenants }),
            Targets::Fleet(name) => Wire::Fleet(name),
            Targets::Source(TargetSource::Csv { text, origin }) => Wire::List(v1::TargetList {
                tenants: tenants_to_proto(crate::target::parse_csv(&text, &origin)?),
            }),
            Targets::Source(TargetSource::Catalog { dsn, query }) => {
                Wire::Catalog(v1::CatalogTargets {
                    catalog_dsn: dsn,
                    catalog_query: query,
                })
            }
            Targets::Source(TargetSource::Discover { dsn, pattern }) => {
                Wire::Discover(v1::DiscoverTargets {
                    server_dsn: dsn,
                    db_pattern: pattern,
                })
            }
        })
    }
}

/// Tenants as a request lists them (the DSN as given: the daemon seals it).
pub fn tenants_to_proto(tenants: Vec<crate::target::Tenant>) -> Vec<v1::Tenant> {
    tenants
        .into_iter()
        .map(|t| v1::Tenant {
            tenant_id: t.id,
            dsn: t.dsn.secret_text().to_string(),
            labels: t.labels.into_iter().collect(),
        })
        .collect()
}

/// The target sources a request can carry.
enum Wire {
    List(v1::TargetList),
    Catalog(v1::CatalogTargets),
    Discover(v1::DiscoverTargets),
    Fleet(String),
}

fn missing_targets() -> ApiError {
    ApiError::Invalid("targets: give a target list, a catalog, a discovery spec or a fleet".into())
}

fn catalog(c: v1::CatalogTargets) -> Result<Targets, ApiError> {
    if c.catalog_dsn.is_empty() || c.catalog_query.is_empty() {
        return Err(ApiError::Invalid(
            "catalog: both catalog_dsn and catalog_query are needed".into(),
        ));
    }
    Ok(Targets::Source(TargetSource::Catalog {
        dsn: c.catalog_dsn,
        query: c.catalog_query,
    }))
}

fn discover(d: v1::DiscoverTargets) -> Result<Targets, ApiError> {
    if d.server_dsn.is_empty() || d.db_pattern.is_empty() {
        return Err(ApiError::Invalid(
            "discover: both server_dsn and db_pattern are needed".into(),
        ));
    }
    Ok(Targets::Source(TargetSource::Discover {
        dsn: d.server_dsn,
        pattern: d.db_pattern,
    }))
}

fn check_count(n: usize, limits: &Limits) -> Result<(), ApiError> {
    if n > limits.max_tenants {
        return Err(ApiError::Invalid(format!(
            "targets: {n} tenants, over the daemon's limit of {} (limits.max_tenants)",
            limits.max_tenants
        )));
    }
    Ok(())
}

/// A fleet as shown to `role`: a catalog query only to operators (it may assemble
/// DSNs, passwords included).
pub fn fleet(f: &crate::fleet::FleetView, role: crate::config::Role) -> v1::Fleet {
    let source = match (&f.query, role) {
        (Some(q), crate::config::Role::Operator) => format!("{}: {q}", f.source),
        (Some(_), _) => format!("{}: (query shown to operators only)", f.source),
        (None, _) => f.source.clone(),
    };
    v1::Fleet {
        name: f.name.clone(),
        kind: f.kind.to_string(),
        source,
        labels: f.labels.clone().into_iter().collect(),
        created_by: f.created_by.clone(),
        created_at: (f.created_at_ms > 0).then(|| timestamp(f.created_at_ms)),
        tenants_when_added: f.tenants_when_added,
        unloadable: f.unloadable.clone().unwrap_or_default(),
    }
}

/// The domain census state of a protobuf one (`None` for one this build does not know).
pub fn census_state_from_proto(raw: i32) -> Option<crate::census::CensusState> {
    use crate::census::CensusState as S;
    Some(match v1::CensusState::try_from(raw).ok()? {
        v1::CensusState::Unspecified => return None,
        v1::CensusState::Unreachable => S::Unreachable,
        v1::CensusState::Interrupted => S::Interrupted,
        v1::CensusState::Drifted => S::Drifted,
        v1::CensusState::SchemaDrift => S::SchemaDrift,
        v1::CensusState::Ahead => S::Ahead,
        v1::CensusState::Unmanaged => S::Unmanaged,
        v1::CensusState::Behind => S::Behind,
        v1::CensusState::Current => S::Current,
    })
}

/// A schema change as the domain prints it.
pub fn schema_change_from_proto(c: &v1::SchemaChange) -> crate::census::SchemaChange {
    use crate::census::ChangeKind;
    crate::census::SchemaChange {
        kind: match v1::SchemaChangeKind::try_from(c.kind) {
            Ok(v1::SchemaChangeKind::Added) => ChangeKind::Added,
            Ok(v1::SchemaChangeKind::Removed) => ChangeKind::Removed,
            _ => ChangeKind::Changed,
        },
        object: c.object.clone(),
        reference: c.reference.clone(),
        found: c.found.clone(),
    }
}

/// Protobuf census state of a domain one.
pub fn census_state(s: crate::census::CensusState) -> v1::CensusState {
    use crate::census::CensusState as S;
    match s {
        S::Unreachable => v1::CensusState::Unreachable,
        S::Interrupted => v1::CensusState::Interrupted,
        S::Drifted => v1::CensusState::Drifted,
        S::SchemaDrift => v1::CensusState::SchemaDrift,
        S::Ahead => v1::CensusState::Ahead,
        S::Unmanaged => v1::CensusState::Unmanaged,
        S::Behind => v1::CensusState::Behind,
        S::Current => v1::CensusState::Current,
    }
}

fn state_counts(states: &BTreeMap<crate::census::CensusState, u64>) -> Vec<v1::StateCount> {
    states
        .iter()
        .map(|(s, n)| v1::StateCount {
            state: census_state(*s) as i32,
            tenants: *n,
        })
        .collect()
}

/// A census as sent.
pub fn census(c: &crate::census::Census) -> v1::CensusReport {
    use crate::census::ChangeKind;
    v1::CensusReport {
        fleet: c.fleet.clone(),
        bundle_id: c.bundle_id.clone().unwrap_or_default(),
        fingerprinted: c.fingerprinted,
        trigger: c.trigger.as_str().to_string(),
        started_at: Some(timestamp(c.started_at_ms)),
        finished_at: Some(timestamp(c.finished_at_ms)),
        histogram: c
            .histogram
            .iter()
            .map(|(version, tenants)| v1::VersionCount {
                version: version.clone(),
                tenants: *tenants,
            })
            .collect(),
        states: state_counts(&c.states),
        hosts: c
            .hosts
            .iter()
            .map(|h| v1::HostCensus {
                host: h.host.clone(),
                tenants: h.tenants,
                states: state_counts(&h.states),
            })
            .collect(),
        tenants: c
            .tenants
            .iter()
            .map(|t| v1::TenantCensus {
                tenant_id: t.tenant_id.clone(),
                host: t.host.clone(),
                state: census_state(t.state) as i32,
                version: t.version.clone().unwrap_or_default(),
                applied: t.applied,
                baselined: t.baselined,
                started: t.started.clone(),
                drifted: t.drifted.clone(),
                ahead: t.ahead.clone(),
                pending: t.pending.clone(),
                error: t
                    .error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_default(),
                sqlstate: t
                    .error
                    .as_ref()
                    .and_then(|e| e.sqlstate.clone())
                    .unwrap_or_default(),
                fingerprint: t.fingerprint.clone().unwrap_or_default(),
                has_log: t.has_log,
                notes: t.notes.clone(),
                pending_count: t.pending_count,
                schema_drift: t.schema_drift,
            })
            .collect(),
        fingerprints: c
            .fingerprints
            .iter()
            .map(|g| v1::FingerprintGroup {
                version: g.version.clone(),
                fingerprint: g.fingerprint.clone(),
                tenants: g.tenants,
                reference: g.reference,
                tied: g.tied,
                changes: g
                    .changes
                    .iter()
                    .map(|ch| v1::SchemaChange {
                        kind: match ch.kind {
                            ChangeKind::Added => v1::SchemaChangeKind::Added,
                            ChangeKind::Removed => v1::SchemaChangeKind::Removed,
                            ChangeKind::Changed => v1::SchemaChangeKind::Changed,
                        } as i32,
                        object: ch.object.clone(),
                        reference: ch.reference.clone(),
                        found: ch.found.clone(),
                    })
                    .collect(),
                more_changes: g.more_changes as u64,
                tenant_ids: g.members.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> v1::Policy {
        v1::Policy {
            concurrency: 4,
            ..Default::default()
        }
    }

    #[test]
    fn policy_round_trips() {
        let policies = [
            Policy::default(),
            Policy {
                concurrency: 3,
                per_host: Some(2),
                rate: Some(2.5),
                canary: Canary::Label {
                    key: "tier".into(),
                    value: "free".into(),
                },
                after_canary: AfterCanary::Pause,
                max_failures: FailureBudget::Count(0),
                retries: 0,
                transaction: TransactionMode::PerTenant,
                lock_timeout_ms: 1,
                statement_timeout_ms: 60_000,
                drift: DriftPolicy::Allow,
                order: OrderPolicy::AllowOutOfOrder,
                ..Policy::default()
            },
            Policy {
                canary: Canary::Count { count: 5 },
                max_failures: FailureBudget::Unlimited,
                ..Policy::default()
            },
            Policy {
                canary: Canary::Count { count: 1 },
                stages: vec![
                    crate::policy::Stage::Count { count: 20 },
                    crate::policy::Stage::Label {
                        key: "region".into(),
                        value: "eu".into(),
                    },
                    crate::policy::Stage::Rest,
                ],
                approve_between_stages: true,
                ..Policy::default()
            },
        ];
        for p in policies {
            let back = policy_from_proto(Some(policy_to_proto(&p))).expect("valid");
            assert_eq!(back, p);
        }
    }

    #[test]
    fn refusals_name_the_field() {
        let refuse = |f: fn(&mut v1::Policy)| {
            let mut p = base();
            f(&mut p);
            match policy_from_proto(Some(p)) {
                Err(ApiError::Invalid(m)) => m,
                other => panic!("expected a refusal, got {other:?}"),
            }
        };
        assert!(refuse(|p| p.concurrency = 0).contains("concurrency"));
        assert!(
            refuse(|p| p.max_failures = Some(v1::policy::MaxFailures::MaxFailuresRatio(1.5)))
                .contains("max_failures")
        );
        assert!(refuse(|p| p.rate = -1.0).contains("rate"));
        assert!(refuse(|p| p.canary_label = "novalue".into()).contains("canary_label"));
        assert!(refuse(|p| p.pause_after_canary = true).contains("pause_after_canary"));
        assert!(refuse(|p| p.transaction = 99).contains("transaction"));
        assert!(refuse(|p| p.retries = Some(1_000)).contains("retries"));
        assert!(refuse(|p| p.rate = 1e-20).contains("rate"));
        assert!(refuse(|p| p.rate = f64::NAN).contains("rate"));
        assert!(refuse(|p| p.lock_timeout_ms = Some(0)).contains("lock_timeout"));
        assert!(refuse(|p| p.statement_timeout_ms = Some(1 << 40)).contains("statement_timeout"));
        assert!(policy_from_proto(None).is_err());
    }

    #[test]
    fn unset_fields_take_the_documented_defaults() {
        let p = policy_from_proto(Some(base())).expect("valid");
        let d = Policy::default();
        assert_eq!(p.max_failures, d.max_failures);
        assert_eq!(p.retries, d.retries);
        assert_eq!(p.lock_timeout_ms, 500);
        assert_eq!(p.statement_timeout_ms, 0);
        assert_eq!(p.per_host, None);
        assert_eq!(p.rate, None);
    }

    #[test]
    fn bundles_are_checked_for_size_and_id() {
        let bundle = Bundle::from_sources(&[("V1__a.sql", "SELECT 1;")], "t").expect("bundle");
        let wire = bundle_to_proto(&bundle);
        let back = bundle_from_proto(Some(wire.clone()), &Limits::default()).expect("same");
        assert_eq!(back.id(), bundle.id());

        let mut tampered = wire.clone();
        tampered.files[0].content = b"SELECT 2;".to_vec();
        assert!(matches!(
            bundle_from_proto(Some(tampered), &Limits::default()),
            Err(ApiError::BundleIdMismatch { .. })
        ));
        let tiny = Limits {
            max_bundle_bytes: 3,
            ..Limits::default()
        };
        let err = bundle_from_proto(Some(wire), &tiny).unwrap_err();
        assert!(err.to_string().contains("max_bundle_bytes"), "{err}");
        assert!(bundle_from_proto(None, &Limits::default()).is_err());
    }
}
