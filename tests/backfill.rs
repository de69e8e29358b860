//! Batched backfills (issue 19, part 2): a `-- flotilla:batch` script runs its one
//! statement again and again, each run a short transaction of its own that records the
//! run's rows in the log row, until a run changes nothing; an interrupted backfill
//! continues (the statement's WHERE is the cursor) and every row is changed once.

use std::time::Duration;

use flotilla::apply::{Outcome, PlanOptions, StopSignal, TenantRun, TransactionMode, apply_tenant};
use flotilla::bundle::Bundle;
use flotilla::connect::SessionSettings;
use flotilla::dsn::Dsn;
use flotilla_testkit::{Cluster, shared};

fn bundle(files: &[(&str, &str)]) -> Bundle {
    Bundle::from_sources(files, "test").expect("valid bundle")
}

async fn run(bundle: &Bundle, dsn: &Dsn, stop: &StopSignal) -> Outcome {
    let run = TenantRun {
        bundle,
        wave_id: "wave-bf",
        dsn,
        reach: &flotilla::reach::Reach::default(),
        settings: SessionSettings {
            lock_timeout: Duration::from_secs(5),
            ..SessionSettings::default()
        },
        mode: TransactionMode::PerScript,
        plan_options: PlanOptions::default(),
        prior: None,
        guard: None,
        max_block: Duration::from_secs(1),
        undo: flotilla::apply::Undo::None,
    };
    apply_tenant(&run, stop).await
}

async fn tenant(cluster: &Cluster, prefix: &str, rows: i64) -> (String, Dsn) {
    let db = cluster
        .create_tenants(prefix, 1, "")
        .await
        .expect("create tenant")
        .remove(0);
    cluster
        .connect(&db)
        .await
        .expect("connect")
        .batch_execute(&format!(
            "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false);
             INSERT INTO items (id) SELECT g FROM generate_series(1, {rows}) g;"
        ))
        .await
        .expect("items");
    let dsn = Dsn::parse(&cluster.url(&db)).expect("dsn");
    (db, dsn)
}

fn backfill(pause: &str) -> Bundle {
    let script = format!(
        "-- flotilla:batch\n{pause}\
         UPDATE items SET n = n + 1, done = true\n\
         WHERE id IN (SELECT id FROM items WHERE NOT done ORDER BY id LIMIT 1000);"
    );
    bundle(&[
        (
            "V1__flag.sql",
            "CREATE TABLE IF NOT EXISTS marker (id int);",
        ),
        ("V2__backfill.sql", script.as_str()),
        ("V3__after.sql", "CREATE TABLE after_backfill (id int);"),
    ])
}

/// (status, batches, rows) of the backfill's log row.
async fn progress(cluster: &Cluster, db: &str) -> Option<(String, i32, i64)> {
    let c = cluster.connect(db).await.expect("connect");
    c.query_opt(
        "SELECT status, COALESCE(statements_done, 0), COALESCE(rows_changed, 0) \
         FROM flotilla.execution_log WHERE script = 'V2__backfill.sql'",
        &[],
    )
    .await
    .ok()
    .flatten()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Rows changed other than exactly once.
async fn not_once(cluster: &Cluster, db: &str) -> i64 {
    let c = cluster.connect(db).await.expect("connect");
    c.query_one("SELECT count(*) FROM items WHERE n <> 1 OR NOT done", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn a_backfill_runs_in_batches_until_nothing_is_left() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "bf_all_", 20_500).await;
    let outcome = run(&backfill(""), &dsn, &StopSignal::new()).await;
    let Outcome::Applied { scripts, .. } = &outcome else {
        panic!("{outcome:?}")
    };
    let names: Vec<(&str, Option<u64>)> = scripts
        .iter()
        .map(|s| (s.script.as_str(), s.rows))
        .collect();
    assert_eq!(
        names,
        [
            ("V1__flag.sql", None),
            ("V2__backfill.sql", Some(20_500)),
            ("V3__after.sql", None)
        ]
    );
    assert_eq!(
        progress(cluster, &db).await,
        Some(("applied".to_string(), 21, 20_500)),
        "21 runs changed rows (the 22nd changed none)"
    );
    assert_eq!(not_once(cluster, &db).await, 0);
}

#[tokio::test]
async fn an_interrupted_backfill_continues_and_changes_every_row_once() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "bf_stop_", 10_000).await;
    let b = backfill("-- flotilla:batch-pause 100ms\n");
    let stop = StopSignal::new();
    let task = {
        let (b, dsn, stop) = (b.clone(), dsn.clone(), stop.clone());
        tokio::spawn(async move { run(&b, &dsn, &stop).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if progress(cluster, &db)
            .await
            .is_some_and(|(_, batches, _)| batches >= 3)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.stop_at_boundary();
    let outcome = task.await.expect("join");
    assert!(matches!(outcome, Outcome::Cancelled { .. }), "{outcome:?}");
    let (status, batches, rows) = progress(cluster, &db).await.expect("row");
    assert_eq!(status, "started");
    assert!((3..10).contains(&batches), "{batches}");
    assert_eq!(rows, i64::from(batches) * 1000, "the count is exact");

    let outcome = run(&b, &dsn, &StopSignal::new()).await;
    let Outcome::Applied { scripts, .. } = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(scripts[0].rows, Some(10_000), "the total over both runs");
    assert_eq!(
        progress(cluster, &db).await,
        Some(("applied".to_string(), 10, 10_000))
    );
    assert_eq!(not_once(cluster, &db).await, 0);
}

#[test]
fn a_batch_script_is_one_bounded_data_change() {
    let refused = |script: &str| match Bundle::from_sources(&[("V1__b.sql", script)], "test") {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    for (script, why) in [
        (
            "-- flotilla:batch\nUPDATE t SET a = 1 WHERE NOT done;",
            "LIMIT",
        ),
        (
            "-- flotilla:batch\nUPDATE t SET a = 1 WHERE id IN (SELECT id FROM t LIMIT 5);\nUPDATE t SET b = 1 WHERE id IN (SELECT id FROM t LIMIT 5);",
            "exactly one",
        ),
        (
            "-- flotilla:batch\nSELECT * FROM t LIMIT 5;",
            "must change rows",
        ),
        (
            "-- flotilla:batch\nDELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 5) RETURNING id;",
            "RETURNING",
        ),
        (
            "-- flotilla:batch-pause 1s\nUPDATE t SET a = 1;",
            "needs flotilla:batch",
        ),
        (
            "-- flotilla:batch\n-- flotilla:batch-pause 2h\nDELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 5);",
            "at most",
        ),
    ] {
        let e = refused(script);
        assert!(e.contains(why), "{script:?}: expected {why:?} in {e:?}");
    }
    let ok = Bundle::from_sources(
        &[(
            "V1__b.sql",
            "-- flotilla:batch\n-- flotilla:batch-pause 50ms\nWITH next AS (SELECT id FROM t WHERE NOT done LIMIT 100)\nUPDATE t SET done = true FROM next WHERE t.id = next.id;",
        )],
        "test",
    )
    .expect("valid");
    let d = &ok.scripts()[0].directives;
    assert!(d.batch);
    assert_eq!(d.batch_pause, Some(Duration::from_millis(50)));
    let repeatable = match Bundle::from_sources(
        &[(
            "R__b.sql",
            "-- flotilla:batch\nDELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 5);",
        )],
        "test",
    ) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    assert!(repeatable.contains("must be versioned"), "{repeatable}");
}
