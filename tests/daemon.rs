//! flotillad as a real process: health, SIGTERM, configuration layering (file < env <
//! flags), token enforcement, refusals of a bad config or a data dir in use, and
//! `hash-token`. Waves over real tenants are driven end to end in `cli/tests/e2e.rs`.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use flotilla::api::v1;
use flotilla::api::v1::rollout_service_client::RolloutServiceClient;
use flotilla_testkit::Daemon;
use flotilla_testkit::daemon::binary;

async fn channel(url: String) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_health_and_drains_on_sigterm() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut daemon = Daemon::start(data.path(), &[]).expect("start");
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(channel(daemon.url()).await);
    for service in ["", "flotilla.v1.RolloutService"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    // An idle client that stays connected does not hold up the drain.
    let exit = daemon.terminate(Duration::from_secs(20)).expect("exit");
    assert_eq!(exit.code(), Some(0), "SIGTERM drains and exits 0");
    assert!(daemon.log_text().contains("flotillad stopped"));
    drop(health);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_env_and_flags_layer_and_tokens_are_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (from_file, from_env) = (dir.path().join("from-file"), dir.path().join("from-env"));
    let config = dir.path().join("flotillad.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[tokens]]\nname = \"dash\"\nrole = \"viewer\"\nsha256 = \"{}\"\n",
            from_file.display(),
            flotilla::config::hash_token("v-token"),
        ),
    )
    .expect("config");
    let config_arg = config.display().to_string();
    let env_dir = from_env.display().to_string();
    let daemon = Daemon::start_exact(
        &["--config", &config_arg],
        &[("FLOTILLA_DATA_DIR", &env_dir)],
    )
    .expect("start from the config file");
    assert!(
        from_env.join("secret.key").is_file(),
        "the environment beats the file"
    );
    assert!(!from_file.exists(), "the file's data_dir was overridden");

    let mut client = RolloutServiceClient::new(channel(daemon.url()).await);
    let refused = client
        .list_waves(v1::ListWavesRequest::default())
        .await
        .expect_err("a token is required");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut request = tonic::Request::new(v1::ListWavesRequest::default());
    request
        .metadata_mut()
        .insert("authorization", "Bearer v-token".parse().expect("ascii"));
    client.list_waves(request).await.expect("a viewer may list");
    let mut request = tonic::Request::new(v1::WaveActionRequest {
        wave_id: "x".into(),
        reason: String::new(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer v-token".parse().expect("ascii"));
    let denied = client
        .pause_wave(request)
        .await
        .expect_err("a viewer may not pause");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    // A second daemon on the same data dir refuses to start, saying why.
    let second = Daemon::start_exact(
        &["--config", &config_arg, "--listen", "127.0.0.1:0"],
        &[("FLOTILLA_DATA_DIR", &env_dir)],
    );
    let err = format!("{:#}", second.err().expect("the data dir is locked"));
    assert!(err.contains("in use by another flotillad"), "{err}");
}

#[test]
fn bad_config_is_refused_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("listne = \"127.0.0.1:0\"\n", "listne"),
        (
            "[[tokens]]\nname = \"ci\"\nrole = \"operator\"\nsha256 = \"plaintext\"\n",
            "sha256",
        ),
        (
            "[[tokens]]\nname = \"ci\"\nrole = \"admin\"\nsha256 = \"\"\n",
            "admin",
        ),
    ];
    for (text, needle) in cases {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, text).expect("write");
        let out = Command::new(binary("flotillad"))
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .expect("run flotillad");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {stderr}");
        assert!(stderr.contains(needle), "{text}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn hash_token_prints_what_the_config_stores() {
    let mut child = Command::new(binary("flotillad"))
        .arg("hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"s3cret-token\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        flotilla::config::hash_token("s3cret-token")
    );
}

#[test]
fn healthcheck_says_whether_a_daemon_serves() {
    let data = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(data.path(), &[]).expect("start");
    let check = |addr: &str| {
        Command::new(binary("flotillad"))
            .args(["healthcheck", "--timeout", "2s", "--addr", addr])
            .output()
            .expect("run healthcheck")
    };
    let up = check(&daemon.url());
    assert!(up.status.success(), "{up:?}");
    assert_eq!(String::from_utf8_lossy(&up.stdout).trim(), "serving");
    drop(daemon);
    let down = check("http://127.0.0.1:1");
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    assert!(String::from_utf8_lossy(&down.stderr).contains("127.0.0.1:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_limits_come_from_the_config_and_are_named_when_hit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("flotillad.toml");
    std::fs::write(
        &config,
        "[limits]\nmax_tenants = 2\nmax_bundle_bytes = 64\n",
    )
    .expect("config");
    let config_arg = config.display().to_string();
    let data = dir.path().join("data").display().to_string();
    let daemon = Daemon::start_exact(
        &[
            "--config",
            &config_arg,
            "--data-dir",
            &data,
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .expect("start");
    let mut client = RolloutServiceClient::new(channel(daemon.url()).await);
    let small =
        flotilla::bundle::Bundle::from_sources(&[("V1__a.sql", "SELECT 1;")], "t").expect("bundle");
    let large = flotilla::bundle::Bundle::from_sources(
        &[("V1__a.sql", &format!("SELECT '{}';", "x".repeat(100)))],
        "t",
    )
    .expect("bundle");
    let tenants = |n: usize| {
        Some(v1::start_wave_request::Targets::TargetList(
            v1::TargetList {
                tenants: (0..n)
                    .map(|i| v1::Tenant {
                        tenant_id: format!("t{i}"),
                        dsn: format!("postgresql://u@db{i}.invalid/t{i}"),
                        labels: Default::default(),
                    })
                    .collect(),
            },
        ))
    };
    let request = |bundle: &flotilla::bundle::Bundle, n: usize| v1::StartWaveRequest {
        bundle: Some(flotilla::api::convert::bundle_to_proto(bundle)),
        targets: tenants(n),
        policy: Some(v1::Policy {
            concurrency: 1,
            ..Default::default()
        }),
    };
    let too_many = client
        .start_wave(request(&small, 3))
        .await
        .expect_err("3 tenants over a limit of 2");
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
    assert!(
        too_many.message().contains("limits.max_tenants"),
        "{}",
        too_many.message()
    );
    let too_big = client
        .start_wave(request(&large, 1))
        .await
        .expect_err("a bundle over 64 bytes");
    assert_eq!(too_big.code(), tonic::Code::InvalidArgument);
    assert!(
        too_big.message().contains("limits.max_bundle_bytes"),
        "{}",
        too_big.message()
    );
    let waves = client
        .list_waves(v1::ListWavesRequest::default())
        .await
        .expect("still serving")
        .into_inner()
        .waves;
    assert!(waves.is_empty(), "nothing was created");
}

/// Issue 11, case 4, since issue 17. The daemon stops (SIGSTOP) while a `per-tenant`
/// transaction runs: the whole transaction is one message, so the server finishes and
/// commits it without the daemon, and no transaction is ever left idle holding the
/// table's lock (the `idle_in_transaction_timeout` remains for what still spans round
/// trips: adoption). Once the daemon continues, the wave completes, each script once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_daemon_does_not_hold_a_tenant_in_an_idle_transaction() {
    let cluster = flotilla_testkit::shared();
    let db = cluster
        .create_tenants("idletx_", 1, "")
        .await
        .expect("tenant")
        .remove(0);
    let data = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(data.path(), &[]).expect("start");
    let mut client = RolloutServiceClient::new(channel(daemon.url()).await);
    let bundle = flotilla::bundle::Bundle::from_sources(
        &[
            (
                "V1__slow.sql",
                "CREATE TABLE locked_thing (id int);\nSELECT pg_sleep(1.5);",
            ),
            ("V2__next.sql", "SELECT 1;"),
        ],
        "t",
    )
    .expect("bundle");
    let wave = client
        .start_wave(v1::StartWaveRequest {
            bundle: Some(flotilla::api::convert::bundle_to_proto(&bundle)),
            targets: Some(v1::start_wave_request::Targets::TargetList(
                v1::TargetList {
                    tenants: vec![v1::Tenant {
                        tenant_id: db.clone(),
                        dsn: cluster.url(&db),
                        labels: Default::default(),
                    }],
                },
            )),
            policy: Some(v1::Policy {
                concurrency: 1,
                transaction: v1::TransactionMode::PerTenant as i32,
                idle_in_transaction_timeout_ms: Some(1_000),
                ..Default::default()
            }),
        })
        .await
        .expect("start")
        .into_inner()
        .wave_id;
    let admin = cluster.connect("postgres").await.expect("admin");
    let flotilla_sessions = |state: &'static str| {
        let (admin, db) = (&admin, db.clone());
        async move {
            admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flotilla' \
                     AND datname = $1 AND state LIKE $2",
                    &[&db, &state],
                )
                .await
                .expect("pg_stat_activity")
                .get::<_, i64>(0)
        }
    };
    // The first batch, in its transaction, is sleeping (not the lock or log read).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let sleeping: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flotilla' \
                 AND datname = $1 AND state = 'active' AND query LIKE '%pg_sleep%'",
                &[&db],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if sleeping > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the first batch runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = daemon.pid().expect("pid").to_string();
    let signal = |sig: &str| {
        let status = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");
    // The message ends on the server alone: the session is idle, in no transaction.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut saw_idle_in_transaction = false;
    loop {
        saw_idle_in_transaction |= flotilla_sessions("idle in transaction%").await > 0;
        if flotilla_sessions("idle").await > 0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            signal("-CONT");
            panic!("the message did not finish without the daemon");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !saw_idle_in_transaction,
        "no transaction waits on the stalled daemon"
    );
    let locks: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'flotilla' AND a.datname = $1 \
             AND l.locktype <> 'advisory'",
            &[&db],
        )
        .await
        .expect("pg_locks")
        .get(0);
    assert_eq!(locks, 0, "no table lock is held for the stalled daemon");
    signal("-CONT");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let w = client
            .get_wave(v1::GetWaveRequest {
                wave_id: wave.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        if w.state == v1::WaveState::Completed as i32 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "completes after a retry: {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tenant = cluster.connect(&db).await.expect("tenant");
    let applied: i64 = tenant
        .query_one(
            "SELECT count(*) FROM flotilla.execution_log WHERE status = 'applied'",
            &[],
        )
        .await
        .expect("log")
        .get(0);
    assert_eq!(applied, 2, "each script once");
}
