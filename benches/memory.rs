//! Resident memory of a 10,000-tenant wave (PRODUCT.md §7). Ten thousand tenant ids
//! spread over 64 real databases on one cluster (tenant i uses database i mod 64, so two
//! runs on one database rarely overlap; when they do the second is Busy and requeued, as
//! in production). The first run per database applies the bundle, the rest find it up to
//! date: every tenant still connects, locks, reads its log and is recorded. Prints the
//! process's resident set before, at its peak, and after.

mod common;

use std::time::{Duration, Instant};

use flotilla::dsn::Dsn;
use flotilla::policy::Policy;
use flotilla::target::Tenant;
use flotilla::wave::Engine;
use flotilla_testkit::Cluster;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("MEMORY_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    println!(
        "memory bench: {n} tenants over 64 databases, {}",
        common::machine()
    );
    let cluster = Cluster::start().expect("cluster");
    let dbs = cluster.create_tenants("mem_", 64, "").await.expect("dbs");
    let tenants: Vec<Tenant> = (0..n)
        .map(|i| Tenant {
            id: format!("tenant_{i:05}"),
            dsn: Dsn::parse(&cluster.url(&dbs[i % dbs.len()])).expect("dsn"),
            labels: Default::default(),
        })
        .collect();
    let (before, _) = common::rss_mib();
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let started = Instant::now();
    let id = engine
        .start_wave(
            common::bundle(),
            tenants,
            Policy {
                concurrency: 16,
                ..Policy::default()
            },
            "bench",
        )
        .expect("start");
    let mut sampled_peak: f64 = 0.0;
    loop {
        let s = engine.status(&id).expect("status");
        sampled_peak = sampled_peak.max(common::rss_mib().0);
        if s.state.is_finished() {
            println!(
                "wave {} in {:.1?}: {:?}",
                s.state.as_str(),
                started.elapsed(),
                s.counts
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    engine.shutdown().await.expect("shutdown");
    let (after, hwm) = common::rss_mib();
    println!(
        "resident: before {before:.1} MiB, peak sampled {sampled_peak:.1} MiB, peak (VmHWM) {hwm:.1} MiB, after {after:.1} MiB; target < 150 MB"
    );
}
