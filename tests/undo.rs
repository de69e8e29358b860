//! Undo, rehearsed (issue 19, part 5): `U<version>__…` undo scripts run newest first
//! with each version's log row marked `undone` in the same transaction; forward, undo,
//! forward again leaves the schema and the log a straight run leaves; a version without
//! an undo script refuses the undo before anything runs; a canary rehearsal catches an
//! undo script that does not undo.

use std::time::Duration;

use flotilla::apply::{
    ApplyError, Outcome, PlanOptions, StopSignal, TenantRun, TransactionMode, Undo, apply_tenant,
};
use flotilla::bundle::Bundle;
use flotilla::census::fingerprint::{FINGERPRINT_SQL, Schema};
use flotilla::connect::SessionSettings;
use flotilla::dsn::Dsn;
use flotilla_testkit::{Cluster, shared};

fn bundle(files: &[(&str, &str)]) -> Bundle {
    Bundle::from_sources(files, "test").expect("valid bundle")
}

async fn run(bundle: &Bundle, dsn: &Dsn, undo: Undo) -> Outcome {
    let run = TenantRun {
        bundle,
        wave_id: "wave-undo",
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
        undo,
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

const V1: (&str, &str) = (
    "V1__accounts.sql",
    "CREATE TABLE accounts (id int PRIMARY KEY);",
);
const V2: (&str, &str) = (
    "V2__orders.sql",
    "CREATE TABLE orders (id int PRIMARY KEY, account int REFERENCES accounts (id));\nCREATE INDEX orders_account ON orders (account);",
);
const V3: (&str, &str) = (
    "V3__email.sql",
    "ALTER TABLE accounts ADD COLUMN email text;",
);
const U2: (&str, &str) = ("U2__orders.sql", "DROP TABLE orders;");
const U3: (&str, &str) = ("U3__email.sql", "ALTER TABLE accounts DROP COLUMN email;");

/// (version, script, kind, checksum, status) in version order.
async fn log(cluster: &Cluster, db: &str) -> Vec<(String, String, String, String, String)> {
    let c = cluster.connect(db).await.expect("connect");
    c.query(
        "SELECT version, script, kind, checksum, status FROM flotilla.execution_log \
         ORDER BY string_to_array(version, '.')::int[]",
        &[],
    )
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect()
    })
    .unwrap_or_default()
}

async fn schema(cluster: &Cluster, db: &str) -> Schema {
    let c = cluster.connect(db).await.expect("connect");
    Schema::from_messages(&c.simple_query(FINGERPRINT_SQL).await.expect("fingerprint"))
}

#[tokio::test]
async fn forward_undo_forward_equals_a_straight_run() {
    let cluster = shared();
    let b = bundle(&[V1, V2, V3, U2, U3]);
    let t = tenants(cluster, "undo_ffw_", 2).await;
    let ((db, dsn), (straight, straight_dsn)) = (&t[0], &t[1]);
    assert!(matches!(
        run(&b, dsn, Undo::None).await,
        Outcome::Applied { .. }
    ));

    let target = "1".parse().expect("version");
    let undone = run(&b, dsn, Undo::To(target)).await;
    let Outcome::Applied { scripts, .. } = &undone else {
        panic!("{undone:?}")
    };
    assert_eq!(
        scripts
            .iter()
            .map(|s| s.script.as_str())
            .collect::<Vec<_>>(),
        ["U3__email.sql", "U2__orders.sql"],
        "newest first"
    );
    let statuses: Vec<(String, String)> = log(cluster, db)
        .await
        .into_iter()
        .map(|r| (r.0, r.4))
        .collect();
    assert_eq!(
        statuses,
        [
            ("1".to_string(), "applied".to_string()),
            ("2".into(), "undone".into()),
            ("3".into(), "undone".into())
        ]
    );
    // Undoing again finds nothing above V1.
    assert!(matches!(
        run(&b, dsn, Undo::To("1".parse().expect("v"))).await,
        Outcome::UpToDate { .. }
    ));

    let again = run(&b, dsn, Undo::None).await;
    assert!(matches!(again, Outcome::Applied { .. }), "{again:?}");
    assert!(matches!(
        run(&b, straight_dsn, Undo::None).await,
        Outcome::Applied { .. }
    ));
    assert_eq!(log(cluster, db).await, log(cluster, straight).await);
    assert_eq!(
        schema(cluster, db).await.fingerprint(),
        schema(cluster, straight).await.fingerprint()
    );
}

#[tokio::test]
async fn a_version_without_an_undo_script_refuses_the_undo_before_anything_runs() {
    let cluster = shared();
    let b = bundle(&[V1, V2, V3, U3]);
    let (db, dsn) = tenants(cluster, "undo_miss_", 1).await.remove(0);
    assert!(matches!(
        run(&b, &dsn, Undo::None).await,
        Outcome::Applied { .. }
    ));
    let before = (log(cluster, &db).await, schema(cluster, &db).await);
    let outcome = run(&b, &dsn, Undo::To("1".parse().expect("v"))).await;
    let Outcome::Failed { scripts, error } = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(scripts.is_empty());
    assert!(matches!(error, ApplyError::Undo(_)), "{error:?}");
    assert!(
        error.to_string().contains("version 2") && error.to_string().contains("no undo script"),
        "{error}"
    );
    assert_eq!(
        (log(cluster, &db).await, schema(cluster, &db).await),
        before,
        "U3 did not run although it exists"
    );
    assert_eq!(
        b.versions_without_undo()
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>(),
        ["1", "2"]
    );
}

#[tokio::test]
async fn a_rehearsal_runs_forward_undo_forward_and_catches_a_wrong_undo() {
    let cluster = shared();
    let t = tenants(cluster, "undo_reh_", 3).await;
    // Every tenant starts at V1.
    for (_, dsn) in &t {
        assert!(matches!(
            run(&bundle(&[V1]), dsn, Undo::None).await,
            Outcome::Applied { .. }
        ));
    }

    let good = bundle(&[V1, V2, V3, U2, U3]);
    let outcome = run(&good, &t[0].1, Undo::Rehearse).await;
    let Outcome::Applied { scripts, notes, .. } = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        scripts
            .iter()
            .map(|s| s.script.as_str())
            .collect::<Vec<_>>(),
        [
            "V2__orders.sql",
            "V3__email.sql",
            "U3__email.sql",
            "U2__orders.sql",
            "V2__orders.sql",
            "V3__email.sql"
        ]
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("undo rehearsed: U3__email.sql, U2__orders.sql")),
        "{notes:?}"
    );
    assert!(matches!(
        run(&good, &t[1].1, Undo::None).await,
        Outcome::Applied { .. }
    ));
    assert_eq!(log(cluster, &t[0].0).await, log(cluster, &t[1].0).await);
    assert_eq!(
        schema(cluster, &t[0].0).await.fingerprint(),
        schema(cluster, &t[1].0).await.fingerprint()
    );

    // An undo that forgets the column: applying V3 again fails, and says where.
    let wrong = bundle(&[V1, V2, V3, U2, ("U3__email.sql", "SELECT 1;")]);
    let outcome = run(&wrong, &t[2].1, Undo::Rehearse).await;
    let Outcome::Failed { error, .. } = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        matches!(
            error,
            ApplyError::Rehearsal {
                phase: "applying again",
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.script(), Some("V3__email.sql"));
    assert_eq!(
        error.sqlstate(),
        Some("42701"),
        "column already exists: {error}"
    );
}

/// A `no-transaction` version (its `started` row committed before it runs) undone and
/// applied again: the `undone` row is replaced in the transaction that writes the new
/// `started` row, not left to collide with it.
#[tokio::test]
async fn a_no_transaction_version_undone_applies_again() {
    let cluster = shared();
    let b = bundle(&[
        V1,
        (
            "V2__index.sql",
            "-- flotilla:no-transaction\nCREATE INDEX CONCURRENTLY accounts_id2 ON accounts (id);",
        ),
        ("U2__index.sql", "DROP INDEX accounts_id2;"),
    ]);
    let (db, dsn) = tenants(cluster, "undo_ntx_", 1).await.remove(0);
    assert!(matches!(
        run(&b, &dsn, Undo::None).await,
        Outcome::Applied { .. }
    ));
    let undone = run(&b, &dsn, Undo::To("1".parse().expect("v"))).await;
    assert!(matches!(undone, Outcome::Applied { .. }), "{undone:?}");
    let again = run(&b, &dsn, Undo::None).await;
    let Outcome::Applied { scripts, .. } = &again else {
        panic!("{again:?}")
    };
    assert_eq!(scripts[0].script, "V2__index.sql");
    let statuses: Vec<(String, String)> = log(cluster, &db)
        .await
        .into_iter()
        .map(|r| (r.0, r.4))
        .collect();
    assert_eq!(
        statuses,
        [
            ("1".to_string(), "applied".to_string()),
            ("2".into(), "applied".into())
        ]
    );
}
