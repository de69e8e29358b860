//! The backfill benchmark (issue 19): a 200,000-row table backfilled two ways while an
//! application session keeps updating single rows of the same table (random ids, as an
//! application would), side by side in one run:
//! - as one `UPDATE` (what a plain migration does): one long transaction;
//! - as a `-- flotilla:batch` script of 1,000 rows per run, through the applier.
//!
//! Prints each way's duration, the mean run duration of the batches, and the
//! application's update latency (p50, p99, max): with batches an application update
//! waits at most about one run (it queues only behind the rows of the run in flight),
//! with one statement it can wait for the whole backfill. Figures, not assertions: see
//! benches/README.md. `BACKFILL_ROWS` (default 200000) sets the table size.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flotilla::apply::{Outcome, PlanOptions, StopSignal, TenantRun, TransactionMode, apply_tenant};
use flotilla::bundle::Bundle;
use flotilla::connect::SessionSettings;
use flotilla::dsn::Dsn;
use flotilla_testkit::Cluster;

const BATCH: usize = 1000;

fn setup(rows: usize) -> String {
    format!(
        "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, hits int NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false);
         INSERT INTO items (id) SELECT g FROM generate_series(1, {rows}) g;
         ANALYZE items;"
    )
}

const STATEMENT: &str = "UPDATE items SET n = n + 1, done = true WHERE id IN \
     (SELECT id FROM items WHERE NOT done ORDER BY id LIMIT {BATCH})";

/// An application session updating one random row at a time until `stop`; the
/// latency of each update.
async fn application(url: String, rows: usize, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let update = client
        .prepare("UPDATE items SET hits = hits + 1 WHERE id = $1")
        .await
        .expect("prepare");
    let mut latencies = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let id = fastrand::i32(1..=rows as i32);
        let started = Instant::now();
        client.execute(&update, &[&id]).await.expect("update");
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(label: &str, took: Duration, mut latencies: Vec<Duration>, extra: &str) {
    latencies.sort();
    println!(
        "{label:<28} {:>8.0} ms   app updates {:>6}  p50 {:>7.2} ms  p99 {:>8.2} ms  max {:>8.2} ms{extra}",
        took.as_secs_f64() * 1000.0,
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rows: usize = std::env::var("BACKFILL_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    println!(
        "backfill bench: {rows} rows, batches of {BATCH}, one application session updating random rows, {}",
        common::machine()
    );
    let cluster = Cluster::start().expect("cluster");
    let dbs = cluster
        .create_tenants("bf_", 2, &setup(rows))
        .await
        .expect("tenants");
    let urls: Vec<String> = dbs
        .iter()
        .map(|db| format!("{}?sslmode=disable", cluster.url(db)))
        .collect();
    let statement = STATEMENT.replace("{BATCH}", &BATCH.to_string());

    // One statement, one transaction.
    let stop = Arc::new(AtomicBool::new(false));
    let app = tokio::spawn(application(urls[0].clone(), rows, stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (client, conn) = tokio_postgres::connect(&urls[0], tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let whole = statement.replace(&format!("LIMIT {BATCH}"), "");
    let started = Instant::now();
    client.batch_execute(&whole).await.expect("one update");
    let one_took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    report("one UPDATE", one_took, app.await.expect("app"), "");

    // Batched, through the applier.
    let script = format!("-- flotilla:batch\n{statement};");
    let bundle =
        Bundle::from_sources(&[("V1__backfill.sql", script.as_str())], "bench").expect("bundle");
    let dsn = Dsn::parse(&urls[1]).expect("dsn");
    let stop = Arc::new(AtomicBool::new(false));
    let app = tokio::spawn(application(urls[1].clone(), rows, stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let run = TenantRun {
        bundle: &bundle,
        wave_id: "bench",
        dsn: &dsn,
        reach: &flotilla::reach::Reach::default(),
        settings: SessionSettings::default(),
        mode: TransactionMode::PerScript,
        plan_options: PlanOptions::default(),
        prior: None,
        guard: None,
        max_block: Duration::from_secs(1),
        undo: flotilla::apply::Undo::None,
    };
    let started = Instant::now();
    let outcome = apply_tenant(&run, &StopSignal::new()).await;
    let batched_took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let Outcome::Applied { scripts, .. } = outcome else {
        panic!("backfill: {outcome:?}")
    };
    let changed = scripts[0].rows.unwrap_or(0);
    let runs = changed.div_ceil(BATCH as u64).max(1);
    let mean_run = batched_took / runs as u32;
    report(
        "batches (flotilla:batch)",
        batched_took,
        app.await.expect("app"),
        &format!(
            "   {runs} runs, mean {:.2} ms/run, {changed} rows",
            mean_run.as_secs_f64() * 1000.0
        ),
    );
}
