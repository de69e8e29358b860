//! The lock-queue watchdog: from one side session per database server, watches the
//! application backends that Flotilla's sessions block — by a lock they hold, or by a
//! lock request they are queued on, which PostgreSQL's `pg_blocking_pids` counts too —
//! and trips the run whose session has kept one waiting longer than its `max_block`.
//! The tripped run cancels its own statement (its transaction rolls back) and reports a
//! retryable failure that names what it blocked and for how long.
//!
//! The cost is one query per server per interval, however many tenants run there; a
//! server's side session opens when its first run registers and closes after its last
//! has gone. This module never cancels anything itself, never touches an application
//! backend, and holds no lock: it only reads `pg_locks` and tells a run to stop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::SimpleQueryMessage;
use tokio_util::sync::CancellationToken;

use crate::connect::{Session, SessionSettings};
use crate::dsn::Dsn;
use crate::reach::Reach;

/// How often a server's blocked backends are read.
pub const INTERVAL: Duration = Duration::from_millis(200);

/// The watchdog of a daemon: one entry per server with runs in flight.
pub struct Guard {
    reach: Reach,
    interval: Duration,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    next_id: AtomicU64,
}

/// The runs in flight on one server, and the session that watches them.
struct Host {
    /// A connection string to reach the server with (the latest registered run's).
    dsn: Mutex<Dsn>,
    runs: Mutex<HashMap<u64, Arc<Shared>>>,
}

/// What the watchdog and one run share.
struct Shared {
    pid: i32,
    max_block_ms: AtomicU64,
    trip: Mutex<Trip>,
}

#[derive(Default)]
struct Trip {
    token: CancellationToken,
    reason: Option<String>,
}

/// One run's registration: while it lives, the run's session is watched. Dropping it
/// takes the run off the watch.
pub struct Watch {
    guard: Arc<Guard>,
    host: String,
    id: u64,
    shared: Arc<Shared>,
}

impl Watch {
    /// Sets how long an application query may wait on this session (a script's
    /// `max-block` directive, or the wave's).
    pub fn set_max_block(&self, max_block: Duration) {
        self.shared
            .max_block_ms
            .store(max_block.as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves when the watchdog trips this run.
    pub async fn tripped(&self) {
        let token = lock(&self.shared.trip).token.clone();
        token.cancelled_owned().await
    }

    /// Why the watchdog tripped this run, if it did and the trip was not cleared.
    pub fn reason(&self) -> Option<String> {
        lock(&self.shared.trip).reason.clone()
    }

    /// Forgets a trip whose statement finished before the cancel reached it: the block
    /// is over, and the next statement must not be cancelled for it.
    pub fn clear(&self) {
        *lock(&self.shared.trip) = Trip::default();
    }
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("interval", &self.interval)
            .field("hosts", &lock(&self.hosts).len())
            .finish()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let hosts = lock(&self.guard.hosts);
        if let Some(host) = hosts.get(&self.host) {
            lock(&host.runs).remove(&self.id);
        }
    }
}

use crate::lock;

impl Guard {
    /// A watchdog that connects where `reach` allows.
    pub fn new(reach: Reach) -> Arc<Self> {
        Self::with_interval(reach, INTERVAL)
    }

    /// [`Guard::new`] reading every `interval` (tests and benchmarks).
    pub fn with_interval(reach: Reach, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            reach,
            interval,
            hosts: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Watches the session with server process `pid`, reached through `dsn`, until the
    /// returned [`Watch`] is dropped. Must be called on a Tokio runtime.
    pub fn watch(self: &Arc<Self>, dsn: &Dsn, pid: i32, max_block: Duration) -> Watch {
        let shared = Arc::new(Shared {
            pid,
            max_block_ms: AtomicU64::new(max_block.as_millis() as u64),
            trip: Mutex::new(Trip::default()),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let host_key = dsn.host().to_string();
        let mut hosts = lock(&self.hosts);
        let host = hosts.entry(host_key.clone()).or_insert_with(|| {
            let host = Arc::new(Host {
                dsn: Mutex::new(dsn.clone()),
                runs: Mutex::new(HashMap::new()),
            });
            tokio::spawn(watch_host(self.clone(), host_key.clone(), host.clone()));
            host
        });
        *lock(&host.dsn) = dsn.clone();
        lock(&host.runs).insert(id, shared.clone());
        Watch {
            guard: self.clone(),
            host: host_key,
            id,
            shared,
        }
    }

    /// Servers with a side session (or one about to open), for metrics and tests.
    pub fn watched_hosts(&self) -> usize {
        lock(&self.hosts).len()
    }
}

/// The side session's settings: it must never wait on anything itself.
fn side_settings() -> SessionSettings {
    SessionSettings::catalog_reader(Duration::from_secs(2))
}

/// Application backends waiting on one of `pids`, longest first: (waiter, blocker,
/// waited ms, application name). Waiting lock requests are few; only they are asked
/// for their blockers (`pg_blocking_pids` takes the lock manager's locks).
pub fn blocked_sql(pids: &[i32]) -> String {
    let list = pids
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "WITH waiting AS MATERIALIZED (SELECT DISTINCT pid, waitstart FROM pg_catalog.pg_locks \
         WHERE NOT granted AND waitstart IS NOT NULL AND pid <> ALL ('{{{list}}}'::int[])) \
         SELECT w.pid, b.pid, (extract(epoch FROM clock_timestamp() - w.waitstart) * 1000)::bigint, \
         coalesce(a.application_name, '') \
         FROM waiting w CROSS JOIN LATERAL unnest(pg_catalog.pg_blocking_pids(w.pid)) AS b(pid) \
         LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = w.pid \
         WHERE b.pid = ANY ('{{{list}}}'::int[]) ORDER BY 3 DESC"
    )
}

async fn watch_host(guard: Arc<Guard>, key: String, host: Arc<Host>) {
    let mut session: Option<Session> = None;
    // After a failure (a server too old for `pg_locks.waitstart`, a password that
    // changed) the watchdog waits longer each time, up to 30 s, rather than log every
    // interval; each failure is logged.
    let mut pause = guard.interval;
    loop {
        tokio::time::sleep(pause).await;
        pause = guard.interval;
        let runs: Vec<Arc<Shared>> = {
            let mut hosts = lock(&guard.hosts);
            let runs: Vec<Arc<Shared>> = lock(&host.runs).values().cloned().collect();
            if runs.is_empty() {
                // The last run has gone: the host's entry goes, under the same lock a
                // new registration takes, so none is left unwatched.
                hosts.remove(&key);
                break;
            }
            runs
        };
        if session.is_none() {
            let dsn = lock(&host.dsn).clone();
            match Session::connect(&dsn, &side_settings(), &guard.reach).await {
                Ok(s) => session = Some(s),
                Err(e) => {
                    tracing::warn!(host = %key, error = %e, "the lock watchdog cannot connect; trying again later");
                    pause = backoff(pause);
                    continue;
                }
            }
        }
        let Some(s) = &session else { continue };
        let pids: Vec<i32> = runs.iter().map(|r| r.pid).collect();
        match s.client().simple_query(&blocked_sql(&pids)).await {
            Ok(rows) => trip_blockers(&runs, &rows),
            Err(e) => {
                tracing::warn!(host = %key, error = %crate::failure::DbFailure::from(&e), "the lock watchdog's query failed; reconnecting later (PostgreSQL 14 or later is needed)");
                pause = backoff(pause);
                if let Some(s) = session.take() {
                    s.close().await;
                }
            }
        }
    }
    if let Some(s) = session {
        s.close().await;
    }
}

fn backoff(pause: Duration) -> Duration {
    (pause * 4).min(Duration::from_secs(30))
}

/// Trips every run that kept an application backend waiting past its `max_block`.
fn trip_blockers(runs: &[Arc<Shared>], rows: &[SimpleQueryMessage]) {
    for row in rows.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    }) {
        let number = |i: usize| row.get(i).and_then(|v| v.parse::<i64>().ok());
        let (Some(waiter), Some(blocker), Some(waited_ms)) = (number(0), number(1), number(2))
        else {
            continue;
        };
        let Some(run) = runs.iter().find(|r| i64::from(r.pid) == blocker) else {
            continue;
        };
        let max_block_ms = run.max_block_ms.load(Ordering::Relaxed);
        if waited_ms < 0 || (waited_ms as u64) <= max_block_ms {
            continue;
        }
        let mut trip = lock(&run.trip);
        if trip.reason.is_some() {
            continue;
        }
        let app = row
            .get(3)
            .filter(|a| !a.is_empty())
            .unwrap_or("an application");
        trip.reason = Some(format!(
            "backend {waiter} ({app}) waited {waited_ms} ms on this session, over max_block \
             {max_block_ms} ms"
        ));
        trip.token.cancel();
    }
}

/// How often a held host (or one with tenants waiting) has its health read again.
pub const GATE_INTERVAL: Duration = Duration::from_secs(2);

/// How long one health reading may take, connect included.
pub const HEALTH_DEADLINE: Duration = Duration::from_secs(8);

/// One reading of a server's health, for its gate.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// The worst replay lag of its standbys (`pg_stat_replication`), when it has any.
    pub replication_lag_ms: Option<u64>,
    /// Client backends over `max_connections`.
    pub connections_share: f64,
    /// What the operator's gate SQL said, when there is one: `Err` when it failed.
    pub gate: Option<Result<bool, String>>,
}

/// The server's own numbers, in one statement.
const HEALTH_SQL: &str = "SELECT \
     (SELECT max(greatest(extract(epoch FROM replay_lag) * 1000, 0))::bigint \
      FROM pg_catalog.pg_stat_replication), \
     (SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend')::float8 \
      / pg_catalog.current_setting('max_connections')::float8";

/// Reads the health of the server of `dsn` (one short session): its numbers, and the
/// operator's `gate_sql` run as one statement in a read-only transaction with a
/// statement timeout, rolled back. `Err` when the server cannot be asked at all.
pub async fn read_health(
    dsn: &Dsn,
    reach: &Reach,
    gate_sql: Option<&str>,
) -> Result<Health, String> {
    let mut session = match Session::connect(dsn, &side_settings(), reach).await {
        Ok(s) => s,
        // A server at max_connections is as unhealthy as a gate can say.
        Err(e) if e.sqlstate.as_deref() == Some("53300") => {
            return Ok(Health {
                replication_lag_ms: None,
                connections_share: f64::INFINITY,
                gate: None,
            });
        }
        Err(e) => return Err(e.to_string()),
    };
    let result = async {
        let rows = session
            .client()
            .simple_query(HEALTH_SQL)
            .await
            .map_err(|e| crate::failure::DbFailure::from(&e).to_string())?;
        let row = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        });
        let replication_lag_ms = row.and_then(|r| r.get(0)).and_then(|v| v.parse().ok());
        let connections_share = row
            .and_then(|r| r.get(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let gate = match gate_sql {
            None => None,
            Some(sql) => Some(run_gate(&mut session, sql).await),
        };
        Ok(Health {
            replication_lag_ms,
            connections_share,
            gate,
        })
    }
    .await;
    session.close().await;
    result
}

async fn run_gate(session: &mut Session, sql: &str) -> Result<bool, String> {
    let failure = |e: tokio_postgres::Error| crate::failure::DbFailure::from(&e).to_string();
    let tx = session
        .client_mut()
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(failure)?;
    tx.batch_execute("SET LOCAL statement_timeout = 5000")
        .await
        .map_err(failure)?;
    // One statement (the extended protocol takes no more), one row, one boolean.
    let rows = tx.query(sql, &[]).await.map_err(failure)?;
    let answer = match rows.as_slice() {
        [row] => row
            .try_get::<_, bool>(0)
            .map_err(|_| "gate SQL must return one boolean column".to_string()),
        _ => Err(format!("gate SQL returned {} rows, not one", rows.len())),
    };
    let _ = tx.rollback().await;
    answer
}

/// Whether `health` holds its host under `policy`, and why (`replication lag 14s > 10s`).
pub fn verdict(health: &Health, policy: &crate::policy::Policy) -> Option<String> {
    let secs = |ms: u64| humantime::format_duration(Duration::from_millis(ms / 100 * 100));
    if policy.max_replication_lag_ms > 0
        && let Some(lag) = health.replication_lag_ms
        && lag > policy.max_replication_lag_ms
    {
        return Some(format!(
            "replication lag {} > {}",
            secs(lag),
            secs(policy.max_replication_lag_ms)
        ));
    }
    if health.connections_share.is_infinite() {
        return Some("connections: the server refuses new sessions (53300)".to_string());
    }
    if policy.max_connections_share < 1.0 && health.connections_share > policy.max_connections_share
    {
        return Some(format!(
            "connections {:.0}% of max_connections > {:.0}%",
            health.connections_share * 100.0,
            policy.max_connections_share * 100.0
        ));
    }
    match &health.gate {
        Some(Ok(false)) => Some("gate SQL returned false".to_string()),
        Some(Err(e)) => Some(format!("gate SQL failed: {e}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    #[test]
    fn verdicts_name_the_gate_and_its_numbers() {
        let p = Policy::default();
        let healthy = Health {
            replication_lag_ms: Some(200),
            connections_share: 0.5,
            gate: Some(Ok(true)),
        };
        assert_eq!(verdict(&healthy, &p), None);
        let lagging = Health {
            replication_lag_ms: Some(14_030),
            ..healthy.clone()
        };
        assert_eq!(
            verdict(&lagging, &p).as_deref(),
            Some("replication lag 14s > 10s")
        );
        let crowded = Health {
            connections_share: 0.95,
            ..healthy.clone()
        };
        assert_eq!(
            verdict(&crowded, &p).as_deref(),
            Some("connections 95% of max_connections > 90%")
        );
        let closed = Health {
            gate: Some(Ok(false)),
            ..healthy.clone()
        };
        assert_eq!(
            verdict(&closed, &p).as_deref(),
            Some("gate SQL returned false")
        );
        let broken = Health {
            gate: Some(Err("42P01: no such table".into())),
            ..healthy.clone()
        };
        assert!(verdict(&broken, &p).is_some_and(|v| v.contains("gate SQL failed")));
        let off = Policy {
            max_replication_lag_ms: 0,
            max_connections_share: 1.0,
            ..Policy::default()
        };
        assert_eq!(
            verdict(
                &Health {
                    gate: None,
                    ..crowded.clone()
                },
                &off
            ),
            None
        );
        assert_eq!(
            verdict(
                &Health {
                    gate: None,
                    ..lagging
                },
                &off
            ),
            None
        );
    }
}
