//! The `serin-bench` command: one subcommand per scenario, plus `worker` (a slice of the fleet in
//! a child process, driven over stdin/stdout by the parent).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use serin_bench::connect::{BenchPki, Connector, Transport};
use serin_bench::coordinator::{CoordinatorSettings, serin_binary};
use serin_bench::report::Report;
use serin_bench::scenario::{self, Setup};
use serin_bench::sim_agent::SimConfig;
use serin_bench::swarm::{LocalSwarm, serve_worker};

/// The coordinator's allocator in the simulators too: they stand in for agents on other machines
/// and share this one's cores with the coordinator, so the less they take the closer the figures
/// are to a real fleet's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A fleet simulator against a real `serin serve`; prints figures as a table and JSON.
#[derive(Debug, Parser)]
#[command(name = "serin-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Attach N agents: time to connect, memory per agent, steady CPU, ListHosts, health ingest.
    Connect {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Seconds of steady state to measure CPU over.
        #[arg(long, default_value_t = 10)]
        steady_s: u64,
        /// Health reports each agent sends back to back in the ingest test (0: skip).
        #[arg(long, default_value_t = 20)]
        burst: u32,
    },
    /// One activate order to every agent (one 100 % wave): order latency, all acknowledged.
    Broadcast {
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// A no-op rollout (instant answers, 1 ms bake): wall time per wave, duplicates, CPU after.
    Rollout {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Wave list.
        #[arg(long, default_value = "1,1%,10%,50%,100%", value_delimiter = ',')]
        waves: Vec<String>,
        /// Size of the release's artifact in bytes.
        #[arg(long, default_value_t = 1024)]
        artifact_bytes: usize,
    },
    /// Artifact fan-out: C clients fetch one artifact at once, beside a plain loopback copy.
    Fanout {
        #[command(flatten)]
        target: TargetArgs,
        /// Concurrent fetches.
        #[arg(long, default_value_t = 100)]
        clients: u32,
        /// Artifact size in MiB.
        #[arg(long, default_value_t = 64)]
        size_mib: u64,
    },
    /// A few hundred agents and one rollout that must succeed on every host (the CI smoke).
    Smoke {
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Internal: run agents [from, from+count) against URL, driven over stdin/stdout.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        url: String,
        /// The run's CA directory (mutual TLS); none: plaintext.
        #[arg(long)]
        pki: Option<PathBuf>,
        #[arg(long)]
        from: u32,
        #[arg(long)]
        count: u32,
        #[command(flatten)]
        sim: SimArgs,
    },
}

/// Which coordinator binary, and where the JSON goes.
#[derive(Debug, Args)]
struct TargetArgs {
    /// The `serin` binary; default: build it with cargo (release profile unless --profile).
    #[arg(long)]
    serin: Option<PathBuf>,
    /// Cargo profile to build serin in when --serin is not given.
    #[arg(long, default_value = "release")]
    profile: String,
    /// Write the report's JSON here (`-`: stdout, after the table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Coordinator heartbeat interval (ms), sent to agents in the welcome.
    #[arg(long, default_value_t = 5000)]
    heartbeat_ms: u64,
    /// Coordinator unreachable_after (ms).
    #[arg(long, default_value_t = 15000)]
    unreachable_after_ms: u64,
    /// Longest a connect or a rollout may take (s).
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Plain HTTP/2 (`insecure_plaintext`) instead of mutual TLS, to compare the cost of TLS.
    #[arg(long)]
    plaintext: bool,
}

#[derive(Debug, Args)]
struct FleetArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Simulated agents in all.
    #[arg(long, default_value_t = 1000)]
    agents: u32,
    /// Most agents per simulator process (the open-files limit is per process).
    #[arg(long, default_value_t = 9000)]
    per_process: u32,
    #[command(flatten)]
    sim: SimArgs,
}

/// How simulated agents behave (forwarded to worker processes).
#[derive(Debug, Args, Clone)]
struct SimArgs {
    /// Period of full health reports (ms).
    #[arg(long, default_value_t = 10_000)]
    health_interval_ms: u64,
    /// Delay between an activate order and its ACTIVATED answer (ms).
    #[arg(long, default_value_t = 0)]
    activate_delay_ms: u64,
    /// Download releases over FetchArtifact (default: pretend they are on disk).
    #[arg(long)]
    fetch: bool,
    /// Fraction of activations that fail to start.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Fraction of activations that never become healthy.
    #[arg(long, default_value_t = 0.0)]
    unhealthy_rate: f64,
    /// Seed of the agents' random streams (printed in every report).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl SimArgs {
    fn config(&self) -> SimConfig {
        SimConfig {
            health_interval: Duration::from_millis(self.health_interval_ms),
            activate_delay: Duration::from_millis(self.activate_delay_ms),
            fetch: self.fetch,
            fail_rate: self.fail_rate,
            unhealthy_rate: self.unhealthy_rate,
            seed: self.seed,
            ..SimConfig::default()
        }
    }

    fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--health-interval-ms={}", self.health_interval_ms),
            format!("--activate-delay-ms={}", self.activate_delay_ms),
            format!("--fail-rate={}", self.fail_rate),
            format!("--unhealthy-rate={}", self.unhealthy_rate),
            format!("--seed={}", self.seed),
        ];
        if self.fetch {
            a.push("--fetch".into());
        }
        a
    }
}

fn setup(fleet: &FleetArgs) -> anyhow::Result<Setup> {
    let serin = serin_binary(fleet.target.serin.clone(), &fleet.target.profile)?;
    Ok(Setup {
        serin,
        exe: std::env::current_exe().context("the path of serin-bench itself")?,
        agents: fleet.agents,
        per_process: fleet.per_process,
        coordinator: coordinator_settings(&fleet.target),
        sim: fleet.sim.config(),
        sim_args: fleet.sim.to_args(),
        timeout: Duration::from_secs(fleet.target.timeout_s),
    })
}

fn coordinator_settings(t: &TargetArgs) -> CoordinatorSettings {
    CoordinatorSettings {
        heartbeat_interval: Duration::from_millis(t.heartbeat_ms),
        unreachable_after: Duration::from_millis(t.unreachable_after_ms),
        plaintext: t.plaintext,
    }
}

fn emit(report: &Report, json: Option<&PathBuf>) -> anyhow::Result<()> {
    print!("{}", report.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(report)?;
        if path.as_os_str() == "-" {
            println!("{text}");
        } else {
            std::fs::write(path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Connect {
            fleet,
            steady_s,
            burst,
        } => {
            let r =
                scenario::connect(&setup(&fleet)?, Duration::from_secs(steady_s), burst).await?;
            emit(&r, fleet.target.json.as_ref())
        }
        Cmd::Broadcast { fleet } => {
            let r = scenario::broadcast(&setup(&fleet)?).await?;
            emit(&r, fleet.target.json.as_ref())
        }
        Cmd::Rollout {
            fleet,
            waves,
            artifact_bytes,
        } => {
            let r = scenario::rollout(&setup(&fleet)?, &waves, artifact_bytes).await?;
            emit(&r, fleet.target.json.as_ref())
        }
        Cmd::Smoke { fleet } => {
            let r = scenario::smoke(&setup(&fleet)?).await?;
            emit(&r, fleet.target.json.as_ref())
        }
        Cmd::Fanout {
            target,
            clients,
            size_mib,
        } => {
            let s = Setup {
                serin: serin_binary(target.serin.clone(), &target.profile)?,
                exe: std::env::current_exe()?,
                agents: 0,
                per_process: 1,
                coordinator: coordinator_settings(&target),
                sim: SimConfig::default(),
                sim_args: Vec::new(),
                timeout: Duration::from_secs(target.timeout_s),
            };
            let r = scenario::fanout(&s, clients, size_mib).await?;
            emit(&r, target.json.as_ref())
        }
        Cmd::Worker {
            url,
            pki,
            from,
            count,
            sim,
        } => {
            let transport = match pki {
                Some(dir) => Transport::MutualTls(Arc::new(BenchPki::load(&dir)?)),
                None => Transport::Plaintext,
            };
            let connector = Connector::new(url, transport);
            let swarm = LocalSwarm::start(&connector, Arc::new(sim.config()), from..from + count);
            serve_worker(swarm).await
        }
    }
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("SERIN_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        ))
        .with_writer(std::io::stderr)
        .try_init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
