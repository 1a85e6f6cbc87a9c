//! The `serin` command line, declared with clap derive, and the client-side checks of its values.
//!
//! Cheap checks happen here so a typo fails fast with exit code 2 and a message naming the bad
//! element (`--waves 1,10%,abc`); the coordinator stays the authority and validates every spec
//! again.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serin_proto::{grammar, wire};

use super::exit::EXIT_CODES_HELP;

/// Default coordinator URL for operator commands.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7700";

/// Default path of the coordinator's config file.
pub const DEFAULT_CONFIG: &str = "/etc/serin/coordinator.toml";

/// serin: progressive delivery of releases to a fleet of hosts.
#[derive(Debug, Parser)]
#[command(
    name = "serin",
    version,
    about = "Canary, waves and automatic rollback for services on VMs and bare metal",
    long_about = "serin ships releases of a service to a fleet of hosts: a canary cohort first, then \
                  widening waves, each gated on the health the hosts stream back, with an automatic \
                  rollback when a gate fails.\n\n`serin serve` runs the coordinator daemon; every other \
                  command is a client of a running coordinator.",
    after_help = EXIT_CODES_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// URL of the coordinator to talk to.
    #[arg(
        long,
        global = true,
        env = "SERIN_COORDINATOR",
        default_value = DEFAULT_COORDINATOR,
        value_name = "URL"
    )]
    pub coordinator: String,

    /// The serin CA certificate to verify the coordinator with (else $SERIN_CA, else
    /// ~/.config/serin/config.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// Your operator certificate (else $SERIN_CERT, else ~/.config/serin/config.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub cert: Option<PathBuf>,
    /// Your operator private key (else $SERIN_KEY, else ~/.config/serin/config.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub key: Option<PathBuf>,

    /// Output format: text for humans, json for machines (one JSON document per response message).
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format of the operator commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Tables, progress bars and colour in a terminal; plain lines when piped.
    Text,
    /// The response messages as JSON.
    Json,
}

/// The top-level subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator daemon (agents and operators talk to it on one port).
    Serve(ServeArgs),
    /// Validate the coordinator's config file and exit (0: valid, 1: problems printed).
    CheckConfig(CheckConfigArgs),
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell to generate completions for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page serin(1) (roff) to stdout; with --dir, write every page instead.
    Man {
        /// Write serin.1 and one page per subcommand (serin-rollout.1, serin-rollout-start.1,
        /// …, the pages serin(1) refers to) into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// List the hosts the coordinator knows, with their labels, services and health; revoke one.
    Hosts(HostsArgs),
    /// The audit log: every mutating call, who made it, its arguments and its result.
    Audit(AuditArgs),
    /// Admin: one-time join tokens for `serin-agent enroll`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Upload artifacts to the coordinator's content-addressed store.
    #[command(subcommand)]
    Artifact(ArtifactCommand),
    /// Register and list releases.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Plan, start, watch, steer and explain rollouts.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// The serin CA: create it and issue coordinator, agent and operator certificates (offline).
    #[command(subcommand)]
    Ca(super::pki::CaCommand),
    /// Make an ed25519 release-signing key pair (offline; keep the secret key off the coordinator).
    Keygen(super::signing::KeygenArgs),
}

/// `serin serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The coordinator's config file (TOML). When it does not exist and flags are given, defaults apply.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Address to listen on for agents and operators (overrides the file), e.g. 127.0.0.1:7700.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Directory for the store and the artifacts (overrides the file).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// DEVELOPMENT ONLY: serve plaintext gRPC without TLS or identities (as `[tls]
    /// insecure_plaintext = true`); anyone reaching the port can deploy.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

/// `serin check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The coordinator's config file (TOML).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

/// Which of a rollout's hosts `serin rollout status` (and its `--watch`) asks for: a page, or
/// `--all`. The waves, their counts and the number of hosts always cover the whole rollout.
#[derive(Debug, Clone, Copy, Args)]
pub struct HostPageArgs {
    /// List every host of the rollout instead of one page (one message: fine up to ~100,000 hosts).
    #[arg(long, conflicts_with_all = ["page_size", "offset"])]
    pub all: bool,
    /// Hosts to list, in the status's order (wave, then host id).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_HOST_PAGE, value_parser = clap::value_parser!(u32).range(1..))]
    pub page_size: u32,
    /// Skip this many hosts before the page (e.g. 100 for the second page of 100).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub offset: u32,
}

/// Hosts per page of `serin rollout status` (and of the live view of `start --wait`).
pub const DEFAULT_HOST_PAGE: u32 = 100;

impl HostPageArgs {
    /// The `(host_offset, host_limit)` of a `RolloutRef` (limit 0: every host).
    pub fn offset_limit(&self) -> (u32, u32) {
        if self.all {
            (0, 0)
        } else {
            (self.offset, self.page_size)
        }
    }
}

/// `serin hosts`.
#[derive(Debug, Args)]
pub struct HostsArgs {
    /// Label selector, e.g. "role=web,zone=eu-1". Default: every host.
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Every selected host, page after page as they arrive, instead of the summary and the first
    /// page (with `-o json`: one JSON object per host and line).
    #[arg(long)]
    pub all: bool,
    /// Hosts per page asked of the coordinator (it serves at most 2,000).
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub page_size: u32,
    /// What to do with a host (default: list the hosts).
    #[command(subcommand)]
    pub action: Option<HostsAction>,
}

/// `serin hosts ACTION`.
#[derive(Debug, Subcommand)]
pub enum HostsAction {
    /// Admin: end HOST's stream and refuse its certificate from now on (persisted).
    Revoke {
        /// The host id.
        #[arg(value_name = "HOST")]
        host: String,
        /// Why, for the audit log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Enrolments held for approval: a known host id that presented a new key.
    Pending,
    /// Admin: approve HOST's held enrolment (its new key replaces the old one).
    Approve {
        /// The host id.
        #[arg(value_name = "HOST")]
        host: String,
    },
}

/// `serin token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a one-time join token (shown once; the coordinator keeps only its hash).
    Create {
        /// Only this host id may enrol with it (default: any host id).
        #[arg(long, value_name = "HOST")]
        host_id: Option<String>,
        /// How long it is valid, e.g. "1h".
        #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "1h")]
        expires: std::time::Duration,
    },
}

/// `serin audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only entries since then: a duration ago ("1h", "30m") or a time ("2026-11-27T15:00:00Z").
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
}

/// `serin artifact ...`.
#[derive(Debug, Subcommand)]
pub enum ArtifactCommand {
    /// Upload FILE as a release of a service (streamed in 1 MiB chunks) and register it.
    Push {
        /// The artifact to upload (the service's binary).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Service the release belongs to.
        #[arg(long, short = 's')]
        service: String,
        /// Release id, e.g. 1.4.2.
        #[arg(long, short = 'r')]
        release: String,
        /// The release's signed manifest (`serin release sign`), stored and sent with it.
        #[arg(long, value_name = "MANIFEST")]
        manifest: Option<PathBuf>,
    },
}

/// `serin release ...`.
#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Register a release served from an HTTP(S) URL with a pinned sha256 and size.
    Add {
        /// Service the release belongs to.
        #[arg(long, short = 's')]
        service: String,
        /// Release id, e.g. 1.4.2.
        #[arg(long, short = 'r')]
        release: String,
        /// http:// or https:// URL the agents download the artifact from.
        #[arg(long)]
        url: String,
        /// Lowercase hex sha256 of the artifact.
        #[arg(long)]
        sha256: String,
        /// Exact size of the artifact in bytes.
        #[arg(long)]
        size: u64,
        /// The release's signed manifest (`serin release sign`), stored and sent with it.
        #[arg(long, value_name = "MANIFEST")]
        manifest: Option<PathBuf>,
    },
    /// List the registered releases.
    List {
        /// Only this service's releases.
        #[arg(long, short = 's')]
        service: Option<String>,
    },
    /// Pack a release bundle: the binary and its lifecycle hooks in one artifact (offline).
    Pack(super::bundle::PackArgs),
    /// Sign a release: write FILE.manifest with its sha256, size and counter (offline).
    Sign(super::signing::SignArgs),
    /// Check FILE and its manifest as an agent would (offline).
    Verify(super::signing::VerifyArgs),
}

/// `serin rollout ...`.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Show which host lands in which wave (and which are skipped, and why), changing nothing.
    Plan(SpecArgs),
    /// Start a rollout; with --wait, follow it live until it ends.
    Start(StartArgs),
    /// Show a rollout's state, waves, hosts, canary comparison and decisions.
    Status {
        /// The rollout id (r-...).
        id: String,
        /// Follow the rollout live until it ends (exit code as with `start --wait`).
        #[arg(long, short = 'w')]
        watch: bool,
        /// With --watch: give up after this long (exit 4), e.g. "10m".
        #[arg(long, value_parser = parse_duration, value_name = "DURATION", requires = "watch")]
        timeout: Option<Duration>,
        /// Which hosts to list beside the waves and their counts (which always cover every host).
        #[command(flatten)]
        page: HostPageArgs,
    },
    /// List rollouts, newest first.
    List {
        /// Only this service's rollouts.
        #[arg(long, short = 's')]
        service: Option<String>,
    },
    /// Pause a running rollout: no new wave starts until `resume`.
    Pause(ControlArgs),
    /// Resume a paused rollout.
    Resume(ControlArgs),
    /// End the current wave's bake now and go on.
    Promote(ControlArgs),
    /// Stop the rollout and roll back every host it touched.
    Abort(ControlArgs),
    /// Try the failed hosts of a paused rollout again.
    Retry(ControlArgs),
    /// Roll a finished rollout's hosts back to their baseline release.
    Rollback(ControlArgs),
    /// Print every decision with its evidence, and the rollout's event log.
    Explain {
        /// The rollout id (r-...).
        id: String,
    },
}

/// Arguments of the operator actions on one rollout.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The rollout id (r-...).
    pub id: String,
    /// Why; stored with the decision and shown by `explain`.
    #[arg(long)]
    pub reason: Option<String>,
}

/// `serin rollout start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The rollout to start.
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Follow the rollout live until it ends; the exit code tells how it ended.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this long (exit 4); the rollout goes on.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION", requires = "wait")]
    pub timeout: Option<Duration>,
}

/// What a rollout should do; shared by `plan` and `start`. Unset options take the coordinator's
/// defaults.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Service to roll out.
    #[arg(long, short = 's')]
    pub service: String,
    /// Release to roll out (registered with `artifact push` or `release add`).
    #[arg(long, short = 'r')]
    pub release: String,
    /// Label selector of the hosts, e.g. "role=web,zone=eu-1". Default: every host running the service.
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Wave sizes, first is the canary: cumulative counts or percents of the eligible hosts,
    /// e.g. 1,10%,50%,100% (coordinator default: 1,25%,100%).
    #[arg(long, value_parser = parse_wave_list, value_name = "LIST")]
    pub waves: Option<WaveList>,
    /// Bake time after each wave before its gate, e.g. 30s (default 30s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub bake: Option<Duration>,
    /// Bake time of the canary wave (default: --bake).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub canary_bake: Option<Duration>,
    /// How long a host must stay healthy after activation to count as healthy (default 5s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub min_healthy: Option<Duration>,
    /// A host that is not healthy this long after activation has failed (default 2m).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub healthy_deadline: Option<Duration>,
    /// A wave that has not finished this long after it started has failed (default 10m).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub progress_deadline: Option<Duration>,
    /// Hosts of the selection allowed to be unavailable at once: count or percent (N or P%).
    #[arg(long, value_parser = parse_count_or_percent, value_name = "N|P%")]
    pub max_unavailable: Option<CountOrPercent>,
    /// Hosts being changed at once: count or percent.
    #[arg(long, value_parser = parse_count_or_percent, value_name = "N|P%")]
    pub max_in_flight: Option<CountOrPercent>,
    /// Failed hosts allowed per wave before the gate fails: count or percent (default 0).
    #[arg(long, value_parser = parse_count_or_percent, value_name = "N|P%")]
    pub failure_threshold: Option<CountOrPercent>,
    /// Failed hosts allowed over the whole rollout: count or percent.
    #[arg(long, value_parser = parse_count_or_percent, value_name = "N|P%")]
    pub cumulative_failure_threshold: Option<CountOrPercent>,
    /// Unreachable hosts allowed per wave before the rollout waits for them: count or percent
    /// (default 0).
    #[arg(long, value_parser = parse_count_or_percent, value_name = "N|P%")]
    pub unreachable_threshold: Option<CountOrPercent>,
    /// What a failed gate does: roll back every touched host (default), or pause for an operator.
    #[arg(long, value_enum, value_name = "ACTION")]
    pub on_failure: Option<OnFailureArg>,
    /// Spread every wave over the values of this label (failure domains), e.g. zone.
    #[arg(long, value_name = "LABEL")]
    pub spread_by: Option<String>,
    /// At most this many failure domains in flight at once (with --spread-by).
    #[arg(long, value_name = "K")]
    pub max_domains: Option<u32>,
    /// Load-balancer weight of the canary wave's hosts while it bakes, a percent of each
    /// server's configured weight, e.g. 5% (the other waves: 100%). Hosts go to full weight
    /// when their wave passes.
    #[arg(long, value_parser = parse_weight, value_name = "P%")]
    pub canary_weight: Option<String>,
    /// Load-balancer weight of each wave's hosts while it bakes, one percent per wave, e.g.
    /// 5%,25%,50%,100% alongside --waves 1,25%,50%,100%.
    #[arg(long, value_parser = parse_weight_list, value_name = "LIST")]
    pub weights: Option<WeightList>,
    /// Requests each wave's hosts must serve since their activation before its bake can pass
    /// (counted from HAProxy's counters by the agents); too few when the bake ends: the rollout
    /// pauses with "insufficient data" (promote, resume or abort it).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), value_name = "N")]
    pub min_requests: Option<u64>,
}

/// `--on-failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnFailureArg {
    /// Roll back every host the rollout touched.
    Rollback,
    /// Pause and wait for an operator.
    Pause,
}

impl SpecArgs {
    /// The wire spec; unset options stay zero/empty so the coordinator's defaults apply.
    pub fn to_spec(&self) -> wire::RolloutSpec {
        let ms = |d: Option<Duration>| d.map(grammar::millis).unwrap_or(0);
        let cp = |v: &Option<CountOrPercent>| v.as_ref().map(|c| c.0.clone()).unwrap_or_default();
        wire::RolloutSpec {
            service: self.service.clone(),
            release: self.release.clone(),
            selector: self.selector.clone().unwrap_or_default(),
            waves: self.waves.as_ref().map(|w| w.0.clone()).unwrap_or_default(),
            bake_ms: ms(self.bake),
            canary_bake_ms: ms(self.canary_bake),
            min_healthy_ms: ms(self.min_healthy),
            healthy_deadline_ms: ms(self.healthy_deadline),
            progress_deadline_ms: ms(self.progress_deadline),
            max_unavailable: cp(&self.max_unavailable),
            max_in_flight: cp(&self.max_in_flight),
            failure_threshold: cp(&self.failure_threshold),
            cumulative_failure_threshold: cp(&self.cumulative_failure_threshold),
            on_failure: match self.on_failure {
                None => wire::OnFailure::Unspecified,
                Some(OnFailureArg::Rollback) => wire::OnFailure::Rollback,
                Some(OnFailureArg::Pause) => wire::OnFailure::Pause,
            } as i32,
            spread_label: self.spread_by.clone().unwrap_or_default(),
            max_domains_in_flight: self.max_domains.unwrap_or(0),
            unreachable_threshold: cp(&self.unreachable_threshold),
            canary_weight: self.canary_weight.clone().unwrap_or_default(),
            weights: self
                .weights
                .as_ref()
                .map(|w| w.0.clone())
                .unwrap_or_default(),
            min_requests: self.min_requests.unwrap_or(0),
        }
    }
}

/// A validated wave list: every element a positive count ("1") or a percent in (0, 100] ("10%").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaveList(pub Vec<String>);

/// A validated traffic weight list: every element a percent from 1% to 100%.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightList(pub Vec<String>);

/// A validated "N" or "P%" value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountOrPercent(pub String);

/// Parses a duration such as "30s", "2m", "1h 30m" or "500ms" with the shared grammar
/// (`serin_proto::grammar`): zero is refused (in a spec it would mean "the coordinator's
/// default"), and so is anything that is not a whole number of milliseconds (the spec counts in
/// milliseconds, so "500us" would silently become the default).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    grammar::parse_duration("duration", s).map_err(|e| e.problem)
}

/// Parses a count ("3") or a percent ("25%", "25 %") with the shared grammar.
pub fn parse_count_or_percent(s: &str) -> Result<CountOrPercent, String> {
    let l = grammar::Limit::parse("value", s).map_err(|e| e.problem)?;
    Ok(CountOrPercent(l.to_string()))
}

/// Parses one traffic weight ("5%") with the shared grammar.
pub fn parse_weight(s: &str) -> Result<String, String> {
    let p = grammar::parse_weight_percent("value", s).map_err(|e| e.problem)?;
    Ok(format!("{p}%"))
}

/// Parses a comma-separated traffic weight list ("5%,25%,100%"), naming the first bad element
/// and its position (counted from 1). Whether it has one weight per wave is the coordinator's
/// check (the default waves live there).
pub fn parse_weight_list(s: &str) -> Result<WeightList, String> {
    s.split(',')
        .enumerate()
        .map(|(i, el)| {
            parse_weight(el)
                .map_err(|e| format!("weight {} of {s:?} is {:?}: {e}", i + 1, el.trim()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(WeightList)
}

/// Parses a comma-separated wave list with the shared grammar, naming the first bad element
/// and its position (counted from 1, as an operator reads the list).
pub fn parse_wave_list(s: &str) -> Result<WaveList, String> {
    let waves = grammar::parse_wave_list(s).map_err(|e| {
        let position = e
            .field
            .strip_prefix("waves[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|i| i.parse::<usize>().ok());
        match position.and_then(|i| s.split(',').nth(i).map(|el| (i, el.trim()))) {
            Some((i, el)) => format!("wave {} of {s:?} is {el:?}: {}", i + 1, e.problem),
            None => format!("{s:?}: {}", e.problem),
        }
    })?;
    Ok(WaveList(waves.iter().map(ToString::to_string).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("serin").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn start_with_every_option_builds_the_spec() {
        let cli = parse(&[
            "--coordinator",
            "http://10.0.0.1:7700",
            "rollout",
            "start",
            "--service",
            "web",
            "--release",
            "1.4.2",
            "-l",
            "role=web,zone=eu-1",
            "--waves",
            "1, 10%,50%,100%",
            "--bake",
            "30s",
            "--canary-bake",
            "2m",
            "--min-healthy",
            "500ms",
            "--healthy-deadline",
            "1m",
            "--progress-deadline",
            "10m",
            "--max-unavailable",
            "25%",
            "--max-in-flight",
            "3",
            "--failure-threshold",
            "0",
            "--cumulative-failure-threshold",
            "10%",
            "--unreachable-threshold",
            "1",
            "--on-failure",
            "pause",
            "--spread-by",
            "zone",
            "--max-domains",
            "2",
            "--canary-weight",
            "5 %",
            "--weights",
            "5%,25%, 50%,100%",
            "--min-requests",
            "2000",
            "--wait",
            "--timeout",
            "15m",
        ])
        .expect("valid command line");
        assert_eq!(cli.coordinator, "http://10.0.0.1:7700");
        let Command::Rollout(RolloutCommand::Start(start)) = cli.command else {
            panic!("expected rollout start, got {:?}", cli.command);
        };
        assert!(start.wait);
        assert_eq!(start.timeout, Some(Duration::from_secs(900)));
        let spec = start.spec.to_spec();
        assert_eq!(spec.service, "web");
        assert_eq!(spec.release, "1.4.2");
        assert_eq!(spec.selector, "role=web,zone=eu-1");
        assert_eq!(spec.waves, ["1", "10%", "50%", "100%"]);
        assert_eq!(spec.bake_ms, 30_000);
        assert_eq!(spec.canary_bake_ms, 120_000);
        assert_eq!(spec.min_healthy_ms, 500);
        assert_eq!(spec.healthy_deadline_ms, 60_000);
        assert_eq!(spec.progress_deadline_ms, 600_000);
        assert_eq!(spec.max_unavailable, "25%");
        assert_eq!(spec.max_in_flight, "3");
        assert_eq!(spec.failure_threshold, "0");
        assert_eq!(spec.cumulative_failure_threshold, "10%");
        assert_eq!(spec.unreachable_threshold, "1");
        assert_eq!(spec.on_failure, wire::OnFailure::Pause as i32);
        assert_eq!(spec.spread_label, "zone");
        assert_eq!(spec.max_domains_in_flight, 2);
        assert_eq!(spec.canary_weight, "5%");
        assert_eq!(spec.weights, ["5%", "25%", "50%", "100%"]);
        assert_eq!(spec.min_requests, 2000);
    }

    #[test]
    fn bad_traffic_weights_name_the_element() {
        let e = parse(&[
            "rollout",
            "start",
            "-s",
            "web",
            "-r",
            "2",
            "--weights",
            "5%,x,100%",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("weight 2 of \"5%,x,100%\" is \"x\""), "{e}");
        let e = parse(&[
            "rollout",
            "start",
            "-s",
            "web",
            "-r",
            "2",
            "--canary-weight",
            "5",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a percent"), "{e}");
    }

    #[test]
    fn unset_options_leave_the_coordinator_defaults() {
        let cli = parse(&["rollout", "plan", "-s", "web", "-r", "2"]).expect("valid");
        assert_eq!(cli.coordinator, DEFAULT_COORDINATOR);
        assert_eq!(cli.output, OutputFormat::Text);
        let Command::Rollout(RolloutCommand::Plan(spec)) = cli.command else {
            panic!("expected rollout plan");
        };
        let spec = spec.to_spec();
        assert!(spec.waves.is_empty());
        assert_eq!(spec.bake_ms, 0);
        assert_eq!(spec.on_failure, wire::OnFailure::Unspecified as i32);
    }

    #[test]
    fn json_output_is_a_global_flag() {
        let cli = parse(&["hosts", "-o", "json", "-l", "zone=a"]).expect("valid");
        assert_eq!(cli.output, OutputFormat::Json);
        let Command::Hosts(h) = cli.command else {
            panic!("expected hosts");
        };
        assert_eq!(h.selector.as_deref(), Some("zone=a"));
        assert!(!h.all);
        assert_eq!(h.page_size, 500);
        let err = Cli::try_parse_from(["serin", "hosts", "--page-size", "0"]).unwrap_err();
        assert!(err.to_string().contains("--page-size"), "{err}");
    }

    #[test]
    fn a_bad_wave_list_is_a_usage_error_naming_the_element() {
        let err = parse(&[
            "rollout",
            "start",
            "-s",
            "web",
            "-r",
            "2",
            "--waves",
            "1,10%,abc",
        ])
        .expect_err("abc is not a wave size");
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(msg.contains("\"abc\""), "{msg}");
        assert!(msg.contains("wave 3"), "{msg}");
    }

    #[test]
    fn wave_list_rules() {
        assert_eq!(
            parse_wave_list("1,10%,50%,100%").expect("valid").0,
            ["1", "10%", "50%", "100%"]
        );
        for (bad, needle) in [
            ("0", "covers no host"),
            ("1,,100%", "wave 2"),
            ("150%", "more than 100%"),
            ("0%", "covers no host"),
            ("12.5%", "not a host count"),
            ("-1", "not a host count"),
            ("1,x%", "wave 2"),
            ("", "wave 1"),
            (
                "2,1,100%",
                "wave 2 of \"2,1,100%\" is \"1\": 1 does not grow",
            ),
            ("1,50%", "last wave must be 100%"),
        ] {
            let e = parse_wave_list(bad).expect_err(bad);
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
        // The coordinator's grammar: spaces inside a percentage are fine.
        assert_eq!(
            parse_wave_list("1, 10 %,100%").expect("valid").0,
            ["1", "10%", "100%"]
        );
    }

    /// Issue 6 finding 5: `--bake 500us` used to be truncated to 0 ms, which the coordinator
    /// reads as "unset", so the rollout baked 30 s. The CLI now refuses what a spec cannot carry.
    #[test]
    fn sub_millisecond_durations_are_refused_not_truncated() {
        let err = parse(&[
            "rollout",
            "start",
            "-s",
            "web",
            "-r",
            "2",
            "--bake",
            "500us",
            "--min-healthy",
            "500us",
        ])
        .expect_err("500us cannot be carried in milliseconds");
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("whole number of milliseconds"),
            "{err}"
        );
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("1500us").is_err());
        assert_eq!(
            parse_count_or_percent("10 %").expect("a percent"),
            CountOrPercent("10%".into())
        );
    }

    #[test]
    fn count_or_percent_rules() {
        assert!(parse_count_or_percent("0").is_ok());
        assert!(parse_count_or_percent("0%").is_ok());
        assert!(parse_count_or_percent("100%").is_ok());
        assert!(parse_count_or_percent("101%").is_err());
        assert!(parse_count_or_percent("many").is_err());
        let err = parse(&[
            "rollout",
            "start",
            "-s",
            "web",
            "-r",
            "2",
            "--max-unavailable",
            "lots",
        ])
        .expect_err("not a count");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("lots"));
    }

    #[test]
    fn bad_durations_and_missing_arguments_are_usage_errors() {
        for args in [
            &["rollout", "start", "-s", "web", "-r", "2", "--bake", "soon"][..],
            &["rollout", "start", "-s", "web", "-r", "2", "--bake", "0s"][..],
            &["rollout", "start", "-s", "web"][..],
            &[
                "rollout",
                "start",
                "-s",
                "web",
                "-r",
                "2",
                "--timeout",
                "5m",
            ][..],
            &["rollout", "status"][..],
            &["rollout", "launch", "r-1"][..],
            &["-o", "yaml", "hosts"][..],
            &["completions", "tcsh"][..],
            &[
                "release", "add", "-s", "web", "-r", "1", "--url", "http://x",
            ][..],
        ] {
            let err = parse(args).expect_err(&format!("{args:?} should be rejected"));
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
        let err = parse(&["rollout", "start", "-s", "web", "-r", "2", "--bake", "soon"])
            .expect_err("bad duration");
        assert!(err.to_string().contains("soon"), "{err}");
    }

    #[test]
    fn control_commands_take_an_id_and_a_reason() {
        let cli = parse(&["rollout", "abort", "r-17", "--reason", "bad canary"]).expect("valid");
        let Command::Rollout(RolloutCommand::Abort(c)) = cli.command else {
            panic!("expected abort");
        };
        assert_eq!(c.id, "r-17");
        assert_eq!(c.reason.as_deref(), Some("bad canary"));
        let cli = parse(&["rollout", "status", "r-17", "--watch", "--timeout", "2m"]).expect("ok");
        assert!(matches!(
            cli.command,
            Command::Rollout(RolloutCommand::Status { watch: true, timeout: Some(t), .. })
                if t == Duration::from_secs(120)
        ));
    }

    #[test]
    fn serve_flags_override_the_config_file() {
        let cli =
            parse(&["serve", "--listen", "127.0.0.1:0", "--state-dir", "/tmp/x"]).expect("ok");
        let Command::Serve(s) = cli.command else {
            panic!("expected serve");
        };
        assert_eq!(s.config, PathBuf::from(DEFAULT_CONFIG));
        assert_eq!(s.listen, Some("127.0.0.1:0".parse().expect("addr")));
        assert!(parse(&["serve", "--listen", "nowhere"]).is_err());
    }

    #[test]
    fn help_documents_the_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes:"), "{help}");
        assert!(help.contains("5  the rollout is paused"), "{help}");
    }
}
