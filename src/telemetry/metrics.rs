//! The daemon's metrics, one definition each. Counters and the script-duration histogram
//! are recorded as tenant runs finish (the engine tells its [`RunObserver`], which the
//! daemon sets to [`RunRecorder`]: the engine does not know telemetry); the gauges (tenants by state per wave, waves by
//! state, tenants in flight per host) are read from the engine when a reader collects,
//! so they can never drift from what `wave status` says. Instruments come from the
//! global meter: no-ops unless [`super::Telemetry`] installed a provider first.

use std::sync::OnceLock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, ObservableGauge};

use crate::apply::Outcome;
use crate::wave::{Engine, RunObserver, TenantAction};

/// The lock-timeout SQLSTATE, counted on its own.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// Instruments recorded as tenant runs finish.
pub struct RunMetrics {
    script_duration: Histogram<f64>,
    runs: Counter<u64>,
    retries: Counter<u64>,
    failures: Counter<u64>,
    lock_timeouts: Counter<u64>,
    backfill_rows: Counter<u64>,
}

/// The run instruments, created from the global meter on first use.
pub fn runs() -> &'static RunMetrics {
    static METRICS: OnceLock<RunMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = opentelemetry::global::meter("flotilla");
        RunMetrics {
            script_duration: meter
                .f64_histogram("flotilla_script_duration")
                .with_unit("s")
                .with_description("Time to apply one script, log row included")
                .with_boundaries(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0,
                ])
                .build(),
            runs: meter
                .u64_counter("flotilla_tenant_runs")
                .with_description("Finished tenant runs by what the engine decided")
                .build(),
            retries: meter
                .u64_counter("flotilla_tenant_retries")
                .with_description("Retryable failures that will be retried, by SQLSTATE")
                .build(),
            failures: meter
                .u64_counter("flotilla_tenant_failures")
                .with_description("Tenants that failed for good, by SQLSTATE")
                .build(),
            lock_timeouts: meter
                .u64_counter("flotilla_lock_timeouts")
                .with_description("Runs that hit lock_timeout (SQLSTATE 55P03)")
                .build(),
            backfill_rows: meter
                .u64_counter("flotilla_backfill_rows")
                .with_description("Rows changed by batch scripts (-- flotilla:batch)")
                .build(),
        }
    })
}

impl RunMetrics {
    /// Records one finished run and the engine's decision about it.
    pub fn record(&self, outcome: &Outcome, action: TenantAction) {
        self.runs
            .add(1, &[KeyValue::new("outcome", action.as_str())]);
        let scripts = match outcome {
            Outcome::Applied { scripts, .. }
            | Outcome::Cancelled { scripts }
            | Outcome::Failed { scripts, .. } => scripts.as_slice(),
            Outcome::UpToDate { .. } | Outcome::Busy { .. } => &[],
        };
        for s in scripts {
            self.script_duration.record(s.duration.as_secs_f64(), &[]);
        }
        let rows: u64 = scripts.iter().filter_map(|s| s.rows).sum();
        if rows > 0 {
            self.backfill_rows.add(rows, &[]);
        }
        if let Outcome::Failed { error, .. } = outcome {
            let sqlstate = error.sqlstate().unwrap_or("none").to_string();
            if sqlstate == LOCK_NOT_AVAILABLE {
                self.lock_timeouts.add(1, &[]);
            }
            let labels = [KeyValue::new("sqlstate", sqlstate)];
            match action {
                TenantAction::RetryAfter(_) => self.retries.add(1, &labels),
                TenantAction::Fail => self.failures.add(1, &labels),
                _ => {}
            }
        }
    }
}

/// Records every finished run into [`RunMetrics`]: what the daemon gives its engine.
#[derive(Debug, Default)]
pub struct RunRecorder;

impl RunObserver for RunRecorder {
    fn tenant_finished(&self, outcome: &Outcome, action: TenantAction) {
        runs().record(outcome, action);
    }
}

/// The engine's gauges; keep this alive as long as the engine serves.
pub struct EngineGauges {
    _gauges: Vec<ObservableGauge<u64>>,
}

/// Registers gauges read from `engine` at each collection.
pub fn observe_engine(engine: &Engine) -> EngineGauges {
    // Created now, before anything can scrape: creating an instrument takes the metrics
    // pipeline's lock, which a scrape holds while its callbacks read the waves.
    let _ = runs();
    let meter = opentelemetry::global::meter("flotilla");
    let for_tenants = engine.clone();
    let tenants = meter
        .u64_observable_gauge("flotilla_wave_tenants")
        .with_description("Tenants of each wave by state")
        .with_callback(move |observer| {
            for wave in for_tenants.list() {
                let c = wave.counts;
                for (state, n) in [
                    ("pending", c.pending),
                    ("running", c.running),
                    ("succeeded", c.succeeded),
                    ("failed", c.failed),
                    ("cancelled", c.cancelled),
                ] {
                    observer.observe(
                        n,
                        &[
                            KeyValue::new("wave_id", wave.id.clone()),
                            KeyValue::new("state", state),
                        ],
                    );
                }
            }
        })
        .build();
    let for_waves = engine.clone();
    let waves = meter
        .u64_observable_gauge("flotilla_waves")
        .with_description("Waves by state")
        .with_callback(move |observer| {
            let waves = for_waves.list();
            for state in crate::wave::WaveState::ALL {
                let n = waves.iter().filter(|w| w.state == state).count() as u64;
                observer.observe(
                    n,
                    &[KeyValue::new("state", state.as_str().to_ascii_lowercase())],
                );
            }
        })
        .build();
    let for_hosts = engine.clone();
    let in_flight = meter
        .u64_observable_gauge("flotilla_tenants_in_flight")
        .with_description("Tenants running now on each database server (host:port)")
        .with_callback(move |observer| {
            for (host, n) in for_hosts.running_per_host() {
                observer.observe(n, &[KeyValue::new("host", host)]);
            }
        })
        .build();
    let for_holds = engine.clone();
    let held = meter
        .u64_observable_gauge("flotilla_host_held")
        .with_description("1 for each server a wave's health gate holds, with the reason")
        .with_callback(move |observer| {
            for wave in for_holds.list() {
                for hold in &wave.held {
                    let (host, reason) = hold.split_once(": ").unwrap_or((hold.as_str(), ""));
                    // The kind of gate, not its numbers: one series per host and gate.
                    let reason: String = reason
                        .split(|c: char| c.is_ascii_digit() || c == ':')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string();
                    observer.observe(
                        1,
                        &[
                            KeyValue::new("wave_id", wave.id.clone()),
                            KeyValue::new("host", host.to_string()),
                            KeyValue::new("reason", reason),
                        ],
                    );
                }
            }
        })
        .build();
    let for_versions = engine.clone();
    let fleet_tenants = meter
        .u64_observable_gauge("flotilla_fleet_tenants")
        .with_description(
            "Tenants of each registered fleet per highest applied version (`none`, `unreachable`; past the 50 largest buckets, `other`), from its last scheduled census",
        )
        .with_callback(move |observer| {
            for census in for_versions.fleets().scheduled_censuses() {
                for (version, n) in version_buckets(&census.histogram) {
                    observer.observe(
                        n,
                        &[
                            KeyValue::new("fleet", census.fleet.clone()),
                            KeyValue::new("version", version),
                        ],
                    );
                }
            }
        })
        .build();
    let for_drift = engine.clone();
    let fleet_drifted = meter
        .u64_observable_gauge("flotilla_fleet_drifted")
        .with_description(
            "Tenants of each fleet whose applied checksums or schema differ, from its last scheduled census",
        )
        .with_callback(move |observer| {
            for census in for_drift.fleets().scheduled_censuses() {
                let n = census.drifted();
                observer.observe(n, &[KeyValue::new("fleet", census.fleet.clone())]);
            }
        })
        .build();
    let for_unreachable = engine.clone();
    let fleet_unreachable = meter
        .u64_observable_gauge("flotilla_fleet_unreachable")
        .with_description("Tenants of each fleet its last scheduled census could not read")
        .with_callback(move |observer| {
            for census in for_unreachable.fleets().scheduled_censuses() {
                let n = census.count(crate::census::CensusState::Unreachable);
                observer.observe(n, &[KeyValue::new("fleet", census.fleet.clone())]);
            }
        })
        .build();
    let for_age = engine.clone();
    let fleet_census_time = meter
        .u64_observable_gauge("flotilla_fleet_census_timestamp_seconds")
        .with_description(
            "When each fleet's last scheduled census finished (Unix seconds): alert on its age",
        )
        .with_callback(move |observer| {
            for census in for_age.fleets().scheduled_censuses() {
                observer.observe(
                    census.finished_at_ms / 1000,
                    &[KeyValue::new("fleet", census.fleet.clone())],
                );
            }
        })
        .build();
    EngineGauges {
        _gauges: vec![
            fleet_census_time,
            tenants,
            waves,
            in_flight,
            held,
            fleet_tenants,
            fleet_drifted,
            fleet_unreachable,
        ],
    }
}

/// Version buckets exported per fleet: a fleet spread over hundreds of versions must not
/// make hundreds of series.
const MAX_VERSION_SERIES: usize = 50;

/// A census histogram as exported: the largest [`MAX_VERSION_SERIES`] buckets as they
/// are, the rest summed as `other`.
fn version_buckets(histogram: &[(String, u64)]) -> Vec<(String, u64)> {
    if histogram.len() <= MAX_VERSION_SERIES {
        return histogram.to_vec();
    }
    let mut by_size: Vec<&(String, u64)> = histogram.iter().collect();
    by_size.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut out: Vec<(String, u64)> = by_size[..MAX_VERSION_SERIES - 1]
        .iter()
        .map(|(v, n)| (v.clone(), *n))
        .collect();
    let other = by_size[MAX_VERSION_SERIES - 1..]
        .iter()
        .map(|(_, n)| n)
        .sum();
    out.push(("other".to_string(), other));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_versions_fold_into_other_and_keep_the_total() {
        let histogram: Vec<(String, u64)> = (1..=80).map(|v| (v.to_string(), v)).collect();
        let total: u64 = histogram.iter().map(|(_, n)| n).sum();
        let buckets = version_buckets(&histogram);
        assert_eq!(buckets.len(), MAX_VERSION_SERIES);
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), total);
        assert!(buckets.iter().any(|(v, n)| v == "80" && *n == 80));
        assert!(!buckets.iter().any(|(v, _)| v == "1"));
        assert_eq!(buckets.last().map(|(v, _)| v.as_str()), Some("other"));
        let few = &histogram[..3];
        assert_eq!(version_buckets(few), few.to_vec());
    }
}
