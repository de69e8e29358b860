//! End to end: the real `flotillad` and `flotilla` binaries against real PostgreSQL
//! clusters. Each test starts its own daemon(s) on a temporary data dir and uses its own
//! tenant databases (a distinct name prefix) on the two clusters shared by this file;
//! a test that stops a server starts a cluster of its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_testkit::{Cluster, Daemon, shared, shared_second};
use serde_json::Value;

/// What a CLI run left behind.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// Runs `flotilla --server URL ARGS…` with no token from the environment.
async fn flotilla(server: &str, args: &[&str]) -> Run {
    flotilla_with(server, args, &[]).await
}

async fn flotilla_with(server: &str, args: &[&str], envs: &[(&str, &str)]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .arg("--server")
        .arg(server)
        .args(args)
        .env_remove("FLOTILLA_TOKEN")
        .envs(envs.iter().copied())
        .output()
        .await
        .expect("run flotilla");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A bundle directory holding `sources`.
fn bundle(sources: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, sql) in sources {
        std::fs::write(dir.path().join(name), sql).expect("write script");
    }
    dir
}

const FAST: &[(&str, &str)] = &[
    (
        "V1__create_items.sql",
        "CREATE TABLE items (id bigint PRIMARY KEY);",
    ),
    (
        "V2__add_name.sql",
        "ALTER TABLE items ADD COLUMN name text;",
    ),
    (
        "R__items_view.sql",
        "CREATE OR REPLACE VIEW item_names AS SELECT name FROM items;",
    ),
];

/// Each tenant takes at least 150 ms, so waves last long enough to be interrupted.
const SLOW: &[(&str, &str)] = &[
    (
        "V1__create_items.sql",
        "CREATE TABLE items (id bigint PRIMARY KEY, email text);",
    ),
    (
        "V2__slow_step.sql",
        "SELECT pg_sleep(0.15);\nINSERT INTO items VALUES (1, 'a@example.com');",
    ),
    (
        "V3__index_email.sql",
        "-- flotilla:no-transaction\nCREATE INDEX CONCURRENTLY items_email_idx ON items (email);",
    ),
];

fn versions(sources: &[(&str, &str)]) -> Vec<String> {
    sources
        .iter()
        .filter(|(n, _)| n.starts_with('V'))
        .map(|(n, _)| n[1..n.find("__").expect("versioned name")].to_string())
        .collect()
}

/// A targets CSV for `(tenant_id, dsn)` pairs, in `dir`.
fn targets_csv(dir: &Path, rows: &[(String, String)]) -> PathBuf {
    let mut text = String::from("tenant_id,dsn\n");
    for (id, dsn) in rows {
        text.push_str(&format!("{id},{dsn}\n"));
    }
    let path = dir.join("targets.csv");
    std::fs::write(&path, text).expect("write csv");
    path
}

/// Tenants `{prefix}NNNNN` on `cluster`, as CSV rows.
async fn tenants(cluster: &Cluster, prefix: &str, n: usize) -> Vec<(String, String)> {
    cluster
        .create_tenants(prefix, n, "")
        .await
        .expect("create tenants")
        .into_iter()
        .map(|db| (db.clone(), cluster.url(&db)))
        .collect()
}

/// Every versioned row of a tenant's log: version → (applied rows, all rows).
async fn log_counts(cluster: &Cluster, db: &str) -> BTreeMap<String, (i64, i64)> {
    let client = cluster.connect(db).await.expect("connect tenant");
    let rows = match client
        .query(
            "SELECT version, count(*) FILTER (WHERE status = 'applied'), count(*) \
             FROM flotilla.execution_log WHERE kind = 'versioned' GROUP BY version",
            &[],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e)
            if e.code().map(|c| c.code()) == Some("42P01")
                || e.code().map(|c| c.code()) == Some("3F000") =>
        {
            return BTreeMap::new();
        }
        Err(e) => panic!("read the log of {db}: {e}"),
    };
    rows.iter()
        .map(|r| (r.get::<_, String>(0), (r.get(1), r.get(2))))
        .collect()
}

/// Asserts each version is in each tenant's log exactly once, as `applied`.
async fn assert_once(cluster: &Cluster, dbs: &[(String, String)], expected: &[String]) {
    for (db, _) in dbs {
        let counts = log_counts(cluster, db).await;
        let want: BTreeMap<String, (i64, i64)> =
            expected.iter().map(|v| (v.clone(), (1, 1))).collect();
        assert_eq!(counts, want, "tenant {db}: version -> (applied, rows)");
    }
}

/// `wave start --bundle DIR --targets CSV EXTRA…` (global flags may come last).
fn start_args<'a>(bundle_dir: &'a Path, csv: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "wave",
        "start",
        "--bundle",
        path(bundle_dir),
        "--targets",
        path(csv),
    ];
    args.extend_from_slice(extra);
    args
}

/// `wave start --output json` without waiting; the new wave's id.
async fn start_wave(server: &str, bundle_dir: &Path, csv: &Path, extra: &[&str]) -> String {
    let mut extra = extra.to_vec();
    extra.extend(["--output", "json"]);
    let run = flotilla(server, &start_args(bundle_dir, csv, &extra)).await;
    assert_eq!(run.code, 0, "{run:?}");
    run.json()["wave_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no wave_id: {run:?}"))
        .to_string()
}

/// `n` tenants on `cluster`, their targets CSV, and a bundle of `sources`; the temp dir
/// holding the CSV comes last (keep it alive).
async fn fleet(
    cluster: &Cluster,
    prefix: &str,
    n: usize,
    sources: &[(&str, &str)],
) -> (
    Vec<(String, String)>,
    PathBuf,
    tempfile::TempDir,
    tempfile::TempDir,
) {
    let rows = tenants(cluster, prefix, n).await;
    let work = tempfile::tempdir().expect("tempdir");
    let csv = targets_csv(work.path(), &rows);
    (rows, csv, bundle(sources), work)
}

/// `wave status --output json`.
async fn status(server: &str, wave: &str) -> Value {
    let run = flotilla(server, &["--output", "json", "wave", "status", wave]).await;
    assert_eq!(run.code, 0, "{run:?}");
    run.json()
}

fn start_daemon(args: &[&str]) -> (Daemon, tempfile::TempDir) {
    let data = tempfile::tempdir().expect("data dir");
    let daemon = Daemon::start(data.path(), args).expect("start flotillad");
    (daemon, data)
}

fn count(status: &Value, state: &str) -> u64 {
    status["tenants"][state]
        .as_u64()
        .unwrap_or_else(|| panic!("no tenants.{state} in {status}"))
}

/// Polls `wave status --output json` until `done` holds.
async fn wait_for(server: &str, wave: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let run = flotilla(server, &["--output", "json", "wave", "status", wave]).await;
        if run.code == 0 {
            let status = run.json();
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "waited 120s for {what}; last: {status}"
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "waited 120s for {what}; last: {run:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// 1. `wave start --wait` over 100 tenants on two servers exits 0, and every tenant's
///    log has each version exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_wait_over_two_servers_applies_each_version_once() {
    let (a, b) = (shared(), shared_second());
    let mut rows = tenants(a, "e1a_", 50).await;
    let on_b = tenants(b, "e1b_", 50).await;
    rows.extend(on_b.clone());
    let work = tempfile::tempdir().expect("tempdir");
    let csv = targets_csv(work.path(), &rows);
    let dir = bundle(FAST);
    let (daemon, _data) = start_daemon(&[]);

    let run = flotilla(
        &daemon.url(),
        &start_args(
            dir.path(),
            &csv,
            &["--concurrency", "8", "--per-host", "4", "--wait"],
        ),
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("COMPLETED"), "{}", run.stdout);
    assert_once(a, &rows[..50], &versions(FAST)).await;
    assert_once(b, &on_b, &versions(FAST)).await;

    // Paging through the tenants in small pages sees each exactly once, in order.
    let wave = run
        .stdout
        .lines()
        .next()
        .expect("wave id")
        .trim()
        .to_string();
    let mut client =
        flotilla::api::v1::rollout_service_client::RolloutServiceClient::connect(daemon.url())
            .await
            .expect("connect");
    let (mut seen, mut token) = (Vec::new(), String::new());
    loop {
        let page = client
            .list_wave_tenants(flotilla::api::v1::ListWaveTenantsRequest {
                wave_id: wave.clone(),
                state: 0,
                page_size: 7,
                page_token: token,
            })
            .await
            .expect("page")
            .into_inner();
        assert!(page.tenants.len() <= 7);
        seen.extend(page.tenants.into_iter().map(|t| t.tenant_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected: Vec<String> = rows.iter().map(|(id, _)| id.clone()).collect();
    expected.sort();
    assert_eq!(seen, expected, "every tenant once, in the wave's order");
}

/// 2. `kill -9` of flotillad at three moments of one wave, restarted each time on the
///    same data dir: the wave completes and every version is applied once per tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wave_survives_three_kill_9s_of_the_daemon() {
    let cluster = shared();
    let (rows, csv, dir, _work) = fleet(cluster, "e2_", 60, SLOW).await;
    let (mut daemon, _data) = start_daemon(&[]);
    let server = daemon.url();

    let wave = start_wave(&server, dir.path(), &csv, &["--concurrency", "3"]).await;

    for kill in 1..=3 {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(250..700))).await;
        let status = status(&server, &wave).await;
        assert_eq!(
            status["state"], "RUNNING",
            "kill {kill} must land mid-wave: {status}"
        );
        daemon.kill9().expect("kill -9");
        daemon.restart().expect("restart on the same data dir");
    }
    let status = wait_for(&server, &wave, "the wave to complete", |s| {
        s["state"] != "RUNNING"
    })
    .await;
    if status["state"] != "COMPLETED" {
        let failed = flotilla(&server, &["wave", "tenants", &wave, "--state", "failed"]).await;
        panic!(
            "{status}\nfailed tenants:\n{}\ndaemon log:\n{}",
            failed.stdout,
            daemon.log_text()
        );
    }
    assert_eq!(count(&status, "succeeded"), 60, "{status}");
    assert_eq!(count(&status, "failed"), 0, "{status}");
    assert_once(cluster, &rows, &versions(SLOW)).await;
}

/// 3. Pause stops starts (no tenant starts while paused), resume completes the wave;
///    cancel leaves it CANCELLED and `watch` exits 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_cancel() {
    let cluster = shared();
    let (rows, csv, dir, _work) = fleet(cluster, "e3_", 30, SLOW).await;
    let (daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let wave = start_wave(&server, dir.path(), &csv, &["--concurrency", "2"]).await;
    wait_for(&server, &wave, "the first tenants to finish", |s| {
        count(s, "succeeded") >= 2
    })
    .await;
    let paused = flotilla(
        &server,
        &[
            "--output",
            "json",
            "wave",
            "pause",
            &wave,
            "--reason",
            "look first",
        ],
    )
    .await;
    assert_eq!(paused.code, 0, "{paused:?}");
    assert_eq!(paused.json()["state"], "PAUSED");
    let drained = wait_for(&server, &wave, "in-flight tenants to finish", |s| {
        count(s, "running") == 0
    })
    .await;
    let finished = count(&drained, "succeeded");
    assert!(finished < 30, "paused mid-wave: {drained}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = status(&server, &wave).await;
    assert_eq!(later["state"], "PAUSED");
    assert_eq!(
        count(&later, "succeeded"),
        finished,
        "no tenant finished while paused"
    );
    assert_eq!(
        count(&later, "running"),
        0,
        "no tenant started while paused"
    );
    let mut touched = 0;
    for (db, _) in &rows {
        if !log_counts(cluster, db).await.is_empty() {
            touched += 1;
        }
    }
    assert_eq!(touched, finished, "only finished tenants have a log");

    let resumed = flotilla(&server, &["wave", "resume", &wave]).await;
    assert_eq!(resumed.code, 0, "{resumed:?}");
    let watched = flotilla(&server, &["wave", "watch", &wave]).await;
    assert_eq!(watched.code, 0, "{watched:?}");
    assert!(watched.stdout.contains("COMPLETED"), "{}", watched.stdout);
    assert_once(cluster, &rows, &versions(SLOW)).await;

    // A second wave of a new bundle version, cancelled as it runs.
    let mut more = SLOW.to_vec();
    more.push(("V4__slow_again.sql", "SELECT pg_sleep(0.2);"));
    for (name, sql) in &more[3..] {
        std::fs::write(dir.path().join(name), sql).expect("write");
    }
    let wave = start_wave(&server, dir.path(), &csv, &["--concurrency", "2"]).await;
    wait_for(&server, &wave, "tenants in flight", |s| {
        count(s, "running") > 0
    })
    .await;
    let cancelled = flotilla(&server, &["--output", "json", "wave", "cancel", &wave]).await;
    assert_eq!(cancelled.code, 0, "{cancelled:?}");
    assert_eq!(cancelled.json()["state"], "CANCELLED");
    let watched = flotilla(&server, &["--output", "json", "wave", "watch", &wave]).await;
    assert_eq!(watched.code, 3, "a cancelled wave exits 3: {watched:?}");
    let status = watched.json();
    assert_eq!(status["state"], "CANCELLED");
    assert!(count(&status, "cancelled") > 0, "{status}");
    assert_eq!(count(&status, "running"), 0, "{status}");
}

/// 4. A server down for the wave: its tenants fail; once it is back, `wave retry`
///    finishes them and only them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_a_server_comes_back_touches_only_the_failed() {
    let up = shared();
    let down = Cluster::start().expect("a cluster to stop");
    let mut rows = tenants(up, "e4up_", 6).await;
    let on_down = tenants(&down, "e4down_", 6).await;
    rows.extend(on_down.clone());
    down.stop().expect("stop the server");
    let work = tempfile::tempdir().expect("tempdir");
    let csv = targets_csv(work.path(), &rows);
    let dir = bundle(FAST);
    let (daemon, _data) = start_daemon(&[]);
    let server = daemon.url();

    let run = flotilla(
        &server,
        &start_args(
            dir.path(),
            &csv,
            &[
                "--retries",
                "0",
                "--max-failures",
                "unlimited",
                "--wait",
                "--output",
                "json",
            ],
        ),
    )
    .await;
    assert_eq!(run.code, 1, "a wave with failed tenants exits 1: {run:?}");
    let status = run.json();
    assert_eq!(status["state"], "FAILED");
    assert_eq!(count(&status, "failed"), 6, "{status}");
    assert_eq!(count(&status, "succeeded"), 6, "{status}");
    let wave = status["wave_id"].as_str().expect("id").to_string();

    down.restart().expect("server back");
    let retry = flotilla(&server, &["wave", "retry", &wave]).await;
    assert_eq!(retry.code, 0, "{retry:?}");
    let watched = flotilla(&server, &["--output", "json", "wave", "watch", &wave]).await;
    assert_eq!(watched.code, 0, "{watched:?}");
    assert_eq!(count(&watched.json(), "succeeded"), 12);

    let listed = flotilla(&server, &["--output", "json", "wave", "tenants", &wave])
        .await
        .json();
    for t in listed["tenants"].as_array().expect("tenants") {
        let id = t["tenant_id"].as_str().expect("id");
        let want = if id.starts_with("e4down_") { 2 } else { 1 };
        assert_eq!(t["attempts"], want, "tenant {id}: {t}");
        assert_eq!(t["state"], "SUCCEEDED", "{t}");
    }
    assert_once(up, &rows[..6], &versions(FAST)).await;
    assert_once(&down, &on_down, &versions(FAST)).await;
}

/// 5. Two daemons with separate data dirs roll the same bundle over the same fleet at
///    once: each version lands exactly once per tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_fleet_apply_once() {
    let cluster = shared();
    let (rows, csv, dir, _work) = fleet(cluster, "e5_", 30, SLOW).await;
    let (one, _d1) = start_daemon(&[]);
    let (two, _d2) = start_daemon(&[]);
    let args = start_args(dir.path(), &csv, &["--concurrency", "4", "--wait"]);
    let (url1, url2) = (one.url(), two.url());
    let (a, b) = tokio::join!(flotilla(&url1, &args), flotilla(&url2, &args));
    assert_eq!(a.code, 0, "{a:?}");
    assert_eq!(b.code, 0, "{b:?}");
    assert_once(cluster, &rows, &versions(SLOW)).await;
}

/// 6. No token, a wrong token, a viewer trying to resume: refused with the right status
///    and exit code 5, and nothing changes; the operator's name is the recorded actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles() {
    let cluster = shared();
    let rows = tenants(cluster, "e6_", 4).await;
    let work = tempfile::tempdir().expect("tempdir");
    let csv = targets_csv(work.path(), &rows);
    let tokens = work.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[tokens]]\nname = \"ci-bot\"\nrole = \"operator\"\nsha256 = \"{}\"\n\
             [[tokens]]\nname = \"dashboard\"\nrole = \"viewer\"\nsha256 = \"{}\"\n",
            flotilla::config::hash_token("op-7f3a"),
            flotilla::config::hash_token("view-19c2"),
        ),
    )
    .expect("tokens file");
    let (daemon, _data) = start_daemon(&["--tokens-file", path(&tokens)]);
    let server = daemon.url();
    let dir = bundle(FAST);

    let none = flotilla(&server, &["wave", "list"]).await;
    assert_eq!(none.code, 5, "{none:?}");
    assert!(
        none.stderr.contains("missing bearer token"),
        "{}",
        none.stderr
    );
    let wrong = flotilla(&server, &["--token", "guess", "wave", "list"]).await;
    assert_eq!(wrong.code, 5, "{wrong:?}");
    assert!(wrong.stderr.contains("unknown token"), "{}", wrong.stderr);
    let viewer_start = flotilla_with(
        &server,
        &start_args(dir.path(), &csv, &[]),
        &[("FLOTILLA_TOKEN", "view-19c2")],
    )
    .await;
    assert_eq!(viewer_start.code, 5, "{viewer_start:?}");

    let op = ["--token", "op-7f3a", "--output", "json"];
    let started = flotilla(
        &server,
        &[
            &op[..],
            &start_args(dir.path(), &csv, &["--canary", "1", "--pause-after-canary"]),
        ]
        .concat(),
    )
    .await;
    assert_eq!(started.code, 0, "{started:?}");
    let wave = started.json()["wave_id"].as_str().expect("id").to_string();
    let view = ["--token", "view-19c2", "--output", "json"];
    let paused = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = flotilla(&server, &[&view[..], &["wave", "status", &wave]].concat()).await;
            assert_eq!(s.code, 0, "a viewer may read: {s:?}");
            let s = s.json();
            if s["state"] == "PAUSED" && count(&s, "running") == 0 {
                break s;
            }
            assert!(Instant::now() < deadline, "canary pause: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let refused = flotilla(&server, &[&view[..], &["wave", "resume", &wave]].concat()).await;
    assert_eq!(refused.code, 5, "{refused:?}");
    assert!(refused.stderr.contains("viewer"), "{}", refused.stderr);
    let after = flotilla(&server, &[&view[..], &["wave", "status", &wave]].concat())
        .await
        .json();
    assert_eq!(after["state"], "PAUSED");
    assert_eq!(
        after["history"], paused["history"],
        "a refused call changes nothing"
    );

    let resumed = flotilla(&server, &[&op[..], &["wave", "resume", &wave]].concat()).await;
    assert_eq!(resumed.code, 0, "{resumed:?}");
    let done = flotilla(&server, &[&op[..], &["wave", "watch", &wave]].concat()).await;
    assert_eq!(done.code, 0, "{done:?}");
    let history = done.json()["history"].clone();
    let resume = history
        .as_array()
        .expect("history")
        .iter()
        .find(|h| h["from"] == "PAUSED" && h["to"] == "RUNNING")
        .unwrap_or_else(|| panic!("a resume in {history}"));
    assert_eq!(resume["actor"], "ci-bot");
}

/// 7. Bad input gets a clear error naming what is wrong, and the daemon stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly() {
    let (daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = bundle(FAST);
    let good_csv = targets_csv(work.path(), &[("t1".into(), shared().url("postgres"))]);

    let missing = flotilla(
        &server,
        &start_args(Path::new("/nonexistent/bundle"), &good_csv, &[]),
    )
    .await;
    assert_eq!(missing.code, 6, "{missing:?}");
    assert!(
        missing.stderr.contains("/nonexistent/bundle"),
        "{}",
        missing.stderr
    );

    let bad_csv = work.path().join("bad.csv");
    std::fs::write(
        &bad_csv,
        "tenant_id,dsn\nt1,postgresql://h/db\nt1,postgresql://h/db2\n",
    )
    .expect("csv");
    let malformed = flotilla(&server, &start_args(dir.path(), &bad_csv, &[])).await;
    assert_eq!(malformed.code, 6, "{malformed:?}");
    assert!(
        malformed.stderr.contains("line 3") && malformed.stderr.contains("duplicate"),
        "{}",
        malformed.stderr
    );

    let zero = flotilla(
        &server,
        &start_args(dir.path(), &good_csv, &["--concurrency", "0"]),
    )
    .await;
    assert_eq!(zero.code, 2, "{zero:?}");
    assert!(zero.stderr.contains("--concurrency"), "{}", zero.stderr);

    let malformed = flotilla(&server, &["wave", "status", "no-such-wave"]).await;
    assert_eq!(malformed.code, 6, "{malformed:?}");
    assert!(
        malformed.stderr.contains("no-such-wave") && malformed.stderr.contains("wave_id"),
        "{}",
        malformed.stderr
    );
    let unknown_id = "019a0000-0000-7000-8000-000000000000";
    let unknown = flotilla(&server, &["wave", "status", unknown_id]).await;
    assert_eq!(unknown.code, 6, "{unknown:?}");
    assert!(
        unknown.stderr.contains(unknown_id) && unknown.stderr.contains("not found"),
        "{}",
        unknown.stderr
    );

    // The daemon validates on its own too: a client that skips the CLI's checks.
    let mut client =
        flotilla::api::v1::rollout_service_client::RolloutServiceClient::connect(server.clone())
            .await
            .expect("connect");
    let bundle = flotilla::api::convert::bundle_to_proto(
        &flotilla::bundle::Bundle::load_dir(dir.path()).expect("bundle"),
    );
    let targets = Some(flotilla::api::v1::start_wave_request::Targets::TargetList(
        flotilla::api::v1::TargetList {
            tenants: vec![flotilla::api::v1::Tenant {
                tenant_id: "t1".into(),
                dsn: shared().url("postgres"),
                labels: Default::default(),
            }],
        },
    ));
    let refused = client
        .start_wave(flotilla::api::v1::StartWaveRequest {
            bundle: Some(bundle.clone()),
            targets: targets.clone(),
            policy: Some(flotilla::api::v1::Policy {
                concurrency: 0,
                ..Default::default()
            }),
        })
        .await
        .expect_err("concurrency 0");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("concurrency"),
        "{}",
        refused.message()
    );
    let ratio = client
        .start_wave(flotilla::api::v1::StartWaveRequest {
            bundle: Some(bundle.clone()),
            targets: targets.clone(),
            policy: Some(flotilla::api::v1::Policy {
                concurrency: 1,
                max_failures: Some(flotilla::api::v1::policy::MaxFailures::MaxFailuresRatio(
                    2.0,
                )),
                ..Default::default()
            }),
        })
        .await
        .expect_err("ratio 2");
    assert_eq!(ratio.code(), tonic::Code::InvalidArgument);
    let mut tampered = bundle.clone();
    tampered.bundle_id = "0".repeat(64);
    let mismatch = client
        .start_wave(flotilla::api::v1::StartWaveRequest {
            bundle: Some(tampered),
            targets: targets.clone(),
            policy: Some(flotilla::api::v1::Policy {
                concurrency: 1,
                ..Default::default()
            }),
        })
        .await
        .expect_err("bundle id");
    assert!(
        mismatch.message().contains("bundle id mismatch"),
        "{}",
        mismatch.message()
    );

    // Resuming a completed wave is a failed precondition (exit 6), not a crash.
    let done = flotilla(
        &server,
        &start_args(dir.path(), &good_csv, &["--wait", "--output", "json"]),
    )
    .await;
    assert_eq!(done.code, 0, "{done:?}");
    let wave = done.json()["wave_id"].as_str().expect("id").to_string();
    let resume = flotilla(&server, &["wave", "resume", &wave]).await;
    assert_eq!(resume.code, 6, "{resume:?}");
    assert!(resume.stderr.contains("COMPLETED"), "{}", resume.stderr);
    // A finished wave can be forgotten; then it is gone.
    let forget = flotilla(&server, &["wave", "forget", &wave]).await;
    assert_eq!(forget.code, 0, "{forget:?}");
    assert!(forget.stdout.contains("forgotten"), "{forget:?}");
    let gone = flotilla(&server, &["wave", "status", &wave]).await;
    assert!(gone.stderr.contains("not found"), "{gone:?}");

    let channel = tonic::transport::Endpoint::from_shared(server.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "flotilla.v1.RolloutService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let list = flotilla(&server, &["wave", "list"]).await;
    assert_eq!(list.code, 0, "{list:?}");
    let unreachable = flotilla("http://127.0.0.1:1", &["wave", "list"]).await;
    assert_eq!(unreachable.code, 4, "{unreachable:?}");
}

/// 8. A DSN with a password: it appears nowhere in the daemon's log, the CLI's output,
///    the JSON status or the data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_leak() {
    const PASSWORD: &str = "Quokka-e8-Zebra-41";
    const WRONG: &str = "Wrong-e8-Walrus-97";
    let cluster = shared();
    let dbs = cluster.create_tenants("e8_", 3, "").await.expect("tenants");
    let admin = cluster.connect("postgres").await.expect("admin");
    admin
        .batch_execute(&format!("CREATE ROLE e8_user LOGIN PASSWORD '{PASSWORD}'"))
        .await
        .expect("role");
    for db in &dbs {
        admin
            .batch_execute(&format!("ALTER DATABASE \"{db}\" OWNER TO e8_user"))
            .await
            .expect("owner");
    }
    let mut rows: Vec<(String, String)> = dbs
        .iter()
        .map(|db| {
            (
                db.clone(),
                cluster.url_with_password(db, "e8_user", PASSWORD),
            )
        })
        .collect();
    rows.push((
        "e8_wrong".into(),
        cluster.url_with_password(&dbs[0], "e8_user", WRONG),
    ));
    rows.push((
        "e8_nodb".into(),
        cluster.url_with_password("e8_missing", "e8_user", PASSWORD),
    ));
    let work = tempfile::tempdir().expect("tempdir");
    let csv = targets_csv(work.path(), &rows);
    let dir = bundle(FAST);
    let data = tempfile::tempdir().expect("data");
    let daemon = Daemon::start_with_env(data.path(), &[], &[("RUST_LOG", "info,flotilla=debug")])
        .expect("daemon");
    let server = daemon.url();

    let mut outputs = Vec::new();
    let start = flotilla(
        &server,
        &start_args(
            dir.path(),
            &csv,
            &["--retries", "0", "--max-failures", "unlimited", "--wait"],
        ),
    )
    .await;
    assert_eq!(start.code, 1, "two tenants cannot connect: {start:?}");
    let wave = start
        .stdout
        .lines()
        .next()
        .expect("wave id")
        .trim()
        .to_string();
    outputs.push(start);
    for args in [
        vec!["--output", "json", "wave", "status", &wave],
        vec!["--output", "json", "wave", "tenants", &wave],
        vec!["wave", "tenants", &wave, "--state", "failed"],
        vec!["--output", "json", "wave", "list"],
        vec![
            "plan",
            "--bundle",
            path(dir.path()),
            "--targets",
            path(&csv),
        ],
        vec![
            "--output",
            "json",
            "plan",
            "--bundle",
            path(dir.path()),
            "--targets",
            path(&csv),
        ],
        vec!["tenant", "log", "--wave", &wave, "--tenant", &dbs[0]],
        vec!["tenant", "log", "--wave", &wave, "--tenant", "e8_wrong"],
    ] {
        outputs.push(flotilla(&server, &args).await);
    }
    let failed = outputs[2].json();
    let failures: Vec<&Value> = failed["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .filter(|t| t["state"] == "FAILED")
        .collect();
    assert_eq!(failures.len(), 2, "{failed}");
    assert!(
        failures.iter().any(|t| t["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("password authentication failed")),
        "the failure says why: {failed}"
    );
    for run in &outputs {
        for secret in [PASSWORD, WRONG] {
            assert!(!run.stdout.contains(secret), "password in stdout: {run:?}");
            assert!(!run.stderr.contains(secret), "password in stderr: {run:?}");
        }
    }
    let log = daemon.log_text();
    assert!(log.contains("wave created"), "the log is captured: {log}");
    for secret in [PASSWORD, WRONG] {
        assert!(!log.contains(secret), "password in the daemon log");
    }
    drop(daemon);
    let files = flotilla_testkit::files_under(data.path());
    assert!(!files.is_empty(), "the store has files to search");
    for entry in files {
        let bytes = std::fs::read(&entry).expect("read store file");
        for secret in [PASSWORD, WRONG] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "password in plain text in {}",
                entry.display()
            );
        }
    }
}

/// SIGTERM mid-wave with a watcher attached: the daemon drains and exits 0; the watcher
/// reconnects to the restarted daemon, which finishes the wave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_the_watcher_follows_the_restart() {
    let cluster = shared();
    let (rows, csv, dir, _work) = fleet(cluster, "e9_", 24, SLOW).await;
    let (mut daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let wave = start_wave(&server, dir.path(), &csv, &["--concurrency", "2"]).await;
    let watcher = {
        let (server, wave) = (server.clone(), wave.clone());
        tokio::spawn(async move { flotilla(&server, &["wave", "watch", &wave]).await })
    };
    // Mid-wave: some tenants done, some in flight, most still to start.
    wait_for(&server, &wave, "the wave to be under way", |s| {
        count(s, "succeeded") >= 2 && count(s, "running") > 0
    })
    .await;
    let exit = daemon.terminate(Duration::from_secs(30)).expect("drain");
    assert_eq!(
        exit.code(),
        Some(0),
        "SIGTERM drains and exits 0:\n{}",
        daemon.log_text()
    );
    // Drained: nothing was left half-applied (no `started` row without its end).
    for (db, _) in &rows {
        for (version, (applied, all)) in log_counts(cluster, db).await {
            assert_eq!(applied, all, "tenant {db} version {version} left started");
        }
    }
    daemon.restart().expect("restart");
    let watched = tokio::time::timeout(Duration::from_secs(90), watcher)
        .await
        .expect("the watcher ends")
        .expect("join");
    assert_eq!(watched.code, 0, "{watched:?}");
    assert!(
        watched.stdout.contains("reconnecting"),
        "{}",
        watched.stdout
    );
    assert_once(cluster, &rows, &versions(SLOW)).await;
}

/// The API over TLS: a client trusting the CA connects; one that does not is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_tls_with_cert_and_key_files() {
    let certs = tempfile::tempdir().expect("tempdir");
    let issued = flotilla_testkit::issue_test_cert(certs.path(), "localhost").expect("openssl");
    let (daemon, _data) = start_daemon(&[
        "--tls-cert",
        path(&issued.cert),
        "--tls-key",
        path(&issued.key),
    ]);
    let port = daemon.addr().rsplit(':').next().expect("port").to_string();
    let https = format!("https://localhost:{port}");
    let trusted = flotilla(&https, &["--ca-cert", path(&issued.ca), "wave", "list"]).await;
    assert_eq!(trusted.code, 0, "{trusted:?}");
    let untrusted = flotilla(&https, &["wave", "list"]).await;
    assert_eq!(untrusted.code, 4, "an unknown CA is refused: {untrusted:?}");
    let plain = flotilla(&daemon.url(), &["wave", "list"]).await;
    assert_ne!(plain.code, 0, "plain HTTP/2 to a TLS port fails: {plain:?}");
}

/// `GET /metrics` over plain HTTP/1.0.
fn scrape(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: flotilla\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// The value of the sample `name{labels…}` whose labels include every `want` pair.
fn sample(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = metric == name
                && want
                    .iter()
                    .all(|(k, v)| labels.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            matches.then(|| value.parse().ok()).flatten()
        })
}

/// Scraping `/metrics` during a wave: the per-state gauges move, never exceed what the
/// policy allows, agree with `wave status` at the end, and the counters add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_wave_and_agree_with_its_status() {
    let cluster = shared();
    let (_rows, csv, dir, _work) = fleet(cluster, "e10_", 20, SLOW).await;
    let (daemon, _data) = start_daemon(&["--metrics-listen", "127.0.0.1:0"]);
    let server = daemon.url();
    let metrics = daemon.metrics_addr().expect("metrics address logged");

    let wave = start_wave(&server, dir.path(), &csv, &["--concurrency", "2"]).await;
    let gauge = |text: &str, state: &str| {
        sample(
            text,
            "flotilla_wave_tenants",
            &[("wave_id", &wave), ("state", state)],
        )
        .unwrap_or(0.0)
    };
    let mut seen_mid_wave = false;
    let mut last_done = 0.0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = tokio::task::spawn_blocking({
            let metrics = metrics.clone();
            move || scrape(&metrics)
        })
        .await
        .expect("scrape");
        let (succeeded, running) = (gauge(&text, "succeeded"), gauge(&text, "running"));
        let total: f64 = ["pending", "running", "succeeded", "failed", "cancelled"]
            .iter()
            .map(|s| gauge(&text, s))
            .sum();
        assert_eq!(
            total, 20.0,
            "the states add up to the wave's tenants:\n{text}"
        );
        assert!(
            running <= 2.0,
            "never more in flight than the concurrency:\n{text}"
        );
        let in_flight = sample(
            &text,
            "flotilla_tenants_in_flight",
            &[("host", &cluster.host())],
        )
        .unwrap_or(0.0);
        assert!(in_flight <= 2.0, "{text}");
        assert!(succeeded >= last_done, "succeeded never goes down");
        last_done = succeeded;
        if succeeded > 0.0 && succeeded < 20.0 {
            seen_mid_wave = true;
            let status = status(&server, &wave).await;
            assert!(
                count(&status, "succeeded") as f64 >= succeeded,
                "status is at least as far as the earlier scrape: {status}"
            );
        }
        if succeeded == 20.0 && running == 0.0 {
            let status = status(&server, &wave).await;
            for state in ["pending", "running", "succeeded", "failed", "cancelled"] {
                assert_eq!(
                    count(&status, state) as f64,
                    gauge(&text, state),
                    "{state}: {status}"
                );
            }
            assert_eq!(
                sample(&text, "flotilla_waves", &[("state", "completed")]),
                Some(1.0),
                "{text}"
            );
            assert_eq!(
                sample(
                    &text,
                    "flotilla_tenant_runs_total",
                    &[("outcome", "succeeded")]
                ),
                Some(20.0),
                "{text}"
            );
            assert_eq!(
                sample(&text, "flotilla_script_duration_seconds_count", &[]),
                Some(60.0),
                "three scripts for each of 20 tenants:\n{text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the wave did not finish:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(seen_mid_wave, "a scrape landed mid-wave");
}

/// `plan` reads each tenant's own log: everything to apply before a wave, nothing after;
/// `tenant log --dsn` shows the rows the wave wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_tenant_log_read_the_tenants_themselves() {
    let cluster = shared();
    let (rows, csv, dir, work) = fleet(cluster, "e11_", 3, FAST).await;
    let (daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let plan_args = [
        "--output",
        "json",
        "plan",
        "--bundle",
        path(dir.path()),
        "--targets",
        path(&csv),
    ];

    let before = flotilla(&server, &plan_args).await;
    assert_eq!(before.code, 0, "{before:?}");
    let before = before.json();
    for t in before["tenants"].as_array().expect("tenants") {
        let steps: Vec<(&str, &str)> = t["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| {
                (
                    s["script"].as_str().unwrap_or(""),
                    s["action"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            steps,
            [
                ("V1__create_items.sql", "apply"),
                ("V2__add_name.sql", "apply"),
                ("R__items_view.sql", "apply")
            ],
            "{t}"
        );
    }

    let wave = flotilla(&server, &start_args(dir.path(), &csv, &["--wait"])).await;
    assert_eq!(wave.code, 0, "{wave:?}");
    let after = flotilla(&server, &plan_args).await.json();
    for t in after["tenants"].as_array().expect("tenants") {
        assert_eq!(
            t["steps"].as_array().map(Vec::len),
            Some(0),
            "up to date: {t}"
        );
        assert_eq!(t["problems"].as_array().map(Vec::len), Some(0), "{t}");
    }
    // A tenant ahead of the bundle (it has V2, the bundle stops at V1) is a note, not a
    // problem: plan exits 0 (it used to exit 1, reporting notes as problems).
    let older = bundle(&FAST[..1]);
    let ahead = flotilla(
        &server,
        &[
            "--output",
            "json",
            "plan",
            "--bundle",
            path(older.path()),
            "--targets",
            path(&csv),
        ],
    )
    .await;
    assert_eq!(ahead.code, 0, "{ahead:?}");
    for t in ahead.json()["tenants"].as_array().expect("tenants") {
        assert_eq!(t["problems"].as_array().map(Vec::len), Some(0), "{t}");
        assert!(
            t["notes"].to_string().contains("does not know"),
            "the tenant is ahead: {t}"
        );
    }

    let log = flotilla(
        &server,
        &["--output", "json", "tenant", "log", "--dsn", &rows[0].1],
    )
    .await;
    assert_eq!(log.code, 0, "{log:?}");
    let log = log.json();
    let scripts: Vec<&str> = log["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["script"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        scripts,
        [
            "V1__create_items.sql",
            "V2__add_name.sql",
            "R__items_view.sql"
        ]
    );
    assert!(
        log["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .all(|r| r["status"] == "applied")
    );

    // A blocked tenant (an unreachable server) makes plan exit 1, naming it.
    let unreachable = work.path().join("unreachable.csv");
    std::fs::write(
        &unreachable,
        "tenant_id,dsn\nghost,postgresql://postgres@127.0.0.1:1/ghost\n",
    )
    .expect("csv");
    let blocked = flotilla(
        &server,
        &[
            "plan",
            "--bundle",
            path(dir.path()),
            "--targets",
            path(&unreachable),
        ],
    )
    .await;
    assert_eq!(blocked.code, 1, "{blocked:?}");
    assert!(
        blocked.stdout.contains("ghost") && blocked.stdout.contains("cannot read the log"),
        "{}",
        blocked.stdout
    );
}

/// `flotilla demo` end to end: its own PostgreSQL and daemon, a wave paused and resumed
/// once, a summary with the psql line, and nothing left running afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_pauses_resumes_and_cleans_up() {
    let run = flotilla(
        "http://127.0.0.1:1",
        &["demo", "--tenants", "40", "--no-wait"],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let out = &run.stdout;
    assert!(out.contains("state    COMPLETED"), "{out}");
    assert!(
        out.contains("RUNNING -> PAUSED") && out.contains("PAUSED -> RUNNING"),
        "paused and resumed once: {out}"
    );
    assert!(out.contains("40/40 done (40 succeeded"), "{out}");
    let psql = out
        .lines()
        .find(|l| l.trim_start().starts_with("psql '"))
        .unwrap_or_else(|| panic!("a psql line: {out}"));
    assert!(psql.contains("TABLE flotilla.execution_log"), "{psql}");
    assert!(
        out.contains("V3__index_accounts_email.sql"),
        "the log is shown: {out}"
    );
    // The demo's server is gone: its port no longer answers.
    let port = psql
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse::<u16>().ok())
        .expect("port in the psql line");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the demo's PostgreSQL still answers on {port}"
    );
}

/// Issue 11, case 3, through the CLI: a wave whose canary failed does not resume by a
/// plain `wave resume` (exit 6, naming the way on); `--accept-canary-failure` goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_canary_is_accepted_only_on_purpose() {
    let cluster = shared();
    let (rows, csv, dir, _work) = fleet(
        cluster,
        "e_canacc_",
        3,
        &[(
            "V1__guarded.sql",
            "DO $$ BEGIN IF to_regclass('bad_marker') IS NOT NULL THEN RAISE EXCEPTION 'marked bad'; END IF; END $$;",
        )],
    )
    .await;
    let bad = cluster.connect(&rows[0].0).await.expect("connect");
    bad.batch_execute("CREATE TABLE bad_marker ()")
        .await
        .expect("marker");
    let (daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let wave = start_wave(
        &server,
        dir.path(),
        &csv,
        &[
            "--canary",
            "1",
            "--retries",
            "0",
            "--max-failures",
            "unlimited",
        ],
    )
    .await;
    wait_for(&server, &wave, "the canary pause", |s| {
        s["state"] == "PAUSED" && count(s, "failed") == 1 && count(s, "running") == 0
    })
    .await;
    let plain = flotilla(&server, &["wave", "resume", &wave]).await;
    assert_eq!(plain.code, 6, "{plain:?}");
    assert!(
        plain.stderr.contains("--accept-canary-failure"),
        "{}",
        plain.stderr
    );
    let accepted = flotilla(
        &server,
        &["wave", "resume", &wave, "--accept-canary-failure"],
    )
    .await;
    assert_eq!(accepted.code, 0, "{accepted:?}");
    let done = wait_for(&server, &wave, "the rest", |s| {
        s["state"] == "FAILED" && count(s, "running") == 0
    })
    .await;
    assert_eq!(
        (count(&done, "succeeded"), count(&done, "failed")),
        (2, 1),
        "{done}"
    );
}

/// Issue 12 (`--baseline-version`) through the CLI: `plan` rehearses it (a note, and only
/// the versions above it as steps), `wave start` records it and runs the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_migrated_by_hand_is_baselined_then_migrated() {
    let cluster = shared();
    let (rows, csv, dir, _work) = fleet(cluster, "e_baseline_", 2, FAST).await;
    for (db, _) in &rows {
        let c = cluster.connect(db).await.expect("connect");
        c.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY)")
            .await
            .expect("by hand");
    }
    let (daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let plan = flotilla(
        &server,
        &[
            "--output",
            "json",
            "plan",
            "--bundle",
            path(dir.path()),
            "--targets",
            path(&csv),
            "--baseline-version",
            "1",
        ],
    )
    .await;
    assert_eq!(plan.code, 0, "{plan:?}");
    for t in plan.json()["tenants"].as_array().expect("tenants") {
        let steps: Vec<(&str, &str)> = t["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| {
                (
                    s["script"].as_str().unwrap_or(""),
                    s["action"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            steps,
            [
                ("V1__create_items.sql", "baseline"),
                ("V2__add_name.sql", "apply"),
                ("R__items_view.sql", "apply")
            ],
            "{t}"
        );
        assert!(t["notes"].to_string().contains("baselined"), "{t}");
    }
    let wave = flotilla(
        &server,
        &start_args(dir.path(), &csv, &["--baseline-version", "1", "--wait"]),
    )
    .await;
    assert_eq!(wave.code, 0, "{wave:?}");
    for (db, _) in &rows {
        let c = cluster.connect(db).await.expect("connect");
        let statuses: Vec<String> = c
            .query(
                "SELECT status FROM flotilla.execution_log WHERE kind = 'versioned' ORDER BY id",
                &[],
            )
            .await
            .expect("log")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(statuses, ["baselined", "applied"], "{db}");
    }
    let bad = flotilla(
        &server,
        &start_args(dir.path(), &csv, &["--baseline-version", "v1"]),
    )
    .await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("baseline_version"), "{}", bad.stderr);
}

/// Issue 12 (`--adopt flyway`) through the CLI and the daemon: `plan --adopt` rehearses
/// it per tenant (baseline steps, then what runs; a failed Flyway row is a typed
/// problem and exit 1); `wave start --adopt` adopts the good tenant without running V1
/// again and fails the other with Flyway's advice; a nonsense `--adopt` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flyway_fleet_is_adopted_through_the_cli() {
    let cluster = shared();
    let (rows, csv, dir, _work) = fleet(cluster, "e_adopt_", 2, FAST).await;
    let v1 = FAST[0];
    for (n, (db, _)) in rows.iter().enumerate() {
        let c = cluster.connect(db).await.expect("connect");
        c.batch_execute(&format!(
            "CREATE TABLE flyway_schema_history (installed_rank int PRIMARY KEY, \
             version varchar(50), description varchar(200) NOT NULL, type varchar(20) NOT NULL, \
             script varchar(1000) NOT NULL, checksum int, installed_by varchar(100) NOT NULL, \
             installed_on timestamp NOT NULL DEFAULT now(), execution_time int NOT NULL, \
             success boolean NOT NULL);
             {};
             INSERT INTO items VALUES (1);
             INSERT INTO flyway_schema_history VALUES (1, '1', 'create items', 'SQL', '{}', {}, \
             'deployer', now(), 3, {});",
            v1.1,
            v1.0,
            flotilla::bundle::flyway_checksum(v1.1),
            // The second tenant's V1 failed under Flyway.
            n == 0
        ))
        .await
        .expect("as Flyway left it");
    }
    let (daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let plan = flotilla(
        &server,
        &[
            "--output",
            "json",
            "plan",
            "--bundle",
            path(dir.path()),
            "--targets",
            path(&csv),
            "--adopt",
            "flyway",
        ],
    )
    .await;
    assert_eq!(plan.code, 1, "one tenant would be refused: {plan:?}");
    let plans = plan.json();
    let good = &plans["tenants"][0];
    assert_eq!(good["steps"][0]["action"], "baseline", "{good}");
    assert_eq!(good["steps"][1]["script"], "V2__add_name.sql", "{good}");
    assert!(
        good["problems"].as_array().expect("problems").is_empty(),
        "{good}"
    );
    let bad = &plans["tenants"][1];
    assert_eq!(bad["problems"][0]["kind"], "adoption_refused", "{bad}");
    assert!(bad["steps"].as_array().expect("steps").is_empty(), "{bad}");

    let wave = flotilla(
        &server,
        &start_args(
            dir.path(),
            &csv,
            &[
                "--adopt",
                "flyway",
                "--max-failures",
                "unlimited",
                "--wait",
                "--output",
                "json",
            ],
        ),
    )
    .await;
    assert_eq!(wave.code, 1, "a tenant failed: {wave:?}");
    let id = wave.json()["wave_id"]
        .as_str()
        .expect("wave id")
        .to_string();
    let done = status(&server, &id).await;
    assert_eq!(
        (count(&done, "succeeded"), count(&done, "failed")),
        (1, 1),
        "{done}"
    );
    assert_eq!(
        done["policy"]["adopt"], "flyway=public.flyway_schema_history",
        "{done}"
    );
    let c = cluster.connect(&rows[0].0).await.expect("connect");
    let statuses: Vec<String> = c
        .query("SELECT status FROM flotilla.execution_log ORDER BY id", &[])
        .await
        .expect("log")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["baselined", "applied", "applied"]);
    let items: i64 = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(items, 1, "V1 did not run again");

    let nonsense = flotilla(
        &server,
        &start_args(dir.path(), &csv, &["--adopt", "flyway=x;drop"]),
    )
    .await;
    assert_eq!(nonsense.code, 2, "{nonsense:?}");
    assert!(
        nonsense.stderr.contains("not a plain identifier"),
        "{}",
        nonsense.stderr
    );
}

/// Issue 12: a Flyway folder with a flyway.conf and placeholders, through the CLI and
/// the daemon: a missing value is refused locally naming file and line; `--placeholder`
/// fills it (over the folder's default), the values are shown by `wave status` and
/// survive a `kill -9` of the daemon (the stored bundle reloads with the same id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholders_travel_with_the_wave_and_survive_a_restart() {
    let cluster = shared();
    let sources: &[(&str, &str)] = &[
        (
            "flyway.conf",
            "flyway.placeholders.note=from the folder\nflyway.url=jdbc:postgresql://ignored/db\n",
        ),
        (
            "V1__create_items.sql",
            "CREATE TABLE items (id bigint PRIMARY KEY);\nCOMMENT ON TABLE items IS '${note} ${release}';",
        ),
    ];
    let (rows, csv, dir, _work) = fleet(cluster, "e_placeholder_", 2, sources).await;
    let (mut daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let missing = flotilla(&server, &start_args(dir.path(), &csv, &["--wait"])).await;
    assert_eq!(missing.code, 6, "an invalid bundle: {missing:?}");
    assert!(
        missing
            .stderr
            .contains("V1__create_items.sql:2: no value for placeholder ${release}"),
        "{}",
        missing.stderr
    );
    let wave = flotilla(
        &server,
        &start_args(
            dir.path(),
            &csv,
            &[
                "--placeholder",
                "release=2026.11",
                "--placeholder",
                "note=from the wave",
                "--wait",
                "--output",
                "json",
            ],
        ),
    )
    .await;
    assert_eq!(wave.code, 0, "{wave:?}");
    assert!(
        wave.stderr.contains("warning: flyway.conf: url is ignored"),
        "what the folder config says and Flotilla does not do is said: {wave:?}"
    );
    let id = wave.json()["wave_id"].as_str().expect("id").to_string();
    for (db, _) in &rows {
        let c = cluster.connect(db).await.expect("connect");
        let comment: String = c
            .query_one("SELECT obj_description('items'::regclass)", &[])
            .await
            .expect("comment")
            .get(0);
        assert_eq!(comment, "from the wave 2026.11", "{db}");
    }
    daemon.kill9().expect("kill -9");
    daemon.restart().expect("restart");
    let after = status(&daemon.url(), &id).await;
    assert_eq!(after["placeholders"]["release"], "2026.11", "{after}");
    assert_eq!(after["placeholders"]["note"], "from the wave", "{after}");
    assert_eq!(after["bundle_id"], wave.json()["bundle_id"], "{after}");
    let lint = flotilla(
        &server,
        &[
            "bundle",
            "lint",
            path(dir.path()),
            "--placeholder",
            "release=x",
        ],
    )
    .await;
    assert_eq!(lint.code, 0, "{lint:?}");
    assert!(
        lint.stderr
            .contains("url is ignored: connections come from the wave's targets"),
        "{lint:?}"
    );
}

/// Issue 12, the whole switch-over on a Flyway project folder as it is
/// (`tests/fixtures/bundles/flyway_conf`: flyway.conf with its history table and
/// placeholders, a `.sql.conf`, a `B2` baseline migration, a `U2` undo script): `plan
/// --adopt flyway` shows a new tenant getting B2 and a Flyway-migrated one adopting V1
/// and V2 from the table the conf names; the wave does both, counts them, and the two
/// tenants end with the same schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flyway_project_folder_switches_over_as_it_is() {
    let cluster = shared();
    let folder =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bundles/flyway_conf");
    let bundle = flotilla::bundle::Bundle::load_dir(&folder).expect("the fixture loads");
    let rows = tenants(cluster, "e_fwconf_", 2).await;
    let work = tempfile::tempdir().expect("tempdir");
    let csv = targets_csv(work.path(), &rows);
    // The second tenant as Flyway left it: V1 and V2 ran, recorded in the conf's table.
    let migrated = &rows[1].0;
    let c = cluster.connect(migrated).await.expect("connect");
    let script = |name: &str| {
        bundle
            .scripts()
            .iter()
            .find(|s| s.name == name)
            .expect("script")
            .clone()
    };
    let (v1, v2) = (script("V1__events.sql"), script("V2__events_at_index.sql"));
    c.batch_execute(&v1.sql).await.expect("V1 as Flyway ran it");
    for statement in v2.sql.split(";\n").filter(|s| !s.trim().is_empty()) {
        c.batch_execute(statement)
            .await
            .expect("V2 as Flyway ran it");
    }
    c.batch_execute(&format!(
        "CREATE TABLE public.migration_history (installed_rank int PRIMARY KEY, \
         version varchar(50), description varchar(200) NOT NULL, type varchar(20) NOT NULL, \
         script varchar(1000) NOT NULL, checksum int, installed_by varchar(100) NOT NULL, \
         installed_on timestamp NOT NULL DEFAULT now(), execution_time int NOT NULL, \
         success boolean NOT NULL);
         INSERT INTO public.migration_history VALUES
           (1, '1', 'events', 'SQL', 'V1__events.sql', {}, 'deployer', now(), 5, true),
           (2, '2', 'events at index', 'SQL', 'V2__events_at_index.sql', {}, 'deployer', now(), 5, true);",
        flotilla::bundle::flyway_checksum(&v1.text),
        flotilla::bundle::flyway_checksum(&v2.text),
    ))
    .await
    .expect("history as Flyway wrote it");

    let (daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let plan = flotilla(
        &server,
        &[
            "--output",
            "json",
            "plan",
            "--bundle",
            path(&folder),
            "--targets",
            path(&csv),
            "--adopt",
            "flyway",
        ],
    )
    .await;
    assert_eq!(plan.code, 0, "{plan:?}");
    let steps = |n: usize| -> Vec<String> {
        plan.json()["tenants"][n]["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| {
                format!(
                    "{} {}",
                    s["action"].as_str().unwrap_or(""),
                    s["script"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    assert_eq!(
        steps(0),
        [
            "apply B2__events_baseline.sql",
            "apply V3__event_kind.sql",
            "apply R__grants.sql"
        ]
    );
    assert_eq!(
        steps(1),
        [
            "baseline V1__events.sql",
            "baseline V2__events_at_index.sql",
            "apply V3__event_kind.sql",
            "apply R__grants.sql"
        ]
    );
    // Flyway's undo script is part of the bundle now: versions 1 and 3 have none.
    assert_eq!(
        plan.json()["versions_without_undo"],
        serde_json::json!(["1", "3"]),
        "{}",
        plan.stdout
    );

    let wave = flotilla(
        &server,
        &start_args(
            &folder,
            &csv,
            &["--adopt", "flyway", "--wait", "--output", "json"],
        ),
    )
    .await;
    assert_eq!(wave.code, 0, "{wave:?}");
    let done = wave.json();
    assert_eq!(
        done["policy"]["adopt"], "flyway=public.migration_history",
        "{done}"
    );
    assert_eq!(done["tenants"]["baselined_tenants"], 2, "{done}");
    assert_eq!(done["tenants"]["baselined_scripts"], 4, "{done}");
    let exclude = ["flotilla", "public.migration_history"];
    assert_eq!(
        cluster.dump_schema(&rows[0].0, &exclude).expect("dump"),
        cluster.dump_schema(migrated, &exclude).expect("dump"),
        "a new tenant (B2) and an adopted one (V1, V2 under Flyway) end alike"
    );
    let comment: String = c
        .query_one("SELECT obj_description('events'::regclass)", &[])
        .await
        .expect("comment")
        .get(0);
    assert_eq!(comment, "kept 30 days, history in migration_history");
}

/// Issue 14, the safety lint through the CLI: `bundle lint` names rule, file, line and
/// the safe pattern and exits 6; `plan` reports the findings and exits 1; `wave start`
/// is refused until each finding is waived, by `--allow RULE` or a script directive, and
/// the waivers are shown by `wave status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_statements_stop_a_wave_until_waived() {
    let cluster = shared();
    let sources: &[(&str, &str)] = &[
        (
            "V1__create_items.sql",
            "CREATE TABLE items (id bigint PRIMARY KEY, name text);",
        ),
        (
            "V2__index_name.sql",
            "CREATE INDEX items_name ON items (name);",
        ),
        (
            "V3__drop_legacy.sql",
            "-- flotilla:allow ban-drop-column nothing reads it since 4.2\nALTER TABLE items ADD COLUMN legacy int;\nALTER TABLE items DROP COLUMN legacy;",
        ),
    ];
    let (_rows, csv, dir, _work) = fleet(cluster, "e_lint_", 1, sources).await;
    let (daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let lint = flotilla(&server, &["bundle", "lint", path(dir.path())]).await;
    assert_eq!(lint.code, 6, "{lint:?}");
    assert!(
        lint.stderr
            .contains("error: V2__index_name.sql:1: require-concurrent-index-creation")
            && lint.stderr.contains("CONCURRENTLY"),
        "{}",
        lint.stderr
    );
    assert!(
        lint.stderr.contains(
            "waived: V3__drop_legacy.sql:3: ban-drop-column (nothing reads it since 4.2)"
        ),
        "{}",
        lint.stderr
    );
    let plan = flotilla(
        &server,
        &[
            "--output",
            "json",
            "plan",
            "--bundle",
            path(dir.path()),
            "--targets",
            path(&csv),
        ],
    )
    .await;
    assert_eq!(plan.code, 1, "{plan:?}");
    assert_eq!(
        plan.json()["safety"][0]["rule"],
        "require-concurrent-index-creation"
    );
    assert_eq!(plan.json()["safety"][0]["waived"], false);

    let refused = flotilla(&server, &start_args(dir.path(), &csv, &[])).await;
    assert_eq!(
        refused.code, 6,
        "an unsafe bundle is invalid input: {refused:?}"
    );
    assert!(
        refused.stderr.contains("safety finding")
            && refused
                .stderr
                .contains("V2__index_name.sql:1: require-concurrent-index-creation"),
        "{}",
        refused.stderr
    );
    let nonsense = flotilla(
        &server,
        &start_args(dir.path(), &csv, &["--allow", "everything"]),
    )
    .await;
    assert_eq!(nonsense.code, 2, "{nonsense:?}");
    assert!(
        nonsense.stderr.contains("no such safety rule"),
        "{}",
        nonsense.stderr
    );

    let wave = flotilla(
        &server,
        &start_args(
            dir.path(),
            &csv,
            &[
                "--allow",
                "require-concurrent-index-creation",
                "--wait",
                "--output",
                "json",
            ],
        ),
    )
    .await;
    assert_eq!(wave.code, 0, "{wave:?}");
    let waivers = wave.json()["waivers"].to_string();
    assert!(
        waivers.contains("require-concurrent-index-creation at V2__index_name.sql:1 (--allow require-concurrent-index-creation)")
            && waivers.contains("ban-drop-column at V3__drop_legacy.sql:3 (nothing reads it since 4.2)"),
        "{waivers}"
    );

    // A next release rewrites the table: the plan says how big it is on each tenant.
    std::fs::write(
        dir.path().join("V4__widen.sql"),
        "ALTER TABLE items ALTER COLUMN name TYPE varchar(500);",
    )
    .expect("write V4");
    let plan = flotilla(
        &server,
        &[
            "--output",
            "json",
            "plan",
            "--bundle",
            path(dir.path()),
            "--targets",
            path(&csv),
            "--allow",
            "require-concurrent-index-creation",
            "--allow",
            "changing-column-type",
        ],
    )
    .await;
    assert_eq!(plan.code, 0, "{plan:?}");
    let touched = &plan.json()["tenants"][0]["touched"];
    assert_eq!(touched[0]["table"], "items", "{touched}");
    assert_eq!(touched[0]["rules"][0], "changing-column-type", "{touched}");
    assert!(
        touched[0]["bytes"].as_u64().is_some_and(|b| b > 0),
        "{touched}"
    );
}

/// Issue 14: `--order size` starts the smallest databases first (the canary is the
/// smallest), sizes read from the server at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_size_starts_the_smallest_tenants_first() {
    let cluster = shared();
    let (rows, csv, dir, _work) = fleet(cluster, "e_size_", 3, FAST).await;
    // Make the first tenant the biggest and the last the middle one.
    for (db, mb) in [(&rows[0].0, 6), (&rows[2].0, 2)] {
        let c = cluster.connect(db).await.expect("connect");
        c.batch_execute(&format!(
            "CREATE TABLE ballast AS SELECT repeat('x', 1000) AS pad FROM generate_series(1, {})",
            mb * 1000
        ))
        .await
        .expect("ballast");
    }
    let (daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let wave = flotilla(
        &server,
        &start_args(
            dir.path(),
            &csv,
            &[
                "--order",
                "size",
                "--canary",
                "1",
                "--concurrency",
                "1",
                "--wait",
                "--output",
                "json",
            ],
        ),
    )
    .await;
    assert_eq!(wave.code, 0, "{wave:?}");
    let id = wave.json()["wave_id"].as_str().expect("id").to_string();
    let listed = flotilla(&server, &["--output", "json", "wave", "tenants", &id]).await;
    let order: Vec<String> = listed.json()["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .map(|t| t["tenant_id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        order,
        [rows[1].0.clone(), rows[2].0.clone(), rows[0].0.clone()],
        "smallest first"
    );
}

const CENSUS_V1: (&str, &str) = (
    "V1__accounts.sql",
    "CREATE TABLE accounts (id bigint PRIMARY KEY, email text NOT NULL);",
);
const CENSUS_V2: (&str, &str) = (
    "V2__plan.sql",
    "ALTER TABLE accounts ADD COLUMN plan text NOT NULL DEFAULT 'free';",
);
const CENSUS_V3: (&str, &str) = (
    "V3__email_index.sql",
    "-- flotilla:allow require-concurrent-index-creation the table is new and small\n\
     CREATE UNIQUE INDEX accounts_email ON accounts (email);",
);

/// Issue 13: a fleet made mixed on purpose (three versions, a changed checksum, an
/// interrupted script, a hand-added column, a stopped server) is registered once; its
/// census names exactly those, the histogram adds up, the fingerprints single out the
/// hand-altered tenant with the column named, the scheduled census is cached and
/// exported, and a wave started with `--fleet` reports its tenants' versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_is_registered_and_its_census_names_every_outlier() {
    let cluster = shared();
    let rows = tenants(cluster, "cen_", 60).await;
    let work = tempfile::tempdir().expect("tempdir");
    let (daemon, _data) =
        start_daemon(&["--metrics-listen", "127.0.0.1:0", "--census-interval", "1s"]);
    let server = daemon.url();

    // Three versions: tenants 1-10 at 1, 11-20 at 2, 21-60 at 3.
    let v1 = bundle(&[CENSUS_V1]);
    let v2 = bundle(&[CENSUS_V1, CENSUS_V2]);
    let v3 = bundle(&[CENSUS_V1, CENSUS_V2, CENSUS_V3]);
    for (dir, range) in [(&v1, 0..10), (&v2, 10..20), (&v3, 20..60)] {
        let part = tempfile::tempdir().expect("tempdir");
        let csv = targets_csv(part.path(), &rows[range]);
        let mut args = start_args(dir.path(), &csv, &["--concurrency", "8", "--wait"]);
        args.extend(["--output", "json"]);
        let run = flotilla(&server, &args).await;
        assert_eq!(run.code, 0, "{run:?}");
    }
    // Made mixed on purpose.
    let drifted = &rows[24].0;
    let interrupted = &rows[29].0;
    let altered = &rows[34].0;
    cluster
        .connect(drifted)
        .await
        .expect("connect")
        .batch_execute(
            "UPDATE flotilla.execution_log SET checksum = 'sha256:0000' WHERE version = '2'",
        )
        .await
        .expect("change a checksum");
    cluster
        .connect(interrupted)
        .await
        .expect("connect")
        .batch_execute(
            "INSERT INTO flotilla.execution_log (version, script, kind, checksum, bundle_id, \
             wave_id, status, statements_done) VALUES ('4', 'V4__concurrent_index.sql', \
             'versioned', 'sha256:1111', 'b', 'w', 'started', 0)",
        )
        .await
        .expect("leave a started row");
    cluster
        .connect(altered)
        .await
        .expect("connect")
        .batch_execute("ALTER TABLE accounts ADD COLUMN nickname text")
        .await
        .expect("a hotfix by hand");
    let down = Cluster::start().expect("start a cluster to stop");
    down.create_tenants("cen_down_", 1, "")
        .await
        .expect("create");
    down.stop().expect("stop it");
    let mut fleet_rows = rows.clone();
    fleet_rows.push(("cen_down".into(), down.url("cen_down_00001")));
    let csv = targets_csv(work.path(), &fleet_rows);

    // Registered once, by name.
    let add = flotilla(
        &server,
        &[
            "fleet",
            "add",
            "prod",
            "--targets",
            path(&csv),
            "--label",
            "env=prod",
        ],
    )
    .await;
    assert_eq!(add.code, 0, "{add:?}");
    assert!(add.stdout.contains("61 tenants"), "{add:?}");
    let again = flotilla(&server, &["fleet", "add", "prod", "--targets", path(&csv)]).await;
    assert_eq!(again.code, 6, "a name in use is refused: {again:?}");
    assert!(again.stderr.contains("already exists"), "{again:?}");
    let bad = flotilla(
        &server,
        &["fleet", "add", "Prod EU", "--targets", path(&csv)],
    )
    .await;
    assert_eq!(bad.code, 6, "{bad:?}");
    assert!(bad.stderr.contains("fleet name"), "{bad:?}");
    let list = flotilla(&server, &["--output", "json", "fleet", "list"]).await;
    assert_eq!(list.code, 0, "{list:?}");
    assert_eq!(list.json()[0]["name"], "prod", "{list:?}");
    assert_eq!(list.json()[0]["labels"]["env"], "prod", "{list:?}");
    assert!(
        !list.stdout.contains("postgres://"),
        "no DSN is shown for a listed fleet: {list:?}"
    );

    // The census, against the newest bundle, with fingerprints.
    let run = flotilla(
        &server,
        &[
            "--output",
            "json",
            "fleet",
            "census",
            "prod",
            "--bundle",
            path(v3.path()),
            "--fingerprint",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let census = run.json();
    assert_eq!(census["tenants"], 61, "{census}");
    let histogram: BTreeMap<String, u64> = census["histogram"]
        .as_array()
        .expect("histogram")
        .iter()
        .map(|h| {
            (
                h["version"].as_str().expect("version").to_string(),
                h["tenants"].as_u64().expect("count"),
            )
        })
        .collect();
    assert_eq!(
        histogram,
        BTreeMap::from([
            ("1".to_string(), 10),
            ("2".to_string(), 10),
            ("3".to_string(), 40),
            ("unreachable".to_string(), 1),
        ]),
        "{census}"
    );
    assert_eq!(histogram.values().sum::<u64>(), 61);
    let outliers: BTreeMap<String, String> = census["outliers"]
        .as_array()
        .expect("outliers")
        .iter()
        .map(|t| {
            (
                t["tenant_id"].as_str().expect("id").to_string(),
                t["state"].as_str().expect("state").to_string(),
            )
        })
        .collect();
    assert_eq!(
        outliers,
        BTreeMap::from([
            (drifted.clone(), "drifted".to_string()),
            (interrupted.clone(), "interrupted".to_string()),
            (altered.clone(), "schema_drift".to_string()),
            ("cen_down".to_string(), "unreachable".to_string()),
        ]),
        "{census}"
    );
    assert_eq!(census["states"]["behind"], 20, "{census}");
    assert_eq!(census["states"]["current"], 37, "{census}");
    let tenant = |id: &str| {
        census["tenant_results"]
            .as_array()
            .expect("tenants")
            .iter()
            .find(|t| t["tenant_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no {id} in {census}"))
    };
    assert_eq!(
        tenant(drifted)["drifted"],
        serde_json::json!(["V2__plan.sql"])
    );
    assert_eq!(
        tenant(interrupted)["started"],
        serde_json::json!(["V4__concurrent_index.sql"])
    );
    assert_eq!(
        tenant(&rows[0].0)["pending"].as_array().map(Vec::len),
        Some(2)
    );
    assert!(
        tenant("cen_down")["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{census}"
    );
    // Fingerprints: at version 3 the hand-altered tenant stands alone, its column named.
    let groups = census["fingerprints"].as_array().expect("groups");
    let minority: Vec<&Value> = groups.iter().filter(|g| g["reference"] == false).collect();
    assert_eq!(minority.len(), 1, "{census}");
    assert_eq!(minority[0]["version"], "3");
    assert_eq!(minority[0]["tenant_ids"], serde_json::json!([altered]));
    assert_eq!(
        minority[0]["changes"],
        serde_json::json!([{
            "change": "added",
            "object": "column public.accounts.nickname",
            "reference": "",
            "found": "text",
        }]),
        "{census}"
    );
    let reference_at_3 = groups
        .iter()
        .find(|g| g["reference"] == true && g["version"] == "3")
        .expect("reference at 3");
    assert_eq!(reference_at_3["tenants"], 39, "{census}");

    // The human view: bars, then the outliers.
    let human = flotilla(
        &server,
        &[
            "fleet",
            "census",
            "prod",
            "--bundle",
            path(v3.path()),
            "--fingerprint",
        ],
    )
    .await;
    assert_eq!(human.code, 0, "{human:?}");
    assert!(human.stdout.contains('█'), "{}", human.stdout);
    for needle in [
        drifted.as_str(),
        interrupted.as_str(),
        altered.as_str(),
        "cen_down",
        "+ column public.accounts.nickname: text",
    ] {
        assert!(human.stdout.contains(needle), "{needle}: {}", human.stdout);
    }

    // The scheduled census keeps its result and exports it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let cached = loop {
        let run = flotilla(
            &server,
            &["--output", "json", "fleet", "census", "prod", "--cached"],
        )
        .await;
        if run.code == 0 && run.json()["trigger"] == "schedule" {
            break run.json();
        }
        assert!(Instant::now() < deadline, "no scheduled census: {run:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(cached["tenants"], 61, "{cached}");
    let metrics = daemon.metrics_addr().expect("metrics address logged");
    let text = tokio::task::spawn_blocking(move || scrape(&metrics))
        .await
        .expect("scrape");
    let gauge = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    assert_eq!(
        gauge(
            "flotilla_fleet_tenants",
            &[("fleet", "prod"), ("version", "3")]
        ),
        Some(40.0),
        "{text}"
    );
    assert_eq!(
        gauge("flotilla_fleet_unreachable", &[("fleet", "prod")]),
        Some(1.0),
        "{text}"
    );
    // Without a bundle only the schema drift is seen (no checksums to compare).
    assert_eq!(
        gauge("flotilla_fleet_drifted", &[("fleet", "prod")]),
        Some(1.0),
        "{text}"
    );

    // A discovery fleet drives a wave by name; its status reports versions.
    let discovered = flotilla(
        &server,
        &[
            "fleet",
            "add",
            "first-nine",
            "--discover",
            &cluster.url("postgres"),
            "--db-pattern",
            "cen_0000_",
        ],
    )
    .await;
    assert_eq!(discovered.code, 0, "{discovered:?}");
    assert!(discovered.stdout.contains("9 tenants"), "{discovered:?}");
    let run = flotilla(
        &server,
        &[
            "--output",
            "json",
            "wave",
            "start",
            "--bundle",
            path(v3.path()),
            "--fleet",
            "first-nine",
            "--concurrency",
            "4",
            "--wait",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let wave = run.json()["wave_id"].as_str().expect("wave id").to_string();
    let run = flotilla(&server, &["--output", "json", "wave", "status", &wave]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let status = run.json();
    assert_eq!(status["fleet"], "first-nine", "{status}");
    assert_eq!(
        status["versions"],
        serde_json::json!([{ "version": "3", "tenants": 9 }]),
        "{run:?}"
    );
    // While the wave stands still, asking again answers from the census just taken
    // (not one reading of every tenant per status call): a tenant emptied by hand
    // shows in a fleet census at once, in the wave's status only later.
    let tenant = cluster.connect("cen_00001").await.expect("connect");
    tenant
        .batch_execute("DROP SCHEMA flotilla CASCADE")
        .await
        .expect("drop the log");
    let census = flotilla(
        &server,
        &["--output", "json", "fleet", "census", "first-nine"],
    )
    .await;
    assert_eq!(census.code, 0, "{census:?}");
    assert_eq!(census.json()["states"]["unmanaged"], 1, "{census:?}");
    let run = flotilla(&server, &["--output", "json", "wave", "status", &wave]).await;
    assert_eq!(
        run.json()["versions"],
        serde_json::json!([{ "version": "3", "tenants": 9 }]),
        "{run:?}"
    );
    drop(tenant);
    let removed = flotilla(&server, &["fleet", "remove", "first-nine"]).await;
    assert_eq!(removed.code, 0, "{removed:?}");
    let gone = flotilla(&server, &["fleet", "census", "first-nine"]).await;
    assert_eq!(gone.code, 6, "{gone:?}");
    assert!(gone.stderr.contains("not found"), "{gone:?}");
}

/// Issue 19, stages: three stages over 30 tenants with approval between them. The wave
/// pauses at the end of each; a resume is no approval; a viewer cannot approve; the
/// operator's approval opens the next stage and is recorded with the token's name and
/// the stage's counts; a stage with a failed tenant is approved only with
/// `--accept-failures`; no tenant of a closed stage runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_pause_for_approval_and_a_failed_stage_needs_acceptance() {
    let cluster = shared();
    let rows = tenants(cluster, "stg_", 30).await;
    let work = tempfile::tempdir().expect("tempdir");
    let csv = targets_csv(work.path(), &rows);
    let tokens = work.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[tokens]]\nname = \"release-manager\"\nrole = \"operator\"\nsha256 = \"{}\"\n\
             [[tokens]]\nname = \"dashboard\"\nrole = \"viewer\"\nsha256 = \"{}\"\n",
            flotilla::config::hash_token("rm-5e1d"),
            flotilla::config::hash_token("view-2b7c"),
        ),
    )
    .expect("tokens file");
    let (daemon, _data) = start_daemon(&["--tokens-file", path(&tokens)]);
    let server = daemon.url();
    // stg_00010 is in stage 2 and fails there.
    let dir = bundle(&[
        (
            "V1__create.sql",
            "CREATE TABLE staged (id int PRIMARY KEY);",
        ),
        (
            "V2__check.sql",
            "DO $$ BEGIN IF current_database() = 'stg_00010' THEN \
             RAISE EXCEPTION 'stg_00010 refuses'; END IF; END $$;",
        ),
    ]);
    static OP: [&str; 4] = ["--token", "rm-5e1d", "--output", "json"];
    static VIEW: [&str; 4] = ["--token", "view-2b7c", "--output", "json"];
    let run = |who: &'static [&'static str; 4], args: Vec<String>| {
        let server = server.clone();
        async move {
            let args: Vec<&str> = who
                .iter()
                .copied()
                .chain(args.iter().map(String::as_str))
                .collect();
            flotilla(&server, &args).await
        }
    };
    let started = flotilla(
        &server,
        &[
            &OP[..],
            &start_args(
                dir.path(),
                &csv,
                &[
                    "--stage",
                    "canary=3",
                    "--stage",
                    "12",
                    "--stage",
                    "rest",
                    "--approve-between-stages",
                    "--max-failures",
                    "unlimited",
                ],
            ),
        ]
        .concat(),
    )
    .await;
    assert_eq!(started.code, 0, "{started:?}");
    let wave = started.json()["wave_id"].as_str().expect("id").to_string();
    let status = |who: &'static [&'static str; 4]| {
        run(who, vec!["wave".into(), "status".into(), wave.clone()])
    };
    let settled_paused = |done: u64| {
        let status = &status;
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let s = status(&VIEW).await.json();
                if s["state"] == "PAUSED"
                    && count(&s, "running") == 0
                    && count(&s, "succeeded") + count(&s, "failed") == done
                {
                    return s;
                }
                assert!(Instant::now() < deadline, "paused after {done}: {s}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // Stage 1: the canary, three tenants; nothing else ran.
    let s = settled_paused(3).await;
    assert_eq!(count(&s, "pending"), 27, "{s}");
    assert!(
        s["reason"].as_str().unwrap_or("").contains("approve"),
        "{s}"
    );
    assert_eq!(s["stages"][0]["tenants"]["succeeded"], 3, "{s}");
    assert_eq!(s["stages"][1]["open"], false, "{s}");
    assert!(
        log_counts(cluster, "stg_00004").await.is_empty(),
        "stage 2 ran early"
    );
    let resumed = run(&OP, vec!["wave".into(), "resume".into(), wave.clone()]).await;
    assert_eq!(resumed.code, 6, "a resume is no approval: {resumed:?}");
    assert!(resumed.stderr.contains("approve"), "{resumed:?}");
    let by_viewer = run(&VIEW, vec!["wave".into(), "approve".into(), wave.clone()]).await;
    assert_eq!(by_viewer.code, 5, "{by_viewer:?}");
    let approved = run(
        &OP,
        vec![
            "wave".into(),
            "approve".into(),
            wave.clone(),
            "--reason".into(),
            "canary looks healthy".into(),
        ],
    )
    .await;
    assert_eq!(approved.code, 0, "{approved:?}");

    // Stage 2: twelve tenants, one fails; stage 3 stays closed.
    let s = settled_paused(15).await;
    assert_eq!(count(&s, "failed"), 1, "{s}");
    assert_eq!(count(&s, "pending"), 15, "{s}");
    assert!(
        log_counts(cluster, "stg_00016").await.is_empty(),
        "stage 3 ran early"
    );
    let refused = run(&OP, vec!["wave".into(), "approve".into(), wave.clone()]).await;
    assert_eq!(refused.code, 6, "{refused:?}");
    assert!(refused.stderr.contains("--accept-failures"), "{refused:?}");
    let still = status(&VIEW).await.json();
    assert_eq!(still["state"], "PAUSED");
    assert_eq!(still["stages"][2]["open"], false, "{still}");
    let accepted = run(
        &OP,
        vec![
            "wave".into(),
            "approve".into(),
            wave.clone(),
            "--accept-failures".into(),
        ],
    )
    .await;
    assert_eq!(accepted.code, 0, "{accepted:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let s = status(&VIEW).await.json();
        if s["state"] == "FAILED" && count(&s, "running") == 0 {
            break s;
        }
        assert!(Instant::now() < deadline, "the wave's end: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(count(&done, "succeeded"), 29, "{done}");
    let approval = &done["stages"][0]["approval"];
    assert_eq!(approval["by"], "release-manager", "{done}");
    assert_eq!(approval["succeeded"], 3);
    let approval = &done["stages"][1]["approval"];
    assert_eq!(approval["accepted_failures"], true, "{done}");
    assert_eq!(
        (approval["succeeded"].clone(), approval["failed"].clone()),
        (11.into(), 1.into())
    );
    let approvals: Vec<&Value> = done["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| {
            h["reason"]
                .as_str()
                .unwrap_or("")
                .starts_with("approved stage")
        })
        .collect();
    assert_eq!(approvals.len(), 2, "{done}");
    assert!(approvals.iter().all(|h| h["actor"] == "release-manager"));
    assert!(
        approvals[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("canary looks healthy"),
        "{done}"
    );
}

/// Issue 19, backfills: `kill -9` of the daemon in the middle of a batched backfill;
/// the restarted daemon finishes it, every row changed exactly once, and `wave tenants`
/// reports each tenant's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_survives_a_kill_9_of_the_daemon() {
    let cluster = shared();
    let rows = tenants(cluster, "bfk_", 2).await;
    for (db, _) in &rows {
        cluster
            .connect(db)
            .await
            .expect("connect")
            .batch_execute(
                "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false);
                 INSERT INTO items (id) SELECT g FROM generate_series(1, 8000) g;",
            )
            .await
            .expect("items");
    }
    let work = tempfile::tempdir().expect("tempdir");
    let csv = targets_csv(work.path(), &rows);
    let dir = bundle(&[(
        "V1__backfill.sql",
        "-- flotilla:batch\n-- flotilla:batch-pause 100ms\n\
         UPDATE items SET n = n + 1, done = true \
         WHERE id IN (SELECT id FROM items WHERE NOT done ORDER BY id LIMIT 500);",
    )]);
    let (mut daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let wave = start_wave(&server, dir.path(), &csv, &["--concurrency", "2"]).await;
    let batches = |db: String| async move {
        let c = cluster.connect(&db).await.expect("connect");
        c.query_opt(
            "SELECT COALESCE(statements_done, 0) FROM flotilla.execution_log",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, i32>(0))
        .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while batches(rows[0].0.clone()).await < 2 {
        assert!(Instant::now() < deadline, "the backfill never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill9().expect("kill -9");
    let cut_at = batches(rows[0].0.clone()).await;
    assert!(cut_at < 16, "killed mid-backfill, after {cut_at} batches");
    daemon.restart().expect("restart");
    let status = wait_for(&server, &wave, "the wave to finish", |s| {
        s["state"] != "RUNNING"
    })
    .await;
    assert_eq!(
        status["state"],
        "COMPLETED",
        "{status}\n{}",
        daemon.log_text()
    );
    let listed = flotilla(&server, &["--output", "json", "wave", "tenants", &wave]).await;
    for t in listed.json()["tenants"].as_array().expect("tenants") {
        assert_eq!(t["rows_changed"], 8000, "{t}");
    }
    for (db, _) in &rows {
        let c = cluster.connect(db).await.expect("connect");
        let wrong: i64 = c
            .query_one("SELECT count(*) FROM items WHERE n <> 1 OR NOT done", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(wrong, 0, "{db}: every row changed exactly once");
        assert_eq!(batches(db.clone()).await, 16, "{db}");
    }
}

const UNDO_V1: (&str, &str) = (
    "V1__accounts.sql",
    "CREATE TABLE accounts (id int PRIMARY KEY);",
);
const UNDO_V2: (&str, &str) = (
    "V2__orders.sql",
    "CREATE TABLE orders (id int PRIMARY KEY);",
);
const UNDO_V3: (&str, &str) = (
    "V3__email.sql",
    "ALTER TABLE accounts ADD COLUMN email text;",
);
const UNDO_U2: (&str, &str) = ("U2__orders.sql", "DROP TABLE orders;");
const UNDO_U3: (&str, &str) = ("U3__email.sql", "ALTER TABLE accounts DROP COLUMN email;");

/// Issue 19, undo: `plan --undo-to` shows what would run and which versions lack an
/// undo script; `wave start --undo-to` undoes every tenant, newest first; a canary
/// rehearsal with a wrong undo script stops the wave at the canary, the rest untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_waves_and_a_rehearsal_that_stops_at_the_canary() {
    let cluster = shared();
    let rows = tenants(cluster, "und_", 6).await;
    let work = tempfile::tempdir().expect("tempdir");
    let (daemon, _data) = start_daemon(&[]);
    let server = daemon.url();
    let statuses = |db: String| async move {
        let c = cluster.connect(&db).await.expect("connect");
        c.query(
            "SELECT version || ':' || status FROM flotilla.execution_log ORDER BY version",
            &[],
        )
        .await
        .map(|r| r.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
        .unwrap_or_default()
    };

    // Tenants 1-3: forward to V3, then undone to V1.
    let first = targets_csv(work.path(), &rows[..3]);
    let good = bundle(&[UNDO_V1, UNDO_V2, UNDO_V3, UNDO_U2, UNDO_U3]);
    let run = flotilla(&server, &start_args(good.path(), &first, &["--wait"])).await;
    assert_eq!(run.code, 0, "{run:?}");
    let plan = flotilla(
        &server,
        &[
            "--output",
            "json",
            "plan",
            "--bundle",
            path(good.path()),
            "--targets",
            path(&first),
            "--undo-to",
            "1",
        ],
    )
    .await;
    assert_eq!(plan.code, 0, "{plan:?}");
    let plan = plan.json();
    assert_eq!(plan["versions_without_undo"], serde_json::json!(["1"]));
    let steps: Vec<&str> = plan["tenants"][0]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["script"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(steps, ["U3__email.sql", "U2__orders.sql"], "{plan}");
    let undo = flotilla(
        &server,
        &start_args(good.path(), &first, &["--undo-to", "1", "--wait"]),
    )
    .await;
    assert_eq!(undo.code, 0, "{undo:?}");
    for (db, _) in &rows[..3] {
        assert_eq!(
            statuses(db.clone()).await,
            ["1:applied", "2:undone", "3:undone"],
            "{db}"
        );
    }

    // Tenants 4-6 at V1, then a rehearsal whose U3 forgets the column.
    let second = work.path().join("second");
    std::fs::create_dir_all(&second).expect("dir");
    let second = targets_csv(&second, &rows[3..]);
    let v1 = bundle(&[UNDO_V1]);
    let run = flotilla(&server, &start_args(v1.path(), &second, &["--wait"])).await;
    assert_eq!(run.code, 0, "{run:?}");
    let wrong = bundle(&[
        UNDO_V1,
        UNDO_V2,
        UNDO_V3,
        UNDO_U2,
        ("U3__email.sql", "SELECT 1;"),
    ]);
    let started = flotilla(
        &server,
        &[
            &["--output", "json"][..],
            &start_args(wrong.path(), &second, &["--canary", "1", "--rehearse-undo"]),
        ]
        .concat(),
    )
    .await;
    assert_eq!(started.code, 0, "{started:?}");
    let wave = started.json()["wave_id"].as_str().expect("id").to_string();
    let status = wait_for(&server, &wave, "the canary to stop the wave", |s| {
        s["state"] == "PAUSED" && count(s, "running") == 0
    })
    .await;
    assert_eq!(count(&status, "failed"), 1, "{status}");
    assert_eq!(count(&status, "pending"), 2, "{status}");
    assert!(
        status["reason"].as_str().unwrap_or("").contains("canary"),
        "{status}"
    );
    let failed = flotilla(
        &server,
        &[
            "--output", "json", "wave", "tenants", &wave, "--state", "failed",
        ],
    )
    .await;
    let message = failed.json()["tenants"][0]["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        message.contains("undo rehearsal, applying again"),
        "{message}"
    );
    for (db, _) in &rows[4..] {
        assert_eq!(statuses(db.clone()).await, ["1:applied"], "{db}: untouched");
    }
}
