//! Blast radius (issue 14): how long an application waits on Flotilla. Per tenant, 8
//! client sessions update a hot table in a loop; one long transaction holds a lock
//! that the wave's `ALTER TABLE` needs for 5 s, so the application queues behind the
//! migration's lock request. The same wave runs twice, side by side: with the watchdog
//! at `max_block` 1 s, and with it effectively off (`max_block` at the maximum). Prints
//! the longest application query and the wave's duration of each, and the cost of the
//! watchdog's one query per server. Asserts nothing.

use std::time::{Duration, Instant};

use flotilla::bundle::Bundle;
use flotilla::dsn::Dsn;
use flotilla::policy::Policy;
use flotilla::target::Tenant;
use flotilla::wave::{Engine, WaveState};
use flotilla_testkit::Cluster;
use flotilla_testkit::load::{AppLoad, HOT_TABLE_SQL, LongReader};

const TENANTS: usize = 4;
const CLIENTS_PER_TENANT: i32 = 8;
const HOLD: Duration = Duration::from_secs(5);

/// One run: the longest application query (ms) and the wave's duration.
async fn run(cluster: &Cluster, prefix: &str, max_block_ms: u64) -> (u64, Duration) {
    let dbs = cluster
        .create_tenants(prefix, TENANTS, HOT_TABLE_SQL)
        .await
        .expect("tenants");
    let mut readers = Vec::new();
    let mut loads = Vec::new();
    for db in &dbs {
        readers.push(LongReader::start(cluster, db).await.expect("reader"));
        loads.push(
            AppLoad::start(cluster, db, CLIENTS_PER_TENANT)
                .await
                .expect("load"),
        );
    }
    // The readers commit after HOLD, whatever the wave is doing.
    let release = tokio::spawn(async move {
        tokio::time::sleep(HOLD).await;
        for r in readers {
            r.release().await.expect("release");
        }
    });
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
    release.await.expect("readers");
    let mut longest = 0;
    for load in loads {
        longest = longest.max(load.stop().await.expect("load"));
    }
    (longest, took)
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
