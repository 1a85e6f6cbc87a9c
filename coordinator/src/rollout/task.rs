//! One tokio task per rollout: it owns the [`Rollout`] machine and is its only caller.
//!
//! The manager builds the machine, subscribes to fleet events *before* planning or loading, and
//! hands both to [`run`], which takes the first step itself: a new rollout's first save and
//! canary dispatch, or a resumed rollout's resynchronisation with the fleet. From then on a
//! `select!` turns fleet events, a timer set at the machine's next deadline (or the safety
//! tick), operator calls and cancellation into [`Input`]s; operator calls are answered by this
//! task and nobody else. The [`Driver`] executes the resulting [`Command`]s in order: persist,
//! then allocate sequence numbers, then send orders.
//!
//! A failed save is never ignored: the driver keeps the unsaved records and holds back every
//! order that would have followed them (an order counts as sent only once it is handed to the
//! fleet), the machine is told ([`Input::StoreFailed`]: it pauses, taking no decision it could
//! not persist), and the task retries the save with backoff. When a save succeeds the held
//! orders go out, as the machine's current view of each host's order, and the machine hears
//! [`Input::StoreRecovered`] (it resumes by itself). After every step the task publishes the
//! rollout's status on a watch channel.
//!
//! An order or a result can be lost on the way without the stream breaking (a proxy, a bug, a
//! full queue on the far side). The driver therefore sends a host's current order again, unchanged
//! (same id, same sequence: the agent deduplicates it and answers with its results again), when
//! neither a send nor an answer about it happened for a while ([`RESEND_FIRST`], doubling up to
//! [`RESEND_MAX`]), the host is reachable, its stream has taken what was queued to it
//! ([`Fleet::queued`]: the first copy may still wait there), and no fleet event waits to be read
//! (an answer queued behind slow saves is still an answer). The machine is not involved: what it
//! decided is unchanged, only its delivery is repeated.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serin_proto::{HostId, OrderAction};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::machine::{
    Command, ControlError, Input, OperatorAction, Persist, Rollout, RolloutState, SeqRequest,
};
use super::observed::Reach;
use super::record;
use super::view::RolloutView;
use crate::fleet::{Fleet, FleetEvent, Interest};
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
    pub reply: oneshot::Sender<Result<RolloutView, TaskError>>,
}

/// Why a rollout task could not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// The operator request does not apply in the rollout's state.
    #[error(transparent)]
    Refused(#[from] ControlError),
    /// The request was applied in memory, but the store refused to save it; it is saved (and
    /// its orders sent) once the store accepts writes again.
    #[error(
        "the store refused to save rollout {rollout}: {error}; the change is kept and saved when the store recovers"
    )]
    NotSaved { rollout: String, error: String },
    /// A new rollout's first save failed: nothing was stored and nothing was sent.
    #[error("rollout {rollout} could not be saved ({error}); nothing was changed")]
    NotStarted { rollout: String, error: String },
}

/// How the task begins.
#[derive(Debug)]
pub enum FirstStep {
    /// A new rollout: save it and dispatch the canary, then answer `reply` with its status (or
    /// with [`TaskError::NotStarted`], after which the task ends).
    New(oneshot::Sender<Result<RolloutView, TaskError>>),
    /// A rollout rebuilt from the store: resynchronise with the fleet as it is now.
    Resume,
}

/// Executes a machine's commands against the store and the fleet.
pub struct Driver {
    pub store: Arc<dyn Store>,
    pub fleet: Arc<dyn Fleet>,
    pub clock: Clock,
    /// Records of failed saves, merged, waiting for a save to succeed.
    unsaved: Option<Unsaved>,
    /// Records of saves asked for and not written yet (see [`Driver::execute`]), and since
    /// when (unix ms): written with the next save, before any order is sent.
    put_off: Option<(Unsaved, u64)>,
    /// Hosts whose stage order waits for the put-off save (sent right after it, as the
    /// machine's current order for the host).
    put_off_sends: BTreeSet<HostId>,
    /// Whether a step that only saves may put its save off (not for operator calls, which
    /// are answered once their change is durable).
    pub may_put_off: bool,
    /// Hosts whose order was held back by a failed save.
    held: BTreeSet<HostId>,
    /// Some save of this rollout has succeeded.
    saved_once: bool,
    /// The last sequence allocation failed: the next one that works is a recovery.
    alloc_failed: bool,
    /// Per host, the order last handed to the fleet and when it was last sent or answered.
    outstanding: foldhash::HashMap<HostId, Outstanding>,
    /// Per host, order sequences reserved in the store and not handed out yet (see
    /// [`Driver::allocate`]).
    reserved: foldhash::HashMap<HostId, SeqBlock>,
    /// The commands being executed end the rollout (fault injection marks that save).
    finishing: bool,
    /// Work counters.
    pub stats: TaskStats,
}

/// The first and the longest wait for an answer before a host's order is sent again.
pub const RESEND_FIRST: Duration = Duration::from_secs(2);
pub const RESEND_MAX: Duration = Duration::from_secs(8);

/// How many order sequences the driver reserves per host at a time: a host's orders in one
/// rollout (stage, activate, confirm, a retry or a rollback) come out of one block, so a wave's
/// orders need no commit of their own for their sequences.
pub const SEQ_BLOCK: u64 = 8;

/// The longest the save of a step that sends no order is put off, waiting for a step that saves
/// anyway (group commit): the results of a wave's hosts arriving one by one take a commit every
/// few of them instead of one each, and at a wave change the save of the bake's start goes with
/// the next wave's orders (a bake of a few milliseconds). A crash loses at most this much of
/// what hosts reported (they answer a repeated order with their recorded results again) and
/// nothing a host was told.
pub const PUT_OFF_MAX: Duration = Duration::from_millis(20);

/// Sequences reserved durably for a host and not handed out yet: `next..=last`.
#[derive(Debug, Clone, Copy)]
struct SeqBlock {
    next: u64,
    last: u64,
}

impl SeqBlock {
    /// The next sequence of the block greater than `at_least`, if the block has one.
    fn take(&mut self, at_least: u64) -> Option<u64> {
        let seq = self.next.max(at_least.checked_add(1)?);
        if seq > self.last {
            return None;
        }
        self.next = seq + 1;
        Some(seq)
    }
}

/// An order handed to the fleet, waiting for its answer.
#[derive(Debug)]
struct Outstanding {
    order_id: String,
    seq: u64,
    /// Last sent or last answered (unix ms).
    last_ms: u64,
    /// How long after `last_ms` to send it again.
    wait: Duration,
}

/// What failed saves left behind: the hosts whose records changed and the events to append.
/// The header and host records themselves are taken fresh from the machine on the next save.
#[derive(Debug, Default)]
struct Unsaved {
    hosts: BTreeSet<HostId>,
    events: Vec<record::EventRecord>,
}

/// What one round of commands came to.
#[derive(Debug, Default)]
pub struct Executed {
    /// The operator request was refused.
    pub refused: Option<ControlError>,
    /// A save failed; held-back orders wait for the next successful save.
    pub store_error: Option<StoreError>,
    /// A save succeeded after earlier ones had failed.
    pub recovered: bool,
    /// The step gave no command at all (nothing changed that the machine acts on).
    pub quiet: bool,
}

impl Driver {
    /// A driver over a store and a fleet.
    pub fn new(store: Arc<dyn Store>, fleet: Arc<dyn Fleet>, clock: Clock) -> Self {
        Self {
            store,
            fleet,
            clock,
            unsaved: None,
            put_off: None,
            put_off_sends: BTreeSet::new(),
            may_put_off: true,
            held: BTreeSet::new(),
            saved_once: false,
            alloc_failed: false,
            outstanding: Default::default(),
            reserved: Default::default(),
            finishing: false,
            stats: TaskStats::default(),
        }
    }

    /// Sends again each reachable host's current order that had neither a send nor an answer
    /// within its wait (see the module docs); nothing while a failed save holds orders back.
    pub fn resend_unanswered(&mut self, m: &Rollout) {
        let now = self.clock.now_ms();
        // Nothing due (or a failed save holds every order back): no walk (this runs once per
        // batch of inputs).
        if self.next_resend_ms().is_none_or(|t| t > now) {
            return;
        }
        let mut due = Vec::new();
        let fleet = &self.fleet;
        self.outstanding.retain(|host, o| {
            if now < o.last_ms + o.wait.as_millis() as u64 {
                // Not due: whether it was answered meanwhile is looked at when it is.
                return true;
            }
            let current = m
                .host(host)
                .filter(|h| h.retry_at_ms.is_none())
                .and_then(|_| m.order_to_send(host))
                .filter(|order| order.order_id == o.order_id && order.seq == o.seq);
            let Some(order) = current else {
                // Answered for good, superseded, or to be re-issued by the machine.
                return false;
            };
            if m.observed(host).reach != Reach::Reachable {
                // The engine sends it again when the host is back; look again later.
                o.last_ms = now;
            } else if fleet.queued(host) > 0 {
                // The host's stream has not yet taken what was queued to it (a loaded
                // coordinator writing to thousands of streams): the first copy is still on its
                // way, a second would only follow it. Wait again once it has gone.
                tracing::debug!(rollout = %m.id(), host = %host, seq = order.seq, "no answer yet, but the host's stream has not taken its queued messages; not sending the order again yet");
                o.last_ms = now;
            } else {
                o.wait = (o.wait * 2).min(RESEND_MAX);
                due.push((host.clone(), order));
            }
            true
        });
        // In host order, whatever order the table keeps.
        due.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (host, order) in due {
            tracing::info!(rollout = %m.id(), host = %host, order = order.action.kind(), seq = order.seq, "no answer to the order; sending it again");
            self.send(m, &host, order);
        }
    }

    /// When [`resend_unanswered`](Self::resend_unanswered) may next have work (unix ms).
    ///
    /// None while a failed save holds every order back: nothing can be re-sent before the save
    /// is written, and the retry of the save has its own wake-up. (A re-send due meanwhile woke
    /// the task at once, again and again: a loop at 100 % of a core for as long as the store
    /// refused writes.)
    pub fn next_resend_ms(&self) -> Option<u64> {
        if self.unsaved.is_some() {
            return None;
        }
        self.outstanding
            .values()
            .map(|o| o.last_ms + o.wait.as_millis() as u64)
            .min()
    }

    /// Takes note of an answer about a host's outstanding order: it is being worked on.
    fn heard(&mut self, input: &Input) {
        if let Input::OrderResult { host, outcome } = input
            && let Some(o) = self.outstanding.get_mut(host)
            && o.order_id == outcome.order_id
        {
            // Being worked on: wait again, without shortening the wait (a repeated order is
            // answered with the results sent before, which must not make it repeat faster).
            o.last_ms = self.clock.now_ms();
        }
    }

    /// Whether records of a failed save wait to be saved.
    pub fn has_unsaved(&self) -> bool {
        self.unsaved.is_some()
    }

    /// Since when (unix ms) a step's save is put off, if one is.
    pub fn put_off_since(&self) -> Option<u64> {
        self.put_off.as_ref().map(|(_, since)| *since)
    }

    /// Writes the save that was put off, if any (no order waits on it).
    pub async fn write_put_off(&mut self, m: &Rollout) -> Executed {
        let mut out = Executed::default();
        if self.put_off.is_some() || !self.put_off_sends.is_empty() {
            match self.save(m, Self::nothing_new(m)).await {
                Ok(recovered) => out.recovered = recovered,
                Err(e) => {
                    tracing::error!(rollout = %m.id(), error = %e, "saving rollout failed; orders held back until a save succeeds");
                    out.store_error = Some(e);
                }
            }
        }
        out
    }

    /// Steps the machine with `input` and executes everything that follows from it.
    pub async fn feed(&mut self, m: &mut Rollout, input: Input) -> Executed {
        self.feed_many(m, vec![input]).await
    }

    /// Steps the machine with inputs that arrived together (see [`Rollout::step_many`]) and
    /// executes everything that follows from them.
    pub async fn feed_many(&mut self, m: &mut Rollout, inputs: Vec<Input>) -> Executed {
        for i in &inputs {
            self.heard(i);
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let t = std::time::Instant::now();
        let n_inputs = inputs.len();
        let cmds = m.step_many(self.clock.now_ms(), inputs);
        let took_us = t.elapsed().as_micros() as u64;
        self.stats.step_us.fetch_add(took_us, Ordering::Relaxed);
        tracing::debug!(rollout = %m.id(), inputs = n_inputs, commands = cmds.len(), step_us = took_us, "machine stepped");
        let quiet = cmds.is_empty();
        let mut ex = self.execute(m, cmds).await;
        ex.quiet = quiet;
        ex
    }

    async fn save(&mut self, m: &Rollout, p: Persist) -> Result<bool, StoreError> {
        let t = std::time::Instant::now();
        let recovering = self.unsaved.is_some();
        let mut u = self.unsaved.take().unwrap_or_default();
        if let Some((d, _)) = self.put_off.take() {
            u.hosts.extend(d.hosts);
            u.events.extend(d.events);
        }
        u.hosts.extend(p.hosts);
        u.events.extend(p.events);
        // A retry saves the machine as it is now, not the records of the failed attempt.
        let header = if recovering {
            m.save_header()
        } else {
            p.header
        };
        let id = m.id().to_string();
        let header = record::encode(&header);
        let hosts: Vec<(HostId, Vec<u8>)> = u
            .hosts
            .iter()
            .filter_map(|id| m.host(id).map(|h| (id.clone(), record::encode_host(h))))
            .collect();
        let events: Vec<Vec<u8>> = u.events.iter().map(record::encode).collect();
        let bytes = header.len()
            + hosts.iter().map(|(_, b)| b.len()).sum::<usize>()
            + events.iter().map(Vec::len).sum::<usize>();
        let (n_hosts, n_events) = (hosts.len(), events.len());
        let encoded_us = t.elapsed().as_micros() as u64;
        let store = self.store.clone();
        self.stats.saves.fetch_add(1, Ordering::Relaxed);
        // Fault injection (test builds): the save that records the rollout's end.
        let finishing = std::mem::take(&mut self.finishing);
        if finishing {
            crate::fault::point("finish-before-save");
        }
        let res =
            tokio::task::spawn_blocking(move || store.save_rollout(&id, &header, &hosts, &events))
                .await
                .unwrap_or_else(|e| Err(StoreError::Io(format!("store task failed: {e}"))));
        let took_us = t.elapsed().as_micros() as u64;
        self.stats.save_us.fetch_add(took_us, Ordering::Relaxed);
        tracing::debug!(
            rollout = %m.id(),
            hosts = n_hosts,
            events = n_events,
            bytes,
            encode_us = encoded_us,
            save_us = took_us,
            "rollout saved"
        );
        if finishing && res.is_ok() {
            crate::fault::point("finish-saved");
        }
        match res {
            Ok(()) => {
                self.saved_once = true;
                self.send_put_off(m);
                Ok(recovering)
            }
            Err(e) => {
                self.unsaved = Some(u);
                Err(e)
            }
        }
    }

    /// A save of the machine as it is now, with no host or event of its own (what is pending
    /// is added by [`Driver::save`]).
    fn nothing_new(m: &Rollout) -> Persist {
        Persist {
            header: m.save_header(),
            hosts: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Retries the save of what failed before; on success sends the held orders.
    pub async fn flush(&mut self, m: &Rollout) -> Executed {
        let empty = Self::nothing_new(m);
        let mut out = Executed::default();
        match self.save(m, empty).await {
            Ok(_) => {
                self.send_held(m);
                out.recovered = true;
            }
            Err(e) => out.store_error = Some(e),
        }
        out
    }

    /// Sends the stage orders that waited for the save just written: the machine's current
    /// order for each host if it is still that stage order (one superseded since, by an
    /// activate say, has its own send) and not out already.
    fn send_put_off(&mut self, m: &Rollout) {
        for host in std::mem::take(&mut self.put_off_sends) {
            let Some(order) = m.order_to_send(&host) else {
                continue;
            };
            let out = self
                .outstanding
                .get(&host)
                .is_some_and(|o| o.order_id == order.order_id && o.seq == order.seq);
            if matches!(order.action, OrderAction::Stage { .. }) && !out {
                self.send(m, &host, order);
            }
        }
    }

    fn send_held(&mut self, m: &Rollout) {
        for host in std::mem::take(&mut self.held) {
            // The machine's current order for the host: one superseded while the store was
            // failing is never sent.
            if let Some(order) = m.order_to_send(&host) {
                self.send(m, &host, order);
            }
        }
    }

    fn send(&mut self, m: &Rollout, host: &HostId, order: serin_proto::Order) {
        let kind = order.action.kind();
        let seq = order.seq;
        let now = self.clock.now_ms();
        match self.outstanding.get_mut(host) {
            Some(o) if o.order_id == order.order_id && o.seq == seq => o.last_ms = now,
            _ => {
                self.outstanding.insert(
                    host.clone(),
                    Outstanding {
                        order_id: order.order_id.clone(),
                        seq,
                        last_ms: now,
                        wait: RESEND_FIRST,
                    },
                );
            }
        }
        crate::fault::order_point(kind, false);
        if self.fleet.send(host, order) {
            crate::fault::order_point(kind, true);
            tracing::debug!(rollout = %m.id(), host = %host, order = kind, seq, "order sent");
        } else {
            tracing::debug!(rollout = %m.id(), host = %host, order = kind, seq, "host not connected; order goes out when it reconnects");
        }
    }

    /// Allocates the sequences of every request: from the blocks reserved before, with no
    /// store call at all when every host has one left; otherwise in one store transaction that
    /// reserves a block ([`SEQ_BLOCK`]) for each host without one, and for every other host of
    /// the rollout that has none yet (so a rollout's later waves take their sequences from
    /// memory). Reserved sequences are never handed out again by the store, also after a crash
    /// (they are skipped, which agents accept); an order still goes out only after the save
    /// that records it with its sequence.
    async fn allocate(&mut self, m: &Rollout, reqs: &[SeqRequest]) -> Result<Vec<u64>, StoreError> {
        let mut got: Vec<Option<u64>> = reqs
            .iter()
            .map(|r| {
                self.reserved
                    .get_mut(&r.host)
                    .and_then(|b| b.take(r.at_least))
            })
            .collect();
        if got.iter().all(Option::is_some) {
            return Ok(got.into_iter().flatten().collect());
        }
        self.stats.allocations.fetch_add(1, Ordering::Relaxed);
        // The hosts that missed, each once with its highest floor, then every other host of
        // the rollout without a block.
        let mut pairs: Vec<(HostId, u64)> = Vec::new();
        let mut index: foldhash::HashMap<HostId, usize> = Default::default();
        for (r, g) in reqs.iter().zip(&got) {
            if g.is_some() {
                continue;
            }
            match index.get(&r.host) {
                Some(&i) => pairs[i].1 = pairs[i].1.max(r.at_least),
                None => {
                    index.insert(r.host.clone(), pairs.len());
                    pairs.push((r.host.clone(), r.at_least));
                }
            }
        }
        let missed = pairs.len();
        for h in m.hosts() {
            if !self.reserved.contains_key(&h.id) && !index.contains_key(&h.id) {
                pairs.push((h.id.clone(), 0));
            }
        }
        let store = self.store.clone();
        let service = m.spec().service.clone();
        let t = std::time::Instant::now();
        let (pairs, res) = tokio::task::spawn_blocking(move || {
            let res = store.reserve_seqs(&service, &pairs, SEQ_BLOCK);
            (pairs, res)
        })
        .await
        .unwrap_or_else(|e| {
            (
                Vec::new(),
                Err(StoreError::Io(format!("store task failed: {e}"))),
            )
        });
        let firsts = res?;
        let took_us = t.elapsed().as_micros() as u64;
        self.stats.alloc_us.fetch_add(took_us, Ordering::Relaxed);
        tracing::debug!(
            orders = reqs.len(),
            missed,
            reserved = pairs.len(),
            alloc_us = took_us,
            "order sequences reserved"
        );
        for ((host, _), first) in pairs.into_iter().zip(firsts) {
            self.reserved.insert(
                host,
                SeqBlock {
                    next: first,
                    last: first + (SEQ_BLOCK - 1),
                },
            );
        }
        for (r, g) in reqs.iter().zip(got.iter_mut()) {
            if g.is_none() {
                *g = self
                    .reserved
                    .get_mut(&r.host)
                    .and_then(|b| b.take(r.at_least));
            }
        }
        got.into_iter()
            .zip(reqs)
            .map(|(g, r)| {
                g.ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "no order sequence above {} reserved for host {}",
                        r.at_least, r.host
                    ))
                })
            })
            .collect()
    }

    /// Executes commands in order. A failed save holds back every order after it (nothing is
    /// sent that is not on disk) and drops the allocations after it (the machine asks again).
    ///
    /// A save is written when it must be, not when it is asked for: the records of every
    /// [`Command::Persist`] are gathered and written in one commit before the next order is
    /// sent, or at the end of the round. A save asked for before a sequence allocation thus
    /// goes with the orders that follow the allocation's answer. Nothing is sent in between,
    /// so a crash before that save loses only decisions no host has seen (the restarted machine
    /// takes them again; reserved sequences are skipped, which agents accept).
    ///
    /// A round that sends no order may even be put off as a whole ([`Driver::may_put_off`],
    /// and only while what is put off is younger than [`PUT_OFF_MAX`]): its save is written
    /// with the next round's save or once it is that old (the task's loop). The results of a
    /// wave's hosts then take a commit every few of them, and at a wave change the save of the
    /// healthy wave and its bake's start goes with the next wave's orders in one commit. Stage
    /// orders wait with it only when the machine's next deadline is that close (the bake ends
    /// and the next wave's activates supersede them: staging a host moments before its
    /// activate gains nothing); otherwise they go out at once, their download ahead of the
    /// wave being the point of them.
    pub async fn execute(&mut self, m: &mut Rollout, cmds: Vec<Command>) -> Executed {
        self.finishing = cmds.iter().any(|c| matches!(c, Command::Finished(_)));
        let mut out = Executed::default();
        let now = self.clock.now_ms();
        // This round may leave its save (and its stage orders) for later.
        let mut tentative = self.may_put_off
            && !self.finishing
            && self.unsaved.is_none()
            && self.saved_once
            && self
                .put_off_since()
                .is_none_or(|since| now < since + PUT_OFF_MAX.as_millis() as u64);
        let mut queue: VecDeque<Command> = cmds.into();
        // Each allocation round answers the previous one; a handful is plenty per input.
        let mut rounds = 0;
        // Whether stage orders wait for the put-off save (worked out at the first one).
        let mut stage_waits: Option<bool> = None;
        loop {
            // `write`: the save of everything gathered is due now.
            let (c, write) = match queue.pop_front() {
                Some(Command::Send { host, order })
                    if tentative
                        && matches!(order.action, OrderAction::Stage { .. })
                        && *stage_waits.get_or_insert_with(|| {
                            m.next_deadline()
                                .is_some_and(|d| d <= now + PUT_OFF_MAX.as_millis() as u64)
                        }) =>
                {
                    // The machine acts again within moments (a wave's bake of a few ms ends):
                    // sent once the save that records it is written, unless its activate has
                    // superseded it by then.
                    self.put_off
                        .get_or_insert_with(|| (Unsaved::default(), now));
                    self.put_off_sends.insert(host);
                    continue;
                }
                Some(c @ Command::Send { .. }) | Some(c @ Command::Refused(_))
                    if self.put_off.is_some() =>
                {
                    // An order (or an operator's answer) waits for nothing: save first.
                    tentative = false;
                    queue.push_front(c);
                    (Command::Persist(Self::nothing_new(m)), true)
                }
                Some(c) => (c, false),
                None if !tentative && self.put_off.is_some() => {
                    (Command::Persist(Self::nothing_new(m)), true)
                }
                None => break,
            };
            match c {
                Command::Persist(p) if !write && (queue.front().is_some() || tentative) => {
                    let (u, _) = self
                        .put_off
                        .get_or_insert_with(|| (Unsaved::default(), now));
                    u.hosts.extend(p.hosts);
                    u.events.extend(p.events);
                }
                Command::Persist(p) => match self.save(m, p).await {
                    Ok(recovered) => {
                        if recovered {
                            self.send_held(m);
                            out.recovered = true;
                        }
                    }
                    Err(e) => {
                        tracing::error!(rollout = %m.id(), error = %e, "saving rollout failed; orders held back until a save succeeds");
                        for c in queue.drain(..) {
                            match c {
                                Command::Send { host, .. } => {
                                    self.held.insert(host);
                                }
                                // Not an order: it needs no save.
                                Command::Hold { host, hold } => {
                                    self.fleet.hold(&host, hold);
                                }
                                Command::Refused(e) => out.refused = Some(e),
                                _ => {}
                            }
                        }
                        out.store_error = Some(e);
                        return out;
                    }
                },
                Command::AllocateSeqs(reqs) => {
                    rounds += 1;
                    let mut got = Vec::new();
                    let mut failed = false;
                    match self.allocate(m, &reqs).await {
                        Ok(seqs) => {
                            got.extend(reqs.into_iter().map(|r| r.order_id).zip(seqs));
                        }
                        Err(e) => {
                            tracing::error!(rollout = %m.id(), orders = reqs.len(), error = %e, "allocating order sequences failed");
                            // A store error, like a failed save: the rollout pauses (no
                            // progress deadline runs out on an order that cannot go out)
                            // and the allocations are asked for again.
                            failed = true;
                            tentative = false;
                            out.store_error.get_or_insert(e);
                        }
                    }
                    if failed {
                        self.alloc_failed = true;
                    } else if std::mem::take(&mut self.alloc_failed) && self.unsaved.is_none() {
                        out.recovered = true;
                    }
                    if rounds <= 8 {
                        let more = m.step(self.clock.now_ms(), Input::SeqsAllocated(got));
                        queue.extend(more);
                    }
                }
                Command::Send { host, order } => {
                    if self.unsaved.is_some() {
                        self.held.insert(host);
                    } else {
                        self.send(m, &host, order);
                    }
                }
                Command::Hold { host, hold } => {
                    // Not an order: nothing to persist first, and a lost hold is followed by the
                    // next one.
                    if self.fleet.hold(&host, hold) {
                        tracing::debug!(rollout = %m.id(), host = %host, "hold sent");
                    }
                }
                Command::Refused(e) => out.refused = Some(e),
                Command::Finished(state) => {
                    let (statuses, steps, saves, allocations) = self.stats.read();
                    let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) / 1000;
                    tracing::info!(
                        rollout = %m.id(),
                        state = %state,
                        steps,
                        step_ms = ms(&self.stats.step_us),
                        saves,
                        save_ms = ms(&self.stats.save_us),
                        allocations,
                        alloc_ms = ms(&self.stats.alloc_us),
                        statuses,
                        "rollout finished"
                    );
                }
            }
        }
        out
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
/// rollouts stop once every order has been delivered and saved.
fn should_stop(m: &Rollout, driver: &Driver) -> bool {
    m.state() != RolloutState::Succeeded && m.is_quiescent() && !driver.has_unsaved()
}

/// The hosts of a [`settled`] rollout, whose health reports the forwarder drops (None: not
/// settled). A change moves the forwarder's subscription: a settled rollout hears only the
/// fleet's changes ([`Interest::Changes`]), a running one every event.
type Quiet = watch::Receiver<Option<Arc<BTreeSet<HostId>>>>;

/// The safety tick of a [`settled`] rollout.
const SETTLED_TICK: Duration = Duration::from_secs(3600);

/// Whether a succeeded rollout has nothing left to do until a host joins, comes back or goes
/// away: every order answered for good and saved. Such a task takes no health
/// reports (its forwarder hears only the fleet's changes, and drops its own hosts' reports among
/// them) and almost no safety ticks, so a finished rollout costs no CPU
/// however large and chatty the fleet; any other event (a host up or down, a result, an
/// operator call) wakes it, and its next step decides again. Its safety tick slows to
/// [`SETTLED_TICK`].
fn settled(m: &Rollout, driver: &Driver) -> bool {
    // Quiescent: every order answered for good, so nothing outstanding will be re-sent (its
    // entry is dropped when its wait is up, by the wake-up `next_resend_ms` still asks for).
    m.state() == RolloutState::Succeeded && !driver.has_unsaved() && m.is_quiescent()
}

/// The first and longest delays between retries of a failed save.
const SAVE_RETRY_FIRST: Duration = Duration::from_millis(200);
const SAVE_RETRY_MAX: Duration = Duration::from_secs(10);

/// The task's state of a failing store: when to retry the save next and how long to wait after.
struct Retry {
    at_ms: Option<u64>,
    delay: Duration,
}

impl Retry {
    fn new() -> Self {
        Self {
            at_ms: None,
            delay: SAVE_RETRY_FIRST,
        }
    }

    /// Takes note of one round's outcome; returns the inputs the machine must hear about it.
    ///
    /// The machine hears of the first failure of a run of them, and of any later one that finds
    /// it running: an operator's resume while the store still refuses every save pauses it on
    /// the store again, where it used to run on in memory, "running" while nothing it decided
    /// could be kept.
    fn after(&mut self, ex: &Executed, now_ms: u64, id: &str, m: &Rollout) -> Option<Input> {
        if let Some(e) = &ex.store_error {
            let first = self.at_ms.is_none();
            self.at_ms = Some(now_ms + self.delay.as_millis() as u64);
            tracing::warn!(rollout = %id, error = %e, retry_in = ?self.delay, "rollout not saved; retrying");
            self.delay = (self.delay * 2).min(SAVE_RETRY_MAX);
            let running = matches!(m.state(), RolloutState::Running | RolloutState::Waiting);
            return (first || running).then(|| Input::StoreFailed {
                error: e.to_string(),
            });
        }
        if ex.recovered {
            *self = Self::new();
            tracing::info!(rollout = %id, "the store accepts writes again");
            return Some(Input::StoreRecovered);
        }
        None
    }
}

/// At most this many fleet events are taken in as one batch (one machine step, one save).
pub const MAX_BATCH: usize = 4096;

/// Most fleet events a task holds unread (besides the fleet's own buffer); past it the events
/// are dropped and the task resynchronises. A wave of 20,000 hosts answers with about 60,000
/// results and health reports while its saves run; this leaves room for several such bursts.
pub const EVENT_BACKLOG: usize = 1 << 20;

/// What the forwarder hands the task.
enum Forwarded {
    Event(FleetEvent),
    /// This many events were lost (the fleet's buffer or the backlog overflowed).
    Lagged(u64),
}

/// Reads the fleet's events as they come, whatever the task is doing (a save, an allocation),
/// into the task's backlog: the fleet's bounded buffer never overflows while the task waits on
/// the store, which made a large wave's answers lost and the task resynchronise again and
/// again.
///
/// While the rollout is [`settled`], `quiet` holds its hosts: the forwarder moves its
/// subscription to the fleet's changes ([`Interest::Changes`]), so a settled fleet's health
/// reports, which repeat what is known (1,000 a second at 10,000 hosts), neither wake it nor
/// are built for it; a change of verdict still comes (a selected host that said hello before
/// its first passing verdict joins on its report), and its own hosts' reports are dropped here.
/// When the rollout has work again it moves back to every event. `received` counts the events
/// it took from the fleet (tests).
async fn forward(
    fleet: Arc<dyn Fleet>,
    rx: broadcast::Receiver<FleetEvent>,
    tx: mpsc::Sender<Forwarded>,
    mut quiet: Quiet,
    stop: CancellationToken,
    received: Arc<AtomicU64>,
) {
    let mut out = Out {
        tx,
        quiet: quiet.borrow_and_update().clone(),
        missed: 0,
        received,
    };
    let mut rx = rx;
    let mut interest = Interest::Everything;
    loop {
        let ev = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            changed = quiet.changed() => {
                if changed.is_err() {
                    return;
                }
                out.quiet = quiet.borrow_and_update().clone();
                let wanted = if out.quiet.is_some() { Interest::Changes } else { Interest::Everything };
                if wanted == interest {
                    continue;
                }
                let Some((new, before)) = fleet.resubscribe(&rx, wanted) else {
                    continue;
                };
                // The events from before the cut come from the old subscription, the rest from
                // the new one: none lost, none twice.
                for _ in 0..before {
                    let ev = match rx.try_recv() {
                        Ok(e) => Ok(e),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => {
                            Err(broadcast::error::RecvError::Lagged(n))
                        }
                        Err(_) => break,
                    };
                    let lagged = ev.is_err();
                    if !out.take(ev) {
                        return;
                    }
                    if lagged {
                        // Whatever else was lost, the resynchronisation covers it.
                        break;
                    }
                }
                rx = new;
                interest = wanted;
                continue;
            }
            ev = rx.recv() => ev,
        };
        if !out.take(ev) {
            return;
        }
    }
}

/// The forwarder's side of the task's backlog.
struct Out {
    tx: mpsc::Sender<Forwarded>,
    quiet: Option<Arc<BTreeSet<HostId>>>,
    /// Events lost to a full backlog, not yet reported as lagged.
    missed: u64,
    received: Arc<AtomicU64>,
}

impl Out {
    /// Hands one event (or a lag) to the task; false when the task has gone.
    fn take(&mut self, ev: Result<FleetEvent, broadcast::error::RecvError>) -> bool {
        self.received.fetch_add(1, Ordering::Relaxed);
        let item = match ev {
            Ok(FleetEvent::Health { host, .. })
                if self
                    .quiet
                    .as_ref()
                    .is_some_and(|hosts| hosts.contains(&host)) =>
            {
                return true;
            }
            Ok(e) => Forwarded::Event(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Forwarded::Lagged(n),
            Err(broadcast::error::RecvError::Closed) => return false,
        };
        if self.missed > 0 {
            match self.tx.try_send(Forwarded::Lagged(self.missed)) {
                Ok(()) => self.missed = 0,
                Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.missed += 1;
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// How long a status change may wait before it is published: building the status costs one
/// entry per host, so it is rate-limited in proportion to the fleet (1 ms per 50 hosts, at
/// most 250 ms): its cost stays a bounded share of the task's time, whatever the fleet size.
/// A change of state or wave, an operator call and the task's end publish at once.
pub fn publish_interval(hosts: usize) -> Duration {
    Duration::from_millis((hosts as u64 / 50).min(250))
}

/// Publishes the rollout's status on the watch channel, rate-limited (see [`publish_interval`]).
struct Publisher {
    tx: watch::Sender<RolloutView>,
    /// A change waits to be published.
    pending: bool,
    /// When the last status was published (unix ms).
    last_ms: u64,
    interval: u64,
    /// State and wave of the last published status: a change of either is published at once.
    shown: (RolloutState, usize),
    /// Statuses built so far (tests count them).
    built: Arc<AtomicU64>,
}

impl Publisher {
    fn note(&mut self, m: &mut Rollout) {
        if m.take_status_changed() {
            self.pending = true;
        }
    }

    /// When the pending change is due (unix ms).
    fn due_ms(&self) -> Option<u64> {
        self.pending.then_some(self.last_ms + self.interval)
    }

    /// Publishes a pending change if it is due, or if `now_anyway`, or if the state or wave
    /// changed.
    fn maybe_publish(&mut self, m: &Rollout, now_ms: u64, now_anyway: bool) {
        if !self.pending {
            return;
        }
        let key = (m.state(), m.current_wave());
        if now_anyway || key != self.shown || now_ms >= self.last_ms + self.interval {
            self.built.fetch_add(1, Ordering::Relaxed);
            self.tx.send_replace(m.status());
            self.pending = false;
            self.last_ms = now_ms;
            self.shown = key;
        }
    }
}

/// Counters of the work rollout tasks did (tests assert the work per input with them).
#[derive(Debug, Clone, Default)]
pub struct TaskStats {
    /// Statuses built and published.
    pub statuses: Arc<AtomicU64>,
    /// Machine steps (one per batch of inputs).
    pub steps: Arc<AtomicU64>,
    /// Saves handed to the store (each one durable transaction).
    pub saves: Arc<AtomicU64>,
    /// Sequence allocation rounds (each one durable transaction).
    pub allocations: Arc<AtomicU64>,
    /// Time spent in machine steps, saves and allocations (µs).
    pub step_us: Arc<AtomicU64>,
    pub save_us: Arc<AtomicU64>,
    pub alloc_us: Arc<AtomicU64>,
    /// Fleet events the tasks' forwarders took from the fleet (each one a wake-up at most).
    pub fleet_events: Arc<AtomicU64>,
    /// Resynchronisations from a fleet snapshot after events were lost to a lag.
    pub resyncs: Arc<AtomicU64>,
}

impl TaskStats {
    /// The counters now: `(statuses, steps, saves, allocations)`.
    pub fn read(&self) -> (u64, u64, u64, u64) {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (
            r(&self.statuses),
            r(&self.steps),
            r(&self.saves),
            r(&self.allocations),
        )
    }
}

/// Runs one rollout until it is finished and quiescent, or `cancel` fires.
///
/// `events` must have been subscribed before the machine was built (a new rollout) or loaded (a
/// resumed one), so nothing the fleet says after that is missed. Fleet events that wait in the
/// queue are taken in as one batch ([`MAX_BATCH`] at most): one machine step and one save for
/// all of them.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    m: Rollout,
    driver: Driver,
    events: broadcast::Receiver<FleetEvent>,
    control: mpsc::Receiver<ControlMsg>,
    status: watch::Sender<RolloutView>,
    tick: Duration,
    first: FirstStep,
    cancel: CancellationToken,
) {
    run_counted(
        m,
        driver,
        events,
        control,
        status,
        tick,
        first,
        cancel,
        TaskStats::default(),
    )
    .await
}

/// [`run`], counting its work in `stats`.
#[allow(clippy::too_many_arguments)]
pub async fn run_counted(
    mut m: Rollout,
    mut driver: Driver,
    events: broadcast::Receiver<FleetEvent>,
    control: mpsc::Receiver<ControlMsg>,
    status: watch::Sender<RolloutView>,
    tick: Duration,
    first: FirstStep,
    cancel: CancellationToken,
    stats: TaskStats,
) {
    let id = m.id().to_string();
    driver.stats = stats.clone();
    let mut retry = Retry::new();
    let mut publisher = Publisher {
        tx: status,
        pending: false,
        last_ms: driver.clock.now_ms(),
        interval: publish_interval(m.hosts().count()).as_millis() as u64,
        shown: (m.state(), m.current_wave()),
        built: stats.statuses.clone(),
    };
    // The machine's next deadline, kept while steps change nothing it depends on (a settled
    // fleet's health reports): working it out walks every host.
    let mut deadline: Option<Option<u64>> = None;
    // Feeds inputs and everything the store's state adds to them (a failed save pauses, a
    // recovered one resumes), then notes the status changed.
    macro_rules! step {
        ($inputs:expr) => {{
            let inputs: Vec<Input> = $inputs;
            let only_health = inputs.iter().all(|i| matches!(i, Input::Health { .. }));
            let mut ex = driver.feed_many(&mut m, inputs).await;
            if !(only_health && ex.quiet) {
                deadline = None;
            }
            let refused = ex.refused.take();
            let mut not_saved = ex.store_error.as_ref().map(|e| e.to_string());
            let mut follow = retry.after(&ex, driver.clock.now_ms(), &id, &m);
            while let Some(i) = follow.take() {
                deadline = None;
                let ex = driver.feed(&mut m, i).await;
                if ex.store_error.is_none() && !driver.has_unsaved() {
                    not_saved = None;
                }
                follow = retry.after(&ex, driver.clock.now_ms(), &id, &m);
            }
            publisher.note(&mut m);
            (refused, not_saved)
        }};
    }
    match first {
        FirstStep::New(reply) => {
            let (_, not_saved) = step!(vec![Input::Tick]);
            if !driver.saved_once {
                let _ = reply.send(Err(TaskError::NotStarted {
                    rollout: id.clone(),
                    error: not_saved.unwrap_or_else(|| "no save happened".into()),
                }));
                return;
            }
            publisher.maybe_publish(&m, driver.clock.now_ms(), true);
            // The status just published: built once (19,900 hosts' views cost a walk and
            // their strings), not again for the reply.
            let _ = reply.send(Ok(publisher.tx.borrow().clone()));
        }
        FirstStep::Resume => {
            let snapshot = driver.fleet.snapshot();
            step!(vec![Input::Resync(snapshot)]);
        }
    }
    let (fwd_tx, fwd_rx) = mpsc::channel(EVENT_BACKLOG);
    let stop_forwarding = CancellationToken::new();
    let _stop_forwarding = stop_forwarding.clone().drop_guard();
    let (quiet, quiet_rx) = watch::channel(None);
    let mut was_settled = false;
    tokio::spawn(forward(
        driver.fleet.clone(),
        events,
        fwd_tx,
        quiet_rx,
        stop_forwarding,
        stats.fleet_events.clone(),
    ));
    let mut events = Some(fwd_rx);
    let mut control = Some(control);
    let resync = |driver: &Driver, n: u64| {
        stats.resyncs.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(rollout = %id, missed = n, "fleet events lagged; resynchronising from a snapshot");
        Input::Resync(driver.fleet.snapshot())
    };
    let take = |f: Forwarded, driver: &Driver| match f {
        Forwarded::Event(e) => input_of(e),
        Forwarded::Lagged(n) => resync(driver, n),
    };
    loop {
        if should_stop(&m, &driver) {
            tracing::debug!(rollout = %id, "rollout task done");
            break;
        }
        let now = driver.clock.now_ms();
        publisher.maybe_publish(&m, now, false);
        // An answer still waiting in the queue is an answer: re-send only once every fleet event
        // that has arrived has been read (under load, a wave's answers can wait behind its saves
        // for longer than the re-send wait).
        if events.as_ref().is_none_or(|e| e.is_empty()) {
            driver.resend_unanswered(&m);
        }
        let is_settled = settled(&m, &driver);
        if is_settled != was_settled {
            was_settled = is_settled;
            let hosts = is_settled.then(|| Arc::new(m.hosts().map(|h| h.id.clone()).collect()));
            quiet.send_replace(hosts);
            tracing::debug!(rollout = %id, settled = is_settled, "a settled rollout takes no health reports of its hosts and no ticks");
        }
        // Settled: nothing is due until an event arrives; the safety tick slows to an hour.
        let tick_at = now + if is_settled { SETTLED_TICK } else { tick }.as_millis() as u64;
        let next = *deadline.get_or_insert_with(|| m.next_deadline());
        // A save put off for [`PUT_OFF_MAX`] is written now, whatever comes next.
        if driver
            .put_off_since()
            .is_some_and(|since| now >= since + PUT_OFF_MAX.as_millis() as u64)
        {
            let ex = driver.write_put_off(&m).await;
            if let Some(i) = retry.after(&ex, driver.clock.now_ms(), &id, &m) {
                step!(vec![i]);
            }
            continue;
        }
        let mut wake = next.map_or(tick_at, |d| d.min(tick_at));
        if let Some(since) = driver.put_off_since() {
            wake = wake.min(since + PUT_OFF_MAX.as_millis() as u64);
        }
        if let Some(t) = driver.next_resend_ms() {
            wake = wake.min(t.max(now));
        }
        if let Some(t) = retry.at_ms {
            wake = wake.min(t);
        }
        let publish_at = publisher.due_ms();
        if let Some(t) = publish_at {
            wake = wake.min(t.max(now));
        }
        let sleep = tokio::time::sleep_until(driver.clock.instant_of(wake));
        let inputs = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            msg = async {
                match control.as_mut() {
                    Some(c) => c.recv().await,
                    None => std::future::pending().await,
                }
            } => match msg {
                Some(msg) => {
                    // Answered once its change is durable: no save of this step is put off.
                    driver.may_put_off = false;
                    let (refused, not_saved) = step!(vec![Input::Operator { action: msg.action, actor: msg.actor, reason: msg.reason }]);
                    driver.may_put_off = true;
                    publisher.maybe_publish(&m, driver.clock.now_ms(), true);
                    let _ = msg.reply.send(match (refused, not_saved) {
                        (Some(e), _) => Err(TaskError::Refused(e)),
                        (None, Some(error)) => Err(TaskError::NotSaved { rollout: id.clone(), error }),
                        (None, None) => Ok(m.status()),
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
                Some(f) => {
                    let mut batch = vec![take(f, &driver)];
                    // Everything else already waiting goes into the same step.
                    if let Some(rx) = events.as_mut() {
                        while batch.len() < MAX_BATCH {
                            match rx.try_recv() {
                                Ok(f) => batch.push(take(f, &driver)),
                                Err(_) => break,
                            }
                        }
                    }
                    batch
                }
                None => {
                    // No more fleet events: only timers and operators remain.
                    events = None;
                    continue;
                }
            },
            _ = sleep => {
                let now = driver.clock.now_ms();
                if retry.at_ms.is_some_and(|t| t <= now) && driver.has_unsaved() {
                    let ex = driver.flush(&m).await;
                    if let Some(i) = retry.after(&ex, driver.clock.now_ms(), &id, &m) {
                        step!(vec![i]);
                    }
                    continue;
                }
                // Woken only to publish or to re-send: no tick needed. The re-sends are the
                // driver's (at the top of the loop), not the machine's: a settled rollout's last
                // re-send waits running out took a step each, a walk over every host (issue 10).
                let machine_due = next.is_some_and(|d| d <= now) || tick_at <= now;
                // Woken to write a put-off save: the top of the loop does.
                if !machine_due && driver.put_off_since().is_some() {
                    continue;
                }
                let resend_due = driver.next_resend_ms().is_some_and(|t| t <= now);
                if !machine_due && (resend_due || publish_at.is_some_and(|t| t <= now)) {
                    continue;
                }
                vec![Input::Tick]
            }
        };
        step!(inputs);
    }
    // Stopping (cancelled, or done): what was put off is written, not dropped.
    if driver.put_off_since().is_some() {
        driver.write_put_off(&m).await;
    }
    publisher.maybe_publish(&m, driver.clock.now_ms(), true);
}

/// Lost messages (issue 8, message chaos): an order or a result lost on the way must not wedge or
/// fail a rollout. The fleet here loses messages the way a lossy link would; the agent side
/// answers a repeated order with its results again, as the real agent does.
#[cfg(test)]
mod lost_message_tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use serin_proto::{HostId, Order, OrderAction, ServiceName};

    use crate::control_service::RolloutApi;
    use crate::engine_tests::wire_spec;
    use crate::fleet::{FleetEvent, OrderOutcome, OrderPhase, ResultCode};
    use crate::rollout::manager::RolloutManager;
    use crate::rollout::testing::{FakeFleet, host, release_record};
    use crate::rollout::{RolloutState, RolloutView, ShownPhase, intent::HostPhase};
    use crate::store::{MemoryStore, Store};
    use tokio_util::sync::CancellationToken;

    pub(super) fn result(h: &HostId, o: &Order, phase: OrderPhase) -> FleetEvent {
        FleetEvent::Result {
            host: h.clone(),
            outcome: OrderOutcome {
                order_id: o.order_id.clone(),
                rollout_id: o.rollout_id.clone(),
                seq: o.seq,
                service: ServiceName::new("web").unwrap(),
                release: None,
                phase,
                code: ResultCode::Ok,
                message: String::new(),
                current_release: None,
                last_seq: o.seq,
            },
        }
    }

    /// The results a healthy agent sends for an order.
    pub(super) fn answers(o: &Order) -> &'static [OrderPhase] {
        match &o.action {
            OrderAction::Activate { .. } => &[OrderPhase::Activated, OrderPhase::Healthy],
            OrderAction::Confirm { .. } => &[OrderPhase::Confirmed],
            OrderAction::Rollback { .. } => &[OrderPhase::RolledBack],
            _ => &[],
        }
    }

    /// Runs a 4-host rollout over a fleet where `lose(host, order, nth delivery, phase)` says
    /// whether a message is lost; returns its final wire status (within 10 minutes of paused
    /// time) and the orders sent.
    async fn run(
        lose: impl Fn(&HostId, &Order, u32, Option<OrderPhase>) -> bool + Send + Sync + 'static,
    ) -> (RolloutView, Vec<(HostId, Order)>) {
        let store = Arc::new(MemoryStore::new());
        store.put_release(&release_record()).unwrap();
        let fleet = Arc::new(FakeFleet::new(
            (1..=4)
                .map(|i| host(&format!("h{i}"), "eu-1", "web-1"))
                .collect(),
        ));
        // Deliveries per (host, seq): a repeated order is answered again (the agent replays).
        let deliveries: Mutex<BTreeMap<(HostId, u64), u32>> = Mutex::default();
        fleet.respond_with(Box::new(move |h, o| {
            let n = {
                let mut d = deliveries.lock().unwrap();
                let n = d.entry((h.clone(), o.seq)).or_default();
                *n += 1;
                *n
            };
            if lose(h, o, n, None) {
                return Vec::new();
            }
            answers(o)
                .iter()
                .filter(|p| !lose(h, o, n, Some(**p)))
                .map(|p| result(h, o, *p))
                .collect()
        }));
        let shutdown = CancellationToken::new();
        let mgr = crate::rollout::testing::manager(&store, &fleet, &shutdown).await;
        let api: &dyn RolloutApi = &mgr;
        let id = api
            .start_rollout(wire_spec(&["1", "100%"]))
            .await
            .unwrap()
            .rollout_id;
        let mut last = mgr.status(&id).await.unwrap();
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            last = mgr.status(&id).await.unwrap();
            let all_confirmed = last
                .hosts
                .iter()
                .all(|h| h.phase == ShownPhase::Phase(HostPhase::Confirmed));
            if last.state.is_finished() && (last.state != RolloutState::Succeeded || all_confirmed)
            {
                break;
            }
        }
        shutdown.cancel();
        mgr.join().await;
        (last, fleet.sent())
    }

    fn assert_succeeded(s: &RolloutView) {
        assert_eq!(
            s.state,
            RolloutState::Succeeded,
            "reason {:?}, decisions {:?}",
            s.reason,
            s.decisions
        );
        for h in &s.hosts {
            assert_eq!(
                h.phase,
                ShownPhase::Phase(HostPhase::Confirmed),
                "host {}: {:?}",
                h.id,
                h.detail
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_delivery_of_every_order_lost_is_sent_again() {
        let (s, sent) = run(|_, _, n, phase| n == 1 && phase.is_none()).await;
        assert_succeeded(&s);
        // Re-sent unchanged: same order id and sequence.
        for (h, o) in &sent {
            let same: Vec<_> = sent
                .iter()
                .filter(|(h2, o2)| h2 == h && o2.order_id == o.order_id)
                .collect();
            assert!(same.iter().all(|(_, o2)| o2.seq == o.seq), "{same:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_healthy_result_is_replayed_by_a_repeated_order() {
        let (s, _) = run(|_, _, n, phase| n == 1 && phase == Some(OrderPhase::Healthy)).await;
        assert_succeeded(&s);
    }

    /// Seen in CI (bench smoke, 200 simulated agents): a wave's answers waited in the task's
    /// queue behind slow saves for longer than the re-send wait, and the orders of hosts that had
    /// answered were sent a second time. An answer still queued is an answer: nothing is re-sent
    /// while fleet events wait to be read.
    /// A one-wave rollout over `n` hosts (h1…) that answer nothing by themselves, started:
    /// its fleet, and the manager with what stops it.
    async fn started(n: usize) -> (Arc<FakeFleet>, CancellationToken, RolloutManager) {
        let store = Arc::new(MemoryStore::new());
        store.put_release(&release_record()).unwrap();
        let fleet = Arc::new(FakeFleet::new(
            (1..=n)
                .map(|i| host(&format!("h{i}"), "eu-1", "web-1"))
                .collect(),
        ));
        let shutdown = CancellationToken::new();
        let mgr = crate::rollout::testing::manager(&store, &fleet, &shutdown).await;
        let api: &dyn RolloutApi = &mgr;
        api.start_rollout(wire_spec(&[&n.to_string()]))
            .await
            .unwrap();
        assert_eq!(fleet.sent().len(), n, "one activate per host");
        (fleet, shutdown, mgr)
    }

    /// Moves paused time past the first re-send wait and lets the task run.
    async fn past_the_resend_wait() {
        tokio::time::advance(super::RESEND_FIRST + Duration::from_millis(500)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_waiting_in_the_queue_stop_a_resend() {
        let (fleet, shutdown, mgr) = started(3).await;
        // All three answer at once, and the task gets to them only after the re-send wait.
        for (h, o) in &fleet.sent() {
            fleet.emit(result(h, o, OrderPhase::Activated));
        }
        past_the_resend_wait().await;
        let again = fleet.sent();
        shutdown.cancel();
        mgr.join().await;
        assert_eq!(
            again.len(),
            3,
            "orders sent again although their answers were queued: {again:?}"
        );
    }

    /// An order re-sent while its first copy still waits in the host's queue (the coordinator's
    /// stream task for that host has not taken it yet: a loaded coordinator writing to
    /// thousands of streams) would only reach the agent twice. It is not sent again while the
    /// host's queue holds messages its stream has not taken; it is once the queue has drained
    /// and the wait runs out again.
    #[tokio::test(start_paused = true)]
    async fn an_order_still_waiting_in_its_hosts_queue_is_not_sent_again() {
        let (fleet, shutdown, mgr) = started(2).await;
        let (h1, h2) = (HostId::new("h1").unwrap(), HostId::new("h2").unwrap());
        // Neither answers; h1's stream has not taken its order yet, h2's has.
        fleet.set_queued(&h1, 1);
        let sent_to = |h: &HostId| fleet.sent().iter().filter(|(s, _)| s == h).count();
        past_the_resend_wait().await;
        assert_eq!(
            (sent_to(&h1), sent_to(&h2)),
            (1, 2),
            "h2's order is sent again, h1's still waits in its queue"
        );
        // h1's stream takes it; no answer comes: the next wait ends in a re-send.
        fleet.set_queued(&h1, 0);
        past_the_resend_wait().await;
        let again = fleet.sent();
        shutdown.cancel();
        mgr.join().await;
        let h1_orders: Vec<_> = again.iter().filter(|(s, _)| *s == h1).collect();
        assert_eq!(h1_orders.len(), 2, "{again:?}");
        assert_eq!(h1_orders[0].1.order_id, h1_orders[1].1.order_id);
        assert_eq!(h1_orders[0].1.seq, h1_orders[1].1.seq);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_confirmation_is_replayed_by_a_repeated_confirm() {
        let (s, _) = run(|_, _, n, phase| n == 1 && phase == Some(OrderPhase::Confirmed)).await;
        assert_succeeded(&s);
    }
}

/// Issue 10 (scale): the work of a rollout task grows with what changed, not with the fleet
/// times the inputs. Counted with [`super::TaskStats`] on a real manager and task.
#[cfg(test)]
mod cost_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use serin_proto::{HostId, ReleaseId, ServiceName};

    use crate::control_service::RolloutApi;
    use crate::engine_tests::wire_spec;

    use crate::fleet::{FleetEvent, HealthSample};
    use crate::rollout::testing::{FakeFleet, host, release_record};
    use crate::store::{MemoryStore, Store};
    use tokio_util::sync::CancellationToken;

    const HOSTS: usize = 200;

    fn health(h: &HostId) -> FleetEvent {
        FleetEvent::Health {
            host: h.clone(),
            sample: HealthSample {
                service: ServiceName::new("web").unwrap(),
                release: Some(ReleaseId::new("web-1").unwrap()),
                healthy: true,
                checks_passing: 1,
                checks_total: 1,
                probe_latency_us: None,
                restarts: 0,
                cpu_percent: 0.0,
                rss_bytes: 0,
                observed_unix_ms: 0,
                requests_total: None,
            },
        }
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    /// One wave of 200 hosts: its 200 orders are allocated in one store transaction and saved,
    /// with the rollout itself and the orders' sequences, in one more (not one commit per order,
    /// nor a save before the allocation and another after it); then 1,000 health reports that repeat what is known
    /// are taken in batches, a few machine steps, and build no status at all (before this
    /// change every report was a step that rebuilt and compared the whole status).
    #[tokio::test(start_paused = true)]
    async fn a_wave_commits_once_and_repeated_health_reports_build_no_status() {
        let store = Arc::new(MemoryStore::new());
        store.put_release(&release_record()).unwrap();
        let hosts: Vec<_> = (0..HOSTS)
            .map(|i| host(&format!("h{i:03}"), "eu-1", "web-1"))
            .collect();
        let ids: Vec<HostId> = hosts.iter().map(|h| h.host_id.clone()).collect();
        let fleet = Arc::new(FakeFleet::new(hosts));
        let shutdown = CancellationToken::new();
        let mgr = crate::rollout::testing::manager(&store, &fleet, &shutdown).await;
        let api: &dyn RolloutApi = &mgr;
        api.start_rollout(wire_spec(&["100%"])).await.unwrap();
        let stats = mgr.task_stats();
        assert_eq!(fleet.sent().len(), HOSTS, "one activate per host");
        let (_, _, saves, allocations) = stats.read();
        assert_eq!(allocations, 1, "one allocation round for the whole wave");
        assert_eq!(saves, 1, "{saves} saves for one step of 200 orders");
        // That one save holds every order that went out, with the sequence it was sent with.
        let id = &fleet.sent()[0].1.rollout_id;
        let stored = store.load_rollout(id).unwrap().unwrap();
        let d = super::record::decode_rollout(id, &stored.header, &stored.hosts).unwrap();
        for (h, o) in fleet.sent() {
            let r = d.hosts.iter().find(|r| r.host.id == h).unwrap();
            let saved = r.host.order.as_ref().unwrap();
            assert_eq!(
                (saved.order_id.as_str(), saved.seq),
                (o.order_id.as_str(), Some(o.seq))
            );
        }

        // The first report of each host is news (its verdict was not known): shown once.
        for id in &ids {
            fleet.emit(health(id));
        }
        settle().await;
        tokio::time::advance(Duration::from_millis(300)).await;
        settle().await;
        let (statuses0, steps0, _, _) = stats.read();
        for _ in 0..5 {
            for id in &ids {
                fleet.emit(health(id));
            }
        }
        settle().await;
        tokio::time::advance(Duration::from_millis(300)).await;
        settle().await;
        let (statuses1, steps1, _, _) = stats.read();
        // Batched: the task takes what waits in its queue as one step (how much waits depends
        // on scheduling; one step per report would be 1,000).
        assert!(
            steps1 - steps0 <= 50,
            "1,000 queued health reports took {} machine steps",
            steps1 - steps0
        );
        assert_eq!(
            statuses1, statuses0,
            "health reports that change nothing shown rebuilt the status"
        );
        shutdown.cancel();
        mgr.join().await;
    }

    /// A succeeded rollout whose hosts all confirmed does no work for a settled fleet (issue
    /// 10: ~6–7 % of a core above idle at 10,000 hosts, from every health report being a
    /// machine input and a safety tick every second): health reports and the passing of time
    /// take no machine step; a host that joins still wakes it and is converged.
    #[tokio::test(start_paused = true)]
    async fn a_settled_succeeded_rollout_takes_no_steps_until_a_host_joins() {
        let store = Arc::new(MemoryStore::new());
        store.put_release(&release_record()).unwrap();
        let hosts: Vec<_> = (0..HOSTS)
            .map(|i| host(&format!("h{i:03}"), "eu-1", "web-1"))
            .collect();
        let ids: Vec<HostId> = hosts.iter().map(|h| h.host_id.clone()).collect();
        let fleet = Arc::new(FakeFleet::new(hosts));
        fleet.respond_with(Box::new(|h, o| {
            super::lost_message_tests::answers(o)
                .iter()
                .map(|p| super::lost_message_tests::result(h, o, *p))
                .collect()
        }));
        let shutdown = CancellationToken::new();
        let mgr = crate::rollout::testing::manager(&store, &fleet, &shutdown).await;
        let api: &dyn RolloutApi = &mgr;
        let id = api
            .start_rollout(wire_spec(&["100%"]))
            .await
            .unwrap()
            .rollout_id;
        // Succeeded, every host confirmed, and past the re-send waits of its last orders.
        let mut confirmed = false;
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let s = mgr.status(&id).await.unwrap();
            confirmed = s.state == crate::rollout::RolloutState::Succeeded
                && s.hosts.iter().all(|h| {
                    h.phase
                        == crate::rollout::ShownPhase::Phase(
                            crate::rollout::intent::HostPhase::Confirmed,
                        )
                });
            if confirmed {
                break;
            }
        }
        assert!(confirmed, "the rollout did not succeed on every host");
        tokio::time::sleep(Duration::from_secs(30)).await;
        settle().await;
        let stats = mgr.task_stats();
        let (_, steps0, saves0, _) = stats.read();

        // A minute of a settled fleet: every host reports its health every 10 s.
        for _ in 0..6 {
            for id in &ids {
                fleet.emit(health(id));
            }
            settle().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
            settle().await;
        }
        let (_, steps1, saves1, _) = stats.read();
        assert_eq!(
            steps1 - steps0,
            0,
            "a settled rollout took machine steps for health reports and ticks"
        );
        assert_eq!(saves1, saves0);

        // A host that joins is converged: the task wakes, sends it the release, and settles again.
        let sent0 = fleet.sent().len();
        fleet.set_host(host("h999", "eu-1", "web-1"));
        let mut joined = false;
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            settle().await;
            if fleet.sent()[sent0..]
                .iter()
                .any(|(h, _)| h.as_str() == "h999")
            {
                joined = true;
                break;
            }
        }
        assert!(
            joined,
            "the joining host was sent nothing: {:?}",
            &fleet.sent()[sent0..]
        );

        // Settled again; a host that says hello without a passing verdict joins on its first
        // passing health report (which a settled rollout must still hear).
        tokio::time::sleep(Duration::from_secs(30)).await;
        settle().await;
        let mut early = host("h998", "eu-1", "web-1");
        for svc in early.services.values_mut() {
            svc.healthy = Some(false);
        }
        let early_id = early.host_id.clone();
        fleet.set_host(early);
        tokio::time::sleep(Duration::from_secs(1)).await;
        settle().await;
        let sent1 = fleet.sent().len();
        assert!(
            !fleet.sent().iter().any(|(h, _)| *h == early_id),
            "a host with a failing verdict was sent an order"
        );
        fleet.emit(health(&early_id));
        let mut joined = false;
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            settle().await;
            if fleet.sent()[sent1..].iter().any(|(h, _)| *h == early_id) {
                joined = true;
                break;
            }
        }
        assert!(
            joined,
            "the host that passed after its hello was sent nothing"
        );
        shutdown.cancel();
        mgr.join().await;
    }
}

/// Durable commits per wave change (issue 10): the 50-real-agent job spent ~90–100 ms in the
/// gate at each wave change, three commits in a row (the save of the bake's start, the
/// allocation of the next wave's sequences, the save of its orders).
#[cfg(test)]
mod commit_tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use serin_proto::{HostId, OrderAction};

    use super::lost_message_tests::{answers, result};
    use crate::control_service::RolloutApi;
    use crate::engine_tests::wire_spec;
    use crate::rollout::testing::{FakeFleet, host, release_record};
    use crate::rollout::{RolloutState, intent::HostPhase};
    use crate::store::{MemoryStore, Store};
    use tokio_util::sync::CancellationToken;

    /// The store's commits so far: every rollout save and every sequence allocation or
    /// reservation is one transaction.
    fn commits(store: &MemoryStore) -> usize {
        store.saves() + store.seq_commits()
    }

    /// Waves 1,10%,50%,100% over 20 hosts that answer at once, bake and minimum healthy time
    /// 1 ms (the 50-real-agent job's shape): from the moment the machine has heard the last
    /// answer of a wave to the first order of the next, exactly one commit (the orders' save,
    /// with the bake's start and their sequences), where it took three. Every order still
    /// went out after the save that records it, with the sequence saved, and no sequence was
    /// handed out twice.
    #[tokio::test(start_paused = true)]
    async fn a_wave_change_takes_one_commit() {
        let store = Arc::new(MemoryStore::new());
        store.put_release(&release_record()).unwrap();
        let hosts: Vec<_> = (0..20)
            .map(|i| host(&format!("h{i:02}"), "eu-1", "web-1"))
            .collect();
        let fleet = Arc::new(FakeFleet::new(hosts));
        // Per activate order sent: (host, seq, commits so far, the host's record as stored).
        type Seen = Vec<(HostId, u64, usize, Option<(String, Option<u64>)>)>;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        // The commits when each activate's last answer was emitted (the machine hears it next).
        let answered: Arc<Mutex<Vec<(HostId, usize)>>> = Arc::default();
        {
            let (store, seen, answered) = (store.clone(), seen.clone(), answered.clone());
            fleet.respond_with(Box::new(move |h, o| {
                let commits = commits(&store);
                if matches!(o.action, OrderAction::Activate { .. }) {
                    let stored = store.load_rollout(&o.rollout_id).unwrap().and_then(|r| {
                        let d = crate::rollout::record::decode_rollout(
                            &o.rollout_id,
                            &r.header,
                            &r.hosts,
                        )
                        .unwrap();
                        d.hosts
                            .iter()
                            .find(|r| &r.host.id == h)
                            .and_then(|r| r.host.order.as_ref())
                            .map(|o| (o.order_id.clone(), o.seq))
                    });
                    seen.lock()
                        .unwrap()
                        .push((h.clone(), o.seq, commits, stored));
                    answered.lock().unwrap().push((h.clone(), commits));
                }
                answers(o).iter().map(|p| result(h, o, *p)).collect()
            }));
        }
        let shutdown = CancellationToken::new();
        let mgr = crate::rollout::testing::manager(&store, &fleet, &shutdown).await;
        let api: &dyn RolloutApi = &mgr;
        let mut spec = wire_spec(&["1", "10%", "50%", "100%"]);
        spec.bake_ms = 1;
        spec.canary_bake_ms = 1;
        spec.min_healthy_ms = 1;
        let id = api.start_rollout(spec).await.unwrap().rollout_id;
        let mut st = mgr.status(&id).await.unwrap();
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            st = mgr.status(&id).await.unwrap();
            if st.state.is_finished()
                && st
                    .hosts
                    .iter()
                    .all(|h| h.phase == crate::rollout::ShownPhase::Phase(HostPhase::Confirmed))
            {
                break;
            }
        }
        assert_eq!(st.state, RolloutState::Succeeded, "{:?}", st.reason);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 20, "one activate per host: {seen:?}");
        // Every activate was on disk, with its sequence, before it went out.
        for (h, seq, _, stored) in &seen {
            let (_, saved) = stored
                .as_ref()
                .unwrap_or_else(|| panic!("host {h}: activate sent before its record was saved"));
            assert_eq!(
                *saved,
                Some(*seq),
                "host {h}: sent seq {seq}, saved {saved:?}"
            );
        }
        let mut seqs: Vec<(HostId, u64)> =
            fleet.sent().into_iter().map(|(h, o)| (h, o.seq)).collect();
        let n = seqs.len();
        seqs.sort();
        seqs.dedup();
        // Repeats of one order keep its sequence; distinct orders never share one.
        let orders: std::collections::BTreeSet<(HostId, String)> = fleet
            .sent()
            .into_iter()
            .map(|(h, o)| (h, o.order_id))
            .collect();
        assert_eq!(seqs.len(), orders.len(), "{n} sends");
        // The next wave's stage orders, asked for when the previous wave was healthy, waited
        // with that save and were superseded by the activates 1 ms later (staging a wave that
        // is activated at once gains nothing): no stage order went out after its host's
        // activate, and each host got one activate.
        let sent = fleet.sent();
        for (h, ..) in &seen {
            let at = |kind: &str| {
                sent.iter()
                    .enumerate()
                    .filter(|(_, (x, o))| x == h && o.action.kind() == kind)
                    .map(|(i, (_, o))| (i, o.order_id.clone()))
                    .collect::<Vec<_>>()
            };
            let activates: std::collections::BTreeSet<String> =
                at("activate").into_iter().map(|(_, id)| id).collect();
            assert_eq!(activates.len(), 1, "host {h}: {activates:?}");
            let first_activate = at("activate")[0].0;
            assert!(
                at("stage").iter().all(|(i, _)| *i < first_activate),
                "host {h}: a stage order after its activate"
            );
        }
        // Waves of 1, 1, 8 and 10 hosts (10% of 20 is 2 in all, 50% is 10, 100% is 20): each
        // wave's first activate, with the commits at the previous wave's last answer.
        let wave_starts = [1usize, 2, 10];
        let mut per_change = Vec::new();
        for &start in &wave_starts {
            let before = seen[start - 1].2;
            let at = seen[start].2;
            per_change.push(at - before);
        }
        assert_eq!(
            per_change,
            vec![1, 1, 1],
            "commits from a wave's last answer to the next wave's first order"
        );
        shutdown.cancel();
        mgr.join().await;
    }
}
