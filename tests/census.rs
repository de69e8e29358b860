//! The census and schema fingerprints against a real server: what makes schemas equal
//! (names and definitions, not creation order or OIDs), what a tenant cannot subvert,
//! and what a census session cannot do.

use std::sync::Arc;

use flotilla::bundle::Bundle;
use flotilla::census::{self, CensusOptions, CensusState};
use flotilla::connect::{Session, SessionSettings};
use flotilla::dsn::Dsn;
use flotilla::reach::Reach;
use flotilla::target::Tenant;
use flotilla_testkit::shared;

fn tenant(id: &str, url: &str) -> Tenant {
    Tenant {
        id: id.to_string(),
        dsn: Dsn::parse(url).expect("dsn"),
        labels: Default::default(),
    }
}

/// Creates databases `{prefix}00001…` and runs one script in each.
async fn databases(prefix: &str, scripts: &[&str]) -> Vec<Tenant> {
    let cluster = shared();
    let names = cluster
        .create_tenants(prefix, scripts.len(), "")
        .await
        .expect("create databases");
    let mut out = Vec::new();
    for (name, sql) in names.iter().zip(scripts) {
        if !sql.is_empty() {
            let client = cluster.connect(name).await.expect("connect");
            client.batch_execute(sql).await.expect("run the script");
        }
        out.push(tenant(name, &cluster.url(name)));
    }
    out
}

async fn take(tenants: Vec<Tenant>, bundle: Option<Bundle>) -> census::Census {
    let options = CensusOptions {
        fingerprint: true,
        ..Default::default()
    };
    census::take(
        "test",
        tenants,
        bundle.map(Arc::new),
        &options,
        &Reach::default(),
        flotilla::census::CensusTrigger::Request,
    )
    .await
}

#[tokio::test]
async fn fingerprints_ignore_creation_order_and_flotillas_own_schema_and_see_the_rest() {
    let same_a = "CREATE TABLE accounts (id bigserial PRIMARY KEY, email text NOT NULL, plan text DEFAULT 'free');
         CREATE INDEX accounts_email ON accounts (email);
         CREATE TYPE mood AS ENUM ('ok', 'meh');
         CREATE VIEW emails AS SELECT email FROM accounts;
         CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
         CREATE TRIGGER accounts_touch BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION touch();";
    // The same objects, made in another order, with a column added later, an index
    // created before the view, and Flotilla's own (empty) execution log.
    let same_b = format!("{}{}", flotilla::apply::log::ENSURE_SQL, "CREATE TYPE mood AS ENUM ('ok', 'meh');
         CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
         CREATE TABLE accounts (plan text DEFAULT 'free', id bigserial PRIMARY KEY);
         ALTER TABLE accounts ADD COLUMN email text NOT NULL;
         CREATE TRIGGER accounts_touch BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION touch();
         CREATE INDEX accounts_email ON accounts (email);
         CREATE VIEW emails AS SELECT email FROM accounts;");
    let changed = format!(
        "{same_a}
         ALTER TABLE accounts ADD CONSTRAINT email_has_at CHECK (email LIKE '%@%');
         ALTER TYPE mood ADD VALUE 'great';
         ALTER TABLE accounts ALTER COLUMN plan SET DEFAULT 'trial';"
    );
    let tenants = databases("fp_", &[same_a, &same_b, same_a, &changed]).await;
    let ids: Vec<String> = tenants.iter().map(|t| t.id.clone()).collect();
    let census = take(tenants, None).await;

    let prints: Vec<&str> = census
        .tenants
        .iter()
        .map(|t| {
            t.fingerprint
                .as_deref()
                .unwrap_or_else(|| panic!("not fingerprinted: {t:?}"))
        })
        .collect();
    assert_eq!(prints[0], prints[1], "creation order must not matter");
    assert_eq!(prints[0], prints[2]);
    assert_ne!(prints[0], prints[3]);
    // None has a log: all at `none`, the changed one singled out.
    assert_eq!(census.histogram, vec![(census::NO_VERSION.to_string(), 4)]);
    let minority: Vec<_> = census
        .fingerprints
        .iter()
        .filter(|g| !g.reference)
        .collect();
    assert_eq!(minority.len(), 1, "{:?}", census.fingerprints);
    assert_eq!(minority[0].members, vec![ids[3].clone()]);
    let changes: Vec<String> = minority[0].changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        changes,
        vec![
            "~ column public.accounts.plan: text default 'free'::text -> text default 'trial'::text",
            "+ constraint public.accounts.email_has_at: CHECK ((email ~~ '%@%'::text))",
            "~ enum public.mood: ok, meh -> ok, meh, great",
        ],
        "{changes:#?}"
    );
    assert_eq!(census.tenants[3].state, CensusState::SchemaDrift);
    assert_eq!(census.tenants[0].state, CensusState::Unmanaged);
}

/// Objects a tenant defines cannot stand in for the catalog functions the fingerprint
/// calls: the session's `search_path` is pinned and every call is qualified.
#[tokio::test]
async fn a_tenants_own_functions_cannot_change_its_fingerprint_or_the_census() {
    let base = "CREATE TABLE t (id int NOT NULL);";
    let hostile = "CREATE TABLE t (id int NOT NULL);
         CREATE FUNCTION public.format_type(oid, integer) RETURNS text LANGUAGE sql AS $$SELECT 'hacked'$$;
         CREATE FUNCTION public.concat_ws(text, VARIADIC text[]) RETURNS text LANGUAGE sql AS $$SELECT 'hacked'$$;
         CREATE FUNCTION public.md5(text) RETURNS text LANGUAGE sql AS $$SELECT 'hacked'$$;
         DO $$BEGIN EXECUTE format('ALTER DATABASE %I SET search_path = public', current_database()); END$$;";
    let tenants = databases("fph_", &[base, hostile]).await;
    let census = take(tenants, None).await;
    let schemas: Vec<_> = census
        .tenants
        .iter()
        .map(|t| t.fingerprint.clone())
        .collect();
    // They differ by the three functions only, and no definition reads "hacked".
    let minority = census
        .fingerprints
        .iter()
        .find(|g| !g.reference)
        .expect("the hostile tenant differs");
    assert_ne!(schemas[0], schemas[1]);
    assert!(minority.tied, "one tenant each: a tie");
    for change in &minority.changes {
        assert!(change.object.starts_with("function public."), "{change}");
        // A body is compared by the catalog's own md5: a hijacked md5() would say
        // "md5 hacked".
        // Either side may be the hostile tenant's (one each: the smaller fingerprint is
        // the reference).
        let definition = if change.found.is_empty() {
            &change.reference
        } else {
            &change.found
        };
        let digest = definition
            .strip_prefix("md5 ")
            .unwrap_or_else(|| panic!("not a body digest: {change}"));
        assert!(
            digest.len() == 32 && digest.chars().all(|c| c.is_ascii_hexdigit()),
            "{change}"
        );
    }
    assert_eq!(minority.changes.len(), 3, "{:?}", minority.changes);
}

/// Names are quoted where they need it: a dotted schema and a dotted table are two
/// different objects, not one that hides the other.
#[tokio::test]
async fn dotted_names_do_not_collide() {
    let tenants = databases(
        "fpd_",
        &[
            r#"CREATE SCHEMA "a.b"; CREATE TABLE "a.b".c (id int); CREATE SCHEMA a; CREATE TABLE a."b.c" (id bigint);"#,
        ],
    )
    .await;
    let census = take(tenants, None).await;
    assert!(
        census.tenants[0].fingerprint.is_some(),
        "{:?}",
        census.tenants[0]
    );
    // Both tables are there, each with its own column.
    let cluster = shared();
    let session = Session::connect(
        &Dsn::parse(&cluster.url("fpd_00001")).expect("dsn"),
        &SessionSettings::catalog_reader(std::time::Duration::from_secs(5)),
        &Reach::default(),
    )
    .await
    .expect("connect");
    let messages = session
        .client()
        .simple_query(census::fingerprint::FINGERPRINT_SQL)
        .await
        .expect("fingerprint query");
    session.close().await;
    let schema = census::Schema::from_messages(&messages);
    let columns: Vec<(&str, &str)> = schema
        .objects
        .iter()
        .filter(|((kind, _), _)| kind == "column")
        .map(|((_, name), def)| (name.as_str(), def.as_str()))
        .collect();
    assert_eq!(
        columns,
        vec![(r#""a.b".c.id"#, "integer"), (r#"a."b.c".id"#, "bigint")]
    );
}

#[tokio::test]
async fn census_reads_logs_and_reports_what_it_cannot_read() {
    let cluster = shared();
    let bundle = Bundle::from_sources(
        &[
            ("V1__a.sql", "CREATE TABLE a (id int);"),
            ("V2__b.sql", "CREATE TABLE b (id int);"),
        ],
        "test",
    )
    .expect("bundle");
    let mut tenants = databases("cr_", &["", ""]).await;
    // The first gets version 1 through a real run.
    let settings = flotilla::policy::Policy::default().session_settings();
    let one =
        Bundle::from_sources(&[("V1__a.sql", "CREATE TABLE a (id int);")], "test").expect("bundle");
    let outcome = flotilla::apply::apply_tenant(
        &flotilla::apply::TenantRun {
            bundle: &one,
            wave_id: "w",
            dsn: &tenants[0].dsn,
            reach: &Reach::default(),
            settings,
            mode: Default::default(),
            plan_options: Default::default(),
            prior: None,
            guard: None,
            max_block: std::time::Duration::from_secs(1),
            undo: flotilla::apply::Undo::None,
        },
        &flotilla::apply::StopSignal::default(),
    )
    .await;
    assert!(
        matches!(outcome, flotilla::apply::Outcome::Applied { .. }),
        "{outcome:?}"
    );
    // A server that is not there.
    tenants.push(tenant(
        "nowhere",
        &format!(
            "postgres://postgres@127.0.0.1:{}/x?connect_timeout=2",
            free_port()
        ),
    ));
    let census = take(tenants, Some(bundle)).await;
    let states: Vec<CensusState> = census.tenants.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        vec![
            CensusState::Behind,
            CensusState::Unmanaged,
            CensusState::Unreachable
        ]
    );
    assert_eq!(census.tenants[0].version.as_deref(), Some("1"));
    assert_eq!(census.tenants[0].pending, vec!["V2__b.sql"]);
    assert!(census.tenants[2].error.is_some());
    let total: u64 = census.histogram.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 3);
    let _ = cluster;
}

/// A catalog-only session (census, watchdog, gates) cannot write, whatever it runs.
#[tokio::test]
async fn catalog_sessions_are_read_only() {
    let cluster = shared();
    let tenants = databases("ro_", &[""]).await;
    let session = Session::connect(
        &tenants[0].dsn,
        &SessionSettings::catalog_reader(std::time::Duration::from_secs(5)),
        &Reach::default(),
    )
    .await
    .expect("connect");
    let err = session
        .client()
        .batch_execute("CREATE TABLE public.x (id int)")
        .await
        .expect_err("a write is refused");
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("25006"),
        "read_only_sql_transaction: {err}"
    );
    session.close().await;
    let _ = cluster;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
