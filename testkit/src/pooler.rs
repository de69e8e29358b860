//! A real PgBouncer in front of a [`Cluster`](crate::Cluster), for testing what Flotilla
//! does behind a connection pooler. Started as the `postgres` user when the process is
//! root (PgBouncer refuses root), on a free port, in transaction pooling mode. Like a
//! cluster it is reaped by a shell that waits for its stdin pipe to close, so a test that
//! panics or is killed leaves no PgBouncer behind.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// A running PgBouncer.
pub struct PgBouncer {
    port: u16,
    _dir: tempfile::TempDir,
    reaper: Option<(Child, ChildStdin)>,
}

impl PgBouncer {
    /// True when the `pgbouncer` binary is installed.
    pub fn available() -> bool {
        binary().is_some()
    }

    /// PgBouncer in transaction mode in front of `127.0.0.1:upstream_port`. With
    /// `ignore_options`, it accepts (and drops) the `options` startup parameter, as
    /// deployments often configure it; without, it refuses such a connection.
    pub fn start(upstream_port: u16, ignore_options: bool) -> Result<Self> {
        let binary = binary().context("pgbouncer is not installed (apt-get install pgbouncer)")?;
        let dir = tempfile::Builder::new().prefix("flotilla-pgb-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let users = dir.path().join("users.txt");
        std::fs::write(&users, format!("\"{}\" \"\"\n", crate::SUPERUSER))?;
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host=127.0.0.1 port={upstream_port}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
                 pool_mode = transaction\ndefault_pool_size = 4\n\
                 logfile = {}\npidfile = {}\n{}",
                users.display(),
                dir.path().join("pgbouncer.log").display(),
                dir.path().join("pgbouncer.pid").display(),
                if ignore_options {
                    "ignore_startup_parameters = options\n"
                } else {
                    ""
                }
            ),
        )?;
        for f in [&users, &ini] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644))?;
        }
        let run = format!("{} {}", binary.display(), ini.display());
        let run = if crate::is_root() {
            format!("runuser -u postgres -- {run}")
        } else {
            run
        };
        let mut child = Command::new("sh")
            .args([
                "-c",
                &format!("{run} & pid=$!; read _ignored; kill $pid; wait $pid"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("spawn pgbouncer")?;
        let stdin = child.stdin.take().context("pgbouncer reaper stdin")?;
        let bouncer = Self {
            port,
            _dir: dir,
            reaper: Some((child, stdin)),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(bouncer._dir.path().join("pgbouncer.log"))
                    .unwrap_or_default();
                bail!("pgbouncer did not listen on {port}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(bouncer)
    }

    /// A libpq URL for `db` through the pooler, as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://{}@127.0.0.1:{}/{db}?sslmode=disable",
            crate::SUPERUSER,
            self.port
        )
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some((mut child, mut stdin)) = self.reaper.take() {
            let _ = stdin.write_all(b"\n");
            drop(stdin);
            let _ = child.wait();
        }
    }
}

fn binary() -> Option<std::path::PathBuf> {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
}
