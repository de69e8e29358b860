//! Flyway's callbacks (issue 19, part 3): beforeMigrate, beforeEachMigrate,
//! afterEachMigrate, afterMigrate and afterMigrateError run at their points on each
//! tenant, are never recorded as versions, and an afterMigrate check that raises fails
//! exactly the tenants it should, with its message.

use std::time::Duration;

use flotilla::apply::{Outcome, PlanOptions, StopSignal, TenantRun, TransactionMode, apply_tenant};
use flotilla::bundle::Bundle;
use flotilla::connect::SessionSettings;
use flotilla::dsn::Dsn;
use flotilla_testkit::{Cluster, shared};

fn bundle(files: &[(&str, &str)]) -> Bundle {
    Bundle::from_sources(files, "test").expect("valid bundle")
}

async fn run(bundle: &Bundle, dsn: &Dsn, mode: TransactionMode) -> Outcome {
    let run = TenantRun {
        bundle,
        wave_id: "wave-cb",
        dsn,
        reach: &flotilla::reach::Reach::default(),
        settings: SessionSettings {
            lock_timeout: Duration::from_secs(5),
            ..SessionSettings::default()
        },
        mode,
        plan_options: PlanOptions::default(),
        prior: None,
        guard: None,
        max_block: Duration::from_secs(1),
        undo: flotilla::apply::Undo::None,
    };
    apply_tenant(&run, &StopSignal::new()).await
}

async fn tenants(cluster: &Cluster, prefix: &str, n: usize) -> Vec<(String, Dsn)> {
    cluster
        .create_tenants(prefix, n, "")
        .await
        .expect("create tenants")
        .into_iter()
        .map(|db| {
            let dsn = Dsn::parse(&cluster.url(&db)).expect("dsn");
            (db, dsn)
        })
        .collect()
}

async fn query(cluster: &Cluster, db: &str, sql: &str) -> Vec<String> {
    cluster
        .connect(db)
        .await
        .expect("connect")
        .query(sql, &[])
        .await
        .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
        .unwrap_or_default()
}

async fn exec(cluster: &Cluster, db: &str, sql: &str) {
    cluster
        .connect(db)
        .await
        .expect("connect")
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Every callback appends to `audit`; `trail` reads it back.
const BEFORE: (&str, &str) = (
    "beforeMigrate.sql",
    "CREATE TABLE IF NOT EXISTS audit (n bigserial, what text);\nINSERT INTO audit (what) VALUES ('before');",
);
const BEFORE_EACH: (&str, &str) = (
    "beforeEachMigrate.sql",
    "INSERT INTO audit (what) VALUES ('before-each');",
);
const AFTER_EACH: (&str, &str) = (
    "afterEachMigrate.sql",
    "INSERT INTO audit (what) VALUES ('after-each');",
);
const AFTER: (&str, &str) = (
    "afterMigrate__record.sql",
    "INSERT INTO audit (what) VALUES ('after');",
);
const ON_ERROR: (&str, &str) = (
    "afterMigrateError.sql",
    "CREATE TABLE IF NOT EXISTS audit (n bigserial, what text);\nINSERT INTO audit (what) VALUES ('error');",
);

async fn trail(cluster: &Cluster, db: &str) -> Vec<String> {
    query(cluster, db, "SELECT what FROM audit ORDER BY n").await
}

async fn logged(cluster: &Cluster, db: &str) -> Vec<String> {
    query(
        cluster,
        db,
        "SELECT script FROM flotilla.execution_log ORDER BY id",
    )
    .await
}

#[tokio::test]
async fn callbacks_run_at_their_points_and_are_never_logged() {
    let cluster = shared();
    let b = bundle(&[
        BEFORE,
        BEFORE_EACH,
        AFTER_EACH,
        AFTER,
        ON_ERROR,
        ("V1__t.sql", "CREATE TABLE t (id int, note text);"),
        ("V2__fill.sql", "INSERT INTO t VALUES (1, 'ok');"),
        (
            "V3__index.sql",
            "-- flotilla:no-transaction\nCREATE INDEX CONCURRENTLY t_id ON t (id);",
        ),
    ]);
    for (i, mode) in [TransactionMode::PerScript, TransactionMode::PerTenant]
        .into_iter()
        .enumerate()
    {
        let (db, dsn) = tenants(cluster, &format!("cb_order{i}_"), 1)
            .await
            .remove(0);
        let outcome = run(&b, &dsn, mode).await;
        let Outcome::Applied { scripts, .. } = &outcome else {
            panic!("{mode:?}: {outcome:?}")
        };
        assert_eq!(scripts.len(), 3, "callbacks are not reported as scripts");
        assert_eq!(
            trail(cluster, &db).await,
            [
                "before",
                "before-each",
                "after-each",
                "before-each",
                "after-each",
                "before-each",
                "after-each",
                "after"
            ],
            "{mode:?}"
        );
        assert_eq!(
            logged(cluster, &db).await,
            ["V1__t.sql", "V2__fill.sql", "V3__index.sql"],
            "only migrations are logged"
        );
        // Nothing pending: beforeMigrate and afterMigrate still run (as Flyway's do).
        let again = run(&b, &dsn, mode).await;
        assert!(matches!(again, Outcome::UpToDate { .. }), "{again:?}");
        let t = trail(cluster, &db).await;
        assert_eq!(&t[8..], ["before", "after"], "{mode:?}");
    }
}

#[tokio::test]
async fn a_failing_after_migrate_check_fails_exactly_the_tenants_it_should() {
    let cluster = shared();
    let check = (
        "afterMigrate.sql",
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM accounts WHERE email IS NULL) THEN \
         RAISE EXCEPTION 'check failed: accounts without an email'; END IF; END $$;",
    );
    let b = bundle(&[
        check,
        ON_ERROR,
        (
            "V1__accounts.sql",
            "CREATE TABLE IF NOT EXISTS accounts (id int, email text);",
        ),
    ]);
    let fleet = tenants(cluster, "cb_check_", 4).await;
    // Tenants 2 and 4 hold a row the check refuses.
    for (db, _) in [&fleet[1], &fleet[3]] {
        exec(
            cluster,
            db,
            "CREATE TABLE accounts (id int, email text); INSERT INTO accounts VALUES (1, NULL);",
        )
        .await;
    }
    let mut failed = Vec::new();
    for (db, dsn) in &fleet {
        match run(&b, dsn, TransactionMode::PerScript).await {
            Outcome::Applied { .. } => {}
            Outcome::Failed { scripts, error } => {
                assert_eq!(error.script(), Some("afterMigrate.sql"));
                assert!(
                    error
                        .to_string()
                        .contains("check failed: accounts without an email"),
                    "{error}"
                );
                assert_eq!(error.sqlstate(), Some("P0001"));
                assert_eq!(scripts.len(), 1, "V1 committed before the check ran");
                failed.push(db.clone());
            }
            other => panic!("{db}: {other:?}"),
        }
    }
    assert_eq!(failed, [fleet[1].0.clone(), fleet[3].0.clone()]);
    // afterMigrateError ran where the run failed, and only there.
    for (db, _) in &fleet {
        let errors = trail(cluster, db).await;
        let expected: &[&str] = if failed.contains(db) { &["error"] } else { &[] };
        assert_eq!(errors, expected, "{db}");
    }
    // Fixed by hand: the next run (nothing pending) passes the check.
    exec(
        cluster,
        &fleet[1].0,
        "UPDATE accounts SET email = 'a@b.invalid'",
    )
    .await;
    let outcome = run(&b, &fleet[1].1, TransactionMode::PerScript).await;
    assert!(matches!(outcome, Outcome::UpToDate { .. }), "{outcome:?}");
}

#[tokio::test]
async fn after_each_migrate_fails_its_script_in_the_scripts_transaction() {
    let cluster = shared();
    let b = bundle(&[
        (
            "afterEachMigrate.sql",
            "DO $$ BEGIN IF to_regclass('forbidden') IS NOT NULL THEN \
             RAISE EXCEPTION 'forbidden table'; END IF; END $$;",
        ),
        ("V1__ok.sql", "CREATE TABLE fine (id int);"),
        ("V2__bad.sql", "CREATE TABLE forbidden (id int);"),
    ]);
    let (db, dsn) = tenants(cluster, "cb_each_", 1).await.remove(0);
    let outcome = run(&b, &dsn, TransactionMode::PerScript).await;
    let Outcome::Failed { scripts, error } = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(error.script(), Some("V2__bad.sql"));
    assert!(error.to_string().contains("forbidden table"), "{error}");
    assert_eq!(scripts.len(), 1);
    assert_eq!(logged(cluster, &db).await, ["V1__ok.sql"]);
    assert!(
        query(
            cluster,
            &db,
            "SELECT relname::text FROM pg_class WHERE relname = 'forbidden'"
        )
        .await
        .is_empty(),
        "V2 rolled back with its callback"
    );
}

#[test]
fn callbacks_are_checked_when_the_bundle_is_read() {
    let refused = |files: &[(&str, &str)]| match Bundle::from_sources(files, "test") {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let e = refused(&[("afterMigrateApplied.sql", "select 1;")]);
    assert!(
        e.contains("Flyway callback afterMigrateApplied") && e.contains("remove or rename"),
        "{e}"
    );
    let e = refused(&[("afterMigrate.sql", "-- flotilla:no-transaction\nvacuum;")]);
    assert!(e.contains("a callback runs in a transaction"), "{e}");
    let b = Bundle::from_sources(
        &[
            ("afterMigrate__b.sql", "select 2;"),
            ("afterMigrate__a.sql", "select 1;"),
            ("afterMigrateError.sql", "select 3;"),
            ("V1__x.sql", "select 0;"),
        ],
        "test",
    )
    .expect("valid");
    let after: Vec<&str> = b
        .callbacks(flotilla::bundle::Callback::AfterMigrate)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(after, ["afterMigrate__a.sql", "afterMigrate__b.sql"]);
    assert_eq!(
        b.callbacks(flotilla::bundle::Callback::AfterMigrateError)
            .count(),
        1,
        "afterMigrateError is not read as afterMigrate"
    );
    // A plain folder keeps its id: callbacks enter it only when present.
    let plain = Bundle::from_sources(&[("V1__x.sql", "select 0;")], "test").expect("valid");
    assert_ne!(plain.id(), b.id());
}
