//! A real fleet for end-to-end tests of the coordinator: one `serin serve` process and N
//! `serin-agent` processes, each supervising the demo service.
//!
//! [`Fleet::start`] starts a coordinator on a free loopback port with its own state directory
//! and a config with fast heartbeats ([`CoordinatorProc`]), then one agent per entry of `zones`
//! (label `zone=<entry>`), waits until every agent is connected, and (unless asked not to)
//! installs release `v1` everywhere with a first fast rollout.
//!
//! Tests drive the fleet as an operator would: [`Fleet::cli`] runs the `serin` CLI against the
//! coordinator (`-o json` answers are parsed by [`Fleet::cli_json`]); [`Fleet::status`] asks
//! `GetRollout` over gRPC for polling. Every host carries an extra `command` health check that
//! fails while its `current` release is marked bad for that host ([`FleetHost::fail_release`]),
//! so a test decides exactly which hosts fail which release.
//!
//! A monitor thread samples every host's `current` symlink, `releases/` directory and
//! `GET /version` every [`MONITOR_PERIOD`], so tests assert on the whole history ("this host never
//! had release v2 on disk", "wave 2 only activated after wave 1's gate") rather than on the end
//! state only.
//!
//! Dropping the fleet SIGKILLs the agents, their supervised services and the coordinator; when
//! the drop happens during a panic it first prints the coordinator's log tail and every host's
//! dump, so a failing test says what the fleet was doing.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serin_proto::wire::{self, control_service_client::ControlServiceClient};
use tonic::transport::Channel;

use crate::agent_proc::{AgentOptions, AgentProc, SERVICE};
use crate::demo_release::{self, Behaviour, DemoRelease};
use crate::proxy::Link;
use crate::{binaries, http, wait};

/// How often the monitor samples every host.
pub const MONITOR_PERIOD: Duration = Duration::from_millis(30);

/// Default timeout of the fleet's waits.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Heartbeat interval the test coordinator gives agents.
pub const HEARTBEAT: &str = "300ms";

/// How long the test coordinator waits before it declares a silent host unreachable.
pub const UNREACHABLE_AFTER: &str = "2s";

/// The release id every fleet is bootstrapped to.
pub const BASELINE: &str = "v1";

/// Milliseconds since the Unix epoch, on the same clock the coordinator stamps decisions with.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tail_file(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Releases

/// The demo service's executable image for fleet releases: stripped of its debug info when
/// `strip` is available (2 MB instead of 10 MB: every push, download and hash of a release is
/// five times cheaper), else the image as built.
fn demo_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let built = binaries::demo_service();
        let out = tempfile::NamedTempFile::new().expect("a tempfile for the stripped demo service");
        let stripped = Command::new("strip")
            .arg("-o")
            .arg(out.path())
            .arg(&built)
            .status()
            .is_ok_and(|s| s.success());
        let path = if stripped {
            out.path()
        } else {
            built.as_path()
        };
        std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    })
}

/// A release of the demo service with `behaviour` (its id is the behaviour's version): the same
/// bytes `serin-demo-service make-release` writes, made from the stripped image.
pub fn release(behaviour: Behaviour) -> DemoRelease {
    let bytes = demo_release::with_trailer(demo_image(), &behaviour)
        .expect("appending the behaviour trailer");
    DemoRelease::from_bytes(behaviour, bytes)
}

/// The hosts of each wave of a `serin rollout plan -o json` answer (its `waves` array), in order.
pub fn planned_waves(waves: &serde_json::Value) -> Vec<std::collections::BTreeSet<String>> {
    waves
        .as_array()
        .expect("a waves array")
        .iter()
        .map(|w| {
            w["host_ids"]
                .as_array()
                .expect("host_ids")
                .iter()
                .map(|h| h.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .collect()
}

/// The hosts of each wave that a rollout ran, by wave index.
pub fn waves_run(s: &wire::RolloutStatus) -> Vec<std::collections::BTreeSet<String>> {
    (0..s.waves.len() as u32)
        .map(|w| {
            s.hosts
                .iter()
                .filter(|h| h.wave == w)
                .map(|h| h.host_id.clone())
                .collect()
        })
        .collect()
}

/// A healthy release answering `id` on `/version`.
pub fn healthy(id: &str) -> DemoRelease {
    release(Behaviour::healthy(id))
}

/// The environment that gives the `serin` CLI an operator certificate (`SERIN_CA`, `SERIN_CERT`,
/// `SERIN_KEY`), with the per-user config file out of the way.
pub fn operator_env(files: &serin_security::tls::TlsFiles) -> Vec<(String, String)> {
    vec![
        ("SERIN_CA".into(), files.ca.display().to_string()),
        ("SERIN_CERT".into(), files.cert.display().to_string()),
        ("SERIN_KEY".into(), files.key.display().to_string()),
        ("XDG_CONFIG_HOME".into(), "/nonexistent-serin-test".into()),
    ]
}

// ---------------------------------------------------------------------------------------------
// The coordinator process

/// A real `serin serve` process with its own port, state directory, config and log file.
///
/// It can be SIGKILLed and started again on the same port and state directory, as an operator's
/// systemd would after a crash.
pub struct CoordinatorProc {
    dir: tempfile::TempDir,
    ip: std::net::Ipv4Addr,
    port: u16,
    state_dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
    starts: AtomicU32,
    /// The binary the next start runs instead of the product `serin` (a test build).
    binary: Mutex<Option<PathBuf>>,
    /// Variables the next starts set (fault injection in a test build).
    env: Mutex<Vec<(String, String)>>,
}

/// A loopback address of this coordinator's own and a free port on it. A port released on
/// 127.0.0.1 can be taken by any process on the machine before the coordinator binds it (seen:
/// "Address already in use" while several suites ran at once); on an address of its own, taken
/// from 127.0.0.0/8 by process id and a counter, only this coordinator listens, also across its
/// restarts.
fn own_address() -> (std::net::Ipv4Addr, u16) {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    let ip = std::net::Ipv4Addr::new(
        127,
        100 + (pid % 150) as u8,
        ((pid / 150) % 250) as u8 + 1,
        (n % 250) as u8 + 1,
    );
    let port = std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port on a loopback address of its own");
    (ip, port)
}

impl CoordinatorProc {
    /// Writes a config (fast heartbeats) and starts the coordinator; returns once it answers
    /// gRPC calls.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("serin-coordinator-test")
            .tempdir()
            .expect("creating the coordinator's tempdir");
        let root = dir.path().canonicalize().expect("canonical tempdir path");
        let (ip, port) = own_address();
        let state_dir = root.join("state");
        let config_path = root.join("coordinator.toml");
        std::fs::write(
            &config_path,
            format!(
                "listen = \"{ip}:{port}\"\nstate_dir = \"{}\"\nheartbeat_interval = \"{HEARTBEAT}\"\nunreachable_after = \"{UNREACHABLE_AFTER}\"\n{}",
                state_dir.display(),
                crate::tls::tls_toml(&crate::tls::pki().coordinator(ip.into()))
            ),
        )
        .expect("writing the coordinator config");
        let c = Self {
            log_path: root.join("coordinator.log"),
            dir,
            ip,
            port,
            state_dir,
            config_path,
            child: Mutex::new(None),
            starts: AtomicU32::new(0),
            binary: Mutex::new(None),
            env: Mutex::new(Vec::new()),
        };
        c.spawn();
        c
    }

    /// The address it listens on (the same across restarts).
    pub fn addr(&self) -> std::net::SocketAddr {
        (self.ip, self.port).into()
    }

    /// The URL agents and the CLI dial (mutual TLS).
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.ip, self.port)
    }

    /// The config file `serin serve` runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The coordinator's state directory (store.redb, artifacts/).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The tempdir holding config, log and state.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the process (it must not be running) and waits until it answers `ListHosts`.
    pub fn spawn(&self) {
        let mut child = lock(&self.child);
        if let Some(c) = child.as_mut() {
            assert!(
                c.try_wait().ok().flatten().is_some(),
                "the coordinator is already running"
            );
        }
        let n = self.starts.fetch_add(1, Ordering::SeqCst) + 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("opening the coordinator log");
        {
            use std::io::Write;
            let _ = writeln!(log, "===== harness: start #{n} of serin serve =====");
        }
        let err = log.try_clone().expect("cloning the coordinator log handle");
        let binary = lock(&self.binary).clone().unwrap_or_else(binaries::serin);
        let mut cmd = Command::new(binary);
        cmd.env_remove("SERIN_COORDINATOR_CRASH_AT")
            .env_remove("SERIN_CHAOS")
            .envs(lock(&self.env).iter().map(|(k, v)| (k, v)));
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() && std::env::var_os("SERIN_LOG").is_none() {
            cmd.env("SERIN_LOG", "info,serin_coordinator=debug");
        }
        *child = Some(cmd.spawn().expect("starting serin serve"));
        drop(child);
        self.wait_ready(n);
    }

    /// Waits until start number `n` printed its listening line and answers gRPC.
    fn wait_ready(&self, n: u32) {
        let marker = format!("===== harness: start #{n} of serin serve =====");
        wait::wait_for(
            "the coordinator to listen and answer ListHosts",
            Duration::from_secs(20),
            &|| self.dump(),
            || {
                if !self.is_running() {
                    panic!("the coordinator exited during start #{n}\n{}", self.dump());
                }
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                let Some((_, this_start)) = log.split_once(&marker) else {
                    return false;
                };
                this_start.contains("serin coordinator listening on") && self.answers_grpc()
            },
        );
    }

    fn answers_grpc(&self) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let url = self.url();
        let transport =
            crate::tls::TestPki::client_transport(&crate::tls::pki().harness_operator());
        rt.block_on(async move {
            let Ok(ch) = crate::tls::channel(&url, &transport, Duration::from_millis(500)).await
            else {
                return false;
            };
            ControlServiceClient::new(ch)
                .list_hosts(wire::ListHostsRequest::default())
                .await
                .is_ok()
        })
    }

    /// Makes the next starts run `binary` (a test build, e.g. [`binaries::fault_coordinator`]);
    /// `None` goes back to the product binary.
    pub fn set_binary(&self, binary: Option<PathBuf>) {
        *lock(&self.binary) = binary;
    }

    /// Makes the next starts set `key=value` (`None`: no longer set it).
    pub fn set_env(&self, key: &str, value: Option<&str>) {
        let mut env = lock(&self.env);
        env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            env.push((key.to_owned(), v.to_owned()));
        }
    }

    /// Waits until the process exits by itself (e.g. at a crash point) and reaps it; panics
    /// after `timeout`, with `dump`.
    pub fn wait_exit(
        &self,
        timeout: Duration,
        dump: &dyn Fn() -> String,
    ) -> std::process::ExitStatus {
        wait::wait_for_value("the coordinator to exit", timeout, dump, || {
            let mut child = lock(&self.child);
            let status = child.as_mut()?.try_wait().ok().flatten()?;
            child.take();
            Some(status)
        })
    }

    /// Whether the process is alive.
    pub fn is_running(&self) -> bool {
        lock(&self.child)
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGKILLs the coordinator and reaps it (a no-op when it is not running).
    pub fn kill(&self) {
        if let Some(mut c) = lock(&self.child).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILLs the coordinator and starts it again on the same port and state directory.
    pub fn restart(&self) {
        self.kill();
        self.spawn();
    }

    /// The whole log, every start included.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log_path, lines)
    }

    /// The log tail, for failure messages.
    pub fn dump(&self) -> String {
        format!(
            "--- coordinator {} (running: {}, starts: {}) log tail ---\n{}\n",
            self.url(),
            self.is_running(),
            self.starts.load(Ordering::SeqCst),
            self.log_tail(60)
        )
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Hosts

/// One agent of the fleet with its zone and its per-host failure switch.
pub struct FleetHost {
    /// The agent process (its host id, port, state directory, log).
    pub agent: AgentProc,
    /// Its `zone` label.
    pub zone: String,
    fail_dir: PathBuf,
    /// Whether the host carries [`RELEASE_GATE_CHECK`] (not in a fleet started with
    /// [`Fleet::start_for_timing`]).
    gated: bool,
    /// The link the agent reaches the coordinator through, in a fleet started with
    /// [`Fleet::start_linked`] (dropped after the agent: field order).
    link: Option<Link>,
}

/// The `[[service.check]]` every fleet host has besides the HTTP check: a command that fails
/// while `current` names a release marked bad in the host's fail directory.
const RELEASE_GATE_CHECK: &str = r#"
[[service.check]]
name = "release-gate"
kind = "command"
command = ["/bin/sh", "{gate_script}"]
interval = "300ms"
timeout = "2s"
failure_threshold = 1
success_threshold = 1
"#;

impl FleetHost {
    fn start(
        coordinator: &CoordinatorProc,
        instruments: Instruments,
        test: &str,
        zone: &str,
        service_toml: &str,
    ) -> Self {
        let Instruments { linked, gated, .. } = instruments;
        let mut opts = AgentOptions::new(test);
        if gated {
            opts.checks_toml.push_str(RELEASE_GATE_CHECK);
        }
        opts.checks_toml.push_str(service_toml);
        let link = linked.then(|| Link::start(coordinator.addr()));
        let url = link
            .as_ref()
            .map_or_else(|| coordinator.url(), |l| l.url(&coordinator.url()));
        let agent = AgentProc::configure(&url, &opts);
        let root = agent.root().canonicalize().expect("canonical agent root");
        let fail_dir = root.join("fail-releases");
        std::fs::create_dir_all(&fail_dir).expect("creating the fail-releases directory");
        let script = root.join("release-gate.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n# Fails while current points at a release marked bad for this host.\nr=$(readlink '{current}') || exit 0\nr=${{r##*/}}\n[ ! -e '{fail}/'\"$r\" ]\n",
                current = agent.service_dir().join("current").display(),
                fail = fail_dir.display()
            ),
        )
        .expect("writing the release gate script");
        let config = std::fs::read_to_string(agent.config_path()).expect("reading agent config");
        let config = config
            .replace("[labels]\n", &format!("[labels]\nzone = \"{zone}\"\n"))
            .replace("{gate_script}", &script.display().to_string());
        assert!(
            config.contains(&format!("zone = \"{zone}\"")),
            "the agent config has a [labels] table to add the zone to:\n{config}"
        );
        std::fs::write(agent.config_path(), config).expect("rewriting the agent config");
        agent.spawn(None);
        Self {
            agent,
            zone: zone.to_owned(),
            fail_dir,
            gated,
            link,
        }
    }

    /// The link between this host's agent and the coordinator (a fleet started with
    /// [`Fleet::start_linked`]): cut it to partition the host, heal it to end the partition.
    pub fn link(&self) -> &Link {
        self.link
            .as_ref()
            .expect("a host of a fleet started with Fleet::start_linked")
    }

    /// The host id.
    pub fn id(&self) -> &str {
        &self.agent.host_id
    }

    /// Makes this host's health checks fail whenever it runs release `id`.
    pub fn fail_release(&self, id: &str) {
        assert!(
            self.gated,
            "host {} has no release-gate check (a fleet started for timing)",
            self.id()
        );
        std::fs::write(self.fail_dir.join(id), b"").expect("marking a release bad");
    }

    /// Undoes [`fail_release`](Self::fail_release).
    pub fn heal_release(&self, id: &str) {
        let _ = std::fs::remove_file(self.fail_dir.join(id));
    }

    /// SIGKILLs the agent and its supervised service: the host is gone.
    pub fn kill(&self) {
        self.agent.kill();
        self.agent.kill_service();
    }

    /// Starts the agent again (after [`kill`](Self::kill)).
    pub fn revive(&self) {
        self.agent.spawn(None);
    }
}

// ---------------------------------------------------------------------------------------------
// The monitor

/// A change of a host's `current` release seen by the monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// When the monitor saw it (Unix ms); the real change happened at most one period earlier.
    pub at_unix_ms: u64,
    /// Index of the host in [`Fleet::hosts`].
    pub host: usize,
    /// The release `current` now names (`None`: no symlink).
    pub current: Option<String>,
}

/// Everything the monitor saw.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// Every change of `current`, in order.
    pub transitions: Vec<Transition>,
    /// Per host: every directory ever seen in `releases/`.
    pub releases_seen: Vec<BTreeSet<String>>,
    /// Per host: every answer of `GET /version` ever seen.
    pub versions_seen: Vec<BTreeSet<String>>,
}

impl History {
    /// How many times host `host` switched `current` to `release`.
    pub fn activations(&self, host: usize, release: &str) -> usize {
        self.transitions
            .iter()
            .filter(|t| t.host == host && t.current.as_deref() == Some(release))
            .count()
    }

    /// When host `host` first switched to `release`.
    pub fn first_activation(&self, host: usize, release: &str) -> Option<u64> {
        self.transitions
            .iter()
            .find(|t| t.host == host && t.current.as_deref() == Some(release))
            .map(|t| t.at_unix_ms)
    }

    /// Whether host `host` ever had `release` current or serving (a release only staged on
    /// disk, ahead of the host's wave, does not count: prepare, then activate).
    pub fn ever_ran(&self, host: usize, release: &str) -> bool {
        self.versions_seen[host].contains(release) || self.activations(host, release) > 0
    }

    /// Whether host `host` ever had `release` on disk or serving.
    pub fn ever_had(&self, host: usize, release: &str) -> bool {
        self.releases_seen[host].contains(release)
            || self.versions_seen[host].contains(release)
            || self.activations(host, release) > 0
    }
}

struct MonitoredHost {
    service_dir: PathBuf,
    port: u16,
}

struct Monitor {
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    fn start(hosts: Vec<MonitoredHost>) -> Self {
        let history = Arc::new(Mutex::new(History {
            transitions: Vec::new(),
            releases_seen: vec![BTreeSet::new(); hosts.len()],
            versions_seen: vec![BTreeSet::new(); hosts.len()],
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (history, stop) = (history.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut last: Vec<Option<Option<String>>> = vec![None; hosts.len()];
                let mut round: u64 = 0;
                while !stop.load(Ordering::SeqCst) {
                    for (i, h) in hosts.iter().enumerate() {
                        let current = std::fs::read_link(h.service_dir.join("current"))
                            .ok()
                            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
                        let releases = list_dir(&h.service_dir.join("releases"));
                        // /version costs a connection: every third round is enough.
                        let version = if round.is_multiple_of(3) {
                            http::get(h.port, "/version", Duration::from_millis(300))
                                .ok()
                                .filter(|(status, _)| *status == 200)
                                .map(|(_, body)| body.trim().to_owned())
                        } else {
                            None
                        };
                        let mut hist = lock(&history);
                        if last[i].as_ref() != Some(&current) {
                            hist.transitions.push(Transition {
                                at_unix_ms: now_ms(),
                                host: i,
                                current: current.clone(),
                            });
                            last[i] = Some(current);
                        }
                        hist.releases_seen[i].extend(releases);
                        if let Some(v) = version {
                            hist.versions_seen[i].insert(v);
                        }
                    }
                    round += 1;
                    std::thread::sleep(MONITOR_PERIOD);
                }
            })
        };
        Self {
            history,
            stop,
            thread: Some(thread),
        }
    }

    fn snapshot(&self) -> History {
        lock(&self.history).clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn list_dir(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

// ---------------------------------------------------------------------------------------------
// CLI output

/// What one `serin` CLI run produced.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The arguments, for messages.
    pub args: Vec<String>,
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// The JSON documents printed on stdout (one per response message with `-o json`).
    pub fn json_docs(&self) -> Vec<serde_json::Value> {
        serde_json::Deserializer::from_str(&self.stdout)
            .into_iter::<serde_json::Value>()
            .map(|v| {
                v.unwrap_or_else(|e| {
                    panic!(
                        "serin {:?} printed invalid JSON ({e}):\n{}",
                        self.args, self.stdout
                    )
                })
            })
            .collect()
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "serin {} -> exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet

/// Fast timings for rollouts in tests: the flags of `serin rollout start|plan`.
#[derive(Debug, Clone)]
pub struct Timings {
    /// `--bake`.
    pub bake: &'static str,
    /// `--canary-bake` (None: same as bake).
    pub canary_bake: Option<&'static str>,
    /// `--min-healthy`.
    pub min_healthy: &'static str,
    /// `--healthy-deadline`.
    pub healthy_deadline: &'static str,
    /// `--progress-deadline`.
    pub progress_deadline: &'static str,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            bake: "1s",
            canary_bake: None,
            min_healthy: "800ms",
            healthy_deadline: "6s",
            progress_deadline: "30s",
        }
    }
}

impl Timings {
    /// The timing flags.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--bake".to_owned(),
            self.bake.to_owned(),
            "--min-healthy".to_owned(),
            self.min_healthy.to_owned(),
            "--healthy-deadline".to_owned(),
            self.healthy_deadline.to_owned(),
            "--progress-deadline".to_owned(),
            self.progress_deadline.to_owned(),
        ];
        if let Some(c) = self.canary_bake {
            a.push("--canary-bake".to_owned());
            a.push(c.to_owned());
        }
        a
    }
}

/// What the harness adds to each host and to the fleet, for tests to observe and steer it.
#[derive(Clone, Copy)]
struct Instruments {
    /// Each agent reaches the coordinator through a [`Link`] the test can cut.
    linked: bool,
    /// Each host carries [`RELEASE_GATE_CHECK`].
    gated: bool,
    /// A [`Monitor`] samples every host.
    monitored: bool,
}

impl Instruments {
    /// What tests get: the gate check and the monitor, no links.
    const ALL: Self = Self {
        linked: false,
        gated: true,
        monitored: true,
    };
}

/// A coordinator, its agents and a monitor; see the module docs.
///
/// Field order is drop order: the monitor stops, the agents and their services die, then the
/// coordinator.
pub struct Fleet {
    monitor: Option<Monitor>,
    /// The hosts, in the order of the `zones` given to [`Fleet::start`].
    pub hosts: Vec<FleetHost>,
    /// The coordinator process.
    pub coord: CoordinatorProc,
    rt: tokio::runtime::Runtime,
    scratch: tempfile::TempDir,
    name: String,
}

impl Fleet {
    /// Starts a coordinator and one agent per entry of `zones` (its zone label), waits until all
    /// are connected, and installs [`BASELINE`] everywhere.
    pub fn start(name: &str, zones: &[&str]) -> Self {
        let f = Self::start_bare(name, zones);
        f.bootstrap();
        f
    }

    /// Like [`start`](Self::start), with each agent reaching the coordinator through a link of
    /// its own ([`crate::proxy::Link`], [`FleetHost::link`]) that the test can cut and heal.
    pub fn start_linked(name: &str, zones: &[&str]) -> Self {
        let f = Self::start_with(name, zones, true);
        f.bootstrap();
        f
    }

    /// Like [`start`](Self::start) without installing anything: no host has a release.
    pub fn start_bare(name: &str, zones: &[&str]) -> Self {
        Self::start_with(name, zones, false)
    }

    /// Like [`start`](Self::start), each host's `[service]` config given more keys by
    /// `service_toml(index)` (appended after its checks, e.g. a `[service.traffic]` table).
    pub fn start_configured(
        name: &str,
        zones: &[&str],
        service_toml: &dyn Fn(usize) -> String,
    ) -> Self {
        let f = Self::start_inner(name, zones, Instruments::ALL, service_toml);
        f.bootstrap();
        f
    }

    /// Like [`start`](Self::start) for a benchmark that times the fleet: each host runs what a
    /// production host runs (the service's HTTP check), without the harness's instruments. No
    /// host carries the release-gate `command` check ([`FleetHost::fail_release`] panics) and
    /// no monitor samples the hosts ([`history`](Self::history) is empty). At 50 hosts those
    /// cost about a quarter of this 2-core machine's CPU: the check spawns a shell and a
    /// `readlink` every 300 ms on each host, the monitor reads every host's directories every
    /// 30 ms and asks each service's `/version` over a new connection every 90 ms.
    pub fn start_for_timing(name: &str, zones: &[&str]) -> Self {
        let instruments = Instruments {
            linked: false,
            gated: false,
            monitored: false,
        };
        let f = Self::start_inner(name, zones, instruments, &|_| String::new());
        f.bootstrap();
        f
    }

    fn start_with(name: &str, zones: &[&str], linked: bool) -> Self {
        let instruments = Instruments {
            linked,
            ..Instruments::ALL
        };
        Self::start_inner(name, zones, instruments, &|_| String::new())
    }

    fn start_inner(
        name: &str,
        zones: &[&str],
        instruments: Instruments,
        service_toml: &dyn Fn(usize) -> String,
    ) -> Self {
        let coord = CoordinatorProc::start();
        let hosts: Vec<FleetHost> = zones
            .iter()
            .enumerate()
            .map(|(i, z)| FleetHost::start(&coord, instruments, name, z, &service_toml(i)))
            .collect();
        let monitor = instruments.monitored.then(|| {
            Monitor::start(
                hosts
                    .iter()
                    .map(|h| MonitoredHost {
                        service_dir: h.agent.service_dir(),
                        port: h.agent.port,
                    })
                    .collect(),
            )
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime for the fleet's gRPC client");
        let f = Self {
            monitor,
            hosts,
            coord,
            rt,
            scratch: tempfile::tempdir().expect("a scratch tempdir"),
            name: name.to_owned(),
        };
        f.wait_connected(f.hosts.len());
        f
    }

    /// Pushes [`BASELINE`] and rolls it out to every host in one fast wave.
    fn bootstrap(&self) {
        self.push(&healthy(BASELINE));
        let timings = Timings {
            bake: "100ms",
            canary_bake: None,
            min_healthy: "300ms",
            healthy_deadline: "10s",
            progress_deadline: "30s",
        };
        let id = self.start_rollout(BASELINE, &["--waves", "100%"], &timings);
        let s = self.wait_finished(&id, TIMEOUT);
        assert_eq!(
            s.state().as_str(),
            "succeeded",
            "bootstrap rollout of {BASELINE} ended {}: {}\n{}",
            s.state().as_str(),
            s.reason,
            self.dump()
        );
        for i in 0..self.hosts.len() {
            self.wait_serving(i, BASELINE);
        }
    }

    /// Everything about the fleet for a failure message: coordinator log tail and every host.
    pub fn dump(&self) -> String {
        let mut out = format!("===== fleet {} =====\n", self.name);
        out.push_str(&self.coord.dump());
        for (i, h) in self.hosts.iter().enumerate() {
            let _ = writeln!(out, "--- host #{i} zone={} ---", h.zone);
            if let Some(l) = &h.link {
                let _ = writeln!(
                    out,
                    "link {}: cut {}, {} connections forwarded, {} severed, {} refused",
                    l.addr(),
                    l.is_cut(),
                    l.forwarded(),
                    l.severed(),
                    l.refused()
                );
            }
            out.push_str(&h.agent.dump());
        }
        if let Some(m) = &self.monitor {
            let hist = m.snapshot();
            let _ = writeln!(out, "--- monitor: transitions of current ---");
            for t in &hist.transitions {
                let _ = writeln!(out, "{} host #{} -> {:?}", t.at_unix_ms, t.host, t.current);
            }
        }
        out
    }

    /// What the monitor saw so far.
    pub fn history(&self) -> History {
        self.monitor
            .as_ref()
            .map(Monitor::snapshot)
            .unwrap_or_default()
    }

    /// The index of the host with id `host_id`.
    pub fn index_of(&self, host_id: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h.id() == host_id)
            .unwrap_or_else(|| panic!("no host {host_id} in the fleet\n{}", self.dump()))
    }

    /// A scratch directory for files the test writes (artifacts to push).
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    // ---- the CLI

    /// Runs `serin --coordinator <url> ARGS` and returns what it did.
    pub fn cli<S: AsRef<str>>(&self, args: &[S]) -> CliOutput {
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        let out = Command::new(binaries::serin())
            .arg("--coordinator")
            .arg(self.coord.url())
            .args(&args)
            .env("NO_COLOR", "1")
            .env_remove("SERIN_COORDINATOR")
            .envs(operator_env(&crate::tls::pki().harness_operator()))
            .stdin(Stdio::null())
            .output()
            .expect("running serin");
        CliOutput {
            args,
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `serin -o json ARGS`, asserts exit 0, and returns the last JSON document printed.
    pub fn cli_json<S: AsRef<str>>(&self, args: &[S]) -> serde_json::Value {
        let mut full: Vec<String> = vec!["-o".into(), "json".into()];
        full.extend(args.iter().map(|a| a.as_ref().to_owned()));
        let out = self.cli(&full);
        assert_eq!(out.code, 0, "{out}\n{}", self.dump());
        out.json_docs()
            .pop()
            .unwrap_or_else(|| panic!("no JSON printed\n{out}"))
    }

    /// `serin artifact push` of `release` as a release of the demo service.
    pub fn push(&self, release: &DemoRelease) -> serde_json::Value {
        let file = self.scratch.path().join(format!("{}.bin", release.id));
        std::fs::write(&file, &release.bytes).expect("writing the artifact to push");
        let v = self.cli_json(&[
            "artifact",
            "push",
            &file.display().to_string(),
            "--service",
            SERVICE,
            "--release",
            &release.id,
        ]);
        assert_eq!(
            v["release"]["sha256"].as_str(),
            Some(release.sha256.as_str()),
            "push answer {v}"
        );
        v
    }

    /// The arguments of `serin rollout start|plan` for `release` with `extra` flags and timings.
    pub fn spec_args(&self, release: &str, extra: &[&str], timings: &Timings) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--service".into(),
            SERVICE.into(),
            "--release".into(),
            release.into(),
        ];
        a.extend(timings.args());
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    }

    /// `serin -o json rollout start …`; returns the rollout id.
    pub fn start_rollout(&self, release: &str, extra: &[&str], timings: &Timings) -> String {
        let mut args: Vec<String> = vec!["rollout".into(), "start".into()];
        args.extend(self.spec_args(release, extra, timings));
        let v = self.cli_json(&args);
        v["rollout_id"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| panic!("rollout start printed no rollout_id: {v}"))
            .to_owned()
    }

    /// `serin -o json rollout plan …`.
    pub fn plan(&self, release: &str, extra: &[&str], timings: &Timings) -> serde_json::Value {
        let mut args: Vec<String> = vec!["rollout".into(), "plan".into()];
        args.extend(self.spec_args(release, extra, timings));
        self.cli_json(&args)
    }

    /// `serin -o json rollout ACTION ID` (pause, resume, promote, abort, retry, rollback).
    pub fn control(&self, action: &str, id: &str) -> serde_json::Value {
        self.cli_json(&[
            "rollout",
            action,
            id,
            "--reason",
            &format!("e2e test {action}"),
        ])
    }

    /// `serin -o json rollout list`: the rollouts' ids, states and releases.
    pub fn list_rollouts(&self) -> Vec<(String, String, String)> {
        let v = self.cli_json(&["rollout", "list"]);
        v["rollouts"]
            .as_array()
            .unwrap_or_else(|| panic!("rollout list printed no rollouts array: {v}"))
            .iter()
            .map(|r| {
                (
                    r["rollout_id"].as_str().unwrap_or_default().to_owned(),
                    r["state"].as_str().unwrap_or_default().to_owned(),
                    r["spec"]["release"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    // ---- gRPC

    /// Runs `f` with a fresh ControlService client.
    pub fn grpc<T>(
        &self,
        f: impl AsyncFnOnce(ControlServiceClient<Channel>) -> Result<T, tonic::Status>,
    ) -> Result<T, tonic::Status> {
        let url = self.coord.url();
        let transport =
            crate::tls::TestPki::client_transport(&crate::tls::pki().harness_operator());
        self.rt.block_on(async move {
            let (endpoint, connector) = serin_security::transport::endpoint(&url, &transport)
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            let ch = endpoint
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .connect_with_connector(connector)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
            f(ControlServiceClient::new(ch)).await
        })
    }

    /// `GetRollout`.
    pub fn try_status(&self, id: &str) -> Result<wire::RolloutStatus, tonic::Status> {
        let id = id.to_owned();
        self.grpc(async move |mut c| {
            Ok(c.get_rollout(wire::RolloutRef {
                rollout_id: id,
                ..Default::default()
            })
            .await?
            .into_inner())
        })
    }

    /// `GetRollout`; panics on error.
    pub fn status(&self, id: &str) -> wire::RolloutStatus {
        self.try_status(id)
            .unwrap_or_else(|e| panic!("GetRollout {id}: {e}\n{}", self.dump()))
    }

    /// `ListHosts`.
    pub fn list_hosts(&self) -> Result<Vec<wire::HostInfo>, tonic::Status> {
        self.grpc(async move |mut c| {
            Ok(c.list_hosts(wire::ListHostsRequest::default())
                .await?
                .into_inner()
                .hosts)
        })
    }

    // ---- waiting

    /// Waits until the coordinator lists `n` of this fleet's hosts as connected.
    pub fn wait_connected(&self, n: usize) {
        let ids: BTreeSet<String> = self.hosts.iter().map(|h| h.id().to_owned()).collect();
        wait::wait_for(
            &format!("{n} hosts connected to the coordinator"),
            TIMEOUT,
            &|| self.dump(),
            || {
                self.list_hosts().is_ok_and(|hosts| {
                    hosts
                        .iter()
                        .filter(|h| h.connected && ids.contains(&h.host_id))
                        .count()
                        == n
                })
            },
        );
    }

    /// Waits until the coordinator sees host `i` as `connected`.
    pub fn wait_host_connected(&self, i: usize, connected: bool) {
        let id = self.hosts[i].id().to_owned();
        wait::wait_for(
            &format!("host {id} connected = {connected}"),
            TIMEOUT,
            &|| self.dump(),
            || {
                self.list_hosts().is_ok_and(|hosts| {
                    hosts
                        .iter()
                        .any(|h| h.host_id == id && h.connected == connected)
                })
            },
        );
    }

    /// Polls `GetRollout` until `pred` holds; returns that status. Coordinator restarts in
    /// between (connection errors) are tolerated.
    pub fn wait_rollout(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&wire::RolloutStatus) -> bool,
    ) -> wire::RolloutStatus {
        let last: Mutex<Option<wire::RolloutStatus>> = Mutex::new(None);
        wait::wait_for_value(
            &format!("rollout {id}: {what}"),
            timeout,
            &|| {
                format!(
                    "last status: {}\n{}",
                    lock(&last)
                        .as_ref()
                        .map(describe_status)
                        .unwrap_or_else(|| "(none)".into()),
                    self.dump()
                )
            },
            || {
                let s = self.try_status(id).ok()?;
                let ok = pred(&s);
                *lock(&last) = Some(s.clone());
                ok.then_some(s)
            },
        )
    }

    /// Waits until the rollout is finished; returns its final status.
    pub fn wait_finished(&self, id: &str, timeout: Duration) -> wire::RolloutStatus {
        self.wait_rollout(id, "finished", timeout, |s| s.finished)
    }

    /// Waits until the rollout's state is `state`.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> wire::RolloutStatus {
        self.wait_rollout(id, &format!("state {state}"), timeout, |s| {
            s.state().as_str() == state
        })
    }

    /// Waits until host `i` serves `version` on `GET /version` and `current` names it.
    pub fn wait_serving(&self, i: usize, version: &str) {
        let h = &self.hosts[i];
        wait::wait_for(
            &format!("host #{i} {} serving {version}", h.id()),
            TIMEOUT,
            &|| self.dump(),
            || {
                h.agent.current_release().as_deref() == Some(version)
                    && h.agent.version().is_ok_and(|v| v.trim() == version)
            },
        );
    }

    /// Asserts every host in `hosts` serves `version` (waiting for each).
    pub fn assert_all_serving(&self, hosts: impl IntoIterator<Item = usize>, version: &str) {
        for i in hosts {
            self.wait_serving(i, version);
        }
    }

    /// Asserts host `i` never had `release` in `current` or serving (staged on disk ahead of its
    /// wave is allowed: a stage changes nothing a host serves).
    pub fn assert_never_had(&self, i: usize, release: &str) {
        let hist = self.history();
        let h = &self.hosts[i];
        assert!(
            !hist.ever_ran(i, release),
            "host #{i} {} (zone {}) should never have run release {release}; releases seen {:?}, versions seen {:?}\n{}",
            h.id(),
            h.zone,
            hist.releases_seen[i],
            hist.versions_seen[i],
            self.dump()
        );
        assert!(
            hist.versions_seen[i].iter().all(|v| v == BASELINE),
            "host #{i} {} served something else than {BASELINE}: {:?}\n{}",
            h.id(),
            hist.versions_seen[i],
            self.dump()
        );
    }

    /// Host indices of the rollout's wave `wave`, from its status.
    pub fn wave_hosts(&self, s: &wire::RolloutStatus, wave: u32) -> Vec<usize> {
        s.hosts
            .iter()
            .filter(|h| h.wave == wave)
            .map(|h| self.index_of(&h.host_id))
            .collect()
    }

    /// Host indices the rollout includes.
    pub fn rollout_hosts(&self, s: &wire::RolloutStatus) -> Vec<usize> {
        s.hosts.iter().map(|h| self.index_of(&h.host_id)).collect()
    }

    /// The order results of rollout `rollout` recorded in host `i`'s state.json, as
    /// `(seq, phase, release)` (phase: `wire::OrderPhase` as a number).
    pub fn agent_results(&self, i: usize, rollout: &str) -> Vec<(u64, i32, String)> {
        let Ok(state) = self.hosts[i].agent.state_json() else {
            return Vec::new();
        };
        state["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["rollout_id"].as_str() == Some(rollout))
            .map(|r| {
                (
                    r["seq"].as_u64().unwrap_or(0),
                    r["phase"]
                        .as_i64()
                        .and_then(|p| i32::try_from(p).ok())
                        .unwrap_or(0),
                    r["release"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// The distinct order sequences under which host `i` activated `release` for `rollout`,
    /// from its state.json: more than one means the host got a second target for the rollout.
    pub fn agent_activation_seqs(&self, i: usize, rollout: &str, release: &str) -> BTreeSet<u64> {
        self.agent_results(i, rollout)
            .into_iter()
            .filter(|(_, phase, r)| *phase == wire::OrderPhase::Activated as i32 && r == release)
            .map(|(seq, _, _)| seq)
            .collect()
    }
}

/// One line per wave and host of a status, for messages.
pub fn describe_status(s: &wire::RolloutStatus) -> String {
    let mut out = format!(
        "rollout {} state {} reason {:?} current_wave {} finished {}\n",
        s.rollout_id,
        s.state().as_str(),
        s.reason,
        s.current_wave,
        s.finished
    );
    for w in &s.waves {
        let _ = writeln!(
            out,
            "  wave {} size {} state {} ok {} failed {} unreachable {} in_progress {} started {} bake_ends {}",
            w.index,
            w.size,
            w.state().as_str(),
            w.succeeded,
            w.failed,
            w.unreachable,
            w.in_progress,
            w.started_unix_ms,
            w.bake_ends_unix_ms
        );
    }
    for h in &s.hosts {
        let _ = writeln!(
            out,
            "  host {} wave {} phase {} baseline {:?} target {:?} current {:?} detail {:?}",
            h.host_id,
            h.wave,
            h.phase().as_str(),
            h.baseline_release,
            h.target_release,
            h.current_release,
            h.detail
        );
    }
    for d in &s.decisions {
        let _ = writeln!(
            out,
            "  decision {} wave {} {} by {:?}: {} {:?}",
            d.at_unix_ms,
            d.wave,
            d.kind().as_str(),
            d.actor,
            d.reason,
            d.evidence
        );
    }
    out
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
        }
        // Stop sampling before the processes go away; the fields then drop in order.
        self.monitor.take();
    }
}

/// The first decision of `kind` about wave `wave`.
pub fn decision<'a>(
    s: &'a wire::RolloutStatus,
    kind: &str,
    wave: u32,
) -> Option<&'a wire::Decision> {
    s.decisions
        .iter()
        .find(|d| d.kind().as_str() == kind && d.wave == wave)
}

impl Fleet {
    /// Asserts the end of a failed rollout of `release`: state `state` with a reason, the hosts
    /// of `allowed` (by index) are the only ones that ever had the release, and every host of the
    /// fleet serves `baseline` again.
    pub fn assert_contained_and_restored(
        &self,
        s: &wire::RolloutStatus,
        state: &str,
        release: &str,
        allowed: &[usize],
        baseline: &str,
    ) {
        assert_eq!(
            s.state().as_str(),
            state,
            "rollout of {release} should end {state}\n{}\n{}",
            describe_status(s),
            self.dump()
        );
        assert!(s.finished, "{}", describe_status(s));
        assert!(
            !s.reason.trim().is_empty(),
            "a {state} rollout says why\n{}",
            describe_status(s)
        );
        // A finished rollback means the hosts are back: `current` names the baseline already.
        let not_back: Vec<String> = (0..self.hosts.len())
            .filter(|i| self.hosts[*i].agent.current_release().as_deref() != Some(baseline))
            .map(|i| {
                format!(
                    "host #{i} {} current {:?}",
                    self.hosts[i].id(),
                    self.hosts[i].agent.current_release()
                )
            })
            .collect();
        for i in 0..self.hosts.len() {
            self.wait_serving(i, baseline);
        }
        let late = self.status(&s.rollout_id);
        assert!(
            not_back.is_empty(),
            "rollout {} reported {state} while hosts were not back on {baseline}: {not_back:?}\nstatus when it finished:\n{}\nstatus once they were back:\n{}\n{}",
            s.rollout_id,
            describe_status(s),
            describe_status(&late),
            self.dump()
        );
        let hist = self.history();
        for i in 0..self.hosts.len() {
            if !allowed.contains(&i) {
                self.assert_never_had(i, release);
            } else {
                assert!(
                    hist.activations(i, release) <= 1,
                    "host #{i} activated {release} {} times\n{}",
                    hist.activations(i, release),
                    self.dump()
                );
            }
        }
        // The status converges to every touched host rolled back.
        let touched: Vec<String> = s
            .hosts
            .iter()
            .filter(|h| allowed.contains(&self.index_of(&h.host_id)))
            .filter(|h| !matches!(h.phase().as_str(), "pending" | "skipped"))
            .map(|h| h.host_id.clone())
            .collect();
        let late = self.wait_rollout(
            &s.rollout_id,
            "every touched host in phase rolled_back",
            Duration::from_secs(10),
            |l| {
                l.hosts
                    .iter()
                    .filter(|h| touched.contains(&h.host_id))
                    .all(|h| h.phase().as_str() == "rolled_back")
            },
        );
        for h in &late.hosts {
            if allowed.contains(&self.index_of(&h.host_id)) && !h.target_release.is_empty() {
                assert!(
                    matches!(h.phase().as_str(), "rolled_back" | "pending" | "skipped"),
                    "host {} of a {state} rollout ends in phase {} (expected rolled_back)\n{}",
                    h.host_id,
                    h.phase().as_str(),
                    describe_status(s)
                );
            }
        }
    }
}
