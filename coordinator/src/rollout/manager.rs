//! [`RolloutManager`]: the rollout engine's front door, used by the control service.
//!
//! It validates specs against the store, plans cohorts, starts one task per rollout (see
//! [`super::task`]) and forwards operator requests to it. It holds only handles; every
//! rollout's state lives in its task, and only that task steps the machine and answers
//! operator calls about it.
//!
//! * **One live rollout per service, by construction.** Each service has one *slot* that holds
//!   at most one running rollout task. Every call that can change a service's rollouts (start,
//!   and every operator action) holds the slot's lock for its whole duration, so a start and a
//!   rollback of the previous rollout are serialised; a new rollout's task only exists after the
//!   old task has stopped (cancelled and awaited).
//! * A new rollout's task subscribes to fleet events before the plan is computed and takes the
//!   first step itself, so no reply to the canary's orders can be missed.
//! * On start, for each service the newest stored rollout is resumed when it is unfinished,
//!   still delivering orders, or succeeded (so hosts that join or reconnect later still converge
//!   to its release until a newer rollout of the service starts).
//! * Finished rollouts that are not running are read from the store for status, list and
//!   explain, and refuse operator actions with the state named (rollback of the newest
//!   succeeded rollout restarts its task).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serin_proto::{Release, ServiceName, ValidationError};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::machine::{ControlError, OperatorAction, Rollout, RolloutState};
use super::plan;
use super::record::{self, RecordError};
use super::settings::EngineSettings;
use super::spec::RolloutSpec;
use super::task::{self, Clock, ControlMsg, Driver, FirstStep, TaskError};
use super::view::{Explanation, RolloutView};
use crate::fleet::{Fleet, FleetEvent};
use crate::store::{Store, StoreError};

/// Why the engine could not do what was asked. Each variant says which gRPC status it is at the
/// edge (see `control_service`).
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The spec is invalid (invalid argument).
    #[error(transparent)]
    InvalidSpec(#[from] ValidationError),
    /// The release is not registered (not found).
    #[error(
        "release {release} of service {service} is not registered (add it with `serin release add` or `serin artifact push`)"
    )]
    UnknownRelease { service: String, release: String },
    /// No such rollout (not found).
    #[error("no rollout {0}")]
    NotFound(String),
    /// Nothing to roll out to (failed precondition).
    #[error("{0}")]
    NothingToDo(String),
    /// The service already has an unfinished rollout (failed precondition).
    #[error(
        "service {service} already has an active rollout {rollout} ({state}); pause, abort or wait for it first"
    )]
    ServiceBusy {
        service: String,
        rollout: String,
        state: String,
    },
    /// The operator action does not apply now (failed precondition).
    #[error(transparent)]
    Refused(#[from] ControlError),
    /// Only the newest rollout of a service may be rolled back (failed precondition).
    #[error(
        "rollout {rollout} is not the latest rollout of service {service} ({newer} is); roll back that one instead"
    )]
    NotLatest {
        rollout: String,
        service: String,
        newer: String,
    },
    /// The store refused a save (unavailable): retry later.
    #[error(transparent)]
    NotSaved(TaskError),
    /// The rollout's task stopped before answering (unavailable).
    #[error("rollout {0} stopped before answering (the coordinator is shutting down)")]
    Stopped(String),
    /// Reading or writing the store failed (internal).
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A stored record is unreadable (internal).
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A stored release is invalid (internal).
    #[error("stored release {release} is invalid: {problem}")]
    BadRelease { release: String, problem: String },
}

impl From<TaskError> for RolloutError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Refused(e) => RolloutError::Refused(e),
            e => RolloutError::NotSaved(e),
        }
    }
}

/// The running task of a service's rollout.
struct Running {
    id: String,
    control: mpsc::Sender<ControlMsg>,
    status: watch::Receiver<RolloutView>,
    cancel: CancellationToken,
    join: JoinHandle<()>,
}

impl Running {
    /// Cancels the task and waits until it has stopped.
    async fn stop(self) {
        self.cancel.cancel();
        let _ = self.join.await;
    }
}

/// One service's rollouts: at most one running task.
#[derive(Default)]
struct Slot {
    running: Option<Running>,
}

type SlotLock = Arc<tokio::sync::Mutex<Slot>>;

struct Inner {
    store: Arc<dyn Store>,
    fleet: Arc<dyn Fleet>,
    settings: EngineSettings,
    shutdown: CancellationToken,
    clock: Clock,
    tasks: TaskTracker,
    /// The slot of every service that has had a rollout task.
    slots: Mutex<BTreeMap<ServiceName, SlotLock>>,
    /// Status of every rollout whose task was started, by id (read-only views for status and
    /// watch; a task that stopped leaves its final status).
    views: Mutex<BTreeMap<String, watch::Receiver<RolloutView>>>,
    /// Work counters of every task started by this manager.
    stats: task::TaskStats,
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
                slots: Mutex::new(BTreeMap::new()),
                views: Mutex::new(BTreeMap::new()),
                stats: task::TaskStats::default(),
            }),
        };
        // Subscribed before anything is loaded: nothing the fleet says from here on is missed.
        let ids = mgr.inner.store.rollout_ids()?;
        let mut newest: BTreeMap<ServiceName, Rollout> = BTreeMap::new();
        for id in &ids {
            mgr.migrate_records(id)?;
            let Some(m) = mgr.load(id)? else { continue };
            if let Some(older) = newest.insert(m.spec().service.clone(), m)
                && !older.state().is_finished()
            {
                tracing::warn!(rollout = %older.id(), state = %older.state(), "an older unfinished rollout was superseded by a newer one of its service; not resumed");
            }
        }
        for (service, m) in newest {
            let resume = !m.state().is_finished()
                || !m.is_quiescent()
                || m.state() == RolloutState::Succeeded;
            if !resume {
                continue;
            }
            let events = mgr.inner.fleet.subscribe();
            // Reload after subscribing, so the machine is not older than the subscription.
            let Some(m) = mgr.load(m.id())? else { continue };
            tracing::info!(rollout = %m.id(), state = %m.state(), "resuming rollout from the store");
            let running = mgr.spawn(m, events, FirstStep::Resume);
            let slot = mgr.slot(&service);
            slot.lock().await.running = Some(running);
        }
        Ok(mgr)
    }

    fn slot(&self, service: &ServiceName) -> SlotLock {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(service.clone()).or_default().clone()
    }

    fn load(&self, id: &str) -> Result<Option<Rollout>, RolloutError> {
        let Some(stored) = self.inner.store.load_rollout(id)? else {
            return Ok(None);
        };
        let d = record::decode_rollout(id, &stored.header, &stored.hosts)?;
        Ok(Some(Rollout::restore(
            d.header,
            d.hosts,
            self.inner.settings.clone(),
            self.inner.clock.now_ms(),
        )?))
    }

    /// Rewrites a rollout's records that are in an older encoding in the current one, in one
    /// transaction (the header and every host record; events stay as they are, they are read in
    /// either encoding). Run when the store is opened, before anything is resumed.
    fn migrate_records(&self, id: &str) -> Result<(), RolloutError> {
        let Some(stored) = self.inner.store.load_rollout(id)? else {
            return Ok(());
        };
        let d = record::decode_rollout(id, &stored.header, &stored.hosts)?;
        if !d.outdated {
            return Ok(());
        }
        let hosts: Vec<_> = d
            .hosts
            .iter()
            .map(|r| (r.host.id.clone(), record::encode(r)))
            .collect();
        self.inner
            .store
            .save_rollout(id, &record::encode(&d.header), &hosts, &[])?;
        tracing::info!(
            rollout = %id,
            hosts = hosts.len(),
            to = record::RECORD_VERSION,
            "rollout records migrated to the current encoding"
        );
        Ok(())
    }

    fn stored(&self, id: &str) -> Result<Rollout, RolloutError> {
        self.load(id)?
            .ok_or_else(|| RolloutError::NotFound(id.to_string()))
    }

    /// Starts the task of a machine; `events` was subscribed before the machine was built or
    /// loaded.
    fn spawn(
        &self,
        m: Rollout,
        events: broadcast::Receiver<FleetEvent>,
        first: FirstStep,
    ) -> Running {
        let inner = &self.inner;
        let driver = Driver::new(inner.store.clone(), inner.fleet.clone(), inner.clock);
        // A new rollout publishes its whole status after its first step (before start_rollout
        // answers): until then its waves are enough, and no walk over every host delays the
        // first orders. A resumed one shows its hosts at once.
        let initial = match first {
            FirstStep::New(_) => m.status_of_waves(),
            FirstStep::Resume => m.status(),
        };
        let (status_tx, status_rx) = watch::channel(initial);
        let (control_tx, control_rx) = mpsc::channel(inner.settings.control_queue.max(1));
        let cancel = inner.shutdown.child_token();
        let id = m.id().to_string();
        inner
            .views
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), status_rx.clone());
        let join = inner.tasks.spawn(task::run_counted(
            m,
            driver,
            events,
            control_rx,
            status_tx,
            inner.settings.tick,
            first,
            cancel.clone(),
            inner.stats.clone(),
        ));
        Running {
            id,
            control: control_tx,
            status: status_rx,
            cancel,
            join,
        }
    }

    /// The work its rollout tasks did so far (machine steps, saves, allocation rounds,
    /// statuses built), summed over every task.
    pub fn task_stats(&self) -> task::TaskStats {
        self.inner.stats.clone()
    }

    /// Looks up a spec's release.
    fn release_of(&self, spec: &RolloutSpec) -> Result<Release, RolloutError> {
        let rec = self
            .inner
            .store
            .release(&spec.service, &spec.release)?
            .ok_or_else(|| RolloutError::UnknownRelease {
                service: spec.service.to_string(),
                release: spec.release.to_string(),
            })?;
        record::release_of(&rec).map_err(|e| RolloutError::BadRelease {
            release: spec.release.to_string(),
            problem: e.to_string(),
        })
    }

    /// Which host lands in which wave, exactly as [`RolloutManager::start_rollout`] would run it now.
    pub async fn plan(&self, spec: &RolloutSpec) -> Result<plan::Plan, RolloutError> {
        self.release_of(spec)?;
        let p = plan::plan(spec, &self.inner.fleet.snapshot());
        p.check(spec)?;
        Ok(p)
    }

    /// Starts a rollout: plans, persists and dispatches the canary before returning.
    pub async fn start_rollout(&self, spec: RolloutSpec) -> Result<RolloutView, RolloutError> {
        let release = self.release_of(&spec)?;
        let slot = self.slot(&spec.service);
        let mut slot = slot.lock().await;
        if let Some(r) = &slot.running {
            let st = r.status.borrow();
            if !st.finished() && !r.join.is_finished() {
                return Err(RolloutError::ServiceBusy {
                    service: spec.service.to_string(),
                    rollout: r.id.clone(),
                    state: st.state.to_string(),
                });
            }
        }
        // Subscribed before planning: the task sees every event after the snapshot.
        let events = self.inner.fleet.subscribe();
        let fleet = self.inner.fleet.snapshot();
        let p = plan::plan(&spec, &fleet);
        p.check(&spec)?;
        if p.waves.is_empty() {
            let skipped: Vec<String> = p
                .skipped
                .iter()
                .map(|s| format!("{} ({})", s.host_id, s.reason))
                .collect();
            return Err(RolloutError::NothingToDo(if skipped.is_empty() {
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
        // The previous (finished) rollout of the service stops before the new one exists.
        if let Some(old) = slot.running.take() {
            tracing::info!(rollout = %old.id, superseded_by = %id, "stopping the previous rollout of the service");
            old.stop().await;
        }
        let service = spec.service.clone();
        let mut m = Rollout::new(
            id.clone(),
            spec,
            release,
            &p,
            self.inner.settings.clone(),
            now,
        );
        // Hosts skipped for now (e.g. a verdict about a process that is gone) join once a
        // passing verdict arrives.
        m.watch_skipped(&fleet);
        let waves = m.waves().len();
        let (reply, answer) = oneshot::channel();
        let running = self.spawn(m, events, FirstStep::New(reply));
        match answer.await {
            Ok(Ok(st)) => {
                tracing::info!(rollout = %id, service = %service, waves, "rollout started");
                slot.running = Some(running);
                Ok(st)
            }
            Ok(Err(e)) => {
                running.stop().await;
                self.inner
                    .views
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(e.into())
            }
            Err(_) => Err(RolloutError::Stopped(id)),
        }
    }

    fn new_id(&self, service: &ServiceName, now_ms: u64) -> Result<String, RolloutError> {
        let ids = self.inner.store.rollout_ids()?;
        let mut t = now_ms;
        loop {
            let id = format!("r-{service}-{t}");
            if !ids.contains(&id) {
                return Ok(id);
            }
            t += 1;
        }
    }

    fn view(&self, id: &str) -> Option<watch::Receiver<RolloutView>> {
        let views = self.inner.views.lock().unwrap_or_else(|p| p.into_inner());
        views.get(id).cloned()
    }

    /// The status of a rollout, running or stored.
    pub async fn status(&self, id: &str) -> Result<RolloutView, RolloutError> {
        if let Some(v) = self.view(id) {
            return Ok(v.borrow().clone());
        }
        Ok(self.stored(id)?.status())
    }

    /// The rollout's status now and after every change. For a finished rollout that is not
    /// running, the receiver holds the final status and reports the sender gone.
    pub fn watch(&self, id: &str) -> Result<watch::Receiver<RolloutView>, RolloutError> {
        if let Some(v) = self.view(id) {
            return Ok(v);
        }
        let st = self.stored(id)?.status();
        let (_tx, rx) = watch::channel(st);
        Ok(rx)
    }

    /// Every rollout (oldest first), optionally for one service.
    pub async fn list(
        &self,
        service: Option<&ServiceName>,
    ) -> Result<Vec<RolloutView>, RolloutError> {
        let ids = self.inner.store.rollout_ids()?;
        let mut out = Vec::new();
        for id in ids {
            let st = match self.view(&id) {
                Some(v) => v.borrow().clone(),
                None => match self.stored(&id) {
                    Ok(m) => m.status(),
                    Err(e) => {
                        tracing::warn!(rollout = %id, error = %e, "skipping unreadable rollout");
                        continue;
                    }
                },
            };
            if service.is_none_or(|s| *s == st.spec.service) {
                out.push(st);
            }
        }
        Ok(out)
    }

    /// Pause, resume, promote, abort, retry or roll back a rollout, recording `actor` (e.g. an
    /// authenticated operator name). Holds the service's slot for the whole call.
    pub async fn control(
        &self,
        id: &str,
        action: OperatorAction,
        actor: &str,
        reason: &str,
    ) -> Result<RolloutView, RolloutError> {
        let service = self.view(id).map(|v| v.borrow().spec.service.clone());
        let service = match service {
            Some(s) => s,
            None => self.stored(id)?.spec().service.clone(),
        };
        let slot = self.slot(&service);
        let mut slot = slot.lock().await;
        let live = slot
            .running
            .as_ref()
            .filter(|r| r.id == id && !r.control.is_closed() && !r.join.is_finished())
            .map(|r| r.control.clone());
        let sender = match live {
            Some(s) => s,
            None => {
                let m = self.stored(id)?;
                if action != OperatorAction::Rollback || m.state() != RolloutState::Succeeded {
                    return Err(m.refusal(action).into());
                }
                // Only the newest rollout of a service may be rolled back.
                let ids = self.inner.store.rollout_ids()?;
                let pos = ids.iter().position(|x| x == id);
                for newer in ids.iter().skip(pos.map_or(ids.len(), |p| p + 1)) {
                    if let Some(n) = self.load(newer)?
                        && n.spec().service == service
                    {
                        return Err(RolloutError::NotLatest {
                            rollout: id.to_string(),
                            service: service.to_string(),
                            newer: newer.clone(),
                        });
                    }
                }
                if let Some(old) = slot.running.take() {
                    old.stop().await;
                }
                let events = self.inner.fleet.subscribe();
                let m = self.stored(id)?;
                let running = self.spawn(m, events, FirstStep::Resume);
                let s = running.control.clone();
                slot.running = Some(running);
                s
            }
        };
        let (tx, rx) = oneshot::channel();
        sender
            .send(ControlMsg {
                action,
                actor: actor.to_string(),
                reason: reason.to_string(),
                reply: tx,
            })
            .await
            .map_err(|_| RolloutError::Stopped(id.to_string()))?;
        match rx.await {
            Ok(r) => r.map_err(RolloutError::from),
            Err(_) => Err(RolloutError::Stopped(id.to_string())),
        }
    }

    /// The status, every decision with its evidence, and the event log.
    pub async fn explain(&self, id: &str) -> Result<Explanation, RolloutError> {
        let status = self.status(id).await?;
        let stored = self
            .inner
            .store
            .load_rollout(id)?
            .ok_or_else(|| RolloutError::NotFound(id.to_string()))?;
        let mut events = Vec::with_capacity(stored.events.len());
        for e in &stored.events {
            match record::decode_event(id, e) {
                Ok(ev) => events.push(ev.display()),
                Err(e) => events.push(format!("(unreadable event: {e})")),
            }
        }
        Ok(Explanation { status, events })
    }

    /// Waits for every rollout task to stop (after shutdown is cancelled).
    pub async fn join(self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}
