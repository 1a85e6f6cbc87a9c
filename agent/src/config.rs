//! The agent's configuration: TOML parsed into raw serde structs with defaults, then validated
//! into typed values.
//!
//! [`Config::parse`] collects every problem it finds, each naming its key (e.g.
//! `service[0].check[1].interval: "abc" is not a duration (e.g. "5s")`), and warns about unknown
//! keys instead of failing, so a rolled-back agent still starts with a newer config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serin_proto::{HostId, ServiceName};
use serin_security::tls::{TlsSection, TransportSecurity};

/// Where the agent looks for its config file by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/serin/agent.toml";

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The coordinator's gRPC endpoint (`http://host:port`).
    pub coordinator: String,
    /// Root of the agent's durable state.
    pub state_dir: PathBuf,
    /// Explicit host id; `None`: machine-id or a generated one.
    pub host_id: Option<HostId>,
    /// Explicit hostname; `None`: the system hostname.
    pub hostname: Option<String>,
    /// A heartbeat goes up after this long without any other message (a health report or a
    /// result is as much a sign of life); the coordinator's Welcome may override it.
    pub heartbeat_interval: Duration,
    /// A full health report goes up at least this often.
    pub report_interval: Duration,
    /// First reconnect delay.
    pub reconnect_initial: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// Labels the host announces.
    pub labels: BTreeMap<String, String>,
    /// Limits on artifact downloads (`[download]`).
    pub download: DownloadLimits,
    /// `[download] allowed_url_prefixes`: URL releases are fetched only from URLs that start
    /// with one of these; others are refused (`URL_NOT_ALLOWED`) before any connection. `None`
    /// (key absent): any URL, with a warning at start; `Some(vec![])`: no URL releases at all.
    pub allowed_url_prefixes: Option<Vec<String>>,
    /// The managed services.
    pub services: Vec<ServiceConfig>,
    /// `[tls]`: mutual TLS to the coordinator (its CA pinned, this host's certificate), or
    /// explicitly asked-for plaintext for development. The URL scheme matches it.
    pub tls: TransportSecurity,
}

/// How slow or long an artifact download may be before it is abandoned (`[download]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadLimits {
    /// `min_bytes_per_sec`: fewer bytes than this rate over a whole `rate_window` abandon the
    /// download as stalled. Default 16384 (16 KiB/s).
    pub min_bytes_per_sec: u64,
    /// `rate_window`: the window the minimum rate is measured over. Default 60 s.
    pub rate_window: Duration,
    /// `deadline`: a download (with its retries) that has not finished after this long is
    /// abandoned. Default 1 h.
    pub deadline: Duration,
}

impl Default for DownloadLimits {
    fn default() -> Self {
        DownloadLimits {
            min_bytes_per_sec: 16 * 1024,
            rate_window: Duration::from_secs(60),
            deadline: Duration::from_secs(3600),
        }
    }
}

/// One managed service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The service's name.
    pub name: ServiceName,
    /// File name of the artifact inside `releases/<id>/`.
    pub binary: String,
    /// Releases kept on disk, current and previous included (at least 2).
    pub keep_releases: usize,
    /// Time between SIGTERM and SIGKILL when the supervisor stops the process.
    pub stop_timeout: Duration,
    /// How the service is run.
    pub run: RunConfig,
    /// Health checks.
    pub checks: Vec<CheckConfig>,
    /// Load balancer, swap mode and lifecycle hooks (`[service.traffic]`, `[service.swap]`,
    /// `[service.hooks]`).
    pub traffic: TrafficConfig,
    /// `signing_keys` (inline key lines) and `signing_keys_file` (a file of key lines): the
    /// release-signing public keys pinned for this service. Empty: releases are not verified
    /// (logged once at start).
    pub signing_keys: Vec<serin_security::manifest::PublicKey>,
}

/// How a service is run.
#[derive(Debug, Clone)]
pub enum RunConfig {
    /// The agent supervises the process itself.
    Process {
        /// Arguments after the binary.
        args: Vec<String>,
        /// Extra environment.
        env: BTreeMap<String, String>,
    },
    /// A systemd unit runs it.
    Systemd {
        /// Unit name, e.g. `web.service`.
        unit: String,
    },
}

/// One health check.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// Name used in reports.
    pub name: String,
    /// What it probes.
    pub kind: CheckKind,
    /// Time between probes.
    pub interval: Duration,
    /// Time a probe may take.
    pub timeout: Duration,
    /// Consecutive failures that turn the check failing.
    pub failure_threshold: NonZeroU32,
    /// Consecutive successes that turn the check passing.
    pub success_threshold: NonZeroU32,
}

/// What a health check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// HTTP GET; 2xx is ok.
    Http {
        /// The full URL.
        url: String,
        /// `host:port` to connect to.
        authority: String,
        /// Path and query.
        path: String,
    },
    /// TCP connect.
    Tcp {
        /// Address to connect to.
        address: SocketAddr,
    },
    /// Command exit status; 0 is ok.
    Command {
        /// argv, program first.
        argv: Vec<String>,
    },
    /// Failing when the service restarted more than `max` times since activation.
    Restarts {
        /// Allowed restarts.
        max: u32,
    },
}

impl CheckKind {
    /// Short name of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Http { .. } => "http",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Command { .. } => "command",
            CheckKind::Restarts { .. } => "restarts",
        }
    }
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a value of the wrong type.
    #[error("config is not valid: {0}")]
    Syntax(String),
    /// One or more values are invalid; one line per problem, each naming its key.
    #[error("config has {} problem(s):\n{}", .0.len(), .0.join("\n"))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// Every problem, one per entry.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(p) => p.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// A validated config plus the warnings found on the way (unknown keys).
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The config.
    pub config: Config,
    /// Warnings, e.g. `unknown key service[0].foo`.
    pub warnings: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    coordinator: Option<String>,
    #[serde(default = "default_state_dir")]
    state_dir: String,
    host_id: Option<String>,
    hostname: Option<String>,
    #[serde(default = "default_heartbeat")]
    heartbeat_interval: String,
    #[serde(default = "default_report")]
    report_interval: String,
    #[serde(default = "default_reconnect_initial")]
    reconnect_initial: String,
    #[serde(default = "default_reconnect_max")]
    reconnect_max: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    download: RawDownload,
    #[serde(default)]
    service: Vec<RawService>,
    #[serde(default)]
    tls: TlsSection,
}

// --- traffic, swap modes and hooks (issue 11): one block, validated by `RawTrafficKeys` ---

/// Load-balancer integration, swap mode and lifecycle hooks of one service.
#[derive(Debug, Clone, Default)]
pub struct TrafficConfig {
    /// `[service.traffic] agent_check`: where HAProxy's agent-check finds this service's
    /// responder; `None`: no responder.
    pub agent_check: Option<SocketAddr>,
    /// `[service.traffic] slow_start` / `slow_start_from`: the weight ramp after a swap.
    pub slow_start: Option<crate::traffic::SlowStart>,
    /// `[service.swap]`: how a restart hands over to the new process (supervised services).
    pub swap: crate::service_manager::supervisor::SwapMode,
    /// `[service.swap] mode = "socket"` on a systemd unit: the `.socket` unit (`Accept=no`)
    /// that holds the listening socket (`swap.socket_unit`, default `<unit stem>.socket`),
    /// checked at load; only the service unit is restarted.
    pub systemd_socket: Option<String>,
    /// `[service.hooks] timeout`: how long a lifecycle hook may run.
    pub hook_timeout: Duration,
    /// `[service.traffic] drain_timeout`: how long a drain waits for the server to go idle
    /// before the swap goes ahead anyway (and how long an undrain waits for the checks).
    pub drain_timeout: Duration,
    /// `[service.traffic] haproxy_socket` and `haproxy_server` (`backend/server`): where the
    /// drain reads the server's open sessions; `None`: the drain waits its whole timeout.
    pub haproxy: Option<crate::traffic::sessions::HaproxyServer>,
}

impl TrafficConfig {
    /// The service sits behind a load balancer (it has an agent-check port): each swap is
    /// drained and undrained.
    pub fn behind_load_balancer(&self) -> bool {
        self.agent_check.is_some()
    }
}

#[derive(Debug, Default, Deserialize)]
struct RawTrafficSection {
    agent_check: Option<String>,
    slow_start: Option<String>,
    slow_start_from: Option<i64>,
    drain_timeout: Option<String>,
    haproxy_socket: Option<String>,
    haproxy_server: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawSwapSection {
    mode: Option<String>,
    listen: Option<String>,
    socket_unit: Option<String>,
    ready_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawHooksSection {
    timeout: Option<String>,
}

/// The raw `[service.traffic]`, `[service.swap]` and `[service.hooks]` tables.
#[derive(Debug, Default)]
struct RawTrafficKeys {
    traffic: RawTrafficSection,
    swap: RawSwapSection,
    hooks: RawHooksSection,
}

impl RawTrafficKeys {
    fn validate(self, at: &str, run: Option<&RunConfig>, p: &mut Problems) -> TrafficConfig {
        use crate::service_manager::supervisor::SwapMode;
        let supervised = matches!(run, Some(RunConfig::Process { .. }));
        let systemd_unit = match run {
            Some(RunConfig::Systemd { unit }) => Some(unit.as_str()),
            _ => None,
        };
        let addr = |p: &mut Problems, key: String, v: &str| match v.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                p.push(key, format!("{v:?} is not an IP address and port"));
                None
            }
        };
        let agent_check = self
            .traffic
            .agent_check
            .as_deref()
            .and_then(|v| addr(p, format!("{at}.traffic.agent_check"), v));
        let slow_start = self.traffic.slow_start.as_deref().and_then(|v| {
            let duration = p.duration(&format!("{at}.traffic.slow_start"), v);
            let from = self.traffic.slow_start_from.unwrap_or(10);
            match crate::traffic::SlowStart::new(u32::try_from(from).unwrap_or(0), duration) {
                Ok(s) => Some(s),
                Err(_) => {
                    p.push(
                        format!("{at}.traffic.slow_start_from"),
                        format!("{from} must be a percentage from 1 to 100"),
                    );
                    None
                }
            }
        });
        if self.traffic.slow_start.is_none() && self.traffic.slow_start_from.is_some() {
            p.push(
                format!("{at}.traffic.slow_start_from"),
                "only meaningful with traffic.slow_start",
            );
        }
        let mode = self.swap.mode.as_deref().unwrap_or("restart");
        let mut systemd_socket = None;
        let swap = match mode {
            "restart" => SwapMode::Restart,
            // systemd holds the socket: only the service unit is restarted (no supervisor mode).
            "socket" if systemd_unit.is_some() => {
                let unit = systemd_unit.unwrap_or_default();
                if self.swap.listen.is_some() {
                    p.push(
                        format!("{at}.swap.listen"),
                        "only for run.kind = \"process\"; for a systemd unit the .socket unit's \
                         ListenStream= says where systemd listens",
                    );
                }
                let socket_unit = self.swap.socket_unit.clone().unwrap_or_else(|| {
                    format!("{}.socket", unit.rsplit_once('.').map_or(unit, |(s, _)| s))
                });
                let dirs = crate::service_manager::systemd::unit_search_path();
                match crate::service_manager::systemd::check_socket_unit(unit, &socket_unit, &dirs)
                {
                    Ok(_) => systemd_socket = Some(socket_unit),
                    Err(e) => p.push(format!("{at}.swap.mode"), e),
                }
                SwapMode::Restart
            }
            "socket" => match self.swap.listen.as_deref() {
                None => {
                    p.push(
                        format!("{at}.swap.listen"),
                        "required when swap.mode = \"socket\" (the address the service serves on)",
                    );
                    SwapMode::Restart
                }
                Some(v) => addr(p, format!("{at}.swap.listen"), v)
                    .map(|listen| SwapMode::Socket { listen })
                    .unwrap_or_default(),
            },
            "reload" => SwapMode::Reload {
                ready_timeout: p.duration(
                    &format!("{at}.swap.ready_timeout"),
                    self.swap.ready_timeout.as_deref().unwrap_or("30s"),
                ),
            },
            other => {
                p.push(
                    format!("{at}.swap.mode"),
                    format!("{other:?} is not one of \"restart\", \"socket\", \"reload\""),
                );
                SwapMode::Restart
            }
        };
        if !supervised && swap != SwapMode::Restart {
            p.push(
                format!("{at}.swap.mode"),
                format!(
                    "{mode:?} needs run.kind = \"process\"; for a systemd unit use mode = \
                     \"socket\" with a .socket unit (Accept=no), or ExecReload= in the unit"
                ),
            );
        }
        if self.swap.socket_unit.is_some() && (mode != "socket" || supervised) {
            p.push(
                format!("{at}.swap.socket_unit"),
                "only meaningful with swap.mode = \"socket\" on run.kind = \"systemd\"",
            );
        }
        if self.swap.listen.is_some() && mode != "socket" {
            p.push(
                format!("{at}.swap.listen"),
                "only meaningful with swap.mode = \"socket\"",
            );
        }
        let hook_timeout = p.duration(
            &format!("{at}.hooks.timeout"),
            self.hooks.timeout.as_deref().unwrap_or("60s"),
        );
        let drain_timeout = p.duration(
            &format!("{at}.traffic.drain_timeout"),
            self.traffic.drain_timeout.as_deref().unwrap_or("30s"),
        );
        let haproxy = match (&self.traffic.haproxy_socket, &self.traffic.haproxy_server) {
            (None, None) => None,
            (Some(socket), Some(server)) => match server.split_once('/') {
                Some((backend, name)) if !backend.is_empty() && !name.is_empty() => {
                    Some(crate::traffic::sessions::HaproxyServer {
                        socket: socket.into(),
                        backend: backend.to_owned(),
                        server: name.to_owned(),
                    })
                }
                _ => {
                    p.push(
                        format!("{at}.traffic.haproxy_server"),
                        format!("{server:?} is not \"backend/server\""),
                    );
                    None
                }
            },
            (Some(_), None) => {
                p.push(
                    format!("{at}.traffic.haproxy_server"),
                    "required with traffic.haproxy_socket (\"backend/server\")",
                );
                None
            }
            (None, Some(_)) => {
                p.push(
                    format!("{at}.traffic.haproxy_socket"),
                    "required with traffic.haproxy_server (the stats socket's path)",
                );
                None
            }
        };
        if agent_check.is_none()
            && (self.traffic.drain_timeout.is_some() || self.traffic.haproxy_socket.is_some())
        {
            p.push(
                format!("{at}.traffic.agent_check"),
                "required with traffic.drain_timeout or traffic.haproxy_socket (a drain is \
                 answered on the agent-check port)",
            );
        }
        TrafficConfig {
            agent_check,
            slow_start,
            swap,
            systemd_socket,
            hook_timeout,
            drain_timeout,
            haproxy,
        }
    }
}

// --- end of the traffic block ---

#[derive(Debug, Deserialize)]
struct RawDownload {
    #[serde(default = "default_min_bytes_per_sec")]
    min_bytes_per_sec: i64,
    #[serde(default = "default_rate_window")]
    rate_window: String,
    #[serde(default = "default_download_deadline")]
    deadline: String,
    #[serde(default)]
    allowed_url_prefixes: Option<Vec<String>>,
}

impl Default for RawDownload {
    fn default() -> Self {
        RawDownload {
            min_bytes_per_sec: default_min_bytes_per_sec(),
            rate_window: default_rate_window(),
            deadline: default_download_deadline(),
            allowed_url_prefixes: None,
        }
    }
}

fn default_min_bytes_per_sec() -> i64 {
    DownloadLimits::default().min_bytes_per_sec as i64
}
fn default_rate_window() -> String {
    humantime::format_duration(DownloadLimits::default().rate_window).to_string()
}
fn default_download_deadline() -> String {
    humantime::format_duration(DownloadLimits::default().deadline).to_string()
}

#[derive(Debug, Deserialize)]
struct RawService {
    name: Option<String>,
    binary: Option<String>,
    #[serde(default = "default_keep")]
    keep_releases: i64,
    #[serde(default = "default_stop_timeout")]
    stop_timeout: String,
    run: Option<RawRun>,
    #[serde(default)]
    check: Vec<RawCheck>,
    // Traffic block (issue 11).
    #[serde(default)]
    traffic: RawTrafficSection,
    #[serde(default)]
    swap: RawSwapSection,
    #[serde(default)]
    hooks: RawHooksSection,
    // Signed releases (issue 7).
    #[serde(default)]
    signing_keys: Vec<String>,
    signing_keys_file: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawRun {
    kind: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    unit: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawCheck {
    name: Option<String>,
    kind: Option<String>,
    url: Option<String>,
    address: Option<String>,
    command: Option<Vec<String>>,
    max: Option<i64>,
    #[serde(default = "default_check_interval")]
    interval: String,
    #[serde(default = "default_check_timeout")]
    timeout: String,
    #[serde(default = "default_failure_threshold")]
    failure_threshold: i64,
    #[serde(default = "default_success_threshold")]
    success_threshold: i64,
}

fn default_state_dir() -> String {
    "/var/lib/serin-agent".into()
}
fn default_heartbeat() -> String {
    "5s".into()
}
fn default_report() -> String {
    "30s".into()
}
fn default_reconnect_initial() -> String {
    "200ms".into()
}
fn default_reconnect_max() -> String {
    "30s".into()
}
fn default_keep() -> i64 {
    3
}
fn default_stop_timeout() -> String {
    "5s".into()
}
fn default_check_interval() -> String {
    "5s".into()
}
fn default_check_timeout() -> String {
    "1s".into()
}
fn default_failure_threshold() -> i64 {
    3
}
fn default_success_threshold() -> i64 {
    1
}

/// Formats a serde_ignored path the way problems name keys: `service[0].check[1].foo`.
fn key_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        P::Map { parent, key } => {
            let p = key_path(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            key_path(parent)
        }
    }
}

struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, key: impl AsRef<str>, problem: impl AsRef<str>) {
        self.0
            .push(format!("{}: {}", key.as_ref(), problem.as_ref()));
    }

    fn duration(&mut self, key: &str, value: &str) -> Duration {
        match humantime::parse_duration(value.trim()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.push(key, format!("{value:?} must be greater than zero"));
                Duration::from_secs(1)
            }
            Err(_) => {
                self.push(key, format!("{value:?} is not a duration (e.g. \"5s\")"));
                Duration::from_secs(1)
            }
        }
    }

    fn positive(&mut self, key: &str, value: i64) -> NonZeroU32 {
        match u32::try_from(value).ok().and_then(NonZeroU32::new) {
            Some(v) => v,
            None => {
                self.push(
                    key,
                    format!("{value} must be a whole number from 1 to {}", u32::MAX),
                );
                NonZeroU32::MIN
            }
        }
    }
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Loaded, ConfigError> {
        let mut warnings = Vec::new();
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let raw: RawConfig = serde_ignored::deserialize(de, |path| {
            warnings.push(format!("unknown key {}", key_path(&path)));
        })
        .map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let config = raw.validate()?;
        Ok(Loaded { config, warnings })
    }
}

/// Warnings about unknown keys in config text (empty when the text does not parse).
pub fn unknown_keys(text: &str) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Ok(de) = toml::Deserializer::parse(text) {
        let _: Result<RawConfig, _> = serde_ignored::deserialize(de, |path| {
            warnings.push(format!("unknown key {}", key_path(&path)));
        });
    }
    warnings
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let mut p = Problems(Vec::new());
        let coordinator = match self.coordinator {
            None => {
                p.push("coordinator", "required (e.g. \"http://127.0.0.1:7700\")");
                String::new()
            }
            Some(c) => {
                let rest = c
                    .strip_prefix("http://")
                    .or_else(|| c.strip_prefix("https://"));
                match rest {
                    Some(r) if !r.is_empty() && !r.contains(char::is_whitespace) => {
                        if tonic::transport::Endpoint::from_shared(c.clone()).is_err() {
                            p.push("coordinator", format!("{c:?} is not a valid URL"));
                        }
                    }
                    _ => p.push(
                        "coordinator",
                        format!("{c:?} must be an http:// or https:// URL"),
                    ),
                }
                c
            }
        };
        if self.state_dir.is_empty() || !Path::new(&self.state_dir).is_absolute() {
            p.push(
                "state_dir",
                format!("{:?} must be an absolute path", self.state_dir),
            );
        }
        let host_id = self.host_id.and_then(|h| match HostId::new(h) {
            Ok(h) => Some(h),
            Err(e) => {
                p.push("host_id", e.problem);
                None
            }
        });
        if let Some(h) = &self.hostname
            && (h.is_empty()
                || h.len() > 253
                || h.chars().any(|c| c.is_control() || c.is_whitespace()))
        {
            p.push("hostname", format!("{h:?} is not a valid host name"));
        }
        let heartbeat_interval = p.duration("heartbeat_interval", &self.heartbeat_interval);
        let report_interval = p.duration("report_interval", &self.report_interval);
        let reconnect_initial = p.duration("reconnect_initial", &self.reconnect_initial);
        let reconnect_max = p.duration("reconnect_max", &self.reconnect_max);
        if reconnect_max < reconnect_initial {
            p.push(
                "reconnect_max",
                format!(
                    "{:?} must not be less than reconnect_initial ({:?})",
                    self.reconnect_max, self.reconnect_initial
                ),
            );
        }
        for (k, v) in &self.labels {
            if let Err(e) = serin_proto::validate_label(&format!("labels.{k}"), k, v) {
                p.push(e.field, e.problem);
            }
        }
        let min_bytes_per_sec = match u64::try_from(self.download.min_bytes_per_sec) {
            Ok(v) => v,
            Err(_) => {
                p.push(
                    "download.min_bytes_per_sec",
                    format!(
                        "{} must be a whole number of bytes per second, 0 or more",
                        self.download.min_bytes_per_sec
                    ),
                );
                0
            }
        };
        let download = DownloadLimits {
            min_bytes_per_sec,
            rate_window: p.duration("download.rate_window", &self.download.rate_window),
            deadline: p.duration("download.deadline", &self.download.deadline),
        };
        let allowed_url_prefixes = self.download.allowed_url_prefixes;
        for (i, prefix) in allowed_url_prefixes.iter().flatten().enumerate() {
            if let Err(problem) = check_url_prefix(prefix) {
                p.push(format!("download.allowed_url_prefixes[{i}]"), problem);
            }
        }
        let mut services = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.service.into_iter().enumerate() {
            if let Some(svc) = s.validate(&format!("service[{i}]"), &mut p) {
                if !seen.insert(svc.name.clone()) {
                    p.push(
                        format!("service[{i}].name"),
                        format!("{:?} is used by an earlier service", svc.name.as_str()),
                    );
                }
                services.push(svc);
            }
        }
        let tls = match self.tls.validate() {
            Ok(tls) => {
                // The scheme says what the operator expects; a mismatch is an error, never a
                // silent downgrade (or a surprise upgrade).
                match (&tls, coordinator.split("://").next()) {
                    (TransportSecurity::InsecurePlaintext, Some("https")) => p.push(
                        "coordinator",
                        format!(
                            "{coordinator:?} asks for https:// but [tls] has insecure_plaintext = \
                             true; configure tls.ca, tls.cert and tls.key (refusing to talk cleartext)"
                        ),
                    ),
                    (TransportSecurity::Tls(_), Some("http")) => p.push(
                        "coordinator",
                        format!(
                            "{coordinator:?} is plaintext http:// but [tls] configures TLS; use https://"
                        ),
                    ),
                    _ => {}
                }
                tls
            }
            Err(problems) => {
                p.0.extend(problems);
                TransportSecurity::InsecurePlaintext
            }
        };
        if !p.0.is_empty() {
            return Err(ConfigError::Invalid(p.0));
        }
        Ok(Config {
            tls,
            coordinator,
            state_dir: PathBuf::from(self.state_dir),
            host_id,
            hostname: self.hostname,
            heartbeat_interval,
            report_interval,
            reconnect_initial,
            reconnect_max,
            labels: self.labels,
            download,
            allowed_url_prefixes,
            services,
        })
    }
}

impl RawService {
    fn validate(self, at: &str, p: &mut Problems) -> Option<ServiceConfig> {
        let name = match self.name {
            None => {
                p.push(format!("{at}.name"), "required");
                None
            }
            Some(n) => match ServiceName::new(n) {
                Ok(n) => Some(n),
                Err(e) => {
                    p.push(format!("{at}.name"), e.problem);
                    None
                }
            },
        };
        let binary = match self.binary {
            None => {
                p.push(format!("{at}.binary"), "required");
                String::new()
            }
            Some(b) => {
                if b.is_empty()
                    || b == "."
                    || b == ".."
                    || b == "release.json"
                    || b == "release.manifest"
                    || b.contains('/')
                    || b.contains('\0')
                {
                    p.push(
                        format!("{at}.binary"),
                        format!("{b:?} must be a plain file name (no '/', not release.json)"),
                    );
                }
                b
            }
        };
        let keep_releases = if self.keep_releases < 2 || self.keep_releases > 1000 {
            p.push(
                format!("{at}.keep_releases"),
                format!("{} must be between 2 and 1000", self.keep_releases),
            );
            2
        } else {
            self.keep_releases as usize
        };
        let stop_timeout = p.duration(&format!("{at}.stop_timeout"), &self.stop_timeout);
        let run = match self.run {
            None => {
                p.push(
                    format!("{at}.run"),
                    "required ([service.run] with kind = \"process\" or \"systemd\")",
                );
                None
            }
            Some(r) => match r.kind.as_deref() {
                Some("process") => Some(RunConfig::Process {
                    args: r.args,
                    env: r.env,
                }),
                Some("systemd") => match r.unit {
                    Some(u)
                        if !u.is_empty()
                            && !u.contains('/')
                            && !u.contains(char::is_whitespace) =>
                    {
                        Some(RunConfig::Systemd { unit: u })
                    }
                    Some(u) => {
                        p.push(
                            format!("{at}.run.unit"),
                            format!("{u:?} is not a unit name"),
                        );
                        None
                    }
                    None => {
                        p.push(format!("{at}.run.unit"), "required when kind = \"systemd\"");
                        None
                    }
                },
                Some(other) => {
                    p.push(
                        format!("{at}.run.kind"),
                        format!("{other:?} is not one of \"process\", \"systemd\""),
                    );
                    None
                }
                None => {
                    p.push(
                        format!("{at}.run.kind"),
                        "required (\"process\" or \"systemd\")",
                    );
                    None
                }
            },
        };
        let mut checks = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for (j, c) in self.check.into_iter().enumerate() {
            let cat = format!("{at}.check[{j}]");
            if let Some(c) = c.validate(&cat, p) {
                if !names.insert(c.name.clone()) {
                    p.push(
                        format!("{cat}.name"),
                        format!("{:?} is used by an earlier check", c.name),
                    );
                }
                checks.push(c);
            }
        }
        let traffic = RawTrafficKeys {
            traffic: self.traffic,
            swap: self.swap,
            hooks: self.hooks,
        }
        .validate(at, run.as_ref(), p);
        let signing_keys = signing_keys(at, self.signing_keys, self.signing_keys_file, p);
        Some(ServiceConfig {
            name: name?,
            binary,
            keep_releases,
            stop_timeout,
            run: run?,
            checks,
            traffic,
            signing_keys,
        })
    }
}

// --- signed releases and URL sources (issue 7) ---

/// A URL prefix must be a whole `http(s)://authority/` (ending in `/`), so that
/// `https://example.com` cannot be extended to `https://example.com.evil.test/`.
fn check_url_prefix(prefix: &str) -> Result<(), String> {
    let rest = prefix
        .strip_prefix("https://")
        .or_else(|| prefix.strip_prefix("http://"))
        .ok_or_else(|| format!("{prefix:?} must start with http:// or https://"))?;
    match rest.find('/') {
        Some(i) if i > 0 && !prefix.contains(char::is_whitespace) => Ok(()),
        _ => Err(format!(
            "{prefix:?} must name a host and end its authority with '/' (e.g. \
             \"https://artifacts.example.com/releases/\")"
        )),
    }
}

/// The pinned keys of a service: the inline `signing_keys` lines, then the lines of
/// `signing_keys_file` (blank lines and `#` comments skipped). Every problem is pushed naming its key.
fn signing_keys(
    at: &str,
    inline: Vec<String>,
    file: Option<String>,
    p: &mut Problems,
) -> Vec<serin_security::manifest::PublicKey> {
    let mut keys =
        match serin_security::manifest::parse_pinned_keys(&format!("{at}.signing_keys"), &inline) {
            Ok(k) => k,
            Err(e) => {
                p.0.push(e);
                return Vec::new();
            }
        };
    if let Some(path) = file {
        let field = format!("{at}.signing_keys_file");
        match std::fs::read_to_string(&path) {
            Err(e) => p.push(field, format!("cannot read {path:?}: {e}")),
            Ok(text) => {
                let lines: Vec<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned)
                    .collect();
                match serin_security::manifest::parse_pinned_keys(
                    &format!("{field} {path:?} line"),
                    &lines,
                ) {
                    Ok(more) => {
                        for k in more {
                            if keys.iter().any(|have| have.id() == k.id()) {
                                p.push(
                                    field.clone(),
                                    format!("key {} is also listed in signing_keys", k.id()),
                                );
                            } else {
                                keys.push(k);
                            }
                        }
                    }
                    Err(e) => p.0.push(e),
                }
            }
        }
    }
    keys
}

// --- end of signed releases ---

/// Splits an `http://host:port/path` URL into authority and path.
fn split_http_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty()
        || authority.contains(char::is_whitespace)
        || path.contains(char::is_whitespace)
    {
        return None;
    }
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Some((authority, path.to_string()))
}

impl RawCheck {
    fn validate(self, at: &str, p: &mut Problems) -> Option<CheckConfig> {
        let interval = p.duration(&format!("{at}.interval"), &self.interval);
        let timeout = p.duration(&format!("{at}.timeout"), &self.timeout);
        let failure_threshold =
            p.positive(&format!("{at}.failure_threshold"), self.failure_threshold);
        let success_threshold =
            p.positive(&format!("{at}.success_threshold"), self.success_threshold);
        let kind = match self.kind.as_deref() {
            Some("http") => match self.url {
                None => {
                    p.push(format!("{at}.url"), "required when kind = \"http\"");
                    None
                }
                Some(url) => match split_http_url(&url) {
                    Some((authority, path)) => Some(CheckKind::Http {
                        url,
                        authority,
                        path,
                    }),
                    None => {
                        p.push(
                            format!("{at}.url"),
                            format!("{url:?} is not an http:// URL (e.g. \"http://127.0.0.1:8080/healthz\")"),
                        );
                        None
                    }
                },
            },
            Some("tcp") => match self.address {
                None => {
                    p.push(format!("{at}.address"), "required when kind = \"tcp\"");
                    None
                }
                Some(a) => match a.parse::<SocketAddr>() {
                    Ok(address) => Some(CheckKind::Tcp { address }),
                    Err(_) => {
                        p.push(
                            format!("{at}.address"),
                            format!("{a:?} is not an address (e.g. \"127.0.0.1:8080\")"),
                        );
                        None
                    }
                },
            },
            Some("command") => match self.command {
                Some(argv) if !argv.is_empty() && !argv[0].is_empty() => {
                    Some(CheckKind::Command { argv })
                }
                Some(_) => {
                    p.push(format!("{at}.command"), "must name a program");
                    None
                }
                None => {
                    p.push(format!("{at}.command"), "required when kind = \"command\"");
                    None
                }
            },
            Some("restarts") => match self.max {
                Some(m) if (0..=i64::from(u32::MAX)).contains(&m) => {
                    Some(CheckKind::Restarts { max: m as u32 })
                }
                Some(m) => {
                    p.push(format!("{at}.max"), format!("{m} must be 0 or more"));
                    None
                }
                None => {
                    p.push(format!("{at}.max"), "required when kind = \"restarts\"");
                    None
                }
            },
            Some(other) => {
                p.push(
                    format!("{at}.kind"),
                    format!("{other:?} is not one of \"http\", \"tcp\", \"command\", \"restarts\""),
                );
                None
            }
            None => {
                p.push(format!("{at}.kind"), "required");
                None
            }
        }?;
        Some(CheckConfig {
            name: self.name.unwrap_or_else(|| kind.name().to_string()),
            kind,
            interval,
            timeout,
            failure_threshold,
            success_threshold,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
coordinator = "http://127.0.0.1:7700"
tls = { insecure_plaintext = true }
state_dir = "/tmp/serin"
heartbeat_interval = "2s"

[labels]
zone = "eu-1"

[[service]]
name = "web"
binary = "web"
keep_releases = 3

[service.run]
kind = "process"
args = ["--port", "18080"]
env = { FOO = "bar" }

[[service.check]]
kind = "http"
url = "http://127.0.0.1:18080/healthz"
interval = "1s"
timeout = "500ms"

[[service.check]]
name = "port"
kind = "tcp"
address = "127.0.0.1:18080"
"#;

    #[test]
    fn signing_keys_inline_and_from_a_file_are_pinned_and_bad_ones_named() {
        let k1 = serin_security::manifest::SecretKey::generate()
            .unwrap()
            .public();
        let k2 = serin_security::manifest::SecretKey::generate()
            .unwrap()
            .public();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.pub");
        std::fs::write(&file, format!("# release keys\n\n{}\n", k2.to_line("2027"))).unwrap();
        let with =
            |keys: &str| GOOD.replace("keep_releases = 3", &format!("keep_releases = 3\n{keys}"));
        let c = Config::parse(&with(&format!(
            "signing_keys = [\"{}\"]\nsigning_keys_file = \"{}\"",
            k1.to_line("ci"),
            file.display()
        )))
        .unwrap()
        .config;
        let ids: Vec<_> = c.services[0].signing_keys.iter().map(|k| k.id()).collect();
        assert_eq!(ids, vec![k1.id(), k2.id()]);
        assert!(
            Config::parse(GOOD).unwrap().config.services[0]
                .signing_keys
                .is_empty()
        );

        let e = Config::parse(&with("signing_keys = [\"serin-ed25519 zz\"]")).unwrap_err();
        assert!(e.to_string().contains("service[0].signing_keys[0]"), "{e}");
        let e = Config::parse(&with("signing_keys_file = \"/nonexistent/web.pub\"")).unwrap_err();
        assert!(
            e.to_string().contains("service[0].signing_keys_file"),
            "{e}"
        );
    }

    #[test]
    fn url_prefixes_must_name_a_whole_authority() {
        let with = |v: &str| {
            GOOD.replace(
                "[labels]",
                &format!("[download]\nallowed_url_prefixes = {v}\n\n[labels]"),
            )
        };
        let c = Config::parse(&with("[\"https://artifacts.example.com/releases/\"]"))
            .unwrap()
            .config;
        assert_eq!(
            c.allowed_url_prefixes,
            Some(vec!["https://artifacts.example.com/releases/".to_owned()])
        );
        assert_eq!(
            Config::parse(&with("[]"))
                .unwrap()
                .config
                .allowed_url_prefixes,
            Some(vec![])
        );
        assert_eq!(
            Config::parse(GOOD).unwrap().config.allowed_url_prefixes,
            None
        );
        for bad in [
            "\"https://example.com\"",
            "\"ftp://example.com/\"",
            "\"https:///x/\"",
        ] {
            let e = Config::parse(&with(&format!("[{bad}]"))).unwrap_err();
            assert!(
                e.to_string().contains("download.allowed_url_prefixes[0]"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn good_config_validates_into_typed_values() {
        let loaded = Config::parse(GOOD).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let c = loaded.config;
        assert_eq!(c.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(c.report_interval, Duration::from_secs(30));
        assert_eq!(c.reconnect_initial, Duration::from_millis(200));
        assert_eq!(c.services.len(), 1);
        let s = &c.services[0];
        assert_eq!(s.name.as_str(), "web");
        assert_eq!(s.checks[0].name, "http");
        assert_eq!(
            s.checks[0].kind,
            CheckKind::Http {
                url: "http://127.0.0.1:18080/healthz".into(),
                authority: "127.0.0.1:18080".into(),
                path: "/healthz".into()
            }
        );
        assert_eq!(s.checks[0].failure_threshold.get(), 3);
        assert_eq!(s.checks[1].name, "port");
        assert!(
            matches!(&s.run, RunConfig::Process { args, env } if args.len() == 2 && env["FOO"] == "bar")
        );
    }

    #[test]
    fn download_limits_have_documented_defaults_and_are_checked() {
        let c = Config::parse(GOOD).unwrap().config;
        assert_eq!(
            c.download,
            DownloadLimits {
                min_bytes_per_sec: 16 * 1024,
                rate_window: Duration::from_secs(60),
                deadline: Duration::from_secs(3600),
            }
        );
        let text = GOOD.replace(
            "[labels]",
            "[download]\nmin_bytes_per_sec = 1000\nrate_window = \"5s\"\ndeadline = \"10m\"\n\n[labels]",
        );
        let c = Config::parse(&text).unwrap().config;
        assert_eq!(c.download.min_bytes_per_sec, 1000);
        assert_eq!(c.download.rate_window, Duration::from_secs(5));
        assert_eq!(c.download.deadline, Duration::from_secs(600));
        let text = GOOD.replace(
            "[labels]",
            "[download]\nmin_bytes_per_sec = -1\ndeadline = \"never\"\n\n[labels]",
        );
        let problems = Config::parse(&text).unwrap_err().problems();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("download.min_bytes_per_sec: -1")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("download.deadline: \"never\"")),
            "{problems:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
state_dir = "relative"
heartbeat_interval = "abc"

[[service]]
name = "Web"
binary = "a/b"
keep_releases = 1

[service.run]
kind = "docker"

[[service.check]]
kind = "http"
url = "http://127.0.0.1:1/"
interval = "soon"

[[service.check]]
kind = "tcp"
address = "nowhere"
failure_threshold = 0
"#;
        let err = Config::parse(text).unwrap_err();
        let problems = err.problems();
        let expect = [
            "coordinator: required",
            "state_dir: \"relative\" must be an absolute path",
            "heartbeat_interval: \"abc\" is not a duration (e.g. \"5s\")",
            "service[0].name:",
            "service[0].binary:",
            "service[0].keep_releases: 1 must be between 2 and 1000",
            "service[0].run.kind: \"docker\" is not one of",
            "service[0].check[0].interval: \"soon\" is not a duration (e.g. \"5s\")",
            "service[0].check[1].failure_threshold:",
            "service[0].check[1].address: \"nowhere\" is not an address",
            "tls: no ca, cert and key configured",
        ];
        for e in expect {
            assert!(
                problems.iter().any(|p| p.starts_with(e)),
                "missing problem {e:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
    }

    #[test]
    fn the_url_scheme_must_match_the_tls_section() {
        let files = "tls = { ca = \"/p/ca.crt\", cert = \"/p/a.crt\", key = \"/p/a.key\" }\n";
        let plain = "tls = { insecure_plaintext = true }\n";
        let config = |url: &str, tls: &str| {
            Config::parse(&format!("coordinator = \"{url}\"\n{tls}"))
                .map(|l| l.config.tls)
                .map_err(|e| e.problems())
        };
        let https_plain = config("https://c:7700", plain).unwrap_err();
        assert!(
            https_plain[0].contains("asks for https:// but [tls] has insecure_plaintext"),
            "{https_plain:?}"
        );
        let http_tls = config("http://c:7700", files).unwrap_err();
        assert!(
            http_tls[0].contains("is plaintext http:// but [tls] configures TLS"),
            "{http_tls:?}"
        );
        assert!(matches!(
            config("https://c:7700", files),
            Ok(TransportSecurity::Tls(_))
        ));
        assert_eq!(
            config("http://c:7700", plain),
            Ok(TransportSecurity::InsecurePlaintext)
        );
        let nothing = Config::parse("coordinator = \"https://c:7700\"\n")
            .unwrap_err()
            .problems();
        assert!(
            nothing
                .iter()
                .any(|p| p.starts_with("tls: no ca, cert and key")),
            "{nothing:?}"
        );
    }

    #[test]
    fn unknown_keys_warn_but_do_not_fail() {
        let text = format!("{GOOD}\nfuture_option = 1\n");
        let text = text.replace("keep_releases = 3", "keep_releases = 3\nfoo = true");
        let loaded = Config::parse(&text).unwrap();
        assert!(
            loaded
                .warnings
                .contains(&"unknown key service[0].foo".to_string()),
            "{:?}",
            loaded.warnings
        );
        assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
    }

    #[test]
    fn systemd_needs_a_unit_and_checks_need_their_fields() {
        let text = r#"
coordinator = "http://c:1"
tls = { insecure_plaintext = true }
[[service]]
name = "db"
binary = "db"
[service.run]
kind = "systemd"
[[service.check]]
kind = "command"
[[service.check]]
kind = "restarts"
"#;
        let problems = Config::parse(text).unwrap_err().problems();
        assert!(
            problems.contains(&"service[0].run.unit: required when kind = \"systemd\"".to_string()),
            "{problems:?}"
        );
        assert!(
            problems.contains(
                &"service[0].check[0].command: required when kind = \"command\"".to_string()
            ),
            "{problems:?}"
        );
        assert!(
            problems.contains(
                &"service[0].check[1].max: required when kind = \"restarts\"".to_string()
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(matches!(
            Config::parse("coordinator = "),
            Err(ConfigError::Syntax(_))
        ));
    }
}

#[cfg(test)]
mod traffic_tests {
    use super::*;
    use crate::service_manager::supervisor::SwapMode;

    fn service(run: &str, extra: &str) -> String {
        format!(
            "coordinator = \"http://127.0.0.1:7700\"\ntls = {{ insecure_plaintext = true }}\n\n[[service]]\nname = \"web\"\nbinary = \"web\"\n\n[service.run]\n{run}\n\n{extra}\n"
        )
    }

    const PROCESS: &str = "kind = \"process\"";

    #[test]
    fn traffic_swap_and_hooks_keys_validate_into_typed_values() {
        let text = service(
            PROCESS,
            "[service.traffic]\nagent_check = \"0.0.0.0:9301\"\nslow_start = \"30s\"\nslow_start_from = 5\n\n\
             [service.swap]\nmode = \"socket\"\nlisten = \"127.0.0.1:8080\"\n\n[service.hooks]\ntimeout = \"10s\"",
        );
        let loaded = Config::parse(&text).unwrap();
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let t = &loaded.config.services[0].traffic;
        assert_eq!(t.agent_check, Some("0.0.0.0:9301".parse().unwrap()));
        assert_eq!(
            t.slow_start,
            Some(crate::traffic::SlowStart::new(5, Duration::from_secs(30)).unwrap())
        );
        assert_eq!(
            t.swap,
            SwapMode::Socket {
                listen: "127.0.0.1:8080".parse().unwrap()
            }
        );
        assert_eq!(t.hook_timeout, Duration::from_secs(10));

        let t = Config::parse(&service(PROCESS, "[service.swap]\nmode = \"reload\""))
            .unwrap()
            .config
            .services[0]
            .traffic
            .clone();
        assert_eq!(
            t.swap,
            SwapMode::Reload {
                ready_timeout: Duration::from_secs(30)
            }
        );
        // Defaults: no responder, plain restart, 60 s hooks.
        let t = Config::parse(&service(PROCESS, ""))
            .unwrap()
            .config
            .services[0]
            .traffic
            .clone();
        assert_eq!((t.agent_check, t.slow_start), (None, None));
        assert_eq!(t.swap, SwapMode::Restart);
        assert_eq!(t.hook_timeout, Duration::from_secs(60));
    }

    #[test]
    fn socket_swap_on_a_systemd_unit_needs_its_socket_unit() {
        const SYSTEMD: &str = "kind = \"systemd\"\nunit = \"web.service\"";
        let problems = Config::parse(&service(
            SYSTEMD,
            "[service.swap]\nmode = \"socket\"\nsocket_unit = \"serin-no-such-unit-7f3a.socket\"\nlisten = \"127.0.0.1:80\"",
        ))
        .unwrap_err()
        .problems();
        for expected in [
            "service[0].swap.mode: the socket unit serin-no-such-unit-7f3a.socket was not found",
            "service[0].swap.listen: only for run.kind = \"process\"",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected}\n{problems:#?}"
            );
        }
        let problems = Config::parse(&service(
            PROCESS,
            "[service.swap]\nmode = \"socket\"\nlisten = \"127.0.0.1:80\"\nsocket_unit = \"web.socket\"",
        ))
        .unwrap_err()
        .problems();
        assert_eq!(
            problems,
            [
                "service[0].swap.socket_unit: only meaningful with swap.mode = \"socket\" on run.kind = \"systemd\""
            ]
        );
    }

    #[test]
    fn bad_traffic_keys_are_named() {
        let text = service(
            PROCESS,
            "[service.traffic]\nagent_check = \"localhost\"\nslow_start = \"1s\"\nslow_start_from = 0\n\n\
             [service.swap]\nmode = \"socket\"\nlisten = \"nowhere\"",
        );
        let problems = Config::parse(&text).unwrap_err().problems();
        for expected in [
            "service[0].traffic.agent_check: \"localhost\" is not an IP address and port",
            "service[0].traffic.slow_start_from: 0 must be a percentage from 1 to 100",
            "service[0].swap.listen: \"nowhere\" is not an IP address and port",
        ] {
            assert!(
                problems.iter().any(|p| p == expected),
                "{expected}\n{problems:#?}"
            );
        }
        let problems = Config::parse(&service(
            "kind = \"systemd\"\nunit = \"web.service\"",
            "[service.swap]\nmode = \"reload\"",
        ))
        .unwrap_err()
        .problems();
        assert!(
            problems[0]
                .starts_with("service[0].swap.mode: \"reload\" needs run.kind = \"process\""),
            "{problems:#?}"
        );
        let problems = Config::parse(&service(PROCESS, "[service.swap]\nmode = \"socket\""))
            .unwrap_err()
            .problems();
        assert!(
            problems[0].starts_with("service[0].swap.listen: required when swap.mode = \"socket\""),
            "{problems:#?}"
        );
        let problems = Config::parse(&service(PROCESS, "[service.swap]\nmode = \"hot\""))
            .unwrap_err()
            .problems();
        assert_eq!(
            problems,
            vec!["service[0].swap.mode: \"hot\" is not one of \"restart\", \"socket\", \"reload\""]
        );
    }

    #[test]
    fn drain_keys_validate_and_bad_ones_are_named() {
        let t = Config::parse(&service(
            PROCESS,
            "[service.traffic]\nagent_check = \"127.0.0.1:9301\"\nhaproxy_socket = \"/run/haproxy/admin.sock\"\n\
             haproxy_server = \"web/web-01\"\ndrain_timeout = \"5s\"",
        ))
        .unwrap()
        .config
        .services[0]
        .traffic
        .clone();
        assert!(t.behind_load_balancer());
        assert_eq!(t.drain_timeout, Duration::from_secs(5));
        assert_eq!(
            t.haproxy,
            Some(crate::traffic::sessions::HaproxyServer {
                socket: "/run/haproxy/admin.sock".into(),
                backend: "web".into(),
                server: "web-01".into(),
            })
        );
        let t = Config::parse(&service(PROCESS, ""))
            .unwrap()
            .config
            .services[0]
            .traffic
            .clone();
        assert!(!t.behind_load_balancer());
        assert_eq!(
            (t.drain_timeout, t.haproxy),
            (Duration::from_secs(30), None)
        );

        let problems = Config::parse(&service(
            PROCESS,
            "[service.traffic]\nagent_check = \"127.0.0.1:9301\"\nhaproxy_socket = \"/s\"\nhaproxy_server = \"web01\"",
        ))
        .unwrap_err()
        .problems();
        assert_eq!(
            problems,
            vec!["service[0].traffic.haproxy_server: \"web01\" is not \"backend/server\""]
        );
        let problems = Config::parse(&service(
            PROCESS,
            "[service.traffic]\nhaproxy_socket = \"/s\"\ndrain_timeout = \"1s\"",
        ))
        .unwrap_err()
        .problems();
        for expected in [
            "service[0].traffic.haproxy_server: required with traffic.haproxy_socket (\"backend/server\")",
            "service[0].traffic.agent_check: required with traffic.drain_timeout or traffic.haproxy_socket (a drain is answered on the agent-check port)",
        ] {
            assert!(
                problems.iter().any(|p| p == expected),
                "{expected}\n{problems:#?}"
            );
        }
    }
}
