//! Blast radius (issue 14): how long an application waits on Flotilla. Per tenant, 8
//! client sessions update a hot table in a loop; one long transaction holds a lock
//! that the wave's `ALTER TABLE` needs for 5 s, so the application queues behind the
//! migration's lock request. The same wave runs twice, side by side: with the watchdog
//! at `max_block` 1 s, and with it effectively off (`max_block` at the maximum). Prints
//! the longest application query and the wave's duration of each, and the cost of the
//! watchdog's one query per server. Asserts nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla::bundle::Bundle;
use flotilla::dsn::Dsn;
use flotilla::policy::Policy;
use flotilla::target::Tenant;
use flotilla::wave::{Engine, WaveState};
use flotilla_testkit::Cluster;

const TENANTS: usize = 4;
const CLIENTS_PER_TENANT: i32 = 8;
const HOLD: Duration = Duration::from_secs(5);

const SEED: &str = "CREATE TABLE hot (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
INSERT INTO hot SELECT g, 0 FROM generate_series(1, 8) g;";

/// One run: the longest application query (ms) and the wave's duration.
async fn run(cluster: &Cluster, prefix: &str, max_block_ms: u64) -> (u64, Duration) {
    let dbs = cluster
        .create_tenants(prefix, TENANTS, SEED)
        .await
        .expect("tenants");
    let stop = Arc::new(AtomicBool::new(false));
    let longest = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    let mut readers = Vec::new();
    for db in &dbs {
        let reader = cluster.connect(db).await.expect("connect");
        reader
            .batch_execute("BEGIN; SELECT count(*) FROM hot;")
            .await
            .expect("long transaction");
        readers.push(tokio::spawn(async move {
            tokio::time::sleep(HOLD).await;
            reader.batch_execute("COMMIT").await.expect("commit");
        }));
        for id in 1..=CLIENTS_PER_TENANT {
            let (url, stop, longest) = (cluster.url(db), stop.clone(), longest.clone());
            clients.push(tokio::spawn(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("app connects");
                tokio::spawn(conn);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    client
                        .execute("UPDATE hot SET v = v + 1 WHERE id = $1", &[&id])
                        .await
                        .expect("app query");
                    longest.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let data = tempfile::tempdir().expect("data");
    let engine = Engine::open(data.path()).expect("engine");
    let bundle = Bundle::from_sources(
        &[("V1__note.sql", "ALTER TABLE hot ADD COLUMN note text;")],
        "blast",
    )
    .expect("bundle");
    let started = Instant::now();
    let id = engine
        .start_wave(
            bundle,
            dbs.iter()
                .map(|db| Tenant {
                    id: db.clone(),
                    dsn: Dsn::parse(&cluster.url(db)).expect("dsn"),
                    labels: Default::default(),
                })
                .collect(),
            Policy {
                concurrency: TENANTS as u32,
                retries: 50,
                backoff_base_ms: 200,
                backoff_max_ms: 500,
                lock_timeout_ms: 30_000,
                max_block_ms,
                ..Policy::default()
            },
            "bench",
        )
        .expect("start");
    loop {
        let s = engine.status(&id).expect("status");
        match s.state {
            WaveState::Completed => break,
            WaveState::Running => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("wave {other:?}: {s:?}"),
        }
    }
    let took = started.elapsed();
    for r in readers {
        r.await.expect("reader");
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client");
    }
    (longest.load(Ordering::Relaxed), took)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cluster = Cluster::start().expect("cluster");
    let (watched, watched_took) = run(&cluster, "blast_watched_", 1_000).await;
    let (unwatched, unwatched_took) = run(&cluster, "blast_unwatched_", 2_147_483_647).await;
    println!(
        "blast: {TENANTS} tenants x {CLIENTS_PER_TENANT} app sessions, a {HOLD:?} lock the ALTER waits for"
    );
    println!(
        "  watchdog on  (max_block 1 s): longest app query {watched} ms, wave {:.1} s",
        watched_took.as_secs_f64()
    );
    println!(
        "  watchdog off                : longest app query {unwatched} ms, wave {:.1} s",
        unwatched_took.as_secs_f64()
    );
    println!(
        "  target: no app query waits more than max_block + 0.5 s = 1500 ms: {}",
        if watched <= 1_500 { "met" } else { "missed" }
    );

    // The watchdog's cost: its one query per server per interval, with 64 watched pids.
    let c = cluster.connect("postgres").await.expect("connect");
    let pids: Vec<i32> = (1..=64).map(|p| 100_000 + p).collect();
    let sql = flotilla::guard::blocked_sql(&pids);
    let rounds = 500;
    let started = Instant::now();
    for _ in 0..rounds {
        c.simple_query(&sql).await.expect("watchdog query");
    }
    println!(
        "  watchdog query: {:.3} ms per server per interval (200 ms), 64 watched sessions",
        started.elapsed().as_secs_f64() * 1000.0 / f64::from(rounds)
    );
}
