//! A real `serin-agent` process under test, with its own config, state directory and log.
//!
//! [`AgentProc::start`] writes a config (a unique host id, a tempdir state directory, one
//! supervised service running the demo service on a free port with an HTTP check on `/healthz`
//! every 200 ms) and starts `serin-agent --config`, its stdout and stderr appended to a log file.
//! A test can SIGKILL it, SIGTERM it and start it again (optionally with `SERIN_AGENT_CRASH_AT`),
//! and read what is on disk: the `current` symlink, `releases/`, `staging/`, `release.json`.
//!
//! Dropping the handle SIGKILLs the agent and every process of the supervised service (the
//! process group recorded in `supervisor.json`, and any process whose executable lies in the state
//! directory), so nothing leaks even when a test panics.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::{binaries, http, wait};

/// Name of the service every test agent manages.
pub const SERVICE: &str = "demo";

/// A free TCP port on 127.0.0.1 for a service to listen on later, never the same one twice in
/// this process.
///
/// It is taken below the kernel's ephemeral range (`ip_local_port_range`): a port from that range
/// that is free now can become the local port of any outgoing connection on the machine before
/// the service binds it (seen: two demo services unable to bind for seconds while a fleet
/// simulator ran next to the tests). Below the range only explicit binds compete.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    let span = u32::from(high - low);
    // Start somewhere that differs between test processes, then walk.
    let start = (std::process::id().wrapping_mul(7919) % span) as u16;
    let mut given = lock(&GIVEN);
    let given = given.get_or_insert_with(HashSet::new);
    for i in 0..span {
        let port = low + ((u32::from(start) + i * 37) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    // Everything below the ephemeral range is taken: fall back to the kernel's choice.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free loopback port")
}

/// A host id unique to this test process and call: `<name>-<pid>-<n>`.
pub fn unique_host_id(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(60)
        .collect();
    format!(
        "{clean}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// What goes into a test agent's config.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Names the test; the host id is derived from it.
    pub name: String,
    /// `keep_releases` of the service.
    pub keep_releases: u32,
    /// Directory to create the agent's tempdir in (default: the system temp dir). The
    /// insufficient-space test puts it on a small filesystem.
    pub temp_parent: Option<PathBuf>,
    /// The `[[service.check]]` tables; `{port}` is replaced with the service's port.
    pub checks_toml: String,
    /// Extra top-level TOML keys, put before any table.
    pub extra_top_toml: String,
}

impl AgentOptions {
    /// Defaults for a test named `name`: keep 3 releases, an HTTP check every 200 ms that turns
    /// failing after 2 failures.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            keep_releases: 3,
            temp_parent: None,
            checks_toml: r#"
[[service.check]]
name = "http"
kind = "http"
url = "http://127.0.0.1:{port}/healthz"
interval = "200ms"
timeout = "500ms"
failure_threshold = 2
success_threshold = 1
"#
            .to_owned(),
            extra_top_toml: String::new(),
        }
    }
}

/// The agent's `tls` key for `coordinator_url`: this host's certificate from the harness PKI
/// for `https://` (the default of every coordinator and fake the harness starts), explicit
/// development plaintext for `http://` (a test that puts a byte-level proxy in front).
pub fn agent_tls_toml(coordinator_url: &str, host_id: &str) -> String {
    agent_tls_toml_with(crate::tls::pki(), coordinator_url, host_id)
}

/// [`agent_tls_toml`] with the certificates of `pki`.
pub fn agent_tls_toml_with(
    pki: &crate::tls::TestPki,
    coordinator_url: &str,
    host_id: &str,
) -> String {
    if coordinator_url.starts_with("https://") {
        let f = pki.agent(host_id);
        format!(
            "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
            f.ca.display(),
            f.cert.display(),
            f.key.display()
        )
    } else {
        "tls = { insecure_plaintext = true }".to_owned()
    }
}

/// The agent's config file for `opts`; its `tls` key follows the URL's scheme
/// ([`agent_tls_toml`]).
pub fn config_toml(
    opts: &AgentOptions,
    coordinator_url: &str,
    state_dir: &Path,
    host_id: &str,
    port: u16,
) -> String {
    format!(
        r#"coordinator = "{coordinator_url}"
{tls}
state_dir = "{state}"
host_id = "{host_id}"
hostname = "{host_id}"
heartbeat_interval = "500ms"
report_interval = "1s"
reconnect_initial = "100ms"
reconnect_max = "1s"
{extra}
[labels]
test = "{name}"

[[service]]
name = "{SERVICE}"
binary = "{SERVICE}"
keep_releases = {keep}
stop_timeout = "2s"

[service.run]
kind = "process"
args = ["--port", "{port}"]
{checks}"#,
        tls = agent_tls_toml(coordinator_url, host_id),
        state = state_dir.display(),
        extra = opts.extra_top_toml,
        name = opts.name,
        keep = opts.keep_releases,
        checks = opts.checks_toml.replace("{port}", &port.to_string()),
    )
}

/// A running (or stopped) `serin-agent` process; see the module docs.
pub struct AgentProc {
    /// The host id in its config.
    pub host_id: String,
    /// The port its demo service listens on.
    pub port: u16,
    dir: tempfile::TempDir,
    state_dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
    starts: AtomicU32,
    /// Variables the next starts set (fault injection in a test build).
    env: Mutex<Vec<(String, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AgentProc {
    /// Writes the config for `opts` and starts the agent against `coordinator_url`.
    pub fn start(coordinator_url: &str, opts: &AgentOptions) -> Self {
        let agent = Self::configure(coordinator_url, opts);
        agent.spawn(None);
        agent
    }

    /// Writes the config for `opts` without starting the agent.
    pub fn configure(coordinator_url: &str, opts: &AgentOptions) -> Self {
        let dir = match &opts.temp_parent {
            Some(parent) => tempfile::Builder::new()
                .prefix("serin-agent-test")
                .tempdir_in(parent),
            None => tempfile::Builder::new()
                .prefix("serin-agent-test")
                .tempdir(),
        }
        .expect("creating the agent's tempdir");
        let root = dir
            .path()
            .canonicalize()
            .expect("canonical path of the tempdir");
        let state_dir = root.join("state");
        let host_id = unique_host_id(&opts.name);
        let port = free_port();
        let config_path = root.join("agent.toml");
        std::fs::write(
            &config_path,
            config_toml(opts, coordinator_url, &state_dir, &host_id, port),
        )
        .expect("writing the agent config");
        Self {
            host_id,
            port,
            state_dir,
            config_path,
            log_path: root.join("agent.log"),
            dir,
            child: Mutex::new(None),
            starts: AtomicU32::new(0),
            env: Mutex::new(Vec::new()),
        }
    }

    /// Starts the agent process (it must not be running), with `SERIN_AGENT_CRASH_AT=crash_at`
    /// when given. Crash points exist only in the test build of the agent, so with `crash_at`
    /// that build ([`binaries::fault_agent`]) runs, otherwise the product binary.
    pub fn spawn(&self, crash_at: Option<&str>) {
        let binary = if crash_at.is_some() {
            binaries::fault_agent()
        } else {
            binaries::agent()
        };
        self.spawn_binary(&binary, crash_at);
    }

    /// [`spawn`](Self::spawn) of a given agent binary, with `SERIN_AGENT_CRASH_AT=crash_at` when
    /// given, whatever the binary (e.g. to prove that the product binary ignores it).
    pub fn spawn_binary(&self, binary: &Path, crash_at: Option<&str>) {
        let mut child = lock(&self.child);
        if let Some(c) = child.as_mut() {
            assert!(
                c.try_wait().ok().flatten().is_some(),
                "agent {} is already running",
                self.host_id
            );
        }
        let n = self.starts.fetch_add(1, Ordering::SeqCst) + 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("opening the agent log");
        {
            use std::io::Write;
            let _ = writeln!(
                log,
                "===== harness: start #{n} of serin-agent{} =====",
                crash_at
                    .map(|p| format!(" with SERIN_AGENT_CRASH_AT={p}"))
                    .unwrap_or_default()
            );
        }
        let err = log.try_clone().expect("cloning the agent log handle");
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .env_remove("SERIN_AGENT_CRASH_AT")
            .env_remove("SERIN_CHAOS")
            .envs(lock(&self.env).iter().map(|(k, v)| (k, v)))
            // Plain log lines in the dumps.
            .env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() && std::env::var_os("SERIN_LOG").is_none() {
            cmd.env("RUST_LOG", "info,serin_agent=debug");
        }
        if let Some(points) = crash_at {
            cmd.env("SERIN_AGENT_CRASH_AT", points);
        }
        *child = Some(cmd.spawn().expect("starting serin-agent"));
    }

    /// Makes the next starts set `key=value` (`None`: no longer set it), e.g. `SERIN_CHAOS` for
    /// the test build of the agent.
    pub fn set_env(&self, key: &str, value: Option<&str>) {
        let mut env = lock(&self.env);
        env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            env.push((key.to_owned(), v.to_owned()));
        }
    }

    /// Runs `serin-agent check-config --config <this agent's config>`.
    pub fn check_config(&self) -> std::process::Output {
        Command::new(binaries::agent())
            .arg("check-config")
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .expect("running serin-agent check-config")
    }

    /// Whether the agent process is alive.
    pub fn is_running(&self) -> bool {
        lock(&self.child)
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The agent's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    /// SIGKILLs the agent and reaps it (a no-op when it is not running).
    pub fn kill(&self) {
        if let Some(mut c) = lock(&self.child).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs the agent and waits up to `timeout` for it to exit; returns its exit status.
    pub fn terminate(&self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut guard = lock(&self.child);
        let Some(c) = guard.as_mut() else {
            bail!("agent {} was not started", self.host_id);
        };
        let pid = Pid::from_raw(i32::try_from(c.id()).context("agent pid")?);
        let _ = signal::kill(pid, Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait()? {
                guard.take();
                return Ok(status);
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                guard.take();
                bail!(
                    "agent {} did not exit within {timeout:?} of SIGTERM (killed it)",
                    self.host_id
                );
            }
            std::thread::sleep(wait::POLL);
        }
    }

    /// Waits up to `timeout` for the agent to exit on its own (e.g. a fault-injection crash).
    pub fn wait_exit(&self, timeout: Duration, dump: &dyn Fn() -> String) -> ExitStatus {
        wait::wait_for_value(
            &format!("agent {} to exit", self.host_id),
            timeout,
            dump,
            || {
                let mut guard = lock(&self.child);
                let status = guard.as_mut()?.try_wait().ok().flatten()?;
                guard.take();
                Some(status)
            },
        )
    }

    /// Kills the agent and starts it again (optionally with `SERIN_AGENT_CRASH_AT`).
    pub fn restart(&self, crash_at: Option<&str>) {
        self.kill();
        self.spawn(crash_at);
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The tempdir holding the config, log and state.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// `<state_dir>/<service>`.
    pub fn service_dir(&self) -> PathBuf {
        self.state_dir.join(SERVICE)
    }

    /// The release `current` points at, if the symlink exists.
    pub fn current_release(&self) -> Option<String> {
        let target = std::fs::read_link(self.service_dir().join("current")).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    /// The raw target of the `current` symlink.
    pub fn current_target(&self) -> Option<PathBuf> {
        std::fs::read_link(self.service_dir().join("current")).ok()
    }

    /// The directories in `releases/`, sorted.
    pub fn releases(&self) -> Vec<String> {
        list_dir(&self.service_dir().join("releases"))
    }

    /// The entries of `staging/`, sorted.
    pub fn staging_entries(&self) -> Vec<String> {
        list_dir(&self.service_dir().join("staging"))
    }

    /// `releases/<id>/release.json`, parsed.
    pub fn release_json(&self, id: &str) -> anyhow::Result<serde_json::Value> {
        let path = self
            .service_dir()
            .join("releases")
            .join(id)
            .join("release.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Checks that release `id` is complete: its artifact exists, is executable, and matches the
    /// sha256 and size of its `release.json`, which names this service and release.
    pub fn verify_release(&self, id: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let meta = self.release_json(id)?;
        let dir = self.service_dir().join("releases").join(id);
        let artifact = dir.join(SERVICE);
        let bytes =
            std::fs::read(&artifact).with_context(|| format!("reading {}", artifact.display()))?;
        let mode = std::fs::metadata(&artifact)?.permissions().mode();
        if mode & 0o111 == 0 {
            bail!("{} is not executable (mode {mode:o})", artifact.display());
        }
        let sha = crate::demo_release::sha256_hex(&bytes);
        if meta["sha256"].as_str() != Some(sha.as_str()) {
            bail!(
                "release {id}: artifact sha256 {sha} does not match release.json {}",
                meta["sha256"]
            );
        }
        if meta["size"].as_u64() != Some(bytes.len() as u64) {
            bail!(
                "release {id}: artifact size {} does not match release.json {}",
                bytes.len(),
                meta["size"]
            );
        }
        if meta["id"].as_str() != Some(id) || meta["service"].as_str() != Some(SERVICE) {
            bail!("release {id}: release.json names another release: {meta}");
        }
        Ok(())
    }

    /// `<state_dir>/<service>/state.json`, parsed.
    pub fn state_json(&self) -> anyhow::Result<serde_json::Value> {
        let path = self.service_dir().join("state.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The pid recorded in `supervisor.json`.
    pub fn supervisor_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.service_dir().join("supervisor.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        i32::try_from(v["pid"].as_i64()?).ok()
    }

    /// What the demo service answers on `GET /version`.
    pub fn version(&self) -> anyhow::Result<String> {
        http::version(self.port)
    }

    /// The pid of the demo service process answering on its port.
    pub fn service_pid(&self) -> anyhow::Result<u32> {
        http::pid(self.port)
    }

    /// Live processes whose executable lies in this agent's state directory (the service).
    pub fn service_processes(&self) -> Vec<i32> {
        processes_under(&self.state_dir)
    }

    /// The last `lines` lines of the agent's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    /// The whole agent log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The agent's log tail, the service's log tail and what is on disk, for failure messages.
    pub fn dump(&self) -> String {
        let mut out = format!(
            "--- agent {} (running: {}, state {}) ---\n",
            self.host_id,
            self.is_running(),
            self.state_dir.display()
        );
        let _ = writeln!(
            out,
            "current -> {:?}; releases {:?}; staging {:?}; supervisor pid {:?}; service processes {:?}; /version {:?}",
            self.current_target(),
            self.releases(),
            self.staging_entries(),
            self.supervisor_pid(),
            self.service_processes(),
            self.version().map_err(|e| format!("{e:#}"))
        );
        if let Ok(state) = std::fs::read_to_string(self.service_dir().join("state.json")) {
            let _ = writeln!(out, "state.json: {}", truncate(&state, 3000));
        }
        let _ = writeln!(
            out,
            "--- agent log (last 80 lines) ---\n{}",
            self.log_tail(80)
        );
        let _ = writeln!(
            out,
            "--- service log (last 15 lines) ---\n{}",
            tail(&self.service_dir().join("service.log"), 15)
        );
        out
    }

    /// SIGKILLs every process of the supervised service.
    pub fn kill_service(&self) {
        if let Some(pid) = self.supervisor_pid().filter(|p| *p > 1) {
            let _ = signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for pid in self.service_processes() {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
        self.kill_service();
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn list_dir(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no {})", path.display());
    };
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut f, &mut text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Live processes whose executable (`/proc/<pid>/exe`) lies under `dir`.
pub fn processes_under(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in rd.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if exe.starts_with(dir) && !is_zombie(pid) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}
