//! The task that owns one managed service: it admits orders, stages releases, drives the
//! activation machine (executing its commands: persist, swap, restart, report), runs the health
//! checks and reports.
//!
//! Everything about a service happens in this one task, driven by one [`Input`] enum and a few
//! timers; the only shared pieces are the outgoing queue and the inventory snapshot.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serin_proto::wire::{self, OrderPhase, ResultCode};
use serin_proto::{Order, OrderAction, Release};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activation::{
    self, Activation, Command, Deadlines, Observation, OrderRef, Outcome, Phase,
};
use crate::config::{CheckKind, ServiceConfig};
use crate::fault;
use crate::fetch::Fetcher;
use crate::health::{self, HealthMonitor, ProbeResult};
use crate::metrics::Metrics;
use crate::orders::{self, Admission};
use crate::release_store::{FetchOpener, ReleaseStore, StageError, StagePolicy, Staged, unix_ms};
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
    /// The coordinator holds this service's armed activation of a release (it is alive and
    /// still deciding): keep its dead-man switch from firing for lack of a confirm.
    Hold(serin_proto::HoldConfirm),
}

/// Handle to a running service task.
#[derive(Debug, Clone)]
pub struct ServiceHandle {
    /// Where to send inputs.
    pub tx: mpsc::Sender<Input>,
    /// The latest inventory of the service, for Hello messages.
    pub inventory: watch::Receiver<wire::ServiceInventory>,
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

struct StageJob {
    order: Order,
    release: Release,
    cancel: CancellationToken,
    /// Activate after staging (an activate order whose release was not on disk).
    activate: Option<Deadlines>,
}

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
}

/// Which process the probes are about. Every (re)start of the service begins a new generation:
/// a probe result or status poll tagged with an older one describes a previous process (or was
/// started before the new one) and never counts. While a restart is under way the probes pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProbeEpoch {
    generation: u64,
    active: bool,
}

/// Opens the service's store and state, and spawns its task (which first replays the journal).
pub fn spawn(
    cfg: ServiceConfig,
    state_dir: &std::path::Path,
    manager: Arc<dyn ServiceManager>,
    ctx: Context,
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
    let (tx, rx) = mpsc::channel(256);
    let monitor = HealthMonitor::new(&cfg.checks);
    let (inventory, inventory_rx) = watch::channel(wire::ServiceInventory::default());
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
    };
    task.publish_inventory();
    let probes = task.spawn_probes(tracker, &tx, shutdown.clone());
    tracker.spawn(task.run(rx, shutdown, probes));
    Ok(ServiceHandle {
        tx,
        inventory: inventory_rx,
    })
}

/// The result of a stage task, a panicked task being an I/O failure of the stage.
fn flatten_stage(
    done: Result<Result<Staged, StageError>, tokio::task::JoinError>,
) -> Result<Staged, StageError> {
    done.unwrap_or_else(|e| {
        Err(StageError::Io {
            what: "stage task failed".into(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// One probe task: waits while the epoch is paused, probes at once at the start of each new
/// generation and then every `interval`, drops a probe in flight when the generation changes,
/// and hands each result with its generation to `deliver` (which returns false once the service
/// task is gone).
async fn probe_loop<T, P, PF, D, DF>(
    mut epoch: watch::Receiver<ProbeEpoch>,
    token: CancellationToken,
    interval: Duration,
    probe: P,
    deliver: D,
) where
    P: Fn() -> PF,
    PF: std::future::Future<Output = T>,
    D: Fn(u64, T) -> DF,
    DF: std::future::Future<Output = bool>,
{
    let mut next = tokio::time::Instant::now();
    loop {
        let ProbeEpoch { generation, active } = *epoch.borrow_and_update();
        if !active {
            tokio::select! {
                _ = token.cancelled() => return,
                changed = epoch.changed() => if changed.is_err() { return },
            }
            next = tokio::time::Instant::now();
            continue;
        }
        tokio::select! {
            _ = token.cancelled() => return,
            changed = epoch.changed() => {
                if changed.is_err() {
                    return;
                }
                next = tokio::time::Instant::now();
                continue;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            _ = token.cancelled() => return,
            changed = epoch.changed() => {
                if changed.is_err() {
                    return;
                }
                // Started before the new generation: whatever it finds is not about it.
                next = tokio::time::Instant::now();
                continue;
            }
            r = probe() => r,
        };
        next = started + interval;
        if !deliver(generation, result).await {
            return;
        }
    }
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

    /// Probe tasks: one per configured check with a probe, plus the status poller. Each waits
    /// while the epoch is inactive, probes at once when a new generation begins (the first
    /// probe of a new process is not left to a free-running interval), abandons a probe in
    /// flight when the generation changes under it, and tags each result with its generation.
    fn spawn_probes(
        &self,
        tracker: &TaskTracker,
        tx: &mpsc::Sender<Input>,
        shutdown: CancellationToken,
    ) -> CancellationToken {
        let token = shutdown.child_token();
        let mut status_every = Duration::from_secs(1);
        for (i, check) in self.cfg.checks.iter().enumerate() {
            status_every = status_every.min(check.interval);
            if matches!(check.kind, CheckKind::Restarts { .. }) {
                continue;
            }
            let (kind, interval, timeout) = (check.kind.clone(), check.interval, check.timeout);
            let tx = tx.clone();
            tracker.spawn(probe_loop(
                self.epoch.subscribe(),
                token.clone(),
                interval,
                move || {
                    let kind = kind.clone();
                    async move { health::probe(&kind, timeout).await }
                },
                move |generation, result| {
                    let tx = tx.clone();
                    async move {
                        tx.send(Input::Probe {
                            index: i + 1,
                            generation,
                            result,
                        })
                        .await
                        .is_ok()
                    }
                },
            ));
        }
        let status_every = status_every.max(Duration::from_millis(100));
        let (tx, manager) = (tx.clone(), self.manager.clone());
        tracker.spawn(probe_loop(
            self.epoch.subscribe(),
            token.clone(),
            status_every,
            move || {
                let manager = manager.clone();
                async move {
                    match manager.status().await {
                        Ok(s) => s,
                        Err(e) => ServiceStatus {
                            detail: e.to_string(),
                            ..Default::default()
                        },
                    }
                }
            },
            move |generation, status| {
                let tx = tx.clone();
                async move { tx.send(Input::Status { generation, status }).await.is_ok() }
            },
        ));
        token
    }

    /// Pauses the probes: a restart is under way and nothing observed now describes the
    /// process that will run afterwards.
    fn pause_probes(&mut self) {
        self.epoch.send_modify(|e| {
            e.generation += 1;
            e.active = false;
        });
    }

    /// A new process generation begins: every check forgets what it knew, results of earlier
    /// generations still queued are dropped, and the probes run at once.
    fn new_generation(&mut self) {
        self.monitor.reset();
        self.last_verdict = activation::Verdict::Unknown;
        self.epoch.send_modify(|e| {
            e.generation += 1;
            e.active = true;
        });
    }

    fn generation(&self) -> u64 {
        self.epoch.borrow().generation
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
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
            tokio::select! {
                _ = shutdown.cancelled() => break,
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
                    Some(Input::ReportNow) => self.send_health(),
                    Some(Input::Hold(hold)) => self.hold(hold).await,
                },
                Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                    self.stage_done(flatten_stage(done), None).await;
                }
                _ = sleep_until_unix_ms(deadline), if deadline.is_some() => {
                    self.feed(activation::Input::Tick { now_ms: unix_ms() }).await;
                }
                _ = report.tick() => self.send_health(),
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

    // ---------------------------------------------------------------------------------------
    // Start-up

    async fn replay(&mut self) {
        self.store.clean_staging();
        if let Some(a) = self.state.activation.take() {
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

    // ---------------------------------------------------------------------------------------
    // Orders

    async fn send(&mut self, mut result: wire::OrderResult, record: bool) {
        // Every result says how far this agent's sequence is, so a coordinator whose counter
        // is behind can move past it.
        result.last_seq = self.state.last_seq;
        if record {
            self.state.record(&result);
            if let Err(e) = self.state_file.save(&self.state) {
                tracing::error!(service = self.name(), error = %e, "cannot persist order result");
            }
        }
        tracing::info!(
            service = self.name(),
            seq = result.seq,
            phase = ?OrderPhase::try_from(result.phase).unwrap_or_default(),
            code = ?ResultCode::try_from(result.code).unwrap_or_default(),
            message = %result.message,
            "order result"
        );
        let _ = self.ctx.upstream.send(Upstream::Result(result)).await;
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
        let r = orders::result(order, phase, code, message, current.as_deref());
        self.send(r, true).await;
    }

    async fn handle_order(&mut self, order: Order, jobs: &mut JoinSet<Result<Staged, StageError>>) {
        tracing::info!(service = self.name(), seq = order.seq, order = %order.order_id, action = order.action.kind(), "order received");
        match orders::admit(&self.state, &order) {
            Admission::Duplicate(results) => {
                tracing::info!(
                    service = self.name(),
                    seq = order.seq,
                    n = results.len(),
                    "duplicate order; re-sending its results"
                );
                for r in results {
                    self.send(r, false).await;
                }
                return;
            }
            Admission::Stale { last_seq } => {
                let current = self.store.current();
                let r = orders::result(
                    &order,
                    OrderPhase::Rejected,
                    ResultCode::StaleOrder,
                    format!(
                        "order seq {} is older than the last applied seq {last_seq}",
                        order.seq
                    ),
                    current.as_deref(),
                );
                self.send(r, false).await;
                return;
            }
            Admission::Apply => {}
        }
        // Persist the sequence before acting: a crash now must not apply it twice.
        self.state.last_seq = order.seq;
        if let Err(e) = self.state_file.save(&self.state) {
            tracing::error!(service = self.name(), error = %e, "cannot persist order sequence");
            let current = self.store.current();
            let r = orders::result(
                &order,
                OrderPhase::Failed,
                ResultCode::IoError,
                e.to_string(),
                current.as_deref(),
            );
            self.send(r, false).await;
            return;
        }
        // A newer order that changes what runs or what is staged preempts the stage in
        // progress: cancel it, wait until its partial download is removed, then act. A confirm
        // is about the armed activation and leaves the stage alone.
        if matches!(
            order.action,
            OrderAction::Stage { .. }
                | OrderAction::Activate { .. }
                | OrderAction::Rollback { .. }
                | OrderAction::Cancel
        ) {
            self.preempt_stage(&order, jobs).await;
        }
        match order.action.clone() {
            OrderAction::Stage { release } => self.start_stage(order, release, None, jobs),
            OrderAction::Activate {
                release,
                healthy_deadline,
                min_healthy,
                confirm_deadline,
            } => {
                let deadlines = Deadlines {
                    healthy_deadline_ms: healthy_deadline.as_millis() as u64,
                    min_healthy_ms: min_healthy.as_millis() as u64,
                    confirm_deadline_ms: confirm_deadline.map(|d| d.as_millis() as u64),
                };
                self.activate_order(order, release, deadlines, jobs).await;
            }
            OrderAction::Rollback { to } => {
                self.rollback_order(order, to.map(|t| t.to_string())).await
            }
            OrderAction::Confirm { release } => {
                self.confirm_order(order, release.to_string()).await
            }
            OrderAction::Cancel => {
                let msg = match self.last_preempted.take() {
                    Some(id) => format!("staging of release {id} cancelled"),
                    None => "nothing in progress to cancel".to_owned(),
                };
                self.reply(&order, OrderPhase::Cancelled, ResultCode::Ok, msg)
                    .await;
            }
        }
    }

    /// Cancels the stage in progress, if any, on behalf of `by`; returns once the stage task
    /// has ended and removed its partial download, after its order was answered CANCELLED.
    async fn preempt_stage(&mut self, by: &Order, jobs: &mut JoinSet<Result<Staged, StageError>>) {
        self.last_preempted = None;
        let Some(job) = &self.job else {
            return;
        };
        tracing::info!(service = self.name(), release = %job.release.id, stage_seq = job.order.seq, by_seq = by.seq, "order preempts the stage in progress");
        job.cancel.cancel();
        let id = job.release.id.to_string();
        let result = match jobs.join_next().await {
            Some(done) => flatten_stage(done),
            None => Err(StageError::Cancelled {
                release: id.clone(),
            }),
        };
        self.stage_done(result, Some(by.seq)).await;
        self.last_preempted = Some(id);
    }

    fn start_stage(
        &mut self,
        order: Order,
        release: Release,
        activate: Option<Deadlines>,
        jobs: &mut JoinSet<Result<Staged, StageError>>,
    ) {
        let cancel = CancellationToken::new();
        let (store, fetcher, rel, token) = (
            self.store.clone(),
            self.ctx.fetcher.clone(),
            release.clone(),
            cancel.clone(),
        );
        let upstream = self.ctx.upstream.clone();
        let mut progress_base = orders::result(
            &order,
            OrderPhase::Progress,
            ResultCode::Ok,
            "downloading",
            self.store.current().as_deref(),
        );
        progress_base.last_seq = self.state.last_seq;
        let policy = self.ctx.stage_policy;
        tracing::info!(service = self.name(), release = %release.id, size = release.size, "staging release");
        jobs.spawn(async move {
            let step = (rel.size / 10).max(1 << 20);
            let last = std::sync::atomic::AtomicU64::new(0);
            let progress = |done: u64| {
                let prev = last.load(std::sync::atomic::Ordering::Relaxed);
                if done >= prev + step || done == rel.size {
                    last.store(done, std::sync::atomic::Ordering::Relaxed);
                    let mut r = progress_base.clone();
                    r.bytes_done = done;
                    let _ = upstream.try_send(Upstream::Result(r));
                }
            };
            let opener = FetchOpener {
                fetcher: &fetcher,
                release: &rel,
            };
            store.stage(&rel, &opener, &progress, &token, policy).await
        });
        self.job = Some(StageJob {
            order,
            release,
            cancel,
            activate,
        });
        self.publish_inventory();
    }

    /// A stage task ended. `preempted_by`: the sequence of the order that cancelled it; a stage
    /// that completed anyway stays on disk but is not activated.
    async fn stage_done(&mut self, result: Result<Staged, StageError>, preempted_by: Option<u64>) {
        let Some(job) = self.job.take() else {
            return;
        };
        if let Some(by) = preempted_by {
            let msg = match &result {
                Ok(_) => {
                    self.staged = Some(job.release.id.to_string());
                    format!(
                        "release {} was staged, but order seq {by} superseded this order",
                        job.release.id
                    )
                }
                Err(StageError::Cancelled { .. }) => format!(
                    "staging of release {} cancelled by order seq {by}",
                    job.release.id
                ),
                Err(e) => format!("{e}; order seq {by} superseded this order"),
            };
            self.reply(
                &job.order,
                OrderPhase::Cancelled,
                ResultCode::Cancelled,
                msg,
            )
            .await;
            self.publish_inventory();
            return;
        }
        match result {
            Ok(staged) => {
                let how = match staged {
                    Staged::AlreadyInstalled => "was already on disk and verified",
                    Staged::Installed => "downloaded and verified",
                };
                tracing::info!(service = self.name(), release = %job.release.id, how, "release staged");
                // No pruning here: between staging and the swap the staged release is in no
                // other protected slot. Pruning runs when an activation ends.
                match job.activate {
                    None => {
                        self.staged = Some(job.release.id.to_string());
                        let msg = format!("release {} {how}", job.release.id);
                        self.reply(&job.order, OrderPhase::Staged, ResultCode::Ok, msg)
                            .await;
                    }
                    Some(deadlines) => {
                        self.begin_activation(&job.order, job.release.id.to_string(), deadlines)
                            .await
                    }
                }
            }
            Err(e) => {
                tracing::warn!(service = self.name(), release = %job.release.id, error = %e, "staging failed");
                self.reply(&job.order, OrderPhase::Failed, e.code(), e.to_string())
                    .await;
            }
        }
        self.publish_inventory();
    }

    async fn activate_order(
        &mut self,
        order: Order,
        release: Release,
        deadlines: Deadlines,
        jobs: &mut JoinSet<Result<Staged, StageError>>,
    ) {
        if let Some(a) = &self.state.activation {
            let msg = format!(
                "release {} is still being activated; confirm or roll it back first",
                a.to
            );
            self.reply(&order, OrderPhase::Failed, ResultCode::Busy, msg)
                .await;
            return;
        }
        let id = release.id.to_string();
        if self.store.current().as_deref() == Some(id.as_str()) {
            self.reply(
                &order,
                OrderPhase::Activated,
                ResultCode::Ok,
                format!("release {id} is already current"),
            )
            .await;
            self.reply(
                &order,
                OrderPhase::Healthy,
                ResultCode::Ok,
                format!("release {id} is already current"),
            )
            .await;
            return;
        }
        match self.store.installed(&id) {
            Some(meta) if meta.sha256 == release.sha256.to_hex() => {
                self.begin_activation(&order, id, deadlines).await
            }
            _ => self.start_stage(order, release, Some(deadlines), jobs),
        }
    }

    async fn begin_activation(&mut self, order: &Order, to: String, deadlines: Deadlines) {
        let from = self.store.current();
        if self.staged.as_deref() == Some(to.as_str()) {
            // From now on the journal protects it.
            self.staged = None;
        }
        tracing::info!(service = self.name(), from = ?from, to = %to, "activating release");
        let step = Activation::begin(
            OrderRef {
                order_id: order.order_id.clone(),
                rollout_id: order.rollout_id.clone(),
                seq: order.seq,
            },
            from,
            to,
            deadlines,
        );
        self.drive(step).await;
    }

    async fn rollback_order(&mut self, order: Order, to: Option<String>) {
        let current = self.store.current();
        let target = to.or_else(|| self.state.previous.clone());
        let Some(target) = target else {
            self.reply(
                &order,
                OrderPhase::Failed,
                ResultCode::UnknownRelease,
                format!(
                    "service {} has no previous release to roll back to",
                    self.name()
                ),
            )
            .await;
            return;
        };
        if self.store.installed(&target).is_none() {
            self.reply(
                &order,
                OrderPhase::Failed,
                ResultCode::UnknownRelease,
                format!("release {target} of service {} is not on disk", self.name()),
            )
            .await;
            return;
        }
        if self.state.activation.is_none() && current.as_deref() == Some(target.as_str()) {
            // Already there (the host rolled back by itself, or the order is repeated): a
            // running service is left alone, a stopped one is started.
            let running = self
                .manager
                .status()
                .await
                .map(|s| s.running)
                .unwrap_or(false);
            if running {
                self.state.confirmed = Some(target.clone());
                if let Err(e) = self.state_file.save(&self.state) {
                    tracing::warn!(service = self.name(), error = %e, "cannot persist the confirmed release");
                }
                let msg =
                    format!("release {target} is already current and running; nothing restarted");
                self.reply(&order, OrderPhase::RolledBack, ResultCode::Ok, msg)
                    .await;
                return;
            }
        }
        if let Some(a) = self.state.activation.take() {
            tracing::info!(service = self.name(), release = %a.to, "rollback order supersedes the activation in progress");
        }
        if current.as_deref() != Some(target.as_str()) {
            if let Err(e) = self.store.swap_current(&target) {
                self.reply(
                    &order,
                    OrderPhase::Failed,
                    ResultCode::IoError,
                    format!("cannot point current at release {target}: {e}"),
                )
                .await;
                return;
            }
            self.state.previous = current.clone();
        }
        self.state.confirmed = Some(target.clone());
        let _ = self.state_file.save(&self.state);
        match self.restart_service().await {
            Ok(()) => {
                let msg = match current.as_deref() {
                    Some(c) if c == target => {
                        format!("release {target} was current but not running; started it")
                    }
                    c => format!(
                        "rolled back from {} to release {target}",
                        c.unwrap_or("nothing")
                    ),
                };
                self.reply(&order, OrderPhase::RolledBack, ResultCode::Ok, msg)
                    .await;
            }
            Err(e) => {
                self.reply(
                    &order,
                    OrderPhase::Failed,
                    ResultCode::ServiceFailedToStart,
                    format!("release {target} is current but failed to start: {e}"),
                )
                .await;
            }
        }
    }

    /// Applies a `HoldConfirm`: an armed activation of that release gets a confirm deadline of
    /// at least now + the hold's deadline (journaled); a hold for another release, or with no
    /// activation armed, is ignored. Health failures still revert.
    async fn hold(&mut self, hold: serin_proto::HoldConfirm) {
        let matches = self
            .state
            .activation
            .as_ref()
            .is_some_and(|a| a.is_armed() && a.to == hold.release.as_str());
        if !matches {
            tracing::debug!(service = self.name(), release = %hold.release, "hold for no armed activation of that release; ignored");
            return;
        }
        tracing::debug!(service = self.name(), release = %hold.release, confirm_deadline_ms = hold.confirm_deadline.as_millis() as u64, "coordinator holds the activation");
        self.feed(activation::Input::Hold {
            now_ms: unix_ms(),
            confirm_deadline_ms: hold.confirm_deadline.as_millis() as u64,
        })
        .await;
    }

    async fn confirm_order(&mut self, order: Order, release: String) {
        match &self.state.activation {
            Some(a) if a.to == release && a.is_armed() => {
                let order = OrderRef {
                    order_id: order.order_id.clone(),
                    rollout_id: order.rollout_id.clone(),
                    seq: order.seq,
                };
                self.feed(activation::Input::Confirm { order }).await;
            }
            Some(a) if a.to == release => {
                let msg = format!(
                    "release {release} is not awaiting confirm (phase {:?})",
                    a.phase
                );
                self.reply(&order, OrderPhase::Failed, ResultCode::InvalidOrder, msg)
                    .await;
            }
            _ if self.store.current().as_deref() == Some(release.as_str()) => {
                self.reply(
                    &order,
                    OrderPhase::Confirmed,
                    ResultCode::Ok,
                    format!("release {release} is current and confirmed"),
                )
                .await;
            }
            _ => {
                let current = self.store.current().unwrap_or_else(|| "nothing".into());
                let msg =
                    format!("release {release} is not awaiting confirm; current is {current}");
                self.reply(&order, OrderPhase::Failed, ResultCode::InvalidOrder, msg)
                    .await;
            }
        }
    }

    /// Removes the oldest releases beyond `keep_releases`, never one that is current, the
    /// rollback target, staged for activation, being staged, or named by an in-flight
    /// activation journal. Runs on a blocking thread: deleting a large release and fsyncing
    /// must not stall the other tasks on the runtime.
    async fn prune(&mut self) {
        let protect = protected_releases(
            self.store.current(),
            &self.state,
            self.job.as_ref().map(|j| j.release.id.to_string()),
            self.staged.clone(),
        );
        let (store, keep) = (self.store.clone(), self.cfg.keep_releases);
        let removed = tokio::task::spawn_blocking(move || {
            let protect: Vec<&str> = protect.iter().map(String::as_str).collect();
            store.prune(keep, &protect)
        })
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(service = self.name(), error = %e, "pruning old releases failed");
            Vec::new()
        });
        for id in removed {
            tracing::info!(service = self.name(), release = %id, "pruned old release");
        }
    }

    /// Restarts the service into what `current` points at. No probe result about the previous
    /// process, nor one of a probe started before the restart, counts for the new one.
    async fn restart_service(&mut self) -> Result<(), String> {
        self.pause_probes();
        let r = self.manager.restart().await.map_err(|e| e.to_string());
        self.new_generation();
        if let Ok(s) = self.manager.status().await {
            self.restart_baseline = s.restarts;
            self.last_status = s;
        }
        r
    }

    // ---------------------------------------------------------------------------------------
    // The activation driver

    async fn feed(&mut self, input: activation::Input) {
        let Some(a) = self.state.activation.take() else {
            return;
        };
        let step = a.step(input);
        self.drive(step).await;
    }

    /// Executes the machine's commands, feeding back the inputs they produce.
    async fn drive(&mut self, (next, commands): activation::Step) {
        self.state.activation = next;
        let mut queue: VecDeque<Command> = commands.into();
        while let Some(cmd) = queue.pop_front() {
            let feedback = match cmd {
                Command::Persist => {
                    let phase = self.state.activation.as_ref().map(|a| a.phase.clone());
                    if let Err(e) = self.state_file.save(&self.state) {
                        let required = self
                            .state
                            .activation
                            .as_ref()
                            .is_some_and(Activation::journal_required);
                        tracing::error!(service = self.name(), error = %e, stops_activation = required, "cannot persist the activation journal");
                        if required {
                            // No step runs unless its journal record is durable.
                            queue.clear();
                            if let Some(a) = self.state.activation.take() {
                                let (next, more) = a.step(activation::Input::JournalFailed {
                                    message: e.to_string(),
                                });
                                self.state.activation = next;
                                queue.extend(more);
                            }
                            continue;
                        }
                    }
                    match phase {
                        Some(Phase::Journaled) => fault::point("activate-journaled"),
                        Some(Phase::Armed { .. }) => fault::point("confirm-wait"),
                        _ => {}
                    }
                    None
                }
                Command::Swap(id) => {
                    let rolling_back = matches!(
                        self.state.activation.as_ref().map(|a| &a.phase),
                        Some(Phase::RollingBack { .. } | Phase::Abandoning { .. })
                    );
                    match self.store.swap_current(&id) {
                        Ok(()) => {
                            tracing::info!(service = self.name(), release = %id, rolling_back, "current swapped");
                            fault::point(if rolling_back {
                                "rollback-swapped"
                            } else {
                                "activate-swapped"
                            });
                            Some(activation::Input::Swapped)
                        }
                        Err(e) => {
                            // The swap is atomic: current still points where it did.
                            let a = self.state.activation.take();
                            let _ = self.state_file.save(&self.state);
                            if let Some(a) = a {
                                let msg = format!("cannot point current at release {id}: {e}");
                                let current = self.store.current();
                                self.report_for(
                                    &a.order,
                                    &a.to,
                                    OrderPhase::Failed,
                                    ResultCode::IoError,
                                    msg,
                                    current,
                                )
                                .await;
                            }
                            self.ensure_running().await;
                            self.publish_inventory();
                            return;
                        }
                    }
                }
                Command::Restart => {
                    let forward = matches!(
                        self.state.activation.as_ref().map(|a| &a.phase),
                        Some(Phase::Swapped)
                    );
                    match self.restart_service().await {
                        Ok(()) => {
                            if forward {
                                fault::point("activate-restarted");
                            }
                            Some(activation::Input::Started { now_ms: unix_ms() })
                        }
                        Err(message) => {
                            tracing::warn!(service = self.name(), error = %message, "service failed to start");
                            Some(activation::Input::StartFailed { message })
                        }
                    }
                }
                Command::Report {
                    order,
                    release,
                    phase,
                    code,
                    message,
                    current,
                } => {
                    self.report_for(&order, &release, phase, code, message, current)
                        .await;
                    None
                }
                Command::Finish { outcome, from, to } => {
                    self.finish(outcome, from, to).await;
                    None
                }
            };
            if let Some(input) = feedback
                && let Some(a) = self.state.activation.take()
            {
                let (next, more) = a.step(input);
                self.state.activation = next;
                queue.extend(more);
            }
        }
        self.publish_inventory();
    }

    async fn report_for(
        &mut self,
        order: &OrderRef,
        release: &str,
        phase: OrderPhase,
        code: ResultCode,
        message: String,
        current: Option<String>,
    ) {
        let r = wire::OrderResult {
            order_id: order.order_id.clone(),
            rollout_id: order.rollout_id.clone(),
            seq: order.seq,
            service: self.name().to_string(),
            release: release.to_string(),
            phase: phase as i32,
            code: code as i32,
            message,
            current_release: current.unwrap_or_default(),
            bytes_done: 0,
            last_seq: 0,
        };
        self.send(r, true).await;
    }

    async fn finish(&mut self, outcome: Outcome, from: Option<String>, to: String) {
        tracing::info!(service = self.name(), release = %to, outcome = ?outcome, "activation finished");
        self.state.activation = None;
        match outcome {
            Outcome::Kept => {
                if from.as_deref() != Some(to.as_str()) {
                    self.state.previous = from;
                }
                self.state.confirmed = Some(to);
            }
            Outcome::RolledBack => {
                self.state.confirmed = from;
            }
            Outcome::FailedInPlace | Outcome::Abandoned => {}
        }
        if let Err(e) = self.state_file.save(&self.state) {
            tracing::error!(service = self.name(), error = %e, "cannot persist the end of the activation");
        }
        // The activation is over and persisted: only now may old releases go.
        self.prune().await;
    }

    // ---------------------------------------------------------------------------------------
    // Health

    fn record_status(&mut self, status: ServiceStatus) {
        let restarts = status.restarts.saturating_sub(self.restart_baseline);
        let detail = if status.running {
            format!("running (pid {})", status.pid.unwrap_or(0))
        } else {
            status.detail.clone()
        };
        self.monitor.checks[0].record(ProbeResult {
            ok: status.running,
            latency: Duration::ZERO,
            detail,
        });
        for (i, check) in self.cfg.checks.iter().enumerate() {
            if let CheckKind::Restarts { max } = check.kind {
                self.monitor.checks[i + 1].record(ProbeResult {
                    ok: restarts <= max,
                    latency: Duration::ZERO,
                    detail: format!("{restarts} restarts since activation (max {max})"),
                });
            }
        }
        self.last_status = status;
    }

    async fn after_health(&mut self) {
        let verdict = self.monitor.verdict();
        if verdict != self.last_verdict {
            tracing::info!(service = self.name(), verdict = ?verdict, detail = %self.monitor.failing_detail(), "health changed");
            self.last_verdict = verdict;
            self.send_health();
            self.publish_inventory();
        }
        if self
            .state
            .activation
            .as_ref()
            .is_some_and(Activation::is_armed)
        {
            if verdict == activation::Verdict::Failing {
                // Before judging, look at the process itself: a release that crashed at start
                // is a failed start, not merely unhealthy.
                if let Ok(status) = self.manager.status().await {
                    self.record_status(status);
                }
            }
            let verdict = self.monitor.verdict();
            let observation = Observation {
                verdict,
                running: self.last_status.running,
                restarts: self
                    .last_status
                    .restarts
                    .saturating_sub(self.restart_baseline),
                detail: self.monitor.failing_detail(),
            };
            self.feed(activation::Input::Health {
                now_ms: unix_ms(),
                observation,
            })
            .await;
        }
    }

    fn send_health(&mut self) {
        let restarts = self
            .last_status
            .restarts
            .saturating_sub(self.restart_baseline);
        let pid = if self.last_status.running {
            self.last_status.pid
        } else {
            None
        };
        let report = wire::HealthReport {
            service: self.name().to_string(),
            release: self.store.current().unwrap_or_default(),
            healthy: self.monitor.verdict() == activation::Verdict::Passing,
            checks: self.monitor.checks.iter().map(|c| c.to_wire()).collect(),
            process: Some(self.ctx.metrics.process(pid, restarts)),
            host: Some(self.ctx.metrics.host()),
            observed_unix_ms: unix_ms(),
        };
        let _ = self.ctx.upstream.try_send(Upstream::Health(report));
    }

    fn publish_inventory(&mut self) {
        let current = self.store.current();
        let kept = self.store.list().into_iter().map(|m| m.id).collect();
        let state = match (&self.state.activation, &self.job, &current) {
            (Some(a), _, _) => match a.phase {
                Phase::Journaled | Phase::Swapped => wire::ServiceState::Activating,
                Phase::Armed { .. } => wire::ServiceState::AwaitingConfirm,
                Phase::RollingBack { .. }
                | Phase::RollbackSwapped { .. }
                | Phase::Abandoning { .. } => wire::ServiceState::RollingBack,
            },
            (None, Some(_), _) => wire::ServiceState::Staging,
            (None, None, None) => wire::ServiceState::Empty,
            (None, None, Some(_)) if self.last_status.running => wire::ServiceState::Running,
            (None, None, Some(_)) => wire::ServiceState::Stopped,
        };
        let previous = previous_release(current.as_deref(), &self.state);
        let inv = wire::ServiceInventory {
            service: self.name().to_string(),
            current_release: current.unwrap_or_default(),
            kept_releases: kept,
            state: state as i32,
            healthy: self.monitor.verdict() == activation::Verdict::Passing,
            previous_release: previous.unwrap_or_default(),
            last_seq: self.state.last_seq,
        };
        self.inventory.send_if_modified(|old| {
            if *old == inv {
                false
            } else {
                *old = inv;
                true
            }
        });
    }
}

/// The releases pruning must keep whatever their age: `current`, the rollback target
/// (`previous`) and the last confirmed release, both ends of an in-flight activation journal,
/// the release being staged (`job`) and the one staged for a coming activation (`staged`).
fn protected_releases(
    current: Option<String>,
    state: &ServiceState,
    job: Option<String>,
    staged: Option<String>,
) -> Vec<String> {
    let journal = state
        .activation
        .as_ref()
        .map(|a| [a.from.clone(), Some(a.to.clone())]);
    [
        current,
        state.previous.clone(),
        state.confirmed.clone(),
        job,
        staged,
    ]
    .into_iter()
    .chain(journal.into_iter().flatten())
    .flatten()
    .collect()
}

/// The release a rollback would restore, as reported in the inventory: while an activation is
/// in flight and `current` already points at its target, the release it came from; otherwise
/// the recorded previous release. Never the same as `current`.
fn previous_release(current: Option<&str>, state: &ServiceState) -> Option<String> {
    let previous = match &state.activation {
        Some(a) if current == Some(a.to.as_str()) => a.from.clone(),
        _ => state.previous.clone(),
    };
    previous.filter(|p| Some(p.as_str()) != current)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(from: Option<&str>, to: &str, phase: Phase) -> Activation {
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
        }
    }

    fn state(previous: Option<&str>, activation: Option<Activation>) -> ServiceState {
        ServiceState {
            previous: previous.map(str::to_string),
            activation,
            ..ServiceState::default()
        }
    }

    #[test]
    fn inventory_previous_is_never_current_during_replay() {
        // Journaled (not swapped yet) from demo-1.0 to demo-2.0, demo-0.9 before that.
        let s = state(
            Some("demo-0.9"),
            Some(journal(Some("demo-1.0"), "demo-2.0", Phase::Journaled)),
        );
        assert_eq!(
            previous_release(Some("demo-1.0"), &s).as_deref(),
            Some("demo-0.9")
        );
        // Swapped: current is the target, so previous is where the activation came from.
        let s = state(
            Some("demo-0.9"),
            Some(journal(Some("demo-1.0"), "demo-2.0", Phase::Swapped)),
        );
        assert_eq!(
            previous_release(Some("demo-2.0"), &s).as_deref(),
            Some("demo-1.0")
        );
        // First activation ever, not swapped: nothing to roll back to.
        let s = state(None, Some(journal(None, "demo-1.0", Phase::Journaled)));
        assert_eq!(previous_release(None, &s), None);
        // No journal: the recorded previous, unless it is current.
        assert_eq!(
            previous_release(Some("demo-2.0"), &state(Some("demo-1.0"), None)).as_deref(),
            Some("demo-1.0")
        );
        assert_eq!(
            previous_release(Some("demo-2.0"), &state(Some("demo-2.0"), None)),
            None
        );
        // Journal whose `from` equals current (re-activation): never previous == current.
        let s = state(
            Some("demo-1.0"),
            Some(journal(Some("demo-2.0"), "demo-2.0", Phase::Swapped)),
        );
        assert_ne!(
            previous_release(Some("demo-2.0"), &s).as_deref(),
            Some("demo-2.0")
        );
    }

    /// A probe loop with an hour-long interval: it probes at once in each new generation, drops
    /// the probe that was in flight when the generation changed, and tags results correctly.
    #[tokio::test]
    async fn probes_run_at_once_in_a_new_generation_and_drop_probes_in_flight() {
        let epoch = watch::Sender::new(ProbeEpoch {
            generation: 0,
            active: true,
        });
        let token = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel::<(u64, u64)>(16);
        // Probe number n of the loop; the second one hangs until the generation changes.
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = calls.clone();
        let task = tokio::spawn(probe_loop(
            epoch.subscribe(),
            token.clone(),
            Duration::from_secs(3600),
            move || {
                let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if n == 1 {
                        std::future::pending::<()>().await;
                    }
                    n
                }
            },
            move |generation, n| {
                let tx = tx.clone();
                async move { tx.send((generation, n)).await.is_ok() }
            },
        ));
        let within = Duration::from_secs(5);
        let first = tokio::time::timeout(within, rx.recv()).await.unwrap();
        assert_eq!(first, Some((0, 0)), "first probe at once, generation 0");

        // A restart: paused (no probes), then generation 2 with an immediate probe. That probe
        // hangs; the next generation abandons it and probes again at once.
        epoch.send_modify(|e| {
            e.generation = 1;
            e.active = false;
        });
        epoch.send_modify(|e| {
            e.generation = 2;
            e.active = true;
        });
        while calls.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        epoch.send_modify(|e| e.generation = 3);
        let next = tokio::time::timeout(within, rx.recv()).await.unwrap();
        assert_eq!(
            next,
            Some((3, 2)),
            "the hung probe of generation 2 was dropped, generation 3 probed at once"
        );
        token.cancel();
        task.await.unwrap();
    }

    #[test]
    fn pruning_protects_staged_journaled_current_and_previous() {
        let s = state(
            Some("web-1"),
            Some(journal(Some("web-2"), "web-3", Phase::Journaled)),
        );
        let p = protected_releases(
            Some("web-2".into()),
            &s,
            Some("web-5".into()),
            Some("web-4".into()),
        );
        for id in ["web-1", "web-2", "web-3", "web-4", "web-5"] {
            assert!(p.iter().any(|r| r == id), "{id} not protected: {p:?}");
        }
        assert!(protected_releases(None, &ServiceState::default(), None, None).is_empty());
    }
}
