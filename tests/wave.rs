//! The wave engine in-process against real PostgreSQL clusters.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla::bundle::Bundle;
use flotilla::dsn::Dsn;
use flotilla::failure::Retryability;
use flotilla::policy::{Canary, FailureBudget, Policy};
use flotilla::store::{ProgressStore, SledStore};
use flotilla::target::Tenant;
use flotilla::wave::{Engine, WaveStatus};
use flotilla::wave::{TenantState, WaveState};
use flotilla_testkit::{Cluster, shared, shared_second};

fn bundle(files: &[(&str, &str)]) -> Bundle {
    Bundle::from_sources(files, "test").expect("valid bundle")
}

/// Three scripts; V2 fails on tenants that have a `bad_marker` table; V1 sleeps `sleep`.
fn fleet_bundle(sleep: &str) -> Bundle {
    bundle(&[
        (
            "V1__users.sql",
            &format!("SELECT pg_sleep({sleep});\nCREATE TABLE users (id int PRIMARY KEY);"),
        ),
        (
            "V2__email.sql",
            "DO $$ BEGIN IF to_regclass('bad_marker') IS NOT NULL THEN RAISE EXCEPTION 'tenant is marked bad'; END IF; END $$;\nALTER TABLE users ADD COLUMN email text;",
        ),
        (
            "R__view.sql",
            "CREATE OR REPLACE VIEW emails AS SELECT email FROM users;",
        ),
    ])
}

async fn tenants(cluster: &Cluster, prefix: &str, n: usize) -> Vec<Tenant> {
    cluster
        .create_tenants(prefix, n, "")
        .await
        .expect("create tenants")
        .into_iter()
        .map(|db| Tenant {
            id: db.clone(),
            dsn: Dsn::parse(&cluster.url(&db)).expect("dsn"),
            labels: BTreeMap::new(),
        })
        .collect()
}

async fn mark_bad(cluster: &Cluster, t: &mut Tenant) {
    let c = cluster.connect(t.dsn.dbname()).await.expect("connect");
    c.batch_execute("CREATE TABLE bad_marker ()")
        .await
        .expect("marker");
    t.labels.insert("bad".into(), "1".into());
}

async fn unmark_bad(cluster: &Cluster, db: &str) {
    let c = cluster.connect(db).await.expect("connect");
    c.batch_execute("DROP TABLE bad_marker")
        .await
        .expect("unmark");
}

fn policy() -> Policy {
    Policy {
        concurrency: 8,
        backoff_base_ms: 100,
        backoff_max_ms: 1_000,
        ..Policy::default()
    }
}

async fn wait_for(
    engine: &Engine,
    id: &str,
    what: &str,
    pred: impl Fn(&WaveStatus) -> bool,
) -> WaveStatus {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("flotilla=debug")
        .try_init();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let s = engine.status(id).expect("status");
        if pred(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rows per version in the tenant's log; empty when it has no log.
async fn versions(cluster: &Cluster, db: &str) -> BTreeMap<Option<String>, i64> {
    let c = cluster.connect(db).await.expect("connect");
    match c
        .query(
            "SELECT version, count(*) FROM flotilla.execution_log WHERE status = 'applied' GROUP BY version",
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        Err(_) => BTreeMap::new(),
    }
}

fn exactly_once() -> BTreeMap<Option<String>, i64> {
    BTreeMap::from([
        (Some("1".to_string()), 1),
        (Some("2".to_string()), 1),
        (None, 1),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tenants_on_two_clusters_all_succeed_exactly_once() {
    let (a, b) = (shared(), shared_second());
    let mut all = tenants(a, "all_a_", 100).await;
    all.extend(tenants(b, "all_b_", 100).await);
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let id = engine
        .start_wave(
            fleet_bundle("0"),
            all.clone(),
            Policy {
                concurrency: 16,
                ..policy()
            },
            "test",
        )
        .expect("start");
    let s = wait_for(&engine, &id, "completion", |s| s.state.is_finished()).await;
    assert_eq!(s.state, WaveState::Completed, "{s:?}");
    assert_eq!((s.counts.total, s.counts.succeeded), (200, 200));
    for t in &all {
        let cluster = if t.id.starts_with("all_a_") { a } else { b };
        assert_eq!(versions(cluster, &t.id).await, exactly_once(), "{}", t.id);
    }
    engine.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_host_limit_holds_on_every_server() {
    let (a, b) = (shared(), shared_second());
    let mut all = tenants(a, "host_a_", 15).await;
    all.extend(tenants(b, "host_b_", 15).await);
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let p = Policy {
        concurrency: 12,
        per_host: Some(3),
        ..policy()
    };
    let id = engine
        .start_wave(fleet_bundle("0.3"), all, p, "test")
        .expect("start");
    let sa = a.connect("postgres").await.expect("sampler a");
    let sb = b.connect("postgres").await.expect("sampler b");
    // Sessions at work: a backend whose client has hung up stays listed, `idle`, until
    // its process has exited, which on a loaded machine can overlap the next tenant's
    // session. Counting only sessions running a statement or a transaction never
    // overcounts; V1 sleeps, so every tenant in flight is counted most of its time.
    let sample = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flotilla' \
                  AND datname LIKE 'host_%' AND state IN ('active', 'idle in transaction')";
    let (mut max_a, mut max_b) = (0i64, 0i64);
    while !engine.status(&id).expect("status").state.is_finished() {
        max_a = max_a.max(sa.query_one(sample, &[]).await.expect("sample").get(0));
        max_b = max_b.max(sb.query_one(sample, &[]).await.expect("sample").get(0));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        max_a <= 3 && max_b <= 3,
        "per-host limit broken: {max_a} / {max_b}"
    );
    assert!(
        max_a >= 2 && max_b >= 2,
        "the sampler saw concurrency: {max_a} / {max_b}"
    );
    assert_eq!(
        engine.status(&id).expect("status").state,
        WaveState::Completed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_starts_and_resume_finishes() {
    let cluster = shared();
    let all = tenants(cluster, "pause_", 40).await;
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let id = engine
        .start_wave(
            fleet_bundle("0.1"),
            all.clone(),
            Policy {
                concurrency: 4,
                ..policy()
            },
            "test",
        )
        .expect("start");
    wait_for(&engine, &id, "some progress", |s| s.counts.succeeded >= 6).await;
    let paused = engine
        .pause(&id, "alice", "looking at something")
        .expect("pause");
    let paused_at = paused.history.last().expect("history").at_ms;
    assert_eq!(paused.state, WaveState::Paused);
    assert_eq!(
        paused.history.last().map(|h| h.actor.as_str()),
        Some("alice")
    );
    let drained = wait_for(&engine, &id, "in-flight tenants to drain", |s| {
        s.counts.running == 0
    })
    .await;
    assert_eq!(drained.state, WaveState::Paused);
    assert!(drained.counts.pending > 0, "{drained:?}");
    // Hold the pause a moment so that a start during it would have a window to happen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resumed = engine
        .resume(&id, "alice", "", flotilla::wave::CanaryFailure::Refuse)
        .expect("resume");
    let resumed_at = resumed.history.last().expect("history").at_ms;
    let done = wait_for(&engine, &id, "completion", |s| s.state.is_finished()).await;
    assert_eq!(done.state, WaveState::Completed);

    let views = engine.tenants(&id, None, 0, 1000).expect("tenants");
    for v in &views {
        let started = v.started_at_ms.expect("started");
        assert!(
            started <= paused_at || started >= resumed_at,
            "{} started at {started}, while paused ({paused_at}..{resumed_at})",
            v.tenant_id
        );
    }
    // The tenants' own logs agree: nothing was applied during the pause except by
    // tenants that had started before it.
    let c = cluster.connect("postgres").await.expect("connect");
    for v in views
        .iter()
        .filter(|v| v.started_at_ms.is_some_and(|s| s >= resumed_at))
    {
        let t = cluster.connect(&v.tenant_id).await.expect("tenant");
        let first: i64 = t
            .query_one(
                "SELECT (extract(epoch FROM min(applied_at)) * 1000)::bigint FROM flotilla.execution_log",
                &[],
            )
            .await
            .expect("applied_at")
            .get(0);
        assert!(
            first as u64 >= resumed_at.saturating_sub(5),
            "{}: applied during pause",
            v.tenant_id
        );
    }
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_budget_pauses_the_wave_and_leaves_the_rest_untouched() {
    let cluster = shared();
    let mut all = tenants(cluster, "budget_", 30).await;
    for t in all[2..8].iter_mut() {
        mark_bad(cluster, t).await;
    }
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let p = Policy {
        concurrency: 2,
        retries: 0,
        max_failures: FailureBudget::Count(2),
        ..policy()
    };
    let id = engine
        .start_wave(fleet_bundle("0"), all.clone(), p, "test")
        .expect("start");
    let s = wait_for(&engine, &id, "the budget to pause the wave", |s| {
        s.state == WaveState::Paused && s.counts.running == 0
    })
    .await;
    let reason = s.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("failure budget exceeded: 3 of 30"),
        "{reason}"
    );
    assert_eq!(
        s.history.last().map(|h| h.actor.as_str()),
        Some("flotillad")
    );
    let pending = engine
        .tenants(&id, Some(TenantState::Pending), 0, 100)
        .expect("pending");
    assert!(pending.len() >= 20, "{pending:?}");
    for v in &pending {
        assert!(
            versions(cluster, &v.tenant_id).await.is_empty(),
            "{} was touched",
            v.tenant_id
        );
        assert_eq!(v.attempts, 0);
    }
    let failed = engine
        .tenants(&id, Some(TenantState::Failed), 0, 100)
        .expect("failed");
    assert!(failed.iter().all(|f| f.labels.contains_key("bad")));
    let err = failed[0].last_error.clone().expect("error");
    assert_eq!(err.script.as_deref(), Some("V2__email.sql"));
    assert_eq!(err.sqlstate.as_deref(), Some("P0001"));
    assert_eq!(err.retryability, Retryability::Permanent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_canary_keeps_every_other_tenant_untouched() {
    let cluster = shared();
    let mut all = tenants(cluster, "canary_", 12).await;
    for t in all.iter_mut().skip(5) {
        t.labels.insert("ring".into(), "canary".into());
    }
    mark_bad(cluster, &mut all[7]).await;
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let p = Policy {
        concurrency: 4,
        retries: 0,
        canary: Canary::Label {
            key: "ring".into(),
            value: "canary".into(),
        },
        max_failures: FailureBudget::Unlimited,
        ..policy()
    };
    let id = engine
        .start_wave(fleet_bundle("0"), all.clone(), p, "test")
        .expect("start");
    let s = wait_for(&engine, &id, "the canary to pause the wave", |s| {
        s.state == WaveState::Paused && s.counts.running == 0
    })
    .await;
    assert!(
        s.reason
            .as_deref()
            .unwrap_or("")
            .contains("canary tenant canary_00008 failed"),
        "{s:?}"
    );
    let views = engine.tenants(&id, None, 0, 100).expect("tenants");
    assert!(views[..7].iter().all(|v| v.canary), "canaries come first");
    for v in views.iter().filter(|v| !v.canary) {
        assert_eq!(v.state, TenantState::Pending);
        assert!(
            versions(cluster, &v.tenant_id).await.is_empty(),
            "{} was touched",
            v.tenant_id
        );
    }
}

#[test]
fn crash_mid_wave_then_resume_is_exactly_once_and_skips_finished_tenants() {
    let data = tempfile::tempdir().expect("tempdir");
    let setup = tokio::runtime::Runtime::new().expect("runtime");
    let cluster = shared();
    let all = setup.block_on(tenants(cluster, "crash_", 60));

    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let id = first.block_on(async {
        let engine = Engine::open(data.path()).expect("engine");
        let id = engine
            .start_wave(
                fleet_bundle("0.05"),
                all.clone(),
                Policy {
                    concurrency: 6,
                    ..policy()
                },
                "test",
            )
            .expect("start");
        wait_for(&engine, &id, "partial progress", |s| {
            s.counts.succeeded >= 15
        })
        .await;
        id
    });
    // No graceful shutdown: every task is dropped mid-flight.
    first.shutdown_background();

    // What the store says finished before the crash must not be contacted again: make
    // those databases refuse connections, so touching one fails the wave.
    let done: Vec<String> = {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let store = loop {
            match SledStore::open(data.path()) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "store not released: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        store
            .load_tenants(&id)
            .expect("tenants")
            .into_iter()
            .filter(|t| t.state == TenantState::Succeeded)
            .map(|t| t.tenant_id)
            .collect()
    };
    assert!(done.len() >= 10, "{done:?}");
    setup.block_on(async {
        let admin = cluster.connect("postgres").await.expect("admin");
        for db in &done {
            admin
                .batch_execute(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS false"))
                .await
                .expect("lock out");
        }
    });

    setup.block_on(async {
        let engine = Engine::open(data.path()).expect("reopen");
        let s = wait_for(&engine, &id, "the resumed wave to finish", |s| {
            s.state.is_finished()
        })
        .await;
        assert_eq!(s.state, WaveState::Completed, "{s:?}");
        assert_eq!(s.counts.succeeded, 60);
        engine.shutdown().await.expect("shutdown");
        let admin = cluster.connect("postgres").await.expect("admin");
        for db in &done {
            admin
                .batch_execute(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true"))
                .await
                .expect("let in");
        }
        for t in &all {
            assert_eq!(versions(cluster, &t.id).await, exactly_once(), "{}", t.id);
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_tenants_retry_and_finish_after_restart() {
    let killable = Cluster::start().expect("own cluster");
    let steady = shared_second();
    let mut all = tenants(&killable, "kill_a_", 20).await;
    all.extend(tenants(steady, "kill_b_", 20).await);
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let p = Policy {
        concurrency: 6,
        retries: 30,
        backoff_base_ms: 100,
        backoff_max_ms: 500,
        max_failures: FailureBudget::Unlimited,
        ..policy()
    };
    let id = engine
        .start_wave(fleet_bundle("0.1"), all.clone(), p, "test")
        .expect("start");
    wait_for(&engine, &id, "some progress", |s| s.counts.succeeded >= 4).await;
    killable.kill9().expect("kill -9");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let views = engine.tenants(&id, None, 0, 100).expect("tenants");
        if views.iter().any(|v| {
            v.tenant_id.starts_with("kill_a_")
                && v.last_error
                    .as_ref()
                    .is_some_and(|e| e.retryability == Retryability::Retryable)
        }) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retryable failure seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    killable.restart().expect("restart");
    let s = wait_for(&engine, &id, "completion", |s| s.state.is_finished()).await;
    assert_eq!(s.state, WaveState::Completed, "{s:?}");
    let views = engine.tenants(&id, None, 0, 100).expect("tenants");
    assert!(
        views
            .iter()
            .any(|v| v.tenant_id.starts_with("kill_a_") && v.attempts > 1)
    );
    assert!(
        views
            .iter()
            .filter(|v| v.tenant_id.starts_with("kill_b_"))
            .all(|v| v.attempts == 1),
        "the other server's tenants were unaffected"
    );
    for t in &all {
        let cluster = if t.id.starts_with("kill_a_") {
            &killable
        } else {
            steady
        };
        assert_eq!(versions(cluster, &t.id).await, exactly_once(), "{}", t.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_finishes_only_the_failed_tenants() {
    let cluster = shared_second();
    let mut all = tenants(cluster, "retry_", 20).await;
    for i in [1, 5, 9, 13, 17] {
        mark_bad(cluster, &mut all[i]).await;
    }
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let p = Policy {
        retries: 0,
        max_failures: FailureBudget::Unlimited,
        ..policy()
    };
    let id = engine
        .start_wave(fleet_bundle("0"), all.clone(), p, "test")
        .expect("start");
    let s = wait_for(&engine, &id, "the first pass", |s| s.state.is_finished()).await;
    assert_eq!(
        (s.state, s.counts.failed, s.counts.succeeded),
        (WaveState::Failed, 5, 15)
    );
    assert!(matches!(
        engine.resume(&id, "bob", "", flotilla::wave::CanaryFailure::Refuse),
        Err(flotilla::wave::EngineError::InvalidState { .. })
    ));

    for i in [1, 5, 9, 13, 17] {
        unmark_bad(cluster, &all[i].id).await;
    }
    let retried = engine
        .retry(&id, "bob", "fixed the markers")
        .expect("retry");
    assert_eq!(retried.state, WaveState::Running);
    let s = wait_for(&engine, &id, "the retry", |s| s.state.is_finished()).await;
    assert_eq!(s.state, WaveState::Completed, "{s:?}");
    for v in engine.tenants(&id, None, 0, 100).expect("tenants") {
        let was_bad = v.labels.contains_key("bad");
        assert_eq!(v.attempts, if was_bad { 2 } else { 1 }, "{}", v.tenant_id);
        assert_eq!(
            versions(cluster, &v.tenant_id).await,
            exactly_once(),
            "{}",
            v.tenant_id
        );
    }
    assert!(matches!(
        engine.retry(&id, "bob", ""),
        Err(flotilla::wave::EngineError::NothingToRetry(_))
    ));
}

/// Finished waves keep no tenant records in memory yet still list their tenants (read
/// from the store); a retry brings them back; past the retention a finished wave is
/// forgotten, in memory and in the store, and an unfinished one never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_waves_are_read_on_demand_and_forgotten_after_the_retention() {
    use flotilla::wave::EngineOptions;
    let cluster = shared();
    let mut fleet = tenants(cluster, "retain_", 3).await;
    mark_bad(cluster, &mut fleet[0]).await;
    let data = tempfile::tempdir().expect("tempdir");
    let options = EngineOptions {
        retention: Some(Duration::from_millis(1)),
        ..EngineOptions::default()
    };
    let engine = Engine::open_with(data.path(), options.clone()).expect("engine");
    let id = engine
        .start_wave(
            fleet_bundle("0"),
            fleet.clone(),
            Policy {
                max_failures: FailureBudget::Unlimited,
                retries: 0,
                ..policy()
            },
            "test",
        )
        .expect("start");
    let done = wait_for(&engine, &id, "finished", |s| s.state == WaveState::Failed).await;
    assert_eq!((done.counts.succeeded, done.counts.failed), (2, 1));
    let failed = engine
        .tenants(&id, Some(TenantState::Failed), 0, 10)
        .expect("tenants of a finished wave");
    assert_eq!(failed.len(), 1, "read from the store");
    assert_eq!(failed[0].tenant_id, fleet[0].id);

    // A retry hydrates the wave again; it fails again (still marked bad).
    engine.retry(&id, "test", "").expect("retry");
    wait_for(&engine, &id, "failed again", |s| {
        s.state == WaveState::Failed && s.counts.running == 0
    })
    .await;
    let all = engine.tenants(&id, None, 0, 10).expect("tenants");
    assert_eq!(
        all.iter().map(|t| t.attempts).sum::<u32>(),
        4,
        "one retried"
    );

    // An unfinished wave is never swept.
    let paused = engine
        .start_wave(fleet_bundle("0"), fleet[1..].to_vec(), policy(), "test")
        .expect("start");
    engine.pause(&paused, "test", "").expect("pause");
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(engine.sweep_retention(), 1, "only the finished wave");
    assert!(matches!(
        engine.status(&id),
        Err(flotilla::wave::EngineError::NotFound(_))
    ));
    assert!(engine.status(&paused).is_ok());
    engine.shutdown().await.expect("drain");
    drop(engine);
    let reopened = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Engine::open(data.path()) {
                Ok(e) => break e,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
    };
    assert!(reopened.status(&id).is_err(), "forgotten in the store too");
    assert!(reopened.status(&paused).is_ok());
}

/// Cancelling a wave with nothing in flight (here paused after its canary) records the
/// cancel (it used to panic once the finished wave let go of its tenants, losing the
/// cancel); and tenants in flight when a cancelled wave's daemon dies come back
/// CANCELLED, not PENDING for ever (issue 11, case 8).
#[test]
fn a_cancel_is_durable_whatever_was_in_flight() {
    let data = tempfile::tempdir().expect("tempdir");
    let setup = tokio::runtime::Runtime::new().expect("runtime");
    let cluster = shared();
    let fleet = setup.block_on(tenants(cluster, "cancel_", 6));
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    };

    // 1. Paused, nothing running: cancel.
    let first = runtime();
    let (paused_id, flying_id) = first.block_on(async {
        let engine = Engine::open(data.path()).expect("engine");
        let paused_id = engine
            .start_wave(
                fleet_bundle("0"),
                fleet[..3].to_vec(),
                Policy {
                    canary: Canary::Count { count: 1 },
                    after_canary: flotilla::policy::AfterCanary::Pause,
                    ..policy()
                },
                "test",
            )
            .expect("start");
        wait_for(&engine, &paused_id, "the canary pause", |s| {
            s.state == WaveState::Paused && s.counts.running == 0
        })
        .await;
        let cancelled = engine
            .cancel(&paused_id, "test", "not today")
            .expect("cancel");
        assert_eq!(cancelled.state, WaveState::Cancelled);
        assert_eq!(cancelled.counts.cancelled, 2, "{cancelled:?}");

        // 2. Tenants in flight (each sleeps 2 s) when the wave is cancelled and the
        //    daemon dies before they report.
        let flying_id = engine
            .start_wave(
                fleet_bundle("2"),
                fleet[3..].to_vec(),
                Policy {
                    concurrency: 3,
                    ..policy()
                },
                "test",
            )
            .expect("start");
        wait_for(&engine, &flying_id, "tenants in flight", |s| {
            s.counts.running == 3
        })
        .await;
        engine.cancel(&flying_id, "test", "").expect("cancel");
        (paused_id, flying_id)
    });
    first.shutdown_background();

    let second = runtime();
    second.block_on(async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let engine = loop {
            match Engine::open(data.path()) {
                Ok(e) => break e,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "reopen: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let paused = engine.status(&paused_id).expect("status");
        assert_eq!(paused.state, WaveState::Cancelled, "the cancel was stored");
        let flying = engine.status(&flying_id).expect("status");
        assert_eq!(flying.state, WaveState::Cancelled);
        assert_eq!(
            (
                flying.counts.pending,
                flying.counts.running,
                flying.counts.cancelled
            ),
            (0, 0, 3),
            "{flying:?}"
        );
    });
}

/// Issue 11, case 3. A canary label that matches no tenant is refused (it used to open
/// the gate for the whole fleet at once); a canary that fails while an operator has the
/// wave paused still counts (it used to be ignored, and `resume` passed the stage), and
/// resuming then needs the operator to accept the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_stage_cannot_be_skipped_by_accident() {
    use flotilla::wave::{CanaryFailure, EngineError};
    let cluster = shared();
    let mut all = tenants(cluster, "canskip_", 4).await;
    mark_bad(cluster, &mut all[0]).await;
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let refused = engine
        .start_wave(
            fleet_bundle("0"),
            all.clone(),
            Policy {
                canary: Canary::Label {
                    key: "ring".into(),
                    value: "canary".into(),
                },
                ..policy()
            },
            "test",
        )
        .expect_err("no tenant has ring=canary");
    assert!(refused.to_string().contains("ring=canary"), "{refused}");
    assert!(engine.list().is_empty(), "nothing stored");

    // The canary (the bad tenant, first by id) sleeps 3 s before it fails: the operator
    // pauses meanwhile.
    let slow_bad = bundle(&[
        (
            "V1__users.sql",
            "SELECT pg_sleep(CASE WHEN to_regclass('bad_marker') IS NULL THEN 0 ELSE 3 END);\n\
             CREATE TABLE users (id int PRIMARY KEY);",
        ),
        (
            "V2__email.sql",
            "DO $$ BEGIN IF to_regclass('bad_marker') IS NOT NULL THEN RAISE EXCEPTION 'tenant is marked bad'; END IF; END $$;",
        ),
    ]);
    let id = engine
        .start_wave(
            slow_bad,
            all.clone(),
            Policy {
                canary: Canary::Count { count: 1 },
                retries: 0,
                max_failures: FailureBudget::Unlimited,
                ..policy()
            },
            "test",
        )
        .expect("start");
    wait_for(&engine, &id, "the canary running", |s| {
        s.counts.running == 1
    })
    .await;
    engine.pause(&id, "alice", "lunch").expect("pause");
    let paused = wait_for(&engine, &id, "the canary's outcome", |s| {
        s.counts.failed == 1 && s.counts.running == 0
    })
    .await;
    assert_eq!(paused.state, WaveState::Paused);
    assert!(
        paused
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("canary tenant"),
        "{paused:?}"
    );
    let refused = engine
        .resume(&id, "alice", "", CanaryFailure::Refuse)
        .expect_err("a failed canary");
    assert!(
        matches!(refused, EngineError::CanaryFailed { .. }),
        "{refused}"
    );
    assert_eq!(engine.status(&id).expect("status").counts.pending, 3);
    engine
        .resume(&id, "alice", "go on", CanaryFailure::Accept)
        .expect("accepted");
    let done = wait_for(&engine, &id, "the rest", |s| s.state.is_finished()).await;
    assert_eq!(
        (done.counts.succeeded, done.counts.failed),
        (3, 1),
        "{done:?}"
    );
}

/// Issue 11, case 6. A tenant locked by someone else is busy with the reason recorded,
/// and fails once it has been busy longer than the policy's busy_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_is_not_forever() {
    let cluster = shared();
    let fleet = tenants(cluster, "busyfor_", 1).await;
    let (holder, conn) = tokio_postgres::connect(
        &format!(
            "{}?application_name=stuck-runner",
            cluster.url(&fleet[0].id)
        ),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    tokio::spawn(conn);
    holder
        .batch_execute(&format!(
            "SELECT pg_advisory_lock({})",
            flotilla::apply::log::LOCK_KEY
        ))
        .await
        .expect("hold the lock");
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let id = engine
        .start_wave(
            fleet_bundle("0"),
            fleet.clone(),
            Policy {
                busy_timeout_ms: 1_500,
                max_failures: FailureBudget::Unlimited,
                ..policy()
            },
            "test",
        )
        .expect("start");
    let busy = {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let t = engine.tenants(&id, None, 0, 1).expect("tenants").remove(0);
            if let Some(e) = &t.last_error {
                break e.clone();
            }
            assert!(std::time::Instant::now() < deadline, "a busy reason");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert!(busy.message.contains("stuck-runner"), "{busy:?}");
    let done = wait_for(&engine, &id, "busy_timeout", |s| s.state.is_finished()).await;
    assert_eq!(done.counts.failed, 1);
    let t = engine.tenants(&id, None, 0, 1).expect("tenants").remove(0);
    let e = t.last_error.expect("why");
    assert!(
        e.message.contains("busy_timeout") && e.message.contains("stuck-runner"),
        "{e:?}"
    );
    assert!(
        versions(cluster, &fleet[0].id).await.is_empty(),
        "never ran"
    );
}
