//! Preconditions (issue 19, part 4): `-- flotilla:precondition` in each `on-fail` mode
//! against real PostgreSQL, per script and per tenant.

use std::time::Duration;

use flotilla::apply::{Outcome, PlanOptions, StopSignal, TenantRun, TransactionMode, apply_tenant};
use flotilla::bundle::Bundle;
use flotilla::connect::SessionSettings;
use flotilla::dsn::Dsn;
use flotilla::failure::Retryability;
use flotilla_testkit::{Cluster, shared};

fn bundle(files: &[(&str, &str)]) -> Bundle {
    Bundle::from_sources(files, "test").expect("valid bundle")
}

async fn run(bundle: &Bundle, dsn: &Dsn, mode: TransactionMode) -> Outcome {
    let run = TenantRun {
        bundle,
        wave_id: "wave-pre",
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

async fn tenant(cluster: &Cluster, prefix: &str) -> (String, Dsn) {
    let names = cluster
        .create_tenants(prefix, 1, "")
        .await
        .expect("create tenant");
    let dsn = Dsn::parse(&cluster.url(&names[0])).expect("dsn");
    (names[0].clone(), dsn)
}

/// (script, status, source) rows in id order.
async fn log(cluster: &Cluster, db: &str) -> Vec<(String, String, Option<String>)> {
    let c = cluster.connect(db).await.expect("connect");
    c.query(
        "SELECT script, status, source FROM flotilla.execution_log ORDER BY id",
        &[],
    )
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
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

async fn exec(cluster: &Cluster, db: &str, sql: &str) {
    cluster
        .connect(db)
        .await
        .expect("connect")
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

const V1: (&str, &str) = ("V1__base.sql", "CREATE TABLE base (id int);");
const V3: (&str, &str) = ("V3__after.sql", "CREATE TABLE after_it (id int);");

/// V2 runs only where a `legacy` table exists.
fn with_precondition(on_fail: &str) -> Bundle {
    let v2 = format!(
        "-- flotilla:precondition on-fail={on_fail} SELECT to_regclass('legacy') IS NOT NULL\n\
         CREATE TABLE migrated_legacy (id int);"
    );
    bundle(&[V1, ("V2__legacy.sql", v2.as_str()), V3])
}

fn statuses(rows: &[(String, String, Option<String>)]) -> Vec<(&str, &str)> {
    rows.iter()
        .map(|(s, st, _)| (s.as_str(), st.as_str()))
        .collect()
}

#[tokio::test]
async fn a_true_precondition_runs_the_script() {
    let cluster = shared();
    for (i, mode) in ["fail", "skip", "mark-applied"].into_iter().enumerate() {
        let (db, dsn) = tenant(cluster, &format!("pre_true{i}_")).await;
        exec(cluster, &db, "CREATE TABLE legacy (id int)").await;
        let outcome = run(&with_precondition(mode), &dsn, TransactionMode::PerScript).await;
        assert!(
            matches!(outcome, Outcome::Applied { .. }),
            "{mode}: {outcome:?}"
        );
        assert!(exists(cluster, &db, "migrated_legacy").await, "{mode}");
        assert_eq!(
            statuses(&log(cluster, &db).await),
            [
                ("V1__base.sql", "applied"),
                ("V2__legacy.sql", "applied"),
                ("V3__after.sql", "applied")
            ]
        );
    }
}

#[tokio::test]
async fn on_fail_fail_stops_the_tenant_before_the_script_runs() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "pre_fail_").await;
    let outcome = run(&with_precondition("fail"), &dsn, TransactionMode::PerScript).await;
    let Outcome::Failed { scripts, error } = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(scripts.len(), 1, "V1 committed before");
    assert_eq!(error.script(), Some("V2__legacy.sql"));
    assert_eq!(error.retryability(), Retryability::Permanent);
    assert!(
        error
            .to_string()
            .contains("precondition of V2__legacy.sql is not true")
            && error.to_string().contains("to_regclass('legacy')"),
        "{error}"
    );
    assert!(!exists(cluster, &db, "migrated_legacy").await);
    assert!(
        !exists(cluster, &db, "after_it").await,
        "nothing after it ran"
    );
    assert_eq!(
        statuses(&log(cluster, &db).await),
        [("V1__base.sql", "applied")]
    );
}

#[tokio::test]
async fn on_fail_skip_records_a_skipped_row_and_asks_again_next_time() {
    let cluster = shared();
    for (i, mode) in [TransactionMode::PerScript, TransactionMode::PerTenant]
        .into_iter()
        .enumerate()
    {
        let (db, dsn) = tenant(cluster, &format!("pre_skip{i}_")).await;
        let b = with_precondition("skip");
        let outcome = run(&b, &dsn, mode).await;
        let Outcome::Applied { scripts, notes, .. } = &outcome else {
            panic!("{mode:?}: {outcome:?}")
        };
        assert_eq!(
            scripts
                .iter()
                .map(|s| s.script.as_str())
                .collect::<Vec<_>>(),
            ["V1__base.sql", "V3__after.sql"],
            "{mode:?}: the skipped script is not reported applied"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.contains("V2__legacy.sql: precondition not true")),
            "{notes:?}"
        );
        assert!(!exists(cluster, &db, "migrated_legacy").await);
        assert!(exists(cluster, &db, "after_it").await, "the rest ran");
        let rows = log(cluster, &db).await;
        assert_eq!(
            statuses(&rows),
            [
                ("V1__base.sql", "applied"),
                ("V2__legacy.sql", "skipped"),
                ("V3__after.sql", "applied")
            ],
            "{mode:?}"
        );
        let source = rows[1].2.clone().unwrap_or_default();
        assert!(
            source.contains("on-fail=skip") && source.contains("to_regclass('legacy')"),
            "{source}"
        );

        // Still false: skipped again, once (the old row is replaced, not doubled).
        let again = run(&b, &dsn, mode).await;
        assert!(matches!(again, Outcome::Applied { .. }), "{again:?}");
        assert_eq!(log(cluster, &db).await.len(), 3, "{mode:?}");

        // True now: it runs, although V3 is applied (skipped is not out of order).
        exec(cluster, &db, "CREATE TABLE legacy (id int)").await;
        let outcome = run(&b, &dsn, mode).await;
        let Outcome::Applied { scripts, .. } = &outcome else {
            panic!("{mode:?}: {outcome:?}")
        };
        assert_eq!(
            scripts
                .iter()
                .map(|s| s.script.as_str())
                .collect::<Vec<_>>(),
            ["V2__legacy.sql"]
        );
        assert!(exists(cluster, &db, "migrated_legacy").await);
        let rows = log(cluster, &db).await;
        assert_eq!(
            statuses(&rows),
            [
                ("V1__base.sql", "applied"),
                ("V3__after.sql", "applied"),
                ("V2__legacy.sql", "applied")
            ]
        );
    }
}

#[tokio::test]
async fn on_fail_mark_applied_records_it_done_and_never_runs_it() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "pre_mark_").await;
    let b = with_precondition("mark-applied");
    let outcome = run(&b, &dsn, TransactionMode::PerScript).await;
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    let rows = log(cluster, &db).await;
    assert_eq!(
        statuses(&rows),
        [
            ("V1__base.sql", "applied"),
            ("V2__legacy.sql", "baselined"),
            ("V3__after.sql", "applied")
        ]
    );
    assert!(
        rows[1]
            .2
            .as_deref()
            .unwrap_or("")
            .contains("on-fail=mark-applied"),
        "{rows:?}"
    );
    assert!(!exists(cluster, &db, "migrated_legacy").await);
    // Even once true, a marked script is done.
    exec(cluster, &db, "CREATE TABLE legacy (id int)").await;
    let outcome = run(&b, &dsn, TransactionMode::PerScript).await;
    assert!(matches!(outcome, Outcome::UpToDate { .. }), "{outcome:?}");
    assert!(!exists(cluster, &db, "migrated_legacy").await);
}

#[test]
fn a_precondition_is_checked_when_the_bundle_is_read() {
    let problems = |files: &[(&str, &str)]| match Bundle::from_sources(files, "test") {
        Ok(_) => Vec::new(),
        Err(e) => vec![e.to_string()],
    };
    for (script, why) in [
        (
            "-- flotilla:precondition on-fail=maybe SELECT true\nselect 1;",
            "not fail, skip or mark-applied",
        ),
        (
            "-- flotilla:precondition on-fail=skip\nselect 1;",
            "needs a query",
        ),
        (
            "-- flotilla:precondition SELECT true; SELECT false\nselect 1;",
            "one query",
        ),
        (
            "-- flotilla:no-transaction\n-- flotilla:precondition SELECT true\nvacuum;",
            "cannot have one",
        ),
        (
            "-- flotilla:precondition SELECT '$flotilla_precondition$' = ''\nselect 1;",
            "without",
        ),
    ] {
        let p = problems(&[("V1__a.sql", script)]);
        assert!(
            p.len() == 1 && p[0].contains(why),
            "{script:?}: expected {why:?} in {p:?}"
        );
    }
    let ok = Bundle::from_sources(
        &[(
            "V1__a.sql",
            "-- flotilla:precondition SELECT count(*) = 0 FROM pg_tables on-fail=skip\nselect 1;",
        )],
        "test",
    )
    .expect("valid");
    let p = ok.scripts()[0]
        .directives
        .precondition
        .clone()
        .expect("precondition");
    assert_eq!(p.sql, "SELECT count(*) = 0 FROM pg_tables");
    assert_eq!(p.on_fail, flotilla::bundle::OnFail::Skip);
}

/// A log made by an earlier build (its status check without `skipped`) is widened
/// under the tenant's lock before a script is skipped.
#[tokio::test]
async fn an_older_log_learns_the_skipped_status() {
    let cluster = shared();
    let (db, dsn) = tenant(cluster, "pre_old_").await;
    exec(
        cluster,
        &db,
        "CREATE SCHEMA flotilla;
         CREATE TABLE flotilla.execution_log (
            id bigserial PRIMARY KEY, version text, script text NOT NULL,
            kind text NOT NULL CONSTRAINT execution_log_kind_check
                CHECK (kind IN ('versioned', 'repeatable', 'baseline')),
            checksum text NOT NULL, bundle_id text NOT NULL, wave_id text NOT NULL,
            status text NOT NULL CONSTRAINT execution_log_status_check
                CHECK (status IN ('applied', 'started', 'baselined', 'undone')),
            applied_at timestamptz, applied_by text NOT NULL DEFAULT current_user,
            xact_id text, duration_ms bigint, statements_done integer,
            started_at timestamptz NOT NULL DEFAULT clock_timestamp(), source text);
         CREATE UNIQUE INDEX execution_log_version_once
            ON flotilla.execution_log (version) WHERE kind = 'versioned';",
    )
    .await;
    let outcome = run(&with_precondition("skip"), &dsn, TransactionMode::PerScript).await;
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    assert_eq!(
        statuses(&log(cluster, &db).await),
        [
            ("V1__base.sql", "applied"),
            ("V2__legacy.sql", "skipped"),
            ("V3__after.sql", "applied")
        ]
    );
}
