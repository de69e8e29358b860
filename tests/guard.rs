//! The lock-queue watchdog (issue 14) against real PostgreSQL, with a real application
//! load: client sessions updating a table while a long transaction holds a lock that a
//! migration's `ALTER TABLE` must wait for, so the application's queries queue behind
//! Flotilla's waiting request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flotilla::apply::{
    ApplyError, Outcome, PlanOptions, StopSignal, TenantRun, TransactionMode, apply_tenant,
};
use flotilla::bundle::Bundle;
use flotilla::connect::SessionSettings;
use flotilla::dsn::Dsn;
use flotilla::failure::Retryability;
use flotilla::guard::Guard;
use flotilla::policy::Policy;
use flotilla::target::Tenant;
use flotilla::wave::{Engine, TenantState, WaveState};
use flotilla_testkit::load::{AppLoad, HOT_TABLE_SQL, LongReader};
use flotilla_testkit::{Cluster, shared};

fn alter() -> Bundle {
    Bundle::from_sources(
        &[("V1__note.sql", "ALTER TABLE hot ADD COLUMN note text;")],
        "test",
    )
    .expect("valid")
}

async fn tenant(cluster: &Cluster, prefix: &str) -> (String, Dsn) {
    let db = cluster
        .create_tenants(prefix, 1, HOT_TABLE_SQL)
        .await
        .expect("tenant")
        .remove(0);
    let dsn = Dsn::parse(&cluster.url(&db)).expect("dsn");
    (db, dsn)
}

async fn run(bundle: &Bundle, dsn: &Dsn, guard: Option<Arc<Guard>>) -> Outcome {
    let run = TenantRun {
        bundle,
        wave_id: "wave-guard",
        dsn,
        reach: &flotilla::reach::Reach::default(),
        // Long enough that, unwatched, the ALTER waits for the reader to finish.
        settings: SessionSettings {
            lock_timeout: Duration::from_secs(30),
            ..SessionSettings::default()
        },
        mode: TransactionMode::PerScript,
        plan_options: PlanOptions::default(),
        prior: None,
        guard,
        max_block: Duration::from_millis(300),
        undo: flotilla::apply::Undo::None,
    };
    apply_tenant(&run, &StopSignal::new()).await
}

/// Watched, the migration's statement is cancelled once an application query has
/// waited on it past `max_block`: a retryable failure naming the waiting backend, with
/// nothing applied; once the reader is gone, the same run applies. Unwatched, the same
/// migration waits for the reader (and the application with it) and then applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_cancels_a_migration_that_keeps_the_application_waiting() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "guard_watched_").await;
    let guard = Guard::with_interval(
        flotilla::reach::Reach::default(),
        Duration::from_millis(100),
    );
    let reader = LongReader::start(cluster, &db).await.expect("reader");
    let load = AppLoad::start(cluster, &db, 4).await.expect("load");
    let outcome = run(&alter(), &dsn, Some(guard.clone())).await;
    match &outcome {
        Outcome::Failed { scripts, error } => {
            assert!(scripts.is_empty(), "{scripts:?}");
            assert!(matches!(error, ApplyError::Script { .. }), "{error}");
            let text = error.to_string();
            assert!(
                text.contains("lock watchdog") && text.contains("over max_block 300 ms"),
                "{text}"
            );
            assert_eq!(error.retryability(), Retryability::Retryable);
        }
        other => panic!("expected the watchdog to cancel the migration, got {other:?}"),
    }
    let c = cluster.connect(&db).await.expect("connect");
    let has_note: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'hot'::regclass AND attname = 'note')",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert!(!has_note, "the ALTER rolled back");
    reader.release().await.expect("release");
    assert!(matches!(
        run(&alter(), &dsn, Some(guard.clone())).await,
        Outcome::Applied { .. }
    ));
    let watched_longest = load.stop().await.expect("load");

    // The same, unwatched: the ALTER waits the reader out, and the application with it.
    let (db, dsn) = tenant(cluster, "guard_unwatched_").await;
    let reader = LongReader::start(cluster, &db).await.expect("reader");
    let load = AppLoad::start(cluster, &db, 4).await.expect("load");
    let unwatched = tokio::spawn({
        let dsn = dsn.clone();
        async move { run(&alter(), &dsn, None).await }
    });
    // Released once the application has queued behind the waiting ALTER.
    let admin = cluster.connect("postgres").await.expect("admin");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                 AND wait_event_type = 'Lock' AND application_name <> 'flotilla'",
                &[&db],
            )
            .await
            .expect("activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the application never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.release().await.expect("release");
    assert!(matches!(
        unwatched.await.expect("join"),
        Outcome::Applied { .. }
    ));
    let unwatched_longest = load.stop().await.expect("load");
    // Figures, not assertions (the machine is shared): `benches/blast.rs` measures.
    eprintln!(
        "longest application query: {watched_longest} ms watched, {unwatched_longest} ms unwatched"
    );
    // The side session closes after the last run has gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while guard.watched_hosts() > 0 {
        assert!(
            Instant::now() < deadline,
            "the watchdog's side session lingers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A wave: the watchdog's failure is retried with backoff, and the wave completes once
/// the long transaction is over; the tenant took more than one attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_retries_past_a_blocked_migration_and_completes() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "guard_wave_").await;
    let reader = LongReader::start(cluster, &db).await.expect("reader");
    let load = AppLoad::start(cluster, &db, 4).await.expect("load");
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let policy = Policy {
        concurrency: 1,
        retries: 20,
        backoff_base_ms: 200,
        backoff_max_ms: 500,
        lock_timeout_ms: 20_000,
        max_block_ms: 300,
        ..Policy::default()
    };
    let id = engine
        .start_wave(
            alter(),
            vec![Tenant {
                id: db.clone(),
                dsn,
                labels: Default::default(),
            }],
            policy,
            "test",
        )
        .expect("start");
    // The reader goes once the watchdog has cancelled the migration at least once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = engine.tenants(&id, None, 0, 1).expect("tenants").remove(0);
        if t.attempts > 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never retried: {t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader.release().await.expect("release");
    loop {
        let s = engine.status(&id).expect("status");
        if s.state == WaveState::Completed {
            break;
        }
        assert!(
            Instant::now() < deadline && s.state == WaveState::Running,
            "{s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.stop().await.expect("load");
    let tenants = engine
        .tenants(&id, Some(TenantState::Succeeded), 0, 10)
        .expect("tenants");
    assert!(tenants[0].attempts > 1, "{:?}", tenants[0]);
}

/// Health gates (issue 14): a gate SQL that says `false` on one server holds that
/// server's tenants only (visible in the wave's status), the other server's go on;
/// once the gate opens the held tenants start; a server held past `max_hold` pauses
/// the wave with the hold's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gate_holds_its_server_only_and_a_long_hold_pauses_the_wave() {
    let (a, b) = (shared(), flotilla_testkit::shared_second());
    let open_dbs = a
        .create_tenants("gate_open_", 2, "")
        .await
        .expect("tenants");
    let held_dbs = b
        .create_tenants("gate_held_", 2, "CREATE TABLE hold_me ();")
        .await
        .expect("tenants");
    let tenants: Vec<Tenant> = open_dbs
        .iter()
        .map(|db| (a, db))
        .chain(held_dbs.iter().map(|db| (b, db)))
        .map(|(c, db)| Tenant {
            id: db.clone(),
            dsn: Dsn::parse(&c.url(db)).expect("dsn"),
            labels: Default::default(),
        })
        .collect();
    let policy = Policy {
        concurrency: 4,
        gate_sql: Some("SELECT to_regclass('public.hold_me') IS NULL".into()),
        ..Policy::default()
    };
    let bundle = || {
        Bundle::from_sources(&[("V1__t.sql", "CREATE TABLE t (id int);")], "test").expect("valid")
    };
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let id = engine
        .start_wave(bundle(), tenants.clone(), policy.clone(), "test")
        .expect("start");
    let wait = |what: &'static str, done: Box<dyn Fn(&flotilla::wave::WaveStatus) -> bool>| {
        let (engine, id) = (engine.clone(), id.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let s = engine.status(&id).expect("status");
                if done(&s) {
                    return s;
                }
                assert!(Instant::now() < deadline, "waited for {what}: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let s = wait(
        "the open server's tenants",
        Box::new(|s| s.counts.succeeded == 2),
    )
    .await;
    assert_eq!(s.counts.pending, 2, "{s:?}");
    assert_eq!(
        s.held,
        [format!("{}: gate SQL returned false", b.host())],
        "{s:?}"
    );
    for db in &held_dbs {
        let c = b.connect(db).await.expect("connect");
        c.batch_execute("DROP TABLE hold_me")
            .await
            .expect("open the gate");
    }
    let s = wait(
        "the gate to open",
        Box::new(|s| s.state == WaveState::Completed),
    )
    .await;
    assert!(s.held.is_empty(), "{s:?}");

    // Held past max_hold: the wave pauses, saying which host and why.
    let more = b
        .create_tenants("gate_long_", 1, "CREATE TABLE hold_me ();")
        .await
        .expect("tenant");
    let id = engine
        .start_wave(
            bundle(),
            vec![Tenant {
                id: more[0].clone(),
                dsn: Dsn::parse(&b.url(&more[0])).expect("dsn"),
                labels: Default::default(),
            }],
            Policy {
                max_hold_ms: 1_000,
                ..policy
            },
            "test",
        )
        .expect("start");
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = engine.status(&id).expect("status");
        if s.state == WaveState::Paused {
            break s;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reason = s.reason.clone().unwrap_or_default();
    assert!(
        reason.contains(&b.host()) && reason.contains("gate SQL returned false"),
        "{reason}"
    );
    assert_eq!(s.counts.pending, 1, "nothing started on the held server");
}

/// The replication gate with a real standby: replay paused on it while the primary
/// keeps writing holds the primary's tenants ("replication lag … > 1s"); replay resumed,
/// the lag goes and the wave completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_standby_holds_its_primary_until_it_catches_up() {
    let primary = Cluster::start().expect("primary");
    let standby = primary.start_standby().expect("standby");
    let dbs = primary
        .create_tenants("lag_", 1, "CREATE TABLE churn (id bigserial, pad text);")
        .await
        .expect("tenant");
    let paused = standby.connect("postgres").await.expect("standby");
    paused
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    // The primary keeps writing, so the paused standby falls behind.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, stop) = (primary.url(&dbs[0]), stop.clone());
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("writer");
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                c.batch_execute(
                    "INSERT INTO churn (pad) SELECT repeat('x', 200) FROM generate_series(1, 50)",
                )
                .await
                .expect("write");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // The wave starts once the standby is behind by more than the gate allows.
    let admin = primary.connect("postgres").await.expect("admin");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lag_ms: Option<f64> = admin
            .query_one(
                "SELECT max(extract(epoch FROM replay_lag) * 1000)::float8 FROM pg_stat_replication",
                &[],
            )
            .await
            .expect("pg_stat_replication")
            .get(0);
        if lag_ms.is_some_and(|ms| ms > 1_500.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the standby never fell behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let data = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(data.path()).expect("engine");
    let id = engine
        .start_wave(
            Bundle::from_sources(&[("V1__t.sql", "CREATE TABLE t (id int);")], "test")
                .expect("valid"),
            vec![Tenant {
                id: dbs[0].clone(),
                dsn: Dsn::parse(&primary.url(&dbs[0])).expect("dsn"),
                labels: Default::default(),
            }],
            Policy {
                max_replication_lag_ms: 1_000,
                ..Policy::default()
            },
            "test",
        )
        .expect("start");
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = engine.status(&id).expect("status");
        if !s.held.is_empty() {
            break s;
        }
        assert!(
            Instant::now() < deadline && s.state == WaveState::Running,
            "the lag never held the primary: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        s.held[0].starts_with(&format!("{}: replication lag", primary.host()))
            && s.held[0].ends_with("> 1s"),
        "{:?}",
        s.held
    );
    assert_eq!(s.counts.pending, 1, "nothing started while held");
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    paused
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = engine.status(&id).expect("status");
        if s.state == WaveState::Completed {
            break;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
