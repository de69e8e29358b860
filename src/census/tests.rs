use super::*;
use crate::dsn::Dsn;

fn tenant(id: &str, host: &str) -> Tenant {
    Tenant {
        id: id.to_string(),
        dsn: Dsn::parse(&format!("postgres://u@{host}/{id}")).expect("dsn"),
        labels: Default::default(),
    }
}

fn bundle() -> Bundle {
    Bundle::from_sources(
        &[
            ("V1__a.sql", "select 1;"),
            ("V2__b.sql", "select 2;"),
            ("V3__c.sql", "select 3;"),
        ],
        "test",
    )
    .expect("bundle")
}

fn row(id: i64, bundle: &Bundle, version: &str, status: LogStatus) -> LogRow {
    let script = bundle
        .scripts()
        .iter()
        .find(|s| s.version().is_some_and(|v| v.to_string() == version));
    LogRow {
        id,
        version: Some(version.to_string()),
        script: script.map_or(format!("V{version}__x.sql"), |s| s.name.clone()),
        kind: "versioned".into(),
        checksum: script.map_or("sha256:00".into(), |s| s.checksum.clone()),
        status,
        statements_done: None,
    }
}

#[test]
fn examine_reads_version_drift_interruptions_ahead_and_pending() {
    let b = bundle();
    let t = tenant("t1", "h1");
    let behind = examine(&t, Some(&[row(1, &b, "1", LogStatus::Applied)]), Some(&b));
    assert_eq!(behind.state, CensusState::Behind);
    assert_eq!(behind.version.as_deref(), Some("1"));
    assert_eq!(behind.pending, vec!["V2__b.sql", "V3__c.sql"]);

    let mut drifted_row = row(2, &b, "2", LogStatus::Applied);
    drifted_row.checksum = "sha256:changed".into();
    let drifted = examine(
        &t,
        Some(&[row(1, &b, "1", LogStatus::Baselined), drifted_row]),
        Some(&b),
    );
    assert_eq!(drifted.state, CensusState::Drifted);
    assert_eq!(drifted.drifted, vec!["V2__b.sql"]);
    assert_eq!((drifted.applied, drifted.baselined), (1, 1));

    let interrupted = examine(
        &t,
        Some(&[
            row(1, &b, "1", LogStatus::Applied),
            row(2, &b, "2", LogStatus::Started),
        ]),
        Some(&b),
    );
    assert_eq!(interrupted.state, CensusState::Interrupted);
    assert_eq!(interrupted.started, vec!["V2__b.sql"]);
    assert_eq!(interrupted.version.as_deref(), Some("1"));

    let ahead = examine(
        &t,
        Some(&[
            row(1, &b, "1", LogStatus::Applied),
            row(2, &b, "2", LogStatus::Applied),
            row(3, &b, "3", LogStatus::Applied),
            row(4, &b, "4", LogStatus::Applied),
        ]),
        Some(&b),
    );
    assert_eq!(ahead.state, CensusState::Ahead);
    assert_eq!(ahead.ahead, vec!["4"]);
    assert_eq!(ahead.version.as_deref(), Some("4"));

    // An undone version is not applied: the highest is below it.
    let undone = examine(
        &t,
        Some(&[
            row(1, &b, "1", LogStatus::Applied),
            row(2, &b, "2", LogStatus::Applied),
            row(3, &b, "2", LogStatus::Undone),
        ]),
        None,
    );
    assert_eq!(undone.version.as_deref(), Some("1"));

    let unmanaged = examine(&t, None, Some(&b));
    assert_eq!(unmanaged.state, CensusState::Unmanaged);
    assert!(!unmanaged.has_log);
    assert_eq!(unmanaged.pending.len(), 3);
}

#[test]
fn summarize_counts_every_tenant_once_and_singles_out_minority_schemas() {
    let b = bundle();
    let at = |id: &str, host: &str, versions: &[&str]| {
        let rows: Vec<LogRow> = versions
            .iter()
            .enumerate()
            .map(|(i, v)| row(i as i64 + 1, &b, v, LogStatus::Applied))
            .collect();
        examine(&tenant(id, host), Some(&rows), None)
    };
    let mut tenants = vec![
        at("a", "h1", &["1", "2", "3"]),
        at("b", "h1", &["1", "2", "3"]),
        at("c", "h2", &["1", "2", "3"]),
        at("d", "h2", &["1", "2"]),
        at("e", "h2", &[]),
    ];
    tenants.push(unreachable(
        "f",
        "h3:5432",
        DbFailure::of_kind(crate::failure::FailureKind::TimedOut, "down"),
    ));
    let common = Schema {
        objects: [(("table".to_string(), "public.t".to_string()), String::new())].into(),
    };
    let mut altered = common.clone();
    altered
        .objects
        .insert(("column".into(), "public.t.extra".into()), "text".into());
    for (i, fp) in [(0, &common), (1, &altered), (2, &common), (3, &common)] {
        tenants[i].fingerprint = Some(fp.fingerprint());
    }
    let schemas: HashMap<String, Schema> = [
        (common.fingerprint(), common.clone()),
        (altered.fingerprint(), altered.clone()),
    ]
    .into();
    let census = summarize("f", tenants, &schemas, false);

    assert_eq!(
        census.histogram,
        vec![
            ("2".to_string(), 1),
            ("3".to_string(), 3),
            (NO_VERSION.to_string(), 1),
            (UNREACHABLE.to_string(), 1)
        ]
    );
    let total: u64 = census.states.values().sum();
    assert_eq!(total, 6);
    assert_eq!(census.count(CensusState::Current), 2);
    assert_eq!(census.count(CensusState::Behind), 2, "d at 2, e at none");
    assert_eq!(census.count(CensusState::SchemaDrift), 1);
    assert_eq!(census.count(CensusState::Unreachable), 1);
    let outliers: Vec<&str> = census.outliers().map(|t| t.tenant_id.as_str()).collect();
    assert_eq!(outliers, vec!["b", "f"]);

    let minority = census
        .fingerprints
        .iter()
        .find(|g| !g.reference && g.version == "3")
        .expect("a minority group at 3");
    assert_eq!(minority.members, vec!["b"]);
    assert_eq!(
        minority
            .changes
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>(),
        vec!["+ column public.t.extra: text"]
    );
    let h2 = census
        .hosts
        .iter()
        .find(|h| h.host.starts_with("h2"))
        .expect("h2");
    assert_eq!(h2.tenants, 3);
}

#[test]
fn only_the_latest_row_of_a_script_counts() {
    let b = Bundle::from_sources(
        &[("V1__a.sql", "select 1;"), ("R__view.sql", "select 2;")],
        "test",
    )
    .expect("bundle");
    let repeatable = |id: i64, status: LogStatus, checksum: &str| LogRow {
        id,
        version: None,
        script: "R__view.sql".into(),
        kind: "repeatable".into(),
        checksum: checksum.into(),
        status,
        statements_done: None,
    };
    let v1 = row(1, &b, "1", LogStatus::Applied);
    let view = &b.scripts()[1].checksum;
    // A repeatable cut short at an older text, superseded by a run of the new one.
    let t = examine(
        &tenant("t", "h"),
        Some(&[
            v1,
            repeatable(2, LogStatus::Started, "sha256:old"),
            repeatable(3, LogStatus::Applied, view),
        ]),
        Some(&b),
    );
    assert_eq!(t.state, CensusState::Current, "{t:?}");
    assert!(t.started.is_empty());
    assert_eq!(t.version.as_deref(), Some("1"));
    // The latest row started: interrupted.
    let t = examine(
        &tenant("t", "h"),
        Some(&[
            row(1, &b, "1", LogStatus::Applied),
            repeatable(2, LogStatus::Applied, view),
            repeatable(3, LogStatus::Started, view),
        ]),
        Some(&b),
    );
    assert_eq!(t.state, CensusState::Interrupted);
    assert_eq!(t.started, vec!["R__view.sql"]);
}

#[test]
fn a_tie_for_largest_excuses_only_the_tied_groups() {
    let b = bundle();
    let at3 = |id: &str| {
        let rows: Vec<LogRow> = ["1", "2", "3"]
            .iter()
            .enumerate()
            .map(|(i, v)| row(i as i64 + 1, &b, v, LogStatus::Applied))
            .collect();
        examine(&tenant(id, "h1"), Some(&rows), Some(&b))
    };
    let one = Schema {
        objects: [(("table".to_string(), "public.a".to_string()), String::new())].into(),
    };
    let other = Schema {
        objects: [(("table".to_string(), "public.b".to_string()), String::new())].into(),
    };
    let third = Schema {
        objects: [(("table".to_string(), "public.c".to_string()), String::new())].into(),
    };
    let mut tenants = vec![at3("x1"), at3("x2"), at3("y1"), at3("y2"), at3("z")];
    for (i, s) in [(0, &one), (1, &one), (2, &other), (3, &other), (4, &third)] {
        tenants[i].fingerprint = Some(s.fingerprint());
    }
    let schemas: HashMap<String, Schema> = [
        (one.fingerprint(), one),
        (other.fingerprint(), other),
        (third.fingerprint(), third.clone()),
    ]
    .into();
    let census = summarize("f", tenants, &schemas, true);
    // Two groups of two: neither is drift. The lone third one is.
    let drifting: Vec<&str> = census
        .tenants
        .iter()
        .filter(|t| t.schema_drift)
        .map(|t| t.tenant_id.as_str())
        .collect();
    assert_eq!(drifting, vec!["z"]);
    assert_eq!(census.count(CensusState::SchemaDrift), 1);
    let tied: Vec<u64> = census
        .fingerprints
        .iter()
        .filter(|g| g.tied)
        .map(|g| g.tenants)
        .collect();
    assert_eq!(tied, vec![2, 2], "{:?}", census.fingerprints);
    let lone = census
        .fingerprints
        .iter()
        .find(|g| g.fingerprint == third.fingerprint())
        .expect("the third group");
    assert!(!lone.tied && !lone.reference);
    assert_eq!(census.fingerprints.len(), 3);
}

#[test]
fn long_lists_are_capped_but_counted() {
    // 30 scripts applied, none of them in the bundle: all ahead, 20 listed.
    let b = bundle();
    let rows: Vec<LogRow> = (1..=30)
        .map(|v| LogRow {
            id: v,
            version: Some(format!("{}", 100 + v)),
            script: format!("V{}__x.sql", 100 + v),
            kind: "versioned".into(),
            checksum: "sha256:x".into(),
            status: LogStatus::Applied,
            statements_done: None,
        })
        .collect();
    let t = examine(&tenant("t", "h"), Some(&rows), Some(&b));
    assert_eq!(t.state, CensusState::Ahead);
    assert_eq!(t.ahead.len(), 20);
    assert!(
        t.notes
            .iter()
            .any(|n| n == "10 more versions ahead than listed"),
        "{:?}",
        t.notes
    );
}
