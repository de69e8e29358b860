//! Resume of a finished 10,000-tenant wave (PRODUCT.md §7): synthetic records in a real
//! sled store, no database. Times opening the engine until it has decided nothing is left:
//! once for a wave recorded COMPLETED, once for a wave still recorded RUNNING whose
//! tenants all SUCCEEDED (the dispatcher must finish it without contacting anyone — every
//! DSN points at a closed port, so a contact would fail the wave).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla::policy::Policy;
use flotilla::secret::Sealer;
use flotilla::store::{FORMAT, ProgressStore, SledStore, TenantRecord, WaveRecord};
use flotilla::wave::{Engine, TenantState, WaveState};

const TENANTS: u32 = 10_000;

fn seed(dir: &std::path::Path, state: WaveState) -> String {
    let store = SledStore::open(dir).expect("store");
    let sealer = Sealer::open_or_create(&dir.join("secret.key")).expect("key");
    let bundle = common::bundle();
    store.save_bundle(&bundle).expect("bundle");
    let id = format!("wave-{state:?}");
    let wave = WaveRecord {
        format: FORMAT,
        id: id.clone(),
        bundle_id: bundle.id().to_string(),
        policy: Policy::default(),
        state,
        reason: None,
        created_at_ms: 0,
        canary_passed: true,
        history: vec![],
        fleet: None,
        stages: Vec::new(),
        stage_open: 0,
    };
    let tenants: Vec<TenantRecord> = (0..TENANTS)
        .map(|seq| TenantRecord {
            format: FORMAT,
            seq,
            tenant_id: format!("tenant_{seq:05}"),
            dsn_sealed: sealer.seal(&format!(
                "postgresql://app:secret@127.0.0.1:1/tenant_{seq:05}"
            )),
            dsn_redacted: format!("postgresql://app@127.0.0.1:1/tenant_{seq:05}"),
            host: "127.0.0.1:1".into(),
            labels: BTreeMap::from([("region".into(), "eu".into())]),
            canary: false,
            state: TenantState::Succeeded,
            attempts: 1,
            retries_used: 0,
            generation: 1,
            last_error: None,
            busy_since_ms: None,
            started_at_ms: Some(1),
            finished_at_ms: Some(2),
            baselined: 0,
            rows_changed: 0,
        })
        .collect();
    store.create_wave(&wave, &tenants).expect("wave");
    id
}

async fn time_resume(state: WaveState) -> (Duration, WaveState) {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = seed(dir.path(), state);
    let started = Instant::now();
    let engine = Engine::open(dir.path()).expect("open");
    let final_state = loop {
        let s = engine.status(&id).expect("status");
        if s.state.is_finished() {
            break s.state;
        }
        tokio::task::yield_now().await;
    };
    let elapsed = started.elapsed();
    engine.shutdown().await.expect("shutdown");
    (elapsed, final_state)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("resume bench: {TENANTS} tenants, {}", common::machine());
    for state in [WaveState::Completed, WaveState::Running] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let (t, end) = time_resume(state).await;
            assert_eq!(end, WaveState::Completed, "no tenant may be contacted");
            times.push(t);
        }
        times.sort();
        println!(
            "recorded {:<9} -> decided in median {:>7.1} ms (min {:.1}, max {:.1}), target < 1000 ms",
            state.as_str(),
            times[2].as_secs_f64() * 1000.0,
            times[0].as_secs_f64() * 1000.0,
            times[4].as_secs_f64() * 1000.0
        );
    }
}
