//! Self-test of the harness: several clusters, many tenants, a crash and a restart.

use flotilla_testkit::Cluster;

async fn select_one_everywhere(cluster: &Cluster, dbs: &[String]) {
    for db in dbs {
        let client = cluster.connect(db).await.expect("connect");
        let row = client
            .query_one("SELECT count(*) FROM seeded", &[])
            .await
            .expect("query the seeded table");
        assert_eq!(
            row.get::<_, i64>(0),
            1,
            "{db} was cloned from the seeded template"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_fifty_tenants_each_survive_kill_and_restart() {
    let a = Cluster::start().expect("start cluster a");
    let b = Cluster::start().expect("start cluster b");
    assert_ne!(a.port(), b.port());
    let seed = "CREATE TABLE seeded (id int); INSERT INTO seeded VALUES (1);";
    let started = std::time::Instant::now();
    let a_dbs = a
        .create_tenants("tenant_", 50, seed)
        .await
        .expect("tenants on a");
    let b_dbs = b
        .create_tenants("tenant_", 50, seed)
        .await
        .expect("tenants on b");
    eprintln!("created 100 tenant databases in {:?}", started.elapsed());
    assert_eq!(a_dbs.len(), 50);
    select_one_everywhere(&a, &a_dbs).await;
    select_one_everywhere(&b, &b_dbs).await;

    let port = a.port();
    a.kill9().expect("kill -9 cluster a");
    assert!(
        a.connect(&a_dbs[0]).await.is_err(),
        "a killed server refuses connections"
    );
    select_one_everywhere(&b, &b_dbs).await;

    a.restart().expect("restart cluster a");
    assert_eq!(a.port(), port, "restarted on the same port");
    select_one_everywhere(&a, &a_dbs).await;

    a.stop().expect("stop a");
    assert!(a.connect(&a_dbs[0]).await.is_err());
    a.restart().expect("restart a after a clean stop");
    select_one_everywhere(&a, &a_dbs[..1]).await;
}

#[tokio::test]
async fn dropping_a_cluster_removes_its_server_and_files() {
    let cluster = Cluster::start().expect("start");
    let data = cluster.data_dir();
    let pid: u32 = std::fs::read_to_string(data.join("postmaster.pid"))
        .expect("pid file")
        .lines()
        .next()
        .and_then(|l| l.parse().ok())
        .expect("pid");
    drop(cluster);
    assert!(!data.exists(), "temp dir removed");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "postmaster {pid} still running: {stat}"
    );
}

#[test]
fn panicking_test_process_leaves_nothing_behind() {
    // A child process that starts a cluster and panics: the reaper must clean up after it.
    if std::env::var_os("FLOTILLA_HARNESS_PANIC_CHILD").is_some() {
        let cluster = Cluster::start().expect("start");
        println!("DATA={}", cluster.data_dir().display());
        std::mem::forget(cluster);
        panic!("deliberate panic with a live cluster");
    }
    let exe = std::env::current_exe().expect("test exe");
    let out = std::process::Command::new(exe)
        .args([
            "panicking_test_process_leaves_nothing_behind",
            "--exact",
            "--nocapture",
        ])
        .env("FLOTILLA_HARNESS_PANIC_CHILD", "1")
        .output()
        .expect("run child");
    assert!(!out.status.success(), "the child panics");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let data = stdout
        .lines()
        .find_map(|l| l.strip_prefix("DATA="))
        .unwrap_or_else(|| panic!("child printed no data dir: {stdout}"));
    let data = std::path::PathBuf::from(data);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while data.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !data.exists(),
        "reaper removed {} after the panic",
        data.display()
    );
}
