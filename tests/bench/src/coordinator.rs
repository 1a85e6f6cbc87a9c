//! The coordinator under test: a real `serin serve` process, and what /proc says about it.
//!
//! [`serin_binary`] builds `serin` (release by default) with cargo unless a path is given;
//! [`Coordinator::start`] writes a config into a fresh temp dir (with mutual TLS, the run's CA and
//! the coordinator's certificate under `pki/`), starts `serin serve` on `127.0.0.1:0`, reads the
//! bound address from its `listening on` line and keeps its stderr in `coordinator.log`. [`ProcSample`] reads RSS, CPU time and open descriptors from /proc.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::connect::{BenchPki, Transport};

/// Finds or builds the `serin` binary: `explicit` if given, else `cargo build -p serin-cli
/// --bin serin` in `profile` (`release` or `dev`) and the result under the
/// target directory.
pub fn serin_binary(explicit: Option<PathBuf>, profile: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        anyhow::ensure!(p.is_file(), "no serin binary at {}", p.display());
        return Ok(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .context("the bench crate lives two levels below the workspace root")?
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--quiet",
            "-p",
            "serin-cli",
            "--bin",
            "serin",
            "--profile",
            profile,
        ])
        .status()
        .context("cannot run cargo to build serin")?;
    anyhow::ensure!(status.success(), "building serin ({profile}) failed");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let dir = if profile == "dev" { "debug" } else { profile };
    let bin = target.join(dir).join("serin");
    anyhow::ensure!(
        bin.is_file(),
        "cargo built serin but {} does not exist",
        bin.display()
    );
    Ok(bin)
}

/// Coordinator settings the bench controls.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// Heartbeat interval sent to agents.
    pub heartbeat_interval: Duration,
    /// Silence after which a host is unreachable.
    pub unreachable_after: Duration,
    /// Plain HTTP/2 (`insecure_plaintext`) instead of mutual TLS.
    pub plaintext: bool,
}

/// A running `serin serve`, killed on drop.
#[derive(Debug)]
pub struct Coordinator {
    child: Child,
    url: String,
    transport: Transport,
    dir: tempfile::TempDir,
}

impl Coordinator {
    /// Starts `serin serve` and waits (up to 30 s) until it listens.
    pub fn start(serin: &Path, settings: &CoordinatorSettings) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("serin-bench").tempdir()?;
        let config = dir.path().join("coordinator.toml");
        let (transport, tls) = if settings.plaintext {
            // The explicit development switch, to compare the cost of TLS.
            (
                Transport::Plaintext,
                "[tls]\ninsecure_plaintext = true\n".to_string(),
            )
        } else {
            let pki = BenchPki::create(&dir.path().join("pki"))?;
            let files = pki.coordinator_files()?;
            let tls = format!(
                "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                files.ca.display(),
                files.cert.display(),
                files.key.display()
            );
            (Transport::MutualTls(Arc::new(pki)), tls)
        };
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nheartbeat_interval = \"{}ms\"\nunreachable_after = \"{}ms\"\n{tls}",
                dir.path().join("state").display(),
                settings.heartbeat_interval.as_millis(),
                settings.unreachable_after.as_millis(),
            ),
        )?;
        let log_path = dir.path().join("coordinator.log");
        let mut child = Command::new(serin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .env(
                "SERIN_LOG",
                std::env::var("SERIN_BENCH_COORDINATOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", serin.display()))?;
        let stderr = child.stderr.take().context("coordinator stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut log = std::fs::File::create(&log_path)?;
        // Copies the coordinator's stderr to its log for as long as it runs.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("serin coordinator listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
                let _ = writeln!(log, "{line}");
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).with_context(|| {
            format!(
                "serin serve did not report its address; see {}",
                log_path.display()
            )
        })?;
        Ok(Self {
            child,
            url: format!("{}://{addr}", transport.scheme()),
            transport,
            dir,
        })
    }

    /// The URL agents and operators dial.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A connector for agents and operators of this coordinator.
    pub fn connector(&self) -> crate::connect::Connector {
        crate::connect::Connector::new(self.url.clone(), self.transport.clone())
    }

    /// The coordinator's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The coordinator's log so far.
    pub fn log_tail(&self, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// What /proc says now.
    pub fn sample(&self) -> anyhow::Result<ProcSample> {
        ProcSample::read(self.pid())
    }

    /// CPU used over `window`, as a percentage of one core.
    pub async fn cpu_over(&self, window: Duration) -> anyhow::Result<f64> {
        let a = self.sample()?;
        tokio::time::sleep(window).await;
        let b = self.sample()?;
        Ok(b.cpu_percent_since(&a))
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `SERIN_BENCH_KEEP_LOG=PATH`: the coordinator's log is copied there before its
        // directory goes (with `SERIN_BENCH_COORDINATOR_LOG=info`, the engine's work counters
        // are in its "rollout finished" line).
        if let Some(keep) = std::env::var_os("SERIN_BENCH_KEEP_LOG") {
            let _ = std::fs::copy(self.dir.path().join("coordinator.log"), keep);
        }
    }
}

/// Clock ticks per second of /proc/<pid>/stat times (100 on every Linux this runs on).
const CLK_TCK: f64 = 100.0;

/// Memory, CPU time and descriptors of a process at one instant.
#[derive(Debug, Clone)]
pub struct ProcSample {
    /// When it was taken.
    pub at: Instant,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    /// User + system CPU time in clock ticks.
    pub cpu_ticks: u64,
    /// Open file descriptors.
    pub fds: u64,
}

impl ProcSample {
    /// Reads /proc/<pid>/{status,stat,fd}.
    pub fn read(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("process {pid} is gone"))?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS in /proc/<pid>/status")?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may contain spaces) start at field 3.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("malformed /proc/<pid>/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields
            .get(11)
            .and_then(|v| v.parse().ok())
            .context("utime")?;
        let stime: u64 = fields
            .get(12)
            .and_then(|v| v.parse().ok())
            .context("stime")?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
        Ok(Self {
            at: Instant::now(),
            rss_bytes: rss_kib * 1024,
            cpu_ticks: utime + stime,
            fds,
        })
    }

    /// CPU used between `earlier` and this sample, as a percentage of one core.
    pub fn cpu_percent_since(&self, earlier: &ProcSample) -> f64 {
        let secs = self.at.duration_since(earlier.at).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        (self.cpu_ticks.saturating_sub(earlier.cpu_ticks)) as f64 / CLK_TCK / secs * 100.0
    }
}

/// Samples a process's RSS every 50 ms in the background and keeps the peak.
#[derive(Debug)]
pub struct PeakRss {
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<u64>,
}

impl PeakRss {
    /// Starts sampling `pid`.
    pub fn start(pid: u32) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            let mut peak = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                if let Ok(s) = ProcSample::read(pid) {
                    peak = peak.max(s.rss_bytes);
                }
                tokio::select! {
                    () = token.cancelled() => return peak,
                    _ = tick.tick() => {}
                }
            }
        });
        Self { stop, handle }
    }

    /// Stops sampling and returns the peak RSS in bytes.
    pub async fn finish(self) -> u64 {
        self.stop.cancel();
        self.handle.await.unwrap_or(0)
    }
}
