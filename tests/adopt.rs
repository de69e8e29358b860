//! Adopting a fleet another tool migrated (issue 12), against real PostgreSQL: history
//! tables filled exactly as Flyway, golang-migrate, dbmate and sqlx fill them, a
//! Flyway-style folder (`tests/fixtures/bundles/flyway_app`), and the proof that nothing
//! ran twice (row counts) and that the adopted tenants end with the schema of a tenant
//! migrated from scratch (`pg_dump --schema-only`).

use std::path::Path;
use std::time::Duration;

use flotilla::apply::adopt::AdoptError;
use flotilla::apply::{
    ApplyError, Outcome, PlanOptions, Prior, StopSignal, TenantRun, TransactionMode, apply_tenant,
};
use flotilla::bundle::{self, Bundle, TransactionUse};
use flotilla::connect::SessionSettings;
use flotilla::dsn::Dsn;
use flotilla_testkit::{Cluster, shared};

fn flyway_app() -> Bundle {
    Bundle::load_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bundles/flyway_app"),
    )
    .expect("the Flyway-style fixture loads")
}

async fn run(bundle: &Bundle, dsn: &Dsn, prior: Option<Prior>) -> Outcome {
    let run = TenantRun {
        bundle,
        wave_id: "wave-adopt",
        dsn,
        reach: &flotilla::reach::Reach::default(),
        settings: SessionSettings {
            lock_timeout: Duration::from_secs(5),
            ..SessionSettings::default()
        },
        mode: TransactionMode::PerScript,
        plan_options: PlanOptions::default(),
        prior,
        guard: None,
        max_block: Duration::from_secs(1),
        undo: flotilla::apply::Undo::None,
    };
    apply_tenant(&run, &StopSignal::new()).await
}

fn adopt(source: &str) -> Option<Prior> {
    Some(Prior::Adopt(source.parse().expect("source")))
}

async fn tenant(cluster: &Cluster, prefix: &str) -> (String, Dsn) {
    let names = cluster
        .create_tenants(prefix, 1, "")
        .await
        .expect("create tenant");
    let dsn = Dsn::parse(&cluster.url(&names[0])).expect("dsn");
    (names[0].clone(), dsn)
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

async fn count(cluster: &Cluster, db: &str, sql: &str) -> i64 {
    cluster
        .connect(db)
        .await
        .expect("connect")
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

fn script<'a>(b: &'a Bundle, name: &str) -> &'a bundle::Script {
    b.scripts()
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no script {name}"))
}

/// Flyway's history table for PostgreSQL, as Flyway 9/10 creates it.
const FLYWAY_HISTORY_DDL: &str = "
CREATE TABLE public.flyway_schema_history (
    installed_rank integer NOT NULL,
    version character varying(50),
    description character varying(200) NOT NULL,
    type character varying(20) NOT NULL,
    script character varying(1000) NOT NULL,
    checksum integer,
    installed_by character varying(100) NOT NULL,
    installed_on timestamp without time zone DEFAULT now() NOT NULL,
    execution_time integer NOT NULL,
    success boolean NOT NULL,
    CONSTRAINT flyway_schema_history_pk PRIMARY KEY (installed_rank)
);
CREATE INDEX flyway_schema_history_s_idx ON public.flyway_schema_history (success);";

/// One history row as Flyway writes it after a migration.
fn flyway_row(rank: i32, s: &bundle::Script, checksum: i32, success: bool) -> String {
    let version = s
        .version()
        .map(|v| format!("'{v}'"))
        .unwrap_or_else(|| "NULL".into());
    format!(
        "INSERT INTO public.flyway_schema_history (installed_rank, version, description, type, \
         script, checksum, installed_by, execution_time, success) VALUES \
         ({rank}, {version}, '{}', 'SQL', '{}', {checksum}, 'flyway_deployer', 12, {success});",
        s.description, s.name
    )
}

/// Does what `flyway migrate` does with `names`, in order: each script (in a
/// transaction with its history row, or, for a script Flyway runs outside one, before
/// it), its history row with Flyway's checksum.
async fn flyway_migrate(cluster: &Cluster, db: &str, b: &Bundle, names: &[&str]) {
    exec(cluster, db, FLYWAY_HISTORY_DDL).await;
    for (rank, name) in names.iter().enumerate() {
        let s = script(b, name);
        let row = flyway_row(rank as i32 + 1, s, bundle::flyway_checksum(&s.sql), true);
        if s.directives.transaction == TransactionUse::NoTransaction {
            exec(cluster, db, &s.sql).await;
            exec(cluster, db, &row).await;
        } else {
            exec(
                cluster,
                db,
                &format!("BEGIN;\n{}\n;\n{row}\nCOMMIT;", s.sql),
            )
            .await;
        }
    }
}

/// Runs `names` by hand, as a person with psql would.
async fn by_hand(cluster: &Cluster, db: &str, b: &Bundle, names: &[&str]) {
    for name in names {
        exec(cluster, db, &script(b, name).sql).await;
    }
}

const EXCLUDE: &[&str] = &[
    "flotilla",
    "public.flyway_schema_history",
    "public.schema_migrations",
    "public._sqlx_migrations",
];

/// The schema of a tenant migrated from scratch by Flotilla, to compare with.
async fn reference_schema(cluster: &Cluster, b: &Bundle, prefix: &str) -> String {
    let (db, dsn) = tenant(cluster, prefix).await;
    assert!(matches!(run(b, &dsn, None).await, Outcome::Applied { .. }));
    cluster.dump_schema(&db, EXCLUDE).expect("dump")
}

fn applied_names(outcome: &Outcome) -> Vec<String> {
    match outcome {
        Outcome::Applied { scripts, .. } => scripts.iter().map(|s| s.script.clone()).collect(),
        Outcome::UpToDate { .. } => Vec::new(),
        other => panic!("expected the tenant migrated, got {other:?}"),
    }
}

/// (version, script, status, source, applied_by) of the log, in id order.
async fn log(
    cluster: &Cluster,
    db: &str,
) -> Vec<(Option<String>, String, String, Option<String>, String)> {
    cluster
        .connect(db)
        .await
        .expect("connect")
        .query(
            "SELECT version, script, status, source, applied_by FROM flotilla.execution_log ORDER BY id",
            &[],
        )
        .await
        .expect("log")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// The Flyway fleet: a tenant part-way (and one ahead of it), one that was baselined
/// under Flyway, one new. Adoption runs nothing twice (the `plans` seed keeps its two
/// rows), records who applied what, and every tenant ends with the reference schema.
#[tokio::test]
async fn adopting_a_flyway_fleet_runs_nothing_twice_and_ends_as_a_fresh_tenant() {
    let cluster = shared();
    let b = flyway_app();
    let reference = reference_schema(cluster, &b, "adopt_fw_reference_").await;

    // Part-way: Flyway ran V1, V1.1, V2.3 and the view.
    let (partial, dsn) = tenant(cluster, "adopt_fw_partial_").await;
    flyway_migrate(
        cluster,
        &partial,
        &b,
        &[
            "V1__create_accounts.sql",
            "V1_1__accounts_email.sql",
            "V2.3__plans.sql",
            "R__account_summary.sql",
        ],
    )
    .await;
    let outcome = run(&b, &dsn, adopt("flyway")).await;
    assert_eq!(
        applied_names(&outcome),
        [
            "V3__index_accounts_plan.sql",
            "V20240101120000__audit.sql",
            "R__plan_count.sql"
        ]
    );
    let Outcome::Applied { notes, .. } = &outcome else {
        unreachable!()
    };
    assert!(
        notes
            .iter()
            .any(|n| n.contains("recorded 4 scripts as baselined")
                && n.contains("flyway=public.flyway_schema_history")),
        "{notes:?}"
    );
    assert_eq!(
        count(cluster, &partial, "SELECT count(*) FROM plans").await,
        2
    );
    let rows = log(cluster, &partial).await;
    let baselined: Vec<_> = rows.iter().filter(|r| r.2 == "baselined").collect();
    assert_eq!(baselined.len(), 4, "{rows:?}");
    assert!(
        baselined.iter().all(|r| r.4 == "flyway_deployer"),
        "{rows:?}"
    );
    assert!(
        baselined[0]
            .3
            .as_deref()
            .is_some_and(|s| s.contains("installed_rank 1 checksum")),
        "{rows:?}"
    );
    assert_eq!(
        cluster.dump_schema(&partial, EXCLUDE).expect("dump"),
        reference
    );
    // A second wave finds the log, not the history: nothing to do.
    assert!(matches!(
        run(&b, &dsn, adopt("flyway")).await,
        Outcome::UpToDate { .. }
    ));

    // Ahead: Flyway ran everything (the index outside a transaction, as Flyway does).
    let (ahead, dsn) = tenant(cluster, "adopt_fw_ahead_").await;
    let all: Vec<&str> = b.scripts().iter().map(|s| s.name.as_str()).collect();
    flyway_migrate(cluster, &ahead, &b, &all).await;
    let outcome = run(&b, &dsn, adopt("flyway")).await;
    assert!(applied_names(&outcome).is_empty(), "{outcome:?}");
    assert_eq!(log(cluster, &ahead).await.len(), all.len());
    assert_eq!(
        count(cluster, &ahead, "SELECT count(*) FROM plans").await,
        2
    );
    assert_eq!(
        cluster.dump_schema(&ahead, EXCLUDE).expect("dump"),
        reference
    );

    // Baselined under Flyway at 1.1 (the first two by hand), then V2.3 by Flyway.
    let (baselined, dsn) = tenant(cluster, "adopt_fw_baseline_").await;
    by_hand(
        cluster,
        &baselined,
        &b,
        &["V1__create_accounts.sql", "V1_1__accounts_email.sql"],
    )
    .await;
    exec(cluster, &baselined, FLYWAY_HISTORY_DDL).await;
    exec(
        cluster,
        &baselined,
        "INSERT INTO public.flyway_schema_history VALUES (1, '1.1', '<< Flyway Baseline >>', \
         'BASELINE', '<< Flyway Baseline >>', NULL, 'flyway_deployer', now(), 0, true)",
    )
    .await;
    let s = script(&b, "V2.3__plans.sql");
    exec(cluster, &baselined, &s.sql).await;
    exec(
        cluster,
        &baselined,
        &flyway_row(2, s, bundle::flyway_checksum(&s.sql), true),
    )
    .await;
    let outcome = run(&b, &dsn, adopt("flyway")).await;
    assert_eq!(applied_names(&outcome).len(), 4, "{outcome:?}");
    assert_eq!(
        count(cluster, &baselined, "SELECT count(*) FROM plans").await,
        2
    );
    let sources: Vec<_> = log(cluster, &baselined)
        .await
        .into_iter()
        .filter_map(|r| r.3)
        .collect();
    assert!(sources[0].contains("baseline 1.1"), "{sources:?}");
    assert_eq!(
        cluster.dump_schema(&baselined, EXCLUDE).expect("dump"),
        reference
    );

    // New: no schema of its own, no history: everything runs.
    let (fresh, dsn) = tenant(cluster, "adopt_fw_new_").await;
    let outcome = run(&b, &dsn, adopt("flyway")).await;
    assert_eq!(applied_names(&outcome).len(), all.len());
    assert_eq!(
        cluster.dump_schema(&fresh, EXCLUDE).expect("dump"),
        reference
    );
}

fn refusal(outcome: Outcome) -> AdoptError {
    match outcome {
        Outcome::Failed {
            scripts,
            error: ApplyError::Adopt(e),
        } => {
            assert!(scripts.is_empty(), "{scripts:?}");
            *e
        }
        other => panic!("expected an adoption refusal, got {other:?}"),
    }
}

/// A failed Flyway row, a script changed since Flyway ran it, a dirty golang-migrate
/// version, a failed sqlx row and a database with a schema but no history: each tenant
/// is refused with what to do, and nothing is written to it (no log rows, no scripts).
#[tokio::test]
async fn adoption_refuses_failed_drifted_dirty_and_missing_histories_and_writes_nothing() {
    let cluster = shared();
    let b = flyway_app();
    let v1 = script(&b, "V1__create_accounts.sql");
    let v11 = script(&b, "V1_1__accounts_email.sql");

    let (failed, dsn) = tenant(cluster, "adopt_fw_failed_").await;
    flyway_migrate(cluster, &failed, &b, &["V1__create_accounts.sql"]).await;
    exec(
        cluster,
        &failed,
        &flyway_row(2, v11, bundle::flyway_checksum(&v11.sql), false),
    )
    .await;
    let e = refusal(run(&b, &dsn, adopt("flyway")).await);
    assert!(matches!(e, AdoptError::FlywayFailed { .. }), "{e}");
    assert!(
        e.to_string().contains("repair") && e.to_string().contains("V1_1__accounts_email.sql"),
        "{e}"
    );

    let (drifted, dsn) = tenant(cluster, "adopt_fw_drift_").await;
    flyway_migrate(cluster, &drifted, &b, &["V1__create_accounts.sql"]).await;
    // V1 as it was when Flyway ran it: one column less than the file has now.
    let then = "CREATE TABLE accounts (id bigserial PRIMARY KEY);\n";
    exec(
        cluster,
        &drifted,
        &format!(
            "UPDATE public.flyway_schema_history SET checksum = {} WHERE version = '1'",
            bundle::flyway_checksum(then)
        ),
    )
    .await;
    let e = refusal(run(&b, &dsn, adopt("flyway")).await);
    assert!(matches!(e, AdoptError::Drift { tool: "flyway", .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&bundle::flyway_checksum(then).to_string()),
        "{e}"
    );

    let (dirty, dsn) = tenant(cluster, "adopt_gm_dirty_").await;
    by_hand(cluster, &dirty, &b, &["V1__create_accounts.sql"]).await;
    golang_migrate_history(cluster, &dirty, 1, true).await;
    let e = refusal(run(&b, &dsn, adopt("golang-migrate")).await);
    assert!(matches!(e, AdoptError::Dirty { .. }), "{e}");

    let (sqlx_failed, dsn) = tenant(cluster, "adopt_sqlx_failed_").await;
    by_hand(cluster, &sqlx_failed, &b, &["V1__create_accounts.sql"]).await;
    sqlx_history(cluster, &sqlx_failed, &v1.text, false).await;
    let e = refusal(run(&b, &dsn, adopt("sqlx")).await);
    assert!(matches!(e, AdoptError::SqlxFailed { .. }), "{e}");

    let (missing, dsn) = tenant(cluster, "adopt_missing_").await;
    by_hand(cluster, &missing, &b, &["V1__create_accounts.sql"]).await;
    let e = refusal(run(&b, &dsn, adopt("flyway=app.history")).await);
    assert!(matches!(e, AdoptError::NoHistory { .. }), "{e}");
    assert!(e.to_string().contains("app.history"), "{e}");

    // Nothing was recorded on any of them; the refusals are permanent.
    for db in [&failed, &drifted, &dirty, &sqlx_failed, &missing] {
        assert_eq!(
            count(cluster, db, "SELECT count(*) FROM flotilla.execution_log").await,
            0,
            "{db}"
        );
    }
}

/// golang-migrate's table as it creates it, saying `version` is current (and `dirty`).
async fn golang_migrate_history(cluster: &Cluster, db: &str, version: i64, dirty: bool) {
    exec(
        cluster,
        db,
        &format!(
            "CREATE TABLE public.schema_migrations (version bigint NOT NULL PRIMARY KEY, \
             dirty boolean NOT NULL);
             INSERT INTO public.schema_migrations VALUES ({version}, {dirty});"
        ),
    )
    .await;
}

/// dbmate's table as it creates it, one row per version.
async fn dbmate_history(cluster: &Cluster, db: &str, versions: &[&str]) {
    let rows: Vec<String> = versions.iter().map(|v| format!("('{v}')")).collect();
    exec(
        cluster,
        db,
        &format!(
            "CREATE TABLE public.schema_migrations (version character varying(128) NOT NULL \
             PRIMARY KEY);
             INSERT INTO public.schema_migrations VALUES {};",
            rows.join(", ")
        ),
    )
    .await;
}

/// sqlx's table as it creates it, with one row for version 1 whose checksum is the
/// SHA-384 of `ran` (the file as sqlx ran it).
async fn sqlx_history(cluster: &Cluster, db: &str, ran: &str, success: bool) {
    exec(cluster, db, SQLX_DDL).await;
    exec(
        cluster,
        db,
        &format!(
            "INSERT INTO public._sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES (1, 'create accounts', {success}, '\\x{}', 1000)",
            bundle::sqlx_checksum(ran)
        ),
    )
    .await;
}

/// sqlx's table, as sqlx creates it for PostgreSQL.
const SQLX_DDL: &str = "CREATE TABLE public._sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
    success BOOLEAN NOT NULL,
    checksum BYTEA NOT NULL,
    execution_time BIGINT NOT NULL
);";

/// golang-migrate (one row: the current version), dbmate (one row per version) and sqlx
/// (one row per version, SHA-384 of the file): each tenant adopts what its tool ran,
/// runs the rest once, and ends with the reference schema; sqlx's checksum catches a
/// changed file.
#[tokio::test]
async fn adopting_from_golang_migrate_dbmate_and_sqlx() {
    let cluster = shared();
    let b = flyway_app();
    let reference = reference_schema(cluster, &b, "adopt_tools_reference_").await;
    let first_three = [
        "V1__create_accounts.sql",
        "V1_1__accounts_email.sql",
        "V2.3__plans.sql",
    ];

    let (gm, dsn) = tenant(cluster, "adopt_gm_").await;
    by_hand(cluster, &gm, &b, &first_three).await;
    golang_migrate_history(cluster, &gm, 2, false).await;
    // golang-migrate's 2 covers 1, 1.1 (and nothing of 2.3, which is later): 2.3 runs,
    // and fails, because it was already run by hand beyond what the tool recorded.
    match run(&b, &dsn, adopt("golang-migrate")).await {
        Outcome::Failed { error, .. } => {
            assert!(error.to_string().contains("V2.3__plans.sql"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(count(cluster, &gm, "SELECT count(*) FROM plans").await, 2);

    let (gm, dsn) = tenant(cluster, "adopt_gm_ok_").await;
    by_hand(cluster, &gm, &b, &first_three).await;
    golang_migrate_history(cluster, &gm, 3, false).await;
    // 3 covers 1, 1.1, 2.3 and 3: what golang-migrate ran, V3's index included.
    by_hand(cluster, &gm, &b, &["V3__index_accounts_plan.sql"]).await;
    let outcome = run(&b, &dsn, adopt("golang-migrate")).await;
    assert_eq!(
        applied_names(&outcome),
        [
            "V20240101120000__audit.sql",
            "R__account_summary.sql",
            "R__plan_count.sql"
        ]
    );
    assert_eq!(count(cluster, &gm, "SELECT count(*) FROM plans").await, 2);
    assert_eq!(cluster.dump_schema(&gm, EXCLUDE).expect("dump"), reference);

    let (dbmate, dsn) = tenant(cluster, "adopt_dbmate_").await;
    by_hand(cluster, &dbmate, &b, &first_three).await;
    dbmate_history(cluster, &dbmate, &["1", "1.1", "2.3"]).await;
    let outcome = run(&b, &dsn, adopt("dbmate")).await;
    assert_eq!(applied_names(&outcome).len(), 4, "{outcome:?}");
    assert_eq!(
        count(cluster, &dbmate, "SELECT count(*) FROM plans").await,
        2
    );
    assert_eq!(
        cluster.dump_schema(&dbmate, EXCLUDE).expect("dump"),
        reference
    );

    // Migrated by hand, no tool at all: --baseline-version 2.3.
    let (by_hand_db, dsn) = tenant(cluster, "adopt_baseline_version_").await;
    by_hand(cluster, &by_hand_db, &b, &first_three).await;
    let outcome = run(
        &b,
        &dsn,
        Some(Prior::BaselineVersion("2.3".parse().expect("version"))),
    )
    .await;
    assert_eq!(applied_names(&outcome).len(), 4, "{outcome:?}");
    assert_eq!(
        count(cluster, &by_hand_db, "SELECT count(*) FROM plans").await,
        2
    );
    assert_eq!(
        cluster.dump_schema(&by_hand_db, EXCLUDE).expect("dump"),
        reference
    );

    // sqlx versions are integers: V1 ran under sqlx.
    let v1 = script(&b, "V1__create_accounts.sql");
    let (sqlx, dsn) = tenant(cluster, "adopt_sqlx_").await;
    by_hand(cluster, &sqlx, &b, &["V1__create_accounts.sql"]).await;
    sqlx_history(cluster, &sqlx, &v1.text, true).await;
    let outcome = run(&b, &dsn, adopt("sqlx")).await;
    assert_eq!(
        applied_names(&outcome).len(),
        b.scripts().len() - 1,
        "{outcome:?}"
    );
    assert_eq!(
        cluster.dump_schema(&sqlx, EXCLUDE).expect("dump"),
        reference
    );

    let (sqlx_changed, dsn) = tenant(cluster, "adopt_sqlx_drift_").await;
    by_hand(cluster, &sqlx_changed, &b, &["V1__create_accounts.sql"]).await;
    sqlx_history(
        cluster,
        &sqlx_changed,
        "CREATE TABLE accounts (id bigint);",
        true,
    )
    .await;
    let e = refusal(run(&b, &dsn, adopt("sqlx")).await);
    assert!(matches!(e, AdoptError::Drift { tool: "sqlx", .. }), "{e}");
}

/// Issue 12: a baseline script (`B2__…`) on a tenant with no history runs instead of
/// the versions it covers, which are recorded as `baselined` in its transaction (a log
/// made by an older build, whose kind check knows no `baseline`, included); a tenant
/// with a history never runs it; the tenant's own placeholders are filled in from its
/// server, and a database name that could change how a script reads is refused.
#[tokio::test]
async fn baseline_scripts_and_tenant_placeholders_on_real_tenants() {
    let cluster = shared();
    let with_base = Bundle::from_sources(
        &[
            (
                "B2__base.sql",
                "CREATE TABLE items (id int PRIMARY KEY, name text);",
            ),
            ("V1__items.sql", "CREATE TABLE items (id int PRIMARY KEY);"),
            ("V2__name.sql", "ALTER TABLE items ADD COLUMN name text;"),
            (
                "V3__comment.sql",
                "COMMENT ON TABLE items IS 'db ${flyway:database} by ${flyway:user}';",
            ),
        ],
        "test",
    )
    .expect("valid");
    let kinds = |db: String| async move {
        cluster
            .connect(&db)
            .await
            .expect("connect")
            .query(
                "SELECT version, script, kind, status FROM flotilla.execution_log ORDER BY id",
                &[],
            )
            .await
            .expect("log")
            .iter()
            .map(|r| {
                let v: Option<String> = r.get(0);
                format!(
                    "{} {} {} {}",
                    v.unwrap_or_default(),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3)
                )
            })
            .collect::<Vec<_>>()
    };

    let (fresh, dsn) = tenant(cluster, "base_fresh_").await;
    match run(&with_base, &dsn, None).await {
        Outcome::Applied {
            scripts, baselined, ..
        } => {
            let names: Vec<_> = scripts.iter().map(|s| s.script.as_str()).collect();
            assert_eq!(names, ["B2__base.sql", "V3__comment.sql"]);
            assert_eq!(baselined, 2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        kinds(fresh.clone()).await,
        [
            "2 B2__base.sql baseline applied",
            "1 V1__items.sql versioned baselined",
            "2 V2__name.sql versioned baselined",
            "3 V3__comment.sql versioned applied"
        ]
    );
    let comment: String = cluster
        .connect(&fresh)
        .await
        .expect("connect")
        .query_one("SELECT obj_description('items'::regclass)", &[])
        .await
        .expect("comment")
        .get(0);
    assert_eq!(comment, format!("db {fresh} by postgres"));
    assert!(matches!(
        run(&with_base, &dsn, None).await,
        Outcome::UpToDate { .. }
    ));

    // A history: V1 ran before the bundle had a baseline script. B2 never runs.
    let (_older, dsn) = tenant(cluster, "base_history_").await;
    let first = Bundle::from_sources(
        &[("V1__items.sql", "CREATE TABLE items (id int PRIMARY KEY);")],
        "test",
    )
    .expect("valid");
    assert!(matches!(
        run(&first, &dsn, None).await,
        Outcome::Applied { .. }
    ));
    let outcome = run(&with_base, &dsn, None).await;
    assert_eq!(applied_names(&outcome), ["V2__name.sql", "V3__comment.sql"]);

    // An empty log made by an older build: its kind check knows only two kinds.
    let (old_log, dsn) = tenant(cluster, "base_oldlog_").await;
    exec(
        cluster,
        &old_log,
        "CREATE SCHEMA flotilla;
         CREATE TABLE flotilla.execution_log (id bigserial PRIMARY KEY, version text,
           script text NOT NULL, kind text NOT NULL CHECK (kind IN ('versioned', 'repeatable')),
           checksum text NOT NULL, bundle_id text NOT NULL, wave_id text NOT NULL,
           status text NOT NULL CHECK (status IN ('applied', 'started')), applied_at timestamptz,
           applied_by text NOT NULL DEFAULT current_user, xact_id text, duration_ms bigint,
           statements_done integer, started_at timestamptz NOT NULL DEFAULT clock_timestamp());",
    )
    .await;
    let outcome = run(&with_base, &dsn, None).await;
    assert_eq!(applied_names(&outcome), ["B2__base.sql", "V3__comment.sql"]);

    // A database name with a quote cannot stand in for ${flyway:database}.
    let (weird, dsn) = tenant(cluster, "base_q'uote_").await;
    match run(&with_base, &dsn, None).await {
        Outcome::Failed { scripts, error } => {
            assert!(scripts.is_empty(), "{scripts:?}");
            assert!(matches!(error, ApplyError::TenantPlaceholder(_)), "{error}");
            assert!(error.to_string().contains("flyway:database"), "{error}");
            assert_eq!(
                error.retryability(),
                flotilla::failure::Retryability::Permanent
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        count(
            cluster,
            &weird,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'items'"
        )
        .await,
        0
    );
}

/// The reviewers' cases: a script with placeholders is not drift (Flyway checksums a
/// versioned script as written); `--adopt dbmate` on golang-migrate's table, and a
/// history behind a view, are refused; a history with a gap that the wave could not
/// apply in order is refused before anything is recorded.
#[tokio::test]
async fn adoption_reads_only_what_it_should_and_records_nothing_it_cannot_follow() {
    let cluster = shared();
    let b = Bundle::from_files_with(
        vec![
            flotilla::bundle::BundleFile {
                name: "V1__create.sql".into(),
                content: b"CREATE TABLE items (id int, owner text DEFAULT '${owner}');".to_vec(),
            },
            flotilla::bundle::BundleFile {
                name: "V2__more.sql".into(),
                content: b"ALTER TABLE items ADD COLUMN b int;".to_vec(),
            },
            flotilla::bundle::BundleFile {
                name: "V3__last.sql".into(),
                content: b"ALTER TABLE items ADD COLUMN c int;".to_vec(),
            },
        ],
        &flotilla::bundle::BundleOptions {
            placeholders: [("owner".to_string(), "app".to_string())].into(),
            ..Default::default()
        },
        "test",
    )
    .expect("valid");
    let v1 = script(&b, "V1__create.sql");
    assert_ne!(v1.sql, v1.text, "the placeholder was replaced");

    let (placeholder, dsn) = tenant(cluster, "adopt_ph_").await;
    exec(cluster, &placeholder, &v1.sql).await;
    exec(cluster, &placeholder, FLYWAY_HISTORY_DDL).await;
    exec(
        cluster,
        &placeholder,
        &flyway_row(1, v1, bundle::flyway_checksum(&v1.text), true),
    )
    .await;
    let outcome = run(&b, &dsn, adopt("flyway")).await;
    assert_eq!(applied_names(&outcome), ["V2__more.sql", "V3__last.sql"]);

    let (gm_table, dsn) = tenant(cluster, "adopt_wrongtool_").await;
    exec(cluster, &gm_table, &v1.sql).await;
    golang_migrate_history(cluster, &gm_table, 3, false).await;
    let e = refusal(run(&b, &dsn, adopt("dbmate")).await);
    assert!(e.to_string().contains("golang-migrate"), "{e}");

    let (view, dsn) = tenant(cluster, "adopt_view_").await;
    exec(cluster, &view, &v1.sql).await;
    exec(
        cluster,
        &view,
        "CREATE VIEW public.schema_migrations AS SELECT '1'::varchar AS version;",
    )
    .await;
    let e = refusal(run(&b, &dsn, adopt("dbmate")).await);
    assert!(e.to_string().contains("not a table"), "{e}");

    // dbmate says 1 and 3 ran, not 2: applying 2 after 3 needs out-of-order.
    let (gap, dsn) = tenant(cluster, "adopt_gap_").await;
    exec(cluster, &gap, &v1.sql).await;
    dbmate_history(cluster, &gap, &["1", "3"]).await;
    match run(&b, &dsn, adopt("dbmate")).await {
        Outcome::Failed {
            error: ApplyError::Plan(e),
            ..
        } => assert!(e.to_string().contains("out of order"), "{e}"),
        other => panic!("{other:?}"),
    }
    for db in [&gm_table, &view, &gap] {
        assert_eq!(
            count(cluster, db, "SELECT count(*) FROM flotilla.execution_log").await,
            0,
            "{db}: nothing recorded"
        );
    }
}
