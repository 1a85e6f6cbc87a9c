//! [`RolloutManager`]: the rollout engine's front door, used by the control service.
//!
//! It validates specs, plans cohorts, starts one task per rollout (see [`super::task`]) and
//! forwards operator requests to it. It holds only handles (a control channel, a status watch,
//! a cancellation token per rollout); every rollout's state lives in its task.
//!
//! * At most one active (unfinished) rollout per service; a second start is refused with
//!   `failed_precondition`.
//! * On start, every unfinished rollout in the store is rebuilt from its records and resumed,
//!   and the latest succeeded rollout of each service is resumed too, so hosts that join or
//!   reconnect later still converge to its release (until a newer rollout for the service starts).
//! * Finished rollouts that are not running are read from the store for status, list and explain.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serin_proto::{ServiceName, wire};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use super::machine::{Input, OperatorAction, Rollout, RolloutState};
use super::plan;
use super::record::{self, RecordError};
use super::settings::EngineSettings;
use super::spec::RolloutSpec;
use super::task::{self, Clock, ControlMsg, Driver};
use crate::fleet::Fleet;
use crate::store::{Store, StoreError};

/// The engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("reading rollouts from the store failed: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Record(#[from] RecordError),
}

struct Handle {
    service: ServiceName,
    control: mpsc::Sender<ControlMsg>,
    status: watch::Receiver<wire::RolloutStatus>,
    cancel: CancellationToken,
}

struct Inner {
    store: Arc<dyn Store>,
    fleet: Arc<dyn Fleet>,
    settings: EngineSettings,
    shutdown: CancellationToken,
    clock: Clock,
    tasks: TaskTracker,
    live: Mutex<BTreeMap<String, Handle>>,
    /// Serialises starts so "one active rollout per service" cannot race.
    starting: tokio::sync::Mutex<()>,
}

/// Starts, runs and controls rollouts.
#[derive(Clone)]
pub struct RolloutManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RolloutManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolloutManager").finish_non_exhaustive()
    }
}

fn store_status(e: StoreError) -> Status {
    Status::internal(format!("store: {e}"))
}

fn record_status(e: RecordError) -> Status {
    Status::internal(e.to_string())
}

impl RolloutManager {
    /// Loads every unfinished rollout from the store and resumes it.
    pub async fn start(
        store: Arc<dyn Store>,
        fleet: Arc<dyn Fleet>,
        settings: EngineSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, RolloutError> {
        Self::start_with_clock(store, fleet, settings, shutdown, Clock::new()).await
    }

    /// [`RolloutManager::start`] with an explicit clock (tests anchor it to a known time).
    pub async fn start_with_clock(
        store: Arc<dyn Store>,
        fleet: Arc<dyn Fleet>,
        settings: EngineSettings,
        shutdown: CancellationToken,
        clock: Clock,
    ) -> Result<Self, RolloutError> {
        let mgr = Self {
            inner: Arc::new(Inner {
                store,
                fleet,
                settings,
                shutdown,
                clock,
                tasks: TaskTracker::new(),
                live: Mutex::new(BTreeMap::new()),
                starting: tokio::sync::Mutex::new(()),
            }),
        };
        let ids = mgr.inner.store.rollout_ids()?;
        let mut latest_succeeded: BTreeMap<ServiceName, String> = BTreeMap::new();
        let mut resume = Vec::new();
        for id in &ids {
            let m = mgr.load(id)?;
            let Some(m) = m else { continue };
            match m.state() {
                RolloutState::Succeeded => {
                    latest_succeeded.insert(m.spec().service.clone(), id.clone());
                }
                s if !s.is_finished() => resume.push(m),
                // Finished and not succeeded: only needed if an order is still undelivered.
                _ if !m.is_quiescent() => resume.push(m),
                _ => {}
            }
        }
        // A succeeded rollout converges late hosts only while it is the service's newest.
        for m in &resume {
            if latest_succeeded.get(&m.spec().service).is_some_and(|s| {
                ids.iter().position(|x| x == s) < ids.iter().position(|x| x == m.id())
            }) {
                latest_succeeded.remove(&m.spec().service);
            }
        }
        for id in latest_succeeded.values() {
            if let Some(m) = mgr.load(id)? {
                resume.push(m);
            }
        }
        for m in resume {
            tracing::info!(rollout = %m.id(), state = %m.state(), "resuming rollout from the store");
            mgr.spawn(m, true).await;
        }
        Ok(mgr)
    }

    fn load(&self, id: &str) -> Result<Option<Rollout>, RolloutError> {
        let Some(stored) = self.inner.store.load_rollout(id)? else {
            return Ok(None);
        };
        let header = record::decode_header(id, &stored.header)?;
        let mut hosts = Vec::with_capacity(stored.hosts.len());
        for (h, b) in &stored.hosts {
            hosts.push(record::decode_host(id, h.as_str(), b)?);
        }
        Ok(Some(Rollout::restore(
            header,
            hosts,
            self.inner.settings.clone(),
            self.inner.clock.now_ms(),
        )?))
    }

    /// Starts the task of a machine. With `resync`, the machine first sees the fleet snapshot.
    async fn spawn(&self, mut m: Rollout, resync: bool) -> watch::Receiver<wire::RolloutStatus> {
        let inner = &self.inner;
        let events = inner.fleet.subscribe();
        let mut driver = Driver::new(inner.store.clone(), inner.fleet.clone(), inner.clock);
        if resync {
            driver
                .feed(&mut m, Input::Resync(inner.fleet.snapshot()))
                .await;
        }
        let (status_tx, status_rx) = watch::channel(m.status());
        let (control_tx, control_rx) = mpsc::channel(inner.settings.control_queue.max(1));
        let cancel = inner.shutdown.child_token();
        let id = m.id().to_string();
        let service = m.spec().service.clone();
        let old = inner.live.lock().map(|mut l| {
            l.insert(
                id.clone(),
                Handle {
                    service,
                    control: control_tx,
                    status: status_rx.clone(),
                    cancel: cancel.clone(),
                },
            )
        });
        if let Ok(Some(old)) = old {
            old.cancel.cancel();
        }
        inner.tasks.spawn(task::run(
            m,
            driver,
            events,
            control_rx,
            status_tx,
            inner.settings.tick,
            cancel,
        ));
        status_rx
    }

    /// Validates a spec and looks up its release.
    fn validate(
        &self,
        spec: wire::RolloutSpec,
    ) -> Result<(RolloutSpec, serin_proto::Release), Status> {
        let spec = RolloutSpec::try_from(spec)?;
        let rec = self
            .inner
            .store
            .release(&spec.service, &spec.release)
            .map_err(store_status)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "release {} of service {} is not registered (add it with `serin release add` or `serin artifact push`)",
                    spec.release, spec.service
                ))
            })?;
        let release = serin_proto::Release::try_from(wire::Release {
            service: rec.service,
            id: rec.id,
            sha256: rec.sha256,
            size: rec.size,
            url: rec.url,
        })
        .map_err(|e| {
            Status::internal(format!("stored release {} is invalid: {e}", spec.release))
        })?;
        Ok((spec, release))
    }

    /// Which host lands in which wave, exactly as [`RolloutManager::start_rollout`] would run it now.
    pub async fn plan(&self, spec: wire::RolloutSpec) -> Result<wire::RolloutPlan, Status> {
        let (spec, _) = self.validate(spec)?;
        let p = plan::plan(&spec, &self.inner.fleet.snapshot());
        Ok(p.to_wire(&spec))
    }

    /// Starts a rollout: validates, plans, persists and dispatches the canary before returning.
    pub async fn start_rollout(
        &self,
        spec: wire::RolloutSpec,
    ) -> Result<wire::RolloutStatus, Status> {
        let (spec, release) = self.validate(spec)?;
        let _guard = self.inner.starting.lock().await;
        let superseded = {
            let live = self
                .inner
                .live
                .lock()
                .map_err(|_| Status::internal("rollout table poisoned"))?;
            let mut superseded = Vec::new();
            for (id, h) in live.iter() {
                if h.service != spec.service {
                    continue;
                }
                let st = h.status.borrow();
                if !st.finished {
                    return Err(Status::failed_precondition(format!(
                        "service {} already has an active rollout {id} ({}); pause, abort or wait for it first",
                        spec.service, st.state
                    )));
                }
                superseded.push(h.cancel.clone());
            }
            superseded
        };
        let snapshot = self.inner.fleet.snapshot();
        let p = plan::plan(&spec, &snapshot);
        if p.waves.is_empty() {
            let skipped: Vec<String> = p
                .skipped
                .iter()
                .map(|s| format!("{} ({})", s.host_id, s.reason))
                .collect();
            return Err(Status::failed_precondition(if skipped.is_empty() {
                format!(
                    "selector {:?} selects no host that manages service {}",
                    spec.selector.to_string(),
                    spec.service
                )
            } else {
                format!("no host to update; skipped: {}", skipped.join(", "))
            }));
        }
        let now = self.inner.clock.now_ms();
        let id = self.new_id(&spec.service, now)?;
        for c in superseded {
            c.cancel();
        }
        let mut m = Rollout::new(
            id.clone(),
            spec,
            release,
            &p,
            self.inner.settings.clone(),
            now,
        );
        let mut driver = Driver::new(
            self.inner.store.clone(),
            self.inner.fleet.clone(),
            self.inner.clock,
        );
        // First step: persist the rollout and dispatch the canary.
        driver.feed(&mut m, Input::Tick).await;
        if self
            .inner
            .store
            .load_rollout(&id)
            .map_err(store_status)?
            .is_none()
        {
            return Err(Status::unavailable(format!(
                "rollout {id} could not be saved; nothing was changed"
            )));
        }
        tracing::info!(rollout = %id, service = %m.spec().service, release = %m.spec().release, waves = m.waves().len(), "rollout started");
        let rx = self.spawn(m, false).await;
        let st = rx.borrow().clone();
        Ok(st)
    }

    fn new_id(&self, service: &ServiceName, now_ms: u64) -> Result<String, Status> {
        let ids = self.inner.store.rollout_ids().map_err(store_status)?;
        let mut t = now_ms;
        loop {
            let id = format!("r-{service}-{t}");
            if !ids.contains(&id) {
                return Ok(id);
            }
            t += 1;
        }
    }

    /// The status of a rollout, running or stored.
    pub async fn status(&self, id: &str) -> Result<wire::RolloutStatus, Status> {
        if let Some(st) = self.live_status(id) {
            return Ok(st);
        }
        Ok(self.stored(id)?.status())
    }

    fn live_status(&self, id: &str) -> Option<wire::RolloutStatus> {
        let live = self.inner.live.lock().ok()?;
        live.get(id).map(|h| h.status.borrow().clone())
    }

    fn stored(&self, id: &str) -> Result<Rollout, Status> {
        match self.load(id) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(Status::not_found(format!("no rollout {id}"))),
            Err(RolloutError::Store(e)) => Err(store_status(e)),
            Err(RolloutError::Record(e)) => Err(record_status(e)),
        }
    }

    /// The rollout's status now and after every change. For a finished rollout that is not
    /// running, the receiver holds the final status and reports the sender gone.
    pub fn watch(&self, id: &str) -> Result<watch::Receiver<wire::RolloutStatus>, Status> {
        if let Ok(live) = self.inner.live.lock()
            && let Some(h) = live.get(id)
        {
            return Ok(h.status.clone());
        }
        let st = self.stored(id)?.status();
        let (_tx, rx) = watch::channel(st);
        Ok(rx)
    }

    /// Every rollout (oldest first), optionally for one service.
    pub async fn list(&self, service: Option<&str>) -> Result<Vec<wire::RolloutStatus>, Status> {
        let ids = self.inner.store.rollout_ids().map_err(store_status)?;
        let mut out = Vec::new();
        for id in ids {
            let st = match self.live_status(&id) {
                Some(st) => st,
                None => match self.stored(&id) {
                    Ok(m) => m.status(),
                    Err(e) => {
                        tracing::warn!(rollout = %id, error = %e.message(), "skipping unreadable rollout");
                        continue;
                    }
                },
            };
            let svc = st
                .spec
                .as_ref()
                .map(|s| s.service.as_str())
                .unwrap_or_default();
            if service.is_none_or(|s| s.is_empty() || s == svc) {
                out.push(st);
            }
        }
        Ok(out)
    }

    /// Pause, resume, promote, abort, retry or roll back a rollout.
    pub async fn control(&self, req: wire::ControlRequest) -> Result<wire::RolloutStatus, Status> {
        self.control_as(req, "operator").await
    }

    /// [`RolloutManager::control`] recording `actor` (e.g. an authenticated operator name).
    pub async fn control_as(
        &self,
        req: wire::ControlRequest,
        actor: &str,
    ) -> Result<wire::RolloutStatus, Status> {
        let action = match wire::ControlAction::try_from(req.action) {
            Ok(wire::ControlAction::Pause) => OperatorAction::Pause,
            Ok(wire::ControlAction::Resume) => OperatorAction::Resume,
            Ok(wire::ControlAction::Promote) => OperatorAction::Promote,
            Ok(wire::ControlAction::Abort) => OperatorAction::Abort,
            Ok(wire::ControlAction::Retry) => OperatorAction::Retry,
            Ok(wire::ControlAction::Rollback) => OperatorAction::Rollback,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "action: {} is not one of pause, resume, promote, abort, retry, rollback",
                    req.action
                )));
            }
        };
        if req.reason.len() > 1024 {
            return Err(Status::invalid_argument("reason: at most 1024 bytes"));
        }
        let id = req.rollout_id.as_str();
        let sender = self.live_sender(id);
        let sender = match sender {
            Some(s) => s,
            None => {
                let m = self.stored(id)?;
                if action == OperatorAction::Rollback && m.state() == RolloutState::Succeeded {
                    // Only the newest rollout of a service may be rolled back.
                    let newer = self
                        .list(Some(m.spec().service.as_str()))
                        .await?
                        .into_iter()
                        .rev()
                        .find(|s| {
                            s.rollout_id != id && s.created_unix_ms > m.status().created_unix_ms
                        });
                    if let Some(n) = newer {
                        return Err(Status::failed_precondition(format!(
                            "rollout {id} is not the latest rollout of service {} ({} is); roll back that one instead",
                            m.spec().service,
                            n.rollout_id
                        )));
                    }
                    let _guard = self.inner.starting.lock().await;
                    self.spawn(m, true).await;
                    self.live_sender(id)
                        .ok_or_else(|| Status::internal(format!("rollout {id} did not start")))?
                } else {
                    // The machine refuses with the right message.
                    let mut m = m;
                    let cmds = m.step(
                        self.inner.clock.now_ms(),
                        Input::Operator {
                            action,
                            actor: actor.to_string(),
                            reason: req.reason.clone(),
                        },
                    );
                    for c in cmds {
                        if let super::machine::Command::Refused(e) = c {
                            return Err(Status::failed_precondition(e.to_string()));
                        }
                    }
                    return Err(Status::failed_precondition(format!(
                        "rollout {id} is not running"
                    )));
                }
            }
        };
        let (tx, rx) = oneshot::channel();
        sender
            .send(ControlMsg {
                action,
                actor: actor.to_string(),
                reason: req.reason,
                reply: tx,
            })
            .await
            .map_err(|_| Status::unavailable(format!("rollout {id} is shutting down")))?;
        match rx.await {
            Ok(Ok(st)) => Ok(st),
            Ok(Err(e)) => Err(Status::failed_precondition(e.to_string())),
            Err(_) => Err(Status::unavailable(format!(
                "rollout {id} stopped before answering"
            ))),
        }
    }

    fn live_sender(&self, id: &str) -> Option<mpsc::Sender<ControlMsg>> {
        let live = self.inner.live.lock().ok()?;
        live.get(id)
            .filter(|h| !h.control.is_closed())
            .map(|h| h.control.clone())
    }

    /// The status, every decision with its evidence, and the event log.
    pub async fn explain(&self, id: &str) -> Result<wire::Explanation, Status> {
        let status = self.status(id).await?;
        let stored = self
            .inner
            .store
            .load_rollout(id)
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no rollout {id}")))?;
        let mut events = Vec::with_capacity(stored.events.len());
        for e in &stored.events {
            match record::decode_event(id, e) {
                Ok(ev) => events.push(ev.display()),
                Err(e) => events.push(format!("(unreadable event: {e})")),
            }
        }
        Ok(wire::Explanation {
            decisions: status.decisions.clone(),
            status: Some(status),
            events,
        })
    }

    /// Waits for every rollout task to stop (after shutdown is cancelled).
    pub async fn join(self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}
