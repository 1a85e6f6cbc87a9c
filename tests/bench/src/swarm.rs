//! Many simulated agents: some in this process, the rest in worker processes.
//!
//! One process holds at most about 19,990 sockets here (the open-files limit), so a fleet larger
//! than [`SwarmPlan::per_process`] is split: the first slice runs in this process
//! ([`LocalSwarm`]), every other slice in a `serin-bench worker` child ([`Worker`]) that speaks
//! JSON lines on its stdin/stdout (`snapshot`, `command`, `stop`).

use std::ops::Range;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connect::{Connector, Transport};
use crate::sim_agent::{Command, SimAgent, SimConfig};
use crate::stats::{Snapshot, Stats};

/// Agents dialling (between connect and welcome) at once per process.
pub const DIAL_CONCURRENCY: usize = 256;

/// Agents of one process, as tokio tasks.
pub struct LocalSwarm {
    stats: Arc<Stats>,
    commands: watch::Sender<Command>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for LocalSwarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSwarm").finish_non_exhaustive()
    }
}

impl LocalSwarm {
    /// Starts agents `range` (host ids `sim-<index>`); they connect in the background.
    pub fn start(connector: &Connector, config: Arc<SimConfig>, range: Range<u32>) -> Self {
        let stats = Arc::new(Stats::default());
        let (commands, _) = watch::channel(Command::Idle);
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let gate = Arc::new(Semaphore::new(DIAL_CONCURRENCY));
        for i in range {
            let agent = SimAgent::new(i, config.clone(), stats.clone());
            tasks.spawn(agent.run(
                connector.clone(),
                gate.clone(),
                commands.subscribe(),
                shutdown.clone(),
            ));
        }
        tasks.close();
        Self {
            stats,
            commands,
            shutdown,
            tasks,
        }
    }

    /// The figures so far.
    pub fn snapshot(&self, reset: bool) -> Snapshot {
        self.stats.snapshot(reset)
    }

    /// Asks every agent to do `command`.
    pub fn command(&self, command: Command) {
        self.commands.send_replace(command);
    }

    /// Stops every agent and waits for them.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.wait().await;
    }
}

/// A request to a worker process.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum WorkerRequest {
    /// Answer with a [`Snapshot`] line.
    Snapshot { reset: bool },
    /// Pass a command to every agent (answered with an empty snapshot line).
    Command { command: Command },
    /// Stop every agent and exit.
    Stop,
}

/// A `serin-bench worker` child process running a slice of the fleet.
pub struct Worker {
    range: Range<u32>,
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("range", &self.range)
            .finish()
    }
}

impl Worker {
    /// Starts `exe worker --url … [--pki DIR] --from … --count … <sim args>`.
    pub fn start(
        exe: &PathBuf,
        connector: &Connector,
        range: Range<u32>,
        sim_args: &[String],
    ) -> anyhow::Result<Self> {
        let mut command = tokio::process::Command::new(exe);
        command.arg("worker").arg("--url").arg(connector.url());
        if let Transport::MutualTls(pki) = connector.transport() {
            command.arg("--pki").arg(pki.dir());
        }
        let mut child = command
            .arg("--from")
            .arg(range.start.to_string())
            .arg("--count")
            .arg((range.end - range.start).to_string())
            .args(sim_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start a simulator worker ({})", exe.display()))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        Ok(Self {
            range,
            child,
            stdin,
            stdout,
        })
    }

    async fn request(&mut self, req: &WorkerRequest) -> anyhow::Result<Snapshot> {
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("worker {:?} is gone", self.range))?;
        self.stdin.flush().await?;
        let answer = self
            .stdout
            .next_line()
            .await?
            .with_context(|| format!("worker {:?} exited", self.range))?;
        serde_json::from_str(&answer)
            .with_context(|| format!("bad answer from worker {:?}: {answer}", self.range))
    }

    async fn stop(mut self) {
        let _ = self.request(&WorkerRequest::Stop).await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Serves a worker's requests from stdin until `stop` or EOF.
pub async fn serve_worker(swarm: LocalSwarm) -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let req: WorkerRequest =
            serde_json::from_str(&line).with_context(|| format!("bad request {line}"))?;
        let snap = match req {
            WorkerRequest::Snapshot { reset } => swarm.snapshot(reset),
            WorkerRequest::Command { command } => {
                swarm.command(command);
                Snapshot::default()
            }
            WorkerRequest::Stop => break,
        };
        let mut s = serde_json::to_string(&snap)?;
        s.push('\n');
        out.write_all(s.as_bytes()).await?;
        out.flush().await?;
    }
    swarm.stop().await;
    out.write_all(b"{}\n").await?;
    out.flush().await?;
    Ok(())
}

/// How a fleet is split over processes.
#[derive(Debug, Clone)]
pub struct SwarmPlan {
    /// Agents in all.
    pub agents: u32,
    /// Most agents per process.
    pub per_process: u32,
}

/// The whole simulated fleet.
#[derive(Debug)]
pub struct Swarm {
    local: LocalSwarm,
    workers: Vec<Worker>,
    started: Instant,
}

impl Swarm {
    /// Starts the fleet: the first slice here, the others in worker processes of `exe`.
    pub fn start(
        plan: &SwarmPlan,
        connector: &Connector,
        config: Arc<SimConfig>,
        exe: &PathBuf,
        sim_args: &[String],
    ) -> anyhow::Result<Self> {
        let per = plan.per_process.max(1);
        let first = plan.agents.min(per);
        let started = Instant::now();
        let mut workers = Vec::new();
        let mut from = first;
        while from < plan.agents {
            let to = (from + per).min(plan.agents);
            workers.push(Worker::start(exe, connector, from..to, sim_args)?);
            from = to;
        }
        let local = LocalSwarm::start(connector, config, 0..first);
        Ok(Self {
            local,
            workers,
            started,
        })
    }

    /// Processes the fleet runs in (this one included).
    pub fn processes(&self) -> usize {
        1 + self.workers.len()
    }

    /// The merged figures of every process.
    pub async fn snapshot(&mut self, reset: bool) -> anyhow::Result<Snapshot> {
        let mut snap = self.local.snapshot(reset);
        for w in &mut self.workers {
            snap.merge(w.request(&WorkerRequest::Snapshot { reset }).await?);
        }
        Ok(snap)
    }

    /// Asks every agent of every process to do `command`.
    pub async fn command(&mut self, command: Command) -> anyhow::Result<()> {
        self.local.command(command);
        for w in &mut self.workers {
            w.request(&WorkerRequest::Command { command }).await?;
        }
        Ok(())
    }

    /// Waits until `n` agents are attached; returns the time since the fleet started.
    pub async fn wait_connected(&mut self, n: u64, timeout: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            let snap = self.snapshot(false).await?;
            if snap.connected >= n {
                return Ok(self.started.elapsed());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {} of {n} agents attached after {timeout:?} ({} connect errors, {} reconnects)",
                snap.connected,
                snap.connect_errors,
                snap.reconnects
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every agent and worker.
    pub async fn stop(self) {
        for w in self.workers {
            w.stop().await;
        }
        self.local.stop().await;
    }
}
