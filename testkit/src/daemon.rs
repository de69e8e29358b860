//! A real `flotillad` process for end-to-end tests and the demo: spawned on a data dir,
//! its address learned from its `flotillad listening addr=…` log line, every log line
//! kept (tests search them for leaked secrets), and `kill -9`, SIGTERM and restart on
//! the same address for fault injection. Dropping it kills the process.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Finds a workspace binary: next to the running executable (the CLI finding the
/// daemon), one level up (a test in `target/debug/deps`), else by name on PATH.
pub fn binary(name: &str) -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

/// A running daemon.
pub struct Daemon {
    binary: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
    /// Passed as `--listen`: `127.0.0.1:0` first, then the address learned, so a restart
    /// comes back where clients expect it. `None`: the daemon's own configuration.
    listen: Option<String>,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `flotillad --data-dir DIR --listen 127.0.0.1:0 ARGS…` and waits until it
    /// listens.
    pub fn start(data_dir: &Path, args: &[&str]) -> Result<Self> {
        Self::start_with_env(data_dir, args, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables.
    pub fn start_with_env(data_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Result<Self> {
        let mut all = vec![
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--drain-timeout".to_string(),
            "2s".to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        Self::spawn_with(&args, envs, Some("127.0.0.1:0".to_string()))
    }

    /// Starts `flotillad ARGS…` exactly as given (no `--data-dir`, no `--listen`): for
    /// testing configuration files and environment variables.
    pub fn start_exact(args: &[&str], envs: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_with(args, envs, None)
    }

    fn spawn_with(args: &[&str], envs: &[(&str, &str)], listen: Option<String>) -> Result<Self> {
        let mut daemon = Self {
            binary: binary("flotillad"),
            args: args.iter().map(|a| a.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            listen,
            addr: String::new(),
            log: Arc::new(Mutex::new(Vec::new())),
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut command = Command::new(&self.binary);
        command.args(&self.args);
        if let Some(listen) = &self.listen {
            command.args(["--listen", listen]);
        }
        let mut child = command
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "start {} (build it first: `cargo build` in the Flotilla workspace builds it next to flotilla)",
                    self.binary.display()
                )
            })?;
        let stderr = child.stderr.take().context("daemon stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if line.contains("flotillad listening")
                    && let Some(rest) = line.split("addr=").nth(1)
                {
                    let _ = tx.send(
                        rest.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string(),
                    );
                }
                if let Ok(mut log) = log.lock() {
                    log.push(line);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(addr) = rx.recv_timeout(Duration::from_millis(100)) {
                if self.listen.is_some() {
                    self.listen = Some(addr.clone());
                }
                self.addr = addr;
                break;
            }
            if let Some(status) = child.try_wait()? {
                std::thread::sleep(Duration::from_millis(100));
                bail!(
                    "flotillad exited ({status}) before listening:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("flotillad did not listen within 30s:\n{}", self.log_text());
            }
        }
        self.child = Some(child);
        Ok(())
    }

    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://host:port`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The Prometheus listener's `host:port`, when started with `--metrics-listen`.
    pub fn metrics_addr(&self) -> Option<String> {
        let log = self.log.lock().ok()?;
        log.iter().rev().find_map(|line| {
            line.split("metrics_addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
        })
    }

    /// Every log line so far.
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("kill -9 flotillad")?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, and wait up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("flotillad is not running")?;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("flotillad did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts again on the same address and data dir (after a kill or a stop).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9()?;
        self.spawn()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}
