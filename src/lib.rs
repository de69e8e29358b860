//! Flotilla rolls one migration bundle out across a fleet of PostgreSQL tenant databases.
//!
//! # Layout
//! - [`bundle`]: a directory of Flyway-named scripts, validated and identified.
//! - [`dsn`]: tenant connection strings, parsed and redacted.
//! - [`reach`]: where the daemon may connect (`allowed_hosts`) and who gets its password.
//! - [`connect`]: sessions to tenants (TLS, timeouts, cancel).
//! - [`failure`]: database errors and the one retryable/permanent classification.
//! - [`guard`]: the lock-queue watchdog (one side session per server).
//! - [`apply`]: the tenant applier and its pure planner; the execution log.
//! - [`target`]: which tenants a wave covers (CSV, catalog query, discovery).
//! - [`fleet`]: named fleets, registered once and resolved at every use.
//! - [`census`]: where every tenant of a fleet stands (versions, drift, fingerprints).
//! - [`secret`]: sealing connection strings for the store.
//! - [`policy`]: a wave's policy and its validation.
//! - [`store`]: the progress store (sled) and its records.
//! - [`wave`]: the wave engine: scheduling, control, resume.
//! - [`config`]: the daemon's config file (listen, data dir, tokens, TLS, limits).
//! - [`telemetry`]: logs, traces (OTLP) and metrics (Prometheus, OTLP).
//! - [`api`]: the gRPC control API: generated types, conversions, auth, the service.
//!   Only the API layer and the CLI name protobuf types; the core never does.
//!
//! The daemon binary (`flotillad`) lives in `src/bin/`; the CLI is the `flotilla-cli`
//! crate under `cli/`.

pub mod api;
pub mod apply;
pub mod bundle;
pub mod census;
pub mod config;
pub mod connect;
pub mod dsn;
pub mod failure;
pub mod fleet;
pub mod guard;
pub mod policy;
pub mod reach;
pub mod secret;
pub mod store;
pub mod target;
pub mod telemetry;
pub mod wave;

/// Locks `m`, carrying on after a panic elsewhere poisoned it: every value behind these
/// mutexes is left consistent between statements, so a poisoned one is still whole.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
