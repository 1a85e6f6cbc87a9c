//! The rollout state machine: pure, deterministic, no I/O and no clock.
//!
//! A [`Rollout`] is driven by [`Rollout::step`] with the current time (unix milliseconds) and one
//! [`Input`]; it answers with [`Command`]s for its driver (see [`super::task`]) to execute in
//! order: persist first, then allocate sequence numbers, then send orders. [`Rollout::next_deadline`]
//! tells the driver when to wake it up with [`Input::Tick`].
//!
//! ## Life of a rollout
//!
//! Waves run one after the other. A wave *dispatches* `Activate` orders to its hosts (within the
//! in-flight, unavailability and failure-domain budgets), waits until every reachable host is
//! healthy (or failed), *bakes* for the bake time (the canary wave for `canary_bake`), and then
//! passes its *gate*:
//!
//! 1. failed hosts of the wave above `failure_threshold`, or of the rollout above
//!    `cumulative_failure_threshold` → the gate fails (`on_failure`: roll back or pause). This is
//!    also checked after every input, so a wave fails fast without waiting for its bake.
//! 2. unreachable hosts of the wave above `unreachable_threshold` → the rollout **waits** (it is
//!    never promoted on missing data) and resumes by itself once enough of them are back.
//! 3. canary analysis confidently says "canary worse" → the gate fails.
//! 4. with `min_requests`: the wave's hosts served fewer requests since their activation →
//!    the rollout **pauses** with "insufficient data: n of N requests" (never a pass; see
//!    [`requests`]); an operator promotes, resumes or aborts.
//! 5. otherwise → **promote**: `Confirm` orders to the wave's healthy hosts, next wave.
//!
//! Unreachable hosts are always counted apart from failed ones. A failed gate with
//! `on_failure = rollback` sends every touched host a `Rollback` to its baseline, all at once (no
//! canary phase for a revert).
//!
//! A host with no baseline (a first install) has nothing to go back to: a rollback gives it no
//! order, leaves it on the rollout's release (phase `skipped`, or `failed` if it failed itself)
//! and says so in its detail, the rollout's reason and the `rollback_finished` evidence; it never
//! makes the rollback fail.
//!
//! ## After a restart
//!
//! [`Rollout::restore`] rebuilds intent from the records; what hosts do is observed again. Until
//! a host says hello it is [`Reach::Unknown`], neither reachable nor unreachable: a gate, the
//! end of a rollback and a waiting wave's resume wait for it. Hosts still unheard of when
//! [`EngineSettings::resume_grace`] has passed count as unreachable from then on.
//!
//! ## Sequence numbers
//!
//! Orders carry a per-(host, service) sequence number that the store allocates. The machine
//! cannot do I/O, so issuing an order is two steps: [`Command::AllocateSeqs`], answered by
//! [`Input::SeqsAllocated`], after which the machine persists the order (id and seq) and only
//! then emits [`Command::Send`]. After a restart, an order with a sequence is re-sent as is (the
//! agent deduplicates it and replays its result); an order without one is allocated again.

mod inputs;
mod output;
mod requests;
mod rollback;
mod stage;
mod wave;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use indexmap::IndexMap;

use serin_proto::{HoldConfirm, HostId, Order, OrderAction, Release, ReleaseId};

use super::analysis::{self, Comparison, Samples, Verdict, Window};
use super::plan::{self, Plan};
use super::record::{EventRecord, HeaderRecord, HostRecord, RECORD_VERSION, RecordError};
use super::settings::EngineSettings;
use super::spec::{OnFailure, RolloutSpec};
use super::view::{HostView, RolloutView, ShownPhase, WaveView};
use crate::fleet::{HealthSample, HostSnapshot, OrderOutcome, OrderPhase, ResultCode};
use crate::store::ReleaseRecord;

pub use super::intent::{
    Decision, DecisionKind, ENGINE, HostEntry, HostOrder, HostPhase, OrderKind, RolloutState, Wave,
    WaveState,
};
pub use super::observed::{Observed, ObservedHosts, Reach};

/// An operator's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorAction {
    /// Stop dispatching and gating until resumed.
    Pause,
    /// Continue a paused or waiting rollout (waiving the failures that paused it, or accepting
    /// the unreachable hosts it waits for).
    Resume,
    /// End the current bake now (or, while waiting, promote despite unreachable hosts).
    Promote,
    /// Stop and roll back every touched host; ends `aborted`.
    Abort,
    /// Re-dispatch the failed hosts of the current wave of a paused rollout.
    Retry,
    /// Roll a succeeded rollout's hosts back to their baselines.
    Rollback,
}

impl OperatorAction {
    /// The action's name as the CLI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorAction::Pause => "pause",
            OperatorAction::Resume => "resume",
            OperatorAction::Promote => "promote",
            OperatorAction::Abort => "abort",
            OperatorAction::Retry => "retry",
            OperatorAction::Rollback => "rollback",
        }
    }

    fn applies_to(self) -> &'static str {
        match self {
            OperatorAction::Pause => "a running or waiting rollout",
            OperatorAction::Resume => "a paused or waiting rollout",
            OperatorAction::Promote => {
                "a running or waiting rollout, or one paused for insufficient data"
            }
            OperatorAction::Abort => "a running, paused or waiting rollout",
            OperatorAction::Retry => "a paused rollout with failed hosts in its current wave",
            OperatorAction::Rollback => "a succeeded rollout",
        }
    }
}

/// An operator request that does not apply in the rollout's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rollout {rollout} is {state}; {action} applies to {applies}{extra}")]
pub struct ControlError {
    pub rollout: String,
    pub state: String,
    pub action: String,
    pub applies: String,
    /// More detail, starting with "; " when present.
    pub extra: String,
}

/// Everything that can happen to a rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Time passed (a deadline or the safety tick).
    Tick,
    /// A host connected (or reconnected) with its inventory.
    HostUp(HostSnapshot),
    /// A host's stream closed or its heartbeats stopped.
    HostDown(HostId),
    /// A health report.
    Health { host: HostId, sample: HealthSample },
    /// An order result.
    OrderResult { host: HostId, outcome: OrderOutcome },
    /// The store allocated these sequence numbers: `(order_id, seq)`.
    SeqsAllocated(Vec<(String, u64)>),
    /// An operator's control request.
    Operator {
        action: OperatorAction,
        actor: String,
        reason: String,
    },
    /// The whole fleet as it is now (after a restart or a lagging event stream).
    Resync(Vec<HostSnapshot>),
    /// Saving the rollout failed: nothing decided since the last successful save is durable,
    /// and no order issued since then went out. The rollout pauses (no new decisions) until
    /// [`Input::StoreRecovered`].
    StoreFailed { error: String },
    /// A save succeeded again after [`Input::StoreFailed`]; the held orders went out now.
    StoreRecovered,
}

/// A sequence number request for one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqRequest {
    pub host: HostId,
    pub order_id: String,
    /// The new sequence must be greater than this.
    pub at_least: u64,
}

/// Records to save in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Persist {
    /// The header as a save writes it ([`Rollout::save_header`]: the waves without their host
    /// lists, which a binary header does not store).
    pub header: HeaderRecord,
    /// Hosts that changed, in id order: the driver saves each one's record as the machine holds
    /// it when the save is written ([`Rollout::host_record`], [`record::encode_host`]), so
    /// the machine copies no host entry to ask for a save.
    ///
    /// [`record::encode_host`]: super::record::encode_host
    pub hosts: Vec<HostId>,
    /// Events to append.
    pub events: Vec<EventRecord>,
}

/// What the driver must do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Save these records (before anything that follows is done).
    Persist(Persist),
    /// Allocate sequence numbers and answer with [`Input::SeqsAllocated`].
    AllocateSeqs(Vec<SeqRequest>),
    /// Send an order to a host (if it is not connected, it is re-sent when it comes back).
    Send { host: HostId, order: Order },
    /// Keep an activated, unconfirmed host's dead-man switch fed: the coordinator is alive and
    /// still deciding. Unsequenced and not persisted (a lost hold is followed by the next one).
    Hold { host: HostId, hold: HoldConfirm },
    /// The operator request was refused.
    Refused(ControlError),
    /// The rollout reached a final state.
    Finished(RolloutState),
}

/// The rollout's hosts by id: a hashed lookup (the machine looks hosts up on every walk over a
/// wave; a `BTreeMap` of 19,900 ids spent its time comparing them), iterated in host-id order:
/// every insertion keeps the table sorted ([`Rollout::new`] and [`Rollout::restore`] sort it
/// once; a host that joins is inserted in place).
type HostTable = IndexMap<HostId, HostEntry, foldhash::fast::RandomState>;

/// Gate numbers of one wave.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    size: u32,
    healthy: u32,
    failed: u32,
    unreachable: u32,
    in_progress: u32,
}

/// One rollout's state machine.
#[derive(Debug, Clone)]
pub struct Rollout {
    id: String,
    spec: RolloutSpec,
    release: Release,
    release_created_ms: u64,
    settings: EngineSettings,
    state: RolloutState,
    reason: String,
    current_wave: usize,
    waves: Vec<Wave>,
    hosts: HostTable,
    decisions: Vec<Decision>,
    created_ms: u64,
    updated_ms: u64,
    paused_by_failure: bool,
    /// Paused because the store refused a save; resumes by itself when a save succeeds.
    paused_by_store: bool,
    rollback_final: Option<RolloutState>,
    // Observed, in memory only.
    /// What each host is seen doing.
    seen: ObservedHosts,
    /// After a restore: hosts not heard from by then stop being unknown and count as unreachable.
    resume_grace_until: Option<u64>,
    /// When this machine was restored from the records, if it was: a rollback resumed then gets
    /// a full rollback timeout from the restart.
    restored_ms: Option<u64>,
    samples: Samples,
    comparison: Option<Comparison>,
    /// The request gate's counts per host (see [`requests`]).
    served: BTreeMap<HostId, requests::Served>,
    /// Paused by the request gate ("insufficient data"): an operator may promote the wave.
    paused_for_data: bool,
    /// Connected hosts the selector matches that could not join yet (e.g. their hello came
    /// before their first passing health verdict): reconsidered on their health reports.
    candidates: BTreeMap<HostId, HostSnapshot>,
    // Per-step scratch.
    dirty_header: bool,
    dirty_hosts: BTreeSet<HostId>,
    events: Vec<EventRecord>,
    /// Order ids whose sequence was asked for and not answered yet.
    requested: foldhash::HashSet<String>,
    sends: Vec<HostId>,
    /// An order may lack a sequence that was not asked for yet: the next drain looks for it
    /// (set when an order is issued or open requests are dropped; otherwise nothing is
    /// looked for, so a step does not walk every host to find nothing).
    alloc_scan: bool,
    /// No hold is due before this time (unix ms); 0: look at every host at the next step. A
    /// lower bound: only a dispatch or a reconnect can make a hold due earlier, and both reset it.
    holds_from_ms: u64,
    finished_reported: bool,
    /// Pending hosts may be given stage orders: the next advance looks (set when a slot may
    /// have freed or a candidate appeared; see [`stage`]).
    stage_scan: bool,
    /// Something operators see changed since [`Rollout::take_status_changed`] was last called.
    status_changed: bool,
}

fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Rollout {
    /// A new rollout over a plan; nothing happens until the first [`Rollout::step`] (use
    /// [`Input::Tick`]), which persists it and dispatches the canary.
    pub fn new(
        id: impl Into<String>,
        spec: RolloutSpec,
        release: Release,
        plan: &Plan,
        settings: EngineSettings,
        now_ms: u64,
    ) -> Self {
        let mut hosts = HostTable::default();
        let mut waves = Vec::new();
        let mut ordinal = 0u32;
        for w in &plan.waves {
            for h in &w.hosts {
                ordinal += 1;
                hosts.insert(
                    h.host_id.clone(),
                    HostEntry {
                        id: h.host_id.clone(),
                        ordinal,
                        hostname: h.hostname.clone(),
                        labels: h.labels.clone(),
                        domain: h.domain.clone(),
                        wave: w.index,
                        baseline: h.baseline.clone(),
                        phase: HostPhase::Pending,
                        failure: None,
                        waived: false,
                        rollback_failed: None,
                        left_without_baseline: false,
                        detail: String::new(),
                        order: None,
                        activate_order: None,
                        orders_issued: 0,
                        attempts: 0,
                        retry_at_ms: None,
                        rollback_at_ms: None,
                        last_seq: h.last_seq,
                        dispatched_ms: None,
                        activated_ms: None,
                        healthy_ms: None,
                        joined: false,
                        stage_warning: None,
                    },
                );
            }
            waves.push(Wave {
                index: w.index,
                size_expr: w.size_expr.clone(),
                hosts: w.hosts.iter().map(|h| h.host_id.clone()).collect(),
                state: WaveState::Pending,
                started_ms: None,
                deadline_base_ms: None,
                bake_ends_ms: None,
                promote_by: None,
                accept_unreachable: false,
            });
        }
        hosts.sort_unstable_keys();
        let id = id.into();
        let mut r = Self {
            id,
            spec,
            release,
            release_created_ms: now_ms,
            settings,
            state: RolloutState::Running,
            reason: String::new(),
            current_wave: 0,
            waves,
            hosts,
            decisions: Vec::new(),
            created_ms: now_ms,
            updated_ms: now_ms,
            paused_by_failure: false,
            paused_by_store: false,
            rollback_final: None,
            resume_grace_until: None,
            restored_ms: None,
            seen: ObservedHosts::default(),
            samples: Samples::default(),
            comparison: None,
            served: BTreeMap::new(),
            paused_for_data: false,
            candidates: BTreeMap::new(),
            dirty_header: true,
            dirty_hosts: BTreeSet::new(),
            events: Vec::new(),
            requested: Default::default(),
            sends: Vec::new(),
            alloc_scan: true,
            holds_from_ms: 0,
            finished_reported: false,
            stage_scan: true,
            status_changed: true,
        };
        r.dirty_hosts = r.hosts.keys().cloned().collect();
        // Planned from a snapshot in which every host was connected and on its baseline.
        for h in plan.hosts() {
            let o = r.seen.entry(&h.host_id);
            o.reach = Reach::Reachable;
            o.current = h.baseline.clone();
        }
        let skipped = plan.skipped.len();
        r.event(
            now_ms,
            format!(
                "rollout created: {} to release {}, {} hosts in {} waves, {} skipped",
                r.spec.service,
                r.spec.release,
                r.hosts.len(),
                r.waves.len(),
                skipped
            ),
        );
        for s in &plan.skipped {
            r.event(now_ms, format!("host {} skipped: {}", s.host_id, s.reason));
        }
        r
    }

    /// Rebuilds a rollout from its stored records at `now_ms`. Hosts start as
    /// [`Reach::Unknown`]: an [`Input::Resync`] or [`Input::HostUp`] showing them connected makes
    /// them reachable; those still unheard of when [`EngineSettings::resume_grace`] has passed
    /// count as unreachable from then on.
    pub fn restore(
        header: HeaderRecord,
        hosts: Vec<HostRecord>,
        settings: EngineSettings,
        now_ms: u64,
    ) -> Result<Self, RecordError> {
        let invalid = |problem: String| RecordError::Invalid {
            what: format!("{}/header", header.id),
            problem,
        };
        let spec =
            RolloutSpec::try_from(header.spec.clone()).map_err(|e| invalid(e.to_string()))?;
        let release =
            super::record::release_of(&header.release).map_err(|e| invalid(e.to_string()))?;
        let live = matches!(
            header.state,
            RolloutState::Running | RolloutState::Waiting | RolloutState::Paused
        );
        let mut map = HostTable::default();
        for mut h in hosts {
            if !live {
                // A stage whose answer was not saved before the restart: nothing to send now.
                Self::withdraw_stage(&mut h.host);
            }
            map.insert(h.host.id.clone(), h.host);
        }
        map.sort_unstable_keys();
        for w in &header.waves {
            for h in &w.hosts {
                if !map.contains_key(h) {
                    return Err(invalid(format!(
                        "wave {} lists host {h} that has no record",
                        w.index
                    )));
                }
            }
        }
        if header.current_wave as usize > header.waves.len() {
            return Err(invalid(format!(
                "current wave {} does not exist",
                header.current_wave
            )));
        }
        let finished = header.state.is_finished();
        let grace_until = now_ms + ms(settings.resume_grace);
        // Which agents may still be armed is observation, lost with the restart: assume every
        // host that was ever dispatched may be, unless it is known done (confirmed, rolled back,
        // left out). An extra hold is ignored by an agent with nothing armed for the release.
        let mut seen = ObservedHosts::default();
        for h in map.values() {
            if !matches!(
                h.phase,
                HostPhase::Confirmed | HostPhase::RolledBack | HostPhase::Skipped
            ) && let Some(t) = h.dispatched_ms
            {
                seen.entry(&h.id).armed_since = Some(t);
            }
        }
        Ok(Self {
            id: header.id,
            spec,
            release,
            release_created_ms: header.release.created_unix_ms,
            settings,
            state: header.state,
            reason: header.reason,
            current_wave: header.current_wave as usize,
            waves: header.waves,
            hosts: map,
            decisions: header.decisions,
            created_ms: header.created_ms,
            updated_ms: header.updated_ms,
            paused_by_failure: header.paused_by_failure,
            paused_by_store: header.paused_by_store,
            rollback_final: header.rollback_final,
            resume_grace_until: Some(grace_until),
            restored_ms: Some(now_ms),
            seen,
            samples: Samples::default(),
            comparison: None,
            served: BTreeMap::new(),
            paused_for_data: header.paused_for_data,
            candidates: BTreeMap::new(),
            dirty_header: false,
            dirty_hosts: BTreeSet::new(),
            events: Vec::new(),
            requested: Default::default(),
            sends: Vec::new(),
            alloc_scan: true,
            holds_from_ms: 0,
            finished_reported: finished,
            stage_scan: true,
            status_changed: true,
        })
    }

    /// The rollout id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The validated spec.
    pub fn spec(&self) -> &RolloutSpec {
        &self.spec
    }

    /// The rollout's state.
    pub fn state(&self) -> RolloutState {
        self.state
    }

    /// Index of the wave being worked on.
    pub fn current_wave(&self) -> usize {
        self.current_wave
    }

    /// The waves.
    pub fn waves(&self) -> &[Wave] {
        &self.waves
    }

    /// Every host of the rollout.
    pub fn hosts(&self) -> impl Iterator<Item = &HostEntry> {
        self.hosts.values()
    }

    /// What is observed of a host.
    pub fn observed(&self, id: &HostId) -> &Observed {
        self.seen.get(id)
    }

    /// One host's entry.
    pub fn host(&self, id: &HostId) -> Option<&HostEntry> {
        self.hosts.get(id)
    }

    /// Every decision so far.
    pub fn decisions(&self) -> &[Decision] {
        &self.decisions
    }

    /// True when the rollout is finished and no host has an order that still needs delivering
    /// (or a rollback order still to issue), so its task may stop.
    pub fn is_quiescent(&self) -> bool {
        self.state.is_finished()
            && self
                .hosts
                .values()
                .all(|h| h.order.as_ref().is_none_or(|o| o.done) && h.rollback_at_ms.is_none())
    }

    /// Whether anything operators see changed since the last call (then [`Rollout::status`]
    /// is worth building again).
    pub fn take_status_changed(&mut self) -> bool {
        std::mem::take(&mut self.status_changed)
    }

    /// The current record of one host, if it is in the rollout.
    pub fn host_record(&self, id: &HostId) -> Option<HostRecord> {
        self.hosts.get(id).map(|h| HostRecord {
            version: RECORD_VERSION,
            host: h.clone(),
        })
    }

    /// The current header record.
    pub fn header(&self) -> HeaderRecord {
        self.header_record()
    }

    /// The current header record as a save writes it: the waves without their host lists (a
    /// binary header does not store them: they are rebuilt from the host records on load), so
    /// a save does not copy every host id of the rollout.
    pub fn save_header(&self) -> HeaderRecord {
        let waves = self
            .waves
            .iter()
            .map(|w| Wave {
                index: w.index,
                size_expr: w.size_expr.clone(),
                hosts: Vec::new(),
                state: w.state,
                started_ms: w.started_ms,
                deadline_base_ms: w.deadline_base_ms,
                bake_ends_ms: w.bake_ends_ms,
                promote_by: w.promote_by.clone(),
                accept_unreachable: w.accept_unreachable,
            })
            .collect();
        self.header_with(waves)
    }

    /// The order `host` should be working on, ready to (re-)send: it has a sequence and no
    /// final result yet.
    pub fn order_to_send(&self, host: &HostId) -> Option<Order> {
        let h = self.hosts.get(host)?;
        h.order.as_ref().filter(|o| !o.done)?;
        self.order_for(h)
    }

    /// The full records (for a first save or a snapshot).
    pub fn records(&self) -> (HeaderRecord, Vec<HostRecord>) {
        (
            self.header_record(),
            self.hosts
                .values()
                .map(|h| HostRecord {
                    version: RECORD_VERSION,
                    host: h.clone(),
                })
                .collect(),
        )
    }

    fn header_record(&self) -> HeaderRecord {
        self.header_with(self.waves.clone())
    }

    fn header_with(&self, waves: Vec<Wave>) -> HeaderRecord {
        HeaderRecord {
            version: RECORD_VERSION,
            id: self.id.clone(),
            spec: self.spec.to_raw(),
            release: ReleaseRecord {
                service: self.release.service.to_string(),
                id: self.release.id.to_string(),
                sha256: self.release.sha256.to_hex(),
                size: self.release.size,
                url: match &self.release.source {
                    serin_proto::ArtifactSource::Coordinator => String::new(),
                    serin_proto::ArtifactSource::Url(u) => u.clone(),
                },
                created_unix_ms: self.release_created_ms,
                manifest: self.release.manifest.clone().unwrap_or_default(),
            },
            state: self.state,
            reason: self.reason.clone(),
            current_wave: self.current_wave as u32,
            waves,
            decisions: self.decisions.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            paused_by_failure: self.paused_by_failure,
            paused_by_store: self.paused_by_store,
            paused_for_data: self.paused_for_data,
            rollback_final: self.rollback_final,
        }
    }

    /// When the machine next needs an [`Input::Tick`] (unix ms), if ever.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut best: Option<u64> = None;
        let mut consider = |t: Option<u64>| {
            if let Some(t) = t {
                best = Some(best.map_or(t, |b| b.min(t)));
            }
        };
        // Hosts unheard of since a restart count from the end of the resume grace (once it
        // passed, none is: no walk).
        if self.resume_grace_until.is_some() && self.hosts.keys().any(|id| self.seen.unknown(id)) {
            consider(self.resume_grace_until);
        }
        for h in self.hosts.values() {
            consider(h.retry_at_ms);
            consider(h.rollback_at_ms);
            let reachable = self.seen.reachable(&h.id);
            if reachable && h.failure.is_none() && h.phase == HostPhase::Activated {
                consider(h.activated_ms.map(|t| t + ms(self.spec.healthy_deadline)));
            }
            consider(self.hold_due(h));
            if reachable && h.phase == HostPhase::RollingBack {
                consider(
                    h.order
                        .as_ref()
                        .filter(|o| o.kind == OrderKind::Rollback)
                        .and_then(|o| o.sent_ms)
                        .map(|t| t + ms(self.settings.rollback_timeout)),
                );
            }
        }
        if self.state == RolloutState::RollingBack {
            consider(self.rollback_deadline());
        }
        if self.state == RolloutState::Running
            && let Some(w) = self.waves.get(self.current_wave)
        {
            match w.state {
                WaveState::Dispatching => {
                    consider(
                        w.deadline_base_ms
                            .map(|t| t + ms(self.spec.progress_deadline)),
                    );
                }
                WaveState::Baking => {
                    consider(w.bake_ends_ms);
                    consider(
                        w.deadline_base_ms
                            .map(|t| t + ms(self.spec.progress_deadline)),
                    );
                }
                _ => {}
            }
        }
        best
    }

    /// Feeds one input at time `now_ms` (unix milliseconds) and returns what to do.
    pub fn step(&mut self, now_ms: u64, input: Input) -> Vec<Command> {
        self.step_many(now_ms, vec![input])
    }

    /// Feeds several inputs that arrived together (at `now_ms`) and returns what to do: each
    /// input is taken in, in order, then the rollout advances once and the commands of the
    /// whole batch are drained: one save, one allocation round and the orders of all of them.
    ///
    /// This is what an input arriving a moment later than the one before it would give: the
    /// machine decides on the state all of them leave, so the work per batch (gates, counts,
    /// deadlines) is paid once per batch rather than once per input. A driver under load batches
    /// what waits in its queue; the cost of a step then grows with the batch, not with the fleet
    /// times the inputs.
    ///
    /// Health reports of a finished rollout that change nothing it decides (the usual case:
    /// a settled fleet reporting every few seconds) are taken in without advancing or draining:
    /// their cost is a lookup, not a walk over every host.
    pub fn step_many(&mut self, now_ms: u64, inputs: Vec<Input>) -> Vec<Command> {
        #[cfg(debug_assertions)]
        let before = self.state;
        let mut refused = None;
        let only_health = inputs.iter().all(|i| matches!(i, Input::Health { .. }));
        for input in inputs {
            self.take_in(now_ms, input, &mut refused);
        }
        if only_health && self.state.is_finished() && self.quiet() {
            return Vec::new();
        }
        self.advance(now_ms);
        #[cfg(debug_assertions)]
        self.debug_check(before);
        self.drain(now_ms, refused)
    }

    /// Nothing to save, allocate or send is pending from the inputs taken in so far.
    fn quiet(&self) -> bool {
        !self.dirty_header
            && self.dirty_hosts.is_empty()
            && self.events.is_empty()
            && self.sends.is_empty()
    }

    /// Takes one input in: what it changes in intent and observation, without advancing.
    fn take_in(&mut self, now_ms: u64, input: Input, refused: &mut Option<ControlError>) {
        // Health reports and ticks are the frequent inputs: they mark the status changed only
        // when they change something shown (a health verdict, a saved change); every other input
        // does, so publishing costs nothing per report that repeats what is known.
        if !matches!(input, Input::Health { .. } | Input::Tick) {
            self.status_changed = true;
        }
        match input {
            // Allocation requests are answered within the driver's handling of one input, so
            // any still open here failed: ask again.
            Input::Tick => {
                self.requested.clear();
                self.alloc_scan = true;
                self.stage_scan = true;
            }
            Input::HostUp(s) => self.on_host_up(now_ms, s),
            // A download may have ended (a stage answered, an activation swapped): staging
            // ahead may go on.
            Input::OrderResult { host, outcome } => {
                self.stage_scan = true;
                self.on_result(now_ms, &host, outcome)
            }
            Input::HostDown(h) => self.on_host_down(now_ms, &h),
            Input::Health { host, sample } => self.on_health(now_ms, &host, sample),
            Input::SeqsAllocated(v) => self.on_seqs(now_ms, v),
            Input::Operator {
                action,
                actor,
                reason,
            } => {
                if let Err(e) = self.on_operator(now_ms, action, &actor, &reason) {
                    *refused = Some(e);
                }
            }
            Input::Resync(snaps) => self.on_resync(now_ms, snaps),
            Input::StoreFailed { error } => self.on_store_failed(now_ms, error),
            Input::StoreRecovered => self.on_store_recovered(now_ms),
        }
    }

    /// The engine's promises that can be checked on one machine after every step (the model
    /// tests check them, and more, across interleavings; see `model_tests.rs`).
    #[cfg(debug_assertions)]
    fn debug_check(&self, before: RolloutState) {
        if let Some(l) = self.spec.max_in_flight {
            let cap = l.allowed_at_least_one(self.hosts.len() as u32);
            let n = self.hosts.values().filter(|h| h.in_flight()).count() as u32;
            debug_assert!(
                n <= cap,
                "rollout {}: {n} hosts in flight, cap {cap}",
                self.id
            );
        }
        for h in self.hosts.values() {
            debug_assert!(
                !h.stage_in_flight() || h.phase == HostPhase::Pending,
                "rollout {}: host {} has a stage in flight while {:?}",
                self.id,
                h.id,
                h.phase
            );
            debug_assert!(
                !h.stage_in_flight()
                    || matches!(
                        self.state,
                        RolloutState::Running | RolloutState::Waiting | RolloutState::Paused
                    ),
                "rollout {} is {}: host {} still has a stage in flight",
                self.id,
                self.state,
                h.id
            );
            debug_assert!(
                h.wave as usize <= self.current_wave || h.phase == HostPhase::Pending,
                "rollout {}: host {} of wave {} is {:?} before its wave started",
                self.id,
                h.id,
                h.wave,
                h.phase
            );
        }
        if matches!(
            self.state,
            RolloutState::RollingBack
                | RolloutState::RolledBack
                | RolloutState::Aborted
                | RolloutState::Failed
        ) {
            for h in self.hosts.values() {
                debug_assert!(
                    !h.order
                        .as_ref()
                        .is_some_and(|o| o.kind == OrderKind::Activate && !o.done),
                    "rollout {} is {}: host {} still has an activation to send",
                    self.id,
                    self.state,
                    h.id
                );
            }
        }
        if matches!(
            before,
            RolloutState::RolledBack | RolloutState::Aborted | RolloutState::Failed
        ) {
            debug_assert_eq!(self.state, before, "rollout {}: final state left", self.id);
        }
    }

    /// Marks a host failed; if it may be running the new release, sends it back to its baseline.
    fn fail_host(&mut self, now: u64, id: &HostId, reason: String) {
        let Some(h) = self.hosts.get_mut(id) else {
            return;
        };
        if h.failure.is_some() {
            return;
        }
        h.failure = Some(reason.clone());
        h.detail = reason.clone();
        let roll_back = h.phase.touched_new();
        if !roll_back {
            Self::withdraw_stage(h);
            h.phase = h.phase.on_failed();
        }
        self.dirty_hosts.insert(id.clone());
        self.event(now, format!("host {id} failed: {reason}"));
        if roll_back {
            self.start_host_rollback(now, id);
        }
    }

    /// Marks a host failed for a health verdict its agent also enforces (the healthy deadline,
    /// turning unhealthy). While the agent's switch is armed (activated or healthy, not
    /// confirmed) it reverts by itself for the same reason, so the rollback order waits
    /// [`EngineSettings::self_revert_grace`] for the agent's own ROLLED_BACK: a host that already
    /// rolled back is recorded as such and never ordered (and restarted) again.
    fn fail_armed_host(&mut self, now: u64, id: &HostId, reason: String) {
        let grace = self.settings.self_revert_grace;
        let reachable = self.seen.reachable(id);
        let Some(h) = self.hosts.get_mut(id) else {
            return;
        };
        let armed = reachable
            && h.failure.is_none()
            && h.baseline.is_some()
            && matches!(h.phase, HostPhase::Activated | HostPhase::Healthy);
        if !armed || grace.is_zero() {
            self.fail_host(now, id, reason);
            return;
        }
        h.failure = Some(reason.clone());
        h.phase = h.phase.on_rollback_ordered();
        h.rollback_at_ms = Some(now + ms(grace));
        h.retry_at_ms = None;
        // The activation is over either way: it is never re-sent.
        if let Some(o) = h.order.as_mut() {
            o.done = true;
        }
        h.detail = format!(
            "{reason}; waiting {} for its agent to roll back by itself",
            fmt_dur(grace)
        );
        self.dirty_hosts.insert(id.clone());
        self.event(now, format!("host {id} failed: {reason}"));
    }

    /// Issues the rollback orders whose agents did not report their own rollback in time.
    fn issue_due_rollbacks(&mut self, now: u64) {
        let due: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.rollback_at_ms.is_some_and(|t| t <= now))
            .map(|h| h.id.clone())
            .collect();
        for id in due {
            let Some(h) = self.hosts.get_mut(&id) else {
                continue;
            };
            h.rollback_at_ms = None;
            self.dirty_hosts.insert(id.clone());
            if h.phase == HostPhase::RollingBack {
                h.detail = format!(
                    "rolling back to {}",
                    h.baseline
                        .as_ref()
                        .map_or("the previous release", ReleaseId::as_str)
                );
                self.issue(now, &id, OrderKind::Rollback);
            }
        }
    }

    /// Gives a host a new order of `kind`; its sequence is allocated before it is sent.
    fn issue(&mut self, _now: u64, id: &HostId, kind: OrderKind) {
        let rollout = self.id.clone();
        let Some(h) = self.hosts.get_mut(id) else {
            return;
        };
        h.orders_issued += 1;
        h.attempts = 0;
        self.alloc_scan = true;
        let order_id = format!(
            "{rollout}/{}/{}-{}",
            h.ordinal,
            h.orders_issued,
            order_kind_str(kind)
        );
        if kind == OrderKind::Activate {
            h.activate_order = Some(order_id.clone());
        }
        h.order = Some(HostOrder {
            order_id,
            kind,
            seq: None,
            to: if kind == OrderKind::Rollback {
                h.baseline.clone()
            } else {
                None
            },
            done: false,
            sent_ms: None,
        });
        self.dirty_hosts.insert(id.clone());
    }

    fn decide(
        &mut self,
        now: u64,
        wave: u32,
        kind: DecisionKind,
        reason: String,
        evidence: BTreeMap<String, String>,
        actor: &str,
    ) {
        self.event(
            now,
            format!("decision {kind} by {actor} (wave {}): {reason}", wave + 1),
        );
        self.decisions.push(Decision {
            at_ms: now,
            wave,
            kind,
            reason,
            evidence,
            actor: actor.to_string(),
        });
        self.dirty_header = true;
    }

    fn event(&mut self, now: u64, text: String) {
        tracing::debug!(rollout = %self.id, "{text}");
        self.events.push(EventRecord {
            version: RECORD_VERSION,
            at_ms: now,
            text,
        });
        self.dirty_header = true;
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn order_kind_str(k: OrderKind) -> &'static str {
    match k {
        OrderKind::Activate => "activate",
        OrderKind::Confirm => "confirm",
        OrderKind::Rollback => "rollback",
        OrderKind::Stage => "stage",
        OrderKind::Cancel => "cancel",
    }
}

/// At most the first ten of a comma-separated id list (the evidence keeps them all), for a
/// reason an operator reads.
fn some_ids(ids: &str) -> String {
    const SHOWN: usize = 10;
    let all: Vec<&str> = ids.split(',').filter(|s| !s.is_empty()).collect();
    if all.len() <= SHOWN {
        return all.join(",");
    }
    format!("{} and {} more", all[..SHOWN].join(","), all.len() - SHOWN)
}

fn join_ids(ids: &[HostId]) -> String {
    ids.iter().map(HostId::as_str).collect::<Vec<_>>().join(",")
}
