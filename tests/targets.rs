//! Catalog and discovery targets against a real server.

use flotilla::target::{TargetError, TargetSource, resolve};
use flotilla_testkit::shared;

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
