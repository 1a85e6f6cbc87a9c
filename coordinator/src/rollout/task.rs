//! One tokio task per rollout: it owns the [`Rollout`] machine and is its only caller.
//!
//! A `select!` turns fleet events, a timer set at the machine's next deadline (or the safety
//! tick), operator calls and cancellation into [`Input`]s. The [`Driver`] executes the resulting
//! [`Command`]s in order: persist (and nothing else) until the store has the records, then
//! allocate sequence numbers, then send orders. After every step the task publishes the rollout's
//! status on a watch channel.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serin_proto::{HostId, ServiceName, wire};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::machine::{
    Command, ControlError, Input, OperatorAction, Persist, Rollout, RolloutState,
};
use super::record;
use crate::fleet::{Fleet, FleetEvent};
use crate::store::{Store, StoreError};

/// Milliseconds since the unix epoch that advance with tokio's clock (so tests with paused time
/// see time move), anchored to the wall clock once.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ms: u64,
    base: tokio::time::Instant,
}

impl Clock {
    /// Anchors the clock now.
    pub fn new() -> Self {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self::at(base_ms)
    }

    /// A clock that reads `base_ms` now.
    pub fn at(base_ms: u64) -> Self {
        Self {
            base_ms,
            base: tokio::time::Instant::now(),
        }
    }

    /// The current time in unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64
    }

    /// The tokio instant of a unix-ms time (now if it is in the past).
    pub fn instant_of(&self, at_ms: u64) -> tokio::time::Instant {
        let now = self.now_ms();
        tokio::time::Instant::now() + Duration::from_millis(at_ms.saturating_sub(now))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// An operator request for a rollout task, with where to send the answer.
#[derive(Debug)]
pub struct ControlMsg {
    pub action: OperatorAction,
    pub actor: String,
    pub reason: String,
    pub reply: oneshot::Sender<Result<wire::RolloutStatus, ControlError>>,
}

/// Executes a machine's commands against the store and the fleet.
pub struct Driver {
    pub store: Arc<dyn Store>,
    pub fleet: Arc<dyn Fleet>,
    pub clock: Clock,
    /// A save failed: the next save writes every record, not just the changed ones.
    resave_all: bool,
}

impl Driver {
    /// A driver over a store and a fleet.
    pub fn new(store: Arc<dyn Store>, fleet: Arc<dyn Fleet>, clock: Clock) -> Self {
        Self {
            store,
            fleet,
            clock,
            resave_all: false,
        }
    }

    /// Steps the machine with `input` and executes everything that follows from it. Returns
    /// the refusal of an operator request, if any.
    pub async fn feed(&mut self, m: &mut Rollout, input: Input) -> Option<ControlError> {
        let cmds = m.step(self.clock.now_ms(), input);
        self.execute(m, cmds).await
    }

    async fn save(&mut self, m: &Rollout, p: Persist) -> Result<(), StoreError> {
        let (header, hosts) = if self.resave_all {
            let (h, hosts) = m.records();
            (h, hosts)
        } else {
            (p.header, p.hosts)
        };
        let id = m.id().to_string();
        let header = record::encode(&header);
        let hosts: Vec<(HostId, Vec<u8>)> = hosts
            .iter()
            .map(|h| (h.host.id.clone(), record::encode(h)))
            .collect();
        let events: Vec<Vec<u8>> = p.events.iter().map(record::encode).collect();
        let store = self.store.clone();
        let res =
            tokio::task::spawn_blocking(move || store.save_rollout(&id, &header, &hosts, &events))
                .await
                .unwrap_or_else(|e| Err(StoreError::Io(format!("store task failed: {e}"))));
        self.resave_all = res.is_err();
        res
    }

    async fn allocate(
        &self,
        service: &ServiceName,
        host: &HostId,
        at_least: u64,
    ) -> Result<u64, StoreError> {
        let store = self.store.clone();
        let (host, service) = (host.clone(), service.clone());
        tokio::task::spawn_blocking(move || store.next_seq(&host, &service, at_least))
            .await
            .unwrap_or_else(|e| Err(StoreError::Io(format!("store task failed: {e}"))))
    }

    /// Executes commands in order; a failed save stops everything after it (nothing is sent
    /// that is not on disk).
    pub async fn execute(&mut self, m: &mut Rollout, cmds: Vec<Command>) -> Option<ControlError> {
        let mut queue: VecDeque<Command> = cmds.into();
        let mut refused = None;
        // Each allocation round answers the previous one; a handful is plenty per input.
        let mut rounds = 0;
        while let Some(c) = queue.pop_front() {
            match c {
                Command::Persist(p) => {
                    if let Err(e) = self.save(m, p).await {
                        tracing::error!(rollout = %m.id(), error = %e, "saving rollout failed; orders held back until a save succeeds");
                        // Keep refusals and the finished notice; drop sends and allocations.
                        refused = refused.or_else(|| {
                            queue.iter().find_map(|c| match c {
                                Command::Refused(e) => Some(e.clone()),
                                _ => None,
                            })
                        });
                        return refused;
                    }
                }
                Command::AllocateSeqs(reqs) => {
                    rounds += 1;
                    let mut got = Vec::new();
                    for r in reqs {
                        match self.allocate(&m.spec().service, &r.host, r.at_least).await {
                            Ok(seq) => got.push((r.order_id, seq)),
                            Err(e) => {
                                tracing::error!(rollout = %m.id(), host = %r.host, error = %e, "allocating an order sequence failed");
                            }
                        }
                    }
                    if rounds <= 8 {
                        let more = m.step(self.clock.now_ms(), Input::SeqsAllocated(got));
                        queue.extend(more);
                    }
                }
                Command::Send { host, order } => {
                    let kind = order.action.kind();
                    let seq = order.seq;
                    if self.fleet.send(&host, order) {
                        tracing::debug!(rollout = %m.id(), host = %host, order = kind, seq, "order sent");
                    } else {
                        tracing::debug!(rollout = %m.id(), host = %host, order = kind, seq, "host not connected; order goes out when it reconnects");
                    }
                }
                Command::Refused(e) => refused = Some(e),
                Command::Finished(state) => {
                    tracing::info!(rollout = %m.id(), state = %state, "rollout finished");
                }
            }
        }
        refused
    }
}

fn input_of(e: FleetEvent) -> Input {
    match e {
        FleetEvent::HostUp(s) => Input::HostUp(s),
        FleetEvent::HostDown { host } => Input::HostDown(host),
        FleetEvent::Health { host, sample } => Input::Health { host, sample },
        FleetEvent::Result { host, outcome } => Input::OrderResult { host, outcome },
    }
}

/// Whether a finished rollout's task should keep running: a succeeded rollout keeps converging
/// hosts that join or reconnect until it is superseded (its token is cancelled); other finished
/// rollouts stop once every order has been delivered.
fn should_stop(m: &Rollout) -> bool {
    m.is_quiescent() && m.state() != RolloutState::Succeeded
}

/// Runs one rollout until it is finished and quiescent, or `cancel` fires.
///
/// `events` must have been subscribed before the machine was last fed a snapshot, so nothing is
/// missed between the two.
pub async fn run(
    mut m: Rollout,
    mut driver: Driver,
    events: broadcast::Receiver<FleetEvent>,
    control: mpsc::Receiver<ControlMsg>,
    status: watch::Sender<wire::RolloutStatus>,
    tick: Duration,
    cancel: CancellationToken,
) {
    let id = m.id().to_string();
    let _ = status.send(m.status());
    let mut events = Some(events);
    let mut control = Some(control);
    loop {
        if should_stop(&m) {
            tracing::debug!(rollout = %id, "rollout task done");
            break;
        }
        let now = driver.clock.now_ms();
        let tick_at = now + tick.as_millis() as u64;
        let wake = m.next_deadline().map_or(tick_at, |d| d.min(tick_at));
        let sleep = tokio::time::sleep_until(driver.clock.instant_of(wake));
        let input = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            msg = async {
                match control.as_mut() {
                    Some(c) => c.recv().await,
                    None => std::future::pending().await,
                }
            } => match msg {
                Some(msg) => {
                    let refused = driver
                        .feed(&mut m, Input::Operator { action: msg.action, actor: msg.actor, reason: msg.reason })
                        .await;
                    let st = m.status();
                    let _ = status.send(st.clone());
                    let _ = msg.reply.send(match refused {
                        Some(e) => Err(e),
                        None => Ok(st),
                    });
                    continue;
                }
                // The manager went away; keep running until cancelled.
                None => {
                    control = None;
                    continue;
                }
            },
            ev = async {
                match events.as_mut() {
                    Some(e) => e.recv().await,
                    None => std::future::pending().await,
                }
            } => match ev {
                Ok(e) => input_of(e),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(rollout = %id, missed = n, "fleet events lagged; resynchronising from a snapshot");
                    Input::Resync(driver.fleet.snapshot())
                }
                Err(broadcast::error::RecvError::Closed) => {
                    // No more fleet events: only timers and operators remain.
                    events = None;
                    continue;
                }
            },
            _ = sleep => Input::Tick,
        };
        driver.feed(&mut m, input).await;
        status.send_if_modified(|s| {
            let new = m.status();
            if *s == new {
                false
            } else {
                *s = new;
                true
            }
        });
    }
}
