//! The persisted intent of a rollout: its state, its waves, each host's cohort, baseline, phase
//! and last order, and every decision with its evidence (STYLE rule 3). These types are what
//! `record.rs` stores; what hosts are observed to do is kept apart ([`Reach`] and the observed
//! fields of [`HostEntry`], which are never persisted). Transitions of the phases live on the enums.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serin_proto::{HostId, ReleaseId};

use super::observed::{Observed, Reach};
use super::record::ids;

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

    // Transitions: the host-phase table of ARCHITECTURE.md, one method per event. Guards that
    // depend on more than the phase (a failure already recorded, which order a result answers)
    // stay with the handler that calls them.

    /// An activate order was issued (a pending host, or a failed host an operator retries).
    pub fn on_dispatch(self) -> HostPhase {
        HostPhase::Dispatched
    }

    /// The agent swapped the release in and restarted the service.
    pub fn on_activated(self) -> HostPhase {
        match self {
            HostPhase::Dispatched => HostPhase::Activated,
            p => p,
        }
    }

    /// The agent reports the release healthy for the minimum healthy time.
    pub fn on_healthy(self) -> HostPhase {
        match self {
            HostPhase::Dispatched | HostPhase::Activated => HostPhase::Healthy,
            p => p,
        }
    }

    /// The agent confirmed after the gate passed (its dead-man switch is disarmed).
    pub fn on_confirmed(self) -> HostPhase {
        HostPhase::Confirmed
    }

    /// A rollback order to the baseline was issued.
    pub fn on_rollback_ordered(self) -> HostPhase {
        HostPhase::RollingBack
    }

    /// The host is back on its baseline: the ordered rollback, or its agent's dead-man switch.
    pub fn on_rolled_back(self) -> HostPhase {
        HostPhase::RolledBack
    }

    /// The attempt, or the rollback, failed for good.
    pub fn on_failed(self) -> HostPhase {
        HostPhase::Failed
    }

    /// A rollback found no baseline to restore: the host stays on the release, skipped (or
    /// failed, if it failed itself).
    pub fn on_no_baseline(self, failed: bool) -> HostPhase {
        if failed {
            HostPhase::Failed
        } else {
            HostPhase::Skipped
        }
    }

    /// An operator retries a failed host: it waits for dispatch again.
    pub fn on_retry(self) -> HostPhase {
        HostPhase::Pending
    }

    /// The agent's dead-man switch reverted the host because no confirm or hold reached it (the
    /// coordinator's silence, not the release): it waits for dispatch again while the rollout
    /// goes on (`redispatch`), else it is simply back on its baseline.
    pub fn on_unheld_revert(self, redispatch: bool) -> HostPhase {
        if redispatch {
            HostPhase::Pending
        } else {
            HostPhase::RolledBack
        }
    }

    /// Whether the host may be running the new release.
    pub(crate) fn touched_new(self) -> bool {
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
    /// Download and verify the target release ahead of the host's wave (prepare, then
    /// activate): changes nothing the host serves. Only ever given to a pending host.
    Stage,
    /// Stop a stage in flight (the rollout rolls back or ended before the host's wave).
    Cancel,
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

/// One host of the rollout, as decided (what it is observed doing is in [`super::observed`]).
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
    /// The host was judged unhealthy while its agent's switch was armed: a rollback order is
    /// issued then unless the agent reports its own rollback first.
    #[serde(default)]
    pub rollback_at_ms: Option<u64>,
    /// Highest sequence known to be used for this host's service.
    pub last_seq: u64,
    pub dispatched_ms: Option<u64>,
    pub activated_ms: Option<u64>,
    pub healthy_ms: Option<u64>,
    /// Joined while the rollout was under way.
    pub joined: bool,
    /// Staging the release ahead of the host's wave failed: a warning only (the host is not
    /// failed; its activation stages again and fails there if the problem stays).
    #[serde(default)]
    pub stage_warning: Option<String>,
}

impl HostEntry {
    /// Counts as failed against thresholds.
    pub(crate) fn counts_failed(&self) -> bool {
        self.failure.is_some() && !self.waived
    }

    /// Nothing more to wait for in its wave before baking, given what is observed of it.
    pub(crate) fn settled(&self, seen: &Observed) -> bool {
        self.failure.is_some()
            || seen.reach == Reach::Unreachable
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
    pub(crate) fn counts_unreachable(&self, seen: &Observed) -> bool {
        seen.reach == Reach::Unreachable
            && self.failure.is_none()
            && self.phase != HostPhase::Confirmed
    }

    /// Pending with a stage order of this rollout (staged ahead of its wave, or being staged).
    pub(crate) fn staged_ahead(&self) -> bool {
        self.phase == HostPhase::Pending
            && self
                .order
                .as_ref()
                .is_some_and(|o| o.kind == OrderKind::Stage)
    }

    /// A stage order that still has to be sent or answered.
    pub(crate) fn stage_in_flight(&self) -> bool {
        self.order
            .as_ref()
            .is_some_and(|o| o.kind == OrderKind::Stage && !o.done)
    }

    /// Dispatched and not yet healthy.
    pub(crate) fn in_flight(&self) -> bool {
        self.failure.is_none() && matches!(self.phase, HostPhase::Dispatched | HostPhase::Activated)
    }
}

/// What a decision decided (`Decision.kind`; stored and shown in snake case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// A wave's gate passed (by the engine after its bake, or by an operator's promote).
    Promote,
    /// Too many hosts of the wave are unreachable: the rollout waits for them.
    Wait,
    /// The rollout stops for an operator (a failed gate with `on_failure = pause`, an operator,
    /// or a store that refused a save).
    Pause,
    /// The rollout continues (an operator, hosts back, or the store writing again).
    Resume,
    /// A gate failed: every touched host goes back to its baseline.
    Rollback,
    /// An operator aborted: every touched host goes back to its baseline.
    Abort,
    /// An operator retried the failed hosts of the wave.
    Retry,
    /// Every wave passed.
    Complete,
    /// An operator rolled a succeeded rollout back.
    ManualRollback,
    /// Every reachable touched host answered its rollback.
    RollbackFinished,
}

impl DecisionKind {
    /// The kind as shown to operators and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Promote => "promote",
            DecisionKind::Wait => "wait",
            DecisionKind::Pause => "pause",
            DecisionKind::Resume => "resume",
            DecisionKind::Rollback => "rollback",
            DecisionKind::Abort => "abort",
            DecisionKind::Retry => "retry",
            DecisionKind::Complete => "complete",
            DecisionKind::ManualRollback => "manual_rollback",
            DecisionKind::RollbackFinished => "rollback_finished",
        }
    }

    /// Whether this decision sends touched hosts back to their baselines.
    pub fn rolls_back(self) -> bool {
        matches!(
            self,
            DecisionKind::Rollback | DecisionKind::Abort | DecisionKind::ManualRollback
        )
    }
}

impl fmt::Display for DecisionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A recorded decision, with its evidence and actor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub at_ms: u64,
    pub wave: u32,
    pub kind: DecisionKind,
    pub reason: String,
    pub evidence: BTreeMap<String, String>,
    /// `engine` or the operator's name.
    pub actor: String,
}

#[cfg(test)]
mod tests {
    use super::HostPhase::*;

    /// The host-phase table of ARCHITECTURE.md, row by row.
    #[test]
    fn host_phase_transitions_follow_the_table() {
        assert_eq!(Pending.on_dispatch(), Dispatched);
        assert_eq!(Dispatched.on_activated(), Activated);
        assert_eq!(
            Healthy.on_activated(),
            Healthy,
            "a late 'activated' changes nothing"
        );
        assert_eq!(Dispatched.on_healthy(), Healthy);
        assert_eq!(Activated.on_healthy(), Healthy);
        assert_eq!(RollingBack.on_healthy(), RollingBack);
        assert_eq!(Healthy.on_confirmed(), Confirmed);
        assert_eq!(Healthy.on_rollback_ordered(), RollingBack);
        assert_eq!(RollingBack.on_rolled_back(), RolledBack);
        assert_eq!(Activated.on_rolled_back(), RolledBack);
        assert_eq!(RollingBack.on_failed(), Failed);
        assert_eq!(Dispatched.on_no_baseline(false), Skipped);
        assert_eq!(Dispatched.on_no_baseline(true), Failed);
        assert_eq!(Failed.on_retry(), Pending);
        for p in [Dispatched, Activated, Healthy, Confirmed] {
            assert!(p.touched_new(), "{p:?}");
        }
        for p in [Pending, Failed, RollingBack, RolledBack, Skipped] {
            assert!(!p.touched_new(), "{p:?}");
        }
    }
}
