//! The fleet benchmark (PRODUCT.md §7): one 5-script bundle over N tenant databases at
//! concurrency 16, once with Flotilla's wave engine (per-script and per-tenant modes) and
//! once with a minimal tokio-postgres "floor" client doing the same SQL, side by side in
//! one run on one cluster. Prints tenants/s, the ratios, and the engine's own CPU time
//! per tenant. Figures, not assertions: see benches/README.md.
//!
//! `FLEET_TENANTS` (default 1000) sets N.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::apply::TransactionMode;
use flotilla::dsn::Dsn;
use flotilla::policy::Policy;
use flotilla::target::Tenant;
use flotilla::wave::Engine;
use flotilla::wave::WaveState;
use flotilla_testkit::Cluster;

const CONCURRENCY: usize = 16;
const LOCK_KEY: i64 = 0x466c_6f74_696c_6c61;

/// The floor: lock, ensure and read the same log table (same DDL, same index), then
/// per script `BEGIN; script; INSERT log row; COMMIT` in one batch. Nothing else.
async fn floor_tenant(url: String) {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let conn = tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "SELECT pg_try_advisory_lock({LOCK_KEY});\n{}",
            flotilla::apply::log::ENSURE_SQL
        ))
        .await
        .expect("lock and ensure");
    let _ = client
        .simple_query("SELECT version, checksum, status FROM flotilla.execution_log")
        .await
        .expect("read");
    for (i, (name, sql)) in common::SCRIPTS.iter().enumerate() {
        client
            .batch_execute(&format!(
                "BEGIN; {sql}\n; INSERT INTO flotilla.execution_log (version, script, kind, checksum, bundle_id, wave_id, \
                 status, applied_at, applied_by, xact_id, duration_ms) VALUES ('{}', '{name}', 'versioned', 'x', 'b', 'w', \
                 'applied', clock_timestamp(), current_user, txid_current()::text, 0); COMMIT;",
                i + 1
            ))
            .await
            .expect("script");
    }
    drop(client);
    let _ = conn.await;
}

async fn run_floor(cluster: &Cluster, dbs: &[String]) -> (Duration, Duration) {
    let cpu_before = common::process_cpu();
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for db in dbs {
        let permit = sem.clone().acquire_owned().await.expect("permit");
        let url = cluster.url(db);
        tasks.push(tokio::spawn(async move {
            floor_tenant(url).await;
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

async fn run_engine(
    cluster: &Cluster,
    dbs: &[String],
    mode: TransactionMode,
) -> (Duration, Duration) {
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let tenants: Vec<Tenant> = dbs
        .iter()
        .map(|db| Tenant {
            id: db.clone(),
            dsn: Dsn::parse(&cluster.url(db)).expect("dsn"),
            labels: Default::default(),
        })
        .collect();
    let policy = Policy {
        concurrency: CONCURRENCY as u32,
        transaction: mode,
        ..Policy::default()
    };
    let cpu_before = common::process_cpu();
    let started = Instant::now();
    let id = engine
        .start_wave(common::bundle(), tenants, policy, "bench")
        .expect("start");
    let (_, mut events) = engine.watch(&id).expect("watch");
    loop {
        let s = engine.status(&id).expect("status");
        if s.state.is_finished() {
            assert_eq!(s.state, WaveState::Completed, "{s:?}");
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), events.recv()).await;
    }
    let elapsed = started.elapsed();
    let cpu = common::process_cpu().saturating_sub(cpu_before);
    engine.shutdown().await.expect("shutdown");
    (elapsed, cpu)
}

async fn fresh_tenants(cluster: &Cluster, prefix: &str, n: usize) -> Vec<String> {
    let started = Instant::now();
    let dbs = cluster
        .create_tenants(prefix, n, "")
        .await
        .expect("tenants");
    eprintln!(
        "  created {n} tenant databases in {:.1?}",
        started.elapsed()
    );
    dbs
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("FLEET_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    println!(
        "fleet bench: {n} tenants, 5 scripts, concurrency {CONCURRENCY}, {}",
        common::machine()
    );
    let cluster = Cluster::start().expect("cluster");

    // All databases first, so every run meets the same cluster state; no drops between
    // runs (a DROP DATABASE checkpoints and would tax whichever run follows it).
    let floor_dbs = fresh_tenants(&cluster, "floor_", n).await;
    let ps_dbs = fresh_tenants(&cluster, "ps_", n).await;
    let pt_dbs = fresh_tenants(&cluster, "pt_", n).await;
    let admin = cluster.connect("postgres").await.expect("admin");
    admin.batch_execute("CHECKPOINT").await.expect("checkpoint");

    // Rounds rotate the order of the three clients, so none is favoured by running first
    // or last on a disk that is still writing back the previous run.
    const ROUNDS: usize = 4;
    let chunk = n.div_ceil(ROUNDS);
    let (mut floor, mut cpu_floor) = (Duration::ZERO, Duration::ZERO);
    let (mut per_script, mut cpu_ps) = (Duration::ZERO, Duration::ZERO);
    let (mut per_tenant, mut cpu_pt) = (Duration::ZERO, Duration::ZERO);
    for round in 0..ROUNDS {
        let range = round * chunk..((round + 1) * chunk).min(n);
        for slot in 0..3 {
            match (slot + round) % 3 {
                0 => {
                    let (t, c) = run_floor(&cluster, &floor_dbs[range.clone()]).await;
                    floor += t;
                    cpu_floor += c;
                }
                1 => {
                    let (t, c) =
                        run_engine(&cluster, &ps_dbs[range.clone()], TransactionMode::PerScript)
                            .await;
                    per_script += t;
                    cpu_ps += c;
                }
                _ => {
                    let (t, c) =
                        run_engine(&cluster, &pt_dbs[range.clone()], TransactionMode::PerTenant)
                            .await;
                    per_tenant += t;
                    cpu_pt += c;
                }
            }
        }
    }

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "floor client            {:>8.1} tenants/s                cpu {:.3} ms/tenant",
        rate(floor),
        cpu_floor.as_secs_f64() * 1000.0 / n as f64
    );
    println!(
        "flotilla per-script     {:>8.1} tenants/s  ratio {:.3}  cpu {:.3} ms/tenant",
        rate(per_script),
        rate(per_script) / rate(floor),
        cpu_ps.as_secs_f64() * 1000.0 / n as f64
    );
    println!(
        "flotilla per-tenant     {:>8.1} tenants/s  ratio {:.3}  cpu {:.3} ms/tenant",
        rate(per_tenant),
        rate(per_tenant) / rate(floor),
        cpu_pt.as_secs_f64() * 1000.0 / n as f64
    );
}
