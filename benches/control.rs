//! Control under load (PRODUCT.md §7): status-call latency while a wave runs at
//! concurrency 64, and whether any tenant starts after a pause is acknowledged. Drives a
//! real `flotillad` process over gRPC, as operators do. Prints figures; asserts nothing.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla::api::v1;
use flotilla::api::v1::rollout_service_client::RolloutServiceClient;
use flotilla_testkit::{Cluster, Daemon};

const TENANTS: usize = 600;
const CONCURRENCY: u32 = 64;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cluster = Cluster::start().expect("cluster");
    let dbs = cluster
        .create_tenants("ctl_", TENANTS, "")
        .await
        .expect("tenants");
    let data = tempfile::tempdir().expect("data");
    let daemon = Daemon::start(data.path(), &[]).expect("flotillad (cargo bench builds it)");
    let mut client = RolloutServiceClient::connect(daemon.url())
        .await
        .expect("connect");
    // Each tenant holds its session ~100 ms, so the wave keeps 64 in flight for a while.
    let bundle = flotilla::bundle::Bundle::from_sources(
        &[
            ("V1__t.sql", "CREATE TABLE t (id int);"),
            ("V2__wait.sql", "SELECT pg_sleep(0.1);"),
        ],
        "control bench",
    )
    .expect("bundle");
    let wave_id = client
        .start_wave(v1::StartWaveRequest {
            bundle: Some(flotilla::api::convert::bundle_to_proto(&bundle)),
            targets: Some(v1::start_wave_request::Targets::TargetList(
                v1::TargetList {
                    tenants: dbs
                        .iter()
                        .map(|db| v1::Tenant {
                            tenant_id: db.clone(),
                            dsn: cluster.url(db),
                            labels: Default::default(),
                        })
                        .collect(),
                },
            )),
            policy: Some(v1::Policy {
                concurrency: CONCURRENCY,
                ..Default::default()
            }),
        })
        .await
        .expect("start")
        .into_inner()
        .wave_id;

    // Status calls, back to back with a short pause, until half the wave is done.
    let mut latencies = Vec::new();
    let mut max_running = 0;
    loop {
        let t = Instant::now();
        let wave = client
            .get_wave(v1::GetWaveRequest {
                wave_id: wave_id.clone(),
            })
            .await
            .expect("status")
            .into_inner();
        latencies.push(t.elapsed());
        let c = wave.tenants.unwrap_or_default();
        max_running = max_running.max(c.running);
        if c.succeeded + c.failed >= TENANTS as u64 / 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    latencies.sort();

    // Pause; then no tenant may have started after the acknowledgement.
    let before_pause = SystemTime::now();
    client
        .pause_wave(v1::WaveActionRequest {
            wave_id: wave_id.clone(),
            reason: "bench".into(),
            ..Default::default()
        })
        .await
        .expect("pause");
    let acked = SystemTime::now();
    let pause_rtt = acked.duration_since(before_pause).unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked_ms = acked
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    let mut started_after = 0;
    let mut token = String::new();
    loop {
        let page = client
            .list_wave_tenants(v1::ListWaveTenantsRequest {
                wave_id: wave_id.clone(),
                state: 0,
                page_size: 1000,
                page_token: token,
            })
            .await
            .expect("tenants")
            .into_inner();
        started_after += page
            .tenants
            .iter()
            .filter(|t| {
                t.started_at
                    .as_ref()
                    .is_some_and(|s| s.seconds * 1000 + i64::from(s.nanos / 1_000_000) > acked_ms)
            })
            .count();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let status = client
        .get_wave(v1::GetWaveRequest {
            wave_id: wave_id.clone(),
        })
        .await
        .expect("status")
        .into_inner();
    println!(
        "control bench: {TENANTS} tenants, concurrency {CONCURRENCY} (max seen running {max_running}), {} status calls",
        latencies.len()
    );
    println!(
        "status latency  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms   (target: p99 < 20 ms)",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!(
        "pause answered in {:.2} ms; tenants started after the acknowledgement: {started_after} (target: 0); state {}, running {}",
        pause_rtt.as_secs_f64() * 1e3,
        v1::WaveState::try_from(status.state)
            .map(|s| s.as_str_name())
            .unwrap_or("?"),
        status.tenants.unwrap_or_default().running
    );
}
