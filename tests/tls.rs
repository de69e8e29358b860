//! Sessions over TLS, as the DSN's sslmode asks, against a real server with a
//! self-signed certificate for another name.

use flotilla::connect::{Session, SessionSettings};
use flotilla::dsn::Dsn;
use flotilla::failure::Retryability;
use flotilla::reach::Reach;
use flotilla_testkit::Cluster;

async fn ssl_in_use(session: &Session) -> bool {
    session
        .client()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_encrypt_and_verify_as_libpq_does() {
    let cluster = Cluster::start().expect("cluster");
    let ca = cluster
        .enable_tls("db.flotilla.invalid")
        .await
        .expect("tls");
    let ca = ca.display();
    let port = cluster.port();
    let connect = |dsn: String| async move {
        let dsn = Dsn::parse(&dsn).expect("dsn");
        Session::connect(&dsn, &SessionSettings::default(), &Reach::default()).await
    };
    let url = |query: &str| format!("postgresql://postgres@127.0.0.1:{port}/postgres{query}");

    // libpq's default is `prefer`: TLS when the server offers it.
    for query in ["", "?sslmode=prefer"] {
        let session = connect(url(query)).await.expect("prefer");
        assert!(ssl_in_use(&session).await, "{query:?}: TLS first");
    }
    for query in ["?sslmode=allow", "?sslmode=disable"] {
        let session = connect(url(query)).await.expect("plain");
        assert!(!ssl_in_use(&session).await, "{query:?}: plain TCP");
    }
    // `prefer` against a server without TLS falls back to plain TCP.
    let shared = flotilla_testkit::shared();
    let fallback = connect(shared.url("postgres")).await.expect("fallback");
    assert!(!ssl_in_use(&fallback).await, "no TLS on offer: plain");

    // `require` with a root certificate verifies the chain, as libpq does.
    let chain = connect(url(&format!("?sslmode=require&sslrootcert={ca}")))
        .await
        .expect("require + the right root");
    assert!(ssl_in_use(&chain).await);
    let other_ca_dir = tempfile::tempdir().expect("tempdir");
    let other = flotilla_testkit::issue_test_cert(other_ca_dir.path(), "other.invalid")
        .expect("another CA");
    let refused = connect(url(&format!(
        "?sslmode=require&sslrootcert={}",
        other.ca.display()
    )))
    .await
    .err()
    .expect("require + a root that did not sign the server's certificate");
    assert_eq!(refused.retryability, Retryability::Permanent, "{refused}");

    let require = connect(format!(
        "postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=require"
    ))
    .await
    .expect("require connects without checking the certificate");
    assert!(ssl_in_use(&require).await);

    let verify_ca = connect(format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-ca sslrootcert={ca}"
    ))
    .await
    .expect("verify-ca trusts the chain, whatever the name");
    assert!(ssl_in_use(&verify_ca).await);

    let wrong_name = connect(format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={ca}"
    ))
    .await
    .err()
    .expect("verify-full refuses a certificate for another name");
    assert_eq!(
        wrong_name.retryability,
        Retryability::Permanent,
        "{wrong_name}"
    );

    let untrusted = connect(format!(
        "postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=verify-ca"
    ))
    .await
    .err()
    .expect("verify-ca without sslrootcert is refused, as libpq does");
    assert!(
        untrusted
            .to_string()
            .contains("verify-ca needs sslrootcert"),
        "{untrusted}"
    );
    // sslrootcert is read as a small regular file, never a device a DSN names.
    let device = connect(url("?sslmode=verify-full&sslrootcert=/dev/zero"))
        .await
        .err()
        .expect("/dev/zero is no root file");
    assert!(
        device.to_string().contains("not a regular file"),
        "{device}"
    );
    assert_eq!(device.retryability, Retryability::Permanent);
    let secret_file = other_ca_dir.path().join("secret.txt");
    std::fs::write(
        &secret_file,
        "-----BEGIN CERTIFICATE-----\nQmFuYW5hLVNlY3JldC0xMjM=\n-----BEGIN KEY Banana-Secret-123\n",
    )
    .expect("file");
    let not_pem = connect(url(&format!(
        "?sslmode=verify-full&sslrootcert={}",
        secret_file.display()
    )))
    .await
    .err()
    .expect("not a certificate file");
    assert!(
        !not_pem.to_string().contains("Banana") && !not_pem.to_string().contains("QmFu"),
        "names the problem, not the content: {not_pem}"
    );

    // `allow` tries plain first and takes TLS when the server insists on it.
    let admin = cluster.connect("postgres").await.expect("admin");
    std::fs::write(
        cluster.data_dir().join("pg_hba.conf"),
        "local all all trust\nhostssl all postgres 127.0.0.1/32 trust\n",
    )
    .expect("pg_hba");
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while connect(url("?sslmode=disable")).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "hostssl took effect");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let allow = connect(url("?sslmode=allow"))
        .await
        .expect("allow falls to TLS");
    assert!(ssl_in_use(&allow).await, "the server insisted on TLS");
}
