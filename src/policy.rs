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
    pub max_failures: FailureBudget,
    /// Attempts after the first, for retryable failures only.
    pub retries: u32,
    /// First retry delay; doubles per attempt, with full jitter, up to `backoff_max_ms`.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub transaction: TransactionMode,
    pub lock_timeout_ms: u64,
    /// 0: no limit.
    pub statement_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub drift: DriftPolicy,
    pub order: OrderPolicy,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            concurrency: 16,
            per_host: None,
            rate: None,
            canary: Canary::None,
            after_canary: AfterCanary::Continue,
            max_failures: FailureBudget::default(),
            retries: 3,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
            transaction: TransactionMode::PerScript,
            lock_timeout_ms: 5_000,
            statement_timeout_ms: 0,
            connect_timeout_ms: 10_000,
            drift: DriftPolicy::Fail,
            order: OrderPolicy::Strict,
        }
    }
}

/// A policy that makes no sense, with the field named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy: {0}")]
pub struct PolicyError(pub String);

impl Policy {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |m: &str| Err(PolicyError(m.to_string()));
        if self.concurrency == 0 {
            return bad("concurrency must be at least 1");
        }
        if self.per_host == Some(0) {
            return bad("per_host must be at least 1 (or unset)");
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return bad("rate must be a positive number of starts per second");
        }
        if let FailureBudget::Ratio(r) = self.max_failures
            && !(0.0..=1.0).contains(&r)
        {
            return bad("max_failures ratio must be within 0..1");
        }
        if let Canary::Count { count: 0 } = self.canary {
            return bad("canary count must be at least 1 (or no canary)");
        }
        if let Canary::Label { key, .. } = &self.canary
            && key.is_empty()
        {
            return bad("canary label needs a key");
        }
        if self.backoff_base_ms > self.backoff_max_ms {
            return bad("backoff_base_ms must not exceed backoff_max_ms");
        }
        Ok(())
    }

    /// The session settings a tenant run uses.
    pub fn session_settings(&self) -> SessionSettings {
        SessionSettings {
            lock_timeout: Duration::from_millis(self.lock_timeout_ms),
            statement_timeout: Duration::from_millis(self.statement_timeout_ms),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
        }
    }

    /// The planner's rules.
    pub fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            drift: self.drift,
            order: self.order,
        }
    }

    /// Delay before retry number `attempt` (1 = first retry): exponential, full jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(20));
        let cap = exp.min(self.backoff_max_ms).max(1);
        Duration::from_millis(fastrand::u64(cap / 2..=cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for _ in 0..50 {
            let first = p.backoff(1).as_millis();
            assert!((50..=100).contains(&first), "{first}");
            let third = p.backoff(3).as_millis();
            assert!((200..=400).contains(&third), "{third}");
            assert!(p.backoff(30).as_millis() <= 1_000);
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
}
