//! The census benchmark (issue 13): a census of N tenants on one server at concurrency
//! 16, without and with schema fingerprints, side by side in one run with the floor: a
//! plain tokio-postgres loop doing `SELECT max(version) FROM flotilla.execution_log` per
//! tenant at the same concurrency. Prints tenants/s, the ratios and CPU per tenant, then
//! the server time of the fingerprint query on a tenant of 100 tables (`EXPLAIN
//! ANALYZE`, median of 15). Figures, not assertions: see benches/README.md.
//!
//! `CENSUS_TENANTS` (default 1000) sets N.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::census::{self, CensusOptions, CensusState};
use flotilla::dsn::Dsn;
use flotilla::reach::Reach;
use flotilla::target::Tenant;
use flotilla_testkit::Cluster;

const CONCURRENCY: usize = 16;

/// A tenant as a small SaaS would have it: a migrated log of five versions and `tables`
/// tables with keys, an index, a check and a foreign key each.
fn schema(tables: usize) -> String {
    let mut sql = String::from(flotilla::apply::log::ENSURE_SQL);
    for v in 1..=5 {
        sql.push_str(&format!(
            "INSERT INTO flotilla.execution_log (version, script, kind, checksum, bundle_id, \
             wave_id, status, applied_at) VALUES ('{v}', 'V{v}__s.sql', 'versioned', \
             'sha256:{v}', 'b', 'w', 'applied', now());\n"
        ));
    }
    sql.push_str("CREATE TABLE t0 (id bigserial PRIMARY KEY);\n");
    for i in 1..tables {
        sql.push_str(&format!(
            "CREATE TABLE t{i} (id bigserial PRIMARY KEY, parent bigint REFERENCES t{p} (id), \
             name text NOT NULL DEFAULT '', amount numeric CHECK (amount >= 0), \
             created timestamptz DEFAULT now());\n\
             CREATE INDEX t{i}_parent ON t{i} (parent);\n",
            p = i - 1
        ));
    }
    sql
}

async fn floor(urls: &[String]) -> (Duration, Duration) {
    let cpu_before = common::process_cpu();
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for url in urls {
        let permit = sem.clone().acquire_owned().await.expect("permit");
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            let conn = tokio::spawn(conn);
            let _ = client
                .simple_query("SELECT max(version) FROM flotilla.execution_log")
                .await
                .expect("read");
            drop(client);
            let _ = conn.await;
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.expect("floor task");
    }
    (
        started.elapsed(),
        common::process_cpu().saturating_sub(cpu_before),
    )
}

async fn flotilla_census(tenants: &[Tenant], fingerprint: bool) -> (Duration, Duration) {
    let options = CensusOptions {
        concurrency: CONCURRENCY,
        per_host: CONCURRENCY,
        fingerprint,
    };
    let cpu_before = common::process_cpu();
    let started = Instant::now();
    let census = census::take(
        "bench",
        tenants.to_vec(),
        None,
        &options,
        &Reach::default(),
        flotilla::census::CensusTrigger::Request,
    )
    .await;
    let elapsed = started.elapsed();
    let cpu = common::process_cpu().saturating_sub(cpu_before);
    assert_eq!(
        census.count(CensusState::Current),
        tenants.len() as u64,
        "every tenant read: {:?}",
        census.states
    );
    (elapsed, cpu)
}

/// Median server time (planning + execution) of the fingerprint query on `url`.
async fn fingerprint_server_ms(url: &str) -> f64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute("SET search_path = pg_catalog, pg_temp")
        .await
        .expect("pin search_path");
    let mut times = Vec::new();
    for _ in 0..15 {
        let rows = client
            .simple_query(&format!(
                "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {}",
                census::fingerprint::FINGERPRINT_SQL
            ))
            .await
            .expect("explain");
        let text = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .expect("a plan");
        let plan: serde_json::Value = serde_json::from_str(&text).expect("json plan");
        let ms = plan[0]["Planning Time"].as_f64().unwrap_or(0.0)
            + plan[0]["Execution Time"].as_f64().unwrap_or(0.0);
        times.push(ms);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("CENSUS_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    println!(
        "census bench: {n} tenants of 20 tables on one server, concurrency {CONCURRENCY}, {}",
        common::machine()
    );
    let cluster = Cluster::start().expect("cluster");
    let started = Instant::now();
    let dbs = cluster
        .create_tenants("c_", n, &schema(20))
        .await
        .expect("tenants");
    eprintln!(
        "  created {n} tenant databases in {:.1?}",
        started.elapsed()
    );
    let urls: Vec<String> = dbs
        .iter()
        .map(|db| format!("{}?sslmode=disable", cluster.url(db)))
        .collect();
    let tenants: Vec<Tenant> = dbs
        .iter()
        .zip(&urls)
        .map(|(db, url)| Tenant {
            id: db.clone(),
            dsn: Dsn::parse(url).expect("dsn"),
            labels: Default::default(),
        })
        .collect();
    let admin = cluster.connect("postgres").await.expect("admin");
    admin.batch_execute("CHECKPOINT").await.expect("checkpoint");

    // Reads change nothing: every run reads every tenant; rounds rotate the order.
    const ROUNDS: usize = 3;
    let mut totals = [(Duration::ZERO, Duration::ZERO); 3];
    for round in 0..ROUNDS {
        for slot in 0..3 {
            let which = (slot + round) % 3;
            let (t, c) = match which {
                0 => floor(&urls).await,
                1 => flotilla_census(&tenants, false).await,
                _ => flotilla_census(&tenants, true).await,
            };
            totals[which].0 += t;
            totals[which].1 += c;
        }
    }
    let reads = (n * ROUNDS) as f64;
    let rate = |d: Duration| reads / d.as_secs_f64();
    let cpu = |d: Duration| d.as_secs_f64() * 1000.0 / reads;
    println!(
        "floor (max(version))        {:>8.1} tenants/s               cpu {:.3} ms/tenant",
        rate(totals[0].0),
        cpu(totals[0].1)
    );
    println!(
        "census                      {:>8.1} tenants/s  ratio {:.3}  cpu {:.3} ms/tenant",
        rate(totals[1].0),
        rate(totals[1].0) / rate(totals[0].0),
        cpu(totals[1].1)
    );
    println!(
        "census --fingerprint        {:>8.1} tenants/s  ratio {:.3}  cpu {:.3} ms/tenant",
        rate(totals[2].0),
        rate(totals[2].0) / rate(totals[0].0),
        cpu(totals[2].1)
    );

    let big = cluster
        .create_tenants("c100_", 1, &schema(100))
        .await
        .expect("a tenant of 100 tables")
        .remove(0);
    println!(
        "fingerprint query, tenant of 100 tables: {:.1} ms server time (median of 15)",
        fingerprint_server_ms(&cluster.url(&big)).await
    );
}
