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
//! 4. otherwise → **promote**: `Confirm` orders to the wave's healthy hosts, next wave.
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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serin_proto::{HostId, Order, OrderAction, Release, ReleaseId};

use super::analysis::{self, Comparison, Samples, Verdict, Window};
use super::plan::{self, Plan};
use super::record::{EventRecord, HeaderRecord, HostRecord, RECORD_VERSION, RecordError, ids};
use super::settings::EngineSettings;
use super::spec::{OnFailure, RolloutSpec};
use super::view::{HostView, RolloutView, ShownPhase, WaveView};
use crate::fleet::{HealthSample, HostSnapshot, OrderOutcome, OrderPhase, ResultCode};
use crate::store::ReleaseRecord;

/// The actor of decisions the engine takes by itself.
pub const ENGINE: &str = "engine";

/// State of a whole rollout (`RolloutStatus.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Waves are being dispatched, baked and gated.
    Running,
    /// Stopped until an operator resumes, retries, promotes or aborts: a gate failed with
    /// `on_failure = pause`, or an operator paused it.
    Paused,
    /// Paused automatically: too many hosts of the wave are unreachable. Resumes by itself when
    /// they return, or when an operator resumes or promotes.
    Waiting,
    /// Every wave passed.
    Succeeded,
    /// Every touched host is being rolled back to its baseline.
    RollingBack,
    /// A failed gate (or a manual rollback) rolled the touched hosts back.
    RolledBack,
    /// An operator aborted the rollout; touched hosts were rolled back.
    Aborted,
    /// The rollback itself failed on some host; an operator must look.
    Failed,
}

impl RolloutState {
    /// The state as shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Waiting => "waiting",
            RolloutState::Succeeded => "succeeded",
            RolloutState::RollingBack => "rolling_back",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
            RolloutState::Failed => "failed",
        }
    }

    /// Succeeded, rolled back, aborted or failed.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RolloutState::Succeeded
                | RolloutState::RolledBack
                | RolloutState::Aborted
                | RolloutState::Failed
        )
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one host is in the rollout (`HostProgress.phase`; "unreachable" is shown instead of a
/// non-final phase while the host is disconnected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostPhase {
    /// Not dispatched yet.
    Pending,
    /// The activate order was issued; the agent is staging or swapping.
    Dispatched,
    /// The agent swapped the release in and restarted the service.
    Activated,
    /// The agent reports the release healthy for the minimum healthy time.
    Healthy,
    /// The gate passed and the agent confirmed (dead-man switch disarmed).
    Confirmed,
    /// The attempt failed and the host serves its baseline (the agent kept it).
    Failed,
    /// A rollback order to the baseline is on its way.
    RollingBack,
    /// The host is back on its baseline.
    RolledBack,
    /// Left out of the rollout.
    Skipped,
}

impl HostPhase {
    /// The phase as shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            HostPhase::Pending => "pending",
            HostPhase::Dispatched => "dispatched",
            HostPhase::Activated => "activated",
            HostPhase::Healthy => "healthy",
            HostPhase::Confirmed => "confirmed",
            HostPhase::Failed => "failed",
            HostPhase::RollingBack => "rolling_back",
            HostPhase::RolledBack => "rolled_back",
            HostPhase::Skipped => "skipped",
        }
    }

    /// Whether the host may be running the new release.
    fn touched_new(self) -> bool {
        matches!(
            self,
            HostPhase::Dispatched
                | HostPhase::Activated
                | HostPhase::Healthy
                | HostPhase::Confirmed
        )
    }
}

/// State of one wave (`WaveStatus.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveState {
    /// Not started.
    Pending,
    /// Orders are going out and hosts are becoming healthy.
    Dispatching,
    /// Every reachable host is healthy; the bake timer runs.
    Baking,
    /// The gate passed.
    Passed,
    /// The gate failed.
    Failed,
    /// Paused with the rollout.
    Paused,
    /// Too many unreachable hosts; waiting for them.
    Waiting,
}

impl WaveState {
    /// The state as shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            WaveState::Pending => "pending",
            WaveState::Dispatching => "dispatching",
            WaveState::Baking => "baking",
            WaveState::Passed => "passed",
            WaveState::Failed => "failed",
            WaveState::Paused => "paused",
            WaveState::Waiting => "waiting",
        }
    }
}

/// One wave, as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub index: u32,
    /// The spec expression, e.g. `"10%"`.
    pub size_expr: String,
    /// Host ids in dispatch order.
    #[serde(with = "ids::hosts")]
    pub hosts: Vec<HostId>,
    pub state: WaveState,
    pub started_ms: Option<u64>,
    /// The progress deadline counts from here (the start, or the last resume).
    pub deadline_base_ms: Option<u64>,
    pub bake_ends_ms: Option<u64>,
    /// An operator asked to end the bake now (their name).
    pub promote_by: Option<String>,
    /// An operator accepted the wave's unreachable hosts (resume or promote while waiting).
    pub accept_unreachable: bool,
}

/// What kind of order a host was last given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderKind {
    /// Swap the target release in.
    Activate,
    /// Disarm the dead-man switch.
    Confirm,
    /// Go back to the baseline.
    Rollback,
}

/// The last order a host was given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostOrder {
    pub order_id: String,
    pub kind: OrderKind,
    /// `None` until the store allocated one.
    pub seq: Option<u64>,
    /// Rollback target (the baseline); unused for other kinds.
    #[serde(with = "ids::release_opt")]
    pub to: Option<ReleaseId>,
    /// A final result arrived; no need to re-send it.
    pub done: bool,
    /// When it was last sent (for the rollback timeout).
    pub sent_ms: Option<u64>,
}

/// One host of the rollout: persisted intent plus (skipped in records) what was observed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostEntry {
    #[serde(with = "ids::host")]
    pub id: HostId,
    /// Short number used in order ids.
    pub ordinal: u32,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub domain: Option<String>,
    pub wave: u32,
    #[serde(with = "ids::release_opt")]
    pub baseline: Option<ReleaseId>,
    pub phase: HostPhase,
    /// Why the host failed; failed hosts count against thresholds unless waived.
    pub failure: Option<String>,
    /// An operator resumed past this failure.
    pub waived: bool,
    /// The rollback of this host failed.
    pub rollback_failed: Option<String>,
    /// The host had no baseline release (a first install), so a rollback left it on the
    /// rollout's release instead of ordering a rollback it cannot carry out.
    #[serde(default)]
    pub left_without_baseline: bool,
    pub detail: String,
    pub order: Option<HostOrder>,
    /// Id of the activate order (its late results, e.g. a dead-man rollback, still count).
    pub activate_order: Option<String>,
    pub orders_issued: u32,
    /// Busy/stale refusals of the current order.
    pub attempts: u32,
    /// Re-issue the current order kind at this time (after a busy/stale refusal).
    pub retry_at_ms: Option<u64>,
    /// Highest sequence known to be used for this host's service.
    pub last_seq: u64,
    pub dispatched_ms: Option<u64>,
    pub activated_ms: Option<u64>,
    pub healthy_ms: Option<u64>,
    /// Joined while the rollout was under way.
    pub joined: bool,
    /// Observed: whether the agent is connected (unknown after a restart until it says hello).
    #[serde(skip)]
    pub reach: Reach,
    /// Observed: the release the host serves.
    #[serde(skip)]
    pub current: Option<ReleaseId>,
    /// Observed: latest health verdict.
    #[serde(skip)]
    pub healthy: Option<bool>,
}

impl HostEntry {
    /// Observed connected.
    pub fn reachable(&self) -> bool {
        self.reach == Reach::Reachable
    }

    /// Not heard from since the coordinator restarted, and the resume grace has not passed.
    pub fn unknown(&self) -> bool {
        self.reach == Reach::Unknown
    }

    /// Counts as failed against thresholds.
    fn counts_failed(&self) -> bool {
        self.failure.is_some() && !self.waived
    }

    /// Nothing more to wait for in its wave before baking.
    fn settled(&self) -> bool {
        self.failure.is_some()
            || self.reach == Reach::Unreachable
            || matches!(
                self.phase,
                HostPhase::Healthy
                    | HostPhase::Confirmed
                    | HostPhase::Failed
                    | HostPhase::RolledBack
            )
    }

    /// Missing data: disconnected and neither failed nor done (an unknown host is not missing
    /// yet: it is waited for).
    fn counts_unreachable(&self) -> bool {
        self.reach == Reach::Unreachable
            && self.failure.is_none()
            && self.phase != HostPhase::Confirmed
    }

    /// Dispatched and not yet healthy.
    fn in_flight(&self) -> bool {
        self.failure.is_none() && matches!(self.phase, HostPhase::Dispatched | HostPhase::Activated)
    }
}

/// What the coordinator knows about a host's connection (observed, never persisted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reach {
    /// Nothing heard since the coordinator restarted: the host is neither reachable nor
    /// unreachable until it says hello or [`EngineSettings::resume_grace`] passes. Gates and the
    /// end of a rollback wait for unknown hosts instead of counting them as missing.
    #[default]
    Unknown,
    /// The agent is connected.
    Reachable,
    /// The agent's stream closed, its heartbeats stopped, or it did not come back within the
    /// resume grace.
    Unreachable,
}

/// A recorded decision, with its evidence and actor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub at_ms: u64,
    pub wave: u32,
    /// promote, wait, pause, rollback, resume, abort, retry, complete, manual_rollback, fail.
    pub kind: String,
    pub reason: String,
    pub evidence: BTreeMap<String, String>,
    /// `engine` or the operator's name.
    pub actor: String,
}

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
            OperatorAction::Promote => "a running or waiting rollout",
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
    pub header: HeaderRecord,
    /// Hosts that changed.
    pub hosts: Vec<HostRecord>,
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
    /// The operator request was refused.
    Refused(ControlError),
    /// The rollout reached a final state.
    Finished(RolloutState),
}

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
    hosts: BTreeMap<HostId, HostEntry>,
    decisions: Vec<Decision>,
    created_ms: u64,
    updated_ms: u64,
    paused_by_failure: bool,
    /// Paused because the store refused a save; resumes by itself when a save succeeds.
    paused_by_store: bool,
    rollback_final: Option<RolloutState>,
    // Observed, in memory only.
    /// After a restore: hosts not heard from by then stop being unknown and count as unreachable.
    resume_grace_until: Option<u64>,
    samples: Samples,
    comparison: Option<Comparison>,
    // Per-step scratch.
    dirty_header: bool,
    dirty_hosts: BTreeSet<HostId>,
    events: Vec<EventRecord>,
    requested: BTreeSet<String>,
    sends: Vec<HostId>,
    finished_reported: bool,
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
        let mut hosts = BTreeMap::new();
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
                        last_seq: h.last_seq,
                        dispatched_ms: None,
                        activated_ms: None,
                        healthy_ms: None,
                        joined: false,
                        reach: Reach::Reachable,
                        current: h.baseline.clone(),
                        healthy: None,
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
            samples: Samples::default(),
            comparison: None,
            dirty_header: true,
            dirty_hosts: BTreeSet::new(),
            events: Vec::new(),
            requested: BTreeSet::new(),
            sends: Vec::new(),
            finished_reported: false,
        };
        r.dirty_hosts = r.hosts.keys().cloned().collect();
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
        let mut map = BTreeMap::new();
        for h in hosts {
            let mut e = h.host;
            e.reach = Reach::Unknown;
            e.current = None;
            e.healthy = None;
            map.insert(e.id.clone(), e);
        }
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
            samples: Samples::default(),
            comparison: None,
            dirty_header: false,
            dirty_hosts: BTreeSet::new(),
            events: Vec::new(),
            requested: BTreeSet::new(),
            sends: Vec::new(),
            finished_reported: finished,
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

    /// One host's entry.
    pub fn host(&self, id: &HostId) -> Option<&HostEntry> {
        self.hosts.get(id)
    }

    /// Every decision so far.
    pub fn decisions(&self) -> &[Decision] {
        &self.decisions
    }

    /// True when the rollout is finished and no host has an order that still needs delivering,
    /// so its task may stop.
    pub fn is_quiescent(&self) -> bool {
        self.state.is_finished()
            && self
                .hosts
                .values()
                .all(|h| h.order.as_ref().is_none_or(|o| o.done))
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
            },
            state: self.state,
            reason: self.reason.clone(),
            current_wave: self.current_wave as u32,
            waves: self.waves.clone(),
            decisions: self.decisions.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            paused_by_failure: self.paused_by_failure,
            paused_by_store: self.paused_by_store,
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
        if self.hosts.values().any(HostEntry::unknown) {
            consider(self.resume_grace_until);
        }
        for h in self.hosts.values() {
            consider(h.retry_at_ms);
            if h.reachable() && h.failure.is_none() && h.phase == HostPhase::Activated {
                consider(h.activated_ms.map(|t| t + ms(self.spec.healthy_deadline)));
            }
            if h.reachable() && h.phase == HostPhase::RollingBack {
                consider(
                    h.order
                        .as_ref()
                        .and_then(|o| o.sent_ms)
                        .map(|t| t + ms(self.settings.rollback_timeout)),
                );
            }
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
        #[cfg(debug_assertions)]
        let before = self.state;
        let mut refused = None;
        match input {
            // Allocation requests are answered within the driver's handling of one input, so
            // any still open here failed: ask again.
            Input::Tick => self.requested.clear(),
            Input::HostUp(s) => self.on_host_up(now_ms, s),
            Input::HostDown(h) => self.on_host_down(now_ms, &h),
            Input::Health { host, sample } => self.on_health(now_ms, &host, sample),
            Input::OrderResult { host, outcome } => self.on_result(now_ms, &host, outcome),
            Input::SeqsAllocated(v) => self.on_seqs(now_ms, v),
            Input::Operator {
                action,
                actor,
                reason,
            } => {
                if let Err(e) = self.on_operator(now_ms, action, &actor, &reason) {
                    refused = Some(e);
                }
            }
            Input::Resync(snaps) => self.on_resync(now_ms, snaps),
            Input::StoreFailed { error } => self.on_store_failed(now_ms, error),
            Input::StoreRecovered => self.on_store_recovered(now_ms),
        }
        self.advance(now_ms);
        #[cfg(debug_assertions)]
        self.debug_check(before);
        self.drain(now_ms, refused)
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

    // ----------------------------------------------------------------------------------------
    // Inputs

    fn on_host_up(&mut self, now: u64, s: HostSnapshot) {
        if !self.hosts.contains_key(&s.host_id) {
            self.maybe_join(now, &s);
            return;
        }
        let svc = s.services.get(&self.spec.service).cloned();
        let Some(h) = self.hosts.get_mut(&s.host_id) else {
            return;
        };
        let was = h.reach;
        h.reach = match (s.connected, was) {
            (true, _) => Reach::Reachable,
            // A disconnected host in a snapshot right after a restart says nothing new: it
            // stays unknown until it says hello or the resume grace passes.
            (false, Reach::Unknown) => Reach::Unknown,
            (false, _) => Reach::Unreachable,
        };
        if let Some(svc) = svc {
            h.current = svc.current_release.clone();
            h.healthy = svc.healthy;
            if svc.last_seq > h.last_seq {
                h.last_seq = svc.last_seq;
                self.dirty_hosts.insert(s.host_id.clone());
            }
        }
        if !s.connected {
            return;
        }
        // Re-send the order the host should be working on (same id, same seq: the agent
        // deduplicates it and replays its result).
        if let Some(o) = h.order.as_mut().filter(|o| !o.done && o.seq.is_some()) {
            // Its answer is awaited from now (the rollback timeout counts from the re-send,
            // not from a send the host may never have seen).
            o.sent_ms = Some(now);
            self.sends.push(s.host_id.clone());
        }
        match was {
            Reach::Reachable => {}
            Reach::Unknown => self.event(
                now,
                format!(
                    "host {} reconnected after the coordinator restart",
                    s.host_id
                ),
            ),
            Reach::Unreachable => {
                self.event(now, format!("host {} is reachable again", s.host_id));
            }
        }
    }

    fn on_store_failed(&mut self, now: u64, error: String) {
        // Allocations requested in the failed round were dropped with it: ask again.
        self.requested.clear();
        if !matches!(self.state, RolloutState::Running | RolloutState::Waiting) {
            self.event(now, format!("saving the rollout failed: {error}"));
            return;
        }
        self.state = RolloutState::Paused;
        self.paused_by_store = true;
        self.paused_by_failure = false;
        self.reason = format!(
            "saving the rollout failed ({error}); paused until the store accepts writes again"
        );
        if let Some(w) = self.waves.get_mut(self.current_wave) {
            w.state = WaveState::Paused;
            w.bake_ends_ms = None;
        }
        let idx = self.current_wave.min(self.waves.len().saturating_sub(1)) as u32;
        let mut e = BTreeMap::new();
        e.insert("store_error".into(), error.clone());
        self.decide(
            now,
            idx,
            "pause",
            format!("the store refused a save: {error}"),
            e,
            ENGINE,
        );
    }

    fn on_store_recovered(&mut self, now: u64) {
        // Orders held back while the store failed went out just now: their clocks start now.
        for h in self.hosts.values_mut() {
            if let Some(o) = h.order.as_mut().filter(|o| !o.done && o.seq.is_some()) {
                o.sent_ms = Some(now);
            }
        }
        if !(self.paused_by_store && self.state == RolloutState::Paused) {
            self.paused_by_store = false;
            return;
        }
        let idx = self.current_wave.min(self.waves.len().saturating_sub(1)) as u32;
        self.resume_wave(now);
        self.decide(
            now,
            idx,
            "resume",
            "the store accepts writes again".into(),
            BTreeMap::new(),
            ENGINE,
        );
    }

    fn on_resync(&mut self, now: u64, snaps: Vec<HostSnapshot>) {
        let mut seen = BTreeSet::new();
        for s in snaps {
            seen.insert(s.host_id.clone());
            if s.connected || self.hosts.contains_key(&s.host_id) {
                self.on_host_up(now, s);
            }
        }
        let gone: Vec<HostId> = self
            .hosts
            .keys()
            .filter(|h| !seen.contains(*h))
            .cloned()
            .collect();
        for h in gone {
            if let Some(e) = self.hosts.get_mut(&h)
                && e.reach == Reach::Reachable
            {
                e.reach = Reach::Unreachable;
            }
        }
    }

    fn on_host_down(&mut self, now: u64, id: &HostId) {
        if let Some(h) = self.hosts.get_mut(id)
            && h.reach != Reach::Unreachable
        {
            h.reach = Reach::Unreachable;
            self.event(now, format!("host {id} is unreachable"));
        }
    }

    fn maybe_join(&mut self, now: u64, s: &HostSnapshot) {
        let joinable = matches!(
            self.state,
            RolloutState::Running
                | RolloutState::Waiting
                | RolloutState::Paused
                | RolloutState::Succeeded
        );
        if !joinable || !s.connected || self.waves.is_empty() || !plan::selected(&self.spec, s) {
            return;
        }
        if plan::skip_reason(&self.spec, s).is_some() {
            return;
        }
        let p = plan::planned_host(&self.spec, s);
        let last = self.waves.len() - 1;
        let ordinal = self.hosts.values().map(|h| h.ordinal).max().unwrap_or(0) + 1;
        let entry = HostEntry {
            id: p.host_id.clone(),
            ordinal,
            hostname: p.hostname,
            labels: p.labels,
            domain: p.domain,
            wave: last as u32,
            baseline: p.baseline.clone(),
            phase: HostPhase::Pending,
            failure: None,
            waived: false,
            rollback_failed: None,
            left_without_baseline: false,
            detail: "joined during the rollout".into(),
            order: None,
            activate_order: None,
            orders_issued: 0,
            attempts: 0,
            retry_at_ms: None,
            last_seq: p.last_seq,
            dispatched_ms: None,
            activated_ms: None,
            healthy_ms: None,
            joined: true,
            reach: Reach::Reachable,
            current: p.baseline,
            healthy: None,
        };
        self.hosts.insert(p.host_id.clone(), entry);
        self.waves[last].hosts.push(p.host_id.clone());
        self.dirty_hosts.insert(p.host_id.clone());
        self.dirty_header = true;
        self.event(
            now,
            format!("host {} joined; added to wave {last}", p.host_id),
        );
    }

    fn on_health(&mut self, now: u64, id: &HostId, sample: HealthSample) {
        if sample.service != self.spec.service {
            return;
        }
        let window = self.settings.analysis.window;
        let Some(h) = self.hosts.get_mut(id) else {
            // Not in the rollout, but could serve as baseline: only rollout hosts are compared.
            return;
        };
        h.healthy = Some(sample.healthy);
        if sample.release.is_some() {
            h.current = sample.release.clone();
        }
        let turned_bad = !sample.healthy
            && h.phase == HostPhase::Healthy
            && h.failure.is_none()
            && sample
                .release
                .as_ref()
                .is_none_or(|r| *r == self.spec.release)
            && !self.state.is_finished()
            && self.state != RolloutState::RollingBack;
        let checks = format!(
            "{}/{} checks passing",
            sample.checks_passing, sample.checks_total
        );
        self.samples.push(id, sample, window);
        if turned_bad {
            self.fail_host(
                now,
                id,
                format!("turned unhealthy after becoming healthy ({checks})"),
            );
        }
    }

    fn on_seqs(&mut self, now: u64, v: Vec<(String, u64)>) {
        let by_order: BTreeMap<String, u64> = v.into_iter().collect();
        let ids: Vec<HostId> = self.hosts.keys().cloned().collect();
        for id in ids {
            let Some(h) = self.hosts.get_mut(&id) else {
                continue;
            };
            let Some(o) = h.order.as_mut() else { continue };
            if o.seq.is_some() {
                continue;
            }
            if let Some(seq) = by_order.get(&o.order_id) {
                o.seq = Some(*seq);
                o.sent_ms = Some(now);
                h.last_seq = h.last_seq.max(*seq);
                self.requested.remove(&o.order_id);
                self.dirty_hosts.insert(id.clone());
                if h.reachable() {
                    self.sends.push(id.clone());
                }
            }
        }
    }

    fn on_result(&mut self, now: u64, id: &HostId, out: OrderOutcome) {
        if out.rollout_id != self.id || out.service != self.spec.service {
            return;
        }
        let target = self.spec.release.clone();
        let max_attempts = self.settings.max_order_attempts;
        let retry_delay = ms(self.settings.order_retry_delay);
        let Some(h) = self.hosts.get_mut(id) else {
            return;
        };
        if out.current_release.is_some() {
            h.current = out.current_release.clone();
        }
        if h.left_without_baseline {
            // Its orders were withdrawn when the rollout rolled back; late results change nothing.
            return;
        }
        let Some(order) = h.order.clone() else { return };
        let kind = if order.order_id == out.order_id {
            order.kind
        } else if h.activate_order.as_deref() == Some(out.order_id.as_str()) {
            OrderKind::Activate
        } else {
            return;
        };
        let is_current = order.order_id == out.order_id;
        let detail_of = |out: &OrderOutcome| {
            let code = out
                .code
                .as_str_name()
                .trim_start_matches("RESULT_CODE_")
                .to_lowercase();
            if out.message.is_empty() {
                code
            } else {
                format!("{code}: {}", out.message)
            }
        };
        let phase = out.phase;
        let mut fail: Option<String> = None;
        let mut changed = true;
        match (phase, kind) {
            (OrderPhase::Progress | OrderPhase::Staged, _) => {
                h.detail = if phase == OrderPhase::Staged {
                    "staged".into()
                } else {
                    "staging".into()
                };
                changed = false;
            }
            (OrderPhase::Activated, OrderKind::Activate) if h.phase == HostPhase::Dispatched => {
                h.phase = HostPhase::Activated;
                h.activated_ms = Some(now);
                h.detail = format!("activated {target}");
            }
            (OrderPhase::Healthy, OrderKind::Activate)
                if matches!(h.phase, HostPhase::Dispatched | HostPhase::Activated)
                    && h.failure.is_none() =>
            {
                h.phase = HostPhase::Healthy;
                h.activated_ms.get_or_insert(now);
                h.healthy_ms = Some(now);
                h.healthy = Some(true);
                h.detail = format!("healthy on {target}");
                if let Some(o) = h.order.as_mut().filter(|_| is_current) {
                    o.done = true;
                }
            }
            (OrderPhase::Confirmed, OrderKind::Confirm) => {
                if h.failure.is_none() {
                    h.phase = HostPhase::Confirmed;
                    h.detail = format!("confirmed on {target}");
                }
                if let Some(o) = h.order.as_mut() {
                    o.done = true;
                }
            }
            (OrderPhase::RolledBack, _) => {
                if h.phase == HostPhase::RollingBack || kind == OrderKind::Rollback {
                    h.phase = HostPhase::RolledBack;
                    h.detail = format!(
                        "rolled back to {}",
                        out.current_release
                            .as_ref()
                            .map_or("nothing", ReleaseId::as_str)
                    );
                    if let Some(o) = h.order.as_mut().filter(|o| o.kind == OrderKind::Rollback) {
                        o.done = true;
                    }
                } else if h.failure.is_none() {
                    h.phase = HostPhase::RolledBack;
                    if let Some(o) = h.order.as_mut() {
                        o.done = true;
                    }
                    h.failure = Some(format!("the agent rolled back ({})", detail_of(&out)));
                    h.detail = h.failure.clone().unwrap_or_default();
                    let msg = format!("host {id} failed: {}", h.detail);
                    self.dirty_hosts.insert(id.clone());
                    self.event(now, msg);
                    return;
                } else {
                    h.phase = HostPhase::RolledBack;
                }
            }
            // A refusal or failure of an order that already has its final result (e.g. a stale
            // refusal arriving after the agent rolled back) changes nothing.
            (OrderPhase::Failed | OrderPhase::Rejected, _) if is_current && order.done => {
                changed = false;
            }
            (OrderPhase::Failed, OrderKind::Activate) if is_current => {
                if out.code == ResultCode::Busy && h.attempts < max_attempts {
                    h.attempts += 1;
                    h.retry_at_ms = Some(now + retry_delay);
                    h.detail = "agent busy; retrying".into();
                } else if h.failure.is_none() {
                    h.phase = HostPhase::Failed;
                    if let Some(o) = h.order.as_mut() {
                        o.done = true;
                    }
                    let reason = format!("activation failed ({})", detail_of(&out));
                    h.failure = Some(reason.clone());
                    h.detail = reason.clone();
                    self.dirty_hosts.insert(id.clone());
                    self.event(now, format!("host {id} failed: {reason}"));
                    return;
                }
            }
            (OrderPhase::Failed, OrderKind::Confirm) if is_current => {
                fail = Some(format!("confirm failed ({})", detail_of(&out)));
            }
            (OrderPhase::Failed, OrderKind::Rollback) if is_current => {
                if out.code == ResultCode::Busy && h.attempts < max_attempts {
                    h.attempts += 1;
                    h.retry_at_ms = Some(now + retry_delay);
                } else {
                    h.phase = HostPhase::Failed;
                    let reason = format!("rollback failed ({})", detail_of(&out));
                    h.rollback_failed = Some(reason.clone());
                    h.detail = reason;
                    if let Some(o) = h.order.as_mut() {
                        o.done = true;
                    }
                }
            }
            (OrderPhase::Rejected, _) if is_current => {
                let code = out.code;
                if matches!(code, ResultCode::StaleOrder | ResultCode::Busy)
                    && h.attempts < max_attempts
                {
                    h.attempts += 1;
                    // The agent has applied `last_seq` already (a store restored from a backup
                    // can be behind it): the next order must be allocated past it. A stale
                    // refusal is retried at once, a busy one after the retry delay.
                    h.last_seq = h.last_seq.max(out.seq).max(out.last_seq);
                    h.retry_at_ms = Some(if code == ResultCode::StaleOrder {
                        now
                    } else {
                        now + retry_delay
                    });
                    h.detail = format!("order refused ({}); retrying", detail_of(&out));
                } else if kind == OrderKind::Rollback {
                    h.phase = HostPhase::Failed;
                    h.rollback_failed = Some(format!("rollback refused ({})", detail_of(&out)));
                    if let Some(o) = h.order.as_mut() {
                        o.done = true;
                    }
                } else {
                    fail = Some(format!(
                        "{} order refused ({})",
                        order_kind_str(kind),
                        detail_of(&out)
                    ));
                }
            }
            _ => changed = false,
        }
        if changed {
            self.dirty_hosts.insert(id.clone());
        }
        if let Some(reason) = fail {
            self.fail_host(now, id, reason);
        }
    }

    /// The refusal of `action` in the rollout's current state, for a rollout that is not
    /// running (its task is gone, so nothing can change it).
    pub fn refusal(&self, action: OperatorAction) -> ControlError {
        ControlError {
            rollout: self.id.clone(),
            state: self.state.as_str().to_string(),
            action: action.as_str().to_string(),
            applies: action.applies_to().to_string(),
            extra: String::new(),
        }
    }

    fn on_operator(
        &mut self,
        now: u64,
        action: OperatorAction,
        actor: &str,
        reason: &str,
    ) -> Result<(), ControlError> {
        let refuse = |s: &Self, extra: String| ControlError {
            rollout: s.id.clone(),
            state: s.state.as_str().to_string(),
            action: action.as_str().to_string(),
            applies: action.applies_to().to_string(),
            extra,
        };
        let why = |default: &str| {
            if reason.is_empty() {
                default.to_string()
            } else {
                reason.to_string()
            }
        };
        let idx = self.current_wave.min(self.waves.len().saturating_sub(1)) as u32;
        match action {
            OperatorAction::Pause => {
                if !matches!(self.state, RolloutState::Running | RolloutState::Waiting) {
                    return Err(refuse(self, String::new()));
                }
                self.state = RolloutState::Paused;
                self.paused_by_failure = false;
                self.reason = format!("paused by {actor}: {}", why("no reason given"));
                if let Some(w) = self.waves.get_mut(self.current_wave) {
                    w.state = WaveState::Paused;
                    w.bake_ends_ms = None;
                }
                self.decide(
                    now,
                    idx,
                    "pause",
                    why("operator pause"),
                    BTreeMap::new(),
                    actor,
                );
            }
            OperatorAction::Resume => {
                if !matches!(self.state, RolloutState::Paused | RolloutState::Waiting) {
                    return Err(refuse(self, String::new()));
                }
                let mut evidence = BTreeMap::new();
                if self.paused_by_failure {
                    let waived: Vec<HostId> = self
                        .hosts
                        .values_mut()
                        .filter(|h| h.counts_failed())
                        .map(|h| {
                            h.waived = true;
                            h.id.clone()
                        })
                        .collect();
                    self.dirty_hosts.extend(waived.iter().cloned());
                    if !waived.is_empty() {
                        evidence.insert("waived_failures".into(), join_ids(&waived));
                    }
                }
                if self.state == RolloutState::Waiting
                    && let Some(w) = self.waves.get_mut(self.current_wave)
                {
                    w.accept_unreachable = true;
                    evidence.insert("accepted_unreachable".into(), "true".into());
                }
                self.resume_wave(now);
                self.decide(now, idx, "resume", why("operator resume"), evidence, actor);
            }
            OperatorAction::Promote => {
                if !matches!(self.state, RolloutState::Running | RolloutState::Waiting) {
                    return Err(refuse(self, String::new()));
                }
                if self.state == RolloutState::Waiting {
                    if let Some(w) = self.waves.get_mut(self.current_wave) {
                        w.accept_unreachable = true;
                    }
                    self.resume_wave(now);
                }
                let Some(w) = self.waves.get_mut(self.current_wave) else {
                    return Err(refuse(self, "; there is no wave to promote".into()));
                };
                w.promote_by = Some(actor.to_string());
                self.dirty_header = true;
                // The gate records the promote decision itself, with its evidence.
                self.event(
                    now,
                    format!(
                        "{actor} asked to promote wave {idx} now: {}",
                        why("no reason given")
                    ),
                );
            }
            OperatorAction::Abort => {
                if !matches!(
                    self.state,
                    RolloutState::Running | RolloutState::Paused | RolloutState::Waiting
                ) {
                    return Err(refuse(self, String::new()));
                }
                let r = format!("aborted by {actor}: {}", why("no reason given"));
                if let Some(w) = self.waves.get_mut(self.current_wave) {
                    w.state = WaveState::Failed;
                }
                let evidence = self.touched_evidence();
                self.decide(now, idx, "abort", why("operator abort"), evidence, actor);
                self.begin_rollback(now, RolloutState::Aborted, r);
            }
            OperatorAction::Retry => {
                if self.state != RolloutState::Paused {
                    return Err(refuse(self, String::new()));
                }
                let wave = self.current_wave as u32;
                let retry: Vec<HostId> = self
                    .hosts
                    .values()
                    .filter(|h| {
                        h.wave == wave
                            && h.failure.is_some()
                            && matches!(h.phase, HostPhase::Failed | HostPhase::RolledBack)
                    })
                    .map(|h| h.id.clone())
                    .collect();
                if retry.is_empty() {
                    return Err(refuse(
                        self,
                        format!("; wave {wave} has no failed host that is back on its baseline"),
                    ));
                }
                for id in &retry {
                    if let Some(h) = self.hosts.get_mut(id) {
                        h.failure = None;
                        h.waived = false;
                        h.left_without_baseline = false;
                        h.phase = HostPhase::Pending;
                        h.attempts = 0;
                        h.detail = "retry".into();
                        self.dirty_hosts.insert(id.clone());
                    }
                }
                let mut evidence = BTreeMap::new();
                evidence.insert("hosts".into(), join_ids(&retry));
                self.resume_wave(now);
                self.decide(now, wave, "retry", why("operator retry"), evidence, actor);
            }
            OperatorAction::Rollback => {
                if self.state != RolloutState::Succeeded {
                    return Err(refuse(self, String::new()));
                }
                let r = format!("rolled back by {actor}: {}", why("no reason given"));
                let evidence = self.touched_evidence();
                self.decide(
                    now,
                    idx,
                    "manual_rollback",
                    why("operator rollback"),
                    evidence,
                    actor,
                );
                self.finished_reported = false;
                self.begin_rollback(now, RolloutState::RolledBack, r);
            }
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------------------
    // Progress

    fn advance(&mut self, now: u64) {
        self.end_resume_grace(now);
        self.retry_orders(now);
        // Each iteration makes at least one transition; a rollout has a bounded number of them.
        for _ in 0..(4 * self.waves.len() + 8) {
            let progressed = match self.state {
                RolloutState::Running => self.advance_wave(now),
                RolloutState::Waiting => self.check_waiting(now),
                RolloutState::RollingBack => self.advance_rollback(now),
                RolloutState::Succeeded => self.converge(now),
                _ => false,
            };
            if !progressed {
                break;
            }
        }
        if self.state == RolloutState::RollingBack || self.state.is_finished() {
            self.check_rollback_timeouts(now);
        }
    }

    /// Once the resume grace has passed, hosts still unheard of since the restart are unreachable.
    fn end_resume_grace(&mut self, now: u64) {
        if self.resume_grace_until.is_none_or(|t| now < t) {
            return;
        }
        self.resume_grace_until = None;
        let silent: Vec<HostId> = self
            .hosts
            .values_mut()
            .filter(|h| h.unknown())
            .map(|h| {
                h.reach = Reach::Unreachable;
                h.id.clone()
            })
            .collect();
        if !silent.is_empty() {
            self.event(
                now,
                format!(
                    "{} hosts did not reconnect within {} of the coordinator restart; counted unreachable: {}",
                    silent.len(),
                    fmt_dur(self.settings.resume_grace),
                    join_ids(&silent)
                ),
            );
        }
    }

    fn retry_orders(&mut self, now: u64) {
        let due: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.retry_at_ms.is_some_and(|t| t <= now))
            .map(|h| h.id.clone())
            .collect();
        for id in due {
            let Some(h) = self.hosts.get_mut(&id) else {
                continue;
            };
            h.retry_at_ms = None;
            let Some(kind) = h.order.as_ref().filter(|o| !o.done).map(|o| o.kind) else {
                continue;
            };
            // An activation is only retried while the host may still take the release.
            if kind == OrderKind::Activate
                && (h.failure.is_some()
                    || h.phase != HostPhase::Dispatched
                    || matches!(
                        self.state,
                        RolloutState::RollingBack
                            | RolloutState::RolledBack
                            | RolloutState::Aborted
                            | RolloutState::Failed
                    ))
            {
                continue;
            }
            let attempts = h.attempts;
            self.issue(now, &id, kind);
            if let Some(h) = self.hosts.get_mut(&id) {
                h.attempts = attempts;
            }
        }
    }

    fn resume_wave(&mut self, now: u64) {
        self.state = RolloutState::Running;
        self.paused_by_failure = false;
        self.paused_by_store = false;
        self.reason.clear();
        if let Some(w) = self.waves.get_mut(self.current_wave) {
            w.state = if w.started_ms.is_some() {
                WaveState::Dispatching
            } else {
                WaveState::Pending
            };
            w.bake_ends_ms = None;
            w.deadline_base_ms = Some(now);
        }
        self.dirty_header = true;
    }

    fn advance_wave(&mut self, now: u64) -> bool {
        let idx = self.current_wave;
        let Some(wave) = self.waves.get(idx) else {
            self.complete(now);
            return true;
        };
        match wave.state {
            WaveState::Pending => {
                let w = &mut self.waves[idx];
                w.state = WaveState::Dispatching;
                w.started_ms = Some(now);
                w.deadline_base_ms = Some(now);
                let n = w.hosts.len();
                self.dirty_header = true;
                self.event(
                    now,
                    format!(
                        "wave {idx} started: {n} hosts{}",
                        if idx == 0 { " (canary)" } else { "" }
                    ),
                );
                return true;
            }
            WaveState::Passed => {
                if idx + 1 < self.waves.len() {
                    self.current_wave += 1;
                    self.dirty_header = true;
                } else {
                    self.complete(now);
                }
                return true;
            }
            WaveState::Dispatching | WaveState::Baking => {}
            _ => return false,
        }
        let ids = wave.hosts.clone();
        // Hosts past their healthy deadline.
        let hd = ms(self.spec.healthy_deadline);
        for id in &ids {
            let late = self.hosts.get(id).is_some_and(|h| {
                h.reachable()
                    && h.failure.is_none()
                    && h.phase == HostPhase::Activated
                    && h.activated_ms.is_some_and(|t| t + hd <= now)
            });
            if late {
                self.fail_host(
                    now,
                    id,
                    format!(
                        "not healthy within the healthy deadline ({})",
                        fmt_dur(self.spec.healthy_deadline)
                    ),
                );
            }
        }
        // The wave's progress deadline.
        let progress_due = self.waves[idx]
            .deadline_base_ms
            .is_some_and(|t| t + ms(self.spec.progress_deadline) <= now);
        if progress_due {
            for id in &ids {
                let late = self
                    .hosts
                    .get(id)
                    .is_some_and(|h| h.reachable() && !h.settled());
                if late {
                    self.fail_host(
                        now,
                        id,
                        format!(
                            "not healthy within the progress deadline ({})",
                            fmt_dur(self.spec.progress_deadline)
                        ),
                    );
                }
            }
        }
        if let Some((reason, evidence)) = self.breach(idx) {
            self.gate_failed(now, idx, reason, evidence);
            return true;
        }
        self.dispatch(now, idx);
        let settled = ids
            .iter()
            .all(|id| self.hosts.get(id).is_some_and(HostEntry::settled));
        if !settled {
            return false;
        }
        let w = &mut self.waves[idx];
        match w.state {
            WaveState::Dispatching => {
                w.state = WaveState::Baking;
                let bake = self.spec.bake_for(idx);
                w.bake_ends_ms = Some(now + ms(bake));
                self.dirty_header = true;
                self.event(now, format!("wave {idx} baking for {}", fmt_dur(bake)));
                true
            }
            WaveState::Baking
                if w.promote_by.is_some() || w.bake_ends_ms.is_some_and(|t| t <= now) =>
            {
                // Just after a restart, hosts not heard from yet are neither counted as healthy
                // nor as unreachable: the gate waits for them (at most the resume grace).
                let unknown = ids
                    .iter()
                    .any(|id| self.hosts.get(id).is_some_and(HostEntry::unknown));
                if unknown {
                    return false;
                }
                self.gate(now, idx);
                true
            }
            _ => false,
        }
    }

    fn dispatch(&mut self, now: u64, idx: usize) {
        let total = self.hosts.len() as u32;
        let mut in_flight = self.hosts.values().filter(|h| h.in_flight()).count() as u32;
        let mut unavailable = in_flight
            + self
                .hosts
                .values()
                .filter(|h| h.phase == HostPhase::RollingBack)
                .count() as u32;
        let max_in_flight = self
            .spec
            .max_in_flight
            .map_or(u32::MAX, |l| l.allowed_at_least_one(total));
        let max_unavailable = self
            .spec
            .max_unavailable
            .map_or(u32::MAX, |l| l.allowed_at_least_one(total));
        let max_domains = self.spec.max_domains_in_flight.map(|k| k.get() as usize);
        let mut domains: BTreeSet<String> = self
            .hosts
            .values()
            .filter(|h| h.in_flight())
            .filter_map(|h| h.domain.clone())
            .collect();
        for id in self.waves[idx].hosts.clone() {
            if in_flight >= max_in_flight || unavailable >= max_unavailable {
                break;
            }
            let Some(h) = self.hosts.get(&id) else {
                continue;
            };
            if h.phase != HostPhase::Pending || !h.reachable() || h.failure.is_some() {
                continue;
            }
            if let (Some(k), Some(d)) = (max_domains, &h.domain)
                && !domains.contains(d)
                && domains.len() >= k
            {
                continue;
            }
            if let Some(d) = &h.domain {
                domains.insert(d.clone());
            }
            self.activate(now, &id);
            in_flight += 1;
            unavailable += 1;
        }
    }

    fn activate(&mut self, now: u64, id: &HostId) {
        if let Some(h) = self.hosts.get_mut(id) {
            h.phase = HostPhase::Dispatched;
            h.dispatched_ms = Some(now);
            h.activated_ms = None;
            h.healthy_ms = None;
            h.detail = format!("activate {}", self.spec.release);
        }
        self.issue(now, id, OrderKind::Activate);
    }

    fn counts(&self, idx: usize) -> Counts {
        let mut c = Counts::default();
        for id in &self.waves[idx].hosts {
            let Some(h) = self.hosts.get(id) else {
                continue;
            };
            c.size += 1;
            if h.counts_failed() {
                c.failed += 1;
            } else if h.counts_unreachable() {
                c.unreachable += 1;
            } else if matches!(h.phase, HostPhase::Healthy | HostPhase::Confirmed) {
                c.healthy += 1;
            } else if h.in_flight() {
                c.in_progress += 1;
            }
        }
        c
    }

    fn cumulative_failed(&self) -> u32 {
        self.hosts.values().filter(|h| h.counts_failed()).count() as u32
    }

    /// A failure threshold is exceeded: the reason and the evidence.
    fn breach(&self, idx: usize) -> Option<(String, BTreeMap<String, String>)> {
        let c = self.counts(idx);
        let total = self.hosts.len() as u32;
        let cum = self.cumulative_failed();
        let evidence = self.gate_evidence(idx, c);
        let wave_limit = self.spec.failure_threshold;
        if wave_limit.exceeded(c.failed, c.size) {
            return Some((
                format!(
                    "wave {idx}: {} of {} hosts failed, more than the failure threshold {} allows ({})",
                    c.failed,
                    c.size,
                    wave_limit,
                    wave_limit.allowed(c.size)
                ),
                evidence,
            ));
        }
        if let Some(l) = self.spec.cumulative_failure_threshold
            && l.exceeded(cum, total)
        {
            return Some((
                format!(
                    "{cum} of {total} hosts failed in the rollout, more than the cumulative failure threshold {l} allows ({})",
                    l.allowed(total)
                ),
                evidence,
            ));
        }
        None
    }

    fn gate_evidence(&self, idx: usize, c: Counts) -> BTreeMap<String, String> {
        let total = self.hosts.len() as u32;
        let mut e = BTreeMap::new();
        e.insert("wave_size".into(), c.size.to_string());
        e.insert("healthy".into(), c.healthy.to_string());
        e.insert("failed".into(), c.failed.to_string());
        e.insert("unreachable".into(), c.unreachable.to_string());
        e.insert("in_progress".into(), c.in_progress.to_string());
        e.insert(
            "failure_threshold".into(),
            self.spec.failure_threshold.to_string(),
        );
        e.insert(
            "failures_allowed".into(),
            self.spec.failure_threshold.allowed(c.size).to_string(),
        );
        e.insert(
            "unreachable_threshold".into(),
            self.spec.unreachable_threshold.to_string(),
        );
        e.insert(
            "unreachable_allowed".into(),
            self.spec.unreachable_threshold.allowed(c.size).to_string(),
        );
        e.insert(
            "cumulative_failed".into(),
            self.cumulative_failed().to_string(),
        );
        if let Some(l) = self.spec.cumulative_failure_threshold {
            e.insert("cumulative_threshold".into(), l.to_string());
            e.insert("cumulative_allowed".into(), l.allowed(total).to_string());
        }
        let failed: Vec<HostId> = self.waves[idx]
            .hosts
            .iter()
            .filter(|id| self.hosts.get(*id).is_some_and(HostEntry::counts_failed))
            .cloned()
            .collect();
        if !failed.is_empty() {
            e.insert("failed_hosts".into(), join_ids(&failed));
        }
        let unreachable: Vec<HostId> = self.waves[idx]
            .hosts
            .iter()
            .filter(|id| {
                self.hosts
                    .get(*id)
                    .is_some_and(HostEntry::counts_unreachable)
            })
            .cloned()
            .collect();
        if !unreachable.is_empty() {
            e.insert("unreachable_hosts".into(), join_ids(&unreachable));
        }
        e
    }

    /// Canary analysis at the gate of wave `idx`. Each canary host counts from the moment it
    /// reported healthy for its current activation (`healthy_ms`, cleared by every new activate
    /// order, so a retry starts afresh and the failed probes of the restart itself do not count);
    /// the baseline hosts count from the earliest of those moments, so both sides cover the
    /// same interval.
    fn analyse(&mut self, idx: usize) -> Comparison {
        let wave = idx as u32;
        let wave_start = self.waves[idx].started_ms.unwrap_or(0);
        let canary: Vec<Window> = self
            .hosts
            .values()
            .filter(|h| {
                h.wave <= wave
                    && h.failure.is_none()
                    && matches!(h.phase, HostPhase::Healthy | HostPhase::Confirmed)
            })
            .map(|h| Window {
                host: h.id.clone(),
                since_ms: h.healthy_ms.unwrap_or(wave_start),
            })
            .collect();
        let since = canary
            .iter()
            .map(|w| w.since_ms)
            .min()
            .unwrap_or(wave_start);
        let baseline: Vec<Window> = self
            .hosts
            .values()
            .filter(|h| h.phase == HostPhase::Pending && h.reachable())
            .map(|h| Window {
                host: h.id.clone(),
                since_ms: since,
            })
            .collect();
        let c = analysis::compare(&self.settings.analysis, &self.samples, &canary, &baseline);
        self.comparison = Some(c.clone());
        c
    }

    fn gate(&mut self, now: u64, idx: usize) {
        let c = self.counts(idx);
        let comparison = self.analyse(idx);
        let mut evidence = self.gate_evidence(idx, c);
        comparison.evidence(&mut evidence);
        let w = &self.waves[idx];
        let promoted_by = w.promote_by.clone();
        if let Some(t) = w.bake_ends_ms {
            evidence.insert("bake".into(), fmt_dur(self.spec.bake_for(idx)));
            if promoted_by.is_some() && t > now {
                evidence.insert("bake_skipped_ms".into(), (t - now).to_string());
            }
        }
        if let Some((reason, mut e)) = self.breach(idx) {
            e.extend(evidence);
            self.gate_failed(now, idx, reason, e);
            return;
        }
        let unreachable_limit = self.spec.unreachable_threshold;
        if unreachable_limit.exceeded(c.unreachable, c.size) && !w.accept_unreachable {
            let reason = format!(
                "wave {idx}: {} of {} hosts unreachable, more than the unreachable threshold {} allows ({}); waiting for them to return",
                c.unreachable,
                c.size,
                unreachable_limit,
                unreachable_limit.allowed(c.size)
            );
            let w = &mut self.waves[idx];
            w.state = WaveState::Waiting;
            w.promote_by = None;
            self.state = RolloutState::Waiting;
            self.reason = reason.clone();
            self.decide(now, idx as u32, "wait", reason, evidence, ENGINE);
            return;
        }
        if comparison.verdict == Verdict::CanaryWorse && self.settings.analysis_gates {
            let reason = format!(
                "wave {idx}: canary analysis says the new release fails health checks significantly more often than the baseline (p = {:.4})",
                comparison.p_value.unwrap_or(0.0)
            );
            self.gate_failed(now, idx, reason, evidence);
            return;
        }
        // Promote.
        let healthy: Vec<HostId> = self.waves[idx]
            .hosts
            .iter()
            .filter(|id| {
                self.hosts
                    .get(*id)
                    .is_some_and(|h| h.phase == HostPhase::Healthy && h.failure.is_none())
            })
            .cloned()
            .collect();
        let last = idx + 1 == self.waves.len();
        let reason = format!(
            "wave {idx}: {} of {} hosts healthy, {} failed (threshold {}), {} unreachable{}",
            c.healthy,
            c.size,
            c.failed,
            self.spec.failure_threshold,
            c.unreachable,
            if promoted_by.is_some() {
                "; bake ended early by an operator"
            } else {
                ""
            }
        );
        let actor = promoted_by.unwrap_or_else(|| ENGINE.to_string());
        self.decide(now, idx as u32, "promote", reason, evidence, &actor);
        let w = &mut self.waves[idx];
        w.state = WaveState::Passed;
        w.promote_by = None;
        self.dirty_header = true;
        for id in &healthy {
            self.issue(now, id, OrderKind::Confirm);
        }
        if last {
            self.complete(now);
        }
    }

    fn complete(&mut self, now: u64) {
        if self.state != RolloutState::Running {
            return;
        }
        self.current_wave = self.waves.len().saturating_sub(1);
        self.state = RolloutState::Succeeded;
        let total = self.hosts.len();
        let failed = self.cumulative_failed();
        self.reason = format!("every wave passed: {total} hosts, {failed} failed");
        let mut e = BTreeMap::new();
        e.insert("hosts".into(), total.to_string());
        e.insert("failed".into(), failed.to_string());
        e.insert("waves".into(), self.waves.len().to_string());
        let reason = self.reason.clone();
        self.decide(now, self.current_wave as u32, "complete", reason, e, ENGINE);
    }

    fn gate_failed(
        &mut self,
        now: u64,
        idx: usize,
        reason: String,
        evidence: BTreeMap<String, String>,
    ) {
        match self.spec.on_failure {
            OnFailure::Rollback => {
                self.waves[idx].state = WaveState::Failed;
                self.decide(
                    now,
                    idx as u32,
                    "rollback",
                    reason.clone(),
                    evidence,
                    ENGINE,
                );
                self.begin_rollback(now, RolloutState::RolledBack, reason);
            }
            OnFailure::Pause => {
                let w = &mut self.waves[idx];
                w.state = WaveState::Paused;
                w.bake_ends_ms = None;
                w.promote_by = None;
                self.state = RolloutState::Paused;
                self.paused_by_failure = true;
                self.reason = format!("{reason}; paused for an operator (on_failure = pause)");
                self.decide(now, idx as u32, "pause", reason, evidence, ENGINE);
            }
        }
    }

    fn touched_evidence(&self) -> BTreeMap<String, String> {
        let (with, without): (Vec<&HostEntry>, Vec<&HostEntry>) = self
            .hosts
            .values()
            .filter(|h| h.phase.touched_new())
            .partition(|h| h.baseline.is_some());
        let mut e = BTreeMap::new();
        e.insert("hosts_to_roll_back".into(), with.len().to_string());
        if !without.is_empty() {
            let ids: Vec<HostId> = without.iter().map(|h| h.id.clone()).collect();
            e.insert("no_baseline_hosts".into(), join_ids(&ids));
        }
        e
    }

    fn begin_rollback(&mut self, now: u64, final_state: RolloutState, reason: String) {
        self.state = RolloutState::RollingBack;
        self.rollback_final = Some(final_state);
        self.reason = reason;
        self.dirty_header = true;
        let touched: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.phase.touched_new())
            .map(|h| h.id.clone())
            .collect();
        let mut ordered = 0;
        for id in &touched {
            if self.start_host_rollback(now, id) {
                ordered += 1;
            }
        }
        let left = touched.len() - ordered;
        self.event(
            now,
            if left == 0 {
                format!("rolling back {ordered} hosts to their baselines")
            } else {
                format!(
                    "rolling back {ordered} hosts to their baselines; {left} hosts have no baseline release to restore and stay on {}",
                    self.spec.release
                )
            },
        );
    }

    /// Sends a touched host back to its baseline. A host without a baseline (a first install)
    /// has nothing to go back to: it gets no rollback order, is left on the rollout's release
    /// and its outstanding activate order is withdrawn (never re-sent). Returns whether a
    /// rollback was ordered.
    fn start_host_rollback(&mut self, now: u64, id: &HostId) -> bool {
        let release = self.spec.release.clone();
        let Some(h) = self.hosts.get_mut(id) else {
            return false;
        };
        if h.baseline.is_none() {
            h.left_without_baseline = true;
            h.phase = if h.failure.is_some() {
                HostPhase::Failed
            } else {
                HostPhase::Skipped
            };
            h.retry_at_ms = None;
            h.detail = format!("no baseline release to restore; left on {release}");
            match h.order.as_mut() {
                Some(o) if o.seq.is_none() => h.order = None,
                Some(o) => o.done = true,
                None => {}
            }
            self.dirty_hosts.insert(id.clone());
            let msg = format!("host {id}: {}", h.detail);
            self.event(now, msg);
            return false;
        }
        h.phase = HostPhase::RollingBack;
        h.attempts = 0;
        h.detail = format!(
            "rolling back to {}",
            h.baseline
                .as_ref()
                .map_or("the previous release", ReleaseId::as_str)
        );
        self.issue(now, id, OrderKind::Rollback);
        true
    }

    fn check_rollback_timeouts(&mut self, now: u64) {
        let limit = ms(self.settings.rollback_timeout);
        for h in self.hosts.values_mut() {
            if h.reachable()
                && h.phase == HostPhase::RollingBack
                && h.order
                    .as_ref()
                    .and_then(|o| o.sent_ms)
                    .is_some_and(|t| t + limit <= now)
            {
                h.phase = HostPhase::Failed;
                let reason = format!(
                    "no answer to the rollback order within {}",
                    fmt_dur(self.settings.rollback_timeout)
                );
                h.rollback_failed = Some(reason.clone());
                h.detail = reason;
                if let Some(o) = h.order.as_mut() {
                    o.done = true;
                }
                self.dirty_hosts.insert(h.id.clone());
            }
        }
    }

    fn advance_rollback(&mut self, now: u64) -> bool {
        self.check_rollback_timeouts(now);
        let outstanding = self
            .hosts
            .values()
            .any(|h| h.phase == HostPhase::RollingBack && (h.reachable() || h.unknown()));
        if outstanding {
            return false;
        }
        let failed: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.rollback_failed.is_some())
            .map(|h| h.id.clone())
            .collect();
        let later: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.phase == HostPhase::RollingBack)
            .map(|h| h.id.clone())
            .collect();
        let mut e = BTreeMap::new();
        let rolled = self
            .hosts
            .values()
            .filter(|h| h.phase == HostPhase::RolledBack)
            .count();
        e.insert("rolled_back".into(), rolled.to_string());
        if !later.is_empty() {
            e.insert("unreachable_pending_rollback".into(), join_ids(&later));
        }
        let final_state = if failed.is_empty() {
            self.rollback_final.unwrap_or(RolloutState::RolledBack)
        } else {
            e.insert("rollback_failed".into(), join_ids(&failed));
            self.reason = format!(
                "{}; the rollback failed on {}",
                self.reason,
                join_ids(&failed)
            );
            RolloutState::Failed
        };
        if !later.is_empty() {
            self.reason = format!(
                "{}; {} unreachable hosts are rolled back when they reconnect",
                self.reason,
                later.len()
            );
        }
        let left: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.left_without_baseline)
            .map(|h| h.id.clone())
            .collect();
        if !left.is_empty() {
            e.insert("no_baseline_hosts".into(), join_ids(&left));
            e.insert("left_on_release".into(), self.spec.release.to_string());
            self.reason = format!(
                "{}; {} hosts had no baseline release to restore and were left on {}",
                self.reason,
                left.len(),
                self.spec.release
            );
        }
        self.state = final_state;
        let reason = self.reason.clone();
        let idx = self.current_wave as u32;
        self.decide(now, idx, "rollback_finished", reason, e, ENGINE);
        true
    }

    fn check_waiting(&mut self, now: u64) -> bool {
        let idx = self.current_wave;
        if idx >= self.waves.len() {
            return false;
        }
        if let Some((reason, evidence)) = self.breach(idx) {
            self.state = RolloutState::Running;
            self.gate_failed(now, idx, reason, evidence);
            return true;
        }
        // Unknown hosts (just after a restart) are neither back nor missing yet.
        if self.waves[idx]
            .hosts
            .iter()
            .any(|id| self.hosts.get(id).is_some_and(HostEntry::unknown))
        {
            return false;
        }
        let c = self.counts(idx);
        if self
            .spec
            .unreachable_threshold
            .exceeded(c.unreachable, c.size)
        {
            return false;
        }
        let evidence = self.gate_evidence(idx, c);
        self.resume_wave(now);
        self.decide(
            now,
            idx as u32,
            "resume",
            format!(
                "wave {idx}: enough hosts are reachable again ({} unreachable)",
                c.unreachable
            ),
            evidence,
            ENGINE,
        );
        true
    }

    /// After success: bring hosts that joined late or were accepted while unreachable to the
    /// release, and confirm them once healthy.
    fn converge(&mut self, now: u64) -> bool {
        let mut changed = false;
        let total = self.hosts.len() as u32;
        let max_in_flight = self
            .spec
            .max_in_flight
            .map_or(u32::MAX, |l| l.allowed_at_least_one(total));
        let mut in_flight = self.hosts.values().filter(|h| h.in_flight()).count() as u32;
        let ids: Vec<HostId> = self.hosts.keys().cloned().collect();
        for id in ids {
            let Some(h) = self.hosts.get(&id) else {
                continue;
            };
            // Hosts that joined late, and hosts of a wave that was promoted while they were
            // unreachable (accepted by an operator), get the release once they are back, within
            // the in-flight budget.
            if h.phase == HostPhase::Pending && h.reachable() && h.failure.is_none() {
                if in_flight >= max_in_flight {
                    continue;
                }
                in_flight += 1;
                self.activate(now, &id);
                changed = true;
            } else if h.phase == HostPhase::Healthy
                && h.failure.is_none()
                && h.order
                    .as_ref()
                    .is_some_and(|o| o.kind == OrderKind::Activate)
            {
                self.issue(now, &id, OrderKind::Confirm);
                changed = true;
            } else if h.reachable()
                && h.failure.is_none()
                && h.phase == HostPhase::Activated
                && h.activated_ms
                    .is_some_and(|t| t + ms(self.spec.healthy_deadline) <= now)
            {
                self.fail_host(now, &id, "not healthy within the healthy deadline".into());
                changed = true;
            }
        }
        changed
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
            h.phase = HostPhase::Failed;
        }
        self.dirty_hosts.insert(id.clone());
        self.event(now, format!("host {id} failed: {reason}"));
        if roll_back {
            self.start_host_rollback(now, id);
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
        kind: &str,
        reason: String,
        evidence: BTreeMap<String, String>,
        actor: &str,
    ) {
        self.event(
            now,
            format!("decision {kind} by {actor} (wave {wave}): {reason}"),
        );
        self.decisions.push(Decision {
            at_ms: now,
            wave,
            kind: kind.to_string(),
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

    // ----------------------------------------------------------------------------------------
    // Output

    fn order_for(&self, h: &HostEntry) -> Option<Order> {
        let o = h.order.as_ref()?;
        let seq = o.seq?;
        let action = match o.kind {
            OrderKind::Activate => OrderAction::Activate {
                release: self.release.clone(),
                healthy_deadline: self.spec.healthy_deadline,
                min_healthy: self.spec.min_healthy,
                confirm_deadline: Some(self.confirm_deadline(h.wave as usize)),
            },
            OrderKind::Confirm => OrderAction::Confirm {
                release: self.spec.release.clone(),
            },
            OrderKind::Rollback => OrderAction::Rollback { to: o.to.clone() },
        };
        Some(Order {
            order_id: o.order_id.clone(),
            rollout_id: self.id.clone(),
            seq,
            service: self.spec.service.clone(),
            action,
        })
    }

    /// How long an agent waits for a confirm after activating: the time the coordinator may
    /// legitimately need (becoming healthy, then the bake) plus [`EngineSettings::confirm_grace`].
    /// When the wave is paced (in-flight, unavailability or domain budgets), early hosts also
    /// wait for later ones, so the progress deadline bounds the first part instead.
    pub fn confirm_deadline(&self, wave: usize) -> Duration {
        let paced = self.spec.max_in_flight.is_some()
            || self.spec.max_unavailable.is_some()
            || self.spec.max_domains_in_flight.is_some();
        let first = if paced {
            self.spec.progress_deadline
        } else {
            self.spec.healthy_deadline
        };
        (first + self.spec.bake_for(wave) + self.settings.confirm_grace)
            .min(serin_proto::MAX_ORDER_DEADLINE)
    }

    fn drain(&mut self, now: u64, refused: Option<ControlError>) -> Vec<Command> {
        let mut out = Vec::new();
        if self.dirty_header || !self.dirty_hosts.is_empty() || !self.events.is_empty() {
            self.updated_ms = now;
            let hosts = std::mem::take(&mut self.dirty_hosts)
                .into_iter()
                .filter_map(|id| self.hosts.get(&id))
                .map(|h| HostRecord {
                    version: RECORD_VERSION,
                    host: h.clone(),
                })
                .collect();
            out.push(Command::Persist(Persist {
                header: self.header_record(),
                hosts,
                events: std::mem::take(&mut self.events),
            }));
            self.dirty_header = false;
        }
        let mut alloc = Vec::new();
        for h in self.hosts.values() {
            if let Some(o) = &h.order
                && o.seq.is_none()
                && !o.done
                && !self.requested.contains(&o.order_id)
            {
                alloc.push(SeqRequest {
                    host: h.id.clone(),
                    order_id: o.order_id.clone(),
                    at_least: h.last_seq,
                });
            }
        }
        for r in &alloc {
            self.requested.insert(r.order_id.clone());
        }
        if !alloc.is_empty() {
            out.push(Command::AllocateSeqs(alloc));
        }
        let mut sent = BTreeSet::new();
        for id in std::mem::take(&mut self.sends) {
            if !sent.insert(id.clone()) {
                continue;
            }
            if let Some(h) = self.hosts.get(&id)
                && let Some(order) = self.order_for(h)
            {
                out.push(Command::Send { host: id, order });
            }
        }
        for id in &sent {
            if let Some(o) = self.hosts.get_mut(id).and_then(|h| h.order.as_mut()) {
                o.sent_ms = Some(now);
            }
        }
        if let Some(e) = refused {
            out.push(Command::Refused(e));
        }
        if self.state.is_finished() && !self.finished_reported {
            self.finished_reported = true;
            out.push(Command::Finished(self.state));
        }
        out
    }

    /// The rollout as operators see it.
    pub fn status(&self) -> RolloutView {
        let waves = (0..self.waves.len())
            .map(|i| {
                let w = &self.waves[i];
                let c = self.counts(i);
                WaveView {
                    index: w.index,
                    size: c.size,
                    state: w.state,
                    succeeded: c.healthy,
                    failed: c.failed,
                    unreachable: c.unreachable,
                    in_progress: c.in_progress,
                    started_ms: w.started_ms,
                    bake_ends_ms: w.bake_ends_ms,
                }
            })
            .collect();
        let mut hosts: Vec<&HostEntry> = self.hosts.values().collect();
        hosts.sort_by(|a, b| (a.wave, &a.id).cmp(&(b.wave, &b.id)));
        let hosts = hosts
            .into_iter()
            .map(|h| {
                let final_phase = matches!(
                    h.phase,
                    HostPhase::Confirmed
                        | HostPhase::Failed
                        | HostPhase::RolledBack
                        | HostPhase::Skipped
                );
                // An unknown host (just after a restart) keeps its last known phase; the detail
                // says that it has not been heard from yet.
                let phase = if h.reach == Reach::Unreachable && !final_phase {
                    ShownPhase::Unreachable
                } else {
                    ShownPhase::Phase(h.phase)
                };
                let target = if matches!(h.phase, HostPhase::RollingBack | HostPhase::RolledBack) {
                    h.baseline.clone()
                } else {
                    Some(self.spec.release.clone())
                };
                let mut detail = match (&h.rollback_failed, &h.failure) {
                    (Some(r), _) => r.clone(),
                    (None, Some(f)) if h.detail != *f => format!("{f}; {}", h.detail),
                    _ => h.detail.clone(),
                };
                if h.unknown() && !final_phase {
                    detail = format!("not heard from since the coordinator restarted; {detail}");
                }
                HostView {
                    id: h.id.clone(),
                    hostname: h.hostname.clone(),
                    wave: h.wave,
                    phase,
                    baseline: h.baseline.clone(),
                    target,
                    current: h.current.clone(),
                    healthy: h.healthy.unwrap_or(false),
                    detail,
                    labels: h.labels.clone(),
                }
            })
            .collect();
        RolloutView {
            id: self.id.clone(),
            spec: self.spec.clone(),
            state: self.state,
            reason: self.reason.clone(),
            current_wave: self.current_wave as u32,
            waves,
            hosts,
            comparison: self.comparison.clone(),
            decisions: self.decisions.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
        }
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
    }
}

fn join_ids(ids: &[HostId]) -> String {
    ids.iter().map(HostId::as_str).collect::<Vec<_>>().join(",")
}
