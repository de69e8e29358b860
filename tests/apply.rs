//! The tenant applier against real PostgreSQL (issue: exactly-once apply to one database).

use std::time::Duration;

use flotilla::apply::{
    ApplyError, DriftPolicy, Outcome, PlanError, PlanOptions, StopSignal, TenantRun,
    TransactionMode, apply_tenant,
};
use flotilla::bundle::Bundle;
use flotilla::connect::SessionSettings;
use flotilla::dsn::Dsn;
use flotilla::failure::Retryability;
use flotilla_testkit::{Cluster, shared};

fn bundle(files: &[(&str, &str)]) -> Bundle {
    Bundle::from_sources(files, "test").expect("valid bundle")
}

const V1: (&str, &str) = (
    "V1__users.sql",
    "CREATE TABLE users (id int PRIMARY KEY, name text);",
);
const V2: (&str, &str) = ("V2__email.sql", "ALTER TABLE users ADD COLUMN email text;");
const V3: (&str, &str) = (
    "V3__orders.sql",
    "CREATE TABLE orders (id int, user_id int);",
);
const V4: (&str, &str) = (
    "V4__seed.sql",
    "INSERT INTO users VALUES (1, 'a', 'a@example.invalid');",
);
const V5: (&str, &str) = (
    "V5__view.sql",
    "CREATE VIEW user_names AS SELECT name FROM users; -- a trailing comment, no newline",
);

fn five() -> Bundle {
    bundle(&[V1, V2, V3, V4, V5])
}

/// A V3 that sleeps while the tenant has a `sleep_marker` table, so a test can catch it
/// mid-flight and a rerun (after dropping the marker) is quick.
const V3_SLEEPY: (&str, &str) = (
    "V3__orders.sql",
    "SELECT pg_sleep(60) FROM pg_tables WHERE tablename = 'sleep_marker';\nCREATE TABLE orders (id int, user_id int);",
);

fn settings() -> SessionSettings {
    SessionSettings {
        lock_timeout: Duration::from_secs(5),
        ..SessionSettings::default()
    }
}

async fn run_with(
    bundle: &Bundle,
    dsn: &Dsn,
    mode: TransactionMode,
    settings: SessionSettings,
    plan_options: PlanOptions,
    stop: &StopSignal,
) -> Outcome {
    let run = TenantRun {
        bundle,
        wave_id: "wave-test",
        dsn,
        reach: &flotilla::reach::Reach::default(),
        settings,
        mode,
        plan_options,
        prior: None,
        guard: None,
        max_block: std::time::Duration::from_secs(1),
        undo: flotilla::apply::Undo::None,
    };
    apply_tenant(&run, stop).await
}

async fn run(bundle: &Bundle, dsn: &Dsn) -> Outcome {
    run_with(
        bundle,
        dsn,
        TransactionMode::PerScript,
        settings(),
        PlanOptions::default(),
        &StopSignal::new(),
    )
    .await
}

/// Runs the bundle on a task of its own, so the test can act while it runs.
fn spawn_run(b: &Bundle, dsn: &Dsn) -> tokio::task::JoinHandle<Outcome> {
    let (b, dsn) = (b.clone(), dsn.clone());
    tokio::spawn(async move { run(&b, &dsn).await })
}

/// Executes `sql` in database `db` as the superuser.
async fn exec(cluster: &Cluster, db: &str, sql: &str) {
    cluster
        .connect(db)
        .await
        .expect("connect")
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn tenant(cluster: &Cluster, prefix: &str) -> (String, Dsn) {
    let names = cluster
        .create_tenants(prefix, 1, "")
        .await
        .expect("create tenant");
    let dsn = Dsn::parse(&cluster.url(&names[0])).expect("dsn");
    (names[0].clone(), dsn)
}

/// (version, script, status, checksum, bundle_id, wave_id) rows in id order.
async fn log(
    cluster: &Cluster,
    db: &str,
) -> Vec<(Option<String>, String, String, String, String, String)> {
    let c = cluster.connect(db).await.expect("connect");
    c.query(
        "SELECT version, script, status, checksum, bundle_id, wave_id FROM flotilla.execution_log ORDER BY id",
        &[],
    )
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect()
    })
    .unwrap_or_default()
}

async fn exists(cluster: &Cluster, db: &str, relation: &str) -> bool {
    let c = cluster.connect(db).await.expect("connect");
    c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&relation])
        .await
        .expect("to_regclass")
        .get(0)
}

/// Polls `condition` until it holds, up to 60 s: a condition, never a fixed sleep.
async fn wait_for<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether a Flotilla session on `db` is running a query containing `needle` and, for
/// `pg_sleep`, is sleeping now (a message of several scripts shows its whole text from
/// its first statement on).
async fn flotilla_running(cluster: &Cluster, db: &str, needle: &str) -> bool {
    let c = cluster.connect("postgres").await.expect("connect");
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flotilla' AND datname = $1 \
         AND state = 'active' AND query LIKE '%' || $2 || '%' \
         AND ($2 <> 'pg_sleep' OR wait_event = 'PgSleep')",
        &[&db, &needle],
    )
    .await
    .expect("pg_stat_activity")
    .get::<_, i64>(0)
        > 0
}

fn applied_names(outcome: &Outcome) -> Vec<String> {
    match outcome {
        Outcome::Applied { scripts, .. }
        | Outcome::Cancelled { scripts }
        | Outcome::Failed { scripts, .. } => scripts.iter().map(|s| s.script.clone()).collect(),
        _ => Vec::new(),
    }
}

#[tokio::test]
async fn fresh_tenant_gets_five_logged_scripts_and_a_rerun_does_nothing() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "fresh_").await;
    let b = five();
    let outcome = run(&b, &dsn).await;
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    assert_eq!(applied_names(&outcome).len(), 5);

    let rows = log(cluster, &db).await;
    assert_eq!(rows.len(), 5);
    for (row, script) in rows.iter().zip(b.scripts()) {
        assert_eq!(
            row.0.as_deref(),
            script.version().map(|v| v.to_string()).as_deref()
        );
        assert_eq!(row.1, script.name);
        assert_eq!(row.2, "applied");
        assert_eq!(row.3, script.checksum);
        assert_eq!(row.4, b.id());
        assert_eq!(row.5, "wave-test");
    }
    assert!(exists(cluster, &db, "users").await && exists(cluster, &db, "user_names").await);
    let c = cluster.connect(&db).await.expect("connect");
    let meta = c
        .query_one(
            "SELECT count(*) FILTER (WHERE applied_by = current_user AND xact_id IS NOT NULL \
             AND applied_at IS NOT NULL AND duration_ms >= 0), count(DISTINCT xact_id) FROM flotilla.execution_log",
            &[],
        )
        .await
        .expect("meta");
    assert_eq!(
        meta.get::<_, i64>(0),
        5,
        "every row says who, when, which transaction, how long"
    );
    assert_eq!(
        meta.get::<_, i64>(1),
        5,
        "per-script mode: one transaction per script"
    );

    let again = run(&b, &dsn).await;
    assert_eq!(
        again,
        Outcome::UpToDate {
            notes: vec![],
            baselined: 0
        }
    );
    assert_eq!(log(cluster, &db).await.len(), 5, "no new rows");
}

#[tokio::test]
async fn per_tenant_mode_commits_everything_in_one_transaction() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "pertenant_").await;
    let outcome = run_with(
        &five(),
        &dsn,
        TransactionMode::PerTenant,
        settings(),
        PlanOptions::default(),
        &StopSignal::new(),
    )
    .await;
    assert_eq!(applied_names(&outcome).len(), 5, "{outcome:?}");
    let c = cluster.connect(&db).await.expect("connect");
    let xacts: i64 = c
        .query_one(
            "SELECT count(DISTINCT xact_id) FROM flotilla.execution_log",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(xacts, 1);
}

#[tokio::test]
async fn failing_third_script_per_script_and_per_tenant() {
    let cluster = shared();
    let failing = bundle(&[
        V1,
        V2,
        ("V3__boom.sql", "CREATE TABLE orders (id int);\nSELECT 1/0;"),
        V4,
        V5,
    ]);

    let (db, dsn) = tenant(cluster, "fail_ps_").await;
    let outcome = run(&failing, &dsn).await;
    let Outcome::Failed { scripts, error } = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(scripts.len(), 2);
    assert_eq!(error.script(), Some("V3__boom.sql"));
    assert_eq!(error.sqlstate(), Some("22012"));
    assert_eq!(error.retryability(), Retryability::Permanent);
    assert!(error.to_string().contains("division by zero"), "{error}");
    let rows = log(cluster, &db).await;
    assert_eq!(
        rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ["V1__users.sql", "V2__email.sql"]
    );
    assert!(
        !exists(cluster, &db, "orders").await,
        "script 3 rolled back whole"
    );

    let (db, dsn) = tenant(cluster, "fail_pt_").await;
    let outcome = run_with(
        &failing,
        &dsn,
        TransactionMode::PerTenant,
        settings(),
        PlanOptions::default(),
        &StopSignal::new(),
    )
    .await;
    let Outcome::Failed { scripts, error } = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(scripts.is_empty());
    assert_eq!(error.script(), Some("V3__boom.sql"));
    assert!(
        log(cluster, &db).await.is_empty(),
        "per-tenant: nothing committed"
    );
    assert!(!exists(cluster, &db, "users").await);
}

#[tokio::test]
async fn syntax_error_names_the_line() {
    let cluster = shared();
    let (_db, dsn) = tenant(cluster, "syntax_").await;
    let b = bundle(&[(
        "V1__bad.sql",
        "CREATE TABLE a (id int);\n\nCREATE TABEL b (id int);\n",
    )]);
    let outcome = run(&b, &dsn).await;
    let Outcome::Failed { error, .. } = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(error.sqlstate(), Some("42601"));
    assert!(
        matches!(error, ApplyError::Script { line: Some(3), .. }),
        "{error:?}"
    );
    assert!(error.to_string().starts_with("V1__bad.sql:3: "), "{error}");
}

#[tokio::test]
async fn terminated_backend_mid_script_leaves_nothing_and_the_next_run_applies_once() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "terminate_").await;
    exec(cluster, &db, "CREATE TABLE sleep_marker ()").await;
    let b = bundle(&[V1, V2, V3_SLEEPY, V4, V5]);
    let running = spawn_run(&b, &dsn);
    wait_for("script 3 to sleep", || {
        flotilla_running(cluster, &db, "pg_sleep")
    })
    .await;
    let side = cluster.connect("postgres").await.expect("side");
    side.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'flotilla' AND datname = $1",
        &[&db],
    )
    .await
    .expect("terminate");
    let outcome = running.await.expect("join");
    let Outcome::Failed { scripts, error } = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(scripts.len(), 2);
    assert_eq!(error.script(), Some("V3__orders.sql"));
    assert_eq!(error.retryability(), Retryability::Retryable, "{error:?}");
    assert_eq!(log(cluster, &db).await.len(), 2);
    assert!(!exists(cluster, &db, "orders").await);

    exec(cluster, &db, "DROP TABLE sleep_marker").await;
    let outcome = run(&b, &dsn).await;
    assert_eq!(
        applied_names(&outcome),
        ["V3__orders.sql", "V4__seed.sql", "V5__view.sql"]
    );
    let rows = log(cluster, &db).await;
    assert_eq!(rows.len(), 5);
    assert_eq!(rows.iter().filter(|r| r.1 == "V3__orders.sql").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_script_then_restarted_completes_exactly_once() {
    let cluster = Cluster::start().expect("own cluster");
    let (db, dsn) = tenant(&cluster, "crash_").await;
    exec(&cluster, &db, "CREATE TABLE sleep_marker ()").await;
    let b = bundle(&[V1, V2, V3_SLEEPY, V4, V5]);
    let running = spawn_run(&b, &dsn);
    wait_for("script 3 to sleep", || {
        flotilla_running(&cluster, &db, "pg_sleep")
    })
    .await;
    cluster.kill9().expect("kill -9");
    let outcome = running.await.expect("join");
    let Outcome::Failed { error, .. } = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(error.retryability(), Retryability::Retryable, "{error:?}");

    // While the server is down, a run fails retryably at connect.
    let down = run(&b, &dsn).await;
    let Outcome::Failed { error, .. } = &down else {
        panic!("{down:?}")
    };
    assert!(matches!(error, ApplyError::Connect(_)), "{error:?}");
    assert_eq!(error.retryability(), Retryability::Retryable);

    cluster.restart().expect("restart");
    exec(&cluster, &db, "DROP TABLE sleep_marker").await;
    let outcome = run(&b, &dsn).await;
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    let rows = log(&cluster, &db).await;
    let mut versions: Vec<_> = rows.iter().filter_map(|r| r.0.clone()).collect();
    versions.sort();
    assert_eq!(
        versions,
        ["1", "2", "3", "4", "5"],
        "exactly one row per version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeout_gives_up_and_does_not_hold_readers_hostage() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "locktimeout_").await;
    assert!(matches!(
        run(&bundle(&[V1]), &dsn).await,
        Outcome::Applied { .. }
    ));

    // A long transaction that read `users` holds ACCESS SHARE; V2's ALTER needs ACCESS
    // EXCLUSIVE and queues, and every new reader would queue behind it.
    let blocker = cluster.connect(&db).await.expect("blocker");
    blocker
        .batch_execute("BEGIN; SELECT * FROM users;")
        .await
        .expect("hold lock");
    // Long enough that the wait below sees Flotilla queued even when the machine is
    // busy (a 1.5 s window was missed once under the full suite, a 5 s one once more),
    // short enough to test.
    let short = SessionSettings {
        lock_timeout: Duration::from_secs(12),
        ..settings()
    };
    let b = five();
    let running = tokio::spawn({
        let b = b.clone();
        let dsn = dsn.clone();
        async move {
            run_with(
                &b,
                &dsn,
                TransactionMode::PerScript,
                short,
                PlanOptions::default(),
                &StopSignal::new(),
            )
            .await
        }
    });
    let side = cluster.connect("postgres").await.expect("side");
    wait_for("flotilla to wait on the lock", || async {
        side.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flotilla' AND datname = $1 AND wait_event_type = 'Lock'",
            &[&db],
        )
        .await
        .expect("activity")
        .get::<_, i64>(0)
            > 0
    })
    .await;
    // A reader arriving now queues behind Flotilla's ALTER, and must be let go when
    // Flotilla's lock_timeout fires — while the blocker still holds its lock.
    let reader = cluster.connect(&db).await.expect("reader");
    let read = tokio::time::timeout(
        Duration::from_secs(30),
        reader.query("SELECT count(*) FROM users", &[]),
    )
    .await;
    assert!(read.is_ok(), "the reader stayed queued behind Flotilla");
    read.expect("in time").expect("reader query");

    let outcome = running.await.expect("join");
    let Outcome::Failed { scripts, error } = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(scripts.is_empty());
    assert_eq!(error.sqlstate(), Some("55P03"));
    assert_eq!(error.retryability(), Retryability::Retryable);
    assert_eq!(error.script(), Some("V2__email.sql"));

    blocker.batch_execute("COMMIT").await.expect("release");
    let outcome = run(&b, &dsn).await;
    assert_eq!(applied_names(&outcome).len(), 4, "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_at_once_one_is_busy() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "race_").await;
    // V1 holds the lock for a second so the runners overlap.
    let b = bundle(&[
        (
            "V1__users.sql",
            "SELECT pg_sleep(1);\nCREATE TABLE users (id int PRIMARY KEY, name text);",
        ),
        V2,
        V3,
        V4,
        V5,
    ]);
    let (a, c) = tokio::join!(run(&b, &dsn), run(&b, &dsn));
    let busy = [&a, &c]
        .iter()
        .filter(|o| matches!(o, Outcome::Busy { .. }))
        .count();
    let applied = [&a, &c]
        .iter()
        .filter(|o| matches!(o, Outcome::Applied { .. }))
        .count();
    assert_eq!((busy, applied), (1, 1), "{a:?} / {c:?}");
    assert_eq!(log(cluster, &db).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_create_index_concurrently_is_cleaned_and_rebuilt() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "cic_").await;
    let setup = (
        "V1__big.sql",
        "CREATE TABLE big (id int);\n\
         INSERT INTO big SELECT generate_series(1, 4000);\n\
         CREATE FUNCTION slow(i int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS $$\n\
         BEGIN PERFORM pg_sleep(0.005); RETURN i; END $$;",
    );
    let index = (
        "V2__index.sql",
        "-- flotilla:no-transaction\nSELECT 1;\nCREATE INDEX CONCURRENTLY big_slow_idx ON big (slow(id));\nSELECT 2;",
    );
    let b = bundle(&[setup, index]);
    let running = spawn_run(&b, &dsn);
    let side = cluster.connect(&db).await.expect("side");
    wait_for("the index build to be under way", || async {
        side.query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'big_slow_idx'",
            &[],
        )
        .await
        .expect("pg_class")
        .get::<_, i64>(0)
            > 0
    })
    .await;
    side.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'flotilla' AND datname = current_database()",
        &[],
    )
    .await
    .expect("terminate");
    let outcome = running.await.expect("join");
    assert!(matches!(outcome, Outcome::Failed { .. }), "{outcome:?}");
    let valid: bool = side
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'big_slow_idx'::regclass",
            &[],
        )
        .await
        .expect("index left behind")
        .get(0);
    assert!(!valid, "the interrupted build left an INVALID index");
    let started: (String, i32) = side
        .query_one(
            "SELECT status, statements_done FROM flotilla.execution_log WHERE version = '2'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("started row");
    assert_eq!(
        started,
        ("started".to_string(), 1),
        "SELECT 1 finished, the index did not"
    );

    side.batch_execute(
        "CREATE OR REPLACE FUNCTION slow(i int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS $$ BEGIN RETURN i; END $$",
    )
    .await
    .expect("speed up");
    let outcome = run(&b, &dsn).await;
    assert_eq!(applied_names(&outcome), ["V2__index.sql"], "{outcome:?}");
    let valid: bool = side
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'big_slow_idx'::regclass",
            &[],
        )
        .await
        .expect("index")
        .get(0);
    assert!(valid);
    let rows = log(cluster, &db).await;
    assert_eq!(
        rows.iter().filter(|r| r.0.as_deref() == Some("2")).count(),
        1
    );
    assert!(rows.iter().all(|r| r.2 == "applied"));
}

/// The runner died while `CREATE INDEX CONCURRENTLY` ran, and the server finished the
/// build anyway (it completes a statement whose client is gone): the log says `started`
/// at that statement, the index is VALID. The next run keeps the index and completes.
#[tokio::test]
async fn create_index_concurrently_that_finished_after_its_runner_died_is_kept() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "cicdone_").await;
    let b = bundle(&[
        ("V1__table.sql", "CREATE TABLE t (id int);"),
        (
            "V2__index.sql",
            "-- flotilla:no-transaction\nCREATE INDEX CONCURRENTLY t_id_idx ON t (id);\nSELECT 2;",
        ),
    ]);
    let outcome = run(&b, &dsn).await;
    assert_eq!(applied_names(&outcome).len(), 2, "{outcome:?}");
    // What a lost runner leaves: the started row at statement 0, the index built.
    exec(
        cluster,
        &db,
        "UPDATE flotilla.execution_log SET status = 'started', statements_done = 0, \
         applied_at = NULL WHERE version = '2'",
    )
    .await;
    let outcome = run(&b, &dsn).await;
    assert_eq!(applied_names(&outcome), ["V2__index.sql"], "{outcome:?}");
    let side = cluster.connect(&db).await.expect("side");
    let valid: bool = side
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_id_idx'::regclass",
            &[],
        )
        .await
        .expect("index kept")
        .get(0);
    assert!(valid);
    let rows = log(cluster, &db).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.2 == "applied"), "{rows:?}");
}

#[tokio::test]
async fn drift_fails_and_a_changed_repeatable_is_reapplied() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "drift_").await;
    let view_v1 = (
        "R__view.sql",
        "CREATE OR REPLACE VIEW ids AS SELECT id FROM users;",
    );
    assert!(matches!(
        run(&bundle(&[V1, V2, view_v1]), &dsn).await,
        Outcome::Applied { .. }
    ));

    let drifted = bundle(&[
        V1,
        (
            "V2__email.sql",
            "ALTER TABLE users ADD COLUMN email varchar(100);",
        ),
        view_v1,
    ]);
    let outcome = run(&drifted, &dsn).await;
    let Outcome::Failed { error, .. } = &outcome else {
        panic!("{outcome:?}")
    };
    let ApplyError::Plan(PlanError::Drift {
        applied_checksum,
        bundle_checksum,
        ..
    }) = error
    else {
        panic!("{error:?}")
    };
    assert_eq!(bundle_checksum, &drifted.scripts()[1].checksum);
    assert_eq!(applied_checksum, &five().scripts()[1].checksum);
    assert_eq!(error.retryability(), Retryability::Permanent);
    let allowed = PlanOptions {
        drift: DriftPolicy::Allow,
        ..PlanOptions::default()
    };
    let outcome = run_with(
        &drifted,
        &dsn,
        TransactionMode::PerScript,
        settings(),
        allowed,
        &StopSignal::new(),
    )
    .await;
    assert!(
        matches!(outcome, Outcome::UpToDate { ref notes, .. } if notes.len() == 1),
        "{outcome:?}"
    );

    let view_v2 = (
        "R__view.sql",
        "CREATE OR REPLACE VIEW ids AS SELECT id, name FROM users;",
    );
    let outcome = run(&bundle(&[V1, V2, view_v2]), &dsn).await;
    assert_eq!(applied_names(&outcome), ["R__view.sql"]);
    let rows = log(cluster, &db).await;
    assert_eq!(rows.iter().filter(|r| r.1 == "R__view.sql").count(), 2);
    assert!(
        rows.iter()
            .filter(|r| r.1 == "R__view.sql")
            .all(|r| r.0.is_none())
    );
}

#[tokio::test]
async fn wrong_password_is_a_clear_error_without_the_password() {
    let cluster = shared();
    let (db, _) = tenant(cluster, "password_").await;
    let admin = cluster.connect("postgres").await.expect("admin");
    admin
        .batch_execute("DO $$ BEGIN CREATE ROLE app_pw LOGIN PASSWORD 'right-horse'; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        .await
        .expect("role");
    let dsn =
        Dsn::parse(&cluster.url_with_password(&db, "app_pw", "Tr0ub4dor-wrong")).expect("dsn");
    let outcome = run(&five(), &dsn).await;
    let Outcome::Failed { error, .. } = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(matches!(error, ApplyError::Connect(_)));
    assert_eq!(error.sqlstate(), Some("28P01"));
    assert_eq!(error.retryability(), Retryability::Permanent);
    let shown = format!("{error} {error:?} {outcome:?} {dsn} {dsn:?}");
    assert!(!shown.contains("Tr0ub4dor-wrong"), "{shown}");
    assert!(shown.contains("password authentication failed"), "{shown}");
    assert!(shown.contains("app_pw"), "names the role: {shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_stop_cancels_the_running_script_and_soft_stop_waits_for_the_boundary() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "stop_").await;
    exec(cluster, &db, "CREATE TABLE sleep_marker ()").await;
    let b = bundle(&[V1, V2, V3_SLEEPY, V4, V5]);
    let stop = StopSignal::new();
    let running = tokio::spawn({
        let (b, dsn, stop) = (b.clone(), dsn.clone(), stop.clone());
        async move {
            run_with(
                &b,
                &dsn,
                TransactionMode::PerScript,
                settings(),
                PlanOptions::default(),
                &stop,
            )
            .await
        }
    });
    wait_for("script 3 to sleep", || {
        flotilla_running(cluster, &db, "pg_sleep")
    })
    .await;
    stop.stop_at_boundary();
    assert!(
        flotilla_running(cluster, &db, "pg_sleep").await,
        "a soft stop does not interrupt a script"
    );
    stop.stop_now();
    let outcome = running.await.expect("join");
    assert_eq!(applied_names(&outcome), ["V1__users.sql", "V2__email.sql"]);
    assert!(matches!(outcome, Outcome::Cancelled { .. }), "{outcome:?}");
    assert_eq!(
        log(cluster, &db).await.len(),
        2,
        "the cancelled script is not logged"
    );
    assert!(!exists(cluster, &db, "orders").await);
}

/// Terminates every Flotilla session on `db` once one runs a query containing `needle`.
async fn terminate_when_running(cluster: &Cluster, db: &str, needle: &str) {
    wait_for(&format!("a Flotilla session running {needle:?}"), || {
        flotilla_running(cluster, db, needle)
    })
    .await;
    exec(
        cluster,
        db,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'flotilla' AND datname = current_database()",
    )
    .await;
}

async fn index_valid(cluster: &Cluster, db: &str, index: &str) -> Option<bool> {
    let c = cluster.connect(db).await.expect("connect");
    c.query_opt(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
        &[&index],
    )
    .await
    .expect("pg_index")
    .map(|r| r.get(0))
}

/// Issue 11, case 1. A `no-transaction` script that sets `search_path` and is cut off
/// during its `CREATE INDEX CONCURRENTLY` resumes on a new session: without replaying
/// the `SET`, recovery looked in the wrong schema and the build failed (`t` unknown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_script_replays_its_session_settings() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "replay_").await;
    let setup = (
        "V1__app.sql",
        "CREATE SCHEMA app;\n\
         CREATE TABLE app.t (a int);\n\
         INSERT INTO app.t SELECT generate_series(1, 2000);\n\
         CREATE FUNCTION app.slow(i int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS $$\n\
         BEGIN PERFORM pg_sleep(0.005); RETURN i; END $$;",
    );
    let index = (
        "V2__index.sql",
        "-- flotilla:no-transaction\nSET search_path TO app;\nCREATE INDEX CONCURRENTLY i ON t (slow(a));",
    );
    let b = bundle(&[setup, index]);
    let running = spawn_run(&b, &dsn);
    terminate_when_running(cluster, &db, "CONCURRENTLY").await;
    assert!(matches!(
        running.await.expect("join"),
        Outcome::Failed { .. }
    ));
    assert_eq!(
        index_valid(cluster, &db, "app.i").await,
        Some(false),
        "left INVALID"
    );

    exec(
        cluster,
        &db,
        "CREATE OR REPLACE FUNCTION app.slow(i int) RETURNS int IMMUTABLE LANGUAGE plpgsql AS $$ BEGIN RETURN i; END $$",
    )
    .await;
    let outcome = run(&b, &dsn).await;
    assert_eq!(applied_names(&outcome), ["V2__index.sql"], "{outcome:?}");
    assert_eq!(index_valid(cluster, &db, "app.i").await, Some(true));
    assert!(
        !exists(cluster, &db, "public.i").await,
        "built where the SET said"
    );
}

/// Issue 11, case 2. After an interruption the statement at the cursor may have run;
/// `ALTER TYPE … ADD VALUE` (value exists), `DROP INDEX CONCURRENTLY` (index gone) count
/// as done, and `REINDEX … CONCURRENTLY` first drops the `_ccnew` index it left INVALID.
/// Each failed (or left the INVALID index) before the fix.
#[tokio::test]
async fn interrupted_statements_postgres_leaves_half_done_are_recovered() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "recover_").await;
    let b = bundle(&[
        (
            "V1__setup.sql",
            "CREATE TYPE mood AS ENUM ('sad');\n\
             CREATE TABLE t (a int);\n\
             INSERT INTO t VALUES (1), (1), (2);\n\
             CREATE INDEX t_a_idx ON t (a);\n\
             CREATE INDEX t_gone_idx ON t (a);",
        ),
        (
            "V2__enum.sql",
            "-- flotilla:no-transaction\nALTER TYPE mood ADD VALUE 'happy';",
        ),
        (
            "V3__drop.sql",
            "-- flotilla:no-transaction\nDROP INDEX CONCURRENTLY t_gone_idx;",
        ),
        (
            "V4__reindex.sql",
            "-- flotilla:no-transaction\nREINDEX INDEX CONCURRENTLY t_a_idx;",
        ),
    ]);
    let outcome = run(&b, &dsn).await;
    assert_eq!(applied_names(&outcome).len(), 4, "{outcome:?}");
    // What a runner lost right after each statement leaves: its row `started` at the
    // statement, the statement's effect in place — and for REINDEX an INVALID
    // `_ccnew` index (made here the way PostgreSQL leaves one: a failed concurrent build).
    exec(
        cluster,
        &db,
        "UPDATE flotilla.execution_log SET status = 'started', statements_done = 0, \
         applied_at = NULL WHERE version IN ('2', '3', '4')",
    )
    .await;
    let c = cluster.connect(&db).await.expect("connect");
    c.batch_execute("CREATE UNIQUE INDEX CONCURRENTLY t_a_idx_ccnew ON t (a)")
        .await
        .expect_err("duplicates make the concurrent build fail");
    assert_eq!(
        index_valid(cluster, &db, "t_a_idx_ccnew").await,
        Some(false)
    );

    let outcome = run(&b, &dsn).await;
    assert_eq!(
        applied_names(&outcome),
        ["V2__enum.sql", "V3__drop.sql", "V4__reindex.sql"],
        "{outcome:?}"
    );
    assert_eq!(
        index_valid(cluster, &db, "t_a_idx_ccnew").await,
        None,
        "dropped"
    );
    assert_eq!(index_valid(cluster, &db, "t_a_idx").await, Some(true));
    let rows = log(cluster, &db).await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows.iter().all(|r| r.2 == "applied"), "{rows:?}");
}

/// Issue 11, case 8. An interrupted `no-transaction` repeatable whose script changed
/// runs its new version (it failed for ever with "interrupted script changed"), after
/// dropping the index the old run left INVALID (else `IF NOT EXISTS` would keep it).
#[tokio::test]
async fn an_interrupted_repeatable_that_changed_runs_its_new_version() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "supersede_").await;
    let table = (
        "V1__t.sql",
        "CREATE TABLE t (a int);\nINSERT INTO t VALUES (1), (1);",
    );
    let old = (
        "R__index.sql",
        "-- flotilla:no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS t_idx ON t (a);",
    );
    let outcome = run(&bundle(&[table, old]), &dsn).await;
    assert_eq!(applied_names(&outcome).len(), 2, "{outcome:?}");
    exec(
        cluster,
        &db,
        "UPDATE flotilla.execution_log SET status = 'started', statements_done = 0 \
         WHERE script = 'R__index.sql'; DROP INDEX t_idx;",
    )
    .await;
    let c = cluster.connect(&db).await.expect("connect");
    c.batch_execute("CREATE UNIQUE INDEX CONCURRENTLY t_idx ON t (a)")
        .await
        .expect_err("an INVALID t_idx, as an interrupted build leaves");
    let new = (
        "R__index.sql",
        "-- flotilla:no-transaction\n-- v2: a plain index\nCREATE INDEX CONCURRENTLY IF NOT EXISTS t_idx ON t (a);",
    );
    let outcome = run(&bundle(&[table, new]), &dsn).await;
    assert_eq!(applied_names(&outcome), ["R__index.sql"], "{outcome:?}");
    assert_eq!(index_valid(cluster, &db, "t_idx").await, Some(true));
    let rows = log(cluster, &db).await;
    assert_eq!(
        rows.iter()
            .filter(|r| r.1 == "R__index.sql")
            .map(|r| r.2.as_str())
            .collect::<Vec<_>>(),
        ["started", "applied"],
        "the old run's row stays as history"
    );
}

/// Issue 11, case 8. A log table made before the unique index on `version` existed
/// gets it.
#[tokio::test]
async fn an_older_log_table_gets_its_unique_index() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "oldlog_").await;
    exec(
        cluster,
        &db,
        "CREATE SCHEMA flotilla;
         CREATE TABLE flotilla.execution_log (
             id bigserial PRIMARY KEY, version text, script text NOT NULL, kind text NOT NULL,
             checksum text NOT NULL, bundle_id text NOT NULL, wave_id text NOT NULL,
             status text NOT NULL, applied_at timestamptz,
             applied_by text NOT NULL DEFAULT current_user, xact_id text, duration_ms bigint,
             statements_done integer, started_at timestamptz NOT NULL DEFAULT clock_timestamp());",
    )
    .await;
    assert!(!exists(cluster, &db, "flotilla.execution_log_version_once").await);
    let outcome = run(&five(), &dsn).await;
    assert_eq!(applied_names(&outcome).len(), 5, "{outcome:?}");
    assert!(exists(cluster, &db, "flotilla.execution_log_version_once").await);
}

/// Issue 11, case 6. A busy tenant says who holds its lock.
#[tokio::test]
async fn busy_says_who_holds_the_lock() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "busywho_").await;
    let (holder, conn) = tokio_postgres::connect(
        &format!("{}?application_name=dba-console", cluster.url(&db)),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    tokio::spawn(conn);
    let pid: i32 = holder
        .query_one(
            &format!(
                "SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock({})) l",
                flotilla::apply::log::LOCK_KEY
            ),
            &[],
        )
        .await
        .expect("hold the lock")
        .get(0);
    match run(&five(), &dsn).await {
        Outcome::Busy { holder: Some(h) } => {
            assert!(
                h.contains(&format!("pid {pid}")) && h.contains("dba-console"),
                "{h}"
            );
        }
        other => panic!("expected Busy with a holder, got {other:?}"),
    }
}

/// Issue 11, case 7. A statement cancelled by another session is retryable and says
/// so; one cancelled by our own `statement_timeout` is permanent and says that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_is_told_apart_from_a_statement_timeout() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "cancel57014_").await;
    let b = bundle(&[("V1__slow.sql", "SELECT pg_sleep(30);")]);
    let running = spawn_run(&b, &dsn);
    wait_for("the slow script", || {
        flotilla_running(cluster, &db, "pg_sleep")
    })
    .await;
    exec(
        cluster,
        &db,
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'flotilla' AND datname = current_database() AND state = 'active'",
    )
    .await;
    match running.await.expect("join") {
        Outcome::Failed { error, .. } => {
            assert_eq!(error.retryability(), Retryability::Retryable, "{error}");
            assert!(error.to_string().contains("another session"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    let short = SessionSettings {
        statement_timeout: Duration::from_millis(300),
        ..settings()
    };
    let outcome = run_with(
        &b,
        &dsn,
        TransactionMode::PerScript,
        short,
        PlanOptions::default(),
        &StopSignal::new(),
    )
    .await;
    match outcome {
        Outcome::Failed { error, .. } => {
            assert_eq!(error.retryability(), Retryability::Permanent, "{error}");
            assert!(error.to_string().contains("statement_timeout"), "{error}");
        }
        other => panic!("{other:?}"),
    }
}

/// Issue 11, case 8. The connection is cut right after a script's COMMIT reached the
/// server, so the reply is lost: the applier asks the log on a new session and reports
/// the tenant applied (it used to report a failure; with `retries = 0`, a FAILED tenant
/// whose log says done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_reply_is_confirmed_from_the_log() {
    let cluster = shared();
    let (db, _) = tenant(cluster, "lostreply_").await;
    let proxy = flotilla_testkit::fault::LoseOneReply::start(cluster.port(), "lose-this-reply")
        .await
        .expect("proxy");
    let dsn = Dsn::parse(&format!(
        "postgresql://postgres@127.0.0.1:{}/{db}?sslmode=disable",
        proxy.port()
    ))
    .expect("dsn");
    let b = bundle(&[(
        "V1__only.sql",
        "-- lose-this-reply\nCREATE TABLE committed_but_unheard (id int);",
    )]);
    let outcome = run(&b, &dsn).await;
    assert!(proxy.fired(), "the reply was lost");
    match &outcome {
        Outcome::Applied { notes, .. } => {
            assert!(notes.iter().any(|n| n.contains("log shows")), "{notes:?}")
        }
        other => panic!("expected Applied from the log, got {other:?}"),
    }
    let rows = log(cluster, &db).await;
    assert_eq!(rows.len(), 1, "applied once: {rows:?}");
}

/// Issue 11, case 5. Behind PgBouncer in transaction mode: if it refuses the startup
/// options, the tenant fails with a permanent, instructive error; if it drops them
/// (ignore_startup_parameters), the applier notices its timeouts are not in force and
/// fails the same way — before taking a lock that would protect nothing.
#[tokio::test]
async fn a_transaction_pooler_is_refused_with_an_explanation() {
    if !flotilla_testkit::pooler::PgBouncer::available() && std::env::var_os("CI").is_none() {
        eprintln!("pgbouncer is not installed here; skipping (CI installs it)");
        return;
    }
    let cluster = shared();
    let (db, _) = tenant(cluster, "pooler_").await;
    for ignore_options in [false, true] {
        let bouncer = flotilla_testkit::pooler::PgBouncer::start(cluster.port(), ignore_options)
            .expect("pgbouncer");
        let dsn = Dsn::parse(&bouncer.url(&db)).expect("dsn");
        match run(&five(), &dsn).await {
            Outcome::Failed { error, .. } => {
                assert_eq!(
                    error.retryability(),
                    Retryability::Permanent,
                    "ignore_options={ignore_options}: {error}"
                );
                assert!(
                    error.to_string().contains("session-pooled"),
                    "ignore_options={ignore_options}: {error}"
                );
            }
            other => panic!("ignore_options={ignore_options}: {other:?}"),
        }
    }
    assert!(log(cluster, &db).await.is_empty(), "nothing was applied");
}

/// What a resumed script restores is the net effect of the statements before its cursor:
/// a `SET ROLE` that a later `RESET ROLE` undid (the role since dropped) is not replayed —
/// replaying every SET failed this tenant on every resume, for ever.
#[tokio::test]
async fn a_resume_restores_the_net_session_state_only() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "netstate_").await;
    let role = format!("flotilla_tmp_{}", db.replace('_', ""));
    let b = bundle(&[
        ("V1__t.sql", "CREATE TABLE t (a int);"),
        (
            "V2__index.sql",
            &format!(
                "-- flotilla:no-transaction\nCREATE ROLE {role};\nSET ROLE {role};\nRESET ROLE;\n\
                 DROP ROLE {role};\nCREATE INDEX CONCURRENTLY IF NOT EXISTS t_a_idx ON t (a);"
            ),
        ),
    ]);
    let outcome = run(&b, &dsn).await;
    assert_eq!(applied_names(&outcome).len(), 2, "{outcome:?}");
    // Lost right before the index build (statement 4), the role long gone.
    exec(
        cluster,
        &db,
        "UPDATE flotilla.execution_log SET status = 'started', statements_done = 4, \
         applied_at = NULL WHERE version = '2'; DROP INDEX t_a_idx;",
    )
    .await;
    let outcome = run(&b, &dsn).await;
    assert_eq!(applied_names(&outcome), ["V2__index.sql"], "{outcome:?}");
    assert_eq!(index_valid(cluster, &db, "t_a_idx").await, Some(true));
}

/// What a `no-transaction` script sets in its session ends with it: the scripts after it
/// run as on a fresh session (as they would after a crash), not in its `search_path`.
#[tokio::test]
async fn a_no_transaction_scripts_settings_do_not_leak_into_the_next_script() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "leak_").await;
    let b = bundle(&[
        ("V1__schema.sql", "CREATE SCHEMA app;"),
        (
            "V2__set.sql",
            "-- flotilla:no-transaction\nSET search_path TO app;\nVACUUM;",
        ),
        ("V3__table.sql", "CREATE TABLE where_am_i (id int);"),
    ]);
    let outcome = run(&b, &dsn).await;
    assert_eq!(applied_names(&outcome).len(), 3, "{outcome:?}");
    assert!(exists(cluster, &db, "public.where_am_i").await, "in public");
    assert!(!exists(cluster, &db, "app.where_am_i").await, "not in app");
}

/// Issue 12 (a folder written for Flyway): a script of nothing but `CREATE INDEX
/// CONCURRENTLY`, without a directive, runs outside a transaction as Flyway runs it.
#[tokio::test]
async fn a_flyway_style_index_script_runs_without_a_directive() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "flywaycic_").await;
    let b = bundle(&[
        ("V1__t.sql", "CREATE TABLE t (a int);"),
        (
            "V2__index.sql",
            "CREATE INDEX CONCURRENTLY t_a_idx ON t (a);",
        ),
    ]);
    let outcome = run(&b, &dsn).await;
    assert_eq!(applied_names(&outcome).len(), 2, "{outcome:?}");
    assert_eq!(index_valid(cluster, &db, "t_a_idx").await, Some(true));
}

/// Runs `bundle` with `--baseline-version upto`.
async fn run_with_baseline(bundle: &Bundle, dsn: &Dsn, upto: &str) -> Outcome {
    let run = TenantRun {
        bundle,
        wave_id: "wave-test",
        dsn,
        reach: &flotilla::reach::Reach::default(),
        settings: settings(),
        mode: TransactionMode::PerScript,
        plan_options: PlanOptions::default(),
        prior: Some(flotilla::apply::Prior::BaselineVersion(
            upto.parse().expect("version"),
        )),
        guard: None,
        max_block: std::time::Duration::from_secs(1),
        undo: flotilla::apply::Undo::None,
    };
    apply_tenant(&run, &StopSignal::new()).await
}

/// Issue 12 (`--baseline-version`): a tenant migrated by hand, with no log, gets the
/// versions up to the baseline recorded as `baselined` — not run (running V1 again would
/// fail: its table exists) — and the rest applied; a tenant that already has a log is
/// not baselined. An older log table (two statuses in its CHECK, no `source`) is brought
/// up to date first.
#[tokio::test]
async fn a_baseline_records_what_was_done_by_hand_and_runs_the_rest() {
    let cluster = shared();
    let b = bundle(&[
        ("V1__users.sql", "CREATE TABLE users (id int PRIMARY KEY);"),
        ("V2__email.sql", "ALTER TABLE users ADD COLUMN email text;"),
        ("V3__name.sql", "ALTER TABLE users ADD COLUMN name text;"),
    ]);
    let (by_hand, dsn) = tenant(cluster, "baseline_").await;
    exec(
        cluster,
        &by_hand,
        "CREATE TABLE users (id int PRIMARY KEY, email text);
         CREATE SCHEMA flotilla;
         CREATE TABLE flotilla.execution_log (
             id bigserial PRIMARY KEY, version text, script text NOT NULL, kind text NOT NULL,
             checksum text NOT NULL, bundle_id text NOT NULL, wave_id text NOT NULL,
             status text NOT NULL CHECK (status IN ('applied', 'started')),
             applied_at timestamptz, applied_by text NOT NULL DEFAULT current_user,
             xact_id text, duration_ms bigint, statements_done integer,
             started_at timestamptz NOT NULL DEFAULT clock_timestamp());",
    )
    .await;
    let outcome = run_with_baseline(&b, &dsn, "2").await;
    match &outcome {
        Outcome::Applied {
            scripts,
            notes,
            baselined,
        } => {
            assert_eq!(*baselined, 2);
            assert_eq!(
                scripts
                    .iter()
                    .map(|s| s.script.as_str())
                    .collect::<Vec<_>>(),
                ["V3__name.sql"]
            );
            assert!(
                notes.iter().any(|n| n.contains(
                    "recorded 2 scripts as baselined (not run), up to baseline-version 2"
                )),
                "{notes:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    let c = cluster.connect(&by_hand).await.expect("connect");
    let rows: Vec<(String, String, Option<String>)> = c
        .query(
            "SELECT version, status, source FROM flotilla.execution_log ORDER BY id",
            &[],
        )
        .await
        .expect("log")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let baseline = Some("baseline-version 2".to_string());
    assert_eq!(
        rows,
        [
            ("1".to_string(), "baselined".to_string(), baseline.clone()),
            ("2".to_string(), "baselined".to_string(), baseline),
            ("3".to_string(), "applied".to_string(), None),
        ]
    );
    assert!(matches!(
        run_with_baseline(&b, &dsn, "2").await,
        Outcome::UpToDate { .. }
    ));

    // A tenant with a history is not baselined: V2 and V3 run.
    let (with_log, dsn) = tenant(cluster, "baseline_log_").await;
    let first = bundle(&[("V1__users.sql", "CREATE TABLE users (id int PRIMARY KEY);")]);
    assert_eq!(applied_names(&run(&first, &dsn).await).len(), 1);
    let outcome = run_with_baseline(&b, &dsn, "2").await;
    assert_eq!(
        applied_names(&outcome),
        ["V2__email.sql", "V3__name.sql"],
        "{outcome:?}"
    );
    assert!(
        log(cluster, &with_log)
            .await
            .iter()
            .all(|r| r.2 == "applied")
    );

    // A new, empty tenant is never baselined: every version runs.
    let (fresh, dsn) = tenant(cluster, "baseline_new_").await;
    match run_with_baseline(&b, &dsn, "2").await {
        Outcome::Applied {
            scripts,
            notes,
            baselined,
        } => {
            assert_eq!(baselined, 0);
            assert_eq!(scripts.len(), 3, "{scripts:?}");
            assert!(
                notes.iter().any(|n| n.contains("no schema of its own")),
                "{notes:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(log(cluster, &fresh).await.iter().all(|r| r.2 == "applied"));
}

/// Issue 17: a tenant's transactional scripts go in one message, a block each. An error
/// while the third of five runs leaves exactly the first two committed, with their log
/// rows and the durations measured in their blocks; the fourth and fifth never ran.
#[tokio::test]
async fn an_error_in_the_third_of_five_scripts_commits_exactly_the_first_two() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "one_message_").await;
    let b = bundle(&[
        ("V1__a.sql", "CREATE TABLE a (id int);"),
        ("V2__b.sql", "INSERT INTO a VALUES (1), (2);"),
        (
            "V3__bad.sql",
            "INSERT INTO a VALUES (3);\nSELECT 1 / (SELECT count(*) - 3 FROM a);",
        ),
        ("V4__d.sql", "CREATE TABLE d (id int);"),
        ("V5__e.sql", "CREATE TABLE e (id int);"),
    ]);
    match run(&b, &dsn).await {
        Outcome::Failed { scripts, error } => {
            let names: Vec<_> = scripts.iter().map(|s| s.script.as_str()).collect();
            assert_eq!(names, ["V1__a.sql", "V2__b.sql"]);
            assert_eq!(error.script(), Some("V3__bad.sql"), "{error}");
            assert_eq!(error.sqlstate(), Some("22012"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    let c = cluster.connect(&db).await.expect("connect");
    let rows: Vec<(String, Option<i64>)> = c
        .query(
            "SELECT script, duration_ms FROM flotilla.execution_log ORDER BY id",
            &[],
        )
        .await
        .expect("log")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["V1__a.sql", "V2__b.sql"]
    );
    assert!(rows.iter().all(|r| r.1.is_some()), "{rows:?}");
    let count: i64 = c
        .query_one("SELECT count(*) FROM a", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 2, "V3's own insert rolled back with it");
    assert!(!exists(cluster, &db, "d").await && !exists(cluster, &db, "e").await);
}

/// A syntax error anywhere makes PostgreSQL refuse the whole message before running any
/// of it: the scripts before the bad one still run (as they would one message each),
/// and the error names the bad script and its line.
#[tokio::test]
async fn a_syntax_error_in_a_later_script_still_lets_the_earlier_ones_commit() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "one_message_syntax_").await;
    let b = bundle(&[
        ("V1__a.sql", "CREATE TABLE a (id int);"),
        ("V2__b.sql", "CREATE TABLE b (id int);"),
        ("V3__bad.sql", "SELECT 1;\nSELEC 2;"),
        ("V4__d.sql", "CREATE TABLE d (id int);"),
    ]);
    match run(&b, &dsn).await {
        Outcome::Failed { scripts, error } => {
            let names: Vec<_> = scripts.iter().map(|s| s.script.as_str()).collect();
            assert_eq!(names, ["V1__a.sql", "V2__b.sql"]);
            assert!(error.to_string().starts_with("V3__bad.sql:2: "), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert!(exists(cluster, &db, "a").await && exists(cluster, &db, "b").await);
    assert!(!exists(cluster, &db, "d").await);
    assert_eq!(log(cluster, &db).await.len(), 2);
}

/// A block that fails at its COMMIT (a deferred constraint) had sent its log row back:
/// its transaction is asked whether it committed, and it did not — the script is the
/// failure, the one before it is applied, the one after never ran.
#[tokio::test]
async fn a_script_failing_at_its_commit_is_not_counted_as_applied() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "commit_fails_").await;
    let b = bundle(&[
        (
            "V1__t.sql",
            "CREATE TABLE t (id int, CONSTRAINT t_once UNIQUE (id) DEFERRABLE INITIALLY DEFERRED);",
        ),
        ("V2__dup.sql", "INSERT INTO t VALUES (1), (1);"),
        ("V3__after.sql", "CREATE TABLE after_t (id int);"),
    ]);
    match run(&b, &dsn).await {
        Outcome::Failed { scripts, error } => {
            let names: Vec<_> = scripts.iter().map(|s| s.script.as_str()).collect();
            assert_eq!(names, ["V1__t.sql"]);
            assert_eq!(error.script(), Some("V2__dup.sql"), "{error}");
            assert_eq!(error.sqlstate(), Some("23505"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        log(cluster, &db)
            .await
            .iter()
            .map(|r| r.1.as_str())
            .collect::<Vec<_>>(),
        ["V1__t.sql"]
    );
    assert!(!exists(cluster, &db, "after_t").await);
}
