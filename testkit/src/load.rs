//! An application's load on a tenant, for tests and benchmarks of what a migration does
//! to it: client sessions updating a hot table in a loop, timing every query, and a long
//! transaction that holds a lock a migration must wait for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::Cluster;

/// The hot table the load works on: seed a tenant with it.
pub const HOT_TABLE_SQL: &str = "CREATE TABLE hot (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
INSERT INTO hot SELECT g, 0 FROM generate_series(1, 64) g;";

/// Client sessions updating their own row of `hot` in a loop, until stopped.
pub struct AppLoad {
    stop: Arc<AtomicBool>,
    longest_ms: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
}

impl AppLoad {
    /// Starts `sessions` clients (at most 64) on `db` and returns once each has run a
    /// first query: the load is on when this returns, no sleep needed.
    pub async fn start(cluster: &Cluster, db: &str, sessions: i32) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let longest_ms = Arc::new(AtomicU64::new(0));
        let running = Arc::new(tokio::sync::Barrier::new(sessions as usize + 1));
        let mut tasks = Vec::new();
        for id in 1..=sessions {
            let client = cluster.connect(db).await?;
            let (stop, longest_ms, running) = (stop.clone(), longest_ms.clone(), running.clone());
            tasks.push(tokio::spawn(async move {
                let mut first = true;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    client
                        .execute("UPDATE hot SET v = v + 1 WHERE id = $1", &[&id])
                        .await
                        .context("application query")?;
                    longest_ms.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    if std::mem::take(&mut first) {
                        running.wait().await;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(())
            }));
        }
        tokio::time::timeout(Duration::from_secs(60), running.wait())
            .await
            .context("the application's sessions did not all run a first query in 60 s")?;
        Ok(Self {
            stop,
            longest_ms,
            tasks,
        })
    }

    /// Stops the clients; the longest single query any of them saw, in ms.
    pub async fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await??;
        }
        Ok(self.longest_ms.load(Ordering::Relaxed))
    }
}

/// A transaction on `db` that has read `hot`, so holds its ACCESS SHARE lock: an
/// `ALTER TABLE hot` waits for it, and the application queues behind that request. It
/// lasts until [`LongReader::release`]: the test, not a timer, says when.
pub struct LongReader {
    client: tokio_postgres::Client,
}

impl LongReader {
    /// Opens the transaction and reads `hot`.
    pub async fn start(cluster: &Cluster, db: &str) -> Result<Self> {
        let client = cluster.connect(db).await?;
        client
            .batch_execute("BEGIN; SELECT count(*) FROM hot;")
            .await
            .context("the long transaction")?;
        Ok(Self { client })
    }

    /// Commits: the lock goes.
    pub async fn release(self) -> Result<()> {
        self.client
            .batch_execute("COMMIT")
            .await
            .context("commit the long transaction")
    }
}
