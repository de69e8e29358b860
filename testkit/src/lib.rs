//! Throwaway PostgreSQL clusters for Flotilla's tests and benchmarks: real servers, never
//! a mock.
//!
//! A [`Cluster`] is one `initdb`'d data directory in a temp dir, served by a real
//! `postgres` on a free port of 127.0.0.1 (plus a private unix-socket dir), run as the
//! `postgres` OS user when the process is root, since `initdb` refuses root. It stands for
//! one database server of a fleet: several can run at once, and each can be stopped,
//! `kill -9`ed and restarted on the same port to inject faults. Tenant databases are
//! cloned from a seeded template with `STRATEGY FILE_COPY` from several sessions at once.
//!
//! Cleanup never depends on the test ending well: every cluster has a reaper, a tiny
//! shell in its own process group that waits for its stdin pipe to close — which happens
//! when the cluster is dropped *or* when the test process exits for any reason, panics
//! and `kill -9` included — and then stops the server and deletes the temp dir. That is
//! also what lets a test binary share one cluster between tests through a `static`
//! ([`shared`]), which Rust never drops.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

pub mod daemon;
pub mod fault;
pub mod load;
pub mod pooler;
pub use daemon::Daemon;

/// The superuser every cluster is created with.
pub const SUPERUSER: &str = "postgres";

/// One throwaway PostgreSQL server.
pub struct Cluster {
    root: PathBuf,
    port: u16,
    bindir: PathBuf,
    run_as_postgres: bool,
    reaper: Mutex<Option<(Child, ChildStdin)>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("root", &self.root)
            .field("port", &self.port)
            .finish()
    }
}

/// A cluster started once per test binary and shared by its tests. Tests that stop or
/// kill a server must start their own with [`Cluster::start`] instead.
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    SHARED.get_or_init(|| Cluster::start().expect("start the shared PostgreSQL cluster"))
}

/// A second shared cluster, for tests that need two database servers.
pub fn shared_second() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    SHARED.get_or_init(|| Cluster::start().expect("start the second shared PostgreSQL cluster"))
}

/// Where PostgreSQL's server binaries are: `$FLOTILLA_PG_BINDIR`, `pg_config --bindir`,
/// the newest `/usr/lib/postgresql/*/bin`, or the directory of `initdb` on PATH.
pub fn pg_bindir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FLOTILLA_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .filter(|(_, dir)| has_server(dir))
            .collect();
        versions.sort();
        if let Some((_, dir)) = versions.pop() {
            return Ok(dir);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    bail!(
        "PostgreSQL server binaries (initdb, postgres) not found: install them \
         (Debian: apt-get install postgresql) or set FLOTILLA_PG_BINDIR"
    )
}

pub(crate) fn is_root() -> bool {
    // The effective uid without libc: /proc/self/status has "Uid: real effective …".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Cluster {
    /// `initdb`s and starts a new cluster on a free port.
    pub fn start() -> Result<Self> {
        let bindir = pg_bindir()?;
        let run_as_postgres = is_root();
        let root = tempfile::Builder::new()
            .prefix("flotilla-pg-")
            .tempdir()
            .context("create a temp dir for a cluster")?
            .keep();
        let mut cluster = Self {
            root,
            port: 0,
            bindir,
            run_as_postgres,
            reaper: Mutex::new(None),
        };
        cluster.spawn_reaper()?;
        if run_as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&cluster.root))?;
        }
        std::fs::create_dir_all(cluster.socket_dir())?;
        if run_as_postgres {
            run(Command::new("chown")
                .args(["postgres:postgres"])
                .arg(cluster.socket_dir()))?;
        }
        let mut initdb = cluster.command("initdb");
        initdb.arg("-D").arg(cluster.data_dir()).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        run(&mut initdb).context("initdb")?;
        std::fs::write(
            cluster.data_dir().join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 host all {SUPERUSER} 127.0.0.1/32 trust\n\
                 host replication {SUPERUSER} 127.0.0.1/32 trust\n\
                 host all all 127.0.0.1/32 scram-sha-256\n"
            ),
        )?;
        // A port can be taken between choosing and binding it: try a few.
        let mut last_err = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            cluster.write_config()?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("cluster did not start")))
    }

    fn spawn_reaper(&mut self) -> Result<()> {
        let pg_ctl = self.bindir.join("pg_ctl");
        let stop = format!(
            "{} -D {} stop -m immediate -w",
            shell_quote(&pg_ctl.to_string_lossy()),
            shell_quote(&self.data_dir().to_string_lossy())
        );
        let stop = if self.run_as_postgres {
            format!("runuser -u postgres -- {stop}")
        } else {
            stop
        };
        let script = format!(
            "read _ignored; {stop} >/dev/null 2>&1; rm -rf {}",
            shell_quote(&self.root.to_string_lossy())
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C to the test run must not kill the reaper.
            .process_group(0)
            .spawn()
            .context("spawn the cluster reaper")?;
        let stdin = child.stdin.take().context("reaper stdin")?;
        *self
            .reaper
            .lock()
            .map_err(|_| anyhow!("reaper lock poisoned"))? = Some((child, stdin));
        Ok(())
    }

    /// A streaming standby of this cluster (`pg_basebackup -R`), on a port of its own:
    /// for tests of what a replica's lag does (pause its replay with
    /// `SELECT pg_wal_replay_pause()` on it).
    pub fn start_standby(&self) -> Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("flotilla-pg-standby-")
            .tempdir()
            .context("create a temp dir for a standby")?
            .keep();
        let mut standby = Self {
            root,
            port: 0,
            bindir: self.bindir.clone(),
            run_as_postgres: self.run_as_postgres,
            reaper: Mutex::new(None),
        };
        standby.spawn_reaper()?;
        if standby.run_as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&standby.root))?;
        }
        std::fs::create_dir_all(standby.socket_dir())?;
        if standby.run_as_postgres {
            run(Command::new("chown")
                .args(["postgres:postgres"])
                .arg(standby.socket_dir()))?;
        }
        let mut backup = standby.command("pg_basebackup");
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .arg("-D")
            .arg(standby.data_dir())
            .args(["-X", "stream", "--no-sync"]);
        run(&mut backup).context("pg_basebackup")?;
        std::fs::write(standby.data_dir().join("standby.signal"), "")?;
        let mut last_err = None;
        for _ in 0..5 {
            standby.port = free_port()?;
            standby.write_config()?;
            let conf = standby.data_dir().join("postgresql.auto.conf");
            let mut text = std::fs::read_to_string(&conf)?;
            text.push_str(&format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user={SUPERUSER} application_name=standby'\n\
                 wal_receiver_status_interval = '1s'\n",
                self.port
            ));
            std::fs::write(&conf, text)?;
            match standby.pg_ctl_start() {
                Ok(()) => return Ok(standby),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("standby did not start")))
    }

    fn write_config(&self) -> Result<()> {
        let conf = self.data_dir().join("postgresql.auto.conf");
        std::fs::write(
            &conf,
            format!(
                "listen_addresses = '127.0.0.1'\n\
                 port = {}\n\
                 unix_socket_directories = '{}'\n\
                 max_connections = 250\n\
                 track_activity_query_size = 65536\n\
                 shared_buffers = '64MB'\n\
                 fsync = on\n\
                 log_min_messages = warning\n\
                 log_min_error_statement = panic\n",
                self.port,
                self.socket_dir().display()
            ),
        )?;
        if self.run_as_postgres {
            run(Command::new("chown").arg("postgres:postgres").arg(&conf))?;
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        let mut cmd = if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.process_group(0);
        cmd
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let log = self.root.join("postgres.log");
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"]);
        run(&mut cmd).with_context(|| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            format!(
                "start PostgreSQL on port {}; log tail:\n{}",
                self.port,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`: the server as Flotilla's per-host limits name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A libpq URL for `db` as the superuser (no password: trust on 127.0.0.1).
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// A libpq URL for `db` as `user` with `password` (scram-sha-256 on 127.0.0.1).
    pub fn url_with_password(&self, db: &str, user: &str, password: &str) -> String {
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// Connects to `db` as the superuser, driving the connection on the current runtime.
    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connect to {db} on port {}", self.port))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`).
    pub fn stop(&self) -> Result<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-m", "fast", "stop"]);
        run(&mut cmd).context("pg_ctl stop")
    }

    /// Kills the postmaster and every backend with SIGKILL, as a crash would, and waits
    /// until they are gone.
    ///
    /// Backends are found by their working directory (every server process runs in the
    /// data dir), not as children of the postmaster: each backend has a session of its
    /// own, and one forked just before the kill is orphaned before it could be listed —
    /// left alive, it would keep the shared memory and block the restart.
    pub fn kill9(&self) -> Result<()> {
        let data = self.data_dir().canonicalize().context("data dir")?;
        let mut seen = processes_in(&data);
        if seen.is_empty() {
            bail!("no server process runs in {}", data.display());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A dying process loses its working directory before it is gone: every
            // process ever seen in the data dir is waited for by pid, not by cwd (a
            // postmaster still exiting would make the restart's postgres refuse).
            for p in processes_in(&data) {
                if !seen.contains(&p) {
                    seen.push(p);
                }
            }
            let left: Vec<u32> = seen.iter().copied().filter(|&p| alive(p)).collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("processes of the killed cluster did not exit: {left:?}");
            }
            let _ = Command::new("kill")
                .arg("-9")
                .args(left.iter().map(|p| p.to_string()))
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port after [`stop`](Self::stop) or
    /// [`kill9`](Self::kill9); after a kill it runs crash recovery first.
    pub fn restart(&self) -> Result<()> {
        let pid_file = self.data_dir().join("postmaster.pid");
        if let Ok(text) = std::fs::read_to_string(&pid_file)
            && let Some(pid) = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u32>().ok())
            && !alive(pid)
        {
            // A killed postmaster's pid may linger as a zombie where nothing reaps
            // orphans; postgres would take it for a live server.
            let _ = std::fs::remove_file(&pid_file);
            let _ = std::fs::remove_file(
                self.socket_dir()
                    .join(format!(".s.PGSQL.{}.lock", self.port)),
            );
        }
        self.pg_ctl_start()
    }

    /// Turns TLS on with a certificate for `server_name` issued by a fresh test CA, and
    /// returns the CA certificate's path (to use as `sslrootcert`). Needs `openssl`.
    pub async fn enable_tls(&self, server_name: &str) -> Result<PathBuf> {
        let data = self.data_dir();
        let (crt, key) = (data.join("server.crt"), data.join("server.key"));
        let issued = issue_test_cert(&self.root, server_name)?;
        std::fs::copy(&issued.cert, &crt)?;
        std::fs::copy(&issued.key, &key)?;
        let ca_crt = issued.ca;
        if self.run_as_postgres {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(&crt)
                .arg(&key))?;
        }
        run(Command::new("chmod").arg("600").arg(&key))?;
        let admin = self.connect("postgres").await?;
        // Two calls: a multi-statement string is one implicit transaction, which
        // ALTER SYSTEM refuses.
        admin
            .batch_execute("ALTER SYSTEM SET ssl = on")
            .await
            .context("turn ssl on")?;
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .context("reload")?;
        // The reload is asynchronous: wait until new sessions see it.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let on: String = self
                .connect("postgres")
                .await?
                .query_one("SHOW ssl", &[])
                .await?
                .get(0);
            if on == "on" {
                break;
            }
            if Instant::now() > deadline {
                bail!("ssl did not turn on");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(ca_crt)
    }

    /// `pg_dump --schema-only` of `db` without `exclude` (pg_dump `-N`/`-T` patterns: a
    /// name with a dot is a table, without one a schema), ownership, privileges,
    /// comments and pg_dump's own `--` and `\restrict` lines: two databases built by
    /// the same scripts compare equal.
    pub fn dump_schema(&self, db: &str, exclude: &[&str]) -> Result<String> {
        let mut cmd = Command::new(self.bindir.join("pg_dump"));
        cmd.args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--no-comments",
        ])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            SUPERUSER,
        ])
        .args(["-d", db]);
        for name in exclude {
            cmd.arg(if name.contains('.') { "-T" } else { "-N" })
                .arg(name);
        }
        let out = cmd.output().context("run pg_dump")?;
        if !out.status.success() {
            bail!("pg_dump {db}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                !l.trim().is_empty()
                    && !l.starts_with("--")
                    && !l.starts_with("\\restrict")
                    && !l.starts_with("\\unrestrict")
            })
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Creates `count` tenant databases named `{prefix}{n:05}` (n from 1), each a copy
    /// of a template seeded with `seed_sql`, using `STRATEGY FILE_COPY` from several
    /// sessions at once. Returns their names in order.
    pub async fn create_tenants(
        &self,
        prefix: &str,
        count: usize,
        seed_sql: &str,
    ) -> Result<Vec<String>> {
        let template = format!("tpl_{prefix}");
        let admin = self.connect("postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{template}\""))
            .await
            .with_context(|| format!("create template {template}"))?;
        if !seed_sql.is_empty() {
            let t = self.connect(&template).await?;
            t.batch_execute(seed_sql)
                .await
                .context("seed the tenant template")?;
        }
        let names: Vec<String> = (1..=count).map(|n| format!("{prefix}{n:05}")).collect();
        let sessions = 4.min(count.max(1));
        let mut tasks = Vec::new();
        for s in 0..sessions {
            let client = self.connect("postgres").await?;
            let mine: Vec<String> = names.iter().skip(s).step_by(sessions).cloned().collect();
            let template = template.clone();
            tasks.push(tokio::spawn(async move {
                for name in mine {
                    client
                        .batch_execute(&format!(
                            "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\" STRATEGY FILE_COPY"
                        ))
                        .await
                        .with_context(|| format!("create tenant database {name}"))?;
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(names)
    }
}

/// Every file under `dir`, recursively (a test looking for what a daemon left on disk).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A certificate for a server name, issued by a fresh throwaway CA.
#[derive(Debug, Clone)]
pub struct TestCert {
    /// The CA certificate (PEM): what clients trust.
    pub ca: PathBuf,
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
}

/// Issues a server certificate for `server_name` (as a DNS subject alternative name)
/// from a new CA, all files in `dir`. Needs `openssl`.
pub fn issue_test_cert(dir: &Path, server_name: &str) -> Result<TestCert> {
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (crt, key) = (dir.join("server.crt"), dir.join("server.key"));
    let (csr, ext) = (dir.join("server.csr"), dir.join("server.ext"));
    run(Command::new("openssl")
        .args([
            "req", "-new", "-x509", "-days", "2", "-nodes", "-newkey", "rsa:2048",
        ])
        .args(["-subj", "/CN=flotilla-test-ca", "-keyout"])
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca_crt))
    .context("generate a test CA with openssl")?;
    run(Command::new("openssl")
        .args(["req", "-new", "-nodes", "-newkey", "rsa:2048", "-subj"])
        .arg(format!("/CN={server_name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr))
    .context("generate a server key")?;
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=DNS:{server_name}\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        ),
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca_crt)
        .arg("-CAkey")
        .arg(&ca_key)
        .args(["-CAcreateserial", "-extfile"])
        .arg(&ext)
        .arg("-out")
        .arg(&crt))
    .context("sign the server certificate")?;
    Ok(TestCert {
        ca: ca_crt,
        cert: crt,
        key,
    })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Closing the reaper's stdin makes it stop the server and delete the temp dir;
        // waiting for it keeps "no leftovers" true when the drop returns.
        if let Ok(mut guard) = self.reaper.lock()
            && let Some((mut child, stdin)) = guard.take()
        {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::io::stderr().flush();
    Ok(())
}

/// Whether `pid` runs (a zombie does not count).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Every process whose working directory is `dir`, from /proc.
fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| std::fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|cwd| cwd == dir))
        .collect()
}
