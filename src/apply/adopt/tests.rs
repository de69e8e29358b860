use super::*;

fn bundle() -> Bundle {
    Bundle::from_sources(
        &[
            ("V1__init.sql", "CREATE TABLE t (id int);\n"),
            ("V1_1__add_col.sql", "ALTER TABLE t ADD COLUMN c int;\n"),
            ("V2__more.sql", "CREATE TABLE u (id int);\n"),
            ("V3__last.sql", "CREATE TABLE w (id int);\n"),
            ("R__view.sql", "CREATE OR REPLACE VIEW v AS SELECT 1;\n"),
        ],
        "test",
    )
    .expect("valid")
}

fn flyway_row(rank: i64, version: Option<&str>, script: &str, sql: &str) -> HistoryRow {
    let description = script
        .split_once("__")
        .map(|(_, d)| d.trim_end_matches(".sql").replace('_', " "));
    HistoryRow {
        rank: Some(rank),
        version: version.map(str::to_string),
        description,
        kind: Some("SQL".into()),
        script: Some(script.into()),
        checksum: Some(bundle::flyway_checksum(sql).to_string()),
        installed_by: Some("flyway_user".into()),
        installed_on: Some("2024-01-01 12:00:00".into()),
        success: true,
    }
}

fn source(s: &str) -> Source {
    s.parse().expect("valid source")
}

#[test]
fn flyway_checksum_matches_java_crc32_over_buffered_reader_lines() {
    // Reference values computed with java.util.zip.CRC32 fed each line of a
    // BufferedReader (UTF-8), the first line without its BOM, read as (int): Flyway's
    // ChecksumCalculator.
    assert_eq!(
        bundle::flyway_checksum("CREATE TABLE t (id int);\n"),
        92137680
    );
    assert_eq!(bundle::flyway_checksum("a\r\nb\rc\n\n"), 891568578);
    assert_eq!(
        bundle::flyway_checksum("\u{feff}select 1;\nselect 2;"),
        -593479011
    );
    assert_eq!(
        bundle::flyway_checksum("insert into t values ('é');\r\n"),
        386872593
    );
    assert_eq!(bundle::flyway_checksum(""), 0);
    assert_eq!(bundle::flyway_checksum("\n\n\n"), 0);
}

#[test]
fn sources_parse_default_tables_and_refuse_what_is_not_an_identifier() {
    assert_eq!(
        source("flyway").to_string(),
        "flyway=public.flyway_schema_history"
    );
    assert_eq!(
        source("golang-migrate").to_string(),
        "golang-migrate=public.schema_migrations"
    );
    assert_eq!(source("sqlx").to_string(), "sqlx=public._sqlx_migrations");
    assert_eq!(
        source("flyway=App.History").to_string(),
        "flyway=app.history"
    );
    assert_eq!(
        source("dbmate=migrations").to_string(),
        "dbmate=public.migrations"
    );
    for bad in [
        "liquibase",
        "flyway=",
        "flyway=a.b.c",
        "flyway=x\"; DROP TABLE t; --",
        "flyway=1abc",
        "flyway=public.",
    ] {
        let e = bad.parse::<Source>().expect_err(bad).to_string();
        assert!(e.contains("adopt"), "{bad}: {e}");
    }
    // The quoted name in SQL cannot break out even for a folded identifier.
    assert!(source("flyway=s.t").read_sql().contains("FROM \"s\".\"t\""));
}

#[test]
fn flyway_success_rows_become_baselined_with_who_and_when() {
    let b = bundle();
    let history = vec![
        flyway_row(1, Some("1"), "V1__init.sql", "CREATE TABLE t (id int);\n"),
        flyway_row(
            2,
            Some("1.1"),
            "V1_1__add_col.sql",
            "ALTER TABLE t ADD COLUMN c int;\n",
        ),
    ];
    let rows = decide(&b, &source("flyway"), &history).expect("adoptable");
    let versions: Vec<_> = rows.iter().map(|r| r.version.clone().unwrap()).collect();
    assert_eq!(versions, ["1", "1.1"]);
    assert_eq!(rows[0].script, "V1__init.sql");
    assert_eq!(rows[0].checksum, b.scripts()[0].checksum);
    assert_eq!(rows[0].applied_by.as_deref(), Some("flyway_user"));
    assert!(
        rows[1].source.contains("installed_rank 2"),
        "{}",
        rows[1].source
    );
}

#[test]
fn a_changed_script_is_drift_with_both_checksums() {
    let b = bundle();
    let history = vec![flyway_row(
        1,
        Some("1"),
        "V1__init.sql",
        "CREATE TABLE t (id bigint);\n",
    )];
    let e = decide(&b, &source("flyway"), &history).expect_err("drift");
    let text = e.to_string();
    assert!(matches!(e, AdoptError::Drift { .. }), "{text}");
    assert!(
        text.contains("V1__init.sql") && text.contains("92137680"),
        "{text}"
    );
}

#[test]
fn line_endings_are_not_drift_under_flyway() {
    let b = bundle();
    let history = vec![flyway_row(
        1,
        Some("1"),
        "V1__init.sql",
        "CREATE TABLE t (id int);\r\n",
    )];
    assert_eq!(
        decide(&b, &source("flyway"), &history).expect("same").len(),
        1
    );
}

#[test]
fn a_failed_flyway_row_refuses_the_tenant_naming_repair() {
    let b = bundle();
    let mut failed = flyway_row(2, Some("2"), "V2__more.sql", "CREATE TABLE u (id int);\n");
    failed.success = false;
    let history = vec![
        flyway_row(1, Some("1"), "V1__init.sql", "CREATE TABLE t (id int);\n"),
        failed,
    ];
    let e = decide(&b, &source("flyway"), &history).expect_err("failed");
    assert!(
        e.to_string().contains("repair") && e.to_string().contains("installed_rank 2"),
        "{e}"
    );
}

#[test]
fn flyway_baseline_delete_undo_and_schema_rows() {
    let b = bundle();
    let mut baseline = flyway_row(2, Some("1.1"), "<< Flyway Baseline >>", "");
    baseline.kind = Some("BASELINE".into());
    baseline.checksum = None;
    let mut schema = flyway_row(1, Some("0"), "\"public\"", "");
    schema.kind = Some("SCHEMA".into());
    let mut delete = flyway_row(4, Some("2"), "V2__more.sql", "");
    delete.kind = Some("DELETE".into());
    let history = vec![
        schema,
        baseline,
        flyway_row(3, Some("2"), "V2__more.sql", "CREATE TABLE u (id int);\n"),
        delete,
    ];
    let rows = decide(&b, &source("flyway"), &history).expect("adoptable");
    let versions: Vec<_> = rows.iter().map(|r| r.version.clone().unwrap()).collect();
    // Baseline covers 1 and 1.1; V2 was deleted by repair: it runs.
    assert_eq!(versions, ["1", "1.1"]);
    assert!(
        rows[0].source.contains("baseline 1.1"),
        "{}",
        rows[0].source
    );
}

#[test]
fn repeatables_count_only_when_flyway_ran_this_file() {
    let b = bundle();
    let same = flyway_row(
        1,
        None,
        "R__view.sql",
        "CREATE OR REPLACE VIEW v AS SELECT 1;\n",
    );
    let rows = decide(&b, &source("flyway"), &[same]).expect("adoptable");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].kind, "repeatable");
    let changed = flyway_row(
        1,
        None,
        "R__view.sql",
        "CREATE OR REPLACE VIEW v AS SELECT 2;\n",
    );
    assert!(
        decide(&b, &source("flyway"), &[changed])
            .expect("adoptable")
            .is_empty()
    );
}

#[test]
fn versions_the_bundle_lacks_are_recorded_with_the_tools_names() {
    let b = bundle();
    let history = vec![flyway_row(1, Some("7"), "V7__future.sql", "select 1;")];
    let rows = decide(&b, &source("flyway"), &history).expect("adoptable");
    assert_eq!(rows[0].script, "V7__future.sql");
    assert!(
        rows[0].checksum.starts_with("flyway:"),
        "{}",
        rows[0].checksum
    );
}

#[test]
fn golang_migrate_is_linear_and_refuses_dirty() {
    let b = bundle();
    let row = |v: &str, clean: bool| HistoryRow {
        version: Some(v.into()),
        success: clean,
        ..Default::default()
    };
    let rows = decide(&b, &source("golang-migrate"), &[row("2", true)]).expect("clean");
    let versions: Vec<_> = rows.iter().map(|r| r.version.clone().unwrap()).collect();
    assert_eq!(versions, ["1", "1.1", "2"]);
    let e = decide(&b, &source("golang-migrate"), &[row("2", false)]).expect_err("dirty");
    assert!(matches!(e, AdoptError::Dirty { .. }), "{e}");
    assert!(
        decide(&b, &source("golang-migrate"), &[])
            .expect("empty")
            .is_empty()
    );
}

#[test]
fn dbmate_maps_versions_and_sqlx_checks_its_checksum() {
    let b = bundle();
    let row = |v: &str, checksum: Option<String>, ok: bool| HistoryRow {
        version: Some(v.into()),
        checksum,
        success: ok,
        ..Default::default()
    };
    let rows = decide(
        &b,
        &source("dbmate"),
        &[row("2", None, true), row("1", None, true)],
    )
    .expect("dbmate");
    let versions: Vec<_> = rows.iter().map(|r| r.version.clone().unwrap()).collect();
    assert_eq!(versions, ["1", "2"]);

    let good = bundle::sqlx_checksum("CREATE TABLE t (id int);\n");
    let rows = decide(&b, &source("sqlx"), &[row("1", Some(good), true)]).expect("sqlx");
    assert_eq!(rows.len(), 1);
    let bad = bundle::sqlx_checksum("something else");
    let e = decide(&b, &source("sqlx"), &[row("1", Some(bad), true)]).expect_err("drift");
    assert!(matches!(e, AdoptError::Drift { tool: "sqlx", .. }), "{e}");
    let e = decide(&b, &source("sqlx"), &[row("1", None, false)]).expect_err("failed");
    assert!(matches!(e, AdoptError::SqlxFailed { .. }), "{e}");
}

#[test]
fn a_version_that_is_not_a_number_is_named() {
    let b = bundle();
    let row = HistoryRow {
        version: Some("20240101_abc".into()),
        success: true,
        ..Default::default()
    };
    let e = decide(&b, &source("dbmate"), &[row]).expect_err("bad version");
    assert!(e.to_string().contains("20240101_abc"), "{e}");
}
