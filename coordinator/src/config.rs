//! The coordinator's configuration file (TOML, default `/etc/serin/coordinator.toml`).
//!
//! ```toml
//! listen = "127.0.0.1:7700"        # agents and operators, one port
//! state_dir = "/var/lib/serin"      # store.redb + artifacts/
//! heartbeat_interval = "2s"         # sent to agents in Welcome
//! unreachable_after = "6s"          # no message for this long: host unreachable
//!
//! [engine]                          # rollout engine settings (every key optional)
//! rollback_timeout = "2m"           # a reachable host's answer to a rollback order
//! confirm_grace = "1m"              # added to the confirm deadline agents get
//! self_revert_grace = "5s"          # an armed host judged unhealthy: wait for its own rollback
//! order_retry_delay = "2s"          # before re-sending an order refused as busy
//! max_order_attempts = 5            # busy/stale refusals before the host counts as failed
//! analysis_gates = true             # a confident "canary worse" verdict fails the gate
//! analysis_min_checks = 20          # fewer check results per side: "insufficient data"
//! analysis_alpha = 0.01             # significance level of the canary judge
//! stage_ahead = 100                 # pending hosts staged ahead of their wave (0: off)
//!
//! [tls]                             # required: mutual TLS (files made by `serin ca`) ...
//! ca = "/etc/serin/pki/ca.crt"
//! cert = "/etc/serin/pki/coordinator.crt"
//! key = "/etc/serin/pki/coordinator.key"
//! # insecure_plaintext = true       # ... or, for development only, no TLS at all
//!
//! [enrolment]                       # optional: agents join with tokens (needs [tls])
//! listen = "0.0.0.0:7701"           # the enrolment port (server-authenticated TLS only)
//! ca_key = "/etc/serin/pki/ca.key"  # the key of [tls].ca: the coordinator issues agent certs
//! agent_cert_lifetime = "3d"        # agents renew at 2/3 of it
//! ```
//!
//! The file is parsed into a raw serde struct where every key is optional, then validated into
//! [`CoordinatorConfig`] with typed values. Validation collects every problem, each naming its
//! key, instead of stopping at the first. Unknown keys are warnings, not errors, so a rolled-back
//! coordinator still starts with a config written for a newer one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serin_security::tls::{TlsSection, TransportSecurity};

/// Default path of the config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/serin/coordinator.toml";

/// The configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or a value has the wrong type.
    #[error("config is not valid TOML: {0}")]
    Syntax(String),
    /// One or more values are invalid; one entry per problem, each naming its key.
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

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    /// Address agents and operators connect to.
    pub listen: SocketAddr,
    /// Holds `store.redb` and `artifacts/`.
    pub state_dir: PathBuf,
    /// How often agents send a heartbeat (told to them in the Welcome).
    pub heartbeat_interval: Duration,
    /// No message from an agent for this long: the host is unreachable.
    pub unreachable_after: Duration,
    /// The rollout engine's settings (`[engine]`).
    pub engine: EngineConfig,
    /// `[tls]`: mutual TLS with these files, or explicitly asked-for plaintext.
    pub tls: TransportSecurity,
    /// `[enrolment]`: join tokens, held enrolments and renewal; `None`: not offered.
    pub enrolment: Option<EnrolmentConfig>,
}

/// The `[enrolment]` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolmentConfig {
    /// The enrolment port (server-authenticated TLS; `EnrolService` only).
    pub listen: SocketAddr,
    /// The private key of the CA in `[tls] ca`: the coordinator issues agent certificates.
    pub ca_key: PathBuf,
    /// Lifetime of the agent certificates it issues (default 3 days).
    pub agent_cert_lifetime: Duration,
}

/// Default lifetime of an enrolled agent's certificate.
pub const DEFAULT_AGENT_CERT_LIFETIME: Duration = Duration::from_secs(3 * 86_400);

/// The `[enrolment]` section as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawEnrolment {
    listen: Option<String>,
    ca_key: Option<String>,
    agent_cert_lifetime: Option<String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            state_dir: PathBuf::from("/var/lib/serin"),
            heartbeat_interval: Duration::from_secs(2),
            unreachable_after: Duration::from_secs(6),
            engine: EngineConfig::default(),
            // The library default for in-process tests; a config file must say what it wants
            // (`[tls]` is required there).
            tls: TransportSecurity::InsecurePlaintext,
            enrolment: None,
        }
    }
}

/// The `[engine]` section: rollout engine settings that are not part of a rollout's spec.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// How long a reachable host may take to answer a rollback order before its rollback
    /// counts as failed (default 2 min).
    pub rollback_timeout: Duration,
    /// Added to the confirm deadline an agent gets with an activation, so its dead-man switch
    /// only fires when the coordinator is really gone (default 1 min).
    pub confirm_grace: Duration,
    /// How long the rollback order of an armed host judged unhealthy waits for the agent's own
    /// rollback (default 5 s; 0 orders it at once).
    pub self_revert_grace: Duration,
    /// Delay before re-sending an order an agent refused as busy (default 2 s).
    pub order_retry_delay: Duration,
    /// Busy or stale refusals of one order before the host counts as failed (default 5).
    pub max_order_attempts: u32,
    /// Whether a confident "canary worse" verdict fails a gate (default true); when false the
    /// comparison is evidence only.
    pub analysis_gates: bool,
    /// Fewer check results than this on either side: "insufficient data" (default 20).
    pub analysis_min_checks: u64,
    /// Significance level of the canary judge, in (0, 0.5] (default 0.01).
    pub analysis_alpha: f64,
    /// Pending hosts given a stage order ahead of their wave (default 100; 0 turns it off).
    pub stage_ahead: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let e = crate::rollout::EngineSettings::default();
        Self {
            rollback_timeout: e.rollback_timeout,
            confirm_grace: e.confirm_grace,
            self_revert_grace: e.self_revert_grace,
            order_retry_delay: e.order_retry_delay,
            max_order_attempts: e.max_order_attempts,
            analysis_gates: e.analysis_gates,
            analysis_min_checks: e.analysis.min_checks,
            analysis_alpha: e.analysis.alpha,
            stage_ahead: e.stage_ahead,
        }
    }
}

impl EngineConfig {
    /// The engine settings these values make, with `resume_grace` (the server passes its
    /// `unreachable_after`: after a restart, hosts are unknown for as long as a live agent can
    /// take to be noticed as gone).
    pub fn settings(&self, resume_grace: Duration) -> crate::rollout::EngineSettings {
        let mut e = crate::rollout::EngineSettings {
            rollback_timeout: self.rollback_timeout,
            confirm_grace: self.confirm_grace,
            self_revert_grace: self.self_revert_grace,
            order_retry_delay: self.order_retry_delay,
            max_order_attempts: self.max_order_attempts,
            analysis_gates: self.analysis_gates,
            stage_ahead: self.stage_ahead,
            resume_grace,
            ..Default::default()
        };
        e.analysis.min_checks = self.analysis_min_checks;
        e.analysis.alpha = self.analysis_alpha;
        e
    }
}

/// The `[engine]` section as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawEngine {
    rollback_timeout: Option<String>,
    confirm_grace: Option<String>,
    self_revert_grace: Option<String>,
    order_retry_delay: Option<String>,
    max_order_attempts: Option<u32>,
    analysis_gates: Option<bool>,
    analysis_min_checks: Option<u64>,
    analysis_alpha: Option<f64>,
    stage_ahead: Option<u32>,
}

impl RawEngine {
    fn validate(self, p: &mut Problems) -> EngineConfig {
        let d = EngineConfig::default();
        let max_order_attempts = match self.max_order_attempts {
            Some(0) => {
                p.push("engine.max_order_attempts", "must be at least 1");
                d.max_order_attempts
            }
            Some(n) => n,
            None => d.max_order_attempts,
        };
        let analysis_alpha = match self.analysis_alpha {
            Some(a) if !(a > 0.0 && a <= 0.5) => {
                p.push(
                    "engine.analysis_alpha",
                    format!("{a} is not a significance level in (0, 0.5]"),
                );
                d.analysis_alpha
            }
            Some(a) => a,
            None => d.analysis_alpha,
        };
        EngineConfig {
            rollback_timeout: p.duration(
                "engine.rollback_timeout",
                self.rollback_timeout,
                d.rollback_timeout,
            ),
            confirm_grace: p.duration("engine.confirm_grace", self.confirm_grace, d.confirm_grace),
            self_revert_grace: p.duration(
                "engine.self_revert_grace",
                self.self_revert_grace,
                d.self_revert_grace,
            ),
            order_retry_delay: p.duration(
                "engine.order_retry_delay",
                self.order_retry_delay,
                d.order_retry_delay,
            ),
            max_order_attempts,
            analysis_gates: self.analysis_gates.unwrap_or(d.analysis_gates),
            analysis_min_checks: self.analysis_min_checks.unwrap_or(d.analysis_min_checks),
            analysis_alpha,
            stage_ahead: self.stage_ahead.unwrap_or(d.stage_ahead),
        }
    }
}

/// A validated configuration and the warnings found on the way (unknown keys).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: CoordinatorConfig,
    pub warnings: Vec<String>,
}

/// What `serin check-config` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors: the coordinator would refuse to start. Each names its key.
    pub problems: Vec<String>,
    /// Warnings: the coordinator starts anyway (e.g. `unknown key foo`).
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// True when the config can be used.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The file as written: every key optional, values still text.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawConfig {
    listen: Option<String>,
    state_dir: Option<String>,
    heartbeat_interval: Option<String>,
    unreachable_after: Option<String>,
    engine: RawEngine,
    tls: TlsSection,
    enrolment: Option<RawEnrolment>,
}

struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, key: &str, problem: impl AsRef<str>) {
        self.0.push(format!("{key}: {}", problem.as_ref()));
    }

    fn duration(&mut self, key: &str, value: Option<String>, default: Duration) -> Duration {
        let Some(value) = value else {
            return default;
        };
        match humantime::parse_duration(value.trim()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.push(key, format!("{value:?} must be greater than zero"));
                default
            }
            Err(_) => {
                self.push(key, format!("{value:?} is not a duration (e.g. \"5s\")"));
                default
            }
        }
    }
}

/// Formats a serde_ignored path as a dotted key.
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

impl RawConfig {
    fn validate(self) -> Result<CoordinatorConfig, ConfigError> {
        let defaults = CoordinatorConfig::default();
        let mut p = Problems(Vec::new());
        let listen = match self.listen {
            None => defaults.listen,
            Some(s) => match s.trim().parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    p.push(
                        "listen",
                        format!("{s:?} is not an IP address and port (e.g. \"127.0.0.1:7700\")"),
                    );
                    defaults.listen
                }
            },
        };
        let state_dir = match self.state_dir {
            None => defaults.state_dir,
            Some(s) if s.trim().is_empty() => {
                p.push("state_dir", "must not be empty");
                defaults.state_dir
            }
            Some(s) => PathBuf::from(s),
        };
        let heartbeat_interval = p.duration(
            "heartbeat_interval",
            self.heartbeat_interval,
            defaults.heartbeat_interval,
        );
        let unreachable_after = p.duration(
            "unreachable_after",
            self.unreachable_after,
            defaults.unreachable_after,
        );
        let engine = self.engine.validate(&mut p);
        let tls = match self.tls.validate() {
            Ok(t) => t,
            Err(problems) => {
                p.0.extend(problems);
                defaults.tls
            }
        };
        let enrolment = self.enrolment.and_then(|e| {
            let listen = match e.listen.as_deref().map(|s| s.trim().parse::<SocketAddr>()) {
                Some(Ok(a)) => Some(a),
                Some(Err(_)) => {
                    p.push("enrolment.listen", "is not an IP address and port");
                    None
                }
                None => {
                    p.push("enrolment.listen", "missing (the enrolment port)");
                    None
                }
            };
            let ca_key = match e.ca_key {
                Some(k) if !k.trim().is_empty() => Some(PathBuf::from(k)),
                _ => {
                    p.push("enrolment.ca_key", "missing (the key of the CA in tls.ca)");
                    None
                }
            };
            if matches!(tls, TransportSecurity::InsecurePlaintext) {
                p.push("enrolment", "needs [tls] (enrolment issues certificates)");
            }
            let agent_cert_lifetime = p.duration(
                "enrolment.agent_cert_lifetime",
                e.agent_cert_lifetime,
                DEFAULT_AGENT_CERT_LIFETIME,
            );
            Some(EnrolmentConfig {
                listen: listen?,
                ca_key: ca_key?,
                agent_cert_lifetime,
            })
        });
        let config = CoordinatorConfig {
            listen,
            state_dir,
            heartbeat_interval,
            unreachable_after,
            engine,
            tls,
            enrolment,
        };
        p.0.extend(config.problems());
        if p.0.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(p.0))
        }
    }
}

impl CoordinatorConfig {
    /// Reads and validates the file at `path`; unknown keys are logged as warnings.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let loaded = Self::load_with_warnings(path)?;
        for w in &loaded.warnings {
            tracing::warn!(path = %path.display(), "config: {w}");
        }
        Ok(loaded.config)
    }

    /// Reads and validates the file at `path`, returning the warnings too.
    pub fn load_with_warnings(path: &Path) -> Result<Loaded, ConfigError> {
        Self::load_with(path, false)
    }

    /// [`Self::load_with_warnings`], with `serin serve --insecure-plaintext`: plaintext as if the
    /// file said `[tls] insecure_plaintext = true` (a file that configures TLS files conflicts).
    pub fn load_with(path: &Path, insecure_plaintext: bool) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_with(&text, insecure_plaintext)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Loaded, ConfigError> {
        Self::parse_with(text, false)
    }

    fn parse_with(text: &str, insecure_plaintext: bool) -> Result<Loaded, ConfigError> {
        let mut warnings = Vec::new();
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let mut raw: RawConfig = serde_ignored::deserialize(de, |path| {
            warnings.push(format!("unknown key {}", key_path(&path)));
        })
        .map_err(|e| ConfigError::Syntax(e.to_string()))?;
        raw.tls.insecure_plaintext |= insecure_plaintext;
        let config = raw.validate()?;
        Ok(Loaded { config, warnings })
    }

    /// Problems of the typed values taken together (call again after command-line overrides).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.unreachable_after <= self.heartbeat_interval {
            p.push(format!(
                "unreachable_after: {} must be longer than heartbeat_interval ({}), \
                 or every host is declared unreachable between two heartbeats",
                humantime::format_duration(self.unreachable_after),
                humantime::format_duration(self.heartbeat_interval)
            ));
        }
        if self.heartbeat_interval > Duration::from_secs(3600) {
            p.push("heartbeat_interval: must be at most 1h".to_string());
        }
        if self.state_dir.as_os_str().is_empty() {
            p.push("state_dir: must not be empty".to_string());
        }
        p
    }

    /// Checks the typed values together, e.g. after `--listen`/`--state-dir` overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = self.problems();
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }
}

/// What `serin check-config --config PATH` prints: every problem and warning of the file.
pub fn check_config(path: &Path) -> CheckReport {
    match CoordinatorConfig::load_with_warnings(path) {
        Ok(l) => CheckReport {
            problems: Vec::new(),
            warnings: l.warnings,
        },
        Err(e) => CheckReport {
            problems: e.problems(),
            warnings: Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The development switch, for tests about other keys.
    const PLAIN: &str = "tls = { insecure_plaintext = true }\n";

    #[test]
    fn tls_is_required_files_or_explicit_plaintext() {
        let e = CoordinatorConfig::parse("").unwrap_err();
        assert!(
            e.problems()[0].contains("or set tls.insecure_plaintext = true for development only"),
            "{e}"
        );
        let l = CoordinatorConfig::parse(
            "[tls]\nca = \"/p/ca.crt\"\ncert = \"/p/c.crt\"\nkey = \"/p/c.key\"\n",
        )
        .unwrap();
        assert!(matches!(l.config.tls, TransportSecurity::Tls(_)));
        // `serin serve --insecure-plaintext` stands for the switch, and conflicts with files.
        let l = CoordinatorConfig::parse_with("", true).unwrap();
        assert_eq!(l.config.tls, TransportSecurity::InsecurePlaintext);
        let e = CoordinatorConfig::parse_with("[tls]\nca = \"/p/ca.crt\"\n", true).unwrap_err();
        assert!(e.to_string().contains("conflicts with tls.ca"), "{e}");
    }

    #[test]
    fn enrolment_needs_a_port_the_ca_key_and_tls() {
        let tls = "[tls]\nca = \"/p/ca.crt\"\ncert = \"/p/c.crt\"\nkey = \"/p/c.key\"\n";
        let l = CoordinatorConfig::parse(&format!(
            "{tls}[enrolment]\nlisten = \"0.0.0.0:7701\"\nca_key = \"/p/ca.key\"\nagent_cert_lifetime = \"2d\"\n"
        ))
        .unwrap();
        let e = l.config.enrolment.expect("enrolment configured");
        assert_eq!(e.agent_cert_lifetime, Duration::from_secs(2 * 86_400));
        assert_eq!(e.ca_key, PathBuf::from("/p/ca.key"));
        let e = CoordinatorConfig::parse(&format!("{tls}[enrolment]\nlisten = \"nope\"\n"))
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("enrolment.listen") && text.contains("enrolment.ca_key"),
            "{text}"
        );
        let e = CoordinatorConfig::parse(&format!(
            "{PLAIN}[enrolment]\nlisten = \"0.0.0.0:7701\"\nca_key = \"/k\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("needs [tls]"), "{e}");
    }

    #[test]
    fn empty_file_gives_defaults() {
        let l = CoordinatorConfig::parse(PLAIN).unwrap();
        assert_eq!(l.config, CoordinatorConfig::default());
        assert!(l.warnings.is_empty());
    }

    #[test]
    fn values_are_typed() {
        let l = CoordinatorConfig::parse(
            r#"
            listen = "0.0.0.0:9000"
            state_dir = "/srv/serin"
            heartbeat_interval = "500ms"
            unreachable_after = "3s"
            tls = { insecure_plaintext = true }
            "#,
        )
        .unwrap();
        assert_eq!(l.config.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(l.config.state_dir, PathBuf::from("/srv/serin"));
        assert_eq!(l.config.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(l.config.unreachable_after, Duration::from_secs(3));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let e = CoordinatorConfig::parse(
            r#"
            listen = "localhost"
            heartbeat_interval = "soon"
            unreachable_after = "0s"
            "#,
        )
        .unwrap_err();
        let p = e.problems();
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].starts_with("listen: \"localhost\" is not"), "{p:?}");
        assert!(
            p[1].starts_with("heartbeat_interval: \"soon\" is not a duration"),
            "{p:?}"
        );
        assert!(
            p[2].starts_with("unreachable_after: \"0s\" must be greater"),
            "{p:?}"
        );
        assert!(
            p[3].starts_with("tls: no ca, cert and key configured"),
            "{p:?}"
        );
    }

    #[test]
    fn unreachable_after_must_exceed_the_heartbeat() {
        let e = CoordinatorConfig::parse("heartbeat_interval = \"5s\"\nunreachable_after = \"5s\"")
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("unreachable_after: 5s must be longer"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_warn_and_bad_toml_fails() {
        let l = CoordinatorConfig::parse(
            "listen = \"127.0.0.1:1\"\nfuture_knob = 3\n[tls]\ninsecure_plaintext = true\nfuture = 1",
        )
        .unwrap();
        assert_eq!(
            l.warnings,
            vec!["unknown key future_knob", "unknown key tls.future"]
        );
        assert!(matches!(
            CoordinatorConfig::parse("listen = "),
            Err(ConfigError::Syntax(_))
        ));
        assert!(matches!(
            CoordinatorConfig::parse("listen = 5"),
            Err(ConfigError::Syntax(_))
        ));
    }

    #[test]
    fn check_config_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"nope\"\n").unwrap();
        let r = check_config(&path);
        assert!(!r.is_ok());
        assert!(r.problems[0].starts_with("listen:"), "{r:?}");
        let r = check_config(&dir.path().join("missing.toml"));
        assert!(r.problems[0].contains("missing.toml"), "{r:?}");
        std::fs::write(&path, format!("extra = 1\n{PLAIN}")).unwrap();
        let r = check_config(&path);
        assert!(r.is_ok());
        assert_eq!(r.warnings, vec!["unknown key extra"]);
    }

    #[test]
    fn engine_settings_have_defaults_and_are_typed() {
        let l = CoordinatorConfig::parse(PLAIN).unwrap();
        assert_eq!(l.config.engine, EngineConfig::default());
        let e = l.config.engine.settings(Duration::from_secs(6));
        assert_eq!(e.rollback_timeout, Duration::from_secs(120));
        assert_eq!(e.confirm_grace, Duration::from_secs(60));
        assert!(e.analysis_gates);
        assert_eq!(e.resume_grace, Duration::from_secs(6));
        let l = CoordinatorConfig::parse(
            r#"
            tls = { insecure_plaintext = true }
            [engine]
            rollback_timeout = "30s"
            confirm_grace = "5m"
            self_revert_grace = "1s"
            analysis_gates = false
            analysis_min_checks = 50
            analysis_alpha = 0.05
            max_order_attempts = 3
            stage_ahead = 7
            "#,
        )
        .unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let e = l.config.engine.settings(Duration::from_secs(6));
        assert_eq!(e.rollback_timeout, Duration::from_secs(30));
        assert_eq!(e.confirm_grace, Duration::from_secs(300));
        assert_eq!(e.self_revert_grace, Duration::from_secs(1));
        assert!(!e.analysis_gates);
        assert_eq!(e.analysis.min_checks, 50);
        assert_eq!(e.analysis.alpha, 0.05);
        assert_eq!(e.max_order_attempts, 3);
        assert_eq!(e.stage_ahead, 7);
    }

    #[test]
    fn bad_engine_settings_name_their_key() {
        let e = CoordinatorConfig::parse(
            r#"
            [engine]
            rollback_timeout = "soon"
            analysis_alpha = 2.0
            max_order_attempts = 0
            colour = "blue"
            "#,
        )
        .unwrap_err();
        let p = e.problems();
        for key in [
            "engine.rollback_timeout",
            "engine.analysis_alpha",
            "engine.max_order_attempts",
        ] {
            assert!(p.iter().any(|x| x.starts_with(key)), "{key}: {p:?}");
        }
        let l = CoordinatorConfig::parse(&format!("{PLAIN}[engine]\ncolour = \"blue\"\n")).unwrap();
        assert_eq!(l.warnings, vec!["unknown key engine.colour"]);
    }
}
