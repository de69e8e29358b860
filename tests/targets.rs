//! Catalog and discovery targets against a real server.

use flotilla::reach::Reach;
use flotilla::target::{TargetError, TargetSource};
use flotilla_testkit::shared;

/// Resolves with any host allowed and room for 1,000 tenants.
async fn resolve(source: &TargetSource) -> Result<Vec<flotilla::target::Tenant>, TargetError> {
    flotilla::target::resolve(source, &Reach::default(), 1_000).await
}

#[tokio::test]
async fn discovery_finds_matching_databases_only() {
    let cluster = shared();
    let made = cluster
        .create_tenants("disc_", 3, "")
        .await
        .expect("tenants");
    cluster
        .create_tenants("other_", 1, "")
        .await
        .expect("other");
    let tenants = resolve(&TargetSource::Discover {
        dsn: cluster.url("postgres"),
        pattern: "disc\\_%".into(),
    })
    .await
    .expect("discover");
    let ids: Vec<&str> = tenants.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, made.iter().map(String::as_str).collect::<Vec<_>>());
    for t in &tenants {
        assert_eq!(t.dsn.dbname(), t.id);
        assert_eq!(t.dsn.host(), cluster.host());
    }
    let none = resolve(&TargetSource::Discover {
        dsn: cluster.url("postgres"),
        pattern: "nothing_like_this_%".into(),
    })
    .await;
    assert!(matches!(none, Err(TargetError::Empty { .. })), "{none:?}");
}

#[tokio::test]
async fn catalog_query_gives_tenants_with_labels() {
    let cluster = shared();
    let catalog = cluster
        .create_tenants("catalog_", 1, "")
        .await
        .expect("catalog db")
        .remove(0);
    let c = cluster.connect(&catalog).await.expect("connect");
    c.batch_execute(&format!(
        "CREATE TABLE tenants (id text, conn text, region text, active bool);
         INSERT INTO tenants VALUES
           ('acme', '{}', 'eu', true),
           ('globex', 'host=127.0.0.1 port={} dbname=globex user=app', NULL, true),
           ('gone', 'postgresql://x@h/gone', 'us', false);",
        cluster.url("acme"),
        cluster.port()
    ))
    .await
    .expect("seed catalog");
    let tenants = resolve(&TargetSource::Catalog {
        dsn: cluster.url(&catalog),
        query: "SELECT id, conn, region FROM tenants WHERE active ORDER BY id".into(),
    })
    .await
    .expect("catalog");
    assert_eq!(tenants.len(), 2);
    assert_eq!(tenants[0].id, "acme");
    assert_eq!(
        tenants[0].labels.get("region").map(String::as_str),
        Some("eu")
    );
    assert!(tenants[1].labels.is_empty(), "NULL labels are absent");
    assert_eq!(tenants[1].dsn.user(), "app");

    let bad = resolve(&TargetSource::Catalog {
        dsn: cluster.url(&catalog),
        query: "SELECT id FROM tenants".into(),
    })
    .await
    .expect_err("one column");
    assert!(bad.to_string().contains("tenant_id, dsn"), "{bad}");
    let bad = resolve(&TargetSource::Catalog {
        dsn: cluster.url(&catalog),
        query: "SELECT * FROM no_such_table".into(),
    })
    .await
    .expect_err("bad query");
    assert!(bad.to_string().contains("42P01"), "{bad}");
    let unreachable = resolve(&TargetSource::Catalog {
        dsn: "postgresql://app:s3cr3t-pw@127.0.0.1:1/catalog?connect_timeout=2".into(),
        query: "SELECT 1, 2".into(),
    })
    .await
    .expect_err("unreachable");
    let text = unreachable.to_string();
    assert!(
        !text.contains("s3cr3t-pw") && text.contains("postgresql://app@127.0.0.1:1/catalog"),
        "{text}"
    );
    assert!(text.to_lowercase().contains("refused"), "says why: {text}");
}

/// A catalog query is one read: several statements are refused (not run), a write is
/// refused by the READ ONLY transaction, the session has a statement timeout, and rows
/// past the tenant limit are not fetched.
#[tokio::test]
async fn catalog_queries_are_single_bounded_reads() {
    let cluster = shared();
    let catalog = cluster
        .create_tenants("catalog_ro_", 1, "")
        .await
        .expect("catalog db")
        .remove(0);
    let c = cluster.connect(&catalog).await.expect("connect");
    c.batch_execute(
        "CREATE TABLE tenants (id text, conn text);
         INSERT INTO tenants SELECT 't' || i, 'postgresql://u@h/t' || i FROM generate_series(1, 5) i;",
    )
    .await
    .expect("seed");
    let query = |sql: &str| TargetSource::Catalog {
        dsn: cluster.url(&catalog),
        query: sql.into(),
    };

    let two = resolve(&query(
        "CREATE TABLE pwned (); SELECT id, conn FROM tenants",
    ))
    .await
    .expect_err("two statements");
    assert!(two.to_string().contains("42601"), "{two}");
    let wrote = resolve(&query(
        "WITH gone AS (DELETE FROM tenants RETURNING id, conn) SELECT * FROM gone",
    ))
    .await
    .expect_err("a write");
    assert!(wrote.to_string().contains("25006"), "read-only: {wrote}");
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM tenants WHERE to_regclass('pwned') IS NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 5, "nothing was created or deleted");

    // The session's own settings, read back as tenant ids (the dsn column is invalid,
    // so the error lists the id).
    let settings = resolve(&query(
        "SELECT current_setting('transaction_read_only') || '/' || current_setting('statement_timeout'), 'not a dsn'",
    ))
    .await
    .expect_err("bad dsn");
    assert!(settings.to_string().contains("\"on/30s\""), "{settings}");

    let many = flotilla::target::resolve(
        &query("SELECT id, conn FROM tenants ORDER BY id"),
        &Reach::default(),
        3,
    )
    .await
    .expect_err("over the limit");
    assert!(many.to_string().contains("max_tenants"), "{many}");

    let typed = resolve(&query("SELECT now(), conn FROM tenants"))
        .await
        .expect_err("a timestamp id");
    assert!(typed.to_string().contains("cast it to text"), "{typed}");
}

/// A catalog or discovery server outside `allowed_hosts` is refused before any
/// connection: nothing listens on the refused port, and the error is the refusal, not
/// a connection failure.
#[tokio::test]
async fn sources_outside_allowed_hosts_are_refused_before_connecting() {
    let cluster = shared();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let reach = Reach::without_ambient_password(
        flotilla::reach::AllowedHosts::parse(&[cluster.host()]).expect("rules"),
    );
    for source in [
        TargetSource::Catalog {
            dsn: format!("postgresql://u@127.0.0.1:{port}/catalog"),
            query: "SELECT 1, 2".into(),
        },
        TargetSource::Discover {
            dsn: format!("postgresql://u@127.0.0.1:{port}/postgres"),
            pattern: "%".into(),
        },
    ] {
        let err = flotilla::target::resolve(&source, &reach, 10)
            .await
            .expect_err("refused");
        assert!(
            err.to_string().contains("allowed_hosts")
                && err.to_string().contains(&port.to_string()),
            "{err}"
        );
    }
    assert!(
        listener.accept().is_err(),
        "no connection reached the refused port"
    );
    // The allowed server still works.
    let ok = flotilla::target::resolve(
        &TargetSource::Discover {
            dsn: cluster.url("postgres"),
            pattern: "postgres".into(),
        },
        &reach,
        10,
    )
    .await
    .expect("allowed");
    assert_eq!(ok.len(), 1);
}
