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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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
    SessionSettings {
        lock_timeout: Duration::from_millis(100),
        statement_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(5),
        idle_in_transaction_timeout: Duration::from_secs(5),
    }
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
    loop {
        tokio::time::sleep(guard.interval).await;
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
                    tracing::warn!(host = %key, error = %e, "the lock watchdog cannot connect; trying again");
                    continue;
                }
            }
        }
        let Some(s) = &session else { continue };
        let pids: Vec<i32> = runs.iter().map(|r| r.pid).collect();
        match s.client().simple_query(&blocked_sql(&pids)).await {
            Ok(rows) => trip_blockers(&runs, &rows),
            Err(e) => {
                tracing::warn!(host = %key, error = %crate::failure::DbFailure::from(&e), "the lock watchdog's query failed; reconnecting");
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
