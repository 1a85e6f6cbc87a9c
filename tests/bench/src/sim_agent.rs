//! One simulated agent: a real `Attach` stream speaking the real protocol, without a service.
//!
//! It says hello with a one-service inventory (`web`, on [`SimConfig::baseline`]), sends a health
//! report every [`SimConfig::health_interval`] and right after an activation, and a heartbeat only
//! after the stream was silent for the interval the welcome asks for (plus the real agent's grace,
//! [`heartbeat_silence`]: any message is a sign of life), and answers every order as the real agent does:
//! sequences are applied at most once (a repeat re-sends the stored results and is counted as a
//! duplicate, a lower one is answered `STALE_ORDER` with `last_seq`); stage fetches the artifact
//! over `FetchArtifact` or skips it; activate answers `ACTIVATED`, then `HEALTHY` after
//! `min_healthy`, and arms a dead-man switch that reverts locally (`ROLLED_BACK`,
//! `CONFIRM_TIMEOUT`) unless a confirm (or a hold) arrives in time; confirm answers `CONFIRMED`;
//! rollback flips back (`ROLLED_BACK`); cancel answers `CANCELLED`. Delays and failure rates come
//! from [`SimConfig`]; randomness is a per-agent deterministic stream from the seed.
//!
//! A lost stream is re-established with jittered backoff, with a fresh hello.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serin_proto::wire::agent_service_client::AgentServiceClient;
use serin_proto::wire::{
    self, OrderPhase, ResultCode, agent_message::Body as Up, coordinator_message::Body as Down,
};
use serin_proto::{Order, OrderAction};
use sha2::Digest as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::connect::Connector;
use crate::stats::{Stats, unix_us};

/// The one service every simulated host manages.
pub const SERVICE: &str = "web";

/// How simulated agents behave.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Release every host runs at start.
    pub baseline: String,
    /// Period of full health reports (the heartbeat period comes from the welcome).
    pub health_interval: Duration,
    /// Time between an activate order and its `ACTIVATED` answer (the swap and restart).
    pub activate_delay: Duration,
    /// Stage through `FetchArtifact` (true) or pretend the release is already on disk.
    pub fetch: bool,
    /// Fraction of activations whose service fails to start (`FAILED`, old release kept).
    pub fail_rate: f64,
    /// Fraction of activations that never become healthy (reverted at the healthy deadline).
    pub unhealthy_rate: f64,
    /// Seed of every agent's random stream (agent `i` uses `seed ^ i`).
    pub seed: u64,
    /// Labels: `zone` cycles through this many zones (`z0`, `z1`, …).
    pub zones: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            baseline: "web-1".into(),
            health_interval: Duration::from_secs(10),
            activate_delay: Duration::ZERO,
            fetch: false,
            fail_rate: 0.0,
            unhealthy_rate: 0.0,
            seed: 1,
            zones: 3,
        }
    }
}

/// splitmix64: a small deterministic random stream per agent.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Something the agent does later, by itself.
#[derive(Debug, Clone)]
enum Timer {
    /// Finish an activation: swap and answer `ACTIVATED` (or `FAILED`).
    Activate {
        order: Order,
        release: String,
        min_healthy: Duration,
        healthy_deadline: Duration,
        confirm_deadline: Option<Duration>,
    },
    /// Report `HEALTHY` for the activation of `order`.
    Healthy { order: Order, release: String },
    /// The new release never became healthy: revert.
    Unhealthy { order: Order },
    /// No confirm came: revert.
    ConfirmTimeout { order: Order, release: String },
}

/// What the simulated host holds on "disk" for its one service.
#[derive(Debug)]
struct Service {
    current: Option<String>,
    previous: Option<String>,
    kept: Vec<String>,
    last_seq: u64,
    /// Results given for `last_seq`, re-sent on a duplicate.
    results: Vec<wire::OrderResult>,
    /// Release armed and awaiting a confirm, with the order that activated it.
    armed: Option<String>,
    timers: Vec<(Instant, Timer)>,
}

/// One simulated host.
pub struct SimAgent {
    id: String,
    index: u32,
    config: Arc<SimConfig>,
    stats: Arc<Stats>,
    rng: Rng,
    svc: Service,
    /// Held from dialling until the welcome.
    permit: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for SimAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimAgent").field("id", &self.id).finish()
    }
}

/// What the bench asks of every agent of a process at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Command {
    /// Nothing beyond the protocol.
    Idle,
    /// Send `reports` health reports back to back (`round` makes each request distinct).
    HealthBurst { round: u32, reports: u32 },
}

/// The host id of simulated agent `index`.
pub fn host_id(index: u32) -> String {
    format!("sim-{index:06}")
}

/// How long the stream must be silent before a heartbeat goes up: the real agent's rule
/// (`serin_agent::connection::heartbeat_silence`, not a dependency of the bench), the interval
/// plus a twentieth of it, at most 250 ms.
pub fn heartbeat_silence(every: Duration) -> Duration {
    every + (every / 20).min(Duration::from_millis(250))
}

/// The sending half of an attached stream, and when it last sent anything.
struct Out {
    tx: mpsc::Sender<wire::AgentMessage>,
    last_sent: std::sync::Mutex<tokio::time::Instant>,
}

impl Out {
    fn last_sent(&self) -> tokio::time::Instant {
        *self.last_sent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SimAgent {
    /// Agent number `index`.
    pub fn new(index: u32, config: Arc<SimConfig>, stats: Arc<Stats>) -> Self {
        let baseline = config.baseline.clone();
        Self {
            id: host_id(index),
            index,
            rng: Rng(config.seed ^ (u64::from(index) << 20)),
            config,
            stats,
            svc: Service {
                current: Some(baseline.clone()),
                previous: None,
                kept: vec![baseline],
                last_seq: 0,
                results: Vec::new(),
                armed: None,
                timers: Vec::new(),
            },
            permit: None,
        }
    }

    fn hello(&self) -> wire::Hello {
        let zones = self.config.zones.max(1);
        wire::Hello {
            host_id: self.id.clone(),
            hostname: format!("{}.sim", self.id),
            labels: [
                ("role".to_string(), "web".to_string()),
                ("zone".to_string(), format!("z{}", self.index % zones)),
            ]
            .into_iter()
            .collect(),
            agent_version: "serin-bench".into(),
            services: vec![wire::ServiceInventory {
                service: SERVICE.into(),
                current_release: self.svc.current.clone().unwrap_or_default(),
                kept_releases: self.svc.kept.clone(),
                state: if self.svc.armed.is_some() {
                    wire::ServiceState::AwaitingConfirm as i32
                } else {
                    wire::ServiceState::Running as i32
                },
                healthy: true,
                previous_release: self.svc.previous.clone().unwrap_or_default(),
                last_seq: self.svc.last_seq,
                last_epoch: 0,
                verdict: wire::HealthVerdict::Passing as i32,
            }],
        }
    }

    /// Runs the agent until `shutdown`: connects (its own channel), attaches, serves, reconnects.
    ///
    /// `dial_gate` bounds how many agents of the process are between dialling and their welcome
    /// at once, so thousands of agents starting together do not overflow the listen backlog.
    pub async fn run(
        mut self,
        connector: Connector,
        dial_gate: Arc<Semaphore>,
        mut commands: watch::Receiver<Command>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let permit = tokio::select! {
                () = shutdown.cancelled() => return,
                p = dial_gate.clone().acquire_owned() => p.ok(),
            };
            self.permit = permit;
            // A fresh connection per session: after a lost stream the old one may be what failed.
            let connected = tokio::select! {
                () = shutdown.cancelled() => return,
                c = connector.channel(&self.id) => c,
            };
            let ch = match connected {
                Ok(c) => c,
                Err(e) => {
                    self.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(host = %self.id, error = %e, "connect failed");
                    if !self.pause(&mut backoff, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            match self.session(ch, &mut commands, &shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(host = %self.id, error = %e, "stream lost");
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    if !self.pause(&mut backoff, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps a jittered backoff; false on shutdown.
    async fn pause(&mut self, backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
        self.permit = None;
        let wait = backoff.mul_f64(0.5 + self.rng.unit() * 0.5);
        *backoff = (*backoff * 2).min(Duration::from_secs(2));
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }

    /// One attached stream, until it fails (`Err`) or shutdown (`Ok`).
    async fn session(
        &mut self,
        channel: Channel,
        commands: &mut watch::Receiver<Command>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut client =
            AgentServiceClient::new(channel.clone()).max_decoding_message_size(16 * 1024 * 1024);
        let (tx, rx) = mpsc::channel::<wire::AgentMessage>(32);
        tx.try_send(wire::AgentMessage {
            body: Some(Up::Hello(self.hello())),
        })?;
        let tx = Out {
            tx,
            last_sent: std::sync::Mutex::new(tokio::time::Instant::now()),
        };
        let started = Instant::now();
        let mut inbound = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = client.attach(ReceiverStream::new(rx)) => r?.into_inner(),
        };
        let first = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            m = inbound.message() => m?,
        };
        let heartbeat_every = match first.and_then(|m| m.body) {
            Some(Down::Welcome(w)) => Duration::from_millis(u64::from(w.heartbeat_interval_ms))
                .max(Duration::from_millis(50)),
            other => anyhow::bail!("expected a welcome first, got {other:?}"),
        };
        self.permit = None;
        self.stats.connected.fetch_add(1, Ordering::Relaxed);
        self.stats.attach_us.record(started.elapsed());
        let result = self
            .serve(
                &channel,
                &tx,
                &mut inbound,
                heartbeat_every,
                commands,
                shutdown,
            )
            .await;
        self.stats.connected.fetch_sub(1, Ordering::Relaxed);
        result
    }

    async fn serve(
        &mut self,
        channel: &Channel,
        tx: &Out,
        inbound: &mut tonic::Streaming<wire::CoordinatorMessage>,
        heartbeat_every: Duration,
        commands: &mut watch::Receiver<Command>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        commands.mark_unchanged();
        // Spread periodic traffic over the period instead of synchronising every agent.
        let phase = |rng: &mut Rng, every: Duration| every.mul_f64(rng.unit());
        // A heartbeat only after `silence` without any message, as the real agent does; the
        // first one at a random phase (as if the hello had gone up that much earlier).
        let silence = heartbeat_silence(heartbeat_every);
        let first = tokio::time::Instant::now() + phase(&mut self.rng, heartbeat_every);
        if let Some(as_if) = first.checked_sub(silence) {
            *tx.last_sent.lock().unwrap_or_else(|p| p.into_inner()) = as_if;
        }
        let heartbeat = tokio::time::sleep_until(tx.last_sent() + silence);
        tokio::pin!(heartbeat);
        let health_every = self.config.health_interval.max(Duration::from_millis(10));
        let mut health = tokio::time::interval_at(
            tokio::time::Instant::now() + phase(&mut self.rng, health_every),
            health_every,
        );
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = tx.last_sent() + silence;
            if heartbeat.deadline() != due {
                heartbeat.as_mut().reset(due);
            }
            let next_timer = self.svc.timers.iter().map(|(at, _)| *at).min();
            let timer = async {
                match next_timer {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                msg = inbound.message() => match msg? {
                    Some(wire::CoordinatorMessage { body: Some(Down::Order(o)) }) => {
                        self.on_order(o, channel, tx).await?;
                    }
                    Some(wire::CoordinatorMessage { body: Some(Down::Hold(h)) }) => {
                        self.stats.holds.fetch_add(1, Ordering::Relaxed);
                        self.on_hold(&h);
                    }
                    Some(_) => {}
                    None => anyhow::bail!("the coordinator closed the stream"),
                },
                () = &mut heartbeat => {
                    send(tx, Up::Heartbeat(wire::Heartbeat { sent_unix_ms: unix_us() / 1000 })).await?;
                    self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                _ = health.tick() => self.report_health(tx).await?,
                changed = commands.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let command = *commands.borrow_and_update();
                    match command {
                        Command::Idle => {}
                        Command::HealthBurst { reports, .. } => self.burst(tx, reports).await?,
                    }
                }
                () = timer => self.fire_timers(tx).await?,
            }
        }
    }

    async fn report_health(&mut self, tx: &Out) -> anyhow::Result<()> {
        let report = wire::HealthReport {
            service: SERVICE.into(),
            release: self.svc.current.clone().unwrap_or_default(),
            healthy: true,
            verdict: wire::HealthVerdict::Passing as i32,
            checks: vec![wire::CheckResult {
                name: "http".into(),
                kind: wire::CheckKind::Http as i32,
                passing: true,
                last_ok: true,
                latency_us: 800 + self.rng.next() % 400,
                detail: String::new(),
                consecutive_failures: 0,
                consecutive_successes: 3,
            }],
            process: Some(wire::ProcessMetrics {
                running: true,
                pid: 1000 + self.index,
                rss_bytes: 50 << 20,
                cpu_percent: 1.0,
                restarts: 0,
            }),
            host: None,
            observed_unix_ms: unix_us() / 1000,
            requests_total: None,
        };
        send(tx, Up::Health(report)).await?;
        self.stats.health_reports.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sends `n` health reports back to back (the ingest load test).
    async fn burst(&mut self, tx: &Out, n: u32) -> anyhow::Result<()> {
        for _ in 0..n {
            self.report_health(tx).await?;
        }
        self.stats.bursts_done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn result(
        &self,
        order: &Order,
        release: &str,
        phase: OrderPhase,
        code: ResultCode,
        message: impl Into<String>,
    ) -> wire::OrderResult {
        wire::OrderResult {
            order_id: order.order_id.clone(),
            rollout_id: order.rollout_id.clone(),
            seq: order.seq,
            service: SERVICE.into(),
            release: release.into(),
            phase: phase as i32,
            code: code as i32,
            message: message.into(),
            current_release: self.svc.current.clone().unwrap_or_default(),
            bytes_done: 0,
            last_seq: self.svc.last_seq,
            last_epoch: 0,
        }
    }

    /// Sends a result and keeps it for a duplicate of its sequence.
    async fn reply(&mut self, tx: &Out, r: wire::OrderResult) -> anyhow::Result<()> {
        if r.seq == self.svc.last_seq {
            self.svc.results.push(r.clone());
        }
        if r.phase == OrderPhase::Activated as i32 {
            self.stats.activate_acked_us.push(unix_us());
        }
        send(tx, Up::Result(r)).await?;
        self.stats.results.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn on_order(
        &mut self,
        o: wire::Order,
        channel: &Channel,
        tx: &Out,
    ) -> anyhow::Result<()> {
        let received = unix_us();
        self.stats.orders.fetch_add(1, Ordering::Relaxed);
        let order = match Order::try_from(o.clone()) {
            Ok(order) => order,
            Err(e) => {
                self.stats.invalid_orders.fetch_add(1, Ordering::Relaxed);
                let r = wire::OrderResult {
                    order_id: o.order_id,
                    rollout_id: o.rollout_id,
                    seq: o.seq,
                    service: o.service,
                    phase: OrderPhase::Rejected as i32,
                    code: ResultCode::InvalidOrder as i32,
                    message: e.to_string(),
                    last_seq: self.svc.last_seq,
                    ..Default::default()
                };
                return send(tx, Up::Result(r)).await;
            }
        };
        if order.seq == self.svc.last_seq {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            for r in self.svc.results.clone() {
                send(tx, Up::Result(r)).await?;
            }
            return Ok(());
        }
        if order.seq < self.svc.last_seq {
            self.stats.stale.fetch_add(1, Ordering::Relaxed);
            let r = self.result(
                &order,
                "",
                OrderPhase::Rejected,
                ResultCode::StaleOrder,
                format!(
                    "sequence {} is below the last applied {}",
                    order.seq, self.svc.last_seq
                ),
            );
            return send(tx, Up::Result(r)).await;
        }
        self.svc.last_seq = order.seq;
        self.svc.results.clear();
        match order.action.clone() {
            OrderAction::Stage { release } => {
                let id = release.id.to_string();
                if let Err(e) = self.stage(channel, &release).await {
                    let r = self.result(
                        &order,
                        &id,
                        OrderPhase::Failed,
                        ResultCode::DownloadFailed,
                        e.to_string(),
                    );
                    return self.reply(tx, r).await;
                }
                let r = self.result(&order, &id, OrderPhase::Staged, ResultCode::Ok, "staged");
                self.reply(tx, r).await
            }
            OrderAction::Activate {
                release,
                healthy_deadline,
                min_healthy,
                confirm_deadline,
                ..
            } => {
                self.stats.activate_received_us.push(received);
                let id = release.id.to_string();
                if self.svc.current.as_deref() == Some(id.as_str()) {
                    let r = self.result(
                        &order,
                        &id,
                        OrderPhase::Activated,
                        ResultCode::Ok,
                        "already current",
                    );
                    self.reply(tx, r).await?;
                    let r = self.result(
                        &order,
                        &id,
                        OrderPhase::Healthy,
                        ResultCode::Ok,
                        "already current",
                    );
                    return self.reply(tx, r).await;
                }
                if let Err(e) = self.stage(channel, &release).await {
                    let r = self.result(
                        &order,
                        &id,
                        OrderPhase::Failed,
                        ResultCode::DownloadFailed,
                        e.to_string(),
                    );
                    return self.reply(tx, r).await;
                }
                let at = Instant::now() + self.config.activate_delay;
                self.svc.timers.push((
                    at,
                    Timer::Activate {
                        order,
                        release: id,
                        min_healthy,
                        healthy_deadline,
                        confirm_deadline,
                    },
                ));
                if self.config.activate_delay.is_zero() {
                    self.fire_timers(tx).await?;
                }
                Ok(())
            }
            OrderAction::Confirm { release, .. } => {
                let release = release.to_string();
                if self.svc.current.as_deref() == Some(release.as_str()) {
                    self.svc.armed = None;
                    self.svc
                        .timers
                        .retain(|(_, t)| !matches!(t, Timer::ConfirmTimeout { .. }));
                    let r = self.result(
                        &order,
                        &release,
                        OrderPhase::Confirmed,
                        ResultCode::Ok,
                        "confirmed",
                    );
                    self.reply(tx, r).await
                } else {
                    let r = self.result(
                        &order,
                        &release,
                        OrderPhase::Failed,
                        ResultCode::InvalidOrder,
                        "not current",
                    );
                    self.reply(tx, r).await
                }
            }
            OrderAction::Rollback { to } => {
                let target = to
                    .map(|r| r.to_string())
                    .or_else(|| self.svc.previous.clone());
                let Some(target) = target.filter(|t| self.svc.kept.contains(t)) else {
                    let r = self.result(
                        &order,
                        "",
                        OrderPhase::Failed,
                        ResultCode::UnknownRelease,
                        "no such release on disk",
                    );
                    return self.reply(tx, r).await;
                };
                self.svc.armed = None;
                self.svc.timers.clear();
                if self.svc.current.as_deref() != Some(target.as_str()) {
                    self.svc.previous = self.svc.current.replace(target.clone());
                }
                self.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
                let r = self.result(
                    &order,
                    &target,
                    OrderPhase::RolledBack,
                    ResultCode::Ok,
                    "rolled back",
                );
                self.reply(tx, r).await
            }
            OrderAction::Cancel => {
                let r = self.result(
                    &order,
                    "",
                    OrderPhase::Cancelled,
                    ResultCode::Ok,
                    "nothing to cancel",
                );
                self.reply(tx, r).await
            }
        }
    }

    fn on_hold(&mut self, h: &wire::HoldConfirm) {
        if self.svc.armed.as_deref() != Some(h.release.as_str()) {
            return;
        }
        let until = Instant::now() + Duration::from_millis(h.confirm_deadline_ms);
        for (at, t) in &mut self.svc.timers {
            if matches!(t, Timer::ConfirmTimeout { .. }) && *at < until {
                *at = until;
            }
        }
    }

    /// Stages `release`: a real download over `FetchArtifact` (length and sha256 checked), or
    /// nothing when fetching is off or the release is already kept.
    async fn stage(
        &mut self,
        channel: &Channel,
        release: &serin_proto::Release,
    ) -> anyhow::Result<()> {
        let id = release.id.to_string();
        if self.svc.kept.contains(&id) {
            return Ok(());
        }
        if self.config.fetch && release.source == serin_proto::ArtifactSource::Coordinator {
            let bytes = fetch(channel, &release.sha256.to_hex(), release.size).await?;
            self.stats.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        self.svc.kept.push(id);
        Ok(())
    }

    async fn fire_timers(&mut self, tx: &Out) -> anyhow::Result<()> {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.svc.timers)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.svc.timers = later;
        for (_, timer) in due {
            match timer {
                Timer::Activate {
                    order,
                    release,
                    min_healthy,
                    healthy_deadline,
                    confirm_deadline,
                } => {
                    if self.rng.unit() < self.config.fail_rate {
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        let r = self.result(
                            &order,
                            &release,
                            OrderPhase::Failed,
                            ResultCode::ServiceFailedToStart,
                            format!("release {release} failed to start (simulated)"),
                        );
                        self.reply(tx, r).await?;
                        continue;
                    }
                    self.svc.previous = self.svc.current.replace(release.clone());
                    self.svc.armed = Some(release.clone());
                    let r = self.result(
                        &order,
                        &release,
                        OrderPhase::Activated,
                        ResultCode::Ok,
                        "activated",
                    );
                    self.reply(tx, r).await?;
                    self.report_health(tx).await?;
                    let now = Instant::now();
                    if self.rng.unit() < self.config.unhealthy_rate {
                        self.svc
                            .timers
                            .push((now + healthy_deadline, Timer::Unhealthy { order }));
                        continue;
                    }
                    if let Some(d) = confirm_deadline {
                        self.svc.timers.push((
                            now + d,
                            Timer::ConfirmTimeout {
                                order: order.clone(),
                                release: release.clone(),
                            },
                        ));
                    }
                    self.svc
                        .timers
                        .push((now + min_healthy, Timer::Healthy { order, release }));
                }
                Timer::Healthy { order, release } => {
                    if self.svc.current.as_deref() == Some(release.as_str()) {
                        let r = self.result(
                            &order,
                            &release,
                            OrderPhase::Healthy,
                            ResultCode::Ok,
                            "healthy",
                        );
                        self.reply(tx, r).await?;
                    }
                }
                Timer::Unhealthy { order } => {
                    self.revert(
                        tx,
                        &order,
                        ResultCode::Unhealthy,
                        "not healthy by the healthy deadline (simulated)",
                    )
                    .await?;
                }
                Timer::ConfirmTimeout { order, release } => {
                    if self.svc.armed.as_deref() == Some(release.as_str()) {
                        self.stats.confirm_timeouts.fetch_add(1, Ordering::Relaxed);
                        self.revert(
                            tx,
                            &order,
                            ResultCode::ConfirmTimeout,
                            "no confirm before the deadline",
                        )
                        .await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The dead-man switch: back to the previous release, reported against the activate order.
    async fn revert(
        &mut self,
        tx: &Out,
        order: &Order,
        code: ResultCode,
        why: &str,
    ) -> anyhow::Result<()> {
        self.svc.armed = None;
        self.svc
            .timers
            .retain(|(_, t)| !matches!(t, Timer::Healthy { .. } | Timer::ConfirmTimeout { .. }));
        let from = self.svc.current.clone().unwrap_or_default();
        if let Some(prev) = self.svc.previous.take() {
            self.svc.current = Some(prev);
        }
        self.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
        let r = self.result(order, &from, OrderPhase::RolledBack, code, why);
        // Results of an older sequence are not kept for duplicates of the current one.
        send(tx, Up::Result(r)).await?;
        self.stats.results.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Sends one message; it pushes the next heartbeat back.
async fn send(tx: &Out, body: Up) -> anyhow::Result<()> {
    tx.tx
        .send(wire::AgentMessage { body: Some(body) })
        .await
        .map_err(|_| anyhow::anyhow!("the outgoing stream closed"))?;
    *tx.last_sent.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
    Ok(())
}

/// Downloads an artifact over `FetchArtifact`, checking its length and sha256; returns its size.
pub async fn fetch(channel: &Channel, sha256_hex: &str, size: u64) -> anyhow::Result<u64> {
    let mut client =
        AgentServiceClient::new(channel.clone()).max_decoding_message_size(16 * 1024 * 1024);
    let mut chunks = client
        .fetch_artifact(wire::FetchArtifactRequest {
            sha256: sha256_hex.into(),
            offset: 0,
        })
        .await?
        .into_inner();
    let mut hasher = sha2::Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        anyhow::ensure!(
            chunk.offset == got,
            "chunk at offset {} where {got} was expected",
            chunk.offset
        );
        got += chunk.data.len() as u64;
        hasher.update(&chunk.data);
    }
    anyhow::ensure!(
        got == size,
        "artifact {sha256_hex}: {got} bytes where {size} were expected"
    );
    let hex = hex::encode(hasher.finalize());
    anyhow::ensure!(
        hex == sha256_hex,
        "artifact sha256 mismatch: expected {sha256_hex}, got {hex}"
    );
    Ok(got)
}
