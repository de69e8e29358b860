//! Sessions over TLS, as the DSN's sslmode asks, against a real server with a
//! self-signed certificate for another name.

use flotilla::connect::{Session, SessionSettings};
use flotilla::dsn::Dsn;
use flotilla::failure::Retryability;
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
        Session::connect(&dsn, &SessionSettings::default()).await
    };

    let plain = connect(format!("postgresql://postgres@127.0.0.1:{port}/postgres"))
        .await
        .expect("plain");
    assert!(!ssl_in_use(&plain).await, "no sslmode: plain TCP");

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
    .expect("without sslrootcert a self-signed certificate is not trusted");
    assert!(
        untrusted
            .to_string()
            .contains("cannot connect to postgresql://postgres@127.0.0.1"),
        "{untrusted}"
    );
}
