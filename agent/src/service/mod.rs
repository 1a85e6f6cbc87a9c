//! The task that owns one managed service: it admits orders, stages releases, drives the
//! activation machine (executing its commands: persist, swap, restart, report), runs the health
//! checks and reports.
//!
//! Everything about a service happens in this one task, driven by one [`Input`] enum and a few
//! timers; the only shared pieces are the outgoing queue and the inventory snapshot. The task's
//! state is [`ServiceTask`]; its behaviour is split by concern, each an `impl ServiceTask` block:
//!
//! - this module: the task itself (`spawn`, the `select!` loop, start-up replay, sending results);
//! - [`admission`]: orders in — sequence admission, then rollback, confirm and hold;
//! - [`staging`]: downloads — starting a stage, its end, preemption by a newer order;
//! - [`driver`]: the activation driver — executes the activation machine's commands (persist,
//!   swap, restart, report, finish), restarts and pruning;
//! - [`probes`]: health — probe tasks with process generations, the verdict and the dead-man
//!   switch's observations, health reports;
//! - [`inventory`]: what the Hello and `serin hosts` show about the service;
//! - [`traffic`]: the load balancer (drain, wait until idle, undrain through the agent-check
//!   state) and the incoming release's lifecycle hooks, with their evidence.

use std::sync::Arc;
use std::time::Duration;

use serin_proto::Order;
use serin_proto::wire::{self, OrderPhase, ResultCode};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activation::{self, Activation};
use crate::config::ServiceConfig;
use crate::fault;
use crate::fetch::Fetcher;
use crate::health::{HealthMonitor, ProbeResult};
use crate::metrics::Metrics;
use crate::orders;
use crate::release_store::{ReleaseStore, StageError, StagePolicy, Staged, unix_ms};
use crate::service_manager::{ServiceManager, ServiceStatus};
use crate::state::{ServiceState, StateFile};

/// Something going up to the coordinator.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// An order result (queued while disconnected).
    Result(wire::OrderResult),
    /// A health report (only the latest matters).
    Health(wire::HealthReport),
}

/// An input to a service task.
#[derive(Debug)]
pub enum Input {
    /// An order for this service.
    Order(Order),
    /// A probe of check `index` finished.
    Probe {
        /// Index into the health monitor's checks.
        index: usize,
        /// The process generation the probe was started in; results of another are dropped.
        generation: u64,
        /// The outcome.
        result: ProbeResult,
    },
    /// The service manager's status, polled in process generation `generation`.
    Status {
        /// The process generation the poll was started in.
        generation: u64,
        /// What the manager said.
        status: ServiceStatus,
    },
    /// Send a full health report now (e.g. after a reconnect).
    ReportNow,
}

/// Handle to a running service task.
#[derive(Debug, Clone)]
pub struct ServiceHandle {
    /// Where to send inputs.
    pub tx: mpsc::Sender<Input>,
    /// The latest inventory of the service, for Hello messages.
    pub inventory: watch::Receiver<wire::ServiceInventory>,
    /// The latest `HoldConfirm` for the service: the coordinator holds its armed activation of
    /// a release (it is alive and still deciding), so its dead-man switch must not fire for
    /// lack of a confirm. A level, not a queued input: a newer hold replaces an older one, and
    /// a queue full of probe results cannot drop it (holds never compete with orders).
    pub hold: watch::Sender<Option<serin_proto::HoldConfirm>>,
}

/// What the service task needs from the agent.
#[derive(Debug, Clone)]
pub struct Context {
    /// Downloads.
    pub fetcher: Fetcher,
    /// Metrics sampler.
    pub metrics: Metrics,
    /// Queue to the coordinator connection.
    pub upstream: mpsc::Sender<Upstream>,
    /// How often a full health report goes up.
    pub report_interval: Duration,
    /// How stages retry and when they give up on a download.
    pub stage_policy: StagePolicy,
}

/// Why a service task could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceInitError {
    /// The release store could not be opened.
    #[error("service {service}: cannot open release store: {source}")]
    Store {
        /// Service.
        service: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The state file is unusable.
    #[error("service {service}: {source}")]
    State {
        /// Service.
        service: String,
        /// Cause.
        source: crate::state::StateError,
    },
}

mod admission;
mod driver;
mod inventory;
mod probes;
mod signing;
mod staging;
mod traffic;

use probes::ProbeEpoch;
use staging::{StageJob, flatten_stage};

/// Everything one service task owns.
struct ServiceTask {
    cfg: ServiceConfig,
    ctx: Context,
    store: ReleaseStore,
    state_file: StateFile,
    state: ServiceState,
    manager: Arc<dyn ServiceManager>,
    monitor: HealthMonitor,
    last_status: ServiceStatus,
    restart_baseline: u32,
    job: Option<StageJob>,
    /// The release the last stage-only order put on disk, kept until an activation of it (or a
    /// later stage) so that pruning does not remove what the coordinator is about to activate.
    staged: Option<String>,
    /// The release whose stage the order being handled cancelled, for its answer.
    last_preempted: Option<String>,
    inventory: watch::Sender<wire::ServiceInventory>,
    last_verdict: activation::Verdict,
    /// The probes' epoch: which process generation they observe, and whether they run at all.
    epoch: watch::Sender<ProbeEpoch>,
    /// The agent-check state HAProxy polls; `None`: the service is not behind a load balancer.
    traffic: Option<crate::traffic::TrafficHandle>,
    /// When the server was last drained, for the time it spent out of rotation.
    drained_at: Option<std::time::Instant>,
    /// Evidence (drain timings, hook outcomes) for the next result sent.
    evidence: Vec<String>,
    /// The target weight before an order's weight replaced it, restored by a rollback's undrain.
    weight_before: Option<u8>,
}

/// Opens the service's store and state, and spawns its task (which first replays the journal).
/// `traffic`: the state of the service's agent-check responder, which the task drives on each
/// swap (drain → wait until idle → swap → healthy → undrain).
pub fn spawn(
    cfg: ServiceConfig,
    state_dir: &std::path::Path,
    manager: Arc<dyn ServiceManager>,
    ctx: Context,
    traffic: Option<crate::traffic::TrafficHandle>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<ServiceHandle, ServiceInitError> {
    let service = cfg.name.to_string();
    let store = ReleaseStore::open(state_dir, &cfg.name, &cfg.binary).map_err(|source| {
        ServiceInitError::Store {
            service: service.clone(),
            source,
        }
    })?;
    let state_file = StateFile::new(store.dir());
    let state = state_file
        .load()
        .map_err(|source| ServiceInitError::State { service, source })?;
    if cfg.signing_keys.is_empty() {
        tracing::warn!(
            service = cfg.name.as_str(),
            "no signing keys pinned for this service: its releases are not verified"
        );
    } else {
        tracing::info!(
            service = cfg.name.as_str(),
            keys = cfg.signing_keys.len(),
            floor = state.floor,
            "releases of this service must be signed by a pinned key"
        );
    }
    let (tx, rx) = mpsc::channel(256);
    let monitor = HealthMonitor::new(&cfg.checks);
    let (inventory, inventory_rx) = watch::channel(wire::ServiceInventory::default());
    let (hold, hold_rx) = watch::channel(None);
    let mut task = ServiceTask {
        cfg,
        ctx,
        store,
        state_file,
        state,
        manager,
        monitor,
        last_status: ServiceStatus::default(),
        restart_baseline: 0,
        job: None,
        staged: None,
        last_preempted: None,
        inventory,
        last_verdict: activation::Verdict::Unknown,
        epoch: watch::Sender::new(ProbeEpoch {
            generation: 0,
            active: true,
        }),
        traffic,
        drained_at: None,
        evidence: Vec::new(),
        weight_before: None,
    };
    task.publish_inventory();
    let probes = task.spawn_probes(tracker, &tx, shutdown.clone());
    tracker.spawn(task.run(rx, hold_rx, shutdown, probes));
    Ok(ServiceHandle {
        tx,
        inventory: inventory_rx,
        hold,
    })
}

async fn sleep_until_unix_ms(at: Option<u64>) {
    match at {
        Some(at) => {
            let now = unix_ms();
            tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))).await;
        }
        None => std::future::pending().await,
    }
}

impl ServiceTask {
    fn name(&self) -> &str {
        self.cfg.name.as_str()
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut holds: watch::Receiver<Option<serin_proto::HoldConfirm>>,
        shutdown: CancellationToken,
        probes: CancellationToken,
    ) {
        self.replay().await;
        let mut jobs: JoinSet<Result<Staged, StageError>> = JoinSet::new();
        let mut report = tokio::time::interval(self.ctx.report_interval);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self
                .state
                .activation
                .as_ref()
                .and_then(Activation::next_deadline);
            // A hold that arrived is applied before anything else can tick the activation
            // (every input may fire its confirm deadline).
            self.take_hold(&mut holds).await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                // `changed` marks the value seen: apply it here.
                Ok(()) = holds.changed() => {
                    let hold = holds.borrow_and_update().clone();
                    if let Some(hold) = hold {
                        self.hold(hold).await;
                    }
                }
                input = rx.recv() => match input {
                    None => break,
                    Some(Input::Order(order)) => self.handle_order(order, &mut jobs).await,
                    Some(Input::Probe { index, generation, result }) => {
                        if generation != self.generation() {
                            tracing::debug!(service = self.name(), index, generation, detail = %result.detail, "dropping a probe result about an earlier process");
                            continue;
                        }
                        if let Some(check) = self.monitor.checks.get_mut(index) {
                            check.record(result);
                        }
                        self.after_health().await;
                    }
                    Some(Input::Status { generation, status }) => {
                        if generation != self.generation() {
                            continue;
                        }
                        self.record_status(status);
                        self.after_health().await;
                    }
                    Some(Input::ReportNow) => self.send_health().await,
                },
                Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                    self.stage_done(flatten_stage(done), None).await;
                }
                _ = sleep_until_unix_ms(deadline), if deadline.is_some() => {
                    // A hold that came in while this deadline was due goes first.
                    self.take_hold(&mut holds).await;
                    self.feed(activation::Input::Tick { now_ms: unix_ms() }).await;
                }
                _ = report.tick() => self.send_health().await,
            }
        }
        probes.cancel();
        if let Some(job) = &self.job {
            job.cancel.cancel();
        }
        while jobs.join_next().await.is_some() {}
        tracing::info!(
            service = self.name(),
            "service task stopped; the service keeps running"
        );
    }

    /// Applies the latest hold if one arrived since the last look.
    async fn take_hold(&mut self, holds: &mut watch::Receiver<Option<serin_proto::HoldConfirm>>) {
        if !holds.has_changed().unwrap_or(false) {
            return;
        }
        let hold = holds.borrow_and_update().clone();
        if let Some(hold) = hold {
            self.hold(hold).await;
        }
    }

    async fn replay(&mut self) {
        self.store.clean_staging();
        if let Some(a) = self.state.activation.take() {
            // The responder of a restarted agent answers `ready`: an activation that was
            // drained (anything short of reported healthy) goes out of rotation again first.
            let undrained = matches!(
                a.phase,
                activation::Phase::Armed {
                    reported_healthy: true,
                    ..
                }
            );
            if a.drain
                && !undrained
                && let Some(traffic) = &self.traffic
            {
                traffic.update(crate::traffic::TrafficState::drain);
                self.drained_at = Some(std::time::Instant::now());
            }
            let intact = self.store.installed(&a.to).is_some();
            tracing::info!(service = self.name(), to = %a.to, phase = ?a.phase, intact, "replaying activation journal");
            let step = a.resume(intact);
            self.drive(step).await;
        }
        self.ensure_running().await;
        self.publish_inventory();
    }

    /// Makes sure the process running is the one `current` points at.
    async fn ensure_running(&mut self) {
        let Some(current) = self.store.current() else {
            return;
        };
        let status = self.manager.status().await.unwrap_or_default();
        let running_release = self.manager.running_release().await;
        let result = if !status.running {
            tracing::info!(service = self.name(), release = %current, "starting service");
            self.pause_probes();
            let r = self.manager.start().await;
            self.new_generation();
            r
        } else if running_release.as_ref().is_some_and(|r| *r != current) {
            tracing::info!(service = self.name(), release = %current, running = ?running_release, "service runs another release than current; restarting");
            self.pause_probes();
            let r = self.manager.restart().await;
            self.new_generation();
            r
        } else {
            Ok(())
        };
        if let Err(e) = result {
            tracing::warn!(service = self.name(), error = %e, "cannot start service");
        }
        if let Ok(s) = self.manager.status().await {
            self.restart_baseline = s.restarts;
            self.last_status = s;
        }
    }

    async fn send(&mut self, mut result: wire::OrderResult, record: bool) {
        // Every result says how far this agent's sequence is, so a coordinator whose counter
        // is behind can move past it.
        result.last_seq = self.state.last_seq;
        result.last_epoch = self.state.last_epoch;
        if record {
            self.state.record(&result);
            if let Err(e) = self.state_file.save(&self.state) {
                tracing::error!(service = self.name(), error = %e, "cannot persist order result");
            }
            fault::point("result-recorded");
        }
        tracing::info!(
            service = self.name(),
            seq = result.seq,
            phase = ?OrderPhase::try_from(result.phase).unwrap_or_default(),
            code = ?ResultCode::try_from(result.code).unwrap_or_default(),
            message = %result.message,
            "order result"
        );
        match fault::chaos() {
            // Test builds only: the result may be dropped, duplicated, delayed or reordered.
            Some(chaos) => {
                let what = format!("result seq {} phase {}", result.seq, result.phase);
                let upstream = self.ctx.upstream.clone();
                chaos.deliver(
                    "coordinator",
                    &what,
                    Arc::new(move || {
                        let _ = upstream.try_send(Upstream::Result(result.clone()));
                    }),
                );
            }
            None => {
                let _ = self.ctx.upstream.send(Upstream::Result(result)).await;
            }
        }
        self.publish_inventory();
    }

    async fn reply(
        &mut self,
        order: &Order,
        phase: OrderPhase,
        code: ResultCode,
        message: impl Into<String>,
    ) {
        let current = self.store.current();
        let message = self.with_evidence(message.into());
        let r = orders::result(order, phase, code, message, current.as_deref());
        self.send(r, true).await;
    }
}

#[cfg(test)]
mod test_support {
    //! Journal and state builders shared by the unit tests of the submodules.

    use crate::activation::{Activation, Deadlines, OrderRef, Phase};
    use crate::state::ServiceState;

    /// A journal entry from `from` to `to` in `phase`.
    pub(super) fn journal(from: Option<&str>, to: &str, phase: Phase) -> Activation {
        Activation {
            order: OrderRef {
                order_id: "o1".into(),
                rollout_id: "r1".into(),
                seq: 1,
            },
            from: from.map(str::to_string),
            to: to.to_string(),
            deadlines: Deadlines {
                healthy_deadline_ms: 1_000,
                min_healthy_ms: 0,
                confirm_deadline_ms: None,
            },
            phase,
            drain: false,
            weight: None,
        }
    }

    /// A state with `previous` and the journal `activation`.
    pub(super) fn state(previous: Option<&str>, activation: Option<Activation>) -> ServiceState {
        ServiceState {
            previous: previous.map(str::to_string),
            activation,
            ..ServiceState::default()
        }
    }
}
