//! Engine-wide tunables that are not part of a rollout's spec.

use std::time::Duration;

use super::analysis::AnalysisSettings;

/// The default of [`EngineSettings::stage_ahead`]: a 50-host fleet is staged whole at the
/// start, while a 20,000-host rollout sends ~100 extra orders per wave rather than doubling its
/// orders (and the coordinator serves at most this many downloads ahead at once).
pub const DEFAULT_STAGE_AHEAD: u32 = 100;

/// Settings of the rollout engine, shared by every rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    /// Safety tick: every rollout re-evaluates at least this often, besides its own deadlines.
    pub tick: Duration,
    /// Added to an activation's confirm deadline so that an agent's dead-man switch only fires
    /// when the coordinator is really gone, not because a gate took a moment longer.
    pub confirm_grace: Duration,
    /// How long a reachable host may take to answer a rollback order before the rollback of
    /// that host counts as failed.
    pub rollback_timeout: Duration,
    /// When the coordinator judges an armed, unconfirmed host unhealthy (its healthy deadline
    /// passed, or it turned unhealthy), its agent reverts by itself for the same reason: the
    /// rollback order waits this long for the agent's own ROLLED_BACK, so a host that already
    /// rolled back is never ordered (and restarted) again.
    pub self_revert_grace: Duration,
    /// How long to wait before re-sending an order the agent refused as busy or stale.
    pub order_retry_delay: Duration,
    /// Orders re-sent after busy/stale refusals before the host counts as failed.
    pub max_order_attempts: u32,
    /// Canary analysis tunables.
    pub analysis: AnalysisSettings,
    /// When true, a confident "canary worse" verdict fails the gate; otherwise it is evidence only.
    pub analysis_gates: bool,
    /// Capacity of each rollout's operator channel.
    pub control_queue: usize,
    /// After a coordinator restart, how long a host may take to reconnect before it counts as
    /// unreachable. Until then it is *unknown*: gates and the end of a rollback wait for it
    /// rather than count it as missing. The server should pass its `unreachable_after`.
    pub resume_grace: Duration,
    /// Prepare, then activate: at most this many pending hosts of a running rollout get a
    /// `Stage` order ahead of their wave (the current wave's hosts still waiting for dispatch
    /// first, then the next waves in order), so their activation swaps a release already on
    /// disk. A slot frees when a staged host is dispatched. 0 turns staging ahead off.
    pub stage_ahead: u32,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            confirm_grace: Duration::from_secs(60),
            rollback_timeout: Duration::from_secs(120),
            self_revert_grace: Duration::from_secs(5),
            order_retry_delay: Duration::from_secs(2),
            max_order_attempts: 5,
            analysis: AnalysisSettings::default(),
            analysis_gates: true,
            control_queue: 16,
            resume_grace: Duration::from_secs(10),
            stage_ahead: DEFAULT_STAGE_AHEAD,
        }
    }
}
