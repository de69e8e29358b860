//! Trust boundaries of the control plane, tried as an attacker would against a real
//! `flotillad` and real PostgreSQL: who may make the daemon connect where or run what,
//! where its own password may go, what a nonsense request or a broken store does to it.
//! Each of these failed (or panicked) before issue 10.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla::api::v1;
use flotilla::api::v1::rollout_service_client::RolloutServiceClient;
use flotilla_testkit::{Daemon, shared};
use tonic::Code;
use tonic::transport::Channel;

const OPERATOR: &str = "op-c41f";
const VIEWER: &str = "view-88d2";

async fn client(daemon: &Daemon) -> RolloutServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(daemon.url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    RolloutServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn as_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

/// A daemon with an operator and a viewer token and `config` (TOML) in its config file.
fn daemon_with(dir: &std::path::Path, config: &str, envs: &[(&str, &str)]) -> Daemon {
    let tokens = dir.join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n\
             [[tokens]]\nname = \"dash\"\nrole = \"viewer\"\nsha256 = \"{}\"\n",
            flotilla::config::hash_token(OPERATOR),
            flotilla::config::hash_token(VIEWER),
        ),
    )
    .expect("tokens");
    let config_path = dir.join("flotillad.toml");
    std::fs::write(&config_path, config).expect("config");
    let data = dir.join("data");
    Daemon::start_with_env(
        &data,
        &[
            "--config",
            &config_path.display().to_string(),
            "--tokens-file",
            &tokens.display().to_string(),
        ],
        envs,
    )
    .expect("start flotillad")
}

fn one_script_bundle() -> v1::Bundle {
    flotilla::api::convert::bundle_to_proto(
        &flotilla::bundle::Bundle::from_sources(&[("V1__a.sql", "SELECT 1;")], "t")
            .expect("bundle"),
    )
}

fn list(dsns: &[(&str, String)]) -> v1::TargetList {
    v1::TargetList {
        tenants: dsns
            .iter()
            .map(|(id, dsn)| v1::Tenant {
                tenant_id: id.to_string(),
                dsn: dsn.clone(),
                labels: Default::default(),
            })
            .collect(),
    }
}

/// A TCP listener that plays a PostgreSQL server asking for a cleartext password, and
/// records what each client sent: its startup packet and any password message.
struct FakeServer {
    port: u16,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut got = Vec::new();
                let read_packet = |stream: &mut std::net::TcpStream| -> Option<Vec<u8>> {
                    let mut len = [0u8; 4];
                    stream.read_exact(&mut len).ok()?;
                    let len = u32::from_be_bytes(len) as usize;
                    let mut body = vec![0u8; len.saturating_sub(4).min(1 << 16)];
                    stream.read_exact(&mut body).ok()?;
                    Some(body)
                };
                // SSLRequest first (libpq's `prefer`): say no.
                let Some(mut startup) = read_packet(&mut stream) else {
                    continue;
                };
                if startup.get(..4) == Some(&80877103u32.to_be_bytes()[..]) {
                    let _ = stream.write_all(b"N");
                    startup = match read_packet(&mut stream) {
                        Some(s) => s,
                        None => continue,
                    };
                }
                got.extend_from_slice(&startup);
                // AuthenticationCleartextPassword.
                let _ = stream.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
                let mut tag = [0u8; 1];
                if stream.read_exact(&mut tag).is_ok()
                    && tag[0] == b'p'
                    && let Some(password) = read_packet(&mut stream)
                {
                    got.extend_from_slice(b"|password:");
                    got.extend_from_slice(&password);
                }
                if let Ok(mut seen) = record.lock() {
                    seen.push(got);
                }
            }
        });
        Self { port, seen }
    }

    fn dsn(&self) -> String {
        format!("postgresql://app@127.0.0.1:{}/tenant", self.port)
    }

    /// The connections recorded once there are `n` (each is recorded when its client
    /// hangs up, which may be just after the daemon answered the test).
    fn wait_for_connections(&self, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.connections();
            if seen.len() >= n || std::time::Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn connections(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("seen")
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
}

/// A viewer cannot make the daemon connect anywhere or run anything: Plan (catalog or
/// list) and GetTenantLog by DSN are refused before any connection, and a catalog query
/// that smuggles DDL creates nothing — not even for an operator, whose catalog query is
/// one read-only statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_cannot_make_the_daemon_connect_or_run_sql() {
    let cluster = shared();
    let catalog = cluster
        .create_tenants("trust_cat_", 1, "")
        .await
        .expect("catalog")
        .remove(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = daemon_with(dir.path(), "", &[]);
    let mut api = client(&daemon).await;
    let fake = FakeServer::start();
    let smuggled = "CREATE TABLE pwned (); SELECT 'a', 'b'";
    let plan = |targets| v1::PlanRequest {
        bundle: Some(one_script_bundle()),
        targets: Some(targets),
        ..Default::default()
    };
    let denied = api
        .plan(as_token(
            VIEWER,
            plan(v1::plan_request::Targets::Catalog(v1::CatalogTargets {
                catalog_dsn: cluster.url(&catalog),
                catalog_query: smuggled.into(),
            })),
        ))
        .await
        .expect_err("viewer plan with a catalog");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("operator"),
        "{}",
        denied.message()
    );
    let denied = api
        .plan(as_token(
            VIEWER,
            plan(v1::plan_request::Targets::TargetList(list(&[(
                "t",
                fake.dsn(),
            )]))),
        ))
        .await
        .expect_err("viewer plan with a list");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = api
        .get_tenant_log(as_token(
            VIEWER,
            v1::GetTenantLogRequest {
                tenant_dsn: fake.dsn(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("viewer log by DSN");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(fake.connections().is_empty(), "no connection was made");

    let refused = api
        .plan(as_token(
            OPERATOR,
            plan(v1::plan_request::Targets::Catalog(v1::CatalogTargets {
                catalog_dsn: cluster.url(&catalog),
                catalog_query: smuggled.into(),
            })),
        ))
        .await
        .expect_err("two statements");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("42601"), "{}", refused.message());
    let c = cluster.connect(&catalog).await.expect("connect");
    let created: bool = c
        .query_one("SELECT to_regclass('pwned') IS NOT NULL", &[])
        .await
        .expect("query")
        .get(0);
    assert!(!created, "the smuggled DDL never ran");
}

/// With `allowed_hosts` set, a tenant, catalog or log read on any other server is
/// refused before a socket opens (the listener sees nothing), naming the host and the
/// setting; the allowed server still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_outside_allowed_hosts_are_refused_before_connecting() {
    let cluster = shared();
    let db = cluster
        .create_tenants("trust_allow_", 1, "")
        .await
        .expect("tenant")
        .remove(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeServer::start();
    let daemon = daemon_with(
        dir.path(),
        &format!("allowed_hosts = [\"{}\"]\n", cluster.host()),
        &[],
    );
    let mut api = client(&daemon).await;

    let start = api
        .start_wave(as_token(
            OPERATOR,
            v1::StartWaveRequest {
                bundle: Some(one_script_bundle()),
                targets: Some(v1::start_wave_request::Targets::TargetList(list(&[
                    ("ok", cluster.url(&db)),
                    ("evil", fake.dsn()),
                ]))),
                policy: Some(v1::Policy {
                    concurrency: 1,
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect_err("a tenant outside allowed_hosts");
    assert_eq!(start.code(), Code::InvalidArgument);
    let port = fake.port.to_string();
    assert!(
        start.message().contains("\"evil\"")
            && start.message().contains(&port)
            && start.message().contains("allowed_hosts"),
        "{}",
        start.message()
    );
    let catalog = api
        .plan(as_token(
            OPERATOR,
            v1::PlanRequest {
                bundle: Some(one_script_bundle()),
                targets: Some(v1::plan_request::Targets::Catalog(v1::CatalogTargets {
                    catalog_dsn: fake.dsn(),
                    catalog_query: "SELECT 1, 2".into(),
                })),
                ..Default::default()
            },
        ))
        .await
        .expect_err("a catalog outside allowed_hosts");
    assert!(
        catalog.message().contains("allowed_hosts"),
        "{}",
        catalog.message()
    );
    let log = api
        .get_tenant_log(as_token(
            OPERATOR,
            v1::GetTenantLogRequest {
                tenant_dsn: fake.dsn(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("a log read outside allowed_hosts");
    assert!(log.message().contains("allowed_hosts"), "{}", log.message());
    assert!(
        fake.connections().is_empty(),
        "no socket was opened: {:?}",
        fake.connections()
    );

    let plan = api
        .plan(as_token(
            OPERATOR,
            v1::PlanRequest {
                bundle: Some(one_script_bundle()),
                targets: Some(v1::plan_request::Targets::TargetList(list(&[(
                    "ok",
                    cluster.url(&db),
                )]))),
                ..Default::default()
            },
        ))
        .await
        .expect("the allowed server")
        .into_inner();
    assert_eq!(plan.tenants.len(), 1);
    assert_eq!(plan.tenants[0].steps.len(), 1, "{plan:?}");
}

/// The daemon's `PGPASSWORD` reaches no server a request merely names: a listener that
/// asks for a cleartext password gets the startup packet and no password. Once
/// `allowed_hosts` names that server, it does get it (so this test can fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_password_goes_only_where_the_config_says() {
    const AMBIENT: &str = "Ambient-Pw-5e2b";
    let fake = FakeServer::start();
    let read_log = |api: &mut RolloutServiceClient<Channel>| {
        let request = as_token(
            OPERATOR,
            v1::GetTenantLogRequest {
                tenant_dsn: fake.dsn(),
                ..Default::default()
            },
        );
        let mut api = api.clone();
        async move { api.get_tenant_log(request).await }
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = daemon_with(dir.path(), "", &[("PGPASSWORD", AMBIENT)]);
    let mut api = client(&daemon).await;
    read_log(&mut api).await.expect_err("the fake refuses");
    let seen = fake.wait_for_connections(1);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].contains("app"), "the startup packet: {seen:?}");
    assert!(!seen[0].contains(AMBIENT), "no password sent: {seen:?}");
    assert!(
        daemon
            .log_text()
            .contains("PGPASSWORD is set but no allowed_hosts entry names a server"),
        "said at start"
    );
    drop(daemon);

    let dir = tempfile::tempdir().expect("tempdir");
    let vetted = daemon_with(
        dir.path(),
        "allowed_hosts = [\"127.0.0.1\"]\n",
        &[("PGPASSWORD", AMBIENT)],
    );
    let mut api = client(&vetted).await;
    read_log(&mut api).await.expect_err("the fake refuses");
    let seen = fake.wait_for_connections(2);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen[1].contains(AMBIENT),
        "a named server gets it: {seen:?}"
    );
}

/// A policy outside its ranges is refused naming the field, nothing is stored, and the
/// daemon restarts cleanly (a rate of 1e-20 used to be stored, then panic the daemon
/// at every start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonsense_policy_is_refused_and_the_daemon_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = daemon_with(dir.path(), "", &[]);
    let mut api = client(&daemon).await;
    let start = |policy: v1::Policy| {
        as_token(
            OPERATOR,
            v1::StartWaveRequest {
                bundle: Some(one_script_bundle()),
                targets: Some(v1::start_wave_request::Targets::TargetList(list(&[(
                    "t",
                    shared().url("postgres"),
                )]))),
                policy: Some(policy),
            },
        )
    };
    let base = v1::Policy {
        concurrency: 1,
        ..Default::default()
    };
    for (policy, field) in [
        (
            v1::Policy {
                rate: 1e-20,
                ..base.clone()
            },
            "rate",
        ),
        (
            v1::Policy {
                lock_timeout_ms: Some(0),
                ..base.clone()
            },
            "lock_timeout",
        ),
        (
            v1::Policy {
                statement_timeout_ms: Some(1 << 31),
                ..base.clone()
            },
            "statement_timeout",
        ),
        (
            v1::Policy {
                concurrency: 1_000_000,
                ..base.clone()
            },
            "concurrency",
        ),
    ] {
        let refused = api
            .start_wave(start(policy))
            .await
            .expect_err("out of range");
        assert_eq!(refused.code(), Code::InvalidArgument, "{field}");
        assert!(refused.message().contains(field), "{}", refused.message());
    }
    daemon.restart().expect("restarts cleanly");
    let mut api = client(&daemon).await;
    let waves = api
        .list_waves(as_token(VIEWER, v1::ListWavesRequest::default()))
        .await
        .expect("serving")
        .into_inner()
        .waves;
    assert!(waves.is_empty(), "nothing was stored");

    // Ids: malformed is INVALID_ARGUMENT naming the field, unknown is NOT_FOUND.
    let get = |id: &str| as_token(VIEWER, v1::GetWaveRequest { wave_id: id.into() });
    let bad = api.get_wave(get("no-such-wave")).await.expect_err("bad id");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("wave_id"), "{}", bad.message());
    let empty = api.get_wave(get("")).await.expect_err("empty id");
    assert_eq!(empty.code(), Code::InvalidArgument);
    let unknown = api
        .get_wave(get("019a0000-0000-7000-8000-000000000000"))
        .await
        .expect_err("unknown id");
    assert_eq!(unknown.code(), Code::NotFound);
}

/// A stored wave this build cannot load is quarantined: the daemon starts, shows it
/// FAILED with `unloadable: …`, runs the other waves, and can forget it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unloadable_wave_is_quarantined_and_the_others_resume() {
    let cluster = shared();
    let dbs = cluster
        .create_tenants("trust_quar_", 4, "")
        .await
        .expect("tenants");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = daemon_with(dir.path(), "", &[]);
    let mut api = client(&daemon).await;
    let mut start_paused = async |dbs: &[String]| {
        let rows: Vec<(&str, String)> = dbs.iter().map(|d| (d.as_str(), cluster.url(d))).collect();
        let id = api
            .start_wave(as_token(
                OPERATOR,
                v1::StartWaveRequest {
                    bundle: Some(one_script_bundle()),
                    targets: Some(v1::start_wave_request::Targets::TargetList(list(&rows))),
                    policy: Some(v1::Policy {
                        concurrency: 1,
                        canary_count: 1,
                        pause_after_canary: true,
                        ..Default::default()
                    }),
                },
            ))
            .await
            .expect("start")
            .into_inner()
            .wave_id;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let w = api
                .get_wave(as_token(
                    VIEWER,
                    v1::GetWaveRequest {
                        wave_id: id.clone(),
                    },
                ))
                .await
                .expect("get")
                .into_inner();
            if w.state == v1::WaveState::Paused as i32 && w.tenants.is_some_and(|c| c.running == 0)
            {
                break id;
            }
            assert!(std::time::Instant::now() < deadline, "canary pause: {w:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let good = start_paused(&dbs[..2]).await;
    let broken = start_paused(&dbs[2..]).await;
    daemon.kill9().expect("kill -9");

    // Break one wave record the way a bad disk or an incompatible build would.
    let store = dir.path().join("data").join("store");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let db = loop {
        match sled::open(&store) {
            Ok(db) => break db,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "open the store: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    db.open_tree("waves")
        .expect("tree")
        .insert(broken.as_bytes(), &b"{\"format\": 1, \"id\": "[..])
        .expect("corrupt");
    db.flush().expect("flush");
    drop(db);

    daemon.restart().expect("the daemon starts anyway");
    let mut api = client(&daemon).await;
    let quarantined = api
        .get_wave(as_token(
            VIEWER,
            v1::GetWaveRequest {
                wave_id: broken.clone(),
            },
        ))
        .await
        .expect("shown")
        .into_inner();
    assert_eq!(quarantined.state, v1::WaveState::Failed as i32);
    assert!(
        quarantined.reason.starts_with("unloadable:"),
        "{}",
        quarantined.reason
    );
    let listed = api
        .list_waves(as_token(VIEWER, v1::ListWavesRequest::default()))
        .await
        .expect("list")
        .into_inner()
        .waves;
    assert_eq!(listed.len(), 2, "both listed");
    let resume = |id: &str| {
        as_token(
            OPERATOR,
            v1::WaveActionRequest {
                wave_id: id.into(),
                reason: String::new(),
                ..Default::default()
            },
        )
    };
    let refused = api
        .resume_wave(resume(&broken))
        .await
        .expect_err("not runnable");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    api.resume_wave(resume(&good)).await.expect("the good one");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let w = api
            .get_wave(as_token(
                VIEWER,
                v1::GetWaveRequest {
                    wave_id: good.clone(),
                },
            ))
            .await
            .expect("get")
            .into_inner();
        if w.state == v1::WaveState::Completed as i32 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "completes: {w:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.forget_wave(resume(&broken)).await.expect("forget");
    let gone = api
        .get_wave(as_token(
            VIEWER,
            v1::GetWaveRequest {
                wave_id: broken.clone(),
            },
        ))
        .await
        .expect_err("forgotten");
    assert_eq!(gone.code(), Code::NotFound);
    daemon.restart().expect("restart");
    let mut api = client(&daemon).await;
    let listed = api
        .list_waves(as_token(VIEWER, v1::ListWavesRequest::default()))
        .await
        .expect("list")
        .into_inner()
        .waves;
    assert_eq!(
        listed
            .iter()
            .map(|w| w.wave_id.as_str())
            .collect::<Vec<_>>(),
        [good.as_str()],
        "forgotten in the store too"
    );
}

/// Without tokens the daemon refuses a non-loopback address unless told
/// `--insecure-no-auth`, and then says so in its log.
#[test]
fn no_unauthenticated_remote_control() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data").display().to_string();
    let out = std::process::Command::new(flotilla_testkit::daemon::binary("flotillad"))
        .args(["--data-dir", &data, "--listen", "0.0.0.0:0"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run flotillad");
    assert!(!out.status.success(), "refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");

    let daemon = Daemon::start_exact(
        &[
            "--data-dir",
            &data,
            "--listen",
            "0.0.0.0:0",
            "--insecure-no-auth",
        ],
        &[],
    )
    .expect("starts when told");
    assert!(daemon.log_text().contains("--insecure-no-auth"));
}

/// Placeholder values often carry secrets (as in Flyway folders): an operator reading a
/// wave sees them, a viewer sees each name with a short hash of its value, in
/// GetWave and ListWaves alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_placeholder_names_not_values() {
    let cluster = shared();
    let db = cluster
        .create_tenants("trust_placeholder_", 1, "")
        .await
        .expect("tenant")
        .remove(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = daemon_with(dir.path(), "", &[]);
    let mut api = client(&daemon).await;
    let bundle = flotilla::bundle::Bundle::from_files_with(
        vec![flotilla::bundle::BundleFile {
            name: "V1__role.sql".into(),
            content: b"CREATE TABLE secret_holder (note text DEFAULT '${app_password}');".to_vec(),
        }],
        &flotilla::bundle::BundleOptions {
            placeholders: [("app_password".to_string(), "hunter2".to_string())].into(),
            ..Default::default()
        },
        "test",
    )
    .expect("bundle");
    let id = api
        .start_wave(as_token(
            OPERATOR,
            v1::StartWaveRequest {
                bundle: Some(flotilla::api::convert::bundle_to_proto(&bundle)),
                targets: Some(v1::start_wave_request::Targets::TargetList(list(&[(
                    "t",
                    cluster.url(&db),
                )]))),
                policy: Some(v1::Policy {
                    concurrency: 1,
                    ..Default::default()
                }),
            },
        ))
        .await
        .expect("start")
        .into_inner()
        .wave_id;
    let get = |token: &'static str| {
        let mut api = api.clone();
        let id = id.clone();
        async move {
            api.get_wave(as_token(token, v1::GetWaveRequest { wave_id: id }))
                .await
                .expect("get")
                .into_inner()
        }
    };
    assert_eq!(get(OPERATOR).await.placeholders["app_password"], "hunter2");
    let seen = get(VIEWER).await.placeholders["app_password"].clone();
    assert!(
        seen.starts_with("sha256:") && !seen.contains("hunter2"),
        "{seen}"
    );
    let listed = api
        .list_waves(as_token(VIEWER, v1::ListWavesRequest::default()))
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed
            .waves
            .iter()
            .all(|w| w.placeholders.values().all(|v| !v.contains("hunter2"))),
        "{listed:?}"
    );
}

/// Fleets (issue 13): only an operator registers or removes one; a viewer lists it and
/// takes its census but never sees a catalog query or a password; a fleet's hosts are
/// checked against `allowed_hosts` at registration and again at every use; the store
/// holds no password in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleets_are_registered_by_operators_and_read_by_viewers() {
    let cluster = shared();
    let dbs = cluster
        .create_tenants("trust_fleet_", 2, "")
        .await
        .expect("tenants");
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeServer::start();
    let allowed = |hosts: &[String]| {
        format!(
            "allowed_hosts = [{}]\n",
            hosts
                .iter()
                .map(|h| format!("\"{h}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let fake_host = format!("127.0.0.1:{}", fake.port);
    let mut daemon = daemon_with(
        dir.path(),
        &allowed(&[cluster.host(), fake_host.clone()]),
        &[],
    );
    let mut api = client(&daemon).await;
    let secret = "hunter2-in-the-catalog-dsn";
    let catalog_dsn = format!("{}?password={secret}", cluster.url(&dbs[0]));
    let catalog_query = format!(
        "SELECT '{}', 'host=127.0.0.1 port={} dbname={} user=postgres password={secret}'",
        dbs[1],
        cluster.port(),
        dbs[1]
    );
    let add = |name: &str, source| v1::AddFleetRequest {
        name: name.into(),
        source: Some(source),
        ..Default::default()
    };
    let catalog = v1::add_fleet_request::Source::Catalog(v1::CatalogTargets {
        catalog_dsn: catalog_dsn.clone(),
        catalog_query: catalog_query.clone(),
    });

    // A viewer registers nothing and removes nothing, and nothing is connected to.
    let denied = api
        .add_fleet(as_token(
            VIEWER,
            add(
                "evil",
                v1::add_fleet_request::Source::TargetList(list(&[("t", fake.dsn())])),
            ),
        ))
        .await
        .expect_err("a viewer registering");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(fake.connections().is_empty());

    // An operator registers a catalog fleet and a listed one (the fake server is
    // allowed for now: registering a list connects to nothing).
    api.add_fleet(as_token(OPERATOR, add("cat", catalog)))
        .await
        .expect("a catalog fleet");
    api.add_fleet(as_token(
        OPERATOR,
        add(
            "listed",
            v1::add_fleet_request::Source::TargetList(list(&[("t", fake.dsn())])),
        ),
    ))
    .await
    .expect("a listed fleet");
    let denied = api
        .remove_fleet(as_token(
            VIEWER,
            v1::RemoveFleetRequest { name: "cat".into() },
        ))
        .await
        .expect_err("a viewer removing");
    assert_eq!(denied.code(), Code::PermissionDenied);

    // A viewer sees the fleets without the query or any password; an operator sees
    // the query.
    let seen = api
        .list_fleets(as_token(VIEWER, v1::ListFleetsRequest {}))
        .await
        .expect("viewer lists")
        .into_inner();
    let text = format!("{seen:?}");
    assert!(!text.contains(secret), "{text}");
    assert!(!text.contains("SELECT"), "the query is hidden: {text}");
    let op = api
        .get_fleet(as_token(
            OPERATOR,
            v1::GetFleetRequest { name: "cat".into() },
        ))
        .await
        .expect("operator reads")
        .into_inner();
    assert!(op.source.contains("SELECT"), "{op:?}");

    // A viewer's census of the catalog fleet reads its one tenant; no password shows.
    let census = api
        .census(as_token(
            VIEWER,
            v1::CensusRequest {
                subject: Some(v1::census_request::Subject::Fleet("cat".into())),
                ..Default::default()
            },
        ))
        .await
        .expect("viewer census")
        .into_inner();
    assert_eq!(census.tenants.len(), 1, "{census:?}");
    assert_eq!(census.tenants[0].tenant_id, dbs[1]);
    assert!(!format!("{census:?}").contains(secret));
    // Crowding a server is refused, one past each cap.
    for (concurrency, per_host) in [(65, 0), (0, 17)] {
        let crowd = api
            .census(as_token(
                VIEWER,
                v1::CensusRequest {
                    subject: Some(v1::census_request::Subject::Fleet("cat".into())),
                    concurrency,
                    per_host,
                    ..Default::default()
                },
            ))
            .await
            .expect_err("past a cap");
        assert_eq!(crowd.code(), Code::InvalidArgument, "{crowd:?}");
    }
    // A kept census is shown as taken: options with `cached` are refused; the
    // histogram alone has counts and no tenants.
    let fleet_census = |cached, fingerprint, histogram_only| v1::CensusRequest {
        subject: Some(v1::census_request::Subject::Fleet("cat".into())),
        cached,
        fingerprint,
        histogram_only,
        ..Default::default()
    };
    let cached = api
        .census(as_token(VIEWER, fleet_census(true, true, false)))
        .await
        .expect_err("cached with fingerprint");
    assert_eq!(cached.code(), Code::InvalidArgument, "{cached:?}");
    let histogram = api
        .census(as_token(VIEWER, fleet_census(true, false, true)))
        .await
        .expect("the kept census, histogram only")
        .into_inner();
    assert!(histogram.tenants.is_empty(), "{histogram:?}");
    let counted: u64 = histogram.histogram.iter().map(|b| b.tenants).sum();
    assert_eq!(counted, 1, "{histogram:?}");

    // A catalog whose query fails can echo its rows in the error: an operator reads
    // why, a viewer only that it failed.
    let catalog_db = cluster.connect(&dbs[0]).await.expect("catalog db");
    let row_text = "row-text-7731";
    catalog_db
        .batch_execute(&format!(
            "CREATE TABLE fleet_src (id text, dsn text, n text);
             INSERT INTO fleet_src VALUES ('{}', 'host=127.0.0.1 port={} dbname={} user=postgres', '1');",
            dbs[1],
            cluster.port(),
            dbs[1]
        ))
        .await
        .expect("catalog table");
    api.add_fleet(as_token(
        OPERATOR,
        add(
            "breaks",
            v1::add_fleet_request::Source::Catalog(v1::CatalogTargets {
                catalog_dsn: catalog_dsn.clone(),
                catalog_query: "SELECT id, dsn FROM fleet_src WHERE n::int > 0".into(),
            }),
        ),
    ))
    .await
    .expect("a catalog fleet that resolves today");
    catalog_db
        .batch_execute(&format!("UPDATE fleet_src SET n = '{row_text}'"))
        .await
        .expect("break the catalog");
    let breaks = v1::CensusRequest {
        subject: Some(v1::census_request::Subject::Fleet("breaks".into())),
        ..Default::default()
    };
    let seen_by_operator = api
        .census(as_token(OPERATOR, breaks.clone()))
        .await
        .expect_err("the catalog fails");
    assert_eq!(seen_by_operator.code(), Code::FailedPrecondition);
    assert!(
        seen_by_operator.message().contains(row_text),
        "an operator reads the server's error: {}",
        seen_by_operator.message()
    );
    let seen_by_viewer = api
        .census(as_token(VIEWER, breaks))
        .await
        .expect_err("the catalog fails");
    assert_eq!(seen_by_viewer.code(), Code::FailedPrecondition);
    assert!(
        !seen_by_viewer.message().contains(row_text),
        "a viewer does not read the catalog's rows: {}",
        seen_by_viewer.message()
    );
    assert!(
        seen_by_viewer.message().contains("breaks"),
        "{}",
        seen_by_viewer.message()
    );

    // The fake server leaves allowed_hosts: the listed fleet no longer resolves, and no
    // socket opens to it.
    std::fs::write(
        dir.path().join("flotillad.toml"),
        allowed(&[cluster.host()]),
    )
    .expect("config");
    daemon.restart().expect("restart");
    let mut api = client(&daemon).await;
    let refused = api
        .census(as_token(
            OPERATOR,
            v1::CensusRequest {
                subject: Some(v1::census_request::Subject::Fleet("listed".into())),
                ..Default::default()
            },
        ))
        .await
        .expect_err("a host no longer allowed");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("allowed_hosts"),
        "{}",
        refused.message()
    );
    assert!(
        fake.connections().is_empty(),
        "no socket opened: {:?}",
        fake.connections()
    );

    // No password of a fleet sits in the store in the clear.
    daemon
        .terminate(Duration::from_secs(10))
        .expect("terminate");
    let files = flotilla_testkit::files_under(&dir.path().join("data"));
    assert!(!files.is_empty(), "the store has files to search");
    for path in files {
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} holds the password in the clear",
            path.display()
        );
    }
}
